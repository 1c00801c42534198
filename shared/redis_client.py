"""The Redis flowgate talks to: one server, or a Redis Cluster (``REDIS_CLUSTER``).

The code is the same for both: shared/keys.py puts every key a transition touches in one
hash slot. What differs is the client class and the pub/sub verbs. On a cluster the run
channels are sharded (``SPUBLISH``/``SSUBSCRIBE``): the shard that owns a channel's slot
delivers it, where a plain ``PUBLISH`` would be broadcast to every node of the cluster. A
single Redis keeps plain pub/sub, which every Redis version has.
"""

from __future__ import annotations

import contextlib
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
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


def text(raw: bytes | str) -> str:
    """A value Redis answered, as text. The clients never decode answers themselves (most
    are JSON, which orjson reads from bytes as they come), so this is bytes; redis-py's
    types allow text as well."""
    return raw.decode() if isinstance(raw, bytes) else raw
