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
