"""Decoding: greedy generation for every method, with skip-thinking's decision made visible.

One code path serves Std-CoT (prompt -> whole rationale), chunk-wise (prompt + first stage marker
-> chunk after chunk) and skip-thinking decoding. A skip-thinking student writes a stage marker and
then either the chunk or `stt.skip_text`: the token after a chunk marker is the *decision point*.
`SkipDecision` watches every decision point and records P(skip) (the probability of skip_text's
first token there). With `skip_confidence=None` it only watches, so decoding is exactly the
chunk-wise decoder's; with a threshold it skips iff P(skip) >= threshold and otherwise forbids the
skip, which trades accuracy for speed and is what the sweep searches.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Optional

from transformers import LogitsProcessor

MAX_STAGES = 64   # config.ChunkConfig.num_chunks is at most 64


class SkipDecision(LogitsProcessor):
    def __init__(self, marker_ids: dict[int, list[int]], skip_token: int, threshold: Optional[float], batch: int):
        self.by_len: dict[int, dict[tuple[int, ...], int]] = {}
        for stage, ids in marker_ids.items():
            self.by_len.setdefault(len(ids), {})[tuple(ids)] = stage
        self.skip_token = skip_token
        self.threshold = threshold
        self.decisions: list[list[dict]] = [[] for _ in range(batch)]

    def _stage_at_end(self, row: list[int]) -> Optional[int]:
        for n, table in self.by_len.items():
            stage = table.get(tuple(row[-n:]))
            if stage is not None:
                return stage
        return None

    def __call__(self, input_ids, scores):
        import torch

        tails = input_ids[:, -max(self.by_len):].tolist()
        for row, tail in enumerate(tails):
            stage = self._stage_at_end(tail)
            if stage is None:
                continue
            p_skip = torch.softmax(scores[row].float(), -1)[self.skip_token].item()
            if self.threshold is None:
                skip = int(scores[row].argmax()) == self.skip_token
            else:
                skip = p_skip >= self.threshold
                keep = scores[row, self.skip_token].clone()
                if skip:   # force the skip: only its first token remains possible
                    scores[row] = float("-inf")
                    scores[row, self.skip_token] = keep
                else:
                    scores[row, self.skip_token] = float("-inf")
            self.decisions[row].append({"stage": stage, "p_skip": p_skip, "skip": skip})
        return scores


@dataclass
class Stage:
    stage: int
    text: str
    skipped: bool


@dataclass
class Parsed:
    stages: list[Stage] = field(default_factory=list)
    answer: str = ""          # what follows the answer marker (or everything, without markers)
    content: str = ""         # the text without markers or skip text: what extractors read

    @property
    def skipped(self) -> list[int]:
        """Stages the student skipped: written as skip_text, or jumped over in the numbering."""
        out = [s.stage for s in self.stages if s.skipped]
        numbers = [s.stage for s in self.stages]
        for a, b in zip(numbers, numbers[1:]):
            out += list(range(a + 1, b))
        return sorted(set(out))


def parse_output(text: str, chunk_marker: str, answer_marker: str, skip_text: str) -> Parsed:
    """Split generated text into stages (the text starts inside stage 1: its marker was in the
    prefix), skipped stages, and the answer."""
    if not chunk_marker:
        return Parsed(answer=text, content=text)
    pattern = re.escape(chunk_marker).replace(re.escape("{stage}"), r"(\d+)")
    body, sep, answer = text.partition(answer_marker) if answer_marker else (text, "", "")
    pieces = re.split(pattern, body)
    stages = [Stage(1, pieces[0], False)]
    for number, piece in zip(pieces[1::2], pieces[2::2]):
        stages.append(Stage(int(number), piece, False))
    skip = skip_text.strip()
    for s in stages:
        s.skipped = bool(skip) and s.text.strip() == skip
    content = "".join(s.text for s in stages if not s.skipped) + ("\n" if sep else "") + answer
    return Parsed(stages, answer if sep else "", content)


def decision_processor(tok, builder, skip_confidence: Optional[float], skippable: str, batch: int) -> SkipDecision:
    first = 1 if skippable == "any" else 2
    markers = {i: builder.ids(builder.marker(i)) for i in range(first, MAX_STAGES + 1)}
    return SkipDecision(markers, builder.ids(builder.skip_text)[0], skip_confidence, batch)


def generate(model, tok, prefixes: list[list[int]], max_new_tokens: int, processor: Optional[SkipDecision] = None):
    """Greedy continuation of each prefix (left-padded for generation only). Returns the new ids of
    each row cut after its first eos, and the wall time."""
    import torch
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    width = max(len(p) for p in prefixes)
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prefixes], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prefixes], device=device)
    extra = {"logits_processor": LogitsProcessorList([processor])} if processor is not None else {}
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=tok.eos_token_id, pad_token_id=pad, **extra)
    wall = time.perf_counter() - t0
    new = []
    for row in out[:, width:].tolist():
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id) + 1]
        new.append(row)
    return new, wall


def answer_question(student_dir: str, question: str, max_new_tokens: int = 256,
                    skip_confidence: Optional[float] = None) -> dict:
    """Answer one question with any saved student (its cwt_student.json says how to talk to it):
    the reasoning it wrote stage by stage, what it skipped (with P(skip) at each decision), the
    answer, tokens and latency. `cwt-ray generate` prints this."""
    import torch

    from .config import ExperimentConfig
    from .extract import get_extractor
    from .samples import SampleBuilder
    from .student import load_model, load_tokenizer, read_student_json

    info = read_student_json(student_dir)
    cfg = ExperimentConfig.model_validate({
        "name": "generate", "task": {"answer_type": info["answer_type"], "answer_template": info["answer_template"]},
        "prompt": {"template": info["prompt_template"]},
        "stages": {"chunk_marker": info["chunk_marker"], "answer_marker": info["answer_marker"],
                   "answer_stage": info["answer_stage"]},
        "stt": {"skip_text": info.get("skip_text", "<skip> "), "style": info.get("skip_style", "marker"),
                "skippable": info.get("skippable", "middle")}})
    method = info["method"]
    tok = load_tokenizer(student_dir)
    model = load_model(student_dir).to("cuda" if torch.cuda.is_available() else "cpu").eval()
    builder = SampleBuilder(tok, cfg)
    processor = None
    if method == "stt" and cfg.stt.style == "marker":
        processor = decision_processor(tok, builder, skip_confidence, cfg.stt.skippable, 1)
    new, wall = generate(model, tok, [builder.inference_prefix(question, method)], max_new_tokens, processor)
    text = tok.decode(new[0], skip_special_tokens=True)
    parsed = parse_output(text, builder.chunk_marker if method != "std_cot" else "", builder.answer_marker,
                          builder.skip_text)
    got = get_extractor(cfg.task.answer_type, cfg.task.answer_template).extract(parsed.content)
    return {"method": method, "output": text, "stages": [s.__dict__ for s in parsed.stages],
            "skipped": parsed.skipped, "decisions": processor.decisions[0] if processor else [],
            "answer": got.answer, "tokens_generated": len(new[0]),
            "complete": bool(new[0]) and new[0][-1] == tok.eos_token_id, "latency_s": wall}


def format_answer(result: dict) -> str:
    lines = [f"method: {result['method']}"]
    if result["method"] == "std_cot":
        lines.append(result["output"].rstrip())
    else:
        for s in result["stages"]:
            lines.append(f"  [{s['stage']}] " + ("(skipped)" if s["skipped"] else s["text"].strip()))
        jumped = [i for i in result["skipped"] if i not in {s["stage"] for s in result["stages"]}]
        if jumped:
            lines.append(f"  jumped over stage(s) {jumped}")
    if result["decisions"]:
        lines.append("skip decisions: " + ", ".join(f"stage {d['stage']} P(skip)={d['p_skip']:.2f} -> "
                                                     f"{'skip' if d['skip'] else 'write'}" for d in result["decisions"]))
    lines.append(f"answer: {result['answer']}  ({result['tokens_generated']} tokens, {result['latency_s']:.2f}s, "
                 f"{'complete' if result['complete'] else 'cut at max_new_tokens'})")
    return "\n".join(lines)


def decisions_json(decisions: list[dict]) -> str:
    return json.dumps([{**d, "p_skip": round(d["p_skip"], 4)} for d in decisions])
