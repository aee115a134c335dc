"""Model states per GPU of the 70B Llama shape under fsdp (fp32 AdamW), beside DeepSpeed ZeRO-3's formula.

    PYTHONPATH=. python scripts/zero3_states.py [--trace] [--ranks 8,16,64] [--model configs/models/llama-70b]

Without --trace: FSDP2's padded shards counted from the model's shapes (rank 0 holds
ceil(rows/N) rows of every parameter; 4 bytes each for the weight, the gradient and each of
AdamW's two moments, plus its 4-byte step counter per tensor), which the traced figure equals
exactly (tests/test_estimate_ranks.py). With --trace: rank 0's step traced in a fake process
group of N, as 'gputech-bench estimate --strategies fsdp --nproc-per-node N' traces it, and the
parameters, gradients and optimizer state it holds (the gathered units in flight are apart).

DeepSpeed's estimate_zero3_model_states_mem_needs_all_cold without offload: 18 bytes per
parameter over all GPUs, plus 4 bytes per parameter of the largest layer (one module's own
parameters: here the embedding and the LM head, each vocab x hidden).
"""

from __future__ import annotations

import argparse
import math

from torch import nn

from gputech_bench.config import apply_overrides, load_preset
from gputech_bench.estimator.trace import Limit, fake_mode, trace_cell, trace_inputs, trace_target
from gputech_bench.modeling import build_shape_model
from gputech_bench.strategies import parse_cell

GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="configs/models/llama-70b")
    parser.add_argument("--ranks", default="8,16,64")
    parser.add_argument("--trace", action="store_true")
    args = parser.parse_args()
    config = apply_overrides(load_preset("seed"), [f"model.pretrained={args.model}", "data.objective=clm",
                                                   "model.attention=sdpa"])
    inputs = trace_inputs(config)
    with fake_mode():
        model = build_shape_model(config.model, inputs.tokenizer_size, inputs.pad_token_id, config.train.seed)
        shapes = [tuple(p.shape) for p in model.parameters()]
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()
                      if isinstance(m, nn.Module))
    total = sum(math.prod(shape) for shape in shapes)
    print(f"{args.model}: {total:,} parameters in {len(shapes)} tensors; largest layer {largest:,}")
    print("| GPUs | ours: fsdp, fp32 AdamW (params + grads + optim per rank) | DeepSpeed ZeRO-3: 18 P / G + 4 L |")
    print("|---:|---:|---:|")
    for ranks in (int(r) for r in args.ranks.split(",")):
        shard = sum(math.ceil(shape[0] / ranks) * math.prod(shape[1:]) for shape in shapes)
        ours = 16 * shard + 4 * len(shapes)
        how = "counted"
        if args.trace:
            traced = trace_cell(parse_cell("fsdp"), config, inputs, trace_target(), Limit(2**62), world_size=ranks)
            peak, state = traced.device.by_category, traced.state
            ours = peak["parameters"] + state["gradients"] + peak["optimizer_state"]
            how = f"traced; gathered {peak.get('gathered', 0) / GIB:.2f} GiB apart"
        deepspeed = 18 * total / ranks + 4 * largest
        print(f"| {ranks} | {ours / GIB:,.2f} GiB ({how}) | {deepspeed / GIB:,.2f} GiB |")


if __name__ == "__main__":
    main()
