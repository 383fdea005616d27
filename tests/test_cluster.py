"""Clusters, proven on one machine with real `ray start` nodes and real `ray job submit`:
multi-node training, autoscaling (Ray's fake multi-node provider) and a killed node.

Every cluster here has its own temp dir, ports and token file; cleanup kills only its own
processes, also when a test fails (see local_cluster.py). The submitted commands are the README's.
"""
import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from local_cluster import ROOT, LocalCluster

# The README's "Run on a cluster" section shows exactly these (test_readme_... checks it).
SUBMIT = "ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml --"
SMOKE_JOB = ["python", "jobs/run.py", "configs/smoke.yaml", "storage_path=/tmp/cwt-runs", "methods=[std_cot]",
             "train.num_workers=2", "train.cpus_per_worker=1"]


def smoke_job(storage: Path, *extra: str) -> list[str]:
    return [f"storage_path={storage}" if a.startswith("storage_path=") else a for a in SMOKE_JOB] + list(extra)


@pytest.fixture
def cluster():
    # Short path under /tmp: Ray's Unix sockets live in it and must stay under ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="cwt-cluster-", dir="/tmp"))
    c = LocalCluster(temp_dir)
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def read_metrics(run_dir: Path, method: str = "std_cot") -> dict:
    return json.loads((run_dir / "students" / method / "train_metrics.json").read_text())


def test_readme_shows_the_commands_the_cluster_tests_run():
    readme = (ROOT / "README.md").read_text()
    job = " ".join(f"'{a}'" if "[" in a else a for a in SMOKE_JOB)
    assert f"{SUBMIT} {job}" in " ".join(readme.replace("\\\n", " ").split())
    assert "RAY_AUTH_MODE=token" in readme


@pytest.mark.slow
def test_autoscaler_launches_the_nodes_a_training_job_needs(cluster):
    config = yaml.safe_load((ROOT / "configs" / "cluster" / "fake_multinode.yaml").read_text())
    config["provider"]["gcs_address"] = cluster.gcs_address   # launched nodes join this cluster, not :6379
    path = cluster.temp_dir / "autoscaler.yaml"
    path.write_text(yaml.safe_dump(config))
    cluster.start_head(num_cpus=0, extra=[f"--autoscaling-config={path}"], env={"RAY_FAKE_CLUSTER": "1"})
    assert len(cluster.alive_nodes()) == 1   # the head alone, with no CPU for training

    storage = cluster.temp_dir / "runs"
    out = cluster.submit(smoke_job(storage)).stdout
    assert "succeeded" in out
    workers = read_metrics(storage / "smoke")["worker_nodes"]
    head = [n["node_id"] for n in cluster.alive_nodes() if n["is_head_node"]]
    assert len(set(workers)) == 2 and not set(workers) & set(head), workers
    # The fake provider numbers the nodes it launches fff...00001, fff...00002.
    assert all(w.startswith("fffff") for w in workers), workers


def _checkpoints(storage_dir: Path) -> list[Path]:
    return sorted(p for p in storage_dir.glob("checkpoint_*") if (p / "train_state.pt").is_file())


