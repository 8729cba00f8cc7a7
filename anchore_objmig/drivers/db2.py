"""The `db2` driver: documents as bytea rows of object_storage."""

from psycopg import sql

from anchore_objmig import db

from anchore_objmig.drivers.base import Driver
from anchore_objmig.drivers.postgres import epoch_now, failing_all, key_arrays
from anchore_objmig.faults import crash_point

READ = sql.SQL(
    """COPY (SELECT o."userId", o.bucket, o.key, o.content
             FROM object_storage o
             JOIN unnest({users}::text[], {buckets}::text[], {ids}::text[]) AS k(u, b, a)
               ON o."userId" = k.u AND o.bucket = k.b AND o.key = k.a AND o.version = '')
       TO STDOUT (FORMAT BINARY)"""
)
STAGE = """CREATE TEMP TABLE IF NOT EXISTS objmig_stage_object
           ("userId" text, bucket text, key text, content bytea, now integer)
           ON COMMIT DELETE ROWS"""
UPSERT = """INSERT INTO object_storage AS o
              ("userId", bucket, key, version, object_metadata, content, created_at, last_updated)
            SELECT "userId", bucket, key, '', NULL, content, now, now FROM objmig_stage_object
            ON CONFLICT ("userId", bucket, key, version)
            DO UPDATE SET content = EXCLUDED.content, last_updated = EXCLUDED.last_updated"""
DELETE = """DELETE FROM object_storage o
            USING unnest(%s::text[], %s::text[], %s::text[]) AS k(u, b, a)
            WHERE o."userId" = k.u AND o.bucket = k.b AND o.key = k.a AND o.version = ''"""


class Db2Driver(Driver):
    name = "db2"
    scheme = "db2"
    in_catalog_db = True  # shares the worker's connection: writes can join its fenced transaction
    summary = "PostgreSQL table object_storage (bytea)"

    def read_many(self, urls):
        users, buckets, ids = key_arrays(urls, self.scheme)
        conn = self.context.db_connection()
        found = {}
        query = READ.format(users=sql.Literal(users), buckets=sql.Literal(buckets), ids=sql.Literal(ids))
        with db.transaction(conn), conn.cursor() as cur, cur.copy(query) as copy:
            copy.set_types(["text", "text", "text", "bytea"])
            for user, bucket, key, content in copy.rows():
                found[self.url_for(user, bucket, key)] = bytes(content) if content is not None else b""
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
                    'COPY objmig_stage_object ("userId", bucket, key, content, now) FROM STDIN (FORMAT BINARY)'
                ) as copy:
                    copy.set_types(["text", "text", "text", "bytea", "int4"])
                    for item in items:
                        copy.write_row((item.user_id, item.bucket, item.archive_id, item.stored.data, now))
                        crash_point("in-copy")
                cur.execute(UPSERT)
        except Exception as exc:
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
