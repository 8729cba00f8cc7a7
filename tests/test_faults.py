"""S3 and database faults: retried when passing, named and left at the source when not."""

import base64
import hashlib
import random
import threading
import time

import psycopg

import anchore_sim
from faultproxy import FaultProxy, Rule
from helpers import assert_all_readable, section, task_rows, through_proxy, urls, write_config


def test_transient_s3_faults_are_retried(db, s3, cli, tmp_path):
    docs = anchore_sim.make_docs(40, seed=21)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    with FaultProxy(s3.endpoint) as proxy:
        documents = r"/(admin|acme)/"  # document keys, not the start-up probe
        proxy.add(Rule("503", method="PUT", path=documents, times=3), Rule("500", method="PUT", path=documents, times=2),
                  Rule("reset", method="PUT", path=documents, times=2), Rule("503", method="POST", path=r"\?delete", times=1))
        source = write_config(tmp_path / "a.yaml", section("db"))
        dest = write_config(tmp_path / "b.yaml", section("s3", through_proxy(s3, proxy, bucket)))
        result = cli("migrate", source, dest, "--dontask", "--workers", "1")
        assert result.returncode == 0, result.stderr
        assert [rule.fired for rule in proxy.rules] == [3, 2, 2, 0]  # every PUT fault was injected
        back = cli("migrate", dest, source, "--dontask", "--workers", "1")
        assert back.returncode == 0, back.stderr
        assert proxy.rules[3].fired == 1  # and the DeleteObjects one on the way back
    assert_all_readable(db, s3.client, docs)
    assert s3.keys(bucket) == []


def test_read_timeout_is_retried(db, s3, cli, tmp_path):
    bucket = s3.new_bucket()
    docs = anchore_sim.make_docs(10, seed=22)
    anchore_sim.store(db, s3.location(bucket), docs)
    with FaultProxy(s3.endpoint) as proxy:
        proxy.add(Rule("delay", method="GET", path=docs[0].archive_id.split(":")[1], delay=3, times=1))
        source = write_config(tmp_path / "a.yaml", section("s3", through_proxy(s3, proxy, bucket, read_timeout=1)))
        dest = write_config(tmp_path / "b.yaml", section("db"))
        result = cli("migrate", source, dest, "--dontask", "--workers", "1")
        assert result.returncode == 0, result.stderr
        assert proxy.rules[0].fired == 1
    assert_all_readable(db, s3.client, docs)
    assert all(url.startswith("db://") for url in urls(db))


def test_persistent_s3_failure_names_the_document_and_keeps_it(db, s3, cli, tmp_path):
    docs = anchore_sim.make_docs(25, seed=23)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    doomed = docs[7]
    bucket = s3.new_bucket()
    with FaultProxy(s3.endpoint) as proxy:
        proxy.add(Rule("500", method="PUT", path=doomed.archive_id.split(":")[1], times=None))
        source = write_config(tmp_path / "a.yaml", section("db"))
        dest = write_config(tmp_path / "b.yaml", section("s3", through_proxy(s3, proxy, bucket, max_attempts=3)))
        result = cli("migrate", source, dest, "--dontask")
        assert proxy.rules[0].fired == 3  # tried, retried, then given up
    assert result.returncode == 1
    assert doomed.archive_id in result.stderr and "InternalError" in result.stderr
    assert task_rows(db)[0][:2] == ("failed", "running")
    row = db.execute('SELECT content_url FROM archive_metadata WHERE "archiveId" = %s', (doomed.archive_id,)).fetchone()
    assert row[0].startswith("db://")
    assert db.execute("SELECT count(*) FROM archive_document").fetchone()[0] == 1  # only its source copy left
    assert_all_readable(db, s3.client, docs)
    # once the fault is gone, the same command moves the rest
    dest_direct = write_config(tmp_path / "c.yaml", section("s3", s3.driver_config(bucket)))
    assert cli("migrate", source, dest_direct, "--dontask").returncode == 0
    assert_all_readable(db, s3.client, docs)
    assert len(s3.keys(bucket)) == len(docs)


def test_unreachable_s3_endpoint_changes_nothing(db, cli, tmp_path):
    import devservers

    docs = anchore_sim.make_docs(5)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    config = {"access_key": "a", "secret_key": "b", "bucket": "x", "max_attempts": 1,
              "url": f"http://127.0.0.1:{devservers.free_port()}"}
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", config))
    for args in (("check", dest), ("migrate", source, dest, "--dontask")):
        result = cli(*args)
        assert result.returncode == 3, result.stderr  # could not connect; nothing changed
        assert "cannot reach S3" in result.stderr
        assert len(result.stderr.strip().splitlines()) <= 3 and "Traceback" not in result.stderr
    assert task_rows(db) == []
    assert all(url.startswith("db://") for url in urls(db))


