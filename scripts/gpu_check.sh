#!/usr/bin/env bash
# gpu_check.sh: does gputech-bench tell the truth on this GPU?
#
# It runs, on one CUDA device, the seed preset's 8 cells, `amp`, today's strategies
# (`chunked-ce`, `1+3+chunked-ce`, `bf16-weights`, `optimizer-in-backward`), the two no card
# has run yet (`fsdp-offload`, `qlora`) and `fsdp` in a process group of one (the per-rank
# estimate's path at world size 1: the only multi-GPU figure one card can check) in one run
# under the seed's objective, then `sparse-head` and `1+3+amp+sparse-head` (a second run under
# data.objective=mlm, which sparse-head needs; each run has its own baseline), all short
# (train.max_steps=12). Beside them it runs a bare training loop of the baseline's shape,
# written below in plain transformers + torch (no gputech_bench code), and compares the two:
# the project's baseline must be within ±2% of the bare loop in torch.cuda.max_memory_allocated
# and at most 1.05x its mean step time, and every cell must be ok or say why it is not.
# Then `gputech-bench estimate --compare` puts the fake-tensor estimate beside the measured peaks,
# and the summary flags every cell whose measured allocated peak is more than 10% off it; where the
# estimate predicts the allocator's reserve and the NVML figure, it puts those beside the measured ones.
# Last it runs the seed run's baseline and lora again with --allocator expandable --memory-snapshot
# (expandable segments; on the dry run without the snapshot, which is CUDA-only) and puts each cell's
# allocated, reserved and NVML peaks with and without expandable segments, and the segments over
# 1 GiB read from each snapshot, in the summary.
#
#   bash scripts/gpu_check.sh                 # on the GPU machine; aimed at under 8 minutes on an H100/H200
#   GPUTECH_WHEELS=/path/to/wheels bash scripts/gpu_check.sh   # install missing bitsandbytes /
#                                             # nvidia-ml-py from local wheels (default: ./.whl)
#   bash scripts/gpu_check.sh --dry-run       # the same pipeline on CPU, tiny model, a few steps
#
# It writes at most 6 files, all directly under $OUT (default /tmp/gpu-check, or
# /tmp/gpu-check-dry-run for --dry-run): summary.md (the table and the PASS/FAIL lines),
# summary.json (the same figures), report.csv, report-mlm.csv and report-expandable.csv (the three
# runs' reports) and gpu_check.log (everything printed). The run folders go to a fresh folder under /tmp.
# Exit code: 0 when every acceptance check passes, 1 otherwise (the files are written first).
# Nothing is downloaded. Environment: PYTHON (default python3), MAX_STEPS (default 12),
# CELL_TIMEOUT (seconds per cell, default 300), GPUTECH_BENCH_CACHE (default /tmp/gputech-cache).
#
# Wheels for a GPU machine without bitsandbytes or nvidia-ml-py, fetched once on a connected one
# (and kept out of git with: echo /.whl/ >> .git/info/exclude):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl bitsandbytes==0.50.2 nvidia-ml-py
set -euo pipefail
CALLER="$PWD"  # OUT and GPUTECH_WHEELS may be given relative to where the script was started
cd "$(dirname "$0")/.."
REPO="$PWD"
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$CALLER/$1" ;; esac; }

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument '$arg': use --dry-run or --help" >&2; exit 2 ;;
  esac
done

