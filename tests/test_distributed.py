"""Context-parallel attention on real process groups of 2 and 4 ranks (gloo, loopback).

Each strategy of ``refattn.distributed``, for any shapes and options Hypothesis
draws and any sharding of the queries and keys over the ranks, gives the
single-process spec's answer by the tolerance rule; the sharded-cache decode
gives every rank the same bits; a rank that fails mid-ring ends every rank with
an error naming it; and the ring's traffic is (P - 1)/P of the K/V bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("torch")
import torch.distributed

if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import refattn.distributed as cp
from refattn.backends import Case
from refattn.testing.context_parallel import (
    CONTEXT_PARALLEL_FEATURES,
    LocalGroup,
    check_context_parallel,
)
from refattn.testing.known_bugs.context_parallel import CORRECT as CORRECT_CP
from refattn.testing.known_bugs.context_parallel import WRONG as WRONG_CP
from refattn.testing.oracle import oracle_attention
from refattn.testing.problems import ProblemSpec, build_problem
from refattn.testing.selfcheck.agreement import measure
from refattn.testing.strategies import attention_specs

#: What a sharded problem may carry: every option of the spec but the global-axis ones, and
#: rows of at most 40 keys (the loop oracle's pace).
FEATURES = (CONTEXT_PARALLEL_FEATURES - {"long", "unseen_nan"}) | {"seen_nan"}
STRATEGIES = {
    "ring": cp.ring_attention,
    "all_gather": cp.all_gather_attention,
    "over_shards": cp.attention_over_shards,
}


@pytest.fixture(scope="module")
def groups() -> Any:
    with LocalGroup(2, timeout=60) as two, LocalGroup(4, timeout=60) as four:
        yield {2: two, 4: four}


def _skip_unless_transportable(case: Case) -> None:
    if case.backend.name not in ("numpy", "torch") or case.device != "cpu":
        pytest.skip("refattn.distributed takes NumPy arrays and torch CPU tensors on gloo")
    if case.backend.name == "numpy" and case.dtype == "bfloat16":
        pytest.skip("torch cannot hold NumPy's bfloat16 (ml_dtypes)")


# -- the tasks each rank runs (module level, so the ranks can import them) -------------


def run_strategy(payload: Any, rank: int, world_size: int) -> tuple[Any, ...]:
    """Rank ``rank``'s share of a problem through one strategy: (q_index, out, lse)."""
    name, arrays, scalars, q_owner, k_owner = payload
    q_index = np.flatnonzero(q_owner == rank)
    k_index = np.flatnonzero(k_owner == rank)
    if name == "over_shards":  # every rank holds every query
        q_index = np.arange(len(q_owner))
    shard = {
        **{n: x for n, x in arrays.items() if n not in ("q", "k", "v", "q_pos", "k_pos")},
        "q": arrays["q"][:, :, q_index], "k": arrays["k"][:, :, k_index],
        "v": arrays["v"][:, :, k_index], "q_pos": arrays["q_pos"][:, q_index],
        "k_pos": arrays["k_pos"][:, k_index],
    }  # fmt: skip
    traffic = cp.Traffic()
    out, lse = STRATEGIES[name](**shard, **scalars, traffic=traffic, return_lse=True)
    return q_index, out, lse, traffic


def _through(group: LocalGroup, name: str, q_owner: np.ndarray, k_owner: np.ndarray) -> Any:
    """A form of ``attention(q, k, v, **options)`` that runs strategy ``name`` on
    ``group``, the queries and keys sharded by their owners, and gathers the answer."""

    def gathered(q: Any, k: Any, v: Any, **options: Any) -> tuple[Any, Any]:
        options.pop("return_lse")
        arrays = {n: x for n, x in options.items() if hasattr(x, "shape")}
        scalars = {n: x for n, x in options.items() if n not in arrays}
        arrays.update(q=q, k=k, v=v)
        parts = group.run(run_strategy, (name, arrays, scalars, q_owner, k_owner))
        out = _empty_like(q, (*q.shape[:3], v.shape[3]), q.dtype)
        lse = _empty_like(q, q.shape[:3], parts[0][2].dtype)
        for index, part_out, part_lse, _ in parts:
            out[:, :, index] = part_out
            lse[:, :, index] = part_lse
        if name == "over_shards":
            for _, part_out, part_lse, _ in parts[1:]:  # bit for bit the same on every rank
                assert _same_bits(part_out, parts[0][1]) and _same_bits(part_lse, parts[0][2])
        return out, lse

    return gathered


