"""Document integrity: every read proven whole, no shared copy deleted while
needed, one bad row failing alone, and messages true of what they name."""

import base64

import anchore_sim
from faultproxy import FaultProxy, Rule
from helpers import assert_all_readable, section, task_rows, through_proxy, urls, write_config

DOCUMENT_KEYS = r"/(admin|acme)/"  # document keys, not the start-up probe


def forget_digests(db, sizes_too=False):
    """Rows as old Anchore versions left them: no digest (and maybe no size)."""
    db.execute("UPDATE archive_metadata SET digest = NULL" + (", size = NULL" if sizes_too else ""))


def share_copy(db, of_archive_id, archive_id, bucket=None):
    """A second metadata row, `archive_id` (in `bucket`, or the same one), pointing at the stored copy of another."""
    db.execute(
        """INSERT INTO archive_metadata (bucket, "archiveId", "userId", "documentName", content_url, is_compressed,
               digest, size, document_metadata, created_at, last_updated, record_state_key, record_state_val)
           SELECT coalesce(%s, bucket), %s, "userId", %s, content_url, is_compressed, digest, size, NULL,
                  created_at, last_updated, 'active', NULL
           FROM archive_metadata WHERE "archiveId" = %s""",
        (bucket, archive_id, archive_id + ".json", of_archive_id),
    )


def test_short_and_cut_off_s3_bodies_are_retried_and_never_stored(db, s3, cli, tmp_path):
    bucket = s3.new_bucket()
    docs = anchore_sim.make_docs(30, seed=91)
    anchore_sim.store(db, s3.location(bucket), docs)
    forget_digests(db, sizes_too=True)  # only the transfer itself (Content-Length, ETag) can tell
    with FaultProxy(s3.endpoint) as proxy:
        proxy.add(Rule("short200", method="GET", path=DOCUMENT_KEYS, times=8),
                  Rule("cutoff", method="GET", path=DOCUMENT_KEYS, times=4),
                  Rule("resetbody", method="GET", path=DOCUMENT_KEYS, times=4))
        source = write_config(tmp_path / "a.yaml", section("s3", through_proxy(s3, proxy, bucket, max_attempts=8)))
        dest = write_config(tmp_path / "b.yaml", section("db"))
        result = cli("migrate", source, dest, "--dontask", "--workers", "1")
        assert [rule.fired for rule in proxy.rules] == [8, 4, 4]
    assert result.returncode == 0, result.stderr
    assert_all_readable(db, s3.client, docs)  # every byte, and digest and size now recorded
    assert all(url.startswith("db://") for url in urls(db))
    assert db.execute("SELECT count(*) FROM archive_metadata WHERE digest IS NULL OR size IS NULL").fetchone()[0] == 0
    assert s3.keys(bucket) == []
    assert "UNVERIFIABLE" not in result.stderr  # the MD5 ETags vouched for every read


def test_a_body_short_every_time_fails_cleanly_and_stays(db, s3, cli, tmp_path):
    bucket = s3.new_bucket()
    docs = anchore_sim.make_docs(12, seed=92)
    anchore_sim.store(db, s3.location(bucket), docs)
    forget_digests(db)
    doomed = docs[3]
    with FaultProxy(s3.endpoint) as proxy:
        proxy.add(Rule("short200", method="GET", path=doomed.archive_id.split(":")[1], times=None))
        source = write_config(tmp_path / "a.yaml", section("s3", through_proxy(s3, proxy, bucket, max_attempts=3)))
        dest = write_config(tmp_path / "b.yaml", section("db"))
        result = cli("migrate", source, dest, "--dontask", "--workers", "1")
        assert proxy.rules[0].fired == 3
    assert result.returncode == 1
    named = [line for line in result.stderr.splitlines() if "FAILED" in line]
    assert len(named) == 1 and doomed.archive_id in named[0] and "unreadable at the source" in named[0]
    assert "still at the source and readable" not in result.stderr
    assert "could not be read at the source" in result.stderr
    assert task_rows(db)[0][0] == "failed"
    row = db.execute('SELECT content_url FROM archive_metadata WHERE "archiveId" = %s', (doomed.archive_id,)).fetchone()
    assert row[0].startswith(f"s3://{bucket}/")
    assert_all_readable(db, s3.client, docs)  # the doomed one too, at its S3 copy


