"""A batch's byte budget (--batch-bytes) counts decoded bytes, not stored bytes.

The worker logs each batch it cuts (with --verbose): its document count and
its first and last document. The tests rebuild each batch's documents from
that, in archive_metadata's key order, and add up their real decoded sizes.
"""

import random
import re

import anchore_sim
from helpers import assert_all_readable, section, write_config

BUDGET = 1024 * 1024
BATCH_LINE = re.compile(r"batch of (\d+) documents from (\S+) to (\S+),")


def docs_of(count, size, seed):
    rng = random.Random(seed)
    return [anchore_sim.Doc("admin", "analysis_data", f"sha256:{n:04d}{seed}",
                            anchore_sim.json_document(rng, size, n)) for n in range(count)]


def key_order(db, scheme):
    """The archiveIds still at `scheme`, in archive_metadata's key order (the order of batches)."""
    return [row[0] for row in db.execute(
        """SELECT "archiveId" FROM archive_metadata WHERE starts_with(content_url, %s)
           ORDER BY bucket, "archiveId", "userId", "documentName" """, (scheme,))]


def batches_from_log(stderr, order):
    """The archiveIds of every batch the worker cut, from its debug lines."""
    batches = []
    for count, first, last in BATCH_LINE.findall(stderr):
        start = order.index(first.rsplit("/", 1)[1])
        batch = order[start:start + int(count)]
        assert batch[-1] == last.rsplit("/", 1)[1]
        batches.append(batch)
    return batches


def assert_within_budget(batches, docs):
    decoded = {doc.archive_id: len(doc.content) for doc in docs}
    assert sorted(a for batch in batches for a in batch) == sorted(decoded)  # every document in one batch
    for batch in batches:
        if len(batch) > 1:  # one document larger than the budget is a batch of its own
            assert sum(decoded[a] for a in batch) <= BUDGET, [decoded[a] for a in batch]


def test_compressed_documents_are_budgeted_by_their_decoded_size(db, s3, cli, tmp_path):
    """Compressed S3 objects of ~300 KB decode to what a db destination holds;
    counted by their stored ~55 KB, some 19 would share a 1 MiB batch (5 MiB decoded)."""
    docs = docs_of(30, 300 * 1024, seed=1)
    bucket = s3.new_bucket()
    anchore_sim.store(db, s3.location(bucket, compress=True), docs)
    stored = [row[0] for row in db.execute("SELECT size FROM archive_metadata WHERE is_compressed")]
    assert len(stored) == 30 and sum(stored) < BUDGET * 2  # stored bytes alone would fit in two batches
    order = key_order(db, "s3://")
    source = write_config(tmp_path / "s3.yaml", section("s3", s3.driver_config(bucket), compress=True))
    dest = write_config(tmp_path / "db.yaml", section("db"))
    result = cli("--verbose", "migrate", source, dest, "--dontask", "--workers", "1", "--batch-bytes", "1MiB")
    assert result.returncode == 0, result.stderr
    assert_within_budget(batches_from_log(result.stderr, order), docs)
    assert_all_readable(db, s3.client, docs)


def test_plain_documents_fill_the_budget_and_rows_without_size_count(db, cli, tmp_path):
    """Uncompressed documents count their own size (batches of several); rows
    without a size (old Anchore versions) are not counted as nothing."""
    docs = docs_of(12, 200 * 1024, seed=2)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    order = key_order(db, "db://")
    source = write_config(tmp_path / "db.yaml", section("db"))
    dest = write_config(tmp_path / "db2.yaml", section("db2"))
    result = cli("--verbose", "migrate", source, dest, "--dontask", "--workers", "1", "--batch-bytes", "1MiB")
    assert result.returncode == 0, result.stderr
    batches = batches_from_log(result.stderr, order)
    assert_within_budget(batches, docs)
    assert max(len(batch) for batch in batches) >= 4  # ~205 KB each: four or five to a 1 MiB batch

    more = docs_of(12, 200 * 1024, seed=3)
    anchore_sim.store(db, anchore_sim.Location("db"), more)
    db.execute("UPDATE archive_metadata SET size = NULL WHERE content_url LIKE 'db://%'")
    order = key_order(db, "db://")
    result = cli("--verbose", "migrate", source, dest, "--dontask", "--workers", "1", "--batch-bytes", "1MiB")
    assert result.returncode == 0, result.stderr
    assert_within_budget(batches_from_log(result.stderr, order), more)
    assert_all_readable(db, None, docs + more)


