"""The HTTP API under load: `GET /v1/state` throughput, and 10,000 held `/v1/wait_for` long-polls.

One `condo run` with 200 Stable busybox services (3 with --quick), API on a free loopback port.
1. `GET /v1/state`: `CONNECTIONS` keep-alive connections from this process (a raw HTTP/1.1
   client on Trio sockets; httpx would spend more CPU per request than condo does, on the same
   2 cores) for three 5 s windows: completed 200 answers per second (the median window), their
   latency, and the responses the server cut (with condo's own log lines about them).
2. Long-polls, in tiers of 1,000 then 10,000 (100 with --quick), a service per tier: that many
   connections each send `GET /v1/wait_for?name=<the service>&image=<its next image>`; once
   condo's own gauge `condo_web_open_waits` counts them all, the service's spec is changed to
   the image. Each answer's latency is its arrival here (read by one epoll loop, not a Trio task
   per connection) minus condo's log line of the `→ Stable` transition; all must be 200 `ok`.
   condo's RSS is read with everything held, and after; (held - before) / polls is the memory
   each waiting long-poll holds. The bars are judged on the largest tier (the issue's 10,000).
`BENCH_API_TIERS=10000` runs only the tiers named (comma-separated).
Both this process and condo get the highest open-files limit allowed (condo inherits it).
Bars: ≥ 1,000 req/s; all long-polls answered; p99 ≤ 200 ms after the transition; ≤ 10 kB held
per waiting long-poll.
"""

from __future__ import annotations

import os
import re
import select
import statistics
import time
import urllib.parse

import attrs
import trio

from bench.common.condos import Condo, CondoSpec, open_condo, stable
from bench.common.rawhttp import HttpConnection, wait_metric_at_least
from bench.common.report import Bar, Report
from bench.common.run import BUSYBOX, BUSYBOX_2, Run, raise_open_files_limit
from bench.common.specs import spec_text, write_spec
from bench.common.stats import mb, ms, percentile, sample_process
from bench.common.wait import BenchError, deadline, wall

SERVICES, QUICK_SERVICES = 200, 3
TIERS, QUICK_TIERS = (1_000, 10_000), (100,)  # long-polls held at once, one tier a change
# BENCH_API_TIERS=10000 (comma-separated): only these tiers (a shorter run, for one's own work).
TIERS_ENV = "BENCH_API_TIERS"
LOAD_SECONDS, QUICK_LOAD_SECONDS = 5.0, 2.0
# Several windows, judged on the median: other tenants of this machine come and go.
LOAD_WINDOWS, QUICK_LOAD_WINDOWS = 3, 1
CONNECTIONS = 8
CONNECTING = 128  # connections being opened at once (condo's listen backlog is 128)
RATE_BAR, P99_BAR = 1000.0, 200.0
PER_WAITER_BAR = 10.0  # kB of condo's RSS held per waiting long-poll
LIMIT = 300.0
HOLD_LIMIT = 180.0
WAIT_TIMEOUT = 900  # the long-polls' own timeout parameter, seconds: far beyond the run


