"""The per-stage pruning sweep: accuracy (no recovery), MACs and ONNX Runtime latency per trunk stage and sparsity.

``val_fn`` decides what accuracy means: a balanced accuracy, or a mapping with ``balanced_accuracy`` and
further numbers the row records; `edge-tl prune --sweep` (:func:`edge_tl.prune_stage.sweep_run`)
refits the head on each pruned trunk first, as `edge-tl prune` does, and records the accuracy before it.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from edge_tl.backbones import EdgeClassifier
from edge_tl.model_cost import compare_ort_latency_ms, count_macs, count_params, ort_latency_ms
from edge_tl.prune import find_prune_groups, prune_model

log = logging.getLogger(__name__)


def _scored(value: float | Mapping[str, float]) -> tuple[float, dict[str, float]]:
    """A ``val_fn`` result as (balanced accuracy, the row's further numbers)."""
    if isinstance(value, Mapping):
        return float(value["balanced_accuracy"]), {key: float(v) for key, v in value.items() if key != "balanced_accuracy"}
    return float(value), {}


def trunk_stages(model: EdgeClassifier, img_size: int) -> list[list[int]]:
    """Prunable block indices grouped by stage (consecutive blocks with the same output resolution)."""
    sizes: dict[int, int] = {}
    handles = [block.register_forward_hook(lambda m, a, out, i=i: sizes.__setitem__(i, out.shape[-1]))
               for i, block in enumerate(model.trunk.blocks)]
    try:
        with torch.no_grad():
            model.eval().trunk(torch.zeros(1, 3, img_size, img_size))
    finally:
        for handle in handles:
            handle.remove()
    stages: list[list[int]] = []
    for group in find_prune_groups(model, img_size):
        if stages and sizes[stages[-1][-1]] == sizes[group.block_index]:
            stages[-1].append(group.block_index)
        else:
            stages.append([group.block_index])
    return stages


def sweep(
    model: EdgeClassifier,
    img_size: int,
    val_fn: Callable[[nn.Module], float | Mapping[str, float]],
    sparsities: tuple[float, ...] = (0.3, 0.5, 0.7),
    method: str = "l1",
    align: int = 8,
    calibration_batches: Iterable | None = None,
    training_batches: Iterable | None = None,
    tolerance_points: float = 1.0,
    latency_runs: int = 30,
) -> dict:
    """Balanced accuracy (no recovery), MACs and ORT latency per stage and sparsity, plus a recommendation.

    Rows: each stage alone at each sparsity, every stage at each sparsity, and the combination of
    each stage's highest sparsity within ``tolerance_points`` of the parent. The recommendation is
    the fastest row (highest latency ratio) within that tolerance (None when no row is). Each row's latency ratio
    comes from timing it in alternation with the parent (``compare_ort_latency_ms``).
    """
    calibration = list(calibration_batches) if calibration_batches is not None else None
    training = list(training_batches) if training_batches is not None else None
    parent_accuracy = _scored(val_fn(model))[0]
    parent_macs, parent_latency = count_macs(model, img_size), ort_latency_ms(model, img_size, latency_runs)

    def measure(label: str, sparsity: float, per_block: dict[int, float]) -> dict:
        pruned, spec = prune_model(model, img_size, sparsity, method, align, per_block, calibration, training)
        (accuracy, scores), macs = _scored(val_fn(pruned)), count_macs(pruned, img_size)
        parent_ms, latency = compare_ort_latency_ms([model, pruned], img_size, latency_runs)
        row = {"label": label, "sparsity": sparsity, "sparsity_per_block": spec["sparsity_per_block"],
               "balanced_accuracy": accuracy, "balanced_accuracy_delta": 100.0 * (accuracy - parent_accuracy),
               "params": count_params(pruned), "macs": macs, "macs_ratio": parent_macs / macs,
               "ort_latency_ms": latency, "parent_ort_latency_ms": parent_ms, "ort_latency_ratio": parent_ms / latency,
               **scores}
        log.info("sweep %s: balanced accuracy %+.2f points, macs x%.2f, latency x%.2f", label,
                 row["balanced_accuracy_delta"], row["macs_ratio"], row["ort_latency_ratio"])
        return row

    def within(row: dict) -> bool:
        return row["balanced_accuracy_delta"] >= -tolerance_points

    stages, rows, combined = trunk_stages(model, img_size), [], {}
    for index, blocks in enumerate(stages):
        for sparsity in sparsities:
            rows.append(measure(f"stage {index} (blocks {blocks[0]}-{blocks[-1]}) at {sparsity}", 0.0,
                                {block: sparsity for block in blocks}))
            if within(rows[-1]):
                combined.update({block: sparsity for block in blocks})
    for sparsity in sparsities:
        rows.append(measure(f"all stages at {sparsity}", sparsity, {}))
    if combined:
        rows.append(measure("each stage at its highest sparsity within tolerance", 0.0, combined))
    candidates = [row for row in rows if within(row)]
    return {
        "parent": {"balanced_accuracy": parent_accuracy, "macs": parent_macs, "params": count_params(model),
                   "ort_latency_ms": parent_latency},
        "stages": stages, "method": method, "align": align, "tolerance_points": tolerance_points, "rows": rows,
        "recommended": max(candidates, key=lambda row: row["ort_latency_ratio"]) if candidates else None,
    }
