#!/usr/bin/env bash
# Copy a finished sweep's readable artefacts (no weights, no Ray/Tune state) under docs/results/.
#   publish_sweep.sh runs/<sweep> docs/results/<dest> [console.log]
set -euo pipefail
src=$1; dst=$2; log=${3:-}
mkdir -p "$dst"
cp "$src"/{report.md,report.html,sweep.json,trials.json,best_config.yaml} "$dst"/
cp "$src"/*.png "$dst"/
[ -n "$log" ] && cp "$log" "$dst"/sweep_console.log
for t in "$src"/trials/*/; do
  id=$(basename "$t"); d="$dst/trials/$id"; mkdir -p "$d"
  cp "$t"/{config.yaml,console.log,stages.json} "$d"/
  [ -d "$t/evals" ] && cp -r "$t/evals" "$d"/
  for s in "$t"/students/*/; do
    m=$(basename "$s"); mkdir -p "$d/students/$m"
    cp "$s"/{train_log.jsonl,train_metrics.json} "$d/students/$m"/ 2>/dev/null || true
    cp "$s"/*_student.json "$d/students/$m"/ 2>/dev/null || true
  done
  [ -f "$t/chunks/train/view.html" ] && cp "$t/chunks/train/view.html" "$d/chunk_view.html"
  [ -f "$t/skips/train/summary.json" ] && cp "$t/skips/train/summary.json" "$d/skip_summary.json"
  [ -f "$t/chunks/train/summary.json" ] && cp "$t/chunks/train/summary.json" "$d/chunk_summary.json"
done
for t in "$src"/test/*/; do
  id=$(basename "$t"); d="$dst/test/$id"; mkdir -p "$d"
  cp "$t"/config.yaml "$d"/; cp -r "$t"/evals "$d"/
  cp -r "$dst/trials/$id/students" "$d"/        # the trained students' logs (test/<id>/students links to the trial's)
done
