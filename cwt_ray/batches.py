"""Which samples an optimizer step trains on, and how a forward pass lays them out.

Three layers, each a pure function of its inputs, so every worker computes the same plan without
communicating:
    epoch_steps    the global batch of each optimizer step of an epoch (a seeded random draw)
    worker_share   a worker's part of a step; micro_batches cuts it into forward passes
    collate        one forward pass's samples as tensors: padded rows, or packed rows

Packing (the default): a forward pass's samples are laid end to end into as few rows of at most
`pack_tokens` tokens as they fit in, with position ids restarting at 0 for each sample and no
attention mask. transformers then builds a block-diagonal causal mask from the position ids
(`masking_utils.find_packed_sequence_indices`), so no sample attends to another: the loss and
gradients are those of the padded layout (tests/test_packing.py), without computing padding.

Micro-batching means the same thing packed or not: `micro_batch_size` samples per forward pass.
Packing changes only how those samples are laid into rows, so memory stays bounded by the
micro-batch, every rank runs the same number of forward passes per step (FSDP needs that), and
packing on or off trains on exactly the same samples in each step.
"""
from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, fields

import torch

from .samples import IGNORE, Sample


def epoch_steps(samples: list[Sample], batch_size: int, seed: int, epoch: int, schedule: str,
                bucket_factor: int = 0) -> list[list[int]]:
    """Sample indices of each optimizer step of one epoch. Every worker computes the same list.

    Seeded shuffle; with `per_rationale`, rounds over the rationales (round r holds each
    rationale's r-th stage, stages in a random order), so a step holds at most one chunk of a
    rationale (except where a step straddles two rounds). A step is a uniform random draw: nothing
    sorts samples across steps by their length, which would put one template's look-alike
    rationales together (gsm_symbolic's lengths follow its templates) and bias each step.
    `bucket_factor` > 0 brings back length bucketing (sort windows of bucket_factor x batch_size
    samples by length, cut steps, shuffle the steps) for comparison with older runs.
    The tail that does not fill a step is dropped: a partial step would have a different
    normaliser and could not split evenly over workers; its samples come back in other epochs.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    if schedule == "per_rationale":
        by_rationale: dict[str, list[int]] = {}
        for i, s in enumerate(samples):
            by_rationale.setdefault(s.rationale_id, []).append(i)
        rationales = sorted(by_rationale)
        rng.shuffle(rationales)
        for r in rationales:
            rng.shuffle(by_rationale[r])
        depth = max(len(v) for v in by_rationale.values())
        runs = [[by_rationale[r][k] for r in rationales if k < len(by_rationale[r])] for k in range(depth)]
    else:
        order = list(range(len(samples)))
        rng.shuffle(order)
        runs = [order]
    if bucket_factor:
        window = batch_size * bucket_factor
        runs = [[i for w in range(0, len(run), window) for i in sorted(run[w:w + window], key=lambda i: len(samples[i].input_ids))]
                for run in runs]
    order = [i for run in runs for i in run]
    steps = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    if bucket_factor:
        rng.shuffle(steps)
    return steps


def worker_share(step: list[int], rank: int, world: int) -> list[int]:
    per = len(step) // world
    return step[rank * per:(rank + 1) * per]


def micro_batches(share: list[int], samples: list[Sample], micro: int) -> list[list[int]]:
    """Group the worker's share by length before cutting micro-batches: less padding, same loss
    (the step's loss is a sum, so the order inside a step does not change it)."""
    ordered = sorted(share, key=lambda i: len(samples[i].input_ids))
    return [ordered[i:i + micro] for i in range(0, len(ordered), micro)]


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` laid into rows of at most `capacity` tokens, balanced: for the fewest
    rows the tokens could fill, then one more at a time until they fit, each sample (longest
    first) goes into the currently shortest row. The longest row sets the padded width, so
    balanced rows leave little padding."""
    if not lengths:
        return []
    capacity = max(capacity, max(lengths))   # a sample longer than a row gets a row of its own
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for n_rows in range(max(1, math.ceil(sum(lengths) / capacity)), len(lengths) + 1):
        heap = [(0, r) for r in range(n_rows)]
        rows: list[list[int]] = [[] for _ in range(n_rows)]
        for i in order:
            used, r = heapq.heappop(heap)
            rows[r].append(i)
            heapq.heappush(heap, (used + lengths[i], r))
        if max(used for used, _ in heap) <= capacity:
            return [row for row in rows if row]
    raise AssertionError("one sample per row always fits")


@dataclass
class Batch:
    """One forward pass's samples as [rows, width] tensors. `sample` is each token's sample index
    in the micro-batch (-1 on padding): what the `sample` and `chunk` normalisers average over
    once a row holds several samples. Padded layout: an attention mask, no position ids; packed:
    position ids restarting at 0 per sample, no mask (transformers derives the block mask)."""
    input_ids: torch.Tensor
    labels: torch.Tensor
    groups: torch.Tensor
    sample: torch.Tensor
    kinds: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    num_samples: int

    def to(self, device) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})

    @property
    def real_tokens(self) -> int:
        return int((self.sample >= 0).sum())

    @property
    def computed_tokens(self) -> int:
        return self.input_ids.numel()


def collate(batch: list[Sample], pad_id: int, pack_tokens: int | None = None) -> Batch:
    """Padded (`pack_tokens` None: one sample per row) or packed rows. Padding is on the right in
    both (left-padded training batches gave NaN losses under bf16 SDPA on an H200)."""
    rows = [[i] for i in range(len(batch))] if pack_tokens is None else \
        pack_rows([len(s.input_ids) for s in batch], pack_tokens)
    width = max(sum(len(batch[i].input_ids) for i in row) for row in rows)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    groups = torch.zeros(shape, dtype=torch.long)
    sample = torch.full(shape, -1, dtype=torch.long)
    kinds = torch.zeros(shape, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            s, n = batch[i], len(batch[i].input_ids)
            ids[r, start:start + n] = torch.tensor(s.input_ids)
            labels[r, start:start + n] = torch.tensor(s.labels)
            groups[r, start:start + n] = torch.tensor(s.token_groups())
            kinds[r, start:start + n] = torch.tensor(s.token_kinds())
            sample[r, start:start + n] = i
            positions[r, start:start + n] = torch.arange(n)
            labels[r, start] = IGNORE   # nothing in a sample predicts its first token (packed: the previous sample would)
            start += n
        # Padding gets positions 0.. of its own, so transformers sees it as one more packed
        # sequence: no real token attends to it (it comes last) and it attends to none of them.
        positions[r, start:] = torch.arange(width - start)
    if pack_tokens is None:
        return Batch(ids, labels, groups, sample, kinds, (sample >= 0).long(), None, len(batch))
    return Batch(ids, labels, groups, sample, kinds, None, positions, len(batch))