def test_worker_connection_killed_mid_run(db, s3, cli, tmp_path, schema_ready):
    docs = anchore_sim.make_docs(200, seed=24)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    with FaultProxy(s3.endpoint) as proxy:
        # slow uploads keep the run going long enough to kill its connections
        proxy.add(Rule("delay", method="PUT", delay=0.02, times=None))
        source = write_config(tmp_path / "a.yaml", section("db"))
        dest = write_config(tmp_path / "b.yaml", section("s3", through_proxy(s3, proxy, bucket)))
        killed = []

        def kill_worker_connections():
            with psycopg.connect(schema_ready, autocommit=True) as admin:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and len(killed) < 2:
                    done = admin.execute("SELECT coalesce(sum(documents_done), 0) FROM objmig_shards").fetchone()[0] \
                        if admin.execute("SELECT to_regclass('objmig_shards')").fetchone()[0] else 0
                    if done >= 20 * (len(killed) + 1):
                        # the workers' connections, not the parent's (which holds the migration lock)
                        rows = admin.execute(
                            """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                               WHERE application_name LIKE 'anchore-objmig worker%' AND pid <> pg_backend_pid()
                                 AND pid NOT IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory')""").fetchall()
                        killed.extend(rows)
                    time.sleep(0.05)

        killer = threading.Thread(target=kill_worker_connections)
        killer.start()
        result = cli("migrate", source, dest, "--dontask", "--workers", "2", "--batch-size", "10", "--shard-size", "25")
        killer.join()
    assert killed, "no worker connection was killed"
    assert "database connection lost" in result.stderr
    if result.returncode != 0:  # a shard that ran out of attempts: the rerun completes
        assert cli("migrate", source, dest, "--dontask").returncode == 0
    assert_all_readable(db, s3.client, docs)
    assert all(url.startswith("s3://") for url in urls(db))
    assert len(s3.keys(bucket)) == len(docs)


def test_every_write_carries_a_correct_content_md5(db, s3, cli, tmp_path):
    """On the wire: document PUTs, multipart parts and DeleteObjects all carry
    Content-MD5, so the server checks every byte it stores or deletes."""
    docs = anchore_sim.make_docs(20, seed=25)
    docs.append(anchore_sim.Doc("admin", "analysis_data", "big", random.Random(2).randbytes(11 * 1024 * 1024)))
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    with FaultProxy(s3.endpoint) as proxy:
        source = write_config(tmp_path / "a.yaml", section("db"))
        dest = write_config(tmp_path / "b.yaml", section("s3", through_proxy(s3, proxy, bucket)))
        assert cli("migrate", source, dest, "--dontask", "--multipart-threshold", "5MiB").returncode == 0
        assert cli("migrate", dest, source, "--dontask").returncode == 0
    writes = [(method, path, headers, body) for method, path, headers, body in proxy.seen
              if method == "PUT" or (method == "POST" and "delete" in path)]
    # Each process's probe of whether the server checks Content-MD5 sends a wrong one on purpose.
    probes = [w for w in writes if w[3] == b"anchore-objmig Content-MD5 probe"]
    writes = [w for w in writes if w not in probes]
    assert probes and all(".anchore-objmig-probe/" in path for _, path, _, _ in probes)
    assert not [key for key in s3.keys(bucket) if ".anchore-objmig-probe/" in key]  # refused, never stored
    document_puts = [w for w in writes if w[0] == "PUT" and ("/admin/" in w[1] or "/acme/" in w[1])]
    parts = [w for w in writes if "partNumber=" in w[1]]
    deletes = [w for w in writes if w[0] == "POST"]
    assert len(document_puts) >= len(docs) and len(parts) == 3 and deletes
    for method, path, headers, body in writes:
        sent = {k.lower(): v for k, v in headers.items()}.get("content-md5")
        assert sent == base64.b64encode(hashlib.md5(body).digest()).decode(), (method, path)
    assert_all_readable(db, s3.client, docs)


