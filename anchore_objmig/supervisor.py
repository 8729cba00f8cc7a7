"""Worker processes and the migration lock they work under.

`run_workers` starts the worker processes of one host (this process is one of
them) and waits for them. Each is bound to its parent: it dies with it
(worker.bind_to_parent). `RunGuard` keeps a run bound to Anchore's migration
lock: on the host holding it, it notices a dropped database session and takes
the lock again; on a joining host, it notices when the holder is gone and
takes the lock over, so the run is never worked on without it.
"""

import logging
import multiprocessing
import multiprocessing.connection
import os
import socket
import threading
import time

import psycopg

from anchore_objmig import db, ledger, worker
from anchore_objmig.errors import ObjmigError

log = logging.getLogger(__name__)

GUARD_INTERVAL = 1.0  # seconds between checks of the lock session
REGAIN_SECONDS = 60  # how long the holder tries to reconnect and take the lock again


class RunGuard(threading.Thread):
    """Watches the migration lock of one run, in the background.

    `holding`: this process's session `lock_conn` holds the lock for the run.
    `failure`: why the run can no longer go on from this host (then `stop`
    is set, and this host's workers stop between batches).
    """

    def __init__(self, db_settings, task_id, lock_conn=None):
        super().__init__(name="objmig-run-guard", daemon=True)
        self.db_settings, self.task_id, self.lock_conn = db_settings, task_id, lock_conn
        self.holding = lock_conn is not None
        self.failure = None
        self.stop = threading.Event()
        self.ending = threading.Event()
        self.watching = threading.Lock()  # the thread and check_now() share watch_conn
        self.watch_conn = None

    def run(self):
        while not self.ending.wait(GUARD_INTERVAL):
            try:
                if self.holding:
                    self.lock_conn.execute("SELECT 1")
                else:
                    self.watch()
            except (psycopg.Error, ObjmigError) as exc:  # a dropped session, or the database away a while
                if self.holding:
                    self.regain(exc)
                else:
                    self.close_watch()
            if self.failure:
                return

    def watch(self):
        """On a joining host: take the lock over when its holder is gone."""
        with self.watching:
            if self.holding or self.failure:
                return
            if self.watch_conn is None or self.watch_conn.closed:
                self.watch_conn = db.connect(self.db_settings, autocommit=True, role="guard")
            if ledger.lock_holder_alive(self.watch_conn, self.task_id):
                return
            run = ledger.get_run(self.watch_conn, self.task_id)
            if run is None or run.state != "running":
                self.fail(f"migration task {self.task_id} was closed")
                return
            if self.take_lock(self.watch_conn):
                log.warning("the host that held the migration lock for task %d (%s) is gone; this host took the lock "
                            "and will finish the task", self.task_id, run.lock_host)
                self.watch_conn = None

    def check_now(self):
        """Before a joining host leaves: one more look, so a holder that died
        just now is not missed between two checks of the thread."""
        try:
            self.watch()
        except (psycopg.Error, ObjmigError) as exc:
            log.debug("could not check the run's lock holder: %s", db.first_line(exc))

    def take_lock(self, conn):
        """Take the migration lock on `conn` and record it as the run's; False if someone else holds it."""
        if not db.try_migration_lock(conn):
            return False
        if not ledger.adopt_run(conn, self.task_id):
            db.release_migration_lock(conn)
            self.fail(f"migration task {self.task_id} was closed")
            return False
        self.lock_conn, self.holding = conn, True
        return True

    def regain(self, exc):
        """The lock session dropped (a database restart, a killed backend): the
        lock went with it. Reconnect and take it again before anything moves."""
        log.warning("the database session holding the migration lock was lost (%s); reconnecting",
                    db.redacted(db.first_line(exc)))
        self.holding = False
        db.close_quietly(self.lock_conn)
        deadline = time.monotonic() + REGAIN_SECONDS
        while time.monotonic() < deadline and not self.ending.is_set():
            try:
                conn = db.connect(self.db_settings, autocommit=True, role="lock")
            except Exception:  # noqa: BLE001 - keep trying until the deadline
                time.sleep(GUARD_INTERVAL)
                continue
            try:
                if self.take_lock(conn):
                    log.warning("reconnected and took the migration lock again for task %d", self.task_id)
                    return
                if self.failure:
                    return
                if ledger.lock_holder_alive(conn, self.task_id):
                    run = ledger.get_run(conn, self.task_id)
                    log.warning("another host (%s) took the migration lock and finishes task %d; this host helps",
                                run.lock_host if run else "?", self.task_id)
                    self.watch_conn = conn
                    return
                db.close_quietly(conn)
                self.fail("another process took the migration lock (a new migration or anchore-manager)")
                return
            except psycopg.Error:
                db.close_quietly(conn)
                time.sleep(GUARD_INTERVAL)
        self.fail(f"could not reach the database and take the migration lock again within {REGAIN_SECONDS}s")

    def fail(self, reason):
        self.failure = reason
        self.stop.set()

    def finish(self):
        """Stop watching; the lock (if held) is released when its session closes."""
        self.ending.set()
        if self.is_alive():
            self.join(timeout=10)
        db.close_quietly(self.lock_conn)
        self.close_watch()

    def close_watch(self):
        db.close_quietly(self.watch_conn)
        self.watch_conn = None