def test_rows_without_size_are_budgeted_by_their_measured_size(db, cli, tmp_path):
    """Rows with no size (old Anchore versions) of ~3 MiB each in PostgreSQL:
    counted as 1 MiB each, four would share a 4 MiB batch (12 MiB); measured
    (octet_length), each is a batch of its own."""
    docs = docs_of(4, 3 * 1024 * 1024, seed=4)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    db.execute("UPDATE archive_metadata SET size = NULL")
    order = key_order(db, "db://")
    source = write_config(tmp_path / "db.yaml", section("db"))
    dest = write_config(tmp_path / "db2.yaml", section("db2"))
    result = cli("--verbose", "migrate", source, dest, "--dontask", "--workers", "1", "--batch-bytes", "4MiB")
    assert result.returncode == 0, result.stderr
    batches = batches_from_log(result.stderr, order)
    assert sorted(a for batch in batches for a in batch) == sorted(doc.archive_id for doc in docs)
    assert [len(batch) for batch in batches] == [1, 1, 1, 1]
    assert "streaming" not in result.stderr  # ~3 MiB: below the 4 MiB budget, held whole
    assert_all_readable(db, None, docs)


def test_verify_batches_keep_to_the_byte_budget(db, cli, tmp_path):
    """verify holds a batch's documents as migrate does: 40 documents of ~1 MiB
    are three batches under its 32 MiB budget, not one of 40 MiB (500 rows)."""
    docs = docs_of(40, 1024 * 1024, seed=5)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    db.execute("""UPDATE archive_metadata SET size = NULL WHERE "archiveId" = 'sha256:00055'""")  # measured, not 1 MiB
    order = key_order(db, "db://")
    result = cli("--verbose", "verify", write_config(tmp_path / "db.yaml", section("db")))
    assert result.returncode == 0, result.stderr
    batches = batches_from_log(result.stderr, order)
    assert sorted(a for batch in batches for a in batch) == sorted(doc.archive_id for doc in docs)
    assert len(batches) >= 2
    decoded = {doc.archive_id: len(doc.content) for doc in docs}
    assert all(sum(decoded[a] for a in batch) <= 32 * 1024 * 1024 for batch in batches)


def test_s3_rows_without_size_are_measured_with_a_head(db, s3, cli, tmp_path):
    """In S3 too, rows with no size are measured (a HEAD) before their batch is
    cut: ~3 MiB objects are batches of one under a 4 MiB budget, and a ~5 MiB
    one (above the budget, so above the streaming threshold) is streamed."""
    docs = docs_of(4, 3 * 1024 * 1024, seed=6)
    large = docs_of(1, 5 * 1024 * 1024, seed=7)
    bucket = s3.new_bucket()
    anchore_sim.store(db, s3.location(bucket), docs + large)
    db.execute("UPDATE archive_metadata SET size = NULL")
    order = key_order(db, "s3://")
    source = write_config(tmp_path / "s3.yaml", section("s3", s3.driver_config(bucket)))
    dest = write_config(tmp_path / "db.yaml", section("db"))
    result = cli("--verbose", "migrate", source, dest, "--dontask", "--workers", "1", "--batch-bytes", "4MiB")
    assert result.returncode == 0, result.stderr
    batches = batches_from_log(result.stderr, order)
    assert sorted(a for batch in batches for a in batch) == sorted(doc.archive_id for doc in docs + large)
    assert [len(batch) for batch in batches] == [1] * 5
    assert re.findall(r"streaming (\S+) \(size unknown\)", result.stderr) == [f"admin/analysis_data/{large[0].archive_id}"]
    assert_all_readable(db, s3.client, docs + large)
