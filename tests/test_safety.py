"""Operator safety (issue 10, items 1-8): mistakes caught before anything moves,
exit codes a cron job can act on, no secret in any output, and anchore-manager's
argument order accepted unchanged."""

import os
import re
import urllib.parse

import pytest
import yaml

import anchore_sim
import devservers
from anchore_objmig.cli import build_parser
from helpers import section, task_rows, urls, write_config


def docs_in(buckets, count=6, **kwargs):
    """Documents spread over exactly these logical buckets."""
    docs = anchore_sim.make_docs(count, **kwargs)
    for n, doc in enumerate(docs):
        doc.bucket = buckets[n % len(buckets)]
    return docs


def doc_count(db, table="archive_document"):
    return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def assert_nothing_changed(db, before):
    assert urls(db) == before
    assert task_rows(db) == []


def one_error_line(result):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


# -- 1. a misspelled --bucket, a source that holds nothing ----------------------------------------

def test_misspelled_bucket_is_refused_and_the_buckets_are_listed(db, cli, tmp_path):
    anchore_sim.store(db, anchore_sim.Location("db"), docs_in(("analysis_archive", "manifest_data")))
    before = urls(db)
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("db2"))
    for extra in (("--dontask",), ("--dry-run",)):
        result = cli("migrate", source, dest, "--bucket", "analysis_achive", *extra)
        assert result.returncode == 2, result.stderr
        line = one_error_line(result)
        assert "'analysis_achive'" in line and "analysis_archive, manifest_data" in line and "--allow-empty" in line
    assert_nothing_changed(db, before)
    # the right name moves exactly that bucket
    result = cli("migrate", source, dest, "--bucket", "analysis_archive", "--dontask")
    assert result.returncode == 0, result.stderr
    moved = {row[0] for row in db.execute("SELECT bucket FROM archive_metadata WHERE starts_with(content_url, 'db2://')")}
    assert moved == {"analysis_archive"}


def test_source_that_holds_nothing_is_refused_with_counts_by_location(db, s3, cli, tmp_path):
    bucket = s3.new_bucket()
    anchore_sim.store(db, anchore_sim.Location("db"), anchore_sim.make_docs(5, seed=1))
    anchore_sim.store(db, s3.location(bucket, prefix="live/"), anchore_sim.make_docs(3, seed=2))
    before = urls(db)
    wrong_source = write_config(tmp_path / "a.yaml", section("db2"))  # the documents are in db and S3
    dest = write_config(tmp_path / "b.yaml", section("localfs", {"archive_data_dir": str(tmp_path / "files")}))
    for extra in (("--dontask",), ("--dry-run",)):
        result = cli("migrate", wrong_source, dest, *extra)
        assert result.returncode == 2, result.stderr
        line = one_error_line(result)
        assert "holds none of the selected documents" in line and wrong_source in line
        assert "db:// 5" in line and f"s3://{bucket}/ 3" in line
    assert_nothing_changed(db, before)
    assert not (tmp_path / "files").exists()
    # --allow-empty: the operator says moving nothing is right; the run moves
    # nothing, and still says the rows in scope are elsewhere (never "complete")
    result = cli("migrate", wrong_source, dest, "--dontask", "--allow-empty")
    assert result.returncode == 1, result.stderr
    assert "8 rows in scope are not at the destination" in result.stderr
    assert "MUST have this" not in result.stdout
    assert urls(db) == before


def test_rerun_after_a_finished_migration_is_not_refused(db, cli, tmp_path):
    anchore_sim.store(db, anchore_sim.Location("db"), anchore_sim.make_docs(4))
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("db2"))
    assert cli("migrate", source, dest, "--dontask").returncode == 0
    again = cli("migrate", source, dest, "--dontask")
    assert again.returncode == 0, again.stderr


# -- 2. misspelled or misplaced config sections ------------------------------------------------------

