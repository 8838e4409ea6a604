"""What every ``python -m arkfast.<command>`` shares: argparse number types and the error wrapper.

    p.add_argument("--agents", type=POSITIVE_INT, ...)      # "expected an integer >= 1, got '0'"
    if __name__ == "__main__":
        run_cli(main)                                      # bad input: one "error: ..." line, exit 2
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["NON_NEGATIVE_INT", "POSITIVE_INT", "PROBABILITY", "TEMPERATURE", "number", "run_cli"]


def number(kind: type, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           what: str = "") -> Callable[[str], Any]:
    """An argparse ``type`` parsing ``kind`` and checking ``low <= x`` (``low < x`` with ``low_open``)
    and ``x <= high``; a bad value becomes argparse's one-line usage error naming the flag."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what or kind.__name__}, got {text!r}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


POSITIVE_INT = number(int, low=1, what="an integer >= 1")
NON_NEGATIVE_INT = number(int, low=0, what="an integer >= 0")
TEMPERATURE = number(float, low=0.0, what="a number >= 0")
PROBABILITY = number(float, low=0.0, low_open=True, high=1.0, what="a number in (0, 1]")


def run_cli(main: Callable[[], Any], *, interrupted: str | None = None,
            failures: tuple[type[BaseException], ...] = ()) -> None:
    """Run a command's ``main()``. Bad input (``ValueError``, ``FileNotFoundError``) prints one
    ``error: ...`` line and exits 2, with no traceback; an exception of ``failures`` (a run that
    started and had to stop, e.g. on a non-finite loss) prints its line and exits 1; Ctrl-C prints
    ``interrupted`` (how to continue) when given and exits 130."""
    try:
        main()
    except failures as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if interrupted:
            print(interrupted, file=sys.stderr)
        sys.exit(130)
