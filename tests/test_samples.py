from cwt_ray.config import load_config
from cwt_ray.samples import ANSWER_STAGE, IGNORE, SampleBuilder, build_samples
from conftest import ROOT

RECORD = {"id": "r1", "question": "Tom has 3 apples and buys 4. How many?",
          "rationale": "Tom starts with 3 apples.\nHe buys 4 more, so 3 + 4 = 7.", "answer": "7"}


def builder(tokenizer, *overrides):
    return SampleBuilder(tokenizer, load_config(ROOT / "configs" / "smoke.yaml", list(overrides)))


def test_cwt_with_one_chunk_equals_std_cot(tokenizer):
    b = builder(tokenizer, "stages.chunk_marker=", "stages.answer_marker=", "stages.answer_stage=with_last_chunk")
    [std] = b.std_cot(RECORD)
    [cwt] = b.cwt(RECORD, [RECORD["rationale"]])
    assert cwt.input_ids == std.input_ids
    assert cwt.labels == std.labels


def test_chunk_samples_are_prefixes_of_the_answer_sample(tokenizer):
    b = builder(tokenizer)
    chunks = ["Tom starts with 3 apples.\n", "He buys 4 more, so 3 + 4 = 7."]
    samples = b.cwt(RECORD, chunks)
    assert [s.stage for s in samples] == [1, 2, ANSWER_STAGE]
    full = samples[-1].input_ids
    for s in samples:
        assert full[:len(s.input_ids)] == s.input_ids
    assert full[-1] == tokenizer.eos_token_id
    assert samples[0].input_ids[:len(b.inference_prefix(RECORD["question"], "cwt"))] == b.inference_prefix(
        RECORD["question"], "cwt")


def test_labels_cover_only_the_target_chunk_and_next_marker(tokenizer):
    b = builder(tokenizer)
    chunks = ["Tom starts with 3 apples.\n", "He buys 4 more, so 3 + 4 = 7."]
    second = b.cwt(RECORD, chunks)[1]
    target = [t for t in second.labels if t != IGNORE]
    assert tokenizer.decode(target) == chunks[1] + "\n" + "[answer] "
    # context (prompt, marker 1, chunk 1, marker 2) carries no loss
    context_len = len(second.labels) - len(target)
    assert all(t == IGNORE for t in second.labels[:context_len])


def test_std_cot_target_is_rationale_and_answer(tokenizer):
    b = builder(tokenizer)
    [s] = b.std_cot(RECORD)
    target = [t for t in s.labels if t != IGNORE]
    assert target[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(target[:-1]) == RECORD["rationale"] + "\n#### 7"


def test_too_long_samples_are_dropped_and_counted(tokenizer):
    b = builder(tokenizer, "student.max_length=20")
    kept, dropped = build_samples(b, "std_cot", [RECORD], {})
    assert kept == [] and dropped == 1


def test_stage_sequence_matches_the_cwt_samples(tokenizer):
    b = builder(tokenizer)
    chunks = ["Tom starts with 3 apples.\n", "He buys 4 more, so 3 + 4 = 7."]
    ids, stages = b.stage_sequence(RECORD, chunks)
    samples = b.cwt(RECORD, chunks)
    assert ids == samples[-1].input_ids
    for s in samples[:-1]:   # chunk stage i: its supervised tokens are exactly the tokens tagged i
        target = [t for t in s.labels if t != IGNORE]
        assert target == [t for t, st in zip(ids, stages) if st == s.stage]
