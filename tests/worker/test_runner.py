"""The runner against the real MemoryBroker, with the test acting as the gateway."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from portao.broker.base import Delivery
from portao.broker.memory import MemoryBroker
from portao.config import Settings
from portao.envelope import ErrorReply, Join, Reply
from portao.errors import BrokerUnavailable, ConfigError, UnknownRoute
from portao.worker import App, Context, Worker
from tests.worker.harness import (
    FakeClock,
    HandGateway,
    assert_settled,
    memory_broker,
    running,
    setup,
)

MakeSettings = Callable[..., Settings]


def echo_app() -> App:
    app = App("t")

    @app.route("echo")
    async def echo(ctx: Context, data: Any) -> Any:
        return data

    return app


async def test_call_gets_its_reply_then_is_acked(make_settings: MakeSettings) -> None:
    clock = FakeClock()
    async with setup(make_settings, echo_app(), clock) as (broker, gw, worker):
        env = await gw.publish("echo", {"x": [1, "two", None]}, conn=7)
        await worker.run(burst=True)
        [reply] = await gw.read(1)
        assert reply == Reply(ref=env.id, conn=7, data=b'{"x":[1,"two",null]}')
        assert worker.stats.handled == 1
        # Acked: nothing comes back even after the visibility timeout.
        await assert_settled(broker, clock, "echo")


async def test_send_is_acked_without_reply(make_settings: MakeSettings) -> None:
    seen: list[Any] = []
    app = App()

    @app.route("note")
    async def note(ctx: Context, data: Any) -> Any:
        seen.append(data)
        return {"ignored": True}

    clock = FakeClock()
    async with setup(make_settings, app, clock) as (broker, gw, worker):
        await gw.publish("note", "hello", kind="send")
        await worker.run(burst=True)
        await gw.nothing()
        assert seen == ["hello"]
        assert worker.stats.handled == 1
        await assert_settled(broker, clock, "note")


async def test_retries_with_attempt_and_doubling_delay(make_settings: MakeSettings) -> None:
    attempts: list[tuple[int, float]] = []
    app = App()

    @app.route("flaky")
    async def flaky(ctx: Context, data: Any) -> Any:
        attempts.append((ctx.attempt, time.monotonic()))
        if ctx.attempt < 3:
            raise RuntimeError("not yet")
        return "ok"

    async with setup(make_settings, app, retry_delay_s=0.1) as (_, gw, worker):
        env = await gw.publish("flaky")
        await worker.run(burst=True)
        assert await gw.read(1) == [Reply(ref=env.id, conn=1, data=b'"ok"')]
    assert [n for n, _ in attempts] == [1, 2, 3]
    first_gap = attempts[1][1] - attempts[0][1]
    second_gap = attempts[2][1] - attempts[1][1]
    # Lower bounds prove the doubling; upper ones are slack. uvloop's timers count
    # whole milliseconds from the loop's cached time, so one may fire a little early.
    assert 0.098 <= first_gap < 0.6  # upper bounds: generous for a loaded CI machine
    assert 0.198 <= second_gap < 0.7
    assert (worker.stats.failed_attempts, worker.stats.retries, worker.stats.handled) == (2, 2, 1)


async def test_dead_letter_and_handler_error_after_max_attempts(
    make_settings: MakeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []
    app = App()

    @app.route("boom")
    async def boom(ctx: Context, data: Any) -> Any:
        calls.append(ctx.attempt)
        raise RuntimeError("secret detail")

    clock = FakeClock()
    async with setup(make_settings, app, clock, max_attempts=3) as (broker, gw, worker):
        env = await gw.publish("boom", {"card": "4111"})
        with caplog.at_level(logging.WARNING, logger="portao.worker"):
            await worker.run(burst=True)
        [error] = await gw.read(1)
        assert error == ErrorReply(
            ref=env.id,
            conn=1,
            code="handler_error",
            message="handler for route boom failed after 3 attempts",
        )
        [dead] = await broker.dead_letters("boom")
        assert dead.envelope.id == env.id
        assert dead.error == "RuntimeError: secret detail"
        await assert_settled(broker, clock, "boom")
    assert calls == [1, 2, 3]
    assert worker.stats.dead_lettered == 1
    assert worker.stats.failed_attempts == 3
    assert env.id in caplog.text
    assert "4111" not in caplog.text
    # One line per retry; the traceback once, with the dead letter.
    logged = [(r.levelno, r.exc_info is not None) for r in caplog.records]
    assert logged == [(logging.WARNING, False), (logging.WARNING, False), (logging.ERROR, True)]
    assert "(attempt 1/3), retrying: RuntimeError: secret detail" in caplog.records[0].message


async def test_undecodable_data_is_dead_lettered_at_once(
    make_settings: MakeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """Data the worker cannot decode (a number too big for a double) can never
    succeed: no retries, straight to the dead letters, the caller gets handler_error."""
    runs: list[Any] = []
    app = App()

    @app.route("sum")
    async def add(ctx: Context, data: Any) -> Any:
        runs.append(data)

    clock = FakeClock()
    async with setup(make_settings, app, clock, max_attempts=3) as (broker, gw, worker):
        env = msgspec.structs.replace(gw.envelope("sum"), data=b'{"n": 1e400}')
        await broker.publish(env)
        with caplog.at_level(logging.WARNING, logger="portao.worker"):
            await worker.run(burst=True)
        expected = "data for route sum cannot be decoded: Number out of range - at `$[...]`"
        assert await gw.read(1) == [
            ErrorReply(ref=env.id, conn=1, code="handler_error", message=expected)
        ]
        [dead] = await broker.dead_letters("sum")
        assert (dead.envelope.id, dead.error) == (env.id, expected)
        await assert_settled(broker, clock, "sum")
    assert runs == []
    assert (worker.stats.dead_lettered, worker.stats.retries) == (1, 0)
    assert [(r.levelno, r.exc_info) for r in caplog.records] == [(logging.ERROR, None)]


async def test_handler_timeout_is_a_failure(make_settings: MakeSettings) -> None:
    app = App()

    @app.route("stuck")
    async def stuck(ctx: Context, data: Any) -> Any:
        await asyncio.Event().wait()

    settings = {"max_attempts": 1, "handler_timeout_s": 0.05}
    async with setup(make_settings, app, **settings) as (broker, gw, worker):
        env = await gw.publish("stuck")
        await worker.run(burst=True)
        [error] = await gw.read(1)
        assert isinstance(error, ErrorReply)
        assert (error.ref, error.code) == (env.id, "handler_error")
        [dead] = await broker.dead_letters("stuck")
        assert dead.error == "TimeoutError: handler timed out after 0.05 s"


async def test_a_swallowed_timeout_leaves_the_next_attempt_its_own(
    make_settings: MakeSettings,
) -> None:
    """The watchdog's cancel, swallowed by attempt 1, is not left pending: attempt 2's
    timeout is a timeout again (dead-lettered), not a stop of the worker."""
    app = App()

    @app.route("stubborn")
    async def stubborn(ctx: Context, data: Any) -> Any:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if ctx.attempt == 1:
                raise RuntimeError("gave up") from None
            raise

    settings = {"max_attempts": 2, "handler_timeout_s": 0.05, "retry_delay_s": 0.01}
    async with setup(make_settings, app, **settings) as (broker, gw, worker):
        env = await gw.publish("stubborn")
        await worker.run(burst=True)
        [error] = await gw.read(1)
        assert isinstance(error, ErrorReply)
        assert (error.ref, error.code) == (env.id, "handler_error")
        [dead] = await broker.dead_letters("stubborn")
        assert dead.error == "TimeoutError: handler timed out after 0.05 s"
        assert worker.stats.failed_attempts == 2


async def test_unencodable_return_is_a_failure(make_settings: MakeSettings) -> None:
    app = App()

    @app.route("odd")
    async def odd(ctx: Context, data: Any) -> Any:
        return object()

    async with setup(make_settings, app, max_attempts=1) as (broker, gw, worker):
        await gw.publish("odd")
        await worker.run(burst=True)
        [error] = await gw.read(1)
        assert isinstance(error, ErrorReply)
        [dead] = await broker.dead_letters("odd")
        assert dead.error.startswith("TypeError: value is not JSON-encodable")


async def test_expired_call_is_skipped_and_acked(make_settings: MakeSettings) -> None:
    ran: list[str] = []
    app = App()

    @app.route("late")
    async def late(ctx: Context, data: Any) -> Any:
        ran.append(ctx.id)

    clock = FakeClock()
    async with setup(make_settings, app, clock) as (broker, gw, worker):
        await gw.publish("late", deadline=time.time() - 1)
        await gw.publish("late", kind="send")  # sends have no deadline
        await worker.run(burst=True)
        await gw.nothing()
        await assert_settled(broker, clock, "late")
    assert len(ran) == 1
    assert worker.stats.expired_skipped == 1


async def test_too_many_deliveries_go_straight_to_dead_letters(
    make_settings: MakeSettings,
) -> None:
    ran: list[str] = []
    app = App()

    @app.route("poison")
    async def poison(ctx: Context, data: Any) -> Any:
        ran.append(ctx.id)

    clock = FakeClock()
    async with setup(make_settings, app, clock, max_attempts=1) as (broker, gw, worker):
        env = await gw.publish("poison")
        # A worker that died holding it: delivered once, never acked, claim lapsed.
        [first] = await broker.fetch("dead-worker", ["poison"], 1, 0)
        assert first.deliveries == 1
        clock.advance(10)
        await worker.run(burst=True)
        [error] = await gw.read(1)
        assert error == ErrorReply(
            ref=env.id,
            conn=1,
            code="handler_error",
            message="handler for route poison failed after 1 attempt",
        )
        [dead] = await broker.dead_letters("poison")
        assert dead.error.startswith("handler_error: delivered 2 times")
    assert ran == []


async def test_concurrency_limit(make_settings: MakeSettings) -> None:
    running_now = peak = 0
    full = asyncio.Event()
    release = asyncio.Event()
    app = App()

    @app.route("work")
    async def work(ctx: Context, data: Any) -> Any:
        nonlocal running_now, peak
        running_now += 1
        peak = max(peak, running_now)
        if running_now == 3:
            full.set()
        await release.wait()
        running_now -= 1

    async with setup(make_settings, app, worker_concurrency=3) as (_broker, gw, worker):
        for _ in range(7):
            await gw.publish("work", kind="send")
        run = asyncio.create_task(worker.run(burst=True))
        await asyncio.wait_for(full.wait(), 3)
        assert worker.in_flight == 3
        release.set()
        await asyncio.wait_for(run, 3)
    assert peak == 3
    assert worker.stats.handled == 7


async def test_join_reaches_the_inbox_before_the_reply(make_settings: MakeSettings) -> None:
    app = App()

    @app.route("enter")
    async def enter(ctx: Context, data: Any) -> Any:
        await ctx.join("lobby")
        return "in"

    async with setup(make_settings, app) as (broker, gw, worker):
        env = await gw.publish("enter", user="bob", conn=4)
        await worker.run(burst=True)
        assert await gw.read(2) == [
            Join(conn=4, room="lobby", user="bob"),
            Reply(ref=env.id, conn=4, data=b'"in"'),
        ]
        [member] = await broker.room_members("lobby")
        assert (member.gateway, member.conn, member.user) == (gw.id, 4, "bob")


class FrozenExtend:
    """The real broker, except that `extend` hangs until `thaw`: a frozen worker."""

    def __init__(self, broker: Any) -> None:
        self._broker = broker
        self._thawed = asyncio.Event()
        self.lost: list[Delivery] = []
        self.reported = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._broker, name)

    def thaw(self) -> None:
        self._thawed.set()

    async def extend(self, consumer: str, deliveries: list[Delivery]) -> list[Delivery]:
        await self._thawed.wait()
        lost = await self._broker.extend(consumer, deliveries)
        if lost:
            self.lost += lost
            self.reported.set()
        return list(lost)


async def test_lost_claim_drops_the_result(make_settings: MakeSettings) -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    app = App()

    @app.route("slow")
    async def slow(ctx: Context, data: Any) -> Any:
        started.set()
        await release.wait()
        return "too late"

    clock = FakeClock()
    settings = make_settings(visibility_timeout_s=0.3)
    async with memory_broker(settings, clock) as broker:
        await broker.register_routes(["slow"])
        frozen = FrozenExtend(broker)
        worker = Worker(app, frozen, broker, settings, consumer_id="a", fetch_timeout_s=0.05)
        gw = HandGateway(broker)
        await gw.open()
        env = await gw.publish("slow")
        async with running(worker):
            await asyncio.wait_for(started.wait(), 3)
            clock.advance(1)  # frozen past the visibility timeout
            [taken] = await broker.fetch("b", ["slow"], 1, 0)
            assert (taken.envelope.id, taken.deliveries) == (env.id, 2)
            frozen.thaw()
            await asyncio.wait_for(frozen.reported.wait(), 3)
            release.set()
            await worker.stop()  # drains: the handler finishes, its result is dropped
            await gw.nothing()
            assert worker.stats.lost_claims == 1
            assert worker.stats.handled == 0
            await broker.ack("b", [taken])


async def test_message_after_a_long_idle_fetch_is_not_taken_for_lost(
    make_settings: MakeSettings,
) -> None:
    """A claim counts from when its fetch was asked for: an idle fetch must not
    outlast the visibility timeout, or what it brings would look lapsed."""
    settings = make_settings(visibility_timeout_s=0.4)
    async with memory_broker(settings) as broker:
        await broker.register_routes(["echo"])
        worker = Worker(echo_app(), broker, broker, settings, fetch_timeout_s=30)
        gw = HandGateway(broker)
        await gw.open()
        async with running(worker):
            await asyncio.sleep(0.6)  # idle, past one visibility timeout
            env = await gw.publish("echo", "fresh")
            assert await gw.read(1) == [Reply(ref=env.id, conn=1, data=b'"fresh"')]
        assert worker.stats.lost_claims == 0


async def test_stop_waits_for_the_handler_in_flight(make_settings: MakeSettings) -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    app = App()

    @app.route("slow")
    async def slow(ctx: Context, data: Any) -> Any:
        started.set()
        await release.wait()
        return "done"

    # One slot: while the handler runs, the worker waits for a free slot, not in a
    # fetch, so a stop request is seen before anything else is taken.
    async with setup(make_settings, app, worker_concurrency=1) as (broker, gw, worker):
        env = await gw.publish("slow")
        run = asyncio.create_task(worker.run())
        await asyncio.wait_for(started.wait(), 3)
        stop = asyncio.create_task(worker.stop())
        await asyncio.sleep(0)  # let stop() run up to its wait
        assert worker.stopping
        await gw.publish("slow")  # not taken any more
        release.set()
        await asyncio.wait_for(stop, 3)
        assert run.done()
        await run
        assert await gw.read(1) == [Reply(ref=env.id, conn=1, data=b'"done"')]
        assert worker.stats.handled == 1
        [left] = await broker.fetch("other", ["slow"], 10, 0)
        assert left.deliveries == 1


async def test_stop_abandons_what_outlives_the_drain(make_settings: MakeSettings) -> None:
    started = asyncio.Event()
    app = App()

    @app.route("stuck")
    async def stuck(ctx: Context, data: Any) -> Any:
        started.set()
        await asyncio.Event().wait()

    clock = FakeClock()
    async with setup(make_settings, app, clock, drain_timeout_s=0.05) as (broker, gw, worker):
        env = await gw.publish("stuck")
        run = asyncio.create_task(worker.run())
        await asyncio.wait_for(started.wait(), 3)
        await asyncio.wait_for(worker.stop(), 3)
        await run
        await gw.nothing()
        # Not acked: another worker gets it once the claim lapses.
        clock.advance(10)
        [again] = await broker.fetch("other", ["stuck"], 1, 0)
        assert (again.envelope.id, again.deliveries) == (env.id, 2)


async def test_burst_returns_when_idle(make_settings: MakeSettings) -> None:
    async with setup(make_settings, echo_app()) as (_, _gw, worker):
        await asyncio.wait_for(worker.run(burst=True), 1)
        assert worker.stats == type(worker.stats)()


async def test_messages_decode_from_json(make_settings: MakeSettings) -> None:
    got: list[Any] = []
    app = App()

    @app.route("types")
    async def types(ctx: Context, data: Any) -> Any:
        got.append(data)

    async with setup(make_settings, app) as (_, gw, worker):
        env = gw.envelope("types", kind="send")
        await gw.broker.publish(msgspec.structs.replace(env, data=b'{"a": 1.5, "b": [true]}'))
        await worker.run(burst=True)
    assert got == [{"a": 1.5, "b": [True]}]


async def test_app_without_routes_is_refused(make_settings: MakeSettings) -> None:
    settings = make_settings()
    async with memory_broker(settings) as broker:
        with pytest.raises(ConfigError, match="has no routes"):
            await Worker(App("empty"), broker, broker, settings).run(burst=True)


async def test_late_answer_is_sent_and_counted(make_settings: MakeSettings) -> None:
    app = App()

    @app.route("slowpoke")
    async def slowpoke(ctx: Context, data: Any) -> Any:
        assert ctx.deadline is not None
        await asyncio.sleep(max(0.0, ctx.deadline - time.time()) + 0.01)
        return "late"

    async with setup(make_settings, app) as (_, gw, worker):
        env = await gw.publish("slowpoke", deadline=time.time() + 0.05)
        await worker.run(burst=True)
        assert await gw.read(1) == [Reply(ref=env.id, conn=1, data=b'"late"')]
    assert worker.stats.late == 1


async def test_failed_send_is_dead_lettered_without_reply(make_settings: MakeSettings) -> None:
    app = App()

    @app.route("oops")
    async def oops(ctx: Context, data: Any) -> Any:
        raise TimeoutError("the handler's own timeout")

    async with setup(make_settings, app, max_attempts=1) as (broker, gw, worker):
        await gw.publish("oops", kind="send")
        await worker.run(burst=True)
        await gw.nothing()
        [dead] = await broker.dead_letters("oops")
        assert dead.error == "TimeoutError: the handler's own timeout"


async def test_claim_lost_while_waiting_to_retry(make_settings: MakeSettings) -> None:
    attempts: list[int] = []
    failed = asyncio.Event()
    app = App()

    @app.route("flaky")
    async def flaky(ctx: Context, data: Any) -> Any:
        attempts.append(ctx.attempt)
        failed.set()
        raise RuntimeError("once")

    clock = FakeClock()
    settings = make_settings(visibility_timeout_s=0.3, retry_delay_s=0.3)
    async with memory_broker(settings, clock) as broker:
        await broker.register_routes(["flaky"])
        frozen = FrozenExtend(broker)
        worker = Worker(app, frozen, broker, settings, fetch_timeout_s=0.05)
        gw = HandGateway(broker)
        await gw.open()
        await gw.publish("flaky")
        async with running(worker):
            await asyncio.wait_for(failed.wait(), 3)
            clock.advance(1)
            [taken] = await broker.fetch("b", ["flaky"], 1, 0)
            frozen.thaw()
            await asyncio.wait_for(frozen.reported.wait(), 3)
        await gw.nothing()
        assert attempts == [1]
        assert worker.stats.lost_claims == 1
        assert await broker.dead_letters("flaky") == []
        await broker.ack("b", [taken])


async def test_worker_rides_out_a_broker_outage(make_settings: MakeSettings) -> None:
    link_dropped = asyncio.Event()
    app = App()

    @app.route("echo")
    async def echo(ctx: Context, data: Any) -> Any:
        if not link_dropped.is_set():
            await broker.aclose()  # the link drops before the reply can be written
            link_dropped.set()
        return data

    clock = FakeClock()
    async with setup(make_settings, app, clock) as (broker, gw, worker):
        env = await gw.publish("echo", 1)
        async with running(worker):
            await asyncio.wait_for(link_dropped.wait(), 3)
            await broker.connect()
            clock.advance(10)  # the unacked message comes back after its claim lapses
            assert await gw.read(1) == [Reply(ref=env.id, conn=1, data=b"1")]
            later = await gw.publish("echo", 2)
            assert await gw.read(1) == [Reply(ref=later.id, conn=1, data=b"2")]
        await assert_settled(broker, clock, "echo")
    assert worker.stats.handled == 2


async def test_broker_failing_under_the_handler_spends_no_attempt(
    make_settings: MakeSettings,
) -> None:
    """`ctx.once` during an outage raises BrokerUnavailable: not the handler's fault,
    so no retry here and no attempt counted; the message is released and comes back."""
    runs: list[int] = []
    went_down = asyncio.Event()
    app = App()

    @app.route("guarded")
    async def guarded(ctx: Context, data: Any) -> Any:
        runs.append(ctx.attempt)
        if len(runs) == 1:
            await broker.aclose()  # the link drops under the handler
            went_down.set()
        return await ctx.once("effect")

    clock = FakeClock()
    async with setup(make_settings, app, clock, max_attempts=2) as (broker, gw, worker):
        env = await gw.publish("guarded")
        async with running(worker):
            await asyncio.wait_for(went_down.wait(), 3)
            await broker.connect()
            await asyncio.sleep(0.3)  # a retry here would come after retry_delay_s = 0.05 s
            assert runs == [1]
            assert (worker.stats.failed_attempts, worker.stats.retries) == (0, 0)
            clock.advance(10)  # released: the message comes back once its claim lapses
            assert await gw.read(1) == [Reply(ref=env.id, conn=1, data=b"true")]
        assert runs == [1, 2]
        assert await broker.dead_letters("guarded") == []
        await assert_settled(broker, clock, "guarded")


class FlakyAck:
    """The real broker, except that the first `ack` fails as if the link dropped."""

    def __init__(self, broker: Any) -> None:
        self._broker = broker
        self.failures = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._broker, name)

    async def ack(self, consumer: str, deliveries: list[Delivery]) -> None:
        if not self.failures:
            self.failures += 1
            raise BrokerUnavailable("ack not confirmed")
        await self._broker.ack(consumer, deliveries)


async def test_failed_ack_is_retried(make_settings: MakeSettings) -> None:
    clock = FakeClock()
    settings = make_settings()
    async with memory_broker(settings, clock) as broker:
        await broker.register_routes(["echo"])
        flaky = FlakyAck(broker)
        worker = Worker(echo_app(), flaky, broker, settings, fetch_timeout_s=0.05)
        gw = HandGateway(broker)
        await gw.open()
        await gw.publish("echo", "x")
        async with running(worker):
            await gw.read(1)
        assert flaky.failures == 1
        await assert_settled(broker, clock, "echo")


async def test_worker_waits_for_a_broker_that_is_not_up_yet(make_settings: MakeSettings) -> None:
    settings = make_settings()
    broker = MemoryBroker(settings, clock=FakeClock())  # not connected: every call fails
    worker = Worker(echo_app(), broker, broker, settings, fetch_timeout_s=0.05)
    async with running(worker):
        await asyncio.sleep(0)  # the worker's first registration fails
        await broker.connect()
        gw = HandGateway(broker)
        await gw.open()
        async with asyncio.timeout(3):
            while True:  # the route exists once the worker's retry registered it
                try:
                    env = await gw.publish("echo", "up")
                    break
                except UnknownRoute:
                    await asyncio.sleep(0.05)
        assert await gw.read(1) == [Reply(ref=env.id, conn=1, data=b'"up"')]
    await broker.aclose()


class CountingRegistration:
    """The real broker, counting the worker's attempts to register its routes."""

    def __init__(self, broker: Any) -> None:
        self._broker = broker
        self.attempts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._broker, name)

    async def register_routes(self, routes: Any) -> None:
        self.attempts += 1
        await self._broker.register_routes(routes)


async def test_broker_down_at_start_backs_off_and_logs_sparsely(
    make_settings: MakeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """Registration retries back off (0.5 s, 1 s, 2 s, … jittered); one warning, not
    one per try; the start and the stop are logged."""
    settings = make_settings()
    broker = MemoryBroker(settings, clock=FakeClock())  # not connected: every call fails
    counting = CountingRegistration(broker)
    worker = Worker(echo_app(), counting, broker, settings, fetch_timeout_s=0.05)
    with caplog.at_level(logging.INFO, logger="portao.worker"):
        async with running(worker):
            await asyncio.sleep(1.7)  # tries at 0, 0.5-0.6 and 1.5-1.8 s (fixed 0.5 s: 4)
            assert 2 <= counting.attempts <= 3
    start, failed, stop = caplog.records
    assert (start.levelno, start.message) == (
        logging.INFO,
        "worker: app t, routes echo, concurrency 100",
    )
    assert failed.levelno == logging.WARNING
    assert re.fullmatch(
        r"route registration failed \(1 in a row\), retrying in 0\.[56] s: "
        r"memory broker is not connected",
        failed.message,
    )
    assert (stop.levelno, stop.message) == (logging.INFO, "worker: shutting down")
