import itertools
import random

import numpy as np
import pyarrow as pa
import pytest

from cwt_ray.chunk import Chunker
from cwt_ray.chunking import (balanced_partition, candidate_moves, coherent_partition, resolve_embedding_model,
                              sbc_search, split_steps, threshold_partition)
from cwt_ray.rundir import CHUNK_SCHEMA
from cwt_ray.config import ChunkConfig, UserError, load_config
from conftest import ROOT, full_forward_scores

GSM = ("Let's solve this step by step:\n\n1. Initial amounts:\n   • John has 35 apple\n"
       "   • He has 3 times as many kiwi, so 35 × 3 = 105 kiwi. That is 3.5 times less apple.\n\n"
       "2. Bought at store: 93 apple.\nTherefore, John now has 288 items in total.")


def _steps(text, unit):
    return split_steps(text, unit)[1]


@pytest.mark.parametrize("unit", ["line", "sentence"])
@pytest.mark.parametrize("text", [GSM, "one step only", "\n\nleading blank. Then text.\n\n\n", "Ünïcödé → 5 € só. 日本語。\nx = 2."])
def test_steps_tile_the_rationale_without_blank_steps(unit, text):
    steps = _steps(text, unit)
    assert "".join(steps) == text
    assert all(s.strip() for s in steps)


def test_sentences_keep_list_markers_and_decimals():
    steps = _steps(GSM, "sentence")
    assert "1. Initial amounts:\n" in steps             # '1.' is a list marker, not a sentence end
    assert not any(s.endswith("3.") for s in steps)     # '3.5' is a number
    assert any(s.endswith("kiwi. ") for s in steps)     # a real sentence end inside a line
    assert "Let's solve this step by step:\n\n" in steps  # the empty line joins the step before


def _brute(n, k, cost):
    best = None
    for cuts in itertools.combinations(range(1, n), k - 1):
        ends = list(cuts) + [n]
        c = sum(cost(a, b) for a, b in zip([0] + list(cuts), ends))
        best = c if best is None else min(best, c)
    return best


def test_balanced_partition_is_optimal():
    rng = random.Random(0)
    for _ in range(100):
        lengths = [rng.randint(1, 30) for _ in range(rng.randint(1, 9))]
        k = rng.randint(1, len(lengths))
        ends = balanced_partition(lengths, k)
        assert len(ends) == k and ends[-1] == len(lengths) and ends == sorted(set(ends))
        mean = sum(lengths) / k
        cost = lambda a, b: (sum(lengths[a:b]) - mean) ** 2  # noqa: E731
        assert sum(cost(a, b) for a, b in zip([0] + ends[:-1], ends)) == pytest.approx(_brute(len(lengths), k, cost))


def test_coherent_partition_is_optimal_and_finds_topic_change():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 8))
        emb = rng.normal(size=(n, 5))
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        k = int(rng.integers(1, n + 1))
        ends = coherent_partition(emb, k)
        cost = lambda a, b: float(((emb[a:b] - emb[a:b].mean(0)) ** 2).sum())  # noqa: E731
        assert sum(cost(a, b) for a, b in zip([0] + ends[:-1], ends)) == pytest.approx(_brute(n, len(ends), cost))
    two_topics = np.array([[1, 0], [0.95, 0.31], [0.98, 0.2], [0, 1], [0.1, 0.99]], dtype=float)
    assert coherent_partition(two_topics / np.linalg.norm(two_topics, axis=1, keepdims=True), 2) == [3, 5]


def test_threshold_partition_cuts_where_similarity_drops():
    emb = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [1, 0]], dtype=float)
    assert threshold_partition(emb, 0.5, k=10) == [2, 4, 5]
    assert threshold_partition(emb, 0.5, k=2) == [2, 5]       # at most K chunks: the weakest cut wins ties by order
    assert threshold_partition(emb, -0.5, k=10) == [5]


def test_candidate_moves_keep_k_and_stay_valid():
    groups = [2, 5, 8]
    shifts = candidate_moves(groups, 0, "shift")
    assert sorted(shifts) == [[1, 5, 8], [3, 5, 8]]
    both = candidate_moves(groups, 0, "shift_merge_split")
    assert all(len(c) == 3 and c[-1] == 8 and c == sorted(set(c)) and c[0] > 0 for c in both)
    assert [5, 6, 8] in both and [3, 5, 8] in both            # merge chunks 1+2, split chunk 3 at step 6
    assert len(both) == 5                                     # cut can move to 1,3,4,6,7 (5 is taken)


