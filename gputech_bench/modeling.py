"""Build the BertForMaskedLM that every cell starts from."""

from __future__ import annotations

import torch

# From their own modules rather than ``transformers``' lazy top level: the same classes,
# without resolving names through the package's whole import table.
from transformers.models.bert.configuration_bert import BertConfig
from transformers.models.bert.modeling_bert import BertForMaskedLM

from .config import ModelConfig
from .errors import ModelError, first_line


def vocab_rows_for(model_config: ModelConfig, tokenizer_size: int) -> int:
    """Embedding rows: the configured count, never fewer than the tokenizer needs."""
    if model_config.vocab_rows == 0:
        return tokenizer_size
    if model_config.vocab_rows < tokenizer_size:
        raise ModelError(
            f"model.vocab_rows ({model_config.vocab_rows}) is smaller than the tokenizer ({tokenizer_size} tokens): "
            "raise it, or set it to 0 to use the tokenizer's size"
        )
    return model_config.vocab_rows


def bert_config(model_config: ModelConfig, tokenizer_size: int, pad_token_id: int) -> BertConfig:
    """The architecture a cell trains: from the pretrained folder's config.json, or from ours."""
    if model_config.pretrained:
        try:
            config = BertConfig.from_pretrained(model_config.pretrained)
        except Exception as error:
            raise ModelError(
                f"could not read the config of '{model_config.pretrained}' ({first_line(error)}): "
                "pass a local folder holding config.json, or a reachable hub id"
            ) from None
    else:
        config = BertConfig(
            vocab_size=vocab_rows_for(model_config, tokenizer_size),
            hidden_size=model_config.hidden_size,
            num_hidden_layers=model_config.num_layers,
            num_attention_heads=model_config.num_heads,
            intermediate_size=model_config.intermediate_size,
            max_position_embeddings=model_config.max_position_embeddings,
            hidden_dropout_prob=model_config.dropout,
            attention_probs_dropout_prob=model_config.dropout,
            pad_token_id=pad_token_id,
            use_cache=False,  # an encoder has no cache; avoids a warning under checkpointing
        )
    config._attn_implementation = model_config.attention
    return config


def build_model(model_config: ModelConfig, tokenizer_size: int, pad_token_id: int, seed: int) -> BertForMaskedLM:
    """A fp32 model on the CPU, identical for every cell of a run (same seed, same init)."""
    torch.manual_seed(seed)
    if model_config.pretrained:
        return load_pretrained(model_config, tokenizer_size)
    return BertForMaskedLM(bert_config(model_config, tokenizer_size, pad_token_id))


def build_shape_model(model_config: ModelConfig, tokenizer_size: int, pad_token_id: int, seed: int) -> BertForMaskedLM:
    """The same architecture with random weights: all a memory estimate needs (no weights are read)."""
    torch.manual_seed(seed)
    return BertForMaskedLM(bert_config(model_config, tokenizer_size, pad_token_id))


def load_pretrained(model_config: ModelConfig, tokenizer_size: int) -> BertForMaskedLM:
    try:
        model = BertForMaskedLM.from_pretrained(
            model_config.pretrained, attn_implementation=model_config.attention, torch_dtype=torch.float32
        )
    except Exception as error:  # hub, file-system and format errors all end here
        raise ModelError(
            f"could not load BertForMaskedLM from '{model_config.pretrained}' ({first_line(error)}): "
            "pass a local folder holding config.json and the weights, or a reachable hub id"
        ) from None
    rows = model.get_input_embeddings().num_embeddings
    if rows < tokenizer_size:
        raise ModelError(f"model '{model_config.pretrained}' has {rows} embedding rows but its tokenizer has {tokenizer_size}")
    return model
