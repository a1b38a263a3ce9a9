"""P1 A/B: an older ingest beside this tree's, on one broker, in one run (`python -m bench.p1_ab --old DIR`).

Why: issue 15's "single events >= 2x per ingest process" compares with the code of the day it was filed,
and consecutive A/Bs run under different loads on the shared machine cannot be multiplied into that
figure. Here both servers start from this venv on the same broker and ClickHouse, the older one from a
source checkout put first on its PYTHONPATH (`git worktree add --detach DIR 5a28e31`; its dependencies
must be this venv's), and the same load generator as P1 (`bench.p1_ingest.ingest_rate`: 16 keep-alive
clients) drives them in alternating ABBA rounds, single events and batches of 100. Each round records
the rate and the server's CPU per request (/proc utime+stime over the round); the per-round ratios of the
CPU per request are the figure on a loaded machine, the rates only say what that load let through.
`--app ingest` (the default) serves both as `meterline serve ingest`, the ingest process README "Scaling out"
recommends, one per core; `--app all` as the combined server of `make run`, whose meter controller (a
ClickHouse poll every second, which 5a28e31's did not have) counts in the new side's CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from bench.auth import UNLIMITED_ENV, alternating
from bench.context import BenchContext
from bench.infra import Infra
from bench.p1_ingest import ingest_rate, process_cpu_seconds
from bench.workload import events, write_config
from meterline.localinfra.stack import LocalStack

Measure = Callable[[], tuple[float, float]]


class OlderStack(LocalStack):
    """A stack whose server may predate meter annotations: up once /healthz answers (`_start_server`)."""

    def _meters_ready(self) -> bool:
        return True


def measure(stack: LocalStack, sample: list[dict[str, object]], batch: int, clients: int, ctx: BenchContext) -> Measure:
    """One round: events/s and the server's CPU µs per request over it."""

    def run() -> tuple[float, float]:
        pid = stack.server.pid if stack.server is not None else None
        assert pid is not None, "the stack is not started"
        before = process_cpu_seconds(pid)
        rate = ingest_rate(stack.url, sample, batch, clients, ctx)
        requests = -(-len(sample) // batch)
        return rate, (process_cpu_seconds(pid) - before) / requests * 1e6

    return run


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f} (min {min(values):.2f}, max {max(values):.2f})"


def report(label: str, olds: list[tuple[float, float]], news: list[tuple[float, float]]) -> None:
    cpu_ratios = [o[1] / n[1] for o, n in zip(olds, news, strict=True)]
    rate_ratios = [n[0] / o[0] for o, n in zip(olds, news, strict=True)]
    print(f"{label}: old ev/s {[round(o[0]) for o in olds]}, new ev/s {[round(n[0]) for n in news]}")
    print(f"{label}: old CPU us/request {[round(o[1]) for o in olds]}, new {[round(n[1]) for n in news]}; "
          f"medians {statistics.median(o[1] for o in olds):.0f} -> {statistics.median(n[1] for n in news):.0f}")
    print(f"{label}: old/new CPU per request per round {[round(r, 2) for r in cpu_ratios]}: {spread(cpu_ratios)}")
    print(f"{label}: new/old rate per round {[round(r, 2) for r in rate_ratios]}: {spread(rate_ratios)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--old", type=Path, required=True, help="source checkout of the older version")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per version and request size (ABBA)")
    parser.add_argument("--single", type=int, default=5000, help="events per single-event round")
    parser.add_argument("--batch-events", type=int, default=50_000, help="events per batch-of-100 round")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--app", choices=("ingest", "all"), default="ingest", help="what both servers serve")
    args = parser.parse_args(argv)
    old_dir = args.old.resolve()
    if not (old_dir / "ingest" / "routes.py").exists():
        parser.error(f"{old_dir} is not a meterline checkout")
    scratch = Path(tempfile.mkdtemp(prefix="p1-ab-"))
    os.chdir(scratch)  # `python -m` puts the cwd first on sys.path: a checkout there would shadow --old
    infra = Infra(scratch).start()
    config = write_config(scratch)
    old = OlderStack(data_dir=scratch / "old", config_file=config, processors=0, partitions=4,
                     kafka_bootstrap=infra.kafka_bootstrap, clickhouse_url=infra.clickhouse_url,
                     consumer_group="p1-ab-old", extra_env={**UNLIMITED_ENV, "PYTHONPATH": str(old_dir)},
                     http_app=args.app)
    new = infra.stack(config, processors=0, partitions=4, extra_env=dict(UNLIMITED_ENV), http_app=args.app)
    try:
        old.start()
        new.start()
        ctx = BenchContext(infra, Progress(disable=True), Console(), {})
        evs = events(max(args.single, args.batch_events), subjects=100)
        print(f"`meterline serve {args.app}`: old {old_dir} (pid {old.server and old.server.pid}), "
              f"new {Path(__file__).resolve().parents[1]} "
              f"(pid {new.server and new.server.pid}); load average {os.getloadavg()}")
        for stack in (old, new):  # warm both (imports, producer, connections) before the first round
            measure(stack, evs[:1000], 1, args.clients, ctx)()
        for label, batch, sample in (("single events", 1, evs[: args.single]),
                                     ("batches of 100", 100, evs[: args.batch_events])):
            olds, news = alternating(args.rounds, measure(old, sample, batch, args.clients, ctx),
                              measure(new, sample, batch, args.clients, ctx))
            report(label, olds, news)
            print(f"load average {os.getloadavg()}")
    finally:
        old.stop()
        infra.close()


if __name__ == "__main__":
    main()
