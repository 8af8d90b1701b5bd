"""Exact top-k in one fused pass: score + running top-k + exclusion/allowed filters (C++, CPU).

The catalogue is packed once into 32-item panels (:func:`dpr.kernels.score_topk.pack`). Each call scores
12-query x 32-item tiles in AVX-512 registers (6-query x 16-item halves with AVX2+FMA) and keeps only the
scores that beat a row's running k-th best; those few candidates are checked against the row's history
and allowed mask before they enter its heap. So filtering costs nothing extra: no over-fetch, no re-fetch
of short rows, no subset fallback, and the B x N score matrix is never written. Exact for any filter, by construction.

``screen`` (default ``"auto"``): ``"int8"`` scores every item first with an int8 dot product (``vpdpbusd`` on
AVX-512 VNNI, about twice the fp32 tiles' throughput) plus a rigorous bound on its error, and computes the
exact fp32 score (the same FMA chain as the fp32 tiles, so the same bits) only for the items the bound
cannot rule out against the row's running k-th best: the same top-k as ``"off"`` (fp32 scoring of every
item), by construction. ``"auto"`` takes ``"int8"`` when the CPU has AVX-512 VNNI (the kernel reports
``avx512vnni``), else ``"off"`` (the portable int8 screen is slower than the fp32 tiles). The choice and
why: ``self.screen`` / ``self.screen_reason`` / :meth:`describe`. The int8 tables are built once here
(N x d bytes + 4 floats per item); with the screen on, the packed fp32 table is not kept.

Needs ``libdpr_score_topk.so`` (``python -m dpr.kernels.build``, g++ only); CPU only. The tile is chosen
at run time (AVX-512, else AVX2+FMA; ``self.isa``); machines with neither run the portable tile from
``kernels/score_topk.h`` (correct, several times slower: ``retriever="auto"`` takes ONNX Runtime there).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dpr.util import physical_cores
from dpr.errors import InputError

from .base import DeviceError, Retriever
from .filters import Exclusions, Filters, pad_results

__all__ = ["FusedRetriever"]


class FusedRetriever(Retriever):
    """Options: ``threads`` (default the physical cores); ``screen``: ``"auto"`` | ``"int8"`` | ``"off"`` (see
    the module docstring). The base class's over-fetch options are accepted for interface compatibility and
    unused: filtering happens inside the kernel. Memory: besides the float32 table (the exact fallback and
    the int8 screen's re-scores read it), the packed fp32 table (about the size of the item table) with the
    screen off, or the int8 tables (a quarter of it, plus 16 bytes per item) with it on."""

    name = "fused"
    supported_dtypes = ("float32",)
    max_heap_k = 4096      # larger k: the exact tiled torch path (same results, no k-sized heaps per row)

    screens = ("auto", "int8", "off")

    def __init__(self, item_embeddings: np.ndarray, *, device: str = "cpu", dtype: Any = "float32",
                 threads: int | None = None, screen: str = "auto", **options: Any) -> None:
        super().__init__(item_embeddings, device=device, dtype=dtype, **options)
        if self.device != "cpu":
            raise DeviceError("the fused retriever runs on the CPU only (use 'torch' or 'faiss' on a GPU)")
        from dpr.kernels import score_topk

        if not score_topk.library_available():
            raise DeviceError("the fused retriever needs libdpr_score_topk.so: run python -m dpr.kernels.build")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                    or threads < 1):
            raise InputError(f"threads must be >= 1, got {threads!r}")
        if screen not in self.screens:
            raise InputError(f"screen must be one of {', '.join(map(repr, self.screens))}, got {screen!r}")
        self.threads = int(threads) if threads else physical_cores()
        self._kernel = score_topk
        self.isa = score_topk.isa()
        self.screen, self.screen_isa, self.screen_reason = self._choose_screen(screen)
        self._closed = False
        self._packed = self._int8 = None
        if self.screen == "int8":
            self._int8 = score_topk.pack_int8(self.table)
        else:
            self._packed = score_topk.pack(self.table)

    def _choose_screen(self, screen: str) -> tuple[str, str | None, str]:
        """(``"int8"`` or ``"off"``, the screen's instruction set or None, why)."""
        k = self._kernel
        if screen == "off":
            return "off", None, f"screen='off' requested: every item scored in fp32 ({self.isa} tile)"
        if self.dim > k.INT8_MAX_DIM:
            return "off", None, (f"d={self.dim} is above the int8 screen's limit ({k.INT8_MAX_DIM}): every item "
                                 f"scored in fp32 ({self.isa} tile)")
        auto = k.screen_isa()
        if screen == "int8":
            return "int8", auto, (f"screen='int8' requested: int8 screen ({auto}) + exact fp32 re-score of the "
                                  "items its error bound cannot rule out")
        if auto == "avx512vnni":
            return "int8", auto, ("auto: the CPU has AVX-512 VNNI: int8 screen (vpdpbusd) with a rigorous error "
                                  "bound, exact fp32 re-score of the survivors (same top-k as fp32)")
        why = ("the CPU has no AVX-512 VNNI" if not k.cpu_has_vnni()
               else f"DPR_TOPK_ISA caps the kernel at {self.isa}")
        return "off", None, (f"auto: {why}: every item scored in fp32 ({self.isa} tile; the portable int8 "
                             "screen is slower)")

    @property
    def setup_note(self) -> str:
        return self.screen_reason

    def describe(self) -> dict:
        """What this retriever runs: the fp32 tile, the screen and why."""
        return {"name": self.name, "isa": self.isa, "screen": self.screen, "screen_isa": self.screen_isa,
                "screen_reason": self.screen_reason, "threads": self.threads}

    def _run(self, q: np.ndarray, kk: int, offsets=None, items=None, allowed=None, rows_sorted: bool = True):
        if self.screen == "int8":
            return self._kernel.score_topk_int8(q, self.table, self._int8, kk, offsets, items, allowed,
                                                threads=self.threads, rows_sorted=rows_sorted)
        return self._kernel.score_topk(q, self._packed, self.num_items, kk, offsets, items, allowed,
                                       threads=self.threads, rows_sorted=rows_sorted)

    def search(self, queries: np.ndarray, k: int, exclude: Any = None,
               allowed_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`Retriever.search`. Exclusions the engine made (``Exclusions(checked=True)``: its batch's
        offsets and histories as they are) or with sorted rows, and a bool allowed mask, go to the kernel as
        they are: the kernel checks them (offsets, items in 0..N), sorts unsorted rows in its own threads and
        applies them while it scores. No (row, item) keys are built and split again here."""
        direct = (exclude is None or (isinstance(exclude, Exclusions) and (exclude.rows_sorted or exclude.checked))) \
            and (allowed_mask is None or (isinstance(allowed_mask, np.ndarray) and allowed_mask.dtype == np.bool_))
        if not direct or self._closed:
            return super().search(queries, k, exclude=exclude, allowed_mask=allowed_mask)
        q = self._check_queries(queries)
        k = self._check_k(k)
        kk = min(k, self.num_items)
        if q.shape[0] == 0 or kk > self.max_heap_k:
            return super().search(q, k, exclude=exclude, allowed_mask=allowed_mask)
        offsets = items = None
        if exclude is not None:
            offsets, items = np.asarray(exclude.offsets), np.asarray(exclude.items)
            if offsets.dtype.kind not in "iu" or items.dtype.kind not in "iu" or offsets.shape != (q.shape[0] + 1,):
                raise InputError(f"Exclusions must have {q.shape[0] + 1} integer offsets and integer items, got "
                                 f"offsets {offsets.dtype} {offsets.shape} and items {items.dtype}")
        n1 = self.num_items + 1
        if allowed_mask is not None and allowed_mask.shape not in ((n1,), (q.shape[0], n1)):
            raise InputError(f"allowed_mask must have shape ({n1},) or ({q.shape[0]}, {n1}) (catalogue of "
                             f"{self.num_items} items plus padding row 0), got {allowed_mask.shape}")
        try:
            idx, sc = self._run(q, kk, offsets, items, allowed_mask,
                                rows_sorted=exclude is None or exclude.rows_sorted)
        except (self._kernel.KernelError, ValueError) as exc:
            raise InputError(f"exclusions or allowed mask refused by the fused kernel: {exc}") from None
        return pad_results(idx, sc, k)

    def _search(self, q: np.ndarray, kk: int, filters: Filters | None) -> tuple[np.ndarray, np.ndarray]:
        if self._closed:
            raise InputError("this retriever is closed")
        if kk > self.max_heap_k:
            # a running heap per row suits small k; a huge k (a full re-ranking) goes to the tiled torch kernel
            return self._exact(q, kk, filters)
        offsets = items = allowed = None
        if filters is not None:
            if filters.excl_keys.size:
                offsets, items = filters.excl_lists()
            allowed = filters.allowed
        return self._run(q, kk, offsets, items, allowed)

    def _fetch(self, queries: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        return self._run(queries, kk)

    def close(self) -> None:
        self._closed = True
        self._packed = self._int8 = None
