"""The `migrate` command: plan, run workers over shards, report.

The parent process holds Anchore's migration lock for the whole run, records
the task, cuts the work into shards and starts the workers; workers (here, or
on other hosts with --join) claim shards from the database until none is left.
"""

import logging
import multiprocessing
import multiprocessing.connection
import time
from dataclasses import dataclass, replace

import yaml
from psycopg import sql

from anchore_objmig import db, metrics, plan, progress, prompt, tasks, worker
from anchore_objmig.config import load_store_config
from anchore_objmig.display import ProgressDisplay, human_bytes, print_json
from anchore_objmig.drivers import DriverContext, make_driver
from anchore_objmig.errors import EXIT_FAILED, EXIT_OK, ObjmigError, UsageError
from anchore_objmig.faults import crash_point
from anchore_objmig.redaction import redact_section

log = logging.getLogger(__name__)

STALE_SHARD_SECONDS = 300  # a running shard with no heartbeat for this long is given back
NAMED_FAILURES = 200  # at most this many failed documents named on stderr


@dataclass(frozen=True)
class MigrateOptions:
    from_config: str
    to_config: str
    from_analysis_archive: bool = False
    to_analysis_archive: bool = False
    delete_source: bool = True
    ask: bool = True
    buckets: tuple = ()
    workers: int = 1
    io_threads: int = 32
    batch_size: int = 500
    shard_documents: int = plan.DEFAULT_SHARD_DOCUMENTS
    shard_bytes: int = plan.DEFAULT_SHARD_BYTES
    multipart_threshold: int = 8 * 1024 * 1024
    join: bool = False
    dry_run: bool = False
    json: bool = False  # with dry_run: the plan as one JSON document on stdout
    show_secrets: bool = False
    progress: str = "auto"  # auto | bar | log | none
    metrics_file: str | None = None
    log_settings: tuple = ()


def load_stores(options):
    source = load_store_config(options.from_config, options.from_analysis_archive)
    dest = load_store_config(options.to_config, options.to_analysis_archive)
    return source, dest


def confirm(ask, what=""):
    """The original's prompt, after `what` the run will do; anything but
    y/yes stops with nothing changed."""
    if ask:
        prompt.ask_to_proceed(what, "migration cancelled; nothing was changed")


def prompt_summary(groups, source, dest):
    documents = sum(group.documents for group in groups)
    return (f"About to move {documents} documents ({human_bytes(sum(g.bytes for g in groups))} stored at the source) "
            f"from {source.describe()} to {dest.describe()}.")


def describe_store(label, store, driver, show_secrets):
    settings = {
        "compression": {"enabled": store.compression_enabled, "min_size_kbytes": store.min_size_kbytes},
        "storage_driver": redact_section(store.as_written.get("storage_driver") or {"name": store.driver_name, "config": {}}, show_secrets),
    }
    log.info("migration %s %s (%s in %s):\n%s", label, driver.describe(), store.key, store.path,
             yaml.safe_dump(settings, default_flow_style=False, sort_keys=True).rstrip())


def config_snippet(dest, show_secrets):
    """What the operator must put into config.yaml, placeholders kept."""
    section = redact_section(dest.as_written, show_secrets) or {
        "compression": {"enabled": dest.compression_enabled, "min_size_kbytes": dest.min_size_kbytes},
        "storage_driver": {"name": dest.driver_name, "config": {}},
    }
    return (
        f"After this migration, the config.yaml of every Anchore service MUST have this {dest.key} section"
        " before the services start again:\n"
        + yaml.safe_dump({dest.key.rsplit(".", 1)[1]: section}, default_flow_style=False, sort_keys=True)
    )


def run(options, db_settings):
    source_store, dest_store = load_stores(options)
    metrics.check_path(options.metrics_file)
    context = DriverContext(db_settings, options.io_threads, options.multipart_threshold)
    source = make_driver(source_store, context)
    dest = make_driver(dest_store, context)
    if source.location == dest.location:
        raise UsageError(
            f"source and destination are the same location ({source.describe()}); nothing to migrate"
        )
    where = plan.source_filter(source, dest, options.buckets)
    conn = db.connect(db_settings, autocommit=True)
    try:
        db.require_anchore_tables(conn)
        if options.dry_run:
            return dry_run(conn, where, source, dest, dest_store, options)
        if options.join:
            return join(conn, options, db_settings, source_store, dest_store, source, dest)
        return migrate(conn, options, db_settings, where, source_store, dest_store, source, dest)
    finally:
        source.close()
        dest.close()
        conn.close()
        context.close()


