"""Reading and writing one document in pieces, for documents too large to
hold whole (see anchore_objmig/streaming.py, which strings these together).

Readers yield the document's *stored* bytes in order, a slice at a time
(a localfs file is simply read in slices):
- PostgreSQL hands a COPY row over whole, so db and db2 values are read in
  slices server-side (`substring`), on a connection of their own, from a copy
  of the value taken in one statement.
- S3: a HEAD, then ranged GETs, each checked against the length asked for and
  the object's ETag, so a short, cut-off or changed body never passes.

Sinks store the destination bytes as they come (localfs: as write_one does):
- S3: one PUT with Content-MD5 if it all fits in one part, else a multipart
  upload, each part with its Content-MD5, the fence checked before every part
  and before completing, and the finished object's ETag checked.
- db/db2: a COPY FROM STDIN (text format) into Anchore's table, escaped piece
  by piece, so the server, not this process, holds the value; it commits only
  after the caller's final checks (digest, lease).
"""

import base64
import binascii
import codecs
import logging
import os
import random
import tempfile
import time

from anchore_objmig import codec
from anchore_objmig.drivers import localfs, s3_crt
from anchore_objmig.drivers.base import NotFound
from anchore_objmig.drivers.postgres import epoch_now, split_url
from anchore_objmig.drivers.s3 import CONTENT_TYPE, split_s3_url
from anchore_objmig.errors import StorageError
from anchore_objmig.faults import crash_point

log = logging.getLogger(__name__)

SLICE = 8 * 1024 * 1024  # bytes (or characters) per read from a backend
B64_LINE = 57  # bytes per MIME base64 line (76 characters and a newline)
B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
B64_IGNORED = bytes(b for b in range(256) if b not in B64_ALPHABET)  # what b64decode skips (newlines)


class Changed(StorageError):
    """The stored value changed while it was being read in slices."""


# -- readers --------------------------------------------------------------
# A value read in slices straight from Anchore's table would cost PostgreSQL a
# decompression of everything before each slice (TOAST compresses large
# values): quadratic in the size. So the value is first copied, in one
# statement (one snapshot: the slices are of one version), into a temporary
# table of this session that stores it uncompressed, where each slice costs
# only its own size.
STAGE = """CREATE TEMP TABLE IF NOT EXISTS objmig_stream_value (v bytea, b64 boolean);
           ALTER TABLE objmig_stream_value ALTER COLUMN v SET STORAGE EXTERNAL;
           TRUNCATE objmig_stream_value"""
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


def read_staged(conn, url, stage, key):
    conn.execute(STAGE)
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
            conn.execute("TRUNCATE objmig_stream_value")


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
    """An S3 object in ranged GETs; `proven` once its bytes hashed to an MD5 ETag."""

    def __init__(self, driver, url):
        self.driver, self.url = driver, url
        self.bucket, self.key = split_s3_url(url)
        self.attempts = int(driver.store.driver_config.get("max_attempts", 5))
        self.proven = False

    def __iter__(self):
        _, headers, _ = self.retried(lambda: self.driver.fast.request("HeadObject", "HEAD", self.bucket, self.key))
        length = int(headers.get("content-length") or 0)
        etag = headers.get("etag")
        md5_etag = s3_crt.plain_md5_etag(headers)
        md5 = codec.md5_of(b"")
        for start in range(0, length, SLICE):
            end = min(start + SLICE, length) - 1
            data = self.retried(lambda: self.slice(start, end, length, etag))
            md5.update(data)
            yield data
        if md5_etag is not None:
            if md5.hexdigest() != md5_etag:  # the parts were each whole, but not of one object
                raise StorageError(f"cannot read {self.url}: the bytes read do not hash to its ETag {md5_etag}")
            self.proven = True

    def slice(self, start, end, length, etag):
        _, headers, data = self.driver.fast.request("GetObject", "GET", self.bucket, self.key,
                                                    headers=[("Range", f"bytes={start}-{end}")])
        if headers.get("etag") != etag:
            raise Changed(f"{self.url} changed while it was read (ETag {etag}, then {headers.get('etag')})")
        if len(data) != end - start + 1 or not headers.get("content-range", "").endswith(f"/{length}"):
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


