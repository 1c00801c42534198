"""Reading Redis Streams in tests, typed (redis-py's return types are unions of both modes)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

from redis.asyncio import RedisCluster

from flowgate.shared.contract import correlation_id_of_message
from flowgate.shared.keys import Keys
from flowgate.shared.redis_client import RedisClient

#: An entry id and its fields (bytes to bytes; ``Any`` so the fields can be added again).
Entry = tuple[bytes, dict[Any, Any]]


async def entries(redis: RedisClient, key: str) -> list[Entry]:
    """Every entry of the stream at ``key``, oldest first (a client without decoding)."""
    return cast(list[Entry], await redis.xrange(key))


@contextlib.asynccontextmanager
async def run_messages(
    redis: RedisClient, keys: Keys
) -> AsyncIterator[Callable[[], Awaitable[tuple[str, bytes]]]]:
    """Subscribe to every partition's run channel (sharded on a cluster) and wait for the
    confirmations; yields a function that returns the next message as (correlationId,
    body), failing after 5 s."""
    channels = [partition.channel for partition in keys.partitions]
    if isinstance(redis, RedisCluster):
        await redis.initialize()  # the slots, to route each channel's SSUBSCRIBE
        pubsub: Any = redis.pubsub()
        await pubsub.ssubscribe(*channels)
        read, data = pubsub.get_sharded_message, "smessage"
    else:
        pubsub = redis.pubsub()
        await pubsub.subscribe(*channels)
        read, data = pubsub.get_message, "message"
    confirmed = 0
    async with asyncio.timeout(10):
        while confirmed < len(channels):
            message = await read(timeout=0.05)
            confirmed += message is not None and message["type"] in ("subscribe", "ssubscribe")

    async def next_message() -> tuple[str, bytes]:
        async with asyncio.timeout(5):
            while True:
                message = await read(timeout=0.05)
                if message is not None and message["type"] == data:
                    return correlation_id_of_message(message["data"])

    try:
        yield next_message
    finally:
        await pubsub.aclose()
