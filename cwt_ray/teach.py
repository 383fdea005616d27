"""`cwt-ray teach`: rationales from a local teacher model for the train split's questions.

Every train question (data.* as for a run; rationales not needed) gets `teach.num_samples`
rationales from a Hugging Face causal LM folder, generated on a Ray Data actor pool in batches
(one GPU per actor when the cluster has GPUs). vLLM is the engine when it is installed, else HF
`generate`. Each row keeps its provenance (teacher, sample index, finish reason) and whether the
answer it ends with matches the gold answer; the data stage's agreement filter then keeps only
those (Fine-tune-CoT). Output: <run>/teach/rationales.parquet, which `data.train_path` reads as is.
"""
from __future__ import annotations

import importlib.util
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .cluster import actor_gpus, map_on_actor_pool
from .config import ExperimentConfig, StudentConfig, UserError
from .console import get_logger
from .rundir import SUMMARY, atomic_dir, write_json

log = get_logger("teach")

TEACH_SCHEMA = pa.schema([
    ("id", pa.string()), ("question", pa.string()), ("rationale", pa.string()), ("answer", pa.string()),
    ("question_id", pa.string()), ("teacher", pa.string()), ("sample_index", pa.int64()),
    ("finish_reason", pa.string()), ("teacher_answer", pa.string()), ("agrees", pa.bool_()),
    ("engine", pa.string()),
])
STOP = "\nQ:"   # both templates start a question with 'Q:': the teacher writing the next one is done


def render_prompt(teach: dict, question: str) -> str:
    if teach["prompt"] == "zero_shot":
        return teach["zero_shot_template"].format(question=question)
    examples = "".join(teach["example_template"].format(**ex) for ex in teach["few_shot_examples"])
    return teach["few_shot_template"].format(examples=examples, question=question)


def pick_engine(setting: str) -> str:
    if setting == "auto":
        return "vllm" if importlib.util.find_spec("vllm") else "hf"
    if setting == "vllm" and not importlib.util.find_spec("vllm"):
        raise UserError("teach.engine 'vllm' needs the vllm package (pip install vllm), or use 'auto' / 'hf'")
    return setting


