"""FlashInfer's decode and prefill kernels, single and paged, as candidates.

FlashInfer needs CUDA and the ``flashinfer`` package. Without them every
adapter is unavailable (a check that ran nothing is not a pass), and the
adapters are checked against a small model of FlashInfer written from its
documented conventions (:class:`_FlashInferModel`): bottom-right causal
masks, ``window_left`` inclusive, the lse in base 2, the paged cache read
through ``indptr``/``indices``/``last_page_len``, and the refusals of its
kernels. With them, the same checks run on FlashInfer itself (the
``flashinfer`` ids), and the probe measures its conventions.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np
import pytest

from refattn.testing import (
    ProblemSpec,
    Report,
    Unavailable,
    Unsupported,
    check_attention,
    check_problem,
    make_problem,
)
from refattn.testing.layouts import bottom_right_lengths, page_kv
from refattn.testing.precision import FLASH_ATTN

torch = pytest.importorskip("torch")

from refattn.testing.adapters import flashinfer_kernels as fi  # noqa: E402

SEED = 0
LOG2E = math.log2(math.e)
ADAPTERS = (fi.flashinfer_single_decode, fi.flashinfer_single_prefill,
            fi.flashinfer_batch_decode_paged, fi.flashinfer_batch_prefill_paged)  # fmt: skip
DECODE = (fi.flashinfer_single_decode, fi.flashinfer_batch_decode_paged)
PREFILL = (fi.flashinfer_single_prefill, fi.flashinfer_batch_prefill_paged)
PAGED = (fi.flashinfer_batch_decode_paged, fi.flashinfer_batch_prefill_paged)
IDS = [adapter.__name__ for adapter in ADAPTERS]


def _flashinfer_usable() -> bool:
    """Whether FlashInfer itself can run here: the package and a CUDA GPU."""
    return importlib.util.find_spec("flashinfer") is not None and torch.cuda.is_available()


def _supported_share(report: Report, dtype: str) -> float:
    """The share of the problems tried in ``dtype`` that the candidate took."""
    return report.supported(dtype) / max(1, report.tried(dtype))


# -- a model of FlashInfer, from its documented conventions ---------------------------


def _dtype(name: Any) -> Any:
    """A ``q_data_type`` as FlashInfer takes it (a torch dtype or its name) as a torch dtype."""
    return getattr(torch, name) if isinstance(name, str) else name


def _attend(
    q: Any, k: Any, v: Any, *, causal: bool, window_left: int, logits_soft_cap: float | None,
    sm_scale: float | None, round_weights: bool = False, round_scaled_q: bool = False,
    keep: Any = None,
) -> tuple[Any, Any]:  # fmt: skip
    """One request as FlashInfer's kernels compute it: out (qo_len, Hq, Dv) in q's dtype and
    the base-2 lse (qo_len, Hq) in float32.

    Query i sits at ``kv_len - qo_len + i``; ``causal`` masks key j when
    ``j + qo_len > kv_len + i``, ``window_left`` when ``j + qo_len + window_left <
    kv_len + i``; ``keep`` (qo_len, kv_len), a custom mask, replaces the causal one.
    The scores are in base 2: q times ``sm_scale * log2e`` (or ``sm_scale / cap``, then
    ``cap * log2e * tanh``). ``round_weights`` casts the softmax weights to q's dtype
    before P V, as the prefill kernels' ``compute_sfm_v`` does; ``round_scaled_q``
    rounds the scaled q to its dtype, as their ``q_smem_inplace_transform`` does; the
    decode kernels keep float32 throughout.
    """
    n_q, Hq, D = q.shape
    n_k, Hkv, _ = k.shape
    assert q.dtype in (torch.float16, torch.bfloat16), "FlashInfer takes float16 and bfloat16"
    assert k.dtype == q.dtype and v.dtype == q.dtype
    assert D in (64, 128, 256), f"Unsupported head_dim: {D}"
    assert k.shape[-1] == D and v.shape[-1] == D, "head_dim_qk == head_dim_vo"
    assert Hq % Hkv == 0, "num_qo_heads must be a multiple of num_kv_heads"
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    cap = logits_soft_cap or 0.0
    factor = scale / cap if cap > 0 else scale * LOG2E
    scaled = q.float() * factor
    if round_scaled_q:
        scaled = scaled.to(q.dtype).float()
    kq, vq = (x.float().repeat_interleave(Hq // Hkv, dim=1) for x in (k, v))  # (n_k, Hq, D)
    s = torch.einsum("qhd,khd->hqk", scaled, kq)  # (Hq, n_q, n_k), base 2
    if cap > 0:
        s = cap * LOG2E * torch.tanh(s)
    i, j = torch.arange(n_q)[:, None], torch.arange(n_k)[None, :]
    visible = torch.ones((n_q, n_k), dtype=torch.bool)
    if keep is not None:
        visible = keep.to(torch.bool).cpu()
    elif causal:
        visible = visible & ~(j + n_q > n_k + i)
    if window_left >= 0:
        visible = visible & (j + n_q + window_left >= n_k + i)
    s = s.masked_fill(~visible, -math.inf)
    m = s.amax(dim=-1, keepdim=True)  # (Hq, n_q, 1)
    if keep is None:
        assert bool(visible.any(dim=-1).all()), "the adapter sent a query that sees no key"
    m = torch.where(torch.isinf(m), 0.0, m)  # a row of no key (custom masks only)
    e = torch.exp2(s - m)  # (Hq, n_q, n_k)
    d = e.sum(dim=-1)  # (Hq, n_q)
    p = e.to(q.dtype).float() if round_weights else e
    out = torch.einsum("hqk,khd->qhd", p, vq) / d.T.clamp_min(1e-30)[:, :, None]
    lse = (m[..., 0] + torch.log2(d)).T  # (n_q, Hq)
    return out.to(q.dtype), lse.to(torch.float32)


def _read_request(pages: Any, indptr: Any, indices: Any, last_page_len: Any, r: int) -> Any:
    """Request r's tokens (kv_len, Hkv, D) from a pool (num_pages, page_size, Hkv, D)."""
    first, end = int(indptr[r]), int(indptr[r + 1])
    page_size, last = pages.shape[1], int(last_page_len[r])
    assert end > first, "a request holds at least one page"
    assert 1 <= last <= page_size, "1 <= kv_last_page_len <= page_size"
    blocks = indices[first:end].long()
    assert bool((blocks >= 0).all()) and bool((blocks < pages.shape[0]).all())
    n = (end - first - 1) * page_size + last
    return pages[blocks].reshape(-1, *pages.shape[2:])[:n]


