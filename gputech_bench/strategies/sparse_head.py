"""sparse-head: the MLM vocabulary projection and loss at the masked positions only.

BertForMaskedLM projects every position of the batch to the vocabulary: with the
seed's 149,798 rows, batch 32 and 128 tokens that is a 4,096 x 149,798 fp32 logits
tensor (2.3 GiB), plus its softmax and gradient, for the ~15% of positions the loss
reads. Selecting the masked positions first gives the same loss and the same
predictions there, from a tensor about 7 times smaller.

Evaluation still scores every position, because the seed's all-token accuracy needs
a prediction at each; it does so under no_grad, a few hundred positions at a time,
keeping only the argmax, so that evaluation never holds a full logits tensor either.

Both act through the loss and predict hooks (``base``): the model runs to its final hidden
states, and the head sees only the rows chosen here.

It works on the masked-LM heads of BERT, RoBERTa and DistilBERT (``architecture.
MASKED_LM_HEADS``) and refuses other masked-LM types. A causal LM is refused: every position
of its next-token objective carries a label, so there is nothing to skip.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import StrategyError
from ..modeling import CLM
from .architecture import config_model_type, config_task, masked_lm_head_refusal
from .base import RunContext, Strategy, TokenLoss, TokenPredict, TokenRows
from .facts import TRACED, StateLocation, TimeFactor
from .registry import register

#: Positions scored at once in evaluation: 512 x 149,798 fp32 scores is 0.3 GiB.
EVAL_CHUNK_POSITIONS = 512


@register
class SparseHead(Strategy):
    key = "sparse-head"
    name = "sparse-head"
    saves = "the logits: vocabulary scores at the ~15% masked positions instead of all (2.3 GiB -> ~0.35 GiB for the seed)"
    costs = "none measurable expected: less head compute; evaluation still scores every position"
    order = 60
    # Facts (facts.py): what estimate, fit, the runner, the warm-up and the docs know of it.
    time_factor = TimeFactor(1.0, "assumed: less head compute, none measurable expected (a cost-model figure, not measured)")
    changes_activations_only = True
    trains_adapters = False
    state_location = StateLocation.DEVICE
    libraries = ()
    micro_batch_counts = ()
    # How many positions are masked is data, which fake tensors lack: the trace counts them
    # on the real batches it traces (estimator/trace.py), so the head's rows are exact.
    estimate = TRACED
    in_causal_lm_matrix = False
    moves_activations_to_host = False

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

    def wrap_loss(self, inner: TokenLoss, ctx: RunContext) -> TokenLoss:
        def masked_positions_loss(rows: TokenRows) -> torch.Tensor:
            # The same reduction as the masked-LMs' own: the mean over the masked positions.
            return inner(rows.labelled())

        return masked_positions_loss

    def wrap_predict(self, inner: TokenPredict, ctx: RunContext) -> TokenPredict:
        def predict_in_chunks(rows: TokenRows) -> torch.Tensor:
            # EVAL_CHUNK_POSITIONS is read when called, not when wrapped: a test lowers it.
            return torch.cat([inner(part) for part in rows.chunks(EVAL_CHUNK_POSITIONS)])

        return predict_in_chunks

    def describe(self, model: nn.Module, ctx: RunContext) -> dict:
        return {"mlm_head": "masked positions only in training; every position in evaluation"}
