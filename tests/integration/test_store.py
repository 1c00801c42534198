"""RunStore against a real Redis and a Redis Cluster: transitions, their stream entries,
publishes, paging."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, cast

import orjson
import pytest

from flowgate.shared.contract import StartFailed, StepRecorded, SystemVariables, decode_message
from flowgate.shared.keys import Keys
from flowgate.shared.redis_client import RedisClient
from flowgate.shared.state import RunState, Status
from flowgate.shared.steps import StepEvent, StepStatus
from flowgate.shared.store.pages import InvalidCursor
from flowgate.shared.store.runs import Abandoned, RunStore
from tests.helpers.streams import entries, run_messages

pytestmark = pytest.mark.redis_both

Subscriber = Callable[[], Awaitable[tuple[str, bytes]]]

RESULT_TTL_S = 60
PENDING_TTL_S = 600


@pytest.fixture
def keys(redis_prefix: str) -> Keys:
    return Keys(redis_prefix)


@pytest.fixture
def store(redis_client: RedisClient, keys: Keys) -> RunStore:
    return RunStore(redis_client, keys, result_ttl_s=RESULT_TTL_S, pending_ttl_s=PENDING_TTL_S)


@pytest.fixture
async def subscriber(redis_client: RedisClient, keys: Keys) -> AsyncIterator[Subscriber]:
    """The run channels, subscribed and confirmed before the test acts."""
    async with run_messages(redis_client, keys) as next_message:
        yield next_message


async def claim(
    store: RunStore, cid: str, request_hash: str = "h1", look_after_s: float = 5.0
) -> tuple[RunState, bool]:
    return await store.claim(
        SystemVariables(cid, "b", f"t-{cid}", "a"),
        "onboard-user",
        request_hash,
        look_after_s=look_after_s,
    )


async def stream_entries(
    redis: RedisClient, keys: Keys, cid: str
) -> list[tuple[str, dict[str, Any]]]:
    """The write-behind entries of ``cid``'s partition."""
    return [
        (kind_body[b"kind"].decode(), orjson.loads(kind_body[b"body"]))
        for _, kind_body in await entries(redis, keys.of(cid).writebehind)
    ]


async def index_members(redis: RedisClient, keys: Keys) -> set[str]:
    members: set[str] = set()
    for partition in keys.partitions:
        members.update(
            m.decode() for m in cast(list[bytes], await redis.zrange(partition.index, 0, -1))
        )
    return members


async def test_claim_creates_exactly_once_under_concurrency(
    store: RunStore, redis_client: RedisClient, keys: Keys
) -> None:
    results = await asyncio.gather(*(claim(store, "cid-1") for _ in range(50)))

    assert sum(created for _, created in results) == 1
    assert all(state == results[0][0] for state, _ in results)
    state = results[0][0]
    assert state.status is Status.PENDING
    assert state.version == 1
    assert (state.process_key, state.request_hash) == ("onboard-user", "h1")
    assert state.started_at.tzinfo is not None
    assert await stream_entries(redis_client, keys, "cid-1") == [("state", state.to_dict())]
    assert await redis_client.zrange(keys.of("cid-1").index, 0, -1) == [b"cid-1"]


async def test_claim_sets_pending_ttl_and_joins_with_the_first_hash(
    store: RunStore, redis_client: RedisClient, keys: Keys
) -> None:
    first, created = await claim(store, "cid-2", "h1")
    joined, created_again = await claim(store, "cid-2", "other-hash")

    assert created
    assert not created_again
    assert joined == first
    assert joined.request_hash == "h1"  # the caller compares and answers 422
    assert PENDING_TTL_S - 5 < await redis_client.ttl(keys.state("cid-2")) <= PENDING_TTL_S
    assert await store.get("cid-2") == first


async def test_a_waiting_clients_deadline_rides_with_the_claim_not_the_state(
    store: RunStore,
) -> None:
    deadline = datetime(2026, 12, 3, 12, 0, 25, 123_000, tzinfo=UTC)
    state, created = await store.claim(
        SystemVariables("cid-dl", "b", "t", "a"), "p", "h", client_deadline=deadline
    )
    assert created
    assert await store.client_deadline("cid-dl") == deadline
    assert await store.get("cid-dl") == state  # the state itself is unchanged
    await claim(store, "cid-none")
    assert await store.client_deadline("cid-none") is None  # a start that did not wait
    assert await store.client_deadline("cid-unknown") is None


