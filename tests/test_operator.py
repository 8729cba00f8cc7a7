"""What the operator sees and relies on: the progress display, the metrics
file, `verify`, the log formats, the dry run, and secrets kept out of output.

Everything runs against the real PostgreSQL and S3 servers of conftest.py;
terminals are real pseudo-terminals. Clocks are injected where time matters,
so nothing here depends on how fast the machine is.
"""

import fcntl
import io
import json
import logging
import os
import pty
import re
import stat
import struct
import subprocess
import sys
import termios
import threading
import urllib.parse

import anchore_sim
import psycopg
import pytest
import yaml
from helpers import assert_all_readable, section, task_rows, urls, write_config

from anchore_objmig import metrics, verify
from anchore_objmig.config import load_store_config
from anchore_objmig.db import DbSettings, to_conninfo
from anchore_objmig.drivers import DocRow
from anchore_objmig.display import ProgressDisplay
from anchore_objmig.ledger import Totals

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REDRAW = re.compile(r"\r([^\r\n]*)\x1b\[K")  # one in-place redraw of the bar line
TEXT_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


# -- helpers -----------------------------------------------------------------

def tool_env():
    """The environment Cli gives the tool: ours, without ANCHORE* variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith("ANCHORE")}


def run_on_terminal(command, columns=160, env=None, timeout=300):
    """Run `command` with stderr on a pseudo-terminal of `columns` columns and
    stdout on a pipe; (exit status, stdout, everything the terminal got)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
                               cwd=ROOT, env=env or tool_env(), start_new_session=True)
    os.close(slave)
    chunks = []

    def pump():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    stdout = process.stdout.read()
    status = process.wait(timeout=timeout)
    reader.join(timeout=timeout)
    os.close(master)
    return status, stdout.decode(), b"".join(chunks).decode("utf-8", "replace")


