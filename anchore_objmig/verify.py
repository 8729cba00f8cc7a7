"""The `verify` command: read back every document a configuration holds.

Every archive_metadata row whose content_url lies in the configured location
(driver, and S3 bucket and prefix or localfs directory) is read from its
backend and checked as Anchore checks it: MD5 of the stored bytes against
`digest`, their length against `size`, and zlib decompression when
`is_compressed`. The work is cut into shards as a migration's is and spread
over worker processes, but nothing is written anywhere: no task rows, no
tool tables; every database session is read-only, so the server itself
refuses a write (a large document streamed out of PostgreSQL passes through
the reading session's own temporary table, written in explicit read-write
transactions; see drivers/stream_read.py).

A document that looks bad is looked up again before it is named: Anchore
may be running and may have rewritten or removed it meanwhile.
"""

import logging
import multiprocessing
import queue
import time
from dataclasses import dataclass, field

from psycopg import sql

from anchore_objmig import codec, db, logs, metrics, plan, streaming, worker
from anchore_objmig.config import load_store_config
from anchore_objmig.display import ProgressDisplay, human_bytes, print_json
from anchore_objmig.drivers import DocRow, DriverContext, NotFound, make_driver
from anchore_objmig.errors import EXIT_FAILED, EXIT_OK
from anchore_objmig.ledger import Totals

log = logging.getLogger(__name__)

CURRENT_ROWS = """
SELECT m.bucket, m."archiveId", m."userId", m."documentName", m.content_url, m.is_compressed, m.digest, m.size
  FROM archive_metadata m
  JOIN unnest(%s::text[], %s::text[], %s::text[], %s::text[]) AS k(bucket, archive_id, user_id, document_name)
    ON m.bucket = k.bucket AND m."archiveId" = k.archive_id AND m."userId" = k.user_id
   AND m."documentName" = k.document_name
 WHERE {}
"""


@dataclass(frozen=True)
class VerifyOptions:
    config: str
    analysis_archive: bool = False
    buckets: tuple = ()
    workers: int = 1
    batch_size: int = 500
    io_threads: int = 8
    progress: str = "auto"
    metrics_file: str | None = None
    log_settings: tuple = ()
    json: bool = False  # the result as one JSON document on stdout


@dataclass(frozen=True)
class VerifySpec:
    """What a worker process needs; picklable."""

    db_settings: object
    store: object  # StoreConfig
    buckets: tuple
    batch_size: int
    io_threads: int
    batch_bytes: int = 32 * 1024 * 1024  # decoded bytes held per batch, as migrate's default --batch-bytes


@dataclass
class BatchReport:
    good: int = 0
    bytes: int = 0  # stored bytes of the good documents
    bad: list = field(default_factory=list)  # (user_id, bucket, archive_id, url, reason)
    changed: int = 0  # rewritten or removed while we read them: not judged
    no_digest: int = 0  # rows without a digest: only size and zlib checked


class ReadOnlyContext(DriverContext):
    """Driver context whose database sessions refuse every write."""

    def db_connection(self):
        fresh = self._connection is None or self._connection.closed
        conn = super().db_connection()
        if fresh:
            conn.execute("SET default_transaction_read_only = on")
        return conn

    def reader_connection(self):
        fresh = self._reader is None or self._reader.closed
        conn = super().reader_connection()
        if fresh:  # streamed reads write only their own temporary table, explicitly (stream_read.own_table)
            conn.execute("SET default_transaction_read_only = on")
        return conn


def location_filter(driver, buckets):
    """WHERE condition (alias m) for the documents stored in `driver`'s location."""
    parts = [sql.SQL("starts_with(m.content_url, {})").format(sql.Literal(driver.location))]
    if buckets:
        parts.append(sql.SQL("m.bucket = ANY({})").format(sql.Literal(list(buckets))))
    return sql.SQL(" AND ").join(parts)


