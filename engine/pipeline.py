"""The stage pipeline of a checked batch (:class:`Columns`): prompts -> prompt vectors (deduplicated, LRU
cache, tokenized once, length-bucketed chunks) -> histories left-padded in one vectorised pass -> user
encoder (length-ordered chunks) -> retrieval with the history exclusion and hard filters -> top-k arrays.

:class:`StagePipeline` is the part of :class:`~dpr.engine.Engine` that runs models and kernels; each stage is
also public (``encode_prompts``, ``encode_users``, ``retrieve``) for callers that drive them one by one.
``timings`` (a dict) receives seconds per stage: ``tokenize``, ``prompt_encoder``, ``user_encoder`` and
``retrieval`` are the tokenizer, the model runs and the retrieval kernel; the engine adds ``host``, all the
rest (checks, id mapping, padding, exclusion lists, masks, result assembly).
"""

from __future__ import annotations

import time
from itertools import chain
from typing import NamedTuple, Sequence

import numpy as np

from dpr.errors import InputError
from dpr.kernels.history_pad import pad_flat

from .chunking import history_chunks, prompt_chunks
from .columns import Columns
from .retrieval.base import Exclusions


def _add(timings: dict | None, name: str, seconds: float) -> None:
    if timings is not None:
        timings[name] = timings.get(name, 0.0) + seconds


def exclusions(cols: Columns, num_items: int) -> Exclusions | None:
    """The history exclusion of a batch, as the batch holds it: its own offsets and histories (no copy when
    every row excludes its history), marked ``checked`` (offsets well formed, items in 1..N: the validation
    made sure). The fused retrieval kernel takes them as they are and sorts each row in its own threads; the
    other retrievers build their filters from them. No per-(row, item) keys are built and split again."""
    ex = cols.exclude_history
    if not ex.any():
        return None
    if ex.all():
        return Exclusions(cols.offsets, cols.flat, checked=True)
    lens = np.diff(cols.offsets)
    keep = np.repeat(ex, lens)
    lens = lens * ex
    offsets = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    return Exclusions(offsets, cols.flat[keep], checked=True)


def _first_bad(bad: np.ndarray) -> tuple[int, ...]:
    """Position (row first) of the first true entry of ``bad``."""
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape))


def _check_range(a: np.ndarray, lo: int, hi: int, name: str, what: str) -> None:
    if a.size and (a.min() < lo or a.max() > hi):
        pos = _first_bad((a < lo) | (a > hi))
        raise InputError(f"{name} row {pos[0]} holds {a[pos]} at column {pos[1]}: not a valid {what}; "
                         f"values run {lo}..{hi}")


def _prompt_vector_array(p, name: str, shape: tuple[int, int]) -> np.ndarray:
    """A (B, d) float32 prompt vector column, zeros when None; InputError for the wrong shape, type or a
    NaN / Inf entry (the model would turn it into a NaN user vector)."""
    if p is None:
        return np.zeros(shape, np.float32)
    try:
        a = np.asarray(p, np.float32)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be a float array of shape {shape}: {exc}") from None
    if a.shape != shape:
        raise InputError(f"{name} must have shape {shape}, got {a.shape}")
    if not np.isfinite(a).all():
        pos = _first_bad(~np.isfinite(a))
        raise InputError(f"{name} row {pos[0]} holds {a[pos]} at column {pos[1]}: prompt vectors must be finite")
    return a


def _presence_array(presence, b: int) -> np.ndarray:
    """The (B, 2) int64 presence flags (positive, negative prompt), zeros when None; each must be 0 or 1 (the
    model multiplies by them: 5 would scale the prompt's effect)."""
    if presence is None:
        return np.zeros((b, 2), np.int64)
    a = np.asarray(presence)
    if a.shape != (b, 2):
        raise InputError(f"presence must have shape {(b, 2)}, got {a.shape}")
    if a.dtype.kind not in "biuf":
        raise InputError(f"presence must hold 0 / 1 flags, got dtype {a.dtype}")
    bad = (a != 0) & (a != 1)
    if bad.any():
        pos = _first_bad(bad)
        raise InputError(f"presence row {pos[0]} holds {a[pos]} at column {pos[1]}: flags must be 0 or 1")
    return a.astype(np.int64)


