"""The DPR inference engine: export folder -> validated pipeline -> batched promptable top-k.

    from dpr.engine import Engine
    engine = Engine.load("model-onnx")                       # backend="auto", device="auto"
    recs = engine.recommend([["1193", "661"], ["914"]], prompts=["more comedy", None],
                            negative_prompts=[None, "no horror"], k=10)
    recs[0].titles, recs[0].scores

Pipeline: prompts (deduplicated in the batch, LRU-cached per export model hash) -> tokenizer ->
prompt-encoder graph; histories (original ids -> internal indices, most recent ``max_len`` kept,
left-padded with 0) + prompt vectors + presence -> user-encoder graph; exact top-k retrieval over the
item table excluding the history (all of it, not only the kept ``max_len``) and what the hard filter
disallows. Rows with fewer eligible items than ``k`` return fewer results and say why (``count``,
``short_reason``). Item ids are strings; a history entry that is not one is an InputError naming the
request, the position and the type, with an example id of the export.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from dpr.errors import DPRError, InputError

from .backends import AUTO_ORDER, backend_class, cuda_available
from .batch import ID_FORMS, RequestBatch, ResultBatch
from .retrieval.base import Exclusions
from .errors import BackendError
from .manifest import ExportFolder, load_export
from .prompt_cache import PromptCache

log = logging.getLogger("dpr.engine")

DEFAULT_MAX_PROMPT_BYTES = 16 * 1024
# Prompts are encoded in chunks of similar length, each at most this many (rows x longest-row) tokens.
# "auto": on the CPU, 1024 (less padding, activations stay in cache: ~1.4-1.6x on MiniLM, 2 cores); on a
# GPU, one padded batch (many small chunks are launch-bound there: 3.6x slower on an H200).
DEFAULT_PROMPT_CHUNK_TOKENS = "auto"
CPU_PROMPT_CHUNK_TOKENS = 1024
# With a backend that runs several chunks at once (concurrent_runs > 1), smaller chunks: MiniLM on 640
# unique prompts, 2 cores, two chunks at a time: 771 ms at 1024 tokens, 721 ms at 512 (int8: 258 -> 239).
CPU_CONCURRENT_PROMPT_CHUNK_TOKENS = 512
# Histories are run in chunks of this many rows, ordered by length, each cut to its longest history, when
# the backend allows it (padding-invariant backbone, graph with a dynamic history axis). "auto": 64 on the
# CPU (SASRec user encoder at batch 512, median history 30 of max_len 50, 2 cores: 46 ms uncut -> 26 ms in
# chunks of 256 -> 13 ms in chunks of 64 run two at a time; serially 64 and 256 rows tie); off on a GPU (not
# measured there).
DEFAULT_HISTORY_CHUNK_ROWS = "auto"
CPU_HISTORY_CHUNK_ROWS = 64
FILTER_KEYS = ("include_tags", "exclude_tags", "exclude_items")


def _is_integer(x) -> bool:
    """An int or numpy integer, not a bool (history ids given as integers are taken in their decimal form)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _short_repr(x, limit: int = 60) -> str:
    r = repr(x)
    return r if len(r) <= limit else r[:limit - 3] + "..."


# ---- results -------------------------------------------------------------------------------------

@dataclass
class Recommendation:
    """One request's ranked items (best first). ``count`` items came back of the ``k`` asked for; fewer only
    when fewer items are eligible (the history and the hard filter exclude the rest): ``short_reason`` then
    says why (None for a full result)."""
    item_ids: list[str]
    scores: list[float]
    titles: list[str]
    tags: list[list[str]]
    k: int | None = None               # how many were asked for (None: not recorded)
    count: int | None = None           # how many came back (len(item_ids); filled in when not given)
    short_reason: str | None = None    # why count < k, e.g. "only 3 items remain after excluding ..."

    def __post_init__(self):
        if self.count is None:
            self.count = len(self.item_ids)

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def short(self) -> bool:
        """True when fewer than ``k`` items came back."""
        return self.k is not None and self.count < self.k

    def to_dict(self) -> dict:
        return {"k": self.k, "count": self.count, "short_reason": self.short_reason,
                "items": [{"rank": i + 1, "id": a, "title": t, "tags": g, "score": s}
                          for i, (a, t, g, s) in enumerate(zip(self.item_ids, self.titles, self.tags, self.scores))]}


@dataclass
class Recommendations:
    """A batch's results: per-row lists (``item_ids[i]`` is row i's ranking); ``recs[i]`` is a Recommendation.
    ``ks[i]`` items were asked for and ``counts[i]`` came back; ``short_reasons[i]`` says why a row is short
    (None when full); ``short_rows`` lists the short rows."""
    item_ids: list[list[str]] = field(default_factory=list)
    scores: list[list[float]] = field(default_factory=list)
    titles: list[list[str]] = field(default_factory=list)
    tags: list[list[list[str]]] = field(default_factory=list)
    ks: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    short_reasons: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.item_ids)

    def __getitem__(self, i: int) -> Recommendation:
        return Recommendation(self.item_ids[i], self.scores[i], self.titles[i], self.tags[i],
                              k=self.ks[i] if self.ks else None, count=self.counts[i] if self.counts else None,
                              short_reason=self.short_reasons[i] if self.short_reasons else None)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def short_rows(self) -> list[int]:
        """The rows that got fewer than their ``k`` items."""
        return [i for i, r in enumerate(self.short_reasons) if r is not None]

    def to_list(self) -> list[dict]:
        return [r.to_dict() for r in self]


@dataclass
class Request:
    """One recommendation request (what :class:`~dpr.engine.batcher.DynamicBatcher` takes; a dict with
    these keys works too)."""
    history: Sequence
    prompt: Any = None
    negative_prompt: Any = None
    k: int = 10
    exclude_history: bool = True
    hard_filter: Any = None


@dataclass
class _Row:
    seq: np.ndarray            # internal indices, full known history (chronological)
    prompt: str | None
    negative: str | None
    k: int
    exclude_history: bool
    filter_key: tuple | None


def _offsets(lens) -> np.ndarray:
    """(B + 1,) int64 row offsets of rows of these lengths, from 0."""
    out = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=out[1:])
    return out


def _flatten(seqs) -> tuple[np.ndarray, np.ndarray]:
    """Rows of item indices as one int64 array and its row offsets."""
    seqs = [np.asarray(s, dtype=np.int64).reshape(-1) for s in seqs]
    flat = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
    return flat, _offsets([len(s) for s in seqs])


