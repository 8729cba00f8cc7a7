"""Shared plumbing of the two drivers that keep documents in PostgreSQL."""

import time

from anchore_objmig.errors import StorageError


def split_url(url, scheme):
    """(userId, bucket, archiveId) of a db:// or db2:// URL."""
    body = url[len(scheme) + 3:]
    parts = body.split("/", 2)
    if len(parts) != 3 or not all(parts):
        raise StorageError(f"malformed {scheme} URL: {url}")
    return parts


def key_arrays(urls, scheme):
    """Three parallel arrays (users, buckets, ids) for an unnest() join."""
    users, buckets, ids = [], [], []
    for url in urls:
        user, bucket, archive_id = split_url(url, scheme)
        users.append(user)
        buckets.append(bucket)
        ids.append(archive_id)
    return users, buckets, ids


def epoch_now():
    return int(time.time())


def failing_all(urls, exc):
    """The per-URL failure map for a batch statement that failed as a whole."""
    error = exc if isinstance(exc, StorageError) else StorageError(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
    return {url: error for url in urls}
