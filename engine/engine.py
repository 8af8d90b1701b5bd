"""The DPR inference engine: export folder -> validated pipeline -> batched promptable top-k.

    from dpr.engine import Engine
    engine = Engine.load("model-onnx")                       # backend="auto", device="auto"
    recs = engine.recommend([["1193", "661"], ["914"]], prompts=["more comedy", None],
                            negative_prompts=[None, "no horror"], k=10)
    recs[0].titles, recs[0].scores

A façade over parts that each have one job:

* :mod:`.validation` — requests checked and item ids mapped, whatever the entry point, into :class:`Columns`;
* :mod:`.catalogue` — item ids, titles, tags, the id index, hard filters and their masks;
* :mod:`.chunking` — how prompts and histories are cut into backend calls, and the pool that runs them;
* :mod:`.pipeline` — the stages: prompt vectors, padding, user encoder, retrieval with exclusions;
* :mod:`.assembly` — the retriever's arrays into a :class:`ResultBatch`, and that into per-row lists;
* :mod:`.loading` — the device, backend, retriever and tokenizer ``Engine.load`` chooses, with reasons.

``recommend_batch`` (columns in, columns out), ``recommend`` (lists in, lists out) and the dynamic batcher
(``_run_rows``) all run one core, :meth:`Engine._serve`: checked :class:`Columns` -> :class:`ResultBatch`.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from dpr.errors import InputError

from .assembly import recommendations, result_batch
from .batch import RequestBatch, ResultBatch
from .catalogue import FILTER_KEYS, Catalogue  # noqa: F401 - FILTER_KEYS re-exported
from .chunking import (CPU_CONCURRENT_PROMPT_CHUNK_TOKENS, CPU_HISTORY_CHUNK_ROWS,  # noqa: F401 - re-exported
                       CPU_PROMPT_CHUNK_TOKENS, DEFAULT_HISTORY_CHUNK_ROWS, DEFAULT_PROMPT_CHUNK_TOKENS,
                       ChunkRunner, history_chunk_rows_setting, prompt_chunk_tokens_setting)
from .columns import Columns, Request, Row  # noqa: F401 - Request re-exported
from .columns import flatten as _flatten  # noqa: F401 - re-exported under its former name
from .loading import make_backend, make_retriever, make_tokenizer, resolve_device
from .manifest import ExportFolder, load_export
from .pipeline import StagePipeline
from .prompt_cache import PromptCache
from .results import Recommendation, Recommendations  # noqa: F401 - re-exported
from .validation import RequestChecker

log = logging.getLogger("dpr.engine")

DEFAULT_MAX_PROMPT_BYTES = 16 * 1024
_STAGES = ("tokenize", "prompt_encoder", "user_encoder", "retrieval")


def _check_timings(timings) -> dict | None:
    if timings is not None and not isinstance(timings, dict):
        raise InputError(f"timings must be None or a dict (it receives seconds per stage), got {type(timings).__name__}")
    return timings


class Engine(StagePipeline):
    """Load with :meth:`Engine.load`. Thread-safe: ``recommend`` may be called from many threads."""

    def __init__(self, export: ExportFolder, backend, retriever, retriever_name: str, device: str,
                 choice_reason: str, prompt_cache: PromptCache, unknown_items: str = "error",
                 max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
                 prompt_chunk_tokens: int | str | None = DEFAULT_PROMPT_CHUNK_TOKENS,
                 history_chunk_rows: int | str | None = DEFAULT_HISTORY_CHUNK_ROWS):
        if unknown_items not in ("error", "ignore"):
            raise InputError(f"unknown_items must be 'error' or 'ignore', got {unknown_items!r}")
        # a backend whose calls each run on one thread: the engine runs that many chunks of a batch at once
        self.chunk_workers = max(1, int(getattr(backend, "concurrent_runs", 1) or 1))
        self.prompt_chunk_tokens = prompt_chunk_tokens_setting(prompt_chunk_tokens, device, self.chunk_workers)
        self.history_chunk_rows = history_chunk_rows_setting(history_chunk_rows, device)
        self._chunks = ChunkRunner(self.chunk_workers)
        self.export = export
        self.backend = backend
        self.backend_name = backend.name
        self.retriever = retriever
        self.retriever_name = retriever_name
        self.device = device
        self.choice_reason = choice_reason
        self.prompt_cache = prompt_cache
        self.unknown_items = unknown_items
        self.max_prompt_bytes = int(max_prompt_bytes)
        self.model_hash = export.model_hash
        # prompt vectors depend on the weights (model hash) and on the prompt encoder's numerics
        self.prompt_cache_key = f"{export.model_hash}:{getattr(backend, 'prompt_variant', 'fp32')}"
        self.max_len = export.max_len
        self.dim = export.dim                       # prompt vectors (the projection's output)
        self.retrieval_dim = export.retrieval_dim   # steered user vectors and item rows
        self.max_batch = export.max_batch
        self.catalogue = Catalogue(export.items())
        self.checker = RequestChecker(self.catalogue, self.max_prompt_bytes, unknown_items)
        self.item_ids, self.titles, self.item_tags = self.catalogue.item_ids, self.catalogue.titles, self.catalogue.item_tags
        self.tag_names, self.num_items = self.catalogue.tag_names, self.catalogue.num_items
        # torch on a GPU: user encoder and retrieval replayed from CUDA graphs (engine/device_path.py)
        make_path = getattr(backend, "device_path", None)
        self._device_path, self.device_path_reason = (make_path(retriever, self.max_batch) if make_path else
                                                      (None, f"off (the {backend.name} backend)"))
        self._tokenizer, self._add_special = make_tokenizer(export)
        self._tok_lock = threading.Lock()
        self._closed = False

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def load(cls, export_dir, backend: str = "auto", device: str = "auto", retriever: str = "auto",
             prompt_cache_size: int = 4096, prompt_cache: PromptCache | None = None, unknown_items: str = "error",
             max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES, verify_hashes: bool = True,
             backend_options: dict | None = None, retriever_options: dict | None = None,
             prompt_chunk_tokens: int | str | None = DEFAULT_PROMPT_CHUNK_TOKENS,
             history_chunk_rows: int | str | None = DEFAULT_HISTORY_CHUNK_ROWS) -> "Engine":
        """Validate the export (format, version, every file's sha256) and build the pipeline.

        ``backend``: ``"auto"`` (TensorRT on a GPU with TensorRT, else ONNX Runtime (CUDA provider on a
        GPU), else torch), or a name. ``device``: ``"auto"`` (cuda when visible), ``"cuda"``, ``"cpu"``.
        ``backend_options`` go to the backend (e.g. ``{"fused": False}``, ``{"checkpoint": path}``,
        ``{"fp16": True}``). The choice and its reason: ``engine.choice_reason`` / ``engine.describe()``.
        ``prompt_chunk_tokens``: uncached prompts are tokenized together, ordered by token length and
        encoded in chunks of at most this many tokens (rows x the chunk's longest prompt; at least one
        row, at most ``max_batch``), each chunk cut to its own longest prompt. ``"auto"`` (default): 1024
        on the CPU (512 with concurrent chunk workers), off on a GPU. ``0`` or ``None``: one batch padded to
        its longest prompt per ``max_batch`` prompts. Vectors agree up to float rounding.
        ``history_chunk_rows``: when the backend can run cut histories (SASRec exports), histories are
        encoded in chunks of this many rows ordered by length, each cut to its longest history.
        ``"auto"`` (default): 64 on the CPU, off on a GPU; ``0`` or ``None``: off.
        """
        if unknown_items not in ("error", "ignore"):
            raise InputError(f"unknown_items must be 'error' or 'ignore', got {unknown_items!r}")
        prompt_chunk_tokens_setting(prompt_chunk_tokens, "cpu")
        history_chunk_rows_setting(history_chunk_rows, "cpu")
        export = load_export(export_dir, verify_hashes=verify_hashes)
        dev = resolve_device(device)
        be, reason = make_backend(export, backend, dev, dict(backend_options or {}))
        extra = be.describe()
        if "fused_reason" in extra:
            reason += f"; user encoder: {extra['fused_reason']}"
        rname, retr, rwhy = make_retriever(export, retriever, dev, retriever_options or {})
        reason += f"; retriever {rname!r} ({rwhy})"
        log.info("dpr.engine: %s", reason)
        cache = prompt_cache if prompt_cache is not None else PromptCache(prompt_cache_size)
        return cls(export, be, retr, rname, dev, reason, cache, unknown_items, max_prompt_bytes,
                   prompt_chunk_tokens=prompt_chunk_tokens, history_chunk_rows=history_chunk_rows)

    @staticmethod
    def _check_history_chunk_rows(v, device: str) -> int:
        return history_chunk_rows_setting(v, device)

    @staticmethod
    def _check_prompt_chunk_tokens(v, device: str, workers: int = 1) -> int:
        return prompt_chunk_tokens_setting(v, device, workers)

    def describe(self) -> dict:
        return {"export": str(self.export.path), "model_hash": self.model_hash, "device": self.device,
                "backend": self.backend.describe(), "retriever": self.retriever_name,
                "choice_reason": self.choice_reason, "num_items": self.num_items, "d": self.dim,
                "retrieval_dim": self.retrieval_dim,
                "max_len": self.max_len, "max_batch": self.max_batch, "prompt_chunk_tokens": self.prompt_chunk_tokens,
                "history_chunk_rows": self.history_chunk_rows if self._trims_history else 0,
                "chunk_workers": self.chunk_workers, "device_path": self.device_path_reason,
                "prompt_cache": self.prompt_cache.stats()}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._chunks.close()
            self.backend.close()
            self.retriever.close()
            self.catalogue.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _run_chunks(self, fn, chunks: list) -> None:
        self._chunks.run(fn, chunks)

    # ---- the parts' state, under the names callers and tests use ------------------------------------
    @property
    def _id_index(self):
        return self.catalogue.id_index

    @_id_index.setter
    def _id_index(self, index) -> None:        # None: map ids with the dict (tests compare the two)
        self.catalogue.id_index = index

    @property
    def _id_to_index(self) -> dict:
        return self.catalogue.id_to_index

    @property
    def _tags_obj(self) -> np.ndarray:
        return self.catalogue.tags_obj

    def _filter_key(self, f, what: str):
        return self.catalogue.filter_key(f, what)

    def _mask_for(self, key: tuple) -> np.ndarray:
        return self.catalogue.mask_for(key)

    # ---- entry points ----------------------------------------------------------------------------
    def recommend(self, histories, prompts=None, negative_prompts=None, k=10, exclude_history=True,
                  hard_filter=None, timings: dict | None = None) -> Recommendations:
        """Recommend for a batch. ``histories``: list of lists of original item ids (most recent last);
        ``prompts`` / ``negative_prompts``: None or a list of str-or-None of the same length; ``k``: an int, or
        one per row; ``exclude_history``: a bool, or one per row; ``hard_filter``: None, one dict shared by all
        rows (keys include_tags / exclude_tags / exclude_items), or a list of per-row dicts-or-None.
        ``timings`` (a dict) receives seconds per stage. Lists in, lists out: the columnar core of
        :meth:`recommend_batch` in between."""
        t0 = self._host_start(timings)
        cols = self.checker.columns_from_lists(histories, prompts, negative_prompts, k, exclude_history, hard_filter)
        out = recommendations(self._serve(cols, timings))
        self._host_time(t0, timings)
        return out

    def recommend_batch(self, batch: RequestBatch, timings: dict | None = None) -> ResultBatch:
        """Recommend for a :class:`~dpr.engine.batch.RequestBatch` (histories as one flat array plus row
        offsets, ids or catalogue indices; prompt columns; ``k`` and ``exclude_history`` for the batch or per
        row). The batch is checked once, column by column (``InputError`` naming the row), then runs the same
        core as :meth:`recommend`: the same requests give the same items and scores. Returns a
        :class:`~dpr.engine.batch.ResultBatch`: ``indices`` (B, k) int64 catalogue indices (short rows padded
        with 0, score -inf), ``scores`` (B, k) float32, ``counts`` (B,) int64; ``ids`` / ``titles`` / ``tags``
        looked up on first use."""
        t0 = self._host_start(timings)
        res = self._serve(self.checker.columns_from_batch(batch), timings)
        self._host_time(t0, timings)
        return res

    def validate_request(self, req, what: str = "request") -> Row:
        """Check one request (a :class:`Request` or a dict of its fields); raises InputError naming the problem."""
        return self.checker.row(req, what)

    def user_encoder_inputs(self, histories, prompts=None, negative_prompts=None) -> tuple:
        """What the user encoder gets for a batch, checked as ``recommend`` checks it: ``(item_seq (B, max_len)
        int64 left-padded internal indices, p_pos (B, d), p_neg (B, d), presence (B, 2) int64)``; feed them
        to :meth:`encode_users`. Prompts are encoded (or taken from the cache)."""
        cols = self.checker.columns_from_lists(histories, prompts, negative_prompts, 1, True, None)
        p_pos, p_neg, presence = self._prompt_vectors(cols, None)
        return self._pad_flat(cols.flat, cols.offsets), p_pos, p_neg, presence

    def _run_rows(self, rows, timings: dict | None = None) -> Recommendations:
        """Checked rows (the dynamic batcher's :class:`Columns`, or a list of ``validate_request`` rows)
        through the core."""
        cols = rows if isinstance(rows, Columns) else Columns.from_rows(rows)
        return recommendations(self._serve(cols, timings))

    def _finish(self, prep, timings: dict | None = None) -> Recommendations:
        """The second half of :meth:`_run_rows` for a batch :meth:`_prepare` took (the pipelined batcher's)."""
        idx, sc, mask = self._execute(prep, timings)
        return recommendations(result_batch(idx, sc, prep.cols, self.catalogue, mask, self.retriever_name))

    # ---- the core --------------------------------------------------------------------------------
    def _serve(self, cols: Columns, timings: dict | None) -> ResultBatch:
        idx, sc, mask = self._search(cols, timings)
        return result_batch(idx, sc, cols, self.catalogue, mask, self.retriever_name)

    @staticmethod
    def _host_start(timings) -> float:
        """The clock the ``host`` stage is measured from: now, less the stage seconds ``timings`` already holds."""
        _check_timings(timings)
        return time.perf_counter() - (sum(timings.get(s, 0.0) for s in _STAGES) if timings else 0.0)

    @staticmethod
    def _host_time(t0: float, timings: dict | None) -> None:
        """``timings["host"]``: the call's wall time less its tokenizer, model and retrieval-kernel time."""
        if timings is not None:
            timings["host"] = timings.get("host", 0.0) + max(
                0.0, time.perf_counter() - t0 - sum(timings.get(s, 0.0) for s in _STAGES))
