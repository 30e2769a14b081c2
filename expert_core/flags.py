"""Checks of the entry points' numeric flags, each entry point reporting every bad one in one message."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def counts_below_one(args: argparse.Namespace, names) -> list[str]:
    """What is wrong with each count flag among `names` set below 1 (unset ones are left to their default)."""
    return [f"--{name.replace('_', '-')} of at least 1, found {getattr(args, name)}"
            for name in names if getattr(args, name) is not None and getattr(args, name) < 1]


def refuse_counts_below_one(parser: argparse.ArgumentParser, args: argparse.Namespace, names) -> None:
    """argparse's usage error (exit 2) naming every count flag among `names` set below 1, if any."""
    problems = counts_below_one(args, names)
    if problems:
        parser.error(f"expected {'; '.join(problems)}. Change those flags (--help describes them).")


def refuse_an_unwritable_json(parser: argparse.ArgumentParser, path: str | None) -> None:
    """argparse's usage error for a --json path that could not be written, before the minutes of work
    whose results it is for."""
    if path is None:
        return
    folder = Path(path).parent
    if Path(path).is_dir():
        problem = "is a directory"
    elif not folder.is_dir():
        problem = f"its folder {folder} does not exist"
    elif not os.access(folder, os.W_OK | os.X_OK):  # a new file needs both
        problem = f"its folder {folder} is not writable"
    else:
        return
    parser.error(f"expected --json to name a file that can be written, found {path}: {problem}. "
                 "Create the folder or choose another path.")
