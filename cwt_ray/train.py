"""Train stage: fine-tune a student on Std-CoT or CWT samples with Ray Train (DDP).

The loss normaliser is the method's central variable (docs/method.md), so it is our code, not a
library default. Every worker sees the same seeded order of samples, so every worker knows the
whole optimizer step's global batch; each computes the step's normaliser from it without any
communication, and the loss is exactly the same whatever the split into workers x accumulation
x micro-batches:
    token:  sum of token losses of the step / supervised tokens of the step
    sample: sum over samples of (their mean token loss) / samples in the step
DDP averages gradients over workers, so each worker's loss is multiplied by the world size.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import ExperimentConfig
from .samples import IGNORE, Sample

# Ray forwards a worker's print() twice under Train V2; a logger's records come through once.
log = logging.getLogger("cwt_ray.train")
log.setLevel(logging.INFO)

TRAIN_LOG = "train_log.jsonl"
TRAIN_METRICS = "train_metrics.json"


def epoch_steps(samples: list[Sample], batch_size: int, seed: int, epoch: int, schedule: str,
                bucket_factor: int) -> list[list[int]]:
    """Sample indices of each optimizer step of one epoch. Every worker computes the same list.

    Seeded shuffle; with `per_rationale`, rounds over the rationales (round r holds each
    rationale's r-th stage, stages in a random order), so a step holds at most one chunk of a
    rationale (except where a step straddles two rounds). Length bucketing sorts windows of
    bucket_factor x batch_size samples by length before cutting steps, then shuffles the steps.
    The tail that does not fill a step is dropped: a partial step would have a different
    normaliser and could not split evenly over workers; its samples come back in other epochs.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    if schedule == "per_rationale":
        by_rationale: dict[str, list[int]] = {}
        for i, s in enumerate(samples):
            by_rationale.setdefault(s.rationale_id, []).append(i)
        rationales = sorted(by_rationale)
        rng.shuffle(rationales)
        for r in rationales:
            rng.shuffle(by_rationale[r])
        depth = max(len(v) for v in by_rationale.values())
        runs = [[by_rationale[r][k] for r in rationales if k < len(by_rationale[r])] for k in range(depth)]
    else:
        order = list(range(len(samples)))
        rng.shuffle(order)
        runs = [order]
    if bucket_factor:
        window = batch_size * bucket_factor
        runs = [[i for w in range(0, len(run), window) for i in sorted(run[w:w + window], key=lambda i: len(samples[i].input_ids))]
                for run in runs]
    order = [i for run in runs for i in run]
    steps = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    if bucket_factor:
        rng.shuffle(steps)
    return steps


def worker_share(step: list[int], rank: int, world: int) -> list[int]:
    per = len(step) // world
    return step[rank * per:(rank + 1) * per]


def micro_batches(share: list[int], samples: list[Sample], micro: int) -> list[list[int]]:
    """Group the worker's share by length before cutting micro-batches: less padding, same loss
    (the step's loss is a sum, so the order inside a step does not change it)."""
    ordered = sorted(share, key=lambda i: len(samples[i].input_ids))
    return [ordered[i:i + micro] for i in range(0, len(ordered), micro)]


def collate(batch: list[Sample], pad_id: int):
    """Right padding (left-padded training batches gave NaN losses under bf16 SDPA on an H200)."""
    width = max(len(s.input_ids) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    groups = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, s in enumerate(batch):
        n = len(s.input_ids)
        ids[row, :n] = torch.tensor(s.input_ids)
        labels[row, :n] = torch.tensor(s.labels)
        groups[row, :n] = torch.tensor(s.token_groups())
        mask[row, :n] = 1
    return ids, labels, groups, mask


class SupervisedLoss(torch.nn.Module):
    """Per-token losses of the supervised positions only; DDP wraps this module.

    The LM head (hidden x 49k vocabulary for SmolLM2) runs only where a label exists: a CWT chunk
    sample supervises a fraction of its tokens, so this skips most of the largest matmul and the
    fp32 logits tensor while giving exactly the loss of a full forward.
    """

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        # Models that rescale or soft-cap their logits need the full head.
        cfg = lm.config
        self.full_head = bool(getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None))

    def forward(self, ids, mask, labels, groups):
        """Returns (loss of each supervised token [N], fp32; its batch row [N]; its target group [N])."""
        target = labels[:, 1:]
        sup = target != IGNORE
        rows = sup.nonzero(as_tuple=True)[0]
        if self.full_head:
            logits = self.lm(input_ids=ids, attention_mask=mask).logits[:, :-1][sup]
        else:
            hidden = self.lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            logits = self.lm.get_output_embeddings()(hidden[:, :-1][sup])
        return F.cross_entropy(logits.float(), target[sup], reduction="none"), rows, groups[:, 1:][sup]


_GROUP_STRIDE = 128   # > any group id (num_chunks <= 64, plus the answer stage)


def normalised_loss(tok_loss, rows, groups, batch_rows: int, normalizer: str, step: dict):
    """This micro-batch's share of the optimizer step's loss (see module docstring). `step` holds
    the whole step's supervised tokens, samples and target groups."""
    if normalizer == "token":
        return tok_loss.sum() / step["tokens"]
    if normalizer == "sample":
        key, size, denom = rows, batch_rows, step["samples"]
    else:
        key, size, denom = rows * _GROUP_STRIDE + groups, batch_rows * _GROUP_STRIDE, step["groups"]
    sums = torch.zeros(size, dtype=tok_loss.dtype, device=tok_loss.device).index_add(0, key, tok_loss)
    counts = torch.bincount(key, minlength=size)
    present = counts > 0
    return (sums[present] / counts[present]).sum() / denom


def lr_lambda(cfg, total_steps: int):
    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return fn


def load_samples(cfg: ExperimentConfig, method: str, run_dir: Path, tokenizer):
    from .chunk import read_chunks
    from .data import read_records
    from .samples import SampleBuilder, build_samples

    records = read_records(run_dir / "data" / "train.parquet")
    chunks = {}
    if method == "cwt":
        table = read_chunks(run_dir / "chunks" / "train")
        chunks = dict(zip(table.column("id").to_pylist(), table.column("chunks").to_pylist()))
        records = [r for r in records if r["id"] in chunks]   # rationales the chunk stage rejected
    return build_samples(SampleBuilder(tokenizer, cfg), method, records, chunks, cfg.train.cwt_schedule)


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    from contextlib import nullcontext

    import ray.train
    import ray.train.torch

    from .student import load_model, load_tokenizer, write_student_json

    cfg = ExperimentConfig.model_validate(config["cfg"])
    tcfg = cfg.train
    method, run_dir, student_path = config["method"], Path(config["run_dir"]), config["student_path"]
    torch.set_num_threads(max(1, int(tcfg.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    worker_nodes = gather_worker_nodes(world)

    tokenizer = load_tokenizer(student_path, cfg.student.trust_remote_code)
    samples, dropped = load_samples(cfg, method, run_dir, tokenizer)
    steps_per_epoch = len(samples) // tcfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(samples)} {method} samples are fewer than train.batch_size={tcfg.batch_size}")
    total_steps = math.ceil(tcfg.epochs * steps_per_epoch)
    if tcfg.max_steps:
        total_steps = min(total_steps, tcfg.max_steps)

    torch.manual_seed(tcfg.seed)
    start_step, log_rows = 0, []
    checkpoint = ray.train.get_checkpoint()   # set when Ray Train restarts us after a failure
    with checkpoint.as_directory() if checkpoint else nullcontext(student_path) as source:
        model = load_model(source, cfg.student.trust_remote_code)
        model.config.use_cache = False
        optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg, total_steps))
        if checkpoint:
            state = torch.load(os.path.join(source, "train_state.pt"), weights_only=True)
            if "optimizer" in state:   # the final checkpoint keeps only its step
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
            start_step = int(state["step"])
            log_rows = [json.loads(line) for line in Path(source, TRAIN_LOG).read_text().splitlines()]
            if rank == 0:
                log.info(f"[train {method}] resumed from checkpoint at step {start_step}")
    raw_model = model
    model = ray.train.torch.prepare_model(SupervisedLoss(model))   # DDP wraps the loss module
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if tcfg.precision == "bf16" else nullcontext())

    def save(step: int, final: bool) -> None:
        """Rank 0 writes a checkpoint; every rank calls report (it is a barrier)."""
        metrics = {"step": step, "final": final}
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as d:
            raw_model.save_pretrained(d)
            tokenizer.save_pretrained(d)
            write_student_json(Path(d), config["student_info"])
            Path(d, TRAIN_LOG).write_text("".join(json.dumps(r) + "\n" for r in log_rows))
            state = {"step": step}
            if not final:   # the final student needs no optimizer state (twice the model's size)
                state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())
            torch.save(state, os.path.join(d, "train_state.pt"))
            if final:
                final_metrics = {**summary(log_rows, len(samples), dropped, world), "worker_nodes": worker_nodes}
                Path(d, TRAIN_METRICS).write_text(json.dumps(final_metrics, indent=2))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    if rank == 0:
        log.info(f"[train {method}] {len(samples)} samples ({dropped} dropped: longer than student.max_length), "
                 f"{total_steps} steps of {tcfg.batch_size}, {world} worker(s) on {device}")
        log.info(f"[train {method}] worker nodes (rank order): {', '.join(n[:12] for n in worker_nodes)}")
    model.train()
    schedule = tcfg.cwt_schedule if method == "cwt" else "shuffle"
    order, order_epoch = [], -1
    t_start = time.perf_counter()
    for step in range(start_step, total_steps):
        if cfg.debug.kill_at_step == step + 1 and rank == 0 and not checkpoint:
            log.info(f"[train {method}] debug.kill_at_step: killing this worker before step {step + 1}")
            os.kill(os.getpid(), signal.SIGKILL)
        t0 = time.perf_counter()
        epoch = step // steps_per_epoch
        if epoch != order_epoch:
            order, order_epoch = epoch_steps(samples, tcfg.batch_size, tcfg.seed, epoch, schedule, tcfg.bucket_factor), epoch
        global_batch = order[step % steps_per_epoch]
        step_tokens = sum(samples[i].supervised for i in global_batch)
        step_info = {"tokens": step_tokens, "samples": len(global_batch),
                     "groups": sum(samples[i].num_groups for i in global_batch)}
        mbs = micro_batches(worker_share(global_batch, rank, world), samples, tcfg.micro_batch_size)
        local = torch.zeros(4, dtype=torch.float64)   # loss, processed (real) tokens, computed tokens, stage-0 n/a
        for j, mb in enumerate(mbs):
            ids, labels, groups, mask = (t.to(device) for t in collate([samples[i] for i in mb], tokenizer.pad_token_id))
            sync = nullcontext() if j == len(mbs) - 1 or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with autocast:
                    tok_loss, rows, tok_groups = model(ids, mask, labels, groups)
                loss = normalised_loss(tok_loss, rows, tok_groups, len(mb), tcfg.loss_normalizer, step_info)
                (loss * world).backward()
            local[0] += loss.detach().double().cpu()
            local[1] += mask.sum().item()
            local[2] += mask.numel()
        if not all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None):
            raise FloatingPointError(f"non-finite gradient at step {step + 1} ({method})")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.max_grad_norm or float("inf"))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            torch.distributed.all_reduce(local)
        dt = time.perf_counter() - t0
        row = {"step": step + 1, "epoch": round(step / steps_per_epoch, 4), "loss": float(local[0]), "lr": lr,
               "grad_norm": float(grad_norm), "supervised_tokens": step_tokens, "processed_tokens": int(local[1]),
               "computed_tokens": int(local[2]), "step_time_s": dt}
        log_rows.append(row)
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(f"non-finite loss at step {step + 1} ({method})")
        done = step + 1
        if rank == 0 and (done % tcfg.log_every == 0 or done == total_steps):
            elapsed = time.perf_counter() - t_start
            eta = elapsed / (done - start_step) * (total_steps - done)
            log.info(f"[train {method}] step {done}/{total_steps} epoch {row['epoch']:.2f} loss {row['loss']:.4f} "
                     f"lr {lr:.2e} tok/s {row['processed_tokens'] / dt:.0f} sup tok/s {step_tokens / dt:.0f} "
                     f"ETA {_fmt_eta(eta)}")
        if done < total_steps and done % steps_per_epoch == 0:
            save(done, final=False)
    save(total_steps, final=True)


