"""The CUDA kernels without a GPU: they compile, the CuPy backend's Python parts import, and
the kernels compute the right numbers when run in a CPU emulation of CUDA's execution model.

1. Every ``kernels/*.cu`` compiles with nvcc to PTX for sm_80 and sm_90, and through ptxas to
   machine code for sm_90 (static shared memory, registers; printed with ``-s``). Skipped only
   when ``nvcc`` is absent.
2. ``rawgan.backends.cupy_ops`` imports without CuPy, and ``backends.get("cupy")`` then raises
   ``BackendUnavailable`` with a message naming what is missing.
3. Every public op of ``numpy_ops`` exists in ``cupy_ops`` with the same parameters.
4. The kernels RUN on the CPU: a small C++ shim (``EMU_SHIM`` below) gives CUDA C its
   execution model -- every CUDA thread of a block is a ucontext fiber, ``__syncthreads()``
   yields to a scheduler that resumes the block once every live thread has arrived,
   ``__shared__`` is block-wide static storage, blocks run one after another -- and g++ builds
   each kernel file into a shared library. A fake ``cupy`` module (NumPy arrays in host
   memory, ``RawModule`` backed by that library, launch arguments packed exactly as CuPy packs
   them and size-checked against the kernel's C signature) is swapped into ``cupy_ops``, so
   the real backend code and the real kernel sources run end to end and are compared with
   ``numpy_ops``. Outputs come from a NaN-poisoned allocator with NaN guard zones around every
   array; a launch that writes outside its arrays fails.
5. Races and barriers, in the same emulator: each block's shared memory starts as NaN, the
   threads of a block run between two barriers (and the blocks of a grid run) in ascending,
   descending or shuffled order, and every kernel must give the same bits under every
   schedule -- a missing ``__syncthreads``, a read of another thread's write between the same
   two barriers, or two blocks writing one element changes them (a negative control shows
   it). A ``__syncthreads`` reached after other threads exited, threads waiting at different
   ``__syncthreads``, an mma (emulated with warp barriers) not reached by a whole warp, or a
   128-bit load from an address not 16-byte aligned (a GPU faults) is an error. What the
   emulator still cannot show: races that need two threads interleaved between barriers,
   warp-level behaviour beyond mma, the memory model, NVRTC-specific diagnostics and
   performance; tests/test_cupy_ops.py and compute-sanitizer check those on a real GPU.
   Skipped when g++ is absent.
"""

from __future__ import annotations

import ctypes
import hashlib
import inspect
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest

from rawgan import backends, losses
from rawgan.backends import cupy_ops, numpy_ops

REPO = Path(__file__).resolve().parents[1]
KERNEL_DIR = REPO / "kernels"
ARCHS = ("sm_80", "sm_90")
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")
needs_gxx = pytest.mark.skipif(GXX is None, reason="g++ not found on PATH (CPU emulator)")


# ======================================================================================
# 1. nvcc
# ======================================================================================

def test_every_kernel_file_is_known_to_the_backend():
    on_disk = sorted(p.name for p in KERNEL_DIR.glob("*.cu"))
    assert on_disk == sorted(cupy_ops.KERNEL_FILES)
    headers = sorted(p.name for p in KERNEL_DIR.glob("*.cuh"))
    assert headers == sorted(cupy_ops.KERNEL_HEADERS)


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("filename", cupy_ops.KERNEL_FILES)
def test_kernel_compiles_to_ptx(filename, arch, tmp_path):
    cmd = [NVCC, "-std=c++17", f"-arch={arch}", "-ptx", "-I", str(KERNEL_DIR),
           str(KERNEL_DIR / filename), "-o", str(tmp_path / "out.ptx")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr}"
    ptx = (tmp_path / "out.ptx").read_text()
    # every kernel the backend may launch is an unmangled entry point
    for entry in re.findall(r"\.entry\s+(\w+)", ptx):
        assert not entry.startswith("_Z"), f"{entry}: a kernel without extern \"C\""


@needs_nvcc
@pytest.mark.parametrize("filename", cupy_ops.KERNEL_FILES)
def test_kernel_assembles_for_sm90(filename, tmp_path):
    """PTX -> SASS through ptxas: catches what PTX generation lets through (shared memory
    over the 48 KB static limit, register limits of __launch_bounds__)."""
    cmd = [NVCC, "-std=c++17", "-arch=sm_90", "-cubin", "--resource-usage", "-I",
           str(KERNEL_DIR), str(KERNEL_DIR / filename), "-o", str(tmp_path / "out.cubin")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr}"
    smem = [int(v) for v in re.findall(r"(\d+) bytes smem", res.stderr)]
    assert all(v <= 48 * 1024 for v in smem)
    # register spills: a register block that no longer fits would spill hundreds of bytes
    # to local memory inside the main loop. sm_90's ptxas spills 4 bytes in one kernel
    # (gemm_tn_f32_S, 48 registers: a scheduling choice, not pressure); allow that much.
    spills = re.findall(r"Function properties for (\w+)\s+\d+ bytes stack frame, (\d+) bytes "
                        r"spill stores", res.stderr)
    assert spills and all(int(b) <= 8 for _, b in spills), \
        [(f, b) for f, b in spills if int(b) > 8]
    print(f"\n{filename}: " + "; ".join(
        f"{k}: {r} regs" for k, r in re.findall(
            r"Function properties for (\w+).*?Used (\d+) registers", res.stderr, re.S)))


@needs_nvcc
@pytest.mark.parametrize("filename", ["gemm.cu", "conv.cu"])
def test_tile_kernels_assemble_before_ampere(filename, tmp_path):
    """sm_75 (a T4) has no TF32 mma: the _tf32_ kernels must still assemble there (they trap
    if launched; cupy_ops refuses TF32 first), or no dense or conv op could run at all."""
    cmd = [NVCC, "-std=c++17", "-arch=sm_75", "-cubin", "-I", str(KERNEL_DIR),
           str(KERNEL_DIR / filename), "-o", str(tmp_path / "out.cubin")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr}"


def _nvrtc_candidates() -> list[str]:
    """Every libnvrtc this machine has: the nvidia-cuda-nvrtc-cu12 wheel
    (nvidia/cuda_nvrtc/lib), the CUDA 13 wheel nvidia-cuda-nvrtc (nvidia/cu13/lib), the
    CUDA toolkit beside nvcc, then the loader's path."""
    names = []
    try:
        import nvidia

        for d in nvidia.__path__:
            for sub in ("cuda_nvrtc/lib", "cu13/lib"):
                names += sorted(str(p) for p in Path(d, sub).glob("libnvrtc.so.*[0-9]"))
    except ImportError:
        pass
    if NVCC is not None:
        root = Path(NVCC).resolve().parents[1]
        names += sorted(str(p) for p in root.glob("lib*/libnvrtc.so*"))
    return names + ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"]


def _find_nvrtcs() -> dict[str, ctypes.CDLL]:
    """One libnvrtc per CUDA major version found, keyed "nvrtc12", "nvrtc13": a GPU machine
    compiles with the NVRTC of its CuPy build (cupy-cuda12x or cupy-cuda13x), so CI checks
    the kernels with both where both are installed."""
    found: dict[str, ctypes.CDLL] = {}
    for name in _nvrtc_candidates():
        # libnvrtc dlopens its builtins library by name at compile time; some wheels
        # (nvidia-cuda-nvrtc 13.0) carry no RPATH to find it beside them, so load it first
        for builtins in sorted(Path(name).parent.glob("libnvrtc-builtins.so.*")):
            try:
                ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
            except OSError:
                pass
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        major, minor = ctypes.c_int(), ctypes.c_int()
        if lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)) == 0:
            found.setdefault(f"nvrtc{major.value}", lib)
    return found


NVRTCS = _find_nvrtcs()
NVRTC = next(iter(NVRTCS.values()), None)


def nvrtc_compile(source: str, name: str, options: list[str],
                  lib: ctypes.CDLL | None = None) -> tuple[int, str, bytes]:
    """Compile ``source`` with NVRTC as cupy.RawModule does: (status, log, PTX; empty when
    the target is a real architecture, ``-arch=sm_XX``, which NVRTC compiles to a cubin)."""
    lib = NVRTC if lib is None else lib
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0,
                                  None, None) == 0
    try:
        opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        status = lib.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        ptx = b""
        if status == 0 and not any(o.startswith("-arch=sm_") for o in options):
            lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetPTX(prog, buf)
            ptx = buf.raw
        return status, log.value.decode(errors="replace"), ptx
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


#: What CuPy 14's RawModule adds to our options when it compiles with NVRTC
#: (cupy/cuda/compiler.py): flush denormals to zero, functions default to __device__, and
#: ``-arch=sm_XX`` on a GPU NVRTC knows, so NVRTC itself runs ptxas and returns a cubin.
CUPY_NVRTC_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")

needs_nvrtc = pytest.mark.skipif(not NVRTCS, reason="libnvrtc not found (pip install "
                                 "nvidia-cuda-nvrtc-cu12 or nvidia-cuda-nvrtc, or a CUDA "
                                 "toolkit)")
each_nvrtc = pytest.mark.parametrize("nvrtc", sorted(NVRTCS) or ["none"])


def _warning_lines(log: str) -> str:
    return "\n".join(line for line in log.splitlines() if "warning" in line.lower())


@needs_nvrtc
@each_nvrtc
@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
@pytest.mark.parametrize("filename", cupy_ops.KERNEL_FILES)
def test_kernel_source_compiles_with_nvrtc(filename, arch, nvrtc, tmp_path):
    """The EXACT text cupy_ops hands to cupy.RawModule (headers pasted in, no include path),
    compiled by NVRTC with the backend's options: what a GPU machine does at first use,
    checked without one, with no warning. Its kernels are the ones nvcc builds from the file
    itself."""
    src = cupy_ops.kernel_source(filename)
    status, log, ptx = nvrtc_compile(src, filename,
                                     [*cupy_ops.COMPILE_OPTIONS, f"--gpu-architecture={arch}"],
                                     NVRTCS[nvrtc])
    assert status == 0, f"NVRTC failed on {filename} ({arch}):\n{log}"
    assert not _warning_lines(log), f"{nvrtc} warns on {filename} ({arch}):\n{log}"
    entries = set(re.findall(r"\.entry\s+(\w+)", ptx.decode(errors="replace")))
    assert entries and not any(e.startswith("_Z") for e in entries)
    if NVCC is not None and arch == "compute_90":
        out = tmp_path / "nvcc.ptx"
        subprocess.run([NVCC, "-std=c++17", f"-arch={arch.replace('compute', 'sm')}", "-ptx",
                        "-I", str(KERNEL_DIR), str(KERNEL_DIR / filename), "-o", str(out)],
                       check=True, capture_output=True, timeout=300)
        assert entries == set(re.findall(r"\.entry\s+(\w+)", out.read_text()))


