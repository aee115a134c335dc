"""Run one cell in this process and describe it as a ``CellResult``.

In: a cell name and the resolved config. Out: the result, filled in place: each
measurement is added as soon as it exists, so a failure late in the cell still leaves
everything measured before it. The worker module wraps this with a status and atomic
writing; tests call it directly.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import BenchConfig, to_dict
from ..data.objective import REFERENCE_OBJECTIVE
from ..data.prepare import prepare_data
from ..errors import DeviceError, UserError, first_line
from ..measure import cuda as cuda_memory
from ..measure.allocator import recorded_setting, segment_sizes
from ..measure.cap import overshoot_note, plan_cap
from ..measure.host import peak_rss_bytes
from ..measure.oom import oom_details
from ..measure.paged import paged_state_bytes
from ..measure.snapshot import SNAPSHOT_SLOWS_STEPS, MemorySnapshot
from ..measure.warmup import warm_up_cuda_libraries
from ..measure.window import PeakWindow
from ..modeling import load_model
from ..results import CellResult
from ..strategies import RunContext, build_plan, parse_cell
from ..strategies.distributed import ensure_process_group, launched_by_torchrun, ranks_from_env
from ..strategies.distributed import shutdown as shutdown_process_group
from ..training.evaluate import EvalScores, evaluate
from ..training.loop import StepEvent, TrainOutcome, train
from ..units import parse_size, to_mib
from .failure import is_out_of_memory
from .provenance import environment, utc_now

EventSink = Callable[[dict[str, Any]], None]

FINAL_LOSS_WINDOW = 10


def resolve_device(choice: str, local_rank: int | None = None) -> torch.device:
    """The compute device; under torchrun, the GPU of this rank's ``local_rank``."""
    if choice == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if choice == "cuda" and not available:
        raise DeviceError(
            "CUDA was requested but torch.cuda.is_available() is False: use --device cpu, "
            "or install a CUDA build of torch on a machine with a GPU"
        )
    if not available:
        return torch.device("cpu")
    if local_rank is not None:
        if local_rank >= torch.cuda.device_count():
            raise DeviceError(
                f"rank with LOCAL_RANK {local_rank} has no GPU: {torch.cuda.device_count()} visible; "
                "lower --nproc-per-node to the GPUs per node, or list more with --gpus"
            )
        torch.cuda.set_device(local_rank)
    return torch.device("cuda", torch.cuda.current_device())


def check_rank_split(config: BenchConfig, train_rows: int, world_size: int) -> None:
    """Every rank must get rows of every batch, or the ranks' collectives would stop matching."""
    batch = config.train.batch_size
    if batch % world_size:
        raise UserError(
            f"train.batch_size ({batch}) does not split evenly over {world_size} ranks: "
            f"pass --set train.batch_size=<a multiple of {world_size}>"
        )
    last = train_rows % batch
    if 0 < last < world_size:
        raise UserError(
            f"the last batch of each epoch has {last} row(s), fewer than the {world_size} ranks: "
            f"pass --set data.train_sentences={train_rows - last}"
        )


def new_result(cell_text: str, config: BenchConfig) -> CellResult:
    return CellResult(
        cell_text, preset=config.preset, config=to_dict(config), provenance={"started_at": utc_now(), **environment()},
        # What the CUDA allocator runs under (recorded on CPU too, where it has no effect).
        allocator=recorded_setting(os.environ),
    )


def apply_memory_cap(config: BenchConfig, device: torch.device, result: CellResult, libraries: set[str]) -> None:
    """Limit this process to ``gpu_memory_limit``, the CUDA context counted against it.

    The context is measured after the libraries a training step loads (cuBLAS, autocast's
    kernels, bitsandbytes) have loaded: right after ``torch.zeros(1)`` it is far smaller."""
    warmed = warm_up_cuda_libraries(device, libraries)
    context_bytes, method = cuda_memory.context_bytes(device)
    total = torch.cuda.get_device_properties(device).total_memory
    cap = plan_cap(parse_size(config.gpu_memory_limit), context_bytes, total)
    torch.cuda.set_per_process_memory_fraction(cap.fraction, device)
    result.memory_cap = {**cap.describe(), "context_method": f"{method}, after warming up {', '.join(warmed)}"}


