"""Documents above the streaming threshold are moved as streams (anchore_objmig/streaming.py):
read in slices or ranged GETs, re-encoded piece by piece, written as multipart
parts or with a COPY, and still stored byte for byte as Anchore would store
them. The threshold is lowered to 1 MiB here so documents of a few MB stream."""

import json
import random
import re
import signal
import zlib

import pytest

import anchore_sim
from faultproxy import FaultProxy, Rule
from helpers import assert_all_readable, section, task_rows, through_proxy, urls, write_config

STREAM = {"OBJMIG_STREAM_THRESHOLD": str(1024 * 1024)}
PART = ["--multipart-threshold", "5MiB"]


def big_json(n, size):
    """A JSON document of about `size` bytes, with some multi-byte UTF-8 in it."""
    rng = random.Random(n)
    items, total = [], 0
    while total < size:
        item = {"id": rng.randrange(10**9), "name": "pkg-é-" + "x" * rng.randrange(40), "ver": f"{rng.random():.6f}"}
        items.append(item)
        total += 60
    return json.dumps({"doc": n, "items": items}, ensure_ascii=False).encode("utf-8")


def seed_docs():
    docs = [anchore_sim.Doc("admin", "analysis_data", f"big-json-{n}", big_json(n, 3_000_000 + n * 500_000))
            for n in range(2)]
    # incompressible and not UTF-8: multipart even after zlib, base64 in archive_document
    docs.append(anchore_sim.Doc("admin", "analysis_data", "big-binary", random.Random(9).randbytes(11 * 1024 * 1024)))
    docs += anchore_sim.make_docs(20, seed=41)  # small ones share the batches, on the whole-document path
    return docs


def streamed(stderr):
    """The documents the run says it streamed."""
    return set(re.findall(r"streaming (\S+) \(", stderr))


def assert_stored_as_anchore_would(db, s3, docs, compress):
    """Every copy byte for byte what Anchore itself writes for that destination."""
    for doc in docs:
        url, is_compressed, digest, size = db.execute(
            'SELECT content_url, is_compressed, digest, size FROM archive_metadata WHERE "archiveId" = %s',
            (doc.archive_id,)).fetchone()
        if url.startswith("s3://"):
            bucket, key = url[len("s3://"):].split("/", 1)
            stored = s3.client.get_object(Bucket=bucket, Key=key)["Body"].read()
            want_compressed = compress and len(doc.content) > 100 * 1024
            assert is_compressed == want_compressed, doc.archive_id
            assert stored == (zlib.compress(doc.content, 3) if want_compressed else doc.content), doc.archive_id
        else:
            jsondata, b64 = db.execute('SELECT jsondata, b64_encoded FROM archive_document WHERE "archiveId" = %s',
                                       (doc.archive_id,)).fetchone()
            assert (jsondata, b64) == anchore_sim.db_text(doc.content), doc.archive_id
            assert not is_compressed
            stored = doc.content
        assert (digest, size) == (anchore_sim.md5hex(stored), len(stored)), doc.archive_id


@pytest.mark.parametrize("compress", [True, False])
def test_large_documents_stream_db_to_s3_and_back_byte_identical(db, s3, cli, tmp_path, compress):
    docs = seed_docs()
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    db_cfg = write_config(tmp_path / "db.yaml", section("db"))
    s3_cfg = write_config(tmp_path / "s3.yaml", section("s3", s3.driver_config(bucket), compress=compress))
    big = {f"admin/analysis_data/{doc.archive_id}" for doc in docs[:3]}

    there = cli("migrate", db_cfg, s3_cfg, "--dontask", "--workers", "1", *PART, env=STREAM)
    assert there.returncode == 0, there.stderr
    assert big <= streamed(there.stderr)
    assert all(url.startswith(f"s3://{bucket}/") for url in urls(db))
    assert db.execute("SELECT count(*) FROM archive_document").fetchone()[0] == 0
    assert_all_readable(db, s3.client, docs)
    assert_stored_as_anchore_would(db, s3, docs, compress)

    with FaultProxy(s3.endpoint) as proxy:  # to see how the way back reads
        proxied = section("s3", through_proxy(s3, proxy, bucket), compress=compress)
        back_cfg = write_config(tmp_path / "back.yaml", proxied)
        back = cli("migrate", back_cfg, db_cfg, "--dontask", "--workers", "1", *PART, env=STREAM)
        ranged = {path for method, path, headers, _ in proxy.seen if method == "GET" and "Range" in headers}
    assert back.returncode == 0, back.stderr
    assert big <= streamed(back.stderr)
    assert {doc.archive_id for doc in docs[:3]} <= {path.rsplit("/", 1)[1] for path in ranged}
    assert all(url.startswith("db://") for url in urls(db))
    assert s3.keys(bucket) == []
    assert_all_readable(db, s3.client, docs)
    assert_stored_as_anchore_would(db, s3, docs, compress)


