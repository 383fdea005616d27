"""Skip-thinking building blocks: the gate logic against a scripted scorer whose right answers are
known, skip sequences as training samples, the skip decision at decoding time, output parsing."""
import pytest
import torch

from cwt_ray.config import SkipConfig, load_config
from cwt_ray.decode import SkipDecision, parse_output
from cwt_ray.samples import IGNORE, SampleBuilder, build_samples
from cwt_ray.skip import Score, select_skips
from conftest import ROOT

# A 6-chunk rationale as facts: the answer needs a, b, c and d. Chunk 2 repeats chunk 1's fact
# (provably redundant), chunks 3 and 4 carry the same fact (each redundant only while the other
# stays), chunk 5 is the only source of c (needed). Chunk 6 is last, never a middle chunk.
FACTS = {1: {"a"}, 2: {"a"}, 3: {"b"}, 4: {"b"}, 5: {"c"}, 6: {"d"}}


def scripted(facts=FACTS, soft=None, base_wrong=False, calls=None):
    """Missing fact: +1.0 nats and a wrong answer. `soft`: chunk -> (nll rise, still correct)."""
    soft = soft or {}

    def score(sets):
        out = []
        for skipped in sets:
            if calls is not None:
                calls.append(tuple(skipped))
            present = set().union(*(f for i, f in facts.items() if i not in skipped))
            missing = set().union(*facts.values()) - present
            nll, correct = 0.5 + len(missing), not missing and not base_wrong
            for i in skipped:
                if i in soft:
                    nll += soft[i][0]
                    correct = correct and soft[i][1]
            out.append(Score(nll, correct))
        return out
    return score


@pytest.mark.parametrize("gate", ["correct", "nll"])
def test_one_at_a_time_and_cumulative_differ_where_they_should(gate):
    one = select_skips(6, scripted(), SkipConfig(gate=gate, removal="one_at_a_time"))
    # each of 2, 3, 4 is redundant on its own; 5 is needed
    assert one["status"] == "skipped" and one["skip_sets"] == [[2], [3], [4]]
    cum = select_skips(6, scripted(), SkipConfig(gate=gate, removal="cumulative"))
    # greedy removal: 2 first (ties go to the earlier stage), then one of the 3/4 pair, never both
    assert cum["skip_sets"] == [[2, 3]]
    assert all(not t["passes"] for t in cum["trials"] if 5 in t["skipped"])
    assert cum["candidates_scored"] == 1 + 4 + 3 + 2   # baseline, then each greedy round


def test_needed_chunk_is_kept_and_redundant_one_skipped():
    facts = {1: {"a"}, 2: {"a"}, 3: {"b"}, 4: {"c"}}
    out = select_skips(4, scripted(facts), SkipConfig(gate="correct", removal="cumulative"))
    assert out["skip_sets"] == [[2]]


def test_gates_differ_on_a_small_nll_rise_that_breaks_the_answer():
    # Removing chunk 2 costs only 0.05 nats but flips the answer: the NLL gate (threshold 0.1)
    # allows it, the correctness gate does not; a 0.3-nat rise fails the NLL gate too.
    facts = {1: {"a"}, 2: set(), 3: set(), 4: {"b"}}
    soft = {2: (0.05, False), 3: (0.3, True)}
    nll = select_skips(4, scripted(facts, soft), SkipConfig(gate="nll", threshold=0.1, removal="one_at_a_time"))
    correct = select_skips(4, scripted(facts, soft), SkipConfig(gate="correct", removal="one_at_a_time"))
    assert nll["skip_sets"] == [[2]] and correct["skip_sets"] == [[3]]


def test_wrong_with_every_chunk_gives_no_skip_sample_unless_allowed():
    calls = []
    out = select_skips(6, scripted(base_wrong=True, calls=calls), SkipConfig(gate="nll"))
    assert out["status"] == "wrong_with_all_chunks" and out["skip_sets"] == [] and calls == [()]
    # The NLL gate may run on a student that is not yet right (require_correct off) ...
    out = select_skips(6, scripted(base_wrong=True), SkipConfig(gate="nll", require_correct=False))
    assert out["skip_sets"] == [[2, 3]]
    # ... the correctness gate never can.
    out = select_skips(6, scripted(base_wrong=True), SkipConfig(gate="correct", require_correct=False))
    assert out["status"] == "wrong_with_all_chunks"