async def test_complete_changes_a_pending_state_once(
    store: RunStore, redis_client: RedisClient, keys: Keys
) -> None:
    await claim(store, "cid-3")
    await store.attach_instance("cid-3", "instance-1")

    assert await store.finish("cid-3", Status.OK, data={"n": [], "big": 2**60})
    assert not await store.finish("cid-3", Status.ERROR, error="late duplicate")

    state = await store.get("cid-3")
    assert state is not None
    assert state.status is Status.OK
    assert state.data == {"n": [], "big": 2**60}
    assert state.error is None
    assert state.instance_id == "instance-1"
    assert state.version == 3
    assert state.updated_at >= state.started_at
    assert RESULT_TTL_S - 5 < await redis_client.ttl(keys.state("cid-3")) <= RESULT_TTL_S
    versions = [body["version"] for _, body in await stream_entries(redis_client, keys, "cid-3")]
    assert versions == [1, 2, 3]


async def test_an_instance_stays_watched_a_while_after_its_run_ends(
    store: RunStore, redis_client: RedisClient, keys: Keys
) -> None:
    await claim(store, "cid-w")
    await store.attach_instance("cid-w", "instance-w")
    assert await store.instances.runs_of(["instance-w", "other"]) == {"instance-w": "cid-w"}
    assert await store.finish("cid-w", Status.OK, data=None)
    # Still mapped (its last steps are still read), and due to be forgotten later.
    assert await store.instances.count() == 1
    assert await store.instances.forget_ended() == 0
    ended = keys.of("cid-w").instances_ended
    forget_at = await redis_client.zscore(ended, "instance-w")
    assert forget_at is not None
    await redis_client.zadd(ended, {"instance-w": 0})
    assert await store.instances.forget_ended() == 1
    assert await store.instances.count() == 0
    assert await store.instances.runs_of(["instance-w"]) == {}


async def test_an_instance_named_by_its_business_key_is_looked_up_in_its_run_s_partition(
    store: RunStore,
) -> None:
    for run in ("cid-n1", "cid-n2", "cid-n3"):
        await claim(store, run)
        await store.attach_instance(run, f"instance-{run}")
    found = await store.instances.runs_of(
        ["instance-cid-n1", "instance-cid-n2", "instance-cid-n3", "stranger"],
        named={"instance-cid-n1": "cid-n1", "instance-cid-n2": "cid-n2", "stranger": "cid-x"},
    )
    # Named or not, each is found; a stranger named after no run is nobody's.
    assert found == {f"instance-{run}": run for run in ("cid-n1", "cid-n2", "cid-n3")}


async def test_complete_of_an_unknown_id_is_ignored(
    store: RunStore, redis_client: RedisClient, keys: Keys
) -> None:
    assert not await store.finish("never-claimed", Status.OK, data=1)
    assert await store.get("never-claimed") is None
    assert await redis_client.exists(keys.state("never-claimed")) == 0
    assert await redis_client.xlen(keys.of("never-claimed").writebehind) == 0


async def test_complete_refuses_pending_as_an_outcome(store: RunStore) -> None:
    await claim(store, "cid-p")
    with pytest.raises(ValueError, match="terminal"):
        await store.finish("cid-p", Status.PENDING)


async def test_attach_instance_of_an_unknown_id_is_ignored(
    store: RunStore, redis_client: RedisClient, keys: Keys
) -> None:
    assert await store.attach_instance("nobody", "instance-1") is None
    assert await redis_client.exists(keys.state("nobody")) == 0


async def test_completion_is_published_after_the_state_is_readable(
    store: RunStore, subscriber: Subscriber
) -> None:
    await claim(store, "cid-4")

    assert await store.finish("cid-4", Status.ERROR, error={"message": "boom"})
    cid, body = await subscriber()
    state_now = await store.get("cid-4")  # read right on the message

    assert cid == "cid-4"
    published = decode_message(body)
    assert isinstance(published, RunState)
    assert published == state_now
    assert published.status is Status.ERROR
    assert published.error == {"message": "boom"}


async def test_abandon_keeps_the_answer_tells_joined_waiters_and_frees_the_id(
    store: RunStore,
    subscriber: Subscriber,
    redis_client: RedisClient,
    keys: Keys,
) -> None:
    state, _ = await claim(store, "cid-5")

    failed = StartFailed("cid-5", 502, "down")
    assert not await store.abandon(state.version + 1, failed)
    assert await store.abandon(state.version, failed)

    cid, body = await subscriber()
    assert (cid, decode_message(body)) == ("cid-5", failed)
    abandoned = await store.get("cid-5")
    assert abandoned is not None
    assert abandoned.status is Status.ABANDONED
    assert StartFailed.of(abandoned) == failed
    assert await redis_client.zscore(keys.of("cid-5").index, "cid-5") is None
    assert await redis_client.zscore(keys.of("cid-5").starts, "cid-5") is None
    kind, entry = (await stream_entries(redis_client, keys, "cid-5"))[-1]
    assert (kind, entry["status"], entry["version"]) == ("state", "abandoned", 2)
    # The caller may retry with the same id; versions go on.
    again, created = await claim(store, "cid-5")
    assert created
    assert (again.status, again.version) == (Status.PENDING, 3)