def test_streamed_through_db2_with_a_wrong_compression_guess(db, s3, cli, tmp_path):
    """Compressed in S3, bound for db2 where only documents over 8 MB are
    compressed: the stream guesses "compress", finds the plain size below the
    threshold, and starts that document again uncompressed."""
    docs = seed_docs()
    bucket = s3.new_bucket()
    anchore_sim.store(db, s3.location(bucket, compress=True), docs)
    s3_cfg = write_config(tmp_path / "s3.yaml", section("s3", s3.driver_config(bucket), compress=True))
    db2_cfg = write_config(tmp_path / "db2.yaml", section("db2", compress=True, min_size_kbytes=8000))
    result = cli("migrate", s3_cfg, db2_cfg, "--dontask", "--workers", "1", *PART, env=STREAM)
    assert result.returncode == 0, result.stderr
    assert "bytes plain: not above min_size_kbytes, so not compressed)" in result.stderr
    assert_all_readable(db, s3.client, docs)
    rows = dict(db.execute('SELECT "archiveId", is_compressed FROM archive_metadata').fetchall())
    assert rows["big-binary"] is True and rows["big-json-0"] is False  # 11 MiB > 8000 KiB > ~3 MB
    for doc in docs[:3]:
        content = db.execute("SELECT content FROM object_storage WHERE key = %s", (doc.archive_id,)).fetchone()[0]
        assert bytes(content) == (zlib.compress(doc.content, 3) if rows[doc.archive_id] else doc.content)


