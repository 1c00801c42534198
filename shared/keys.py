"""Every Redis key and channel name, in one place, so producers and consumers agree.

All names start with the configured prefix (``REDIS_PREFIX``, default ``fg``), so
several environments can share one Redis.

Runs are spread over :data:`PARTITIONS` partitions by their correlationId. Every key of a
partition carries its hash tag ``{p:n}``, so each Lua transition touches one hash slot and
runs as it is on a Redis Cluster; on a single Redis the tags are just part of the names.

====================================  =========================================
``{p:n}:proc:{correlationId}``        hash: a run's state (shared/state.py, shared/store/runs.py)
``{p:n}:index``                       sorted set: the partition's runs by start time (paging)
``{p:n}:starts``                      sorted set: claims without an engine instance yet,
                                      scored by when to look after them (starter.py)
``{p:n}:instances``                   hash: engine instance id -> correlationId of the
                                      runs the watcher reads the history of
``{p:n}:instances:ended``             sorted set: ended instances, scored by when the
                                      watcher stops reading their history
``{p:n}:steps:{correlationId}``       stream: the run's steps as they end (shared/steps.py)
``{p:n}:steps:{correlationId}:seen``  set: activity instance ids recorded there already
``{p:n}:steps:{correlationId}:claimed`` hash: activity instance id -> the worker that is
                                      telling the engine it ended (that worker records it)
``{p:n}:followed:{correlationId}``    string: someone follows the run's steps (an event
                                      stream, a milestone wait): only then is each step
                                      announced on the run channel; lapses unless renewed
``{p:n}:callbacks``                   sorted set: runs whose end is to be delivered to their
                                      callbackUrl, scored by when (services/background/callbacks.py)
``{p:n}:compact``                     sorted set: finished runs whose steps leave Redis once
                                      Postgres has them, scored by when (services/flusher)
``{p:n}:cancel:{correlationId}``      string: the reason a cancel was asked for, until the run
                                      ends (the watcher ends a deleted instance's run with it)
``{p:n}:task:{taskId}``               string: a user task of one of the partition's runs is
                                      being or was completed (services/api/usertasks.py)
``{p:n}:msg:{correlationId}:{messageId}`` hash: a message sent to a run: held, sent,
                                      correlated or expired (services/api/messages.py)
``{p:n}:msgs:held``                   sorted set: the records of messages being held, scored
                                      by when their holder's lease lapses
``{p:n}:waiting:{correlationId}``     string: what a pending run waits for, read from the
                                      engine a moment ago (services/api/waiting.py)
``{p:n}:stalled:{activityInstanceId}`` string: a stall of a run's step was raised (once)
``{p:n}:stalls:{correlationId}``      list: the run's stalls, for its event streams
                                      (services/background/stalls.py)
``{p:n}:run``                         pub/sub channel (sharded on a cluster): a run of the
                                      partition changed (shared/contract.py messages)
``{p:n}:wb``                          stream: write-behind entries for Postgres
``{p:n}:wb:dead``                     stream: entries Postgres refused too often
``{p}:callbacks:attempts``            hash: correlationId -> delivery attempts so far
``{p}:watcher``                       string: the replica that watches the engine (lease)
``{p}:watcher:mark``                  string: how far the watcher has read the history
``{p}:watcher:events``                string: how far it has read the engine's pushed events
``{p}:watcher:boot``                  string: the boot id of the engine that pushes them
``{p}:watcher:lost``                  string: the last lost-events mark it read the history for
``{p}:backlog``                       string: the replica that samples the engine's backlog (lease)
``{p}:stalls``                        string: the replica that looks for stalled runs (lease)
``{p}:messages``                      string: the replica that takes over held messages whose
                                      holder died (lease)
``{p:worker:{name}:{slot}}:lease``    string: which worker process holds a slot
``{p:worker:{name}:{slot}}:last``     string: the last worker id that held the slot
``{p:t:{tenant}}:starts``             string: when a tenant may start its next run (api/limits.py)
``{p:t:{tenant}}:share:{window}``     string: a tenant's starts in a 10 s window (its runs'
                                      fetch priority, api/limits.py)
``{p:t:{tenant}}:runs``               sorted set: a tenant's runs in flight, scored by when their
                                      place lapses; ``:parked``, ``:streams`` alike
``{p}:readtoken:key``                 string: the key read tokens are signed with, unless
                                      READ_TOKEN_SECRET is set (services/api/readtokens.py)
``{p}:worker:departed``               sorted set: departed worker ids, scored by when their
                                      abandoned polls end (services/worker/locks.py)
====================================  =========================================
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

#: How many partitions the runs are spread over. Fixed: a different number would look for
#: the runs Redis holds in the wrong partitions.
PARTITIONS = 16

WRITEBEHIND_GROUP = "flusher"


@dataclass(frozen=True, slots=True)
class Partition:
    """The keys a partition's runs share, all in one hash slot."""

    number: int
    tag: str  # "{fg:3}"

    @property
    def state_prefix(self) -> str:
        """A run's state is this followed by its correlationId."""
        return f"{self.tag}:proc:"

    @property
    def steps_prefix(self) -> str:
        """A run's steps stream is this followed by its correlationId."""
        return f"{self.tag}:steps:"

    @property
    def index(self) -> str:
        return f"{self.tag}:index"

    @property
    def starts(self) -> str:
        return f"{self.tag}:starts"

    @property
    def instances(self) -> str:
        return f"{self.tag}:instances"

    @property
    def instances_ended(self) -> str:
        return f"{self.tag}:instances:ended"

    @property
    def callbacks(self) -> str:
        return f"{self.tag}:callbacks"

    @property
    def compact(self) -> str:
        return f"{self.tag}:compact"

    @property
    def channel(self) -> str:
        return f"{self.tag}:run"

    @property
    def writebehind(self) -> str:
        return f"{self.tag}:wb"

    @property
    def writebehind_dead(self) -> str:
        return f"{self.tag}:wb:dead"

    @property
    def messages_held(self) -> str:
        return f"{self.tag}:msgs:held"


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "fg"

    @property
    def partitions(self) -> list[Partition]:
        return [self.partition(n) for n in range(PARTITIONS)]

    def partition(self, number: int) -> Partition:
        return Partition(number, f"{{{self.prefix}:{number}}}")

    def of(self, correlation_id: str) -> Partition:
        """The partition a run belongs to."""
        return self.partition(zlib.crc32(correlation_id.encode()) % PARTITIONS)

    def state(self, correlation_id: str) -> str:
        return self.of(correlation_id).state_prefix + correlation_id

    def steps(self, correlation_id: str) -> str:
        return self.of(correlation_id).steps_prefix + correlation_id

    def steps_seen(self, correlation_id: str) -> str:
        return f"{self.steps(correlation_id)}:seen"

    def steps_claimed(self, correlation_id: str) -> str:
        return f"{self.steps(correlation_id)}:claimed"

    def followed(self, correlation_id: str) -> str:
        return f"{self.of(correlation_id).tag}:followed:{correlation_id}"

    def cancel(self, correlation_id: str) -> str:
        return f"{self.of(correlation_id).tag}:cancel:{correlation_id}"

    def user_task(self, correlation_id: str, task_id: str) -> str:
        return f"{self.of(correlation_id).tag}:task:{task_id}"

    def message(self, correlation_id: str, message_id: str) -> str:
        return f"{self.of(correlation_id).tag}:msg:{correlation_id}:{message_id}"

    def stalled(self, correlation_id: str, activity_instance_id: str) -> str:
        return f"{self.of(correlation_id).tag}:stalled:{activity_instance_id}"

    def stalls(self, correlation_id: str) -> str:
        return f"{self.of(correlation_id).tag}:stalls:{correlation_id}"

    @property
    def stalls_lease(self) -> str:
        return f"{self.prefix}:stalls"

    @property
    def messages_lease(self) -> str:
        return f"{self.prefix}:messages"

    def waiting(self, correlation_id: str) -> str:
        return f"{self.of(correlation_id).tag}:waiting:{correlation_id}"

    @property
    def callback_attempts(self) -> str:
        return f"{self.prefix}:callbacks:attempts"

    @property
    def watcher(self) -> str:
        return f"{self.prefix}:watcher"

    @property
    def watcher_mark(self) -> str:
        return f"{self.prefix}:watcher:mark"

    @property
    def watcher_incidents(self) -> str:
        """Incidents left to the worker that claimed their step, by when the watcher ends
        their runs itself (services/background/watcher.py)."""
        return f"{self.prefix}:watcher:incidents"

    @property
    def watcher_events(self) -> str:
        return f"{self.prefix}:watcher:events"

    @property
    def watcher_boot(self) -> str:
        return f"{self.prefix}:watcher:boot"

    @property
    def watcher_lost(self) -> str:
        return f"{self.prefix}:watcher:lost"

    @property
    def backlog(self) -> str:
        return f"{self.prefix}:backlog"

    def worker_slot(self, name: str, slot: int, part: str) -> str:
        """``part`` is ``lease`` or ``last`` (see services/worker/identity.py); a slot's two
        keys share a hash slot, for the script that moves them together."""
        return f"{{{self.prefix}:worker:{name}:{slot}}}:{part}"

    def tenant(self, tenant: str) -> str:
        """The hash tag every limit counter of ``tenant`` starts with (one slot per tenant)."""
        return f"{{{self.prefix}:t:{tenant}}}"

    @property
    def read_token_key(self) -> str:
        return f"{self.prefix}:readtoken:key"

    @property
    def departed_workers(self) -> str:
        return f"{self.prefix}:worker:departed"
