"""How quickly the verifier catches each deliberately wrong kernel, cache and backward.

Runs ``check_attention`` on every wrong kernel of ``refattn.testing.known_bugs.attention``,
``check_cache`` on every wrong cache of ``refattn.testing.known_bugs.caches`` and
``check_attention_backward`` on every wrong backward of
``refattn.testing.known_bugs.backward`` (rows ``backward: ...``), once per seed,
with the default number of examples (each wrong kernel or backward with the
features and dtypes its bug needs: ``known_bugs.KERNEL_FEATURES``,
``known_bugs.BACKWARD_KERNEL_FEATURES``), and prints for each
the number of seeds on which it was caught and the median and largest number of
problems drawn up to the first failure. The search stops there and does not
shrink (``max_failures=1``, no shrinking budget): what is measured is how soon a
bug is found. Correct kernels and caches, among them one that declares float16
scores (``float16_scores``, judged by its own precision contract), run the full
search in four dtypes on the same seeds and must never fail, once with the
default features and once with every option a problem has (``EVERY_OPTION``:
masks, bias, sinks, two-sided windows, latent shapes, in-op splits); the correct
backwards with every option a backward problem has (``EVERY_BACKWARD_OPTION``).

    python benchmarks/verifier_catch_rates.py --seeds 20
    python benchmarks/verifier_catch_rates.py --seeds 20 --only backward
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import refattn.testing.search
from refattn.testing import Report, check_attention, check_attention_backward, check_cache
from refattn.testing.known_bugs import (
    BACKWARD_KERNEL_FEATURES,
    CORRECT_BACKWARD_KERNELS,
    CORRECT_CACHES,
    EVERY_BACKWARD_OPTION,
    EVERY_OPTION,
    WRONG_BACKWARD_KERNELS,
    WRONG_CACHES,
)
from refattn.testing.known_bugs import CORRECT_KERNELS as CORRECT
from refattn.testing.known_bugs import KERNEL_FEATURES as FEATURES
from refattn.testing.known_bugs import WRONG_KERNELS as WRONG


def catch_row(name: str, check: Callable[[int], Report], seeds: range) -> str:
    start = time.perf_counter()
    needed = []
    for seed in seeds:
        report = check(seed)
        if not report.passed:
            needed.append(report.failures[0].examples)
    seconds = time.perf_counter() - start
    median = f"{statistics.median(needed):g}" if needed else "-"
    largest = str(max(needed)) if needed else "-"
    return f"| {name} | {len(needed)}/{len(seeds)} | {median} | {largest} | {seconds:.1f} |"


def _attention_report(
    fn: Callable[..., Any], dtypes: tuple[str, ...], seed: int, *, first: bool = False,
    features: frozenset[str] | None = None,
) -> Report:  # fmt: skip
    return check_attention(fn, dtypes=dtypes, seed=seed, features=features,
                           max_failures=1 if first else 5)  # fmt: skip


def _backward_report(
    fn: Callable[..., Any], dtypes: tuple[str, ...], seed: int, *, first: bool = False,
    features: frozenset[str] | None = None,
) -> Report:  # fmt: skip
    return check_attention_backward(fn, dtypes=dtypes, seed=seed, features=features,
                                    max_failures=1 if first else 5)  # fmt: skip


def _cache_report(
    factory: Callable[..., Any], dtypes: tuple[str, ...], seed: int, *, first: bool = False
) -> Report:
    return check_cache(factory, dtypes=dtypes, seed=seed, max_failures=1 if first else 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--only", default="", help="comma-separated parts of the names to run")
    args = parser.parse_args()
    seeds = range(args.seeds)
    wanted = [part for part in args.only.split(",") if part]

    def chosen(name: str) -> bool:
        return not wanted or any(part in name for part in wanted)

    print("| wrong kernel or cache | caught | median examples | most examples | seconds |")
    print("| --- | ---: | ---: | ---: | ---: |")
    shrink_budget = refattn.testing.search.SHRINK_BUDGET
    refattn.testing.search.SHRINK_BUDGET = 0  # how soon a bug is found, not how it shrinks
    for name, (fn, dtypes) in WRONG.items():
        if not chosen(name):
            continue
        check: Callable[[int], Report] = partial(
            _attention_report, fn, dtypes, first=True, features=FEATURES.get(name)
        )
        print(catch_row(name, check, seeds), flush=True)
    for name, factory in WRONG_CACHES.items():
        if not chosen(f"cache: {name}"):
            continue
        check = partial(_cache_report, factory, ("float32",), first=True)
        print(catch_row(f"cache: {name}", check, seeds), flush=True)
    for name, (fn, dtypes) in WRONG_BACKWARD_KERNELS.items():
        if not chosen(f"backward: {name}"):
            continue
        check = partial(_backward_report, fn, dtypes, first=True,
                        features=BACKWARD_KERNEL_FEATURES.get(name))  # fmt: skip
        print(catch_row(f"backward: {name}", check, seeds), flush=True)
    refattn.testing.search.SHRINK_BUDGET = shrink_budget
    print()
    print("| correct kernel or cache | flagged |")
    print("| --- | ---: |")
    dtypes = ("float64", "float32", "float16", "bfloat16")
    correct: dict[str, Callable[[int], Report]] = {}
    for name, fn in CORRECT.items():
        correct[name] = partial(_attention_report, fn, dtypes)
        correct[f"{name}, every option"] = partial(
            _attention_report, fn, dtypes, features=EVERY_OPTION
        )
    for name, factory in CORRECT_CACHES.items():
        correct[f"cache: {name}"] = partial(_cache_report, factory, ("float32", "float16"))
    for name, fn in CORRECT_BACKWARD_KERNELS.items():
        if name == "autograd_backward" and importlib.util.find_spec("torch") is None:
            continue
        correct[f"backward: {name}, every option"] = partial(
            _backward_report, fn, dtypes, features=EVERY_BACKWARD_OPTION
        )
    if importlib.util.find_spec("torch") is not None:
        from refattn.testing.adapters import torch_sdpa

        correct["torch_sdpa"] = partial(_attention_report, torch_sdpa, dtypes)
    for name, check in correct.items():
        if not chosen(name):
            continue
        flagged: list[Any] = [s for s in seeds if not check(s).passed]
        print(f"| {name} | {len(flagged)}/{len(seeds)} |", flush=True)


if __name__ == "__main__":
    main()
