"""calibrate/: range methods against numpy oracles, calibration.json, sources, TensorRT cache."""
from __future__ import annotations

import json
import logging
import struct

import numpy as np
import pytest

from calibrate.calibration_file import (
    Calibration,
    CalibrationTensor,
    parse_calibration,
    read_calibration,
    write_calibration,
)
from calibrate.ranges import (
    DEFAULT_PERCENTILE,
    RangeObserver,
    asymmetric_uint8,
    entropy_threshold_bins,
    per_channel_symmetric_int8_scales,
    symmetric_int8_scale,
)
from calibrate.sources import ArraySource, ClassBalancedSource, iter_batches
from calibrate.tensorrt_cache import (
    format_calibration_cache,
    parse_calibration_cache,
    read_calibration_cache,
    scales_from_ranges,
    tensorrt_version_tag,
    write_calibration_cache,
)
from edge_tl.errors import ArtifactError, ConfigError


# --- ranges ---------------------------------------------------------------------------------------


def _batches(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # batches with growing spread force the histogram to extend and halve its resolution
    return [rng.normal(0.3, 1.0 + i, size=(4, 8, 16, 16)).astype(np.float32) for i in range(6)]


def test_minmax_equals_numpy_over_batches():
    observer = RangeObserver()
    batches = _batches()
    for batch in batches:
        observer.update(batch)
    everything = np.concatenate([b.ravel() for b in batches])
    assert observer.compute("minmax") == (float(everything.min()), float(everything.max()))
    assert observer.count == everything.size
    assert observer.hist.sum() == everything.size  # exact merges lose no value
    assert observer.hist.size <= 8 * observer.num_bins


def test_percentile_within_one_bin_of_numpy():
    observer = RangeObserver()
    batches = _batches(1)
    for batch in batches:
        observer.update(batch)
    everything = np.sort(np.concatenate([b.ravel() for b in batches]).astype(np.float64))
    for percentile in (99.0, 99.9):
        for got, fraction in zip(observer.percentile(percentile), (1 - percentile / 100, percentile / 100)):
            want = np.percentile(everything, 100 * fraction)
            # the histogram interpolates inside a bin, numpy between neighbouring samples
            rank = fraction * (everything.size - 1)
            gap = everything[int(np.ceil(rank))] - everything[int(np.floor(rank))]
            assert abs(got - want) <= observer.bin_width + gap
    assert observer.compute("percentile", 100.0) == pytest.approx((everything.min(), everything.max()), abs=1e-9)


def _range(values, method: str, percentile: float = DEFAULT_PERCENTILE) -> tuple[float, float]:
    observer = RangeObserver()
    observer.update(values)
    return observer.compute(method, percentile)


def test_entropy_clips_outliers_and_keeps_uniform_data():
    rng = np.random.default_rng(2)
    gauss = rng.normal(0.0, 1.0, 400_000)
    gauss[:20] = 40.0  # a few extreme outliers
    low, high = _range(gauss, "entropy")
    assert 2.5 < high < 8.0 and low == pytest.approx(-high)
    assert float(gauss.min()) <= low
    relu = np.maximum(gauss, 0.0)
    low_relu, high_relu = _range(relu, "entropy")
    assert low_relu == 0.0 and 2.5 < high_relu < 8.0
    # a flat histogram has nothing to clip: KL is smallest when every bin is kept
    assert entropy_threshold_bins(np.full(1024, 100)) == 1024


def test_range_method_is_validated():
    with pytest.raises(ConfigError, match="kl"):
        _range(np.ones(4), "kl")
    with pytest.raises(ConfigError, match="percentile 20"):
        _range(np.ones(4), "percentile", 20)
    with pytest.raises(ValueError, match="NaN"):
        RangeObserver().update(np.array([1.0, np.nan]))


def test_quantization_parameters():
    scale, zero_point = asymmetric_uint8(0.0, 6.0)
    assert (scale, zero_point) == (float(np.float32(6.0 / 255)), 0)
    scale, zero_point = asymmetric_uint8(-1.0, 3.0)
    assert zero_point == 64 and scale == float(np.float32(4.0 / 255))
    # dequantized ends of the uint8 grid reproduce the range within one step
    assert abs((0 - zero_point) * scale - -1.0) <= scale and abs((255 - zero_point) * scale - 3.0) <= scale
    assert asymmetric_uint8(2.0, 5.0) == (float(np.float32(5.0 / 255)), 0)  # widened to include 0
    assert symmetric_int8_scale(2.54) == float(np.float32(0.02))
    assert symmetric_int8_scale(0.0) == float(np.float32(1 / 127))
    weight = np.random.default_rng(3).normal(size=(6, 3, 3, 3)).astype(np.float32)
    want = np.abs(weight).reshape(6, -1).max(axis=1) / 127
    np.testing.assert_array_equal(per_channel_symmetric_int8_scales(weight), want.astype(np.float32))


# --- calibration.json -----------------------------------------------------------------------------


def _calibration() -> Calibration:
    weight = np.random.default_rng(4).normal(size=(4, 2, 3, 3)).astype(np.float32)
    return Calibration(
        model={"stage": "float", "img_size": 64, "input_name": "input", "backbone": "tiny"},
        method="percentile",
        calibration_files_hash="ab" * 32,
        tensors=(
            CalibrationTensor.activation("conv1", "input", -2.0, 2.5),
            CalibrationTensor.activation("conv1", "output", 0.0, 6.0, observed_min=-3.5, observed_max=9.0),
            CalibrationTensor.weight("conv1", weight),
        ),
    )


def test_calibration_file_round_trips(tmp_path):
    calibration = _calibration()
    path = tmp_path / "quantized" / "float" / "calibration.json"
    write_calibration(path, calibration)
    loaded = read_calibration(path)
    assert loaded == calibration
    assert loaded.get("conv1", "output").extra == {"observed_min": -3.5, "observed_max": 9.0}
    document = json.loads(path.read_text())
    assert document["format"] == "edge-tl-calibration" and document["version"] == 1
    weight_entry = document["tensors"][2]
    assert weight_entry["name"] == "conv1:weight" and weight_entry["axis"] == 0 and len(weight_entry["scale"]) == 4
    assert document["tensors"][0]["zero_point"] == 113  # round(2.0 / (4.5 / 255))
    scale, zero_point = loaded.get("conv1", "input").as_arrays()
    assert scale.dtype == np.float32 and zero_point.dtype == np.uint8 and scale.ndim == 0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format="other"), "not an edge-tl-calibration"),
        (lambda d: d.update(version=2), "version 2"),
        (lambda d: d.update(method="kl"), "method 'kl'"),
        (lambda d: d["tensors"][0].pop("scale"), "lacks scale"),
        (lambda d: d["tensors"][0].update(name="conv2:input"), "name must be"),
        (lambda d: d["tensors"][0].update(kind="weight"), "does not match its name"),
        (lambda d: d["tensors"][0].update(scale=0.0), "scales must be > 0"),
        (lambda d: d["tensors"][0].update(zero_point=300), "zero points"),
        (lambda d: d["tensors"][0].update(axis=0), "per-tensor"),
        (lambda d: d["tensors"][2]["zero_point"].__setitem__(0, 1), "zero points must be 0"),
        (lambda d: d["tensors"][2]["scale"].pop(), "same non-zero length"),
        (lambda d: d["tensors"][2].update(dtype="uint8"), "per-channel symmetric int8"),
        (lambda d: d["tensors"].append(dict(d["tensors"][0])), "duplicate"),
        (lambda d: d["tensors"][1].update(min=7.0), "min is greater than max"),
        (lambda d: d["model"].update(float_modules=["conv1"]), r"conv1:input.*listed as float"),
        (lambda d: d["model"].update(float_modules="head"), "float_modules 'head' must be a list"),
    ],
)
def test_bad_calibration_files_are_rejected(tmp_path, edit, message):
    document = _calibration().to_json()
    edit(document)
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ArtifactError, match=message):
        read_calibration(path)


