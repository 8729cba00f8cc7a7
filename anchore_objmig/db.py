"""Connections to Anchore's catalog database, and the migration lock.

``--db-connect`` takes what Anchore's own tooling takes (SQLAlchemy URLs such
as ``postgresql+pg8000://user:pass@host:5432/db``) as well as plain libpq URLs
and keyword strings. The password is never logged: every message that shows
the target goes through ``redacted``.
"""

import contextlib
import logging
import os
import re
import socket
import time
import urllib.parse
from dataclasses import dataclass

import orjson
import psycopg

from anchore_objmig import signals
from anchore_objmig.errors import ConnectError, UsageError

log = logging.getLogger(__name__)

# The per-batch statements take their lists as one JSON text each, unpacked
# by the server: psycopg turns a Python list into an array parameter element
# by element in Python (about 2.5 us each; a 500-row metadata commit took
# 11 ms of client CPU that way, 0.4 ms as JSON written by orjson in C).
TEXT_LIST = "ARRAY(SELECT json_array_elements_text({}::json))"  # a text[] from json_list()


def json_list(values):
    """`values` (str, int, bool, None, or lists of them) as one JSON text parameter."""
    return orjson.dumps(list(values)).decode("utf-8")

# Anchore's anchore-manager takes pg_advisory_lock(2, 1) for a migration; taking
# the same lock makes this tool and the original exclude each other.
MIGRATION_LOCK = (2, 1)
APPLICATION_NAME = "anchore-objmig"
ENV_DB_CONNECT = "ANCHORE_OBJMIG_DB_CONNECT"
# Every session bounds what a frozen or partitioned peer can hold up: a
# transaction left idle (a frozen host) is ended by the server, a lock wait
# gives up, and dead TCP peers are found by keepalives within about a minute.
IDLE_IN_TRANSACTION_SECONDS = 30
LOCK_TIMEOUT_SECONDS = 60
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 15, "keepalives_interval": 5, "keepalives_count": 3}
SERVER_KEEPALIVES = "-c tcp_keepalives_idle=15 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3"
# Greedy to the last "@" of the word: an unencoded "@" in a password must not
# leave its tail in the output.
KEYWORD_STRING = re.compile(r"\s*(\w+\s*=\s*('(?:[^'\\]|\\.)*'|[^\s']*)\s*)+")
BAD_OPTION = re.compile(r"invalid (connection option|\w+ value)|invalid integer value")
QUOTED = re.compile(r'"[^"]*"')  # libpq quotes the text it could not parse: it may hold a password
URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)(\S*)(@)")
KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")


@dataclass(frozen=True)
class DbSettings:
    conninfo: str  # libpq URL or keyword string; may hold a password
    retries: int = 3
    connect_timeout: int = 10
    statement_timeout: float = 0
    sslmode: str | None = None
    sslrootcert: str | None = None
    toast_compression: str | None = None  # default_toast_compression of every session (toast.py), or the server's

    @property
    def display(self):
        return redacted(self.conninfo)


def redacted(text):
    """`text` with any database password replaced by ***."""
    text = URL_PASSWORD.sub(r"\1***\3", str(text))
    return KEYWORD_PASSWORD.sub(r"\1***", text)


def to_conninfo(db_connect):
    """A libpq conninfo from an Anchore/SQLAlchemy style URL or a keyword string."""
    db_connect = (db_connect or "").strip()
    if not db_connect:
        raise UsageError(f"no database given: pass --db-connect URL or set {ENV_DB_CONNECT}")
    if "://" not in db_connect:
        if not KEYWORD_STRING.fullmatch(db_connect):  # e.g. user:password@host with the scheme forgotten
            raise UsageError("--db-connect: expected a postgresql:// URL or a libpq keyword string "
                             "(host=... dbname=...); the value given is neither (not shown: it may hold a password)")
        return db_connect  # a libpq keyword string: host=... dbname=...
    scheme, rest = db_connect.split("://", 1)
    dialect = scheme.split("+", 1)[0].lower()
    if dialect not in ("postgresql", "postgres"):
        raise UsageError(f"--db-connect: unsupported database URL scheme {scheme!r} (expected postgresql://...)")
    return "postgresql://" + encode_password(rest)


def encode_password(rest):
    """user:p@ss@host/db -> user:p%40ss@host/db: SQLAlchemy takes the last "@" as the
    end of the password, libpq the first; percent-encoding makes them agree."""
    if rest.count("@") < 2:
        return rest
    userinfo, host = rest.rsplit("@", 1)
    user, colon, password = userinfo.partition(":")
    return f"{user}{colon}{urllib.parse.quote(password, safe='')}@{host}"


def session_name(role):
    """application_name of a session: who to look for when it blocks others."""
    return f"{APPLICATION_NAME} {role} {socket.gethostname()}:{os.getpid()}"[:63]