def test_short_and_cut_off_ranges_are_read_again_and_a_hopeless_one_fails_cleanly(db, s3, cli, tmp_path):
    docs = seed_docs()
    bucket = s3.new_bucket()
    anchore_sim.store(db, s3.location(bucket, compress=True), docs)
    db.execute("UPDATE archive_metadata SET digest = NULL, size = size")  # only the transfer can tell
    with FaultProxy(s3.endpoint) as proxy:
        proxy.add(Rule("short200", method="GET", path="big-json-0", times=2),
                  Rule("cutoff", method="GET", path="big-json-1", times=1),
                  Rule("short200", method="GET", path="big-binary", times=None))
        source = write_config(tmp_path / "a.yaml", section("s3", through_proxy(s3, proxy, bucket, max_attempts=3),
                                                          compress=True))
        dest = write_config(tmp_path / "b.yaml", section("db"))
        result = cli("migrate", source, dest, "--dontask", "--workers", "1", env=STREAM)
        assert [rule.fired for rule in proxy.rules] == [2, 1, 3]
        spoiled = [headers.get("Range") for method, path, headers, _ in proxy.seen
                   if method == "GET" and "big-binary" in path]
    assert all(spoiled) and len(spoiled) == 3  # ranged GETs, each read again until max_attempts
    assert "reading s3://" in result.stderr and "again (attempt 2 of 3)" in result.stderr
    assert result.returncode == 1
    failed = [line for line in result.stderr.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and "big-binary" in failed[0] and "unreadable at the source" in failed[0]
    assert task_rows(db)[0][0] == "failed"
    url = db.execute("""SELECT content_url FROM archive_metadata WHERE "archiveId" = 'big-binary'""").fetchone()[0]
    assert url.startswith(f"s3://{bucket}/")  # untouched, still readable there
    assert db.execute("""SELECT count(*) FROM archive_document WHERE "archiveId" = 'big-binary'""").fetchone()[0] == 0
    assert_all_readable(db, s3.client, docs)
    assert len(s3.keys(bucket)) == 1


def test_corrupt_streamed_source_leaves_no_copy_behind(db, s3, cli, tmp_path):
    docs = seed_docs()
    anchore_sim.store(db, anchore_sim.Location("db2"), docs)
    db.execute("""UPDATE archive_metadata SET digest = md5('other') WHERE "archiveId" = 'big-binary'""")
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db2"))
    with FaultProxy(s3.endpoint) as proxy:  # to see the parts go up, then the upload aborted
        dest = write_config(tmp_path / "b.yaml", section("s3", through_proxy(s3, proxy, bucket), compress=True))
        result = cli("migrate", source, dest, "--dontask", "--workers", "1", *PART, env=STREAM)
        sent = [(method, path) for method, path, *_ in proxy.seen if "big-binary" in path]
    assert "streaming admin/analysis_data/big-binary" in result.stderr
    assert [method for method, path in sent if "partNumber=" in path] == ["PUT"] * 2  # the last waits for the check
    assert sent[-1][0] == "DELETE" and "uploadId=" in sent[-1][1]  # aborted: the digest failed before completing
    assert result.returncode == 1
    failed = [line for line in result.stderr.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and "big-binary" in failed[0] and "corrupt at the source: digest mismatch" in failed[0]
    assert not any(key.endswith("big-binary") for key in s3.keys(bucket))  # its parts were uploaded, then aborted
    assert s3.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert len(s3.keys(bucket)) == len(docs) - 1


@pytest.mark.parametrize("point", ["stream-chunk:2", "stream-chunk:4"])
def test_killed_mid_stream_to_s3_loses_nothing_and_the_rerun_finishes(db, s3, cli, tmp_path, point):
    docs = seed_docs()
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket), compress=True))
    args = ["migrate", source, dest, "--dontask", "--workers", "1", *PART]
    killed = cli(*args, env={**STREAM, "OBJMIG_CRASH_AT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert_all_readable(db, s3.client, docs)
    left = s3.client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    if point == "stream-chunk:2":  # killed after the 2nd of big-binary's 3 parts
        assert [upload["Key"] for upload in left] == ["admin/analysis_data/big-binary"]
    rerun = cli(*args, env=STREAM)
    assert rerun.returncode == 0, rerun.stderr
    if left:
        assert f"aborted {len(left)} incomplete multipart uploads" in rerun.stderr
    assert_all_readable(db, s3.client, docs)
    assert_stored_as_anchore_would(db, s3, docs, True)
    assert len(s3.keys(bucket)) == len(docs)
    assert s3.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert db.execute("SELECT count(*) FROM archive_document").fetchone()[0] == 0
    assert task_rows(db)[-1][0] == "complete"


def test_killed_mid_copy_into_the_database_loses_nothing_and_the_rerun_finishes(db, s3, cli, tmp_path):
    docs = seed_docs()
    bucket = s3.new_bucket()
    anchore_sim.store(db, s3.location(bucket, compress=True), docs)
    source = write_config(tmp_path / "a.yaml", section("s3", s3.driver_config(bucket), compress=True))
    dest = write_config(tmp_path / "b.yaml", section("db"))
    args = ["migrate", source, dest, "--dontask", "--workers", "1"]
    killed = cli(*args, env={**STREAM, "OBJMIG_CRASH_AT": "stream-chunk:2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert_all_readable(db, s3.client, docs)
    assert db.execute("SELECT count(*) FROM archive_document WHERE \"archiveId\" LIKE 'big-%'").fetchone()[0] == 0
    rerun = cli(*args, env=STREAM)
    assert rerun.returncode == 0, rerun.stderr
    assert_all_readable(db, s3.client, docs)
    assert_stored_as_anchore_would(db, s3, docs, False)
    assert s3.keys(bucket) == []
    assert task_rows(db)[-1][0] == "complete"


def test_streamed_between_the_two_database_drivers(db, cli, tmp_path):
    """db → db2 → db: read in slices on one connection while a COPY writes on the other."""
    docs = seed_docs()
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    db_cfg = write_config(tmp_path / "db.yaml", section("db"))
    db2_cfg = write_config(tmp_path / "db2.yaml", section("db2", compress=True))
    big = {f"admin/analysis_data/{doc.archive_id}" for doc in docs[:3]}
    for source, dest, scheme in ((db_cfg, db2_cfg, "db2://"), (db2_cfg, db_cfg, "db://")):
        result = cli("migrate", source, dest, "--dontask", "--workers", "1", env=STREAM)
        assert result.returncode == 0, result.stderr
        assert big <= streamed(result.stderr)
        assert all(url.startswith(scheme) for url in urls(db))
        assert_all_readable(db, None, docs)
    assert db.execute("SELECT count(*) FROM object_storage").fetchone()[0] == 0
    for doc in docs:
        jsondata, b64 = db.execute('SELECT jsondata, b64_encoded FROM archive_document WHERE "archiveId" = %s',
                                   (doc.archive_id,)).fetchone()
        assert (jsondata, b64) == anchore_sim.db_text(doc.content), doc.archive_id


def test_a_frozen_stream_is_fenced_before_it_completes_its_upload(db, s3, cli, tmp_path):
    """A joiner frozen with every part of a streamed document uploaded wakes up
    after its shard was taken over and finished: it aborts, it does not complete."""
    from test_run_integrity import FAST, LEASE, Tool

    docs = seed_docs()[:3] + anchore_sim.make_docs(4, seed=42)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    with FaultProxy(s3.endpoint) as proxy:  # main and joiner alike: one endpoint, so the joiner may join
        source = write_config(tmp_path / "a.yaml", section("db"))
        dest = write_config(tmp_path / "b.yaml", section("s3", through_proxy(s3, proxy, bucket, **FAST)))
        args = ["migrate", source, dest, "--dontask", "--workers", "1", "--progress", "none", *LEASE, *PART]
        main = Tool(cli.dsn, args, {**STREAM, "OBJMIG_FREEZE_AT": "after-plan:1"}, tmp_path, "main")
        joiner = None
        try:
            main.wait_stopped()
            joiner = Tool(cli.dsn, [*args, "--join"], {**STREAM, "OBJMIG_FREEZE_AT": "stream-complete:1"},
                          tmp_path, "joiner")
            joiner.wait_stopped()
            parts = [path for method, path, *_ in proxy.seen if method == "PUT" and "partNumber=" in path]
            assert len(parts) == 3 and all("big-binary" in path for path in parts)
            main.resume()
            code, log = main.finish()
            assert code == 0, log
            assert "took over shard" in log
            before = len(proxy.seen)
        finally:  # never leave a stopped process behind
            for tool in (main, joiner):
                if tool is not None and tool.process.poll() is None:
                    tool.resume()
        code, log = joiner.finish()
        after = [(method, path) for method, path, *_ in proxy.seen[before:]]
    assert code != 0, log
    assert "stops writing" in log
    assert not any(method == "POST" and "uploadId=" in path for method, path in after), after  # never completed
    assert [method for method, path in after if "big-binary" in path] == ["DELETE"]  # its upload aborted
    assert_all_readable(db, s3.client, docs)
    assert len(s3.keys(bucket)) == len(docs)
    assert s3.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_rows_without_size_are_measured_in_the_database_and_streamed(db, s3, cli, tmp_path):
    docs = seed_docs()
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    # As old Anchore versions left them: no size; one with no digest either.
    db.execute("""UPDATE archive_metadata SET size = NULL WHERE "archiveId" LIKE 'big-%'""")
    db.execute("""UPDATE archive_metadata SET digest = NULL WHERE "archiveId" = 'big-json-0'""")
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket), compress=True))
    result = cli("migrate", source, dest, "--dontask", "--workers", "1", *PART, env=STREAM)
    assert result.returncode == 0, result.stderr
    assert "streaming admin/analysis_data/big-binary (size unknown)" in result.stderr
    assert {f"admin/analysis_data/{doc.archive_id}" for doc in docs[:3]} <= streamed(result.stderr)
    unverifiable = [line for line in result.stderr.splitlines() if "UNVERIFIABLE" in line]
    assert len(unverifiable) == 1 and "big-json-0" in unverifiable[0]
    assert_all_readable(db, s3.client, docs)
    assert_stored_as_anchore_would(db, s3, docs, True)  # digest and size recorded again


def test_streamed_from_one_bucket_to_another(db, s3, cli, tmp_path):
    docs = seed_docs()
    bucket, other = s3.new_bucket(), s3.new_bucket()
    anchore_sim.store(db, s3.location(bucket, compress=True), docs)
    source = write_config(tmp_path / "a.yaml", section("s3", s3.driver_config(bucket), compress=True))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(other, prefix="p/")))
    result = cli("migrate", source, dest, "--dontask", "--workers", "1", *PART, env=STREAM)
    assert result.returncode == 0, result.stderr
    assert {f"admin/analysis_data/{doc.archive_id}" for doc in docs[:3]} <= streamed(result.stderr)
    assert s3.keys(bucket) == [] and len(s3.keys(other)) == len(docs)
    assert_all_readable(db, s3.client, docs)
    assert_stored_as_anchore_would(db, s3, docs, False)


