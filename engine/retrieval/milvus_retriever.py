"""Top-k over an item table kept in Milvus: Milvus Lite (embedded, a local file) or a Milvus cluster.

DPR steers in the user vector (the prompt moves the query, never the items), so the catalogue is a plain
inner-product index and any vector store can hold it. This retriever uploads the table (items ``1..N``;
row 0, the padding, is never stored) into one collection with fields ``id`` (INT64, the engine's item
index), ``vec`` (FLOAT_VECTOR, the table's full width: ``retrieval_dim``, ``d`` plus the tag channel's
columns when the model has one) and, when tags are given, ``tags`` (ARRAY of INT64 tag indices).

``uri`` picks the server: a local file path (``"build/items.db"``) runs Milvus Lite inside this process;
``"http://host:19530"`` talks to a cluster with the same client code (``token`` for its credentials).

How answers stay exact (``index="FLAT"``, metric IP; the default):

* **Allowed masks** (the hard filter's tags and excluded items) become a Milvus filter expression, applied
  by Milvus before selection. With ``tags`` given the retriever recognises the mask as a tag clause
  (``array_contains_any(tags, [...])``, ``not array_contains_any(...)``) plus at most ``max_expr_ids``
  excluded ids; otherwise (or when that leaves too many ids) it sends the shorter of ``id in [allowed]``
  and ``id not in [disallowed]``. Either is the mask exactly; rows with the same mask share one search.
* **History exclusion** is exact by over-fetch: row ``b`` asks for ``k + e_b`` candidates, ``e_b`` the
  number of its excluded items the mask allows, and drops them afterwards, so at least ``k`` eligible
  items remain whenever ``k`` exist. Milvus caps a search at ``MAX_TOPK`` (16384) results; a row whose
  ``k + e_b`` passes it is searched alone with ``id not in [its history]`` added to its expression.

Ties (equal scores) may come back in another order than the ``torch``/``fused`` retrievers', and Milvus
sums the products in its own order (scores agree to float32 rounding).

``index="IVF_FLAT"`` or ``"HNSW"`` trade exactness for speed (approximate: the filters above stay exact,
the ranking does not); ``bench/milvus_ann.py`` measures their Recall@10 against FLAT.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import numpy as np

from dpr.errors import InputError, require

from .base import Retriever
from .filters import Filters, pad_results

__all__ = ["MilvusRetriever", "MAX_TOPK", "INDEXES"]

FINGERPRINT = "dpr.fingerprint"  # collection property: what the collection holds (see _fingerprint)
MAX_TOPK = 16384                # Milvus's limit on one search's limit (topk)
INSERT_ROWS = 20000             # rows per insert call: keeps one gRPC message well under Milvus's 64 MiB cap
#: index type -> (build params, search params) defaults
INDEXES: dict[str, tuple[dict, dict]] = {
    "FLAT": ({}, {}),
    "IVF_FLAT": ({"nlist": 1024}, {"nprobe": 16}),
    "HNSW": ({"M": 16, "efConstruction": 200}, {"ef": 128}),
}


class MilvusRetriever(Retriever):
    """The item table in a Milvus collection. Options:

    ``uri`` (None: a fresh Milvus Lite file in a temporary folder, removed by :meth:`close`; a path: Milvus
    Lite on that file; ``http://host:19530``: a cluster), ``token`` (cluster credentials), ``collection``
    (``"dpr_items"``), ``index`` (``"FLAT"`` exact, ``"IVF_FLAT"``, ``"HNSW"``), ``index_params`` /
    ``search_params`` (override :data:`INDEXES`' defaults), ``tags`` (bool ``(N + 1, T)`` or ``(N, T)``:
    item tags, stored so masks become tag expressions; ``"table"``: the table's trailing 0/1 columns, the
    tag channel's, ``tag_columns`` of them), ``reuse`` (False: drop and re-upload the collection; True: use
    an existing collection as it is when it holds this very table, e.g. one filled by another replica: its
    ``dpr.fingerprint`` property holds a hash of the table, tags and index type; else it is re-uploaded. Replicas sharing a
    cluster should have one process fill the collection first: two uploading at once race),
    ``max_expr_ids`` (4096: ids one filter expression may list after a tag clause before the plain id
    list is used instead), ``max_topk`` (16384, Milvus's cap: the largest over-fetch before a row's history
    goes into its expression instead).
    """

    name = "milvus"

    def __init__(self, item_embeddings: np.ndarray, *, device: str = "cpu", dtype: Any = "float32",
                 uri: str | None = None, token: str = "", collection: str = "dpr_items", index: str = "FLAT",
                 index_params: dict | None = None, search_params: dict | None = None, tags: Any = None,
                 tag_columns: int = 0, reuse: bool = False, max_expr_ids: int = 4096, max_topk: int = MAX_TOPK,
                 **options: Any) -> None:
        super().__init__(item_embeddings, device=device, dtype=dtype, **options)
        if self.device != "cpu":
            raise InputError("the milvus retriever searches in the Milvus server: pass device='cpu' "
                             "(a cluster's query nodes pick their own devices)")
        pymilvus = require("pymilvus", "the milvus retriever")
        index = str(index).upper()
        if index not in INDEXES:
            raise InputError(f"index must be one of {', '.join(INDEXES)}, got {index!r}")
        if not isinstance(collection, str) or not collection.replace("_", "").isalnum() or collection[0].isdigit():
            raise InputError(f"collection must be letters, digits and '_' (not starting with a digit), got {collection!r}")
        self.index = index
        self.exact = index == "FLAT"
        self.collection = collection
        self.max_expr_ids = int(max_expr_ids)
        if not 1 <= int(max_topk) <= MAX_TOPK:
            raise InputError(f"max_topk must be in 1..{MAX_TOPK} (Milvus's limit), got {max_topk}")
        self.max_topk = int(max_topk)
        self._search_params = {**INDEXES[index][1], **(search_params or {})}
        self._tags = self._tag_matrix(tags, int(tag_columns))
        self._print = self._fingerprint()
        if uri is None or "://" not in str(uri):     # a file path: the embedded Milvus Lite serves it
            require("milvus_lite", "the milvus retriever on a local file (Milvus Lite; a cluster URI needs only "
                                   "pymilvus): pip install 'dpr[scale]'")
        self._tmpdir = self._client = None
        if uri is None:
            self._tmpdir = tempfile.mkdtemp(prefix="dpr-milvus-")
            uri = os.path.join(self._tmpdir, "items.db")
        self.uri = str(uri)
        try:
            self._client = pymilvus.MilvusClient(uri=self.uri, token=token)
            if not (reuse and self._usable_collection()):
                self._upload(pymilvus, {**INDEXES[index][0], **(index_params or {})})
            self._client.load_collection(collection)
        except BaseException:
            self.close()                                 # no temporary folder or connection left behind
            raise
        # the table lives in Milvus; the process keeps none of it (the catalogue-outgrows-the-host case)
        self.table = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ setup
    def _tag_matrix(self, tags: Any, tag_columns: int) -> np.ndarray | None:
        """Bool ``(N + 1, T)`` item tags (row 0 all false), or None."""
        if tags is None:
            return None
        if isinstance(tags, str):
            if tags != "table":
                raise InputError(f"tags must be a bool matrix or 'table', got {tags!r}")
            if not 1 <= tag_columns < self.dim:
                raise InputError(f"tags='table' needs tag_columns in 1..{self.dim - 1} (the tag channel's width), "
                                 f"got {tag_columns}")
            cols = self.table[:, self.dim - tag_columns:]
            if not np.isin(cols[1:], (0.0, 1.0)).all():
                raise InputError(f"the table's last {tag_columns} columns are not 0/1 tags")
            tm = cols != 0
        else:
            tm = np.asarray(tags)
            if tm.ndim != 2 or tm.shape[0] not in (self.num_items, self.num_items + 1) or tm.dtype.kind not in "biu":
                raise InputError(f"tags must be a bool matrix of shape ({self.num_items + 1}, T) or "
                                 f"({self.num_items}, T), got {getattr(tm, 'dtype', None)} {tm.shape}")
            tm = tm != 0
            if tm.shape[0] == self.num_items:
                tm = np.vstack([np.zeros((1, tm.shape[1]), bool), tm])
        tm = tm.copy()
        tm[0] = False
        return tm

    def _fingerprint(self) -> str:
        """What the collection holds: a hash of the table (and tags) and the index type, kept as a property
        of the collection so ``reuse`` never serves another export's items."""
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        h.update(np.ascontiguousarray(self.table[1:]).data)
        if self._tags is not None:
            h.update(np.packbits(self._tags[1:], axis=1).tobytes())
        return f"dpr items {self.num_items}x{self.dim} {self.index} {h.hexdigest()}"

    def _usable_collection(self) -> bool:
        if not self._client.has_collection(self.collection):
            return False
        props = self._client.describe_collection(self.collection).get("properties") or {}
        return props.get(FINGERPRINT) == self._print

    def _upload(self, pymilvus, index_params: dict) -> None:
        DataType = pymilvus.DataType
        c = self._client
        if c.has_collection(self.collection):
            c.drop_collection(self.collection)
        schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vec", DataType.FLOAT_VECTOR, dim=self.dim)
        if self._tags is not None:
            schema.add_field("tags", DataType.ARRAY, element_type=DataType.INT64,
                             max_capacity=max(1, self._tags.shape[1]))
        ip = c.prepare_index_params()
        ip.add_index(field_name="vec", index_type=self.index, metric_type="IP", params=index_params)
        # the fingerprint goes in last, once every row is in: a reader never takes a half-filled collection
        c.create_collection(self.collection, schema=schema, index_params=ip)
        for s in range(1, self.num_items + 1, INSERT_ROWS):
            e = min(self.num_items + 1, s + INSERT_ROWS)
            vecs = self.table[s:e]
            if self._tags is None:
                rows = [{"id": i, "vec": v} for i, v in zip(range(s, e), vecs)]
            else:
                rows = [{"id": i, "vec": v, "tags": np.flatnonzero(t).tolist()}
                        for i, v, t in zip(range(s, e), vecs, self._tags[s:e])]
            c.insert(self.collection, rows)
        c.flush(self.collection)
        c.alter_collection_properties(self.collection, properties={FINGERPRINT: self._print})

    # ------------------------------------------------------------------ filter expressions
    @staticmethod
    def _ids(op: str, ids: np.ndarray) -> str:
        return f"id {op} [{','.join(map(str, ids.tolist()))}]"

    def mask_expression(self, mask: np.ndarray) -> str | None:
        """The Milvus filter expression allowing exactly the items ``mask`` (N + 1,) allows (None: all)."""
        allowed = np.flatnonzero(mask[1:]) + 1
        if allowed.size == self.num_items:
            return None
        if self._tags is not None:
            expr = self._tag_expression(mask)
            if expr is not None:
                return expr
        if allowed.size <= self.num_items - allowed.size:
            return self._ids("in", allowed)
        return self._ids("not in", np.flatnonzero(~mask[1:]) + 1)

    def _tag_expression(self, mask: np.ndarray) -> str | None:
        """``mask`` as a tag clause and a short id list, or None. The clause always allows a superset of the
        mask, and the ids it allows beyond the mask are excluded by id, so the expression is exact. Excluded
        tags: those no allowed item carries. Included tags (when every allowed item carries a tag): those
        that cover the allowed items, taken fewest items outside the mask first (the hard filter's include_tags
        have none outside but its exclude_items). At most ``max_expr_ids`` ids may remain, else None."""
        tm = self._tags
        carried = (tm & mask[:, None]).any(axis=0)
        present = tm[1:].any(axis=0)
        excl = np.flatnonzero(present & ~carried)
        base = np.ones_like(mask)
        base[0] = False
        parts = []
        if excl.size:
            base &= ~tm[:, excl].any(axis=1)
            parts.append(f"not array_contains_any(tags, [{','.join(map(str, excl.tolist()))}])")
        inside = tm[mask]
        if inside.any(axis=1).all():
            # add carried tags, fewest outside items first, until they cover every allowed item
            outside = (tm & (base & ~mask)[:, None]).sum(axis=0)
            covered = np.zeros(inside.shape[0], bool)
            incl = []
            for t in sorted(np.flatnonzero(carried), key=lambda t: outside[t]):
                incl.append(int(t))
                covered |= inside[:, t]
                if covered.all():
                    break
            if len(incl) < tm.shape[1]:
                base &= tm[:, incl].any(axis=1)
                parts.append(f"array_contains_any(tags, [{','.join(map(str, sorted(incl)))}])")
        extra = np.flatnonzero(base & ~mask)
        if not parts or extra.size > self.max_expr_ids:
            return None
        if extra.size:
            parts.append(self._ids("not in", extra))
        return " and ".join(parts)

    # ------------------------------------------------------------------ search
    def _milvus_search(self, q: np.ndarray, limit: int, expr: str | None) -> tuple[np.ndarray, np.ndarray]:
        """Unfiltered-or-``expr`` top-``limit`` of each query: (int64 ids, float32 scores), -1 / -inf padded."""
        params = {"metric_type": "IP", "params": dict(self._search_params)}
        if self.index == "HNSW":       # HNSW needs ef >= limit
            params["params"]["ef"] = max(int(params["params"].get("ef", 0)), limit)
        res = self._client.search(self.collection, data=[row for row in q], limit=limit, anns_field="vec",
                                  search_params=params, filter=expr or "", output_fields=["id"])
        idx = np.full((q.shape[0], limit), -1, np.int64)
        sc = np.full((q.shape[0], limit), -np.inf, np.float32)
        for r, hits in enumerate(res):
            if len(hits):
                idx[r, :len(hits)] = [h["id"] for h in hits]
                sc[r, :len(hits)] = [h["distance"] for h in hits]
        return idx, sc

    def _fetch(self, queries: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        return self._search(queries, kk, None)

    def _search(self, q: np.ndarray, k: int, filters: Filters | None) -> tuple[np.ndarray, np.ndarray]:
        b = q.shape[0]
        if filters is None:
            # a k past Milvus's cap cannot be asked for: rows of more than max_topk results are padded
            out = [self._milvus_search(q[s:s + MAX_TOPK], min(k, self.max_topk), None) for s in range(0, b, MAX_TOPK)]
            idx, sc = np.vstack([o[0] for o in out]), np.vstack([o[1] for o in out])
            return self._pad(idx, sc, k)
        out_i = np.full((b, k), -1, np.int64)
        out_s = np.full((b, k), -np.inf, np.float32)
        for rows, mask in self._mask_groups(filters):
            expr = None if mask is None else self.mask_expression(mask)
            allowed = self.num_items if mask is None else int(mask[1:].sum())
            if allowed == 0:
                continue
            want = k + filters.excl_count[rows]          # enough to leave k eligible after dropping history
            alone = rows[want > self.max_topk]
            shared = rows[want <= self.max_topk]
            if shared.size:
                limit = int(min(allowed, want[want <= self.max_topk].max()))
                idx, sc = self._milvus_search(q[shared], limit, expr)
                self._keep_first_k(out_i, out_s, shared, idx, sc, filters, k)
            for r in alone:                              # very long histories: exclude them in the expression
                hist = self._row_exclusions(filters, int(r))
                e = self._ids("not in", hist) + (f" and ({expr})" if expr else "")
                idx, sc = self._milvus_search(q[r:r + 1], min(k, allowed, self.max_topk), e)
                self._keep_first_k(out_i, out_s, np.array([r]), idx, sc, filters, k)
        return out_i, out_s

    @staticmethod
    def _pad(idx: np.ndarray, sc: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return pad_results(idx, sc, k)

    @staticmethod
    def _mask_groups(f: Filters):
        """(rows, mask or None) for each distinct allowed mask of the batch."""
        rows_all = np.arange(f.num_rows)
        if f.allowed is None or f.allowed.ndim == 1:
            yield rows_all, f.allowed
            return
        groups: dict[bytes, list[int]] = {}
        packed = np.packbits(f.allowed, axis=1)
        for r in rows_all:
            groups.setdefault(packed[r].tobytes(), []).append(int(r))
        for rows in groups.values():
            yield np.asarray(rows, np.int64), f.allowed[rows[0]]

    @staticmethod
    def _row_exclusions(f: Filters, r: int) -> np.ndarray:
        offsets, items = f.excl_lists()
        return items[offsets[r]:offsets[r + 1]]

    @staticmethod
    def _keep_first_k(out_i, out_s, rows, idx, sc, f: Filters, k: int) -> None:
        """The first ``k`` eligible candidates of each row, in score order, into ``out``."""
        ok = f.eligible(rows, idx)
        order = np.argsort(~ok, axis=1, kind="stable")[:, :k]
        sel = np.take_along_axis(ok, order, 1)
        w = order.shape[1]
        out_i[rows, :w] = np.where(sel, np.take_along_axis(idx, order, 1), -1)
        out_s[rows, :w] = np.where(sel, np.take_along_axis(sc, order, 1), -np.inf)

    def close(self) -> None:
        client, self._client = getattr(self, "_client", None), None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a dead connection is not an error worth raising
                pass
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
