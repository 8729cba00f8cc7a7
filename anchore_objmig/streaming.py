"""Documents too large to hold whole, moved one at a time as a stream.

A document whose stored size is above THRESHOLD (or whose decoded size turns
out to be, see codec.decode's `limit`) is never held in memory: its stored
bytes are read a slice at a time (drivers/stream_read.py), hashed, decompressed
and recompressed incrementally, and written as they come (drivers/stream_write.py:
multipart parts to S3, a COPY FROM STDIN into PostgreSQL, a localfs temporary
file). Memory stays a few slices whatever the document's size.

The safety order is the batch's: the destination copy is written and
confirmed, and the source digest and size checked, before the copy is made
visible (an S3 upload completed, a staged row inserted, a file renamed); the
metadata row and the source delete then go through the batch's own
commit_metadata and delete_sources (worker.land_batch), so a streamed
document is one more item of its batch. A document whose source fails its checks leaves no copy behind.

Two choices depend on the whole document: archive_document stores text only
if all of it is UTF-8 without NUL, and compression applies only above
min_size_kbytes. Both are guessed up front and checked as the bytes go by; a
wrong guess starts the document again with the right one (so a binary
document bound for `db` is read twice).
"""

import logging
import os
import zlib
from dataclasses import dataclass

import psycopg

from anchore_objmig import codec, db, integrity, ledger, signals
from anchore_objmig.drivers import NotFound, WriteItem
from anchore_objmig.drivers import stream_read, stream_write
from anchore_objmig.errors import ConnectError, StorageError
from anchore_objmig.faults import crash_point
from anchore_objmig.ledger import LeaseLost

log = logging.getLogger(__name__)

# Stored bytes above which a document is streamed, at most: a run streams
# above its batch byte budget when that is smaller (threshold_for), so no
# document held whole is larger than a batch may be. The environment variable
# lowers it for the tests.
THRESHOLD = int(os.environ.get("OBJMIG_STREAM_THRESHOLD") or 32 * 1024 * 1024)
PIECE = stream_read.SLICE  # at most this many decompressed bytes at a time (a zlib bomb stays a stream)
STREAMABLE = {"db", "db2", "s3", "localfs"}  # drivers that can be read and written as streams


@dataclass(frozen=True)
class StreamedStored:
    """What commit_metadata needs of a stored copy, without its bytes."""

    is_compressed: bool
    digest: str
    size: int


class Restart(Exception):
    """A guess made at the start was wrong: move the document again with `changes`."""

    def __init__(self, why, **changes):
        super().__init__(why)
        self.changes = changes


class SourceFailed(Exception):
    """The source could not be read whole, or failed its checks: `kind` says which."""

    def __init__(self, kind, detail):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def can_stream(source, dest):
    return source.name in STREAMABLE and dest.name in STREAMABLE


def threshold_for(batch_bytes):
    """The streaming threshold of a run: a smaller --batch-bytes lowers the
    largest document held whole too (the advice after an OOM)."""
    return min(THRESHOLD, batch_bytes)


def measured_sizes(conn, source, rows):
    """{content_url: stored size} of the rows with no size (old Anchore
    versions), measured without a read of the document: octet_length in
    PostgreSQL, stat on localfs, a HEAD in S3."""
    unknown = [row.content_url for row in rows if row.size is None]
    if unknown and source.in_catalog_db:
        return stream_read.sizes_in_db(conn, source.scheme, unknown)
    if unknown and source.name == "localfs":
        return stream_read.sizes_of_files(unknown)
    if unknown and source.name == "s3":
        return source.sizes_of(unknown)
    return {}


def large_rows(conn, source, dest, rows, threshold=THRESHOLD, measured=None):
    """The rows to stream: stored size above `threshold`. Rows with no size
    (old Anchore versions) are measured (measured_sizes), but those whose size
    `measured` already says."""
    if not can_stream(source, dest):
        return []
    measured = measured or {}
    measured = {**measured, **measured_sizes(conn, source, [row for row in rows if row.content_url not in measured])}
    return [row for row in rows
            if (row.size if row.size is not None else measured.get(row.content_url, 0)) > threshold]


def described(row):
    return f"{row.size / 2**20:.1f} MiB stored" if row.size is not None else "size unknown"


def check(driver, row):
    """verify's judgement of one large document, read as a stream: None when
    its stored bytes serve `row`, else why not (in verify's words)."""
    log.info("checking %s (%s) in pieces: too large to hold whole", row.label, described(row))
    pieces = Decoded(open_reader(driver, row.content_url), row)
    try:
        for _ in pieces:
            pass  # decompressed to prove it decompresses, then dropped
        pieces.check()
    except SourceFailed as exc:
        return {integrity.MISSING: "not found", integrity.UNREADABLE: f"unreadable: {exc.detail}"}.get(exc.kind,
                                                                                                       exc.detail)
    return None


