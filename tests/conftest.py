"""Shared fixtures: settings with short timeouts, service checks, unique prefixes.

Tests that need Redis or RabbitMQ fail loudly when `CI=true` and the service is
missing; elsewhere they skip with the reason printed.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import uvloop

from portao.config import Settings

IN_CI = os.environ.get("CI") == "true"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
AMQP_HOST, AMQP_PORT = "127.0.0.1", 5672


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Fail in CI, skip elsewhere, when a service is not listening."""
    if _port_open(host, port):
        return
    reason = f"{name} is not reachable at {host}:{port}"
    if IN_CI:
        pytest.fail(reason + " (CI=true: broker tests must not skip)")
    pytest.skip(reason)


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Any]:
    """Tests run on uvloop, the loop portao runs on in production."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def prefix() -> str:
    """A key prefix no other test uses."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_settings(prefix: str) -> Callable[..., Settings]:
    """Settings with this test's prefix; keyword arguments override."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"prefix": prefix, "jwt_secret": "test-secret-" + "x" * 32}
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def redis_url() -> str:
    """A Redis URL on the shared server (use with a unique prefix)."""
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
