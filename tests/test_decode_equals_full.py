"""The property of the mission: decoding chunk by chunk equals full causal attention.

Keys and values of earlier tokens are kept (here by plain concatenation; the
caches come later); queries are used once, by their own chunk. The outputs of
all chunks, concatenated, equal causal attention over the whole sequence, to
rounding. Both sides are measured against the loop oracle of the full pass.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, note
from hypothesis import strategies as st

from refattn.backends import Case
from refattn.backends.base import round_to
from refattn.testing.tolerance import max_abs_error, spec_error_bound

from refattn.tests.oracle import oracle_attention


@st.composite
def sequences(draw: st.DrawFn, max_len: int = 20) -> dict:
    """A random sequence, per-row left padding, options, and a chunk schedule."""
    kv_heads = draw(st.integers(1, 3))
    q_heads = kv_heads * draw(st.integers(1, 3))
    batch, n = draw(st.integers(1, 3)), draw(st.integers(1, max_len))
    head_dim, value_dim = draw(st.sampled_from([1, 3, 8, 16])), draw(st.sampled_from([1, 4, 8]))
    prefill = draw(st.integers(0, n))
    chunks = [prefill] if prefill else []
    while sum(chunks) < n:
        chunks.append(draw(st.integers(1, n - sum(chunks))))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    padded = draw(st.booleans())
    pad = rng.integers(0, n + 1, size=batch) if padded else np.zeros(batch, dtype=int)
    pos = np.arange(n)[None, :] - pad[:, None]
    options = {
        "window": draw(st.none() | st.integers(1, n + 1)),
        "softcap": draw(st.none() | st.floats(1.0, 30.0)),
        "alibi_slopes": 2.0 ** (-8.0 * np.arange(1, q_heads + 1) / q_heads)
        if draw(st.booleans())
        else None,
        "sink_logits": rng.standard_normal(q_heads) if draw(st.booleans()) else None,
        "scale": draw(st.none() | st.floats(0.05, 1.0)),
    }
    return {
        "q": rng.standard_normal((batch, q_heads, n, head_dim)),
        "k": rng.standard_normal((batch, kv_heads, n, head_dim)),
        "v": rng.standard_normal((batch, kv_heads, n, value_dim)),
        # Left padding: pad slots hold no key, and their queries see nothing.
        "q_pos": pos if padded else None,
        "k_pos": np.where(pos < 0, -1, pos) if padded else None,
        "options": options,
        "chunks": chunks,
    }


def _rounded(x: np.ndarray | None, dtype: str) -> np.ndarray | None:
    return None if x is None else round_to(x, dtype).astype(np.float64)


def _on(case: Case, x: np.ndarray | None) -> object:
    return None if x is None else case.backend.asarray(x, dtype=case.dtype, device=case.device)


def _attend(case: Case, q, k, v, q_pos, k_pos, options) -> tuple[np.ndarray, np.ndarray]:
    from refattn import attention

    arrays = {"q": q, "k": k, "v": v, "q_pos": q_pos, "k_pos": k_pos}
    arrays |= {n: options[n] for n in ("alibi_slopes", "sink_logits")}
    scalars = {n: options[n] for n in ("window", "softcap", "scale")}
    on = {name: _on(case, x) for name, x in arrays.items()}
    out, lse = attention(**on, **scalars, causal=True, return_lse=True)
    return case.backend.to_numpy(out), case.backend.to_numpy(lse)


def _oracle_full(seq: dict, dtype: str) -> tuple[dict, np.ndarray, np.ndarray, float, float]:
    """Rounded inputs, the oracle's full causal pass, and the spec's error bound."""
    r = {name: _rounded(seq[name], dtype) for name in ("q", "k", "v")}
    options = {
        name: _rounded(x, dtype) if isinstance(x, np.ndarray) else x
        for name, x in seq["options"].items()
    }
    arrays = {**r, "q_pos": seq["q_pos"], "k_pos": seq["k_pos"]}
    ref_out, ref_lse = oracle_attention(**arrays, **options, causal=True)
    finite = np.abs(ref_lse[np.isfinite(ref_lse)])
    bound = spec_error_bound(
        {n: x for n, x in {**arrays, **options}.items() if isinstance(x, np.ndarray)},
        dtype=dtype,
        scale=options["scale"],
        lse_scale=float(finite.max()) if finite.size else 1.0,
    )
    return {**r, "options": options}, ref_out, ref_lse, bound.out, bound.lse


@given(seq=sequences())
def test_chunked_decoding_equals_full_causal_attention(case: Case, seq: dict) -> None:
    r, ref_out, ref_lse, allowed, lse_allowed = _oracle_full(seq, case.dtype)
    q_pos, k_pos = seq["q_pos"], seq["k_pos"]
    outs, lses, end = [], [], 0
    for size in seq["chunks"]:
        start, end = end, end + size
        # Only this chunk's queries; every key and value seen so far.
        out, lse = _attend(
            case,
            r["q"][:, :, start:end],
            r["k"][:, :, :end],
            r["v"][:, :, :end],
            None if q_pos is None else q_pos[:, start:end],
            None if k_pos is None else k_pos[:, :end],
            r["options"],
        )
        outs.append(out)
        lses.append(lse)
    decoded, decoded_lse = np.concatenate(outs, axis=2), np.concatenate(lses, axis=2)
    full, full_lse = _attend(case, r["q"], r["k"], r["v"], q_pos, k_pos, r["options"])
    note(f"chunks={seq['chunks']}")
    assert max_abs_error(decoded, ref_out) <= allowed
    assert max_abs_error(decoded_lse, ref_lse) <= lse_allowed
    assert max_abs_error(full, ref_out) <= allowed
    assert max_abs_error(decoded, full) <= 2 * allowed


@given(seq=sequences(), extra=st.integers(1, 8), data=st.data())
def test_appending_tokens_never_changes_earlier_outputs(
    case: Case, seq: dict, extra: int, data: st.DataObject
) -> None:
    """Causal attention over n tokens, then over n + extra: the first n outputs stay put."""
    r, _, _, allowed, _ = _oracle_full(seq, case.dtype)
    n = r["q"].shape[2]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))

    def grown(x: np.ndarray) -> np.ndarray:
        more = _rounded(rng.standard_normal((*x.shape[:2], extra, x.shape[3])), case.dtype)
        return np.concatenate([x, more], axis=2)

    q_pos, k_pos = seq["q_pos"], seq["k_pos"]
    longer_q_pos = None if q_pos is None else np.concatenate([q_pos, q_pos[:, -1:] + 1 + np.arange(extra)], axis=1)
    longer_k_pos = None if longer_q_pos is None else np.where(longer_q_pos < 0, -1, longer_q_pos)
    short, _ = _attend(case, r["q"], r["k"], r["v"], q_pos, k_pos, r["options"])
    long, _ = _attend(
        case, grown(r["q"]), grown(r["k"]), grown(r["v"]), longer_q_pos, longer_k_pos, r["options"]
    )
    assert max_abs_error(long[:, :, :n], short) <= 2 * allowed


@given(seq=sequences())
def test_queries_of_earlier_tokens_are_never_needed(case: Case, seq: dict) -> None:
    """Poison the queries of the first tokens: the outputs of the last token do not move.

    The last token's output reads its own query and every key and value, but
    no earlier query, which is why a KV cache stores keys and values only.
    """
    r, _, _, _, _ = _oracle_full(seq, case.dtype)
    q_pos, k_pos = seq["q_pos"], seq["k_pos"]
    clean, _ = _attend(case, r["q"], r["k"], r["v"], q_pos, k_pos, r["options"])
    poisoned_q = r["q"].copy()
    poisoned_q[:, :, :-1] = np.nan
    poisoned, _ = _attend(case, poisoned_q, r["k"], r["v"], q_pos, k_pos, r["options"])
    np.testing.assert_array_equal(poisoned[:, :, -1], clean[:, :, -1])
