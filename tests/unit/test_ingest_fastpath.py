"""`ingest.fastpath.fast_messages` answers exactly what the validator and the wire encoder answer, or None.

The oracle is the authority path itself, computed in the test: `validate_events` on the same items, the
namespace set on each event, `encode_messages` with the same limits. Requests are drawn near the edges
the fast path decides by itself (control characters in escapes, raw DEL and C1 bytes, times sharing a
minute, sizes near the data and message limits, several subjects, a namespace), and the bodies come from
two encoders (orjson writes C1 controls raw, the standard library escapes everything non-ASCII).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from ingest import fastpath
from ingest.fastpath import fast_messages
from meterline.core.attributes import MAX_LENGTHS
from meterline.core.errors import InvalidEventError
from meterline.core.events import NAMESPACE_ATTRIBUTE, encode_messages, validate_events
from meterline.core.times import format_time

NOW = datetime(2024, 6, 1, 0, 0, 0, 250000, tzinfo=UTC)


def authority(items: list[Any], namespace: str | None, max_data_bytes: int, max_data_depth: int,
              max_bytes: int, max_events: int) -> list[tuple[bytes, bytes]] | None:
    """What ingest publishes without the fast path; None when the validator refuses the request."""
    try:
        events = validate_events(items, NOW, max_data_bytes=max_data_bytes, max_data_depth=max_data_depth)
    except InvalidEventError:
        return None
    if namespace is not None:
        for event in events:
            event[NAMESPACE_ATTRIBUTE] = namespace
    return encode_messages(events, max_events=max_events, max_bytes=max_bytes)


def fast(items: list[Any], body: bytes, namespace: str | None = None, *, max_data_bytes: int = 64 * 1024,
         max_data_depth: int = 32, max_bytes: int = 500_000, max_events: int = 500) -> list[tuple[bytes, bytes]] | None:
    return fast_messages(items, body, lambda: format_time(NOW), namespace, max_data_bytes=max_data_bytes,
                         max_data_depth=max_data_depth, max_bytes=max_bytes, max_events=max_events)


_text = st.one_of(
    st.sampled_from(["a", "svc-1", "é", "\x00", "\x1f", "\x7f", "a\x85b", "\x9f", "\xa0", "£", "x" * 300,
                     "x" * 600, "x" * 1100, "tab\there", 'quote"d', "back\\slash", ""]),
    st.text(max_size=8),
)
_maybe = st.one_of(_text, st.none(), st.integers(-(2**63), 2**64 - 1), st.booleans(), st.just({"a": 1}))
#: Times around one minute (so the minute cache is exercised by several seconds of it) and the edges.
_times = st.one_of(
    st.none(),
    st.builds(lambda s, f: f"2024-06-01T10:20:{s}.{f}Z", st.sampled_from(["00", "07", "59", "60", "5", "0x", "٣٣"]),
              st.sampled_from(["000000", "123456", "12345", "1234567", "٣٣٣٣٣٣"])),
    st.sampled_from([
        "2024-06-01T10:20:30Z", "2024-06-01T10:20:30.5Z", "2024-06-01T12:20:30.123456+02:00",
        "2024-06-01 10:20:30.000000Z", "2024-06-01T10:20:30.000000z", "1969-12-31T23:59:59.999999Z",
        "1970-01-01T00:00:00.000000Z", "2105-12-31T23:59:59.999999Z", "2106-01-01T00:00:00.000000Z",
        "2024-02-30T10:20:30.000000Z", "2024-06-01T24:20:30.000000Z", "2024-06-01T10:60:30.000000Z",
    ]),
    st.integers(-5, 5),
)
_data = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=5), st.sampled_from(["\\", "\x00", "\x85", "y" * 700])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=10,
)


@st.composite
def near_valid_event(draw: st.DrawFn) -> dict[str, Any]:
    event: dict[str, Any] = {"specversion": draw(st.sampled_from(["1.0"] * 12 + ["0.3", 1, None]))}
    for name, common in (("id", ["e1", "e2", "e3"]), ("source", ["svc"]), ("type", ["prompt"]),
                         ("subject", ["c-1", "c-2", "c-3"])):
        roll = draw(st.integers(0, 19))
        if roll < 17:
            event[name] = draw(st.sampled_from(common))
        elif roll < 19:
            event[name] = draw(_maybe)
    if draw(st.integers(0, 3)):
        event["time"] = draw(_times)
    if draw(st.integers(0, 3)):
        event["data"] = draw(_data)
    for optional in ("datacontenttype", "dataschema", "ext", "data_base64", NAMESPACE_ATTRIBUTE):
        if draw(st.integers(0, 11)) == 0:
            event[optional] = draw(_maybe)
    if draw(st.booleans()):  # the sender's key order is kept, so draw it too
        event = dict(reversed(list(event.items())))
    return event


@given(
    st.lists(near_valid_event(), min_size=0, max_size=6),
    st.sampled_from(["orjson", "ascii"]),
    st.sampled_from([None, "tenant-a"]),
    st.sampled_from([(64 * 1024, 32, 500_000, 500), (900, 2, 1500, 2), (300, 1, 700, 3)]),
)
@hsettings(max_examples=600, deadline=None)
def test_what_the_fast_path_answers_is_what_the_validator_and_encoder_answer(
    items: list[dict[str, Any]], encoder: str, namespace: str | None, limits: tuple[int, int, int, int]
) -> None:
    body = orjson.dumps(items) if encoder == "orjson" else json.dumps(items, ensure_ascii=True).encode()
    parsed = orjson.loads(body)
    max_data_bytes, max_data_depth, max_bytes, max_events = limits
    got = fast(parsed, body, namespace, max_data_bytes=max_data_bytes, max_data_depth=max_data_depth,
               max_bytes=max_bytes, max_events=max_events)
    if got is not None:
        expected = authority(orjson.loads(body), namespace, max_data_bytes, max_data_depth, max_bytes, max_events)
        assert expected is not None, "the fast path accepted a request the validator refuses"
        assert got == expected
    assert parsed == orjson.loads(body)  # the items are not changed


def common(i: int, **changes: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": f"e{i}", "source": "svc", "type": "prompt", "subject": f"c-{i % 3}",
            "time": f"2024-06-01T10:20:{i % 60:02d}.{i:06d}Z", "data": {"tokens": i, "model": "m"}, **changes}


@pytest.mark.parametrize("namespace", [None, "tenant-a"])
def test_the_common_request_is_taken(namespace: str | None) -> None:
    """Guard against the fast path silently declining everything (the property above would still hold)."""
    fastpath._MINUTES.clear()
    for items in ([common(1)], [common(i) for i in range(100)],
                  [common(i, time=None, datacontenttype="application/json") for i in range(5)],
                  [{k: v for k, v in common(i, id="é-ü").items() if k not in ("time", "data")} for i in range(3)]):
        body = orjson.dumps(items)
        got = fast(orjson.loads(body), body, namespace)
        assert got is not None
        assert got == authority(orjson.loads(body), namespace, 64 * 1024, 32, 500_000, 500)


@pytest.mark.parametrize("change", [
    {}, {"specversion": "0.3"}, {"specversion": 1.0}, {"id": ""}, {"id": 7}, {"id": "x" * 1000}, {"subject": None},
    {"source": ["a"]}, {"type": "é"}, {"time": "2024-06-01T10:20:60.000000Z"}, {"time": "2024-06-01T10:20:07.12345Z"},
    {"time": "2024-06-01T10:21:07.123456Z"}, {"time": "2024-06-01T10:20:07.123456+00:00"}, {"time": None},
    {"time": 5}, {"data": None}, {"data": [1]}, {"data": {"a": {"b": 1}}}, {"data": {"a": [1]}}, {"data": 3},
    {"data": {}}, {"data": {"a": None, "b": True, "c": 1.5, "d": "s"}}, {"extra": "x"}, {"dataschema": "s"},
])
@pytest.mark.parametrize("namespace", [None, "tenant-a"])
def test_one_uncommon_event_among_common_ones_is_decided_as_the_validator_does(
        change: dict[str, Any], namespace: str | None) -> None:
    """The column checks (`_columns`, all events at once) take a request only when each event is as common
    as can be; one event otherwise, anywhere, is left to `fast_heads` or the validator, with the same answer."""
    fastpath._MINUTES.clear()
    warm = orjson.dumps([common(0)])
    assert fast(orjson.loads(warm), warm) is not None  # the minute 2024-06-01T10:20 is now known
    for position in (0, 57, 99):
        items = [common(i) for i in range(100)]
        items[position] = {k: v for k, v in {**items[position], **change}.items() if v is not None or k != "subject"}
        body = orjson.dumps(items)
        expected = authority(orjson.loads(body), namespace, 64 * 1024, 2, 500_000, 500)
        got = fast(orjson.loads(body), body, namespace, max_data_depth=2)
        assert got is None or got == expected
        if not change:
            assert fastpath._columns(orjson.loads(body), 2) is not None and got == expected


@pytest.mark.parametrize("subjects", [1, 2, fastpath._SPLIT_SUBJECTS_MAX, fastpath._SPLIT_SUBJECTS_MAX + 1, 40])
def test_every_grouping_of_subjects_is_taken_as_the_encoder_groups_it(subjects: int) -> None:
    """One subject, a few (split by subject, one encoding a subject) and many (encoded event by event), and a
    subject whose events together pass `max_data_bytes` though each is under it (event by event again)."""
    fastpath._MINUTES.clear()
    items = [common(i, subject=f"s-{(i * 7) % subjects}") for i in range(120)]
    body = orjson.dumps(items)
    for max_data_bytes in (64 * 1024, 2_000):
        got = fast(orjson.loads(body), body, "tenant-a", max_data_bytes=max_data_bytes)
        assert got is not None
        assert got == authority(orjson.loads(body), "tenant-a", max_data_bytes, 32, 500_000, 500)
        assert len(got) == subjects


@pytest.mark.parametrize("text", ["a\x85b", "a\x7fb", "a\x00b", "a\nb"])
@pytest.mark.parametrize("encoder", [orjson.dumps, lambda v: json.dumps(v).encode()])
def test_a_control_character_in_an_identity_attribute_is_left_to_the_validator(text: str, encoder: Any) -> None:
    for name in ("id", "source", "type", "subject"):
        body = encoder([common(1), common(2, **{name: text})])
        assert fast(orjson.loads(body), body) is None
        assert authority(orjson.loads(body), None, 64 * 1024, 32, 500_000, 500) is None


@pytest.mark.parametrize("name", ["id", "source", "type", "subject"])
def test_an_identity_attribute_at_its_length_limit_is_decided_as_the_validator_does(name: str) -> None:
    """A clean body skips the control-character scan, leaving only the length limits: hold them at the edge
    (the drawn texts above are far from every limit)."""
    limit = MAX_LENGTHS[name]
    at_limit = orjson.dumps([common(1, **{name: "x" * limit})])
    got = fast(orjson.loads(at_limit), at_limit)
    assert got is not None and got == authority(orjson.loads(at_limit), None, 64 * 1024, 32, 500_000, 500)
    over = orjson.dumps([common(1, **{name: "x" * (limit + 1)})])
    assert fast(orjson.loads(over), over) is None
    assert authority(orjson.loads(over), None, 64 * 1024, 32, 500_000, 500) is None


def test_a_second_of_a_known_minute_is_checked_by_itself() -> None:
    fastpath._MINUTES.clear()
    ok = [common(1, time="2024-06-01T10:20:59.999999Z")]
    body = orjson.dumps(ok)
    assert fast(orjson.loads(body), body) is not None
    assert "2024-06-01T10:20" in fastpath._MINUTES
    for bad in ("2024-06-01T10:20:60.000000Z", "2024-06-01T10:20:5a.000000Z", "2024-06-01T10:20:00.00000٣Z"):
        body = orjson.dumps([common(2, time=bad)])
        assert fast(orjson.loads(body), body) is None
        assert authority(orjson.loads(body), None, 64 * 1024, 32, 500_000, 500) is None


def test_a_subject_over_the_message_limits_is_left_to_the_encoder() -> None:
    items = [common(3 * i, data={"pad": "x" * 200}) for i in range(6)]  # one subject, ~1.7 kB
    body = orjson.dumps(items)
    assert fast(orjson.loads(body), body, max_bytes=1000) is None
    assert fast(orjson.loads(body), body, max_events=5) is None
    assert len(authority(orjson.loads(body), None, 64 * 1024, 32, 1000, 500) or []) > 1
    assert fast(orjson.loads(body), body) == authority(orjson.loads(body), None, 64 * 1024, 32, 500_000, 500)


def test_an_event_near_the_wire_limit_is_left_to_the_validator() -> None:
    """Raised data limits let one event approach CHUNK_MAX_BYTES; the validator's full path then measures it
    exactly (and orders its keys otherwise), so the fast path must decline what the validator's does."""
    event = common(1)
    del event["data"]
    # Data of 523,900 bytes: within the validator's fast-path bound by ~400 bytes less, under the wire limit
    # (CHUNK_MAX_BYTES, 524,288) with the rest of the event; data first: the full path moves it last.
    event = {"data": {"pad": "x" * 523_890}, **event}
    body = orjson.dumps([event])
    assert fast(orjson.loads(body), body, max_data_bytes=600_000, max_bytes=600_000) is None
    expected = authority(orjson.loads(body), None, 600_000, 32, 600_000, 500)
    assert expected is not None and list(orjson.loads(expected[0][1])[0])[-1] == "data"
