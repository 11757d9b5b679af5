"""ONNX export with the calibration inside the graph, checked against scikit-learn.

skl2onnx cannot export temperature scaling, so the graph is extended by hand: the MLP's
probabilities → Log → Div(temperature) → Softmax (softmax(log p / T) = softmax(z / T)). The
daemon then reads calibrated probabilities straight from the model, and nothing outside the
file can put them out of step.
"""

from __future__ import annotations

import warnings

import numpy as np

from agent.training.recipe import scores, softmax

OUTPUT = "probabilities"


def to_onnx_bytes(model, temperature: float, n_features: int) -> bytes:
    import onnx
    from onnx import TensorProto, helper
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    clf = model.steps[-1][1]
    with warnings.catch_warnings():  # skl2onnx reads SVC.probA_, deprecated in sklearn 1.9
        warnings.simplefilter("ignore", FutureWarning)
        onx = to_onnx(model, initial_types=[("features", FloatTensorType([None, n_features]))],
                      options={id(clf): {"zipmap": False}}, target_opset=17)
    g = onx.graph
    raw = [o for o in g.output if o.name == "probabilities"][0]
    for node in g.node:  # free the public name for the calibrated output
        node.output[:] = ["raw_probabilities" if o == "probabilities" else o
                          for o in node.output]
        node.input[:] = ["raw_probabilities" if i == "probabilities" else i for i in node.input]
    g.initializer.append(helper.make_tensor("temperature", TensorProto.FLOAT, [],
                                            [temperature]))
    g.initializer.append(helper.make_tensor("tiny", TensorProto.FLOAT, [], [1e-30]))
    g.node.append(helper.make_node("Max", ["raw_probabilities", "tiny"], ["clipped"]))
    g.node.append(helper.make_node("Log", ["clipped"], ["log_p"]))
    g.node.append(helper.make_node("Div", ["log_p", "temperature"], ["scaled"]))
    g.node.append(helper.make_node("Softmax", ["scaled"], [OUTPUT], axis=1))
    g.output.remove(raw)
    g.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT,
                                                  [None, len(clf.classes_)]))
    onnx.checker.check_model(onx)
    return onx.SerializeToString()


def check_against_sklearn(onnx_bytes: bytes, model, temperature: float,
                          x: np.ndarray) -> float:
    """Largest absolute difference between ONNX and scikit-learn calibrated probabilities."""
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    got = sess.run([OUTPUT], {"features": x.astype(np.float32)})[0]
    want = softmax(scores(model, x), temperature)
    return float(np.abs(got - want).max())
