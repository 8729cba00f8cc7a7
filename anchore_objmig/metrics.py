"""Prometheus metrics for node_exporter's textfile collector.

A run ends by writing its figures in the text exposition format, atomically:
the collector may read the file at any instant, so it must only ever see a
whole old file or a whole new one (temp file in the same directory, fsync,
mode 0644, rename, fsync of the directory). One file can serve both
commands: each sample carries a command="migrate"|"verify" label and a run
replaces only its own command's samples, keeping the other's.

prometheus_client renders and parses the format. Its write_to_textfile() is
not used for the file itself: it neither fsyncs (after a crash the renamed
file can be empty) nor sets the mode (under umask 077, as in many root cron
jobs, it writes 0600, which node_exporter's user cannot read).

Every metric is a gauge describing the *last* run (the next run may well
move fewer documents), so none is named *_total, the suffix Prometheus
reserves for counters.
"""

import contextlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from anchore_objmig.errors import UsageError

log = logging.getLogger(__name__)

PREFIX = "anchore_objmig_"
MIGRATE, VERIFY = "migrate", "verify"
# name: HELP text. Written in this order, each family once with HELP and TYPE.
FAMILIES = {
    PREFIX + "documents_migrated": "Documents moved by the last migrate run.",
    PREFIX + "migrated_stored_bytes": "Bytes stored at the destination (after compression) by the last migrate run.",
    PREFIX + "documents_failed": "Documents the last migrate run could not move.",
    PREFIX + "documents_verified": "Documents the last verify run read back and checked.",
    PREFIX + "documents_bad": "Documents the last verify run found missing, corrupt or not matching their metadata.",
    PREFIX + "duration_seconds": "Wall-clock duration of the last run.",
    PREFIX + "last_run_timestamp_seconds": "Unix time the last run ended, successful or not.",
    PREFIX + "last_success_timestamp_seconds": "Unix time the last fully successful run ended.",
}
LAST_SUCCESS = PREFIX + "last_success_timestamp_seconds"


@dataclass(frozen=True)
class Sample:
    name: str
    labels: tuple  # ((name, value), ...)
    value: float


@dataclass(frozen=True)
class RunResult:
    """What a finished run reports; `documents`/`failed` are moved/failed for
    migrate and checked/bad for verify."""

    command: str
    success: bool
    duration_seconds: float
    documents: int
    failed: int
    bytes: int = 0
    finished_at: float = field(default_factory=time.time)


def samples_for(result, previous=()):
    """The samples of one run; the last success time comes from `previous`
    samples when this run did not succeed."""
    labels = (("command", result.command),)
    counts = {
        MIGRATE: {"documents_migrated": result.documents, "migrated_stored_bytes": result.bytes,
                  "documents_failed": result.failed},
        VERIFY: {"documents_verified": result.documents, "documents_bad": result.failed},
    }[result.command]
    samples = [Sample(PREFIX + name, labels, value) for name, value in counts.items()]
    samples.append(Sample(PREFIX + "duration_seconds", labels, round(result.duration_seconds, 3)))
    samples.append(Sample(PREFIX + "last_run_timestamp_seconds", labels, round(result.finished_at, 3)))
    if result.success:
        samples.append(Sample(LAST_SUCCESS, labels, round(result.finished_at, 3)))
    else:
        samples += [s for s in previous if s.name == LAST_SUCCESS and s.labels == labels]
    return samples


def record(path, result):
    """Write `result` into the metrics file at `path` (if any), keeping the
    other command's samples. False, after logging why, if it cannot."""
    if not path:
        return True
    previous = read_samples(path)
    others = [s for s in previous if dict(s.labels).get("command") != result.command]
    try:
        write_metrics(path, others + samples_for(result, previous))
    except OSError as exc:
        log.error("cannot write the metrics file %s: %s", path, exc.strerror or exc)
        return False
    return True


def record_failure(path, command, started, documents=0, nbytes=0):
    """A run that ended without finishing (an error, a stop, a database it
    never reached) is a run too: the file must not keep saying the last run
    was the old success. `started` is time.monotonic() at its start."""
    return record(path, RunResult(command=command, success=False, duration_seconds=time.monotonic() - started,
                                  documents=documents, failed=0, bytes=nbytes))


def check_path(path):
    """Refuse, before any work, a metrics path we could not write at the end."""
    if not path:
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"--metrics-file {path}: directory {directory} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"--metrics-file {path}: is a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"--metrics-file {path}: directory {directory} is not writable")


def write_metrics(path, samples):
    """Replace the file at `path` with `samples`, atomically, mode 0644."""
    text = render(samples)
    directory = os.path.dirname(os.path.abspath(path))
    # A dot name without .prom: the textfile collector never reads the temp file.
    fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), 0o644)  # mkstemp makes it 0600; the collector runs as another user
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    sync_directory(directory)


def sync_directory(directory):
    """Make the rename itself durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Snapshot:
    """A prometheus_client collector serving fixed samples."""

    def __init__(self, samples):
        self.samples = samples

    def collect(self):
        by_family = {}
        for sample in self.samples:
            if sample.name not in FAMILIES:
                raise ValueError(f"unknown metric {sample.name}")
            by_family.setdefault(sample.name, {})[sample.labels] = sample  # last one wins
        for name, help_text in FAMILIES.items():
            if name not in by_family:
                continue
            family = GaugeMetricFamily(name, help_text, labels=["command"])
            for labels, sample in sorted(by_family[name].items()):
                family.add_metric([dict(labels)["command"]], number(sample.value))
            yield family


def number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"metric value must be a number, got {value!r}")
    return value


def render(samples):
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(samples))
    return generate_latest(registry).decode("utf-8")


def read_samples(path):
    """Our samples from an existing metrics file; [] if there is none or it is
    not ours (a broken file must not stop the run from writing a good one)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (FileNotFoundError, IsADirectoryError):
        return []
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("ignoring the unreadable metrics file %s: %s", path, exc)
        return []
    samples = []
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in FAMILIES and set(sample.labels) == {"command"}:
                    samples.append(Sample(sample.name, (("command", sample.labels["command"]),), sample.value))
    except ValueError as exc:
        log.warning("ignoring the metrics file %s, which is not in the text format: %s", path, exc)
        return []
    return samples
