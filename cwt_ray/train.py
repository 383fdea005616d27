"""Train stage: fine-tune a student on Std-CoT, CWT or STT samples with Ray Train (DDP or FSDP).

Read it as a recipe, in the shape of torchtune's: `setup` builds what a worker trains with (the
student, optimizer, learning-rate schedule, samples, resumed state); `Checkpointer` saves and
restores all of it (model, optimizer, schedule, RNG, data position); `train_step` runs one
optimizer step and returns its statistics; `held_out_loss` scores the validation samples; and
`train_loop_per_worker` is the loop that ties them together.

The loss normaliser is the method's central variable (docs/method.md), so it is our code, not a
library default. Every worker sees the same seeded order of samples (cwt_ray/batches.py), so
every worker knows the whole optimizer step's global batch; each computes the step's normaliser
from it without any communication, and the loss is exactly the same whatever the split into
workers x accumulation x micro-batches, packed or padded:
    token:  sum of token losses of the step / supervised tokens of the step
    sample: sum over samples of (their mean token loss) / samples in the step
    chunk:  sum over target chunks of (their mean token loss) / target chunks in the step
DDP averages gradients over workers, so each worker's loss is multiplied by the world size.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .batches import Batch, collate, epoch_steps, micro_batches, worker_share
from .config import ExperimentConfig
from .console import fmt_eta, get_logger
from . import rundir
from .rundir import (CHUNK_SCHEMA, SUMMARY, TRAIN_LOG, TRAIN_METRICS, atomic_dir, read_chunks, read_json, read_records,
                     read_skips, skips_dir, split_file, student_dir, write_json)
from .samples import IGNORE, KIND_NAMES, Sample
from .student import needs_full_head, token_nll

# Ray forwards a worker's print() twice under Train V2; a logger's records come through once.
log = get_logger("train")



class SupervisedLoss(torch.nn.Module):
    """Per-token losses of the supervised positions only (student.token_nll: the LM head runs
    only there); DDP and FSDP wrap this module, so its forward is the one they synchronise."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.full_head = needs_full_head(lm)

    def forward(self, input_ids, labels, groups, sample, attention_mask=None, position_ids=None):
        """Returns (loss of each supervised token [N], fp32; its sample index in the micro-batch
        [N]; its target group within that sample [N])."""
        sup = labels[:, 1:] != IGNORE
        scored = torch.zeros_like(labels, dtype=torch.bool)
        scored[:, :-1] = sup
        nll, _ = token_nll(self.lm, input_ids, scored, labels[:, 1:][sup], attention_mask=attention_mask,
                           position_ids=position_ids, full_head=self.full_head)
        return nll, sample[:, 1:][sup], groups[:, 1:][sup]


def forward_batch(model, batch: Batch):
    return model(batch.input_ids, batch.labels, batch.groups, batch.sample, attention_mask=batch.attention_mask,
                 position_ids=batch.position_ids)


_GROUP_STRIDE = 128   # > any group id (num_chunks <= 64, plus the answer stage)


def normaliser_counts(samples: list[Sample]) -> dict:
    """What the normalisers divide by, for a whole optimizer step (or the whole validation set)."""
    return {"tokens": sum(s.supervised for s in samples), "samples": len(samples),
            "groups": sum(s.num_groups for s in samples)}


def normalised_loss(tok_loss, sample_idx, groups, num_samples: int, normalizer: str, step: dict):
    """This micro-batch's share of the optimizer step's loss (see module docstring). `step` holds
    the whole step's supervised tokens, samples and target groups (normaliser_counts)."""
    if normalizer == "token":
        return tok_loss.sum() / step["tokens"]
    if normalizer == "sample":
        key, size, denom = sample_idx, num_samples, step["samples"]
    else:
        key, size, denom = sample_idx * _GROUP_STRIDE + groups, num_samples * _GROUP_STRIDE, step["groups"]
    sums = torch.zeros(size, dtype=tok_loss.dtype, device=tok_loss.device).index_add(0, key, tok_loss)
    counts = torch.bincount(key, minlength=size)
    present = counts > 0
    return (sums[present] / counts[present]).sum() / denom


