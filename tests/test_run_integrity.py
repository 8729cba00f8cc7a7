"""Run integrity: every process that moves a document owns its shard, under
the run's lock, with the run's settings (joiners with other configs, frozen
hosts, frozen transactions, dead parents, database restarts, dead main hosts,
SIGINT/SIGTERM). Each test checks that no document is lost or corrupted and
that exit codes and task rows tell the truth.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from anchore_objmig import metrics

import anchore_sim
import devservers
from faultproxy import FaultProxy, Rule
from helpers import assert_all_readable, section, task_rows, through_proxy, urls, write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Short leases and S3 timeouts: a silent worker's shard is taken over after
# 3 s + 1 attempt x (1 s + 3 s) = 7 s.
FAST = {"max_attempts": 1, "connect_timeout": 1, "read_timeout": 3}
LEASE = ["--lease-seconds", "3"]


class Tool:
    """anchore-objmig started in the background, in a session of its own."""

    def __init__(self, dsn, args, env=None, tmp_path=None, name="tool"):
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("ANCHORE", "OBJMIG_CRASH", "OBJMIG_FREEZE", "OBJMIG_SIGNAL"))}
        environment.update(env or {})
        self.log_path = tmp_path / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "anchore_objmig", "--db-connect", dsn, *map(str, args)],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, env=environment, cwd=ROOT,
            start_new_session=True)

    @property
    def pid(self):
        return self.process.pid

    def state(self):
        with open(f"/proc/{self.pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]

    def wait_stopped(self, timeout=120):
        wait_for(lambda: self.process.poll() is None and self.state() == "T", timeout, f"{self.log_path} to freeze")

    def resume(self):
        os.kill(self.pid, signal.SIGCONT)

    def finish(self, timeout=300):
        try:
            code = self.process.wait(timeout)
        finally:
            self.log.close()
        return code, self.log_path.read_text()


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def seed(db, count=120, seed_no=81):
    docs = anchore_sim.make_docs(count, seed=seed_no, users=("admin", "acme"), buckets=("analysis_data", "manifest_data"))
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    return docs


def configs(tmp_path, s3, bucket, compress=False, proxy=None, **extra):
    settings = {**FAST, **extra}
    config = through_proxy(s3, proxy, bucket, **settings) if proxy else s3.driver_config(bucket, **settings)
    source = write_config(tmp_path / "from.yaml", section("db"))
    dest = write_config(tmp_path / f"to-{compress}-{bool(proxy)}.yaml", section("s3", config, compress=compress, min_size_kbytes=1))
    return source, dest


@contextlib.contextmanager
def slowed_puts(s3, tmp_path, bucket, delay=0.05, **settings):
    """(source, dest) configs for db -> s3 through a proxy that holds every
    PUT `delay` s: the run lasts long enough to be stopped, frozen or joined."""
    with FaultProxy(s3.endpoint) as proxy:
        proxy.add(Rule("delay", method="PUT", delay=delay, times=None))
        yield configs(tmp_path, s3, bucket, proxy=proxy, **settings)


def migrate_args(source, dest, *extra):
    return ["migrate", source, dest, "--dontask", "--workers", "1", "--batch-size", "5", "--shard-size", "20",
            "--progress", "none", *LEASE, *extra]


def frozen_main_run(cli, db, s3, tmp_path, count, *extra):
    """Seeded documents, and a run planned and frozen right after (holding the
    lock, nothing moved): the stage for joiners. (docs, bucket, source, dest, main)."""
    docs = seed(db, count)
    bucket = s3.new_bucket()
    source, dest = configs(tmp_path, s3, bucket)
    main = Tool(cli.dsn, migrate_args(source, dest, *extra), {"OBJMIG_FREEZE_AT": "after-plan:1"}, tmp_path, "main")
    main.wait_stopped()
    return docs, bucket, source, dest, main


def lock_held(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("""SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 2
                               AND objid = 1 AND objsubid = 2 AND granted""").fetchone()[0] == 1


def test_joiner_with_another_s3_endpoint_is_refused(db, s3, cli, tmp_path):
    docs, bucket, source, dest, main = frozen_main_run(cli, db, s3, tmp_path, 40)
    try:
        with FaultProxy(s3.endpoint) as proxy:  # the same bucket, reached at another address
            _, other = configs(tmp_path, s3, bucket, proxy=proxy)
            joined = cli(*migrate_args(source, other, "--join"))
        assert joined.returncode == 2, joined.stderr
        assert "cannot join migration task" in joined.stderr and "endpoint" in joined.stderr
        assert proxy.endpoint in joined.stderr
        assert urls(db) == {f"db://{d.user_id}/{d.bucket}/{d.archive_id}" for d in docs}  # nothing moved
    finally:
        main.resume()
    code, log = main.finish()
    assert code == 0, log
    assert_all_readable(db, s3.client, docs)


def test_joiner_takes_the_runs_settings_not_its_own(db, s3, cli, tmp_path):
    # The run keeps source copies and does not compress; the joiner's config compresses and it deletes.
    docs, bucket, source, dest, main = frozen_main_run(cli, db, s3, tmp_path, 60, "--nodelete")
    try:
        _, compressing = configs(tmp_path, s3, bucket, compress=True)
        joined = cli(*migrate_args(source, compressing, "--join"))
        assert joined.returncode == 0, joined.stderr
        assert "compression off, keeping source copies" in joined.stderr
    finally:
        main.resume()
    code, log = main.finish()
    assert code == 0, log
    assert_all_readable(db, s3.client, docs)
    rows = db.execute("SELECT bool_or(is_compressed), count(*) FROM archive_metadata WHERE content_url LIKE 's3://%'").fetchone()
    assert rows == (False, len(docs))  # the run's compression, not the joiner's
    assert db.execute("SELECT count(*) FROM archive_document").fetchone()[0] == len(docs)  # the run's --nodelete
    assert task_rows(db)[-1][0] == "complete"


def test_frozen_joiner_is_fenced_after_takeover_and_a_migration_back(db, s3, cli, tmp_path):
    docs, bucket, source, dest, main = frozen_main_run(cli, db, s3, tmp_path, 60)
    # The joiner writes its first batch, then freezes before committing it.
    joiner = Tool(cli.dsn, migrate_args(source, dest, "--join"), {"OBJMIG_FREEZE_AT": "after-write:1"}, tmp_path, "joiner")
    try:
        joiner.wait_stopped()
        main.resume()
        code, log = main.finish()
        assert code == 0, log
        assert "took over shard" in log
        assert task_rows(db)[-1][0] == "complete"
        assert_all_readable(db, s3.client, docs)
        # The operator migrates back; then the frozen joiner wakes up.
        back = cli("migrate", dest, source, "--dontask", "--progress", "none")
        assert back.returncode == 0, back.stderr
        counts = db.execute("SELECT archive_documents_migrated FROM archive_migration_tasks ORDER BY id").fetchall()
    finally:
        joiner.resume()
    code, log = joiner.finish()
    assert code == 1, log
    assert "closed" in log or "lock" in log
    assert_all_readable(db, s3.client, docs)  # no row points at an object the move back deleted
    assert all(url.startswith("db://") for url in urls(db))
    assert db.execute("SELECT archive_documents_migrated FROM archive_migration_tasks ORDER BY id").fetchall() == counts


def test_a_joiner_frozen_between_its_fence_check_and_its_deletes_sends_none_of_them(db, s3, cli, tmp_path):
    """s3 -> db. The joiner commits a batch, checks its lease, and freezes
    just before sending DeleteObjects for the old copies. The main host takes
    over and finishes, the operator migrates back (the same keys are written
    again), and then the joiner wakes: its deletes would remove the new
    copies. Every S3 request that changes a key checks the fence itself."""
    bucket = s3.new_bucket()
    docs = anchore_sim.make_docs(60, seed=83, users=("admin", "acme"), buckets=("analysis_data", "manifest_data"))
    anchore_sim.store(db, anchore_sim.Location("s3", s3_client=s3.client, s3_bucket=bucket), docs)
    source = write_config(tmp_path / "s3.yaml", section("s3", s3.driver_config(bucket, **FAST)))
    dest = write_config(tmp_path / "db.yaml", section("db"))
    main = Tool(cli.dsn, migrate_args(source, dest), {"OBJMIG_FREEZE_AT": "after-plan:1"}, tmp_path, "main")
    main.wait_stopped()
    joiner = Tool(cli.dsn, migrate_args(source, dest, "--join"), {"OBJMIG_FREEZE_AT": "before-delete-send:1"},
                  tmp_path, "joiner")
    try:
        joiner.wait_stopped()
        main.resume()
        code, log = main.finish()
        assert code == 0, log
        assert task_rows(db)[-1][0] == "complete"
        back = cli("migrate", dest, source, "--dontask", "--progress", "none")
        assert back.returncode == 0, back.stderr
        assert len(s3.keys(bucket)) == len(docs)
    finally:
        joiner.resume()
    code, log = joiner.finish()
    assert code == 1, log
    assert len(s3.keys(bucket)) == len(docs), log  # none of the joiner's deletes went out
    assert_all_readable(db, s3.client, docs)
    assert all(url.startswith(f"s3://{bucket}/") for url in urls(db))


def test_a_joiner_reaching_another_store_under_the_destinations_name_is_refused(db, cli, tmp_path):
    """db -> localfs. On the joining host the destination's path leads
    elsewhere (its volume not mounted there: here a symlink moved). Its
    manifest matches the run's, but the directory lacks the run's marker:
    the join is refused before it writes anything, and the run finishes."""
    docs = seed(db, 40)
    real, elsewhere, dest_dir = tmp_path / "real", tmp_path / "elsewhere", tmp_path / "dest"
    real.mkdir()
    elsewhere.mkdir()
    dest_dir.symlink_to(real)
    source = write_config(tmp_path / "from.yaml", section("db"))
    dest = write_config(tmp_path / "to.yaml", section("localfs", {"archive_data_dir": str(dest_dir)}))
    main = Tool(cli.dsn, migrate_args(source, dest), {"OBJMIG_FREEZE_AT": "after-plan:1"}, tmp_path, "main")
    main.wait_stopped()
    try:
        dest_dir.unlink()
        dest_dir.symlink_to(elsewhere)
        joiner = cli(*migrate_args(source, dest, "--join"))
        assert joiner.returncode == 2, joiner.stderr
        assert "holds no marker, not the run's: it is another store under the same name" in joiner.stderr
        assert list(elsewhere.iterdir()) == []
        assert db.execute("SELECT count(*) FROM objmig_shards WHERE worker IS NOT NULL").fetchone()[0] == 0
    finally:
        dest_dir.unlink()
        dest_dir.symlink_to(real)
        main.resume()
    code, log = main.finish()
    assert code == 0, log
    assert_all_readable(db, None, docs)
    assert all(url.startswith(f"file://{dest_dir}/") for url in urls(db))
    assert not (real / ".anchore-objmig-run").exists()  # the marker goes with the run


def test_joiner_frozen_inside_its_commit_transaction_cannot_stall_the_run(db, s3, cli, tmp_path):
    docs, bucket, source, dest, main = frozen_main_run(cli, db, s3, tmp_path, 60)
    # Frozen "idle in transaction" right after its metadata UPDATE, holding those rows.
    joiner = Tool(cli.dsn, migrate_args(source, dest, "--join"), {"OBJMIG_FREEZE_AT": "before-commit:1"}, tmp_path, "joiner")
    try:
        joiner.wait_stopped()
        main.resume()
        code, log = main.finish(timeout=240)  # the server ends the frozen transaction after 30 s
        assert code == 0, log
        assert f":{joiner.pid}" in log  # the log names the worker it waited for
        assert task_rows(db)[-1][0] == "complete"
        assert_all_readable(db, s3.client, docs)
    finally:
        joiner.resume()
    code, log = joiner.finish()
    assert code != 0, log
    assert_all_readable(db, s3.client, docs)
    assert len(s3.keys(bucket)) == len(docs)


def test_joiner_frozen_inside_a_copy_into_the_database_cannot_stall_the_run(db, cli, tmp_path):
    """db -> db2. The joiner freezes in the middle of its batch's COPY, inside
    the transaction that confirmed its lease: its session waits on the client
    (no idle timeout applies) holding the shard row, which hides the shard
    from every claim. Once it is silent past the takeover time, the run's
    owner ends that session and its shard is taken over."""
    docs = seed(db, 60)
    source = write_config(tmp_path / "from.yaml", section("db"))
    dest = write_config(tmp_path / "to.yaml", section("db2"))
    main = Tool(cli.dsn, migrate_args(source, dest), {"OBJMIG_FREEZE_AT": "after-plan:1"}, tmp_path, "main")
    main.wait_stopped()
    joiner = Tool(cli.dsn, migrate_args(source, dest, "--join"), {"OBJMIG_FREEZE_AT": "in-copy:1"}, tmp_path, "joiner")
    try:
        joiner.wait_stopped()
        assert db.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY objmig_stage_object%%' "
                          "AND state = 'active'").fetchone()[0] == 1
        main.resume()
        code, log = main.finish(timeout=120)
        assert code == 0, log
        assert f":{joiner.pid}:" in log and "silent past the takeover time inside a transaction" in log, log
        assert task_rows(db)[-1][0] == "complete"
        assert all(url.startswith("db2://") for url in urls(db))
        assert_all_readable(db, None, docs)
    finally:
        joiner.resume()
    code, log = joiner.finish()
    assert code != 0, log
    assert_all_readable(db, None, docs)
    assert db.execute("SELECT count(*) FROM object_storage").fetchone()[0] == len(docs)


def children_of(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(child) for child in handle.read().split()]


def test_a_stopped_worker_process_of_this_host_cannot_stall_the_run(db, s3, cli, tmp_path):
    """One of the host's worker processes is stopped (SIGSTOP; a hang on a
    dead mount looks the same) while it holds a shard. The parent does not
    wait for it for ever: past the takeover time it kills it, and its shard
    is worked again."""
    docs = seed(db, 120)
    bucket = s3.new_bucket()
    with slowed_puts(s3, tmp_path, bucket) as (source, dest):
        main = Tool(cli.dsn, migrate_args(source, dest, "--workers", "2"), None, tmp_path, "main")

        def holding_child():  # (multiprocessing's resource tracker is a child too)
            if db.execute("SELECT to_regclass('objmig_shards')").fetchone()[0] is None:
                return None  # not planned yet
            holders = {row[0] for row in db.execute("SELECT worker FROM objmig_shards WHERE state = 'running'")}
            return next((pid for pid in children_of(main.pid) if any(f":{pid}:" in h for h in holders)), None)

        seen = []
        wait_for(lambda: seen.append(holding_child()) or seen[-1] is not None, 120, "a worker process to claim a shard")
        child = seen[-1]
        os.kill(child, signal.SIGSTOP)
        try:
            code, log = main.finish(timeout=180)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGCONT)
    assert code == 0, log
    assert "has been silent past the run's takeover time (stopped or hung): killing it" in log, log
    assert " ERROR " not in log, log  # killed on purpose: not reported as a worker failure
    assert [row[0] for row in task_rows(db)] == ["complete"]
    assert_all_readable(db, s3.client, docs)
    assert all(url.startswith(f"s3://{bucket}/") for url in urls(db))


def test_workers_die_with_their_parent_and_a_rerun_does_not_race_them(db, s3, cli, tmp_path):
    docs = seed(db, 200)
    bucket = s3.new_bucket()
    with slowed_puts(s3, tmp_path, bucket) as (source, dest):
        args = migrate_args(source, dest)
        args[args.index("--workers") + 1] = "3"
        main = Tool(cli.dsn, args, None, tmp_path, "main")
        wait_for(lambda: len(s3.keys(bucket)) >= 20, 120, "the first documents to move")
        workers = children_of(main.pid)
        assert workers
        os.kill(main.pid, signal.SIGKILL)  # the parent alone: its workers must not go on
        main.finish()
        wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
                                 for pid in workers), 10, "the workers to die with their parent")
        rerun = cli(*migrate_args(source, dest))
    assert rerun.returncode == 0, rerun.stderr
    assert "metadata row changed" not in rerun.stderr
    assert_all_readable(db, s3.client, docs)
    rows = task_rows(db)
    assert [row[0] for row in rows] == ["failed", "complete"]
    before = rows[0]
    time.sleep(1)  # a closed task's counters never change
    assert task_rows(db)[0] == before


def test_lock_session_killed_is_taken_again_and_excludes_a_second_migration(db, s3, cli, tmp_path):
    docs = seed(db, 150)
    bucket = s3.new_bucket()
    with slowed_puts(s3, tmp_path, bucket) as (source, dest):
        main = Tool(cli.dsn, migrate_args(source, dest), None, tmp_path, "main")
        wait_for(lambda: len(s3.keys(bucket)) >= 10, 120, "the first documents to move")
        db.execute("""SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'
                      AND classid = 2 AND objid = 1 AND objsubid = 2 AND granted""")
        wait_for(lambda: lock_held(cli.dsn), 30, "the lock to be taken again")
        second = cli(*migrate_args(source, dest))
        code, log = main.finish()
    assert second.returncode == 1 and "another migration is running" in second.stderr
    assert code == 0, log
    assert "took the migration lock again" in log
    assert_all_readable(db, s3.client, docs)
    assert [row[0] for row in task_rows(db)] == ["complete"]


def run_through_a_database_fault(tmp_path, s3, fault, *extra):
    """A migration on a private PostgreSQL cluster, `fault(server)` applied once
    the first documents moved: (exit code, log, the server, the documents).
    The caller stops the server."""
    server, docs = seeded_private_database(150)
    bucket = s3.new_bucket()
    # These tests are about the database: S3 requests get their retries
    # (a gateway stalling past FAST's 3 s read timeout is not the fault here).
    with slowed_puts(s3, tmp_path, bucket, max_attempts=3) as (source, dest):
        main = Tool(server.dsn, migrate_args(source, dest, *extra), None, tmp_path, "main")
        wait_for(lambda: len(s3.keys(bucket)) >= 10, 120, "the first documents to move")
        fault(server)
        code, log = main.finish()
    return code, log, server, docs


def seeded_private_database(count):
    """A PostgreSQL cluster of the test's own (to stop and restart), with
    Anchore's tables and `count` documents: (server, documents)."""
    server = devservers.PostgresServer().start()
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        anchore_sim.apply_schema(conn)
        docs = seed(conn, count)
    return server, docs


