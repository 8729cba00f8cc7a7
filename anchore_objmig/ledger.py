"""The tool's own tables, and every state change in them.

They live beside Anchore's tables in the catalog database (every install has
it), are created on first use, and are never read by Anchore:

objmig_runs      one row per migration run (= its Anchore task id): its
                 manifest (everything that decides which bytes land where),
                 the database session holding the migration lock for it, and
                 the lease timings every host of the run obeys.
objmig_shards    one row per shard: state pending/running/done/failed, counts
                 done, which worker holds it under which lease, its heartbeat.
objmig_failures  every document that could not be moved, with the reason.
objmig_pending_deletes
                 old copies to delete, written in the same transaction that
                 points the metadata elsewhere; a crash before the delete
                 leaves the intent here, and the next run finishes it.

Leases. A claim gives the worker a fresh lease (the shard's `lease` counter).
Every write that depends on owning the shard (metadata commit, progress,
finish, give-back) runs in a transaction whose first statement is *fenced*:
it matches only while the lease is still the worker's, the run is still
running, and the run's lock session still holds Anchore's migration lock.
Zero rows matched means the worker lost its right to the shard: it stops.
A shard whose heartbeat is older than the lease plus the longest time a
stale worker's write could still be in the air is taken over by a new claim.
"""

import socket
from dataclasses import dataclass

from anchore_objmig import db, integrity
from anchore_objmig.plan import Shard

SCHEMA = """
CREATE TABLE IF NOT EXISTS objmig_runs (
    task_id          integer PRIMARY KEY,
    source_location  text NOT NULL,
    dest_location    text NOT NULL,
    buckets          text[],
    state            text NOT NULL DEFAULT 'running',
    documents        bigint NOT NULL DEFAULT 0,
    bytes            bigint NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE objmig_runs ADD COLUMN IF NOT EXISTS manifest jsonb;
ALTER TABLE objmig_runs ADD COLUMN IF NOT EXISTS lock_pid integer;
ALTER TABLE objmig_runs ADD COLUMN IF NOT EXISTS lock_host text;
ALTER TABLE objmig_runs ADD COLUMN IF NOT EXISTS lock_started timestamptz;
ALTER TABLE objmig_runs ADD COLUMN IF NOT EXISTS lease_seconds double precision NOT NULL DEFAULT 30;
ALTER TABLE objmig_runs ADD COLUMN IF NOT EXISTS write_grace_seconds double precision NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS objmig_shards (
    task_id          integer NOT NULL REFERENCES objmig_runs (task_id) ON DELETE CASCADE,
    shard_no         integer NOT NULL,
    bucket           text NOT NULL,
    user_id          text NOT NULL,
    lower_id         text,
    upper_id         text,
    documents        bigint NOT NULL DEFAULT 0,
    bytes            bigint NOT NULL DEFAULT 0,
    state            text NOT NULL DEFAULT 'pending',
    documents_done   bigint NOT NULL DEFAULT 0,
    bytes_done       bigint NOT NULL DEFAULT 0,
    documents_failed bigint NOT NULL DEFAULT 0,
    worker           text,
    host             text,
    heartbeat        timestamptz,
    attempts         integer NOT NULL DEFAULT 0,
    error            text,
    PRIMARY KEY (task_id, shard_no)
);
ALTER TABLE objmig_shards ADD COLUMN IF NOT EXISTS lease bigint NOT NULL DEFAULT 0;
-- Shards are primary-key ranges (plan.Shard): lower (exclusive) and upper
-- (inclusive) keys; bucket/user_id/lower_id/upper_id are from older versions.
ALTER TABLE objmig_shards ADD COLUMN IF NOT EXISTS lower_key text[];
ALTER TABLE objmig_shards ADD COLUMN IF NOT EXISTS upper_key text[];
ALTER TABLE objmig_shards ALTER COLUMN bucket DROP NOT NULL;
ALTER TABLE objmig_shards ALTER COLUMN user_id DROP NOT NULL;
CREATE TABLE IF NOT EXISTS objmig_failures (
    task_id          integer NOT NULL,
    bucket           text NOT NULL,
    user_id          text NOT NULL,
    archive_id       text NOT NULL,
    content_url      text,
    kind             text NOT NULL DEFAULT 'document',  -- or 'source-copy': moved, old copy left
    error            text NOT NULL,
    at               timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS objmig_failures_task ON objmig_failures (task_id);
CREATE TABLE IF NOT EXISTS objmig_pending_deletes (
    url              text PRIMARY KEY,
    task_id          integer NOT NULL,
    at               timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS objmig_moved (
    url              text PRIMARY KEY,  -- the old copy's content_url
    task_id          integer NOT NULL,  -- the run that moved the document away from it
    bucket           text NOT NULL,
    size             bigint,            -- its stored size, from the metadata row
    at               timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS objmig_shared_copies (
    task_id          integer NOT NULL REFERENCES objmig_runs (task_id) ON DELETE CASCADE,
    url              text NOT NULL,     -- a stored copy more than one metadata row pointed at when the run began
    PRIMARY KEY (task_id, url)
);
"""