def test_bytes_corrupted_in_transit_are_refused_and_kept_at_source(db, s3, cli, tmp_path):
    docs = anchore_sim.make_docs(10, seed=26)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    victim = docs[4]
    bucket = s3.new_bucket()
    with FaultProxy(s3.endpoint) as proxy:
        proxy.add(Rule("corrupt", method="PUT", path=victim.archive_id.split(":")[1], times=None))
        source = write_config(tmp_path / "a.yaml", section("db"))
        dest = write_config(tmp_path / "b.yaml", section("s3", through_proxy(s3, proxy, bucket)))
        result = cli("migrate", source, dest, "--dontask")
        assert proxy.rules[0].fired >= 1
    assert result.returncode == 1
    assert victim.archive_id in result.stderr and "BadDigest" in result.stderr
    assert victim.archive_id.split(":")[1] not in " ".join(s3.keys(bucket))  # never stored
    row = db.execute('SELECT content_url FROM archive_metadata WHERE "archiveId" = %s', (victim.archive_id,)).fetchone()
    assert row[0].startswith("db://")
    assert_all_readable(db, s3.client, docs)


def big_doc_through(db, s3, cli, tmp_path, rule):
    """Move 5 small documents and one of 11 MiB (3 parts of 5 MiB) db -> s3 through a proxy with `rule`."""
    big = anchore_sim.Doc("admin", "analysis_data", "sha256:" + "c" * 64, random.Random(3).randbytes(11 * 1024 * 1024))
    docs = [*anchore_sim.make_docs(5, seed=28), big]
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    with FaultProxy(s3.endpoint) as proxy:
        proxy.add(rule)
        source = write_config(tmp_path / "a.yaml", section("db"))
        dest = write_config(tmp_path / "b.yaml", section("s3", through_proxy(s3, proxy, bucket, max_attempts=2)))
        result = cli("migrate", source, dest, "--dontask", "--workers", "1", "--multipart-threshold", "5MiB")
    assert rule.fired >= 1 and result.returncode == 1
    named = [line for line in result.stderr.splitlines() if "FAILED" in line]
    assert len(named) == 1 and big.archive_id in named[0], result.stderr
    row = db.execute('SELECT content_url FROM archive_metadata WHERE "archiveId" = %s', (big.archive_id,)).fetchone()
    assert row[0].startswith("db://")
    assert s3.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert_all_readable(db, s3.client, docs)
    return named[0], bucket, big


def test_a_part_corrupted_in_transit_is_refused_and_the_upload_aborted(db, s3, cli, tmp_path):
    named, bucket, big = big_doc_through(db, s3, cli, tmp_path, Rule("corrupt", method="PUT", path=r"partNumber=2(&|$)",
                                                                      times=None))
    assert "BadDigest" in named
    assert big.archive_id.split(":")[1] not in " ".join(s3.keys(bucket))  # never completed


def test_a_finished_upload_that_is_not_its_parts_is_refused(db, s3, cli, tmp_path):
    """The server assembles what CompleteMultipartUpload lists; here it lists a
    part too few, so the object is short: its ETag gives it away and the
    document stays at the source."""
    named, _, _ = big_doc_through(db, s3, cli, tmp_path, Rule("droppart", method="POST", path=r"uploadId=", times=None))
    assert "ETag" in named and "-3" in named


def test_every_object_request_stays_under_the_prefix(db, s3, cli, tmp_path):
    """A prefix-scoped IAM policy is enough: the start-up probe and the check
    document go under the configured prefix, never at the bucket root."""
    docs = anchore_sim.make_docs(5, seed=27)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    with FaultProxy(s3.endpoint) as proxy:
        dest = write_config(tmp_path / "b.yaml", section("s3", through_proxy(s3, proxy, bucket, prefix="tenant-a/")))
        assert cli("check", dest).returncode == 0
        source = write_config(tmp_path / "a.yaml", section("db"))
        assert cli("migrate", source, dest, "--dontask").returncode == 0
    object_requests = [path for method, path, _, _ in proxy.seen
                       if method in ("PUT", "GET", "DELETE") and not path.startswith(f"/{bucket}?uploads")]
    listings = [path for method, path, _, _ in proxy.seen if path.startswith(f"/{bucket}?uploads")]
    assert listings and all("prefix=tenant-a%2F" in path for path in listings)  # incomplete uploads, under the prefix
    assert any(".anchore-objmig-probe/" in path for path in object_requests)
    assert all(path.startswith(f"/{bucket}/tenant-a/") for path in object_requests), object_requests
    assert_all_readable(db, s3.client, docs)
