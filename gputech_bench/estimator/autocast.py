"""CUDA autocast's cast rules, applied by the estimate on the meta stand-in device.

``torch.autocast`` has no backend for ``meta`` (the device a torch without CUDA traces on):
``torch.autocast("meta")`` raises. CPU autocast is no stand-in either: its op lists differ
from CUDA's (it keeps softmax, log_softmax, layer_norm, exp, sum, pow and rsqrt at their
input's dtype, where CUDA's runs them in fp32), and it only acts on CPU tensors, which a trace
keeps for the host side.

So the estimate applies CUDA's own lists (PyTorch's "Autocast Op Reference", CUDA section)
as a ``TorchFunctionMode``: an op of the lower-precision list gets its floating inputs cast
to the autocast dtype, an op of the fp32 list its half inputs cast to fp32, an op of the
promote list all its floating inputs cast to the widest. Autocast also casts above autograd
(the casts are recorded ops, as here) and caches the cast of each fp32 leaf weight for as long
as it is entered (kept here too), so the tensors saved for backward are the ones CUDA saves.

Backward runs in C++ and never meets these rules; only checkpointing's recomputed forward does,
which a run recomputes under the autocast state of its forward: so the rules are entered around
backward too (``trace.py``), without a cache across blocks.

What this does not follow, and the label says: the ops reached only below the Python API
(an aten op that a Python function does not name), and ``torch.autocast(enabled=False)``
regions inside the model (rotary frequencies: small tensors).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

T = torch.Tensor

#: CUDA's "ops that can autocast to float16/bfloat16" reached through Python: the matmuls and
#: convolutions. (scaled_dot_product_attention is in the list too: see ``lower_precision_dtype``.)
LOWER_PRECISION: frozenset[Callable[..., Any]] = frozenset({
    F.linear, F.bilinear, F.prelu,
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    torch.matmul, T.matmul, T.__matmul__, T.__rmatmul__, torch.mm, T.mm, torch.bmm, T.bmm, torch.mv, T.mv,
    torch.addmm, T.addmm, torch.addbmm, T.addbmm, torch.baddbmm, T.baddbmm, torch.addmv, T.addmv,
    torch.addr, T.addr, torch.chain_matmul, torch.linalg.multi_dot,
})

#: CUDA's "ops that can autocast to float32" reached through Python.
FLOAT32: frozenset[Callable[..., Any]] = frozenset({
    F.softmax, torch.softmax, T.softmax, F.log_softmax, torch.log_softmax, T.log_softmax, F.softmin,
    F.layer_norm, F.group_norm, F.normalize, F.cosine_similarity, F.softplus,
    F.cross_entropy, F.nll_loss, F.kl_div, F.l1_loss, F.mse_loss, F.smooth_l1_loss, F.soft_margin_loss,
    F.binary_cross_entropy_with_logits, F.poisson_nll_loss, F.hinge_embedding_loss, F.margin_ranking_loss,
    F.multilabel_margin_loss, F.multi_margin_loss, F.cosine_embedding_loss, F.triplet_margin_loss,
    torch.exp, T.exp, torch.expm1, T.expm1, torch.log, T.log, torch.log10, T.log10, torch.log2, T.log2,
    torch.log1p, T.log1p, torch.pow, T.pow, T.__pow__, T.__rpow__, torch.rsqrt, T.rsqrt,
    torch.reciprocal, T.reciprocal, T.__rtruediv__, torch.sum, T.sum, torch.prod, T.prod,
    torch.cumsum, T.cumsum, torch.cumprod, T.cumprod, torch.norm, T.norm, torch.dist, torch.cdist, torch.pdist,
    torch.acos, T.acos, torch.asin, T.asin, torch.cosh, T.cosh, torch.sinh, T.sinh, torch.tan, T.tan,
    torch.erfinv, T.erfinv, torch.renorm, T.renorm,
})

#: CUDA's "ops that promote to the widest input type" reached through Python.
PROMOTE: frozenset[Callable[..., Any]] = frozenset({
    torch.cat, torch.stack, torch.addcmul, T.addcmul, torch.addcdiv, T.addcdiv, torch.cross,
    torch.dot, T.dot, torch.vdot, torch.tensordot, torch.index_put, T.index_put, torch.scatter_add, T.scatter_add,
})

HALF_TYPES = (torch.float16, torch.bfloat16)

#: The dtype of the emulation entered last, while it is entered (None outside any).
_active: list[torch.dtype] = []


def lower_precision_dtype() -> torch.dtype | None:
    """The autocast dtype while the emulation is entered: for ops the estimate models itself
    (the fused attention kernel's bytes), which must cast as the op it stands for would."""
    return _active[-1] if _active else None


def _floating(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64


class CudaAutocastRules(TorchFunctionMode):
    """``torch.autocast("cuda", dtype)``'s casts, for tensors of any device (the meta stand-in)."""

    def __init__(self, dtype: torch.dtype, cache: bool = True) -> None:
        super().__init__()
        self.dtype, self.cache = dtype, cache
        # Autocast's cast cache: an fp32 leaf weight is cast once per autocast region, and the
        # half copy lives until the region ends (autocast keeps it, as a real run does).
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _cast(self, value: Any, dtype: torch.dtype) -> Any:
        if not _floating(value) or value.dtype == dtype:
            return value
        cacheable = self.cache and dtype == self.dtype and value.dtype == torch.float32 and value.requires_grad and value.is_leaf
        if cacheable and id(value) in self._cache:
            return self._cache[id(value)][1]
        cast = value.to(dtype)
        if cacheable:
            self._cache[id(value)] = (value, cast)  # the source kept too: its id must not be reused
        return cast

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in LOWER_PRECISION:
            target: torch.dtype | None = self.dtype
        elif func in FLOAT32:
            target = torch.float32
            if not any(_floating(v) and v.dtype in HALF_TYPES for v in _leaves((args, kwargs))):
                target = None
        elif func in PROMOTE:
            dtypes = {v.dtype for v in _leaves((args, kwargs)) if _floating(v)}
            target = torch.float32 if len(dtypes) > 1 and torch.float32 in dtypes else None
        else:
            target = None
        if target is not None:
            args, kwargs = tree_map(lambda v: self._cast(v, target), (args, kwargs))
        return func(*args, **kwargs)


def _leaves(tree: Any) -> list[Any]:
    found: list[Any] = []
    tree_map(found.append, tree)
    return found


@contextlib.contextmanager
def cuda_autocast_rules(dtype: torch.dtype, cache: bool = True) -> Iterator[None]:
    """Entered where a run enters ``torch.autocast("cuda", dtype)``; ``cache=False`` around
    backward, where checkpointing recomputes each block under a fresh autocast of its own (whose
    cache ends with the block: none kept across blocks)."""
    _active.append(dtype)
    try:
        with CudaAutocastRules(dtype, cache):
            yield
    finally:
        _active.pop()
