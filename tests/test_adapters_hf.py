"""transformers' attention functions, with the masks its masking_utils build, and its KV caches
agree with the spec; wrappers that make a caller's mistakes do not; the probes measure its
conventions; the reproducers of its defects still fail.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from refattn.testing import (
    CacheSpec,
    ProblemSpec,
    Report,
    check_attention,
    check_cache,
    check_problem,
    check_schedule,
)
from refattn.testing.adapters import hf, hf_caches

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning"),
    # transformers' modeling modules use torch.jit.script_method at import
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

DEFECTS_DIR = Path(__file__).resolve().parent.parent / "docs" / "defects"
ATTENTION = [(i, d) for i in hf.IMPLEMENTATIONS for d in i.dtypes]


def _known(report: Report, name: str, defects: tuple[Any, ...]) -> list[Any]:
    """The failures of ``report`` that no written-up defect explains."""
    return [f for f in report.failures if not any(d.explains(name, f) for d in defects)]


@pytest.mark.parametrize("implementation, dtype", ATTENTION,
                         ids=[f"{i.name.split()[1]}-{d}" for i, d in ATTENTION])  # fmt: skip
def test_each_attention_adapter_agrees_with_the_spec_in_each_dtype(
    implementation: Any, dtype: str
) -> None:
    features = set(implementation.features)
    if implementation.target is hf.transformers_eager and dtype == "float16":
        features.discard("large_logits")  # its float16 q.k overflows: test_adapters pins it
    report = check_attention(implementation.target, dtypes=[dtype], features=features, seed=0,
                             max_examples=60)  # fmt: skip
    assert not _known(report, implementation.name, hf.DEFECTS), str(report)
    assert report.ignored_rows.get(dtype, 0) > 0, str(report)  # padding queries were drawn


def test_packed_documents_go_through_transformers_packing_detection() -> None:
    """Causal packed documents, Sq = Sk: transformers finds them from restarting positions."""
    spec = ProblemSpec(q_len=9, k_len=9, causal=True, mask=True, mask_kind="document", seed=3)
    for adapter in (hf.transformers_sdpa, hf.transformers_eager, hf.transformers_flex):
        assert check_problem(adapter, spec).passed, adapter


def _without_padding(problem: Any) -> Any:
    """A wrong wrapper: the mask is asked for without the batch's attention_mask."""
    return hf._transformers(problem, "sdpa", padding=False)


def _one_token_too_many(problem: Any) -> Any:
    """A wrong wrapper: the cache is given one new token as past (the queries one too late)."""
    return hf._transformers(problem, "sdpa", past_shift=1)


@pytest.mark.parametrize("wrong", [_without_padding, _one_token_too_many])
def test_a_wrapper_making_a_callers_mistake_fails(wrong: Any) -> None:
    report = check_attention(wrong, dtypes=["float32"], features={"causal", "ragged"}, seed=0,
                             max_examples=60)  # fmt: skip
    assert not report.passed, str(report)


def test_the_sliding_window_of_one_defect_is_what_the_check_finds() -> None:
    spec = ProblemSpec(k_len=2, causal=True, window=1, seed=0)
    outcome = check_problem(hf.transformers_sdpa, spec)
    assert outcome.failed and outcome.symptom == "wrong out", outcome
    report = check_attention(hf.transformers_sdpa, dtypes=["float32"], seed=0,
                             features={"causal", "window"}, max_examples=100)  # fmt: skip
    assert report.failures, "a window of 1 with a past was not drawn"
    assert not _known(report, hf.IMPLEMENTATIONS[0].name, hf.DEFECTS)


def test_probes_measure_transformers_conventions() -> None:
    found = {i.name.split()[1]: i.probe() for i in hf.IMPLEMENTATIONS if i.probe}
    assert {f["alignment"] for f in found.values()} == {"bottom-right"}
    assert found["eager_attention_forward"]["empty_row"] == "mean of V"  # its min-value mask
    assert found["sdpa_attention_forward"]["empty_row"] == "0"
    assert found["eager_attention_forward"]["scores"].startswith("float16")
    assert found["sdpa_attention_forward"]["scores"] == "float32 or wider"
    assert all(f["window"] == "sliding_window=2 keeps q-1 .. q (2 keys)" for f in found.values())
    assert all(f["lse"] == "not returned" for f in found.values())


