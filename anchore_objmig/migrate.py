"""The `migrate` command: plan, run workers over shards, report.

The parent process holds Anchore's migration lock for the whole run, records
the task, cuts the work into shards and starts the workers; workers (here, or
on other hosts with --join) claim shards from the database until none is left.
"""

import logging
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import psycopg
import yaml
from psycopg import sql

from anchore_objmig import db, integrity, ledger, manifest, metrics, plan, preflight, prompt, scope, signals, supervisor, tasks, toast, worker
from anchore_objmig.config import load_store_config
from anchore_objmig.display import ProgressDisplay, human_bytes, print_json
from anchore_objmig.drivers import DEFAULT_MULTIPART_THRESHOLD, DriverContext, make_driver
from anchore_objmig.errors import (EXIT_FAILED, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM, ConnectError, ObjmigError,
                                   StoppedWhilePlanning, Terminated, UsageError)
from anchore_objmig.faults import crash_point
from anchore_objmig.redaction import redact_section

log = logging.getLogger(__name__)

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
    all_buckets: bool = False  # with --to-analysis-archive: every bucket, on purpose
    allow_empty: bool = False  # run even if the source holds none of the selected documents
    prompt_note: str = ""  # said before the prompt (set by the pre-flight checks)
    workers: int = 1
    io_threads: int = 32
    batch_size: int = 500
    batch_bytes: int = 32 * 1024 * 1024  # decoded bytes (worker.decoded_estimate)
    shard_documents: int = plan.DEFAULT_SHARD_DOCUMENTS
    shard_bytes: int = plan.DEFAULT_SHARD_BYTES
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD
    toast_compression: str = "lz4"  # toast.CHOICES
    lease_seconds: float = manifest.DEFAULT_LEASE_SECONDS
    join: bool = False
    dry_run: bool = False
    json: bool = False  # with dry_run: the plan as one JSON document on stdout
    show_secrets: bool = False
    progress: str = "auto"  # auto | bar | log | none
    metrics_file: str | None = None
    log_settings: tuple = ()
    excluded: tuple = ()  # the other section's locations inside the source's (scope.nested_in)


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


def main_location(config_path, context):
    """Where the main store (object_store) of a config keeps its documents, or None if it cannot say."""
    try:
        return make_driver(load_store_config(config_path, False), context).location
    except ObjmigError:
        return None


def run(options, db_settings):
    source_store, dest_store = load_stores(options)
    metrics.check_path(options.metrics_file)
    started = time.monotonic()
    try:
        return run_checked(options, db_settings, source_store, dest_store)
    except BaseException:  # stopped before its work phase: no database, lock held, a stop while planning
        if not options.dry_run:
            metrics.record_failure(options.metrics_file, metrics.MIGRATE, started)
        raise


def run_checked(options, db_settings, source_store, dest_store):
    options = replace(options, prompt_note=preflight.analysis_archive_note(options))
    context = DriverContext(db_settings, options.io_threads, options.multipart_threshold)
    source = make_driver(source_store, context)
    dest = make_driver(dest_store, context)
    if source.location == dest.location:
        raise UsageError(
            f"source and destination are the same location ({source.describe()}); nothing to migrate"
        )
    preflight.check_overlap(source, dest)
    shared = preflight.shared_archive_note(options, source, lambda: main_location(options.from_config, context))
    if shared:
        options = replace(options, prompt_note=" ".join(filter(None, [options.prompt_note, shared])))
    options = replace(options, excluded=scope.nested_in(source.location, scope.other_locations(options)))
    for location in options.excluded:
        log.info("rows stored under %s belong to the config's other section: this run leaves them alone", location)
    where = plan.source_filter(source, dest, options.buckets, options.excluded)
    conn = db.connect(db_settings, autocommit=True)
    try:
        db.require_anchore_tables(conn)
        if not options.join:
            preflight.check_selection(conn, source, dest, options.buckets, options.allow_empty, source_store)
        if options.dry_run:
            return dry_run(conn, where, source, dest, dest_store, options)
        db_settings = toast.settle(conn, db_settings, options.toast_compression, dest.in_catalog_db)
        signals.install()
        if options.join:
            return join(conn, options, db_settings, source_store, dest_store, source, dest)
        return migrate(conn, options, db_settings, where, source_store, dest_store, source, dest)
    finally:
        source.close()
        dest.close()
        conn.close()
        context.close()


