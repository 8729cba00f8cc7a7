"""The default `db` driver: documents as text rows of archive_document."""

from psycopg import sql

from anchore_objmig import codec, db
from anchore_objmig.drivers.base import Driver
from anchore_objmig.drivers.postgres import epoch_now, failing_all, key_arrays

READ = sql.SQL(
    """COPY (SELECT DISTINCT ON (d."userId", d.bucket, d."archiveId")
                    d."userId", d.bucket, d."archiveId", d.jsondata, d.b64_encoded
             FROM archive_document d
             JOIN unnest({users}::text[], {buckets}::text[], {ids}::text[]) AS k(u, b, a)
               ON d."userId" = k.u AND d.bucket = k.b AND d."archiveId" = k.a)
       TO STDOUT (FORMAT BINARY)"""
)
STAGE = """CREATE TEMP TABLE IF NOT EXISTS objmig_stage_document
           (bucket text, "archiveId" text, "userId" text, jsondata text, b64_encoded boolean, now integer)
           ON COMMIT DELETE ROWS"""
UPSERT = """INSERT INTO archive_document AS d
              (bucket, "archiveId", "userId", "documentName", jsondata, b64_encoded,
               created_at, last_updated, record_state_key)
            SELECT bucket, "archiveId", "userId", "archiveId" || '.json', jsondata, b64_encoded, now, now, 'active'
            FROM objmig_stage_document
            ON CONFLICT (bucket, "archiveId", "userId", "documentName")
            DO UPDATE SET jsondata = EXCLUDED.jsondata, b64_encoded = EXCLUDED.b64_encoded,
                          last_updated = EXCLUDED.last_updated"""
DELETE = """DELETE FROM archive_document d
            USING unnest(%s::text[], %s::text[], %s::text[]) AS k(u, b, a)
            WHERE d."userId" = k.u AND d.bucket = k.b AND d."archiveId" = k.a"""


class DbDriver(Driver):
    name = "db"
    scheme = "db"
    in_catalog_db = True  # shares the worker's connection: writes can join its fenced transaction
    supports_compression = False  # stored as text; PostgreSQL compresses it (TOAST)
    summary = "PostgreSQL table archive_document (Anchore's default; no compression)"

    def read_many(self, urls):
        users, buckets, ids = key_arrays(urls, self.scheme)
        conn = self.context.db_connection()
        found = {}
        query = READ.format(users=sql.Literal(users), buckets=sql.Literal(buckets), ids=sql.Literal(ids))
        with db.transaction(conn), conn.cursor() as cur, cur.copy(query) as copy:
            # jsondata read as bytea: in a binary COPY a text value is its bytes
            # (UTF-8, the session's client_encoding), so they arrive as bytes,
            # not decoded to str and encoded back (a measured share of db→s3's
            # client CPU).
            copy.set_types(["text", "text", "text", "bytea", "bool"])
            for user, bucket, archive_id, jsondata, b64_encoded in copy.rows():
                try:  # one bad row fails alone, not its whole batch
                    found[self.url_for(user, bucket, archive_id)] = codec.from_db_text(jsondata, b64_encoded)
                except codec.CorruptDocument as exc:
                    found[self.url_for(user, bucket, archive_id)] = exc
        return found

    def write_many(self, items):
        if not items:
            return {}
        conn = self.context.db_connection()
        now = epoch_now()
        try:
            with db.transaction(conn), conn.cursor() as cur:
                cur.execute(STAGE)
                with cur.copy(
                    'COPY objmig_stage_document (bucket, "archiveId", "userId", jsondata, b64_encoded, now) '
                    "FROM STDIN (FORMAT BINARY)"
                ) as copy:
                    copy.set_types(["text", "text", "text", "text", "bool", "int4"])
                    for item in items:
                        jsondata, b64_encoded = codec.to_db_text(item.stored.data)
                        copy.write_row((item.bucket, item.archive_id, item.user_id, jsondata, b64_encoded, now))
                cur.execute(UPSERT)
        except Exception as exc:  # the batch is one transaction: all or nothing
            return failing_all([item.url for item in items], exc)
        return {}

    def delete_many(self, urls):
        if not urls:
            return {}
        conn = self.context.db_connection()
        try:
            with db.transaction(conn):
                conn.execute(DELETE, key_arrays(urls, self.scheme))
        except Exception as exc:
            return failing_all(urls, exc)
        return {}
