"""The loss maths of train.py on the tiny model, in-process (no Ray): schedules, normalisers, batches."""
import os
import random

import pytest
import torch

from cwt_ray.config import load_config
from cwt_ray.samples import SampleBuilder, build_samples
from cwt_ray.student import load_model
from cwt_ray.batches import collate, epoch_steps
from cwt_ray.train import SupervisedLoss, forward_batch, normalised_loss, normaliser_counts
from conftest import ROOT

RECORDS = [
    {"id": "r1", "question": "Tom has 3 apples and buys 4. How many?",
     "rationale": "Tom starts with 3 apples.\nHe buys 4 more.\nSo 3 + 4 = 7.", "answer": "7"},
    {"id": "r2", "question": "A box holds 5 pens. How many pens in 2 boxes?",
     "rationale": "One box holds 5 pens.\nTwo boxes hold 2 * 5 = 10 pens.", "answer": "10"},
]
CHUNKS = {"r1": ["Tom starts with 3 apples.\n", "He buys 4 more.\n", "So 3 + 4 = 7."],
          "r2": ["One box holds 5 pens.\n", "Two boxes hold 2 * 5 = 10 pens."]}


def _grads(model, samples, normalizer, pad_id, loss_module=None):
    model.zero_grad(set_to_none=True)
    batch = collate(samples, pad_id)
    tok_loss, sample_idx, tok_groups = forward_batch(SupervisedLoss(model) if loss_module is None else loss_module, batch)
    loss = normalised_loss(tok_loss, sample_idx, tok_groups, len(samples), normalizer, normaliser_counts(samples))
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("answer_stage", ["separate", "with_last_chunk"])
def test_single_pass_equals_its_chunk_samples_in_one_step(tiny_student, tokenizer, answer_stage):
    """Causal attention: one forward over a whole rationale with a per-chunk normalised loss gives the
    loss and gradients of all its chunk samples in the same step (per-sample normalised)."""
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"stages.answer_stage={answer_stage}"])
    b = SampleBuilder(tokenizer, cfg)
    torch.manual_seed(0)
    model = load_model(tiny_student)
    separate, _ = build_samples(b, "cwt", RECORDS, CHUNKS, "shuffle")
    single, _ = build_samples(b, "cwt", RECORDS, CHUNKS, "single_pass")
    assert len(single) == 2 and sum(s.num_groups for s in single) == len(separate)
    loss_a, grads_a = _grads(model, separate, "sample", tokenizer.pad_token_id)
    loss_b, grads_b = _grads(model, single, "chunk", tokenizer.pad_token_id)
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-7)
    processed = lambda ss: sum(len(s.input_ids) for s in ss)  # noqa: E731
    assert processed(single) < 0.6 * processed(separate)   # prefixes are read once, not once per chunk


def test_chunk_normaliser_weights_chunks_not_tokens(tiny_student, tokenizer):
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    b = SampleBuilder(tokenizer, cfg)
    model = load_model(tiny_student)
    single, _ = build_samples(b, "cwt", RECORDS, CHUNKS, "single_pass")
    token, _ = _grads(model, single, "token", tokenizer.pad_token_id)
    chunk, _ = _grads(model, single, "chunk", tokenizer.pad_token_id)
    sample, _ = _grads(model, single, "sample", tokenizer.pad_token_id)
    assert len({round(token, 6), round(chunk, 6), round(sample, 6)}) == 3


def _fake_samples(n, rationales):
    from cwt_ray.samples import Sample
    rng = random.Random(1)
    return [Sample(f"r{i % rationales}", i, [1] * rng.randint(5, 200), [1] * 3) for i in range(n)]


def test_bucketing_keeps_the_samples_and_cuts_padding():
    samples = _fake_samples(400, 100)
    plain = epoch_steps(samples, 8, seed=0, epoch=0, schedule="shuffle", bucket_factor=0)
    bucketed = epoch_steps(samples, 8, seed=0, epoch=0, schedule="shuffle", bucket_factor=16)
    assert sorted(i for s in plain for i in s) == sorted(i for s in bucketed for i in s) == list(range(400))

    def real_ratio(steps):
        real = sum(len(samples[i].input_ids) for s in steps for i in s)
        return real / sum(len(s) * max(len(samples[i].input_ids) for i in s) for s in steps)
    assert real_ratio(bucketed) > 0.9 > real_ratio(plain)
    assert epoch_steps(samples, 8, 0, 1, "shuffle", 16) != bucketed   # a new order each epoch


