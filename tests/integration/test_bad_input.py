"""Bad input against a running condo on the real engine: each case is a clear error in
/v1/state, nothing that runs is touched, and condo keeps going."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from condo.docker import DockerClient
from tests.integration.harness import CondoUnderTest, condo_files, start_condo

pytestmark = pytest.mark.docker

GOOD = '{:spec {:Image "condo-test/busybox:1"}}'


def text(content: str) -> Callable[[Path], object]:
    return lambda path: path.write_text(content)


def raw(content: bytes) -> Callable[[Path], object]:
    return lambda path: path.write_bytes(content)


def folder(path: Path) -> None:
    path.mkdir()


def symlink_loop(path: Path) -> None:
    other = path.with_name(".loop-" + path.name)
    os.symlink(path, other)
    os.symlink(other, path)


def dangling(path: Path) -> None:
    os.symlink(path.with_name("does-not-exist"), path)


def fifo(path: Path) -> None:
    os.mkfifo(path)


# service name -> (how the file is made, a substring of the spec error)
SPEC_CASES: dict[str, tuple[Callable[[Path], object], str]] = {
    "syntax": (text('{:spec {:Image "x"}'), ""),
    "odd-map": (text('{:spec {:Image "x" :Cmd}}'), ""),
    "illegal-char": (text('{:spec {:Image "x"}} \\'), ""),
    "two-forms": (text(GOOD + GOOD), "form"),
    "not-a-map": (text('[:spec {:Image "x"}]'), "map"),
    "empty": (text(""), "empty"),
    "comment-only": (text(";; nothing here\n"), "comments"),
    "no-spec": (text("{:deploy [:Before]}"), ":spec"),
    "spec-not-map": (text('{:spec "not-a-map"}'), ":spec"),
    "no-image": (text('{:spec {:Cmd ["true"]}}'), ":Image"),
    "image-not-string": (text("{:spec {:Image 42}}"), ":Image"),
    "bad-deploy": (text('{:spec {:Image "x"} :deploy [:Sideways]}'), ":deploy"),
    "negative-after": (text('{:spec {:Image "x"} :deploy [:After -1]}'), ":deploy"),
    "timeout-string": (text('{:spec {:Image "x"} :health-timeout "10"}'), ":health-timeout"),
    "timeout-negative": (text('{:spec {:Image "x"} :stop-timeout -5}'), ":stop-timeout"),
    "unknown-tag": (text('{:spec {:Image #foo "x"}}'), "#foo"),
    "unknown-key": (text('{:spec {:Image "x"} :deplyo [:Before]}'), ":deplyo"),
    "bad-pull": (text('{:spec {:Image "x"} :pull :sometimes}'), ":pull"),
    "reserved-label": (text('{:spec {:Image "x" :Labels {"condo.host" "y"}}}'), "condo."),
    "bad-name": (text('{:spec {:Image "x" :Name "no spaces allowed"}}'), ":Name"),
    "binary": (raw(b"\x00\xff\xfe garbage \x89PNG"), ""),
    "not-utf8": (raw(b'{:spec {:Image "caf\xe9"}}'), "UTF-8"),
    "huge": (raw(b'{:spec {:Image "x" :Env [' + b'"A=B" ' * 300_000 + b"]}}"), "large"),
    "deep": (text('{:spec {:Image "x" :Env ' + "[" * 200 + "]" * 200 + "}}"), ""),
    "folder": (folder, ""),
    "symlink-loop": (symlink_loop, ""),
    "dangling-link": (dangling, ""),
    "fifo": (fifo, ""),
    ".leading-dot-is-ignored-not-an-error": (text("junk"), "IGNORED"),
    "bad name with spaces": (text(GOOD), "name"),
}


# Cases made by what the path is or is called, not by what a file holds.
NOT_ABOUT_CONTENT = {
    "folder",
    "symlink-loop",
    "dangling-link",
    "fifo",
    "bad name with spaces",
    ".leading-dot-is-ignored-not-an-error",
}


@pytest.fixture
async def condo(tmp_path: Path, docker: DockerClient) -> AsyncIterator[CondoUnderTest]:
    async with condo_files(tmp_path, docker) as under_test:
        yield under_test


async def test_bad_spec_files_are_errors_and_touch_nothing(
    condo: CondoUnderTest, nursery: trio.Nursery
) -> None:
    await start_condo(nursery, condo)
    condo.write("keep", GOOD)
    keep = await condo.wait_state("keep", "Stable")
    for service, (make, _) in SPEC_CASES.items():
        make(condo.specs / f"{service}.edn")
    expected = {name for name, (_, hint) in SPEC_CASES.items() if hint != "IGNORED"}

    def all_reported(view: dict[str, Any]) -> bool:
        services = view["services"]
        return all((services.get(n) or {}).get("spec_error") for n in expected)

    view = await condo.wait(all_reported, limit=30)
    for name in expected:
        error = view["services"][name]["spec_error"]
        hint = SPEC_CASES[name][1]
        assert error["file"].endswith(f"{name}.edn"), (name, error)
        assert hint.lower() in error["message"].lower(), (name, error)
        assert view["services"][name]["state"] == "Init", name
    assert ".leading-dot-is-ignored-not-an-error" not in view["services"]
    assert view["services"]["keep"]["current"]["id"] == keep["current"]["id"]
    # Nothing but the good service runs, and it was never touched.
    assert [r.id for r in await condo.containers()] == [keep["current"]["id"]]


async def test_breaking_a_running_service_keeps_it_running(
    condo: CondoUnderTest, nursery: trio.Nursery
) -> None:
    await start_condo(nursery, condo)
    condo.write("web", GOOD)
    stable = await condo.wait_state("web", "Stable")
    path = condo.specs / "web.edn"
    for name, (make, _) in SPEC_CASES.items():
        if name in NOT_ABOUT_CONTENT:
            continue  # they need the path free, or are about the file's name; covered above
        make(path)
        view = await condo.wait(lambda v: v["services"]["web"]["spec_error"] is not None)
        assert view["services"]["web"]["current"]["id"] == stable["current"]["id"], name
        condo.write("web", GOOD)
        await condo.wait(lambda v: v["services"]["web"]["spec_error"] is None)
    assert await condo.running_ids("web") == {stable["current"]["id"]}
    assert condo.service("web")["current"]["id"] == stable["current"]["id"]  # type: ignore[index]


async def test_bodies_the_engine_rejects_and_name_clashes_are_errors(
    condo: CondoUnderTest, nursery: trio.Nursery
) -> None:
    await start_condo(nursery, condo)
    name = f"{condo.host}-taken"
    condo.write("first", f'{{:spec {{:Image "condo-test/busybox:1" :Name "{name}"}}}}')
    await condo.wait_state("first", "Stable")
    condo.write("second", f'{{:spec {{:Image "condo-test/busybox:1" :Name "{name}"}}}}')
    condo.write(
        "rejected",
        '{:spec {:Image "condo-test/busybox:1" :Healthcheck {:Test ["CMD" "true"] :Interval 1}}}',
    )
    condo.write("missing", '{:spec {:Image "condo-test/nothing-like-this:1"} :pull :never}')
    second = await condo.wait_state("second", "TryAgain")
    assert "in use" in second["error"]["message"] or "Conflict" in second["error"]["message"]
    rejected = await condo.wait_state("rejected", "TryAgain")
    assert "Interval" in rejected["error"]["message"]
    missing = await condo.wait_state("missing", "TryAgain")
    assert ":never" in missing["error"]["message"]
    assert condo.service("first")["state"] == "Stable"  # type: ignore[index]
    assert len(await condo.containers()) == 1