MISTAKES = [
    ("storage_drvier", "services:\n  catalog:\n    object_store:\n      storage_drvier:\n        name: db2\n",
     "services.catalog.object_store.storage_drvier", "did you mean storage_driver?"),
    ("compresion", {"object_store": {"compresion": {"enabled": True}, "storage_driver": {"name": "db2"}}},
     "services.catalog.object_store.compresion", "did you mean compression?"),
    ("min_size_kbyte", {"object_store": {"compression": {"min_size_kbyte": 5}, "storage_driver": {"name": "db2"}}},
     "services.catalog.object_store.compression.min_size_kbyte", "did you mean min_size_kbytes?"),
    ("s3 config key", {"object_store": section("s3", {"bucket": "b", "url": "http://x", "access_key": "a",
                                                      "secret_key": "s", "create_buckt": True})},
     "services.catalog.object_store.storage_driver.config.create_buckt", "did you mean create_bucket?"),
    ("localfs config key", {"object_store": section("localfs", {"archive_data_directory": "/data"})},
     "storage_driver.config.archive_data_directory", "did you mean archive_data_dir?"),
    ("db config key", {"object_store": section("db", {"bucket": "x"})},
     "storage_driver.config.bucket", "unknown key"),
    ("legacy archive key", {"archive": {"storage_driver": {"name": "db2", "confg": {}}}},
     "services.catalog.archive.storage_driver.confg", "did you mean config?"),
    ("analysis_archive key", {"analysis_archive": {"enabled": True, "storage_driver": {"name": "db2"}, "enable": 1}},
     "services.catalog.analysis_archive.enable", "did you mean enabled?"),
    ("object_store one level too shallow",
     "services:\n  catalog:\n    other: 1\n  object_store:\n    storage_driver:\n      name: db2\n",
     "services.object_store", "outside services.catalog"),
    ("object_store at the top", {"__top__": {"object_store": section("db2")}}, "object_store", "outside services.catalog"),
    ("analysis_archive misplaced", "services:\n  catalog: {}\n  analysis_archive:\n    enabled: true\n",
     "services.analysis_archive", "outside services.catalog"),
    ("misspelled section", {"object_stor": section("db2")}, "services.catalog.object_stor", "did you mean object_store?"),
    ("empty section", "services:\n  catalog:\n    object_store:\n", "services.catalog.object_store", "is empty"),
    ("no storage_driver", {"object_store": {"compression": {"enabled": True}}},
     "services.catalog.object_store.storage_driver", "missing"),
]


def write_mistake(path, content):
    if isinstance(content, str):
        path.write_text(content)
    elif "__top__" in content:
        path.write_text(yaml.safe_dump({"services": {"catalog": {}}, **content["__top__"]}))
    else:
        path.write_text(yaml.safe_dump({"services": {"catalog": content}}))
    return str(path)


@pytest.mark.parametrize("case,content,key,message", MISTAKES, ids=[case for case, *_ in MISTAKES])
def test_misspelled_or_misplaced_section_is_an_error(db, cli, tmp_path, case, content, key, message):
    anchore_sim.store(db, anchore_sim.Location("db"), anchore_sim.make_docs(3))
    before = urls(db)
    bad = write_mistake(tmp_path / "bad.yaml", content)
    good = write_config(tmp_path / "good.yaml", section("db2"))
    for args in (("check", bad), ("migrate", bad, good, "--dry-run"), ("migrate", good, bad, "--dontask")):
        result = cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        line = one_error_line(result)
        assert bad in line and key in line and message in line, line
    assert_nothing_changed(db, before)


def test_every_documented_key_is_accepted(db, s3, cli, tmp_path):
    bucket = s3.new_bucket(create=False)
    config = s3.driver_config(bucket, prefix="anchore/", iamauto=False, create_bucket=True, max_attempts=3,
                              connect_timeout=5, read_timeout=30, verify=True)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"services": {"catalog": {
        "object_store": {"enabled": True, **section("s3", config)},
        "analysis_archive": {"enabled": True, **section("localfs", {"archive_data_dir": str(tmp_path / "aa")})},
    }}}))
    assert cli("check", path).returncode == 0
    result = cli("check", "--analysis-archive", path)
    assert result.returncode == 0, result.stderr


def test_the_db_default_is_used_only_when_the_section_is_absent_and_is_announced(db, cli, tmp_path):
    absent = tmp_path / "absent.yaml"
    absent.write_text(yaml.safe_dump({"services": {"catalog": {"image_gc": {}}}}))
    result = cli("check", absent)
    assert result.returncode == 0, result.stderr
    assert "services.catalog.object_store is not set: using Anchore's default, the db driver" in result.stderr


# -- 3. lazy ${ANCHORE_*} substitution -------------------------------------------------------------

