"""Command-line number types that refuse a value outside their range (argparse: one line, exit 2)."""
from __future__ import annotations

import argparse
import math
from typing import Callable


def number(kind: type, low: float, high: float = math.inf, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse `type`: `kind(text)`, finite, >= `low` (> with `low_open`) and <= `high`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a{'n integer' if kind is int else ' number'}, got {text!r}")
        inside = (value > low if low_open else value >= low) and value <= high
        if not (math.isfinite(value) and inside):
            bounds = f"{'above' if low_open else 'at least'} {low:g}" + (f" and at most {high:g}" if high < math.inf else "")
            raise argparse.ArgumentTypeError(f"expected a number {bounds}, got {text}")
        return value
    return parse
