"""The `s3` driver: AWS S3 and compatible servers (MinIO, Ceph, SeaweedFS).

Every PUT, every multipart part and every DeleteObjects carries Content-MD5,
so the server itself checks that the bytes it stored are the bytes we sent:
that check is what lets a migration delete the source copy afterwards. A
finished multipart upload's ETag is also compared with the one its parts make.

Per-document requests go through awscrt (s3_crt.py); the rare ones (bucket
checks, listing incomplete uploads of interrupted runs) through boto3, whose
start-up cost only the parent pays.
"""

import logging
import concurrent.futures
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import botocore.exceptions

from anchore_objmig import codec
from anchore_objmig.drivers import s3_crt
from anchore_objmig.drivers.base import Driver, NotFound
from anchore_objmig.errors import ConnectError, ObjmigError, StorageError, UsageError
from anchore_objmig.faults import crash_point

log = logging.getLogger(__name__)

CONTENT_TYPE = "binary/octet-stream"  # what Anchore writes
DELETE_BATCH = 1000  # DeleteObjects' limit
MIN_PART_SIZE = 5 * 1024 * 1024  # S3's smallest multipart part (but the last)
PART_SIZE = 8 * 1024 * 1024  # parts of a multipart upload (smaller with a smaller --multipart-threshold)
PART_THREADS = 4  # parts of large documents in flight at once, per process
PART_POOL_LOCK = threading.Lock()
CLIENT_LOCK = threading.Lock()
TRANSPORT_LOCK = threading.Lock()
PROBE_LOCK = threading.Lock()
# (endpoint, bucket): whether that server checks Content-MD5, probed once per process.
CONTENT_MD5_CHECKED = {}
BAD_DIGEST = frozenset({"BadDigest", "InvalidDigest"})
PROBE_DIR = ".anchore-objmig-probe/"
AUTH_ERRORS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken", "ExpiredToken"}
MISSING_BUCKET = {"NoSuchBucket", "404", "NotFound"}


def split_s3_url(url):
    """(bucket, key) of an s3:// URL; the bucket in the URL wins over the config's."""
    body = url[len("s3://"):]
    bucket, _, key = body.partition("/")
    if not bucket or not key:
        raise StorageError(f"malformed s3 URL: {url}")
    return bucket, key


def error_code(exc):
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", "")) or "ClientError"
    return type(exc).__name__


