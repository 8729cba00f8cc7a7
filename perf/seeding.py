"""Seed Anchore-like documents fast, and check every document reads back.

The documents come from anchore_sim.make_docs (the sizes Anchore stores:
most 1-40 KB, ~5% 150 KB-1.5 MB), optionally plus a few huge ones. They are
written in the same rows and objects anchore_sim.store writes, but with COPY
and parallel PUTs: seeding 100k documents one INSERT or one PUT at a time
would take longer than the measurements themselves.

The check after every run reads each document with anchore_sim.read_stored
(Anchore's way of reading a content_url) and applies read_all's checks (MD5
over the stored bytes, size, zlib when is_compressed), then compares the
plain bytes with what was seeded. It runs in a few threads and keeps only a
digest per document, so it also works for 100k documents.
"""

import hashlib
import json
import random
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import psycopg

import anchore_sim

CHUNK = 2000  # documents generated and written at a time (bounds memory for big runs)
MB = 1024 * 1024
HUGE_MAX = 50 * MB  # the largest document --huge adds
HUGE_MIN = 5 * MB
ZLIB_LEVEL = 3  # what Anchore uses
CONTENT_TYPE = "binary/octet-stream"


class VerifyError(AssertionError):
    """A document did not read back as seeded: the measurement is void."""


@dataclass
class DocSet:
    """What a measurement needs to know about the seeded documents."""

    count: int = 0
    plain_bytes: int = 0
    largest: int = 0
    expected: dict = field(default_factory=dict)  # (userId, bucket, archiveId) -> MD5 of the plain bytes

    def add(self, doc):
        self.count += 1
        self.plain_bytes += len(doc.content)
        self.largest = max(self.largest, len(doc.content))
        self.expected[(doc.user_id, doc.bucket, doc.archive_id)] = md5hex(doc.content)


def md5hex(data):
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


# ---------------------------------------------------------------- generating


def generate(count, seed=7, huge=0, users=("admin", "acme"), huge_max=HUGE_MAX):
    """Chunks (lists) of anchore_sim.Doc: `count` realistic documents of `users`, then `huge` of 5-50 MB
    (the first of `huge_max` bytes)."""
    made = 0
    chunk_no = 0
    while made < count:
        size = min(CHUNK, count - made)
        # A different seed per chunk: different archiveIds, same size distribution.
        yield anchore_sim.make_docs(size, seed=seed * 1000 + chunk_no, users=users)
        made += size
        chunk_no += 1
    if huge:
        yield huge_docs(huge, seed, huge_max)


def huge_docs(count, seed, largest=HUGE_MAX):
    """`count` JSON documents of 5-50 MB, the first just under `largest` (default 50 MB)."""
    rng = random.Random(seed + 99)
    # json_document(rng, size) misses `size` by a steady factor: measure it on a small one.
    ratio = len(anchore_sim.json_document(random.Random(0), MB, 0)) / MB
    docs = []
    for n in range(count):
        want = largest if n == 0 else rng.randint(HUGE_MIN, HUGE_MAX)
        content = anchore_sim.json_document(rng, int(want / ratio * 0.98), n)
        docs.append(anchore_sim.Doc(rng.choice(("admin", "acme")), "analysis_data",
                                    f"sha256:{rng.getrandbits(256):064x}", content))
    return docs


def one_huge_doc(size, seed=5):
    """One JSON document of about `size` bytes (a very large image's analysis), made of
    10 MB pieces so that building it never holds more than one piece as Python objects."""
    rng = random.Random(seed)
    ratio = len(anchore_sim.json_document(random.Random(0), MB, 0)) / MB
    pieces = [anchore_sim.json_document(rng, int(10 * MB / ratio), n) for n in range(max(1, round(size / (10 * MB))))]
    content = b'{"document": "huge", "parts": [' + b", ".join(pieces) + b"]}"
    return anchore_sim.Doc("admin", "analysis_data", f"sha256:{rng.getrandbits(256):064x}", content)


# ---------------------------------------------------------------- storing


def stored_form(content, compress, min_size_kbytes=100):
    """(bytes as stored, is_compressed) for a destination's compression settings."""
    if compress and len(content) > min_size_kbytes * 1024:
        return zlib.compress(content, ZLIB_LEVEL), True
    return content, False


def metadata_row(doc, url, data, compressed, now):
    # The same columns and values anchore_sim.store writes.
    return (doc.bucket, doc.archive_id, doc.user_id, doc.archive_id + ".json", url, compressed,
            md5hex(data), len(data), json.dumps({"k": "v"}), now - 1000, now - 1000, "active", None)