@needs_nvrtc
@each_nvrtc
@pytest.mark.parametrize("filename", cupy_ops.KERNEL_FILES)
def test_kernel_source_compiles_to_sm90_cubin_as_cupy_does(filename, nvrtc):
    """On an H100/H200 CuPy compiles with our options plus CUPY_NVRTC_OPTIONS and
    ``-arch=sm_90``: NVRTC runs ptxas too, so a kernel over the register or shared-memory
    limits, or a warning only the machine-code pass gives, shows here."""
    src = cupy_ops.kernel_source(filename)
    opts = [*cupy_ops.COMPILE_OPTIONS, *CUPY_NVRTC_OPTIONS, "-arch=sm_90"]
    status, log, _ = nvrtc_compile(src, filename, opts, NVRTCS[nvrtc])
    assert status == 0, f"{nvrtc} failed on {filename} (sm_90 cubin):\n{log}"
    assert not _warning_lines(log), f"{nvrtc} warns on {filename} (sm_90 cubin):\n{log}"


def test_kernel_source_inlines_headers_once():
    for filename in cupy_ops.KERNEL_FILES:
        src = cupy_ops.kernel_source(filename)
        assert not re.search(r'^\s*#\s*(include\s+"|pragma\s+once)', src, re.MULTILINE)
        assert src.count("// ---- begin common.cuh") == 1
        assert re.search(r'extern "C" __global__', src)


# ======================================================================================
# 2. importing without CuPy, and the error at selection time
# ======================================================================================

def test_cupy_ops_imports_without_cupy_and_get_raises_clearly():
    """In a fresh interpreter where ``import cupy`` fails: rawgan and cupy_ops import, CuPy is
    not imported by them, and get("cupy") raises BackendUnavailable naming the package."""
    code = textwrap.dedent("""
        import importlib.abc, sys
        class NoCupy(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "cupy" or name.startswith("cupy."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, NoCupy())
        import rawgan
        from rawgan import backends
        from rawgan.backends import cupy_ops
        assert "cupy" not in sys.modules
        assert cupy_ops.name == "cupy" and callable(cupy_ops.conv2d_forward)
        try:
            backends.get("cupy")
        except backends.BackendUnavailable as exc:
            print("MESSAGE:", exc)
        else:
            raise SystemExit("get('cupy') did not raise")
        try:
            cupy_ops.xp
        except backends.BackendUnavailable:
            print("XP: unavailable")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    msg = res.stdout.split("MESSAGE:", 1)[1].strip()
    assert "cupy" in msg and "pip install" in msg, msg
    assert "XP: unavailable" in res.stdout


def _gpu_present() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.mark.skipif(_gpu_present(), reason="a GPU is present: the backend is available")
def test_get_cupy_here_raises_backend_unavailable():
    with pytest.raises(backends.BackendUnavailable, match=r"backend 'cupy'") as info:
        backends.get("cupy")
    text = str(info.value)
    assert "needs the package 'cupy'" in text or "no CUDA GPU" in text
    with pytest.warns(UserWarning, match="NumPy"):
        assert backends.get("auto") is numpy_ops


# ======================================================================================
# 3. same ops, same signatures
# ======================================================================================

def _public_ops(module) -> dict[str, inspect.Signature]:
    return {n: inspect.signature(f) for n, f in inspect.getmembers(module, inspect.isfunction)
            if not n.startswith("_") and f.__module__ == module.__name__}


def test_cupy_ops_has_every_numpy_op_with_the_same_parameters():
    ref = _public_ops(numpy_ops)
    assert {"dense_forward", "conv2d_transpose_backward", "dropout_forward"} <= set(ref)
    for op, sig in ref.items():
        assert hasattr(cupy_ops, op), f"cupy_ops lacks {op}"
        theirs = inspect.signature(getattr(cupy_ops, op))
        want = [(p.name, p.kind, p.default) for p in sig.parameters.values()]
        got = [(p.name, p.kind, p.default) for p in theirs.parameters.values()]
        assert got == want, f"{op}: {theirs} != {sig}"
    assert cupy_ops.name == "cupy"
    for attr in ("asarray", "to_numpy", "synchronize", "check_available"):
        assert callable(getattr(cupy_ops, attr))


# ======================================================================================
# 4. the CPU emulator
# ======================================================================================

EMU_SHIM = r"""
// CPU emulation of CUDA's execution model (tests/test_kernels_compile.py).
#include <math.h>
#include <stdlib.h>
#include <string.h>
#if !(defined(__x86_64__) && defined(__linux__))
#include <ucontext.h>
#endif
#include <cstddef>
#include <tuple>
#include <utility>
#include <vector>

struct uint3 { unsigned int x, y, z; };
struct dim3 { unsigned int x, y, z; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };

static uint3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
static inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);  // CUDA's intrinsic
}

namespace rgemu {
// A fiber switch is the hot path (every CUDA thread switches at every __syncthreads).
// x86-64: a 12-instruction stack switch; elsewhere glibc's ucontext (slower: it makes a
// signal-mask system call per switch).
#if defined(__x86_64__) && defined(__linux__)
extern "C" void rgemu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl rgemu_switch
    .hidden rgemu_switch
    .type rgemu_switch, @function
rgemu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size rgemu_switch, .-rgemu_switch
)");
struct Ctx { void* sp; };
static void fiber_entry();
static void trampoline() { fiber_entry(); __builtin_trap(); }
static void ctx_make(Ctx& c, char* stack, size_t size) {
    unsigned long long top = ((unsigned long long)(stack + size)) & ~15ull;
    unsigned long long* sp = (unsigned long long*)top;
    *--sp = 0;                                      // fake return address of trampoline
    *--sp = (unsigned long long)&trampoline;        // popped by ret
    for (int i = 0; i < 6; ++i) *--sp = 0;          // rbp rbx r12 r13 r14 r15
    *--sp = 0x037F00001F80ull;                      // mxcsr (low), x87 control word (high)
    c.sp = sp;
}
static inline void ctx_switch(Ctx& from, Ctx& to) { rgemu_switch(&from.sp, to.sp); }
#else
struct Ctx { ucontext_t uc; };
static void fiber_entry();
static void ctx_make(Ctx& c, char* stack, size_t size) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, fiber_entry, 0);
}
static inline void ctx_switch(Ctx& from, Ctx& to) { swapcontext(&from.uc, &to.uc); }
#endif

// state 0 runnable, 1 at __syncthreads (line `site`), 2 exited, 3 at __syncwarp
struct Fiber { Ctx ctx; int state; int site; };
static Ctx sched;
static std::vector<Fiber> fibers;
static std::vector<char*> stacks;
static const size_t STACK = 256 * 1024;
static int current = 0;
static void (*body_fn)(void*) = nullptr;
static void* body_arg = nullptr;

static void fiber_entry() {
    body_fn(body_arg);
    fibers[current].state = 2;
    ctx_switch(fibers[current].ctx, sched);  // never resumed
}
inline void syncthreads(int site) {
    fibers[current].state = 1;
    fibers[current].site = site;
    ctx_switch(fibers[current].ctx, sched);
}
inline void syncwarp() {
    fibers[current].state = 3;
    ctx_switch(fibers[current].ctx, sched);
}

