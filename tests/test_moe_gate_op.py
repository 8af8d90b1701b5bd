"""``torch.ops.dpr.moe_gate`` (issue 16): the fused gate as a torch.library operator. The CPU implementation
(the C++ twin, compiled against torch's headers, no ctypes) agrees with the float64 reference on random
inputs of odd sizes; the operator is registered with a fake implementation (FakeTensorMode, opcheck,
torch.compile fullgraph); a missing library falls back to the reference and says why; the torch backend
serves its gate with it. CUDA: the kernel and CUDA-graph replay against eager (marked gpu)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dpr.model.moe import moe_gate_reference


@pytest.fixture(scope="module")
def op():
    from dpr.kernels import build, moe_gate_op

    if build.find_cxx() is None:
        pytest.skip("no C++ compiler: the operator library cannot be built")
    st = moe_gate_op.load(build=True)
    assert st["cpu"] == "cpp", st                       # built and loaded here (the fallback has its own test)
    return torch.ops.dpr.moe_gate


def _case(B, d, n, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    E = 2 * n
    x = {"z": torch.randn(B, d, generator=g), "w_router": torch.randn(d, E, generator=g) / d ** 0.5,
         "b_router": torch.randn(E, generator=g), "expert_out": torch.randn(B, E, d, generator=g),
         "polarity": torch.randint(0, 4, (B,), generator=g), "residual": torch.randn(B, d, generator=g)}
    return {k: (v.to(dtype) if v.is_floating_point() else v).to(device) for k, v in x.items()}


def _reference64(x, n, k):
    return moe_gate_reference(*[v.double() if v.is_floating_point() else v for v in x.values()], n, k)


CASES = [(1, 1, 1, 1), (7, 3, 3, 2), (5, 16, 4, 2), (513, 67, 4, 2), (64, 64, 4, 4), (33, 24, 7, 3), (9, 130, 2, 1)]


@pytest.mark.parametrize("B,d,n,k", CASES)
def test_cpu_op_agrees_with_the_float64_reference(op, B, d, n, k):
    x = _case(B, d, n, seed=B + d)
    out = op(*x.values(), n, k)
    ref = _reference64(x, n, k)
    assert out.shape == (B, d) and out.dtype == torch.float32
    err = (out.double() - ref).abs()
    rel = (err / ref.abs().clamp_min(1e-3)).max().item()
    assert err.max().item() <= 1e-4 and rel <= 1e-3, (err.max().item(), rel)
    inactive = (x["polarity"] != 1) & (x["polarity"] != 2)
    assert torch.equal(out[inactive], x["residual"][inactive])     # rows without a prompt: bit for bit


@pytest.mark.parametrize("B,d,n,k", [CASES[1], CASES[3], CASES[5]])
def test_cpu_op_float16(op, B, d, n, k):
    x = _case(B, d, n, seed=3, dtype=torch.float16)
    out = op(*x.values(), n, k)
    ref = moe_gate_reference(*[v.float() if v.is_floating_point() else v for v in x.values()], n, k)
    assert out.dtype == torch.float16
    assert (out.float() - ref).abs().max().item() <= 2e-2


def test_op_errors_name_the_argument(op):
    from dpr.errors import InputError
    from dpr.kernels.moe_gate_op import moe_gate

    x = _case(5, 16, 4)
    bad = dict(x, polarity=x["polarity"].int())
    with pytest.raises(RuntimeError, match="polarity must be int64"):
        op(*bad.values(), 4, 2)
    with pytest.raises(RuntimeError, match="top_k must be in 1..4"):
        op(*x.values(), 4, 5)
    with pytest.raises(RuntimeError, match="residual must be"):
        op(*dict(x, residual=x["residual"][:, :3]).values(), 4, 2)
    with pytest.raises(InputError, match="polarity must be int64"):          # the checked Python entry
        moe_gate(*bad.values(), 4, 2)
    assert torch.equal(moe_gate(*x.values(), 4, 2), op(*x.values(), 4, 2))


def test_op_is_registered_with_its_fake_implementation(op):
    """Tracing never runs the kernel: FakeTensorMode gives the output's shape and dtype from the fake
    implementation; opcheck's schema / fake / dispatch tests pass; torch.compile(fullgraph=True) traces
    through it."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    x = _case(6, 8, 2)
    with FakeTensorMode():
        fx = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in x.items()}
        out = op(*fx.values(), 2, 1)
        assert isinstance(out, FakeTensor) and out.shape == (6, 8) and out.dtype == torch.float32
    torch.library.opcheck(op.default, (*x.values(), 2, 1))

    def f(z, w, b, y, p, r):
        return op(z * 1.0, w, b, y, p, r, 2, 1) + 1.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(*x.values()), f(*x.values()))