async def test_an_unsent_claim_is_abandoned_only_while_unsent(store: RunStore) -> None:
    state, _ = await claim(store, "cid-7")
    sent = await store.sending(state, look_after_s=10)
    assert sent is not None
    assert sent.start_sent_at is not None
    assert await store.sending(state, look_after_s=10) is None  # once only
    failed = StartFailed("cid-7", 503, "interrupted")
    assert not await store.abandon(sent.version, failed, unsent=True)
    assert await store.abandon(sent.version, failed)


async def test_attach_reads_the_state_back(store: RunStore) -> None:
    state, _ = await claim(store, "cid-a")
    attached = await store.attach_instance("cid-a", "instance-a")
    assert attached is not None
    assert (attached.instance_id, attached.version) == ("instance-a", state.version + 1)
    assert attached == await store.get("cid-a")
    assert await store.attach_instance("cid-a", "instance-a") == attached  # once
    await store.finish("cid-a", Status.OK, data="done")
    late = await store.attach_instance("cid-a", "instance-a")  # a finish that beat it
    assert late is not None
    assert (late.status, late.data) == (Status.OK, "done")


async def test_an_instance_arriving_for_an_abandoned_run_is_refused(store: RunStore) -> None:
    state, _ = await claim(store, "cid-8")
    assert await store.abandon(state.version, StartFailed("cid-8", 503, "gone"))
    with pytest.raises(Abandoned):
        await store.attach_instance("cid-8", "instance-1")


async def test_claims_without_an_instance_are_due_until_attached(store: RunStore) -> None:
    await claim(store, "cid-9", look_after_s=0)
    await asyncio.sleep(0.01)
    assert "cid-9" in await store.starts.due(100)
    assert await store.starts.take("cid-9", again_s=60)
    assert not await store.starts.take("cid-9", again_s=60)  # one replica at a time
    assert "cid-9" not in await store.starts.due(100)
    await store.attach_instance("cid-9", "instance-9")
    assert await store.starts.take("cid-9", again_s=0) is False


async def test_abandon_after_completion_changes_nothing(store: RunStore) -> None:
    state, _ = await claim(store, "cid-6")
    await store.finish("cid-6", Status.OK, data="done")

    assert not await store.abandon(state.version, StartFailed("cid-6", 503, "too late"))
    finished = await store.get("cid-6")
    assert finished is not None
    assert finished.status is Status.OK


async def page_all(store: RunStore, limit: int) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        states, cursor = await store.pages.page(cursor=cursor, limit=limit)
        pages.append([s.correlation_id for s in states])
        if cursor is None:
            return pages


async def test_page_is_newest_first_and_skips_and_removes_stale_entries(
    store: RunStore, redis_client: RedisClient, keys: Keys
) -> None:
    ids = [f"p{i:03}" for i in range(23)]
    for cid in ids:
        await claim(store, cid)  # same-millisecond ties are ordered by id, newest id first
    stale = {"p020", "p013", "p012", "p000"}
    await redis_client.delete(*(keys.state(cid) for cid in stale))

    pages = await page_all(store, limit=5)

    live = [cid for cid in reversed(ids) if cid not in stale]
    assert [cid for page in pages for cid in page] == live
    assert all(len(page) == 5 for page in pages[:-1])
    assert 0 < len(pages[-1]) <= 5
    assert await index_members(redis_client, keys) == set(live)


async def test_page_walks_large_groups_of_equal_start_times(
    store: RunStore, redis_client: RedisClient, keys: Keys
) -> None:
    ids = [f"q{i:03}" for i in range(250)]
    for cid in ids:
        await claim(store, cid)
    for cid in ids:  # one millisecond for all
        await redis_client.zadd(keys.of(cid).index, {cid: 1_000})
    stale = {f"q{i:03}" for i in range(0, 250, 7)}
    await redis_client.delete(*(keys.state(cid) for cid in stale))

    pages = await page_all(store, limit=40)

    assert [cid for page in pages for cid in page] == [
        cid for cid in reversed(ids) if cid not in stale
    ]


async def test_page_of_an_empty_index_and_bad_input(store: RunStore) -> None:
    assert await store.pages.page(cursor=None, limit=10) == ([], None)
    with pytest.raises(InvalidCursor):
        await store.pages.page(cursor="not a cursor!", limit=10)
    with pytest.raises(ValueError, match="limit"):
        await store.pages.page(cursor=None, limit=0)