def totals(done, failed=0, documents=100):
    return Totals(documents=documents, bytes=documents * 1_000_000, documents_done=done,
                  bytes_done=done * 1_000_000, documents_failed=failed, shards=4,
                  shards_done=(done + failed) // 25, shards_failed=0)


def s3_key(url):
    return url[len("s3://"):].split("/", 1)[1]


def metadata_row(conn, doc):
    return conn.execute(
        'SELECT content_url, is_compressed, digest, size FROM archive_metadata WHERE "archiveId" = %s',
        (doc.archive_id,),
    ).fetchone()


def label(doc):
    return f"{doc.user_id}/{doc.bucket}/{doc.archive_id}"


def verified(stdout):
    """(documents read, good, bad) from verify's summary line."""
    match = re.search(r"^verified (\d+) documents in .*: (\d+) good \(.*\), (\d+) bad$", stdout, re.M)
    assert match, stdout
    return tuple(int(n) for n in match.groups())


def bad_lines(stderr):
    return [line for line in stderr.splitlines() if "BAD " in line]


def table_names(conn):
    return {row[0] for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


def dump_tables(conn):
    """Every row of every table, as text, sorted: a picture of the database."""
    picture = {}
    for name in sorted(table_names(conn)):
        rows = conn.execute(f'SELECT t::text FROM "{name}" t').fetchall()
        picture[name] = sorted(row[0] for row in rows)
    return picture


def s3_objects(client, bucket):
    """{key: (size, etag)} of every object in `bucket`."""
    objects = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            objects[item["Key"]] = (item["Size"], item["ETag"])
    return objects


# -- a strict reader of the Prometheus text exposition format ------------------

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
VALUE = re.compile(r"[+-]?(?:Inf|NaN|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)")


def parse_exposition(text):
    """({family: {"help", "type"}}, {(name, labels): value}); fails on any
    line the text format does not allow, on a sample outside its family's
    block, on a family given twice and on a duplicate sample."""
    assert text.endswith("\n"), "the file must end with a newline"
    families, samples, current = {}, {}, None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            match = re.fullmatch(rf"# HELP ({NAME}) (\S.*)", line)
            assert match, line
            assert match.group(1) not in families, f"family {match.group(1)} given twice"
            current = match.group(1)
            families[current] = {"help": match.group(2)}
        elif line.startswith("# TYPE "):
            match = re.fullmatch(rf"# TYPE ({NAME}) (counter|gauge|histogram|summary|untyped)", line)
            assert match and match.group(1) == current and "type" not in families[current], line
            families[current]["type"] = match.group(2)
        else:
            match = re.fullmatch(rf"({NAME})(?:\{{(.*)\}})? (\S+)", line)
            assert match, f"not a sample line: {line!r}"
            name, label_text, value = match.groups()
            assert name == current and "type" in families[name], f"{name} outside its HELP/TYPE block"
            assert VALUE.fullmatch(value), f"bad value in {line!r}"
            labels, position = [], 0
            while label_text and position < len(label_text):
                pair = LABEL.match(label_text, position)
                assert pair, f"bad labels in {line!r}"
                labels.append(pair.groups())
                position = pair.end()
                if position < len(label_text):
                    assert label_text[position] == ",", f"bad labels in {line!r}"
                    position += 1
            key = (name, tuple(sorted(labels)))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = float(value)
    return families, samples


def metric(samples, name, command):
    return samples.get((f"anchore_objmig_{name}", (("command", command),)))


# -- 1. the progress display -----------------------------------------------------

BAR_PROGRAM = r"""
import logging
from anchore_objmig import logs
from anchore_objmig.display import ProgressDisplay
from anchore_objmig.ledger import Totals

logs.configure("INFO", "text")
now = [100.0]
display = ProgressDisplay("auto", interval=5, clock=lambda: now[0])
print("mode", display.mode, flush=True)

def totals(done, failed=0):
    return Totals(documents=100, bytes=100_000_000, documents_done=done, bytes_done=done * 1_000_000,
                  documents_failed=failed, shards=4, shards_done=done // 25, shards_failed=0)

for at, done in [(0.0, 0), (0.1, 5), (0.2, 10), (1.0, 40)]:
    now[0] = 100.0 + at
    display.update(totals(done))
logging.getLogger("anchore_objmig").warning("a log line between two redraws")
for at, done in [(1.1, 50), (1.3, 60), (1.6, 80)]:
    now[0] = 100.0 + at
    display.update(totals(done))
now[0] = 102.0
display.close(totals(98, failed=2))
"""


def test_bar_redraws_one_line_in_place_on_a_terminal():
    status, stdout, screen = run_on_terminal([sys.executable, "-c", BAR_PROGRAM])
    assert status == 0, screen
    assert stdout.split() == ["mode", "bar"]  # auto: a terminal gets the bar
    lines = [line for line in REDRAW.findall(screen) if line]
    # Drawn at 0.0, 1.0, 1.1 (after the log line cleared it), 1.6 and on close;
    # 0.1, 0.2 and 1.3 come too soon after a redraw (at most 4 a second).
    assert len(lines) == 5, lines
    assert "0/100 documents" in lines[0] and "0.0%" in lines[0]
    assert "40/100 documents" in lines[1] and "40.0%" in lines[1]
    assert "ETA 0:00:02" in lines[1]  # 60 left at 40 documents/s
    final = lines[-1]
    for fact in ("98/100 documents", "100.0%", "93.5 MiB written", "49 docs/s", "46.7 MiB/s", "2 failed"):
        assert fact in final, (fact, final)
    # the log line starts on a cleared line, not after the bar's text
    assert re.search(r"\r\x1b\[K\d{4}-\d\d-\d\dT[\d:]+ WARNING a log line between two redraws\r\n", screen)
    assert screen.endswith("\r\n")  # close() leaves the terminal on a fresh line


def test_bar_never_wraps_on_a_narrow_terminal():
    status, _, screen = run_on_terminal([sys.executable, "-c", BAR_PROGRAM], columns=40)
    assert status == 0, screen
    lines = [line for line in REDRAW.findall(screen) if line]
    assert lines and all(len(line) < 40 for line in lines)


def test_log_mode_logs_a_line_every_interval(caplog):
    now = [0.0]
    stream = io.StringIO()
    display = ProgressDisplay("auto", stream=stream, interval=5, clock=lambda: now[0])
    assert display.mode == "log"  # auto: not a terminal
    caplog.set_level(logging.INFO, logger="anchore_objmig")
    for at, done in [(1, 10), (4, 20), (5, 30), (7, 40), (10.5, 50)]:
        now[0] = at
        display.update(totals(done))
    now[0] = 12
    display.close(totals(99, failed=1))
    records = [r for r in caplog.records if r.name == "anchore_objmig.display"]
    assert [r.levelno for r in records] == [logging.INFO] * 3  # at 5, at 10.5, and on close
    messages = [r.getMessage() for r in records]
    assert "30/100 documents" in messages[0] and "30.0%" in messages[0] and "6 docs/s" in messages[0]
    assert "50/100 documents" in messages[1]
    assert "99/100 documents" in messages[2] and "1 failed" in messages[2] and "4/4 shards done" in messages[2]
    assert stream.getvalue() == ""  # log mode never draws on the stream


def test_none_mode_shows_nothing(caplog):
    stream = io.StringIO()
    caplog.set_level(logging.DEBUG)
    display = ProgressDisplay("none", stream=stream, interval=0)
    display.update(totals(10))
    display.close(totals(100))
    assert stream.getvalue() == "" and not [r for r in caplog.records if r.name == "anchore_objmig.display"]


def test_migrate_progress_bar_on_a_terminal(db, s3, cli, tmp_path):
    """End to end: a real migration with --progress bar redraws its line in place."""
    docs = anchore_sim.make_docs(40)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket)))
    command = [sys.executable, "-m", "anchore_objmig", "--db-connect", cli.dsn,
               "migrate", source, dest, "--dontask", "--progress", "bar"]
    status, stdout, screen = run_on_terminal(command)
    assert status == 0, screen
    lines = [line for line in REDRAW.findall(screen) if line]
    assert lines, f"no in-place redraw on the terminal:\n{screen!r}"
    assert "40/40 documents" in lines[-1] and "0 failed" in lines[-1]
    assert "object_store:" in stdout
    assert_all_readable(db, s3.client, docs)