def _check_table(indptr: Any, indices: Any, last_page_len: Any) -> None:
    """What FlashInfer's plans require of a page table: int32, ``indptr`` from 0, rising,
    to ``len(indices)``, one ``last_page_len`` per request."""
    for name, x in (("indptr", indptr), ("indices", indices), ("last_page_len", last_page_len)):
        assert x.dtype == torch.int32 and x.ndim == 1, f"{name} must be int32 (n,)"
    assert int(indptr[0]) == 0 and bool((indptr[1:] >= indptr[:-1]).all())
    assert int(indptr[-1]) == indices.shape[0] and last_page_len.shape[0] == indptr.shape[0] - 1


class _FlashInferModel:
    """FlashInfer's attention API, as its docs and kernels define it, in torch on the CPU.

    ``single_decode_with_kv_cache`` takes q (Hq, D) and k, v (kv_len, Hkv, D);
    ``single_prefill_with_kv_cache`` q (qo_len, Hq, D) and refuses a causal
    call with fewer keys than queries; the wrappers plan a paged table and run
    q (total, Hq, D) over a ``(k_pages, v_pages)`` pool. The decode kernels
    take GQA group sizes 1, 2, 3, 4 and 8. Every lse is in base 2.

    The prefill functions round ``q * sm_scale * log2e`` to the input dtype
    before q k^T and cast the softmax weights to it before P V, as their
    FlashAttention-2 kernels do
    (:data:`~refattn.testing.adapters.flashinfer_kernels.FLASHINFER_PREFILL`
    names both; ``prefill_rounding``).
    """

    #: The roundings of the prefill functions the model applies.
    prefill_rounding: ClassVar[dict[str, bool]] = {"round_weights": True, "round_scaled_q": True}

    def single_decode_with_kv_cache(
        self, q: Any, k: Any, v: Any, kv_layout: str = "NHD", pos_encoding_mode: str = "NONE",
        window_left: int = -1, logits_soft_cap: float | None = None,
        sm_scale: float | None = None, return_lse: bool = False,
    ) -> Any:  # fmt: skip
        """One decode query (Hq, D) over k, v (kv_len, Hkv, D): out (Hq, D) [, lse (Hq,)]."""
        assert kv_layout == "NHD" and pos_encoding_mode == "NONE"
        assert q.ndim == 2 and k.ndim == 3, "q (num_qo_heads, head_dim), k (kv_len, Hkv, D)"
        assert (q.shape[0] // k.shape[1]) in (1, 2, 3, 4, 8), "Unsupported group_size"
        out, lse = _attend(q[None], k, v, causal=False, window_left=window_left,
                           logits_soft_cap=logits_soft_cap, sm_scale=sm_scale)  # fmt: skip
        return (out[0], lse[0]) if return_lse else out[0]

    def single_prefill_with_kv_cache(
        self, q: Any, k: Any, v: Any, custom_mask: Any = None, causal: bool = False,
        kv_layout: str = "NHD", pos_encoding_mode: str = "NONE", sm_scale: float | None = None,
        window_left: int = -1, logits_soft_cap: float | None = None, return_lse: bool = False,
    ) -> Any:  # fmt: skip
        """qo_len queries over kv_len keys: out (qo_len, Hq, D) [, lse (qo_len, Hq)]."""
        assert kv_layout == "NHD" and pos_encoding_mode == "NONE"
        if causal and custom_mask is None:
            assert k.shape[0] >= q.shape[0], (
                "When mask_mode is set to MaskMode::kCausal, kv_len must be greater than or "
                "equal to qo_len"
            )
        out, lse = _attend(q, k, v, causal=causal, window_left=window_left,
                           logits_soft_cap=logits_soft_cap, sm_scale=sm_scale,
                           keep=custom_mask, **_FlashInferModel.prefill_rounding)  # fmt: skip
        return (out, lse) if return_lse else out

    class BatchDecodeWithPagedKVCacheWrapper:
        """Decode requests of one query each over a paged cache: ``plan``, then ``run``."""

        def __init__(self, float_workspace_buffer: Any, kv_layout: str = "NHD") -> None:
            """A wrapper over a uint8 workspace, in the ``NHD`` layout."""
            assert float_workspace_buffer.dtype == torch.uint8 and kv_layout == "NHD"

        def plan(
            self, indptr: Any, indices: Any, last_page_len: Any, num_qo_heads: int,
            num_kv_heads: int, head_dim: int, page_size: int, pos_encoding_mode: str = "NONE",
            window_left: int = -1, logits_soft_cap: float | None = None,
            q_data_type: Any = "float16", kv_data_type: Any = None,
            sm_scale: float | None = None,
        ) -> None:  # fmt: skip
            """Check and keep the table and the options for :meth:`run`."""
            _check_table(indptr, indices, last_page_len)
            assert pos_encoding_mode == "NONE"
            assert num_qo_heads // num_kv_heads in (1, 2, 3, 4, 8), "Unsupported group_size"
            self.table = (indptr, indices, last_page_len)
            self.shape = (num_qo_heads, num_kv_heads, head_dim, page_size)
            self.dtype = _dtype(q_data_type)
            self.options: dict[str, Any] = {"window_left": window_left, "sm_scale": sm_scale,
                                            "logits_soft_cap": logits_soft_cap}  # fmt: skip

        def run(self, q: Any, paged_kv_cache: Any, return_lse: bool = False) -> Any:
            """q (batch_size, Hq, D): out (batch_size, Hq, D) [, lse (batch_size, Hq)]."""
            k_pages, v_pages = paged_kv_cache
            indptr, indices, last_page_len = self.table
            assert q.dtype == self.dtype and q.shape[0] == last_page_len.shape[0]
            assert (q.shape[1], k_pages.shape[2], q.shape[2], k_pages.shape[1]) == self.shape
            outs, lses = [], []
            for r in range(q.shape[0]):
                k, v = (_read_request(x, indptr, indices, last_page_len, r)
                        for x in (k_pages, v_pages))  # fmt: skip
                out, lse = _attend(q[r : r + 1], k, v, causal=False, **self.options)
                outs.append(out)
                lses.append(lse)
            out, lse = torch.cat(outs), torch.cat(lses)
            return (out, lse) if return_lse else out

    class BatchPrefillWithPagedKVCacheWrapper:
        """Prefill requests of ``qo_indptr`` queries over a paged cache: ``plan``, ``run``."""

        def __init__(self, float_workspace_buffer: Any, kv_layout: str = "NHD") -> None:
            """A wrapper over a uint8 workspace, in the ``NHD`` layout."""
            assert float_workspace_buffer.dtype == torch.uint8 and kv_layout == "NHD"

        def plan(
            self, qo_indptr: Any, paged_kv_indptr: Any, paged_kv_indices: Any,
            paged_kv_last_page_len: Any, num_qo_heads: int, num_kv_heads: int,
            head_dim_qk: int, page_size: int, causal: bool = False,
            pos_encoding_mode: str = "NONE", sm_scale: float | None = None,
            window_left: int = -1, logits_soft_cap: float | None = None,
            q_data_type: Any = "float16", kv_data_type: Any = None,
        ) -> None:  # fmt: skip
            """Check and keep the tables and the options for :meth:`run`."""
            _check_table(paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len)
            assert qo_indptr.dtype == torch.int32 and qo_indptr.shape == paged_kv_indptr.shape
            assert pos_encoding_mode == "NONE"
            self.qo_indptr = qo_indptr
            self.table = (paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len)
            self.shape = (num_qo_heads, num_kv_heads, head_dim_qk, page_size)
            self.dtype = _dtype(q_data_type)
            self.options: dict[str, Any] = {"causal": causal, "window_left": window_left,
                            "logits_soft_cap": logits_soft_cap, "sm_scale": sm_scale}  # fmt: skip

        def run(self, q: Any, paged_kv_cache: Any, return_lse: bool = False) -> Any:
            """q (qo_indptr[-1], Hq, D): out (total, Hq, D) [, lse (total, Hq)]."""
            k_pages, v_pages = paged_kv_cache
            indptr, indices, last_page_len = self.table
            assert q.dtype == self.dtype and q.shape[0] == int(self.qo_indptr[-1])
            assert (q.shape[1], k_pages.shape[2], q.shape[2], k_pages.shape[1]) == self.shape
            outs, lses = [], []
            for r in range(last_page_len.shape[0]):
                k, v = (_read_request(x, indptr, indices, last_page_len, r)
                        for x in (k_pages, v_pages))  # fmt: skip
                queries = slice(int(self.qo_indptr[r]), int(self.qo_indptr[r + 1]))
                out, lse = _attend(q[queries], k, v, **self.options,
                                   **_FlashInferModel.prefill_rounding)  # fmt: skip
                outs.append(out)
                lses.append(lse)
            out, lse = torch.cat(outs), torch.cat(lses)
            return (out, lse) if return_lse else out


class _WindowOneShort(_FlashInferModel):
    """A wrong FlashInfer, for the adapters to be caught on: ``window_left`` one key short."""

    def single_decode_with_kv_cache(  # type: ignore[override]
        self, q: Any, k: Any, v: Any, **kwargs: Any
    ) -> Any:
        """The decode with its window narrowed by one key."""
        return super().single_decode_with_kv_cache(q, k, v, **_narrower(kwargs))

    def single_prefill_with_kv_cache(  # type: ignore[override]
        self, q: Any, k: Any, v: Any, **kwargs: Any
    ) -> Any:
        """The prefill with its window narrowed by one key."""
        return super().single_prefill_with_kv_cache(q, k, v, **_narrower(kwargs))


def _narrower(options: dict[str, Any]) -> dict[str, Any]:
    """The keywords of a FlashInfer call with ``window_left`` one key shorter, where set."""
    left = int(options.get("window_left", -1))
    return {**options, "window_left": left - 1 if left > 0 else left}


# -- where the checks run: on the model here, on FlashInfer where it can run ----------


@pytest.fixture(params=["model", "flashinfer"])
def kernels(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, Any]]:
    """The keywords of a check: on the model (CPU, NumPy problems), or on FlashInfer itself
    (torch problems on the GPU), skipped where it is not here."""
    if request.param == "flashinfer":
        pytest.importorskip("flashinfer")
        if not torch.cuda.is_available():
            pytest.skip("FlashInfer needs a CUDA GPU")
        yield {"backend": "torch", "device": "cuda:0"}
        return
    monkeypatch.setattr(fi, "_flashinfer_module", _FlashInferModel)
    monkeypatch.setattr(fi, "_cuda_device", lambda problem: "cpu")
    yield {}


