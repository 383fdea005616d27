"""A plain PyTorch training loop: the reference Ray Train is compared against.

Same samples, same step order (`train.epoch_steps`), same optimizer and schedule as the Ray Train
worker loop, but none of its machinery: no Ray, no DDP wrapper, no `SupervisedLoss` (the full LM
head and Hugging Face's logits), no `normalised_loss` (the `token` normaliser written out by hand).
A test checks that a 1-worker Ray Train run gives the same loss curve; `benchmarks/train_throughput.py`
times the two on the same model, data and batch.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import ExperimentConfig
from .samples import IGNORE
from .train import build_optimizer, collate, epoch_steps, load_samples, lr_lambda, resolve_precision


def plain_train(cfg: ExperimentConfig, method: str, run_dir: Path, student_path: Path, head: str = "full") -> list[dict]:
    """Train like `train_loop_per_worker` with one worker and the `token` normaliser; returns one
    row per step: loss, processed tokens, step time. `head="full"`: Hugging Face's logits over every
    position (independent of our loss code: what the invariant test uses); `head="supervised"`:
    our `SupervisedLoss`, i.e. the same compute as the Ray Train worker, so a timing comparison
    measures what Ray Train itself costs."""
    from .train import SupervisedLoss

    from .student import load_model, load_tokenizer

    tcfg = cfg.train
    if tcfg.loss_normalizer != "token":
        raise ValueError("the reference loop implements the 'token' normaliser only")
    torch.set_num_threads(max(1, int(tcfg.cpus_per_worker)))
    device = torch.device("cuda" if tcfg.use_gpu and torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(student_path)
    samples, _ = load_samples(cfg, method, run_dir, tokenizer)
    steps_per_epoch = len(samples) // tcfg.batch_size
    total = min(int(tcfg.epochs * steps_per_epoch + 0.999999), tcfg.max_steps or 10**9)
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
        batch = [samples[i] for i in order[step % steps_per_epoch]]
        batch.sort(key=lambda s: len(s.input_ids))
        step_tokens = sum(s.supervised for s in batch)
        total_loss, processed = 0.0, 0
        for b in range(0, len(batch), tcfg.micro_batch_size):
            ids, labels, _, mask = (t.to(device) for t in collate(batch[b:b + tcfg.micro_batch_size], tokenizer.pad_token_id))
            if head == "supervised":
                with autocast:
                    tok_loss, _, _ = loss_module(ids, mask, labels, labels)
                loss = tok_loss.sum() / step_tokens
            else:
                with autocast:
                    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
                target = labels[:, 1:]
                loss = F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=IGNORE, reduction="sum") / step_tokens
            loss.backward()
            total_loss += loss.item()
            processed += int(mask.sum())
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        rows.append({"step": step + 1, "loss": total_loss, "processed_tokens": processed,
                     "supervised_tokens": step_tokens, "step_time_s": time.perf_counter() - t0,
                     "step_cpu_s": time.process_time() - c0})
    return rows