// The schedule: the order in which the threads of a block run between two barriers, and the
// order of the blocks. 0: ascending, 1: descending, 2: shuffled (seeded). A kernel without
// data races gives the same bits under every schedule; one that reads a value another thread
// writes between the same two barriers (or two blocks writing one element) does not.
static int sched_mode = 0;
static unsigned long long sched_seed = 0;
static unsigned long long mix(unsigned long long z) {  // splitmix64
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static void order(std::vector<unsigned>& v, unsigned n, unsigned long long salt) {
    v.resize(n);
    for (unsigned i = 0; i < n; ++i) v[i] = sched_mode == 1 ? n - 1 - i : i;
    if (sched_mode != 2) return;
    unsigned long long r = mix(sched_seed ^ mix(salt));
    for (unsigned i = n; i > 1; --i) {  // Fisher-Yates
        r = mix(r);
        std::swap(v[i - 1], v[r % i]);
    }
}

// A GPU gives each block shared memory with unspecified contents; here every __shared__
// variable is set to 0xFF bytes (NaN as float and double) when the first thread of a block
// reaches its declaration (RGEMU_POISON, added after each declaration by _emu_build), so a
// read before the block's own write shows instead of seeing the previous block's values.
static unsigned long long block_gen = 0;
static int fault = 0;  // the first fault of a launch (-7: a misaligned 128-bit load)
inline void check_aligned16(const void* p) {
    if (((unsigned long long)p & 15) && !fault) fault = -7;
}
static long long clock_ticks = 0;  // clock64(): one tick per call

// CUDA's launch limits are enforced: a launch the GPU would reject fails here too. Barrier
// misuse that a GPU may hang on or silently mis-synchronise is an error (-4 .. -6):
//   -4  __syncthreads reached by some threads after others of the block exited
//   -5  the threads of a block wait at different __syncthreads (different source lines)
//   -6  a __syncwarp (the emulated mma.sync) not reached by all 32 threads of the warp
//   -7  a misaligned 128-bit load (vload, common.cuh), which faults on a GPU
static int run_grid(dim3 g, dim3 b) {
    if (g.x < 1 || g.y < 1 || g.z < 1 || g.y > 65535 || g.z > 65535) return -2;
    const unsigned n = b.x * b.y * b.z;
    if (b.x < 1 || b.y < 1 || b.z < 1 || n > 1024 || b.z > 64) return -3;
    gridDim = g;
    blockDim = b;
    fibers.resize(n);
    while (stacks.size() < n) stacks.push_back((char*)malloc(STACK));
    const unsigned long long nblocks = (unsigned long long)g.x * g.y * g.z;
    std::vector<unsigned> blocks, threads;
    order(blocks, (unsigned)nblocks, 0x5EEDull);
    fault = 0;
    for (unsigned long long ib = 0; ib < nblocks; ++ib) {
        const unsigned long long lin = blocks[ib];
        blockIdx = {(unsigned)(lin % g.x), (unsigned)((lin / g.x) % g.y),
                    (unsigned)(lin / ((unsigned long long)g.x * g.y))};
        ++block_gen;
        for (unsigned t = 0; t < n; ++t) {
            ctx_make(fibers[t].ctx, stacks[t], STACK);
            fibers[t].state = 0;
        }
        for (unsigned long long epoch = 0;; ++epoch) {
            // run every runnable thread to its next barrier (or exit), in schedule order
            order(threads, n, (lin << 24) ^ epoch);
            for (unsigned t : threads) {
                if (fibers[t].state != 0) continue;
                current = (int)t;
                threadIdx = {t % b.x, (t / b.x) % b.y, t / (b.x * b.y)};
                ctx_switch(sched, fibers[t].ctx);
            }
            int released = 0;  // warps whose every thread waits at a __syncwarp go on first
            for (unsigned w0 = 0; w0 < n; w0 += 32) {
                const unsigned w1 = w0 + 32 < n ? w0 + 32 : n;
                unsigned at = 0;
                for (unsigned t = w0; t < w1; ++t) at += fibers[t].state == 3;
                if (!at) continue;
                if (at != w1 - w0) return -6;
                for (unsigned t = w0; t < w1; ++t) fibers[t].state = 0;
                ++released;
            }
            if (released) continue;
            int waiting = 0, exited = 0, site = -1;
            for (unsigned t = 0; t < n; ++t) {
                if (fibers[t].state == 2) { ++exited; continue; }
                if (site >= 0 && fibers[t].site != site) return -5;
                site = fibers[t].site;
                ++waiting;
            }
            if (!waiting) break;
            if (exited) return -4;
            if (fault) return fault;
            for (unsigned t = 0; t < n; ++t) fibers[t].state = 0;
        }
        if (fault) return fault;
    }
    return 0;
}
template <typename... A>
struct Call {
    void (*k)(A...);
    std::tuple<A...> args;
    static void thunk(void* p) { Call* c = (Call*)p; std::apply(c->k, c->args); }
};
// args[i] points at the bytes of argument i (as cuLaunchKernel's kernelParams); sizes[i] is
// checked against sizeof of the kernel's declared parameter type.
template <typename... A, size_t... I>
int launch_impl(void (*k)(A...), dim3 g, dim3 b, void** args, const int* sizes, int nargs,
                std::index_sequence<I...>) {
    if (nargs != (int)sizeof...(A)) return -1000 - (int)sizeof...(A);
    const int expect[] = {0, (int)sizeof(A)...};
    for (int i = 0; i < nargs; ++i)
        if (sizes[i] != expect[i + 1]) return -100 - i;
    Call<A...> c{k, std::tuple<A...>(*reinterpret_cast<A*>(args[I])...)};
    body_fn = &Call<A...>::thunk;
    body_arg = &c;
    return run_grid(g, b);
}
template <typename... A>
int launch(void (*k)(A...), dim3 g, dim3 b, void** args, const int* sizes, int nargs) {
    return launch_impl(k, g, b, args, sizes, nargs, std::index_sequence_for<A...>{});
}
}  // namespace rgemu
"""

EMU_MACROS = r"""
#define RG_EMULATOR 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define RGEMU_POISON(name) do { static unsigned long long gen_ = 0;                       \
        if (gen_ != rgemu::block_gen) { gen_ = rgemu::block_gen;                         \
                                        memset((void*)&(name), 0xFF, sizeof(name)); } } while (0)
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict
#define __syncthreads() rgemu::syncthreads(__LINE__)
#define __syncwarp(...) rgemu::syncwarp()
#define clock64() (++rgemu::clock_ticks)
"""

_EMU_LIBS: dict[str, ctypes.CDLL] = {}
#: a __shared__ array declaration (kernels declare one per statement, no initialiser)
SHARED_DECL = re.compile(r"__shared__[^;{}]*?\b(?P<name>\w+)\s*(?:\[[^\]]*\]\s*)+;")


def _emu_build(source: str, cache_dir: Path) -> tuple[ctypes.CDLL, list[str]]:
    """Compile CUDA source with the shim into a shared library; returns it and its kernels."""
    source, decls = SHARED_DECL.subn(r"\g<0> RGEMU_POISON(\g<name>);", source)
    assert decls == source.count("__shared__"), "a __shared__ declaration the emulator misses"
    pre = subprocess.run([GXX, "-std=c++17", "-E", "-P", "-x", "c++", "-"],
                         input=EMU_MACROS + source, capture_output=True, text=True, check=True)
    names = re.findall(r'extern\s+"C"\s+void\s+(\w+)\s*\(', pre.stdout)
    reg = "\n".join(
        f'extern "C" __attribute__((visibility("default"))) int rgemu_launch_{n}('
        f"unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, "
        f"void** a, const int* s, int na) {{ return rgemu::launch(&{n}, dim3{{gx, gy, gz}}, "
        f"dim3{{bx, by, bz}}, a, s, na); }}" for n in names)
    reg += ('\nextern "C" __attribute__((visibility("default"))) void rgemu_schedule('
            'int mode, unsigned long long seed) { rgemu::sched_mode = mode; '
            'rgemu::sched_seed = seed; }')
    full = EMU_SHIM + EMU_MACROS + source + "\n" + reg + "\n"
    digest = hashlib.sha256(full.encode()).hexdigest()[:20]
    so = cache_dir / f"emu-{digest}.so"
    if digest not in _EMU_LIBS:
        if not so.exists():
            src = cache_dir / f"emu-{digest}.cpp"
            src.write_text(full)
            tmp = cache_dir / f"emu-{digest}.so.tmp"
            # hidden visibility: each library keeps its own scheduler and thread indices
            res = subprocess.run([GXX, "-std=c++17", "-O1", "-shared", "-fPIC",
                                  "-fvisibility=hidden", "-w", "-o", str(tmp), str(src)],
                                 capture_output=True, text=True)
            assert res.returncode == 0, res.stderr[-4000:]
            tmp.replace(so)
            src.unlink()
            for stale in sorted(cache_dir.glob("emu-*.so"), key=lambda p: p.stat().st_mtime)[:-24]:
                stale.unlink(missing_ok=True)  # keep the cache small across source edits
        _EMU_LIBS[digest] = ctypes.CDLL(str(so))
    return _EMU_LIBS[digest], names


LAUNCH_FAULTS = {  # run_grid's barrier and alignment checks (EMU_SHIM)
    -4: "__syncthreads reached after other threads of the block exited",
    -5: "threads of one block wait at different __syncthreads",
    -6: "__syncwarp (mma.sync) not reached by every thread of the warp",
    -7: "a 128-bit load from an address that is not 16-byte aligned (a GPU faults)",
}
SCHEDULES = {"ascending": 0, "descending": 1, "shuffled": 2}


class _EmuKernel:
    def __init__(self, fake: FakeCupy, lib: ctypes.CDLL, name: str) -> None:
        self.fake, self.name = fake, name
        self.fn = getattr(lib, f"rgemu_launch_{name}")
        self.fn.restype = ctypes.c_int
        self.set_schedule = lib.rgemu_schedule
        self.set_schedule.argtypes = (ctypes.c_int, ctypes.c_ulonglong)

    def __call__(self, grid, block, args, shared_mem=0):  # CuPy's: launches on the current stream
        if self.fake.recording is not None:  # stream capture: recorded, NOT run (as CUDA)
            self.fake.recording.append((self, grid, block, args))
            return
        self.run(grid, block, args)

    def run(self, grid, block, args):
        bufs, sizes, arrays = [], [], []
        for a in args:  # packed as CuPy's _pointer() packs kernel arguments
            if a is None:
                bufs.append(ctypes.c_void_p(0))
                sizes.append(8)
                continue
            if isinstance(a, np.ndarray):
                assert a.flags.c_contiguous, f"{self.name}: non-contiguous array argument"
                bufs.append(ctypes.c_void_p(a.ctypes.data))
                sizes.append(8)
                arrays.append(a)
                continue
            if isinstance(a, bool):
                a = np.bool_(a)
            elif isinstance(a, int):
                a = np.int64(a)
            elif isinstance(a, float):
                a = np.float64(a)
            assert isinstance(a, np.generic), f"{self.name}: unsupported argument {a!r}"
            bufs.append(ctypes.create_string_buffer(a.tobytes(), a.itemsize))
            sizes.append(a.itemsize)
        argv = (ctypes.c_void_p * len(bufs))(*[ctypes.addressof(b) for b in bufs])
        szs = (ctypes.c_int * len(bufs))(*sizes)
        grid, block = (tuple(grid) + (1, 1))[:3], (tuple(block) + (1, 1))[:3]
        self.set_schedule(*self.fake.schedule)
        rc = self.fn(*(ctypes.c_uint(int(v)) for v in (*grid, *block)), argv, szs, len(bufs))
        if rc <= -1000:
            raise TypeError(f"{self.name}: {len(bufs)} arguments given, kernel takes "
                            f"{-rc - 1000}")
        if rc <= -100:
            raise TypeError(f"{self.name}: argument {-rc - 100} has the wrong size "
                            f"({sizes[-rc - 100]} bytes)")
        if rc in LAUNCH_FAULTS:
            raise AssertionError(f"{self.name} grid={grid} block={block}: "
                                 f"{LAUNCH_FAULTS[rc]}")
        if rc:
            raise ValueError(f"{self.name}: invalid launch configuration grid={grid} "
                             f"block={block}")
        self.fake.launches.append(self.name)
        for a in arrays:
            self.fake.check_guards(a, self.name)


class _EmuModule:
    def __init__(self, fake: FakeCupy, code: str, options=()) -> None:
        assert "-std=c++17" in options
        self.fake = fake
        self.lib, self.names = _emu_build(code, fake.cache_dir)

    def get_function(self, name: str) -> _EmuKernel:
        if name not in self.names:
            raise AttributeError(f"no kernel named {name!r} in the module")
        return _EmuKernel(self.fake, self.lib, name)


class _FakeGraph:
    """A captured CUDA graph: the launches recorded, replayed in order with the same
    pointers and the same scalar arguments (what a real graph does)."""

    def __init__(self, launches: list) -> None:
        self.nodes = launches

    def launch(self, stream=None) -> None:
        for kernel, grid, block, args in self.nodes:
            kernel.run(grid, block, args)


class _FakeStream:
    """cupy.cuda.Stream: a context manager; begin_capture() makes every kernel launch of
    the fake module a recorded node instead of a run, end_capture() returns the graph."""

    def __init__(self, fake: FakeCupy, non_blocking: bool = False) -> None:
        self.fake = fake

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def synchronize(self) -> None:
        assert self.fake.recording is None, "synchronize() during stream capture"

    def record(self, event=None):
        assert self.fake.recording is None, "event recorded across a capture boundary"
        return types.SimpleNamespace()

    def wait_event(self, event) -> None:
        return None

    def begin_capture(self, mode=None) -> None:
        assert self.fake.recording is None, "capture already in progress"
        self.fake.recording = []

    def end_capture(self) -> _FakeGraph:
        graph, self.fake.recording = _FakeGraph(self.fake.recording), None
        self.fake.graphs.append(graph)
        return graph


class _FakeEvent:
    """cupy.cuda.Event: the host time at record(). Emulated launches run when they are
    enqueued, so an event is never pending; ``done`` is False only to say that there is no
    queue that could have drained (see benchmarks/profile_step.py's check)."""

    done = False

    def __init__(self, *a, **kw) -> None:
        self.t: float | None = None

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        assert self.t is not None, "synchronize() on an event never recorded"


def _elapsed_ms(start_event: _FakeEvent, end_event: _FakeEvent) -> float:
    assert start_event.t is not None and end_event.t is not None, \
        "elapsed time of an unrecorded event"
    return (end_event.t - start_event.t) * 1e3


class _FakePool:
    """cupy.cuda.MemoryPool: ``malloc`` names the pool while ``using_allocator`` holds it, so
    every allocation records which pool it came from (``FakeCupy.pool_of``)."""

    def malloc(self, size: int):  # never called: the fake allocates with NumPy
        raise AssertionError("the fake pool's malloc is a marker only")


class _FakeAllocator:
    """cupy.cuda.using_allocator(malloc): allocations inside come from malloc's pool."""

    def __init__(self, fake: FakeCupy, malloc=None) -> None:
        self.fake, self.pool = fake, getattr(malloc, "__self__", None)

    def __enter__(self):
        self.saved, self.fake.active_pool = self.fake.active_pool, self.pool
        return self

    def __exit__(self, *exc) -> None:
        self.fake.active_pool = self.saved


class FakeCupy(types.ModuleType):
    """Just enough of CuPy for cupy_ops, on host memory: arrays are NumPy arrays (so the
    emulated kernels get real host pointers), allocations are NaN-poisoned and guarded.
    Stream capture records kernel launches without running them; host uploads and reads
    during a capture raise (CuPy forbids synchronous transfers there)."""

    GUARD = 64  # elements of canary on each side of every allocation

    def __init__(self, cache_dir: Path, sms: int = 2) -> None:
        super().__init__("cupy")
        self.cache_dir = cache_dir
        self.ndarray = np.ndarray
        self.launches: list[str] = []
        self.recording: list | None = None   # launches of the capture in progress
        self.graphs: list[_FakeGraph] = []
        self.schedule = (0, 0)  # (SCHEDULES value, seed): thread and block order
        self._guarded: dict[int, tuple[np.ndarray, int]] = {}
        self.active_pool: _FakePool | None = None   # None: the default pool
        self._pools: dict[int, _FakePool | None] = {}
        self.__version__ = "emulated"
        self.device_id = 0  # cuda.runtime.getDevice(); tests switch it to check the caches
        device = types.SimpleNamespace(id=0, attributes={"MultiProcessorCount": sms,
                                                         "ClockRate": 1},  # kHz, as clock64
                                       compute_capability="90", synchronize=lambda: None)
        props = {"name": b"rawgan CPU emulator", "major": 9, "minor": 0,
                 "multiProcessorCount": sms, "totalGlobalMem": 2**30,
                 "clockRate": 1}  # kHz: clock64() ticks once per call here
        null_stream = _FakeStream(self)
        self.cuda = types.SimpleNamespace(
            runtime=types.SimpleNamespace(getDeviceCount=lambda: 1,
                                          getDevice=lambda: self.device_id,
                                          getDeviceProperties=lambda device: dict(props),
                                          driverGetVersion=lambda: 0,
                                          runtimeGetVersion=lambda: 0),
            Device=lambda *a: device,
            get_current_stream=lambda: null_stream,
            Stream=lambda non_blocking=False: _FakeStream(self, non_blocking),
            MemoryPool=_FakePool,
            using_allocator=lambda allocator=None: _FakeAllocator(self, allocator),
            set_allocator=lambda allocator=None: None,
            Event=_FakeEvent,
            get_elapsed_time=_elapsed_ms)
        rng = np.random.default_rng(0)
        self.random = types.SimpleNamespace(
            standard_normal=lambda size=None, dtype=np.float64: self.asarray(
                rng.standard_normal(size).astype(dtype)),
            uniform=lambda low=0.0, high=1.0, size=None, dtype=np.float64: self.asarray(
                rng.uniform(low, high, size).astype(dtype)))

    def __getattr__(self, attr):
        return getattr(np, attr)

    def RawModule(self, code: str, options=(), **kw):  # noqa: N802 (CuPy's name)
        return _EmuModule(self, code, options)

    def RawKernel(self, code: str, name: str, options=("-std=c++17",), **kw):  # noqa: N802
        return _EmuModule(self, code, options).get_function(name)

    def _alloc(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        shape = tuple(shape) if isinstance(shape, (tuple, list)) else (int(shape),)
        n = math.prod(shape)
        buf = np.empty(n + 2 * self.GUARD, dtype=dtype)
        self._fill_canary(buf[:self.GUARD])
        self._fill_canary(buf[self.GUARD + n:])
        self._guarded[id(buf)] = (buf, n)
        self._pools[id(buf)] = self.active_pool
        view = buf[self.GUARD:self.GUARD + n].reshape(shape)
        self._fill_canary(view)  # poisoned: NaN for floats
        return view

    @staticmethod
    def _fill_canary(a: np.ndarray) -> None:
        if a.dtype.kind == "f":
            a[...] = np.nan
        else:
            a.view(np.uint8)[...] = 0x7F

    def pool_of(self, a: np.ndarray) -> _FakePool | None:
        """The memory pool ``a`` was allocated from (None: the default pool)."""
        base = a
        while base is not None:
            entry = self._guarded.get(id(base))
            if entry is not None and entry[0] is base:
                return self._pools[id(base)]
            base = base.base
        raise KeyError("not an array of the fake cupy")

    def check_guards(self, a: np.ndarray, kernel: str) -> None:
        base = a
        while base is not None:
            entry = self._guarded.get(id(base))
            if entry is not None and entry[0] is base:
                buf, n = entry
                ref = np.empty(self.GUARD, dtype=buf.dtype)
                self._fill_canary(ref)
                for zone in (buf[:self.GUARD], buf[self.GUARD + n:]):
                    assert zone.tobytes() == ref.tobytes(), \
                        f"{kernel} wrote outside an array of {n} elements"
                return
            base = base.base

    def empty(self, shape, dtype=np.float64):
        return self._alloc(shape, dtype)

    def zeros(self, shape, dtype=np.float64):
        a = self._alloc(shape, dtype)
        a[...] = 0
        return a

    def ones(self, shape, dtype=np.float64):
        a = self._alloc(shape, dtype)
        a[...] = 1
        return a

    def _no_transfer(self, what: str) -> None:
        if self.recording is not None:
            raise RuntimeError(f"{what} during stream capture (a host transfer)")

    def asarray(self, a, dtype=None):
        self._no_transfer("asarray")
        src = np.asarray(a, dtype=dtype)
        out = self._alloc(src.shape, src.dtype)
        out[...] = src
        return out

    def ascontiguousarray(self, a):
        return self.asarray(a)

    def asnumpy(self, a):
        self._no_transfer("asnumpy")
        return np.array(a)

    def get_array_module(self, *args):
        return np


@pytest.fixture(scope="session")
def emu_cache(request, tmp_path_factory) -> Path:
    """Where the emulator's libraries are built (kept across runs in pytest's cache)."""
    if GXX is None:
        pytest.skip("g++ not found on PATH (CPU emulator)")
    cache = getattr(request.config, "cache", None)
    if cache is None:  # -p no:cacheprovider
        return tmp_path_factory.mktemp("rawgan-cuda-emulator")
    return Path(cache.mkdir("rawgan-cuda-emulator"))


@pytest.fixture
def emu(emu_cache, monkeypatch):
    """cupy_ops running on the CPU emulator; yields the fake cupy module."""
    fake = FakeCupy(emu_cache)
    monkeypatch.setattr(cupy_ops, "_cp", fake)
    monkeypatch.setattr(cupy_ops, "FORCE_TILE", None)
    monkeypatch.setattr(cupy_ops, "DROPOUT_RNG", "numpy")
    cupy_ops._reset_caches()
    yield fake
    cupy_ops._reset_caches()


def set_sms(fake: FakeCupy, sms: int) -> None:
    fake.cuda.Device().attributes["MultiProcessorCount"] = sms
    cupy_ops._device_info.clear()


TOL = {np.float32: 1e-5, np.float64: 1e-12}


def close(got, want, dtype, what="") -> None:
    """‖got - want‖ / ‖want‖ under the tolerance, no NaN (DESIGN.md's standard)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    scale = float(np.linalg.norm(want.astype(np.float64)))
    err = float(np.linalg.norm((got - want).astype(np.float64)))
    assert err <= TOL[np.dtype(dtype).type] * max(scale, 1e-30), \
        f"{what}: relative error {err / max(scale, 1e-30):.3g}"


def rand(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


DTYPES = (np.float32, np.float64)


# -- GEMM ------------------------------------------------------------------------------

@needs_gxx
@pytest.mark.parametrize("tile", [None, "L", "M", "S", "T"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_dense_matches_numpy(emu, tile, dtype):
    cupy_ops.FORCE_TILE = tile
    rng = np.random.default_rng(1)
    # odd sizes (guarded scalar loads at the borders), aligned sizes (128-bit loads), thin
    for n, k, m in ((3, 5, 7), (70, 36, 130), (16, 64, 8), (5, 33, 1), (1, 300, 20)):
        x, w, b, dy = (rand(rng, s, dtype) for s in ((n, k), (k, m), (m,), (n, m)))
        X, W, B, DY = (emu.asarray(a) for a in (x, w, b, dy))
        close(cupy_ops.dense_forward(X, W, B), numpy_ops.dense_forward(x, w, b), dtype, "y")
        close(cupy_ops.dense_forward(X, W, None), x @ w, dtype, "y (no bias)")
        got = cupy_ops.dense_backward(DY, X, W)
        want = numpy_ops.dense_backward(dy, x, w)
        for g, r, what in zip(got, want, ("dx", "dw", "db"), strict=True):
            close(g, r, dtype, what)
        dx, dw, db = cupy_ops.dense_backward(DY, X, W, need_dx=False)
        assert dx is None and dw is not None
        dx, dw, db = cupy_ops.dense_backward(DY, X, W, need_dw=False)
        assert dw is None and db is None and dx is not None


@needs_gxx
def test_emulated_gemm_vector_and_scalar_paths_agree(emu):
    """A view offset by one element is not 16-byte aligned: the scalar path must serve it."""
    rng = np.random.default_rng(2)
    x, w = rand(rng, (33, 65), np.float32), rand(rng, (64, 32), np.float32)
    X = emu.asarray(x)[:, 1:]  # not contiguous -> cupy_ops makes it so (aligned)
    base = emu.asarray(np.concatenate([[0.0], x[:, 1:].ravel()]).astype(np.float32))
    Xu = base[1:].reshape(33, 64)  # contiguous but misaligned by 4 bytes
    assert cupy_ops._vec(Xu, 64) == 0
    W = emu.asarray(w)
    close(cupy_ops.dense_forward(Xu, W, None), x[:, 1:] @ w, np.float32, "misaligned")
    close(cupy_ops.dense_forward(X, W, None), x[:, 1:] @ w, np.float32, "strided view")


def tf32(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to TF32 as cvt.rna.tf32.f32 does (10 mantissa bits, round to
    nearest, ties away from zero), as float64."""
    bits = np.asarray(a, np.float32).view(np.uint32)
    finite = (bits & 0x7F800000) != 0x7F800000
    out = np.where(finite, (bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000), bits)
    return out.astype(np.uint32).view(np.float32).astype(np.float64)


def rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


@needs_gxx
@pytest.mark.parametrize("tile", [None, "L", "M", "S"])
def test_emulated_tf32_dense_is_the_tf32_product(emu, monkeypatch, tile):
    """cupy_ops.TF32: the dense GEMMs on the mma.sync path (emulated fragment by fragment)
    equal the product of the TF32-rounded operands summed in float32 (1e-6), and are within
    the stated TF32 tolerance (3e-3; measured 4e-4) of the float64 product; thin outputs
    (N <= 16, unless a tile is forced) and float64 stay on the FMA tiles."""
    monkeypatch.setattr(cupy_ops, "TF32", True)
    cupy_ops.FORCE_TILE = tile
    rng = np.random.default_rng(11)

    def check(fn, a, b):
        """fn() computes a @ b: on the tf32 kernels exactly the rounded product, else
        the float32 one."""
        emu.launches.clear()
        got = fn()
        on_tf32 = any("tf32" in name for name in emu.launches)
        assert on_tf32 == (tile is not None or b.shape[1] > 16), emu.launches
        want = tf32(a) @ tf32(b) if on_tf32 else a.astype(np.float64) @ b
        assert rel(got, want) < 1e-6
        assert rel(got, a.astype(np.float64) @ b) < 3e-3

    for n, k, m in ((3, 5, 17), (70, 36, 130), (33, 64, 72), (130, 300, 20)):
        x, w, dy = (rand(rng, s, np.float32) for s in ((n, k), (k, m), (n, m)))
        X, W, DY = (emu.asarray(a) for a in (x, w, dy))
        check(lambda X=X, W=W: cupy_ops.dense_forward(X, W, None), x, w)
        check(lambda X=X, W=W, DY=DY: cupy_ops.dense_backward(DY, X, W, need_dw=False)[0],
              dy, w.T)
        check(lambda X=X, W=W, DY=DY: cupy_ops.dense_backward(DY, X, W, need_dx=False)[1],
              x.T, dy)
    x64 = rand(rng, (20, 30), np.float64)
    emu.launches.clear()
    cupy_ops.dense_forward(emu.asarray(x64), emu.asarray(rand(rng, (30, 40), np.float64)),
                           None)
    assert not any("tf32" in name for name in emu.launches)


@needs_gxx
@pytest.mark.parametrize("tile", [None, "L", "S"])
def test_emulated_tf32_conv_within_tolerance(emu, monkeypatch, tile):
    """The implicit-GEMM convolutions (forward, stride-phase backward-data, split-K weight
    gradient) and the transposed conv on the TF32 path: within 3e-3 of float64."""
    monkeypatch.setattr(cupy_ops, "TF32", True)
    cupy_ops.FORCE_TILE = tile
    set_sms(emu, 64)  # split-K weight gradients
    rng = np.random.default_rng(12)
    for n, h, w_, ci, co, k, s, padding in ((2, 7, 7, 16, 24, 5, 1, "same"),
                                           (2, 9, 8, 8, 12, 3, 2, "same"),
                                           (1, 14, 14, 12, 16, 5, 2, "valid")):
        x, wt, b = (rand(rng, sh, np.float32) for sh in ((n, h, w_, ci), (k, k, ci, co), (co,)))
        x64, w64, b64 = (a.astype(np.float64) for a in (x, wt, b))
        y64 = numpy_ops.conv2d_forward(x64, w64, b64, s, padding)
        dy = rand(rng, y64.shape, np.float32)
        X, WT, B, DY = (emu.asarray(a) for a in (x, wt, b, dy))
        emu.launches.clear()
        assert rel(cupy_ops.conv2d_forward(X, WT, B, s, padding), y64) < 3e-3
        on_tf32 = any(name.startswith("conv_fwd_tf32") for name in emu.launches)
        assert on_tf32 == (tile is not None or co > 16), emu.launches  # thin: FMA tile
        got = cupy_ops.conv2d_backward(DY, X, WT, s, padding)
        want = numpy_ops.conv2d_backward(dy.astype(np.float64), x64, w64, s, padding)
        for g, r, what in zip(got, want, ("dx", "dw", "db"), strict=True):
            assert rel(g, r) < 3e-3, what
        xt = rand(rng, y64.shape[:3] + (ci,), np.float32)
        wtt = rand(rng, (k, k, co, ci), np.float32)
        yt = numpy_ops.conv2d_transpose_forward(xt.astype(np.float64), wtt.astype(np.float64),
                                                None, s, padding)
        got_t = cupy_ops.conv2d_transpose_forward(emu.asarray(xt), emu.asarray(wtt), None, s,
                                                  padding)
        assert rel(got_t, yt) < 3e-3


def test_set_tf32_validates():
    before = cupy_ops.TF32
    try:
        cupy_ops.set_tf32(True)
        assert cupy_ops.TF32 is True
        with pytest.raises(TypeError, match="True or False"):
            cupy_ops.set_tf32("yes")
    finally:
        cupy_ops.TF32 = before


@pytest.mark.parametrize("var, value, want", [
    ("RAWGAN_CUPY_DROPOUT", " Philox ", "philox"), ("RAWGAN_CUPY_DROPOUT", "", "numpy"),
    ("RAWGAN_CUPY_DROPOUT", "device", "expected one of numpy, philox"),  # the old names
    ("RAWGAN_CUPY_DROPOUT", "host", "expected one of numpy, philox"),
    ("RAWGAN_TF32", "on", "True"), ("RAWGAN_TF32", "0", "False"),
    ("RAWGAN_TF32", "tf32", "expected one of 0, 1, false, no, off, on, true, yes")])
def test_cupy_ops_environment_settings_are_read_or_refused(var, value, want):
    """A setting the backend does not know is an error naming the variable, never read as
    the default (RAWGAN_CUPY_DROPOUT=device, the old name of a mode, would otherwise switch
    the masks silently)."""
    code = ("from rawgan.backends import cupy_ops as c; "
            f"print(c.{'TF32' if var == 'RAWGAN_TF32' else 'DROPOUT_RNG'})")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, var: value}, timeout=120, cwd=REPO)
    if want.startswith("expected"):
        assert res.returncode != 0
        assert f"environment variable {var}={value!r}: {want}" in res.stderr
    else:
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == want


