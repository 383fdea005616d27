import itertools
import random

import pytest

from cwt_ray.chunk import average_chunks, balanced_partition, step_boundaries
from cwt_ray.config import ChunkConfig

GSM = ("Let's solve this step by step:\n\n1. Initial amounts:\n   • John has 35 apple\n"
       "   • He has 3 times as many kiwi, so 35 × 3 = 105 kiwi. That is 3.5 times less apple.\n\n"
       "2. Bought at store: 93 apple.\nTherefore, John now has 288 items in total.")


def _steps(text, unit):
    ends = step_boundaries(text, unit)
    return [text[a:b] for a, b in zip([0] + ends[:-1], ends)]


@pytest.mark.parametrize("unit", ["line", "sentence"])
def test_steps_tile_the_rationale(unit):
    steps = _steps(GSM, unit)
    assert "".join(steps) == GSM
    assert all(steps)


def test_sentences_keep_list_markers_and_decimals():
    steps = _steps(GSM, "sentence")
    assert "1. Initial amounts:\n" in steps            # '1.' is a list marker, not a sentence end
    assert not any(s.endswith("3.") for s in steps)     # '3.5' is a number
    assert any(s.endswith("kiwi. ") for s in steps)     # a real sentence end inside a line


def _brute_force(lengths, k):
    n, mean = len(lengths), sum(lengths) / k
    best = None
    for cuts in itertools.combinations(range(1, n), k - 1):
        ends = list(cuts) + [n]
        starts = [0] + list(cuts)
        cost = sum((sum(lengths[a:b]) - mean) ** 2 for a, b in zip(starts, ends))
        if best is None or cost < best[0] - 1e-9:
            best = (cost, ends)
    return best[0]


def test_balanced_partition_is_optimal():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 30) for _ in range(rng.randint(1, 9))]
        k = rng.randint(1, len(lengths))
        ends = balanced_partition(lengths, k)
        assert len(ends) == k and ends[-1] == len(lengths) and ends == sorted(set(ends))
        starts = [0] + ends[:-1]
        mean = sum(lengths) / k
        cost = sum((sum(lengths[a:b]) - mean) ** 2 for a, b in zip(starts, ends))
        assert cost == pytest.approx(_brute_force(lengths, k))


def test_average_chunks_lossless_and_bounded():
    words = lambda s: len(s.split())  # noqa: E731  (any token counter works)
    for k in (1, 2, 3, 50):
        out = average_chunks(GSM, words, ChunkConfig(num_chunks=k))
        assert "".join(out["chunks"]) == GSM
        assert out["boundaries"][0] == 0 and out["boundaries"][-1] == len(GSM)
        assert out["num_chunks"] == min(k, len(_steps(GSM, "sentence")))
        assert [GSM[a:b] for a, b in zip(out["boundaries"], out["boundaries"][1:])] == out["chunks"]


def test_target_chunk_tokens_derives_k():
    words = lambda s: len(s.split())  # noqa: E731
    total = words(GSM)
    out = average_chunks(GSM, words, ChunkConfig(num_chunks=10, target_chunk_tokens=total // 2 + 1))
    assert out["num_chunks"] == 2
