"""A compact progress display of a participant run on stderr.

One line says how many subjects are done and failed of how many, which steps are
running, and the elapsed time::

    mriflow: 3/10 done, 1 failed | running: sub-04 n4, sub-05 skull_strip | 2m31s

On a terminal it is one line rewritten in place. Elsewhere (CI logs, files, batch
jobs) it is a plain line printed when the state changed, at most every
``interval`` seconds (30), so that a long run leaves a readable, short log. It is
fed by Nipype's ``status_callback`` (local plugins; graph plugins cannot call back).
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from mriflow.bids.paths import subject_dirname

__all__ = ["Progress", "format_elapsed"]

#: Node names whose end means "the subject is published".
PUBLISH_NODE = "publish"
#: Running steps named on the line (the others are counted).
SHOWN_STEPS = 3


def format_elapsed(seconds: float) -> str:
    """``"45s"``, ``"2m05s"``, ``"1h02m"``."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Nipype ``status_callback`` that shows the run's progress.

    Parameters
    ----------
    prefixes : dict
        Sub-workflow full name -> subject label (``mriflow_wf.sub_01_wf`` -> ``01``).
    total : int
        Subjects of the run, those failed before the graph included.
    failed : iterable of str, optional
        Subjects already failed (e.g. unreadable inputs).
    stream : text stream, optional
        Default ``sys.stderr``.
    interval : float
        Shortest time between two printed lines when ``stream`` is not a terminal.
    tty : bool, optional
        Override the terminal detection (tests).
    clock : callable
        Seconds, monotonic (tests pass a fake one).
    """

    def __init__(
        self,
        prefixes: dict[str, str],
        total: int,
        *,
        failed: Any = (),
        stream: TextIO | None = None,
        interval: float = 30.0,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.prefixes = prefixes
        self.total = total
        self.done: set[str] = set()
        self.failed: set[str] = set(failed)
        self.running: dict[str, tuple[str, str]] = {}  # node full name -> (subject, step)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval
        self.clock = clock
        self.started = clock()
        self._last_state: tuple | None = None
        self._last_time = float("-inf")
        self._pending = False
        self._width = 0

    def _subject(self, fullname: str) -> str | None:
        return next((s for p, s in self.prefixes.items() if fullname.startswith(p + ".")), None)

    def __call__(self, node, status: str) -> None:
        fullname = node.fullname
        subject = self._subject(fullname)
        if subject is None:
            return
        if status == "start":
            self.running[fullname] = (subject, node.name)
        else:
            self.running.pop(fullname, None)
            if status == "exception" and subject not in self.done:
                self.failed.add(subject)
            elif status == "end" and node.name == PUBLISH_NODE and subject not in self.failed:
                self.done.add(subject)
        self.show()

    def state(self) -> tuple:
        """What the line says, without the time (a change of it is worth a line)."""
        return (len(self.done), len(self.failed), tuple(sorted(self.running.values())))

    def line(self) -> str:
        done, failed, running = self.state()
        text = f"mriflow: {done}/{self.total} done"
        if failed:
            text += f", {failed} failed"
        if running:
            steps = [f"{subject_dirname(s)} {step}" for s, step in running[:SHOWN_STEPS]]
            more = f" +{len(running) - SHOWN_STEPS}" if len(running) > SHOWN_STEPS else ""
            text += f" | running: {', '.join(steps)}{more}"
        return f"{text} | {format_elapsed(self.clock() - self.started)}"

    def show(self, *, force: bool = False) -> None:
        """Print the line if worth it (terminal: always; otherwise on change, rate-limited)."""
        now = self.clock()
        state = self.state()
        if self.tty:
            if force or now - self._last_time >= 0.2:
                self._rewrite(self.line())
                self._last_time = now
            return
        changed = state != self._last_state or self._pending
        if not changed:
            return
        if force or now - self._last_time >= self.interval:
            print(self.line(), file=self.stream, flush=True)
            self._last_state, self._last_time, self._pending = state, now, False
        else:
            self._pending = True  # printed with the next event after the interval

    def _rewrite(self, text: str) -> None:
        # a line longer than the terminal wraps, and "\r" then rewrites only its last part
        text = text[: max(20, shutil.get_terminal_size().columns - 1)]
        pad = " " * max(0, self._width - len(text))
        self.stream.write(f"\r{text}{pad}")
        self.stream.flush()
        self._width = len(text)

    def close(self) -> None:
        """The last state; a terminal line is ended so the summary starts on its own line."""
        if self.tty:
            self._rewrite(self.line())
            self.stream.write("\n")
            self.stream.flush()
        else:
            self.show(force=True)
