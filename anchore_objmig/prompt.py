"""The confirmation prompt of the commands that change things.

The question ends with the original tool's words, `... proceed? (y/N)`, so a
runbook that pipes `y` into anchore-manager works unchanged; before them it
says what is about to happen (how many documents, from where to where).
"""

import signal
import sys

from anchore_objmig.errors import Interrupted, UsageError

PROCEED = "Performing this operation requires *all* anchore-engine services to be stopped - proceed? (y/N) "


class _AtPrompt(BaseException):
    """Ctrl-C while the question was open (not an Exception: nothing may swallow it)."""


def _on_interrupt(signum, frame):
    # Ignore SIGINT first: nothing has started, so there is nothing to wait
    # for, and a second Ctrl-C must not break the clean exit (closing
    # connections) into tracebacks or library warnings. Should it come before
    # this line runs, it lands here too and raises the same exception.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise _AtPrompt


def ask_to_proceed(what, refused="cancelled; nothing was changed"):
    """Ask on stderr, read stdin; return on y/yes, raise on anything else."""
    try:
        previous = signal.signal(signal.SIGINT, _on_interrupt)
        sys.stderr.write(f"{what}\n{PROCEED}" if what else PROCEED)
        sys.stderr.flush()
        answer = sys.stdin.readline()
    except _AtPrompt:
        sys.stderr.write("\n")  # the terminal shows ^C after the question
        raise Interrupted("interrupted at the prompt; nothing was changed") from None
    signal.signal(signal.SIGINT, previous)
    if not answer:
        raise UsageError("no answer to the prompt (standard input closed); pass --dontask to run unattended")
    if answer.strip().lower() not in ("y", "yes"):
        raise UsageError(refused)
