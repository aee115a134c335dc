"""Setups the tracer cannot follow, modelled around a trace of their nearest traceable cell.

Four strategies cannot run on fake tensors, and ``fit`` must still weigh them, because for
an LLM larger than the card they are the answers:

* ``fsdp-offload``: FSDP2 takes its compute device from the device mesh, which the meta
  stand-in of a CPU-only trace cannot be, and only there are host and device apart (plain
  ``fsdp`` is traced, on fake CPU tensors in a fake process group: ``trace.trace_cell``).
* ``qlora``: bitsandbytes quantises real values (a fake tensor has none).
* ``paged-adam8bit``: its state lives in CUDA unified memory, which the driver pages to the
  host; the trace follows the allocator only. Modelled as strategy 3 with its state on the host.
* ``adam4bit``: torchao's compiled update quantises real values too, inside torch.compile.

Each is modelled as a *proxy trace plus a substitution*: the cell without the strategy (or,
for qlora, with plain LoRA in its place) is traced on fake tensors as usual, and only what
the strategy changes is replaced by bytes counted from the model's own parameter shapes.
Activations and temporaries therefore stay traced, and the substitution is spelled out in
the figure's label (``method``): every such figure is reported as modelled, never as traced.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..config import BenchConfig
from ..measure.tracker import TrackedPeak
from ..metrics import OPTIMIZER_STATE as OPTIMIZER_STATE_CATEGORY
from ..modeling import build_shape_model
from ..strategies import Cell, RunContext, Strategy, combination_refusal, launch_refusal
from ..strategies.facts import EstimateKind
from ..strategies.architecture import repeated_blocks
from ..strategies.qlora import DOUBLE_QUANT, modules_kept_unquantized
from ..strategies.torchao_optim import BLOCK_SIZE, QUANTISED_FROM_VALUES, moment_bytes
from ..strategies.registry import lookup
from ..units import format_size
from .trace import (
    STATE_CATEGORIES,
    CellTrace,
    Limit,
    TraceInputs,
    TraceTarget,
    fake_mode,
    sharded_target,
    trace_cell,
    transient_bytes,
)

OPTIMIZER_STATE = OPTIMIZER_STATE_CATEGORY.name

# --------------------------------------------------------------------------- NF4 bytes

#: bitsandbytes' 4-bit layout (``quantize_4bit``, the default Linear4bit settings): two 4-bit
#: codes per uint8, one absmax per block of 64 weights, and a 16-value code book.
NF4_BLOCK = 64
NF4_CODE_BYTES = 16 * 4
#: Double quantisation stores each absmax as one uint8 (minus their mean), with one fp32
#: absmax per 256 of those, a 256-value fp32 code book and the fp32 mean ("offset").
NESTED_BLOCK = 256
NESTED_CODE_BYTES = 256 * 4
OFFSET_BYTES = 4


def nf4_bytes(numel: int, double_quant: bool) -> int:
    """Bytes of one weight of ``numel`` values quantised to NF4, its constants included.

    About 0.5 byte per weight packed, plus 4/64 byte of absmax, or 1/64 + 4/16384 with
    double quantisation; ``tests/test_estimate_llm.py`` checks it against bitsandbytes."""
    packed = math.ceil(numel / 2)
    blocks = math.ceil(numel / NF4_BLOCK)
    if double_quant:
        constants = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + NESTED_CODE_BYTES + OFFSET_BYTES
    else:
        constants = 4 * blocks
    return packed + constants + NF4_CODE_BYTES


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ModelledTrace:
    device: TrackedPeak
    host: TrackedPeak | None
    facts: dict[str, Any]
    seconds: float
    stopped: bool
    #: What was traced and what was modelled, in one sentence; shown with the figure.
    method: str
    #: The proxy's own trace: its allocation sequence gives the caching allocator's reserve
    #: beyond the tensors, which the modelled figure takes over (``predict._reserve_of``).
    proxy: CellTrace | None = None


def _peak(device: str, by_category: dict[str, int]) -> TrackedPeak:
    return TrackedPeak(device, sum(by_category.values()), dict(by_category))


def proxy_cell(cell: Cell, modelled: type[Strategy]) -> Cell:
    """The cell the estimate traces for ``modelled``: the strategy its ``estimate`` fact names in
    its place (qlora: lora, the same adapters on the unquantised base), or none (fsdp-offload)."""
    stand_in = modelled.estimate.traced_in_its_place
    replacement = () if stand_in is None else (lookup(stand_in),)
    rest = tuple(cls for cls in cell.strategies if cls is not modelled)
    return Cell(tuple(sorted(rest + replacement, key=lambda cls: cls.order)))


def with_proxy_method(method: str, trace: CellTrace) -> str:
    """The model's method, and how its proxy's trace stood in for what the stand-in cannot run
    (amp's autocast), so that neither is lost from the figure's label."""
    return method if not trace.method else f"{method}; the proxy {trace.method}"


def _check_modelled_cell(cell: Cell, config: BenchConfig, target: TraceTarget) -> None:
    """What a traced cell is checked for (combinations, config, installation), but the trace refusal."""
    ctx = RunContext(config, target.device, new_head_modules=(), tracing=True)  # no checkpoint is read: no head is new
    for strategy in launch_refusal(cell, config):
        strategy.device_refusal(ctx)


# --------------------------------------------------------------------------- fsdp-offload


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


@dataclass(frozen=True)
class FsdpUnits:
    """Bytes of FSDP's units: the root (everything outside the blocks) and the largest block."""

    blocks: int
    block_class: str
    root_parameters: int
    root_trainable: int
    block_parameters: int
    block_trainable: int

    @classmethod
    def of(cls, model: nn.Module) -> "FsdpUnits":
        blocks, _ = repeated_blocks(model)  # fsdp-offload's own units (it raises where there are none)
        inside = {id(p) for block in blocks for p in block.parameters()}
        root = [p for p in model.parameters() if id(p) not in inside]
        largest = max(blocks, key=lambda block: _bytes(block.parameters()))
        block_params = list(largest.parameters())
        return cls(
            len(blocks),
            type(largest).__name__,
            _bytes(root), _bytes(p for p in root if p.requires_grad),
            _bytes(block_params), _bytes(p for p in block_params if p.requires_grad),
        )

    def device_parameters(self) -> int:
        # The root's weights are gathered at the first forward and kept until its backward
        # ends (fsdp-offload's ROOT_RESHARD = False). Two blocks are in flight (the running
        # one and the one FSDP prefetches), each as the copy moved from the host and the
        # gathered weights made from it.
        return self.root_parameters + 2 * 2 * self.block_parameters

    def device_gradients(self) -> int:
        # The root's gradients wait on the device for its post-backward, at the end of
        # backward; a block's gradients, and the reduce-scatter's output made from them,
        # until they are copied to the host.
        return self.root_trainable + 2 * self.block_trainable

    def resident(self) -> int:
        return self.device_parameters() + self.device_gradients()


class Modeller:
    """A strategy the trace cannot follow, modelled around a trace of its proxy cell: the cell
    with the strategy taken out or replaced (``proxy_cell``). Each modeller says, in ``model``,
    how the proxy's trace becomes the strategy's figures."""

    def __init__(self, strategy: type[Strategy]) -> None:
        self.strategy = strategy
        #: The ranks the cell runs on: its proxy is traced as rank 0 of that many (``trace_cell``).
        self.world_size = 1

    def proxy(self, cell: Cell) -> Cell:
        return proxy_cell(cell, self.strategy)

    def run(self, cell: Cell, config: BenchConfig, inputs: TraceInputs, target: TraceTarget,
            limit: Limit | None, world_size: int = 1) -> ModelledTrace:
        started = time.perf_counter()
        self.world_size = world_size
        _check_modelled_cell(cell, config, target)
        return self.model(cell, self.proxy(cell), config, inputs, target, limit, started)

    def model(self, cell: Cell, proxy: Cell, config: BenchConfig, inputs: TraceInputs, target: TraceTarget,
              limit: Limit | None, started: float) -> ModelledTrace:
        raise NotImplementedError


class FsdpUnitsModel(Modeller):
    """fsdp-offload: the proxy is the cell without it, on the device in fp32."""

    def model(self, cell: Cell, proxy: Cell, config: BenchConfig, inputs: TraceInputs, target: TraceTarget,
              limit: Limit | None, started: float) -> ModelledTrace:
        units: list[FsdpUnits] = []

        def inspect(plan) -> None:
            units.append(FsdpUnits.of(plan.model))

        # Against the limit: what the device would hold, the traced activations and
        # temporaries plus FSDP's resident bytes (the proxy's own weights stay out).
        # Its own units replace the proxy's weights: no DDP around it (data_parallel=False).
        trace = trace_cell(proxy, config, inputs, target, limit, inspect,
                           counted=lambda by_category: transient_bytes(by_category) + units[0].resident(),
                           world_size=self.world_size, data_parallel=False)
        unit = units[0]
        transient = trace.device.by_category if trace.stopped else trace.transient
        device = {
            "parameters": unit.device_parameters(),
            "gradients": unit.device_gradients(),
            "buffers": transient.get("buffers", 0),
            **{category: transient.get(category, 0) for category in ("activations", "temporaries", "other")},
        }
        host = None
        if not trace.stopped:
            # The offloaded state is the proxy's own: the same tensors, on the host, taken at
            # the moment they peaked together (the optimizer's update).
            # With N ranks each host keeps 1/N of it (FSDP's shards, padding aside).
            host = _peak("cpu", {category: math.ceil(trace.state.get(category, 0) / self.world_size)
                                 for category in STATE_CATEGORIES})
        blocks = f"{unit.blocks} {unit.block_class} block(s)"
        method = (
            f"modelled, not traced (a trace cannot keep FSDP's offloaded host shards apart from the device): activations and temporaries traced on "
            f"'{proxy.name}' (the same cell in place); FSDP's device bytes counted from the model's shapes: "
            f"the root unit (everything outside {blocks}: {format_size(unit.root_parameters)}) with its gradients "
            f"for the whole step, two blocks in flight as host copy and gathered weights "
            f"({format_size(unit.block_parameters)} each), one block's gradients twice; the maxima are added, "
            f"an upper bound; host: the parameters, gradients and optimizer state traced on '{proxy.name}'"
            + (f", divided by the {self.world_size} ranks (each keeps its shard; FSDP's padding aside); "
               f"traced as rank 0 of {self.world_size} on its share of each batch" if self.world_size > 1 else "")
        )
        facts = dict(trace.facts)
        facts["modelled"] = {"strategy": self.strategy.key, "proxy": proxy.name, "fsdp_units": vars(unit)}
        method = with_proxy_method(method, trace)
        return ModelledTrace(_peak(str(target.device), device), host, facts, time.perf_counter() - started,
                             trace.stopped, method, trace)


# --------------------------------------------------------------------------- qlora


def quantised_sizes(model: nn.Module) -> list[tuple[int, int]]:
    """(values, bytes per value) of each weight the qlora strategy quantises: every Linear but
    those it keeps (transformers' own list, the LM head and what is tied to the input
    embeddings), as ``replace_with_bnb_linear`` chooses. An estimate reads no checkpoint, so
    no head is known to be new (its RunContext has no new_head_modules) and none is kept for that."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = modules_kept_unquantized(model, [])
    return [
        (module.weight.numel(), module.weight.element_size())
        for name, module in model.named_modules()
        if type(module) is nn.Linear and should_convert_module(name, skip)
    ]


def _shape_model_sizes(config: BenchConfig, inputs: TraceInputs) -> list[tuple[int, int]]:
    """``quantised_sizes`` of the cell's model as built, before any strategy wraps it (peft's
    adapters are Linear modules too), on fake tensors: nothing is allocated."""
    with fake_mode():
        model = build_shape_model(config.model, inputs.tokenizer_size, inputs.pad_token_id, config.train.seed)
        return quantised_sizes(model)


class Nf4WeightsModel(Modeller):
    """qlora: the proxy is the same cell with LoRA (the same adapters) on the fp32 base."""

    def model(self, cell: Cell, proxy: Cell, config: BenchConfig, inputs: TraceInputs, target: TraceTarget,
              limit: Limit | None, started: float) -> ModelledTrace:
        double_quant = DOUBLE_QUANT  # what the qlora strategy configures (bnb_4bit_use_double_quant)
        quantised = _shape_model_sizes(config, inputs)

        def substituted(by_category: dict[str, int]) -> dict[str, int]:
            full = sum(numel * size for numel, size in quantised)
            # Each matmul dequantises its weight to the compute dtype (the model's) first: one
            # at a time, so the largest is the most such a temporary adds.
            dequantised = max((numel * size for numel, size in quantised), default=0)
            changed = dict(by_category)
            changed["parameters"] = by_category.get("parameters", 0) - full
            changed["quantized_weights"] = sum(nf4_bytes(numel, double_quant) for numel, _ in quantised)
            changed["temporaries"] = by_category.get("temporaries", 0) + dequantised
            return changed

        trace: CellTrace = trace_cell(proxy, config, inputs, target, limit,
                                      counted=lambda by_category: sum(substituted(by_category).values()),
                                      world_size=self.world_size)
        device = substituted(trace.device.by_category)
        numel = sum(n for n, _ in quantised)
        nf4 = device["quantized_weights"]
        method = (
            f"modelled, not traced (bitsandbytes quantises real values): traced as '{proxy.name}' (the same "
            f"adapters on the unquantised base), then the {len(quantised)} quantised weights' "
            f"{format_size(sum(n * s for n, s in quantised))} replaced by NF4's {format_size(nf4)} "
            f"({nf4 / max(numel, 1):.3f} byte per weight: 0.5 packed, one absmax per {NF4_BLOCK} weights"
            f"{', double-quantised' if double_quant else ''}), plus one dequantised weight as a temporary"
        )
        facts = dict(trace.facts)
        facts["modelled"] = {"strategy": self.strategy.key, "proxy": proxy.name, "quantized_parameters": numel,
                             "quantized_weight_bytes": nf4, "double_quant": double_quant}
        method = with_proxy_method(method, trace)
        return ModelledTrace(_peak(str(target.device), device), None, facts, time.perf_counter() - started,
                             trace.stopped, method, trace)


# --------------------------------------------------------------------------- paged state


class PagedStateModel(Modeller):
    """paged-adam8bit: the proxy is the same cell with strategy 3 (the same 8-bit optimizer and
    state, in device memory); its optimizer state is then counted on the host side.

    bitsandbytes allocates paged state in CUDA unified memory, which the driver pages out to
    the host when the device runs short: for a budget the device cannot meet otherwise, that
    is where the state lives. It is counted there, never dropped: the host column shows it."""

    def model(self, cell: Cell, proxy: Cell, config: BenchConfig, inputs: TraceInputs, target: TraceTarget,
              limit: Limit | None, started: float) -> ModelledTrace:

        def paged_out(by_category: dict[str, int]) -> dict[str, int]:
            return {**by_category, OPTIMIZER_STATE: 0}

        trace = trace_cell(proxy, config, inputs, target, limit,
                           counted=lambda by_category: sum(paged_out(by_category).values()), world_size=self.world_size)
        # The device's peak without the state may fall at another moment than the proxy's: the
        # largest of the moments the trace kept (its peak, activations' peak, the state's peak).
        moments = [trace.device.by_category] + ([] if trace.stopped else [trace.transient, trace.state])
        device = max((paged_out(moment) for moment in moments if moment), key=lambda moment: sum(moment.values()))
        paged = trace.device.by_category if trace.stopped else trace.state
        host = dict(trace.host.by_category) if trace.host is not None else {}
        host[OPTIMIZER_STATE] = host.get(OPTIMIZER_STATE, 0) + paged.get(OPTIMIZER_STATE, 0)
        method = (
            f"modelled, not traced (unified memory is outside the allocator the trace follows): traced as "
            f"'{proxy.name}' (the same 8-bit optimizer, its state in device memory), then its optimizer state "
            f"({format_size(paged.get(OPTIMIZER_STATE, 0))}) counted on the host side, where the driver pages it "
            f"when the device runs short; the page transfers each step are not in the time factor"
        )
        facts = dict(trace.facts)
        facts["modelled"] = {"strategy": self.strategy.key, "proxy": proxy.name,
                             "paged_state_bytes": paged.get(OPTIMIZER_STATE, 0)}
        method = with_proxy_method(method, trace)
        return ModelledTrace(_peak(str(target.device), device), _peak("cpu", host), facts,
                             time.perf_counter() - started, trace.stopped, method, trace)


# --------------------------------------------------------------------------- low-bit optimizer state


#: Adam's two moments per trained tensor.
MOMENTS = 2


@dataclass(frozen=True)
class LowBitState:
    """AdamW's moments on one device against the low-bit optimizer's, from the trained shapes."""

    device: str
    adamw_bytes: int
    low_bit_bytes: int
    quantised_tensors: int
    full_width_tensors: int

    @classmethod
    def of(cls, params: list, bits: int) -> "dict[str, LowBitState]":
        """One per device the trained tensors (the optimizer's parameters) live on."""
        by_device: dict[str, list] = {}
        for param in params:
            # A sharded parameter (FSDP's DTensor) has its moments on this rank's shard alone,
            # and torchao quantises that local tensor: count its shape, not the global one.
            local = param.to_local() if hasattr(param, "to_local") else param
            by_device.setdefault(str(param.device), []).append(local)
        return {
            device: cls(
                device,
                sum(MOMENTS * p.numel() * p.element_size() for p in group),
                sum(MOMENTS * moment_bytes(p.numel(), p.element_size(), bits) for p in group),
                sum(1 for p in group if moment_bytes(p.numel(), p.element_size(), bits) < p.numel() * p.element_size()),
                sum(1 for p in group if moment_bytes(p.numel(), p.element_size(), bits) >= p.numel() * p.element_size()),
            )
            for device, group in by_device.items()
        }

    def substituted(self, by_category: dict[str, int]) -> dict[str, int]:
        """``by_category`` with AdamW's moments replaced by the low-bit ones. Once the whole
        state is live (the traced second step), what the category holds beyond the moments is
        what AdamW allocates inside its step, which stays as traced; while the first step
        creates the moments, they are scaled in proportion."""
        if not self.adamw_bytes:
            return by_category
        changed = dict(by_category)
        traced = by_category.get(OPTIMIZER_STATE, 0)
        if traced >= self.adamw_bytes:
            changed[OPTIMIZER_STATE] = traced - self.adamw_bytes + self.low_bit_bytes
        else:
            changed[OPTIMIZER_STATE] = round(traced * self.low_bit_bytes / self.adamw_bytes)
        return changed


class LowBitStateModel(Modeller):
    """adam4bit: the proxy is the same cell with the baseline's AdamW (fp32 moments), whose
    moments are then replaced by torchao's quantised ones, counted from the trained shapes."""

    def __init__(self, strategy: type[Strategy]) -> None:
        super().__init__(strategy)
        # A class attribute of the strategy (adam4bit's ``state_bits``), which Strategy does not declare.
        bits = getattr(strategy, "state_bits", None)
        if not isinstance(bits, int):
            raise TypeError(f"{strategy.__name__} is modelled as low-bit-state but declares no state_bits")
        self.bits = bits

    def model(self, cell: Cell, proxy: Cell, config: BenchConfig, inputs: TraceInputs, target: TraceTarget,
              limit: Limit | None, started: float) -> ModelledTrace:
        states: list[dict[str, LowBitState]] = []

        def inspect(plan) -> None:
            states.append(LowBitState.of([p for group in plan.optimizer.param_groups for p in group["params"]], self.bits))

        def on(device: str, by_category: dict[str, int]) -> dict[str, int]:
            state = states[0].get(device) if states else None
            return state.substituted(by_category) if state else by_category

        # A sharded proxy is traced where FSDP2 can mesh (fake CPU tensors without CUDA).
        device_name = str((sharded_target(target) if any(cls.shards for cls in proxy.strategies) else target).device)
        trace = trace_cell(proxy, config, inputs, target, limit, inspect,
                           counted=lambda by_category: sum(on(device_name, by_category).values()),
                           world_size=self.world_size)
        device = on(device_name, trace.device.by_category)
        host = None if trace.host is None else _peak(trace.host.device, on(trace.host.device, trace.host.by_category))
        moved = {name: state for name, state in states[0].items()} if states else {}
        where = "; ".join(
            f"{name}: {format_size(state.adamw_bytes)} -> {format_size(state.low_bit_bytes)} "
            f"({state.quantised_tensors} tensor(s) quantised, {state.full_width_tensors} kept full width)"
            for name, state in moved.items()
        )
        method = (
            f"modelled, not traced (torchao's compiled update quantises real values): traced as '{proxy.name}' "
            f"(the baseline's AdamW), then its moments replaced by {self.bits}-bit ones counted from the trained "
            f"shapes ({self.bits} bits a value, one fp32 scale per {BLOCK_SIZE[self.bits]} values, a code book; "
            f"tensors under {QUANTISED_FROM_VALUES:,} values or not a multiple of the block keep full-width "
            f"moments): {where}; the update's temporaries are taken as AdamW's"
        )
        facts = dict(trace.facts)
        facts["modelled"] = {"strategy": self.strategy.key, "proxy": proxy.name, "state_bits": self.bits,
                             "optimizer_state": {name: vars(state) for name, state in moved.items()}}
        return ModelledTrace(_peak(device_name, device), host, facts, time.perf_counter() - started,
                             trace.stopped, method, trace)


# --------------------------------------------------------------------------- which


#: The modellers by the name a strategy's ``estimate = modelled_by(name, ...)`` gives.
MODELLERS: dict[str, type[Modeller]] = {
    "fsdp-units": FsdpUnitsModel,
    "nf4-weights": Nf4WeightsModel,
    "paged-state": PagedStateModel,
    "low-bit-state": LowBitStateModel,
}


def can_model(cls: type[Strategy]) -> bool:
    """Whether the strategy declares a modelled estimate whose modeller is registered here."""
    return cls.estimate.kind is EstimateKind.MODELLED and cls.estimate.modeller in MODELLERS


def modeller_for(cell: Cell, device_type: str) -> Modeller | None:
    """The modeller for a cell with one untraceable strategy that has a model, whose proxy
    cell is itself a valid, traceable cell; None otherwise (the cell is then not traced)."""
    refusing = [cls for cls in cell.strategies if cls.trace_refusal(device_type)]
    if len(refusing) != 1 or not can_model(refusing[0]):
        return None
    modeller = MODELLERS[str(refusing[0].estimate.modeller)](refusing[0])
    try:
        proxy = modeller.proxy(cell)
    except Exception:  # noqa: BLE001 - e.g. no lora strategy registered for qlora's proxy
        return None
    if combination_refusal(proxy) or any(cls.trace_refusal(device_type) for cls in proxy.strategies):
        return None
    return modeller
