r"""Hugging Face transformers' KV caches as ``check_cache`` factories.

Each factory makes the transformers cache a model would make (``DynamicCache``,
``StaticCache``, ``QuantizedCache``) from a small model config, and wraps it so
that ``update(k_new, v_new, layer_idx)`` also returns the position of every
slot it returns, which ``check_cache`` needs to know what each query may see.

**The positions are read from the cache itself**, from the number of tokens
the layer says it has seen (``get_seq_length``: its ``cumulative_length``, or
the length of its keys for a ``DynamicLayer``), never from a counter of the
wrapper's own: a cache that miscounts shows as keys at the wrong positions,
and a cache that returns the wrong keys shows as wrong values. What a layer
returns is, by its documentation, either its latest ``n`` tokens in order
(``DynamicLayer``, the quantized layers, a sliding layer's window plus the
new tokens) or, for a static buffer not yet wrapped, its ``max_cache_len``
slots filled from slot 0 (``StaticLayer``, ``StaticSlidingWindowLayer``
before it is full). Both are said by one rule: slot ``j`` of ``n`` holds
position ``j + max(seen - n, 0)``, and a slot whose position would be
``seen`` or more holds nothing yet (``k_pos = -1``). That is fair: it is
the layout the cache promises, the only state read is the cache's own
count, and every token's value is still compared.

The config a factory takes is plain data, ``{"layer_types": (...),
"sliding_window": W}``, so that an :class:`Implementation`'s options are
printable; the factory builds the transformers config from it.

torch and transformers are imported inside the functions.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

from refattn.testing.adapters.libraries import require
from refattn.testing.candidate import Unavailable, Unsupported
from refattn.testing.conformance.implementations import Defect, Implementation
from refattn.testing.report import Failure

#: The layer types of a config: one full layer, or a full and a sliding one.
FULL = {"layer_types": ("full_attention",)}
WINDOW = 4
HYBRID = {"layer_types": ("full_attention", "sliding_attention"), "sliding_window": WINDOW}


class WithPositions:
    """A transformers cache whose ``update`` also returns each returned slot's position.

    Parameters
    ----------
    cache : a transformers ``Cache`` (``DynamicCache``, ``StaticCache``, ``QuantizedCache``)
    """

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    def update(self, k_new: Any, v_new: Any, layer_idx: int) -> tuple[Any, Any, Any]:
        """Append (B, Hkv, T, D) keys and values to layer ``layer_idx``: ``(k, v, k_pos)``,
        (B, Hkv, n, D), (B, Hkv, n, Dv) and (n,), -1 for a slot not yet filled."""
        k, v = self.cache.update(k_new, v_new, layer_idx)
        seen = int(self.cache.get_seq_length(layer_idx))
        return k, v, slot_positions(k.shape[2], seen, device=k.device)


def slot_positions(n: int, seen: int, *, device: Any = None) -> Any:
    """(n,) int64: the positions of ``n`` returned slots of a layer that has seen ``seen``
    tokens: the latest ``n`` in order, or a buffer filled from slot 0 (-1 past ``seen``).

    >>> import pytest; torch = pytest.importorskip("torch")
    >>> slot_positions(3, 5).tolist(), slot_positions(4, 2).tolist()
    ([2, 3, 4], [0, 1, -1, -1])
    """
    import torch

    positions = torch.arange(n, device=device) + max(seen - n, 0)
    return torch.where(positions < seen, positions, -1)


def model_config(config: Mapping[str, Any] | None) -> Any:
    """A small transformers config with the layer types (and sliding window) of ``config``."""
    import transformers

    chosen: Mapping[str, Any] = FULL if config is None else config
    types = list(chosen["layer_types"])
    return transformers.Gemma2Config(
        num_hidden_layers=len(types), layer_types=types,
        sliding_window=chosen.get("sliding_window", WINDOW), hidden_size=16,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, intermediate_size=16,
        vocab_size=10,
    )  # fmt: skip


def dynamic_cache(*, config: Mapping[str, Any] | None = None) -> WithPositions:
    """transformers' ``DynamicCache`` made from ``config`` (its sliding layers are
    ``DynamicSlidingWindowLayer``: the last ``W - 1`` tokens kept, returned with the new
    ones), or without one (``DynamicLayer`` made as layers are first updated)."""
    require("torch")
    require("transformers")
    import transformers

    made = None if config is None else model_config(config)
    return WithPositions(transformers.DynamicCache(config=made))


def static_cache(*, max_len: int, config: Mapping[str, Any] | None = None) -> WithPositions:
    """transformers' ``StaticCache`` of ``max_cache_len = max_len`` made from ``config``: its
    full layers (``StaticLayer``) return the whole buffer, its sliding layers
    (``StaticSlidingWindowLayer``) a buffer of ``W`` slots, or the window and the new
    tokens once more than ``W`` are seen."""
    require("torch")
    require("transformers")
    import transformers

    return WithPositions(transformers.StaticCache(config=model_config(config),
                                                  max_cache_len=max_len))  # fmt: skip


def fp8_quantized_cache(*, config: Mapping[str, Any] | None = None) -> WithPositions:
    """transformers' ``QuantizedCache(backend="fp8")``: ``Fp8QuantizedLayer``, float8 e4m3
    codes with one scale per layer for keys (and one for values), ``max |x| / 448`` over the
    first update and frozen after it (refattn's ``format="e4m3", scales="tensor"``); the
    first update returns its inputs as they are."""
    require("torch")
    require("transformers")
    import transformers

    return WithPositions(transformers.QuantizedCache(backend="fp8", config=model_config(config)))


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is absent
        return False


def quanto_quantized_cache(*, config: Mapping[str, Any] | None = None) -> WithPositions:
    """transformers' ``QuantizedCache(backend="quanto")``: Unavailable without optimum-quanto;
    with it, Unsupported: its group-wise int2/int4 codes (``q_group_size`` channels per
    scale and zero point, a full-precision residual of ``residual_length`` tokens) have no
    error bound in refattn's formats."""
    if not _installed("optimum.quanto"):
        raise Unavailable("optimum-quanto is not installed")
    raise Unsupported("quanto's group-wise int2/int4 codes have no refattn error bound")


def hqq_quantized_cache(*, config: Mapping[str, Any] | None = None) -> WithPositions:
    """transformers' ``QuantizedCache(backend="hqq")``: Unavailable without hqq; with it,
    Unsupported, as :func:`quanto_quantized_cache` (HQQ's 1 to 8 bit group-wise codes)."""
    if not _installed("hqq"):
        raise Unavailable("hqq is not installed")
    raise Unsupported("HQQ's group-wise 1 to 8 bit codes have no refattn error bound")


#: transformers' caches run on torch; float64 too, since they store what they are given.
_DTYPES = ("float32", "float64", "float16", "bfloat16")
#: Layers kept in a hybrid model: a full layer and a sliding one, through one cache.
_HYBRID_OPTIONS = {"window": WINDOW, "layers": ("full", "sliding"), "config": HYBRID}
_CANNOT_EXPRESS = (
    "crop, reorder_cache (beam search), batch_repeat_interleave and offloading",
    "per-row lengths: transformers' caches hold one length for the whole batch",
)

IMPLEMENTATIONS: tuple[Implementation, ...] = (
    Implementation(
        name="transformers DynamicCache",
        library="transformers",
        kind="cache",
        target=dynamic_cache,
        dtypes=_DTYPES,
        requires=("torch", "transformers"),
        backend="torch",
        cannot_express=_CANNOT_EXPRESS,
    ),
    Implementation(
        name="transformers DynamicCache (full + DynamicSlidingWindowLayer)",
        library="transformers",
        kind="cache",
        target=dynamic_cache,
        dtypes=_DTYPES,
        requires=("torch", "transformers"),
        backend="torch",
        options=_HYBRID_OPTIONS,
        cannot_express=_CANNOT_EXPRESS,
    ),
    Implementation(
        name="transformers StaticCache",
        library="transformers",
        kind="cache",
        target=static_cache,
        dtypes=_DTYPES,
        requires=("torch", "transformers"),
        backend="torch",
        options={"config": FULL},
        cannot_express=_CANNOT_EXPRESS,
    ),
    # StaticSlidingWindowLayer returns the caller's own tensors for a prefill longer than
    # its window ("Fast prefill path"): a model never reuses them, so that is allowed.
    Implementation(
        name="transformers StaticCache (full + StaticSlidingWindowLayer)",
        library="transformers",
        kind="cache",
        target=static_cache,
        dtypes=_DTYPES,
        requires=("torch", "transformers"),
        backend="torch",
        options={**_HYBRID_OPTIONS, "may_alias": True},
        cannot_express=_CANNOT_EXPRESS,
    ),
    # The first update returns its inputs as they are, the same allowance.
    Implementation(
        name="transformers QuantizedCache (fp8)",
        library="transformers",
        kind="cache",
        target=fp8_quantized_cache,
        dtypes=_DTYPES,
        requires=("torch", "transformers"),
        backend="torch",
        options={"format": "e4m3", "scales": "tensor", "config": FULL, "may_alias": True},
        cannot_express=_CANNOT_EXPRESS,
    ),
    Implementation(
        name="transformers QuantizedCache (quanto)",
        library="transformers",
        kind="cache",
        target=quanto_quantized_cache,
        dtypes=("float32",),
        backend="torch",
        options={"config": FULL},
        cannot_express=("group-wise int2/int4 codes",),
    ),
    Implementation(
        name="transformers QuantizedCache (hqq)",
        library="transformers",
        kind="cache",
        target=hqq_quantized_cache,
        dtypes=("float32",),
        backend="torch",
        options={"config": FULL},
        cannot_express=("group-wise 1 to 8 bit codes",),
    ),
)


def _clipped_after_first_update(failure: Failure) -> bool:
    """Wrong values from the fp8 cache on a history with more than one update: a later
    token larger than the first update's was saturated."""
    spec = failure.outcome.spec
    steps = getattr(spec, "steps", ())
    return failure.symptom.startswith("wrong out") and len(steps) > 1


DEFECTS: tuple[Defect, ...] = (
    Defect(
        implementation="transformers QuantizedCache (fp8)",
        title="Fp8QuantizedLayer saturates every later key or value larger than the first "
        "update's, to the first update's maximum",
        matches=_clipped_after_first_update,
        reproducer="transformers_fp8_cache_clips.py",
        reference="transformers/cache_utils.py, Fp8QuantizedLayer: 'The per-tensor scale is "
        "frozen after the first `update`, so new states are appended as-is'; _quantize "
        "divides by that scale and casts to float8_e4m3fn, which saturates at 448",
        expected="e4m3 codes hold each value within 2^-4 of itself: a second key of 4.0 after "
        "a first of 1.0 reads back within 0.25 of 4.0, not as 1.0",
    ),
)