def assert_moved_whole(server, s3, docs):
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        assert_all_readable(conn, s3.client, docs)
        assert [row[0] for row in task_rows(conn)] == ["complete"]
        assert conn.execute("SELECT sum(documents_done) FROM objmig_shards").fetchone()[0] == len(docs)


def test_database_restart_mid_run(tmp_path, s3):
    code, log, server, docs = run_through_a_database_fault(tmp_path, s3, lambda server: server.restart())
    try:
        assert code == 0, log
        assert "took the migration lock again" in log
        assert_moved_whole(server, s3, docs)
    finally:
        server.stop()


def test_database_away_longer_than_the_connect_retries(tmp_path, s3):
    """Down for 12 s (the connect retries give up after about 3.5 s): the
    workers and the lock guard wait, the run finishes, nothing is lost."""
    code, log, server, docs = run_through_a_database_fault(tmp_path, s3, lambda server: server.stop_for(12),
                                                           "--workers", "2")
    try:
        assert code == 0, log
        assert "Traceback" not in log
        assert_moved_whole(server, s3, docs)
    finally:
        server.stop()


def test_workers_that_start_while_the_database_is_away_wait_for_it(tmp_path, s3):
    """The outage begins between planning and the workers' start: each
    worker's first connection and its read of the run wait it out like later
    ones do (the host's first worker is the parent: it used to end the run)."""
    server, docs = seeded_private_database(60)
    try:
        bucket = s3.new_bucket()
        source, dest = configs(tmp_path, s3, bucket, max_attempts=3)
        main = Tool(server.dsn, migrate_args(source, dest, "--workers", "2"), {"OBJMIG_FREEZE_AT": "after-plan:1"},
                    tmp_path, "main")
        main.wait_stopped()
        outage = threading.Thread(target=server.stop_for, args=(12,))
        outage.start()
        wait_for(lambda: not (server.data_dir / "postmaster.pid").exists(), 60, "the database to stop")
        main.resume()
        outage.join()
        code, log = main.finish()
        assert code == 0, log
        assert "cannot connect" not in log and "worker stopped" not in log and "Traceback" not in log, log
        # Said once per process (the parent and one worker), not once per attempt of every thread.
        assert log.count("database not reachable") <= 2 and "database reachable again" in log, log
        assert_moved_whole(server, s3, docs)
    finally:
        server.stop()