def test_max_skips_any_and_no_middle_chunk():
    out = select_skips(6, scripted(), SkipConfig(removal="cumulative", max_skips=1))
    assert out["skip_sets"] == [[2]]
    out = select_skips(6, scripted(), SkipConfig(removal="one_at_a_time", max_skips=2))
    assert out["skip_sets"] == [[2], [3]]
    assert select_skips(2, scripted({1: {"a"}, 2: {"b"}}), SkipConfig())["status"] == "no_middle_chunk"
    # 'any' also tries the first and last chunk: chunk 1 is as redundant as chunk 2
    out = select_skips(6, scripted(), SkipConfig(removal="one_at_a_time", skippable="any"))
    assert out["skip_sets"] == [[1], [2], [3], [4]]


RECORD = {"id": "r1", "question": "Tom has 3 apples and buys 4, then 2. How many?",
          "rationale": "Tom has 3 apples. He buys 4, so 7. Then 2 more: 9.", "answer": "9"}
CHUNKS = ["Tom has 3 apples. ", "He buys 4, so 7. ", "Then 2 more: 9."]


def _builder(tokenizer, *overrides):
    return SampleBuilder(tokenizer, load_config(ROOT / "configs" / "smoke.yaml", list(overrides)))


def _text(tokenizer, sample):
    return tokenizer.decode(sample.input_ids, skip_special_tokens=True)


def test_skip_sequences_in_both_styles(tokenizer):
    b = _builder(tokenizer)
    texts, stages = b.skip_chunks(CHUNKS, [2])
    assert texts == [CHUNKS[0], "<skip> ", CHUNKS[2]] and stages == [1, 2, 3]
    full = _text(tokenizer, b.cwt(RECORD, texts, stages)[-1])
    assert "[1] Tom has 3 apples. [2] <skip> [3] Then 2 more: 9.\n[answer] #### 9" in full
    # the skipped stage's own sample targets exactly the skip text and the next marker
    skip_sample = b.cwt(RECORD, texts, stages)[1]
    target = [t for t in skip_sample.labels if t != IGNORE]
    assert tokenizer.decode(target) == "<skip> [3] "

    j = _builder(tokenizer, "stt.style=jump")
    texts, stages = j.skip_chunks(CHUNKS, [2])
    assert texts == [CHUNKS[0], CHUNKS[2]] and stages == [1, 3]
    full = _text(tokenizer, j.cwt(RECORD, texts, stages)[-1])
    assert "[1] Tom has 3 apples. [3] Then 2 more: 9.\n[answer] #### 9" in full
    # single-pass over a skip sequence is token for token the last sample of its chunk samples
    assert j.single_pass(RECORD, texts, stages).input_ids == j.cwt(RECORD, texts, stages)[-1].input_ids


def test_stt_samples_mix_skip_and_chunk_data(tokenizer):
    b = _builder(tokenizer)
    records = [dict(RECORD, id=f"r{i}") for i in range(10)]
    chunks = {r["id"]: CHUNKS for r in records}
    skips = {"r0": [[2]], "r1": [[2]]}
    only_skips, _ = build_samples(b, "stt", records, chunks, skips_by_id=skips, chunk_mix=0.0)
    assert len(only_skips) == 2 * 4   # 3 chunk stages + answer stage per skip sequence
    mixed, _ = build_samples(b, "stt", records, chunks, skips_by_id=skips, chunk_mix=0.5)
    assert len(mixed) == 2 * 4 + 20   # half of the 40 plain CWT samples
    again, _ = build_samples(b, "stt", records, chunks, skips_by_id=skips, chunk_mix=0.5)
    assert [s.input_ids for s in again] == [s.input_ids for s in mixed]   # seeded


def test_skip_decision_observes_forces_and_forbids():
    marker = [75, 34, 77, 216]          # '[2] ' in SmolLM2's tokenizer
    skip_token, other = 44, 7
    ids = torch.tensor([[5, 6] + marker, [5, 6, 8, 9, 10, 11]])
    scores = torch.full((2, 50), -5.0)
    scores[:, other] = 2.0
    scores[:, skip_token] = 1.0           # P(skip) ~ 0.26, not the argmax

    def run(threshold):
        proc = SkipDecision({2: marker}, skip_token, threshold, batch=2)
        return proc(ids, scores.clone()), proc.decisions

    out, decisions = run(None)            # observe only: scores untouched
    assert torch.equal(out, scores) and decisions[1] == []
    assert decisions[0][0]["stage"] == 2 and not decisions[0][0]["skip"]
    assert 0.2 < decisions[0][0]["p_skip"] < 0.3
    out, decisions = run(0.25)            # P(skip) >= 0.25: forced
    assert out[0].argmax() == skip_token and torch.isinf(out[0, other]) and decisions[0][0]["skip"]
    assert torch.equal(out[1], scores[1])  # not at a decision point: untouched
    out, decisions = run(0.5)             # below threshold: the skip is forbidden
    assert torch.isinf(out[0, skip_token]) and out[0].argmax() == other and not decisions[0][0]["skip"]


