"""The per-shard loop: read, decode, check, encode, write, commit, delete.

Order within a batch is what keeps every document readable at every instant:
the destination copies are written and confirmed (S3 checks Content-MD5, a
database write commits) before the metadata rows point at them, and the
source copies are deleted only after that commit. A crash between any two
steps leaves each metadata row pointing at a complete copy; a rerun selects
what is still at the source and overwrites any stray destination copy.
"""

import collections
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field, replace

import psycopg

from anchore_objmig import codec, db, integrity, ledger, logs, plan, streaming
from anchore_objmig.faults import crash_point
from anchore_objmig.db import DbSettings
from anchore_objmig.drivers import DEFAULT_MULTIPART_THRESHOLD, DocRow, DriverContext, NotFound, WriteItem, make_driver
from anchore_objmig.errors import ConnectError, ObjmigError
from anchore_objmig.ledger import LeaseLost

log = logging.getLogger(__name__)

MAX_SHARD_ATTEMPTS = 3  # a shard whose worker lost its connection this often fails
LOCK_WAIT_SECONDS = 90  # how long workers wait for their run to get its migration lock back

# The rows come as one JSON array of arrays (db.json_list): see db.TEXT_LIST for why.
COMMIT_METADATA = """
UPDATE archive_metadata m
   SET content_url = v.new_url, is_compressed = v.is_compressed, digest = v.digest, size = v.size,
       last_updated = %s
  FROM (SELECT e->>0 AS bucket, e->>1 AS archive_id, e->>2 AS user_id, e->>3 AS document_name, e->>4 AS old_url,
               e->>5 AS new_url, (e->>6)::bool AS is_compressed, e->>7 AS digest, (e->>8)::bigint AS size
          FROM json_array_elements(%s::json) AS e) AS v
 WHERE m.bucket = v.bucket AND m."archiveId" = v.archive_id AND m."userId" = v.user_id
   AND m."documentName" = v.document_name AND m.content_url = v.old_url
RETURNING m.bucket, m."archiveId", m."userId", m."documentName"
"""


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs; picklable for multiprocessing."""

    db_settings: DbSettings
    source: object  # StoreConfig
    dest: object  # StoreConfig
    task_id: int
    buckets: tuple | None
    excluded: tuple = ()  # locations inside the source's that are not this run's (plan.source_filter)
    delete_source: bool = True
    batch_size: int = 500
    batch_bytes: int = 32 * 1024 * 1024
    io_threads: int = 32
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD
    parent_pid: int | None = None  # a worker process exits when this process is gone
    instance: str = ""  # random, per host run: host:pid alone can repeat across containers

    @property
    def stream_threshold(self):
        """Stored or decoded bytes above which a document is streamed, not held whole."""
        return streaming.threshold_for(self.batch_bytes)


@dataclass
class BatchResult:
    moved: list = field(default_factory=list)  # DocRows now at the destination
    bytes: int = 0  # stored bytes written
    failures: list = field(default_factory=list)  # (DocRow, reason), still at the source
    leftovers: list = field(default_factory=list)  # (DocRow, reason), moved, old copy not deleted
    deleted: list = field(default_factory=list)  # old URLs deleted
    unverifiable: list = field(default_factory=list)  # DocRows read with nothing to check them against
    kept: list = field(default_factory=list)  # old URLs another metadata row still points at


def replace_parent(spec, pid):
    import secrets

    return replace(spec, parent_pid=pid, instance=secrets.token_hex(4))


def worker_name(instance, pid=None):
    """How a worker process is named in objmig_shards: host:pid:instance."""
    return f"{socket.gethostname()}:{pid or os.getpid()}:{instance}"


def read_sources(source, rows):
    """{content_url: (stored bytes or exception, their MD5 hex when the backend
    proved them whole, else None)} for a batch, in one bulk read."""
    try:
        return source.read_proven([row.content_url for row in rows])
    except Exception as exc:  # the whole bulk read failed: every document fails
        return {row.content_url: (exc, None) for row in rows}


def prepare_writes(rows, found, dest, dest_store, result, too_large=None, stream_threshold=streaming.THRESHOLD):
    """Decode and check each document, then encode it for the destination.
    Each document fails alone: the rest of the batch goes on. With a list
    `too_large`, documents that decompress past `stream_threshold` go there,
    to be streamed, instead of being held whole."""
    compress = dest_store.compression_enabled and dest.supports_compression
    threshold = dest_store.compression_threshold
    items = []
    for row in rows:
        stored, proof = found.get(row.content_url, (None, None))
        if stored is None or isinstance(stored, NotFound):
            result.failures.append((row, f"{integrity.MISSING}: {stored or f'no document at {row.content_url}'}"))
            continue
        if isinstance(stored, Exception):
            kind = integrity.CORRUPT if isinstance(stored, codec.CorruptDocument) else integrity.UNREADABLE
            result.failures.append((row, f"{kind}: {stored}"))
            continue
        try:
            limit = stream_threshold if too_large is not None else None
            # Sent as they are (stored plain, not compressed on the way) to a
            # backend that checks Content-MD5: the metadata's digest is sent as
            # it, and the backend's check is the digest check (one hash less).
            # A wrong size is corrupt anyway: hashed here, to say so as always.
            as_is = (not row.is_compressed and not proof and codec.is_md5_hex(row.digest)
                     and row.size in (None, len(stored))
                     and not (compress and len(stored) > threshold) and dest.checks_digest_of(len(stored)))
            # A proof is the MD5 these bytes were just hashed to on the way in: not hashed again.
            plain = codec.decode(stored, row.is_compressed, None if as_is else row.digest, row.size, limit,
                                 known_md5=proof)
            # Stored plain: the digest is these very bytes' (checked above, or left to the backend).
            encoded = codec.encode(plain, compress, threshold, None if row.is_compressed else row.digest)
            if as_is:
                encoded = replace(encoded, unchecked=True)
        except (codec.DigestMismatch, codec.CorruptDocument) as exc:
            result.failures.append((row, f"{integrity.CORRUPT}: {exc}"))
            continue
        except codec.TooLarge:
            too_large.append(row)
            continue
        except Exception as exc:  # noqa: BLE001 - whatever it is, it is this document's alone
            result.failures.append((row, f"{integrity.UNREADABLE}: {type(exc).__name__}: {exc}"))
            continue
        if not proof and row.digest is None and row.size is None:
            result.unverifiable.append(row)  # moved as read; named in the report
        url = dest.url_for(row.user_id, row.bucket, row.archive_id)
        items.append((row, WriteItem(url, row.user_id, row.bucket, row.archive_id, encoded)))
    return items


def start_writes(dest, items):
    """Start the batch's destination writes; a function that waits for them."""
    try:
        return dest.submit_writes([item for _, item in items])
    except LeaseLost:
        raise
    except Exception as exc:
        errors = {item.url: exc for _, item in items}
        return lambda: errors


