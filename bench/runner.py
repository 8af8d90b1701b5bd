"""``run(config) -> results``: the whole benchmark, in this order:

1. the model: ``--model`` export, or the default UNTRAINED model (built and exported once, cached);
2. the batches of every prompt mode (identical for every backend);
3. per prompt mode, the plain PyTorch pipeline and every backend interleaved batch by batch (see
   dpr.bench.measure): latency, throughput, stages, prompt-cache hit rate, agreement of the top-10
   with the pipeline's;
4. the user encoder with the fused vs the portable graph (ONNX Runtime backends); the host stage per
   entry point (dpr.bench.host);
5. the gating step alone, fused vs portable, at 1, 64, --batch, 4096;
6. the retrieval section with the ceilings;
7. the summary fields (``speedup_vs_torch``, ``fused_vs_portable``, ``retrieval``).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

from dpr.errors import DPRError

from .backends import load_engine, plan_backends, resolve_device
from .config import BenchConfig, BenchError
from .config import log as _log
from .gating import gating_section
from .host import host_section
from .machine import machine_info, versions
from .measure import Runner, engine_call, overlap, pipeline_call, run_mode, time_user_encoders
from .pipeline import NAME as PIPELINE
from .pipeline import PyTorchPipeline
from .report import check_plot_available, retrieval_summary, speedups
from .batcher_latency import batcher_section
from .retrieval import retrieval_section
from .workload import Workload



def _open_model(cfg: BenchConfig):
    from dpr.engine.manifest import load_export

    from .default_model import default_model, describe_export

    if cfg.model:
        path = Path(cfg.model)
        if not path.exists():
            raise BenchError(f"--model {cfg.model}: export folder not found (create one with dpr-export, or "
                             "leave --model out to benchmark the default model)")
        export = load_export(path)
        return export, describe_export(export)
    dm = default_model(cfg)
    export = load_export(dm.export_dir)
    info = dict(dm.info)
    info["path"] = str(dm.export_dir)
    return export, info


def _int8_info(export) -> dict | None:
    g = export.graphs.get("prompt_encoder_int8")
    if not g:
        return None
    par = g.get("parity") or {}
    return {"file": g.get("file"), "worst_row_cosine": par.get("worst_row_cosine"),
            "mean_row_cosine": par.get("mean_row_cosine"), "prompts": par.get("prompts"),
            "quantization": g.get("quantization")}


def run(cfg: BenchConfig) -> dict:
    """Run the benchmark described by ``cfg``; returns the results (what ``--json`` writes)."""
    cfg.validate()
    if cfg.plot:
        check_plot_available()                      # fail before minutes of work, not after
    t_start = time.time()
    device = resolve_device(cfg.device)
    export, model_info = _open_model(cfg)
    model_info["int8_prompt_encoder"] = _int8_info(export)
    plans = plan_backends(cfg.backend_names(), export, device)
    modes = cfg.prompt_modes()
    k = min(cfg.k, int(model_info["num_items"]) or cfg.k)
    n_batches = cfg.warmup + cfg.iters
    workload = Workload(export.items(), export.max_len, seed=cfg.seed)
    _log(f"preparing {n_batches} batches of {cfg.batch} requests per prompt mode ({', '.join(modes)})")
    batches = {m: workload.batches(cfg.batch, m, n_batches) for m in modes}

    res: dict = {"tool": "dpr-bench", "created_unix": int(t_start), "config": cfg.to_dict(), "device": device,
                 "k": k, "machine": machine_info(), "versions": versions(), "model": model_info,
                 "workload": {"histories": "sampled from the catalogue: log-normal lengths (median 30), 1-2 "
                                           "favourite tags, Zipf-like popularity",
                              "prompt_rows": "cycle positive, positive, negative, both (1.25 prompts per request)",
                              "prompts_per_batch": {m: batches[m][0].num_prompts for m in modes}},
                 "backends": {}, "skipped_backends": {}, "runs": [], "user_encoder_gating": {}}
    # -- the engines (each with its own prompt cache) and the pipeline, which reuses the torch backend's
    #    model objects when that backend is measured
    runners: list[Runner] = []
    engines = {}
    for plan in plans:
        if not plan.available:
            res["skipped_backends"][plan.name] = plan.reason
            continue
        _log(f"loading backend {plan.name} on {device}")
        try:
            engine = load_engine(plan, export.path, device, cfg.checkpoint)
        except (DPRError, ImportError) as exc:
            if cfg.backend_names() not in (["auto"], ["all"]):
                raise
            res["skipped_backends"][plan.name] = f"{type(exc).__name__}: {exc}"
            continue
        engines[plan.name] = engine
        res["backends"][plan.name] = engine.describe()
        cos = _prompt_precision(engine, batches)
        if cos is not None:
            res["backends"][plan.name]["prompt_worst_row_cosine_to_fp32"] = cos
        runners.append(Runner(plan.name, engine_call(engine, k), engine))
    torch_engine = engines.get("torch")
    try:
        pipe = PyTorchPipeline(export, device, torch_backend=torch_engine.backend if torch_engine else None,
                               checkpoint=cfg.checkpoint or None)
    except DPRError as exc:
        raise BenchError(f"the PyTorch pipeline baseline cannot load the model: {exc}") from None
    res["baseline"] = pipe.describe()
    runners.insert(0, Runner(PIPELINE, pipeline_call(pipe, k)))

    # -- every prompt mode: all runners interleaved batch by batch (fair under a drifting load)
    for mode in modes:
        _log(f"prompts={mode}: {cfg.warmup} warm-up + {cfg.iters} timed batches through "
             f"{', '.join(r.name for r in runners)} (interleaved)")
        run_mode(runners, batches[mode], cfg.warmup, f"prompts={mode}", cfg.progress)
        base = next(r for r in runners if r.name == PIPELINE)
        for r in runners:
            out = r.result(cfg.batch)
            out.update(backend=r.name, prompts=mode, top10_agreement=overlap(r.first, base.first))
            res["runs"].append(out)
            t = out["total"]
            _log(f"  {r.name}/{mode}: median {t['median_ms']:.1f} ms per batch, {t['throughput_rps']:.0f} req/s")

    # -- the whole user encoder, fused graph vs portable graph (ONNX Runtime)
    ort = engines.get("onnxruntime")
    if ort is not None:
        ug = _user_encoder_gating(cfg, ort, export, device, batches, modes)
        if ug:
            res["user_encoder_gating"]["onnxruntime"] = ug
    # -- the host stage per entry point, on the first backend measured (ONNX Runtime when there is one)
    res["host"] = None
    host_engine = engines.get("onnxruntime") or next(iter(engines.values()), None)
    if cfg.host and host_engine is not None:
        hmode = next((m for m in ("templates", "none", "unique") if m in modes), modes[0])
        _log(f"host stage: recommend_batch (indices, ids) and recommend() on {host_engine.backend_name}, "
             f"prompts={hmode}")
        res["host"] = host_section(host_engine, batches[hmode], k, cfg.warmup, hmode)
    # -- single requests at a fixed rate through the DynamicBatcher (torch on a GPU: the device path)
    res["batcher"] = None
    lat_engine = (engines.get("torch") if device.startswith("cuda") else None) or host_engine
    if cfg.batcher_rate > 0 and lat_engine is not None:
        bmode = next((m for m in ("templates", "none", "unique") if m in modes), modes[0])
        _log(f"batcher: single requests at {cfg.batcher_rate:g}/s for {cfg.batcher_seconds:g} s through "
             f"{lat_engine.backend_name}, pipelined and not, prompts={bmode}")
        res["batcher"] = batcher_section(lat_engine, batches[bmode], k, cfg.batcher_rate, cfg.batcher_seconds,
                                         cfg.batch)
    for engine in engines.values():
        engine.close()
    del engines, runners, pipe
    gc.collect()

    res["gating"] = gating_section(export, cfg.batch, cfg.gate_min_time) if cfg.gate else None
    res["retrieval_section"] = (retrieval_section(cfg.retrieval_sizes(), export.dim, cfg.batch, k, device,
                                                  cfg.timed_retrieval_iters(), cfg.ceiling_size)
                                if cfg.retrieval else None)
    res["speedup_vs_torch"] = speedups(res["runs"])
    res["fused_vs_portable"] = (res["gating"] or {}).get("ratio_at_batch")
    res["retrieval"] = retrieval_summary(res["retrieval_section"])
    res["int8_prompt_encoder"] = model_info["int8_prompt_encoder"]
    res["elapsed_s"] = round(time.time() - t_start, 1)
    return res


def _prompt_precision(engine, batches) -> float | None:
    """Worst-row cosine of a half-precision torch prompt encoder to fp32 on the benchmark's own prompts (the
    first 512 distinct ones); None for other backends and fp32."""
    be = engine.backend
    if not hasattr(be, "prompt_cosine_to_fp32") or getattr(be, "prompt_dtype", "float32") == "float32":
        return None
    texts = []
    for mode_batches in batches.values():
        for b in mode_batches:
            texts += [t for t in list(b.prompts) + list(b.negative_prompts) if t]
    uniq = list(dict.fromkeys(texts))[:512]
    if not uniq:
        return None
    ids, mask = engine.tokenize(uniq)
    return round(be.prompt_cosine_to_fp32(ids, mask), 6)


def _user_encoder_gating(cfg, engine, export, device, batches, modes) -> dict | None:
    """The whole user encoder, fused graph vs portable graph, on one prompted batch, each through an engine's
    ``encode_users`` (history chunks, concurrent chunk workers: the user-encoder stage as served)."""
    from dpr.engine import Engine

    if not getattr(engine.backend, "fused", False):
        return None
    mode = next((m for m in ("templates", "unique") if m in modes), modes[0])
    _log("user encoder: fused graph vs portable graph")
    last = batches[mode][-1]
    inputs = engine.user_encoder_inputs(last.histories, last.prompts, last.negative_prompts)
    portable = Engine.load(export.path, backend="onnxruntime", device=device, backend_options={"fused": False},
                           verify_hashes=False)
    try:
        t = time_user_encoders({"fused": engine.encode_users, "portable": portable.encode_users}, inputs,
                               cfg.iters, cfg.warmup)
    finally:
        portable.close()
    return {"fused": t["fused"], "portable": t["portable"],
            "ratio": t["portable"]["median_ms"] / t["fused"]["median_ms"], "batch": cfg.batch, "prompts": mode,
            "graphs": [engine.backend.user_graph, portable.backend.user_graph]}
