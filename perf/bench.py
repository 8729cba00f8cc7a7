"""Benchmarks of anchore-objmig against its ceilings and the original's algorithm.

One run starts its own PostgreSQL and SeaweedFS on 127.0.0.1, seeds
Anchore-like documents, and measures (see perf/README.md for why each):

  a   this tool, db -> s3 and s3 -> db (the real CLI, a subprocess)
  b   the raw PUT ceiling: the same bytes PUT by plain parallel uploaders (awscrt, minio, boto3)
  c   a sequential per-document baseline (the original anchore-manager algorithm)
  d   this tool db -> db2 against the same move done by SQL inside PostgreSQL
  e   peak RSS of the tool's largest process during (a) db -> s3
  f   this tool db -> s3 with 1, 2 and 4 workers
  g   cost per document at two archive sizes (only with --scale or --scale-docs)
  h   cost per document with 3 and with 300 accounts (db -> db2)
  i   the raw GET ceiling: the same objects read back by the same plain clients (s3 -> db's ceiling)
  j   db -> s3 and the raw PUT uploaders through a proxy adding --latency-ms of round-trip time
  k   the raw PostgreSQL side of the same documents: COPY out of archive_document, and COPY into a
      table shaped like it, with lz4 and with pglz TOAST compression (2 sessions, as 2 workers)
  m   peak memory moving one 300 MB document db -> s3, verify, s3 -> db, compressed in S3 (--huge, or --rows m)

Every measurement starts from freshly reset tables and a fresh S3 bucket, and
every tool run is followed by a read-back of every document (it fails loudly
otherwise). Results: a markdown table on stdout, and JSON + markdown under
perf/results/.

    .venv/bin/python perf/bench.py [--docs N] [--huge K] [--quick] [--scale | --scale-docs A,B]
"""

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import boto3  # noqa: E402
import psycopg  # noqa: E402
import yaml  # noqa: E402
from botocore.config import Config  # noqa: E402

import anchore_sim  # noqa: E402
import baseline  # noqa: E402
import ceiling  # noqa: E402
import devservers  # noqa: E402
import latencyproxy  # noqa: E402
import procwatch  # noqa: E402
import profiles  # noqa: E402
import seeding  # noqa: E402

MB = 1_000_000  # MB/s in the tables are decimal megabytes of document data
RESULTS_DIR = os.path.join(HERE, "results")
CPUS = len(os.sched_getaffinity(0))

# The targets of perf/README.md.
TARGET_CEILING = 0.8  # db -> s3 at least 0.8 x the raw PUT ceiling
TARGET_SQL = 0.5  # db -> db2 at least 0.5 x the in-database SQL move
TARGET_BASELINE = 10.0  # at least 10 x the sequential baseline
TARGET_RSS_MB = 400  # peak RSS of the largest process, with documents up to 50 MB, and with one of 300 MB
TARGET_ACCOUNTS = 1.3  # cost per document with 300 accounts at most 1.3 x with 3
TARGET_FLAT = 1.2  # cost per document at the large size at most 1.2 x the small size's
TARGET_GET = 0.8  # s3 -> db at least 0.8 x the raw GET ceiling
TARGET_CPU = 1.5  # the tool's client CPU per document db -> s3 at most 1.5 x the raw uploader's
TARGET_LATENCY = 0.8  # with added round-trip time, db -> s3 at least 0.8 x the raw uploader at the same latency
CEILING_CLIENTS = ("awscrt", "minio", "boto3")


class BenchTimeout(Exception):
    """The whole benchmark ran past --time-limit."""


class ToolFailed(RuntimeError):
    pass


@dataclass
class Result:
    row: str  # a, b, c ... as in the README
    what: str
    documents: int
    bytes: int  # plain document bytes moved
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def docs_per_s(self):
        return self.documents / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self):
        return self.bytes / MB / self.seconds if self.seconds else 0.0

    def as_dict(self):
        return {**asdict(self), "docs_per_s": round(self.docs_per_s, 1), "mb_per_s": round(self.mb_per_s, 2)}


# ---------------------------------------------------------------- the machine


def machine_info():
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo", encoding="utf-8") as handle:
        mem_kb = int(next(line for line in handle if line.startswith("MemTotal")).split()[1])
    with open("/proc/loadavg", encoding="utf-8") as handle:
        load = " ".join(handle.read().split()[:3])
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "anchore_objmig"],
                           capture_output=True, text=True).stdout.strip()
    return {
        "nproc": CPUS,
        "cpu": cpu,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_average_at_start": load,
        "tool_commit": commit + ("+uncommitted changes" if dirty else ""),
    }