# -- sinks ------------------------------------------------------------------
class S3Sink:
    """Stored bytes to an S3 object: one PUT, or a multipart upload once they
    outgrow one part. Parts go up a few at a time on the driver's part pool."""

    def __init__(self, driver, url, fence):
        self.driver, self.url, self.fence = driver, url, fence
        self.bucket, self.key = split_s3_url(url)
        self.buffer = bytearray()
        self.upload_id = None
        self.parts = []  # futures of (md5, etag), in part order

    def write(self, data):
        self.buffer += data
        while len(self.buffer) > self.driver.part_size:  # ">": a last part of exactly part_size stays one PUT
            part = bytes(self.buffer[:self.driver.part_size])
            del self.buffer[:self.driver.part_size]
            self.send(part)

    def send(self, part):
        if self.upload_id is None:
            self.fence()
            self.upload_id = self.driver.fast.create_multipart(self.bucket, self.key, CONTENT_TYPE)
        while len(self.parts) - sum(f.done() for f in self.parts) >= 2:  # bounded: two parts in memory at once
            next(f for f in self.parts if not f.done()).result()
        number = len(self.parts) + 1
        self.parts.append(self.driver.parts_executor().submit(self.upload_part, number, part))
        failed = next((f for f in self.parts if f.done() and f.exception()), None)
        if failed is not None:
            raise failed.exception()

    def upload_part(self, number, part):
        self.fence()  # no part leaves once this process may no longer write
        md5 = codec.md5_of(part).digest()
        etag = self.driver.fast.upload_part(self.bucket, self.key, self.upload_id, number, part, md5)
        crash_point("stream-chunk")
        return md5, etag

    def finish(self, stored):
        """Send the rest and make the object visible; `stored` (a codec.Stored
        without data) is what it must be."""
        if self.upload_id is None:
            self.fence()
            self.driver.fast.put(self.bucket, self.key, bytes(self.buffer), bytes.fromhex(stored.digest), CONTENT_TYPE)
            crash_point("stream-chunk")
            return
        if self.buffer:
            self.send(bytes(self.buffer))
            self.buffer = bytearray()
        md5s, etags = zip(*(future.result() for future in self.parts))
        crash_point("stream-complete")
        self.fence()  # completing is what makes the object visible
        etag, encrypted = self.driver.fast.complete_multipart(self.bucket, self.key, self.upload_id, etags)
        self.upload_id = None
        expected = f"{codec.md5_of(b''.join(md5s)).hexdigest()}-{len(md5s)}"
        if not encrypted and etag.strip('"').lower() != expected:
            raise StorageError(f"{self.url}: the finished upload's ETag {etag} is not {expected}, the one its parts make")

    def abort(self):
        for future in self.parts:
            future.cancel()
        for future in self.parts:  # parts in the air land (or fail) before the abort frees them all
            if not future.cancelled():
                try:
                    future.result()
                except BaseException:  # noqa: BLE001 - the first error is already on its way
                    pass
        if self.upload_id is not None:
            try:
                self.driver.fast.abort_multipart(self.bucket, self.key, self.upload_id)
            except Exception:  # noqa: BLE001 - the original error is the one worth reporting
                log.warning("could not abort the multipart upload of %s; the next run aborts it", self.url)


