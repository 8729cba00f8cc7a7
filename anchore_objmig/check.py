"""The `check` command: prove a configuration can store, fetch and delete.

As the original does: a test document of user `test` in logical bucket
`anchorecliconfigtest`, id `cliconfigtest` (or `cliconfigtest2` when that one
exists; refused when both do), written with its metadata row, read back and
compared, deleted, and confirmed gone.
"""

import datetime
import logging
import time

import orjson

from anchore_objmig import codec, db
from anchore_objmig.config import load_store_config
from anchore_objmig.drivers import DriverContext, NotFound, WriteItem, make_driver
from anchore_objmig.errors import EXIT_OK, ObjmigError

log = logging.getLogger(__name__)

TEST_USER = "test"
TEST_BUCKET = "anchorecliconfigtest"
TEST_IDS = ("cliconfigtest", "cliconfigtest2")

INSERT_METADATA = """
INSERT INTO archive_metadata (bucket, "archiveId", "userId", "documentName", content_url, is_compressed,
                              digest, size, created_at, last_updated, record_state_key)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 'active')"""
SELECT_METADATA = """SELECT content_url, is_compressed, digest FROM archive_metadata
                     WHERE bucket = %s AND "archiveId" = %s AND "userId" = %s"""
DELETE_METADATA = 'DELETE FROM archive_metadata WHERE bucket = %s AND "archiveId" = %s AND "userId" = %s'


def free_test_id(conn):
    for archive_id in TEST_IDS:
        if conn.execute(SELECT_METADATA, (TEST_BUCKET, archive_id, TEST_USER)).fetchone() is None:
            return archive_id
    raise ObjmigError(
        f"test documents {' and '.join(TEST_IDS)} of user {TEST_USER} in bucket {TEST_BUCKET} both exist "
        "(left by earlier checks?): remove them before checking again"
    )


def run(config_path, analysis_archive, db_settings):
    store = load_store_config(config_path, analysis_archive)
    log.info("using config file %s (%s)", config_path, store.key)
    context = DriverContext(db_settings)
    driver = make_driver(store, context)
    conn = db.connect(db_settings, autocommit=True)
    try:
        db.require_anchore_tables(conn)
        driver.check_access(write=True)
        archive_id = free_test_id(conn)
        log.info("creating test document user_id=%s bucket=%s archive_id=%s at %s",
                 TEST_USER, TEST_BUCKET, archive_id, driver.describe())
        payload = orjson.dumps({"test": f"clitesting at {datetime.datetime.now(datetime.timezone.utc).isoformat()}"})
        try:
            url = store_document(conn, driver, store, archive_id, payload)
            log.info("checking document fetch")
            fetched = fetch_document(conn, driver, archive_id)
            if fetched != payload:
                raise ObjmigError(f"check failed: the document read back from {url} differs from what was written")
        finally:
            log.info("removing test document")
            remove_document(conn, driver, archive_id)
        confirm_gone(conn, driver, archive_id, url)
        report_incomplete_uploads(driver)
        log.info("object store config check completed successfully")
        print(f"check passed: {config_path} ({store.key}, driver {store.driver_name}) can store, fetch and delete")
        return EXIT_OK
    finally:
        driver.close()
        conn.close()
        context.close()


def report_incomplete_uploads(driver):
    """S3: incomplete multipart uploads under the prefix hold storage nobody sees."""
    listing = getattr(driver, "incomplete_uploads", None)
    if listing is None:
        return
    try:
        uploads = listing()
    except Exception as exc:  # noqa: BLE001 - a report, not a check of the config
        log.warning("could not list incomplete multipart uploads: %s", str(exc).splitlines()[0] if str(exc) else exc)
        return
    if uploads:
        print(f"note: {len(uploads)} incomplete multipart uploads under {driver.url_base} (e.g. {uploads[0][0]}): "
              "storage held by interrupted uploads; the next migrate into this location aborts those of its "
              "documents, or abort them with your S3 tools")
    else:
        print(f"no incomplete multipart uploads under {driver.url_base}")


def store_document(conn, driver, store, archive_id, payload):
    stored = codec.encode(payload, store.compression_enabled and driver.supports_compression, store.compression_threshold)
    url = driver.url_for(TEST_USER, TEST_BUCKET, archive_id)
    errors = driver.write_many([WriteItem(url, TEST_USER, TEST_BUCKET, archive_id, stored)])
    if errors:
        raise ObjmigError(f"check failed: cannot write the test document: {errors[url]}")
    now = int(time.time())
    with db.transaction(conn):
        conn.execute(
            INSERT_METADATA,
            (TEST_BUCKET, archive_id, TEST_USER, archive_id + ".json", url, stored.is_compressed,
             stored.digest, stored.size, now, now),
        )
    return url


def fetch_document(conn, driver, archive_id):
    row = conn.execute(SELECT_METADATA, (TEST_BUCKET, archive_id, TEST_USER)).fetchone()
    if row is None:
        raise ObjmigError("check failed: the test document's metadata row is missing")
    url, is_compressed, digest = row
    stored = driver.read_many([url]).get(url)
    if stored is None or isinstance(stored, Exception):
        raise ObjmigError(f"check failed: cannot read the test document back: {stored or 'not found'}")
    try:
        return codec.decode(stored, is_compressed, digest)
    except ValueError as exc:
        raise ObjmigError(f"check failed: {exc}") from None


def remove_document(conn, driver, archive_id):
    row = conn.execute(SELECT_METADATA, (TEST_BUCKET, archive_id, TEST_USER)).fetchone()
    url = row[0] if row else driver.url_for(TEST_USER, TEST_BUCKET, archive_id)
    errors = driver.delete_many([url])
    if errors:
        raise ObjmigError(f"check failed: cannot delete the test document: {errors[url]}")
    with db.transaction(conn):
        conn.execute(DELETE_METADATA, (TEST_BUCKET, archive_id, TEST_USER))


def confirm_gone(conn, driver, archive_id, url):
    if conn.execute(SELECT_METADATA, (TEST_BUCKET, archive_id, TEST_USER)).fetchone() is not None:
        raise ObjmigError("check failed: the test document's metadata row is still there after delete")
    left = driver.read_many([url]).get(url)
    if left is not None and not isinstance(left, NotFound):
        raise ObjmigError(f"check failed: the test document is still readable at {url} after delete")
