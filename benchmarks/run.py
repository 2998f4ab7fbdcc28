"""Django's SMTP backend, raw aiosmtplib and this backend, against one sink, in one run.

    python -m benchmarks.run            # the full run (a few minutes)
    python -m benchmarks.run --quick    # a few hundred messages, what CI runs

Every client talks to the same sink process (benchmarks/sink.py) over STARTTLS on
127.0.0.1: Django's backend authenticates with AUTH PLAIN, the other two with XOAUTH2
tokens of an in-process OAuth2 server. The sink answers each flight of commands after
0 ms or 10 ms (a provider's round trip); a third sink port offers no PIPELINING. On the
0 ms sink, where a shared machine's noise is largest, the clients take turns over several
rounds and each batch figure is the median round. The run exits non-zero when a message
is lost or duplicated, when anything fails, or when a timed send called the token
endpoint; a target that is missed is reported, not fatal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import multiprocessing
import os
import platform
import resource
import ssl
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from benchmarks import queued, sink

OURS = "django_xoauth2_mail.backends.EmailBackend"
DJANGO = "django.core.mail.backends.smtp.EmailBackend"
DJANGO_LABEL, RAW_LABEL, OURS_LABEL = "Django smtp", "raw aiosmtplib", "this backend"
SENDER = "sender@bench.invalid"
CLIENT_ID, CLIENT_SECRET = "benchmark-client", "benchmark-secret"
# A transactional message of the usual size (a password reset, an order receipt).
BODY = (
    "Hello,\n\nSomeone asked to reset the password of your account. If it was you, open the "
    "link below within the next hour; if not, you can ignore this message.\n\n"
    "https://example.com/reset/MQ/c3k2ty-0123456789abcdef0123456789abcdef/\n\n"
) * 3
SPAWN = multiprocessing.get_context("spawn")
CHILD_TIMEOUT = 180.0  # seconds for one memory probe process
COLD, WARM = "send_mail(), new connection", "send_mail(), kept connection"


@dataclass(frozen=True)
class Sizes:
    cold: int  # send_mail() calls, each on a new connection
    warm: int  # send_mail() calls on a kept connection
    batch: int  # messages in one send_messages() call
    rounds: int = 1  # the clients take turns this many times


@dataclass(frozen=True)
class Plan:
    sizes: dict[str, Sizes]  # by sink listener name
    attachment_mb: int


SINKS = (
    sink.Listener("0 ms", 0.0),
    sink.Listener("10 ms", 0.010),
    sink.Listener("10 ms, no PIPELINING", 0.010, pipelining=False),
)
FULL = Plan(
    {
        "0 ms": Sizes(cold=100, warm=300, batch=1000, rounds=5),
        "10 ms": Sizes(cold=40, warm=100, batch=1000),
        "10 ms, no PIPELINING": Sizes(cold=40, warm=100, batch=1000),
    },
    attachment_mb=20,
)
QUICK = Plan(
    {
        "0 ms": Sizes(cold=21, warm=60, batch=200, rounds=3),
        "10 ms": Sizes(cold=8, warm=20, batch=100),
        "10 ms, no PIPELINING": Sizes(cold=8, warm=20, batch=100),
    },
    attachment_mb=2,
)


@dataclass(frozen=True)
class Setup:
    """What a process needs to send through the sink (picklable, for child processes)."""

    ports: dict[str, int]
    ca_file: str
    token_url: str
    access_token: str = ""  # for raw aiosmtplib, once the first refresh issued one


@dataclass
class Row:
    case: str
    sink: str
    client: str
    messages: int  # per round for batches
    seconds: float  # the median round for batches, the sum of the calls for sends
    latencies: list[float] | None = None
    rss_mb: float | None = None
    baseline: Row | None = None  # Django's row for the same comparison
    cpu: tuple[float, float] | None = None  # client, sink: CPU seconds per wall second

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else float("inf")

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.latencies) * 1000 if self.latencies else None

    @property
    def p95_ms(self) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[max(0, -(-95 * len(ordered) // 100) - 1)] * 1000  # nearest rank

    @property
    def ratio(self) -> float | None:
        """Speed-up over Django (its time / ours), or for memory our RSS / Django's."""
        base = self.baseline
        if base is None:
            return None
        if self.rss_mb is not None and base.rss_mb is not None:
            return self.rss_mb / base.rss_mb if base.rss_mb > 0 else None
        if self.median_ms is not None and base.median_ms is not None:
            return base.median_ms / self.median_ms
        return self.rate / base.rate


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    delivered: int = 0

    def find(self, case: str, sink_name: str, client: str) -> Row | None:
        for row in self.rows:
            if (row.case, row.sink, row.client) == (case, sink_name, client):
                return row
        return None


