"""`cleanup`: removing the old copies a `migrate --nodelete` left behind, and
nothing else. Against the real PostgreSQL and S3 servers of conftest.py.
"""

import os
import re
import select
import subprocess
import sys
import time

import anchore_sim
from faultproxy import FaultProxy
from helpers import assert_all_readable, section, through_proxy, write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "old/"


def s3_key(url):
    return url[len("s3://"):].split("/", 1)[1]


def reported(stdout):
    """(copies, bytes text) from cleanup's summary line."""
    match = re.search(r"(\d+) old copies \(([\d.]+ (?:B|KiB|MiB|GiB)) stored", stdout)
    assert match, stdout
    return int(match.group(1)), match.group(2)


def seed_moved_with_nodelete(db, s3, cli, tmp_path, count=40, before=None):
    """Documents in S3 moved to db2 with --nodelete, but for one logical bucket
    left out of the move, one document that fails, and a stray object nobody
    references: (docs, S3 bucket, source config, destination config, the ones
    that stayed, the broken one, the stray key)."""
    before = {} if before is None else before
    docs = anchore_sim.make_docs(count, seed=81, large_share=0.1)
    bucket = s3.new_bucket()
    anchore_sim.store(db, s3.location(bucket, prefix=PREFIX, compress=True, min_size_kbytes=10), docs)
    kept_bucket = docs[0].bucket
    moved_buckets = sorted({d.bucket for d in docs} - {kept_bucket})
    broken = next(d for d in docs if d.bucket != kept_bucket)
    url = db.execute('SELECT content_url FROM archive_metadata WHERE "archiveId" = %s', (broken.archive_id,)).fetchone()[0]
    s3.client.put_object(Bucket=bucket, Key=s3_key(url), Body=b"not what the digest says")
    # An object no row references and no run moved (a leftover of anything else).
    stray = f"{PREFIX}admin/{moved_buckets[0]}/sha256:stray"
    s3.client.put_object(Bucket=bucket, Key=stray, Body=b"{}")
    source = write_config(tmp_path / "s3.yaml", section("s3", s3.driver_config(bucket, prefix=PREFIX)))
    dest = write_config(tmp_path / "db2.yaml", section("db2"))
    before.update((row[0], row[1:]) for row in db.execute(  # the rows as they were at the source
        'SELECT "archiveId", content_url, is_compressed, digest, size FROM archive_metadata'))
    args = ["migrate", source, dest, "--dontask", "--nodelete"] + [f"--bucket={b}" for b in moved_buckets]
    result = cli(*args)
    assert result.returncode == 1, result.stderr  # the broken one failed, the others moved
    stayed = [d for d in docs if d.bucket == kept_bucket]
    return docs, bucket, source, dest, stayed, broken, stray


