"""The one set of input rules: the ranges every number may take, what a run name may be, and how a
``CLASS=FRACTION`` target is spelled. The command line (argparse ``type=``), ``--config`` files, config.json,
the Python API's configs and the web server all check values with these, so a value refused in one place is
refused everywhere, with the same one line.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from skinlesion.errors import SkinLesionError


@dataclass(frozen=True)
class Range:
    """An int or a finite float in [low, high] (``low_open`` / ``high_open``: that end excluded)."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def wanted(self) -> str:
        def text(v: float) -> str:
            return str(int(v)) if self.kind is int else f"{v:g}"

        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {text(self.low)}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {text(self.high)}")
        what = "an integer" if self.kind is int else "a finite number"
        return " and ".join([f"{what} {bounds[0]}" if bounds else what, *bounds[1:]])

    def ok(self, value: int | float) -> bool:
        if self.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            return False
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return False
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return not (too_low or too_high)

    def check(self, name: str, value: int | float) -> int | float:
        """``value`` itself, or one SkinLesionError naming ``name`` and the range."""
        if not self.ok(value):
            raise SkinLesionError(f"{name}: expected {self.wanted()}, got {value!r}")
        return value

    def parse(self, text: str) -> int | float:
        """Text (a command-line value) to a checked number; ValueError with the range for argparse."""
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise ValueError(f"expected {self.wanted()}, got {text!r}") from None
        if not self.ok(value):
            raise ValueError(f"expected {self.wanted()}, got {text}")
        return value


# Shared ranges. The bounds are generous for real use and stop the absurd (a 52 GB allocation, a billion resamples).
POSITIVE = Range(float, 0, low_open=True)
NON_NEGATIVE = Range(float, 0)
FINITE = Range(float)
FRACTION = Range(float, 0, 1, low_open=True, high_open=True)  # (0, 1)
PART = Range(float, 0, 1, high_open=True)  # [0, 1)
AT_LEAST_0 = Range(int, 0)
AT_LEAST_1 = Range(int, 1)
LEARNING_RATE = Range(float, 0, 10, low_open=True)
WEIGHT_DECAY = Range(float, 0, 10)
MEAN = Range(float, -10, 10)
STD = Range(float, 1e-3, 100)
IMG_SIZE = Range(int, 32, 1024)  # the backbones downsample 32x; 1024 px is past every dermoscopy recipe
EPOCHS = Range(int, 1, 10_000)
BATCH_SIZE = Range(int, 1, 65_536)
WORKERS = Range(int, 0, 256)
SEED = Range(int, 0, 2**32 - 1)  # NumPy's seeds
BOOTSTRAP = Range(int, 0, 100_000)
GRID_SIZE = Range(int, 32, 1024)
PORT = Range(int, 1, 65535)
AGE = Range(float, 0, 120)


# A run name is one folder name: letters, digits, '.', '_', '-', '+', '=', '@'; not starting with a dot.
_RUN_NAME = re.compile(r"[A-Za-z0-9_+=@-][A-Za-z0-9._+=@-]{0,127}")


def run_name(value: str, what: str = "--run-name") -> str:
    """A plain folder name, so a run folder stays inside --out (no separators, no '..', no leading dot)."""
    if not isinstance(value, str) or not _RUN_NAME.fullmatch(value):
        raise SkinLesionError(f"{what} {value!r} is not a plain folder name; use letters, digits, '.', '_' and '-' "
                              "(no '/', no leading '.')")  # fmt: skip
    return value


SENSITIVITY = Range(float, 0, 1, low_open=True)  # (0, 1]
TARGETS_HELP = "CLASS=FRACTION, comma-separated or repeated, e.g. mel=0.75"


def targets(specs: str | list[str] | None) -> dict[str, float]:
    """``CLASS=FRACTION[,CLASS=FRACTION ...]`` (one string, or a list of them from a repeated flag), e.g. ``mel=0.75``
    -> {class: fraction}; None / '' / 'none' -> {}. The class codes are checked against a run's classes where used
    (decision.operating_point.parse_targets)."""
    items = [s.strip() for spec in ([specs] if isinstance(specs, str) else specs or []) for s in str(spec).split(",")]
    items = [s for s in items if s and s.lower() != "none"]
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = (x.strip() for x in item.partition("="))
        try:
            fraction = float(value) if sep and name else math.nan
        except ValueError:
            fraction = math.nan
        if not SENSITIVITY.ok(fraction):
            raise SkinLesionError(f"--min-sensitivity {item!r}: expected {TARGETS_HELP} (a fraction in (0, 1])")
        if name in out:
            raise SkinLesionError(f"--min-sensitivity names {name} twice; give each class once")
        out[name] = fraction
    return out


def targets_text(values: dict[str, float]) -> str | None:
    """The one spelling of a target set: ``mel=0.75,bcc=0.8`` (None for none)."""
    return ",".join(f"{k}={v:g}" for k, v in values.items()) or None
