"""The optional int8 prompt encoder (``dpr-export --int8``): ``prompt_encoder_int8.onnx``.

Dynamic quantisation (``onnxruntime.quantization.quantize_dynamic``): int8 weights with one scale per
output channel (``per_channel=True``), activations quantised to uint8 per tensor at run time. Per-tensor
weight scales are not acceptable on all-MiniLM-L6-v2 (far under the gate below); per-channel ones are.

Saturation-free by construction, so the result does not depend on the processor. ONNX Runtime's MLAS
runs the u8 x s8 products on x86 without VNNI (AVX2) with ``VPMADDUBSW``, which adds each pair of
adjacent products into an int16 that saturates at 32767; VNNI's ``VPDPBUSD`` (AVX512-VNNI, AVX-VNNI)
adds into int32 and does not. With full-range int8 weights (|w| <= 127) a pair reaches
2 * 255 * 127 = 64770, so the same graph scored a lower worst-row cosine on an AVX2-only CPU than on VNNI
machines, under the gate (a numpy emulation of ``VPMADDUBSW`` reproduces the gap). The weights are therefore
quantised with ``reduce_range=True`` (7 bits: |w| <= 64, so a pair is at most 2 * 255 * 64 = 32640 < 32767,
checked on the written graph by ``int8_weight_absmax``) and every x86 kernel computes the same exact int32
sums. U8U8 (uint8 weights, widened to int16 by MLAS) would also be saturation-free but is much slower
(the numbers of these choices: docs/ARCHITECTURE.md, "Measurements behind the defaults").

Only ``MatMul`` nodes are quantised (and a ``Gemm`` with a constant weight, such as the prompt
projection, which the quantiser rewrites to a MatMul named ``<gemm>_MatMul``): quantising the
word-embedding ``Gather`` too (the quantiser's default) costs accuracy and no time. The 7-bit weights
cost some accuracy (all-MiniLM-L6-v2 under the bench's default model misses the gate with every MatMul
quantised), so when the worst row misses the gate the most sensitive MatMuls are left in
fp32, greedily: each MatMul's sensitivity is measured end to end (``matmul_sensitivity``: the mean
``1 - cosine`` to fp32 with only that MatMul quantised, simulated in one fp32 graph, over the first
attempt's ``SENSITIVITY_ROWS`` worst prompts), then the MatMuls are left out one at a time, most
sensitive first, and the real int8 graph is measured again after each, until the gate is met or a
quarter of the MatMuls are in fp32 (then the export fails). On that model one MatMul (layer 0's
feed-forward output) suffices, at nearly the speed of the full-range settings.

The gate: the worst row's cosine between the int8 and the fp32 graph's prompt vectors over real
prompts (every template of the prompt bank x every tag, and each again with a catalogue title
appended: several hundred) must reach ``min_cosine`` (default 0.98) or the export fails. The result
is recorded in ``manifest["graphs"]["prompt_encoder_int8"]``: ``quantization`` (the settings, the
largest int8 weight, the MatMuls left in fp32) and ``parity`` (cosines, every attempt, the measured
sensitivities).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dpr.errors import require
from dpr.export.config import ExportError
from dpr.export.onnx_graphs import _ort_session
from dpr.export.parity import compare

INT8_GRAPH = "prompt_encoder_int8"
INT8_FILE = f"{INT8_GRAPH}.onnx"
DEFAULT_MIN_COSINE = 0.98
REDUCE_RANGE = True                 # 7-bit int8 weights: saturation-free on every x86 kernel (see above)
WEIGHT_QMAX = 64 if REDUCE_RANGE else 127   # onnxruntime's int8 range: [-64, 64] reduced, else [-127, 127]
ACTIVATION_QMAX = 255               # uint8 activations (DynamicQuantizeLinear)
INT16_MAX = 32767                   # VPMADDUBSW's saturating int16 pair sum
MAX_EXCLUDED_FRACTION = 0.25        # never leave more than a quarter of the MatMuls in fp32
SENSITIVITY_ROWS = 32               # the first attempt's worst rows the sensitivities are measured on


def parity_prompts(catalogue, seed: int = 0) -> list[str]:
    """Real prompt texts: every bank template x tag (both polarities), then each with a title appended."""
    from dpr.data.prompts import PromptBank

    base = PromptBank().all_prompts(list(catalogue.tag_names) or ["comedy"])
    rng = np.random.default_rng(seed)
    titles = list(catalogue.titles) or ["The Silent Harbor"]
    return base + [f"{p}, like {titles[int(rng.integers(len(titles)))]}" for p in base]


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    den = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return (a * b).sum(axis=1) / den


def int8_weight_absmax(path: Path) -> int:
    """The largest |int8 weight| fed to an integer MatMul of the graph at ``path`` (0 if none)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    init = {i.name: i for i in model.graph.initializer}
    best = 0
    for n in model.graph.node:
        if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat") and len(n.input) > 1:
            t = init.get(n.input[1])
            if t is not None and t.data_type == onnx.TensorProto.INT8:
                best = max(best, int(np.abs(numpy_helper.to_array(t).astype(np.int32)).max(initial=0)))
    return best


