"""check, list-migrations, list-drivers, the prompt, the lock, and failures."""

import psycopg

import anchore_sim
from helpers import assert_all_readable, section, task_rows, urls, write_config


def test_check_passes_and_leaves_nothing(db, s3, cli, tmp_path):
    bucket = s3.new_bucket()
    config = write_config(tmp_path / "dest-config.yaml", section("s3", s3.driver_config(bucket, prefix="internaltest"), compress=True))
    result = cli("check", config)
    assert result.returncode == 0, result.stderr
    assert "check passed" in result.stdout
    assert s3.keys(bucket) == []
    assert db.execute("SELECT count(*) FROM archive_metadata").fetchone()[0] == 0


def test_check_uses_second_id_when_first_exists(db, cli, tmp_path):
    doc = anchore_sim.Doc("test", "anchorecliconfigtest", "cliconfigtest", b"{}")
    anchore_sim.store(db, anchore_sim.Location("db"), [doc])
    config = write_config(tmp_path / "config.yaml", section("db"))
    result = cli("check", config)
    assert result.returncode == 0, result.stderr
    assert "cliconfigtest2" in result.stderr
    # the existing document is untouched
    assert_all_readable(db, None, [doc])


def test_check_refuses_when_both_test_ids_exist(db, cli, tmp_path):
    docs = [anchore_sim.Doc("test", "anchorecliconfigtest", name, b"{}") for name in ("cliconfigtest", "cliconfigtest2")]
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    result = cli("check", write_config(tmp_path / "config.yaml", section("db")))
    assert result.returncode == 1
    assert "both exist" in result.stderr
    assert_all_readable(db, None, docs)


def test_check_analysis_archive_section(db, s3, cli, tmp_path):
    bucket = s3.new_bucket()
    config = write_config(tmp_path / "config.yaml", section("db"), analysis_archive=section("s3", s3.driver_config(bucket)))
    result = cli("check", config, "--analysis-archive")
    assert result.returncode == 0, result.stderr
    assert "analysis_archive" in result.stdout


def test_check_missing_bucket_is_named(db, s3, cli, tmp_path):
    bucket = s3.new_bucket(create=False)
    result = cli("check", write_config(tmp_path / "c.yaml", section("s3", s3.driver_config(bucket))))
    assert result.returncode == 2
    assert bucket in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_creates_bucket_when_configured(db, s3, cli, tmp_path):
    bucket = s3.new_bucket(create=False)
    result = cli("check", write_config(tmp_path / "c.yaml", section("s3", s3.driver_config(bucket, create_bucket=True))))
    assert result.returncode == 0, result.stderr
    s3.client.head_bucket(Bucket=bucket)


def test_check_wrong_secret_key(db, s3, cli, tmp_path):
    bucket = s3.new_bucket()
    config = s3.driver_config(bucket)
    config["secret_key"] = "not-the-secret-key-at-all"
    result = cli("check", write_config(tmp_path / "c.yaml", section("s3", config)))
    assert result.returncode == 3  # could not authenticate
    assert "credentials" in result.stderr or "Signature" in result.stderr
    assert "not-the-secret-key-at-all" not in result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2


def test_list_migrations_shows_history(db, s3, cli, tmp_path):
    docs = anchore_sim.make_docs(7)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket)))
    assert cli("migrate", source, dest, "--dontask").returncode == 0
    result = cli("list-migrations")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["id", "state"] and "total to migrate" in lines[0]
    assert lines[1].split()[:2] == ["1", "complete"]
    assert " db " in lines[1] and " s3 " in lines[1] and lines[1].count(" 7 ") >= 1


def test_list_drivers(cli):
    result = cli("list-drivers", db=False)
    assert result.returncode == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names[:4] == ["db", "db2", "localfs", "s3"] and "swift" in names


def test_prompt_answered_no_changes_nothing(db, s3, cli, tmp_path):
    docs = anchore_sim.make_docs(5)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket)))
    result = cli("migrate", source, dest, input="n\n")
    assert "proceed? (y/N)" in result.stderr
    assert result.returncode == 2
    assert all(url.startswith("db://") for url in urls(db))
    assert task_rows(db) == []
    assert db.execute("SELECT to_regclass('objmig_runs')").fetchone()[0] is None  # not even our own tables
    assert s3.keys(bucket) == []

    result = cli("migrate", source, dest, input="y\n")
    assert result.returncode == 0, result.stderr
    assert all(url.startswith("s3://") for url in urls(db))


def test_second_migration_is_refused_while_lock_is_held(db, s3, cli, tmp_path, schema_ready):
    docs = anchore_sim.make_docs(5)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket)))
    with psycopg.connect(schema_ready, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(2, 1)")  # as anchore-manager does
        result = cli("migrate", source, dest, "--dontask", timeout=60)
    assert result.returncode == 1
    assert "lock" in result.stderr and "another migration" in result.stderr
    assert all(url.startswith("db://") for url in urls(db))
    assert task_rows(db) == []


def test_digest_mismatch_fails_the_run_and_names_the_document(db, s3, cli, tmp_path):
    docs = anchore_sim.make_docs(20)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bad = docs[3]
    db.execute("""UPDATE archive_document SET jsondata = jsondata || ' ' WHERE "archiveId" = %s""", (bad.archive_id,))
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket)))
    result = cli("migrate", source, dest, "--dontask")
    assert result.returncode == 1
    assert bad.archive_id in result.stderr and "digest mismatch" in result.stderr
    state, last_state, *_ , migrated, total, ended = task_rows(db)[0]
    assert (state, last_state, migrated, total, ended) == ("failed", "running", 19, 20, True)
    row = db.execute('SELECT content_url FROM archive_metadata WHERE "archiveId" = %s', (bad.archive_id,)).fetchone()
    assert row[0].startswith("db://")  # untouched, still at its source
    good = [d for d in docs if d is not bad]
    assert sum(1 for url in urls(db) if url.startswith("s3://")) == len(good)
    assert len(s3.keys(bucket)) == len(good)
    # every other document reads back; the bad one still fails Anchore's own check, as before
    assert_all_readable(db, s3.client, good, skip={bad.archive_id})


def test_missing_source_document_fails_the_run(db, s3, cli, tmp_path):
    docs = anchore_sim.make_docs(6)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    gone = docs[0]
    db.execute('DELETE FROM archive_document WHERE "archiveId" = %s', (gone.archive_id,))
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket)))
    result = cli("migrate", source, dest, "--dontask")
    assert result.returncode == 1
    assert gone.archive_id in result.stderr
    assert task_rows(db)[0][0] == "failed"
    assert_all_readable(db, s3.client, docs[1:], skip={gone.archive_id})
    assert len(s3.keys(bucket)) == 5


def test_db_connect_as_keyword_string_or_environment(db, cli, schema_ready):
    from urllib.parse import urlsplit

    parts = urlsplit(schema_ready)
    keywords = (f"host={parts.hostname} port={parts.port} user={parts.username} "
                f"password={parts.password} dbname={parts.path.lstrip('/')}")
    result = cli("--db-connect", keywords, "list-migrations", db=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("id")
    from_env = cli("list-migrations", db=False, env={"ANCHORE_OBJMIG_DB_CONNECT": schema_ready})
    assert from_env.returncode == 0, from_env.stderr
    wrong = cli("--db-connect", keywords.replace(parts.password, "nope"), "--db-retries", "0", "list-migrations", db=False)
    assert wrong.returncode == 3 and parts.password not in wrong.stderr and "password=***" not in wrong.stdout