COPY_METADATA = """COPY archive_metadata (bucket, "archiveId", "userId", "documentName", content_url,
    is_compressed, digest, size, document_metadata, created_at, last_updated, record_state_key,
    record_state_val) FROM STDIN"""
COPY_DOCUMENT = """COPY archive_document (bucket, "archiveId", "userId", "documentName", jsondata,
    b64_encoded, created_at, last_updated, record_state_key) FROM STDIN"""


def seed_db(dsn, chunks):
    """Store the documents in archive_document (driver db); returns their DocSet."""
    docset = DocSet()
    now = int(time.time())
    with psycopg.connect(dsn) as conn:
        for docs in chunks:
            with conn.cursor() as cur:
                with cur.copy(COPY_DOCUMENT) as copy:
                    for doc in docs:
                        text, b64 = anchore_sim.db_text(doc.content)
                        copy.write_row((doc.bucket, doc.archive_id, doc.user_id, doc.archive_id + ".json",
                                        text, b64, now, now, "active"))
                with cur.copy(COPY_METADATA) as copy:
                    for doc in docs:
                        url = f"db://{doc.user_id}/{doc.bucket}/{doc.archive_id}"
                        copy.write_row(metadata_row(doc, url, doc.content, False, now))
            conn.commit()
            for doc in docs:
                docset.add(doc)
    return docset


def seed_s3(dsn, s3_client, bucket, chunks, compress=False, threads=16):
    """Store the documents as S3 objects in `bucket` (no prefix), then their metadata rows."""
    docset = DocSet()
    now = int(time.time())

    def put(doc):
        data, compressed = stored_form(doc.content, compress)
        url = f"s3://{bucket}/{doc.user_id}/{doc.bucket}/{doc.archive_id}"
        s3_client.put_object(Bucket=bucket, Key=url.split("/", 3)[3], Body=data, ContentType=CONTENT_TYPE)
        return metadata_row(doc, url, data, compressed, now)

    pool = ThreadPoolExecutor(threads)
    try:
        with psycopg.connect(dsn) as conn:
            for docs in chunks:
                rows = list(pool.map(put, docs))
                with conn.cursor() as cur, cur.copy(COPY_METADATA) as copy:
                    for row in rows:
                        copy.write_row(row)
                conn.commit()
                for doc in docs:
                    docset.add(doc)
    finally:
        pool.shutdown(cancel_futures=True)  # on Ctrl-C, do not finish the queue first
    return docset


# ---------------------------------------------------------------- checking


def verify(dsn, s3_client, docset, where, threads=8):
    """Fail loudly unless every seeded document reads back, unchanged, as Anchore reads it,
    and every metadata row's content_url starts with one of the prefixes in `where`."""
    where = (where,) if isinstance(where, str) else tuple(where)
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            'SELECT "userId", bucket, "archiveId", content_url, is_compressed, digest, size FROM archive_metadata'
        ).fetchall()
    keys = {(r[0], r[1], r[2]) for r in rows}
    problems = []
    if len(rows) != docset.count or keys != set(docset.expected):
        problems.append(f"{len(rows)} metadata rows ({len(keys)} keys) for {docset.count} seeded documents")
    misplaced = [r[3] for r in rows if not r[3].startswith(where)]
    if misplaced:
        problems.append(f"{len(misplaced)} documents not at {' or '.join(where)}, e.g. {misplaced[0]}")

    lock = threading.Lock()
    local = threading.local()
    connections = []

    def check(row):
        user_id, bucket, archive_id, url, is_compressed, digest, size = row
        if not hasattr(local, "conn"):
            local.conn = psycopg.connect(dsn, autocommit=True)
            with lock:
                connections.append(local.conn)
        try:
            data = anchore_sim.read_stored(local.conn, url, s3_client)
            if digest and md5hex(data) != digest:
                return f"digest mismatch for {url}"
            if size is not None and size != len(data):
                return f"size mismatch for {url}: metadata {size}, stored {len(data)}"
            plain = zlib.decompress(data) if is_compressed else data
        except Exception as exc:  # anchore_sim.ReadError, zlib.error, S3 errors: all count
            return f"{url}: {exc}"
        if docset.expected.get((user_id, bucket, archive_id)) != md5hex(plain):
            return f"{url}: content differs from what was seeded"
        return None

    pool = ThreadPoolExecutor(threads)
    try:
        problems += [p for p in pool.map(check, rows) if p]
    finally:
        pool.shutdown(cancel_futures=True)  # on Ctrl-C, do not finish the queue first
        for conn in connections:
            conn.close()
    if problems:
        raise VerifyError(f"{len(problems)} problems after the run; first: " + "; ".join(problems[:5]))
    return len(rows)
