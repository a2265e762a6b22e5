"""The maps stay true: doc/architecture.md's module table and task tree, README's Development
tree and the import-linter contract that names every module all match the code as it is."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "condo"
ARCHITECTURE = ROOT / "doc" / "architecture.md"
README = ROOT / "README.md"


def modules() -> set[str]:
    """Every module file under src/condo, relative (`web/app.py`), but package markers."""
    return {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py")
    }


def top_level() -> set[str]:
    """`cli.py` … and the packages as `docker/`."""
    return {name.split("/")[0] + ("/" if "/" in name else "") for name in modules()}


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    following = text.find("\n## ", start + len(heading))
    return text[start : None if following == -1 else following]


def first_block(text: str) -> str:
    return text.split("```\n", 2)[1]


def tree_names(block: str) -> list[str]:
    """The task names of a `├─ name   what it does` tree."""
    return re.findall(r"[├└]─ (\S+(?: \S+)*?)(?:\s{2,}|$)", block, re.MULTILINE)


def test_the_module_table_lists_every_module_and_nothing_else() -> None:
    table = section(ARCHITECTURE.read_text(), "## Modules")
    listed = re.findall(r"^\| ([\w/]+\.py) \|", table, re.MULTILINE)
    assert len(listed) == len(set(listed)), "a module is listed twice"
    assert set(listed) == modules()


def test_readme_development_tree_names_every_top_level_module() -> None:
    block = first_block(section(README.read_text(), "## Development"))
    tree = block.split("tests/", 1)[0]  # src/condo's part
    named = set(re.findall(r"(?<![\w/])(\w+\.py|\w+/)(?=\s)", tree)) - {"condo/"}
    assert named == top_level()


def test_every_module_says_what_it_owns() -> None:
    for path in PACKAGE.rglob("*.py"):
        docstring = ast.get_docstring(ast.parse(path.read_text()))
        assert docstring, f"{path.relative_to(ROOT)} has no module docstring"


def test_the_task_tree_is_the_one_run_condo_names() -> None:
    source = (PACKAGE / "run.py").read_text()
    spawned = re.findall(r'name="([^"]+)"', source)
    documented = tree_names(first_block(section(ARCHITECTURE.read_text(), "## The task tree")))
    # The drivers are named per service by the supervisor (`service NAME`).
    assert 'name=f"service {name}"' in (PACKAGE / "supervisor.py").read_text()
    assert documented == [*spawned[:6], "service NAME", *spawned[6:]]
    readme = first_block(section(README.read_text(), "The task tree"))
    assert tree_names(readme) == documented


def contract(name_start: str) -> dict[str, Any]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    [found] = [
        c for c in config["tool"]["importlinter"]["contracts"] if c["name"].startswith(name_start)
    ]
    return dict(found)


def every_module() -> set[str]:
    return {"condo." + name.removesuffix(".py").rstrip("/") for name in top_level()}


def test_the_layers_are_the_contracts_and_hold_every_module() -> None:
    layers = contract("layers:")["layers"]
    documented = first_block(section(ARCHITECTURE.read_text(), "## Layers and ports"))
    assert documented.splitlines() == layers
    named = [module.strip() for layer in layers for module in layer.split("|")]
    assert sorted(named) == sorted(every_module())


def test_the_web_contract_names_every_module_but_run_and_web() -> None:
    """`condo.run is the only module that imports both the supervisor and the web app` holds
    only if it names every other module: a new module must be added to it."""
    sources = contract("condo.run is the only module")["source_modules"]
    assert set(sources) == every_module() - {"condo.run", "condo.web"}
