"""Ready runtimes for agent frameworks, each in its own module behind an optional extra.

- :mod:`parall_bridge.adapters.pydantic_ai`: ``PydanticAIRuntime(agent)``
  (``pip install 'parall-bridge[pydantic-ai]'``).
- :mod:`parall_bridge.adapters.openai_agents`: ``OpenAIAgentsRuntime(agent)``
  (``pip install 'parall-bridge[openai-agents]'``).
- :mod:`parall_bridge.adapters.langgraph`: ``LangGraphRuntime(graph)`` and
  ``LangGraphRuntime.from_model(model)`` (``pip install 'parall-bridge[langgraph]'``).
- :mod:`parall_bridge.adapters.base`: what the three share (a history per session,
  forks, seeding from the chat, the Parall tools), to write an adapter for another
  framework.

Importing this package (or :mod:`parall_bridge`) imports no framework: only the module
of a framework does.
"""

from __future__ import annotations

__all__: list[str] = []
