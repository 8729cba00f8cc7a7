"""Nothing left behind: multipart uploads and localfs temporary files of
failed or killed writes are cleaned up, and said so."""

import os

import anchore_sim
from faultproxy import FaultProxy, Rule
from helpers import assert_all_readable, section, through_proxy, urls, write_config

MIB = 1024 * 1024


def incomplete(s3, bucket):
    return sorted(upload["Key"] for upload in s3.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def test_a_failed_part_stops_its_siblings_and_the_upload_is_aborted(db, s3, cli, tmp_path):
    big = anchore_sim.Doc("admin", "analysis_data", "sha256:" + "b" * 64, b'{"blob": "' + b"y" * (40 * MIB) + b'"}')
    small = anchore_sim.make_docs(5, seed=81)
    anchore_sim.store(db, anchore_sim.Location("db"), [big, *small])
    bucket = s3.new_bucket()
    with FaultProxy(s3.endpoint) as proxy:
        proxy.add(Rule("500", method="PUT", path=r"partNumber=1(&|$)", times=None))
        source = write_config(tmp_path / "a.yaml", section("db"))
        dest = write_config(tmp_path / "b.yaml", section("s3", through_proxy(s3, proxy, bucket, max_attempts=1)))
        result = cli("migrate", source, dest, "--dontask", "--workers", "1", "--multipart-threshold", "5MiB")
        parts = {path.split("partNumber=")[1].split("&")[0] for method, path, _, _ in proxy.seen
                 if method == "PUT" and "partNumber=" in path}
        aborts = [path for method, path, _, _ in proxy.seen if method == "DELETE" and "uploadId=" in path]
    assert result.returncode == 1
    named = [line for line in result.stderr.splitlines() if "FAILED" in line]
    assert len(named) == 1 and big.archive_id in named[0] and "InternalError" in named[0]
    assert "still at the source and readable" in result.stderr  # true: the read worked, the write did not
    # 8 parts of 5 MiB, 4 at a time: the parts not yet started when part 1's
    # failure came back were never sent (how many had started depends on load)
    assert len(parts) < 8, parts
    assert len(aborts) == 1
    assert incomplete(s3, bucket) == []
    assert_all_readable(db, s3.client, [big, *small])
    url = db.execute('SELECT content_url FROM archive_metadata WHERE "archiveId" = %s', (big.archive_id,)).fetchone()[0]
    assert url.startswith("db://")


def test_incomplete_uploads_of_our_keys_are_aborted_at_start_and_reported_by_check(db, s3, cli, tmp_path):
    docs = anchore_sim.make_docs(6, seed=82)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    bucket = s3.new_bucket()
    prefix = "pre/"
    ours = f"{prefix}{docs[0].user_id}/{docs[0].bucket}/{docs[0].archive_id}"  # as a killed run left it
    theirs = f"{prefix}someone-else/upload"
    for key in (ours, theirs):
        upload = s3.client.create_multipart_upload(Bucket=bucket, Key=key)
        s3.client.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"z" * MIB)
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket, prefix=prefix)))

    check = cli("check", dest)
    assert check.returncode == 0, check.stderr
    assert "2 incomplete multipart uploads under" in check.stdout

    source = write_config(tmp_path / "a.yaml", section("db"))
    result = cli("migrate", source, dest, "--dontask")
    assert result.returncode == 0, result.stderr
    assert "aborted 1 incomplete multipart uploads" in result.stderr
    assert "1 other incomplete multipart uploads" in result.stderr
    assert incomplete(s3, bucket) == [theirs]
    assert_all_readable(db, s3.client, docs)
    assert all(url.startswith(f"s3://{bucket}/{prefix}") for url in urls(db))


def test_killed_multipart_upload_is_aborted_by_the_rerun(db, s3, cli, tmp_path):
    big = [anchore_sim.Doc("admin", "analysis_data", f"big-{n}", b"q" * (12 * MIB)) for n in range(2)]
    anchore_sim.store(db, anchore_sim.Location("db"), big)
    bucket = s3.new_bucket()
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("s3", s3.driver_config(bucket)))
    args = ["migrate", source, dest, "--dontask", "--workers", "1", "--multipart-threshold", "5MiB"]
    killed = cli(*args, env={"OBJMIG_CRASH_AT": "s3-part:1"})
    assert killed.returncode == -9
    assert incomplete(s3, bucket)  # what the kill left
    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "incomplete multipart uploads left under" in rerun.stderr
    assert incomplete(s3, bucket) == []
    assert_all_readable(db, s3.client, big)


def temporaries(root):
    return [name for _, _, files in os.walk(root) for name in files if name.startswith(".objmig-")]


def test_temporary_files_of_killed_localfs_writes_are_removed_by_the_next_run(db, cli, tmp_path):
    docs = anchore_sim.make_docs(40, seed=83)
    anchore_sim.store(db, anchore_sim.Location("db"), docs)
    files = tmp_path / "files"
    source = write_config(tmp_path / "a.yaml", section("db"))
    dest = write_config(tmp_path / "b.yaml", section("localfs", {"archive_data_dir": str(files)}))
    args = ["migrate", source, dest, "--dontask", "--workers", "1", "--io-threads", "4"]
    for round_ in range(3):
        killed = cli(*args, env={"OBJMIG_CRASH_AT": f"localfs-write:{3 + round_}"})
        assert killed.returncode == -9
    left = temporaries(files)
    assert left  # partial files the kills left behind
    # A fresh one of a writer on another host is not ours to remove.
    foreign = files / ".objmig-elsewhere.example.42.abcdefgh"
    foreign.write_bytes(b"partial")
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert f"removed {len(left)} temporary files" in result.stderr
    assert temporaries(files) == [foreign.name]
    assert_all_readable(db, None, docs)
    assert all(url.startswith(f"file://{files}/") for url in urls(db))


def test_localfs_syncs_every_directory_up_to_archive_data_dir(tmp_path, monkeypatch):
    from anchore_objmig import codec
    from anchore_objmig.drivers import DriverContext, WriteItem
    from anchore_objmig.drivers.localfs import LocalFsDriver
    from anchore_objmig.config import StoreConfig

    root = tmp_path / "archive"
    store = StoreConfig("config.yaml", "services.catalog.object_store", "localfs", {"archive_data_dir": str(root)})
    driver = LocalFsDriver(store, DriverContext(io_threads=1))
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), real_fsync(fd))[1])
    url = driver.url_for("admin", "analysis_data", "sha256:1234")
    stored = codec.encode(b'{"a": 1}', False, 0)
    assert driver.write_many([WriteItem(url, "admin", "analysis_data", "sha256:1234", stored)]) == {}
    driver.close()
    path = url[len("file://"):]
    chain = [os.path.dirname(path)]
    while chain[-1] != str(root):
        chain.append(os.path.dirname(chain[-1]))
    assert len(chain) == 4  # {md5[:2]}, {bucket}, {md5(user)}, archive_data_dir: all new
    assert {os.stat(directory).st_ino for directory in chain} <= set(synced)
