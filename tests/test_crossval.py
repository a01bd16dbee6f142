"""Cross-validation of the frozen-trunk head and the escape-budget operating point, on generated images."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from rich.console import Console

from edge_tl.backbones import get_backbone
from edge_tl.cli import main
from edge_tl.cli_tables import cross_validation_tables
from edge_tl.crossval import cross_validate
from edge_tl.errors import ConfigError
from edge_tl.features import trunk_features
from edge_tl.finetune import (
    FinetuneConfig,
    finetune,
    fit_operating_point,
    load_checkpoint,
    predict_logits,
    run_records,
)
from edge_tl.head import fit_linear_head
from edge_tl.head_refit import refit_head
from edge_tl.operating_point import ok_logit_shift
from edge_tl.out_of_fold import escape_budget_point, out_of_fold_logits, stratified_folds
from edge_tl.synthetic import make_surface_dataset

IMG = 64
CFG = FinetuneConfig(img_size=IMG, epochs=8, augmented_views=1, ok_class="ok", seed=0)


@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    return make_surface_dataset(tmp_path_factory.mktemp("cv") / "data", images_per_class=24, img_size=IMG)


def test_stratified_folds_spread_every_class_evenly_and_are_seeded():
    labels = np.array([0] * 10 + [1] * 7 + [2] * 3)
    folds = stratified_folds(labels, 3, seed=0)
    for label, count in ((0, 10), (1, 7), (2, 3)):
        per_fold = np.bincount(folds[labels == label], minlength=3)
        assert per_fold.sum() == count and per_fold.max() - per_fold.min() <= 1
    assert np.array_equal(folds, stratified_folds(labels, 3, seed=0))
    assert not np.array_equal(folds, stratified_folds(labels, 3, seed=1))


def test_ok_logit_shift_is_the_smallest_that_meets_the_budget():
    rng = np.random.default_rng(0)
    labels = np.array([1] * 50 + [0] * 40 + [2] * 10)  # class 1 is ok
    logits = rng.normal(size=(100, 3)).astype(np.float32)

    def escapes(shift):
        shifted = logits.copy()
        shifted[:, 1] -= shift
        return int(np.sum(shifted[labels != 1].argmax(1) == 1))

    assert escapes(0.0) > 2  # random logits pass many defects as good
    for budget, allowed in ((0.0, 0), (0.04, 2), (0.2, 10)):
        shift = ok_logit_shift(logits, labels, 1, budget)
        assert escapes(shift) <= allowed
        assert shift == 0.0 or escapes(shift - 2e-4) > allowed  # any smaller shift breaks the budget
    assert ok_logit_shift(logits, labels, 1, 1.0) == 0.0  # every defect may pass: nothing to lower


def test_out_of_fold_logits_never_see_the_scored_sample():
    """Features that are pure noise: a head fitted on every sample memorises them, out of fold is chance."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 30)
    noise = torch.from_numpy(rng.normal(size=(1, 120, 256)).astype(np.float32))
    folds = stratified_folds(labels, 5, seed=0)
    in_sample = fit_linear_head(noise[0], labels, 4, l2=1e-4, iterations=100)
    with torch.no_grad():
        assert np.mean(in_sample(noise[0]).argmax(1).numpy() == labels) > 0.95
    oof = out_of_fold_logits(noise, labels, 4, folds, l2=1e-4, iterations=100)
    assert oof.shape == (120, 4) and np.mean(oof.argmax(1) == labels) < 0.45  # chance is 0.25
    separable = noise[:, :, :16].clone()  # the same call on features that carry the label learns it
    separable[0, :, :4] += torch.from_numpy(np.eye(4, dtype=np.float32)[labels] * 4)
    assert np.mean(out_of_fold_logits(separable, labels, 4, folds, 1e-4, 100).argmax(1) == labels) > 0.95


