"""The gateway: orchestrates the platform, the routing, and the host's runtime."""

from .config import GatewayConfig
from .fleet import AccountState, AccountStats, FleetStats, GatewayFleet
from .gateway import Gateway, GatewayStats

__all__ = [
    "AccountState",
    "AccountStats",
    "FleetStats",
    "Gateway",
    "GatewayConfig",
    "GatewayFleet",
    "GatewayStats",
]
