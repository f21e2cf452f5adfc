"""One-line errors for bad input: scripts raise UserError, and run_main prints it without a traceback."""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line (file, row, flag) and exit code 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program stands so that it unwinds as on Ctrl-C (temporaries removed)."""


def _raise_terminated(signum, frame):
    raise Terminated


def run_main(main: Callable[[], int | None], *, unwind_on_sigterm: bool = False) -> None:
    """Run a script's main: UserError -> its one line and exit 2; Ctrl-C -> exit 130.

    unwind_on_sigterm: SIGTERM (kill, SLURM's scancel) unwinds like Ctrl-C and exits 143, instead of ending the
    process where it stands; the data stages ask for it so that their atomic temporaries are removed.
    """
    if unwind_on_sigterm:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        code = main()
    except UserError as e:
        prog = os.path.basename(sys.argv[0]) or "qlora"
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Terminated:
        print("terminated", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
