"""RFC 7240 ``Prefer`` request header: the two preferences this API honours.

``Prefer: wait=N`` asks to wait at most N seconds for the outcome; ``Prefer: respond-async``
asks for a 202 at once. Anything else (unknown preferences, parameters, malformed values) is
ignored, as RFC 7240 §2 requires of a server: a preference is a hint, never an error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# token = 1*tchar (RFC 9110 §5.6.2); quoted-string with backslash escapes (§5.6.4).
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_ITEM = re.compile(
    rf"\s*(?P<name>{_TOKEN})(?:\s*=\s*(?P<value>{_TOKEN}|{_QUOTED}))?"
    rf"(?P<params>(?:\s*;\s*(?:{_TOKEN}(?:\s*=\s*(?:{_TOKEN}|{_QUOTED}))?)?)*)\s*(?:,|$)"
)


@dataclass(frozen=True, slots=True)
class Preferences:
    """What the client asked for; ``None`` / ``False`` when it did not say."""

    wait_s: int | None = None
    respond_async: bool = False


def parse_prefer(headers: Iterable[str]) -> Preferences:
    """Parse every ``Prefer`` header value of one request (they form one list).

    The first occurrence of a preference counts (RFC 7240 §2); a ``wait`` that is not
    ``delta-seconds`` is ignored. A malformed element ends the parse of that header value
    but keeps what came before it.
    """
    seen: dict[str, str | None] = {}
    for header in headers:
        position = 0
        while position < len(header):
            match = _ITEM.match(header, position)
            if match is None or match.end() == position:
                break
            position = match.end()
            name = match["name"].lower()
            if name not in seen:
                value = match["value"]
                if value is not None and value.startswith('"'):
                    value = re.sub(r"\\(.)", r"\1", value[1:-1])
                seen[name] = value
    wait = seen.get("wait")
    return Preferences(
        wait_s=int(wait) if wait is not None and wait.isascii() and wait.isdigit() else None,
        respond_async="respond-async" in seen,
    )