def test_size_is_checked_when_there_is_no_digest(db, cli, tmp_path):
    docs = anchore_sim.make_docs(10, seed=93)
    anchore_sim.store(db, anchore_sim.Location("db2"), docs)
    forget_digests(db)
    cut = docs[5]
    db.execute("UPDATE object_storage SET content = substring(content from 1 for 100) WHERE key = %s", (cut.archive_id,))
    source = write_config(tmp_path / "a.yaml", section("db2"))
    dest = write_config(tmp_path / "b.yaml", section("db"))
    result = cli("migrate", source, dest, "--dontask")
    assert result.returncode == 1
    named = [line for line in result.stderr.splitlines() if "FAILED" in line]
    assert len(named) == 1 and cut.archive_id in named[0] and "corrupt at the source: size mismatch" in named[0]
    assert "are corrupt at the source" in result.stderr and "restore them from a backup" in result.stderr
    assert "still at the source and readable" not in result.stderr
    url = db.execute('SELECT content_url FROM archive_metadata WHERE "archiveId" = %s', (cut.archive_id,)).fetchone()[0]
    assert url.startswith("db2://")  # left where it was, not stored short
    assert_all_readable(db, None, [d for d in docs if d is not cut], skip={cut.archive_id})


def test_an_old_copy_nobody_needs_any_more_is_deleted_by_the_next_run(db, cli, tmp_path):
    """A copy a deleting run kept for another row, whose last row then went
    elsewhere without the second look (a crash between the commit and it):
    the next run finds it through objmig_moved and deletes it."""
    docs = anchore_sim.make_docs(6, seed=96, buckets=("analysis_data",))
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    shared = docs[0]
    share_copy(db, shared.archive_id, "twin", bucket="manifest_data")
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("db2"))
    first = cli("migrate", source, dest, "--dontask", "--bucket", "analysis_data")
    assert first.returncode == 0, first.stderr
    assert db.execute("SELECT count(*) FROM archive_document").fetchone()[0] == 1  # kept for the twin
    db.execute("""DELETE FROM archive_metadata WHERE "archiveId" = 'twin'""")  # its last user is gone
    again = cli("migrate", source, dest, "--dontask", "--allow-empty", "--bucket", "analysis_data")
    assert again.returncode == 0, again.stderr
    assert "deleted 1 old source copies" in again.stderr
    assert db.execute("SELECT count(*) FROM archive_document").fetchone()[0] == 0
    assert_all_readable(db, None, docs)


def test_a_shared_copy_moves_with_every_row_and_goes_after_the_last(db, cli, tmp_path):
    docs = anchore_sim.make_docs(10, seed=95, buckets=("analysis_data",))
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    shared = docs[0]
    # A second row, in another logical bucket (so another shard and batch), points at the same copy.
    twin = anchore_sim.Doc(shared.user_id, "manifest_data", "sha256:" + "ab" * 32, shared.content)
    share_copy(db, shared.archive_id, twin.archive_id, bucket="manifest_data")
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("db2"))

    # Only the first row's bucket: the copy stays, the twin still reads it.
    first = cli("migrate", source, dest, "--dontask", "--bucket", "analysis_data", "--batch-size", "1")
    assert first.returncode == 0, first.stderr
    assert_all_readable(db, None, [*docs, twin])
    assert db.execute("SELECT count(*) FROM archive_document").fetchone()[0] == 1  # the shared copy only

    # Everything, one document per batch: the twin moves, then its old copy goes.
    db.execute('UPDATE archive_metadata SET content_url = %s WHERE "archiveId" = %s',
               (f"db://{shared.user_id}/analysis_data/{shared.archive_id}", shared.archive_id))  # share again
    both = cli("migrate", source, dest, "--dontask", "--batch-size", "1", "--workers", "1")
    assert both.returncode == 0, both.stderr
    assert_all_readable(db, None, [*docs, twin])
    assert all(url.startswith("db2://") for url in urls(db))
    assert db.execute("SELECT count(*) FROM archive_document").fetchone()[0] == 0