class StagePipeline:
    """The model and kernel stages (mixed into :class:`~dpr.engine.Engine`, which sets the attributes)."""

    _device_path = None          # a DevicePath (torch on a GPU: CUDA graphs) when the engine has one

    # ---- prompts ----------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        with self._tok_lock:
            enc = self._tokenizer.encode_batch(list(texts), add_special_tokens=self._add_special)
        ids = np.asarray([e.ids for e in enc], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in enc], dtype=np.int64)
        return ids, mask

    def encode_prompts(self, texts: Sequence[str], timings: dict | None = None) -> np.ndarray:
        """(len(texts), d) prompt vectors; repeats within the call and across calls hit the LRU cache."""
        texts = [self.checker.check_prompt(t, f"prompt {i}") for i, t in enumerate(texts)]
        if any(t is None for t in texts):
            raise InputError("encode_prompts takes strings, not None")
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        uniq = list(dict.fromkeys(texts))
        vecs = self._encode_unique(uniq, timings)
        if len(uniq) == len(texts):
            return vecs
        where = {t: i for i, t in enumerate(uniq)}
        return vecs[[where[t] for t in texts]]

    def _encode_unique(self, uniq: list[str], timings: dict | None) -> np.ndarray:
        """(len(uniq), d) vectors of checked, distinct prompts: cached ones from the cache, the rest
        tokenized together and encoded in chunks."""
        cached = self.prompt_cache.get_many(self.prompt_cache_key, uniq)
        todo = [i for i, v in enumerate(cached) if v is None]
        if not todo:                              # every prompt cached (templates): one copy, no row loop
            _add(timings, "tokenize", 0.0)
            _add(timings, "prompt_encoder", 0.0)
            return np.concatenate(cached).reshape(len(cached), self.dim)     # 3x np.stack's speed here
        out = np.empty((len(uniq), self.dim), np.float32)
        for i, v in enumerate(cached):
            if v is not None:
                out[i] = v
        t_tok = t_enc = 0.0
        if todo:
            texts = [uniq[i] for i in todo]
            t0 = time.perf_counter()
            ids, mask = self.tokenize(texts)
            t1 = time.perf_counter()
            enc = np.empty((len(todo), self.dim), np.float32)

            def run(chunk):
                rows, lo, hi = chunk
                enc[rows] = np.asarray(self.backend.encode_prompts(np.ascontiguousarray(ids[rows, lo:hi]),
                                                                   np.ascontiguousarray(mask[rows, lo:hi])),
                                       dtype=np.float32)

            self._chunks.run(run, list(self._prompt_chunks(mask)))
            t_enc = time.perf_counter() - t1
            t_tok = t1 - t0
            self.prompt_cache.put_many(self.prompt_cache_key, texts, enc)
            out[todo] = enc
        _add(timings, "tokenize", t_tok)
        _add(timings, "prompt_encoder", t_enc)
        return out

    def _prompt_chunks(self, mask: np.ndarray):
        return prompt_chunks(mask, self.prompt_chunk_tokens, self.max_batch, self.chunk_workers)

    def _prompt_vectors(self, cols: Columns, timings: dict | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(p_pos, p_neg, presence) of a batch: each distinct prompt encoded (or found in the cache) once."""
        b = len(cols.prompts)
        where = dict.fromkeys(chain(cols.prompts, cols.negatives))      # distinct prompts, first-seen order
        where.pop(None, None)
        if not where:
            _add(timings, "tokenize", 0.0)
            _add(timings, "prompt_encoder", 0.0)
            return np.zeros((b, self.dim), np.float32), np.zeros((b, self.dim), np.float32), np.zeros((b, 2), np.int64)
        n = len(where)
        # the distinct vectors and one zero row after them: each column is one gather (no prompt -> row n)
        vecs = np.empty((n + 1, self.dim), np.float32)
        vecs[:n] = self._encode_unique(list(where), timings)
        vecs[n] = 0.0
        for i, t in enumerate(where):
            where[t] = i
        where[None] = n
        codes = [np.fromiter(map(where.__getitem__, texts), np.int64, len(texts))   # a C-level map, no row loop
                 for texts in (cols.prompts, cols.negatives)]
        presence = np.stack(codes, axis=1) != n
        return vecs.take(codes[0], axis=0), vecs.take(codes[1], axis=0), presence.astype(np.int64)

    # ---- histories --------------------------------------------------------------------------------------
    def pad_histories(self, seqs: Sequence[np.ndarray]) -> np.ndarray:
        """Left-pad (0) and truncate to max_len keeping the most recent items. Row by row: the specification
        the batch path's vectorised ``_pad_flat`` is tested against."""
        out = np.zeros((len(seqs), self.max_len), dtype=np.int64)
        for i, s in enumerate(seqs):
            s = np.asarray(s, dtype=np.int64)[-self.max_len:]
            if len(s):
                out[i, self.max_len - len(s):] = s
        return out

    def _pad_flat(self, flat: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """``pad_histories`` of the rows ``flat[offsets[i]:offsets[i + 1]]`` (checked columns): one pass in the
        native kernel (``dpr.kernels.history_pad``), or its whole-array numpy reference when that is not built."""
        return pad_flat(flat, offsets, self.max_len)

    def encode_users(self, histories, p_pos=None, p_neg=None, presence=None, timings: dict | None = None) -> np.ndarray:
        """(B, retrieval_dim) steered user vectors. ``histories``: lists of original item ids, or an int64
        (B, max_len) array of internal indices (left-padded, 0..N). Missing p_pos/p_neg/presence mean no
        prompt. Every input is checked (this is a public entry point: an index < 0 would be read from the end
        of the embedding table, a NaN would come back as a NaN user vector); errors name the field and row."""
        if isinstance(histories, np.ndarray) and histories.dtype.kind in "iu" and histories.ndim == 2:
            if histories.shape[1] != self.max_len:
                raise InputError(f"item_seq must have {self.max_len} columns, got {histories.shape[1]}")
            seq = histories.astype(np.int64, copy=False)
            _check_range(seq, 0, self.num_items, "item_seq", "item index (0 is padding, items are 1..N)")
        else:
            seq = self.pad_histories([self.checker.history_indices(h, f"history {i}") for i, h in enumerate(histories)])
        b = seq.shape[0]
        p_pos = _prompt_vector_array(p_pos, "p_pos", (b, self.dim))
        p_neg = _prompt_vector_array(p_neg, "p_neg", (b, self.dim))
        presence = _presence_array(presence, b)
        return self._encode_users(seq, p_pos, p_neg, presence, timings)

    def _encode_users(self, seq: np.ndarray, p_pos: np.ndarray, p_neg: np.ndarray, presence: np.ndarray,
                      timings: dict | None) -> np.ndarray:
        """``encode_users`` of checked arrays (the batch path's own, built from a validated batch)."""
        b = seq.shape[0]
        t0 = time.perf_counter()
        out = np.empty((b, self.retrieval_dim), np.float32)

        def run(chunk):
            rows, width = chunk
            out[rows] = np.asarray(self.backend.encode_users(np.ascontiguousarray(seq[rows, self.max_len - width:]),
                                                             p_pos[rows], p_neg[rows], presence[rows]),
                                   dtype=np.float32)

        self._chunks.run(run, list(self._history_chunks(seq)))
        _add(timings, "user_encoder", time.perf_counter() - t0)
        return out

    @property
    def _trims_history(self) -> bool:
        return bool(self.history_chunk_rows) and bool(getattr(self.backend, "trims_history", False))

    def _history_chunks(self, seq: np.ndarray):
        return history_chunks(seq, self._trims_history, self.history_chunk_rows, self.max_batch, self.chunk_workers)

    # ---- retrieval --------------------------------------------------------------------------------------
    def retrieve(self, vectors: np.ndarray, k: int, exclude=None, allowed_mask=None,
                 timings: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over the item table: (indices (B, k) internal, -1 padded; scores). ``k`` is checked as a
        request's k is: an integer in 1..N (an enormous k is an InputError, not a k-column allocation)."""
        k = self.checker.check_k(k)
        t0 = time.perf_counter()
        out = self.retriever.search(vectors, k, exclude=exclude, allowed_mask=allowed_mask)
        _add(timings, "retrieval", time.perf_counter() - t0)
        return out

    # ---- the whole batch ----------------------------------------------------------------------------------
    def _prepare(self, cols: Columns, timings: dict | None = None) -> "Prepared":
        """The first half of a checked batch: prompt vectors (the prompt encoder runs here for prompts not
        in the cache), padded histories, the exclusion lists and the allowed mask. The pipelined batcher
        runs it for batch N + 1 while :meth:`_execute` runs batch N."""
        p_pos, p_neg, presence = self._prompt_vectors(cols, timings)
        seq = self._pad_flat(cols.flat, cols.offsets)
        mask = self.catalogue.allowed_mask(cols.filter_keys)
        return Prepared(cols, seq, p_pos, p_neg, presence, mask, exclusions(cols, self.num_items))

    def _execute(self, prep: "Prepared", timings: dict | None = None):
        """The second half: user encoder and retrieval -> ``(indices (B, max k) -1 padded, scores, mask)``.
        With a device path (torch on a GPU: CUDA graphs) both run there back to back; a batch with hard
        filters takes its user vectors from it and the retriever's exact filtered search."""
        dp = self._device_path
        cols = prep.cols
        if dp is not None and prep.mask is None:
            er, ec = exclusion_pairs(prep.exclude, len(cols.offsets) - 1)
            idx, sc = dp.search(prep.seq, prep.p_pos, prep.p_neg, prep.presence, er, ec, cols.kmax, timings)
            return idx, sc, None
        if dp is not None:
            t0 = time.perf_counter()
            users = dp.encode_users(prep.seq, prep.p_pos, prep.p_neg, prep.presence)
            _add(timings, "user_encoder", time.perf_counter() - t0)
        else:
            users = self._encode_users(prep.seq, prep.p_pos, prep.p_neg, prep.presence, timings)
        idx, sc = self.retrieve(users, cols.kmax, exclude=prep.exclude, allowed_mask=prep.mask, timings=timings)
        return idx, sc, prep.mask

    def _search(self, cols: Columns, timings: dict | None = None):
        """A checked batch up to retrieval: ``(indices (B, max k) -1 padded, scores, allowed mask or None)``."""
        return self._execute(self._prepare(cols, timings), timings)


class Prepared(NamedTuple):
    """A batch between :meth:`StagePipeline._prepare` and :meth:`StagePipeline._execute`."""

    cols: Columns
    seq: np.ndarray
    p_pos: np.ndarray
    p_neg: np.ndarray
    presence: np.ndarray
    mask: np.ndarray | None
    exclude: Exclusions | None


def exclusion_pairs(ex: Exclusions | None, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The exclusion lists as (row, item) pairs, rows ascending (what the device path's graphs take)."""
    if ex is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.repeat(np.arange(rows, dtype=np.int64), np.diff(ex.offsets)), np.asarray(ex.items, np.int64)