def test_joiner_finishes_the_run_when_the_main_host_dies(db, s3, cli, tmp_path):
    docs = seed(db, 200)
    bucket = s3.new_bucket()
    # Slow uploads through few threads: the main host is still busy when the joiner claims its shard.
    with slowed_puts(s3, tmp_path, bucket, delay=0.2) as (source, dest):
        main = Tool(cli.dsn, migrate_args(source, dest, "--io-threads", "2"), None, tmp_path, "main")
        wait_for(lambda: len(s3.keys(bucket)) >= 5, 120, "the main host to start")
        joiner = Tool(cli.dsn, migrate_args(source, dest, "--join", "--io-threads", "8"), None, tmp_path, "joiner")
        wait_for(lambda: db.execute("SELECT count(*) FROM objmig_shards WHERE host IS NOT NULL AND worker LIKE %s",
                                    (f"%:{joiner.pid}:%",)).fetchone()[0] > 0, 120, "the joiner to claim a shard")
        os.killpg(main.pid, signal.SIGKILL)  # the host that started the run dies
        main.finish()
        code, log = joiner.finish()
    assert code == 0, log
    assert "this host took the lock and will finish the task" in log, log
    assert_all_readable(db, s3.client, docs)
    assert [row[0] for row in task_rows(db)] == ["complete"]
    assert all(url.startswith(f"s3://{bucket}/") for url in urls(db))


