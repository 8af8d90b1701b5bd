#!/usr/bin/env bash
# On a GPU machine (nvcc + CUDA torch): build everything, run the gpu-marked kernel tests,
# benchmark the CUDA kernel (bandwidth vs a measured device copy, time vs the unfused torch reference)
# and run dpr-bench --device cuda (JSON in build/bench-gpu.json).
#   bash bench/gpu_check.sh            (PYTHON=... to choose the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export DPR_KERNEL_CACHE=${DPR_KERNEL_CACHE:-$PWD/build/kernel-cache}
status=0
echo "== build"; $PY -m dpr.kernels.build --quiet || status=1
echo "== gpu tests"; $PY -m pytest tests/test_kernels.py -m gpu -q -p no:cacheprovider -rs || status=1
echo "== CUDA kernel benchmark"
$PY - <<'PYEOF' || status=1
import torch
from dpr.kernels.torch_op import backend_for, fused_moe_gate
from dpr.model.moe import moe_gate_reference
assert torch.cuda.is_available(), "no CUDA device"
print("device:", torch.cuda.get_device_name(), "| backend:", backend_for("cuda"))
def timed(fn, iters=200):
    for _ in range(10): fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters): fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / iters * 1e3  # us
src = torch.empty(256 << 20, dtype=torch.uint8, device="cuda"); dst = torch.empty_like(src)
copy_us = timed(lambda: dst.copy_(src), 50)
copy_bw = 2 * src.numel() / (copy_us * 1e-6) / 1e9
print(f"device copy bandwidth: {copy_bw:.0f} GB/s (read+write)")
d, n, k = 64, 4, 2
for dtype in (torch.float32, torch.float16):
    for B in (1, 64, 512, 4096, 65536):
        g = torch.Generator(device="cuda").manual_seed(0)
        z = torch.randn(B, d, device="cuda", dtype=dtype, generator=g)
        w = torch.randn(d, 2 * n, device="cuda", dtype=dtype, generator=g) / 8
        b = torch.randn(2 * n, device="cuda", dtype=dtype, generator=g)
        y = torch.randn(B, 2 * n, d, device="cuda", dtype=dtype, generator=g)
        p = torch.randint(0, 3, (B,), device="cuda", generator=g)
        r = torch.randn(B, d, device="cuda", dtype=dtype, generator=g)
        out = fused_moe_gate(z, w, b, y, p, r, n, k)
        ref = moe_gate_reference(*(t.double() if t.is_floating_point() else t for t in (z, w, b, y, p, r)), n, k)
        err = ((out.double() - ref).abs().max() / max(1.0, ref.abs().max().item())).item()
        t_f = timed(lambda: fused_moe_gate(z, w, b, y, p, r, n, k))
        t_r = timed(lambda: moe_gate_reference(z, w, b, y, p, r, n, k))
        es = z.element_size(); active = (p != 0).float().mean().item()
        moved = B * d * es * (2 + active * (1 + k)) + B * 8 + w.numel() * es  # res+out, z+k experts when active
        bw = moved / (t_f * 1e-6) / 1e9
        print(f"{str(dtype):14s} B={B:6d}  fused {t_f:8.1f} us  reference {t_r:8.1f} us  x{t_r / t_f:5.1f}  "
              f"{bw:7.1f} GB/s = {bw / copy_bw:5.1%} of copy  rel.err {err:.1e}")
PYEOF
echo "== dpr-bench on the GPU (default UNTRAINED model; a random-weight MiniLM-shaped encoder when the"
echo "   [encoder] extra is absent; backends that cannot run on cuda are listed as skipped)"
$PY -m dpr.bench.cli --device cuda --batch 512 --iters ${BENCH_ITERS:-10} --warmup 2 --no-progress \
    --json build/bench-gpu.json || status=1
echo "== summary: $([ $status -eq 0 ] && echo OK || echo FAILED)"
exit $status
