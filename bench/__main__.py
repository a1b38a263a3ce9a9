"""`make bench`: measure every figure next to its baseline, print a table, save JSON.

    python -m bench                         small sizes (a few minutes on 2 cores)
    python -m bench --size full             the sizes issue 6 quotes (10M events for P3/P5)
    python -m bench --only P1,P3 --p3 2000000,5000000
    python -m bench --only P1,P3 --auth-rounds 12   auth on beside off, more alternating rounds
    python -m bench --only P1 --p1-processes 1,2    P1 with one ingest process, then two (one per core)
    BENCH_SIZE=tiny python -m bench         seconds; what tests/bench runs
    python -m bench --only P3 --p3 1e6,1e7,1e8 --repeats 10   the cost curve on generated data
    python -m bench --only P5R --p5-reload 1e8 --p5-runs 2    a worker reloading 100M stored ids

Every size option takes a comma-separated list: each figure is measured once per size (the cost
curve). Options also read `BENCH_<OPTION>` from the environment.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from bench.context import BenchContext
from bench.infra import Infra
from bench.report import Figure, Report

#: Sizes per figure and preset: P1/P2/P3/P5 in events (P5: distinct ids), P4 in events/s.
PRESETS: dict[str, dict[str, list[int]]] = {
    "tiny": {"P1": [2_000], "P2": [3_000], "P3": [20_000], "P4": [200], "P5": [3_000], "P5R": [], "P6": [3_000]},
    "small": {"P1": [20_000, 50_000], "P2": [50_000, 200_000], "P3": [1_000_000, 3_000_000],
              "P4": [1_000, 5_000], "P5": [200_000], "P5R": [], "P6": [200_000]},
    "full": {"P1": [50_000, 200_000], "P2": [200_000, 1_000_000], "P3": [1_000_000, 3_000_000, 10_000_000],
             "P4": [1_000, 5_000], "P5": [1_000_000, 10_000_000], "P5R": [],
             "P6": [1_000_000]},
}
#: P5R: a worker reloading N ids generated in ClickHouse (bench/p5_reload.py), run with P5 when sizes are
#: given (`--p5-reload`); P5 sizes above `--p5-meter-max` are measured that way too.
#: P6 reuses P2's run of the same size (its stored events and live rate): keep a P6 size among P2's.
FIGURES = ("P1", "P2", "P3", "P4", "P5", "P6")
DEFAULT_RESULTS = Path(__file__).parent / "results"

app = typer.Typer(add_completion=False)


def _sizes(text: str | None) -> list[int] | None:
    return [int(float(x)) for x in text.split(",") if x.strip()] if text else None


def _runner(figure: str) -> Callable[[BenchContext, int], list[Figure]]:
    if figure == "P1":
        from bench.p1_ingest import run
    elif figure == "P2":
        from bench.p2_processor import run
    elif figure == "P3":
        from bench.p3_query import run
    elif figure == "P4":
        from bench.p4_freshness import run
    elif figure == "P5":
        from bench.p5_memory import run
    elif figure == "P5R":
        from bench.p5_reload import run
    else:
        from bench.p6_rebuild import run
    return run


@app.command()
def main(
    size: Annotated[str, typer.Option(envvar="BENCH_SIZE", help="tiny | small | full")] = "small",
    only: Annotated[str, typer.Option(envvar="BENCH_ONLY", help="figures to run, e.g. P1,P3")] = ",".join(FIGURES),
    p1: Annotated[str | None, typer.Option(envvar="BENCH_P1", help="P1 sizes (events)")] = None,
    p2: Annotated[str | None, typer.Option(envvar="BENCH_P2", help="P2 sizes (events)")] = None,
    p3: Annotated[str | None, typer.Option(envvar="BENCH_P3", help="P3 sizes (raw events in ClickHouse)")] = None,
    p4: Annotated[str | None, typer.Option(envvar="BENCH_P4", help="P4 rates (events/s)")] = None,
    p5: Annotated[str | None, typer.Option(envvar="BENCH_P5", help="P5 sizes (distinct ids)")] = None,
    p5_reload: Annotated[str | None, typer.Option(envvar="BENCH_P5_RELOAD",
                                                  help="P5 reload sizes (ids generated in ClickHouse)")] = None,
    p5_runs: Annotated[int, typer.Option(envvar="BENCH_P5_RUNS", help="P5 reload runs (new worker each)")] = 1,
    p5_per_key: Annotated[bool, typer.Option(
        envvar="BENCH_P5_PER_KEY", help="P5 reload: as many runs of the per-key load (dedupe_bulk_load=false), "
                                        "alternating, as the baseline")] = False,
    p5_reload_timeout: Annotated[float, typer.Option(
        envvar="BENCH_P5_RELOAD_TIMEOUT", help="seconds a reloading worker gets (0: 30 min, or 30 us an id if more)")] = 0,
    p5_meter_max: Annotated[int, typer.Option(envvar="BENCH_P5_METER_MAX",
                                              help="larger P5 sizes are measured by the reload")] = 20_000_000,
    p6: Annotated[str | None, typer.Option(envvar="BENCH_P6", help="P6 sizes (stored events rebuilt)")] = None,
    p1_single: Annotated[int, typer.Option(envvar="BENCH_P1_SINGLE",
                                           help="P1 single-event requests per round (at most the P1 size)")] = 5000,
    clients: Annotated[int, typer.Option(envvar="BENCH_CLIENTS", help="concurrent HTTP clients")] = 16,
    partitions: Annotated[int, typer.Option(envvar="BENCH_PARTITIONS")] = 4,
    http_workers: Annotated[int, typer.Option(envvar="BENCH_HTTP_WORKERS", help="ingest processes for P1")] = 1,
    p1_processes: Annotated[str, typer.Option(envvar="BENCH_P1_PROCESSES",
                                              help="P1 ingest process counts, each on its own server, e.g. 1,2")] = "",
    p3_subjects: Annotated[int, typer.Option(envvar="BENCH_P3_SUBJECTS")] = 100,
    p3_message_events: Annotated[int, typer.Option(envvar="BENCH_P3_MESSAGE_EVENTS",
                                                   help="P3 events per Kafka message (1: single-event requests)")] = 100,
    repeats: Annotated[int, typer.Option(envvar="BENCH_REPEATS", help="P3 runs per query")] = 20,
    auth_rounds: Annotated[int, typer.Option(envvar="BENCH_AUTH_ROUNDS",
                                             help="alternating auth off/on rounds (P1, P3; 0 = by size)")] = 0,
    naive_cap: Annotated[int, typer.Option(envvar="BENCH_NAIVE_CAP", help="max events for the naive Faust baseline")] = 0,
    p4_seconds: Annotated[float, typer.Option(envvar="BENCH_P4_SECONDS", help="P4 sending time per rate")] = 0,
    p2_extra: Annotated[int, typer.Option(envvar="BENCH_P2_EXTRA",
                                          help="events for P2's meter-count and worker-scaling runs")] = 0,
    results_dir: Annotated[Path, typer.Option(envvar="BENCH_RESULTS_DIR")] = DEFAULT_RESULTS,
    work_dir: Annotated[Path | None, typer.Option(envvar="BENCH_WORK_DIR", help="scratch (default: a temp dir)")] = None,
    keep_going: Annotated[bool, typer.Option(help="record a failing figure and continue")] = True,
) -> None:
    """Run the benchmarks and write bench/results/<timestamp>.json."""
    if size not in PRESETS:
        raise typer.BadParameter(f"size must be one of {', '.join(PRESETS)}")
    console = Console(width=max(Console().width, 120))
    logging.basicConfig(level=logging.WARNING)
    sizes = dict(PRESETS[size])
    for name, override in (("P1", p1), ("P2", p2), ("P3", p3), ("P4", p4), ("P5", p5), ("P5R", p5_reload),
                           ("P6", p6)):
        sizes[name] = _sizes(override) or sizes[name]
    wanted = [f.strip().upper() for f in only.split(",") if f.strip()]
    if "P5" in wanted and "P5R" not in wanted:
        wanted.insert(wanted.index("P5") + 1, "P5R")
    options: dict[str, Any] = {
        "clients": clients, "p1_single_cap": p1_single, "partitions": partitions, "http_workers": http_workers, "p1_processes": p1_processes, "p3_subjects": p3_subjects, "p3_message_events": p3_message_events, "p3_repeats": repeats,
        "p1_rounds": 1 if size == "tiny" else 3,
        "auth_rounds": auth_rounds or {"tiny": 2, "small": 8, "full": 10}[size],
        "auth_events": {"tiny": 1_000, "small": 20_000, "full": 50_000}[size],
        "auth_single": {"tiny": 300, "small": 2_000, "full": 3_000}[size],
        "auth_inprocess_requests": {"tiny": 5_000, "small": 20_000, "full": 50_000}[size],
        "naive_cap": naive_cap or {"tiny": 3_000, "small": 30_000, "full": 100_000}[size],
        "p4_seconds": p4_seconds or {"tiny": 3.0, "small": 15.0, "full": 30.0}[size],
        # Large enough for several batches: at 20k a worker wrote all in one batch after its ~6 s start,
        # so those rows measured start-up, not throughput.
        "p2_extra": p2_extra or {"tiny": 2_000, "small": 200_000, "full": 400_000}[size],
        "p2_core_events": {"tiny": 2_000, "small": 20_000, "full": 50_000}[size],
        "p5_runs": p5_runs, "p5_per_key": p5_per_key, "p5_meter_max": p5_meter_max, "p5_reload_timeout": p5_reload_timeout,
    }
    report = Report(size=size, params={"sizes": {f: sizes[f] for f in wanted}, **options})
    scratch = work_dir or Path(tempfile.mkdtemp(prefix="meterline-bench-"))
    infra = Infra(scratch)
    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console,
    )
    try:
        with progress:
            infra.start()
            ctx = BenchContext(infra, progress, console, options)
            overall = progress.add_task("bench", total=sum(len(sizes[f]) for f in wanted))
            for figure in wanted:
                for n in sizes[figure]:
                    progress.update(overall, description=f"bench: {figure} at {n:,}")
                    try:
                        report.figures.extend(_runner(figure)(ctx, n))
                    except Exception as exc:
                        report.errors[f"{figure}@{n}"] = f"{type(exc).__name__}: {exc}"
                        console.print(f"[red]{figure} at {n:,} failed[/red]\n{traceback.format_exc()}")
                        if not keep_going:
                            raise
                    progress.advance(overall)
    finally:
        infra.close()
        if work_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    report.print(console)
    path = report.save(results_dir)
    console.print(f"results: {path}")
    if report.errors:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
