"""The worker loop: fetch -> handle -> reply -> ack, with retries, claims and a drain.

`Worker.run` owns one TaskGroup: a task per message in hand, a claim extender, an
ack flusher and a handler watchdog. Messages are acknowledged only after their
handler finished and the reply was written (at-least-once); a failing handler is
retried here with doubling delays while its claim is kept alive, then
dead-lettered; a claim this worker lost drops the result, since another worker
may own the message now. A claim counts as lost when the broker says so, and
also, without asking, once it was not extended for a visibility timeout: a worker
frozen (SIGSTOP) past its claim finds out before it publishes anything.

A handler over `handler_timeout_s` is cancelled by the watchdog, which looks at
every running handler a few times per timeout (`WATCHDOG_TICKS`, at least every
`WATCHDOG_MAX_TICK_S`): one timer for all of them instead of one per message, so
a timeout ends up to a tick late.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field

import msgspec

from portao.admin.histogram import LatencyHistogram
from portao.broker.base import Broker, Delivery, StateStore
from portao.client import Backoff
from portao.config import Settings
from portao.envelope import Envelope, ErrorReply, Reply
from portao.errors import BrokerError, BrokerUnavailable, ConfigError, ErrorCode
from portao.worker.app import App
from portao.worker.context import Context, encode_json
from portao.worker.heap import release_heap, settle_heap

log = logging.getLogger("portao.worker")

#: Longest error text kept in the dead-letter queue.
MAX_ERROR_CHARS = 1000
#: A broker call that failed is tried again after a jittered backoff from this ...
BROKER_RETRY_MIN_S = 0.5
#: ... up to this while registering at start (the broker may stay down for long) ...
BROKER_START_RETRY_MAX_S = 10.0
#: ... or this for fetches and acks, so a worker resumes soon after an outage.
BROKER_RETRY_MAX_S = 2.0
#: A broker call failing again and again is logged at most this often.
BROKER_LOG_EVERY_S = 10.0
#: The handler watchdog looks this many times per handler_timeout_s ...
WATCHDOG_TICKS = 4
#: ... and at least this often.
WATCHDOG_MAX_TICK_S = 0.25


@dataclass(slots=True)
class WorkerStats:
    """Counters for the metrics endpoint; they only grow."""

    handled: int = 0  # finished and acknowledged
    failed_attempts: int = 0  # handler raised or timed out
    retries: int = 0  # attempts scheduled again in this worker
    dead_lettered: int = 0  # attempts spent, moved to the dead-letter queue
    expired_skipped: int = 0  # call not started: its deadline had passed
    lost_claims: int = 0  # result dropped: another worker reclaimed the message
    late: int = 0  # call answered after its deadline (the gateway drops it)
    handler_latency: LatencyHistogram = field(default_factory=LatencyHistogram)  # every attempt


@dataclass(eq=False, slots=True)
class _Job:
    """One message in hand; `lost` once its claim is gone (see `Worker._lost`).

    `claimed` is the loop time the claim was taken or last extended (taken before
    asking the broker, so never later than the broker's own). `due` is the loop
    time its running handler must finish by (inf between attempts); `timed_out`
    is set when the watchdog cancelled it for being late.
    """

    delivery: Delivery
    claimed: float
    lost: bool = False
    due: float = math.inf
    timed_out: bool = False


class Worker:
    """Runs an app's handlers on messages from a broker; one `run` per Worker.

    `fetch_timeout_s` bounds one broker fetch: how soon a stop request is noticed
    while idle, and how long burst mode waits for more work. It is cut to a
    quarter of the visibility timeout: a claim counts from when its fetch was
    asked for (see `_Job`), so a long wait must not eat into it.
    """

    def __init__(
        self,
        app: App,
        broker: Broker,
        state: StateStore,
        settings: Settings,
        *,
        consumer_id: str | None = None,
        fetch_timeout_s: float = 1.0,
    ) -> None:
        self.app = app
        self.broker = broker
        self.state = state
        self.settings = settings
        self.consumer_id = consumer_id or (
            f"{app.name}-{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        )
        self.stats = WorkerStats()
        self._fetch_timeout_s = min(fetch_timeout_s, settings.visibility_timeout_s / 4)
        self._routes = sorted(app.routes)
        self._jobs: dict[_Job, asyncio.Task[None]] = {}
        self._acks: list[Delivery] = []
        self._ack_wanted = asyncio.Event()
        self._wakeup = asyncio.Event()  # a slot freed or a stop was requested
        self._stop = asyncio.Event()
        self._running = False
        self._done = asyncio.Event()

    def __repr__(self) -> str:
        return f"Worker({self.app.name!r}, consumer_id={self.consumer_id!r})"

    @property
    def stopping(self) -> bool:
        """True once a stop was requested: no more fetching, in-hand work drains."""
        return self._stop.is_set()

    @property
    def in_flight(self) -> int:
        """Messages in hand (running, or waiting for a retry)."""
        return len(self._jobs)

    def request_stop(self) -> None:
        """Ask `run` to drain and return; safe from a signal handler."""
        if not self._stop.is_set():
            log.info("worker: shutting down")
        self._stop.set()
        self._wakeup.set()

    async def stop(self) -> None:
        """Request a stop and wait until `run` has drained and returned."""
        self.request_stop()
        if self._running:
            await self._done.wait()

    async def run(self, *, burst: bool = False) -> None:
        """Take and handle messages until stopped (or, with `burst`, until idle).

        Burst mode returns once a fetch brought nothing and nothing is in hand,
        which makes tests deterministic.
        """
        if not self._routes:
            raise ConfigError(f"app {self.app.name!r} has no routes")
        self._running = True
        log.info(
            "worker: app %s, routes %s, concurrency %d",
            self.app.name,
            ", ".join(self._routes),
            self.settings.worker_concurrency,
        )
        try:
            await self._register_routes()
            settle_heap()
            async with asyncio.TaskGroup() as tg:
                loops = [
                    tg.create_task(self._extend_loop(), name="portao-worker-extend"),
                    tg.create_task(self._ack_loop(), name="portao-worker-ack"),
                    tg.create_task(self._watchdog_loop(), name="portao-worker-watchdog"),
                ]
                await self._fetch_loop(tg, burst)
                await self._drain()
                for loop in loops:
                    loop.cancel()
            try:
                await self._flush_acks()
            except BrokerError as exc:
                log.warning(
                    "final ack of %d messages failed (redelivered later): %s", len(self._acks), exc
                )
        finally:
            release_heap()
            self._running = False
            self._done.set()

    # -- the loops -------------------------------------------------------------

    async def _register_routes(self) -> None:
        """Announce the routes, waiting out a broker that is not up yet."""
        retries = _Retries("route registration", BROKER_START_RETRY_MAX_S)
        while not self.stopping:
            try:
                await self.broker.register_routes(self._routes)
            except BrokerError as exc:
                await self._sleep_unless_stopping(retries.failed(exc))
            else:
                retries.succeeded()
                return

    async def _fetch_loop(self, tg: asyncio.TaskGroup, burst: bool) -> None:
        loop = asyncio.get_running_loop()
        retries = _Retries("fetch", BROKER_RETRY_MAX_S)
        while not self.stopping:
            self._wakeup.clear()
            free = self.settings.worker_concurrency - len(self._jobs)
            if free <= 0:
                await self._wakeup.wait()
                continue
            asked = loop.time()
            try:
                deliveries = await self.broker.fetch(
                    self.consumer_id, self._routes, free, self._fetch_timeout_s
                )
            except BrokerError as exc:
                await self._sleep_unless_stopping(retries.failed(exc))
                continue
            retries.succeeded()
            for delivery in deliveries:
                job = _Job(delivery, asked)
                self._jobs[job] = tg.create_task(self._handle(job))
            if burst and not deliveries and not self._jobs:
                return

    async def _drain(self) -> None:
        """Let handlers in hand finish up to the drain deadline; abandon the rest."""
        if not self._jobs:
            return
        tasks = list(self._jobs.values())
        log.info("draining %d messages (up to %.1f s)", len(tasks), self.settings.drain_timeout_s)
        _, pending = await asyncio.wait(tasks, timeout=self.settings.drain_timeout_s)
        if pending:
            # Not acked and no longer extended: another worker reclaims them.
            log.warning("abandoning %d unfinished messages at drain deadline", len(pending))
            for task in pending:
                task.cancel()

    async def _extend_loop(self) -> None:
        """Keep claims on messages in hand alive, in one batched call per period."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.settings.visibility_timeout_s / 3)
            jobs = [job for job in self._jobs if not job.lost]
            if not jobs:
                continue
            asked = loop.time()
            try:
                lost = await self.broker.extend(self.consumer_id, [j.delivery for j in jobs])
            except BrokerError as exc:
                log.warning("claim extension of %d messages failed: %s", len(jobs), exc)
                continue
            for job in jobs:
                if job.delivery in lost:
                    job.lost = True
                    log.warning("lost the claim on message %s", job.delivery.envelope.id)
                else:
                    job.claimed = asked

    async def _watchdog_loop(self) -> None:
        """Cancel the handlers that are past their time (see the module docstring)."""
        limit = self.settings.handler_timeout_s
        tick = min(limit / WATCHDOG_TICKS, WATCHDOG_MAX_TICK_S)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            for job, task in self._jobs.items():
                if job.due <= now and not job.timed_out:
                    job.timed_out = True
                    task.cancel()

    async def _ack_loop(self) -> None:
        """Acknowledge finished messages in batches: whatever piled up meanwhile."""
        retries = _Retries("ack", BROKER_RETRY_MAX_S)
        while True:
            await self._ack_wanted.wait()
            self._ack_wanted.clear()
            try:
                await self._flush_acks()
            except BrokerError as exc:
                self._ack_wanted.set()
                await asyncio.sleep(retries.failed(exc))
            else:
                retries.succeeded()

    async def _flush_acks(self) -> None:
        if not self._acks:
            return
        batch, self._acks = self._acks, []
        try:
            await self.broker.ack(self.consumer_id, batch)
        except BaseException:
            self._acks[:0] = batch
            raise

    # -- one message -----------------------------------------------------------

    async def _handle(self, job: _Job) -> None:
        try:
            await self._process(job)
        except BrokerError as exc:
            # Not acked: the message comes back after the visibility timeout.
            log.warning(
                "message %s released after a broker error: %s", job.delivery.envelope.id, exc
            )
        finally:
            del self._jobs[job]
            self._wakeup.set()

    async def _process(self, job: _Job) -> None:
        delivery = job.delivery
        env = delivery.envelope
        max_attempts = self.settings.max_attempts
        if delivery.deliveries > max_attempts:
            await self._give_up(
                job,
                delivery.deliveries - 1,
                f"handler_error: delivered {delivery.deliveries} times, "
                f"more than max_attempts={max_attempts}",
            )
            return
        if _is_expired(env):
            self.stats.expired_skipped += 1
            self._ack(delivery)
            return
        attempt = delivery.deliveries
        while True:
            if self._lost(job):
                return
            try:
                reply = await self._attempt(job, attempt)
                break
            except BrokerUnavailable:
                # The broker failed under the handler (ctx.once, a push…): not the
                # handler's fault, so no attempt spent; the message is released.
                raise
            except _Undecodable as exc:
                # No retry can decode it: dead-lettered at once.
                await self._give_up(job, attempt, str(exc), answer=str(exc))
                return
            except Exception as exc:
                self.stats.failed_attempts += 1
                if attempt >= max_attempts:
                    await self._give_up(job, attempt, f"{type(exc).__name__}: {exc}", exc=exc)
                    return
                # One line per retry; the traceback comes once, with the dead letter.
                log.warning(
                    "handler for route %s failed on message %s (attempt %d/%d), retrying: %s: %s",
                    env.route,
                    env.id,
                    attempt,
                    max_attempts,
                    type(exc).__name__,
                    exc,
                )
            self.stats.retries += 1
            await asyncio.sleep(self.settings.retry_delay_s * 2 ** (attempt - delivery.deliveries))
            attempt += 1
        if self._lost(job):
            return
        if reply is not None:
            if _is_expired(env):
                self.stats.late += 1
            await self.broker.send_to_gateway(
                env.gateway, Reply(ref=env.id, conn=env.conn, data=reply)
            )
        self.stats.handled += 1
        self._ack(delivery)

    async def _attempt(self, job: _Job, attempt: int) -> bytes | None:
        """Run the handler once; the encoded reply for a call, None for a send."""
        env = job.delivery.envelope
        handler = self.app.routes[env.route]
        try:
            data = msgspec.json.decode(env.data)
        except msgspec.DecodeError as exc:
            raise _Undecodable(f"data for route {env.route} cannot be decoded: {exc}") from None
        ctx = Context(env, attempt, self.broker, self.state)
        limit = self.settings.handler_timeout_s
        started = time.monotonic()
        job.due = asyncio.get_running_loop().time() + limit
        try:
            result = await handler(ctx, data)
        except asyncio.CancelledError:
            if job.timed_out:
                job.timed_out = False
                # The watchdog's cancel is a timeout, unless the task is being stopped too.
                if self._jobs[job].uncancel() == 0:
                    raise TimeoutError(f"handler timed out after {limit:g} s") from None
            raise
        finally:
            job.due = math.inf
            if job.timed_out:  # the handler swallowed the watchdog's cancel
                job.timed_out = False
                self._jobs[job].uncancel()
            self.stats.handler_latency.observe(time.monotonic() - started)
        return encode_json(result) if env.kind == "call" else None

    async def _give_up(
        self,
        job: _Job,
        attempts: int,
        error: str,
        *,
        answer: str | None = None,
        exc: BaseException | None = None,
    ) -> None:
        """Answer a call with `handler_error`, then dead-letter the message with `error`.

        `answer` is the caller's message (default: the attempts failed); `exc`, the
        last failure, is logged with its traceback.
        """
        if self._lost(job):
            return
        env = job.delivery.envelope
        log.error(
            "message %s for route %s dead-lettered after attempt %d: %s",
            env.id,
            env.route,
            attempts,
            error,
            exc_info=exc,
        )
        if env.kind == "call":
            message = answer
            if message is None:
                plural = "" if attempts == 1 else "s"
                message = f"handler for route {env.route} failed after {attempts} attempt{plural}"
            await self.broker.send_to_gateway(
                env.gateway,
                ErrorReply(
                    ref=env.id, conn=env.conn, code=ErrorCode.HANDLER_ERROR.value, message=message
                ),
            )
        await self.broker.dead_letter(self.consumer_id, job.delivery, error[:MAX_ERROR_CHARS])
        self.stats.dead_lettered += 1

    def _lost(self, job: _Job) -> bool:
        """Whether the claim is gone, so nothing may be published or acked: the
        broker said so, or it was not extended for a visibility timeout (the
        broker may have handed the message to another worker). Counted and logged."""
        age = asyncio.get_running_loop().time() - job.claimed
        if not job.lost and age < self.settings.visibility_timeout_s:
            return False
        job.lost = True
        self.stats.lost_claims += 1
        log.info(
            "dropping the result of message %s for route %s: claim lost (last extended %.1f s ago)",
            job.delivery.envelope.id,
            job.delivery.envelope.route,
            age,
        )
        return True

    def _ack(self, delivery: Delivery) -> None:
        self._acks.append(delivery)
        self._ack_wanted.set()

    async def _sleep_unless_stopping(self, delay_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay_s):
                await self._stop.wait()


class _Retries:
    """A broker call that fails again and again: the backoff before each retry, and a
    warning for the first failure, then at most every `BROKER_LOG_EVERY_S`."""

    def __init__(self, what: str, cap_s: float) -> None:
        self._what = what
        self._backoff = Backoff(base_s=BROKER_RETRY_MIN_S, cap_s=cap_s)
        self._logged_at = -math.inf

    def failed(self, exc: BrokerError) -> float:
        """Count a failure (logged when due); the delay before the next try."""
        delay_s = self._backoff.next_delay_s()
        now = time.monotonic()
        if now - self._logged_at >= BROKER_LOG_EVERY_S:
            self._logged_at = now
            log.warning(
                "%s failed (%d in a row), retrying in %.1f s: %s",
                self._what,
                self._backoff.attempt,
                delay_s,
                exc,
            )
        return delay_s

    def succeeded(self) -> None:
        """The call worked: a later failure starts over (logged at once)."""
        if self._backoff.attempt:
            log.info("%s works again after %d failures", self._what, self._backoff.attempt)
            self._backoff.reset()
            self._logged_at = -math.inf


class _Undecodable(Exception):
    """A message whose data the worker cannot decode: no retry can change that."""


def _is_expired(env: Envelope) -> bool:
    """A call whose caller has stopped waiting (sends never expire)."""
    return env.kind == "call" and env.deadline is not None and env.deadline <= time.time()
