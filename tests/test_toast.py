"""Documents written into PostgreSQL are compressed with lz4 (TOAST) when the
server has it, and with the server's default under --toast-compression server;
either way Anchore reads them back byte for byte (see anchore_objmig/toast.py)."""

import os

import pytest

import anchore_sim
from helpers import assert_all_readable, section, write_config

# Values PostgreSQL compresses: text well above its 2 kB TOAST threshold, repetitive as JSON is.
DOCS = [anchore_sim.Doc("admin", "analysis_data", f"sha256:{n:064x}",
                        b'{"packages": [' + b", ".join(b'{"name": "pkg-%d", "version": "1.%d"}' % (i, n)
                                                       for i in range(2000 + 300 * n)) + b"]}")
        for n in range(6)]


def methods(db, table, column):
    """{compression method: rows} of the values stored in `table`.`column`."""
    return dict(db.execute(f"SELECT pg_column_compression({column}), count(*) FROM {table} GROUP BY 1").fetchall())


@pytest.mark.parametrize("choice, method", [(None, "lz4"), ("server", "pglz")])
def test_documents_moved_into_the_db_driver_are_compressed_as_chosen(db, s3, cli, tmp_path, choice, method):
    bucket = s3.new_bucket()
    anchore_sim.store(db, s3.location(bucket), DOCS)
    source = write_config(tmp_path / "a.yaml", section("s3", s3.driver_config(bucket)))
    dest = write_config(tmp_path / "b.yaml", section("db"))
    extra = ["--toast-compression", choice] if choice else []
    result = cli("migrate", source, dest, "--dontask", "--workers", "1", *extra)
    assert result.returncode == 0, result.stderr
    assert methods(db, "archive_document", "jsondata") == {method: len(DOCS)}
    assert_all_readable(db, s3.client, DOCS)
    assert ("compressed with lz4" in result.stderr) == (choice is None)


def test_documents_moved_into_db2_and_streamed_ones_are_compressed_with_lz4(db, s3, cli, tmp_path):
    anchore_sim.store(db, anchore_sim.Location("db"), DOCS)
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("db2"))
    # Half the documents above the streaming threshold: they take the staged COPY path.
    env = {"OBJMIG_STREAM_THRESHOLD": str(sorted(len(d.content) for d in DOCS)[2])}
    result = cli("migrate", source, dest, "--dontask", "--workers", "1", env=env)
    assert result.returncode == 0, result.stderr
    assert "streaming" in result.stderr
    assert methods(db, "object_storage", "content") == {"lz4": len(DOCS)}
    assert_all_readable(db, s3.client, DOCS)
