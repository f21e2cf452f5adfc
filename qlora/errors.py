"""One-line errors for bad input: scripts raise UserError, and run_main prints it without a traceback."""
from __future__ import annotations

import os
import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line (file, row, flag) and exit code 2."""


def run_main(main: Callable[[], int | None]) -> None:
    try:
        code = main()
    except UserError as e:
        prog = os.path.basename(sys.argv[0]) or "qlora"
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
