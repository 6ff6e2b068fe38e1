r"""PyTorch's own attention as a candidate: SDPA and FlexAttention."""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from refattn.testing.adapters.libraries import require
from refattn.testing.adapters.torch_masks import (
    additive_terms,
    as_torch,
    top_left_causal,
    visibility,
    with_sink_key,
)
from refattn.testing.candidate import AttentionProblem, Unavailable, Unsupported
from refattn.testing.conformance import probes
from refattn.testing.conformance.implementations import Defect, Implementation
from refattn.testing.constraints import Constraints
from refattn.testing.drawing import DEFAULT_FEATURES
from refattn.testing.report import Failure

#: What FlexAttention says when called without torch.compile: the adapter means to.
_FLEX_EAGER_WARNING = "flex_attention called without torch.compile"
#: What torch.compile's calls warn from inside torch itself, not from the user's call:
#: Inductor's imports touch ``torch.jit.script_method``, and dynamo's tracing of an
#: index inside a mask_mod instantiates an autograd Function.
_COMPILE_DEPRECATIONS = (
    "`torch.jit.script_method` is deprecated",
    ".*should not be instantiated",
)
#: The module switch that runs FlexAttention's forward without dynamo (see ``_uncompiled``).
_FLEX_EAGER_SWITCH = "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG"


def torch_sdpa(problem: AttentionProblem) -> Any:
    r"""``torch.nn.functional.scaled_dot_product_attention`` on the problem.

    Positions, ``causal``, the window both ways (sink tokens kept) and the
    problem's boolean mask become a boolean mask (B, 1 or Hq, Sq, Sk); with
    ALiBi, a bias or sink logits, a float mask in q's dtype (as SDPA documents
    it) holding :math:`-m_h |q^{pos}_i - k^{pos}_j|` plus the bias where
    visible and :math:`-\infty` elsewhere. A sink logit :math:`\sigma_h` is
    one more key of zeros, value zeros, that every query sees with the float
    mask's :math:`\sigma_h` as its score (:math:`0 + \sigma_h`, exact): it joins the
    denominator and adds nothing. ``is_causal=True`` with no mask is used only
    where PyTorch's top-left alignment is exactly the problem (every row
    ``q_pos = arange(Sq)``, ``k_pos = arange(Sk)``, no window, mask, bias, ALiBi
    or sinks); no mask at all where every query sees every key.
    Grouped-query attention is ``enable_gqa=True``. Rows with no visible key
    are set to 0, refattn's convention (SDPA kernels have given NaN there).

    Raises
    ------
    Unsupported
        For softcap and for the log-sum-exp, which SDPA cannot express.
    """
    return _sdpa(problem, None)


def torch_sdpa_math(problem: AttentionProblem) -> Any:
    """:func:`torch_sdpa` with SDPA's math backend forced (``sdpa_kernel(SDPBackend.MATH)``):
    the composite of matmuls and a softmax that every device has."""
    return _sdpa(problem, "MATH")


def torch_sdpa_flash(problem: AttentionProblem) -> Any:
    """:func:`torch_sdpa` with SDPA's flash backend forced (``SDPBackend.FLASH_ATTENTION``):
    on the CPU, PyTorch's own tiled kernel; a problem it refuses (PyTorch warns why, then
    raises "No available kernel") is Unsupported with PyTorch's reasons."""
    return _sdpa(problem, "FLASH_ATTENTION")


def torch_sdpa_efficient(problem: AttentionProblem) -> Any:
    """:func:`torch_sdpa` with the memory-efficient backend forced
    (``SDPBackend.EFFICIENT_ATTENTION``, CUDA only: Unavailable elsewhere)."""
    return _sdpa(problem, "EFFICIENT_ATTENTION")


def torch_sdpa_cudnn(problem: AttentionProblem) -> Any:
    """:func:`torch_sdpa` with the cuDNN backend forced (``SDPBackend.CUDNN_ATTENTION``,
    CUDA only: Unavailable elsewhere)."""
    return _sdpa(problem, "CUDNN_ATTENTION")


torch_sdpa_flash.constraints = Constraints(same_value_dim=True)  # type: ignore[attr-defined]

#: The SDPA backends that run only on a CUDA GPU.
_CUDA_BACKENDS = ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION")


