"""How quickly the verifier catches each deliberately wrong kernel and cache.

Runs ``check_attention`` on every wrong kernel of ``refattn.tests.wrong_attention``
and ``check_cache`` on every wrong cache of ``refattn.tests.wrong_caches``,
once per seed, with the default number of examples, and prints for each the
number of seeds on which it was caught and the median and largest number of
problems drawn up to the first failure. Correct kernels and caches run on the
same seeds and must never fail.

    python benchmarks/verifier_catch_rates.py --seeds 21
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from refattn.testing import Report, check_attention, check_cache
from refattn.tests.wrong_attention import CORRECT, WRONG
from refattn.tests.wrong_caches import CORRECT_CACHES, WRONG_CACHES


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=21)
    seeds = range(parser.parse_args().seeds)
    print("| wrong kernel or cache | caught | median examples | most examples | seconds |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, (fn, dtypes) in WRONG.items():
        print(catch_row(name, lambda s, fn=fn, d=dtypes: check_attention(fn, dtypes=d, seed=s),
                        seeds), flush=True)  # fmt: skip
    for name, factory in WRONG_CACHES.items():
        print(catch_row(f"cache: {name}", lambda s, f=factory: check_cache(f, seed=s), seeds),
              flush=True)  # fmt: skip
    print()
    print("| correct kernel or cache | flagged |")
    print("| --- | ---: |")
    dtypes = ("float64", "float32", "float16", "bfloat16")
    correct: dict[str, Callable[[int], Report]] = {
        name: (lambda s, fn=fn: check_attention(fn, dtypes=dtypes, seed=s))
        for name, fn in CORRECT.items()
    }
    cache_dtypes = ("float32", "float16")
    correct |= {
        f"cache: {name}": (lambda s, f=factory: check_cache(f, dtypes=cache_dtypes, seed=s))
        for name, factory in CORRECT_CACHES.items()
    }
    try:
        from refattn.testing.adapters import torch_sdpa

        correct["torch_sdpa"] = lambda s: check_attention(torch_sdpa, dtypes=dtypes, seed=s)
    except ImportError:
        pass
    for name, check in correct.items():
        flagged: list[Any] = [s for s in seeds if not check(s).passed]
        print(f"| {name} | {len(flagged)}/{len(seeds)} |", flush=True)


if __name__ == "__main__":
    main()
