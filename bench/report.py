"""The report: the summary other tools read (``speedup_vs_torch``, ``fused_vs_portable``, ``retrieval``),
the readable table printed last, the JSON file and the optional plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

from dpr.errors import require

from .config import BenchError
from .pipeline import NAME as PIPELINE

STAGE_LABELS = (("tokenize", "tokenize"), ("prompt_encoder", "prompt enc"), ("user_encoder", "user enc"),
                ("retrieval", "retrieval"), ("other", "other"))


# ---- summary fields ----------------------------------------------------------------------------

def speedups(runs: list[dict]) -> dict:
    """``{"<backend>/<prompts>": throughput ratio to the PyTorch pipeline on the same batches}``."""
    base = {r["prompts"]: r["total"]["median_ms"] for r in runs if r["backend"] == PIPELINE}
    out = {}
    for r in runs:
        ref = base.get(r["prompts"])
        med = r["total"]["median_ms"]
        if r["backend"] != PIPELINE and ref and med:
            out[f"{r['backend']}/{r['prompts']}"] = ref / med
    return out


def retrieval_summary(section: dict | None) -> list[dict]:
    if not section:
        return []
    keys = ("items", "retriever", "ms", "gflops", "ceiling_gflops", "gbps", "ceiling_gbps", "pct_of_ceiling")
    return [{k: r[k] for k in keys if k in r} for r in section.get("rows", [])]


# ---- the table --------------------------------------------------------------------------------

def _f(x, fmt: str = ".1f", none: str = "-") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, fmt)


def _ms(x) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.2f}"


def format_report(res: dict) -> str:
    cfg, m, mach = res["config"], res["model"], res["machine"]
    L = []
    gpu = f", GPU {mach['gpu']}" if mach.get("gpu") else ""
    L.append(f"dpr-bench | {mach['cpu']} ({mach['usable_cores']} cores{gpu}) | device {res['device']}")
    enc = m.get("text_encoder") or {}
    standin = " (RANDOM-WEIGHT stand-in: the [encoder] extra is not installed)" if enc.get("pretrained") is False else ""
    L.append(f"model: {m.get('path') or m.get('cache')} | {m['num_items']:,} items | encoder "
             f"{enc.get('name')}{standin} | {m['label']}")
    L.append(f"batch {cfg['batch']} requests (1.25 prompts per request when prompted), k={res['k']}, "
             f"{cfg['iters']} timed iterations after {cfg['warmup']} warm-up; times are medians unless noted")
    ret = res.get("retrieval_section")
    if ret and ret.get("rows"):
        c = ret["ceilings"]
        L.append("")
        L.append(f"retrieval, exact top-{res['k']}, batch {cfg['batch']}, d={ret['rows'][0]['d']} | ceilings: "
                 f"matmul {c['matmul_gflops']:.0f} GFLOP/s, copy {c['copy_gbps']:.0f} GB/s")
        has_gemm = any("gemm_ms" in r for r in ret["rows"])
        L.append(f"  {'items':>9}  {'retriever':<12} {'ms':>9} {'GFLOP/s':>8} {'%ceil':>6} {'GB/s':>7} {'%copy':>6}"
                 + ("  gemm ms  x gemm" if has_gemm else ""))
        for r in ret["rows"]:
            L.append(f"  {r['items']:>9,}  {r['retriever']:<12} {_ms(r['ms']):>9} {r['gflops']:>8.1f} "
                     f"{r['pct_of_ceiling']:>5.1f}% {r['gbps']:>7.2f} {r['pct_of_copy']:>5.1f}%"
                     + (f"  {_ms(r.get('gemm_ms')):>7} {_f(r.get('x_gemm'), '.2f'):>7}" if has_gemm else ""))
        for name, why in ret.get("skipped", {}).items():
            L.append(f"  skipped {name}: {why}")
    g = res.get("gating")
    if g and g.get("batches"):
        L.append("")
        L.append("gating step alone, ONNX Runtime CPU: fused dpr::FusedMoEGate vs portable standard ops (us)")
        L.append("  " + "  ".join(f"b={b}: {_f(r.get('ort_fused_us'))} vs {_f(r['ort_portable_us'])} "
                                  f"(x{_f(r.get('speedup_vs_portable'))})" for b, r in g["batches"].items()))
    elif g and g.get("skipped"):
        L.append(f"\ngating step: skipped ({g['skipped']})")
    for name, u in (res.get("user_encoder_gating") or {}).items():
        L.append(f"whole user encoder, {name}, batch {cfg['batch']}: fused graph {_ms(u['fused']['median_ms'])} ms vs "
                 f"portable {_ms(u['portable']['median_ms'])} ms (x{_f(u['ratio'], '.2f')})")
    h = res.get("host")
    if h:
        ep = h["entry_points"]
        L.append("")
        L.append(f"host stage (all but tokenizer, model runs and retrieval kernel), batch {h['batch']}, "
                 f"{h['backend']}, prompts={h['prompts']}: median ms per batch (us per request)")
        L.append("  " + "  ".join(f"{name}: {_f(e['median_ms'], '.2f')} ({_f(e['us_per_request'], '.2f')})"
                                  for name, e in ep.items())
                 + f"  | targets: recommend_batch <= {h['targets_ms']['recommend_batch']:g} ms, recommend() <= "
                   f"{h['targets_ms']['recommend']:g} ms")
    bl = res.get("batcher")
    if bl:
        L.append("")
        L.append(f"batcher: single requests at {bl['rate_rps']:g}/s offered for {bl['seconds']:g} s, {bl['backend']} on "
                 f"{bl['device']} ({bl['target']})")
        for r in bl["runs"]:
            L.append(f"  {'pipelined' if r['pipeline'] else 'serial   '}: sent {r['sent_rps']:g}/s, p50 "
                     f"{_f(r['p50_ms'], '.2f')} ms, p99 {_f(r['p99_ms'], '.2f')} ms, max {_f(r['max_ms'], '.1f')} ms, "
                     f"mean batch {r['mean_batch']}, lost {r['lost']}, failed {r['failed']}")
    if res.get("skipped_backends"):
        L.append("")
        for name, why in res["skipped_backends"].items():
            L.append(f"backend {name} not measured: {why}")
    # the main table, last
    L.append("")
    head = (f"{'backend':<21} {'prompts':<9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'req/s':>8} {'x torch':>8} "
            + " ".join(f"{lab:>10}" for _, lab in STAGE_LABELS) + f" {'host':>8} {'cache hit':>9} {'top10 agree':>11}")
    L.append(f"end to end, recommend() on {cfg['batch']} requests; stage columns: median ms (host: the engine's "
             f"own time besides tokenizer, models and retrieval kernel, about 'other'); x torch: throughput over the plain "
             f"PyTorch pipeline's")
    L.append(head)
    L.append("-" * len(head))
    sp = res["speedup_vs_torch"]
    for r in res["runs"]:
        t = r["total"]
        key = f"{r['backend']}/{r['prompts']}"
        ratio = 1.0 if r["backend"] == PIPELINE else sp.get(key)
        cache = r.get("prompt_cache")
        hit = "-" if not cache or r["prompts"] == "none" else f"{100 * cache['hit_rate']:.1f}%"
        L.append(f"{r['backend']:<21} {r['prompts']:<9} {_ms(t['median_ms']):>8} {_ms(t['p90_ms']):>8} "
                 f"{_ms(t['p99_ms']):>8} {_f(t['throughput_rps'], '.0f'):>8} {_f(ratio, '.2f'):>8} "
                 + " ".join(f"{_ms(r['stages'][s]['median_ms']):>10}" for s, _ in STAGE_LABELS)
                 + f" {_ms((r.get('host') or {}).get('median_ms')):>8}"
                 + f" {hit:>9} {_f(r.get('top10_agreement'), '.3f'):>11}")
    fv = res.get("fused_vs_portable")
    L.append("")
    L.append(f"summary: fused_vs_portable (gating step at batch {cfg['batch']}) = {_f(fv, '.1f')}x; "
             + ", ".join(f"{k} {v:.2f}x" for k, v in sp.items()))
    if m.get("untrained"):
        L.append(f"NOTE: the model is {m['label']}.")
    return "\n".join(L)


# ---- files ------------------------------------------------------------------------------------

def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if hasattr(x, "item") and callable(x.item):                  # numpy scalars
        return _jsonable(x.item())
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)


def write_json(res: dict, path: str) -> Path:
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(_jsonable(res), indent=2), encoding="utf-8")
    except OSError as exc:
        raise BenchError(f"cannot write --json {path}: {exc.strerror or exc}") from None
    return p


def check_plot_available() -> None:
    require("matplotlib", "dpr-bench --plot")


def write_plot(res: dict, path: str) -> Path:
    """Two panels: throughput per backend and prompt mode (log scale), and the median stage breakdown."""
    require("matplotlib", "dpr-bench --plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = res["runs"]
    modes = list(dict.fromkeys(r["prompts"] for r in runs))
    backends = list(dict.fromkeys(r["backend"] for r in runs))
    by = {(r["backend"], r["prompts"]): r for r in runs}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    width = 0.8 / max(len(backends), 1)
    for j, be in enumerate(backends):
        xs = [i + j * width for i in range(len(modes))]
        ys = [(by.get((be, m)) or {}).get("total", {}).get("throughput_rps") or 0 for m in modes]
        ax1.bar(xs, ys, width, label=be)
    ax1.set_xticks([i + width * (len(backends) - 1) / 2 for i in range(len(modes))], modes)
    ax1.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax1.yaxis.set_major_formatter(plain)
    ax1.yaxis.set_minor_formatter(plain)
    ax1.set_ylabel("requests / s (median)")
    ax1.set_title(f"throughput, batch {res['config']['batch']}")
    ax1.legend(fontsize=8)
    labels = [f"{r['backend']}\n{r['prompts']}" for r in runs]
    bottom = [0.0] * len(runs)
    for s, lab in STAGE_LABELS:
        vals = [r["stages"][s]["median_ms"] or 0.0 for r in runs]
        ax2.bar(range(len(runs)), vals, bottom=bottom, label=lab)
        bottom = [a + b for a, b in zip(bottom, vals)]
    ax2.set_xticks(range(len(runs)), labels, rotation=60, ha="right", fontsize=7)
    ax2.set_ylabel("ms per batch (median per stage)")
    ax2.set_title("where the time goes")
    ax2.legend(fontsize=8)
    note = " (UNTRAINED model)" if res["model"].get("untrained") else ""
    fig.suptitle(f"dpr-bench on {res['machine']['cpu']}{note}", fontsize=10)
    fig.tight_layout()
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=110)
    except OSError as exc:
        raise BenchError(f"cannot write --plot {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return p
