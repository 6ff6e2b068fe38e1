"""The fused CuPy decode kernel (``backends/cupy_kernels/``) against the spec.

On a GPU: :func:`refattn.testing.check_attention` searches for a problem on
which the kernel disagrees with :func:`refattn.attention`, over every
feature the kernel takes, in float16, float32 and float64 (CuPy has no
bfloat16); its merge kernel is held against :func:`refattn.merge_states_n`.
Without one, the GPU tests skip, and what needs no GPU still runs: the
kernel configuration, the errors, and (where NVRTC or nvcc is installed)
that the generated CUDA source compiles.
"""

from __future__ import annotations

import doctest
import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import refattn
from refattn.backends import get
from refattn.backends.cupy_kernels import decode as cupy_decode
from refattn.backends.cupy_kernels.decode import (
    Config,
    choose_config,
    choose_splits,
    decode_attention,
)
from refattn.testing import AttentionProblem, check_attention
from refattn.testing.drawing import FEATURES
from refattn.testing.report import FeatureCount

GPU = get("cupy").unavailable_reason()
needs_gpu = pytest.mark.skipif(GPU is not None, reason=str(GPU))
DTYPES = ("float16", "float32", "float64")


def fused(problem: AttentionProblem, *, num_splits: int | None = None) -> Any:
    """The candidate: an attention problem handed to the fused kernel as it is."""
    return decode_attention(
        problem.q, problem.k, problem.v, causal=problem.causal, q_pos=problem.q_pos,
        k_pos=problem.k_pos, scale=problem.scale, window=problem.window,
        softcap=problem.softcap, alibi_slopes=problem.alibi_slopes,
        return_lse=problem.return_lse, num_splits=num_splits,
    )  # fmt: skip


# What runs without a GPU.


@pytest.mark.parametrize(
    ("dtype", "head_dim", "aligned_to", "vec", "lpk"),
    [
        ("float16", 128, 8, 8, 16),  # 16-byte loads, 16 lanes cover a row
        ("float16", 64, 8, 8, 8),
        ("float32", 128, 16, 4, 32),
        ("float64", 256, 16, 2, 32),  # a row takes two loads per lane
        ("float16", 128, 2, 1, 32),  # a view whose strides allow no 16-byte loads
        ("float32", 3, 16, 1, 4),
    ],
)
def test_config_loads_whole_aligned_vectors(
    dtype: str, head_dim: int, aligned_to: int, vec: int, lpk: int
) -> None:
    config = choose_config(dtype, head_dim, head_dim, 4, aligned_to=aligned_to)
    assert (config.vec, config.lpk) == (vec, lpk)
    assert head_dim % config.vec == 0 and aligned_to % config.vec == 0
    assert config.lpk * config.vec >= min(head_dim, 32 * config.vec)
    assert config.chunks * config.lpk * config.vec >= head_dim  # a lane's share covers a row


def test_config_rows_fit_the_register_budget_and_shared_memory() -> None:
    for dtype in DTYPES:
        for head_dim in (1, 3, 64, 80, 128, 256):
            for n_rows in (1, 3, 4, 8, 32):
                config = choose_config(dtype, head_dim, head_dim, n_rows, aligned_to=16)
                assert 1 <= config.rows <= 8
                assert config.rows & (config.rows - 1) == 0  # few distinct kernels
                assert config.rows <= max(1, n_rows) * 2
                assert config.shared_bytes(head_dim) <= 48 * 1024


