"""Exact top-k with ONNX Runtime: an in-memory graph of MatMul + TopK, tiled over the catalogue.

Graph (built once per table; ``K`` and the batch size are runtime inputs)::

    for every catalogue tile t (``tile`` items, transposed table slice W_t (d, tile) as initializer):
        S_t = MatMul(Q, W_t)                              # (B, tile) fp32, stays in cache
        [S_t += bias_t]                                   # -inf on row 0 (padding) / tile padding
        If(use_blocks):                                   # chosen per call from K
            block path: M_t = ReduceMax over strided blocks of ``block`` items -> (B, tile/block);
                        the top-K blocks by their max hold the tile's top-K items (each of the
                        top-K items lies in a block whose max is >= the K-th score, and at most K
                        blocks have such a max), so TopK runs on K*block gathered scores only
        else:       TopK(S_t, min(K, tile))
    Concat the per-tile candidates -> TopK(K, sorted) -> GatherElements(ids)

Tiling keeps the score block in cache instead of writing/reading the full (B, N) matrix; the block-max
path cuts the TopK work at small K (timings: docs/ARCHITECTURE.md, "Measurements behind the defaults").
Exclusion/allowed masks are made exact by the base class (over-fetch + numpy filter + refill, or exact
subset scoring for restrictive masks).

Session: intra-op threads = physical cores, graph optimisation level ALL.  ``device="cuda"`` uses
the CUDA execution provider (``onnxruntime-gpu``) and raises :class:`DeviceError` if the session
did not actually get it (ORT otherwise silently falls back to the CPU).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dpr.util import physical_cores
from dpr.errors import InputError, require

from .base import DeviceError, Retriever

__all__ = ["OnnxRuntimeRetriever", "build_topk_graph"]


def build_topk_graph(table: np.ndarray, *, tile: int, block: int, dtype: str = "float32") -> Any:
    """The tiled MatMul + TopK ONNX model over items ``1..N`` of ``table`` (N + 1, d)."""
    require("onnx", "the onnxruntime retriever")
    from onnx import TensorProto, helper, numpy_helper

    n1, d = table.shape
    elem = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT
    np_dt = np.float16 if dtype == "float16" else np.float32

    def const(name: str, value: Any, dt: Any = np.int64) -> Any:
        return numpy_helper.from_array(np.asarray(value, dtype=dt), name)

    inits = [const("one_i", [1]), const("ax1", [1]), const("shape2", [0, -1]),
             const("shape3", [0, block, -1]), const("arange_b", np.arange(block).reshape(1, block, 1))]
    nodes = []
    cand_v, cand_i = [], []
    tiles = list(range(0, n1, tile))
    for t, s0 in enumerate(tiles):
        width = min(tile, n1 - s0)
        padded = -(-width // block) * block
        nb = padded // block
        p = f"t{t}_"
        w = np.zeros((d, padded), dtype=np_dt)
        w[:, :width] = table[s0:s0 + width].T
        inits += [numpy_helper.from_array(w, p + "W"), const(p + "off", [s0]), const(p + "nb", [nb]),
                  const(p + "nt", [width]), const(p + "nb_s", nb)]
        nodes.append(helper.make_node("MatMul", ["Q", p + "W"], [p + "S0"]))
        bias = np.zeros((1, padded), dtype=np.float32)
        bias[0, width:] = -np.inf
        if s0 == 0:
            bias[0, 0] = -np.inf  # padding row 0 is never returned
        if elem == TensorProto.FLOAT16:
            nodes.append(helper.make_node("Cast", [p + "S0"], [p + "S1"], to=TensorProto.FLOAT))
            s_in = p + "S1"
        else:
            s_in = p + "S0"
        if np.isinf(bias).any():
            inits.append(numpy_helper.from_array(bias, p + "bias"))
            nodes.append(helper.make_node("Add", [s_in, p + "bias"], [p + "S"]))
        else:
            nodes.append(helper.make_node("Identity", [s_in], [p + "S"]))
        nodes += [helper.make_node("Min", ["K", p + "nt"], [p + "Kt"]),
                  helper.make_node("Min", ["K", p + "nb"], [p + "Kb"])]
        # block path: strided blocks {j, j + nb, j + 2 nb, ...} so ReduceMax is an element-wise max of rows
        then_nodes = [
            helper.make_node("Reshape", [p + "S", "shape3"], [p + "S3"]),
            helper.make_node("ReduceMax", [p + "S3"], [p + "M"], axes=[1], keepdims=0),
            helper.make_node("TopK", [p + "M", p + "Kb"], [p + "MV", p + "MI"], axis=-1, largest=1, sorted=0),
            helper.make_node("Unsqueeze", [p + "MI", "ax1"], [p + "MI3"]),
            helper.make_node("Mul", ["arange_b", p + "nb_s"], [p + "AR"]),
            helper.make_node("Add", [p + "MI3", p + "AR"], [p + "GI3"]),
            helper.make_node("Reshape", [p + "GI3", "shape2"], [p + "GI"]),
            helper.make_node("GatherElements", [p + "S", p + "GI"], [p + "G"], axis=1),
            helper.make_node("TopK", [p + "G", p + "Kt"], [p + "bV", p + "J"], axis=-1, largest=1, sorted=0),
            helper.make_node("GatherElements", [p + "GI", p + "J"], [p + "bI"], axis=1),
        ]
        vi = helper.make_tensor_value_info
        then_g = helper.make_graph(then_nodes, p + "blocks", [], [
            vi(p + "bV", TensorProto.FLOAT, None), vi(p + "bI", TensorProto.INT64, None)])
        else_g = helper.make_graph(
            [helper.make_node("TopK", [p + "S", p + "Kt"], [p + "pV", p + "pI"], axis=-1, largest=1, sorted=0)],
            p + "plain", [], [vi(p + "pV", TensorProto.FLOAT, None), vi(p + "pI", TensorProto.INT64, None)])
        nodes.append(helper.make_node("If", ["use_blocks"], [p + "V", p + "Il"], then_branch=then_g, else_branch=else_g))
        nodes.append(helper.make_node("Add", [p + "Il", p + "off"], [p + "I"]))
        cand_v.append(p + "V")
        cand_i.append(p + "I")
    if len(tiles) > 1:
        nodes += [helper.make_node("Concat", cand_v, ["CV"], axis=1), helper.make_node("Concat", cand_i, ["CI"], axis=1)]
    else:
        nodes += [helper.make_node("Identity", cand_v, ["CV"]), helper.make_node("Identity", cand_i, ["CI"])]
    nodes += [helper.make_node("TopK", ["CV", "K"], ["scores", "J"], axis=-1, largest=1, sorted=1),
              helper.make_node("GatherElements", ["CI", "J"], ["indices"], axis=1)]
    graph = helper.make_graph(
        nodes, "dpr_topk",
        [helper.make_tensor_value_info("Q", elem, ["B", d]),
         helper.make_tensor_value_info("K", TensorProto.INT64, [1]),
         helper.make_tensor_value_info("use_blocks", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("indices", TensorProto.INT64, ["B", "k"]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["B", "k"])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="dpr")
    model.ir_version = min(model.ir_version, 9)
    return model


class OnnxRuntimeRetriever(Retriever):
    """MatMul + TopK in ONNX Runtime (the fastest exact CPU path measured here).

    Options: ``tile`` (16384 items per MatMul), ``block`` (16: items per block of the block-max
    pruning; 0/1 disables it), ``threads`` (intra-op threads, default the physical cores),
    ``device`` ``"cpu"`` or ``"cuda[:i]"`` (CUDA EP; ``dtype="float16"`` allowed there).
    """

    name = "onnxruntime"
    supported_dtypes = ("float32", "float16")

    def __init__(self, item_embeddings: np.ndarray, *, device: str = "cpu", dtype: Any = "float32",
                 tile: int = 16384, block: int = 16, threads: int | None = None, **options: Any) -> None:
        super().__init__(item_embeddings, device=device, dtype=dtype, **options)
        ort = require("onnxruntime", "the onnxruntime retriever")
        if int(tile) < 1 or int(block) < 0:
            raise InputError(f"tile must be >= 1 and block >= 0, got tile={tile}, block={block}")
        if self.dtype == "float16" and self.device == "cpu":
            raise InputError("the onnxruntime retriever supports dtype float16 only with device='cuda'")
        self.block = max(1, int(block))
        self.tile = -(-int(tile) // self.block) * self.block
        self.threads = int(threads) if threads else physical_cores()
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if self.device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise DeviceError("device='cuda' needs onnxruntime-gpu (CUDAExecutionProvider is not available)")
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": self.device_index}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        model = build_topk_graph(self.table, tile=self.tile, block=self.block, dtype=self.dtype)
        try:
            self._session = ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            if self.device.startswith("cuda"):
                raise DeviceError(f"onnxruntime could not create a CUDA session: {exc}") from exc
            raise
        if self.device.startswith("cuda") and "CUDAExecutionProvider" not in self._session.get_providers():
            raise DeviceError("onnxruntime fell back to the CPU: no usable CUDA device for the CUDAExecutionProvider")
        self._q_dtype = np.float16 if self.dtype == "float16" else np.float32

    def _fetch(self, queries: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        use_blocks = self.block > 1 and kk * self.block * 4 <= self.tile
        idx, sc = self._session.run(None, {
            "Q": np.ascontiguousarray(queries, dtype=self._q_dtype),
            "K": np.array([kk], dtype=np.int64),
            "use_blocks": np.array(use_blocks),
        })
        return idx, sc

    def close(self) -> None:
        self._session = None
