"""Trace one full training step of a cell on fake tensors and read its memory peak.

Under ``FakeTensorMode`` every tensor has a shape, dtype and device but no storage,
so the real model, the real strategy hooks and the real training step run without
allocating. The same ``StepMemoryTracker`` that measures CPU runs watches the
traced step, so a prediction and a CPU measurement count bytes identically.

As in a real run, the tracked step is the second: the first creates the optimizer
state, which is then live during the second step's forward and backward.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode

from ..config import BenchConfig, from_dict
from ..data.prepare import prepare_data
from ..data.masking import IGNORE_INDEX
from ..metrics import ACTIVATIONS, GRADIENT_BUCKETS, PARAMETERS, Role, categories_in
from ..measure.tracker import StepMemoryTracker, TrackedPeak, named_categories
from ..modeling import build_shape_model
from ..strategies import Cell, RunContext, build_plan, device_refusal
from ..strategies.base import Precision
from ..strategies.amp import AutocastPrecision
from ..strategies.architecture import repeated_blocks
from ..strategies.distributed import fake_process_group
from ..training.batches import epoch_batches, rank_share
from ..training.loop import optimizer_step
from ..training.schedule import linear_schedule_with_warmup
from .allocations import AllocationRecorder, AllocationSequence, WorkspaceRule
from .autocast import cuda_autocast_rules, lower_precision_dtype
from .depth import Moments, StepPosition

HOST = "cpu"


@dataclass(frozen=True)
class TraceTarget:
    """The device a trace puts the compute side on, and what that means for the numbers."""

    device: torch.device
    label: str
    caveat: str | None
    #: Tensors stand in for a GPU's (no CUDA in this torch): the meta device, or fake CPU
    #: tensors where FSDP2 needs a device mesh (the meta device cannot have one).
    stand_in: bool = False

    @property
    def stands_in(self) -> bool:
        return self.stand_in or self.device.type == "meta"


def trace_target() -> TraceTarget:
    """Fake CUDA tensors where this torch can make them; else the meta device stands in.

    A CPU-only torch refuses to move even a fake tensor to CUDA (its Python bindings
    need the CUDA runtime), so there the compute side is traced on ``meta``: the same
    shapes and dtypes, kept apart from the host side that strategy 4 uses.
    """
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        return TraceTarget(device, f"fake CUDA tensors ({torch.cuda.get_device_name(device)})", None)
    return TraceTarget(
        torch.device("meta"),
        "fake tensors on a stand-in device (this torch has no CUDA)",
        "traced without CUDA: tensors are counted exactly; dropout is traced as CUDA's fused kernel "
        "(a 1-byte mask), and the reserve's cuBLAS workspaces take Hopper's default size",
        stand_in=True,
    )


#: What a sharded cell (fsdp) is traced on where this torch has no CUDA: FSDP2 meshes a real
#: device type, and the meta device is none. Nothing else lives on the host in such a cell.
SHARDED_NOTE = ("sharded cells (fsdp) are traced on fake CPU tensors standing in for the GPU: FSDP2 needs a "
                "device mesh, which the meta stand-in cannot have; the stand-in's rules (fused dropout and sdpa, "
                "CUDA's autocast lists) apply as on the meta device")


def sharded_target(target: TraceTarget) -> TraceTarget:
    """The target a sharded cell is traced on: the same where it is fake CUDA, else fake CPU tensors."""
    if not target.stands_in:
        return target
    return TraceTarget(torch.device("cpu"), f"{target.label}; sharded cells on fake CPU tensors", target.caveat,
                       stand_in=True)


@dataclass(frozen=True)
class TraceInputs:
    """What the trace takes from the data: the vocabulary and two real batches' shapes."""

    tokenizer_size: int
    pad_token_id: int
    batches: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


def trace_inputs(config: BenchConfig) -> TraceInputs:
    """The vocabulary and the first two batches a real run of ``config`` would train on."""
    data = prepare_data(config)
    batches = epoch_batches(
        data.train, data.masking, config.train.batch_size, config.train.seed, epoch=0, objective=config.data.objective
    )
    first = next(batches)
    second = next(batches, first)  # a one-batch data set repeats its batch, as a second epoch would
    return TraceInputs(data.tokenizer_size, data.pad_token_id, (first, second))


