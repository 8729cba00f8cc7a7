"""Per-document S3 requests (PUT, GET, multipart parts, DeleteObjects) through
awscrt, AWS's C runtime client.

A migration makes one request per document, so per-request client CPU is what
limits it on a small host: awscrt signs, sends and retries in C, and spends
less than half the CPU of minio's client on a small PUT, a fifth of boto3's
(measured in perf/). Only its public API is used: each request is built here
(path-style for custom endpoints) and sent as a DEFAULT request, so every PUT
and every part carries the Content-MD5 we give it and the server checks it,
over http as over https. Multipart uploads are driven by the s3 driver, part
by part, so it can stop the siblings of a failed part and check the fence
before completing. tests/test_faults.py checks every write's Content-MD5 on
the wire.

awscrt retries 5xx, SlowDown and dropped connections with exponential backoff
and jitter (max_attempts); it has no read timeout, so a request not answered
within read_timeout is cancelled here and sent again.
"""

import io
import random
import time
import xml.etree.ElementTree as ET
from concurrent.futures import TimeoutError as FutureTimeout
from urllib.parse import quote, urlsplit

from awscrt import auth, http, io as crt_io, s3 as crt_s3
from awscrt.exceptions import AwsCrtError

from anchore_objmig import codec

S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


class HotPathError(Exception):
    """A failed request; `code` is the S3 error code (or the CRT error name)."""

    retryable = False  # awscrt already retried what it can

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code


class TruncatedBody(HotPathError):
    """A GET's body was not the whole object: retried like a dropped connection."""

    retryable = True


def boto3_chain_provider():
    """iamauto: the standard AWS credential chain (env, profile, instance or pod
    role), resolved by boto3 exactly as the bucket checks resolve it."""
    import boto3  # only for iamauto

    session = boto3.session.Session()

    def get_credentials():
        found = session.get_credentials()
        if found is None:
            raise RuntimeError("iamauto: no AWS credentials found in the environment, profile or instance role")
        frozen = found.get_frozen_credentials()
        return auth.AwsCredentials(frozen.access_key, frozen.secret_key, frozen.token)

    return auth.AwsCredentialsProvider.new_delegate(get_credentials)


# Requests that change what a key holds: each is sent only while this process
# may write (the fence), checked right before every attempt, so a worker that
# froze between its own check and the request cannot land it afterwards.
FENCED = frozenset({"PutObject", "UploadPart", "CompleteMultipartUpload", "DeleteObject", "DeleteObjects"})


