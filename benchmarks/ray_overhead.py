"""Benchmark: where the CPU goes while Ray Train trains, next to a plain loop (issue 5).

`train_throughput.py` measures Ray Train at 0.89-0.92x a plain PyTorch loop on this 2-core VM (and
1.00x on an H200 box, `../shared/env.md`). This script measures the CPU time every process on the
machine uses while (a) the embedded Ray cluster is idle, (b) a plain loop trains in a child process
under that cluster (as in `train_throughput.py`), and (c) Ray Train trains the same steps. It reads
utime + stime of every process from /proc twice a second and sums them by role:

  training      the process that trains (ray::RayTrainWorker, or the plain loop's child)
  train_control Ray Train's own actors during a fit (TrainController, PlacementGroupCleaner,
                SynchronizationActor, DatasetManager, PreemptionWatcher, autoscaling coordinator)
                and idle pooled Ray workers
  daemons       the cluster's processes (gcs_server, raylet, dashboard and its agents, log monitor)
  driver        this process
  other         everything else (kernel threads, the VM's agent)

    .venv/bin/python benchmarks/ray_overhead.py [--config configs/experiments/quickstart_64.yaml] [--steps 5] \
        [--idle 20] [--repeats 2] [override ...]

Reports cores used (CPU seconds per wall second) per role and phase, the busiest processes, and a
final JSON line. The numbers are what the plain loop does not pay: on a machine with C cores,
Ray Train's control actors take train_control / C of it from the training process.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from cwt_ray.config import load_config
from cwt_ray.cluster import ray_session
from cwt_ray.pipeline import prepare_train_storage, run_stages, student_info
from cwt_ray.student import resolve_student
from cwt_ray.train import train_method

TICK = os.sysconf("SC_CLK_TCK")
CONTROL = re.compile(r"^ray::(TrainController|PlacementGroupCleaner|SynchronizationActor|DatasetManager|"
                     r"PreemptionWatcher|_AutoscalingCoordinatorActor|IDLE)")
DAEMON = re.compile(r"gcs_server|raylet|dashboard|DashboardAgent|RuntimeEnvAgent|log_monitor|"
                    r"autoscaler/_private/monitor|multiprocessing.forkserver")


def read_procs() -> dict[int, tuple[int, str]]:
    """pid -> (utime + stime in ticks, command line or kernel name)."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry.name}/cmdline") as f:
                cmd = f.read().replace("\0", " ").strip()
        except OSError:   # the process ended between listing and reading
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(entry.name)] = (int(fields[11]) + int(fields[12]), cmd or stat.split("(", 1)[1].rsplit(")", 1)[0])
    return out


