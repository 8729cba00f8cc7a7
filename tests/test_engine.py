"""The sharded engine: planning, the progress table, workers, multipart, --join."""

import os
import subprocess
import sys
import time

import psycopg

import anchore_sim
from anchore_objmig import plan
from anchore_objmig.config import StoreConfig
from anchore_objmig.drivers import DriverContext, make_driver
from faultproxy import FaultProxy, Rule
from helpers import assert_all_readable, section, task_rows, through_proxy, urls, write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def drivers(dsn, dest_name="db2"):
    context = DriverContext()
    source = make_driver(StoreConfig("x", "k", "db", {}), context)
    dest = make_driver(StoreConfig("x", "k", dest_name, {}), context)
    return source, dest


def documents_of(db, where, shard, limit=7):
    return [row[:4] for batch in plan.shard_rows(db, where, shard, limit) for row in batch]


def test_shards_cover_every_document_once_within_bounds(db):
    big = anchore_sim.make_docs(230, seed=31, users=("admin",), buckets=("analysis_data",))
    small = anchore_sim.make_docs(12, seed=32, users=("acme",), buckets=("manifest_data", "query_data"))
    anchore_sim.store(db, anchore_sim.Location("db"), big + small)
    source, dest = drivers(None)
    where = plan.source_filter(source, dest)
    shards = plan.cut_shards(db, where, max_documents=40, max_bytes=10**12)
    seen = []
    for shard in shards:
        in_shard = documents_of(db, where, shard)
        assert len(in_shard) <= 40 and len(in_shard) == shard.documents
        seen += in_shard
    assert sorted(key[1] for key in seen) == sorted(d.archive_id for d in big + small)  # every document, exactly once
    assert len(seen) == len(set(seen))
    assert len(shards) == -(-len(big + small) // 40)  # sized by documents, not by bucket or account


def test_small_accounts_share_shards(db):
    """300 accounts of 2 documents: a handful of shards, not 300 (cost per
    document must not grow with the number of accounts)."""
    docs = [doc for n in range(300) for doc in anchore_sim.make_docs(2, seed=1000 + n, users=(f"acct{n:03d}",),
                                                                       buckets=("manifest_data",), large_share=0)]
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    source, dest = drivers(None)
    where = plan.source_filter(source, dest)
    shards = plan.cut_shards(db, where, max_documents=100, max_bytes=10**12)
    assert len(shards) == 6
    seen = [key for shard in shards for key in documents_of(db, where, shard, limit=50)]
    assert sorted(seen) == sorted((d.bucket, d.archive_id, d.user_id, d.archive_id + ".json") for d in docs)


def test_batches_are_primary_key_range_scans(db):
    docs = anchore_sim.make_docs(50, seed=35, users=("admin", "acme"))
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    source, dest = drivers(None)
    where = plan.source_filter(source, dest)
    shard = plan.cut_shards(db, where, max_documents=10, max_bytes=10**12)[2]
    after = tuple(next(plan.shard_rows(db, where, shard, 3))[-1][:4])
    with db.transaction():
        # a 50-row table: show the plan a large one gets
        db.execute("SET LOCAL enable_seqscan = off")
        db.execute("SET LOCAL enable_bitmapscan = off")
        lines = [row[0] for row in db.execute(
            plan.sql.SQL("EXPLAIN ") + plan.batch_query(where, shard, after), plan.batch_params(shard, after, 3))]
    text = "\n".join(lines)
    assert "Index Scan using archive_metadata_pkey" in text, text
    assert "Index Cond: ((ROW((bucket)::text, (\"archiveId\")::text, (\"userId\")::text, (\"documentName\")::text) >" in text, text
    assert "Sort" not in text, text  # read in key order, no sort of the table


def test_large_groups_are_also_split_by_bytes(db):
    docs = anchore_sim.make_docs(60, seed=33, users=("admin",), buckets=("analysis_data",))
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    source, dest = drivers(None)
    where = plan.source_filter(source, dest)
    total_bytes = sum(len(d.content) for d in docs)
    limit = total_bytes // 5
    shards = plan.cut_shards(db, where, max_documents=10**6, max_bytes=limit)
    assert len(shards) >= 4
    largest = max(len(d.content) for d in docs)
    assert all(shard.bytes <= limit + largest for shard in shards)  # a shard ends after the document that crosses its limit
    assert sum(shard.documents for shard in shards) == len(docs)


def test_progress_table_and_workers(db, s3, cli, tmp_path):
    docs = anchore_sim.make_docs(300, seed=34)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    with FaultProxy(s3.endpoint) as proxy:
        # Slow uploads: the run lasts long enough for the second worker process
        # to start and take shards even on a loaded machine.
        proxy.add(Rule("delay", method="PUT", delay=0.05, times=None))
        config = through_proxy(s3, proxy, bucket)
        source = write_config(tmp_path / "a.yaml", section("db"))
        dest = write_config(tmp_path / "b.yaml", section("s3", config))
        result = cli("migrate", source, dest, "--dontask", "--workers", "2", "--shard-size", "20", "--batch-size", "8",
                     "--io-threads", "2")
    assert result.returncode == 0, result.stderr
    shards = db.execute("SELECT state, documents_done, worker, host FROM objmig_shards").fetchall()
    assert len(shards) >= 15
    assert {row[0] for row in shards} == {"done"}
    assert sum(row[1] for row in shards) == len(docs)
    assert len({row[2] for row in shards}) == 2  # two worker processes shared the shards
    assert all(row[3] for row in shards)
    assert db.execute("SELECT state FROM objmig_runs").fetchall() == [("complete",)]
    assert_all_readable(db, s3.client, docs)


def test_task_row_shows_live_progress(db, s3, cli, tmp_path, schema_ready):
    docs = anchore_sim.make_docs(120, seed=35)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    with FaultProxy(s3.endpoint) as proxy:
        proxy.add(Rule("delay", method="PUT", delay=0.03, times=None))
        config = through_proxy(s3, proxy, bucket)
        source = write_config(tmp_path / "a.yaml", section("db"))
        dest = write_config(tmp_path / "b.yaml", section("s3", config))
        command = [sys.executable, "-m", "anchore_objmig", "--db-connect", schema_ready, "migrate", source, dest,
                   "--dontask", "--workers", "1", "--io-threads", "2", "--batch-size", "10"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, text=True)
        seen = set()
        with psycopg.connect(schema_ready, autocommit=True) as watcher:
            while process.poll() is None:
                row = watcher.execute("SELECT archive_documents_migrated FROM archive_migration_tasks").fetchone()
                if row:
                    seen.add(row[0])
                time.sleep(0.05)
        assert process.wait() == 0, process.stderr.read()
    partial = {count for count in seen if 0 < count < len(docs)}
    assert partial, f"no intermediate progress seen: {sorted(seen)}"
    assert task_rows(db)[0][4] == len(docs)


def test_large_documents_go_up_in_parts(db, s3, cli, tmp_path):
    import random

    big = anchore_sim.Doc("admin", "image_content_data", "sha256:big", random.Random(1).randbytes(12 * 1024 * 1024 + 17))
    docs = [big] + anchore_sim.make_docs(5, seed=36)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket)))
    result = cli("migrate", source, dest, "--dontask", "--multipart-threshold", "5MiB")
    assert result.returncode == 0, result.stderr
    head = s3.client.head_object(Bucket=bucket, Key="admin/image_content_data/sha256:big")
    assert head["ETag"].strip('"').endswith("-3")  # three parts of 5 MiB (the last shorter)
    assert head["ContentType"] == "binary/octet-stream"
    assert_all_readable(db, s3.client, docs)
    # and back down, read in one GET
    assert cli("migrate", dest, source, "--dontask").returncode == 0
    assert_all_readable(db, s3.client, docs)