def migrate(conn, options, db_settings, where, source_store, dest_store, source, dest):
    lock_conn = db.connect(db_settings, autocommit=True, role="lock")
    task_id = marker = None
    try:
        if not db.try_migration_lock(lock_conn):
            raise ObjmigError(
                "another migration is running: it holds the migration lock pg_advisory_lock(2, 1) "
                "(use --join to help a running anchore-objmig migration of the same locations)"
            )
        source.check_access(write=False)
        dest.check_access(write=True, create=False)  # fail before asking, change nothing yet
        describe_store("from", source_store, source, options.show_secrets)
        describe_store("to", dest_store, dest, options.show_secrets)
        if options.ask:
            summary = prompt_summary(plan.summarize(conn, where), source, dest)
            confirm(options.ask, f"NOTE: {options.prompt_note}\n{summary}" if options.prompt_note else summary)
        ledger.ensure_schema(conn)
        dest.check_access(write=True)
        marker = None if dest.in_catalog_db else uuid.uuid4().hex
        if marker:
            dest.write_run_marker(marker)
        dest.clean_up_before_run(conn)
        close_abandoned_runs(conn)
        wait_for_revoked_writers(conn)
        if options.delete_source:
            finish_pending_deletes(conn, source)

        limits = plan.shard_limits(conn, where, options.workers, options.shard_documents, options.shard_bytes)
        shards = plan.cut_shards(conn, where, *limits)
        total = sum(shard.documents for shard in shards)
        task_id = tasks.create_task(conn, source.name, dest.name, total)
        crash_point("after-task")
        run_manifest = manifest.build(source, dest, source_store, dest_store, options, dest_marker=marker)
        ledger.create_run(conn, task_id, run_manifest, shards, lock_conn.info.backend_pid, db.session_started(lock_conn))
        crash_point("after-plan")
    except BaseException as exc:
        if task_id is not None:  # stopped while planning: close the task it had opened
            close_unstarted(conn, task_id)
        if marker:
            dest.remove_run_marker()  # no run was started: leave the destination as it was
        lock_conn.close()
        if task_id is not None and isinstance(exc, (KeyboardInterrupt, Terminated)):
            name, status = stop_name(exc)
            raise StoppedWhilePlanning(f"interrupted by {name} while planning: migration task {task_id} closed as "
                                       "failed before any document moved; run the same command again", status) from None
        raise
    log.info("migration task %d: %d documents (%s stored at the source) in %d shards, %d workers",
             task_id, total, human_bytes(sum(s.bytes for s in shards)), len(shards), options.workers)
    guard = supervisor.RunGuard(db_settings, task_id, lock_conn)
    guard.start()
    spec = worker_spec(options, db_settings, source_store, dest_store, task_id)
    return work_on_run(options, db_settings, spec, guard, source, dest, dest_store, task_id)