def test_splits_fill_the_gpu_without_short_ranges() -> None:
    assert choose_splits(1, 8, 1, 8192, multiprocessors=132) == 32
    assert choose_splits(1, 8, 1, 100, multiprocessors=132) == 1
    for batch, heads, keys in [(1, 8, 8192), (8, 32, 32768), (1, 32, 1024), (64, 64, 512)]:
        splits = choose_splits(batch, heads, 1, keys, multiprocessors=132)
        assert splits >= 1
        assert splits == 1 or keys / splits >= 256
        assert batch * heads * splits >= min(8 * 132, batch * heads * max(1, keys // 256))


def test_docstring_examples_hold() -> None:
    failed, attempted = doctest.testmod(cupy_decode, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert attempted >= 6 and failed == 0


def test_arrays_that_are_not_cupy_are_refused_by_name() -> None:
    q = np.zeros((1, 1, 1, 8), np.float32)
    with pytest.raises(TypeError, match="q must be a CuPy array"):
        decode_attention(q, q, q)


def test_options_the_kernel_does_not_fuse_are_refused_and_unknown_ones_named() -> None:
    q = np.zeros((1, 1, 1, 8), np.float32)
    with pytest.raises(TypeError, match=r"decode_attention does not take \['sink_logits'\]"):
        decode_attention(q, q, q, sink_logits=np.zeros(1, np.float32))
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['casual'\]"):
        decode_attention(q, q, q, casual=True)
    with pytest.raises(ValueError, match="window must be >= 1"):
        decode_attention(q, q, q, window=0)


def _compile_with_nvrtc(source: str) -> str:
    """PTX of ``source`` by NVRTC (the ``nvidia-cuda-nvrtc-cu12`` wheel), which needs no GPU."""
    import ctypes
    import glob
    import importlib.util
    import os

    try:
        spec = importlib.util.find_spec("nvidia.cuda_nvrtc")
    except ModuleNotFoundError:  # no nvidia namespace package at all
        spec = None
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("NVRTC is not installed (pip install nvidia-cuda-nvrtc-cu12)")
    found = [path for folder in spec.submodule_search_locations
             for path in sorted(glob.glob(os.path.join(folder, "lib", "libnvrtc.so*")))
             if ".alt." not in path]  # fmt: skip
    if not found:
        pytest.skip("the NVRTC wheel holds no libnvrtc for this platform")
    nvrtc = ctypes.CDLL(found[0])
    program = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"kernel.cu",
                                    0, None, None) == 0  # fmt: skip
    try:
        options = (ctypes.c_char_p * 2)(b"--std=c++14", b"-arch=compute_90")
        status = nvrtc.nvrtcCompileProgram(program, 2, options)
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(program, log)
        assert status == 0, log.value.decode()
        nvrtc.nvrtcGetPTXSize(program, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetPTX(program, ptx)
        return ptx.value.decode()
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("one_query", [True, False])
def test_cuda_source_compiles_for_every_dtype(dtype: str, one_query: bool) -> None:
    """The .cu file with each dtype's header compiles, without a GPU; a broken one does not."""
    for head_dim, aligned_to, rows in ((128, 16, 4), (3, 1, 8), (256, 16, 1)):
        config = choose_config(dtype, head_dim, head_dim, rows, aligned_to=aligned_to,
                               q_len=1 if one_query else 2)  # fmt: skip
        ptx = _compile_with_nvrtc(config.source())
        assert ".entry refattn_decode_split" in ptx and ".entry refattn_decode_merge" in ptx
    with pytest.raises(AssertionError, match=r"identifier .*undefined"):
        _compile_with_nvrtc(config.source().replace("ROWS_PER_BLOCK", "ROWS_PER_BLOK", 1))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize(
    "config",
    [
        choose_config("float16", 128, 128, 4, aligned_to=8),
        choose_config("float32", 80, 64, 8, aligned_to=16),
        choose_config("float64", 3, 13, 2, aligned_to=1),
    ],
    ids=str,
)
def test_generated_source_compiles(config: Config, tmp_path: Path) -> None:
    source = tmp_path / "kernel.cu"
    source.write_text(config.source())
    done = subprocess.run(
        ["nvcc", "-std=c++14", "-arch=sm_80", "-ptx", str(source), "-o", str(tmp_path / "k.ptx")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


# What needs a GPU.


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_check_attention_finds_no_problem_the_kernel_gets_wrong(dtype: str) -> None:
    report = check_attention(fused, backend="cupy", device="cuda:0", dtypes=[dtype],
                             features=FEATURES, max_examples=300)  # fmt: skip
    assert report.passed, str(report)
    counts = report.counts[dtype]
    assert counts["all"].unsupported == 0
    for feature in FEATURES:
        assert counts.get(feature, FeatureCount()).passed > 0, f"{feature} was never drawn"


@needs_gpu
@pytest.mark.parametrize("num_splits", [1, 2, 7, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_any_number_of_splits_merges_to_the_spec(dtype: str, num_splits: int) -> None:
    candidate = functools.partial(fused, num_splits=num_splits)
    report = check_attention(
        candidate, backend="cupy", device="cuda:0", dtypes=[dtype],
        features={"causal", "gqa", "positions", "empty_slots", "window", "lse", "long"},
        max_examples=60,
    )  # fmt: skip
    assert report.passed, str(report)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_kernel_is_merge_states_n(dtype: str) -> None:
    import cupy

    from refattn import merge_states_n
    from refattn.backends.cupy_kernels.decode import merge_splits

    rng = np.random.default_rng(0)
    compute = "float64" if dtype == "float64" else "float32"
    splits, rows, dv = 5, 64, 40
    outs = rng.standard_normal((splits, rows, dv)).astype(compute)
    lses = (rng.standard_normal((splits, rows)) * 30).astype(compute)
    lses[:, :8] = -np.inf  # rows no part saw a key in
    lses[rng.random((splits, rows)) < 0.3] = -np.inf  # parts that saw no key
    outs[lses == -np.inf] = 0.0
    out, lse = merge_splits(cupy.asarray(outs), cupy.asarray(lses), dtype)
    want_out, want_lse = merge_states_n(list(outs), list(lses))
    tolerance = {"float16": 1e-3, "float32": 1e-6, "float64": 1e-14}[dtype]
    np.testing.assert_allclose(lse.get(), want_lse, rtol=tolerance, atol=0)
    np.testing.assert_allclose(out.get().astype(np.float64), want_out.astype(dtype),
                               rtol=tolerance, atol=tolerance)  # fmt: skip
    assert np.all(out.get()[:8] == 0) and np.all(lse.get()[:8] == -np.inf)


def _sink_case(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One query far past a window of 8 keys, whose first 4 keys (the sinks) score highest."""
    q = rng.standard_normal((1, 4, 1, 32))
    k = rng.standard_normal((1, 2, 600, 32))
    k[:, :, :4] = 3 * q[:, ::2, :, :]  # the sinks are what the query looks for
    v = rng.standard_normal((1, 2, 600, 32))
    return {"q": q, "k": k, "v": v}


def test_the_sink_case_depends_on_the_sinks() -> None:
    """So that the GPU test below cannot pass with a kernel that ignores sink_tokens."""
    case = _sink_case(np.random.default_rng(3))
    with_sinks = np.asarray(refattn.attention(**case, causal=True, window=8, sink_tokens=4))
    without = np.asarray(refattn.attention(**case, causal=True, window=8))
    assert np.abs(with_sinks - without).max() > 0.5


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 5])
def test_sink_tokens_stay_visible_through_the_window(dtype: str, num_splits: int) -> None:
    import cupy

    case = _sink_case(np.random.default_rng(3))
    want = refattn.attention(**case, causal=True, window=8, sink_tokens=4)
    on_gpu = {n: cupy.asarray(x, dtype=dtype) for n, x in case.items()}
    got = decode_attention(**on_gpu, causal=True, window=8, sink_tokens=4, num_splits=num_splits)
    tolerance = {"float16": 2e-2, "float32": 1e-4, "float64": 1e-10}[dtype]
    np.testing.assert_allclose(got.get().astype(np.float64), want, rtol=0, atol=tolerance)


@needs_gpu
def test_a_view_of_a_larger_cache_buffer_is_read_in_place() -> None:
    import cupy

    rng = np.random.default_rng(1)
    buffer_k = cupy.asarray(rng.standard_normal((2, 4, 300, 64)), dtype=cupy.float16)
    buffer_v = cupy.asarray(rng.standard_normal((2, 4, 300, 64)), dtype=cupy.float16)
    q = cupy.asarray(rng.standard_normal((2, 8, 1, 64)), dtype=cupy.float16)
    k, v = buffer_k[:, :, :211], buffer_v[:, :, :211]  # what a static cache hands out
    assert not k.flags.c_contiguous
    got = decode_attention(q, k, v, causal=True)
    assert isinstance(got, cupy.ndarray)
    got = got.get().astype(np.float64)
    want = refattn.attention(q, cupy.ascontiguousarray(k), cupy.ascontiguousarray(v), causal=True)
    assert isinstance(want, cupy.ndarray)
    want = want.get().astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


@needs_gpu
def test_bad_input_is_refused_by_name() -> None:
    """With refattn.attention's own checks and messages, and the kernel's own on top."""
    import cupy

    q = cupy.zeros((1, 4, 1, 8), dtype=cupy.float32)
    k = cupy.zeros((1, 2, 5, 8), dtype=cupy.float32)
    with pytest.raises(TypeError, match="k has dtype float16 but q has float32"):
        decode_attention(q, k.astype(cupy.float16), k)
    with pytest.raises(ValueError, match="q heads must be a multiple of k heads"):
        decode_attention(q, cupy.zeros((1, 3, 5, 8), cupy.float32), k[:, :1].repeat(3, 1))
    with pytest.raises(ValueError, match="k_pos must have shape"):
        decode_attention(q, k, k, k_pos=cupy.arange(4))
    with pytest.raises(ValueError, match="softcap must be finite and > 0"):
        decode_attention(q, k, k, softcap=float("inf"))
    with pytest.raises(TypeError, match="k_pos must be a CuPy array"):
        decode_attention(q, k, k, k_pos=np.arange(5))
    with pytest.raises(ValueError, match="contiguous along its last axis"):
        decode_attention(q, cupy.zeros((1, 2, 5, 16), cupy.float32)[..., ::2], k)
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention(q, k, k, num_splits=0)