def test_sigterm_and_sigint_close_the_task_at_once(db, s3, cli, tmp_path):
    docs = seed(db, 150)
    bucket = s3.new_bucket()
    with slowed_puts(s3, tmp_path, bucket) as (source, dest):
        for sig, status in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
            metrics_file = tmp_path / f"metrics-{status}.prom"
            moved_before = len(s3.keys(bucket))  # the first stop's documents stay moved
            main = Tool(cli.dsn, migrate_args(source, dest, "--metrics-file", metrics_file), None, tmp_path,
                        f"main-{status}")
            # Stopped while moving (a stop while planning is the next test's): this run's own copies are arriving.
            wait_for(lambda: db.execute("SELECT count(*) FROM tasks WHERE state = 'running'").fetchone()[0] == 1
                     and len(s3.keys(bucket)) > moved_before, 120, "the run to start moving")
            os.killpg(main.pid, sig)
            code, log = main.finish()
            assert code == status, log
            assert "closed as failed" in log
            written = metrics_file.read_text()  # the stop is recorded: no alert reads an old success
            assert 'anchore_objmig_last_run_timestamp_seconds{command="migrate"}' in written
            assert 'anchore_objmig_last_success_timestamp_seconds{' not in written
            assert db.execute("SELECT count(*) FROM tasks WHERE state = 'running'").fetchone()[0] == 0
            assert_all_readable(db, s3.client, docs)
        rerun = cli(*migrate_args(source, dest))
    assert rerun.returncode == 0, rerun.stderr
    assert [row[0] for row in task_rows(db)] == ["failed", "failed", "complete"]
    assert_all_readable(db, s3.client, docs)


