"""Reading Redis Streams in tests, typed (redis-py's return types are unions of both modes)."""

from __future__ import annotations

from typing import Any, cast

from redis.asyncio import Redis

#: An entry id and its fields (bytes to bytes; ``Any`` so the fields can be added again).
Entry = tuple[bytes, dict[Any, Any]]


async def entries(redis: Redis, key: str) -> list[Entry]:
    """Every entry of the stream at ``key``, oldest first (a client without decoding)."""
    return cast(list[Entry], await redis.xrange(key))