@dataclass
class _Batch:
    """Validated rows, column by column: the histories as one array with offsets (no per-row arrays)."""
    flat: np.ndarray           # every row's internal indices, concatenated (chronological within a row)
    offsets: np.ndarray        # (B + 1,): row i is flat[offsets[i]:offsets[i + 1]]
    prompts: list              # str | None per row
    negatives: list
    ks: list[int]
    exclude_history: np.ndarray    # bool (B,)
    filter_keys: list

    @classmethod
    def from_rows(cls, rows: list[_Row]) -> "_Batch":
        flat, offsets = _flatten([r.seq for r in rows])
        return cls(flat, offsets, [r.prompt for r in rows], [r.negative for r in rows], [r.k for r in rows],
                   np.array([r.exclude_history for r in rows], dtype=bool), [r.filter_key for r in rows])


# ---- the engine ------------------------------------------------------------------------------------

class Engine:
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
        self.prompt_chunk_tokens = self._check_prompt_chunk_tokens(prompt_chunk_tokens, device, self.chunk_workers)
        self.history_chunk_rows = self._check_history_chunk_rows(history_chunk_rows, device)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
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
        self.dim = export.dim
        self.max_batch = export.max_batch
        items = export.items()
        self.item_ids: list[str] = [str(x) for x in items["ids"]]
        self.titles: list[str] = list(items["titles"])
        # tuples, not lists: tuples of strings leave the garbage collector's books (the first collection
        # untracks them), so 10^5 items add no work to every later full collection of the serving process
        self.item_tags: list[tuple[str, ...]] = [tuple(t) for t in items["tags"]]
        self.tag_names: list[str] = list(items.get("tag_names") or sorted({t for ts in self.item_tags for t in ts}))
        self.num_items = len(self.item_ids)
        self._ids_obj = np.array(self.item_ids, dtype=object)        # for the batch lookup of results
        self._titles_obj = np.array(self.titles, dtype=object)
        self._tags_obj = np.empty(self.num_items, dtype=object)
        for i, t in enumerate(self.item_tags):     # element-wise: numpy would turn equal-length tuples into 2-D
            self._tags_obj[i] = t
        self._id_to_index = {a: i + 1 for i, a in enumerate(self.item_ids)}
        self._id_index = self._make_id_index(self.item_ids)
        self._tag_index = {t: i for i, t in enumerate(self.tag_names)}
        tm = np.zeros((self.num_items + 1, max(1, len(self.tag_names))), dtype=bool)
        for i, ts in enumerate(self.item_tags, start=1):
            for t in ts:
                if t in self._tag_index:
                    tm[i, self._tag_index[t]] = True
        self._tag_matrix = tm
        self._tokenizer = self._make_tokenizer()
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
        row, at most ``max_batch``), each chunk cut to its own longest prompt: less padding, and
        activations that stay in cache. ``"auto"`` (default): 1024 on the CPU, off on a GPU. ``0`` or
        ``None``: one batch padded to its longest prompt per ``max_batch`` prompts (the unbucketed path).
        Vectors agree up to float rounding.
        ``history_chunk_rows``: when the backend can run cut histories (SASRec exports), histories are
        encoded in chunks of this many rows ordered by length, each cut to its longest history.
        ``"auto"`` (default): 256 on the CPU, off on a GPU; ``0`` or ``None``: off.
        """
        if unknown_items not in ("error", "ignore"):
            raise InputError(f"unknown_items must be 'error' or 'ignore', got {unknown_items!r}")
        cls._check_prompt_chunk_tokens(prompt_chunk_tokens, "cpu")
        cls._check_history_chunk_rows(history_chunk_rows, "cpu")
        export = load_export(export_dir, verify_hashes=verify_hashes)
        dev = cls._resolve_device(device)
        opts = dict(backend_options or {})
        if not isinstance(backend, str):
            raise BackendError(f"backend must be a string, got {backend!r}")
        if backend == "auto":
            be, reason = cls._auto_backend(export, dev, opts)
        else:
            klass = backend_class(backend)
            ok, why = klass.availability(dev)
            if not ok:
                raise BackendError(f"backend {backend!r} is not available on device={dev}: {why}")
            be = klass(export, dev, **opts)
            reason = f"backend {backend!r} requested explicitly ({why})"
        extra = be.describe()
        if "fused_reason" in extra:
            reason += f"; user encoder: {extra['fused_reason']}"
        rname, retr, rwhy = cls._make_retriever(export, retriever, dev, retriever_options or {})
        reason += f"; retriever {rname!r} ({rwhy})"
        log.info("dpr.engine: %s", reason)
        cache = prompt_cache if prompt_cache is not None else PromptCache(prompt_cache_size)
        return cls(export, be, retr, rname, dev, reason, cache, unknown_items, max_prompt_bytes,
                   prompt_chunk_tokens=prompt_chunk_tokens, history_chunk_rows=history_chunk_rows)

    @staticmethod
    def _chunk_setting(name: str, v, device: str, cpu_default: int) -> int:
        """A chunking knob: ``"auto"`` (``cpu_default`` on the CPU, 0 = off on a GPU), None/0 (off) or a count."""
        if v is None:
            return 0
        if isinstance(v, str) and v == "auto":
            return 0 if str(device).startswith("cuda") else cpu_default
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise InputError(f"{name} must be 'auto', a non-negative integer or None, got {v!r}")
        if v < 0:
            raise InputError(f"{name} must be >= 0 (0 or None: off), got {v}")
        return int(v)

    @classmethod
    def _check_history_chunk_rows(cls, v, device: str) -> int:
        return cls._chunk_setting("history_chunk_rows", v, device, CPU_HISTORY_CHUNK_ROWS)

    @classmethod
    def _check_prompt_chunk_tokens(cls, v, device: str, workers: int = 1) -> int:
        return cls._chunk_setting("prompt_chunk_tokens", v, device,
                                  CPU_CONCURRENT_PROMPT_CHUNK_TOKENS if workers > 1 else CPU_PROMPT_CHUNK_TOKENS)

    @staticmethod
    def _resolve_device(device: str) -> str:
        dev = str(device).lower()
        if dev == "auto":
            return "cuda" if cuda_available() else "cpu"
        if dev == "gpu":
            dev = "cuda"
        if dev == "cpu" or dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit()):
            if dev.startswith("cuda") and not cuda_available():
                raise BackendError(f"device={device!r} asked for but no CUDA device is visible")
            return dev
        raise InputError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}")

    @staticmethod
    def _auto_backend(export, dev: str, opts: dict):
        notes = []
        for name in AUTO_ORDER:
            klass = backend_class(name)
            ok, why = klass.availability(dev)
            if not ok:
                notes.append(f"{name}: {why}")
                continue
            try:
                be = klass(export, dev, **opts)
            except (DPRError, ImportError) as exc:
                notes.append(f"{name}: {exc}")
                continue
            skipped = f" (skipped {'; '.join(notes)})" if notes else ""
            return be, f"auto chose backend {name!r} on {dev}: {why}{skipped}"
        raise BackendError("no backend can run this export here: " + "; ".join(notes))

    @staticmethod
    def _make_retriever(export, name: str, dev: str, opts: dict):
        """(name, retriever, why): ``"auto"`` on the CPU is decided from the instruction set
        (:func:`dpr.engine.retrieval.auto_cpu_retriever`: ``fused`` on AVX-512 / AVX2+FMA, else ONNX
        Runtime); on a GPU ``torch`` (faiss on request)."""
        from dpr.engine.retrieval import auto_cpu_retriever, available_retrievers, get_retriever

        avail = available_retrievers()
        if name == "auto":
            if dev == "cpu":
                name, why = auto_cpu_retriever(avail)
                why = f"auto on cpu: {why}"
            else:
                name, why = "torch", f"auto on {dev}"
        elif name not in avail:
            from dpr.engine.retrieval import RETRIEVERS
            if name not in RETRIEVERS:
                raise BackendError(f"unknown retriever {name!r}; available: {', '.join(avail)}")
            raise BackendError(f"retriever {name!r} is not available here (missing dependency); "
                               f"available: {', '.join(avail)}")
        else:
            why = "requested explicitly"
        return name, get_retriever(name, export.item_embeddings(), device=dev, **opts), why

    @staticmethod
    def _make_id_index(ids: list[str]):
        """The C++ id index (a batch's history ids in one call, cache misses overlapped: ~4.7 -> 1.7 ms for
        21,000 ids on a cold cache), or None (library not built, or ids it cannot hold): the dict then."""
        try:
            from dpr.kernels import id_index
        except Exception:  # noqa: BLE001 - the kernels package is optional at run time
            return None
        if not id_index.library_available():
            return None
        try:
            return id_index.IdIndex(ids)
        except (ValueError, id_index.KernelError) as exc:
            log.info("dpr.engine: item ids mapped by a dict (%s)", exc)
            return None

    def _make_tokenizer(self):
        from tokenizers import Tokenizer

        info = self.export.manifest.get("tokenizer") or {}
        try:
            tok = Tokenizer.from_file(str(self.export.file("tokenizer.json")))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for a damaged file
            raise self.export.damaged("tokenizer.json", exc) from None
        s = info.get("setup") or {}
        tr = s.get("enable_truncation") or {"max_length": int(info.get("max_tokens") or 64)}
        tok.enable_truncation(max_length=int(tr["max_length"]), direction=tr.get("direction", "right"))
        pd = s.get("enable_padding") or {}
        tok.enable_padding(pad_id=int(pd.get("pad_id", 0)), pad_token=pd.get("pad_token", "[PAD]"),
                           direction=pd.get("direction", "right"))
        self._add_special = bool(info.get("add_special_tokens", True))
        return tok

    def describe(self) -> dict:
        return {"export": str(self.export.path), "model_hash": self.model_hash, "device": self.device,
                "backend": self.backend.describe(), "retriever": self.retriever_name,
                "choice_reason": self.choice_reason, "num_items": self.num_items, "d": self.dim,
                "max_len": self.max_len, "max_batch": self.max_batch, "prompt_chunk_tokens": self.prompt_chunk_tokens,
                "history_chunk_rows": self.history_chunk_rows if self._trims_history else 0,
                "chunk_workers": self.chunk_workers,
                "prompt_cache": self.prompt_cache.stats()}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with self._pool_lock:
                if self._pool is not None:
                    self._pool.shutdown(wait=True)
                    self._pool = None
            self.backend.close()
            self.retriever.close()
            if self._id_index is not None:
                self._id_index.close()

    def _run_chunks(self, fn, chunks: list) -> None:
        """``fn(chunk)`` for every chunk: ``chunk_workers`` at a time on the engine's thread pool when the
        backend runs each call single-threaded, else in order on this thread. ``fn`` writes disjoint rows."""
        if self.chunk_workers <= 1 or len(chunks) <= 1:
            for c in chunks:
                fn(c)
            return
        with self._pool_lock:
            if self._closed:
                raise DPRError("the engine is closed")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.chunk_workers, thread_name_prefix="dpr-chunk")
            futures = [self._pool.submit(fn, c) for c in chunks]
        for f in futures:            # every chunk finishes before the first error (if any) is raised
            f.exception()
        for f in futures:
            f.result()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- validation ----------------------------------------------------------------------------
    def _check_prompt(self, p, what: str) -> str | None:
        if p is None:
            return None
        if isinstance(p, (bytes, bytearray)):
            try:
                p = bytes(p).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        if not isinstance(p, str):
            raise InputError(f"{what} must be a string or None, got {type(p).__name__}")
        try:
            n = len(p.encode("utf-8"))
        except UnicodeEncodeError:
            raise InputError(f"{what} holds characters that cannot be encoded as UTF-8 (lone surrogates)") from None
        if n > self.max_prompt_bytes:
            raise InputError(f"{what} is too long ({n} bytes; the limit is {self.max_prompt_bytes})")
        s = p.strip()
        if not s:
            raise InputError(f"{what} is empty or whitespace only (pass None for no prompt)")
        return s

    def _check_k(self, k) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise InputError(f"k must be an integer, got {k!r}")
        if k < 1:
            raise InputError(f"k must be >= 1, got {k}")
        if k > self.num_items:
            raise InputError(f"k={k} is larger than the catalogue ({self.num_items} items)")
        return int(k)

    def _history_indices(self, history, what: str) -> np.ndarray:
        if history is None or isinstance(history, (str, bytes)) or not hasattr(history, "__len__"):
            raise InputError(f"{what} must be a list of item ids, got {type(history).__name__}")
        if len(history) == 0:
            raise InputError(f"{what} is empty (at least one item id is needed)")
        get = self._id_to_index.get
        try:
            fast = [get(x) for x in history]            # ids given as strings, all known: one dict lookup each
        except TypeError:                               # an unhashable entry: the checked loop names it
            fast = [None]
        if None not in fast:
            return np.asarray(fast, dtype=np.int64)
        out = []
        ignore = self.unknown_items == "ignore"
        for pos, x in enumerate(history):
            if isinstance(x, str):
                idx = self._id_to_index.get(x)
                if idx is None and not ignore:
                    raise InputError(f"{what} holds unknown item id {_short_repr(x)} at position {pos} (not in "
                                     f"the export's catalogue; {self._id_example()})")
            else:       # not a string: an integer whose decimal form is an id (ML-1M's 1193), else refused
                idx = self._id_to_index.get(str(int(x))) if _is_integer(x) else None
                if idx is None and not ignore:
                    raise self._non_string_id(x, pos, what)
            if idx is not None:
                out.append(idx)
        if not out:
            raise InputError(f"{what} holds no known item id (all ignored as unknown)")
        return np.asarray(out, dtype=np.int64)

    def _id_example(self) -> str:
        """What a valid id of this export looks like (for error messages)."""
        ex = ", ".join(repr(a) for a in self.item_ids[:2])
        return f"ids in this export look like {ex}" if ex else "this export has no items"

    def _non_string_id(self, x, pos: int, what: str) -> InputError:
        """The error for a history entry that is not a string id (None, bytes, a float, an unknown integer...)."""
        got = "None" if x is None else f"{type(x).__name__} {_short_repr(x.item() if isinstance(x, np.generic) else x)}"
        hint = ""
        if isinstance(x, (bytes, bytearray)):
            try:
                text = bytes(x).decode("utf-8")
            except UnicodeDecodeError:
                text = None
            if text is not None and text in self._id_to_index:
                hint = f"; decode bytes ids to str ({text!r} is an id of this export)"
        elif _is_integer(x):
            hint = f"; '{int(x)}' is not an id either"
        return InputError(f"{what}: item ids are strings (got {got} at position {pos}){hint}; {self._id_example()}")

    def _filter_key(self, f, what: str) -> tuple | None:
        if f is None:
            return None
        if not isinstance(f, Mapping):
            f = {k: getattr(f, k) for k in FILTER_KEYS if getattr(f, k, None) is not None} \
                if any(hasattr(f, k) for k in FILTER_KEYS) else f
        if not isinstance(f, Mapping):
            raise InputError(f"{what} must be None or a dict with keys {FILTER_KEYS}, got {type(f).__name__}")
        bad = [k for k in f if k not in FILTER_KEYS]
        if bad:
            raise InputError(f"{what} has unknown key(s) {bad}; allowed: {', '.join(FILTER_KEYS)}")
        parts = []
        for key in FILTER_KEYS:
            vals = f.get(key) or ()
            if isinstance(vals, str):
                vals = (vals,)
            if key == "exclude_items":
                bad = [v for v in vals if not isinstance(v, str) and not _is_integer(v)]
                if bad:
                    got = "None" if bad[0] is None else f"{type(bad[0]).__name__} {_short_repr(bad[0])}"
                    raise InputError(f"{what}: exclude_items: item ids are strings (got {got}); {self._id_example()}")
                vals = [v if isinstance(v, str) else str(int(v)) for v in vals]
            vals = tuple(sorted({str(v) for v in vals}))
            if key.endswith("tags"):
                unknown = [v for v in vals if v not in self._tag_index]
                if unknown:
                    raise InputError(f"{what}: unknown tag(s) {unknown}; known tags: {', '.join(self.tag_names)}")
            else:
                unknown = [v for v in vals if v not in self._id_to_index]
                if unknown:
                    raise InputError(f"{what}: unknown item id(s) {unknown[:5]} (not in the export's catalogue; "
                                     f"{self._id_example()})")
            parts.append(vals)
        return tuple(parts) if any(parts) else None

    def _mask_for(self, key: tuple) -> np.ndarray:
        inc, exc, items = key
        m = np.ones(self.num_items + 1, dtype=bool)
        m[0] = False
        if inc:
            m &= self._tag_matrix[:, [self._tag_index[t] for t in inc]].any(axis=1)
        if exc:
            m &= ~self._tag_matrix[:, [self._tag_index[t] for t in exc]].any(axis=1)
        if items:
            m[[self._id_to_index[i] for i in items]] = False
        return m

    def validate_request(self, req, what: str = "request") -> _Row:
        """Check one request (a :class:`Request` or a dict of its fields); raises InputError naming the problem."""
        if isinstance(req, Mapping):
            bad = [k for k in req if k not in Request.__dataclass_fields__]
            if bad:
                raise InputError(f"{what} has unknown field(s) {bad}")
            if "history" not in req:
                raise InputError(f"{what} has no 'history'")
            req = Request(**req)
        elif not isinstance(req, Request):
            raise InputError(f"{what} must be a Request or a dict, got {type(req).__name__}")
        return _Row(seq=self._history_indices(req.history, f"{what}: history"),
                    prompt=self._check_prompt(req.prompt, f"{what}: prompt"),
                    negative=self._check_prompt(req.negative_prompt, f"{what}: negative prompt"),
                    k=self._check_k(req.k), exclude_history=bool(req.exclude_history),
                    filter_key=self._filter_key(req.hard_filter, f"{what}: hard_filter"))

    # ---- stages --------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        with self._tok_lock:
            enc = self._tokenizer.encode_batch(list(texts), add_special_tokens=self._add_special)
        ids = np.asarray([e.ids for e in enc], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in enc], dtype=np.int64)
        return ids, mask

    def encode_prompts(self, texts: Sequence[str], timings: dict | None = None) -> np.ndarray:
        """(len(texts), d) prompt vectors; repeats within the call and across calls hit the LRU cache."""
        texts = [self._check_prompt(t, f"prompt {i}") for i, t in enumerate(texts)]
        if any(t is None for t in texts):
            raise InputError("encode_prompts takes strings, not None")
        uniq = list(dict.fromkeys(texts))
        cached = self.prompt_cache.get_many(self.prompt_cache_key, uniq)
        vec = {t: v for t, v in zip(uniq, cached) if v is not None}
        todo = [t for t, v in zip(uniq, cached) if v is None]
        t_tok = t_enc = 0.0
        if todo:
            t0 = time.perf_counter()
            ids, mask = self.tokenize(todo)
            t1 = time.perf_counter()
            out = np.empty((len(todo), self.dim), np.float32)

            def run(chunk):
                rows, lo, hi = chunk
                out[rows] = np.asarray(self.backend.encode_prompts(np.ascontiguousarray(ids[rows, lo:hi]),
                                                                   np.ascontiguousarray(mask[rows, lo:hi])),
                                       dtype=np.float32)

            self._run_chunks(run, list(self._prompt_chunks(mask)))
            t_enc += time.perf_counter() - t1
            t_tok += t1 - t0
            self.prompt_cache.put_many(self.prompt_cache_key, todo, out)
            vec.update(zip(todo, out))
        if timings is not None:
            timings["tokenize"] = timings.get("tokenize", 0.0) + t_tok
            timings["prompt_encoder"] = timings.get("prompt_encoder", 0.0) + t_enc
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([vec[t] for t in texts]).astype(np.float32, copy=False)

    def _prompt_chunks(self, mask: np.ndarray):
        """Chunks of a tokenized batch: ``(rows, lo, hi)`` per chunk, ``rows`` indices into the batch, ``[lo,
        hi)`` the token columns any of them uses (the tokenizer pads to the batch's longest prompt; a chunk
        only needs its own longest). With ``prompt_chunk_tokens``: length buckets (rows ordered by token
        length, stable), at most that many tokens (rows x longest) and ``max_batch`` rows, at least one row.
        Without (0): consecutive runs of ``max_batch`` rows in the batch's order. With several chunk workers,
        at most ceil(rows / workers) rows per chunk, so that a small batch still keeps every worker busy."""
        lens = mask.sum(axis=1)
        budget, n = self.prompt_chunk_tokens, len(lens)
        cap = min(self.max_batch, max(1, math.ceil(n / self.chunk_workers)))
        order = np.argsort(lens, kind="stable") if budget else np.arange(n)
        start = 0
        while start < n:
            end = min(n, start + cap) if not budget else start + 1
            # ascending lengths: adding row `end` makes it the chunk's longest
            while budget and end < n and end - start < cap \
                    and (end - start + 1) * int(lens[order[end]]) <= budget:
                end += 1
            rows = order[start:end]
            used = np.flatnonzero(mask[rows].any(axis=0))
            lo, hi = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 1)
            yield rows, lo, hi
            start = end

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
        """``pad_histories`` of the rows ``flat[offsets[i]:offsets[i + 1]]``, in one vectorised pass."""
        b, L = len(offsets) - 1, self.max_len
        out = np.zeros((b, L), dtype=np.int64)
        take = np.minimum(np.diff(offsets), L)                  # the most recent max_len items of each row
        total = int(take.sum())
        if total:
            row = np.repeat(np.arange(b), take)
            within = np.arange(total) - np.repeat(np.cumsum(take) - take, take)     # 0.. take-1 per row
            out[row, L - take[row] + within] = flat[offsets[1:][row] - take[row] + within]
        return out

    def encode_users(self, histories, p_pos=None, p_neg=None, presence=None, timings: dict | None = None) -> np.ndarray:
        """(B, d) steered user vectors. ``histories``: lists of original item ids, or an int64 (B, max_len)
        array of internal indices (left-padded). Missing p_pos/p_neg/presence mean no prompt."""
        if isinstance(histories, np.ndarray) and histories.dtype.kind in "iu" and histories.ndim == 2:
            if histories.shape[1] != self.max_len:
                raise InputError(f"item_seq must have {self.max_len} columns, got {histories.shape[1]}")
            seq = histories.astype(np.int64)
        else:
            seq = self.pad_histories([self._history_indices(h, f"history {i}") for i, h in enumerate(histories)])
        b = seq.shape[0]
        p_pos = np.zeros((b, self.dim), np.float32) if p_pos is None else np.asarray(p_pos, np.float32)
        p_neg = np.zeros((b, self.dim), np.float32) if p_neg is None else np.asarray(p_neg, np.float32)
        presence = np.zeros((b, 2), np.int64) if presence is None else np.asarray(presence, np.int64)
        for name, a, shape in (("p_pos", p_pos, (b, self.dim)), ("p_neg", p_neg, (b, self.dim)),
                               ("presence", presence, (b, 2))):
            if a.shape != shape:
                raise InputError(f"{name} must have shape {shape}, got {a.shape}")
        t0 = time.perf_counter()
        out = np.empty((b, self.dim), np.float32)

        def run(chunk):
            rows, width = chunk
            out[rows] = np.asarray(self.backend.encode_users(np.ascontiguousarray(seq[rows, self.max_len - width:]),
                                                             p_pos[rows], p_neg[rows], presence[rows]),
                                   dtype=np.float32)

        self._run_chunks(run, list(self._history_chunks(seq)))
        if timings is not None:
            timings["user_encoder"] = timings.get("user_encoder", 0.0) + time.perf_counter() - t0
        return out

    @property
    def _trims_history(self) -> bool:
        return bool(self.history_chunk_rows) and bool(getattr(self.backend, "trims_history", False))

    def _history_chunks(self, seq: np.ndarray):
        """``(rows, width)`` per chunk. Trimming: rows ordered by history length (stable),
        ``history_chunk_rows`` (and at most ``max_batch``) per chunk, ``width`` the chunk's longest history
        (>= 1), measured from the first non-padding column so that a history with a 0 inside is never cut.
        Otherwise consecutive rows at full width: ``max_batch`` per chunk, or with several chunk workers
        ``history_chunk_rows`` (when set). Several workers: at most ceil(rows / workers) rows per chunk."""
        n = len(seq)
        spread = max(1, math.ceil(n / self.chunk_workers))
        if not self._trims_history:
            step = self.history_chunk_rows if self.chunk_workers > 1 and self.history_chunk_rows else self.max_batch
            step = max(1, min(step, self.max_batch, spread))
            for s in range(0, n, step):
                yield slice(s, min(s + step, n)), self.max_len
            return
        nz = seq > 0
        lens = np.where(nz.any(axis=1), self.max_len - nz.argmax(axis=1), 0)
        order = np.argsort(lens, kind="stable")
        step = max(1, min(self.history_chunk_rows, self.max_batch, spread))
        for s in range(0, n, step):
            rows = order[s:s + step]
            yield rows, max(1, int(lens[rows].max()))

    def retrieve(self, vectors: np.ndarray, k: int, exclude=None, allowed_mask=None,
                 timings: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over the item table: (indices (B, k) internal, -1 padded; scores)."""
        t0 = time.perf_counter()
        out = self.retriever.search(vectors, k, exclude=exclude, allowed_mask=allowed_mask)
        if timings is not None:
            timings["retrieval"] = timings.get("retrieval", 0.0) + time.perf_counter() - t0
        return out

    # ---- the whole pipeline ----------------------------------------------------------------------
    def recommend(self, histories, prompts=None, negative_prompts=None, k: int = 10, exclude_history=True,
                  hard_filter=None, timings: dict | None = None) -> Recommendations:
        """Recommend for a batch. ``histories``: list of lists of original item ids (most recent last);
        ``prompts`` / ``negative_prompts``: None or a list of str-or-None of the same length; ``hard_filter``:
        None, one dict shared by all rows (keys include_tags / exclude_tags / exclude_items), or a list of
        per-row dicts-or-None. ``timings`` (a dict) receives seconds per stage."""
        batch = self._validated_batch(histories, prompts, negative_prompts, k, exclude_history, hard_filter)
        return self._run_batch(batch, timings)

    # ---- the columnar batch API --------------------------------------------------------------------
    def recommend_batch(self, batch: RequestBatch, timings: dict | None = None) -> ResultBatch:
        """Recommend for a :class:`~dpr.engine.batch.RequestBatch` (histories as one flat array plus row
        offsets, ids or catalogue indices; prompt columns; one ``k``). The batch is checked once, column by
        column (``InputError`` naming the row), then runs the same pipeline as :meth:`recommend`: the same
        requests give the same items and scores. Returns a :class:`~dpr.engine.batch.ResultBatch`:
        ``indices`` (B, k) int64 catalogue indices (short rows padded with 0, score -inf), ``scores`` (B, k)
        float32, ``counts`` (B,) int64; ``ids`` / ``titles`` / ``tags`` looked up on first use."""
        vb = self._validated_request_batch(batch)
        idx, sc, mask = self._search_batch(vb, timings)
        k = vb.ks[0]
        idx, sc = idx[:, :k], sc[:, :k]
        valid = idx > 0
        counts = valid.sum(axis=1).astype(np.int64)
        if not valid.all():
            idx = np.where(valid, idx, 0)
            sc = np.where(valid, sc, np.float32(-np.inf))
        # owned, C-contiguous, writable: torch.from_numpy / DLPack take them as they are
        idx = np.require(idx, np.int64, ("C", "W", "O"))
        sc = np.require(sc, np.float32, ("C", "W", "O"))
        reasons: list = [None] * len(counts)
        for i in np.flatnonzero(counts < k).tolist():
            reasons[i] = self._short_reason(vb, i, int(counts[i]), mask)
        return ResultBatch(idx, sc, counts, k, reasons, self._ids_obj, self._titles_obj, self._tags_obj)

    def _validated_request_batch(self, rb) -> _Batch:
        """A RequestBatch checked as a whole, vectorised where the check allows: offsets, the flat history
        array (ids mapped, or indices range-checked), prompt columns, k, exclude_history, hard filter."""
        if not isinstance(rb, RequestBatch):
            raise InputError(f"recommend_batch takes a RequestBatch, got {type(rb).__name__} "
                             f"(lists of histories go to recommend())")
        if rb.form not in ID_FORMS:
            raise InputError(f"RequestBatch.form must be one of {ID_FORMS}, got {rb.form!r}")
        flat = rb.flat
        if flat is None or isinstance(flat, (str, bytes)) or not hasattr(flat, "__len__"):
            raise InputError(f"the flat history array must be an array or list of {rb.form}, "
                             f"got {type(flat).__name__}")
        if isinstance(flat, np.ndarray) and flat.ndim != 1:
            raise InputError(f"the flat history array must be 1-D, got shape {flat.shape}")
        offsets = self._check_offsets(rb.offsets, len(flat))
        b = len(offsets) - 1
        if rb.form == "indices":
            flat = self._check_flat_indices(flat, offsets)
        else:
            flat, offsets = self._map_flat_ids(flat, offsets)

        def per_row(x, name):
            if x is None:
                return [None] * b
            if isinstance(x, (str, bytes)) or not isinstance(x, (Sequence, np.ndarray)):
                raise InputError(f"{name} must be None or a column of {b} entries (one per row), "
                                 f"got {type(x).__name__}")
            if isinstance(x, np.ndarray) and x.ndim != 1:
                raise InputError(f"{name} must be a 1-D column of {b} entries, got shape {x.shape}")
            if len(x) != b:
                raise InputError(f"{name} has {len(x)} entries but the batch has {b} rows (lengths must match)")
            return x.tolist() if isinstance(x, np.ndarray) else list(x)

        pos = self._check_prompt_column(per_row(rb.prompts, "prompts"), "prompt", "row")
        neg = self._check_prompt_column(per_row(rb.negative_prompts, "negative_prompts"), "negative prompt", "row")
        k = self._check_k(rb.k)
        if not isinstance(rb.exclude_history, (bool, np.bool_)):
            raise InputError(f"exclude_history must be a bool (one for the batch), got {rb.exclude_history!r}")
        fkeys = self._filter_keys(self._filter_column(rb.hard_filter, b, per_row), "row")
        return _Batch(flat, offsets, pos, neg, [k] * b, np.full(b, bool(rb.exclude_history)), fkeys)

    @staticmethod
    def _row_of(offsets: np.ndarray, pos: int) -> int:
        """The row holding flat position ``pos``."""
        return int(np.searchsorted(offsets, pos, side="right")) - 1

    @staticmethod
    def _check_offsets(offsets, n: int) -> np.ndarray:
        """(B + 1,) int64 row offsets: integers, from 0 to ``n`` (the flat array's length), no row empty."""
        if offsets is None or isinstance(offsets, (str, bytes)) or not hasattr(offsets, "__len__"):
            raise InputError(f"offsets must be an int64 array of B + 1 row offsets, got {type(offsets).__name__}")
        a = np.asarray(offsets)
        if a.dtype.kind not in "iu":
            raise InputError(f"offsets must be integers (int64), got dtype {a.dtype}")
        if a.ndim != 1:
            raise InputError(f"offsets must be 1-D (B + 1 entries), got shape {a.shape}")
        if len(a) < 2:
            raise InputError(f"offsets has {len(a)} entries: it needs B + 1 >= 2 (at least one row)")
        if a.dtype.kind == "u" and a.max() > np.iinfo(np.int64).max:
            raise InputError(f"offsets hold values past int64 ({int(a.max())})")
        a = a.astype(np.int64)
        if a[0] != 0:
            raise InputError(f"offsets[0] must be 0, got {int(a[0])}")
        d = np.diff(a)
        bad = np.flatnonzero(d < 0)
        if bad.size:
            i = int(bad[0])
            raise InputError(f"row {i}: offsets are not monotonic (offsets[{i}]={int(a[i])} > "
                             f"offsets[{i + 1}]={int(a[i + 1])})")
        if a[-1] != n:
            raise InputError(f"offsets[-1] is {int(a[-1])} but the flat history array has {n} entries "
                             f"(they must be equal; offsets has {len(a)} entries for {len(a) - 1} rows)")
        empty = np.flatnonzero(d == 0)
        if empty.size:
            i = int(empty[0])
            raise InputError(f"row {i}: history is empty (offsets[{i}] == offsets[{i + 1}] == {int(a[i])}; "
                             f"at least one item is needed)")
        return a

    def _check_flat_indices(self, flat, offsets: np.ndarray) -> np.ndarray:
        """Catalogue indices: integers (not bools, not floats) in 1..N."""
        f = np.asarray(flat)
        if f.dtype.kind not in "iu":
            if f.dtype.kind == "O":            # name the first entry that is not an integer
                for p, x in enumerate(f.tolist()):
                    if not _is_integer(x):
                        r = self._row_of(offsets, p)
                        got = "None" if x is None else f"{type(x).__name__} {_short_repr(x)}"
                        raise InputError(f"row {r}: history: catalogue indices are integers 1..{self.num_items} "
                                         f"(got {got} at position {p - int(offsets[r])})")
            else:
                raise InputError(f"catalogue indices must be integers 1..{self.num_items}, got dtype {f.dtype}"
                                 f"{' (use RequestBatch.from_ids for item ids)' if f.dtype.kind in 'USO' else ''}")
            try:
                f = f.astype(np.int64)
            except OverflowError:
                raise InputError(f"catalogue indices must be integers 1..{self.num_items}") from None
        if f.ndim != 1:
            raise InputError(f"the flat history array must be 1-D, got shape {f.shape}")
        bad = np.flatnonzero((f < 1) | (f > self.num_items))
        if bad.size:
            p = int(bad[0])
            r = self._row_of(offsets, p)
            raise InputError(f"row {r}: history: catalogue index {int(f[p])} at position {p - int(offsets[r])} "
                             f"is out of range (indices run 1..{self.num_items}; 0 is padding)")
        return np.ascontiguousarray(f, dtype=np.int64)

    def _map_flat_ids(self, flat, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Item ids -> catalogue indices for the whole flat array in one call (the C++ id index, else a
        dict); an unknown or non-string id sends the rows to the per-row checks of ``recommend`` (same
        rules: integers in an id's decimal form, ``unknown_items="ignore"``), which name the row."""
        ids = flat.tolist() if isinstance(flat, np.ndarray) else list(flat)
        n = len(ids)
        got = None
        try:
            if self._id_index is not None:
                got = self._id_index.lookup(ids, n)
                if got is not None and not got.all():
                    got = None
            elif all(type(x) is str for x in ids):
                m = list(map(self._id_to_index.get, ids))
                got = None if None in m else np.array(m, dtype=np.int64)
        except TypeError:
            got = None
        if got is not None:
            return got, offsets
        o = offsets.tolist()
        return _flatten([self._history_indices(ids[o[i]:o[i + 1]], f"row {i}: history") for i in range(len(o) - 1)])

    def user_encoder_inputs(self, histories, prompts=None, negative_prompts=None) -> tuple:
        """What the user encoder gets for a batch, checked as ``recommend`` checks it: ``(item_seq (B, max_len)
        int64 left-padded internal indices, p_pos (B, d), p_neg (B, d), presence (B, 2) int64)``; feed them
        to :meth:`encode_users`. Prompts are encoded (or taken from the cache)."""
        batch = self._validated_batch(histories, prompts, negative_prompts, 1, True, None)
        p_pos, p_neg, presence = self._prompt_vectors(batch, None)
        return self._pad_flat(batch.flat, batch.offsets), p_pos, p_neg, presence

    def _validated_batch(self, histories, prompts, negative_prompts, k, exclude_history, hard_filter) -> _Batch:
        if isinstance(histories, (str, bytes)) or not isinstance(histories, Sequence) and not isinstance(
                histories, np.ndarray):
            raise InputError(f"histories must be a list of histories (lists of item ids), got {type(histories).__name__}")
        b = len(histories)
        if b == 0:
            raise InputError("histories is empty: no request to serve")

        def per_row(x, name):
            if x is None:
                return [None] * b
            if isinstance(x, (str, bytes)):
                raise InputError(f"{name} must be a list (one entry per history), not a single string")
            if not isinstance(x, (Sequence, np.ndarray)):
                raise InputError(f"{name} must be a list of length {b}, got {type(x).__name__}")
            if len(x) != b:
                raise InputError(f"{name} has {len(x)} entries but there are {b} histories (lengths must match)")
            return list(x)

        pos = per_row(prompts, "prompts")
        neg = per_row(negative_prompts, "negative_prompts")
        filters = self._filter_column(hard_filter, b, per_row)
        excl = per_row(exclude_history, "exclude_history") if isinstance(exclude_history, (list, tuple)) \
            else [exclude_history] * b
        k = self._check_k(k)
        # column by column, each distinct prompt / the shared filter checked once (templates repeat): the
        # same checks and messages as validate_request, without its per-row call overhead
        mapped = self._history_batch(histories)
        if mapped is None:                     # something to report or skip: row by row, naming the request
            flat, offsets = _flatten([self._history_indices(histories[i], f"request {i}: history") for i in range(b)])
        else:
            flat, offsets = mapped[0], _offsets(mapped[1])
        pos = self._check_prompt_column(pos, "prompt")
        neg = self._check_prompt_column(neg, "negative prompt")
        fkeys = self._filter_keys(filters)
        return _Batch(flat, offsets, pos, neg, [k] * b, np.array([bool(e) for e in excl]), fkeys)

    @staticmethod
    def _filter_column(hard_filter, b: int, per_row) -> list:
        """None, one filter for every row, or a per-row sequence (``per_row`` checks its length) -> (B,) list."""
        if hard_filter is None or isinstance(hard_filter, Mapping) or any(hasattr(hard_filter, a) for a in FILTER_KEYS):
            return [hard_filter] * b
        return per_row(hard_filter, "hard_filter")

    def _filter_keys(self, filters: list, label: str = "request") -> list:
        """The checked filter key of every row; a filter shared by every row is checked once."""
        if filters and all(f is filters[0] for f in filters):
            return [self._filter_key(filters[0], "hard_filter")] * len(filters)
        return [self._filter_key(f, f"{label} {i}: hard_filter") for i, f in enumerate(filters)]

    def _history_batch(self, histories) -> tuple[np.ndarray, list[int]] | None:
        """Every history mapped in one pass (the C++ id index, else one C-level dict map over all ids):
        ``(flat indices, row lengths)``, the fast path when every id of every row is known. None sends the
        batch to the per-row checks, which name the problem."""
        try:
            if any(isinstance(h, (str, bytes)) for h in histories):
                return None
            lens = [len(h) for h in histories]
            if 0 in lens:
                return None
            flat = None
            if self._id_index is not None:
                flat = self._id_index.lookup_many(histories)
                if flat is not None and not flat.all():
                    return None                # an unknown id
            if flat is None:                   # no index, or ids it cannot take (not strings, a NUL inside)
                got = list(map(self._id_to_index.get, chain.from_iterable(histories)))
                if None in got:
                    return None
                flat = np.array(got, dtype=np.int64)
        except TypeError:                      # an unsized history or an unhashable id
            return None
        return flat, lens

    def _check_prompt_column(self, column: list, what: str, label: str = "request") -> list:
        checked: dict[str, str | None] = {}
        out = []
        for i, p in enumerate(column):
            if isinstance(p, str) and p in checked:
                out.append(checked[p])
                continue
            v = self._check_prompt(p, f"{label} {i}: {what}")
            if isinstance(p, str):
                checked[p] = v
            out.append(v)
        return out

    def _run_rows(self, rows: list[_Row], timings: dict | None = None) -> Recommendations:
        """Rows checked one by one (``validate_request``; the dynamic batcher) through the batch pipeline."""
        return self._run_batch(_Batch.from_rows(rows), timings)

    def _prompt_vectors(self, batch: _Batch, timings: dict | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(p_pos, p_neg, presence) of a batch: each distinct prompt encoded (or found in the cache) once."""
        b = len(batch.prompts)
        p_pos = np.zeros((b, self.dim), np.float32)
        p_neg = np.zeros((b, self.dim), np.float32)
        presence = np.zeros((b, 2), np.int64)
        uniq = list(dict.fromkeys(t for t in chain(batch.prompts, batch.negatives) if t))
        if not uniq:
            if timings is not None:
                timings.setdefault("tokenize", 0.0)
                timings.setdefault("prompt_encoder", 0.0)
            return p_pos, p_neg, presence
        vecs = self.encode_prompts(uniq, timings=timings)
        where = {t: i for i, t in enumerate(uniq)}
        for col, texts, dst in ((0, batch.prompts, p_pos), (1, batch.negatives, p_neg)):
            rows = [i for i, t in enumerate(texts) if t]
            if rows:
                dst[rows] = vecs[[where[texts[i]] for i in rows]]
                presence[rows, col] = 1
        return p_pos, p_neg, presence

    def _search_batch(self, batch: _Batch, timings: dict | None = None):
        """The pipeline of a validated batch up to retrieval: ``(indices (B, max k) -1 padded, scores,
        allowed mask or None)``. ``recommend`` and ``recommend_batch`` both run it."""
        p_pos, p_neg, presence = self._prompt_vectors(batch, timings)
        seq = self._pad_flat(batch.flat, batch.offsets)
        users = self.encode_users(seq, p_pos, p_neg, presence, timings=timings)
        kmax = max(batch.ks)
        exclude = None
        if batch.exclude_history.any():
            if batch.exclude_history.all():
                exclude = Exclusions(batch.offsets, batch.flat)
            else:                              # keep the rows that exclude their history
                lens = np.diff(batch.offsets)
                exclude = Exclusions(_offsets(lens * batch.exclude_history),
                                     batch.flat[np.repeat(batch.exclude_history, lens)])
        keys = batch.filter_keys
        mask = None
        if any(keys):
            masks = {key: self._mask_for(key) for key in set(keys) if key}
            if len(set(keys)) == 1:
                mask = masks[keys[0]]
            else:
                full = np.ones(self.num_items + 1, dtype=bool)
                full[0] = False
                mask = np.stack([masks[key] if key else full for key in keys])
        idx, sc = self.retrieve(users, kmax, exclude=exclude, allowed_mask=mask, timings=timings)
        return idx, sc, mask

    def _run_batch(self, batch: _Batch, timings: dict | None = None) -> Recommendations:
        idx, sc, mask = self._search_batch(batch, timings)
        kmax = max(batch.ks)
        b = len(batch.ks)
        out = Recommendations(ks=list(batch.ks), short_reasons=[None] * b)
        same_k = all(k == kmax for k in batch.ks)
        if same_k and (idx > 0).all():
            # every row full: look the batch up in one go (object arrays, C loops) instead of per item
            pos = idx - 1
            out.item_ids = self._ids_obj[pos].tolist()
            out.titles = self._titles_obj[pos].tolist()
            out.scores = sc.tolist()
            out.tags = [list(map(list, row)) for row in self._tags_obj[pos].tolist()]   # copies, not aliases
            out.counts = [kmax] * b
            return out
        # retrievers pad a row with fewer eligible items than k with index -1 (score -inf): count per row
        valid = idx > 0
        ks = np.asarray(batch.ks, dtype=np.int64)
        if not same_k:
            valid &= np.arange(idx.shape[1]) < ks[:, None]
        counts = valid.sum(axis=1)
        out.counts = counts.tolist()
        for i in np.flatnonzero(counts < ks).tolist():
            out.short_reasons[i] = self._short_reason(batch, i, int(counts[i]), mask)
        for i, k in enumerate(batch.ks):
            ii, ss = idx[i, :k], sc[i, :k]
            keep = ii > 0
            ii, ss = ii[keep], ss[keep]
            out.item_ids.append([self.item_ids[j - 1] for j in ii])
            out.scores.append([float(s) for s in ss])
            out.titles.append([self.titles[j - 1] for j in ii])
            out.tags.append([list(self.item_tags[j - 1]) for j in ii])
        return out

    def _short_reason(self, batch: _Batch, i: int, count: int, mask: np.ndarray | None) -> str:
        """Why row ``i`` got ``count`` < k items: how many items its excluded history and hard filter leave."""
        k, n = batch.ks[i], self.num_items
        row_mask = None
        if batch.filter_keys[i] is not None and mask is not None:
            row_mask = mask if mask.ndim == 1 else mask[i]
        hist = (np.unique(batch.flat[batch.offsets[i]:batch.offsets[i + 1]]) if batch.exclude_history[i]
                else np.zeros(0, np.int64))
        allowed = n if row_mask is None else int(row_mask.sum())
        eligible = allowed - (hist.size if row_mask is None else int(row_mask[hist].sum()))
        if eligible > count:          # exact retrievers never do this; say so rather than guess a cause
            return (f"only {count} of the {eligible} eligible items came back (k={k}; retriever "
                    f"{self.retriever_name!r})")
        steps = []
        if hist.size:
            steps.append(f"excluding the {hist.size} history item{'s' if hist.size != 1 else ''}")
        if row_mask is not None:
            steps.append(f"applying the hard filter, which allows {allowed} of the {n} items")
        elif hist.size:
            steps[-1] += f" from the {n} in the catalogue"
        left = "no items remain" if count == 0 else (
            "only 1 item remains" if count == 1 else f"only {count} items remain")
        return f"{left} after {' and '.join(steps) or 'filtering'} (k={k})"