def test_verify_progress_bar_on_a_terminal(db, s3, cli, tmp_path):
    """End to end: verify with --progress bar redraws its line in place."""
    bucket = s3.new_bucket()
    s3_docs, _ = seed_s3_and_db(db, s3.client, bucket, s3_count=30, db_count=0)
    command = [sys.executable, "-m", "anchore_objmig", "--db-connect", cli.dsn, "verify",
               s3_config(tmp_path, s3, bucket), "--workers", "2", "--progress", "bar"]
    status, stdout, screen = run_on_terminal(command)
    assert status == 0, screen
    lines = [line for line in REDRAW.findall(screen) if line]
    assert lines and "30/30 documents" in lines[-1] and "0 failed" in lines[-1], screen
    assert verified(stdout) == (30, 30, 0)


# -- 2. the metrics file ----------------------------------------------------------

def test_metrics_file_parses_and_keeps_the_last_success(tmp_path):
    path = tmp_path / "anchore_objmig.prom"
    assert metrics.record(str(path), metrics.RunResult("migrate", True, 12.5, 1000, 0, 5_000_000, finished_at=1000.0))
    families, samples = parse_exposition(path.read_text())
    assert all(name.startswith("anchore_objmig_") for name in families)
    assert all(family["help"] and family["type"] == "gauge" for family in families.values())
    assert metric(samples, "documents_migrated", "migrate") == 1000
    assert metric(samples, "migrated_stored_bytes", "migrate") == 5_000_000
    assert metric(samples, "documents_failed", "migrate") == 0
    assert metric(samples, "duration_seconds", "migrate") == 12.5
    assert metric(samples, "last_run_timestamp_seconds", "migrate") == 1000
    assert metric(samples, "last_success_timestamp_seconds", "migrate") == 1000
    assert stat.S_IMODE(path.stat().st_mode) == 0o644

    # a failed migration: last_run moves, last_success stays
    metrics.record(str(path), metrics.RunResult("migrate", False, 3.0, 10, 4, 100, finished_at=2000.0))
    # a verify run shares the file; a failed first one has no success to keep
    metrics.record(str(path), metrics.RunResult("verify", False, 1.0, 990, 2, finished_at=2500.0))
    families, samples = parse_exposition(path.read_text())
    assert metric(samples, "documents_failed", "migrate") == 4
    assert metric(samples, "last_run_timestamp_seconds", "migrate") == 2000
    assert metric(samples, "last_success_timestamp_seconds", "migrate") == 1000
    assert metric(samples, "documents_verified", "verify") == 990
    assert metric(samples, "documents_bad", "verify") == 2
    assert metric(samples, "last_run_timestamp_seconds", "verify") == 2500
    assert metric(samples, "last_success_timestamp_seconds", "verify") is None

    metrics.record(str(path), metrics.RunResult("verify", True, 1.0, 992, 0, finished_at=3000.0))
    metrics.record(str(path), metrics.RunResult("verify", False, 1.0, 992, 1, finished_at=4000.0))
    _, samples = parse_exposition(path.read_text())
    assert metric(samples, "last_success_timestamp_seconds", "verify") == 3000
    assert metric(samples, "last_run_timestamp_seconds", "verify") == 4000
    assert metric(samples, "last_success_timestamp_seconds", "migrate") == 1000
    assert metric(samples, "documents_migrated", "migrate") == 10
    assert os.listdir(tmp_path) == ["anchore_objmig.prom"]  # no temp file left behind