async def main(run: Run) -> Report:
    size = QUICK_SERVICES if run.quick else SERVICES
    tier_sizes: tuple[int, ...] = QUICK_TIERS if run.quick else TIERS
    if os.environ.get(TIERS_ENV):
        tier_sizes = tuple(int(t) for t in os.environ[TIERS_ENV].split(","))
    seconds = QUICK_LOAD_SECONDS if run.quick else LOAD_SECONDS
    windows = QUICK_LOAD_WINDOWS if run.quick else LOAD_WINDOWS
    files = raise_open_files_limit()
    if files < max(tier_sizes) + 512:
        raise BenchError(f"the open-files limit ({files}) is too low for {tier_sizes[-1]} polls")
    names = [f"a{i:03d}" for i in range(size)]
    async with open_condo(run, CondoSpec(name="api", host=run.host("api"), server=True)) as condo:
        await condo.wait_ready()
        assert condo.url is not None
        for name in names:
            write_spec(condo.specs, name, spec_text(run, BUSYBOX, deploy="[:After 0]"))
        with deadline(LIMIT, f"{size} services Stable"):
            first = await condo.wait_services(names, stable)
        old = [t.container for t in first]
        await trio.sleep(2.0)

        log_mark = len(condo.lines.items)
        rates: list[float] = []
        latencies: list[float] = []
        done = body_size = 0
        with deadline(windows * (seconds + 30), "the /v1/state load"):
            async with condo.window("state"):
                for _ in range(windows):
                    window_done, window_latencies, body_size = await _load(condo.url, seconds)
                    rates.append(len(window_latencies) / seconds)
                    latencies += window_latencies
                    done += window_done
                    await trio.sleep(1.0)
        rate = statistics.median(rates)
        # hypercorn logs this when a response is cut (seen under this load): count them.
        framework_errors = [
            line.text
            for line in condo.lines.items[log_mark:]
            if line.event.startswith("Error in ASGI")
        ]

        tiers = []
        for index, polls in enumerate(tier_sizes):
            tiers.append(await _long_polls(run, condo, names[index], old[index], polls))

    largest = tiers[-1]
    p50, p99 = ms(percentile(largest.delays, 50)), ms(percentile(largest.delays, 99))
    tier_rows = []
    tier_figures: dict[str, float | int | str | bool | None] = {}
    for tier in tiers:
        soonest, last = ms(min(tier.delays)), ms(max(tier.delays))
        t50, t99 = ms(percentile(tier.delays, 50)), ms(percentile(tier.delays, 99))
        tier_rows += [
            (f"{tier.polls} long-polls held at once: answered ok", f"{tier.ok} of {tier.polls}"),
            (
                "… answer after the → Stable log line, first / p50 / p99 / last",
                f"{soonest} / {t50} / {t99} / {last} ms",
            ),
            ("… the change itself: spec written → Stable", f"{tier.deploy:.2f} s"),
            (
                "… condo RSS before / held / after",
                f"{mb(tier.rss_before)} / {mb(tier.rss_held)} / {mb(tier.rss_after)} MB",
            ),
            ("… memory per waiting long-poll: (held - before) / polls", f"{tier.per_waiter_kb} kB"),
        ]
        tier_figures |= {
            f"polls{tier.polls}_ok": tier.ok,
            f"polls{tier.polls}_first_ms": soonest,
            f"polls{tier.polls}_p50_ms": t50,
            f"polls{tier.polls}_p99_ms": t99,
            f"polls{tier.polls}_last_ms": last,
            f"polls{tier.polls}_deploy_s": round(tier.deploy, 3),
            f"polls{tier.polls}_rss_held_mb": mb(tier.rss_held),
            f"polls{tier.polls}_per_waiter_kb": tier.per_waiter_kb,
        }
    return Report(
        bench="api",
        title=f"HTTP API ({size} services)",
        columns=("measure", "value"),
        rows=(
            (
                f"GET /v1/state, {CONNECTIONS} keep-alive connections, "
                f"{windows} x {seconds:g} s: median (windows)",
                f"{rate:.0f} req/s ({', '.join(f'{r:.0f}' for r in rates)})",
            ),
            (
                "… latency p50 / p99",
                f"{ms(percentile(latencies, 50))} / {ms(percentile(latencies, 99))} ms",
            ),
            ("… response size", f"{body_size / 1000:.0f} kB"),
            ("… failed (non-200 or dropped)", str(done - len(latencies))),
            ("… condo's log: 'Error in ASGI Framework'", str(len(framework_errors))),
            *tier_rows,
        ),
        figures={
            "services": size,
            "state_req_per_s": round(rate, 1),
            "state_p50_ms": ms(percentile(latencies, 50)),
            "state_p99_ms": ms(percentile(latencies, 99)),
            "state_body_kb": round(body_size / 1000, 1),
            "state_failed": done - len(latencies),
            "state_framework_errors": len(framework_errors),
            "state_best_req_per_s": round(max(rates), 1),
            "polls": largest.polls,
            "polls_ok": largest.ok,
            "polls_p50_ms": p50,
            "polls_p99_ms": p99,
            **tier_figures,
        },
        bars=(
            Bar(
                label="GET /v1/state",
                value=round(rate),
                limit=RATE_BAR,
                unit="req/s",
                at_most=False,
            ),
            Bar(
                label=f"{largest.polls} long-polls answered ok",
                value=largest.ok,
                limit=largest.polls,
                unit="",
                at_most=False,
            ),
            Bar(
                label=f"{largest.polls} long-polls: answer p99",
                value=p99,
                limit=P99_BAR,
                unit="ms",
            ),
            Bar(
                label=f"{largest.polls} long-polls: memory per waiter",
                value=largest.per_waiter_kb,
                limit=PER_WAITER_BAR,
                unit="kB",
            ),
        ),
    )