def test_writer_refuses_an_invalid_calibration(tmp_path):
    bad = CalibrationTensor("conv1", "input", "int8", None, 0.1, 5, -1.0, 1.0)
    with pytest.raises(ArtifactError, match="zero points"):
        write_calibration(tmp_path / "c.json", Calibration({}, "minmax", "", (bad,)))
    assert not (tmp_path / "c.json").exists()
    with pytest.raises(ArtifactError, match="not valid JSON"):
        (tmp_path / "broken.json").write_text("{")
        read_calibration(tmp_path / "broken.json")
    assert parse_calibration(_calibration().to_json()).method == "percentile"


# --- sources ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imbalanced_scan(tmp_path_factory):
    from edge_tl.data import scan_image_folder
    from edge_tl.synthetic import make_surface_dataset

    root = make_surface_dataset(
        tmp_path_factory.mktemp("data") / "surface", {"ok": 24, "scratch": 6, "spot": 4, "crack": 2}, img_size=32
    )
    return scan_image_folder(root)


def test_class_balanced_source_is_balanced_deterministic_and_preprocessed(imbalanced_scan, caplog):
    from edge_tl.data import load_image, preprocess

    records = imbalanced_scan.records
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    with caplog.at_level(logging.WARNING, logger="calibrate.sources"):
        source = ClassBalancedSource(records, 12, 32, mean, std, batch_size=5, seed=7)
    assert "only 12 calibration images" in caplog.text
    labels = [label for _, label in source.items]
    # round-robin: every class (crack has just 2 images) before any class repeats
    assert sorted(labels[:4]) == [0, 1, 2, 3]
    assert sorted(source.class_counts.values()) == [2, 3, 3, 4]  # crack runs out at 2
    again = ClassBalancedSource(records, 12, 32, mean, std, batch_size=5, seed=7)
    assert again.paths == source.paths and again.file_list_hash() == source.file_list_hash()
    other = ClassBalancedSource(records, 12, 32, mean, std, batch_size=5, seed=8)
    assert other.file_list_hash() != source.file_list_hash()
    assert source.file_list_hash(root=imbalanced_scan.root) != source.file_list_hash()

    shapes = [batch.shape for batch in iter_batches(source)]
    assert shapes == [(5, 3, 32, 32), (5, 3, 32, 32), (2, 3, 32, 32)]
    source.rewind()
    first = source.get_next()["input"]
    want = preprocess(load_image(source.paths[0]), 32, mean, std)
    np.testing.assert_array_equal(first[0], want)
    assert first.dtype == np.float32