def test_metrics_readers_never_see_a_partial_file(tmp_path):
    """A reader racing 300 rewrites always finds a whole, valid file."""
    path = str(tmp_path / "objmig.prom")
    metrics.write_metrics(path, metrics.samples_for(metrics.RunResult("migrate", True, 1.0, 0, 0)))
    failures = []

    def writer():
        try:
            for n in range(300):
                result = metrics.RunResult("migrate", n % 3 != 0, n / 7, n * 1000, n % 5, n * 10**9)
                metrics.write_metrics(path, metrics.samples_for(result))
        except Exception as exc:  # reported by the main thread
            failures.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    reads = 0
    while thread.is_alive() or reads == 0:
        with open(path, encoding="utf-8") as handle:
            families, samples = parse_exposition(handle.read())
        assert metric(samples, "documents_migrated", "migrate") is not None
        assert metric(samples, "last_run_timestamp_seconds", "migrate") is not None
        reads += 1
    thread.join()
    assert not failures
    assert os.listdir(tmp_path) == ["objmig.prom"]


def test_migrate_writes_its_metrics_file(db, s3, cli, tmp_path):
    """End to end: migrate --metrics-file (needs migrate.finish() to call metrics.record)."""
    docs, bad = seed_with_one_bad(db, count=12)
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket)))
    prom = tmp_path / "textfile" / "objmig.prom"
    prom.parent.mkdir()
    assert cli("migrate", source, dest, "--dontask", "--metrics-file", prom).returncode == 1
    _, samples = parse_exposition(prom.read_text())
    assert metric(samples, "documents_migrated", "migrate") == 11
    assert metric(samples, "documents_failed", "migrate") == 1
    assert metric(samples, "last_success_timestamp_seconds", "migrate") is None
    failed_at = metric(samples, "last_run_timestamp_seconds", "migrate")

    db.execute("""UPDATE archive_document SET jsondata = left(jsondata, -1) WHERE "archiveId" = %s""", (bad.archive_id,))
    assert cli("migrate", source, dest, "--dontask", "--metrics-file", prom).returncode == 0
    _, samples = parse_exposition(prom.read_text())
    assert metric(samples, "documents_migrated", "migrate") == 1
    assert metric(samples, "migrated_stored_bytes", "migrate") == len(bad.content)
    assert metric(samples, "last_success_timestamp_seconds", "migrate") >= failed_at
    assert os.listdir(prom.parent) == ["objmig.prom"]


# -- 3. verify --------------------------------------------------------------------

def seed_s3_and_db(db, client, bucket, s3_count=40, db_count=10):
    """Documents in S3 (under a prefix, the larger ones zlib-compressed) and in the db driver."""
    s3_docs = anchore_sim.make_docs(s3_count, seed=21)
    anchore_sim.store(db, anchore_sim.Location("s3", s3_client=client, s3_bucket=bucket, prefix="objmig/",
                                               compress=True, min_size_kbytes=10), s3_docs)
    db_docs = anchore_sim.make_docs(db_count, seed=22)
    anchore_sim.store(db, anchore_sim.Location("db"), db_docs)
    return s3_docs, db_docs


def s3_config(tmp_path, s3, bucket, name="s3.yaml"):
    return write_config(tmp_path / name, section("s3", s3.driver_config(bucket, prefix="objmig/")))


