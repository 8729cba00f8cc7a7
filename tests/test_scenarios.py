"""The migration scenarios of Anchore's object-storage documentation, end to end.

Each test seeds documents the way Anchore writes them, runs the real command,
and reads every document back the way Anchore reads it.
"""

import zlib

import yaml

import anchore_sim
from helpers import assert_all_readable, section, task_rows, urls, write_config


def seed(db, location, count=60, **kwargs):
    docs = anchore_sim.make_docs(count, **kwargs)
    anchore_sim.store(db, location, docs)
    return docs


def test_db_to_s3_with_compression_and_prefix_then_back(db, s3, cli, tmp_path):
    docs = seed(db, anchore_sim.Location("db"), count=80, large_share=0.2)
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "config.yaml", section("db"))
    dest = write_config(tmp_path / "dest-config.yaml",
                        section("s3", s3.driver_config(bucket, prefix="internaltest"), compress=True))

    result = cli("migrate", source, dest, "--dontask")
    assert result.returncode == 0, result.stderr

    assert_all_readable(db, s3.client, docs)
    assert all(url.startswith(f"s3://{bucket}/internaltest") for url in urls(db))
    keys = s3.keys(bucket)
    assert len(keys) == len(docs)
    assert all(key.startswith("internaltest") and not key.startswith("internaltest/") for key in keys)
    # compressed exactly when larger than 100 KB, and stored as zlib data
    for user_id, bucket_name, archive_id, is_compressed, size in db.execute(
        'SELECT "userId", bucket, "archiveId", is_compressed, size FROM archive_metadata'
    ):
        doc = next(d for d in docs if d.archive_id == archive_id)
        assert is_compressed == (len(doc.content) > 100 * 1024)
    assert any(d for d in docs if len(d.content) > 100 * 1024)
    head = s3.client.head_object(Bucket=bucket, Key=keys[0])
    assert head["ContentType"] == "binary/octet-stream"
    # source copies deleted only after the move
    assert db.execute("SELECT count(*) FROM archive_document").fetchone()[0] == 0
    assert task_rows(db) == [("complete", "running", "db", "s3", len(docs), len(docs), True)]
    # the section to put into config.yaml, secrets redacted
    snippet = result.stdout
    assert "object_store:" in snippet and "internaltest" in snippet and "<redacted>" in snippet
    assert s3.secret_key not in result.stdout + result.stderr

    back = cli("migrate", dest, source, "--dontask")
    assert back.returncode == 0, back.stderr
    assert_all_readable(db, s3.client, docs)
    assert all(url.startswith("db://") for url in urls(db))
    assert s3.keys(bucket) == []
    assert not db.execute("SELECT bool_or(is_compressed) FROM archive_metadata").fetchone()[0]
    assert [row[0] for row in task_rows(db)] == ["complete", "complete"]


def test_nodelete_keeps_source_copies(db, s3, cli, tmp_path):
    docs = seed(db, anchore_sim.Location("db"), count=20)
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket)))
    result = cli("migrate", source, dest, "--dontask", "--nodelete")
    assert result.returncode == 0, result.stderr
    assert_all_readable(db, s3.client, docs)
    assert db.execute("SELECT count(*) FROM archive_document").fetchone()[0] == len(docs)
    assert len(s3.keys(bucket)) == len(docs)


def test_bucket_option_limits_to_logical_buckets(db, s3, cli, tmp_path):
    docs = seed(db, anchore_sim.Location("db"), count=60)
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket)))
    chosen = {"analysis_data", "manifest_data"}
    args = ["migrate", source, dest, "--dontask"] + [f"--bucket={name}" for name in sorted(chosen)]
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert_all_readable(db, s3.client, docs)
    for bucket_name, url in db.execute("SELECT bucket, content_url FROM archive_metadata"):
        assert url.startswith("s3://" if bucket_name in chosen else "db://"), (bucket_name, url)
    moved = sum(1 for d in docs if d.bucket in chosen)
    assert moved and moved < len(docs)
    assert task_rows(db)[0][4:6] == (moved, moved)