@dataclass(frozen=True)
class CellTrace:
    cell: str
    device: TrackedPeak
    host: TrackedPeak | None
    facts: dict[str, Any]
    seconds: float
    #: The step was stopped when the limit was passed: ``device`` is what was live at that
    #: moment, a lower bound of the step's peak (see :class:`Limit`).
    stopped: bool = False
    #: Bytes by category at the moment activations and temporaries on the device peaked
    #: (a modeller adds its own placement to them; see ``modelled.py``).
    transient: dict[str, int] = field(default_factory=dict)
    #: Bytes by category at the moment weights, gradients and optimizer state together peaked.
    state: dict[str, int] = field(default_factory=dict)
    #: How the trace stood in for what the stand-in device cannot run (autocast), in one
    #: sentence shown with the figure; None when the step was traced as a run would take it.
    method: str | None = None
    #: The device's allocations and frees from the model's placement through the third step,
    #: for the allocator model (``reserved.py``); None for a stopped trace.
    allocations: AllocationSequence | None = None
    #: The measured step's moments (``depth.py``), when asked for (``trace_cell(moments=True)``).
    moments: Moments = field(default_factory=dict)


#: What a device snapshot's limit is compared with: the total, or a modeller's figure for it.
Counted = Callable[[dict[str, int]], int]

#: Live bytes that are not the model's own state: what a step adds to its weights,
#: gradients and optimizer state.
TRANSIENT_CATEGORIES = categories_in(Role.TRANSIENT)
#: The model's own state: what an offload moves to the host.
STATE_CATEGORIES = categories_in(Role.STATE)


def transient_bytes(by_category: dict[str, int]) -> int:
    return sum(by_category.get(category, 0) for category in TRANSIENT_CATEGORIES)


def state_bytes(by_category: dict[str, int]) -> int:
    return sum(by_category.get(category, 0) for category in STATE_CATEGORIES)


@dataclass(frozen=True)
class Limit:
    """Stop a trace once the live tensor bytes on the device pass ``bytes``.

    ``fit`` only needs to know that a setup does not fit, and an 8B model's traced step
    takes a minute: a setup whose weights alone pass the budget is known not to fit at its
    first operator. Any moment of either traced step counts, the first included: a real run
    would run out of memory in it just the same."""

    bytes: int


class _StopTrace(Exception):
    def __init__(self, total: int, by_category: dict[str, int]) -> None:
        super().__init__("the limit was passed")
        self.total, self.by_category = total, by_category


class _Watcher:
    """Follows the device's live bytes after every operator: keeps the moments activations
    and temporaries, and the model's state, peak; stops the step when ``counted`` passes the limit."""

    def __init__(self, device: str, limit: Limit | None, counted: Counted | None,
                 constant: dict[str, int] | None = None) -> None:
        self.device, self.limit, self.counted = device, limit, counted
        #: Bytes no tensor shows but the device holds throughout (DDP's buckets), added to every snapshot.
        self.constant = constant if constant is not None else {}
        self.transient: dict[str, int] = {}
        self.state: dict[str, int] = {}
        #: Where in the step an operator runs (``depth.StepPosition``), while moments are kept.
        self.position: Callable[[], tuple[int, str, str]] | None = None
        #: Each moment's largest live bytes, on every device (``depth.py``).
        self.moments: Moments = {}

    def __call__(self, device: str, snapshot: dict[Any, int]) -> None:
        if device != self.device and self.position is None:
            return
        total, by_category = named_categories(snapshot)
        if device == self.device:
            for category, size in self.constant.items():
                by_category[category] = by_category.get(category, 0) + size
                total += size
        if self.position is not None:
            moment = (device, *self.position())
            if moment not in self.moments or total > self.moments[moment][0]:
                self.moments[moment] = (total, by_category)
            if device != self.device:
                return
        if transient_bytes(by_category) > transient_bytes(self.transient) or not self.transient:
            self.transient = by_category
        if state_bytes(by_category) > state_bytes(self.state) or not self.state:
            self.state = by_category
        if self.limit is not None:
            counted = self.counted(by_category) if self.counted else total
            if counted > self.limit.bytes:
                raise _StopTrace(counted, by_category)


