"""Planning at scale: how long cutting N archive_metadata rows into shards takes.

Starts its own PostgreSQL (scripts/devservers.py), fills archive_metadata
with N rows over A accounts inside PostgreSQL (generate_series: no document
bytes, planning reads only the metadata), then times plan.cut_shards, one
batch query per shard position (first, middle, last), and the check a
deleting run makes per batch of which old copies no other row needs (exact:
a scan of archive_metadata; noted: against the shared copies the run noted
at its start), and stops the server.

    .venv/bin/python perf/plan_scale.py --rows 1000000 --accounts 300
"""

import argparse
import os
import sys
import time

import psycopg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]

import anchore_sim  # noqa: E402
import devservers  # noqa: E402
from anchore_objmig import integrity, ledger, plan  # noqa: E402
from anchore_objmig.config import StoreConfig  # noqa: E402
from anchore_objmig.drivers import DriverContext, make_driver  # noqa: E402

FILL = """
INSERT INTO archive_metadata (bucket, "archiveId", "userId", "documentName", content_url, is_compressed, digest,
                              size, document_metadata, created_at, last_updated, record_state_key, record_state_val)
SELECT b, a, u, a || '.json', 'db://' || u || '/' || b || '/' || a, false, md5(a), 20000 + n %% 20000, NULL,
       1, 1, 'active', NULL
FROM (SELECT n, 'sha256:' || encode(sha256(n::text::bytea), 'hex') AS a,
             'account' || lpad((n %% %(accounts)s)::text, 4, '0') AS u,
             (ARRAY['analysis_data','manifest_data','image_content_data','vulnerability_scan'])[1 + n %% 4] AS b
      FROM generate_series(1, %(rows)s) n) s
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--accounts", type=int, default=300)
    parser.add_argument("--shard-size", type=int, default=plan.DEFAULT_SHARD_DOCUMENTS)
    args = parser.parse_args()
    server = devservers.PostgresServer().start()
    try:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            anchore_sim.apply_schema(conn)
            started = time.monotonic()
            conn.execute(FILL, {"rows": args.rows, "accounts": args.accounts})
            conn.execute("VACUUM ANALYZE archive_metadata")
            print(f"filled {args.rows} rows over {args.accounts} accounts in {time.monotonic() - started:.1f}s")
            context = DriverContext()
            source = make_driver(StoreConfig("x", "k", "db", {}), context)
            dest = make_driver(StoreConfig("x", "k", "db2", {}), context)
            where = plan.source_filter(source, dest)
            started = time.monotonic()
            shards = plan.cut_shards(conn, where, args.shard_size)
            print(f"cut_shards: {len(shards)} shards in {time.monotonic() - started:.2f}s")
            for label, shard in (("first", shards[0]), ("middle", shards[len(shards) // 2]), ("last", shards[-1])):
                started = time.monotonic()
                batch = next(plan.shard_rows(conn, where, shard, 500))
                print(f"batch of {len(batch)} from the {label} shard: {(time.monotonic() - started) * 1000:.1f} ms")
            time_delete_checks(conn, shards, batch)
    finally:
        server.stop()


def time_delete_checks(conn, shards, batch):
    """The per-batch 'does another row still point at these copies' check, both ways."""
    ledger.ensure_schema(conn)
    manifest = {"source": {"location": "db://"}, "dest": {"location": "db2://"}, "buckets": None,
                "lease_seconds": 60, "write_grace_seconds": 0, "delete_source": False}
    ledger.create_run(conn, 1, manifest, shards, 0, None)
    started = time.monotonic()
    integrity.note_shared_copies(conn, 1)
    print(f"noting the shared copies at the run's start: {time.monotonic() - started:.2f}s")
    urls = [row[4] for row in batch]  # content_url
    for label, task_id in (("exact", None), ("noted", 1)):
        started = time.monotonic()
        for _ in range(5):
            integrity.unreferenced(conn, urls, task_id)
        print(f"delete check for a batch of {len(urls)}, {label}: {(time.monotonic() - started) * 200:.1f} ms")


if __name__ == "__main__":
    main()
