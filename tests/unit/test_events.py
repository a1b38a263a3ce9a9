"""meterline.core.events: validation rules, per-field errors by index, codec round-trip, chunking."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from meterline.core.attributes import MAX_LENGTHS
from meterline.core.errors import InvalidEventError
from meterline.core.events import (
    CHUNK_MAX_BYTES,
    decode_batch,
    encode_messages,
    validate_events,
)
from meterline.core.events.validation import _fast_event, _validate_one

NOW = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


def ev(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "specversion": "1.0",
        "id": "e1",
        "source": "svc",
        "type": "prompt",
        "subject": "cust-1",
        "time": "2024-01-01T00:00:00.001Z",
        "data": {"tokens": "123456"},
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}


def errors_of(items: list[Any], **kw: Any) -> list[dict[str, Any]]:
    with pytest.raises(InvalidEventError) as info:
        validate_events(items, NOW, **kw)
    return info.value.errors


def fields(errors: list[dict[str, Any]]) -> set[tuple[int, str]]:
    return {(e["index"], e["field"]) for e in errors}


def test_valid_event_is_normalised() -> None:
    [out] = validate_events([ev(time="2024-01-01T01:00:00.5+01:00", myext="x")], NOW)
    assert out["time"] == "2024-01-01T00:00:00.500000Z"
    assert out["myext"] == "x"
    assert out["data"] == {"tokens": "123456"}
    assert {"specversion", "id", "source", "type", "subject", "time"} <= out.keys()


def test_missing_time_defaults_to_receive_time() -> None:
    [out] = validate_events([ev(time=...)], NOW)
    assert out["time"] == "2024-05-01T12:00:00.123456Z"
    [out] = validate_events([ev(time=None)], NOW)  # null == absent (JSON event format)
    assert out["time"] == "2024-05-01T12:00:00.123456Z"


@pytest.mark.parametrize("field", ["id", "source", "type", "subject", "specversion"])
def test_required_fields_missing(field: str) -> None:
    assert fields(errors_of([ev(**{field: ...})])) == {(0, field)}


@pytest.mark.parametrize("field", ["id", "source", "type", "subject"])
@pytest.mark.parametrize("value", ["", 5, None, ["x"]])
def test_required_fields_must_be_non_empty_strings(field: str, value: Any) -> None:
    assert fields(errors_of([ev(**{field: value})])) == {(0, field)}


def test_specversion_must_be_1_0() -> None:
    [err] = errors_of([ev(specversion="0.3")])
    assert err["field"] == "specversion" and "1.0" in err["message"]


@pytest.mark.parametrize(
    "value",
    [
        "2024-01-01",
        "2024-13-01T00:00:00Z",
        "yesterday",
        "2024-01-01T00:00:00",
        1700000000,
        "1969-12-31T23:59:59Z",
    ],
)
def test_bad_time(value: Any) -> None:
    assert fields(errors_of([ev(time=value)])) == {(0, "time")}


def test_every_invalid_event_is_reported_with_its_index() -> None:
    items = [ev(), ev(id=""), "not an object", ev(), ev(source=..., subject=7, time="x")]
    errs = errors_of(items)
    assert fields(errs) == {(1, "id"), (2, "event"), (4, "source"), (4, "subject"), (4, "time")}
    assert all(e["message"] for e in errs)


def test_data_limits() -> None:
    deep: Any = 1
    for _ in range(5):
        deep = [deep]
    assert fields(errors_of([ev(data=deep)], max_data_depth=4)) == {(0, "data")}
    assert validate_events([ev(data=deep)], NOW, max_data_depth=5)
    big = {"s": "x" * 100}
    assert fields(errors_of([ev(data=big)], max_data_bytes=50)) == {(0, "data")}


def test_extension_rules() -> None:
    assert fields(errors_of([ev(Bad_Name="x")])) == {(0, "Bad_Name")}
    assert fields(errors_of([ev(ext={"nested": 1})])) == {(0, "ext")}
    assert fields(errors_of([ev(data_base64="AAAA")])) == {(0, "data_base64")}
    [out] = validate_events([ev(traceparent="00-abc", n=1, flag=True)], NOW)
    assert (out["traceparent"], out["n"], out["flag"]) == ("00-abc", 1, True)


def test_any_json_data_is_kept() -> None:
    for data in [1, "s", [1, 2], {"a": None}, True, 1.5]:
        [out] = validate_events([ev(data=data)], NOW)
        assert out["data"] == data


def test_codec_round_trip() -> None:
    events = validate_events([ev(id=str(i), data={"v": i, "s": "é"}) for i in range(3)], NOW)
    [(key, blob)] = encode_messages(events)
    assert key == b"cust-1" and decode_batch(blob) == events


@pytest.mark.parametrize("payload", [b"not json", b"{}", b"[1]", b'"x"'])
def test_decode_rejects_foreign_payloads(payload: bytes) -> None:
    with pytest.raises(InvalidEventError):
        decode_batch(payload)


# ------------------------------------------------------------------------------------------- chunking
subjects = st.sampled_from(["a", "b", "c", "d"])
event_lists = st.lists(
    st.builds(
        lambda i, s, pad: {"id": str(i), "subject": s, "data": "x" * pad},
        st.integers(0, 10**6),
        subjects,
        st.integers(0, 300),
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(events=event_lists, max_events=st.integers(1, 10), max_bytes=st.integers(400, 3000))
def test_encode_messages_chunks_by_subject_preserving_every_event_in_order(
    events: list[dict[str, Any]], max_events: int, max_bytes: int
) -> None:
    # tag each event with its position so equal-looking events stay distinguishable
    events = [dict(e, pos=i) for i, e in enumerate(events)]
    messages = encode_messages(events, max_events, max_bytes)
    chunks = [(key.decode(), decode_batch(blob)) for key, blob in messages]
    flat = [e for _, chunk in chunks for e in chunk]
    assert sorted(e["pos"] for e in flat) == list(range(len(events)))  # exactly once
    for subject in {e["subject"] for e in events}:
        got = [e["pos"] for s, chunk in chunks if s == subject for e in chunk]
        assert got == [e["pos"] for e in events if e["subject"] == subject]  # order within subject
    for subject, chunk in chunks:
        assert chunk and all(e["subject"] == subject for e in chunk)
        assert len(chunk) <= max_events
        assert len(orjson.dumps(chunk)) <= max_bytes or len(chunk) == 1
    # each message is byte for byte what orjson writes for its events
    assert [blob for _, blob in messages] == [orjson.dumps(c) for _, c in chunks]


def test_default_chunk_limits() -> None:
    events = validate_events([ev(id=str(i), data={"p": "x" * 2000}) for i in range(1200)], NOW)
    chunks = [decode_batch(blob) for _, blob in encode_messages(events)]
    assert all(len(c) <= 500 and len(orjson.dumps(c)) <= CHUNK_MAX_BYTES for c in chunks)
    assert sum(len(c) for c in chunks) == 1200


# ------------------------------------------------------------------------- identity attributes
@pytest.mark.parametrize("field", ["id", "source", "subject", "type"])
@pytest.mark.parametrize("char", ["\x00", "\x1f", "\n", "\x7f", "\x9b"])
def test_control_characters_in_identity_attributes_are_refused_naming_the_field(field: str, char: str) -> None:
    with pytest.raises(InvalidEventError) as info:
        validate_events([ev(), ev(**{field: f"a{char}b"})], NOW)
    assert [(e["index"], e["field"]) for e in info.value.errors] == [(1, field)]
    assert f"U+{ord(char):04X}" in info.value.errors[0]["message"]


@pytest.mark.parametrize("field", ["id", "source", "subject", "type"])
def test_identity_attribute_lengths_are_bounded(field: str) -> None:
    limit = MAX_LENGTHS[field]
    assert validate_events([ev(**{field: "x" * limit})], NOW)[0][field] == "x" * limit
    with pytest.raises(InvalidEventError) as info:
        validate_events([ev(**{field: "é" * (limit + 1)})], NOW)
    assert [e["field"] for e in info.value.errors] == [field]
    assert str(limit) in info.value.errors[0]["message"]


def test_printable_unicode_is_kept() -> None:
    event = ev(subject="klant 1 ✓ \u00a0 😀", id="a b\u200bc")
    assert validate_events([event], NOW)[0]["subject"] == event["subject"]


# ------------------------------------------------------------------------- fast path == full path
_text = st.one_of(st.sampled_from(["", "a", "svc-1", "é", "\x00", "a\x85b", "x" * 300, "x" * 1100]),
                  st.text(max_size=12))
_maybe = st.one_of(_text, st.none(), st.integers(), st.booleans(), st.just({"a": 1}))
_times = st.one_of(
    st.none(),
    st.sampled_from([
        "2024-01-01T00:00:00Z", "2024-01-01T00:00:00.001Z", "2024-01-01T00:00:00.123456789Z",
        "2024-01-01T05:30:00+05:30", "2024-01-01T00:00:00-00:00", "2024-01-01 00:00:00Z",
        "2024-01-01T00:00:00", "1969-12-31T23:59:59Z", "2106-01-01T00:00:00Z", "2024-02-30T00:00:00Z",
        "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "2024-01-01T24:00:00Z", "20240101T000000Z",
        "2024-01-01T00:00:00.000000Z", "2024-01-01T00:00:00.1Z", "2024-01-01T00:00:00.12345Z",
        "2024-01-01T00:00:00.1234567Z", "2024-01-01T23:59:60Z", "2024-13-01T00:00:00Z", "2105-12-31T23:59:59.999999Z",
    ]),
    # Every shape the fast path handles by text (Z with 0-6 fraction digits) and by conversion (offsets).
    st.builds(
        lambda t, digits, offset: (
            t.strftime("%Y-%m-%dT%H:%M:%S") + (("." + t.strftime("%f")[:digits]) if digits else "") + offset
        ),
        st.datetimes(min_value=datetime(1960, 1, 1), max_value=datetime(2110, 1, 1)),
        st.integers(0, 6),
        st.sampled_from(["Z", "Z", "+00:00", "+05:45", "-09:30"]),
    ),
    st.integers(),
)
_data = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=12,
)


@st.composite
def near_valid_events(draw: st.DrawFn) -> dict:
    event: dict = {
        "specversion": draw(st.sampled_from(["1.0"] * 8 + ["0.3", 1])),
        "id": draw(_maybe), "source": draw(_maybe), "type": draw(_maybe), "subject": draw(_maybe),
    }
    for name in ("id", "source", "type", "subject"):
        if draw(st.integers(0, 19)) < 18:
            event[name] = draw(st.sampled_from(["evt-1", "svc", "prompt", "customer-1"]))
        elif draw(st.booleans()):
            del event[name]
    if draw(st.booleans()):
        event["time"] = draw(_times)
    if draw(st.booleans()):
        event["data"] = draw(_data)
    for optional in ("datacontenttype", "dataschema", "ext", "Bad-Ext", "data_base64"):
        if draw(st.integers(0, 9)) == 0:
            event[optional] = draw(_maybe)
    return event


@given(near_valid_events(), st.integers(1, 4))
@hsettings(max_examples=600, deadline=None)
def test_fast_path_accepts_a_subset_with_identical_output(item: dict, depth: int) -> None:
    """The fast path may decline anything, but what it accepts the full path accepts identically."""
    fast = _fast_event(item, "2024-06-01T00:00:00.000000Z", 64 * 1024, depth)
    errors: list = []
    full = _validate_one(0, item, "2024-06-01T00:00:00.000000Z", 64 * 1024, depth, errors)
    if fast is not None:
        assert errors == [] and full == fast


def test_fast_path_takes_the_common_event() -> None:
    """Guard against the fast path silently declining everything (the property above would still pass)."""
    event = {"specversion": "1.0", "id": "1", "source": "s", "type": "t", "subject": "c",
             "time": "2024-01-01T00:00:00.001Z", "data": {"tokens": "12", "model": "m"}}
    assert _fast_event(event, "unused", 64 * 1024, 32) == {**event, "time": "2024-01-01T00:00:00.001000Z"}


@pytest.mark.parametrize(
    "raw", ["2024-01-01T00:00:00Z", "2024-01-01T00:00:00.1Z", "2024-01-01T00:00:00.123456Z", "2024-01-01T05:45:00+05:45"]
)
def test_fast_path_takes_common_time_shapes(raw: str) -> None:
    """Each shape the fast path normalises by itself is taken, and equals the full path's answer."""
    event = {"specversion": "1.0", "id": "1", "source": "s", "type": "t", "subject": "c", "time": raw}
    errors: list = []
    full = _validate_one(0, event, "unused", 64 * 1024, 32, errors)
    assert errors == [] and full is not None
    assert _fast_event(event, "unused", 64 * 1024, 32) == full