def _pages_off_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong wrapper: each request's pages read one entry early in ``indices`` (every
    index still a page of the pool, so the kernel reads no memory it does not own)."""
    correct = fi.paged_kv_indices

    def rolled(*args: Any, **kwargs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        indptr, indices, last_page_len = correct(*args, **kwargs)
        return indptr, np.roll(indices, 1), last_page_len

    monkeypatch.setattr(fi, "paged_kv_indices", rolled)


def _window_one_short(adapter: Callable[..., Any]) -> Callable[..., Any]:
    """A wrong wrapper around ``adapter``: refattn's window W said as ``window_left = W - 2``."""

    def wrong(problem: Any) -> Any:
        if problem.window is None or problem.window < 2:
            return adapter(problem)
        return adapter(dataclasses.replace(problem, window=problem.window - 1))

    return wrong


# -- the host side ----------------------------------------------------------------------


def test_the_page_table_is_each_requests_first_blocks_and_its_last_pages_fill() -> None:
    """Worked by hand: pages of 4, a row of 9 tokens (blocks 7, 2, 5: the last holds 1),
    one of 4 (block 0, full), one of 5 (blocks 3, 6: the last holds 1)."""
    table = np.array([[7, 2, 5], [0, 1, 4], [3, 6, 8]])
    indptr, indices, last_page_len = fi.paged_kv_indices(table, [9, 4, 5], page_size=4)
    assert indptr.tolist() == [0, 3, 4, 6]
    assert indices.tolist() == [7, 2, 5, 0, 3, 6]
    assert last_page_len.tolist() == [1, 4, 1]
    assert {x.dtype for x in (indptr, indices, last_page_len)} == {np.dtype(np.int32)}
    _, _, ones = fi.paged_kv_indices(table, [1, 2, 3], page_size=1)
    assert ones.tolist() == [1, 1, 1]


