"""Throwaway local servers for tests, demos and benchmarks.

Starts and stops, on 127.0.0.1 and free ports only:

* PostgresServer  - a private PostgreSQL cluster (role/database ``objmig``),
* SeaweedS3Server - ``weed mini`` (master + volume + filer + S3 in one process),
* JuiceFSGateway  - ``juicefs gateway`` over sqlite3 metadata and a local directory.

Everything is stdlib only; boto3 and psycopg are imported by the self-test alone.

Usage from Python::

    with PostgresServer() as pg, start_s3("seaweedfs") as s3:
        connect(pg.dsn); boto3.client("s3", endpoint_url=s3.endpoint, ...)

Usage from a shell::

    python scripts/devservers.py up --kind seaweedfs   # prints export lines, Ctrl-C stops
    python scripts/devservers.py selftest
"""

from __future__ import annotations

import argparse
import atexit
import base64
import hashlib
import hmac
import http.client
import json
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote, urlsplit

LOOPBACK = "127.0.0.1"
S3_REGION = "us-east-1"
READY_TIMEOUT = 60.0  # seconds a server gets to become fully usable
STOP_TIMEOUT = 20.0  # seconds between the polite signal and SIGKILL
PORT_ATTEMPTS = 3  # restarts with fresh ports when a port was taken meanwhile
MAX_SOCKET_DIR = 60  # unix socket paths must stay below ~107 bytes


class DevServerError(RuntimeError):
    """A server could not be started or stopped."""


# --------------------------------------------------------------------------
# small helpers: ports, binaries, processes, files
# --------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _free_ports(count: int) -> list[int]:
    """Several distinct free ports: hold all sockets open so none repeats."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((LOOPBACK, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def _port_collision(log_text: str) -> bool:
    """Did a server fail because a port we picked got taken meanwhile?"""
    text = log_text.lower()
    return "already in use" in text or "port allocation failed" in text  # last: weed


def _find_binary(name: str) -> str:
    """Prefer the binary installed next to this interpreter (the venv), then PATH."""
    beside = Path(sys.executable).parent / name  # do not resolve: keep the venv dir
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    raise DevServerError(f"cannot find {name!r} next to {sys.executable} or on PATH")


def _random_key(length: int) -> str:
    alphabet = string.ascii_uppercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _pids_in_group(pgid: int) -> list[int]:
    """Live processes whose process group is pgid (a server and any helpers it spawned)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def _short_dir(preferred: Path) -> Path:
    """A directory for unix sockets: preferred if its path is short enough, else /tmp."""
    if len(str(preferred)) <= MAX_SOCKET_DIR:
        preferred.mkdir(parents=True, exist_ok=True)
        return preferred
    return Path(tempfile.mkdtemp(prefix="devsrv-"))


class _Workdir:
    """base_dir handling shared by all servers.

    base_dir=None -> a fresh temporary directory, removed completely by cleanup().
    base_dir given -> used as is; cleanup() only removes what we created inside it,
    the log files stay for inspection.
    """

    def __init__(self, base_dir: str | None, prefix: str):
        self.owned = base_dir is None
        self.path = Path(tempfile.mkdtemp(prefix=prefix) if base_dir is None else base_dir)
        self.path.mkdir(parents=True, exist_ok=True)
        self.created: list[Path] = []  # removed by cleanup() even when not owned

    def fresh_dir(self, name: str) -> Path:
        path = self.path / name
        if path.exists() and any(path.iterdir()):
            raise DevServerError(f"{path} already exists and is not empty")
        path.mkdir(exist_ok=True)
        self.track(path)
        return path

    def track(self, path: Path) -> None:
        if path not in self.created:
            self.created.append(path)

    def cleanup(self) -> None:
        for path in self.created:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)


# Servers still running at interpreter exit are stopped, so a crashed test run
# does not leave daemons behind. Keyed by starter pid: a forked child must not
# stop its parent's servers when it exits.
_RUNNING: dict = {}


def _remember(server) -> None:
    _RUNNING[server] = os.getpid()


@atexit.register
def _stop_leftovers() -> None:
    for server, owner in list(_RUNNING.items()):
        if owner == os.getpid():
            try:
                server.stop()
            except Exception:  # best effort at exit
                pass


# --------------------------------------------------------------------------
# a minimal SigV4 S3 client (stdlib), used for readiness checks
# --------------------------------------------------------------------------


