#!/usr/bin/env bash
# Run several experiment configs side by side on one machine, each in its own process with its
# own embedded Ray cluster, and wait for all of them (or a deadline).
#
#   bash jobs/gpu_study.sh [--serial] [--deadline SECONDS] [--logs DIR] CONFIG... [-- OVERRIDE...]
#
# --serial: one run at a time, in the order given, until the deadline: speeds and MFU are then
# measured alone, not under sharing (use it for timings and A/B pairs).
# Why side by side otherwise: a 135M student leaves an H200 mostly idle (kernel-launch bound), so five runs
# sharing one GPU finish far sooner than five in a row. Their training and generation times are
# then measured under sharing; the study labels them so and takes speed ratios from benchmarks
# that run alone (benchmarks/latency.py, benchmarks/train_throughput.py).
# Each run keeps its finished stages: running the script again resumes whatever a deadline cut.
set -uo pipefail
deadline=0; logs=logs/study; configs=(); overrides=(); serial=0
while [ $# -gt 0 ]; do
  case "$1" in
    --deadline) deadline=$2; shift 2;;
    --serial) serial=1; shift;;
    --logs) logs=$2; shift 2;;
    --) shift; overrides=("$@"); break;;
    *) configs+=("$1"); shift;;
  esac
done
[ ${#configs[@]} -gt 0 ] || { echo "usage: $0 [--deadline S] [--logs DIR] CONFIG... [-- OVERRIDE...]" >&2; exit 2; }
mkdir -p "$logs"
py=${PYTHON:-python3}
start=$(date +%s)
for c in "${configs[@]}"; do
  name=$(basename "$c" .yaml)
  # The full log to a file; to the console only our one-line events, prefixed with the run's name.
  { $py -m cwt_ray run "$c" "${overrides[@]}" 2>&1; echo "exit $?"; } | tee "$logs/$name.log" \
    | grep --line-buffered -E '^\[(data|chunk|skip|train|eval|report)|error|exit [0-9]' | sed -u "s/^/[$name] /" &
  if [ "$serial" -eq 1 ]; then   # wait for this run (or the deadline) before starting the next
    while [ -n "$(jobs -r)" ]; do
      if [ "$deadline" -gt 0 ] && [ $(( $(date +%s) - start )) -ge "$deadline" ]; then break 2; fi
      sleep 5
    done
  else
    sleep 2   # staggered starts: the Ray clusters come up one after the other
  fi
done
while [ -n "$(jobs -r)" ]; do
  if [ "$deadline" -gt 0 ] && [ $(( $(date +%s) - start )) -ge "$deadline" ]; then
    echo "[study] deadline of ${deadline}s reached: interrupting the runs (finished stages are kept)"
    for c in "${configs[@]}"; do pkill -INT -f -- "-m cwt_ray run $c" ; done
    sleep 15
    for c in "${configs[@]}"; do pkill -KILL -f -- "-m cwt_ray run $c" ; done
    break
  fi
  sleep 5
done
wait
for c in "${configs[@]}"; do
  name=$(basename "$c" .yaml)
  if [ -f "$logs/$name.log" ]; then echo "[study] $name: $(tail -1 "$logs/$name.log")"; else echo "[study] $name: not run"; fi
done