def _local(t):
    """The global value of a norm computed over sharded (DTensor) gradients: `full_tensor()`
    reduces a partial norm over the ranks (a no-op for a replicated one), so every rank logs and
    checks the same value."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def shard_fsdp(loss_module, lm):
    """FSDP2: one shard unit per decoder layer (the classes the model names in
    `_no_split_modules`), and the loss module as the root, whose forward we call: its hooks gather
    what no layer holds (embeddings, final norm, the LM head, tied or not) around our loss code.
    Ray's prepare_model only offers FSDP on GPUs; FSDP2 with gloo also runs on CPU."""
    from torch.distributed.fsdp import fully_shard

    unit_names = set(getattr(lm, "_no_split_modules", None) or [])
    units = [m for m in lm.modules() if type(m).__name__ in unit_names]
    if not units:
        raise ValueError(f"{type(lm).__name__} names no decoder layer class (_no_split_modules): cannot shard it")
    for unit in units:
        fully_shard(unit)
    return fully_shard(loss_module)


def add_lora(model, lcfg):
    from peft import LoraConfig, get_peft_model

    target = lcfg.target_modules
    return get_peft_model(model, LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                                            target_modules=target, task_type="CAUSAL_LM"))


def build_optimizer(tcfg, model, device):
    """AdamW over the trainable parameters (shared by Ray Train and the plain reference loop)."""
    fused = tcfg.fused_adamw if tcfg.fused_adamw is not None else device.type == "cuda"
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tcfg.lr,
                             weight_decay=tcfg.weight_decay, fused=fused)


def warmup_steps(tcfg, total_steps: int) -> int:
    """train.warmup_steps when set, else train.warmup_ratio of the steps (rounded up)."""
    if tcfg.warmup_steps is not None:
        return tcfg.warmup_steps
    return math.ceil(tcfg.warmup_ratio * total_steps)


def lr_lambda(tcfg, total_steps: int):
    """Learning-rate multiplier of each (0-based) step: a linear warm-up, then the schedule's decay
    over the steps after it (linear and cosine reach 0 just after the last step, as Hugging
    Face's schedules do)."""
    warmup = warmup_steps(tcfg, total_steps)

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if tcfg.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if tcfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return fn


def load_samples(cfg: ExperimentConfig, method: str, run_dir: Path, tokenizer, chunks_dir: Path | None = None,
                 split: str = "train") -> tuple[list[Sample], int]:
    """The method's samples of a split, and how many were dropped for exceeding student.max_length.
    Validation (held-out loss): STT's samples there are its CWT-format samples (no skip scoring)."""
    from .samples import SampleBuilder, build_samples

    records = read_records(split_file(run_dir, split))
    if split != "train" and method == "stt":
        method = "cwt"
    chunks, skips = {}, None
    if method in ("cwt", "stt"):
        table = read_chunks(chunks_dir or rundir.chunks_dir(run_dir, split))
        chunks = dict(zip(table.column("id").to_pylist(), table.column("chunks").to_pylist()))
        records = [r for r in records if r["id"] in chunks]   # rationales the chunk stage rejected
    if method == "stt":
        skips = read_skips(skips_dir(run_dir))
    return build_samples(SampleBuilder(tokenizer, cfg), method, records, chunks, cfg.train.cwt_schedule,
                         skips_by_id=skips, chunk_mix=cfg.stt.chunk_mix, seed=cfg.train.seed)


def load_validation_samples(cfg: ExperimentConfig, method: str, run_dir: Path, tokenizer) -> list[Sample] | None:
    """The held-out loss's samples, or None when the run has no validation split (or, for CWT and
    STT, no chunked one)."""
    split = split_file(run_dir, "validation")
    chunked = method == "std_cot" or (rundir.chunks_dir(run_dir, "validation") / "chunks.parquet").is_file()
    if not split.is_file() or not chunked:
        return None
    samples, _ = load_samples(cfg, method, run_dir, tokenizer, split="validation")
    return samples or None


# Dense bf16 peak of the GPUs we know, for the MFU estimate (6 x parameters x tokens per step).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def peak_flops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def native_bf16(device) -> bool:
    """Whether bf16 matmuls run on fast kernels here. On a CPU without AVX512-BF16/AMX, torch's
    autocast falls back to a reference GEMM: the SmolLM2 LM-head matmul's forward+backward took 61 s
    in bf16 vs 1.4 s in fp32 on an AVX2-only EPYC (docs/results.md), so bf16 there is a trap."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):   # private API: absent means no oneDNN bf16
        return False


def resolve_precision(precision: str, device, warn: bool = True) -> str:
    """`auto` -> bf16 where native, else fp32. An explicit bf16 is kept (the user asked), with a
    warning when it will be slow."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and warn and not native_bf16(device):
        hint = " (no AVX512-BF16/AMX)" if device.type == "cpu" else ""
        log.warning(f"train.precision=bf16 on a {device.type} without native bf16{hint}: matmuls take a slow "
                    "fallback path (tens of times slower); use train.precision=auto or fp32")
    return precision


