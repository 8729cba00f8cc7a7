"""The `localfs` driver: one file per document under archive_data_dir.

A document is written to a temporary file beside its final name, fsynced,
renamed into place, and the directories up to archive_data_dir are fsynced,
so the new name survives a power cut. A killed write leaves its temporary
file (named after its host and process); the next run removes those whose
writer is gone.
"""

import concurrent.futures
import logging
import os
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from anchore_objmig.drivers.base import Driver, NotFound
from anchore_objmig.errors import StorageError
from anchore_objmig.faults import crash_point

log = logging.getLogger(__name__)

TEMP_PREFIX = ".objmig-"
RUN_MARKER = ".anchore-objmig-run"  # a running migration's token (Driver.write_run_marker)
FOREIGN_TEMP_AGE = 3600  # seconds: a temporary file of another host's writer this old is abandoned


class LocalFsDriver(Driver):
    name = "localfs"
    scheme = "file"
    key_layout = "md5"
    summary = "files under archive_data_dir"

    @classmethod
    def validate(cls, store):
        directory = store.driver_config.get("archive_data_dir")
        if not isinstance(directory, str) or not directory.strip():
            raise store.error("archive_data_dir", "required for the localfs driver")
        if not os.path.isabs(directory):
            raise store.error("archive_data_dir", "must be an absolute path")

    def __init__(self, store, context):
        super().__init__(store, context)
        self.directory = os.path.normpath(store.driver_config["archive_data_dir"])
        self.pool = None

    @property
    def url_base(self):
        return f"file://{self.directory.rstrip('/')}/"

    def check_access(self, write, create=True):
        if write and create:
            os.makedirs(self.directory, exist_ok=True)
        if write and not create and not os.path.isdir(self.directory):
            return  # made once the operator confirms
        if not os.path.isdir(self.directory):
            raise StorageError(f"localfs archive_data_dir {self.directory} does not exist")
        if write and not os.access(self.directory, os.W_OK | os.X_OK):
            raise StorageError(f"localfs archive_data_dir {self.directory} is not writable")

    def executor(self):
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.context.io_threads, thread_name_prefix="localfs")
        return self.pool

    def read_many(self, urls):
        return dict(zip(urls, self.executor().map(read_one, urls)))

    def write_many(self, items):
        return self.submit_writes(items)()

    def submit_writes(self, items):
        futures = [self.executor().submit(write_one, item, self.directory, self.context.check_fence) for item in items]

        def wait():
            concurrent.futures.wait(futures)  # all of them, even when one raises (a lost lease)
            return {item.url: future.result() for item, future in zip(items, futures) if future.result()}

        return wait

    def delete_many(self, urls):
        results = self.executor().map(delete_one, urls)
        return {url: error for url, error in zip(urls, results) if error}

    def marker_path(self):
        return os.path.join(self.directory, RUN_MARKER)

    def write_run_marker(self, token):
        temporary = f"{self.marker_path()}.{os.getpid()}"
        try:
            os.makedirs(self.directory, exist_ok=True)
            with open(temporary, "w", encoding="ascii") as handle:
                handle.write(token)
            os.replace(temporary, self.marker_path())
        except OSError as exc:
            raise StorageError(f"cannot write {self.marker_path()}: {exc.strerror or exc}") from None

    def read_run_marker(self):
        try:
            with open(self.marker_path(), encoding="ascii") as handle:
                return handle.read().strip()
        except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
            return None

    def remove_run_marker(self):
        try:
            os.unlink(self.marker_path())
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove %s (the run's marker): %s", self.marker_path(), exc.strerror or exc)

    def clean_up_before_run(self, conn):
        removed = remove_abandoned_temporaries(self.directory)
        if removed:
            log.info("removed %d temporary files left in %s by interrupted writes", removed, self.directory)

    def clean_up_after_run(self, conn, before):
        self.clean_up_before_run(conn)  # only files whose writer is dead (or silent for long) go

    def close(self):
        if self.pool:
            self.pool.shutdown()


def path_of(url):
    return url[len("file://"):]


def read_one(url):
    try:
        with open(path_of(url), "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return NotFound(f"no file at {url}")
    except OSError as exc:
        return StorageError(f"cannot read {url}: {exc.strerror}")


def temp_prefix():
    """.objmig-{host}.{pid}.: whose write a temporary file is, for the clean-up."""
    return f"{TEMP_PREFIX}{socket.gethostname()}.{os.getpid()}."


def write_one(item, root, check_fence=lambda: None):
    """Write to a temporary file, fsync, then rename: a reader never sees half a file.
    The rename is what a reader sees, so the write fence is checked right before it."""
    path = path_of(item.url)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=temp_prefix())
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(item.stored.data)
                handle.flush()
                crash_point("localfs-write")
                os.fsync(handle.fileno())
            os.chmod(temporary, 0o644)
            check_fence()
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
        # The rename (and any new directory) is only durable once the
        # directories are synced; the source copy is deleted after this.
        sync_directories(os.path.dirname(path), root)
    except OSError as exc:
        return StorageError(f"cannot write {item.url}: {exc.strerror}")
    return None


def sync_directories(directory, root):
    """fsync `directory` and each parent up to and including `root`
    (archive_data_dir): any of them may have just got a new entry."""
    root = os.path.normpath(root)
    directory = os.path.normpath(directory)
    while True:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        parent = os.path.dirname(directory)
        if directory == root or parent == directory or not directory.startswith(root):
            return
        directory = parent


def abandoned(name, now, mtime):
    """Whether a temporary file's writer is gone: a dead process of this host,
    or any writer if the file has not changed for FOREIGN_TEMP_AGE."""
    if now - mtime > FOREIGN_TEMP_AGE:
        return True
    owner = name[len(TEMP_PREFIX):].split(".")
    if len(owner) < 3 or ".".join(owner[:-2]) != socket.gethostname() or not owner[-2].isdigit():
        return False
    try:
        os.kill(int(owner[-2]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, someone else's
    return False


def remove_abandoned_temporaries(root):
    """Remove temporary files of killed writes under `root`; how many."""
    removed = 0
    now = time.time()
    for directory, _, files in os.walk(root):
        for name in files:
            if not name.startswith(TEMP_PREFIX):
                continue
            path = os.path.join(directory, name)
            try:
                if abandoned(name, now, os.stat(path).st_mtime):
                    os.unlink(path)
                    removed += 1
            except FileNotFoundError:
                continue  # its writer finished or removed it meanwhile
    return removed


def delete_one(url):
    try:
        os.unlink(path_of(url))
    except FileNotFoundError:
        return None  # already gone: the goal of a delete
    except OSError as exc:
        return StorageError(f"cannot delete {url}: {exc.strerror}")
    return None
