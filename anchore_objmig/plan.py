"""Select the documents to move and cut them into shards.

A document is selected by its exact location: its content_url starts with
the source driver's location (scheme, plus S3 bucket and prefix or the
localfs directory) and is not already the URL the destination would give it.
So an s3-to-s3 move between buckets works, and a rerun skips what is done.

Planning runs in the database: one walk of archive_metadata's primary key
returns each shard's last key, never the rows. Shards are primary-key
ranges sized by documents and bytes, not by account, so hundreds of small
accounts share a few shards and every batch is an index range scan.
"""

from dataclasses import dataclass

from psycopg import sql

DEFAULT_SHARD_DOCUMENTS = 5000
DEFAULT_SHARD_BYTES = 512 * 1024 * 1024
# A run is cut into at least this many shards per worker when it is big
# enough, so no worker idles while another works through the only shard (and
# a joining host finds some left); shards stay at least MIN_SHARD_DOCUMENTS
# and MIN_SHARD_BYTES, so their claims stay a small part of the work.
SHARDS_PER_WORKER = 4
MIN_SHARD_DOCUMENTS = 50
MIN_SHARD_BYTES = 64 * 1024 * 1024


KEY = ("bucket", "archiveId", "userId", "documentName")  # archive_metadata's primary key, in its order
KEY_SQL = 'm.bucket, m."archiveId", m."userId", m."documentName"'


@dataclass(frozen=True)
class Shard:
    """Documents whose primary key k has lower < k <= upper (in key order).

    Shards are ranges of archive_metadata's primary key, so every batch is an
    index range scan however many accounts there are, and small accounts
    share a shard.
    """

    shard_no: int
    lower: tuple | None  # exclusive (bucket, archiveId, userId, documentName); None: from the first
    upper: tuple | None  # inclusive; None: to the last
    documents: int
    bytes: int

    @property
    def label(self):
        """How the operator sees the shard: the buckets and users it starts and ends in."""
        first = "/".join(self.lower[:3:2][::-1]) if self.lower else "start"
        last = "/".join(self.upper[:3:2][::-1]) if self.upper else "end"
        return f"{first} .. {last}"


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


def source_filter(source, dest, buckets=None, excluded=()):
    """WHERE condition (on alias m) for the documents to move from source to
    dest; `excluded`: locations inside the source's that belong to the
    configs' other section (say its analysis archive under the main store's
    S3 prefix), whose rows are not this run's."""
    parts = [
        sql.SQL("starts_with(m.content_url, {})").format(sql.Literal(source.location)),
        sql.SQL("m.content_url <> {}").format(url_expression(dest)),
    ]
    parts += [sql.SQL("NOT starts_with(m.content_url, {})").format(sql.Literal(location)) for location in excluded]
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


