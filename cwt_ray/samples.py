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

    @property
    def supervised(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)

    @property
    def num_groups(self) -> int:
        return len({g for g in self.groups if g}) if self.groups else 1

    def token_groups(self) -> list[int]:
        return self.groups if self.groups else [int(t != IGNORE) for t in self.labels]


class SampleBuilder:
    def __init__(self, tokenizer, cfg: ExperimentConfig):
        self.tok = tokenizer
        self.prompt_template = cfg.prompt.template
        self.answer_template = cfg.task.answer_template
        self.chunk_marker = cfg.stages.chunk_marker
        self.answer_marker = cfg.stages.answer_marker
        self.answer_stage = cfg.stages.answer_stage
        self.max_length = cfg.student.max_length
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

    def cwt(self, record: dict, chunks: list[str]) -> list[Sample]:
        """One sample per chunk stage, plus the answer stage unless it rides with the last chunk."""
        k = len(chunks)
        texts = list(chunks[:-1]) + [chunks[-1] + "\n"]
        context: list[tuple[str, bool]] = [(self.prompt(record["question"]), False), (self.marker(1), False)]
        samples = []
        for i, chunk in enumerate(texts, start=1):
            last = i == k
            next_marker = self.answer_marker if last else self.marker(i + 1)
            target = [(chunk, True), (next_marker, True)]
            if last and self.answer_stage == "with_last_chunk":
                target.append((self.answer(record["answer"]), True))
            samples.append(self._sample(record["id"], i, context + target, eos=last and self.answer_stage == "with_last_chunk"))
            context = context + [(chunk, False), (next_marker, False)]
        if self.answer_stage == "separate":
            samples.append(self._sample(record["id"], ANSWER_STAGE, context + [(self.answer(record["answer"]), True)], eos=True))
        return samples

    def stage_sequence(self, record: dict, chunks: list[str]) -> tuple[list[int], list[int]]:
        """The full chunk-wise sequence and, for each token, the chunk stage whose target it belongs
        to (1..K; 0 for context, K+1 for the answer stage). Token for token the concatenation of
        the CWT samples' pieces, so a chunk's loss here equals its loss in its own sample."""
        k = len(chunks)
        texts = list(chunks[:-1]) + [chunks[-1] + "\n"]
        pieces = [(self.prompt(record["question"]), 0), (self.marker(1), 0)]
        for i, chunk in enumerate(texts, start=1):
            pieces += [(chunk, i), (self.answer_marker if i == k else self.marker(i + 1), i)]
        # With the answer kept with the last chunk, the answer belongs to chunk K's target.
        answer_stage = k if self.answer_stage == "with_last_chunk" else k + 1
        pieces.append((self.answer(record["answer"]), answer_stage))
        ids, stages = [], []
        for text, stage in pieces:
            piece = self.ids(text)
            ids += piece
            stages += [stage] * len(piece)
        return ids + [self.tok.eos_token_id], stages + [answer_stage]

    def single_pass(self, record: dict, chunks: list[str]) -> Sample:
        """All stages of a rationale in one sequence, each stage its own target group."""
        ids, stages = self.stage_sequence(record, chunks)
        labels = [t if st else IGNORE for t, st in zip(ids, stages)]
        return Sample(record["id"], SINGLE_PASS, ids, labels, stages)

    def inference_prefix(self, question: str, method: str) -> list[int]:
        """Token ids a student of `method` continues from at evaluation (same pieces as training)."""
        ids = self.ids(self.prompt(question))
        return ids + self.ids(self.marker(1)) if method == "cwt" else list(ids)


def build_samples(builder: SampleBuilder, method: str, records: list[dict], chunks_by_id: dict[str, list[str]],
                  schedule: str = "shuffle"):
    """All samples of a method, and how many were dropped for exceeding student.max_length."""
    samples: list[Sample] = []
    for record in records:
        if method == "std_cot":
            samples += builder.std_cot(record)
        elif schedule == "single_pass":
            samples.append(builder.single_pass(record, chunks_by_id[record["id"]]))
        else:
            samples += builder.cwt(record, chunks_by_id[record["id"]])
    kept = [s for s in samples if len(s.input_ids) <= builder.max_length and s.supervised > 0]
    return kept, len(samples) - len(kept)
