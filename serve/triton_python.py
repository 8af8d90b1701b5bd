"""dpr as a Triton Python-backend model: the class a repository's ``model.py`` re-exports.

Triton's dynamic batcher hands :meth:`TritonPythonModel.execute` a list of requests; each is turned into Parts
(``dpr.serve.tensors``), every Part of the list runs through ``Engine.recommend_batch`` in one call per
(k, exclude_history) (``columns.run_parts``), and each request gets its own response: a bad request gets an
error response naming its problem while its batch-mates are answered.

The backend stub turns every BYTES input into numpy with ``triton_python_backend_utils.deserialize_bytes_tensor``,
a Python loop with a format string and two ``struct`` calls per element; a padded 512-row history holds ~100,000
elements. This module replaces it with a leaner loop returning the same objects (server CPU per 1,000 requests
measured A/B: 778 and 784 ms before, 684 and 667 ms after; default model, 512-row gRPC calls, warm-up included),
and ``serialize_byte_tensor`` (every BYTES output) with one returning the same bytes; ``DPR_TRITON_FAST_BYTES=0``
keeps Triton's.

Model parameters (``config.pbtxt``): ``export_dir`` (absolute, or relative to the model's version folder),
``backend``, ``retriever``, ``unknown_items`` and the limits of :class:`~dpr.serve.config.ServeConfig`.
"""

from __future__ import annotations

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend

from dpr.engine import Engine, RequestBatch
from dpr.errors import InputError

from .columns import IdCheck, relabel_rows, run_parts
from .config import ServeConfig
from .tensors import INPUTS, parts_from_tensors, split_outputs, stack_requests, tensors_from_results

LIMITS = ("max_requests_per_call", "max_history", "max_k", "max_prompt_bytes")
_INPUT_SET = frozenset(INPUTS)


def _deserialize_bytes_tensor(encoded):
    """Triton's ``deserialize_bytes_tensor`` (the same objects out): the elements found by the native splitter
    (``dpr.kernels.bytes_tensor``: 13.7 ms of a 512-row call's Python was Triton's loop), else by a loop without
    a format string and two struct calls per element. The backend stub calls it for every BYTES input; a padded
    512-row history of the load test holds 102,400 elements, 21,000 of them ids. Truncated data raises
    ``ValueError`` (Triton's: ``struct.error``)."""
    b = bytes(encoded)
    if _split_native is not None and len(b) >= NATIVE_MIN_BYTES:
        return _split_native(b)
    out = _split_python(b)
    arr = np.empty(len(out), dtype=np.object_)
    arr[:] = out
    return arr


# Below this many bytes the loop is the faster (the native call's fixed cost is ~7 us; 2-core VM: 10 elements 2.1
# us in the loop, 9.8 native; 200 elements 44 and 32 us; a single request's prompt is one element)
NATIVE_MIN_BYTES = 1024


def _split_python(b: bytes) -> list:
    n, off, out = len(b), 0, []
    app, frm, empty = out.append, int.from_bytes, b""
    while off < n:
        if off + 4 > n:
            raise ValueError(f"BYTES tensor data is truncated: a length prefix at byte {off} of {n}")
        ln = frm(b[off:off + 4], "little")
        off += 4
        if ln:
            if off + ln > n:
                raise ValueError(f"BYTES tensor data is truncated: an element of {ln} bytes at byte {off} of {n}")
            app(b[off:off + ln])
            off += ln
        else:                   # padding: the empty string
            app(empty)
    return out


def _native_splitter():
    try:
        from dpr.kernels import bytes_tensor
        return bytes_tensor.split if bytes_tensor.library() is not None else None
    except Exception:  # noqa: BLE001 - the Python loop answers the same
        return None


_split_native = _native_splitter()


def _serialize_byte_tensor(input_tensor):
    """Triton's ``serialize_byte_tensor`` (the same bytes out: each element's length as 4 little-endian bytes,
    then the element, in C order) without ``np.nditer``, ``.item()`` and a ``struct.pack`` per element. The stub
    calls it for every BYTES output: once per request for ``item_ids`` (16 of the ~285 us of Python per
    single-request call, profiled on the 2-core VM)."""
    if input_tensor.size == 0:
        return ()
    if input_tensor.dtype == np.object_:
        items = [x if type(x) is bytes else str(x).encode("utf-8") for x in input_tensor.ravel(order="C").tolist()]
    elif input_tensor.dtype.type == np.bytes_:
        items = input_tensor.ravel(order="C").tolist()      # trailing NULs dropped, as .item() drops them
    else:
        return None
    parts = []
    app = parts.append
    for x in items:
        app(len(x).to_bytes(4, "little"))
        app(x)
    return b"".join(parts)


if os.environ.get("DPR_TRITON_FAST_BYTES", "1") == "1":
    if hasattr(pb_utils, "deserialize_bytes_tensor"):
        pb_utils.deserialize_bytes_tensor = _deserialize_bytes_tensor
    if hasattr(pb_utils, "serialize_byte_tensor"):
        pb_utils.serialize_byte_tensor = _serialize_byte_tensor


