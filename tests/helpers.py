"""Builders shared by the tests: a tiny BERT from a config, a CPU run context, a random MLM batch."""

from __future__ import annotations

import torch

from gputech_bench.config import BenchConfig, apply_overrides
from gputech_bench.modeling import build_model
from gputech_bench.strategies import RunContext


def tiny_bert(vocab: int = 300, dropout: float = 0.0, layers: int = 2, hidden: int = 32, seed: int = 0):
    config = apply_overrides(
        BenchConfig(),
        [
            "model.vocab_rows=0",
            f"model.hidden_size={hidden}",
            f"model.num_layers={layers}",
            "model.num_heads=2",
            f"model.intermediate_size={2 * hidden}",
            "model.max_position_embeddings=128",
            f"model.dropout={dropout}",
        ],
    )
    return build_model(config.model, vocab, 0, seed)


def context(*overrides: str) -> RunContext:
    return RunContext(apply_overrides(BenchConfig(), ["device=cpu", *overrides]), torch.device("cpu"))


def random_batch(size: int, length: int, vocab: int, seed: int = 0, mask_every: int = 0) -> dict[str, torch.Tensor]:
    """Token ids 5..vocab with ~15% of positions as MLM targets (or every ``mask_every``-th one)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab, (size, length), generator=generator)
    labels = torch.full_like(input_ids, -100)
    if mask_every:
        chosen = torch.zeros_like(input_ids, dtype=torch.bool)
        chosen[:, ::mask_every] = True
    else:
        chosen = torch.rand(size, length, generator=generator) < 0.15
        chosen[:, 0] = True  # at least one target per row
    labels[chosen] = input_ids[chosen]
    masked = input_ids.clone()
    masked[chosen] = 4
    return {"input_ids": masked, "attention_mask": torch.ones_like(input_ids), "labels": labels}