def run_cell(
    cell_text: str,
    config: BenchConfig,
    result: CellResult,
    emit: EventSink = lambda event: None,
    snapshot_path: Path | None = None,
) -> CellResult:
    """Train and evaluate one cell, filling ``result`` in place; raises on failure.

    With ``memory_snapshot`` on CUDA, the allocator history is written to
    ``snapshot_path`` whatever happens, an out-of-memory failure included.
    """
    cell = parse_cell(cell_text)
    result.cell, result.strategies = cell.name, [cls.name for cls in cell.strategies]
    ranks = ranks_from_env()
    device = resolve_device(config.device, ranks.local_rank if launched_by_torchrun() else None)
    result.device = {"type": device.type}
    if launched_by_torchrun():
        result.rank = {"rank": ranks.rank, "local_rank": ranks.local_rank, "world_size": ranks.world_size}
    try:
        if device.type != "cuda":
            return _measure_cell(cell, config, device, result, emit)
        return _measure_cuda_cell(cell, config, device, result, emit, snapshot_path)
    finally:
        shutdown_process_group()


def _measure_cuda_cell(cell, config: BenchConfig, device: torch.device, result: CellResult, emit: EventSink,
                       snapshot_path: Path | None) -> CellResult:
    result.device = {**(result.device or {}), **cuda_memory.device_info(device)}
    # NVML first: its device-wide fallback subtracts what was in use before this cell allocated anything.
    sampler = cuda_memory.NvmlSampler(device).start()
    snapshot = MemorySnapshot() if config.memory_snapshot and snapshot_path else None
    if snapshot:
        snapshot.start()
        result.notes.append(SNAPSHOT_SLOWS_STEPS)
    try:
        if config.gpu_memory_limit:
            apply_memory_cap(config, device, result, {library for cls in cell.strategies for library in cls.libraries_for(config)})
        return _measure_cell(cell, config, device, result, emit, sampler)
    finally:
        sampler.stop()
        if snapshot and snapshot_path:
            try:
                result.memory_snapshot = str(snapshot.dump(snapshot_path))
            except Exception as error:  # never let the snapshot hide why the cell failed
                result.notes.append(f"memory snapshot not written: {type(error).__name__}: {error}")


