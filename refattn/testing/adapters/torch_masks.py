r"""A problem's positions, mask, bias, ALiBi and sinks as the torch tensors peers take.

Every PyTorch-based adapter says visibility the same way, from positions
alone (the rule of :func:`refattn.positions.visibility`, written again here
in torch), and folds ALiBi, a bias and sink logits into one additive float
mask at least float32 wide; each adapter then hands the peer the form it
takes (a boolean mask, a float mask, a ``mask_mod``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refattn.testing.candidate import AttentionProblem


def cuda_device(problem: AttentionProblem) -> str:
    """The problem's device if it is a GPU, else the first GPU (NumPy inputs move there), for
    the adapters to kernels that run only on CUDA.

    >>> from refattn.testing import ProblemSpec, make_problem
    >>> cuda_device(make_problem(ProblemSpec()))
    'cuda'
    """
    device = str(problem.device)
    return device if device.startswith("cuda") else "cuda"


def as_torch(x: Any, device: Any = None) -> Any:
    """An array of the problem (NumPy, PyTorch, or anything with DLPack) as a torch tensor.

    NumPy's bfloat16 (``ml_dtypes``) is unknown to ``torch.from_numpy``, so it
    goes through float32, which holds every bfloat16 exactly.

    >>> import pytest; torch = pytest.importorskip("torch")
    >>> import ml_dtypes
    >>> x = np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16)
    >>> as_torch(x)
    tensor([ 1.5000, -2.0000], dtype=torch.bfloat16)
    """
    import torch

    if isinstance(x, torch.Tensor):
        tensor = x
    elif isinstance(x, np.ndarray):
        if x.dtype.name == "bfloat16":
            tensor = torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
        else:
            tensor = torch.from_numpy(np.ascontiguousarray(x))
    else:
        tensor = torch.from_dlpack(x)
    return tensor if device is None else tensor.to(device)


def visibility(q_pos: Any, k_pos: Any, problem: AttentionProblem) -> Any:
    """(B, Sq, Sk) booleans, in torch: which key each query may see, from positions alone.

    The rule of :func:`refattn.positions.visibility`: a key is visible when its
    slot is held (``k_pos >= 0``), it is not after the query (with ``causal``),
    ``q_pos - k_pos < window`` unless ``k_pos < sink_tokens`` (with a window)
    and ``k_pos - q_pos <= window_right`` (with a right reach).

    >>> import pytest; torch = pytest.importorskip("torch")
    >>> from refattn.testing import ProblemSpec, make_problem
    >>> p = make_problem(ProblemSpec(q_len=2, k_len=4, causal=True, window=2))
    >>> q_pos, k_pos = torch.tensor([[2, 3]]), torch.tensor([[0, 1, 2, -1]])
    >>> visibility(q_pos, k_pos, p).int()
    tensor([[[0, 1, 1, 0],
             [0, 0, 1, 0]]], dtype=torch.int32)
    """
    query, key = q_pos[:, :, None], k_pos[:, None, :]  # (B, Sq, 1), (B, 1, Sk)
    visible = (key >= 0).expand(q_pos.shape[0], q_pos.shape[1], k_pos.shape[1])  # (B, Sq, Sk)
    if problem.causal:
        visible = visible & (key <= query)
    if problem.window is not None:
        visible = visible & ((query - key < problem.window) | (key < problem.sink_tokens))
    if problem.window_right is not None:
        visible = visible & (key - query <= problem.window_right)
    return visible


def additive_terms(problem: AttentionProblem, q: Any, q_pos: Any, k_pos: Any) -> Any:
    """(B, Hq, Sq, Sk), at least float32: the ALiBi term and the bias, or None for neither."""
    import torch

    wide = torch.promote_types(q.dtype, torch.float32)
    B, Hq, Sq, _ = q.shape
    total = None
    if problem.alibi_slopes is not None:
        slopes = as_torch(problem.alibi_slopes, q.device)
        total = alibi_bias(slopes, q_pos, k_pos, heads=Hq)  # (B, Hq, Sq, Sk)
    if problem.bias is not None:
        bias = as_torch(problem.bias, q.device).to(wide)
        total = bias if total is None else total + bias
    return None if total is None else total.expand(B, Hq, Sq, k_pos.shape[1])


def with_sink_key(
    problem: AttentionProblem, k: Any, v: Any, keep: Any, additive: Any
) -> tuple[Any, Any, Any, Any]:
    """k, v with one more slot of zeros, seen by every query with score sigma_h: the sink."""
    import torch

    B, Hq, Sq = keep.shape[0], problem.q.shape[1], keep.shape[2]
    sink = as_torch(problem.sink_logits, k.device)
    wide = torch.promote_types(sink.dtype, torch.float32)
    k, v = (torch.nn.functional.pad(x, (0, 0, 0, 1)) for x in (k, v))  # (B, Hkv, Sk + 1, D)
    keep = torch.nn.functional.pad(keep, (0, 1), value=True)  # (B, 1 or Hq, Sq, Sk + 1)
    if additive is None:
        additive = torch.zeros((B, Hq, Sq, keep.shape[-1] - 1), dtype=wide, device=k.device)
    column = sink.to(wide).reshape(1, Hq, 1, 1).expand(B, Hq, Sq, 1)
    return k, v, keep, torch.cat([additive, column.to(additive.dtype)], dim=-1)


def top_left_causal(problem: AttentionProblem, q_pos: Any, k_pos: Any) -> bool:
    """Whether SDPA's ``is_causal`` alone is the problem: causal, top-left positions, and no
    window, mask, bias, ALiBi or sinks."""
    extras = (problem.window, problem.window_right, problem.mask, problem.bias,
              problem.alibi_slopes, problem.sink_logits)  # fmt: skip
    return problem.causal and all(x is None for x in extras) and is_top_left(q_pos, k_pos)


def alibi_bias(slopes: Any, q_pos: Any, k_pos: Any, *, heads: int) -> Any:
    """(B, Hq, Sq, Sk) ALiBi term :math:`-m_h |q^{pos}_i - k^{pos}_j|`, at least float32.

    ``slopes`` is (Hq,) or (B, Hq); they arrive rounded to the problem dtype
    and are widened exactly, so only the product is rounded, once, at the end.
    """
    import torch

    wide = torch.promote_types(slopes.dtype, torch.float32)
    slopes = slopes.to(wide).reshape(-1, heads)[:, :, None, None]  # (B or 1, Hq, 1, 1)
    distance = (q_pos[:, :, None] - k_pos[:, None, :]).abs().to(wide)  # (B, Sq, Sk)
    return -slopes * distance[:, None]  # (B, Hq, Sq, Sk)


def is_top_left(q_pos: Any, k_pos: Any) -> bool:
    """Whether every row has ``q_pos = arange(Sq)``, ``k_pos = arange(Sk)``: SDPA's is_causal."""
    import torch

    rows_q = torch.arange(q_pos.shape[1], device=q_pos.device)
    rows_k = torch.arange(k_pos.shape[1], device=k_pos.device)
    return bool((q_pos == rows_q).all()) and bool((k_pos == rows_k).all())
