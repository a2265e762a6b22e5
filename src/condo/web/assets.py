"""The web app's static files (the dashboard), served from a folder inside the package.

Safe by construction: the folder is read once at start-up (`StaticFiles.scan`, blocking: run it
in a thread), and a request can only name a file read then (a dictionary lookup on the relative
path). No path from a request is ever joined to the filesystem, so `..`, absolute paths, encoded
slashes or symlinks that point out of the folder cannot reach anything else. Dot-files are never
read. Serving does no I/O at all (the files are small: a page, its script and styles).

`locked_page` is the same page with its own script and styles inlined, for the 401 answer to a
browser when condo wants an API token (the page then asks for it): a 401 cannot serve the script
as a file (browsers run no script that came with an error status). The inlined parts are allowed
by their hashes in the page's own Content-Security-Policy, nothing else inline is.
"""

from __future__ import annotations

import base64
import hashlib
import mimetypes
import re
from collections.abc import Mapping
from pathlib import Path

import attrs

STATIC_ROOT = Path(__file__).parent / "static"
INDEX = "index.html"


@attrs.frozen(kw_only=True)
class StaticFile:
    data: bytes = attrs.field(repr=False)
    content_type: str
    policy: str | None = None  # the file's own Content-Security-Policy (the locked page's)


@attrs.frozen(kw_only=True)
class StaticFiles:
    """The files under one folder, by relative POSIX path ("index.html", "js/app.js")."""

    files: Mapping[str, StaticFile]

    @classmethod
    def scan(cls, root: Path = STATIC_ROOT) -> StaticFiles:
        """Read `root` (once, at start-up); symlinks out of it and dot-files are left out."""
        base = root.resolve()
        files: dict[str, StaticFile] = {}
        for path in sorted(base.rglob("*")):
            relative = path.relative_to(base)
            if any(part.startswith(".") for part in relative.parts):
                continue
            if not path.is_file() or not path.resolve().is_relative_to(base):
                continue
            files[relative.as_posix()] = StaticFile(
                data=path.read_bytes(), content_type=_content_type(path)
            )
        return cls(files=files)

    def lookup(self, name: str) -> StaticFile | None:
        """The file at relative path `name`, or None when it is not one of the files."""
        return self.files.get(name)


def _content_type(path: Path) -> str:
    guessed, _ = mimetypes.guess_type(path.name)
    content_type = guessed or "application/octet-stream"
    if content_type.startswith("text/") or content_type in (
        "application/javascript",
        "application/json",
    ):
        content_type += "; charset=utf-8"
    return content_type


# The page's own tags for its script and styles (exactly as index.html writes them).
_SCRIPT_TAG = re.compile(r'<script src="/ui/([\w.-]+)"( defer)?></script>')
_STYLE_TAG = re.compile(r'<link rel="stylesheet" href="/ui/([\w.-]+)">')
LOCKED_POLICY = (
    "default-src 'none'; script-src {scripts}; style-src {styles}; img-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


def locked_page(files: StaticFiles) -> StaticFile | None:
    """The index page with its /ui/ scripts and stylesheets inlined (None without an index).

    A file that would end its inline element early (`</script`, `</style`) is refused: the page
    is ours, so that is a bug to see at start-up, not something to escape.
    """
    index = files.lookup(INDEX)
    if index is None:
        return None
    hashes: dict[str, list[str]] = {"script": [], "style": []}

    def inline(kind: str, match: re.Match[str]) -> str:
        found = files.lookup(match.group(1))
        if found is None:
            raise ValueError(f"{INDEX} names /ui/{match.group(1)}, which is not a static file")
        text = found.data.decode()
        if f"</{kind}" in text.lower():
            raise ValueError(f"/ui/{match.group(1)} cannot be inlined: it contains </{kind}")
        digest = base64.b64encode(hashlib.sha256(found.data).digest()).decode()
        hashes[kind].append(f"'sha256-{digest}'")
        return f"<{kind}>{text}</{kind}>"

    page = index.data.decode()
    page = _SCRIPT_TAG.sub(lambda m: inline("script", m), page)
    page = _STYLE_TAG.sub(lambda m: inline("style", m), page)
    policy = LOCKED_POLICY.format(
        scripts=" ".join(hashes["script"]) or "'none'",
        styles=" ".join(hashes["style"]) or "'none'",
    )
    return StaticFile(data=page.encode(), content_type=index.content_type, policy=policy)