class FileSink:
    """Stored bytes to a localfs file as localfs.write_one writes one: a
    temporary file beside it, fsynced, renamed into place once the fence allows,
    the directories synced."""

    def __init__(self, driver, url, fence):
        self.driver, self.fence = driver, fence
        self.path = localfs.path_of(url)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd, self.temporary = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=localfs.temp_prefix())
        self.handle = os.fdopen(fd, "wb")

    def write(self, data):
        self.handle.write(data)
        crash_point("stream-chunk")

    def finish(self, stored):
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.chmod(self.temporary, 0o644)
        crash_point("stream-complete")
        self.fence()
        os.replace(self.temporary, self.path)
        self.temporary = None
        localfs.sync_directories(os.path.dirname(self.path), self.driver.directory)

    def abort(self):
        self.handle.close()
        if self.temporary is not None:
            try:
                os.unlink(self.temporary)
            except FileNotFoundError:
                pass


COPY_ESCAPES = ((b"\\", b"\\\\"), (b"\n", b"\\n"), (b"\r", b"\\r"), (b"\t", b"\\t"))


def copy_escape(data):
    """Bytes as a field of COPY's text format."""
    for raw, escaped in COPY_ESCAPES:
        data = data.replace(raw, escaped)
    return data


def copy_field(text):
    return copy_escape(text.encode("utf-8"))


class NotText(Exception):
    """The document is not UTF-8 text without NUL: archive_document wants it base64."""


class DbSink:
    """Stored bytes into archive_document: as text while they are UTF-8
    without NUL (NotText otherwise, and the caller starts again with b64=True),
    or base64 with newlines, exactly as codec.to_db_text would store them."""

    def __init__(self, copy, url, b64):
        self.copy, self.b64 = copy, b64
        user, bucket, archive_id = split_url(url, "db")
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.pending = b""  # base64: bytes not yet a whole number of lines
        now = str(epoch_now()).encode()
        self.tail = b"\t" + (b"t" if b64 else b"f") + b"\t" + now + b"\t" + now + b"\tactive\n"
        copy.write(b"\t".join(copy_field(v) for v in (bucket, archive_id, user, archive_id + ".json")) + b"\t")

    columns = '(bucket, "archiveId", "userId", "documentName", jsondata, b64_encoded, created_at, last_updated, record_state_key)'
    table = "archive_document"

    @staticmethod
    def delete(conn, url):
        conn.execute("""DELETE FROM archive_document WHERE "userId" = %(u)s AND bucket = %(b)s AND "archiveId" = %(a)s""",
                     db_key(url, "db"))

    def write(self, data):
        if self.b64:
            data = self.pending + data
            cut = len(data) - len(data) % B64_LINE
            self.pending = data[cut:]
            self.copy.write(copy_escape(base64.encodebytes(data[:cut])))
        else:
            if b"\x00" in data:
                raise NotText("it holds a NUL byte")
            try:
                self.utf8.decode(data)
            except UnicodeDecodeError:
                raise NotText("it is not UTF-8 text") from None
            self.copy.write(copy_escape(data))
        crash_point("stream-chunk")

    def end(self):
        if self.b64:
            self.copy.write(copy_escape(base64.encodebytes(self.pending)))
        else:
            try:
                self.utf8.decode(b"", final=True)
            except UnicodeDecodeError:
                raise NotText("it is not UTF-8 text") from None
        self.copy.write(self.tail)


class Db2Sink:
    """Stored bytes into object_storage.content (bytea, hex in COPY's text format)."""

    columns = '("userId", bucket, key, version, object_metadata, content, created_at, last_updated)'
    table = "object_storage"

    def __init__(self, copy, url, b64=False):
        self.copy = copy
        user, bucket, key = split_url(url, "db2")
        now = str(epoch_now()).encode()
        self.tail = b"\t" + now + b"\t" + now + b"\n"
        copy.write(b"\t".join(copy_field(v) for v in (user, bucket, key)) + b"\t\t\\N\t\\\\x")

    @staticmethod
    def delete(conn, url):
        conn.execute("""DELETE FROM object_storage WHERE "userId" = %(u)s AND bucket = %(b)s AND key = %(a)s
                        AND version = ''""", db_key(url, "db2"))

    def write(self, data):
        self.copy.write(data.hex().encode("ascii"))
        crash_point("stream-chunk")

    def end(self):
        self.copy.write(self.tail)