def _scripted(target):
    """A scorer whose best boundary set is known: distance of the cuts from `target`."""
    calls = []

    def score(cands):
        calls.append(len(cands))
        return [float(sum(abs(a - b) for a, b in zip(c, target))) for c in cands]
    return score, calls


def test_sbc_search_reaches_the_known_optimum():
    score, calls = _scripted([4, 6, 8])
    out = sbc_search([2, 3, 8], score, ChunkConfig(sbc_max_passes=10, sbc_max_moves=20))
    assert out["groups"] == [4, 6, 8] and out["loss_after"] == 0 and out["loss_before"] == 5
    assert out["candidates_scored"] == 1 + sum(calls[1:]) and len(calls) > 1   # batched: one call per boundary


def test_sbc_tau_and_move_limits():
    score, _ = _scripted([4, 6, 8])
    assert sbc_search([2, 3, 8], score, ChunkConfig(sbc_tau=10.0))["moves"] == 0
    assert sbc_search([2, 3, 8], score, ChunkConfig(sbc_max_moves=1))["moves"] == 1


def test_shift_only_search_is_slower_than_merge_split():
    """Shifts move a cut one step at a time; merge-split can relocate it in one move."""
    score, _ = _scripted([7, 8])
    cfg = dict(sbc_max_passes=1, sbc_max_moves=1)
    shift = sbc_search([1, 8], score, ChunkConfig(sbc_moves="shift", **cfg))
    jump = sbc_search([1, 8], score, ChunkConfig(sbc_moves="shift_merge_split", **cfg))
    assert shift["groups"] == [2, 8] and jump["groups"] == [7, 8]


def test_bad_embedding_model_and_k_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="chunk.embedding_model"):
        resolve_embedding_model(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="'chunk.num_chunks'"):
        load_config(ROOT / "configs" / "smoke.yaml", ["chunk.num_chunks=0"])


def _chunker(tiny_student, *overrides, student=False):
    cfg = load_config(ROOT / "configs" / "smoke.yaml", list(overrides))
    emb = resolve_embedding_model(cfg.chunk.embedding_model) if "semantic" in overrides[0] else None
    return Chunker(cfg.model_dump(mode="json"), str(tiny_student), emb, str(tiny_student) if student else None)


ROWS = [
    {"id": "a", "question": "q?", "rationale": GSM, "answer": "288"},
    {"id": "b", "question": "q?", "rationale": "one step only", "answer": "1"},
    {"id": "c", "question": "q?", "rationale": "The oven bakes bread. Flour and yeast make dough. "
     "Stars shine in the night sky. Planets orbit the sun.", "answer": "2"},
    {"id": "bad", "question": "q?", "rationale": None, "answer": "3"},
    {"id": "long", "question": "q?", "rationale": " ".join(f"Step {i} adds {i} apples to the pile." for i in range(400)),
     "answer": "4"},
    {"id": "utf", "question": "q?", "rationale": "Ünïcödé → 5 € só.\n\n日本語の文。x = 2 × 3 = 6.\nDone ✓", "answer": "6"},
]


@pytest.mark.parametrize("heuristic", ["chunk.heuristic=average", "chunk.heuristic=semantic", "chunk.heuristic=sbc"])
def test_chunker_is_lossless_deterministic_and_rejects_bad_rows(tiny_student, heuristic):
    chunker = _chunker(tiny_student, heuristic, "chunk.num_chunks=2", student=heuristic.endswith("sbc"))
    table = pa.Table.from_pylist(ROWS)
    out = chunker(table).to_pylist()
    assert chunker(table).to_pylist() == out
    by_id = {r["id"]: r for r in out}
    assert by_id["bad"]["chunks"] is None and "cannot be chunked" in by_id["bad"]["note"]
    for row in [r for r in ROWS if r["id"] != "bad"]:
        got = by_id[row["id"]]
        assert "".join(got["chunks"]) == row["rationale"]
        assert got["boundaries"][0] == 0 and got["boundaries"][-1] == len(row["rationale"])
    assert by_id["b"]["num_chunks"] == 1
    if heuristic.endswith("semantic"):
        assert by_id["c"]["chunks"][1].startswith("Stars")   # MiniLM sees the topic change
        assert len(by_id["c"]["boundary_scores"]) == 1
    if heuristic.endswith("sbc"):
        assert by_id["a"]["loss_after"] <= by_id["a"]["loss_before"]
        assert by_id["a"]["candidates_scored"] > 1
        assert by_id["long"]["note"].startswith("search skipped")   # longer than the student's context
    assert pa.Table.from_pylist(out, schema=CHUNK_SCHEMA).num_rows == len(ROWS)