@pytest.mark.parametrize("lengths", [[0, 3, 1], [13, 1, 1]])
def test_the_page_table_refuses_a_request_it_cannot_hold(lengths: list[int]) -> None:
    """No tokens (FlashInfer's last page holds 1 to page_size), or more than the row spans."""
    with pytest.raises(ValueError, match="every request must hold 1 to 12 tokens"):
        fi.paged_kv_indices(np.zeros((3, 3), dtype=np.int64), lengths, page_size=4)


@pytest.mark.parametrize("page_size", fi.FLASHINFER_PAGE_SIZES)
def test_the_page_table_reads_back_every_rows_keys_from_page_kv(page_size: int) -> None:
    """Through the table the adapters build from :func:`page_kv` (shuffled blocks, spare
    ones, NaN in the slots no token fills), each request reads exactly its row's held keys,
    in slot order; a decode request per query reads the prefix up to its query."""
    spec = ProblemSpec(batch=3, q_len=2, k_len=11, layout="left_padded", seed=5, min_row_len=2)
    problem = make_problem(spec)
    lengths = bottom_right_lengths(problem, leading=False)
    paged = page_kv(problem, page_size=page_size, seed=spec.seed)
    pool = torch.from_numpy(paged.k_cache)
    for causal in (False, True):
        counts = fi.decode_lengths(lengths, 2, causal=causal)
        table = np.repeat(paged.block_table, 2, axis=0)
        arrays = fi.paged_kv_indices(table, counts, page_size)
        indptr, indices, last = (torch.from_numpy(x) for x in arrays)
        for r, n in enumerate(counts.tolist()):
            b = r // 2
            held = np.flatnonzero(problem.k_pos[b] >= 0)[:n]
            want = problem.k[b][:, held].transpose(1, 0, 2)  # (n, Hkv, D)
            got = _read_request(pool, indptr, indices, last, r).numpy()
            assert got.shape == want.shape and np.array_equal(got, want)


