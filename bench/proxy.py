"""`:proxy` (issue 14): condo's data planes in front of a fast backend, against the same
container reached directly, and the proxy's promises under load.

The backend is nginx from Debian (`condo-bench/nginx:1`, built here on first use from the
`nginx` package's binary, `apt-get download`, and the host's libraries; never pulled): `/`
answers 3 bytes, `/big` is a 32 MiB file. Every figure is wrk's (`wrk` from Debian):
- HTTP, small responses: requests/s and p99 through the proxy's listener (a `:tcp` listener:
  condo's kernel NAT, condo's nftables table, where condo can use it) and straight to the port
  the container publishes on 127.0.0.1, alternating, ROUNDS rounds each (the medians); bars:
  proxy ≥ 0.8x direct, p99 added ≤ 1 ms.
- HAProxy, condo's other data plane (`:http` listeners, `--proxy-plane haproxy`), for the same
  HTTP and bulk figures: condo's own HAProxy config (condo.proxy.haproxy) on a free port, in
  front of the same published port.
- Bulk TCP: one connection downloading `/big` over and over (wrk's transfer/s), ROUNDS rounds
  each (the medians); bar ≥ 0.8x.
- DEPLOYS consecutive `[:After 1]` deploys under wrk load, each request on a new connection
  (`Connection: close`: an open connection stays with its container until the drain ends, so a
  keep-alive client is what the drain test below is about); bar: 0 failed requests.
- `kill -9` of condo and a new condo on the same state file, under the same load: 0 failed.
- OPEN raw TCP connections (keep-alive, idle) across a deploy: each still answers (from the old
  container) during the drain, and each is closed cleanly (EOF, no reset) when it ends.

Failed requests are wrk's socket errors (connect, read, write, timeout) plus non-2xx answers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import attrs
import trio

from bench.common.condos import Condo, CondoSpec, Transition, open_condo, stable
from bench.common.engine import RUN_LABEL
from bench.common.report import Bar, Report
from bench.common.run import Run
from bench.common.specs import write_spec
from bench.common.wait import BenchError, deadline
from condo.proxy.haproxy import Frontend, HAProxy, ServerLine, bind_address, frontend_name
from condo.proxy.nat import table_name

IMAGE = "condo-bench/nginx:1"
ROUNDS, QUICK_ROUNDS = 3, 1
SECONDS, QUICK_SECONDS = 5.0, 1.0
CONNECTIONS = 16
DEPLOYS, QUICK_DEPLOYS = 20, 2
OPEN, QUICK_OPEN = 200, 20
DRAIN = 3  # seconds of [:After n] in the open-connections case
RATIO_BAR, P99_BAR_MS = 0.8, 1.0
LIMIT = 120.0

NGINX_CONF = """\
user root;
worker_processes 1;
error_log /dev/stderr warn;
pid /tmp/nginx.pid;
events { worker_connections 4096; }
http {
    access_log off;
    sendfile on;
    keepalive_timeout 600s;
    keepalive_requests 1000000;
    client_header_timeout 600s;
    server {
        listen 80 reuseport backlog=4096;
        root /www;
        location = / { return 200 "ok\\n"; }
    }
}
"""
# nginx stops gracefully on SIGQUIT (open requests finish, idle connections close cleanly).
START = "head -c 33554432 /dev/zero > /www/big && exec nginx -g 'daemon off;'"


async def main(run: Run) -> Report:
    quick = run.quick
    rounds, seconds = (QUICK_ROUNDS, QUICK_SECONDS) if quick else (ROUNDS, SECONDS)
    await ensure_image(run)
    listen = free_port()
    host = run.host("proxy")
    spec = CondoSpec(name="proxy", host=host)
    state = run.folder("proxy") / "state.json"
    try:
        async with open_condo(run, spec) as condo:
            await condo.wait_ready()
            write_spec(condo.specs, "web", spec_text(run, listen, "0", drain=1))
            with deadline(LIMIT, "web Stable"):
                [first] = await condo.wait_services(["web"], stable)
            proxied = f"http://127.0.0.1:{listen}"
            direct_port = await published(first.container or "")
            direct = f"http://127.0.0.1:{direct_port}"
            await wait_answering(listen)

            plane = await listener_plane(condo)
            # Direct, through the listener, through HAProxy: one after the other in each round
            # (the load of a shared machine moves: each ratio compares neighbours).
            small_direct, small_proxy, small_haproxy = [], [], []
            bulk_direct, bulk_proxy, bulk_haproxy = [], [], []
            async with condo_haproxy(run, direct_port) as haproxied:
                for _ in range(rounds):
                    small_direct.append(await wrk(direct + "/", seconds, CONNECTIONS))
                    small_proxy.append(await wrk(proxied + "/", seconds, CONNECTIONS))
                    small_haproxy.append(await wrk(haproxied + "/", seconds, CONNECTIONS))
                for _ in range(rounds):
                    bulk_direct.append(await wrk(direct + "/big", seconds, 1))
                    bulk_proxy.append(await wrk(proxied + "/big", seconds, 1))
                    bulk_haproxy.append(await wrk(haproxied + "/big", seconds, 1))

            deploys = QUICK_DEPLOYS if quick else DEPLOYS
            deployed = await deploys_under_load(run, condo, listen, deploys)
            open_count = QUICK_OPEN if quick else OPEN
            drained = await open_across_deploy(run, condo, listen, open_count)
            killed = await kill9_under_load(run, condo, spec, listen)
    finally:
        stop_haproxy(state)
        await delete_nat_table(host)

    rps_proxy = statistics.median(r.rps for r in small_proxy)
    rps_direct = statistics.median(r.rps for r in small_direct)
    p99_proxy = statistics.median(r.p99_ms for r in small_proxy)
    p99_direct = statistics.median(r.p99_ms for r in small_direct)
    ratio = rps_proxy / rps_direct
    rps_haproxy = statistics.median(r.rps for r in small_haproxy)
    bulk_ratio = transfer(bulk_proxy) / transfer(bulk_direct)
    bulk_haproxy_ratio = transfer(bulk_haproxy) / transfer(bulk_direct)
    mb = 1 / 1e6
    return Report(
        bench="proxy",
        title=f"`:proxy` ({PLANE_NAMES[plane]}) against the same nginx container reached directly",
        columns=("case", "through the proxy", "direct", "ratio / result"),
        rows=(
            (
                f"HTTP `/` (3 bytes), {CONNECTIONS} connections, requests/s ({plane})",
                f"{rps_proxy:,.0f}",
                f"{rps_direct:,.0f}",
                f"{ratio:.2f}x",
            ),
            (
                "the same through condo's HAProxy (tcp mode), requests/s",
                f"{rps_haproxy:,.0f}",
                f"{rps_direct:,.0f}",
                f"{rps_haproxy / rps_direct:.2f}x",
            ),
            (
                "HTTP `/` p99 (ms)",
                f"{p99_proxy:.2f}",
                f"{p99_direct:.2f}",
                f"{p99_proxy - p99_direct:+.2f} ms",
            ),
            (
                f"bulk TCP (`/big`, 1 connection), MB/s ({plane})",
                f"{transfer(bulk_proxy) * mb:,.0f}",
                f"{transfer(bulk_direct) * mb:,.0f}",
                f"{bulk_ratio:.2f}x",
            ),
            (
                "the same through condo's HAProxy (tcp mode), MB/s",
                f"{transfer(bulk_haproxy) * mb:,.0f}",
                f"{transfer(bulk_direct) * mb:,.0f}",
                f"{bulk_haproxy_ratio:.2f}x",
            ),
            (
                f"{deploys} `[:After 1]` deploys under load (new connection per request)",
                f"{deployed.requests:,} requests",
                "",
                f"{deployed.failed} failed",
            ),
            (
                "kill -9 of condo and a new condo under load",
                f"{killed.requests:,} requests",
                "",
                f"{killed.failed} failed",
            ),
            (
                f"{open_count} open TCP connections across a deploy ([:After {DRAIN}])",
                f"{drained.answered_in_drain} answered during the drain",
                "",
                f"{drained.closed_clean} closed cleanly after it, {drained.reset} reset",
            ),
        ),
        figures={
            "rps_proxy": round(rps_proxy),
            "rps_direct": round(rps_direct),
            "rps_ratio": round(ratio, 3),
            "plane": plane,
            "rps_haproxy": round(rps_haproxy),
            "haproxy_ratio": round(rps_haproxy / rps_direct, 3),
            "bulk_haproxy_mb_s": round(transfer(bulk_haproxy) * mb),
            "bulk_haproxy_ratio": round(bulk_haproxy_ratio, 3),
            "p99_proxy_ms": round(p99_proxy, 3),
            "p99_direct_ms": round(p99_direct, 3),
            "p99_added_ms": round(p99_proxy - p99_direct, 3),
            "bulk_proxy_mb_s": round(transfer(bulk_proxy) * mb),
            "bulk_direct_mb_s": round(transfer(bulk_direct) * mb),
            "bulk_ratio": round(bulk_ratio, 3),
            "deploys": deploys,
            "deploy_requests": deployed.requests,
            "deploy_failed": deployed.failed,
            "kill9_requests": killed.requests,
            "kill9_failed": killed.failed,
            "open": open_count,
            "open_answered_in_drain": drained.answered_in_drain,
            "open_closed_clean": drained.closed_clean,
        },
        bars=(
            Bar(label="HTTP requests/s, proxy / direct", value=round(ratio, 3), limit=RATIO_BAR,
                unit="x", at_most=False),
            Bar(label="p99 added by the proxy", value=round(p99_proxy - p99_direct, 3),
                limit=P99_BAR_MS, unit="ms"),
            Bar(label="bulk TCP throughput, proxy / direct", value=round(bulk_ratio, 3),
                limit=RATIO_BAR, unit="x", at_most=False),
            Bar(label=f"failed requests over {deploys} deploys", value=deployed.failed, limit=0,
                unit=""),
            Bar(label="failed requests across kill -9 and restart", value=killed.failed,
                limit=0, unit=""),
            Bar(label="open connections lost before the drain's end",
                value=open_count - min(drained.answered_in_drain, drained.closed_clean),
                limit=0, unit=""),
        ),
        notes=(
            *(f"an open connection during the drain: {e}" for e in drained.errors),
            "wrk from Debian, 2 threads; the backend is Debian's nginx in a locally built image;"
            f" the listener is in :tcp mode, carried by {PLANE_NAMES[plane]}.",
        ),
    )  # fmt: skip


# --- the backend image --------------------------------------------------------------------------


async def ensure_image(run: Run) -> None:
    if await run.engine.image_present(IMAGE):
        return
    await trio.to_thread.run_sync(build_image)


def build_image() -> None:
    """nginx's binary from Debian's package (`apt-get download`, not installed), its libraries
    and the host's busybox (a shell to make `/big`), imported as IMAGE."""
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        subprocess.run(
            ["apt-get", "download", "nginx"], cwd=folder, check=True, capture_output=True
        )
        [deb] = folder.glob("nginx_*.deb")
        unpacked = folder / "deb"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
        root = folder / "root"
        for path in (
            "usr/sbin",
            "bin",
            "etc/nginx",
            "www",
            "tmp",
            "var/lib/nginx",
            "var/log/nginx",
        ):
            (root / path).mkdir(parents=True, exist_ok=True)
        shutil.copy(unpacked / "usr/sbin/nginx", root / "usr/sbin/nginx")
        linked = subprocess.run(["ldd", str(unpacked / "usr/sbin/nginx")], check=True,
                                capture_output=True, text=True).stdout  # fmt: skip
        for lib in re.findall(r"(/\S+) \(0x", linked):
            (root / lib.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(lib, root / lib.lstrip("/"))  # follows the symlink: the file itself
        shutil.copy("/bin/busybox", root / "bin/busybox")
        for tool in ("sh", "head", "wget"):
            (root / "bin" / tool).symlink_to("busybox")
        (root / "etc/nginx/nginx.conf").write_text(NGINX_CONF)
        (root / "etc/passwd").write_text("root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534::/:\n")
        (root / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
        tar = folder / "root.tar"
        subprocess.run(["tar", "-C", str(root), "-cf", str(tar), "."], check=True)
        command = json.dumps(["sh", "-c", START])
        changes = ["ENV PATH=/usr/sbin:/bin", f"CMD {command}"]
        argv = ["docker", "import"] + [a for c in changes for a in ("--change", c)]
        subprocess.run([*argv, str(tar), IMAGE], check=True, capture_output=True)


def spec_text(run: Run, listen: int, mark: str, *, drain: int) -> str:
    # The healthcheck asks nginx itself: a candidate is Stable once it answers.
    return (
        f'{{:spec {{:Image "{IMAGE}" :Labels {{"{RUN_LABEL}" "{run.id}"}} :Env ["MARK={mark}"]\n'
        ' :StopSignal "SIGQUIT"'
        ' :Healthcheck {:Test ["CMD" "wget" "-q" "-O" "/dev/null" "http://127.0.0.1/"]'
        " :Interval 200000000 :Retries 1 :StartPeriod 30000000000}}\n"
        f" :deploy [:After {drain}] :stop-timeout 10 :health-timeout 30\n"
        f' :proxy [{{:listen "127.0.0.1:{listen}" :port 80}}]}}\n'
    )


async def published(container: str) -> int:
    out = await trio.run_process(
        ["docker", "port", container, "80/tcp"], capture_stdout=True, check=True
    )
    for line in out.stdout.decode().splitlines():
        if line.startswith("127.0.0.1:"):
            return int(line.rsplit(":", 1)[1])
    raise BenchError(f"{container} publishes no 80/tcp on 127.0.0.1")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_answering(port: int) -> None:
    with deadline(LIMIT, f"127.0.0.1:{port} answering"):
        while True:
            with contextlib.suppress(OSError, BenchError, trio.BrokenResourceError):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
                    await read_answer(stream)
                    return
            await trio.sleep(0.2)


def stop_haproxy(state: Path) -> None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((state.parent / "state.json.proxy" / "haproxy.pid").read_text().split()[0])
        os.kill(pid, signal.SIGTERM)


PLANE_NAMES = {"nat": "the kernel's NAT", "haproxy": "HAProxy"}


async def listener_plane(condo: Condo) -> str:
    """The data plane that carries the listener, as condo's log says (the NAT table written, or
    HAProxy started or adopted)."""
    with deadline(LIMIT, "the listener's data plane"):
        line = await condo.lines.next_after(
            0, lambda line: line.event in ("proxy.nat_written", "proxy.started", "proxy.adopted")
        )
    return "nat" if line.event == "proxy.nat_written" else "haproxy"


async def delete_nat_table(host: str) -> None:
    """condo never deletes its table; the bench does, at its end."""
    if shutil.which("nft") is not None:
        with trio.CancelScope(shield=True):
            await trio.run_process(["nft", "delete", "table", "ip", table_name(host)],
                                   check=False, capture_stderr=True)  # fmt: skip


@contextlib.asynccontextmanager
async def condo_haproxy(run: Run, port: int) -> AsyncIterator[str]:
    """HAProxy, condo's other data plane, for the same figures: condo's own config (a `:tcp`
    listener on a free port, the published port its server), started as condo starts it; its
    URL."""
    listen = free_port()
    proxy = HAProxy(run.folder("haproxy") / "p")
    frontend = Frontend(
        name=frontend_name("127.0.0.1", listen),
        bind=bind_address("127.0.0.1", listen),
        mode="tcp",
        hold_timeout=1,
        servers=(ServerLine("direct", port, "ready"),),
    )
    await proxy.start([frontend])
    try:
        await wait_answering(listen)
        yield f"http://127.0.0.1:{listen}"
    finally:
        await proxy.stop()


def transfer(rounds: list[Wrk]) -> float:
    """Bytes/s: the median of the rounds."""
    return statistics.median(r.bytes_per_s for r in rounds)


# --- wrk ------------------------------------------------------------------------------------------


@attrs.frozen
class Wrk:
    requests: int
    rps: float
    bytes_per_s: float
    p99_ms: float
    failed: int  # socket errors and non-2xx/3xx answers


UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
TIME_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


async def wrk(url: str, seconds: float, connections: int, *headers: str) -> Wrk:
    threads = min(2, connections)
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(round(seconds), 1)}s", "--latency"]
    for header in headers:
        argv += ["-H", header]
    done = await trio.run_process([*argv, url], capture_stdout=True, capture_stderr=True,
                                  check=False)  # fmt: skip
    return parse_wrk(done.stdout.decode())


def parse_wrk(text: str) -> Wrk:
    requests = re.search(r"(\d+) requests in", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)([KMGT]?B)", text)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)$", text, re.MULTILINE)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    failed = sum(int(n) for n in errors.groups()) if errors else 0
    return Wrk(
        requests=int(requests.group(1)) if requests else 0,
        rps=float(rps.group(1)) if rps else 0.0,
        bytes_per_s=float(transfer.group(1)) * UNITS[transfer.group(2)] if transfer else 0.0,
        p99_ms=float(p99.group(1)) * TIME_UNITS[p99.group(2)] if p99 else 0.0,
        failed=failed + (int(non2xx.group(1)) if non2xx else 0),
    )