PYTHON="${PYTHON:-python3}"
# A path is made absolute: the bare loop runs from /tmp.
case "$PYTHON" in */*) PYTHON="$(absolute "$PYTHON")" ;; esac
if [ "$DRY_RUN" = 1 ]; then OUT_DIR="${OUT:-/tmp/gpu-check-dry-run}"; else OUT_DIR="${OUT:-/tmp/gpu-check}"; fi
OUT_DIR="$(absolute "$OUT_DIR")"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
# Only this script's own files are replaced; nothing else in the folder is touched.
rm -f "$OUT_DIR"/{summary.md,summary.json,report.csv,report-mlm.csv,report-expandable.csv,gpu_check.log}
RUNS="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-runs.XXXXXX")"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export GPUTECH_BENCH_CACHE="${GPUTECH_BENCH_CACHE:-/tmp/gputech-cache}"
export COLUMNS="${COLUMNS:-160}"  # rich's tables in the log, unwrapped
SITE=""                            # where local wheels went, if any; the bare loop sees only this

# The cells. SEED_CELLS are `gputech-bench run --matrix` (the seed's 8), amp and the newer ones, under the
# seed's objective; MLM_CELLS run under data.objective=mlm. --strategies adds the baseline.
SEED_CELLS="1,2,3,4,1+2+3,1+2+4,lora,amp,chunked-ce,1+3+chunked-ce,bf16-weights,optimizer-in-backward,fsdp-offload,qlora,fsdp"
MLM_CELLS="sparse-head,1+3+amp+sparse-head"
SEED_RUN_CELLS="$SEED_CELLS" MLM_RUN_CELLS="$MLM_CELLS"  # what runs here (the dry run drops CUDA-only cells)
if [ "$DRY_RUN" = 1 ]; then
  PRESET=cpu DEVICE=cpu ESTIMATE_JOBS=1  # one tracing process: on 2 cores, more only add start-ups
  # About tests/conftest.py's TINY_RUN, three steps: the whole pipeline in a few minutes on 2 cores
  # (each cell is a fresh process: importing torch and transformers is most of its time).
  # Layers 64 wide, not the tests' 32: bitsandbytes' CPU 4-bit kernels (qlora) pack whole
  # 64-weight blocks and fail on a narrower layer. No dropout: a CPU run's dropout is unfused (it
  # keeps a noise tensor of the input's dtype), where the estimate follows a GPU's fused kernel.
  SETS=(--set model.dropout=0.0 --set strategy.lora_dropout=0.0 --set model.vocab_rows=0 --set model.hidden_size=64 --set model.num_layers=2 --set model.num_heads=2
        --set model.intermediate_size=128 --set model.max_position_embeddings=64 --set data.train_sentences=96
        --set data.eval_sentences=16 --set data.max_length=32 --set data.tokenizer_vocab_size=400
        --set train.batch_size=16 --set train.epochs=1 --set strategy.micro_batch_size=4
        --set train.max_steps="${MAX_STEPS:-3}")
else
  PRESET=seed DEVICE=cuda ESTIMATE_JOBS=0  # 0: the estimate's default, one per core up to 4
  SETS=(--set train.max_steps="${MAX_STEPS:-12}")
fi

main() {
  local started=$SECONDS
  echo "gpu_check: $([ "$DRY_RUN" = 1 ] && echo "dry run on CPU (tiny model)" || echo "GPU check") -- $(date -u +%FT%TZ)"
  echo "output folder: $OUT_DIR"
  echo "run folders:   $RUNS"
  echo "python:        $PYTHON"
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  setup_packages
  describe_machine
  local skipped="$RUNS/skipped.json"
  echo '{}' >"$skipped"
  if [ "$DRY_RUN" = 1 ]; then drop_cuda_only_cells "$skipped"; fi

  local seed_rc=0 mlm_rc=0 bare_rc=0
  echo; echo "== 1/6 the seed preset's cells and amp (data.objective=seed): baseline,$SEED_RUN_CELLS"
  "$PYTHON" -m gputech_bench run --preset "$PRESET" --device "$DEVICE" --strategies "${SEED_RUN_CELLS:-baseline}" --no-estimate \
    --cell-timeout "${CELL_TIMEOUT:-300}" "${SETS[@]}" --results "$RUNS" --run-name seed || seed_rc=$?
  echo "seed run: exit $seed_rc, $((SECONDS - started)) s so far"

  echo; echo "== 2/6 the bare loop (transformers + torch only) at the seed run's baseline shape"
  bare_loop "$RUNS/seed" "$RUNS/bare.json" || bare_rc=$?
  echo "bare loop: exit $bare_rc, $((SECONDS - started)) s so far"

  echo; echo "== 3/6 sparse-head cells (data.objective=mlm): baseline,$MLM_RUN_CELLS"
  "$PYTHON" -m gputech_bench run --preset "$PRESET" --device "$DEVICE" --strategies "${MLM_RUN_CELLS:-baseline}" --no-estimate \
    --cell-timeout "${CELL_TIMEOUT:-300}" "${SETS[@]}" --set data.objective=mlm --results "$RUNS" --run-name mlm \
    || mlm_rc=$?
  echo "mlm run: exit $mlm_rc, $((SECONDS - started)) s so far"

  echo; echo "== 4/6 the fake-tensor estimate against the seed run's measured peaks"
  # As JSON, for the summary's predicted-against-measured table (printed there, and in the log).
  "$PYTHON" -m gputech_bench estimate --compare "$RUNS/seed" --format json --output "$RUNS/estimate-seed.json" \
    --jobs "$ESTIMATE_JOBS" || echo "estimate: exit $? (see above)"
  echo "estimate done, $((SECONDS - started)) s so far"

  # The same cells with expandable segments: the caching allocator's segments set the reserved and NVML
  # peaks apart from the tensors (allocated), so these show how much of a gap is the allocator's.
  local expandable_rc=0 snapshot=(--memory-snapshot)
  if [ "$DRY_RUN" = 1 ]; then
    snapshot=()
    echo; echo "== 5/6 baseline and lora again with --allocator expandable (no --memory-snapshot on the dry run: it is CUDA-only)"
  else
    echo; echo "== 5/6 baseline and lora again with --allocator expandable --memory-snapshot"
  fi
  "$PYTHON" -m gputech_bench run --preset "$PRESET" --device "$DEVICE" --strategies lora --no-estimate \
    --cell-timeout "${CELL_TIMEOUT:-300}" "${SETS[@]}" --allocator expandable "${snapshot[@]}" --results "$RUNS" \
    --run-name expandable || expandable_rc=$?
  echo "expandable run: exit $expandable_rc, $((SECONDS - started)) s so far"

  echo; echo "== 6/6 summary"
  [ -f "$RUNS/seed/report.csv" ] && cp "$RUNS/seed/report.csv" "$OUT_DIR/report.csv"
  [ -f "$RUNS/mlm/report.csv" ] && cp "$RUNS/mlm/report.csv" "$OUT_DIR/report-mlm.csv"
  [ -f "$RUNS/expandable/report.csv" ] && cp "$RUNS/expandable/report.csv" "$OUT_DIR/report-expandable.csv"
  local summary_rc=0
  summarize "$skipped" || summary_rc=$?
  echo "total: $((SECONDS - started)) s; files: $(cd "$OUT_DIR" && ls summary.md summary.json report.csv report-mlm.csv report-expandable.csv gpu_check.log 2>/dev/null | tr '\n' ' ')"
  return "$summary_rc"
}

setup_packages() {
  # bitsandbytes (strategy 3) and nvidia-ml-py (NVML columns): from local wheels when missing, never from the network.
  local have_bnb=1 have_nvml=1
  has_module bitsandbytes || have_bnb=0
  has_module pynvml || have_nvml=0
  local wheels
  wheels="$(absolute "${GPUTECH_WHEELS:-$REPO/.whl}")"
  if { [ $have_bnb = 0 ] || [ $have_nvml = 0 ]; } && compgen -G "$wheels/*.whl" >/dev/null; then
    SITE=/tmp/site
    echo "installing local wheels from $wheels into $SITE (no index, no dependencies):" "$wheels"/*.whl
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$wheels"/*.whl \
      || echo "pip could not install the wheels in $wheels"
    export PYTHONPATH="$SITE:$PYTHONPATH"
    has_module bitsandbytes && have_bnb=1
    has_module pynvml && have_nvml=1
  fi
  if [ $have_bnb = 0 ]; then
    echo "bitsandbytes missing: cells $(cells_needing_bnb) will be error rows" \
         "(put its wheel in $wheels, or set GPUTECH_WHEELS to a folder holding it)"
  fi
  if [ $have_nvml = 0 ]; then
    echo "nvidia-ml-py missing: NVML columns will be empty (project and bare loop alike)"
  fi
  return 0
}

has_module() {
  # Installed or not, without importing it (bitsandbytes would import torch).
  "$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec(sys.argv[1]) is None)' "$1" 2>/dev/null
}

cells_needing_bnb() {
  # Strategy 3 (adam8bit), paged-adam8bit and qlora import bitsandbytes.
  echo "$SEED_CELLS,$MLM_CELLS" | tr ',' '\n' \
    | awk -F+ '{for (i = 1; i <= NF; i++) if ($i == "3" || $i == "adam8bit" || $i == "paged-adam8bit" || $i == "qlora") {print; next}}' \
    | paste -sd, - | sed 's/,/, /g'
}

describe_machine() {
  if [ "$DRY_RUN" = 0 ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || echo "nvidia-smi not available"
  fi
  "$PYTHON" - <<'PY' || true
import importlib
import torch
line = [f"torch {torch.__version__} (CUDA {torch.version.cuda}, available: {torch.cuda.is_available()})"]
for name in ("transformers", "peft", "bitsandbytes", "pynvml"):
    try:
        line.append(f"{name} {getattr(importlib.import_module(name), '__version__', 'present')}")
    except Exception as error:
        line.append(f"{name} missing ({type(error).__name__})")
print(", ".join(line))
PY
}

drop_cuda_only_cells() {
  # On CPU, a cell that needs CUDA would make the whole run refuse: leave it out and say why.
  local lists
  lists="$("$PYTHON" - "$1" "$SEED_CELLS" "$MLM_CELLS" <<'PY'
import json, sys
from gputech_bench.strategies import parse_cell

skipped = {}
for cells in sys.argv[2:]:
    keep = []
    for cell in cells.split(","):
        needs = [cls for cls in parse_cell(cell).strategies if cls.needs_cuda]
        if needs:
            skipped[cell] = f"skipped in the dry run: {needs[0].key} needs CUDA ({needs[0].requires})"
        else:
            keep.append(cell)
    print(",".join(keep))
json.dump(skipped, open(sys.argv[1], "w"))
for cell, reason in skipped.items():
    print(f"{cell}: {reason}", file=sys.stderr)
PY
)"
  SEED_RUN_CELLS="$(sed -n 1p <<<"$lists")"
  MLM_RUN_CELLS="$(sed -n 2p <<<"$lists")"
}

bare_loop() {
  # Run from /tmp with only the wheels' folder on the path: gputech_bench cannot be imported here.
  (cd /tmp && PYTHONPATH="$SITE" "$PYTHON" - "$1" "$2" <<'PY'
"""A bare training loop of the project's baseline shape: plain transformers + torch.

The shape (model, sequence length, batch, optimizer settings, steps) is read from the
project's run: its config.json and its baseline result. Nothing from gputech_bench.
"""
import contextlib
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

WARMUP_STEPS = 2  # not timed, as the project times neither its first nor its memory-tracked step
run_dir, out_path = Path(sys.argv[1]), Path(sys.argv[2])


class NvmlPeak:
    """This process's GPU memory as NVML sees it, sampled every 20 ms in a background thread."""

    def __init__(self, torch, device):
        self.peak, self.method, self.nvml = None, "unavailable", None
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            uuid = str(torch.cuda.get_device_properties(device).uuid)  # reads properties, allocates nothing
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            self.before = pynvml.nvmlDeviceGetMemoryInfo(self.handle).used  # before this process touches the GPU
            self.nvml = pynvml
        except Exception as error:
            self.method = f"unavailable ({type(error).__name__}: {str(error).strip()[:80]})"

    def _sample(self):
        for query in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            try:
                for process in getattr(self.nvml, query)(self.handle):
                    if process.pid == os.getpid() and process.usedGpuMemory is not None:
                        return int(process.usedGpuMemory), "NVML per-process usedGpuMemory, sampled every 20 ms"
            except Exception:
                continue
        used = self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used
        return max(0, used - self.before), ("NVML device-wide used minus the usage before the bare loop touched "
                                            "the GPU (PID hidden from NVML), sampled every 20 ms")

    def _record(self):
        try:
            value, method = self._sample()
            if self.peak is None or value > self.peak:
                self.peak, self.method = value, method
        except Exception:
            pass

    def _run(self):
        while not self._stop.is_set():
            self._record()
            self._stop.wait(0.02)

    def __enter__(self):
        if self.nvml is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.nvml is not None:
            self._stop.set()
            self._thread.join(timeout=2)
            self._record()


def bare(result):
    import torch
    import transformers
    from transformers import BertConfig, BertForMaskedLM, get_linear_schedule_with_warmup

    if not (run_dir / "config.json").exists():
        raise SystemExit(f"{run_dir} holds no config.json: the seed run did not start (see above), so there is no shape to follow")
    config = json.loads((run_dir / "config.json").read_text())
    model_cfg, data_cfg, train_cfg = config["model"], config["data"], config["train"]
    try:
        baseline = json.loads((run_dir / "baseline.json").read_text())
    except (OSError, ValueError):
        baseline = {}
    if model_cfg.get("pretrained"):
        raise SystemExit("the run fine-tunes a pretrained model; this bare loop builds the model from its config only")
    # vocab_rows 0 means "the tokenizer's size": the baseline result says what that was.
    vocab = model_cfg["vocab_rows"] or baseline.get("model", {}).get("vocab_rows")
    steps = (baseline.get("metrics", {}).get("steps_run", {}).get("value")) or train_cfg["max_steps"]
    if not vocab or not steps:
        raise SystemExit("the seed run has no baseline result to read the vocabulary size or step count from")
    batch, length = train_cfg["batch_size"], data_cfg["max_length"]
    wants_cuda = config["device"] == "cuda" or (config["device"] == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if wants_cuda else "cpu")
    cuda = device.type == "cuda"
    result.update(
        device=device.type, steps=steps, torch=torch.__version__, transformers=transformers.__version__,
        shape={"vocab_rows": vocab, "hidden_size": model_cfg["hidden_size"], "num_layers": model_cfg["num_layers"],
               "num_heads": model_cfg["num_heads"], "intermediate_size": model_cfg["intermediate_size"],
               "max_position_embeddings": model_cfg["max_position_embeddings"], "dropout": model_cfg["dropout"],
               "attention": model_cfg["attention"], "batch_size": batch, "max_length": length},
        optimizer=(f"torch.optim.AdamW(lr={train_cfg['lr']}, eps={train_cfg['adam_eps']}, "
                   f"weight_decay={train_cfg['weight_decay']}, foreach=False, as the project's baseline); linear warm-up over "
                   f"{int(train_cfg['warmup_ratio'] * steps)} of {steps} steps; clip_grad_norm_ {train_cfg['max_grad_norm']}"),
        labels="labels = input_ids (every position, as data.objective=seed); attention_mask all ones",
    )

    nvml = NvmlPeak(torch, device) if cuda else None  # before anything is allocated on the GPU
    torch.manual_seed(train_cfg["seed"])
    bert = BertConfig(
        vocab_size=vocab, hidden_size=model_cfg["hidden_size"], num_hidden_layers=model_cfg["num_layers"],
        num_attention_heads=model_cfg["num_heads"], intermediate_size=model_cfg["intermediate_size"],
        max_position_embeddings=model_cfg["max_position_embeddings"], hidden_dropout_prob=model_cfg["dropout"],
        attention_probs_dropout_prob=model_cfg["dropout"], pad_token_id=0,
    )
    bert._attn_implementation = model_cfg["attention"]
    generator = torch.Generator().manual_seed(train_cfg["seed"])
    batches = [torch.randint(1, vocab, (batch, length), generator=generator) for _ in range(steps)]
    attention_mask = torch.ones(batch, length, dtype=torch.long)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    with nvml if cuda else contextlib.nullcontext():
        model = BertForMaskedLM(bert).to(device)  # fp32
        # foreach=False, as the project's baseline and the seed's 2022 torch: tensor by tensor. torch's
        # multi-tensor default holds temporaries for all parameters at once, which is a different recipe,
        # not harness overhead, and would move the allocated peak by a few percent.
        optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg["lr"], eps=train_cfg["adam_eps"],
                                      weight_decay=train_cfg["weight_decay"], foreach=False)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(train_cfg["warmup_ratio"] * steps), steps)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        model.train()
        times, losses = [], []
        for step, input_ids in enumerate(batches):
            sync()
            start = time.perf_counter()
            input_ids = input_ids.to(device)
            loss = model(input_ids=input_ids, attention_mask=attention_mask.to(device), labels=input_ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            seconds = time.perf_counter() - start
            if step >= WARMUP_STEPS:
                times.append(seconds)
            losses.append(float(loss.detach()))
        if cuda:
            result["peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            result["peak_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
            result["device_name"] = torch.cuda.get_device_name(device)
    if cuda:
        result["nvml_process_peak_mib"] = None if nvml.peak is None else nvml.peak / 2**20
        result["nvml_method"] = nvml.method
        result["memory_method"] = "torch.cuda.max_memory_allocated / max_memory_reserved over the training steps"
    else:
        result.update(peak_allocated_mib=None, peak_reserved_mib=None, nvml_process_peak_mib=None,
                      nvml_method="not available on CPU", memory_method="not available on CPU (CUDA-only figures)")
    result.update(
        timed_steps=len(times), mean_step_seconds=sum(times) / len(times) if times else None,
        step_seconds=[round(t, 5) for t in times], final_loss=losses[-1] if losses else None,
        time_method=f"mean of steps {WARMUP_STEPS + 1}..{steps}, device synchronised before each clock read",
    )


result = {"status": "error", "reason": "did not finish"}
try:
    bare(result)
    result.update(status="ok", reason=None)
except SystemExit as error:  # a stated reason, no traceback
    result["reason"] = str(error)
except BaseException as error:
    result["reason"] = f"{type(error).__name__}: {error}".strip()
    traceback.print_exc()
result["imports_gputech_bench"] = any(name.split(".")[0] == "gputech_bench" for name in sys.modules)
out_path.write_text(json.dumps(result, indent=2) + "\n")
shown = {k: result.get(k) for k in ("status", "reason", "device", "steps", "timed_steps", "mean_step_seconds",
                                     "peak_allocated_mib", "peak_reserved_mib", "nvml_process_peak_mib")}
print("bare loop:", json.dumps(shown))
sys.exit(0 if result["status"] == "ok" else 1)
PY
  )
}

summarize() {
  "$PYTHON" - "$RUNS" "$OUT_DIR" "$DRY_RUN" "$1" "$SEED_CELLS" "$MLM_CELLS" <<'PY'
"""The table and the acceptance lines: summary.md, summary.json, and the same on stdout."""
import json
import math
import sys
from pathlib import Path

runs, out = Path(sys.argv[1]), Path(sys.argv[2])
dry = sys.argv[3] == "1"
skipped = json.loads(Path(sys.argv[4]).read_text())
expected = {"seed": ["baseline", *sys.argv[5].split(",")], "mlm": ["baseline", *sys.argv[6].split(",")]}
NOT_CELLS = {"config.json", "report.json", "estimate.json"}
MEMORY_TOLERANCE, TIME_LIMIT = 0.02, 1.05
ESTIMATE_TOLERANCE_PERCENT = 10.0  # a cell whose measured allocated peak is further off its estimate is flagged


def metric(result, name):
    entry = result.get("metrics", {}).get(name)
    return entry.get("value") if isinstance(entry, dict) else None


def load(run):
    results = {}
    for path in sorted((runs / run).glob("*.json")):
        if path.name in NOT_CELLS:
            continue
        try:
            data = json.loads(path.read_text())
            results[data["cell"]] = data
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return results


cells = []
for run, names in expected.items():
    results = load(run)
    for name in names:
        result = results.get(name)
        if result is None:
            status = "skipped" if name in skipped else "missing"
            cells.append({"run": run, "cell": name, "status": status, "reason": skipped.get(name)})
            continue
        cells.append({
            "run": run, "cell": name, "status": result.get("status"), "reason": result.get("reason") or None,
            "peak_allocated_mib": metric(result, "peak_allocated_mib"),
            "peak_reserved_mib": metric(result, "peak_reserved_mib"),
            "nvml_process_peak_mib": metric(result, "nvml_process_peak_mib"),
            "mean_step_seconds": metric(result, "mean_step_seconds"),
            "steps_run": metric(result, "steps_run"),
            "nvml_method": (result.get("metrics", {}).get("nvml_process_peak_mib") or {}).get("method"),
            "device": result.get("device", {}).get("name") or result.get("device", {}).get("type"),
        })

try:
    bare = json.loads((runs / "bare.json").read_text())
except (OSError, ValueError):
    bare = {"status": "missing", "reason": "the bare loop wrote no result"}
project = next((c for c in cells if c["run"] == "seed" and c["cell"] == "baseline"), {"status": "missing"})
FIGURES = ("peak_allocated_mib", "peak_reserved_mib", "nvml_process_peak_mib", "mean_step_seconds")


def ok_number(value):
    return isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))


ratios = {}  # only between two finished sides: a failed side's partial figures compare nothing
both_ok = project.get("status") == "ok" and bare.get("status") == "ok"
for key in FIGURES:
    a, b = project.get(key), bare.get(key)
    ratios[key] = a / b if both_ok and ok_number(a) and ok_number(b) and b else None


def mib(value):
    return f"{value:,.1f}" if ok_number(value) else "n/a"


def sec(value):
    return f"{value:.4f}" if ok_number(value) else "n/a"


def ratio(value, digits=3):
    return f"{value:.{digits}f}x" if value is not None else "n/a"


def cell_text(text):
    return str(text or "").replace("|", "\\|").replace("\n", " ")


# ---- acceptance
checks = []  # (verdict, counts toward the exit code, line)
r = ratios["peak_allocated_mib"]
if dry:
    checks.append(("NOT CHECKED", False, "allocated memory: not checked on CPU (allocated is CUDA-only)"))
elif r is None:
    checks.append(("FAIL", True, f"allocated memory: no ratio (project baseline: {project.get('status')}, "
                                  f"bare loop: {bare.get('status')} {bare.get('reason') or ''})".rstrip()))
else:
    checks.append(("PASS" if abs(r - 1) <= MEMORY_TOLERANCE else "FAIL", True,
                   f"allocated memory: project baseline / bare loop = {r:.4f} ({100 * (r - 1):+.2f}%; "
                   f"within ±{100 * MEMORY_TOLERANCE:.0f}% passes)"))
if not both_ok:  # without both sides there is nothing to compare, on CPU too: the pipeline itself failed
    checks.append(("FAIL", True, f"comparison: project baseline {project.get('status')}, bare loop "
                                 f"{bare.get('status')} {bare.get('reason') or ''}".rstrip()))
r = ratios["mean_step_seconds"]
note = " (dry run: CPU timings of tiny steps are noise; never fails the exit code)" if dry else ""
if r is None:
    checks.append(("FAIL", not dry, f"step time: no ratio (project baseline: {project.get('status')}, "
                                    f"bare loop: {bare.get('status')}){note}"))
else:
    checks.append(("PASS" if r <= TIME_LIMIT else "FAIL", not dry,
                   f"step time: project baseline / bare loop = {r:.3f}x (at most {TIME_LIMIT:.2f}x passes){note}"))
unstated = [c for c in cells if c["status"] != "ok" and not c.get("reason")]
stated = [c for c in cells if c["status"] != "ok" and c.get("reason")]
ok = [c for c in cells if c["status"] == "ok"]
line = f"cells: {len(ok)} of {len(cells)} ok"
if stated:
    line += "; not ok with a stated reason: " + ", ".join(f"{c['run']}/{c['cell']} ({c['status']})" for c in stated)
if unstated:
    line += "; not ok and no reason: " + ", ".join(f"{c['run']}/{c['cell']} ({c['status']})" for c in unstated)
checks.append(("FAIL" if unstated else "PASS", True, line))

# ---- the estimate against the measured peaks (flagged, not counted: the estimate is a prediction)
try:
    estimated = json.loads((runs / "estimate-seed.json").read_text()).get("rows", [])
except (OSError, ValueError):
    estimated = []
flagged = [row for row in estimated
           if ok_number(row.get("error_percent")) and abs(row["error_percent"]) > ESTIMATE_TOLERANCE_PERCENT]
if not estimated:
    checks.append(("NOT CHECKED", False, "estimate: no estimate-seed.json (the estimate failed; see the log)"))
else:
    compared = [row for row in estimated if ok_number(row.get("error_percent"))]
    checks.append(("FLAG" if flagged else "PASS", False,
                   f"estimate: {len(compared) - len(flagged)} of {len(compared)} compared cells within "
                   f"±{ESTIMATE_TOLERANCE_PERCENT:.0f}% of the measured peak"
                   + ("; flagged: " + ", ".join(f"{row['cell']} ({row['error_percent']:+.1f}%)" for row in flagged)
                      if flagged else "")))
passed = all(verdict != "FAIL" for verdict, counts, _ in checks if counts)

# ---- with and without expandable segments
GIB = 1024.0


def big_segments(result):
    """Sizes of the segments over 1 GiB in the cell's memory snapshot (a pickle of
    torch.cuda.memory._snapshot(): "segments", each with "total_size"), largest first."""
    path = result.get("memory_snapshot")
    if not path:
        return None, "no snapshot recorded" + (" (--memory-snapshot is CUDA-only)" if dry else "")
    try:
        import pickle

        with open(path, "rb") as handle:
            snapshot = pickle.load(handle)  # our own cell's file, written by torch.cuda.memory._dump_snapshot
        sizes = sorted((segment["total_size"] / 2**20 for segment in snapshot.get("segments", [])), reverse=True)
    except Exception as error:
        return None, f"snapshot unreadable ({type(error).__name__}: {error})"
    return [size for size in sizes if size > GIB], None


expandable = load("expandable")
comparisons = []
for name in ("baseline", "lora"):
    row = {"cell": name}
    default_cell = next((c for c in cells if c["run"] == "seed" and c["cell"] == name), {})
    row["default"] = {k: default_cell.get(k) for k in ("status", "peak_allocated_mib", "peak_reserved_mib",
                                                       "nvml_process_peak_mib")}
    result = expandable.get(name)
    if result is None:
        row["expandable"] = {"status": "missing"}
    else:
        row["expandable"] = {"status": result.get("status"), "reason": result.get("reason"),
                             "allocator": (result.get("allocator") or {}).get("conf"),
                             **{k: metric(result, k) for k in ("peak_allocated_mib", "peak_reserved_mib",
                                                                "nvml_process_peak_mib")}}
        sizes, why = big_segments(result)
        row["segments_over_1_gib_mib"], row["segments_note"] = sizes, why
    comparisons.append(row)


def expandable_lines():
    out = ["", "With and without expandable segments (--allocator expandable: PYTORCH_CUDA_ALLOC_CONF="
           "expandable_segments:True), the seed run's preset and steps; MiB:", "",
           "| cell | allocator | status | allocated | reserved | NVML | segments over 1 GiB |",
           "|:---|:---|:---|---:|---:|---:|:---|"]
    for row in comparisons:
        for label, key in (("default", "default"), ("expandable", "expandable")):
            side = row[key]
            segments = ""
            if key == "expandable":
                sizes = row.get("segments_over_1_gib_mib")
                segments = (", ".join(f"{mib(size)}" for size in sizes) or "none") if sizes is not None \
                    else cell_text(row.get("segments_note") or "")
            if side.get("status") != "ok":
                out.append(f"| {row['cell']} | {label} | {side.get('status')} | - | - | - | "
                           f"{cell_text(side.get('reason') or segments)} |")
                continue
            out.append(f"| {row['cell']} | {label} | ok | {mib(side.get('peak_allocated_mib'))} | "
                       f"{mib(side.get('peak_reserved_mib'))} | {mib(side.get('nvml_process_peak_mib'))} | {segments} |")
    return out


# ---- the table
device = project.get("device") or bare.get("device_name") or bare.get("device") or "?"
steps = project.get("steps_run")
lines = [
    f"# gputech-bench GPU check{' (dry run on CPU)' if dry else ''}",
    "",
    f"Device: {device}. Project cells: {steps if steps is not None else '?'} steps each; bare loop: "
    f"{bare.get('steps', '?')} steps, {bare.get('timed_steps', '?')} timed. Run folders: `{runs}`.",
    "",
    "| row | status | allocated MiB | reserved MiB | NVML MiB | mean step s | reason |",
    "|:---|:---|---:|---:|---:|---:|:---|",
    f"| project baseline (seed run) | {project.get('status')} | {mib(project.get('peak_allocated_mib'))} | "
    f"{mib(project.get('peak_reserved_mib'))} | {mib(project.get('nvml_process_peak_mib'))} | "
    f"{sec(project.get('mean_step_seconds'))} | {cell_text(project.get('reason'))} |",
    f"| bare loop (transformers + torch) | {bare.get('status')} | {mib(bare.get('peak_allocated_mib'))} | "
    f"{mib(bare.get('peak_reserved_mib'))} | {mib(bare.get('nvml_process_peak_mib'))} | "
    f"{sec(bare.get('mean_step_seconds'))} | {cell_text(bare.get('reason'))} |",
    f"| project / bare | | {ratio(ratios['peak_allocated_mib'], 4)} | {ratio(ratios['peak_reserved_mib'])} | "
    f"{ratio(ratios['nvml_process_peak_mib'])} | {ratio(ratios['mean_step_seconds'])} | |",
]
for c in cells:
    if c["status"] != "ok":  # a failed cell's partial figures are not comparable (as in report.csv); summary.json keeps them
        lines.append(f"| {c['run']}: {c['cell']} | {c['status']} | - | - | - | - | {cell_text(c.get('reason'))} |")
        continue
    lines.append(
        f"| {c['run']}: {c['cell']} | ok | {mib(c.get('peak_allocated_mib'))} | "
        f"{mib(c.get('peak_reserved_mib'))} | {mib(c.get('nvml_process_peak_mib'))} | "
        f"{sec(c.get('mean_step_seconds'))} | |"
    )
if estimated:
    # The predicted reserve (allocator: tensors + cached segments) and NVML figure (+ CUDA context), where
    # the estimate gives them (older estimates do not: "-"), beside the measured ones of the same cell.
    measured = {c["cell"]: c for c in cells if c["run"] == "seed" and c["status"] == "ok"}

    def predicted(row, low, high):
        a, b = row.get(low), row.get(high)
        if not ok_number(b):
            return "-"
        return mib(b) if not ok_number(a) or round(a, 1) == round(b, 1) else f"{mib(a)} to {mib(b)}"

    lines += ["", "Predicted against measured reserved and NVML, seed run (MiB; - where the estimate does not predict it):",
              "", "| cell | predicted reserved | measured reserved | predicted NVML | measured NVML |",
              "|:---|---:|---:|---:|---:|"]
    for row in estimated:
        cell = measured.get(str(row.get("cell")), {})
        lines.append(f"| {row.get('cell')} | {predicted(row, 'reserved_low_mib', 'reserved_high_mib')} | "
                     f"{mib(cell.get('peak_reserved_mib'))} | {predicted(row, 'device_total_low_mib', 'device_total_mib')} | "
                     f"{mib(cell.get('nvml_process_peak_mib'))} |")
    lines += ["", "Estimate (fake-tensor trace) against measured, seed run:", "",
              "| cell | predicted tensor MiB | host MiB | measured MiB | error | |",
              "|:---|---:|---:|---:|---:|:---|"]
    for row in estimated:
        error = row.get("error_percent")
        lines.append(
            f"| {row.get('cell')} | {mib(row.get('tensor_peak_mib'))} | {mib(row.get('host_peak_mib'))} | "
            f"{mib(row.get('measured_mib'))} | {f'{error:+.1f}%' if ok_number(error) else 'n/a'} | "
            f"{'FLAG: more than 10% off' if row in flagged else cell_text(row.get('error') or '')} |")
    what = next((row.get("measured_what") for row in estimated if row.get("measured_what")), None)
    lines += ["", f"- measured: {what or 'n/a'}; n/a where a cell keeps part of the model on the host."]
lines += expandable_lines()
lines += ["", "Acceptance:", ""]
lines += [f"- {verdict}{'' if counts or verdict in ('NOT CHECKED', 'FLAG') else ' (not counted)'} {text}"
          for verdict, counts, text in checks]
lines += [
    "",
    f"Overall: {'PASS' if passed else 'FAIL'} (exit {0 if passed else 1}).",
    "",
    "- seed: the seed's objective (labels on every position); mlm: data.objective=mlm, which sparse-head needs.",
    "- Memory (project): torch.cuda.max_memory_allocated / max_memory_reserved over the training steps; "
    f"NVML: {project.get('nvml_method') or 'n/a'}.",
    f"- Memory (bare loop): {bare.get('memory_method', 'n/a')}; NVML: {bare.get('nvml_method', 'n/a')}.",
    "- Bare loop: " + "; ".join(text for text in (bare.get("optimizer"), bare.get("labels")) if text)
    + f"{'; ' if bare.get('optimizer') else ''}imports gputech_bench: {bare.get('imports_gputech_bench', '?')}.",
]
markdown = "\n".join(lines) + "\n"
(out / "summary.md").write_text(markdown)
summary = {
    "schema": "gputech-bench/gpu-check/1",
    "mode": "dry-run" if dry else "gpu",
    "device": device,
    "run_folders": {"seed": str(runs / "seed"), "mlm": str(runs / "mlm"), "expandable": str(runs / "expandable")},
    "expandable_segments": comparisons,
    "comparison": {
        "project_baseline": {k: project.get(k) for k in (*FIGURES, "steps_run", "status", "reason", "nvml_method")},
        "bare_loop": bare,
        "ratio_project_over_bare": ratios,
    },
    "cells": cells,
    "acceptance": [{"verdict": v, "counts_toward_exit_code": counts, "detail": text} for v, counts, text in checks],
    "passed": passed,
    "exit_code": 0 if passed else 1,
}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(markdown)
sys.exit(0 if passed else 1)
PY
}

# Everything printed goes to the terminal and to the log; the pipeline ends only when tee has
# written it all (tee -i: Ctrl-C stops the cells, not the log). main goes on past a failed step,
# recording its exit code, so that the summary is always written: errexit is off for it.
set +e
main 2>&1 | tee -i "$OUT_DIR/gpu_check.log"
status=("${PIPESTATUS[@]}")
set -e
rc="${status[0]}"
[ "$rc" = 0 ] || rc=1
echo "gpu_check: exit $rc ($OUT_DIR)" | tee -a "$OUT_DIR/gpu_check.log"
exit "$rc"
