"""The device's allocation and free sequence of a traced step, for the allocator model.

MemTracker keeps live bytes by category, which is all a tensor peak needs. What
nvidia-smi shows depends on more: the caching allocator places every request in a
segment it reserved earlier or reserves a new one, so the order and the sizes of the
allocations and frees decide how much it holds (``allocator.py``). This recorder keeps
that sequence: every new storage on the traced device, in the order the operators
create it, and its free when its last reference goes, as the allocator would see it.

What no tensor shows is added where the real process makes it (``WorkspaceRule``):
cuBLAS's workspaces, one per handle, allocated through the caching allocator at the
first matrix product of a thread and kept for the process's life.
"""

from __future__ import annotations

import functools
import os
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from ..units import KIB, MIB

#: What a recorded event is: a storage allocated (size > 0) or freed (size == 0).
ALLOC, FREE = "alloc", "free"

#: Operators that reach cuBLAS, whose first call on a thread creates that thread's workspace.
MATMUL_OPS = frozenset({
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default, torch.ops.aten.addmv.default, torch.ops.aten.mv.default,
    torch.ops.aten.addbmm.default, torch.ops.aten.dot.default, torch.ops.aten._addmm_activation.default,
})


def cublas_workspace_bytes(compute_capability: tuple[int, int] | None) -> tuple[int, str]:
    """The cuBLAS workspace one handle allocates, and where the figure comes from.

    ATen's ``getChosenWorkspaceSize`` (CUDABlas/CublasHandlePool.cpp) reads
    ``CUBLAS_WORKSPACE_CONFIG`` (":SIZE_KIB:COUNT" pairs, summed), and otherwise takes
    ":4096:8" (32 MiB) on Hopper and later and ":4096:2:16:8" (8.125 MiB) before. cuBLASLt
    shares that workspace (TORCH_CUBLASLT_UNIFIED_WORKSPACE, on by default in CUDA builds)."""
    configured = os.environ.get("CUBLAS_WORKSPACE_CONFIG", "").strip()
    if configured:
        parts = [part for part in configured.split(":") if part]
        try:
            pairs = [(int(parts[i]), int(parts[i + 1])) for i in range(0, len(parts) - 1, 2)]
        except ValueError:
            pairs = []
        if pairs:
            return sum(size * KIB * count for size, count in pairs), f"CUBLAS_WORKSPACE_CONFIG={configured}"
    if compute_capability is None:
        # The estimate cannot see the card from a CPU-only torch: Hopper is what this
        # project's figures were checked on, and what its context default was measured on.
        return 4096 * KIB * 8, "cuBLAS's default for Hopper (:4096:8, 32 MiB), assumed: this torch sees no GPU"
    if compute_capability >= (9, 0):
        return 4096 * KIB * 8, f"cuBLAS's default for compute capability {compute_capability[0]}.{compute_capability[1]} (:4096:8)"
    return 4096 * KIB * 2 + 16 * KIB * 8, (
        f"cuBLAS's default for compute capability {compute_capability[0]}.{compute_capability[1]} (:4096:2:16:8)"
    )


@dataclass(frozen=True)
class WorkspaceRule:
    """The allocations the real process makes that no tensor shows: cuBLAS's workspaces.

    cuBLAS handles come from a per-thread pool, and each (handle, stream) gets its own
    workspace at its first matrix product, through the caching allocator, kept for the
    process's life. A training step multiplies matrices on two threads: the forward on the
    caller's, the backward on autograd's device thread. So the recorder adds one workspace
    after the first matrix product of the forward, and one after the first of a backward.

    Where they land matters more than their size. Made in the first step, the backward's
    lands in whatever is free at its first matrix product, which for the seed's strategy 4
    is a freed logits-sized block: pinned there, it costs the run a fourth logits-sized
    segment. The H200 measured exactly that (7,567 MiB on NVML; 7,578 replayed this way,
    6,438 with the workspaces made before the model, where the worker's warm-up first makes
    them): the warm-up's ``empty_cache`` evidently leaves the first step to make them again."""

    bytes_each: int
    source: str

    @classmethod
    def for_target(cls, device: torch.device) -> "WorkspaceRule":
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        size, source = cublas_workspace_bytes(capability)
        return cls(size, source)

    def describe(self) -> str:
        return (f"cuBLAS workspaces of {self.bytes_each / MIB:,.4g} MiB, one for the forward's thread and one for "
                f"autograd's, made at each one's first matrix product ({self.source})")


@dataclass(frozen=True)
class AllocationSequence:
    """What the allocator model replays: events in order, and where each traced phase starts.

    ``events`` holds (kind, handle, size, stream); a free repeats its allocation's handle.
    ``phases`` holds (index of the phase's first event, label)."""

    events: tuple[tuple[str, int, int, int], ...]
    phases: tuple[tuple[int, str], ...]
    workspaces: WorkspaceRule
    #: Handles of the allocations the recorder added from a model, not from a tensor (the
    #: workspaces): where they land is what the trace cannot promise (``reserved.py``).
    modelled: frozenset[int] = frozenset()
    #: Storages that changed size in place (``resize_``): replayed as a free and a new allocation.
    resized: int = 0
    #: The modelled allocations whose place is a guess (the workspaces: where a thread's first
    #: matrix product falls). DDP's buckets are modelled too, but made in order when DDP wraps
    #: the model, before any step: their place is known, and a 70B shape has hundreds of them.
    placed_by_guess: frozenset[int] = frozenset()

    @property
    def workspace_bytes(self) -> int:
        """What the workspaces add up to."""
        return sum(size for kind, handle, size, _ in self.events if kind == ALLOC and handle in self.placed_by_guess)