def test_single_backend_to_split_analysis_archive(db, s3, cli, tmp_path):
    """db -> db + s3 analysis archive: --to-analysis-archive --bucket analysis_archive."""
    main_docs = seed(db, anchore_sim.Location("db"), count=30)
    archive_docs = anchore_sim.make_docs(15, seed=11, buckets=("analysis_archive",))
    anchore_sim.store(db, anchore_sim.Location("db"), archive_docs)
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "source-config.yaml", section("db"))
    dest = write_config(tmp_path / "dest-config.yaml", section("db"),
                        analysis_archive=section("s3", s3.driver_config(bucket)))
    result = cli("migrate", "--to-analysis-archive", "--bucket", "analysis_archive", source, dest, "--dontask")
    assert result.returncode == 0, result.stderr
    assert_all_readable(db, s3.client, main_docs + archive_docs)
    for bucket_name, url in db.execute("SELECT bucket, content_url FROM archive_metadata"):
        assert url.startswith("s3://" if bucket_name == "analysis_archive" else "db://")
    assert "analysis_archive:" in result.stdout


def test_dual_backend_to_single_backend_in_two_steps(db, s3, cli, tmp_path):
    """db + s3 analysis archive -> one s3 bucket: migrate, then --from-analysis-archive."""
    old_bucket, new_bucket = s3.new_bucket(), s3.new_bucket()
    main_docs = seed(db, anchore_sim.Location("db"), count=30)
    archive_docs = anchore_sim.make_docs(15, seed=12, buckets=("analysis_archive",))
    anchore_sim.store(db, s3.location(old_bucket), archive_docs)
    source = write_config(tmp_path / "source-config.yaml", section("db"),
                          analysis_archive=section("s3", s3.driver_config(old_bucket)))
    dest = write_config(tmp_path / "dest-config.yaml", section("s3", s3.driver_config(new_bucket)))

    first = cli("migrate", source, dest, "--dontask")
    assert first.returncode == 0, first.stderr
    assert_all_readable(db, s3.client, main_docs + archive_docs)
    assert len(s3.keys(old_bucket)) == len(archive_docs)  # not part of the object_store move

    second = cli("migrate", "--from-analysis-archive", source, dest, "--dontask")
    assert second.returncode == 0, second.stderr
    assert_all_readable(db, s3.client, main_docs + archive_docs)
    assert all(url.startswith(f"s3://{new_bucket}/") for url in urls(db))
    assert s3.keys(old_bucket) == []
    assert len(s3.keys(new_bucket)) == len(main_docs) + len(archive_docs)


def test_s3_to_s3_between_buckets_and_rerun_copies_nothing(db, s3, cli, tmp_path):
    old_bucket, new_bucket = s3.new_bucket(), s3.new_bucket()
    docs = seed(db, s3.location(old_bucket, prefix="old/", compress=True), count=40, large_share=0.2)
    source = write_config(tmp_path / "a.yaml", section("s3", s3.driver_config(old_bucket, prefix="old/"), compress=True))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(new_bucket, prefix="new/")))
    result = cli("migrate", source, dest, "--dontask")
    assert result.returncode == 0, result.stderr
    assert_all_readable(db, s3.client, docs)
    assert s3.keys(old_bucket) == []
    assert len(s3.keys(new_bucket)) == len(docs)
    assert not db.execute("SELECT bool_or(is_compressed) FROM archive_metadata").fetchone()[0]

    again = cli("migrate", source, dest, "--dontask")
    assert again.returncode == 0, again.stderr
    assert task_rows(db)[-1][4:6] == (0, 0)
    assert_all_readable(db, s3.client, docs)


def test_db_db2_localfs_round_trip(db, cli, tmp_path):
    docs = seed(db, anchore_sim.Location("db"), count=40, large_share=0.2, binary_share=0.1)
    files = tmp_path / "archive"
    db_config = write_config(tmp_path / "db.yaml", section("db"))
    db2_config = write_config(tmp_path / "db2.yaml", section("db2", compress=True))
    fs_config = write_config(tmp_path / "fs.yaml", section("localfs", {"archive_data_dir": str(files)}, compress=True, min_size_kbytes=10))

    steps = [(db_config, db2_config, "db2://"), (db2_config, fs_config, "file://"),
             (fs_config, db_config, "db://"), (db_config, fs_config, "file://"), (fs_config, db2_config, "db2://"),
             (db2_config, db_config, "db://")]
    for source, dest, scheme in steps:
        result = cli("migrate", source, dest, "--dontask")
        assert result.returncode == 0, result.stderr
        assert_all_readable(db, None, docs)
        assert all(url.startswith(scheme) for url in urls(db)), scheme
    assert db.execute("SELECT count(*) FROM object_storage").fetchone()[0] == 0
    assert not any(path.is_file() for path in files.rglob("*"))


