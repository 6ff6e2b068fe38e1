"""Whole decoders: generation with a cache equals generation without, for every cache kind.

The oracle for logits is the same model in float64 without a cache, run once
over the final tokens (teacher forcing). The float32 run with a cache must
meet the cross-implementation rule (refattn.testing.tolerance) against it,
with the float32 run without a cache as ``spec_t``:
``|cached - oracle| <= k |uncached - oracle| + atol max(1, |logits|)``.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refattn.backends import BACKENDS, Case, selected
from refattn.backends.base import round_to
from refattn.models import GPT, GPTConfig, LayerCaches, Llama, LlamaConfig
from refattn.models.decoder import Decoder
from refattn.testing import TOLERANCES

KINDS_EXACT = ("static", "dynamic", "sliding", "paged")


def _random_model(family: str, seed: int, dtype: Any = np.float32) -> Decoder:
    if family == "gpt":
        config = GPTConfig(vocab_size=23, n_positions=64, d_model=16, n_layer=2, n_head=2)
        model: Decoder = GPT.random(config, seed=seed, dtype=dtype)
    else:
        window = 3 if family == "mistral" else None
        config_l = LlamaConfig(vocab_size=23, d_model=16, n_layer=2, n_head=4, n_kv_head=2,
                               intermediate_size=24, window=window)  # fmt: skip
        model = Llama.random(config_l, seed=seed, dtype=dtype)
    # Larger weights than the initialisation, so that the logits are not all near 0.
    model.params = {n: (x * 8 if x.ndim > 1 else x) for n, x in model.params.items()}
    return model


def _as(model: Decoder, dtype: Any) -> Decoder:
    twin = type(model).__new__(type(model))
    twin.__dict__.update(model.__dict__)
    twin.params = {n: x.astype(dtype) for n, x in model.params.items()}
    return twin


def _teacher_forced(model: Decoder, tokens: list[list[int]], prompt_lengths: list[int]) -> list:
    """Per generated step, (B, V) float64 logits of ``model`` without a cache."""
    width = max(len(t) for t in tokens)
    padded = [t + [0] * (width - len(t)) for t in tokens]
    logits = np.asarray(model(padded, n_new=[len(t) for t in tokens]), dtype=np.float64)
    steps = len(tokens[0]) - prompt_lengths[0]
    return [
        np.stack([logits[b, n + s - 1] for b, n in enumerate(prompt_lengths)]) for s in range(steps)
    ]


prompts = st.lists(st.lists(st.integers(0, 22), min_size=1, max_size=7), min_size=1, max_size=3)


@pytest.mark.parametrize("kind", KINDS_EXACT)
@pytest.mark.parametrize("family", ["gpt", "llama", "mistral"])
@given(ids=prompts, new=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_greedy_generation_with_a_cache_equals_generation_without(
    family: str, kind: str, ids: list[list[int]], new: int, seed: int
) -> None:
    model = _random_model(family, seed)
    cached, cached_logits = model.generate(ids, new, cache=kind, return_logits=True)
    plain, plain_logits = model.generate(ids, new, use_cache=False, return_logits=True)
    assert cached == plain
    oracle = _teacher_forced(_as(model, np.float64), cached, [len(p) for p in ids])
    rule = TOLERANCES["float32"]
    for step, (c, p, o) in enumerate(zip(cached_logits, plain_logits, oracle, strict=True)):
        allowed = rule.allowed(float(np.abs(p - o).max()), float(np.abs(o).max()))
        assert np.abs(c - o).max() <= allowed, (step, np.abs(c - o).max(), allowed)


def quantized_logit_bound(logits: np.ndarray, bits: int) -> float:
    """The stated bound for a quantized cache: 16 half-steps of the largest logit.

    Every cached key and value is off by at most half a quantization step of
    its own row, ``max|x| / (2 q_max)``. Through two layers of attention, MLP
    and norms, the logits of these small models moved by at most 5.9 such
    half-steps of their own size over 180 random histories; 16 leaves room
    for what Hypothesis finds.
    """
    q_max = 2 ** (bits - 1) - 1
    return 16 * float(np.abs(logits).max()) / (2 * q_max)


@pytest.mark.parametrize("family", ["gpt", "llama", "mistral"])
@given(ids=prompts, new=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_quantized_cache_logits_stay_within_their_bound(
    family: str, ids: list[list[int]], new: int, seed: int
) -> None:
    model = _random_model(family, seed)
    tokens, logits = model.generate(ids, new, cache="quantized", return_logits=True)
    oracle = _teacher_forced(_as(model, np.float64), tokens, [len(p) for p in ids])
    for step, (got, want) in enumerate(zip(logits, oracle, strict=True)):
        bound = quantized_logit_bound(want, bits=8)
        assert np.abs(got - want).max() <= bound, (step, np.abs(got - want).max(), bound)
        # Greedy picks the oracle's token wherever its margin exceeds twice the bound.
        top2 = np.sort(want, axis=-1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 2 * bound
        chosen = np.array([t[len(p) + step] for t, p in zip(tokens, ids, strict=True)])
        assert (chosen[clear] == want.argmax(axis=-1)[clear]).all()


def test_sampling_is_seeded_and_top_k_keeps_to_the_k_best() -> None:
    model = _random_model("llama", 0)
    a = model.generate([[1, 2], [3]], 12, temperature=1.0, seed=7)
    b = model.generate([[1, 2], [3]], 12, temperature=1.0, seed=7, use_cache=False)
    assert a == b
    assert a != model.generate([[1, 2], [3]], 12, temperature=1.0, seed=8)
    tokens, logits = model.generate([[5]], 10, temperature=2.0, top_k=2, seed=1,
                                    return_logits=True)  # fmt: skip
    for step, step_logits in enumerate(logits):
        best_two = np.argsort(step_logits[0])[-2:]
        assert tokens[0][1 + step] in best_two


@pytest.mark.parametrize("kind", ["dynamic", "static", "paged"])
def test_legacy_layout_round_trips(kind: str) -> None:
    model = _random_model("llama", 3)
    caches = model.new_caches(kind, batch=2, max_len=12)
    model([[1, 2, 3, 4], [5, 6, 7, 8]], caches)
    past = caches.to_legacy()
    assert len(past) == 2 and past[0][0].shape == (2, 2, 4, 4)
    again = LayerCaches.from_legacy(past, kind=kind, max_len=12)
    step_a = model([[9], [10]], caches)
    step_b = model([[9], [10]], again)
    np.testing.assert_array_equal(step_a, step_b)


def test_bad_generation_arguments_are_named() -> None:
    model = _random_model("gpt", 0)
    with pytest.raises(ValueError, match="cache must be one of"):
        model.generate([[1]], 2, cache="ring")
    with pytest.raises(ValueError, match="at least one token"):
        model.generate([[1], []], 2)
    with pytest.raises(ValueError, match="temperature"):
        model.generate([[1]], 2, temperature=-1.0)


def test_importing_models_imports_no_framework() -> None:
    code = "import refattn.models, sys; print('torch' in sys.modules)"
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    assert printed.strip() == "False"


#: Where the models also run, and which family: GPT on JAX in float32, Mistral (GQA,
#: RoPE, a window) on JAX in bfloat16. JAX's arrays are immutable (every write a new
#: array) and each new shape compiles there, so these cases take fixed prompts; the
#: property over drawn prompts is the NumPy test above.
MODEL_CASES = [("gpt", "jax", "cpu", "float32"), ("mistral", "jax", "cpu", "bfloat16")]


def _model_case_params() -> list[Any]:
    chosen = {b.name for b in selected()}
    params = []
    for family, name, device, dtype in MODEL_CASES:
        backend = BACKENDS[name]
        reason = "not in REFATTN_BACKENDS" if name not in chosen else backend.unavailable_reason()
        case = Case(backend, device, dtype)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(family, case, id=f"{family}-{case.id}", marks=marks))
    return params


@pytest.mark.parametrize(("family", "model_case"), _model_case_params())
def test_a_model_on_another_backend_decodes_through_every_cache_as_without_one(
    family: str, model_case: Case
) -> None:
    """Every cache kind's logits on the case's backend against the float64 model's on the
    same tokens, by the dtype's rule with the backend's own uncached logits as ``spec_t``
    (for int8, its bound on top)."""
    backend, dtype = model_case.backend, model_case.dtype
    model = _random_model(family, seed=11)
    model.params = {n: round_to(x, dtype) for n, x in model.params.items()}  # what it holds
    params = {n: backend.asarray(x, dtype=dtype, device=model_case.device)
              for n, x in model.params.items()}  # fmt: skip
    config = model.config  # type: ignore[attr-defined]
    on: Decoder = GPT(config, params) if family == "gpt" else Llama(config, params)
    assert on.xp is not model.xp  # the model found its namespace from its arrays
    ids = [[3, 1, 4, 1, 5], [9, 2]]
    rule = TOLERANCES[dtype]
    for kind in (*KINDS_EXACT, "quantized"):
        tokens, logits = on.generate(ids, 4, cache=kind, return_logits=True)
        lengths = [len(p) for p in ids]
        oracle = _teacher_forced(_as(model, np.float64), tokens, lengths)
        plain = _teacher_forced(on, tokens, lengths)
        for step, (c, p, o) in enumerate(zip(logits, plain, oracle, strict=True)):
            allowed = rule.allowed(float(np.abs(p - o).max()), float(np.abs(o).max()))
            if kind == "quantized":
                allowed += quantized_logit_bound(o, bits=8)
            assert np.abs(c - o).max() <= allowed, (kind, step, np.abs(c - o).max(), allowed)
