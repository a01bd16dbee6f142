"""Defect images a line needs before the statistical gate can PASS the escape criterion.

Flips are defects the float model catches and the artifact calls ok; the artifact catches nothing
the float model misses, and the float model catches every defect. The gate's upper bound of the
escape-rate rise (Newcombe square-and-add, two-sided at 1 - alpha) must be within the margin.
Prints a markdown table: the n from which the expected table passes, and the n from which a PASS
has at least the given probability.

    python benchmarks/gate_sample_size.py [--alpha 0.05] [--power 0.8]
"""
from __future__ import annotations

import argparse

from edge_tl.paired_stats import defect_images_for_pass

MARGINS_POINTS = (1.0, 2.0, 3.0)
FLIP_RATES = (0.0, 0.005, 0.01, 0.02)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alpha", type=float, default=0.05, help="two-sided intervals at 1 - alpha")
    parser.add_argument("--power", type=float, default=0.8, help="probability of a PASS for the second column")
    parser.add_argument("--max-images", type=int, default=100_000)
    args = parser.parse_args(argv)
    print(f"| escape margin (points) | true flip rate | defect images, expected flips | "
          f"defect images, {args.power:.0%} chance of PASS |")
    print("| ---: | ---: | ---: | ---: |")
    for margin in MARGINS_POINTS:
        for rate in FLIP_RATES:
            cells = [defect_images_for_pass(margin, rate, args.alpha, power, args.max_images)
                     for power in (None, args.power)]
            shown = ["never" if n is None else str(n) for n in cells]
            print(f"| {margin:g} | {100 * rate:g}% | {shown[0]} | {shown[1]} |")
    print(f"\n{1 - args.alpha:.0%} two-sided intervals (one-sided {1 - args.alpha / 2:.1%} upper bound); "
          f"'never' = not within {args.max_images} images (true rise at or beyond the margin).")


if __name__ == "__main__":
    main()
