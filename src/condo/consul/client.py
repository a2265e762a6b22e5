"""The one place in condo that speaks HTTP to Consul.

Owns: `open_consul_client` (endpoint URL and token → one httpx.AsyncClient), `ConsulClient` (one
method per Consul call condo needs: sessions, acquire/delete of a key, blocking reads of a
prefix, a few keys read in one transaction), and the mapping of every httpx error and Consul
status into `condo.errors.ConsulError` (`_translated` and `_error_for`, nowhere else).

Invariants:
- Every call leaves a value or a `ConsulError`; no httpx exception or JSON shape escapes. What
  Consul says about a session or a lock (`false`, 404 on renew, 500 `invalid session`) is an
  answer, not an error: `Acquire` and `renew_session`'s bool carry it.
- The ACL token travels only in the `X-Consul-Token` header: never in a URL, a log line, a repr or
  an error message.
- The environment's proxy settings (HTTP_PROXY, ...) are ignored: condo talks to the agent directly.
- Callers own deadlines (cancel scopes); the httpx timeouts here only guard against a Consul that
  accepted a request and went silent (a stopped agent), and surface as transient errors.
- `unreachable_since` (Trio time) is set by the first call that gets no answer and cleared by the
  next one that does; `failed_at` is the time of the latest call that got none, never cleared,
  and failure observers hear of each: readers use them to tell a stale picture. A 5xx (or 429)
  is no answer either (the agent answered, Consul did not: "No cluster leader", an RPC error),
  except a 500 `invalid session`, which is the servers' own answer.
"""

from __future__ import annotations

import base64
import binascii
import enum
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, NewType

import attrs
import httpx
import structlog
import trio

from condo.errors import ConfigError, ConsulError

log = structlog.get_logger(__name__)

SessionId = NewType("SessionId", str)

# A local agent answers in milliseconds; five silent seconds mean it is stopped or wedged.
DEFAULT_TIMEOUT = httpx.Timeout(5.0)
# How long one blocking query may wait for a change (Consul's maximum is 10 min). Short enough that
# a connection silently lost is noticed within a minute; long enough to cost nothing.
BLOCKING_WAIT = 30.0
# Consul adds up to wait/16 of jitter before it answers an unchanged blocking query.
BLOCKING_TIMEOUT = httpx.Timeout(5.0, read=BLOCKING_WAIT * (1 + 1 / 16) + 5.0)
# Connections to the agent at once: a large prefix is followed by up to 100 blocking requests
# held open (condo.consul.source's MAX_WATCHES folders' and the prefix's), and the publisher's
# calls (a renewal is the session's life) must never wait behind them for a connection (httpx's
# default is 100 in all, 20 kept idle). Consul's agent takes 200 at once from one address.
MAX_CONNECTIONS = 128
# Consul's limit of operations in one transaction (`PUT /v1/txn`).
MAX_TXN_OPS = 64


class Acquire(enum.Enum):
    """What Consul said to `PUT /v1/kv/<key>?acquire=<session>`."""

    DONE = "done"  # written, and held by the session
    REFUSED = "refused"  # `false`: another session holds the key (or a lock delay runs)
    NO_SESSION = "no-session"  # 500 `invalid session`: the session is gone


@attrs.frozen(kw_only=True)
class Session:
    id: SessionId
    name: str


@attrs.frozen(kw_only=True)
class Entry:
    """One key of a prefix read: its raw value and the session holding it, if any."""

    key: str
    value: bytes | None
    session: SessionId | None
    modify_index: int


@attrs.frozen(kw_only=True)
class Listing:
    """A prefix read: its entries and the `X-Consul-Index` to block on next."""

    index: int
    entries: tuple[Entry, ...]
    size: int = 0  # the bytes of Consul's answer (its body as condo parsed it: after gzip)


@attrs.frozen(kw_only=True)
class Folders:
    """A `?keys&separator=/` read: the names one level under a prefix (`<prefix>x/` for a
    folder, the key itself otherwise) and the `X-Consul-Index` of everything under it."""

    index: int
    names: tuple[str, ...]
    size: int = 0  # the bytes of Consul's answer


def parse_endpoint(endpoint: str) -> str:
    """`--consul-endpoint` → the base URL httpx talks to.

    `http(s)://HOST:PORT` as is; the original condo's `tcp://HOST:PORT` means plain HTTP.
    """
    url = httpx.URL(endpoint.strip())
    if url.scheme == "tcp":
        url = url.copy_with(scheme="http")
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(
            f"--consul-endpoint {endpoint!r}: expected http://HOST:PORT or https://HOST:PORT"
        )
    return str(url.copy_with(path="/", query=None, fragment=None)).rstrip("/")


