"""What a dpr Triton model does with a list of requests, whichever backend hands it over.

Both Triton bindings are thin adapters over :class:`TritonModelCore`: the Python-backend model
(``triton_python.TritonPythonModel``, requests read through ``triton_python_backend_utils`` in a stub process)
and the native backend (``libtriton_dpr.so`` + ``triton_native.NativeModel``, requests read by C++ inside
tritonserver). The core takes each request as a dict of named numpy tensors (``dpr.serve.tensors``) and answers
each with its output tensors or a :class:`Refusal`.

Every request of the list runs through ``Engine.recommend_batch`` in one call per (k, exclude_history)
(``tensors.stack_requests`` + ``columns.run_parts``); a bad request gets a refusal naming its problem while its
batch-mates are answered.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from dpr.engine import Engine, RequestBatch
from dpr.errors import InputError

from .columns import IdCheck, relabel_rows, run_parts
from .config import ServeConfig
from .tensors import parts_from_tensors, split_outputs, stack_requests, tensors_from_results

LIMITS = ("max_requests_per_call", "max_history", "max_k", "max_prompt_bytes")


@dataclass(frozen=True)
class Refusal:
    """A request's error answer: Triton's code (``INVALID_ARG``: HTTP 400 / gRPC INVALID_ARGUMENT, a bad request;
    ``INTERNAL``: HTTP 500, a failure of ours) and the message naming the problem."""

    message: str
    code: str = "INVALID_ARG"


def model_parameters(config: dict) -> dict:
    """``config.pbtxt``'s ``parameters`` (as Triton's JSON form of the model config gives them) as plain strings."""
    return {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}


class TritonModelCore:
    """The engine bound as one Triton model instance. ``params``: the model's parameters (``export_dir``, absolute
    or relative to ``version_dir``; ``backend``, ``retriever``, ``unknown_items`` and the limits of
    :class:`~dpr.serve.config.ServeConfig`). Loads and warms the engine before returning, so Triton reports the
    model ready only once it can answer."""

    def __init__(self, params: dict, version_dir: str):
        export = params.get("export_dir", "export")
        if not os.path.isabs(export):
            export = os.path.join(version_dir, export)
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

    def answer(self, tensors: list) -> list:
        """One answer per request: its output tensors (``item_ids``, ``scores``, ``counts``) or a Refusal.
        ``tensors[i]``: request i's named numpy tensors, or a Refusal already (it could not be read)."""
        answers: list = [t if isinstance(t, Refusal) else None for t in tensors]
        good = {i: t for i, t in enumerate(tensors) if not isinstance(t, Refusal)}
        if len(good) == len(tensors) and self._answer_stacked(tensors, answers):
            return answers
        return self._answer_each(good, answers)

    def _answer_stacked(self, tensors: list, answers: list) -> bool:
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
            answers[:] = split_outputs(out, spans, got)
        except Exception:  # noqa: BLE001 - answered one by one below, where a failure is that request's only
            answers[:] = [None] * len(answers)
            return False
        return True

    def _answer_each(self, tensors: dict, answers: list) -> list:
        parts, owner = [], []
        per_request: dict = {}
        # the id pre-check keeps one request's unknown id from failing its batch-mates; a request alone (a batched
        # client's 512-row call) has none, and the engine names the id itself (3 ms per 512-row call saved)
        ids = self.ids if len(tensors) > 1 else self.engine_checks_ids
        for i, t in tensors.items():
            try:
                got = parts_from_tensors(t, self.cfg, ids)
            except InputError as exc:
                answers[i] = Refusal(str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - raised out of execute, it would fail every request of the batch
                answers[i] = Refusal(f"reading the request failed: {type(exc).__name__}: {exc}", "INTERNAL")
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
                answers[i] = Refusal(relabel_rows(str(bad), bad_rows))
                continue
            if bad is not None:
                answers[i] = Refusal(f"{type(bad).__name__}: {bad}", "INTERNAL")
                continue
            try:
                answers[i] = tensors_from_results(self.engine, sum(len(rows) for _, rows in got), got, res,
                                                  as_bytes=True)
            except Exception as exc:  # noqa: BLE001 - this request's failure only, as above
                answers[i] = Refusal(f"writing the answer failed: {type(exc).__name__}: {exc}", "INTERNAL")
        return answers

    def close(self) -> None:
        self.engine.close()