@attrs.define
class Load:
    """wrk on the listener (4 connections, each request a new connection) from `start` until
    `stop`; `result` after."""

    listen: int
    process: trio.Process | None = None
    result: Wrk | None = None

    async def start(self) -> None:
        url = f"http://127.0.0.1:{self.listen}/"
        self.process = await trio.lowlevel.open_process(
            ["wrk", "-t2", "-c4", "-d3600s", "-H", "Connection: close", url],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    async def stop(self) -> Wrk:
        process, self.process = self.process, None
        if process is not None:
            process.send_signal(signal.SIGINT)  # wrk prints its summary on SIGINT
            assert process.stdout is not None
            chunks = []
            with trio.move_on_after(10, shield=True):
                while chunk := await process.stdout.receive_some(65536):
                    chunks.append(chunk)
                await process.wait()
            if process.returncode is None:
                process.kill()
            self.result = parse_wrk(b"".join(chunks).decode())
        if self.result is None:
            raise BenchError("wrk never ran")
        return self.result


@contextlib.asynccontextmanager
async def under_load(listen: int) -> AsyncIterator[Load]:
    load = Load(listen)
    await load.start()
    try:
        yield load
    finally:
        await load.stop()


# --- the cases under load -------------------------------------------------------------------------


async def deploys_under_load(run: Run, condo: Condo, listen: int, count: int) -> Wrk:
    last = condo.latest["web"]
    async with under_load(listen) as load:
        for i in range(1, count + 1):
            write_spec(condo.specs, "web", spec_text(run, listen, str(i), drain=1))
            with deadline(LIMIT, f"deploy {i} Stable"):
                [last] = await condo.wait_services(["web"], replaced(last))
        await trio.sleep(1.5)  # the last drain ends under load too
    return await load.stop()


def replaced(before: Transition) -> Callable[[Transition], bool]:
    return lambda t: stable(t) and t.container != before.container


async def kill9_under_load(run: Run, condo: Condo, spec: CondoSpec, listen: int) -> Wrk:
    """kill -9 of `condo` under load, then a new condo on its state file, which adopts the
    containers and the data plane."""
    async with under_load(listen) as load:
        await trio.sleep(1)
        assert condo.process is not None
        condo.process.kill()
        await condo.process.wait()
        await trio.sleep(0.5)
        async with open_condo(run, spec) as again:
            # A condo that adopts a Stable service logs no transition: it is ready.
            await again.wait_ready()
            await trio.sleep(2)  # its proxy task adopted the data plane and reconciled
            # Before this condo's end removes the containers.
            return await load.stop()
    raise AssertionError("unreachable")


@attrs.frozen
class Drained:
    answered_in_drain: int
    closed_clean: int
    reset: int
    errors: list[str]


async def open_across_deploy(run: Run, condo: Condo, listen: int, count: int) -> Drained:
    request = b"GET / HTTP/1.1\r\nHost: b\r\n\r\n"
    streams = []
    for _ in range(count):
        stream = await trio.open_tcp_stream("127.0.0.1", listen)
        await stream.send_all(request)
        await read_answer(stream)
        streams.append(stream)
    mark = len(condo.lines.items)
    write_spec(condo.specs, "web", spec_text(run, listen, "drain", drain=DRAIN))
    # The switch: the NAT rule rewritten, or HAProxy's server of the new container enabled
    # (the Stable transition is logged when the drain ends).
    with deadline(LIMIT, "the switch to the new container"):
        await condo.lines.next_after(
            mark,
            lambda line: (
                line.event == "proxy.nat_written"
                or (line.event == "proxy.command" and "enable server" in line.text)
            ),
        )
    await trio.sleep(DRAIN / 3)
    answered = 0
    errors: list[str] = []
    for stream in streams:
        try:
            await stream.send_all(request)
            with trio.fail_after(5):
                await read_answer(stream)
            answered += 1
        except (trio.BrokenResourceError, trio.TooSlowError, BenchError) as exc:
            errors.append(repr(exc))
    clean = reset = 0
    with trio.move_on_after(DRAIN + 20):
        for stream in streams:
            try:
                if await stream.receive_some(65536) == b"":
                    clean += 1
            except trio.BrokenResourceError:
                reset += 1
    for stream in streams:
        await stream.aclose()
    return Drained(answered, clean, reset, errors[:1])


async def read_answer(stream: trio.SocketStream) -> None:
    data = b""
    while b"\r\n\r\nok\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise BenchError("closed before answering")
        data += chunk
