"""The platform config: fetched at start and on every ``agent_config.update``, handed to
the runtime (``apply_platform_config``); failures are logged, never fatal."""

from __future__ import annotations

import asyncio
import logging

from .._tasks import TaskSet
from ..client import ParallClient
from ..errors import ParallError
from ..runtime import AgentRuntime

__all__ = ["ConfigSync"]

_log = logging.getLogger("parall_bridge.gateway")


class ConfigSync:
    """Keeps the runtime's platform config up to date.

    Args:
        client: the REST client.
        org_id: the organisation.
        agent_id: the agent's user id.
        runtime: the host's runtime.
        hook_timeout: seconds ``apply_platform_config`` may take.
    """

    def __init__(
        self,
        client: ParallClient,
        org_id: str,
        agent_id: str,
        runtime: AgentRuntime,
        *,
        hook_timeout: float,
    ) -> None:
        self._client = client
        self._hook_timeout = hook_timeout
        self._org_id = org_id
        self._agent_id = agent_id
        self._runtime = runtime
        self._tasks = TaskSet(_log)
        self._again = False
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def apply(self) -> None:
        """Fetch the platform config and hand it to the runtime; failures are logged."""
        try:
            config = await self._client.get_agent_config(self._org_id, self._agent_id)
            async with asyncio.timeout(self._hook_timeout):
                await self._runtime.apply_platform_config(config)
            _log.info("platform config version %d applied", config.version)
        except (ParallError, TimeoutError) as exc:
            _log.warning("platform config not applied: %s", str(exc))
        except Exception:
            _log.exception("apply_platform_config failed")

    def refresh(self) -> None:
        """Fetch the config again in the background; updates that come while a fetch
        runs make one more fetch."""
        if self._closed:
            return
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = self._tasks.spawn(self._loop(), name="parall-gateway-config")

    async def _loop(self) -> None:
        while True:
            self._again = False
            await self.apply()
            if not self._again or self._closed:
                return

    async def close(self) -> None:
        """Stop fetching (a fetch in flight is cancelled)."""
        self._closed = True
        await self._tasks.cancel()