def test_each_query_is_a_decode_request_over_the_keys_up_to_its_position() -> None:
    assert fi.decode_lengths([3, 5], 2, causal=True).tolist() == [2, 3, 4, 5]
    assert fi.decode_lengths([3, 5], 2, causal=False).tolist() == [3, 3, 5, 5]
    assert fi.decode_lengths([4], 1, causal=True).tolist() == [4]


def test_the_page_size_is_chosen_by_the_seed_among_1_4_and_16() -> None:
    sizes = {fi.page_size_of(make_problem(ProblemSpec(seed=s))) for s in range(6)}
    assert sizes == {1, 4, 16}
    again = [fi.page_size_of(make_problem(ProblemSpec(seed=7))) for _ in range(2)]
    assert again[0] == again[1]


def test_the_base_2_lse_is_mapped_to_the_natural_log() -> None:
    """An lse of :math:`\\log_2 n` (n keys, every score 0) comes back as :math:`\\ln n`."""
    problem = make_problem(ProblemSpec(batch=1, q_heads=2, kv_heads=1, q_len=3, k_len=5,
                                       head_dim=64, value_dim=64, return_lse=True))  # fmt: skip
    counts = torch.tensor([[3.0, 4.0, 5.0], [3.0, 4.0, 5.0]])  # (Hq, Sq)
    out = torch.zeros((3, 2, 64))
    _, lse = fi._flashinfer_result(problem, [out], [torch.log2(counts).T])
    assert lse.shape == (1, 2, 3) and lse.dtype == torch.float32
    torch.testing.assert_close(lse[0], torch.log(counts))


