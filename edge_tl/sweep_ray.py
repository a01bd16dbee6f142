"""The one place that imports Ray: `edge-tl sweep`'s trials as Ray Tune trials.

Pinned to ``ray[tune]>=2.41,<3`` (the ``[scale]`` extra): ``ray.tune.RunConfig`` and ``tune.report(dict)``,
the function-trainable API used here, took their present form in 2.41 (before, ``ray.train.RunConfig``
and ``ray.train.report``). Without ``address`` a local Ray instance is started with this machine's CPUs and
``workers`` trials at a time, each given an equal share of the CPUs (Ray sets the trial process's
thread count to it); with ``address`` an existing cluster runs up to ``workers`` trials at once, one CPU
each unless the cluster says otherwise. Every node needs edge-tl installed and the data and ``OUT``
on shared storage (README, "Sweeps").
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

from edge_tl.errors import BackendUnavailableError
from edge_tl.sweep_report import ROW_KEYS
from edge_tl.sweep_trial import Trial, failed_row, run_trial

log = logging.getLogger(__name__)


def _trainable(space: dict) -> None:
    from ray import tune

    config = space["config"]
    tune.report(run_trial(config["data_dir"], Trial(**config["trial"]), config["dataset_sha256"],
                          config["threads"], config["concurrent"]))


def run_ray_trials(data_dir: str, trials: list[Trial], dataset_sha256: str, out: Path, workers: int,
                   address: str | None) -> list[dict]:
    """One row per trial, in order; a trial that Ray reports as errored (a bug, not an edge-tl error) is
    a failed row naming its exception."""
    try:
        import ray
        from ray import tune
    except ImportError as err:
        raise BackendUnavailableError("edge-tl sweep --scheduler ray needs Ray: pip install 'edge-tl[scale]'") from err
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    cpus = os.cpu_count() or 1
    threads = max(1, cpus // workers) if address is None else 1
    started = time.perf_counter()
    ray.init(address=address, num_cpus=None if address else cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False, ignore_reinit_error=True)
    log.info("Ray %s up in %.1f s (%s): %d trials, %d at a time, %d CPU(s) each", ray.__version__,
             time.perf_counter() - started, address or "local", len(trials), workers, threads)
    try:
        configs = [{"data_dir": data_dir, "trial": dataclasses.asdict(trial), "dataset_sha256": dataset_sha256,
                    "threads": threads, "concurrent": workers > 1, "index": index} for index, trial in enumerate(trials)]
        tuner = tune.Tuner(
            tune.with_resources(_trainable, {"cpu": threads}),
            param_space={"config": tune.grid_search(configs)},
            tune_config=tune.TuneConfig(max_concurrent_trials=workers,
                                        trial_dirname_creator=lambda trial: f"trial-{trial.trial_id}"),
            run_config=tune.RunConfig(storage_path=str((out / "ray").resolve()), name=f"sweep-{int(time.time())}",
                                      verbose=0))
        results = tuner.fit()
        rows: list[dict | None] = [None] * len(trials)
        for result in results:
            index = result.config["config"]["index"]
            if result.error is not None:
                message = str(result.error).strip().splitlines()
                rows[index] = failed_row(trials[index], "trial crashed: "
                                         + (message[-1] if message else type(result.error).__name__))
            else:
                rows[index] = {key: value for key, value in result.metrics.items() if key in ROW_KEYS}
        return [row if row is not None else failed_row(trial, "Ray returned no result for this trial")
                for row, trial in zip(rows, trials)]
    finally:
        if address is None:
            ray.shutdown()

