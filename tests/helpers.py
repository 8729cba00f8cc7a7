"""Helpers the tests share: config files, read-back checks, task rows."""

import yaml

import anchore_sim


def section(driver="db", config=None, compress=False, min_size_kbytes=100):
    return {
        "compression": {"enabled": compress, "min_size_kbytes": min_size_kbytes},
        "storage_driver": {"name": driver, "config": config or {}},
    }


def write_config(path, object_store=None, analysis_archive=None, raw=None):
    """An Anchore config.yaml holding only services.catalog (enough for the tool)."""
    if raw is not None:
        path.write_text(raw)
        return str(path)
    catalog = {}
    if object_store is not None:
        catalog["object_store"] = object_store
    if analysis_archive is not None:
        catalog["analysis_archive"] = {"enabled": True, **analysis_archive}
    path.write_text(yaml.safe_dump({"services": {"catalog": catalog}}))
    return str(path)


def assert_all_readable(conn, s3_client, expected, skip=()):
    """Every document reads back exactly as Anchore reads it, and equals what was stored.

    `skip`: archiveIds of documents a test broke on purpose, left out of the read.
    """
    documents = anchore_sim.read_all(conn, s3_client, skip=set(skip))
    wanted = {(d.user_id, d.bucket, d.archive_id): d.content for d in expected}
    assert set(documents) == set(wanted)
    for key, content in wanted.items():
        assert documents[key] == content, key
    return documents


def through_proxy(s3, proxy, bucket, **extra):
    """An s3 driver config that reaches the server through a tests/faultproxy.py proxy."""
    config = s3.driver_config(bucket, **extra)
    config["url"] = proxy.endpoint
    return config


def urls(conn):
    return {row[0] for row in conn.execute("SELECT content_url FROM archive_metadata")}


def task_rows(conn):
    return conn.execute(
        """SELECT t.state::text, t.last_state::text, a.migrate_from_driver, a.migrate_to_driver,
                  a.archive_documents_migrated, a.archive_documents_to_migrate, t.ended_at IS NOT NULL
           FROM tasks t JOIN archive_migration_tasks a USING (id) ORDER BY t.id"""
    ).fetchall()
