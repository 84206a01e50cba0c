"""What a user sees on the terminal during a search, and where everything else goes.

A search prints a line for each thing it loads, the progress bar, then the front and
where its files are. Ray's and Tune's banners, the evaluators' download and loading
bars and every library's warnings go to the run's log file instead: `quiet_output`
points the process's standard output and error (file descriptors 1 and 2, which Ray's
forwarded worker logs write to as well) at the log, and keeps the terminal for
`console()`. `--verbose` leaves both on the terminal.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import IO, Iterator

LOG_FILE = "prunetune.log"

_terminal: IO[str] | None = None


def console() -> IO[str]:
    """The stream of the lines and the progress bar meant for the user (the terminal)."""
    return _terminal or sys.stderr


def say(text: str) -> None:
    """One line for the user."""
    print(text, file=console(), flush=True)


@contextmanager
def quiet_output(log_path: str) -> Iterator[IO[str]]:
    """Send everything written to standard output and error to `log_path` (appended)
    while the block runs; `console()` keeps writing to the terminal."""
    global _terminal
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    with open(log_path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        _terminal = terminal
        try:
            yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            _terminal = None
            terminal.close()
            for fd in saved:
                os.close(fd)
