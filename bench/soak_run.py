"""The soak itself: client threads send requests from the pool through a target, every answer is checked as
it comes, and the run's report (counts, resources, latency windows) is judged by :func:`verdict`. What a
target is and what the report holds: :mod:`dpr.bench.soak`."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import numpy as np

from dpr.errors import InputError

from .soak_answers import Answer, same_error, same_ranking
from .soak_pool import Case
from .soak_probe import ProcProbe, settled

__all__ = ["run_soak", "verdict"]


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
    fds0, thr0, rss0 = settled(probe.fds), settled(probe.threads), probe.rss()
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
    fds1, thr1 = settled(probe.fds, fds0), settled(probe.threads, thr0)
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
