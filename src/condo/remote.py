"""The client side of the HTTP API: `condo wait` (the CI helper), `condo state`, `condo hosts`,
`condo forget` and `condo plan`.

`condo plan` reads the spec files with condo.specdir's own scanner and asks `/v1/state` (one
GET, nothing else: it never changes anything); condo.plan decides and words the plan.

`condo wait` asks `/v1/wait_for` (one long-poll; the server decides, with Consul's blocking
queries or the local store, and answers within milliseconds of the last host turning Stable).
While it waits, it shows progress: the hosts still pending and their states, from
`/v1/global_state?name=` (that service alone; `/v1/state` when exposing is off) once a second —
display only, the exit code comes from `/v1/wait_for`. On a terminal the progress is one
rewritten line; otherwise a plain line whenever it changes.

A host whose liveness lapsed (cut off, its condo killed, its agent dead) is pending as
"unreachable since T" until it comes back or is forgotten (`condo forget HOST`, refused while
the host is live); a stale picture (Consul unreadable from the condo asked) is said as such.

Exit codes (doc/contract.md): 0 done, 1 timed out (the pending hosts are named), 2 usage or
connection errors; `condo plan` has terraform's (condo.plan: 0 no change, 2 changes, 1 invalid
specs or errors).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

import attrs
import httpx
import trio

from condo import plan as planning
from condo.errors import SpecError
from condo.spec import ServiceSpec
from condo.specdir import SpecScanner
from condo.tasks import run_beside
from condo.waiting import UNREACHABLE, HostRecord, HostsView, evaluate, read_hosts_document

DEFAULT_URL = "http://127.0.0.1:4280"
PROGRESS_INTERVAL = 1.0
EXIT_OK, EXIT_TIMEOUT, EXIT_ERROR = 0, 1, 2
EXIT_FAILED = 3  # `condo wait`: the image failed for good on some host


class ClientError(Exception):
    """condo could not be asked (connection refused, bad answer, 401, 400...)."""


def _client(url: str, api_token: str | None, read_timeout: float) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_token}"} if api_token else {}
    return httpx.AsyncClient(
        base_url=url.rstrip("/"),
        headers=headers,
        timeout=httpx.Timeout(10.0, read=read_timeout),
        trust_env=False,
    )


async def _get_json(client: httpx.AsyncClient, path: str, **params: Any) -> tuple[int, Any]:
    try:
        response = await client.get(path, params=params)
    except httpx.HTTPError as exc:
        raise ClientError(f"cannot reach condo at {client.base_url}: {exc}") from exc
    try:
        body = response.json()
    except ValueError as exc:
        raise ClientError(f"{path}: not a JSON answer (HTTP {response.status_code})") from exc
    return response.status_code, body


@attrs.frozen
class Fleet:
    """What a condo sees of every host: global state when exposing, else its own state."""

    hosts: HostsView
    records: Mapping[str, HostRecord] = attrs.Factory(dict)
    stale: bool = False
    global_: bool = False  # from /v1/global_state (Consul), not /v1/state


async def _fleet(client: httpx.AsyncClient, name: str | None = None) -> Fleet:
    """With `name`, only that service of each host (enough to evaluate a wait on it)."""
    params = {} if name is None else {"name": name}
    status, body = await _get_json(client, "/v1/global_state", **params)
    if status == 200:
        hosts, records = read_hosts_document(body["hosts"])
        return Fleet(hosts, records, stale=bool(body.get("stale")), global_=True)
    status, body = await _get_json(client, "/v1/state")
    if status != 200:
        raise ClientError(f"/v1/state: HTTP {status}: {body}")
    return Fleet({body["host"]: body["services"]})


async def _ask_fleet(command: str, url: str, api_token: str | None) -> Fleet | None:
    """The fleet, or None once the error is printed (as `command: ...`)."""
    try:
        async with _client(url, api_token, read_timeout=10) as client:
            return await _fleet(client)
    except ClientError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return None


def _describe_pending(pending: Mapping[str, Mapping[str, Any]]) -> str:
    return ", ".join(
        f"{host}=unreachable since {_clock(info.get('since'))}"
        if info.get("state") == UNREACHABLE
        else f"{host}={info.get('state')}"
        for host, info in sorted(pending.items())
    )


def _clock(at: object) -> str:
    """A wall time as `15:20:01 UTC (34s ago)`; `an unknown time` for none."""
    if not isinstance(at, int | float):
        return "an unknown time"
    moment = time.strftime("%H:%M:%S UTC", time.gmtime(at))
    return f"{moment} ({_age(time.time() - at)} ago)"


async def wait(
    name: str,
    image: str,
    *,
    wait_seconds: float,
    url: str = DEFAULT_URL,
    api_token: str | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Block until every host that runs `name` is Stable on `image`; the exit code."""
    started = time.monotonic()
    is_tty = out.isatty()
    last_line = ""
    writable = True

    def show(line: str) -> None:
        nonlocal last_line, writable
        if line == last_line or not writable:
            return
        last_line = line
        try:
            if is_tty:
                out.write(f"\r\x1b[2K{line}")
            else:
                out.write(line + "\n")
            out.flush()
        except (OSError, ValueError):
            # The reader went away (`condo wait ... | head -1`): progress is a courtesy, the
            # verdict (the exit code) is what the wait is for.
            writable = False

    async def progress(client: httpx.AsyncClient, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        while True:
            try:
                fleet = await _fleet(client, name)  # its service alone: not 5 MB a second
            except ClientError:
                pass  # progress is best effort; the long-poll reports real errors
            else:
                verdict = evaluate(name, image, fleet.hosts, fleet.records)
                elapsed = time.monotonic() - started
                if fleet.stale:
                    show(f"[{elapsed:5.1f}s] {name}: Consul cannot be read from {url} (stale)")
                elif verdict.hosts:
                    ready = len(verdict.hosts) - len(verdict.pending)
                    show(
                        f"[{elapsed:5.1f}s] {name} on {image}: {ready}/{len(verdict.hosts)} "
                        f"hosts Stable"
                        + (
                            f"; pending {_describe_pending(verdict.pending)}"
                            if verdict.pending
                            else ""
                        )
                    )
                else:
                    show(f"[{elapsed:5.1f}s] {name} on {image}: no host runs it yet")
            await trio.sleep(PROGRESS_INTERVAL)

    failure: ClientError | None = None
    status: int = 0
    body: Any = {}
    async with _client(url, api_token, read_timeout=wait_seconds + 30) as client:
        try:
            answer = await run_beside(
                lambda: _get_json(
                    client, "/v1/wait_for", name=name, image=image, timeout=wait_seconds
                ),
                functools.partial(progress, client),
            )
        except ClientError as exc:  # reported below, after the progress line is finished
            failure = exc
        else:
            assert answer is not None  # progress never returns by itself
            status, body = answer
    if failure is not None:
        _finish_line(out, is_tty)
        _say(f"condo wait: {failure}", file=sys.stderr)
        return EXIT_ERROR
    _finish_line(out, is_tty)
    elapsed = time.monotonic() - started
    if status == 200 and body.get("status") == "ok":
        hosts = body.get("hosts") or []
        _say(
            f"{name} is Stable on {image} on {len(hosts)} host(s) after {elapsed:.1f}s: "
            f"{', '.join(hosts)}",
            file=out,
        )
        return EXIT_OK
    if status == 500 and body.get("status") == "timeout":
        pending = body.get("pending") or {}
        why = _describe_pending(pending) or "no host runs " + name
        if body.get("stale"):
            why = f"{body.get('error')} (last read {_clock(body.get('read_at'))}); {why}"
        _say(f"condo wait: timed out after {wait_seconds:g}s; pending: {why}", file=sys.stderr)
        return EXIT_TIMEOUT
    if status == 500 and body.get("status") == "failed":
        failed = body.get("failed") or {}
        for host in sorted(failed):
            said = failed[host] if isinstance(failed[host], dict) else {}
            _say(f"condo wait: {image} failed on {host}: {said.get('reason')}", file=sys.stderr)
        return EXIT_FAILED
    _say(f"condo wait: HTTP {status}: {body.get('error', body)}", file=sys.stderr)
    return EXIT_ERROR


def _say(*text: str, file: TextIO) -> None:
    """`print`, for the verdict of `condo wait`: a reader that went away loses the line, and the
    exit code still says it (a BrokenPipeError would turn it into a traceback and 1)."""
    with contextlib.suppress(OSError, ValueError):
        print(*text, file=file)


def _finish_line(out: TextIO, is_tty: bool) -> None:
    if is_tty:
        with contextlib.suppress(OSError, ValueError):  # (a terminal gone: see `show`)
            out.write("\n")
            out.flush()


async def state(
    *, url: str = DEFAULT_URL, api_token: str | None = None, out: TextIO = sys.stdout
) -> int:
    """Print a table of every host's services (global when exposing, else local)."""
    fleet = await _ask_fleet("condo state", url, api_token)
    if fleet is None:
        return EXIT_ERROR
    print(render_table(fleet.hosts, now=time.time(), records=fleet.records), file=out)
    if fleet.stale:
        print("(stale: Consul cannot be read from this condo; this is its last picture)", file=out)
    return EXIT_OK


async def hosts(
    *, url: str = DEFAULT_URL, api_token: str | None = None, out: TextIO = sys.stdout
) -> int:
    """`condo hosts`: every host in Consul, whether it is live, when it was last seen."""
    fleet = await _ask_fleet("condo hosts", url, api_token)
    if fleet is None:
        return EXIT_ERROR
    if not fleet.global_:
        print("condo hosts: needs a condo run with --expose consul", file=sys.stderr)
        return EXIT_ERROR
    rows = [("HOST", "LIVE", "LAST SEEN", "RUNS")]
    for host in sorted(fleet.hosts.keys() | fleet.records.keys()):
        record = fleet.records.get(host)
        live = record is None or record.live
        runs = sorted(record.services) if record is not None else sorted(fleet.hosts.get(host, {}))
        seen = "now" if live else _clock(record.last_seen if record else None)
        rows.append((host, "yes" if live else "no", seen, ", ".join(runs) or "-"))
    print(_columns(rows), file=out)
    if fleet.stale:
        print("(stale: Consul cannot be read from this condo; this is its last picture)", file=out)
    return EXIT_OK


async def forget(
    host: str, *, url: str = DEFAULT_URL, api_token: str | None = None, out: TextIO = sys.stdout
) -> int:
    """`condo forget HOST`: remove a decommissioned host's record (refused while it is live)."""
    try:
        async with _client(url, api_token, read_timeout=10) as client:
            try:
                response = await client.delete(f"/v1/hosts/{quote(host, safe='')}")
            except httpx.HTTPError as exc:
                raise ClientError(f"cannot reach condo at {client.base_url}: {exc}") from exc
    except ClientError as exc:
        print(f"condo forget: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code == 200:
        print(f"forgot {host}: wait no longer counts it", file=out)
        return EXIT_OK
    print(f"condo forget: HTTP {response.status_code}: {body.get('error', body)}", file=sys.stderr)
    return EXIT_ERROR


def render_table(
    hosts: HostsView, *, now: float, records: Mapping[str, HostRecord] | None = None
) -> str:
    """A plain-text table: one row per (service, host); a host that cannot be seen shows what it
    last said it runs, as `unreachable`."""
    header = ("SERVICE", "HOST", "STATE", "IMAGE", "CONTAINER", "AGE", "PROBLEM")
    rows = [header]
    for host, record in sorted((records or {}).items()):
        if record.live:
            continue
        for name, said in sorted(record.services.items()):
            since = f"since {_clock(record.last_seen)}"
            rows.append((name, host, UNREACHABLE, str(said.get("image") or "-"), "-", "-", since))
    for host, services in sorted(hosts.items()):
        for name, svc in sorted(services.items()):
            current = svc.get("current") or {}
            created = current.get("created_at")
            problem = (svc.get("spec_error") or {}).get("message") or (svc.get("error") or {}).get(
                "message"
            )
            rows.append(
                (
                    name,
                    host,
                    str(svc.get("state")),
                    str(current.get("image") or svc.get("image") or "-"),
                    str(current.get("name") or "-"),
                    _age(now - created) if created else "-",
                    (problem or "")[:60],
                )
            )
    return _columns(rows)


def _columns(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _age(seconds: float) -> str:
    seconds = max(seconds, 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


async def plan(
    prefixes: Sequence[Path],
    *,
    url: str = DEFAULT_URL,
    api_token: str | None = None,
    show_unchanged: bool = False,
    out: TextIO = sys.stdout,
) -> int:
    """`condo plan PREFIX...`: what these spec files would change in what the condo at `url`
    runs; terraform's exit code (condo.plan)."""
    snapshot = await trio.to_thread.run_sync(SpecScanner(prefixes).scan)
    try:
        async with _client(url, api_token, read_timeout=10) as client:
            status, body = await _get_json(client, "/v1/state")
        if status != 200:
            raise ClientError(f"/v1/state: HTTP {status}: {body}")
        if not (isinstance(body, dict) and isinstance(body.get("services"), dict)):
            raise ClientError("/v1/state: not a state document")
        local: dict[str, ServiceSpec | SpecError] = {}
        for name, entry in snapshot.entries.items():
            if entry.spec is not None:
                local[name] = entry.spec
            elif entry.error is not None:
                local[name] = entry.error
        result = planning.make_plan(
            local,
            body["services"],
            problems=[
                *snapshot.problems,
                # self.edn is checked, not compared: the API does not say which one runs.
                *([snapshot.self_spec] if isinstance(snapshot.self_spec, SpecError) else []),
            ],
            complete=snapshot.complete,
        )
    except planning.ViewTooOld:
        print(
            f"condo plan: the condo at {url} does not show spec hashes (an older version)",
            file=sys.stderr,
        )
        return planning.EXIT_INVALID
    except ClientError as exc:
        print(f"condo plan: {exc}", file=sys.stderr)
        return planning.EXIT_INVALID
    print(f"condo plan: {body.get('host')} at {url}", file=out)
    for line in planning.render(result, show_unchanged=show_unchanged):
        print(line, file=out)
    return result.exit_code
