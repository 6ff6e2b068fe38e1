"""onnx.reference: the Attention operator raises on keys and values of zero tokens instead of
returning the zero rows the schema gives a query with no key to attend.

ONNX's ``Attention`` (opsets 23 to 25) says: "A fully-masked query row (no key attended ...)
produces a zero output row, not ``NaN``". With ``K`` and ``V`` of zero tokens (an empty cache
and no new token, or a batch whose every row is padding) every query attends no key, so ``Y``
is zeros. ``onnx.reference.ReferenceEvaluator`` instead raises NumPy's "zero-size array to
reduction operation maximum which has no identity" from the reduction over the keys
(``onnx/reference/ops/op_attention.py``).

Needs only onnx and NumPy. Exits 1 while the defect is there, 0 once it is fixed.
"""

import sys
from typing import Any

import numpy as np
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

q = np.ones((1, 1, 2, 8), dtype=np.float32)
k = np.zeros((1, 1, 0, 8), dtype=np.float32)
v = np.zeros((1, 1, 0, 8), dtype=np.float32)
expected = np.zeros((1, 1, 2, 8))  # no key: the schema's zero row

node = helper.make_node("Attention", ["Q", "K", "V"], ["Y"])
inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["b", "h", name, "d"])
          for name in ("Q", "K", "V")]  # fmt: skip
output = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
graph = helper.make_graph([node], "zero_keys", inputs, [output])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
model.ir_version = 10
print("float64 by hand: zeros of shape", expected.shape)
try:
    outputs: Any = ReferenceEvaluator(model).run(None, {"Q": q, "K": k, "V": v})
    out = np.asarray(outputs[0])
except ValueError as exc:
    print("onnx.reference:  raised ValueError:", exc)
    sys.exit(1)
error = float(np.abs(out - expected).max())
print("onnx.reference: ", out.shape, f"(error {error:.1e})")
sys.exit(0 if error == 0 else 1)