def _sdpa(problem: AttentionProblem, backend: str | None) -> Any:
    """SDPA on the problem, through ``backend`` (an ``SDPBackend`` name) alone, or through
    whichever backend PyTorch picks (None)."""
    require("torch")
    if problem.softcap is not None:
        raise Unsupported("SDPA has no softcap")
    if problem.return_lse:
        raise Unsupported("SDPA does not return the log-sum-exp")
    import torch

    device = None
    if backend in _CUDA_BACKENDS:
        if not torch.cuda.is_available():
            raise Unavailable(f"SDPA's {backend} backend needs CUDA")
        device = "cuda"
    q, k, v = (as_torch(x, device) for x in (problem.q, problem.k, problem.v))
    q_pos, k_pos = as_torch(problem.q_pos, q.device), as_torch(problem.k_pos, q.device)
    keep = visibility(q_pos, k_pos, problem)[:, None]  # (B, 1, Sq, Sk)
    if problem.mask is not None:
        keep = keep & as_torch(problem.mask, q.device).to(torch.bool)  # (B, 1 or Hq, Sq, Sk)
    additive = additive_terms(problem, q, q_pos, k_pos)  # (B, Hq, Sq, Sk) or None
    options: dict[str, Any] = {"scale": problem.scale, "enable_gqa": True}
    if problem.sink_logits is not None:
        k, v, keep, additive = with_sink_key(problem, k, v, keep, additive)
    if additive is not None:
        options["attn_mask"] = additive.masked_fill(~keep, -math.inf).to(q.dtype)
    elif bool(keep.all()):
        pass  # every query sees every key: no mask to give
    elif top_left_causal(problem, q_pos, k_pos):
        options["is_causal"] = True
    else:
        options["attn_mask"] = keep
    if backend is None:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, **options)
    else:
        out = _forced(torch, backend, q, k, v, options)
    seen = keep.any(dim=-1)[..., None]  # (B, 1 or Hq, Sq, 1)
    return torch.where(seen, out, torch.zeros((), dtype=out.dtype, device=out.device))


