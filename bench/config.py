"""What ``dpr-bench`` measures, as one dataclass: every command-line flag mirrors a field
(``BenchConfig.retrieval_items`` -> ``--retrieval-items``), so a run is fully described by its config,
which the JSON report records verbatim."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field

from dpr.errors import DPRError


def log(msg: str) -> None:
    """A ``dpr-bench:`` progress line on stderr (stdout is the report)."""
    print(f"dpr-bench: {msg}", file=sys.stderr, flush=True)

#: the prompt modes a run can measure (see dpr.bench.workload)
PROMPT_MODES = ("unique", "templates", "none")

#: bench backend name -> (engine backend, engine backend_options). ``onnxruntime-portable`` runs the
#: user encoder without the fused custom op end to end (the gating stage is also measured on its own
#: for every ONNX Runtime backend, so ``auto`` leaves it out).
BENCH_BACKENDS: dict[str, tuple[str, dict]] = {
    "torch": ("torch", {}),
    "onnxruntime": ("onnxruntime", {}),
    "onnxruntime-int8": ("onnxruntime", {"prompt_encoder": "int8"}),
    "onnxruntime-portable": ("onnxruntime", {"fused": False}),
    "tensorrt": ("tensorrt", {}),
}
AUTO_BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8", "tensorrt")


class BenchError(DPRError):
    """A bad ``dpr-bench`` option or a benchmark that cannot run here (the message names the fix)."""


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class BenchConfig:
    model: str = _help("export folder written by dpr-export; empty: build the default UNTRAINED model "
                       "(synthetic catalogue of --items items, real architecture) and export it", default="")
    batch: int = _help("requests per recommend call", default=512)
    backends: str = _help("auto (every backend that runs here), all (also list those that cannot, "
                          "with why), or a comma list of: " + ", ".join(BENCH_BACKENDS), default="auto")
    items: int = _help("catalogue size of the default model (ignored with --model)", default=100_000)
    prompts: str = _help("prompt modes, comma list or 'all': unique (every prompt new: no cache hits), "
                         "templates (drawn from the template bank: repeats hit the cache), none", default="all")
    iters: int = _help("timed iterations per backend and prompt mode", default=10)
    warmup: int = _help("untimed warm-up iterations before them", default=2)
    json: str = _help("write every number, the machine and the config to this JSON file", default="")
    plot: str = _help("draw throughput per backend and the stage breakdown to this image "
                      "(needs matplotlib: pip install \"dpr[plot]\")", default="")
    device: str = _help("cpu | cuda | auto (cuda when visible)", default="auto")
    retrieval: bool = _help("run the retrieval section (--no-retrieval skips it)", default=True)
    retrieval_items: str = _help("catalogue sizes of the retrieval section, comma list (1e6 style allowed)",
                                 default="1e4,1e5,1e6")
    retrieval_iters: int = _help("timed searches per size and retriever (0: min(--iters, 5))", default=0)
    gate: bool = _help("run the fused-vs-portable gating section (--no-gate skips it)", default=True)
    host: bool = _help("run the host section: the engine's own Python/numpy time per batch (all but tokenizer, "
                       "model runs and retrieval kernel) through recommend_batch (indices, ids) and recommend() "
                       "(--no-host skips it)", default=True)
    gate_min_time: float = _help("seconds of timing per gating measurement", default=0.3)
    batcher_rate: float = _help("batcher section: single requests per second offered to the DynamicBatcher "
                                "(open loop, pipelined and not); 0 skips it", default=2000.0)
    batcher_seconds: float = _help("batcher section: seconds of arrivals per mode", default=2.0)
    ceiling_size: int = _help("matrix size of the matmul ceiling measurement", default=4096)
    k: int = _help("items per request", default=10)
    text_encoder: str = _help("default model only: a Hugging Face encoder folder instead of the [encoder] "
                              "extra's all-MiniLM-L6-v2", default="")
    int8: bool = _help("default model only: also export the int8 prompt encoder (benchmarked as "
                       "onnxruntime-int8)", default=True)
    checkpoint: str = _help("torch backend / PyTorch pipeline: the checkpoint an ONNX-only export came from",
                            default="")
    cache_dir: str = _help("where default-model exports are cached (keyed by their config)",
                           default="build/bench-cache")
    seed: int = _help("seed of the workload (histories, prompts) and the default model", default=0)
    progress: bool = _help("show progress bars (--no-progress for logs only)", default=True)

    # ---- parsed views --------------------------------------------------------------------------
    def validate(self) -> "BenchConfig":
        """Raise :class:`BenchError` naming the first bad option; returns self."""
        for name, lo in (("batch", 1), ("items", 1), ("iters", 1), ("warmup", 0), ("k", 1),
                         ("retrieval_iters", 0), ("ceiling_size", 16)):
            v = getattr(self, name)
            if v < lo:
                raise BenchError(f"--{name.replace('_', '-')} must be >= {lo}, got {v}")
        if self.gate_min_time <= 0:
            raise BenchError(f"--gate-min-time must be > 0, got {self.gate_min_time}")
        if not (0 <= self.batcher_rate <= 1e6 and 0 < self.batcher_seconds <= 600):
            raise BenchError(f"--batcher-rate must be in 0..1e6 and --batcher-seconds in (0, 600], got "
                             f"{self.batcher_rate} and {self.batcher_seconds}")
        if self.device not in ("auto", "cpu", "cuda", "gpu") and not (
                self.device.startswith("cuda:") and self.device[5:].isdigit()):
            raise BenchError(f"--device must be cpu, cuda or auto, got {self.device!r}")
        self.prompt_modes()
        self.backend_names()
        if self.retrieval:
            self.retrieval_sizes()
        return self

    def prompt_modes(self) -> list[str]:
        modes = _choose(self.prompts, PROMPT_MODES, "--prompts", "mode", "all")
        return list(PROMPT_MODES) if modes == ["all"] else modes

    def backend_names(self) -> list[str]:
        """The requested bench backends: ``['auto']``, ``['all']`` or known names."""
        return _choose(self.backends, BENCH_BACKENDS, "--backends", "backend", "auto", "all")

    def retrieval_sizes(self) -> list[int]:
        out = []
        for s in _split(self.retrieval_items):
            try:
                v = float(s)
            except ValueError:
                raise BenchError(f"--retrieval-items: {s!r} is not a number (use e.g. 1e4,1e5,1e6)") from None
            if v < 1 or v != int(v):
                raise BenchError(f"--retrieval-items: {s!r} must be a whole number of items >= 1")
            out.append(int(v))
        if not out:
            raise BenchError("--retrieval-items is empty (or pass --no-retrieval)")
        return out

    def timed_retrieval_iters(self) -> int:
        return self.retrieval_iters or min(self.iters, 5)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _split(s: str) -> list[str]:
    return [x.strip().lower() for x in str(s).split(",") if x.strip()]


def _choose(value: str, known, flag: str, what: str, *specials: str) -> list[str]:
    """The comma list ``value`` checked against ``known`` (duplicates dropped, order kept); one of
    ``specials`` alone is returned as is."""
    names = _split(value)
    if len(names) == 1 and names[0] in specials:
        return names
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise BenchError(f"{flag}: unknown {what}(s) {bad or [value]}; choose {' or '.join(specials)} or "
                         f"a comma list of {', '.join(known)}")
    return list(dict.fromkeys(names))
