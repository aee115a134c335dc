"""The model run to its final hidden states, with a cell's loss and predict hooks applied to them.

Built by the plan only when a strategy of the cell overrides ``wrap_loss`` or
``wrap_predict``; every other cell calls the model's own forward and loss. The hooks are
applied inside this module's ``forward``, not beside it, so that whatever acts on forward
(FSDP gathering its weights, DDP, torch.compile) acts on them too, in training and in
evaluation alike.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .architecture import split_language_model
from .base import Predictions, Predictor, TokenLoss, TokenPredict, TokenRows


class HiddenStateModel(nn.Module):
    """Wraps a masked-LM or causal LM: its base model gives the final hidden states, which
    become ``TokenRows`` (a causal LM's shifted as transformers shifts its labels); the
    composed loss hooks turn them into the training loss, and in evaluation the composed
    predict hooks into predictions."""

    def __init__(self, model: nn.Module, causal: bool, train_loss: TokenLoss, eval_loss: TokenLoss,
                 predict: TokenPredict) -> None:
        # Imported here, not with the module: the registry (which every command and the
        # runner import) would otherwise import transformers for this one class.
        from transformers.modeling_outputs import CausalLMOutput, MaskedLMOutput

        super().__init__()
        self.model = model
        self.causal = causal
        self.train_loss = train_loss
        self.eval_loss = eval_loss
        self.predict = predict
        self.output_type = CausalLMOutput if causal else MaskedLMOutput

    def token_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                   **inputs: Any) -> TokenRows:
        base, head = split_language_model(self.model, self.causal)
        # Every other input (token_type_ids, say) reaches the base model, as the model's own forward would pass it.
        hidden = base(input_ids=input_ids, attention_mask=attention_mask, **inputs).last_hidden_state
        if self.causal:  # position t predicts the token at t + 1; the last predicts nothing
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        return TokenRows(hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), head)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, predict: bool = False, **kwargs: Any) -> Any:
        if labels is None:  # nothing to score: the model's own forward
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        rows = self.token_rows(input_ids, attention_mask, labels, **kwargs)
        if predict:  # hidden_state_predictor's call: (predictions by position, loss)
            shape = labels[:, 1:].shape if self.causal else labels.shape
            return self.predict(rows).view(shape), self.eval_loss(rows)
        return self.output_type(loss=self.train_loss(rows))


def hidden_state_predictor(model: nn.Module) -> Predictor:
    """Evaluation through ``model``'s forward (a HiddenStateModel, or a wrapper of one: DDP,
    FSDP), so that the predict hooks run where the loss hooks run."""

    def predict(inputs: dict[str, torch.Tensor]) -> Predictions:
        predicted, loss = model(**inputs, predict=True)
        return Predictions(predicted=predicted, loss=loss)

    return Predictor(model, predict)
