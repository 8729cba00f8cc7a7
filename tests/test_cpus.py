"""--workers defaults to the CPUs this process may use, not the host's count."""

import os
import subprocess
import sys

from anchore_objmig import cpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def files(contents):
    return lambda path: contents.get(path)


def test_cgroup_v2_quota_is_rounded_up():
    assert cpus.quota_cpus(files({cpus.CGROUP_V2: "150000 100000"})) == 2
    assert cpus.quota_cpus(files({cpus.CGROUP_V2: "max 100000"})) is None
    assert cpus.usable_cpus(files({cpus.CGROUP_V2: "100000 100000"}), affinity=64) == 1
    assert cpus.usable_cpus(files({cpus.CGROUP_V2: "max 100000"}), affinity=8) == 8


def test_cgroup_v1_quota():
    v1 = {cpus.CGROUP_V1[0]: "300000", cpus.CGROUP_V1[1]: "100000"}
    assert cpus.usable_cpus(files(v1), affinity=64) == 3
    unlimited = {cpus.CGROUP_V1[0]: "-1", cpus.CGROUP_V1[1]: "100000"}
    assert cpus.usable_cpus(files(unlimited), affinity=4) == 4
    assert cpus.usable_cpus(files({}), affinity=0) == 1


def test_default_workers_follow_the_affinity_mask():
    code = ("import os; os.sched_setaffinity(0, {0}); from anchore_objmig.cli import build_parser; "
            "print(build_parser().parse_args(['migrate', 'a.yaml', 'b.yaml']).workers, "
            "build_parser().parse_args(['verify', 'a.yaml']).workers)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["1", "1"]