def test_escape_budget_shift_is_measured_on_budget_folds_inner_folds():
    """--budget-folds K: each inner head sees (K-1)/K of the training samples; fewer folds when a class is smaller."""
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), [60, 20, 12])  # class 0 is ok
    views = torch.from_numpy(rng.normal(size=(2, len(labels), 32)).astype(np.float32))
    views[:, :, :3] += torch.from_numpy(np.eye(3, dtype=np.float32)[labels] * 1.5)
    classes = ("ok", "scratch", "spot")
    shifts = {}
    for budget_folds, expected_folds in ((5, 5), (10, 10), (20, 12)):
        cfg = FinetuneConfig(ok_class="ok", max_escape=0.05, budget_folds=budget_folds, epochs=5)
        point = escape_budget_point(views, labels, None, classes, cfg)
        assert point["folds"] == expected_folds
        oracle = out_of_fold_logits(views, labels, 3, stratified_folds(labels, expected_folds, cfg.seed), cfg.head_l2,
                                    cfg.epochs * cfg.lbfgs_iterations, cfg.seed)
        assert point["ok_logit_shift"] == pytest.approx(ok_logit_shift(oracle, labels, 0, 0.05), abs=1e-5)
        shifts[budget_folds] = point["ok_logit_shift"]
    assert len(set(shifts.values())) > 1  # the fold count changes the measured shift


@pytest.mark.parametrize("option,value", [("--budget-folds", "1"), ("--head-l2", "-0.1")])
def test_cv_rejects_bad_head_and_budget_settings_in_one_line(textures, capsys, option, value):
    assert main(["cv", str(textures), "--ok-class", "ok", "--max-escape", "0.02", option, value]) == 2
    err = capsys.readouterr().err
    assert option.lstrip("-").replace("-", " ") in err.lower() and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cross_validate_scores_every_image_once(textures, tmp_path):
    out = tmp_path / "cv.json"
    started = time.perf_counter()
    result = cross_validate(textures, CFG, folds=4, out=out)
    # the cache pass is counted once: a single recipe's time is at most the call's
    assert 0 < result["seconds_total"] <= time.perf_counter() - started
    assert json.loads(out.read_text())["pooled"] == result["pooled"]
    pooled = result["pooled"]
    matrix = np.array(pooled["confusion_matrix"])
    assert pooled["num_samples"] == matrix.sum() == 96
    assert sum(row["num_samples"] for row in result["per_fold"]) == 96 and len(result["per_fold"]) == 4
    assert len(result["errors"]) == 96 - np.trace(matrix)
    assert pooled["balanced_accuracy"] >= 0.5  # pretrained trunk on 4 texture classes, chance 0.25
    mean = np.mean([row["balanced_accuracy"] for row in result["per_fold"]])
    assert result["mean"]["balanced_accuracy"] == pytest.approx(mean)
    points = {point["max_escape"]: point for point in result["operating_points"]}
    assert points[0.0]["escape_rate"] == 0.0
    assert points[0.0]["false_reject_rate"] >= points[0.05]["false_reject_rate"]
    assert points[0.05]["escape_rate"] <= 0.05


def test_cross_validate_rejects_bad_settings_before_any_trunk_pass(textures):
    with pytest.raises(ConfigError, match="fewer than --folds 30"):
        cross_validate(textures, CFG, folds=30)
    with pytest.raises(ConfigError, match="drop --no-cache"):
        cross_validate(textures, FinetuneConfig(img_size=IMG, unfreeze=1, cache_features=False), folds=3)
    with pytest.raises(ConfigError, match="--l2sp -1"):
        cross_validate(textures, FinetuneConfig(img_size=IMG, unfreeze=1, l2sp=-1.0), folds=3)


TAIL = FinetuneConfig(img_size=IMG, epochs=3, augmented_views=1, ok_class="ok", seed=0, unfreeze=1, batch_size=16)


