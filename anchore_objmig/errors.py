"""The exceptions that reach the command line, each mapped to an exit status.

Exit status contract (the same table is in --help, the man page and README):
  0    everything done
  1    the operation ran and failed for some documents or checks
  2    bad usage or configuration; nothing was changed
  3    could not connect to or authenticate with the database or S3; nothing was changed
  130  interrupted by SIGINT (Ctrl-C); a migration's task is closed as failed
  143  stopped by SIGTERM; a migration's task is closed as failed
"""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONNECT = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

EXIT_TABLE = (
    (EXIT_OK, "everything done"),
    (EXIT_FAILED, "the operation ran and failed for some documents or checks (named on stderr)"),
    (EXIT_USAGE, "bad usage or configuration; nothing was changed"),
    (EXIT_CONNECT, "could not connect to or authenticate with the database or S3; nothing was changed"),
    (EXIT_SIGINT, "interrupted by SIGINT (Ctrl-C); rerun the same command to finish"),
    (EXIT_SIGTERM, "stopped by SIGTERM; rerun the same command to finish"),
)
EXIT_INTERRUPTED = EXIT_SIGINT  # 128 + SIGINT, as shells report it


class ObjmigError(Exception):
    """An error the operator can act on; its message is one line."""

    exit_status = EXIT_FAILED


class UsageError(ObjmigError):
    """Bad command line, configuration or environment; nothing was changed."""

    exit_status = EXIT_USAGE


class ConnectError(ObjmigError):
    """The database or S3 could not be reached, or refused our credentials."""

    exit_status = EXIT_CONNECT


class ConfigError(UsageError):
    """A configuration file problem, naming the file and the key."""

    def __init__(self, path, key, problem):
        self.path, self.key, self.problem = path, key, problem
        where = f"{path}: {key}: " if key else f"{path}: "
        super().__init__(where + problem)


class OperationFailed(ObjmigError):
    """The operation ran but did not complete for everything."""


class StorageError(ObjmigError):
    """A backend refused or failed an operation (one document or a whole batch)."""


class Interrupted(ObjmigError):
    """The operator pressed Ctrl-C; the message says what state was left."""

    exit_status = EXIT_INTERRUPTED


class StoppedWhilePlanning(ObjmigError):
    """SIGINT or SIGTERM after the task was opened, before any work: the
    task is closed; exit with the signal's status."""

    def __init__(self, message, exit_status):
        super().__init__(message)
        self.exit_status = exit_status


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt is for SIGINT
    (a BaseException too, so no `except Exception` swallows it)."""
