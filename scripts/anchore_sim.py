"""A stand-in for Anchore itself, for the tests, the demo and the benchmarks.

It creates Anchore's tables, writes documents the way Anchore's drivers write
them, and reads every document back the way Anchore reads it (by content_url,
MD5 over the stored bytes, zlib when is_compressed). It is deliberately
written apart from anchore_objmig's drivers, so it checks them independently.
"""

import base64
import hashlib
import json
import os
import random
import time
import zlib
from dataclasses import dataclass

SCHEMA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "anchore_schema.sql")
LOGICAL_BUCKETS = (
    "analysis_data", "manifest_data", "image_content_data", "image_summary_data",
    "policy_bundles", "policy_evaluations", "query_data", "vulnerability_scan",
)


def md5hex(data):
    return hashlib.md5(data).hexdigest()


def apply_schema(conn):
    with open(SCHEMA_FILE, encoding="utf-8") as handle:
        conn.execute(handle.read())
    conn.commit() if not conn.autocommit else None


def reset_tables(conn):
    """Empty Anchore's tables and drop the tool's own, between tests."""
    conn.execute(
        "TRUNCATE archive_metadata, archive_document, object_storage, archive_migration_tasks, tasks RESTART IDENTITY CASCADE"
    )
    conn.execute("DROP TABLE IF EXISTS objmig_failures, objmig_shards, objmig_runs, objmig_pending_deletes, objmig_moved CASCADE")
    conn.commit() if not conn.autocommit else None


@dataclass
class Doc:
    user_id: str
    bucket: str
    archive_id: str
    content: bytes  # the plain document


@dataclass
class Location:
    """Where and how Anchore would store new documents (one config section)."""

    driver: str = "db"  # db | db2 | s3 | localfs
    s3_client: object = None
    s3_bucket: str = ""
    prefix: str = ""
    directory: str = ""
    compress: bool = False
    min_size_kbytes: int = 100

    def url(self, doc):
        if self.driver in ("db", "db2"):
            return f"{self.driver}://{doc.user_id}/{doc.bucket}/{doc.archive_id}"
        if self.driver == "s3":
            return f"s3://{self.s3_bucket}/{self.prefix}{doc.user_id}/{doc.bucket}/{doc.archive_id}"
        digest = md5hex(doc.archive_id.encode())
        return f"file://{self.directory.rstrip('/')}/{md5hex(doc.user_id.encode())}/{doc.bucket}/{digest[:2]}/{digest}.json"


def store(conn, location, docs):
    """Write `docs` as Anchore would: the bytes in the backend, then the metadata."""
    now = int(time.time())
    metadata = []
    for doc in docs:
        compressed = location.compress and location.driver != "db" and len(doc.content) > location.min_size_kbytes * 1024
        data = zlib.compress(doc.content, 3) if compressed else doc.content
        url = location.url(doc)
        write_bytes(conn, location, doc, url, data, now)
        metadata.append((doc.bucket, doc.archive_id, doc.user_id, doc.archive_id + ".json", url, compressed,
                         md5hex(data), len(data), json.dumps({"k": "v"}), now - 1000, now - 1000, "active", None))
    with conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO archive_metadata (bucket, "archiveId", "userId", "documentName", content_url,
               is_compressed, digest, size, document_metadata, created_at, last_updated, record_state_key,
               record_state_val) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
            metadata,
        )
    conn.commit() if not conn.autocommit else None


def db_text(data):
    """archive_document.jsondata and b64_encoded for stored bytes, as Anchore's
    db driver writes them: UTF-8 text as is, anything else base64 (MIME style)."""
    if b"\x00" not in data:
        try:
            return data.decode("utf-8"), False
        except UnicodeDecodeError:
            pass
    return base64.encodebytes(data).decode("ascii"), True


def write_bytes(conn, location, doc, url, data, now):
    if location.driver == "db":
        text, b64 = db_text(data)
        conn.execute(
            """INSERT INTO archive_document (bucket, "archiveId", "userId", "documentName", jsondata, b64_encoded,
               created_at, last_updated, record_state_key) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 'active')""",
            (doc.bucket, doc.archive_id, doc.user_id, doc.archive_id + ".json", text, b64, now, now),
        )
    elif location.driver == "db2":
        conn.execute(
            """INSERT INTO object_storage ("userId", bucket, key, version, object_metadata, content, created_at,
               last_updated) VALUES (%s, %s, %s, '', NULL, %s, %s, %s)""",
            (doc.user_id, doc.bucket, doc.archive_id, data, now, now),
        )
    elif location.driver == "s3":
        bucket, key = url[len("s3://"):].split("/", 1)
        location.s3_client.put_object(Bucket=bucket, Key=key, Body=data, ContentType="binary/octet-stream")
    else:
        path = url[len("file://"):]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)