def _empty_like(like: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    if isinstance(like, np.ndarray):
        return np.zeros(shape, dtype=dtype)
    import torch

    return torch.zeros(shape, dtype=dtype)


def _same_bits(a: Any, b: Any) -> bool:
    a = a if isinstance(a, np.ndarray) else a.float().numpy()
    b = b if isinstance(b, np.ndarray) else b.float().numpy()
    return bool(np.array_equal(a, b, equal_nan=True))


def _owners(data: st.DataObject, length: int, world_size: int) -> np.ndarray:
    """Which rank holds each token: contiguous runs, zigzag, or any assignment at all."""
    layout = data.draw(st.sampled_from(["contiguous", "zigzag", "any"]), label="layout")
    if layout == "any":
        ranks = st.integers(0, world_size - 1)
        return np.array(data.draw(st.lists(ranks, min_size=length, max_size=length)), int)
    owner = np.zeros(length, dtype=int)
    for r in range(world_size):
        owner[cp.shard_indices(length, world_size, r, layout=layout)] = r
    return owner


# -- every strategy equals the spec ------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("name", sorted(STRATEGIES))
@settings(max_examples=12)
@given(spec=attention_specs(FEATURES), data=st.data())
def test_each_strategy_equals_single_process_attention_for_any_sharding(
    groups: Any, case: Case, name: str, world_size: int, spec: ProblemSpec, data: Any
) -> None:
    _skip_unless_transportable(case)
    q_owner = _owners(data, spec.q_len, world_size)
    k_owner = _owners(data, spec.k_len, world_size)
    fn = _through(groups[world_size], name, q_owner, k_owner)
    agreement = measure(build_problem(spec), case, oracle_attention, fn)
    assert agreement.passed, agreement


# -- the ring's traffic ----------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 4])
def test_the_ring_sends_each_rank_p_minus_1_over_p_of_the_kv_bytes(
    groups: Any, world_size: int
) -> None:
    rng = np.random.default_rng(0)
    S = 8 * world_size
    q, k, v = (rng.standard_normal((1, 2, S, 16)).astype(np.float32) for _ in range(3))
    positions = np.arange(S)[None]
    owner = np.repeat(np.arange(world_size), S // world_size)
    arrays = {"q": q, "k": k, "v": v, "q_pos": positions, "k_pos": positions}
    parts = groups[world_size].run(run_strategy, ("ring", arrays, {"causal": True}, owner, owner))
    kv_bytes = k.nbytes + v.nbytes + positions.nbytes  # every shard's keys, values, positions
    for _, _, _, traffic in parts:
        assert traffic.sent * world_size == (world_size - 1) * kv_bytes
        assert traffic.received == traffic.sent


# -- a failure on one rank ends every rank ------------------------------------------


def failing_ring(payload: Any, rank: int, world_size: int) -> str:
    """The ring, with rank 1 raising while it attends to its second block."""
    arrays, failing_rank, failing_step = payload
    real = cp.attend_block
    calls = []

    def attend(plan: Any, block: Any) -> Any:
        calls.append(block)
        if rank == failing_rank and len(calls) == failing_step + 1:
            raise FloatingPointError("injected on purpose")
        return real(plan, block)

    cp.attend_block = attend
    try:
        cp.ring_attention(**arrays, causal=True)
    except cp.ContextParallelError as error:
        cause = type(error.__cause__).__name__ if error.__cause__ is not None else ""
        return f"{error} | caused by {cause}"
    finally:
        cp.attend_block = real
    return "no error"


@pytest.mark.parametrize("world_size", [2, 4])
def test_an_exception_mid_ring_ends_every_rank_with_an_error_naming_it(
    groups: Any, world_size: int
) -> None:
    rng = np.random.default_rng(1)
    S = 3 * world_size
    q, k, v = (rng.standard_normal((1, 1, S, 4)) for _ in range(3))
    pos = np.arange(S)[None]
    owner = np.arange(S) % world_size
    shards = {"q": q, "k": k, "v": v, "q_pos": pos, "k_pos": pos}
    messages = groups[world_size].run(failing_ring, (shards, 1, 1))
    for rank, message in enumerate(messages):
        assert "rank 1 failed at step 1 of the ring" in message, message
        assert "FloatingPointError: injected on purpose" in message, message
        assert message.endswith("caused by FloatingPointError" if rank == 1 else "caused by ")
    # The group is whole afterwards: the next call succeeds.
    arrays = {"q": q, "k": k, "v": v, "q_pos": pos, "k_pos": pos}
    parts = groups[world_size].run(run_strategy, ("ring", arrays, {}, owner, owner))
    assert len(parts) == world_size


def mismatched_heads(payload: Any, rank: int, world_size: int) -> str:
    rng = np.random.default_rng(rank)
    D = 8 if rank == world_size - 1 else 4  # the last rank's keys are wider
    q = rng.standard_normal((1, 1, 2, 4))
    k = rng.standard_normal((1, 1, 2, D))
    pos = np.array([[2 * rank, 2 * rank + 1]])
    try:
        cp.ring_attention(q, k, k, q_pos=pos, k_pos=pos)
    except cp.ContextParallelError as error:
        return str(error)
    return "no error"


def test_shards_that_disagree_are_refused_on_every_rank(groups: Any) -> None:
    messages = groups[4].run(mismatched_heads, None)
    assert all("rank 3" in m and "(B, Hkv, D, Dv)" in m for m in messages), messages


def test_mask_and_bias_are_refused_by_name() -> None:
    q = np.zeros((1, 1, 1, 4))
    pos = np.zeros((1, 1), dtype=int)
    with pytest.raises(ValueError, match="does not take mask"):
        cp.ring_attention(q, q, q, q_pos=pos, k_pos=pos, mask=np.ones((1, 1), dtype=bool))
    with pytest.raises(ValueError, match="does not take bias"):
        cp.ring_attention(q, q, q, q_pos=pos, k_pos=pos, bias=np.ones((1, 1)))


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@given(length=st.integers(0, 40), world_size=st.integers(1, 6))
def test_shard_indices_partition_the_sequence(layout: str, length: int, world_size: int) -> None:
    shards = [cp.shard_indices(length, world_size, r, layout=layout) for r in range(world_size)]
    together = np.sort(np.concatenate(shards))
    assert together.tolist() == list(range(length))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= (1 if layout == "contiguous" else 2)
    if layout == "zigzag" and length % (2 * world_size) == 0:
        # Causal work, the number of (query, key) pairs at or before the query, balances.
        work = [int(np.sum(s + 1)) for s in shards]
        assert len(set(work)) == 1, work


def test_shard_indices_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rank must be in"):
        cp.shard_indices(4, 2, 2)
    with pytest.raises(ValueError, match="layout must be"):
        cp.shard_indices(4, 2, 0, layout="striped")
    with pytest.raises(ValueError, match="world_size must be"):
        cp.shard_indices(4, 0, 0)


# -- checking someone else's context-parallel attention --------------------------------


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("name", sorted(CORRECT_CP))
def test_correct_context_parallel_attentions_pass_the_check(
    groups: Any, name: str, world_size: int
) -> None:
    report = check_context_parallel(CORRECT_CP[name], world_size=world_size,
                                    dtypes=("float64", "float32", "float16"), max_examples=25,
                                    seed=world_size, group=groups[world_size])  # fmt: skip
    assert report.passed, report
    assert all(report.supported(dtype) >= 20 for dtype in report.dtypes), report.counts


@pytest.mark.parametrize("name", sorted(WRONG_CP))
def test_each_wrong_context_parallel_attention_is_caught_and_shrunk(groups: Any, name: str) -> None:
    fn, needs = WRONG_CP[name]
    features = (CONTEXT_PARALLEL_FEATURES - {"unseen_nan", "long"}) if needs else None
    report = check_context_parallel(fn, world_size=4, max_examples=60, seed=3,
                                    features=features, group=groups[4])  # fmt: skip
    assert not report.passed, report
    smallest = min(getattr(f.outcome.spec, "k_len", 10**9) for f in report.failures)
    assert smallest <= 8, report
