"""Key names: what a Redis Cluster needs of them (one hash slot per transition)."""

from __future__ import annotations

import uuid
from collections import Counter

import pytest
from redis.crc import key_slot

from flowgate.shared.keys import PARTITIONS, Keys


def slot(key: str) -> int:
    return int(key_slot(key.encode()))


@pytest.mark.parametrize("prefix", ["fg", "t1234abcd", "a-b_c"])
def test_every_key_a_run_transition_touches_is_in_one_slot(prefix: str) -> None:
    keys = Keys(prefix)
    for cid in ("c-1", "order:42", "ÄÖ-{braces}-x", str(uuid.uuid4())):
        part = keys.of(cid)
        run_keys = [
            keys.state(cid), keys.steps(cid), keys.steps_seen(cid), keys.cancel(cid),
            part.index, part.starts, part.instances, part.instances_ended, part.callbacks,
            part.writebehind, part.writebehind_dead, part.channel,
        ]  # fmt: skip
        assert {slot(key) for key in run_keys} == {slot(part.tag)}, cid
        assert keys.state(cid) == part.state_prefix + cid  # what paging reads by name


def test_runs_spread_over_every_partition_and_partitions_are_stable() -> None:
    keys = Keys("fg")
    counts = Counter(keys.of(f"c-{n}").number for n in range(16_000))
    assert set(counts) == set(range(PARTITIONS))
    assert max(counts.values()) < 1.2 * min(counts.values())
    # The partition of an id never changes (it is where Redis keeps the run).
    assert keys.of("order-1").number == keys.of("order-1").number == 15


def test_a_worker_slots_two_keys_share_a_slot() -> None:
    keys = Keys("fg")
    assert slot(keys.worker_slot("w", 3, "lease")) == slot(keys.worker_slot("w", 3, "last"))


def test_prefixes_keep_environments_apart() -> None:
    assert Keys("a").state("x") != Keys("b").state("x")
    tags = [{p.tag for p in Keys(prefix).partitions} for prefix in ("a", "b")]
    assert not tags[0] & tags[1]
