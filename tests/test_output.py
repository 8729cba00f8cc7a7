"""Output an operator and a runbook rely on: a progress line that fits,
one unit system, the prompt, Ctrl-C at the prompt, the metrics file's
conventions, and the machine-readable (--json) output.

Terminals are real pseudo-terminals; the database and S3 are the real
servers of conftest.py.
"""

import json
import os
import pty
import re
import select
import stat
import sys
import time

import anchore_sim
import pytest
from helpers import section, task_rows, write_config
from test_operator import REDRAW, parse_exposition, run_on_terminal, table_names

from anchore_objmig import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCEED = "Performing this operation requires *all* anchore-engine services to be stopped - proceed? (y/N) "


# -- 11. progress that fits, one unit system, the prompt --------------------------

WIDE_NUMBERS_PROGRAM = r"""
from anchore_objmig.display import ProgressDisplay
from anchore_objmig.ledger import Totals

now = [0.0]
display = ProgressDisplay("bar", interval=5, clock=lambda: now[0])
for at, done in [(1.0, 10_000), (2.0, 250_000), (3.0, 1_000_000)]:
    now[0] = at
    display.update(Totals(documents=1_234_567, bytes=900 * 2**30, documents_done=done, bytes_done=done * 700_000,
                          documents_failed=12_345, shards=300, shards_done=done // 5000, shards_failed=0))
now[0] = 9000.0
display.close(Totals(documents=1_234_567, bytes=900 * 2**30, documents_done=1_222_222, bytes_done=855 * 2**30,
                     documents_failed=12_345, shards=300, shards_done=300, shards_failed=0))
"""


@pytest.mark.parametrize("columns", [60, 80, 100, 200])
def test_bar_keeps_eta_and_failed_count_at_any_width_from_60(columns):
    status, _, screen = run_on_terminal([sys.executable, "-c", WIDE_NUMBERS_PROGRAM], columns=columns)
    assert status == 0, screen
    lines = [line for line in REDRAW.findall(screen) if line]
    assert len(lines) == 4, lines
    for line in lines:
        assert len(line) < columns, (columns, line)  # never wraps
        assert re.search(r"ETA (\d+:\d\d:\d\d|--:--)", line), (columns, line)
        assert "12345 failed" in line, (columns, line)
        assert re.search(r"\d+/1234567 doc", line), (columns, line)
    assert "855.0 GiB written" in lines[-1] or columns < 100  # the bytes go before the ETA does
    if columns >= 200:
        assert lines[-1].startswith("[") and "MiB/s" in lines[-1]  # room for everything: the meter too


def test_migrate_speaks_binary_units_and_labels_stored_bytes(db, cli, tmp_path):
    docs = anchore_sim.make_docs(30, seed=61, large_share=0.3)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("db2", compress=True, min_size_kbytes=1))

    plan = cli("migrate", source, dest, "--dry-run")
    run = cli("migrate", source, dest, "--dontask", "--progress", "log")
    assert plan.returncode == 0 and run.returncode == 0, plan.stderr + run.stderr
    every_line = plan.stdout + plan.stderr + run.stdout + run.stderr
    assert not re.search(r"\d (kB|MB|GB|TB)\b", every_line), every_line  # no decimal units anywhere
    assert re.search(r"total: 30 documents, \d+ bytes \(\d+\.\d (KiB|MiB)\) stored at the source", plan.stdout)
    assert re.search(r"30 documents \(\d+\.\d (KiB|MiB) stored at the source\)", run.stderr), run.stderr
    assert re.search(r"progress: 30/30 documents, .*, \d+\.\d (KiB|MiB) written,", run.stderr), run.stderr
    assert re.search(r"30 documents \(\d+\.\d (KiB|MiB) written\) moved", run.stderr), run.stderr


def test_prompt_shows_the_document_count_and_keeps_the_original_words(db, cli, tmp_path):
    docs = anchore_sim.make_docs(17, seed=62)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("db2"))

    declined = cli("migrate", source, dest, input="n\n")
    assert declined.returncode == 2
    assert "About to move 17 documents (" in declined.stderr and "from db:// to db2://" in declined.stderr
    assert PROCEED in declined.stderr
    assert task_rows(db) == []

    accepted = cli("migrate", source, dest, input="y\n")  # a runbook piping 'y' still works
    assert accepted.returncode == 0, accepted.stderr
    assert task_rows(db)[0][4:6] == (17, 17)


# -- 12. Ctrl-C at the prompt -----------------------------------------------------

