"""Crash points, for the tests that kill a migration mid-way.

With OBJMIG_CRASH_AT=POINT:N in the environment, the N-th time a process of
the run reaches POINT, the whole process group is killed with SIGKILL: no
cleanup, no finally blocks, exactly like a power cut or the OOM killer. Unset
(always, outside the tests) it costs one comparison.
"""

import os
import signal
import threading

_SPEC = os.environ.get("OBJMIG_CRASH_AT", "")
_POINT, _, _COUNT = _SPEC.partition(":")
_lock = threading.Lock()
_reached = 0


def crash_point(name):
    global _reached
    if name != _POINT:
        return
    with _lock:
        _reached += 1
        if _reached >= int(_COUNT or 1):
            os.killpg(os.getpgrp(), signal.SIGKILL)