def test_parse_output_finds_written_skipped_and_jumped_stages():
    p = parse_output("Tom has 3. [2] <skip> [3] So 9.\n[answer] #### 9", "[{stage}] ", "[answer] ", "<skip> ")
    assert [(s.stage, s.skipped) for s in p.stages] == [(1, False), (2, True), (3, False)]
    assert p.skipped == [2] and p.answer == "#### 9"
    assert "[" not in p.content and "<skip>" not in p.content and p.content.endswith("#### 9")
    jump = parse_output("Tom has 3. [4] So 9.\n[answer] #### 9", "[{stage}] ", "[answer] ", "<skip> ")
    assert jump.skipped == [2, 3]
    cut = parse_output("Tom has 3. [2] He bu", "[{stage}] ", "[answer] ", "<skip> ")
    assert cut.answer == "" and cut.skipped == []
    assert parse_output("plain text 9", "", "", "<skip> ").content == "plain text 9"


def test_stt_config_checks():
    from cwt_ray.config import UserError, validate_config

    with pytest.raises(UserError, match="list 'cwt' in methods too"):
        validate_config({"name": "x", "methods": ["std_cot", "stt"]})
    with pytest.raises(UserError, match="skip_confidence needs stt.style 'marker'"):
        validate_config({"name": "x", "stt": {"style": "jump", "skip_confidence": 0.5}})
    with pytest.raises(UserError, match="'stt.threshold'"):
        validate_config({"name": "x", "stt": {"threshold": -1}})


def test_skip_aware_decoder_with_the_decision_off_is_the_chunk_wise_decoder(tiny_student, tokenizer):
    """Token for token, on real questions whose prefixes end at decision points; then the same
    decoder with thresholds 0 and 1 forces and forbids the skip there."""
    from cwt_ray.decode import decision_processor, generate
    from cwt_ray.student import load_model

    model = load_model(tiny_student).eval()
    b = _builder(tokenizer)
    questions = [f"Tom has {n} apples and buys {n + 2}. How many?" for n in range(4)]
    # the student has written chunk 1 and the next marker: its next token is a skip decision
    prefixes = [b.inference_prefix(q, "stt") + b.ids(CHUNKS[0]) + b.ids(b.marker(2)) for q in questions]
    plain, _ = generate(model, tokenizer, prefixes, 12)
    proc = decision_processor(tokenizer, b, None, "middle", len(prefixes))
    observed, _ = generate(model, tokenizer, prefixes, 12, proc)
    assert observed == plain
    assert all(d and d[0]["stage"] == 2 for d in proc.decisions)   # every row hit the decision point

    skip_id = b.ids(b.skip_text)[0]
    forced, _ = generate(model, tokenizer, prefixes, 12, decision_processor(tokenizer, b, 0.0, "middle", len(prefixes)))
    assert all(row[0] == skip_id for row in forced)
    proc = decision_processor(tokenizer, b, 1.0, "middle", len(prefixes))
    forbidden, _ = generate(model, tokenizer, prefixes, 12, proc)
    assert all(row[0] != skip_id for row in forbidden) and not any(d["skip"] for r in proc.decisions for d in r)


@pytest.mark.parametrize("scaled", [False, True], ids=["plain_logits", "granite_logits_scaling"])
def test_skip_gate_scores_the_answer_like_a_plain_full_forward(tokenizer, scaled):
    """The gate's NLL is training's (student.token_nll): the LM head only on the answer's positions,
    except for students that rescale their logits after the head (Granite's logits_scaling), which
    need their own full forward. Checked against the model's own logits, row by row, unpadded."""
    import torch
    import torch.nn.functional as F
    from transformers import GraniteConfig, GraniteForCausalLM

    from cwt_ray.skip import answer_scores

    torch.manual_seed(0)
    model = GraniteForCausalLM(GraniteConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, logits_scaling=8.0 if scaled else 1.0, pad_token_id=tokenizer.pad_token_id)).eval()
    seqs = [tokenizer("Tom has 3 apples and buys 4. So 7. #### 7")["input_ids"],
            tokenizer("Two boxes of 5 pens hold 10 pens. #### 10")["input_ids"]]
    lens = [3, 4]
    scores = answer_scores(model, seqs, lens, tokenizer.pad_token_id, batch_size=2)
    for seq, n, score in zip(seqs, lens, scores):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0].float()   # the model's own, full head
        target = torch.tensor(seq[-n:])
        nll = F.cross_entropy(logits[len(seq) - n - 1:len(seq) - 1], target).item()
        assert score.nll == pytest.approx(nll, rel=1e-5)
        assert score.correct == bool((logits[len(seq) - n - 1:len(seq) - 1].argmax(-1) == target).all())
