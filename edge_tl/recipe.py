"""The recipe of `edge-tl run`: one YAML file whose every key has a default.

A recipe has six sections, one per stage of the chain. Each section's keys are the fields of that
stage's own config dataclass (so the recipe cannot drift from what the stages accept), plus a few
keys that say which variants the chain produces:

- ``finetune``: :class:`~edge_tl.finetune.FinetuneConfig`.
- ``prune``: :class:`~edge_tl.prune_stage.PruneConfig` plus ``enabled``.
- ``quantize``: :class:`~edge_tl.quantize.QuantizeConfig` (without ``stage``) plus ``stages``.
- ``export``: :class:`~export.stage.ExportConfig` (without ``format``, ``precision``, ``stage``) plus
  ``precisions`` (ONNX) and ``engines`` (``auto``: build TensorRT engines when TensorRT and a GPU
  are present; ``always``; ``never``) and ``engine_precisions``.
- ``verify``: :class:`VerifyConfig`.
- ``bench``: :class:`~edge_tl.bench.BenchConfig`.

Unknown keys, wrong types and invalid values are :class:`~edge_tl.errors.ConfigError` before any
work starts. The resolved recipe (every key, defaults filled in) is saved in the run directory.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from edge_tl.errors import ConfigError
from edge_tl.gate import (
    DEFAULT_CONFIDENCE, DEFAULT_MAX_DROP, DEFAULT_MAX_ESCAPE_RISE, TRAIN_SPLIT, check_gate_settings,
)

ENGINE_MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class VerifyConfig:
    """The release gate applied to every artifact: points of balanced accuracy and escape rate."""

    max_drop: float = DEFAULT_MAX_DROP
    max_escape_rise: float = DEFAULT_MAX_ESCAPE_RISE
    batch_size: int = 32
    confidence: float = DEFAULT_CONFIDENCE
    unlabelled: str | None = TRAIN_SPLIT


@dataclass(frozen=True)
class Section:
    """How one YAML section maps onto a stage config: which fields it hides and which it adds."""

    config_type: type
    hidden: tuple[str, ...] = ()
    extras: dict[str, Any] = field(default_factory=dict)


def _sections() -> dict[str, Section]:
    from edge_tl.bench import BenchConfig
    from edge_tl.finetune import FinetuneConfig
    from edge_tl.prune_stage import PruneConfig
    from edge_tl.quantize import QuantizeConfig
    from export.stage import ExportConfig

    return {
        "finetune": Section(FinetuneConfig),
        "prune": Section(PruneConfig, extras={"enabled": True}),
        "quantize": Section(QuantizeConfig, hidden=("stage",), extras={"stages": ("float", "pruned")}),
        "export": Section(ExportConfig, hidden=("format", "precision", "stage", "max_drop", "max_escape_rise",
                                                 "confidence", "unlabelled"),
                          extras={"precisions": ("fp32", "fp16", "int8"), "engines": "auto",
                                  "engine_precisions": ("fp16", "int8")}),
        "verify": Section(VerifyConfig),
        "bench": Section(BenchConfig),
    }


@dataclass(frozen=True)
class Recipe:
    """Every section's stage config plus its extra keys (``extras[section][key]``)."""

    configs: dict[str, Any]
    extras: dict[str, dict[str, Any]]

    def config(self, section: str) -> Any:
        return self.configs[section]

    def extra(self, section: str, key: str) -> Any:
        return self.extras[section][key]

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, section in _sections().items():
            values = {f.name: getattr(self.configs[name], f.name) for f in fields(section.config_type)
                      if f.name not in section.hidden}
            values.update(self.extras[name])
            out[name] = {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}
        return out

    def to_yaml(self) -> str:
        import yaml

        header = "# edge-tl recipe: every key, defaults filled in (see README, 'Recipe')\n"
        return header + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", str(kind))


