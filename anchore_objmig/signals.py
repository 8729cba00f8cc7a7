"""SIGINT and SIGTERM during a migration, held back while a database
transaction is open.

A signal handler raises in the main thread between two bytecodes: inside
psycopg's own transaction bookkeeping (between pushing a savepoint and
sending it, say), the raise leaves the connection's transaction stack out
of order, and psycopg then replaces the interruption with a
ProgrammingError ("transaction rollback at the wrong nesting level") that
ordinary error handling catches: the stop was lost and the run went on.
So inside `deferred()` a signal is only noted, and raised when the
outermost block ends: a transaction in progress commits (or fails) whole,
and the stop happens right after it. Long work inside a transaction (a
streamed COPY) calls stop_if_asked() between pieces, where raising is safe,
so it is not waited out; and a second signal while one is pending (an
operator insisting) raises at once.
"""

import contextlib
import signal
import threading

from anchore_objmig.errors import Terminated

_depth = 0  # deferred() blocks open in the main thread
_pending = None  # the first signal that came in meanwhile


def install():
    """Handle SIGINT (KeyboardInterrupt) and SIGTERM (Terminated) in this process."""
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)


def _stop_for(signum):
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def _on_signal(signum, frame):
    global _pending
    if _depth:
        first, _pending = _pending, signum
        if not first:
            return
        # A second one: raised at once; still pending too, so that if it lands
        # inside psycopg's bookkeeping and is replaced there, the block's end
        # raises it again rather than the stop being lost.
    raise _stop_for(signum)


def stop_if_asked():
    """Raise the stop a signal asked for while it was held back: called from
    our own code between two steps, never inside psycopg's bookkeeping."""
    global _pending
    if _pending and threading.current_thread() is threading.main_thread():
        signum, _pending = _pending, None
        raise _stop_for(signum)


@contextlib.contextmanager
def deferred():
    """Hold back SIGINT and SIGTERM (main thread only: handlers run there)."""
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _pending:
            signum, _pending = _pending, None
            raise _stop_for(signum)
