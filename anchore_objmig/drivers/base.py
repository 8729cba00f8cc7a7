"""What every storage driver offers, and the records that pass between them.

A driver owns one *location*: a URL prefix such as ``db://`` or
``s3://bucket/prefix``. It builds document URLs in Anchore's exact layout,
and reads, writes and deletes documents in bulk (one call per batch), so the
worker never loops over single documents against a backend.
"""

import hashlib
from dataclasses import dataclass

from anchore_objmig.codec import Stored


@dataclass(frozen=True, slots=True)
class DocRow:
    """One archive_metadata row: a document and where its bytes are."""

    bucket: str
    archive_id: str
    user_id: str
    document_name: str
    content_url: str
    is_compressed: bool
    digest: str | None
    size: int | None

    @property
    def key(self):
        """archive_metadata's primary key of the row, in its column order."""
        return (self.bucket, self.archive_id, self.user_id, self.document_name)

    @property
    def label(self):
        """How the operator sees this document in messages."""
        return f"{self.user_id}/{self.bucket}/{self.archive_id}"


@dataclass(frozen=True, slots=True)
class WriteItem:
    """A document to store at `url`, already encoded for the destination."""

    url: str
    user_id: str
    bucket: str
    archive_id: str
    stored: Stored


def md5_hex(text):
    return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()


class Driver:
    """Base of the storage drivers; subclasses fill in the bulk operations."""

    name = ""  # the config's storage_driver.name
    scheme = ""  # the URL scheme of content_url
    summary = ""  # one line for list-drivers
    supports_compression = True
    in_catalog_db = False  # documents kept in the catalog database itself (db, db2)
    # "plain": {base}{userId}/{bucket}/{archiveId}
    # "md5":   {base}{md5(userId)}/{bucket}/{md5(archiveId)[:2]}/{md5(archiveId)}.json
    key_layout = "plain"

    def __init__(self, store, context):
        self.store = store
        self.context = context

    @classmethod
    def validate(cls, store):
        """Raise ConfigError for a driver config that cannot work."""

    @property
    def url_base(self):
        """Everything in a document URL before the per-document part."""
        return f"{self.scheme}://"

    @property
    def location(self):
        """The URL prefix that identifies this driver's documents."""
        return self.url_base

    def url_for(self, user_id, bucket, archive_id):
        if self.key_layout == "md5":
            doc = md5_hex(archive_id)
            return f"{self.url_base}{md5_hex(user_id)}/{bucket}/{doc[:2]}/{doc}.json"
        return f"{self.url_base}{user_id}/{bucket}/{archive_id}"

    def owns(self, url):
        return url.startswith(self.location)

    def identity(self):
        """What names this driver's place in a run's manifest (no secrets).
        db and db2 live in the catalog database, the one holding the run."""
        return {"driver": self.name, "location": self.location}

    def describe(self):
        """The location for messages; never holds a secret."""
        return self.location

    def check_access(self, write, create=True):
        """Fail early if the backend cannot be reached (or written, if `write`);
        create what the config says may be created only if `create`."""

    def write_run_marker(self, token):
        """As a run's destination: leave `token` in this store, for a joining
        host to prove it reaches the same store and not a namesake (a
        directory not mounted there, another S3 server behind the same
        address). db and db2 need none: they are the run's own database."""

    def read_run_marker(self):
        """The token write_run_marker left here, or None."""
        return None

    def remove_run_marker(self):
        """At the run's end; a marker left by a stopped run is overwritten by the next."""

    def clean_up_before_run(self, conn):
        """As a migration's destination, before it writes: remove what killed
        writes of earlier runs left behind (and say how much)."""

    def clean_up_after_run(self, conn, before):
        """As a migration's destination, once every shard of the run is over
        (so no live worker of it may still finish a write): remove what writes
        begun before `before` (a UTC datetime) by its killed or fenced-off
        workers left behind."""

    def read_many(self, urls):
        """{url: stored bytes or the exception that stopped its read}."""
        raise NotImplementedError

    def checks_digest_of(self, size):
        """Whether writing `size` stored bytes here is one request whose
        Content-MD5 the backend itself checks against the bytes, so a digest
        taken from the metadata row need not be computed here first: a
        mismatch is refused (and write_many says DigestMismatch)."""
        return False

    def read_proven(self, urls):
        """{url: (stored bytes or exception, proof)}: `proof` is the bytes' MD5
        hex when the backend itself vouched that they are whole (an S3 ETag
        that is their MD5, checked as they were read), else None."""
        return {url: (found, None) for url, found in self.read_many(urls).items()}

    def write_many(self, items):
        """Store every WriteItem; {url: exception} for those that failed."""
        raise NotImplementedError

    def submit_writes(self, items):
        """Start writing `items`; returns a function that waits for them and
        gives {url: exception} for those that failed. Drivers with network
        writes return at once, so the worker can prepare the next batch
        while these are in flight."""
        errors = self.write_many(items)
        return lambda: errors

    def delete_many(self, urls):
        """Delete the documents at `urls`; {url: exception} for those that failed."""
        raise NotImplementedError

    def close(self):
        pass


class NotFound(LookupError):
    """The backend has no document at that URL."""
