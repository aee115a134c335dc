"""A matrix of cells, each in its own worker process.

In: the cells asked for (``matrix``), the resolved config and where to launch them
(``launch``, ``slots``: GPUs, torchrun). Out: a run folder of result files
(``results.RunFolder``), repeats and ranks merged into one result per cell
(``results.merge_repeats``; ``ranks`` reads a torchrun cell's ranks back for
``results.merge_ranks``). ``runner`` never touches CUDA itself.
"""
