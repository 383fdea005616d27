#!/usr/bin/env bash
# The CPU reduced protocol of the study (issue 9), end to end, one run after another: every table
# row of docs/results.md's "bf16 reduced protocol" section, then the table itself.
#
#   bash jobs/study_cpu_reduced.sh            # or: make study-cpu-reduced
#
# Each step keeps its finished stages, so running it again resumes where it stopped and redoes
# nothing that is done. About 2 h 30 min on a 2-core CPU with native bf16 (AVX512-BF16); the
# runs must not share the machine with other work if their train/generation times are to mean
# anything. Output: runs/cpu-reduced*/ and runs/study-cpu-reduced/{table.md,loss_curves.png}.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${VENV:-.venv}/bin
x=configs/experiments
$bin/cwt-ray run $x/cpu_reduced.yaml                        # Std-CoT, CWT average (shuffled), STT on it
$bin/cwt-ray run $x/cpu_reduced_single_pass.yaml            # CWT average, single-pass schedule
$bin/cwt-ray run $x/cpu_reduced_semantic_single_pass.yaml   # CWT semantic, single-pass
$bin/cwt-ray run $x/cpu_reduced_sbc_single_pass.yaml        # CWT search-based (SBC), single-pass
$bin/cwt-ray sweep $x/cpu_reduced_sweep_chunking.yaml       # heuristic chosen on validation
# STT on the chosen CWT variant, its skip settings chosen on validation too.
heuristic=$($bin/python -c "import yaml; print(yaml.safe_load(open('runs/cpu-reduced-sweep-chunking/best_config.yaml'))['chunk']['heuristic'])")
$bin/cwt-ray sweep $x/cpu_reduced_sweep_skip.yaml overrides.chunk.heuristic=$heuristic
mkdir -p runs/study-cpu-reduced
$bin/python benchmarks/study_table.py runs/cpu-reduced runs/cpu-reduced-single-pass \
    runs/cpu-reduced-semantic-single-pass runs/cpu-reduced-sbc-single-pass runs/cpu-reduced-sweep-chunking/test/* runs/cpu-reduced-sweep-skip/test/* \
    --plot runs/study-cpu-reduced/loss_curves.png | tee runs/study-cpu-reduced/table.md
