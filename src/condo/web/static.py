"""The web app's static files (the dashboard), served from a folder inside the package.

Safe by construction: the folder is read once at start-up (`StaticFiles.scan`, blocking: run it
in a thread), and a request can only name a file read then (a dictionary lookup on the relative
path). No path from a request is ever joined to the filesystem, so `..`, absolute paths, encoded
slashes or symlinks that point out of the folder cannot reach anything else. Dot-files are never
read. Serving does no I/O at all (the files are small: a page, its script and styles).
"""

from __future__ import annotations

import mimetypes
from collections.abc import Mapping
from pathlib import Path

import attrs

STATIC_ROOT = Path(__file__).parent / "static"
INDEX = "index.html"


@attrs.frozen(kw_only=True)
class StaticFile:
    data: bytes = attrs.field(repr=False)
    content_type: str


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
