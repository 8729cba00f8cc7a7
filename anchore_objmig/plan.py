"""Select the documents to move and cut them into shards.

A document is selected by its exact location: its content_url starts with
the source driver's location (scheme, plus S3 bucket and prefix or the
localfs directory) and is not already the URL the destination would give it.
So an s3-to-s3 move between buckets works, and a rerun skips what is done.

Planning runs in the database: per (logical bucket, userId) group only counts
and, for large groups, archiveId boundaries come back, never the rows.
"""

import math
from dataclasses import dataclass

from psycopg import sql

DEFAULT_SHARD_DOCUMENTS = 5000
DEFAULT_SHARD_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class Shard:
    """Documents of one logical bucket and user with lower < archiveId <= upper."""

    shard_no: int
    bucket: str
    user_id: str
    lower: str | None  # exclusive; None: from the first
    upper: str | None  # inclusive; None: to the last
    documents: int
    bytes: int


@dataclass(frozen=True)
class GroupSummary:
    bucket: str
    user_id: str
    documents: int
    bytes: int


def url_expression(driver):
    """SQL computing, for archive_metadata row m, the URL `driver` gives it."""
    base = sql.Literal(driver.url_base)
    if driver.key_layout == "md5":
        return sql.SQL(
            """({base} || md5(m."userId") || '/' || m.bucket || '/' || left(md5(m."archiveId"), 2)"""
            """ || '/' || md5(m."archiveId") || '.json')"""
        ).format(base=base)
    return sql.SQL("""({base} || m."userId" || '/' || m.bucket || '/' || m."archiveId")""").format(base=base)


def source_filter(source, dest, buckets=None):
    """WHERE condition (on alias m) for the documents to move from source to dest."""
    parts = [
        sql.SQL("starts_with(m.content_url, {})").format(sql.Literal(source.location)),
        sql.SQL("m.content_url <> {}").format(url_expression(dest)),
    ]
    if buckets:
        parts.append(sql.SQL("m.bucket = ANY({})").format(sql.Literal(list(buckets))))
    return sql.SQL(" AND ").join(parts)


def summarize(conn, where):
    """Documents and bytes per (logical bucket, user), in one aggregate query."""
    query = sql.SQL(
        """SELECT m.bucket, m."userId", count(*), coalesce(sum(m.size), 0)
           FROM archive_metadata m WHERE {} GROUP BY 1, 2 ORDER BY 1, 2"""
    ).format(where)
    return [GroupSummary(*row) for row in conn.execute(query)]


def boundaries(conn, where, group, pieces):
    """archiveIds cutting a group into `pieces` ranges of about equal count."""
    step = math.ceil(group.documents / pieces)
    query = sql.SQL(
        """SELECT a FROM (
               SELECT m."archiveId" AS a, row_number() OVER (ORDER BY m."archiveId") AS n
               FROM archive_metadata m WHERE {} AND m.bucket = %s AND m."userId" = %s) s
           WHERE n %% %s = 0 ORDER BY a"""
    ).format(where)
    cuts = [row[0] for row in conn.execute(query, (group.bucket, group.user_id, step))]
    # Equal archiveIds (several documentNames) cannot be split apart.
    return sorted(set(cuts))


def cut_shards(conn, where, groups, max_documents=DEFAULT_SHARD_DOCUMENTS, max_bytes=DEFAULT_SHARD_BYTES):
    """Shards covering every group, each within the document and byte bounds."""
    shards = []
    for group in groups:
        pieces = max(math.ceil(group.documents / max_documents), math.ceil(group.bytes / max_bytes), 1)
        cuts = boundaries(conn, where, group, pieces) if pieces > 1 else []
        edges = [None, *cuts, None]
        for lower, upper in zip(edges, edges[1:]):
            shards.append(
                Shard(
                    shard_no=len(shards) + 1,
                    bucket=group.bucket,
                    user_id=group.user_id,
                    lower=lower,
                    upper=upper,
                    # Estimates for display; the worker counts what it really moves.
                    documents=math.ceil(group.documents / (len(cuts) + 1)),
                    bytes=math.ceil(group.bytes / (len(cuts) + 1)),
                )
            )
    return shards


def batch_query(where, shard, after):
    """The next batch of one shard's documents, in key order (keyset paging).

    Only the bounds that apply are written into the statement, so PostgreSQL
    plans an index range scan even for a prepared (generic) plan.
    """
    conditions = [where, sql.SQL("m.bucket = %(bucket)s"), sql.SQL('m."userId" = %(user_id)s')]
    if shard.lower is not None:
        conditions.append(sql.SQL('m."archiveId" > %(lower)s'))
    if shard.upper is not None:
        conditions.append(sql.SQL('m."archiveId" <= %(upper)s'))
    if after is not None:
        conditions.append(sql.SQL('(m."archiveId", m."documentName") > (%(after_id)s, %(after_name)s)'))
    return sql.SQL(
        """SELECT m.bucket, m."archiveId", m."userId", m."documentName", m.content_url,
                  m.is_compressed, m.digest, m.size
           FROM archive_metadata m
           WHERE {}
           ORDER BY m."archiveId", m."documentName"
           LIMIT %(limit)s"""
    ).format(sql.SQL(" AND ").join(conditions))
