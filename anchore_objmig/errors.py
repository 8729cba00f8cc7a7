"""The exceptions that reach the command line, each mapped to an exit status.

Exit status contract (documented in the man page):
  0  everything done
  1  the operation ran and failed for some documents or checks
  2  bad usage or configuration; nothing was changed
  130  interrupted by SIGINT (Ctrl-C); a migration's task is closed as failed
  143  stopped by SIGTERM; a migration's task is closed as failed
"""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


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