def migrate(conn, options, db_settings, where, source_store, dest_store, source, dest):
    if not db.try_migration_lock(conn):
        raise ObjmigError(
            "another migration is running: it holds the migration lock pg_advisory_lock(2, 1) "
            "(use --join to help a running anchore-objmig migration of the same locations)"
        )
    source.check_access(write=False)
    dest.check_access(write=True, create=False)  # fail before asking, change nothing yet
    describe_store("from", source_store, source, options.show_secrets)
    describe_store("to", dest_store, dest, options.show_secrets)
    if options.ask:
        confirm(options.ask, prompt_summary(plan.summarize(conn, where), source, dest))
    progress.ensure_schema(conn)
    dest.check_access(write=True)
    close_abandoned_runs(conn)
    if options.delete_source:
        finish_pending_deletes(conn, source)

    groups = plan.summarize(conn, where)
    shards = plan.cut_shards(conn, where, groups, options.shard_documents, options.shard_bytes)
    total = sum(group.documents for group in groups)
    task_id = tasks.create_task(conn, source.name, dest.name, total)
    crash_point("after-task")
    progress.create_run(conn, task_id, source.location, dest.location, options.buckets, shards)
    crash_point("after-plan")
    log.info("migration task %d: %d documents (%s stored at the source) in %d shards, %d workers",
             task_id, total, human_bytes(sum(g.bytes for g in groups)), len(shards), options.workers)
    started = time.monotonic()
    spec = worker_spec(options, db_settings, source_store, dest_store, task_id)
    run_workers(spec, options.workers, options.log_settings, conn, task_id, options.progress)
    wait_for_other_hosts(conn, spec, options, task_id)
    if options.delete_source:
        finish_pending_deletes(conn, source)
    crash_point("before-finish")
    return finish(conn, task_id, dest_store, options, time.monotonic() - started)


def worker_spec(options, db_settings, source_store, dest_store, task_id):
    return worker.WorkerSpec(
        db_settings=db_settings,
        source=source_store,
        dest=dest_store,
        task_id=task_id,
        buckets=tuple(options.buckets) or None,
        delete_source=options.delete_source,
        batch_size=options.batch_size,
        io_threads=options.io_threads,
        multipart_threshold=options.multipart_threshold,
    )


def close_abandoned_runs(conn):
    """Tasks left 'running' by a migration that died (ours or anchore-manager's):
    we hold the migration lock, so nothing is running them any more."""
    for run_row in progress.running_runs(conn):
        progress.finish_run(conn, run_row.task_id, "failed")
    for task_id in tasks.close_running_tasks(conn):
        log.warning(
            "closed migration task %d as failed (last_state running): the run that owned it stopped "
            "before finishing; this run moves what it left at the source",
            task_id,
        )


def finish_pending_deletes(conn, source):
    """Delete old copies a crashed run meant to delete after its metadata commit."""
    total = 0
    while True:
        urls = progress.pending_deletes(conn, source.location)
        if not urls:
            break
        errors = source.delete_many(urls)
        done = [url for url in urls if url not in errors]
        progress.forget_pending_deletes(conn, done)
        total += len(done)
        if errors:
            log.warning("%d old copies could not be deleted yet, e.g. %s", len(errors), next(iter(errors.values())))
            break
    if total:
        log.info("deleted %d old source copies left by an interrupted run", total)


