"""onnxruntime: MultiHeadAttention's (com.microsoft) unidirectional mask on the CPU leaves the
last query unmasked when ``key`` has more tokens than ``query``.

``unidirectional`` is "Whether every token can only attend to previous tokens". The CPU
kernel lets query i see keys up to ``past_sequence_length + i`` for every query but the last,
which it does not mask at all: with 2 queries over 4 keys and no past, query 0 sees key 0
(top-left, query i at position i) while query 1 sees all 4 keys (neither top-left, where it
would see keys 0 and 1, nor bottom-right, where query 0 would see keys 0 to 2). When ``key``
has as many tokens as ``query`` the two coincide, which is why self-attention is right.

Expected (float64, by hand): q and k zeros, v the identity, so each output row is the mean of
the unit vectors of the keys that query sees. Query i sees keys 0 .. i, as query 0 does:
row 1 is (1/2, 1/2, 0, 0). Exits 1 while the defect is there, 0 once it is fixed.
"""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime
from onnx import TensorProto, helper


def main() -> int:
    Sq, Sk, D = 2, 4, 4
    q = np.zeros((1, Sq, D), dtype=np.float32)  # (B, S, H * D)
    k = np.zeros((1, Sk, D), dtype=np.float32)
    v = np.eye(Sk, D, dtype=np.float32)[None]  # key j's value is the unit vector e_j

    node = helper.make_node("MultiHeadAttention", ["query", "key", "value"], ["output"],
                            domain="com.microsoft", num_heads=1, unidirectional=1)  # fmt: skip
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", f"s_{n}", "d"])
              for n in ("query", "key", "value")]  # fmt: skip
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["b", "s", "d"])]
    graph = helper.make_graph([node], "g", inputs, outputs)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])  # fmt: skip
    got = session.run(None, {"query": q, "key": k, "value": v})[0][0].astype(np.float64)

    # float64 by hand: query i sees keys 0 .. i (past_sequence_length 0 + i).
    seen = np.arange(Sk)[None, :] <= np.arange(Sq)[:, None]
    expected = seen / seen.sum(axis=1, keepdims=True)
    print(f"onnxruntime: {np.round(got, 4).tolist()}")
    print(f"by hand:     {np.round(expected, 4).tolist()}")
    return 0 if np.allclose(got, expected, atol=1e-6) else 1


if __name__ == "__main__":
    sys.exit(main())
