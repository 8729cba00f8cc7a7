"""The raw PUT and GET ceilings: how fast plain parallel PUTs store the same
bytes, and plain parallel GETs read them back.

No database, no decoding, no checks beyond the HTTP status (and, for a GET,
the length read): several
processes (the signing and HTTP parsing are CPU work under the GIL) each run
many threads (the waits are network). Every thread takes the next object from
one counter shared by all processes, largest objects first, so a few huge
documents cannot leave one process working alone at the end.

The objects are handed to the processes by fork (copy-on-write), before the
clock starts; the clock runs from "go" to the last process finishing.
"""

import io
import multiprocessing
import resource
import threading
import time
from urllib.parse import quote

# fork, not spawn: the children inherit ITEMS without copying or pickling (each
# makes its own client after the fork, so awscrt's threads start in the child).
_fork = multiprocessing.get_context("fork")
ITEMS = []  # [(key, bytes)], set by put_ceiling before the processes start
SINGLE_PUT_LIMIT = 64 * 1024 * 1024  # minio: objects up to this go up in one PUT (fastest locally)


def minio_client(endpoint, access_key, secret_key, threads):
    import urllib3
    from minio import Minio

    # One pooled connection per thread; minio's default pool (10) would make
    # threads open and throw away connections.
    http = urllib3.PoolManager(
        maxsize=threads,
        timeout=urllib3.Timeout(connect=10, read=120),
        retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )
    host = endpoint.split("://", 1)[1]
    client = Minio(host, access_key, secret_key, secure=False, region="us-east-1", http_client=http)

    def put(bucket, key, data):
        client.put_object(bucket, key, io.BytesIO(data), len(data),
                          content_type="binary/octet-stream", part_size=SINGLE_PUT_LIMIT)

    def get(bucket, key):
        response = client.get_object(bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    return put, get


def boto3_client(endpoint, access_key, secret_key, threads):
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3", endpoint_url=endpoint, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                      request_checksum_calculation="when_required", response_checksum_validation="when_required",
                      max_pool_connections=threads, retries={"mode": "standard", "max_attempts": 3}),
    )

    def put(bucket, key, data):
        client.put_object(Bucket=bucket, Key=key, Body=data, ContentType="binary/octet-stream")

    def get(bucket, key):
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()

    return put, get


def awscrt_client(endpoint, access_key, secret_key, threads):
    """AWS's C runtime client: one PUT per object with Content-MD5 (as the tool
    sends), one plain GET per object, signed and sent in C; each thread waits
    on its own request."""
    import base64
    import hashlib

    from awscrt import auth, http, s3

    host = endpoint.split("://", 1)[1]
    provider = auth.AwsCredentialsProvider.new_static(access_key, secret_key)
    client = s3.S3Client(region="us-east-1", tls_mode=s3.S3RequestTlsMode.DISABLED,
                         signing_config=s3.create_default_s3_signing_config(region="us-east-1",
                                                                            credential_provider=provider))

    def put(bucket, key, data):
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        headers = http.HttpHeaders([("Host", host), ("Content-Length", str(len(data))), ("Content-MD5", md5),
                                    ("Content-Type", "binary/octet-stream")])
        request = http.HttpRequest("PUT", f"/{bucket}/{quote(key, safe='/~')}", headers, io.BytesIO(data))
        client.make_request(type=s3.S3RequestType.DEFAULT, request=request,
                            operation_name="PutObject").finished_future.result(120)

    def get(bucket, key):
        chunks = []
        request = http.HttpRequest("GET", f"/{bucket}/{quote(key, safe='/~')}",
                                   http.HttpHeaders([("Host", host), ("Content-Length", "0")]))
        client.make_request(type=s3.S3RequestType.DEFAULT, request=request, operation_name="GetObject",
                            on_body=lambda chunk, **_: chunks.append(bytes(chunk))).finished_future.result(120)
        return b"".join(chunks)

    return put, get


CLIENTS = {"minio": minio_client, "boto3": boto3_client, "awscrt": awscrt_client}


def uploader(kind, op, endpoint, access_key, secret_key, bucket, threads, counter, ready, go, results):
    """One process: `threads` threads PUTting (or GETting) ITEMS[counter++] until none is left."""
    put, get = CLIENTS[kind](endpoint, access_key, secret_key, threads)

    def transfer(key, data):
        if op == "put":
            put(bucket, key, data)
            return
        got = len(get(bucket, key))
        if got != len(data):
            raise RuntimeError(f"read {got} bytes of {len(data)}")
    done = [0, 0]  # objects, bytes
    errors = []
    lock = threading.Lock()

    def work():
        go.wait()
        while True:
            with counter.get_lock():
                index = counter.value
                counter.value += 1
            if index >= len(ITEMS):
                return
            key, data = ITEMS[index]
            try:
                transfer(key, data)
            except Exception as exc:
                with lock:
                    errors.append(f"{key}: {type(exc).__name__}: {exc}")
                continue
            with lock:
                done[0] += 1
                done[1] += len(data)

    workers = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for thread in workers:
        thread.start()
    cpu_before = cpu_seconds()
    ready.release()
    for thread in workers:
        thread.join()
    results.put((done[0], done[1], errors[:5], len(errors), cpu_seconds() - cpu_before))


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def put_ceiling(kind, endpoint, access_key, secret_key, bucket, items, processes, threads, timeout, op="put"):
    """(seconds, objects, bytes, CPU seconds the uploaders used) to PUT every (key, bytes) of `items`
    with `processes` x `threads` uploaders; with op="get", to GET each back (they must be in the bucket)."""
    global ITEMS
    ITEMS = sorted(items, key=lambda item: len(item[1]), reverse=True)
    counter = _fork.Value("q", 0)
    ready = _fork.Semaphore(0)
    go = _fork.Event()
    results = _fork.Queue()
    procs = [
        _fork.Process(target=uploader, name=f"{op}-{kind}-{n}",
                      args=(kind, op, endpoint, access_key, secret_key, bucket, threads, counter, ready, go, results))
        for n in range(processes)
    ]
    try:
        for proc in procs:
            proc.start()
        for _ in procs:  # every process has its client and threads: start the clock
            if not ready.acquire(timeout=60):
                raise RuntimeError(f"{kind} uploader processes did not start")
        started = time.perf_counter()
        go.set()
        outcomes = [results.get(timeout=timeout) for _ in procs]
        seconds = time.perf_counter() - started
        for proc in procs:
            proc.join(10)
    finally:
        for proc in procs:  # on timeout or Ctrl-C: stop our own children, by their handle
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        ITEMS = []
    objects = sum(o[0] for o in outcomes)
    nbytes = sum(o[1] for o in outcomes)
    failed = sum(o[3] for o in outcomes)
    if failed or objects != len(items):
        samples = [e for o in outcomes for e in o[2]]
        raise RuntimeError(f"{kind} {op} ceiling: {objects}/{len(items)} objects done, {failed} failed: {samples[:3]}")
    return seconds, objects, nbytes, sum(o[4] for o in outcomes)
