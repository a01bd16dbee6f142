"""The three-verdict gate on a finished run (issue 17).

python benchmarks/verdicts.py RUN_DIR [--max-drop 3.0] [--max-escape-rise 2.0] [--confidence 0.95] [--out FILE]

For every ONNX artifact in RUN_DIR/export: `edge-tl verify` on the validation split alone, then
with the run's training split as label-free evidence (`--unlabelled train`); prints the verdict,
the upper bounds it was judged on, the paired discordance and, for INCONCLUSIVE, what would settle
it. The last run's records stay in RUN_DIR/verify (those with the training split).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from _common import report

from edge_tl.gate import DEFAULT_CONFIDENCE, DEFAULT_MAX_DROP, DEFAULT_MAX_ESCAPE_RISE, bounds_text, settle_text
from edge_tl.verify import verify


def summary(record: dict) -> dict:
    escape = record.get("escape_counts", {})
    out = {"verdict": record["verdict"], "bounds": bounds_text(record), "num_samples": record["num_samples"],
           "top1_agreement": round(record["top1_agreement"], 4),
           "balanced_accuracy_delta": round(record["balanced_accuracy_delta"], 2),
           "escape_rate_delta": round(record.get("escape_rate_delta", 0.0), 2),
           "new_escapes": escape.get("artifact_escapes"), "fixed_escapes": escape.get("float_escapes")}
    if record.get("unlabelled"):
        unlabelled = record["unlabelled"]
        out["unlabelled"] = {key: unlabelled.get(key) for key in ("source", "num_images", "agreement", "new_ok_calls",
                                                                  "float_defect_calls")}
    if record["verdict"] == "INCONCLUSIVE":
        out["to_settle"] = settle_text(record)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--max-drop", type=float, default=DEFAULT_MAX_DROP)
    parser.add_argument("--max-escape-rise", type=float, default=DEFAULT_MAX_ESCAPE_RISE)
    parser.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    gate = {"max_drop": args.max_drop, "max_escape_rise": args.max_escape_rise, "confidence": args.confidence}
    rows = []
    for artifact in sorted((args.run_dir / "export").glob("model.*.onnx")):
        if "int8-implicit" in artifact.name:
            continue  # an FP32 graph for TensorRT's implicit INT8, not a deployable artifact of its own
        rows.append({"artifact": artifact.name,
                     "validation_only": summary(verify(args.run_dir, artifact, **gate)),
                     "with_training_split": summary(verify(args.run_dir, artifact, unlabelled="train", **gate))})
    report("verdicts", {"run_dir": str(args.run_dir), "gate": gate, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
