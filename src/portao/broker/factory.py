"""Pick a backend by URL scheme."""

from __future__ import annotations

from urllib.parse import urlsplit

from portao.broker.base import Broker, StateStore
from portao.config import Settings, mask_url
from portao.errors import ConfigError


def create_broker(url: str, settings: Settings) -> Broker:
    """A broker for `memory://`, `redis://`/`rediss://` or `amqp://`/`amqps://`."""
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        from portao.broker.memory import MemoryBroker

        return MemoryBroker(settings)
    if scheme in ("redis", "rediss"):
        from portao.broker.redis import RedisBroker

        return RedisBroker(url, settings)
    if scheme in ("amqp", "amqps"):
        from portao.broker.amqp import AmqpBroker

        return AmqpBroker(url, settings)
    raise ConfigError(f"broker: unsupported URL scheme {scheme!r} in {mask_url(url)!r}")


def create_state(url: str, settings: Settings, broker: Broker | None = None) -> StateStore:
    """The state store: the broker itself when it is one, else `--state` URL."""
    if isinstance(broker, StateStore):
        return broker
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss"):
        from portao.broker.redis import RedisBroker

        return RedisBroker(url, settings)
    raise ConfigError(
        f"state: unsupported URL scheme {scheme!r} in {mask_url(url)!r} (want redis://)"
    )
