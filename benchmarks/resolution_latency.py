"""What an input size costs: EfficientNet-Lite0's float model at several sizes, ONNX Runtime FP32 on the CPU.

python benchmarks/resolution_latency.py [--sizes 224,320,416,512] [--runs 50] [--threads 1] [--out FILE]

The same pretrained weights and a 6-class head (latency does not depend on the weights), batch 1, the
sizes timed in alternation (edge_tl.model_cost.compare_ort_latency_ms) so that a change in machine load
falls on all of them alike; the median latency, its ratio to the first size's, and MACs per image.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from _common import report

from edge_tl.backbones import build_model, get_backbone
from edge_tl.model_cost import compare_ort_latency_ms, count_macs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="224,320,416,512")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    spec = get_backbone(args.backbone)
    models = [build_model(spec, num_classes=6, img_size=size, pretrained=True).eval() for size in sizes]
    latencies = compare_ort_latency_ms(models, sizes, runs=args.runs, warmup=10, threads=args.threads)
    macs = [count_macs(model, size) for model, size in zip(models, sizes)]
    rows = [{"img_size": size, "latency_ms_p50": round(latency, 3), "latency_ratio": round(latency / latencies[0], 3),
             "macs": mac, "macs_ratio": round(mac / macs[0], 3)}
            for size, latency, mac in zip(sizes, latencies, macs)]
    report("resolution_latency", {"backbone": spec.name, "backend": "onnxruntime", "precision": "fp32",
                                  "batch_size": 1, "threads": args.threads, "runs": args.runs, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
