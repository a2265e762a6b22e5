"""`--notify URL`: POSTing deploy notices to webhooks without ever holding up supervision.

Owns: `Notifier` (a listener of the deploy history, condo.history, that tells every step's
changes of a service's deploys as notices with condo.notices and puts each notice's JSON body
into one `Outbox` per URL), `Outbox` (one receiver's bounded queue, its delivery loop and its
counts) and `run_notifier` (the "notifier" task: one httpx client, one delivery loop per
receiver).

Invariants:
- Nothing here blocks the supervisor: the history calls `Notifier.on_step` inline, which only
  projects the step's changes and appends to deques (O(changes)). Delivery runs in its own tasks.
- Each receiver has its own queue of at most `QUEUE_LIMIT` bodies, sent in order, one at a time.
  When it is full the *oldest* body is dropped (the newest say more about now) and counted; a
  body the receiver refuses outright (a 4xx other than 408 and 429) is dropped and counted too.
- A body that could not be delivered (no connection, `SEND_TIMEOUT` passed, 5xx, 408, 429) is
  tried again after a backoff (`RETRY_FIRST_DELAY` doubling to `RETRY_MAX_DELAY`), so a receiver
  that comes back gets what was queued meanwhile. An outage is logged once, and its end once.
- A URL may hold a secret (a Slack webhook's path is its key): logs and metrics name a receiver
  by its origin (`scheme://host:port`) only. Bodies never carry a secret (condo.notices.scrub).
- Pending bodies are lost when condo stops (the state file is what survives a restart).
"""

from __future__ import annotations

import functools
import json
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import urlsplit

import attrs
import httpx
import structlog
import trio

from condo import notices
from condo.deploys import Step
from condo.notices import Notice

log = structlog.get_logger(__name__)

QUEUE_LIMIT = 100
SEND_TIMEOUT = 5.0
RETRY_FIRST_DELAY = 1.0
RETRY_MAX_DELAY = 60.0
# Answers that say "try again later" rather than "never send this".
_RETRYABLE = frozenset({408, 429})


def origin(url: str) -> str:
    """`scheme://host[:port]` of `url`: how logs and metrics name a receiver (never its path,
    query or credentials). `url` is one condo.config.parse_notify_url accepted."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}"


@attrs.define
class Counts:
    """One receiver's deliveries so far (condo_notify_*_total)."""

    sent: int = 0  # bodies the receiver accepted (2xx)
    failed: int = 0  # attempts that did not deliver (each retry counts)
    dropped: int = 0  # bodies given up: the queue was full, or the receiver refused them


class Outbox:
    """One receiver: a bounded queue of JSON bodies and the loop that delivers them."""

    def __init__(self, url: str, limit: int = QUEUE_LIMIT) -> None:
        self.url = url
        self.receiver = origin(url)
        self.counts = Counts()
        self._queue: deque[bytes] = deque()
        self._limit = limit
        self._arrived = trio.Event()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def put(self, body: bytes) -> None:
        """Queue `body` (never blocks; a full queue drops its oldest body)."""
        if len(self._queue) >= self._limit:
            self._queue.popleft()
            self.counts.dropped += 1
            log.warning("notify.dropped", receiver=self.receiver, reason="queue full")
        self._queue.append(body)
        self._arrived.set()

    async def run(self, http: httpx.AsyncClient) -> None:
        """Deliver the queue's bodies in order, until cancelled."""
        delay = RETRY_FIRST_DELAY
        failing = False  # an outage is under way (and was logged)
        while True:
            while not self._queue:
                self._arrived = trio.Event()
                await self._arrived.wait()
            body = self._queue[0]
            error = await self._post(http, body)
            if error is None:
                # Delivered, or refused for good: either way this body is done.
                if self._queue and self._queue[0] is body:  # not dropped meanwhile
                    self._queue.popleft()
                delay = RETRY_FIRST_DELAY
                if failing:
                    log.info("notify.resumed", receiver=self.receiver)
                    failing = False
                continue
            if not failing:
                log.warning("notify.failed", receiver=self.receiver, error=error, retry_in=delay)
                failing = True
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_DELAY)

    async def _post(self, http: httpx.AsyncClient, body: bytes) -> str | None:
        """POST one body: None when it is done with (delivered, or refused for good), else why
        it should be tried again."""
        status: int | None = None
        error = f"no answer in {SEND_TIMEOUT:g} s"
        # A receiver that accepts the connection and never answers must not hold the queue.
        with trio.move_on_after(SEND_TIMEOUT):
            try:
                response = await http.post(
                    self.url, content=body, headers={"Content-Type": "application/json"}
                )
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                # No connection, a reset, a protocol error: the receiver is away; retried (a URL
                # httpx cannot use is retried too: it must never end the notifier, or condo).
                # The exception's text may hold the URL, so only its kind is kept.
                error = type(exc).__name__
            else:
                status = response.status_code
        if status is not None and 200 <= status < 300:
            self.counts.sent += 1
            return None
        self.counts.failed += 1
        if status is None or status >= 500 or status in _RETRYABLE:
            return error if status is None else f"HTTP {status}"
        # 3xx (redirects are not followed) and 4xx: this body will never be taken.
        self.counts.dropped += 1
        log.warning("notify.dropped", receiver=self.receiver, reason=f"HTTP {status}")
        return None


class Notifier:
    """Tells every receiver the deploy history's changes as notices.

    `history.listen(notifier.on_step)` before anything writes the Store; `run_notifier` delivers.
    """

    def __init__(self, host: str, urls: Sequence[str], *, secrets: Iterable[str] = ()) -> None:
        self._host = host
        self.outboxes = tuple(Outbox(url) for url in urls)
        self._secrets = frozenset(secret for secret in secrets if secret)

    def counts(self) -> Mapping[str, Counts]:
        """The deliveries per receiver (URLs with one origin add up), for /metrics."""
        totals: dict[str, Counts] = {}
        for outbox in self.outboxes:
            total = totals.setdefault(outbox.receiver, Counts())
            total.sent += outbox.counts.sent
            total.failed += outbox.counts.failed
            total.dropped += outbox.counts.dropped
        return totals

    def on_step(self, step: Step) -> None:
        """History listener: queue the notices of one step of a service."""
        for notice in notices.project(step):
            self._send(notice, step)

    def _send(self, notice: Notice, step: Step) -> None:
        secrets = self._secrets | notices.secrets_of(step.new)
        if step.old is not None:
            secrets |= notices.secrets_of(step.old)
        clean = attrs.evolve(notice, error=notices.scrub(notice.error, secrets))
        body = json.dumps(clean.to_json(self._host)).encode()
        log.info("notify.notice", notice=clean.kind.value, service=clean.service)
        for outbox in self.outboxes:
            outbox.put(body)


async def run_notifier(
    notifier: Notifier,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The "notifier" task: deliver every receiver's queue until cancelled."""
    # trust_env=False: proxy variables and .netrc are the host's business, not the webhooks'
    # (a proxy would see every body; .netrc could add credentials). As for Consul and Docker.
    async with (
        httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(SEND_TIMEOUT),
            trust_env=False,
            follow_redirects=False,
        ) as http,
        trio.open_nursery() as nursery,
    ):
        for outbox in notifier.outboxes:
            nursery.start_soon(
                functools.partial(outbox.run, http), name=f"notify {outbox.receiver}"
            )
        task_status.started()
