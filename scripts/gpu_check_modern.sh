#!/usr/bin/env bash
# Issue 6's GPU check: the seed preset, short runs of the seed's best cells beside the
# modern strategies; the table with its Pareto frontier of memory against time; and the
# question: does any cell use at most a quarter of the baseline's memory while training
# at least as fast?
#
# On the device (carry .whl, see scripts/gpu_env.sh):  bash scripts/gpu_check_modern.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MAX_STEPS="${MAX_STEPS:-15}"
OUT_DIR="${OUT:-/tmp/gpu-check}"
RUN="$OUT_DIR/results/modern-gpu-check"
source scripts/gpu_env.sh

time python3 -m gputech_bench run --preset seed --device cuda --no-estimate \
  --strategies 4,1+2+4,amp,sparse-head,amp+sparse-head,1+amp+sparse-head,fsdp-offload,1+2+3 \
  --set train.max_steps="$MAX_STEPS" --set data.objective=mlm --results "$OUT_DIR/results" --run-name modern-gpu-check || true

python3 -m gputech_bench report "$RUN" --format md
python3 - "$RUN/report.json" <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if r["status"] == "ok"]
print("| cell | allocated MiB | reserved MiB | NVML MiB | x baseline | mean step s | x baseline time | pareto |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    f = lambda k, d=0: "-" if r.get(k) is None else f"{r[k]:,.{d}f}"
    print(f"| {r['cell']} | {f('peak_allocated_mib')} | {f('peak_reserved_mib')} | {f('nvml_process_peak_mib')} | "
          f"{f('memory_x_baseline', 3)} | {f('mean_step_seconds', 4)} | {f('epoch_x_baseline', 3)} | {r['pareto']} |")
winners = [r["cell"] for r in rows if r["cell"] != "baseline" and r.get("memory_x_baseline") is not None
           and r["memory_x_baseline"] <= 0.25 and r.get("epoch_x_baseline") is not None and r["epoch_x_baseline"] <= 1.0]
print("at most 1/4 of the baseline's memory and at least its speed:", ", ".join(winners) or "none")
PY