# One creator at a time: CREATE TABLE IF NOT EXISTS races with itself.
SCHEMA_LOCK = (2, 2)

# The session recorded as the run's lock holder (alias r) still holds Anchore's
# migration lock pg_advisory_lock(2, 1) in this database.
# A session is named by its pid and its start time: after a server restart a
# new session may get the pid of the run's old one.
LOCK_HELD = """EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                       WHERE l.locktype = 'advisory' AND l.classid = 2 AND l.objid = 1 AND l.objsubid = 2
                         AND l.granted AND l.pid = r.lock_pid AND a.backend_start = r.lock_started
                         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))"""
# This session's start time, recorded with its pid as the run's lock holder.
SESSION_STARTED = "(SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid())"

# The fence: matches the shard row only while `lease` is current and the run
# is running under its lock. Taking the row lock also orders this transaction
# against a takeover or the run's closing.
FENCE = f"""UPDATE objmig_shards s SET heartbeat = now(){{extra}}
            FROM objmig_runs r
            WHERE s.task_id = %(task_id)s AND s.shard_no = %(shard_no)s AND s.lease = %(lease)s
              AND s.state = 'running' AND r.task_id = s.task_id AND r.state = 'running' AND {LOCK_HELD}
            RETURNING s.shard_no"""


class LeaseLost(Exception):
    """This worker may no longer write for a shard (or for the whole run)."""

    def __init__(self, reason, run_over=False):
        super().__init__(reason)
        self.run_over = run_over  # the run is closed: stop working on it altogether


@dataclass(frozen=True)
class Lease:
    """A worker's right to one shard, valid while `token` is the shard's lease."""

    task_id: int
    shard: Shard
    token: int
    worker: str

    @property
    def shard_no(self):
        return self.shard.shard_no

    def params(self, **extra):
        return {"task_id": self.task_id, "shard_no": self.shard.shard_no, "lease": self.token, **extra}


@dataclass(frozen=True)
class RunRow:
    task_id: int
    source_location: str
    dest_location: str
    buckets: list | None
    state: str
    manifest: dict | None = None
    lock_pid: int | None = None
    lock_host: str | None = None
    lease_seconds: float = 30
    write_grace_seconds: float = 0

    @property
    def takeover_seconds(self):
        """How old a heartbeat must be before its shard may be taken over."""
        return self.lease_seconds + self.write_grace_seconds


@dataclass(frozen=True)
class Totals:
    documents: int
    bytes: int
    documents_done: int
    bytes_done: int
    documents_failed: int
    shards: int
    shards_done: int
    shards_failed: int


def ensure_schema(conn):
    with db.transaction(conn):
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", SCHEMA_LOCK)
        conn.execute(SCHEMA)


# -- runs -------------------------------------------------------------------
RUN_COLUMNS = """task_id, source_location, dest_location, buckets, state, manifest, lock_pid, lock_host,
                 lease_seconds, write_grace_seconds"""  # the order of RunRow's fields