def test_source_draws_only_from_given_records(imbalanced_scan):
    from edge_tl.data import split_stratified

    train, val = split_stratified(imbalanced_scan.records, 0.25, seed=0)
    source = ClassBalancedSource(train, 1000, 32, (0.5,) * 3, (0.5,) * 3)
    assert set(source.paths) == {record.path for record in train}
    assert not set(source.paths) & {record.path for record in val}
    with pytest.raises(ConfigError, match="must be an integer >= 1"):
        ClassBalancedSource(train, 0, 32, (0.5,) * 3, (0.5,) * 3)


def test_array_source():
    images = np.arange(5 * 3 * 2 * 2, dtype=np.float32).reshape(5, 3, 2, 2)
    source = ArraySource(images, batch_size=2, input_name="x")
    batches = list(iter_batches(source))
    assert [b.shape[0] for b in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    assert source.get_next() is None
    source.rewind()
    assert set(source.get_next()) == {"x"}


# --- TensorRT calibration cache --------------------------------------------------------------------


def test_tensorrt_cache_round_trips_float32_exact(tmp_path):
    rng = np.random.default_rng(5)
    names = ["input", "/trunk/blocks/0/0/Conv_output_0", "(Unnamed Layer* 64) [Shuffle]_output", "a: b"]
    scales = {name: float(np.float32(value)) for name, value in zip(names, rng.uniform(1e-5, 2.0, len(names)))}
    scales["zero"] = 0.0
    path = tmp_path / "model.calib"
    write_calibration_cache(path, scales, "8.6.1")
    cache = read_calibration_cache(path)
    assert cache.version_tag == 8601 and cache.algorithm == "EntropyCalibration2"
    assert cache.scales == scales  # bit-exact float32 values
    assert path.read_text().splitlines()[0] == "TRT-8601-EntropyCalibration2"


def test_tensorrt_cache_text_format():
    text = format_calibration_cache({"input": 1 / 128, "x": 1.0}, "10.3.0")
    assert text == "TRT-100300-EntropyCalibration2\ninput: 3c000000\nx: 3f800000\n"
    assert struct.pack(">f", 1.0).hex() == "3f800000"
    # TensorRT (and tools) sometimes drop leading zeros: '0' is a valid scale line
    parsed = parse_calibration_cache("TRT-8401-EntropyCalibration2\nt: 0\nu: 3caa54fc\n")
    assert parsed.scales["t"] == 0.0 and parsed.scales["u"] == pytest.approx(0.020792, rel=1e-4)
    assert tensorrt_version_tag("8.5.2") == 8502 and tensorrt_version_tag("10.14.1") == 101401
    with pytest.raises(ArtifactError, match="TRT-"):
        parse_calibration_cache("hello\n")
    with pytest.raises(ArtifactError, match="line 2"):
        parse_calibration_cache("TRT-8601-EntropyCalibration2\ninput 3c000000\n")
    with pytest.raises(ConfigError, match="MAJOR.MINOR"):
        tensorrt_version_tag("ten")


def test_cache_scales_from_ranges():
    scales = scales_from_ranges({"a": (-2.54, 1.0), "b": (0.0, 6.35)})
    assert scales == {"a": float(np.float32(0.02)), "b": float(np.float32(0.05))}


def test_tensorrt_calibrator_needs_tensorrt():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed on this machine")
    pytest.importorskip("pycuda", reason="pycuda is not installed on this machine")
    from calibrate.tensorrt_calibrator import make_entropy_calibrator

    source = ArraySource(np.zeros((4, 3, 8, 8), np.float32), batch_size=2)
    calibrator = make_entropy_calibrator(source, batch_size=2)
    assert calibrator.get_batch_size() == 2
    assert calibrator.get_batch(["input"]) is not None


# --- hook-based calibration -------------------------------------------------------------------------


def test_collect_calibration_equals_numpy_oracle():
    import torch
    from torch import nn

    from calibrate.observe import collect_calibration

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6(), nn.Conv2d(4, 2, 1), nn.Flatten(1), nn.Linear(2 * 6 * 6, 3)).eval()
    images = np.random.default_rng(6).normal(0, 2, (10, 3, 8, 8)).astype(np.float32)
    calibration = collect_calibration(model, ArraySource(images, batch_size=4), "minmax",
                                      model_info={"stage": "float", "img_size": 8}, calibration_files_hash="f" * 64)
    with torch.no_grad():  # the oracle: every intermediate tensor of all images at once
        x = torch.from_numpy(images)
        conv1 = model[0](x)
        conv2_in = model[1](conv1)
        conv2 = model[2](conv2_in)
        head_in = model[3](conv2)
        logits = model[4](head_in)
    oracle = {("0", "input"): x, ("0", "output"): conv1, ("2", "input"): conv2_in, ("2", "output"): conv2,
              ("4", "input"): head_in, ("4", "output"): logits}
    for (module, role), tensor in oracle.items():
        entry = calibration.get(module, role)
        assert (entry.min, entry.max) == (float(tensor.min()), float(tensor.max())), (module, role)
        assert (entry.scale, entry.zero_point) == asymmetric_uint8(entry.min, entry.max)
    weight = calibration.get("4", "weight")
    np.testing.assert_array_equal(weight.scale, per_channel_symmetric_int8_scales(model[4].weight.detach().numpy()))
    assert calibration.model == {"input_name": "input", "stage": "float", "img_size": 8, "float_modules": []}
    assert len(calibration.tensors) == 9  # input, output and weight of three layers
    assert calibration.float_modules == ()
    percentile = collect_calibration(model, ArraySource(images, batch_size=4), "percentile", percentile=99.0)
    entry = percentile.get("0", "output")
    assert entry.max < float(conv1.max()) and entry.extra["observed_max"] == float(conv1.max())


