"""flash-attn's backward through its adapters agrees with the spec's gradients.

flash-attn needs CUDA and the flash_attn package. Without them the search on
the real kernel skips, and the adapters are checked against the CPU model of
flash-attn's API the forward adapters are checked against
(``tests/test_adapters.py``'s ``_FlashModel``: flash-attn's documented
conventions in plain torch), differentiated by ``torch.autograd``: what that
proves is the translation, refattn's problem said in flash-attn's terms and
its gradients brought back, which is all the adapters add to flash-attn's
own backward.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import pytest

from refattn.testing import (
    ProblemSpec,
    Report,
    Unavailable,
    Unsupported,
    check_attention_backward,
    make_backward_problem,
)
from refattn.testing.adapters import flash, flash_backward

torch = pytest.importorskip("torch")

from tests.test_adapters import _FlashModel  # noqa: E402

SEED = 0
#: Each backward adapter, what to draw for it and the share of draws it must express
#: (as for the forward adapters: flash_attn_func takes the default positions only;
#: packed rows take every layout numbered from 0 with the queries at the end).
BACKWARD_ADAPTERS = pytest.mark.parametrize(
    ("adapter", "features", "share"),
    [
        (flash_backward.flash_attn_func_backward, flash_backward.FLASH_BACKWARD_FEATURES, 0.9),
        (flash_backward.flash_attn_varlen_func_backward,
         flash_backward.FLASH_VARLEN_BACKWARD_FEATURES, 0.35),
    ],
    ids=["flash_attn_func", "flash_attn_varlen_func"],
)  # fmt: skip


def _supported_share(report: Report, dtype: str) -> float:
    return report.supported(dtype) / max(1, report.tried(dtype))


def _flash_usable() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


@pytest.fixture
def flash_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The forward adapters call the CPU model in place of flash_attn, on the CPU."""
    monkeypatch.setattr(flash, "_flash_attn_module", _FlashModel)
    monkeypatch.setattr(flash, "_cuda_device", lambda problem: "cpu")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@BACKWARD_ADAPTERS
def test_flash_backward_adapters_map_refattn_onto_flash_attn_conventions(
    adapter: Callable[..., Any],
    features: tuple[str, ...],
    share: float,
    dtype: str,
    flash_on_the_cpu: None,
) -> None:
    """Against the model, the gradients of the positions, windows, softcap, ALiBi and GQA
    the adapters say in flash-attn's terms are the spec's."""
    report = check_attention_backward(adapter, dtypes=[dtype], features=features, seed=SEED,
                                      max_examples=60)  # fmt: skip
    assert report.passed, str(report)
    assert _supported_share(report, dtype) >= share, str(report)
    assert report.counts[dtype]["softcap"].passed >= 5, str(report)


class _FlashModelSoftcapNotDifferentiated(_FlashModel):
    """A wrong flash-attn backward, for the adapters to be caught on: its forward caps the
    scores, its gradients are those of the uncapped attention (a backward that ignores
    ``softcap``)."""

    def flash_attn_func(
        self, q: Any, k: Any, v: Any, softmax_scale: float, causal: bool,
        window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Any = None,
        return_attn_probs: bool = False,
    ) -> Any:  # fmt: skip
        def call(cap: float) -> Any:
            return super(_FlashModelSoftcapNotDifferentiated, self).flash_attn_func(
                q, k, v, softmax_scale, causal, window_size, cap, alibi_slopes, return_attn_probs
            )

        capped, uncapped = call(softcap), call(0.0)
        return uncapped + (capped - uncapped).detach()  # capped values, uncapped gradients


def test_a_flash_backward_that_drops_the_softcap_derivative_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(flash, "_flash_attn_module", _FlashModelSoftcapNotDifferentiated)
    monkeypatch.setattr(flash, "_cuda_device", lambda problem: "cpu")
    report = check_attention_backward(flash_backward.flash_attn_func_backward, seed=SEED,
                                      dtypes=["float16"], features=("softcap", "causal"),
                                      max_examples=30)  # fmt: skip
    assert not report.passed and report.failures, str(report)
    assert "softcap" in report.failures[0].features


def test_flash_backward_refuses_what_flash_attn_cannot_say(flash_on_the_cpu: None) -> None:
    """Bias, mask and sink logits are refused by the forward adapter before any gradient."""
    for spec in (ProblemSpec(bias=True), ProblemSpec(mask=True), ProblemSpec(sink_logits=True)):
        problem = make_backward_problem(spec, dtype="float16")
        with pytest.raises(Unsupported, match="flash-attn 2 takes no"):
            flash_backward.flash_attn_func_backward(problem)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@BACKWARD_ADAPTERS
def test_flash_backward_agrees_with_the_spec(
    adapter: Callable[..., Any], features: tuple[str, ...], share: float, dtype: str
) -> None:
    if not _flash_usable():
        pytest.skip("needs flash_attn and a CUDA GPU")
    report = check_attention_backward(adapter, backend="torch", device="cuda:0", dtypes=[dtype],
                                      features=features, seed=SEED)  # fmt: skip
    assert report.passed, str(report)
    assert _supported_share(report, dtype) >= share, str(report)


def test_flash_backward_adapters_without_flash_attn_are_unavailable() -> None:
    if _flash_usable():
        pytest.skip("flash_attn and CUDA are usable here")
    problem = make_backward_problem(ProblemSpec(), dtype="float16")
    for adapter in (flash_backward.flash_attn_func_backward,
                    flash_backward.flash_attn_varlen_func_backward):  # fmt: skip
        with pytest.raises(Unavailable, match=r"flash_attn is not installed|needs CUDA"):
            adapter(problem)
        report = check_attention_backward(adapter, dtypes=("float16",), max_examples=5, seed=0)
        assert report.unavailable and not report.failures and not report.passed
