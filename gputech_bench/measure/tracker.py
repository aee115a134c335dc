"""Peak live-tensor bytes of one optimizer step, by category, from torch's MemTracker.

MemTracker is a TorchDispatchMode: it sees every tensor the step creates and
attributes it to parameters, gradients, optimizer state, activations or
temporaries, per device; 4-bit quantised weights get a category of their own. It slows the step it watches, so the training loop
runs it on one step and keeps that step out of the timing.
"""

from __future__ import annotations

import warnings
from copy import deepcopy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils.weak import WeakIdKeyDictionary

from ..metrics import MEMORY_CATEGORIES, OTHER, PARAMETERS, QUANTIZED_WEIGHTS

#: MemTracker's reference types, renamed to the words a result file uses.
CATEGORY_NAMES = {category.memtracker: category.name for category in MEMORY_CATEGORIES if category.memtracker}
#: FSDPMemTracker's reference types (sharded and unsharded apart), renamed the same way;
#: several of them may land in one category (``gathered``).
FSDP_CATEGORY_NAMES = {kind: category.name for category in MEMORY_CATEGORIES for kind in category.fsdp_memtracker}
TOTAL_KEY = "Total"
#: bitsandbytes' 4-bit weights (qlora): the packed uint8 storage and its quantisation constants.
QUANTIZED = QUANTIZED_WEIGHTS.name
#: MemTracker counts CUDA storages in the caching allocator's 512-byte blocks, and so must a
#: figure moved between its categories.
_CUDA_BLOCK = 512


@dataclass(frozen=True)
class TrackedPeak:
    """The highest total of live tensor bytes on one device, and what made it up then."""

    device: str
    total_bytes: int
    by_category: dict[str, int]


class _NoHook:
    """Stands in for a gradient-hook handle on a frozen parameter."""

    def remove(self) -> None:
        pass


class _FrozenAreHooked(WeakIdKeyDictionary):
    """MemTracker's parameter -> gradient-hook table, which reports frozen tensors as hooked."""

    def __init__(self, existing: WeakIdKeyDictionary) -> None:
        super().__init__()
        self.update(existing)

    def get(self, key: Any, default: Any = None) -> Any:
        if not getattr(key, "requires_grad", True):
            return (_NoHook(), _NoHook())
        return super().get(key, default)


