"""The Numba kernels compile for a real GPU, checked without one: sm_90 PTX from NVVM and
machine code from ptxas, with the argument types every op launches them with.

Numba's CUDA simulator (tests/test_numba_ops.py) runs the kernels as Python, so it never
types them: a kernel that uses something Numba cannot compile for CUDA, or whose types do
not unify, passes there and fails at its first launch on a GPU. Here a subprocess with the
simulator OFF imports the numba backend on host arrays and runs every op (both dtypes, every
option) and training steps of both seed models (every loss, every optimizer, clipping), with
the kernel launch replaced by a record of the kernel and the Numba types of its arguments.
Each recorded kernel is then compiled by ``numba.cuda.compile_ptx`` for compute capability
9.0 (H100, H200) and assembled by ptxas. Checked:

* it compiles, and every kernel of the backend was compiled for float32 and float64;
* a float32 kernel does no float64 arithmetic (in Numba a Python float constant or
  argument promotes silently; the backend passes ``scalar(x)`` for that reason);
* ptxas reports no register spills and no stack frame.

Needs NVVM (a CUDA toolkit's libnvvm, or the nvidia-cuda-nvcc wheel's) and nvcc for the last
check; skipped where they are missing. No driver is needed: the numba device query the
compiler makes is answered with compute capability 9.0.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (pip install numba-cuda)")

REPO = Path(__file__).resolve().parents[1]
NUMBA_OPS = REPO / "rawgan" / "backends" / "numba_ops.py"
CC = (9, 0)


NVCC = shutil.which("nvcc")  # assembles PTX too (runs ptxas): nvcc -cubin k.ptx


# The subprocess: compile every kernel launch of the ops and print one JSON line per kernel.
DRIVER = textwrap.dedent(r"""
    import json, os, re, sys, types
    os.environ["NUMBA_ENABLE_CUDASIM"] = "0"
    import numpy as np
    import numba
    from numba import cuda
    import numba.cuda.dispatcher as dispatcher

    CC = tuple(json.loads(sys.argv[1]))
    # no GPU, no driver: the compiler asks the current device for its compute capability
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=CC)

    from rawgan import gan, losses, models, optim
    from rawgan.backends import numba_ops as nb
    assert not nb.SIMULATOR
    nb.xp = np                         # host arrays stand in for device arrays: no launch,
    nb._empty = lambda shape, dtype: np.zeros(shape, dtype)  # so outputs stay finite zeros
    nb._target_blocks = lambda: 2 * 132                       # an H100's split-K target

    launches = {}

    def record(self, args, launch_config):  # CUDADispatcher.call: what a launch compiles
        key = (self.py_func, tuple(numba.typeof(a) for a in args))
        launches.setdefault(key, self)

    dispatcher.CUDADispatcher.call = record

    def every_op(dtype):
        rng = np.random.default_rng(0)
        f = lambda *s: nb.asarray(rng.standard_normal(s).astype(dtype))
        x, w, b = f(4, 6), f(6, 5), f(5)
        for bias in (b, None):
            for alpha in (None, 0.2):
                nb.dense_forward(x, w, bias, leaky_alpha=alpha)
        nb.dense_backward(f(4, 5), x, w)
        nb.dense_backward(f(4, 5), x, w, need_dx=False, need_db=False)
        x4 = f(2, 7, 7, 3)
        for stride, pad in ((1, "same"), (2, "same"), (1, "valid"), (2, "valid"),
                            ((1, 2), 1)):
            k = f(5, 5, 3, 4)
            for bias, alpha in ((f(4), None), (None, 0.3)):
                y = nb.conv2d_forward(x4, k, bias, stride, pad, leaky_alpha=alpha)
            nb.conv2d_backward(y, x4, k, stride, pad)
            nb.conv2d_backward(y, x4, k, stride, pad, need_dx=False, need_db=False)
            kt = f(5, 5, 4, 3)
            for bias, alpha in ((f(4), None), (None, 0.3)):
                yt = nb.conv2d_transpose_forward(x4, kt, bias, stride, pad, leaky_alpha=alpha)
            nb.conv2d_transpose_backward(yt, x4, kt, stride, pad)
            nb.conv2d_transpose_backward(yt, x4, kt, stride, pad, need_dw=False)
        nb.conv2d_transpose_forward(x4, f(5, 5, 4, 3), f(4), 2, "same", output_padding=1)
        nb.bias_add_forward(x4, f(3))
        nb.bias_add_backward(x4)
        nb.leaky_relu_backward(x4, nb.leaky_relu_forward(x4, 0.2), 0.2)
        nb.relu_backward(x4, nb.relu_forward(x4))
        nb.tanh_backward(x4, nb.tanh_forward(x4))
        nb.sigmoid_backward(x4, nb.sigmoid_forward(x4))
        for gen in (rng, np.random.Generator(np.random.SFC64(1))):  # PCG64 kernel, upload
            y, mask = nb.dropout_forward(x4, 0.3, gen, training=True)
            nb.dropout_backward(y, mask)
        c = lambda v: nb.asarray(np.full(3, v, dtype))
        for training in (True, False):
            for alpha in (None, 0.2):
                y, mean, inv_std = nb.batchnorm_forward(x4, c(1), c(0), c(0), c(1),
                                                        training=training, leaky_alpha=alpha)
                nb.batchnorm_backward(y, x4, c(1), mean, inv_std, training=training,
                                      leaky_alpha=alpha, beta=None if alpha is None else c(0))
        p, g, s1, s2 = [f(7)], [f(7)], [f(7)], [f(7)]
        for clip in (None, 0.01):
            nb.adam_update(p, g, s1, s2, 1e-3, 0.9, 0.999, 1e-7, clip)
            nb.rmsprop_update(p, g, s1, 1e-3, 0.9, 1e-7, clip)
            for momentum, nesterov in ((0.0, False), (0.9, False), (0.9, True)):
                nb.sgd_update(p, g, s1 if momentum else [None], 1e-2, momentum, nesterov, clip)
        nb.accumulate(p[0], g[0])
        nb.zero_grads(g)

    def training_steps(dtype):
        rng = np.random.default_rng(1)
        for name in ("dcgan", "mlp"):
            G, D = models.build(name, seed=0, backend=nb, dtype=dtype)
            for kind in losses.KINDS:
                for opt in (optim.Adam, optim.SGD, optim.RMSprop):
                    real = nb.asarray(rng.uniform(-1, 1, (4, 28, 28, 1)).astype(dtype))
                    gan.train_step(G, D, opt(G, lr=1e-4), opt(D, lr=1e-4, clip_value=0.01),
                                   kind, [real], gan.gaussian_noise(rng, 100, nb, dtype))
            G(nb.asarray(rng.standard_normal((4, 100)).astype(dtype)))

    for dtype in (np.float32, np.float64):
        every_op(dtype)
        training_steps(dtype)

    F64 = re.compile(r"^\s*(?:add|sub|mul|fma|div|sqrt|rcp|ex2|lg2|max|min|neg|abs|cvt|setp)"
                     r"\.[\w.]*f64", re.MULTILINE)
    for (py_func, sig), disp in launches.items():
        row = {"kernel": py_func.__name__, "sig": [str(t) for t in sig]}
        row["float32"] = any(getattr(t, "dtype", None) == numba.float32 for t in sig)
        try:
            opts = {k: disp.targetoptions[k] for k in ("fastmath", "lineinfo")
                    if k in disp.targetoptions}
            ptx, _ = cuda.compile_ptx(py_func, sig, cc=CC, **opts)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
        else:
            row["f64"] = sorted({m.group(0).strip() for m in F64.finditer(ptx)})
            row["ptx"] = ptx
        print(json.dumps(row))
