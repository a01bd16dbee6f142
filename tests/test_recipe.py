"""The recipe: defaults for every key, strict validation, a YAML round trip."""
from __future__ import annotations

import pytest
import yaml

from edge_tl.errors import ConfigError
from edge_tl.finetune import FinetuneConfig
from edge_tl.gate import DEFAULT_MAX_DROP
from edge_tl.prune_stage import PruneConfig
from edge_tl.recipe import VerifyConfig, load_recipe, recipe_from_dict, with_ok_class
from export.stage import ExportConfig


def test_defaults_are_the_stage_defaults():
    recipe = load_recipe(None)
    assert recipe.config("finetune") == FinetuneConfig()
    assert recipe.config("prune") == PruneConfig()
    assert recipe.config("export").opset == ExportConfig().opset
    assert recipe.extra("prune", "enabled") is True
    assert recipe.extra("quantize", "stages") == ("float", "pruned")
    assert recipe.extra("export", "precisions") == ("fp32", "fp16", "int8")
    assert recipe.config("verify") == VerifyConfig() and VerifyConfig().max_drop == DEFAULT_MAX_DROP
    assert recipe.config("verify").unlabelled == "train" and recipe.config("verify").confidence == 0.95


def test_yaml_round_trip_keeps_every_key(tmp_path):
    raw = {"finetune": {"img_size": 96, "epochs": 3, "ok_class": "ok"},
           "prune": {"sparsity": 0.25, "recover_epochs": 1},
           "quantize": {"stages": ["float"], "method": "percentile", "calib_images": 32},
           "export": {"precisions": ["fp32", "int8"], "engines": "never"},
           "verify": {"max_drop": 2}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(path)
    assert recipe.config("finetune").img_size == 96
    assert recipe.config("prune").sparsity == 0.25
    assert recipe.extra("quantize", "stages") == ("float",)
    assert recipe.config("verify").max_drop == 2.0 and isinstance(recipe.config("verify").max_drop, float)
    saved = tmp_path / "saved.yaml"
    saved.write_text(recipe.to_yaml())
    again = load_recipe(saved)
    assert again.to_dict() == recipe.to_dict()
    written = yaml.safe_load(saved.read_text())
    assert set(written["finetune"]) == {f for f in FinetuneConfig.__dataclass_fields__}
    assert "stage" not in written["quantize"] and written["quantize"]["stages"] == ["float"]


@pytest.mark.parametrize("raw, message", [
    ({"finetun": {}}, "unknown section 'finetun'"),
    ({"prune": {"sparsty": 0.5}}, "unknown key prune.sparsty"),
    ({"finetune": {"epochs": "many"}}, "finetune.epochs must be int"),
    ({"finetune": {"epochs": True}}, "finetune.epochs must be int"),
    ({"prune": {"sparsity": 1.5}}, "--sparsity 1.5"),
    ({"quantize": {"stages": ["float", "halved"]}}, "quantize.stages names 'halved'"),
    ({"quantize": {"stages": "float"}}, "quantize.stages must be a list"),
    ({"export": {"precisions": ["int4"]}}, "export.precisions names 'int4'"),
    ({"export": {"engines": "sometimes"}}, "export.engines"),
    ({"prune": {"enabled": False}}, "prune.enabled is false"),
    ({"verify": {"max_drop": -1}}, "limits must be >= 0"),
    (["finetune"], "must be a mapping"),
])
def test_bad_recipes_are_one_line_config_errors(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")) as info:
        recipe_from_dict(raw)
    assert "\n" not in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune: [epochs: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)


def test_ok_class_from_the_command_line_wins():
    recipe = recipe_from_dict({"finetune": {"ok_class": "good"}})
    assert with_ok_class(recipe, None).config("finetune").ok_class == "good"
    assert with_ok_class(recipe, "free").config("finetune").ok_class == "free"