def quantize_prompt_encoder(src: Path, dst: Path, exclude: list[str] | tuple = ()) -> dict:
    """Write the per-channel, reduced-range int8 copy of ``src`` to ``dst`` (the MatMuls named in
    ``exclude`` stay fp32); returns the settings used. Raises ExportError if a u8 x s8 pair of the written
    graph could saturate an int16 (VPMADDUBSW, x86 without VNNI)."""
    import logging

    ort = require("onnxruntime", "the int8 prompt encoder (dpr-export --int8)")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)              # the quantiser logs a pre-processing hint on the root logger
    try:
        quantize_dynamic(str(src), str(dst), per_channel=True, reduce_range=REDUCE_RANGE,
                         weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"], nodes_to_exclude=list(exclude))
    finally:
        root.setLevel(level)
    wmax = int8_weight_absmax(dst)
    pair_max = 2 * ACTIVATION_QMAX * wmax
    if pair_max > INT16_MAX:
        dst.unlink(missing_ok=True)
        raise ExportError(f"the int8 prompt encoder's weights reach |{wmax}|: a u8 x s8 product pair "
                          f"({pair_max}) can saturate VPMADDUBSW's int16 on x86 without VNNI")
    return {"method": "onnxruntime.quantization.quantize_dynamic", "per_channel": True, "weight_type": "QInt8",
            "reduce_range": REDUCE_RANGE, "weight_range": [-WEIGHT_QMAX, WEIGHT_QMAX],
            "activations": "uint8, per tensor, dynamic", "op_types": ["MatMul"],
            "max_abs_int8_weight": wmax, "max_u8s8_pair_sum": pair_max, "saturation_free": True,
            "excluded_nodes": list(exclude), "onnxruntime": ort.__version__}


def _quantizable(model) -> list[tuple[str, int, object, bool]]:
    """(name, node index, weight initializer, transposed) of every named node ``quantize_prompt_encoder``
    quantises: a ``MatMul`` with a constant 2-D float weight, and a ``Gemm`` the quantiser rewrites to one
    (alpha = beta = 1, no transA; it names it ``<gemm>_MatMul``, the name ``nodes_to_exclude`` takes;
    ``transposed``: its transB, which the rewrite undoes)."""
    import onnx

    init = {i.name: i for i in model.graph.initializer}
    out = []
    for i, n in enumerate(model.graph.node):
        if not n.name or n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2:
            continue
        t = init.get(n.input[1])
        if t is None or len(t.dims) != 2 or t.data_type != onnx.TensorProto.FLOAT:
            continue
        if n.op_type == "MatMul":
            out.append((n.name, i, t, False))
            continue
        att = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if att.get("alpha", 1.0) == 1.0 and att.get("beta", 1.0) == 1.0 and not att.get("transA", 0):
            out.append((f"{n.name}_MatMul", i, t, bool(att.get("transB", 0))))
    return out


def quantizable_matmuls(model) -> list[str]:
    """The names (as ``nodes_to_exclude`` takes them) of the MatMuls ``quantize_prompt_encoder`` quantises."""
    return [name for name, _, _, _ in _quantizable(model)]


def _fake_quant_weight(w: np.ndarray) -> np.ndarray:
    """``w`` [K, N] quantised as onnxruntime does it here (symmetric, one scale per column N, +-WEIGHT_QMAX)
    and back to float32."""
    w = w.astype(np.float32)
    scale = np.abs(w).max(axis=0) / np.float32(WEIGHT_QMAX)
    scale[scale == 0] = 1
    return (np.clip(np.round(w / scale), -WEIGHT_QMAX, WEIGHT_QMAX) * scale).astype(np.float32)


def matmul_sensitivity(src: Path, feeds: dict, ref: np.ndarray, names: list[str] | None = None) -> dict[str, float]:
    """Each quantisable MatMul's end-to-end sensitivity: the mean over the rows of ``feeds`` of
    ``1 - cosine`` to ``ref`` (the fp32 graph's output on ``feeds``) when only that MatMul is quantised.

    One probe graph serves every MatMul: each gets a quantised twin (its input through
    DynamicQuantizeLinear -> DequantizeLinear, its weight quantised as ``quantize_prompt_encoder`` does
    it) and a boolean input choosing between the two, so it costs one session and one run per MatMul."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    ort = require("onnxruntime", "the int8 prompt encoder (dpr-export --int8)")
    model = onnx.load(str(src))
    found = {i: (name, t, transposed) for name, i, t, transposed in _quantizable(model)}
    todo = {f[0] for f in found.values()} if names is None else set(names)
    nodes, flags = [], {}
    for i, n in enumerate(model.graph.node):
        nodes.append(n)
        name, t, transposed = found.get(i, (None, None, False))
        if name not in todo:
            continue
        flag, y, p = f"__dpr_q{len(flags)}", n.output[0], f"__dpr_q{len(flags)}_"
        flags[name] = flag
        w = numpy_helper.to_array(t).T if transposed else numpy_helper.to_array(t)
        model.graph.initializer.append(numpy_helper.from_array(_fake_quant_weight(w), p + "w"))
        model.graph.input.append(helper.make_tensor_value_info(flag, TensorProto.BOOL, []))
        n.output[0] = p + "fp32"
        mm = p + ("mm" if n.op_type == "Gemm" and len(n.input) > 2 and n.input[2] else "int8")
        nodes += [helper.make_node("DynamicQuantizeLinear", [n.input[0]], [p + "xq", p + "xs", p + "xz"]),
                  helper.make_node("DequantizeLinear", [p + "xq", p + "xs", p + "xz"], [p + "x"]),
                  helper.make_node("MatMul", [p + "x", p + "w"], [mm])]
        if mm != p + "int8":                  # a Gemm's bias, as the quantiser's rewrite adds it
            nodes.append(helper.make_node("Add", [mm, n.input[2]], [p + "int8"]))
        nodes.append(helper.make_node("Where", [flag, p + "int8", p + "fp32"], [y]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if model.ByteSize() < 2**31 - 2**26:       # protobuf's 2 GiB limit
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            onnx.save(model, f"{tmp}/probe.onnx", save_as_external_data=True, location="probe.onnx.data")
            sess = ort.InferenceSession(f"{tmp}/probe.onnx", so, providers=["CPUExecutionProvider"])
    off = {f: np.array(False) for f in flags.values()}
    out = {}
    for name, flag in flags.items():
        got = sess.run(None, {**feeds, **off, flag: np.array(True)})[0]
        out[name] = float(np.mean(1.0 - row_cosines(got, ref)))
    return out


def build_int8_prompt_encoder(folder: Path, fp32_entry: dict, tokenizer, max_tokens: int, catalogue,
                              table: np.ndarray, min_cosine: float = DEFAULT_MIN_COSINE) -> dict:
    """Quantise the fp32 prompt encoder (``fp32_entry``: its manifest entry) to
    ``folder/prompt_encoder_int8.onnx``, measure it against the fp32 graph on real prompts and return its
    manifest entry (same inputs and outputs); raises ExportError below ``min_cosine``. Misses leave the
    most sensitive MatMuls in fp32, one more per attempt (module docstring)."""
    import onnx

    folder = Path(folder)
    fp32_file = fp32_entry["file"]
    src, dst = folder / fp32_file, folder / INT8_FILE
    texts = parity_prompts(catalogue)
    tk = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="np")
    feeds = {"input_ids": tk["input_ids"].astype(np.int64), "attention_mask": tk["attention_mask"].astype(np.int64)}
    ref = _ort_session(src).run(None, feeds)[0]
    candidates = quantizable_matmuls(onnx.load(str(src), load_external_data=False))
    max_excluded = math.ceil(MAX_EXCLUDED_FRACTION * len(candidates))
    attempts, order, sensitivity, cos = [], [], None, None
    for k in range(max_excluded + 1):
        if k == 1:                            # the first attempt missed: measure which MatMuls to leave in fp32
            worst_rows = np.argsort(cos, kind="stable")[:SENSITIVITY_ROWS]
            sens = matmul_sensitivity(src, {n: v[worst_rows] for n, v in feeds.items()}, ref[worst_rows], candidates)
            order = sorted(sens, key=lambda n: (-sens[n], candidates.index(n)))
            sensitivity = {"rows": int(len(worst_rows)), "metric": "mean 1 - cosine, only this MatMul quantised",
                           "ranked": [[n, sens[n]] for n in order]}
        exclude = order[:k] if k else []
        settings = quantize_prompt_encoder(src, dst, exclude)
        got = _ort_session(dst).run(None, feeds)[0]
        cos = row_cosines(got, ref)
        worst = float(cos.min()) if cos.size else 1.0
        attempts.append({"excluded_nodes": len(exclude), "excluded": list(exclude), "worst_row_cosine": worst,
                         "mean_row_cosine": float(cos.mean()) if cos.size else 1.0})
        if worst >= min_cosine:
            parity = {"worst_row_cosine": worst, "mean_row_cosine": float(cos.mean()),
                      "worst_prompt": texts[int(cos.argmin())], "prompts": len(texts), "reference": fp32_file,
                      "min_cosine": float(min_cosine), "attempts": attempts, "sensitivity": sensitivity,
                      "all": compare(got, ref, table)}
            settings["quantized_matmuls"] = len(candidates) - len(exclude)
            return {"file": INT8_FILE, "exporter": "quantize", "source": fp32_file, "quantization": settings,
                    "inputs": fp32_entry.get("inputs"), "outputs": fp32_entry.get("outputs"), "parity": parity}
    dst.unlink(missing_ok=True)
    err = ExportError(f"the int8 prompt encoder is not accurate enough: worst-row cosine to fp32 "
                      f"{max(a['worst_row_cosine'] for a in attempts):.4f} < {min_cosine:g} over {len(texts)} real "
                      f"prompts with up to {max_excluded} of {len(candidates)} MatMuls left in fp32 (attempts: "
                      f"{[(a['excluded_nodes'], round(a['worst_row_cosine'], 4)) for a in attempts]}); export "
                      f"without --int8 or lower --int8-min-cosine")
    err.attempts, err.sensitivity = attempts, sensitivity      # what was tried, for the caller and the tests
    raise err
