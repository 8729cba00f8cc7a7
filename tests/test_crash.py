"""Killed at any point, no document is lost, and the same command finishes the job.

Each case kills the tool's whole process group with SIGKILL at one point of
the flow (OBJMIG_CRASH_AT, see anchore_objmig/faults.py), reads every
document back as Anchore does, then reruns the same command and checks that
everything ended at the destination, exactly once, with nothing left behind.
"""

import random
import signal

import pytest

import anchore_sim
from helpers import assert_all_readable, section, task_rows, urls, write_config

CRASH_POINTS = [
    "after-task:1",  # task row written, no shards yet
    "after-plan:1",  # shards written, no worker started
    "after-claim:2",  # a shard claimed, nothing read
    "after-read:3",  # a batch read from the source
    "s3-put:25",  # in the middle of a batch's uploads
    "s3-part:1",  # in the middle of a multipart upload
    "after-write:2",  # a batch written, metadata not committed
    "before-commit:3",  # metadata UPDATE run, transaction not committed
    "after-commit:2",  # metadata committed, source copies not deleted
    "after-delete:4",  # source copies deleted, progress not recorded
    "after-record:5",  # progress recorded
    "before-finish:1",  # everything moved, task not closed
]
BIG = 6 * 1024 * 1024  # above the 5 MiB multipart threshold used here


def seed(db):
    docs = anchore_sim.make_docs(150, seed=3, large_share=0.1)
    # incompressible, so they stay above the multipart threshold after zlib
    docs += [anchore_sim.Doc("admin", "analysis_data", f"big-{n}", random.Random(n).randbytes(BIG)) for n in range(2)]
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    return docs


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_killed_db_to_s3_then_rerun_finishes(db, s3, cli, tmp_path, point):
    docs = seed(db)
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket), compress=True, min_size_kbytes=50))
    args = ["migrate", source, dest, "--dontask", "--workers", "1", "--batch-size", "10", "--shard-size", "40",
            "--multipart-threshold", "5MiB"]

    killed = cli(*args, env={"OBJMIG_CRASH_AT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert_all_readable(db, s3.client, docs)  # the invariant, right after the kill

    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert_all_readable(db, s3.client, docs)
    assert all(url.startswith(f"s3://{bucket}/") for url in urls(db))
    assert len(s3.keys(bucket)) == len(docs)  # no stray or duplicate objects
    assert db.execute("SELECT count(*) FROM archive_document").fetchone()[0] == 0  # no source copy left
    assert db.execute("SELECT count(*) FROM objmig_pending_deletes").fetchone()[0] == 0
    rows = task_rows(db)
    assert rows[-1][0] == "complete"
    assert all(row[0] in ("complete", "failed") for row in rows)  # nothing left 'running'
    if len(rows) > 1:
        assert rows[0][:2] == ("failed", "running")
        assert "closed migration task 1 as failed" in rerun.stderr


@pytest.mark.parametrize("point", ["after-read:2", "after-commit:2", "after-delete:3", "s3-put:5"])
def test_killed_s3_to_db_then_rerun_finishes(db, s3, cli, tmp_path, point):
    bucket = s3.new_bucket()
    docs = anchore_sim.make_docs(120, seed=5, large_share=0.1)
    anchore_sim.store(db, s3.location(bucket, compress=True), docs)
    other = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("s3", s3.driver_config(bucket), compress=True))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(other, prefix="p/")))
    args = ["migrate", source, dest, "--dontask", "--workers", "2", "--batch-size", "10", "--shard-size", "30"]
    killed = cli(*args, env={"OBJMIG_CRASH_AT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert_all_readable(db, s3.client, docs)
    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert_all_readable(db, s3.client, docs)
    assert s3.keys(bucket) == []
    assert len(s3.keys(other)) == len(docs)


def test_nodelete_rerun_keeps_the_copies_a_killed_run_meant_to_delete(db, s3, cli, tmp_path):
    docs = anchore_sim.make_docs(40, seed=6)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket)))
    args = ["migrate", source, dest, "--dontask", "--workers", "1", "--batch-size", "10"]
    killed = cli(*args, env={"OBJMIG_CRASH_AT": "after-commit:1"})
    assert killed.returncode == -signal.SIGKILL
    pending = db.execute("SELECT count(*) FROM objmig_pending_deletes").fetchone()[0]
    assert pending > 0  # the first batch's old copies, committed elsewhere, not yet deleted
    kept = cli(*args, "--nodelete")
    assert kept.returncode == 0, kept.stderr
    assert db.execute("SELECT count(*) FROM archive_document").fetchone()[0] == len(docs)  # nothing deleted
    assert_all_readable(db, s3.client, docs)
    # a later run that may delete finishes what the killed run meant to do
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    assert db.execute("SELECT count(*) FROM archive_document").fetchone()[0] == len(docs) - pending
    assert db.execute("SELECT count(*) FROM objmig_pending_deletes").fetchone()[0] == 0
    assert_all_readable(db, s3.client, docs)