def test_missing_library_falls_back_to_the_reference(tmp_path):
    """A process where the library cannot be built or found: the operator is the reference, status says why,
    the results equal the reference."""
    code = (
        "import json, torch\n"
        "from dpr.kernels import build, moe_gate_op\n"
        "build.artifact_path = lambda name: None\n"
        "st = moe_gate_op.load(build=False)\n"
        "from dpr.model.moe import moe_gate_reference\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = [torch.randn(5, 8, generator=g), torch.randn(8, 4, generator=g), torch.randn(4, generator=g),\n"
        "     torch.randn(5, 4, 8, generator=g), torch.tensor([0, 1, 2, 1, 2]), torch.randn(5, 8, generator=g)]\n"
        "same = torch.equal(torch.ops.dpr.moe_gate(*x, 2, 1), moe_gate_reference(*x, 2, 1))\n"
        "print(json.dumps({'status': st, 'same': same, 'impl': moe_gate_op.implementation('cpu')}))\n")
    env = dict(os.environ, PYTHONSAFEPATH="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["impl"] == "reference" and out["same"] is True
    assert "not built" in out["status"]["why"]["cpu"]


def test_torch_backend_serves_its_gate_with_the_op(op, export_dir):
    from dpr.engine import Engine
    from dpr.engine.errors import BackendError

    fused = Engine.load(export_dir, backend="torch", retriever="torch")
    plain = Engine.load(export_dir, backend="torch", retriever="torch", backend_options={"fused_gate": False})
    assert fused.describe()["backend"]["gate"] == "dpr::moe_gate (C++ CPU twin)"
    assert plain.describe()["backend"]["gate"].startswith("reference")
    ids = fused.item_ids
    h = [ids[:5], ids[10:13], ids[20:21]]
    p, n = ["more comedy", None, "something light and funny"], [None, "no horror please", "no horror please"]
    a, b = fused.recommend(h, p, n, k=5), plain.recommend(h, p, n, k=5)
    assert a.item_ids == b.item_ids
    torch.testing.assert_close(torch.tensor(a.scores), torch.tensor(b.scores), rtol=1e-5, atol=1e-5)
    with pytest.raises(BackendError, match="fused_gate must be"):
        Engine.load(export_dir, backend="torch", backend_options={"fused_gate": "yes"})


# ---- CUDA (needs a GPU and a CUDA build of torch: skipped with a reason elsewhere) ------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("B,d,n,k", [CASES[1], CASES[3], CASES[4]])
def test_cuda_op_agrees_with_the_float64_reference(op, B, d, n, k):
    from dpr.kernels import moe_gate_op

    assert moe_gate_op.implementation("cuda") == "cpp", moe_gate_op.status()
    x = _case(B, d, n, seed=5, device="cuda")
    out = op(*x.values(), n, k)
    ref = _reference64({kk: v.cpu() for kk, v in x.items()}, n, k)
    assert (out.double().cpu() - ref).abs().max().item() <= 1e-4


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager(op):
    """The op launches on torch's current stream with no host sync, so a CUDA graph captures it; replays on
    new inputs copied into the static buffers equal eager calls."""
    x = _case(512, 64, 4, seed=6, device="cuda")
    static = {k: v.clone() for k, v in x.items()}
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            op(*static.values(), 4, 2)                    # warm-up on a side stream, as the docs prescribe
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(*static.values(), 4, 2)
    for seed in (7, 8):
        y = _case(512, 64, 4, seed=seed, device="cuda")
        for k, v in y.items():
            static[k].copy_(v)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, op(*y.values(), 4, 2))
