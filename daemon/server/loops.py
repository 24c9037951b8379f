"""Event loop factories: the loop is chosen per server, never installed globally.

``loop="auto"`` uses uvloop when it is importable and asyncio's default loop otherwise;
``"uvloop"`` insists on uvloop; ``"asyncio"`` never uses it. Nothing here touches the
global event loop policy, so an embedding process (a test, a benchmark) keeps its own.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(name: str) -> LoopFactory:
    """Returns the factory for loop ``name`` (``auto``, ``uvloop`` or ``asyncio``)."""
    if name == "asyncio":
        return asyncio.new_event_loop
    if name == "uvloop":
        try:
            import uvloop
        except ImportError as exc:
            raise RuntimeError(
                "loop 'uvloop' requested but uvloop is not installed; "
                "pip install uvloop or use --loop asyncio"
            ) from exc
        return uvloop.new_event_loop
    if name == "auto":
        try:
            import uvloop
        except ImportError:
            return asyncio.new_event_loop
        return uvloop.new_event_loop
    raise ValueError(f"unknown loop {name!r}; expected auto, uvloop or asyncio")


def run(main: Coroutine[Any, Any, T], loop: str = "auto") -> T:
    """Runs ``main`` to completion on a fresh loop made by ``loop``'s factory, then closes it."""
    factory = loop_factory(loop)
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(main)
    event_loop = factory()  # pragma: no cover - Python 3.10 only
    try:
        return event_loop.run_until_complete(main)
    finally:
        event_loop.run_until_complete(event_loop.shutdown_asyncgens())
        event_loop.close()
