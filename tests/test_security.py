"""Secrets stay secret, passwords need not be on the command line, TLS is
honoured on both sides, and hostile names are only ever data."""

import os
import shutil
from urllib.parse import urlsplit, urlunsplit

import psycopg

import anchore_sim
import devservers
from anchore_objmig.db import DbSettings, connect
from certs import make_certs
from faultproxy import FaultProxy
from helpers import assert_all_readable, section, urls, write_config


def without_password(dsn):
    parts = urlsplit(dsn)
    netloc = f"{parts.username}@{parts.hostname}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)), parts.password


def test_password_from_pgpassword_and_pgpass(db, cli, tmp_path, schema_ready):
    dsn, password = without_password(schema_ready)
    assert cli("--db-connect", dsn, "list-migrations", db=False, env={"PGPASSWORD": password}).returncode == 0
    parts = urlsplit(schema_ready)
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"{parts.hostname}:{parts.port}:*:{parts.username}:{password}\n")
    pgpass.chmod(0o600)
    assert cli("--db-connect", dsn, "list-migrations", db=False, env={"PGPASSFILE": str(pgpass)}).returncode == 0
    refused = cli("--db-connect", dsn, "--db-retries", "0", "list-migrations", db=False, env={"PGPASSFILE": "/nonexistent"})
    assert refused.returncode == 3 and "cannot connect to the database" in refused.stderr


def test_password_in_url_never_printed(db, s3, cli, tmp_path, schema_ready):
    _, password = without_password(schema_ready)
    docs = anchore_sim.make_docs(5)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket)))
    sqlalchemy_url = schema_ready.replace("postgresql://", "postgresql+pg8000://")
    outputs = []
    for args in (("check", dest), ("migrate", source, dest, "--dontask"), ("list-migrations",),
                 ("-v", "migrate", dest, source, "--dontask")):
        result = cli("--db-connect", sqlalchemy_url, *args, db=False)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout + result.stderr)
    wrong = cli("--db-connect", sqlalchemy_url.replace(password, password + "x"), "--db-retries", "0",
                "list-migrations", db=False)
    outputs.append(wrong.stdout + wrong.stderr)
    assert wrong.returncode == 3  # could not authenticate
    for text in outputs:
        assert password not in text
        assert s3.secret_key not in text and s3.access_key not in text
    assert_all_readable(db, s3.client, docs)


def enable_ssl(server, cert, key):
    """Turn on TLS in a running PostgreSQL with our server certificate."""
    data_dir = str(server.data_dir)
    for source, name in ((cert, "server.crt"), (key, "server.key")):
        target = os.path.join(data_dir, name)
        shutil.copy(source, target)
        shutil.chown(target, "postgres", "postgres")
        os.chmod(target, 0o600)
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET ssl = on")
        conn.execute("SELECT pg_reload_conf()")


def test_database_tls_modes(cli, tmp_path, schema_ready):
    ca, cert, key = make_certs(tmp_path / "good")
    other_ca, _, _ = make_certs(tmp_path / "other")
    with devservers.PostgresServer() as server:
        enable_ssl(server, cert, key)
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            anchore_sim.apply_schema(conn)
        verified = DbSettings(server.dsn, retries=0, sslmode="verify-full", sslrootcert=ca)
        with connect(verified) as conn:
            assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0]
        ok = cli("--db-connect", server.dsn, "--db-sslmode", "verify-full", "--db-sslrootcert", ca,
                 "list-migrations", db=False)
        assert ok.returncode == 0, ok.stderr
        assert cli("--db-connect", server.dsn, "--db-use-ssl", "list-migrations", db=False).returncode == 0
        untrusted = cli("--db-connect", server.dsn, "--db-retries", "0", "--db-sslmode", "verify-full",
                        "--db-sslrootcert", other_ca, "list-migrations", db=False)
        assert untrusted.returncode == 3  # could not connect
        assert "certificate verify failed" in untrusted.stderr
    # --db-use-ssl means sslmode=require: a server without TLS is refused
    plain = cli("--db-connect", schema_ready, "--db-retries", "0", "--db-use-ssl", "list-migrations", db=False)
    assert plain.returncode == 3 and "SSL" in plain.stderr


def test_s3_ca_bundle_and_verify(db, s3, cli, tmp_path):
    ca, cert, key = make_certs(tmp_path)
    docs = anchore_sim.make_docs(6)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    with FaultProxy(s3.endpoint, tls=(cert, key)) as proxy:
        assert proxy.endpoint.startswith("https://")
        base = s3.driver_config(bucket, max_attempts=1)
        base["url"] = proxy.endpoint
        untrusted = write_config(tmp_path / "u.yaml", section("s3", base))
        result = cli("check", untrusted)
        assert result.returncode == 3 and "certificate verify failed" in result.stderr
        unverified = write_config(tmp_path / "v.yaml", section("s3", {**base, "verify": False}))
        assert cli("check", unverified).returncode == 0
        trusted = write_config(tmp_path / "t.yaml", section("s3", {**base, "ca_bundle": ca}))
        result = cli("migrate", source, trusted, "--dontask")
        assert result.returncode == 0, result.stderr
    assert_all_readable(db, s3.client, docs)


