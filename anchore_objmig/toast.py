"""How PostgreSQL compresses the documents this tool writes into it.

A large value written to archive_document or object_storage is compressed by
PostgreSQL itself (TOAST), with the server's `default_toast_compression`:
pglz unless changed. pglz made writing into PostgreSQL the slowest step of a
move into it: COPYing the same 441 MB of documents took 5.4 s with pglz and
3.0 s with lz4 (perf/README.md, row k; 7.0 and 2.1 s in a first
experiment). So the sessions of a run that writes
into PostgreSQL ask for lz4 when the server has it (PostgreSQL 14 and later,
built with lz4, as every packaged build is).

Nothing of Anchore's changes: the tables and columns are not altered, every
value reads back the same through SQL (Anchore, pg_dump and replicas
decompress either method), and values already stored keep theirs. lz4 stores
JSON about 10 % larger than pglz; `--toast-compression server` keeps the
server's default instead.
"""

import logging
from dataclasses import replace

log = logging.getLogger(__name__)

CHOICES = ("lz4", "server")
METHODS = """SELECT enumvals, setting FROM pg_settings WHERE name = 'default_toast_compression'"""


def settle(conn, db_settings, choice, writes_to_db):
    """`db_settings` with the compression the run's sessions ask for: lz4 when
    chosen, the run writes documents into PostgreSQL and the server has it."""
    if choice != "lz4" or not writes_to_db:
        return db_settings
    found = conn.execute(METHODS).fetchone()
    if found is None or "lz4" not in (found[0] or []):
        log.info("PostgreSQL has no lz4 compression here: the documents written into it are compressed with "
                 "its default (%s)", found[1] if found else "pglz")
        return db_settings
    log.info("documents written into PostgreSQL are compressed with lz4 (TOAST), the fastest it has; "
             "--toast-compression server keeps its default (%s)", found[1])
    return replace(db_settings, toast_compression="lz4")
