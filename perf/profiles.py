"""Profile one tool run: py-spy when it is installed, else cProfile.

py-spy sees every thread of every process and, with --gil, only samples
taken while a thread holds the GIL: that is where a worker's Python CPU
goes, which is what limits a worker. cProfile sees only the main thread, so
the S3 work in the I/O threads shows up as waiting (Future.result); it is
the fallback, not the better tool.
"""

import collections
import io
import os
import pstats
import re
import shutil
import sys

PY_SPY_RATE = 200  # samples a second


def find_py_spy():
    """A py-spy binary: $PY_SPY, on PATH, or beside this interpreter (the venv)."""
    for candidate in (os.environ.get("PY_SPY"), shutil.which("py-spy"),
                      os.path.join(os.path.dirname(sys.executable), "py-spy")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def wrap_command(tool_argv, out_path):
    """(argv, kind): the tool's argv run under py-spy or cProfile, writing to out_path."""
    py_spy = find_py_spy()
    if py_spy:
        return [py_spy, "record", "--gil", "--subprocesses", "--format", "raw", "--rate", str(PY_SPY_RATE),
                "--output", out_path, "--", *tool_argv], "py-spy"
    python, dash_m, module, *rest = tool_argv
    return [python, "-m", "cProfile", "-o", out_path, dash_m, module, *rest], "cProfile"


def summarize(kind, path, top=25):
    return summarize_py_spy(path, top) if kind == "py-spy" else summarize_cprofile(path, top)


def summarize_py_spy(path, top):
    """Self and inclusive share of the GIL-holding samples, per function (line numbers merged)."""
    own, inclusive = collections.Counter(), collections.Counter()
    total = 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            # raw format: "process;frame;frame;... count", each frame "function (file:line)"
            frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")[1:]]
            if not frames:
                continue
            total += int(count)
            own[frames[-1]] += int(count)
            for frame in set(frames):
                inclusive[frame] += int(count)
    out = io.StringIO()
    out.write(f"py-spy --gil: {total} samples at {PY_SPY_RATE}/s = {total / PY_SPY_RATE:.1f}s holding the GIL\n")
    out.write("\nself (the function itself holds the GIL):\n")
    for frame, count in own.most_common(top):
        out.write(f"  {count / total:6.1%}  {frame}\n")
    out.write("\ninclusive (the function or what it calls):\n")
    for frame, count in inclusive.most_common(top + 15):
        out.write(f"  {count / total:6.1%}  {frame}\n")
    return out.getvalue()


def summarize_cprofile(path, top):
    out = io.StringIO()
    out.write("cProfile (main thread only: work in I/O threads shows as waiting)\n")
    stats = pstats.Stats(path, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()
