"""Exact top-k with faiss: ``IndexFlatIP`` over items ``1..N`` (row 0, the padding, is never added;
faiss ids are shifted by +1).

``device="cuda"`` moves the index to a GPU (``StandardGpuResources`` + ``index_cpu_to_gpu``) and
needs ``faiss-gpu`` and ``faiss.get_num_gpus() > 0``; otherwise :class:`DeviceError`.  faiss's GPU
k-selection is limited to k <= 2048: a GPU fetch with a larger k (over-fetch for long exclusion
lists or k itself) is answered exactly on the CPU by the tiled torch kernel instead.

Exclusion and allowed masks are made exact by the base class (over-fetch + filter + refill, exact
subset scoring for restrictive masks).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dpr.errors import require

from .base import DeviceError, Retriever

__all__ = ["FaissRetriever", "GPU_MAX_K"]

GPU_MAX_K = 2048


class FaissRetriever(Retriever):
    """faiss ``IndexFlatIP`` (CPU) or its GPU copy (``device="cuda"``).

    Options: ``threads`` (OpenMP threads for faiss, default: faiss's own default).
    """

    name = "faiss"

    def __init__(self, item_embeddings: np.ndarray, *, device: str = "cpu", dtype: Any = "float32",
                 threads: int | None = None, **options: Any) -> None:
        super().__init__(item_embeddings, device=device, dtype=dtype, **options)
        faiss = require("faiss", "the faiss retriever")
        self._faiss = faiss
        if threads:
            faiss.omp_set_num_threads(int(threads))
        cpu_index = faiss.IndexFlatIP(self.dim)
        cpu_index.add(np.ascontiguousarray(self.table[1:]))
        self._gpu = False
        self._res = None
        if self.device.startswith("cuda"):
            if not hasattr(faiss, "StandardGpuResources"):
                raise DeviceError("device='cuda' needs faiss-gpu; the installed faiss has no GPU support")
            if faiss.get_num_gpus() <= self.device_index:
                raise DeviceError(f"device={self.device!r} asked for, but faiss sees {faiss.get_num_gpus()} GPU(s)")
            self._res = faiss.StandardGpuResources()
            self._index = faiss.index_cpu_to_gpu(self._res, self.device_index, cpu_index)
            self._gpu = True
        else:
            self._index = cpu_index

    def _fetch(self, queries: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        if self._gpu and kk > GPU_MAX_K:
            return self._exact(queries, kk, None)
        scores, ids = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), kk)
        ids = ids.astype(np.int64, copy=False)
        ids = np.where(ids >= 0, ids + 1, -1)
        scores = np.where(ids > 0, scores, -np.inf).astype(np.float32, copy=False)
        return ids, scores

    def close(self) -> None:
        self._index = None
        self._res = None
