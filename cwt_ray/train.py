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
from .samples import IGNORE, KIND_NAMES, Sample

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


def collate(batch: list[Sample], pad_id: int, with_kinds: bool = False):
    """Right padding (left-padded training batches gave NaN losses under bf16 SDPA on an H200).
    With `with_kinds`, also each token's target kind (samples.KIND_*), for per-stage metrics."""
    width = max(len(s.input_ids) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    groups = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    kinds = torch.zeros((len(batch), width), dtype=torch.long)
    for row, s in enumerate(batch):
        n = len(s.input_ids)
        ids[row, :n] = torch.tensor(s.input_ids)
        labels[row, :n] = torch.tensor(s.labels)
        groups[row, :n] = torch.tensor(s.token_groups())
        mask[row, :n] = 1
        if with_kinds:
            kinds[row, :n] = torch.tensor(s.token_kinds())
    return (ids, labels, groups, mask, kinds) if with_kinds else (ids, labels, groups, mask)


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
        cfg = self._causal_lm().config
        self.full_head = bool(getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None)
                              or getattr(cfg, "logits_scaling", 1.0) != 1.0)   # Gemma 2 / Cohere / Granite

    def _causal_lm(self):
        """The *ForCausalLM module (under a peft wrapper when training LoRA adapters)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def forward(self, ids, mask, labels, groups):
        """Returns (loss of each supervised token [N], fp32; its batch row [N]; its target group [N])."""
        target = labels[:, 1:]
        sup = target != IGNORE
        rows = sup.nonzero(as_tuple=True)[0]
        if self.full_head:
            logits = self.lm(input_ids=ids, attention_mask=mask).logits[:, :-1][sup]
        else:
            lm = self._causal_lm()
            hidden = lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            logits = lm.get_output_embeddings()(hidden[:, :-1][sup])
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


def load_samples(cfg: ExperimentConfig, method: str, run_dir: Path, tokenizer, chunks_dir: Path | None = None):
    from .chunk import read_chunks
    from .data import read_records
    from .samples import SampleBuilder, build_samples
    from .skip import read_skips

    records = read_records(run_dir / "data" / "train.parquet")
    chunks, skips = {}, None
    if method in ("cwt", "stt"):
        table = read_chunks(chunks_dir or run_dir / "chunks" / "train")
        chunks = dict(zip(table.column("id").to_pylist(), table.column("chunks").to_pylist()))
        records = [r for r in records if r["id"] in chunks]   # rationales the chunk stage rejected
    if method == "stt":
        skips = read_skips(run_dir / "skips" / "train")
    return build_samples(SampleBuilder(tokenizer, cfg), method, records, chunks, cfg.train.cwt_schedule,
                         skips_by_id=skips, chunk_mix=cfg.stt.chunk_mix, seed=cfg.train.seed)


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

    from .chunk import CHUNK_SCHEMA, Chunker
    from .chunk_view import summarise

    records = pq.read_table(str(run_dir / "data" / "train.parquet")).sort_by("id")
    mine = records.take(list(range(rank, records.num_rows, world)))
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    chunker = Chunker(cfg.model_dump(mode="json"), tokenizer_path, None, None, student_model=model)
    table = chunker(mine)
    model.train(was_training)
    parts = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(parts, table.to_pylist())
    else:
        parts = [table.to_pylist()]
    rows = sorted((r for part in parts for r in part), key=lambda r: r["id"])
    out = run_dir / "chunks" / f"train-epoch{epoch}"
    if rank == 0:
        full = pa.Table.from_pylist(rows, schema=CHUNK_SCHEMA)
        kept = full.filter(pc.is_valid(full.column("chunks")))
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        pq.write_table(kept, tmp / "chunks.parquet")
        summary = summarise(kept, records.num_rows, full.num_rows - kept.num_rows, cfg.chunk)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        sbc = summary.get("sbc", {})
        log.info(f"[train cwt] epoch {epoch}: SBC re-run with the current student, {kept.num_rows} rationales, "
                 f"mean chunk loss {sbc.get('mean_loss_before', float('nan')):.4f} -> "
                 f"{sbc.get('mean_loss_after', float('nan')):.4f}, {time.perf_counter() - t0:.1f}s -> {out}")
    if world > 1:
        torch.distributed.barrier()   # the folder exists before anyone reads it
    return out


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
    start_step, log_rows, chunks_dir = 0, [], None
    sbc_every = cfg.chunk.sbc_every_epochs if method == "cwt" and cfg.chunk.heuristic == "sbc" else None
    checkpoint = ray.train.get_checkpoint()   # set when Ray Train restarts us after a failure
    with checkpoint.as_directory() if checkpoint else nullcontext(student_path) as source:
        # weights_only: a checkpoint is data, never code (RNG states are tensors and tuples)
        state = torch.load(os.path.join(source, "train_state.pt"), weights_only=True) if checkpoint else {}
        # LoRA resumes from the base weights plus the saved adapters (the checkpoint's folder holds
        # the merged student, for evaluation; merging again would apply the adapters twice).
        model = load_model(student_path if tcfg.lora else source, cfg.student.trust_remote_code)
        model.config.use_cache = False
        if tcfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if tcfg.lora:
            model = add_lora(model, tcfg.lora)
            if "lora" in state:
                from peft import set_peft_model_state_dict
                set_peft_model_state_dict(model, state["lora"])
        model.to(device)   # the fused kernel needs the parameters on their device before it is built
        if checkpoint:
            if "rng" in state:
                set_rng_state(state["rng"])
            start_step = int(state["step"])
            if state.get("chunks_dir"):   # chunks from an SBC re-run during training
                chunks_dir = Path(state["chunks_dir"])
                samples, dropped = load_samples(cfg, method, run_dir, tokenizer, chunks_dir)
            log_rows = [json.loads(line) for line in Path(source, TRAIN_LOG).read_text().splitlines()]
            if rank == 0:
                log.info(f"[train {method}] resumed from checkpoint at step {start_step}")
    raw_model = model
    n_params = sum(p.numel() for p in raw_model.parameters())
    loss_module = SupervisedLoss(model)
    fsdp = tcfg.strategy == "fsdp"
    if fsdp:
        model = shard_fsdp(loss_module, raw_model)
    else:
        if tcfg.compile:
            loss_module = torch.compile(loss_module)
        model = ray.train.torch.prepare_model(loss_module)   # DDP wraps the loss module
    # The optimizer is built on the (possibly sharded) parameters; its state follows them.
    optimizer = build_optimizer(tcfg, raw_model, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg, total_steps))
    if "optimizer" in state:   # a resumed run (the final checkpoint keeps only its step)
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(raw_model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    flops_peak = peak_flops(device)
    precision = resolve_precision(tcfg.precision, device, warn=rank == 0)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext())

    def save(step: int, final: bool) -> None:
        """Rank 0 writes a checkpoint; every rank calls report (it is a barrier). Under FSDP every
        rank first helps gather the full weights and optimizer state onto rank 0's CPU."""
        metrics = {"step": step, "final": final, "loss": log_rows[-1]["loss"] if log_rows else None}
        full_model = full_optim = None
        if fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full_model = get_model_state_dict(raw_model, options=opts)
            full_optim = None if final else get_optimizer_state_dict(raw_model, optimizer, options=opts)
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as d:
            if tcfg.lora:   # a plain student folder: adapters merged into a copy of the weights
                import copy

                from peft import get_peft_model_state_dict
                copy.deepcopy(raw_model).merge_and_unload().save_pretrained(d)
            elif fsdp:
                raw_model.save_pretrained(d, state_dict=full_model)
            else:
                raw_model.save_pretrained(d)
            tokenizer.save_pretrained(d)
            write_student_json(Path(d), config["student_info"])
            Path(d, TRAIN_LOG).write_text("".join(json.dumps(r) + "\n" for r in log_rows))
            # The data position is the step: each epoch's order is a pure function of (seed, epoch).
            state = {"step": step}
            if not final:   # the final student needs no optimizer state (twice the model's size)
                state.update(optimizer=full_optim if fsdp else optimizer.state_dict(), scheduler=scheduler.state_dict(), rng=rng_state(),
                             chunks_dir=str(chunks_dir) if chunks_dir else None)
                if tcfg.lora:
                    state["lora"] = get_peft_model_state_dict(raw_model)
            torch.save(state, os.path.join(d, "train_state.pt"))
            if final:
                final_metrics = {**summary(log_rows, len(samples), dropped, world), "worker_nodes": worker_nodes,
                                 "precision": precision}
                Path(d, TRAIN_METRICS).write_text(json.dumps(final_metrics, indent=2))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    if rank == 0:
        log.info(f"[train {method}] {len(samples)} samples ({dropped} dropped: longer than student.max_length), "
                 f"{total_steps} steps of {tcfg.batch_size}, {world} worker(s) on {device}, {precision}")
        log.info(f"[train {method}] worker nodes (rank order): {', '.join(n[:12] for n in worker_nodes)}")
    model.train()
    schedule = tcfg.cwt_schedule if method in ("cwt", "stt") else "shuffle"
    order, order_epoch = [], -1
    board = None
    if tcfg.tensorboard and rank == 0:   # tensorboardX ships with ray[tune]; TensorBoard reads its files
        from tensorboardX import SummaryWriter
        board = SummaryWriter(logdir=str(run_dir / "tensorboard" / method))
    t_start = time.perf_counter()
    for step in range(start_step, total_steps):
        if cfg.debug.kill_at_step == step + 1 and rank == 0 and not checkpoint:
            log.info(f"[train {method}] debug.kill_at_step: killing this worker before step {step + 1}")
            os.kill(os.getpid(), signal.SIGKILL)
        if cfg.debug.sleep_per_step:
            time.sleep(cfg.debug.sleep_per_step)
        t0, c0 = time.perf_counter(), time.process_time()
        epoch = step // steps_per_epoch
        if sbc_every and epoch != order_epoch and epoch > 0 and epoch % sbc_every == 0 and step % steps_per_epoch == 0:
            chunks_dir = rechunk_with_student(cfg, run_dir, student_path, raw_model, epoch, rank, world)
            samples, dropped = load_samples(cfg, method, run_dir, tokenizer, chunks_dir)
            if len(samples) // tcfg.batch_size != steps_per_epoch:   # K is kept, so this is rare
                log.warning(f"[train cwt] re-chunked samples give {len(samples) // tcfg.batch_size} steps an epoch, "
                            f"not {steps_per_epoch}; the epoch keeps its length")
        if epoch != order_epoch:
            order, order_epoch = epoch_steps(samples, tcfg.batch_size, tcfg.seed, epoch, schedule, tcfg.bucket_factor), epoch
            if len(order) < steps_per_epoch:   # re-chunked samples fell short: cycle the epoch's steps
                order = [order[i % len(order)] for i in range(steps_per_epoch)]
        global_batch = order[step % steps_per_epoch]
        step_tokens = sum(samples[i].supervised for i in global_batch)
        step_info = {"tokens": step_tokens, "samples": len(global_batch),
                     "groups": sum(samples[i].num_groups for i in global_batch)}
        mbs = micro_batches(worker_share(global_batch, rank, world), samples, tcfg.micro_batch_size)
        # loss, processed (real) tokens, computed tokens, then token-loss sum and count per target kind
        local = torch.zeros(3 + 2 * (len(KIND_NAMES) + 1), dtype=torch.float64)
        for j, mb in enumerate(mbs):
            ids, labels, groups, mask, kinds = (t.to(device) for t in collate([samples[i] for i in mb], tokenizer.pad_token_id, True))
            sync = nullcontext() if j == len(mbs) - 1 or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with autocast:
                    tok_loss, rows, tok_groups = model(ids, mask, labels, groups)
                loss = normalised_loss(tok_loss, rows, tok_groups, len(mb), tcfg.loss_normalizer, step_info)
                (loss * world).backward()
            local[0] += loss.detach().double().cpu()
            local[1] += mask.sum().item()
            local[2] += mask.numel()
            tok_kinds = kinds[:, 1:][labels[:, 1:] != IGNORE]   # same order as tok_loss
            n_kinds = len(KIND_NAMES) + 1
            local[3:3 + n_kinds] += torch.zeros(n_kinds, dtype=torch.float64, device=device).index_add(
                0, tok_kinds, tok_loss.detach().double()).cpu()
            local[3 + n_kinds:] += torch.bincount(tok_kinds, minlength=n_kinds).double().cpu()
        grad_norm = _local(torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.max_grad_norm or float("inf")))
        # Any non-finite gradient makes the total norm non-finite: one scalar to check, where a check
        # per parameter read every gradient again and allocated a bool tensor as large (135 MB of
        # fresh memory per step for SmolLM2). Nothing is stepped before the check.
        if not torch.isfinite(grad_norm).all():
            raise FloatingPointError(f"non-finite gradient at step {step + 1} ({method})")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            torch.distributed.all_reduce(local)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        n_kinds = len(KIND_NAMES) + 1
        sums, counts = local[3:3 + n_kinds], local[3 + n_kinds:]
        row = {"step": step + 1, "epoch": round(step / steps_per_epoch, 4), "loss": float(local[0]), "lr": lr,
               "grad_norm": float(grad_norm), "supervised_tokens": step_tokens, "processed_tokens": int(local[1]),
               "computed_tokens": int(local[2]), "step_time_s": dt,
               # CPU time of this whole process (every thread) in the step: against step_time_s, how
               # much of the machine the step got (benchmarks/ray_overhead.py compares the loops)
               "step_cpu_s": cpu,
               # mean token loss of each kind of target in this step (chunk stages, answer, skip, ...)
               "loss_by_kind": {name: float(sums[k] / counts[k]) for k, name in KIND_NAMES.items() if counts[k]}}
        if flops_peak:
            row["mfu"] = 6 * n_params * row["processed_tokens"] / dt / (flops_peak * world)
        log_rows.append(row)
        if board is not None:
            write_board(board, row)
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(f"non-finite loss at step {step + 1} ({method})")
        done = step + 1
        if rank == 0 and (done % tcfg.log_every == 0 or done == total_steps):
            elapsed = time.perf_counter() - t_start
            eta = elapsed / (done - start_step) * (total_steps - done)
            log.info(f"[train {method}] step {done}/{total_steps} epoch {row['epoch']:.2f} loss {row['loss']:.4f} "
                     f"lr {lr:.2e} tok/s {row['processed_tokens'] / dt:.0f} sup tok/s {step_tokens / dt:.0f} "
                     f"ETA {_fmt_eta(eta)}")
        if done < total_steps and (done % steps_per_epoch == 0 or (tcfg.checkpoint_every and done % tcfg.checkpoint_every == 0)):
            save(done, final=False)
    if log_rows:
        log_rows[-1]["peak_memory_gb"] = peak_memory_gb(device)   # rank 0's; in the final checkpoint's log
    if board is not None:
        board.close()
    save(total_steps, final=True)


def write_board(board, row: dict) -> None:
    """One optimizer step's metrics as TensorBoard scalars (the same numbers as train_log.jsonl)."""
    step = row["step"]
    for key in ("loss", "lr", "grad_norm", "mfu"):
        if key in row:
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
