"""Compression, decompression and digests: the only module that knows zlib.

Anchore stores a document either as its plain bytes or as zlib data (level 3)
and records which in ``archive_metadata.is_compressed``; ``digest`` is the MD5
hex of the stored bytes and ``size`` their length. Both zlib and hashlib run
in C and release the GIL on large buffers, so I/O threads overlap with them.
"""

import base64
import hashlib
import zlib
from dataclasses import dataclass

ZLIB_LEVEL = 3


class DigestMismatch(ValueError):
    """The stored bytes do not hash to the digest in the metadata row."""


class TooLarge(Exception):
    """Decompressed, the document is larger than the caller may hold whole."""


class CorruptDocument(ValueError):
    """The stored bytes cannot be what was stored: they do not decompress, do
    not decode from base64, or are not as long as the metadata says."""


@dataclass(frozen=True)
class Stored:
    """Bytes as a backend stores them, with the metadata Anchore records."""

    data: bytes
    is_compressed: bool
    digest: str  # MD5 hex of data
    md5: bytes  # the raw MD5, for Content-MD5 headers
    # True when digest is the metadata row's, not yet checked against data:
    # the destination's Content-MD5 check is what proves it.
    unchecked: bool = False

    @property
    def size(self):
        return len(self.data)


def md5_of(data):
    return hashlib.md5(data, usedforsecurity=False)


def decode(stored_bytes, is_compressed, expected_digest, expected_size=None, limit=None, known_md5=None):
    """The document's plain bytes, after checking the digest and size of what was stored.

    `limit`: raise TooLarge rather than decompress more than this many bytes.
    `known_md5`: the MD5 hex of `stored_bytes` when already computed (as they
    were read), so they are not hashed a second time.

    A NULL digest or size (rows written by old Anchore versions) cannot be
    checked; whatever is known is, and any mismatch refuses the document.
    """
    if expected_digest:
        actual = known_md5 or md5_of(stored_bytes).hexdigest()
        if actual != expected_digest.strip().lower():
            raise DigestMismatch(f"digest mismatch: metadata says {expected_digest}, stored bytes hash to {actual}")
    if expected_size is not None and len(stored_bytes) != expected_size:
        raise CorruptDocument(f"size mismatch: metadata says {expected_size} bytes, read {len(stored_bytes)}")
    if not is_compressed:
        return stored_bytes
    try:
        if limit is None:
            return zlib.decompress(stored_bytes)
        inflate = zlib.decompressobj()
        plain = inflate.decompress(stored_bytes, limit + 1)
        if len(plain) > limit:
            raise TooLarge(f"decompresses to more than {limit} bytes")
        if not inflate.eof:  # what zlib.decompress would say of a cut-off stream
            raise zlib.error("Error -5 while decompressing data: incomplete or truncated stream")
        return plain
    except zlib.error as exc:
        raise CorruptDocument(f"marked compressed but does not decompress: {exc}") from None


def encode(plain, compress, threshold, plain_digest=None):
    """Plain bytes as they should be stored: zlib when enabled and len > threshold.

    `plain_digest`: the MD5 hex of `plain` when already known (and checked),
    so an uncompressed document is not hashed a second time.
    """
    is_compressed = bool(compress) and len(plain) > threshold
    if not is_compressed and plain_digest:
        digest = plain_digest.strip().lower()
        return Stored(data=plain, is_compressed=False, digest=digest, md5=bytes.fromhex(digest))
    data = zlib.compress(plain, ZLIB_LEVEL) if is_compressed else plain
    digest = md5_of(data)
    return Stored(data=data, is_compressed=is_compressed, digest=digest.hexdigest(), md5=digest.digest())


def is_md5_hex(digest):
    """A digest as Anchore writes it: 32 hex digits (any case, maybe padded)."""
    text = (digest or "").strip()
    return len(text) == 32 and all(c in "0123456789abcdefABCDEF" for c in text)


def mismatch(stored):
    """DigestMismatch when an unchecked Stored's bytes do not hash to its digest, else None."""
    actual = md5_of(stored.data).hexdigest()
    if actual == stored.digest:
        return None
    return DigestMismatch(f"digest mismatch: metadata says {stored.digest}, stored bytes hash to {actual}")


def content_md5_header(md5_bytes):
    """The base64 form of a raw MD5, as the Content-MD5 header wants it."""
    return base64.b64encode(md5_bytes).decode("ascii")


def to_db_text(data):
    """archive_document.jsondata and b64_encoded for stored bytes.

    Valid UTF-8 (JSON documents) is stored as text; anything else, e.g. zlib
    data, base64 with newlines (MIME style), as Anchore's db driver does.
    NUL is valid UTF-8 but PostgreSQL text cannot hold it, so it goes base64.
    """
    if b"\x00" not in data:
        try:
            return data.decode("utf-8"), False
        except UnicodeDecodeError:
            pass
    return base64.encodebytes(data).decode("ascii"), True


def from_db_text(jsondata, b64_encoded):
    """Stored bytes from archive_document.jsondata, given as its UTF-8 bytes;
    NULL reads as empty."""
    if jsondata is None:
        return b""
    if b64_encoded:
        try:
            return base64.b64decode(jsondata)
        except (ValueError, TypeError) as exc:  # binascii.Error is a ValueError
            raise CorruptDocument(f"b64_encoded but not valid base64: {exc}") from None
    return bytes(jsondata)
