"""Benchmark: cwt-ray's Ray Train CWT training vs TRL's SFTTrainer, supervised tokens/s (issue 5).

Same student, same machine, same CWT samples (those of configs/experiments/quickstart_64.yaml), same batch
(8 samples a step, no accumulation), same precision (bf16 autocast, fp32 weights), same lr and
schedule, same number of steps. TRL gets the samples as prompt-completion pairs, pre-tokenized
(`input_ids` + `completion_mask`, prompt = the tokens before the first supervised label,
completion = the supervised tokens) with `completion_only_loss=True`, so both sides train on
exactly the same token ids and supervised tokens (checked and printed; the script also reports how
many pairs would re-tokenize to the same ids if TRL got them as text).

TRL is not a dependency of cwt-ray. Install it for this benchmark only, without moving the pins:

    .venv/bin/pip install -c constraints-cpu.txt trl==1.16.0
    PYTHONPATH=. .venv/bin/python benchmarks/trl_sft.py --student smollm2-135m --steps 8 --repeats 3

Runs alternate on the same machine (per repeat: ours with the default `shuffle` schedule and with
`single_pass`, then each TRL configuration; odd repeats put TRL first); the table shows medians over repeats and the
ratios of medians. Throughput is steady state: the first step of every run is excluded. TRL's step
time is from `on_step_begin` to `on_step_end` (its batch is fetched and collated before
`on_step_begin`, so this favours TRL; the interval between `on_step_end`s is reported beside it).
Ours is the step time our worker logs (collation included). Prints a table and a final JSON line
with both systems' configurations in full. Exit code 2 when `trl` is not installed.

TRL configurations (`--trl`, default grouped,padding_free; the bar uses the fastest given):
  same_steps    padded batches holding exactly our shuffle schedule's step batches, in order
                (sequential sampler): tokens per step identical on both sides, the fair setting
                for the bar (with random or grouped order each side's first steps draw different
                samples: 262.5 vs 231.8 supervised tokens per step in the 2026-12-03 run)
  same_steps_padding_free  the same steps, padding-free
  grouped       padded batches, `train_sampling_strategy="group_by_length"` (TRL's length grouping)
  padding_free  `padding_free=True`: the batch is one flattened row with restarting position_ids;
                correct without flash attention here because transformers builds a block-diagonal
                causal mask from the position_ids under SDPA (checked: the loss equals the padded
                batch's before any timing, else the script stops).
Packing (`packing=True`, bfd) is not run: it packs a variable number of samples into each row, so
steps would no longer hold the same samples and tokens as ours; padding-free without packing is
the same attention layout with exactly 8 samples a step.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def load() -> tuple[float, float, float]:
    return tuple(round(x, 2) for x in os.getloadavg())


def to_pairs(samples, tokenizer):
    """CWT samples -> pre-tokenized prompt-completion rows; checks and counts."""
    rows, contiguous, retok_prompt, retok_full, sup_ours, sup_trl = [], 0, 0, 0, 0, 0
    for s in samples:
        sup = [i for i, t in enumerate(s.labels) if t != -100]
        first = sup[0]
        contiguous += sup == list(range(first, len(s.labels))) and all(
            s.labels[i] == s.input_ids[i] for i in sup)
        mask = [0] * first + [1] * (len(s.input_ids) - first)
        rows.append({"input_ids": list(s.input_ids), "completion_mask": mask})
        sup_ours += s.supervised
        sup_trl += sum(mask[1:])   # causal LM: position 0 is never a target
        prompt_text = tokenizer.decode(s.input_ids[:first])
        completion_text = tokenizer.decode(s.input_ids[first:])
        p_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        f_ids = tokenizer(prompt_text + completion_text, add_special_tokens=False)["input_ids"]
        retok_prompt += p_ids == s.input_ids[:first]
        retok_full += f_ids == s.input_ids
    check = {"samples": len(samples), "supervised_suffix_contiguous": contiguous,
             "retokenize_prompt_same_ids": retok_prompt, "retokenize_prompt_plus_completion_same_ids": retok_full,
             "supervised_tokens_ours": sup_ours, "supervised_tokens_trl": sup_trl,
             "mean_len": sum(len(s.input_ids) for s in samples) / len(samples),
             "mean_supervised": sup_ours / len(samples)}
    return rows, check


def check_padding_free(model_path, rows, pad_id) -> dict:
    """Summed token loss of 4 samples of different lengths (fp32, use_cache=False as in training):
    one at a time, as a padded batch, as TRL's padding-free batch, and flattened without restarting
    positions (sequences attend to each other: shows the check can fail)."""
    import torch
    import torch.nn.functional as F
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from cwt_ray.student import load_model

    model = load_model(model_path).eval()
    model.config.use_cache = False
    picked = sorted(rows, key=lambda r: len(r["input_ids"]))
    picked = [picked[0], picked[len(picked) // 3], picked[2 * len(picked) // 3], picked[-1]]
    ex = [{"input_ids": r["input_ids"], "labels": [t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])]}
          for r in picked]

    def loss_sum(batch):
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        logits = model(**inputs, use_cache=False).logits[..., :-1, :].float()
        labels = batch["labels"][..., 1:]
        return float(F.cross_entropy(logits[labels != -100], labels[labels != -100], reduction="sum"))

    with torch.no_grad():
        out = {"one_at_a_time": sum(loss_sum(DataCollatorForLanguageModeling(pad_token_id=pad_id)([e])) for e in ex),
               "padded": loss_sum(DataCollatorForLanguageModeling(pad_token_id=pad_id)(ex))}
        flat = DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=True)(ex)
        out["padding_free"] = loss_sum(flat)
        flat["position_ids"] = torch.arange(flat["input_ids"].shape[1])[None]
        out["flattened_no_position_restart"] = loss_sum(flat)
    del model
    gc.collect()
    ref = out["one_at_a_time"]
    out["padding_free_rel_diff"] = abs(out["padding_free"] - ref) / abs(ref)
    out["ok"] = out["padding_free_rel_diff"] < 1e-5
    return out


# TRL settings: padding, sampling order; `same_steps*` get our shuffle schedule's step batches in
# order (sequential sampler), so every TRL step holds exactly the samples of our step.
TRL_MODES = {
    "grouped": {"padding_free": False, "sampling": "group_by_length", "same_steps": False},
    "padding_free": {"padding_free": True, "sampling": "random", "same_steps": False},
    "same_steps": {"padding_free": False, "sampling": "sequential", "same_steps": True},
    "same_steps_padding_free": {"padding_free": True, "sampling": "sequential", "same_steps": True},
}


def run_trl(mode: str, rows, model_path, tokenizer, tcfg, steps: int, cpus: int, seed: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from cwt_ray.student import load_model
    from cwt_ray.train import resolve_precision, warmup_steps

    torch.set_num_threads(cpus)
    marks = {"begin": [], "end": []}
    counts = {"sup": [], "processed": [], "computed": []}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            marks["begin"].append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            marks["end"].append(time.perf_counter())

    class CountingSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, *a, **kw):
            labels = inputs["labels"]
            counts["sup"].append(int((labels[..., 1:] != -100).sum()))
            counts["processed"].append(int(inputs["attention_mask"].sum()) if "attention_mask" in inputs
                                       else int(inputs["input_ids"].numel()))
            counts["computed"].append(int(inputs["input_ids"].numel()))
            return super().training_step(model, inputs, *a, **kw)

    with tempfile.TemporaryDirectory(prefix="trl-sft-") as out_dir:
        config = dict(
            output_dir=out_dir, max_steps=steps, per_device_train_batch_size=tcfg.batch_size,
            gradient_accumulation_steps=1, learning_rate=tcfg.lr, lr_scheduler_type=tcfg.lr_schedule,
            warmup_steps=warmup_steps(tcfg, steps), weight_decay=tcfg.weight_decay, max_grad_norm=tcfg.max_grad_norm,
            optim="adamw_torch", bf16=resolve_precision(tcfg.precision, torch.device("cpu"), warn=False) == "bf16",
            use_cpu=True, seed=seed,
            completion_only_loss=True, max_length=None, padding_free=TRL_MODES[mode]["padding_free"],
            train_sampling_strategy=TRL_MODES[mode]["sampling"],
            dataloader_drop_last=True, dataloader_num_workers=0, report_to="none", logging_steps=1,
            save_strategy="no", disable_tqdm=True)
        args = SFTConfig(**config)
        model = load_model(model_path)
        model.config.use_cache = False
        trainer = CountingSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                     processing_class=tokenizer, callbacks=[Timer()])
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        del trainer, model
        gc.collect()
    dts = [e - b for b, e in zip(marks["begin"], marks["end"])]
    ends = [marks["end"][i] - marks["end"][i - 1] for i in range(1, len(marks["end"]))]
    s = slice(1, None)   # steady state: first step excluded
    wall_steady = sum(dts[s])
    return {"system": "trl", "schedule": mode, "steps": len(dts),
            "supervised_tokens_per_s": sum(counts["sup"][s]) / wall_steady,
            "processed_tokens_per_s": sum(counts["processed"][s]) / wall_steady,
            "real_token_ratio": sum(counts["processed"]) / sum(counts["computed"]),
            "step_time_s": wall_steady / len(dts[s]),
            "step_time_end_to_end_s": sum(ends) / len(ends) if ends else None,
            "supervised_tokens_per_s_end_to_end": sum(counts["sup"][s]) / sum(ends) if ends else None,
            "supervised_tokens_per_step": sum(counts["sup"]) / len(counts["sup"]),
            "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
            "fit_wall_s": wall, "config": {k: v for k, v in config.items() if k != "output_dir"}}


def run_ours(cfg, run_dir, student_path) -> dict:
    from cwt_ray.pipeline import student_info
    from cwt_ray.rundir import TRAIN_LOG
    from cwt_ray.train import train_method

    # A fresh Ray Train storage each run: with the previous run's checkpoint there, Ray Train would
    # resume from it (and report that run's metrics) instead of training.
    shutil.rmtree(run_dir / "ray" / "train-cwt", ignore_errors=True)
    m = train_method(cfg, "cwt", run_dir, student_path, student_info(cfg, "cwt"))
    log_rows = [json.loads(x) for x in (run_dir / "students" / "cwt" / TRAIN_LOG).read_text().splitlines()]
    steady = log_rows[1:]
    return {"system": "cwt-ray", "schedule": cfg.train.cwt_schedule, "steps": m["steps"],
            "supervised_tokens_per_s": m["supervised_tokens_per_s"],
            "processed_tokens_per_s": m["processed_tokens_per_s"], "real_token_ratio": m["real_token_ratio"],
            "step_time_s": sum(r["step_time_s"] for r in steady) / len(steady),
            "supervised_tokens_per_step": m["supervised_tokens"] / m["steps"],
            "first_loss": m["first_loss"], "final_loss": m["final_loss"], "fit_wall_s": m["fit_wall_s"]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/experiments/quickstart_64.yaml")
    p.add_argument("--student", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--trl", default="grouped,padding_free",
                   help=f"comma-separated TRL configurations: {', '.join(TRL_MODES)}")
    p.add_argument("--schedules", default="shuffle,single_pass", help="our CWT schedules (the bar uses shuffle)")
    p.add_argument("--storage", default="/tmp/cwt-bench-trl", help="storage_path of the benchmark's run dir")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    try:
        import trl
    except ImportError:
        print("trl is not installed: pip install -c constraints-cpu.txt trl==1.16.0 (benchmark only)", file=sys.stderr)
        return 2

    from cwt_ray.config import load_config
    from cwt_ray.cluster import ray_session
    from cwt_ray.pipeline import run_stages
    from cwt_ray.student import load_tokenizer, resolve_student
    from cwt_ray.batches import epoch_steps
    from cwt_ray.train import load_samples

    trl_modes = [m for m in a.trl.split(",") if m]
    if set(trl_modes) - set(TRL_MODES):
        print(f"unknown --trl setting(s) {sorted(set(trl_modes) - set(TRL_MODES))}; known: {', '.join(TRL_MODES)}", file=sys.stderr)
        return 2
    schedules = [s for s in a.schedules.split(",") if s]
    base = [f"student.name={a.student}", f"storage_path={a.storage}", "methods=[cwt]", f"train.max_steps={a.steps}",
            *a.overrides]
    cfgs = {s: load_config(a.config, [*base, f"train.cwt_schedule={s}"]) for s in schedules}
    cfg = load_config(a.config, base)   # shuffle: the samples TRL gets
    tcfg = cfg.train
    if tcfg.micro_batch_size != tcfg.batch_size or tcfg.num_workers != 1:
        print("this benchmark compares 1 worker, no accumulation (train.micro_batch_size = train.batch_size)", file=sys.stderr)
        return 2
    student_path = resolve_student(cfg.student)
    load_start = load()
    print(f"load average at start: {load_start}", flush=True)
    results: list[dict] = []
    with ray_session(cfg):
        run_dir = run_stages(cfg, stages=("data", "chunk"))
        tokenizer = load_tokenizer(student_path)
        samples, dropped = load_samples(cfg, "cwt", run_dir, tokenizer)
        rows, check = to_pairs(samples, tokenizer)
        check["dropped_too_long"] = dropped
        print(f"samples: {json.dumps(check)}", flush=True)
        if check["supervised_tokens_ours"] != check["supervised_tokens_trl"]:
            print("supervised token counts differ between the two sides", file=sys.stderr)
            return 1
        # Our shuffle schedule's first steps, in order: what the same_steps TRL modes train on.
        order = epoch_steps(samples, tcfg.batch_size, tcfg.seed, 0, "shuffle", tcfg.bucket_factor)
        step_rows = [rows[i] for step in order[:a.steps] for i in step]
        pf_check = None
        if any(TRL_MODES[m]["padding_free"] for m in trl_modes):
            pf_check = check_padding_free(student_path, rows, tokenizer.pad_token_id)
            print(f"padding-free check (summed loss, fp32, 4 samples): {json.dumps(pf_check)}", flush=True)
            if not pf_check["ok"]:
                print("TRL padding-free loss differs from the padded loss: not a correct configuration here", file=sys.stderr)
                return 1
        def trl_runs(r):
            for mode in trl_modes:
                res = run_trl(mode, step_rows if TRL_MODES[mode]["same_steps"] else rows, student_path, tokenizer,
                              tcfg, a.steps, int(tcfg.cpus_per_worker), tcfg.seed + r)
                res.update(repeat=r, load=load())
                results.append(res)
                print(f"[repeat {r}] trl {mode}: {res['supervised_tokens_per_s']:.1f} sup tok/s, step {res['step_time_s']:.2f} s, "
                      f"load {res['load']}", flush=True)

        def our_runs(r):
            for s in schedules:
                res = run_ours(cfgs[s], run_dir, student_path)
                res.update(repeat=r, load=load())
                results.append(res)
                print(f"[repeat {r}] cwt-ray {s}: {res['supervised_tokens_per_s']:.1f} sup tok/s, step {res['step_time_s']:.2f} s, "
                      f"load {res['load']}", flush=True)

        for r in range(a.repeats):   # alternate which system goes first, against drift in the machine's load
            first, second = (our_runs, trl_runs) if r % 2 == 0 else (trl_runs, our_runs)
            first(r)
            second(r)
    load_end = load()

    def med(system, schedule, key):
        vals = [x[key] for x in results if x["system"] == system and x["schedule"] == schedule and x.get(key) is not None]
        return statistics.median(vals) if vals else None

    keys = ("supervised_tokens_per_s", "processed_tokens_per_s", "real_token_ratio", "step_time_s", "supervised_tokens_per_step")
    table = {f"trl/{m}": {k: med("trl", m, k) for k in (*keys, "supervised_tokens_per_s_end_to_end")} for m in trl_modes}
    table.update({f"cwt-ray/{s}": {k: med("cwt-ray", s, k) for k in keys} for s in schedules})
    best_trl = max(trl_modes, key=lambda m: table[f"trl/{m}"]["supervised_tokens_per_s"]) if trl_modes else None
    ref = table[f"trl/{best_trl}"]["supervised_tokens_per_s"] if best_trl else float("nan")
    ratios = {f"cwt-ray/{s}": table[f"cwt-ray/{s}"]["supervised_tokens_per_s"] / ref for s in schedules}
    print(f"\n{a.student}, {len(samples)} CWT samples, batch {tcfg.batch_size}, {a.steps} steps/run, {a.repeats} repeats, "
          f"medians; load average {load_start} -> {load_end}")
    print(f"{'system':<8} {'schedule':<13} {'sup tok/s':>9} {'proc tok/s':>10} {'real ratio':>10} {'step s':>7} "
          f"{'sup tok/step':>12} {'x best TRL':>10}")
    for name, v in table.items():
        system, schedule = name.split("/")
        print(f"{system:<8} {schedule:<13} {v['supervised_tokens_per_s']:>9.1f} {v['processed_tokens_per_s']:>10.1f} "
              f"{v['real_token_ratio']:>10.3f} {v['step_time_s']:>7.2f} {v['supervised_tokens_per_step']:>12.1f} "
              f"{v['supervised_tokens_per_s'] / ref:>10.2f}")
    bar = ratios.get("cwt-ray/shuffle") if best_trl else None
    if bar is not None:
        print(f"bar (issue 5): cwt-ray shuffle / TRL {best_trl} supervised tok/s = {bar:.2f}x (target >= 1.2x): "
              f"{'met' if bar >= 1.2 else 'not met'}")
    ours_cfg = {s: {"train": cfgs[s].train.model_dump(mode="json"), "student": cfgs[s].student.model_dump(mode="json"),
                    "chunk": cfgs[s].chunk.model_dump(mode="json"), "stages": cfgs[s].stages.model_dump(mode="json")}
                for s in schedules}
    trl_cfg = {m: next(x["config"] for x in results if x["system"] == "trl" and x["schedule"] == m) for m in trl_modes}
    import torch
    import transformers
    result = {"benchmark": "trl_sft", "command": " ".join(sys.argv), "student": a.student, "config": a.config,
              "overrides": a.overrides, "steps": a.steps, "repeats": a.repeats, "load_start": load_start,
              "load_end": load_end, "cpu_count": os.cpu_count(), "versions": {"trl": trl.__version__,
              "torch": torch.__version__, "transformers": transformers.__version__},
              "samples": check, "padding_free_check": pf_check, "medians": table, "best_trl": best_trl,
              "ratio_supervised_tokens_per_s_vs_best_trl": ratios, "bar_met": bar is not None and bar >= 1.2,
              "configurations": {"cwt-ray": ours_cfg, "trl": trl_cfg,
                                 "trl_dataset": "pre-tokenized input_ids + completion_mask (prompt = tokens before the "
                                                "first supervised label), completion_only_loss=True; model loaded "
                                                "by cwt_ray.student.load_model (fp32 weights, default SDPA attention)"},
              "runs": [{k: v for k, v in x.items() if k != "config"} for x in results]}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