class Teacher:
    """Ray Data actor: a batch of questions -> num_samples rationales each."""

    def __init__(self, cfg: dict, model_path: str, engine: str):
        from .extract import get_extractor

        self.teach, self.model_path, self.engine = cfg["teach"], model_path, engine
        self.name = cfg["teach"]["teacher"]
        self.extractor = get_extractor(cfg["task"]["answer_type"], cfg["task"]["answer_template"])
        if engine == "vllm":
            from vllm import LLM

            self.llm = LLM(model=model_path, seed=self.teach["seed"])
        else:
            import torch

            from .student import load_model, load_tokenizer

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
            self.tok = load_tokenizer(model_path)
            self.tok.padding_side = "left"   # generation pads on the left
            self.model = load_model(model_path).to(self.device).eval()

    def _generate_hf(self, prompts: list[str], seed: int) -> list[list[tuple[str, str]]]:
        import torch

        t, n = self.teach, self.teach["num_samples"]
        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        torch.manual_seed(seed)
        sample = t["temperature"] > 0
        with torch.no_grad():
            out = self.model.generate(
                **enc, max_new_tokens=t["max_new_tokens"], do_sample=sample, num_return_sequences=n,
                temperature=t["temperature"] if sample else None, top_p=t["top_p"] if sample else None,
                top_k=None, pad_token_id=self.tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        eos = self.tok.eos_token_id
        results = []
        for seq in new:
            stopped = eos in seq
            text = self.tok.decode(seq[: seq.index(eos)] if stopped else seq, skip_special_tokens=True)
            results.append((text, "stop" if stopped else "length"))
        return [results[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _generate_vllm(self, prompts: list[str], seed: int) -> list[list[tuple[str, str]]]:
        from vllm import SamplingParams

        t = self.teach
        params = SamplingParams(n=t["num_samples"], temperature=t["temperature"], top_p=t["top_p"],
                                max_tokens=t["max_new_tokens"], seed=seed, stop=[STOP])
        return [[(c.text, c.finish_reason) for c in o.outputs] for o in self.llm.generate(prompts, params)]

    def __call__(self, batch: dict) -> dict:
        questions = [str(q) for q in batch["question"]]
        prompts = [render_prompt(self.teach, q) for q in questions]
        # The same batch gets the same samples whatever actor runs it.
        seed = self.teach["seed"] + zlib.crc32(str(batch["id"][0]).encode())
        generate = self._generate_vllm if self.engine == "vllm" else self._generate_hf
        cols = {name: [] for name in TEACH_SCHEMA.names}
        for qid, question, gold, samples in zip(batch["id"], questions, batch["answer"], generate(prompts, seed)):
            for k, (text, finish) in enumerate(samples):
                if STOP in text:
                    text, finish = text[: text.index(STOP)], "stop"
                said = self.extractor.extract(text).answer
                row = {"id": f"{qid}-t{k}", "question": question, "rationale": text.strip(), "answer": str(gold),
                       "question_id": str(qid), "teacher": self.name, "sample_index": k, "finish_reason": finish,
                       "teacher_answer": said, "agrees": self.extractor.is_correct(said, str(gold)), "engine": self.engine}
                for name in cols:
                    cols[name].append(row[name])
        return {name: np.array(values, dtype=object) if name not in ("sample_index", "agrees") else np.array(values)
                for name, values in cols.items()}


def teach(cfg: ExperimentConfig) -> Path:
    """Generate rationales into <run>/teach/ (rationales.parquet, questions.parquet, summary.json)."""
    import ray.data

    from .data import write_train_questions
    from .student import resolve_student

    t = cfg.teach
    if not t.teacher:
        raise UserError("cwt-ray teach needs teach.teacher: a local Hugging Face causal LM folder")
    try:
        model_path = str(resolve_student(StudentConfig(name=t.teacher)))
    except UserError:
        raise UserError(f"teach.teacher: {t.teacher!r} is not a folder with a config.json "
                        f"(a local Hugging Face causal LM)") from None
    engine = pick_engine(t.engine)
    out = cfg.run_dir / "teach"
    with atomic_dir(out) as tmp:
        counts = write_train_questions(cfg, tmp / "questions.parquet")
        generated = map_on_actor_pool(
            ray.data.read_parquet(str(tmp / "questions.parquet")), Teacher,
            {"cfg": cfg.model_dump(mode="json"), "model_path": model_path, "engine": engine},
            rows=counts["questions"], batch_size=t.batch_size, concurrency=t.concurrency,
            cpus_per_actor=t.cpus_per_actor, gpus_per_actor=t.gpus_per_actor, batch_format="numpy")
        finish, agree = Counter(), Counter()
        with pq.ParquetWriter(tmp / "rationales.parquet", TEACH_SCHEMA) as writer:
            for table in generated.iter_batches(batch_size=None, batch_format="pyarrow"):
                table = table.select(TEACH_SCHEMA.names).cast(TEACH_SCHEMA)
                finish.update(table.column("finish_reason").to_pylist())
                agree.update(table.column("agrees").to_pylist())
                writer.write_table(table)
        summary = {"teacher": t.teacher, "engine": engine, "prompt": t.prompt, "num_samples": t.num_samples,
                   "temperature": t.temperature, "max_new_tokens": t.max_new_tokens,
                   "gpus_per_actor": actor_gpus(t.gpus_per_actor),
                   "train_rows_in": counts["rows_in"], "questions": counts["questions"],
                   "questions_rejected": counts["rejected"], "generated": sum(finish.values()),
                   "agreeing": agree[True], "disagreeing": agree[False], "finish_reasons": dict(finish)}
        assert summary["generated"] == summary["questions"] * t.num_samples == summary["agreeing"] + summary["disagreeing"]
        write_json(tmp / SUMMARY, summary)
    log.info(f"[teach] {summary['generated']} rationales for {summary['questions']} questions from {t.teacher} "
             f"({engine}); {summary['agreeing']} agree with the gold answer -> {out / 'rationales.parquet'}")
    return out
