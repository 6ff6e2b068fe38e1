"""onnxruntime: the CPU Attention kernel rejects an attn_mask shorter than the total sequence
length, which the operator's schema says is padded with -inf.

ONNX's ``Attention`` (opsets 23 to 25) says of ``attn_mask``: "The last dimension can also be
shorter than ``total_sequence_length`` and will be padded to ``total_sequence_length`` with
negative infinity" (False for a boolean mask). onnxruntime's CPU kernel instead fails in
``ComputeOutputShapeForAttention`` with "inconsistent total_sequence_length (between attn_mask
and past_key and past_value)" (``core/providers/cpu/llm/attention_helper.h``); for float64,
where onnxruntime runs the operator's function body, the mask's ``Add`` fails to broadcast.
``onnx.reference`` pads the mask as the schema says.

Here one query attends to four keys with a boolean mask of two columns: keys 2 and 3 are
padded out, so the output is the softmax over keys 0 and 1 of the values, computed by hand in
float64. Needs only onnx, onnxruntime and NumPy. Exits 1 while the defect is there, 0 once it
is fixed.
"""

import sys

import numpy as np
import onnxruntime
from onnx import TensorProto, helper

rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 1, n, 8)).astype(np.float32) for n in (1, 4, 4))
mask = np.array([[[[True, True]]]])  # (1, 1, 1, 2): two columns of four

scores = q[0, 0].astype(np.float64) @ k[0, 0, :2].T.astype(np.float64) / np.sqrt(8)
weights = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
expected = weights @ v[0, 0, :2].astype(np.float64)  # (1, 8)

node = helper.make_node("Attention", ["Q", "K", "V", "attn_mask"], ["Y"])
inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["b", "h", name, "d"])
          for name in ("Q", "K", "V")]  # fmt: skip
inputs.append(helper.make_tensor_value_info("attn_mask", TensorProto.BOOL, [1, 1, 1, 2]))
output = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
graph = helper.make_graph([node], "short_mask", inputs, [output])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
model.ir_version = 10
session = onnxruntime.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])  # fmt: skip
print("float64 by hand:", np.round(expected[0, :4], 4))
try:
    (out,) = session.run(None, {"Q": q, "K": k, "V": v, "attn_mask": mask})
except Exception as exc:  # onnxruntime's Fail
    print("onnxruntime:     raised", type(exc).__name__)
    print("   ", str(exc).split("was false.")[-1].strip()[:120])
    sys.exit(1)
error = float(np.abs(out[0, 0] - expected).max())
print("onnxruntime:    ", np.round(out[0, 0, 0, :4], 4), f"(error {error:.1e})")
sys.exit(0 if error < 1e-5 else 1)
