"""Operator domains an ONNX graph of an export may use: the standard ONNX domain and the engine's own ``dpr``
(the fused MoE gate). Checked when a backend loads a graph, before the runtime sees it: a runtime runs any
operator it happens to implement (ONNX Runtime's contrib domain ``com.microsoft`` has dozens), so a graph
edited to use one would load and run code paths the export never validated.
"""

from __future__ import annotations

from pathlib import Path

from dpr.kernels.op_spec import OP_DOMAIN

from .errors import BackendError

ALLOWED_DOMAINS = frozenset({"", "ai.onnx", OP_DOMAIN})


def _nodes(graph):
    """Every node of ``graph`` and of its subgraphs (If / Loop / Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _nodes(attr.g)
            for sub in attr.graphs:
                yield from _nodes(sub)


def foreign_ops(model) -> list[str]:
    """Sorted ``domain::op`` of the nodes (graph, subgraphs, model-local function bodies) outside
    :data:`ALLOWED_DOMAINS`."""
    found = {(n.domain, n.op_type) for n in _nodes(model.graph) if n.domain not in ALLOWED_DOMAINS}
    for fn in model.functions:
        found |= {(n.domain, n.op_type) for n in fn.node if n.domain not in ALLOWED_DOMAINS}
    return [f"{d}::{op}" for d, op in sorted(found)]


def check_graph_domains(path: Path) -> None:
    """:class:`BackendError` naming the file and the operators when the graph at ``path`` uses a domain outside
    :data:`ALLOWED_DOMAINS`. A file ONNX cannot parse is left to the runtime, which names it as before."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - a damaged graph: the runtime's own load reports it
        return
    bad = foreign_ops(model)
    if bad:
        raise BackendError(f"{Path(path).name} uses operator(s) of a domain this engine does not run: "
                           f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''} (allowed: the standard ONNX "
                           f"domain and '{OP_DOMAIN}'); refusing to load it [{path}]")
