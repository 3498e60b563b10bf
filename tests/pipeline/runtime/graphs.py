"""What dynamo captures: the calls in the graphs of a compiled function, for tests that ask which kernel ran."""

from __future__ import annotations

from collections.abc import Callable

import torch


def captured_calls(function: Callable[..., object], *inputs: torch.Tensor, fullgraph: bool = False) -> list[str]:
    """The targets of every function call in the graphs dynamo captures for function(*inputs), repeats kept."""
    graphs = []

    def capture(graph_module, example_inputs):  # noqa: ANN001, ANN202
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(function, backend=capture, fullgraph=fullgraph)(*inputs)
    return [str(node.target) for graph in graphs for node in graph.graph.nodes if node.op == "call_function"]