def work_on_run(options, db_settings, spec, guard, source, dest, dest_store, task_id):
    """This host's part of a run, and the run's end if this host holds its lock."""
    started = time.monotonic()
    work = db.Reconnecting(db_settings)
    names = []  # this host's worker names, to give their shards back after a stop
    try:
        try:
            reporter = ProgressReporter(work, task_id, options.progress)
            workers_of_host(spec, options, reporter, guard, work, names)
            guard.check_now()  # a joiner takes the lock over if its holder died meanwhile
            while guard.holding and not guard.failure:
                if not retrying(work, lambda conn: wait_for_other_hosts(conn, task_id)):
                    break
                workers_of_host(spec, options, reporter, guard, work, names)  # shards given back or taken over
            reporter.close()
            if guard.failure:
                log.error("migration task %d stopped on this host: %s. Documents already moved stay moved and "
                          "readable; run the same command again (without --join): it closes the task and moves "
                          "the rest", task_id, guard.failure)
                record_stopped(options, work, task_id, started)
                return EXIT_FAILED
            if not guard.holding:
                log.info("no shards left for this host in task %d; the host holding the migration lock finishes it",
                         task_id)
                return EXIT_OK
            # Every shard is over: no worker of the run holds a lease, so none may
            # still complete a write (the fence); what stopped ones left goes.
            over_at = datetime.now(timezone.utc)
            if options.delete_source:
                retrying(work, lambda conn: finish_pending_deletes(conn, source))
            retrying(work, lambda conn: dest.clean_up_after_run(conn, over_at))
            crash_point("before-finish")
            status = retrying(work, lambda conn: finish(conn, task_id, dest_store, options, time.monotonic() - started))
            dest.remove_run_marker()  # the run is closed: nobody joins it any more
            return status
        except (KeyboardInterrupt, Terminated) as stop:
            status = interrupted(db_settings, guard, task_id, stop, names)
            record_stopped(options, work, task_id, started)
            return status
        except (ObjmigError, psycopg.Error) as exc:  # the run had started: never "nothing was changed" (exit 3)
            log.error("migration task %d stopped on this host: %s. Documents already moved stay moved and readable; "
                      "run the same command again (without --join): it closes the task and moves the rest",
                      task_id, db.redacted(db.first_line(exc)))
            record_stopped(options, work, task_id, started)
            return EXIT_FAILED
    finally:
        guard.finish()
        work.close()


def record_stopped(options, work, task_id, started):
    """A run that did not finish writes the metrics file too, as a failure:
    an alert must not keep reading the previous run's success."""
    try:
        totals = ledger.totals(work.conn, task_id)
        documents, nbytes = totals.documents_done, totals.bytes_done
    except (psycopg.Error, ObjmigError):  # the database is away: what is known is that it failed
        documents = nbytes = 0
    metrics.record_failure(options.metrics_file, metrics.MIGRATE, started, documents, nbytes)


def stop_name(stop):
    """The signal behind a stop, and the exit status it gives."""
    return ("SIGTERM", EXIT_SIGTERM) if isinstance(stop, Terminated) else ("SIGINT", EXIT_SIGINT)


def retrying(work, step, seconds=worker.LOCK_WAIT_SECONDS):
    """step(conn) on the work connection, tried again while the database is away."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return step(work.conn)
        except (psycopg.OperationalError, ConnectError) as exc:
            work.close()
            if time.monotonic() > deadline:
                raise ObjmigError(f"the database was unreachable for {seconds}s ({db.first_line(exc)})") from None
            time.sleep(1)


def workers_of_host(spec, options, reporter, guard, work, names):
    """Run this host's workers until they find nothing to claim; give back
    what any of them held when it ended (their writes ended with them)."""
    supervisor.run_workers(spec, options.workers, options.log_settings, reporter.maybe_report, guard.stop, names)
    given = retrying(work, lambda conn: ledger.give_back_dead_workers(
        conn, spec.task_id, names, worker.MAX_SHARD_ATTEMPTS, "its worker process ended"))
    if given:
        log.warning("gave back %d shards held by worker processes that ended", len(given))


def interrupted(db_settings, guard, task_id, stop, names):
    """SIGINT or SIGTERM: this host's workers have stopped and their writes
    are over. Give their shards back, and if this host holds the run's lock,
    close the run now rather than leave it running for the next run to find."""
    name, status = stop_name(stop)
    closed = False
    try:
        with db.connect(db_settings, autocommit=True) as conn:
            ledger.give_back_dead_workers(conn, task_id, names, None, f"interrupted by {name}")
            if guard.holding:
                closed = ledger.close_run(conn, task_id, "failed", f"interrupted by {name}")
    except (psycopg.Error, ObjmigError) as exc:
        log.warning("could not record the stop of migration task %d (%s); the next run closes it", task_id,
                    db.first_line(exc))
    if closed:
        log.error("interrupted by %s: migration task %d closed as failed. Documents already moved stay moved and "
                  "readable; run the same command again to move the rest", name, task_id)
    else:
        log.error("interrupted by %s: this host stopped working on migration task %d; its shards went back to the "
                  "run", name, task_id)
    return status


def worker_spec(options, db_settings, source_store, dest_store, task_id):
    return worker.WorkerSpec(
        db_settings=db_settings,
        source=source_store,
        dest=dest_store,
        task_id=task_id,
        buckets=tuple(options.buckets) or None,
        excluded=tuple(options.excluded),
        delete_source=options.delete_source,
        batch_size=options.batch_size,
        batch_bytes=options.batch_bytes,
        io_threads=options.io_threads,
        multipart_threshold=options.multipart_threshold,
    )


def close_unstarted(conn, task_id):
    try:
        if not ledger.close_run(conn, task_id, "failed", "stopped while planning"):
            tasks.finish_task(conn, task_id, "failed")
    except (psycopg.Error, ObjmigError) as exc:
        log.warning("could not close migration task %d (%s); the next run closes it", task_id, db.first_line(exc))


def wait_for_revoked_writers(conn):
    """Runs closed while other hosts still worked (SIGINT, SIGTERM) left shards
    'revoked': their workers' last writes may still be in the air. Wait until
    none can land, so this run's commits are never overwritten by them."""
    announced = set()
    while True:
        waiting = [(task_id, name, age, limit) for task_id, name, age, limit in ledger.revoked_holders(conn)
                   if not supervisor.local_and_dead(name)]
        if not waiting:
            return
        for task_id, name, age, limit in waiting:
            if (task_id, name) not in announced:
                announced.add((task_id, name))
                log.warning("waiting up to %.0fs for worker %s of closed task %d to stop writing", limit - age, name,
                            task_id)
        time.sleep(1)


