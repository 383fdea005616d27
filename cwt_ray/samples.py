"""Training samples: how a record (and its chunks) becomes token ids and labels.

Every sample is a list of text *pieces* (prompt, stage markers, chunks, answer), each tokenized on
its own and concatenated. That makes one guarantee cheap: the token ids of a piece never depend on
its neighbours, so a chunk sample is an exact prefix of the full chunk-wise sequence, and CWT with
one chunk, markers off and the answer kept with the last chunk yields exactly the Std-CoT sample.
Labels are -100 on context pieces: the loss sees only the target.

Sequence layout (markers are text the student learns to write, so each target ends with the
marker of the next stage):
    std_cot: prompt | rationale+"\\n" | answer | eos
    cwt:     prompt M1 | c1 M2 | c2 M3 | ... | cK+"\\n" MA | answer eos
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import ExperimentConfig

IGNORE = -100
# Kinds of target, for loss metrics split by stage: a whole rationale (Std-CoT), a chunk stage, the
# answer stage, a skipped stage (skip text + next marker).
KIND_RATIONALE, KIND_CHUNK, KIND_ANSWER, KIND_SKIP = 1, 2, 3, 4
KIND_NAMES = {KIND_RATIONALE: "rationale", KIND_CHUNK: "chunk", KIND_ANSWER: "answer", KIND_SKIP: "skip"}
ANSWER_STAGE = 0   # stage id of the answer-stage sample; chunk stages are 1..K
FULL = -1          # a Std-CoT sample
SINGLE_PASS = -2   # a CWT rationale with all its stages in one sequence


@dataclass
class Sample:
    rationale_id: str
    stage: int
    input_ids: list[int]
    labels: list[int]
    # Target group of each token (1..G; 0 where unsupervised). A group is what the `chunk` loss
    # normaliser averages over: one per sample, except single-pass samples (one per stage).
    groups: list[int] | None = None
    # What each target group is (KIND_*), for per-stage loss metrics; index 0 is unused.
    group_kinds: list[int] | None = None

    @property
    def supervised(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)

    @property
    def num_groups(self) -> int:
        return len({g for g in self.groups if g}) if self.groups else 1

    def token_groups(self) -> list[int]:
        return self.groups if self.groups else [int(t != IGNORE) for t in self.labels]

    def token_kinds(self) -> list[int]:
        kinds = self.group_kinds or [0, KIND_RATIONALE]
        return [kinds[g] for g in self.token_groups()]


class SampleBuilder:
    def __init__(self, tokenizer, cfg: ExperimentConfig):
        self.tok = tokenizer
        self.prompt_template = cfg.prompt.template
        self.answer_template = cfg.task.answer_template
        self.chunk_marker = cfg.stages.chunk_marker
        self.answer_marker = cfg.stages.answer_marker
        self.answer_stage = cfg.stages.answer_stage
        self.max_length = cfg.student.max_length
        self.skip_style = cfg.stt.style
        self.skip_text = cfg.stt.skip_text
        self._cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"] if text else []
        return self._cache[text]

    def marker(self, stage: int) -> str:
        return self.chunk_marker.format(stage=stage)

    def prompt(self, question: str) -> str:
        return self.prompt_template.format(question=question)

    def answer(self, answer: str) -> str:
        return self.answer_template.format(answer=answer)

    def _sample(self, rid: str, stage: int, pieces: list[tuple[str, bool]], eos: bool) -> Sample:
        input_ids, labels = [], []
        for text, is_target in pieces:
            ids = self.ids(text)
            input_ids += ids
            labels += ids if is_target else [IGNORE] * len(ids)
        if eos:
            input_ids.append(self.tok.eos_token_id)
            labels.append(self.tok.eos_token_id)
        return Sample(rid, stage, input_ids, labels)

    def std_cot(self, record: dict) -> list[Sample]:
        pieces = [(self.prompt(record["question"]), False), (record["rationale"] + "\n", True),
                  (self.answer(record["answer"]), True)]
        return [self._sample(record["id"], FULL, pieces, eos=True)]

    def cwt(self, record: dict, chunks: list[str], stages: list[int] | None = None) -> list[Sample]:
        """One sample per chunk stage, plus the answer stage unless it rides with the last chunk.
        `stages` numbers the markers (default 1..K); skip data with jumped indices passes its own."""
        k = len(chunks)
        stages = stages or list(range(1, k + 1))
        texts = list(chunks[:-1]) + [chunks[-1] + "\n"]
        context: list[tuple[str, bool]] = [(self.prompt(record["question"]), False), (self.marker(stages[0]), False)]
        samples = []
        for i, chunk in enumerate(texts, start=1):
            last = i == k
            next_marker = self.answer_marker if last else self.marker(stages[i])
            target = [(chunk, True), (next_marker, True)]
            if last and self.answer_stage == "with_last_chunk":
                target.append((self.answer(record["answer"]), True))
            sample = self._sample(record["id"], i, context + target, eos=last and self.answer_stage == "with_last_chunk")
            sample.group_kinds = [0, KIND_SKIP if chunk.rstrip("\n") == self.skip_text else KIND_CHUNK]
            samples.append(sample)
            context = context + [(chunk, False), (next_marker, False)]
        if self.answer_stage == "separate":
            sample = self._sample(record["id"], ANSWER_STAGE, context + [(self.answer(record["answer"]), True)], eos=True)
            sample.group_kinds = [0, KIND_ANSWER]
            samples.append(sample)
        return samples

    def stage_sequence(self, record: dict, chunks: list[str], stages: list[int] | None = None) -> tuple[list[int], list[int]]:
        """The full chunk-wise sequence and, for each token, the chunk stage whose target it belongs
        to (1..K by position; 0 for context, K+1 for the answer stage). Token for token the
        concatenation of the CWT samples' pieces, so a chunk's loss here equals its loss in its own sample."""
        k = len(chunks)
        labels = stages or list(range(1, k + 1))
        texts = list(chunks[:-1]) + [chunks[-1] + "\n"]
        pieces = [(self.prompt(record["question"]), 0), (self.marker(labels[0]), 0)]
        for i, chunk in enumerate(texts, start=1):
            pieces += [(chunk, i), (self.answer_marker if i == k else self.marker(labels[i]), i)]
        # With the answer kept with the last chunk, the answer belongs to chunk K's target.
        answer_stage = k if self.answer_stage == "with_last_chunk" else k + 1
        pieces.append((self.answer(record["answer"]), answer_stage))
        ids, token_stages = [], []
        for text, stage in pieces:
            piece = self.ids(text)
            ids += piece
            token_stages += [stage] * len(piece)
        return ids + [self.tok.eos_token_id], token_stages + [answer_stage]

    def skip_chunks(self, chunks: list[str], skipped: list[int]) -> tuple[list[str], list[int]]:
        """The chunk texts and stage numbers of a rationale with the (1-based) stages `skipped`
        left out: 'marker' keeps the stage's marker and writes skip_text in place of the chunk,
        'jump' drops the stage, so the next marker's index jumps."""
        gone = set(skipped)
        if self.skip_style == "marker":
            return [self.skip_text if i in gone else c for i, c in enumerate(chunks, start=1)], list(range(1, len(chunks) + 1))
        kept = [(i, c) for i, c in enumerate(chunks, start=1) if i not in gone]
        return [c for _, c in kept], [i for i, _ in kept]

    def single_pass(self, record: dict, chunks: list[str], stages: list[int] | None = None) -> Sample:
        """All stages of a rationale in one sequence, each stage its own target group."""
        ids, token_stages = self.stage_sequence(record, chunks, stages)
        labels = [t if st else IGNORE for t, st in zip(ids, token_stages)]
        kinds = [0] + [KIND_SKIP if c == self.skip_text else KIND_CHUNK for c in chunks]
        if self.answer_stage == "separate":
            kinds.append(KIND_ANSWER)
        return Sample(record["id"], SINGLE_PASS, ids, labels, token_stages, kinds)

    def inference_prefix(self, question: str, method: str) -> list[int]:
        """Token ids a student of `method` continues from at evaluation (same pieces as training)."""
        ids = self.ids(self.prompt(question))
        return ids + self.ids(self.marker(1)) if method in ("cwt", "stt") else list(ids)


