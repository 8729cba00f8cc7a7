"""Run a command and record the peak RSS and CPU time of its process tree (getrusage).

    python perf/rusage_run.py REPORT.json COMMAND [ARG...]

Why a wrapper: a child forked straight from bench.py (which holds the
seeded documents in memory) would count bench.py's memory as its own peak,
because Linux carries the pre-exec peak over into ru_maxrss. This wrapper is
small, so RUSAGE_CHILDREN here measures the command and the descendants it
waited for (the tool's worker processes), and nothing else.
"""

import json
import resource
import signal
import subprocess
import sys


def main():
    report, command = sys.argv[1], sys.argv[2:]
    child = subprocess.Popen(command)

    def forward(signum, _frame):  # bench.py stops us with SIGTERM: pass it on
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    returncode = child.wait()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(report, "w", encoding="utf-8") as handle:
        json.dump({"returncode": returncode, "maxrss_kb": usage.ru_maxrss, "child_pid": child.pid,
                   "cpu_seconds": usage.ru_utime + usage.ru_stime}, handle)
    sys.exit(returncode if returncode >= 0 else 128 - returncode)


if __name__ == "__main__":
    main()