def progress(text: str) -> None:
    print(f"  ... {text}", file=sys.stderr, flush=True)


# Django and the sink ----------------------------------------------------------------


def configure_django(setup: Setup, directory: str) -> None:
    """Set up Django for the benchmark in this process (the parent or a child)."""
    os.environ["DJANGO_SETTINGS_MODULE"] = "benchmarks.settings"
    os.environ["XOAUTH2_MAIL_BENCHMARK_DIR"] = directory
    # Django's backend trusts the sink's certificate the standard OpenSSL way (its
    # ssl.create_default_context() loads SSL_CERT_FILE instead of the system bundle).
    os.environ["SSL_CERT_FILE"] = setup.ca_file
    import django
    from django.conf import settings

    django.setup()
    settings.EMAIL_HOST_USER = sink.PLAIN_USER
    settings.EMAIL_HOST_PASSWORD = sink.PLAIN_PASSWORD


def point_at(setup: Setup, sink_name: str, backend: str) -> None:
    """Send through the sink port ``sink_name``, with ``backend`` as EMAIL_BACKEND."""
    from django.conf import settings

    settings.EMAIL_BACKEND = backend
    settings.EMAIL_PORT = setup.ports[sink_name]
    settings.XOAUTH2_MAIL = {
        "PROVIDERS": {
            "oauth2": {
                "CLIENT_ID": CLIENT_ID,
                "CLIENT_SECRET": CLIENT_SECRET,
                "TOKEN_URL": setup.token_url,
                "SMTP_HOST": "127.0.0.1",
                "SMTP_PORT": setup.ports[sink_name],
                "SMTP_SECURITY": "starttls",
                "SMTP_CA_FILE": setup.ca_file,
            }
        },
        "SMTP_TIMEOUT": 30,
    }


class SinkProcess:
    """The sink in a child process, and the pipe that reads its counts."""

    def __init__(self, options: sink.SinkOptions) -> None:
        self.conn, child_conn = SPAWN.Pipe()
        self.process = SPAWN.Process(
            target=sink.serve, args=(options, child_conn), name="benchmark-sink", daemon=True
        )
        self.process.start()
        child_conn.close()
        self.ports: dict[str, int] = self._ask(None, "ready")

    def _ask(self, request: tuple[Any, ...] | None, kind: str) -> Any:
        if request is not None:
            self.conn.send(request)
        if not self.conn.poll(60):
            raise RuntimeError("the sink process did not answer within 60 s")
        answer_kind, payload = self.conn.recv()
        if answer_kind != kind:
            raise RuntimeError(f"the sink answered {answer_kind}: {payload}")
        return payload

    def stats(self, prefix: str | None = None) -> dict[str, Any]:
        stats: dict[str, Any] = self._ask(("stats", prefix), "stats")
        return stats

    def cpu(self) -> float:
        return float(self._ask(("cpu",), "cpu"))

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(("stop",))
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()


# Messages and the raw aiosmtplib client ----------------------------------------------


def message_id(tag: str, number: int) -> str:
    return f"<{tag}.{number}@bench.invalid>"


