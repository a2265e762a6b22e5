"""The service driver's timing, on Trio's MockClock with the fake engine (exact virtual times)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
import trio.testing

from condo import fsm, labels
from condo.fsm import Phase
from condo.service import (
    CALL_LIMIT,
    LEFTOVER_RESYNC_DELAY,
    MAILBOX_CAPACITY,
    PULL_LIMIT,
    Mailbox,
    ResyncRequested,
    ServiceContext,
    run_service,
)
from condo.spec import DeployStrategy, ServiceSpec
from condo.store import Store
from tests.fakes import FakeContainer, FakeEngine


@attrs.define
class Driven:
    store: Store
    mailbox: Mailbox
    engine: FakeEngine

    @property
    def state(self) -> fsm.ServiceState:
        return self.store.entries["web"].state

    async def wait_phase(self, phase: Phase, *, other_than: str | None = None) -> fsm.ServiceState:
        while True:
            entry = self.store.entries.get("web")
            if entry is not None and entry.state.phase is phase:
                current = entry.state.current
                if other_than is None or (current is not None and current.id != other_than):
                    return entry.state
            await self.store.wait_changed(self.store.version)


@asynccontextmanager
async def driving(
    engine: FakeEngine, initial: fsm.ServiceState | None = None, *, resync: bool = False
) -> AsyncIterator[Driven]:
    store = Store("h")
    mailbox = Mailbox()
    if resync:
        mailbox.request_resync()  # as the supervisor starts every driver

    async def flush() -> None:
        engine.calls.append("flush")

    ctx = ServiceContext(name="web", host="h", engine=engine, store=store, flush_state=flush)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_service, ctx, mailbox, initial or fsm.ServiceState())
        yield Driven(store, mailbox, engine)
        nursery.cancel_scope.cancel()


def spec(image: str, **kw: object) -> ServiceSpec:
    return ServiceSpec(container={"Image": image}, **kw)  # type: ignore[arg-type]


async def test_health_timeout_and_backoff_on_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine(local_images={"app:1"}, healthchecked={"app:1"})
    with trio.fail_after(1000):
        async with driving(engine) as d:
            d.mailbox.set_spec(spec("app:1", health_timeout=10))
            await d.wait_phase(Phase.TryAgain)
            assert trio.current_time() == 10.0
            await d.wait_phase(Phase.Wait)
            assert trio.current_time() == 20.0  # first retry after 10 s
            await d.wait_phase(Phase.TryAgain)
            assert trio.current_time() == 30.0
            await d.wait_phase(Phase.Wait)
            assert trio.current_time() == 50.0  # then 20 s
            assert d.state.attempt == 2
            await trio.testing.wait_all_tasks_blocked()  # the third candidate is created
            # Only the latest failed candidate is kept (stopped) beside the new one.
            assert sorted(c.running for c in engine.containers.values()) == [False, True]


async def test_after_n_drains_exactly_n_seconds(autojump_clock: trio.testing.MockClock) -> None:
    engine = FakeEngine(local_images={"app:1", "app:2"}, healthchecked={"app:2"})
    with trio.fail_after(1000):
        async with driving(engine) as d:
            d.mailbox.set_spec(spec("app:1"))
            first = await d.wait_phase(Phase.Stable)
            assert trio.current_time() == 0.0
            assert first.current is not None
            d.mailbox.set_spec(spec("app:2", deploy=DeployStrategy("After", 5)))
            waiting = await d.wait_phase(Phase.WaitNext)
            while waiting.next is None:
                await d.store.wait_changed(d.store.version)
                waiting = d.state
            await trio.sleep(3)
            d.mailbox.put(fsm.ContainerHealthy(waiting.next.id))
            await d.wait_phase(Phase.Stable, other_than=first.current.id)
            assert trio.current_time() == 8.0  # healthy at 3, then 5 s of draining
            await trio.testing.wait_all_tasks_blocked()
    assert [c.body["Image"] for c in engine.containers.values()] == ["app:2"]


async def test_a_hung_pull_is_cancelled_by_a_newer_spec(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine(local_images={"app:1"}, registry_images={"app:9"}, pull_hangs=True)
    with trio.fail_after(1000):
        async with driving(engine) as d:
            d.mailbox.set_spec(spec("remote/app:9"))
            await trio.sleep(5)
            assert engine.calls[-1] == "pull remote/app:9"
            d.mailbox.set_spec(spec("app:1"))
            stable = await d.wait_phase(Phase.Stable)
            assert trio.current_time() == 5.0
            assert stable.current is not None and stable.current.spec.image == "app:1"


async def test_state_is_flushed_before_every_docker_change(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine(local_images={"app:1", "app:2"})
    with trio.fail_after(1000):
        async with driving(engine) as d:
            d.mailbox.set_spec(spec("app:1"))
            first = await d.wait_phase(Phase.Stable)
            assert first.current is not None
            d.mailbox.set_spec(spec("app:2"))
            await d.wait_phase(Phase.Stable, other_than=first.current.id)
    changes = [c for c in engine.calls if c.split()[0] in ("create", "stop", "remove")]
    for change in changes:
        index = engine.calls.index(change)
        assert "flush" in engine.calls[:index], change
    assert engine.calls[0] == "flush"


async def test_removal_retires_and_ends_the_driver(autojump_clock: trio.testing.MockClock) -> None:
    engine = FakeEngine(local_images={"app:1"})
    store = Store("h")
    mailbox = Mailbox()

    async def flush() -> None:
        await trio.lowlevel.checkpoint()

    ctx = ServiceContext(name="web", host="h", engine=engine, store=store, flush_state=flush)
    mailbox.set_spec(spec("app:1"))
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_service, ctx, mailbox, fsm.ServiceState())
            while (
                entry := store.entries.get("web")
            ) is None or entry.state.phase is not Phase.Stable:
                await store.wait_changed(store.version)
            mailbox.set_spec(None)
        # The nursery closed by itself: the driver returned.
    assert engine.containers == {}
    assert store.entries["web"].state.finished


def test_mailbox_overflow_trades_the_backlog_for_a_resync() -> None:
    mailbox = Mailbox()
    for n in range(MAILBOX_CAPACITY + 1):
        mailbox.put(fsm.ContainerHealthy(f"c{n}"))

    async def first() -> object:
        return await mailbox.get()

    assert isinstance(trio.run(first), ResyncRequested)


@pytest.mark.parametrize("newer", [True, False])
def test_mailbox_keeps_only_the_latest_spec(newer: bool) -> None:
    mailbox = Mailbox()
    mailbox.set_spec(spec("app:1"))
    mailbox.set_spec(spec("app:2") if newer else None)

    async def first() -> object:
        return await mailbox.get()

    assert trio.run(first) == fsm.SpecChanged(spec("app:2") if newer else None)


def test_mailbox_offer_of_the_spec_it_holds_wakes_nothing() -> None:
    """Every snapshot offers every service its spec; an unchanged file parses to the very same
    object, which must not wake the driver (200 drivers woken for nothing made the one that
    changed wait behind them). An equal but new object is delivered: the fsm decides."""
    held = spec("app:1")
    mailbox = Mailbox()
    mailbox.offer_spec(held)
    assert mailbox.take_spec() == fsm.SpecChanged(held)
    mailbox.offer_spec(held)
    assert not mailbox.has_input
    mailbox.offer_spec(spec("app:1"))
    assert mailbox.take_spec() == fsm.SpecChanged(spec("app:1"))
    mailbox.offer_spec(None)
    assert mailbox.take_spec() == fsm.SpecChanged(None)
    mailbox.offer_spec(None)
    assert not mailbox.has_input


async def test_a_hung_pull_times_out_and_retries(autojump_clock: trio.testing.MockClock) -> None:
    engine = FakeEngine(local_images={"app:1"}, registry_images={"app:9"}, pull_hangs=True)
    with trio.fail_after(10_000):
        async with driving(engine) as d:
            d.mailbox.set_spec(spec("remote/app:9"))
            failed = await d.wait_phase(Phase.TryAgain)
            assert trio.current_time() == PULL_LIMIT
            assert failed.error is not None and "took more than" in failed.error.message


async def test_a_create_whose_answer_is_lost_leaks_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine(local_images={"app:1"}, create_answer_lost=True)
    with trio.fail_after(1000):
        async with driving(engine) as d:
            d.mailbox.set_spec(spec("app:1"))
            failed = await d.wait_phase(Phase.TryAgain)
            assert failed.error is not None and "timed out" in failed.error.message
            lost = failed.failed
            assert lost is not None  # found by its name, kept stopped like any failed candidate
            stable = await d.wait_phase(Phase.Stable)
            assert trio.current_time() == 10.0
            await trio.testing.wait_all_tasks_blocked()
            assert stable.current is not None
            assert list(engine.containers) == [stable.current.id]  # the lost one is removed


def running(engine: FakeEngine) -> list[str]:
    return sorted(c.body["Image"] for c in engine.containers.values() if c.running)


def labelled(host: str, image: str, spec_hash: str) -> dict[str, object]:
    return {"Image": image, "Labels": labels.for_container(host, "web", spec_hash)}


async def test_a_deadline_that_passed_while_condo_was_down_never_loses_the_resync(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Restored: TryAgain whose retry time passed while condo was down; meanwhile a labelled
    # container of the service runs that the record does not know (a stray).
    engine = FakeEngine(local_images={"app:1"})
    engine.containers["s1"] = FakeContainer(
        id="s1", name="web_s1", body=labelled("h", "app:1", "old"), running=True
    )
    desired = spec("app:1")
    restored = fsm.ServiceState(phase=Phase.TryAgain, desired=desired, deadline=-5.0, attempt=1)
    with trio.fail_after(1000):
        async with driving(engine, restored, resync=True) as d:
            d.mailbox.set_spec(desired)
            stable = await d.wait_phase(Phase.Stable)
            await trio.testing.wait_all_tasks_blocked()
            assert stable.current is not None
            assert list(engine.containers) == [stable.current.id]  # the stray is gone


async def test_a_deploy_cut_short_by_its_limit_leaves_nothing_running_unknown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The engine starts the container, but its answer comes after condo's limit.
    engine = FakeEngine(local_images={"app:1"}, slow_starts=1, slow_delay=10 * CALL_LIMIT)
    with trio.fail_after(10_000):
        async with driving(engine) as d:
            d.mailbox.set_spec(spec("app:1"))
            failed = await d.wait_phase(Phase.TryAgain)
            assert failed.error is not None and "timed out" in failed.error.message
            stable = await d.wait_phase(Phase.Stable)
            await trio.testing.wait_all_tasks_blocked()
            assert stable.current is not None
            assert running(engine) == ["app:1"]
            assert len(engine.containers) == 1


async def test_a_slow_remove_after_a_stop_never_counts_the_stopped_one_as_serving(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine(local_images={"app:1", "app:2"})
    with trio.fail_after(10_000):
        async with driving(engine) as d:
            d.mailbox.set_spec(spec("app:1"))
            first = await d.wait_phase(Phase.Stable)
            assert first.current is not None
            # [:Before]: the old one stops at once, but its remove answers too late.
            engine.slow_removes, engine.slow_delay = 1, 10 * CALL_LIMIT
            phases: list[Phase] = []
            d.store.subscribe(lambda: phases.append(d.state.phase))
            d.mailbox.set_spec(spec("app:2"))
            second = await d.wait_phase(Phase.Stable, other_than=first.current.id)
            await trio.sleep(LEFTOVER_RESYNC_DELAY)
            await trio.testing.wait_all_tasks_blocked()
            assert second.current is not None and second.current.spec.image == "app:2"
            # The stopped one was removed by the resync that followed; it never counted as
            # serving (a failed attempt would have gone back to it: TryAgainNext).
            assert list(engine.containers) == [second.current.id]
            assert Phase.TryAgainNext not in phases


@pytest.mark.parametrize("resync", [False, True])
async def test_a_container_of_another_host_is_never_touched_whatever_the_record_says(
    autojump_clock: trio.testing.MockClock, resync: bool
) -> None:
    # A record (from somebody else's state file) names a container of host "other".
    engine = FakeEngine(local_images={"app:1"})
    engine.containers["o1"] = FakeContainer(
        id="o1", name="web_o1", body=labelled("other", "app:1", "x"), running=True
    )
    box = fsm.Box(id="o1", name="web_o1", spec=spec("app:1"), created_at=1.0, healthcheck=False)
    record = fsm.ServiceState(phase=Phase.Stable, desired=spec("app:1"), current=box)
    with trio.fail_after(1000):
        async with driving(engine, record, resync=resync) as d:
            d.mailbox.set_spec(None)
            while (entry := d.store.entries.get("web")) is None or not entry.state.finished:
                await d.store.wait_changed(d.store.version)
    assert engine.containers["o1"].running
    assert not [c for c in engine.calls if c.endswith("web_o1")]


async def test_a_container_whose_stop_fails_is_retired_by_a_later_resync(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Found by the fault search: the engine fails the stop of a removed service's container;
    # the driver must not end and forget it.
    engine = FakeEngine(local_images={"app:1"})
    with trio.fail_after(1000):
        async with driving(engine) as d:
            d.mailbox.set_spec(spec("app:1"))
            await d.wait_phase(Phase.Stable)
            engine.failing_stops = 1
            d.mailbox.set_spec(None)
            while (entry := d.store.entries.get("web")) is None or not entry.state.finished:
                await d.store.wait_changed(d.store.version)
            await trio.sleep(LEFTOVER_RESYNC_DELAY + 1)
            await trio.testing.wait_all_tasks_blocked()
    assert engine.containers == {}


async def test_a_finished_record_meeting_its_spec_again_deploys_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Found by the fault search: the service was removed (its record says finished), condo was
    # killed, and the spec file came back while condo was down.
    engine = FakeEngine(local_images={"app:1"})
    finished = fsm.ServiceState(removed=True)
    with trio.fail_after(1000):
        async with driving(engine, finished, resync=True) as d:
            d.mailbox.set_spec(spec("app:1"))
            stable = await d.wait_phase(Phase.Stable)
    assert stable.current is not None and running(engine) == ["app:1"]