def test_the_adapters_declare_their_shapes_precision_and_features() -> None:
    for adapter in ADAPTERS:
        constraints = adapter.constraints  # type: ignore[attr-defined]
        assert constraints.head_dims((8, 16, 40, 64, 80, 128)) == (64, 128)
        assert constraints.same_value_dim
        assert constraints.keys_cover_queries == (adapter in DECODE)
    for adapter in PREFILL:
        assert adapter.precision.resolve("float16").softmax == "float16"  # type: ignore[attr-defined]
    for adapter in DECODE:
        assert adapter.precision.is_default("bfloat16")  # type: ignore[attr-defined]
    names = [i.name for i in fi.IMPLEMENTATIONS]
    assert names == ["FlashInfer single_decode_with_kv_cache",
                     "FlashInfer single_prefill_with_kv_cache",
                     "FlashInfer BatchDecodeWithPagedKVCacheWrapper",
                     "FlashInfer BatchPrefillWithPagedKVCacheWrapper"]  # fmt: skip
    for implementation in fi.IMPLEMENTATIONS:
        assert implementation.gpu and implementation.requires == ("flashinfer",)
        assert implementation.library == "flashinfer-python"
        assert "alibi" not in implementation.features and "window" in implementation.features
    assert fi.DEFECTS == ()


# -- without FlashInfer -----------------------------------------------------------------


def test_without_flashinfer_every_adapter_is_unavailable_and_no_check_passes() -> None:
    """Unavailable, not another error, and a check of nothing is no pass."""
    if _flashinfer_usable():
        pytest.skip("flashinfer and CUDA are usable here")
    problem = make_problem(ProblemSpec(head_dim=64, value_dim=64), dtype="float16")
    for adapter in ADAPTERS:
        with pytest.raises(Unavailable, match=r"flashinfer is not installed|needs CUDA"):
            adapter(problem)
        report = check_attention(adapter, dtypes=("float16",), max_examples=20, seed=0)
        assert report.unavailable and not report.failures and not report.passed, str(report)
    with pytest.raises(Unavailable):
        fi._flashinfer_probe()


def test_flashinfer_without_cuda_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed but with no GPU: Unavailable before ``flashinfer`` is imported."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    monkeypatch.setattr(fi, "require", lambda library: None)
    problem = make_problem(ProblemSpec(head_dim=64, value_dim=64), dtype="bfloat16")
    for adapter in ADAPTERS:
        with pytest.raises(Unavailable, match=r"^FlashInfer needs CUDA$"):
            adapter(problem)
    report = check_attention(fi.flashinfer_batch_prefill_paged, dtypes=("bfloat16",), seed=0,
                             max_examples=5)  # fmt: skip
    assert report.unavailable == "FlashInfer needs CUDA" and not report.passed