class ReadError(AssertionError):
    pass


def read_stored(conn, url, s3_client):
    """The stored bytes at `url`, read the way Anchore's driver for its scheme does."""
    scheme, rest = url.split("://", 1)
    if scheme == "db":
        user_id, bucket, archive_id = rest.split("/", 2)
        row = conn.execute(
            'SELECT jsondata, b64_encoded FROM archive_document WHERE "userId" = %s AND bucket = %s AND "archiveId" = %s',
            (user_id, bucket, archive_id),
        ).fetchone()
        if row is None:
            raise ReadError(f"no archive_document row for {url}")
        if row[0] is None:
            return b""
        return base64.b64decode(row[0]) if row[1] else row[0].encode("utf-8")
    if scheme == "db2":
        user_id, bucket, key = rest.split("/", 2)
        row = conn.execute(
            """SELECT content FROM object_storage WHERE "userId" = %s AND bucket = %s AND key = %s AND version = ''""",
            (user_id, bucket, key),
        ).fetchone()
        if row is None:
            raise ReadError(f"no object_storage row for {url}")
        return bytes(row[0])
    if scheme == "s3":
        bucket, key = rest.split("/", 1)
        try:
            return s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:
            raise ReadError(f"cannot read {url}: {exc}") from None
    if scheme == "file":
        try:
            with open(rest, "rb") as handle:
                return handle.read()
        except OSError as exc:
            raise ReadError(f"cannot read {url}: {exc}") from None
    raise ReadError(f"unknown scheme in {url}")


def read_all(conn, s3_client=None, skip=()):
    """{(user, bucket, archiveId): plain bytes} for every metadata row (but archiveIds in
    `skip`), checked as Anchore checks."""
    documents = {}
    rows = conn.execute(
        """SELECT "userId", bucket, "archiveId", content_url, is_compressed, digest, size FROM archive_metadata"""
    ).fetchall()
    for user_id, bucket, archive_id, url, is_compressed, digest, size in rows:
        if archive_id in skip:
            continue
        data = read_stored(conn, url, s3_client)
        if digest and md5hex(data) != digest:
            raise ReadError(f"digest mismatch for {url}")
        if size is not None and size != len(data):
            raise ReadError(f"size mismatch for {url}: metadata {size}, stored {len(data)}")
        documents[(user_id, bucket, archive_id)] = zlib.decompress(data) if is_compressed else data
    return documents


def make_docs(count, seed=7, users=("admin", "acme"), buckets=LOGICAL_BUCKETS, large_share=0.05,
              small=(1024, 40 * 1024), large=(150 * 1024, 1536 * 1024), binary_share=0.0):
    """Anchore-like JSON documents of realistic sizes (most 1-40 KB, a few large)."""
    rng = random.Random(seed)
    docs = []
    for n in range(count):
        low, high = large if rng.random() < large_share else small
        size = rng.randint(low, high)
        if rng.random() < binary_share:
            content = rng.randbytes(size)  # not UTF-8: Anchore's db driver stores it base64
        else:
            content = json_document(rng, size, n)
        docs.append(Doc(rng.choice(users), rng.choice(buckets), f"sha256:{rng.getrandbits(256):064x}", content))
    return docs


def json_document(rng, size, n):
    """A JSON document of about `size` bytes that compresses like a real report."""
    packages = []
    body = 0
    while body < size:
        name = f"pkg-{rng.randint(0, 5000)}"
        entry = {"name": name, "version": f"{rng.randint(0, 9)}.{rng.randint(0, 40)}.{rng.randint(0, 99)}",
                 "type": rng.choice(["rpm", "deb", "npm", "python", "java"]), "licenses": ["MIT"],
                 "location": f"/usr/lib/{name}/{rng.getrandbits(40):010x}"}
        packages.append(entry)
        body += 140
    return json.dumps({"document": n, "packages": packages}).encode("utf-8")