def make_message(mid: str, connection: Any = None, attachment: bytes | None = None) -> Any:
    from django.core.mail import EmailMessage

    # One recipient per message, each a different one, as in a bulk job.
    recipient = "user-" + mid.strip("<>").split("@")[0] + "@bench.invalid"
    message = EmailMessage(
        "Reset your password",
        BODY,
        SENDER,
        [recipient],
        headers={"Message-ID": mid},
        connection=connection,
    )
    if attachment is not None:
        message.attach("data.bin", attachment, "application/octet-stream")
    return message


def serialised(message: Any) -> tuple[str, list[str], bytes]:
    """What raw aiosmtplib gets: the running Django's bytes, made before the clock starts."""
    from django_xoauth2_mail.sending.messages import message_bytes

    return SENDER, list(message.recipients()), message_bytes(message)


async def raw_aiosmtplib_send(
    setup: Setup, port: int, envelopes: list[tuple[str, list[str], bytes]]
) -> None:
    """One aiosmtplib connection (STARTTLS, XOAUTH2), ``sendmail`` per message."""
    import aiosmtplib

    async def token() -> str:
        return setup.access_token

    client = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=port,
        start_tls=True,
        tls_context=ssl.create_default_context(cafile=setup.ca_file),
        username=SENDER,
        oauth_token_generator=token,
        timeout=30,
    )
    await client.connect()
    for sender, recipients, data in envelopes:
        await client.sendmail(sender, recipients, data)
    await client.quit()


def close_kept_sessions() -> None:
    from django_xoauth2_mail.sending.loop import mail_loop
    from django_xoauth2_mail.sending.pool import pool

    mail_loop.run(pool.close_all())


# The cases --------------------------------------------------------------------------


# A client of the single-send cases: label, EMAIL_BACKEND, send(message_id).
Client = tuple[str, str, Callable[[str], None]]


@dataclass
class Tally:
    """One client's measurements in one case, summed over rounds."""

    latencies: list[float] = field(default_factory=list)
    rounds: list[float] = field(default_factory=list)  # seconds per batch
    wall: float = 0.0
    client_cpu: float = 0.0
    sink_cpu: float = 0.0

    def cpu(self) -> tuple[float, float] | None:
        return (self.client_cpu / self.wall, self.sink_cpu / self.wall) if self.wall else None