def move(conn, lease, rows, source, dest, dest_store, result):
    """Stream each row's document to the destination; the (DocRow, WriteItem)
    of those written and confirmed there. Failures go into `result` as the
    batch path records them; LeaseLost and a lost database stop the batch."""
    items = []
    for row in rows:
        url = dest.url_for(row.user_id, row.bucket, row.archive_id)
        log.info("streaming %s (%s) in pieces: too large to hold whole", row.label, described(row))
        try:
            stored, proven = move_one(conn, lease, row, url, source, dest, dest_store)
        except SourceFailed as exc:
            result.failures.append((row, str(exc)))
            continue
        except (LeaseLost, psycopg.OperationalError, ConnectError):
            raise  # the database away (the reader's session too): the batch is given back and retried
        except Exception as exc:  # noqa: BLE001 - the destination refused it; this document's alone
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            result.failures.append((row, f"write refused: {detail}"))
            continue
        if not proven and row.digest is None and row.size is None:
            result.unverifiable.append(row)
        items.append((row, WriteItem(url, row.user_id, row.bucket, row.archive_id, stored)))
    return items


def move_one(conn, lease, row, url, source, dest, dest_store):
    """(StreamedStored, proven) of one document written to `url`."""
    allowed = dest_store.compression_enabled and dest.supports_compression
    # Plain size is the stored size when the source is not compressed; a compressed one decompresses to more.
    bigger = row.is_compressed or row.size is None or row.size > dest_store.compression_threshold
    guess = {"compress": allowed and bigger, "b64": False}
    for _ in range(3):
        try:
            return attempt(conn, lease, row, url, source, dest, dest_store, allowed, **guess)
        except Restart as again:
            log.info("%s: streaming it again (%s)", row.label, again)
            guess.update(again.changes)
    raise StorageError(f"{row.label}: could not settle how to store it")


def attempt(conn, lease, row, url, source, dest, dest_store, allowed, compress, b64):
    crash_point("stream-document")
    reader = open_reader(source, row.content_url)
    pieces = Decoded(reader, row)
    # Neither side compressed: the stored bytes are the source's, so its MD5 serves both.
    encoder = Encoder(compress, same_as=pieces if not compress and not row.is_compressed else None)
    fence = dest.context.check_fence
    progress = getattr(dest.context.fence, "progress", lambda: None)

    def between_pieces():
        """A stop asked for, or a lease lost, ends the stream here, not at its end."""
        signals.stop_if_asked()
        fence()
        progress()

    if not dest.in_catalog_db:
        sink = (stream_write.S3Sink if dest.name == "s3" else stream_write.FileSink)(dest, url, fence)
        try:
            for piece in pieces:
                sink.write(encoder.feed(piece))
                between_pieces()
            sink.write(encoder.end())
            stored = settle(encoder, pieces, dest_store, allowed, compress)
            sink.finish(stored)
        except BaseException:
            sink.abort()
            raise
        return stored, pieces.proven
    kind = stream_write.DbSink if dest.name == "db" else stream_write.Db2Sink
    fence()
    # The COPY fills a temporary table of this session: a stream that stalls
    # (a frozen host) locks nothing of Anchore's. The row then goes into
    # Anchore's table in one short fenced transaction.
    stream_write.stage(conn, kind)
    try:
        with db.transaction(conn), conn.cursor() as cur:
            cur.execute("SET LOCAL statement_timeout = 0")  # --db-timeout is for statements, not a long stream
            if conn.info.encoding != "utf-8":
                cur.execute("SET LOCAL client_encoding TO 'UTF8'")  # the text fields below are UTF-8 bytes
            with cur.copy(f"COPY {kind.stage} {kind.columns} FROM STDIN") as copy:
                sink = kind(copy, url, b64)
                try:
                    for piece in pieces:
                        sink.write(encoder.feed(piece))
                        between_pieces()  # raising inside the COPY is safe: it is failed and rolled back
                    sink.write(encoder.end())
                    sink.end()
                except stream_write.NotText as exc:
                    raise Restart(f"{exc}: archive_document stores it base64", b64=True) from exc
                stored = settle(encoder, pieces, dest_store, allowed, compress)
        crash_point("stream-staged")
        with db.transaction(conn):
            conn.execute("SET LOCAL statement_timeout = 0")  # one large value copied
            ledger.confirm_lease(conn, lease)  # a stale worker commits nothing
            fence()
            kind.delete(conn, url)  # a copy an interrupted run left: written afresh
            stream_write.unstage(conn, kind)
    finally:
        stream_write.clear(conn, kind)
    return stored, pieces.proven


