"""A matrix of cells, each in its own worker process.

In: a ``request.RunRequest``: the cells asked for (``matrix``), the resolved config, where
to launch them (``launch``: GPU slots, torchrun), how often and for how long, and the run
folder. ``runner.run_cells`` starts each worker through a ``launcher`` (a fresh interpreter,
a child of the ``forkserver``, or torchrun). Out: a run folder of result files
(``results.RunFolder``), repeats and ranks merged into one result per cell
(``results.merge_repeats``; ``ranks`` reads a torchrun cell's ranks back for
``results.merge_ranks``). ``shard`` deals the cells over machines (``--shard K/N``) that
share one folder. ``runner`` never touches CUDA itself.
"""