def _tracked_bytes(tensor: torch.Tensor) -> int:
    """What MemTracker counts for ``tensor``'s storage (see ``_WeakRefInfo``)."""
    size = tensor.untyped_storage().nbytes()
    return -(-size // _CUDA_BLOCK) * _CUDA_BLOCK if tensor.device.type == "cuda" else size


def _quant_state_tensors(state: Any) -> list[torch.Tensor]:
    """The tensors of a bitsandbytes QuantState: block absmax, code book, and those of the
    nested state that double quantisation adds."""
    tensors = []
    while state is not None:
        tensors += [t for t in (getattr(state, name, None) for name in ("absmax", "code", "offset"))
                    if isinstance(t, torch.Tensor)]
        state = getattr(state, "state2", None)
    return tensors


@dataclass
class QuantizedStorages:
    """bitsandbytes 4-bit weights among the tracked modules, per device: the packed weights
    (MemTracker files them as parameters) and their quantisation constants (which no module
    registers; they are tracked as "other")."""

    packed: dict[str, dict[int, int]]  # device -> storage pointer -> tracked bytes
    constants: dict[str, dict[int, int]]
    constant_tensors: list[torch.Tensor]

    @classmethod
    def find(cls, objects: tuple[Any, ...]) -> "QuantizedStorages":
        packed: dict[str, dict[int, int]] = {}
        constants: dict[str, dict[int, int]] = {}
        tensors: list[torch.Tensor] = []
        modules = [obj for obj in objects if isinstance(obj, nn.Module)]
        # By class name: importing bitsandbytes here would cost every run its start-up time.
        weights = {id(p): p for m in modules for p in m.parameters() if type(p).__name__ == "Params4bit"}
        for weight in weights.values():
            state = getattr(weight, "quant_state", None)
            if state is None:
                continue  # not quantised yet: an ordinary fp32 weight
            packed.setdefault(str(weight.device), {})[weight.untyped_storage().data_ptr()] = _tracked_bytes(weight)
            for tensor in _quant_state_tensors(state):
                constants.setdefault(str(tensor.device), {})[tensor.untyped_storage().data_ptr()] = _tracked_bytes(tensor)
                tensors.append(tensor)
        return cls(packed, constants, tensors)

    def regroup(self, device: str, by_category: dict[str, int]) -> dict[str, int]:
        """``by_category`` with the 4-bit weights moved into their own category; the total is unchanged.
        Left as it is when the categories do not hold them in full (nothing to move, or a
        tracker that filed them elsewhere: a figure is never moved on a guess)."""
        packed = sum(self.packed.get(device, {}).values())
        constants = sum(self.constants.get(device, {}).values())
        if not packed or by_category.get(PARAMETERS.name, 0) < packed or by_category.get(OTHER.name, 0) < constants:
            return by_category
        regrouped = dict(by_category)
        regrouped[PARAMETERS.name] -= packed
        regrouped[OTHER.name] -= constants
        regrouped[QUANTIZED] = packed + constants
        return regrouped


def named_categories(categories: dict[Any, int]) -> tuple[int, dict[str, int]]:
    """(total, bytes by category name) of one MemTracker (or FSDPMemTracker) device snapshot."""
    by_category: dict[str, int] = {}
    for key, value in categories.items():
        kind = getattr(key, "value", key)
        if kind == TOTAL_KEY:
            continue
        name = CATEGORY_NAMES.get(kind) or FSDP_CATEGORY_NAMES.get(kind) or str(kind)
        by_category[name] = by_category.get(name, 0) + int(value)
    return int(categories.get(TOTAL_KEY, sum(by_category.values()))), by_category


#: Called after every operator with (device, that device's current snapshot); may raise to stop the step.
Watch = Callable[[str, dict[Any, int]], None]


class _PeakOnly:
    """Keeps the per-device peak only, and shows each update to ``watch``.

    After every operator MemTracker also walks every module it has seen to update that
    module's own peak: work that grows with operators x modules, so a 32-layer model's
    step took minutes under it (an 8B Llama's traced step: 231 s, 47 s without). Nothing
    here reads per-module peaks, and the per-device peak (``get_tracker_snapshot("peak")``)
    is kept by the same code as MemTracker's own, so every figure is unchanged."""

    _watch: Watch | None
    _curr_mem_snap: Any
    _peak_mem: Any
    _peak_mem_snap: Any

    def _update_peak_stats(self, peak_state: Any) -> None:
        for dev, dev_snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < dev_snap[TOTAL_KEY]:
                self._peak_mem[dev] = dev_snap[TOTAL_KEY]
                self._peak_mem_snap[dev] = deepcopy(dev_snap)
            if self._watch is not None:
                self._watch(str(dev), dev_snap)


class _PeakMemTracker(_PeakOnly, MemTracker):
    def __init__(self, watch: Watch | None = None) -> None:
        super().__init__()
        self._watch = watch


def _fsdp_tracker(external: tuple[Any, ...], watch: Watch | None) -> Any:
    """An FSDPMemTracker over the FSDP root among ``external`` (and its optimizer), or None
    when there is none: it files sharded and unsharded parameters and gradients apart, and
    the collectives' buffers, where MemTracker counts gathered weights as activations."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.fsdp import FSDPModule

    root: Any = next((obj for obj in external if isinstance(obj, FSDPModule)), None)
    if root is None:
        return None
    optimizer = next((obj for obj in external if isinstance(obj, torch.optim.Optimizer)), None)

    class _PeakFSDPMemTracker(_PeakOnly, FSDPMemTracker):
        pass

    tracker = _PeakFSDPMemTracker(root, optimizer)
    tracker._watch = watch
    return tracker


class StepMemoryTracker:
    """Context manager around one training step; ``peaks()`` afterwards.

    bitsandbytes' 4-bit weights (qlora) are reported as their own category, ``quantized_weights``:
    MemTracker has no such type, so they are moved there from "parameters" (the packed uint8
    weights) and "other" (their quantisation constants, registered here). Frozen, they are live
    for the whole step, so at the peak those categories hold them in full.
    """

    def __init__(self, *external: Any, watch: Watch | None = None, sharded: bool = False) -> None:
        # sharded: an FSDP model, tracked by FSDPMemTracker (the estimate's traces of FSDP cells).
        fsdp = _fsdp_tracker(external, watch) if sharded else None
        self._tracker = fsdp if fsdp is not None else _PeakMemTracker(watch)
        # Tensors created before the step (weights, existing optimizer state) are
        # unknown to a dispatch mode unless registered up front (FSDPMemTracker finds them itself).
        self._tracker.track_external(*[obj for obj in external if obj is not None])
        self._quantized = QuantizedStorages.find(external)
        if self._quantized.constant_tensors:
            self._tracker.track_external(*self._quantized.constant_tensors)
        self._skip_frozen_parameters(external)

    def _skip_frozen_parameters(self, external: tuple[Any, ...]) -> None:
        # MemTracker registers a gradient hook on every parameter of every module it
        # sees run, which raises for frozen ones (LoRA's base weights). Answering "already
        # hooked" for every frozen tensor makes it skip them; frozen weights never get
        # gradients anyway. A lookup (not a list made up front) also covers the frozen
        # full-size parameters FSDP creates anew each time it gathers a layer.
        handles = getattr(self._tracker, "_param_to_grad_hook_handles", None)
        if handles is None:
            return
        self._tracker._param_to_grad_hook_handles = _FrozenAreHooked(handles)

    def __enter__(self) -> "StepMemoryTracker":
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        # ModTracker warns for every module whose backward hook outlives its weakref
        # (checkpointed layers); the totals are unaffected.
        warnings.filterwarnings("ignore", message="Module is None", category=UserWarning)
        # A gradient freed by an earlier post-accumulate-grad hook (optimizer-in-backward steps
        # and frees each one) reaches MemTracker's own hook as None: nothing to file, no harm.
        warnings.filterwarnings("ignore", message="Expected a tensor or a traceable wrapper-subclass", category=UserWarning)
        self._tracker.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._tracker.__exit__(*exc)
        finally:
            self._warnings.__exit__(*exc)

    @property
    def modules(self) -> Any:
        """The ModTracker that MemTracker follows modules with: which modules an operator runs
        in (``parents``) and whether it runs in backward (``is_bw``)."""
        return self._tracker._mod_tracker

    @property
    def in_optimizer_step(self) -> bool:
        """Whether an optimizer's ``step`` is running (MemTracker's own optimizer hooks set it)."""
        return bool(self._tracker._in_opt)

    def before_forward(self) -> None:
        """Call before each forward of a step: MemTracker keeps per-module stats for one
        forward only, so micro-batches would otherwise trip it. Peaks are kept."""
        self._tracker.reset_mod_stats()

    def peaks(self) -> list[TrackedPeak]:
        snapshot = self._tracker.get_tracker_snapshot("peak")
        result = []
        for device, categories in snapshot.items():
            total, by_category = named_categories(categories)
            by_category = self._quantized.regroup(str(device), by_category)
            result.append(TrackedPeak(str(device), total, by_category))
        return sorted(result, key=lambda peak: peak.device)
