"""Every Redis key and channel name, in one place, so producers and consumers agree.

All names start with the configured prefix (``REDIS_PREFIX``, default ``fg``), so
several environments can share one Redis server.

====================================  =========================================
``{p}:proc:{correlationId}``          hash: a run's state (shared/state.py, shared/store.py)
``{p}:index``                         sorted set: correlationIds by start time (paging)
``{p}:starts``                        sorted set: claims without an engine instance yet,
                                      scored by when to look after them (starter.py)
``{p}:instances``                     hash: engine instance id -> correlationId of the
                                      runs the watcher reads the history of
``{p}:instances:ended``               sorted set: ended instances, scored by when the
                                      watcher stops reading their history
``{p}:steps:{correlationId}``         stream: the run's steps as they end (shared/steps.py)
``{p}:steps:{correlationId}:seen``    set: activity instance ids recorded there already
``{p}:callbacks``                     sorted set: runs whose end is to be delivered to their
                                      callbackUrl, scored by when (services/api/callbacks.py)
``{p}:callbacks:attempts``            hash: correlationId -> delivery attempts so far
``{p}:cancel:{correlationId}``        string: the reason a cancel was asked for, until the run
                                      ends (the watcher ends a deleted instance's run with it)
``{p}:watcher``                       string: the replica that watches the engine (lease)
``{p}:watcher:mark``                  string: how far the watcher has read the history
``{p}:run:{correlationId}``           pub/sub channel: the run changed (a step, its end)
``{p}:wb``                            stream: write-behind entries for Postgres
``{p}:wb:dead``                       stream: entries Postgres refused too often
``{p}:worker:{name}:{slot}:lease``    string: which worker process holds a slot
``{p}:worker:{name}:{slot}:last``     string: the last worker id that held the slot
``{p}:worker:departed``               sorted set: departed worker ids, scored by when their
                                      abandoned polls end (services/worker/locks.py)
====================================  =========================================
"""

from __future__ import annotations

from dataclasses import dataclass

WRITEBEHIND_GROUP = "flusher"


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "fg"

    def state(self, correlation_id: str) -> str:
        return f"{self.prefix}:proc:{correlation_id}"

    @property
    def index(self) -> str:
        return f"{self.prefix}:index"

    @property
    def starts(self) -> str:
        return f"{self.prefix}:starts"

    @property
    def instances(self) -> str:
        return f"{self.prefix}:instances"

    @property
    def instances_ended(self) -> str:
        return f"{self.prefix}:instances:ended"

    def steps(self, correlation_id: str) -> str:
        return f"{self.prefix}:steps:{correlation_id}"

    def steps_seen(self, correlation_id: str) -> str:
        return f"{self.prefix}:steps:{correlation_id}:seen"

    def cancel(self, correlation_id: str) -> str:
        return f"{self.prefix}:cancel:{correlation_id}"

    @property
    def callbacks(self) -> str:
        return f"{self.prefix}:callbacks"

    @property
    def callback_attempts(self) -> str:
        return f"{self.prefix}:callbacks:attempts"

    @property
    def watcher(self) -> str:
        return f"{self.prefix}:watcher"

    @property
    def watcher_mark(self) -> str:
        return f"{self.prefix}:watcher:mark"

    def run_channel(self, correlation_id: str) -> str:
        return f"{self.prefix}:run:{correlation_id}"

    @property
    def run_pattern(self) -> str:
        """The one pattern each API replica subscribes to (see services/api/waitroom.py)."""
        return f"{self.prefix}:run:*"

    def correlation_id_of(self, channel: str) -> str:
        return channel[len(self.prefix) + len(":run:") :]

    @property
    def writebehind(self) -> str:
        return f"{self.prefix}:wb"

    @property
    def writebehind_dead(self) -> str:
        return f"{self.prefix}:wb:dead"

    def worker_slot(self, name: str, slot: int, part: str) -> str:
        """``part`` is ``lease`` or ``last`` (see services/worker/identity.py)."""
        return f"{self.prefix}:worker:{name}:{slot}:{part}"

    @property
    def departed_workers(self) -> str:
        return f"{self.prefix}:worker:departed"
