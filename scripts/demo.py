"""The demo behind `make demo`: a whole migration runbook on throwaway servers.

Starts PostgreSQL and a local S3 server (SeaweedFS) on 127.0.0.1, seeds an
Anchore-like archive, then runs what an operator runs: check the destination,
migrate db -> s3, list the migrations, and migrate back. Every document is
read back the way Anchore reads it after each step. Stops what it started.
"""

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time

import psycopg
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import anchore_sim  # noqa: E402
import devservers  # noqa: E402


def banner(text):
    print(f"\n=== {text}", flush=True)


def run_tool(dsn, *args, env):
    """Run anchore-objmig as an operator would, echoing the command (password hidden)."""
    shown = ["anchore-objmig", "--db-connect", "postgresql://objmig:***@…", *args]
    print("$ " + " ".join(shlex.quote(str(a)) for a in shown), flush=True)
    command = [sys.executable, "-m", "anchore_objmig", "--db-connect", dsn, *map(str, args)]
    result = subprocess.run(command, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"demo: anchore-objmig {args[0]} exited with {result.returncode}")


def write_configs(directory, s3_server, bucket):
    source = {"services": {"catalog": {"object_store": {
        "compression": {"enabled": False, "min_size_kbytes": 100},
        "storage_driver": {"name": "db", "config": {}}}}}}
    dest = {"services": {"catalog": {"object_store": {
        "compression": {"enabled": True, "min_size_kbytes": 100},
        "storage_driver": {"name": "s3", "config": {
            # Secrets stay out of the file, as in a Kubernetes secret setup.
            "access_key": "${ANCHORE_OBJ_STORAGE_ACCESS_KEY}",
            "secret_key": "${ANCHORE_OBJ_STORAGE_SECRET_KEY}",
            "url": s3_server.endpoint, "region": False, "bucket": bucket,
            "prefix": "internaltest", "create_bucket": True}}}}}}
    paths = []
    for name, content in (("config.yaml", source), ("dest-config.yaml", dest)):
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as handle:
            yaml.safe_dump(content, handle, sort_keys=False)
        paths.append(path)
    return paths


def verify(dsn, s3_client, docs, scheme):
    with psycopg.connect(dsn) as conn:
        documents = anchore_sim.read_all(conn, s3_client)
        schemes = {row[0].split("://")[0] for row in conn.execute("SELECT content_url FROM archive_metadata")}
    wanted = {(d.user_id, d.bucket, d.archive_id): d.content for d in docs}
    if documents != wanted or schemes != {scheme}:
        raise SystemExit(f"demo: read-back check FAILED (schemes {schemes})")
    print(f"read back all {len(documents)} documents as Anchore does (MD5, zlib): OK, all at {scheme}://")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", type=int, default=3000, help="documents to seed (default 3000)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="objmig-demo-") as workdir:
        banner("starting PostgreSQL and SeaweedFS (S3) on 127.0.0.1")
        with devservers.PostgresServer() as pg, devservers.start_s3("seaweedfs") as s3_server:
            import boto3
            from botocore.config import Config

            s3_client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                                     aws_access_key_id=s3_server.access_key,
                                     aws_secret_access_key=s3_server.secret_key,
                                     config=Config(s3={"addressing_style": "path"}))
            banner(f"seeding an Anchore-like archive of {args.docs} documents in PostgreSQL")
            docs = anchore_sim.make_docs(args.docs)
            with psycopg.connect(pg.dsn) as conn:
                anchore_sim.apply_schema(conn)
                anchore_sim.store(conn, anchore_sim.Location("db"), docs)
            total = sum(len(d.content) for d in docs)
            print(f"{len(docs)} documents, {total / 1e6:.1f} MB")

            source, dest = write_configs(workdir, s3_server, "anchore-demo")
            env = dict(os.environ, ANCHORE_OBJ_STORAGE_ACCESS_KEY=s3_server.access_key,
                       ANCHORE_OBJ_STORAGE_SECRET_KEY=s3_server.secret_key)

            banner("step 3: check the destination config")
            run_tool(pg.dsn, "check", dest, env=env)
            banner("step 4: migrate db -> s3 (dry run first, then for real)")
            run_tool(pg.dsn, "migrate", source, dest, "--dry-run", env=env)
            started = time.monotonic()
            run_tool(pg.dsn, "migrate", source, dest, "--dontask", env=env)
            print(f"(took {time.monotonic() - started:.1f}s)")
            verify(pg.dsn, s3_client, docs, "s3")
            banner("step 6: view the results")
            run_tool(pg.dsn, "list-migrations", env=env)
            banner("and back again: migrate s3 -> db")
            run_tool(pg.dsn, "migrate", dest, source, "--dontask", env=env)
            verify(pg.dsn, s3_client, docs, "db")
            run_tool(pg.dsn, "list-migrations", env=env)
            banner("stopping the servers")
    print("demo finished: every document moved to S3 and back, readable by Anchore at each step")


if __name__ == "__main__":
    main()
