"""The one place in condo that speaks HTTP to the Docker engine.

Owns: `open_docker` (endpoint URL → an httpx client on the unix socket or TCP), `DockerClient`
(one method per engine operation condo needs), API version negotiation, and the mapping of every
httpx error and engine status into condo's error tree (`_translated` and `_error_for`, nowhere
else).

Invariants:
- Opening never touches the engine: condo starts (and reports the engine as down) while the engine
  is away. The API version is negotiated on the first call that needs it (and again by every
  `ping`): the engine's own (`GET /_ping`'s Api-Version) capped at `MAX_API_VERSION`, never below
  the engine's floor (`GET /version`'s MinAPIVersion; Docker 29 raised it to 1.44). Every other
  path is prefixed `/v<version>`. An engine whose floor is above `MAX_API_VERSION` is refused with
  `EngineUnsupported`, logged once, by every call (a recheck at most every
  `UNSUPPORTED_RECHECK` seconds), and so is one that refuses the version it announces (its
  /version promises what its calls refuse: "too old" again after a renegotiation); an engine
  that starts refusing our version mid-way (restarted with a higher floor, or replaced by an
  older engine) is renegotiated at once. Without an Api-Version header, `/version`'s ApiVersion
  stands in for it.
- Podman is recognised by the `Libpod-Api-Version` header of its `/_ping` (`is_podman`); its
  event filter names ("died", "remove") are used for it, and `run_healthcheck` runs a container's
  check through libpod's own API (Podman without systemd never runs one by itself).
- Every call leaves either a value or a `condo.errors.DockerError`; no httpx exception, JSON error
  or engine body shape escapes. A call logs one DEBUG line "docker.call" (method, path, status or
  error, took).
- Callers own deadlines (cancel scopes). The httpx timeouts below are only a guard against an
  engine that accepted a request and went silent; they surface as `DockerTimeout`.
- Credentials travel only in the X-Registry-Auth header of a pull; they are never logged and
  never part of an error message.
- Call observers (`add_call_observer`, for the latency metric) see one `CallRecord` per request
  that got an answer or failed (not per cancelled one); the path is a template without ids or
  image names, so it is safe as a metric label. Observers run synchronously and must not block.
"""

from __future__ import annotations

import enum
import json
import math
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Iterator, Mapping
from contextlib import aclosing, asynccontextmanager, contextmanager
from typing import Any, TypeVar

import attrs
import httpx
import structlog
import trio

