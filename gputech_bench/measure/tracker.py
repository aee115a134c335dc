"""Peak live-tensor bytes of one optimizer step, by category, from torch's MemTracker.

MemTracker is a TorchDispatchMode: it sees every tensor the step creates and
attributes it to parameters, gradients, optimizer state, activations or
temporaries, per device. It slows the step it watches, so the training loop
runs it on one step and keeps that step out of the timing.
"""

from __future__ import annotations

import warnings
from copy import deepcopy
from dataclasses import dataclass
from typing import Any, Callable

from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils.weak import WeakIdKeyDictionary

#: MemTracker's reference types, renamed to the words a result file uses.
CATEGORY_NAMES = {
    "Parameter": "parameters",
    "Buffer": "buffers",
    "Gradient": "gradients",
    "Optstate": "optimizer_state",
    "Activation": "activations",
    "Temp": "temporaries",
    "Other": "other",
}
TOTAL_KEY = "Total"


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


def named_categories(categories: dict[Any, int]) -> tuple[int, dict[str, int]]:
    """(total, bytes by category name) of one MemTracker device snapshot."""
    by_category = {
        CATEGORY_NAMES.get(getattr(key, "value", key), str(key)): int(value)
        for key, value in categories.items()
        if getattr(key, "value", key) != TOTAL_KEY
    }
    return int(categories.get(TOTAL_KEY, sum(by_category.values()))), by_category


#: Called after every operator with (device, that device's current snapshot); may raise to stop the step.
Watch = Callable[[str, dict[Any, int]], None]


class _PeakMemTracker(MemTracker):
    """MemTracker keeping the per-device peak only, and showing each update to ``watch``.

    After every operator MemTracker also walks every module it has seen to update that
    module's own peak: work that grows with operators x modules, so a 32-layer model's
    step took minutes under it (an 8B Llama's traced step: 231 s, 47 s without). Nothing
    here reads per-module peaks, and the per-device peak (``get_tracker_snapshot("peak")``)
    is kept by the same code as MemTracker's own, so every figure is unchanged."""

    def __init__(self, watch: Watch | None = None) -> None:
        super().__init__()
        self._watch = watch

    def _update_peak_stats(self, peak_state: Any) -> None:
        for dev, dev_snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < dev_snap[TOTAL_KEY]:
                self._peak_mem[dev] = dev_snap[TOTAL_KEY]
                self._peak_mem_snap[dev] = deepcopy(dev_snap)
            if self._watch is not None:
                self._watch(str(dev), dev_snap)


class StepMemoryTracker:
    """Context manager around one training step; ``peaks()`` afterwards."""

    def __init__(self, *external: Any, watch: Watch | None = None) -> None:
        self._tracker = _PeakMemTracker(watch)
        # Tensors created before the step (weights, existing optimizer state) are
        # unknown to a dispatch mode unless registered up front.
        self._tracker.track_external(*[obj for obj in external if obj is not None])
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
        self._tracker.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._tracker.__exit__(*exc)
        finally:
            self._warnings.__exit__(*exc)

    def before_forward(self) -> None:
        """Call before each forward of a step: MemTracker keeps per-module stats for one
        forward only, so micro-batches would otherwise trip it. Peaks are kept."""
        self._tracker.reset_mod_stats()

    def peaks(self) -> list[TrackedPeak]:
        snapshot = self._tracker.get_tracker_snapshot("peak")
        result = []
        for device, categories in snapshot.items():
            total, by_category = named_categories(categories)
            result.append(TrackedPeak(str(device), total, by_category))
        return sorted(result, key=lambda peak: peak.device)
