"""Time one DCGAN training step and generator inference: rawgan (NumPy) vs PyTorch CPU.

Usage::

    python benchmarks/bench_step.py [--batch 256] [--repeats 10] [--threads T] [--json OUT]

Measured in the same run (see benchmarks/README.md):

(a) ``rawgan.gan.train_step`` with the seed DCGAN (float32, loss "bce", Adam lr 1e-4, k=1);
(b) the same algorithm in PyTorch CPU (float32, same architecture and step structure), in
    NCHW and in channels_last; the faster is the reference the ratio uses;
(c) generator inference (``training=False``) in both;
(d) for context, the TF tutorial's "one forward, simultaneous gradients" step in PyTorch;

plus the NumPy float32 GEMM ceiling of the step's own GEMM shapes, and a per-layer breakdown
of rawgan's step (timers wrapped around each layer's forward/backward by this script).
Times are the median and the minimum over ``--repeats`` after 2 warm-up calls.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _threads_from_argv(argv: list[str]) -> int | None:
    """``--threads T`` must act before NumPy loads OpenBLAS, so it is read here first."""
    for i, a in enumerate(argv):
        text = (argv[i + 1] if a == "--threads" and i + 1 < len(argv)
                else a.split("=", 1)[1] if a.startswith("--threads=") else None)
        if text is not None:
            try:
                return int(text)
            except ValueError:
                return None  # argparse reports it, with the usage line
    return None


if __name__ == "__main__":
    _t = _threads_from_argv(sys.argv[1:])
    if _t is not None:
        for _var in THREAD_VARS:
            os.environ[_var] = str(_t)

import numpy as np  # noqa: E402

sys.path.insert(0, str(REPO))
from rawgan import gan, losses, models, optim  # noqa: E402
from rawgan.backends import blas_kernels  # noqa: E402
from rawgan.bench import cpu_name  # noqa: E402
from rawgan.checkpoint import atomic_write  # noqa: E402
from rawgan.nn import Conv2D, Conv2DTranspose, Dense  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the rawgan half still runs
    torch = None


# --------------------------------------------------------------------------- helpers


def blas_threads() -> int:
    """Threads OpenBLAS uses: OPENBLAS_NUM_THREADS, else OMP_NUM_THREADS, else all cores."""
    for var in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(var, "").strip().isdigit():
            return int(os.environ[var])
    return len(os.sched_getaffinity(0))


def bench(fn, warmup: int, repeats: int) -> dict:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "times": times}


def _busy_ticks() -> int | None:
    """CPU ticks spent busy by ALL processes since boot (/proc/stat, first line)."""
    try:
        vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(vals) - vals[3] - vals[4]  # minus idle and iowait


def timed_call(fn, settle: float = 0.0) -> tuple[float, float | None]:
    """``(seconds, others)``: wall time of ``fn()`` and the share of all cores that OTHER
    processes kept busy over ``settle`` seconds of sleep before it plus the call itself
    (machine busy ticks from /proc/stat minus this process's CPU time; ticks are 10 ms,
    so the sleep also makes the window long enough to measure)."""
    hz, ncpu = os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1
    b0, c0, w0 = _busy_ticks(), os.times(), time.perf_counter()
    if settle:
        time.sleep(settle)
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    b1, c1 = _busy_ticks(), os.times()
    if b0 is None or b1 is None:
        return t1 - t0, None
    mine = (c1.user + c1.system - c0.user - c0.system) * hz
    return t1 - t0, max(0.0, (b1 - b0 - mine) / ((t1 - w0) * hz * ncpu))


NOISY = 0.10  # a repeat during which other processes used over 10% of the cores


def bench_interleaved(benches: dict, warmup: int, repeats: int, max_retries: int,
                      wait: float) -> dict:
    """Time every benchmark in turn, round after round (so drift and other processes hit
    all of them alike), with a 0.3 s sleep before each call so one runtime's spinning
    threads do not steal the next one's cores. A repeat during which other processes kept more than
    NOISY of the cores busy is set aside and retried (after waiting up to ``wait`` s for
    quiet), ``max_retries`` times in all; summaries use the clean repeats when there are
    at least 3, else all of them (and say so)."""
    for fn in benches.values():
        for _ in range(warmup):
            fn()
    raw = {name: {"clean": [], "noisy": [], "others": []} for name in benches}
    retries = 0
    for _ in range(repeats):
        for name, fn in benches.items():
            while True:
                # the sleep lets the previous runtime's spinning threads settle
                dt, others = timed_call(fn, settle=0.3)
                raw[name]["others"].append(others)
                if others is None or others <= NOISY or retries >= max_retries:
                    raw[name]["clean" if others is None or others <= NOISY
                              else "noisy"].append(dt)
                    break
                raw[name]["noisy"].append(dt)
                retries += 1
                wait_quiet(wait)
    out = {}
    for name, r in raw.items():
        use = r["clean"] if len(r["clean"]) >= 3 else r["clean"] + r["noisy"]
        out[name] = {"median": statistics.median(use), "min": min(use),
                     "times": r["clean"], "noisy_times": r["noisy"],
                     "others_busy": r["others"], "clean": len(r["clean"]) >= 3}
    return out


def wait_quiet(seconds: float) -> None:
    """Wait up to ``seconds`` for 3 consecutive seconds with the CPU under NOISY busy."""
    deadline, quiet = time.monotonic() + seconds, 0
    while quiet < 3 and time.monotonic() < deadline:
        b = cpu_busy(1.0)
        quiet = quiet + 1 if b is not None and b < NOISY else 0


# --------------------------------------------------------------------------- FLOP count


def layer_macs(layer, batch: int) -> int:
    """Multiply-accumulates of one forward pass of ``layer`` on ``batch`` samples.

    Dense: N * in * out.  Conv2D: N * Ho * Wo * kh * kw * c_in * c_out (taps over padding
    included).  Conv2DTranspose: N * H * W * kh * kw * c_in * c_out with (H, W) its INPUT
    size (every input pixel scatters a kh x kw x c_out patch, cropped taps included). The
    input-gradient and the weight-gradient GEMMs of the backward pass each cost the same.
    Elementwise layers (batch norm, activations, dropout) and the optimizer are not counted.
    """
    if isinstance(layer, Dense):
        return batch * layer.input_shape[0] * layer.units
    if isinstance(layer, Conv2D):
        _, ho, wo, co = layer.compute_output_shape((None, *layer.input_shape))
        kh, kw = layer.kernel_size
        return batch * ho * wo * kh * kw * layer.input_shape[2] * co
    if isinstance(layer, Conv2DTranspose):
        h, w, ci = layer.input_shape
        kh, kw = layer.kernel_size
        return batch * h * w * kh * kw * ci * layer.filters
    return 0


def step_flops(G, D, batch: int) -> dict:
    """FLOPs (2 per MAC) of one k=1 step, per (phase, model, layer, pass).

    critic phase: G forward (N); D forward and backward on [real; fake] (2N), weight
    gradients for every layer, input gradients for all but D's first layer.
    generator phase: D forward (N) and input gradients only (every layer, down to the
    image); G backward: weight gradients, input gradients for all but G's first layer.
    """
    out = {}
    n = batch
    for i, layer in enumerate(G.layers):
        m = layer_macs(layer, n)
        out[("critic", "G", layer.name, "fwd")] = 2 * m
        out[("gen", "G", layer.name, "bwd")] = 2 * m * (1 + (i > 0))
    for i, layer in enumerate(D.layers):
        m2 = layer_macs(layer, 2 * n)
        m1 = layer_macs(layer, n)
        out[("critic", "D", layer.name, "fwd")] = 2 * m2
        out[("critic", "D", layer.name, "bwd")] = 2 * m2 * (1 + (i > 0))
        out[("gen", "D", layer.name, "fwd")] = 2 * m1
        out[("gen", "D", layer.name, "bwd")] = 2 * m1
    return out


def flop_table(G, D, batch: int) -> tuple[str, int, int]:
    """Per-layer MAC table (text), the step's total FLOPs and G inference's FLOPs."""
    rows = [("model", "layer", "output shape", "MACs/sample", "step FLOP (x2, all passes)")]
    per = step_flops(G, D, batch)
    for tag, model in (("G", G), ("D", D)):
        shape = (None, *model.input_shape)
        for layer in model.layers:
            shape = layer.compute_output_shape(shape)
            m = layer_macs(layer, 1)
            if m:
                f = sum(v for k, v in per.items() if k[1] == tag and k[2] == layer.name)
                rows.append((tag, f"{layer.name} ({layer.kind})", str(shape[1:]), f"{m:,}",
                             f"{f / 1e9:.2f} G"))
    total = sum(per.values())
    infer = 2 * sum(layer_macs(layer, batch) for layer in G.layers)
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines), total, infer


# --------------------------------------------------------------------------- GEMM ceiling


def gemm_ceiling(G, D, batch: int, repeats: int = 5, wait: float = 10.0) -> list[dict]:
    """Float32 GEMM throughput of the step's largest GEMM shapes: NumPy (the ceiling rawgan
    can reach) and, for context, ``torch.mm`` (oneDNN/MKL kernels PyTorch's convs use)."""
    ct = G.layers[4]  # Conv2DTranspose(128, 5, s1): the step's biggest layer
    h, w, ci = ct.input_shape
    m, k = batch * h * w, ct.kernel_size[0] * ct.kernel_size[1] * ct.filters
    c2 = D.layers[3]  # Conv2D(128, 5, s2) on 2N in the critic phase
    _, ho, wo, co = c2.compute_output_shape((None, *c2.input_shape))
    m2, k2 = 2 * batch * ho * wo, c2.kernel_size[0] * c2.kernel_size[1] * c2.input_shape[2]
    shapes = [
        ("G conv_t fwd: (N*H*W, c_in) @ (c_in, k*k*c_out)", (m, ci, k)),
        ("G conv_t dW:  (k*k*c_out, N*H*W) @ (N*H*W, c_in)", (k, m, ci)),
        ("D conv2 fwd (2N): (M, k*k*c_in) @ (k*k*c_in, c_out)", (m2, k2, co)),
    ]
    rng = np.random.default_rng(0)
    out = []
    for name, (a_, b_, c_) in shapes:
        a = rng.standard_normal((a_, b_), dtype=np.float32)
        b = rng.standard_normal((b_, c_), dtype=np.float32)
        flop = 2 * a_ * b_ * c_
        best, tries = clean_best(lambda a=a, b=b: a @ b, repeats, wait)
        row = {"gemm": name, "shape": [a_, b_, c_], "flop": flop,
               "gflops_best": flop / best, "tries": tries}
        if torch is not None:
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            best_t, _ = clean_best(lambda ta=ta, tb=tb: torch.mm(ta, tb), repeats, wait)
            row["torch_mm_gflops_best"] = flop / best_t
        out.append(row)
    for row in out:
        row["gflops_best"] /= 1e9
        if "torch_mm_gflops_best" in row:
            row["torch_mm_gflops_best"] /= 1e9
    return out


def clean_best(fn, want: int, wait: float, max_tries: int = 30) -> tuple[float, int]:
    """Fastest of ``want`` undisturbed calls of ``fn`` (after one warm-up call), trying at
    most ``max_tries`` times; returns (seconds, tries)."""
    fn()
    clean, noisy, tries = [], [], 0
    while len(clean) < want and tries < max_tries:
        tries += 1
        dt, others = timed_call(fn, settle=0.1)
        if others is None or others <= NOISY:
            clean.append(dt)
        else:
            noisy.append(dt)
            wait_quiet(wait)
    return min(clean or noisy), tries


def cpu_busy(seconds: float = 0.5) -> float | None:
    """Fraction of all cores busy (any process, this one included) over ``seconds``."""
    hz, ncpu = os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1
    b0, t0 = _busy_ticks(), time.perf_counter()
    time.sleep(seconds)
    b1, t1 = _busy_ticks(), time.perf_counter()
    if b0 is None or b1 is None:
        return None
    return (b1 - b0) / ((t1 - t0) * hz * ncpu)


def loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


# --------------------------------------------------------------------------- rawgan


def rawgan_setup(batch: int, seed: int):
    G, D = models.build("dcgan", seed=seed)
    opt_g, opt_d = optim.Adam(G, lr=1e-4), optim.Adam(D, lr=1e-4)
    rng = np.random.default_rng(seed)
    reals = [rng.uniform(-1, 1, (batch, *models.IMAGE_SHAPE)).astype(np.float32)]
    noise = gan.gaussian_noise(rng, models.NOISE_DIM)
    z = rng.standard_normal((batch, models.NOISE_DIM), dtype=np.float32)

    def step():
        return gan.train_step(G, D, opt_g, opt_d, "bce", reals, noise)

    def infer():
        return G.forward(z, training=False)

    return G, D, opt_g, opt_d, step, infer


def rawgan_breakdown(G, D, opt_g, opt_d, step, steps: int) -> dict:
    """Seconds per step spent in each layer's forward/backward, the losses and Adam.

    Timers are wrapped around the bound methods of THESE model instances (instance
    attributes shadow the class methods) and removed afterwards; the library is untouched.
    """
    acc: dict[tuple, float] = defaultdict(float)
    phase = ["critic"]
    patched_objs = []
    patched_mods = []

    def timed(fn, key_fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                acc[key_fn()] += time.perf_counter() - t0
        return wrapper

    for tag, model in (("G", G), ("D", D)):
        for layer in model.layers:
            for meth, short in (("forward", "fwd"), ("backward", "bwd")):
                setattr(layer, meth, timed(getattr(layer, meth),
                                           lambda t=tag, n=layer.name, s=short: (phase[0], t,
                                                                                 n, s)))
                patched_objs.append((layer, meth))
    for tag, opt in (("G", opt_g), ("D", opt_d)):
        opt.step = timed(opt.step, lambda t=tag: (phase[0], t, "adam", "step"))
        patched_objs.append((opt, "step"))
    for name in ("discriminator_loss", "generator_loss"):
        orig = getattr(losses, name)
        setattr(losses, name, timed(orig, lambda n=name: (phase[0], "-", n, "")))
        patched_mods.append((losses, name, orig))
    for name, ph in (("critic_step", "critic"), ("generator_step", "gen")):
        orig = getattr(gan, name)

        def enter(*a, _orig=orig, _ph=ph, **kw):
            phase[0] = _ph
            return _orig(*a, **kw)

        setattr(gan, name, enter)
        patched_mods.append((gan, name, orig))
    try:
        step()  # warm the wrappers
        acc.clear()
        total, others = timed_call(lambda: [step() for _ in range(steps)])
        total /= steps
    finally:
        for obj, meth in patched_objs:
            delattr(obj, meth)
        for mod, name, orig in patched_mods:
            setattr(mod, name, orig)
    per = {k: v / steps for k, v in acc.items()}
    return {"total": total, "per": per, "others_busy": others}


# --------------------------------------------------------------------------- torch


def torch_models(channels_last: bool, seed: int):
    """The TF-tutorial DCGAN in PyTorch, float32.

    Same layers, shapes, FLOPs, BN momentum (0.01 = 1 - 0.99) and epsilon (1e-3) and
    LeakyReLU slope (0.3) as rawgan's seeds. "same" padding is PyTorch's symmetric
    ``padding=2`` (plus ``output_padding=1`` for the stride-2 transposed convs): the shapes
    and the arithmetic are identical to TF's (1, 2) split, the windows sit one pixel apart.
    """
    nn = torch.nn
    torch.manual_seed(seed)
    G = nn.Sequential(
        nn.Linear(100, 7 * 7 * 256, bias=False),
        nn.BatchNorm1d(7 * 7 * 256, eps=1e-3, momentum=0.01), nn.LeakyReLU(0.3),
        nn.Unflatten(1, (256, 7, 7)),
        nn.ConvTranspose2d(256, 128, 5, 1, padding=2, bias=False),
        nn.BatchNorm2d(128, eps=1e-3, momentum=0.01), nn.LeakyReLU(0.3),
        nn.ConvTranspose2d(128, 64, 5, 2, padding=2, output_padding=1, bias=False),
        nn.BatchNorm2d(64, eps=1e-3, momentum=0.01), nn.LeakyReLU(0.3),
        nn.ConvTranspose2d(64, 1, 5, 2, padding=2, output_padding=1, bias=False), nn.Tanh(),
    )
    D = nn.Sequential(
        nn.Conv2d(1, 64, 5, 2, padding=2), nn.LeakyReLU(0.3), nn.Dropout(0.3),
        nn.Conv2d(64, 128, 5, 2, padding=2), nn.LeakyReLU(0.3), nn.Dropout(0.3),
        nn.Flatten(), nn.Linear(7 * 7 * 128, 1),
    )
    for m in [*G.modules(), *D.modules()]:  # Keras' initialisers
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    if channels_last:
        G = G.to(memory_format=torch.channels_last)
        D = D.to(memory_format=torch.channels_last)
    return G, D


def twin_problems(G_t, D_t) -> list[str]:
    """Where the PyTorch twin's structure differs from rawgan's seed DCGAN: the parameter
    count of each layer that has parameters (in order), and the shapes of G(z) and D(x) at
    batch 2 (NCHW read as NHWC). Empty when they agree. Values are not compared: the
    stride-2 windows sit one pixel apart (see :func:`torch_models`)."""
    G, D = models.build("dcgan", seed=0)
    problems = []
    for tag, ours, theirs in (("G", G, G_t), ("D", D, D_t)):
        mine = [layer.count_params() for layer in ours.layers if layer.params]
        twin = [sum(p.numel() for p in m.parameters(recurse=False))
                + sum(b.numel() for b in m.buffers(recurse=False) if b.dim() > 0)
                for m in theirs.modules() if list(m.parameters(recurse=False))]
        if mine != twin:
            problems.append(f"{tag}: parameters per layer {mine} (rawgan) vs {twin} (PyTorch)")
    z = np.zeros((2, models.NOISE_DIM), np.float32)
    x = np.zeros((2, *models.IMAGE_SHAPE), np.float32)
    modes = (G_t.training, D_t.training)
    G_t.eval(), D_t.eval()  # no batch-norm running statistics updated by this check
    with torch.no_grad():
        g_t = tuple(G_t(torch.from_numpy(z)).permute(0, 2, 3, 1).shape)
        d_t = tuple(D_t(torch.from_numpy(x).permute(0, 3, 1, 2)).shape)
    G_t.train(modes[0]), D_t.train(modes[1])
    for what, a, b in (("G(z)", G.forward(z).shape, g_t), ("D(x)", D.forward(x).shape, d_t)):
        if tuple(a) != b:
            problems.append(f"{what}: shape {tuple(a)} (rawgan) vs {b} (PyTorch)")
    return problems


def torch_setup(batch: int, seed: int, channels_last: bool):
    G, D = torch_models(channels_last, seed)
    problems = twin_problems(G, D)
    if problems:  # timing a different network would make every ratio meaningless
        raise RuntimeError("the PyTorch twin is not rawgan's DCGAN: " + "; ".join(problems))
    G.train()
    D.train()
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-7)
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-7)
    gen = torch.Generator().manual_seed(seed)
    real = torch.rand(batch, 1, 28, 28, generator=gen) * 2 - 1
    if channels_last:
        real = real.contiguous(memory_format=torch.channels_last)
    ones, zeros = torch.ones(batch, 1), torch.zeros(batch, 1)
    d_params = list(D.parameters())
    bce = F.binary_cross_entropy_with_logits

    def step():
        """rawgan's step structure: G once; D on [real; fake]; D update; D(fake) through
        the UPDATED D, backward into G only (D's weight gradients skipped); G update."""
        z = torch.randn(batch, 100, generator=gen)
        fake = G(z)
        logits = D(torch.cat([real, fake.detach()]))
        d_loss = bce(logits[:batch], ones) + bce(logits[batch:], zeros)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        for p in d_params:
            p.requires_grad_(False)
        g_loss = bce(D(fake), ones)  # reuses G's graph from the first forward
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        for p in d_params:
            p.requires_grad_(True)
        opt_g.step()
        return d_loss.item(), g_loss.item()

    g_params = list(G.parameters())

    def step_simultaneous():
        """TF tutorial: one G forward, D(real) and D(fake) once, both gradients from the
        same graph (D's update does not see G's, nor G's the updated D)."""
        z = torch.randn(batch, 100, generator=gen)
        fake = G(z)
        real_out, fake_out = D(real), D(fake)
        g_loss = bce(fake_out, ones)
        d_loss = bce(real_out, ones) + bce(fake_out, zeros)
        gg = torch.autograd.grad(g_loss, g_params, retain_graph=True)
        gd = torch.autograd.grad(d_loss, d_params)
        for p, g in zip(g_params, gg, strict=True):
            p.grad = g
        for p, g in zip(d_params, gd, strict=True):
            p.grad = g
        opt_g.step()
        opt_d.step()
        return d_loss.item(), g_loss.item()

    z_inf = torch.randn(batch, 100, generator=gen)

    def infer():
        G.eval()
        with torch.inference_mode():
            out = G(z_inf)
        G.train()
        return out

    return step, step_simultaneous, infer