POD_CONFIG = """\
log_level: ${ANCHORE_LOG_LEVEL}
credentials:
  database:
    user: ${ANCHORE_DB_USER}
    password: ${ANCHORE_DB_PASSWORD}
    host: ${ANCHORE_DB_HOST}
services:
  apiext:
    endpoint_hostname: ${ANCHORE_ENDPOINT_HOSTNAME}
  catalog:
    max_threads: ${ANCHORE_CATALOG_THREADS}
    object_store:
      storage_driver:
        name: db2
        config: {}
"""


def test_unset_placeholders_the_tool_does_not_read_are_one_warning(db, cli, tmp_path):
    anchore_sim.store(db, anchore_sim.Location("db"), anchore_sim.make_docs(4))
    pod = tmp_path / "pod.yaml"
    pod.write_text(POD_CONFIG)
    source = write_config(tmp_path / "a.yaml", section("db"))
    result = cli("migrate", source, pod, "--dontask")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if " WARNING " in line]
    assert len(warnings) == 1, result.stderr
    assert "ANCHORE_DB_HOST" in warnings[0] and "6 ${ANCHORE_*} placeholders have no value" in warnings[0]
    assert doc_count(db, "object_storage") == 4


def test_unset_placeholder_in_a_key_the_tool_reads_is_an_error(db, s3, cli, tmp_path):
    config = s3.driver_config(s3.new_bucket())
    config["secret_key"] = "${ANCHORE_OBJ_STORAGE_SECRET_KEY}"
    path = write_config(tmp_path / "c.yaml", section("s3", config))
    result = cli("check", path)
    assert result.returncode == 2
    line = one_error_line(result)
    assert "services.catalog.object_store.storage_driver.config.secret_key" in line
    assert "ANCHORE_OBJ_STORAGE_SECRET_KEY is not set" in line
    assert cli("check", path, env={"ANCHORE_OBJ_STORAGE_SECRET_KEY": s3.secret_key}).returncode == 0


# -- 4. --to-analysis-archive without --bucket analysis_archive ------------------------------------

def test_to_analysis_archive_without_bucket_is_said_and_refused_unattended(db, cli, tmp_path):
    anchore_sim.store(db, anchore_sim.Location("db"), docs_in(("analysis_archive", "manifest_data")))
    before = urls(db)
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("db"), analysis_archive=section("db2"))
    unattended = cli("migrate", "--to-analysis-archive", source, dest, "--dontask")
    assert unattended.returncode == 2
    line = one_error_line(unattended)
    assert "EVERY logical bucket" in line and "--bucket analysis_archive" in line and "--all-buckets" in line
    plan = cli("migrate", "--to-analysis-archive", source, dest, "--dry-run")
    assert plan.returncode == 0 and "WARNING --to-analysis-archive without --bucket analysis_archive" in plan.stderr
    prompt = cli("migrate", "--to-analysis-archive", source, dest, input="n\n")
    assert prompt.returncode == 2
    note = prompt.stderr.index("NOTE: --to-analysis-archive without --bucket analysis_archive")
    assert note < prompt.stderr.index("proceed? (y/N)")
    assert_nothing_changed(db, before)
    # with --bucket analysis_archive: no note; with --all-buckets: everything, on purpose
    usual = cli("migrate", "--to-analysis-archive", "--bucket", "analysis_archive", source, dest, input="y\n")
    assert usual.returncode == 0 and "NOTE:" not in usual.stderr
    everything = cli("migrate", "--to-analysis-archive", "--all-buckets", source, dest, "--dontask")
    assert everything.returncode == 0, everything.stderr
    assert doc_count(db, "object_storage") == 6 and doc_count(db) == 0


def test_archive_sharing_the_main_stores_place_is_not_moved_whole_unattended(db, cli, tmp_path):
    """From an analysis archive kept where the main store is (both db): without
    --bucket the whole main store would move into the new archive store."""
    anchore_sim.store(db, anchore_sim.Location("db"), docs_in(("analysis_archive", "manifest_data")))
    before = urls(db)
    source = write_config(tmp_path / "a.yaml", section("db"), analysis_archive=section("db"))
    dest = write_config(tmp_path / "b.yaml", section("db"), analysis_archive=section("db2"))
    args = ["migrate", "--from-analysis-archive", "--to-analysis-archive", source, dest]
    unattended = cli(*args, "--dontask")
    assert unattended.returncode == 2
    line = one_error_line(unattended)
    assert "EVERY logical bucket" in line and "object_store" in line and "--bucket analysis_archive" in line
    assert_nothing_changed(db, before)
    usual = cli(*args, "--bucket", "analysis_archive", "--dontask")
    assert usual.returncode == 0, usual.stderr
    assert doc_count(db, "object_storage") == 3 and doc_count(db) == 3  # the main store's documents stayed