def _sigv4_headers(method, host, path, query, body, access_key, secret_key, extra=None):
    """Headers for an AWS Signature V4 signed S3 request (path-style, us-east-1)."""
    amz_date = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    payload_hash = hashlib.sha256(body).hexdigest()
    headers = {"host": host, "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date}
    headers.update({k.lower(): v for k, v in (extra or {}).items()})
    names = sorted(headers)
    canonical_request = "\n".join([
        method,
        quote(path, safe="/-_.~"),
        query,
        "".join(f"{n}:{headers[n].strip()}\n" for n in names),
        ";".join(names),
        payload_hash,
    ])
    scope = f"{day}/{S3_REGION}/s3/aws4_request"
    string_to_sign = "\n".join([
        "AWS4-HMAC-SHA256", amz_date, scope,
        hashlib.sha256(canonical_request.encode()).hexdigest(),
    ])
    key = ("AWS4" + secret_key).encode()
    for part in (day, S3_REGION, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return headers


def s3_request(endpoint, access_key, secret_key, method, path, query="", body=b"",
               headers=None, timeout=10.0):
    """Send one signed request; returns (status, response body). query is canonical ('a=b')."""
    url = urlsplit(endpoint)
    signed = _sigv4_headers(method, url.netloc, path, query, body, access_key, secret_key, headers)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        conn.request(method, path + (f"?{query}" if query else ""), body=body, headers=signed)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def content_md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


class _NotReady(Exception):
    pass


def _s3_round_trip(endpoint, access_key, secret_key, bucket):
    """Create a bucket, put/get/delete an object, delete the bucket: proof it can store."""
    payload = b"devservers readiness probe " + secrets.token_bytes(16)

    def call(method, path, ok, body=b"", headers=None):
        # Short timeout: a port squatter may accept but never answer.
        status, data = s3_request(endpoint, access_key, secret_key, method, path,
                                  body=body, headers=headers, timeout=3.0)
        if status not in ok:
            raise _NotReady(f"{method} {path} -> {status} {data[:300]!r}")
        return data

    call("PUT", f"/{bucket}", ok=(200, 409))  # 409: our own bucket from an earlier try
    call("PUT", f"/{bucket}/probe", ok=(200,), body=payload,
         headers={"Content-MD5": content_md5(payload)})
    if call("GET", f"/{bucket}/probe", ok=(200,)) != payload:
        raise _NotReady("GET returned different bytes than were PUT")
    call("DELETE", f"/{bucket}/probe", ok=(200, 204))
    call("DELETE", f"/{bucket}", ok=(200, 204))


# --------------------------------------------------------------------------
# S3 servers
# --------------------------------------------------------------------------


class _S3Server:
    """Shared life cycle: pick ports, launch, wait for a real round trip, stop by pid."""

    kind = ""
    log_name = "server.log"

    def __init__(self, base_dir: str | None = None):
        self._base_dir = base_dir
        self._work: _Workdir | None = None
        self._proc: subprocess.Popen | None = None
        self.host = LOOPBACK
        self.port = 0
        self.region = S3_REGION
        self.access_key = _random_key(20)
        self.secret_key = secrets.token_urlsafe(30)
        self.startup_seconds = 0.0

    # -- public API ------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def log_path(self) -> Path:
        return self._work.path / self.log_name

    def start(self):
        if self._proc is not None:
            return self
        began = time.monotonic()
        self._work = _Workdir(self._base_dir, prefix=f"{self.kind}-")
        try:
            self._start_with_port_retries()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        _remember(self)
        return self

    def stop(self) -> None:
        _RUNNING.pop(self, None)
        self._kill_process()
        if self._work is not None:
            self._work.cleanup()
        self._proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def __repr__(self):
        return f"<{type(self).__name__} {self.endpoint} pid={self.pid}>"

    # -- to be provided by subclasses -----------------------------------
    def _prepare(self) -> None:
        """One-time setup (config files, formatting)."""

    def _command(self) -> tuple[list[str], dict[str, str]]:
        """argv and extra environment for the server, using freshly picked ports."""
        raise NotImplementedError

    def _reset_data(self) -> None:
        """Wipe state a failed attempt may have left before retrying."""

    # -- internals -------------------------------------------------------
    def _start_with_port_retries(self) -> None:
        self._prepare()
        for attempt in range(1, PORT_ATTEMPTS + 1):
            argv, env = self._command()
            self._launch(argv, env)
            try:
                self._wait_until_ready()
                return
            except DevServerError:
                collided = _port_collision(_log_tail(self.log_path, 200))
                self._kill_process()
                if not collided or attempt == PORT_ATTEMPTS:
                    raise
                self._reset_data()

    def _launch(self, argv, extra_env) -> None:
        env = dict(os.environ, **extra_env)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} {shlex.join(argv)}\n".encode())
            log.flush()
            # Own session: Ctrl-C in a terminal reaches us, not the server, and
            # the server's pid doubles as a process-group id we can signal.
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self._work.path, env=env, start_new_session=True)

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        bucket = f"devservers-probe-{secrets.token_hex(4)}"
        last_error = "no attempt yet"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise DevServerError(
                    f"{self.kind} exited with code {self._proc.returncode} while starting; "
                    f"log {self.log_path}:\n{_log_tail(self.log_path)}")
            try:
                _s3_round_trip(self.endpoint, self.access_key, self.secret_key, bucket)
                return
            except (OSError, http.client.HTTPException, _NotReady) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.25)
        raise DevServerError(
            f"{self.kind} did not store an object within {READY_TIMEOUT:.0f}s "
            f"(last error: {last_error}); log {self.log_path}:\n{_log_tail(self.log_path)}")

    def _kill_process(self) -> None:
        """Polite signal to our process group, SIGKILL after STOP_TIMEOUT, then reap."""
        proc = self._proc
        if proc is None:
            return
        pgid = proc.pid  # start_new_session made pid == pgid
        if proc.poll() is None:
            _signal_group(pgid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _signal_group(pgid, signal.SIGKILL)
                proc.wait(5)
        # Helpers the server may have spawned share its group; do not leave them.
        if _pids_in_group(pgid):
            _signal_group(pgid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


class SeaweedS3Server(_S3Server):
    """SeaweedFS ``weed mini``: one process with master, volume, filer and S3 API."""

    kind = "seaweedfs"
    log_name = "seaweedfs.log"
    volume_size_limit_mb = 64  # small volumes: nothing large is reserved on disk

    def __init__(self, base_dir: str | None = None):
        super().__init__(base_dir)
        self._tmp_sockets: set[str] = set()

    def _prepare(self) -> None:
        self._data = self._work.fresh_dir("seaweedfs-data")
        # The filer and S3 local sockets default to /tmp; keep them in our directory.
        self._sockets = _short_dir(self._work.path / "seaweedfs-sockets")
        self._work.track(self._sockets)
        identities = {"identities": [{
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}
        self._s3_config = self._work.path / "seaweedfs-s3.json"
        self._s3_config.write_text(json.dumps(identities))
        self._s3_config.chmod(0o600)
        self._work.track(self._s3_config)

    def _reset_data(self) -> None:
        shutil.rmtree(self._data, ignore_errors=True)
        self._data.mkdir()

    def _command(self):
        names = ["master", "master.grpc", "volume", "volume.grpc", "filer",
                 "filer.grpc", "s3", "s3.grpc"]
        ports = dict(zip(names, _free_ports(len(names))))
        self.port = ports["s3"]
        admin = _admin_port_pair()
        argv = [
            _find_binary("weed"), "-logtostderr",  # no glog files in /tmp
            "mini",
            f"-dir={self._data}",
            f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
            f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
            f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
            f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
            f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3.grpc']}",
            # mini has no switch to turn the admin server off, and its built-in
            # worker dials admin http port + 10000 whatever -admin.port.grpc says.
            f"-admin.port={admin}", f"-admin.port.grpc={admin + 10000}",
            "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # extra listeners we do not need
            "-master.telemetry=false",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            "-volume.preStopSeconds=0",  # faster shutdown
            f"-s3.config={self._s3_config}",  # enables SigV4 checks with our identity
            "-s3.autoCreateBucket=false",
            f"-filer.localSocket={self._sockets}/filer.sock",
            f"-s3.localSocket={self._sockets}/s3.sock",
        ]
        return argv, {}

    # weed also serves gRPC on /tmp/seaweedfs-<service>-grpc-<port>.sock (not
    # configurable; the port may even shift when taken). A clean exit removes those
    # files, a SIGKILL does not: note which ones are ours and remove leftovers.
    def _wait_until_ready(self) -> None:
        super()._wait_until_ready()
        self._note_tmp_sockets()

    def _note_tmp_sockets(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._tmp_sockets |= {p for p in _unix_socket_paths(self._proc.pid)
                                  if p.startswith("/tmp/seaweedfs-")}

    def _kill_process(self) -> None:
        self._note_tmp_sockets()
        super()._kill_process()
        for path in self._tmp_sockets:
            Path(path).unlink(missing_ok=True)
        self._tmp_sockets.clear()


def _unix_socket_paths(pid: int) -> set[str]:
    """Paths of the unix sockets process pid has open (via /proc)."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return set()
    paths = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[6] in inodes:
            paths.add(fields[7])
    return paths


def _admin_port_pair() -> int:
    """A free port p such that p + 10000 is free too (see SeaweedS3Server)."""
    for _ in range(200):
        port = free_port()
        if port + 10000 <= 65535 and _port_is_free(port + 10000):
            return port
    raise DevServerError("no free port pair (p, p+10000) for the SeaweedFS admin server")


class JuiceFSGateway(_S3Server):
    """``juicefs gateway`` (a MinIO fork) over sqlite3 metadata and local file storage."""

    kind = "juicefs"
    log_name = "juicefs-gateway.log"
    volume_name = "objmig"

    def _prepare(self) -> None:
        self._data = self._work.fresh_dir("juicefs-data")
        self._meta_url = f"sqlite3://{self._data}/meta.db"
        self._format()

    def _format(self) -> None:
        argv = [
            _find_binary("juicefs"), "--no-agent", "format",
            "--storage", "file", "--bucket", f"{self._data}/blocks/",
            "--trash-days", "0",  # deleted objects free their space at once
            self._meta_url, self.volume_name,
        ]
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {shlex.join(argv)}\n".encode())
            log.flush()
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT, cwd=self._work.path, timeout=60)
        if done.returncode != 0:
            raise DevServerError(f"juicefs format failed:\n{_log_tail(self.log_path)}")

    def _command(self):
        self.port, metrics_port = _free_ports(2)
        argv = [
            _find_binary("juicefs"), "--no-agent",  # no pprof listener
            "gateway",
            "--no-usage-report", "--no-banner",
            "--multi-buckets",  # top-level directories are buckets, so CreateBucket works
            "--keep-etag",  # remember the MD5 ETag for HEAD/GET/List
            "--object-meta", "--object-tag",  # keep x-amz-meta-* and tags like S3 does
            "--backup-meta", "0",  # no periodic metadata dumps into the storage
            "--metrics", f"{LOOPBACK}:{metrics_port}",
            "--cache-dir", str(self._data / "cache"),
            self._meta_url, f"{LOOPBACK}:{self.port}",
        ]
        env = {"MINIO_ROOT_USER": self.access_key, "MINIO_ROOT_PASSWORD": self.secret_key}
        return argv, env


S3_KINDS = {"seaweedfs": SeaweedS3Server, "juicefs": JuiceFSGateway}


def start_s3(kind: str, base_dir: str | None = None):
    """Start an S3 server of the given kind ("seaweedfs" or "juicefs") and return it."""
    try:
        cls = S3_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown S3 kind {kind!r}; expected one of {sorted(S3_KINDS)}") from None
    return cls(base_dir).start()


# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------

PG_SETTINGS = {
    "listen_addresses": f"'{LOOPBACK}'",
    "max_connections": "100",
    # Throwaway data: durability is not worth the time.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


class PostgresServer:
    """A private PostgreSQL cluster with superuser/database ``objmig`` and a password."""

    def __init__(self, base_dir: str | None = None):
        self._base_dir = base_dir
        self._work: _Workdir | None = None
        self.host = LOOPBACK
        self.port = 0
        self.user = "objmig"
        self.password = secrets.token_urlsafe(24)
        self.dbname = "objmig"
        self.data_dir: Path | None = None
        self.postmaster_pid: int | None = None
        self.startup_seconds = 0.0

    @property
    def dsn(self) -> str:
        return (f"postgresql://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
                f"@{self.host}:{self.port}/{quote(self.dbname, safe='')}")

    @property
    def log_path(self) -> Path:
        return self._work.path / "postgres.log"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def __repr__(self):
        return f"<PostgresServer {self.host}:{self.port} pid={self.postmaster_pid}>"

    # -- start -------------------------------------------------------------
    def start(self) -> "PostgresServer":
        if self.postmaster_pid is not None:
            return self
        began = time.monotonic()
        self._work = _Workdir(self._base_dir, prefix="postgres-")
        try:
            self._init_cluster()
            self._start_with_port_retries()
            self._create_database()
            self._check_login()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        _remember(self)
        return self

    def _init_cluster(self) -> None:
        self.data_dir = self._pick_data_dir()
        pwfile = self.data_dir.parent / f"pwfile-{secrets.token_hex(4)}"
        pwfile.write_text(self.password + "\n")
        _give_to_postgres(pwfile, 0o600)
        try:
            self._run_pg([
                _pg_binary("initdb"), "-D", str(self.data_dir), "-U", self.user,
                f"--pwfile={pwfile}", "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256", "-E", "UTF8", "--no-locale", "--no-sync",
            ], timeout=120)
        finally:
            pwfile.unlink(missing_ok=True)
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\ninclude = 'devservers.conf'\n")

    def _pick_data_dir(self) -> Path:
        """<base_dir>/pgdata when the postgres user can reach it, else a private temp dir."""
        if self._work.owned:
            self._work.path.chmod(0o711)  # our temp dir: let postgres pass through
        candidate = self._work.path / "pgdata"
        socket_path_ok = len(str(candidate)) <= MAX_SOCKET_DIR + 20
        if _reachable_by_postgres(self._work.path) and socket_path_ok:
            data_dir = self._work.fresh_dir("pgdata")
        else:
            holder = Path(tempfile.mkdtemp(prefix="devsrv-pg-"))
            holder.chmod(0o711)  # the postgres user only needs to pass through
            self._work.track(holder)
            data_dir = holder / "pgdata"
            data_dir.mkdir()
        _give_to_postgres(data_dir, 0o700)
        return data_dir

    def _write_settings(self) -> None:
        settings = dict(PG_SETTINGS, port=str(self.port),
                        unix_socket_directories=f"'{self.data_dir}'")
        conf = self.data_dir / "devservers.conf"
        conf.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        _give_to_postgres(conf, 0o600)

    def _start_with_port_retries(self) -> None:
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self.port = free_port()
            self._write_settings()
            try:
                self._run_pg([_pg_binary("pg_ctl"), "start", "-D", str(self.data_dir),
                              "-w", "-t", str(int(READY_TIMEOUT)), "-s"],
                             timeout=READY_TIMEOUT + 10)
            except DevServerError:
                collided = _port_collision(_log_tail(self.log_path, 30))
                if not collided or attempt == PORT_ATTEMPTS:
                    raise
                continue
            self.postmaster_pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
            return

    def _psql(self, dbname: str, sql: str) -> str:
        """Run SQL over TCP with password auth, exactly as clients will connect."""
        argv = [_pg_binary("psql"), "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1",
                "-h", self.host, "-p", str(self.port), "-U", self.user, "-d", dbname,
                "-c", sql]
        env = _clean_pg_env() | {"PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "5"}
        done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise DevServerError(f"psql failed ({sql!r}): {done.stderr.strip()}")
        return done.stdout.strip()

    def _create_database(self) -> None:
        self._retry_psql("postgres", f'CREATE DATABASE "{self.dbname}"')

    def _check_login(self) -> None:
        if self._retry_psql(self.dbname, "select 1") != "1":
            raise DevServerError("select 1 did not return 1")

    def _retry_psql(self, dbname: str, sql: str) -> str:
        # pg_ctl -w already waited; a short retry covers a server still warming up.
        deadline = time.monotonic() + 15
        while True:
            try:
                return self._psql(dbname, sql)
            except DevServerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def restart(self) -> None:
        """pg_ctl restart -m fast: every session is cut, the server comes back on the same port."""
        self._run_pg([_pg_binary("pg_ctl"), "restart", "-D", str(self.data_dir),
                      "-m", "fast", "-w", "-t", str(int(READY_TIMEOUT)), "-s"],
                     timeout=READY_TIMEOUT + STOP_TIMEOUT + 10)
        self.postmaster_pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])

    def stop_for(self, seconds: float) -> None:
        """An outage: stop the server, wait, start it again on the same port."""
        self._run_pg([_pg_binary("pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "fast", "-w",
                      "-t", str(int(STOP_TIMEOUT)), "-s"], timeout=STOP_TIMEOUT + 10)
        time.sleep(seconds)
        self._run_pg([_pg_binary("pg_ctl"), "start", "-D", str(self.data_dir), "-w",
                      "-t", str(int(READY_TIMEOUT)), "-s"], timeout=READY_TIMEOUT + 10)
        self.postmaster_pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])

    # -- stop --------------------------------------------------------------
    def stop(self) -> None:
        _RUNNING.pop(self, None)
        if self.data_dir is not None and (self.data_dir / "postmaster.pid").exists():
            try:
                self._run_pg([_pg_binary("pg_ctl"), "stop", "-D", str(self.data_dir),
                              "-m", "fast", "-w", "-t", str(int(STOP_TIMEOUT)), "-s"],
                             timeout=STOP_TIMEOUT + 10)
            except (DevServerError, subprocess.TimeoutExpired):
                pass  # fall through to the pid-based kill below
        self._kill_postmaster()
        if self._work is not None:
            self._work.cleanup()
        self.postmaster_pid = None

    def _kill_postmaster(self) -> None:
        """If pg_ctl could not stop it, SIGQUIT then SIGKILL the postmaster by pid."""
        pid = self.postmaster_pid
        if pid is None:
            return
        for sig in (signal.SIGQUIT, signal.SIGKILL):
            if not _pid_alive(pid):
                return
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + 5
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)

    # -- running PostgreSQL tools as the postgres user -----------------------
    def _run_pg(self, argv: list[str], timeout: float) -> None:
        # stdout/stderr go to a log file we opened: pg_ctl's postmaster inherits
        # it, so the log needs no permissions for the postgres user.
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} {shlex.join(argv)}\n".encode())
            log.flush()
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT, cwd="/", env=_clean_pg_env(),
                                  timeout=timeout, **_as_postgres_user())
        if done.returncode != 0:
            raise DevServerError(
                f"{Path(argv[0]).name} {argv[1] if len(argv) > 1 else ''} failed "
                f"(exit {done.returncode}); log {self.log_path}:\n{_log_tail(self.log_path)}")


def _pg_binary(name: str) -> str:
    """PostgreSQL tools from the same installation as pg_ctl (psql on PATH may be a wrapper)."""
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        beside = Path(os.path.realpath(pg_ctl)).parent / name
        if beside.is_file():
            return str(beside)
    found = shutil.which(name)
    if not found:
        raise DevServerError(f"PostgreSQL tool {name!r} not found on PATH")
    return found


def _clean_pg_env() -> dict[str, str]:
    """Environment without PG* variables that could redirect our tools."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _postgres_account() -> pwd.struct_passwd | None:
    """The unprivileged account to run PostgreSQL as when we are root (initdb refuses root)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise DevServerError("running as root but there is no 'postgres' user") from None


def _as_postgres_user() -> dict:
    account = _postgres_account()
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def _give_to_postgres(path: Path, mode: int) -> None:
    account = _postgres_account()
    if account is not None:
        os.chown(path, account.pw_uid, account.pw_gid)
    path.chmod(mode)


def _reachable_by_postgres(directory: Path) -> bool:
    """Can the postgres account traverse every directory down to `directory`?"""
    account = _postgres_account()
    if account is None:
        return True
    groups = {account.pw_gid}
    for path in [directory.resolve(), *directory.resolve().parents]:
        st = path.stat()
        if st.st_uid == account.pw_uid:
            allowed = st.st_mode & 0o100
        elif st.st_gid in groups:
            allowed = st.st_mode & 0o010
        else:
            allowed = st.st_mode & 0o001
        if not allowed:
            return False
    return True


# --------------------------------------------------------------------------
# command line: `up` and `selftest`
# --------------------------------------------------------------------------


def _export_lines(server) -> list[str]:
    if isinstance(server, PostgresServer):
        values = {"DATABASE_URL": server.dsn, "PGHOST": server.host, "PGPORT": server.port,
                  "PGUSER": server.user, "PGPASSWORD": server.password,
                  "PGDATABASE": server.dbname}
    else:
        values = {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": server.access_key,
                  "AWS_SECRET_ACCESS_KEY": server.secret_key,
                  "AWS_DEFAULT_REGION": server.region}
    return [f"export {k}={shlex.quote(str(v))}" for k, v in values.items()]


def _cmd_up(kind: str, base_dir: str | None) -> int:
    server = PostgresServer(base_dir) if kind == "postgres" else S3_KINDS[kind](base_dir)

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    # Explicit handlers: a shell's background job starts with SIGINT ignored.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    try:
        print("\n".join(_export_lines(server)), flush=True)
        print(f"# {kind} ready in {server.startup_seconds:.1f}s; Ctrl-C or SIGTERM stops it",
              file=sys.stderr, flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        print(f"# {kind} stopped", file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start one server, print export lines, wait for Ctrl-C")
    up.add_argument("--kind", required=True, choices=["postgres", *S3_KINDS])
    up.add_argument("--base-dir", default=None)
    test = sub.add_parser("selftest", help="start every server and check its behaviour")
    test.add_argument("--kind", action="append", choices=["postgres", *S3_KINDS],
                      help="limit to these kinds (repeatable)")
    args = parser.parse_args(argv)
    if args.command == "up":
        return _cmd_up(args.kind, args.base_dir)
    return _selftest(args.kind or [*S3_KINDS, "postgres"])


# --------------------------------------------------------------------------
# self-test (needs boto3 and psycopg)
# --------------------------------------------------------------------------


class _Check:
    """Collects pass/fail lines and observations for the report."""

    def __init__(self):
        self.failures: list[str] = []

    def __call__(self, ok: bool, what: str, detail: str = "") -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}{(': ' + detail) if detail else ''}",
              flush=True)
        if not ok:
            self.failures.append(what)

    @staticmethod
    def note(what: str) -> None:
        print(f"  [info] {what}", flush=True)


def _error_code(call) -> str | None:
    """Run a boto3 call; None when it succeeds, else the S3 error code."""
    from botocore.exceptions import ClientError
    try:
        call()
    except ClientError as exc:
        return exc.response.get("Error", {}).get("Code") or str(
            exc.response["ResponseMetadata"]["HTTPStatusCode"])
    return None


def _boto3_client(server, access_key: str | None = None, secret_key: str | None = None):
    import boto3
    from botocore.config import Config
    config = Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                    response_checksum_validation="when_required", signature_version="s3v4",
                    retries={"max_attempts": 1})
    return boto3.client("s3", endpoint_url=server.endpoint, region_name=S3_REGION,
                        aws_access_key_id=access_key or server.access_key,
                        aws_secret_access_key=secret_key or server.secret_key, config=config)


def _ps_alive(pids) -> list[int]:
    """Which of these pids `ps` still lists (zombies count as gone)."""
    if not pids:
        return []
    out = subprocess.run(["ps", "-o", "pid=,stat=", "-p", ",".join(map(str, pids))],
                         capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "Z" not in line.split()[1]]


def _selftest_s3(kind: str, check: _Check) -> dict:
    print(f"\n== {kind}", flush=True)
    server = S3_KINDS[kind]()
    server.start()
    result = {"startup_s": round(server.startup_seconds, 2)}
    check(True, f"started in {server.startup_seconds:.2f}s", server.endpoint)
    try:
        pids = _pids_in_group(server.pid)
        check.note(f"processes: {pids}")
        _s3_checks(server, check, result)
        if kind == "seaweedfs":
            used = sum(f.stat().st_size for f in server._data.rglob("*") if f.is_file())
            check.note(f"data dir uses {used / 2**20:.1f} MiB on disk (apparent size)")
    finally:
        work = server._work.path
        began = time.monotonic()
        server.stop()
        result["stop_s"] = round(time.monotonic() - began, 2)
    left = _ps_alive(pids)
    check(not left, f"stopped in {result['stop_s']:.2f}s, no process left", f"left={left}")
    check(not work.exists(), "temporary directory removed", str(work))
    return result


def _s3_checks(server, check: _Check, result: dict) -> None:
    s3 = _boto3_client(server)
    bucket = "selftest"
    s3.create_bucket(Bucket=bucket)
    body = b"hello objmig " * 100
    md5 = hashlib.md5(body)

    # 1. a correct Content-MD5 is accepted and the ETag is the hex MD5
    etag = s3.put_object(Bucket=bucket, Key="a.txt", Body=body,
                         ContentMD5=content_md5(body))["ETag"].strip('"')
    check(etag == md5.hexdigest(), "1. put with correct Content-MD5, ETag == hex md5", etag)

    # 2. a wrong Content-MD5 is rejected
    code = _error_code(lambda: s3.put_object(Bucket=bucket, Key="b.txt", Body=body,
                                             ContentMD5=content_md5(b"other")))
    result["wrong_content_md5"] = code
    check(code is not None, "2. put with wrong Content-MD5 rejected", str(code))

    # 3. a wrong secret key (and an unknown access key) is rejected
    bad = _boto3_client(server, secret_key="wrong-" + server.secret_key)
    code = _error_code(lambda: bad.put_object(Bucket=bucket, Key="c.txt", Body=body))
    result["wrong_secret"] = code
    check(code is not None, "3. wrong secret key rejected", str(code))
    stranger = _boto3_client(server, access_key="NOSUCHACCESSKEY00000")
    code = _error_code(lambda: stranger.list_objects_v2(Bucket=bucket))
    result["unknown_access_key"] = code
    check(code is not None, "3b. unknown access key rejected", str(code))

    # 4. no bucket auto-creation; head_bucket on a missing bucket is 404
    code = _error_code(lambda: s3.put_object(Bucket="no-such-bucket", Key="x", Body=b"x"))
    result["put_missing_bucket"] = code
    check(code is not None, "4. put into a missing bucket fails", str(code))
    code = _error_code(lambda: s3.head_bucket(Bucket="no-such-bucket"))
    result["head_missing_bucket"] = code
    check(code == "404", "4b. head_bucket on a missing bucket is 404", str(code))

    _delete_objects_checks(server, s3, bucket, check, result)
    _multipart_checks(s3, bucket, check, result)


def _delete_objects_checks(server, s3, bucket, check: _Check, result: dict) -> None:
    """5. What boto3 sends for DeleteObjects and what the server demands."""
    sent: dict = {}

    def capture(request, **kwargs):
        sent.clear()
        sent.update({k.lower(): v for k, v in request.headers.items()
                     if k.lower().startswith(("content-md5", "x-amz-checksum", "x-amz-sdk"))})

    s3.meta.events.register("before-send.s3.DeleteObjects", capture)
    s3.put_object(Bucket=bucket, Key="d1", Body=b"1")
    code = _error_code(lambda: s3.delete_objects(Bucket=bucket,
                                                 Delete={"Objects": [{"Key": "d1"}]}))
    result["boto3_delete_objects_headers"] = sorted(sent)
    result["boto3_delete_objects_default"] = code or "OK"
    check.note(f"5. boto3 DeleteObjects sends {sorted(sent)} -> {code or 'OK'}")

    # The same request by hand: no integrity header, a wrong and a right Content-MD5.
    payload = b"<Delete><Object><Key>d2</Key></Object><Quiet>true</Quiet></Delete>"
    variants = [("without_md5", {}),
                ("wrong_md5", {"Content-MD5": content_md5(b"not the body")}),
                ("with_md5", {"Content-MD5": content_md5(payload)})]
    for name, headers in variants:
        s3.put_object(Bucket=bucket, Key="d2", Body=b"2")
        answer = _status_and_code(s3_request(
            server.endpoint, server.access_key, server.secret_key, "POST", f"/{bucket}",
            query="delete=", body=payload, headers=headers))
        deleted = _error_code(lambda: s3.head_object(Bucket=bucket, Key="d2")) == "404"
        result[f"raw_delete_objects_{name}"] = f"{answer}, deleted={deleted}"
        check.note(f"5b. raw DeleteObjects {name} -> {answer}, object deleted: {deleted}")
    check(result["raw_delete_objects_with_md5"] == "200, deleted=True",
          "5c. DeleteObjects with a correct Content-MD5 works")


def _status_and_code(response) -> str:
    status, body = response
    text = body.decode(errors="replace")
    if "<Code>" in text:
        return f"{status} {text.split('<Code>')[1].split('</Code>')[0]}"
    return str(status)


def _multipart_checks(s3, bucket, check: _Check, result: dict) -> None:
    """6. 12 MiB in two parts with per-part Content-MD5; a wrong part MD5 is refused."""
    part_size = 6 * 2**20
    data = os.urandom(2 * part_size)
    parts = [data[:part_size], data[part_size:]]
    upload = s3.create_multipart_upload(Bucket=bucket, Key="big.bin")["UploadId"]
    try:
        code = _error_code(lambda: s3.upload_part(
            Bucket=bucket, Key="big.bin", UploadId=upload, PartNumber=2, Body=parts[1],
            ContentMD5=content_md5(parts[0])))
        result["multipart_wrong_part_md5"] = code
        check(code is not None, "6. upload_part with wrong Content-MD5 rejected", str(code))
        done = []
        for number, part in enumerate(parts, start=1):
            etag = s3.upload_part(Bucket=bucket, Key="big.bin", UploadId=upload,
                                  PartNumber=number, Body=part,
                                  ContentMD5=content_md5(part))["ETag"]
            done.append({"PartNumber": number, "ETag": etag})
        etag = s3.complete_multipart_upload(Bucket=bucket, Key="big.bin", UploadId=upload,
                                            MultipartUpload={"Parts": done})["ETag"]
    except Exception:
        s3.abort_multipart_upload(Bucket=bucket, Key="big.bin", UploadId=upload)
        raise
    got = s3.get_object(Bucket=bucket, Key="big.bin")["Body"].read()
    check(got == data, "6b. 12 MiB multipart upload round-trips", f"ETag {etag}")
    expected = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest() + "-2"
    result["multipart_etag_is_s3_style"] = etag.strip('"') == expected
    check.note(f"multipart ETag {'is' if etag.strip(chr(34)) == expected else 'is NOT'} "
               "md5-of-part-md5s-N style")


def _selftest_postgres(check: _Check) -> dict:
    import psycopg
    print("\n== postgres", flush=True)
    server = PostgresServer()
    server.start()
    result = {"startup_s": round(server.startup_seconds, 2)}
    check(True, f"started in {server.startup_seconds:.2f}s", f"port {server.port}")
    pids = [server.postmaster_pid]
    try:
        with psycopg.connect(server.dsn, connect_timeout=5) as conn:
            value = conn.execute("select 1").fetchone()[0]
            pids += [r[0] for r in conn.execute("select pid from pg_stat_activity")]
            settings = dict(conn.execute(
                "select name, setting from pg_settings where name = any(%s)",
                [["fsync", "synchronous_commit", "full_page_writes", "listen_addresses",
                  "max_connections", "password_encryption"]]).fetchall())
        check(value == 1, "7. psycopg connects with the dsn and select 1 works")
        check.note(f"settings {settings}")
        wrong = server.dsn.replace(quote(server.password, safe=""), "wrong-password")
        try:
            psycopg.connect(wrong, connect_timeout=5).close()
            refused = ""
        except psycopg.OperationalError as exc:
            refused = str(exc).strip().splitlines()[-1]
        check("password authentication failed" in refused, "7b. wrong password refused",
              refused)
    finally:
        work = server._work.path
        began = time.monotonic()
        server.stop()
        result["stop_s"] = round(time.monotonic() - began, 2)
    left = _ps_alive(pids)
    check(not left, f"stopped in {result['stop_s']:.2f}s, no process left",
          f"checked {pids}, left={left}")
    check(not work.exists(), "temporary directory removed", str(work))
    return result


def _selftest(kinds: list[str]) -> int:
    check = _Check()
    report = {}
    for kind in kinds:
        try:
            if kind == "postgres":
                report[kind] = _selftest_postgres(check)
            else:
                report[kind] = _selftest_s3(kind, check)
        except Exception as exc:  # keep testing the other kinds
            check(False, f"{kind} raised {type(exc).__name__}", str(exc))
    print("\n== summary\n" + json.dumps(report, indent=2))
    print("PASS" if not check.failures else f"FAIL: {check.failures}")
    return 0 if not check.failures else 1


if __name__ == "__main__":
    sys.exit(main())
