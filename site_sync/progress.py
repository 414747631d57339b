"""What a deploy shows while it runs: a live per-node table on a terminal, plain lines elsewhere.

The deployer never prints a secret, so everything here may appear in `pulumi up`, CI logs and
terminals alike. Node states and log lines are events; a Progress turns them into output.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol, TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table


class Progress(Protocol):
    """Where a command reports what it does."""

    def log(self, line: str) -> None:
        """A line worth keeping in the log."""

    def node(self, name: str, state: str) -> None:
        """A node's current state (waiting, staging, active, ...)."""

    def close(self) -> None:
        """The command is done; stop any live display."""


class PlainProgress:
    """Timestamped lines, one per event: for logs, CI and `pulumi up`."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.started = time.monotonic()
        self._lock = threading.Lock()

    def log(self, line: str) -> None:
        """Print one line with the seconds since the start."""
        with self._lock:
            print(f"[{time.monotonic() - self.started:6.1f}s] {line}", file=self.stream, flush=True)

    def node(self, name: str, state: str) -> None:
        """Print a node's new state as a line."""
        self.log(f"{name}: {state}")

    def close(self) -> None:
        """Nothing to stop."""


class LiveProgress:
    """A table of nodes and their states that updates in place, with log lines above it."""

    def __init__(self, stream: TextIO) -> None:
        self.console = Console(file=stream)
        self.states: dict[str, tuple[str, float]] = {}
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self.live = Live(self._table(), console=self.console, refresh_per_second=4, transient=False)
        self.live.start()

    def _table(self) -> Table:
        table = Table("node", "state", "for", box=None, pad_edge=False)
        now = time.monotonic()
        for name, (state, since) in sorted(self.states.items()):
            table.add_row(name, state, f"{now - since:4.0f}s")
        return table

    def log(self, line: str) -> None:
        """Print a line above the table."""
        with self._lock:
            self.console.log(line, markup=False, highlight=False)

    def node(self, name: str, state: str) -> None:
        """Update a node's row."""
        with self._lock:
            self.states[name] = (state, time.monotonic())
            self.live.update(self._table())

    def close(self) -> None:
        """Stop updating and leave the final table on screen."""
        with self._lock:
            self.live.update(self._table())
            self.live.stop()


def progress_for(stream: TextIO) -> Progress:
    """A live table on a terminal, plain lines anywhere else."""
    return LiveProgress(stream) if stream.isatty() else PlainProgress(stream)
