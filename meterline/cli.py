"""`meterline` command line: the entrypoint layer (it may import every process package).

    meterline run                       the whole local pipeline on http://127.0.0.1:8888 (make run)
    meterline serve ingest|query|all    one HTTP process (deploy/ runs ingest and query separately)
    meterline validate-config [FILE]    check config.yaml without starting anything
    meterline recompute METER           rebuild a meter's windows from stored raw events
    meterline dead-letters list|replay  inspect, or re-meter after a config fix
    meterline compact                   merge closed months' window deltas (one row per key and minute)
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from meterline.adapters.logs import configure_logging, logging_config
from meterline.core.errors import ConfigError, MeterlineError
from meterline.settings import Settings

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

    from meterline.adapters.meter_store import MeterCatalog

app = typer.Typer(help="meterline: exact usage metering.", no_args_is_help=True, add_completion=False)
console = Console(stderr=True, soft_wrap=True)


def _settings(config: Path | None = None) -> Settings:
    return Settings(config_file=str(config)) if config else Settings()


@contextlib.contextmanager
def _clickhouse(settings: Settings, what: str) -> Iterator[Client]:
    """A client for the configured database, closed afterwards; exit 2 naming the variable if unset."""
    from meterline.adapters.clickhouse import connect

    if not settings.clickhouse_url:
        console.print(f"[red]CLICKHOUSE_URL is not set: {what} works on a running ClickHouse[/red]")
        raise typer.Exit(2)
    client = connect(settings.clickhouse_url, database=settings.clickhouse_database,
                     topology=settings.clickhouse_topology)
    try:
        yield client
    finally:
        client.close()


@app.command("validate-config")
def validate_config(config: Annotated[Path | None, typer.Argument(help="config.yaml to check")] = None) -> None:
    """Validate settings and meters; exit 1 listing every problem (file and key, or meter slug and field).

    The environment counts too (it overrides the file), so this checks what a process started in the same
    shell would run with.
    """
    from meterline.core.meters import load_meters
    from meterline.settings import config_path

    path = config or config_path()
    if not path.exists():
        console.print(f"[red]{path}: file not found[/red]")
        raise typer.Exit(1)
    problems: list[str] = []
    settings: Settings | None = None
    try:
        settings = _settings(path)
    except ConfigError as exc:
        problems.append(str(exc))
    try:  # meters are checked even when a setting is wrong, so one run lists every problem
        meters = settings.meters() if settings is not None else load_meters(path)
    except ConfigError as exc:
        problems.append(str(exc))
    if problems:
        console.print("\n".join(problems), markup=False, style="red")
        raise typer.Exit(1)
    console.print(f"[green]{path}: OK[/green] ({len(meters)} meters)")


@app.command()
def serve(
    which: Annotated[str, typer.Argument(help="ingest | query | all")] = "all",
    host: Annotated[str | None, typer.Option(help="bind address (default: settings http_host)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default: settings http_port)")] = None,
    workers: Annotated[int, typer.Option(help="processes sharing the port (ingest is CPU-bound per process)")] = 1,
) -> None:
    """Serve the HTTP API with uvicorn."""
    import os

    import uvicorn

    from meterline.adapters.auth import check_exposure
    from meterline.server import APP_ENV, build_app, serve_options, served

    settings = _settings()
    configure_logging(settings.log_level)
    check_exposure(settings, host or settings.http_host)  # before binding: keyless or unverifiable serving stays on loopback
    options: dict[str, Any] = {
        "host": host or settings.http_host, "port": settings.http_port if port is None else port,
        "log_level": "warning", "access_log": False, "log_config": logging_config(settings.log_level),
        "limit_concurrency": settings.http_limit_concurrency, **serve_options(),
    }
    if workers > 1:
        os.environ[APP_ENV] = which
        uvicorn.run("meterline.server:app_from_env", factory=True, workers=workers, **options)
    else:
        uvicorn.run(served(build_app(which, settings)), **options)


@app.command()
def run(
    port: Annotated[int | None, typer.Option(help="HTTP port (default: settings http_port)")] = None,
    processors: Annotated[int, typer.Option(min=1, help="processor workers (at most topic_partitions share work)")] = 1,
    data_dir: Annotated[Path, typer.Option(help="ClickHouse data, worker state and logs")] = Path(".data"),
) -> None:
    """Start broker, ClickHouse, processors and HTTP API locally and keep them up; Ctrl-C drains and stops."""
    try:
        from meterline.localinfra.stack import LocalStack
        from meterline.localinfra.supervisor import Supervisor, drain
    except ImportError as exc:  # the production wheel leaves the dev stack out (pyproject.toml)
        raise typer.BadParameter(
            "the local stack needs a source checkout with the `local` extra (make run); a deployed process "
            "gets KAFKA_BOOTSTRAP and CLICKHOUSE_URL and runs `meterline serve` / `python -m processor`"
        ) from exc
    from meterline.settings import config_path

    settings = _settings()  # fails fast on an invalid setting; meters are checked by each process
    try:
        settings.meters()
    except ConfigError as exc:
        console.print(f"config.yaml meters are invalid and NOT applied; the processes run with the meters already "
                      f"stored (a first start with none refuses):\n{exc}", markup=False, style="bold red")
    stack = LocalStack(
        data_dir=data_dir.resolve(),
        config_file=config_path().resolve(),
        processors=processors,
        http_port=settings.http_port if port is None else port,
        topic=settings.events_topic,
        database=settings.clickhouse_database,
        partitions=settings.topic_partitions,
        consumer_group=settings.consumer_group,
    )
    stopped = threading.Event()  # first Ctrl-C / SIGTERM: drain, then stop
    forced = threading.Event()  # second: stop now

    def on_signal(*_: Any) -> None:
        (forced if stopped.is_set() else stopped).set()

    # Explicit handlers: a shell that starts `make run` in the background leaves SIGINT ignored, and
    # Python keeps an inherited SIG_IGN, so Ctrl-C forwarded to the group would otherwise do nothing.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    with console.status("starting broker, ClickHouse, processor and API..."):
        stack.start()
    console.print(
        f"[bold green]meterline is up[/bold green] on {stack.url}\n"
        f"  broker     {stack.kafka_bootstrap}  topic {stack.topic}\n"
        f"  clickhouse {stack.clickhouse_db_url}\n"
        f"  logs       {data_dir / 'logs'}\n"
        "[bold yellow]  LOCAL MODE[/bold yellow]: requests without a key act in namespace "
        f"{settings.auth_local_namespace!r} with every scope (loopback only). A key for another namespace:\n"
        f"  CLICKHOUSE_URL={stack.clickhouse_db_url} METERLINE_AUTH_SECRET_FILE={stack.auth_secret_file} \\\n"
        "    .venv/bin/meterline keys create --namespace acme --scopes ingest,read\n"
        "Ctrl-C drains (ingest answers 503 until every acknowledged event is written) and stops; "
        "a second Ctrl-C stops at once."
    )
    supervisor = Supervisor(stack, on_event=lambda text: console.print(f"[yellow]{text}[/yellow]"))
    try:
        while not stopped.wait(0.5):
            supervisor.poll()  # a worker or the API that exited is restarted with backoff
        console.print("draining: ingest answers 503; waiting until the processors wrote every acknowledged "
                      "event (Ctrl-C again to stop now and lose what is not written)")
        report = drain(stack, supervisor, forced, progress=lambda text: console.print(text))
        if report.completed:
            console.print(f"drained in {report.seconds:.1f}s")
        else:
            console.print("[red]stopped before the drain finished: events the broker acknowledged but no "
                          "processor wrote are lost with the local broker's memory[/red]")
    except KeyboardInterrupt:
        pass
    finally:
        with console.status("stopping..."):
            stack.stop()
        console.print("stopped.")


dead_letters = typer.Typer(help="Inspect dead letters, or re-meter them after a config fix.", no_args_is_help=True)
app.add_typer(dead_letters, name="dead-letters")


@dead_letters.command("list")
def dead_letters_list(
    meter: Annotated[str | None, typer.Option(help="only this meter's dead letters")] = None,
    reason: Annotated[str | None, typer.Option(help="only this reason_code, e.g. value_missing")] = None,
    limit: int = 100,
    include_replayed: Annotated[bool, typer.Option("--all", help="also those a replay metered")] = False,
) -> None:
    """Newest first: position, meter, reason and event of each dead letter (see meterline/jobs/deadletters.py)."""
    from rich.table import Table

    from meterline.jobs.deadletters import list_dead_letters

    settings = _settings()
    with _clickhouse(settings, "dead-letters list") as client:
        found = list_dead_letters(client, settings.clickhouse_database, meter=meter, reason=reason, limit=limit,
                                  include_replayed=include_replayed, topology=settings.clickhouse_topology)
    table = Table("position", "meter", "reason_code", "reason", "subject", "id", "time", "replay")
    for d, outcome in found:
        table.add_row(f"{d.partition}:{d.offset}:{d.index}", d.meter or "*", d.reason_code, d.reason, d.subject,
                      d.id, d.time.isoformat(), outcome)
    Console(soft_wrap=True).print(table)


@dead_letters.command("replay")
def dead_letters_replay(
    meter: Annotated[str | None, typer.Option(help="only this meter's dead letters")] = None,
    reason: Annotated[str | None, typer.Option(help="only this reason_code")] = None,
) -> None:
    """Re-meter dead letters under the current config.yaml (idempotent; see meterline/jobs/deadletters.py)."""
    from meterline.core.rows import RowOptions
    from meterline.jobs.deadletters import replay

    settings = _settings()
    with _catalog(settings, "dead-letters replay") as (client, catalog):
        # Every live generation of the store's meters (active and building), as the workers write them.
        active = {key: s.latest.active_generation for key, s in catalog.states.items() if not s.deleted}
        report = replay(client, settings.clickhouse_database, catalog.meter_set(),
                        RowOptions.from_settings(settings), meter=meter, reason=reason,
                        topology=settings.clickhouse_topology, active=active)
    Console(soft_wrap=True).print(
        f"metered {report.metered}, still rejected {report.still_rejected} {report.rejected_reasons or ''}, "
        f"superseded {report.superseded}, not replayable {report.not_replayable}; "
        f"{report.window_rows} window rows written, {report.stale_rows_deleted} stale rows deleted"
    )


@app.command("compact")
def compact(
    partition: Annotated[list[str] | None, typer.Option(help="only this month (YYYYMM); repeatable")] = None,
) -> None:
    """Compact the windows of closed months (see meterline/jobs/compaction.py); safe to run at any time."""
    from meterline.jobs.compaction import compact_with_settings

    settings = _settings()
    with _catalog(settings, "compact") as (client, catalog):
        report = compact_with_settings(client, settings, catalog, owner="cli", only=partition or None,
                                       step=lambda p, name: console.print(f"{p}: {name}"))
    out = Console(soft_wrap=True)
    out.print(f"closed before {report.cutoff.isoformat() if report.cutoff else '- (no partition progress yet)'}")
    for r in report.partitions:
        out.print(f"{r.partition}: {r.outcome} ({r.rows_before} -> {r.rows_after} rows, {r.seconds} s)")


@contextlib.contextmanager
def _catalog(settings: Settings, what: str) -> Iterator[tuple[Client, MeterCatalog]]:
    """A client plus the meter catalog of the configured database (tables created if missing)."""
    from meterline.adapters.clickhouse import connect, create_schema
    from meterline.adapters.meter_store import MeterCatalog, MeterStore

    with _clickhouse(settings, what) as client:
        admin = connect(str(settings.clickhouse_url), database="default", topology=settings.clickhouse_topology)
        try:
            create_schema(admin, settings.clickhouse_database, settings.clickhouse_topology)
        finally:
            admin.close()
        catalog = MeterCatalog(MeterStore(client, settings.clickhouse_database, topology=settings.clickhouse_topology))
        catalog.refresh(force=True)
        catalog.refresh_progress()
        yield client, catalog


def _progress_columns() -> tuple[Any, ...]:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    return (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())


@app.command()
def recompute(
    meter: Annotated[str, typer.Argument(help="slug or id of the meter to rebuild")],
    config: Annotated[Path | None, typer.Option(help="sync this config.yaml's meters to the store first")] = None,
    namespace: Annotated[str, typer.Option(help="the tenant whose meter it is (config.yaml's: default)")] = "default",
) -> None:
    """Rebuild a meter's history from stored raw events in the foreground, with a progress bar.

    A meter whose new definition is still building is built and switched (what the API server's meter
    controller does in the background); otherwise its active generation is rebuilt in place.
    """
    from rich.progress import Progress

    from meterline.jobs.meter_controller import MeterController
    from meterline.jobs.recompute import count_query
    from meterline.jobs.recompute import recompute as rebuild

    settings = _settings(config)
    with _catalog(settings, "recompute") as (client, catalog):
        if config is not None:
            for problem in catalog.sync_file(config):
                console.print(f"[yellow]{problem}[/yellow]")
        state = catalog.find(meter, namespace=namespace)
        controller = MeterController(catalog, client, settings.clickhouse_database, config_file=None,
                                     worker_ttl_seconds=settings.meter_worker_ttl_seconds,
                                     window_seconds=settings.window_size_seconds, owner="cli",
                                     topology=settings.clickhouse_topology)
        with Progress(*_progress_columns(), console=console) as progress:
            task = progress.add_task(f"rebuilding {state.slug}", total=None)
            if state.building is not None:
                generation = state.latest.generation
                progress.update(task, description=f"{state.slug}: waiting for processor workers")
                if not controller.wait_workers(state, generation, timeout=settings.meter_worker_ttl_seconds * 4):
                    console.print("[red]processor workers did not apply the new definition in time[/red]")
                    raise typer.Exit(1)
                progress.update(task, description=f"rebuilding {state.slug}")
                done = controller.rebuild(state, on_progress=lambda n, total: progress.update(task, completed=n,
                                                                                              total=total))
                if not done or not catalog.activate(namespace, state.slug, generation, actor="cli"):
                    console.print(f"[red]{state.slug} changed during the rebuild; not switched[/red]")
                    raise typer.Exit(1)
                events = progress.tasks[0].completed
                progress.update(task, description=f"{state.slug}: dropping the previous generation")
                if not controller.clean(state.slug, timeout=settings.meter_worker_ttl_seconds * 4,
                                        namespace=namespace):
                    console.print("[yellow]switched; the previous generation's rows are left to the meter "
                                  "controller (processor workers did not apply the switch in time)[/yellow]")
            else:
                active = state.active
                assert active is not None
                sql, params = count_query(settings.clickhouse_database, active.meter, namespace)
                progress.update(task, total=int(client.query(sql, parameters=params).result_rows[0][0]))
                result = rebuild(client, settings.clickhouse_database, active.meter,
                                 window_seconds=settings.window_size_seconds,
                                 generation=state.latest.active_generation, clear=True,
                                 topology=settings.clickhouse_topology, namespace=namespace,
                                 on_progress=lambda n: progress.advance(task, n))
                events = result.events
    console.print(f"[green]{state.slug}[/green]: {int(events)} events rebuilt")


meters_cli = typer.Typer(help="The meters in the meter store, their state and rebuild progress.",
                         no_args_is_help=True)
app.add_typer(meters_cli, name="meters")


@meters_cli.command("status")
def meters_status(
    watch: Annotated[bool, typer.Option(help="show rebuild progress bars until no meter is building")] = False,
) -> None:
    """Every meter with who manages it, its version and state; building meters with their progress."""
    import time

    from rich.progress import Progress
    from rich.table import Table

    settings = _settings()
    with _catalog(settings, "meters status") as (_, catalog):
        table = Table("namespace", "slug", "id", "managed by", "version", "state", "generation", "active")
        for (ns, slug), s in sorted(catalog.states.items()):
            table.add_row(ns, slug, s.latest.id, s.latest.managed_by, str(s.latest.version), s.status,
                          str(s.latest.generation), str(s.latest.active_generation))
        Console(soft_wrap=True).print(table)
        if not watch:
            return
        with Progress(*_progress_columns(), console=console) as progress:
            tasks: dict[tuple[str, str], Any] = {}
            while True:
                building = {key: s for key, s in catalog.states.items() if s.building is not None}
                for (ns, slug), s in building.items():
                    p = catalog.progress(ns, slug, s.latest.generation)
                    name = slug if ns == "default" else f"{ns}/{slug}"
                    if (ns, slug) not in tasks:
                        tasks[(ns, slug)] = progress.add_task(name, total=None)
                    if p is not None:
                        progress.update(tasks[(ns, slug)], completed=p.done, total=p.total or None,
                                        description=f"{name} ({p.state})")
                for key, task in tasks.items():
                    if key not in building:
                        name = key[1] if key[0] == "default" else f"{key[0]}/{key[1]}"
                        progress.update(task, description=f"{name} (switched)", completed=1, total=1)
                if not building:
                    break
                time.sleep(settings.meter_poll_seconds)
                catalog.refresh()
                catalog.refresh_progress()


keys = typer.Typer(help="API keys: create (printed once), list, revoke.", no_args_is_help=True)
app.add_typer(keys, name="keys")


@contextlib.contextmanager
def _key_store(settings: Settings, what: str) -> Iterator[tuple[Any, bytes]]:
    secret = settings.auth_secret_bytes()
    if secret is None:
        console.print(f"[red]METERLINE_AUTH_SECRET_FILE is not set: {what} needs the servers' secret[/red]")
        raise typer.Exit(2)
    from meterline.adapters.keystore import KeyStore

    with _clickhouse(settings, what) as client:
        yield KeyStore(client, settings.clickhouse_database), secret


@keys.command("create")
def keys_create(
    namespace: Annotated[str, typer.Option(help="the tenant the key acts in")],
    scopes: Annotated[str, typer.Option(help="comma-separated: ingest, read, admin")],
    expires: Annotated[str | None, typer.Option(help="30d, 12h, 90m, 2w or an RFC 3339 time; default never")] = None,
    name: Annotated[str, typer.Option(help="a label for listings")] = "",
) -> None:
    """Create a key and print it once on stdout (only its HMAC is stored; it cannot be shown again)."""
    from datetime import UTC, datetime

    from meterline.core.access import check_namespace, parse_scopes
    from meterline.core.keys import ApiKey, generate_key, key_hash, parse_expiry

    now = datetime.now(UTC)
    try:
        parsed = parse_scopes(scopes)
        check_namespace(namespace)
        expires_at = parse_expiry(expires, now) if expires else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    with _key_store(_settings(), "keys create") as (store, secret):
        key_id, key = generate_key()
        store.add(ApiKey(key_id, namespace, parsed, key_hash(secret, key), name, now, expires_at))
    console.print(f"created key {key_id} in namespace {namespace!r} with scopes {scopes}"
                  + (f", expires {expires_at.isoformat()}" if expires_at else "") + "; it is shown only once:")
    print(key)


@keys.command("list")
def keys_list(namespace: Annotated[str | None, typer.Option(help="only this namespace")] = None) -> None:
    """Every key's id, namespace, scopes and status (never the key itself)."""
    from datetime import UTC, datetime

    from rich.table import Table

    now = datetime.now(UTC)
    with _key_store(_settings(), "keys list") as (store, _):
        found = sorted(store.all().values(), key=lambda k: k.created_at)
    table = Table("key id", "namespace", "scopes", "name", "created", "expires", "status")
    for k in found:
        if namespace is None or k.namespace == namespace:
            table.add_row(k.key_id, k.namespace, ",".join(sorted(s.value for s in k.scopes)), k.name,
                          k.created_at.isoformat(), k.expires_at.isoformat() if k.expires_at else "never",
                          k.status(now))
    Console(soft_wrap=True, width=200).print(table)  # ids and times whole, even when piped


@keys.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="the key id `keys list` shows")]) -> None:
    """Revoke a key; every server refuses it within auth_refresh_seconds (2 s by default)."""
    from datetime import UTC, datetime

    with _key_store(_settings(), "keys revoke") as (store, _):
        key = store.revoke(key_id, datetime.now(UTC))
    if key is None:
        console.print(f"[red]no key {key_id!r}[/red]")
        raise typer.Exit(1)
    console.print(f"revoked {key_id} (namespace {key.namespace!r})")


def main() -> None:
    try:
        app()
    except MeterlineError as exc:
        console.print(f"[red]{exc}[/red]")
        sys.exit(1)


if __name__ == "__main__":
    main()