@pytest.mark.parametrize("name, status", [("TERM", 143), ("INT", 130)])
def test_a_stop_while_planning_closes_the_task_and_records_the_failed_run(db, s3, cli, tmp_path, name, status):
    """The signal comes after the task is opened, before any shard is worked:
    one line says the task was closed, the exit status is the signal's, and
    the metrics file says the last run failed (it kept the old success)."""
    docs = seed(db, 30)
    bucket = s3.new_bucket()
    source, dest = configs(tmp_path, s3, bucket)
    prom = tmp_path / "objmig.prom"
    metrics.record(str(prom), metrics.RunResult("migrate", True, 1.0, 5, 0, finished_at=1000.0))
    main = Tool(cli.dsn, migrate_args(source, dest, "--metrics-file", prom), {"OBJMIG_SIGNAL_AT": f"after-task:1:{name}"},
                tmp_path, "main")
    code, log = main.finish()
    assert code == status, log
    assert f"interrupted by SIG{name} while planning: migration task" in log and "closed as failed" in log, log
    assert len([line for line in log.splitlines() if " ERROR " in line]) == 1, log
    assert [row[0] for row in task_rows(db)] == ["failed"]
    assert s3.keys(bucket) == []
    samples = {(s.name, dict(s.labels)["command"]): s.value for s in metrics.read_samples(str(prom))}
    assert samples[(metrics.LAST_SUCCESS, "migrate")] == 1000.0
    assert samples[(metrics.PREFIX + "last_run_timestamp_seconds", "migrate")] > 1000.0
    rerun = cli(*migrate_args(source, dest))
    assert rerun.returncode == 0, rerun.stderr
    assert_all_readable(db, s3.client, docs)