def _error(message: str, code: str = "INVALID_ARG"):
    """An error response with Triton's INVALID_ARG code (HTTP 400, gRPC INVALID_ARGUMENT) for a bad request, or
    ``code="INTERNAL"`` (HTTP 500) for a failure of ours."""
    code = getattr(pb_utils.TritonError, code, None)
    err = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(error=err)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        export = params.get("export_dir", "export")
        if not os.path.isabs(export):
            export = os.path.join(args["model_repository"], args["model_version"], export)
        cfg = ServeConfig(unknown_items=params.get("unknown_items", "error"))
        for name in LIMITS:
            if params.get(name):
                setattr(cfg, name, int(params[name]))
        self.cfg = cfg.check()
        self.engine = Engine.load(export, backend=params.get("backend", "auto"),
                                  retriever=params.get("retriever", "auto"), unknown_items=cfg.unknown_items,
                                  max_prompt_bytes=cfg.max_prompt_bytes)
        self.ids = IdCheck(self.engine, cfg.unknown_items)
        # no id pre-check: the engine's own (its id index refuses an unknown id before any model runs, naming it).
        # Used where a failure cannot fail anyone else's request: the stacked path (a failed engine call sends the
        # list down the per-request path, where self.ids names the culprit's own request) and a request alone.
        # Checking every id against the set first cost ~8 us per request for an error that is rare.
        self.engine_checks_ids = IdCheck(self.engine, "ignore")
        ex = self.engine.item_ids[:1]     # warm up before Triton reports the model ready
        self.engine.recommend_batch(RequestBatch.from_histories([ex], prompts=["warm up"], k=1))

    def execute(self, requests):
        responses: list = [None] * len(requests)
        tensors: dict = {}
        for i, req in enumerate(requests):
            try:
                # one pass over the request's inputs (get_input_tensor_by_name per input walked them all again
                # for each of the 8 names: 16 us per single-request call); inputs outside INPUTS are not read
                t = {}
                for x in req.inputs():
                    name = x.name()
                    if name in _INPUT_SET:
                        t[name] = x.as_numpy()
                tensors[i] = t
            except Exception as exc:  # noqa: BLE001 - raised out of execute, it would fail every request of the batch
                responses[i] = _error(f"reading the request failed: {type(exc).__name__}: {exc}", "INTERNAL")
        if len(tensors) == len(requests) and self._execute_stacked(list(tensors.values()), responses):
            return responses
        return self._execute_each(tensors, responses)

    def _execute_stacked(self, tensors: list, responses: list) -> bool:
        """The whole list as one batch (``tensors.stack_requests``); False, with nothing answered, when it cannot
        be stacked or anything in it is refused or fails: then each request is taken on its own, so an error
        names its own request's row and its batch-mates are answered."""
        stacked = stack_requests(tensors)
        if stacked is None:
            return False
        batch, spans = stacked
        try:
            got = parts_from_tensors(batch, self.cfg, self.engine_checks_ids)
        except InputError:
            return False
        results = run_parts(self.engine, [part for part, _ in got])
        if any(isinstance(r, BaseException) for r in results):
            return False
        try:
            out = tensors_from_results(self.engine, len(batch["history"]), got, results, as_bytes=True)
            for i, o in enumerate(split_outputs(out, spans, got)):
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(n, np.ascontiguousarray(a)) for n, a in o.items()])
        except Exception:  # noqa: BLE001 - answered one by one below, where a failure is that request's only
            responses[:] = [None] * len(responses)
            return False
        return True

    def _execute_each(self, tensors: dict, responses: list) -> list:
        parts, owner = [], []
        per_request: dict = {}
        # the id pre-check keeps one request's unknown id from failing its batch-mates; a request alone (a batched
        # client's 512-row call) has none, and the engine names the id itself (3 ms per 512-row call saved)
        ids = self.ids if len(tensors) > 1 else self.engine_checks_ids
        for i, t in tensors.items():
            try:
                got = parts_from_tensors(t, self.cfg, ids)
            except InputError as exc:
                responses[i] = _error(str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - raised out of execute, it would fail every request of the batch
                responses[i] = _error(f"reading the request failed: {type(exc).__name__}: {exc}", "INTERNAL")
                continue
            per_request[i] = got
            for part, rows in got:
                parts.append(part)
                owner.append((i, rows))
        results = run_parts(self.engine, parts) if parts else []
        by_req: dict = {}
        for (i, rows), r in zip(owner, results):
            by_req.setdefault(i, []).append((r, rows))
        for i, got in per_request.items():
            res = [r for r, _ in by_req[i]]
            bad, bad_rows = next(((r, rows) for r, rows in by_req[i] if isinstance(r, BaseException)), (None, None))
            if isinstance(bad, InputError):
                # the engine numbers rows within its batch of Parts; say it of the request's own row
                responses[i] = _error(relabel_rows(str(bad), bad_rows))
                continue
            if bad is not None:
                responses[i] = _error(f"{type(bad).__name__}: {bad}", "INTERNAL")
                continue
            try:
                out = tensors_from_results(self.engine, sum(len(rows) for _, rows in got), got, res, as_bytes=True)
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(n, np.ascontiguousarray(a)) for n, a in out.items()])
            except Exception as exc:  # noqa: BLE001 - this request's failure only, as above
                responses[i] = _error(f"writing the answer failed: {type(exc).__name__}: {exc}", "INTERNAL")
        return responses

    def finalize(self):
        self.engine.close()
