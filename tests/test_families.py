"""Any local Hugging Face causal LM folder is a student: tiny random Qwen2, Phi-3 and GPT-2
models (with SmolLM2's tokenizer) go through the same loss code, training step and generation."""
import pytest
import torch

from cwt_ray.config import StudentConfig, load_config
from cwt_ray.samples import SampleBuilder, build_samples
from cwt_ray.student import load_model, load_tokenizer, resolve_student
from cwt_ray.batches import collate
from cwt_ray.train import SupervisedLoss, forward_batch, normalised_loss, normaliser_counts
from conftest import ROOT, full_forward_scores

RECORDS = [{"id": "r1", "question": "Tom has 3 apples and buys 4. How many?",
            "rationale": "Tom starts with 3 apples.\nHe buys 4 more.\nSo 3 + 4 = 7.", "answer": "7"}]
CHUNKS = {"r1": ["Tom starts with 3 apples.\n", "He buys 4 more.\n", "So 3 + 4 = 7."]}


def _config(family: str, vocab: int, tok):
    from transformers import GPT2Config, Phi3Config, Qwen2Config

    common = dict(vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if family == "qwen2":
        return Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, **common)
    if family == "phi3":
        return Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, **common)
    return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=1024, **common)


@pytest.fixture(scope="module", params=["qwen2", "phi3", "gpt2"])
def family_student(request, tmp_path_factory, tiny_student):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(tiny_student)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(request.param, len(tok), tok))
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return request.param, folder


def test_family_trains_and_generates_through_our_code(family_student):
    from cwt_ray.decode import generate

    family, folder = family_student
    path = resolve_student(StudentConfig(name=str(folder)))   # a path is accepted as the student
    tok, model = load_tokenizer(path), load_model(path)
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"student.name={path}"])
    samples, _ = build_samples(SampleBuilder(tok, cfg), "cwt", RECORDS, CHUNKS)
    batch = collate(samples, tok.pad_token_id)
    # LM head on supervised positions only == the model's own full logits
    tok_loss, sample_idx, tok_groups = forward_batch(SupervisedLoss(model), batch)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    target = batch.labels[:, 1:]
    full = torch.nn.functional.cross_entropy(logits[target != -100], target[target != -100], reduction="none")
    assert torch.allclose(tok_loss, full, atol=1e-5), family
    loss = normalised_loss(tok_loss, sample_idx, tok_groups, len(samples), "token", normaliser_counts(samples))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    new, _ = generate(model.eval(), tok, [samples[0].input_ids[:10]], 4)
    assert 0 < len(new[0]) <= 4


def test_family_scores_sbc_candidates_like_a_full_forward(family_student):
    """SBC continues each candidate from the KV cache of the shared prefix: every family's cache
    must give the scores of a full forward."""
    from cwt_ray.chunk import Chunker
    from cwt_ray.chunking import split_steps

    _, folder = family_student
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"student.name={folder}", "chunk.heuristic=sbc",
                                                         "chunk.sbc_batch_size=2"])
    chunker = Chunker(cfg.model_dump(mode="json"), str(folder), None, str(folder))
    scorer = chunker.chunker.scorer
    scorer.student.float()
    steps = split_steps(RECORDS[0]["rationale"], "line")[1]
    candidates = [[1, 3], [2, 3], [1, 2, 3]]
    assert scorer(RECORDS[0], steps, candidates) == pytest.approx(
        full_forward_scores(scorer, RECORDS[0], steps, candidates), rel=1e-5, abs=1e-5)