def confirmed_writes(items, wait, result):
    """Wait for a batch's writes; the items whose destination copy is confirmed.
    LeaseLost (a write refused by the fence) stops the batch as a whole."""
    try:
        errors = wait()
    except LeaseLost:
        raise
    except Exception as exc:
        errors = {item.url: exc for _, item in items}
    written = []
    for row, item in items:
        if isinstance(errors.get(item.url), codec.DigestMismatch):  # found out by the backend's Content-MD5 check
            result.failures.append((row, f"{integrity.CORRUPT}: {errors[item.url]}"))
        elif item.url in errors:
            result.failures.append((row, f"write refused: {errors[item.url]}"))
        else:
            written.append((row, item))
    return written


def commit_metadata(conn, lease, written, result, delete_source):
    """Point the metadata rows at their new copies, in one statement; in the
    same fenced transaction, note the old copies to delete (see ledger.py)."""
    if not written:
        return []
    rows = db.json_list(
        (row.bucket, row.archive_id, row.user_id, row.document_name, row.content_url, item.url,
         item.stored.is_compressed, item.stored.digest, item.stored.size)
        for row, item in written
    )
    with db.transaction(conn):
        ledger.confirm_lease(conn, lease)  # first: a stale worker commits nothing
        updated = {tuple(key) for key in conn.execute(COMMIT_METADATA, (int(time.time()), rows))}
        ledger.forget_pending_deletes(conn, [item.url for _, item in written])
        old_urls = [row.content_url for row, _ in written if (row.bucket, row.archive_id, row.user_id, row.document_name) in updated]
        moved_urls = set(old_urls)
        ledger.note_moved(conn, lease.task_id, [row for row, _ in written if row.content_url in moved_urls])
        if delete_source:
            # A stored copy another row still points at is kept: it goes with the last row that uses it.
            free = integrity.unreferenced(conn, old_urls, lease.task_id)
            result.kept = sorted(set(old_urls) - free)
            ledger.note_pending_deletes(conn, lease.task_id, sorted(free))
        moved = [(row, item) for row, item in written if (row.bucket, row.archive_id, row.user_id, row.document_name) in updated]
        ledger.count_moved(conn, lease, len(moved), sum(item.stored.size for _, item in moved))
        unverifiable = set(result.unverifiable)  # named with the commit: a crash after it must not lose them
        integrity.record_unverifiable(conn, lease.task_id, [row for row, _ in moved if row in unverifiable])
        crash_point("before-commit")
    if result.kept:  # the other rows may have moved in a concurrent transaction: look again, now all is committed
        with db.transaction(conn):
            late = integrity.unreferenced(conn, result.kept, lease.task_id)
            ledger.note_pending_deletes(conn, lease.task_id, sorted(late))
        result.kept = sorted(set(result.kept) - late)
    committed = []
    for row, item in written:
        if (row.bucket, row.archive_id, row.user_id, row.document_name) in updated:
            committed.append((row, item))
        else:  # someone changed or removed the row meanwhile; leave it as they left it
            result.failures.append((row, "metadata row changed during the migration; not moved"))
    return committed


