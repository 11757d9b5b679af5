"""ONNX export of the head and the rejector with their calibration inside the graphs, checked
against scikit-learn.

skl2onnx cannot export temperature or Platt scaling, so each graph is extended by hand:
- head: probabilities → Log → Div(temperature) → Softmax (softmax(log p / T) = softmax(z / T));
- rejector (12-way: digits, word, sound): p_in = sum of the digits → logit → a * logit + b →
  Sigmoid → [1 - q, q].
The daemon then reads calibrated probabilities straight from the files, and nothing outside
them can put the calibration out of step.
"""

from __future__ import annotations

import warnings

import numpy as np

from agent.training.recipe import combine, head_scores, rejector_logit, sigmoid, softmax

OUTPUT = "probabilities"
INPUT = "features"


def _sklearn_graph(model, n_features: int):
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    clf = model.steps[-1][1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        onx = to_onnx(model, initial_types=[(INPUT, FloatTensorType([None, n_features]))],
                      options={id(clf): {"zipmap": False}}, target_opset=17)
    g = onx.graph
    raw = [o for o in g.output if o.name == OUTPUT][0]
    for node in g.node:  # free the public name for the calibrated output
        node.output[:] = ["raw_probabilities" if o == OUTPUT else o for o in node.output]
        node.input[:] = ["raw_probabilities" if i == OUTPUT else i for i in node.input]
    g.output.remove(raw)
    for o in [o for o in g.output if o.name != OUTPUT]:
        g.output.remove(o)  # the label output is not needed
    return onx, len(clf.classes_)


def head_to_onnx(model, temperature: float, n_features: int) -> bytes:
    import onnx
    from onnx import TensorProto, helper

    onx, n = _sklearn_graph(model, n_features)
    g = onx.graph
    g.initializer.append(helper.make_tensor("temperature", TensorProto.FLOAT, [],
                                            [temperature]))
    g.initializer.append(helper.make_tensor("tiny", TensorProto.FLOAT, [], [1e-30]))
    g.node.append(helper.make_node("Max", ["raw_probabilities", "tiny"], ["clipped"]))
    g.node.append(helper.make_node("Log", ["clipped"], ["log_p"]))
    g.node.append(helper.make_node("Div", ["log_p", "temperature"], ["scaled"]))
    g.node.append(helper.make_node("Softmax", ["scaled"], [OUTPUT], axis=1))
    g.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [None, n]))
    onnx.checker.check_model(onx)
    return onx.SerializeToString()


def constant_head(n_features: int) -> bytes:
    """The head of a one-word vocabulary: P(word | known) = 1, whatever the input (the
    rejector alone decides)."""
    import onnx
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    g = helper.make_graph(
        [helper.make_node("ReduceSum", [INPUT, "axis"], ["s"], keepdims=1),
         helper.make_node("Mul", ["s", "zero"], ["z"]),
         helper.make_node("Add", ["z", "one"], [OUTPUT])], "constant_head",
        [helper.make_tensor_value_info(INPUT, f, [None, n_features])],
        [helper.make_tensor_value_info(OUTPUT, f, [None, 1])],
        [helper.make_tensor("axis", TensorProto.INT64, [1], [1]),
         helper.make_tensor("zero", f, [], [0.0]), helper.make_tensor("one", f, [], [1.0])])
    onx = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onx.ir_version = 8
    onnx.checker.check_model(onx)
    return onx.SerializeToString()


def rejector_to_onnx(model, platt: tuple[float, float], n_features: int,
                     n_known: int = 10) -> bytes:
    import onnx
    from onnx import TensorProto, helper

    onx, _ = _sklearn_graph(model, n_features)
    g = onx.graph
    f = TensorProto.FLOAT
    g.initializer.extend([
        helper.make_tensor("lo", f, [], [1e-7]), helper.make_tensor("hi", f, [], [1 - 1e-7]),
        helper.make_tensor("platt_a", f, [], [platt[0]]),
        helper.make_tensor("platt_b", f, [], [platt[1]]),
        helper.make_tensor("one", f, [], [1.0])])
    g.initializer.extend([
        helper.make_tensor("digits_from", TensorProto.INT64, [1], [0]),
        helper.make_tensor("digits_to", TensorProto.INT64, [1], [n_known]),
        helper.make_tensor("class_axis", TensorProto.INT64, [1], [1])])
    g.node.extend([  # p_in = the known classes' share (the ten digits of the 12-way output)
        helper.make_node("Slice", ["raw_probabilities", "digits_from", "digits_to",
                                   "class_axis"], ["digit_probabilities"]),
        helper.make_node("ReduceSum", ["digit_probabilities", "class_axis"], ["p_in_raw"],
                         keepdims=1),
        helper.make_node("Clip", ["p_in_raw", "lo", "hi"], ["p1"]),
        helper.make_node("Sub", ["one", "p1"], ["p0"]),
        helper.make_node("Log", ["p0"], ["log_p0"]),
        helper.make_node("Log", ["p1"], ["log_p1"]),
        helper.make_node("Sub", ["log_p1", "log_p0"], ["logit"]),
        helper.make_node("Mul", ["logit", "platt_a"], ["scaled"]),
        helper.make_node("Add", ["scaled", "platt_b"], ["shifted"]),
        helper.make_node("Sigmoid", ["shifted"], ["q"]),
        helper.make_node("Sub", ["one", "q"], ["not_q"]),
        helper.make_node("Concat", ["not_q", "q"], [OUTPUT], axis=1)])
    g.output.append(helper.make_tensor_value_info(OUTPUT, f, [None, 2]))
    onnx.checker.check_model(onx)
    return onx.SerializeToString()


def _run(blob: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT], {INPUT: x.astype(np.float32)})[0]


def check_against_sklearn(head_blob: bytes, head, temperature: float, rejector_blob: bytes,
                          rejector, platt: tuple[float, float], x: np.ndarray,
                          n_known: int = 10) -> float:
    """Largest absolute difference between the ONNX and scikit-learn combined probabilities
    (what the daemon decides on: p_in * P_head and 1 - p_in); head None: the constant head."""
    p_head = np.ones((len(x), 1)) if head is None else softmax(head_scores(head, x), temperature)
    want = combine(p_head, sigmoid(platt[0] * rejector_logit(rejector, x, n_known) + platt[1]))
    got = combine(_run(head_blob, x), _run(rejector_blob, x)[:, 1])
    return float(np.abs(got - want).max())
