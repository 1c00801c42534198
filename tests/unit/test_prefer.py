"""RFC 7240 Prefer parsing: what is honoured, what is ignored."""

from __future__ import annotations

import pytest

from flowgate.services.api.prefer import Preferences, parse_prefer


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], Preferences()),
        ([""], Preferences()),
        (["wait=10"], Preferences(wait_s=10)),
        (["WAIT = 10"], Preferences(wait_s=10)),
        (['wait="7"'], Preferences(wait_s=7)),
        (["respond-async"], Preferences(respond_async=True)),
        (["respond-async, wait=5"], Preferences(wait_s=5, respond_async=True)),
        (["Respond-Async;x=1 ; y"], Preferences(respond_async=True)),
        (["handling=lenient, wait=3; foo=bar"], Preferences(wait_s=3)),
        # The first occurrence wins, across header lines too (RFC 7240 §2).
        (["wait=1, wait=2"], Preferences(wait_s=1)),
        (["wait=1", "wait=2"], Preferences(wait_s=1)),
        # A quoted comma does not split the list.
        (['x="a, wait=9", wait=2'], Preferences(wait_s=2)),
        # Not delta-seconds: ignored, never an error.
        (["wait=-1"], Preferences()),
        (["wait=1.5"], Preferences()),
        (["wait=abc"], Preferences()),
        (["wait="], Preferences()),
        (["wait=٣"], Preferences()),  # a non-ASCII digit
        # Junk before a valid element is skipped up to the element that breaks the parse.
        (["wait=4, @@@, respond-async"], Preferences(wait_s=4)),
    ],
)
def test_parse_prefer(headers: list[str], expected: Preferences) -> None:
    assert parse_prefer(headers) == expected


def test_a_huge_wait_is_parsed_and_left_to_the_caller_to_cap() -> None:
    assert parse_prefer(["wait=" + "9" * 40]).wait_s == int("9" * 40)