def _measure_cell(
    cell,
    config: BenchConfig,
    device: torch.device,
    result: CellResult,
    emit: EventSink,
    sampler: cuda_memory.NvmlSampler | None = None,
) -> CellResult:
    started = time.perf_counter()
    ranks = ensure_process_group(device) if launched_by_torchrun() else ranks_from_env()

    emit({"event": "phase", "phase": "data"})
    data = prepare_data(config)
    result.data = data.info
    if ranks.is_distributed:
        check_rank_split(config, len(data.train), ranks.world_size)
    if config.model.vocab_rows > data.tokenizer_size and not config.model.pretrained:
        result.notes.append(
            f"the model has {config.model.vocab_rows:,} vocabulary rows and the tokenizer {data.tokenizer_size:,} tokens: "
            "the extra rows stay, so memory and time match the seed's model"
        )

    emit({"event": "phase", "phase": "model"})
    loaded = load_model(config.model, data.tokenizer_size, data.pad_token_id, config.train.seed)
    model = loaded.model
    # LoRA trains a newly initialised head in full (modules_to_save): it must know which.
    ctx = RunContext(config, device, new_head_modules=loaded.report.new_head_modules, rank=ranks.rank,
                     world_size=ranks.world_size)
    result.model = {
        **loaded.report.to_dict(),
        "vocab_rows": model.config.vocab_size,
        "hidden_size": model.config.hidden_size,
        "num_layers": model.config.num_hidden_layers,
        "attention": model.config._attn_implementation,
    }
    # What loading did is in result.model['load_notes'], which every table shows once.
    plan = build_plan(cell, model, ctx)
    result.strategy_facts = plan.facts
    if device.type == "cpu" and plan.facts["compute_dtype"] != "float32":
        result.notes.append(f"compute copy runs in {plan.facts['compute_dtype']} on the CPU")
    for strategy in plan.strategies:
        result.notes += strategy.table_notes(ctx)
    trainable, total = plan.facts["trainable_parameters"], plan.facts["total_parameters"]
    if trainable < total:
        result.notes.append(f"trains {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")

    if device.type == "cuda":
        cuda_memory.reset_peaks(device)
    window = PeakWindow(device, sampler, plan.recompiles_on_new_shapes)

    def forward_step(event: StepEvent) -> None:
        emit({"event": "step", "step": event.step, "total": event.total_steps, "epoch": event.epoch,
              "loss": event.loss, "seconds": event.seconds, "tracked": event.tracked})
        if event.tracked:
            window.after_tracked_step(more_steps=event.step < event.total_steps)

    emit({"event": "phase", "phase": "train"})
    try:
        outcome = train(plan, data.train, data.masking, ctx, forward_step)
    finally:
        if sampler is not None:
            record_cuda_memory(result, device, sampler.stop(), window.description)
    record_training(result, outcome, config)
    result.notes += window.notes
    if plan.recompiles_on_new_shapes:
        record_compile_time(result, outcome)
    record_paged_state(result, plan.optimizer)

    emit({"event": "phase", "phase": "eval"})
    # No more rows per forward than training ran (a micro-batch under accumulation): with
    # the full vocabulary's logits, a wider evaluation could fail where training fitted.
    eval_rows = min(config.train.eval_batch_size, plan.rows_per_forward)
    result.evaluation = {
        "rows_per_forward": eval_rows,
        "why": "at most the rows of one training forward, so that evaluation never holds more logits than training",
    }
    try:
        scores = evaluate(plan.predictor, data.eval_set, device, eval_rows, plan.precision.autocast)
    except BaseException as error:  # noqa: BLE001 - only an out-of-memory error is handled here
        if not is_out_of_memory(error):
            raise
        return _evaluation_ran_out(result, error, started)
    record_scores(result, scores, config.data.objective)
    record_cell_totals(result, started)
    result.status, result.reason = "ok", None
    return result


def _evaluation_ran_out(result: CellResult, error: BaseException, started: float) -> CellResult:
    """Training finished and its figures stand; only evaluation failed, so the row says so
    instead of becoming an oom row without figures."""
    result.oom = oom_details(error)
    record_cell_totals(result, started)
    result.status = "eval-oom"
    result.reason = f"training finished, evaluation ran out of memory ({first_line(error)}); every training figure stands"
    return result


def record_cell_totals(result: CellResult, started: float) -> None:
    result.record(
        "peak_rss_mib", to_mib(peak_rss_bytes()), "MiB", "getrusage ru_maxrss: whole-process lifetime peak, includes Python and libraries"
    )
    result.record(
        "cell_seconds", round(time.perf_counter() - started, 3), "s", "wall time of the whole cell in the worker: data, model, train, eval"
    )


def record_scores(result: CellResult, scores: EvalScores, objective: str) -> None:
    """The eval figures, each saying which objective trained the model it scores."""
    trained = f"trained under data.objective={objective}"
    if scores.next_token_accuracy is not None:
        record_next_token_scores(result, scores, trained)
        return
    result.record(
        "eval_masked_accuracy", scores.masked_accuracy, "fraction",
        f"correct predictions at the {scores.masked_tokens} masked eval positions ({trained})",
    )
    result.record(
        "eval_token_accuracy", scores.token_accuracy, "fraction",
        f"the seed's accuracy: predictions equal to the input ids over all {scores.scored_tokens} non-padding eval "
        f"tokens, masked or not ({trained})",
    )
    scored = "every position, padding included" if objective == REFERENCE_OBJECTIVE else "the masked positions"
    result.record(
        "eval_loss", scores.loss, "nats/token",
        f"the objective's loss: mean cross-entropy over the {scores.labelled_tokens} labelled eval positions "
        f"({scored}; data.objective={objective})",
    )


