"""User errors: one clear line on stderr and a non-zero exit, never a traceback.

Every trainer raises `UserError` for what the user can fix (a bad flag, a missing folder, a model
that does not load); `run_cli` is how the root scripts turn it into `error: ...` and exit 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing folder...). Printed as one line, no traceback."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run_cli(main: Callable[[], object]) -> None:
    """Run `main()`; turn `UserError` (and Ctrl-C) into one clear line and a non-zero exit."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: completed checkpoints are left as they were", file=sys.stderr)
        sys.exit(130)


class UserErrorArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are `UserError`s, so `run_cli` prints them as one line."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UserError(f"{message} (see {self.prog} --help)")


__all__ = ["UserError", "UserErrorArgumentParser", "first_line", "run_cli"]
