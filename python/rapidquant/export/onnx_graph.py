"""Small lookups over an ONNX graph shared by the export's passes."""
from __future__ import annotations


def producers(graph) -> dict:
    """Tensor name -> the node that outputs it (graph inputs and initializers have none)."""
    return {o: n for n in graph.node for o in n.output}
