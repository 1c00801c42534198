"""The Redis flowgate talks to: one server, or a Redis Cluster (``REDIS_CLUSTER``).

The code is the same for both: shared/keys.py puts every key a transition touches in one
hash slot. What differs is said here and nowhere else (the seam the store, the wait room and
the flusher use):

* the client class (:func:`connect`), and reading a cluster's slots before the first burst
  (:func:`read_topology`);
* the pub/sub verbs: on a cluster the run channels are sharded (``SPUBLISH``, ``SSUBSCRIBE``;
  :func:`publish_verb`): the master that owns a channel's slot delivers it, where a plain
  ``PUBLISH`` would be broadcast to every node. A single Redis keeps plain pub/sub;
* who delivers which channel (:func:`channel_shards`): the one Redis all of them on one
  connection, or each master those of its slots, on one connection per master;
* the shape of a pipelined stream read's answer (:func:`stream_entries`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis, RedisCluster
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError, RedisClusterException, RedisError, TimeoutError

RedisClient = Redis | RedisCluster

#: What a failing Redis raises: a cluster client's own errors (no node reachable, a slot no
#: master serves) are not RedisErrors.
REDIS_ERRORS = (RedisError, RedisClusterException)

#: The cluster client's connections per node (see :func:`connect`).
CLUSTER_CONNECTIONS_PER_NODE = 4096

#: A cluster client retries a command while a failed master's replica is promoted (the
#: nodes' ``cluster-node-timeout`` plus the election): about ten seconds of retries.
_CLUSTER_RETRY = (ExponentialWithJitterBackoff(base=0.05, cap=1.0), 14)


def connect(
    url: str,
    *,
    cluster: bool,
    max_connections: int | None = None,
    pool_timeout_s: float | None = None,
    socket_timeout_s: float | None = None,
    health_check_interval: int = 0,
) -> RedisClient:
    """A client for ``url``, or a cluster client (``url`` names any node of it).

    With ``max_connections`` a single Redis's pool blocks up to ``pool_timeout_s`` for a
    free connection. The cluster client's pools cannot block (at their bound a command
    fails), so theirs is :data:`CLUSTER_CONNECTIONS_PER_NODE`, well above what the
    concurrency the API admits (``MAX_PARKED``) needs.
    """
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": socket_timeout_s,
        "health_check_interval": health_check_interval,
    }
    if cluster:
        backoff, retries = _CLUSTER_RETRY
        retry = Retry(backoff, retries, supported_errors=(ConnectionError, TimeoutError))
        return RedisCluster.from_url(
            url, retry=retry, max_connections=CLUSTER_CONNECTIONS_PER_NODE, **options
        )
    if max_connections is None:
        return Redis.from_url(url, **options)
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=pool_timeout_s, **options
    )
    return Redis.from_pool(pool)


async def read_topology(redis: RedisClient) -> None:
    """Have a cluster client read the slots now, before the first burst of commands
    (otherwise its first command does it while the others queue behind it; in the cluster
    benchmark a fresh client hit by 32 commands at once failed one under uvloop on a
    connection closed beneath it). Best effort: a cluster that does not answer yet is read
    on first use, as usual."""
    if isinstance(redis, RedisCluster):
        with contextlib.suppress(*REDIS_ERRORS):
            await redis.initialize()


def is_cluster(redis: RedisClient) -> bool:
    return isinstance(redis, RedisCluster)


def publish_verb(redis: RedisClient) -> str:
    """The command the store's scripts publish run changes with."""
    return "SPUBLISH" if is_cluster(redis) else "PUBLISH"


async def publish(redis: RedisClient, channel: str, message: bytes) -> None:
    """Publish as the store's scripts do (sharded on a cluster: see :func:`publish_verb`)."""
    await redis.execute_command(publish_verb(redis), channel, message)


def text(raw: bytes | str) -> str:
    """A value Redis answered, as text. The clients never decode answers themselves (most
    are JSON, which orjson reads from bytes as they come), so this is bytes; redis-py's
    types allow text as well."""
    return raw.decode() if isinstance(raw, bytes) else raw


class SlotsMoved(Exception):
    """A channel's slot has no master, or its master gave it up (a failover): the
    subscriptions must be made afresh on the masters the cluster names now."""


@dataclass(frozen=True, slots=True)
class Shard:
    """A Redis that delivers some of the run channels, on a connection of its own."""

    client: Redis
    channels: list[str]
    sharded: bool
    #: Whether ``client`` was opened for this shard (and is closed with it).
    own: bool

    async def subscribe(self, pubsub: PubSub) -> None:
        if self.sharded:  # one SSUBSCRIBE per channel: each is in a slot of its own
            for channel in self.channels:
                await pubsub.ssubscribe(channel)
        else:
            await pubsub.subscribe(*self.channels)

    async def close(self, pubsub: PubSub) -> None:
        with contextlib.suppress(*REDIS_ERRORS, OSError):
            await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]
            if self.own:
                await self.client.aclose()


#: The pub/sub message types: a message, a subscription confirmed, a sharded channel the
#: shard no longer serves (its slot moved: a failover).
MESSAGES = frozenset({"message", "smessage"})
CONFIRMATIONS = frozenset({"subscribe", "ssubscribe"})
MOVED = "sunsubscribe"


async def channel_shards(redis: RedisClient, channels: list[str]) -> list[Shard]:
    """Which Redis delivers which channels: the one Redis all of them; on a cluster, each
    master those whose slots it owns, as the cluster says now (:class:`SlotsMoved` when a
    slot has no master: mid-failover)."""
    if not isinstance(redis, RedisCluster):
        return [Shard(redis, channels, sharded=False, own=False)]
    await redis.nodes_manager.initialize()
    by_node: dict[str, Shard] = {}
    for channel in channels:
        node = redis.get_node_from_key(channel)
        if node is None:
            raise SlotsMoved(channel)
        if node.name not in by_node:
            pool = ConnectionPool(connection_class=node.connection_class, **node.connection_kwargs)
            by_node[node.name] = Shard(Redis(connection_pool=pool), [], sharded=True, own=True)
        by_node[node.name].channels.append(channel)
    return list(by_node.values())


def stream_entries(answer: Any) -> Iterable[Sequence[Any]]:
    """The (id, fields) entries of one stream's XREADGROUP answer, as a pipeline returns it
    (a cluster client answers a dict by stream, a single Redis's a list of pairs)."""
    streams = answer.values() if isinstance(answer, dict) else (pair[1] for pair in answer or [])
    return (entry for entries in streams for entry in entries)
