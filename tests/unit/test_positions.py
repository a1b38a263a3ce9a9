"""meterline.core.positions: the dedupe key identifies (source, id) and nothing else."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meterline.core.positions import dedupe_key

# Text with NULs and other separators over-represented: the inputs a plain separator cannot frame.
_TEXT = st.text(alphabet=st.sampled_from(["a", "b", "\x00", "\x01", ":", "é"]), max_size=6)


def test_a_nul_inside_source_or_id_does_not_collide() -> None:
    assert dedupe_key("a\x00b", "c") != dedupe_key("a", "b\x00c")


@given(_TEXT, _TEXT, _TEXT, _TEXT)
def test_keys_are_equal_exactly_when_the_pairs_are(s1: str, i1: str, s2: str, i2: str) -> None:
    assert (dedupe_key(s1, i1) == dedupe_key(s2, i2)) == ((s1, i1) == (s2, i2))


def test_key_is_16_bytes() -> None:
    assert len(dedupe_key("source", "id")) == 16