def gather_worker_nodes(world: int) -> list[str]:
    """Ray node id of every rank, in rank order: the evidence that a multi-node run really
    spread over nodes (train_metrics.json `worker_nodes`). One all-gather per attempt."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [node_id]
    nodes = [None] * world
    torch.distributed.all_gather_object(nodes, node_id)
    return nodes


def summary(log_rows: list[dict], num_samples: int, dropped: int, world: int) -> dict:
    """Training throughput, the first step excluded (warm-up) when there is more than one."""
    steady = log_rows[1:] if len(log_rows) > 1 else log_rows
    wall = sum(r["step_time_s"] for r in steady) or float("nan")
    processed = sum(r["processed_tokens"] for r in log_rows)
    computed = sum(r["computed_tokens"] for r in log_rows)
    return {
        "steps": len(log_rows), "samples": num_samples, "samples_dropped_too_long": dropped, "workers": world,
        "first_loss": log_rows[0]["loss"] if log_rows else None,
        "final_loss": log_rows[-1]["loss"] if log_rows else None,
        "train_time_s": sum(r["step_time_s"] for r in log_rows),
        "processed_tokens": processed, "supervised_tokens": sum(r["supervised_tokens"] for r in log_rows),
        "processed_tokens_per_s": sum(r["processed_tokens"] for r in steady) / wall,
        "supervised_tokens_per_s": sum(r["supervised_tokens"] for r in steady) / wall,
        "real_token_ratio": processed / computed if computed else None,
        "processed_per_supervised_token": processed / max(1, sum(r["supervised_tokens"] for r in log_rows)),
    }


def train_storage_root(cfg: ExperimentConfig, run_dir: Path) -> str:
    """Ray Train's storage_path: <ray.storage_uri>/<name> (object storage such as s3://, reached
    from every node without a shared disk, and kept after the cluster is gone) or <run_dir>/ray."""
    if cfg.ray.storage_uri:
        return f"{cfg.ray.storage_uri.rstrip('/')}/{cfg.name}"
    return str(run_dir / "ray")


def train_method(cfg: ExperimentConfig, method: str, run_dir: Path, student_path: Path, student_info: dict) -> dict:
    """Driver side: launch the TorchTrainer, then copy the final checkpoint to students/<method>."""
    import ray.train
    from ray.train.torch import TorchTrainer

    tcfg = cfg.train
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "method": method, "run_dir": str(run_dir),
                           "student_path": str(student_path), "student_info": student_info},
        scaling_config=ray.train.ScalingConfig(num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu,
                                               resources_per_worker={"CPU": tcfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=f"train-{method}", storage_path=train_storage_root(cfg, run_dir),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=2)),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    dest = run_dir / "students" / method
    tmp = dest.with_name(method + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    result.checkpoint.to_directory(str(tmp))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    metrics = json.loads((dest / TRAIN_METRICS).read_text())
    metrics["fit_wall_s"] = wall
    (dest / TRAIN_METRICS).write_text(json.dumps(metrics, indent=2))
    return metrics
