r"""PyTorch SDPA, FlexAttention and flash-attn as candidates for ``check_attention``.

Each adapter takes an :class:`~refattn.testing.AttentionProblem`, says it in
the peer's own terms the way a careful user would (positions become a mask,
an alignment or per-row cache lengths), calls the peer once and hands back
what the peer returned. Only conventions that differ on purpose are mapped,
each where the adapter says so; a problem the peer cannot say raises
:class:`~refattn.testing.Unsupported` with the reason, which the report counts.

===========================  ==================================  ============================
adapter                      expresses                           raises Unsupported for
===========================  ==================================  ============================
``torch_sdpa``               any positions, causal, window,      softcap, lse
                             GQA, ALiBi (as a float mask)
``torch_flex_attention``     any positions, causal, window,      Sk = 0; a torch without
                             GQA, softcap, ALiBi, lse            FlexAttention
``flash_attn_func``          default positions, causal, window,  other positions, float32/64,
                             GQA, softcap, ALiBi, lse            Dv != D, D > 256, and more
``flash_attn_with_kvcache``  the same, and per-row cache         the same, and Sk = 0
                             lengths (``cache_seqlens``)
===========================  ==================================  ============================

PyTorch and flash-attn are imported inside the adapters, never when this
module is: ``refattn.testing`` must stay importable, and cheap, where neither
is installed, and must not pull a framework into a process that did not ask
for it. An adapter for a peer that cannot run here (not installed, no GPU)
raises :class:`~refattn.testing.candidate.Unavailable` saying so, and the
check reports ``unavailable: torch is not installed`` rather than a failure.

Examples
--------
>>> import pytest; _ = pytest.importorskip("torch")
>>> from refattn.testing import ProblemSpec, check_problem
>>> from refattn.testing.adapters import torch_sdpa
>>> spec = ProblemSpec(q_len=3, k_len=5, causal=True, layout="holes", seed=1)
>>> check_problem(torch_sdpa, spec).passed
True
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import math
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from refattn.testing.candidate import AttentionProblem, Unavailable, Unsupported

__all__ = ["flash_attn_func", "flash_attn_with_kvcache", "torch_flex_attention", "torch_sdpa"]

#: What FlexAttention says when called without torch.compile: the adapter means to.
_FLEX_EAGER_WARNING = "flex_attention called without torch.compile"
#: The module switch that runs FlexAttention's forward without dynamo (see ``_uncompiled``).
_FLEX_EAGER_SWITCH = "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG"


def torch_sdpa(problem: AttentionProblem) -> Any:
    r"""``torch.nn.functional.scaled_dot_product_attention`` on the problem.

    Positions, ``causal`` and ``window`` become a boolean mask (B, 1, Sq, Sk);
    with ALiBi, a float mask in q's dtype (as SDPA documents it) holding
    :math:`-m_h |q^{pos}_i - k^{pos}_j|` where visible and :math:`-\infty`
    elsewhere. ``is_causal=True`` with no mask is used only where PyTorch's
    top-left alignment is exactly the problem's positions (every row
    ``q_pos = arange(Sq)``, ``k_pos = arange(Sk)``, no window, no ALiBi); no
    mask at all where every query sees every key. Grouped-query attention is
    ``enable_gqa=True``. Rows with no visible key are set to 0, refattn's
    convention (SDPA kernels have given NaN there).

    Raises
    ------
    Unsupported
        For softcap and for the log-sum-exp, which SDPA cannot express.
    """
    _require("torch")
    if problem.softcap is not None:
        raise Unsupported("SDPA has no softcap")
    if problem.return_lse:
        raise Unsupported("SDPA does not return the log-sum-exp")
    import torch

    q, k, v = (_as_torch(x) for x in (problem.q, problem.k, problem.v))
    q_pos, k_pos = _as_torch(problem.q_pos, q.device), _as_torch(problem.k_pos, q.device)
    visible = _visibility(q_pos, k_pos, causal=problem.causal, window=problem.window)
    options: dict[str, Any] = {"scale": problem.scale, "enable_gqa": True}
    if problem.alibi_slopes is not None:
        slopes = _as_torch(problem.alibi_slopes, q.device)
        bias = _alibi_bias(slopes, q_pos, k_pos, heads=q.shape[1])  # (B, Hq, Sq, Sk)
        options["attn_mask"] = bias.masked_fill(~visible[:, None], -math.inf).to(q.dtype)
    elif bool(visible.all()):
        pass  # every query sees every key: no mask to give
    elif problem.causal and problem.window is None and _is_top_left(q_pos, k_pos):
        options["is_causal"] = True
    else:
        options["attn_mask"] = visible[:, None]  # (B, 1, Sq, Sk)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, **options)
    seen = visible.any(dim=-1)[:, None, :, None]  # (B, 1, Sq, 1)
    return torch.where(seen, out, torch.zeros((), dtype=out.dtype, device=out.device))


def torch_flex_attention(problem: AttentionProblem) -> Any:
    r"""``torch.nn.attention.flex_attention.flex_attention`` on the problem.

    Visibility is a ``mask_mod`` that reads the captured ``q_pos``/``k_pos``
    of the batch row, made into a block mask; softcap and ALiBi are a
    ``score_mod`` on the already scaled score, softcap first, then
    :math:`-m_h |q^{pos}_i - k^{pos}_j|` with the slopes widened to the
    working precision of the scores (float32, float64 for float64 inputs),
    where FlexAttention holds them. The log-sum-exp comes from
    ``return_aux=AuxRequest(lse=True)`` (``return_lse`` on a torch without
    it), which torch 2.13 already returns in natural log, with
    :math:`-\infty` and a zero output for a row with no visible key.

    It runs uncompiled, as plain eager PyTorch (see :func:`_uncompiled`);
    where it would warn that it is unfused, that warning alone is silenced.

    Raises
    ------
    Unsupported
        Where the installed torch has no FlexAttention, and for ``Sk = 0``,
        on which it fails (with a block mask or without: it reduces over the
        empty key axis).
    """
    flex = _flex_attention_module()
    import torch

    q, k, v = (_as_torch(x) for x in (problem.q, problem.k, problem.v))
    q_pos, k_pos = _as_torch(problem.q_pos, q.device), _as_torch(problem.k_pos, q.device)
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    if Sk == 0:
        raise Unsupported("FlexAttention fails on Sk = 0 keys")
    causal, window, softcap = problem.causal, problem.window, problem.softcap

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        query, key = q_pos[b, q_idx], k_pos[b, kv_idx]
        keep = key >= 0
        if causal:
            keep = keep & (key <= query)
        if window is not None:
            keep = keep & (query - key < window)
        return keep

    slopes = None
    if problem.alibi_slopes is not None:
        working = torch.float64 if q.dtype == torch.float64 else torch.float32
        slopes = _as_torch(problem.alibi_slopes, q.device).to(working).expand(B, Hq)

    def score_mod(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if slopes is not None:
            score = score - slopes[b, h] * (q_pos[b, q_idx] - k_pos[b, kv_idx]).abs()
        return score

    modified = softcap is not None or slopes is not None
    block_mask = flex.create_block_mask(mask_mod, B, None, Sq, Sk, device=q.device)
    options: dict[str, Any] = {}
    if problem.return_lse:
        aux_request = getattr(flex, "AuxRequest", None)
        options = {"return_aux": aux_request(lse=True)} if aux_request else {"return_lse": True}
    with _uncompiled(flex), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_FLEX_EAGER_WARNING, category=UserWarning)
        result = flex.flex_attention(
            q, k, v, score_mod=score_mod if modified else None, block_mask=block_mask,
            scale=problem.scale, enable_gqa=True, **options,
        )  # fmt: skip
    if not problem.return_lse:
        return result
    out, aux = result
    return out, getattr(aux, "lse", aux)  # AuxOutput, or the lse itself from return_lse


def flash_attn_func(problem: AttentionProblem) -> Any:
    r"""flash-attn 2's ``flash_attn_func`` on the problem (CUDA, float16/bfloat16).

    flash-attn has no positions: its causal mask and window are aligned to
    the bottom right, query :math:`i` sitting at :math:`S_k - S_q + i`, which
    is refattn's default, so only problems with default positions in every
    row are expressible. The window :math:`W` is ``window_size=(W - 1, 0)``
    with ``causal`` and ``(W - 1, -1)`` without; ALiBi slopes go as float32
    (H,) or (B, H). See :func:`_flash_result` for how the lse is read.

    Raises
    ------
    Unsupported
        Where flash_attn or CUDA is missing, and for what flash-attn 2 cannot
        express: positions other than the defaults, dtypes other than
        float16/bfloat16, ``Dv != D``, ``D > 256``, softcap before
        flash-attn 2.6, and the one window it clamps (see :func:`_flash_window`).
    """
    flash_attn = _flash_attn_module()
    device = _cuda_device(problem)
    q, k, v = (_as_torch(x, device) for x in (problem.q, problem.k, problem.v))
    q_pos, k_pos = _as_torch(problem.q_pos, device), _as_torch(problem.k_pos, device)
    _check_flash_shapes(problem, q, v)
    lengths = _cache_lengths(q_pos, k_pos)
    Sk = k.shape[2]
    if lengths is None or bool((lengths != Sk).any()):
        raise Unsupported("flash_attn_func has only default positions (queries at the end)")
    options = _flash_options(problem, flash_attn.flash_attn_func, q_pos, Sk, device)
    result = flash_attn.flash_attn_func(
        *(x.transpose(1, 2) for x in (q, k, v)),  # (B, S, H, D)
        softmax_scale=problem.scale, causal=problem.causal,
        return_attn_probs=problem.return_lse, **options,
    )  # fmt: skip
    out, lse = (result[0], result[1]) if problem.return_lse else (result, None)
    return _flash_result(problem, out, lse, q_pos, k_pos, Sk)


def flash_attn_with_kvcache(problem: AttentionProblem) -> Any:
    r"""flash-attn 2's ``flash_attn_with_kvcache`` on the problem (CUDA, float16/bfloat16).

    ``k`` and ``v`` are the cache, ``cache_seqlens`` the per-row lengths
    :math:`L_b`: row :math:`b` holds keys at positions :math:`0 .. L_b - 1`
    in its first slots (the rest empty, never read) and its queries end at
    :math:`L_b - 1`, :math:`q^{pos}_i = L_b - S_q + i`. That is every
    position layout it can express; the defaults are :math:`L_b = S_k`.
    Window, softcap and ALiBi are given as for :func:`flash_attn_func`.

    Raises
    ------
    Unsupported
        As :func:`flash_attn_func`, for positions that are not per-row
        lengths, and for a cache of ``Sk = 0`` slots.
    """
    flash_attn = _flash_attn_module()
    import torch

    device = _cuda_device(problem)
    q, k, v = (_as_torch(x, device) for x in (problem.q, problem.k, problem.v))
    q_pos, k_pos = _as_torch(problem.q_pos, device), _as_torch(problem.k_pos, device)
    _check_flash_shapes(problem, q, v)
    Sk = k.shape[2]
    if Sk == 0:
        raise Unsupported("flash_attn_with_kvcache needs a cache of at least one slot")
    lengths = _cache_lengths(q_pos, k_pos)
    if lengths is None:
        raise Unsupported("flash_attn_with_kvcache has only per-row lengths (cache_seqlens)")
    options = _flash_options(problem, flash_attn.flash_attn_with_kvcache, q_pos, Sk, device)
    k_cache, v_cache = (x.transpose(1, 2).contiguous() for x in (k, v))  # (B, Sk, Hkv, D)
    result = flash_attn.flash_attn_with_kvcache(
        q.transpose(1, 2), k_cache, v_cache,  # (B, Sq, Hq, D), (B, Sk, Hkv, D) x 2
        cache_seqlens=lengths.to(torch.int32), softmax_scale=problem.scale,
        causal=problem.causal, return_softmax_lse=problem.return_lse, **options,
    )  # fmt: skip
    out, lse = result if problem.return_lse else (result, None)
    return _flash_result(problem, out, lse, q_pos, k_pos, Sk)


def _as_torch(x: Any, device: Any = None) -> Any:
    """An array of the problem (NumPy, PyTorch, or anything with DLPack) as a torch tensor.

    NumPy's bfloat16 (``ml_dtypes``) is unknown to ``torch.from_numpy``, so it
    goes through float32, which holds every bfloat16 exactly.

    >>> import pytest; torch = pytest.importorskip("torch")
    >>> import ml_dtypes
    >>> x = np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16)
    >>> _as_torch(x)
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