def _error_for(method: str, what: str, response: httpx.Response) -> ConsulError:
    """An error status as condo's error: 5xx (and 429) are worth retrying soon, 4xx are not."""
    status = response.status_code
    text = response.text.strip()[:300] or response.reason_phrase
    transient = status >= 500 or status == 429
    if status == 403:
        text = f"permission denied (check --consul-token and its ACL policy): {text}"
    return ConsulError(f"{method} {what}: {status} {text}", status=status, transient=transient)


def _describe(exc: httpx.HTTPError) -> str:
    # Only the exception's type and text: httpx's texts never hold request headers (the token).
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _quoted(key: str) -> str:
    # Keys are free text per segment (service file names may hold spaces, '%', '?', '#').
    return urllib.parse.quote(key, safe="/")


class ConsulClient:
    """One per condo process; every method may be called concurrently from any task.

    Build it with `open_consul_client` (or give it any httpx.AsyncClient whose base_url is the
    agent, e.g. one with event hooks in tests).
    """

    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http
        self.unreachable_since: float | None = None
        self.failed_at: float | None = None  # Trio time of the latest call that got no answer
        self._failure_observers: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        return f"ConsulClient(base_url={str(self._http.base_url)!r})"

    # --- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def _translated(self, method: str, what: str) -> Iterator[None]:
        """The one place where httpx's exceptions become condo's errors."""
        try:
            yield
        except httpx.TimeoutException as exc:
            self._unanswered()
            log.debug("consul.call", method=method, path=what, error=type(exc).__name__)
            raise ConsulError(f"{method} {what}: Consul did not answer in time") from exc
        except httpx.HTTPError as exc:
            # Refused, reset, a truncated body: Consul is not (or no longer) there for this call.
            self._unanswered()
            log.debug("consul.call", method=method, path=what, error=type(exc).__name__)
            raise ConsulError(f"{method} {what}: {_describe(exc)}") from exc

    def add_failure_observer(self, observer: Callable[[], None]) -> None:
        """Call `observer` (synchronously; it must not block) after every call that got no
        answer from Consul."""
        self._failure_observers.append(observer)

    def _unanswered(self) -> None:
        self.failed_at = trio.current_time()
        if self.unreachable_since is None:
            self.unreachable_since = self.failed_at
        for observer in self._failure_observers:
            observer()

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        content: bytes | None = None,
        json: Any = None,
        guard: httpx.Timeout = DEFAULT_TIMEOUT,
    ) -> httpx.Response:
        # `guard` is httpx's silence guard, not a deadline (callers own those).
        with self._translated(method, path):
            response = await self._http.request(
                method, path, params=params, content=content, json=json, timeout=guard
            )
        status = response.status_code
        if (status >= 500 or status == 429) and "invalid session" not in response.text:
            self._unanswered()  # the agent is there, but not Consul's servers (or their leader)
        else:
            self.unreachable_since = None
        log.debug("consul.call", method=method, path=path, status=response.status_code)
        return response

    def _json(self, method: str, path: str, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:  # not JSON, or a bad encoding: a proxy's page, a truncated answer
            raise ConsulError(
                f"{method} {path}: {response.status_code} with a body that is not JSON",
                status=response.status_code,
            ) from None

    # --- sessions ---------------------------------------------------------------------------

    async def create_session(self, name: str, ttl: float) -> SessionId:
        """A session that deletes its keys when it ends, with no lock delay (Consul's
        default 15 s lock delay would keep a restarted condo from re-taking its keys)."""
        path = "/v1/session/create"
        body = {"Name": name, "TTL": f"{ttl:g}s", "Behavior": "delete", "LockDelay": "0s"}
        response = await self._call("PUT", path, json=body)
        if response.status_code != 200:
            raise _error_for("PUT", path, response)
        data = self._json("PUT", path, response)
        if not isinstance(data, dict) or not isinstance(data.get("ID"), str):
            raise ConsulError(f"PUT {path}: an answer without a session ID", status=200)
        return SessionId(data["ID"])

    async def renew_session(self, session: SessionId) -> bool:
        """Renew; False when Consul no longer knows the session (it expired or was destroyed)."""
        path = f"/v1/session/renew/{_quoted(session)}"
        response = await self._call("PUT", path)
        if response.status_code == 404:
            return False
        if response.status_code != 200:
            raise _error_for("PUT", path, response)
        return True

    async def destroy_session(self, session: SessionId) -> None:
        """End the session; with `Behavior: delete` its keys vanish at once."""
        path = f"/v1/session/destroy/{_quoted(session)}"
        response = await self._call("PUT", path)
        if response.status_code != 200:
            raise _error_for("PUT", path, response)

    async def list_sessions(self) -> list[Session]:
        path = "/v1/session/list"
        response = await self._call("GET", path)
        if response.status_code != 200:
            raise _error_for("GET", path, response)
        data = self._json("GET", path, response)
        if not isinstance(data, list):
            raise ConsulError(f"GET {path}: an answer that is not a list", status=200)
        return [
            Session(id=SessionId(item["ID"]), name=str(item.get("Name", "")))
            for item in data
            if isinstance(item, dict) and isinstance(item.get("ID"), str)
        ]

    # --- keys -------------------------------------------------------------------------------

    async def acquire(self, key: str, value: bytes, session: SessionId) -> Acquire:
        """Write `value` at `key` and hold the key with `session`."""
        path = f"/v1/kv/{_quoted(key)}"
        response = await self._call("PUT", path, params={"acquire": session}, content=value)
        if response.status_code == 500 and "invalid session" in response.text:
            return Acquire.NO_SESSION
        if response.status_code != 200:
            raise _error_for("PUT", path, response)
        answer = response.text.strip()
        if answer == "true":
            return Acquire.DONE
        if answer == "false":
            return Acquire.REFUSED
        raise ConsulError(f"PUT {path}: unexpected answer {answer[:100]!r}", status=200)

    async def put(self, key: str, value: bytes) -> None:
        """Write `value` at `key`, held by no session (it outlives every session)."""
        path = f"/v1/kv/{_quoted(key)}"
        response = await self._call("PUT", path, content=value)
        if response.status_code != 200:
            raise _error_for("PUT", path, response)
        if response.text.strip() != "true":
            raise ConsulError(f"PUT {path}: unexpected answer {response.text[:100]!r}", status=200)

    async def read_key(self, key: str) -> Entry | None:
        """One key (None when it does not exist), read at once."""
        listing = await self.read_prefix(key)
        return next((entry for entry in listing.entries if entry.key == key), None)

    async def watch_key(self, key: str, *, index: int = 0) -> tuple[Entry | None, int]:
        """One key alone (None: it does not exist) and the index to block on next; with `index`
        > 0 a blocking query. Consul's index of one key that exists is the key's own, so only a
        change of that key answers it (or BLOCKING_WAIT): the other keys' writes never do. (A
        missing key's index is the whole store's: any write answers.)"""
        new_index, data, _ = await self._list(key, {}, index)
        return next((entry for entry in _entries(data) if entry.key == key), None), new_index

    async def read_keys(self, keys: Sequence[str]) -> dict[str, Entry]:
        """The keys of `keys` that exist (key -> its entry), read at once: one transaction of
        `get`s (`PUT /v1/txn`) per MAX_TXN_OPS keys, whatever else is under their prefix.

        A `get` of a missing key fails its transaction (409, naming every missing one): it is
        sent again without them, so a missing key costs one more request, never a wrong answer."""
        found: dict[str, Entry] = {}
        for start in range(0, len(keys), MAX_TXN_OPS):
            batch = list(keys[start : start + MAX_TXN_OPS])
            while batch:
                missing = await self._read_batch(batch, found)
                if not missing:
                    break
                batch = [key for key in batch if key not in missing]
        return found

    async def _read_batch(self, keys: list[str], found: dict[str, Entry]) -> set[str]:
        """One transaction of `get`s: the entries into `found`, or the keys that are missing."""
        path = "/v1/txn"
        ops = [{"KV": {"Verb": "get", "Key": key}} for key in keys]
        response = await self._call("PUT", path, json=ops)
        if response.status_code not in (200, 409):
            raise _error_for("PUT", path, response)
        data = self._json("PUT", path, response)
        if not isinstance(data, dict):
            raise ConsulError(f"PUT {path}: an answer that is not an object", status=200)
        if response.status_code == 409:
            missing: set[str] = set()
            for error in data.get("Errors") or ():
                where = error.get("OpIndex") if isinstance(error, dict) else None
                what = str(error.get("What", "")) if isinstance(error, dict) else ""
                if not isinstance(where, int) or not 0 <= where < len(keys):
                    raise _error_for("PUT", path, response)
                if "doesn't exist" not in what:
                    raise _error_for("PUT", path, response)
                missing.add(keys[where])
            if not missing:
                raise _error_for("PUT", path, response)
            return missing
        # A 200 means every `get` succeeded: one result per key asked, those keys alone. Any
        # other answer (a proxy's, a broken agent's) says nothing of these keys: an error, not
        # "the missing ones are gone" (which would rewrite them all) nor a stranger to report.
        results = data.get("Results")
        kvs = [
            r["KV"]
            for r in (results if isinstance(results, list) else ())
            if isinstance(r, dict) and isinstance(r.get("KV"), dict)
        ]
        entries = {entry.key: entry for entry in _entries(kvs)}
        if len(kvs) != len(keys) or entries.keys() != set(keys):
            raise ConsulError(
                f"PUT {path}: an answer that is not the {len(keys)} keys asked",
                status=200,
                transient=False,
            )
        found.update(entries)
        return set()

    async def delete(self, key: str) -> None:
        """Delete one key (a key that is already gone is fine)."""
        path = f"/v1/kv/{_quoted(key)}"
        response = await self._call("DELETE", path)
        if response.status_code != 200:
            raise _error_for("DELETE", path, response)

    async def read_prefix(self, prefix: str, *, index: int = 0) -> Listing:
        """Every key under `prefix`; with `index` > 0 a blocking query (returns on a change or
        after BLOCKING_WAIT). An empty prefix is an empty listing (Consul answers 404)."""
        new_index, data, size = await self._list(prefix, {"recurse": "true"}, index)
        return Listing(index=new_index, entries=tuple(_entries(data)), size=size)

    async def list_folders(self, prefix: str, *, index: int = 0) -> Folders:
        """The names one level under `prefix` (`?keys&separator=/`: a few bytes each, no values);
        with `index` > 0 a blocking query. Consul's index here covers every key under `prefix`
        (a deleted one too), whatever the separator hides: a `prefix` without its trailing `/`
        thus tells in a few bytes whether anything in that folder changed."""
        new_index, data, size = await self._list(prefix, {"keys": "true", "separator": "/"}, index)
        names = tuple(name for name in data if isinstance(name, str))
        return Folders(index=new_index, names=names, size=size)

    async def _list(
        self, prefix: str, params: dict[str, str], index: int
    ) -> tuple[int, list[Any], int]:
        path = f"/v1/kv/{_quoted(prefix)}"
        if index > 0:
            params |= {"index": str(index), "wait": f"{BLOCKING_WAIT:g}s"}
        response = await self._call("GET", path, params=params, guard=BLOCKING_TIMEOUT)
        try:
            new_index = int(response.headers.get("X-Consul-Index", "0"))
        except ValueError:
            raise ConsulError(f"GET {path}: an X-Consul-Index that is not a number") from None
        if response.status_code == 404:
            return new_index, [], len(response.content)
        if response.status_code != 200:
            raise _error_for("GET", path, response)
        data = self._json("GET", path, response)
        if not isinstance(data, list):
            raise ConsulError(f"GET {path}: an answer that is not a list", status=200)
        return new_index, data, len(response.content)


def _entries(data: list[Any]) -> Iterator[Entry]:
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("Key"), str):
            continue  # not a KV entry at all; decode_value will never see it
        encoded = item.get("Value")
        try:
            value = base64.b64decode(encoded, validate=True) if isinstance(encoded, str) else None
        except (binascii.Error, ValueError):  # Consul always sends base64; be safe regardless
            value = None
        session = item.get("Session")
        modify_index = item.get("ModifyIndex")
        yield Entry(
            key=item["Key"],
            value=value,
            session=SessionId(session) if isinstance(session, str) and session else None,
            modify_index=modify_index if isinstance(modify_index, int) else 0,
        )


@asynccontextmanager
async def open_consul_client(
    endpoint: str, *, token: str | None = None
) -> AsyncIterator[ConsulClient]:
    """A ConsulClient on `endpoint` (see `parse_endpoint`); `token` goes in `X-Consul-Token`.

    Opening never touches Consul: condo starts (and keeps supervising) while Consul is away.
    """
    headers = {"X-Consul-Token": token} if token else {}
    # trust_env=False: the endpoint is the agent itself (usually on loopback); an HTTP_PROXY meant
    # for the host's outbound traffic must not reroute it (nor see the token), and no .netrc
    # credentials are added. As the Docker client does.
    async with httpx.AsyncClient(
        base_url=parse_endpoint(endpoint),
        headers=headers,
        timeout=DEFAULT_TIMEOUT,
        limits=httpx.Limits(
            max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS
        ),
        trust_env=False,
    ) as http:
        yield ConsulClient(http)
