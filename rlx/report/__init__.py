"""`rlx compare`: one checkpoint compiled for several targets, reported side by side.

`compare.compare(...)` compiles (through the compile cache), reads the artifacts back, runs the
targets this machine can execute against the reference interpreter (of the same
quantization scheme, and unquantized), and writes report.json,
report.md and a self-contained report.html (`render`) into one directory, atomically.
"""

from rlx.report.compare import compare

__all__ = ["compare"]
