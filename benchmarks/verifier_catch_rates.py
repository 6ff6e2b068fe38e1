"""How quickly the verifier catches each deliberately wrong kernel and cache.

Runs ``check_attention`` on every wrong kernel of ``refattn.testing.known_bugs.attention``
and ``check_cache`` on every wrong cache of ``refattn.testing.known_bugs.caches``,
once per seed, with the default number of examples, and prints for each the
number of seeds on which it was caught and the median and largest number of
problems drawn up to the first failure. Correct kernels and caches run on the
same seeds and must never fail.

    python benchmarks/verifier_catch_rates.py --seeds 21
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from refattn.testing import Report, check_attention, check_cache
from refattn.testing.known_bugs import CORRECT_CACHES, WRONG_CACHES
from refattn.testing.known_bugs import CORRECT_KERNELS as CORRECT
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


def _attention_report(fn: Callable[..., Any], dtypes: tuple[str, ...], seed: int) -> Report:
    return check_attention(fn, dtypes=dtypes, seed=seed)


def _cache_report(factory: Callable[..., Any], dtypes: tuple[str, ...], seed: int) -> Report:
    return check_cache(factory, dtypes=dtypes, seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=21)
    seeds = range(parser.parse_args().seeds)
    print("| wrong kernel or cache | caught | median examples | most examples | seconds |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, (fn, dtypes) in WRONG.items():
        check: Callable[[int], Report] = partial(_attention_report, fn, dtypes)
        print(catch_row(name, check, seeds), flush=True)
    for name, factory in WRONG_CACHES.items():
        check = partial(_cache_report, factory, ("float32",))
        print(catch_row(f"cache: {name}", check, seeds), flush=True)
    print()
    print("| correct kernel or cache | flagged |")
    print("| --- | ---: |")
    dtypes = ("float64", "float32", "float16", "bfloat16")
    correct: dict[str, Callable[[int], Report]] = {
        name: partial(_attention_report, fn, dtypes) for name, fn in CORRECT.items()
    }
    for name, factory in CORRECT_CACHES.items():
        correct[f"cache: {name}"] = partial(_cache_report, factory, ("float32", "float16"))
    if importlib.util.find_spec("torch") is not None:
        from refattn.testing.adapters import torch_sdpa

        correct["torch_sdpa"] = partial(_attention_report, torch_sdpa, dtypes)
    for name, check in correct.items():
        flagged: list[Any] = [s for s in seeds if not check(s).passed]
        print(f"| {name} | {len(flagged)}/{len(seeds)} |", flush=True)


if __name__ == "__main__":
    main()