def describe_error(exc):
    """One line about a boto error; boto messages never hold the credentials."""
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        message = error.get("Message") or ""
        return f"{error.get('Code', 'ClientError')}: {message}".rstrip(": ")
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class S3Driver(Driver):
    name = "s3"
    scheme = "s3"
    summary = "AWS S3 or a compatible server (MinIO, Ceph, SeaweedFS)"

    @classmethod
    def validate(cls, store):
        config = store.driver_config
        bucket = config.get("bucket")
        if not isinstance(bucket, str) or not bucket.strip():
            raise store.error("bucket", "required for the s3 driver")
        iamauto = config.get("iamauto") in (True, "true", "True", "yes")
        has_keys = bool(config.get("access_key")) and bool(config.get("secret_key"))
        if not iamauto and not has_keys:
            raise store.error("access_key", "set access_key and secret_key, or iamauto: true")
        if not config.get("url") and not config.get("region"):
            raise store.error("url", "set url (an S3-compatible endpoint) or region (AWS)")
        prefix = config.get("prefix")
        if prefix is not None and not isinstance(prefix, str):
            raise store.error("prefix", "must be a string")
        url = config.get("url")
        if url and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
            raise store.error("url", "must start with http:// or https://")
        for key in ("max_attempts", "connect_timeout", "read_timeout"):
            value = config.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise store.error(key, "must be a positive number")

    def __init__(self, store, context):
        super().__init__(store, context)
        config = store.driver_config
        self.bucket = config["bucket"].strip()
        self.prefix = config.get("prefix") or ""
        self.endpoint = config.get("url") or None
        self.single_put_limit = max(context.multipart_threshold, MIN_PART_SIZE)
        self.part_size = max(min(context.multipart_threshold, PART_SIZE), MIN_PART_SIZE)
        self._client = None  # boto3, made on first use: workers rarely need it
        self._fast = None  # awscrt, made on first use (in the process that uses it)
        self.pool = None
        self.part_pool = None

    @property
    def url_base(self):
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def fast(self):
        """awscrt, for every per-document request."""
        with TRANSPORT_LOCK:
            if self._fast is None:
                try:
                    self._fast = s3_crt.Transport(self.store.driver_config, truthy, self.context.check_fence)
                except (s3_crt.AwsCrtError, OSError) as exc:  # e.g. a ca_bundle that is missing or no CA file
                    detail = f"{exc.name}: {exc.message}" if isinstance(exc, s3_crt.AwsCrtError) else str(exc)
                    raise ConnectError(f"cannot set up the S3 client{self.where()}: {detail}") from None
        return self._fast

    @property
    def client(self):
        """boto3, for bucket checks and listing incomplete multipart uploads."""
        with CLIENT_LOCK:
            if self._client is None:
                self._client = make_client(self.store.driver_config, self.context.io_threads)
        return self._client

    def identity(self):
        region = self.store.driver_config.get("region")
        endpoint = self.endpoint.rstrip("/") if self.endpoint else f"aws:{region or 'us-east-1'}"
        return {**super().identity(), "endpoint": endpoint, "addressing": "path" if self.endpoint else "auto"}

    def describe(self):
        where = f" at {self.endpoint}" if self.endpoint else ""
        return f"{self.url_base}{where}"

    def executor(self):
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.context.io_threads, thread_name_prefix="s3")
        return self.pool

    # -- start-up checks -------------------------------------------------
    def check_access(self, write, create=True):
        """Check the bucket exists (creating it if configured and `create`) and,
        for a destination, that we may write under the prefix."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError as exc:
            code = error_code(exc)
            if code in MISSING_BUCKET:
                if write and truthy(self.store.driver_config.get("create_bucket")):
                    if not create:
                        return  # it will be created once the operator confirms
                    self.create_bucket()
                else:
                    raise UsageError(
                        f"S3 bucket {self.bucket!r} does not exist{self.where()} "
                        "(create it, or set create_bucket: true)"
                    ) from None
            elif code in AUTH_ERRORS:
                raise ConnectError(f"S3 refused our credentials for bucket {self.bucket!r}{self.where()} ({code})") from None
            else:
                raise ObjmigError(f"S3 bucket {self.bucket!r}{self.where()}: {describe_error(exc)}") from None
        except botocore.exceptions.NoCredentialsError:
            raise ConnectError(f"S3{self.where()}: iamauto is set but no AWS credentials were found "
                               "(environment, profile, or instance/pod role)") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise ConnectError(f"cannot reach S3{self.where()}: {describe_error(exc)}") from None
        if write:
            self.probe_write()

    def where(self):
        return f" at {self.endpoint}" if self.endpoint else ""

    def create_bucket(self):
        kwargs = {"Bucket": self.bucket}
        region = self.client.meta.region_name
        if not self.endpoint and region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self.client.create_bucket(**kwargs)
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise UsageError(f"cannot create S3 bucket {self.bucket!r}{self.where()}: {describe_error(exc)}") from None
        log.info("created S3 bucket %s", self.bucket)

    def checks_digest_of(self, size):
        return size <= self.single_put_limit and self.checks_content_md5()

    def checks_content_md5(self):
        """Whether this server refuses a PUT whose body does not hash to its
        Content-MD5 (AWS, MinIO, SeaweedFS do), probed once per process. One
        that stores it anyway cannot be the digest check: documents are then
        hashed here before they are sent."""
        where = (self.endpoint, self.bucket)
        with PROBE_LOCK:
            if where not in CONTENT_MD5_CHECKED:
                CONTENT_MD5_CHECKED[where] = self.probe_content_md5()
            return CONTENT_MD5_CHECKED[where]

    def probe_content_md5(self):
        """PUT a small object with a wrong Content-MD5: True when it is refused."""
        key = f"{self.prefix}{PROBE_DIR}{uuid.uuid4().hex}"
        body = b"anchore-objmig Content-MD5 probe"
        wrong = codec.content_md5_header(codec.md5_of(body + b"?").digest())
        try:
            # Not a fenced operation: a late landing of it changes no document.
            self.fast.request("ContentMD5Probe", "PUT", self.bucket, key, body=body,
                              headers=[("Content-MD5", wrong), ("Content-Type", CONTENT_TYPE)])
        except s3_crt.HotPathError as exc:
            if exc.code in BAD_DIGEST:
                return True
            log.debug("Content-MD5 probe of s3://%s/%s failed (%s): documents are hashed here", self.bucket, key, exc)
            return False
        except (ObjmigError, OSError) as exc:  # no transport: the writes will say why; hashing here is the safe side
            log.debug("no Content-MD5 probe of s3://%s (%s): documents are hashed here", self.bucket, exc)
            return False
        log.warning("the S3 server%s stored an object whose bytes do not match its Content-MD5: it does not check "
                    "what it is sent, so each write is confirmed only by the hash this tool computes before sending",
                    self.where())
        try:
            self.fast.delete_one(self.bucket, key)
        except s3_crt.HotPathError as exc:
            log.warning("could not delete s3://%s/%s (a %d-byte probe): %s", self.bucket, key, len(body), exc)
        return False

    def probe_write(self):
        """Write and delete a tiny object under the prefix (never at the bucket
        root, so prefix-scoped IAM policies work)."""
        key = f"{self.prefix}{PROBE_DIR}{uuid.uuid4().hex}"
        body = b"anchore-objmig write probe"
        # Through the transport the documents will take, so its TLS and credentials are checked too.
        try:
            self.fast.put(self.bucket, key, body, codec.md5_of(body).digest(), CONTENT_TYPE)
            self.fast.delete_one(self.bucket, key)
        except s3_crt.HotPathError as exc:
            kind = ConnectError if exc.code in AUTH_ERRORS or exc.code.startswith("AWS_") else ObjmigError
            what = "reach S3" if exc.code.startswith("AWS_") else f"write to s3://{self.bucket}/{self.prefix}"
            raise kind(f"cannot {what}{self.where()}: {exc}") from None
        self.checks_content_md5()  # here, at the start, where its warning belongs

    def write_run_marker(self, token):
        body = token.encode("ascii")
        try:
            self.fast.put(self.bucket, self.marker_key(), body, codec.md5_of(body).digest(), CONTENT_TYPE)
        except s3_crt.HotPathError as exc:
            raise ObjmigError(f"cannot write s3://{self.bucket}/{self.marker_key()}{self.where()}: {exc}") from None

    def read_run_marker(self):
        try:
            found = self.fast.get(self.bucket, self.marker_key())
        except s3_crt.HotPathError as exc:
            raise ObjmigError(f"cannot read s3://{self.bucket}/{self.marker_key()}{self.where()}: {exc}") from None
        return found[0].decode("ascii", "replace").strip() if found else None

    def remove_run_marker(self):
        try:
            self.fast.delete_one(self.bucket, self.marker_key())
        except s3_crt.HotPathError as exc:
            log.warning("could not delete s3://%s/%s (the run's marker, 32 bytes): %s", self.bucket,
                        self.marker_key(), exc)

    def marker_key(self):
        return f"{self.prefix}{PROBE_DIR}run"

    # -- bulk operations ---------------------------------------------------
    def read_many(self, urls):
        return {url: found for url, (found, _) in self.read_proven(urls).items()}

    def read_proven(self, urls):
        return dict(zip(urls, self.executor().map(self.read_one, urls)))

    def sizes_of(self, urls):
        """{url: Content-Length} of the objects a HEAD finds; the others are
        left out (their read reports them)."""
        def size(url):
            try:
                bucket, key = split_s3_url(url)
                _, headers, _ = self.fast.request("HeadObject", "HEAD", bucket, key)
                return int(headers["content-length"])
            except (s3_crt.HotPathError, StorageError, KeyError, ValueError):
                return None

        return {url: found for url, found in zip(urls, self.executor().map(size, urls)) if found is not None}

    def read_one(self, url):
        """(bytes or exception, their MD5 hex when the object's ETag proved
        them, else None); short and cut-off bodies are read again, with
        backoff, up to max_attempts times."""
        attempts = int(self.store.driver_config.get("max_attempts", 5))
        for attempt in range(1, attempts + 1):
            try:
                bucket, key = split_s3_url(url)
                found = self.fast.get(bucket, key)
            except s3_crt.HotPathError as exc:
                if exc.retryable and attempt < attempts:
                    log.warning("reading %s again (attempt %d of %d): %s", url, attempt + 1, attempts, exc)
                    time.sleep(min(0.25 * 2 ** attempt, 4) * random.uniform(0.5, 1.0))
                    continue
                tries = f" (after {attempt} attempts)" if exc.retryable else ""
                return StorageError(f"cannot read {url}{tries}: {exc}"), None
            except (StorageError, OSError) as exc:
                return StorageError(f"cannot read {url}: {exc}"), None
            if found is None:
                return NotFound(f"no object at {url}"), None
            return found

    def write_many(self, items):
        return self.submit_writes(items)()

    def submit_writes(self, items):
        futures = [self.executor().submit(self.write_one, item) for item in items]

        def wait():
            concurrent.futures.wait(futures)  # all of them, even when one raises (a lost lease)
            return {item.url: future.result() for item, future in zip(items, futures) if future.result()}

        return wait

    def write_one(self, item):
        try:
            bucket, key = split_s3_url(item.url)
            self.context.check_fence()  # no write is sent once this process may no longer write
            if len(item.stored.data) > self.single_put_limit:
                bad = codec.mismatch(item.stored) if item.stored.unchecked else None  # parts prove only themselves
                if bad is not None:
                    return bad
                self.put_multipart(bucket, key, item.stored.data)
            else:
                self.fast.put(bucket, key, item.stored.data, item.stored.md5, CONTENT_TYPE)
            crash_point("s3-put")
        except (StorageError, s3_crt.HotPathError) as exc:
            if item.stored.unchecked and getattr(exc, "code", None) in BAD_DIGEST:
                # Refused against the metadata's digest: the source's bytes, or the bytes in transit?
                found = codec.mismatch(item.stored)
                if found is not None:
                    return found
            return StorageError(f"cannot write {item.url}: {describe_error(exc)}")
        return None

    def put_multipart(self, bucket, key, data):
        """Multipart upload with Content-MD5 on every part, and the finished
        object's ETag checked against the part MD5s.

        Parts are sent here one by one (not by awscrt's own splitter) so a
        failed part stops its siblings and the fence is checked right before
        the upload is completed.
        """
        upload_id = self.fast.create_multipart(bucket, key, CONTENT_TYPE)
        view = memoryview(data)
        stop = threading.Event()  # one part failed: the parts not yet sent are not sent

        def send_part(number, start):
            if stop.is_set():
                raise StorageError(f"part {number} of {key} not sent: another part failed")
            chunk = view[start:start + self.part_size]
            try:
                md5 = codec.md5_of(chunk).digest()
                etag = self.fast.upload_part(bucket, key, upload_id, number, chunk, md5)
            except BaseException:
                stop.set()  # before this thread takes the next part off the queue
                raise
            crash_point("s3-part")
            return md5, etag

        futures = []
        try:
            # Parts go up side by side, on a pool of their own (not the document
            # pool this runs on, which they could otherwise wait for forever).
            starts = range(0, len(data), self.part_size)
            futures = [self.parts_executor().submit(send_part, number, start)
                       for number, start in zip(range(1, len(starts) + 1), starts)]
            concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
            failed = next((f for f in futures if f.done() and not f.cancelled() and f.exception()), None)
            if failed is not None:
                raise failed.exception()
            md5s, etags = zip(*(future.result() for future in futures))
            self.context.check_fence()  # completing is what makes the object visible
            etag, encrypted = self.fast.complete_multipart(bucket, key, upload_id, etags)
        except BaseException:
            stop.set()
            for future in futures:
                future.cancel()
            wait_all(futures)  # parts in the air land (or fail) before the abort, which then frees them all
            try:
                self.fast.abort_multipart(bucket, key, upload_id)
            except Exception:  # the original error is the one worth reporting
                log.warning("could not abort the multipart upload of s3://%s/%s; the next run aborts it", bucket, key)
            raise
        expected = f"{codec.md5_of(b''.join(md5s)).hexdigest()}-{len(md5s)}"
        if not encrypted and etag.strip('"').lower() != expected:
            # Each part was checked by its Content-MD5; this proves the server
            # assembled those parts, in order, into the object it now serves.
            raise StorageError(f"s3://{bucket}/{key}: the finished upload's ETag {etag} is not {expected}, "
                               "the one its parts make")

    def abort_stale_uploads(self, conn, before=None):
        """Abort incomplete multipart uploads (left by killed runs or workers)
        of the keys this destination writes for archive_metadata rows, only
        those begun before `before` if given; {aborted, others}."""
        uploads = self.incomplete_uploads()
        if before is not None:
            uploads = [(key, upload_id) for key, upload_id, started in uploads if started is None or started < before]
        else:
            uploads = [(key, upload_id) for key, upload_id, _ in uploads]
        mine = set(documents_keyed(conn, self.prefix, [key for key, _ in uploads]))
        aborted = 0
        for key, upload_id in uploads:
            if key not in mine:
                continue
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
                aborted += 1
            except botocore.exceptions.ClientError as exc:
                if error_code(exc) not in ("NoSuchUpload", "404"):
                    log.warning("could not abort an incomplete upload of s3://%s/%s: %s", self.bucket, key,
                                describe_error(exc))
        return aborted, len(uploads) - len([u for u in uploads if u[0] in mine])

    def incomplete_uploads(self):
        """(key, upload id, when it was begun) of every incomplete multipart upload under the prefix."""
        found = []
        kwargs = {"Bucket": self.bucket, "Prefix": self.prefix}
        while True:
            answer = self.client.list_multipart_uploads(**kwargs)
            found += [(upload["Key"], upload["UploadId"], upload.get("Initiated")) for upload in answer.get("Uploads", [])]
            if not answer.get("IsTruncated"):
                return found
            kwargs.update(KeyMarker=answer.get("NextKeyMarker", ""), UploadIdMarker=answer.get("NextUploadIdMarker", ""))

    def clean_up_after_run(self, conn, before):
        """A worker killed (or fenced off) mid-stream leaves its upload; the
        worker that took its shard over wrote the document afresh."""
        try:
            aborted, _ = self.abort_stale_uploads(conn, before)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            log.warning("could not list incomplete multipart uploads in s3://%s/%s: %s", self.bucket, self.prefix,
                        describe_error(exc))
            return
        if aborted:
            log.info("aborted %d incomplete multipart uploads left under s3://%s/%s by workers of this run that "
                     "were stopped mid-stream", aborted, self.bucket, self.prefix)

    def clean_up_before_run(self, conn):
        try:
            aborted, others = self.abort_stale_uploads(conn)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            log.warning("could not list incomplete multipart uploads in s3://%s/%s: %s", self.bucket, self.prefix,
                        describe_error(exc))
            return
        if aborted:
            log.info("aborted %d incomplete multipart uploads left under s3://%s/%s by an interrupted run",
                     aborted, self.bucket, self.prefix)
        if others:
            log.warning("%d other incomplete multipart uploads under s3://%s/%s are not of documents this run "
                        "writes; left alone", others, self.bucket, self.prefix)

    def delete_many(self, urls):
        by_bucket = {}
        for url in urls:
            try:
                bucket, key = split_s3_url(url)
            except StorageError:
                continue
            by_bucket.setdefault(bucket, []).append((key, url))
        chunks = [
            (bucket, pairs[start:start + DELETE_BATCH])
            for bucket, pairs in by_bucket.items()
            for start in range(0, len(pairs), DELETE_BATCH)
        ]
        failures = {}
        for result in self.executor().map(lambda chunk: self.delete_chunk(*chunk), chunks):
            failures.update(result)
        return failures

    def delete_chunk(self, bucket, pairs):
        url_of = {key: url for key, url in pairs}
        try:
            errors = self.fast.delete(bucket, [key for key, _ in pairs])
        except s3_crt.HotPathError as exc:
            error = StorageError(f"DeleteObjects in s3://{bucket} failed: {exc}")
            return {url: error for _, url in pairs}
        return {url_of.get(key, key): StorageError(f"cannot delete s3://{bucket}/{key}: {reason}")
                for key, reason in errors.items()}

    def parts_executor(self):
        with PART_POOL_LOCK:
            if self.part_pool is None:
                self.part_pool = ThreadPoolExecutor(PART_THREADS, thread_name_prefix="s3-part")
        return self.part_pool

    def close(self):
        for pool in (self.pool, self.part_pool):
            if pool:
                pool.shutdown()


def wait_all(futures):
    for future in futures:
        if not future.cancelled():
            try:
                future.result()
            except BaseException:  # noqa: BLE001 - only waiting; the first error is already on its way
                pass


def documents_keyed(conn, prefix, keys):
    """The keys among `keys` ({prefix}{userId}/{bucket}/{archiveId}) of documents in archive_metadata."""
    parts = [key[len(prefix):].split("/", 2) for key in keys]
    triples = [(key, *part) for key, part in zip(keys, parts) if len(part) == 3]
    if not triples:
        return []
    rows = conn.execute(
        """SELECT k.key FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[]) AS k(key, u, b, a)
           WHERE EXISTS (SELECT 1 FROM archive_metadata m
                         WHERE m."userId" = k.u AND m.bucket = k.b AND m."archiveId" = k.a)""",
        [list(column) for column in zip(*triples)],
    )
    return [row[0] for row in rows]


def truthy(value):
    return value in (True, "true", "True", "yes", 1)


def make_client(config, io_threads):
    """A boto3 S3 client that works unchanged against AWS, MinIO and Ceph."""
    import boto3  # imported here: a worker that never needs boto3 does not pay for it
    from botocore.config import Config

    region = config.get("region")
    region = region if isinstance(region, str) and region else None
    endpoint = config.get("url") or None
    client_config = Config(
        signature_version="s3v4",
        # Path-style for custom endpoints: MinIO and Ceph rarely have wildcard DNS.
        s3={"addressing_style": "path" if endpoint else "auto"},
        # boto3 >= 1.36 defaults to CRC checksums that MinIO and Ceph reject.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        # total_max_attempts counts the first try too; botocore backs off exponentially with jitter.
        retries={"mode": "standard", "total_max_attempts": int(config.get("max_attempts", 5))},
        max_pool_connections=max(10, io_threads * 2),
        connect_timeout=float(config.get("connect_timeout", 10)),
        read_timeout=float(config.get("read_timeout", 120)),
    )
    kwargs = {"config": client_config, "region_name": region or "us-east-1"}
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    if not truthy(config.get("iamauto")):
        kwargs["aws_access_key_id"] = str(config.get("access_key"))
        kwargs["aws_secret_access_key"] = str(config.get("secret_key"))
    verify = config.get("ca_bundle") or config.get("verify")
    if verify is not None:
        kwargs["verify"] = verify if isinstance(verify, str) else truthy(verify)
    return boto3.session.Session().client("s3", **kwargs)