def test_one_bad_row_fails_alone_and_the_batch_moves(db, cli, tmp_path):
    docs = anchore_sim.make_docs(14, seed=96, users=("admin",), buckets=("analysis_data",))
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bad = docs[6]
    db.execute("""UPDATE archive_document SET jsondata = 'not*base64!', b64_encoded = true WHERE "archiveId" = %s""",
               (bad.archive_id,))
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("db2"))
    result = cli("migrate", source, dest, "--dontask")
    assert result.returncode == 1
    named = [line for line in result.stderr.splitlines() if "FAILED" in line]
    assert len(named) == 1 and bad.archive_id in named[0] and "not valid base64" in named[0]
    assert "are corrupt at the source" in result.stderr
    assert "still at the source and readable" not in result.stderr
    moved = db.execute("SELECT count(*) FROM archive_metadata WHERE content_url LIKE 'db2://%%'").fetchone()[0]
    assert moved == len(docs) - 1
    assert task_rows(db)[0][:1] == ("failed",)
    assert_all_readable(db, None, [d for d in docs if d is not bad], skip={bad.archive_id})


def spoil_keeping_size(db, doc):
    """The document's stored bytes changed, not their length: only its digest can tell."""
    db.execute("""UPDATE archive_document SET jsondata = translate(jsondata, 'ae', 'ea') WHERE "archiveId" = %s""",
               (doc.archive_id,))


def assert_refused_as_corrupt(db, s3, bucket, result, docs, bad):
    assert result.returncode == 1
    named = [line for line in result.stderr.splitlines() if "FAILED" in line]
    assert len(named) == 1 and bad.archive_id in named[0] and "corrupt at the source: digest mismatch" in named[0]
    assert "are corrupt at the source" in result.stderr
    assert not [key for key in s3.keys(bucket) if bad.archive_id.split(":")[1] in key]  # never stored
    row = db.execute('SELECT content_url FROM archive_metadata WHERE "archiveId" = %s', (bad.archive_id,)).fetchone()
    assert row[0].startswith("db://")  # left where it was
    assert db.execute('SELECT count(*) FROM archive_document WHERE "archiveId" = %s',
                      (bad.archive_id,)).fetchone()[0] == 1
    assert_all_readable(db, s3.client, [d for d in docs if d is not bad], skip={bad.archive_id})


def test_the_servers_content_md5_check_is_the_digest_check_of_documents_sent_as_they_are(db, s3, cli, tmp_path):
    """db→s3 without compression: the metadata's digest goes as Content-MD5
    and the server's check proves the bytes (not hashed here first); a
    document whose bytes do not match it is refused there, and named corrupt.
    Every document held whole (up to 32 MiB by default) is one such PUT."""
    docs = anchore_sim.make_docs(14, seed=97, buckets=("analysis_data",))
    big = anchore_sim.Doc("admin", "analysis_data", "big", b'{"pad": "' + b"x" * (12 * 1024 * 1024) + b'"}')
    docs.append(big)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bad = docs[5]
    digest = db.execute('SELECT digest FROM archive_metadata WHERE "archiveId" = %s', (bad.archive_id,)).fetchone()[0]
    spoil_keeping_size(db, bad)
    bucket = s3.new_bucket()
    with FaultProxy(s3.endpoint) as proxy:
        source = write_config(tmp_path / "a.yaml", section("db"))
        dest = write_config(tmp_path / "b.yaml", section("s3", through_proxy(s3, proxy, bucket)))
        result = cli("migrate", source, dest, "--dontask")
    sent = [headers for method, path, headers, _ in proxy.seen
            if method == "PUT" and bad.archive_id.split(":")[1] in path]
    assert sent and {h.get("Content-MD5") or h.get("content-md5") for h in sent} == {
        base64.b64encode(bytes.fromhex(digest)).decode()}
    big_requests = [(method, path) for method, path, _, _ in proxy.seen if path.split("?")[0].endswith("/big")]
    assert big_requests == [("PUT", big_requests[0][1])] and "?" not in big_requests[0][1]  # one PUT, no parts
    assert_refused_as_corrupt(db, s3, bucket, result, docs, bad)


