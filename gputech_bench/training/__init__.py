"""The training loop, its batches and the evaluation, shared by every cell."""
