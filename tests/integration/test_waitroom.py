"""The wait room against a real Redis and a Redis Cluster: no lost wake-ups, one connection
(per shard), re-reads."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest
from redis.asyncio import RedisCluster

from flowgate.services.api.metrics import ApiMetrics
from flowgate.services.api.settled import Settled
from flowgate.services.api.waitroom import WaitEnd, WaitResult, WaitRoom
from flowgate.shared.aio import stop_and_wait
from flowgate.shared.contract import StartFailed, SystemVariables
from flowgate.shared.keys import Keys
from flowgate.shared.redis_client import RedisClient, connect
from flowgate.shared.settings import Settings
from flowgate.shared.state import RunState, Status
from flowgate.shared.store.runs import RunStore
from tests.conftest import RedisTarget
from tests.helpers.api import cid, running_app
from tests.helpers.waiting import until

pytestmark = pytest.mark.redis_both

MakeSettings = Callable[..., Settings]


@pytest.fixture
async def pooled(
    redis_target: RedisTarget, redis_client: RedisClient
) -> AsyncIterator[RedisClient]:
    """A client like the app's: on a single Redis a bounded pool that queues instead of
    failing at its limit (``redis_client`` only cleans up the test's keys afterwards)."""
    client = connect(
        redis_target.url, cluster=redis_target.cluster, max_connections=64, pool_timeout_s=10
    )
    yield client
    await client.aclose()


@pytest.fixture
def store(pooled: RedisClient, redis_prefix: str) -> RunStore:
    return RunStore(pooled, Keys(redis_prefix), result_ttl_s=600, pending_ttl_s=600)


@contextlib.asynccontextmanager
async def open_room(
    redis: RedisClient, prefix: str, store: RunStore, **options: Any
) -> AsyncIterator[WaitRoom]:
    options.setdefault("max_parked", 10_000)
    room = WaitRoom(redis, Keys(prefix), store, metrics=ApiMetrics(), **options)
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tasks:
        listening = tasks.create_task(room.listen(stop))
        try:
            await room.subscribed(timeout_s=10)
            yield room
        finally:
            room.release_all()
            await stop_and_wait(stop, [listening])


@pytest.fixture
async def room(pooled: RedisClient, redis_prefix: str, store: RunStore) -> AsyncIterator[WaitRoom]:
    async with open_room(pooled, redis_prefix, store) as opened:
        yield opened


async def claim(store: RunStore, correlation_id: str) -> RunState:
    """A run whose start is in flight: for longer than any test here lasts, so that the
    replica's recovery (which abandons a claim whose start was never sent) leaves it."""
    state, created = await store.claim(
        SystemVariables(correlation_id, "b", "t", "a"), "benchmark", "h", look_after_s=600
    )
    assert created
    return state


async def pubsub_ids(redis: RedisClient) -> set[str]:
    """The pub/sub connections (on a cluster: of every master, as ``node/id``)."""
    if isinstance(redis, RedisCluster):
        by_node = cast(
            dict[str, list[dict[str, Any]]],
            await redis.client_list(_type="pubsub", target_nodes=RedisCluster.PRIMARIES),
        )
        return {f"{node}/{c['id']}" for node, clients in by_node.items() for c in clients}
    return {str(client["id"]) for client in await redis.client_list(_type="pubsub")}


def shards(redis: RedisClient) -> int:
    """How many pub/sub connections a wait room holds: one per master."""
    return len(redis.get_primaries()) if isinstance(redis, RedisCluster) else 1


async def kill_pubsub_connections(redis: RedisClient, ids: set[str]) -> None:
    for connection in ids:
        if isinstance(redis, RedisCluster):
            node_name, client_id = connection.rsplit("/", 1)
            node = redis.get_node(node_name=node_name)
            await redis.client_kill_filter(_id=client_id, target_nodes=node)
        else:
            await redis.client_kill_filter(_id=connection)


async def test_the_room_is_ready_once_its_subscription_is_confirmed(
    redis_client: RedisClient, redis_prefix: str, store: RunStore
) -> None:
    before = await pubsub_ids(redis_client)
    async with open_room(redis_client, redis_prefix, store) as room:
        assert room.ready
        assert len(await pubsub_ids(redis_client) - before) == shards(redis_client)

    # Closed with the room (Redis drops a client once it has read the close: not at once).
    async def closed() -> bool:
        return await pubsub_ids(redis_client) == before

    await until(closed, timeout_s=5, what="the room's pub/sub connections to close")
    assert not room.ready


async def test_a_completion_before_the_wait_is_returned_at_once(
    room: WaitRoom, store: RunStore
) -> None:
    correlation_id = cid()
    await claim(store, correlation_id)
    assert await store.finish(correlation_id, Status.OK, data={"early": True})
    began = time.monotonic()
    result = await room.wait(correlation_id, timeout_s=10)
    assert time.monotonic() - began < 1
    assert result.end is WaitEnd.SETTLED
    assert isinstance(result.outcome, RunState)
    assert result.outcome.data == {"early": True}


async def test_the_room_tells_of_each_end_that_has_a_callback_and_of_no_other(
    room: WaitRoom, store: RunStore
) -> None:
    nudges: list[None] = []
    room.on_callback_due(lambda: nudges.append(None))
    for callback_url, told in ((None, 0), ("http://127.0.0.1:9/hook", 1)):
        correlation_id = cid()
        pending, created = await store.claim(
            SystemVariables(correlation_id, "b", "t", "a"), "benchmark", "h",
            callback_url=callback_url,
        )  # fmt: skip
        assert created
        async with room.expect(correlation_id, timeout_s=10) as expected:
            assert await store.finish(correlation_id, Status.OK, data={"hook": "a"})
            # Woken: the end's message has come (and been looked at).
            assert (await expected.result(pending)).end is WaitEnd.WOKEN
        assert len(nudges) == told, callback_url


async def test_completions_racing_the_wait_are_never_missed(
    room: WaitRoom, store: RunStore
) -> None:
    """Completion and wait start together, 300 times: a missed wake-up would end in a
    timeout (the re-read would still find the state, but the end would be TIMEOUT)."""
    ids = [cid() for _ in range(300)]
    for correlation_id in ids:
        await claim(store, correlation_id)

    async def race(correlation_id: str, delay_s: float) -> WaitEnd:
        async def complete() -> None:
            await asyncio.sleep(delay_s)
            await store.finish(correlation_id, Status.OK, data=correlation_id)

        result, _ = await asyncio.gather(room.wait(correlation_id, timeout_s=5), complete())
        assert isinstance(result.outcome, RunState)
        assert result.outcome.data == correlation_id
        return result.end

    ends = await asyncio.gather(*(race(c, (i % 4) * 0.0005) for i, c in enumerate(ids)))
    assert WaitEnd.TIMEOUT not in ends
    assert set(ends) <= {WaitEnd.SETTLED, WaitEnd.WOKEN}


async def test_a_wait_from_a_state_read_after_registering_misses_no_completion(
    room: WaitRoom, store: RunStore
) -> None:
    """A start registers, then reads the run as it attaches its instance, then waits from
    that state without reading again: a completion racing the attach is still seen."""
    ids = [cid() for _ in range(200)]
    for correlation_id in ids:
        await claim(store, correlation_id)

    async def start(correlation_id: str, delay_s: float) -> WaitEnd:
        async def complete() -> None:
            await asyncio.sleep(delay_s)
            await store.finish(correlation_id, Status.OK, data=correlation_id)

        async def attach_then_wait() -> WaitResult:
            attached = await store.attach_instance(correlation_id, f"i-{correlation_id}")
            return await expected.result(attached)

        async with room.expect(correlation_id, timeout_s=5) as expected:
            result, _ = await asyncio.gather(attach_then_wait(), complete())
        assert isinstance(result.outcome, RunState)
        assert result.outcome.data == correlation_id
        return result.end

    ends = await asyncio.gather(*(start(c, (i % 4) * 0.0005) for i, c in enumerate(ids)))
    assert WaitEnd.TIMEOUT not in ends
    assert set(ends) <= {WaitEnd.SETTLED, WaitEnd.WOKEN}
    # Without time to wait it answers from the state it was given, reading nothing.
    correlation_id = cid()
    known = await claim(store, correlation_id)
    async with room.expect(correlation_id, timeout_s=0) as expected:
        await store.finish(correlation_id, Status.OK, data="later")
        result = await expected.result(known)
    assert (result.end, result.outcome) == (WaitEnd.SETTLED, known)


async def test_a_thousand_parked_waits_on_one_connection_all_get_their_own_result(
    redis_client: RedisClient, room: WaitRoom, store: RunStore
) -> None:
    ids = [cid() for _ in range(1_000)]
    for correlation_id in ids:
        await claim(store, correlation_id)
    connections = await pubsub_ids(redis_client)
    waits = [asyncio.create_task(room.wait(c, timeout_s=60)) for c in ids]
    await until(lambda: room.parked == 1_000)
    assert await pubsub_ids(redis_client) == connections  # no connection per request

    await asyncio.gather(*(store.finish(c, Status.OK, data={"id": c}) for c in ids))
    results = await asyncio.gather(*waits)
    assert [r.end for r in results] == [WaitEnd.WOKEN] * 1_000
    assert [r.outcome.data["id"] for r in results if isinstance(r.outcome, RunState)] == ids
    assert room.parked == 0


async def test_every_waiter_of_an_id_is_woken(room: WaitRoom, store: RunStore) -> None:
    correlation_id = cid()
    await claim(store, correlation_id)
    waits = [asyncio.create_task(room.wait(correlation_id, timeout_s=30)) for _ in range(5)]
    await until(lambda: room.parked == 5)
    await store.finish(correlation_id, Status.ERROR, error="boom")
    results = await asyncio.gather(*waits)
    assert {r.end for r in results} == {WaitEnd.WOKEN}
    assert all(isinstance(r.outcome, RunState) and r.outcome.error == "boom" for r in results)


async def test_a_failed_start_wakes_its_joiners_with_the_reason(
    room: WaitRoom, store: RunStore
) -> None:
    correlation_id = cid()
    state = await claim(store, correlation_id)
    wait = asyncio.create_task(room.wait(correlation_id, timeout_s=30))
    await until(lambda: room.parked == 1)
    failed = StartFailed(correlation_id, 404, "no such key", field="processKey")
    assert await store.abandon(state.version, failed)
    result = await wait
    assert result.end is WaitEnd.WOKEN
    assert result.outcome == failed


async def test_a_timed_out_wait_reads_the_state_again(
    redis_client: RedisClient, room: WaitRoom, store: RunStore, redis_prefix: str
) -> None:
    correlation_id = cid()
    await claim(store, correlation_id)
    wait = asyncio.create_task(room.wait(correlation_id, timeout_s=0.5))
    await until(lambda: room.parked == 1)
    # A completion whose message got lost: the state changed, nobody was told.
    await redis_client.hset(Keys(redis_prefix).state(correlation_id), "status", "ok")
    result = await wait
    assert result.end is WaitEnd.TIMEOUT
    assert isinstance(result.outcome, RunState)
    assert result.outcome.status is Status.OK

    still_pending = cid()
    await claim(store, still_pending)
    pending = await room.wait(still_pending, timeout_s=0.2)
    assert pending.end is WaitEnd.TIMEOUT
    assert isinstance(pending.outcome, RunState)
    assert pending.outcome.status is Status.PENDING


async def test_after_a_reconnect_every_waiter_reads_the_state_again(
    redis_client: RedisClient, redis_prefix: str, store: RunStore
) -> None:
    before = await pubsub_ids(redis_client)
    async with open_room(redis_client, redis_prefix, store) as room:
        connections = await pubsub_ids(redis_client) - before
        correlation_id = cid()
        await claim(store, correlation_id)
        wait = asyncio.create_task(room.wait(correlation_id, timeout_s=30))
        await until(lambda: room.parked == 1)
        # Finished while the connection is down: the message is lost, the state is not.
        await redis_client.hset(Keys(redis_prefix).state(correlation_id), "status", "ok")
        await kill_pubsub_connections(redis_client, connections)
        began = time.monotonic()
        result = await wait
        assert time.monotonic() - began < 10  # the reconnect, not the 30 s deadline
        assert result.end is WaitEnd.SETTLED
        assert isinstance(result.outcome, RunState)
        assert result.outcome.status is Status.OK
        await until(lambda: room.ready)
        assert len(await pubsub_ids(redis_client) - before) == shards(redis_client)


async def test_a_lost_subscription_makes_the_room_forget_the_ends_it_kept(
    redis_client: RedisClient, redis_prefix: str, store: RunStore
) -> None:
    """While the subscriptions are down a reopen goes unheard (or Redis loses the record
    and the id names a new run): an end kept before is read from the store again after."""
    settled = Settled(result_ttl_s=600, max_bytes=2**20)
    before = await pubsub_ids(redis_client)
    async with open_room(redis_client, redis_prefix, store, settled=settled) as room:
        connections = await pubsub_ids(redis_client) - before
        correlation_id = cid()
        await claim(store, correlation_id)
        await store.finish(correlation_id, Status.ERROR, error={"n": 1})
        assert (await room.wait(correlation_id, timeout_s=0)).end is WaitEnd.SETTLED
        assert settled.get(correlation_id) is not None
        # What a retry does while nobody hears it: the run goes on under the same id.
        await redis_client.hset(Keys(redis_prefix).state(correlation_id), "status", "pending")
        await kill_pubsub_connections(redis_client, connections)
        await until(lambda: settled.get(correlation_id) is None)
        await until(lambda: room.ready)
        result = await room.wait(correlation_id, timeout_s=0)
        assert isinstance(result.outcome, RunState)
        assert result.outcome.status is Status.PENDING


async def test_release_all_answers_parked_waits_at_once_and_later_ones_immediately(
    room: WaitRoom, store: RunStore
) -> None:
    ids = [cid() for _ in range(10)]
    for correlation_id in ids:
        await claim(store, correlation_id)
    waits = [asyncio.create_task(room.wait(c, timeout_s=60)) for c in ids]
    await until(lambda: room.parked == 10)
    began = time.monotonic()
    room.release_all()
    results = await asyncio.gather(*waits)
    assert time.monotonic() - began < 1
    assert {r.end for r in results} == {WaitEnd.DRAINED}
    assert all(isinstance(r.outcome, RunState) and not r.outcome.finished for r in results)
    late = await room.wait(ids[0], timeout_s=60)
    assert late.end is WaitEnd.DRAINED
    assert not room.ready


async def test_beyond_max_parked_a_wait_answers_at_once(
    redis_client: RedisClient, redis_prefix: str, store: RunStore
) -> None:
    async with open_room(redis_client, redis_prefix, store, max_parked=2) as room:
        correlation_id = cid()
        await claim(store, correlation_id)
        waits = [asyncio.create_task(room.wait(correlation_id, timeout_s=30)) for _ in range(2)]
        await until(lambda: room.parked == 2)
        overflow = await room.wait(correlation_id, timeout_s=30)
        assert overflow.end is WaitEnd.FULL
        await store.finish(correlation_id, Status.OK)
        assert {r.end for r in await asyncio.gather(*waits)} == {WaitEnd.WOKEN}


async def test_a_thousand_parked_http_long_polls_are_all_answered(
    make_settings: MakeSettings,
) -> None:
    """Through the app: 1,000 concurrent ``?wait=`` requests on one instance, each woken by
    its own ``/complete``."""
    settings = make_settings(camunda_base_url="http://127.0.0.1:9/engine-rest")
    async with running_app(settings) as api:
        ids = [f"k-{uuid.uuid4().hex}" for _ in range(1_000)]
        for correlation_id in ids:
            await claim(api.deps.store, correlation_id)
        polls = [
            asyncio.create_task(api.client.get(f"/api/process/status/{c}?wait=60")) for c in ids
        ]
        await until(lambda: api.deps.waitroom.parked == 1_000, timeout_s=60)
        completions = await asyncio.gather(
            *(
                api.client.post(
                    "/api/process/complete",
                    json={"correlationId": c, "status": "ok", "data": {"id": c}},
                )
                for c in ids
            )
        )
        assert {c.status_code for c in completions} == {200}
        responses = await asyncio.gather(*polls)
    assert [r.status_code for r in responses] == [200] * 1_000
    assert [r.json()["data"]["id"] for r in responses] == ids
