"""Decode steps and prefills: refattn against PyTorch SDPA and against the memory bandwidth.

A thin wrapper over ``refattn bench`` (``refattn/bench/__init__.py`` says what
is measured and how): every flag is passed through. With no flags, a decode step
(B=1, Hq=32, Hkv=8, D=128, float32) over S = 1024, 4096 and 16384 cached keys,
and a causal prefill (B=1, H=16, D=64, S=2048), on NumPy and PyTorch (and CuPy
or CUDA where present), each beside SDPA, a plain torch matmul-softmax-matmul
and the floor K+V bytes / measured read bandwidth.

    OPENBLAS_NUM_THREADS=1 python benchmarks/attention_speed.py --json speed.json --plot speed.png
"""

from __future__ import annotations

import sys

from refattn.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