def server_versions(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        postgres = conn.execute("SHOW server_version").fetchone()[0]
    weed = subprocess.run([devservers._find_binary("weed"), "version"], capture_output=True, text=True, timeout=30)
    seaweed = (weed.stdout or weed.stderr).strip().splitlines()[0] if (weed.stdout or weed.stderr).strip() else "?"
    return {"postgresql": postgres, "seaweedfs": seaweed.removeprefix("version ").strip()}


# ---------------------------------------------------------------- the bench


class Bench:
    def __init__(self, args, pg, s3, workdir, logdir):
        self.args = args
        self.logdir = logdir
        self.dsn = pg.dsn
        self.s3 = s3
        self.workdir = workdir
        self.results = []
        self.corpus = {}
        self.docs = []
        self.client = boto3.client(
            "s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.access_key, aws_secret_access_key=s3.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                          response_checksum_validation="when_required", max_pool_connections=32),
        )
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            anchore_sim.apply_schema(conn)
        # Whose CPU a run spent (procwatch.CpuShare): the servers share the cores with the client.
        self.servers = {"s3_server": s3.pid, "postgresql": pg.postmaster_pid}

    def cpu_share(self):
        return procwatch.CpuShare(self.servers).start()

    def log(self, text):
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    # -- state between measurements ---------------------------------------
    def reset(self):
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            anchore_sim.reset_tables(conn)

    def checkpoint(self):
        # Seeding wrote a lot of WAL: flush it now, not during the timed run.
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("CHECKPOINT")

    def new_bucket(self):
        name = f"bench-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        return name

    def drop_bucket(self, bucket):
        """Delete a bucket and its objects (keeps SeaweedFS's disk use down between runs)."""
        try:
            self.client.delete_bucket(Bucket=bucket)  # SeaweedFS drops a non-empty bucket at once
            return
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "BucketNotEmpty":
                raise
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys += [item["Key"] for item in page.get("Contents", [])]
        chunks = [keys[n:n + 1000] for n in range(0, len(keys), 1000)]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda chunk: self.client.delete_objects(
                Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True}), chunks))
        self.client.delete_bucket(Bucket=bucket)

    def count_objects(self, bucket):
        count = 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            count += len(page.get("Contents", []))
        return count

    def source_rows(self, table):
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def seed_db(self, chunks):
        self.reset()
        docset = seeding.seed_db(self.dsn, chunks)
        self.checkpoint()
        return docset

    # -- config files -------------------------------------------------------
    def config(self, name, driver, driver_config=None, compress=False):
        section = {
            "compression": {"enabled": compress, "min_size_kbytes": 100},
            "storage_driver": {"name": driver, "config": driver_config or {}},
        }
        path = os.path.join(self.workdir, f"{name}.yaml")
        with open(path, "w", encoding="utf-8") as handle:
            yaml.safe_dump({"services": {"catalog": {"object_store": section}}}, handle)
        return path

    def s3_config(self, bucket, endpoint=None):
        return self.config(f"s3-{bucket}", "s3", {
            "access_key": self.s3.access_key, "secret_key": self.s3.secret_key,
            "url": endpoint or self.s3.endpoint, "region": False, "bucket": bucket,
        }, compress=self.args.compress)

    # -- running the tool ---------------------------------------------------
    def run_tool(self, label, from_config, to_config, workers, profile=None, command=None):
        """Run `anchore-objmig migrate` (or `command`, a list of arguments) as an operator
        would; wall seconds and what it used."""
        experiment = shlex.split(self.args.tool_args) if self.args.tool_args and command is None else []
        command = command or ["migrate", from_config, to_config, "--dontask"]
        tool = [sys.executable, "-m", "anchore_objmig", "--db-connect", self.dsn, *command, "--workers", str(workers)]
        if self.args.io_threads:
            tool += ["--io-threads", str(self.args.io_threads)]
        tool += experiment  # migrate options under test, e.g. --batch-bytes 64MiB
        if profile:  # (kind, output path): run under py-spy or cProfile
            tool, profile[0] = profiles.wrap_command(tool, profile[1])
        slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        os.makedirs(self.logdir, exist_ok=True)
        log_path = os.path.join(self.logdir, f"{slug}.log")
        report = os.path.join(self.workdir, f"{slug}.rusage.json")
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANCHORE")}
        share = self.cpu_share()
        started = time.perf_counter()
        with open(log_path, "wb") as log:
            # Own session: Ctrl-C reaches only us, and we stop the whole tool by its group id.
            proc = subprocess.Popen([sys.executable, os.path.join(HERE, "rusage_run.py"), report, *tool],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=ROOT, env=env, start_new_session=True)
            memory = procwatch.TreeMemory(proc.pid, skip_root=True)  # the wrapper is not the tool
            memory.start()
            try:
                returncode = proc.wait(timeout=self.args.run_timeout)
            except BaseException:
                stop_group(proc)
                raise
            finally:
                memory.stop()
        seconds = time.perf_counter() - started
        cpu_share = share.stop()
        with open(log_path, encoding="utf-8", errors="replace") as handle:
            output = handle.read()
        if returncode != 0:
            tail = "\n".join(output.splitlines()[-25:])
            raise ToolFailed(f"{label}: anchore-objmig exited with {returncode}; log {log_path}:\n{tail}")
        moved = re.search(r"moved in ([0-9.]+)s", output)
        try:
            with open(report, encoding="utf-8") as handle:
                usage = json.load(handle)
        except (OSError, ValueError):
            usage = {}
        maxrss_kb = usage.get("maxrss_kb")
        peak_kb, _, command = memory.largest()
        return {
            "seconds": seconds,
            "tool_reported_seconds": float(moved.group(1)) if moved else None,
            "client_cpu_seconds": round(usage["cpu_seconds"], 2) if "cpu_seconds" in usage else None,
            "peak_rss_mb": round(peak_kb / 1024, 1),
            "peak_rss_process": "worker" if "multiprocessing" in command else "main" if command else "?",
            "peak_tree_rss_mb": round(memory.peak_total_kb / 1024, 1),
            "processes_seen": len(memory.peak_kb),
            "rusage_maxrss_mb": round(maxrss_kb / 1024, 1) if maxrss_kb else None,
            "log": log_path,
            **cpu_share,
        }

    def tool_db_to_s3(self, row, what, chunks, workers, memory=False, endpoint=None):
        """Seed the db, run the tool db -> s3 (to `endpoint`, default the server), check everything
        moved and reads back."""
        docset = self.seed_db(chunks)
        bucket = self.new_bucket()
        self.log(f"{row}: {what}: {docset.count} documents, {docset.plain_bytes / MB:.0f} MB")
        run = self.run_tool(what, self.config("db", "db"), self.s3_config(bucket, endpoint), workers)
        seeding.verify(self.dsn, self.client, docset, f"s3://{bucket}/")
        if self.source_rows("archive_document"):
            raise seeding.VerifyError(f"{what}: source rows left in archive_document")
        if self.count_objects(bucket) != docset.count:
            raise seeding.VerifyError(f"{what}: {self.count_objects(bucket)} objects for {docset.count} documents")
        extra = {k: v for k, v in run.items() if memory or "rss" not in k}
        result = Result(row, what, docset.count, docset.plain_bytes, run["seconds"], {"workers": workers, **extra})
        self.add(result)
        self.drop_bucket(bucket)
        return result

    def repeated(self, measure):
        """Run `measure` (which adds its results) --repeat times; each measurement keeps its median
        run (by the tool's work time when it says one, else wall time), the others' times beside it.
        This VM's identical runs vary by 10-20 %: one run decides nothing near a target."""
        mark = len(self.results)
        outcome = None
        for _ in range(self.args.repeat):
            outcome = measure()
        runs = {}
        for result in self.results[mark:]:
            runs.setdefault(result.what, []).append(result)
        del self.results[mark:]
        for group in runs.values():
            def timed(r):
                return r.extra.get("tool_reported_seconds") or r.seconds
            group.sort(key=timed)
            chosen = group[(len(group) - 1) // 2]  # the lower median: an even count keeps a run that happened
            if len(group) > 1:
                chosen.extra["runs"] = [round(timed(r), 2) for r in group]
            for peak in ("peak_rss_mb", "rusage_maxrss_mb", "peak_tree_rss_mb"):  # memory: the worst run, not the median
                values = [r.extra[peak] for r in group if r.extra.get(peak) is not None]
                if values:
                    chosen.extra[peak] = max(values)
            self.results.append(chosen)
        return outcome

    def add(self, result):
        self.results.append(result)
        self.log(f"{result.row}: {result.what}: {result.seconds:.2f}s, {result.docs_per_s:.0f} docs/s, "
                 f"{result.mb_per_s:.1f} MB/s")

    # -- the measurements -----------------------------------------------------
    def run(self):
        args = self.args
        if "h" in args.rows:
            self.row_h()
        if "m" in args.rows:
            self.row_m()
        if not set(args.rows) & set("abcdfgijk"):
            return
        self.log(f"generating {args.docs} documents" + (f" + {args.huge} huge ones" if args.huge else ""))
        self.docs = [doc for chunk in seeding.generate(args.docs, seed=7, huge=args.huge) for doc in chunk]
        self.corpus = {"plain_bytes": sum(len(d.content) for d in self.docs),
                       "largest": max(len(d.content) for d in self.docs)}
        for row in "abcdfijk":
            if row in args.rows:
                getattr(self, f"row_{row}")()
        self.docs = []  # (g) streams its documents: the big sizes must not sit in memory
        if "g" in args.rows:
            self.row_g()
        self.reset()

    def chunks(self):
        return [self.docs[n:n + seeding.CHUNK] for n in range(0, len(self.docs), seeding.CHUNK)]

    def row_a(self):
        """(a) + (e): db -> s3 with the default workers, memory sampled; then s3 -> db."""
        args = self.args
        self.repeated(lambda: self.tool_db_to_s3("a", f"anchore-objmig db→s3 (workers={args.workers})", self.chunks(),
                                                 args.workers, memory=True))
        self.reset()
        # The same run with one document: its client CPU is the fixed start-up (interpreters, imports,
        # access checks, planning), which the raw uploaders' CPU figure does not include.
        self.tool_db_to_s3("a0", f"anchore-objmig db→s3, one document (start-up), workers={args.workers}",
                           [[self.docs[0]]], args.workers)
        self.repeated(self.tool_s3_to_db)

    def tool_s3_to_db(self):
        """Seed S3, run the tool s3 -> db with the default workers, check everything moved and reads back."""
        args = self.args
        self.reset()
        bucket = self.new_bucket()
        docset = seeding.seed_s3(self.dsn, self.client, bucket, self.chunks(), compress=args.compress)
        self.checkpoint()
        what = f"anchore-objmig s3→db (workers={args.workers})"
        self.log(f"a: {what}: {docset.count} documents")
        run = self.run_tool(what, self.s3_config(bucket), self.config("db", "db"), args.workers)
        seeding.verify(self.dsn, self.client, docset, "db://")
        if self.count_objects(bucket):
            raise seeding.VerifyError(f"{what}: objects left in the source bucket")
        self.add(Result("a", what, docset.count, docset.plain_bytes, run["seconds"], {"workers": args.workers, **run}))
        self.drop_bucket(bucket)

    def stored_items(self):
        """(key, stored bytes) of every document: what the tool's db -> s3 writes and its s3 -> db reads."""
        items = []
        for doc in self.docs:
            data, _ = seeding.stored_form(doc.content, self.args.compress)
            items.append((f"{doc.user_id}/{doc.bucket}/{doc.archive_id}", data))
        return items

    def raw_transfer(self, row, kind, op, items, endpoint=None, label=""):
        """One raw ceiling run (PUT into a fresh bucket, or GET from `op`'s bucket); the bucket is returned."""
        args = self.args
        put = op == "put"
        bucket = self.new_bucket() if put else op
        what = (f"raw {'PUT' if put else 'GET'} ceiling{label}, {kind} "
                f"({args.put_procs} proc × {args.put_threads} threads)")
        self.log(f"{row}: {what}")
        share = self.cpu_share()  # includes the uploaders' start-up: the tool's runs include its own too
        seconds, objects, _, cpu = ceiling.put_ceiling(kind, endpoint or self.s3.endpoint, self.s3.access_key,
                                                       self.s3.secret_key, bucket, items, args.put_procs,
                                                       args.put_threads, args.run_timeout, op="put" if put else "get")
        if put and self.count_objects(bucket) != len(items):
            raise seeding.VerifyError(f"{what}: {self.count_objects(bucket)} objects stored of {len(items)}")
        plain = sum(len(d.content) for d in self.docs)
        self.add(Result(row, what, objects, plain, seconds, {"client": kind, "client_cpu_seconds": round(cpu, 2),
                                                              **share.stop()}))
        return bucket

    def row_b(self):
        """(b): the raw PUT ceiling: the keys and stored bytes the tool's db -> s3 writes."""
        items = self.stored_items()
        for kind in CEILING_CLIENTS:
            self.repeated(lambda: self.drop_bucket(self.raw_transfer("b", kind, "put", items)))

    def row_i(self):
        """(i): the raw GET ceiling: the objects the tool's s3 -> db reads, read back whole by the same clients."""
        items = self.stored_items()
        args = self.args
        bucket = self.new_bucket()
        self.log("i: storing the objects to read (not timed)")
        ceiling.put_ceiling("awscrt", self.s3.endpoint, self.s3.access_key, self.s3.secret_key, bucket, items,
                            args.put_procs, args.put_threads, args.run_timeout)
        for kind in CEILING_CLIENTS:
            self.repeated(lambda: self.raw_transfer("i", kind, bucket, items))
        self.drop_bucket(bucket)

    def row_j(self):
        """(j): db -> s3 and the raw PUT uploaders, both through a proxy adding --latency-ms of round-trip
        time (perf/latencyproxy.py, a subprocess stopped by its handle)."""
        args = self.args
        items = self.stored_items()
        label = f" +{args.latency_ms:g} ms RTT"
        with latencyproxy.LatencyProxy(self.s3.endpoint, args.latency_ms) as proxy:
            self.log(f"j: latency proxy {proxy.endpoint} adds {args.latency_ms:g} ms round trip")
            for kind in ("awscrt", "minio"):  # the candidates for the ceiling (boto3 never was)
                self.repeated(lambda: self.drop_bucket(self.raw_transfer("j", kind, "put", items, proxy.endpoint, label)))
            result = self.repeated(lambda: self.tool_db_to_s3("j", f"anchore-objmig db→s3{label} (workers={args.workers})",
                                                              self.chunks(), args.workers, endpoint=proxy.endpoint))
        for r in self.results:
            if r.row == "j":
                r.extra["latency_ms"] = args.latency_ms
        return result

    def row_k(self):
        """(k): what PostgreSQL alone takes to hand over the documents (db -> s3 reads them so) and to take
        them in (s3 -> db writes them so): COPY in 2 sessions, one per account, as the tool's 2 workers."""
        docset = self.seed_db(self.chunks())
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            users = [u for (u,) in conn.execute('SELECT DISTINCT "userId" FROM archive_document ORDER BY 1')]
        what = "raw COPY out of archive_document (2 sessions)"
        self.log(f"k: {what}")
        seconds = in_sessions(lambda conn, user: copy_out(conn, user), users, self.dsn)
        self.add(Result("k", what, docset.count, docset.plain_bytes, seconds, {"pg": "copy-out"}))
        rows = {u: [(d.bucket, d.archive_id, d.user_id, d.archive_id + ".json", *anchore_sim.db_text(d.content))
                    for d in self.docs if d.user_id == u] for u in users}
        for method in ("lz4", "pglz"):
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn.execute("DROP TABLE IF EXISTS bench_copy_in")
                conn.execute("CREATE TABLE bench_copy_in (LIKE archive_document INCLUDING ALL)")
                conn.execute("CHECKPOINT")
            what = f"raw COPY into a table like archive_document, {method} (2 sessions)"
            self.log(f"k: {what}")
            seconds = in_sessions(lambda conn, user: copy_in(conn, method, rows[user]), users, self.dsn)
            self.add(Result("k", what, docset.count, docset.plain_bytes, seconds, {"pg": f"copy-in-{method}"}))
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("DROP TABLE bench_copy_in")

    def row_c(self):
        """(c): the sequential baseline, bounded by --baseline-seconds."""
        args = self.args
        docset = self.seed_db(self.chunks())
        bucket = self.new_bucket()
        what = "sequential baseline db→s3 (original algorithm)"
        self.log(f"c: {what} (at most {args.baseline_seconds:.0f}s)")
        client = baseline.s3_client(self.s3.endpoint, self.s3.access_key, self.s3.secret_key)
        cpu = time.process_time()  # the baseline runs in this process, in this thread
        moved, _, seconds = baseline.migrate_sequentially(self.dsn, client, bucket, args.compress,
                                                          time_limit=args.baseline_seconds)
        cpu = time.process_time() - cpu
        seeding.verify(self.dsn, self.client, docset, (f"s3://{bucket}/", "db://"))
        moved_plain = self.plain_bytes_at(f"s3://{bucket}/")
        self.add(Result("c", what, moved, moved_plain, seconds,
                        {"of_documents": docset.count, "stopped_by_time_limit": moved < docset.count,
                         "client_cpu_seconds": round(cpu, 2)}))
        self.drop_bucket(bucket)

    def row_d(self):
        """(d): db -> db2 by the tool, and by SQL inside PostgreSQL (no compression either way)."""
        args = self.args
        docset = self.seed_db(self.chunks())
        what = f"anchore-objmig db→db2 (workers={args.workers})"
        self.log(f"d: {what}")
        run = self.run_tool(what, self.config("db", "db"), self.config("db2", "db2"), args.workers)
        seeding.verify(self.dsn, self.client, docset, "db2://")
        if self.source_rows("archive_document"):
            raise seeding.VerifyError(f"{what}: source rows left in archive_document")
        self.add(Result("d", what, docset.count, docset.plain_bytes, run["seconds"],
                        {"workers": args.workers, **{k: v for k, v in run.items() if "rss" not in k}}))
        docset = self.seed_db(self.chunks())
        what = "SQL move db→db2 inside PostgreSQL (3 statements)"
        self.log(f"d: {what}")
        seconds = sql_move(self.dsn)
        seeding.verify(self.dsn, self.client, docset, "db2://")
        self.add(Result("d", what, docset.count, docset.plain_bytes, seconds))

    def row_f(self):
        """(f): db -> s3 by worker count; the default count is the (a) run already, when there was one."""
        args = self.args
        first = next((r for r in self.results if r.row == "a"), None)
        for workers in args.worker_counts:
            what = f"anchore-objmig db→s3 (workers={workers})"
            if first and workers == first.extra.get("workers"):
                self.results.append(Result("f", what, first.documents, first.bytes, first.seconds,
                                           {"workers": workers, "same_run_as": "a"}))
                continue
            self.tool_db_to_s3("f", what, self.chunks(), workers)

    def row_g(self):
        """(g): cost per document at two sizes, streamed from the generator."""
        args = self.args
        for count in args.scale_docs:
            result = self.tool_db_to_s3("g", f"anchore-objmig db→s3, {count} documents (workers={args.workers})",
                                           seeding.generate(count, seed=11), args.workers)
            result.extra["us_per_doc"] = round(result.seconds / result.documents * 1e6, 1)
            if result.extra.get("tool_reported_seconds"):
                result.extra["us_per_doc_tool_reported"] = round(
                    result.extra["tool_reported_seconds"] / result.documents * 1e6, 1)

    def row_h(self):
        """(h): db -> db2 of the same number of small documents spread over 3 and over 300 accounts:
        shards are sized by documents, so the cost per document must not follow the account count."""
        args = self.args
        for accounts in (3, 300):
            users = tuple(f"account{n:03d}" for n in range(accounts))
            docset = self.seed_db(seeding.generate(args.accounts_docs, seed=13, users=users))
            what = f"anchore-objmig db→db2, {args.accounts_docs} documents of {accounts} accounts (workers={args.workers})"
            self.log(f"h: {what}")
            run = self.run_tool(what, self.config("db", "db"), self.config("db2", "db2"), args.workers)
            seeding.verify(self.dsn, self.client, docset, "db2://")
            self.add(Result("h", what, docset.count, docset.plain_bytes, run["seconds"],
                            {"accounts": accounts, "us_per_doc": round(run["seconds"] / docset.count * 1e6, 1),
                             **{k: v for k, v in run.items() if "rss" not in k}}))
            self.reset()

    def row_m(self):
        """(m): one very large document alone, db -> s3, verify, and back, compressed in S3: the peak
        RSS of every process of the tool (it streams documents that size) against the target."""
        args = self.args
        self.log(f"m: generating one document of about {args.huge_doc_mb} MB")
        doc = seeding.one_huge_doc(args.huge_doc_mb * MB)
        docset = self.seed_db([[doc]])
        bucket = self.new_bucket()
        s3_config = self.config(f"s3-{bucket}", "s3", {
            "access_key": self.s3.access_key, "secret_key": self.s3.secret_key,
            "url": self.s3.endpoint, "region": False, "bucket": bucket}, compress=True)
        for what, source, dest, where in (("db→s3", self.config("db", "db"), s3_config, f"s3://{bucket}/"),
                                          ("verify", s3_config, None, f"s3://{bucket}/"),
                                          ("s3→db", s3_config, self.config("db", "db"), "db://")):
            command = ["verify", source] if what == "verify" else None  # reads it back, as runbook step 6
            what = f"anchore-objmig {what}, one {len(doc.content) / MB:.0f} MB document, compressed in S3"
            self.log(f"m: {what}")
            run = self.run_tool(what, source, dest, args.workers, command=command)
            seeding.verify(self.dsn, self.client, docset, where)
            self.add(Result("m", what, 1, len(doc.content), run["seconds"],
                            {"workers": args.workers, "document_mb": round(len(doc.content) / MB, 1), **run}))
        self.drop_bucket(bucket)
        self.reset()

    def profile(self):
        """Profile one db -> s3 run with --workers 1 (the worker loop runs in the main process)."""
        args = self.args
        docs = [d for chunk in seeding.generate(args.profile_docs, seed=13) for d in chunk]
        docset = self.seed_db([docs[n:n + seeding.CHUNK] for n in range(0, len(docs), seeding.CHUNK)])
        del docs
        bucket = self.new_bucket()
        profile = [None, os.path.join(self.workdir, "profile.out")]
        self.log(f"profile: db→s3 --workers 1, {docset.count} documents")
        run = self.run_tool("profile db to s3", self.config("db", "db"), self.s3_config(bucket), 1, profile=profile)
        seeding.verify(self.dsn, self.client, docset, f"s3://{bucket}/")
        self.drop_bucket(bucket)
        header = (f"profile of anchore-objmig db→s3 --workers 1: {docset.count} documents, "
                  f"{docset.plain_bytes / MB:.0f} MB, {run['seconds']:.1f}s wall under {profile[0]}\n")
        return header + profiles.summarize(profile[0], profile[1])

    def plain_bytes_at(self, prefix):
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            moved = {(u, b, a) for u, b, a in conn.execute(
                """SELECT "userId", bucket, "archiveId" FROM archive_metadata WHERE starts_with(content_url, %s)""",
                (prefix,))}
        return sum(len(d.content) for d in self.docs if (d.user_id, d.bucket, d.archive_id) in moved)


SQL_MOVE = [
    # decode() skips the newlines of MIME-style base64; NULL jsondata reads as empty.
    """INSERT INTO object_storage ("userId", bucket, key, version, object_metadata, content, created_at, last_updated)
       SELECT d."userId", d.bucket, d."archiveId", '', NULL,
              CASE WHEN d.b64_encoded THEN decode(d.jsondata, 'base64')
                   ELSE convert_to(coalesce(d.jsondata, ''), 'UTF8') END,
              extract(epoch FROM now())::integer, extract(epoch FROM now())::integer
       FROM archive_document d""",
    # No compression: the stored bytes are the same, so digest and size stay.
    """UPDATE archive_metadata m
          SET content_url = 'db2://' || m."userId" || '/' || m.bucket || '/' || m."archiveId",
              last_updated = extract(epoch FROM now())::integer
        WHERE starts_with(m.content_url, 'db://')""",
    "DELETE FROM archive_document",
]


def sql_move(dsn):
    """Seconds for the three statements, in one transaction."""
    with psycopg.connect(dsn) as conn:
        started = time.perf_counter()
        for statement in SQL_MOVE:
            conn.execute(statement)
        conn.commit()
        return time.perf_counter() - started


def in_sessions(work, users, dsn):
    """Seconds for work(conn, user) run side by side, one session and thread per user."""
    conns = [psycopg.connect(dsn) for _ in users]
    try:
        started = time.perf_counter()
        with ThreadPoolExecutor(len(users)) as pool:
            list(pool.map(work, conns, users))
        return time.perf_counter() - started
    finally:
        for conn in conns:
            conn.close()


def copy_out(conn, user):
    """Every stored document of `user`, as the tool's db reader asks for them (binary COPY)."""
    query = """COPY (SELECT "userId", bucket, "archiveId", jsondata, b64_encoded FROM archive_document
                      WHERE "userId" = %s) TO STDOUT (FORMAT BINARY)"""
    with conn.cursor() as cur, cur.copy(query, (user,)) as copy:
        for _ in iter(copy.read, b""):
            pass
    conn.commit()


def copy_in(conn, method, rows):
    now = int(time.time())
    with conn.cursor() as cur:
        cur.execute(f"SET default_toast_compression = {method}")
        with cur.copy('COPY bench_copy_in (bucket, "archiveId", "userId", "documentName", jsondata, b64_encoded, '
                      "created_at, last_updated, record_state_key) FROM STDIN") as copy:
            for row in rows:
                copy.write_row((*row, now, now, "active"))
    conn.commit()


def stop_group(proc):
    """Stop a process we started in its own session, and everything it started, by its group id."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------- reporting


def cpu_per_doc_us(result):
    cpu = result.extra.get("client_cpu_seconds")
    return cpu / result.documents * 1e6 if cpu is not None and result.documents else None


def fastest(results, kinds=None):
    """The fastest raw uploader run (the ceiling) among `results`, or None."""
    runs = [r for r in results if kinds is None or r.extra.get("client") in kinds]
    return min(runs, key=lambda r: r.seconds) if runs else None


def ratio_rows(results, machine):
    """The targets of perf/README.md: (target, measured, verdict: True, False or None = not tested)."""
    by = {}
    for r in results:
        by.setdefault(r.row, []).append(r)
    tool_a = by.get("a", [])
    db_s3 = next((r for r in tool_a if "db→s3" in r.what), None)
    s3_db = next((r for r in tool_a if "s3→db" in r.what), None)
    put_ceiling = fastest(by.get("b", []))
    get_ceiling = fastest(by.get("i", []))
    rows = []

    pg = {r.extra.get("pg"): r for r in by.get("k", [])}
    name = f"db→s3 ≥ {TARGET_CEILING} × raw PUT ceiling"
    startup = next(iter(by.get("a0", [])), None)
    if db_s3 and put_ceiling:
        measured, ok = throughput(put_ceiling, db_s3, TARGET_CEILING, put_ceiling.extra["client"])
        rows.append((name, measured + cpu_bound(put_ceiling, db_s3, startup), ok))
    else:
        rows.append((name, "not run (rows a and b)", None))
    name = f"(added) db→s3 ≥ {TARGET_CEILING} × the whole move's ceiling: raw COPY out, then raw PUT"
    if db_s3 and put_ceiling and "copy-out" in pg:
        both = pg["copy-out"].seconds + put_ceiling.seconds
        rows.append((name, *throughput(both, db_s3, TARGET_CEILING, f"{pg['copy-out'].seconds:.2f} s + "
                                       f"{put_ceiling.seconds:.2f} s ({put_ceiling.extra['client']})")))
    else:
        rows.append((name, "not run (rows a, b and k)", None))

    name = f"s3→db ≥ {TARGET_GET} × raw GET ceiling"
    if s3_db and get_ceiling:
        measured, ok = throughput(get_ceiling, s3_db, TARGET_GET, get_ceiling.extra["client"])
        rows.append((name, measured + cpu_bound(get_ceiling, s3_db, startup), ok))
    else:
        rows.append((name, "not run (rows a and i)", None))
    name = f"(added) s3→db ≥ {TARGET_GET} × the whole move's ceiling: raw GET, then raw COPY in (lz4)"
    if s3_db and get_ceiling and "copy-in-lz4" in pg:
        both = get_ceiling.seconds + pg["copy-in-lz4"].seconds
        rows.append((name, *throughput(both, s3_db, TARGET_GET, f"{get_ceiling.seconds:.2f} s "
                                       f"({get_ceiling.extra['client']}) + {pg['copy-in-lz4'].seconds:.2f} s")))
    else:
        rows.append((name, "not run (rows a, i and k)", None))

    name = f"client CPU per document db→s3 ≤ {TARGET_CPU} × the raw uploader's"
    tool_cpu = cpu_per_doc_us(db_s3) if db_s3 else None
    whole_run = ""
    if tool_cpu and startup and startup.extra.get("client_cpu_seconds") is not None and db_s3.documents > 1:
        # Per document beyond the fixed start-up, as the uploaders are counted from "go" (no imports, no
        # connections): the start-up is shown beside it, and the whole-run figure too.
        startup_cpu = startup.extra["client_cpu_seconds"]
        whole_run = f" (start-up {startup_cpu:.2f} s excluded; {tool_cpu:.0f} µs/doc with it)"
        tool_cpu = (db_s3.extra["client_cpu_seconds"] - startup_cpu) / (db_s3.documents - 1) * 1e6
    # The raw uploader that needs the least CPU per document (awscrt, so far): the strictest reading.
    frugal = min((r for r in by.get("b", []) if cpu_per_doc_us(r)), key=cpu_per_doc_us, default=None)
    raw_cpu = cpu_per_doc_us(frugal) if frugal else None
    if tool_cpu and raw_cpu:
        ratio = tool_cpu / raw_cpu
        rows.append((name, f"{tool_cpu:.0f} µs against {raw_cpu:.0f} µs ({frugal.extra['client']}) = {ratio:.2f} ×"
                           f"{whole_run}", ratio <= TARGET_CPU))
    else:
        rows.append((name, "not run (rows a and b)", None))

    name = f"db→s3 ≥ {TARGET_BASELINE:.0f} × sequential baseline (docs/s)"
    if db_s3 and by.get("c") and by["c"][0].documents:
        ratio = db_s3.docs_per_s / by["c"][0].docs_per_s
        rows.append((name, f"{ratio:.1f} ×", ratio >= TARGET_BASELINE))
    else:
        rows.append((name, "not run (rows a and c)", None))

    name = f"db→db2 ≥ {TARGET_SQL} × in-database SQL move"
    if len(by.get("d", [])) == 2:
        tool, sql = by["d"]
        ratio = sql.seconds / tool.seconds
        rows.append((name, f"{ratio:.2f} ×", ratio >= TARGET_SQL))
    else:
        rows.append((name, "not run (row d)", None))

    largest = machine.get("largest_document_mb", 0)
    measured_runs = [r for r in (db_s3, s3_db) if r and r.extra.get("peak_rss_mb") is not None]
    name = f"peak RSS < {TARGET_RSS_MB} MB with documents up to 50 MB"  # the 300 MB target is row m's
    if measured_runs:
        parts, peaks = [], []
        for r in measured_runs:
            rss, cross = r.extra.get("peak_rss_mb"), r.extra.get("rusage_maxrss_mb")
            peak = max(v for v in (rss, cross, 0) if v is not None)
            peaks.append(peak)
            direction = "db→s3" if r is db_s3 else "s3→db"
            parts.append(f"{direction} {peak:.0f} MB ({r.extra.get('peak_rss_process')}; /proc {rss}, getrusage {cross})")
        measured = "; ".join(parts) + f"; largest document {largest} MB"
        # Only a run with a document near 50 MB tests it (--huge).
        rows.append((name, measured, max(peaks) < TARGET_RSS_MB if 45 <= largest < 100 else None))
    else:
        rows.append((name, "not run (row a)", None))

    scale = {r.documents: r for r in by.get("g", [])}
    for small_n, large_n in ((10_000, 100_000), (100_000, 1_000_000)):
        name = f"cost per document flat {small_n:,}→{large_n:,} documents (≤ {TARGET_FLAT} ×)"
        small, large = scale.get(small_n), scale.get(large_n)
        if small and large:
            growth = large.extra["us_per_doc"] / small.extra["us_per_doc"]
            rows.append((name, f"{small.extra['us_per_doc']:.0f} → {large.extra['us_per_doc']:.0f} µs/doc = "
                               f"{growth:.2f} ×", growth <= TARGET_FLAT))
        elif len(scale) >= 2 and large_n == 100_000 and not (set(scale) & {10_000, 100_000, 1_000_000}):
            low, high = min(scale), max(scale)  # a development run at other sizes: shown, not judged
            rows.append((name, f"{scale[low].extra['us_per_doc']:.0f} → {scale[high].extra['us_per_doc']:.0f} µs/doc "
                               f"at {low}→{high} documents", None))
        else:
            option = "--scale" if large_n == 100_000 else "--scale-docs 100000,1000000"
            rows.append((name, f"not run ({option})", None))

    for run in by.get("m", []):
        direction = next(way for way in ("db→s3", "verify", "s3→db") if way in run.what)
        name = f"peak RSS < {TARGET_RSS_MB} MB with one {run.extra['document_mb']:.0f} MB document, {direction}"
        peak = max(v for v in (run.extra.get("peak_rss_mb"), run.extra.get("rusage_maxrss_mb"), 0) if v is not None)
        rows.append((name, f"{peak:.0f} MB ({run.extra.get('peak_rss_process')} process; whole tree "
                           f"{run.extra.get('peak_tree_rss_mb')} MB)", peak < TARGET_RSS_MB))

    name = f"cost per document with 300 accounts ≤ {TARGET_ACCOUNTS} × with 3"
    accounts = {r.extra["accounts"]: r for r in by.get("h", [])}
    if 3 in accounts and 300 in accounts:
        few, many = accounts[3].extra["us_per_doc"], accounts[300].extra["us_per_doc"]
        rows.append((name, f"{few:.0f} → {many:.0f} µs/doc = {many / few:.2f} ×", many / few <= TARGET_ACCOUNTS))
    else:
        rows.append((name, "not run (row h)", None))

    name = f"db→s3 at +{machine.get('latency_ms', 20):g} ms round trip ≥ {TARGET_LATENCY} × the raw uploader's"
    slow = by.get("j", [])
    slow_tool = next((r for r in slow if "anchore-objmig" in r.what), None)
    slow_raw = fastest([r for r in slow if r is not slow_tool])
    if slow_tool and slow_raw:
        measured, ok = throughput(slow_raw, slow_tool, TARGET_LATENCY, slow_raw.extra["client"])
        rows.append((name, measured + cpu_bound(slow_raw, slow_tool, startup), ok))
    else:
        rows.append((name, "not run (row j)", None))
    return rows


def cpu_bound(ceiling, tool, startup=None):
    """What the machine's CPU allowed, as a note for a throughput verdict. With every core busy in both
    runs, wall time follows the CPU seconds the whole machine spent (client, S3 server and PostgreSQL
    share the cores), so the tool can reach at most the raw run's machine CPU over its own; the tool's
    fixed start-up (row a0) is taken off, as its work time leaves it out."""
    if not isinstance(ceiling, Result) or not ceiling.extra.get("machine_cpu_seconds") \
            or not tool.extra.get("machine_cpu_seconds"):
        return ""
    raw, used = ceiling.extra, tool.extra
    fixed = (startup.extra.get("machine_cpu_seconds") or 0) if startup else 0
    work = used["machine_cpu_seconds"] - fixed
    client = (used.get("client_cpu_seconds") or 0) - ((startup.extra.get("client_cpu_seconds") or 0) if startup else 0)
    return (f"; CPU: the raw run used {raw['machine_cpu_seconds']:.1f} machine CPU-s ({raw['busy_cores']} cores busy; "
            f"S3 server {raw['s3_server_cpu_seconds']:.1f}, client {raw.get('client_cpu_seconds') or 0:.1f}), the tool's "
            f"work {work:.1f} ({used['busy_cores']} cores busy; S3 server {used['s3_server_cpu_seconds']:.1f}, "
            f"PostgreSQL {used['postgresql_cpu_seconds']:.1f}, the tool {client:.1f}): on these cores at most "
            f"{raw['machine_cpu_seconds'] / work:.2f} ×")


def throughput(ceiling, tool, target, label):
    """(measured, verdict) of the tool's run against a ceiling (a Result, or seconds) on the same documents.

    Judged on the tool's own work time (its "moved in" figure): the raw clients are timed from "go", once
    their processes are up and their modules imported, so the tool's start-up (row a0, a fixed 1-2 s) is
    left out of both; the ratio by wall time, start-up included, is shown beside it."""
    seconds = ceiling if isinstance(ceiling, float) else ceiling.seconds
    work = tool.extra.get("tool_reported_seconds") or tool.seconds
    ratio, wall = seconds / work, seconds / tool.seconds
    return (f"{ratio:.2f} × against {label} (the tool's work {work:.1f} s; by wall time with its start-up "
            f"{tool.seconds:.1f} s: {wall:.2f} ×)", ratio >= target)


def verdict(ok):
    return "PASS" if ok is True else "FAIL" if ok is False else "not tested"


def markdown(results, targets, machine, args):
    lines = [
        f"Machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['memory_gib']} GiB, Python {machine['python']}, "
        f"PostgreSQL {machine.get('postgresql')}, SeaweedFS {machine.get('seaweedfs')}; "
        f"load at start {machine['load_average_at_start']}; tool {machine['tool_commit']}",
        f"Documents: {args.docs} + {args.huge} huge, {machine['plain_mb']:.0f} MB, largest "
        f"{machine['largest_document_mb']} MB; compression {'on' if args.compress else 'off'}; "
        f"row j adds {args.latency_ms:g} ms round trip",
        "",
        "| row | measurement | documents | MB | wall s | docs/s | MB/s | notes |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        notes = []
        extra = r.extra
        if extra.get("tool_reported_seconds") is not None:
            notes.append(f"tool says {extra['tool_reported_seconds']:.1f}s")
        if extra.get("client_cpu_seconds") is not None:
            notes.append(f"client CPU {extra['client_cpu_seconds']:.1f}s = {cpu_per_doc_us(r):.0f} µs/doc")
        if extra.get("peak_rss_mb") is not None:
            notes.append(f"peak RSS {extra['peak_rss_mb']} MB ({extra['peak_rss_process']}), "
                         f"tree {extra['peak_tree_rss_mb']} MB, getrusage {extra.get('rusage_maxrss_mb')} MB")
        if extra.get("runs"):
            notes.append(f"median of {len(extra['runs'])} runs: " + ", ".join(f"{t:.1f}" for t in extra["runs"]) + " s")
        if extra.get("same_run_as"):
            notes.append(f"same run as ({extra['same_run_as']})")
        if extra.get("stopped_by_time_limit"):
            notes.append(f"stopped after {args.baseline_seconds:.0f}s, {r.documents} of {extra['of_documents']}")
        if "us_per_doc" in extra:
            notes.append(f"{extra['us_per_doc']:.0f} µs/doc")
        if extra.get("machine_cpu_seconds") is not None:
            notes.append(f"machine {extra['machine_cpu_seconds']:.1f} CPU-s, {extra['busy_cores']} cores busy "
                         f"(S3 server {extra['s3_server_cpu_seconds']:.1f}, PostgreSQL {extra['postgresql_cpu_seconds']:.1f})")
        lines.append(f"| {r.row} | {r.what} | {r.documents} | {r.bytes / MB:.0f} | {r.seconds:.2f} | "
                     f"{r.docs_per_s:.0f} | {r.mb_per_s:.1f} | {'; '.join(notes)} |")
    lines += ["", "| target | measured | verdict |", "| --- | --- | --- |"]
    lines += [f"| {target} | {measured} | {verdict(ok)} |" for target, measured, ok in targets]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, help="documents for rows a-f (default 3000; 500 with --quick)")
    parser.add_argument("--huge", type=int, default=0, metavar="K",
                        help="add K documents of 5-50 MB (the first ~50 MB), and run row m")
    parser.add_argument("--huge-doc-mb", type=int, default=300, metavar="MB",
                        help="the size of row m's one document (default 300)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run: 500 documents, baseline stopped after 20 s")
    parser.add_argument("--scale", action="store_true", help="row g at 10000 and 100000 documents")
    parser.add_argument("--scale-docs", metavar="A,B", help="row g at these sizes instead, e.g. 2000,20000; "
                        "100000,1000000 for the 1,000,000-document target (hours, ~120 GB of disk)")
    parser.add_argument("--workers", type=int, default=CPUS, help=f"tool workers for rows a, d, g (default {CPUS}: the CPUs)")
    parser.add_argument("--worker-counts", default="1,2,4", metavar="N,N", help="worker counts of row f (default 1,2,4)")
    parser.add_argument("--io-threads", type=int, help="pass --io-threads to the tool (default: the tool's own)")
    parser.add_argument("--tool-args", metavar="ARGS", help='more options for every migrate run (an experiment), e.g. "--batch-bytes 64MiB"')
    parser.add_argument("--compress", action="store_true", help="zlib-compress at the S3 destination (Anchore's compression)")
    parser.add_argument("--put-procs", type=int, default=CPUS, help=f"ceiling uploader processes (default {CPUS})")
    parser.add_argument("--put-threads", type=int, default=16, help="ceiling threads per uploader process (default 16)")
    parser.add_argument("--baseline-seconds", type=float, help="stop the sequential baseline after this long (default 120; 20 with --quick)")
    parser.add_argument("--repeat", type=int, metavar="N",
                        help="run each throughput measurement (rows a, b, i, j) N times and keep the median "
                             "(default 3; 1 with --quick)")
    parser.add_argument("--rows", default="abcdfghijk", help="which rows to run (default abcdfghijk, and m with --huge; e is part of a)")
    parser.add_argument("--latency-ms", type=float, default=20.0,
                        help="round-trip time row j adds between the clients and S3 (default 20)")
    parser.add_argument("--accounts-docs", type=int, default=20_000,
                        help="documents of row h, spread over 3 and over 300 accounts (default 20000)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one db→s3 run with --workers 1 (py-spy if installed, else cProfile)")
    parser.add_argument("--profile-docs", type=int, default=2000, help="documents for --profile (default 2000)")
    parser.add_argument("--run-timeout", type=float, default=1800, help="seconds any single run may take (default 1800)")
    parser.add_argument("--time-limit", type=float, help="seconds the whole benchmark may take (default 1 h; 3 h with --scale; 10 h above 200000 documents)")
    args = parser.parse_args(argv)
    args.docs = args.docs if args.docs is not None else 500 if args.quick else 3000
    args.repeat = args.repeat if args.repeat is not None else 1 if args.quick else 3
    if args.huge and "m" not in args.rows:
        args.rows += "m"
    if args.baseline_seconds is None:
        args.baseline_seconds = 20.0 if args.quick else 120.0
    args.worker_counts = [int(n) for n in args.worker_counts.split(",") if n.strip()]
    if args.scale_docs:
        args.scale_docs = [int(n) for n in args.scale_docs.split(",") if n.strip()]
    else:
        args.scale_docs = [10_000, 100_000] if args.scale else []
    if args.time_limit is None:
        biggest = max(args.scale_docs, default=0)
        args.time_limit = 10 * 3600 if biggest > 200_000 else 3 * 3600 if biggest > 20_000 else 3600
    if args.docs < 1 or args.repeat < 1 or args.huge_doc_mb < 1 or any(n < 1 for n in args.worker_counts + args.scale_docs):
        parser.error("document, worker and repeat counts must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)

    def on_alarm(signum, frame):
        raise BenchTimeout(f"the benchmark ran past --time-limit {args.time_limit:.0f}s")

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.alarm(int(args.time_limit))

    machine = machine_info()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = tempfile.mkdtemp(prefix="objmig-bench-")
    pg = s3 = bench = profile = None
    status = 1
    try:
        pg = devservers.PostgresServer().start()
        s3 = devservers.start_s3("seaweedfs")
        machine.update(server_versions(pg.dsn))
        print(f"machine: {json.dumps(machine)}", file=sys.stderr, flush=True)
        bench = Bench(args, pg, s3, workdir, logdir=os.path.join(RESULTS_DIR, f"bench-{stamp}-logs"))
        profile = bench.profile() if args.profile else None
        bench.run()
        status = 0
    except (KeyboardInterrupt, BenchTimeout) as exc:
        print(f"bench: stopped: {str(exc) or 'interrupted'}", file=sys.stderr)
        status = 130
    finally:
        signal.alarm(0)
        for server in (s3, pg):  # stopped by their own process ids (devservers)
            if server is not None:
                server.stop()
        shutil.rmtree(workdir, ignore_errors=True)  # config files and profiler output
    if status and not (bench and bench.results):
        return status

    machine["plain_mb"] = bench.corpus.get("plain_bytes", 0) / MB
    machine["largest_document_mb"] = round(bench.corpus.get("largest", 0) / 2**20, 1)
    machine["latency_ms"] = args.latency_ms
    targets = ratio_rows(bench.results, machine)
    table = markdown(bench.results, targets, machine, args)
    if status:
        table = "**INCOMPLETE RUN: stopped before every row ran.**\n\n" + table
    print(table)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    base = os.path.join(RESULTS_DIR, f"bench-{stamp}")
    with open(base + ".md", "w", encoding="utf-8") as handle:
        handle.write(table)
    with open(base + ".json", "w", encoding="utf-8") as handle:
        json.dump({
            "machine": machine,
            "arguments": {k: v for k, v in vars(args).items()},
            "results": [r.as_dict() for r in bench.results],
            "targets": [{"target": t, "measured": m, "verdict": verdict(ok)} for t, m, ok in targets],
        }, handle, indent=2)
    if profile:
        with open(base + "-profile.txt", "w", encoding="utf-8") as handle:
            handle.write(profile)
        print(profile)
    print(f"results: {base}.md, {base}.json; tool logs in {bench.logdir}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