@attrs.frozen(kw_only=True)
class _Tier:
    polls: int
    ok: int
    delays: list[float]  # each answer's arrival after condo's → Stable log line, seconds
    deploy: float  # the change itself: spec written → Stable
    rss_before: int
    rss_held: int
    rss_after: int

    @property
    def per_waiter_kb(self) -> float:
        return round((self.rss_held - self.rss_before) / self.polls / 1000, 1)


async def _long_polls(run: Run, condo: Condo, target: str, old: str | None, polls: int) -> _Tier:
    """Hold `polls` long-polls for `target` on its next image, change it, time the answers."""
    assert condo.url is not None
    rss_before = sample_process(condo.pid).rss
    query = urllib.parse.urlencode(
        {"name": target, "image": BUSYBOX_2, "timeout": str(WAIT_TIMEOUT)}
    )
    answers: list[tuple[float, int, bytes]] = []
    all_answered = trio.Event()
    async with trio.open_nursery() as nursery:
        with deadline(HOLD_LIMIT, f"{polls} long-polls held"):
            async with condo.window(f"hold{polls}"):
                await _hold(
                    nursery, condo.url, f"/v1/wait_for?{query}", polls, answers, all_answered
                )
                # condo's own gauge is the only witness of "held"
                await wait_metric_at_least(condo.url, "condo_web_open_waits", polls)
        held = sample_process(condo.pid)
        if answers:
            raise BenchError(f"{len(answers)} long-polls were answered before the change")
        async with condo.window(f"answer{polls}"):
            write_spec(
                condo.specs,
                target,
                spec_text(run, BUSYBOX_2, deploy="[:After 0]", env=["V=2"]),
            )
            written = wall()
            with deadline(LIMIT, "the change Stable"):
                (changed,) = await condo.wait_services(
                    [target], lambda t: stable(t) and t.container != old
                )
            with deadline(HOLD_LIMIT, f"{polls} long-polls answered"):
                await all_answered.wait()
    after = sample_process(condo.pid)
    return _Tier(
        polls=polls,
        ok=sum(1 for _, status, body in answers if status == 200 and b'"ok"' in body),
        delays=[at - changed.at for at, _, _ in answers],
        deploy=changed.at - written,
        rss_before=rss_before,
        rss_held=held.rss,
        rss_after=after.rss,
    )