def test_streamed_through_localfs(db, s3, cli, tmp_path):
    """db → localfs → s3 → db, compressed on localfs and in S3; a kill in the
    middle of a file leaves a temporary file the rerun removes."""
    docs = seed_docs()
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    directory = tmp_path / "archive"
    db_cfg = write_config(tmp_path / "db.yaml", section("db"))
    fs_cfg = write_config(tmp_path / "fs.yaml", section("localfs", {"archive_data_dir": str(directory)}, compress=True))
    s3_cfg = write_config(tmp_path / "s3.yaml", section("s3", s3.driver_config(bucket), compress=True))
    big = {f"admin/analysis_data/{doc.archive_id}" for doc in docs[:3]}

    killed = cli("migrate", db_cfg, fs_cfg, "--dontask", "--workers", "1",
                 env={**STREAM, "OBJMIG_CRASH_AT": "stream-chunk:2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len([path for path in directory.rglob(".objmig-*")]) == 1  # the file it was writing
    assert_all_readable(db, s3.client, docs)
    logs = []
    for source, dest, scheme in ((db_cfg, fs_cfg, "file://"), (fs_cfg, s3_cfg, "s3://"), (s3_cfg, db_cfg, "db://")):
        if source == fs_cfg:  # as old Anchore versions left rows: no size, so the file is measured
            db.execute("""UPDATE archive_metadata SET size = NULL WHERE "archiveId" = 'big-binary'""")
        result = cli("migrate", source, dest, "--dontask", "--workers", "1", *PART, env=STREAM)
        assert result.returncode == 0, result.stderr
        assert big <= streamed(result.stderr)
        assert all(url.startswith(scheme) for url in urls(db))
        assert_all_readable(db, s3.client, docs)
        logs.append(result.stderr)
    assert "removed 1 temporary files" in logs[0]
    assert "streaming admin/analysis_data/big-binary (size unknown)" in logs[1]  # measured on disk
    assert [path for path in directory.rglob("*") if path.is_file()] == []
    assert_stored_as_anchore_would(db, s3, docs, False)


def test_verify_reads_large_documents_as_streams(db, s3, cli, tmp_path):
    docs = seed_docs()
    bucket = s3.new_bucket()
    anchore_sim.store(db, s3.location(bucket, compress=True), docs[:3] + docs[5:])
    anchore_sim.store(db, anchore_sim.Location("db"), docs[3:5])
    db.execute("""UPDATE archive_metadata SET digest = md5('other') WHERE "archiveId" = 'big-json-0'""")
    s3.client.delete_object(Bucket=bucket, Key="admin/analysis_data/big-json-1")
    s3_cfg = write_config(tmp_path / "s3.yaml", section("s3", s3.driver_config(bucket), compress=True))
    result = cli("verify", s3_cfg, env=STREAM)
    assert result.returncode == 1, result.stderr
    assert "checking admin/analysis_data/big-binary (" in result.stderr  # 11 MiB: read in ranges
    bad = sorted(line for line in result.stderr.splitlines() if "BAD " in line)
    assert len(bad) == 2, result.stderr
    assert "big-json-0" in bad[0] and "digest mismatch" in bad[0]
    assert "big-json-1" in bad[1] and "not found" in bad[1]

    # archive_document rows, read in slices by a session that is read-only but for its own temporary table
    anchore_sim.reset_tables(db)
    anchore_sim.store(db, anchore_sim.Location("db"), [doc for doc in docs if doc.archive_id != "big-json-1"])
    db.execute("""UPDATE archive_document SET jsondata = jsondata || ' ' WHERE "archiveId" = 'big-json-0'""")
    result = cli("verify", write_config(tmp_path / "db.yaml", section("db")), env=STREAM)
    assert result.returncode == 1, result.stderr
    assert "checking admin/analysis_data/big-binary (" in result.stderr
    bad = [line for line in result.stderr.splitlines() if "BAD " in line]
    assert len(bad) == 1 and "big-json-0" in bad[0] and "digest mismatch" in bad[0], result.stderr


def test_a_terminated_reader_session_is_replaced_and_the_document_moves(db, s3, cli, tmp_path):
    """The session reading slices dies between two large documents (a server
    restart, pg_terminate_backend): the shard is given back and retried on a
    new session, not reported unreadable."""
    from test_run_integrity import Tool

    docs = seed_docs()
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket), compress=True))
    args = ["migrate", source, dest, "--dontask", "--workers", "1", "--progress", "none", *PART]
    tool = Tool(cli.dsn, args, {**STREAM, "OBJMIG_FREEZE_AT": "stream-document:2"}, tmp_path, "main")
    try:
        tool.wait_stopped()  # the first large document read, the second not yet
        ended = db.execute("""SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
                              WHERE application_name LIKE 'anchore-objmig reader%'""").fetchone()[0]
        assert ended == 1
    finally:
        tool.resume()
    code, log = tool.finish()
    assert code == 0, log
    assert "unreadable" not in log and "write refused" not in log
    assert "database connection lost" in log  # the shard was given back and retried
    assert {f"admin/analysis_data/{doc.archive_id}" for doc in docs[:3]} <= streamed(log)
    assert_all_readable(db, s3.client, docs)
    assert_stored_as_anchore_would(db, s3, docs, True)
    assert len(s3.keys(bucket)) == len(docs)