def run_workers(spec, count, log_settings, on_batch=None, stop=None, names=None):
    """Run `count` workers: this process is one of them (it would only wait
    otherwise, and a new interpreter costs half a second of imports), the
    others are new processes bound to this one. Their names are added to
    `names` as they start, for giving their shards back."""
    names = [] if names is None else names
    spawn = multiprocessing.get_context("spawn")  # no inherited sockets or locks
    spec = worker.replace_parent(spec, os.getpid())
    processes = [
        spawn.Process(target=worker.worker_main, args=(spec, log_settings), name=f"objmig-worker-{n}")
        for n in range(1, count)
    ]
    names.append(worker.worker_name(spec.instance))
    for process in processes:
        process.start()
        names.append(worker.worker_name(spec.instance, process.pid))
    watch = SilentChildren(spec)
    try:
        worker.run_worker(spec, on_batch=on_batch, stop=stop)
        while any(process.is_alive() for process in processes):
            multiprocessing.connection.wait([process.sentinel for process in processes], timeout=0.25)
            if on_batch:
                on_batch()
            if stop is not None and stop.is_set():
                stop_processes(processes)
            watch.kill_silent(processes)
    except BaseException:
        stop_processes(processes)
        raise
    finally:
        watch.close()
    for process in processes:
        if process.exitcode != 0 and process.pid not in watch.killed:
            log.error("worker %s ended with exit status %s", process.name, process.exitcode)
    return names


class SilentChildren:
    """Finds this host's worker processes that are stuck (stopped by a
    signal, hung on a dead mount): those holding shards they stopped
    confirming for longer than the run's takeover time, and those still
    there a takeover time after every shard was over (a healthy worker with
    nothing to claim ends within seconds). Waiting for them would stall the
    run: they are killed, so their shards are given back and worked again
    (SIGKILL also ends a stopped process; their writes are fenced anyway)."""

    INTERVAL = 2.0  # seconds between looks at the ledger

    def __init__(self, spec):
        self.spec, self.conn, self.next_look = spec, None, time.monotonic() + self.INTERVAL
        self.over_since = None  # when no shard was left pending or running
        self.takeover_seconds = None  # the run's, read once
        self.killed = set()  # pids

    def kill_silent(self, processes):
        if time.monotonic() < self.next_look:
            return
        self.next_look = time.monotonic() + self.INTERVAL
        try:
            if self.conn is None or self.conn.closed:
                self.conn = db.connect(self.spec.db_settings, autocommit=True, role="guard")
            silent = set(ledger.silent_holders(self.conn, self.spec.task_id))
            pending, running = ledger.shard_counts(self.conn, self.spec.task_id)
            if self.takeover_seconds is None:
                run = ledger.get_run(self.conn, self.spec.task_id)
                self.takeover_seconds = run.takeover_seconds if run else float("inf")
        except (psycopg.Error, ObjmigError):
            self.close()  # the database is away: the workers wait it out, and so does this look
            return
        if pending or running:
            self.over_since = None
        elif self.over_since is None:
            self.over_since = time.monotonic()
        lingering = self.over_since is not None and time.monotonic() - self.over_since > self.takeover_seconds
        for process in processes:
            if not process.is_alive():
                continue
            if worker.worker_name(self.spec.instance, process.pid) in silent or lingering:
                log.warning("worker %s (pid %d) has been silent past the run's takeover time (stopped or hung): "
                            "killing it so its shards are worked again", process.name, process.pid)
                process.kill()
                self.killed.add(process.pid)

    def close(self):
        db.close_quietly(self.conn)
        self.conn = None


def stop_processes(processes, timeout=30):
    """SIGTERM the workers and wait for them: their writes end with them."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()


def local_and_dead(worker_label):
    """Whether a worker named host:pid:instance ran on this host and has exited."""
    host, _, pid = (worker_label or "").rsplit(":", 1)[0].rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