def _visibility(q_pos: Any, k_pos: Any, *, causal: bool, window: int | None) -> Any:
    """(B, Sq, Sk) booleans, in torch: which key each query may see, from positions alone.

    The rule of :func:`refattn.positions.visibility`: a key is visible when its
    slot is held (``k_pos >= 0``), it is not after the query (with ``causal``)
    and ``q_pos - k_pos < window`` (with a window).

    >>> import pytest; torch = pytest.importorskip("torch")
    >>> q_pos, k_pos = torch.tensor([[2, 3]]), torch.tensor([[0, 1, 2, -1]])
    >>> _visibility(q_pos, k_pos, causal=True, window=2).int()
    tensor([[[0, 1, 1, 0],
             [0, 0, 1, 0]]], dtype=torch.int32)
    """
    query, key = q_pos[:, :, None], k_pos[:, None, :]  # (B, Sq, 1), (B, 1, Sk)
    visible = (key >= 0).expand(q_pos.shape[0], q_pos.shape[1], k_pos.shape[1])  # (B, Sq, Sk)
    if causal:
        visible = visible & (key <= query)
    if window is not None:
        visible = visible & (query - key < window)
    return visible


def _alibi_bias(slopes: Any, q_pos: Any, k_pos: Any, *, heads: int) -> Any:
    """(B, Hq, Sq, Sk) ALiBi term :math:`-m_h |q^{pos}_i - k^{pos}_j|`, at least float32.

    ``slopes`` is (Hq,) or (B, Hq); they arrive rounded to the problem dtype
    and are widened exactly, so only the product is rounded, once, at the end.
    """
    import torch

    wide = torch.promote_types(slopes.dtype, torch.float32)
    slopes = slopes.to(wide).reshape(-1, heads)[:, :, None, None]  # (B or 1, Hq, 1, 1)
    distance = (q_pos[:, :, None] - k_pos[:, None, :]).abs().to(wide)  # (B, Sq, Sk)
    return -slopes * distance[:, None]  # (B, Hq, Sq, Sk)


