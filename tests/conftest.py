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

    from cwt_ray.pipeline import OFFLINE_ENV, quiet_ray_data

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
