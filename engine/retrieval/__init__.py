"""Exact top-k retrieval over the item table: a registry of interchangeable retrievers.

>>> from dpr.engine.retrieval import get_retriever
>>> r = get_retriever("onnxruntime", item_embeddings)          # (N + 1, d), row 0 = padding
>>> idx, scores = r.search(user_vectors, k=10, exclude=histories, allowed_mask=mask)

Every retriever follows :class:`~dpr.engine.retrieval.base.Retriever`'s contract: int64 indices
in ``1..N`` and float32 dot-product scores ``(B, k)``, sorted descending; exclusion lists and allowed
masks are exact; rows with fewer than ``k`` eligible items are padded with index -1 / score -inf.

Built-in names (imported lazily, so a missing optional package only matters when used):

* ``"torch"``: tiled matmul + running top-k, CPU or CUDA (always available);
* ``"fused"``: one C++ pass of scoring + running top-k with the filters applied inside (AVX-512 or
  AVX2+FMA, chosen at run time; the fastest exact CPU path on those; needs ``python -m dpr.kernels.build``);
* ``"onnxruntime"``: in-memory MatMul + TopK graph;
* ``"faiss"``: ``IndexFlatIP``, CPU or GPU;
* ``"milvus"``: the table in Milvus (Milvus Lite in-process, or a cluster by URI); FLAT is exact.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Callable, Union

import numpy as np

from dpr.errors import InputError
from dpr.registry import resolve_factory

from .base import DeviceError, Retriever
from .filters import Filters

__all__ = [
    "RETRIEVERS", "Retriever", "DeviceError", "Filters", "get_retriever", "available_retrievers",
    "register_retriever", "retriever_class", "auto_cpu_retriever",
]

Factory = Union[str, Callable[..., Retriever]]

#: name -> "module:Class" (lazy) or a callable ``factory(item_embeddings, **kw) -> Retriever``
RETRIEVERS: dict[str, Factory] = {
    "torch": "dpr.engine.retrieval.torch_retriever:TorchRetriever",
    "onnxruntime": "dpr.engine.retrieval.onnxruntime_retriever:OnnxRuntimeRetriever",
    "fused": "dpr.engine.retrieval.fused_retriever:FusedRetriever",
    "faiss": "dpr.engine.retrieval.faiss_retriever:FaissRetriever",
    "milvus": "dpr.engine.retrieval.milvus_retriever:MilvusRetriever",
}

#: optional top-level packages each built-in retriever needs
_DEPENDENCIES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "onnxruntime": ("onnxruntime", "onnx"),
    "faiss": ("faiss",),
    "milvus": ("pymilvus",),
    "fused": (),
}

#: extra availability checks ("module:function" returning bool), e.g. a native library that must be built
_CHECKS: dict[str, str] = {
    "fused": "dpr.kernels.score_topk:library_available",
}


def register_retriever(name: str, factory: Factory, *, overwrite: bool = False) -> None:
    """Add a retriever: ``factory`` is a ``"module:attr"`` string or a callable returning a Retriever."""
    if not isinstance(name, str) or not name:
        raise InputError("retriever name must be a non-empty string")
    if not (callable(factory) or (isinstance(factory, str) and ":" in factory)):
        raise InputError("factory must be a callable or a 'module:attribute' string")
    if name in RETRIEVERS and not overwrite:
        raise InputError(f"retriever {name!r} is already registered (pass overwrite=True to replace it)")
    RETRIEVERS[name] = factory
    _DEPENDENCIES.pop(name, None)
    _CHECKS.pop(name, None)


def retriever_class(name: str) -> Callable[..., Retriever]:
    """Resolve a registered name to its class/factory (imports the module)."""
    if name not in RETRIEVERS:
        raise InputError(f"unknown retriever {name!r}; registered: {', '.join(sorted(RETRIEVERS))}")
    return resolve_factory(RETRIEVERS[name])


def get_retriever(name: str, item_embeddings: np.ndarray, **kw: Any) -> Retriever:
    """Build the retriever ``name`` over ``item_embeddings`` (N + 1, d); ``kw`` go to its constructor."""
    return retriever_class(name)(item_embeddings, **kw)


def available_retrievers() -> list[str]:
    """Registered retrievers whose dependencies import here (``"torch"`` always first)."""
    out = []
    for name, factory in RETRIEVERS.items():
        deps = _DEPENDENCIES.get(name)
        try:
            if deps is not None:
                for dep in deps:
                    importlib.import_module(dep)
            elif isinstance(factory, str):
                importlib.import_module(factory.split(":", 1)[0])
            check = _CHECKS.get(name)
            if check is not None and not resolve_factory(check)():
                continue
        except ImportError:
            continue
        out.append(name)
    return out


#: instruction sets of the fused kernel's vector tiles (``dpr.kernels.score_topk.isa()``); on any other
#: (the portable tile: baseline x86-64, or not x86) ONNX Runtime's MatMul + TopK is faster
FUSED_FAST_ISAS = ("avx512f", "avx2")


def auto_cpu_retriever(avail: list[str], isa: str | None = None) -> tuple[str, str]:
    """The CPU retriever ``retriever="auto"`` picks, decided from the instruction set (no timing at load),
    and why: ``fused`` when the kernel has its AVX-512 or AVX2+FMA tile on this CPU; on a CPU with
    neither, ``onnxruntime`` (its MatMul uses MLAS's own ISA dispatch; the fused kernel's portable tile is
    several times slower there), else ``fused`` or ``torch``. ``isa`` defaults to the kernel's own report
    (``dpr.kernels.score_topk.isa()``, which honours ``DPR_TOPK_ISA``)."""
    if "fused" in avail:
        if isa is None:
            from dpr.kernels import score_topk

            isa = score_topk.isa()
        if isa in FUSED_FAST_ISAS:
            return "fused", f"the fused kernel runs its {isa} tile on this CPU"
        if "onnxruntime" in avail:
            return "onnxruntime", (f"the fused kernel would run its {isa} tile here (no AVX2+FMA or AVX-512): "
                                   "ONNX Runtime's MatMul + TopK is faster")
        return "fused", f"the fused kernel runs its {isa} tile (ONNX Runtime is not installed)"
    if "onnxruntime" in avail:
        return "onnxruntime", "the fused kernel is not built (python -m dpr.kernels.build)"
    return "torch", "neither the fused kernel nor ONNX Runtime is available"
