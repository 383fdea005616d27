"""Padding-free packing, in-process on tiny random models of four families (no Ray).

Packed rows must train exactly like padded ones: the same loss and gradients for every sample
format (Std-CoT, CWT chunk samples, single-pass CWT, STT skip samples) and every normaliser, and
no sample may see another through attention, also for a student loaded the way evaluation loads
it (use_cache on). transformers builds the block-diagonal mask from the restarting position ids.
"""
import pytest
import torch

from cwt_ray.batches import collate, epoch_steps, micro_batches, pack_rows
from cwt_ray.config import load_config
from cwt_ray.samples import SampleBuilder, build_samples
from cwt_ray.student import load_model, load_tokenizer
from cwt_ray.train import SupervisedLoss, forward_batch, normalised_loss, normaliser_counts
from conftest import ROOT

RECORDS = [
    {"id": "r1", "question": "Tom has 3 apples and buys 4. How many?",
     "rationale": "Tom starts with 3 apples.\nHe buys 4 more.\nSo 3 + 4 = 7.", "answer": "7"},
    {"id": "r2", "question": "A box holds 5 pens. How many pens in 2 boxes?",
     "rationale": "One box holds 5 pens.\nTwo boxes hold 2 * 5 = 10 pens.", "answer": "10"},
    {"id": "r3", "question": "Sam reads 6 pages a day for 3 days, then 2 more. How many pages?",
     "rationale": "In 3 days he reads 3 * 6 = 18 pages.\nThen 2 more.\nSo 18 + 2 = 20 pages.", "answer": "20"},
]
CHUNKS = {"r1": ["Tom starts with 3 apples.\n", "He buys 4 more.\n", "So 3 + 4 = 7."],
          "r2": ["One box holds 5 pens.\n", "Two boxes hold 2 * 5 = 10 pens."],
          "r3": ["In 3 days he reads 3 * 6 = 18 pages.\n", "Then 2 more.\n", "So 18 + 2 = 20 pages."]}
SKIPS = {"r1": [[2]], "r3": [[2]]}


def _pack(samples) -> int:
    """Rows 1.6x the longest sample: several rows per forward pass and several samples per row."""
    return int(1.6 * max(len(s.input_ids) for s in samples))


def _config(family: str, tok):
    from transformers import GPT2Config, LlamaConfig, Phi3Config, Qwen2Config

    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if family == "llama":
        return LlamaConfig(**small, **common)
    if family == "qwen2":
        return Qwen2Config(**small, **common)
    if family == "phi3":
        return Phi3Config(**small, **common)
    # No dropout (GPT-2's default is 0.1): two forward passes of a training-mode model must agree.
    return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, **common)