def peak_memory_gb(device) -> float:
    """GPU: peak allocated by torch; CPU: the worker process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rechunk_with_student(cfg: ExperimentConfig, run_dir: Path, tokenizer_path: str, model, epoch: int,
                         rank: int, world: int) -> Path:
    """SBC during training: re-run the search with the student being trained, each worker on its
    share of the rationales, and gather the chunks everywhere. Rank 0 writes them to
    chunks/train-epoch<E>/ (same files as the chunk stage); every rank returns that folder."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from .chunk_view import summarise
    from .chunking import ChunkLossScorer, RecordChunker
    from .samples import SampleBuilder
    from .student import load_tokenizer

    records = pq.read_table(str(split_file(run_dir, "train"))).sort_by("id")
    mine = records.take(list(range(rank, records.num_rows, world)))
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(tokenizer_path)
    scorer = ChunkLossScorer(model, SampleBuilder(tokenizer, cfg), cfg.student.max_length, cfg.chunk.sbc_batch_size)
    table = RecordChunker(cfg.chunk, tokenizer, None, scorer)(mine)
    model.train(was_training)
    parts = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(parts, table.to_pylist())
    else:
        parts = [table.to_pylist()]
    rows = sorted((r for part in parts for r in part), key=lambda r: r["id"])
    out = rundir.chunks_dir(run_dir, f"train-epoch{epoch}")
    if rank == 0:
        full = pa.Table.from_pylist(rows, schema=CHUNK_SCHEMA)
        kept = full.filter(pc.is_valid(full.column("chunks")))
        with atomic_dir(out) as tmp:
            pq.write_table(kept, tmp / "chunks.parquet")
            summary = summarise(kept, records.num_rows, full.num_rows - kept.num_rows, cfg.chunk)
            write_json(tmp / SUMMARY, summary)
        sbc = summary.get("sbc", {})
        log.info(f"[train cwt] epoch {epoch}: SBC re-run with the current student, {kept.num_rows} rationales, "
                 f"mean chunk loss {sbc.get('mean_loss_before', float('nan')):.4f} -> "
                 f"{sbc.get('mean_loss_after', float('nan')):.4f}, {time.perf_counter() - t0:.1f}s -> {out}")
    if world > 1:
        torch.distributed.barrier()   # the folder exists before anyone reads it
    return out


@dataclass
class WorkerRun:
    """Everything one worker trains with; built by `setup`, advanced by the loop."""
    cfg: ExperimentConfig
    method: str
    run_dir: Path
    student_path: str
    student_info: dict
    rank: int
    world: int
    device: torch.device
    tokenizer: object
    samples: list[Sample]
    dropped: int
    val_samples: list[Sample] | None
    steps_per_epoch: int
    total_steps: int
    model: torch.nn.Module          # the loss module as wrapped for training (DDP / FSDP / compiled)
    raw_model: torch.nn.Module      # the Hugging Face student inside it
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: str
    pack_tokens: int | None
    worker_nodes: list[str]
    start_step: int = 0
    chunks_dir: Path | None = None
    log_rows: list[dict] = field(default_factory=list)
    order: list[list[int]] = field(default_factory=list)
    order_epoch: int = -1
    n_params: int = 0   # the student's parameter count, for MFU (counted on the first GPU step)

    @property
    def tcfg(self):
        return self.cfg.train

    @property
    def fsdp(self) -> bool:
        return self.tcfg.strategy == "fsdp"

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bf16" else nullcontext()

    def step_batch(self, step: int) -> list[int]:
        """The global batch (sample indices) of optimizer step `step` (0-based)."""
        epoch = step // self.steps_per_epoch
        if epoch != self.order_epoch:
            schedule = self.tcfg.cwt_schedule if self.method in ("cwt", "stt") else "shuffle"
            order = epoch_steps(self.samples, self.tcfg.batch_size, self.tcfg.seed, epoch, schedule, self.tcfg.bucket_factor)
            if len(order) < self.steps_per_epoch:   # re-chunked samples fell short: cycle the epoch's steps
                order = [order[i % len(order)] for i in range(self.steps_per_epoch)]
            self.order, self.order_epoch = order, epoch
        return self.order[step % self.steps_per_epoch]


