"""The backend adapters: availability, narrowing, dtypes, conversion and devices."""

from __future__ import annotations

import importlib.util

import array_api_compat
import numpy as np
import pytest

import refattn
from refattn import attention
from refattn.backends import BACKENDS, Case, cases, get, selected
from refattn.backends.base import round_to


def test_refattn_backends_narrows_the_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFATTN_BACKENDS", "numpy, torch")
    assert [b.name for b in selected()] == ["numpy", "torch"]
    assert {c.backend.name for c in cases()} <= {"numpy", "torch"}
    monkeypatch.setenv("REFATTN_BACKENDS", "numpy,tensorflow")
    with pytest.raises(ValueError, match=r"backend must be one of .*; got 'tensorflow'"):
        selected()


def test_unselected_and_missing_backends_become_skipped_ids(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    plugins = request.config.pluginmanager.get_plugins()
    _case_params = next(p for p in plugins if hasattr(p, "_case_params"))._case_params
    monkeypatch.setenv("REFATTN_BACKENDS", "numpy")
    params = _case_params()
    ids = [p.id for p in params]
    assert "numpy-cpu-float32" in ids
    skipped = {p.id for p in params if p.marks}
    assert skipped == set(BACKENDS) - {"numpy"}


def test_cupy_without_a_gpu_is_unavailable_with_a_reason() -> None:
    cupy = get("cupy")
    if cupy.available():
        pytest.skip("a GPU is usable here")
    reason = cupy.unavailable_reason() or ""
    if importlib.util.find_spec("cupy") is None:
        assert reason == "cupy is not installed"
    else:  # installed: imports without a GPU, and must not be trusted for that
        assert "no CUDA device is usable" in reason or "cannot reach a GPU" in reason, reason
    assert "cupy" not in {c.backend.name for c in cases()}
    assert "cupy" not in {c.backend.name for c in cases(["numpy", "cupy"])}


def test_every_backend_receives_identically_rounded_inputs(case: Case) -> None:
    x = np.random.default_rng(1).standard_normal((3, 5)) * 100
    back = case.backend.to_numpy(case.backend.asarray(x, dtype=case.dtype, device=case.device))
    expected = round_to(x, case.dtype).astype(np.float64)
    np.testing.assert_array_equal(back.astype(np.float64), expected)
    ints = np.arange(4)
    back_ints = case.backend.to_numpy(
        case.backend.asarray(ints, dtype=case.dtype, device=case.device)
    )
    np.testing.assert_array_equal(back_ints, ints)


def test_output_keeps_dtype_and_device_and_lse_is_in_the_compute_dtype(case: Case) -> None:
    rng = np.random.default_rng(2)
    q, k, v = (
        case.backend.asarray(rng.standard_normal(s), dtype=case.dtype, device=case.device)
        for s in ((2, 4, 3, 8), (2, 2, 5, 8), (2, 2, 5, 6))
    )
    out, lse = attention(q, k, v, causal=True, return_lse=True)
    assert out.dtype == q.dtype
    xp = array_api_compat.array_namespace(q)
    low = case.dtype in ("float16", "bfloat16")
    assert lse.dtype == (xp.float32 if low else q.dtype)
    assert array_api_compat.device(out) == array_api_compat.device(q)
    assert array_api_compat.device(lse) == array_api_compat.device(q)
    case.backend.synchronize(case.device)


def test_low_precision_is_computed_in_float32_then_rounded(case: Case) -> None:
    """attention(x16) is exactly attention(float32(x16)) rounded back to 16 bits."""
    if case.dtype not in ("float16", "bfloat16"):
        pytest.skip("only float16 and bfloat16 are upcast")
    rng = np.random.default_rng(3)
    shapes = ((1, 2, 4, 8), (1, 1, 6, 8), (1, 1, 6, 8))
    low = [
        case.backend.asarray(rng.standard_normal(s), dtype=case.dtype, device=case.device)
        for s in shapes
    ]
    xp = array_api_compat.array_namespace(low[0])
    wide = [xp.astype(x, xp.float32) for x in low]
    direct = attention(*low, causal=True)
    upcast = xp.astype(attention(*wide, causal=True), low[0].dtype)
    np.testing.assert_array_equal(case.backend.to_numpy(direct), case.backend.to_numpy(upcast))


def test_the_opt_in_jax_backend_runs_the_spec_and_a_cache_on_immutable_arrays() -> None:
    """JAX's arrays cannot be written in place: a StaticCache on them writes through
    array-api-extra, and decoding through it gives NumPy's answer (to float32 rounding)."""
    pytest.importorskip("jax")
    jax = get("jax")
    assert "jax" not in {b.name for b in selected([])}  # opt-in: not in the default matrix
    assert jax in selected([], opt_in=True)  # refattn verify's default
    assert jax in selected(["jax"])
    xp = jax.namespace()
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 6, 8)) for _ in range(3))
    on = {
        n: jax.asarray(x, dtype="float32", device="cpu")
        for n, x in zip("qkv", (q, k, v), strict=True)
    }
    full = refattn.attention(on["q"], on["k"], on["v"], causal=True)
    expected = refattn.attention(q.astype(np.float32), k.astype(np.float32),
                                 v.astype(np.float32), causal=True)  # fmt: skip
    np.testing.assert_allclose(jax.to_numpy(full), expected, rtol=1e-5, atol=1e-6)
    cache = refattn.StaticCache(batch=1, kv_heads=2, head_dim=8, max_len=6, xp=xp,
                                dtype=xp.float32)  # fmt: skip
    outs = []
    for t in range(6):
        k_all, v_all, k_pos = cache.update(on["k"][:, :, t : t + 1], on["v"][:, :, t : t + 1])
        q_pos = xp.asarray([[t]], dtype=k_pos.dtype)
        outs.append(refattn.attention(on["q"][:, :, t : t + 1], k_all, v_all, causal=True,
                                      q_pos=q_pos, k_pos=k_pos))  # fmt: skip
    decoded = np.concatenate([jax.to_numpy(o) for o in outs], axis=2)
    np.testing.assert_allclose(decoded, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("poison", ["nan key no query sees", "inf value no query sees", "none"])
def test_jitted_attention_takes_the_general_path_and_gives_the_eager_answer(poison: str) -> None:
    """Under ``jax.jit`` the spec cannot look at values, so :func:`refattn.namespace.surely`
    says False and the guarded path runs: a NaN key or inf value in a slot no query sees
    must stay out of the output exactly as it does eagerly on NumPy."""
    pytest.importorskip("jax")
    jax = get("jax")
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 4, 5, 8)).astype(np.float32) for _ in range(3))
    k = np.concatenate([k, np.zeros((2, 4, 1, 8), np.float32)], axis=2)  # a slot after all
    v = np.concatenate([v, np.zeros((2, 4, 1, 8), np.float32)], axis=2)
    if poison == "nan key no query sees":
        k[:, :, -1] = np.nan
    elif poison == "inf value no query sees":
        v[:, :, -1] = np.inf
    options = {"causal": True, "q_pos": np.arange(5), "k_pos": np.arange(6), "return_lse": True}
    expected_out, expected_lse = refattn.attention(q, k, v, **options)
    run = jax.compiled(refattn.attention, causal=True, return_lse=True)
    assert run is jax.compiled(refattn.attention, causal=True, return_lse=True)  # one jit
    arrays = {"q": q, "k": k, "v": v, "q_pos": np.arange(5), "k_pos": np.arange(6)}
    on = {n: jax.asarray(x, dtype="float32", device="cpu") for n, x in arrays.items()}
    out, lse = run(**on)
    assert np.isfinite(jax.to_numpy(out)).all()
    np.testing.assert_allclose(jax.to_numpy(out), expected_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.to_numpy(lse), expected_lse, rtol=1e-5, atol=1e-6)