def run_workers(spec, count, log_settings, conn, task_id, progress_mode="auto"):
    """Run `count` workers: this process is one of them (it would only wait
    otherwise, and a new interpreter costs half a second of imports), the
    others are new processes."""
    reporter = ProgressReporter(conn, task_id, progress_mode)
    spawn = multiprocessing.get_context("spawn")  # no inherited sockets or locks
    processes = [
        spawn.Process(target=worker.worker_main, args=(spec, log_settings), name=f"objmig-worker-{n}")
        for n in range(1, count)
    ]
    for process in processes:
        process.start()
    try:
        worker.run_worker(spec, on_batch=reporter.maybe_report)
        while any(process.is_alive() for process in processes):
            multiprocessing.connection.wait([process.sentinel for process in processes], timeout=0.25)
            reporter.maybe_report()
    except BaseException:
        for process in processes:
            process.terminate()
        raise
    reporter.close()
    for process in processes:
        if process.exitcode != 0:
            log.error("worker %s ended with exit status %s", process.name, process.exitcode)
    # A worker that died holding shards: they go back to pending at once
    # (not after the heartbeat times out), up to the attempt limit.
    names = [worker.worker_name(process.pid) for process in processes] + [worker.worker_name()]
    for shard_no in progress.running_shards_of(conn, task_id, names):
        progress.give_back_shard(conn, task_id, shard_no, worker.MAX_SHARD_ATTEMPTS, "its worker process ended")


def wait_for_other_hosts(conn, spec, options, task_id):
    """Wait for shards that joined hosts still hold; take back those gone quiet."""
    while True:
        row = conn.execute(
            """SELECT count(*) FILTER (WHERE state = 'pending'),
                      count(*) FILTER (WHERE state = 'running' AND heartbeat > now() - make_interval(secs => %s)),
                      count(*) FILTER (WHERE state = 'running' AND heartbeat <= now() - make_interval(secs => %s))
               FROM objmig_shards WHERE task_id = %s""",
            (STALE_SHARD_SECONDS, STALE_SHARD_SECONDS, task_id),
        ).fetchone()
        pending, active, stale = row
        if stale:
            conn.execute(
                """UPDATE objmig_shards SET state = 'pending', worker = NULL
                   WHERE task_id = %s AND state = 'running' AND heartbeat <= now() - make_interval(secs => %s)""",
                (task_id, STALE_SHARD_SECONDS),
            )
            log.warning("took back %d shards whose worker went quiet", stale)
            continue
        if pending:
            run_workers(spec, options.workers, options.log_settings, conn, task_id, options.progress)
            continue
        if not active:
            return
        time.sleep(1)


def join(conn, options, db_settings, source_store, dest_store, source, dest):
    """Work on the pending shards of a running migration between the same locations."""
    runs = progress.running_runs(conn, source.location, dest.location)
    if runs and db.try_migration_lock(conn):
        # Nobody holds the lock: the run's owner died. Joining it would work
        # outside the lock; the same command without --join resumes it safely.
        db.release_migration_lock(conn)
        raise ObjmigError(
            f"migration task {runs[-1].task_id} is marked running but no process holds the migration lock: "
            "it stopped; run the same command without --join to finish it"
        )
    if not runs:
        raise ObjmigError(
            f"no running migration from {source.describe()} to {dest.describe()} to join"
        )
    task_id = runs[-1].task_id
    log.info("joining migration task %d", task_id)
    spec = worker_spec(options, db_settings, source_store, dest_store, task_id)
    spec = replace(spec, buckets=tuple(runs[-1].buckets or ()) or None)  # the run's buckets, not ours
    run_workers(spec, options.workers, options.log_settings, conn, task_id, options.progress)
    log.info("no pending shards left in task %d; the host that started it finishes the task", task_id)
    return EXIT_OK


def finish(conn, task_id, dest_store, options, seconds):
    """Close the task honestly, name what failed, and say what to configure."""
    totals = progress.totals(conn, task_id)
    failed = progress.failures(conn, task_id, "document")
    leftovers = progress.failures(conn, task_id, "source-copy")
    unfinished = progress.failed_shards(conn, task_id)
    state = "complete" if not failed and not unfinished else "failed"
    metrics.record(options.metrics_file, metrics.RunResult(
        command=metrics.MIGRATE, success=state == "complete" and not leftovers, duration_seconds=seconds,
        documents=totals.documents_done, failed=len(failed), bytes=totals.bytes_done))
    tasks.finish_task(conn, task_id, state)
    progress.finish_run(conn, task_id, state)
    rate = totals.documents_done / seconds if seconds > 0 else 0.0
    log.info("migration task %d %s: %d documents (%s written) moved in %.1fs (%.0f documents/s), %d failed",
             task_id, state, totals.documents_done, human_bytes(totals.bytes_done), seconds, rate, len(failed))
    for user_id, bucket, archive_id, url, error in failed[:NAMED_FAILURES]:
        log.error("FAILED %s/%s/%s (%s): %s", user_id, bucket, archive_id, url, error)
    if len(failed) > NAMED_FAILURES:
        log.error("... and %d more failed documents (table objmig_failures, task_id %d)", len(failed) - NAMED_FAILURES, task_id)
    for shard_no, bucket, user_id, error in unfinished:
        log.error("shard %d (%s/%s) did not finish: %s", shard_no, user_id, bucket, error or "worker stopped")
    for user_id, bucket, archive_id, url, error in leftovers[:NAMED_FAILURES]:
        log.warning("LEFT %s: %s", url, error)
    if state != "complete":
        log.error("migration task %d failed: the documents named above are still at the source and readable; "
                  "fix the cause and run the same command again to move them", task_id)
        return EXIT_FAILED
    print(config_snippet(dest_store, options.show_secrets), end="")
    print("Note: if something goes wrong you can reverse the parameters of the migrate command to migrate back.")
    if leftovers:
        log.error("%d old copies could not be deleted from the source (listed above); remove them by hand", len(leftovers))
        return EXIT_FAILED
    return EXIT_OK