def shard_limits(conn, where, workers, max_documents=DEFAULT_SHARD_DOCUMENTS, max_bytes=DEFAULT_SHARD_BYTES):
    """(documents, bytes) per shard for a run of `workers` workers: the
    operator's maxima, or less when the run is small (see SHARDS_PER_WORKER)."""
    documents, nbytes = conn.execute(
        sql.SQL("SELECT count(*), coalesce(sum(m.size), 0) FROM archive_metadata m WHERE {}").format(where)
    ).fetchone()
    shards = SHARDS_PER_WORKER * max(1, workers)
    return (min(max_documents, max(MIN_SHARD_DOCUMENTS, -(-documents // shards))),
            min(max_bytes, max(MIN_SHARD_BYTES, -(-int(nbytes) // shards))))


def cut_shards(conn, where, max_documents=DEFAULT_SHARD_DOCUMENTS, max_bytes=DEFAULT_SHARD_BYTES):
    """Shards covering every selected document, in primary-key order, each at
    most `max_documents` documents and about `max_bytes` (a shard ends with
    the document that crosses the limit, so it may exceed it by that one).

    One query in the database: a walk of the primary key that returns only
    each shard's last key, never the rows.
    """
    query = sql.SQL(
        """SELECT bucket, "archiveId", "userId", "documentName", n, b FROM (
               SELECT k.*, lead(p) OVER w AS next_p, lead(q) OVER w AS next_q FROM (
                   SELECT m.bucket, m."archiveId", m."userId", m."documentName",
                          row_number() OVER w AS n, sum(coalesce(m.size, 0)) OVER w AS b,
                          (row_number() OVER w - 1) / %(docs)s AS p,
                          div(sum(coalesce(m.size, 0)) OVER w - coalesce(m.size, 0), %(bytes)s) AS q
                   FROM archive_metadata m WHERE {}
                   WINDOW w AS (ORDER BY m.bucket, m."archiveId", m."userId", m."documentName")) k
               WINDOW w AS (ORDER BY k.bucket, k."archiveId", k."userId", k."documentName")) c
           WHERE next_p IS NULL OR (next_p, next_q) <> (p, q)
           ORDER BY n"""
    ).format(where)
    shards = []
    lower, done_documents, done_bytes = None, 0, 0
    for *key, documents, nbytes in conn.execute(query, {"docs": max_documents, "bytes": max_bytes}):
        upper = tuple(key)
        shards.append(Shard(len(shards) + 1, lower, upper, documents - done_documents, int(nbytes) - done_bytes))
        lower, done_documents, done_bytes = upper, documents, int(nbytes)
    if shards:  # the last shard runs to the end, so nothing planned is missed
        last = shards[-1]
        shards[-1] = Shard(last.shard_no, last.lower, None, last.documents, last.bytes)
    return shards


def batch_query(where, shard, after):
    """The next batch of one shard's documents, in primary-key order (keyset
    paging): an index range scan of archive_metadata's primary key.

    Only the bounds that apply are written into the statement, so PostgreSQL
    plans an index range scan even for a prepared (generic) plan.
    """
    conditions = [where]
    if shard.lower is not None:
        conditions.append(sql.SQL("({}) > (%(l0)s, %(l1)s, %(l2)s, %(l3)s)").format(sql.SQL(KEY_SQL)))
    if shard.upper is not None:
        conditions.append(sql.SQL("({}) <= (%(u0)s, %(u1)s, %(u2)s, %(u3)s)").format(sql.SQL(KEY_SQL)))
    if after is not None:
        conditions.append(sql.SQL("({}) > (%(a0)s, %(a1)s, %(a2)s, %(a3)s)").format(sql.SQL(KEY_SQL)))
    return sql.SQL(
        """SELECT m.bucket, m."archiveId", m."userId", m."documentName", m.content_url,
                  m.is_compressed, nullif(btrim(m.digest), '') AS digest, m.size
           FROM archive_metadata m
           WHERE {}
           ORDER BY {}
           LIMIT %(limit)s"""
    ).format(sql.SQL(" AND ").join(conditions), sql.SQL(KEY_SQL))


def batch_params(shard, after, limit):
    params = {"limit": limit}
    for prefix, key in (("l", shard.lower), ("u", shard.upper), ("a", after)):
        if key is not None:
            params.update({f"{prefix}{n}": value for n, value in enumerate(key)})
    return params


def shard_rows(conn, where, shard, limit, make=lambda *row: row, trim=None):
    """The shard's rows still selected by `where`, at most `limit` at a time:
    each row made by `make(bucket, archiveId, userId, documentName, content_url,
    is_compressed, digest, size)`; `trim` may keep only a leading part of a
    batch (the next batch starts after what it kept)."""
    after = None
    while True:
        rows = [make(*row) for row in conn.execute(batch_query(where, shard, after), batch_params(shard, after, limit))]
        if not rows:
            return
        if trim is not None:
            rows = trim(rows)
        yield rows
        last = rows[-1]
        after = last.key if hasattr(last, "key") else tuple(last[:4])