@needs_gxx
def test_tf32_is_refused_before_ampere(emu, monkeypatch):
    """On a GPU of compute capability 7.5 TF32 is a clear error before any launch; float32
    without TF32 runs as usual."""
    monkeypatch.setattr(emu.cuda.Device(), "compute_capability", "75")
    rng = np.random.default_rng(0)
    x, w = emu.asarray(rand(rng, (4, 32), np.float32)), emu.asarray(rand(rng, (32, 32),
                                                                        np.float32))
    monkeypatch.setattr(cupy_ops, "TF32", True)
    launched = len(emu.launches)
    with pytest.raises(backends.BackendUnavailable, match="compute capability 8.0 .* 7.5"):
        cupy_ops.dense_forward(x, w, None)
    assert len(emu.launches) == launched
    monkeypatch.setattr(cupy_ops, "TF32", False)
    assert cupy_ops.dense_forward(x, w, None).shape == (4, 32)


# -- convolutions ----------------------------------------------------------------------

def conv_cases(seed: int, count: int):
    """Random conv geometries: strides 1-3, kernels 1-5, same/valid/int padding, output
    padding for the transposed conv, odd sizes; plus the DCGAN's layer shapes at batch 2."""
    rng = np.random.default_rng(seed)
    cases = [
        # (N, H, W, Cin, Cout, k, s, padding, output_padding) -- DCGAN layers (small batch)
        (2, 28, 28, 1, 64, 5, 2, "same", None),
        (2, 14, 14, 64, 128, 5, 2, "same", None),
        (2, 7, 7, 256, 128, 5, 1, "same", None),
        (2, 7, 7, 128, 64, 5, 2, "same", None),
        (2, 14, 14, 64, 1, 5, 2, "same", None),
    ]
    while len(cases) < count + 5:
        k = int(rng.integers(1, 6))
        s = int(rng.integers(1, 4))
        padding = [str(rng.choice(["same", "valid"])), int(rng.integers(0, k))][
            int(rng.integers(0, 2))]
        h, w = int(rng.integers(max(k, 2), 12)), int(rng.integers(max(k, 2), 12))
        op = None if rng.random() < 0.5 or s == 1 else int(rng.integers(0, s))
        cases.append((int(rng.integers(1, 4)), h, w, int(rng.choice([1, 3, 4, 8, 12])),
                      int(rng.choice([1, 2, 4, 8, 16, 20])), k, s, padding, op))
    return cases


