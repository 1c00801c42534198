"""Exponential backoff with jitter, for polls and engine calls that failed.

Jitter spreads the retries of many workers that failed together (an engine restart makes
all of them fail at once) instead of having them return in lock step. It is "equal jitter"
(a random delay between half and all of the exponential step) rather than full jitter,
so a delay never collapses to almost nothing while the engine is overloaded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    """``next_delay_s()`` grows base * 2**n (capped), jittered; ``reset()`` after a success."""

    base_s: float = 0.5
    cap_s: float = 30.0
    attempt: int = field(default=0, init=False)

    def next_delay_s(self) -> float:
        ceiling = min(self.cap_s, self.base_s * 2**self.attempt)
        self.attempt = min(self.attempt + 1, 32)  # 2**32 is far past any cap; no overflow
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


def retry_timeout_ms(base_ms: int, failures: int, cap_ms: int = 300_000) -> int:
    """The failure's retryTimeout: ``base_ms`` doubled per earlier failure, at most ``cap_ms``."""
    return int(min(cap_ms, base_ms * 2 ** max(failures, 0)))
