"""Soak: many client threads send mixed valid and invalid requests for a long time through a serving target
(the DynamicBatcher in this process, or the HTTP service ``dpr-serve`` in a subprocess; Triton can plug in as a
further target) and every answer is checked against the answer its own request must get.

    python -m dpr.bench.soak --threads 8 --requests 10000 --max-seconds 600      # make soak (both targets)
    python -m dpr.bench.soak --target http --export DIR --json soak.json

What it reports (``run_soak`` returns it as a dict; ``verdict`` turns it into pass/fail lines):

* ``lost``: requests whose answer never came within ``request_timeout_s``; ``crossed``: a valid request that got
  the answer of another request of the pool; ``wrong``: a valid request whose answer matches no request;
  ``error_mismatch``: an invalid request that was not refused with its own error (type and message);
  ``unexpected``: a valid request that failed. All must be 0.
* resident memory (RSS) at the end of the warm-up and at the end, and its growth (<= 5%);
* open file descriptors and OS threads before the target starts and after it closes (no leak);
  all three of the serving process: this one for the batcher, the server's for HTTP (:class:`ProcProbe`);
* p50 / p99 latency in 10 windows of the run; the median p99 of the first third of the windows against that of
  the last third (a trend, not one window's pause).

The pool: ``valid`` distinct requests (random histories, some past ``max_len`` or with repeated ids, template
prompts or None, hard filters, various k), their expected answers computed one by one with
``Engine.recommend`` before the soak; ``invalid`` requests, one field broken each, their expected
``InputError`` message taken from ``Engine.validate_request``. Each client thread keeps up to ``inflight``
requests outstanding (so the batcher forms real batches) and checks each answer as it comes.

Without ``--export`` a small export (synthetic catalogue of 400 items, tiny BERT prompt encoder, a few training
steps: the recipe of the test fixtures) is built once into ``build/soak/export`` (about 30 s on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpr.errors import InputError

DEFAULT_EXPORT = Path("build/soak/export")
ATOL = 1e-4                     # a batched answer may differ from the one-row run by float rounding only


# ---- answers and their comparison -------------------------------------------------------------------

@dataclass
class Answer:
    """What a target answered, in a form every front end can give: items and scores, or an error."""
    ok: bool
    item_ids: list = field(default_factory=list)
    scores: list = field(default_factory=list)
    error_type: str = ""
    message: str = ""


def same_ranking(got_ids, got_scores, want_ids, want_scores, atol: float = ATOL) -> bool:
    """True when two top-k lists are the same ranking up to float rounding: the same count, the same
    scores position by position (within ``atol``), no repeated item, every shared item with the same score,
    and an item that only one list holds scoring at the boundary (a tie at the k-th place, where either
    item is a right answer)."""
    if len(got_ids) != len(want_ids) or len(got_scores) != len(got_ids) or len(set(got_ids)) != len(got_ids):
        return False
    if not got_ids:
        return True
    g = np.asarray(got_scores, np.float64)
    w = np.asarray(want_scores, np.float64)
    if not np.all(np.abs(g - w) <= atol):
        return False
    want = dict(zip(want_ids, want_scores))
    last = float(w[-1])
    for i, s in zip(got_ids, got_scores):
        if i in want:
            if abs(s - want[i]) > atol:
                return False
        elif s > last + atol:                  # an outsider above the k-th score: not a tie, a wrong item
            return False
    return True


def oracle_topk(table: np.ndarray, user: np.ndarray, k: int, excluded=(), allowed: np.ndarray | None = None):
    """Brute-force exact top-k over the item table (row 0 is padding): scores of every item, the excluded
    catalogue indices and the ones ``allowed`` (a bool mask over 0..N) forbids removed, sorted by score
    (index order on ties). Returns (catalogue indices, scores), at most ``k`` of them."""
    scores = table[1:].astype(np.float64) @ np.asarray(user, np.float64)
    ok = np.ones(len(scores), bool)
    ex = np.asarray(list(excluded), np.int64)
    if ex.size:
        ok[ex - 1] = False
    if allowed is not None:
        ok &= np.asarray(allowed, bool)[1:]
    cand = np.flatnonzero(ok)
    order = cand[np.lexsort((cand, -scores[cand]))][:k]
    return (order + 1).tolist(), scores[order].tolist()


# ---- targets: what the clients talk to ---------------------------------------------------------------

class BatcherTarget:
    """The DynamicBatcher in this process. A target has ``name``, ``submit(request) -> Future[Answer]``
    (an invalid request's future resolves to an error Answer, never raises) and ``close()``; optionally
    ``stats()`` (put in the report) and ``same_error(expected, got)`` (when its refusals are worded by the front
    end rather than the engine). An HTTP target implements the same with a client pool: it posts the request,
    turns a 200 into ``Answer(True, ids, scores)`` and a 4xx into ``Answer(False, error_type="HTTP 422", ...)``,
    and its ``same_error`` accepts the 4xx that names the same field; a 5xx, a timeout or a dropped connection
    is then an ``unexpected`` or ``lost`` answer like any other."""
    name = "batcher"

    def __init__(self, engine, max_batch_size: int = 64, max_delay_ms: float = 2.0, max_queue: int = 10000):
        from dpr.engine import DynamicBatcher

        self.batcher = DynamicBatcher(engine, max_batch_size=max_batch_size, max_delay_ms=max_delay_ms,
                                      max_queue=max_queue)

    def submit(self, request) -> Future:
        out: Future = Future()
        try:
            inner = self.batcher.submit(request)
        except Exception as exc:  # noqa: BLE001 - OverloadedError / ClosedError: an answer too
            out.set_result(Answer(False, error_type=type(exc).__name__, message=str(exc)))
            return out

        def done(f: Future):
            exc = f.exception()
            if exc is None:
                rec = f.result()
                out.set_result(Answer(True, list(rec.item_ids), [float(s) for s in rec.scores]))
            else:
                out.set_result(Answer(False, error_type=type(exc).__name__, message=str(exc)))

        inner.add_done_callback(done)
        return out

    def stats(self) -> dict:
        return self.batcher.stats()

    def close(self) -> None:
        self.batcher.close(timeout=60)


# ---- the pool of requests and their expected answers -------------------------------------------------

@dataclass
class Case:
    request: dict
    expected: Answer


def _invalid_requests(engine, rng, n: int) -> list[dict]:
    """``n`` requests, each with one field broken in a way a hostile or careless caller would."""
    ids = engine.item_ids
    good = lambda: {"history": [ids[int(j)] for j in rng.choice(len(ids), 3, replace=False)], "k": 5}  # noqa: E731
    makers = [
        lambda r: dict(r, k=0),
        lambda r: dict(r, k=len(ids) + 1),
        lambda r: dict(r, k=10 ** 30),
        lambda r: dict(r, k="5"),
        lambda r: dict(r, k=2.5),
        lambda r: dict(r, history=[]),
        lambda r: dict(r, history="i1"),
        lambda r: dict(r, history=None),
        lambda r: dict(r, history=r["history"] + [f"no-such-item-{rng.integers(1 << 30)}"]),
        lambda r: dict(r, history=r["history"] + [None]),
        lambda r: dict(r, history=r["history"] + [float("nan")]),
        lambda r: dict(r, history=r["history"] + ["i1\x00"]),
        lambda r: dict(r, prompt=""),
        lambda r: dict(r, prompt="   \t"),
        lambda r: dict(r, prompt="bad \ud800 surrogate"),
        lambda r: dict(r, prompt=b"\xff\xfe not utf-8"),
        lambda r: dict(r, prompt="x" * (engine.max_prompt_bytes + 1)),
        lambda r: dict(r, prompt=123),
        lambda r: dict(r, negative_prompt=["a list"]),
        lambda r: dict(r, hard_filter={"include_tags": ["no-such-tag"]}),
        lambda r: dict(r, hard_filter={"colour": ["red"]}),
        lambda r: dict(r, hard_filter="Comedy"),
        lambda r: dict(r, hard_filter={"exclude_items": [None]}),
        lambda r: dict(r, surprise=1),
        lambda r: {"k": 5},
    ]
    return [makers[i % len(makers)](good()) for i in range(n)]


def _valid_requests(engine, rng, n: int) -> list[dict]:
    ids, tags, L = engine.item_ids, engine.tag_names, engine.max_len
    pos = [f"show me more {t} films" for t in tags] + ["something light and funny", "more comedy\x00 please"]
    neg = [f"no {t} please" for t in tags] + ["nothing too long"]
    out = []
    for i in range(n):
        ln = int(rng.integers(1, 2 * L + 1))
        hist = [ids[int(j)] for j in rng.choice(len(ids), size=ln, replace=ln > len(ids) // 2)]
        if i % 7 == 0:                                     # repeated ids are a valid history
            hist = hist + hist[: max(1, ln // 3)]
        r = {"history": hist, "k": int(rng.integers(1, 21))}
        m = int(rng.integers(0, 4))
        if m in (1, 3):
            r["prompt"] = pos[int(rng.integers(len(pos)))]
        if m in (2, 3):
            r["negative_prompt"] = neg[int(rng.integers(len(neg)))]
        if i % 5 == 0:
            r["hard_filter"] = {"exclude_tags": [tags[int(rng.integers(len(tags)))]]}
        elif i % 11 == 0:
            r["hard_filter"] = {"exclude_items": [ids[int(j)] for j in rng.choice(len(ids), 20, replace=False)]}
        if i % 13 == 0:
            r["exclude_history"] = False
        out.append(r)
    return out


def make_pool(engine, valid: int = 256, invalid: int = 64, seed: int = 0) -> list[Case]:
    """Distinct valid requests with the answer ``Engine.recommend`` gives each alone, and broken ones with
    the error ``Engine.validate_request`` gives each."""
    rng = np.random.default_rng(seed)
    cases = []
    for r in _valid_requests(engine, rng, valid):
        rec = engine.recommend([r["history"]], prompts=[r.get("prompt")], negative_prompts=[r.get("negative_prompt")],
                               k=r["k"], exclude_history=r.get("exclude_history", True),
                               hard_filter=[r.get("hard_filter")])[0]
        cases.append(Case(r, Answer(True, list(rec.item_ids), [float(s) for s in rec.scores])))
    for r in _invalid_requests(engine, rng, invalid):
        try:
            engine.validate_request(r)
        except InputError as exc:
            cases.append(Case(r, Answer(False, error_type="InputError", message=str(exc))))
            continue
        raise AssertionError(f"the soak's invalid request was accepted by the engine: {r!r}")
    return cases


# ---- process resources -------------------------------------------------------------------------------

def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def _settled(read, want: int | None = None, timeout_s: float = 2.0) -> int:
    """``read()`` once it holds still (5 equal reads 10 ms apart) or equals ``want``, within ``timeout_s``: a
    joined thread or a closed socket leaves /proc a moment after the call that ended it returns."""
    end = time.monotonic() + timeout_s
    last, same = read(), 0
    while time.monotonic() < end and last != want and same < 5:
        time.sleep(0.01)
        now = read()
        same = same + 1 if now == last else 0
        last = now
    return last


def os_threads() -> int:
    """OS threads of this process (Python's and the native pools': ONNX Runtime, OpenMP)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return threading.active_count()


class ProcProbe:
    """Resident memory, open file descriptors and OS threads of another process (the HTTP server), from
    /proc/PID; ``None`` is this process. What the soak judges is the serving process, not the clients."""

    def __init__(self, pid: int | None = None):
        self.pid = pid

    def rss(self) -> int:
        if self.pid is None:
            return rss_bytes()
        try:
            with open(f"/proc/{self.pid}/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    def fds(self) -> int:
        if self.pid is None:
            return open_fds()
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return -1

    def threads(self) -> int:
        if self.pid is None:
            return os_threads()
        try:
            with open(f"/proc/{self.pid}/status") as fh:
                return next((int(ln.split()[1]) for ln in fh if ln.startswith("Threads:")), -1)
        except OSError:
            return -1


# ---- the soak ------------------------------------------------------------------------------------------

def same_error(expected: Answer, got: Answer) -> bool:
    """In process the refusal is the engine's own InputError, word for word."""
    return not got.ok and got.error_type == expected.error_type and got.message == expected.message


def _check(case: Case, ans: Answer, pool: list[Case], by_len: dict, errors_match=same_error) -> str:
    """'ok', 'crossed' (another pool request's answer), 'wrong', 'unexpected' or 'error_mismatch'."""
    exp = case.expected
    if not exp.ok:
        return "ok" if errors_match(exp, ans) else "error_mismatch"
    if not ans.ok:
        return "unexpected"
    if same_ranking(ans.item_ids, ans.scores, exp.item_ids, exp.scores):
        return "ok"
    for other in by_len.get(len(ans.item_ids), ()):
        if other is not case and same_ranking(ans.item_ids, ans.scores, other.expected.item_ids,
                                              other.expected.scores):
            return "crossed"
    return "wrong"


def _windows(t: np.ndarray, lat_s: np.ndarray, n_windows: int) -> list[dict]:
    """p50/p99 latency (ms) in ``n_windows`` equal windows of completion time over the run (the run's length
    is not known in advance: 10 windows of a 10-minute run are minutes, of a 5-second CI run half-seconds)."""
    if not len(t):
        return []
    lat = lat_s * 1000.0
    width = max(float(t.max()), 1e-9) / n_windows
    which = np.minimum((t / width).astype(np.int64), n_windows - 1)
    out = []
    for w in range(n_windows):
        sel = which == w
        if sel.any():
            out.append({"start_s": round(w * width, 3), "n": int(sel.sum()),
                        "p50_ms": round(float(np.percentile(lat[sel], 50)), 3),
                        "p99_ms": round(float(np.percentile(lat[sel], 99)), 3)})
    return out


def _warm_up(make_target, pool: list[Case], timeout_s: float) -> None:
    """Every pool request once through a throwaway target: what the engine creates lazily and keeps (its chunk
    thread pool, ONNX Runtime's arenas, the prompt cache) exists before the baseline is taken."""
    target = make_target()
    try:
        for fut in [target.submit(c.request) for c in pool]:
            fut.result(timeout=timeout_s)
    finally:
        target.close()


def run_soak(make_target, pool: list[Case], threads: int = 8, requests_per_thread: int = 10000,
             inflight: int = 16, max_seconds: float = 600.0, warmup_fraction: float = 0.1,
             n_windows: int = 10, request_timeout_s: float = 60.0, seed: int = 0,
             mismatch_examples: int = 5, warm_up: bool = True, probe: ProcProbe | None = None) -> dict:
    """Run the soak: ``threads`` clients each send ``requests_per_thread`` requests drawn from ``pool``
    (at most ``inflight`` outstanding each) through ``make_target()``, until done or ``max_seconds``
    (the rest counted as ``not_sent``). Before it, with ``warm_up``, the pool once through a throwaway
    target; file descriptors and threads are counted after that and after the soak's target is closed;
    resident memory after the first ``warmup_fraction`` of the answers and at the end, all three of the
    process ``probe`` reads (default: this one). Returns the report (see the module docstring)."""
    if threads < 1 or requests_per_thread < 1 or inflight < 1 or not pool:
        raise InputError("threads, requests_per_thread and inflight must be >= 1 and the pool not empty")
    by_len: dict = {}
    for c in pool:
        if c.expected.ok:
            by_len.setdefault(len(c.expected.item_ids), []).append(c)
    counts = {"ok": 0, "crossed": 0, "wrong": 0, "unexpected": 0, "error_mismatch": 0, "lost": 0,
              "not_sent": 0, "valid_sent": 0, "invalid_sent": 0}
    examples: list[dict] = []
    lock = threading.Lock()
    total = threads * requests_per_thread
    # latency samples in arrays allocated (and touched) before the baseline: a list of tuples would grow by
    # ~100 bytes an answer, the harness's own memory counted as the service's growth
    t_done_s, lat_s = np.full(total, np.nan), np.full(total, np.nan)   # np.zeros would map its pages lazily
    warm_at = max(1, int(total * warmup_fraction))
    done_n = [0]
    marks: dict = {}
    trace_every = max(1, total // 20)
    rss_trace: list = []                   # (answers so far, RSS MB): a leak climbs, an allocator settles

    probe = probe or ProcProbe()
    if warm_up:
        _warm_up(make_target, pool, request_timeout_s)
    fds0, thr0, rss0 = _settled(probe.fds), _settled(probe.threads), probe.rss()
    py0 = {t.ident for t in threading.enumerate()}
    target = make_target()
    t_start = time.monotonic()
    deadline = t_start + max_seconds

    errors_match = getattr(target, "same_error", None) or same_error

    def record(case, ans, t_sent, t_done):
        outcome = _check(case, ans, pool, by_len, errors_match)
        with lock:
            counts[outcome] += 1
            counts["valid_sent" if case.expected.ok else "invalid_sent"] += 1
            t_done_s[done_n[0]], lat_s[done_n[0]] = t_done - t_start, t_done - t_sent
            if outcome != "ok" and len(examples) < mismatch_examples:
                examples.append({"verdict": outcome, "request": repr(case.request)[:300],
                                 "got": repr(ans)[:300], "want": repr(case.expected)[:300]})
            done_n[0] += 1
            if done_n[0] == warm_at:
                marks["warm"] = {"rss": probe.rss(), "t": t_done - t_start}
            if done_n[0] % trace_every == 0:
                rss_trace.append((done_n[0], round(probe.rss() / 2 ** 20, 1)))

    def client(tid: int):
        rng = np.random.default_rng([seed, tid])
        window: list = []
        sent = 0

        def settle(item):
            case, fut, t_sent = item
            try:
                left = deadline + request_timeout_s - time.monotonic()
                ans = fut.result(timeout=max(0.0, min(request_timeout_s, left)))
            except Exception as exc:  # noqa: BLE001 - a timeout (or a broken target): the answer is lost
                with lock:
                    counts["lost"] += 1
                    if len(examples) < mismatch_examples:
                        examples.append({"verdict": "lost", "request": repr(case.request)[:300],
                                         "error": f"{type(exc).__name__}: {exc}"[:300]})
                return
            record(case, ans, t_sent, time.monotonic())

        while sent < requests_per_thread and time.monotonic() < deadline:
            case = pool[int(rng.integers(len(pool)))]
            t_sent = time.monotonic()
            try:
                fut = target.submit(case.request)
            except Exception as exc:  # noqa: BLE001 - a target that raises instead of answering: an answer too
                fut = Future()
                fut.set_result(Answer(False, error_type=type(exc).__name__, message=str(exc)))
            window.append((case, fut, t_sent))
            sent += 1
            if len(window) >= inflight:
                settle(window.pop(0))
        for item in window:
            settle(item)
        with lock:
            counts["not_sent"] += requests_per_thread - sent

    workers = [threading.Thread(target=client, args=(t,), name=f"soak-client-{t}") for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(max_seconds + 2 * request_timeout_s + 30)
    hung_clients = sum(w.is_alive() for w in workers)
    elapsed = time.monotonic() - t_start
    rss_end = probe.rss()
    thr_loaded = probe.threads()
    target_stats = target.stats() if hasattr(target, "stats") else {}
    target.close()
    fds1, thr1 = _settled(probe.fds, fds0), _settled(probe.threads, thr0)
    added = [t.name for t in threading.enumerate() if t.ident not in py0]
    warm = marks.get("warm", {"rss": rss_end, "t": elapsed})
    wins = _windows(t_done_s[: done_n[0]], lat_s[: done_n[0]], n_windows)
    answered = sum(counts[k] for k in ("ok", "crossed", "wrong", "unexpected", "error_mismatch"))
    return {
        "target": getattr(target, "name", type(target).__name__), "threads": threads,
        "requests_per_thread": requests_per_thread, "inflight": inflight, "pool": len(pool),
        "requests": total, "answered": answered, **counts, "hung_clients": hung_clients,
        "elapsed_s": round(elapsed, 3), "throughput_rps": round(answered / elapsed, 1) if elapsed else 0.0,
        "rss_start_mb": round(rss0 / 2 ** 20, 2), "rss_warm_mb": round(warm["rss"] / 2 ** 20, 2),
        "rss_end_mb": round(rss_end / 2 ** 20, 2),
        "rss_growth": round((rss_end - warm["rss"]) / warm["rss"], 4) if warm["rss"] else 0.0,
        "warmup_s": round(warm["t"], 3), "rss_trace_mb": rss_trace,
        "fds_before": fds0, "fds_after": fds1, "threads_before": thr0, "threads_loaded": thr_loaded,
        "threads_after": thr1, "threads_added": added, "windows": wins,
        "p99_first_ms": wins[0]["p99_ms"] if wins else None, "p99_last_ms": wins[-1]["p99_ms"] if wins else None,
        "p99_early_ms": _thirds(wins)[0], "p99_late_ms": _thirds(wins)[1],
        "target_stats": target_stats, "examples": examples,
    }


def verdict(report: dict, rss_growth_max: float = 0.05, p99_ratio_max: float | None = None) -> list[str]:
    """The soak's failures, as lines (empty: it held). ``p99_ratio_max``: the last window's p99 may be at
    most that many times the first's (None: reported, not judged)."""
    bad = [f"{k}: {report[k]}" for k in ("lost", "crossed", "wrong", "unexpected", "error_mismatch",
                                         "hung_clients") if report[k]]
    if report["answered"] + report["lost"] + report["not_sent"] != report["requests"]:
        bad.append(f"accounting: {report['answered']} answered + {report['lost']} lost + {report['not_sent']} "
                   f"not sent != {report['requests']} requests")
    st = report.get("target_stats") or {}
    if {"submitted", "completed", "failed", "rejected_invalid", "queued"} <= set(st):   # the batcher's own books
        if st["completed"] + st["failed"] != st["submitted"] or st["failed"] or st["queued"]:
            bad.append(f"the batcher's books: {st['submitted']} submitted, {st['completed']} completed, "
                       f"{st['failed']} failed, {st['queued']} still queued")
        if st["rejected_invalid"] != report["invalid_sent"]:
            bad.append(f"the batcher refused {st['rejected_invalid']} requests as invalid, the soak sent "
                       f"{report['invalid_sent']} invalid ones")
    if report["rss_growth"] > rss_growth_max:
        bad.append(f"resident memory grew {report['rss_growth']:.1%} after warm-up "
                   f"({report['rss_warm_mb']} -> {report['rss_end_mb']} MB; limit {rss_growth_max:.0%})")
    if report["fds_after"] > report["fds_before"]:
        bad.append(f"file descriptors leaked: {report['fds_before']} before, {report['fds_after']} after")
    if report["threads_after"] > report["threads_before"]:
        bad.append(f"threads leaked: {report['threads_before']} before, {report['threads_after']} after "
                   f"(Python threads added: {', '.join(report['threads_added']) or 'none'})")
    first, last = report["p99_early_ms"], report["p99_late_ms"]
    if p99_ratio_max and first and last and last > p99_ratio_max * first:
        bad.append(f"p99 latency drifted: {first} ms over the first third of the run, {last} ms over the last "
                   f"(limit x{p99_ratio_max})")
    return bad


def _thirds(wins: list[dict]) -> tuple[float | None, float | None]:
    """Median p99 of the first and of the last third of the windows: a trend (a leak that slows the service)
    moves both, one window's pause (a garbage collection under load) moves neither."""
    if len(wins) < 3:
        return None, None
    third = len(wins) // 3
    p = [w["p99_ms"] for w in wins]
    return round(float(np.median(p[:third])), 3), round(float(np.median(p[-third:])), 3)


# ---- the export it soaks without --export --------------------------------------------------------------

def small_export(out: Path = DEFAULT_EXPORT) -> Path:
    """A small trained export (the tests' fixture recipe: 400 synthetic items, tiny BERT, a few steps), built
    once into ``out`` (a ``.complete`` marker says it finished)."""
    out = Path(out)
    if (out / "manifest.json").is_file() and (out.parent / ".complete").is_file():
        return out
    from dpr.checkpoint import save_checkpoint
    from dpr.config import ModelConfig, TrainConfig
    from dpr.data import load_dataset
    from dpr.data.prompts import NEGATIVE_TEMPLATES, POSITIVE_TEMPLATES
    from dpr.export import ExportConfig, export
    from dpr.model import TextEncoder
    from dpr.model.tiny_encoder import make_tiny_text_encoder
    from dpr.train.pipeline import train

    base = out.parent
    corpus = list(POSITIVE_TEMPLATES) + list(NEGATIVE_TEMPLATES)
    corpus += ["comedy horror sci-fi drama romance thriller action documentary animation western musical war"]
    enc = TextEncoder.load(str(make_tiny_text_encoder(base / "tiny-encoder", corpus)))
    data = load_dataset("synthetic", num_users=300, num_items=400, num_tags=8, seed=3)
    ck = train(data, ModelConfig(d=16, max_len=12, fusion_hidden=32, expert_hidden=32, num_heads=2),
               TrainConfig(stage1_epochs=2, stage2_epochs=1, stage2_steps_per_epoch=5, stage3_epochs=1,
                           stage3_steps_per_epoch=5, batch_size=64),
               enc, log=lambda *a: None, val_users=50)
    path = export(save_checkpoint(ck, base / "tiny.pt"), ExportConfig(out=str(out)))
    (base / ".complete").write_text("ok\n")
    return Path(path)


# ---- command line --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpr.bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--export", default="", help="export folder (default: build a small one into build/soak)")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--retriever", default="auto")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--requests", type=int, default=10000, help="requests per thread")
    p.add_argument("--inflight", type=int, default=16, help="outstanding requests per thread")
    p.add_argument("--max-seconds", type=float, default=600.0, help="stop sending after this long")
    p.add_argument("--windows", type=int, default=10, help="latency windows over the run (first vs last)")
    p.add_argument("--pool-valid", type=int, default=512)
    p.add_argument("--pool-invalid", type=int, default=128)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-delay-ms", type=float, default=2.0)
    p.add_argument("--rss-growth-max", type=float, default=0.05)
    p.add_argument("--p99-ratio-max", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="write the report here")
    p.add_argument("--target", default="batcher", choices=("batcher", "http", "all"),
                   help="the DynamicBatcher in this process, the HTTP service (dpr-serve subprocess), or both")
    a = p.parse_args(argv)
    from dpr.engine import Engine

    export_dir = Path(a.export) if a.export else small_export()
    engine = Engine.load(export_dir, backend=a.backend, retriever=a.retriever)
    pool = make_pool(engine, a.pool_valid, a.pool_invalid, a.seed)
    targets = ["batcher", "http"] if a.target == "all" else [a.target]
    reports = [_run_target(t, a, engine, pool, export_dir) for t in targets]
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    return 0 if not any(r["failures"] for r in reports) else 1


def _run_target(which: str, a, engine, pool, export_dir) -> dict:
    """One soak through ``which`` ("batcher" or "http"), printed; returns its report with ``failures``."""
    if which == "batcher":
        report = run_soak(lambda: BatcherTarget(engine, a.max_batch, a.max_delay_ms), pool, a.threads, a.requests,
                          a.inflight, a.max_seconds, n_windows=a.windows, seed=a.seed)
    else:
        from .soak_http import HttpTarget, http_server

        with http_server(export_dir, a.backend, a.retriever, a.max_batch, a.max_delay_ms) as server:
            workers = min(a.threads * a.inflight, 128)    # one connection per outstanding request
            report = run_soak(lambda: HttpTarget(server.url, workers), pool, a.threads, a.requests, a.inflight,
                              a.max_seconds, n_windows=a.windows, seed=a.seed, probe=ProcProbe(server.proc.pid))
            report["server_pid"] = server.proc.pid
    report.update(export=str(export_dir), backend=engine.backend_name, retriever=engine.retriever_name,
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), cpus=os.cpu_count())
    bad = verdict(report, a.rss_growth_max, a.p99_ratio_max)
    report["failures"] = bad
    show = {k: v for k, v in report.items() if k not in ("windows", "examples", "rss_trace_mb")}
    print(json.dumps(show, indent=2))
    for w in report["windows"]:
        print(f"window {w['start_s']:>8.1f}s  n={w['n']:>6}  p50={w['p50_ms']:.2f} ms  p99={w['p99_ms']:.2f} ms")
    print("rss (answers, MB):", " ".join(f"{n}:{mb}" for n, mb in report["rss_trace_mb"]))
    for e in report["examples"]:
        print("example:", e)
    print(f"SOAK ({which}) HELD" if not bad else f"SOAK ({which}) FAILED:\n  " + "\n  ".join(bad))
    return report


if __name__ == "__main__":
    sys.exit(main())