@pytest.mark.parametrize("command", ["migrate", "verify"])
def test_a_run_that_cannot_reach_the_database_records_a_failed_run(tmp_path, command):
    """Cron's alert reads the file: a run that never got to work ended too."""
    prom = tmp_path / "objmig.prom"
    metrics.record(str(prom), metrics.RunResult(command, True, 1.0, 5, 0, finished_at=1000.0))
    source = write_config(tmp_path / "from.yaml", section("db"))
    dest = write_config(tmp_path / "to.yaml", section("s3", {"url": "http://127.0.0.1:9", "bucket": "b", "access_key": "k",
                                                            "secret_key": "s"}))
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "anchore_objmig", "--db-connect", f"postgresql://objmig@127.0.0.1:{port}/objmig",
         *(["migrate", source, dest, "--dontask"] if command == "migrate" else ["verify", dest]),
         "--metrics-file", prom], capture_output=True, text=True, cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("ANCHORE")})
    assert result.returncode == 3, result.stderr
    samples = {(s.name, dict(s.labels)["command"]): s.value for s in metrics.read_samples(str(prom))}
    assert samples[(metrics.LAST_SUCCESS, command)] == 1000.0
    assert samples[(metrics.PREFIX + "last_run_timestamp_seconds", command)] > 1000.0
    assert samples[(metrics.PREFIX + "duration_seconds", command)] >= 0


