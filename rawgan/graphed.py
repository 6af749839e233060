"""The whole GAN training step as ONE CUDA graph (CuPy backend).

A DCGAN step is about a hundred small kernels; at small batches the GPU waits on Python and
on launch latency rather than on arithmetic. CUDA graphs (``cudaStreamBeginCapture``) record
the step's launches once and replay them with a single launch. A graph replays EXACTLY what
was recorded: the same kernels, the same pointers, the same scalar arguments. So everything
that changes from step to step must live in device memory that the host rewrites between
replays, and the step must never touch the host while it is recorded:

==========================  ===============================================================
what changes per step       where it lives
==========================  ===============================================================
the real batches            ``real`` halves of the static ``joined`` buffers (host copies in)
the noise z                 drawn on the device (Philox, ``cupy_ops.standard_normal``)
dropout masks               the same Philox stream (``cupy_ops.step_rng``): counter offset
                            ``(step << 16) + draw``, ``step << 16`` read from device memory
Adam's bias correction      ``alphas``: alpha_t = lr sqrt(1 - b2^t) / (1 - b1^t), one per
                            optimizer step, written by the host, read by the Adam kernel
losses and D's outputs      device arrays written by the graph, read after each replay
==========================  ===============================================================

The step itself (:meth:`GraphedStep._body`) is :func:`rawgan.gan.train_step` written with
rawgan kernels only: ``fake = G(z)``; D on ``[real; fake]`` (the fake half filled by a copy
kernel, not ``concatenate``); the losses and their gradients by losses.cu (no host check of
the logits: a NaN shows in the loss read after the replay); gradients zeroed in one launch
and accumulated by rawgan kernels; one multi-tensor optimizer launch per model. Memory comes
from a private CuPy memory pool, so the buffers the graph was recorded with are never handed
to anybody else (nothing allocates from that pool after the capture, not even when the
layers' caches are replaced by an eager forward pass between steps: the freed blocks stay
in the pool, where the graph keeps using them); the first ``warmup`` steps run eagerly on
that pool (they compile the kernels and upload the optimizer's pointer tables, which cannot
happen during capture), the next one is captured and launched, every later one only replays.

Limits: the CuPy backend only; a discriminator without batch normalization (the DCGAN and
MLP critics); the models, the optimizers' state and the batch size must not change after
capture (build a new GraphedStep after loading a checkpoint). The random numbers differ from
the eager step's (host noise Generator, NumPy's dropout masks): same distribution, other
draws. Verified in the CPU emulator (tests/test_graphed.py: replays equal eager steps bit for
bit, the body equals ``gan.train_step``); on a GPU by ``tests/test_cupy_ops.py -m gpu``.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Sequence

import numpy as np

from . import gan
from .optim import Adam


class GraphedStep:
    """``step(reals) -> StepStats``: one training step (``len(reals)`` critic updates, then one
    generator update), the same algorithm as :func:`rawgan.gan.train_step`, replayed as one
    CUDA graph once captured.

    Parameters
    ----------
    G, D : Sequential on the ``cupy`` backend (D without batch normalization)
    opt_g, opt_d : the optimizers (Adam takes its per-step alpha from device memory)
    kind : the GAN loss (``bce``, ``minimax``, ``wgan``, ``hinge``, ``lsgan``)
    batch_size, d_steps : the shape of every call: ``d_steps`` real batches of ``batch_size``
    noise_dim : G's input width
    seed : the key of the step's Philox stream (noise and dropout)
    start_step : steps already taken (a resumed run): the Philox counters continue from there
    capture : False runs every step eagerly (the same kernels; for tests and debugging)
    warmup : eager steps before the capture (>= 1 when capturing: kernels compile, tables
             upload)
    """

    def __init__(self, G, D, opt_g, opt_d, kind: str, batch_size: int, d_steps: int,
                 noise_dim: int, seed: int, *, start_step: int = 0, capture: bool = True,
                 warmup: int = 2) -> None:
        ops = G.ops
        if getattr(ops, "name", None) != "cupy" or D.ops is not ops:
            raise ValueError("GraphedStep needs G and D on the 'cupy' backend (CUDA graphs "
                             f"are a CuPy feature); got {getattr(ops, 'name', ops)!r}")
        if gan._has_batchnorm(D):
            raise ValueError("GraphedStep: a discriminator with batch normalization is not "
                             "supported (its real and fake passes must stay separate)")
        if batch_size < 1 or d_steps < 1 or warmup < 0:
            raise ValueError(f"GraphedStep: need batch_size >= 1, d_steps >= 1, warmup >= 0; "
                             f"got {batch_size}, {d_steps}, {warmup}")
        if capture and warmup < 1:
            raise ValueError("GraphedStep: capture needs warmup >= 1 (the eager steps compile "
                             "the kernels and upload the optimizers' pointer tables, which a "
                             "capture cannot do)")
        ops._loss_kind(kind)  # an unknown kind fails here, not inside the graph
        if not (G.built and D.built):
            raise ValueError("GraphedStep: G and D must be built (their shapes fix the buffers)")
        self.G, self.D, self.opt_g, self.opt_d, self.kind = G, D, opt_g, opt_d, kind
        self.ops, self.batch_size, self.d_steps = ops, int(batch_size), int(d_steps)
        self.capture, self.warmup = bool(capture), int(warmup)
        self.step_index = int(start_step)
        self._eager_left = self.warmup
        cp = ops.xp
        self.dtype = np.dtype(D.dtype)
        self.image_shape = tuple(D.input_shape)
        b = self.batch_size
        # static inputs: [real; fake] per critic step, and its noise
        self.joined = [cp.empty((2 * b, *self.image_shape), self.dtype) for _ in range(d_steps)]
        self.z = [cp.empty((b, int(noise_dim)), self.dtype) for _ in range(d_steps)]
        self.alphas = cp.empty((d_steps + 1,), self.dtype)   # per optimizer step: D's, then G's
        self.base = cp.zeros((1,), np.uint64)                 # the Philox offset base of a step
        self.rng = ops.StepRng(seed, self.base)
        self._dlogits = None      # (2B, ...) gradient wrt D's logits, allocated on first use
        self._out = None          # the body's device outputs of the last (recorded) run
        self.graph = None
        self._stream = self._pool = None
        self.launches = 0         # graph replays so far (0: not captured yet)
        self._pool_steps = 0      # steps run before the capture (the first: default pool)

    # -- the step, rawgan kernels only --------------------------------------------------------
    def _body(self):
        """Run (or, under capture, record) one step. Returns its device outputs."""
        ops, G, D, b, kind = self.ops, self.G, self.D, self.batch_size, self.kind
        with ops.step_rng(self.rng):
            for i in range(self.d_steps):
                ops.standard_normal(self.z[i], self.rng)
                fake = G.forward(self.z[i], training=True)
                ops.copy_into(self.joined[i][b:], fake)
                D.zero_grad()
                logits = D.forward(self.joined[i], training=True)
                real_logits, fake_logits = logits[:b], logits[b:]
                d_loss, d_r, d_f = ops.gan_discriminator_loss(kind, real_logits, fake_logits)
                if self._dlogits is None:
                    self._dlogits = ops.xp.empty(logits.shape, logits.dtype)
                ops.copy_into(self._dlogits[:b], d_r)
                ops.copy_into(self._dlogits[b:], d_f)
                D.backward(self._dlogits, input_grad=False)
                self._optimizer_step(self.opt_d, i)
            # generator step through the updated critic, reusing G's forward pass and cache
            g_fake_logits = D.forward(fake, training=True)
            g_loss, d_gf = ops.gan_generator_loss(kind, g_fake_logits)
            dx = D.backward(d_gf, param_grads=False)
            G.zero_grad()
            G.backward(dx, input_grad=False)
            self._optimizer_step(self.opt_g, self.d_steps)
        return d_loss, g_loss, real_logits, fake_logits

    def _optimizer_step(self, opt, slot: int) -> None:
        if isinstance(opt, Adam):
            opt.alpha_ref = self.alphas[slot:slot + 1]
        try:
            opt.step()
        finally:
            if isinstance(opt, Adam):
                opt.alpha_ref = None

    # -- per-step inputs, written by the host before a run or a replay -----------------------
    def _prepare(self, reals: Sequence) -> None:
        ops, b = self.ops, self.batch_size
        cp = ops.xp
        if len(reals) != self.d_steps:
            raise ValueError(f"GraphedStep: expected {self.d_steps} real batches, got "
                             f"{len(reals)}")
        # the host writes first, then the copies (kernels): a profiler can hold the stream
        # from the first launch on without a host write waiting behind it
        alphas = np.zeros(self.d_steps + 1, dtype=self.dtype)
        for i in range(self.d_steps):
            if isinstance(self.opt_d, Adam):
                alphas[i] = self.opt_d.alpha_at(self.opt_d.iterations + 1 + i)
        if isinstance(self.opt_g, Adam):
            alphas[self.d_steps] = self.opt_g.alpha_at(self.opt_g.iterations + 1)
        self._set(self.alphas, alphas, self._stream)
        self._set(self.base, np.array([self.step_index << 16], dtype=np.uint64), self._stream)
        for i, real in enumerate(reals):
            want = (b, *self.image_shape)
            if tuple(real.shape) != want:
                raise ValueError(f"GraphedStep: real batch {i} has shape {tuple(real.shape)}, "
                                 f"expected {want} (a graph has fixed shapes)")
            dst = self.joined[i][:b]
            if isinstance(real, np.ndarray) and not isinstance(dst, np.ndarray):
                # host -> device on the step's stream (a copy on another stream would not be
                # ordered before the replay: the step's stream is non-blocking)
                dst.set(np.ascontiguousarray(real, dtype=self.dtype), stream=self._stream)
            else:
                ops.copy_into(dst, cp.ascontiguousarray(real.astype(self.dtype, copy=False)))

    @staticmethod
    def _set(dst, host: np.ndarray, stream) -> None:
        if isinstance(dst, np.ndarray):   # the CPU emulator's arrays
            dst[...] = host
        else:
            dst.set(host, stream=stream)

    # -- running ----------------------------------------------------------------------------
    def __call__(self, reals: Sequence) -> gan.StepStats:
        """One training step on ``reals`` (``d_steps`` batches of ``batch_size``)."""
        cp = self.ops.xp
        if self._pool is None:
            self._pool = cp.cuda.MemoryPool()
            self._stream = cp.cuda.Stream(non_blocking=True)
        ready = cp.cuda.get_current_stream().record()  # the caller's work (e.g. its uploads)
        with self._stream:
            self._stream.wait_event(ready)                 # ... comes before this step
            if self.graph is not None:                     # replay: nothing is allocated, so
                self._prepare(reals)                       # the pool's blocks stay the graph's
                self.graph.launch(stream=self._stream)
                self.opt_d.iterations += self.d_steps      # (the body's host bookkeeping)
                self.opt_g.iterations += 1
                self.launches += 1
            else:
                # The first step allocates what outlives this object: the optimizers' slots
                # and the pointer tables cupy_ops caches. Those come from the default pool,
                # since CuPy frees a pool's memory when the pool dies, live arrays or not;
                # every later step's buffers from the private pool, kept as long as the graph.
                first = self._pool_steps == 0 and not (self.capture and self._eager_left == 0)
                alloc = (contextlib.nullcontext() if first
                         else cp.cuda.using_allocator(self._pool.malloc))
                with alloc:
                    self._prepare(reals)
                    if self.capture and self._eager_left == 0:   # record, run the recording
                        self._record()
                        self.graph.launch(stream=self._stream)
                        self.launches += 1
                    else:                                  # eager (warm-up, or capture=False)
                        self._out = self._body()
                        self._eager_left = max(0, self._eager_left - 1)
                self._pool_steps += 1
        self.step_index += 1
        return self._stats()

    def _record(self) -> None:
        """Capture one step. A capture that fails leaves nothing behind: the flag that
        guards uploads is reset, the body's own error is the one raised (not the invalidated
        capture's), and the optimizers' step counts (all the host moved on: nothing recorded
        ran) are put back, so the next call captures again from the same state."""
        ops = self.ops
        self._stream.synchronize()
        iterations = self.opt_d.iterations, self.opt_g.iterations
        gc.collect()  # no collection (a stray CuPy object freed) in the middle of the capture
        gc_was_on = gc.isenabled()
        gc.disable()
        ops._CAPTURING = True
        try:
            self._stream.begin_capture()
            try:
                out = self._body()
            except BaseException:
                with contextlib.suppress(Exception):  # end the capture, keep the body's error
                    self._stream.end_capture()
                raise
            graph = self._stream.end_capture()
        except BaseException:
            self.opt_d.iterations, self.opt_g.iterations = iterations
            raise
        finally:
            ops._CAPTURING = False
            if gc_was_on:
                gc.enable()
        self._out, self.graph = out, graph
        # the pointer tables the graph's multi-tensor launches read: held here, so cupy_ops
        # dropping its cache (it keeps 64) never frees memory a replay still reads
        self._tables = tuple(ops._mt_tables.values())

    def _stats(self) -> gan.StepStats:
        d_loss, g_loss, real_logits, fake_logits = self._out
        to = self.ops.to_numpy
        if self._stream is not None:
            self._stream.synchronize()
        real, fake = to(real_logits).astype(np.float64), to(fake_logits).astype(np.float64)
        if self.kind in ("bce", "minimax"):
            d_real, d_fake = _sigmoid(real).mean(), _sigmoid(fake).mean()
        else:
            d_real, d_fake = real.mean(), fake.mean()
        return gan.StepStats(d_loss=float(to(d_loss)), g_loss=float(to(g_loss)),
                             d_real=float(d_real), d_fake=float(d_fake))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
