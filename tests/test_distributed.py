"""Data-parallel frozen-trunk passes and tail training: ``torchrun --nproc-per-node 2`` (gloo, CPU) against one process.

Every torchrun rank runs with one thread (OMP_NUM_THREADS=1), and so does the one-process reference
(the ``one_thread`` fixture): the comparison isolates the sharding. (With two threads one process
rounds differently: its float16 cache then differs by one float16 step here and there, its head by
about 2e-5 relative.)
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file

from edge_tl.cli import main
from edge_tl.distributed import shard_bounds

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this PyTorch build has no torch.distributed with the gloo backend")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve().parent / "distributed_features_script.py"
FINETUNE = ["--img-size", "64", "--epochs", "3", "--augmented-views", "1", "--ok-class", "ok"]
UNFROZEN = ["--img-size", "64", "--epochs", "2", "--augmented-views", "1", "--unfreeze", "1", "--ok-class", "ok"]


def _torchrun(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 ARGV`` with one thread per rank, the checkout importable."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=240)


def _succeeded(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[key].double() - b[key].double()).abs().max().item() for key in a)


def _histories_agree(a: list[dict], b: list[dict], relative: float = 1e-5) -> None:
    assert [row["epoch"] for row in a] == [row["epoch"] for row in b]
    for row_a, row_b in zip(a, b):
        for key, value in row_a.items():
            assert value == pytest.approx(row_b[key], rel=relative, abs=1e-9), (row_a["epoch"], key)


def test_shards_are_contiguous_in_whole_granules_and_cover_every_item_once():
    for count, world, granule in itertools.product(range(0, 23), range(1, 5), range(1, 5)):
        bounds = [shard_bounds(count, rank, world, granule) for rank in range(world)]
        assert [index for start, stop in bounds for index in range(start, stop)] == list(range(count))
        assert all(start % granule == 0 for start, stop in bounds if stop > start)
        units = [-(-(stop - start) // granule) for start, stop in bounds]
        assert max(units) - min(units) <= 1 and units == sorted(units, reverse=True)
    assert [shard_bounds(48, rank, 2, 10) for rank in range(2)] == [(0, 30), (30, 48)]  # 3 batches, then 2
    assert [shard_bounds(1, rank, 2) for rank in range(2)] == [(0, 1), (1, 1)]  # rank 1's share: nothing
    with pytest.raises(ValueError):
        shard_bounds(4, 2, 2)


@pytest.fixture(scope="module")
def torchrun_script(surface_dataset, tmp_path_factory):
    """The script's gathers, cache and tail under torchrun with 2 ranks."""
    folder = tmp_path_factory.mktemp("torchrun_script")
    _succeeded(_torchrun(folder, str(SCRIPT), str(surface_dataset), str(folder / "out.safetensors")))
    with safe_open(folder / "out.safetensors", "pt") as handle:
        history = json.loads(handle.metadata()["history"])
    return load_file(folder / "out.safetensors"), history


def test_gather_returns_uneven_parts_in_rank_order_bit_for_bit(torchrun_script):
    from distributed_features_script import GATHER_CASES, gather_part

    tensors, _ = torchrun_script
    for case, (dtype, dim, *_) in GATHER_CASES.items():
        parts = [part for part in (gather_part(case, rank) for rank in range(2)) if part is not None]
        expected = torch.cat(parts, dim)
        gathered = tensors[f"gather.{case}"]
        assert gathered.dtype == dtype and torch.equal(gathered, expected), case


def test_torchrun_caches_the_views_one_process_caches(torchrun_script, surface_dataset, one_thread):
    """Sharded across 2 ranks (30 and 18 images) and gathered: the plain and augmented views of one process."""
    from distributed_features_script import compute

    tensors, _ = torchrun_script
    reference, _ = compute(surface_dataset)
    features, expected = tensors["features"], reference["features"]
    assert features.shape == expected.shape == (3, 48, 320, 2, 2) and features.dtype == torch.float16
    assert (features.float() - expected.float()).abs().max().item() <= 1e-5
    # the augmented views are views: an image's second view is not its plain one
    assert (expected[1].float() - expected[0].float()).abs().amax(dim=(1, 2, 3)).min().item() > 1e-2


def test_ddp_tail_trains_as_one_process(torchrun_script, surface_dataset, one_thread):
    """DistributedDataParallel, each rank its share of every minibatch (one minibatch's share empty): the
    same epochs, losses and distance moved from the pretrained weights, the same restored tail."""
    from distributed_features_script import compute

    tensors, history = torchrun_script
    reference, reference_history = compute(surface_dataset)
    _histories_agree(history, reference_history)
    assert [row["epoch"] for row in history] == [0, 1, 2] and history[-1]["l2sp_distance"] > 1e-4
    tail = {key: value for key, value in tensors.items() if key.startswith("tail.")}
    assert _max_difference(tail, {key: reference[key] for key in tail}) <= 1e-5


