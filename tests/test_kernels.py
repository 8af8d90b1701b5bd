"""Fused MoE gate: CPU twin (ctypes, torch binding), ORT custom op, ONNX export, nvcc build, GPU, TensorRT.

Everything is checked against ``dpr.model.moe.moe_gate_reference`` computed in float64.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dpr.model.moe import moe_gate_reference

RTOL = {np.float32: 1e-5, np.float16: 1e-2}


# --------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="session")
def built():
    """Build every native artifact once (cached in DPR_KERNEL_CACHE or ~/.cache/dpr/kernels)."""
    from dpr.kernels import build

    res = build.build(verbose=False)
    assert res.ok, "kernel build failed:\n" + "\n".join(res.failed.values())
    assert "cpu_lib" in res.built, res.skipped
    return res


@pytest.fixture(scope="session")
def ort_lib(built):
    if "ort_lib" not in built.built:
        pytest.skip(f"ORT custom-op library not built: {built.skipped.get('ort_lib')}")
    return str(built.built["ort_lib"])


def make_case(B, d, n, seed=0, dtype=np.float32, polarities=(0, 1, 2, 3, -1)):
    rng = np.random.default_rng(seed)
    E = 2 * n
    pol = rng.choice(np.array(polarities, dtype=np.int64), size=B)
    if B >= 3 and {0, 1, 2} <= set(polarities):  # all three polarities mixed in one batch
        pol[:3] = [0, 1, 2]
    return {
        "z": rng.standard_normal((B, d)).astype(dtype),
        "w_router": (rng.standard_normal((d, E)) / np.sqrt(d)).astype(dtype),
        "b_router": rng.standard_normal(E).astype(dtype),
        "expert_out": rng.standard_normal((B, E, d)).astype(dtype),
        "polarity": pol,
        "residual": rng.standard_normal((B, d)).astype(dtype),
    }


def reference64(x, n, k):
    t = [torch.from_numpy(np.asarray(v)) for v in x.values()]
    t = [a if a.dtype == torch.int64 else a.double() for a in t]
    return moe_gate_reference(*t, n, k).numpy()


def check(out, x, n, k, dtype):
    ref = reference64(x, n, k)
    assert out.shape == ref.shape and out.dtype == np.dtype(dtype)
    err = np.abs(out.astype(np.float64) - ref).max() / max(1.0, np.abs(ref).max())
    assert err <= RTOL[dtype], f"relative error {err:.3g} > {RTOL[dtype]}"
    inactive = (x["polarity"] != 1) & (x["polarity"] != 2)
    # rows with polarity not 1 or 2 are the residual, bit for bit
    assert np.array_equal(out[inactive].view(np.uint8), x["residual"][inactive].view(np.uint8))


# (B, d, n, k): odd sizes; top_k 1, 2 and "all" (= n)
CASES = [
    (1, 16, 2, 1), (1, 64, 4, 4), (7, 16, 4, 2), (7, 100, 8, 8), (7, 64, 2, 2),
    (513, 64, 4, 2), (513, 100, 4, 1), (513, 16, 8, 2), (513, 64, 8, 8), (64, 100, 2, 1),
    (5, 48, 3, 2), (33, 32, 16, 3),     # AVX-512 path: d % 32 == 16 (tail vector), n not a power of two
]
DTYPES = [np.float32, np.float16]


def ort_session(lib, dtype, n, k):
    ort = pytest.importorskip("onnxruntime")
    from dpr.bench.gate_timing import fused_model_bytes

    so = ort.SessionOptions()
    so.register_custom_ops_library(lib)
    so.log_severity_level = 4
    return ort.InferenceSession(fused_model_bytes(n, k, "float16" if dtype == np.float16 else "float32"), so,
                                providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- CPU twin through ctypes
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,d,n,k", CASES)
def test_cpu_ctypes_matches_reference(built, B, d, n, k, dtype):
    from dpr.kernels.capi import fused_moe_gate_numpy

    x = make_case(B, d, n, seed=B * 7 + d + n + k, dtype=dtype)
    check(fused_moe_gate_numpy(*x.values(), n, k), x, n, k, dtype)


def test_cpu_ctypes_threads_agree(built):
    from dpr.kernels.capi import fused_moe_gate_numpy

    x = make_case(20000, 64, 4, seed=3)   # above the OpenMP threshold
    one = fused_moe_gate_numpy(*x.values(), 4, 2, num_threads=1)
    two = fused_moe_gate_numpy(*x.values(), 4, 2, num_threads=2)
    assert np.array_equal(one, two)
    check(two, x, 4, 2, np.float32)


def test_generic_build_matches_the_avx512_path(built):
    """The header's loop (forced with DPR_GATE_ISA=generic, in a child process: the ISA is chosen once) and the
    AVX-512 layout give the same outputs up to float rounding of the router sum, on d = 64, 48 and 100."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json, numpy as np\n"
            "from dpr.kernels.capi import fused_moe_gate_numpy\n"
            "from test_kernels import make_case\n"
            "out = {}\n"
            "for B, d, n, k in ((257, 64, 4, 2), (9, 48, 3, 3), (11, 100, 4, 1)):\n"
            "    x = make_case(B, d, n, seed=d, dtype=np.float32)\n"
            "    out[str(d)] = fused_moe_gate_numpy(*x.values(), n, k).tolist()\n"
            "print(json.dumps(out))\n")
    outs = {}
    tests_dir = os.path.dirname(os.path.abspath(__file__))    # tests/ only: never the repository root
    for isa in ("generic", ""):
        env = dict(os.environ, DPR_GATE_ISA=isa, PYTHONPATH=tests_dir + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run([sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True,
                              timeout=120, cwd=tests_dir)
        assert proc.returncode == 0, proc.stderr
        outs[isa] = json.loads(proc.stdout.strip().splitlines()[-1])
    for d in outs[""]:
        np.testing.assert_allclose(outs["generic"][d], outs[""][d], rtol=1e-5, atol=1e-5)


# (B, d, n, k): d a multiple of 16 (AVX-512 layout), of 8 only (AVX2 layout, also on AVX-512 CPUs), of neither
# (the header's loop); d = 8 is a single ymm; B = 12000 at d = 64 is above the OpenMP threshold (threaded split).
GATE_ISA_CASES = ((257, 64, 4, 2), (9, 48, 3, 3), (33, 40, 4, 2), (17, 24, 2, 1), (5, 8, 5, 4), (11, 100, 4, 1),
                  (7, 13, 4, 4), (12000, 64, 4, 2))


def test_avx2_path_matches_the_generic_and_avx512_paths(built, tmp_path):
    """DPR_GATE_ISA=generic, avx2 and unset (AVX-512 here), each in a child process (-P, cwd tests/), give the
    reference's outputs and agree with each other up to the float rounding of the router sum; where two
    settings must take the same code (d not a multiple of 8: the header's loop; d a multiple of 8 but not 16:
    the AVX2 layout on an AVX-512 CPU) the outputs are bit-identical."""
    import subprocess
    import sys

    code = ("import json, sys, numpy as np\n"
            "from dpr.kernels import capi\n"
            "from test_kernels import make_case, GATE_ISA_CASES\n"
            "out = {}\n"
            "for B, d, n, k in GATE_ISA_CASES:\n"
            "    x = make_case(B, d, n, seed=B + d, dtype=np.float32)\n"
            "    out[f'{B}_{d}'] = capi.fused_moe_gate_numpy(*x.values(), n, k, num_threads=2)\n"
            "np.savez(sys.argv[1], **out)\n"
            "print(json.dumps({'isa': capi.isa()}))\n")
    tests_dir = os.path.dirname(os.path.abspath(__file__))    # tests/ only: never the repository root
    outs, isas = {}, {}
    for isa in ("generic", "avx2", ""):
        path = tmp_path / f"gate_{isa or 'default'}.npz"
        env = dict(os.environ, DPR_GATE_ISA=isa, PYTHONPATH=tests_dir + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run([sys.executable, "-P", "-c", code, str(path)], env=env, capture_output=True, text=True,
                              timeout=180, cwd=tests_dir)
        assert proc.returncode == 0, proc.stderr
        isas[isa] = json.loads(proc.stdout.strip().splitlines()[-1])["isa"]
        with np.load(path) as f:
            outs[isa] = {key: f[key] for key in f.files}
    assert isas["generic"] == "generic"
    if isas[""] == "generic":
        pytest.skip("this CPU has neither AVX2+FMA nor AVX-512: only the header's loop runs")
    assert isas["avx2"] == "avx2"
    for B, d, n, k in GATE_ISA_CASES:
        key = f"{B}_{d}"
        x = make_case(B, d, n, seed=B + d, dtype=np.float32)
        for isa in ("generic", "avx2", ""):
            check(outs[isa][key], x, n, k, np.float32)
        np.testing.assert_allclose(outs["avx2"][key], outs["generic"][key], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(outs[""][key], outs["avx2"][key], rtol=1e-5, atol=1e-5)
        if d % 8:
            assert np.array_equal(outs["avx2"][key], outs["generic"][key]), "d % 8 != 0 must take the header's loop"
            assert np.array_equal(outs[""][key], outs["generic"][key])
        elif d % 16 or isas[""] == "avx2":
            assert np.array_equal(outs[""][key], outs["avx2"][key]), "d % 16 != 0 must take the AVX2 layout"


def test_ties_go_to_lower_index(built):
    from dpr.kernels.capi import fused_moe_gate_numpy

    x = make_case(9, 16, 4, seed=1)
    x["polarity"] = np.array([1, 2] * 4 + [1], dtype=np.int64)
    x["w_router"][:] = 0
    x["b_router"][:] = 0.5       # every logit equal: experts 0,1 (positive) or 4,5 (negative), gates 1/2
    out = fused_moe_gate_numpy(*x.values(), 4, 2)
    y, r, p = x["expert_out"], x["residual"], x["polarity"]
    first = np.where(p == 1, 0, 4)
    expect = r + 0.5 * y[np.arange(9), first] + 0.5 * y[np.arange(9), first + 1]
    np.testing.assert_allclose(out, expect, rtol=1e-6, atol=1e-6)
    check(out, x, 4, 2, np.float32)


def test_fp16_conversion_round_trip(built):
    """Active rows convert fp16 -> fp32 -> fp16 like numpy (round to nearest even), on all finite halves."""
    from dpr.kernels.capi import fused_moe_gate_numpy

    bits = np.arange(0, 1 << 16, dtype=np.uint16)
    halves = bits.view(np.float16)
    finite = halves[np.isfinite(halves)]
    B = finite.size // 8
    res = finite[: B * 8].reshape(B, 8).copy()
    x = {"z": np.zeros((B, 8), np.float16), "w_router": np.zeros((8, 2), np.float16),
         "b_router": np.zeros(2, np.float16), "expert_out": np.zeros((B, 2, 8), np.float16),
         "polarity": np.ones(B, np.int64), "residual": res}
    x["expert_out"][:, 0] = np.float16(0.5)
    out = fused_moe_gate_numpy(*x.values(), 1, 1)       # residual + 1.0 * 0.5, added in fp32
    expect = (res.astype(np.float32) + np.float32(0.5)).astype(np.float16)
    assert np.array_equal(out.view(np.uint16), expect.view(np.uint16))
    x["polarity"][:] = 0                                # inactive rows: the residual's bits
    out = fused_moe_gate_numpy(*x.values(), 1, 1)
    assert np.array_equal(out.view(np.uint16), res.view(np.uint16))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_cpu_nan_inf_propagate(built, dtype):
    from dpr.kernels.capi import fused_moe_gate_numpy

    x = make_case(6, 16, 4, seed=5, dtype=dtype, polarities=(1, 2))
    x["z"][0, 3] = np.nan                       # NaN logits
    x["z"][1, 0] = np.inf                       # +-inf / NaN logits
    x["expert_out"][2] = np.inf                 # inf expert outputs
    x["residual"][3, 5] = np.nan                # NaN residual
    out = fused_moe_gate_numpy(*x.values(), 4, 2)
    assert not np.isfinite(out[:4]).all(axis=1).any(), out[:4]
    assert np.isfinite(out[4:]).all()
    ref = reference64(x, 4, 2)
    np.testing.assert_allclose(out[4:].astype(np.float64), ref[4:], rtol=RTOL[dtype] * 10, atol=RTOL[dtype] * 10)


def test_cpu_ctypes_bad_args_raise(built):
    from dpr.kernels.capi import KernelError, fused_moe_gate_numpy

    x = make_case(4, 16, 4)
    with pytest.raises(KernelError, match="top_k"):
        fused_moe_gate_numpy(*x.values(), 4, 5)
    with pytest.raises(KernelError, match="2 \\* experts_per_polarity"):
        fused_moe_gate_numpy(*x.values(), 3, 2)
    with pytest.raises(ValueError, match="shapes"):
        fused_moe_gate_numpy(*list(x.values())[:5], x["residual"][:, :3], 4, 2)


# --------------------------------------------------------------------------- torch binding
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,d,n,k", [CASES[0], CASES[3], CASES[5], CASES[8]])
def test_torch_binding_matches_reference(built, B, d, n, k, dtype):
    from dpr.kernels.torch_op import backend_for, fused_moe_gate

    assert backend_for("cpu") == "cpu_kernel"
    x = make_case(B, d, n, seed=11, dtype=dtype)
    out = fused_moe_gate(*[torch.from_numpy(v) for v in x.values()], n, k)
    check(out.numpy(), x, n, k, dtype)
    out2 = torch.ops.dpr.fused_moe_gate(*[torch.from_numpy(v) for v in x.values()], n, k)
    assert torch.equal(out, out2)


def test_torch_binding_nan_propagates(built):
    from dpr.kernels.torch_op import fused_moe_gate

    x = make_case(4, 16, 4, seed=2, polarities=(1,))
    x["z"][1, 0] = np.nan
    out = fused_moe_gate(*[torch.from_numpy(v) for v in x.values()], 4, 2)
    assert not torch.isfinite(out[1]).all() and torch.isfinite(out[[0, 2, 3]]).all()


def test_torch_binding_errors_name_the_problem(built):
    from dpr.errors import InputError
    from dpr.kernels.torch_op import fused_moe_gate

    x = {k: torch.from_numpy(v) for k, v in make_case(5, 16, 4).items()}
    args = list(x.values())
    bad = [
        ({"residual": x["residual"][:, :4]}, "residual must be"),
        ({"w_router": x["w_router"][:, :6]}, "w_router must be"),
        ({"b_router": x["b_router"].double()}, "b_router has dtype"),
        ({"polarity": x["polarity"].int()}, "polarity must be int64"),
        ({"z": x["z"].double(), }, "z must be float32 or float16"),
        ({"expert_out": x["expert_out"][:, :6]}, "2 \\* experts_per_polarity|w_router must be"),
    ]
    names = list(x)
    for repl, msg in bad:
        a = [repl.get(nm, t) for nm, t in zip(names, args)]
        with pytest.raises(InputError, match=msg):
            fused_moe_gate(*a, 4, 2)
    with pytest.raises(InputError, match="top_k must be in 1..4"):
        fused_moe_gate(*args, 4, 0)
    with pytest.raises(ValueError, match="experts_per_polarity"):
        fused_moe_gate(*args, 3, 1)


def test_torch_binding_falls_back_to_reference(built, monkeypatch):
    from dpr.kernels import capi, torch_op

    monkeypatch.setattr(capi, "load", lambda name: None)
    assert torch_op.backend_for("cpu") == "reference"
    x = make_case(7, 16, 4, seed=4)
    out = torch_op.fused_moe_gate(*[torch.from_numpy(v) for v in x.values()], 4, 2)
    check(out.numpy(), x, 4, 2, np.float32)


def test_torch_binding_as_moe_gate(built):
    from dataclasses import replace

    from dpr.config import ModelConfig
    from dpr.kernels.torch_op import fused_moe_gate
    from dpr.model.moe import MoE

    cfg = ModelConfig()
    moe = MoE(cfg).eval()
    B = 9
    z, h = torch.randn(B, cfg.d), torch.randn(B, cfg.d)
    pol = torch.tensor([0, 1, 2] * 3)
    with torch.no_grad():
        ref = moe(z, pol, h)
        moe.gate = fused_moe_gate
        out = moe(z, pol, h)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert replace  # keep import used


def test_fake_kernel_traces(built):
    from dpr.kernels import torch_op  # noqa: F401

    class M(torch.nn.Module):
        def forward(self, z, w, b, y, p, r):
            return torch.ops.dpr.fused_moe_gate(z, w, b, y, p, r, 4, 2)

    x = [torch.from_numpy(v) for v in make_case(5, 16, 4).values()]
    ep = torch.export.export(M(), tuple(x))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.dpr.fused_moe_gate.default in targets
    torch.library.opcheck(torch.ops.dpr.fused_moe_gate.default, (*x, 4, 2),
                          test_utils=("test_schema", "test_faketensor"))


# --------------------------------------------------------------------------- ORT custom op
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,d,n,k", [CASES[0], CASES[2], CASES[3], CASES[5], CASES[8]])
def test_ort_op_matches_reference(ort_lib, B, d, n, k, dtype):
    sess = ort_session(ort_lib, dtype, n, k)
    x = make_case(B, d, n, seed=21 + B, dtype=dtype)
    check(sess.run(None, x)[0], x, n, k, dtype)


def test_ort_op_nan_propagates(ort_lib):
    sess = ort_session(ort_lib, np.float32, 4, 2)
    x = make_case(5, 16, 4, seed=8, polarities=(2,))
    x["w_router"][2, 5] = np.inf
    x["z"][:, 2] = 1.0
    x["z"][0, 2] = -1.0
    out = sess.run(None, x)[0]
    ref = reference64(x, 4, 2)
    # rows 1..4: a +inf logit -> NaN gates -> non-finite row; row 0: a -inf logit is just not selected
    assert not np.isfinite(out[1:]).all(axis=1).any() and np.isfinite(out[0]).all()
    assert np.array_equal(np.isfinite(out), np.isfinite(ref))


def test_ort_op_errors_name_the_problem(ort_lib):
    ort = pytest.importorskip("onnxruntime")
    sess = ort_session(ort_lib, np.float32, 4, 2)
    x = make_case(5, 16, 4)
    with pytest.raises(Exception, match="residual must be \\(B, d\\)"):
        sess.run(None, {**x, "residual": x["residual"][:, :7].copy()})
    with pytest.raises(Exception, match="expert_out has 6 experts"):
        bad = make_case(5, 16, 3)
        sess.run(None, bad)
    with pytest.raises(Exception, match="w_router must be"):
        sess.run(None, {**x, "w_router": x["w_router"][:8].copy()})
    # wrong dtype: ORT itself rejects the feed (type constraints of the registered kernels)
    with pytest.raises(Exception, match="(?i)type|INVALID_ARGUMENT"):
        sess.run(None, {**x, "polarity": x["polarity"].astype(np.int32)})
    sess_k = ort_session(ort_lib, np.float32, 4, 5)
    with pytest.raises(Exception, match="top_k must be in 1..4"):
        sess_k.run(None, x)
    assert isinstance(ort, object)


def test_ort_library_path(ort_lib):
    from dpr.kernels.build import ort_library_path

    assert ort_library_path(cuda=False) == ort_lib
    assert ort_library_path() is not None and Path(ort_library_path()).is_file()


def test_onnx_export_one_node_runs_in_ort(ort_lib):
    import onnxruntime as ort

    from dpr.kernels.onnx_translation import custom_translation_table
    from dpr.kernels.op_spec import ATTRS, OP_DOMAIN, OP_NAME, TRT_NODE_ATTRS

    n, k, d = 4, 2, 16

    class Gate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(d, 2 * n) / 4)
            self.b = torch.nn.Parameter(torch.randn(2 * n))

        def forward(self, z, y, p, r):
            return torch.ops.dpr.fused_moe_gate(z, self.w, self.b, y, p, r, n, k)

    m = Gate().eval()
    x = make_case(7, d, n, seed=9)
    args = tuple(torch.from_numpy(x[nm]) for nm in ("z", "expert_out", "polarity", "residual"))
    prog = torch.onnx.export(m, args, dynamo=True, opset_version=20, external_data=False, verbose=False,
                             custom_translation_table=custom_translation_table())
    mp = prog.model_proto
    gate_nodes = [nd for nd in mp.graph.node if nd.domain == OP_DOMAIN and nd.op_type == OP_NAME]
    assert len(gate_nodes) == 1, [(nd.domain, nd.op_type) for nd in mp.graph.node]
    # the gate's attributes and the ones TensorRT's parser reads to find the plugin (plugin_namespace, ...)
    assert sorted(a.name for a in gate_nodes[0].attribute) == sorted(ATTRS + tuple(TRT_NODE_ATTRS))
    assert {o.domain: o.version for o in mp.opset_import}[OP_DOMAIN] == 1
    so = ort.SessionOptions()
    so.register_custom_ops_library(ort_lib)
    sess = ort.InferenceSession(mp.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})[0]
    xx = dict(x, w_router=m.w.detach().numpy(), b_router=m.b.detach().numpy())
    check(out, xx, n, k, np.float32)


# --------------------------------------------------------------------------- build / nvcc
def test_build_is_cached(built):
    from dpr.kernels import build

    again = build.build(verbose=False)
    assert set(again.cached) == set(again.built) and again.built == built.built
    assert "cpu_lib" in build.BuildResult(cache_dir=Path(".")).summary() or True
    assert "cpu_lib" in built.summary()


def test_spill_check_rejects_spills():
    from dpr.kernels.build import KernelBuildError, _check_spills

    ok = "ptxas info    : Used 40 registers\n    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
    assert "0 spills" in _check_spills("x", ok)
    with pytest.raises(KernelBuildError, match="spill"):
        _check_spills("x", ok + "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n")


def test_nvcc_compiles_sm80_sm90_ptx_without_spills(built):
    from dpr.kernels.build import find_nvcc

    if find_nvcc() is None:
        pytest.skip("nvcc not found: CUDA compilation not tested")
    for name in ("cuda_lib", "ptx_sm80", "ptx_sm90"):
        assert name in built.built, built.failed.get(name) or built.skipped.get(name)
    assert "0 spills" in built.ptxas.get("cuda_lib", "0 spills")   # fresh builds record ptxas output
    log = (built.built["cuda_lib"].parent / "build.log").read_text()
    assert "sm_80" in log and "sm_90" in log and "spill" in log
    assert "bytes spill stores" in log and all(
        line.strip().startswith("0 bytes") or "0 bytes spill stores, 0 bytes spill loads" in line
        for line in log.splitlines() if "spill stores" in line)
    ptx = built.built["ptx_sm80"].read_text()
    assert ".entry dpr_fused_moe_gate_f32" in ptx and ".entry dpr_fused_moe_gate_f16" in ptx
    assert ".target sm_90" in built.built["ptx_sm90"].read_text()
    # every C symbol the ctypes binding (dpr.kernels.capi) looks up must be exported: a GPU box is the
    # first place the CUDA library is loaded, so check it here where it is only compiled
    if shutil.which("nm"):
        import subprocess

        syms = subprocess.run(["nm", "-D", "--defined-only", str(built.built["cuda_lib"])], capture_output=True,
                              text=True, check=True).stdout
        for name in ("dpr_fused_moe_gate_cuda_f32", "dpr_fused_moe_gate_cuda_f16", "dpr_cuda_last_error",
                     "dpr_status_string"):
            assert f" {name}\n" in syms, f"libdpr_kernels_cuda.so does not export {name}"


# --------------------------------------------------------------------------- GPU
def _cuda_ready():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,d,n,k", CASES)
def test_cuda_kernel_matches_reference(built, B, d, n, k, dtype):
    _cuda_ready()
    from dpr.kernels.torch_op import backend_for, fused_moe_gate

    assert backend_for("cuda") == "cuda_kernel", built.skipped.get("cuda_lib") or built.failed.get("cuda_lib")
    npdt = np.float16 if dtype == torch.float16 else np.float32
    x = make_case(B, d, n, seed=31 + B, dtype=npdt)
    out = fused_moe_gate(*[torch.from_numpy(v).cuda() for v in x.values()], n, k)
    torch.cuda.synchronize()
    check(out.cpu().numpy(), x, n, k, npdt)


@pytest.mark.gpu
def test_cuda_kernel_nan_and_unaligned(built):
    _cuda_ready()
    from dpr.kernels.torch_op import fused_moe_gate

    x = make_case(33, 100, 4, seed=3, polarities=(1, 2))
    x["z"][0, 0] = np.nan
    t = [torch.from_numpy(v).cuda() for v in x.values()]
    out = fused_moe_gate(*t, 4, 2).cpu().numpy()
    assert not np.isfinite(out[0]).all() and np.isfinite(out[1:]).all()
    # unaligned views (offset by one element) take the scalar path
    big = torch.from_numpy(np.concatenate([[0.0], x["residual"].ravel()]).astype(np.float32)).cuda()
    t[5] = big[1:].view(33, 100)
    out2 = fused_moe_gate(*t, 4, 2).cpu().numpy()
    np.testing.assert_array_equal(np.isfinite(out2), np.isfinite(out))
    # the values too (not only which are finite): rows 1.. of both paths match the reference (the scalar
    # path may sum in another order than the vector one, so within tolerance, not bit for bit)
    clean = {key: (v if key in ("w_router", "b_router") else v[1:]) for key, v in x.items()}
    check(out[1:], clean, 4, 2, np.float32)
    check(out2[1:], clean, 4, 2, np.float32)


# --------------------------------------------------------------------------- TensorRT
@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_tensorrt_plugin_matches_reference(built, tmp_path, dtype):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    _cuda_ready()
    from dpr.kernels import trt_plugin

    trt_plugin.register()
    n, k, d, B = 4, 2, 64, 37
    path = trt_plugin.make_trt_onnx(tmp_path / "gate.onnx", dtype, n, k, d, batch=B)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(path.read_bytes()), [parser.get_error(i) for i in range(parser.num_errors)]
    # the node (exporter's attributes + a model-local function of the same name) must become the plugin,
    # not the function's portable body: otherwise the answers below would be right without the kernel
    kinds = {getattr(trt.LayerType, t) for t in ("PLUGIN", "PLUGIN_V2", "PLUGIN_V3") if hasattr(trt.LayerType, t)}
    layers = [network.get_layer(i).type for i in range(network.num_layers)]
    assert sum(t in kinds for t in layers) == 1, layers
    config = builder.create_builder_config()
    if dtype == "float16":
        config.set_flag(trt.BuilderFlag.FP16)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None, "TensorRT engine build failed"
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    ctx = engine.create_execution_context()
    npdt = np.float16 if dtype == "float16" else np.float32
    x = make_case(B, d, n, seed=5, dtype=npdt)
    dev = {nm: torch.from_numpy(v).cuda() for nm, v in x.items()}
    out = torch.empty((B, d), dtype=torch.float16 if dtype == "float16" else torch.float32, device="cuda")
    for nm, t in dev.items():
        ctx.set_tensor_address(nm, t.data_ptr())
    ctx.set_tensor_address("out", out.data_ptr())
    stream = torch.cuda.current_stream()
    assert ctx.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    check(out.cpu().numpy(), x, n, k, npdt)


def test_trt_plugin_module_imports_without_tensorrt():
    from dpr.kernels import trt_plugin
    from dpr.kernels.op_spec import TRT_PLUGIN_ID

    assert TRT_PLUGIN_ID == "dpr::FusedMoEGate"
    assert trt_plugin.KERNEL_NAMES["float32"] == "dpr_fused_moe_gate_f32"
    if os.environ.get("DPR_HAVE_TRT") is None:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            from dpr.errors import MissingDependency

            with pytest.raises(MissingDependency):
                trt_plugin.register()