def interrupt_at_prompt(command, presses):
    """Run `command` on a terminal, press Ctrl-C `presses` times at its
    prompt; (exit status, everything the terminal showed after the prompt)."""
    pid, master = pty.fork()
    if pid == 0:  # the child: the tool, with the terminal as its controlling tty
        os.chdir(ROOT)
        os.execve(sys.executable, [sys.executable, *command],
                  {k: v for k, v in os.environ.items() if not k.startswith("ANCHORE")})
    screen = b""
    deadline = time.monotonic() + 120
    while b"(y/N) " not in screen:
        assert time.monotonic() < deadline, screen
        if select.select([master], [], [], 1)[0]:
            screen += os.read(master, 65536)
    prompt_end = len(screen)
    os.write(master, b"\x03" * presses)  # the terminal turns each into a SIGINT
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the tool has exited
            break
        if not data:
            break
        screen += data
    _, status = os.waitpid(pid, 0)
    os.close(master)
    return os.waitstatus_to_exitcode(status), screen[prompt_end:].decode("utf-8", "replace")


@pytest.mark.parametrize("presses", [1, 2, 5])
def test_ctrl_c_at_the_prompt_is_one_clean_line(db, cli, tmp_path, presses):
    anchore_sim.store(db, anchore_sim.Location("db"), anchore_sim.make_docs(12, seed=63))
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("db2"))
    tables = table_names(db)
    status, after = interrupt_at_prompt(
        ["-m", "anchore_objmig", "--db-connect", cli.dsn, "migrate", source, dest], presses)
    assert status == 130, after
    lines = [line for line in after.replace("^C", "").split("\r\n") if line.strip()]
    assert len(lines) == 1, after
    assert lines[0].endswith("ERROR interrupted at the prompt; nothing was changed"), after
    assert "stay moved" not in after and "Traceback" not in after and "ignored" not in after and "<" not in after
    assert task_rows(db) == [] and table_names(db) == tables


# -- 13. metrics by convention --------------------------------------------------

def test_metrics_are_gauges_not_named_total_and_readable_by_the_collector(db, cli, tmp_path):
    anchore_sim.store(db, anchore_sim.Location("db"), anchore_sim.make_docs(9, seed=64))
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("db2"))
    prom = tmp_path / "objmig.prom"
    assert cli("migrate", source, dest, "--dontask", "--metrics-file", prom).returncode == 0
    assert cli("verify", dest, "--metrics-file", prom).returncode == 0
    families, samples = parse_exposition(prom.read_text())
    assert families and all(family["type"] == "gauge" for family in families.values())
    assert not [name for name in families if name.endswith("_total")]
    assert samples[("anchore_objmig_documents_migrated", (("command", "migrate"),))] == 9
    assert samples[("anchore_objmig_documents_verified", (("command", "verify"),))] == 9

    # a cron job's umask 077 must not make the file unreadable to node_exporter's user
    old = os.umask(0o077)
    try:
        assert metrics.record(str(prom), metrics.RunResult("verify", True, 1.0, 9, 0))
    finally:
        os.umask(old)
    assert stat.S_IMODE(prom.stat().st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["a.yaml", "b.yaml", "objmig.prom"]  # no temp file left


def test_a_metrics_file_of_the_old_format_is_replaced_cleanly(tmp_path):
    prom = tmp_path / "objmig.prom"
    prom.write_text('# HELP anchore_objmig_documents_migrated_total x\n# TYPE anchore_objmig_documents_migrated_total gauge\n'
                    'anchore_objmig_documents_migrated_total{command="migrate"} 5\n')
    assert metrics.record(str(prom), metrics.RunResult("verify", True, 1.0, 3, 0))
    families, _ = parse_exposition(prom.read_text())
    assert "anchore_objmig_documents_migrated_total" not in families
    assert "anchore_objmig_documents_verified" in families


# -- 9. machine-readable output -------------------------------------------------

def only_json(stdout):
    """stdout must be exactly one JSON document (nothing before or after it)."""
    return json.loads(stdout)


def test_dry_run_json_is_the_plan_by_bucket_and_user(db, s3, cli, tmp_path):
    docs = anchore_sim.make_docs(60, seed=71, large_share=0.2)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    # a row in scope this run cannot move: it belongs in the plan too
    db.execute("""INSERT INTO archive_metadata (bucket, "archiveId", "userId", "documentName", content_url,
                      is_compressed, digest, size, document_metadata, created_at, last_updated, record_state_key,
                      record_state_val)
                  VALUES (%s, 'swifty', 'admin', 'swifty.json', 'swift://c/admin/x/swifty', false, NULL, 0, NULL,
                          1, 1, 'active', NULL)""", (docs[0].bucket,))
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket), compress=True))
    tables = table_names(db)

    result = cli("-v", "migrate", source, dest, "--dry-run", "--json", "--shard-size", "5")
    assert result.returncode == 0, result.stderr
    plan = only_json(result.stdout)
    sizes = {row[0]: row[1] for row in db.execute('SELECT "archiveId", size FROM archive_metadata')}
    expected = {}
    for doc in docs:
        counts = expected.setdefault(doc.bucket, {}).setdefault(doc.user_id, [0, 0])
        counts[0] += 1
        counts[1] += sizes[doc.archive_id]
    assert {b["bucket"]: {u["user_id"]: [u["documents"], u["stored_bytes"]] for u in b["users"]}
            for b in plan["buckets"]} == expected
    for entry in plan["buckets"]:
        assert entry["documents"] == sum(u["documents"] for u in entry["users"])
        assert entry["stored_bytes"] == sum(u["stored_bytes"] for u in entry["users"])
    assert plan["total"]["documents"] == len(docs)
    assert plan["total"]["stored_bytes"] == sum(sizes.values())
    assert plan["total"]["would_compress"] == sum(1 for doc in docs if len(doc.content) > 100 * 1024)
    assert plan["total"]["shards"] >= len(expected)
    assert plan["from"] == "db://" and plan["to"].startswith(f"s3://{bucket}/") and plan["dry_run"] is True
    [swift] = plan["not_moved"]
    assert swift["cause"] == "unsupported driver" and swift["rows"] == 1 and "swifty" in " ".join(swift["examples"])
    assert s3.secret_key not in result.stdout + result.stderr
    assert table_names(db) == tables and task_rows(db) == [] and s3.keys(bucket) == []

    wrong = cli("migrate", source, dest, "--json", "--dontask")  # --json is for the plan only
    assert wrong.returncode == 2 and "--dry-run" in wrong.stderr and wrong.stdout == ""
    assert task_rows(db) == []


