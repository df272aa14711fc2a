#!/usr/bin/env python3
"""Writes the tiny ONNX models the runtime's inference tests load (runtime/src/inference).

No training and no downloaded weights: every graph is built node by node with onnx.helper.
Run from anywhere with the `onnx` package installed (`pip install onnx`); it rewrites the
.onnx files next to this script, byte for byte the same on every run.

window_score.onnx
    input  x     float [1, W, N]   W = 16 samples (oldest first), N = 3 inputs (spec order)
    output score float [1, 1]
    score = max over inputs of |last - mean(history)| / sqrt(var(history) + EPS)
    where history is the W-1 samples before the last one: the z-score of the newest sample
    against the window before it, for the input that deviates most. A flat window scores 0,
    a step in any input on the newest sample scores high. EPS = 1e-3 floors the standard
    deviation at ~0.03 units so a flat history with a tiny wobble does not explode.

bad_output_shape.onnx
    same input, output score float [1, N]: the per-input z-scores, not one value
    (the runtime must refuse it: it wants a single score).

bad_input_rank.onnx
    input x float [W, N] (rank 2 instead of 3), output float [1, 1]: the largest value.

log_of_max.onnx
    input x float [1, W, N], output score float [1, 1] = ln(largest value): -inf on a window
    of zeros, NaN when all values are negative (the runtime must refuse such a score).

mean_any_window.onnx
    input x float [batch, window, 3] (symbolic dims), output score float [batch] = mean of
    each window: loads for any window length, and its output becomes [1] once the runtime
    fixes the input to [1, window, 3].
"""

import os

import onnx
from onnx import TensorProto, helper

W = 16
N = 3
EPS = 1e-3
OPSET = 13  # ReduceMean/ReduceMax take `axes` as an attribute up to opset 17
HERE = os.path.dirname(os.path.abspath(__file__))


def i64(name, values):
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)


def z_scores_nodes():
    """Nodes from x [1, W, N] to z [1, 1, N] (|z| of the newest sample per input)."""
    return [
        # history = x[:, 0:W-1, :], last = x[:, W-1:W, :]
        helper.make_node("Slice", ["x", "hist_start", "hist_end", "axis1"], ["history"]),
        helper.make_node("Slice", ["x", "last_start", "last_end", "axis1"], ["last"]),
        helper.make_node("ReduceMean", ["history"], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["history", "mean"], ["centered"]),
        helper.make_node("Mul", ["centered", "centered"], ["squared"]),
        helper.make_node("ReduceMean", ["squared"], ["var"], axes=[1], keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Sub", ["last", "mean"], ["delta"]),
        helper.make_node("Div", ["delta", "std"], ["z_signed"]),
        helper.make_node("Abs", ["z_signed"], ["z"]),
    ]


def z_scores_initializers():
    return [
        i64("hist_start", [0]),
        i64("hist_end", [W - 1]),
        i64("last_start", [W - 1]),
        i64("last_end", [W]),
        i64("axis1", [1]),
        helper.make_tensor("eps", TensorProto.FLOAT, [], [EPS]),
        i64("shape_1n", [1, N]),
    ]


def save(graph, file_name):
    model = helper.make_model(
        graph,
        producer_name="ferrotwin make_window_score.py",
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path = os.path.join(HERE, file_name)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def window_score():
    nodes = z_scores_nodes() + [
        helper.make_node("Reshape", ["z", "shape_1n"], ["z_1n"]),
        helper.make_node("ReduceMax", ["z_1n"], ["score"], axes=[1], keepdims=1),
    ]
    graph = helper.make_graph(
        nodes,
        "window_score",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, W, N])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1, 1])],
        initializer=z_scores_initializers(),
    )
    save(graph, "window_score.onnx")


def bad_output_shape():
    nodes = z_scores_nodes() + [helper.make_node("Reshape", ["z", "shape_1n"], ["score"])]
    graph = helper.make_graph(
        nodes,
        "bad_output_shape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, W, N])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1, N])],
        initializer=z_scores_initializers(),
    )
    save(graph, "bad_output_shape.onnx")


def bad_input_rank():
    nodes = [helper.make_node("ReduceMax", ["x"], ["score"], keepdims=1)]
    graph = helper.make_graph(
        nodes,
        "bad_input_rank",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [W, N])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1, 1])],
    )
    save(graph, "bad_input_rank.onnx")


def log_of_max():
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["max_n"], axes=[2], keepdims=0),
        helper.make_node("ReduceMax", ["max_n"], ["max"], axes=[1], keepdims=1),
        helper.make_node("Log", ["max"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes,
        "log_of_max",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, W, N])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1, 1])],
    )
    save(graph, "log_of_max.onnx")


def mean_any_window():
    nodes = [helper.make_node("ReduceMean", ["x"], ["score"], axes=[1, 2], keepdims=0)]
    graph = helper.make_graph(
        nodes,
        "mean_any_window",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "window", N])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"])],
    )
    save(graph, "mean_any_window.onnx")


if __name__ == "__main__":
    window_score()
    bad_output_shape()
    bad_input_rank()
    log_of_max()
    mean_any_window()