def create_run(conn, task_id, manifest, shards, lock_pid, lock_started):
    """The run's row (with its manifest and lock session) and its shards, in one transaction."""
    from psycopg.types.json import Jsonb

    with db.transaction(conn):
        conn.execute(
            """INSERT INTO objmig_runs (task_id, source_location, dest_location, buckets, documents, bytes,
                                        manifest, lock_pid, lock_started, lock_host, lease_seconds, write_grace_seconds)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
            (
                task_id,
                manifest["source"]["location"],
                manifest["dest"]["location"],
                manifest["buckets"] or None,
                sum(s.documents for s in shards),
                sum(s.bytes for s in shards),
                Jsonb(manifest),
                lock_pid,
                lock_started,
                socket.gethostname(),
                manifest["lease_seconds"],
                manifest["write_grace_seconds"],
            ),
        )
        with conn.cursor() as cur:
            cur.executemany(
                """INSERT INTO objmig_shards (task_id, shard_no, lower_key, upper_key, documents, bytes)
                   VALUES (%s, %s, %s, %s, %s, %s)""",
                [(task_id, s.shard_no, list(s.lower) if s.lower else None, list(s.upper) if s.upper else None,
                  s.documents, s.bytes) for s in shards],
            )
        if manifest["delete_source"]:
            integrity.note_shared_copies(conn, task_id)


def has_schema(conn):
    return conn.execute("SELECT to_regclass('objmig_runs') IS NOT NULL").fetchone()[0]


def running_runs(conn, source_location=None, dest_location=None):
    """Runs still marked running, optionally only those between two locations."""
    if not has_schema(conn):
        return []  # no run ever started in this database
    query = f"SELECT {RUN_COLUMNS} FROM objmig_runs WHERE state = 'running'"
    params = []
    if source_location is not None:
        query += " AND source_location = %s AND dest_location = %s"
        params += [source_location, dest_location]
    return [RunRow(*row) for row in conn.execute(query + " ORDER BY task_id", params)]


def get_run(conn, task_id):
    row = conn.execute(f"SELECT {RUN_COLUMNS} FROM objmig_runs WHERE task_id = %s", (task_id,)).fetchone()
    return RunRow(*row) if row else None


def lock_holder_alive(conn, task_id):
    """Whether the run is running and its recorded lock session still holds the lock."""
    row = conn.execute(
        f"SELECT r.state, {LOCK_HELD} FROM objmig_runs r WHERE r.task_id = %s", (task_id,)
    ).fetchone()
    return bool(row) and row[0] == "running" and row[1]


def adopt_run(conn, task_id):
    """After taking the migration lock on `conn`: record this session as the
    run's lock holder. False if the run is no longer running."""
    row = conn.execute(
        f"""UPDATE objmig_runs SET lock_pid = pg_backend_pid(), lock_started = {SESSION_STARTED}, lock_host = %s,
                  updated_at = now()
            WHERE task_id = %s AND state = 'running' RETURNING task_id""",
        (socket.gethostname(), task_id),
    ).fetchone()
    return row is not None


def close_run(conn, task_id, state, reason=None):
    """Close a running run and its task in one transaction; False if it was
    already closed (by another process). Every lease of the run is revoked
    first: a worker's fenced transaction either committed before this (its
    counts are in) or matches nothing after it, so a closed run's counters
    never change again. Shards that were running become 'revoked' with their
    heartbeat kept: their workers' last writes may still be in the air, and
    the next run waits for them (revoked_holders)."""
    from anchore_objmig import tasks

    with db.transaction(conn):
        row = conn.execute("SELECT state FROM objmig_runs WHERE task_id = %s FOR UPDATE", (task_id,)).fetchone()
        if not row or row[0] != "running":
            return False
        conn.execute(
            """WITH locked AS (SELECT shard_no FROM objmig_shards WHERE task_id = %(task_id)s
                                 AND state IN ('pending', 'running') ORDER BY shard_no FOR UPDATE)
               UPDATE objmig_shards s
                  SET state = CASE WHEN s.state = 'running' THEN 'revoked' ELSE 'failed' END,
                      error = coalesce(%(reason)s, 'run closed')
                 FROM locked WHERE s.task_id = %(task_id)s AND s.shard_no = locked.shard_no""",
            {"task_id": task_id, "reason": reason},
        )
        conn.execute("UPDATE objmig_runs SET state = %s, updated_at = now() WHERE task_id = %s", (state, task_id))
        conn.execute("DELETE FROM objmig_shared_copies WHERE task_id = %s", (task_id,))  # no writer left to ask
        tasks.finish_task(conn, task_id, state)
    return True


# -- shards and leases ------------------------------------------------------
def claim_shard(conn, task_id, worker):
    """A lease on the next shard of the run: a pending one, or one whose
    holder went quiet for longer than the run's takeover time. None when no
    shard can be claimed now (see claim_outlook for why).

    Returns (Lease, previous holder or None when it was pending).
    """
    with db.transaction(conn):
        row = conn.execute(
            f"""WITH next AS (
                    SELECT s.task_id, s.shard_no, s.state AS previous_state, s.worker AS previous_worker
                    FROM objmig_shards s JOIN objmig_runs r ON r.task_id = s.task_id
                    WHERE s.task_id = %(task_id)s AND r.state = 'running' AND {LOCK_HELD}
                      AND (s.state = 'pending'
                           OR (s.state = 'running'
                               AND s.heartbeat < now() - make_interval(secs => r.lease_seconds + r.write_grace_seconds)))
                    ORDER BY s.state = 'pending' DESC, s.shard_no
                    LIMIT 1 FOR UPDATE OF s SKIP LOCKED)
                UPDATE objmig_shards s SET state = 'running', worker = %(worker)s, host = %(host)s,
                       heartbeat = now(), lease = s.lease + 1
                FROM next WHERE s.task_id = next.task_id AND s.shard_no = next.shard_no
                RETURNING s.shard_no, s.lower_key, s.upper_key, s.documents, s.bytes, s.lease,
                          next.previous_state, next.previous_worker""",
            {"task_id": task_id, "worker": worker, "host": socket.gethostname()},
        ).fetchone()
    if not row:
        return None, None
    shard_no, lower, upper, documents, nbytes, token, previous_state, previous_worker = row
    shard = Shard(shard_no, tuple(lower) if lower else None, tuple(upper) if upper else None, documents, nbytes)
    return Lease(task_id, shard, token, worker), (previous_worker if previous_state == "running" else None)


def claim_outlook(conn, task_id):
    """Why nothing could be claimed: 'closed' (the run is over), 'no-lock'
    (its lock session is gone), 'others' (shards still held elsewhere) or 'done'."""
    row = conn.execute(
        f"""SELECT r.state, {LOCK_HELD},
                   EXISTS (SELECT 1 FROM objmig_shards s WHERE s.task_id = r.task_id AND s.state IN ('pending', 'running'))
            FROM objmig_runs r WHERE r.task_id = %s""",
        (task_id,),
    ).fetchone()
    if not row or row[0] != "running":
        return "closed"
    if not row[1]:
        return "no-lock"
    return "others" if row[2] else "done"


def confirm_lease(conn, lease):
    """The fence, on its own: raise LeaseLost unless `lease` is still good.
    Inside a transaction it holds the shard row until that commits."""
    if conn.execute(FENCE.format(extra=""), lease.params()).fetchone() is None:
        raise lost_lease(conn, lease)


def lost_lease(conn, lease):
    """A LeaseLost saying why `lease` no longer holds."""
    row = conn.execute(
        f"""SELECT r.state, {LOCK_HELD}, s.lease, s.worker, s.state
            FROM objmig_runs r LEFT JOIN objmig_shards s ON s.task_id = r.task_id AND s.shard_no = %s
            WHERE r.task_id = %s""",
        (lease.shard_no, lease.task_id),
    ).fetchone()
    if not row or row[0] != "running":
        return LeaseLost(f"migration task {lease.task_id} was closed", run_over=True)
    if not row[1]:
        return LeaseLost(f"migration task {lease.task_id} no longer holds the migration lock")
    if row[2] != lease.token:
        return LeaseLost(f"shard {lease.shard_no} was taken over by {row[3] or 'another worker'}")
    return LeaseLost(f"shard {lease.shard_no} is {row[4]}")


def heartbeat(conn, leases):
    """Refresh the heartbeat of every lease still good; the shard numbers refreshed."""
    if not leases:
        return set()
    rows = conn.execute(
        f"""WITH locked AS (SELECT shard_no FROM objmig_shards
                            WHERE task_id = %(task_id)s AND state = 'running'
                              AND (shard_no, lease) IN (SELECT * FROM unnest(%(shards)s::int[], %(leases)s::bigint[]))
                            ORDER BY shard_no FOR UPDATE)  -- in shard order, as close_run locks them
            UPDATE objmig_shards s SET heartbeat = now()
            FROM locked, objmig_runs r
            WHERE s.task_id = %(task_id)s AND s.shard_no = locked.shard_no AND s.state = 'running'
              AND r.task_id = s.task_id AND r.state = 'running' AND {LOCK_HELD}
            RETURNING s.shard_no""",
        {"task_id": leases[0].task_id, "shards": [lease.shard_no for lease in leases],
         "leases": [lease.token for lease in leases]},
    ).fetchall()
    return {row[0] for row in rows}


def count_moved(conn, lease, documents, nbytes):
    """Inside the fenced metadata commit: the documents it moved count for
    the shard and the task in the same transaction, so none goes uncounted."""
    from anchore_objmig import tasks

    if not documents:
        return
    conn.execute(
        """UPDATE objmig_shards SET documents_done = documents_done + %s, bytes_done = bytes_done + %s
           WHERE task_id = %s AND shard_no = %s""",
        (documents, nbytes, lease.task_id, lease.shard_no),
    )
    tasks.add_migrated(conn, lease.task_id, documents)


def record_batch(conn, lease, failures, leftovers=(), deleted=()):
    """After a batch landed: store its failures and forget the pending deletes
    done, in one fenced transaction (LeaseLost: nothing recorded).

    `failures` are (DocRow, reason) of documents left at their source;
    `leftovers` (DocRow, reason) of documents moved whose old copy could not
    be deleted; `deleted` the old URLs now gone, whose pending deletes are done.
    """
    extra = ", documents_failed = s.documents_failed + %(failed)s"
    with db.transaction(conn):
        params = lease.params(failed=len(failures))
        if conn.execute(FENCE.format(extra=extra), params).fetchone() is None:
            raise lost_lease(conn, lease)
        if deleted:
            forget_pending_deletes(conn, deleted)
        rows = [(row, error, "document") for row, error in failures]
        rows += [(row, error, "source-copy") for row, error in leftovers]
        if rows:
            with conn.cursor() as cur:
                cur.executemany(
                    """INSERT INTO objmig_failures (task_id, bucket, user_id, archive_id, content_url, kind, error)
                       VALUES (%s, %s, %s, %s, %s, %s, %s)""",
                    [
                        (lease.task_id, row.bucket, row.user_id, row.archive_id, row.content_url, kind, error)
                        for row, error, kind in rows
                    ],
                )


def finish_shard(conn, lease, state, error=None):
    """Mark the leased shard done or failed; LeaseLost if the lease is gone."""
    with db.transaction(conn):
        confirm_lease(conn, lease)
        conn.execute(
            "UPDATE objmig_shards SET state = %s, error = %s WHERE task_id = %s AND shard_no = %s",
            (state, error, lease.task_id, lease.shard_no),
        )


def give_back(conn, lease, error, max_attempts=None):
    """Return the leased shard to pending, for another worker or a later try.

    With `max_attempts`, the try counts against the shard, which fails once it
    has used them all. Only the lease holder can give a shard back, and only
    once its writes are over. The new state, or None if the lease was gone.
    """
    counted = max_attempts is not None
    row = conn.execute(
        """UPDATE objmig_shards
           SET attempts = attempts + %(add)s, worker = NULL, error = %(error)s,
               state = CASE WHEN %(counted)s AND attempts + 1 >= %(max)s THEN 'failed' ELSE 'pending' END
           WHERE task_id = %(task_id)s AND shard_no = %(shard_no)s AND lease = %(lease)s AND state = 'running'
           RETURNING state""",
        lease.params(add=1 if counted else 0, error=error, counted=counted, max=max_attempts or 0),
    ).fetchone()
    return row[0] if row else None


def give_back_dead_workers(conn, task_id, workers, max_attempts, error):
    """Shards still held by these worker processes, which have exited: pending
    again (their writes ended with them). With `max_attempts` the try counts
    against the shard; None (an operator's stop) does not count."""
    counted = max_attempts is not None
    rows = conn.execute(
        """UPDATE objmig_shards
           SET attempts = attempts + %(add)s, worker = NULL, error = %(error)s,
               state = CASE WHEN %(counted)s AND attempts + 1 >= %(max)s THEN 'failed' ELSE 'pending' END
           WHERE task_id = %(task_id)s AND state = 'running' AND worker = ANY(%(workers)s::text[])
           RETURNING shard_no""",
        {"add": 1 if counted else 0, "error": error, "counted": counted, "max": max_attempts or 0,
         "task_id": task_id, "workers": list(workers)},
    ).fetchall()
    return [row[0] for row in rows]


def revoked_holders(conn):
    """(task_id, worker, seconds since its heartbeat, takeover seconds) of shards
    revoked by a run's close while their worker may still have writes in the air."""
    if not has_schema(conn):
        return []
    return conn.execute(
        """SELECT s.task_id, s.worker, extract(epoch FROM now() - s.heartbeat)::float,
                  r.lease_seconds + r.write_grace_seconds
           FROM objmig_shards s JOIN objmig_runs r ON r.task_id = s.task_id
           WHERE s.state = 'revoked'
             AND s.heartbeat > now() - make_interval(secs => r.lease_seconds + r.write_grace_seconds)
           ORDER BY s.task_id, s.shard_no"""
    ).fetchall()


def live_holders(conn, task_id):
    """(worker, host, seconds since its heartbeat) of the run's running shards."""
    return conn.execute(
        """SELECT worker, host, extract(epoch FROM now() - heartbeat)::float
           FROM objmig_shards WHERE task_id = %s AND state = 'running' ORDER BY shard_no""",
        (task_id,),
    ).fetchall()


SILENT_HOLDERS = """
    SELECT DISTINCT s.worker, split_part(s.worker, ':', 1) || ':' || split_part(s.worker, ':', 2) AS host_pid
    FROM objmig_shards s JOIN objmig_runs r ON r.task_id = s.task_id
    WHERE s.task_id = %(task_id)s AND s.state = 'running' AND s.worker IS NOT NULL
      AND s.heartbeat < now() - make_interval(secs => r.lease_seconds + r.write_grace_seconds)"""


def silent_holders(conn, task_id):
    """Workers holding shards of the run that have not confirmed them for
    longer than the run's takeover time."""
    return [row[0] for row in conn.execute(SILENT_HOLDERS, {"task_id": task_id})]


def cut_off_silent_holders(conn, task_id):
    """End the database sessions of workers silent past the run's takeover
    time that are still inside a transaction: a process frozen in the middle
    of a COPY holds its shard row's lock, which no timeout ends (the session
    waits on the client, so it is not "idle in transaction") and which hides
    the shard from every claim (SKIP LOCKED). Such a worker's lease is gone
    already; this only frees what it holds. The names of its sessions are
    db.session_name's. [(worker, backend pid)] of the sessions ended."""
    return conn.execute(
        f"""WITH silent AS ({SILENT_HOLDERS}),
           targets AS MATERIALIZED (
               SELECT silent.worker, a.pid
               FROM silent JOIN pg_stat_activity a
                 ON a.application_name IN (left(%(name)s || ' worker ' || silent.host_pid, 63),
                                           left(%(name)s || ' reader ' || silent.host_pid, 63))
               WHERE a.pid <> pg_backend_pid() AND a.xact_start IS NOT NULL)
           SELECT worker, pid FROM targets WHERE pg_terminate_backend(pid)""",
        {"task_id": task_id, "name": db.APPLICATION_NAME},
    ).fetchall()


def shard_counts(conn, task_id):
    """(pending, running) shards of the run."""
    return conn.execute(
        """SELECT count(*) FILTER (WHERE state = 'pending'), count(*) FILTER (WHERE state = 'running')
           FROM objmig_shards WHERE task_id = %s""",
        (task_id,),
    ).fetchone()


# -- the delete journal -----------------------------------------------------
def note_pending_deletes(conn, task_id, urls):
    """Inside the metadata commit's transaction: these old copies are to go."""
    conn.execute(
        """INSERT INTO objmig_pending_deletes (url, task_id) SELECT u, %s FROM json_array_elements_text(%s::json) AS u
           ON CONFLICT (url) DO UPDATE SET task_id = EXCLUDED.task_id, at = now()""",
        (task_id, db.json_list(urls)),
    )


def pending_deletes(conn, location, limit=1000):
    """Old copies under `location` still to delete, that no metadata row points at."""
    return [
        row[0]
        for row in conn.execute(
            """SELECT p.url FROM objmig_pending_deletes p
               WHERE starts_with(p.url, %s)
                 AND NOT EXISTS (SELECT 1 FROM archive_metadata m WHERE m.content_url = p.url)
               ORDER BY p.url LIMIT %s""",
            (location, limit),
        )
    ]


def note_orphaned_copies(conn, location):
    """Old copies a deleting run moved away from that nothing references but
    that are not in the delete journal: a crash between a commit and the second
    look at a copy two rows shared leaves one so. Into the journal with them.
    (Copies a --nodelete run kept are not touched: those are for `cleanup`.)"""
    if not has_schema(conn) or not conn.execute("SELECT to_regclass('objmig_moved') IS NOT NULL").fetchone()[0]:
        return 0
    return conn.execute(
        """INSERT INTO objmig_pending_deletes (url, task_id)
           SELECT p.url, p.task_id FROM objmig_moved p
           JOIN objmig_runs r ON r.task_id = p.task_id AND coalesce((r.manifest ->> 'delete_source')::boolean, false)
           WHERE starts_with(p.url, %s)
             AND NOT EXISTS (SELECT 1 FROM archive_metadata m WHERE m.content_url = p.url)
           ON CONFLICT (url) DO NOTHING""",
        (location,),
    ).rowcount


def forget_pending_deletes(conn, urls):
    """No copy awaits deletion at these URLs any more (deleted, or written anew)."""
    urls = db.json_list(urls)
    conn.execute(f"DELETE FROM objmig_pending_deletes WHERE url = ANY({db.TEXT_LIST.format('%s')})", (urls,))
    conn.execute(f"DELETE FROM objmig_moved WHERE url = ANY({db.TEXT_LIST.format('%s')})", (urls,))


def note_moved(conn, task_id, rows):
    """Inside the metadata commit's transaction: the old copies of these
    DocRows are what this run moved away from (see cleanup.py)."""
    rows = list({row.content_url: row for row in rows}.values())  # rows sharing one copy: it is noted once
    if rows:
        conn.execute(
            """INSERT INTO objmig_moved (url, task_id, bucket, size)
               SELECT e->>0, %s, e->>1, (e->>2)::bigint FROM json_array_elements(%s::json) AS e
               ON CONFLICT (url) DO UPDATE SET task_id = EXCLUDED.task_id, bucket = EXCLUDED.bucket,
                                               size = EXCLUDED.size, at = now()""",
            (task_id, db.json_list((r.content_url, r.bucket, r.size) for r in rows)),
        )


# -- reports ----------------------------------------------------------------
def totals(conn, task_id):
    row = conn.execute(
        """SELECT coalesce(sum(documents), 0), coalesce(sum(bytes), 0), coalesce(sum(documents_done), 0),
                  coalesce(sum(bytes_done), 0), coalesce(sum(documents_failed), 0), count(*),
                  count(*) FILTER (WHERE state = 'done'), count(*) FILTER (WHERE state = 'failed')
           FROM objmig_shards WHERE task_id = %s""",
        (task_id,),
    ).fetchone()
    return Totals(*(int(value) for value in row))


def failures(conn, task_id, kind="document"):
    """(user_id, bucket, archive_id, content_url, error) of a run's failures of one kind."""
    # A document that failed once but moved when its shard was retried is not
    # a failure of the run: only those whose metadata still points where they
    # failed count.
    still_there = {
        "document": """AND EXISTS (SELECT 1 FROM archive_metadata m WHERE m.bucket = f.bucket
                                   AND m."userId" = f.user_id AND m."archiveId" = f.archive_id
                                   AND m.content_url = f.content_url)""",
        # an old copy left behind counts only while it is still to be deleted
        "source-copy": "AND EXISTS (SELECT 1 FROM objmig_pending_deletes p WHERE p.url = f.content_url)",
    }.get(kind, "")
    return conn.execute(
        f"""SELECT DISTINCT user_id, bucket, archive_id, content_url, error FROM objmig_failures f
            WHERE task_id = %s AND kind = %s {still_there} ORDER BY bucket, user_id, archive_id""",
        (task_id, kind),
    ).fetchall()


def resolved_failures(conn, task_id):
    """How many document failures of the run were resolved later (by a retry)."""
    everything = conn.execute(
        """SELECT count(*) FROM (SELECT DISTINCT user_id, bucket, archive_id, content_url, error
                                 FROM objmig_failures WHERE task_id = %s AND kind = 'document') f""",
        (task_id,),
    ).fetchone()[0]
    return everything - len(failures(conn, task_id, "document"))


def failed_shards(conn, task_id):
    """(shard_no, label, error) of the run's shards not done."""
    rows = conn.execute(
        """SELECT shard_no, lower_key, upper_key, error FROM objmig_shards
           WHERE task_id = %s AND state <> 'done' ORDER BY shard_no""",
        (task_id,),
    ).fetchall()
    return [(shard_no, Shard(shard_no, tuple(lower) if lower else None, tuple(upper) if upper else None, 0, 0).label,
             error) for shard_no, lower, upper, error in rows]
