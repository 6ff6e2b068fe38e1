"""The layouts of refattn.testing.layouts hold exactly the problem, as the peers expect it.

Each layout is made from drawn problems on NumPy and (where it is installed)
PyTorch, read back, and compared with the problem: packed rows, pages,
left-padded rows and an in-op split lose nothing and invent nothing, and
what a peer reads from them (``cu_seqlens``, a block table, an attention
mask and ``position_ids``) says what the peer's documentation says it does.
The kernels of ``known_bugs.layouts`` close the loop: the correct ones pass
``check_attention`` and each wrong one is caught.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import refattn
from refattn.backends import to_numpy
from refattn.testing import ProblemSpec, check_attention, make_problem
from refattn.testing.known_bugs import layouts as kernels
from refattn.testing.known_bugs.attention import EVERY_OPTION
from refattn.testing.layouts import (
    append_new,
    bottom_right_lengths,
    from_left_padded,
    heads_first,
    in_op_cache,
    left_pad,
    left_padded_mask,
    pack_varlen,
    page_kv,
    read_pages,
    sequence_first,
    unpack_keys,
    unpack_varlen,
    unpage,
)
from refattn.testing.strategies import attention_specs

BACKENDS = pytest.mark.parametrize(
    "backend",
    [
        "numpy",
        pytest.param(
            "torch",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("torch") is None, reason="torch is not installed"
            ),
        ),
    ],
)
#: Every feature a candidate may be handed, for the layouts: whatever the problem holds.
EVERYTHING = EVERY_OPTION
#: Problems whose rows are numbered from 0 with the queries at the end, mostly.
NUMBERED = frozenset({"causal", "gqa", "ragged", "window", "alibi", "softcap", "lse"})
FEW = settings(max_examples=25)


def _np(x: Any) -> np.ndarray:
    return np.asarray(to_numpy(x))


def _held(problem: Any) -> np.ndarray:
    return _np(problem.k_pos) >= 0  # (B, Sk)


def test_sequence_first_and_heads_first_are_inverse_transposes() -> None:
    x = np.arange(2 * 3 * 5 * 4).reshape(2, 3, 5, 4)
    assert sequence_first(x).shape == (2, 5, 3, 4)
    assert np.array_equal(sequence_first(x)[1, 4, 2], x[1, 2, 4])
    assert np.array_equal(heads_first(sequence_first(x)), x)
    with pytest.raises(ValueError, match=r"x must have 4 dims.*got shape \(2, 3\)"):
        sequence_first(np.zeros((2, 3)))


@BACKENDS
@FEW
@given(spec=attention_specs(EVERYTHING), data=st.data())
def test_packed_rows_hold_every_held_key_and_chosen_query_and_unpack_to_the_problem(
    backend: str, spec: ProblemSpec, data: st.DataObject
) -> None:
    p = make_problem(spec, backend=backend)
    B, Sq = spec.batch, spec.q_len
    chosen = np.array(data.draw(st.lists(st.booleans(), min_size=B * Sq, max_size=B * Sq)),
                      dtype=bool).reshape(B, Sq)  # fmt: skip
    packed = pack_varlen(p, queries=chosen)
    held = _held(p)
    cu_q, cu_k = _np(packed.cu_seqlens_q), _np(packed.cu_seqlens_k)
    assert cu_q.dtype == np.int32 and cu_k.dtype == np.int32
    assert cu_q.tolist() == [0, *np.cumsum(chosen.sum(axis=1)).tolist()]
    assert cu_k.tolist() == [0, *np.cumsum(held.sum(axis=1)).tolist()]
    assert packed.max_seqlen_q == int(chosen.sum(axis=1).max())
    assert packed.max_seqlen_k == int(held.sum(axis=1).max(initial=0))
    assert packed.total_q == cu_q[-1] and packed.total_k == cu_k[-1]
    k_pos, k_packed = _np(packed.k_pos), _np(packed.k)
    for b in range(B):  # sequence b: the row's held slots, in slot order, with positions
        row = slice(cu_k[b], cu_k[b + 1])
        assert k_pos[row].tolist() == _np(p.k_pos)[b][held[b]].tolist()
        want = np.swapaxes(_np(p.k)[b][:, held[b]], 0, 1)  # (L, Hkv, D)
        assert np.array_equal(k_packed[row], want)
    assert np.array_equal(_np(packed.dont_care), ~chosen)
    out, lse = unpack_varlen(packed, packed.q, packed.q[:, :, 0].T)  # q as an "output"
    kept = chosen[:, None, :, None]
    assert np.array_equal(_np(out), np.where(kept, _np(p.q), 0))
    lse_want = np.where(chosen[:, None, :], _np(p.q)[..., 0], -np.inf)  # (B, Hq, Sq)
    assert np.array_equal(_np(lse), lse_want)
    k, v, positions = unpack_keys(packed)
    assert np.array_equal(_np(positions), _np(p.k_pos))
    for got, want in ((k, p.k), (v, p.v)):
        assert np.array_equal(np.where(held[:, None, :, None], _np(got), 0),
                              np.where(held[:, None, :, None], _np(want), 0))  # fmt: skip


@BACKENDS
@FEW
@given(spec=attention_specs(EVERYTHING), page_size=st.sampled_from([None, 1, 3, 16]))
def test_pages_hold_exactly_each_row_s_keys_and_read_in_table_order_give_them_back(
    backend: str, spec: ProblemSpec, page_size: int | None
) -> None:
    p = make_problem(spec, backend=backend)
    paged = page_kv(p, page_size=page_size)
    held = _held(p)
    lengths = held.sum(axis=1)
    P = paged.page_size
    table, seqlens = _np(paged.block_table), _np(paged.cache_seqlens)
    assert table.dtype == np.int32 and seqlens.dtype == np.int32
    assert seqlens.tolist() == lengths.tolist()
    assert paged.blocks_per_row * P >= lengths.max(initial=0)
    assert sorted(set(table.ravel().tolist())) == sorted(table.ravel().tolist())  # no sharing
    assert table.max(initial=-1) < paged.num_blocks
    k_read, v_read = (_np(x) for x in read_pages(paged))
    pages_k = _np(paged.k_cache)
    for b in range(spec.batch):
        L = int(lengths[b])
        assert np.array_equal(k_read[b, :, :L], _np(p.k)[b][:, held[b]])
        assert np.array_equal(v_read[b, :, :L], _np(p.v)[b][:, held[b]])
        assert np.isnan(k_read[b, :, L:]).all()  # the rest of the row's pages: fill
        assert _np(paged.k_pos)[b, :L].tolist() == _np(p.k_pos)[b][held[b]].tolist()
    unused = np.setdiff1d(np.arange(paged.num_blocks), table.ravel())
    assert np.isnan(pages_k[unused]).all()  # spare blocks no row names
    k, v, positions = unpage(paged)
    assert np.array_equal(_np(positions), _np(p.k_pos))
    mask = held[:, None, :, None]
    assert np.array_equal(np.where(mask, _np(k), 0), np.where(mask, _np(p.k), 0))
    assert np.array_equal(np.where(mask, _np(v), 0), np.where(mask, _np(p.v), 0))


def test_the_block_order_is_random_and_drawn_from_the_seed() -> None:
    p = make_problem(ProblemSpec(batch=3, q_len=1, k_len=40, seed=5))
    tables = [_np(page_kv(p, page_size=4, seed=s).block_table).ravel() for s in (0, 0, 1)]
    assert np.array_equal(tables[0], tables[1]) and not np.array_equal(tables[0], tables[2])
    assert tables[0].tolist() != sorted(tables[0].tolist())


@BACKENDS
@FEW
@given(spec=attention_specs(NUMBERED))
def test_left_padding_builds_transformers_mask_and_positions_and_keeps_the_attention(
    backend: str, spec: ProblemSpec
) -> None:
    p = make_problem(spec, backend=backend, dtype="float64")
    lengths = bottom_right_lengths(p, leading=False)
    padded = left_pad(p)
    mask, positions = _np(padded.attention_mask), _np(padded.position_ids)
    S = mask.shape[1]
    assert S == max(int(lengths.max(initial=0)), spec.q_len)
    assert mask.sum(axis=1).tolist() == lengths.tolist()
    assert (mask[:, ::-1].cumprod(axis=1).sum(axis=1) == lengths).all()  # tokens on the right
    assert np.array_equal(positions, np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1))
    assert _np(padded.cache_position).tolist() == list(range(S - spec.q_len, S))
    assert np.array_equal(_np(padded.dont_care), _np(p.q_pos) < 0)
    k, v, k_pos, q_pos = from_left_padded(padded)
    rows = ~_np(padded.dont_care)[:, None, :, None]
    plain = {**p.options(), "return_lse": False}
    got = _np(refattn.attention(p.q, k, v, **{**plain, "k_pos": k_pos, "q_pos": q_pos}))
    want = _np(refattn.attention(p.q, p.k, p.v, **plain))
    np.testing.assert_allclose(np.where(rows, got, 0), np.where(rows, want, 0), atol=1e-12)
    causal = _np(left_padded_mask(padded, causal=True))  # (B, 1, Sq, S)
    slots = np.arange(S)[None, None, None, :]
    cache_position = _np(padded.cache_position)[None, None, :, None]
    assert np.array_equal(causal, (mask[:, None, None, :] == 1) & (slots <= cache_position))


def test_left_padding_refuses_rows_it_cannot_number() -> None:
    p = make_problem(ProblemSpec(q_len=2, k_len=5, layout="top_left"))
    with pytest.raises(ValueError, match=r"row 0's queries must sit at the end of its 5 keys"):
        left_pad(p)
    holes = make_problem(ProblemSpec(batch=2, q_len=1, k_len=6, layout="holes", seed=2))
    with pytest.raises(ValueError, match=r"keys must be positions 0\.\.\d+ in slot order"):
        left_pad(holes)


@BACKENDS
@FEW
@given(spec=attention_specs(EVERYTHING | {"in_op_cache"}))
def test_an_in_op_split_appended_is_the_problem_s_cache(backend: str, spec: ProblemSpec) -> None:
    p = make_problem(spec, backend=backend)
    split = in_op_cache(p)
    held = _held(p)
    n = p.new_keys
    assert split.new_slots.shape == (spec.batch, n)
    past_pos = _np(split.past_pos)
    for b in range(spec.batch):
        slots = np.flatnonzero(held[b])
        assert split.new_slots[b].tolist() == slots[len(slots) - n :].tolist()
        assert (past_pos[b, split.new_slots[b]] == -1).all()
        assert np.isnan(_np(split.k_past)[b][:, split.new_slots[b]]).all()
    assert _np(split.past_lengths).tolist() == (held.sum(axis=1) - n).tolist()
    k, v, k_pos = append_new(split)
    assert np.array_equal(_np(k_pos), _np(p.k_pos))
    mask = held[:, None, :, None]
    assert np.array_equal(np.where(mask, _np(k), 0), np.where(mask, _np(p.k), 0))
    assert np.array_equal(np.where(mask, _np(v), 0), np.where(mask, _np(p.v), 0))


def test_layout_functions_name_the_argument_they_refuse() -> None:
    p = make_problem(ProblemSpec(batch=2, q_len=3, k_len=4))
    with pytest.raises(ValueError, match=r"queries must be booleans of shape \(2, 3\)"):
        pack_varlen(p, queries=np.ones((2, 2), dtype=bool))
    with pytest.raises(ValueError, match="page_size must be a positive integer; got 0"):
        page_kv(p, page_size=0)
    with pytest.raises(ValueError, match="spare_blocks must be at least 0; got -1"):
        page_kv(p, spare_blocks=-1)
    with pytest.raises(
        ValueError, match=r"n \(the new tokens per row\) must be from 0 to .* 4; got 5"
    ):
        in_op_cache(p, 5)
    packed = pack_varlen(p)
    with pytest.raises(ValueError, match=r"out must be \(total_q=6, H, Dv\)"):
        unpack_varlen(packed, packed.q[:2])
    with pytest.raises(ValueError, match=r"lse must be \(Hq=1, total_q=6\)"):
        unpack_varlen(packed, packed.q, packed.q[:, :, 0])


def test_bottom_right_lengths_are_cache_seqlens_for_ragged_rows() -> None:
    p = make_problem(ProblemSpec(batch=3, q_len=2, k_len=6, layout="ragged", seed=7))
    lengths = bottom_right_lengths(p)
    assert lengths.tolist() == (_np(p.k_pos) >= 0).sum(axis=1).tolist()
    assert (_np(p.q_pos)[:, -1] == lengths - 1).all()


@pytest.mark.parametrize("name", sorted(kernels.WRONG))
def test_each_wrong_layout_kernel_is_caught(name: str) -> None:
    fn, dtypes = kernels.WRONG[name]
    for seed in range(3):
        report = check_attention(fn, dtypes=dtypes, features=kernels.FEATURES[name], seed=seed,
                                 max_examples=50, max_failures=1)  # fmt: skip
        assert not report.passed, f"seed {seed}: {report}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(kernels.CORRECT))
def test_each_correct_layout_kernel_passes(name: str, dtype: str) -> None:
    report = check_attention(kernels.CORRECT[name], dtypes=[dtype], features=EVERY_OPTION,
                             seed=0, max_examples=40)  # fmt: skip
    assert report.passed, str(report)
    if name != "left_padded_textbook":  # left padding has only rows numbered from 0
        assert report.supported(dtype) == report.tried(dtype), str(report)


def test_a_query_on_a_pad_is_left_out_as_dont_care() -> None:
    spec = ProblemSpec(batch=2, q_len=2, k_len=4, layout="ragged", seed=2)  # row 0: 1 key
    p = make_problem(spec)
    result = kernels.left_padded_textbook(p)
    assert _np(result.dont_care).tolist() == [[True, False], [False, False]]
    assert math.isfinite(float(_np(result.out)[1].sum()))