class Verifier:
    """One process's driver, read-only connection and selection."""

    def __init__(self, spec):
        self.context = ReadOnlyContext(spec.db_settings, spec.io_threads)
        self.driver = make_driver(spec.store, self.context)
        self.where = location_filter(self.driver, spec.buckets)
        self.batch_size = spec.batch_size
        self.batch_bytes = spec.batch_bytes
        self.threshold = streaming.threshold_for(spec.batch_bytes)
        self.measured = {}  # content_url: stored size, of rows with no size, measured when their batch was cut

    def close(self):
        self.driver.close()
        self.context.close()

    def batches(self, shard):
        """The shard's rows, a batch at a time, in key order (keyset paging),
        trimmed to the byte budget as a migration's batches are."""
        def trim(rows):
            self.measured.update(streaming.measured_sizes(self.context.db_connection(), self.driver,
                                                          [row for row in rows if row.content_url not in self.measured]))
            rows, decoded = worker.within_bytes(rows, self.batch_bytes, self.measured)
            log.debug("shard %d: batch of %d documents from %s to %s, about %d bytes decoded (budget %d)",
                      shard.shard_no, len(rows), rows[0].label, rows[-1].label, decoded, self.batch_bytes)
            return rows

        return plan.shard_rows(self.context.db_connection(), self.where, shard, self.batch_size, make=DocRow,
                               trim=trim)

    def check_batch(self, rows):
        report = BatchReport()
        suspects = self.judge(rows, report)
        if not suspects:
            return report
        current = self.current_rows([row for row, _ in suspects])
        again = []
        for row, reason in suspects:
            now = current.get(key_of(row))
            if now == row:
                report.bad.append(named(row, reason))
            elif now is None:  # removed, or moved out of this location
                report.changed += 1
            else:
                again.append(now)
        for row, reason in self.judge(again, report):
            report.bad.append(named(row, reason))
        return report

    def judge(self, rows, report):
        """Count the good documents into `report`; the others as (row, reason)."""
        if not rows:
            return []
        # Documents too large to hold whole are read as streams (streaming.check).
        measured = {row.content_url: self.measured.pop(row.content_url) for row in rows
                    if row.content_url in self.measured}
        large = set(streaming.large_rows(self.context.db_connection(), self.driver, self.driver, rows, self.threshold,
                                         measured))
        found = self.read(row.content_url for row in rows if row not in large)
        suspects = []
        for row in rows:
            if row in large:
                reason = streaming.check(self.driver, row)
            else:
                stored, proof = found.get(row.content_url, (None, None))
                reason = problem(row, stored, self.threshold, proof)
                if reason is TOO_LARGE:  # decompresses past the threshold: inflated again as a stream
                    reason = streaming.check(self.driver, row)
            if reason:
                suspects.append((row, reason))
            else:
                report.good += 1
                report.bytes += row.size or 0
                report.no_digest += not row.digest
        return suspects

    def read(self, urls):
        """{url: (stored bytes or exception, their MD5 hex when the backend
        proved them, else None)}: one bulk read, or, if that fails as a whole,
        one read per URL, so one bad URL cannot condemn a batch."""
        urls = list(urls)
        try:
            return self.driver.read_proven(urls)
        except Exception:
            found = {}
            for url in urls:
                try:
                    found.update(self.driver.read_proven([url]))
                except Exception as exc:
                    found[url] = (exc, None)
            return found

    def current_rows(self, rows):
        columns = [list(column) for column in zip(*[key_of(row) for row in rows])]
        query = sql.SQL(CURRENT_ROWS).format(self.where)
        found = self.context.db_connection().execute(query, columns)
        return {key_of(row): row for row in (DocRow(*values) for values in found)}


def named(row, reason):
    return (row.user_id, row.bucket, row.archive_id, row.content_url, reason)


def key_of(row):
    return (row.bucket, row.archive_id, row.user_id, row.document_name)


TOO_LARGE = "too large to decompress whole"


def problem(row, stored, limit=None, proof=None):
    """Why the stored bytes do not serve this row, or None if they do; TOO_LARGE
    when they decompress to more than `limit` (to be checked as a stream).
    `proof`: the MD5 hex the bytes were hashed to as they were read (not
    hashed again)."""
    if stored is None or isinstance(stored, NotFound):
        return "not found"
    if isinstance(stored, Exception):
        return f"unreadable: {stored}"
    reasons = []
    if row.size is not None and len(stored) != row.size:
        reasons.append(f"size mismatch: metadata says {row.size} bytes, {len(stored)} stored")
    try:
        codec.decode(stored, row.is_compressed, row.digest, limit=limit, known_md5=proof)
    except (codec.DigestMismatch, codec.CorruptDocument) as exc:
        reasons.append(str(exc))
    except codec.TooLarge:
        if not reasons:
            return TOO_LARGE
    return "; ".join(reasons) or None