def setup(config: dict) -> WorkerRun:
    """Samples, student (resumed from Ray Train's checkpoint after a failure), its wrapping,
    optimizer and learning-rate schedule."""
    import ray.train
    import ray.train.torch

    from .student import load_tokenizer

    cfg = ExperimentConfig.model_validate(config["cfg"])
    tcfg = cfg.train
    method, run_dir, student_path = config["method"], Path(config["run_dir"]), config["student_path"]
    torch.set_num_threads(max(1, int(tcfg.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    tokenizer = load_tokenizer(student_path, cfg.student.trust_remote_code)
    samples, dropped = load_samples(cfg, method, run_dir, tokenizer)
    steps_per_epoch = len(samples) // tcfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(samples)} {method} samples are fewer than train.batch_size={tcfg.batch_size}")
    total_steps = math.ceil(tcfg.epochs * steps_per_epoch)
    if tcfg.max_steps:
        total_steps = min(total_steps, tcfg.max_steps)
    torch.manual_seed(tcfg.seed)
    checkpoint = ray.train.get_checkpoint()   # set when Ray Train restarts us after a failure
    with checkpoint.as_directory() if checkpoint else nullcontext(student_path) as source:
        # weights_only: a checkpoint is data, never code (RNG states are tensors and tuples)
        state = torch.load(os.path.join(source, "train_state.pt"), weights_only=True) if checkpoint else {}
        raw_model = _load_student(cfg, student_path, source, state, device)
        log_rows = [json.loads(line) for line in Path(source, TRAIN_LOG).read_text().splitlines()] if checkpoint else []
    model = _wrap(cfg, raw_model)
    # The optimizer is built on the (possibly sharded) parameters; its state follows them.
    optimizer = build_optimizer(tcfg, raw_model, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg, total_steps))
    run = WorkerRun(cfg=cfg, method=method, run_dir=run_dir, student_path=student_path,
                    student_info=config["student_info"], rank=rank, world=world, device=device, tokenizer=tokenizer,
                    samples=samples, dropped=dropped, val_samples=load_validation_samples(cfg, method, run_dir, tokenizer),
                    steps_per_epoch=steps_per_epoch, total_steps=total_steps, model=model, raw_model=raw_model,
                    optimizer=optimizer, scheduler=scheduler, precision=resolve_precision(tcfg.precision, device, warn=rank == 0),
                    pack_tokens=(tcfg.pack_tokens or cfg.student.max_length) if tcfg.packing else None,
                    worker_nodes=gather_worker_nodes(world), log_rows=log_rows)
    if run.pack_tokens and not packing_isolates_samples(raw_model, cfg.student.trust_remote_code):
        if rank == 0:
            log.warning(f"[train {method}] train.packing: this student's attention "
                        f"({raw_model.config._attn_implementation}) may not keep packed samples apart; "
                        "training on padded rows instead")
        run.pack_tokens = None
    if checkpoint:
        Checkpointer(run).restore(state)
    return run


def packing_isolates_samples(model, remote_code: bool) -> bool:
    """Whether the student builds its attention masks with transformers' own mask functions, which
    turn restarting position ids into a block-diagonal mask (sdpa, eager, flex attention). Flash
    attention checks packing differently (one row only) and remote code may ignore it."""
    from .student import causal_lm

    return not remote_code and getattr(causal_lm(model).config, "_attn_implementation", None) in (
        "sdpa", "eager", "flex_attention")


def _load_student(cfg: ExperimentConfig, student_path: str, source: str, state: dict, device):
    """The student to train: the initial weights, or a checkpoint's. LoRA resumes from the base
    weights plus the saved adapters (the checkpoint's folder holds the merged student, for
    evaluation; merging again would apply the adapters twice)."""
    from .student import load_model

    tcfg = cfg.train
    model = load_model(student_path if tcfg.lora else source, cfg.student.trust_remote_code)
    model.config.use_cache = False
    if tcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tcfg.lora:
        model = add_lora(model, tcfg.lora)
        if "lora" in state:
            from peft import set_peft_model_state_dict
            set_peft_model_state_dict(model, state["lora"])
    return model.to(device)   # the fused AdamW kernel needs the parameters on their device before it is built


def _wrap(cfg: ExperimentConfig, raw_model):
    """The loss module around the student, sharded (FSDP2) or replicated (DDP), compiled if asked."""
    import ray.train.torch

    loss_module = SupervisedLoss(raw_model)
    if cfg.train.strategy == "fsdp":
        return shard_fsdp(loss_module, raw_model)
    if cfg.train.compile:
        loss_module = torch.compile(loss_module)
    return ray.train.torch.prepare_model(loss_module)   # DDP wraps the loss module


class Checkpointer:
    """Saves a worker's whole state through `ray.train.report` and restores it after a failure.
    The data position is the step: each epoch's order is a pure function of (seed, epoch)."""

    def __init__(self, run: WorkerRun):
        self.run = run

    def restore(self, state: dict) -> None:
        run = self.run
        if "rng" in state:
            set_rng_state(state["rng"])
        run.start_step = int(state["step"])
        if state.get("chunks_dir"):   # chunks from an SBC re-run during training
            run.chunks_dir = Path(state["chunks_dir"])
            run.samples, run.dropped = load_samples(run.cfg, run.method, run.run_dir, run.tokenizer, run.chunks_dir)
        if "optimizer" in state:   # the final checkpoint keeps only its step
            if run.fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
                set_optimizer_state_dict(run.raw_model, run.optimizer, state["optimizer"],
                                         options=StateDictOptions(full_state_dict=True))
            else:
                run.optimizer.load_state_dict(state["optimizer"])
            run.scheduler.load_state_dict(state["scheduler"])
        if run.rank == 0:
            log.info(f"[train {run.method}] resumed from checkpoint at step {run.start_step}")

    def save(self, step: int, final: bool) -> None:
        """Rank 0 writes a checkpoint; every rank calls report (it is a barrier). Under FSDP every
        rank first helps gather the full weights and optimizer state onto rank 0's CPU."""
        import ray.train

        run = self.run
        metrics = {"step": step, "final": final, "loss": run.log_rows[-1]["loss"] if run.log_rows else None}
        full_model = full_optim = None
        if run.fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full_model = get_model_state_dict(run.raw_model, options=opts)
            full_optim = None if final else get_optimizer_state_dict(run.raw_model, run.optimizer, options=opts)
        if run.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as d:
            self._write(Path(d), step, final, full_model, full_optim)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    def _write(self, d: Path, step: int, final: bool, full_model, full_optim) -> None:
        from .student import write_student_json

        run = self.run
        if run.tcfg.lora:   # a plain student folder: adapters merged into a copy of the weights
            import copy
            copy.deepcopy(run.raw_model).merge_and_unload().save_pretrained(d)
        else:
            run.raw_model.save_pretrained(d, **({"state_dict": full_model} if run.fsdp else {}))
        run.tokenizer.save_pretrained(d)
        write_student_json(d, run.student_info)
        (d / TRAIN_LOG).write_text("".join(json.dumps(r) + "\n" for r in run.log_rows))
        state = {"step": step}
        if not final:   # the final student needs no optimizer state (twice the model's size)
            state.update(optimizer=full_optim if run.fsdp else run.optimizer.state_dict(),
                         scheduler=run.scheduler.state_dict(), rng=rng_state(),
                         chunks_dir=str(run.chunks_dir) if run.chunks_dir else None)
            if run.tcfg.lora:
                from peft import get_peft_model_state_dict
                state["lora"] = get_peft_model_state_dict(run.raw_model)
        torch.save(state, d / "train_state.pt")
        if final:
            metrics = {**summary(run.log_rows, len(run.samples), run.dropped, run.world),
                       "worker_nodes": run.worker_nodes, "precision": run.precision, "pack_tokens": run.pack_tokens}
            write_json(d / TRAIN_METRICS, metrics)


# Per micro-batch statistics summed over a step: loss, real tokens, computed tokens (rows x width),
# then the token-loss sum and the token count of each target kind (samples.KIND_*).
_N_KINDS = len(KIND_NAMES) + 1


def train_step(run: WorkerRun, global_batch: list[int], step: int) -> dict:
    """One optimizer step on the step's global batch (this worker's share of it); its log row."""
    tcfg, samples, model = run.tcfg, run.samples, run.model
    t0, c0 = time.perf_counter(), time.process_time()
    counts = normaliser_counts([samples[i] for i in global_batch])
    mbs = micro_batches(worker_share(global_batch, run.rank, run.world), samples, tcfg.micro_batch_size)
    local = torch.zeros(3 + 2 * _N_KINDS, dtype=torch.float64)
    for j, mb in enumerate(mbs):
        batch = collate([samples[i] for i in mb], run.tokenizer.pad_token_id, run.pack_tokens).to(run.device)
        sync = nullcontext() if j == len(mbs) - 1 or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with run.autocast():
                tok_loss, sample_idx, tok_groups = forward_batch(model, batch)
            loss = normalised_loss(tok_loss, sample_idx, tok_groups, batch.num_samples, tcfg.loss_normalizer, counts)
            (loss * run.world).backward()
        local += _micro_stats(loss, batch, tok_loss)
    grad_norm = _local(torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.max_grad_norm or float("inf")))
    # Any non-finite gradient makes the total norm non-finite: one scalar to check, where a check
    # per parameter read every gradient again and allocated a bool tensor as large (135 MB of
    # fresh memory per step for SmolLM2). Nothing is stepped before the check.
    if not torch.isfinite(grad_norm).all():
        raise FloatingPointError(f"non-finite gradient at step {step + 1} ({run.method})")
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.world > 1:
        torch.distributed.all_reduce(local)
    return _step_row(run, step, local, lr, float(grad_norm), counts["tokens"], global_batch,
                     time.perf_counter() - t0, time.process_time() - c0)


def _micro_stats(loss, batch: Batch, tok_loss) -> torch.Tensor:
    out = torch.zeros(3 + 2 * _N_KINDS, dtype=torch.float64)
    out[0], out[1], out[2] = float(loss.detach()), batch.real_tokens, batch.computed_tokens
    tok_kinds = batch.kinds[:, 1:][batch.labels[:, 1:] != IGNORE]   # same order as tok_loss
    out[3:3 + _N_KINDS] = torch.zeros(_N_KINDS, dtype=torch.float64, device=tok_loss.device).index_add(
        0, tok_kinds, tok_loss.detach().double()).cpu()
    out[3 + _N_KINDS:] = torch.bincount(tok_kinds, minlength=_N_KINDS).double().cpu()
    return out


def _step_row(run: WorkerRun, step: int, local, lr: float, grad_norm: float, supervised: int,
              global_batch: list[int], dt: float, cpu: float) -> dict:
    sums, counts = local[3:3 + _N_KINDS], local[3 + _N_KINDS:]
    row = {"step": step + 1, "epoch": round(step / run.steps_per_epoch, 4), "loss": float(local[0]), "lr": lr,
           "grad_norm": grad_norm, "supervised_tokens": supervised, "processed_tokens": int(local[1]),
           "computed_tokens": int(local[2]), "step_time_s": dt,
           # CPU time of this whole process (every thread) in the step: against step_time_s, how
           # much of the machine the step got (benchmarks/ray_overhead.py compares the loops)
           "step_cpu_s": cpu,
           # mean token loss of each kind of target in this step (chunk stages, answer, skip, ...)
           "loss_by_kind": {name: float(sums[k] / counts[k]) for k, name in KIND_NAMES.items() if counts[k]},
           # indices into the method's samples (load_samples; after an SBC re-run during training,
           # into the samples of the chunks it wrote): what this step trained on
           "sample_ids": list(global_batch)}
    flops_peak = peak_flops(run.device)
    if flops_peak:
        run.n_params = run.n_params or sum(p.numel() for p in run.raw_model.parameters())
        row["mfu"] = 6 * run.n_params * row["processed_tokens"] / dt / (flops_peak * run.world)
    if not math.isfinite(row["loss"]):
        raise FloatingPointError(f"non-finite loss at step {step + 1} ({run.method})")
    return row


def held_out_loss(run: WorkerRun) -> float | None:
    """The teacher-forced loss of the validation samples (the method's own format, the run's
    normaliser), over all workers. Every rank runs the same number of forward passes (FSDP
    gathers parameters in each): a rank with fewer samples repeats one and counts it zero times."""
    if not run.val_samples:
        return None
    samples, tcfg = run.val_samples, run.tcfg
    counts = normaliser_counts(samples)
    share = list(range(run.rank, len(samples), run.world))
    forwards = math.ceil(math.ceil(len(samples) / run.world) / tcfg.micro_batch_size)
    mbs = micro_batches(share, samples, tcfg.micro_batch_size)
    total = torch.zeros(1, dtype=torch.float64)
    run.model.eval()
    with torch.no_grad():
        for j in range(forwards):
            mb = mbs[j] if j < len(mbs) else [0]
            batch = collate([samples[i] for i in mb], run.tokenizer.pad_token_id, run.pack_tokens).to(run.device)
            with run.autocast():
                tok_loss, sample_idx, tok_groups = forward_batch(run.model, batch)
            if j < len(mbs):
                total += float(normalised_loss(tok_loss, sample_idx, tok_groups, batch.num_samples,
                                               tcfg.loss_normalizer, counts))
    run.model.train()
    if run.world > 1:
        torch.distributed.all_reduce(total)
    return float(total)


def _eval_every(run: WorkerRun) -> int:
    """train.eval_every, or (None) five held-out losses a run."""
    return run.tcfg.eval_every or max(1, math.ceil(run.total_steps / 5))


def _debug_hooks(run: WorkerRun, step: int, resumed: bool) -> None:
    """Fault injection (debug.*) for the recovery tests."""
    if run.cfg.debug.kill_at_step == step + 1 and run.rank == 0 and not resumed:
        log.info(f"[train {run.method}] debug.kill_at_step: killing this worker before step {step + 1}")
        os.kill(os.getpid(), signal.SIGKILL)
    if run.cfg.debug.sleep_per_step:
        time.sleep(run.cfg.debug.sleep_per_step)


def _maybe_rechunk(run: WorkerRun, step: int) -> None:
    """SBC during training (chunk.sbc_every_epochs): at the start of every E-th epoch, re-run the
    search with the student being trained and rebuild the samples from the new chunks."""
    every = run.cfg.chunk.sbc_every_epochs if run.method == "cwt" and run.cfg.chunk.heuristic == "sbc" else None
    epoch = step // run.steps_per_epoch
    if not every or epoch == 0 or epoch % every or step % run.steps_per_epoch or epoch == run.order_epoch:
        return
    run.chunks_dir = rechunk_with_student(run.cfg, run.run_dir, run.student_path, run.raw_model, epoch, run.rank, run.world)
    run.samples, run.dropped = load_samples(run.cfg, run.method, run.run_dir, run.tokenizer, run.chunks_dir)
    if len(run.samples) // run.tcfg.batch_size != run.steps_per_epoch:   # K is kept, so this is rare
        log.warning(f"[train cwt] re-chunked samples give {len(run.samples) // run.tcfg.batch_size} steps an epoch, "
                    f"not {run.steps_per_epoch}; the epoch keeps its length")


def _announce(run: WorkerRun) -> None:
    if run.rank != 0:
        return
    layout = f"packed into rows of <= {run.pack_tokens} tokens" if run.pack_tokens else "padded rows"
    val = f"{len(run.val_samples)} validation samples" if run.val_samples else "no validation split: no held-out loss"
    log.info(f"[train {run.method}] {len(run.samples)} samples ({run.dropped} dropped: longer than student.max_length), "
             f"{run.total_steps} steps of {run.tcfg.batch_size} ({layout}), {run.world} worker(s) on {run.device}, "
             f"{run.precision}, warm-up {warmup_steps(run.tcfg, run.total_steps)} steps then {run.tcfg.lr_schedule}; {val}")
    log.info(f"[train {run.method}] worker nodes (rank order): {', '.join(n[:12] for n in run.worker_nodes)}")


def _progress(run: WorkerRun, row: dict, elapsed: float) -> None:
    done = row["step"]
    if run.rank != 0 or (done % run.tcfg.log_every and done != run.total_steps):
        return
    eta = elapsed / (done - run.start_step) * (run.total_steps - done)
    val = f" val_loss {row['val_loss']:.4f}" if row.get("val_loss") is not None else ""
    log.info(f"[train {run.method}] step {done}/{run.total_steps} epoch {row['epoch']:.2f} loss {row['loss']:.4f}{val} "
             f"lr {row['lr']:.2e} tok/s {row['processed_tokens'] / row['step_time_s']:.0f} "
             f"sup tok/s {row['supervised_tokens'] / row['step_time_s']:.0f} ETA {fmt_eta(eta)}")


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: setup, then one train_step per optimizer step, the held-out
    loss every eval_every steps, a checkpoint at epoch ends (and every checkpoint_every steps)."""
    import ray.train

    run = setup(config)
    checkpointer, resumed = Checkpointer(run), ray.train.get_checkpoint() is not None
    board = None
    if run.tcfg.tensorboard and run.rank == 0:   # tensorboardX ships with ray[tune]; TensorBoard reads its files
        from tensorboardX import SummaryWriter
        board = SummaryWriter(logdir=str(run.run_dir / "tensorboard" / run.method))
    _announce(run)
    run.model.train()
    t_start, eval_every = time.perf_counter(), _eval_every(run)
    for step in range(run.start_step, run.total_steps):
        _debug_hooks(run, step, resumed)
        _maybe_rechunk(run, step)
        row = train_step(run, run.step_batch(step), step)
        done = step + 1
        if done % eval_every == 0 or done == run.total_steps:
            row["val_loss"] = held_out_loss(run)
        run.log_rows.append(row)
        if board is not None:
            write_board(board, row)
        _progress(run, row, time.perf_counter() - t_start)
        if done < run.total_steps and (done % run.steps_per_epoch == 0
                                       or (run.tcfg.checkpoint_every and done % run.tcfg.checkpoint_every == 0)):
            checkpointer.save(done, final=False)
    if run.log_rows:
        run.log_rows[-1]["peak_memory_gb"] = peak_memory_gb(run.device)   # rank 0's; in the final checkpoint's log
    if board is not None:
        board.close()
    checkpointer.save(run.total_steps, final=True)

def write_board(board, row: dict) -> None:
    """One optimizer step's metrics as TensorBoard scalars (the same numbers as train_log.jsonl)."""
    step = row["step"]
    for key in ("loss", "val_loss", "lr", "grad_norm", "mfu"):
        if row.get(key) is not None:
            board.add_scalar(f"train/{key}", row[key], step)
    board.add_scalar("train/processed_tokens_per_s", row["processed_tokens"] / row["step_time_s"], step)
    board.add_scalar("train/supervised_tokens_per_s", row["supervised_tokens"] / row["step_time_s"], step)
    board.add_scalar("train/real_token_ratio", row["processed_tokens"] / max(1, row["computed_tokens"]), step)
    for kind, value in row["loss_by_kind"].items():
        board.add_scalar(f"loss_by_kind/{kind}", value, step)


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
        "peak_memory_gb": log_rows[-1].get("peak_memory_gb") if log_rows else None,
        "mfu": (sum(r["mfu"] for r in steady) / len(steady)) if steady and "mfu" in steady[0] else None,
        "final_loss_by_kind": _last_by_kind(log_rows),
        # the held-out loss at its last evaluation (the end of training), and every evaluation
        "final_val_loss": next((r["val_loss"] for r in reversed(log_rows) if r.get("val_loss") is not None), None),
        "val_losses": [[r["step"], r["val_loss"]] for r in log_rows if r.get("val_loss") is not None],
    }


