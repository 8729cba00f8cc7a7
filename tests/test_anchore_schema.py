"""The test database is as strict as Anchore's, and the tool sets every value
Anchore's own writers set (nothing is left to a server-side default)."""

import anchore_sim
from helpers import section, write_config

KEYS = {
    "archive_metadata": ("bucket", "archiveId", "userId", "documentName"),
    "archive_document": ("bucket", "archiveId", "userId", "documentName"),
    "object_storage": ("userId", "bucket", "key", "version"),
}
COLUMNS = {  # as ../shared/anchore-format.md lists them
    "archive_metadata": {"bucket": "character varying", "archiveId": "character varying",
                         "userId": "character varying", "documentName": "character varying",
                         "content_url": "character varying", "is_compressed": "boolean",
                         "digest": "character varying", "size": "bigint", "document_metadata": "character varying",
                         "created_at": "integer", "last_updated": "integer",
                         "record_state_key": "character varying", "record_state_val": "character varying"},
    "archive_document": {"bucket": "character varying", "archiveId": "character varying",
                         "userId": "character varying", "documentName": "character varying",
                         "created_at": "integer", "last_updated": "integer",
                         "record_state_key": "character varying", "record_state_val": "character varying",
                         "jsondata": "character varying", "b64_encoded": "boolean"},
    "object_storage": {"userId": "character varying", "bucket": "character varying", "key": "character varying",
                       "version": "character varying", "object_metadata": "character varying", "content": "bytea",
                       "created_at": "integer", "last_updated": "integer"},
}


def test_the_test_schema_is_anchores_exactly(db):
    for table, columns in COLUMNS.items():
        found = {name: (kind, nullable, default) for name, kind, nullable, default in db.execute(
            """SELECT column_name, data_type, is_nullable, column_default FROM information_schema.columns
               WHERE table_name = %s""", (table,))}
        assert {name: kind for name, (kind, _, _) in found.items()} == columns, table
        for name, (_, nullable, default) in found.items():
            assert default is None, f"{table}.{name} has a server-side default {default}"
            assert (nullable == "NO") == (name in KEYS[table]), f"{table}.{name} nullable={nullable}"
        primary = [row[0] for row in db.execute(
            """SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid
                   AND a.attnum = ANY(i.indkey)
               WHERE i.indrelid = %s::regclass AND i.indisprimary ORDER BY array_position(i.indkey, a.attnum)""",
            (table,))]
        assert tuple(primary) == KEYS[table], table


def test_rows_the_tool_writes_carry_every_value_anchore_sets(db, cli, tmp_path):
    docs = anchore_sim.make_docs(12, seed=98, binary_share=0.3)
    anchore_sim.store(db, anchore_sim.Location("db2"), docs)
    db2 = write_config(tmp_path / "a.yaml", section("db2"))
    plain = write_config(tmp_path / "b.yaml", section("db"))
    result = cli("migrate", db2, plain, "--dontask")
    assert result.returncode == 0, result.stderr
    rows = db.execute(
        """SELECT "archiveId", "documentName", record_state_key, b64_encoded, created_at, last_updated
           FROM archive_document""").fetchall()
    assert len(rows) == len(docs)
    for archive_id, name, state, b64, created, updated in rows:
        assert name == archive_id + ".json" and state == "active" and b64 is not None
        assert created and updated
    assert {row[3] for row in rows} == {True, False}  # the binary documents went base64

    back = cli("migrate", plain, db2, "--dontask")
    assert back.returncode == 0, back.stderr
    rows = db.execute("SELECT version, object_metadata, created_at, last_updated FROM object_storage").fetchall()
    assert len(rows) == len(docs)
    assert all(version == "" and meta is None and created and updated for version, meta, created, updated in rows)
    for state, last_state, created, started, ended, updated, executor, kind in db.execute(
            "SELECT state::text, last_state::text, created_at, started_at, ended_at, last_updated, executor_id, type "
            "FROM tasks"):
        assert state == "complete" and last_state == "running" and kind == "archivemigrationtask"
        assert created and started and ended and updated and executor
    anchore_sim.read_all(db)