def test_cross_validate_trains_a_tail_per_fold_stopping_on_its_own_training_images(textures, monkeypatch):
    import edge_tl.crossval as crossval_mod

    seen = []
    original = crossval_mod.train_tail

    def recording(tail, cache, labels, fit, stop, classes, cfg, device):
        seen.append((np.array(fit), np.array(stop)))
        return original(tail, cache, labels, fit, stop, classes, cfg, device)

    monkeypatch.setattr(crossval_mod, "train_tail", recording)
    result = cross_validate(textures, TAIL, folds=3)
    assert result["pooled"]["num_samples"] == 96 and len(result["per_fold"]) == 3
    assert result["pooled"]["balanced_accuracy"] >= 0.5
    assert len(result["tail"]["best_epochs"]) == 3 and result["tail"]["unfreeze"] == 1
    assert all(0 <= epoch <= TAIL.epochs for epoch in result["tail"]["best_epochs"])
    assert len(seen) == 3
    scored = set()
    for fold, (fit, stop) in enumerate(seen):  # fit and stop: disjoint, together the other folds' images
        assert not set(fit) & set(stop)
        assert len(fit) + len(stop) == 96 - result["per_fold"][fold]["num_samples"]
        scored |= set(range(96)) - set(fit) - set(stop)
    assert scored == set(range(96))  # each image was outside fit and stop exactly when its fold was scored


