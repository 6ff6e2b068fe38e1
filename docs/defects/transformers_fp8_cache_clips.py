"""transformers: the fp8 KV cache clips every later token larger than the first update.

``Fp8QuantizedLayer`` (``QuantizedCache(backend="fp8")``) calibrates one scale per layer,
``max |x| / 448``, on the first ``update`` and freezes it: "The per-tensor scale is frozen
after the first `update`, so new states are appended as-is" (transformers/cache_utils.py,
``Fp8QuantizedLayer``). A later key or value larger than anything in the first update is
divided by that scale, lands past e4m3's largest value 448, and torch's cast to
``float8_e4m3fn`` saturates it: it is read back as the first update's maximum. After a
one-token prompt, every decoded token that is larger than the prompt's is clipped.

Expected (float64, by hand): e4m3 stores a value within 2^-4 of itself, so the second key,
4.0, reads back within 0.25 of 4.0. Exits 1 while the defect is there, 0 once it is fixed.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import transformers


def main() -> int:
    config = transformers.LlamaConfig(
        num_hidden_layers=1, hidden_size=8, num_attention_heads=1, num_key_value_heads=1,
        head_dim=8, intermediate_size=8, vocab_size=8, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    cache = transformers.QuantizedCache(backend="fp8", config=config)
    first = torch.ones(1, 1, 1, 8)  # the prompt: one token, |x| = 1
    later = torch.full((1, 1, 1, 8), 4.0)  # the next token, four times as large
    cache.update(first, first, 0)
    keys, _ = cache.update(later, later, 0)

    got = keys[0, 0, 1].double().numpy()
    expected = np.full(8, 4.0)  # float64 by hand; e4m3 holds 4.0 exactly under any scale
    bound = 2.0**-4 * 4.0
    print(f"transformers: second key read back as {got.tolist()}")
    print(f"by hand:      {expected.tolist()} (e4m3 allows {bound} of error)")
    return 0 if np.all(np.abs(got - expected) <= bound) else 1


if __name__ == "__main__":
    sys.exit(main())
