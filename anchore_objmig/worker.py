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
import time
from dataclasses import dataclass, field

import psycopg

from anchore_objmig import codec, integrity, logs, plan, progress, tasks
from anchore_objmig.faults import crash_point
from anchore_objmig.db import DbSettings
from anchore_objmig.drivers import DocRow, DriverContext, NotFound, WriteItem, make_driver

log = logging.getLogger(__name__)

MAX_SHARD_ATTEMPTS = 3  # a shard whose worker lost its connection this often fails

COMMIT_METADATA = """
UPDATE archive_metadata m
   SET content_url = v.new_url, is_compressed = v.is_compressed, digest = v.digest, size = v.size,
       last_updated = %s
  FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::bool[], %s::text[],
              %s::bigint[]) AS v(bucket, archive_id, user_id, document_name, old_url, new_url, is_compressed, digest, size)
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
    delete_source: bool = True
    batch_size: int = 500
    batch_bytes: int = 32 * 1024 * 1024
    io_threads: int = 32
    multipart_threshold: int = 8 * 1024 * 1024


@dataclass
class BatchResult:
    moved: list = field(default_factory=list)  # DocRows now at the destination
    bytes: int = 0  # stored bytes written
    failures: list = field(default_factory=list)  # (DocRow, reason), still at the source
    leftovers: list = field(default_factory=list)  # (DocRow, reason), moved, old copy not deleted
    deleted: list = field(default_factory=list)  # old URLs deleted
    unverifiable: list = field(default_factory=list)  # DocRows read with nothing to check them against
    kept: list = field(default_factory=list)  # old URLs another metadata row still points at


def worker_name(pid=None):
    """How a worker process is named in objmig_shards: host:pid."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


def read_sources(source, rows):
    """{content_url: (stored bytes or exception, proven whole by the backend)}
    for a batch, in one bulk read."""
    try:
        return source.read_proven([row.content_url for row in rows])
    except Exception as exc:  # the whole bulk read failed: every document fails
        return {row.content_url: (exc, False) for row in rows}


def prepare_writes(rows, found, dest, dest_store, result):
    """Decode and check each document, then encode it for the destination.
    Each document fails alone: the rest of the batch goes on."""
    compress = dest_store.compression_enabled and dest.supports_compression
    threshold = dest_store.compression_threshold
    items = []
    for row in rows:
        stored, proven = found.get(row.content_url, (None, False))
        if stored is None or isinstance(stored, NotFound):
            result.failures.append((row, f"{integrity.MISSING}: {stored or f'no document at {row.content_url}'}"))
            continue
        if isinstance(stored, Exception):
            kind = integrity.CORRUPT if isinstance(stored, codec.CorruptDocument) else integrity.UNREADABLE
            result.failures.append((row, f"{kind}: {stored}"))
            continue
        try:
            plain = codec.decode(stored, row.is_compressed, row.digest, row.size)
            # The digest was just checked against these very bytes when they were stored plain.
            encoded = codec.encode(plain, compress, threshold, None if row.is_compressed else row.digest)
        except (codec.DigestMismatch, codec.CorruptDocument) as exc:
            result.failures.append((row, f"{integrity.CORRUPT}: {exc}"))
            continue
        except Exception as exc:  # noqa: BLE001 - whatever it is, it is this document's alone
            result.failures.append((row, f"{integrity.UNREADABLE}: {type(exc).__name__}: {exc}"))
            continue
        if not proven and row.digest is None and row.size is None:
            result.unverifiable.append(row)  # moved as read; named in the report
        url = dest.url_for(row.user_id, row.bucket, row.archive_id)
        items.append((row, WriteItem(url, row.user_id, row.bucket, row.archive_id, encoded)))
    return items


def start_writes(dest, items):
    """Start the batch's destination writes; a function that waits for them."""
    try:
        return dest.submit_writes([item for _, item in items])
    except Exception as exc:
        errors = {item.url: exc for _, item in items}
        return lambda: errors


def confirmed_writes(items, wait, result):
    """Wait for a batch's writes; the items whose destination copy is confirmed."""
    try:
        errors = wait()
    except Exception as exc:
        errors = {item.url: exc for _, item in items}
    written = []
    for row, item in items:
        if item.url in errors:
            result.failures.append((row, f"write refused: {errors[item.url]}"))
        else:
            written.append((row, item))
    return written


