"""A plain PyTorch training loop over cwt-ray's own samples: what Ray Train is timed against.

    (imported by benchmarks/train_throughput.py and benchmarks/loop_thread.py)

Same samples, same step order (`batches.epoch_steps`), same packing, optimizer and schedule as the
Ray Train worker loop, but none of its machinery: no Ray, no DDP wrapper, no checkpoints. It
shares our batching and schedule on purpose, so a timing comparison measures what Ray Train itself
costs; it cannot catch a mistake in them. The independent check of the training maths is
tests/test_pipeline.py's plain loop, which calls the Hugging Face model with `labels=`.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from cwt_ray.batches import collate, epoch_steps
from cwt_ray.config import ExperimentConfig
from cwt_ray.samples import IGNORE
from cwt_ray.student import load_model, load_tokenizer
from cwt_ray.train import SupervisedLoss, build_optimizer, forward_batch, load_samples, lr_lambda, resolve_precision


def plain_train(cfg: ExperimentConfig, method: str, run_dir: Path, student_path: Path, head: str = "full") -> list[dict]:
    """Train like `train_loop_per_worker` with one worker and the `token` normaliser; returns one
    row per step: loss, processed tokens, step time. `head="full"`: Hugging Face's logits over every
    position; `head="supervised"`: our `SupervisedLoss`, i.e. the same compute as the Ray Train
    worker, so a timing comparison measures what Ray Train itself costs."""
    tcfg = cfg.train
    if tcfg.loss_normalizer != "token":
        raise ValueError("the plain loop implements the 'token' normaliser only")
    torch.set_num_threads(max(1, int(tcfg.cpus_per_worker)))
    device = torch.device("cuda" if tcfg.use_gpu and torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(student_path)
    samples, _ = load_samples(cfg, method, run_dir, tokenizer)
    steps_per_epoch = len(samples) // tcfg.batch_size
    total = min(math.ceil(tcfg.epochs * steps_per_epoch), tcfg.max_steps or 10**9)
    pack_tokens = (tcfg.pack_tokens or cfg.student.max_length) if tcfg.packing else None
    torch.manual_seed(tcfg.seed)
    model = load_model(student_path).to(device)
    model.config.use_cache = False
    loss_module = SupervisedLoss(model)
    optimizer = build_optimizer(tcfg, model, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg, total))
    precision = resolve_precision(tcfg.precision, device, warn=False)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    schedule = tcfg.cwt_schedule if method in ("cwt", "stt") else "shuffle"
    rows, order, order_epoch = [], [], -1
    model.train()
    for step in range(total):
        t0, c0 = time.perf_counter(), time.process_time()
        epoch = step // steps_per_epoch
        if epoch != order_epoch:
            order, order_epoch = epoch_steps(samples, tcfg.batch_size, tcfg.seed, epoch, schedule, tcfg.bucket_factor), epoch
        batch = sorted((samples[i] for i in order[step % steps_per_epoch]), key=lambda s: len(s.input_ids))
        step_tokens = sum(s.supervised for s in batch)
        total_loss, processed = 0.0, 0
        for b in range(0, len(batch), tcfg.micro_batch_size):
            mb = collate(batch[b:b + tcfg.micro_batch_size], tokenizer.pad_token_id, pack_tokens).to(device)
            with autocast:
                if head == "supervised":
                    tok_loss, _, _ = forward_batch(loss_module, mb)
                    loss = tok_loss.sum() / step_tokens
                else:
                    logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                                   position_ids=mb.position_ids, use_cache=False).logits[:, :-1]
                    loss = F.cross_entropy(logits.float().transpose(1, 2), mb.labels[:, 1:], ignore_index=IGNORE,
                                           reduction="sum") / step_tokens
            loss.backward()
            total_loss += loss.item()
            processed += mb.real_tokens
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        rows.append({"step": step + 1, "loss": total_loss, "processed_tokens": processed,
                     "supervised_tokens": step_tokens, "step_time_s": time.perf_counter() - t0,
                     "step_cpu_s": time.process_time() - c0})
    return rows
