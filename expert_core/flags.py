"""Checks of the entry points' numeric flags, each entry point reporting every bad one in one message."""

from __future__ import annotations

import argparse


def counts_below_one(args: argparse.Namespace, names) -> list[str]:
    """What is wrong with each count flag among `names` set below 1 (unset ones are left to their default)."""
    return [f"--{name.replace('_', '-')} of at least 1, found {getattr(args, name)}"
            for name in names if getattr(args, name) is not None and getattr(args, name) < 1]


def refuse_counts_below_one(parser: argparse.ArgumentParser, args: argparse.Namespace, names) -> None:
    """argparse's usage error (exit 2) naming every count flag among `names` set below 1, if any."""
    problems = counts_below_one(args, names)
    if problems:
        parser.error(f"expected {'; '.join(problems)}. Change those flags (--help describes them).")
