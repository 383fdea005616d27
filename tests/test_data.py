"""Data in: every reader on a small real file, presets, malformed rows -> rejects with reasons,
rows in = kept + rejected, splits, the reject limit. File sources run through Ray Data (the
shared session cluster); each test takes a second or two."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cwt_ray.config import UserError, load_config
from cwt_ray.data import KeySet, hash_split, split_gsm_cot, write_splits


def test_split_gsm_cot():
    assert split_gsm_cot("a\nb = 3\n#### 3") == ("a\nb = 3", "3")
    assert split_gsm_cot("no answer line") == ("no answer line", None)


def test_key_set_keeps_first_occurrences_across_batches():
    ks = KeySet()
    first = ks.add_new(np.array([5, 3, 5, 9], dtype=np.uint64))
    assert first.tolist() == [True, True, False, True]
    for start in range(0, 1000, 100):   # many batches: runs merge, membership stays exact
        ks.add_new(np.arange(start + 10, start + 110, dtype=np.uint64))
    assert ks.add_new(np.array([3, 50, 2000], dtype=np.uint64)).tolist() == [False, False, True]
    assert len(ks) == 3 + 1000 + 1 and ks.nbytes == 8 * len(ks) and len(ks.runs) < 6


def test_key_set_union_is_exact_with_repeats(monkeypatch):
    """`add` (the train questions) takes repeated keys, within and across batches; every merged run
    stays sorted and unique, and membership matches a Python set. A low trim size makes the merges
    call the real malloc_trim too."""
    monkeypatch.setattr(KeySet, "TRIM_AFTER_KEYS", 64)
    rng = np.random.default_rng(0)
    ks, seen = KeySet(), set()
    for _ in range(40):
        batch = rng.integers(0, 500, size=rng.integers(0, 60)).astype(np.uint64)
        ks.add(batch)
        seen.update(batch.tolist())
        assert all((np.diff(r.astype(np.int64)) > 0).all() for r in ks.runs)
    probe = np.arange(600, dtype=np.uint64)
    assert ks.contains(probe).tolist() == [int(k) in seen for k in probe]
    assert len(ks) >= len(seen)   # runs are unique each; `add` does not check earlier runs


def test_hash_split_follows_the_fractions():
    fractions = {"train": 0.8, "validation": 0.1, "test": 0.1}
    got = [hash_split(f"id-{i}", fractions) for i in range(5000)]
    assert 0.77 < got.count("train") / 5000 < 0.83 and got.count("validation") > 400
    assert hash_split("id-7", fractions) == got[7]


def _write_jsonl(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (json.dumps(line) if isinstance(line, dict) else line).encode())
            f.write(b"\n")


def _rows(table_path):
    return pq.read_table(table_path).to_pylist()


def _counts(split: dict) -> dict:
    return {k: split[k] for k in ("rows_in", "kept", "rejected", "truncated")}


def test_jsonl_rows_in_equal_kept_plus_rejected(ray_cluster, smoke_cfg, tmp_path):
    good = {"id": "a", "question": "q1?", "rationale": "1 + 1 = 2", "answer": "2"}
    rows = [
        good,
        "{not json",
        {"id": "b", "question": "", "rationale": "r", "answer": "1"},          # empty field
        b'{"id": "c", "question": "q\xff", "rationale": "r", "answer": "1"}',  # not UTF-8
        {"id": "a", "question": "q2?", "rationale": "1 + 2 = 3", "answer": "3"},  # duplicate id
        {"id": "d", "question": "q3?", "rationale": "r", "answer": "many"},    # unreadable answer
        {"id": "e", "question": "q4?", "rationale": ["r"], "answer": "4"},     # wrong type
        json.dumps([1, 2]),                                                     # not an object
        {"id": "f", "question": "q5?", "rationale": "2 * 3 = 6", "answer": "$6"},
        {"id": "g", "question": "q6?", "rationale": "2 * 3 = 7, so the answer is 7", "answer": "6"},  # disagrees
        {"id": "h", "question": "q7?", "rationale": "", "answer": "6"},        # empty rationale
    ]
    train = tmp_path / "train.jsonl"
    _write_jsonl(train, rows)
    test = tmp_path / "test.jsonl"
    _write_jsonl(test, [{"id": "t1", "question": "q1?", "rationale": "x", "answer": "2"},
                        {"id": "t2", "question": "new?", "rationale": "x", "answer": "5"}])
    cfg = smoke_cfg("data.source=jsonl", f"data.train_path={train}", f"data.test_path={test}")
    summary = write_splits(cfg, tmp_path / "data")
    assert _counts(summary["train"]) == {"rows_in": 11, "kept": 2, "rejected": 9, "truncated": 0}
    # t1 repeats a train question; the teacher's "x" is not judged outside the train split
    assert _counts(summary["test"]) == {"rows_in": 2, "kept": 1, "rejected": 1, "truncated": 0}
    assert summary["all"]["rows_in"] == summary["all"]["kept"] + summary["all"]["rejected"] == 13
    assert summary["all"]["agreement_rejected"] == 1
    # kinds and one reason each, per split; "1 + 1 = 2" and "2 * 3 = 6" state no answer: kept, counted
    assert summary["train"]["rejected_by_kind"] == {
        "duplicate_id": 1, "invalid_json": 1, "missing_field": 2, "not_an_object": 1, "not_utf8": 1,
        "teacher_disagrees": 1, "unreadable_answer": 1, "wrong_type": 1}
    assert summary["train"]["reject_examples"]["teacher_disagrees"] == "rationale states '7', gold answer is '6'"
    assert summary["test"]["rejected_by_kind"] == {"in_train_split": 1}
    assert (summary["train"]["no_stated_answer"], summary["test"]["no_stated_answer"]) == (2, 1)
    rejects = _rows(tmp_path / "data" / "rejects.parquet")
    by_line = {(r["split"], r["line"]): (r["kind"], r["reason"]) for r in rejects}
    assert by_line[("train", 2)][0] == "invalid_json"
    assert by_line[("train", 3)] == ("missing_field", "missing or empty field 'question'")
    assert by_line[("train", 4)][0] == "not_utf8" and "UTF-8" in by_line[("train", 4)][1]
    assert by_line[("train", 5)] == ("duplicate_id", "duplicate id 'a' (first kept)")
    assert by_line[("train", 6)][0] == "unreadable_answer"
    assert "type list" in by_line[("train", 7)][1]
    assert by_line[("train", 8)][0] == "not_an_object"
    assert by_line[("train", 10)][0] == "teacher_disagrees"
    assert by_line[("train", 11)][1] == "missing or empty field 'rationale'"
    assert all(r["file"] == str(train) for r in rejects if r["split"] == "train")
    assert [r for r in rejects if r["split"] == "test"][0]["kind"] == "in_train_split"
    kept = _rows(tmp_path / "data" / "train.parquet")
    assert [r["answer"] for r in kept] == ["2", "6"] and kept[0]["source"] == "train.jsonl"


def test_missing_data_file_is_a_user_error(smoke_cfg, tmp_path):
    cfg = smoke_cfg("data.source=files", f"data.train_path={tmp_path}/nope.jsonl", f"data.test_path={tmp_path}/t.jsonl")
    with pytest.raises(UserError, match="nope.jsonl"):
        write_splits(cfg, tmp_path / "data")


def test_gsm_symbolic_splits_are_disjoint_and_seeded(smoke_cfg, tmp_path):
    cfg = smoke_cfg()
    summary = write_splits(cfg, tmp_path / "a")
    write_splits(cfg, tmp_path / "b")
    a = _rows(tmp_path / "a" / "train.parquet")
    assert a == _rows(tmp_path / "b" / "train.parquet")
    test = _rows(tmp_path / "a" / "test.parquet")
    assert not {r["question"] for r in a} & {r["question"] for r in test}
    assert all("####" not in r["rationale"] for r in a)
    for counts in summary.values():
        assert counts["rows_in"] == counts["kept"] + counts["rejected"]


ROWS = [{"id": f"r{i}", "question": f"What is {i} + {i}?", "rationale": f"{i} + {i} = {2 * i}.", "answer": str(2 * i)}
        for i in range(1, 7)]


def _write_all_formats(folder):
    """The same six rows as JSONL, a JSON array, Parquet, CSV and a `datasets` save_to_disk folder."""
    from datasets import Dataset

    folder.mkdir(parents=True, exist_ok=True)
    _write_jsonl(folder / "rows.jsonl", ROWS)
    (folder / "rows.json").write_text(json.dumps(ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS), folder / "rows.parquet")
    lines = ["id,question,rationale,answer"] + [f'{r["id"]},"{r["question"]}","{r["rationale"]}",{r["answer"]}' for r in ROWS]
    (folder / "rows.csv").write_text("\n".join(lines) + "\n")
    Dataset.from_list(ROWS).save_to_disk(str(folder / "hf"))
    return {"jsonl": folder / "rows.jsonl", "json": folder / "rows.json", "parquet": folder / "rows.parquet",
            "csv": folder / "rows.csv", "hf": folder / "hf"}


def test_every_reader_gives_the_same_records(ray_cluster, smoke_cfg, tmp_path):
    files = _write_all_formats(tmp_path / "in")
    test = tmp_path / "test.jsonl"
    _write_jsonl(test, [{"id": "t", "question": "What is 10 + 10?", "rationale": "-", "answer": "20"}])
    got = {}
    for fmt, path in files.items():
        summary = write_splits(smoke_cfg("data.source=files", f"data.train_path={path}", f"data.test_path={test}"),
                               tmp_path / fmt)
        assert summary["train"]["kept"] == 6, (fmt, summary)
        got[fmt] = [{k: r[k] for k in ("id", "question", "rationale", "answer")} for r in _rows(tmp_path / fmt / "train.parquet")]
    assert all(rows == got["jsonl"] for rows in got.values()), got
    assert got["jsonl"] == ROWS


def test_folders_globs_and_byte_range_shards_keep_line_numbers(ray_cluster, smoke_cfg, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for part in range(3):
        _write_jsonl(folder / f"part-{part}.jsonl", ROWS[part * 2: part * 2 + 2])
    big = tmp_path / "big.jsonl"
    filler = "x " * 150
    rows = [{"id": f"b{i}", "question": f"{filler} q{i}?", "rationale": f"so {i}", "answer": str(i)} for i in range(6000)]
    rows[4321] = "{broken"   # deep inside the file: in a later byte range than the first
    _write_jsonl(big, rows)
    assert big.stat().st_size > 1.5 * 2**20
    test = tmp_path / "test.jsonl"
    _write_jsonl(test, [{"id": "t", "question": "new?", "rationale": "-", "answer": "1"}])
    cfg = smoke_cfg("data.source=files", f"data.train_path=[{folder}, '{tmp_path}/b*.jsonl']", f"data.test_path={test}",
                    "data.shard_mb=1")
    summary = write_splits(cfg, tmp_path / "data")
    assert _counts(summary["train"]) == {"rows_in": 6006, "kept": 6005, "rejected": 1, "truncated": 0}
    [reject] = _rows(tmp_path / "data" / "rejects.parquet")
    assert (reject["file"], reject["line"], reject["kind"]) == (str(big), 4322, "invalid_json")
    kept = _rows(tmp_path / "data" / "train.parquet")
    assert [r["id"] for r in kept[:6]] == [r["id"] for r in ROWS] and kept[6]["id"] == "b0"   # file order kept


def test_gsm8k_and_fine_tune_cot_presets(ray_cluster, smoke_cfg, tmp_path):
    gsm = tmp_path / "gsm8k.jsonl"
    _write_jsonl(gsm, [
        {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
         "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72 clips.\n#### 72"},
        {"question": "No answer line?", "answer": "Just text."},
    ])
    ftc = tmp_path / "ftc.jsonl"
    _write_jsonl(ftc, [
        {"prompt": "Tom has 3 apples and buys 4. How many?\n\n###\n\n", "completion": " 3 + 4 = 7. --> 7 END"},
        {"prompt": "Tom has 3 apples and buys 5. How many?\n\n###\n\n", "completion": " 3 + 5 = 9. --> 9 END",
         "answer": "8"},   # the teacher was wrong: filtered
        # the released code's decoder format ("{q} ###") with the GPT-3 experiments' "\n\n-->\n\n"
        {"prompt": "Tom has 2 pears and eats 1. How many? ###", "completion": " 2 - 1 = 1.\n\n-->\n\n1 END"},
    ])
    test = tmp_path / "test.jsonl"
    _write_jsonl(test, [{"id": "t", "question": "new?", "rationale": "-", "answer": "1"}])
    with pytest.raises(UserError, match="no usable|test"):   # the test file is not in gsm8k layout
        write_splits(smoke_cfg("data.source=files", f"data.train_path={ftc}", "data.preset=gsm8k",
                               f"data.test_path={ftc}"), tmp_path / "x")
    summary = write_splits(smoke_cfg("data.source=files", f"data.train_path={gsm}", "data.preset=gsm8k",
                                     f"data.test_path={gsm}"), tmp_path / "g")
    [rec] = _rows(tmp_path / "g" / "train.parquet")
    assert rec["rationale"] == "In May she sold 48/2 = 24 clips.\nIn all 48+24 = 72 clips." and rec["answer"] == "72"
    assert rec["id"].startswith("h-") and summary["train"]["rejected"] == 1
    summary = write_splits(smoke_cfg("data.source=files", f"data.train_path={ftc}", "data.preset=fine_tune_cot",
                                     f"data.test_path={ftc}"), tmp_path / "f")
    recs = sorted((r["question"], r["rationale"], r["answer"]) for r in _rows(tmp_path / "f" / "train.parquet"))
    assert recs == [("Tom has 2 pears and eats 1. How many?", "2 - 1 = 1.", "1"),
                    ("Tom has 3 apples and buys 4. How many?", "3 + 4 = 7.", "7")]
    assert summary["all"]["agreement_rejected"] == 1


def test_field_mapping_with_nested_fields(ray_cluster, smoke_cfg, tmp_path):
    path = tmp_path / "mine.jsonl"
    _write_jsonl(path, [{"meta": {"uid": "x1"}, "q": "Is 4 even?", "cot": "4 = 2 * 2, so yes.", "label": "Yes"}])
    cfg = smoke_cfg("data.source=files", f"data.train_path={path}", f"data.test_path={path}", "task.answer_type=yes_no",
                    "data.fields={id: meta.uid, question: q, rationale: cot, answer: label}")
    write_splits(cfg, tmp_path / "d")
    [rec] = _rows(tmp_path / "d" / "train.parquet")
    assert (rec["id"], rec["question"], rec["answer"]) == ("x1", "Is 4 even?", "yes")


def test_long_rationales_rejected_or_truncated(ray_cluster, smoke_cfg, tmp_path):
    path = tmp_path / "long.jsonl"
    long = "3 + 4 = 7. " * 9000 + "So 7."   # ~100 kB
    _write_jsonl(path, [{"id": "long", "question": "q?", "rationale": long, "answer": "7"},
                        {"id": "short", "question": "q2?", "rationale": "So 7.", "answer": "7"}])
    base = ("data.source=files", f"data.train_path={path}", f"data.test_path={path}", "data.agreement_filter=false")
    summary = write_splits(smoke_cfg(*base), tmp_path / "r")
    assert _counts(summary["train"]) == {"rows_in": 2, "kept": 1, "rejected": 1, "truncated": 0}
    assert _rows(tmp_path / "r" / "rejects.parquet")[0]["kind"] == "too_long"
    summary = write_splits(smoke_cfg(*base, "data.too_long=truncate", "data.max_rationale_tokens=50"), tmp_path / "t")
    assert _counts(summary["train"]) == {"rows_in": 2, "kept": 2, "rejected": 0, "truncated": 1}
    rec = _rows(tmp_path / "t" / "train.parquet")[0]
    assert long.startswith(rec["rationale"]) and 40 < len(rec["rationale"]) < 400


def test_hashed_splits_are_stable_when_files_are_reordered_or_resharded(ray_cluster, smoke_cfg, tmp_path):
    rows = [{"id": f"k{i}", "question": f"What is {i} + 1?", "rationale": f"{i} + 1 = {i + 1}", "answer": str(i + 1)}
            for i in range(200)]
    _write_jsonl(tmp_path / "one.jsonl", rows)
    shuffled = tmp_path / "shards"
    shuffled.mkdir()
    for k in range(3):
        _write_jsonl(shuffled / f"s{k}.jsonl", rows[::-1][k::3])

    def splits(path, out):
        summary = write_splits(smoke_cfg("data.source=files", f"data.paths=[{path}]"), tmp_path / out)
        assert summary["all"]["rows_in"] == 200
        return {s: sorted(r["id"] for r in _rows(tmp_path / out / f"{s}.parquet")) for s in ("train", "validation", "test")}

    a, b = splits(tmp_path / "one.jsonl", "a"), splits(shuffled, "b")
    assert a == b and len(a["train"]) > 140 and a["validation"] and a["test"]


def _validator(*overrides):
    from cwt_ray.data import Validator

    from conftest import ROOT

    cfg = load_config(ROOT / "configs" / "smoke.yaml", ["task.answer_type=yes_no", *overrides])
    return Validator(cfg.model_dump(mode="json"))


# Human-written yes/no rationales: facts that never restate the answer, with incidental "no" words.
STATES_NONE = {"id": "none", "question": "Is the cheetah the fastest land animal?", "answer": "yes",
               "rationale": "Cheetahs reach about 110 km per hour. No other land animal is known to run as fast."}
STATES_RIGHT = {"id": "right", "question": "Is the Moon a planet?", "answer": "no",
                "rationale": "The Moon orbits the Earth, not the Sun. The answer: no."}
STATES_WRONG = {"id": "wrong", "question": "Does the Amazon flow into the Pacific?", "answer": "no",
                "rationale": "The Amazon crosses Brazil to the Atlantic coast. So the answer is yes."}


@pytest.mark.parametrize("setting, kept", [
    ("stated", {"none", "right"}), ("strict", {"right"}), ("off", {"none", "right", "wrong"}),
    ("true", {"right"}), ("false", {"none", "right", "wrong"}),   # the older switch: strict / off
])
def test_agreement_filter_judges_what_a_rationale_states(setting, kept):
    from cwt_ray.readers import Bad

    validator = _validator(f"data.agreement_filter={setting}")
    out = {row["id"]: validator.check(row, "train") for row in (STATES_NONE, STATES_RIGHT, STATES_WRONG)}
    assert {i for i, rec in out.items() if not isinstance(rec, Bad)} == kept
    assert out["right"]["stated_answer"] == "no"
    if "none" in kept:
        assert out["none"]["stated_answer"] is None   # kept, and counted as stating no answer
    else:
        assert (out["none"].kind, out["none"].reason) == (
            "no_stated_answer", "rationale states no answer (data.agreement_filter: strict)")
    if "wrong" not in kept:
        assert (out["wrong"].kind, out["wrong"].reason) == (
            "teacher_disagrees", "rationale states 'yes', gold answer is 'no'")
    # evaluation splits are never filtered, whatever the setting
    assert not isinstance(validator.check(STATES_WRONG, "test"), Bad)


def test_rationale_sample_is_the_smallest_id_hashes_in_any_order(monkeypatch):
    """One sample over every split: the PROFILE_ROWS smallest id hashes, however the rows come."""
    from cwt_ray import data_check

    monkeypatch.setattr(data_check, "PROFILE_ROWS", 50)
    rng = np.random.default_rng(0)
    keys = rng.permutation(1000).astype(np.uint64) * np.uint64(7919)
    split = np.where(np.arange(1000) % 10 == 0, "test", "train")
    texts = pa.array([f"rationale {int(k)}" for k in keys])
    smallest = np.argsort(keys)[:50]
    for order in (np.arange(1000), rng.permutation(1000)):
        sample = data_check.RationaleSample()
        for batch in np.array_split(order, 13):
            for name in ("train", "test"):
                rows = batch[split[batch] == name]
                sample.add(name, keys[rows], pa.chunked_array([texts.take(pa.array(rows, pa.int64()))]))
        for name in ("train", "test"):
            assert sorted(sample.of(name)) == sorted(f"rationale {int(keys[i])}" for i in smallest if split[i] == name)


def _human_rows(n, prefix, wrong=0, sentences=(1, 2, 3)):
    """n yes/no rows whose rationales state no answer (1-3 sentences); the first `wrong` state a wrong one."""
    rows = []
    for i in range(n):
        facts = [f"Item {i} was recorded in {1900 + i}.", "There is no record of it being sold.",
                 f"It weighs {i + 3} kg."][:sentences[i % len(sentences)]]
        if i < wrong:
            facts.append("So the answer is yes.")
        rows.append({"id": f"{prefix}{i}", "question": f"Was item {i} of {prefix} ever sold?",
                     "rationale": " ".join(facts), "answer": "no"})
    return rows


def test_data_check_counts_profiles_and_shows_examples(ray_cluster, smoke_cfg, tmp_path, monkeypatch):
    """summary.json carries the data check: per split no_stated_answer, rejects by kind, rationale
    tokens and steps (here on a sample of 10 of the 32 kept rows: the 10 smallest id hashes of all
    splits, measured here again with the student's tokenizer), fewer steps than K, and the first
    train rows as examples."""
    from cwt_ray import data_check
    from cwt_ray.chunking import step_boundaries
    from cwt_ray.data import _key, student_tokenizer

    monkeypatch.setattr(data_check, "PROFILE_ROWS", 10)
    rows, test_rows = _human_rows(30, "t", wrong=2), _human_rows(4, "e")
    _write_jsonl(tmp_path / "train.jsonl", rows)
    _write_jsonl(tmp_path / "test.jsonl", test_rows)
    cfg = smoke_cfg("data.source=files", f"data.train_path={tmp_path / 'train.jsonl'}",
                    f"data.test_path={tmp_path / 'test.jsonl'}", "task.answer_type=yes_no", "chunk.num_chunks=3")
    summary = write_splits(cfg, tmp_path / "data")
    train = summary["train"]
    assert (train["kept"], train["rejected"], train["no_stated_answer"]) == (28, 2, 28)
    assert train["rejected_by_kind"] == {"teacher_disagrees": 2}
    assert summary["test"]["no_stated_answer"] == 4 and summary["validation"]["profile"] is None
    sampled = [r for r in sorted(rows[2:] + test_rows, key=lambda r: _key(r["id"]))[:10] if r["id"].startswith("t")]
    tok = student_tokenizer(cfg.student.model_dump(mode="json"))
    tokens = sorted(len(tok.encode(r["rationale"], add_special_tokens=False).ids) for r in sampled)
    steps = [len(step_boundaries(r["rationale"], "sentence")) for r in sampled]
    p = train["profile"]
    assert 0 < len(sampled) < 10   # the ids are such that both splits are sampled
    assert (p["rows"], p["of"], p["sampled"], p["num_chunks"], p["step_unit"]) == (len(sampled), 28, True, 3, "sentence")
    assert (p["rationale_tokens"]["min"], p["rationale_tokens"]["max"]) == (tokens[0], tokens[-1])
    assert p["rationale_tokens"]["median"] == float(np.median(tokens))
    assert p["fewer_steps_than_k"] == sum(s < 3 for s in steps) and p["steps"]["max"] == max(steps)
    assert summary["test"]["profile"]["rows"] == 10 - len(sampled) and summary["test"]["profile"]["of"] == 4
    assert [e["id"] for e in summary["all"]["examples"]] == ["t2", "t3", "t4"]
    assert summary["all"]["examples"][0]["stated_answer"] is None and summary["all"]["examples"][0]["answer"] == "no"
    assert json.loads((tmp_path / "data" / "summary.json").read_text())["train"]["profile"] == p


def test_a_split_that_loses_most_rows_stops_with_one_line(ray_cluster, tmp_path, capsys):
    """Default data.max_reject_fraction 0.5, per split: 20 of 30 train rows state a wrong answer.
    `cwt-ray data` writes the rejects file and the data check, then exits 2 with one line naming the
    split, the share, the commonest kind with an example reason and the key to change."""
    from cwt_ray.cli import main

    from conftest import ROOT

    _write_jsonl(tmp_path / "train.jsonl", _human_rows(30, "t", wrong=20))
    _write_jsonl(tmp_path / "test.jsonl", _human_rows(4, "e"))
    args = [str(ROOT / "configs" / "smoke.yaml"), f"storage_path={tmp_path}", "data.source=files",
            f"data.train_path={tmp_path / 'train.jsonl'}", f"data.test_path={tmp_path / 'test.jsonl'}",
            "task.answer_type=yes_no"]
    code = main(["data", *args])
    out, err = capsys.readouterr()
    err = err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err
    assert "20 of 30 train rows rejected (66.7%), more than data.max_reject_fraction=0.5" in err
    assert "most are teacher_disagrees (20), e.g. \"rationale states 'yes', gold answer is 'no'\"" in err
    assert "see data.agreement_filter" in err and "null: never stop" in err
    assert (tmp_path / "smoke" / "data" / "rejects.parquet").is_file()   # written before stopping
    assert "[data] check" in out and "teacher_disagrees 20" in out       # and the check shown
    assert main(["data", *args, "data.max_reject_fraction=null"]) == 0  # null: the old never-stop
    assert main(["data", *args, "data.max_reject_fraction=0.7"]) == 0   # under the limit: goes on


def test_small_splits_are_exempt_and_unsplit_rejects_count_in_all_rows(ray_cluster, smoke_cfg, tmp_path):
    from cwt_ray.data_check import DataStop

    # 30 good train rows; the test split loses 4 of 5 but has under 20 rows
    _write_jsonl(tmp_path / "train.jsonl", _human_rows(30, "t"))
    _write_jsonl(tmp_path / "test.jsonl", _human_rows(1, "e") + [{"id": f"x{i}", "question": "q?", "rationale": "r",
                                                                "answer": "maybe"} for i in range(4)])
    summary = write_splits(smoke_cfg("data.source=files", f"data.train_path={tmp_path / 'train.jsonl'}",
                                     f"data.test_path={tmp_path / 'test.jsonl'}", "task.answer_type=yes_no"),
                           tmp_path / "a")
    assert summary["test"]["rejected_by_kind"] == {"unreadable_answer": 4}
    # hashed splits: lines that are not JSON have no split; 25 of 35 rows lost counts against all rows
    pool = tmp_path / "pool.jsonl"
    _write_jsonl(pool, _human_rows(10, "p") + ["{not json"] * 25)
    with pytest.raises(DataStop) as stop:
        write_splits(smoke_cfg("data.source=files", f"data.paths=[{pool}]", "task.answer_type=yes_no"), tmp_path / "b")
    assert "25 of 35 rows in all rejected (71.4%)" in str(stop.value) and "most are invalid_json (25)" in str(stop.value)
    assert stop.value.summary["unsplit"]["rejected_by_kind"] == {"invalid_json": 25}
