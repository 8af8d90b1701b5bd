"""The oldest TensorRT the ``dpr::FusedMoEGate`` plugin works with, and the check against it.

``tensorrt.plugin``'s ahead-of-time implementation (``@trtp.aot_impl``) first shipped in TensorRT 10.9;
an older TensorRT is refused with a message naming the version it needs (pyproject's ``gpu`` extra says
the same). Kept apart from ``trt_plugin`` so the engine can check without importing the plugin.
"""

from __future__ import annotations

from dpr.kernels.op_spec import MIN_TENSORRT

MIN_TENSORRT_STR = ".".join(map(str, MIN_TENSORRT))


def parse_version(version: str) -> tuple[int, ...]:
    """``"10.9.0.34"`` -> ``(10, 9, 0, 34)``; stops at the first part that does not start with a digit."""
    parts = []
    for p in str(version).split("."):
        digits = ""
        for ch in p:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def tensorrt_too_old(version: str) -> str | None:
    """Why ``version`` cannot run the plugin (a message naming the minimum), or None when it can."""
    got = parse_version(version)
    if got and got[:len(MIN_TENSORRT)] >= MIN_TENSORRT:
        return None
    return (f"TensorRT {version} is too old: dpr needs TensorRT >= {MIN_TENSORRT_STR} (its dpr::FusedMoEGate "
            f"plugin uses tensorrt.plugin.aot_impl, new in {MIN_TENSORRT_STR}); "
            f"pip install 'tensorrt>={MIN_TENSORRT_STR}'")