def _is_top_left(q_pos: Any, k_pos: Any) -> bool:
    """Whether every row has ``q_pos = arange(Sq)``, ``k_pos = arange(Sk)``: SDPA's is_causal."""
    import torch

    rows_q = torch.arange(q_pos.shape[1], device=q_pos.device)
    rows_k = torch.arange(k_pos.shape[1], device=k_pos.device)
    return bool((q_pos == rows_q).all()) and bool((k_pos == rows_k).all())


def _require(library: str) -> None:
    """:class:`~refattn.testing.candidate.Unavailable` where ``library`` is not installed."""
    if importlib.util.find_spec(library) is None:
        raise Unavailable(f"{library} is not installed")


def _flex_attention_module() -> Any:
    """``torch.nn.attention.flex_attention``, or Unavailable where this torch lacks it."""
    _require("torch")
    try:
        from torch.nn.attention import flex_attention
    except ImportError as exc:
        raise Unavailable(f"this torch has no FlexAttention ({exc})") from None
    return flex_attention


#: Who is inside :func:`_uncompiled` now, and the switch's value before the first came in.
_FLEX_USERS = {"count": 0, "before": False}
_FLEX_LOCK = threading.Lock()


@contextlib.contextmanager
def _uncompiled(flex: Any) -> Iterator[None]:
    """Run FlexAttention as plain eager PyTorch, not through dynamo.

    Called without ``torch.compile``, torch 2.13's ``flex_attention`` still
    traces each call with dynamo (its "eager" backend) and traces again for
    every new shape, dtype or captured value: about 0.3 s a problem, 70 s for
    200. The switch its own warning names for debugging mask and score mods
    runs the same forward (``math_attention``) directly. The switch is put
    back afterwards; a torch without it runs the traced way, whose warning
    the caller silences.

    The switch is one module attribute shared by every thread, so it is
    counted: the first caller in turns it on and the last one out puts it
    back; a thread leaving early cannot turn it off under another, nor leave
    it on.
    """
    if not hasattr(flex, _FLEX_EAGER_SWITCH):
        yield
        return
    with _FLEX_LOCK:
        if _FLEX_USERS["count"] == 0:
            _FLEX_USERS["before"] = getattr(flex, _FLEX_EAGER_SWITCH)
            setattr(flex, _FLEX_EAGER_SWITCH, True)
        _FLEX_USERS["count"] += 1
    try:
        yield
    finally:
        with _FLEX_LOCK:
            _FLEX_USERS["count"] -= 1
            if _FLEX_USERS["count"] == 0:
                setattr(flex, _FLEX_EAGER_SWITCH, _FLEX_USERS["before"])