def delete_sources(conn, lease, source, committed, result):
    """Delete the old copies of documents whose metadata now points elsewhere
    (but those another metadata row still points at).

    Fenced like a write: a database source deletes inside a transaction that
    checks the lease; a network source only while this process may write.
    """
    kept = set(result.kept)
    committed = [(row, item) for row, item in committed if row.content_url not in kept]
    urls = sorted({row.content_url for row, _ in committed})
    try:
        if source.in_catalog_db:
            with db.transaction(conn):
                ledger.confirm_lease(conn, lease)
                errors = source.delete_many(urls)
        else:
            ledger.confirm_lease(conn, lease)
            source.context.check_fence()
            crash_point("before-delete-send")
            errors = source.delete_many(urls)
    except (LeaseLost, psycopg.OperationalError):
        raise  # the intents stay in objmig_pending_deletes: the run's owner finishes them
    except Exception as exc:
        errors = {url: exc for url in urls}
    for row, _ in committed:
        if row.content_url in errors:
            result.leftovers.append((row, f"moved, but the source copy was not deleted: {errors[row.content_url]}"))
        elif row.content_url not in result.deleted:
            result.deleted.append(row.content_url)


@dataclass
class Flight:
    """A batch whose destination writes are under way."""

    lease: ledger.Lease
    items: list  # (DocRow, WriteItem)
    wait: object  # waits for the writes, gives {url: exception}
    result: BatchResult
    last: bool  # the last batch of its shard


