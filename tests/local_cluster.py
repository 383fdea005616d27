"""Real multi-node Ray clusters on one machine, for tests/test_cluster.py.

Each node is a real `ray start` (head, or `--address=` worker) run in its own process group, so
"kill a node" is one SIGKILL to that group (raylet, its workers and agents) and cleanup never
touches a Ray cluster that someone else started on the same machine: no `ray stop`, which stops
every Ray node of the user. Every node gets fresh ports, the cluster its own `--temp-dir`, and
token authentication stays on with a token file of its own (RAY_AUTH_TOKEN_PATH), so the tests
neither read nor overwrite ~/.ray/auth_token.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent   # the venv whose `ray` and `python` the nodes run
DASHBOARD_HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class LocalCluster:
    def __init__(self, temp_dir: Path, gcs_port: int | None = None, env: dict | None = None):
        self.temp_dir = Path(temp_dir)
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.token_path = self.temp_dir / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        self.gcs_port = gcs_port or free_port()
        self.dashboard_port = free_port()
        self.groups: list[int] = []   # process group of each `ray start`, head first
        self.logs = self.temp_dir / "cli-logs"
        self.logs.mkdir(exist_ok=True)
        # `python` in a job's entrypoint and on every node is this venv's; the worktree's code
        # is importable on every node (the job's working_dir also ships it).
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN_PATH": str(self.token_path), "RAY_USAGE_STATS_ENABLED": "0",
                    # A raylet waits a short while for its dashboard agent (a Python process) to
                    # report its ports, then aborts ("Check failed" in WaitForDashboardAgentPorts).
                    # With other test suites loading this 2-core machine the agent took 16 s to start.
                    "RAY_agent_register_timeout_ms": "120000",
                    **(env or {})}
        self.env.pop("RAY_ADDRESS", None)
        self.env.pop("RAY_AUTH_TOKEN", None)

    @property
    def ip(self) -> str:
        import ray._private.services

        return ray._private.services.get_node_ip_address()

    @property
    def gcs_address(self) -> str:
        return f"{self.ip}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{DASHBOARD_HOST}:{self.dashboard_port}"

    def _ray_start(self, args: list[str], env: dict | None = None) -> int:
        """Run `ray start ...` in a new session: the daemons it leaves behind keep its process group."""
        log = self.logs / f"ray-start-{len(self.groups)}.log"
        # RAY_ADDRESS pins every process of the node to this cluster: Ray code that looks up "auto"
        # (Ray Train's placement-group cleaner, the state API) otherwise finds several clusters on
        # this machine and fails with "Found multiple active Ray instances".
        node_env = {**self.env, "RAY_ADDRESS": self.gcs_address, **(env or {})}
        with open(log, "w") as out:
            proc = subprocess.Popen([str(BIN / "ray"), "start", "--disable-usage-stats", *args], env=node_env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.groups.append(proc.pid)   # a session leader's pid is its process group id
        if proc.wait(timeout=120) != 0:
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{log.read_text()[-3000:]}")
        return proc.pid

    def start_head(self, num_cpus: int, resources: dict | None = None, extra: list[str] = (), env: dict | None = None) -> int:
        return self._ray_start([
            "--head", f"--port={self.gcs_port}", f"--num-cpus={num_cpus}", f"--temp-dir={self.temp_dir}",
            f"--dashboard-host={DASHBOARD_HOST}", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            *([f"--resources={json.dumps(resources)}"] if resources else []), *extra], env)

    def add_node(self, num_cpus: int, resources: dict | None = None, tries: int = 3) -> int:
        """Start a worker node; returns its process group id (the handle kill_node takes).
        On a loaded machine `ray start` can time out reaching a busy GCS ("The current node timed
        out during startup"); like a machine that failed to join, it is removed and started again."""
        for attempt in range(tries):
            try:
                return self._ray_start([
                    f"--address={self.gcs_address}", f"--num-cpus={num_cpus}",
                    f"--dashboard-agent-listen-port={free_port()}",
                    *([f"--resources={json.dumps(resources)}"] if resources else [])])
            except RuntimeError:
                self.kill_node(self.groups[-1])
                if attempt == tries - 1:
                    raise

    def kill_node(self, group: int) -> None:
        """SIGKILL every process of one node at once: no graceful shutdown, like a lost machine."""
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def ray(self, *args: str, timeout: float = 600, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(BIN / "ray"), *args], env={**self.env, **(env or {})}, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"ray {' '.join(args[:3])} ... exited {proc.returncode}:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}")
        return proc

    def submit(self, entrypoint: list[str], timeout: float = 600, check: bool = True, env: dict | None = None,
               submission_id: str | None = None) -> subprocess.CompletedProcess:
        """`ray job submit` of the repo, exactly as the README shows it (plus this cluster's address).
        With a submission_id it returns at once (--no-wait); poll `ray job status ID`."""
        detach = ["--no-wait", f"--submission-id={submission_id}"] if submission_id else []
        return self.ray("job", "submit", f"--address={self.dashboard_url}", "--working-dir=.",
                        "--runtime-env=jobs/runtime_env.yaml", *detach, "--", *entrypoint,
                        timeout=timeout, check=check, env=env)

    def wait_for_job(self, submission_id: str, timeout: float) -> str:
        """Poll `ray job status` until the job ends; returns succeeded, failed or stopped."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.ray("job", "status", f"--address={self.dashboard_url}", submission_id, check=False).stdout
            for state in ("succeeded", "failed", "stopped"):
                if f"Job '{submission_id}' {state}" in out:
                    return state
            time.sleep(5)   # each `ray job status` costs about a CPU-second
        raise AssertionError(f"job {submission_id} still running after {timeout:.0f}s")

    def alive_nodes(self) -> list[dict]:
        out = self.ray("list", "nodes", f"--address={self.dashboard_url}", "--format=json", "--filter", "state=ALIVE",
                       timeout=60).stdout
        return json.loads(out)

    def wait_for_nodes(self, count: int, timeout: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.alive_nodes()
            if len(nodes) >= count or time.monotonic() > deadline:
                return nodes
            time.sleep(2)

    def stop(self) -> None:
        """Kill everything this cluster started: its process groups, then any straggler whose command
        line names this cluster's temp dir or GCS port (e.g. nodes an autoscaler launched)."""
        for group in self.groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        marks = (str(self.temp_dir), self.gcs_address)
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if proc.pid != os.getpid() and any(m in cmd for m in marks):
                try:
                    proc.kill()
                except psutil.Error:
                    pass