@pytest.fixture(scope="module", params=["llama", "qwen2", "phi3", "gpt2"])
def family(request, tmp_path_factory, tiny_student):
    """A tiny random student of each family, saved and loaded back as training loads it."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(tiny_student)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    AutoModelForCausalLM.from_config(_config(request.param, tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return request.param, folder, tok


def _sample_sets(tok):
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    b = SampleBuilder(tok, cfg)
    return {
        "std_cot": build_samples(b, "std_cot", RECORDS, {})[0],
        "cwt": build_samples(b, "cwt", RECORDS, CHUNKS, "shuffle")[0],
        "cwt_single_pass": build_samples(b, "cwt", RECORDS, CHUNKS, "single_pass")[0],
        "stt": build_samples(b, "stt", RECORDS, CHUNKS, "shuffle", skips_by_id=SKIPS, chunk_mix=0.5)[0],
    }


def _loss_and_grads(model, samples, pad_id, normalizer, pack_tokens):
    model.zero_grad(set_to_none=True)
    batch = collate(samples, pad_id, pack_tokens)
    tok_loss, sample_idx, groups = forward_batch(SupervisedLoss(model), batch)
    loss = normalised_loss(tok_loss, sample_idx, groups, batch.num_samples, normalizer, normaliser_counts(samples))
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()], batch


@pytest.mark.parametrize("normalizer", ["token", "sample", "chunk"])
def test_packed_rows_train_exactly_like_padded_rows(family, normalizer):
    name, folder, tok = family
    model = load_model(folder).train()
    model.config.use_cache = False
    for kind, samples in _sample_sets(tok).items():
        if normalizer == "chunk" and kind == "std_cot":
            continue
        loss_a, grads_a, padded = _loss_and_grads(model, samples, tok.pad_token_id, normalizer, None)
        loss_b, grads_b, packed = _loss_and_grads(model, samples, tok.pad_token_id, normalizer, _pack(samples))
        assert 1 < packed.input_ids.shape[0] < padded.input_ids.shape[0], (name, kind)   # rows really hold several samples
        assert packed.computed_tokens < padded.computed_tokens and packed.real_tokens == padded.real_tokens
        assert loss_b == pytest.approx(loss_a, rel=1e-5), (name, kind)
        for ga, gb in zip(grads_a, grads_b):
            torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6, msg=f"{name} {kind} {normalizer}")


@pytest.mark.parametrize("use_cache", [False, True], ids=["as_training_loads_it", "as_evaluation_loads_it"])
def test_no_sample_attends_to_another_in_a_packed_row(family, use_cache):
    """Change one sample of a packed row: the other samples' token losses do not move."""
    from cwt_ray.train import packing_isolates_samples

    name, folder, tok = family
    model = load_model(folder).eval()
    model.config.use_cache = use_cache   # evaluation's students keep the default, use_cache on
    assert packing_isolates_samples(model, remote_code=False) and not packing_isolates_samples(model, remote_code=True)
    samples = _sample_sets(tok)["cwt"][:4]
    batch = collate(samples, tok.pad_token_id, pack_tokens=10_000)   # one row holds all four
    assert batch.input_ids.shape[0] == 1
    changed = [s for s in samples]
    victim = changed[1]
    ids = list(victim.input_ids)
    ids[len(ids) // 2] = (ids[len(ids) // 2] + 7) % len(tok)   # same length, other token
    changed[1] = type(victim)(victim.rationale_id, victim.stage, ids, victim.labels, victim.groups, victim.group_kinds)
    with torch.no_grad():
        nll_a, idx_a, _ = forward_batch(SupervisedLoss(model), batch)
        nll_b, idx_b, _ = forward_batch(SupervisedLoss(model), collate(changed, tok.pad_token_id, pack_tokens=10_000))
    others = idx_a != 1
    assert torch.equal(idx_a, idx_b)
    torch.testing.assert_close(nll_b[others], nll_a[others], rtol=1e-5, atol=1e-6, msg=name)
    # ...and packing gave each sample the losses it has alone, so nothing leaked either way.
    for j, s in enumerate(samples):
        with torch.no_grad():
            alone = forward_batch(SupervisedLoss(model), collate([s], tok.pad_token_id))[0]
        torch.testing.assert_close(nll_a[idx_a == j], alone, rtol=1e-5, atol=1e-5, msg=name)


def test_pack_rows_fill_few_balanced_rows():
    lengths = [120, 80, 200, 50, 60, 90, 30, 110]
    rows = pack_rows(lengths, 256)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    sums = [sum(lengths[i] for i in r) for r in rows]
    # 740 tokens need >= 3 rows; longest-first balancing fits them in 4 of 170-200 tokens, so the
    # padded width (200) stays near the mean (185) where a greedy first fit would leave a long row.
    assert max(sums) <= 256 and len(rows) == 4 and max(sums) - min(sums) <= 30
    assert pack_rows([300, 20], 256) == [[0], [1]]   # a sample longer than a row gets one of its own


def test_steps_are_random_draws_the_same_packed_or_not(tokenizer):
    """The step plan does not depend on packing (it only lays out a forward pass), a forward
    pass holds the same samples either way, and the seed changes the draw."""
    samples = _sample_sets(tokenizer)["cwt"] * 4
    steps = epoch_steps(samples, 8, seed=0, epoch=0, schedule="shuffle")
    assert steps != epoch_steps(samples, 8, seed=1, epoch=0, schedule="shuffle")
    drawn = [i for s in steps for i in s]
    assert len(drawn) == len(set(drawn)) == len(steps) * 8 and set(drawn) <= set(range(len(samples)))
    for step in steps:
        for mb in micro_batches(step, samples, 4):
            padded = collate([samples[i] for i in mb], tokenizer.pad_token_id)
            packed = collate([samples[i] for i in mb], tokenizer.pad_token_id, _pack(samples))
            for j in range(len(mb)):
                assert torch.equal(padded.input_ids[padded.sample == j], packed.input_ids[packed.sample == j])