@pytest.mark.slow
def test_job_on_two_nodes_with_token_auth_resumes_from_last_checkpoint_when_a_node_dies(cluster):
    """One CPU per node and one CPU per training worker: the two workers must land on two nodes.
    One node is killed mid-run; the job goes on from its last checkpoint on a replacement node."""
    cluster.start_head(num_cpus=1)
    doomed = cluster.add_node(num_cpus=1)
    first_nodes = {n["node_id"] for n in cluster.wait_for_nodes(2)}
    assert len(first_nodes) == 2

    denied = cluster.submit(["python", "-c", "print(1)"], check=False, timeout=120,
                            env={"RAY_AUTH_TOKEN": "0" * 64})   # a wrong token is refused
    assert denied.returncode != 0 and "auth" in (denied.stdout + denied.stderr).lower()

    storage = cluster.temp_dir / "runs"
    # 64 questions / batch 8 = 8 steps per epoch, 3 epochs: checkpoints after steps 8 and 16.
    job_id = "cwt-fault-test"
    # Checkpoints through a URI (ray.storage_uri), the path object storage takes on a real cluster.
    bucket = cluster.temp_dir / "bucket"
    cluster.submit(smoke_job(storage, "data.train_size=64", "train.epochs=3", "train.max_steps=null",
                             f"ray.storage_uri=file://{bucket}"), submission_id=job_id)
    train_dir = bucket / "smoke" / "train-std_cot"

    deadline = time.monotonic() + 300
    while not _checkpoints(train_dir):
        if time.monotonic() > deadline:
            logs = cluster.ray("job", "logs", f"--address={cluster.dashboard_url}", job_id).stdout
            pytest.fail(f"no checkpoint was written in 300 s; job logs:\n{logs[-6000:]}")
        time.sleep(0.2)
    time.sleep(1.0)   # let Ray Train register the checkpoint before the node goes
    saved = _checkpoints(train_dir)
    saved_rows = {p.name: (p / "train_log.jsonl").read_text().splitlines() for p in saved}
    cluster.kill_node(doomed)
    cluster.add_node(num_cpus=1)   # the replacement machine

    status = cluster.wait_for_job(job_id, timeout=300)
    logs = cluster.ray("job", "logs", f"--address={cluster.dashboard_url}", job_id).stdout
    assert status == "succeeded", logs[-6000:]

    resumed = [int(line.rsplit(" ", 1)[1]) for line in logs.splitlines()
               if "resumed from checkpoint at step" in line]
    assert resumed, logs[-6000:]
    metrics = read_metrics(storage / "smoke")
    assert metrics["steps"] == 24   # the same optimizer steps as an uninterrupted run
    rows = [json.loads(line) for line in (storage / "smoke" / "students" / "std_cot" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 25))
    # The checkpoint that existed before the kill is the one the run went on from: its steps are
    # kept verbatim in the final log, and nothing before it was redone.
    before = max(saved_rows.values(), key=len)
    assert resumed[0] >= len(before) >= 8
    assert [json.loads(r)["loss"] for r in before] == [r["loss"] for r in rows[:len(before)]]
    # The retry ran on two nodes: the head and the replacement, not the killed one.
    alive = {n["node_id"] for n in cluster.alive_nodes()}
    assert metrics["workers"] == 2 and len(set(metrics["worker_nodes"])) == 2, metrics["worker_nodes"]
    assert set(metrics["worker_nodes"]) == alive and not set(metrics["worker_nodes"]) <= first_nodes
    assert (storage / "smoke" / "report.md").is_file()


def _prepared(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)   # what `ray up` does first: merge the provider's defaults
    validate_config(prepared)            # Ray's JSON schema (ray/autoscaler/ray-schema.json) + checks
    return prepared


def test_cluster_files_validate_against_rays_schema():
    from ray.autoscaler._private.util import validate_config

    _prepared(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    # The wheel ships no defaults for the fake provider, so that file is complete on its own.
    validate_config(yaml.safe_load((ROOT / "configs" / "cluster" / "fake_multinode.yaml").read_text()))


def test_cluster_schema_check_catches_a_misspelt_key():
    import jsonschema

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["idle_timeout_minute"] = config.pop("idle_timeout_minutes")
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minute"):
        _prepared(config)


def test_cluster_yaml_keeps_auth_on_dashboard_private_and_gpus_autoscaled():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert "/home/ubuntu/.ray/auth_token" in config["file_mounts"]
    gpu = config["available_node_types"]["ray.worker.gpu"]
    assert gpu["min_workers"] == 0 and 1 <= gpu["max_workers"] <= config["max_workers"]
    assert gpu["resources"].get("GPU", 0) >= 1
    setup = " ".join(config["setup_commands"])
    assert "constraints-gpu.txt" in setup and "grep -v '^torch=='" in setup   # pinned, but the image's CUDA torch
    assert "ray.storage_uri=s3://" in (ROOT / "cluster.yaml").read_text()


def test_storage_path_must_be_a_filesystem_path(smoke_cfg):
    from cwt_ray.config import UserError

    with pytest.raises(UserError, match="storage_path.*ray.storage_uri"):
        smoke_cfg("storage_path=s3://bucket/runs")


def test_checkpoints_on_a_storage_uri_are_cleared_when_the_config_changes(smoke_cfg, tmp_path):
    from cwt_ray.pipeline import prepare_train_storage
    from cwt_ray.train import train_storage_root

    cfg = smoke_cfg(f"ray.storage_uri=file://{tmp_path}/bucket/")
    root = train_storage_root(cfg, cfg.run_dir)
    assert root == f"file://{tmp_path}/bucket/smoke"
    assert train_storage_root(smoke_cfg(), cfg.run_dir) == str(cfg.run_dir / "ray")
    stale = tmp_path / "bucket" / "smoke" / "train-cwt" / "checkpoint_1"
    stale.mkdir(parents=True)
    prepare_train_storage(cfg.run_dir, "cwt", "fp-a", fresh=False, storage_uri=root)
    assert not stale.exists()   # no stamp yet: whatever was there belongs to another run
    stale.mkdir(parents=True)
    prepare_train_storage(cfg.run_dir, "cwt", "fp-a", fresh=False, storage_uri=root)
    assert stale.exists()       # same config: an interrupted attempt's checkpoint is kept for resume
    prepare_train_storage(cfg.run_dir, "cwt", "fp-b", fresh=False, storage_uri=root)
    assert not stale.exists()   # changed config: never resume a stale checkpoint