class Transport:
    """One awscrt S3Client for the driver config; thread-safe, one per process."""

    def __init__(self, config, truthy, fence=lambda: None):
        self.fence = fence  # raises when this process may no longer write
        url = config.get("url")
        region = config.get("region") if isinstance(config.get("region"), str) and config.get("region") else "us-east-1"
        if url:
            parts = urlsplit(url)
            self.host, secure, self.path_style = parts.netloc, parts.scheme == "https", True
        else:
            self.host, secure, self.path_style = f"s3.{region}.amazonaws.com", True, False
        self.attempts = int(config.get("max_attempts", 5))
        self.read_timeout = float(config.get("read_timeout", 120))
        if truthy(config.get("iamauto")):
            provider = boto3_chain_provider()
        else:
            provider = auth.AwsCredentialsProvider.new_static(str(config.get("access_key")),
                                                              str(config.get("secret_key")))
        tls_options = None
        if secure:
            options = crt_io.TlsContextOptions()
            verify = config.get("verify")
            ca_bundle = config.get("ca_bundle") or (verify if isinstance(verify, str) else None)
            if ca_bundle:
                options.override_default_trust_store_from_path(ca_filepath=ca_bundle)
            if verify is not None and not isinstance(verify, str) and not truthy(verify):
                options.verify_peer = False
            tls_options = crt_io.ClientTlsContext(options).new_connection_options()
        self.client = crt_s3.S3Client(
            region=region,
            signing_config=crt_s3.create_default_s3_signing_config(region=region, credential_provider=provider),
            tls_mode=crt_s3.S3RequestTlsMode.ENABLED if secure else crt_s3.S3RequestTlsMode.DISABLED,
            tls_connection_options=tls_options,
            # total attempts = 1 + retries; awscrt backs off exponentially with full jitter
            retry_config=crt_s3.S3RetryConfig(
                max_retries=self.attempts - 1,
                retry_mode=crt_s3.S3RetryMode.EXPONENTIAL_BACKOFF if self.attempts > 1 else crt_s3.S3RetryMode.NONE,
            ),
            connect_timeout_ms=int(float(config.get("connect_timeout", 10)) * 1000),
        )

    def where(self, bucket, key=""):
        """(Host header, path) of bucket/key: path-style for custom endpoints
        (MinIO and Ceph rarely have wildcard DNS), virtual-hosted on AWS."""
        key = quote(key, safe="/~")
        if self.path_style or "." in bucket:
            return self.host, f"/{bucket}/{key}" if key else f"/{bucket}"
        return f"{bucket}.{self.host}", f"/{key}"

    def request(self, operation, method, bucket, key="", query="", body=b"", headers=()):
        """(status, headers dict with lower-case names, body bytes) of one request.

        A failed request raises HotPathError naming the S3 error code."""
        host, path = self.where(bucket, key)
        if query:
            path = f"{path}?{query}"
        sent = [("Host", host), ("Content-Length", str(len(body))), *headers]
        for attempt in range(1, self.attempts + 1):
            if operation in FENCED:
                self.fence()
            answer = {}
            chunks = []
            message = http.HttpRequest(method, path, http.HttpHeaders(sent), io.BytesIO(body) if body else None)
            pending = self.client.make_request(
                type=crt_s3.S3RequestType.DEFAULT, request=message, operation_name=operation,
                on_headers=lambda status_code, headers, **_: answer.update(status=status_code, headers=headers),
                on_body=lambda chunk, **_: chunks.append(bytes(chunk)),
            )
            try:
                pending.finished_future.result(self.read_timeout)
            except FutureTimeout:
                pending.cancel()
                wait_quietly(pending)
                if attempt < self.attempts:
                    time.sleep(min(0.25 * 2 ** attempt, 4) * random.uniform(0.5, 1.0))
                    continue
                raise HotPathError("ReadTimeout", f"no answer within {self.read_timeout:g} s "
                                                  f"(after {attempt} attempts)") from None
            except crt_s3.S3ResponseError as exc:
                raise response_error(exc) from None
            except AwsCrtError as exc:
                raise HotPathError(CRT_CODES.get(exc.name, exc.name), exc.message) from None
            headers = {name.lower(): value for name, value in answer.get("headers") or ()}
            return answer.get("status"), headers, b"".join(chunks)

    # -- operations --------------------------------------------------------
    def put(self, bucket, key, data, md5, content_type):
        """PUT one object with Content-MD5, so the server checks what it stored."""
        self.request("PutObject", "PUT", bucket, key, body=data,
                     headers=[("Content-MD5", codec.content_md5_header(md5)), ("Content-Type", content_type)])

    def get(self, bucket, key):
        """(the whole object's bytes, their MD5 hex when the object's ETag is an
        MD5 and they hashed to it, else None), or None when there is no such
        key. A body shorter than its Content-Length, cut off or not matching an
        MD5 ETag raises TruncatedBody."""
        try:
            _, headers, data = self.request("GetObject", "GET", bucket, key)
        except HotPathError as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                return None
            if exc.code in CUT_OFF:
                raise TruncatedBody(exc.code, str(exc)) from None
            raise
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) != len(data):
            raise TruncatedBody("ShortBody", f"read {len(data)} bytes, Content-Length says {length}")
        etag = plain_md5_etag(headers)
        if etag is not None and codec.md5_of(data).hexdigest() != etag:
            raise TruncatedBody("ETagMismatch", f"the {len(data)} bytes read do not hash to the object's ETag {etag}")
        return data, etag

    def create_multipart(self, bucket, key, content_type):
        _, _, body = self.request("CreateMultipartUpload", "POST", bucket, key, query="uploads",
                                  headers=[("Content-Type", content_type)])
        return xml_text(body, "UploadId")

    def upload_part(self, bucket, key, upload_id, number, chunk, md5):
        """PUT one part with its Content-MD5; its ETag."""
        _, headers, _ = self.request("UploadPart", "PUT", bucket, key,
                                     query=f"partNumber={number}&uploadId={quote(upload_id, safe='')}",
                                     body=bytes(chunk), headers=[("Content-MD5", codec.content_md5_header(md5))])
        return headers.get("etag", "")

    def complete_multipart(self, bucket, key, upload_id, etags):
        parts = "".join(f"<Part><PartNumber>{n}</PartNumber><ETag>{xml_escape(etag)}</ETag></Part>"
                        for n, etag in enumerate(etags, 1))
        body = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
        _, headers, answer = self.request("CompleteMultipartUpload", "POST", bucket, key,
                                          query=f"uploadId={quote(upload_id, safe='')}", body=body,
                                          headers=[("Content-Type", "application/xml")])
        return xml_text(answer, "ETag"), encrypted(headers)

    def abort_multipart(self, bucket, key, upload_id):
        self.request("AbortMultipartUpload", "DELETE", bucket, key, query=f"uploadId={quote(upload_id, safe='')}")

    def delete_one(self, bucket, key):
        self.request("DeleteObject", "DELETE", bucket, key)

    def delete(self, bucket, keys):
        """DeleteObjects, with the Content-MD5 S3 demands; {key: reason} of the failures."""
        objects = "".join(f"<Object><Key>{xml_escape(key)}</Key></Object>" for key in keys)
        body = f"<Delete><Quiet>true</Quiet>{objects}</Delete>".encode()
        _, _, answer = self.request("DeleteObjects", "POST", bucket, query="delete", body=body,
                                    headers=[("Content-MD5", codec.content_md5_header(codec.md5_of(body).digest())),
                                             ("Content-Type", "application/xml")])
        failures = {}
        for error in parse_xml(answer).iter(f"{S3_NS}Error"):
            failures[error.findtext(f"{S3_NS}Key", "")] = (
                f"{error.findtext(f'{S3_NS}Code', '')}: {error.findtext(f'{S3_NS}Message', '')}")
        return failures