# -- 5. overlapping locations --------------------------------------------------------------------------

@pytest.mark.parametrize("prefixes", [("", "anchore"), ("anchore", ""), ("data/", "data/new/")])
def test_overlapping_s3_prefixes_are_refused(db, s3, cli, tmp_path, prefixes):
    bucket = s3.new_bucket()
    source_prefix, dest_prefix = prefixes
    docs = anchore_sim.make_docs(4, users=("admin", "anchoreadmin"))
    anchore_sim.store(db, s3.location(bucket, prefix=source_prefix), docs)
    before, keys = urls(db), s3.keys(bucket)
    source = write_config(tmp_path / "a.yaml", section("s3", s3.driver_config(bucket, prefix=source_prefix)))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket, prefix=dest_prefix)))
    for extra in (("--dontask",), ("--dry-run",)):
        result = cli("migrate", source, dest, *extra)
        assert result.returncode == 2, result.stderr
        assert "overlap" in one_error_line(result)
    assert_nothing_changed(db, before)
    assert s3.keys(bucket) == keys


def test_disjoint_prefixes_in_one_bucket_are_fine(db, s3, cli, tmp_path):
    bucket = s3.new_bucket()
    anchore_sim.store(db, s3.location(bucket, prefix="old/"), anchore_sim.make_docs(4))
    source = write_config(tmp_path / "a.yaml", section("s3", s3.driver_config(bucket, prefix="old/")))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket, prefix="new/")))
    result = cli("migrate", source, dest, "--dontask")
    assert result.returncode == 0, result.stderr
    assert all(key.startswith("new/") for key in s3.keys(bucket))


def test_nested_localfs_directories_are_refused(db, cli, tmp_path):
    outer = tmp_path / "objects"
    location = anchore_sim.Location("localfs", directory=str(outer))
    anchore_sim.store(db, location, anchore_sim.make_docs(3))
    before = urls(db)
    for a, b in ((outer, outer / "new"), (outer / "new", outer)):
        source = write_config(tmp_path / "a.yaml", section("localfs", {"archive_data_dir": str(a)}))
        dest = write_config(tmp_path / "b.yaml", section("localfs", {"archive_data_dir": str(b)}))
        result = cli("migrate", source, dest, "--dontask", "--allow-empty")
        assert result.returncode == 2, result.stderr
        assert "nested" in one_error_line(result)
    assert_nothing_changed(db, before)


# -- 6. exit status 3: could not connect or authenticate ------------------------------------------

def test_unreachable_s3_and_missing_iamauto_credentials_exit_3(db, s3, cli, tmp_path):
    anchore_sim.store(db, anchore_sim.Location("db"), anchore_sim.make_docs(3))
    before = urls(db)
    source = write_config(tmp_path / "a.yaml", section("db"))
    closed = s3.driver_config(s3.new_bucket(), url=f"http://127.0.0.1:{devservers.free_port()}", max_attempts=1)
    iam = {"iamauto": True, "url": s3.endpoint, "bucket": s3.new_bucket()}
    # no credential anywhere in the AWS chain (the test environment sets no AWS_* keys)
    no_aws = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent",
              "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
    wrong = s3.driver_config(s3.new_bucket(), secret_key="wrong-" + os.urandom(6).hex())
    for name, config in (("closed", closed), ("iamauto", iam), ("wrong", wrong)):
        dest = write_config(tmp_path / f"{name}.yaml", section("s3", config))
        for args in (("check", dest), ("migrate", source, dest, "--dontask")):
            result = cli(*args, env=no_aws)
            assert result.returncode == 3, (name, args, result.stderr)
            assert "Traceback" not in result.stderr
            if name == "iamauto":
                assert "no AWS credentials" in result.stderr
    assert_nothing_changed(db, before)