class Bench:
    def __init__(self, setup: Setup, sink_process: SinkProcess, report: Report) -> None:
        self.setup, self.sink, self.report = setup, sink_process, report
        self._tags = 0

    def tag(self, label: str) -> str:
        self._tags += 1
        return f"{self._tags:03d}-" + "".join(c if c.isalnum() else "-" for c in label.lower())

    def verify(self, tag: str, expected: int, what: str, sink_name: str) -> None:
        """Messages 0 .. expected-1 of ``tag`` each reached the sink port
        ``sink_name`` exactly once."""
        stats = self.sink.stats(f"<{tag}.")
        counts: dict[str, int] = stats["counts"]
        wanted = {message_id(tag, n) for n in range(expected)}
        self.report.delivered += sum(counts.values())
        if set(counts) != wanted or any(count != 1 for count in counts.values()):
            self.report.problems.append(
                f"{what}: {expected} sent, {len(wanted & set(counts))} received, "
                f"{sum(n - 1 for n in counts.values() if n > 1)} duplicates, "
                f"{len(set(counts) - wanted)} unexpected"
            )
        elsewhere = sum(1 for name in stats["listeners"].values() if name != sink_name)
        if elsewhere:
            self.report.problems.append(f"{what}: {elsewhere} messages went to another sink port")

    @contextlib.contextmanager
    def timed(self, tally: Tally) -> Iterator[None]:
        sink_cpu, client_cpu = self.sink.cpu(), time.process_time()
        start = time.perf_counter()
        yield
        tally.wall += time.perf_counter() - start
        tally.client_cpu += time.process_time() - client_cpu
        tally.sink_cpu += self.sink.cpu() - sink_cpu

    def add(self, row: Row) -> Row:
        self.report.rows.append(row)
        return row

    # send_mail() one message at a time, as a view does

    def run_sends(self, sink_name: str, sizes: Sizes, pipelining: bool) -> None:
        from django.core.mail import get_connection

        def default(message_id: str) -> None:
            make_message(message_id).send()  # what send_mail() does: a new backend

        def ours_kept(message_id: str) -> None:
            make_message(message_id, connection=get_connection(OURS, keep_alive=True)).send()

        # Django's way to reuse a connection: one backend, opened once.
        kept = get_connection(DJANGO, port=self.setup.ports[sink_name])
        kept.open()
        try:
            clients: list[Client] = [(DJANGO_LABEL, DJANGO, default)]
            if pipelining:  # without it, only the targets' figures are needed
                clients.append((OURS_LABEL, OURS, default))
            progress(f"{sink_name}: {COLD}")
            self.sends(COLD, sink_name, sizes.cold, sizes.rounds, clients)
            progress(f"{sink_name}: {WARM}")
            self.sends(
                WARM, sink_name, sizes.warm, sizes.rounds,
                [
                    (DJANGO_LABEL, DJANGO, lambda m: make_message(m, connection=kept).send()),
                    (OURS_LABEL, OURS, ours_kept),
                ],
            )  # fmt: skip
        finally:
            kept.close()
            close_kept_sessions()

    def sends(
        self,
        case: str,
        sink_name: str,
        count: int,
        rounds: int,
        clients: list[Client],
    ) -> None:
        """``count`` sends per client, timed one by one, the clients taking turns."""
        tags = {label: self.tag(f"{case} {sink_name} {label}") for label, _, _ in clients}
        tallies = {label: Tally() for label, _, _ in clients}
        for label, backend, send in clients:  # warm-up: imports, TLS, kept connections
            point_at(self.setup, sink_name, backend)
            send(message_id(tags[label], count))
        per_round = -(-count // rounds)
        for first in range(0, count, per_round):
            for label, backend, send in clients:
                point_at(self.setup, sink_name, backend)
                tally = tallies[label]
                with self.timed(tally):
                    for number in range(first, min(count, first + per_round)):
                        start = time.perf_counter()
                        send(message_id(tags[label], number))
                        tally.latencies.append(time.perf_counter() - start)
        baseline = None
        for label, _, _ in clients:
            self.verify(tags[label], count + 1, f"{case} / {sink_name} / {label}", sink_name)
            tally = tallies[label]
            row = Row(case, sink_name, label, count, tally.wall, tally.latencies, None, baseline)
            row.cpu = tally.cpu()
            self.add(row)
            baseline = baseline or row

    # send_messages() with many messages, as a bulk job does

    def run_batches(self, sink_name: str, sizes: Sizes, pipelining: bool) -> None:
        one = f"batch of {sizes.batch}, 1 connection"
        eight = f"batch of {sizes.batch}, 8 connections"
        clients: list[tuple[str, str, dict[str, Any]]] = [(DJANGO_LABEL, one, {})]
        if pipelining:  # without it, only the targets' figures are needed
            clients += [(RAW_LABEL, one, {}), (OURS_LABEL, one, {})]
        clients.append((OURS_LABEL, eight, {"max_connections": 8}))
        progress(f"{sink_name}: batches of {sizes.batch}")
        asyncio.run(raw_aiosmtplib_send(self.setup, self.setup.ports[sink_name], []))  # warm-up
        tags = {
            (label, case): self.tag(f"{case} {sink_name} {label}") for label, case, _ in clients
        }
        tallies = {key: Tally() for key in tags}
        for round_number in range(sizes.rounds):
            for label, case, options in clients:
                tag, tally = tags[(label, case)], tallies[(label, case)]
                first = round_number * sizes.batch
                numbers = range(first, first + sizes.batch)
                self.batch(sink_name, label, [message_id(tag, n) for n in numbers], options, tally)
        django_row = None
        for (label, case), tag in tags.items():
            self.verify(
                tag, sizes.batch * sizes.rounds, f"{case} / {sink_name} / {label}", sink_name
            )
            tally = tallies[(label, case)]
            row = Row(case, sink_name, label, sizes.batch, statistics.median(tally.rounds))
            row.baseline, row.cpu = django_row, tally.cpu()
            django_row = django_row or row
            self.add(row)

    def batch(
        self, sink_name: str, client: str, ids: list[str], options: dict[str, Any], tally: Tally
    ) -> None:
        from django.core.mail import get_connection

        messages = [make_message(mid) for mid in ids]
        point_at(self.setup, sink_name, DJANGO if client == DJANGO_LABEL else OURS)
        wall = tally.wall
        if client == RAW_LABEL:
            envelopes = [serialised(message) for message in messages]
            port = self.setup.ports[sink_name]
            with self.timed(tally):
                asyncio.run(raw_aiosmtplib_send(self.setup, port, envelopes))
        else:
            connection = get_connection(DJANGO if client == DJANGO_LABEL else OURS, **options)
            with self.timed(tally):
                sent = connection.send_messages(messages)
            if sent != len(messages):
                self.report.problems.append(f"{sink_name} / {client}: {sent} of {len(ids)} sent")
        tally.rounds.append(tally.wall - wall)


# Memory: one fresh process per client -------------------------------------------------


def _peak_reset() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0) so the peak is exact."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def _memory_probe(
    client: str, tag: str, setup: Setup, directory: str, size_mb: int, conn: Connection
) -> None:
    """Child process: send one message with a ``size_mb`` attachment; report the peak
    RSS growth (kB) over the resident size just before the send."""
    try:
        configure_django(setup, directory)
        point_at(setup, "0 ms", DJANGO if client == DJANGO_LABEL else OURS)
        send = _memory_sender(client, setup)
        send(make_message(message_id(tag, 1)))  # warm-up: imports, TLS, the mail loop
        attachment = bytes(range(256)) * (size_mb * 1024 * 1024 // 256)
        big = make_message(message_id(tag, 0), attachment=attachment)
        prepared: Any = serialised(big) if client == RAW_LABEL else big
        gc.collect()
        exact = _peak_reset()
        usage = resource.getrusage
        before = _status_kb("VmRSS") if exact else usage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        send(prepared)
        seconds = time.perf_counter() - start
        after = _status_kb("VmHWM") if exact else usage(resource.RUSAGE_SELF).ru_maxrss
        conn.send(("ok", {"growth_kb": after - before, "seconds": seconds, "exact": exact}))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _memory_sender(client: str, setup: Setup) -> Callable[[Any], None]:
    if client == RAW_LABEL:

        def send_raw(item: Any) -> None:
            envelope = item if isinstance(item, tuple) else serialised(item)
            asyncio.run(raw_aiosmtplib_send(setup, setup.ports["0 ms"], [envelope]))

        return send_raw
    return lambda message: message.send()


def _run_memory_probe(
    client: str, tag: str, setup: Setup, directory: str, size_mb: int
) -> dict[str, Any]:
    parent_conn, child_conn = SPAWN.Pipe()
    process = SPAWN.Process(
        target=_memory_probe,
        args=(client, tag, setup, directory, size_mb, child_conn),
        name="benchmark-memory",
    )
    process.start()
    child_conn.close()
    try:
        if not parent_conn.poll(CHILD_TIMEOUT):
            raise RuntimeError(f"the memory probe for {client} did not finish in time")
        kind, result = parent_conn.recv()
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join(5)
        parent_conn.close()
    if kind != "ok":
        raise RuntimeError(f"the memory probe for {client} failed:\n{result}")
    return result  # type: ignore[no-any-return]


def measure_memory(bench: Bench, directory: str, size_mb: int) -> None:
    case = f"one {size_mb} MB attachment"
    baseline: Row | None = None
    for client in (DJANGO_LABEL, RAW_LABEL, OURS_LABEL):
        progress(f"{case}: {client} (fresh process)")
        tag = bench.tag(f"{case} {client}")
        result = _run_memory_probe(client, tag, bench.setup, directory, size_mb)
        bench.verify(tag, 2, f"{case} / {client}", "0 ms")
        row = Row(case, "0 ms", client, 1, result["seconds"], rss_mb=result["growth_kb"] / 1024)
        row.baseline = baseline
        baseline = baseline or row
        bench.add(row)
        if not result["exact"]:
            bench.report.notes.append(
                "RSS: /proc/self/clear_refs was not writable; growth is of ru_maxrss, "
                "which under-counts when the process peaked earlier."
            )


# The report ---------------------------------------------------------------------------


def machine() -> list[str]:
    import aiosmtplib
    import django

    cpu = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return [
        f"Machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        f"Python {platform.python_version()}, Django {django.get_version()}, "
        f"aiosmtplib {aiosmtplib.__version__}",
    ]


HEADER = (
    f"{'case':<29} {'sink':<20} {'client':<14} {'msgs':>5} {'msg/s':>6} "
    f"{'median ms':>9} {'p95 ms':>7} {'RSS MB':>6} {'CPU %':>7} {'vs Django':>9}"
)


def _cell(value: float | None, width: int, digits: int = 1) -> str:
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def table(rows: list[Row]) -> list[str]:
    lines = [HEADER, "-" * len(HEADER)]
    for row in rows:
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
        cpu = f"{row.cpu[0] * 100:.0f}/{row.cpu[1] * 100:.0f}" if row.cpu else "-"
        rate = None if row.rss_mb is not None else row.rate
        lines.append(
            f"{row.case:<29} {row.sink:<20} {row.client:<14} {row.messages:>5} "
            f"{_cell(rate, 6, 0)} {_cell(row.median_ms, 9, 2)} {_cell(row.p95_ms, 7, 2)} "
            f"{_cell(row.rss_mb, 6)} {cpu:>7} {ratio:>9}"
        )
    return lines


@dataclass(frozen=True)
class Target:
    label: str
    figures: tuple[float, float] | None  # ours, the reference
    threshold: float
    at_least: bool  # True: ratio >= threshold passes; False: ratio <= threshold
    unit: str

    def line(self) -> str:
        sign = ">=" if self.at_least else "<="
        wanted = f"wanted {sign} {self.threshold:g}"
        if self.figures is None:
            return f"  [n/a ] {self.label}: not measured ({wanted})"
        ours, reference = self.figures
        ratio = ours / reference
        passed = ratio >= self.threshold if self.at_least else ratio <= self.threshold
        return (
            f"  [{'PASS' if passed else 'MISS'}] {self.label}: {ratio:.3f} "
            f"({ours:.1f} / {reference:.1f} {self.unit}; {wanted})"
        )


def targets(report: Report, plan: Plan) -> list[Target]:
    def figure(case: str, sink_name: str, client: str, what: str) -> float | None:
        row = report.find(case, sink_name, client)
        return getattr(row, what) if row else None

    def compare(
        what: str, sink_name: str, case: str, client: str, base_case: str, base_client: str
    ) -> tuple[float, float] | None:
        value = figure(case, sink_name, client, what)
        base = figure(base_case, sink_name, base_client, what)
        return (value, base) if value is not None and base else None

    def batch(sink_name: str, connections: int) -> str:
        count = plan.sizes[sink_name].batch
        return f"batch of {count}, {connections} connection" + ("s" if connections > 1 else "")

    zero, ten, nopipe = "0 ms", "10 ms", "10 ms, no PIPELINING"
    memory = f"one {plan.attachment_mb} MB attachment"
    return [
        Target(
            "0 ms batch, 1 connection: this backend / Django",
            compare("rate", zero, batch(zero, 1), OURS_LABEL, batch(zero, 1), DJANGO_LABEL),
            1.0, True, "msg/s",
        ),
        Target(
            "0 ms batch, 1 connection: this backend / raw aiosmtplib",
            compare("rate", zero, batch(zero, 1), OURS_LABEL, batch(zero, 1), RAW_LABEL),
            0.85, True, "msg/s",
        ),
        Target(
            "10 ms batch, 1 connection (PIPELINING): this backend / Django",
            compare("rate", ten, batch(ten, 1), OURS_LABEL, batch(ten, 1), DJANGO_LABEL),
            1.8, True, "msg/s",
        ),
        Target(
            "10 ms batch: max_connections=8 / Django's 1 connection",
            compare("rate", ten, batch(ten, 8), OURS_LABEL, batch(ten, 1), DJANGO_LABEL),
            12.0, True, "msg/s",
        ),
        Target(
            "10 ms, no PIPELINING: max_connections=8 / Django's 1 connection",
            compare("rate", nopipe, batch(nopipe, 8), OURS_LABEL, batch(nopipe, 1), DJANGO_LABEL),
            6.0, True, "msg/s",
        ),
        Target(
            "10 ms send_mail(): keep_alive / Django's default, new connection, median",
            compare("median_ms", ten, WARM, OURS_LABEL, COLD, DJANGO_LABEL),
            0.3, False, "ms",
        ),
        Target(
            "10 ms, no PIPELINING send_mail(): keep_alive / Django's default, median",
            compare("median_ms", nopipe, WARM, OURS_LABEL, COLD, DJANGO_LABEL),
            0.5, False, "ms",
        ),
        Target(
            f"{plan.attachment_mb} MB attachment: peak RSS growth, this backend / Django",
            compare("rss_mb", zero, memory, OURS_LABEL, memory, DJANGO_LABEL),
            1.0, False, "MB",
        ),
    ]  # fmt: skip


# The run ------------------------------------------------------------------------------


def trust_store(certfile: str, directory: str) -> str:
    """The system's CA bundle plus the sink's certificate, in one PEM file.

    Every client trusts the sink through it, so a new TLS context costs what it costs
    in production (loading the whole system bundle), not what one certificate costs."""
    system = ssl.get_default_verify_paths().cafile
    parts = [Path(system).read_bytes()] if system and os.path.isfile(system) else []
    path = Path(directory) / "trust-store.pem"
    path.write_bytes(b"\n".join([*parts, Path(certfile).read_bytes()]))
    return str(path)


def first_send(bench: Bench, oauth: Any) -> Setup:
    """Create the Mailbox with a refresh token only: its first send gets the access
    token from the token endpoint, as in production. Raw aiosmtplib reuses that token."""
    from django_xoauth2_mail.models import Mailbox

    issued = oauth.issue_tokens(SENDER)
    Mailbox.objects.create(email=SENDER, provider="oauth2", refresh_token=issued["refresh_token"])
    point_at(bench.setup, "0 ms", OURS)
    tag = bench.tag("first send")
    make_message(message_id(tag, 0)).send()
    bench.verify(tag, 1, "first send", "0 ms")
    token = Mailbox.objects.get(email=SENDER).access_token
    return replace(bench.setup, access_token=str(token))


def run_cases(bench: Bench, plan: Plan, directory: str) -> None:
    for listener in SINKS:
        sizes = plan.sizes[listener.name]
        bench.run_sends(listener.name, sizes, listener.pipelining)
        bench.run_batches(listener.name, sizes, listener.pipelining)
    queued.run_queued(bench, plan.sizes[queued.SINK].batch, directory)
    measure_memory(bench, directory, plan.attachment_mb)


def check_sink(report: Report, totals: dict[str, Any]) -> None:
    for key, what in (
        ("auth_refused", "authentications refused"),
        ("pipelining_violations", "flights of several commands to a server without PIPELINING"),
        ("protocol_errors", "protocol errors"),
    ):
        if totals[key]:
            report.problems.append(f"the sink counted {totals[key]} {what}")


def run(plan: Plan, report: Report) -> dict[str, Any]:
    """Start everything, run the cases, stop everything; return the sink's totals."""
    from django_xoauth2_mail.devserver.oauth import OAuth2Server
    from django_xoauth2_mail.devserver.tls import make_self_signed_certificate

    with contextlib.ExitStack() as stack:
        directory = stack.enter_context(
            tempfile.TemporaryDirectory(prefix="xoauth2-mail-benchmark-")
        )
        certfile, keyfile = make_self_signed_certificate(directory)
        trust = trust_store(certfile, directory)
        oauth = stack.enter_context(OAuth2Server())
        oauth.add_client(CLIENT_ID, CLIENT_SECRET)
        sink_process = SinkProcess(sink.SinkOptions(SINKS, certfile, keyfile, oauth.userinfo_url))
        stack.callback(sink_process.stop)
        setup = Setup(sink_process.ports, trust, oauth.token_url)
        configure_django(setup, directory)
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        bench = Bench(setup, sink_process, report)
        bench.setup = first_send(bench, oauth)
        tokens_before = oauth.token_request_count
        try:
            run_cases(bench, plan, directory)
        except Exception:
            report.problems.append("the run failed:\n" + traceback.format_exc())
        finally:
            close_kept_sessions()
        calls = oauth.token_request_count - tokens_before
        report.notes.append(
            f"Token endpoint calls during the timed runs: {calls} "
            f"(the first send, before them, made {tokens_before})."
        )
        if calls:
            report.problems.append(f"{calls} token endpoint calls during the timed runs")
        return sink_process.stats()


def print_report(report: Report, plan: Plan, quick: bool, seconds: float) -> None:
    mode = "quick (--quick: fewer messages, a smaller attachment)" if quick else "full"
    print(f"django-xoauth2-mail benchmark, {mode}")
    for line in machine():
        print(line)
    print(
        "Sink: its own process on 127.0.0.1, STARTTLS; it answers each flight of commands "
        "after its delay (one round trip)."
    )
    print()
    for line in table(report.rows):
        print(line)
    print()
    rounds = ", ".join(
        f"{name}: {sizes.rounds} rounds, clients taking turns"
        for name, sizes in plan.sizes.items()
        if sizes.rounds > 1
    )
    for line in LEGEND:
        print(line.format(rounds=rounds or "1 round"))
    print()
    print("Targets (from the issue; a MISS is reported, not fatal):")
    for target in targets(report, plan):
        print(target.line())
    print()
    for note in report.notes:
        print(note)
    if any(" received, " in problem for problem in report.problems):
        print(f"Delivery: PROBLEM ({report.delivered} messages counted by the sink).")
    else:
        print(f"Delivery: all {report.delivered} messages were delivered exactly once.")
    for problem in report.problems:
        print(f"ERROR: {problem}")
    print(f"Duration: {seconds:.1f} s")


LEGEND = (
    "msgs: sends timed (one by one), or messages per batch. msg/s: for batches, the "
    "median round ({rounds}).",
    "CPU %: CPU time / wall time of the benchmark process (all threads) / of the sink "
    "process; 100 = one core busy.",
    "vs Django: Django's time / this time for the same case (2.00x = twice as fast); "
    "8 connections are compared with Django's 1-connection batch; for the attachment: "
    "this RSS growth / Django's (below 1 = less memory).",
    "Clients: Django smtp = django.core.mail.backends.smtp (STARTTLS, AUTH PLAIN); raw "
    "aiosmtplib = one aiosmtplib.SMTP with XOAUTH2, sendmail() of bytes serialised before "
    "the clock starts; this backend = provider 'oauth2', STARTTLS, XOAUTH2.",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Compare Django's SMTP backend, raw aiosmtplib and this backend.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few hundred messages and a 2 MB attachment (well under a minute; CI runs it)",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    started = time.perf_counter()
    report = Report()
    try:
        check_sink(report, run(plan, report))
    except Exception:
        report.problems.append("the benchmark could not run:\n" + traceback.format_exc())
    print_report(report, plan, args.quick, time.perf_counter() - started)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