def _flash_attn_module() -> Any:
    """``flash_attn``, or Unavailable saying why it cannot run here."""
    _require("flash_attn")
    import torch

    if not torch.cuda.is_available():
        raise Unavailable("flash-attn needs CUDA")
    import flash_attn

    return flash_attn


def _cuda_device(problem: AttentionProblem) -> str:
    """The problem's device if it is a GPU, else the first GPU (NumPy inputs move there)."""
    device = str(problem.device)
    return device if device.startswith("cuda") else "cuda"


def _check_flash_shapes(problem: AttentionProblem, q: Any, v: Any) -> None:
    """Unsupported for dtypes and head dims flash-attn 2 does not take."""
    if problem.dtype not in ("float16", "bfloat16"):
        raise Unsupported(f"flash-attn takes float16 and bfloat16, not {problem.dtype}")
    D, Dv = q.shape[-1], v.shape[-1]
    if D != Dv:
        raise Unsupported(f"flash-attn 2 needs the value dim equal to the key dim; got {Dv} != {D}")
    if D > 256:
        raise Unsupported(f"flash-attn 2 takes head dims up to 256; got {D}")


def _cache_lengths(q_pos: Any, k_pos: Any) -> Any:
    """(B,) lengths L if row b holds keys 0..L_b-1 first and queries ending at L_b - 1, else None.

    That is the layout ``cache_seqlens`` expresses: ``k_pos = j`` for slots
    ``j < L_b`` and ``-1`` after, ``q_pos = L_b - Sq + arange(Sq)``.
    """
    import torch

    Sq, Sk = q_pos.shape[1], k_pos.shape[1]
    lengths = (k_pos >= 0).sum(dim=1)  # (B,)
    slots = torch.arange(Sk, device=k_pos.device)[None, :]  # (1, Sk)
    held = torch.where(slots < lengths[:, None], slots, -1)  # (B, Sk)
    rows = torch.arange(Sq, device=q_pos.device)[None, :]  # (1, Sq)
    queries = lengths[:, None] - Sq + rows  # (B, Sq)
    if bool((k_pos == held).all()) and bool((q_pos == queries).all()):
        return lengths
    return None


