"""``skinlesion report``: figures/*.png and one self-contained report.html (reporting/build.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from skinlesion.device import resolve_device
from skinlesion.evaluation.scoring import SUMMARY_ROWS
from skinlesion.reporting.build import ReportOptions, write_report
from skinlesion.reporting.report import fmt


def main(args: argparse.Namespace) -> None:
    options = ReportOptions(str(resolve_device(args.device)), args.cam_method, args.gallery, args.grid_per_class,
                            args.grid_size)  # fmt: skip
    out, n_images, m = write_report(args.run_dir, options)
    print(f"wrote {out} ({n_images} embedded images, {out.stat().st_size / 1e6:.1f} MB) and "
          f"{Path(args.run_dir) / 'figures'}/")  # fmt: skip
    print("  " + "  ".join(f"{k} {fmt(m.get(k))}" for k in SUMMARY_ROWS[:3]))
