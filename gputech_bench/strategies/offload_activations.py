"""offload-activations: the tensors autograd saves for backward wait in host memory.

While the model's forward runs, ``torch.autograd.graph.saved_tensors_hooks`` hands every
tensor an operator saves for backward to ``ActivationOffloader.pack``, which copies it to
the host and gives autograd a small handle instead; backward's ``unpack`` brings it back.
The device then holds the activations of the operator at hand, not of the whole forward.
This is torchtune's ``OffloadActivations`` design:

* on CUDA the host copy is pinned and made on a side stream that first waits for the
  compute stream, so the copies out overlap the forward; ``record_stream`` keeps the
  allocator from reusing the device memory before its copy has finished. The copies back
  are made on the compute stream when backward asks for them (not prefetched);
* tensors under ``strategy.offload_min_bytes`` stay where they are (their copies would cost
  more launches than they save), and so do weights and buffers, which the model holds
  anyway: a copy would free nothing;
* with checkpointing (strategy 1) a checkpointed layer saves only its inputs (torch's
  non-reentrant checkpoint saves them through the hooks that are active outside it), so
  only those move, and the recomputed tensors stay on the device in backward.

Offloading works on whole storages: several operators often save views of one tensor
(a layer's input feeds the query, key and value projections), and each view's own copy
would put that tensor on the host several times and bring it back several times. One host
copy per storage (and version) serves every view of it, and one copy back serves every
view unpacked while it is in use: the host gains what the device gives up.

On a CPU run host and device are one memory: the tensors are still copied to separately
allocated host tensors and the originals freed, so the mechanism runs and its numbers
(gradients) can be checked, but it saves nothing; the result's facts say so. The memory
estimate traces the device side on a stand-in device with the host apart, where the moved
bytes show as the host's activations.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from .base import RunContext, Strategy
from .facts import StateLocation, TRACED, TimeFactor
from .registry import register

HOST = torch.device("cpu")


@dataclass
class _HostCopy:
    """One device storage's elements on the host, shared by every saved view of it."""

    host: torch.Tensor  # flat: the storage's elements, in the dtype of the first view saved
    device: torch.device
    #: Recorded on the side stream after the copy out (CUDA): the copy back waits for it.
    copied: Any = None
    #: The copy back, while views of it are still to be unpacked (one copy back for them all).
    back: torch.Tensor | None = None
    #: Views packed and not yet unpacked: when none remain, the copy back is left to them.
    pending: int = 0

    def restore(self) -> torch.Tensor:
        if self.back is None:
            if self.copied is not None:
                torch.cuda.current_stream(self.device).wait_event(self.copied)
            self.back = self.host.to(self.device, non_blocking=True)
        back = self.back
        self.pending -= 1
        if self.pending <= 0:
            self.back = None  # the views handed to autograd keep it alive as long as backward needs them
        return back


@dataclass(frozen=True)
class _Packed:
    """What autograd holds instead of a moved tensor: its storage's host copy and its geometry."""

    copy: _HostCopy
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


@dataclass
class OffloadCounts:
    """What the hooks did, for tests and for whoever wants the figures: bytes and tensors."""

    moved_bytes: int = 0  # host bytes allocated: one copy per storage
    copies: int = 0  # storages copied to the host
    pinned: int = 0  # of those, copies in pinned memory (CUDA)
    moved_tensors: int = 0  # saved tensors served by those copies
    kept_small: int = 0  # saved tensors under the size threshold, left on the device
    kept_resident: int = 0  # weights and buffers (or views of them), left where they are


