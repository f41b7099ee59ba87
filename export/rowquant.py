"""Gemm -> int8 with a scale per row, computed at run time (used by `export.onnx --int8`).

Static QDQ (export.quantize) gives an activation one fixed scale for every stream. The posterior
heads and the Mahalanobis scorers write the outputs themselves, and a fixed scale cost them too
much accuracy. Here each row of the Gemm's input (one frame of one stream) gets its own scale from
its own largest magnitude, so a stream's frames still never depend on the other streams of a
batch, and the error stays near the 8-bit rounding of that row:

    s      = max(|x_row|, tiny) / 255 (a Relu's output, >= 0)  or  / 127 (signed input, zero point 128)
    x_q    = QuantizeLinear(x, s per row)                      uint8
    acc    = MatMulInteger(x_q, W_q [, zero point 128])        int32, W_q in [-63, 63] per output column
    y      = float(acc) * w_scale * s + bias

Weights use 7 of the 8 bits (W_MAX = 63). On x86 CPUs without VNNI, onnxruntime's uint8 x int8
kernels add each pair of products in int16 (vpmaddubsw), which saturates once 2 * 255 * |w|
exceeds 32767: with full int8 weights the same graph gave errors of tens of percent on such a CPU
(an AVX2-only AMD EPYC) and none on one with VNNI. With |w| <= 63 no pair can saturate, so an
exported int8 model computes the same numbers on every x86 CPU it is served on.

Two-part weights (the `two_part` Gemms): W ~ W_q * w_scale + W_lo * w_scale / (2 * W_MAX), W_lo the
7-bit rounding of what W_q's rounding left, so a weight keeps about 13 bits. Both parts go through ONE
MatMulInteger (columns side by side) whose two halves are added after their column scales; it
costs twice the int8 work of one part.

The per-row product is applied after the per-column one: onnxruntime's MatMulIntegerToFloat
fusion folds MatMulInteger, Cast and the Mul after them into one kernel, correct for a per-column
scale but not for a per-row one (docs/benchmarks.md has the error it caused). tests/test_quantize.py
checks the rewritten Gemm against numpy's integer arithmetic.
"""
from __future__ import annotations

import numpy as np

_PASS_THROUGH = {"Reshape", "Flatten", "Identity", "Squeeze", "Unsqueeze"}
W_MAX = 63  # largest weight magnitude: no int16 pair sum can saturate (module docstring)


def _non_negative(producers: dict, tensor: str) -> bool:
    """Whether the tensor is a Relu's output, maybe reshaped (producers: output name -> node)."""
    node = producers.get(tensor)
    while node is not None and node.op_type in _PASS_THROUGH:
        node = producers.get(node.input[0])
    return node is not None and node.op_type == "Relu"