# Connection-level failures while a body was on its way: read again.
CUT_OFF = {"AWS_ERROR_HTTP_CONNECTION_CLOSED", "AWS_IO_SOCKET_CLOSED", "AWS_ERROR_S3_INVALID_CONTENT_LENGTH_HEADER",
           "AWS_ERROR_HTTP_PROTOCOL_ERROR", "AWS_IO_SOCKET_TIMEOUT"}


def wait_quietly(pending):
    try:
        pending.finished_future.result()
    except Exception:  # noqa: BLE001 - cancelled on purpose; its error is not news
        pass


def response_error(exc):
    """HotPathError for an S3 error answer, named by the Code in its XML body."""
    code, message = f"HTTP{exc.status_code}", ""
    try:
        root = parse_xml(exc.body or b"")
        code = root.findtext("Code") or root.findtext(f"{S3_NS}Code") or code
        message = root.findtext("Message") or root.findtext(f"{S3_NS}Message") or ""
    except ET.ParseError:
        pass
    if code.startswith("HTTP"):
        code = STATUS_CODES.get(exc.status_code, code)
    return HotPathError(code, message)


# Server errors awscrt retried and gave up on come without the answer: name them as S3 does.
CRT_CODES = {"AWS_ERROR_S3_INTERNAL_ERROR": "InternalError", "AWS_ERROR_S3_SLOW_DOWN": "SlowDown",
             "AWS_ERROR_S3_INVALID_RESPONSE_STATUS": "InvalidResponseStatus"}
STATUS_CODES = {404: "NoSuchKey", 403: "AccessDenied", 500: "InternalError", 503: "SlowDown"}


def parse_xml(body):
    return ET.fromstring(body)  # the server's own answer, not user input


def xml_text(body, name):
    root = parse_xml(body)
    found = root.findtext(f"{S3_NS}{name}") or root.findtext(name)
    if not found:
        raise HotPathError("MalformedAnswer", f"no {name} in the server's answer")
    return found


def xml_escape(text):
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&apos;"))


def plain_md5_etag(headers):
    """The object's MD5 hex when its ETag is one, else None.

    Only single-part objects without SSE-KMS or SSE-C have an MD5 ETag: a
    multipart ETag has a '-', an encrypted one is no hash of the bytes.
    Header names are lower-case.
    """
    etag = (headers.get("etag") or "").strip().strip('"').lower()
    if not codec.is_md5_hex(etag):
        return None
    return None if encrypted(headers) else etag


def encrypted(headers):
    """Whether SSE-KMS or SSE-C made the ETag something other than an MD5."""
    return (headers.get("x-amz-server-side-encryption") in ("aws:kms", "aws:kms:dsse")
            or bool(headers.get("x-amz-server-side-encryption-customer-algorithm")))