def record_next_token_scores(result: CellResult, scores: EvalScores, trained: str) -> None:
    """A causal LM's eval figures: next-token accuracy, its loss and perplexity."""
    result.record(
        "eval_next_token_accuracy", scores.next_token_accuracy, "fraction",
        f"argmax equal to the next token at the {scores.scored_tokens} real eval positions that have one ({trained})",
    )
    result.record(
        "eval_loss", scores.loss, "nats/token",
        f"the causal LM's loss: mean next-token cross-entropy over {scores.labelled_tokens} eval positions, "
        f"padding ignored ({trained})",
    )
    result.record("eval_perplexity", scores.perplexity, "perplexity", "exp(eval_loss)")


def record_cuda_memory(result: CellResult, device: torch.device, nvml: cuda_memory.NvmlReading,
                       window: str = "over the training steps") -> None:
    allocated, reserved = cuda_memory.allocator_peaks(device)
    result.record("peak_allocated_mib", to_mib(allocated), "MiB", f"torch.cuda.max_memory_allocated {window}")
    result.record("peak_reserved_mib", to_mib(reserved), "MiB", f"torch.cuda.max_memory_reserved {window}")
    nvml_mib = None if nvml.peak_bytes is None else to_mib(nvml.peak_bytes)
    result.record("nvml_process_peak_mib", nvml_mib, "MiB", f"{nvml.method}, {window}")
    record_segments(result, device, reserved)
    cap = result.memory_cap
    note = overshoot_note(cap, nvml_mib) if cap else None
    if cap and nvml_mib is not None and note:
        cap["nvml_overshoot_mib"] = round(nvml_mib - float(cap["limit_mib"]), 1)
        result.notes.append(note)


def record_segments(result: CellResult, device: torch.device, peak_reserved: int) -> None:
    """The allocator's reserved segments by size, read at the end of the training loop: nothing
    empties the cache between the training steps and here (only a compiled cell's window does,
    before its compiled steps), so the reserve is still the one the steps built up."""
    try:
        segments, reserved_now = cuda_memory.reserved_segments(device)
    except Exception as error:  # a diagnostic: never fail the cell for it
        result.notes.append(f"reserved segments not read: {type(error).__name__}: {error}")
        return
    sizes = segment_sizes(segments)
    when = ("the reserve then equals the peak reserved" if reserved_now == peak_reserved
            else f"the reserve then is {to_mib(reserved_now):,} MiB, the peak reserved {to_mib(peak_reserved):,} MiB")
    result.record(
        "reserved_segments", sizes, "[MiB, count] pairs",
        f"torch.cuda.memory_snapshot() at the end of the training loop, before anything empties the cache: the caching "
        f"allocator's segments by size, largest first, summing to {to_mib(sum(int(s['total_size']) for s in segments)):,} "
        f"MiB ({when})",
    )
    result.record("largest_segment_mib", sizes[0][0] if sizes else None, "MiB",
                  "the largest reserved segment at the end of the training loop (reserved_segments)")


def record_paged_state(result: CellResult, optimizer: Any) -> None:
    """Optimizer state in CUDA unified memory (paged-adam8bit): invisible to the allocator's
    figures, so it gets its own, in the metrics and beside the host side of the breakdown."""
    paged = paged_state_bytes(optimizer)
    if not paged:
        return
    result.record(
        "paged_optimizer_state_mib", to_mib(paged), "MiB",
        "bytes of bitsandbytes' paged optimizer state (cudaMallocManaged): outside torch's allocator, so not in "
        "the allocated or reserved peaks; MemTracker files it as host memory",
    )
    for device, categories in result.memory_breakdown.items():
        if device.startswith("cpu"):
            categories["paged_optimizer_state_mib"] = to_mib(paged)