async def test_claim_drops_index_entries_older_than_any_state_can_live(
    store: RunStore, redis_client: RedisClient, keys: Keys
) -> None:
    index = keys.of("fresh").index
    await redis_client.zadd(index, {"ancient": 1_000})
    await claim(store, "fresh")
    assert await redis_client.zrange(index, 0, -1) == [b"fresh"]


def a_step(name: str, data: Any = None) -> StepEvent:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    return StepEvent(name, StepStatus.OK, name, f"{name}:1", "serviceTask", at, data=data)


async def test_a_step_a_worker_claimed_is_recorded_by_that_worker(store: RunStore) -> None:
    """The engine's report of a step (the watcher's) may come before the worker that ran it
    records it; the worker's record, with the step's data, is the one kept."""
    await claim(store, "sc-1")
    await store.steps.claim("sc-1", "work:1", "w1")

    assert not await store.steps.record("sc-1", a_step("work"))  # the engine's, first
    assert await store.steps.record("sc-1", a_step("work", data={"n": 1}), worker=True)
    assert not await store.steps.record("sc-1", a_step("work"))  # and later: seen
    [(_, kept)] = await store.steps.after("sc-1")
    assert kept.data == {"n": 1}


async def test_a_step_is_announced_only_while_its_run_is_followed(
    store: RunStore, subscriber: Subscriber, redis_client: RedisClient, keys: Keys
) -> None:
    """Every replica receives every announcement, so a step is announced only while a
    follower (a stream, a milestone wait) has marked its run; the end is always announced,
    and a run's last step rides on it."""
    await claim(store, "sa-1")
    assert await store.steps.record("sa-1", a_step("unseen"))
    await store.steps.follow("sa-1", for_s=30)
    await store.steps.follow("sa-1", for_s=0.05)  # a shorter wish does not shorten it
    await asyncio.sleep(0.1)
    assert await store.steps.record("sa-1", a_step("seen"))
    cid, body = await subscriber()  # the first message: the unfollowed step had none
    [_, (seen_id, _)] = await store.steps.after("sa-1")
    assert (cid, decode_message(body)) == ("sa-1", StepRecorded(seen_id))
    assert 25_000 < await redis_client.pttl(keys.followed("sa-1")) <= 30_000

    await redis_client.delete(keys.followed("sa-1"))  # its followers are gone
    assert await store.steps.record("sa-1", a_step("late"))
    await store.steps.follow("sa-1", for_s=30)
    assert await store.finish("sa-1", Status.OK, data={}, step=a_step("last"))
    cid, body = await subscriber()
    assert cid == "sa-1"
    assert isinstance(decode_message(body), RunState)
    assert [step.step for _, step in await store.steps.after("sa-1")][-2:] == ["late", "last"]


async def test_what_the_watcher_looks_up_before_it_records(store: RunStore) -> None:
    """Which reported steps are recorded already, and which ended runs are still pending,
    each in one round trip, whatever the order and the runs they belong to."""
    await claim(store, "kn-1")
    await claim(store, "kn-2")
    assert await store.steps.record("kn-1", a_step("a"))
    assert await store.steps.record("kn-2", a_step("b"))
    asked = [("kn-1", "a:1"), ("kn-2", "a:1"), ("kn-1", "b:1"), ("kn-2", "b:1"), ("kn-3", "a:1")]
    assert await store.steps.known(asked) == [True, False, False, True, False]
    assert await store.steps.known([]) == []
    assert await store.finish("kn-2", Status.OK, data={})
    assert await store.pending_among(["kn-1", "kn-2", "kn-3"]) == {"kn-1"}


async def test_a_released_claim_leaves_the_step_to_whoever_reports_it(store: RunStore) -> None:
    await claim(store, "sc-2")
    await store.steps.claim("sc-2", "work:1", "w1")
    await store.steps.claim("sc-2", "work:1", "w2")  # w1's lock expired; w2 has the task
    await store.steps.release("sc-2", "work:1", "w1")  # w1's late report was refused

    assert not await store.steps.record("sc-2", a_step("work"))  # still w2's

    await store.steps.release("sc-2", "work:1", "w2")  # refused too (the task was cancelled)
    assert await store.steps.record("sc-2", a_step("work"))
    assert [step.step for _, step in await store.steps.after("sc-2")] == ["work"]


async def test_a_step_of_a_gone_run_is_neither_claimed_nor_recorded(
    store: RunStore, redis_client: RedisClient, keys: Keys
) -> None:
    await store.steps.claim("sc-3", "work:1", "w1")
    assert not await store.steps.record("sc-3", a_step("work"), worker=True)
    assert await redis_client.exists(keys.steps_claimed("sc-3"), keys.steps("sc-3")) == 0