def close_abandoned_runs(conn):
    """Runs left 'running' by a migration that died (ours or anchore-manager's):
    we hold the migration lock, so nothing may work on them any more. Their
    workers may still have writes in the air: wait until none can land."""
    closed = []
    for run_row in ledger.running_runs(conn):
        wait_for_quiet_workers(conn, run_row)
        ledger.close_run(conn, run_row.task_id, "failed", "closed by a later run")
        closed.append(run_row.task_id)
    for task_id in sorted(closed + tasks.close_running_tasks(conn)):
        log.warning(
            "closed migration task %d as failed (last_state running): the run that owned it stopped "
            "before finishing; this run moves what it left at the source",
            task_id,
        )


def wait_for_quiet_workers(conn, run_row):
    """Wait until no worker of `run_row` can still write: each has exited on
    this host, or has been silent for the run's takeover time."""
    announced = set()
    deadline = time.monotonic() + run_row.takeover_seconds + run_row.lease_seconds
    while time.monotonic() < deadline:
        waiting = [(name, host, age) for name, host, age in ledger.live_holders(conn, run_row.task_id)
                   if not supervisor.local_and_dead(name) and (age or 0) < run_row.takeover_seconds]
        if not waiting:
            return
        for name, host, age in waiting:
            if name not in announced:
                announced.add(name)
                log.warning("waiting up to %.0fs for worker %s of task %d (heartbeat %.0fs ago) to stop writing "
                            "before this run starts", run_row.takeover_seconds - age, name, run_row.task_id, age)
        time.sleep(1)


def finish_pending_deletes(conn, source):
    """Delete old copies a crashed run meant to delete after its metadata commit."""
    ledger.note_orphaned_copies(conn, source.location)
    total = 0
    while True:
        urls = ledger.pending_deletes(conn, source.location)
        if not urls:
            break
        errors = source.delete_many(urls)
        done = [url for url in urls if url not in errors]
        ledger.forget_pending_deletes(conn, done)
        total += len(done)
        if errors:
            log.warning("%d old copies could not be deleted yet, e.g. %s", len(errors), next(iter(errors.values())))
            break
    if total:
        log.info("deleted %d old source copies left by an interrupted run", total)