class Sampler:
    """Sums every process's CPU time over a phase, sampling /proc every `interval` seconds (a
    process that ends loses at most its last interval)."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.per_pid, self.names = interval, defaultdict(int), {}
        self._last, self._stop, self._thread = {}, threading.Event(), None   # _last: read on __enter__

    def _sample(self) -> None:
        now = read_procs()
        for pid, (ticks, name) in now.items():
            # a pid first seen in this window counts from 0: it started inside the phase (a worker
            # that changes its name, ray::IDLE -> ray::RayTrainWorker, keeps its pid and its count)
            self.per_pid[pid] += ticks - self._last.get(pid, (0,))[0]
            # an exiting process has no command line left, only its 15-character kernel name
            if not self.names.get(pid, "").startswith(name):
                self.names[pid] = name
        self._last = now

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        self._last, self.t0 = read_procs(), time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        self.wall = time.perf_counter() - self.t0


def role(pid: int, name: str, trainer_pids: set[int]) -> str:
    if pid in trainer_pids or name.startswith("ray::RayTrainWo"):
        return "training"
    if pid == os.getpid():
        return "driver"
    if CONTROL.search(name):
        return "train_control"
    if DAEMON.search(name) or name.startswith("ray::"):
        return "daemons"
    return "other"


def summarise(s: Sampler, trainer_pids: set[int] = frozenset()) -> dict:
    by_role, by_name = defaultdict(float), defaultdict(float)
    for pid, ticks in s.per_pid.items():
        name, cores = s.names[pid], ticks / TICK / s.wall
        r = role(pid, name, trainer_pids)
        short = name.split()[0].rsplit("/", 1)[-1] if not name.startswith("ray::") else name.split()[0]
        by_role[r] += cores
        by_name[f"{r}:{short}"] += cores
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return {"wall_s": round(s.wall, 1), "cores": {k: round(v, 4) for k, v in sorted(by_role.items())},
            "top": {k: round(v, 4) for k, v in top}}


def step_table(rows: list[dict], warmup: int = 1) -> dict:
    """Steady-state steps (the first left out): wall time, the training process's own CPU time
    (every thread), and the cores it got while stepping."""
    rows = rows[warmup:]
    wall, cpu = sum(r["step_time_s"] for r in rows), sum(r["step_cpu_s"] for r in rows)
    tokens = sum(r["processed_tokens"] for r in rows)
    return {"steps": len(rows), "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "cores": round(cpu / wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "cpu_s_per_1k_tokens": round(1000 * cpu / tokens, 2)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/experiments/quickstart_64.yaml")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2, help="plain loop and Ray Train fits, alternating")
    p.add_argument("--method", default="cwt", choices=["std_cot", "cwt"])
    p.add_argument("--idle", type=float, default=20.0, help="seconds to sample the idle cluster")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, ["name=bench-train-throughput", f"methods=[{args.method}]",
                                    f"train.max_steps={args.steps}", "train.num_workers=1", *args.overrides])
    run_dir, phases = cfg.run_dir, []
    here = Path(__file__).with_name("train_throughput.py")

    def plain_loop() -> dict:
        with tempfile.NamedTemporaryFile(suffix=".json") as f, Sampler() as s:
            child = subprocess.Popen([sys.executable, str(here), "--config", args.config, "--steps", str(args.steps),
                                      "--method", args.method, "--child", "supervised", f.name, *args.overrides])
            if child.wait():
                raise SystemExit(f"the plain loop exited with {child.returncode}")
            rows = json.loads(Path(f.name).read_text())
        return {**summarise(s, {child.pid}), "steps": step_table(rows)}

    def ray_train(rep: int) -> dict:
        prepare_train_storage(run_dir, args.method, f"bench-overhead-{rep}", fresh=True)
        with Sampler() as s:
            train_method(cfg, args.method, run_dir, student, student_info(cfg, args.method))
        rows = [json.loads(r) for r in (run_dir / "students" / args.method / "train_log.jsonl").read_text().splitlines()]
        return {**summarise(s), "steps": step_table(rows)}

    with ray_session(cfg):
        run_stages(cfg, stages=("data", "chunk"))
        student = resolve_student(cfg.student)
        time.sleep(5)   # let the cluster's start-up work settle
        with Sampler() as s:
            time.sleep(args.idle)
        phases.append({"phase": "idle_cluster", "repeat": 0, **summarise(s)})
        for rep in range(args.repeats):
            for system in (("plain_loop", "ray_train") if rep % 2 == 0 else ("ray_train", "plain_loop")):
                ph = plain_loop() if system == "plain_loop" else ray_train(rep)
                phases.append({"phase": system, "repeat": rep, **ph})
                print(f"[overhead] repeat {rep + 1}/{args.repeats} {system}: {ph['steps']['tokens_per_s']} tok/s, "
                      f"{ph['steps']['cores']} cores in its steps", flush=True)
    cpus = os.cpu_count()
    roles = ["training", "train_control", "daemons", "driver", "other"]
    print(f"\n{cfg.student.name}, {args.method}, {args.steps} steps, {cpus} CPUs; "
          f"cores used over the whole phase (CPU s per wall s, start-up included)")
    print(f"{'phase':<14} {'rep':>3} {'wall s':>7} " + " ".join(f"{r:>13}" for r in roles))
    for ph in phases:
        print(f"{ph['phase']:<14} {ph['repeat']:>3} {ph['wall_s']:>7.1f} " + " ".join(f"{ph['cores'].get(r, 0):>13.3f}" for r in roles))
    for ph in phases:
        print(f"busiest in {ph['phase']} {ph['repeat']}: " + ", ".join(f"{k} {v:.3f}" for k, v in list(ph["top"].items())[:9]))
    print(f"\nsteady steps (first left out): the training process's wall and CPU time")
    print(f"{'system':<14} {'rep':>3} {'steps':>5} {'wall s':>8} {'CPU s':>8} {'cores':>6} {'tok/s':>7} {'CPU s/1k tok':>13}")
    for ph in phases[1:]:
        t = ph["steps"]
        print(f"{ph['phase']:<14} {ph['repeat']:>3} {t['steps']:>5} {t['wall_s']:>8.1f} {t['cpu_s']:>8.1f} {t['cores']:>6.2f} "
              f"{t['tokens_per_s']:>7.1f} {t['cpu_s_per_1k_tokens']:>13.2f}")
    control = statistics.median(ph["cores"].get("train_control", 0) for ph in phases if ph["phase"] == "ray_train")
    print(f"Ray Train's control actors used a median {control:.3f} cores during a fit: {control / cpus:.1%} of this machine")
    print(json.dumps({"benchmark": "ray_overhead", "config": args.config, "overrides": args.overrides, "cpus": cpus,
                      "steps": args.steps, "repeats": args.repeats, "phases": phases, "train_control_share": control / cpus}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
