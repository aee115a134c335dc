"""Predict memory without a GPU (fake-tensor traces) and search for the fastest setup that fits."""

import logging

# bitsandbytes warns on import that its optional 4-bit CPU matmul kernel is missing;
# nothing here uses 4-bit layers, and every trace process would repeat the warning.
# Set before anything below can import bitsandbytes.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