SHORT = [{"id": "one", "question": "Is a whale a fish?", "rationale": "Whales breathe air with lungs.", "answer": "no"},
         {"id": "two", "question": "Could Napoleon have used a telephone?",
          "rationale": "Napoleon died in 1821. Bell patented the telephone in 1876.", "answer": "no"}]


@pytest.mark.parametrize("overrides", [("chunk.heuristic=average",), ("chunk.heuristic=semantic",),
                                       ("chunk.heuristic=semantic", "chunk.semantic_mode=threshold"),
                                       ("chunk.heuristic=sbc",)])
def test_one_and_two_sentence_rationales_at_k5_get_a_chunk_per_sentence(tiny_student, overrides):
    """Human-written rationales are often one or two sentences: at K=5 every heuristic caps K at
    the steps there are, never makes an empty chunk, and the chunk summary counts them."""
    from cwt_ray.chunk_view import summarise

    chunker = _chunker(tiny_student, *overrides, "chunk.num_chunks=5", student=overrides[0].endswith("sbc"))
    table = chunker(pa.Table.from_pylist(SHORT))
    by_id = {r["id"]: r for r in table.to_pylist()}
    for record, k in zip(SHORT, (1, 2)):
        got = by_id[record["id"]]
        assert got["num_chunks"] == k and len(got["chunks"]) == k and len(got["boundaries"]) == k + 1
        assert "".join(got["chunks"]) == record["rationale"] and all(c.strip() for c in got["chunks"])
        assert all(n > 0 for n in got["chunk_tokens"]) and got["boundaries"] == sorted(set(got["boundaries"]))
    summary = summarise(table, rows_in=2, rejected=0, cfg=chunker.cfg)
    assert summary["fewer_chunks_than_k"] == 2 and summary["chunks_per_rationale"] == {"1": 1, "2": 1}


LINES = {"id": "lines", "question": "q?", "rationale": "a = 2\nb = 3\nc = a + b = 5\nd = 7\ne = c + d = 12\nf = 1\nSo 13.",
         "answer": "13"}


@pytest.mark.parametrize("stages,record", [(["stages.answer_stage=separate"], ROWS[0]),
                                          (["stages.answer_stage=with_last_chunk"], ROWS[0]),
                                          (["stages.chunk_marker=", "stages.answer_marker=", "chunk.step_unit=line"], LINES)])
def test_sbc_scores_equal_a_full_forward_of_each_candidate(tiny_student, stages, record):
    """The search runs the candidates' shared prefix once and continues each from its KV cache,
    with the LM head on chunk tokens only and without the separate answer; each score must equal
    the mean chunk NLL of that candidate's whole sequence in a full forward of its own (a batch of
    one, full logits). Without markers, candidates can be the same tokens split into different
    chunks (LINES: every candidate has the same 58 tokens): the shared prefix must stop where
    the chunks differ."""
    chunker = _chunker(tiny_student, "chunk.heuristic=sbc", *stages, "chunk.sbc_batch_size=3", student=True)
    scorer = chunker.chunker.scorer
    scorer.student.float()
    steps = _steps(record["rationale"], chunker.cfg.step_unit)
    n = len(steps)
    candidates = [[2, n], [1, 3, n], [2, 4, n], [1, 2, 4, n], [3, n]]   # K 2..4, two forward batches
    got = scorer(record, steps, candidates)
    assert got == pytest.approx(full_forward_scores(scorer, record, steps, candidates), rel=1e-5, abs=1e-5)


def test_slow_chunking_reports_progress_within_a_batch(tiny_student, monkeypatch, capsys):
    import cwt_ray.chunking as chunking

    monkeypatch.setattr(chunking, "PROGRESS_EVERY_S", 0.0)   # every rationale counts as slow
    _chunker(tiny_student, "chunk.heuristic=sbc", "chunk.sbc_max_passes=1", student=True)(pa.Table.from_pylist(ROWS[:3]))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[chunk sbc] 1/3 rationales of this batch,") and "batch done in ~" in lines[0]
    assert lines[1].startswith("[chunk sbc] 2/3 rationales") and lines[2].startswith("[chunk sbc] 3 rationales in ")


