"""Per-document PUT, GET and bulk DeleteObjects through minio's lighter client.

A migration makes one request per document, so per-request client CPU is
what limits it on a small host: botocore spends about three times the CPU of
minio's client on a small PutObject (event hooks, model-driven serialising;
measured in perf/). Bulk and rare operations (bucket checks, multipart,
DeleteObjects) stay on boto3.

minio's public put_object cannot send Content-MD5 over plain HTTP, and the
server's MD5 check is what lets us delete the source copy; so PUTs go
through its `_put_object`, which sends the headers we give it and signs
them. tests/test_faults.py checks on the wire that every document PUT carries
a correct Content-MD5, so a minio release that changes this fails the tests.
"""

from urllib.parse import urlsplit

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.credentials.credentials import Credentials
from minio.credentials.providers import Provider
from minio.error import S3Error

from anchore_objmig import codec

RETRY_STATUSES = (500, 502, 503, 504)


class Boto3ChainProvider(Provider):
    """iamauto: the standard AWS credential chain (env, profile, instance or pod
    role), resolved by boto3 and refreshed when it expires."""

    def __init__(self):
        import boto3  # only for iamauto: its credential chain is the standard one

        self.session = boto3.session.Session()

    def retrieve(self):
        found = self.session.get_credentials()
        if found is None:
            raise RuntimeError("iamauto: no AWS credentials found in the environment, profile or instance role")
        frozen = found.get_frozen_credentials()
        return Credentials(frozen.access_key, frozen.secret_key, frozen.token)


class HotPathError(Exception):
    """A failed single-object request; `code` is the S3 error code."""

    retryable = False  # urllib3 already retried what it can

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code


def make_minio(config, io_threads, truthy):
    """A minio client for the driver config, with retries like boto3's."""
    url = config.get("url")
    region = config.get("region") if isinstance(config.get("region"), str) and config.get("region") else "us-east-1"
    if url:
        parts = urlsplit(url if "://" in url else f"https://{url}")
        endpoint, secure = parts.netloc, parts.scheme == "https"
    else:
        endpoint, secure = f"s3.{region}.amazonaws.com", True
    verify = config.get("verify")
    ca_bundle = config.get("ca_bundle") or (verify if isinstance(verify, str) else None)
    check_cert = not (verify is not None and not isinstance(verify, str) and not truthy(verify))
    attempts = int(config.get("max_attempts", 5))
    http = urllib3.PoolManager(
        num_pools=4,
        maxsize=max(10, io_threads * 2),
        timeout=urllib3.Timeout(connect=float(config.get("connect_timeout", 10)),
                                read=float(config.get("read_timeout", 120))),
        cert_reqs="CERT_REQUIRED" if check_cert else "CERT_NONE",
        ca_certs=ca_bundle,
        retries=urllib3.Retry(
            total=attempts - 1,
            backoff_factor=0.5,  # 0.5, 1, 2, 4 s ... with jitter, like botocore's standard mode
            backoff_jitter=0.5,
            # At most 20 s between attempts and no server-chosen Retry-After:
            # the run's takeover time counts on how long a write can retry
            # (manifest.write_grace_seconds).
            backoff_max=20,
            status_forcelist=RETRY_STATUSES,
            allowed_methods=None,  # PUT and GET of a whole object are safe to repeat
            raise_on_status=False,  # give us the last answer, so the error names its S3 code
            respect_retry_after_header=False,
        ),
    )
    if truthy(config.get("iamauto")):
        return Minio(endpoint, secure=secure, region=region, http_client=http, credentials=Boto3ChainProvider())
    return Minio(endpoint, access_key=str(config.get("access_key")), secret_key=str(config.get("secret_key")),
                 secure=secure, region=region, http_client=http)


def put(client, bucket, key, data, md5, content_type):
    """PUT one object with Content-MD5, so the server checks what it stored."""
    headers = {"Content-MD5": codec.content_md5_header(md5), "Content-Type": content_type}
    try:
        client._put_object(bucket, key, data, headers=headers)  # noqa: SLF001 - see the module docstring
    except S3Error as exc:
        raise HotPathError(exc.code, exc.message) from None
    except urllib3.exceptions.HTTPError as exc:
        raise HotPathError(type(exc).__name__, str(exc).splitlines()[0]) from None


class TruncatedBody(HotPathError):
    """A GET's body was not the whole object: retried like a dropped connection."""

    retryable = True


def plain_md5_etag(headers):
    """The object's MD5 hex when its ETag is one, else None.

    Only single-part objects without SSE-KMS or SSE-C have an MD5 ETag: a
    multipart ETag has a '-', an encrypted one is no hash of the bytes.
    """
    etag = (headers.get("ETag") or "").strip().strip('"').lower()
    if len(etag) != 32 or any(c not in "0123456789abcdef" for c in etag):
        return None
    if headers.get("x-amz-server-side-encryption") == "aws:kms":
        return None
    if headers.get("x-amz-server-side-encryption-customer-algorithm"):
        return None
    return etag


def get(client, bucket, key):
    """(the whole object's bytes, whether its ETag proved them), or None when
    there is no such key. A body shorter than its Content-Length, cut off or
    not matching an MD5 ETag raises TruncatedBody."""
    response = None
    try:
        response = client.get_object(bucket, key)
        headers = response.headers
        data = response.read()
    except S3Error as exc:
        if exc.code in ("NoSuchKey", "NoSuchObject"):
            return None
        raise HotPathError(exc.code, exc.message) from None
    except urllib3.exceptions.HTTPError as exc:
        # Raised while reading the body too (IncompleteRead, reset): a dropped connection.
        error = TruncatedBody if response is not None else HotPathError
        raise error(type(exc).__name__, str(exc).splitlines()[0]) from None
    finally:
        if response is not None:
            response.close()
            response.release_conn()
    length = headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) != len(data):
        raise TruncatedBody("ShortBody", f"read {len(data)} bytes, Content-Length says {length}")
    etag = plain_md5_etag(headers)
    if etag is not None and codec.md5_of(data).hexdigest() != etag:
        raise TruncatedBody("ETagMismatch", f"the {len(data)} bytes read do not hash to the object's ETag {etag}")
    return data, etag is not None


def delete(client, bucket, keys):
    """DeleteObjects (minio sends Content-MD5 with it); {key: reason} of the failures."""
    try:
        return {error.name: f"{error.code}: {error.message}"
                for error in client.remove_objects(bucket, [DeleteObject(key) for key in keys])}
    except S3Error as exc:
        raise HotPathError(exc.code, exc.message) from None
    except urllib3.exceptions.HTTPError as exc:
        raise HotPathError(type(exc).__name__, str(exc).splitlines()[0]) from None