def test_float_modules_get_no_entry_and_are_recorded(tmp_path):
    import torch
    from torch import nn

    from calibrate.observe import collect_calibration, output_layers, quantization_plan

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6(), nn.Conv2d(4, 2, 1), nn.Flatten(1), nn.Linear(2 * 6 * 6, 3)).eval()
    assert output_layers(model) == ("4",)  # the layer whose output is the model's output
    images = np.random.default_rng(6).normal(0, 2, (10, 3, 8, 8)).astype(np.float32)
    full = collect_calibration(model, ArraySource(images, batch_size=4), "minmax")
    calibration = collect_calibration(model, ArraySource(images, batch_size=4), "minmax", float_modules=("4",))
    assert calibration.float_modules == ("4",) and calibration.model["float_modules"] == ["4"]
    assert {t.module for t in calibration.tensors} == {"0", "2"}
    assert calibration.tensors == tuple(t for t in full.tensors if t.module != "4")  # the rest is unchanged
    path = tmp_path / "calibration.json"
    write_calibration(path, calibration)
    assert read_calibration(path).float_modules == ("4",) and read_calibration(path) == calibration

    # a conv feeding a float layer through a ReLU keeps its own output quantization: nothing re-quantizes it
    chain = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    assert quantization_plan(chain) == {"0": ("input", "weight"), "2": ("input", "weight", "output")}
    assert quantization_plan(chain, output_layers(chain)) == {"0": ("input", "weight", "output")}
