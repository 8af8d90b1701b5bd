#!/usr/bin/env bash
# On a GPU machine (nvcc + CUDA torch): build everything, run the gpu-marked kernel tests,
# benchmark the CUDA kernel (bandwidth vs a measured device copy, time vs the unfused torch reference)
# and run dpr-bench --device cuda (JSON in build/bench-gpu.json).
#   bash bench/gpu_check.sh            (PYTHON=... to choose the interpreter)
set -uo pipefail
export PYTHONSAFEPATH=1   # never the repository root on sys.path: its kernels/ would hide the installed package
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export DPR_KERNEL_CACHE=${DPR_KERNEL_CACHE:-$PWD/build/kernel-cache}
status=0
echo "== build"; $PY -m dpr.kernels.build --quiet || status=1
echo "== gpu tests (kernels, the torch operator, the device path: CUDA-graph replay vs eager, fp16 prompts)"
$PY -m pytest tests/test_kernels.py tests/test_moe_gate_op.py tests/test_device_path.py -m gpu -q -p no:cacheprovider -rs || status=1
echo "== dpr::moe_gate (torch operator, no ctypes): eager vs inside a CUDA graph, batch 512"
$PY - <<'PYEOF' || status=1
import torch
from dpr.kernels import moe_gate_op
print(moe_gate_op.load())
assert moe_gate_op.implementation("cuda") == "cpp", "the CUDA operator library is not loaded"
B, d, n, k = 512, 64, 4, 2
g = torch.Generator(device="cuda").manual_seed(0)
x = [torch.randn(B, d, device="cuda", generator=g), torch.randn(d, 2 * n, device="cuda", generator=g) / 8,
     torch.randn(2 * n, device="cuda", generator=g), torch.randn(B, 2 * n, d, device="cuda", generator=g),
     torch.randint(0, 3, (B,), device="cuda", generator=g), torch.randn(B, d, device="cuda", generator=g)]
op = torch.ops.dpr.moe_gate
calls = 100
s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    for _ in range(3): op(*x, n, k)
torch.cuda.current_stream().wait_stream(s)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    for _ in range(calls): op(*x, n, k)
def timed(fn, iters):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters): fn()
    b.record(); torch.cuda.synchronize()
    return a.elapsed_time(b) / iters * 1e3
eager = timed(lambda: op(*x, n, k), 500)
in_graph = timed(graph.replay, 20) / calls
print(f"dpr::moe_gate B={B}: eager {eager:.1f} us per call, inside a CUDA graph {in_graph:.2f} us per call (target <= 10)")
PYEOF
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
[ -f build/bench-gpu.json ] && $PY -m dpr.bench.targets build/bench-gpu.json
echo "== summary: $([ $status -eq 0 ] && echo OK || echo FAILED)"
exit $status
