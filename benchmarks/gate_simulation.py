"""How often the statistical gate says PASS, FAIL and INCONCLUSIVE when the truth is known.

Three classes (ok and two defects), paired cells (both right, float only, artifact only, both wrong)
per class; every defect error is a call of ok, so the escape table is the defect classes' sum.
Margins 1 point each (0 for the escape margin in the zero-margin case), alpha 0.05. Prints a
markdown table of verdict shares over seeded draws.

    python benchmarks/gate_simulation.py [--draws 10000]
"""
from __future__ import annotations

import argparse

import numpy as np

from edge_tl.paired_stats import Verdict, gate_verdicts

SCENARIOS = {  # name: (cells of ok, defect 1, defect 2; escape margin in points)
    "drop at the margin (1 point)": ([(0.95, 0.04, 0.01, 0.0), (0.97, 0.0, 0.0, 0.03), (0.97, 0.0, 0.0, 0.03)], 1.0),
    "escape rise at the margin (1 point)": (
        [(0.98, 0.01, 0.01, 0.0), (0.97, 0.015, 0.005, 0.01), (0.97, 0.015, 0.005, 0.01)], 1.0),
    "no escape change, zero escape margin": (
        [(0.98, 0.01, 0.01, 0.0), (0.97, 0.01, 0.01, 0.01), (0.97, 0.01, 0.01, 0.01)], 0.0),
    "as good as float (1% discordance)": (
        [(0.99, 0.005, 0.005, 0.0), (0.98, 0.005, 0.005, 0.01), (0.98, 0.005, 0.005, 0.01)], 1.0),
}
SIZES = (50, 200, 1000, 3000)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=10_000)
    args = parser.parse_args(argv)
    print("| truth | images per class | PASS | FAIL | INCONCLUSIVE |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, (cells, max_escape_rise) in SCENARIOS.items():
        for n in SIZES:
            rng = np.random.default_rng(n)
            counts = np.stack([rng.multinomial(n, p, size=args.draws) for p in cells], axis=1)
            verdicts = gate_verdicts(counts, counts[:, 1:].sum(axis=1), 1.0, max_escape_rise, alpha=0.05)
            shares = [f"{(verdicts == v.value).mean():.2%}" for v in Verdict]
            print(f"| {name} | {n} | {' | '.join(shares)} |")


if __name__ == "__main__":
    main()
