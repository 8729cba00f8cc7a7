"""The storage drivers, by the name a config's storage_driver.name gives them."""

import difflib
from dataclasses import dataclass, field

from anchore_objmig.drivers.base import DocRow, Driver, NotFound, WriteItem
from anchore_objmig.drivers.db import DbDriver
from anchore_objmig.drivers.db2 import Db2Driver
from anchore_objmig.drivers.localfs import LocalFsDriver
from anchore_objmig.drivers.s3 import S3Driver
from anchore_objmig.errors import ConfigError

DRIVERS = {driver.name: driver for driver in (DbDriver, Db2Driver, S3Driver, LocalFsDriver)}
# Known to Anchore but not to this tool: refused with a clear message.
UNSUPPORTED = {"swift": "the swift driver (OpenStack Swift) is not supported by anchore-objmig"}
# Documents held whole (up to 32 MiB, streaming.THRESHOLD) go up in one PUT: its
# Content-MD5 can be the row's digest, so they are not hashed here (s3.py).
DEFAULT_MULTIPART_THRESHOLD = 32 * 1024 * 1024

__all__ = ["DEFAULT_MULTIPART_THRESHOLD", "DRIVERS", "DocRow", "Driver", "DriverContext", "NotFound", "WriteItem", "make_driver", "validate_store"]


@dataclass
class DriverContext:
    """What drivers share inside one process: the database connection and
    the I/O settings."""

    db_settings: object = None  # anchore_objmig.db.DbSettings
    io_threads: int = 8
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD
    # The worker's write fence (worker.Fence): checked right before every
    # request that changes a network backend; None outside a migration.
    fence: object = None
    _connection: object = field(default=None, repr=False)
    _reader: object = field(default=None, repr=False)

    def check_fence(self):
        """Raise ledger.LeaseLost if this process may no longer write."""
        if self.fence is not None:
            self.fence.check()

    def db_connection(self):
        """The process's autocommit connection; `with db.transaction(conn)` scopes work.
        One that broke is replaced."""
        from anchore_objmig import db

        if self._connection is not None and self._connection.broken:
            db.close_quietly(self._connection)
        if self._connection is None or self._connection.closed:
            self._connection = db.connect(self.db_settings, autocommit=True, role="worker")
        return self._connection

    def reader_connection(self):
        """A second autocommit connection, for reading a streamed document in
        slices while the first may be writing one with COPY. One that broke (a
        server restart, a terminated backend) is replaced."""
        from anchore_objmig import db

        if self._reader is not None and self._reader.broken:
            db.close_quietly(self._reader)
        if self._reader is None or self._reader.closed:
            self._reader = db.connect(self.db_settings, autocommit=True, role="reader")
        return self._reader

    def close(self):
        for conn in (self._connection, self._reader):
            if conn is not None and not conn.closed:
                conn.close()


def driver_class(store):
    name = store.driver_name
    if name in UNSUPPORTED:
        raise ConfigError(store.path, f"{store.key}.storage_driver.name", UNSUPPORTED[name])
    if name not in DRIVERS:
        known = ", ".join(sorted(DRIVERS))
        # Echo the name only when it is a near miss of a driver's (an access key
        # ID typed into the wrong key also "looks like a name").
        near = difflib.get_close_matches(str(name), [*DRIVERS, *UNSUPPORTED], n=1, cutoff=0.6)
        shown = f" {name!r} (did you mean {near[0]}?)" if near and len(str(name)) <= 12 else ""
        raise ConfigError(store.path, f"{store.key}.storage_driver.name", f"unknown driver{shown} (known: {known})")
    return DRIVERS[name]


def validate_store(store):
    driver_class(store).validate(store)


def make_driver(store, context):
    return driver_class(store)(store, context)