def check_conv_case(emu, case, dtype, rng) -> None:
    n, h, w, ci, co, k, s, padding, op = case
    # conv2d: x (n, h, w, ci) -> (n, ho, wo, co)
    x, wt, b = rand(rng, (n, h, w, ci), dtype), rand(rng, (k, k, ci, co), dtype), \
        rand(rng, (co,), dtype)
    y = numpy_ops.conv2d_forward(x, wt, b, s, padding)
    dy = rand(rng, y.shape, dtype)
    X, WT, B, DY = (emu.asarray(a) for a in (x, wt, b, dy))
    close(cupy_ops.conv2d_forward(X, WT, B, s, padding), y, dtype, f"conv fwd {case}")
    got = cupy_ops.conv2d_backward(DY, X, WT, s, padding)
    want = numpy_ops.conv2d_backward(dy, x, wt, s, padding)
    for g, r, what in zip(got, want, ("dx", "dw", "db"), strict=True):
        close(g, r, dtype, f"conv {what} {case}")
    # transposed: x (n, h, w, ci) -> (n, Ho, Wo, co), kernel (k, k, co, ci)
    try:
        numpy_ops.conv_transpose_geometry(h, w, k, k, (s, s), padding, op)
    except ValueError:
        return  # no transposed conv with this geometry
    wt_t = rand(rng, (k, k, co, ci), dtype)
    yt = numpy_ops.conv2d_transpose_forward(x, wt_t, b, s, padding, op)
    dyt = rand(rng, yt.shape, dtype)
    WTT, DYT = emu.asarray(wt_t), emu.asarray(dyt)
    close(cupy_ops.conv2d_transpose_forward(X, WTT, B, s, padding, op), yt, dtype,
          f"convT fwd {case}")
    got = cupy_ops.conv2d_transpose_backward(DYT, X, WTT, s, padding, op)
    want = numpy_ops.conv2d_transpose_backward(dyt, x, wt_t, s, padding, op)
    for g, r, what in zip(got, want, ("dx", "dw", "db"), strict=True):
        close(g, r, dtype, f"convT {what} {case}")