def test_db_timeout_does_not_cancel_a_long_stream_into_the_database(db, s3, cli, tmp_path):
    """--db-timeout bounds statements, not a COPY that lasts as long as the
    S3 reads feeding it: slow ranged GETs, a timeout shorter than the transfer."""
    docs = [anchore_sim.Doc("admin", "analysis_data", "big-binary", random.Random(9).randbytes(11 * 1024 * 1024))]
    docs += anchore_sim.make_docs(3, seed=43)
    bucket = s3.new_bucket()
    anchore_sim.store(db, s3.location(bucket, compress=True), docs)
    with FaultProxy(s3.endpoint) as proxy:
        proxy.add(Rule("delay", method="GET", path="big-binary", times=None, delay=1.5))
        source = write_config(tmp_path / "a.yaml", section("s3", through_proxy(s3, proxy, bucket), compress=True))
        dest = write_config(tmp_path / "b.yaml", section("db"))
        result = cli("--db-timeout", "1", "migrate", source, dest, "--dontask", "--workers", "1", env=STREAM)
        ranges = [path for method, path, headers, _ in proxy.seen
                  if method == "GET" and "big-binary" in path and "Range" in headers]
    assert len(ranges) >= 2, result.stderr  # each delayed 1.5 s: the COPY outlasted --db-timeout
    assert result.returncode == 0, result.stderr
    assert "streaming admin/analysis_data/big-binary" in result.stderr
    assert "canceling statement" not in result.stderr
    assert_all_readable(db, s3.client, docs)
    assert_stored_as_anchore_would(db, s3, docs, False)


