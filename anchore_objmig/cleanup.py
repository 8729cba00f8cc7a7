"""The `cleanup` command: remove the old copies a `migrate --nodelete` left.

A copy at the configured location is deleted only when both hold, checked
in the database in the same transaction, right before its delete:

* a recorded run moved it: its URL is in objmig_moved, written in the very
  transaction that pointed the document's metadata row elsewhere, by a run
  whose source was this location (objmig_runs);
* no archive_metadata row references it.

Everything else there (documents still in use, copies moved by another tool
or by a version before this table existed, strays) is never touched: what
cannot be proved moved stays. The command takes Anchore's migration lock, so
no migration can point a row back at a copy while it deletes.
"""

import logging
from dataclasses import dataclass

import orjson

from psycopg import sql

from anchore_objmig import db, prompt
from anchore_objmig.config import load_store_config
from anchore_objmig.display import human_bytes
from anchore_objmig.drivers import DriverContext, make_driver
from anchore_objmig.errors import EXIT_FAILED, EXIT_OK, ObjmigError

log = logging.getLogger(__name__)

BATCH = 1000  # copies per delete call and transaction
NAMED_LEFT = 200  # at most this many copies that could not be deleted named on stderr

# Copies at a location that a recorded run moved away from and nothing references.
CANDIDATES = """
FROM objmig_moved p
JOIN objmig_runs r ON r.task_id = p.task_id AND r.source_location = {location}
                    AND r.manifest -> 'source' @> {identity}
WHERE starts_with(p.url, {location}) {buckets}
  AND NOT EXISTS (SELECT 1 FROM archive_metadata m WHERE m.content_url = p.url)
"""


@dataclass(frozen=True)
class CleanupOptions:
    config: str
    analysis_archive: bool = False
    buckets: tuple = ()
    ask: bool = True
    dry_run: bool = False
    io_threads: int = 32


def candidates(driver, buckets):
    """Copies the run moved away from this very place: the same location and,
    for S3, the same server (its manifest's endpoint and addressing): another
    server can hold the same bucket name and keys."""
    bucket_filter = sql.SQL("AND p.bucket = ANY({})").format(sql.Literal(list(buckets))) if buckets else sql.SQL("")
    identity = sql.SQL("{}::jsonb").format(sql.Literal(orjson.dumps(driver.identity()).decode()))
    return sql.SQL(CANDIDATES).format(location=sql.Literal(driver.location), identity=identity, buckets=bucket_filter)


def recorded(conn):
    """Whether any run of this version ever recorded a move here."""
    return conn.execute("SELECT to_regclass('objmig_moved') IS NOT NULL AND to_regclass('objmig_runs') IS NOT NULL").fetchone()[0]


def summarize(conn, where):
    """(copies, their known stored bytes, copies whose size is unknown)."""
    row = conn.execute(sql.SQL("SELECT count(*), coalesce(sum(p.size), 0), count(*) - count(p.size) {}").format(where)).fetchone()
    return tuple(int(value) for value in row)


def describe(copies, nbytes, unknown):
    text = f"{copies} old copies ({human_bytes(nbytes)} stored"
    return text + (f"; the size of {unknown} is not recorded)" if unknown else ")")


def run(options, db_settings):
    store = load_store_config(options.config, options.analysis_archive)
    context = DriverContext(db_settings, options.io_threads)
    driver = make_driver(store, context)
    try:
        conn = context.db_connection()
        db.require_anchore_tables(conn)
        if not recorded(conn):
            print(f"nothing to clean up in {driver.describe()}: no migration has been recorded in this database")
            return EXIT_OK
        if not options.dry_run and not db.try_migration_lock(conn):
            raise ObjmigError("another migration is running: it holds the migration lock pg_advisory_lock(2, 1); "
                              "run cleanup after it has finished")
        where = candidates(driver, options.buckets)
        copies, nbytes, unknown = summarize(conn, where)
        found = f"{describe(copies, nbytes, unknown)} in {driver.describe()} that a recorded migration moved " \
                "and no metadata row references"
        if options.dry_run or not copies:
            print(f"{'dry run: ' if options.dry_run else ''}{found}; nothing was changed")
            return EXIT_OK
        driver.check_access(write=True, create=False)
        if options.ask:
            prompt.ask_to_proceed(f"About to delete {found}.", "cleanup cancelled; nothing was changed")
        deleted, freed, left = delete_all(conn, driver, where)
        print(f"deleted {deleted} old copies from {driver.describe()}: {human_bytes(freed)} freed")
        for url, error in left[:NAMED_LEFT]:
            log.warning("LEFT %s: %s", url, error)
        if left:
            log.error("%d old copies could not be deleted (named above); run cleanup again to retry", len(left))
            return EXIT_FAILED
        return EXIT_OK
    finally:
        driver.close()
        context.close()


def delete_all(conn, driver, where):
    """Delete every candidate, a batch at a time; (deleted, bytes freed, [(url, error)] left)."""
    deleted = freed = 0
    left = []
    after = ""
    while True:
        # Each batch is chosen again, in the database, right before its delete:
        # a row that came to reference a copy since the prompt saves that copy.
        with db.transaction(conn):
            rows = conn.execute(
                sql.SQL("SELECT p.url, p.size {} AND p.url > %s ORDER BY p.url LIMIT %s FOR UPDATE OF p").format(where),
                (after, BATCH),
            ).fetchall()
            if not rows:
                return deleted, freed, left
            urls = [url for url, _ in rows]
            try:
                errors = driver.delete_many(urls)
            except Exception as exc:
                errors = {url: exc for url in urls}
            gone = [(url, size) for url, size in rows if url not in errors]
            conn.execute("DELETE FROM objmig_moved WHERE url = ANY(%s::text[])", ([url for url, _ in gone],))
        deleted += len(gone)
        freed += sum(size or 0 for _, size in gone)
        left += [(url, errors[url]) for url in urls if url in errors]
        after = urls[-1]
