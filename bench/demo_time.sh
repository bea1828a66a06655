#!/bin/bash
# make demo's wall time from a fresh clone (issue 11: within 10 minutes on 2 cores): a new clone of
# this repository's HEAD beside ../shared, a new .venv (pip's own cache as it is) and an empty
# model cache, so the default model is converted again. Run it with nothing else running.
#   bash bench/demo_time.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ln -s "$(cd "$root/.." && pwd)/shared" "$work/shared"
git clone -q "$root" "$work/zoft"
cd "$work/zoft"
start=$(date +%s.%N)
ZOFT_CACHE="$work/cache" make demo > "$work/demo.log" 2>&1 || { tail -5 "$work/demo.log"; exit 1; }
end=$(date +%s.%N)
grep -E "^(test accuracy|run:|[0-9]+ steps)" "$work/demo.log"
python3 - "$start" "$end" runs/*/summary.json <<'PY'
import json, sys
start, end, summary = float(sys.argv[1]), float(sys.argv[2]), json.load(open(sys.argv[3]))
clock = lambda t: f"{int(t // 60)} min {t % 60:.0f} s"  # noqa: E731
total, run = end - start, summary["wall_seconds"]
print(f"make demo from a fresh clone: {clock(total)} in all; set-up and model conversion {clock(total - run)},"
      f" the run {clock(run)} ({summary['steps']} steps at {summary['s_per_step']:.2f} s)")
PY
