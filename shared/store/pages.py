"""The runs Redis holds, newest first, a page at a time: :class:`Pages`.

Each partition keeps an index of its runs by start time (``{p:n}:index``, written by the
claim); a page walks the sixteen indexes, never the keyspace, and merges what they answer.
A cursor is opaque to clients (base64 of the score and the member it ended at).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Sequence
from typing import Any

from flowgate.shared.keys import Keys
from flowgate.shared.redis_client import RedisClient, text
from flowgate.shared.state import RunState
from flowgate.shared.store.scripts import PAGE, PageArgs, PageKeys
from flowgate.shared.tenancy import DEFAULT_TENANT

#: Stale entries one page call may clean up before it answers with what it has.
SCAN_CAP = 1_000


class InvalidCursor(ValueError):
    """A paging cursor that :meth:`Pages.page` did not produce (answer 400)."""


class Pages:
    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self._keys = keys
        self._page = PAGE.bound(redis)

    async def page(
        self, *, cursor: str | None, limit: int, tenant: str | None = None
    ) -> tuple[list[RunState], str | None]:
        """Newest first by start time; returns the page and the cursor of the next (None at
        the end). ``tenant``: only that tenant's runs (None: every tenant's). Raises
        :class:`InvalidCursor`."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        max_score, member = ("+inf", "") if cursor is None else _decode_cursor(cursor)
        pages = await asyncio.gather(
            *(
                self._page(
                    PageKeys(runs=partition.index),
                    PageArgs(
                        prefix=partition.state_prefix,
                        max=max_score,
                        cursor=member,
                        limit=limit,
                        cap=SCAN_CAP,
                        tenant=tenant or "",
                        default_tenant=DEFAULT_TENANT,
                    ),
                )
                for partition in self._keys.partitions
            )
        )
        return _merge_pages(pages, limit)


def _merge_pages(pages: Sequence[Sequence[Any]], limit: int) -> tuple[list[RunState], str | None]:
    """One page of at most ``limit`` runs from the partitions' pages, newest first, and the
    cursor of the next. A partition that answered short (it has more, or hit the scan cap)
    has been read down to its own cursor only, so the merged page ends where the highest
    of those cursors is: below it, that partition's runs are not known yet."""
    found: list[tuple[tuple[int, bytes], RunState]] = []
    read_down_to: list[tuple[int, bytes]] = []
    for next_score, next_member, *rest in pages:
        for score, raw in zip(rest[::2], rest[1::2], strict=True):
            state = RunState.from_json(raw)
            found.append(((int(float(text(score))), state.correlation_id.encode()), state))
        if next_score:
            read_down_to.append((int(float(text(next_score))), next_member))
    found.sort(key=lambda item: item[0], reverse=True)
    cut = max(read_down_to, default=None)
    if cut is not None:
        found = [item for item in found if item[0] >= cut]
    page = found[:limit]
    if len(found) > limit or (page and cut is not None and len(page) == limit):
        position: tuple[int, bytes] | None = page[-1][0]
    else:
        position = cut
    cursor = _encode_cursor(position[0], position[1].decode()) if position else None
    return [state for _, state in page], cursor


def _encode_cursor(score: int, member: str) -> str:
    raw = f"{score}|{member}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        score, member = raw.split("|", 1)
        return int(score), member
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidCursor(f"invalid cursor {cursor!r}") from exc