def commit_metadata(conn, written, result, task_id, delete_source):
    """Point the metadata rows at their new copies, in one statement; in the
    same transaction, note the old copies to delete (see progress.py)."""
    if not written:
        return []
    columns = [
        list(column)
        for column in zip(
            *[
                (
                    row.bucket,
                    row.archive_id,
                    row.user_id,
                    row.document_name,
                    row.content_url,
                    item.url,
                    item.stored.is_compressed,
                    item.stored.digest,
                    item.stored.size,
                )
                for row, item in written
            ]
        )
    ]
    with conn.transaction():
        updated = {tuple(key) for key in conn.execute(COMMIT_METADATA, [int(time.time()), *columns])}
        progress.forget_pending_deletes(conn, [item.url for _, item in written])
        if delete_source:
            old_urls = [row.content_url for row, _ in written if (row.bucket, row.archive_id, row.user_id, row.document_name) in updated]
            # A stored copy another row still points at is kept: it goes with the last row that uses it.
            free = integrity.unreferenced(conn, old_urls)
            result.kept = sorted(set(old_urls) - free)
            progress.note_pending_deletes(conn, task_id, sorted(free))
        crash_point("before-commit")
    if result.kept:  # the other rows may have moved in a concurrent transaction: look again, now all is committed
        with conn.transaction():
            late = integrity.unreferenced(conn, result.kept)
            progress.note_pending_deletes(conn, task_id, sorted(late))
        result.kept = sorted(set(result.kept) - late)
    committed = []
    for row, item in written:
        if (row.bucket, row.archive_id, row.user_id, row.document_name) in updated:
            committed.append((row, item))
        else:  # someone changed or removed the row meanwhile; leave it as they left it
            result.failures.append((row, "metadata row changed during the migration; not moved"))
    return committed


def delete_sources(source, committed, result):
    """Delete the old copies of documents whose metadata now points elsewhere
    (but those another metadata row still points at)."""
    kept = set(result.kept)
    committed = [(row, item) for row, item in committed if row.content_url not in kept]
    urls = sorted({row.content_url for row, _ in committed})
    try:
        errors = source.delete_many(urls)
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

    items: list  # (DocRow, WriteItem)
    wait: object  # waits for the writes, gives {url: exception}
    result: BatchResult


def launch_batch(rows, source, dest, dest_store):
    """Read, check and re-encode a batch, and start writing it (without waiting)."""
    result = BatchResult()
    found = read_sources(source, rows)
    crash_point("after-read")
    items = prepare_writes(rows, found, dest, dest_store, result)
    del found  # the encoded bytes are all we hold from here on
    return Flight(items, start_writes(dest, items), result)


def land_batch(flight, conn, source, delete_source, task_id):
    """Wait for a batch's writes, commit its metadata, delete the old copies."""
    result = flight.result
    written = confirmed_writes(flight.items, flight.wait, result)
    crash_point("after-write")
    committed = commit_metadata(conn, written, result, task_id, delete_source)
    crash_point("after-commit")
    if delete_source:
        delete_sources(source, committed, result)
        crash_point("after-delete")
    result.moved = [row for row, _ in committed]
    result.bytes = sum(item.stored.size for _, item in committed)
    return result


def shard_batches(conn, where, shard, batch_size, batch_bytes):
    """The shard's documents still at the source, a batch at a time: at most
    `batch_size` documents and, but for a single large one, `batch_bytes`."""
    after = None
    while True:
        query = plan.batch_query(where, shard, after)
        params = {
            "bucket": shard.bucket,
            "user_id": shard.user_id,
            "lower": shard.lower,
            "upper": shard.upper,
            "limit": batch_size,
        }
        if after is not None:
            params["after_id"], params["after_name"] = after
        rows = [DocRow(*row) for row in conn.execute(query, params)]
        if not rows:
            return
        rows = within_bytes(rows, batch_bytes)
        yield rows
        after = (rows[-1].archive_id, rows[-1].document_name)


def within_bytes(rows, limit):
    """The leading rows whose stored sizes add up to at most `limit` (at least one)."""
    total = 0
    for count, row in enumerate(rows):
        total += row.size or 0
        if total > limit and count > 0:
            return rows[:count]
    return rows


def finish_batch(spec, shard, flight, source, conn, on_batch):
    result = land_batch(flight, conn, source, spec.delete_source, spec.task_id)
    for row, reason in result.failures:
        log.error("document %s not moved: %s", row.label, reason)
    for row, reason in result.leftovers:
        log.warning("document %s: %s", row.label, reason)
    progress.record_batch(
        conn, spec.task_id, shard.shard_no, len(result.moved), result.bytes, result.failures, result.leftovers,
        result.deleted,
    )
    if result.moved:
        tasks.add_migrated(conn, spec.task_id, len(result.moved))
    moved = set(result.moved)
    integrity.record_unverifiable(conn, spec.task_id, [row for row in result.unverifiable if row in moved])
    crash_point("after-record")
    if on_batch:
        on_batch()