def dry_run(conn, where, source, dest, dest_store, options):
    """Print what a migration would move; change nothing anywhere."""
    groups = plan.summarize(conn, where)
    shards = plan.cut_shards(conn, where, groups, options.shard_documents, options.shard_bytes)
    would_compress = 0
    if dest_store.compression_enabled and dest.supports_compression:
        would_compress = conn.execute(
            sql.SQL("SELECT count(*) FROM archive_metadata m WHERE {} AND (m.is_compressed OR m.size > %s)").format(where),
            (dest_store.compression_threshold,),
        ).fetchone()[0]
    total = sum(g.documents for g in groups)
    total_bytes = sum(g.bytes for g in groups)
    if options.json:
        print_json(plan_document(groups, source, dest, would_compress, len(shards)))
        return EXIT_OK
    print(f"dry run: from {source.describe()} to {dest.describe()}; nothing was changed")
    width = max([len("bucket")] + [len(g.bucket) for g in groups])
    user_width = max([len("user")] + [len(g.user_id) for g in groups])
    print(f"{'bucket'.ljust(width)}  {'user'.ljust(user_width)}  {'documents':>10}  {'stored bytes':>12}")
    for group in groups:
        print(f"{group.bucket.ljust(width)}  {group.user_id.ljust(user_width)}  {group.documents:>10}  {group.bytes:>12}")
    print(f"total: {total} documents, {total_bytes} bytes ({human_bytes(total_bytes)}) stored at the source, "
          f"{would_compress} would be compressed, {len(shards)} shards")
    return EXIT_OK


def plan_document(groups, source, dest, would_compress, shards):
    """The dry run's plan for machines: by logical bucket, then by user.
    Byte counts are the stored sizes at the source (after any compression)."""
    buckets = {}
    for group in groups:
        documents, nbytes = int(group.documents), int(group.bytes)  # sum() of bigint comes back as numeric
        entry = buckets.setdefault(group.bucket, {"bucket": group.bucket, "documents": 0, "stored_bytes": 0, "users": []})
        entry["documents"] += documents
        entry["stored_bytes"] += nbytes
        entry["users"].append({"user_id": group.user_id, "documents": documents, "stored_bytes": nbytes})
    return {
        "dry_run": True,
        "from": source.describe(),
        "to": dest.describe(),
        "buckets": list(buckets.values()),
        "total": {"documents": sum(b["documents"] for b in buckets.values()),
                  "stored_bytes": sum(b["stored_bytes"] for b in buckets.values()),
                  "would_compress": int(would_compress), "shards": shards},
    }


class ProgressReporter:
    """Feeds the run's totals to the operator's display: a bar, log lines or nothing."""

    def __init__(self, conn, task_id, mode="auto", every=0.5):
        self.conn, self.task_id, self.every = conn, task_id, every
        self.display = ProgressDisplay(mode)
        self.last = time.monotonic()

    def maybe_report(self):
        if time.monotonic() - self.last >= self.every:
            self.report()

    def report(self):
        self.last = time.monotonic()
        self.display.update(progress.totals(self.conn, self.task_id))

    def close(self):
        self.display.close(progress.totals(self.conn, self.task_id))
