"""The device-bound path of the torch backend: user encoder and retrieval (score, history exclusion, top-k)
as one sequence of device work per batch, replayed from CUDA graphs captured per bucket.

Why: on a GPU the engine's device work for a batch of 512 is a few milliseconds, and eager PyTorch spends
about as long again launching its kernels one by one from Python; the user vectors also made a round trip
through host memory between the user encoder and the retriever. Here a batch is staged into pinned host
buffers, copied to static device buffers asynchronously on the engine's own stream, the user-encoder graph
and the retrieval graph are replayed back to back (the user vectors never leave the device), and only the
(B, k) top-k comes back, with one synchronisation per batch.

Buckets keep the number of graphs small and every shape static:

* batch rows: the next power of two (at most the export's ``max_batch`` rounded up; bigger batches run in
  pieces). Spare rows repeat row 0 (a real history: an all-padding row could make NaNs) and are dropped;
* history width (backbones that are padding invariant, SASRec): the next power of two >= 8 covering the
  batch's longest history, at most ``max_len``; others run at ``max_len``;
* k: the next power of two >= 16 (at most the catalogue); the first k of a sorted top-K are the top-k;
* exclusion pairs (row, item): the next power of two >= 256; spare pairs point at column 0, the padding row
  that is masked anyway.

Graphs are captured lazily, the first time a bucket is used (a warm-up on a side stream first, as
``torch.cuda.graphs`` requires), each with its own memory pool, so a graph's temporaries never alias
another's outputs. Without CUDA (or with ``graphs=False``) the same bucketed functions run eagerly: that is
what the CPU tests check against the engine's ordinary path, and the GPU tests check replay against it.

Hard filters (an allowed mask) take the user-encoder graph and then the retriever's own exact filtered
search: masks are rare, per-request and large, and not worth a graph per mask shape.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

log = logging.getLogger("dpr.engine")

MIN_WIDTH = 8
MIN_K = 16
MIN_PAIRS = 256
SCORE_BYTES = 1 << 30          # at most this much fp32 score block per tile (as the torch retriever)


def next_pow2(n: int, lo: int = 1) -> int:
    n = max(int(n), int(lo), 1)
    return 1 << (n - 1).bit_length()


def device_topk(q, table, kk: int, tile: int, er, ec, block: int = 16):
    """Exact top-``kk`` of ``q @ table.T`` with column 0 (padding) and the (row ``er``, column ``ec``) pairs
    masked, as tensors ``(values (R, kk) sorted descending, columns (R, kk))``: the tile loop of
    :func:`~dpr.engine.retrieval.exact_topk.tiled_topk` (its scoring, selection and merge) with no host
    synchronisation and no data-dependent shape anywhere, so CUDA graphs can capture it: the exclusion pairs
    are masked by one fixed-shape ``index_add_`` per tile instead of being split by tile on the host."""
    import torch

    from .retrieval.exact_topk import merge_topk, score_tile, select_tile_topk

    m = table.shape[0]
    kk = min(kk, m)
    use_blocks = block > 1 and 4 * kk * block <= tile
    lanes = torch.arange(block, device=q.device).view(1, block, 1) if use_blocks else None
    ninf = torch.full((), float("-inf"), device=q.device)     # a fill kernel, not a host copy: capturable
    zero = torch.zeros((), device=q.device)
    best_v = best_i = None
    for s0 in range(0, m, tile):
        w = min(m, s0 + tile) - s0
        s = score_tile(q, table[s0:s0 + w])
        if s0 == 0:
            s[:, 0] = float("-inf")
        if er is not None:
            # pairs of other tiles add 0 to a clamped column, this tile's add -inf (atomic adds on a GPU)
            local = ec - s0
            inside = (local >= 0) & (local < w)
            s.view(-1).index_add_(0, er * w + local.clamp(0, w - 1), torch.where(inside, ninf, zero))
        v, i = select_tile_topk(s, kk, lanes)
        best_v, best_i = merge_topk(best_v, best_i, v, i + s0, kk)
    best_v, j = torch.sort(best_v, dim=1, descending=True, stable=True)
    return best_v, torch.gather(best_i, 1, j)


class _Step:
    """One bucket's function on static buffers: host staging (pinned on CUDA), device inputs, and either a
    captured CUDA graph or the eager call. ``run`` copies host -> device, replays, and leaves the outputs in
    ``outs`` (device); the caller copies them out before the next run of the same step."""

    def __init__(self, torch, fn, host_specs: list[tuple[tuple, object]], device, stream, capture: bool):
        self.torch, self.fn, self.stream = torch, fn, stream
        pin = device.type == "cuda"
        self.host = [torch.zeros(shape, dtype=dt, pin_memory=pin) for shape, dt in host_specs]
        self.host_np = [h.numpy() for h in self.host]
        self.dev = [h.to(device) if pin else h for h in self.host]
        self.graph = None
        if capture:
            # warm-up on a side stream (cuBLAS handles, lazy inits), then capture on it
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(2):
                    fn(*self.dev)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(self.graph, stream=side):
                self.outs = fn(*self.dev)
        else:
            self.outs = None

    def upload(self, first: int = 0) -> None:
        """Host staging -> device inputs (asynchronous from pinned memory; nothing to do on the CPU)."""
        for h, d in zip(self.host[first:], self.dev[first:]):
            if d is not h:
                d.copy_(h, non_blocking=True)

    def run(self, upload: bool = True):
        if upload:
            self.upload()
        if self.graph is None:
            with self.torch.inference_mode():
                self.outs = self.fn(*self.dev)
        else:
            self.graph.replay()
        return self.outs


class DevicePath:
    """User encoder + retrieval of checked arrays, bucketed, from CUDA graphs on a GPU (see the module doc).

    ``model``: the DPR model (``model(item_seq, p_pos, p_neg, presence) -> (B, D)``); ``table``: the
    retrieval table (N + 1, D) tensor on the model's device; ``graphs``: capture CUDA graphs (needs CUDA).
    One batch at a time (the static buffers are shared): calls are serialised by a lock."""

    def __init__(self, model, table, max_len: int, dim: int, max_batch: int, trims_history: bool,
                 graphs: bool, block: int = 16):
        import torch

        self.torch = torch
        self.model = model
        self.table = table
        self.device = table.device
        self.max_len, self.dim = int(max_len), int(dim)
        self.retrieval_dim = int(table.shape[1])
        self.num_rows = int(table.shape[0])                     # N + 1
        self.max_rows = next_pow2(max_batch)
        self.trims_history = bool(trims_history)
        self.graphs = bool(graphs) and self.device.type == "cuda"
        self.block = int(block)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._users: dict[tuple, _Step] = {}
        self._search: dict[tuple, _Step] = {}
        self._lock = threading.Lock()
        self.fallback: str | None = None

    def describe(self) -> dict:
        return {"graphs": self.graphs, "fallback": self.fallback, "user_graphs": sorted(self._users), "retrieval_graphs": sorted(self._search)}

    # ---- buckets ------------------------------------------------------------------------------------------
    def width_bucket(self, seq: np.ndarray) -> int:
        if not self.trims_history or not seq.size:
            return self.max_len
        used = seq != 0
        longest = int((self.max_len - used.argmax(axis=1))[used.any(axis=1)].max(initial=1))
        return min(self.max_len, next_pow2(longest, MIN_WIDTH))

    def k_bucket(self, k: int) -> int:
        return min(self.num_rows, next_pow2(k, MIN_K))

    def _tile(self, rows: int) -> int:
        return max(16384, min(self.num_rows, SCORE_BYTES // (4 * rows)))

    # ---- steps ------------------------------------------------------------------------------------------------
    def _user_step(self, rows: int, width: int) -> _Step:
        key = (rows, width)
        step = self._users.get(key)
        if step is None:
            torch, d = self.torch, self.dim
            specs = [((rows, width), torch.int64), ((rows, d), torch.float32), ((rows, d), torch.float32),
                     ((rows, 2), torch.int64)]
            step = self._users[key] = self._make_step(lambda *a: self.model(*a).float(), specs, f"user encoder {key}")
        return step

    def _make_step(self, fn, specs, what: str) -> _Step:
        """A step, captured when graphs are on; a capture that fails turns graphs off for this engine (with the
        reason in ``describe()`` and the log) and the step runs eagerly: slower, never wrong."""
        if self.graphs:
            try:
                return _Step(self.torch, fn, specs, self.device, self.stream, True)
            except Exception as exc:  # noqa: BLE001 - any capture failure: eager is always correct
                self.graphs = False
                self.fallback = f"CUDA graph capture of the {what} step failed ({type(exc).__name__}: {exc}); eager"
                log.warning("dpr.engine: %s", self.fallback)
        return _Step(self.torch, fn, specs, self.device, self.stream, False)

    def _search_step(self, rows: int, kk: int, pairs: int) -> _Step:
        key = (rows, kk, pairs)
        step = self._search.get(key)
        if step is None:
            torch = self.torch
            tile, block = self._tile(rows), self.block
            specs = [((rows, self.retrieval_dim), torch.float32), ((pairs,), torch.int64), ((pairs,), torch.int64)]

            def fn(q, er, ec):
                return device_topk(q.to(self.table.dtype) if self.table.dtype != torch.float32 else q,
                                   self.table, kk, tile, er, ec, block)

            step = self._search[key] = self._make_step(fn, specs, f"retrieval {key}")
        return step

    # ---- running --------------------------------------------------------------------------------------------
    def _stage_users(self, step: _Step, seq, p_pos, p_neg, presence, rows: int) -> None:
        b, w = seq.shape[0], step.host_np[0].shape[1]
        hs, hp, hn, hf = step.host_np
        hs[:b] = seq[:, self.max_len - w:]
        hp[:b], hn[:b], hf[:b] = p_pos, p_neg, presence
        if b < rows:                           # spare rows repeat row 0: dropped after, never NaN
            hs[b:], hp[b:], hn[b:], hf[b:] = hs[0], hp[0], hn[0], hf[0]

    def encode_users(self, seq, p_pos, p_neg, presence) -> np.ndarray:
        """(B, D) user vectors through the user-encoder step (for batches that then take a filtered search)."""
        with self._lock, self._on_stream():
            out = np.empty((seq.shape[0], self.retrieval_dim), np.float32)
            for lo in range(0, seq.shape[0], self.max_rows):
                hi = min(seq.shape[0], lo + self.max_rows)
                rows = next_pow2(hi - lo)
                step = self._user_step(rows, self.width_bucket(seq[lo:hi]))
                self._stage_users(step, seq[lo:hi], p_pos[lo:hi], p_neg[lo:hi], presence[lo:hi], rows)
                out[lo:hi] = step.run()[: hi - lo].cpu().numpy()
            return out

    def search(self, seq, p_pos, p_neg, presence, excl_rows: np.ndarray, excl_cols: np.ndarray, k: int,
               timings: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (catalogue indices, -1 where fewer items are eligible; scores) of a checked batch:
        ``seq`` (B, max_len) left-padded int64, prompt vectors and flags, and the exclusion pairs (row, item)."""
        b = seq.shape[0]
        idx = np.empty((b, k), np.int64)
        sc = np.empty((b, k), np.float32)
        t_user = t_search = 0.0
        with self._lock, self._on_stream():
            for lo in range(0, b, self.max_rows):
                hi = min(b, lo + self.max_rows)
                sel = slice(None)
                if excl_rows.size:
                    a, z = np.searchsorted(excl_rows, (lo, hi))
                    sel = slice(int(a), int(z))
                er, ec = excl_rows[sel] - lo, excl_cols[sel]
                tu, ts = self._piece(seq[lo:hi], p_pos[lo:hi], p_neg[lo:hi], presence[lo:hi], er, ec, k,
                                     idx[lo:hi], sc[lo:hi])
                t_user += tu
                t_search += ts
        if timings is not None:
            timings["user_encoder"] = timings.get("user_encoder", 0.0) + t_user
            timings["retrieval"] = timings.get("retrieval", 0.0) + t_search
        return idx, sc

    def _piece(self, seq, p_pos, p_neg, presence, er, ec, k, idx_out, sc_out) -> tuple[float, float]:
        torch = self.torch
        b = seq.shape[0]
        rows, kk = next_pow2(b), self.k_bucket(k)
        pairs = next_pow2(len(er), MIN_PAIRS)
        users = self._user_step(rows, self.width_bucket(seq))
        search = self._search_step(rows, kk, pairs)
        cuda = self.device.type == "cuda"
        if cuda:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            ev[0].record()
        t0 = time.perf_counter()
        self._stage_users(users, seq, p_pos, p_neg, presence, rows)
        u = users.run()
        if cuda:
            ev[1].record()
        t1 = time.perf_counter()
        hq, hr, hc = search.host_np
        hr[: len(er)], hc[: len(ec)] = er, ec
        hr[len(er):] = 0
        hc[len(ec):] = 0                       # spare pairs mask column 0, the padding row
        search.dev[0].copy_(u)                 # device to device: the user vectors never visit the host
        search.upload(first=1)
        vals, cols = search.run(upload=False)
        vals, cols = vals[:b, :k].float(), cols[:b, :k]
        if cuda:
            v_host, c_host = vals.to("cpu", non_blocking=True), cols.to("cpu", non_blocking=True)
            ev[2].record()
            self.stream.synchronize()
            tu, ts = ev[0].elapsed_time(ev[1]) / 1e3, ev[1].elapsed_time(ev[2]) / 1e3
        else:
            v_host, c_host = vals, cols
            tu, ts = t1 - t0, time.perf_counter() - t1
        v = v_host.numpy()
        c = c_host.numpy().astype(np.int64, copy=False)
        sc_out[:] = v
        idx_out[:] = np.where(np.isneginf(v), -1, c)
        return tu, ts

    def _on_stream(self):
        import contextlib

        if self.stream is None:
            return contextlib.nullcontext()
        return self.torch.cuda.stream(self.stream)