""")


def _jit_kernels() -> set[str]:
    """The names of the backend's ``@cuda.jit`` kernels (device functions excluded)."""
    names = set()
    for node in ast.walk(ast.parse(NUMBA_OPS.read_text())):
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                if ast.unparse(dec) == "cuda.jit":
                    names.add(node.name)
    return names


@pytest.fixture(scope="module")
def compiled():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS="0",
               PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(CC)], capture_output=True,
                         text=True, env=env, timeout=900)
    if res.returncode != 0 and ("NvvmSupportError" in res.stderr
                                or "libNVVM cannot be found" in res.stderr):
        pytest.skip(f"NVVM not found: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    if rows and all("NVVM" in r.get("error", "") or "nvvm" in r.get("error", "")
                    for r in rows):
        pytest.skip(f"NVVM not usable: {rows[0]['error']}")
    return rows


def test_every_kernel_compiles_for_sm90_with_its_launch_types(compiled):
    errors = [f"{r['kernel']}{tuple(r['sig'])}: {r['error']}" for r in compiled if "error" in r]
    assert not errors, "\n".join(errors)
    for want in ("float32", "float64"):
        seen = {r["kernel"] for r in compiled if r["float32"] == (want == "float32")}
        missing = _jit_kernels() - seen
        assert not missing, f"kernels never launched in {want} by the driver: {sorted(missing)}"


def test_float32_kernels_do_no_float64_arithmetic(compiled):
    leaks = [f"{r['kernel']}{tuple(r['sig'])}: {r['f64']}" for r in compiled
             if r["float32"] and r.get("f64")]
    assert not leaks, "float64 instructions in float32 kernels:\n" + "\n".join(leaks)
    # the check can see one: a float64 kernel's PTX has them
    assert any(r.get("f64") for r in compiled if not r["float32"])


def test_ptxas_assembles_every_kernel_without_spills(compiled, tmp_path):
    if NVCC is None:
        pytest.skip("nvcc not found (a CUDA toolkit): it runs ptxas")
    problems = []
    for i, r in enumerate(r for r in compiled if "ptx" in r):
        src = tmp_path / f"k{i}.ptx"
        src.write_text(r["ptx"])
        res = subprocess.run([NVCC, f"-arch=sm_{CC[0]}{CC[1]}", "-cubin", "--resource-usage",
                              str(src), "-o", os.devnull], capture_output=True, text=True,
                             timeout=300)
        name = f"{r['kernel']}{tuple(r['sig'])}"
        if res.returncode != 0:
            problems.append(f"{name}: ptxas failed\n{res.stderr}")
            continue
        info = res.stderr
        if " 0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" not in info:
            problems.append(f"{name}: {info.strip().splitlines()[-3:]}")
    assert not problems, "\n".join(problems)
