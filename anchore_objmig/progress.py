"""The tool's own coordination tables: runs, their shards, failed documents.

They live beside Anchore's tables in the catalog database (every install has
it), are created on first use, and are never read by Anchore:

objmig_runs      one row per migration run (= its Anchore task id): the source
                 and destination locations, so `--join` can find the run.
objmig_shards    one row per shard: state pending/running/done/failed, counts
                 done, which worker on which host holds it, its heartbeat.
                 Workers claim shards with FOR UPDATE SKIP LOCKED, so any
                 number of processes on any number of hosts can share a run.
objmig_failures  every document that could not be moved, with the reason.
objmig_pending_deletes
                 old copies to delete, written in the same transaction that
                 points the metadata elsewhere; a crash before the delete
                 leaves the intent here, and the next run finishes it.
objmig_moved     the old URL of every document a run moved, written in the
                 same transaction, forgotten once that copy is deleted (or a
                 document is moved back onto it): the proof `cleanup` needs
                 before it removes a copy a --nodelete run left behind.
"""

import socket
from dataclasses import dataclass

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
"""

# One creator at a time: CREATE TABLE IF NOT EXISTS races with itself.
SCHEMA_LOCK = (2, 2)


@dataclass(frozen=True)
class RunRow:
    task_id: int
    source_location: str
    dest_location: str
    buckets: list | None
    state: str


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
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", SCHEMA_LOCK)
        conn.execute(SCHEMA)


def create_run(conn, task_id, source_location, dest_location, buckets, shards):
    with conn.transaction():
        conn.execute(
            """INSERT INTO objmig_runs (task_id, source_location, dest_location, buckets, documents, bytes)
               VALUES (%s, %s, %s, %s, %s, %s)""",
            (
                task_id,
                source_location,
                dest_location,
                list(buckets) if buckets else None,
                sum(s.documents for s in shards),
                sum(s.bytes for s in shards),
            ),
        )
        with conn.cursor() as cur:
            cur.executemany(
                """INSERT INTO objmig_shards (task_id, shard_no, bucket, user_id, lower_id, upper_id, documents, bytes)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s)""",
                [(task_id, s.shard_no, s.bucket, s.user_id, s.lower, s.upper, s.documents, s.bytes) for s in shards],
            )


def running_runs(conn, source_location=None, dest_location=None):
    """Runs still marked running, optionally only those between two locations."""
    if not conn.execute("SELECT to_regclass('objmig_runs') IS NOT NULL").fetchone()[0]:
        return []  # no run ever started in this database
    query = "SELECT task_id, source_location, dest_location, buckets, state FROM objmig_runs WHERE state = 'running'"
    params = []
    if source_location is not None:
        query += " AND source_location = %s AND dest_location = %s"
        params += [source_location, dest_location]
    return [RunRow(*row) for row in conn.execute(query + " ORDER BY task_id", params)]


def finish_run(conn, task_id, state):
    """Close a run; shards nobody finished can no longer be claimed."""
    with conn.transaction():
        conn.execute("UPDATE objmig_runs SET state = %s, updated_at = now() WHERE task_id = %s", (state, task_id))
        conn.execute(
            "UPDATE objmig_shards SET state = 'failed', error = 'run closed' WHERE task_id = %s AND state = 'pending'",
            (task_id,),
        )


def claim_shard(conn, task_id, worker):
    """Take the next pending shard of the run, or None when none is left."""
    with conn.transaction():
        row = conn.execute(
            """UPDATE objmig_shards s SET state = 'running', worker = %s, host = %s, heartbeat = now()
               FROM (SELECT task_id, shard_no FROM objmig_shards
                     WHERE task_id = %s AND state = 'pending'
                       AND EXISTS (SELECT 1 FROM objmig_runs r WHERE r.task_id = objmig_shards.task_id
                                   AND r.state = 'running')
                     ORDER BY shard_no LIMIT 1 FOR UPDATE SKIP LOCKED) next
               WHERE s.task_id = next.task_id AND s.shard_no = next.shard_no
               RETURNING s.shard_no, s.bucket, s.user_id, s.lower_id, s.upper_id, s.documents, s.bytes""",
            (worker, socket.gethostname(), task_id),
        ).fetchone()
    return Shard(*row) if row else None


def record_batch(conn, task_id, shard_no, documents, nbytes, failures, leftovers=(), deleted=()):
    """Add a finished batch's counts to its shard and store its failures.

    `failures` are (DocRow, reason) of documents left at their source;
    `leftovers` (DocRow, reason) of documents moved whose old copy could not
    be deleted; `deleted` the old URLs now gone, whose pending deletes are done.
    """
    with conn.transaction():
        if deleted:
            forget_pending_deletes(conn, deleted)
        conn.execute(
            """UPDATE objmig_shards SET documents_done = documents_done + %s, bytes_done = bytes_done + %s,
                      documents_failed = documents_failed + %s, heartbeat = now()
               WHERE task_id = %s AND shard_no = %s""",
            (documents, nbytes, len(failures), task_id, shard_no),
        )
        rows = [(row, error, "document") for row, error in failures]
        rows += [(row, error, "source-copy") for row, error in leftovers]
        if rows:
            with conn.cursor() as cur:
                cur.executemany(
                    """INSERT INTO objmig_failures (task_id, bucket, user_id, archive_id, content_url, kind, error)
                       VALUES (%s, %s, %s, %s, %s, %s, %s)""",
                    [
                        (task_id, row.bucket, row.user_id, row.archive_id, row.content_url, kind, error)
                        for row, error, kind in rows
                    ],
                )


def note_pending_deletes(conn, task_id, urls):
    """Inside the metadata commit's transaction: these old copies are to go."""
    conn.execute(
        """INSERT INTO objmig_pending_deletes (url, task_id) SELECT u, %s FROM unnest(%s::text[]) AS u
           ON CONFLICT (url) DO UPDATE SET task_id = EXCLUDED.task_id, at = now()""",
        (task_id, list(urls)),
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


def forget_pending_deletes(conn, urls):
    """No copy awaits deletion at these URLs any more (deleted, or written anew)."""
    conn.execute("DELETE FROM objmig_pending_deletes WHERE url = ANY(%s::text[])", (list(urls),))
    conn.execute("DELETE FROM objmig_moved WHERE url = ANY(%s::text[])", (list(urls),))


def note_moved(conn, task_id, rows):
    """Inside the metadata commit's transaction: the old copies of these
    DocRows are what this run moved away from (see cleanup.py)."""
    if rows:
        conn.execute(
            """INSERT INTO objmig_moved (url, task_id, bucket, size)
               SELECT u, %s, b, s FROM unnest(%s::text[], %s::text[], %s::bigint[]) AS v(u, b, s)
               ON CONFLICT (url) DO UPDATE SET task_id = EXCLUDED.task_id, bucket = EXCLUDED.bucket,
                                               size = EXCLUDED.size, at = now()""",
            (task_id, [r.content_url for r in rows], [r.bucket for r in rows], [r.size for r in rows]),
        )


def give_back_shard(conn, task_id, shard_no, max_attempts, error):
    """A worker lost its way (e.g. its connection): the shard goes back to
    pending for another try, or fails after `max_attempts`."""
    row = conn.execute(
        """UPDATE objmig_shards
           SET attempts = attempts + 1, worker = NULL, error = %s,
               state = CASE WHEN attempts + 1 >= %s THEN 'failed' ELSE 'pending' END
           WHERE task_id = %s AND shard_no = %s RETURNING state""",
        (error, max_attempts, task_id, shard_no),
    ).fetchone()
    return row[0] if row else None


def running_shards_of(conn, task_id, workers):
    """Shards of the run still marked running by any of these workers."""
    rows = conn.execute(
        "SELECT shard_no FROM objmig_shards WHERE task_id = %s AND state = 'running' AND worker = ANY(%s::text[])",
        (task_id, list(workers)),
    )
    return [row[0] for row in rows]


def finish_shard(conn, task_id, shard_no, state, error=None):
    conn.execute(
        "UPDATE objmig_shards SET state = %s, error = %s, heartbeat = now() WHERE task_id = %s AND shard_no = %s",
        (state, error, task_id, shard_no),
    )


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
    still_there = (
        """AND EXISTS (SELECT 1 FROM archive_metadata m WHERE m.bucket = f.bucket AND m."userId" = f.user_id
                          AND m."archiveId" = f.archive_id AND m.content_url = f.content_url)"""
        if kind == "document" else ""
    )
    return conn.execute(
        f"""SELECT DISTINCT user_id, bucket, archive_id, content_url, error FROM objmig_failures f
            WHERE task_id = %s AND kind = %s {still_there} ORDER BY bucket, user_id, archive_id""",
        (task_id, kind),
    ).fetchall()


def failed_shards(conn, task_id):
    return conn.execute(
        "SELECT shard_no, bucket, user_id, error FROM objmig_shards WHERE task_id = %s AND state <> 'done' ORDER BY shard_no",
        (task_id,),
    ).fetchall()
