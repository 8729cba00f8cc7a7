"""A stand-in for the original anchore-manager db -> s3 migration.

It follows the original algorithm: list the documents to move, then one
document at a time, each step its own transaction (select the metadata row;
read the archive_document row; PUT to S3; UPDATE the metadata row; DELETE the
source row; commit after each). One process, one thread, one connection.
It is not the original code (that needs all of Anchore installed), only its
shape, so the figure to compare with is the docs/s it reaches here.
"""

import base64
import hashlib
import time
import zlib

import boto3
import psycopg
from botocore.config import Config

KEY = 'bucket = %s AND "archiveId" = %s AND "userId" = %s AND "documentName" = %s'


def s3_client(endpoint, access_key, secret_key):
    # What Anchore's s3 driver builds: a default boto3 client for the endpoint.
    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                      response_checksum_validation="when_required"),
    )


def migrate_sequentially(dsn, client, s3_bucket, compress=False, min_size_kbytes=100, time_limit=None):
    """Move db:// documents to s3://s3_bucket/ one at a time; (documents, bytes, seconds).

    Stops after `time_limit` seconds (documents not reached stay in the db,
    readable): the rate is what counts, and the original is slow.
    """
    started = time.perf_counter()
    moved = moved_bytes = 0
    with psycopg.connect(dsn) as conn:
        keys = conn.execute(
            """SELECT bucket, "archiveId", "userId", "documentName" FROM archive_metadata
               WHERE content_url LIKE 'db://%%'"""
        ).fetchall()
        conn.commit()
        for key in keys:
            if time_limit is not None and time.perf_counter() - started > time_limit:
                break
            bucket, archive_id, user_id, _ = key
            row = conn.execute(f"SELECT content_url, is_compressed, digest FROM archive_metadata WHERE {KEY}", key).fetchone()
            conn.commit()
            document = conn.execute(
                'SELECT jsondata, b64_encoded FROM archive_document WHERE bucket = %s AND "archiveId" = %s AND "userId" = %s',
                (bucket, archive_id, user_id),
            ).fetchone()
            conn.commit()
            jsondata, b64_encoded = document
            stored = b"" if jsondata is None else base64.b64decode(jsondata) if b64_encoded else jsondata.encode("utf-8")
            if row[2] and hashlib.md5(stored).hexdigest() != row[2]:
                raise RuntimeError(f"baseline: digest mismatch for {row[0]}")
            plain = zlib.decompress(stored) if row[1] else stored
            is_compressed = compress and len(plain) > min_size_kbytes * 1024
            data = zlib.compress(plain, 3) if is_compressed else plain
            object_key = f"{user_id}/{bucket}/{archive_id}"
            client.put_object(Bucket=s3_bucket, Key=object_key, Body=data, ContentType="binary/octet-stream")
            conn.execute(
                f"""UPDATE archive_metadata SET content_url = %s, is_compressed = %s, digest = %s, size = %s,
                        last_updated = %s, document_metadata = NULL WHERE {KEY}""",
                (f"s3://{s3_bucket}/{object_key}", is_compressed, hashlib.md5(data).hexdigest(), len(data),
                 int(time.time()), *key),
            )
            conn.commit()
            conn.execute(
                'DELETE FROM archive_document WHERE bucket = %s AND "archiveId" = %s AND "userId" = %s',
                (bucket, archive_id, user_id),
            )
            conn.commit()
            moved += 1
            moved_bytes += len(data)
    return moved, moved_bytes, time.perf_counter() - started