def test_cleanup_deletes_only_copies_a_recorded_run_moved(db, s3, cli, tmp_path):
    before = {}
    docs, bucket, source, dest, stayed, broken, stray = seed_moved_with_nodelete(db, s3, cli, tmp_path, before=before)
    moved = [d for d in docs if d not in stayed and d is not broken]
    keys_before = set(s3.keys(bucket))
    assert len(keys_before) == len(docs) + 1  # --nodelete kept every source copy
    expected_bytes = sum(before[d.archive_id][3] for d in moved)

    dry = cli("cleanup", source, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert reported(dry.stdout)[0] == len(moved) and "nothing was changed" in dry.stdout
    assert set(s3.keys(bucket)) == keys_before

    # --bucket narrows it; the destination's config finds nothing of its own to clean
    one = moved[0].bucket
    narrowed = cli("cleanup", source, "--dry-run", "--bucket", one)
    assert reported(narrowed.stdout)[0] == sum(1 for d in moved if d.bucket == one)
    assert reported(cli("cleanup", dest, "--dry-run").stdout)[0] == 0
    # the same bucket and prefix on another server (here: another address) is not where they were moved from
    with FaultProxy(s3.endpoint) as proxy:
        elsewhere = write_config(tmp_path / "other.yaml", section("s3", through_proxy(s3, proxy, bucket, prefix=PREFIX)))
        assert reported(cli("cleanup", elsewhere, "--dry-run").stdout)[0] == 0

    result = cli("cleanup", source, "--dontask")
    assert result.returncode == 0, result.stderr
    match = re.search(r"deleted (\d+) old copies from s3://\S+ .*: ([\d.]+ \w+) freed", result.stdout)
    assert match and int(match.group(1)) == len(moved), result.stdout
    assert match.group(2) == human(expected_bytes)
    left = set(s3.keys(bucket))
    expected_left = {s3_key(url) for (url,) in db.execute(
        "SELECT content_url FROM archive_metadata WHERE content_url LIKE 's3://%'")} | {stray}
    assert left == expected_left  # what is referenced (not moved, failed) and the stray stay
    assert len(left) == len(stayed) + 2
    assert_all_readable(db, s3.client, [d for d in docs if d is not broken], skip=[broken.archive_id])

    again = cli("cleanup", source, "--dontask")
    assert again.returncode == 0 and reported(again.stdout)[0] == 0
    assert set(s3.keys(bucket)) == left


def human(count):
    from anchore_objmig.display import human_bytes

    return human_bytes(count)


def test_cleanup_checks_references_again_right_before_deleting(db, s3, cli, tmp_path):
    """Between the count shown at the prompt and the delete, a metadata row
    comes to reference one of the old copies again: that copy must stay."""
    before = {}
    docs, bucket, source, dest, stayed, broken, stray = seed_moved_with_nodelete(db, s3, cli, tmp_path, count=20,
                                                                                 before=before)
    moved = [d for d in docs if d not in stayed and d is not broken]
    revived = moved[2]
    old_url = before[revived.archive_id][0]
    new_url = db.execute('SELECT content_url FROM archive_metadata WHERE "archiveId" = %s', (revived.archive_id,)).fetchone()[0]
    assert new_url.startswith("db2://")

    env = {k: v for k, v in os.environ.items() if not k.startswith("ANCHORE")}
    process = subprocess.Popen([sys.executable, "-m", "anchore_objmig", "--db-connect", cli.dsn, "cleanup", source],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    stderr = b""
    deadline = time.monotonic() + 120
    while b"(y/N) " not in stderr:
        assert time.monotonic() < deadline and process.poll() is None, stderr
        if select.select([process.stderr], [], [], 1)[0]:
            stderr += os.read(process.stderr.fileno(), 65536)
    assert f"About to delete {len(moved)} old copies".encode() in stderr, stderr
    # Someone points the document back at its old copy (it is intact: --nodelete kept it).
    db.execute('UPDATE archive_metadata SET content_url = %s, is_compressed = %s, digest = %s, size = %s '
               'WHERE "archiveId" = %s', (*before[revived.archive_id], revived.archive_id))
    stdout, rest = process.communicate(b"y\n", timeout=120)
    assert process.returncode == 0, stderr + rest
    assert f"deleted {len(moved) - 1} old copies".encode() in stdout, stdout
    assert s3_key(old_url) in s3.keys(bucket)
    assert_all_readable(db, s3.client, [d for d in docs if d is not broken], skip=[broken.archive_id])


def test_cleanup_finds_nothing_after_a_deleting_run_or_a_move_back(db, cli, tmp_path):
    docs = anchore_sim.make_docs(15, seed=82)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    archive = anchore_sim.make_docs(6, seed=83, buckets=("analysis_archive",))
    anchore_sim.store(db, anchore_sim.Location("db"), archive)
    db_config = write_config(tmp_path / "db.yaml", section("db"), analysis_archive=section("db"))
    db2_config = write_config(tmp_path / "db2.yaml", section("db2"), analysis_archive=section("db2"))

    # the analysis archive moves with --nodelete: its old rows are cleanup's to remove
    assert cli("migrate", db_config, db2_config, "--dontask", "--nodelete", "--from-analysis-archive",
               "--to-analysis-archive", "--bucket", "analysis_archive").returncode == 0
    # the rest moves db -> db2 deleting as it goes, then back with --nodelete,
    # then forward again deleting: no old copy is left to clean up but the archive's
    main = [f"--bucket={b}" for b in sorted({d.bucket for d in docs})]
    assert cli("migrate", db_config, db2_config, "--dontask", *main).returncode == 0
    assert cli("migrate", db2_config, db_config, "--dontask", "--nodelete", *main).returncode == 0
    assert cli("migrate", db_config, db2_config, "--dontask", *main).returncode == 0
    rows = db.execute("SELECT count(*) FROM archive_document").fetchone()[0]
    assert rows == len(archive)  # only the archive's old rows are still in the db driver

    plan = cli("cleanup", db_config, "--from-analysis-archive", "--dry-run", "--bucket", "analysis_archive")
    assert plan.returncode == 0 and reported(plan.stdout)[0] == len(archive), plan.stdout
    other = cli("cleanup", db_config, "--dry-run", "--bucket", docs[0].bucket)
    assert reported(other.stdout)[0] == 0
    assert reported(cli("cleanup", db2_config, "--dry-run").stdout)[0] == 0  # every db2 copy is in use

    # no migration may run while cleanup deletes, and no cleanup while one runs
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(2, 1)")
        held = cli("cleanup", db_config, "--from-analysis-archive", "--dontask")
    assert held.returncode == 1 and "migration lock" in held.stderr
    assert db.execute("SELECT count(*) FROM archive_document").fetchone()[0] == len(archive)

    result = cli("cleanup", db_config, "--from-analysis-archive", "--dontask")
    assert result.returncode == 0, result.stderr
    assert db.execute("SELECT count(*) FROM archive_document").fetchone()[0] == 0
    assert_all_readable(db, None, docs + archive)


def test_cleanup_without_any_recorded_run_deletes_nothing(db, cli, tmp_path):
    docs = anchore_sim.make_docs(5, seed=84)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    db.execute("DELETE FROM archive_metadata")  # unreferenced, but nothing proves they were moved
    config = write_config(tmp_path / "db.yaml", section("db"))
    result = cli("cleanup", config, "--dontask")
    assert result.returncode == 0, result.stderr
    assert "no migration has been recorded" in result.stdout
    assert db.execute("SELECT count(*) FROM archive_document").fetchone()[0] == 5