def test_s3_document_transport_checks_certificates(s3, tmp_path):
    """The per-document transport (awscrt) honours ca_bundle and verify on its
    own, not only the boto3 bucket checks that run before it."""
    from anchore_objmig import codec
    from anchore_objmig.drivers import s3_crt
    from anchore_objmig.drivers.s3 import truthy

    ca, cert, key = make_certs(tmp_path)
    bucket = s3.new_bucket()
    body = b"tls check"
    with FaultProxy(s3.endpoint, tls=(cert, key)) as proxy:
        base = {**s3.driver_config(bucket, max_attempts=1), "url": proxy.endpoint}
        untrusted = s3_crt.Transport(base, truthy)
        try:
            untrusted.put(bucket, "a", body, codec.md5_of(body).digest(), "binary/octet-stream")
            raise AssertionError("an untrusted certificate was accepted")
        except s3_crt.HotPathError as exc:
            assert "TLS" in str(exc) or "CERT" in str(exc).upper(), exc
        s3_crt.Transport({**base, "verify": False}, truthy).put(bucket, "b", body, codec.md5_of(body).digest(),
                                                                 "binary/octet-stream")
        trusted = s3_crt.Transport({**base, "ca_bundle": ca}, truthy)
        trusted.put(bucket, "c", body, codec.md5_of(body).digest(), "binary/octet-stream")
        assert trusted.get(bucket, "c") == (body, codec.md5_of(body).hexdigest())
        before = proxy.requests
    assert before >= 3 and s3.keys(bucket) == ["b", "c"]


def test_iamauto_takes_the_standard_aws_credential_chain(db, s3, cli, tmp_path):
    """iamauto: no keys in the config; the bucket checks (boto3) and every
    document request of the workers (awscrt) sign with what the AWS chain finds."""
    docs = anchore_sim.make_docs(12, seed=31)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    chain = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
             "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent",
             "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", {"iamauto": True, "url": s3.endpoint, "bucket": bucket}))
    result = cli("migrate", source, dest, "--dontask", "--workers", "2", env=chain)
    assert result.returncode == 0, result.stderr
    assert all(url.startswith("s3://") for url in urls(db)) and len(s3.keys(bucket)) == len(docs)
    back = cli("migrate", dest, source, "--dontask", env=chain)  # GETs and DeleteObjects
    assert back.returncode == 0, back.stderr
    assert all(url.startswith("db://") for url in urls(db)) and s3.keys(bucket) == []
    assert_all_readable(db, s3.client, docs)
    assert s3.access_key not in result.stderr + back.stderr and s3.secret_key not in result.stderr + back.stderr


HOSTILE_USERS = ("o'brien", 'a "quoted" user', "ünïcødé 用户", "semi;colon")
HOSTILE_BUCKETS = ("my bucket's data", "x'); DROP TABLE archive_metadata; --", "politique_évaluations")


def test_hostile_names_are_data(db, s3, cli, tmp_path):
    docs = anchore_sim.make_docs(30, seed=41, users=HOSTILE_USERS, buckets=HOSTILE_BUCKETS)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    configs = {
        "db": write_config(tmp_path / "db.yaml", section("db")),
        "s3": write_config(tmp_path / "s3.yaml", section("s3", s3.driver_config(bucket, prefix="p'x/"), compress=True, min_size_kbytes=1)),
        "db2": write_config(tmp_path / "db2.yaml", section("db2")),
        "localfs": write_config(tmp_path / "fs.yaml", section("localfs", {"archive_data_dir": str(tmp_path / "files")})),
    }
    for source, dest in (("db", "s3"), ("s3", "db2"), ("db2", "localfs"), ("localfs", "db")):
        result = cli("migrate", configs[source], configs[dest], "--dontask", "--bucket", HOSTILE_BUCKETS[1],
                     "--bucket", HOSTILE_BUCKETS[0], "--bucket", HOSTILE_BUCKETS[2])
        assert result.returncode == 0, result.stderr
        assert_all_readable(db, s3.client, docs)
    assert all(url.startswith("db://") for url in urls(db))
    dry = cli("migrate", configs["db"], configs["s3"], "--dry-run")
    assert dry.returncode == 0 and "o'brien" in dry.stdout


def test_text_outside_the_clients_encoding_moves_intact(db, cli, tmp_path):
    """An operator's PGCLIENTENCODING (here LATIN1, which has no CJK) does not
    reach the documents: the tool's sessions read and write UTF-8 bytes, so
    names and JSON text LATIN1 cannot hold move both ways unchanged."""
    docs = anchore_sim.make_docs(20, seed=43, users=("用户", "admin"), buckets=("analysis_data",))
    for n, doc in enumerate(docs):
        doc.content = f'{{"n": {n}, "名前": "パッケージ-ü-€"}}'.encode() + doc.content
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    configs = {"db": write_config(tmp_path / "db.yaml", section("db")),
               "db2": write_config(tmp_path / "db2.yaml", section("db2"))}
    latin1 = {"PGCLIENTENCODING": "LATIN1"}
    for source, dest in (("db", "db2"), ("db2", "db")):
        result = cli("migrate", configs[source], configs[dest], "--dontask", env=latin1)
        assert result.returncode == 0, result.stderr
        assert all(url.startswith(f"{dest}://") for url in urls(db))
        assert_all_readable(db, None, docs)