def launch_batch(conn, lease, rows, source, dest, dest_store, last, threshold=streaming.THRESHOLD, measured=None):
    """Read, check and re-encode a batch, and start writing it (without waiting).

    The lease is checked right before the writes start, so a worker that lost
    its shard sends nothing after the new owner may have committed.
    """
    result = BatchResult()
    # Documents too large to hold whole are streamed one at a time, first, and
    # join the batch's items already written; see streaming.py.
    large = streaming.large_rows(conn, source, dest, rows, threshold, measured)
    too_large = [] if streaming.can_stream(source, dest) else None
    if large:
        ledger.confirm_lease(conn, lease)
        rows = [row for row in rows if row not in large]
    streamed = streaming.move(conn, lease, large, source, dest, dest_store, result)
    found = read_sources(source, rows)
    crash_point("after-read")
    items = prepare_writes(rows, found, dest, dest_store, result, too_large, threshold)
    del found  # the encoded bytes are all we hold from here on
    streamed += streaming.move(conn, lease, too_large or [], source, dest, dest_store, result)
    if dest.in_catalog_db:  # the writes join the fenced transaction and commit with it
        with db.transaction(conn):
            ledger.confirm_lease(conn, lease)
            wait = start_writes(dest, items)
    else:
        ledger.confirm_lease(conn, lease)
        wait = start_writes(dest, items)
    return Flight(lease, items + streamed, wait, result, last)


def land_batch(flight, conn, source, delete_source):
    """Wait for a batch's writes, commit its metadata, delete the old copies."""
    result = flight.result
    written = confirmed_writes(flight.items, flight.wait, result)
    crash_point("after-write")
    committed = commit_metadata(conn, flight.lease, written, result, delete_source)
    crash_point("after-commit")
    if delete_source:
        delete_sources(conn, flight.lease, source, committed, result)
        crash_point("after-delete")
    result.moved = [row for row, _ in committed]
    result.bytes = sum(item.stored.size for _, item in committed)
    return result


# A batch's byte budget counts decoded bytes: what the worker holds once a
# document is decompressed and re-encoded. archive_metadata.size is the length
# of the *stored* bytes, so a zlib-compressed document is counted as this many
# times its stored size: Anchore's JSON (zlib level 3) shrinks 5-10 times, very
# repetitive documents more; zlib's own limit (about 1000 times) would make
# every compressed document a batch of its own. A document that decodes to
# more than its estimate still moves: its batch exceeds the budget by the
# difference.
COMPRESSED_EXPANSION = 20
# Rows from old Anchore versions may have no size; they are measured
# (streaming.measured_sizes), and one that cannot be (its object not found)
# counts as this many stored bytes (most Anchore documents are well under it).
UNKNOWN_STORED_SIZE = 1024 * 1024


def decoded_estimate(row, measured=None):
    """The bytes a document takes once decoded, as far as its metadata row
    (or, with no size in it, `measured`: {content_url: stored size}) tells."""
    stored = row.size if row.size is not None else (measured or {}).get(row.content_url, UNKNOWN_STORED_SIZE)
    return stored * COMPRESSED_EXPANSION if row.is_compressed else stored


def shard_batches(conn, where, shard, batch_size, batch_bytes, measure=None):
    """The shard's documents still at the source, a batch at a time: at most
    `batch_size` documents and, but for a single large one, `batch_bytes`
    counted in decoded bytes (decoded_estimate). `measure(conn, rows)`: the
    stored sizes of rows with no size, where they can be measured."""
    def trim(rows):
        measured = measure(conn, rows) if measure is not None else None
        rows, decoded = within_bytes(rows, batch_bytes, measured)
        log.debug("shard %d: batch of %d documents from %s to %s, about %d bytes decoded (budget %d)",
                  shard.shard_no, len(rows), rows[0].label, rows[-1].label, decoded, batch_bytes)
        return rows

    return plan.shard_rows(conn, where, shard, batch_size, make=DocRow, trim=trim)


