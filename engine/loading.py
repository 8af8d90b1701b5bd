"""The choices ``Engine.load`` makes, each with the reason it reports: the device, the backend (``auto``:
TensorRT > ONNX Runtime > torch), the retriever (``auto``: decided from the instruction set on the CPU), and
the tokenizer as the export recorded it."""

from __future__ import annotations

from dpr.errors import DPRError, InputError

from .backends import AUTO_ORDER, backend_class, cuda_available
from .errors import BackendError


def resolve_device(device: str) -> str:
    dev = str(device).lower()
    if dev == "auto":
        return "cuda" if cuda_available() else "cpu"
    if dev == "gpu":
        dev = "cuda"
    if dev == "cpu" or dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit()):
        if dev.startswith("cuda") and not cuda_available():
            raise BackendError(f"device={device!r} asked for but no CUDA device is visible")
        return dev
    raise InputError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}")


def make_backend(export, backend: str, dev: str, opts: dict):
    """(backend, reason)."""
    if not isinstance(backend, str):
        raise BackendError(f"backend must be a string, got {backend!r}")
    if backend == "auto":
        return auto_backend(export, dev, opts)
    klass = backend_class(backend)
    ok, why = klass.availability(dev)
    if not ok:
        raise BackendError(f"backend {backend!r} is not available on device={dev}: {why}")
    return klass(export, dev, **opts), f"backend {backend!r} requested explicitly ({why})"


def auto_backend(export, dev: str, opts: dict):
    notes = []
    for name in AUTO_ORDER:
        klass = backend_class(name)
        ok, why = klass.availability(dev)
        if not ok:
            notes.append(f"{name}: {why}")
            continue
        try:
            be = klass(export, dev, **opts)
        except (DPRError, ImportError) as exc:
            notes.append(f"{name}: {exc}")
            continue
        skipped = f" (skipped {'; '.join(notes)})" if notes else ""
        return be, f"auto chose backend {name!r} on {dev}: {why}{skipped}"
    raise BackendError("no backend can run this export here: " + "; ".join(notes))


def make_retriever(export, name: str, dev: str, opts: dict):
    """(name, retriever, why): ``"auto"`` on the CPU is decided from the instruction set
    (:func:`dpr.engine.retrieval.auto_cpu_retriever`: ``fused`` on AVX-512 / AVX2+FMA, else ONNX
    Runtime); on a GPU ``torch`` (faiss on request)."""
    from dpr.engine.retrieval import auto_cpu_retriever, available_retrievers, get_retriever

    avail = available_retrievers()
    if name == "auto":
        if dev == "cpu":
            name, why = auto_cpu_retriever(avail)
            why = f"auto on cpu: {why}"
        else:
            name, why = "torch", f"auto on {dev}"
    elif name not in avail:
        from dpr.engine.retrieval import RETRIEVERS
        if name not in RETRIEVERS:
            raise BackendError(f"unknown retriever {name!r}; available: {', '.join(avail)}")
        raise BackendError(f"retriever {name!r} is not available here (missing dependency); "
                           f"available: {', '.join(avail)}")
    else:
        why = "requested explicitly"
    retriever = get_retriever(name, export.item_embeddings(), device=dev, **opts)
    note = getattr(retriever, "setup_note", None)      # a registered factory may return any duck-typed retriever
    if note:
        why = f"{why}; {note}"
    return name, retriever, why


def make_tokenizer(export):
    """(tokenizer, add_special_tokens) set up as the export recorded (truncation, padding)."""
    from tokenizers import Tokenizer

    info = export.manifest.get("tokenizer") or {}
    try:
        tok = Tokenizer.from_file(str(export.file("tokenizer.json")))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for a damaged file
        raise export.damaged("tokenizer.json", exc) from None
    s = info.get("setup") or {}
    tr = s.get("enable_truncation") or {"max_length": int(info.get("max_tokens") or 64)}
    tok.enable_truncation(max_length=int(tr["max_length"]), direction=tr.get("direction", "right"))
    pd = s.get("enable_padding") or {}
    tok.enable_padding(pad_id=int(pd.get("pad_id", 0)), pad_token=pd.get("pad_token", "[PAD]"),
                       direction=pd.get("direction", "right"))
    return tok, bool(info.get("add_special_tokens", True))