def test_a_server_that_does_not_check_content_md5_gets_documents_hashed_here(db, s3, cli, tmp_path):
    """A server that stores what it is sent whatever its Content-MD5 cannot be
    the digest check: the probe finds it out, says so, and every document is
    hashed before it is sent, so a corrupt one is still caught and kept."""
    docs = anchore_sim.make_docs(14, seed=98, buckets=("analysis_data",))
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bad = docs[7]
    spoil_keeping_size(db, bad)
    bucket = s3.new_bucket()
    with FaultProxy(s3.endpoint) as proxy:
        proxy.add(Rule("acceptbaddigest", method="PUT", times=None))
        source = write_config(tmp_path / "a.yaml", section("db"))
        dest = write_config(tmp_path / "b.yaml", section("s3", through_proxy(s3, proxy, bucket)))
        result = cli("migrate", source, dest, "--dontask")
        assert proxy.rules[0].fired >= 1  # the probes
    assert "does not check what it is sent" in result.stderr
    assert not [path for method, path, _, _ in proxy.seen
                if method == "PUT" and bad.archive_id.split(":")[1] in path]  # caught before it was sent
    assert_refused_as_corrupt(db, s3, bucket, result, docs, bad)


def test_unverifiable_documents_are_named_and_get_digest_and_size(db, cli, tmp_path):
    docs = anchore_sim.make_docs(8, seed=94)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    blind = docs[:3]
    db.execute('UPDATE archive_metadata SET digest = NULL, size = NULL WHERE "archiveId" = ANY(%s)',
               ([d.archive_id for d in blind],))
    db.execute('UPDATE archive_metadata SET digest = %s WHERE "archiveId" = %s', ("", blind[2].archive_id))  # blank: no digest either
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("db2"))
    dry = cli("migrate", source, dest, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "unverifiable: 3" in dry.stdout and all(d.archive_id in dry.stdout for d in blind)
    result = cli("migrate", source, dest, "--dontask")
    assert result.returncode == 0, result.stderr
    named = [line for line in result.stderr.splitlines() if "UNVERIFIABLE" in line]
    assert sorted(named) == sorted(line for line in named if any(d.archive_id in line for d in blind))
    assert len(named) == 3
    for doc in blind:
        digest, size = db.execute('SELECT digest, size FROM archive_metadata WHERE "archiveId" = %s',
                                  (doc.archive_id,)).fetchone()
        assert digest == anchore_sim.md5hex(doc.content) and size == len(doc.content)
    assert_all_readable(db, None, docs)




def add_row(db, archive_id, url, bucket="analysis_data"):
    db.execute(
        """INSERT INTO archive_metadata (bucket, "archiveId", "userId", "documentName", content_url, is_compressed,
               digest, size, document_metadata, created_at, last_updated, record_state_key, record_state_val)
           VALUES (%s, %s, 'admin', %s, %s, false, NULL, NULL, NULL, 1, 1, 'active', NULL)""",
        (bucket, archive_id, archive_id + ".json", url),
    )


def test_rows_the_run_cannot_move_are_counted_and_keep_it_from_complete(db, cli, tmp_path):
    docs = anchore_sim.make_docs(10, seed=97)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    add_row(db, "no-url-1", None)
    add_row(db, "no-url-2", None)
    add_row(db, "swifty", "swift://anchore/admin/analysis_data/swifty")
    add_row(db, "weird", "ftp://somewhere/admin/analysis_data/weird")
    add_row(db, "elsewhere", "s3://another-bucket/admin/analysis_data/elsewhere")
    add_row(db, "out-of-scope", None, bucket="not_selected")
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("db2"))
    buckets = sorted({d.bucket for d in docs} | {"analysis_data"})
    selection = [f"--bucket={name}" for name in buckets]

    dry = cli("migrate", source, dest, "--dry-run", *selection)
    assert dry.returncode == 0, dry.stderr
    for expected in ("no URL: 2 rows", "unsupported driver: 1 rows", "unknown scheme: 1 rows",
                     "another location: 1 rows", "admin/analysis_data/no-url-1", "swift://anchore/admin",
                     "ftp://somewhere", "s3://another-bucket/admin/analysis_data/elsewhere", "anchore-manager"):
        assert expected in dry.stdout, expected
    assert "out-of-scope" not in dry.stdout  # its bucket is not selected

    result = cli("migrate", source, dest, "--dontask", *selection)
    assert result.returncode == 1
    assert "MUST have this" not in result.stdout  # no "switch your config" while rows are elsewhere
    assert "5 rows in scope are not at the destination" in result.stderr
    assert "no-url-1" in result.stderr and "swift://anchore" in result.stderr
    assert task_rows(db)[0][0] == "failed"
    assert db.execute("SELECT count(*) FROM archive_metadata WHERE content_url LIKE 'db2://%%'").fetchone()[0] == len(docs)

    db.execute("""DELETE FROM archive_metadata WHERE "archiveId" IN ('no-url-1', 'no-url-2', 'swifty', 'weird',
                  'elsewhere')""")
    # analysis_data now has no row at all: naming it would be refused as a misspelled bucket
    again = cli("migrate", source, dest, "--dontask", *[f"--bucket={name}" for name in sorted({d.bucket for d in docs})])
    assert again.returncode == 0, again.stderr
    assert "MUST have this" in again.stdout
    assert [row[0] for row in task_rows(db)] == ["failed", "complete"]


