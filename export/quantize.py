"""The optional int8 prompt encoder (``dpr-export --int8``): ``prompt_encoder_int8.onnx``.

Dynamic quantisation (``onnxruntime.quantization.quantize_dynamic``): int8 weights with one scale per
output channel (``per_channel=True``), activations quantised per tensor at run time. Measured on
all-MiniLM-L6-v2 (REFERENCE.md section 8): about 2x faster than fp32 on the CPU; per-tensor weight
scales are not acceptable (worst-row cosine 0.92), per-channel ones keep it >= 0.98.

Only ``MatMul`` nodes are quantised: quantising the word-embedding ``Gather`` too (the quantiser's
default) costs accuracy (worst cosine 0.976 against 0.984 on MiniLM) and no time. If the worst row
still misses the gate, the feed-forward output MatMuls (fed by ``Gelu``, whose activations have the
widest range, so per-tensor activation scales lose most there) are left in fp32 and it is tried again.

The gate: the worst row's cosine between the int8 and the fp32 graph's prompt vectors over real
prompts (every template of the prompt bank x every tag, and each again with a catalogue title
appended: several hundred) must reach ``min_cosine`` (default 0.98) or the export fails. The result
is recorded in ``manifest["graphs"]["prompt_encoder_int8"]["parity"]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpr.errors import require

INT8_GRAPH = "prompt_encoder_int8"
INT8_FILE = f"{INT8_GRAPH}.onnx"


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


def quantize_prompt_encoder(src: Path, dst: Path, exclude: list[str] | tuple = ()) -> dict:
    """Write the per-channel int8 copy of ``src`` to ``dst``; returns the settings used."""
    import logging

    ort = require("onnxruntime", "the int8 prompt encoder (dpr-export --int8)")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)              # the quantiser logs a pre-processing hint on the root logger
    try:
        quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=list(exclude))
    finally:
        root.setLevel(level)
    return {"method": "onnxruntime.quantization.quantize_dynamic", "per_channel": True, "weight_type": "QInt8",
            "activations": "uint8, per tensor, dynamic", "op_types": ["MatMul"], "excluded_nodes": list(exclude),
            "onnxruntime": ort.__version__}


def _gelu_fed_matmuls(path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and producers.get(n.input[0]) == "Gelu"]


def build_int8_prompt_encoder(folder: Path, fp32_entry: dict, tokenizer, max_tokens: int, catalogue,
                              table: np.ndarray, min_cosine: float = 0.98) -> dict:
    """Quantise the fp32 prompt encoder (``fp32_entry``: its manifest entry) to
    ``folder/prompt_encoder_int8.onnx``, measure it against the fp32 graph on real prompts and return its
    manifest entry (same inputs and outputs); raises ExportError below ``min_cosine``."""
    from dpr.export.exporter import ExportError, _ort_session
    from dpr.export.parity import compare

    folder = Path(folder)
    fp32_file = fp32_entry["file"]
    src, dst = folder / fp32_file, folder / INT8_FILE
    texts = parity_prompts(catalogue)
    tk = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="np")
    feeds = {"input_ids": tk["input_ids"].astype(np.int64), "attention_mask": tk["attention_mask"].astype(np.int64)}
    ref = _ort_session(src).run(None, feeds)[0]
    attempts = []
    for exclude in ([], None):
        if exclude is None:
            exclude = _gelu_fed_matmuls(src)
            if not exclude:
                break
        settings = quantize_prompt_encoder(src, dst, exclude)
        got = _ort_session(dst).run(None, feeds)[0]
        cos = row_cosines(got, ref)
        worst = float(cos.min()) if cos.size else 1.0
        attempts.append({"excluded_nodes": len(exclude), "worst_row_cosine": worst})
        if worst >= min_cosine:
            parity = {"worst_row_cosine": worst, "mean_row_cosine": float(cos.mean()),
                      "worst_prompt": texts[int(cos.argmin())], "prompts": len(texts), "reference": fp32_file,
                      "min_cosine": float(min_cosine), "attempts": attempts,
                      "all": compare(got, ref, table)}
            return {"file": INT8_FILE, "exporter": "quantize", "source": fp32_file, "quantization": settings,
                    "inputs": fp32_entry.get("inputs"), "outputs": fp32_entry.get("outputs"), "parity": parity}
    dst.unlink(missing_ok=True)
    raise ExportError(f"the int8 prompt encoder is not accurate enough: worst-row cosine to fp32 "
                      f"{attempts[-1]['worst_row_cosine']:.4f} < {min_cosine:g} over {len(texts)} real prompts "
                      f"(attempts: {attempts}); export without --int8 or lower --int8-min-cosine")
