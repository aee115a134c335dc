"""What a run folder says, for people: one frame, rendered.

In: the cell results of a run folder (``results.RunFolder``).
Out: ``frame`` builds one DataFrame with every figure and its comparison against the
baseline; ``table`` renders it as markdown (the terminal table is ``cli.tables``);
``export`` writes it as CSV and JSON and the report files beside the results; ``html``
and ``plots`` draw it; ``compare`` puts two runs side by side; ``pareto`` finds the
frontier of memory against time.
"""