def test_verify_clean_store(db, s3, cli, tmp_path):
    bucket = s3.new_bucket()
    s3_docs, db_docs = seed_s3_and_db(db, s3.client, bucket)
    assert db.execute("SELECT count(*) FROM archive_metadata WHERE is_compressed").fetchone()[0] > 0
    prom = tmp_path / "verify.prom"
    result = cli("verify", s3_config(tmp_path, s3, bucket), "--workers", "2", "--metrics-file", prom)
    assert result.returncode == 0, result.stderr
    assert verified(result.stdout) == (len(s3_docs), len(s3_docs), 0)
    assert not bad_lines(result.stderr)
    _, samples = parse_exposition(prom.read_text())
    assert metric(samples, "documents_verified", "verify") == len(s3_docs)
    assert metric(samples, "documents_bad", "verify") == 0
    assert metric(samples, "last_success_timestamp_seconds", "verify") is not None

    # the db driver's documents are verified by a db configuration, and only they
    result = cli("verify", write_config(tmp_path / "db.yaml", section("db")))
    assert result.returncode == 0, result.stderr
    assert verified(result.stdout) == (len(db_docs), len(db_docs), 0)


def test_verify_names_every_bad_document(db, s3, cli, tmp_path):
    bucket = s3.new_bucket()
    s3_docs, db_docs = seed_s3_and_db(db, s3.client, bucket)
    client = s3.client
    compressed = [d for d in s3_docs if metadata_row(db, d)[1]]
    plain = [d for d in s3_docs if not metadata_row(db, d)[1]]
    flipped, unzippable, resized, deleted = plain[0], compressed[0], plain[1], plain[2]

    # an S3 object overwritten with other bytes of the same length
    url = metadata_row(db, flipped)[0]
    data = client.get_object(Bucket=bucket, Key=s3_key(url))["Body"].read()
    client.put_object(Bucket=bucket, Key=s3_key(url), Body=bytes([data[0] ^ 1]) + data[1:])
    # a "compressed" object that is not zlib data, its row made to match it
    url = metadata_row(db, unzippable)[0]
    junk = b"this is not zlib data" * 10
    client.put_object(Bucket=bucket, Key=s3_key(url), Body=junk)
    db.execute('UPDATE archive_metadata SET digest = md5(%s::bytea), size = %s WHERE "archiveId" = %s',
               (junk, len(junk), unzippable.archive_id))
    # a metadata row whose size is wrong
    db.execute('UPDATE archive_metadata SET size = size + 1 WHERE "archiveId" = %s', (resized.archive_id,))
    # an object that is gone
    client.delete_object(Bucket=bucket, Key=s3_key(metadata_row(db, deleted)[0]))

    prom = tmp_path / "verify.prom"
    result = cli("verify", s3_config(tmp_path, s3, bucket), "--workers", "2", "--metrics-file", prom)
    assert result.returncode == 1, result.stderr
    assert verified(result.stdout) == (len(s3_docs), len(s3_docs) - 4, 4)
    lines = bad_lines(result.stderr)
    assert len(lines) == 4, result.stderr
    for doc, reason in ((flipped, "digest mismatch"), (unzippable, "does not decompress"),
                        (resized, "size mismatch"), (deleted, "not found")):
        named = [line for line in lines if label(doc) in line]
        assert len(named) == 1, (doc.archive_id, lines)
        assert metadata_row(db, doc)[0] in named[0] and reason in named[0], named[0]
    _, samples = parse_exposition(prom.read_text())
    assert metric(samples, "documents_bad", "verify") == 4
    assert metric(samples, "last_success_timestamp_seconds", "verify") is None

    # a tampered archive_document row, found by verifying the db configuration
    victim = db_docs[3]
    db.execute("""UPDATE archive_document SET jsondata = jsondata || ' ' WHERE "archiveId" = %s""", (victim.archive_id,))
    result = cli("verify", write_config(tmp_path / "db.yaml", section("db")))
    assert result.returncode == 1
    lines = bad_lines(result.stderr)
    assert len(lines) == 1 and label(victim) in lines[0] and "digest mismatch" in lines[0]
    assert f"db://{label(victim)}" in lines[0]


