"""query/coarse_answers.py: the kept answers stay within their row bound, least recently used out first."""

from __future__ import annotations

from query.coarse_answers import CoarseAnswers


def test_bounded_by_rows_least_recently_used_out_first() -> None:
    kept = CoarseAnswers(max_rows=40)
    kept.put("a", [0] * 8)
    kept.put("b", [0] * 10)
    kept.put("c", [0] * 8)
    assert kept.get("a") == (0,) * 8  # now the most recently used
    kept.put("d", [0] * 10)  # 36 rows: still fits
    assert kept.rows == 36
    kept.put("e", [0] * 8)  # over the bound: "b" (least recently used) goes
    assert kept.get("b") is None and kept.get("a") == (0,) * 8 and kept.rows == 34
    kept.put("a", [1] * 4)  # replacing an answer frees its old rows
    assert kept.rows == 30 and kept.get("a") == (1,) * 4
    kept.put("big", [0] * 11)  # more than a quarter of the bound: never kept
    assert kept.get("big") is None and kept.rows == 30
    assert (kept.hits, kept.misses) == (3, 2)


def test_zero_keeps_nothing() -> None:
    kept = CoarseAnswers(max_rows=0)
    kept.put("empty", [])
    assert kept.get("empty") is None and kept.rows == 0
