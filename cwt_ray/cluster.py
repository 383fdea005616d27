"""Ray, once for every stage: the session (embedded or submitted-to), the offline environment of
every worker, GPUs per actor, and the actor pool that the chunk, skip, eval and teach stages map
their batches over (and gather them from, with progress lines).

A bottom module: it imports only the config and the console, so every stage can use it.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time

from .config import ExperimentConfig
from .console import fmt_eta, get_logger

log = get_logger("cluster")

# Set for the driver and every Ray worker: nothing is fetched from a hub at run time, and library
# progress bars stay out of our one-line-per-step console output.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               "TRANSFORMERS_VERBOSITY": "error"}

QUIET_WITHOUT_STATE_API = "cwt_ray.cluster.quiet_without_state_api"
# Ray Train V2's switch (ray.train.v2._internal.constants), read by its controller.
RAY_TRAIN_PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# Ray's module path, which is also its logger's name.
RAY_TRAIN_PG_CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def set_offline_env() -> None:
    """The driver's share of OFFLINE_ENV (values the user set win)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def ray_session(cfg: ExperimentConfig):
    """Connect to the cluster we are submitted to, or start an embedded one (and stop it after)."""
    import ray

    set_offline_env()
    if ray.is_initialized():
        yield
        return
    # None means: the cluster a job was submitted to (Ray sets RAY_ADDRESS), else a new embedded
    # one. Never "the last cluster `ray start` left on this machine", which ray.init(None) would join.
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local"
    runtime_env = job_runtime_env(cfg, address)
    ray.init(address=address, num_cpus=cfg.ray.num_cpus if address == "local" else None,
             include_dashboard=cfg.ray.include_dashboard, dashboard_host="127.0.0.1",
             runtime_env=runtime_env, logging_level="WARNING")
    quiet_ray_data()
    try:
        yield
    finally:
        ray.shutdown()


def job_runtime_env(cfg: ExperimentConfig, address: str) -> dict:
    """The runtime env of every worker of our job (the Ray Train controller included)."""
    env_vars = dict(OFFLINE_ENV)
    if "CWT_RAY_CACHE" in os.environ:
        env_vars["CWT_RAY_CACHE"] = os.environ["CWT_RAY_CACHE"]
    runtime_env = {"env_vars": env_vars}
    if address == "local":
        # Ray Train's preemption watcher is an actor that polls whether the autoscaler drains a
        # node; an embedded cluster is this one machine and is never drained. Without it, each fit
        # has one idle Ray process fewer (each costs 1-2 % of a core: benchmarks/ray_overhead.py)
        # and no "constructor arguments in the object store" error line on the console.
        env_vars[RAY_TRAIN_PREEMPTION_WATCHER] = "0"
        if not cfg.ray.include_dashboard:
            runtime_env["worker_process_setup_hook"] = QUIET_WITHOUT_STATE_API
    return runtime_env


def quiet_ray_data() -> None:
    """Our stages print one line per step of work; Ray Data's per-operator progress logs would
    bury them, so only its warnings come through."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def quiet_without_state_api() -> None:
    """Every worker's setup on an embedded cluster without the dashboard (e.g. the trimmed Ray
    wheel on the GPU machine). Ray Train's placement-group cleaner asks the state API whether the
    train controller lives, every second; without the dashboard that API is absent and it logs a
    warning each time (and can never act: the controller removes its own group when it ends, and
    an embedded cluster ends with the program)."""
    logging.getLogger(RAY_TRAIN_PG_CLEANER).setLevel(logging.ERROR)


def actor_gpus(setting: float | None, needs_model: bool = True) -> float:
    """GPUs per Ray Data actor: the configured share, or (None) one GPU when the cluster has GPUs
    and the actor runs a model, else none."""
    import ray

    if setting is not None:
        return setting
    return 1.0 if needs_model and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def map_on_actor_pool(ds, fn_cls, kwargs: dict, *, rows: int, batch_size: int, concurrency: int,
                      cpus_per_actor: float, gpus_per_actor: float | None, needs_model: bool = True,
                      batch_format: str = "pyarrow"):
    """`ds.map_batches(fn_cls)` on a pool of `concurrency` actors, each built once with `kwargs`.

    The caller reads its input before the pool starts (on a small cluster the pool may hold every
    CPU, and read tasks queued behind it would wait forever), and an actor works through a block's
    batches alone, so the input is cut into one block per batch: every actor gets work."""
    import ray.data

    gpus = actor_gpus(gpus_per_actor, needs_model)
    ds = ds.repartition(max(1, math.ceil(rows / batch_size))).materialize()
    return ds.map_batches(fn_cls, fn_constructor_kwargs=kwargs, batch_size=batch_size,
                          compute=ray.data.ActorPoolStrategy(size=concurrency),
                          num_cpus=cpus_per_actor, num_gpus=gpus or None, batch_format=batch_format)


def gather(ds, label: str, rows: int, unit: str) -> list:
    """The Arrow batches of a (small-rowed) dataset, collected on the driver as they finish, with
    one progress line per batch: `[eval cwt] 16/24 questions, 1.20s each, ETA 0m09s`."""
    batches, done, t0 = [], 0, time.perf_counter()
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        batches.append(batch)
        done += batch.num_rows
        each = (time.perf_counter() - t0) / max(1, done)
        log.info(f"{label} {done}/{rows} {unit}, {each:.2f}s each, ETA {fmt_eta(each * (rows - done))}")
    return batches
