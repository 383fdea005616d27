#!/usr/bin/env bash
# Render a chunk view with headless Chromium (Debian's package) and save a screenshot.
#   bash docs/render_view.sh runs/quickstart/chunks/train/view.html /tmp/view.png
set -euo pipefail
page=$(realpath "$1"); out=${2:-view.png}
command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }
profile=$(mktemp -d)
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --window-size=1200,1400 \
  --screenshot="$out" "file://$page" 2>/dev/null
rm -rf "$profile"
test -s "$out" && echo "rendered $page -> $out"
