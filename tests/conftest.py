"""Shared fixtures: one Ray cluster for the whole session, the tiny student built once."""
import os

# Offline by design: a hub id must fail at once, not retry for ~46 s.
for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               "TRANSFORMERS_VERBOSITY": "error"}.items():
    os.environ.setdefault(_k, _v)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from cwt_ray.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from cwt_ray.cluster import OFFLINE_ENV, quiet_ray_data

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", logging_level="WARNING",
                 runtime_env={"env_vars": dict(OFFLINE_ENV)})
    quiet_ray_data()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_student() -> Path:
    from cwt_ray.config import StudentConfig
    from cwt_ray.student import resolve_student

    return resolve_student(StudentConfig(name="tiny-llama"))


@pytest.fixture(scope="session")
def tokenizer(tiny_student):
    from cwt_ray.student import load_tokenizer

    return load_tokenizer(tiny_student)


@pytest.fixture
def smoke_cfg(tmp_path):
    """The smoke config with its run directory under the test's tmp folder."""
    def make(*overrides):
        return load_config(ROOT / "configs" / "smoke.yaml", [f"storage_path={tmp_path}", *overrides])
    return make


# Stage outputs shared across tests. Each Ray Train fit costs ~25 s of process start-up and imports
# on 2 cores, and each chunk stage ~9 s, so a test whose config gives a stage the same fingerprint
# as an earlier test's (the pipeline's own `stages.json` fingerprints, over exactly the config
# sections the stage depends on) starts from a copy of that stage's output: it is what the test
# would have computed. Everything else the test runs itself.
_SHARED_STAGES = {"data": ("data",), "chunk": ("chunks",), "train/std_cot": ("students/std_cot",),
                  "train/cwt": ("students/cwt",)}


@pytest.fixture(scope="session")
def _stage_outputs() -> dict:
    return {}   # (stage key, fingerprint) -> run directory that holds the output


def seed_stages(cfg, source: Path, keys=tuple(_SHARED_STAGES)) -> list[str]:
    """Copy the finished stages of run directory `source` whose fingerprints match cfg's into
    cfg's run directory (marked done there); returns the stage keys seeded."""
    import shutil

    from cwt_ray.pipeline import RunState

    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    state, done = RunState(cfg.run_dir, cfg), RunState(source, cfg).done
    seeded = []
    for key in keys:
        if key in state.done or done.get(key) != state.fingerprint(key):
            continue
        if key.startswith("train/") and cfg.debug.model_dump(exclude_defaults=True):
            continue   # a run with a kill or a pause injected must really train
        for folder in _SHARED_STAGES[key]:
            shutil.copytree(source / folder, cfg.run_dir / folder)
        state.mark(key)
        seeded.append(key)
    return seeded


@pytest.fixture
def run_shared(_stage_outputs):
    """`run_stages(cfg, stages)`, seeding cfg's run directory with matching finished stages of
    earlier tests."""
    from cwt_ray.pipeline import RunState, run_stages

    def run(cfg, stages):
        state = RunState(cfg.run_dir, cfg)
        for key in _SHARED_STAGES:
            source = _stage_outputs.get((key, state.fingerprint(key)))
            if source is not None:
                seed_stages(cfg, source, (key,))
        out = run_stages(cfg, stages)
        state = RunState(cfg.run_dir, cfg)
        for key in _SHARED_STAGES:
            if state.is_done(key):
                _stage_outputs.setdefault((key, state.fingerprint(key)), cfg.run_dir)
        return out
    return run


def full_forward_scores(scorer, record: dict, steps: list[str], candidates: list[list[int]]) -> list[float]:
    """SBC's score of each candidate the straightforward way: its whole chunk-wise sequence alone
    through the student with full logits, mean over chunks of each chunk's mean token NLL."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from cwt_ray.chunking import chunk_texts

    scores = []
    for groups in candidates:
        ids, stages = scorer.builder.stage_sequence(record, chunk_texts(steps, groups))
        with torch.no_grad():
            logits = scorer.student(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        nll = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
        target = torch.tensor(stages[1:])
        scores.append(float(np.mean([nll[target == i].mean().item() for i in range(1, len(groups) + 1)])))
    return scores
