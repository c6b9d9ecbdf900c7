"""Prints line and branch coverage per package from the `.coverage` data `make coverage` wrote.

A package is a directory of Python files (`llm_gateway_server/routing`, …); its figures are the
sums over its files: statements run / statements, branches taken / branches (coverage.py's
branch measurement, `[tool.coverage.run] branch = true`).
"""

from __future__ import annotations

import sys
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
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # statements, missed, branches, partial/missed
    for filename in cov.get_data().measured_files():
        path = Path(filename)
        parts = path.parts
        root = next((i for i, p in enumerate(parts) if p in ("llm_gateway_server", "llm_gateway_client")), None)
        if root is None:
            continue
        package = "/".join(parts[root:-1])
        analysis = cov._analyze(filename)  # noqa: SLF001 - the public report API prints, it does not return figures
        numbers = analysis.numbers
        row = totals[package]
        row[0] += numbers.n_statements
        row[1] += numbers.n_missing
        row[2] += numbers.n_branches
        row[3] += numbers.n_missing_branches
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
