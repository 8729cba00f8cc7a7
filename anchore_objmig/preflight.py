"""Checks before a migration moves anything: the mistakes that would otherwise
end `complete` with nothing moved, or move the wrong documents.

Every refusal is a UsageError (exit 2, nothing changed) in one line.
"""

import logging
import os

from psycopg import sql

from anchore_objmig.errors import UsageError

log = logging.getLogger(__name__)

# Loose index scan over the primary key (bucket first): one index probe per
# distinct bucket instead of reading every row.
DISTINCT_BUCKETS = """
WITH RECURSIVE b AS (
    (SELECT bucket FROM archive_metadata ORDER BY bucket LIMIT 1)
    UNION ALL
    SELECT (SELECT m.bucket FROM archive_metadata m WHERE m.bucket > b.bucket ORDER BY m.bucket LIMIT 1)
    FROM b WHERE b.bucket IS NOT NULL
)
SELECT bucket FROM b WHERE bucket IS NOT NULL"""

# Where a document is, as the operator would name it in a config: the driver,
# the S3 bucket, or the localfs directory (file URLs end in four parts:
# md5(user)/bucket/xx/md5(id).json).
LOCATION_OF_URL = sql.SQL("""CASE
    WHEN m.content_url IS NULL THEN '(no content_url)'
    WHEN starts_with(m.content_url, 's3://') THEN 's3://' || split_part(m.content_url, '/', 3) || '/'
    WHEN starts_with(m.content_url, 'file://') THEN regexp_replace(m.content_url, '(/[^/]*){4}$', '/')
    WHEN position('://' in m.content_url) > 0 THEN split_part(m.content_url, '://', 1) || '://'
    ELSE '(other)' END""")

ANALYSIS_NOTE = (
    "--to-analysis-archive without --bucket analysis_archive: EVERY logical bucket at the source (the whole "
    "main store, not only the analysis archive) goes into TO_CONFIG's analysis_archive store; the usual "
    "command is --to-analysis-archive --bucket analysis_archive"
)


def analysis_archive_note(options):
    """A warning for the plan and the prompt when --to-analysis-archive would move
    every bucket; refused outright when nobody is asked."""
    if options.all_buckets and options.buckets:
        raise UsageError("--all-buckets and --bucket contradict each other: give one of them")
    # From the analysis archive to another one, everything there is archive data already.
    if not options.to_analysis_archive or options.from_analysis_archive or options.buckets:
        return ""
    if options.all_buckets:
        log.info("--to-analysis-archive --all-buckets: every logical bucket goes into the analysis_archive store")
        return ""
    if not options.ask and not options.dry_run and not options.join:
        raise UsageError(ANALYSIS_NOTE + "; with --dontask this is refused: add --bucket analysis_archive, "
                         "or --all-buckets if you really mean every bucket")
    log.warning("%s", ANALYSIS_NOTE)
    return ANALYSIS_NOTE


SHARED_NOTE = (
    "--from-analysis-archive without --bucket analysis_archive, and FROM_CONFIG's analysis_archive and "
    "object_store sections keep their documents at the same place ({where}): EVERY logical bucket there (the "
    "main store too) would move; the usual command adds --bucket analysis_archive"
)


def shared_archive_note(options, source, main_location):
    """The same warning and refusal as analysis_archive_note, for a move out
    of an analysis archive that shares its location with the main store:
    the source location then holds the main store's documents too.
    `main_location()` gives the main store's location (read only if needed)."""
    if not options.from_analysis_archive or options.buckets or options.all_buckets:
        return ""
    if main_location() != source.location:
        return ""
    note = SHARED_NOTE.format(where=source.describe())
    if not options.ask and not options.dry_run and not options.join:
        raise UsageError(note + "; with --dontask this is refused: add --bucket analysis_archive, "
                         "or --all-buckets if you really mean every bucket")
    log.warning("%s", note)
    return note


def check_overlap(source, dest):
    """Refuse locations where one contains the other.

    Anchore's S3 keys are {prefix}{userId}/... with no separator: with prefixes
    "" and "anchore" in one bucket, admin's documents would land on the keys of
    an account named "anchoreadmin". Nested localfs directories mix the same way.
    """
    if source.name == "s3" and dest.name == "s3":
        if endpoint_of(source) == endpoint_of(dest) and source.bucket == dest.bucket:
            a, b = source.prefix, dest.prefix
            if a.startswith(b) or b.startswith(a):
                raise UsageError(
                    f"source and destination overlap: both in S3 bucket {source.bucket!r} with prefixes "
                    f"{a!r} and {b!r}, and one begins with the other (Anchore's keys are {{prefix}}{{user}}/... "
                    "with no separator, so documents would collide); use prefixes where neither begins with "
                    "the other, or another bucket"
                )
    if source.name == "localfs" and dest.name == "localfs":
        a, b = os.path.realpath(source.directory), os.path.realpath(dest.directory)
        if os.path.commonpath([a, b]) in (a, b):
            raise UsageError(
                f"source and destination overlap: localfs directory {a} and {b} are nested; "
                "use two directories where neither is inside the other"
            )


def endpoint_of(driver):
    """The S3 server a driver talks to; no url means AWS, whose bucket names are global."""
    url = driver.endpoint
    return url.strip().rstrip("/").lower() if isinstance(url, str) and url.strip() else None


def check_selection(conn, source, dest, buckets, allow_empty, source_store):
    """Refuse a run that would move nothing because of a typo: an unknown --bucket,
    or a source location that holds none of the selected documents."""
    if allow_empty:
        return
    if buckets:
        existing = [row[0] for row in conn.execute(DISTINCT_BUCKETS)]
        for bucket in buckets:
            if bucket not in existing:
                known = ", ".join(existing) if existing else "none: archive_metadata is empty"
                raise UsageError(
                    f"--bucket {bucket!r}: no document is in that logical bucket (the buckets are: {known}); "
                    "check the spelling, or pass --allow-empty to run anyway"
                )
    in_scope = sql.SQL("m.bucket = ANY({})").format(sql.Literal(list(buckets))) if buckets else sql.SQL("true")
    at_source = conn.execute(
        sql.SQL("SELECT EXISTS (SELECT 1 FROM archive_metadata m WHERE {} AND starts_with(m.content_url, {}))").format(
            in_scope, sql.Literal(source.location))
    ).fetchone()[0]
    if at_source:
        return
    rows = conn.execute(
        sql.SQL("""SELECT {location}, count(*), count(*) FILTER (WHERE starts_with(m.content_url, {dest}))
                   FROM archive_metadata m WHERE {scope} GROUP BY 1 ORDER BY 2 DESC, 1""").format(
            location=LOCATION_OF_URL, dest=sql.Literal(dest.location), scope=in_scope)
    ).fetchall()
    if not rows or any(at_dest for _, _, at_dest in rows):
        # Nothing anywhere, or a rerun after the move finished: nothing to warn about.
        log.info("no selected document is left at %s", source.describe())
        return
    where = ", ".join(f"{location} {count}" for location, count, _ in rows[:8])
    more = f" and {len(rows) - 8} more locations" if len(rows) > 8 else ""
    raise UsageError(
        f"{source_store.path}: {source_store.key} ({source.describe()}) holds none of the selected documents; "
        f"they are at: {where}{more} (documents by location). Check FROM_CONFIG, --from-analysis-archive "
        "and --bucket, or pass --allow-empty to run anyway"
    )