def test_db_timeout_does_not_cancel_the_copy_of_a_large_value_read_from_the_database(db, s3, cli, tmp_path):
    """The streaming reader copies a large archive_document value into its own
    table in one statement, which may take longer than --db-timeout (here it
    waits on a lock the test holds for longer): it is not cancelled."""
    import psycopg
    from test_run_integrity import Tool, wait_for

    docs = seed_docs()
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket), compress=True))
    args = ["--db-timeout", "1", "migrate", source, dest, "--dontask", "--workers", "1", "--progress", "none", *PART]
    tool = Tool(cli.dsn, args, {**STREAM, "OBJMIG_FREEZE_AT": "stream-document:1"}, tmp_path, "main")
    try:
        tool.wait_stopped()
        with psycopg.connect(cli.dsn) as locker:
            locker.execute("LOCK TABLE archive_document IN ACCESS EXCLUSIVE MODE")
            tool.resume()
            wait_for(lambda: db.execute("""SELECT count(*) FROM pg_stat_activity
                                           WHERE application_name LIKE 'anchore-objmig reader%%'
                                             AND query LIKE 'INSERT INTO objmig_stream_value%%'
                                             AND clock_timestamp() - query_start > interval '2 seconds'""")
                     .fetchone()[0] == 1, 60, "the reader's copy to outlast --db-timeout")
            locker.rollback()
    finally:
        if tool.process.poll() is None:
            tool.resume()
    code, log = tool.finish()
    assert code == 0, log
    assert "canceling statement" not in log
    assert {f"admin/analysis_data/{doc.archive_id}" for doc in docs[:3]} <= streamed(log)
    assert_all_readable(db, s3.client, docs)
    assert_stored_as_anchore_would(db, s3, docs, True)


def test_sigint_during_a_copy_stops_it_at_the_next_piece_and_commits_nothing(db, s3, cli, tmp_path):
    """SIGINT is held back while a transaction is open, but a streamed COPY
    checks for it between pieces: it stops there, rolled back, instead of
    after the whole document."""
    size = 40 * 1024 * 1024  # 5 ranged GETs
    docs = [anchore_sim.Doc("admin", "analysis_data", "big-binary", random.Random(9).randbytes(size))]
    docs += anchore_sim.make_docs(3, seed=43)
    bucket = s3.new_bucket()
    anchore_sim.store(db, s3.location(bucket), docs)
    dest = write_config(tmp_path / "b.yaml", section("db"))
    with FaultProxy(s3.endpoint) as proxy:  # to count the ranges read
        source = write_config(tmp_path / "a.yaml", section("s3", through_proxy(s3, proxy, bucket)))
        args = ["migrate", source, dest, "--dontask", "--workers", "1"]
        stopped = cli(*args, env={**STREAM, "OBJMIG_SIGNAL_AT": "stream-chunk:1:INT"})
        ranges = [path for method, path, headers, _ in proxy.seen
                  if method == "GET" and "big-binary" in path and "Range" in headers]
        assert stopped.returncode == 130, stopped.stderr
        assert "closed as failed" in stopped.stderr
        # the text guess, then the base64 attempt the signal stopped: each read its first range and the
        # one fetched ahead (stream_read.S3Reader), not all 5
        assert len(ranges) <= 4, ranges
        assert db.execute("""SELECT count(*) FROM archive_document
                             WHERE "archiveId" = 'big-binary'""").fetchone()[0] == 0
        assert task_rows(db)[-1][0] == "failed"
        assert_all_readable(db, s3.client, docs)
        rerun = cli(*args, env=STREAM)
    assert rerun.returncode == 0, rerun.stderr
    assert [row[0] for row in task_rows(db)] == ["failed", "complete"]
    assert_all_readable(db, s3.client, docs)
    assert_stored_as_anchore_would(db, s3, docs, False)


