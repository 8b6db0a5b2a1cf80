"""The gateway: orchestrates the platform, the routing, and the host's runtime."""

from .config import GatewayConfig
from .gateway import Gateway, GatewayStats

__all__ = ["Gateway", "GatewayConfig", "GatewayStats"]
