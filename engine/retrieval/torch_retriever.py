"""Exact top-k in torch: the retriever over the tiled kernel of :mod:`dpr.engine.retrieval.exact_topk`
(each catalogue tile scored by one matmul and reduced into a running top-k, filters applied per tile
before selection, so the result is exact without any over-fetch).

Runs on CPU and CUDA.  On CUDA the table may be kept in ``float16``/``bfloat16``: the matmul then
reads half-precision operands and accumulates and writes fp32 (``torch.mm(..., out_dtype=float32)``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dpr.errors import InputError

from .base import DeviceError, Retriever
from .exact_topk import tiled_topk, tiled_topk_filtered  # re-exported: the kernel lived here
from .filters import Filters

__all__ = ["TorchRetriever", "tiled_topk", "tiled_topk_filtered"]

CPU_TILE = 16384
CUDA_TILE = 1 << 20
CUDA_SCORE_BYTES = 1 << 30       # at most this much fp32 score block per tile on a GPU (smaller tiles for big batches)
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TorchRetriever(Retriever):
    """Tiled matmul + running top-k in torch (always available).

    Options: ``tile`` (catalogue rows per matmul: 16384 on the CPU, where the score block should stay in
    cache; on CUDA up to 2^20, bounded so the fp32 score block stays under 1 GiB at the call's batch:
    each tile costs several kernel launches, so small tiles are launch-bound on a GPU; timings in
    docs/ARCHITECTURE.md, "Measurements behind the defaults"); ``block`` (16, block-max pruning, see
    :func:`tiled_topk`; 0 disables it); ``device`` ``"cpu"`` or ``"cuda[:i]"``;
    ``dtype`` ``float32`` (default) or ``float16``/``bfloat16`` (table stored in that precision on
    the device; fp32 accumulation on CUDA).  Filters are exact without over-fetch.
    """

    name = "torch"
    supported_dtypes = ("float32", "float16", "bfloat16")

    def __init__(self, item_embeddings: np.ndarray, *, device: str = "cpu", dtype: Any = "float32",
                 tile: int | None = None, block: int = 16, **options: Any) -> None:
        super().__init__(item_embeddings, device=device, dtype=dtype, **options)
        self._auto_tile = tile is None
        if tile is None:
            tile = CUDA_TILE if self.device.startswith("cuda") else CPU_TILE
        if int(tile) < 1 or int(block) < 0:
            raise InputError(f"tile must be >= 1 and block >= 0, got tile={tile}, block={block}")
        self.tile = int(tile)
        self.block = int(block)
        if self.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise DeviceError("device='cuda' asked for, but torch sees no CUDA device (CPU-only build or no GPU)")
            if self.device_index >= torch.cuda.device_count():
                raise DeviceError(f"{self.device} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
        tdt = _TORCH_DTYPES[self.dtype]
        base = torch.from_numpy(self.table)
        self._table_t = base.to(device=self.device, dtype=tdt) if (self.device != "cpu" or tdt != torch.float32) else base

    def _tile_for(self, batch: int) -> int:
        if not self.device.startswith("cuda") or not self._auto_tile:
            return self.tile
        return max(CPU_TILE, min(self.tile, CUDA_SCORE_BYTES // (4 * max(batch, 1))))

    def _fetch(self, queries: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.from_numpy(queries).to(self._table_t.device)
        with torch.inference_mode():
            return tiled_topk(q, self._table_t, kk, tile=self._tile_for(q.shape[0]), block=self.block)

    def _search_filtered(self, q: np.ndarray, k: int, f: Filters) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            return tiled_topk_filtered(q, self._table_t, k, f, tile=self._tile_for(q.shape[0]),
                                       subset_fraction=self.subset_fraction,
                                       block=self.block)

    def _exact(self, queries: np.ndarray, k: int, filters: Filters | None) -> tuple[np.ndarray, np.ndarray]:
        return self._search_filtered(queries, k, filters)  # type: ignore[arg-type]

    def close(self) -> None:
        self._table_t = None  # type: ignore[assignment]