@contextlib.contextmanager
def _real_quantisation_maps() -> Iterator[None]:
    """bitsandbytes builds its 256-entry quantisation maps through Python lists when an
    8-bit optimizer is created, which fake tensors cannot give: build them for real.
    (They become fake on first use, like the data batches.)"""
    functional: Any = sys.modules.get("bitsandbytes.functional")  # untyped: bitsandbytes has no stubs
    original = getattr(functional, "create_dynamic_map", None)
    if original is None:
        yield
        return

    def create_for_real(*args: Any, **kwargs: Any) -> torch.Tensor:
        with unset_fake_temporarily():
            return original(*args, **kwargs)

    functional.create_dynamic_map = create_for_real
    try:
        yield
    finally:
        functional.create_dynamic_map = original


#: Optimizer steps a trace runs: the first creates the optimizer state, the second is the one
#: measured (as in a real run), the third shows the caching allocator in its steady state:
#: its segments are laid out by the first step's history, so the second may still reserve
#: one more, and the third repeats what every later step does.
TRACED_STEPS = 3

#: Micro-batches of a step that a trace runs. From the second on, each one repeats the
#: same shapes with the accumulated gradients live, so its peak is the last one's;
#: tracing 2 of 16 gives the step's peak at an eighth of the cost.
TRACED_MICRO_BATCHES = 2


def _split_real_batches(plan, labelled: "_LabelledRowsFromRealBatches") -> None:
    """The batches are real data: split them outside the fake mode, where counting
    masked tokens (the token-weighted rule) has values to count."""
    split = plan.split_batch

    def split_for_real(batch):
        with unset_fake_temporarily():
            micro_batches = split(batch)[:TRACED_MICRO_BATCHES]
        labelled.count(micro_batches)
        return micro_batches

    plan.split_batch = split_for_real


def _replace_tensors(module: nn.Module, device: torch.device | None, dtype: torch.dtype | None) -> nn.Module:
    """``module.to(device, dtype)`` by replacing parameters and buffers: floating-point
    tensors change dtype, tied parameters stay tied, ``device=None`` keeps each one's."""
    moved: dict[int, nn.Parameter] = {}

    def target(tensor: torch.Tensor) -> tuple[torch.device, torch.dtype]:
        return device or tensor.device, dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype

    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            if id(param) not in moved:
                to_device, to_dtype = target(param)
                same = param.device == to_device and param.dtype == to_dtype
                moved[id(param)] = param if same else nn.Parameter(
                    param.detach().to(device=to_device, dtype=to_dtype), requires_grad=param.requires_grad
                )
            sub._parameters[name] = moved[id(param)]
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None:
                to_device, to_dtype = target(buffer)
                sub._buffers[name] = buffer.to(device=to_device, dtype=to_dtype)
    return module


@contextlib.contextmanager
def _modules_move_without_swapping() -> Iterator[None]:
    """``nn.Module.to`` swaps FakeTensor parameters in place, which fails: FakeTensorMode
    keeps weak references to them. The strategies' placements and peft call ``.to``, so
    during a trace it replaces the tensors instead: the same result, the same bytes."""
    original = nn.Module.to

    def to(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        device, dtype, _non_blocking, _memory_format = torch._C._nn._parse_to(*args, **kwargs)
        return _replace_tensors(self, device, dtype)

    # Patched for the trace alone, which mypy does not allow of a method without being told.
    nn.Module.to = to  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        nn.Module.to = original  # type: ignore[method-assign]


class _FusedAttentionBytes(torch.autograd.Function):
    """The tensors a fused attention kernel (PyTorch's memory-efficient SDPA, what an fp32
    BERT with a padding mask runs on a GPU) allocates and keeps: the output and one fp32
    log-sum-exp per query row, never the L x L probabilities. Values are never computed:
    this runs only on the stand-in device of a fake-tensor trace."""

    @staticmethod
    def forward(ctx, query, key, value, mask):
        output = query.new_empty((*query.shape[:-1], value.shape[-1]))
        log_sum_exp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        kept = (query, key, value, output, log_sum_exp) + ((mask,) if mask is not None else ())
        ctx.save_for_backward(*kept)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value = ctx.saved_tensors[:3]
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), None


