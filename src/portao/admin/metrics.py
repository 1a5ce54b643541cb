"""Prometheus metrics read from the running objects when scraped.

Nothing here runs per message: the gateway, the worker and the brokers keep plain
counters (`GatewayStats`, `WorkerStats`, a backend's `stats`), and these collectors
turn them into metric families at scrape time. The cost of a scrape is one pass
over the open connections (for the bytes buffered) plus the counters.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator, Mapping

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from portao.admin.histogram import LatencyHistogram
from portao.broker.base import Broker
from portao.gateway.server import Gateway
from portao.worker.runner import Worker


class GatewayCollector(Collector):
    """`portao_gateway_*`: connections, messages, errors, latencies of one gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[Metric]:
        gw = self.gateway
        stats = gw.stats
        info = GaugeMetricFamily(
            "portao_gateway_info", "This process's gateway id.", labels=["gateway"]
        )
        info.add_metric([gw.id], 1)
        yield info
        yield _gauge("portao_gateway_ready", "1 while the broker link is up and not draining.",
                     gw.is_ready())
        yield _gauge("portao_gateway_connections_open", "Client connections open.", len(gw.conns))
        yield _counter("portao_gateway_connections_opened", "Connections accepted.", stats.opened)
        yield _counter_by(
            "portao_gateway_connections_closed", "Connections closed, by reason (a bye code, "
            "`shutdown` for the drain, `client` when the peer closed).", "reason",
            stats.close_reasons,
        )
        yield _counter(
            "portao_gateway_connections_rejected",
            "Connections refused with `bye overloaded` (cap reached or draining).",
            stats.rejected_overloaded,
        )
        yield _counter("portao_gateway_slow_consumers", "Connections closed as slow consumers.",
                       stats.slow_consumers)
        yield _counter_by2(
            "portao_gateway_messages_in",
            "Client requests acted on: call/send once the broker accepted them (by route); "
            "auth/sub/unsub with route=\"\".",
            stats.messages_in,
        )
        yield _counter_by2(
            "portao_gateway_messages_out",
            "Messages to clients: reply, ack, and push (by route, once per inbox message).",
            stats.messages_out,
        )
        yield _counter_by(
            "portao_gateway_errors", "Error messages sent to clients, by code: the session's "
            "(bad_request, rate_limited, unauthorized, …) and the broker's or workers' "
            "(unavailable, overloaded, unknown_route, timeout, handler_error, shutdown). "
            "A `bye` is counted in connections_closed instead.", "code", stats.errors,
        )
        yield _gauge("portao_gateway_pending_calls", "Calls waiting for a worker's answer.",
                     len(gw.pending))
        yield _histogram(
            "portao_gateway_call_latency_seconds",
            "From a call's arrival to its reply or error from a worker (timeouts excluded).",
            stats.call_latency,
        )
        yield _histogram(
            "portao_gateway_broker_publish_latency_seconds",
            "Time for the broker to accept a call or send.", stats.publish_latency,
        )
        yield _counter("portao_gateway_broker_publish_failures",
                       "Calls and sends the broker did not accept.", stats.publish_failures)
        yield _counter("portao_gateway_late_replies",
                       "Answers dropped: the call had timed out, or was answered already.",
                       stats.late_replies)
        yield _counter("portao_gateway_dropped_pushes",
                       "Inbox messages for a connection that had closed.", stats.dropped_pushes)
        yield _gauge(
            "portao_gateway_outbound_buffered_bytes",
            "Bytes written to clients and not yet taken by the kernel, all connections.",
            sum(conn.buffered_bytes for conn in gw.conns.values()),
        )
        read_at = stats.inbox_read_at
        yield _gauge(
            "portao_gateway_inbox_lag_seconds",
            "Seconds since the inbox reader last got an answer from the broker (reads wait "
            "at most 1 s, so more means the link is down or the reader is behind).",
            time.monotonic() - read_at if read_at else 0.0,
        )


class WorkerCollector(Collector):
    """`portao_worker_*`: what one worker handled, retried, dead-lettered, and how fast."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def collect(self) -> Iterator[Metric]:
        worker = self.worker
        stats = worker.stats
        yield _gauge("portao_worker_in_flight", "Messages in hand.", worker.in_flight)
        yield _counter("portao_worker_handled", "Messages finished and acknowledged.",
                       stats.handled)
        yield _counter("portao_worker_failed_attempts", "Handler attempts that raised or "
                       "timed out.", stats.failed_attempts)
        yield _counter("portao_worker_retries", "Attempts scheduled again.", stats.retries)
        yield _counter("portao_worker_dead_letters", "Messages moved to the dead-letter queue.",
                       stats.dead_lettered)
        yield _counter("portao_worker_expired_skipped", "Calls not started: deadline passed.",
                       stats.expired_skipped)
        yield _counter("portao_worker_lost_claims", "Results dropped: another worker took the "
                       "message over.", stats.lost_claims)
        yield _counter("portao_worker_late_answers", "Calls answered after their deadline.",
                       stats.late)
        yield _histogram("portao_worker_handler_latency_seconds",
                         "Duration of every handler attempt.", stats.handler_latency)


class BrokerCollector(Collector):
    """`portao_broker_*`: link state, and the backend's own counters where it keeps some."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def collect(self) -> Iterator[Metric]:
        yield _gauge("portao_broker_up", "1 while the broker link is up.", self.broker.is_ready())
        stats = getattr(self.broker, "stats", None)
        if stats is not None and dataclasses.is_dataclass(stats):
            counts = {
                f.name: value
                for f in dataclasses.fields(stats)
                if isinstance(value := getattr(stats, f.name), int)
            }
            yield _counter_by(
                "portao_broker_events", "Backend counters (drops, overflows, reclaims…), by "
                "event.", "event", counts,
            )


def build_registry(
    *,
    gateway: Gateway | None = None,
    worker: Worker | None = None,
    brokers: Iterable[Broker] = (),
) -> CollectorRegistry:
    """A registry of this process's collectors, plus process RSS, CPU and open files."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    if gateway is not None:
        registry.register(GatewayCollector(gateway))
    if worker is not None:
        registry.register(WorkerCollector(worker))
    for broker in brokers:
        registry.register(BrokerCollector(broker))
    return registry


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _counter_by(
    name: str, documentation: str, label: str, values: Mapping[str, int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def _counter_by2(
    name: str, documentation: str, values: Mapping[tuple[str, str], int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=["op", "route"])
    for (op, route), value in sorted(values.items()):
        family.add_metric([op, route], value)
    return family


def _histogram(name: str, documentation: str, hist: LatencyHistogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(
        name, documentation, buckets=hist.cumulative(), sum_value=hist.sum
    )
