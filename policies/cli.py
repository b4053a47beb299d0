"""What every command-line tool does at its edge: bad input is one line, not a traceback.

``run_cli(main)`` calls a script's ``main(argv)``. An error in what the user gave (a
``ValueError``, a missing or clashing file) prints ``error: <what is wrong and what is
valid>`` on stderr and exits with status 2, like argparse's own usage errors; ``--debug``
anywhere on the command line shows the traceback instead. Ctrl-C prints one line and exits
with 130 (the interruption's own message when it has one): every long command writes its
state atomically, and the same command run again resumes where it stopped.
Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run ``main`` on ``argv`` (default: the command line); the process's exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        result = main(argv)
    except KeyboardInterrupt as exc:
        if debug:
            raise
        said = str(exc) or "what was saved is complete; run the same command again to resume"
        print(f"interrupted: {said}", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if debug:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