# -- caches ---------------------------------------------------------------------------------

UNAVAILABLE = (hf_caches.quanto_quantized_cache, hf_caches.hqq_quantized_cache)
CACHES = [(i, d) for i in hf_caches.IMPLEMENTATIONS for d in i.dtypes
          if i.target not in UNAVAILABLE]  # fmt: skip


@pytest.mark.parametrize("implementation, dtype", CACHES,
                         ids=[f"{i.name}-{d}" for i, d in CACHES])  # fmt: skip
def test_each_cache_decodes_as_full_attention_in_each_dtype(
    implementation: Any, dtype: str
) -> None:
    report = check_cache(implementation.target, backend="torch", dtypes=[dtype], seed=0,
                         max_examples=30, **implementation.options)  # fmt: skip
    unexplained = _known(report, implementation.name, hf_caches.DEFECTS)
    assert not unexplained, str(report)


def test_the_fp8_cache_fails_only_by_clipping_later_tokens() -> None:
    """A history of one update is quantized under its own scale and passes; later updates
    larger than the first are clipped, which is the written-up defect."""
    fp8 = next(i for i in hf_caches.IMPLEMENTATIONS if i.target is hf_caches.fp8_quantized_cache)
    report = check_cache(fp8.target, backend="torch", seed=0, max_examples=60, **fp8.options)
    assert report.failures, str(report)  # the defect shows
    assert not _known(report, fp8.name, hf_caches.DEFECTS), str(report)
    for seed in range(5):
        prefill = CacheSpec(steps=(8,), format="e4m3", scales="tensor", may_alias=True,
                            seed=seed)  # fmt: skip
        assert check_schedule(fp8.target, prefill, backend="torch", config=hf_caches.FULL).passed


class _FullBuffer(hf_caches.WithPositions):
    """A wrong wrapper: reads a static buffer as if it were full, its n slots the latest n
    tokens (as a dynamic layer's are), so the filled slots get positions shifted back.
    (Numbering the empty slots past the filled ones instead would not be wrong: causal
    queries never see positions after their own.)"""

    def update(self, k_new: Any, v_new: Any, layer_idx: int) -> tuple[Any, Any, Any]:
        k, v = self.cache.update(k_new, v_new, layer_idx)
        seen = int(self.cache.get_seq_length(layer_idx))
        return k, v, torch.arange(seen - k.shape[2], seen)


def _full_buffer(*, max_len: int, config: Any = None) -> Any:
    return _FullBuffer(hf_caches.static_cache(max_len=max_len, config=config).cache)


def test_a_static_cache_read_as_full_fails() -> None:
    report = check_cache(_full_buffer, backend="torch", config=hf_caches.FULL, seed=0,
                         max_examples=30)  # fmt: skip
    assert not report.passed


def test_a_sliding_layer_read_with_the_wrong_window_fails() -> None:
    """The hybrid cache's sliding layer keeps a window of 4; attending with 5 is wrong."""
    options: dict[str, Any] = {**hf_caches._HYBRID_OPTIONS, "window": hf_caches.WINDOW + 1}
    report = check_cache(hf_caches.dynamic_cache, backend="torch", seed=0, max_examples=30,
                         **options)  # fmt: skip
    assert not report.passed


@pytest.mark.parametrize("factory", [hf_caches.quanto_quantized_cache,
                                     hf_caches.hqq_quantized_cache])  # fmt: skip
def test_backends_needing_a_missing_package_are_unavailable(factory: Any) -> None:
    report = check_cache(factory, backend="torch", config=hf_caches.FULL, max_examples=2)
    assert report.unavailable or not report.failures, str(report)


@pytest.mark.parametrize("defect", [*hf.DEFECTS[:1], *hf_caches.DEFECTS],
                         ids=lambda d: d.reproducer)  # fmt: skip
def test_each_reproducer_exits_1_while_the_defect_is_there(defect: Any) -> None:
    script = DEFECTS_DIR / defect.reproducer
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
