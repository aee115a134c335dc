"""One cell in one process.

In: a cell name and the run's resolved config (``config.json``).
Out: one result file (``results.CellResult``), written atomically whatever happens, and
progress events on stdout for the runner. ``python -m gputech_bench.worker`` is the
process; ``cell`` trains, measures and evaluates; ``failure`` turns an exception into a
status; ``provenance`` records versions and times.
"""