def wait_for_other_hosts(conn, task_id):
    """Wait while other hosts hold shards. True when shards are claimable here
    again (given back, or silent past the takeover time), False when all are over."""
    run = ledger.get_run(conn, task_id)
    announced = set()
    while True:
        pending, running = ledger.shard_counts(conn, task_id)
        if pending:
            return True
        if not running:
            return False
        for name, host, age in ledger.live_holders(conn, task_id):
            if age is not None and age >= run.takeover_seconds:
                for holder, pid in cut_off_silent_holders(conn, task_id):
                    log.warning("ended database session %d of worker %s, silent past the takeover time inside a "
                                "transaction (a frozen process holding its shard)", pid, holder)
                return True  # a new claim takes it over
            if name not in announced:
                announced.add(name)
                log.info("waiting for worker %s on host %s (heartbeat %.0fs ago)", name, host, age or 0)
        time.sleep(1)


def cut_off_silent_holders(conn, task_id):
    """ledger.cut_off_silent_holders, or nothing if our role may not end
    those sessions (a frozen holder then stalls its shard until it wakes)."""
    try:
        return ledger.cut_off_silent_holders(conn, task_id)
    except psycopg.errors.InsufficientPrivilege as exc:
        log.warning("cannot end the sessions of silent workers of task %d (%s)", task_id, db.first_line(exc))
        return []


def join(conn, options, db_settings, source_store, dest_store, source, dest):
    """Work on the shards of a running migration, with the run's own settings."""
    runs = ledger.running_runs(conn)
    if not runs:
        raise ObjmigError(f"no running migration from {source.describe()} to {dest.describe()} to join")
    run_row = runs[-1]
    manifest.check_join(run_row.manifest, manifest.build(source, dest, source_store, dest_store, options),
                        run_row.task_id)
    if not ledger.lock_holder_alive(conn, run_row.task_id):
        raise ObjmigError(
            f"migration task {run_row.task_id} is marked running but no process holds the migration lock: "
            "it stopped; run the same command without --join to finish it"
        )
    source.check_access(write=False)  # this host's credentials: fail before taking any shard
    dest.check_access(write=True, create=False)
    check_run_marker(run_row, dest)
    options, source_store, dest_store = manifest.adopt(run_row.manifest, options, source_store, dest_store)
    log.info("joining migration task %d (started on %s) with the run's settings: compression %s, %s source copies",
             run_row.task_id, run_row.lock_host, "on" if dest_store.compression_enabled else "off",
             "deleting" if options.delete_source else "keeping")
    guard = supervisor.RunGuard(db_settings, run_row.task_id)
    guard.start()
    spec = worker_spec(options, db_settings, source_store, dest_store, run_row.task_id)
    return work_on_run(options, db_settings, spec, guard, source, dest, dest_store, run_row.task_id)


def check_run_marker(run_row, dest):
    """Refuse to join unless this host's destination holds the run's marker:
    the same name (a path, an S3 address) can reach another store from here,
    and documents written there would be lost to Anchore."""
    expected = run_row.manifest.get("dest_marker")
    if not expected:
        return  # the destination is the run's own database
    found = dest.read_run_marker()
    if found != expected:
        what = "no marker" if found is None else "another run's marker"
        raise UsageError(
            f"cannot join migration task {run_row.task_id}: {dest.describe()} as this host reaches it holds {what}, "
            "not the run's: it is another store under the same name (a directory not mounted here, another S3 "
            "server behind the same address?); make this host reach the run's destination and join again")