def test_verify_bucket_option_limits_the_documents(db, s3, cli, tmp_path):
    bucket = s3.new_bucket()
    s3_docs, _ = seed_s3_and_db(db, s3.client, bucket, s3_count=60)
    broken = s3_docs[0]
    s3.client.delete_object(Bucket=bucket, Key=s3_key(metadata_row(db, broken)[0]))
    others = sorted({d.bucket for d in s3_docs} - {broken.bucket})[:2]
    config = s3_config(tmp_path, s3, bucket)

    result = cli("verify", config, "--bucket", others[0], "--bucket", others[1])
    assert result.returncode == 0, result.stderr
    chosen = sum(1 for d in s3_docs if d.bucket in others)
    assert verified(result.stdout) == (chosen, chosen, 0)

    result = cli("verify", config, f"--bucket={broken.bucket}")
    assert result.returncode == 1
    chosen = sum(1 for d in s3_docs if d.bucket == broken.bucket)
    assert verified(result.stdout) == (chosen, chosen - 1, 1)
    assert len(bad_lines(result.stderr)) == 1 and label(broken) in result.stderr


def test_verify_does_not_blame_documents_changed_while_it_reads(db, s3, schema_ready, tmp_path):
    """Anchore may be running: a row rewritten or removed between reading it
    and reading its bytes is looked up again, not reported as bad."""
    bucket = s3.new_bucket()
    seed_s3_and_db(db, s3.client, bucket, s3_count=8, db_count=0)
    store = load_store_config(s3_config(tmp_path, s3, bucket))
    verifier = verify.Verifier(verify.VerifySpec(DbSettings(to_conninfo(schema_ready)), store, (), 100, 2))
    try:
        rows = [DocRow(*row) for row in db.execute(
            'SELECT bucket, "archiveId", "userId", "documentName", content_url, is_compressed, digest, size '
            'FROM archive_metadata ORDER BY "archiveId"')]
        moved, removed, rewritten, broken = rows[:4]
        client = s3.client
        # moved out of this location (e.g. migrated to db) after we read its row
        db.execute('UPDATE archive_metadata SET content_url = %s WHERE "archiveId" = %s',
                   (f"db://{moved.label}", moved.archive_id))
        client.delete_object(Bucket=bucket, Key=s3_key(moved.content_url))
        # deleted by Anchore
        db.execute('DELETE FROM archive_metadata WHERE "archiveId" = %s', (removed.archive_id,))
        client.delete_object(Bucket=bucket, Key=s3_key(removed.content_url))
        # stored again, in place, with new content
        fresh = b'{"rewritten": true}'
        client.put_object(Bucket=bucket, Key=s3_key(rewritten.content_url), Body=fresh)
        db.execute("""UPDATE archive_metadata SET digest = md5(%s::bytea), size = %s, is_compressed = false
                      WHERE "archiveId" = %s""", (fresh, len(fresh), rewritten.archive_id))
        # really broken: its row still points at an object that is gone
        client.delete_object(Bucket=bucket, Key=s3_key(broken.content_url))
        report = verifier.check_batch(rows)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):  # the server refuses any write
            verifier.context.db_connection().execute("CREATE TABLE objmig_should_not_exist (x int)")
    finally:
        verifier.close()
    assert report.changed == 2
    assert [bad[:3] for bad in report.bad] == [(broken.user_id, broken.bucket, broken.archive_id)]
    assert report.good == len(rows) - 3  # the rewritten document was checked again, and is good


def test_verify_changes_nothing(db, s3, cli, tmp_path):
    bucket = s3.new_bucket()
    s3_docs, _ = seed_s3_and_db(db, s3.client, bucket)
    # history and a broken document, so that every path of verify runs
    db.execute("INSERT INTO tasks (state, last_state, type) VALUES ('complete', 'running', 'archivemigrationtask')")
    db.execute('UPDATE archive_metadata SET size = size + 1 WHERE "archiveId" = %s', (s3_docs[5].archive_id,))
    tables, picture, objects = table_names(db), dump_tables(db), s3_objects(s3.client, bucket)

    for workers in ("1", "2"):
        result = cli("verify", s3_config(tmp_path, s3, bucket), "--workers", workers,
                     "--metrics-file", tmp_path / "v.prom")
        assert result.returncode == 1, result.stderr

    assert table_names(db) == tables  # no objmig_* (or any other) table created
    assert dump_tables(db) == picture
    assert s3_objects(s3.client, bucket) == objects


