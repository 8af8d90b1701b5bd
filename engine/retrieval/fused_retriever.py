"""Exact top-k in one fused pass: score + running top-k + exclusion/allowed filters (C++, CPU).

The catalogue is packed once into 32-item panels (:func:`dpr.kernels.score_topk.pack`). Each call scores
12-query x 32-item tiles in AVX-512 registers (6-query x 16-item halves with AVX2+FMA) and keeps only the
scores that beat a row's running k-th best; those few candidates are checked against the row's history
and allowed mask before they enter its heap. So filtering costs nothing extra: no over-fetch, no re-fetch
of short rows, no subset fallback, and the B x N score matrix is never written. Exact for any filter, by construction.

Needs ``libdpr_score_topk.so`` (``python -m dpr.kernels.build``, g++ only); CPU only. The tile is chosen
at run time (AVX-512, else AVX2+FMA; ``self.isa``); machines with neither run the portable tile from
``kernels/score_topk.h`` (correct, several times slower: ``retriever="auto"`` takes ONNX Runtime there).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dpr.errors import InputError

from .base import DeviceError, Filters, Retriever, physical_cores

__all__ = ["FusedRetriever"]


class FusedRetriever(Retriever):
    """Options: ``threads`` (default the physical cores). The base class's over-fetch options are
    accepted for interface compatibility and unused: filtering happens inside the kernel. Memory: the
    packed table (about the size of the item table) besides the float32 table the exact fallback uses."""

    name = "fused"
    supported_dtypes = ("float32",)
    max_heap_k = 4096      # larger k: the exact tiled torch path (same results, no k-sized heaps per row)

    def __init__(self, item_embeddings: np.ndarray, *, device: str = "cpu", dtype: Any = "float32",
                 threads: int | None = None, **options: Any) -> None:
        super().__init__(item_embeddings, device=device, dtype=dtype, **options)
        if self.device != "cpu":
            raise DeviceError("the fused retriever runs on the CPU only (use 'torch' or 'faiss' on a GPU)")
        from dpr.kernels import score_topk

        if not score_topk.library_available():
            raise DeviceError("the fused retriever needs libdpr_score_topk.so: run python -m dpr.kernels.build")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                    or threads < 1):
            raise InputError(f"threads must be >= 1, got {threads!r}")
        self.threads = int(threads) if threads else physical_cores()
        self._kernel = score_topk
        self._packed = score_topk.pack(self.table)
        self.isa = score_topk.isa()

    def _search(self, q: np.ndarray, kk: int, filters: Filters | None) -> tuple[np.ndarray, np.ndarray]:
        if self._packed is None:
            raise InputError("this retriever is closed")
        if kk > self.max_heap_k:
            # a running heap per row suits small k; a huge k (a full re-ranking) goes to the tiled torch kernel
            return self._exact(q, kk, filters)
        offsets = items = allowed = None
        if filters is not None:
            if filters.excl_keys.size:
                offsets, items = filters.excl_lists()
            allowed = filters.allowed
        return self._kernel.score_topk(q, self._packed, self.num_items, kk, offsets, items, allowed,
                                       threads=self.threads)

    def _fetch(self, queries: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        return self._kernel.score_topk(queries, self._packed, self.num_items, kk, threads=self.threads)

    def close(self) -> None:
        self._packed = None