@pytest.mark.parametrize("name, status", [("TERM", 143), ("INT", 130)])
def test_a_stop_inside_a_commit_lets_the_commit_finish_first(db, s3, cli, tmp_path, name, status):
    """The signal comes while the second batch's metadata transaction is open
    (a stop that landed inside psycopg's transaction bookkeeping used to turn
    into "transaction rollback at the wrong nesting level", which ordinary
    error handling caught: the stop was lost and the run went on to exit 0).
    The transaction commits whole, then the run stops with the signal's status."""
    docs = seed(db, 60)
    bucket = s3.new_bucket()
    source, dest = configs(tmp_path, s3, bucket)
    main = Tool(cli.dsn, migrate_args(source, dest), {"OBJMIG_SIGNAL_AT": f"before-commit:2:{name}"}, tmp_path, "main")
    code, log = main.finish()
    assert code == status, log
    assert "closed as failed" in log
    assert "nesting level" not in log and "not deleted" not in log
    moved = db.execute("SELECT sum(documents_done) FROM objmig_shards").fetchone()[0]
    assert moved == 10, log  # both batches of 5: the one being committed when the signal came is in
    assert sum(url.startswith(f"s3://{bucket}/") for url in urls(db)) == 10
    assert_all_readable(db, s3.client, docs)
    rerun = cli(*migrate_args(source, dest))
    assert rerun.returncode == 0, rerun.stderr
    assert [row[0] for row in task_rows(db)] == ["failed", "complete"]
    assert_all_readable(db, s3.client, docs)
