"""The migration history in Anchore's own tables (tasks, archive_migration_tasks).

Rows are written exactly as Anchore writes them, so Anchore's
``anchore-manager objectstorage list-migrations`` shows our runs too.
Timestamps are UTC without a zone, as SQLAlchemy's utcnow() gives them.
"""

import datetime
import os
import socket
import threading
from dataclasses import dataclass

from anchore_objmig import db

UTC_NOW = "timezone('utc', now())"
TASK_TYPE = "archivemigrationtask"


@dataclass(frozen=True)
class TaskRow:
    id: int
    state: str
    started_at: object
    ended_at: object
    from_driver: str
    to_driver: str
    migrated: int
    total: int
    last_updated: object


def executor_id():
    """host:pid:thread:, the form Anchore records."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}:"


def create_task(conn, from_driver, to_driver, total):
    """A running migration task; its id."""
    with db.transaction(conn):
        task_id = conn.execute(
            f"""INSERT INTO tasks (state, created_at, started_at, last_updated, executor_id, type)
                VALUES ('running', {UTC_NOW}, {UTC_NOW}, {UTC_NOW}, %s, %s) RETURNING id""",
            (executor_id(), TASK_TYPE),
        ).fetchone()[0]
        conn.execute(
            """INSERT INTO archive_migration_tasks
                 (id, migrate_from_driver, migrate_to_driver, archive_documents_to_migrate,
                  archive_documents_migrated, online_migration)
               VALUES (%s, %s, %s, %s, 0, NULL)""",
            (task_id, from_driver, to_driver, total),
        )
    return task_id


def add_migrated(conn, task_id, count):
    """Count documents done as they finish, so list-migrations shows live progress."""
    conn.execute(
        "UPDATE archive_migration_tasks SET archive_documents_migrated = archive_documents_migrated + %s WHERE id = %s",
        (count, task_id),
    )
    conn.execute(f"UPDATE tasks SET last_updated = {UTC_NOW} WHERE id = %s", (task_id,))


def finish_task(conn, task_id, state):
    """Close a task: state complete or failed, the previous state kept in last_state."""
    conn.execute(
        f"""UPDATE tasks SET last_state = state, state = %s, ended_at = {UTC_NOW}, last_updated = {UTC_NOW}
            WHERE id = %s""",
        (state, task_id),
    )


def close_running_tasks(conn):
    """Close every migration task still marked running; their ids."""
    rows = conn.execute(
        f"""UPDATE tasks SET last_state = state, state = 'failed', ended_at = {UTC_NOW}, last_updated = {UTC_NOW}
            WHERE type = %s AND state = 'running' RETURNING id""",
        (TASK_TYPE,),
    ).fetchall()
    return sorted(row[0] for row in rows)


def task_state(conn, task_id):
    row = conn.execute("SELECT state::text FROM tasks WHERE id = %s", (task_id,)).fetchone()
    return row[0] if row else None


def list_tasks(conn):
    rows = conn.execute(
        """SELECT t.id, t.state::text, t.started_at, t.ended_at, a.migrate_from_driver, a.migrate_to_driver,
                  a.archive_documents_migrated, a.archive_documents_to_migrate, t.last_updated
           FROM tasks t JOIN archive_migration_tasks a ON a.id = t.id
           WHERE t.type = %s ORDER BY t.id""",
        (TASK_TYPE,),
    ).fetchall()
    return [TaskRow(*row) for row in rows]


def format_table(rows):
    """The history table, in the original's columns."""
    headers = ["id", "state", "start time", "end time", "from", "to", "migrated count", "total to migrate", "last updated"]
    cells = [
        [
            str(row.id),
            row.state or "",
            iso(row.started_at),
            iso(row.ended_at),
            row.from_driver or "",
            row.to_driver or "",
            str(row.migrated if row.migrated is not None else ""),
            str(row.total if row.total is not None else ""),
            iso(row.last_updated),
        ]
        for row in rows
    ]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)).rstrip() for cell in cells]
    return "\n".join(lines)


def as_documents(rows):
    """The history for machines: one dict per task, times in ISO 8601 UTC."""
    return [
        {
            "id": row.id,
            "state": row.state,
            "started_at": iso_utc(row.started_at),
            "ended_at": iso_utc(row.ended_at),
            "from_driver": row.from_driver,
            "to_driver": row.to_driver,
            "migrated": row.migrated,
            "total": row.total,
            "last_updated": iso_utc(row.last_updated),
        }
        for row in rows
    ]


def iso_utc(value):
    """Anchore stores UTC without a zone; say it is UTC."""
    return value.replace(tzinfo=datetime.timezone.utc).isoformat() if value is not None else None


def iso(value):
    return value.isoformat() if value is not None else ""