# -- the checks, on the model and on FlashInfer ------------------------------------------

#: The share of drawn problems each adapter must take: the decode ones draw rows that hold
#: their queries' keys (their constraints) and refuse only other numberings and non-causal
#: windows over several queries; the prefill ones refuse other numberings, rows of no key
#: and causal rows of fewer keys than queries.
SHARES = {
    fi.flashinfer_single_decode: 0.4,
    fi.flashinfer_single_prefill: 0.25,
    fi.flashinfer_batch_decode_paged: 0.4,
    fi.flashinfer_batch_prefill_paged: 0.25,
}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("adapter", ADAPTERS, ids=IDS)
def test_flashinfer_agrees_with_the_spec(
    adapter: Callable[..., Any], dtype: str, kernels: dict[str, Any]
) -> None:
    """Every feature the adapter declares, the lse included; judged by its precision."""
    report = check_attention(adapter, dtypes=[dtype], features=fi.FLASHINFER_FEATURES,
                             seed=SEED, **kernels)  # fmt: skip
    assert report.passed, str(report)
    assert _supported_share(report, dtype) >= SHARES[adapter], str(report)
    assert report.counts[dtype]["lse"].passed >= 5, str(report)
    assert report.counts[dtype]["window"].passed >= 5, str(report)


@pytest.mark.parametrize("adapter", ADAPTERS, ids=IDS)
def test_a_window_one_key_short_fails(adapter: Callable[..., Any], kernels: dict[str, Any]) -> None:
    """The check is not blind to a window: the adapter with ``window_left`` one key short,
    judged by the adapter's own constraints and precision."""
    declared = {"constraints": adapter.constraints,  # type: ignore[attr-defined]
                "precision": adapter.precision}  # type: ignore[attr-defined]  # fmt: skip
    report = check_attention(_window_one_short(adapter), dtypes=["float16"], seed=SEED,
                             features=("causal", "window"), max_examples=60, **declared,
                             **kernels)  # fmt: skip
    assert not report.passed and report.failures, str(report)
    assert "window" in report.failures[0].features