def test_rows_sharing_an_s3_copy_in_one_batch_move_and_it_goes_once(db, s3, cli, tmp_path):
    bucket = s3.new_bucket()
    docs = anchore_sim.make_docs(6, seed=99, users=("admin",), buckets=("analysis_data",))
    anchore_sim.store(db, s3.location(bucket), docs)
    shared = docs[0]
    twin = anchore_sim.Doc("admin", "analysis_data", "sha256:" + "cd" * 32, shared.content)
    share_copy(db, shared.archive_id, twin.archive_id)
    source = write_config(tmp_path / "a.yaml", section("s3", s3.driver_config(bucket)))
    dest = write_config(tmp_path / "b.yaml", section("db"))
    result = cli("migrate", source, dest, "--dontask")
    assert result.returncode == 0, result.stderr
    assert_all_readable(db, s3.client, [*docs, twin])
    assert all(url.startswith("db://") for url in urls(db))
    assert s3.keys(bucket) == []


def test_an_analysis_archive_kept_inside_the_main_stores_prefix_is_left_to_its_own_migration(db, s3, cli, tmp_path):
    """One bucket: the main store at prefix "" and the analysis archive at
    "archive/", so every archive URL begins with the main store's location.
    Moving the main store out of S3 moves only the main store's rows (the
    archive's driver could not read a db:// URL), and the run is complete."""
    bucket = s3.new_bucket()
    main_docs = anchore_sim.make_docs(20, seed=91, users=("admin",), buckets=("analysis_data", "manifest_data"))
    archive_docs = anchore_sim.make_docs(10, seed=92, users=("admin",), buckets=("analysis_archive",))
    anchore_sim.store(db, anchore_sim.Location("s3", s3_client=s3.client, s3_bucket=bucket), main_docs)
    anchore_sim.store(db, anchore_sim.Location("s3", s3_client=s3.client, s3_bucket=bucket, prefix="archive/"),
                      archive_docs)
    source = write_config(tmp_path / "from.yaml", section("s3", s3.driver_config(bucket)),
                          analysis_archive=section("s3", s3.driver_config(bucket, prefix="archive/")))
    dest = write_config(tmp_path / "to.yaml", section("db"))
    result = cli("migrate", source, dest, "--dontask", "--progress", "none")
    assert result.returncode == 0, result.stderr
    assert f"rows stored under s3://{bucket}/archive/ belong to the config's other section" in result.stderr
    assert [row[0] for row in task_rows(db)] == ["complete"]
    moved = {url for url in urls(db) if url.startswith("db://")}
    assert len(moved) == len(main_docs)
    assert all(url.startswith(f"s3://{bucket}/archive/") for url in urls(db) - moved)
    assert len(s3.keys(bucket)) == len(archive_docs)
    assert_all_readable(db, s3.client, main_docs + archive_docs)
