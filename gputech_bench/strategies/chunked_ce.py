"""chunked-ce: the LM head and its cross-entropy over chunks of positions, recomputed in backward.

The seed's peak is its vocabulary: 4,096 positions x 149,798 rows of fp32 logits are 2.3 GiB,
and the cross-entropy keeps three or four tensors of that size at once (the logits, the saved
log-softmax and their gradients). Here the rows go through the head ``strategy.ce_chunk_tokens``
at a time, each chunk inside a non-reentrant checkpoint: forward keeps only the chunk's loss,
and backward recomputes one chunk's logits, takes their gradient and frees them before the
next chunk's. The full [positions x vocabulary] logits never exist, in forward or backward.

The loss is the same mean over the labelled rows: each chunk's mean (the inner hooks', down to
the model's own cross-entropy) weighted by its share of the labelled rows. The head is the
model's own (``TokenRows.head``: BERT's transform and tied decoder, a Llama's ``lm_head``), so
a decoder tied to the input embeddings gets its gradient from both uses, as it always did:
the checkpoint recomputes the same module on the same parameter. Evaluation predicts in the
same chunks.

``strategy.ce_kernel`` chooses who computes a chunk's cross-entropy: ``torch`` (the above;
any device), or on CUDA, when installed, Liger Kernel's fused linear cross-entropy
(``liger``) or Cut Cross-Entropy (``cce``), which take the head's last linear layer and
never write the logits to memory at all. A fused kernel replaces the innermost
cross-entropy, so it runs only as the last loss hook of the cell (chunked-ce is the latest
strategy with one).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.masking import IGNORE_INDEX
from ..errors import StrategyError
from .base import RunContext, Strategy, TokenLoss, TokenPredict, TokenRows
from .facts import TRACED, StateLocation, TimeFactor
from .registry import register

#: The kernels that need CUDA and a package of their own: ``strategy.ce_kernel`` -> (the
#: module to import, the pip name to install).
FUSED_KERNELS: dict[str, tuple[str, str]] = {
    "liger": ("liger_kernel", "liger-kernel"),
    "cce": ("cut_cross_entropy", "cut-cross-entropy"),
}


@register
class ChunkedCrossEntropy(Strategy):
    key = "chunked-ce"
    name = "chunked-ce"
    saves = ("the logits: one chunk of positions x vocabulary at a time, recomputed in backward, instead of the "
             "full logits, their log-softmax and gradients (seed: 2.3 GiB each -> 0.29 GiB chunks)")
    costs = "the LM head's forward matmul runs twice (once more in backward, chunk by chunk)"
    order = 65
    # Facts (facts.py): what estimate, fit, the runner, the warm-up and the docs know of it.
    # The head's matmuls are 1 unit of forward and 2 of backward; recomputing them in backward
    # adds 1 unit, a third of the head's cost. At the seed's shape the head (768 x 149,798)
    # holds more weights than the twelve layers (~115M against ~85M), so about half the step's
    # FLOPs: + ~1/6. On a Llama-8B the head is ~6% of the FLOPs: + ~2%.
    time_factor = TimeFactor(1.15, "cost model, reasoned: one more head forward in backward, a third of the head's "
                                   "cost, and the head is about half the seed's step (less on larger models); "
                                   "the cpu preset measured 1.16x on a 2-core CPU, no GPU run yet")
    changes_activations_only = True
    trains_adapters = False
    state_location = StateLocation.DEVICE
    # The torch kernel needs nothing beyond torch; the fused kernels are an optional extra,
    # imported (and refused when missing) where the cell runs.
    libraries = ()
    micro_batch_counts = ()
    estimate = TRACED
    in_causal_lm_matrix = False
    moves_activations_to_host = False
    requires = ("a masked-LM (BERT, RoBERTa, DistilBERT) or a causal LM whose scores are its LM head's; "
                "ce_kernel=liger or cce: CUDA and that package installed")

    def config_refusal(self, config: Any) -> None:
        kernel = config.strategy.ce_kernel
        if kernel in FUSED_KERNELS and config.device == "cpu":
            raise StrategyError(
                f"chunked-ce's ce_kernel={kernel} runs on CUDA only: use --set strategy.ce_kernel=torch on the CPU"
            )

    def device_refusal(self, ctx: RunContext) -> None:
        kernel = ctx.config.strategy.ce_kernel
        if kernel not in FUSED_KERNELS:
            return
        if ctx.tracing:
            # Triton kernels cannot run on fake tensors: a trace of the torch kernel would be a
            # different strategy's figure under this one's name.
            raise StrategyError(
                f"the estimate traces chunked-ce with ce_kernel=torch only, not {kernel} (a Triton kernel does not run "
                "on fake tensors): estimate with --set strategy.ce_kernel=torch"
            )
        if ctx.device.type != "cuda":
            raise StrategyError(
                f"chunked-ce's ce_kernel={kernel} runs on CUDA only: use --set strategy.ce_kernel=torch on this device"
            )
        module, package = FUSED_KERNELS[kernel]
        try:
            __import__(module)
        except ImportError:
            raise StrategyError(
                f"chunked-ce's ce_kernel={kernel} needs the '{package}' package: pip install {package}, "
                "or use --set strategy.ce_kernel=torch"
            ) from None

    def wrap_loss(self, inner: TokenLoss, ctx: RunContext) -> TokenLoss:
        kernel = ctx.config.strategy.ce_kernel
        if kernel in FUSED_KERNELS:
            # The kernel chunks the rows itself and keeps no logits to recompute.
            return fused_kernel_loss(kernel)

        def chunked_loss(rows: TokenRows) -> torch.Tensor:
            # Read when called, not when wrapped: a test may change the config's chunk.
            return mean_over_chunks(inner, rows, ctx.config.strategy.ce_chunk_tokens)

        return chunked_loss

    def wrap_predict(self, inner: TokenPredict, ctx: RunContext) -> TokenPredict:
        def predict_in_chunks(rows: TokenRows) -> torch.Tensor:
            return torch.cat([inner(part) for part in rows.chunks(ctx.config.strategy.ce_chunk_tokens)])

        return predict_in_chunks

    def describe(self, model: nn.Module, ctx: RunContext) -> dict[str, Any]:
        kernel = ctx.config.strategy.ce_kernel
        how = {
            "torch": "gputech-bench's chunks, each recomputed in backward (torch.utils.checkpoint)",
            "liger": "Liger Kernel's fused linear cross-entropy",
            "cce": "Cut Cross-Entropy's linear_cross_entropy",
        }[kernel]
        return {"ce_kernel": f"{kernel}: {how}", "ce_chunk_tokens": ctx.config.strategy.ce_chunk_tokens}


def mean_over_chunks(chunk_loss: TokenLoss, rows: TokenRows, chunk_rows: int) -> torch.Tensor:
    """The mean cross-entropy over ``rows``' labelled rows, from ``chunk_loss``'s mean over each
    chunk's: sum(chunk mean x its labelled rows) / all labelled rows. Each chunk runs in a
    checkpoint, so that only its loss outlives its forward, and backward recomputes it."""
    total = rows.hidden.new_zeros((), dtype=torch.float32)
    labelled = (rows.targets != IGNORE_INDEX).sum()
    for part in rows.chunks(chunk_rows):
        # Under no_grad (evaluation's loss) there is nothing to recompute for.
        if torch.is_grad_enabled():
            mean = checkpoint(chunk_loss, part, use_reentrant=False)
        else:
            mean = chunk_loss(part)
        count = (part.targets != IGNORE_INDEX).sum()
        # A chunk without a target has a mean of 0/0 = NaN: it weighs nothing, and must not turn
        # the sum into NaN. (A NaN from a chunk that has targets passes through, as it should.)
        total = total + torch.where(count > 0, mean.float(), 0.0) * count
    # No labelled row at all gives 0/0 = NaN, as the plain mean over no rows does.
    return total / labelled


# --------------------------------------------------------------------------- the fused kernels


def final_linear(head: Callable[[torch.Tensor], torch.Tensor]) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Linear]:
    """(what the head does before its last linear layer, that layer): a causal LM's ``lm_head``
    is the layer itself; BERT's head is a transform, then its decoder. A fused kernel takes the
    layer's weight and bias and never materialises its output."""
    if isinstance(head, nn.Linear):
        return (lambda hidden: hidden), head
    predictions = getattr(head, "predictions", None)
    transform, decoder = getattr(predictions, "transform", None), getattr(predictions, "decoder", None)
    if callable(transform) and isinstance(decoder, nn.Linear):
        # BertLMPredictionHead.forward: transform, then the decoder (its bias is decoder.bias).
        return transform, decoder
    raise StrategyError(
        f"chunked-ce's fused kernels need an LM head that ends in one linear layer, not a {type(head).__name__}: "
        "use --set strategy.ce_kernel=torch"
    )


def fused_kernel_loss(kernel: str) -> TokenLoss:
    """The mean cross-entropy over the labelled rows by Liger's or Cut Cross-Entropy's kernel,
    from the head's last linear layer: in place of the innermost cross-entropy."""

    def loss(rows: TokenRows) -> torch.Tensor:
        before, linear = final_linear(rows.head)
        hidden = before(rows.hidden)
        if kernel == "liger":
            # The loss module's forward(weight, input, target, bias) is the same in every release.
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

            fused = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")
            return fused(linear.weight, hidden, rows.targets, linear.bias)
        from cut_cross_entropy import linear_cross_entropy

        # bias only where the head has one: early releases take none (a Llama's lm_head has none).
        bias = {} if linear.bias is None else {"bias": linear.bias}
        return linear_cross_entropy(hidden, linear.weight, rows.targets, ignore_index=IGNORE_INDEX, reduction="mean",
                                    **bias)

    return loss
