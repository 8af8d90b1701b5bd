"""Which ONNX operators the TensorRT 10 ONNX parser supports, and a check of an exported graph against them.

The list (``tensorrt_supported_ops.txt``, shipped beside this module) is the "Y" rows of onnx-tensorrt's
``docs/operators.md`` for TensorRT 10. Only operator *names* are checked here; the per-operator
restrictions (TopK's ``K``, constant axes, opset, plugin attributes, profiles) are checked by
``dpr.export.trt_constraints``. The fused gate ``dpr::FusedMoEGate`` is allowed:
TensorRT runs it as a plugin (``dpr.kernels.trt_plugin``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

OPS_FILE = Path(__file__).resolve().parent / "tensorrt_supported_ops.txt"
ALLOWED_CUSTOM_OPS = frozenset({("dpr", "FusedMoEGate")})
_DEFAULT_DOMAINS = ("", "ai.onnx")


@functools.lru_cache(maxsize=None)
def tensorrt_supported_ops() -> frozenset[str]:
    """Operator names (default ONNX domain) listed in ``tensorrt_supported_ops.txt``."""
    names = set()
    for line in OPS_FILE.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(line)
    return frozenset(names)


def _iter_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:          # subgraphs (If / Loop / Scan)
            if attr.HasField("g"):
                yield from _iter_nodes(attr.g)
            for g in attr.graphs:
                yield from _iter_nodes(g)


def graph_ops(model) -> list[tuple[str, str]]:
    """Sorted distinct ``(domain, op_type)`` of every node (subgraphs and local functions included;
    calls to local functions are replaced by the functions' bodies). Domain "" is the default one."""
    import onnx

    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(str(model), load_external_data=False)
    functions = {(f.domain, f.name): f for f in model.functions}
    ops: set[tuple[str, str]] = set()
    seen_fn: set[tuple[str, str]] = set()

    def visit(nodes):
        for n in nodes:
            key = (n.domain, n.op_type)
            if key in functions:
                if key not in seen_fn:
                    seen_fn.add(key)
                    visit(_iter_nodes(functions[key]))
                continue
            dom = "" if n.domain in _DEFAULT_DOMAINS else n.domain
            ops.add((dom, n.op_type))

    visit(_iter_nodes(model.graph))
    return sorted(ops)


def check_tensorrt_ops(model) -> list[tuple[str, str]]:
    """``(domain, op)`` pairs of ``model`` (ModelProto or path) that the TensorRT 10 ONNX parser does not
    support; ``[]`` means every operator is supported (``dpr::FusedMoEGate`` is allowed as a plugin)."""
    supported = tensorrt_supported_ops()
    bad = []
    for dom, op in graph_ops(model):
        if (dom, op) in ALLOWED_CUSTOM_OPS:
            continue
        if dom == "" and op in supported:
            continue
        bad.append((dom, op))
    return bad
