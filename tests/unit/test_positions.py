"""meterline.core.positions: the dedupe key identifies (source, id) and nothing else, event by event or a
message at a time (`message_keys`, and the worker's `processor.batch._keys` around it)."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterline.core.positions import Sighting, dedupe_key, first_sighting, message_keys
from processor.batch import _NO_KEY, _keys

# Text with NULs and other separators over-represented: the inputs a plain separator cannot frame.
_TEXT = st.text(alphabet=st.sampled_from(["a", "b", "\x00", "\x01", ":", "é"]), max_size=6)


def test_a_nul_inside_source_or_id_does_not_collide() -> None:
    assert dedupe_key("a\x00b", "c") != dedupe_key("a", "b\x00c")


@given(_TEXT, _TEXT, _TEXT, _TEXT)
def test_keys_are_equal_exactly_when_the_pairs_are(s1: str, i1: str, s2: str, i2: str) -> None:
    assert (dedupe_key(s1, i1) == dedupe_key(s2, i2)) == ((s1, i1) == (s2, i2))


def test_key_is_16_bytes() -> None:
    assert len(dedupe_key("source", "id")) == 16


def oracle_key(source: str, event_id: str, namespace: str) -> bytes:
    """The encoding written out: length-prefixed UTF-8 of namespace (not for `default`), source, id."""
    parts = [namespace, source, event_id] if namespace != "default" else [source, event_id]
    return hashlib.blake2b(b"".join(len(p.encode()).to_bytes(4, "big") + p.encode() for p in parts),
                           digest_size=16).digest()


_NAMESPACES = st.sampled_from(["default", "acme", "a\x00b", "é"])


@given(st.lists(st.tuples(st.sampled_from(["src", "a\x00", "é", ""]), _TEXT), max_size=12), _NAMESPACES)
def test_a_message_s_keys_are_each_event_s_key(pairs: list[tuple[str, str]], namespace: str) -> None:
    events = [{"source": s, "id": i} for s, i in pairs]
    expected = [oracle_key(s, i, namespace) for s, i in pairs]
    assert message_keys(events, namespace) == expected
    assert [dedupe_key(s, i, namespace) for s, i in pairs] == expected


@given(st.lists(st.one_of(st.tuples(st.just("src"), _TEXT), st.tuples(st.sampled_from([None, 3, ["x"]]), _TEXT),
                          st.tuples(st.just("src"), st.sampled_from([None, 7])), st.just("not an event")),
                max_size=8), _NAMESPACES)
def test_an_invalid_event_gets_no_key_and_the_others_theirs(items: list[Any], namespace: str) -> None:
    events = [{"source": item[0], "id": item[1]} if isinstance(item, tuple) else item for item in items]
    expected = [oracle_key(item[0], item[1], namespace)
                if isinstance(item, tuple) and type(item[0]) is str and type(item[1]) is str else _NO_KEY
                for item in items]
    assert _keys(events, namespace) == expected
    if _NO_KEY in expected:
        with pytest.raises((KeyError, TypeError, AttributeError)):
            message_keys(events, namespace)


# --------------------------------------------------------------------------- which stored copy counts
_SIGHTINGS = st.builds(Sighting, st.integers(0, 3), st.sampled_from(["c1/t1", "c2/t1"]), st.integers(0, 3),
                       st.integers(0, 3), st.integers(0, 2))


def test_the_copy_sent_first_wins_and_the_position_breaks_ties() -> None:
    early, late = Sighting(100, "c/t", 5, 900, 3), Sighting(101, "c/t", 0, 1, 0)
    assert first_sighting(early, late) == first_sighting(late, early) == early
    same_second = [Sighting(100, "c/t", 2, 7, 1), Sighting(100, "c/t", 1, 9, 0), Sighting(100, "c/t", 1, 8, 4)]
    assert first_sighting(first_sighting(same_second[0], same_second[1]), same_second[2]) == same_second[2]


@given(_SIGHTINGS, _SIGHTINGS, _SIGHTINGS)
def test_every_worker_picks_the_same_copy_in_whatever_order_it_meets_them(
        a: Sighting, b: Sighting, c: Sighting) -> None:
    """The rule is a total order: symmetric, one of the two, and with three copies the order of meeting
    them does not matter -- so workers that never talk agree, and a copy that lost once never wins."""
    assert first_sighting(a, b) == first_sighting(b, a) in (a, b)
    orders = [(a, b, c), (a, c, b), (b, c, a), (c, b, a)]
    winners = {first_sighting(first_sighting(x, y), z) for x, y, z in orders}
    assert len(winners) == 1
    loser = b if first_sighting(a, b) == a and a != b else None
    if loser is not None:
        assert first_sighting(first_sighting(a, c), loser) != loser