def main_and_joiner(dsn, source, dest):
    """A migrate run and, once it is running, a --join of it (one worker each,
    small batches and shards); both finished (CompletedProcess, CompletedProcess)."""
    base = [sys.executable, "-m", "anchore_objmig", "--db-connect", dsn, "migrate", source, dest,
            "--workers", "1", "--io-threads", "2", "--batch-size", "5", "--shard-size", "10"]
    main = subprocess.Popen(base + ["--dontask"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, text=True)
    with psycopg.connect(dsn, autocommit=True) as watcher:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if watcher.execute("SELECT to_regclass('objmig_runs') IS NOT NULL").fetchone()[0] and \
                    watcher.execute("SELECT count(*) FROM objmig_runs WHERE state = 'running'").fetchone()[0]:
                break
            time.sleep(0.02)
    joiner = subprocess.run(base + ["--join"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    out, err = main.communicate(timeout=300)
    return subprocess.CompletedProcess(main.args, main.returncode, out, err), joiner


def test_join_shares_a_running_migration(db, s3, cli, tmp_path, schema_ready):
    docs = anchore_sim.make_docs(160, seed=37)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    with FaultProxy(s3.endpoint) as proxy:
        proxy.add(Rule("delay", method="PUT", delay=0.05, times=None))  # long enough to join
        config = through_proxy(s3, proxy, bucket)
        source = write_config(tmp_path / "a.yaml", section("db"))
        dest = write_config(tmp_path / "b.yaml", section("s3", config))
        main, joiner = main_and_joiner(schema_ready, source, dest)
    assert joiner.returncode == 0, joiner.stderr
    assert main.returncode == 0, main.stderr
    assert "joining migration task 1" in joiner.stderr
    workers = {row[0] for row in db.execute("SELECT DISTINCT worker FROM objmig_shards WHERE state = 'done'")}
    assert len(workers) == 2, workers  # both processes moved shards
    assert task_rows(db) == [("complete", "running", "db", "s3", len(docs), len(docs), True)]
    assert_all_readable(db, s3.client, docs)
    assert len(s3.keys(bucket)) == len(docs)


def test_a_joiner_and_the_main_host_move_shared_copies_and_delete_each_after_its_last_row(db, s3, schema_ready,
                                                                                            tmp_path):
    """Rows sharing a stored copy, in shards taken by two hosts: each copy
    moves for every row and goes only once no row needs it, whichever host
    moves which row (the shared copies are noted once per run, for both)."""
    from test_integrity import share_copy

    docs = anchore_sim.make_docs(120, seed=38, buckets=("analysis_data",))
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    # Every tenth document's copy is shared by a twin in another bucket: another shard, often another host.
    twins = []
    for n, doc in enumerate(docs[::10]):
        twin = anchore_sim.Doc(doc.user_id, "manifest_data", f"sha256:{n:064x}", doc.content)
        share_copy(db, doc.archive_id, twin.archive_id, bucket="manifest_data")
        twins.append(twin)
    bucket = s3.new_bucket()
    with FaultProxy(s3.endpoint) as proxy:
        proxy.add(Rule("delay", method="PUT", delay=0.05, times=None))  # long enough to join
        source = write_config(tmp_path / "a.yaml", section("db"))
        dest = write_config(tmp_path / "b.yaml", section("s3", through_proxy(s3, proxy, bucket)))
        main, joiner = main_and_joiner(schema_ready, source, dest)
    assert joiner.returncode == 0, joiner.stderr
    assert main.returncode == 0, main.stderr
    assert "joining migration task 1" in joiner.stderr
    workers = {row[0] for row in db.execute("SELECT DISTINCT worker FROM objmig_shards WHERE state = 'done'")}
    assert len(workers) == 2, workers  # both hosts moved shards
    everything = [*docs, *twins]
    assert_all_readable(db, s3.client, everything)
    assert all(url.startswith("s3://") for url in urls(db))
    assert len(s3.keys(bucket)) == len(everything)  # a copy of its own for every row
    assert db.execute("SELECT count(*) FROM archive_document").fetchone()[0] == 0  # each shared copy went, once


def test_join_without_a_running_migration(db, cli, tmp_path):
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("db2"))
    db.execute("SELECT 1")
    result = cli("migrate", source, dest, "--join")
    assert result.returncode == 1
    assert "no running migration" in result.stderr
    assert urls(db) == set()


def test_join_refuses_a_run_whose_owner_died(db, cli, tmp_path):
    import signal

    docs = anchore_sim.make_docs(20, seed=38)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("db2"))
    killed = cli("migrate", source, dest, "--dontask", env={"OBJMIG_CRASH_AT": "after-plan:1"})
    assert killed.returncode == -signal.SIGKILL
    joined = cli("migrate", source, dest, "--join")
    assert joined.returncode == 1
    assert "no process holds the migration lock" in joined.stderr
    assert all(url.startswith("db://") for url in urls(db))  # the joiner moved nothing
    resumed = cli("migrate", source, dest, "--dontask")
    assert resumed.returncode == 0, resumed.stderr
    assert_all_readable(db, None, docs)


def test_a_small_run_gives_every_worker_several_shards(db):
    """3,000 documents fit one 5,000-document shard: with 2 workers one of
    them would idle through the whole run (measured: db→db2 at 0.43 × the SQL
    move). A small run is cut into about 4 shards per worker instead, never
    below 50 documents a shard."""
    docs = anchore_sim.make_docs(400, seed=41, users=("admin", "acme"), large_share=0, small=(1024, 8 * 1024))
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    source, dest = drivers(None)
    where = plan.source_filter(source, dest)
    documents, _ = plan.shard_limits(db, where, workers=2)
    assert documents == 50
    assert len(plan.cut_shards(db, where, *plan.shard_limits(db, where, workers=2))) == 8
    assert len(plan.cut_shards(db, where, *plan.shard_limits(db, where, workers=1))) == 4
    assert len(plan.cut_shards(db, where, *plan.shard_limits(db, where, workers=1, max_documents=30))) == 14
    assert len(plan.cut_shards(db, where, *plan.shard_limits(db, where, workers=64))) == 8  # 50 a shard at least


def test_migrate_plans_shards_for_each_worker(db, cli, tmp_path):
    docs = anchore_sim.make_docs(400, seed=42, users=("admin",), large_share=0, small=(1024, 8 * 1024))
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    source = write_config(tmp_path / "db.yaml", section("db"))
    dest = write_config(tmp_path / "db2.yaml", section("db2"))
    result = cli("migrate", source, dest, "--dontask", "--workers", "2", "--progress", "none")
    assert result.returncode == 0, result.stderr
    assert "400 documents" in result.stderr and "in 8 shards, 2 workers" in result.stderr
    assert_all_readable(db, None, docs)
