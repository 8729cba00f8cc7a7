"""Real servers for the tests: a throwaway PostgreSQL and S3 servers.

PostgreSQL: started once per session on a free loopback port, unless
OBJMIG_TEST_DSN names one to use. S3: SeaweedFS (`weed mini`) and, for the
compatibility matrix, the JuiceFS gateway (a MinIO fork); OBJMIG_TEST_S3
picks which (comma separated, default both). Every test gets empty Anchore
tables and fresh S3 bucket names.
"""

import os
import subprocess
import sys
import uuid

import boto3
import psycopg
import pytest
from botocore.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import anchore_sim  # noqa: E402
import devservers  # noqa: E402

S3_KINDS = [kind.strip() for kind in os.environ.get("OBJMIG_TEST_S3", "seaweedfs,juicefs").split(",") if kind.strip()]


@pytest.fixture(scope="session")
def pg_dsn():
    dsn = os.environ.get("OBJMIG_TEST_DSN")
    if dsn:
        yield dsn
        return
    server = devservers.PostgresServer().start()
    try:
        yield server.dsn
    finally:
        server.stop()


@pytest.fixture(scope="session")
def schema_ready(pg_dsn):
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        anchore_sim.apply_schema(conn)
    return pg_dsn


@pytest.fixture
def db(schema_ready):
    """An autocommit connection to a database with empty Anchore tables."""
    with psycopg.connect(schema_ready, autocommit=True) as conn:
        anchore_sim.reset_tables(conn)
        yield conn


_s3_servers = {}


def s3_server(kind):
    """One server of each kind per session, started on first use."""
    if kind not in _s3_servers:
        _s3_servers[kind] = devservers.start_s3(kind)
    return _s3_servers[kind]


def pytest_sessionfinish(session, exitstatus):
    for server in _s3_servers.values():
        server.stop()


class S3:
    """A handle on one S3 server for a test: client, credentials, bucket names."""

    def __init__(self, kind, server):
        self.kind = kind
        self.endpoint = server.endpoint
        self.access_key = server.access_key
        self.secret_key = server.secret_key
        self.client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def new_bucket(self, create=True):
        name = f"t{uuid.uuid4().hex[:16]}"
        if create:
            self.client.create_bucket(Bucket=name)
        return name

    def keys(self, bucket):
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            # The JuiceFS gateway lists emptied "directories" as zero-byte keys
            # ending in "/"; Anchore never writes such keys.
            keys += [item["Key"] for item in page.get("Contents", []) if not item["Key"].endswith("/")]
        return sorted(keys)

    def driver_config(self, bucket, prefix=None, **extra):
        config = {
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "url": self.endpoint,
            "region": False,
            "bucket": bucket,
        }
        if prefix is not None:
            config["prefix"] = prefix
        config.update(extra)
        return config

    def location(self, bucket, prefix="", compress=False, min_size_kbytes=100):
        return anchore_sim.Location("s3", s3_client=self.client, s3_bucket=bucket, prefix=prefix,
                                    compress=compress, min_size_kbytes=min_size_kbytes)


@pytest.fixture(params=S3_KINDS)
def s3(request):
    """Every test that touches S3 runs once per server kind: the compatibility matrix."""
    return S3(request.param, s3_server(request.param))


class Cli:
    """Runs anchore-objmig as an operator would: a separate process."""

    def __init__(self, dsn):
        self.dsn = dsn

    def __call__(self, *args, input=None, env=None, db=True, timeout=600):
        command = [sys.executable, "-m", "anchore_objmig"]
        if db:
            command += ["--db-connect", self.dsn]
        command += [str(arg) for arg in args]
        environment = {k: v for k, v in os.environ.items() if not k.startswith("ANCHORE")}
        environment.update(env or {})
        # A session of its own: crash tests kill the tool's whole process group.
        return subprocess.run(command, input=input if input is not None else "", capture_output=True,
                              text=True, env=environment, timeout=timeout, cwd=ROOT, start_new_session=True)


@pytest.fixture
def cli(schema_ready):
    return Cli(schema_ready)