def record_compile_time(result: CellResult, outcome: TrainOutcome) -> None:
    """Compilation happens inside the first step, which no timing includes; its excess over a
    steady step is the compile time, reported apart so that step time stays comparable."""
    first, steady = outcome.first_step_seconds, outcome.mean_step_seconds
    seconds = None if first is None or steady is None else round(max(first - steady, 0.0), 3)
    result.record(
        "compile_seconds", seconds, "s", "first optimizer step minus the mean steady step: torch.compile's tracing and code generation "
        "(evaluation compiles its own graph on top, outside every timing)",
    )


def record_training(result: CellResult, outcome: TrainOutcome, config: BenchConfig) -> None:
    epoch_seconds, epoch_method = outcome.epoch_time
    result.record("epoch_seconds", None if epoch_seconds is None else round(epoch_seconds, 4), "s", epoch_method)
    result.record("epoch_time_extrapolated", not outcome.epoch_seconds, "bool", "true when fewer than one full epoch was timed")
    result.record(
        "samples_per_second", None if not epoch_seconds else round(outcome.samples_per_epoch / epoch_seconds, 3),
        "samples/s", "training samples per epoch / epoch_seconds",
    )
    mean_step = outcome.mean_step_seconds
    result.record(
        "mean_step_seconds", None if mean_step is None else round(mean_step, 5), "s", f"mean of {len(outcome.step_seconds)} timed optimizer steps (steady state: warm-up and tracked steps excluded)"
    )
    result.record(
        "first_step_seconds", outcome.first_step_seconds, "s", "the first optimizer step: lazy initialisation and warm-up, not in any timing"
    )
    result.record(
        "tracked_step_seconds", outcome.tracked_step_seconds, "s", "the step run under MemTracker (slowed by tracking; not in any timing)"
    )
    result.record("steps_run", outcome.steps_run, "steps", f"optimizer steps run of {outcome.total_steps} planned")
    window = outcome.losses[-FINAL_LOSS_WINDOW:]
    result.record(
        "final_train_loss", sum(window) / len(window) if window else None, "nats/token",
        f"mean loss of the last {len(window)} optimizer steps (data.objective={config.data.objective})"
    )
    result.record("nonfinite_loss_steps", outcome.nonfinite_losses, "steps", "optimizer steps whose loss was NaN or infinite")

    breakdown = {}
    for peak in outcome.tracked_peaks:
        breakdown[peak.device] = {
            "total_mib": to_mib(peak.total_bytes),
            **{f"{name}_mib": to_mib(value) for name, value in peak.by_category.items()},
        }
    result.memory_breakdown = breakdown
    if breakdown:
        compute_device = result.device_type
        assert compute_device is not None  # run_cell records the device before anything runs
        compute_peaks = [p for p in outcome.tracked_peaks if p.device.startswith(compute_device)]
        host_peaks = [p for p in outcome.tracked_peaks if p.device.startswith("cpu")]
        method = "torch MemTracker: peak live tensor bytes during one full optimizer step (forward, backward, update), the second of the run so that optimizer state is live"
        if compute_peaks:
            result.record("tracked_peak_mib", to_mib(compute_peaks[0].total_bytes), "MiB", f"{method}, on {compute_peaks[0].device}")
        if compute_device != "cpu" and host_peaks:
            result.record("tracked_host_peak_mib", to_mib(host_peaks[0].total_bytes), "MiB", f"{method}, on the host")
    if outcome.epoch_seconds == [] and config.train.max_steps:
        result.notes.append(f"short run (train.max_steps={config.train.max_steps}): epoch time is extrapolated")