def within_bytes(rows, limit, measured=None):
    """The leading rows whose decoded sizes (estimated) add up to at most
    `limit` (at least one row), and that estimate."""
    total = 0
    for count, row in enumerate(rows):
        size = decoded_estimate(row, measured)
        if total + size > limit and count > 0:
            return rows[:count], total
        total += size
    return rows, total


def finish_batch(spec, flight, source, conn, on_batch):
    result = land_batch(flight, conn, source, spec.delete_source)
    for row, reason in result.failures:
        log.error("document %s not moved: %s", row.label, reason)
    for row, reason in result.leftovers:
        log.warning("document %s: %s", row.label, reason)
    ledger.record_batch(conn, flight.lease, result.failures, result.leftovers, result.deleted)
    crash_point("after-record")
    if on_batch:
        on_batch()


def bind_to_parent(parent_pid):
    """Die with the parent (Linux PR_SET_PDEATHSIG): a worker must never go on
    moving documents once the process holding the migration lock is gone."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        log.debug("PR_SET_PDEATHSIG unavailable; the parent is checked before each batch instead")
    if parent_pid is not None and os.getppid() != parent_pid:
        raise SystemExit(1)  # the parent died before the death signal was armed


def worker_main(spec, log_settings):
    """Entry point of a worker process: one log line, never a traceback."""
    bind_to_parent(spec.parent_pid)
    logs.configure(*log_settings)
    try:
        run_worker(spec)
    except KeyboardInterrupt:
        raise SystemExit(1) from None
    except Exception as exc:
        log.error("worker stopped: %s", db.redacted(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__))
        raise SystemExit(1) from None


def boot_clock():
    """Seconds on a clock that keeps running while the process is stopped or the host suspended."""
    return time.clock_gettime(getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC))


class Fence:
    """What this process may still write: the leases it holds, each good
    until `lease_seconds` after it was last confirmed in the database.

    Drivers call check() right before every request that changes a backend
    (DriverContext.check_fence). A lease not confirmed in time, or found lost,
    stops every write of the process: a stale worker must not land anything
    after its shard may have a new owner.
    """

    def __init__(self, lease_seconds, write_grace_seconds=0.0):
        self.lease_seconds = lease_seconds
        # A batch showing no progress for longer than any write can take is
        # stuck (a hung mount, say): its lease is let lapse so another worker
        # can take the shard over.
        self.stuck_after = lease_seconds + write_grace_seconds
        self.progressed = boot_clock()
        self.lock = threading.Lock()
        self.deadlines = {}  # shard_no -> clock value until which its lease holds
        self.leases = {}  # shard_no -> Lease
        self.lost = None  # LeaseLost once any held lease is gone

    def progress(self):
        """The worker moved on (claimed a shard, launched or landed a batch)."""
        self.progressed = boot_clock()

    def stuck_for(self):
        """Seconds without progress while holding leases, past the bound; else 0."""
        idle = boot_clock() - self.progressed
        return idle if self.leases and idle > self.stuck_after else 0

    def hold(self, lease, confirmed_at):
        with self.lock:
            self.leases[lease.shard_no] = lease
            self.deadlines[lease.shard_no] = confirmed_at + self.lease_seconds

    def release(self, lease):
        with self.lock:
            if self.leases.get(lease.shard_no) == lease:
                del self.leases[lease.shard_no]
                del self.deadlines[lease.shard_no]

    def held(self):
        with self.lock:
            return list(self.leases.values())

    def confirmed(self, shard_nos, at):
        with self.lock:
            for shard_no in shard_nos:
                if shard_no in self.deadlines:
                    self.deadlines[shard_no] = at + self.lease_seconds

    def mark_lost(self, error, lease=None):
        with self.lock:
            if lease is not None and self.leases.get(lease.shard_no) != lease:
                return  # released meanwhile (finished or given back): not a loss
            if self.lost is None or (error.run_over and not self.lost.run_over):
                self.lost = error

    def reset(self):
        """After the lost leases were dropped: the process may write again under new ones."""
        with self.lock:
            self.lost = None

    def check(self):
        with self.lock:
            if self.lost is not None:
                raise self.lost
            now = boot_clock()
            for shard_no, deadline in self.deadlines.items():
                if now > deadline:
                    raise LeaseLost(f"the lease on shard {shard_no} was not confirmed for {self.lease_seconds:.0f}s")


class Heartbeat(threading.Thread):
    """Confirms this process's leases every few seconds on a connection of its
    own, whatever a batch is doing, and says whom the worker waits for when a
    database lock holds it up."""

    def __init__(self, fence, db_settings, watched_conn):
        super().__init__(name="objmig-heartbeat", daemon=True)
        self.fence, self.db_settings = fence, db_settings
        self.watched_pid = watched_conn.info.backend_pid
        self.interval = max(0.5, fence.lease_seconds / 6)
        self.stopping = threading.Event()
        self.conn = None
        self.reported = set()
        self.stuck_reported = False

    def run(self):
        while not self.stopping.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - the database away: leases simply run out meanwhile
                log.debug("heartbeat failed: %s", db.first_line(exc))
                self.close()

    def beat(self):
        if self.conn is None or self.conn.closed:
            self.conn = db.connect(self.db_settings, autocommit=True, role="heartbeat")
        leases = self.fence.held()
        stuck = self.fence.stuck_for()
        if stuck:
            if not self.stuck_reported:
                self.stuck_reported = True
                log.warning("no progress for %.0fs (a write or read that does not return): letting the leases on "
                            "shards %s lapse so another worker can take them over", stuck,
                            ", ".join(str(lease.shard_no) for lease in leases))
            return
        self.stuck_reported = False
        started = boot_clock()
        refreshed = ledger.heartbeat(self.conn, leases)
        self.fence.confirmed(refreshed, started)
        for lease in leases:
            if lease.shard_no not in refreshed:
                error = ledger.lost_lease(self.conn, lease)
                log.debug("heartbeat: shard %d: %s", lease.shard_no, error)
                self.fence.mark_lost(error, lease)
        self.report_blockers()

    def report_blockers(self):
        for name, address, state, seconds in db.blockers(self.conn, self.watched_pid):
            if (name, address) not in self.reported:
                self.reported.add((name, address))
                log.warning("waiting for a database lock held by %s at %s (%s for %ss); the server ends a "
                            "transaction idle for %ss", name, address, state, seconds, db.IDLE_IN_TRANSACTION_SECONDS)

    def stop(self):
        self.stopping.set()
        self.join(timeout=10)
        self.close()

    def close(self):
        db.close_quietly(self.conn)
        self.conn = None


class Pipeline:
    """Batches whose writes are in the air, landed in order.

    One batch's writes stay in flight while the next batch is read and
    encoded, across shard boundaries too; a shard is marked done when its
    last batch lands.
    """

    DEPTH = 1  # batches in the air while the next is prepared (memory: DEPTH + 1 batches)

    def __init__(self, spec, source, dest, fence, on_batch):
        self.spec, self.source, self.dest, self.fence, self.on_batch = spec, source, dest, fence, on_batch
        self.in_flight = collections.deque()  # Flights
        self.measured = {}  # content_url: stored size, of rows with no size measured when their batch was cut

    def launch(self, conn, lease, rows, last):
        self.fence.check()
        self.fence.progress()
        measured = {row.content_url: self.measured.pop(row.content_url) for row in rows
                    if row.content_url in self.measured}
        self.in_flight.append(launch_batch(conn, lease, rows, self.source, self.dest, self.spec.dest, last,
                                           self.spec.stream_threshold, measured))
        while len(self.in_flight) > self.DEPTH:
            self.land_oldest(conn)

    def land_oldest(self, conn):
        flight = self.in_flight[0]
        finish_batch(self.spec, flight, self.source, conn, self.on_batch)
        self.fence.progress()
        self.in_flight.popleft()  # only now: a batch that failed to land stays for abandon()
        if flight.last:
            self.finish(conn, flight.lease)

    def finish(self, conn, lease):
        ledger.finish_shard(conn, lease, "done")
        self.fence.release(lease)

    def land_all(self, conn):
        while self.in_flight:
            self.land_oldest(conn)

    def abandon(self):
        """The leases of batches not landed (their writes are strays a rerun
        overwrites), once every write in the air has ended."""
        leases = {flight.lease.shard_no: flight.lease for flight in self.in_flight}
        for flight in self.in_flight:
            try:  # let writes in the air finish before another worker may redo them
                flight.wait()
            except Exception:
                pass
        self.in_flight.clear()
        return list(leases.values())


def move_shard(pipeline, conn, where, lease):
    """Launch every batch of a shard; the last is known one batch ahead."""
    spec = pipeline.spec
    previous = None
    def measure(conn, rows):  # each row once (an S3 HEAD each), kept for its batch's launch
        known = pipeline.measured
        known.update(streaming.measured_sizes(conn, pipeline.source, [row for row in rows
                                                                      if row.content_url not in known]))
        return known

    for rows in shard_batches(conn, where, lease.shard, spec.batch_size, spec.batch_bytes, measure):
        if previous is not None:
            pipeline.launch(conn, lease, previous, last=False)
        previous = rows
    if previous is None:
        pipeline.finish(conn, lease)  # nothing left in it
    else:
        pipeline.launch(conn, lease, previous, last=True)


def run_worker(spec, on_batch=None, stop=None):
    """Claim and move shards of the run until none can be claimed.

    `stop`: a threading.Event that ends the work between batches (the parent
    sets it when its run lost the migration lock for good).
    """
    context = DriverContext(spec.db_settings, spec.io_threads, spec.multipart_threshold)
    conn, run = through_outage(context, lambda conn: ledger.get_run(conn, spec.task_id))
    fence = Fence(run.lease_seconds, run.write_grace_seconds) if run else Fence(ledger.RunRow.lease_seconds)
    context.fence = fence
    source = make_driver(spec.source, context)
    dest = make_driver(spec.dest, context)
    where = plan.source_filter(source, dest, spec.buckets, spec.excluded)
    pipeline = Pipeline(spec, source, dest, fence, on_batch)
    heart = Heartbeat(fence, spec.db_settings, conn)
    heart.start()
    name = worker_name(spec.instance)
    away_since = None  # when the database became unreachable
    try:
        while stop is None or not stop.is_set():
            lease = None
            try:
                conn = context.db_connection()
                heart.watched_pid = conn.info.backend_pid
                claimed_at = boot_clock()
                lease, previous = ledger.claim_shard(conn, spec.task_id, name)
                if lease is None:
                    pipeline.land_all(conn)
                    if not wait_for_claimable(conn, spec.task_id, stop):
                        return
                    continue
                fence.hold(lease, claimed_at)
                fence.progress()
                if previous:
                    log.warning("took over shard %d from %s, silent for longer than the run's takeover time",
                                lease.shard_no, previous)
                crash_point("after-claim")
                move_shard(pipeline, conn, where, lease)
            except LeaseLost as lost:
                stuck = pipeline.abandon()
                log.warning("%s; this worker stops writing for it", lost)
                release(context, fence, [*stuck, *([lease] if lease else [])], str(lost), counted=False)
                fence.reset()
                if lost.run_over:
                    return
            except Exception as exc:
                stuck = [*pipeline.abandon(), *([lease] if lease else [])]
                if stuck:
                    give_back(context, fence, stuck, exc)
                if not database_away(exc):
                    if not stuck:
                        raise  # claiming itself fails: retrying in a loop would only spin
                    continue
                away_since = away_since or time.monotonic()
                if time.monotonic() - away_since > LOCK_WAIT_SECONDS:
                    raise ObjmigError(f"the database was unreachable for {LOCK_WAIT_SECONDS}s: {db.first_line(exc)}; "
                                      "this worker stops") from None
                time.sleep(1)  # the database restarts, or a dropped connection: try again
                continue
            away_since = None
    finally:
        heart.stop()
        source.close()
        dest.close()
        context.close()


def wait_for_claimable(conn, task_id, stop):
    """After a claim found nothing: True to claim again (the run got its
    migration lock back), False when this worker is done."""
    if ledger.claim_outlook(conn, task_id) != "no-lock":
        return False  # done, closed, or the rest is held by live workers
    log.warning("migration task %d does not hold the migration lock right now; waiting up to %ds for it",
                task_id, LOCK_WAIT_SECONDS)
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while time.monotonic() < deadline:
        if stop is not None and stop.wait(1):
            return False
        if stop is None:
            time.sleep(1)
        outlook = ledger.claim_outlook(conn, task_id)
        if outlook != "no-lock":
            return outlook == "others"
    raise ObjmigError(f"migration task {task_id} lost its migration lock and did not get it back "
                      f"within {LOCK_WAIT_SECONDS}s; this worker stops")


def release(context, fence, leases, reason, counted):
    """Give shards back once their writes are over; nothing happens to those
    whose lease is already gone."""
    seen = set()
    for lease in leases:
        if lease.shard_no in seen:
            continue
        seen.add(lease.shard_no)
        fence.release(lease)
        try:
            ledger.give_back(context.db_connection(), lease, reason[:1000], MAX_SHARD_ATTEMPTS if counted else None)
        except (psycopg.Error, ObjmigError) as exc:
            log.debug("could not give back shard %d: %s", lease.shard_no, exc)


def through_outage(context, step):
    """(connection, step(connection)), waiting out a database outage as the
    work loop does: a worker that starts while the database restarts (the
    host's first worker is the parent itself) must not end the run."""
    away_since = time.monotonic()
    while True:
        try:
            conn = context.db_connection()
            return conn, step(conn)
        except Exception as exc:
            if not database_away(exc):
                raise
            if time.monotonic() - away_since > LOCK_WAIT_SECONDS:
                raise ObjmigError(f"the database was unreachable for {LOCK_WAIT_SECONDS}s: {db.first_line(exc)}; "
                                  "this worker stops") from None
            time.sleep(1)


def database_away(exc):
    """A dropped connection, a restarting server, a lock wait given up: worth waiting out."""
    return isinstance(exc, (psycopg.OperationalError, ConnectError))


def give_back(context, fence, leases, exc):
    """After an error: shards go back to pending when the database connection
    dropped (everything committed is consistent), or fail otherwise. With the
    database away, the leases simply lapse and the shards are taken over."""
    try:
        give_back_now(context, fence, leases, exc)
    except (psycopg.Error, ObjmigError) as again:
        for lease in leases:
            fence.release(lease)
        log.warning("could not give back shards %s (%s); their leases lapse instead",
                    ", ".join(str(lease.shard_no) for lease in leases), db.first_line(again))


def give_back_now(context, fence, leases, exc):
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    conn = context.db_connection()
    for lease in {lease.shard_no: lease for lease in leases}.values():
        fence.release(lease)
        if database_away(exc):
            log.warning("shard %d: database connection lost (%s); giving the shard back", lease.shard_no, reason)
            state = ledger.give_back(conn, lease, str(exc)[:1000], MAX_SHARD_ATTEMPTS)
            if state == "failed":
                log.error("shard %d failed after %d attempts", lease.shard_no, MAX_SHARD_ATTEMPTS)
        else:
            log.error("shard %d (%s) stopped: %s", lease.shard_no, lease.shard.label, reason)
            try:
                ledger.finish_shard(conn, lease, "failed", str(exc)[:1000])
            except LeaseLost as lost:
                log.warning("shard %d: %s", lease.shard_no, lost)