def shard_events(verifier, shard):
    """What checking one shard reports, as events for the parent."""
    yield ("start", shard.shard_no)
    try:
        for rows in verifier.batches(shard):
            yield ("batch", verifier.check_batch(rows))
    except Exception as exc:  # this shard is unverified; the others go on
        yield ("failed", shard, first_line(exc))
    else:
        yield ("done", shard.shard_no)


def first_line(exc):
    text = str(exc).strip()
    return db.redacted(text.splitlines()[0]) if text else type(exc).__name__


def worker_main(spec, log_settings, todo, events):
    """Entry point of a worker process: shards from `todo` until a None."""
    logs.configure(*log_settings)
    try:
        verifier = Verifier(spec)
        try:
            for shard in iter(todo.get, None):
                for event in shard_events(verifier, shard):
                    events.put(event)
        finally:
            verifier.close()
    except KeyboardInterrupt:
        pass  # the parent was interrupted too and says so
    except Exception as exc:
        log.error("verify worker stopped: %s", first_line(exc))
    finally:
        events.put(("exit",))


def run_parallel(spec, shards, workers, log_settings, handle):
    """Spread the shards over worker processes; feed their events to `handle`."""
    spawn = multiprocessing.get_context("spawn")  # no inherited sockets or locks
    todo, events = spawn.Queue(), spawn.Queue()
    for shard in shards:
        todo.put(shard)
    for _ in range(workers):
        todo.put(None)
    processes = [spawn.Process(target=worker_main, args=(spec, log_settings, todo, events),
                               name=f"objmig-verify-{n}") for n in range(workers)]
    for process in processes:
        process.start()
    try:
        exited = 0
        while exited < len(processes):
            try:
                event = events.get(timeout=0.5)
            except queue.Empty:
                if not any(process.is_alive() for process in processes):
                    break  # some died without a word; their shards stay unverified
                continue
            if event[0] == "exit":
                exited += 1
            else:
                handle(event)
    except BaseException:
        for process in processes:
            process.terminate()
        raise
    finally:
        todo.cancel_join_thread()  # shards nobody took must not hold up our exit
        for process in processes:
            process.join()


def run_here(spec, shards, handle):
    verifier = Verifier(spec)
    try:
        for shard in shards:
            for event in shard_events(verifier, shard):
                handle(event)
    finally:
        verifier.close()


class Tally:
    """The parent's running account; names every bad document as it arrives."""

    def __init__(self, groups, shards, display, keep_bad=False):
        self.shards, self.display = shards, display
        self.bad_documents = [] if keep_bad else None  # every bad one, for --json
        self.documents = sum(group.documents for group in groups)
        self.bytes = sum(group.bytes for group in groups)
        self.good = self.good_bytes = self.bad = self.changed = self.no_digest = 0
        self.done, self.failed = set(), {}

    def handle(self, event):
        kind = event[0]
        if kind == "batch":
            self.add(event[1])
        elif kind == "done":
            self.done.add(event[1])
        elif kind == "failed":
            shard, reason = event[1], event[2]
            self.failed[shard.shard_no] = reason
            log.error("shard %d (%s) could not be verified: %s", shard.shard_no, shard.label, reason)
        self.display.update(self.totals())

    def add(self, batch):
        self.good += batch.good
        self.good_bytes += batch.bytes
        self.changed += batch.changed
        self.no_digest += batch.no_digest
        self.bad += len(batch.bad)  # names go out as they come; kept only for --json
        if self.bad_documents is not None:
            self.bad_documents += batch.bad
        for user_id, bucket, archive_id, url, reason in batch.bad:
            log.error("BAD %s/%s/%s (%s): %s", user_id, bucket, archive_id, url, reason,
                      extra={"user_id": user_id, "bucket": bucket, "archive_id": archive_id,
                             "content_url": url, "reason": reason})

    def unfinished(self):
        return [s for s in self.shards if s.shard_no not in self.done]

    def totals(self):
        return Totals(documents=self.documents, bytes=self.bytes, documents_done=self.good,
                      bytes_done=self.good_bytes, documents_failed=self.bad,
                      shards=len(self.shards), shards_done=len(self.done), shards_failed=len(self.failed))


