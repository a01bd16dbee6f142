"""The prune stage on a small fine-tuned run: RUN_DIR/pruned, reload from spec, CLI gate."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from edge_tl.cli import main
from edge_tl.finetune import FinetuneConfig, finetune, load_checkpoint
from edge_tl.model_cost import count_macs
from edge_tl.prune_stage import PruneConfig, load_pruned, load_stage_model, prune_run

IMG = 64


@pytest.fixture(scope="module")
def run_dir(surface_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("prune-stage") / "run"
    finetune(surface_dataset, out, FinetuneConfig(img_size=IMG, epochs=3, augmented_views=1, ok_class="ok"))
    return out


def test_prune_run_writes_spec_weights_and_metrics(run_dir):
    result = prune_run(run_dir, PruneConfig(sparsity=0.5, recover_epochs=1, latency_runs=5))
    names = sorted(p.name for p in result.pruned_dir.iterdir())
    assert names == ["metrics.json", "model.safetensors", "shape.json"]
    metrics = json.loads((result.pruned_dir / "metrics.json").read_text())
    for key in ("params", "macs", "parent_macs", "macs_ratio", "ort_latency_ms", "parent_ort_latency_ms",
                "ort_latency_ratio", "balanced_accuracy_delta", "escape_rate", "confusion_matrix"):
        assert key in metrics, key
    parent, _ = load_checkpoint(run_dir)
    pruned, _ = load_pruned(run_dir)
    assert metrics["macs"] == count_macs(pruned, IMG) < count_macs(parent, IMG)
    assert metrics["macs_ratio"] == pytest.approx(metrics["parent_macs"] / metrics["macs"])
    assert metrics["macs_ratio"] >= 1.3
    # the head refit on the pruned trunk is kept only if it does not lose accuracy; recovery starts from it
    refit = metrics["head_refit"]
    assert refit["kept"] == (refit["balanced_accuracy_after"] >= refit["balanced_accuracy_before"])
    start = metrics["recovery"]["history"][0]["balanced_accuracy"]
    assert start == pytest.approx(max(refit["balanced_accuracy_after"], refit["balanced_accuracy_before"]))
    shape = json.loads((result.pruned_dir / "shape.json").read_text())
    assert shape["backbone"] == "efficientnet_lite0" and shape["img_size"] == IMG
    assert all(layer.get("out_channels", 8) % 8 == 0 for layer in shape["layers"].values())

    # Reloading from spec plus weights gives the saved model's outputs.
    x = torch.randn(2, 3, IMG, IMG)
    again, _ = load_stage_model(run_dir, "pruned")
    with torch.no_grad():
        assert torch.equal(pruned(x), again(x))


@pytest.mark.parametrize("pruned_is_faster", [True, False])
def test_require_speedup_exit_code_and_cleanup_follow_the_measurement(run_dir, tmp_path, monkeypatch, capsys,
                                                                      pruned_is_faster):
    """The test decides the branch: the stage's latency measurement reads MACs (fewer -> faster, or slower)."""
    import edge_tl.prune_stage as stage

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("pruned", "pruned_sweep.json"))
    measured = []

    def latency_ms(model, img_size, runs):
        macs = count_macs(model, img_size)
        measured.append(macs)
        return macs / 1e6 if pruned_is_faster else 1e9 / macs

    monkeypatch.setattr(stage, "ort_latency_ms", latency_ms)
    code = main(["prune", str(run), "--recover-epochs", "0", "--require-speedup"])
    assert len(measured) == 2 and measured[1] < measured[0]  # parent, then the (smaller) pruned model
    error = capsys.readouterr().err
    if pruned_is_faster:
        assert code == 0
        metrics = json.loads((run / "pruned" / "metrics.json").read_text())
        assert metrics["faster_than_parent"] and metrics["ort_latency_ratio"] == pytest.approx(measured[0] / measured[1])
    else:
        assert code == 1 and "not faster" in error and "nothing was written" in error
        assert not (run / "pruned").exists()
    assert not [path.name for path in run.iterdir() if path.name.endswith(".partial")]


def test_bad_prune_settings_are_errors(run_dir, capsys):
    assert main(["prune", str(run_dir), "--sparsity", "1.5"]) == 2
    assert "--sparsity" in capsys.readouterr().err
    assert main(["prune", str(run_dir.parent / "nothing")]) == 2


def test_sweep_reads_accuracy_after_the_head_refit(run_dir, caplog):
    from edge_tl.prune_stage import sweep_run

    with caplog.at_level("INFO", logger="edge_tl.head_refit"):
        result = sweep_run(run_dir, PruneConfig(latency_runs=3), sparsities=(0.7,))
    refits = [r for r in caplog.records if r.getMessage().startswith("head refit:")]
    assert len(refits) == len(result["rows"]) >= 5  # every pruned row (four stages, all stages), not the parent
    assert json.loads((run_dir / "pruned_sweep.json").read_text())["rows"] == result["rows"]
    assert "balanced_accuracy_before_refit" not in result["parent"]
    # each row records the pruned trunk's accuracy before its head refit too; a refit is kept only if not worse
    assert all(row["balanced_accuracy"] >= row["balanced_accuracy_before_refit"] for row in result["rows"])
