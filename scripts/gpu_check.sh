#!/usr/bin/env bash
# The GPU check for a lent device machine: the seed preset's 8 cells, short, with
# allocated / reserved / NVML memory and step time side by side.
#
# On the device (carry .whl, see scripts/gpu_env.sh):  bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MAX_STEPS="${MAX_STEPS:-15}"
OUT_DIR="${OUT:-/tmp/gpu-check}"
source scripts/gpu_env.sh

time python3 -m gputech_bench run --matrix --preset seed --device cuda \
  --set train.max_steps="$MAX_STEPS" --results "$OUT_DIR/results" --run-name seed-gpu-check || true

python3 - "$OUT_DIR/results/seed-gpu-check" <<'PY'
import json, pathlib, sys
def v(r, k):
    x = r.get("metrics", {}).get(k, {}).get("value")
    return "-" if x is None else (f"{x:,.0f}" if isinstance(x, float) and x > 100 else f"{x:.4g}" if isinstance(x, float) else str(x))
order = ["baseline", "1", "2", "3", "4", "1+2+3", "1+2+4", "lora"]
rows = {json.loads(p.read_text())["cell"]: json.loads(p.read_text()) for p in pathlib.Path(sys.argv[1]).glob("*.json") if p.name not in ("config.json", "report.json", "estimate.json")}
print("| cell | status | peak allocated MiB | peak reserved MiB | NVML process MiB | tracked host MiB | mean step s | epoch s (extrapolated) | masked acc |")
print("|---|---|---|---|---|---|---|---|---|")
for cell in order:
    r = rows.get(cell, {"status": "missing"})
    print(f"| {cell} | {r['status']} {r.get('reason') or ''} | {v(r,'peak_allocated_mib')} | {v(r,'peak_reserved_mib')} | {v(r,'nvml_process_peak_mib')} | "
          f"{v(r,'tracked_host_peak_mib')} | {v(r,'mean_step_seconds')} | {v(r,'epoch_seconds')} | {v(r,'eval_masked_accuracy')} |")
some = next(iter(rows.values()), {})
print("NVML method:", some.get("metrics", {}).get("nvml_process_peak_mib", {}).get("method"))
PY

# Issue 5's check: the fake-CUDA estimate of every seed cell against the measured allocated peak.
time python3 -m gputech_bench estimate --compare "$OUT_DIR/results/seed-gpu-check" --format md || true
