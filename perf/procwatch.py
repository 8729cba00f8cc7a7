"""Peak memory of a process tree, sampled from /proc every 0.2 s.

VmHWM is the kernel's own high-water mark of a process's resident set, so a
sample taken any time before the process exits already holds its peak; only
the last 0.2 s of a process's life can slip past (rusage_run.py's getrusage
figure is the cross-check for that).
"""

import os
import threading


def children_of(root):
    """Every live descendant pid of `root` (from the parent pids in /proc/*/stat)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def memory_kb(pid):
    """(VmHWM, VmRSS) of pid in kB, or None once it is gone."""
    values = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            for line in handle:
                if line.startswith((b"VmHWM:", b"VmRSS:")):
                    name, value = line.split(b":", 1)
                    values[name] = int(value.split()[0])
    except OSError:
        return None
    if b"VmHWM" not in values:  # a zombie has no memory lines
        return None
    return values[b"VmHWM"], values.get(b"VmRSS", 0)


def command_of(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class TreeMemory(threading.Thread):
    """Samples the tree under `root` (not `root` itself when skip_root) until stop()."""

    def __init__(self, root, interval=0.2, skip_root=False):
        super().__init__(daemon=True)
        self.root, self.interval, self.skip_root = root, interval, skip_root
        self.peak_kb = {}  # pid -> highest VmHWM seen
        self.commands = {}
        self.peak_total_kb = 0  # highest sum of VmRSS over the tree at one instant
        self.samples = 0
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def sample(self):
        pids = children_of(self.root) + ([] if self.skip_root else [self.root])
        total = 0
        for pid in pids:
            memory = memory_kb(pid)
            if memory is None:
                continue
            hwm, rss = memory
            if pid not in self.commands:
                self.commands[pid] = command_of(pid)
            self.peak_kb[pid] = max(self.peak_kb.get(pid, 0), hwm)
            total += rss
        self.peak_total_kb = max(self.peak_total_kb, total)
        self.samples += 1

    def stop(self):
        self._halt.set()
        self.join(5)

    def largest(self):
        """(peak kB, pid, command) of the process with the highest peak."""
        if not self.peak_kb:
            return 0, None, ""
        pid = max(self.peak_kb, key=self.peak_kb.get)
        return self.peak_kb[pid], pid, self.commands.get(pid, "")


# -- where the CPU went ------------------------------------------------------
# On a 2-core machine the S3 server and PostgreSQL share the cores with the
# client under test, so a run's wall time follows the CPU every process spent
# on it: these split that CPU by process tree.

TICKS = os.sysconf("SC_CLK_TCK")


def busy_cpu_seconds():
    """CPU seconds all cores spent busy (not idle or waiting on I/O) since boot."""
    with open("/proc/stat", encoding="ascii") as handle:
        fields = [int(value) for value in handle.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / TICKS


def tree_cpu_seconds(root):
    """CPU seconds of `root` and its descendants: the live ones' own, and the
    exited ones' as their parents collected them (cutime, cstime)."""
    total = 0.0
    for pid in [root, *children_of(root)]:
        try:
            with open(f"/proc/{pid}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile: its time is in its parent's cutime now
        total += sum(int(value) for value in fields[11:15]) / TICKS  # utime stime cutime cstime
    return total


class CpuShare:
    """The CPU seconds spent between start() and stop(): by the whole machine,
    and by each named process tree (servers, by their root pid)."""

    def __init__(self, roots):
        self.roots = {name: pid for name, pid in roots.items() if pid}
        self.before = None
        self.wall = None

    def snapshot(self):
        import time

        return time.perf_counter(), busy_cpu_seconds(), {name: tree_cpu_seconds(pid) for name, pid in self.roots.items()}

    def start(self):
        self.before = self.snapshot()
        return self

    def stop(self):
        """{"busy_cores", "machine_cpu_seconds", "<name>_cpu_seconds", ...} of the interval."""
        (t0, busy0, trees0), (t1, busy1, trees1) = self.before, self.snapshot()
        share = {"busy_cores": round((busy1 - busy0) / (t1 - t0), 2) if t1 > t0 else None,
                 "machine_cpu_seconds": round(busy1 - busy0, 2)}
        for name in self.roots:
            share[f"{name}_cpu_seconds"] = round(trees1[name] - trees0[name], 2)
        return share