@needs_gxx
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_conv_matches_numpy(emu, dtype):
    rng = np.random.default_rng(3)
    for case in conv_cases(seed=4, count=14):
        check_conv_case(emu, case, dtype, rng)


@needs_gxx
def test_emulated_conv_large_integer_paddings(emu):
    """Integer paddings k .. k + 2 at strides 2-3 (phases whose first dy row lies before the
    map: the NumPy reference's phase correlation needed a fallback there)."""
    rng = np.random.default_rng(6)
    for k, s, p in ((2, 2, 3), (3, 2, 3), (4, 2, 5), (5, 3, 6), (3, 3, 4)):
        check_conv_case(emu, (2, 9, 8, 3, 4, k, s, p, None), np.float64, rng)


@needs_gxx
@pytest.mark.parametrize("tile", ["L", "M", "S", "T"])
def test_emulated_conv_every_tile_and_split_k(emu, tile):
    """Every tile configuration, and split-K weight gradients (many SMs -> S > 1)."""
    cupy_ops.FORCE_TILE = tile
    set_sms(emu, 64)
    rng = np.random.default_rng(5)
    for case in ((2, 9, 11, 4, 8, 3, 2, "same", 1), (1, 10, 10, 3, 5, 4, 3, 1, None),
                 (2, 14, 14, 8, 4, 5, 1, "valid", None)):
        for dtype in DTYPES:
            check_conv_case(emu, case, dtype, rng)
    assert any(name.startswith("splitk_reduce") for name in emu.launches)


@needs_gxx
def test_emulated_conv_dgrad_writes_every_input_pixel(emu):
    """kernel 1, stride 3: most input pixels get no tap at all; their gradient must be 0 (the
    poisoned NaN buffer is overwritten), not left unwritten."""
    rng = np.random.default_rng(6)
    x, w = rand(rng, (2, 7, 8, 3), np.float64), rand(rng, (1, 1, 3, 2), np.float64)
    dy = rand(rng, numpy_ops.conv2d_forward(x, w, None, 3, "valid").shape, np.float64)
    dx, _, _ = cupy_ops.conv2d_backward(emu.asarray(dy), emu.asarray(x), emu.asarray(w), 3,
                                        "valid")
    close(dx, numpy_ops.conv2d_backward(dy, x, w, 3, "valid")[0], np.float64, "dx")
    assert np.count_nonzero(np.asarray(dx)) < dx.size // 4


# -- elementwise, batch norm, dropout ---------------------------------------------------

@needs_gxx
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_elementwise_matches_numpy(emu, dtype):
    rng = np.random.default_rng(7)
    for shape in ((3, 5), (2, 7, 7, 13), (1000,), (4, 3, 3, 64)):
        x, dy = rand(rng, shape, dtype) * 3, rand(rng, shape, dtype)
        X, DY = emu.asarray(x), emu.asarray(dy)
        for alpha in (0.3, 0.0, 1.5):
            close(cupy_ops.leaky_relu_forward(X, alpha), numpy_ops.leaky_relu_forward(x, alpha),
                  dtype, "leaky fwd")
            close(cupy_ops.leaky_relu_backward(DY, X, alpha),
                  numpy_ops.leaky_relu_backward(dy, x, alpha), dtype, "leaky bwd")
        close(cupy_ops.relu_forward(X), numpy_ops.relu_forward(x), dtype, "relu fwd")
        close(cupy_ops.relu_backward(DY, X), numpy_ops.relu_backward(dy, x), dtype, "relu bwd")
        for fwd, bwd in (("tanh_forward", "tanh_backward"),
                         ("sigmoid_forward", "sigmoid_backward")):
            y = getattr(numpy_ops, fwd)(x)
            close(getattr(cupy_ops, fwd)(X), y, dtype, fwd)
            close(getattr(cupy_ops, bwd)(DY, emu.asarray(y)), getattr(numpy_ops, bwd)(dy, y),
                  dtype, bwd)
        b = rand(rng, shape[-1:], dtype)
        close(cupy_ops.bias_add_forward(X, emu.asarray(b)), numpy_ops.bias_add_forward(x, b),
              dtype, "bias fwd")
        close(cupy_ops.bias_add_backward(DY), numpy_ops.bias_add_backward(dy), dtype,
              "bias bwd")
    big = rand(rng, (1000,), dtype) * 200  # sigmoid without overflow
    close(cupy_ops.sigmoid_forward(emu.asarray(big)), numpy_ops.sigmoid_forward(big), dtype,
          "sigmoid large |x|")


@needs_gxx
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5, 7), (64, 40), (2, 7, 7, 33)])
def test_emulated_batchnorm_matches_numpy(emu, dtype, shape):
    rng = np.random.default_rng(8)
    set_sms(emu, 8)  # several row splits
    x = rand(rng, shape, dtype) * 2 + 1
    c = shape[-1]
    gamma, beta = rand(rng, (c,), dtype), rand(rng, (c,), dtype)
    mm, mv = rand(rng, (c,), dtype), np.abs(rand(rng, (c,), dtype)) + 0.5
    dy = rand(rng, shape, dtype)
    for training in (True, False):
        mm_ref, mv_ref = mm.copy(), mv.copy()
        MM, MV = emu.asarray(mm), emu.asarray(mv)
        got = cupy_ops.batchnorm_forward(emu.asarray(x), emu.asarray(gamma), emu.asarray(beta),
                                         MM, MV, 0.9, 1e-3, training)
        want = numpy_ops.batchnorm_forward(x, gamma, beta, mm_ref, mv_ref, 0.9, 1e-3, training)
        for g, r, what in zip(got, want, ("y", "mean", "inv_std"), strict=True):
            close(g, r, dtype, f"bn {what} training={training}")
        close(MM, mm_ref, dtype, "moving_mean")
        close(MV, mv_ref, dtype, "moving_variance")
        gb = cupy_ops.batchnorm_backward(emu.asarray(dy), emu.asarray(x), emu.asarray(gamma),
                                         got[1], got[2], training)
        wb = numpy_ops.batchnorm_backward(dy, x, gamma, want[1], want[2], training)
        for g, r, what in zip(gb, wb, ("dx", "dgamma", "dbeta"), strict=True):
            close(g, r, dtype, f"bn {what} training={training}")


@needs_gxx
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 7, 7, 5), (1,), (2, 3), (64,), (65,), (3, 2049)])
@pytest.mark.parametrize("buffered", [False, True])
def test_emulated_dropout_is_numpy_exact(emu, dtype, shape, buffered):
    """The PCG64 kernel makes NumPy's masks and leaves the generator where NumPy's draw
    does; ``buffered``: the generator holds a spare 32-bit half (an odd float32 count drawn
    before), which NumPy hands out first (float32) or keeps (float64)."""
    rng = np.random.default_rng(9)
    x, dy = rand(rng, shape, dtype), rand(rng, shape, dtype)
    gen, ref = np.random.default_rng(11), np.random.default_rng(11)
    if buffered:
        gen.random(3, dtype=np.float32), ref.random(3, dtype=np.float32)
    y, mask = cupy_ops.dropout_forward(emu.asarray(x), 0.3, gen)
    y_ref, mask_ref = numpy_ops.dropout_forward(x, 0.3, ref)
    assert emu.launches[-1] == f"dropout_pcg64_{cupy_ops._suffix(np.dtype(dtype))}"
    np.testing.assert_array_equal(np.asarray(mask), mask_ref)
    np.testing.assert_array_equal(np.asarray(y), y_ref)
    assert gen.bit_generator.state == ref.bit_generator.state
    close(cupy_ops.dropout_backward(emu.asarray(dy), mask),
          numpy_ops.dropout_backward(dy, mask_ref), dtype, "dropout bwd")
    X = emu.asarray(x)
    assert cupy_ops.dropout_forward(X, 0.3, rng, training=False) == (X, None)
    assert cupy_ops.dropout_backward(X, None) is X


@needs_gxx
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_dropout_grid_stride_runs_are_numpy_exact(emu, dtype):
    """More slots (32 per run of 32 x 16 outputs) than threads (1 SM: 16 blocks of 256):
    threads jump ahead again on their later passes of the grid-stride loop."""
    set_sms(emu, 1)
    x = np.ones((2 * 16 * 256 * 32 * (2 if dtype == np.float32 else 1) + 77,), dtype)
    gen, ref = np.random.default_rng(4), np.random.default_rng(4)
    _, mask = cupy_ops.dropout_forward(emu.asarray(x), 0.5, gen)
    _, mask_ref = numpy_ops.dropout_forward(x, 0.5, ref)
    np.testing.assert_array_equal(np.asarray(mask), mask_ref)
    assert gen.bit_generator.state == ref.bit_generator.state


@needs_gxx
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_dropout_other_bit_generators_upload_numpys_draw(emu, dtype):
    x = rand(np.random.default_rng(9), (5, 33), dtype)
    gen = np.random.Generator(np.random.Philox(5))
    _, mask = cupy_ops.dropout_forward(emu.asarray(x), 0.3, gen)
    _, mask_ref = numpy_ops.dropout_forward(x, 0.3, np.random.Generator(np.random.Philox(5)))
    assert emu.launches[-1].startswith("dropout_host_")
    np.testing.assert_array_equal(np.asarray(mask), mask_ref)


MASK32 = 0xFFFFFFFF


def philox4x32_10(ctr, key):
    """Reference Philox-4x32-10 (Salmon et al. 2011) in Python."""
    c, (k0, k1) = list(ctr), key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & MASK32, p1 & MASK32,
             ((p0 >> 32) ^ c[3] ^ k1) & MASK32, p0 & MASK32]
        k0, k1 = (k0 + 0x9E3779B9) & MASK32, (k1 + 0xBB67AE85) & MASK32
    return c


