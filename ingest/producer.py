"""Async Kafka producer for ingest: publish a request's messages and resolve once the broker acked ALL.

Why this shape:
* confluent-kafka (librdkafka) is the fastest Python producer, but it is callback based and its delivery
  reports only fire from `poll()`. The event loop itself polls, non-blocking, on a 1 ms timer while
  messages are in flight (once a second when idle), so delivery callbacks run on the loop and resolve
  the request's future directly. Why not a poll thread: every report then has to take the GIL from the
  busy loop thread (CPython hands it over at its 5 ms switch interval) and hop back to the loop with
  `call_soon_threadsafe`; polling on the loop removes the thread and both hops, at ~1 ms added latency.
* `enable.idempotence` + `acks=all` means a 204 is only returned once every in-sync replica has the
  data and librdkafka's internal retries can never duplicate or reorder a subject's messages.
* `message.timeout.ms` = `produce_timeout_seconds` bounds how long a message may wait for the broker, so
  a stalled broker turns into `BrokerUnavailableError` (HTTP 503) instead of a hung request. `publish`
  also has its own deadline (timeout + slack) as a safety net in case a report never arrives; the poll
  timer enforces it (a request in flight keeps that timer at 1 ms), not a timer per request, whose
  scheduling and cancelling cost ~1.8 us of a ~90 us single-event request (bench P1).
* A broker re-created under the same address (a new cluster id: e.g. the local memory broker started
  again) leaves librdkafka's idempotent producer timing out every message for ever; librdkafka only logs
  CLUSTERID ("a client must not be simultaneously connected to multiple clusters"). That log line
  replaces the producer like a poisoned one (`_ClusterWatch`; tests/faults/test_broker_epoch.py).
* Keys are hashed with `murmur2_random`, the Java/aiokafka default, so any other client producing to
  the topic (replay tools, Faust) maps a subject to the same partition.

Only this module touches confluent-kafka on the ingest side; its errors become meterline errors here.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from meterline.adapters.kafka import create_topic_if_missing, events_topic_config, kafka_client_config
from meterline.core.errors import BrokerUnavailableError
from meterline.settings import Settings

logger = logging.getLogger(__name__)

#: Extra time `publish` waits beyond message.timeout.ms before giving up on delivery reports itself.
DEADLINE_SLACK_SECONDS = 1.0
#: How often the event loop serves delivery reports while messages are in flight, and when idle
#: (idle polls only forward librdkafka's logs and errors).
BUSY_POLL_SECONDS = 0.001
IDLE_POLL_SECONDS = 1.0

#: Errors after which the idempotent producer's id/epoch is no longer usable (see `_replace_if_fatal`).
_POISONED = frozenset(
    {
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError._FENCED,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
        KafkaError.UNKNOWN_PRODUCER_ID,
        KafkaError.INVALID_PRODUCER_ID_MAPPING,
    }
)


class _ClusterWatch:
    """The logger librdkafka logs through (forwarding to `confluent_kafka`), noting a CLUSTERID line:
    the broker at the bootstrap address now belongs to another cluster. Logs are served by `poll`, on
    the loop, so `_poll_tick` checks `changed` right after polling."""

    def __init__(self) -> None:
        self._logger = logging.getLogger("confluent_kafka")
        self.changed = False

    def log(self, level: int, msg: str, *args: Any, **kwargs: Any) -> None:
        if args and args[0] == "CLUSTERID":  # confluent-kafka calls log(level, "%s [%s] %s", fac, name, text)
            self.changed = True
        self._logger.log(level, msg, *args, **kwargs)


def producer_config(settings: Settings) -> dict[str, Any]:
    """librdkafka settings for the ingest producer (a function so tests and bench can inspect them)."""
    timeout_ms = max(1, int(settings.produce_timeout_seconds * 1000))
    return {
        **kafka_client_config(settings),  # bootstrap servers and, if configured, SASL credentials
        "client.id": "meterline-ingest",
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 1,  # requests wait for acks: latency caps throughput per client
        "compression.type": "lz4",
        "partitioner": "murmur2_random",
        "message.timeout.ms": timeout_ms,
        "request.timeout.ms": min(timeout_ms, 30_000),
        "socket.keepalive.enable": True,
        # librdkafka refuses records above its own limit (default 1000000) before the broker sees them.
        "message.max.bytes": max(1_000_000, settings.max_message_bytes + 1024),
    }


def ensure_topic(settings: Settings, timeout: float = 10.0) -> None:
    """Create the events topic if missing (best effort: an existing topic or a refusing cluster is not an
    error). Only with `ingest_creates_topic`: in production the processor or the operator creates it."""
    replication, config = events_topic_config(settings)
    try:
        create_topic_if_missing(kafka_client_config(settings), settings.events_topic, settings.topic_partitions,
                                timeout, replication_factor=replication, config=config)
    except Exception as exc:  # noqa: BLE001 - best effort by design; publish reports real failures
        logger.warning("could not ensure topic %s: %s", settings.events_topic, exc)


class EventProducer:
    """One librdkafka producer per process, shared by every request.

    Lifecycle: `start()` in the app lifespan (never at import), `close()` on shutdown.
    """

    def __init__(self, settings: Settings) -> None:
        if not settings.kafka_bootstrap:
            raise BrokerUnavailableError("kafka_bootstrap is not configured (set KAFKA_BOOTSTRAP)")
        self._settings = settings
        self._topic = settings.events_topic
        self._timeout = settings.produce_timeout_seconds
        self._producer: Producer | None = None
        self._lock = threading.Lock()
        # The loop whose timer serves delivery reports, and that timer (see `_poll_soon`).
        self._poll_loop: asyncio.AbstractEventLoop | None = None
        self._poll_timer: asyncio.TimerHandle | None = None
        #: Requests in flight on that loop: (deadline on its clock, the request's future, what fails it), in
        #: publish order. One timeout for all, so deadlines only grow and the poll tick expires from the left.
        self._deadlines: deque[tuple[float, asyncio.Future[None], Callable[[], None]]] = deque()
        self._watch = _ClusterWatch()

    # ----------------------------------------------------------------------------------- lifecycle
    def start(self, *, create_topic: bool | None = None) -> None:
        """Create the producer; make sure the topic exists if asked (default: `ingest_creates_topic`).
        Polling starts with `publish`."""
        if self._settings.ingest_creates_topic if create_topic is None else create_topic:
            ensure_topic(self._settings)
        self._producer = self._new_producer()

    def close(self, timeout: float | None = None) -> None:
        """Flush what is in flight (bounded); `flush` serves the remaining delivery reports itself.

        May run in a worker thread (the lifespan does): reports then reach their requests through
        `call_soon_threadsafe`, and the loop's poll timer stops at its next tick.
        """
        producer = self._producer
        self._producer = None
        if producer is not None:
            remaining = producer.flush(self._timeout if timeout is None else timeout)
            if remaining:
                logger.warning("producer closed with %d undelivered message(s)", remaining)

    def _new_producer(self) -> Producer:
        self._watch = _ClusterWatch()
        return Producer(producer_config(self._settings), logger=self._watch)

    def _poll_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        """Make sure `loop` polls within BUSY_POLL_SECONDS (a publish just queued messages)."""
        timer = self._poll_timer
        if timer is not None and self._poll_loop is loop and not timer.cancelled():
            if timer.when() <= loop.time() + BUSY_POLL_SECONDS:
                return
            timer.cancel()  # an idle tick is due later than a busy one: bring it forward
        if self._poll_loop is not loop:
            self._deadlines.clear()  # futures of a loop that no longer publishes here: nothing can await them
        self._poll_loop = loop
        self._poll_timer = loop.call_later(BUSY_POLL_SECONDS, self._poll_tick, loop)

    def _poll_tick(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve delivery reports on the loop, fail the requests past their deadline, then re-arm: soon while
        requests are in flight (also after `close`, until each one settled or expired). Re-arms, soon, even
        when a step raised: this timer keeps every request's deadline."""
        if self._poll_loop is not loop:
            self._poll_timer = None
            return
        delay: float | None = BUSY_POLL_SECONDS
        try:
            delay = self._serve(loop)
        finally:
            self._poll_timer = None if delay is None else loop.call_later(delay, self._poll_tick, loop)

    def _serve(self, loop: asyncio.AbstractEventLoop) -> float | None:
        """One tick's work; the delay to the next tick, None to stop (closed, nothing in flight)."""
        producer = self._producer
        if producer is not None:
            try:
                producer.poll(0)
            except Exception:
                logger.exception("producer poll failed")
            if self._watch.changed:
                self._replace(producer, "the broker at the bootstrap address reports another cluster id")
            producer = self._producer  # a report may have replaced a poisoned producer
        deadlines = self._deadlines
        if deadlines:
            now = loop.time()
            while deadlines and (deadlines[0][1].done() or deadlines[0][0] <= now):
                _, done, give_up = deadlines.popleft()
                if not done.done():
                    give_up()
        if deadlines or (producer is not None and len(producer) > 0):
            return BUSY_POLL_SECONDS
        return None if producer is None else IDLE_POLL_SECONDS

    def _replace_if_fatal(self, err: KafkaError, failed: Producer) -> None:
        """Replace a producer whose idempotence state is poisoned.

        Fatal errors make the instance unusable by definition. Fencing/epoch errors are not flagged
        fatal, but after a stalled broker (messages timed out mid-flight) librdkafka can keep getting
        "newer producer ... fences the current one" for every later message, so those also get a fresh
        instance (new producer id). Safe: failed requests are 503s and clients resend; dedupe absorbs it.
        """
        if not (err.fatal() or err.code() in _POISONED):
            return
        self._replace(failed, f"poisoned ({err})")

    def _replace(self, failed: Producer, why: str) -> None:
        """Swap `failed` for a new producer (unless another request already did) and fail its messages."""
        with self._lock:
            if self._producer is not failed:  # another request already replaced it
                return
            old = self._producer
            logger.error("producer %s, recreating it", why)
            self._producer = self._new_producer()
        if old is not None:
            old.purge()  # fail its queued messages now rather than at their timeout...
            old.poll(0)  # ...and deliver those reports (the loop's timer only polls the new instance)

    # -------------------------------------------------------------------------------------- publish
    async def publish(self, messages: Sequence[tuple[bytes, bytes]]) -> None:
        """Send `(key, value)` messages; return once the broker acked every one of them.

        Raises `BrokerUnavailableError` on the first failed delivery, a full local queue, or when the
        acks do not arrive within `produce_timeout_seconds` (+ slack). Never hangs longer than that.
        """
        if not messages:
            return
        producer = self._producer
        if producer is None:
            raise BrokerUnavailableError("producer is not started")
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()
        done: asyncio.Future[None] = loop.create_future()
        # No done-callback to retrieve a late failure: only this request awaits `done`, and a request that
        # stops waiting (cancelled) cancels it, after which nothing can set it (settle and _fail check).
        pending = len(messages)

        def settle(err: KafkaError | None) -> None:  # runs on the event loop
            if done.done():
                return
            if err is not None:
                self._replace_if_fatal(err, producer)
                done.set_exception(BrokerUnavailableError(f"delivery failed: {err.str()}"))
                return
            done.set_result(None)

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            # Runs where `poll`/`flush` runs: normally this loop's poll timer, so the request settles
            # directly; from `close` (a worker thread) it hops onto the loop. The request's future is
            # resolved once (all acked) or at the first failure, not per message.
            nonlocal pending
            if err is None:
                pending -= 1
                if pending:
                    return
            if err is None and threading.get_ident() == loop_thread:
                settle(err)
            elif not loop.is_closed():  # failures settle outside the poll call: they may replace the producer
                loop.call_soon_threadsafe(settle, err)

        try:
            for key, value in messages:
                producer.produce(self._topic, value=value, key=key, on_delivery=on_delivery)
        except BufferError:
            self._fail(done, BrokerUnavailableError("producer queue is full; the broker is not keeping up"))
        except KafkaException as exc:
            self._fail(done, BrokerUnavailableError(f"produce failed: {exc}"))
        self._poll_soon(loop)
        if done.done():
            await done  # refused before anything was queued: no deadline to keep
            return

        def give_up() -> None:
            self._fail(done, BrokerUnavailableError(
                f"broker did not acknowledge {pending} message(s) within {self._timeout:g}s"
            ))

        # Kept by the poll tick (`_poll_soon` just made sure it runs), not asyncio.wait_for or a timer of its own.
        self._deadlines.append((loop.time() + self._timeout + DEADLINE_SLACK_SECONDS, done, give_up))
        await done

    @staticmethod
    def _fail(done: asyncio.Future[None], exc: BrokerUnavailableError) -> None:
        if not done.done():
            done.set_exception(exc)

    # ------------------------------------------------------------------------------------- health
    def check_ready(self, timeout: float = 2.0) -> bool:
        """True when broker metadata for the topic is reachable within `timeout` (blocking; use a thread)."""
        producer = self._producer
        if producer is None:
            return False
        try:
            md = producer.list_topics(self._topic, timeout=timeout)
        except KafkaException as exc:
            logger.info("broker not ready: %s", exc)
            return False
        topic = md.topics.get(self._topic)
        return topic is not None and topic.error is None and bool(md.brokers)
