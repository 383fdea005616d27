"""Console progress: every stage, step and trial says what it did in one line, through `logging`.

One format for every process (the driver and each Ray worker, whose output Ray forwards): the
line itself, which starts with its source in brackets (`[train cwt] step 3/40 ... ETA 1m05s`).
Lines go to the *current* sys.stdout, so a redirected or captured stdout gets them too.
"""
from __future__ import annotations

import logging
import sys

FORMAT = "%(message)s"


class _CurrentStdout(logging.StreamHandler):
    """A stream handler bound to whatever sys.stdout is when a line is written."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):
        pass


def _root() -> logging.Logger:
    root = logging.getLogger("cwt_ray")
    if not any(isinstance(h, _CurrentStdout) for h in root.handlers):
        handler = _CurrentStdout()
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False   # Ray's and pytest's root handlers would print each line twice
    return root


def get_logger(name: str) -> logging.Logger:
    """The logger of one of our modules (`cwt_ray.<name>`), printing progress lines."""
    _root()
    return logging.getLogger(f"cwt_ray.{name}")


def fmt_eta(seconds: float) -> str:
    """Time left as 3m05s (or 1h02m)."""
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