def test_finetune_under_torchrun_writes_one_run_of_one_process(surface_dataset, tmp_path, one_thread):
    """`finetune --unfreeze 1`: the frozen prefix cached in shards, a DDP tail, rank 0 alone writes the run,
    and the run holds the weights, metrics and history one process gets."""
    parallel, single = tmp_path / "parallel", tmp_path / "single"
    parallel.mkdir()
    output = _succeeded(_torchrun(parallel, "-m", "edge_tl", "-v", "finetune", str(surface_dataset), "--out",
                                  str(parallel / "run"), *UNFROZEN))
    assert "finetune: rank 0 of 2 (writes the run)" in output and "finetune: rank 1 of 2 (writes nothing)" in output
    assert all(f"tail: DistributedDataParallel on rank {rank} of 2 (cpu)" in output for rank in range(2))
    assert output.count("finetune took") == 1  # rank 0 alone prints the command's tables
    assert main(["finetune", str(surface_dataset), "--out", str(single / "run"), *UNFROZEN]) == 0
    # rank 0 wrote the run; no lock, staging folder or second copy is left beside it
    assert sorted(path.name for path in parallel.iterdir()) == ["run"]
    assert sorted(path.name for path in (parallel / "run").iterdir()) == ["metrics.json", "model.safetensors", "run.json"]
    weights, expected = load_file(parallel / "run" / "model.safetensors"), load_file(single / "run" / "model.safetensors")
    assert _max_difference(weights, expected) <= 1e-5
    assert json.loads((parallel / "run" / "metrics.json").read_text()) == json.loads((single / "run" / "metrics.json").read_text())
    run_info, reference_info = (json.loads((folder / "run" / "run.json").read_text()) for folder in (parallel, single))
    assert (run_info["world_size"], reference_info["world_size"]) == (2, 1)
    assert [row["epoch"] for row in run_info["history"]] == [0, 1, 2] and run_info["history"][-1]["l2sp_distance"] > 0
    _histories_agree(run_info["history"], reference_info["history"])


def test_cv_of_a_tail_under_torchrun_gives_one_process_result(surface_dataset, tmp_path, one_thread):
    """`cv --unfreeze 1`: the shared cache sharded, a DDP tail per fold, rank 0 writes the JSON."""
    settings = ["--folds", "3", "--img-size", "64", "--augmented-views", "1", "--ok-class", "ok", "--unfreeze", "1",
                "--epochs", "2"]
    parallel = tmp_path / "parallel"
    parallel.mkdir()
    output = _succeeded(_torchrun(parallel, "-m", "edge_tl", "-v", "cv", str(surface_dataset), *settings, "--out",
                                  str(parallel / "cv.json")))
    assert "cv: rank 1 of 2" in output and output.count("tail: DistributedDataParallel on rank") == 2 * 3  # 3 folds
    assert main(["cv", str(surface_dataset), *settings, "--out", str(tmp_path / "single.json")]) == 0
    assert sorted(path.name for path in parallel.iterdir()) == ["cv.json"]

    def timeless(result: dict) -> dict:
        result.pop("seconds_total")
        result["tail"].pop("seconds_per_epoch")
        return result

    assert timeless(json.loads((parallel / "cv.json").read_text())) == timeless(
        json.loads((tmp_path / "single.json").read_text()))


def test_an_error_on_rank_0_alone_stops_every_rank_with_that_one_line(surface_dataset, tmp_path):
    """Only rank 0 checks --out (rank 1 never looks at rank 0's files); its refusal reaches rank 1 too."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("an earlier run\n")
    result = _torchrun(tmp_path, "-m", "edge_tl", "finetune", str(surface_dataset), "--out", str(tmp_path / "run"),
                       *FINETUNE)
    assert result.returncode != 0
    message = f"error: run directory {tmp_path / 'run'} already exists and is not empty; pass --force to overwrite it"
    assert (result.stdout + result.stderr).count(message) == 2  # one line from each rank, no traceback of ours
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]
    assert [path.name for path in (tmp_path / "run").iterdir()] == ["keep.txt"]


def test_outside_torchrun_a_partial_environment_is_a_one_line_error(monkeypatch):
    from edge_tl.distributed import process_rank, torchrun_environment
    from edge_tl.errors import ConfigError

    assert torchrun_environment() is None and process_rank() == (0, 1)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="torchrun environment incomplete: RANK set but WORLD_SIZE, LOCAL_RANK not"):
        torchrun_environment()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(ConfigError, match="LOCAL_RANK='x' is not an integer"):
        torchrun_environment()
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="RANK=2, WORLD_SIZE=2"):
        torchrun_environment()
    monkeypatch.setenv("RANK", "1")
    assert torchrun_environment() == (1, 2, 1) and process_rank() == (1, 2)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert torchrun_environment() is None  # one rank: a single process
    assert process_rank() == (0, 1)


def test_distributed_is_a_bottom_layer_importing_only_torch_and_the_errors():
    import ast

    tree = ast.parse((REPO / "edge_tl" / "distributed.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert {name for name in imported if name.startswith("edge_tl")} == {"edge_tl.errors"}
    assert {name.split(".")[0] for name in imported} <= {"__future__", "logging", "os", "contextlib", "datetime",
                                                          "typing", "torch", "edge_tl"}
