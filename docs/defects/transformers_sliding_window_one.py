"""transformers: a sliding window of 1 keeps every past token, and the mask sized for one key
broadcasts over all of them.

``DynamicSlidingWindowLayer.update`` keeps "the last ``self.sliding_window - 1`` tokens"
(transformers/cache_utils.py, ``self.keys = full_key_states[:, :, -self.sliding_window + 1 :,
:]``). With ``sliding_window=1`` that slice is ``[-0:]``, which is every token: the layer
keeps the whole history, while its ``get_mask_sizes`` says the next step sees one key
(``kv_length = self.sliding_window - 1 + query_length``). The (B, 1, 1, 1) mask that
``create_sliding_window_causal_mask`` builds from those sizes then broadcasts over every key
the layer returns, and the decoded token attends to the whole past instead of itself.

Expected (float64, by hand): with a window of 1, the query at position 1 sees only key 1, so
its output is v[1]. Exits 1 while the defect is there, 0 once it is fixed.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch
import transformers
from transformers import masking_utils
from transformers.integrations.sdpa_attention import sdpa_attention_forward


def main() -> int:
    config = transformers.MistralConfig(
        num_hidden_layers=1, sliding_window=1, num_attention_heads=1, num_key_value_heads=1,
        head_dim=2, hidden_size=2, intermediate_size=2, vocab_size=2, eos_token_id=None,
        bos_token_id=None,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    k = torch.zeros(1, 1, 2, 2)
    v = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # v[0] = e0, v[1] = e1
    q = torch.zeros(1, 1, 1, 2)

    cache = transformers.DynamicCache(config=config)
    cache.update(k[:, :, :1], v[:, :, :1], 0)  # the prompt: token 0
    mask = masking_utils.create_sliding_window_causal_mask(
        config, torch.zeros(1, 1, 2), None, cache
    )  # the next token, position 1
    k_all, v_all = cache.update(k[:, :, 1:], v[:, :, 1:], 0)
    module: Any = torch.nn.Module().eval()  # what the attention function reads of its layer
    module.num_key_value_groups, module.is_causal = 1, True
    out, _ = sdpa_attention_forward(module, q, k_all, v_all, mask, scaling=1.0)

    expected = np.array([0.0, 1.0])  # float64 by hand: only key 1 is in a window of 1
    got = out[0, 0, 0].double().numpy()
    print(f"keys returned by the sliding layer: {k_all.shape[2]} (a window of 1 needs 1)")
    print(f"mask shape from get_mask_sizes: {tuple(mask.shape)}")
    print(f"transformers: {got.tolist()}")
    print(f"by hand:      {expected.tolist()}")
    return 0 if np.allclose(got, expected, atol=1e-6) else 1


if __name__ == "__main__":
    sys.exit(main())