def run(options, db_settings):
    store = load_store_config(options.config, options.analysis_archive)
    metrics.check_path(options.metrics_file)
    started = time.monotonic()
    try:
        return run_checked(options, db_settings, store)
    except BaseException:  # the database or the store away, a stop: the run ended, unfinished
        metrics.record_failure(options.metrics_file, metrics.VERIFY, started)
        raise


def run_checked(options, db_settings, store):
    spec = VerifySpec(db_settings, store, tuple(options.buckets), options.batch_size, options.io_threads)
    context = ReadOnlyContext(db_settings, options.io_threads)
    driver = make_driver(store, context)
    try:
        conn = context.db_connection()
        db.require_anchore_tables(conn)
        driver.check_access(write=False)
        where = location_filter(driver, spec.buckets)
        groups = plan.summarize(conn, where)
        shards = plan.cut_shards(conn, where)
        workers = min(options.workers, len(shards))
        log.info("verifying %d documents at %s (%s) in %d shards, %d workers",
                 sum(g.documents for g in groups), driver.describe(), store.key, len(shards), max(workers, 1))
        started = time.monotonic()
        tally = Tally(groups, shards, ProgressDisplay(options.progress, bytes_label="checked"), keep_bad=options.json)
        if workers > 1:
            run_parallel(spec, shards, workers, options.log_settings, tally.handle)
        else:
            run_here(spec, shards, tally.handle)
        tally.display.close(tally.totals())
        return finish(tally, driver, options, time.monotonic() - started)
    finally:
        driver.close()
        context.close()


def finish(tally, driver, options, seconds):
    """Say what was read and what was wrong; the exit status follows."""
    unfinished, bad = tally.unfinished(), tally.bad
    checked = tally.good + bad
    for shard in unfinished:
        if shard.shard_no not in tally.failed:
            log.error("shard %d (%s) was not verified: its worker stopped", shard.shard_no, shard.label)
    if options.json:
        print_json(result_document(tally, driver, unfinished))
    else:
        print(f"verified {checked} documents in {driver.describe()}: "
              f"{tally.good} good ({human_bytes(tally.good_bytes)} stored), {bad} bad")
        if tally.changed:
            print(f"{tally.changed} documents changed or were removed while being read and were not judged")
        if tally.no_digest:
            print(f"{tally.no_digest} documents have no digest: only their size and compression were checked")
        if unfinished:
            print(f"{len(unfinished)} shards could not be verified (named on stderr)")
    success = not bad and not unfinished
    recorded = metrics.record(options.metrics_file, metrics.RunResult(
        command=metrics.VERIFY, success=success, duration_seconds=seconds, documents=checked, failed=bad))
    if bad:
        log.error("%d documents are bad (named above): Anchore cannot read them as they are", bad)
    return EXIT_OK if success and recorded else EXIT_FAILED


def result_document(tally, driver, unfinished):
    """verify's result for machines: the counts and every bad document."""
    return {
        "location": driver.describe(),
        "documents": tally.good + tally.bad,
        "good": tally.good,
        "good_stored_bytes": tally.good_bytes,
        "bad": tally.bad,
        "changed_while_read": tally.changed,
        "without_digest": tally.no_digest,
        "bad_documents": [
            {"user_id": user_id, "bucket": bucket, "archive_id": archive_id, "content_url": url, "reason": reason}
            for user_id, bucket, archive_id, url, reason in tally.bad_documents
        ],
        "unverified_shards": [
            {"shard": shard.shard_no, "keys": shard.label, "reason": tally.failed.get(shard.shard_no, "its worker stopped")}
            for shard in unfinished
        ],
        "ok": not tally.bad and not unfinished,
    }