@pytest.mark.parametrize("adapter", PAGED, ids=[a.__name__ for a in PAGED])
def test_a_page_table_off_by_one_page_fails(
    adapter: Callable[..., Any], kernels: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check reads the pages: a table whose ``indices`` are one entry early fails."""
    _pages_off_by_one(monkeypatch)
    report = check_attention(adapter, dtypes=["float16"], seed=SEED, max_examples=60,
                             features=("causal", "ragged", "gqa"), **kernels)  # fmt: skip
    assert not report.passed and report.failures, str(report)


def test_a_flashinfer_whose_window_is_one_short_fails_under_every_adapter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Against a wrong model (its ``window_left`` one key short), the single-request adapters
    fail on windowed problems: they hand FlashInfer the window it is asked for."""
    monkeypatch.setattr(fi, "_flashinfer_module", _WindowOneShort)
    monkeypatch.setattr(fi, "_cuda_device", lambda problem: "cpu")
    for adapter in (fi.flashinfer_single_decode, fi.flashinfer_single_prefill):
        report = check_attention(adapter, dtypes=["float16"], seed=SEED, max_examples=60,
                                 features=("causal", "window"))  # fmt: skip
        assert not report.passed and "window" in report.failures[0].features, str(report)


@pytest.mark.parametrize(
    ("spec", "adapters", "reason"),
    [
        (ProblemSpec(), ADAPTERS, "float16 and bfloat16, not float32"),
        (ProblemSpec(head_dim=32, value_dim=32), ADAPTERS, "head dims 64, 128 and 256; got 32"),
        (ProblemSpec(head_dim=64, value_dim=128), ADAPTERS, "value dim equal to the key dim"),
        (ProblemSpec(alibi=True), ADAPTERS, 'pos_encoding_mode="ALIBI" takes no slopes'),
        (ProblemSpec(mask=True), ADAPTERS, "take no mask"),
        (ProblemSpec(window=2, sink_tokens=1, causal=True), ADAPTERS, "no sink tokens"),
        (ProblemSpec(q_len=2, k_len=5, layout="top_left"), ADAPTERS, "keys from 0"),
        (ProblemSpec(q_len=1, k_len=6, batch=2, layout="ragged", seed=1, head_dim=64,
                     value_dim=64), ADAPTERS,
         "at least one key in every request"),
        (ProblemSpec(q_len=3, k_len=2, causal=True), ADAPTERS, "kv_len >= qo_len"),
        (ProblemSpec(q_len=3, k_len=5, window_right=1), ADAPTERS, "no right reach"),
        (ProblemSpec(q_len=2, k_len=5, window=2), DECODE, "not a decode"),
        (ProblemSpec(q_heads=5, kv_heads=1, q_len=1, k_len=4), DECODE, "group sizes"),
    ],
)  # fmt: skip
def test_what_flashinfer_cannot_take_is_unsupported_with_its_reason(
    spec: ProblemSpec, adapters: tuple[Callable[..., Any], ...], reason: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(fi, "_flashinfer_module", _FlashInferModel)
    monkeypatch.setattr(fi, "_cuda_device", lambda problem: "cpu")
    default_dims = spec.head_dim == ProblemSpec().head_dim
    dims: dict[str, Any] = {"head_dim": 64, "value_dim": 64} if default_dims else {}
    spec = dataclasses.replace(spec, **dims)
    problem = make_problem(spec, dtype="float32" if "float32" in reason else "float16")
    for adapter in adapters:
        with pytest.raises(Unsupported, match=re.escape(reason)):
            adapter(problem)


def test_what_the_prefill_adapters_take_that_a_decode_does_not() -> None:
    """Non-causal windows over several queries, and groups of 5 query heads, pass."""
    for spec in (ProblemSpec(q_len=2, k_len=5, window=2, head_dim=64, value_dim=64, seed=3),
                 ProblemSpec(q_heads=5, kv_heads=1, q_len=2, k_len=4, head_dim=64,
                             value_dim=64, causal=True)):  # fmt: skip
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(fi, "_flashinfer_module", _FlashInferModel)
            patch.setattr(fi, "_cuda_device", lambda problem: "cpu")
            for adapter in PREFILL:
                assert check_problem(adapter, spec, dtype="bfloat16").passed


def test_the_probe_measures_the_conventions_of_what_it_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the model: bottom-right, ``window_left`` inclusive, the lse in base 2; on
    FlashInfer itself (where it can run) the same, and float32 scores."""
    if _flashinfer_usable():
        measured = fi._flashinfer_probe()
        assert measured["scores"] == "float32 or wider"
    else:
        monkeypatch.setattr(fi, "_flashinfer_module", _FlashInferModel)
        measured = fi._flashinfer_probe(device="cpu")
    assert set(measured) == {"alignment", "empty_row", "window", "lse", "scores"}
    assert measured["alignment"] == "bottom-right"
    assert measured["window"] == "window_left=2 keeps q-2 .. q (3 keys)"
    assert measured["lse"] == "log2, float32"
    assert measured["empty_row"].startswith("custom_mask of no key: ")


def test_the_scaled_query_rounding_of_the_fa2_prefill_needs_its_contract(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """FlashInfer's FlashAttention-2 prefill stores ``q * sm_scale * log2e`` back in the
    input dtype before q k^T (``q_smem_inplace_transform``). Under flash-attn's contract
    alone, which names the weights' rounding only, the model of it fails already on
    scores near 30 (the error of a rounded q scales with the score); under the adapter's
    own, which adds ``prescale="query"``, the same search passes."""
    monkeypatch.setattr(fi, "_flashinfer_module", _FlashInferModel)
    monkeypatch.setattr(fi, "_cuda_device", lambda problem: "cpu")

    def search(precision: Any = None) -> Any:
        return check_attention(fi.flashinfer_single_prefill, dtypes=["float16"], seed=2,
                               features=("causal", "gqa", "window"), max_examples=300,
                               precision=precision)  # fmt: skip

    alone = search(FLASH_ATTN)
    assert not alone.passed and alone.failures, str(alone)
    assert {f.symptom for f in alone.failures} == {"wrong out"}, str(alone)
    named = search()
    assert named.passed, str(named)