def rowquant_gemms(model, names: list[str], two_part: frozenset[str] = frozenset()) -> list[str]:
    """Rewrite the named Gemm nodes (2-D input, constant weight and bias, no transA, alpha = beta =
    1) in place; returns the names rewritten. Those also in `two_part` get each weight as the sum of two
    int8 parts (the second one quantizes what the first one's rounding left)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}  # the Gemms' inputs are not rewritten
    done = []
    for node in list(graph.node):
        if node.op_type != "Gemm" or node.name not in names:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            continue
        if node.input[1] not in inits or (len(node.input) > 2 and node.input[2] not in inits):
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        if attrs.get("transB", 0):
            w = w.T
        bias = (numpy_helper.to_array(inits[node.input[2]]).astype(np.float32) if len(node.input) > 2
                else np.zeros(w.shape[1], np.float32))
        w_scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / W_MAX
        w_q = np.clip(np.round(w / w_scale), -W_MAX, W_MAX).astype(np.int8)
        split = node.name in two_part
        if split:
            lo_scale = w_scale / (2.0 * W_MAX)
            w_lo = np.clip(np.round((w - w_q * w_scale) / lo_scale), -W_MAX, W_MAX).astype(np.int8)
            w_q = np.concatenate([w_q, w_lo], axis=1)
            w_scale = np.concatenate([w_scale, lo_scale])
        unsigned = _non_negative(producers, node.input[0])
        p = node.name.strip("/").replace("/", "_") + "_rq"
        x, y = node.input[0], node.output[0]
        new_inits = [numpy_helper.from_array(w_q, f"{p}_w"),
                     numpy_helper.from_array(w_scale.astype(np.float32), f"{p}_ws"),
                     numpy_helper.from_array(bias, f"{p}_b"),
                     numpy_helper.from_array(np.array(1e-12, np.float32), f"{p}_tiny"),
                     numpy_helper.from_array(np.array(255.0 if unsigned else 127.0, np.float32), f"{p}_levels"),
                     numpy_helper.from_array(np.array([1], np.int64), f"{p}_axis1")]
        # unsigned: no Abs, and QuantizeLinear's default zero point (0, uint8); signed: a per-row
        # zero point of 128, which must have the scale's shape
        nodes = [] if unsigned else [helper.make_node("Abs", [x], [f"{p}_abs"], name=f"{p}/Abs")]
        nodes += [
            helper.make_node("ReduceMax", [x if unsigned else f"{p}_abs"], [f"{p}_max"], name=f"{p}/ReduceMax",
                             axes=[1], keepdims=0),
            helper.make_node("Max", [f"{p}_max", f"{p}_tiny"], [f"{p}_max1"], name=f"{p}/Max"),
            helper.make_node("Div", [f"{p}_max1", f"{p}_levels"], [f"{p}_s"], name=f"{p}/Div"),
        ]
        if unsigned:
            nodes += [
                helper.make_node("QuantizeLinear", [x, f"{p}_s"], [f"{p}_xq"], name=f"{p}/Quantize", axis=0),
                helper.make_node("MatMulInteger", [f"{p}_xq", f"{p}_w"], [f"{p}_acc"], name=f"{p}/MatMul"),
            ]
        else:
            new_inits.append(numpy_helper.from_array(np.array(128, np.uint8), f"{p}_azp"))
            nodes += [
                helper.make_node("Shape", [f"{p}_s"], [f"{p}_n"], name=f"{p}/Shape"),
                helper.make_node("ConstantOfShape", [f"{p}_n"], [f"{p}_zp"], name=f"{p}/ZeroPoint",
                                 value=helper.make_tensor("v", TensorProto.UINT8, [1], [128])),
                helper.make_node("QuantizeLinear", [x, f"{p}_s", f"{p}_zp"], [f"{p}_xq"], name=f"{p}/Quantize", axis=0),
                helper.make_node("MatMulInteger", [f"{p}_xq", f"{p}_w", f"{p}_azp"], [f"{p}_acc"], name=f"{p}/MatMul"),
            ]
        nodes += [
            helper.make_node("Cast", [f"{p}_acc"], [f"{p}_accf"], name=f"{p}/Cast", to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{p}_accf", f"{p}_ws"], [f"{p}_cols2" if split else f"{p}_cols"],
                             name=f"{p}/MulCols")]
        if split:
            nodes += [helper.make_node("Split", [f"{p}_cols2"], [f"{p}_hi", f"{p}_lo"], name=f"{p}/Split", axis=1),
                      helper.make_node("Add", [f"{p}_hi", f"{p}_lo"], [f"{p}_cols"], name=f"{p}/AddParts")]
        nodes += [
            helper.make_node("Unsqueeze", [f"{p}_s", f"{p}_axis1"], [f"{p}_s2"], name=f"{p}/Unsqueeze"),
            helper.make_node("Mul", [f"{p}_cols", f"{p}_s2"], [f"{p}_rows"], name=f"{p}/MulRows"),
            helper.make_node("Add", [f"{p}_rows", f"{p}_b"], [y], name=f"{p}/Add"),
        ]
        at = list(graph.node).index(node)
        graph.node.remove(node)
        for k, n in enumerate(nodes):
            graph.node.insert(at + k, n)
        graph.initializer.extend(new_inits)
        done.append(node.name)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:  # the replaced fp32 weights
        graph.initializer.remove(init)
    return done
