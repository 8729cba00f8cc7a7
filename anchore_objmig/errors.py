"""The exceptions that reach the command line, each mapped to an exit status.

Exit status contract (documented in the man page):
  0  everything done
  1  the operation ran and failed for some documents or checks
  2  bad usage or configuration; nothing was changed
  130 interrupted (SIGINT)
"""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class ObjmigError(Exception):
    """An error the operator can act on; its message is one line."""

    exit_status = EXIT_FAILED


class UsageError(ObjmigError):
    """Bad command line, configuration or environment; nothing was changed."""

    exit_status = EXIT_USAGE


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
