"""Reading Anchore config files: substitution, sections, defaults, errors."""

import pytest
import yaml

from anchore_objmig.config import load_store_config
from anchore_objmig.errors import ConfigError
from helpers import section, task_rows, write_config

import anchore_sim


def catalog_file(tmp_path, catalog, name="config.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"services": {"catalog": catalog}}))
    return str(path)


def test_defaults_when_catalog_has_no_object_store(tmp_path):
    store = load_store_config(catalog_file(tmp_path, {"some_other_setting": 1}), environ={})
    assert (store.driver_name, store.compression_enabled, store.min_size_kbytes) == ("db", False, 100)
    assert store.key == "services.catalog.object_store"


def test_legacy_archive_section(tmp_path):
    path = catalog_file(tmp_path, {"archive": section("db2", compress=True, min_size_kbytes=7)})
    store = load_store_config(path, environ={})
    assert (store.driver_name, store.compression_enabled, store.min_size_kbytes) == ("db2", True, 7)
    assert store.key == "services.catalog.archive"


def test_env_substitution_and_env_file(tmp_path):
    env_file = tmp_path / "anchore.env"
    env_file.write_text("ANCHORE_FROM_FILE='file-secret'\nexport ANCHORE_BUCKET=\"from-file\"\n")
    text = """services:
  catalog:
    object_store:
      storage_driver:
        name: s3
        config:
          access_key: ${ANCHORE_ACCESS}
          secret_key: ${ANCHORE_FROM_FILE}
          bucket: ${ANCHORE_BUCKET}
          url: http://127.0.0.1:1
          prefix: ${NOT_ANCHORE}
"""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    environ = {"ANCHORE_ACCESS": "AK", "ANCHORE_ENV_FILE": str(env_file), "ANCHORE_BUCKET": "from-env"}
    store = load_store_config(str(path), environ=environ)
    config = store.driver_config
    assert config["access_key"] == "AK"
    assert config["secret_key"] == "file-secret"
    assert config["bucket"] == "from-env"  # the process environment wins over the file
    assert config["prefix"] == "${NOT_ANCHORE}"  # only ANCHORE* names are substituted
    assert store.as_written["storage_driver"]["config"]["secret_key"] == "${ANCHORE_FROM_FILE}"


BAD_CONFIGS = [
    ("missing file", None, "no such file"),
    ("yaml error", "services:\n  catalog: [unclosed\n", "invalid YAML"),
    ("not a mapping", "- a\n- b\n", "not a YAML mapping"),
    ("no services.catalog", "services:\n  other: {}\n", "services.catalog"),
    ("unknown driver", {"object_store": section("floppy")}, "unknown driver (known: db, db2, localfs, s3)"),
    ("misspelled driver", {"object_store": section("locafs")}, "unknown driver 'locafs' (did you mean localfs?)"),
    ("swift", {"object_store": section("swift")}, "swift driver"),
    ("s3 without bucket", {"object_store": section("s3", {"access_key": "a", "secret_key": "b", "url": "http://x"})}, "bucket"),
    ("s3 without credentials", {"object_store": section("s3", {"bucket": "b", "url": "http://x"})}, "access_key"),
    ("s3 without url or region", {"object_store": section("s3", {"bucket": "b", "iamauto": True})}, "url"),
    ("localfs without dir", {"object_store": section("localfs")}, "archive_data_dir"),
    ("s3 bad max_attempts", {"object_store": section("s3", {"bucket": "b", "iamauto": True, "url": "http://x",
                                                            "max_attempts": "lots"})}, "max_attempts"),
    ("s3 url without scheme", {"object_store": section("s3", {"bucket": "b", "iamauto": True, "url": "minio:9000"})},
     "http://"),
    ("bad compression flag", {"object_store": {"compression": {"enabled": "maybe"}}}, "compression.enabled"),
    ("bad min size", {"object_store": {"compression": {"enabled": True, "min_size_kbytes": "lots"}}}, "min_size_kbytes"),
    ("unset placeholder", "services:\n  catalog:\n    object_store:\n      x: ${ANCHORE_NOT_SET_ANYWHERE}\n", "ANCHORE_NOT_SET_ANYWHERE"),
]


@pytest.mark.parametrize("case,content,message", BAD_CONFIGS, ids=[case for case, _, _ in BAD_CONFIGS])
def test_bad_config_is_one_line_naming_file_and_key(db, cli, tmp_path, case, content, message):
    anchore_sim.store(db, anchore_sim.Location("db"), anchore_sim.make_docs(3))
    good = write_config(tmp_path / "good.yaml", section("db"))
    bad = tmp_path / "bad.yaml"
    if isinstance(content, dict):
        write_config(bad, raw=yaml.safe_dump({"services": {"catalog": content}}))
    elif isinstance(content, str):
        bad.write_text(content)
    for args in (("check", bad), ("migrate", good, bad, "--dontask"), ("migrate", bad, good, "--dontask")):
        result = cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert str(bad) in lines[0] and message in lines[0]
        assert "Traceback" not in result.stderr
    assert task_rows(db) == []
    assert db.execute("SELECT count(*) FROM archive_document").fetchone()[0] == 3


def test_config_path_that_is_a_directory(db, cli, tmp_path):
    # The tests run as root, who can read any file whatever its mode; a
    # directory is the unreadable config that root cannot read either.
    path = tmp_path / "c.yaml"
    path.mkdir()
    result = cli("check", path)
    assert result.returncode == 2
    assert "is a directory" in result.stderr


def test_missing_analysis_archive_section(db, cli, tmp_path):
    config = write_config(tmp_path / "c.yaml", section("db"))
    other = write_config(tmp_path / "d.yaml", section("db2"))
    result = cli("migrate", "--from-analysis-archive", config, other, "--dontask")
    assert result.returncode == 2
    assert "analysis_archive" in result.stderr and "missing" in result.stderr


def test_same_location_refused(db, cli, tmp_path):
    a = write_config(tmp_path / "a.yaml", section("db"))
    b = write_config(tmp_path / "b.yaml", section("db", compress=True))
    result = cli("migrate", a, b, "--dontask")
    assert result.returncode == 2
    assert "same location" in result.stderr


@pytest.mark.parametrize("args,message", [
    (("--bucket", ""), "must not be empty"),
    (("--workers", "0"), "at least 1"),
    (("--multipart-threshold", "1k"), "5MiB"),
    (("--batch-bytes", "100k"), "at least 1MiB"),
    (("--batch-bytes", "lots"), "a size such as"),
])
def test_bad_migrate_flags(db, cli, tmp_path, args, message):
    a = write_config(tmp_path / "a.yaml", section("db"))
    b = write_config(tmp_path / "b.yaml", section("db2"))
    result = cli("migrate", a, b, "--dontask", *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_no_database_given(cli, tmp_path):
    a = write_config(tmp_path / "a.yaml", section("db"))
    b = write_config(tmp_path / "b.yaml", section("db2"))
    result = cli("migrate", a, b, "--dontask", db=False)
    assert result.returncode == 2
    assert "--db-connect" in result.stderr


def test_unreachable_database(cli, tmp_path):
    import devservers

    a = write_config(tmp_path / "a.yaml", section("db"))
    b = write_config(tmp_path / "b.yaml", section("db2"))
    port = devservers.free_port()
    result = cli("--db-connect", f"postgresql+pg8000://anchore:hunter2pw@127.0.0.1:{port}/anchore", "--db-retries", "0",
                 "migrate", a, b, "--dontask", db=False)
    assert result.returncode == 3  # could not connect; nothing changed
    assert "cannot connect to the database" in result.stderr
    assert "hunter2pw" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1


def test_config_error_raises_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_store_config(str(tmp_path / "nope.yaml"), environ={})
    assert "nope.yaml" in str(info.value)