def build_samples(builder: SampleBuilder, method: str, records: list[dict], chunks_by_id: dict[str, list[str]],
                  schedule: str = "shuffle", skips_by_id: dict[str, list[list[int]]] | None = None,
                  chunk_mix: float = 0.0, seed: int = 0):
    """All samples of a method, and how many were dropped for exceeding student.max_length.

    stt: every skip sequence of a rationale (`skips_by_id`: lists of skipped stages) gives the
    samples CWT would give for that sequence, plus a seeded `chunk_mix` fraction of the plain
    CWT samples, so the student keeps writing whole rationales where nothing can be skipped."""
    import random

    def chunk_samples(record, chunks, stages=None):
        if schedule == "single_pass":
            return [builder.single_pass(record, chunks, stages)]
        return builder.cwt(record, chunks, stages)

    samples: list[Sample] = []
    mixed: list[Sample] = []
    for record in records:
        if method == "std_cot":
            samples += builder.std_cot(record)
        elif method == "cwt":
            samples += chunk_samples(record, chunks_by_id[record["id"]])
        else:
            chunks = chunks_by_id[record["id"]]
            for skipped in (skips_by_id or {}).get(record["id"], []):
                samples += chunk_samples(record, *builder.skip_chunks(chunks, skipped))
            mixed += chunk_samples(record, chunks)
    if mixed and chunk_mix > 0:
        rng = random.Random(seed)
        samples += rng.sample(mixed, round(chunk_mix * len(mixed)))
    kept = [s for s in samples if len(s.input_ids) <= builder.max_length and s.supervised > 0]
    return kept, len(samples) - len(kept)
