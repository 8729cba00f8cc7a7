"""What the operator sees while a long run works: a live line or log lines.

`ProgressDisplay` turns ledger.Totals snapshots into one of:
  bar   one line on a terminal, redrawn in place ("\\r" ... ESC[K), at most
        a few times a second so a fast run does not flood a slow terminal;
  log   an INFO log line every `interval` seconds (for files, journald, CI);
  none  nothing.
`auto` is bar when the stream is a terminal and log otherwise. The caller
only feeds it totals; it never touches the database.
"""

import logging
import os
import sys
import time

log = logging.getLogger(__name__)

MODES = ("auto", "bar", "log", "none")
BAR_REDRAW_SECONDS = 0.25  # at most 4 redraws a second
BAR_CELLS = 20
CLEAR_TO_END = "\x1b[K"


class ProgressDisplay:
    def __init__(self, mode="auto", stream=None, interval=5.0, clock=time.monotonic):
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if is_terminal(self.stream) else "log"
        self.mode = mode
        self.interval = interval
        self.clock = clock
        self.started = clock()
        self.last_shown = None  # when we last drew or logged
        self.drawn = False  # a bar line is on screen, not yet ended by a newline
        self.filtered = []  # log handlers we taught to clear the bar first
        if mode == "bar":
            self._guard_log_handlers()

    def update(self, totals):
        now = self.clock()
        if self.mode == "bar":
            if self.last_shown is None or not self.drawn or now - self.last_shown >= BAR_REDRAW_SECONDS:
                self._draw(totals, now)
        elif self.mode == "log":
            if now - (self.last_shown if self.last_shown is not None else self.started) >= self.interval:
                self._log(totals, now)

    def close(self, totals):
        """Show the final state once more and leave the terminal on a fresh line."""
        now = self.clock()
        if self.mode == "bar":
            self._draw(totals, now)
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False
            for handler in self.filtered:
                handler.removeFilter(self._clear_bar)
            self.filtered = []
        elif self.mode == "log":
            self._log(totals, now)

    # -- bar ---------------------------------------------------------------
    def _draw(self, totals, now):
        facts = Facts(totals, now - self.started)
        line = f"{meter(facts.fraction)} {facts.text()}"
        width = terminal_width(self.stream)
        if len(line) >= width:  # a wrapped line cannot be redrawn with "\r"
            line = line[: width - 1]
        self.stream.write(f"\r{line}{CLEAR_TO_END}")
        self.stream.flush()
        self.drawn = True
        self.last_shown = now

    def _guard_log_handlers(self):
        # A log line written after the bar would start mid-line; handlers on
        # our stream first clear the bar, and the next update redraws it.
        for handler in logging.getLogger().handlers:
            if getattr(handler, "stream", None) is self.stream:
                handler.addFilter(self._clear_bar)
                self.filtered.append(handler)

    def _clear_bar(self, record):
        if self.drawn:
            self.stream.write(f"\r{CLEAR_TO_END}")
            self.drawn = False
        return True

    # -- log ---------------------------------------------------------------
    def _log(self, totals, now):
        facts = Facts(totals, now - self.started)
        log.info("progress: %s, %d/%d shards done", facts.text(", "), totals.shards_done, totals.shards,
                 extra={"documents_done": totals.documents_done, "documents_total": totals.documents,
                        "bytes_done": totals.bytes_done, "documents_failed": totals.documents_failed})
        self.last_shown = now


class Facts:
    """The numbers both modes show, from one Totals snapshot."""

    def __init__(self, totals, elapsed):
        self.totals = totals
        elapsed = max(elapsed, 1e-9)
        self.docs_rate = totals.documents_done / elapsed
        self.bytes_rate = totals.bytes_done / elapsed
        finished = totals.documents_done + totals.documents_failed
        # Shard sizes are estimates, so "done" can pass "total" by a little.
        self.fraction = min(finished / totals.documents, 1.0) if totals.documents else 1.0
        remaining = max(totals.documents - finished, 0)
        self.eta = remaining / self.docs_rate if self.docs_rate > 0 else None

    def text(self, separator="  "):
        t = self.totals
        eta = clock_time(self.eta) if self.eta is not None else "--:--"
        return separator.join([
            f"{t.documents_done}/{t.documents} documents", f"{self.fraction * 100:.1f}%",
            decimal_bytes(t.bytes_done), f"{self.docs_rate:.0f} docs/s", f"{self.bytes_rate / 1e6:.1f} MB/s",
            f"ETA {eta}", f"{t.documents_failed} failed",
        ])


def meter(fraction):
    filled = int(fraction * BAR_CELLS)
    return "[" + "#" * filled + "." * (BAR_CELLS - filled) + "]"


def decimal_bytes(count):
    size = float(count)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{count} B"


def clock_time(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def is_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def terminal_width(stream):
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        columns = 0
    return columns if columns > 0 else 80  # a fresh pty reports 0 columns
