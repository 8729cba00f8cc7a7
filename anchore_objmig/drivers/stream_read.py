"""Reading one document in slices, for documents too large to hold whole
(anchore_objmig/streaming.py strings readers and sinks together).

Readers yield the document's *stored* bytes in order, a slice at a time:
- PostgreSQL hands a COPY row over whole, so db and db2 values are read in
  slices server-side (`substring`), on a connection of their own, from a copy
  of the value taken in one statement.
- S3: a HEAD, then ranged GETs, each checked against the length asked for and
  the object's ETag, so a short, cut-off or changed body never passes. The
  GETs go through boto3, whose answer's status and headers come before its
  body: a server that ignores Range (200) or answers another range is hung up
  on before its body is read (awscrt hands headers over only once the whole
  body is in memory).
- localfs: the file, read in slices.
"""

import binascii
import concurrent.futures
import logging
import os
import random
import time

import botocore.exceptions
import urllib3.exceptions

from anchore_objmig import codec, db
from anchore_objmig.drivers import localfs, s3_crt
from anchore_objmig.drivers.base import NotFound
from anchore_objmig.drivers.postgres import split_url
from anchore_objmig.drivers.s3 import split_s3_url
from anchore_objmig.errors import StorageError

log = logging.getLogger(__name__)

SLICE = 8 * 1024 * 1024  # bytes per read from a backend
B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
B64_IGNORED = bytes(b for b in range(256) if b not in B64_ALPHABET)  # what b64decode skips (newlines)


class Changed(StorageError):
    """The stored value changed while it was being read in slices."""


# A value read in slices straight from Anchore's table would cost PostgreSQL a
# decompression of everything before each slice (TOAST compresses large
# values): quadratic in the size. So the value is first copied, in one
# statement (one snapshot: the slices are of one version), into a temporary
# table of this session that stores it uncompressed, where each slice costs
# only its own size.
STAGE = """CREATE TEMP TABLE IF NOT EXISTS objmig_stream_value (v bytea, b64 boolean);
           ALTER TABLE objmig_stream_value ALTER COLUMN v SET STORAGE EXTERNAL;
           TRUNCATE objmig_stream_value"""
CLEAR = "TRUNCATE objmig_stream_value"  # frees its space at once (DELETE would leave it to a VACUUM)
STAGE_DB = """INSERT INTO objmig_stream_value
              SELECT convert_to(coalesce(jsondata, ''), 'UTF8'), b64_encoded FROM archive_document
               WHERE "userId" = %(u)s AND bucket = %(b)s AND "archiveId" = %(a)s ORDER BY "documentName" LIMIT 1
              RETURNING b64, octet_length(v)"""
STAGE_DB2 = """INSERT INTO objmig_stream_value
               SELECT coalesce(content, ''::bytea) || ''::bytea, false FROM object_storage
                WHERE "userId" = %(u)s AND bucket = %(b)s AND key = %(a)s AND version = ''
               RETURNING b64, octet_length(v)"""  # || makes a fresh, uncompressed value


SIZES = {  # stored sizes without reading the values (octet_length reads only the TOAST header)
    "db": """SELECT k.url, octet_length(d.jsondata) FROM archive_document d
             JOIN unnest(%s::text[], %s::text[], %s::text[], %s::text[]) AS k(url, u, b, a)
               ON d."userId" = k.u AND d.bucket = k.b AND d."archiveId" = k.a""",
    "db2": """SELECT k.url, octet_length(o.content) FROM object_storage o
              JOIN unnest(%s::text[], %s::text[], %s::text[], %s::text[]) AS k(url, u, b, a)
                ON o."userId" = k.u AND o.bucket = k.b AND o.key = k.a AND o.version = ''""",
}


def sizes_in_db(conn, scheme, urls):
    """{url: bytes the value takes in its table} (for db, of its text: base64 is 4/3 of the stored bytes)."""
    keys = [(url, *split_url(url, scheme)) for url in urls]
    if not keys:
        return {}
    return {url: size or 0 for url, size in conn.execute(SIZES[scheme], [list(column) for column in zip(*keys)])}


def sizes_of_files(urls):
    """{url: size} of the localfs files that exist."""
    sizes = {}
    for url in urls:
        try:
            sizes[url] = os.path.getsize(localfs.path_of(url))
        except OSError:
            pass  # read (and reported) with its batch
    return sizes


def db_key(url, scheme):
    user, bucket, archive_id = split_url(url, scheme)
    return {"u": user, "b": bucket, "a": archive_id}


def read_db(conn, url):
    """The stored bytes of an archive_document row (base64 decoded when b64_encoded)."""
    return read_staged(conn, url, STAGE_DB, db_key(url, "db"))


def read_db2(conn, url):
    """The bytes of an object_storage row."""
    return read_staged(conn, url, STAGE_DB2, db_key(url, "db2"))


def own_table(conn, statement):
    """Run `statement` on this session's own temporary table in a read-write
    transaction, also in a session otherwise read-only (verify's): it touches
    nothing but that table, which no other session can see."""
    with db.transaction(conn):
        conn.execute("SET TRANSACTION READ WRITE")
        conn.execute(statement)


def read_staged(conn, url, stage, key):
    own_table(conn, STAGE)
    with db.transaction(conn):
        conn.execute("SET TRANSACTION READ WRITE")
        conn.execute("SET LOCAL statement_timeout = 0")  # copying one large value: --db-timeout is not for that
        head = conn.execute(stage, key).fetchone()
    if head is None:
        raise NotFound(f"no document at {url}")
    b64, length = head
    decoder = B64Decoder() if b64 else None
    try:
        for start in range(1, length + 1, SLICE):
            # binary: the slice's bytes as they are, no hex text in between
            data = bytes(conn.execute("SELECT substring(v from %s for %s) FROM objmig_stream_value", (start, SLICE),
                                      binary=True).fetchone()[0])
            yield decoder.feed(data) if decoder else data
        if decoder:
            yield decoder.end()
    finally:
        if not conn.closed:
            own_table(conn, CLEAR)