async def _load(url: str, seconds: float) -> tuple[int, list[float], int]:
    """Hammer GET /v1/state; (requests done, latencies of the 200 answers, last body size).

    A connection the server drops mid-response counts as a failed request and is reopened; one
    whose answer said `Connection: close` is reopened before the next request, as HTTP/1.1 asks.
    """
    latencies: list[float] = []
    done = 0
    size = 0

    async def worker(stop_at: float) -> None:
        nonlocal done, size
        while time.monotonic() < stop_at:
            connection = await HttpConnection.open(url)
            try:
                while time.monotonic() < stop_at and not connection.closing:
                    began = time.monotonic()
                    status, body = await connection.get("/v1/state")
                    done += 1
                    if status == 200:
                        latencies.append(time.monotonic() - began)
                        size = len(body)
            except (BenchError, trio.BrokenResourceError):
                done += 1  # dropped mid-response: a failed request (condo logs why)
            finally:
                await connection.aclose()

    stop_at = time.monotonic() + seconds
    async with trio.open_nursery() as nursery:
        for _ in range(CONNECTIONS):
            nursery.start_soon(worker, stop_at)
    if not latencies:
        raise BenchError("GET /v1/state never answered 200")
    return done, latencies, size


async def _hold(
    nursery: trio.Nursery,
    url: str,
    target: str,
    count: int,
    answers: list[tuple[float, int, bytes]],
    all_answered: trio.Event,
) -> None:
    """Start `count` long-polls (returns once every request was sent); one task in `nursery`
    reads their answers.

    The answers are read by one epoll loop, each timestamped as it is read: with a Trio task
    per connection, the benchmark's own scheduling of 10,000 wake-ups (on the 2 cores condo
    also uses) was most of the figure.
    """
    connecting = trio.CapacityLimiter(CONNECTING)
    streams: list[trio.SocketStream] = []

    async def poll() -> None:
        async with connecting:
            connection = await HttpConnection.open(url)
            await connection.send_get(target)
        streams.append(connection.stream)

    async with trio.open_nursery() as sending:
        for _ in range(count):
            sending.start_soon(poll)
    nursery.start_soon(_read_answers, streams, answers, all_answered)


async def _read_answers(
    streams: list[trio.SocketStream],
    answers: list[tuple[float, int, bytes]],
    all_answered: trio.Event,
) -> None:
    """Read one whole answer (with a Content-Length) from each stream; then close them all.

    The reader shares the 2 cores with condo, so each answer costs it as little as it can: a
    one-shot registration (no `epoll_ctl` once an answer is whole), one read, the time, and a
    length check; answers are parsed after the last one arrived."""
    poller = select.epoll()
    buffers: dict[int, bytes] = {}
    arrived: list[tuple[float, bytes]] = []
    oneshot = select.EPOLLIN | select.EPOLLONESHOT
    try:
        for stream in streams:
            fd = stream.socket.fileno()
            poller.register(fd, oneshot)
            buffers[fd] = b""
        while buffers:
            await trio.lowlevel.wait_readable(poller.fileno())
            for fd, _ in poller.poll(0, 4096):
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    poller.modify(fd, oneshot)
                    continue
                at = wall()
                data = buffers[fd] + chunk
                if _is_whole(data):
                    arrived.append((at, data))
                    del buffers[fd]
                    continue
                if not chunk:
                    raise BenchError(f"the server closed a long-poll mid-answer: {data[:200]!r}")
                buffers[fd] = data
                poller.modify(fd, oneshot)
        for at, data in arrived:
            answer = _whole_answer(data)
            assert answer is not None
            answers.append((at, *answer))
        all_answered.set()
    finally:
        poller.close()
        for stream in streams:
            await stream.aclose()


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)


def _is_whole(data: bytes) -> bool:
    """`data` holds a whole answer with a Content-Length (the reader's cheap check)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return False
    length = _CONTENT_LENGTH.search(data, 0, end + 2)
    return length is not None and len(data) - end - 4 >= int(length.group(1))


def _whole_answer(data: bytes) -> tuple[int, bytes] | None:
    """(status, body) once `data` holds a whole answer with a Content-Length, else None."""
    head, found, body = data.partition(b"\r\n\r\n")
    if not found:
        return None
    lines = head.decode("latin-1").split("\r\n")
    length = next(
        int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")
    )
    if len(body) < length:
        return None
    return int(lines[0].split(" ", 2)[1]), body[:length]
