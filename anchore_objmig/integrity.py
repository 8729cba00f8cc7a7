"""What a run knows about each document's integrity, and says about it.

- Why a document was not moved, in words that stay true: a document is
  "still at the source and readable" only when its read succeeded and
  something later (the write, a changed row) stopped it.
- Which stored copies no other metadata row points at, so they may go.
- Which moved documents had nothing to check them against ("unverifiable":
  no digest, no size and no MD5 ETag), so the report can name them.
"""

import logging

from anchore_objmig import db

log = logging.getLogger(__name__)

# The first words of a failure's reason: they say what state the document is in.
MISSING = "missing at the source"
CORRUPT = "corrupt at the source"
UNREADABLE = "unreadable at the source"
UNVERIFIABLE_KIND = "unverifiable"  # objmig_failures.kind of moved, unverifiable documents
NAMED = 200  # at most this many unverifiable documents named

UNREFERENCED = f"""
SELECT DISTINCT u FROM json_array_elements_text(%s::json) AS u
 WHERE u NOT IN (SELECT m.content_url FROM archive_metadata m WHERE m.content_url = ANY({db.TEXT_LIST.format('%s')}))
"""

# archive_metadata has no index on content_url (and the tool adds none to
# Anchore's tables), so the exact check above reads the whole table: 240 ms
# per batch at 1,000,000 rows. The run notes the shared copies once, with
# one scan at its start, and checks only those exactly.
NOTE_SHARED = """
INSERT INTO objmig_shared_copies (task_id, url)
SELECT %s, content_url FROM archive_metadata WHERE content_url IS NOT NULL
 GROUP BY content_url HAVING count(*) > 1
"""


def note_shared_copies(conn, task_id):
    """At the start of a deleting run: the stored copies more than one metadata row points at."""
    conn.execute(NOTE_SHARED, (task_id,))


def unreferenced(conn, urls, task_id=None):
    """The URLs among `urls` that no archive_metadata row points at (now, in
    the caller's transaction): the stored copies nobody needs any more.

    With `task_id`, the URLs the run found unshared at its start are taken as
    unreferenced once their one row has moved (Anchore is stopped during a
    migration: no new row points at an old copy), and only the shared ones
    are looked up in archive_metadata.
    """
    urls = set(urls)
    if not urls:
        return set()
    if task_id is not None:
        shared = {row[0] for row in conn.execute(
            f"SELECT url FROM objmig_shared_copies WHERE task_id = %s AND url = ANY({db.TEXT_LIST.format('%s')})",
            (task_id, db.json_list(urls)))}
        return (urls - shared) | unreferenced(conn, shared)
    listed = db.json_list(urls)
    return {row[0] for row in conn.execute(UNREFERENCED, (listed, listed))}


def record_unverifiable(conn, task_id, rows):
    """Note moved documents that had no digest, no size and no MD5 ETag."""
    if not rows:
        return
    with db.transaction(conn), conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO objmig_failures (task_id, bucket, user_id, archive_id, content_url, kind, error)
               VALUES (%s, %s, %s, %s, %s, %s, %s)""",
            [(task_id, row.bucket, row.user_id, row.archive_id, row.content_url, UNVERIFIABLE_KIND,
              "no digest, size or MD5 ETag to check the bytes read against; moved as read")
             for row in rows],
        )


def unverifiable(conn, task_id):
    """(user_id, bucket, archive_id, old content_url) of the run's moved unverifiable documents."""
    return conn.execute(
        """SELECT DISTINCT user_id, bucket, archive_id, content_url FROM objmig_failures
           WHERE task_id = %s AND kind = %s ORDER BY bucket, user_id, archive_id""",
        (task_id, UNVERIFIABLE_KIND),
    ).fetchall()


def report_unverifiable(conn, task_id):
    rows = unverifiable(conn, task_id)
    for user_id, bucket, archive_id, url in rows[:NAMED]:
        log.warning("UNVERIFIABLE %s/%s/%s (was %s): moved as read; its metadata now has the digest and size "
                    "of those bytes", user_id, bucket, archive_id, url)
    if len(rows) > NAMED:
        log.warning("... and %d more unverifiable documents (table objmig_failures, kind unverifiable, task_id %d)",
                    len(rows) - NAMED, task_id)
    if rows:
        log.warning("%d moved documents were unverifiable (no digest, size or MD5 ETag at the source): check "
                    "them with Anchore if in doubt", len(rows))
    return len(rows)


def explain_failures(task_id, failed, unfinished_shards):
    """The closing lines of a failed run: what state the documents named are
    in and what to do, each claim true of the documents it is made of."""
    kinds = {MISSING: 0, CORRUPT: 0, UNREADABLE: 0, None: 0}
    for *_, error in failed:
        kind = next((k for k in (MISSING, CORRUPT, UNREADABLE) if (error or "").startswith(k)), None)
        kinds[kind] += 1
    lines = []
    if kinds[None]:
        lines.append(f"{kinds[None]} documents named above were read but not moved: they are still at the source "
                     "and readable; fix the cause and run the same command again to move them")
    if kinds[MISSING]:
        lines.append(f"{kinds[MISSING]} documents named above are missing at the source: their metadata rows point "
                     "at nothing, so Anchore cannot read them either; restore them from a backup, or delete their "
                     "archive_metadata rows if they are no longer needed")
    if kinds[CORRUPT]:
        lines.append(f"{kinds[CORRUPT]} documents named above are corrupt at the source (digest or size mismatch, "
                     "bad zlib or base64): Anchore would refuse them too; restore them from a backup")
    if kinds[UNREADABLE]:
        lines.append(f"{kinds[UNREADABLE]} documents named above could not be read at the source (their rows are "
                     "unchanged): check the source backend, then run the same command again")
    if unfinished_shards:
        lines.append(f"{len(unfinished_shards)} shards named above did not finish: the documents they had not "
                     "moved are untouched; run the same command again")
    for line in lines:
        log.error("migration task %d: %s", task_id, line)
