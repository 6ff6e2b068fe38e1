"""torch.compile(flex_attention, dynamic=True) on the CPU fails to build its C++ kernel for a
mask_mod that reads captured tensors (here: three queries over five keys).

Three queries at positions 2, 3, 4 attend causally to five keys at positions 0 .. 4, the
positions held in tensors the mask_mod indexes (as a KV-cache decode step does). Uncompiled,
and compiled with ``dynamic=False``, FlexAttention returns the causal attention; compiled with
``dynamic=True`` Inductor's generated C++ does not compile ("'cur_kvSplitSize7' was not
declared in this scope"), though the mask and shapes are the same. The same happens with
grouped-query heads, a softcap or ALiBi in a score_mod, with equal query and key counts. What
PyTorch says it should do: ``create_block_mask``'s docstring takes any mask_mod of (b, h,
q_idx, kv_idx) returning a boolean, and ``torch.compile``'s ``dynamic=True`` is documented as
generating "a kernel that is as dynamic as possible to avoid recompilations"; neither names a
limit on captured tensors. With a mask_mod that computes from the indices alone (``kv_idx <=
q_idx + 2``) the same call compiles.

Needs only torch and NumPy. Exits 1 while the defect is there, 0 once it is fixed.
"""

import sys

import numpy as np
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

rng = np.random.default_rng(0)
q64, k64, v64 = (rng.standard_normal((1, 1, n, 8)) for n in (3, 5, 5))
q_pos, k_pos = torch.tensor([[2, 3, 4]]), torch.tensor([[0, 1, 2, 3, 4]])

# The float64 hand computation: query i sees keys j <= q_pos[i].
scores = q64[0, 0] @ k64[0, 0].T / np.sqrt(8)  # (3, 5)
scores[k_pos.numpy()[0][None, :] > q_pos.numpy()[0][:, None]] = -np.inf
weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
expected = (weights / weights.sum(axis=-1, keepdims=True)) @ v64[0, 0]  # (3, 8)


def causal(b, h, q_idx, kv_idx):
    return k_pos[b, kv_idx] <= q_pos[b, q_idx]


q, k, v = (torch.tensor(x, dtype=torch.float32) for x in (q64, k64, v64))
block_mask = create_block_mask(causal, 1, None, 3, 5, device="cpu")
static = torch.compile(flex_attention, dynamic=False)(q, k, v, block_mask=block_mask)
print("float64 by hand, row 0:     ", np.round(expected[0], 4))
print("compiled, dynamic=False:    ", np.round(static[0, 0, 0].numpy(), 4))
try:
    dynamic = torch.compile(flex_attention, dynamic=True)(q, k, v, block_mask=block_mask)
except Exception as exc:  # Inductor's CppCompileError, wrapped
    first = next((line for line in str(exc).splitlines() if "error:" in line), str(exc)[:200])
    print("compiled, dynamic=True:      raised", type(exc).__name__)
    print("   ", first.split("main.cpp:")[-1].strip())
    sys.exit(1)
error = float(np.abs(dynamic[0, 0].numpy() - expected).max())
print("compiled, dynamic=True:     ", np.round(dynamic[0, 0, 0].numpy(), 4), f"(error {error:.1e})")
sys.exit(0 if error < 1e-5 else 1)
