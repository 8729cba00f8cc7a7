"""The confirmation prompt of the commands that change things.

The question ends with the original tool's words, `... proceed? (y/N)`, so a
runbook that pipes `y` into anchore-manager works unchanged; before them it
says what is about to happen (how many documents, from where to where).
"""

import signal
import sys

from anchore_objmig.errors import Interrupted, UsageError

PROCEED = "Performing this operation requires *all* anchore-engine services to be stopped - proceed? (y/N) "


def ask_to_proceed(what, refused="cancelled; nothing was changed"):
    """Ask on stderr, read stdin; return on y/yes, raise on anything else."""
    sys.stderr.write(f"{what}\n{PROCEED}" if what else PROCEED)
    sys.stderr.flush()
    try:
        answer = sys.stdin.readline()
    except KeyboardInterrupt:
        # Nothing has started, so there is nothing to wait for: a second
        # Ctrl-C must not break the clean exit (closing connections) into
        # tracebacks or library warnings.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.stderr.write("\n")  # the terminal shows ^C after the question
        raise Interrupted("interrupted at the prompt; nothing was changed") from None
    if not answer:
        raise UsageError("no answer to the prompt (standard input closed); pass --dontask to run unattended")
    if answer.strip().lower() not in ("y", "yes"):
        raise UsageError(refused)