def test_list_migrations_json(db, cli, tmp_path):
    assert only_json(cli("list-migrations", "--json").stdout) == {"migrations": []}
    anchore_sim.store(db, anchore_sim.Location("db"), anchore_sim.make_docs(7, seed=72))
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("db2"))
    assert cli("migrate", source, dest, "--dontask").returncode == 0
    assert cli("migrate", dest, source, "--dontask").returncode == 0
    result = cli("-v", "list-migrations", "--json")
    assert result.returncode == 0, result.stderr
    migrations = only_json(result.stdout)["migrations"]
    assert [(m["state"], m["from_driver"], m["to_driver"], m["migrated"], m["total"]) for m in migrations] == [
        ("complete", "db", "db2", 7, 7), ("complete", "db2", "db", 7, 7)]
    first = migrations[0]
    assert first["id"] < migrations[1]["id"]
    for key in ("started_at", "ended_at", "last_updated"):
        assert first[key].endswith("+00:00"), first  # UTC, and says so
    assert first["started_at"] <= first["ended_at"]


def test_verify_json_names_every_bad_document(db, s3, cli, tmp_path):
    bucket = s3.new_bucket()
    docs = anchore_sim.make_docs(40, seed=73)
    anchore_sim.store(db, s3.location(bucket, prefix="v/"), docs)
    config = write_config(tmp_path / "s3.yaml", section("s3", s3.driver_config(bucket, prefix="v/")))
    urls = dict(db.execute('SELECT "archiveId", content_url FROM archive_metadata'))
    gone, resized = docs[3], docs[11]
    s3.client.delete_object(Bucket=bucket, Key=urls[gone.archive_id].split("/", 3)[3])
    db.execute('UPDATE archive_metadata SET size = size + 1 WHERE "archiveId" = %s', (resized.archive_id,))

    result = cli("verify", config, "--json", "--workers", "2")
    assert result.returncode == 1
    report = only_json(result.stdout)
    assert (report["documents"], report["good"], report["bad"]) == (40, 38, 2)
    assert report["ok"] is False and report["unverified_shards"] == []
    bad = {entry["archive_id"]: entry for entry in report["bad_documents"]}
    assert set(bad) == {gone.archive_id, resized.archive_id}
    assert bad[gone.archive_id]["reason"] == "not found"
    assert "size mismatch" in bad[resized.archive_id]["reason"]
    assert bad[gone.archive_id]["content_url"] == urls[gone.archive_id]
    assert (bad[gone.archive_id]["user_id"], bad[gone.archive_id]["bucket"]) == (gone.user_id, gone.bucket)
    assert "BAD " in result.stderr  # the logs stay on stderr

    clean = cli("verify", config, "--json", "--bucket", docs[0].bucket)
    if docs[0].bucket in (gone.bucket, resized.bucket):
        assert clean.returncode == 1
    else:
        assert clean.returncode == 0 and only_json(clean.stdout)["bad_documents"] == []
