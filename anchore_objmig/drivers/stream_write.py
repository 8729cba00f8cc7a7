"""Writing one document as its bytes come, for documents too large to hold
whole (anchore_objmig/streaming.py strings readers and sinks together).

- S3: one PUT with Content-MD5 if it all fits in one part, else a multipart
  upload, each part with its Content-MD5, the fence checked before every part
  and before completing, and the finished object's ETag checked.
- db/db2: a COPY FROM STDIN (text format) into a temporary table of the
  session shaped like Anchore's, escaped piece by piece, so the server, not
  this process, holds the value, and a stalled stream holds no lock on
  Anchore's tables; after the caller's final checks (digest, lease) one short
  transaction moves the row into Anchore's table.
- localfs: as localfs.write_one writes a file.
"""

import base64
import codecs
import logging
import os
import tempfile

import psycopg

from anchore_objmig import codec, db
from anchore_objmig.drivers import localfs
from anchore_objmig.drivers.postgres import epoch_now, split_url
from anchore_objmig.drivers.s3 import CONTENT_TYPE, split_s3_url
from anchore_objmig.drivers.stream_read import db_key
from anchore_objmig.errors import StorageError
from anchore_objmig.faults import crash_point

log = logging.getLogger(__name__)

B64_LINE = 57  # bytes per MIME base64 line (76 characters and a newline)


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
            raise StorageError(f"{self.url}: the finished upload's ETag {etag} is not {expected}, "
                               "the one its parts make")

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


def stage(conn, kind):
    """An empty temporary table `kind.stage` with the columns `kind` writes, in
    its own short transaction (it reads Anchore's table's shape only)."""
    with db.transaction(conn):
        conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {kind.stage} AS "
                     f"SELECT {kind.columns[1:-1]} FROM {kind.table} WITH NO DATA")
        conn.execute(f"TRUNCATE {kind.stage}")


def unstage(conn, kind):
    """The staged row into Anchore's table (inside the caller's transaction)."""
    conn.execute(f"INSERT INTO {kind.table} {kind.columns} SELECT {kind.columns[1:-1]} FROM {kind.stage}")


def clear(conn, kind):
    """Free the staged value's space at once; a lost session took it with it."""
    if conn.closed:
        return
    try:
        with db.transaction(conn):
            conn.execute(f"TRUNCATE {kind.stage}")
    except psycopg.Error as exc:  # the error on its way out is the one worth reporting
        log.debug("could not empty %s: %s", kind.stage, exc)


class NotText(Exception):
    """The document is not UTF-8 text without NUL: archive_document wants it base64."""


class DbSink:
    """Stored bytes into archive_document: as text while they are UTF-8
    without NUL (NotText otherwise, and the caller starts again with b64=True),
    or base64 with newlines, exactly as codec.to_db_text would store them."""

    columns = ('(bucket, "archiveId", "userId", "documentName", jsondata, b64_encoded, created_at, last_updated, '
               'record_state_key)')
    table = "archive_document"
    stage = "objmig_stream_archive_document"

    def __init__(self, copy, url, b64):
        self.copy, self.b64 = copy, b64
        user, bucket, archive_id = split_url(url, "db")
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.pending = b""  # base64: bytes not yet a whole number of lines
        now = str(epoch_now()).encode()
        self.tail = b"\t" + (b"t" if b64 else b"f") + b"\t" + now + b"\t" + now + b"\tactive\n"
        copy.write(b"\t".join(copy_field(v) for v in (bucket, archive_id, user, archive_id + ".json")) + b"\t")

    @staticmethod
    def delete(conn, url):
        conn.execute("""DELETE FROM archive_document
                        WHERE "userId" = %(u)s AND bucket = %(b)s AND "archiveId" = %(a)s""",
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
    stage = "objmig_stream_object_storage"

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
