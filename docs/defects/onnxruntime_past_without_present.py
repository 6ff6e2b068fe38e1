"""onnxruntime: GroupQueryAttention and MultiHeadAttention (com.microsoft) on the CPU misread
``past_key`` and ``past_value`` when ``present_key`` and ``present_value`` are not asked for.

Both schemas make the present outputs optional, and the past inputs are the past state the
attention reads. Run with a past and with only ``output`` in the graph, the CPU kernels
return NaN or wrong values; the same call with the present outputs in the graph returns the
attention over the past keys and the new ones. (GroupQueryAttention checks this for its
``query_seqlens`` input, "query_seqlens requires the present_key and present_value outputs",
but not without it.)

Expected (float64, by hand): one query over 2 past keys and 1 new key, the causal (here:
every key) softmax of q.k / sqrt(8) times the values. Exits 1 while the defect is there, 0
once it is fixed.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import onnxruntime
from onnx import TensorProto, helper


def run(op: str, feeds: dict[str, np.ndarray], order: list[str], attributes: dict[str, Any],
        outputs: list[str]) -> np.ndarray:  # fmt: skip
    """``op`` of domain com.microsoft on the CPU provider, in a one-node model."""
    names = [name if name in feeds else "" for name in order]
    while not names[-1]:
        names.pop()
    node = helper.make_node(op, names, outputs, domain="com.microsoft", **attributes)

    def info(name: str, rank: int) -> Any:
        int32 = name in feeds and feeds[name].dtype == np.int32
        kind = TensorProto.INT32 if int32 else TensorProto.FLOAT
        return helper.make_tensor_value_info(name, kind, [f"{name}{i}" for i in range(rank)])

    ranks = {"output": 3, "present_key": 4, "present_value": 4}
    graph = helper.make_graph([node], "g", [info(n, feeds[n].ndim) for n in names if n],
                              [info(n, ranks[n]) for n in outputs])  # fmt: skip
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])  # fmt: skip
    return session.run(None, feeds)[0]


def main() -> int:
    rng = np.random.default_rng(0)
    D, P = 8, 2  # head size, past length
    q = rng.standard_normal((1, 1, D)).astype(np.float32)  # (B, S, H * D)
    k = rng.standard_normal((1, 1, D)).astype(np.float32)  # the new token
    v = rng.standard_normal((1, 1, D)).astype(np.float32)
    past_k = rng.standard_normal((1, 1, P, D)).astype(np.float32)  # (B, H, P, D)
    past_v = rng.standard_normal((1, 1, P, D)).astype(np.float32)

    keys = np.concatenate([past_k[0, 0], k[0]]).astype(np.float64)  # (P + 1, D)
    values = np.concatenate([past_v[0, 0], v[0]]).astype(np.float64)
    scores = keys @ q[0, 0].astype(np.float64) / np.sqrt(D)
    weights = np.exp(scores - scores.max())
    expected = weights / weights.sum() @ values  # float64, by hand

    gqa_order = ["query", "key", "value", "past_key", "past_value", "seqlens_k",
                 "total_sequence_length"]  # fmt: skip
    gqa_feeds = {"query": q, "key": k, "value": v, "past_key": past_k, "past_value": past_v,
                 "seqlens_k": np.array([P], dtype=np.int32),
                 "total_sequence_length": np.array(P + 1, dtype=np.int32)}  # fmt: skip
    mha_order = ["query", "key", "value", "bias", "key_padding_mask", "attention_bias",
                 "past_key", "past_value"]  # fmt: skip
    mha_feeds = {"query": q, "key": k, "value": v, "past_key": past_k, "past_value": past_v}
    cases: list[tuple[str, dict[str, np.ndarray], list[str], dict[str, Any]]] = [
        ("GroupQueryAttention", gqa_feeds, gqa_order, {"num_heads": 1, "kv_num_heads": 1}),
        ("MultiHeadAttention", mha_feeds, mha_order, {"num_heads": 1}),
    ]
    wrong = False
    print(f"by hand:                      {np.round(expected, 5).tolist()}")
    for op, feeds, order, attributes in cases:
        with_present = run(op, feeds, order, attributes,
                           ["output", "present_key", "present_value"])[0, 0]  # fmt: skip
        output_only = run(op, feeds, order, attributes, ["output"])[0, 0]
        print(f"{op}, present asked for: {np.round(with_present, 5).tolist()}")
        print(f"{op}, output only:       {np.round(output_only, 5).tolist()}")
        wrong |= not np.allclose(output_only, expected, atol=1e-5)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
