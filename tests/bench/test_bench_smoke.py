"""`make bench` once at the tiny size: every figure is measured, with a baseline, and is correct.

Only what was measured is checked (every event counted, P3's two answers equal, positive numbers),
never a timing threshold: benchmarks are not timed tests.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench-results")
    env = dict(os.environ, BENCH_SIZE="tiny", BENCH_RESULTS_DIR=str(out), BENCH_REPEATS="3", BENCH_P4_SECONDS="2")
    proc = subprocess.run(
        [sys.executable, "-m", "bench"], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    files = sorted(out.glob("*.json"))
    assert files, f"no results written; rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    data = json.loads(files[-1].read_text())
    assert proc.returncode == 0, f"bench failed: {data['errors']}\n{proc.stdout[-3000:]}"
    return data


def by_figure(results: dict, figure: str) -> list[dict]:
    return [f for f in results["figures"] if f["figure"] == figure]


def test_every_figure_has_positive_value_baseline_and_ratio(results: dict) -> None:
    assert results["errors"] == {}
    assert {f["figure"] for f in results["figures"]} == {"P1", "P2", "P3", "P4", "P5", "P6"}
    for f in results["figures"]:
        assert f["value"] > 0 and f["baseline"] >= 0 and f["ratio"] >= 0, f
        assert f["size"] > 0 and f["baseline_name"], f


def test_p1_measures_batches_and_single_events(results: dict) -> None:
    names = {f["name"] for f in by_figure(results, "P1")}
    assert names == {"ingest batch=1000", "ingest batch=100", "ingest single events",
                     "auth on: ingest batch=100 with an API key", "auth on: ingest single events with an API key",
                     "auth on: middleware cost per request, in process"}
    assert all(f["baseline"] > 0 and f["ratio"] > 0 for f in by_figure(results, "P1"))


def test_auth_figures_compare_the_same_requests_with_and_without_a_key(results: dict) -> None:
    auth = [f for f in results["figures"] if f["name"].startswith("auth on:")]
    assert sorted(f["figure"] for f in auth) == ["P1", "P1", "P1", "P3", "P3"]
    rounds = results["params"]["auth_rounds"]
    for f in auth:
        d = f["details"]
        if "round_ratios" not in d:
            continue
        # Oracle: the ratios recomputed here from the rounds' raw numbers.
        if f["figure"] == "P1":
            pairs = list(zip(d["without_key_ev_per_s"], d["with_key_ev_per_s"]))
            ratios = [on / off for off, on in pairs]
        else:
            pairs = list(zip(d["round_median_ms"]["without_key"], d["round_median_ms"]["with_key"]))
            ratios = [off / on for off, on in pairs]
            assert d["answer_rows"] > 0
            assert len(d["with_key_ms"]) == len(d["without_key_ms"]) == rounds * d["requests_per_round"]
        assert d["rounds"] == len(ratios) == rounds
        assert d["round_ratios"] == pytest.approx(ratios, rel=1e-2, abs=1e-3)
        assert d["ratio_median"] == pytest.approx(statistics.median(ratios), rel=1e-2, abs=1e-3)
        assert d["ratio_spread"]["min"] <= d["ratio_median"] <= d["ratio_spread"]["max"]
        if f["name"].endswith("p50") or f["figure"] == "P1":
            assert f["ratio"] == d["ratio_median"]
    (inproc,) = [f for f in auth if f["name"] == "auth on: middleware cost per request, in process"]
    d = inproc["details"]
    costs = [on - off for off, on in zip(d["without_key_us"], d["with_key_us"])]
    assert inproc["value"] == pytest.approx(statistics.median(costs), abs=0.01)
    assert len(costs) == rounds and all(x > 0 for x in d["with_key_us"])


def test_p2_and_p5_counted_every_event(results: dict) -> None:
    (p2,) = [f for f in by_figure(results, "P2") if f["name"] == "processor: events -> ClickHouse windows"]
    assert p2["details"]["meterline"]["all_counted"] is True
    assert p2["details"]["meterline"]["events"] == p2["size"]
    assert p2["details"]["naive"]["events"] > 0
    stages = p2["details"]["meterline"]["stages"]  # where the worker's time went, from its own metrics
    assert stages["meterline_processor_build"]["count"] > 0 and stages["meterline_processor_write"]["seconds"] > 0
    (p5,) = by_figure(results, "P5")
    assert p5["details"]["all_counted"] is True and p5["details"]["naive_set_rss_bytes"] > 0


def test_p6_rebuilt_every_stored_event_beside_p2(results: dict) -> None:
    (p6,) = by_figure(results, "P6")
    (p2,) = [f for f in by_figure(results, "P2") if f["name"] == "processor: events -> ClickHouse windows"]
    assert p6["details"]["all_counted"] is True and p6["size"] == p2["size"]
    assert p6["baseline"] == p2["value"]  # the live rate of the same run is the baseline


def test_p3_answers_were_equal(results: dict) -> None:
    p3 = [f for f in by_figure(results, "P3") if not f["name"].startswith("auth on:")]
    # heaviest subject, median subject, all subjects, heaviest compacted (kept answer, coarse rows not kept,
    # and minute rows only); p50 and p95 each
    assert len(p3) == 12
    heavy = next(f for f in p3 if "heaviest" in f["name"])["details"]
    median = next(f for f in p3 if "median" in f["name"])["details"]
    assert heavy["subject"] != median["subject"]
    assert heavy["subject_events"]["heaviest"] > heavy["subject_events"]["median"] > 0
    for f in p3:
        assert f["details"]["answers_equal"] is True
        assert f["details"]["events_rows"] == f["size"]
        assert f["details"]["answer_rows"] > 0 and f["baseline"] > 0
    compacted = [f["details"] for f in p3 if "compacted" in f["name"]]
    assert len(compacted) == 6
    assert all(0 < after <= before for before, after in compacted[0]["window_rows"].values())
    assert 0 < compacted[0]["heaviest_subject_coarse_rows"] <= compacted[0]["heaviest_subject_window_rows"][1]
    assert len(compacted[0]["minute_rows_ms"]) == len(compacted[0]["windows_ms"])
    assert len(compacted[0]["coarse_rows_not_kept_ms"]) == len(compacted[0]["windows_ms"])
    assert compacted[0]["requests_per_query"]["coarse rows, kept answer"] == 1


def test_p4_every_request_became_visible(results: dict) -> None:
    p4 = by_figure(results, "P4")
    assert {f["name"].split()[1] for f in p4} == {"p50", "p99"}
    assert all(f["details"]["all_visible"] for f in p4)
    where = p4[0]["details"]["where"]
    # every request's messages were aged at their batch's start; the poller timed its queries
    assert where["worker"]["meterline_processor_message_age"]["count"] >= p4[0]["details"]["requests"]
    assert where["query_ms"]["count"] > 0 and where["query_ms"]["p50"] > 0


def test_p2_meter_counts_in_process_and_through_a_worker(results: dict) -> None:
    p2 = {f["name"]: f for f in by_figure(results, "P2")}
    core = {k: p2[f"message_rows in-process, {k} meters"] for k in (1, 3, 10, 20)}
    for k, f in core.items():
        assert f["baseline"] == core[3]["value"] and f["details"]["meters"] == k  # ratio to the 3-meter rate
        assert f["value"] > 0
    assert core[20]["target"] == ">= 0.5x" and core[20]["passed"] in (True, False)
    for k in (1, 3, 10, 20):
        f = p2[f"processor, {k} meters"]
        run = f["details"]["meterline"]
        assert run["all_counted"] is True and run["meters"] == k and run["events"] == f["size"]
        assert f["baseline"] == f["details"]["naive"]["rate"] > 0  # ratio to the naive agent
        assert f["details"]["ratio_to_3_meters"] == run["rate"] / p2["processor, 3 meters"]["details"]["meterline"]["rate"]


def test_p2_scaling_curve_on_eight_partitions(results: dict) -> None:
    p2 = {f["name"]: f for f in by_figure(results, "P2")}
    curve = [p2[f"processor, {w} workers, 8 partitions"] for w in (1, 2, 4)]
    for w, f in zip((1, 2, 4), curve):
        run = f["details"]["meterline"]
        assert run["all_counted"] is True and run["workers"] == w and run["partitions"] == 8
        assert f["value"] > 0 and f["baseline"] > 0
        assert f["details"]["ratio_to_1_worker"] == f["value"] / curve[0]["value"]