def train_storage_root(cfg: ExperimentConfig, run_dir: Path) -> str:
    """Ray Train's storage_path: <ray.storage_uri>/<name> (object storage such as s3://, reached
    from every node without a shared disk, and kept after the cluster is gone) or <run_dir>/ray."""
    if cfg.ray.storage_uri:
        return f"{cfg.ray.storage_uri.rstrip('/')}/{cfg.name}"
    return str(run_dir / "ray")


def _last_by_kind(log_rows: list[dict], window: int = 10) -> dict:
    """Mean over the last `window` steps of each target kind's loss (the curve's end, less noisy)."""
    out: dict[str, list[float]] = {}
    for r in log_rows[-window:]:
        for k, v in r.get("loss_by_kind", {}).items():
            out.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in out.items()}


def train_method(cfg: ExperimentConfig, method: str, run_dir: Path, student_path: Path, student_info: dict,
                 callbacks: list | None = None) -> dict:
    """Driver side: launch the TorchTrainer, then copy the final checkpoint to students/<method>.
    `callbacks` go to Ray Train's RunConfig (a sweep trial passes TuneReportCallback there)."""
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
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tcfg.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=2),
            # Our workers log one line per step; Ray Train's own INFO lines (process group set-up,
            # device moves, every checkpoint's path) would bury them. Its warnings still show.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"), callbacks=callbacks),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    dest = student_dir(run_dir, method)
    with atomic_dir(dest) as tmp:
        result.checkpoint.to_directory(str(tmp))
        metrics = read_json(tmp / TRAIN_METRICS)
        metrics["fit_wall_s"] = wall
        write_json(tmp / TRAIN_METRICS, metrics)
    return metrics
