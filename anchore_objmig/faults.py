"""Crash and freeze points, for the tests that kill or freeze a migration mid-way.

With OBJMIG_CRASH_AT=POINT:N in the environment, the N-th time a process of
the run reaches POINT, the whole process group is killed with SIGKILL: no
cleanup, no finally blocks, exactly like a power cut or the OOM killer.
With OBJMIG_FREEZE_AT=POINT:N, the process reaching it stops itself with
SIGSTOP instead (a frozen host, a VM pause) until a test sends SIGCONT.
With OBJMIG_SIGNAL_AT=POINT:N:NAME (NAME = TERM or INT), it sends that
signal to its whole process group, as an operator's kill or Ctrl-C would,
at a point chosen by the test rather than wherever a timer lands.
Unset (always, outside the tests) each costs one comparison.
"""

import os
import signal
import threading


def _parse(variable):
    point, _, rest = os.environ.get(variable, "").partition(":")
    count, _, extra = rest.partition(":")
    return point, int(count or 1), extra


_CRASH_POINT, _CRASH_COUNT, _ = _parse("OBJMIG_CRASH_AT")
_FREEZE_POINT, _FREEZE_COUNT, _ = _parse("OBJMIG_FREEZE_AT")
_SIGNAL_POINT, _SIGNAL_COUNT, _SIGNAL_NAME = _parse("OBJMIG_SIGNAL_AT")
_lock = threading.Lock()
_reached = {}


def _reached_nth(name, count):
    with _lock:
        _reached[name] = _reached.get(name, 0) + 1
        return _reached[name] == count


def crash_point(name):
    if name == _CRASH_POINT and _reached_nth(name, _CRASH_COUNT):
        os.killpg(os.getpgrp(), signal.SIGKILL)
    if name == _FREEZE_POINT and _reached_nth("freeze:" + name, _FREEZE_COUNT):
        os.kill(os.getpid(), signal.SIGSTOP)
    if name == _SIGNAL_POINT and _reached_nth("signal:" + name, _SIGNAL_COUNT):
        os.killpg(os.getpgrp(), getattr(signal, "SIG" + _SIGNAL_NAME))