def test_per_rationale_steps_hold_one_chunk_per_rationale():
    samples = _fake_samples(400, 100)   # 100 rationales x 4 stages
    steps = epoch_steps(samples, 8, seed=0, epoch=0, schedule="per_rationale", bucket_factor=0)
    assert len(steps) == 50
    assert all(len({samples[i].rationale_id for i in s}) == 8 for s in steps)
    steps = epoch_steps(samples, 8, seed=0, epoch=0, schedule="per_rationale", bucket_factor=4)
    assert sum(len({samples[i].rationale_id for i in s}) == 8 for s in steps) >= 48


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_student, tokenizer):
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    samples, _ = build_samples(SampleBuilder(tokenizer, cfg), "cwt", RECORDS, CHUNKS, "shuffle")
    model = load_model(tiny_student).train()
    loss_a, grads_a = _grads(model, samples, "token", tokenizer.pad_token_id)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    loss_b, grads_b = _grads(model, samples, "token", tokenizer.pad_token_id)
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-7)


def test_loss_by_kind_labels_chunk_answer_and_skip_targets(tokenizer):
    from cwt_ray.samples import KIND_ANSWER, KIND_CHUNK, KIND_SKIP
    b = SampleBuilder(tokenizer, load_config(ROOT / "configs" / "smoke.yaml"))
    texts, stages = b.skip_chunks(CHUNKS["r1"], [2])
    samples = b.cwt(RECORDS[0], texts, stages) + [b.single_pass(RECORDS[0], texts, stages)]
    kinds = collate(samples, tokenizer.pad_token_id).kinds
    per_sample = [set(k.tolist()) - {0} for k in kinds[:4]]
    assert per_sample == [{KIND_CHUNK}, {KIND_SKIP}, {KIND_CHUNK}, {KIND_ANSWER}]
    assert set(kinds[4].tolist()) == {0, KIND_CHUNK, KIND_SKIP, KIND_ANSWER}


def test_auto_precision_is_bf16_only_where_the_cpu_computes_it_natively():
    """On a CPU without AVX512-BF16/AMX, bf16 autocast matmuls are ~44x slower than fp32
    (benchmarks/cpu_precision.py): `auto` must not pick them there; an explicit choice is kept."""
    from cwt_ray.train import native_bf16, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if native_bf16(cpu) else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu, warn=False) == "bf16"
    assert load_config(ROOT / "configs" / "quickstart.yaml").train.precision == "auto"


@pytest.mark.slow
def test_compiled_loss_module_gives_eager_loss_and_gradients(tiny_student, tokenizer):
    """`train.compile`: the worker compiles `SupervisedLoss`. The compiled module must train the
    same maths: loss and every gradient equal to eager's. Its supervised-position indexing has a
    data-dependent shape, so this also proves the graph break there is handled. The suite uses
    the `aot_eager` backend (Dynamo's capture and AOTAutograd's backward graphs, i.e. what our
    module's code decides); `CWT_COMPILE_BACKEND=inductor` runs the training default, whose C++
    kernel builds take ~55 s cold on 2 cores (passed by hand on 2026-12-04)."""
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    b = SampleBuilder(tokenizer, cfg)
    torch.manual_seed(0)
    model = load_model(tiny_student)
    samples, _ = build_samples(b, "cwt", RECORDS, CHUNKS, "shuffle")
    torch._dynamo.reset()
    backend = os.environ.get("CWT_COMPILE_BACKEND", "aot_eager")
    if backend == "inductor":
        torch._inductor.config.compile_threads = 1   # no pool of compile workers to start on 2 cores
    loss_e, grads_e = _grads(model, samples, "token", tokenizer.pad_token_id)
    compiled = torch.compile(SupervisedLoss(model), backend=backend)
    for _ in range(2):   # the second call runs the cached graphs
        loss_c, grads_c = _grads(model, samples, "token", tokenizer.pad_token_id, compiled)
        assert loss_c == pytest.approx(loss_e, rel=1e-5)
        for ge, gc in zip(grads_e, grads_c):
            torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1   # it did compile


def test_no_validation_split_means_no_held_out_loss(tmp_path, tokenizer):
    from cwt_ray.train import load_validation_samples

    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"storage_path={tmp_path}"])
    (cfg.run_dir / "data").mkdir(parents=True)
    assert load_validation_samples(cfg, "std_cot", cfg.run_dir, tokenizer) is None
    assert load_validation_samples(cfg, "cwt", cfg.run_dir, tokenizer) is None


def test_warm_up_ratio_and_linear_decay():
    """The default schedule: warm-up over ceil(5 %) of the steps, then linear decay to 0 at the end;
    train.warmup_steps wins when set."""
    from cwt_ray.config import TrainConfig
    from cwt_ray.train import lr_lambda, warmup_steps

    t = TrainConfig()
    assert (t.lr_schedule, t.warmup_ratio, t.warmup_steps, t.bucket_factor, t.packing) == ("linear", 0.05, None, 0, True)
    assert warmup_steps(t, 188) == 10 and warmup_steps(TrainConfig(warmup_steps=3), 188) == 3
    f = lr_lambda(t, 188)
    assert [f(s) for s in (0, 9)] == [pytest.approx(0.1), pytest.approx(1.0)]
    assert f(10) == pytest.approx(1.0) and f(187) == pytest.approx(1 / 178) and f(188) == 0.0