def test_a_killed_chunk_stage_reuses_its_finished_batches(tiny_student, tmp_path, capsys):
    """With `done_dir`, a finished batch is kept and a second attempt returns it without chunking
    again; a batch with other rows, or chunked with other settings, is chunked afresh."""
    cfg = load_config(ROOT / "configs" / "smoke.yaml", ["chunk.heuristic=sbc", "chunk.sbc_max_passes=1"])
    tree, done = cfg.model_dump(mode="json"), str(tmp_path / "train.done")
    first = Chunker(tree, str(tiny_student), None, str(tiny_student), done_dir=done)(pa.Table.from_pylist(ROWS[:3]))
    assert len(list((tmp_path / "train.done").glob("*.parquet"))) == 1

    again = Chunker(tree, str(tiny_student), None, str(tiny_student), done_dir=done)
    again.chunker = None   # chunking now would fail: the batch must come from disk
    assert again(pa.Table.from_pylist(ROWS[:3])).to_pylist() == first.to_pylist()
    assert "3 rationales chunked by an earlier attempt, reused" in capsys.readouterr().out

    saved = next((tmp_path / "train.done").glob("*.parquet"))
    saved.write_bytes(b"cut short")   # unreadable: chunked again and saved again
    fresh = Chunker(tree, str(tiny_student), None, str(tiny_student), done_dir=done)(pa.Table.from_pylist(ROWS[:3]))
    assert fresh.to_pylist() == first.to_pylist() and "reused" not in capsys.readouterr().out
    assert saved.read_bytes().startswith(b"PAR1")

    other_rows = Chunker(tree, str(tiny_student), None, str(tiny_student), done_dir=done)
    other_rows(pa.Table.from_pylist(ROWS[:2]))
    tree["chunk"]["num_chunks"] = 2
    Chunker(tree, str(tiny_student), None, str(tiny_student), done_dir=done)(pa.Table.from_pylist(ROWS[:3]))
    assert len(list((tmp_path / "train.done").glob("*.parquet"))) == 3


def test_preflight_skips_what_a_finished_chunk_stage_needed(tmp_path):
    """A run directory chunked on one machine trains on another that lacks the embedding model
    (seen on the GPU study); before chunking, a missing model is still a one-line error."""
    from cwt_ray.pipeline import RunState, preflight

    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"storage_path={tmp_path}", "chunk.heuristic=semantic",
                                                        f"chunk.embedding_model={tmp_path / 'missing'}"])
    with pytest.raises(UserError, match="chunk.embedding_model"):
        preflight(cfg, ("data", "chunk", "train"))
    cfg.run_dir.mkdir(parents=True)
    state = RunState(cfg.run_dir, cfg)
    state.mark("data")
    state.mark("chunk")
    preflight(cfg, ("data", "chunk", "train"))          # chunks are there: nothing to ask for
    with pytest.raises(UserError, match="chunk.embedding_model"):
        preflight(cfg, ("data", "chunk", "train"), force=("chunk",))


def test_sbc_chunks_are_redone_when_the_training_format_changes(tmp_path):
    """SBC scores chunks in the training format (prompt, stage markers), so those settings are part
    of its chunk stage's fingerprint; the other heuristics never read them."""
    from cwt_ray.pipeline import RunState

    def chunk_fp(*overrides):
        cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"storage_path={tmp_path}", *overrides])
        return RunState(cfg.run_dir, cfg).fingerprint("chunk")

    for marker in ["stages.chunk_marker=<{stage}> ", "prompt.template=Solve {question} then answer"]:
        assert chunk_fp("chunk.heuristic=sbc") != chunk_fp("chunk.heuristic=sbc", marker)
        assert chunk_fp("chunk.heuristic=average") == chunk_fp("chunk.heuristic=average", marker)


def test_chunk_record_is_a_plain_function_of_the_record_and_its_token_counts():
    """The algorithm alone, without Ray, a tokenizer or a model: token counts come in as numbers,
    and the chunks are the balanced partition of them, joined back losslessly."""
    from cwt_ray.chunking import chunk_record

    ends, steps = split_steps(GSM, "line")
    lengths = [len(s) for s in steps]   # any per-step counts will do
    row = chunk_record({"id": "a", "rationale": GSM}, ChunkConfig(heuristic="average", num_chunks=2), ends, steps,
                       lengths)
    groups = balanced_partition(lengths, 2)
    assert row["num_chunks"] == 2 and "".join(row["chunks"]) == GSM
    assert row["chunk_tokens"] == [sum(lengths[:groups[0]]), sum(lengths[groups[0]:])]
    assert row["boundaries"] == [0, ends[groups[0] - 1], len(GSM)]
