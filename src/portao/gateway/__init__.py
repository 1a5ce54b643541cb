"""The asyncio shell: listeners, connections, reply dispatch, shutdown."""

from portao.gateway.server import Gateway, GatewayStats

__all__ = ["Gateway", "GatewayStats"]
