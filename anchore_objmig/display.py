"""What the operator sees while a long run works: a live line or log lines.

`ProgressDisplay` turns ledger.Totals snapshots into one of:
  bar   one line on a terminal, redrawn in place ("\\r" ... ESC[K), at most
        a few times a second so a fast run does not flood a slow terminal;
  log   an INFO log line every `interval` seconds (for files, journald, CI);
  none  nothing.
`auto` is bar when the stream is a terminal and log otherwise. The caller
only feeds it totals; it never touches the database. A bar line never
wraps: on a narrow terminal the meter, the rates and the byte count give way
before the counts, the ETA and the failed count do. Every size is in binary
(IEC) units. `print_json` writes a command's machine-readable result.
"""

import logging
import os
import sys
import time

import orjson

log = logging.getLogger(__name__)

MODES = ("auto", "bar", "log", "none")
BAR_REDRAW_SECONDS = 0.25  # at most 4 redraws a second
BAR_CELLS = 20
CLEAR_TO_END = "\x1b[K"


class ProgressDisplay:
    def __init__(self, mode="auto", stream=None, interval=5.0, clock=time.monotonic, bytes_label="written"):
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if is_terminal(self.stream) else "log"
        self.mode = mode
        self.interval = interval
        self.bytes_label = bytes_label  # stored bytes written (migrate) or checked (verify)
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
        line = bar_line(Facts(totals, now - self.started, self.bytes_label), terminal_width(self.stream))
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
        facts = Facts(totals, now - self.started, self.bytes_label)
        log.info("progress: %s, %d/%d shards done", facts.text(", "), totals.shards_done, totals.shards,
                 extra={"documents_done": totals.documents_done, "documents_total": totals.documents,
                        "bytes_done": totals.bytes_done, "documents_failed": totals.documents_failed})
        self.last_shown = now


class Facts:
    """The numbers both modes show, from one Totals snapshot."""

    def __init__(self, totals, elapsed, bytes_label="written"):
        self.totals, self.bytes_label = totals, bytes_label
        elapsed = max(elapsed, 1e-9)
        self.docs_rate = totals.documents_done / elapsed
        self.bytes_rate = totals.bytes_done / elapsed
        finished = totals.documents_done + totals.documents_failed
        # Shard sizes are estimates, so "done" can pass "total" by a little.
        self.fraction = min(finished / totals.documents, 1.0) if totals.documents else 1.0
        remaining = max(totals.documents - finished, 0)
        self.eta = remaining / self.docs_rate if self.docs_rate > 0 else None

    def fields(self, short=False):
        """The facts in display order, by name; `short` abbreviates."""
        t = self.totals
        eta = clock_time(self.eta) if self.eta is not None else "--:--"
        return {
            "documents": f"{t.documents_done}/{t.documents} {'docs' if short else 'documents'}",
            "percent": f"{self.fraction * 100:.1f}%",
            "bytes": f"{human_bytes(t.bytes_done)} {self.bytes_label}",
            "docs_rate": f"{self.docs_rate:.0f} docs/s",
            "bytes_rate": f"{human_bytes(self.bytes_rate)}/s",
            "eta": f"ETA {eta}",
            "failed": f"{t.documents_failed} failed",
        }

    def text(self, separator="  "):
        return separator.join(self.fields().values())


# What the bar line gives up, in order, when the terminal is too narrow: the
# meter shrinks, then goes, then the rates and the byte count. The counts,
# the ETA and the failed count stay at any width of 60 columns or more.
BAR_LAYOUTS = (
    (BAR_CELLS, (), False, "  "),
    (BAR_CELLS // 2, (), False, "  "),
    (0, (), False, "  "),
    (0, ("bytes_rate",), False, "  "),
    (0, ("bytes_rate", "docs_rate"), False, "  "),
    (0, ("bytes_rate", "docs_rate", "bytes"), False, "  "),
    (0, ("bytes_rate", "docs_rate", "bytes"), True, " "),
)


def bar_line(facts, width):
    """The fullest bar line shorter than `width` (a line as wide as the
    terminal wraps, and a wrapped line cannot be redrawn with "\\r")."""
    limit = max(width - 1, 1)
    for cells, dropped, short, separator in BAR_LAYOUTS:
        parts = [text for name, text in facts.fields(short).items() if name not in dropped]
        if cells:
            parts.insert(0, meter(facts.fraction, cells))
        line = separator.join(parts)
        if len(line) <= limit:
            return line
    return line[:limit]  # narrower than any layout: cut, never wrap


def meter(fraction, cells=BAR_CELLS):
    filled = int(fraction * cells)
    return "[" + "#" * filled + "." * (cells - filled) + "]"


def human_bytes(count):
    """Binary (IEC) units, the one unit system of every figure the tool shows."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"


def print_json(document):
    """A command's whole result as one JSON document on stdout (logs stay on stderr)."""
    sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode("utf-8") + "\n")
    sys.stdout.flush()


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
