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
def test_job_trains_on_two_nodes_with_token_auth(cluster):
    # One CPU per node and one CPU per training worker: two workers must land on two nodes.
    cluster.start_head(num_cpus=1)
    cluster.add_node(num_cpus=1)
    nodes = cluster.wait_for_nodes(2)
    assert len(nodes) == 2

    denied = cluster.submit(["python", "-c", "print(1)"], check=False, timeout=120,
                            env={"RAY_AUTH_TOKEN": "0" * 64})   # a wrong token is refused
    assert denied.returncode != 0 and "auth" in (denied.stdout + denied.stderr).lower()

    storage = cluster.temp_dir / "runs"
    out = cluster.submit(smoke_job(storage)).stdout
    assert "succeeded" in out
    metrics = read_metrics(storage / "smoke")
    assert metrics["workers"] == 2
    assert len(set(metrics["worker_nodes"])) == 2, metrics["worker_nodes"]
    assert set(metrics["worker_nodes"]) == {n["node_id"] for n in nodes}
    assert (storage / "smoke" / "report.md").is_file()


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
def test_killed_node_job_resumes_from_last_checkpoint_on_a_new_node(cluster):
    cluster.start_head(num_cpus=1)
    doomed = cluster.add_node(num_cpus=1)
    first_nodes = {n["node_id"] for n in cluster.wait_for_nodes(2)}
    storage = cluster.temp_dir / "runs"
    # 96 questions / batch 8 = 12 steps per epoch, 3 epochs: checkpoints after steps 12 and 24.
    job_id = "cwt-fault-test"
    cluster.submit(smoke_job(storage, "data.train_size=96", "train.epochs=3", "train.max_steps=null"),
                   submission_id=job_id)
    train_dir = storage / "smoke" / "ray" / "train-std_cot"

    deadline = time.monotonic() + 300
    while not _checkpoints(train_dir):
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.2)
    time.sleep(1.0)   # let Ray Train register the checkpoint before the node goes
    saved = _checkpoints(train_dir)
    saved_rows = {p.name: (p / "train_log.jsonl").read_text().splitlines() for p in saved}
    cluster.kill_node(doomed)
    cluster.add_node(num_cpus=1)   # the replacement machine

    status = ""
    while not any(s in status for s in ("SUCCEEDED", "FAILED", "STOPPED")):
        assert time.monotonic() < deadline + 300, f"job still running: {status}"
        time.sleep(3)
        status = cluster.ray("job", "status", f"--address={cluster.dashboard_url}", job_id, check=False).stdout
    logs = cluster.ray("job", "logs", f"--address={cluster.dashboard_url}", job_id).stdout
    assert "SUCCEEDED" in status, logs[-6000:]

    resumed = [int(line.rsplit(" ", 1)[1]) for line in logs.splitlines()
               if "resumed from checkpoint at step" in line]
    assert resumed, logs[-6000:]
    metrics = read_metrics(storage / "smoke")
    assert metrics["steps"] == 36   # the same optimizer steps as an uninterrupted run
    rows = [json.loads(line) for line in (storage / "smoke" / "students" / "std_cot" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 37))
    # The checkpoint that existed before the kill is the one the run went on from: its steps are
    # kept verbatim in the final log, and nothing before it was redone.
    before = max(saved_rows.values(), key=len)
    assert resumed[0] >= len(before) >= 12
    assert [json.loads(r)["loss"] for r in before] == [r["loss"] for r in rows[:len(before)]]
    # The retry ran on the head and the replacement node, not on the killed one.
    assert len(set(metrics["worker_nodes"])) == 2 and not set(metrics["worker_nodes"]) <= first_nodes