def test_exit_status_table_is_the_same_in_help_man_page_and_readme(cli):
    from anchore_objmig.errors import EXIT_TABLE

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    help_text = cli("--help", db=False).stdout
    with open(os.path.join(root, "man", "anchore-objmig.1"), encoding="utf-8") as handle:
        man = handle.read()
    with open(os.path.join(root, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    assert [code for code, _ in EXIT_TABLE] == [0, 1, 2, 3, 130, 143]
    for code, meaning in EXIT_TABLE:
        assert re.search(rf"^  {code}\s+{re.escape(meaning)}$", help_text, re.M), code
        assert re.search(rf"^\.B {code}$", man, re.M), code
        assert re.search(rf"^\| {code} \|", readme, re.M), code
    # the cron snippet tells "could not connect" apart from "some documents failed"
    cron = readme[readme.index("### From cron"):readme.index("## What it guarantees")]
    for code in ("0)", "1)", "2)", "3)", "130|143)"):
        assert code in cron


# -- 7. no secret in any output ------------------------------------------------------------------------

def test_no_secret_through_any_error_path(db, s3, cli, tmp_path):
    secret = "Sekr1t" + os.urandom(6).hex()
    at_secret = f"p4ss@{secret}"  # an unencoded "@" in a password
    good = write_config(tmp_path / "good.yaml", section("db2"))
    port = devservers.free_port()
    dsn = urllib.parse.urlsplit(cli.dsn)
    runs = [
        # global options after the command: argparse's "unrecognized arguments"
        cli("check", good, "--db-connect", f"postgresql://u:{secret}@127.0.0.1:{port}/db", db=False),
        cli("check", good, f"--db-connect=postgresql://u:{secret}@127.0.0.1:{port}/db", db=False),
        cli("list-migrations", "--db-connect", f"host=127.0.0.1 password={secret}", db=False),
        cli("migrate", good, good, "--db-connect", f"postgresql+pg8000://u:{secret}@h/db", "--dontask", db=False),
        # rejected values of options
        cli("migrate", good, good, "--progress", secret),
        cli("migrate", good, good, "--workers", secret),
        cli("migrate", good, good, "--multipart-threshold", secret),
        cli("--db-retries", secret, "list-migrations"),
        cli("--db-sslmode", secret, "list-migrations"),
        cli("--db-sslmode=" + secret, "list-migrations"),
        cli(f"--db=postgresql://u:{secret}@h/db", "list-migrations", db=False),  # ambiguous abbreviation
        cli("list-migrations", f"--progress={secret}"),
        cli("objectstorage", "--db-timeout", secret, "list-migrations", db=False),
        # passwords with an unencoded "@", to a closed port and to the real server
        cli("--db-connect", f"postgresql+pg8000://u:{at_secret}@127.0.0.1:{port}/db", "--db-retries", "0",
            "list-migrations", db=False),
        cli("--db-connect", f"postgresql://{dsn.username}:{at_secret}@{dsn.hostname}:{dsn.port}{dsn.path}",
            "--db-retries", "0", "list-migrations", db=False),
        cli("objectstorage", "--db-connect", f"postgresql://u:{at_secret}@127.0.0.1:{port}/db", "--db-retries", "0",
            "list-migrations", db=False),
    ]
    # config errors whose value is a secret typed into the wrong key
    s3_config = s3.driver_config(s3.new_bucket())
    wrong_keys = [
        section("s3", {**s3_config, "url": secret}),
        section("s3", {**s3_config, "max_attempts": secret}),
        section("s3", {**s3_config, "secret_ky": secret}),
        section("s3", {**s3_config, "prefix": {"nested": secret}}),
        section("localfs", {"archive_data_dir": secret}),
        section(secret + "-driver/with/slashes"),
        section(secret[:20].upper()),  # shaped like an AWS access key ID, typed into storage_driver.name
        {**section("db2"), "compression": {"enabled": secret}},
        {**section("db2"), "compression": {"enabled": True, "min_size_kbytes": secret}},
    ]
    for n, object_store in enumerate(wrong_keys):
        path = write_config(tmp_path / f"wrong{n}.yaml", object_store)
        runs.append(cli("check", path))
        runs.append(cli("migrate", good, path, "--dry-run"))
    s3_bad = s3.driver_config(s3.new_bucket(), secret_key=secret)  # refused credentials
    runs.append(cli("check", write_config(tmp_path / "refused.yaml", section("s3", s3_bad))))
    for result in runs:
        output = result.stdout + result.stderr
        assert result.returncode in (2, 3), (result.args, result.stderr)
        assert secret not in output and secret[:20].upper() not in output, (result.args, output)
        assert "Traceback" not in output
    assert "unrecognized arguments: --db-connect <value> (--db-connect is a global option" in runs[0].stderr


def test_password_with_an_unencoded_at_sign_works(db, cli, schema_ready):
    password = "p@ss/w@rd-" + os.urandom(4).hex()
    db.execute("DROP ROLE IF EXISTS objmig_at_user")
    db.execute(f"CREATE ROLE objmig_at_user LOGIN PASSWORD '{password}'")
    try:
        db.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO objmig_at_user")
        parts = urllib.parse.urlsplit(schema_ready)
        url = f"postgresql+pg8000://objmig_at_user:{password}@{parts.hostname}:{parts.port}{parts.path}"
        result = cli("--db-connect", url, "list-migrations", db=False)
        assert result.returncode == 0, result.stderr
        assert password not in result.stdout + result.stderr
    finally:
        db.execute("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM objmig_at_user")
        db.execute("DROP ROLE objmig_at_user")


# -- 8. anchore-manager's argument order -----------------------------------------------------------

def test_anchore_manager_runbook_with_only_the_program_name_changed(db, s3, cli, tmp_path):
    docs = docs_in(("analysis_archive", "manifest_data"), 8)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "config.yaml", section("db"))
    dest = write_config(tmp_path / "dest-config.yaml", section("db"), analysis_archive=section("s3", s3.driver_config(bucket)))
    final_bucket = s3.new_bucket()
    final = write_config(tmp_path / "final-config.yaml", section("s3", s3.driver_config(final_bucket)))
    manager = ["objectstorage", "--db-connect", cli.dsn]
    tuned = manager + ["--db-retries", "1", "--db-timeout", "30", "--db-connect-timeout", "120"]
    # the seed documentation's commands, word for word after the program name
    steps = [
        cli(*manager, "check", dest, db=False),
        cli(*manager, "check", "--analysis-archive", dest, db=False),
        cli(*tuned, "migrate", "--to-analysis-archive", "--bucket", "analysis_archive", source, dest, "--dontask", db=False),
        cli(*manager, "list-migrations", db=False),
        cli("--debug", *manager, "migrate", "--nodelete", "--dontask", dest, final, db=False),
        cli("--debug", *manager, "migrate", "--from-analysis-archive", "--dontask", dest, final, db=False),
        cli(*manager, "list-drivers", db=False),
        cli(*manager, "list-migrations", db=False),
    ]
    for result in steps:
        assert result.returncode == 0, (result.args, result.stderr)
    # --debug: anchore-manager's global option, our --verbose
    assert build_parser().parse_args(["--debug", *manager, "list-migrations"]).verbose
    assert len(task_rows(db)) == 3
    assert [line.split()[:2] for line in steps[-1].stdout.splitlines()[1:]] == [[str(n), "complete"] for n in (1, 2, 3)]
    assert all(url.startswith(f"s3://{final_bucket}/") for url in urls(db))
    # anchore-manager's objectstorage has no verify: not accepted there
    assert cli(*manager, "verify", final, db=False).returncode == 2


def test_db_connect_mistakes_are_usage_errors_that_show_no_password(cli):
    secret = "S3cretPw-7d1f"
    forgot_scheme = cli("--db-connect", f"admin:{secret}@127.0.0.1:5432/anchore", "list-migrations", db=False)
    assert forgot_scheme.returncode == 2, forgot_scheme.stderr
    assert secret not in forgot_scheme.stdout + forgot_scheme.stderr
    assert "postgresql:// URL or a libpq keyword string" in forgot_scheme.stderr
    separator = "&" if "?" in cli.dsn else "?"
    bad_option = cli("--db-connect", f"{cli.dsn}{separator}sslmode=bogus", "list-migrations", db=False)
    assert bad_option.returncode == 2, bad_option.stderr  # a configuration mistake, not "unreachable" (3)
    assert "sslmode" in bad_option.stderr and "retrying" not in bad_option.stderr
    assert cli.dsn.split("@")[0].rsplit(":", 1)[1] not in bad_option.stderr  # the test database's password