def test_verify_configuration_errors_exit_2(db, s3, cli, tmp_path):
    missing = cli("verify", tmp_path / "no-such-config.yaml")
    assert missing.returncode == 2 and "no such file" in missing.stderr
    gone = s3.new_bucket(create=False)
    no_bucket = cli("verify", write_config(tmp_path / "c.yaml", section("s3", s3.driver_config(gone))))
    assert no_bucket.returncode == 2 and gone in no_bucket.stderr
    no_dir = cli("verify", write_config(tmp_path / "d.yaml", section("db")),
                 "--metrics-file", tmp_path / "no-such-dir" / "m.prom")
    assert no_dir.returncode == 2 and "no-such-dir" in no_dir.stderr
    for result in (missing, no_bucket, no_dir):
        assert result.stdout == "" and "Traceback" not in result.stderr


# -- 4. logs, dry run, secrets ----------------------------------------------------

def seed_with_one_bad(db, count=30):
    """`count` db documents; one fails its digest check (the rest migrate)."""
    docs = anchore_sim.make_docs(count, seed=31)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bad = docs[4]
    db.execute("""UPDATE archive_document SET jsondata = jsondata || ' ' WHERE "archiveId" = %s""", (bad.archive_id,))
    return docs, bad


def test_log_format_json_every_stderr_line(db, s3, cli, tmp_path):
    docs, bad = seed_with_one_bad(db)
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket)))
    migrate = cli("--log-format", "json", "migrate", source, dest, "--dontask", "--workers", "2")
    verify = cli("--log-format", "json", "verify", source)
    for result in (migrate, verify):
        assert result.returncode == 1, result.stderr
        entries = [json.loads(line) for line in result.stderr.splitlines()]
        assert entries
        for entry in entries:
            assert isinstance(entry, dict) and {"time", "level", "message"} <= set(entry), entry
            assert entry["level"] in ("debug", "info", "warning", "error", "critical")
        assert any(e["level"] == "error" and bad.archive_id in e["message"] for e in entries)
    assert any(e["level"] == "info" for e in map(json.loads, migrate.stderr.splitlines()))
    named = [json.loads(line) for line in verify.stderr.splitlines() if "BAD " in line]
    assert len(named) == 1 and named[0]["archive_id"] == bad.archive_id and "digest mismatch" in named[0]["reason"]


def test_quiet_leaves_only_warnings_and_errors(db, s3, cli, tmp_path):
    docs, bad = seed_with_one_bad(db)
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket)))
    result = cli("--quiet", "--log-format", "json", "migrate", source, dest, "--dontask", "--workers", "2")
    assert result.returncode == 1
    levels = [json.loads(line)["level"] for line in result.stderr.splitlines()]
    assert levels and set(levels) <= {"warning", "error", "critical"}
    assert bad.archive_id in result.stderr

    # text format, a clean run: no INFO line at all, the results still on stdout
    db.execute("""UPDATE archive_document SET jsondata = left(jsondata, -1) WHERE "archiveId" = %s""", (bad.archive_id,))
    result = cli("-q", "migrate", source, dest, "--dontask")
    assert result.returncode == 0, result.stderr
    assert "object_store:" in result.stdout
    for line in result.stderr.splitlines():
        match = TEXT_LOG_LINE.match(line)
        assert match is None or match.group(1) in ("WARNING", "ERROR", "CRITICAL"), line
    assert " INFO " not in result.stderr
    assert_all_readable(db, s3.client, docs)