def read_file(url):
    """A localfs document's bytes."""
    try:
        with open(localfs.path_of(url), "rb") as handle:
            while data := handle.read(SLICE):
                yield data
    except FileNotFoundError:
        raise NotFound(f"no file at {url}") from None
    except OSError as exc:
        raise StorageError(f"cannot read {url}: {exc.strerror}") from None


class B64Decoder:
    """base64.b64decode piece by piece: what it skips (newlines) is skipped,
    whole groups of 4 characters are decoded, the rest waits for the next piece."""

    def __init__(self):
        self.rest = b""

    def feed(self, text):
        text = self.rest + text.translate(None, B64_IGNORED)
        cut = len(text) - len(text) % 4
        self.rest = text[cut:]
        return self.decode(text[:cut])

    def end(self):
        if self.rest:
            raise codec.CorruptDocument("b64_encoded but not valid base64: Incorrect padding")
        return b""

    @staticmethod
    def decode(text):
        try:
            return binascii.a2b_base64(text)
        except binascii.Error as exc:
            raise codec.CorruptDocument(f"b64_encoded but not valid base64: {exc}") from None


class S3Reader:
    """An S3 object in ranged GETs; `proven` once its bytes hashed to an MD5
    ETag. `md5` hashes every byte yielded (streaming.Decoded uses it rather
    than hashing them again)."""

    def __init__(self, driver, url):
        self.driver, self.url = driver, url
        self.bucket, self.key = split_s3_url(url)
        self.attempts = int(driver.store.driver_config.get("max_attempts", 5))
        self.proven = False
        self.md5 = codec.md5_of(b"")

    def __iter__(self):
        _, headers, _ = self.retried(lambda: self.driver.fast.request("HeadObject", "HEAD", self.bucket, self.key))
        length = int(headers.get("content-length") or 0)
        etag = headers.get("etag")
        md5_etag = s3_crt.plain_md5_etag(headers)
        md5 = self.md5
        # The next slice is fetched while this one is written: the GET and the
        # write overlap, at the cost of one slice more in memory.
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="objmig-slice") as ahead:
            def fetch(start):
                end = min(start + SLICE, length) - 1
                return ahead.submit(self.retried, lambda: self.slice(start, end, length, etag))

            starts = range(0, length, SLICE)
            pending = fetch(starts[0]) if starts else None
            try:
                for start in starts:
                    data = pending.result()
                    pending = fetch(start + SLICE) if start + SLICE < length else None
                    md5.update(data)
                    yield data
            finally:
                if pending is not None:  # stopped early (a failed write, a stop): the GET in the air is dropped
                    pending.cancel()
        if md5_etag is not None:
            if md5.hexdigest() != md5_etag:  # the parts were each whole, but not of one object
                raise StorageError(f"cannot read {self.url}: the bytes read do not hash to its ETag {md5_etag}")
            self.proven = True

    def slice(self, start, end, length, etag):
        """Bytes start-end, read only once the answer is a 206 of exactly them."""
        try:
            answer = self.driver.client.get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={start}-{end}")
        except botocore.exceptions.ClientError as exc:  # botocore already retried what it can
            error = exc.response.get("Error", {})
            raise s3_crt.HotPathError(error.get("Code", "Error"), error.get("Message", "")) from None
        except (botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError, OSError) as exc:
            raise s3_crt.TruncatedBody(type(exc).__name__, str(exc)) from None
        body = answer["Body"]
        try:  # closed unread on any wrong header: the connection is dropped, not drained
            status = answer["ResponseMetadata"]["HTTPStatusCode"]
            got = answer.get("ContentRange")
            if status != 206 or got != f"bytes {start}-{end}/{length}":
                raise s3_crt.TruncatedBody("WrongRange", f"asked for bytes {start}-{end}/{length}, the answer was "
                                                         f"{status} with {got or 'no Content-Range'}")
            if answer.get("ETag") != etag:
                raise Changed(f"{self.url} changed while it was read (ETag {etag}, then {answer.get('ETag')})")
            if answer.get("ContentLength") != end - start + 1:
                raise s3_crt.TruncatedBody("ShortBody", f"bytes {start}-{end}: Content-Length "
                                                        f"{answer.get('ContentLength')}")
            data = body.read()
        except (botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError, OSError) as exc:
            raise s3_crt.TruncatedBody(type(exc).__name__, f"bytes {start}-{end}: {exc}") from None
        finally:
            body.close()
        if len(data) != end - start + 1:
            raise s3_crt.TruncatedBody("ShortBody", f"bytes {start}-{end}: read {len(data)} bytes")
        return data

    def retried(self, request):
        """Short, cut-off and reset bodies are read again, with backoff, as read_one does."""
        for attempt in range(1, self.attempts + 1):
            try:
                return request()
            except s3_crt.HotPathError as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject"):
                    raise NotFound(f"no object at {self.url}") from None
                retry = exc.retryable or exc.code in s3_crt.CUT_OFF
                if retry and attempt < self.attempts:
                    log.warning("reading %s again (attempt %d of %d): %s", self.url, attempt + 1, self.attempts, exc)
                    time.sleep(min(0.25 * 2 ** attempt, 4) * random.uniform(0.5, 1.0))
                    continue
                tries = f" (after {attempt} attempts)" if retry else ""
                raise StorageError(f"cannot read {self.url}{tries}: {exc}") from None