def test_cv_grid_scores_recipes_on_the_same_folds_and_names_the_best(textures, tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("- {name: frozen}\n- {name: last-1, unfreeze: 1}\n- {name: last-2 held, unfreeze: 2, l2sp: 1.0e+9}\n")
    out = tmp_path / "grid.json"
    argv = ["cv", str(textures), "--folds", "3", "--grid", str(grid), "--ok-class", "ok", "--img-size", str(IMG),
            "--epochs", "3", "--augmented-views", "1", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "frozen" in printed and "last-2 held" in printed and "best:" in printed and "escapes" in printed
    written = json.loads(out.read_text())
    rows = {row["name"]: row for row in written["rows"]}
    assert list(rows) == ["frozen", "last-1", "last-2 held"] and written["best"] in rows
    assert max(row["balanced_accuracy"] for row in rows.values()) == rows[written["best"]]["balanced_accuracy"]
    assert all(row["defects"] == 72 and row["goods"] == 24 for row in rows.values())
    assert written["gain_over_first"] == pytest.approx(
        rows[written["best"]]["balanced_accuracy"] - rows["frozen"]["balanced_accuracy"])
    alone = cross_validate(textures, FinetuneConfig(img_size=IMG, epochs=3, augmented_views=1, ok_class="ok"), folds=3)
    frozen = written["results"]["frozen"]
    assert [row["num_samples"] for row in frozen["per_fold"]] == [row["num_samples"] for row in alone["per_fold"]]
    # the frozen recipe ran its last two frozen blocks on the shared float16 cache: the same scores within round-off
    assert frozen["pooled"]["balanced_accuracy"] == pytest.approx(alone["pooled"]["balanced_accuracy"], abs=0.03)


def _counts(result: dict) -> tuple[int, int]:
    matrix = np.array(result["pooled"]["confusion_matrix"])
    ok = result["classes"].index("ok")
    return int(matrix[:, ok].sum() - matrix[ok, ok]), int(matrix[ok].sum() - matrix[ok, ok])  # escapes, false rejects


def test_cv_scores_an_escape_budget_chosen_in_each_fold_on_its_training_images(textures, tmp_path, capsys, monkeypatch):
    """A recipe's --max-escape is scored as finetune deploys it: each fold's shift comes from its training images."""
    import edge_tl.crossval as crossval_mod

    chosen = []
    original = crossval_mod.escape_budget_point

    def recording(views, labels, keys, classes, cfg):
        point = original(views, labels, keys, classes, cfg)
        chosen.append((views.shape[:2], len(labels), point["ok_logit_shift"]))
        return point

    monkeypatch.setattr(crossval_mod, "escape_budget_point", recording)
    grid = tmp_path / "grid.yaml"
    grid.write_text("- {name: argmax}\n- {name: budget 0, max_escape: 0.0}\n"
                    "- {name: last-1 budget 0, unfreeze: 1, max_escape: 0.0}\n")
    out = tmp_path / "grid.json"
    argv = ["cv", str(textures), "--folds", "3", "--grid", str(grid), "--ok-class", "ok", "--img-size", str(IMG),
            "--epochs", "3", "--augmented-views", "1", "--out", str(out)]
    assert main(argv) == 0
    assert "max escape" in capsys.readouterr().out
    results = json.loads(out.read_text())["results"]
    plain, budget, tail = results["argmax"], results["budget 0"], results["last-1 budget 0"]
    assert "escape_budget" not in plain and len(chosen) == 6  # 3 folds for each recipe with a budget
    held = [row["num_samples"] for row in plain["per_fold"]]
    # every shift was chosen on the other folds' images only: all their views (plain + 1 augmented) for the frozen
    # trunk, the tail's plain view for the tail, as finetune chooses them
    assert [(tuple(shape), size) for shape, size, _ in chosen] == ([((2, 96 - n), 96 - n) for n in held]
                                                                   + [((1, 96 - n), 96 - n) for n in held])
    for result, calls in ((budget, chosen[:3]), (tail, chosen[3:])):
        record = result["escape_budget"]
        assert record["max_escape"] == 0.0 and [p["fold"] for p in record["per_fold"]] == [0, 1, 2]
        assert [p["ok_logit_shift"] for p in record["per_fold"]] == [shift for _, _, shift in calls]
        assert all(p["escape_rate"] == 0.0 and p["ok_logit_shift"] >= 0.0 for p in record["per_fold"])
    assert any(shift > 0 for _, _, shift in chosen[:3])
    # the frozen recipe's logits are the argmax recipe's with only the ok logit lowered, fold by fold
    (plain_escapes, plain_rejects), (escapes, rejects) = _counts(plain), _counts(budget)
    assert escapes <= plain_escapes and rejects >= plain_rejects and (escapes, rejects) != (plain_escapes, plain_rejects)
    for before, after in zip(plain["per_fold"], budget["per_fold"]):
        assert after["escape_rate"] <= before["escape_rate"] and after["false_reject_rate"] >= before["false_reject_rate"]
    # what a budget would cost is still measured on the unshifted logits, the same in both records
    assert budget["operating_points"] == plain["operating_points"]
    console = Console(width=200, record=True)
    for table in cross_validation_tables(budget, "cv"):
        console.print(table)
    shown = console.export_text()
    assert "each fold's shift" in shown and f"{budget['escape_budget']['per_fold'][0]['ok_logit_shift']:.3f}" in shown


def test_cv_max_escape_needs_an_ok_class(textures, capsys):
    assert main(["cv", str(textures), "--max-escape", "0.02"]) == 2
    assert main(["cv", str(textures), "--ok-class", "ok", "--max-escape", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "--max-escape" in err and "Traceback" not in err


def test_cv_grid_errors_are_one_line_with_exit_2(textures, tmp_path, capsys):
    bad_key, bad_seed = tmp_path / "key.yaml", tmp_path / "seed.yaml"
    bad_key.write_text("- {unfreez: 1}\n")
    bad_seed.write_text("- {seed: 0}\n- {seed: 1}\n")
    assert main(["cv", str(textures), "--grid", str(bad_key)]) == 2
    assert main(["cv", str(textures), "--grid", str(bad_seed)]) == 2
    assert main(["cv", str(textures), "--grid", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'unfreez'" in err and "must share seed" in err and "does not exist" in err
    assert "Traceback" not in err


def test_cli_cv_errors_are_one_line_with_exit_2(textures, capsys):
    assert main(["cv", str(textures), "--folds", "1"]) == 2
    assert main(["cv", str(textures), "--folds", "25"]) == 2
    err = capsys.readouterr().err
    assert "--folds 1 must be at least 2" in err and "lower --folds to 24" in err and "Traceback" not in err


def test_max_escape_lowers_the_ok_logit_in_the_saved_head(textures, tmp_path):
    """The shift is chosen out of fold on the training split, saved in the weights and recorded in run.json."""
    plain = finetune(textures, tmp_path / "plain", CFG)
    budget = finetune(textures, tmp_path / "budget", FinetuneConfig(**{**CFG.__dict__, "max_escape": 0.0}))
    model, info = load_checkpoint(budget.run_dir)
    point = info["operating_point"]
    assert point["max_escape"] == 0.0 and point["escape_rate"] == 0.0 and point["ok_logit_shift"] > 0
    # applied to the plain run's head, the same choice lowers exactly the ok bias by the shift it reports
    plain_model, plain_info = load_checkpoint(plain.run_dir)
    before = plain_model.head.bias.detach().clone()
    spec = get_backbone(plain_info["backbone"])
    again = fit_operating_point(plain_model, run_records(plain_info, "train"), None, plain_info["classes"], spec, IMG,
                                FinetuneConfig(**{**CFG.__dict__, "max_escape": 0.0}), torch.device("cpu"))
    ok = info["classes"].index("ok")
    expected = before.clone()
    expected[ok] -= again["ok_logit_shift"]
    assert torch.allclose(plain_model.head.bias.detach(), expected) and again["escape_rate"] == 0.0
    assert json.loads((plain.run_dir / "run.json").read_text())["operating_point"] is None
    # validation escapes cannot rise when only the ok logit drops
    assert budget.metrics["escape_rate"] <= plain.metrics["escape_rate"]
    assert budget.metrics["false_reject_rate"] >= plain.metrics["false_reject_rate"]
    val = run_records(info, "val")
    logits = predict_logits(model, val, IMG, info["mean"], info["std"])
    assert np.array_equal(np.array(budget.metrics["confusion_matrix"]).sum(0),
                          np.bincount(logits.argmax(1), minlength=4))


def test_a_tails_escape_budget_is_chosen_on_its_plain_view_of_the_training_split(textures, tmp_path):
    """With unfrozen blocks finetune chooses the shift on the trained tail's features its head was refitted on;
    computed again through the whole trained trunk they give the same shift (the cache is float16)."""
    cfg = FinetuneConfig(**{**TAIL.__dict__, "max_escape": 0.0})
    result = finetune(textures, tmp_path / "run", cfg)
    model, info = load_checkpoint(result.run_dir)
    point = info["operating_point"]
    assert point["escape_rate"] == 0.0 and point["ok_logit_shift"] > 0
    train = run_records(info, "train")
    views = trunk_features(model, train, IMG, info["mean"], info["std"])[None]
    again = escape_budget_point(views, np.array([r.label for r in train]), None, info["classes"], cfg)
    assert again["ok_logit_shift"] == pytest.approx(point["ok_logit_shift"], abs=0.05)
    assert again["folds"] == point["folds"]


def test_max_escape_needs_an_ok_class(textures, tmp_path):
    assert main(["finetune", str(textures), "--out", str(tmp_path / "r"), "--max-escape", "0.01"]) == 2
    assert main(["finetune", str(textures), "--out", str(tmp_path / "r"), "--ok-class", "ok",
                 "--max-escape", "1.5"]) == 2
    assert not (tmp_path / "r").exists()


def test_head_refit_after_compression_keeps_the_escape_budget(textures, tmp_path):
    """Pruning and PTQ refit the head on the changed trunk: the run's ok-logit shift applies to the new head too."""
    run = finetune(textures, tmp_path / "budget", FinetuneConfig(**{**CFG.__dict__, "max_escape": 0.0}))
    model, info = load_checkpoint(run.run_dir)
    shift, ok = info["operating_point"]["ok_logit_shift"], info["classes"].index("ok")
    train = run_records(info, "train")
    features = trunk_features(model, train, IMG, info["mean"], info["std"])
    unshifted = fit_linear_head(features, np.array([r.label for r in train]), 4, info["config"]["head_l2"])
    _, summary = refit_head(model, info, lambda net: {"balanced_accuracy": 1.0}, {"balanced_accuracy": 0.0})
    assert summary["kept"]
    expected = unshifted.bias.detach().clone()
    expected[ok] -= shift
    assert torch.allclose(model.head.weight, unshifted.weight) and torch.allclose(model.head.bias, expected)