def _fused_sdpa_shapes(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    half = lower_precision_dtype()
    if half is not None:
        # sdpa is on CUDA autocast's lower-precision list: the kernel sees half inputs.
        query, key, value = (t.to(half) if t.is_floating_point() else t for t in (query, key, value))
    return _FusedAttentionBytes.apply(query, key, value, attn_mask if torch.is_tensor(attn_mask) else None)


#: What the estimate says when it models sdpa's fused kernel on the stand-in device.
FUSED_SDPA_NOTE = (
    "sdpa on the stand-in device: the fused kernel's bytes are modelled (output and log-sum-exp kept, no L x L "
    "probabilities), because the stand-in runs sdpa's math path, which would count eager attention's memory"
)


def modelled_attention_note(config: BenchConfig, target: "TraceTarget") -> str | None:
    """The note an estimate carries when it models sdpa's fused kernel (see below)."""
    return FUSED_SDPA_NOTE if target.stands_in and config.model.attention == "sdpa" else None


def describe_target(config: BenchConfig) -> tuple[str, str | None]:
    """What an estimate's header says about its traces: the target, and every caveat."""
    target = trace_target()
    caveat = "; ".join(note for note in (target.caveat, modelled_attention_note(config, target)) if note) or None
    return target.label, caveat


def describe_target_in_child(argv: list[str]) -> int:
    """A forked child's entry: ``describe_target`` of the config in ``argv[0]`` (JSON), as JSON on stdout."""
    label, caveat = describe_target(from_dict(json.loads(argv[0])))
    print(json.dumps({"label": label, "caveat": caveat}), flush=True)
    return 0


@contextlib.contextmanager
def _fused_attention_on_stand_in(config: BenchConfig, target: "TraceTarget") -> Iterator[None]:
    """On the stand-in device torch runs sdpa's math path, which materialises the attention
    probabilities as eager attention does: traced as it is, ``sdpa`` would read exactly like
    ``eager``. A GPU runs a fused kernel instead, so its bytes are modelled here. Fake CUDA
    tensors need no such model: they dispatch to the fused kernels' own shape functions."""
    if modelled_attention_note(config, target) is None:
        yield
        return
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention
    functional.scaled_dot_product_attention = _fused_sdpa_shapes
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


#: What the estimate says when dropout on the stand-in device is traced as CUDA's fused kernel.
FUSED_DROPOUT_NOTE = (
    "dropout on the stand-in device: traced as CUDA's fused kernel (a 1-byte mask kept for backward), because the "
    "stand-in would run the unfused path, which keeps a noise tensor of the input's dtype"
)


def _dropout_as_on_cuda(input, p=0.5, training=True, inplace=False):
    """``F.dropout`` as a CUDA tensor takes it: ATen's ``dropout`` runs ``native_dropout``
    (output and a bool mask) for CUDA inputs and, for any other device, multiplies by a
    noise tensor of the input's dtype, which backward keeps: 4 bytes an element in fp32
    against the mask's 1, for every dropout of the model."""
    if inplace or not training or p <= 0.0 or p >= 1.0 or input.numel() == 0:
        # ATen's dropout_ (in place) takes the unfused path on CUDA too.
        return _ORIGINAL_DROPOUT(input, p, training, inplace)
    return torch.native_dropout(input, p, True)[0]


_ORIGINAL_DROPOUT = torch.nn.functional.dropout


@contextlib.contextmanager
def _fused_dropout_on_stand_in(target: "TraceTarget") -> Iterator[None]:
    """On the stand-in device, dropout is traced as a GPU runs it (see ``_dropout_as_on_cuda``).
    The difference is not small: in an eager BERT-base at batch 32 x 128 it is 441 MiB of the
    step's peak, which the allocator then places. Fake CUDA tensors take the fused path themselves."""
    if not target.stands_in:
        yield
        return
    functional = torch.nn.functional
    functional.dropout = _dropout_as_on_cuda
    try:
        yield
    finally:
        functional.dropout = _ORIGINAL_DROPOUT


@contextlib.contextmanager
def fake_mode() -> Iterator[FakeTensorMode]:
    # Real tensors (the data batches, bitsandbytes' maps) become fake on first use.
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, _modules_move_without_swapping(), warnings.catch_warnings():
        # peft asks transformers 5 for a renamed attribute on every LoRA+checkpointing
        # step; a real cell logs it once, a search of many traces would repeat it.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        # FSDPMemTracker's module tracker warns when FSDP's own hooks re-enter a unit (checkpointed
        # layers): the per-module hierarchy, which nothing here reads; the totals are unaffected.
        warnings.filterwarnings("ignore", message="The module hierarchy tracking", category=UserWarning)
        # A trace stopped past fit's limit raises through FSDP's always-called hooks, which say so.
        warnings.filterwarnings("ignore", message="module forward hook with ``always_call=True`` raised",
                                category=UserWarning)
        yield mode


# --------------------------------------------------------------------------- autocast on the stand-in


#: What a figure traced under the estimate's own autocast rules says (``CellTrace.method``).
STAND_IN_AUTOCAST = (
    "stand-in autocast: traced on the stand-in device (this torch has no CUDA, and torch.autocast has no rules "
    "for it) under CUDA autocast's op lists applied by the estimate: matmuls, linear and sdpa in half precision "
    "(2 bytes, bf16 or fp16 alike), softmax, log_softmax, layer_norm, the losses, exp, sum, pow and rsqrt in fp32. "
    "CPU autocast is not used as the stand-in because its lists differ (it keeps those at their input's dtype: "
    "an eager attention's probabilities would count half their CUDA bytes). Not counted: the GradScaler's few "
    "scalars (amp-fp16), ops autocast casts below the Python API, autocast-disabled regions (rotary frequencies)"
)


def is_stand_in(method: str | None) -> bool:
    """Whether a figure's method is the stand-in autocast (a trace), not a model around one."""
    return bool(method) and str(method).startswith("stand-in")


class _StandInAutocast(Precision):
    """A run's autocast precision on the meta stand-in: CUDA's cast rules (``autocast.py``),
    and a plain backward and step. The GradScaler reads its overflow flag (``.item()``), which
    a fake tensor has no value for; what it holds is a few scalars."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def autocast(self) -> contextlib.AbstractContextManager:
        return cuda_autocast_rules(self.dtype)



@contextlib.contextmanager
def _recomputed_under_the_same_rules() -> Iterator[None]:
    """Checkpointing recomputes a block's forward in backward under the autocast state its
    forward had (torch.utils.checkpoint re-enters ``torch.autocast``). The engine does not carry
    a Python mode into backward, so each checkpointed function is wrapped, when the stand-in's
    rules are on at its forward, to enter them again (a fresh cache per block, as autocast's)."""
    from torch.utils import checkpoint

    original = checkpoint._checkpoint_without_reentrant_generator

    def generator(fn, *args: Any, **kwargs: Any):
        dtype = lower_precision_dtype()
        if dtype is not None:
            inner = fn

            def fn(*fn_args: Any, **fn_kwargs: Any) -> Any:
                if lower_precision_dtype() is not None:  # the forward: the rules are on already
                    return inner(*fn_args, **fn_kwargs)
                with cuda_autocast_rules(dtype):
                    return inner(*fn_args, **fn_kwargs)
        return original(fn, *args, **kwargs)

    checkpoint._checkpoint_without_reentrant_generator = generator
    try:
        yield
    finally:
        checkpoint._checkpoint_without_reentrant_generator = original


def _autocast_on_stand_in(plan, target: TraceTarget) -> str | None:
    """Replace an autocast precision that the stand-in device cannot enter; the method, if it did."""
    if not target.stands_in or not isinstance(plan.precision, AutocastPrecision):
        return None
    plan.precision = _StandInAutocast(plan.precision.dtype)
    return STAND_IN_AUTOCAST


# --------------------------------------------------------------------------- labelled rows


class _LabelledRowsFromRealBatches(TorchDispatchMode):
    """``nonzero`` of the targets (``TokenRows.labelled``, sparse-head) counted from the real batches.

    How many positions carry a label is data, which a fake tensor does not have: fake
    ``nonzero`` raises. The traced batches are real, though, so their labelled positions are
    counted here, and a ``nonzero`` of a flat boolean mask over one micro-batch's positions
    returns that many rows: the largest count of the traced micro-batches, so that the peak is
    never understated. Any other ``nonzero`` is left to the fake mode (which refuses it)."""

    def __init__(self) -> None:
        super().__init__()
        #: Positions of a micro-batch -> the most labelled positions one of that size had.
        self.labelled: dict[int, int] = {}

    def count(self, micro_batches) -> None:
        with unset_fake_temporarily():
            for micro in micro_batches:
                labels = micro.inputs.get("labels")
                if isinstance(labels, torch.Tensor):
                    count = int((labels != IGNORE_INDEX).sum())
                    self.labelled[labels.numel()] = max(count, self.labelled.get(labels.numel(), 0))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.nonzero.default and len(args) == 1 and not kwargs:
            mask = args[0]
            if mask.dtype == torch.bool and mask.dim() == 1 and mask.numel() in self.labelled:
                return torch.empty((self.labelled[mask.numel()], 1), dtype=torch.long, device=mask.device)
        return func(*args, **kwargs)


#: What makes the host's peak a figure of its own: the model's weights there (strategy 4's
#: fp32 master, an offloaded shard) or activations moved there to wait for backward. Without
#: either the host holds only the optimizer's step counters, and no host column is shown.
HOST_HOLDINGS = (PARAMETERS, ACTIVATIONS)


def _rank_share(batch: dict[str, torch.Tensor], world_size: int) -> dict[str, torch.Tensor]:
    """Rank 0's rows of a traced batch, as a run with ``world_size`` ranks gives it (``rank_share``)."""
    return batch if world_size <= 1 else rank_share(batch, 0, world_size)


#: DDP's first bucket, and every later one's cap (``DistributedDataParallel``'s defaults).
DDP_FIRST_BUCKET, DDP_BUCKET_CAP = 1024 * 1024, 25 * 1024 * 1024


def ddp_bucket_bytes(params: "Iterable[torch.Tensor]") -> int:
    """What DDP's gradient buckets hold: a flat copy of every trained gradient (in its dtype)."""
    return sum(p.numel() * p.element_size() for p in params)


def _ddp_buckets(size: int) -> list[int]:
    """The allocations DDP makes for ``size`` bytes of buckets: 1 MiB first, then up to 25 MiB each."""
    sizes, left = [], size
    cap = DDP_FIRST_BUCKET
    while left > 0:
        sizes.append(min(cap, left))
        left -= sizes[-1]
        cap = DDP_BUCKET_CAP
    return sizes


def _with_constant(peak: TrackedPeak, constant: dict[str, int]) -> TrackedPeak:
    if not constant:
        return peak
    by_category = dict(peak.by_category)
    for category, size in constant.items():
        by_category[category] = by_category.get(category, 0) + size
    return TrackedPeak(peak.device, peak.total_bytes + sum(constant.values()), by_category)


def trace_cell(
    cell: Cell,
    config: BenchConfig,
    inputs: TraceInputs,
    target: TraceTarget,
    limit: Limit | None = None,
    inspect: Callable[[Any], None] | None = None,
    counted: Counted | None = None,
    world_size: int = 1,
    data_parallel: bool = True,
    moments: bool = False,
) -> CellTrace:
    """Peak bytes by category of the cell's second optimizer step, device and host apart.

    With ``limit`` the trace stops once the device's live bytes (or ``counted`` of them)
    pass it, and says so (``stopped``). ``inspect`` sees the built plan (a modeller counts
    what it needs there).

    ``world_size`` > 1 traces rank 0 of that many, on its share of each batch, inside a fake
    process group (so is a sharded cell at any world size: ``fake_process_group``). A sharded
    cell's state is then FSDP2's DTensor shards, its gathered units their own category
    (``gathered``, from FSDPMemTracker); any other cell is replicated, and DDP's gradient
    buckets (which its C++ reducer cannot make on fake tensors) are counted from the trained
    shapes (``gradient_buckets``), unless ``data_parallel`` is False (a modeller's proxy).

    ``moments`` keeps the measured step's bytes moment by moment, for ``depth.py``'s extrapolation."""
    sharded = any(cls.shards for cls in cell.strategies)
    grouped = sharded or world_size > 1
    if sharded:
        target = sharded_target(target)
    with fake_process_group(world_size) if grouped else contextlib.nullcontext():
        return _trace_cell(cell, config, inputs, target, limit, inspect, counted, world_size,
                           data_parallel and world_size > 1 and not sharded, sharded, moments)


def _trace_cell(cell: Cell, config: BenchConfig, inputs: TraceInputs, target: TraceTarget, limit: Limit | None,
                inspect: Callable[[Any], None] | None, counted: Counted | None, world_size: int, replicated: bool,
                sharded: bool, moments: bool) -> CellTrace:
    started = time.perf_counter()
    # The shape model reads no checkpoint, so no head is new: LoRA trains none in full.
    ctx = RunContext(config, target.device, new_head_modules=(), tracing=True, rank=0, world_size=world_size)
    device_refusal(cell, ctx)  # imports what the strategies need (bitsandbytes) before the fake mode starts
    constant: dict[str, int] = {}
    watcher = _Watcher(str(target.device), limit, counted, constant)
    labelled = _LabelledRowsFromRealBatches()
    recorder = AllocationRecorder(target.device, WorkspaceRule.for_target(target.device))
    batches = [_rank_share(batch, world_size) for batch in inputs.batches]
    with (fake_mode(), _real_quantisation_maps(), _fused_attention_on_stand_in(config, target),
          _fused_dropout_on_stand_in(target), labelled,
          _recomputed_under_the_same_rules()):
        model = build_shape_model(config.model, inputs.tokenizer_size, inputs.pad_token_id, config.train.seed)
        recorder.__enter__()  # from the placement on: the allocator sees the weights arrive first
        recorder.phase("placement")
        try:
            plan = build_plan(cell, model, ctx)
        except BaseException:
            recorder.__exit__(None, None, None)
            raise
        if replicated:
            # DistributedDataParallel's buckets, made when it wraps the model: on the device, for good.
            trained = [p for p in plan.placement.compute_model.parameters()
                       if p.requires_grad and p.device == target.device]
            constant[GRADIENT_BUCKETS.name] = ddp_bucket_bytes(trained)
            for size in _ddp_buckets(constant[GRADIENT_BUCKETS.name]):
                recorder.allocate_modelled(size)
            plan.facts["ddp_gradient_buckets"] = (
                f"{constant[GRADIENT_BUCKETS.name]:,} bytes: a flat copy of every trained gradient, counted from the "
                "trained shapes (DDP's C++ reducer makes them, which a fake-tensor trace cannot run)")
        if world_size > 1:
            plan.facts["traced_rank"] = f"rank 0 of {world_size}, on its share of each batch, in a fake process group"
        method = _autocast_on_stand_in(plan, target)
        if inspect is not None:
            inspect(plan)
        _split_real_batches(plan, labelled)
        plan.model.train()
        tracked = (plan.model, plan.optimizer, *plan.placement.tracked_objects())
        scheduler = linear_schedule_with_warmup(plan.optimizer, 0, TRACED_STEPS)
        try:
            recorder.phase("step 1")
            if limit is None:
                optimizer_step(plan, scheduler, batches[0], ctx)
            else:
                # Watched too, so that a setup that cannot fit stops in its first step.
                first = StepMemoryTracker(*tracked, watch=watcher, sharded=sharded)
                with first:
                    optimizer_step(plan, scheduler, batches[0], ctx, first.before_forward)
            recorder.phase("step 2")
            tracker = StepMemoryTracker(*tracked, watch=watcher, sharded=sharded)
            if moments:
                watcher.position = StepPosition(tracker, repeated_blocks(plan.model)[0])
            with tracker:
                optimizer_step(plan, scheduler, batches[1], ctx, tracker.before_forward)
            watcher.position = None
            if limit is None or not (sharded or world_size > 1):
                recorder.phase("step 3")
                optimizer_step(plan, scheduler, batches[1], ctx)
            else:
                # fit's traces of a rank: a 70B shape's step takes minutes on fake tensors, so the
                # third (the allocator's steady state) is left out, and the replay ends at the second.
                plan.facts["traced_steps"] = "2: fit leaves the third step out of a rank's trace (time)"
        except _StopTrace as stop:
            device = TrackedPeak(str(target.device), stop.total, stop.by_category)
            return CellTrace(cell.name, device, None, plan.facts, time.perf_counter() - started, True, watcher.transient,
                             watcher.state, method)
        finally:
            recorder.__exit__(None, None, None)
    peaks = {peak.device: peak for peak in tracker.peaks()}
    device_peak = _with_constant(peaks.get(str(target.device)) or TrackedPeak(str(target.device), 0, {}), constant)
    host_peak = peaks.get(HOST) if target.device.type != HOST else None
    if host_peak is not None and not any(host_peak.by_category.get(kept.name) for kept in HOST_HOLDINGS):
        host_peak = None  # only the optimizer's step counters wait there: the host holds none of the model
    return CellTrace(cell.name, device_peak, host_peak, plan.facts, time.perf_counter() - started, False,
                     watcher.transient, watcher.state, method, recorder.sequence(), watcher.moments)