def _forced(torch: Any, backend: str, q: Any, k: Any, v: Any, options: dict[str, Any]) -> Any:
    """SDPA through one backend; Unsupported, with the reasons PyTorch warns, where it refuses.

    A backend that cannot take the inputs makes PyTorch warn why (one warning
    per check that failed: "Flash attention does not support ...") and then
    raise "No available kernel": that is a limit PyTorch states, so it is
    counted, under the reasons it gave, not failed.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with warnings.catch_warnings(record=True) as said, sdpa_kernel(getattr(SDPBackend, backend)):
        warnings.simplefilter("always")
        try:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, **options)
        except RuntimeError as exc:
            if "No available kernel" not in str(exc):
                raise
            reasons = sorted({_reason(str(w.message)) for w in said} - {""})
    raise Unsupported(f"SDPA {backend}: " + ("; ".join(reasons) or "no available kernel"))


def _reason(warning: str) -> str:
    """The sentence of one of SDPA's "cannot use this backend" warnings that says why, without
    the sizes that differ from problem to problem and where in PyTorch it was raised (so the
    report counts the problems together); "" for the header ("... not used because:").

    >>> _reason("Flash attention requires q,k,v to have the same last dimension. Got "
    ...         "Query.size(-1): 8, Value.size(-1): 6 instead. (Triggered internally at x.cpp:21.)")
    'Flash attention requires q,k,v to have the same last dimension'
    """
    text = warning.split("(Triggered internally")[0].split(" Got ")[0].strip().rstrip(".")
    return "" if text.endswith("because:") else text


def torch_flex_attention(problem: AttentionProblem) -> Any:
    r"""``torch.nn.attention.flex_attention.flex_attention`` on the problem.

    Visibility is a ``mask_mod`` that reads the captured ``q_pos``/``k_pos``
    of the batch row (the window both ways, sink tokens kept) and the
    problem's boolean mask, made into a block mask; softcap, ALiBi and the
    bias are a ``score_mod`` on the already scaled score, softcap first, then
    :math:`-m_h |q^{pos}_i - k^{pos}_j|` and the bias, widened to the working
    precision of the scores (float32, float64 for float64 inputs), where
    FlexAttention holds them. FlexAttention has no sink logits (torch 2.13);
    a sink is one more key of zeros, value zeros, that ``mask_mod`` keeps and
    ``score_mod`` scores :math:`\sigma_h`. The log-sum-exp comes from
    ``return_aux=AuxRequest(lse=True)`` (``return_lse`` on a torch without
    it), which torch 2.13 already returns in natural log, with
    :math:`-\infty` and a zero output for a row with no visible key.

    It runs uncompiled, as plain eager PyTorch (see :func:`_uncompiled`);
    where it would warn that it is unfused, that warning alone is silenced.

    Raises
    ------
    Unsupported
        Where the installed torch has no FlexAttention, and for ``Sk = 0``
        without sink logits, on which it fails (with a block mask or without:
        it reduces over the empty key axis).
    """
    return _flex(problem, compiled=None)


def torch_flex_attention_compiled(problem: AttentionProblem) -> Any:
    """:func:`torch_flex_attention` through ``torch.compile(flex_attention, dynamic=False)``:
    the fused kernel FlexAttention generates (Inductor's C++ on the CPU) for each size, which
    is what users run; the uncompiled one is its reference. Every new size and kind of
    ``score_mod`` compiles again (seconds each), so its checks draw few problems.

    Raises
    ------
    Unsupported
        As :func:`torch_flex_attention`.
    """
    return _flex(problem, compiled="static")


def torch_flex_attention_dynamic(problem: AttentionProblem) -> Any:
    """:func:`torch_flex_attention_compiled` compiled once for every size
    (``torch.compile(flex_attention, dynamic=True)``), which is what ``torch.compile``
    turns to by itself when a compiled function meets a second size.

    Raises
    ------
    Unsupported
        As :func:`torch_flex_attention`.
    """
    return _flex(problem, compiled="dynamic")


def _flex(problem: AttentionProblem, *, compiled: str | None, traced: bool = False) -> Any:
    """FlexAttention on the problem: compiled for this size (``"static"``), for every size
    (``"dynamic"``), or run as eager PyTorch (None): directly (see :func:`_uncompiled`), or
    ``traced`` through FlexAttention's own operator and its autograd, as a backward needs
    (directly, no gradient reaches a tensor the ``score_mod`` captures)."""
    flex = _flex_attention_module()
    import torch

    if compiled and problem.return_lse and not str(problem.device).startswith("cuda"):
        raise Unsupported("FlexAttention compiled on the CPU returns no lse (PyTorch: "
                          "return_lse is not supported yet)")  # fmt: skip

    q, k, v = (as_torch(x) for x in (problem.q, problem.k, problem.v))
    q_pos, k_pos = as_torch(problem.q_pos, q.device), as_torch(problem.k_pos, q.device)
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    sinks = problem.sink_logits is not None
    if Sk == 0 and not sinks:
        raise Unsupported("FlexAttention fails on Sk = 0 keys")
    working = torch.float64 if q.dtype == torch.float64 else torch.float32
    mask = bias = sink = None
    if problem.mask is not None:
        mask = as_torch(problem.mask, q.device).to(torch.bool).expand(B, Hq, Sq, Sk)
    if problem.bias is not None:
        bias = as_torch(problem.bias, q.device).to(working).expand(B, Hq, Sq, Sk)
    if sinks:  # one more key slot, Sk: zeros, seen by every query, scored sigma_h
        sink = as_torch(problem.sink_logits, q.device).to(working)
        k, v = (torch.nn.functional.pad(x, (0, 0, 0, 1)) for x in (k, v))
        k_pos = torch.nn.functional.pad(k_pos, (0, 1))
        mask = None if mask is None else torch.nn.functional.pad(mask, (0, 1), value=True)
        bias = None if bias is None else torch.nn.functional.pad(bias, (0, 1))
    causal, softcap = problem.causal, problem.softcap
    cap: Any = softcap  # traced, a captured Python float fails under autograd; a tensor not
    if traced and softcap is not None:
        cap = torch.tensor(softcap, dtype=working, device=q.device)
    window, window_right, sink_tokens = problem.window, problem.window_right, problem.sink_tokens

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        query, key = q_pos[b, q_idx], k_pos[b, kv_idx]
        keep = key >= 0
        if causal:
            keep = keep & (key <= query)
        if window is not None:
            keep = keep & ((query - key < window) | (key < sink_tokens))
        if window_right is not None:
            keep = keep & (key - query <= window_right)
        if mask is not None:
            keep = keep & mask[b, h, q_idx, kv_idx]
        if sink is not None:
            keep = keep | (kv_idx == Sk)
        return keep

    slopes = None
    if problem.alibi_slopes is not None:
        slopes = as_torch(problem.alibi_slopes, q.device).to(working).expand(B, Hq)

    def score_mod(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        if cap is not None:
            score = cap * torch.tanh(score / cap)
        if slopes is not None:
            score = score - slopes[b, h] * (q_pos[b, q_idx] - k_pos[b, kv_idx]).abs()
        if bias is not None:
            score = score + bias[b, h, q_idx, kv_idx]
        if sink is not None:
            score = torch.where(kv_idx == Sk, sink[h].to(score.dtype), score)
        return score

    modified = any(x is not None for x in (softcap, slopes, bias, sink))
    heads = Hq if mask is not None else None
    block_mask = flex.create_block_mask(mask_mod, B, heads, Sq, k.shape[2], device=q.device)
    options: dict[str, Any] = {}
    if problem.return_lse:
        aux_request = getattr(flex, "AuxRequest", None)
        options = {"return_aux": aux_request(lse=True)} if aux_request else {"return_lse": True}
    arguments = {"score_mod": score_mod if modified else None, "block_mask": block_mask,
                 "scale": problem.scale, "enable_gqa": True, **options}  # fmt: skip
    if compiled:
        with _torch_internal_deprecations_ignored():
            result = _compiled_flex(flex, dynamic=compiled == "dynamic")(q, k, v, **arguments)
    else:
        direct = contextlib.nullcontext() if traced else _uncompiled(flex)
        with direct, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_FLEX_EAGER_WARNING, category=UserWarning)
            result = flex.flex_attention(q, k, v, **arguments)
    if not problem.return_lse:
        return result
    out, aux = result
    return out, getattr(aux, "lse", aux)  # AuxOutput, or the lse itself from return_lse


def _flex_attention_module() -> Any:
    """``torch.nn.attention.flex_attention``, or Unavailable where this torch lacks it."""
    require("torch")
    try:
        from torch.nn.attention import flex_attention
    except ImportError as exc:
        raise Unavailable(f"this torch has no FlexAttention ({exc})") from None
    return flex_attention


#: ``torch.compile`` of each entry below, made once per process: calls share its cache.
_COMPILED: dict[str, Any] = {}


# Dynamo keeps compiled graphs on the code object of the frame it compiles, so
# compiling ``flex_attention`` itself twice (and transformers compiles it too)
# would let one compilation's graphs serve the other's calls wherever their
# guards pass: a dynamic row could run graphs built for static shapes. Each
# compilation gets its own entry frame, whose code object holds only its graphs.
def _static_shapes_entry(flex: Any, *args: Any, **kwargs: Any) -> Any:
    return flex.flex_attention(*args, **kwargs)


def _dynamic_shapes_entry(flex: Any, *args: Any, **kwargs: Any) -> Any:
    return flex.flex_attention(*args, **kwargs)


@contextlib.contextmanager
def _torch_internal_deprecations_ignored() -> Iterator[None]:
    """Ignore the DeprecationWarnings torch.compile raises from torch's own code."""
    with warnings.catch_warnings():
        for message in _COMPILE_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
        yield


def _compiled_flex(flex: Any, *, dynamic: bool) -> Any:
    """``torch.compile(flex.flex_attention, dynamic=dynamic)``, made on first use.

    Each distinct ``score_mod`` and head dim is a new graph; past dynamo's
    recompile limit it would quietly fall back to eager, which would check
    the wrong thing, so the limit is raised for this function's frames and a
    hit is made an error (``fail_on_recompile_limit_hit``).
    """
    key = "dynamic" if dynamic else "static"
    if key not in _COMPILED:
        import torch

        config = torch._dynamo.config
        limits = {
            "recompile_limit": 256,
            "cache_size_limit": 256,
            "accumulated_recompile_limit": 4096,
            "accumulated_cache_size_limit": 4096,
        }
        for name, most in limits.items():
            if hasattr(config, name):
                setattr(config, name, max(getattr(config, name), most))
        if hasattr(config, "fail_on_recompile_limit_hit"):
            config.fail_on_recompile_limit_hit = True
        entry = _dynamic_shapes_entry if dynamic else _static_shapes_entry
        _COMPILED[key] = torch.compile(entry, dynamic=dynamic)
    return functools.partial(_COMPILED[key], flex)


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


def _sdpa_probe(backend: str | None) -> Callable[[], dict[str, str]]:
    """A probe of SDPA through ``backend`` (None: PyTorch's own pick), called directly."""

    def probe() -> dict[str, str]:
        require("torch")
        import torch

        device = "cuda" if backend in _CUDA_BACKENDS else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise Unavailable(f"SDPA's {backend} backend needs CUDA")
        # The fused CUDA backends take float16 only; the CPU ones float32 as well.
        dtype = "float16" if device == "cuda" else "float32"

        def sdpa(q: np.ndarray, k: np.ndarray, v: np.ndarray, **options: Any) -> np.ndarray:
            q_, k_, v_ = (torch.tensor(x, device=device)[None, None] for x in (q, k, v))
            with contextlib.ExitStack() as stack:
                if backend is not None:
                    from torch.nn.attention import SDPBackend, sdpa_kernel

                    stack.enter_context(sdpa_kernel(getattr(SDPBackend, backend)))
                out = torch.nn.functional.scaled_dot_product_attention(q_, k_, v_, **options)
            return out[0, 0].float().cpu().numpy()

        q, k, v = probes.one_hot_inputs(q_len=2, k_len=8, dtype=dtype)
        empty = np.ones((2, 8), dtype=bool)
        empty[0] = False
        mask = torch.tensor(empty, device=device)
        causal = probes.seen(sdpa(q, k, v, is_causal=True))
        big_q, big_k, big_v, scale = probes.overflow_inputs()
        return {
            "alignment": probes.alignment_of(causal, k_len=8),
            "empty_row": probes.empty_row_of(sdpa(q, k, v, attn_mask=mask)[0], v),
            "window": "no window argument (a mask)",
            "lse": "not returned",
            "scores": probes.scores_of(sdpa(big_q, big_k, big_v, scale=scale)),
        }

    return probe


def _flex_probe(compiled: bool) -> Callable[[], dict[str, str]]:
    """A probe of FlexAttention, compiled or eager, called directly."""

    def probe() -> dict[str, str]:
        flex = _flex_attention_module()
        import torch

        # Compiled on the CPU, FlexAttention returns no lse ("torch.compile on CPU only
        # supports inference and `return_lse` is not supported yet").
        with_lse = not compiled or torch.cuda.is_available()

        def run(q: np.ndarray, k: np.ndarray, v: np.ndarray, keep: Any, **options: Any) -> Any:
            q_, k_, v_ = (torch.tensor(x)[None, None] for x in (q, k, v))
            block_mask = flex.create_block_mask(
                lambda b, h, i, j: keep(i, j), 1, None, q.shape[0], k.shape[0], device="cpu"
            )
            if with_lse:
                options["return_aux"] = flex.AuxRequest(lse=True)
            call = _compiled_flex(flex, dynamic=False) if compiled else flex.flex_attention
            with contextlib.ExitStack() as stack:
                if compiled:
                    stack.enter_context(_torch_internal_deprecations_ignored())
                else:
                    stack.enter_context(_uncompiled(flex))
                    stack.enter_context(warnings.catch_warnings())
                    warnings.filterwarnings("ignore", message=_FLEX_EAGER_WARNING)
                result = call(q_, k_, v_, block_mask=block_mask, **options)
            out, lse = result if with_lse else (result, None)
            return out[0, 0].float().numpy(), None if lse is None else lse.lse[0, 0].numpy()

        q, k, v = probes.one_hot_inputs(q_len=4, k_len=8)
        out, _ = run(q, k, v, lambda i, j: (i > 0) | (j < 0))  # row 0 sees nothing
        _, lse = run(q, k, v, lambda i, j: j <= i + 4)  # 5 .. 8 keys seen
        big = probes.overflow_inputs(head_dim=16)
        scored, _ = run(*big[:3], lambda i, j: j >= 0, scale=big[3])
        return {
            "alignment": "no causal flag: the mask_mod says where queries sit",
            "empty_row": probes.empty_row_of(out[0], v),
            "window": "no window argument (a mask_mod)",
            "lse": probes.lse_of(lse, [5, 6, 7, 8]) if with_lse else "not returned on the CPU",
            "scores": probes.scores_of(scored[0]),
        }

    return probe


#: What SDPA expresses: every default feature but softcap and the lse, every mask kind, a
#: bias, sinks both ways, a right reach, and the latent and MQA shapes.
SDPA_FEATURES = tuple(sorted((DEFAULT_FEATURES - {"softcap", "lse"}) | {
    "mask", "tree_mask", "document_mask", "prefix_lm", "bias", "sink_logits", "sink_tokens",
    "two_sided_window", "latent", "mqa"}))  # fmt: skip
#: What FlexAttention expresses: SDPA's features, softcap and the lse.
FLEX_FEATURES = tuple(sorted({*SDPA_FEATURES, "softcap", "lse"}))
_ALL_DTYPES = ("float32", "float64", "float16", "bfloat16")
#: Problems per dtype for compiled FlexAttention: each new size compiles, for seconds.
COMPILED_EXAMPLES = 30
_SDPA_UNSAID = ("dropout_p", "is_causal's top-left alignment with a mask given as well (SDPA "
                "refuses both)", "nested (jagged) tensors")  # fmt: skip
_FLEX_UNSAID = (
    "block sizes and kernel_options",
    "a compiled create_block_mask",
    "the max-score auxiliary output",
)

IMPLEMENTATIONS = (
    Implementation("PyTorch SDPA", "torch", "attention", torch_sdpa, _ALL_DTYPES,
                   SDPA_FEATURES, probe=_sdpa_probe(None), cannot_express=_SDPA_UNSAID),
    Implementation("PyTorch SDPA (math)", "torch", "attention", torch_sdpa_math, _ALL_DTYPES,
                   SDPA_FEATURES, probe=_sdpa_probe("MATH"), cannot_express=_SDPA_UNSAID),
    Implementation("PyTorch SDPA (flash, CPU)", "torch", "attention", torch_sdpa_flash,
                   _ALL_DTYPES, SDPA_FEATURES, probe=_sdpa_probe("FLASH_ATTENTION"),
                   cannot_express=_SDPA_UNSAID),
    Implementation("PyTorch SDPA (memory-efficient)", "torch", "attention", torch_sdpa_efficient,
                   ("float32", "float16", "bfloat16"), SDPA_FEATURES, gpu=True,
                   probe=_sdpa_probe("EFFICIENT_ATTENTION"), cannot_express=_SDPA_UNSAID),
    Implementation("PyTorch SDPA (cuDNN)", "torch", "attention", torch_sdpa_cudnn,
                   ("float16", "bfloat16"), SDPA_FEATURES, gpu=True,
                   probe=_sdpa_probe("CUDNN_ATTENTION"), cannot_express=_SDPA_UNSAID),
    Implementation("PyTorch FlexAttention (eager)", "torch", "attention", torch_flex_attention,
                   _ALL_DTYPES, FLEX_FEATURES, probe=_flex_probe(False),
                   cannot_express=_FLEX_UNSAID),
    Implementation("PyTorch FlexAttention (compiled)", "torch", "attention",
                   torch_flex_attention_compiled, ("float32", "float16", "bfloat16"),
                   FLEX_FEATURES, probe=_flex_probe(True), cannot_express=_FLEX_UNSAID,
                   examples=COMPILED_EXAMPLES),
    Implementation("PyTorch FlexAttention (compiled, dynamic shapes)", "torch", "attention",
                   torch_flex_attention_dynamic, ("float32", "float16", "bfloat16"),
                   FLEX_FEATURES, cannot_express=_FLEX_UNSAID, examples=COMPILED_EXAMPLES),
)  # fmt: skip


def _inductor_fails(failure: Failure) -> bool:
    """The dynamic-shape Flex defect: Inductor's C++ does not compile, or the kernel reads
    past its split ("index out of bounds: ... < cur_kvSplitSize")."""
    message = failure.outcome.message
    return "InductorError" in message or "SplitSize" in message


DEFECTS = (
    Defect(
        implementation="PyTorch FlexAttention (compiled, dynamic shapes)",
        title="torch.compile(flex_attention, dynamic=True) on the CPU fails to build (or run) "
        "its kernel for mods that read captured tensors, where dynamic=False and the eager "
        "path compute the attention",
        matches=_inductor_fails,
        reproducer="torch_flex_compiled_dynamic_cpu.py",
        reference="create_block_mask: a mask_mod of (b, h, q_idx, kv_idx) returning a boolean; "
        "torch.compile(dynamic=True): one kernel as dynamic as possible; no limit stated on "
        "captured tensors or Q_LEN != KV_LEN",
        expected="the causal attention of 3 queries at positions 2..4 over 5 keys, as the "
        "uncompiled call and dynamic=False return it",
    ),
)
