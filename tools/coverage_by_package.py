"""Prints line and branch coverage per package from the `.coverage` data `make coverage` wrote.

A package is a directory of Python files (`llm_gateway_server/routing`, …); its figures are the
sums over its files: statements run / statements, branches taken / branches (coverage.py's
branch measurement, `[tool.coverage.run] branch = true`).
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import coverage


def main() -> int:
    """Reads `.coverage`, prints one row per package and a total; returns 1 without data."""
    data_file = Path(".coverage")
    if not data_file.exists():
        print("no .coverage data: run `make coverage`", file=sys.stderr)
        return 1
    cov = coverage.Coverage(data_file=str(data_file))
    cov.load()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "coverage.json"
        cov.json_report(outfile=str(report), show_contexts=False)
        files = json.loads(report.read_text())["files"]
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # statements, missed, branches, missed
    for filename, entry in files.items():
        parts = Path(filename).parts
        root = next((i for i, p in enumerate(parts) if p in ("llm_gateway_server", "llm_gateway_client")), None)
        if root is None:
            continue
        summary = entry["summary"]
        row = totals["/".join(parts[root:-1])]
        row[0] += summary["num_statements"]
        row[1] += summary["missing_lines"]
        row[2] += summary.get("num_branches", 0)
        row[3] += summary.get("missing_branches", 0)
    print(f"{'package':<40} {'lines':>14} {'branches':>14}")
    grand = [0, 0, 0, 0]
    for package in sorted(totals):
        row = totals[package]
        grand = [g + r for g, r in zip(grand, row, strict=True)]
        print(f"{package:<40} {_pct(row[0] - row[1], row[0]):>14} {_pct(row[2] - row[3], row[2]):>14}")
    print(f"{'total':<40} {_pct(grand[0] - grand[1], grand[0]):>14} {_pct(grand[2] - grand[3], grand[2]):>14}")
    return 0


def _pct(done: int, total: int) -> str:
    return f"{100.0 * done / total:5.1f}% ({done}/{total})" if total else "n/a"


if __name__ == "__main__":
    raise SystemExit(main())
