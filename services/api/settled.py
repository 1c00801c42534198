"""Settled: the final states of runs that have ended, kept in the replica to answer status
reads without a round trip.

Why this is safe on any number of replicas: a run that has ended (``ok``, ``error``,
``cancelled``) never changes again while its record lives (shared/store/scripts.py: every
transition but the claim needs a ``pending`` run, and a claim of an ended run returns it),
and its record lives ``RESULT_TTL_S`` from its end. Only once it has gone may the same
correlationId start a new run. So an ended state may be served until its end plus
``RESULT_TTL_S``, less a margin for the clocks of the replica that ended it and this one.
An abandoned start is not an end (the id is free again) and is never kept.

The one exception: a client's retry of a run an incident ended (services/api/retry.py)
makes it ``pending`` again and tells every replica (``reopened`` on the run's channel):
:meth:`forget`. Its old ``error`` end may still be on its way to this replica (a read Redis
answered before the reopen, arriving after the message), so once reopened a run's
``error`` ends are no longer kept here at all; its ``ok`` and ``cancelled`` ones are, as
they can only follow the reopen.

Messages are heard only while the wait room's subscriptions hold, and a Redis that
restarted may have lost the records (their ids then name new runs): so nothing is served or
kept while they do not, and every end kept goes when they are made again (:meth:`hearing`).

Bounded by memory, least recently read first out: a replica holds its ends in at most
``max_bytes`` (``SETTLED_CACHE_MB``), each weighed by what its state takes in memory
(:func:`weight`), so a few runs with large results do not take the room of thousands of
small ones, nor the room the replica has.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import orjson

from flowgate.shared.state import RunState, Status

#: The end states, which never change again while their record lives.
ENDED = frozenset({Status.OK, Status.ERROR, Status.CANCELLED})
#: How far the clocks of two replicas may disagree (the margin taken off each entry).
CLOCK_MARGIN_S = 60.0
#: What a kept state takes besides its result and error, and how much more than their JSON
#: those take once parsed (measured with tracemalloc: 1.4 KB for an ``onboard-user`` end,
#: 27 KB for one whose result is 5 KB of JSON).
ENTRY_BYTES = 1_400
PARSED_PER_JSON_BYTE = 5
#: Reopened runs remembered (an id each).
REOPENED_KEPT = 10_000


def weight(state: RunState) -> int:
    """About what ``state`` takes in a replica's memory, in bytes."""
    parsed = len(orjson.dumps(state.data)) + len(orjson.dumps(state.error))
    return ENTRY_BYTES + PARSED_PER_JSON_BYTE * parsed


class Settled:
    def __init__(self, *, result_ttl_s: float, max_bytes: int) -> None:
        self._result_ttl_s = result_ttl_s
        self._max_bytes = max_bytes
        self._bytes = 0
        #: By correlationId: the state, until when it may be served, its weight.
        self._states: OrderedDict[str, tuple[RunState, float, int]] = OrderedDict()
        #: Reopened runs (their ``error`` ends are not kept), least recently reopened first.
        self._reopened: OrderedDict[str, None] = OrderedDict()
        self._hearing = False

    def hearing(self, now: bool) -> None:
        """The wait room hears every run channel from now on (True), or may not (False).
        Either way the ends kept so far go: a reopen may have gone unheard meanwhile."""
        self._hearing = now
        self._states.clear()
        self._bytes = 0

    def get(self, correlation_id: str) -> RunState | None:
        """The run's final state, if it ended and this replica has seen it do so."""
        if not self._hearing:
            return None
        found = self._states.get(correlation_id)
        if found is None:
            return None
        state, until, _ = found
        if time.time() >= until:
            self._drop(correlation_id)
            return None
        self._states.move_to_end(correlation_id)
        return state

    def forget(self, correlation_id: str) -> None:
        """The run was reopened: its end kept here is no longer its state, nor is an
        ``error`` end read before the reopen and arriving after it."""
        self._drop(correlation_id)
        self._reopened[correlation_id] = None
        self._reopened.move_to_end(correlation_id)
        if len(self._reopened) > REOPENED_KEPT:
            self._reopened.popitem(last=False)

    def keep(self, state: RunState) -> bool:
        """Keep ``state`` if it is an end, for as long as its record can live; whether it
        is one this replica had not kept yet."""
        if not self._hearing or state.status not in ENDED or state.correlation_id in self._states:
            return False
        if state.status is Status.ERROR and state.correlation_id in self._reopened:
            return False  # perhaps the end from before the reopen, read back late
        until = state.updated_at.timestamp() + self._result_ttl_s - CLOCK_MARGIN_S
        if until <= time.time():
            return False
        size = weight(state)
        if size > self._max_bytes:
            return False
        self._states[state.correlation_id] = (state, until, size)
        self._bytes += size
        while self._bytes > self._max_bytes:
            _, (_, _, gone) = self._states.popitem(last=False)
            self._bytes -= gone
        return True

    def _drop(self, correlation_id: str) -> None:
        if (found := self._states.pop(correlation_id, None)) is not None:
            self._bytes -= found[2]

    def __len__(self) -> int:
        return len(self._states)

    @property
    def bytes(self) -> int:
        """What the kept states take, by :func:`weight`."""
        return self._bytes