class AllocationRecorder(TorchDispatchMode):
    """Records every new storage on ``device``, and its free, while it is entered.

    A storage is new when an operator returns a tensor whose storage the recorder has not
    seen (a view shares its base's); it is freed when its last reference goes, which a
    weak reference's callback reports in the same order the allocator would get it."""

    def __init__(self, device: torch.device, workspaces: WorkspaceRule, stream: int = 0) -> None:
        super().__init__()
        self.device = device
        self.workspaces = workspaces
        self.stream = stream
        self._events: list[tuple[str, int, int, int]] = []
        self._phases: list[tuple[int, str]] = []
        self._handles: WeakIdKeyDictionary = WeakIdKeyDictionary()
        #: Storages of the device's that ``resize_(0)`` emptied in place, to be grown again (FSDP).
        self._emptied: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self._next = 0
        self._resized = 0
        self._workspace_threads: set[str] = set()
        self._modelled: list[int] = []
        self._workspaces: list[int] = []

    def phase(self, label: str) -> None:
        """Mark where a phase of the traced run starts (model placement, step 1, ...)."""
        self._phases.append((len(self._events), label))

    def sequence(self) -> AllocationSequence:
        return AllocationSequence(tuple(self._events), tuple(self._phases), self.workspaces,
                                  frozenset(self._modelled), self._resized, frozenset(self._workspaces))

    def allocate_modelled(self, size: int) -> None:
        """An allocation no tensor shows (DDP's gradient buckets, made in C++), never freed."""
        handle = self._next
        self._next += 1
        self._modelled.append(handle)
        self._events.append((ALLOC, handle, size, self.stream))

    def _freed(self, handle: int) -> None:
        size = self._sizes.pop(handle, None)
        self._refs.pop(handle, None)
        if size is not None:
            self._events.append((FREE, handle, 0, self.stream))

    def _on_collected(self, handle: int, _ref: object) -> None:
        self._freed(handle)

    def _allocate(self, storage: Any, size: int) -> None:
        handle = self._next
        self._next += 1
        self._handles[storage] = handle
        self._sizes[handle] = size
        self._refs[handle] = weakref.ref(storage, functools.partial(self._on_collected, handle))
        self._events.append((ALLOC, handle, size, self.stream))

    def _see(self, tensor: torch.Tensor) -> None:
        # A DTensor is a wrapper: its global-shape storage holds nothing, and the operator on
        # its local shard, which holds the bytes, passes through this mode as well.
        if tensor.device == self.device and not is_traceable_wrapper_subclass(tensor):
            self._see_storage(tensor.untyped_storage())

    def _see_storage(self, storage: Any) -> None:
        size = storage.nbytes()
        handle = self._handles.get(storage)
        if handle is None:
            if size:
                self._emptied.pop(storage, None)
                self._allocate(storage, size)
            return
        if self._sizes.get(handle) != size:
            # resize_ / set_ grew or shrank the storage in place: the allocator frees the old
            # block and allocates the new size.
            self._resized += 1
            del self._handles[storage]
            self._freed(handle)
            if size:
                self._allocate(storage, size)
            else:
                self._emptied[storage] = True

    def __enter__(self) -> "AllocationRecorder":
        # FSDP frees a gathered unit's storage in place and grows it back for the next gather
        # (``UntypedStorage.resize_``), below the operators a dispatch mode sees; MemTracker
        # follows it the same way. Without it, every gathered unit would stay allocated.
        self._original_resize = original = torch.UntypedStorage.resize_

        def resize_(storage: Any, size: int) -> Any:
            result = original(storage, size)
            # A fake tensor's storage is on the meta device whatever the tensor's: ours are the
            # storages the recorder has seen on its device, or emptied there.
            if storage in self._handles or storage in self._emptied:
                self._see_storage(storage)
            return result

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign, assignment]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            torch.UntypedStorage.resize_ = self._original_resize  # type: ignore[method-assign]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._see(value)
        if func in MATMUL_OPS and isinstance(out, torch.Tensor) and out.device == self.device:
            # A graph task runs only during backward, on autograd's thread in a real run.
            thread = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
            if thread not in self._workspace_threads:
                # After the output: ATen allocates the result, then fetches the handle (and
                # its workspace). Never freed: a handle keeps its workspace.
                self._workspace_threads.add(thread)
                handle = self._next
                self._next += 1
                self._modelled.append(handle)
                self._workspaces.append(handle)
                self._events.append((ALLOC, handle, self.workspaces.bytes_each, self.stream))
        if func in (torch.ops.aten.resize_.default, torch.ops.aten.set_.source_Storage):
            for value in tree_flatten(args)[0]:
                if isinstance(value, torch.Tensor):
                    self._see(value)
        return out