def worker_main(spec, log_settings):
    """Entry point of a worker process: one log line, never a traceback."""
    logs.configure(*log_settings)
    try:
        run_worker(spec)
    except KeyboardInterrupt:
        raise SystemExit(1) from None
    except Exception as exc:
        from anchore_objmig.db import redacted

        log.error("worker stopped: %s", redacted(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__))
        raise SystemExit(1) from None


class Pipeline:
    """Batches whose writes are in the air, landed in order.

    One batch's writes stay in flight while the next batch is read and
    encoded, across shard boundaries too; a shard is marked done when its
    last batch lands.
    """

    DEPTH = 1  # batches in the air while the next is prepared (memory: DEPTH + 1 batches)

    def __init__(self, spec, source, dest, on_batch):
        self.spec, self.source, self.dest, self.on_batch = spec, source, dest, on_batch
        self.in_flight = collections.deque()  # (shard, Flight, is its shard's last batch)

    def launch(self, conn, shard, rows, last):
        self.in_flight.append((shard, launch_batch(rows, self.source, self.dest, self.spec.dest), last))
        while len(self.in_flight) > self.DEPTH:
            self.land_oldest(conn)

    def land_oldest(self, conn):
        shard, flight, last = self.in_flight[0]
        finish_batch(self.spec, shard, flight, self.source, conn, self.on_batch)
        self.in_flight.popleft()  # only now: a batch that failed to land stays for abandon()
        if last:
            progress.finish_shard(conn, self.spec.task_id, shard.shard_no, "done")

    def land_all(self, conn):
        while self.in_flight:
            self.land_oldest(conn)

    def abandon(self):
        """The shards of batches not landed (their writes are strays a rerun overwrites)."""
        shards = {shard.shard_no: shard for shard, _, _ in self.in_flight}
        for _, flight, _ in self.in_flight:
            try:  # let writes in the air finish before another worker may redo them
                flight.wait()
            except Exception:
                pass
        self.in_flight.clear()
        return list(shards.values())


def move_shard(pipeline, conn, where, shard):
    """Launch every batch of a shard; the last is known one batch ahead."""
    spec = pipeline.spec
    previous = None
    for rows in shard_batches(conn, where, shard, spec.batch_size, spec.batch_bytes):
        if previous is not None:
            pipeline.launch(conn, shard, previous, last=False)
        previous = rows
    if previous is None:
        progress.finish_shard(conn, spec.task_id, shard.shard_no, "done")  # nothing left in it
    else:
        pipeline.launch(conn, shard, previous, last=True)


def run_worker(spec, on_batch=None):
    """Claim and move shards of the run until none is pending."""
    context = DriverContext(spec.db_settings, spec.io_threads, spec.multipart_threshold)
    source = make_driver(spec.source, context)
    dest = make_driver(spec.dest, context)
    where = plan.source_filter(source, dest, spec.buckets)
    pipeline = Pipeline(spec, source, dest, on_batch)
    name = worker_name()
    try:
        while True:
            shard = None
            try:
                conn = context.db_connection()
                shard = progress.claim_shard(conn, spec.task_id, name)
                if shard is None:
                    pipeline.land_all(conn)
                    return
                crash_point("after-claim")
                move_shard(pipeline, conn, where, shard)
            except Exception as exc:
                stuck = {s.shard_no: s for s in [shard, *pipeline.abandon()] if s is not None}.values()
                if not stuck:
                    raise  # claiming itself fails: retrying in a loop would only spin
                give_back(context, spec, stuck, exc)
    finally:
        source.close()
        dest.close()
        context.close()


def give_back(context, spec, shards, exc):
    """After an error: shards go back to pending when the database connection
    dropped (everything committed is consistent), or fail otherwise."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    conn = context.db_connection()
    for shard in shards:
        if isinstance(exc, psycopg.OperationalError):
            log.warning("shard %d: database connection lost (%s); giving the shard back", shard.shard_no, reason)
            state = progress.give_back_shard(conn, spec.task_id, shard.shard_no, MAX_SHARD_ATTEMPTS, str(exc)[:1000])
            if state == "failed":
                log.error("shard %d failed after %d attempts", shard.shard_no, MAX_SHARD_ATTEMPTS)
        else:
            log.error("shard %d (%s/%s) stopped: %s", shard.shard_no, shard.user_id, shard.bucket, reason)
            progress.finish_shard(conn, spec.task_id, shard.shard_no, "failed", str(exc)[:1000])