def test_dry_run_reports_and_changes_nothing(db, s3, cli, tmp_path):
    docs = anchore_sim.make_docs(80, seed=41, large_share=0.2)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    elsewhere = anchore_sim.make_docs(5, seed=42)  # not at the source: not counted
    anchore_sim.store(db, anchore_sim.Location("db2"), elsewhere)
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket), compress=True))
    tables = table_names(db)
    picture = dump_tables(db)

    result = cli("migrate", source, dest, "--dry-run", "--shard-size", "7")
    assert result.returncode == 0, result.stderr

    expected = {}
    for doc in docs:
        expected[(doc.bucket, doc.user_id)] = expected.get((doc.bucket, doc.user_id), 0) + 1
    reported = {}
    for line in result.stdout.splitlines():
        fields = line.split()
        if len(fields) == 4 and fields[2].isdigit() and fields[3].isdigit():
            reported[(fields[0], fields[1])] = int(fields[2])
    assert reported == expected
    large = sum(1 for doc in docs if len(doc.content) > 100 * 1024)
    assert large > 0
    total = re.search(r"total: (\d+) documents, .* (\d+) would be compressed, (\d+) shards", result.stdout)
    assert total, result.stdout
    assert (int(total.group(1)), int(total.group(2))) == (len(docs), large)
    shards = int(total.group(3))
    assert shards == -(-len(docs) // 7)  # --shard-size 7: sized by documents, not by bucket or user
    assert "another location: 5 rows" in result.stdout  # in scope, but neither at the source nor the destination

    # nothing changed anywhere
    assert table_names(db) == tables
    assert dump_tables(db) == picture
    assert task_rows(db) == []
    assert s3.keys(bucket) == []

    # and the real run does what the dry run said: all of its documents move, but the
    # run cannot be complete while 5 rows in scope are elsewhere
    result = cli("migrate", source, dest, "--dontask", "--shard-size", "7")
    assert result.returncode == 1, result.stderr
    assert "5 rows in scope are not at the destination (5 another location)" in result.stderr
    assert db.execute("SELECT count(*) FROM objmig_shards").fetchone()[0] == shards
    assert task_rows(db)[0][4:6] == (len(docs), len(docs))
    assert db.execute("SELECT count(*) FROM archive_metadata WHERE is_compressed").fetchone()[0] == large


def test_no_secret_in_any_output(db, s3, cli, tmp_path):
    docs, bad = seed_with_one_bad(db, count=15)
    bucket = s3.new_bucket()
    secret = s3.secret_key
    password = urllib.parse.urlsplit(cli.dsn).password
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket)))  # literal secret_key
    runs = [
        cli("-v", "check", dest),
        cli("-v", "migrate", source, dest, "--dry-run"),
        cli("-v", "migrate", source, dest, "--dontask", "--workers", "2"),  # fails for the bad document
        cli("-v", "verify", source),  # names the bad document
    ]
    db.execute("""UPDATE archive_document SET jsondata = left(jsondata, -1) WHERE "archiveId" = %s""", (bad.archive_id,))
    runs += [
        cli("-v", "--log-format", "json", "migrate", source, dest, "--dontask"),  # completes: prints the snippet
        cli("-v", "verify", dest, "--workers", "2"),
        cli("-v", "list-migrations"),
    ]
    # database errors that show the connection target
    wrong = "wrong-" + os.urandom(8).hex()
    parts = urllib.parse.urlsplit(cli.dsn)
    refused_dsn = parts._replace(netloc=f"{parts.username}:{wrong}@{parts.hostname}:{parts.port}").geturl()
    closed_dsn = parts._replace(netloc=f"{parts.username}:{wrong}@127.0.0.1:1").geturl()
    runs.append(cli("--db-connect", refused_dsn, "--db-retries", "0", "list-migrations", db=False))
    runs.append(cli("--db-connect", closed_dsn, "--db-retries", "0", "verify", dest, db=False))
    assert [run.returncode for run in runs[:7]] == [0, 0, 1, 1, 0, 0, 0], [run.stderr for run in runs]
    assert "<redacted>" in runs[4].stdout  # the snippet was printed, its secret redacted
    assert runs[-2].returncode == 3 and runs[-1].returncode == 3  # could not connect
    for result in runs:
        output = result.stdout + result.stderr
        assert secret not in output
        assert wrong not in output
        if password:
            assert password not in output and urllib.parse.quote(password, safe="") not in output


def test_show_secrets_prints_the_secret_in_the_snippet(db, s3, cli, tmp_path):
    docs = anchore_sim.make_docs(5, seed=51)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket)))
    result = cli("migrate", source, dest, "--dontask", "--show-secrets")
    assert result.returncode == 0, result.stderr
    snippet = yaml.safe_load(result.stdout.split("\n", 1)[1].split("\nNote:")[0])
    assert snippet["object_store"]["storage_driver"]["config"]["secret_key"] == s3.secret_key
    assert "<redacted>" not in result.stdout
    assert all(url.startswith("s3://") for url in urls(db))