def test_philox_reference_matches_random123_known_answers():
    assert philox4x32_10([0] * 4, [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert philox4x32_10([MASK32] * 4, [MASK32] * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6,
                                                         0x6D5451FD]
    assert philox4x32_10([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
                         [0xA4093822, 0x299F31D0]) == [0xD16CFE09, 0x94FDCCEB, 0x5001E420,
                                                      0x24126EA1]


@needs_gxx
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_dropout_device_path_is_philox(emu, dtype):
    emu_rate = 0.3
    cupy_ops.DROPOUT_RNG = "philox"
    x = rand(np.random.default_rng(10), (3, 37), dtype)
    y, mask = cupy_ops.dropout_forward(emu.asarray(x), emu_rate, np.random.default_rng(12))
    seed = int(np.random.default_rng(12).integers(0, 2**63 - 1, dtype=np.int64))
    key = [seed & MASK32, seed >> 32]
    e = 4 if dtype == np.float32 else 2
    u = []
    for g in range(-(-x.size // e)):
        c = philox4x32_10([g & MASK32, g >> 32, 0, 0], key)
        if dtype == np.float32:
            u += [np.float32(v >> 8) * np.float32(2.0**-24) for v in c]
        else:
            u += [((c[2 * q] >> 5) * 67108864.0 + (c[2 * q + 1] >> 6)) * 2.0**-53
                  for q in range(2)]
    u = np.array(u[:x.size], dtype=dtype).reshape(x.shape)
    scale = dtype(1.0 / (1.0 - emu_rate))
    want = np.where(u >= dtype(emu_rate), scale, dtype(0))
    np.testing.assert_array_equal(np.asarray(mask), want)
    np.testing.assert_array_equal(np.asarray(y), x * want)
    assert 0.5 < np.count_nonzero(want) / want.size < 0.9


# -- losses and optimizers ----------------------------------------------------------------

@needs_gxx
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", losses.KINDS)
def test_emulated_gan_losses_match_rawgan_losses(emu, kind, dtype):
    rng = np.random.default_rng(13)
    r, f = rand(rng, (300, 1), dtype) * 3, rand(rng, (517, 1), dtype) * 3
    r[0, 0], f[0, 0] = 40.0, -40.0  # saturated logits stay finite
    loss, dr, df = cupy_ops.gan_discriminator_loss(kind, emu.asarray(r), emu.asarray(f))
    ref, ref_dr, ref_df = losses.discriminator_loss(kind, r, f)
    assert abs(float(loss) - ref) <= 1e-5 * max(1.0, abs(ref))
    close(dr, ref_dr, dtype, "d_real")
    close(df, ref_df, dtype, "d_fake")
    loss, df = cupy_ops.gan_generator_loss(kind, emu.asarray(f))
    ref, ref_df = losses.generator_loss(kind, f)
    assert abs(float(loss) - ref) <= 1e-5 * max(1.0, abs(ref))
    close(df, ref_df, dtype, "g d_fake")


def _tensors(rng, dtype, shapes=((3, 5), (7000,), (1,), (2, 2, 3, 4))):
    return [rand(rng, s, dtype) for s in shapes]


@needs_gxx
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip", [None, 0.05])
def test_emulated_optimizers_match_rawgan_optim_rules(emu, dtype, clip):
    rng = np.random.default_rng(14)
    ps, gs = _tensors(rng, dtype), _tensors(rng, dtype)
    ms = [rand(rng, p.shape, dtype) * 0.1 for p in ps]
    vs = [np.abs(rand(rng, p.shape, dtype)) for p in ps]

    def dev(arrs):
        return [emu.asarray(a) for a in arrs]

    def clipped(p):
        return p if clip is None else np.clip(p, -clip, clip, out=p)

    # Adam (rawgan.optim.Adam._update)
    P, G, M, V = dev(ps), dev(gs), dev(ms), dev(vs)
    cupy_ops.adam_update(P, G, M, V, 1e-2, 0.9, 0.999, 1e-7, clip)
    for i in range(len(ps)):
        p, g, m, v = ps[i].copy(), gs[i], ms[i].copy(), vs[i].copy()
        m += (1.0 - 0.9) * (g - m)
        v += (1.0 - 0.999) * (g * g - v)
        p -= 1e-2 * m / (np.sqrt(v) + 1e-7)
        close(M[i], m, dtype, "adam m")
        close(V[i], v, dtype, "adam v")
        close(P[i], clipped(p), dtype, "adam p")
    # SGD with and without momentum / Nesterov (rawgan.optim.SGD._update)
    for momentum, nesterov in ((0.0, False), (0.9, False), (0.9, True)):
        P, G, M = dev(ps), dev(gs), dev(ms)
        cupy_ops.sgd_update(P, G, M if momentum else None, 0.1, momentum, nesterov, clip)
        for i in range(len(ps)):
            p, g, v = ps[i].copy(), gs[i], ms[i].copy()
            if momentum == 0.0:
                p -= 0.1 * g
            else:
                v *= momentum
                v -= 0.1 * g
                p += (momentum * v - 0.1 * g) if nesterov else v
                close(M[i], v, dtype, "sgd velocity")
            close(P[i], clipped(p), dtype, f"sgd p momentum={momentum} nesterov={nesterov}")
    # RMSprop (rawgan.optim.RMSprop._update)
    P, G, A = dev(ps), dev(gs), dev(vs)
    cupy_ops.rmsprop_update(P, G, A, 1e-3, 0.9, 1e-7, clip)
    for i in range(len(ps)):
        p, g, a = ps[i].copy(), gs[i], vs[i].copy()
        a *= 0.9
        a += (1.0 - 0.9) * g * g
        p -= 1e-3 * g / (np.sqrt(a) + 1e-7)
        close(A[i], a, dtype, "rmsprop a")
        close(P[i], clipped(p), dtype, "rmsprop p")
    P = dev(ps)
    cupy_ops.clip_update(P, 0.5)
    for i in range(len(ps)):
        close(P[i], np.clip(ps[i], -0.5, 0.5), dtype, "clip")


# -- edge shapes ---------------------------------------------------------------------------

@needs_gxx
def test_emulated_modules_and_device_tables_are_per_device(emu):
    """A module is loaded into one device's context: after a switch of the current device
    (``with cupy.cuda.Device(1):``) the kernels are loaded again and the SM count and
    compute capability are asked of that device, not reused from device 0."""
    x = emu.asarray(np.ones((3, 5), np.float32))
    cupy_ops.leaky_relu_forward(x, 0.3)
    emu.device_id = 1
    cupy_ops.leaky_relu_forward(x, 0.3)
    emu.device_id = 0
    assert {d for d, _ in cupy_ops._modules} == {0, 1}
    assert cupy_ops._modules[0, "elementwise.cu"] is not cupy_ops._modules[1, "elementwise.cu"]
    assert {k[0] for k in cupy_ops._functions} == {0, 1}
    assert {(0, "sms"), (1, "sms")} <= cupy_ops._device_info.keys()


@needs_gxx
def test_emulated_ops_treat_edge_shapes_as_numpy(emu):
    """Empty batches, 1-D inputs, zero-width layers (tests/edge_cases.py): the same values
    as numpy_ops, or the same error (no ZeroDivisionError from a launch geometry)."""
    from edge_cases import check_backend

    assert not check_backend(cupy_ops, emu.asarray, np.asarray)


# -- data races and barriers: every kernel under different schedules ---------------------

def _every_kernel(emu) -> dict[str, bytes]:
    """Run every kernel family once on small shapes (every tile, split-K, TF32, both
    dtypes) and return the bytes of every output. The inputs are the same on every call."""
    rng = np.random.default_rng(21)
    out: dict[str, bytes] = {}

    def keep(name, *arrays):
        for i, a in enumerate(arrays):
            if a is not None:
                out[f"{name}.{i}"] = np.ascontiguousarray(np.asarray(a)).tobytes()

    set_sms(emu, 64)  # many SMs -> split-K weight gradients
    runs = [(dt, t, False) for dt in DTYPES for t in ("L", "M", "S", "T")]
    runs += [(np.float32, t, True) for t in ("L", "M", "S")]
    for dtype, tile, tf32_on in runs:
        cupy_ops.FORCE_TILE, cupy_ops.TF32 = tile, tf32_on
        tag = f"{np.dtype(dtype).name}-{tile}-{'tf32' if tf32_on else 'fma'}"
        x, w, b, dy = (emu.asarray(rand(rng, s, dtype)) for s in
                       ((37, 45), (45, 70), (70,), (37, 70)))
        keep(f"dense {tag}", cupy_ops.dense_forward(x, w, b), *cupy_ops.dense_backward(dy, x, w),
             cupy_ops.dense_forward(x, w, b, leaky_alpha=0.3))
        x, w = emu.asarray(rand(rng, (2, 9, 11, 4), dtype)), emu.asarray(
            rand(rng, (3, 3, 4, 8), dtype))
        y = cupy_ops.conv2d_forward(x, w, None, 2, "same")
        dy = emu.asarray(rand(rng, y.shape, dtype))
        keep(f"conv {tag}", y, *cupy_ops.conv2d_backward(dy, x, w, 2, "same"))
        wt = emu.asarray(rand(rng, (5, 5, 3, 4), dtype))
        yt = cupy_ops.conv2d_transpose_forward(x, wt, None, 2, "same")
        dyt = emu.asarray(rand(rng, yt.shape, dtype))
        keep(f"convT {tag}", yt, *cupy_ops.conv2d_transpose_backward(dyt, x, wt, 2, "same"),
             cupy_ops.conv2d_transpose_forward(x, wt, None, 2, "same", leaky_alpha=0.3))
    cupy_ops.FORCE_TILE, cupy_ops.TF32 = None, False
    for dtype in DTYPES:
        tag = np.dtype(dtype).name
        x, dy = emu.asarray(rand(rng, (4, 5, 5, 33), dtype)), emu.asarray(
            rand(rng, (4, 5, 5, 33), dtype))
        keep(f"leaky {tag}", cupy_ops.leaky_relu_forward(x, 0.3),
             cupy_ops.leaky_relu_backward(dy, x, 0.3))
        keep(f"tanh/sigmoid {tag}", cupy_ops.tanh_forward(x), cupy_ops.sigmoid_forward(x),
             cupy_ops.tanh_backward(dy, x), cupy_ops.sigmoid_backward(dy, x))
        keep(f"bias {tag}", cupy_ops.bias_add_forward(x, emu.asarray(rand(rng, (33,), dtype))),
             cupy_ops.bias_add_backward(dy))
        gamma, beta = emu.asarray(rand(rng, (33,), dtype)), emu.asarray(rand(rng, (33,), dtype))
        mm, mv = emu.zeros(33, dtype), emu.ones(33, dtype)
        y, mean, inv_std = cupy_ops.batchnorm_forward(x, gamma, beta, mm, mv, training=True)
        keep(f"bn {tag}", y, mean, inv_std, mm, mv,
             *cupy_ops.batchnorm_backward(dy, x, gamma, mean, inv_std, True),
             cupy_ops.batchnorm_forward(x, gamma, beta, mm, mv, leaky_alpha=0.3)[0],
             *cupy_ops.batchnorm_backward(dy, x, gamma, mean, inv_std, True, leaky_alpha=0.3,
                                          beta=beta))
        for mode in cupy_ops.DROPOUT_MODES:
            cupy_ops.DROPOUT_RNG = mode
            keep(f"dropout {mode} {tag}",
                 *cupy_ops.dropout_forward(x, 0.3, np.random.default_rng(3)))
        cupy_ops.DROPOUT_RNG = "numpy"
        z = emu.empty((5, 37), dtype)
        cupy_ops.standard_normal(z, cupy_ops.StepRng(7, emu.asarray(np.array([3 << 16],
                                                                             np.uint64))))
        keep(f"normal {tag}", z)
        r, f = emu.asarray(rand(rng, (300, 1), dtype)), emu.asarray(rand(rng, (517, 1), dtype))
        for kind in losses.KINDS:
            keep(f"loss {kind} {tag}", *(np.asarray(v) for v in
                                         cupy_ops.gan_discriminator_loss(kind, r, f)),
                 *(np.asarray(v) for v in cupy_ops.gan_generator_loss(kind, f)))
        ps, gs = ([emu.asarray(a) for a in _tensors(rng, dtype)] for _ in range(2))
        ms, vs = ([emu.zeros(p.shape, dtype) for p in ps] for _ in range(2))
        cupy_ops.adam_update(ps, gs, ms, vs, 1e-2, 0.9, 0.999, 1e-7, 0.05)
        cupy_ops.sgd_update(ps, gs, ms, 0.1, 0.9, True, None)
        cupy_ops.rmsprop_update(ps, gs, vs, 1e-3, 0.9, 1e-7, None)
        cupy_ops.accumulate(gs[1], ps[1])
        cupy_ops.zero_grads(gs[2:])
        keep(f"optim {tag}", *ps, *gs, *ms, *vs)
    return out


@needs_gxx
def test_emulated_kernels_are_schedule_independent(emu, monkeypatch):
    """No data races: every kernel gives the same bits whether the threads of a block run
    (between two barriers) and the blocks of a grid run in ascending, descending or shuffled
    order. A thread reading shared memory that another thread writes between the same two
    __syncthreads, a missing barrier between a tile's loads and its use, or two blocks
    writing one element would change with the order (see the negative control below). Every
    launch also passes the emulator's barrier and alignment checks (LAUNCH_FAULTS)."""
    monkeypatch.setattr(cupy_ops, "TF32", False)  # restored even if a run fails midway
    want = _every_kernel(emu)
    assert len(want) > 150
    launched = set(emu.launches)
    for mode, seed in (("descending", 0), ("shuffled", 1), ("shuffled", 2)):
        emu.schedule = (SCHEDULES[mode], seed)
        got = _every_kernel(emu)
        assert got.keys() == want.keys()
        differ = [k for k in want if got[k] != want[k]]
        assert not differ, f"schedule {mode}/{seed} changes {differ[:8]}"
    # the families that must have run: all tiles, split-K, TF32, every other kernel file
    for prefix in ("gemm_nn_f32_L", "gemm_tn_f64_T", "gemm_nt_tf32_M", "conv_fwd_tf32_S",
                   "conv_dgrad_f64_S", "conv_wgrad_f32_M", "splitk_reduce", "bn_", "adam_mt",
                   "zero_mt", "normal_philox", "dropout_philox", "dropout_pcg64"):
        assert any(n.startswith(prefix) for n in launched), (prefix, sorted(launched))


BLOCK_SUM_TEST = r"""
extern "C" __global__ void two_sums(const double* x, double* out) {
    const double a = block_sum(x[threadIdx.x]);
    const double b = block_sum(2.0 * x[threadIdx.x]);  // reuses block_sum's shared array
    out[threadIdx.x] = a + 10.0 * b;                   // every thread uses both totals
}
"""


@needs_gxx
def test_emulated_block_sum_gives_every_thread_the_total(emu):
    """common.cuh's block_sum contract ("every thread gets the total"), twice in a row as
    losses.cu calls it, under every schedule: its last barrier keeps the second call from
    overwriting the first total before every thread has read it."""
    mod = emu.RawModule(cupy_ops.kernel_source("common.cuh") + BLOCK_SUM_TEST,
                        options=("-std=c++17",))
    x = emu.asarray(np.random.default_rng(0).integers(-50, 50, 256).astype(np.float64))
    for mode in SCHEDULES:
        emu.schedule = (SCHEDULES[mode], 3)
        out = emu.empty(256, np.float64)
        mod.get_function("two_sums")((1,), (256,), (x, out))
        np.testing.assert_array_equal(out, np.full(256, 21.0 * float(np.sum(x))), err_msg=mode)


RACY_SOURCE = r"""
extern "C" __global__ void neighbour(const float* x, float* y, int barrier) {
    __shared__ float s[64];
    const int t = threadIdx.x;
    s[t] = x[t];
    if (barrier) __syncthreads();
    y[t] = s[(t + 1) % 64];  // without the barrier: a read of another thread's write
}
extern "C" __global__ void last_writer(float* y) {
    y[0] = (float)blockIdx.x;  // every block writes the same element
}
extern "C" __global__ void early_exit(float* y) {
    if (threadIdx.x >= 32) return;
    __syncthreads();  // threads 32.. have exited: UB on a GPU
    y[threadIdx.x] = 1.0f;
}
extern "C" __global__ void misaligned(const float* x, float* y) {
    float v[4];
    vload(x + threadIdx.x % 2, v);  // x + 1 is 4-byte aligned only
    y[threadIdx.x] = v[0];
}
extern "C" __global__ void split_barrier(float* y) {
    if (threadIdx.x % 2)
        __syncthreads();
    else
        __syncthreads();  // a different barrier: UB on a GPU
    y[threadIdx.x] = 1.0f;
}
"""


@needs_gxx
def test_emulator_schedules_expose_races_and_barrier_misuse(emu):
    """The negative control of the test above: a missing barrier and a write-write conflict
    between blocks change with the schedule; divergent barriers and a misaligned 128-bit
    load are errors."""
    mod = emu.RawModule(cupy_ops.kernel_source("common.cuh") + RACY_SOURCE,
                        options=("-std=c++17",))
    x = emu.asarray(np.arange(64, dtype=np.float32))

    def run(kernel, grid, args, mode):
        emu.schedule = (SCHEDULES[mode], 5)
        mod.get_function(kernel)(grid, (64,), args)
        return np.asarray(args[-2] if kernel == "neighbour" else args[0]).copy()

    for barrier, racy in ((1, False), (0, True)):
        outs = [run("neighbour", (1,), (x, emu.empty(64, np.float32), np.int32(barrier)), m)
                for m in SCHEDULES]
        assert any(not np.array_equal(outs[0], o) for o in outs[1:]) == racy
        if not racy:
            np.testing.assert_array_equal(outs[0], np.roll(np.arange(64, dtype=np.float32), -1))
    outs = [run("last_writer", (5,), (emu.empty(1, np.float32),), m)[0] for m in SCHEDULES]
    assert len(set(outs)) > 1
    for kernel, msg in (("early_exit", "exited"), ("split_barrier", "different")):
        with pytest.raises(AssertionError, match=msg):
            run(kernel, (1,), (emu.empty(64, np.float32),), "ascending")
    with pytest.raises(AssertionError, match="16-byte aligned"):
        mod.get_function("misaligned")((1,), (64,), (emu.asarray(np.zeros(80, np.float32)),
                                                     emu.empty(64, np.float32)))


# -- bad input -------------------------------------------------------------------------

@needs_gxx
def test_emulated_ops_reject_bad_input_clearly(emu):
    x32 = emu.asarray(np.ones((2, 3), np.float32))
    with pytest.raises(TypeError, match="mixed dtypes"):
        cupy_ops.dense_forward(x32, emu.asarray(np.ones((3, 4), np.float64)), None)
    with pytest.raises(TypeError, match="CuPy arrays"):
        cupy_ops.relu_forward([1.0, 2.0])
    with pytest.raises(ValueError, match="do not multiply"):
        cupy_ops.dense_forward(x32, emu.asarray(np.ones((4, 4), np.float32)), None)
    with pytest.raises(ValueError, match="channels"):
        cupy_ops.conv2d_forward(emu.asarray(np.ones((1, 5, 5, 2), np.float32)),
                                emu.asarray(np.ones((3, 3, 3, 4), np.float32)), None)
    with pytest.raises(ValueError, match="unknown loss kind"):
        cupy_ops.gan_generator_loss("nope", emu.asarray(np.ones((2, 1), np.float32)))
    with pytest.raises(TypeError, match="int32|float"):
        cupy_ops.relu_forward(emu.asarray(np.ones(3, np.int32)))


# -- a whole DCGAN training step ------------------------------------------------------------

@needs_gxx
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_dcgan_training_steps_track_numpy(emu, dtype, monkeypatch):
    """Two full DCGAN steps (G and D forward/backward, BN, dropout through the host-uniform
    path, BCE, Adam) on the emulated kernels vs the NumPy backend, same seeds. The NumPy run
    takes the direct convolutions: its float32 Winograd path differs by ~1e-5 (see
    rawgan/backends/winograd.py), more than this float32-vs-float32 tolerance."""
    from rawgan import gan, models, optim
    from rawgan.backends import winograd

    monkeypatch.setattr(winograd, "ENABLED", False)

    def run(ops):
        G, D = models.build("dcgan", seed=3, backend=ops, dtype=dtype)
        opt_g, opt_d = optim.Adam(G, lr=1e-4), optim.Adam(D, lr=1e-4)
        data = np.random.default_rng(4)
        noise = gan.gaussian_noise(np.random.default_rng(5), 100, ops=ops, dtype=dtype)
        out = []
        for _ in range(2):
            real = ops.asarray(data.uniform(-1, 1, (2, 28, 28, 1)).astype(dtype))
            s = gan.train_step(G, D, opt_g, opt_d, "bce", [real], noise)
            out.append((s.d_loss, s.g_loss, s.d_real, s.d_fake))
        w = {k: ops.to_numpy(v) for k, v in G.get_weights().items()}
        return np.array(out), w

    got, w_got = run(cupy_ops)
    want, w_want = run(numpy_ops)
    np.testing.assert_allclose(got, want, rtol=1e-4 if dtype == np.float32 else 1e-10)
    for k in w_want:
        close(w_got[k], w_want[k], dtype, k)
