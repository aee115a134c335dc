"""gputech-bench: which memory-saving strategy makes a transformer fine-tune fit, and at what cost."""

__version__ = "0.1.0"
