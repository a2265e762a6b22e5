"""condo.notify on Trio's MockClock: the notifier's queues, retries, timeouts and drops, exactly.

A scripted receiver (httpx.MockTransport) is up, down (connection refused), hanging (never
answers) or answers a fixed status; every attempt's virtual time is recorded, so the backoff
and the timeout are asserted to the second. The Store drives the deploy history, and the history
the notifier, as in condo.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import httpx
import structlog
import trio
import trio.testing

from condo.fsm import Box, Failure, Phase, ServiceState
from condo.history import History
from condo.notify import QUEUE_LIMIT, SEND_TIMEOUT, Notifier, origin, run_notifier
from condo.spec import ServiceSpec
from condo.store import Store

CAP = 30
URL = "http://hooks.example:8080/services/T0/B0/SECRETPATH?key=SECRETQUERY"
A = ServiceSpec(container={"Image": "web:1", "Env": ["DB_PASSWORD=hunter2-long"]})
B = ServiceSpec(container={"Image": "web:2", "Env": ["DB_PASSWORD=hunter3-long"]})


class Receiver:
    """A webhook: `mode` is "up", "down", "hang" or a status it answers without taking."""

    def __init__(self) -> None:
        self.mode: str | int = "up"
        self.attempts: list[float] = []
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.attempts.append(trio.current_time())
        if self.mode == "down":
            raise httpx.ConnectError("connection refused", request=request)
        if self.mode == "hang":
            await trio.sleep_forever()
        if isinstance(self.mode, int):
            return httpx.Response(self.mode)
        assert request.headers["content-type"] == "application/json"
        self.bodies.append(json.loads(request.content))
        return httpx.Response(200)

    @property
    def events(self) -> list[str]:
        return [body["event"] for body in self.bodies]


def box(spec: ServiceSpec, cid: str) -> Box:
    return Box(id=cid, name=f"web_{cid}", spec=spec, created_at=1.0, healthcheck=True)


def deploy(store: Store, spec: ServiceSpec, cid: str) -> None:
    """A first deploy of `spec`, as the driver puts it in the Store, up to Stable."""
    store.set_state("web", ServiceState(desired=spec))
    store.set_state("web", ServiceState(phase=Phase.Wait, desired=spec, starting=spec))
    store.set_state("web", ServiceState(phase=Phase.Wait, desired=spec, current=box(spec, cid)))
    store.set_state("web", ServiceState(phase=Phase.Stable, desired=spec, current=box(spec, cid)))


def wired(urls: list[str], *, secrets: tuple[str, ...] = ()) -> tuple[Store, Notifier]:
    """A Store, its deploy history and a notifier told the history's changes, as condo.run
    wires them."""
    store = Store("h1")
    history = History()
    store.on_transition(history.on_transition)
    notifier = Notifier("h1", urls, secrets=secrets)
    history.listen(notifier.on_step)
    return store, notifier


async def start(
    nursery: trio.Nursery, receiver: Receiver, *, secrets: tuple[str, ...] = ()
) -> tuple[Store, Notifier]:
    store, notifier = wired([URL], secrets=secrets)
    await nursery.start(
        lambda task_status: run_notifier(
            notifier, transport=httpx.MockTransport(receiver), task_status=task_status
        )
    )
    return store, notifier


async def test_notices_arrive_in_order_with_the_contract_body(
    autojump_clock: trio.testing.MockClock,
) -> None:
    receiver = Receiver()
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            store, notifier = await start(nursery, receiver)
            deploy(store, A, "a")
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
    assert receiver.events == ["deploy.started", "deploy.stable"]
    assert receiver.bodies[1] == {
        "event": "deploy.stable",
        "host": "h1",
        "service": "web",
        "image": "web:1",
        "previous_image": None,
        "error": None,
        "at": receiver.bodies[1]["at"],
        "text": "web on h1 is stable on web:1.",
    }
    assert isinstance(receiver.bodies[1]["at"], float)
    [counts] = notifier.counts().values()
    assert (counts.sent, counts.failed, counts.dropped) == (2, 0, 0)


async def test_a_receiver_that_is_down_gets_everything_once_it_is_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    receiver = Receiver()
    receiver.mode = "down"
    with trio.fail_after(CAP), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            store, notifier = await start(nursery, receiver)
            began = trio.current_time()
            deploy(store, A, "a")
            await trio.sleep(8)  # attempts at 0, 1, 3, 7 fail; the next is due at 15
            receiver.mode = "up"
            await trio.sleep(10)
            nursery.cancel_scope.cancel()
    assert [at - began for at in receiver.attempts] == [0, 1, 3, 7, 15, 15]
    assert receiver.events == ["deploy.started", "deploy.stable"]
    [counts] = notifier.counts().values()
    assert (counts.sent, counts.failed, counts.dropped) == (2, 4, 0)
    # One line for the outage and one for its end, naming the receiver by its origin only.
    notify_logs = [entry for entry in logs if entry["event"].startswith("notify.")]
    assert [e["event"] for e in notify_logs if e["event"] != "notify.notice"] == [
        "notify.failed",
        "notify.resumed",
    ]
    assert all(e.get("receiver") in (None, "http://hooks.example:8080") for e in notify_logs)
    assert "SECRET" not in repr(logs)


async def test_the_backoff_doubles_to_a_minute(autojump_clock: trio.testing.MockClock) -> None:
    receiver = Receiver()
    receiver.mode = 503
    with trio.fail_after(CAP + 200):
        async with trio.open_nursery() as nursery:
            store, _ = await start(nursery, receiver)
            began = trio.current_time()
            store.set_state("web", ServiceState(desired=A))
            store.set_state("web", ServiceState(phase=Phase.Wait, desired=A, starting=A))
            await trio.sleep(200)
            nursery.cancel_scope.cancel()
    gaps = [later - earlier for earlier, later in itertools.pairwise(receiver.attempts)]
    assert receiver.attempts[0] == began
    assert gaps == [1, 2, 4, 8, 16, 32, 60, 60]


async def test_a_receiver_that_never_answers_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    receiver = Receiver()
    receiver.mode = "hang"
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            store, notifier = await start(nursery, receiver)
            began = trio.current_time()
            store.set_state("web", ServiceState(desired=A))
            store.set_state("web", ServiceState(phase=Phase.Wait, desired=A, starting=A))
            await trio.sleep(1)
            # Supervision goes on while the receiver hangs: the Store's change is queued at once.
            store.set_state("web", ServiceState(phase=Phase.Stable, desired=A, current=box(A, "a")))
            [outbox] = notifier.outboxes
            assert outbox.queued == 2
            # The first attempt is given up at 5 s; the receiver is back at 5.5 s, before the
            # retry at 6 s (not at the very instant of the retry: which ran first was luck).
            await trio.sleep(SEND_TIMEOUT - 0.5)
            receiver.mode = "up"
            await trio.sleep(10)
            nursery.cancel_scope.cancel()
    # Given up after SEND_TIMEOUT, tried again 1 s later.
    assert [at - began for at in receiver.attempts] == [0, SEND_TIMEOUT + 1, SEND_TIMEOUT + 1]
    assert receiver.events == ["deploy.started", "deploy.stable"]
    [counts] = notifier.counts().values()
    assert (counts.sent, counts.failed) == (2, 1)


async def test_a_full_queue_drops_its_oldest(autojump_clock: trio.testing.MockClock) -> None:
    receiver = Receiver()
    receiver.mode = "down"
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            store, notifier = await start(nursery, receiver)
            # Each deploy of A then B gives started + stable: 4 notices per round.
            for _ in range(QUEUE_LIMIT // 4 + 2):
                deploy(store, A, "a")
                store.set_state("web", ServiceState(phase=Phase.Wait, desired=B, starting=B))
                store.set_state(
                    "web", ServiceState(phase=Phase.Stable, desired=B, current=box(B, "b"))
                )
                store.drop("web")  # a fresh service each round
            [outbox] = notifier.outboxes
            assert outbox.queued == QUEUE_LIMIT
            await trio.sleep(2)
            receiver.mode = "up"
            await trio.sleep(10)
            nursery.cancel_scope.cancel()
    [counts] = notifier.counts().values()
    assert counts.dropped == 4 * (QUEUE_LIMIT // 4 + 2) - QUEUE_LIMIT
    assert counts.sent == QUEUE_LIMIT
    # The newest are kept, in order: the last round's four end the list.
    assert receiver.events[-4:] == ["deploy.started", "deploy.stable"] * 2
    assert receiver.bodies[-1]["image"] == "web:2"
    assert receiver.bodies[-1]["previous_image"] == "web:1"


async def test_a_refused_notice_is_dropped_not_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    receiver = Receiver()
    receiver.mode = 400
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            store, notifier = await start(nursery, receiver)
            store.set_state("web", ServiceState(desired=A))
            store.set_state("web", ServiceState(phase=Phase.Wait, desired=A, starting=A))
            await trio.sleep(5)
            receiver.mode = "up"
            store.set_state("web", ServiceState(phase=Phase.Stable, desired=A, current=box(A, "a")))
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
    assert len(receiver.attempts) == 2
    assert receiver.events == ["deploy.stable"]
    [counts] = notifier.counts().values()
    assert (counts.sent, counts.failed, counts.dropped) == (1, 1, 1)


async def test_no_secret_reaches_a_body(autojump_clock: trio.testing.MockClock) -> None:
    receiver = Receiver()
    message = "create failed: env DB_PASSWORD=hunter3-long rejected; token api-TOKEN-123"
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            store, _ = await start(nursery, receiver, secrets=("api-TOKEN-123", ""))
            deploy(store, A, "a")
            store.set_state(
                "web",
                ServiceState(phase=Phase.Wait, desired=B, starting=B, replacing=box(A, "a")),
            )
            store.set_state(
                "web",
                ServiceState(
                    phase=Phase.TryAgainNext,
                    desired=B,
                    current=box(A, "a"),
                    attempt=1,
                    error=Failure(message=message, at=5.0),
                ),
            )
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
    assert receiver.events == ["deploy.started", "deploy.stable", "deploy.started", "deploy.failed"]
    failed = receiver.bodies[-1]
    assert failed["error"] == "create failed: env DB_PASSWORD=[redacted] rejected; token [redacted]"
    text = json.dumps(receiver.bodies)
    for secret in ("hunter2-long", "hunter3-long", "api-TOKEN-123"):
        assert secret not in text


def test_a_receiver_is_named_by_its_origin_only() -> None:
    assert origin("https://user:pw@hooks.slack.com/services/T/B/X?x=1") == "https://hooks.slack.com"
    assert origin("http://[::1]:9000/hook") == "http://[::1]:9000"
    assert origin(URL) == "http://hooks.example:8080"


async def test_a_url_httpx_cannot_use_never_ends_the_notifier(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # (condo.config refuses such a URL; the notifier must survive one all the same.)
    store, notifier = wired(["http://ex\tample.com/hook"])
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_notifier, notifier)
            deploy(store, A, "a")
            await trio.sleep(4)
            nursery.cancel_scope.cancel()
    [counts] = notifier.counts().values()
    assert (counts.sent, counts.failed, counts.dropped) == (0, 3, 0)  # at 0, 1 and 3 s