# --------------------------------------------------------------------------- machine info


def machine_info(threads: int) -> dict:
    cpu = cpu_name()

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except Exception:  # older NumPy
        blas = None
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numpy_blas": blas,
        "torch": None if torch is None else torch.__version__,
        "torch_threads": None if torch is None else torch.get_num_threads(),
        "torch_config": None if torch is None else torch.__config__.show(),
        "blas_threads": threads,
        "blas_kernels": blas_kernels.architecture(),  # OpenBLAS's kernel set (Haswell, ...)
        "thread_env": {v: os.environ.get(v) for v in (*THREAD_VARS, "OPENBLAS_CORETYPE")},
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "git_modified": None if not status else status.splitlines(),
    }


# --------------------------------------------------------------------------- main


def fmt_t(r: dict | None) -> str:
    return "n/a" if r is None else f"{r['median'] * 1e3:8.1f} / {r['min'] * 1e3:8.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None,
                    help="BLAS/OpenMP threads for both (default: the thread env vars, else "
                         "every core)")
    ap.add_argument("--json", type=Path, default=None, help="write results here")
    ap.add_argument("--torch-layout", choices=("auto", "nchw", "channels_last"), default="auto",
                    help="auto: time both, compare with the faster")
    ap.add_argument("--breakdown-steps", type=int, default=3,
                    help="steps timed for rawgan's per-layer breakdown (0: skip)")
    ap.add_argument("--no-simultaneous", action="store_true",
                    help="skip (d), the TF-tutorial simultaneous-gradient step in PyTorch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-retries", type=int, default=20,
                    help="repeats to redo, in all, when other processes disturbed them")
    ap.add_argument("--retry-wait", type=float, default=60.0, metavar="SECONDS",
                    help="before a retry, wait up to SECONDS for the CPU to be quiet")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="first wait up to SECONDS for the CPU to be idle (other processes "
                         "under 10%% of the cores for 3 s in a row)")
    args = ap.parse_args(argv)
    for flag, value, least in (("--batch", args.batch, 1), ("--repeats", args.repeats, 1),
                               ("--warmup", args.warmup, 0), ("--threads", args.threads, 1),
                               ("--breakdown-steps", args.breakdown_steps, 0),
                               ("--max-retries", args.max_retries, 0),
                               ("--retry-wait", args.retry_wait, 0),
                               ("--wait-idle", args.wait_idle, 0)):
        if value is not None and value < least:  # before minutes of warm-ups are spent
            ap.error(f"{flag} must be at least {least}, got {value}")

    if args.wait_idle > 0:
        wait_quiet(args.wait_idle)
    threads = blas_threads()
    if torch is not None:
        torch.set_num_threads(threads)
    info = machine_info(threads)
    n, rep, wu = args.batch, args.repeats, args.warmup
    info["loadavg_start"] = loadavg()
    info["cpu_busy_start"] = busy = cpu_busy()
    print(f"# bench_step  {info['date']}  commit {info['git_commit']}"
          f"{' (dirty)' if info['git_dirty'] else ''}")
    print(f"# {info['cpu']}, {info['cores_available']} cores; numpy {info['numpy']} "
          f"(BLAS threads {threads}); torch {info['torch']} (threads {info['torch_threads']})")
    print(f"# batch {n}, warm-up {wu}, repeats {rep}: times are median / min in ms")
    print(f"# OpenBLAS kernels: {info['blas_kernels']}")
    if (advice := blas_kernels.hint()) is not None:
        print(f"# note: {advice}")
    if busy is not None:
        print(f"# CPU busy before the run: {100 * busy:.0f}% of all cores"
              f"{'  <- OTHER PROCESSES ARE RUNNING: timings will be noisy' if busy > 0.1 else ''}")
    print()

    G, D, opt_g, opt_d, r_step, r_infer = rawgan_setup(n, args.seed)
    table, total_flop, infer_flop = flop_table(G, D, n)
    print("FLOP count (2 FLOP per MAC; GEMM/conv layers only):")
    print(table)
    print(f"train step total: {total_flop / 1e9:.2f} GFLOP;  G inference: "
          f"{infer_flop / 1e9:.2f} GFLOP  (batch {n})\n")

    wait_quiet(args.retry_wait)
    ceiling = gemm_ceiling(G, D, n, wait=args.retry_wait / 4)
    peak = max(c["gflops_best"] for c in ceiling)
    print("float32 GEMM ceiling (GFLOP/s, best of 5 undisturbed):          (M, K, N)"
          "               numpy  torch.mm")
    for c in ceiling:
        tm = c.get("torch_mm_gflops_best")
        print(f"  {c['gemm']:<55} {str(tuple(c['shape'])):<20} {c['gflops_best']:6.1f}"
              f"  {'n/a' if tm is None else f'{tm:6.1f}'}")
    print(f"  ceiling used below (% of the best NumPy GEMM): {peak:.1f} GFLOP/s\n")

    results: dict = {"args": {k: str(v) if isinstance(v, Path) else v
                              for k, v in vars(args).items()},
                     "machine": info, "flop": {"step": total_flop, "g_inference": infer_flop},
                     "gemm_ceiling": ceiling}

    layouts = {"auto": ("nchw", "channels_last"), "nchw": ("nchw",),
               "channels_last": ("channels_last",)}[args.torch_layout]
    benches = {"rawgan_step": r_step, "rawgan_infer": r_infer}
    if torch is not None:
        for lay in layouts:
            t_step, t_sim, t_infer = torch_setup(n, args.seed, lay == "channels_last")
            benches[f"torch_{lay}_step"] = t_step
            benches[f"torch_{lay}_infer"] = t_infer
            if not args.no_simultaneous:
                benches[f"torch_{lay}_simultaneous"] = t_sim
    res = bench_interleaved(benches, wu, rep, args.max_retries, args.retry_wait)
    noisy = {k: len(v["noisy_times"]) for k, v in res.items() if v["noisy_times"]}
    if noisy:
        print(f"# repeats set aside because other processes used >{100 * NOISY:.0f}% of the "
              f"cores: {noisy}" + ("" if all(v["clean"] for v in res.values()) else
                                   "; some rows include them (too few clean repeats)"))
    results["times"] = res

    def best(kind):
        cands = [(res[f"torch_{lay}_{kind}"]["median"], lay) for lay in layouts
                 if f"torch_{lay}_{kind}" in res]
        return min(cands) if cands else (None, None)

    rows = []
    for label, kind, flop in (("train step", "step", total_flop),
                              ("G inference", "infer", infer_flop)):
        r = res[f"rawgan_{kind}"]
        t_med, lay = best(kind)
        t = res.get(f"torch_{lay}_{kind}")
        rows.append((f"{label} (b={n})", fmt_t(r),
                     fmt_t(t) + (f" [{lay}]" if lay else ""),
                     "n/a" if t is None else f"{t_med / r['median']:.2f}",
                     f"{flop / 1e9:.1f}",
                     f"{flop / r['median'] / 1e9:.0f} "
                     f"({100 * flop / r['median'] / 1e9 / peak:.0f}%)",
                     "n/a" if t is None else
                     f"{flop / t_med / 1e9:.0f} ({100 * flop / t_med / 1e9 / peak:.0f}%)"))
    for lay in layouts:
        for kind, label in (("step", "train step"), ("infer", "G inference"),
                            ("simultaneous", "torch TF-form step (d)")):
            key = f"torch_{lay}_{kind}"
            if key in res:
                flop = infer_flop if kind == "infer" else total_flop if kind == "step" else None
                t = res[key]
                rows.append((f"  torch {lay}: {label}", "", fmt_t(t), "", "",
                             "", "" if flop is None else
                             f"{flop / t['median'] / 1e9:.0f} "
                             f"({100 * flop / t['median'] / 1e9 / peak:.0f}%)"))
    head = ("", "rawgan numpy", "torch CPU (best layout)", "torch/rawgan", "GFLOP",
            "rawgan GFLOP/s (% ceil)", "torch GFLOP/s (% ceil)")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    print("Results (ms, median / min; ratio > 1: rawgan faster):")
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    results["summary"] = {"ceiling_gflops": peak, "rows": [dict(zip(head, r, strict=True))
                                                           for r in rows]}

    if args.breakdown_steps > 0:
        for _ in range(3):  # redo a breakdown that other processes disturbed
            wait_quiet(args.retry_wait)
            bd = rawgan_breakdown(G, D, opt_g, opt_d, r_step, args.breakdown_steps)
            if bd["others_busy"] is None or bd["others_busy"] <= NOISY:
                break
        flops = step_flops(G, D, n)
        ob = bd["others_busy"]
        print(f"\nrawgan step breakdown (mean of {args.breakdown_steps} steps with timers: "
              f"{bd['total'] * 1e3:.1f} ms/step"
              + ("" if ob is None or ob <= NOISY else
                 f"; DISTURBED: other processes used {100 * ob:.0f}% of the cores") + "):")
        print(f"  {'phase':<7}{'model':<6}{'layer':<28}{'pass':<6}{'ms':>8}{'%':>6}"
              f"{'GFLOP':>8}{'GFLOP/s':>9}")
        accounted = small = 0.0
        n_small = 0
        out_rows = []
        for key, sec in sorted(bd["per"].items(), key=lambda kv: -kv[1]):
            accounted += sec
            f = flops.get(key, 0)
            out_rows.append({"phase": key[0], "model": key[1], "layer": key[2], "pass": key[3],
                             "seconds": sec, "flop": f})
            if sec < 0.005 * bd["total"]:  # under 0.5%: summed on one line
                small += sec
                n_small += 1
                continue
            gf = f"{f / 1e9:8.2f}{f / sec / 1e9:9.0f}" if f else ""
            print(f"  {key[0]:<7}{key[1]:<6}{key[2]:<28}{key[3]:<6}{sec * 1e3:8.1f}"
                  f"{100 * sec / bd['total']:6.1f}{gf}")
        print(f"  {f'{n_small} more entries, each under 0.5%':<47}{small * 1e3:8.1f}"
              f"{100 * small / bd['total']:6.1f}")
        other = bd["total"] - accounted
        print(f"  {'outside layers (noise, concatenate, zero_grad)':<47}{other * 1e3:8.1f}"
              f"{100 * other / bd['total']:6.1f}")
        per_pass = defaultdict(float)
        for key, sec in bd["per"].items():
            per_pass[key[3] or "loss"] += sec
        print("  by pass: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in per_pass.items()))
        results["rawgan_breakdown"] = {"total": bd["total"], "others_busy": ob,
                                       "rows": out_rows}

    info["loadavg_end"] = loadavg()
    info["cpu_busy_end"] = busy = cpu_busy()
    if busy is not None and busy > 0.1:
        print(f"\n# CPU busy after the run: {100 * busy:.0f}%: other processes were running")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(args.json) as tmp:
            tmp.write_text(json.dumps(results, indent=2, default=str))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
