"""User errors: one clear line on stderr and a non-zero exit, never a traceback.

Every trainer raises `UserError` for what the user can fix (a bad flag, a missing folder, a model
that does not load); `run_cli` is how the root scripts turn it into `error: ...` and exit 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Callable, Optional

# Seeds go to numpy as well as torch and `random` (accelerate's `set_seed`): numpy takes 0..2**32-1.
MAX_SEED = 2**32 - 1
# The largest integer setting anything accepts: tokenizers, samplers and tensor sizes take 32 bits.
MAX_INT = 2**31 - 1


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing folder...). Printed as one line, no traceback."""


class TrainingDiverged(UserError):
    """The loss or the trained weights stopped being finite; the run ended without its final files."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run_cli(main: Callable[[], object]) -> None:
    """Run `main()`; turn `UserError` (and Ctrl-C) into one clear line and a non-zero exit.

    An `OSError` about a named file (a folder removed during the run, a full disk, no permission)
    is one line too, naming the file and the reason; what was completed before it (checkpoints)
    stays as it was.
    """
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.filename is None:
            raise
        print(f"error: {err.strerror or first_line(err)}: {err.filename}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: completed checkpoints are left as they were", file=sys.stderr)
        sys.exit(130)


def check_number_fields(config, skip: tuple[str, ...] = ("seed",)) -> None:
    """`UserError` naming the first number field of the dataclass `config` that no run can use: a
    float that is NaN or infinite, or an integer beyond 32 bits.

    `inf` and `nan` pass most range checks (`inf > 0`) and only show up as NaN weights after
    training; a huge integer (`--rank 10**30`) overflows in a library with a message that names no
    flag. Fields in `skip` are checked elsewhere (the seed, by `check_seed`).
    """
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if item.name in skip or isinstance(value, bool):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{item.name} must be a finite number, got {value}")
        if isinstance(value, int) and abs(value) > MAX_INT:
            raise UserError(f"--{item.name} is too large: at most {MAX_INT}, got {value}")


def check_seed(seed: Optional[int], flag: str = "--seed") -> None:
    """`UserError` unless `seed` is None or an integer in 0..2**32-1 (what numpy's seeding takes)."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise UserError(f"{flag} must be a whole number from 0 to {MAX_SEED}, got {seed}")


class UserErrorArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are `UserError`s, so `run_cli` prints them as one line."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UserError(f"{message} (see {self.prog} --help)")


__all__ = ["MAX_INT", "MAX_SEED", "TrainingDiverged", "UserError", "UserErrorArgumentParser", "check_number_fields",
           "check_seed", "first_line", "run_cli"]
