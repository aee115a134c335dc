"""sparse-head: the MLM vocabulary projection and loss at the masked positions only.

BertForMaskedLM projects every position of the batch to the vocabulary: with the
seed's 149,798 rows, batch 32 and 128 tokens that is a 4,096 x 149,798 fp32 logits
tensor (2.3 GiB), plus its softmax and gradient, for the ~15% of positions the loss
reads. Selecting the masked positions first gives the same loss and the same
predictions there, from a tensor about 7 times smaller.

Evaluation still scores every position, because the seed's all-token accuracy needs
a prediction at each; it does so under no_grad, a few hundred positions at a time,
keeping only the argmax, so that evaluation never holds a full logits tensor either.

It works on the masked-LM heads of BERT, RoBERTa and DistilBERT (``architecture.
MASKED_LM_HEADS``) and refuses other masked-LM types. A causal LM is refused: every position
of its next-token objective carries a label, so there is nothing to skip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..data.masking import IGNORE_INDEX
from ..errors import StrategyError
from ..modeling import CLM
from .architecture import config_model_type, config_task, masked_lm_head_refusal, split_masked_lm
from .base import RunContext, Strategy
from .facts import NOT_ESTIMATED, StateLocation, TimeFactor
from .registry import register

if TYPE_CHECKING:
    from transformers.modeling_outputs import MaskedLMOutput
#: Positions scored at once in evaluation: 512 x 149,798 fp32 scores is 0.3 GiB.
EVAL_CHUNK_POSITIONS = 512


@dataclass
class TokenPredictions:
    """What evaluation needs from a forward pass: the argmax at every position and the masked loss."""

    loss: torch.Tensor
    predicted: torch.Tensor  # token ids, shaped like input_ids


def masked_lm_of(model: nn.Module) -> nn.Module:
    """The masked-LM inside ``model`` (peft wraps it; its LoRA layers are injected in place)."""
    # (torch types a module's attributes as Tensor | Module: this one is a method.)
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator]


class MaskedPositionsHead(nn.Module):
    """Wraps a masked-LM (BERT, RoBERTa, DistilBERT): training forwards score only the masked
    positions. Its base model gives the hidden states and its own head (``architecture.
    MASKED_LM_HEADS``) scores the selected ones, as the model's forward would at every position.
    """

    #: Evaluation asks this model for predictions (``return_predictions=True``), not logits.
    predicts_in_chunks = True

    def __init__(self, model: nn.Module) -> None:
        # Imported here, not with the module: the registry (which every command and the
        # runner import) would otherwise import transformers for this one class.
        from transformers.modeling_outputs import MaskedLMOutput

        super().__init__()
        self.model = model
        self.output_type = MaskedLMOutput

    def masked_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, targets) at the masked positions, in row-major order."""
        base, head = split_masked_lm(masked_lm_of(self.model))
        hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        flat_labels = labels.reshape(-1)
        positions = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        return head(selected), flat_labels.index_select(0, positions)

    @torch.no_grad()
    def chunked_predictions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor
    ) -> TokenPredictions:
        base, head = split_masked_lm(masked_lm_of(self.model))
        hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1])
        predicted = torch.cat([
            head(flat[start:start + EVAL_CHUNK_POSITIONS]).argmax(dim=-1)
            for start in range(0, flat.shape[0], EVAL_CHUNK_POSITIONS)
        ])
        flat_labels = labels.reshape(-1)
        positions = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
        loss = F.cross_entropy(head(flat.index_select(0, positions)).float(), flat_labels.index_select(0, positions))
        return TokenPredictions(loss=loss, predicted=predicted.view_as(input_ids))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, return_predictions: bool = False,
                **kwargs) -> MaskedLMOutput | TokenPredictions:
        # Through forward rather than a method of its own, so that wrappers which act on
        # forward (FSDP gathering its weights, DDP, torch.compile) act on evaluation too.
        if return_predictions and labels is not None:
            return self.chunked_predictions(input_ids, attention_mask, labels)
        if labels is None or not self.training:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        logits, targets = self.masked_logits(input_ids, attention_mask, labels)
        # The same reduction as the masked-LMs' own: the mean over masked positions.
        return self.output_type(loss=F.cross_entropy(logits, targets), logits=logits)


@register
class SparseHead(Strategy):
    key = "sparse-head"
    name = "sparse-head"
    saves = "the logits: vocabulary scores at the ~15% masked positions instead of all (2.3 GiB -> ~0.35 GiB for the seed)"
    costs = "none measurable expected: less head compute; evaluation still scores every position"
    order = 60
    # Facts (facts.py): what estimate, fit, the runner, the warm-up and the docs know of it.
    time_factor = TimeFactor(1.0, "assumed: less head compute, none measurable expected (not estimated, so fit never weighs it)")
    changes_activations_only = True
    trains_adapters = False
    state_location = StateLocation.DEVICE
    libraries = ()
    micro_batch_counts = ()
    estimate = NOT_ESTIMATED
    in_causal_lm_matrix = False

    untraceable = "how many positions are masked is data, unknown on fake tensors"
    requires = ("a masked-LM (BERT, RoBERTa, DistilBERT) with data.objective=mlm: under the seed's objective, "
                "and in a causal LM, every position carries a label")

    def config_refusal(self, config) -> None:
        # A causal LM predicts the next token at every position: all of them carry a label,
        # so there are no unlabelled positions to skip. Refused, not run (see below); its
        # logits are a real cost, but the fix for them is a chunked loss, not this strategy.
        if config.data.objective == "clm" or config_task(config) == CLM:
            raise StrategyError(
                "sparse-head saves nothing on a causal LM (its next-token loss labels every position, so the head "
                "runs at all of them): leave sparse-head out for this model"
            )
        refusal = masked_lm_head_refusal(config_model_type(config))
        if refusal:
            raise StrategyError(refusal)
        # Under the seed's objective the labels cover every position, so "the labelled
        # positions" are all of them: the head would run everywhere and save nothing.
        # Refused rather than run, so that no table shows a saving-free row under this name.
        if config.data.objective != "mlm":
            raise StrategyError(
                f"sparse-head saves nothing under data.objective={config.data.objective} (every position carries a "
                "label, so the head runs at all of them): add --set data.objective=mlm"
            )

    def prepare_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        return MaskedPositionsHead(model)

    def describe(self, model: nn.Module, ctx: RunContext) -> dict:
        return {"mlm_head": "masked positions only in training; every position in evaluation"}