def test_localfs_layout_is_anchores(db, cli, tmp_path):
    docs = seed(db, anchore_sim.Location("db"), count=5)
    files = tmp_path / "archive"
    source = write_config(tmp_path / "db.yaml", section("db"))
    dest = write_config(tmp_path / "fs.yaml", section("localfs", {"archive_data_dir": str(files)}))
    assert cli("migrate", source, dest, "--dontask").returncode == 0
    expected = {anchore_sim.Location("localfs", directory=str(files)).url(doc) for doc in docs}
    assert urls(db) == expected


def test_b64_encoded_documents_survive_db_moves(db, s3, cli, tmp_path):
    docs = seed(db, anchore_sim.Location("db"), count=12, binary_share=1.0)
    assert db.execute("SELECT bool_and(b64_encoded) FROM archive_document").fetchone()[0]
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket)))
    assert cli("migrate", source, dest, "--dontask").returncode == 0
    assert_all_readable(db, s3.client, docs)
    assert cli("migrate", dest, source, "--dontask").returncode == 0
    assert_all_readable(db, s3.client, docs)
    assert db.execute("SELECT bool_and(b64_encoded) FROM archive_document").fetchone()[0]


def test_compression_threshold_is_strictly_greater(db, s3, cli, tmp_path):
    threshold = 1 * 1024
    docs = [
        anchore_sim.Doc("admin", "analysis_data", "at-threshold", b"a" * threshold),
        anchore_sim.Doc("admin", "analysis_data", "one-over", b"b" * (threshold + 1)),
        anchore_sim.Doc("admin", "analysis_data", "one-under", b"c" * (threshold - 1)),
    ]
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket), compress=True, min_size_kbytes=1))
    assert cli("migrate", source, dest, "--dontask").returncode == 0
    flags = dict(db.execute('SELECT "archiveId", is_compressed FROM archive_metadata'))
    assert flags == {"at-threshold": False, "one-over": True, "one-under": False}
    stored = s3.client.get_object(Bucket=bucket, Key="admin/analysis_data/one-over")["Body"].read()
    assert zlib.decompress(stored) == docs[1].content
    assert_all_readable(db, s3.client, docs)


def test_metadata_columns_preserved_except_location(db, s3, cli, tmp_path):
    docs = seed(db, anchore_sim.Location("db"), count=10)
    db.execute("UPDATE archive_metadata SET record_state_val = 'kept', document_metadata = '{\"a\": 1}'")
    before = {row[0]: row[1:] for row in db.execute(
        'SELECT "archiveId", document_metadata, created_at, record_state_key, record_state_val, last_updated FROM archive_metadata')}
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket)))
    assert cli("migrate", source, dest, "--dontask").returncode == 0
    after = {row[0]: row[1:] for row in db.execute(
        'SELECT "archiveId", document_metadata, created_at, record_state_key, record_state_val, last_updated FROM archive_metadata')}
    for archive_id, (meta, created, key, val, updated) in after.items():
        assert (meta, created, key, val) == before[archive_id][:4]
        assert updated >= before[archive_id][4]
    assert_all_readable(db, s3.client, docs)


def test_config_snippet_keeps_placeholders(db, s3, cli, tmp_path):
    seed(db, anchore_sim.Location("db"), count=3)
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    raw = yaml.safe_dump({"services": {"catalog": {"object_store": section("s3", {
        "access_key": "${ANCHORE_OBJ_STORAGE_ACCESS_KEY}",
        "secret_key": "${ANCHORE_OBJ_STORAGE_SECRET_KEY}",
        "url": s3.endpoint, "bucket": bucket})}}})
    dest = write_config(tmp_path / "b.yaml", raw=raw)
    env = {"ANCHORE_OBJ_STORAGE_ACCESS_KEY": s3.access_key, "ANCHORE_OBJ_STORAGE_SECRET_KEY": s3.secret_key}
    result = cli("migrate", source, dest, "--dontask", env=env)
    assert result.returncode == 0, result.stderr
    assert "${ANCHORE_OBJ_STORAGE_SECRET_KEY}" in result.stdout
    assert s3.secret_key not in result.stdout + result.stderr
    assert s3.access_key not in result.stdout + result.stderr
