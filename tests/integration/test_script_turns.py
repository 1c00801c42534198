"""Script calls made in one turn of the event loop reach Redis together, each caller
getting its own answer or its own error (shared/lua.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import NamedTuple

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from flowgate.shared.lua import Script, _turn_of
from flowgate.shared.redis_client import RedisClient


class _Keys(NamedTuple):
    key: str


class _Args(NamedTuple):
    value: str


@pytest.fixture(scope="module")
def put() -> Iterator[Script[_Keys, _Args]]:
    """SET the key and answer the value; ``boom`` is refused."""
    script = Script(
        "test-put",
        _Keys,
        _Args,
        """
if A.value == 'boom' then return redis.error_reply('boom refused') end
redis.call('SET', K.key, A.value)
return A.value
""",
    )
    yield script
    del Script.declared["test-put"]


@pytest.fixture
async def named_client(redis_url: str, redis_prefix: str) -> AsyncIterator[Redis]:
    """A client of its own whose every connection carries a name Redis lists it by."""
    client = Redis.from_url(redis_url, client_name=f"{redis_prefix}-turns")
    yield client
    await client.aclose()


async def _connections(redis: RedisClient, name: str) -> int:
    listed = await redis.client_list()
    return sum(1 for client in listed if client.get("name") == name)


@pytest.mark.single_redis  # counts one server's connections
async def test_calls_of_one_turn_share_one_round_trip_and_keep_their_own_answers(
    put: Script[_Keys, _Args], named_client: Redis, redis_client: RedisClient, redis_prefix: str
) -> None:
    bound = put.bound(named_client)
    keys = [_Keys(key=f"{redis_prefix}:k{n}") for n in range(20)]
    values = ["boom" if n == 7 else f"v{n}" for n in range(20)]
    answers = await asyncio.gather(
        *(bound(k, _Args(value=v)) for k, v in zip(keys, values, strict=True)),
        return_exceptions=True,
    )
    refused = answers.pop(7)
    assert isinstance(refused, ResponseError)
    assert "boom refused" in str(refused)
    assert answers == [f"v{n}".encode() for n in range(20) if n != 7]
    assert await redis_client.get(keys[3].key) == b"v3"
    # Twenty calls went on one connection: sent one by one, they would have taken twenty.
    assert await _connections(redis_client, f"{redis_prefix}-turns") == 1


async def test_a_turn_whose_first_caller_is_cancelled_still_answers_the_others(
    put: Script[_Keys, _Args], redis_client: RedisClient, redis_prefix: str
) -> None:
    bound = put.bound(redis_client)
    first = asyncio.ensure_future(bound(_Keys(f"{redis_prefix}:first"), _Args("a")))
    others = [
        asyncio.ensure_future(bound(_Keys(f"{redis_prefix}:o{n}"), _Args(f"o{n}")))
        for n in range(3)
    ]
    await asyncio.sleep(0)  # all four queued in this turn
    first.cancel()
    assert await asyncio.wait_for(asyncio.gather(*others), timeout=5) == [b"o0", b"o1", b"o2"]
    assert first.cancelled()


async def test_scripts_redis_lost_are_loaded_again_within_a_turn(
    put: Script[_Keys, _Args], redis_client: RedisClient, redis_prefix: str
) -> None:
    bound = put.bound(redis_client)
    assert await bound(_Keys(f"{redis_prefix}:before"), _Args("x")) == b"x"
    await redis_client.script_flush()
    answers = await asyncio.gather(
        *(bound(_Keys(f"{redis_prefix}:after{n}"), _Args(f"y{n}")) for n in range(4))
    )
    assert answers == [b"y0", b"y1", b"y2", b"y3"]


async def test_a_turn_cancelled_before_it_was_sent_fails_its_calls_and_not_the_next(
    put: Script[_Keys, _Args], redis_client: RedisClient, redis_prefix: str
) -> None:
    """As at the loop's end: its callers hear of it (a connection error, which writers
    retry), and the next call does not queue behind it."""
    bound = put.bound(redis_client)
    calls = [
        asyncio.ensure_future(bound(_Keys(f"{redis_prefix}:c{n}"), _Args(f"c{n}")))
        for n in range(3)
    ]
    await asyncio.sleep(0)  # queued, their turn's task not yet run
    [turn] = _turn_of(redis_client).sending
    turn.cancel()
    answers = await asyncio.gather(*calls, return_exceptions=True)
    assert [type(answer) for answer in answers] == [ConnectionError] * 3
    assert await redis_client.exists(f"{redis_prefix}:c0") == 0
    assert await bound(_Keys(f"{redis_prefix}:next"), _Args("n")) == b"n"