def connect(settings, autocommit=False, role="main"):
    """A psycopg connection, retried with backoff while the server is unreachable."""
    # client_encoding UTF8 whatever PGCLIENTENCODING says: documents are read
    # and written as UTF-8 bytes (drivers/db.py), never decoded on the way.
    kwargs = {"connect_timeout": settings.connect_timeout, "application_name": session_name(role),
              "client_encoding": "UTF8", **KEEPALIVES}
    if settings.sslmode:
        kwargs["sslmode"] = settings.sslmode
    if settings.sslrootcert:
        kwargs["sslrootcert"] = settings.sslrootcert
    options = [
        f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_SECONDS * 1000}",
        f"-c lock_timeout={LOCK_TIMEOUT_SECONDS * 1000}",
        SERVER_KEEPALIVES,
    ]
    if settings.statement_timeout:
        options.append(f"-c statement_timeout={int(settings.statement_timeout * 1000)}")
    if settings.toast_compression:
        options.append(f"-c default_toast_compression={settings.toast_compression}")
    kwargs["options"] = " ".join(options)
    delay = 0.5
    for attempt in range(settings.retries + 1):
        try:
            conn = psycopg.connect(settings.conninfo, autocommit=autocommit, **kwargs)
            OUTAGE.back()
            return conn
        except psycopg.ProgrammingError as exc:  # a malformed conninfo: retrying cannot help
            raise UsageError(f"--db-connect: {unquoted(redacted(first_line(exc)))}") from None
        except psycopg.OperationalError as exc:
            problem = redacted(first_line(exc))
            if BAD_OPTION.search(problem):  # a wrong option value is a configuration mistake, not an outage
                raise UsageError(f"--db-connect: {unquoted(problem)}") from None
            if attempt == settings.retries or "password authentication failed" in problem:
                raise ConnectError(f"cannot connect to the database {settings.display}: {problem}") from None
            OUTAGE.away(problem, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10)


class Outage:
    """Says once per process that the database is unreachable, and once that
    it is back: a long outage waited out by every worker and its threads
    must not bury the log in one warning per connection attempt."""

    def __init__(self):
        self.since = None

    def away(self, problem, delay):
        if self.since is None:
            self.since = time.monotonic()
            log.warning("database not reachable (%s); retrying (attempts are logged at debug level until it is back)",
                        problem)
        else:
            log.debug("database still not reachable (%s); retrying in %.1fs", problem, delay)

    def back(self):
        if self.since is not None:
            log.info("database reachable again after %.0fs", time.monotonic() - self.since)
            self.since = None


OUTAGE = Outage()


def unquoted(text):
    """libpq's message with the text it quotes (part of the connection string) left out."""
    return QUOTED.sub('"…"', text)


def first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def require_anchore_tables(conn):
    """Refuse to run against a database that has no Anchore object store."""
    row = conn.execute("SELECT to_regclass('archive_metadata') IS NOT NULL").fetchone()
    if not row[0]:
        raise UsageError("the database has no archive_metadata table: is --db-connect the Anchore catalog database?")


def try_migration_lock(conn):
    """Take Anchore's migration lock without waiting; False if someone holds it."""
    return conn.execute("SELECT pg_try_advisory_lock(%s, %s)", MIGRATION_LOCK).fetchone()[0]


def session_started(conn):
    """When this session started: with its pid, what names it among all sessions ever."""
    return conn.execute("SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()").fetchone()[0]


def release_migration_lock(conn):
    conn.execute("SELECT pg_advisory_unlock(%s, %s)", MIGRATION_LOCK)


def blockers(conn, backend_pid):
    """(application_name, client address, state, seconds in that state) of the
    sessions that session `backend_pid` is waiting for."""
    return conn.execute(
        """SELECT coalesce(nullif(a.application_name, ''), 'pid ' || a.pid), coalesce(host(a.client_addr), 'local'),
                  coalesce(a.state, '?'), coalesce(extract(epoch FROM now() - a.state_change), 0)::int
           FROM pg_stat_activity a WHERE a.pid = ANY(pg_blocking_pids(%s))""",
        (backend_pid,),
    ).fetchall()


class Reconnecting:
    """One autocommit connection, opened again when it was lost."""

    def __init__(self, settings, role="main"):
        self.settings, self.role, self._conn = settings, role, None

    @property
    def conn(self):
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.settings, autocommit=True, role=self.role)
        return self._conn

    def close(self):
        close_quietly(self._conn)
        self._conn = None


@contextlib.contextmanager
def transaction(conn):
    """`conn.transaction()` with SIGINT and SIGTERM held back until it has
    committed or rolled back (see signals.py): a stop never lands inside
    psycopg's transaction bookkeeping."""
    with signals.deferred(), conn.transaction() as tx:
        yield tx


def close_quietly(conn):
    """Close a connection that may already be broken; nothing to report either way."""
    if conn is not None:
        try:
            conn.close()
        except psycopg.Error:
            pass
