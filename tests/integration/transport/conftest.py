"""The transport tests run on uvloop, the loop `pep run` uses, and on asyncio's own loop, which the rest of the
suite uses (a test marked `loop_factories=["uvloop"]` runs on uvloop alone)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping

import pytest
import uvloop

from pep.transport import Listener


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


@pytest.fixture
async def listeners() -> AsyncIterator[list[Listener]]:
    """The listeners a test started (it appends them): closed after it, with half a second's grace."""
    made: list[Listener] = []
    yield made
    for listener in made:
        await listener.close(0.5)
