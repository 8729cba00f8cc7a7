"""How many CPUs this process may really use: the default for --workers.

os.cpu_count() counts the host's CPUs. A container limited to 2 CPUs on a
64-core host would start 64 workers that fight for 2 CPUs; so the default
is the smallest of the CPUs this process may run on (its affinity mask) and
the cgroup's CPU quota (cgroup v2 cpu.max, or v1 cfs_quota_us/cfs_period_us),
rounded up, and at least 1.
"""

import math
import os

CGROUP_V2 = "/sys/fs/cgroup/cpu.max"
CGROUP_V1 = ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def read(path):
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return None


def quota_cpus(read=read):
    """CPUs the cgroup quota allows, or None when there is no quota."""
    text = read(CGROUP_V2)
    if text:
        quota, _, period = text.partition(" ")
        if quota != "max" and quota.isdigit() and period.isdigit() and int(period) > 0:
            return math.ceil(int(quota) / int(period))
        return None
    quota, period = (read(path) for path in CGROUP_V1)
    if quota and period and quota.lstrip("-").isdigit() and period.isdigit() and int(quota) > 0 and int(period) > 0:
        return math.ceil(int(quota) / int(period))
    return None


def usable_cpus(read=read, affinity=None):
    if affinity is None:
        try:
            affinity = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            affinity = os.cpu_count() or 1
    quota = quota_cpus(read)
    return max(1, min(affinity, quota) if quota else affinity)
