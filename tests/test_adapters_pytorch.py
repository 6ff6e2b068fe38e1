"""SDPA with each CPU backend forced, and FlexAttention compiled, agree with the spec where
PyTorch works; a wrong wrapper around the same call fails; the compiled-Flex defect stays
explained and reproducible.

(The default-dispatch SDPA and eager FlexAttention are tested in tests/test_adapters.py.)
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from refattn.testing import ProblemSpec, Unsupported, check_attention, check_problem, make_problem

torch = pytest.importorskip("torch")

from refattn.testing.adapters import pytorch  # noqa: E402

DEFECTS = Path(__file__).resolve().parents[1] / "docs" / "defects"
DTYPES = ("float32", "float64", "float16", "bfloat16")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adapter", [pytorch.torch_sdpa_math, pytorch.torch_sdpa_flash],
                         ids=["math", "flash"])  # fmt: skip
def test_sdpa_with_a_cpu_backend_forced_agrees_with_the_spec(adapter: Any, dtype: str) -> None:
    report = check_attention(adapter, dtypes=[dtype], features=pytorch.SDPA_FEATURES, seed=0,
                             max_examples=80)  # fmt: skip
    assert report.passed, str(report)
    assert report.supported(dtype) == report.tried(dtype), str(report)  # none refused


def test_a_forced_backend_refuses_what_it_cannot_take_with_pytorchs_reason() -> None:
    """The CPU flash kernel needs Dv == D; PyTorch warns why, then raises. The adapter says
    PyTorch's reason (its constraints keep such problems out of its own draws)."""
    problem = make_problem(ProblemSpec(head_dim=8, value_dim=6))
    reason = "FLASH_ATTENTION: Flash attention requires q,k,v to have the same last dimension"
    with pytest.raises(Unsupported, match=re.escape(reason) + "$"):
        pytorch.torch_sdpa_flash(problem)
    assert tuple(pytorch.torch_sdpa_math(problem).shape[-1:]) == (6,)


def test_the_cuda_only_backends_are_unavailable_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    report = check_attention(pytorch.torch_sdpa_efficient, max_examples=5, seed=0)
    assert report.unavailable == "SDPA's EFFICIENT_ATTENTION backend needs CUDA"
    assert not report.passed


def _is_causal_always(problem: Any) -> Any:
    """A wrong wrapper: SDPA's is_causal for every causal problem, whatever the positions
    (the top-left alignment, where a KV cache needs bottom-right)."""
    if problem.causal:
        q, k, v = (torch.from_numpy(x) for x in (problem.q, problem.k, problem.v))
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=problem.scale, enable_gqa=True
        )
    return pytorch.torch_sdpa_math(problem)


def test_a_wrong_wrapper_around_sdpa_fails() -> None:
    report = check_attention(_is_causal_always, features=("causal",), seed=0, max_examples=50)
    assert not report.passed and report.failures, str(report)
    assert "causal" in report.failures[0].features


def test_the_sdpa_probe_measures_top_left_alignment_and_zero_empty_rows() -> None:
    """Measured by calling SDPA directly: is_causal is top-left, as PyTorch documents
    (``attn_mask = torch.ones(L, S).tril(diagonal=0)``), and torch 2.13 gives a row that
    sees no key 0 on the CPU."""
    measured = pytorch.IMPLEMENTATIONS[1].probe()  # type: ignore[misc]
    assert set(measured) == {"alignment", "empty_row", "window", "lse", "scores"}
    assert measured["alignment"] == "top-left"
    assert measured["empty_row"] == "0"
    assert measured["scores"] == "float32 or wider"


# Compiled FlexAttention: each new head dim or kind of score_mod compiles (seconds), so the
# checks below are a few fixed problems rather than a search.
def test_compiled_flex_attention_agrees_with_the_spec() -> None:
    """Compiled for each size: 12 problems of every feature FlexAttention takes (each one
    compiles, for seconds); the lse, which it does not return on the CPU, is refused."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    report = check_attention(pytorch.torch_flex_attention_compiled, seed=0, max_examples=12,
                             features=pytorch.FLEX_FEATURES)  # fmt: skip
    assert report.passed, str(report)
    assert report.supported("float32") >= 6, str(report)


def _unscaled_compiled(problem: Any) -> Any:
    """A wrong wrapper: compiled FlexAttention with the scale left at its default, 1/sqrt(D),
    where the problem set its own."""
    return pytorch.torch_flex_attention_compiled(dataclasses.replace(problem, scale=None))


def test_a_wrong_wrapper_around_compiled_flex_attention_fails() -> None:
    pytest.importorskip("torch.nn.attention.flex_attention")
    spec = ProblemSpec(q_len=6, k_len=6, causal=True, scale=0.05, seed=1)
    assert not check_problem(_unscaled_compiled, spec).passed


def test_dynamic_compiled_flex_fails_as_its_known_defect_says_and_the_reproducer_shows_it() -> None:
    """Compiled for every size, FlexAttention fails to build on decode-shaped problems (and
    the reproducer's 3 queries over 5 keys); the defect listed for that adapter explains
    every failure the search reports, and no other adapter's."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    report = check_attention(pytorch.torch_flex_attention_dynamic, features=("causal",),
                             seed=0, max_examples=6, max_failures=1)  # fmt: skip
    (defect,) = pytorch.DEFECTS
    assert report.failures, str(report)
    name = "PyTorch FlexAttention (compiled, dynamic shapes)"
    assert all(defect.explains(name, f) for f in report.failures)
    assert not defect.explains("PyTorch FlexAttention (compiled)", report.failures[0])
    script = DEFECTS / defect.reproducer
    ran = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert "raised InductorError" in ran.stdout


def _flex_window_off_by_one(problem: Any) -> Any:
    """A wrong wrapper: eager FlexAttention with the window one key wider than asked (a
    mask_mod written ``q - k <= W``)."""
    if problem.window is None:
        return pytorch.torch_flex_attention(problem)
    return pytorch.torch_flex_attention(dataclasses.replace(problem, window=problem.window + 1))


def test_a_wrong_wrapper_around_eager_flex_attention_fails() -> None:
    pytest.importorskip("torch.nn.attention.flex_attention")
    report = check_attention(_flex_window_off_by_one, features=("causal", "window"), seed=0,
                             max_examples=60)  # fmt: skip
    assert not report.passed and report.failures, str(report)
    assert "window" in report.failures[0].features