@dataclass
class ActivationOffloader:
    """The pack and unpack hooks, and the state of one forward pass."""

    device: torch.device
    min_bytes: int
    #: Pinned host memory and a side stream (a CUDA run); otherwise plain synchronous copies.
    use_streams: bool
    counts: OffloadCounts = field(default_factory=OffloadCounts)
    _resident: set[StorageWeakRef] = field(default_factory=set)
    _copies: dict[tuple[StorageWeakRef, int, torch.dtype], _HostCopy] = field(default_factory=dict)
    _stream: Any = None
    _active: list[contextlib.AbstractContextManager] = field(default_factory=list)

    # ----------------------------------------------------------------- forward hooks

    def enter(self, module: nn.Module, args: Any, kwargs: Any | None = None) -> None:
        """Forward pre-hook: start packing. Only under autograd: evaluation saves nothing."""
        if not torch.is_grad_enabled():
            self._active.append(contextlib.nullcontext())
            return
        self._resident = {StorageWeakRef(t.untyped_storage())
                          for t in (*module.parameters(), *module.buffers()) if not _has_no_strided_storage(t)}
        self._copies = {}
        hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        hooks.__enter__()
        self._active.append(hooks)

    def leave(self, module: nn.Module, args: Any, *rest: Any) -> None:
        """Forward hook (always called, an exception included): stop packing."""
        if self._active:
            self._active.pop().__exit__(None, None, None)
        # The copies made live on in autograd's handles; this forward's lookup is done.
        self._resident, self._copies = set(), {}

    # ----------------------------------------------------------------- saved tensors

    def _stays(self, tensor: torch.Tensor, storage: Any) -> bool:
        if tensor.device != self.device or _has_no_strided_storage(tensor):
            return True
        base = tensor._base if tensor._base is not None else tensor
        if isinstance(base, nn.Parameter) or StorageWeakRef(storage) in self._resident:
            self.counts.kept_resident += 1
            return True
        if storage.nbytes() < self.min_bytes:
            self.counts.kept_small += 1
            return True
        return False

    def pack(self, tensor: torch.Tensor) -> Any:
        storage = tensor.untyped_storage()
        if self._stays(tensor, storage):
            return tensor
        key = (StorageWeakRef(storage), tensor._version, tensor.dtype)
        copy = self._copies.get(key)
        if copy is None or key[0].expired():
            copy = self._copy_out(tensor, storage)
            self._copies[key] = copy
            self.counts.moved_bytes += copy.host.untyped_storage().nbytes()
            self.counts.copies += 1
            self.counts.pinned += int(self.use_streams)
        copy.pending += 1
        self.counts.moved_tensors += 1
        return _Packed(copy, tuple(tensor.shape), tuple(tensor.stride()), int(tensor.storage_offset()))

    def _copy_out(self, tensor: torch.Tensor, storage: Any) -> _HostCopy:
        # The whole storage, as one flat tensor: every view of it is then a view of the copy.
        whole = tensor.as_strided((storage.nbytes() // tensor.element_size(),), (1,), 0)
        if not self.use_streams:
            # clone(): on a CPU run .to(HOST) would hand back the very same tensor.
            host = whole.to(HOST).clone() if whole.device == HOST else whole.to(HOST)
            return _HostCopy(host, self.device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)
        host = torch.empty(whole.shape, dtype=whole.dtype, pin_memory=True)
        self._stream.wait_stream(compute)  # the tensor's values are written by then
        with torch.cuda.stream(self._stream):
            host.copy_(whole, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._stream)
        # The forward drops its references soon: the allocator must not hand this memory out
        # again before the side stream has read it.
        whole.record_stream(self._stream)
        return _HostCopy(host, self.device, copied)

    def unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Packed):
            return packed
        return packed.copy.restore().as_strided(packed.size, packed.stride, packed.offset)


def _has_no_strided_storage(tensor: torch.Tensor) -> bool:
    """Tensors without a storage of their own to move (sparse, nested): left alone."""
    return tensor.layout != torch.strided


def offloader_of(plan: Any) -> ActivationOffloader | None:
    """The offloader of a TrainingPlan's offload-activations strategy, if it has one (tests read its counts)."""
    return next((strategy.offloader for strategy in plan.strategies if isinstance(strategy, OffloadActivations)), None)


@register
class OffloadActivations(Strategy):
    key = "offload-activations"
    name = "offload-activations"
    saves = ("activations: the tensors saved for backward wait in host memory (pinned, copied on a side stream) "
             "until backward needs them; with 1, only the checkpointed layers' inputs")
    costs = ("a device-to-host copy of every saved tensor, overlapped with forward, and a copy back in backward "
             "(not prefetched); host memory for all of them")
    requires = "host memory for the step's activations; a CUDA device for any saving (on a CPU they share one memory)"
    gives_up = ""  # the same numbers: tensors are copied, never rounded
    # After every strategy that changes the model or wraps it in the loss hooks (so the head's
    # and the loss's saved tensors move too), before compile, which compiles what it is given.
    order = 85
    # Facts (facts.py): what estimate, fit, the runner, the warm-up and the docs know of it.
    time_factor = TimeFactor(
        1.05,
        "assumed, not measured: torchtune reports about 1% with both copies overlapped; here the copies back wait "
        "in backward, so a little more is assumed (a cost-model figure until a measured run replaces it)",
    )
    changes_activations_only = True
    trains_adapters = False
    state_location = StateLocation.DEVICE
    libraries = ()
    micro_batch_counts = ()
    estimate = TRACED
    in_causal_lm_matrix = False
    moves_activations_to_host = True
    incompatible = {
        "compile": "torch.compile traces the forward hooks that start and stop the offload; tried together (torch "
                   "2.13, CPU), Dynamo broke the hooks' bookkeeping of storages (errors printed, one host copy per "
                   "view instead of per storage)",
    }

    #: The offloader prepare_model installed (None before): its counts say what moved.
    offloader: ActivationOffloader | None = None

    def prepare_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        offloader = ActivationOffloader(
            ctx.device,
            ctx.config.strategy.offload_min_bytes,
            # A trace's fake tensors have no memory to pin and no stream to copy on.
            use_streams=ctx.device.type == "cuda" and not ctx.tracing,
        )
        # Hooks on the module itself, not a wrapper: placements, peft, DDP and the memory
        # tracker keep seeing the same object, and evaluation (no_grad) saves nothing to move.
        model.register_forward_pre_hook(offloader.enter, with_kwargs=True)
        model.register_forward_hook(offloader.leave, always_call=True)
        self.offloader = offloader  # kept by the strategy, never set on the model
        return model

    def table_notes(self, ctx: RunContext) -> list[str]:
        if ctx.device.type != "cpu":
            return []
        return ["activations moved to the host stay in the CPU's one memory: the tensor peak shows no saving here "
                "('estimate' shows device and host apart)"]

    def describe(self, model: nn.Module, ctx: RunContext) -> dict:
        where = ("pinned host memory, copied out on a side stream" if ctx.device.type == "cuda"
                 else "separately allocated host tensors")
        facts = {
            "activation_offload": (
                f"saved tensors of {ctx.config.strategy.offload_min_bytes:,} bytes or more (weights and buffers "
                f"excepted) moved to {where}, one copy per storage, brought back in backward"
            ),
        }
        if ctx.device.type == "cpu":
            facts["activation_offload_saving"] = (
                "none on this CPU run: host and device are one memory, so the copies are made but nothing is freed"
            )
        return facts
