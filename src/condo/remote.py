"""The client side of the HTTP API: `condo wait` (the CI helper) and `condo state`.

`condo wait` asks `/v1/wait_for` (one long-poll; the server decides, with Consul's blocking
queries or the local store, and answers within milliseconds of the last host turning Stable).
While it waits, it shows progress: the hosts still pending and their states, from
`/v1/global_state` (or `/v1/state` when exposing is off) once a second — display only, the exit
code comes from `/v1/wait_for`. On a terminal the progress is one rewritten line; otherwise a
plain line whenever it changes.

Exit codes (doc/contract.md): 0 done, 1 timed out (the pending hosts are named), 2 usage or
connection errors.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import httpx
import trio

from condo.tasks import run_beside
from condo.waiting import evaluate

DEFAULT_URL = "http://127.0.0.1:4280"
PROGRESS_INTERVAL = 1.0
EXIT_OK, EXIT_TIMEOUT, EXIT_ERROR = 0, 1, 2


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


async def _hosts(client: httpx.AsyncClient) -> Mapping[str, Mapping[str, Any]]:
    """Every host's services: global state when exposing, else the local state."""
    status, body = await _get_json(client, "/v1/global_state")
    if status == 200:
        return {host: entry.get("services", {}) for host, entry in body["hosts"].items()}
    status, body = await _get_json(client, "/v1/state")
    if status != 200:
        raise ClientError(f"/v1/state: HTTP {status}: {body}")
    return {body["host"]: body["services"]}


def _describe_pending(pending: Mapping[str, Mapping[str, Any]]) -> str:
    return ", ".join(f"{host}={info.get('state')}" for host, info in sorted(pending.items()))


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

    def show(line: str) -> None:
        nonlocal last_line
        if line == last_line:
            return
        last_line = line
        if is_tty:
            out.write(f"\r\x1b[2K{line}")
        else:
            out.write(line + "\n")
        out.flush()

    async def progress(client: httpx.AsyncClient, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        while True:
            try:
                verdict = evaluate(name, image, await _hosts(client))
            except ClientError:
                pass  # progress is best effort; the long-poll reports real errors
            else:
                elapsed = time.monotonic() - started
                if verdict.hosts:
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
        print(f"condo wait: {failure}", file=sys.stderr)
        return EXIT_ERROR
    _finish_line(out, is_tty)
    elapsed = time.monotonic() - started
    if status == 200 and body.get("status") == "ok":
        hosts = body.get("hosts") or []
        print(
            f"{name} is Stable on {image} on {len(hosts)} host(s) after {elapsed:.1f}s: "
            f"{', '.join(hosts)}",
            file=out,
        )
        return EXIT_OK
    if status == 500 and body.get("status") == "timeout":
        pending = body.get("pending") or {}
        print(
            f"condo wait: timed out after {wait_seconds:g}s; pending: "
            f"{_describe_pending(pending) or 'no host runs ' + name}",
            file=sys.stderr,
        )
        return EXIT_TIMEOUT
    print(f"condo wait: HTTP {status}: {body.get('error', body)}", file=sys.stderr)
    return EXIT_ERROR


def _finish_line(out: TextIO, is_tty: bool) -> None:
    if is_tty:
        out.write("\n")
        out.flush()


async def state(
    *, url: str = DEFAULT_URL, api_token: str | None = None, out: TextIO = sys.stdout
) -> int:
    """Print a table of every host's services (global when exposing, else local)."""
    try:
        async with _client(url, api_token, read_timeout=10) as client:
            hosts = await _hosts(client)
    except ClientError as exc:
        print(f"condo state: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(render_table(hosts, now=time.time()), file=out)
    return EXIT_OK


def render_table(hosts: Mapping[str, Mapping[str, Any]], *, now: float) -> str:
    """A plain-text table: one row per (service, host)."""
    header = ("SERVICE", "HOST", "STATE", "IMAGE", "CONTAINER", "AGE", "PROBLEM")
    rows = [header]
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
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
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
