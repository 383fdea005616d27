"""End-to-end and invariant tests: tiny random-init Llama, real tokenizer, real Ray, real data."""
import json

import pyarrow.parquet as pq
import pytest

from cwt_ray.rundir import read_chunks
from cwt_ray.config import UserError
from cwt_ray.pipeline import RunState, run_stages

pytestmark = pytest.mark.slow


def _losses(run_dir, method, key="loss"):
    rows = (run_dir / "students" / method / "train_log.jsonl").read_text().splitlines()
    return [json.loads(r)[key] for r in rows]


def _read_events(folder) -> dict:
    """Scalars of the TensorBoard event files in a folder: {tag: [(step, value)]} (TFRecord
    framing: length, crc, Event proto, crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_end_to_end_std_cot_cwt_stt_then_rerun_skips_finished_stages(ray_cluster, smoke_cfg, capsys):
    """The whole pipeline through real Ray, all three methods in one run (each Ray Train fit costs
    ~25 s of start-up here): data -> chunk -> Std-CoT and CWT -> skip data (NLL gate, every middle
    chunk passes a 100-nat threshold) -> STT -> evaluation (skip-aware for STT) -> report. Then the
    same command skips every finished stage, and an inference-only knob redoes only eval/stt."""
    from transformers import AutoModelForCausalLM

    from cwt_ray.cli import main
    from cwt_ray.rundir import SKIP_STATUSES as STATUSES

    overrides = ["methods=[std_cot,cwt,stt]", "train.tensorboard=true", "stt.threshold=100",
                 "stt.require_correct=false", "eval.latency_questions=2"]
    cfg = smoke_cfg(*overrides)
    report = run_stages(cfg)
    run_dir = cfg.run_dir
    text = report.read_text()
    assert "| Std-CoT |" in text and "| CWT |" in text and (run_dir / "loss_curves.png").stat().st_size > 1000
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for method in ("std_cot", "cwt"):
        train, ev = metrics[method]["train"], metrics[method]["eval"]
        assert train["final_loss"] < train["first_loss"]
        assert ev["n"] == 8 and ev["max_new_tokens"] == 32
        records = pq.read_table(run_dir / "evals" / method / "records").to_pylist()
        assert len(records) == 8
        assert all(0 < r["tokens_generated"] <= 32 and r["batch_size"] > 0 for r in records)
        model = AutoModelForCausalLM.from_pretrained(run_dir / "students" / method)
        assert model.config.num_hidden_layers == 2
        assert json.loads((run_dir / "students" / method / "cwt_student.json").read_text())["method"] == method
        # TensorBoard events hold the same per-step losses as train_log.jsonl
        board = _read_events(run_dir / "tensorboard" / method)
        assert [v for _, v in board["train/loss"]] == pytest.approx(_losses(run_dir, method), rel=1e-6)
        assert {"train/lr", "train/processed_tokens_per_s", "train/real_token_ratio"} <= set(board)
    # lossless chunks, every training rationale chunked
    rationales = {r["id"]: r["rationale"] for r in pq.read_table(run_dir / "data" / "train.parquet").to_pylist()}
    chunks = read_chunks(run_dir / "chunks" / "train").to_pylist()
    assert len(chunks) == len(rationales)
    assert all("".join(c["chunks"]) == rationales[c["id"]] for c in chunks)
    assert (run_dir / "config.yaml").is_file()
    # STT: skip data, the student, skip-aware evaluation with batch-1 latency
    summary = json.loads((run_dir / "skips" / "train" / "summary.json").read_text())
    assert summary["rationales_in"] == summary["rationales_out"] == sum(summary[s] for s in STATUSES) == 32
    assert summary["skipped"] > 0 and summary["chunks_skipped"] == summary["skippable_chunks"]
    skips = pq.read_table(run_dir / "skips" / "train" / "skips.parquet").to_pylist()
    assert all(r["skip_sets"] == [[2]] for r in skips if r["num_chunks"] == 3)   # K=3: only chunk 2 is middle
    info = json.loads((run_dir / "students" / "stt" / "cwt_student.json").read_text())
    assert info["method"] == "stt" and info["skip_style"] == "marker"
    ev = json.loads((run_dir / "evals" / "stt" / "metrics.json").read_text())
    assert ev["n"] == 8 and ev["latency_n"] == 2 and ev["latency_batch_size"] == 1 and "skipped_per_answer" in ev
    assert len(pq.read_table(run_dir / "evals" / "stt" / "latency.parquet")) == 2
    assert "| STT |" in text and "## Skip data (STT)" in text and "batch-1 latency" in text
    assert "## Chunks (CWT)" in text and "(chunks/train/view.html)" in text and str(run_dir) not in text

    # The skip stage is a stage like the others: `cwt-ray skip CONFIG` redoes it alone.
    capsys.readouterr()
    assert main(["skip", str(run_dir / "config.yaml")]) == 0
    out = capsys.readouterr().out
    assert "[skip] 32 rationales (nll gate, cumulative)" in out and "[train" not in out and "[eval" not in out

    capsys.readouterr()
    run_stages(cfg)
    out = capsys.readouterr().out
    for stage in ("[data]", "[chunk]", "[train std_cot]", "[train cwt]", "[skip]", "[train stt]",
                  "[eval std_cot]", "[eval cwt]", "[eval stt]"):
        assert f"{stage} up to date, skipped" in out

    # An inference-only knob redoes that evaluation, not training, skip data or other evaluations.
    run_stages(smoke_cfg(*overrides, "stt.skip_confidence=0.5"))
    out = capsys.readouterr().out
    assert "[skip] up to date" in out and "[train stt] up to date" in out and "[train cwt] up to date" in out
    assert "[eval cwt] up to date" in out and "[eval stt] up to date" not in out

    assert main(["generate", str(run_dir / "students" / "stt"), "Tom has 3 apples. How many?",
                 "--max-new-tokens", "8", "--skip-confidence", "0.5"]) == 0
    assert "answer:" in capsys.readouterr().out


def test_eval_without_training_is_a_user_error(ray_cluster, smoke_cfg):
    with pytest.raises(UserError, match="train/std_cot .* is missing: run `cwt-ray train CONFIG` first"):
        run_stages(smoke_cfg("name=untrained"), stages=("eval",))


# CWT with K=1, markers off and the answer kept with the last chunk: Std-CoT's samples exactly.
ONE_CHUNK_NO_MARKERS = ("name=k1", "chunk.num_chunks=1", "stages.chunk_marker=", "stages.answer_marker=",
                        "stages.answer_stage=with_last_chunk", "train.max_steps=3")


def test_cwt_with_one_chunk_trains_exactly_like_std_cot(ray_cluster, smoke_cfg, run_shared):
    cfg = smoke_cfg(*ONE_CHUNK_NO_MARKERS)
    run_shared(cfg, stages=("data", "chunk", "train"))
    assert _losses(cfg.run_dir, "cwt") == pytest.approx(_losses(cfg.run_dir, "std_cot"), rel=1e-6)


def test_eval_of_chosen_methods_only(ray_cluster, smoke_cfg, run_shared):
    """What a sweep trial asks for: of a run that trained Std-CoT and CWT, evaluate CWT alone."""
    cfg = smoke_cfg(*ONE_CHUNK_NO_MARKERS)
    run_shared(cfg, stages=("data", "chunk", "train"))   # the trained students of the test above
    run_stages(cfg, stages=("eval",), eval_methods=["cwt"])
    assert (cfg.run_dir / "evals" / "cwt" / "metrics.json").is_file()
    assert not (cfg.run_dir / "evals" / "std_cot").exists()
    assert RunState(cfg.run_dir, cfg).is_done("eval/cwt") and not RunState(cfg.run_dir, cfg).is_done("eval/std_cot")


def test_ray_train_matches_a_plain_loop_over_hugging_faces_own_loss(ray_cluster, smoke_cfg, tiny_student, run_shared):
    """The independent check: a plain loop that shares none of our batching, loss or schedule code
    (Hugging Face's `labels=` loss: its own shift and mean; torch's AdamW and clipping; the
    schedule written out here) trains on the sample ids our trainer logged for each step, and
    gets the trainer's per-step losses (token normaliser, padded, fp32)."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from cwt_ray.student import load_tokenizer
    from cwt_ray.train import load_samples

    steps = 5
    cfg = smoke_cfg("name=hf-labels", "methods=[std_cot]", f"train.max_steps={steps}", "train.epochs=2",
                    "train.micro_batch_size=8",
                    "train.packing=false", "train.precision=fp32", "train.warmup_steps=2", "train.lr=1e-3")
    run_shared(cfg, stages=("data", "train"))
    log = [json.loads(r) for r in (cfg.run_dir / "students" / "std_cot" / "train_log.jsonl").read_text().splitlines()]
    tok = load_tokenizer(tiny_student)
    samples, _ = load_samples(cfg, "std_cot", cfg.run_dir, tok)   # sample building, not batching or loss
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    warmup = 2
    schedule = torch.optim.lr_scheduler.LambdaLR(   # warm-up, then linear decay to 0 at the last step
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 1 - (s - warmup) / (steps - warmup))
    plain = []
    for row in log:
        batch = [samples[i] for i in row["sample_ids"]]
        width = max(len(s.input_ids) for s in batch)
        ids = torch.tensor([s.input_ids + [tok.pad_token_id] * (width - len(s.input_ids)) for s in batch])
        labels = torch.tensor([s.labels + [-100] * (width - len(s.labels)) for s in batch])
        mask = torch.tensor([[1] * len(s.input_ids) + [0] * (width - len(s.input_ids)) for s in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        plain.append(loss.item())
    assert len(plain) == steps and all(math.isfinite(x) for x in plain)
    assert [r["loss"] for r in log] == pytest.approx(plain, rel=1e-5)
    assert [r["lr"] for r in log] == pytest.approx([1e-3 * f for f in (0.5, 1.0, 1.0, 2 / 3, 1 / 3)], rel=1e-6)
    # The held-out loss after the last step is Hugging Face's loss of the final student on the
    # validation split's Std-CoT samples (one padded batch: its mean is the token normaliser).
    val, _ = load_samples(cfg, "std_cot", cfg.run_dir, tok, split="validation")
    final = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "students" / "std_cot", dtype=torch.float32).eval()
    width = max(len(s.input_ids) for s in val)
    with torch.no_grad():
        held_out = final(input_ids=torch.tensor([s.input_ids + [tok.pad_token_id] * (width - len(s.input_ids)) for s in val]),
                         attention_mask=torch.tensor([[1] * len(s.input_ids) + [0] * (width - len(s.input_ids)) for s in val]),
                         labels=torch.tensor([s.labels + [-100] * (width - len(s.labels)) for s in val])).loss.item()
    assert log[-1]["val_loss"] == pytest.approx(held_out, rel=1e-5)
    assert log[-1]["step"] == steps   # (five steps: the default eval_every measures it after each)


def _rows_per_forward(cfg, method, step_ids, pack_tokens) -> list[int]:
    """Packed rows of each forward pass of each worker, replaying the logged steps."""
    from cwt_ray.batches import micro_batches, pack_rows, worker_share
    from cwt_ray.student import load_tokenizer, resolve_student
    from cwt_ray.train import load_samples

    samples, _ = load_samples(cfg, method, cfg.run_dir, load_tokenizer(resolve_student(cfg.student)))
    t = cfg.train
    return [len(pack_rows([len(samples[i].input_ids) for i in mb], pack_tokens))
            for step in step_ids for rank in range(t.num_workers)
            for mb in micro_batches(worker_share(step, rank, t.num_workers), samples, t.micro_batch_size)]


@pytest.mark.parametrize("method, normalizer, layouts", [
    ("std_cot", "token", {"8x1x1": (8, 1, None), "4x2x1": (4, 1, None), "4x1x2": (4, 2, None),
                          "8x1x1 padded": (8, 1, False), "4x1x2 packed small": (4, 2, 448)}),
    ("std_cot", "sample", {"8x1x1": (8, 1, None), "4x1x2 packed small": (4, 2, 448)}),
    ("cwt", "chunk", {"8x1x1": (8, 1, None), "4x2x1": (4, 1, None), "4x1x2 packed small": (4, 2, 448),
                      "8x1x1 padded": (8, 1, False)}),
])
def test_loss_invariant_to_micro_batch_accumulation_workers_and_packing(ray_cluster, smoke_cfg, run_shared, method,
                                                                       normalizer, layouts):
    """batch 8 x accumulation 1 x 1 worker == 4 x 2 x 1 == 4 x 1 x 2, packed (default rows, or rows
    small enough that every worker packs >= 2 rows per forward pass) or padded: the normaliser is
    per optimizer step, and every layout trains on the same samples in each step. The cwt case uses
    the single-pass schedule, whose samples hold several chunks each."""
    curves, ids = {}, {}
    for label, (micro, workers, pack) in layouts.items():
        layout = ["train.packing=false"] if pack is False else ([f"train.pack_tokens={pack}"] if pack else [])
        cfg = smoke_cfg(f"name=inv-{normalizer}-{label.replace(' ', '-')}", f"methods=[{method}]", "train.max_steps=3",
                        "train.batch_size=8", f"train.micro_batch_size={micro}", f"train.num_workers={workers}",
                        f"train.loss_normalizer={normalizer}", *layout,
                        *(["train.cwt_schedule=single_pass"] if method == "cwt" else []))
        run_shared(cfg, stages=("data", "chunk", "train"))
        curves[label] = _losses(cfg.run_dir, method)
        ids[label] = _losses(cfg.run_dir, method, "sample_ids")
        if pack:   # small rows: every worker's forward passes pack into >= 2 rows
            assert min(_rows_per_forward(cfg, method, ids[label], pack)) >= 2
    reference = curves.pop("8x1x1")
    assert len(reference) == 3
    for label, curve in curves.items():
        assert curve == pytest.approx(reference, rel=1e-5), label
        assert ids[label] == ids["8x1x1"], label


# The uninterrupted reference of the two kill tests below (trained once, by whichever runs first):
# 32 samples / 8 = 4 steps an epoch, 12 steps on 2 workers; checkpoints every 3 steps and at epoch ends.
KILL_COMMON = ["methods=[std_cot]", "train.max_steps=null", "train.epochs=3", "train.num_workers=2",
               "train.micro_batch_size=4", "train.checkpoint_every=3", "train.keep_checkpoints=3"]


def test_killed_worker_resumes_from_checkpoint_with_the_same_losses(ray_cluster, smoke_cfg, run_shared):
    """SIGKILL rank 0 of 2 workers mid-run: Ray Train restarts the group from the last step
    checkpoint (model, optimizer, scheduler, RNG; the data position is the step), and the run ends
    with the same steps and the same loss curve as an uninterrupted one; no checkpoint is lost."""
    # Ray Train registers a reported checkpoint when it next polls the workers, so the kill comes
    # a few steps after one (step 9 is checkpointed; rank 0 dies before step 12).
    clean = smoke_cfg("name=clean", *KILL_COMMON)
    run_shared(clean, stages=("data", "train"))
    killed = smoke_cfg("name=killed", *KILL_COMMON, "debug.kill_at_step=12")
    run_stages(killed, stages=("data", "train"))
    reference = _losses(clean.run_dir, "std_cot")
    assert len(reference) == 12
    assert _losses(killed.run_dir, "std_cot") == pytest.approx(reference, rel=1e-5)
    # Ray Train tracks the last 3 checkpoints (steps 8, 9 and the final 12), each on disk and a
    # loadable student. (A checkpoint reported less than one controller poll before the kill is
    # not registered: the retry resumed from step 8 and wrote step 9 again.)
    storage = killed.run_dir / "ray" / "train-std_cot"
    snapshot = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
    tracked = [r for r in snapshot["checkpoint_results"]]
    assert [r["metrics"]["step"] for r in tracked] == [8, 9, 12]
    for r in tracked:
        folder = storage / r["checkpoint_dir_name"]
        assert len((folder / "train_log.jsonl").read_text().splitlines()) == r["metrics"]["step"]
        assert (folder / "config.json").is_file() and (folder / "cwt_student.json").is_file()
    log = [json.loads(r) for r in (killed.run_dir / "students" / "std_cot" / "train_log.jsonl").read_text().splitlines()]
    assert set(log[-1]["loss_by_kind"]) == {"rationale"} and log[-1]["peak_memory_gb"] > 0


def _check_chunk_stage(cfg, out, heuristic):
    """What every chunk stage writes: summary counts that add up, lossless chunks, rejects, view."""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heuristic"] == heuristic
    assert summary["rows_in"] == summary["chunked"] + summary["rejected"] == 32
    rationales = {r["id"]: r["rationale"] for r in pq.read_table(cfg.run_dir / "data" / "train.parquet").to_pylist()}
    chunks = read_chunks(out).to_pylist()
    assert all("".join(c["chunks"]) == rationales[c["id"]] for c in chunks)
    assert pq.read_table(out / "rejects.parquet").num_rows == summary["rejected"]
    page = (out / "view.html").read_text()
    assert page.startswith("<!doctype html>") and "http" not in page and chunks[0]["id"] in page
    assert not out.with_name(out.name + ".done").exists()   # finished batches kept only until the stage completes
    if heuristic == "sbc":
        assert summary["sbc"]["mean_loss_after"] <= summary["sbc"]["mean_loss_before"]
        assert summary["sbc"]["candidates_scored"] > summary["sbc"]["searched"]
    else:
        assert all(len(c["boundary_scores"]) == c["num_chunks"] - 1 for c in chunks)


def test_chunk_stage_on_ray_data_writes_chunks_summary_view_and_rejects(ray_cluster, smoke_cfg):
    """Semantic chunking here; search-based chunking's stage is checked by the SBC re-run test."""
    cfg = smoke_cfg("name=chunk-semantic", "chunk.heuristic=semantic", "chunk.batch_size=8")
    run_stages(cfg, stages=("data", "chunk"))
    _check_chunk_stage(cfg, cfg.run_dir / "chunks" / "train", "semantic")


def test_lora_trains_adapters_saves_a_plain_student_and_resumes(ray_cluster, smoke_cfg, tiny_student):
    """train.lora: only adapter weights change; the saved student is a plain (merged) folder that
    evaluation loads; a SIGKILLed worker resumes from base weights + saved adapters, same curve."""
    from transformers import AutoModelForCausalLM

    common = ["methods=[std_cot]", "train.max_steps=null", "train.epochs=2", "train.lora.r=4",
              "train.lr=1e-2", "train.checkpoint_every=2"]
    clean = smoke_cfg("name=lora", *common)
    run_stages(clean, stages=("data", "train"))
    killed = smoke_cfg("name=lora-killed", *common, "debug.kill_at_step=7")
    run_stages(killed, stages=("data", "train"))
    reference = _losses(clean.run_dir, "std_cot")
    assert len(reference) == 8 and reference[-1] < reference[0]
    assert _losses(killed.run_dir, "std_cot") == pytest.approx(reference, rel=1e-5)
    student = AutoModelForCausalLM.from_pretrained(clean.run_dir / "students" / "std_cot")
    base = AutoModelForCausalLM.from_pretrained(tiny_student)
    assert not any("lora" in name for name, _ in student.named_parameters())
    changed = {n for (n, p), (_, q) in zip(student.named_parameters(), base.named_parameters()) if not p.equal(q)}
    assert changed and all("proj" in n for n in changed)   # adapted linears merged; embeddings untouched


def test_sbc_reruns_during_training_with_the_current_student(ray_cluster, smoke_cfg):
    """chunk.sbc_every_epochs=1: after epoch 1 the 2 workers re-run the search with the student being
    trained and continue on the new chunks, which are written like the chunk stage's."""
    cfg = smoke_cfg("name=sbc-rerun", "methods=[cwt]", "chunk.heuristic=sbc", "chunk.sbc_every_epochs=1",
                    "chunk.sbc_max_passes=1", "train.max_steps=null", "train.epochs=2", "train.num_workers=2",
                    "train.micro_batch_size=4", "train.batch_size=16")
    run_stages(cfg, stages=("data", "chunk", "train"))
    _check_chunk_stage(cfg, cfg.run_dir / "chunks" / "train", "sbc")   # the chunk stage's search
    out = cfg.run_dir / "chunks" / "train-epoch1"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_in"] == summary["chunked"] + summary["rejected"] == 32
    assert summary["sbc"]["mean_loss_after"] <= summary["sbc"]["mean_loss_before"]
    rationales = {r["id"]: r["rationale"] for r in pq.read_table(cfg.run_dir / "data" / "train.parquet").to_pylist()}
    assert all("".join(c["chunks"]) == rationales[c["id"]] for c in read_chunks(out).to_pylist())
    metrics = json.loads((cfg.run_dir / "students" / "cwt" / "train_metrics.json").read_text())
    samples_per_epoch = metrics["samples"]
    assert metrics["steps"] == 2 * (samples_per_epoch // 16)


def test_fsdp_on_two_workers_trains_like_one_ddp_worker_and_saves_a_full_student(ray_cluster, smoke_cfg, tiny_student,
                                                                                  run_shared):
    """train.strategy=fsdp (FSDP2 over gloo on CPU): the same loss curve as one unsharded worker,
    a resumable checkpoint, and a final student folder with every weight."""
    from transformers import AutoModelForCausalLM

    # A checkpoint every step: Ray Train registers one only at its next poll, and the kill before
    # step 4 must find one (a restart without a checkpoint would be killed again).
    ddp = smoke_cfg("name=ddp1", "methods=[cwt]", "train.max_steps=4", "train.micro_batch_size=4")
    run_shared(ddp, stages=("data", "chunk", "train"))
    # Packed into small rows: each rank packs its share into several rows, and both ranks still run
    # the same number of forward passes (one per micro-batch), so FSDP's gathers line up.
    fsdp = smoke_cfg("name=fsdp2", "methods=[cwt]", "train.max_steps=4", "train.checkpoint_every=1",
                     "train.micro_batch_size=4", "train.num_workers=2", "train.strategy=fsdp", "debug.kill_at_step=4",
                     "train.pack_tokens=448")
    run_shared(fsdp, stages=("data", "chunk", "train"))
    assert _losses(fsdp.run_dir, "cwt") == pytest.approx(_losses(ddp.run_dir, "cwt"), rel=1e-4)
    assert min(_rows_per_forward(fsdp, "cwt", _losses(fsdp.run_dir, "cwt", "sample_ids"), 448)) >= 2
    # the gradient norm over sharded gradients is the global one (reduced over ranks), not a shard's
    assert _losses(fsdp.run_dir, "cwt", "grad_norm") == pytest.approx(_losses(ddp.run_dir, "cwt", "grad_norm"), rel=1e-4)
    saved = AutoModelForCausalLM.from_pretrained(fsdp.run_dir / "students" / "cwt").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_student).state_dict()
    assert saved.keys() == base.keys() and all(saved[k].shape == base[k].shape for k in base)


def test_rerunning_a_killed_command_resumes_from_its_checkpoint(ray_cluster, smoke_cfg, run_shared, tmp_path):
    """SIGKILL the whole `cwt-ray train` process group (driver, embedded Ray, workers) after a
    step checkpoint; the same command again resumes from it, and the loss curve is the
    uninterrupted one."""
    import os
    import signal
    import subprocess
    import sys
    import time

    common = KILL_COMMON
    clean = smoke_cfg("name=clean-rerun", *common)
    run_shared(clean, stages=("data", "train"))
    cmd = [sys.executable, "-m", "cwt_ray.cli", "train", "configs/smoke.yaml", f"storage_path={tmp_path}",
           "name=rerun", *common]
    run_stages(smoke_cfg("name=rerun", *common), stages=("data",))
    storage = tmp_path / "rerun" / "ray" / "train-std_cot"
    from conftest import ROOT
    proc = subprocess.Popen([*cmd, "debug.sleep_per_step=1.0"], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not any(
                (c / "train_log.jsonl").is_file() and len((c / "train_log.jsonl").read_text().splitlines()) >= 4
                for c in storage.glob("checkpoint_*") if c.is_dir()):
            time.sleep(0.5)
        time.sleep(3)   # let Ray Train register the checkpoint
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "rerun" / "students" / "std_cot").exists()   # it really died mid-run
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from checkpoint at step" in again.stdout + again.stderr
    assert _losses(tmp_path / "rerun", "std_cot") == pytest.approx(_losses(clean.run_dir, "std_cot"), rel=1e-5)