def _flash_window(problem: AttentionProblem, Sq: int, Sk: int) -> tuple[int, int]:
    """``window_size=(left, right)`` for refattn's window: (W-1, 0) causal, (W-1, -1) not.

    flash-attn turns a right reach of -1 ("infinite") into ``Sk`` once the
    left one is set, so without ``causal`` query 0 reaches only key
    ``2 Sk - Sq``: short of the last key when ``Sq > Sk + 1``, where refattn's
    queries (at negative positions) see every key. Those are Unsupported. A
    window of ``Sk + 1`` or more is no window for flash-attn or refattn.
    """
    W = problem.window
    if W is None:
        return (-1, -1)
    if problem.causal:
        return (W - 1, 0)
    if W - 1 < Sk and Sq > Sk + 1:
        raise Unsupported("flash-attn caps a window's right reach at Sk; Sq > Sk + 1 needs more")
    return (W - 1, -1)


def _flash_options(
    problem: AttentionProblem, fn: Any, q_pos: Any, Sk: int, device: str
) -> dict[str, Any]:
    """The window, softcap and ALiBi keywords of a flash-attn call."""
    import torch

    options: dict[str, Any] = {"window_size": _flash_window(problem, q_pos.shape[1], Sk)}
    if problem.softcap is not None:
        if "softcap" not in inspect.signature(fn).parameters:
            raise Unsupported("this flash-attn has no softcap (it came in 2.6)")
        options["softcap"] = float(problem.softcap)
    if problem.alibi_slopes is not None:
        slopes = _as_torch(problem.alibi_slopes, device)
        options["alibi_slopes"] = slopes.to(torch.float32).contiguous()  # exact: widened
    return options


def _flash_result(
    problem: AttentionProblem, out: Any, lse: Any, q_pos: Any, k_pos: Any, Sk: int
) -> Any:
    r"""flash-attn's (B, Sq, Hq, Dv) output and its lse, in refattn's layout and conventions.

    Two conventions differ on purpose and are mapped:

    - a row with no visible key has lse :math:`+\infty` in flash-attn
      (:math:`-\infty` in refattn); its output is already 0, and is left as
      flash-attn gives it;
    - with ``causal`` and no effective window, flash-attn adds the ALiBi term
      as :math:`+m_h j` instead of :math:`-m_h (q^{pos}_i - j)`: the same
      softmax (they differ by a constant per row) but an lse larger by
      :math:`m_h q^{pos}_i`, which is subtracted.
    """
    import torch

    out = out.transpose(1, 2)  # (B, Hq, Sq, Dv)
    if lse is None:
        return out
    visible = _visibility(q_pos, k_pos, causal=problem.causal, window=problem.window)
    empty = ~visible.any(dim=-1)[:, None, :]  # (B, 1, Sq)
    lse = torch.where(empty & torch.isposinf(lse), -math.inf, lse)  # (B, Hq, Sq)
    causal_kernel = problem.causal and (problem.window is None or problem.window - 1 >= Sk)
    if problem.alibi_slopes is not None and causal_kernel:
        slopes = _as_torch(problem.alibi_slopes, lse.device).to(torch.float32)
        slopes = slopes.reshape(-1, lse.shape[1])[:, :, None]  # (B or 1, Hq, 1)
        lse = lse - slopes * q_pos[:, None, :].to(torch.float32)  # (B, Hq, Sq)
    return out, lse