from condo.docker.auth import RegistryAuth
from condo.docker.models import (
    Container,
    ContainerEvent,
    ContainerId,
    ContainerSummary,
    MalformedAnswer,
    parse_container,
    parse_event,
    parse_repo_digests,
    parse_summaries,
)
from condo.errors import (
    BadRequest,
    ConfigError,
    ContainerNotFound,
    DockerApiError,
    DockerError,
    DockerTimeout,
    DockerUnavailable,
    EngineUnsupported,
    ImageNotFound,
    NameConflict,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")

MAX_API_VERSION = "1.51"
"""The newest API condo is tested with (Docker 28.5); older engines are spoken to in their own."""

UNSUPPORTED_RECHECK = 5.0
"""Seconds between two looks at an engine that refused condo's API versions (Trio's clock)."""

DEFAULT_URL = "unix:///var/run/docker.sock"

# Guards against a silent engine, not deadlines (callers own those). Connecting to a live engine
# takes milliseconds; a busy one may take seconds to answer a create or a start.
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
# A pull streams progress lines continuously; five silent minutes mean the pull is stuck.
PULL_TIMEOUT = httpx.Timeout(30.0, connect=5.0, read=300.0)
# An idle events stream is normal: never time out reading it.
EVENTS_TIMEOUT = httpx.Timeout(30.0, connect=5.0, read=None)
# `stop` answers only after the grace period (and the SIGKILL that may follow it).
STOP_TIMEOUT_MARGIN = 30.0

# Answers to a pull that mean the image or the tag does not exist (Docker 20.10 against
# registry 2.8: "manifest unknown" for a missing tag, "not found"/"no such image" otherwise).
_IMAGE_MISSING = ("no such image", "manifest unknown", "not found")


class _Subject(enum.Enum):
    """What a request is about: decides what a 404 means."""

    IMAGE = enum.auto()  # a 404 is ImageNotFound
    CONTAINER = enum.auto()  # a 404 is ContainerNotFound
    CREATE = enum.auto()  # a 404 "No such image" is ImageNotFound; any other 404 stays generic
    ENGINE = enum.auto()  # a 404 is just an error


@attrs.frozen(kw_only=True)
class CallRecord:
    """One finished engine call, as call observers see it."""

    method: str
    endpoint: str  # the path as a template: "/containers/{id}/start", "/images/{name}/json"
    outcome: str  # the HTTP status ("204") or the error class ("DockerUnavailable")
    took: float  # seconds on Trio's clock, until the answer's headers


CallObserver = Callable[[CallRecord], None]


def endpoint_template(path: str) -> str:
    """A request path without its ids and names: a bounded set of values, fit for a label."""
    parts = path.split("/")
    if len(parts) >= 3 and parts[2] == "libpod":  # "/v4.3.1/libpod/...": Podman's own API
        return "/libpod" + endpoint_template("/" + "/".join(parts[3:]))
    if len(parts) >= 3 and parts[1] == "containers" and parts[2] not in ("create", "json"):
        return "/".join(["", "containers", "{id}", *parts[3:]])
    if len(parts) >= 3 and parts[1] == "images" and parts[2] != "create":
        # Image names contain slashes: everything between /images/ and the last part is the name.
        return "/images/{name}/" + parts[-1] if len(parts) >= 4 else "/images/{name}"
    return path


def _error_for(status: int, message: str, subject: _Subject) -> DockerApiError:
    """An engine error status (and its `{"message"}`) as condo's error."""
    lowered = message.lower()
    if status == 404:
        if subject is _Subject.IMAGE or (subject is _Subject.CREATE and "no such image" in lowered):
            return ImageNotFound(status, message)
        if subject is _Subject.CONTAINER:
            return ContainerNotFound(status, message)
    if status in (409, 500) and "already in use" in lowered:  # Podman answers a clash with 500
        return NameConflict(status, message)
    if status == 400:
        return BadRequest(status, message)
    return DockerApiError(status, message)


def _pull_stream_error(message: str) -> DockerApiError:
    """An `error` line inside a pull's 200 stream as condo's error.

    The engine had already answered 200, so there is no status to go by: a missing image is
    reported as 404 (permanent), anything else (a blob lost mid-pull, a dropped registry
    connection) as 500, i.e. worth retrying.
    """
    if any(marker in message.lower() for marker in _IMAGE_MISSING):
        return ImageNotFound(404, message)
    return DockerApiError(500, message)


@contextmanager
def _translated(method: str, path: str) -> Iterator[None]:
    """The one place where httpx's exceptions (and unreadable answers) become condo's errors."""
    try:
        yield
    except httpx.TimeoutException as exc:
        log.debug("docker.call", method=method, path=path, error=type(exc).__name__)
        raise DockerTimeout(f"{method} {path}: the engine did not answer in time") from exc
    except httpx.HTTPError as exc:
        # Connection refused, no socket, a dropped connection, a truncated body: all mean the
        # engine is not (or no longer) there, as far as this call can tell.
        log.debug("docker.call", method=method, path=path, error=type(exc).__name__)
        raise DockerUnavailable(f"{method} {path}: {_describe(exc)}") from exc
    except MalformedAnswer as exc:
        # 502: the engine's answer was unusable; like a bad gateway, worth another try.
        raise DockerApiError(502, f"{method} {path}: unexpected answer: {exc}") from exc


def _describe(exc: httpx.HTTPError) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _message(response: httpx.Response) -> str:
    """The engine's `{"message": ...}`, or the start of whatever else it said."""
    try:
        body = response.json()
    except ValueError:  # not JSON (a proxy's HTML page, an empty body): show the text instead
        body = None
    if isinstance(body, Mapping) and isinstance(body.get("message"), str):
        return str(body["message"])
    return response.text.strip()[:500] or response.reason_phrase


def _decoded(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:  # JSONDecodeError or a bad encoding: one kind of unusable answer
        raise MalformedAnswer(
            f"status {response.status_code} with a body that is not JSON"
        ) from None


async def _json_lines(raw: AsyncIterator[str]) -> AsyncGenerator[Any, None]:
    """A JSON-lines (or one-object-per-chunk) body, one decoded object at a time."""
    async for line in raw:
        if not line.strip():
            continue
        try:
            decoded = json.loads(line)
        except ValueError:  # the engine's framing broke: nothing after it can be trusted
            raise MalformedAnswer("a streamed line that is not JSON") from None
        yield decoded


async def _finish(response: httpx.Response, raw: AsyncIterator[str]) -> None:
    """Leave no link of httpx's streaming chain suspended.

    httpx 0.28 streams a body through a chain of async generators; when iteration stops early
    (an error line in a pull, a consumer cancelled while delivering an event) the suspended links
    are garbage collected unfinished and Trio warns (ResourceWarning) for each one
    (encode/httpx#3686). Closing the response first makes the rest of the chain fail at once, so
    it runs to its end without waiting for the engine. A chain that already ended stops at once.
    """
    # Cleanup I/O that must run even when cancelled: shielded, and bounded.
    with trio.move_on_after(1, shield=True):
        await response.aclose()
        try:
            async for _ in raw:
                pass
        except (httpx.HTTPError, httpx.StreamError):  # how a closed stream ends: expected
            pass


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _negotiate(announced: str | None, floor: str | None = None) -> str:
    """The API version to speak: the engine's own, capped at MAX_API_VERSION; EngineUnsupported
    when that is below the engine's `floor` (its MinAPIVersion)."""
    version = MAX_API_VERSION
    try:
        if announced is not None and _version_key(announced) < _version_key(MAX_API_VERSION):
            version = announced
    except ValueError:  # an unreadable Api-Version header: speak ours and let the engine judge
        pass
    try:
        refused = floor is not None and _version_key(version) < _version_key(floor)
    except ValueError:  # an unreadable floor: the engine will say if it minds
        refused = False
    if refused:
        raise EngineUnsupported(
            f"the Docker engine accepts API {floor} and newer only; condo speaks API up to "
            f"{MAX_API_VERSION}: run the engine with DOCKER_MIN_API_VERSION={version} "
            "or upgrade condo"
        )
    return version


def _version_refused(status: int, message: str) -> bool:
    """The engine's answer to a request in an API version below its floor ("too old": it was
    restarted with a higher one) or above its own ("too new": it was replaced by an older one)."""
    lowered = message.lower()
    return status == 400 and ("too old" in lowered or "too new" in lowered)


# Podman's event filter names for Docker's actions (its events then say "die" and "remove").
_PODMAN_FILTERS = {"die": "died", "destroy": "remove"}


def _api_versions(data: Any) -> tuple[str | None, str | None]:
    """`GET /version` → (ApiVersion, MinAPIVersion), None where the engine does not say."""
    if not isinstance(data, Mapping):
        raise MalformedAnswer("/version is not an object")
    newest, floor = data.get("ApiVersion"), data.get("MinAPIVersion")
    return (
        newest if isinstance(newest, str) and newest else None,
        floor if isinstance(floor, str) and floor else None,
    )


def split_reference(image: str) -> tuple[str, str]:
    """An image reference as (repository, tag-or-digest) for `POST /images/create`.

    The tag defaults to "latest" (without one the engine would pull every tag of the repository).
    A digest reference (`repo@sha256:...`) passes the digest as the tag, as docker-py does.
    """
    repository, at, digest = image.partition("@")
    if at:
        return repository, digest
    slash, colon = image.rfind("/"), image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon + 1 :]
    return image, "latest"


def _demultiplex(data: bytes) -> str:
    """A logs body without a TTY is framed: [stream, 0, 0, 0, size (u32 BE)] + payload."""
    chunks = []
    position = 0
    while position < len(data):
        header = data[position : position + 8]
        if len(header) < 8 or header[0] not in (0, 1, 2) or header[1:4] != b"\0\0\0":
            # Not framed: a TTY container's raw stream.
            return data.decode("utf-8", "replace")
        size = int.from_bytes(header[4:8], "big")
        chunks.append(data[position + 8 : position + 8 + size])
        position += 8 + size
    return b"".join(chunks).decode("utf-8", "replace")


def _nanos_text(nanos: int) -> str:
    # The engine reads `since`/`until` as "seconds.nanoseconds".
    return f"{nanos // 1_000_000_000}.{nanos % 1_000_000_000:09d}"


def _label_filters(labels: Mapping[str, str]) -> list[str]:
    return [f"{key}={value}" for key, value in labels.items()]


def _quoted(name: str) -> str:
    return urllib.parse.quote(name, safe="")


class DockerClient:
    """One per condo process; every method may be called concurrently from any task.

    Build it with `open_docker`.
    """

    def __init__(self, http: httpx.AsyncClient, auth: RegistryAuth) -> None:
        self._http = http
        self._auth = auth
        self._version: str | None = None
        self._libpod_version: str | None = None
        self._announced: str | None = None  # the Api-Version the current version came from
        # The last refusal (EngineUnsupported) and when it was seen (Trio time), while it holds.
        self._refusal: tuple[EngineUnsupported, float] | None = None
        # The refusal last logged: cleared (and the end logged) only when a versioned call is
        # answered, so an engine whose /version promises what its calls refuse logs it once.
        self._told: str | None = None
        self._observers: list[CallObserver] = []

    @property
    def api_version(self) -> str:
        """The API version paths are prefixed with.

        MAX_API_VERSION until the first call negotiated (a concurrent first call may ping twice;
        both get the same answer).
        """
        return self._version or MAX_API_VERSION

    @property
    def is_podman(self) -> bool:
        """The engine is Podman (its Docker-compatible API), as its last `/_ping` said."""
        return self._libpod_version is not None

    def __repr__(self) -> str:
        return (
            f"DockerClient(base_url={str(self._http.base_url)!r}, api_version={self.api_version!r})"
        )

    def add_call_observer(self, observer: CallObserver) -> Callable[[], None]:
        """Call `observer` after every engine call; returns a function that removes it."""
        self._observers.append(observer)

        def remove() -> None:
            if observer in self._observers:
                self._observers.remove(observer)

        return remove

    # --- plumbing ---------------------------------------------------------------------------

    def _observed(self, method: str, path: str, outcome: str, started: float) -> None:
        if not self._observers:
            return
        record = CallRecord(
            method=method,
            endpoint=endpoint_template(path),
            outcome=outcome,
            took=trio.current_time() - started,
        )
        for observer in list(self._observers):
            observer(record)

    async def _url(self, path: str) -> str:
        if self._version is None:
            if self._refusal is not None:
                refusal, seen_at = self._refusal
                if trio.current_time() - seen_at < UNSUPPORTED_RECHECK:
                    raise refusal
            await self.ping()
        return f"/v{self.api_version}{path}"

    async def _call(
        self,
        method: str,
        path: str,
        *,
        subject: _Subject,
        ok: Collection[int] = (200,),
        params: Mapping[str, str | int] | None = None,
        body: Mapping[str, Any] | None = None,
        guard: httpx.Timeout = DEFAULT_TIMEOUT,
        versioned: bool = True,
        renegotiated: bool = False,
    ) -> httpx.Response:
        """One request with its body read; a status outside `ok` raises the mapped error."""
        url = await self._url(path) if versioned else path
        started = trio.current_time()
        try:
            with _translated(method, path):
                response = await self._http.request(
                    method,
                    url,
                    params=params,
                    json=dict(body) if body is not None else None,
                    timeout=guard,
                )
        except DockerError as exc:  # observed, then re-raised unchanged
            self._observed(method, path, type(exc).__name__, started)
            raise
        self._observed(method, path, str(response.status_code), started)
        took = round(trio.current_time() - started, 4)
        log.debug("docker.call", method=method, path=path, status=response.status_code, took=took)
        if response.status_code not in ok:
            message = _message(response)
            if versioned and _version_refused(response.status_code, message):
                # The engine changed under us (restarted with a higher floor, or replaced by an
                # older one): negotiate again, once. Refused again, the engine accepts none of
                # our versions whatever its /version says: the same permanent error.
                self._version = None
                if renegotiated:
                    raise self._refused_again(url, message)
                return await self._call(
                    method,
                    path,
                    subject=subject,
                    ok=ok,
                    params=params,
                    body=body,
                    guard=guard,
                    renegotiated=True,
                )
            raise _error_for(response.status_code, message, subject)
        if versioned and self._told is not None:
            log.info("docker.engine_supported", api_version=self._version)
            self._told = None
        return response

    def _refused_again(self, url: str, message: str) -> EngineUnsupported:
        """A call in the version just negotiated was refused all the same."""
        spoken = url.split("/")[1].removeprefix("v")
        refusal = EngineUnsupported(
            f"the Docker engine refuses the API version it announces ({spoken}): {message}; "
            f"condo speaks API up to {MAX_API_VERSION}"
        )
        return self._refused(refusal, announced=self._announced, floor=None)

    def _refused(
        self, exc: EngineUnsupported, *, announced: str | None, floor: str | None
    ) -> EngineUnsupported:
        """Record a refusal (reused until UNSUPPORTED_RECHECK has passed); logged once."""
        self._version = None
        if self._told != str(exc):
            log.error(
                "docker.engine_unsupported",
                api_version=announced,
                min_api_version=floor,
                error=str(exc),
            )
            self._told = str(exc)
        self._refusal = (exc, trio.current_time())
        return exc

    async def _call_json(
        self, method: str, path: str, parse: Callable[[Any], T], *, subject: _Subject, **kwargs: Any
    ) -> T:
        response = await self._call(method, path, subject=subject, **kwargs)
        with _translated(method, path):
            return parse(_decoded(response))

    @asynccontextmanager
    async def _stream(
        self,
        method: str,
        path: str,
        *,
        subject: _Subject,
        params: Mapping[str, str],
        guard: httpx.Timeout,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[AsyncIterator[Any]]:
        """A 200 answer streamed as decoded JSON lines. Errors while reading are mapped too: the
        body of the caller's `async with` runs inside `_translated`."""
        negotiated_now = self._version is None
        url = await self._url(path)
        started = trio.current_time()
        answered = False
        try:
            with _translated(method, path):
                async with self._http.stream(
                    method, url, params=params, headers=headers, timeout=guard
                ) as response:
                    answered = True
                    self._observed(method, path, str(response.status_code), started)
                    took = round(trio.current_time() - started, 4)
                    log.debug(
                        "docker.call",
                        method=method,
                        path=path,
                        status=response.status_code,
                        took=took,
                    )
                    if response.status_code != 200:
                        await response.aread()
                        message = _message(response)
                        if _version_refused(response.status_code, message):
                            if negotiated_now:  # as in `_call`: no version of ours will do
                                raise self._refused_again(url, message)
                            self._version = None  # the next attempt negotiates again
                        raise _error_for(response.status_code, message, subject)
                    raw = response.aiter_lines()
                    try:
                        async with aclosing(_json_lines(raw)) as lines:
                            yield lines
                    finally:
                        await _finish(response, raw)
        except DockerError as exc:
            # Observed only when the engine never answered: later errors belong to the body.
            if not answered:
                self._observed(method, path, type(exc).__name__, started)
            raise

    # --- engine -----------------------------------------------------------------------------

    async def ping(self) -> str:
        """The engine's API version (its Api-Version header). Also (re)negotiates ours.

        Raises EngineUnsupported when the engine accepts none of the versions condo speaks.
        """
        response = await self._call("GET", "/_ping", subject=_Subject.ENGINE, versioned=False)
        announced = response.headers.get("Api-Version")
        self._libpod_version = response.headers.get("Libpod-Api-Version")
        if self._version is not None and announced == self._announced:
            return announced or self._version  # nothing changed: no need to ask for the floor
        self._announced = announced
        try:
            newest, floor = await self._call_json(
                "GET", "/version", _api_versions, subject=_Subject.ENGINE, versioned=False
            )
        except DockerApiError:  # no readable floor: speak, and let a 400 "too old" tell
            newest, floor = None, None
        try:
            # Without the header (a proxy that drops it), /version's ApiVersion says the same;
            # speaking our newest to an older engine would only get "too new" back.
            version = _negotiate(announced or newest, floor)
        except EngineUnsupported as exc:
            raise self._refused(exc, announced=announced, floor=floor) from None
        self._refusal = None  # the end is logged by the first versioned call answered
        self._version = version
        return announced or version

    async def engine_version(self) -> str:
        """The engine's release, e.g. "20.10.24"."""

        def version(data: Any) -> str:
            if not isinstance(data, Mapping) or not isinstance(data.get("Version"), str):
                raise MalformedAnswer("no Version in /version")
            return str(data["Version"])

        return await self._call_json(
            "GET", "/version", version, subject=_Subject.ENGINE, versioned=False
        )

    # --- images -----------------------------------------------------------------------------

    async def image_present(self, image: str) -> bool:
        """Whether the engine has `image` locally (a reference without a tag means :latest)."""
        path = f"/images/{urllib.parse.quote(image, safe='/:@')}/json"
        response = await self._call("GET", path, subject=_Subject.IMAGE, ok=(200, 404))
        return response.status_code == 200

    async def image_digests(self, image: str) -> tuple[str, ...]:
        """The image's `RepoDigests` (`repo@sha256:...`, one per registry it came from or went
        to; none for an image built or loaded locally). ImageNotFound when the engine lacks it."""
        path = f"/images/{urllib.parse.quote(image, safe='/:@')}/json"
        return await self._call_json("GET", path, parse_repo_digests, subject=_Subject.IMAGE)

    async def pull(self, image: str) -> None:
        """Pull `image` (tag defaults to latest) with the credentials `RegistryAuth` resolves.

        Raises ImageNotFound for a missing repository or tag, DockerApiError for the rest
        (authentication failures are 500s: the engine cannot tell them from a registry fault).
        """
        repository, tag = split_reference(image)
        header = await self._auth.header_for(image)
        async with self._stream(
            "POST",
            "/images/create",
            subject=_Subject.IMAGE,
            params={"fromImage": repository, "tag": tag},
            headers={"X-Registry-Auth": header} if header is not None else None,
            guard=PULL_TIMEOUT,
        ) as lines:
            # Errors after the 200 come as a last line {"errorDetail": {...}, "error": "..."}.
            async for line in lines:
                if isinstance(line, Mapping) and line.get("error"):
                    raise _pull_stream_error(str(line["error"]))
        log.debug("docker.pulled", image=image)

    # --- containers -------------------------------------------------------------------------

    async def create(self, body: Mapping[str, Any], *, name: str) -> ContainerId:
        """Create a container from a create-container body. Never pulls: a missing image is
        ImageNotFound; a taken name NameConflict; a body the engine rejects BadRequest."""

        def created(data: Any) -> ContainerId:
            if not isinstance(data, Mapping) or not isinstance(data.get("Id"), str):
                raise MalformedAnswer("no Id in the create answer")
            if warnings := data.get("Warnings"):
                log.info("docker.create.warnings", name=name, warnings=warnings)
            return ContainerId(data["Id"])

        return await self._call_json(
            "POST",
            "/containers/create",
            created,
            subject=_Subject.CREATE,
            ok=(201,),
            params={"name": name},
            body=body,
        )

    async def start(self, cid: ContainerId) -> None:
        """Start a container; one that already runs (304) is fine."""
        await self._call(
            "POST", f"/containers/{_quoted(cid)}/start", subject=_Subject.CONTAINER, ok=(204, 304)
        )

    async def stop(self, cid: ContainerId, *, grace: float) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds (rounded up); a stopped one (304) is fine."""
        seconds = max(0, math.ceil(grace))
        await self._call(
            "POST",
            f"/containers/{_quoted(cid)}/stop",
            subject=_Subject.CONTAINER,
            ok=(204, 304),
            params={"t": seconds},
            guard=httpx.Timeout(30.0, connect=5.0, read=seconds + STOP_TIMEOUT_MARGIN),
        )

    async def remove(self, cid: ContainerId) -> None:
        """Remove a container, running or not, with its anonymous volumes."""
        await self._call(
            "DELETE",
            f"/containers/{_quoted(cid)}",
            subject=_Subject.CONTAINER,
            ok=(204,),
            params={"force": "true", "v": "true"},
        )

    async def inspect(self, cid_or_name: str) -> Container:
        """The container's current state; ContainerNotFound when it does not exist."""
        return await self._call_json(
            "GET",
            f"/containers/{_quoted(cid_or_name)}/json",
            parse_container,
            subject=_Subject.CONTAINER,
        )

    async def list_containers(self, *, labels: Mapping[str, str]) -> list[ContainerSummary]:
        """Every container (running or not) that carries all of `labels`."""
        filters = json.dumps({"label": _label_filters(labels)}) if labels else "{}"
        return await self._call_json(
            "GET",
            "/containers/json",
            parse_summaries,
            subject=_Subject.ENGINE,
            params={"all": "1", "filters": filters},
        )

    async def rename(self, cid: ContainerId, new_name: str) -> None:
        """Rename a container; NameConflict when `new_name` is taken.

        ContainerNotFound only when the container is gone: Docker 26 and newer answer 404 for a
        container that exists but is on no default bridge network (a 404 about the network).
        """
        try:
            await self._call(
                "POST",
                f"/containers/{_quoted(cid)}/rename",
                subject=_Subject.CONTAINER,
                ok=(204,),
                params={"name": new_name},
            )
        except ContainerNotFound as exc:
            await self.inspect(cid)  # raises ContainerNotFound when it really is gone
            raise DockerApiError(exc.status, exc.message) from None

    async def run_healthcheck(self, cid: ContainerId) -> str | None:
        """Podman only: run the container's healthcheck once, as the engine would, and return
        that probe's outcome (starting | healthy | unhealthy), or None when it has no
        healthcheck. Not the container's health: libpod answers "unhealthy" for any failed
        probe, whatever the check's Retries; `inspect` has the health that counts them."""
        if self._libpod_version is None:
            await self.ping()
        path = f"/containers/{_quoted(cid)}/healthcheck"
        # Libpod's own API, under its own version; 409: the container has no healthcheck (or
        # does not run), so there is nothing to report.
        response = await self._call(
            "GET",
            f"/v{self._libpod_version}/libpod{path}",
            subject=_Subject.CONTAINER,
            ok=(200, 409),
            versioned=False,
        )
        if response.status_code == 409:
            return None

        def status(data: Any) -> str:
            if not isinstance(data, Mapping) or not isinstance(data.get("Status"), str):
                raise MalformedAnswer("no Status in the healthcheck answer")
            return str(data["Status"])

        with _translated("GET", path):
            return status(_decoded(response))

    async def logs_tail(self, cid: ContainerId, lines: int = 20) -> str:
        """The last `lines` lines of stdout and stderr, interleaved as written (for errors)."""
        response = await self._call(
            "GET",
            f"/containers/{_quoted(cid)}/logs",
            subject=_Subject.CONTAINER,
            params={"stdout": "1", "stderr": "1", "tail": max(0, lines)},
        )
        return _demultiplex(response.content)

    # --- events -----------------------------------------------------------------------------

    @asynccontextmanager
    async def open_event_stream(
        self,
        *,
        labels: Mapping[str, str],
        actions: Collection[str],
        since_nanos: int | None = None,
        until_nanos: int | None = None,
    ) -> AsyncIterator[AsyncIterator[ContainerEvent]]:
        """One `GET /events` stream of container events, without a read timeout.

        `since_nanos` (inclusive) replays the engine's backlog first; with `until_nanos` the stream
        ends by itself at that time. `run_events` (condo.docker.events) adds reconnection and
        de-duplication on top; use that.
        """
        await self._url("/events")  # negotiates first: the filter names depend on the engine
        if self.is_podman:
            actions = [_PODMAN_FILTERS.get(action, action) for action in actions]
        filters: dict[str, list[str]] = {"type": ["container"], "event": list(actions)}
        if labels:
            filters["label"] = _label_filters(labels)
        params = {"filters": json.dumps(filters)}
        if since_nanos is not None:
            params["since"] = _nanos_text(since_nanos)
        if until_nanos is not None:
            params["until"] = _nanos_text(until_nanos)

        async def parsed(lines: AsyncIterator[Any]) -> AsyncGenerator[ContainerEvent, None]:
            async for line in lines:
                if (event := parse_event(line)) is not None:
                    yield event

        async with (
            self._stream(
                "GET", "/events", subject=_Subject.ENGINE, params=params, guard=EVENTS_TIMEOUT
            ) as lines,
            aclosing(parsed(lines)) as events,
        ):
            yield events


def _endpoint(url: str) -> tuple[httpx.AsyncHTTPTransport, str]:
    """`unix:///path`, `tcp://host:port` or `http://host[:port]` → (transport, base URL)."""
    usage = "expected unix:///absolute/path.sock, tcp://HOST:PORT or http://HOST:PORT"
    split = urllib.parse.urlsplit(url)
    if split.query or split.fragment:
        raise ConfigError(f"docker URL {url!r}: {usage}")
    if split.scheme == "unix":
        if split.netloc or not split.path.startswith("/"):
            raise ConfigError(f"docker URL {url!r}: {usage}")
        return httpx.AsyncHTTPTransport(uds=split.path), "http://docker"
    if split.scheme in ("tcp", "http"):
        if split.username is not None or split.password is not None:
            # Do not echo the URL: it carries credentials.
            raise ConfigError("docker URL: credentials in the URL are not supported")
        try:
            port = split.port
        except ValueError:
            raise ConfigError(f"docker URL {url!r}: bad port") from None
        if (
            not split.hostname
            or split.path not in ("", "/")
            or (split.scheme == "tcp" and port is None)
        ):
            raise ConfigError(f"docker URL {url!r}: {usage}")
        return httpx.AsyncHTTPTransport(), f"http://{split.netloc}"
    raise ConfigError(f"docker URL {url!r}: {usage} (TLS is not supported)")


@asynccontextmanager
async def open_docker(
    url: str = DEFAULT_URL, *, auth: RegistryAuth | None = None
) -> AsyncIterator[DockerClient]:
    """A `DockerClient` for the engine at `url`, closed on exit.

    Does not contact the engine: opening succeeds while it is down, and the first call says so
    (DockerUnavailable). Raises ConfigError for a malformed URL. `auth` None pulls anonymously.
    """
    transport, base_url = _endpoint(url)
    # trust_env=False: proxy variables meant for the outside world must not reroute engine calls.
    async with httpx.AsyncClient(
        transport=transport, base_url=base_url, timeout=DEFAULT_TIMEOUT, trust_env=False
    ) as http:
        yield DockerClient(http, auth if auth is not None else RegistryAuth.anonymous())
