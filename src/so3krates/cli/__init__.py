"""The ``so3krates`` command line: one module per command group, sharing the helpers below."""

from __future__ import annotations

import argparse
import math


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: what is wrong, and where the help is."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    return _bounded(int, text, 1, "an integer ≥ 1")


def non_negative_int(text: str) -> int:
    """argparse type: an integer ≥ 0."""
    return _bounded(int, text, 0, "an integer ≥ 0")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _bounded(float, text, 0.0, "a finite number > 0")
    if value == 0.0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number ≥ 0."""
    return _bounded(float, text, 0.0, "a finite number ≥ 0")


def atomic_number(text: str) -> int:
    """argparse type: an atomic number, 1 … 118."""
    value = _bounded(int, text, 1, "an atomic number 1 … 118")
    if value > 118:
        raise argparse.ArgumentTypeError(f"expected an atomic number 1 … 118, got {text!r}")
    return value


def _bounded(kind: type, text: str, low: float, expected: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if (kind is float and not math.isfinite(value)) or value < low:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def set_torch_threads(threads: int | None) -> None:
    """Sets torch's intra-op threads when the user gave ``--threads`` (torch is imported only then)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