def finish(conn, task_id, dest_store, options, seconds):
    """Close the task honestly, name what failed, and say what to configure."""
    totals = ledger.totals(conn, task_id)
    failed = ledger.failures(conn, task_id, "document")
    leftovers = ledger.failures(conn, task_id, "source-copy")
    unfinished = ledger.failed_shards(conn, task_id)
    resolved = ledger.resolved_failures(conn, task_id)
    left = scope.report(conn, options)  # rows in scope anywhere but the destination
    state = "complete" if not failed and not unfinished and not left.elsewhere else "failed"
    if not ledger.close_run(conn, task_id, state):
        metrics.record(options.metrics_file, metrics.RunResult(
            command=metrics.MIGRATE, success=False, duration_seconds=seconds, documents=0, failed=0))
        log.error("migration task %d was closed by another process meanwhile (a new migration took the lock); "
                  "run the same command again to finish", task_id)
        return EXIT_FAILED
    totals = ledger.totals(conn, task_id)  # final: no fenced write lands after the close
    metrics.record(options.metrics_file, metrics.RunResult(
        command=metrics.MIGRATE, success=state == "complete" and not leftovers, duration_seconds=seconds,
        documents=totals.documents_done, failed=len(failed), bytes=totals.bytes_done))
    rate = totals.documents_done / seconds if seconds > 0 else 0.0
    retried = f" ({resolved} document errors along the way were resolved by a retry)" if resolved else ""
    log.info("migration task %d %s: %d documents (%s written) moved in %.1fs (%.0f documents/s), %d failed%s",
             task_id, state, totals.documents_done, human_bytes(totals.bytes_done), seconds, rate, len(failed), retried)
    for user_id, bucket, archive_id, url, error in failed[:NAMED_FAILURES]:
        log.error("FAILED %s/%s/%s (%s): %s", user_id, bucket, archive_id, url, error)
    if len(failed) > NAMED_FAILURES:
        log.error("... and %d more failed documents (table objmig_failures, task_id %d)", len(failed) - NAMED_FAILURES, task_id)
    for shard_no, label, error in unfinished:
        log.error("shard %d (%s) did not finish: %s", shard_no, label, error or "worker stopped")
    for user_id, bucket, archive_id, url, error in leftovers[:NAMED_FAILURES]:
        log.warning("LEFT %s: %s", url, error)
    integrity.report_unverifiable(conn, task_id)
    if state != "complete":
        integrity.explain_failures(task_id, failed, unfinished)
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
    limits = plan.shard_limits(conn, where, options.workers, options.shard_documents, options.shard_bytes)
    shards = plan.cut_shards(conn, where, *limits)
    would_compress = 0
    if dest_store.compression_enabled and dest.supports_compression:
        would_compress = conn.execute(
            sql.SQL("SELECT count(*) FROM archive_metadata m WHERE {} AND (m.is_compressed OR m.size > %s)").format(where),
            (dest_store.compression_threshold,),
        ).fetchone()[0]
    total = sum(g.documents for g in groups)
    total_bytes = sum(g.bytes for g in groups)
    if options.json:
        document = plan_document(groups, source, dest, would_compress, len(shards))
        account = scope.account(conn, source, dest, options, unverifiable=True)
        document["not_moved"] = [{"cause": cause.name, "rows": int(cause.count), "examples": list(cause.examples),
                                  "hint": cause.hint} for cause in account.causes]
        print_json(document)
        return EXIT_OK
    print(f"dry run: from {source.describe()} to {dest.describe()}; nothing was changed")
    width = max([len("bucket")] + [len(g.bucket) for g in groups])
    user_width = max([len("user")] + [len(g.user_id) for g in groups])
    print(f"{'bucket'.ljust(width)}  {'user'.ljust(user_width)}  {'documents':>10}  {'stored bytes':>12}")
    for group in groups:
        print(f"{group.bucket.ljust(width)}  {group.user_id.ljust(user_width)}  {group.documents:>10}  {group.bytes:>12}")
    print(f"total: {total} documents, {total_bytes} bytes ({human_bytes(total_bytes)}) stored at the source, "
          f"{would_compress} would be compressed, {len(shards)} shards")
    scope.print_plan(conn, source, dest, options)
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

    def __init__(self, work, task_id, mode="auto", every=0.5):
        self.work, self.task_id, self.every = work, task_id, every
        self.display = ProgressDisplay(mode)
        self.last = time.monotonic()

    def maybe_report(self):
        if time.monotonic() - self.last >= self.every:
            self.report()

    def report(self):
        self.last = time.monotonic()
        totals = self.totals()
        if totals is not None:
            self.display.update(totals)

    def totals(self):
        try:
            return ledger.totals(self.work.conn, self.task_id)
        except (psycopg.Error, ObjmigError):  # the database is away for a moment: skip this update
            self.work.close()
            return None

    def close(self):
        totals = self.totals()
        if totals is not None:
            self.display.close(totals)