def open_reader(source, url):
    if source.name == "s3":
        return stream_read.S3Reader(source, url)
    if source.name == "localfs":
        return stream_read.read_file(url)
    read = stream_read.read_db if source.name == "db" else stream_read.read_db2
    return read(source.context.reader_connection(), url)


def settle(encoder, pieces, dest_store, allowed, compress):
    """The stored copy's metadata, once the source was proven whole and the guesses right."""
    pieces.check()
    if compress != (allowed and pieces.plain_size > dest_store.compression_threshold):
        raise Restart(f"{pieces.plain_size} bytes plain: {'not ' if compress else ''}above min_size_kbytes, "
                      f"so {'not ' if compress else ''}compressed", compress=not compress)
    return StreamedStored(is_compressed=compress, digest=encoder.hexdigest(), size=encoder.size)


class Decoded:
    """The document's plain bytes, piece by piece, from a reader of its stored
    bytes; check() then proves the stored bytes against the metadata row."""

    def __init__(self, reader, row):
        self.reader, self.row = reader, row
        # A reader that hashes what it yields (S3's, for the ETag) is not hashed twice.
        self.hashed_by_reader = getattr(reader, "md5", None) is not None
        self.md5 = reader.md5 if self.hashed_by_reader else codec.md5_of(b"")
        self.stored_size = 0
        self.plain_size = 0
        self.inflate = zlib.decompressobj() if row.is_compressed else None

    @property
    def proven(self):
        return getattr(self.reader, "proven", False)

    def __iter__(self):
        try:
            for data in self.reader:
                if not self.hashed_by_reader:
                    self.md5.update(data)
                self.stored_size += len(data)
                yield from self.plain(data)
            if self.inflate is not None:
                if not self.inflate.eof:
                    raise codec.CorruptDocument("marked compressed but does not decompress: "
                                                "incomplete or truncated stream")
                yield from self.counted(self.inflate.flush())
        except NotFound as exc:
            raise SourceFailed(integrity.MISSING, str(exc)) from None
        except codec.CorruptDocument as exc:
            raise SourceFailed(integrity.CORRUPT, str(exc)) from None
        except (psycopg.OperationalError, ConnectError):
            raise  # the reader's session lost (a restart, a terminated backend): not the document's fault
        except (StorageError, psycopg.Error) as exc:
            raise SourceFailed(integrity.UNREADABLE, str(exc).strip().splitlines()[0]) from None

    def plain(self, data):
        if self.inflate is None:
            yield from self.counted(data)
            return
        if self.inflate.eof:
            return  # after the zlib stream ends, as zlib.decompress: the rest is ignored
        try:
            while data:
                yield from self.counted(self.inflate.decompress(data, PIECE))
                data = self.inflate.unconsumed_tail
        except zlib.error as exc:
            raise codec.CorruptDocument(f"marked compressed but does not decompress: {exc}") from None

    def counted(self, piece):
        self.plain_size += len(piece)
        if piece:
            yield piece

    def check(self):
        """Digest and size of the stored bytes against the metadata row, as codec.decode does."""
        row = self.row
        if row.digest and self.md5.hexdigest() != row.digest.strip().lower():
            raise SourceFailed(integrity.CORRUPT, f"digest mismatch: metadata says {row.digest}, stored bytes hash "
                                                  f"to {self.md5.hexdigest()}")
        if row.size is not None and self.stored_size != row.size:
            raise SourceFailed(integrity.CORRUPT, f"size mismatch: metadata says {row.size} bytes, read "
                                                  f"{self.stored_size}")


class Encoder:
    """Plain pieces to the destination's stored bytes, with their MD5 and size.

    `same_as`: the Decoded source whose stored bytes these are, byte for byte
    (neither side compressed); its MD5 is theirs, so they are not hashed twice.
    """

    def __init__(self, compress, same_as=None):
        self.deflate = zlib.compressobj(codec.ZLIB_LEVEL) if compress else None
        self.same_as = same_as
        self.md5 = codec.md5_of(b"") if same_as is None else None
        self.size = 0

    def hexdigest(self):
        return (self.md5 if self.md5 is not None else self.same_as.md5).hexdigest()

    def feed(self, piece):
        return self.counted(self.deflate.compress(piece) if self.deflate else piece)

    def end(self):
        return self.counted(self.deflate.flush() if self.deflate else b"")

    def counted(self, data):
        if self.md5 is not None:
            self.md5.update(data)
        self.size += len(data)
        return data