def coerce_value(where: str, value: Any, kind: Any, source: str = "recipe") -> Any:
    """``value`` as type ``kind`` (int, float, bool, str, X | None, tuple[X, ...]) or a ConfigError
    naming the ``source`` file's key (a recipe's, a cv grid's)."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce_value(where, value, option, source)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is tuple:
        item_kind = typing.get_args(kind)[0]
        items = value if isinstance(value, (list, tuple)) else None
        if items is None:
            raise ConfigError(f"{source} key {where} must be a list, got {value!r}; write it as [a, b]")
        return tuple(coerce_value(f"{where}[{i}]", item, item_kind, source) for i, item in enumerate(items))
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind in (bool, str) and isinstance(value, kind):
        return value
    raise ConfigError(f"{source} key {where} must be {_type_name(kind)}, got {value!r}; fix the {source}")


def _extra_type(default: Any) -> Any:
    if isinstance(default, tuple):
        return tuple[type(default[0]), ...]
    return type(default)


def recipe_from_dict(raw: Any, source: str = "recipe") -> Recipe:
    """Validate a parsed YAML mapping (missing sections and keys take their defaults)."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must be a mapping of sections ({', '.join(_sections())}), got {type(raw).__name__}")
    sections = _sections()
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"{source}: unknown section {unknown[0]!r}; valid sections: {', '.join(sections)}")
    configs, extras = {}, {}
    for name, section in sections.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping of keys, got {values!r}")
        hints = typing.get_type_hints(section.config_type)
        allowed = [f.name for f in fields(section.config_type) if f.name not in section.hidden] + list(section.extras)
        bad = sorted(set(values) - set(allowed))
        if bad:
            raise ConfigError(f"{source}: unknown key {name}.{bad[0]}; valid keys: {', '.join(allowed)}")
        settings = {key: coerce_value(f"{name}.{key}", value, hints[key])
                    for key, value in values.items() if key not in section.extras}
        configs[name] = section.config_type(**settings)
        extras[name] = {key: coerce_value(f"{name}.{key}", values[key], _extra_type(default)) if key in values else default
                        for key, default in section.extras.items()}
    recipe = Recipe(configs, extras)
    validate_recipe(recipe)
    return recipe


def load_recipe(path: str | os.PathLike | None) -> Recipe:
    """The recipe in ``path`` (YAML), or the defaults when ``path`` is None."""
    if path is None:
        return recipe_from_dict({})
    return recipe_from_dict(read_yaml_file(path, "recipe", "pass an existing YAML file or leave --recipe out"),
                            str(path))


def read_yaml_file(path: str | os.PathLike, kind: str, what_to_pass: str) -> Any:
    """The parsed YAML of a user's file (a recipe, a grid), or a one-line ConfigError naming the ``kind`` of
    file and, when it is missing, ``what_to_pass``."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{kind} {path} does not exist; {what_to_pass}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{kind} {path} is not valid YAML ({str(err).splitlines()[0]}); fix its syntax") from err


def with_ok_class(recipe: Recipe, ok_class: str | None) -> Recipe:
    """The recipe with ``finetune.ok_class`` set from the command line (None keeps the recipe's)."""
    if ok_class is None:
        return recipe
    return Recipe({**recipe.configs, "finetune": replace(recipe.configs["finetune"], ok_class=ok_class)},
                  recipe.extras)


def validate_recipe(recipe: Recipe) -> None:
    """The checks each stage makes on its own settings, all before the first stage starts."""
    from edge_tl.bench import validate_config as validate_bench
    from edge_tl.prune_stage import validate_config as validate_prune
    from edge_tl.quantize import STAGES, validate_config as validate_quantize
    from export.stage import PRECISIONS, validate_config as validate_export

    validate_prune(recipe.config("prune"))
    stages = recipe.extra("quantize", "stages")
    for stage in stages:
        if stage not in STAGES:
            raise ConfigError(f"recipe key quantize.stages names {stage!r}; valid stages: {', '.join(STAGES)}")
        validate_quantize(replace(recipe.config("quantize"), stage=stage))
    if "pruned" in stages and not recipe.extra("prune", "enabled"):
        raise ConfigError("recipe quantizes the pruned stage but prune.enabled is false; drop 'pruned' from quantize.stages")
    for precision in recipe.extra("export", "precisions"):
        if precision not in PRECISIONS:
            raise ConfigError(f"recipe key export.precisions names {precision!r}; valid: {', '.join(PRECISIONS)}")
        validate_export(replace(recipe.config("export"), precision=precision, dla_core=None, timing_cache=None))
    for precision in recipe.extra("export", "engine_precisions"):
        validate_export(replace(recipe.config("export"), format="engine", precision=precision))
    if recipe.extra("export", "engines") not in ENGINE_MODES:
        raise ConfigError(f"recipe key export.engines is {recipe.extra('export', 'engines')!r}; "
                          f"valid: {', '.join(ENGINE_MODES)}")
    validate_bench(recipe.config("bench"))
    verify_cfg = recipe.config("verify")
    if verify_cfg.max_drop < 0 or verify_cfg.max_escape_rise < 0 or verify_cfg.batch_size < 1:
        raise ConfigError(f"recipe section verify has {dataclasses.asdict(verify_cfg)}; limits must be >= 0 and "
                          "batch_size >= 1")
    check_gate_settings(verify_cfg.max_drop, verify_cfg.max_escape_rise, verify_cfg.confidence)
    if verify_cfg.unlabelled not in (None, TRAIN_SPLIT) and not Path(verify_cfg.unlabelled).is_dir():
        raise ConfigError(f"recipe key verify.unlabelled is {verify_cfg.unlabelled!r}; use train (the run's training "
                          "split), a folder of images without labels, or null")
