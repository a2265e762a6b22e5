"""Registry credentials for pulls, resolved from the Docker config file as docker-py does.

Owns: `RegistryAuth` (the loaded config, reloadable on SIGHUP) and `Credentials` (what one pull
sends). The resolution follows docker-py 7.x (its docker/auth.py), which follows the docker CLI:

1. The registry comes from the image name: the first "/" segment when it is `localhost` or holds
   a "." or ":", else Docker Hub (`docker.io`, whose key in the stores is `INDEX_URL`).
2. `credHelpers[registry]`, else `credsStore`: `docker-credential-<name> get`, server URL on
   stdin, `{ServerURL, Username, Secret}` on stdout; Username `<token>` means an identity token;
   an empty answer or "credentials not found" falls through to step 3.
3. `auths`: the exact key, then any key whose hostname (scheme and path stripped,
   `index.docker.io` read as `docker.io`) is the registry. `auth` is base64 of `user:password`,
   split on the FIRST colon (passwords may hold ":"); `username`/`password` fields and
   `identitytoken` work too. An empty entry `{}` means "in a store": no credentials.
4. Nothing found: anonymous, no header.

Invariants: a secret never reaches a repr, a log line or an exception message (attrs fields with
`repr=False`; error messages name the file and the key, never the content). The X-Registry-Auth
value is URL-safe, padded base64 of JSON: anything else the engine silently reads as "no
credentials".
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import structlog
import trio

from condo.errors import ConfigError, DockerError

log = structlog.get_logger(__name__)

INDEX_NAME = "docker.io"
INDEX_URL = "https://index.docker.io/v1/"
TOKEN_USERNAME = "<token>"


@attrs.frozen(kw_only=True)
class Credentials:
    """What to send for one registry: a username and password, or an identity token."""

    server_address: str
    username: str = ""
    password: str = attrs.field(default="", repr=False)
    identity_token: str = attrs.field(default="", repr=False)

    def header(self) -> str:
        """The X-Registry-Auth value: URL-safe, padded base64 of the JSON auth config."""
        payload = {"serveraddress": self.server_address}
        if self.identity_token:
            payload["identitytoken"] = self.identity_token
        else:
            payload["username"] = self.username
            payload["password"] = self.password
        return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode("ascii")


@attrs.frozen(kw_only=True)
class _ConfigFile:
    """The parts of config.json that matter for pulls, already decoded."""

    auths: Mapping[str, Credentials | None] = attrs.field(factory=dict, repr=False)
    """Key as written in the file → credentials, or None for an empty entry."""
    cred_helpers: Mapping[str, str] = attrs.field(factory=dict)
    creds_store: str = ""


def registry_of(image: str) -> str:
    """The registry an image reference lives in: "localhost:5000", "ghcr.io", or "docker.io"."""
    first, slash, _ = image.partition("/")
    if slash and (first == "localhost" or "." in first or ":" in first):
        return _index_alias(first)
    return INDEX_NAME


def _index_alias(hostname: str) -> str:
    return INDEX_NAME if hostname == "index." + INDEX_NAME else hostname


def _hostname(key: str) -> str:
    # Legacy keys look like "https://index.docker.io/v1/": strip the scheme and the path.
    return _index_alias(key.removeprefix("http://").removeprefix("https://").split("/", 1)[0])


def default_config_path() -> Path:
    """$DOCKER_CONFIG/config.json, else ~/.docker/config.json (as the docker CLI reads it)."""
    directory = os.environ.get("DOCKER_CONFIG")
    base = Path(directory) if directory else Path.home() / ".docker"
    return base / "config.json"


def _parse_entry(path: Path, key: str, entry: Any) -> Credentials | None:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{path}: auths[{key!r}] is not an object")
    if token := entry.get("identitytoken"):
        return Credentials(server_address=key, identity_token=str(token))
    if encoded := entry.get("auth"):
        try:
            decoded = base64.b64decode(str(encoded), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):  # either way the value is unusable
            raise ConfigError(f"{path}: auths[{key!r}].auth is not base64") from None
        username, colon, password = decoded.partition(":")
        if not colon:
            raise ConfigError(f"{path}: auths[{key!r}].auth is not base64 of user:password")
        return Credentials(server_address=key, username=username, password=password)
    if entry.get("username") and entry.get("password"):
        return Credentials(
            server_address=key, username=str(entry["username"]), password=str(entry["password"])
        )
    return None


def _parse(path: Path, text: str) -> _ConfigFile:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        # exc.msg describes the syntax problem only; the document itself stays out of the message.
        raise ConfigError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: not a Docker config file (expected a JSON object)")
    auths = raw.get("auths") or {}
    helpers = raw.get("credHelpers") or {}
    store = raw.get("credsStore") or ""
    if not isinstance(auths, Mapping):
        raise ConfigError(f"{path}: auths is not an object")
    if not isinstance(helpers, Mapping) or not all(isinstance(v, str) for v in helpers.values()):
        raise ConfigError(f"{path}: credHelpers is not an object of helper names")
    if not isinstance(store, str):
        raise ConfigError(f"{path}: credsStore is not a helper name")
    return _ConfigFile(
        auths={str(k): _parse_entry(path, str(k), v) for k, v in auths.items()},
        cred_helpers={str(k): v for k, v in helpers.items()},
        creds_store=store,
    )


def _read(path: Path) -> _ConfigFile:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        log.info("docker.auth.anonymous", path=str(path), reason="no such file")
        return _ConfigFile()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    config = _parse(path, text)
    log.info(
        "docker.auth.loaded",
        path=str(path),
        registries=sorted(config.auths),
        cred_helpers=dict(config.cred_helpers),
        creds_store=config.creds_store or None,
    )
    return config


async def _ask_helper(name: str, server_url: str) -> Credentials | None:
    program = f"docker-credential-{name}"
    try:
        result = await trio.run_process(
            [program, "get"],
            stdin=server_url.encode(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    except OSError as exc:  # not on PATH, not executable: the config names a helper we lack
        raise DockerError(f"credential helper {program} cannot be run: {exc.strerror}") from None
    if result.returncode != 0:
        said = (result.stdout or result.stderr).decode("utf-8", "replace").strip()
        if "credentials not found" in said.lower():
            return None
        raise DockerError(
            f"credential helper {program} failed (exit {result.returncode}): {said[:200]}"
        )
    try:
        answer = json.loads(result.stdout)
        username, secret = str(answer.get("Username") or ""), str(answer.get("Secret") or "")
    except (ValueError, AttributeError):  # not JSON, or JSON that is not an object
        raise DockerError(
            f"credential helper {program} answered something that is not JSON"
        ) from None
    if not username and not secret:
        return None
    if username == TOKEN_USERNAME:
        return Credentials(server_address=server_url, identity_token=secret)
    return Credentials(server_address=server_url, username=username, password=secret)


class RegistryAuth:
    """The Docker config file condo pulls with; `reload()` re-reads it (SIGHUP).

    Not a value: it holds the current parsed file and swaps it in one assignment on reload, so a
    concurrent `header_for` sees either the old or the new file, never a mix.
    """

    def __init__(self, path: Path | None, config: _ConfigFile) -> None:
        self._path = path
        self._config = config

    @classmethod
    def load(cls, path: Path | None = None) -> RegistryAuth:
        """Read `path` (None: `default_config_path()`, resolved now). A missing file is anonymous.

        Raises ConfigError, naming the file but never echoing its content, when it cannot be used.
        """
        resolved = path if path is not None else default_config_path()
        return cls(resolved, _read(resolved))

    @classmethod
    def anonymous(cls) -> RegistryAuth:
        """No config file at all: every pull is anonymous."""
        return cls(None, _ConfigFile())

    def reload(self) -> None:
        """Re-read the file. On ConfigError the previous configuration stays in force.

        Synchronous on purpose: it reads one small local file (microseconds), and a plain call is
        what a signal handler wants.
        """
        if self._path is not None:
            self._config = _read(self._path)

    async def credentials_for(self, image: str) -> Credentials | None:
        """The credentials a pull of `image` should carry, or None (anonymous).

        Raises DockerError (transient) when a configured credential helper cannot answer.
        """
        config = self._config
        registry = registry_of(image)
        store_key = INDEX_URL if registry == INDEX_NAME else registry
        if helper := config.cred_helpers.get(store_key) or config.creds_store:
            found = await _ask_helper(helper, store_key)
            if found is not None:
                return found
        if registry in config.auths:
            return config.auths[registry]
        for key, entry in config.auths.items():
            if _hostname(key) == registry:
                return entry
        return None

    async def header_for(self, image: str) -> str | None:
        """The X-Registry-Auth header value for pulling `image`, or None to pull anonymously."""
        credentials = await self.credentials_for(image)
        return credentials.header() if credentials is not None else None

    def __repr__(self) -> str:
        return f"RegistryAuth(path={str(self._path) if self._path else None!r})"