def test_a_worker_frozen_mid_copy_locks_nothing_and_commits_nothing(db, s3, cli, tmp_path):
    """A joiner frozen in the middle of a streamed COPY into archive_document,
    with stray copies of the large documents left there by an interrupted run:
    the worker taking its shard over replaces them without waiting on the
    frozen one, which, resumed, stops and commits nothing."""
    from test_run_integrity import FAST, LEASE, Tool

    docs = seed_docs()[:3] + anchore_sim.make_docs(4, seed=42)
    bucket = s3.new_bucket()
    anchore_sim.store(db, s3.location(bucket, compress=True), docs)
    for doc in docs[:3]:
        db.execute("""INSERT INTO archive_document (bucket, "archiveId", "userId", "documentName", jsondata,
                      b64_encoded, created_at, last_updated, record_state_key)
                      VALUES (%s, %s, %s, %s, 'stray', false, 1, 1, 'active')""",
                   (doc.bucket, doc.archive_id, doc.user_id, doc.archive_id + ".json"))
    source = write_config(tmp_path / "a.yaml", section("s3", s3.driver_config(bucket, **FAST), compress=True))
    dest = write_config(tmp_path / "b.yaml", section("db"))
    args = ["migrate", source, dest, "--dontask", "--workers", "1", "--progress", "none", *LEASE]
    main = Tool(cli.dsn, args, {**STREAM, "OBJMIG_FREEZE_AT": "after-plan:1"}, tmp_path, "main")
    joiner = None
    try:
        main.wait_stopped()
        joiner = Tool(cli.dsn, [*args, "--join"], {**STREAM, "OBJMIG_FREEZE_AT": "stream-chunk:1"}, tmp_path, "joiner")
        joiner.wait_stopped()
        main.resume()
        code, log = main.finish()
        assert code == 0, log
        assert "took over shard" in log
    finally:  # never leave a stopped process behind
        for tool in (main, joiner):
            if tool is not None and tool.process.poll() is None:
                tool.resume()
    code, log = joiner.finish()
    assert code != 0, log
    assert "stops writing" in log
    assert_all_readable(db, s3.client, docs)
    assert_stored_as_anchore_would(db, s3, docs, False)
    assert db.execute("SELECT count(*) FROM archive_document").fetchone()[0] == len(docs)
    assert s3.keys(bucket) == []


def test_a_held_back_signal_is_raised_at_a_checkpoint_and_a_second_one_at_once():
    """Inside a transaction a signal waits for stop_if_asked() (or the block's
    end); an operator's second signal while it waits is raised at once."""
    from anchore_objmig import signals
    from anchore_objmig.errors import Terminated

    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    signals.install()
    try:
        with signals.deferred():
            signal.raise_signal(signal.SIGTERM)  # held back (raise_signal runs the handler before it returns)
            with pytest.raises(Terminated):
                signals.stop_if_asked()
            signals.stop_if_asked()  # raised once, not again
        with pytest.raises(KeyboardInterrupt):
            with signals.deferred():
                signal.raise_signal(signal.SIGTERM)
                with pytest.raises(KeyboardInterrupt):
                    signal.raise_signal(signal.SIGINT)  # the operator insists: raised at once
                # were it swallowed here (psycopg replaces what lands in its bookkeeping),
                # the block's end raises it again
        signals.stop_if_asked()  # nothing left pending
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)




def test_a_smaller_batch_budget_lowers_the_streaming_threshold(db, s3, cli, tmp_path):
    """With no test threshold: --batch-bytes 2MiB streams the ~3-4 MB
    documents (above the budget) and keeps the small ones on the batch path;
    in S3 a compressed object of ~0.5 MiB that inflates to ~20 MiB streams too."""
    bomb = anchore_sim.Doc("admin", "analysis_data", "big-inflating", inflating(20 * 1024 * 1024))
    docs = seed_docs() + [bomb]
    bucket = s3.new_bucket()
    anchore_sim.store(db, s3.location(bucket, compress=True), docs)
    size = db.execute("""SELECT size FROM archive_metadata WHERE "archiveId" = 'big-inflating'""").fetchone()[0]
    assert 256 * 1024 < size < 1024 * 1024  # stored: below 2 MiB, decoded: far above
    source = write_config(tmp_path / "a.yaml", section("s3", s3.driver_config(bucket), compress=True))
    dest = write_config(tmp_path / "b.yaml", section("db"))
    result = cli("migrate", source, dest, "--dontask", "--workers", "1", "--batch-bytes", "2MiB")
    assert result.returncode == 0, result.stderr
    assert streamed(result.stderr) == {f"admin/analysis_data/{doc.archive_id}" for doc in docs[:3] + [bomb]}
    assert_all_readable(db, s3.client, docs)
    assert s3.keys(bucket) == []


