"""The `localfs` driver: one file per document under archive_data_dir."""

import concurrent.futures
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor

from anchore_objmig.drivers.base import Driver, NotFound
from anchore_objmig.errors import StorageError


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
        futures = [self.executor().submit(write_one, item, self.context.check_fence) for item in items]

        def wait():
            concurrent.futures.wait(futures)  # all of them, even when one raises (a lost lease)
            return {item.url: future.result() for item, future in zip(items, futures) if future.result()}

        return wait

    def delete_many(self, urls):
        results = self.executor().map(delete_one, urls)
        return {url: error for url, error in zip(urls, results) if error}

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


def write_one(item, check_fence=lambda: None):
    """Write to a temporary file, fsync, then rename: a reader never sees half a file.
    The rename is what a reader sees, so the write fence is checked right before it."""
    path = path_of(item.url)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".objmig-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(item.stored.data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(temporary, 0o644)
            check_fence()
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
        # The rename (and any new directory) is only durable once the
        # directories are synced; the source copy is deleted after this.
        sync_directories(os.path.dirname(path), item.url)
    except OSError as exc:
        return StorageError(f"cannot write {item.url}: {exc.strerror}")
    return None


def sync_directories(directory, url):
    """fsync `directory` and its parents up to the archive's md5(userId) level."""
    for _ in range(3):  # {md5(id)[:2]}, {bucket}, {md5(user)}: what makedirs may have made
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        directory = os.path.dirname(directory)


def delete_one(url):
    try:
        os.unlink(path_of(url))
    except FileNotFoundError:
        return None  # already gone: the goal of a delete
    except OSError as exc:
        return StorageError(f"cannot delete {url}: {exc.strerror}")
    return None