def inflating(size):
    """About `size` bytes of JSON that zlib shrinks some 40 times: a repeated
    record, each with numbers of its own."""
    rng = random.Random(5)
    record = "pkg-" + "abcdefgh" * 60
    text = "".join(f"{record}:{rng.randrange(10**12)}:{rng.randrange(10**12)} " for _ in range(size // 510))
    return json.dumps({"text": text}).encode()


def test_verify_streams_a_small_object_that_inflates_past_the_threshold(db, s3, cli, tmp_path):
    """~0.5 MiB stored, ~20 MiB decompressed: below the threshold by its row,
    it is decompressed with a limit and then checked in pieces, never inflated whole."""
    bomb = anchore_sim.Doc("admin", "analysis_data", "big-inflating", inflating(20 * 1024 * 1024))
    docs = anchore_sim.make_docs(10, seed=43) + [bomb]
    bucket = s3.new_bucket()
    anchore_sim.store(db, s3.location(bucket, compress=True), docs)
    size = db.execute("""SELECT size FROM archive_metadata WHERE "archiveId" = 'big-inflating'""").fetchone()[0]
    assert 256 * 1024 < size < 1024 * 1024
    result = cli("verify", write_config(tmp_path / "s3.yaml", section("s3", s3.driver_config(bucket), compress=True)),
                 env=STREAM)
    assert result.returncode == 0, result.stderr
    checked = re.findall(r"checking (\S+) \(", result.stderr)
    assert checked == ["admin/analysis_data/big-inflating"], result.stderr
    assert f"verified {len(docs)} documents" in result.stdout


def test_a_ranged_get_answered_with_the_wrong_range_is_hung_up_on_and_read_again(db, s3, cli, tmp_path):
    """A server that ignores Range (200 and the whole of a huge body) is hung
    up on before its body is read; a 206 of another range than asked for is
    refused, though its length and ETag match. Both are read again."""
    docs = seed_docs()
    bucket = s3.new_bucket()
    anchore_sim.store(db, s3.location(bucket, compress=True), docs)
    with FaultProxy(s3.endpoint) as proxy:
        proxy.add(Rule("ignorerange", method="GET", path="big-binary", times=1),
                  Rule("shiftrange", method="GET", path="big-binary", times=1))  # then on the read again
        source = write_config(tmp_path / "a.yaml", section("s3", through_proxy(s3, proxy, bucket), compress=True))
        dest = write_config(tmp_path / "b.yaml", section("db"))
        result = cli("migrate", source, dest, "--dontask", "--workers", "1", env=STREAM)
        assert [rule.fired for rule in proxy.rules] == [1, 1]
        flooded = proxy.rules[0].sent
    assert result.returncode == 0, result.stderr
    assert flooded < 64 * 1024 * 1024  # of 256 MiB offered: only what the sockets' buffers took
    assert "WrongRange: asked for bytes 0-" in result.stderr and "the answer was 200 with no Content-Range" in result.stderr
    assert "the answer was 206 with bytes 1-" in result.stderr
    assert "admin/analysis_data/big-binary" in streamed(result.stderr)
    assert_all_readable(db, s3.client, docs)
    assert_stored_as_anchore_would(db, s3, docs, False)
    assert s3.keys(bucket) == []


def test_an_upload_left_by_a_worker_killed_mid_stream_is_aborted_when_the_run_finishes(db, s3, cli, tmp_path):
    """A joiner killed in the middle of a multipart upload: the run's main
    process takes its shard over, writes the document afresh and, once every
    shard is over (no live worker may complete the old upload), aborts it."""
    from test_run_integrity import FAST, LEASE, Tool

    docs = seed_docs()[:3] + anchore_sim.make_docs(4, seed=44)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket, **FAST)))  # takeover in seconds
    args = ["migrate", source, dest, "--dontask", "--workers", "1", "--progress", "none", *LEASE, *PART]
    main = Tool(cli.dsn, args, {**STREAM, "OBJMIG_FREEZE_AT": "after-plan:1"}, tmp_path, "main")
    joiner = None
    try:
        main.wait_stopped()
        joiner = Tool(cli.dsn, [*args, "--join"], {**STREAM, "OBJMIG_CRASH_AT": "stream-chunk:2"}, tmp_path, "joiner")
        assert joiner.process.wait(timeout=120) == -signal.SIGKILL, joiner.log_path.read_text()
        left = s3.client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        assert [upload["Key"] for upload in left] == ["admin/analysis_data/big-binary"]
        main.resume()
        code, log = main.finish()
    finally:  # never leave a stopped process behind
        if joiner is not None and joiner.process.poll() is None:
            joiner.process.kill()
        if main.process.poll() is None:
            main.resume()
    assert code == 0, log
    assert "took over shard" in log
    assert "aborted 1 incomplete multipart uploads left under" in log and "stopped mid-stream" in log
    assert s3.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert_all_readable(db, s3.client, docs)
    assert len(s3.keys(bucket)) == len(docs)
    assert task_rows(db)[-1][0] == "complete"
