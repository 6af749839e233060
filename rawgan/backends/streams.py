"""Random streams cut into pieces: skip a PCG64 generator ahead by a number of uniforms.

A dropout mask of N rows is ``rng.random((N, ...))``: one sequential draw. To draw it on
several workers (numpy_ops) or several MPI ranks (rawgan.distributed) and still get exactly
the numbers, and the final generator state, of that one draw, each piece starts from a copy
of the generator skipped past the numbers before it. PCG64 jumps ahead in O(log m) steps
(``PCG64.advance``); the only subtlety is float32, which takes 32 bits at a time and keeps
the spare half of a 64-bit output in the generator's state.

A backend that computes the numbers itself (worker threads, a GPU kernel) first CLAIMS them
(:func:`claim_uniforms`): the generator is moved past them at once, atomically with respect
to other threads drawing from it, so two threads sharing one generator never get the same
numbers (as with ``Generator.random``, which holds the generator's lock while it draws).
"""

from __future__ import annotations

import numpy as np


def skip_uniforms(bg: np.random.PCG64, m: int, dtype) -> None:
    """Advance PCG64 ``bg`` past ``m`` uniforms of ``dtype`` exactly as ``Generator.random``
    drawing them would leave it, its 32-bit buffer (``has_uint32``, ``uinteger``) included:
    a float64 takes one 64-bit output and leaves the buffer alone; a float32 takes 32 bits,
    the buffered high half of the last output first, else the low half of a new output
    (whose high half is then buffered). O(log m): PCG64.advance jumps."""
    if m <= 0:
        return
    st = bg.state
    has, held = st["has_uint32"], st["uinteger"]
    if np.dtype(dtype) == np.float64:
        bg.advance(m)  # (advance clears the buffer: put it back)
        st = bg.state
        st["has_uint32"], st["uinteger"] = has, held
        bg.state = st
        return
    if has:  # the buffered half is the next float32 (its value stays behind, stale)
        m -= 1
        st["has_uint32"] = 0
        bg.state = st
    pairs, odd = divmod(m, 2)
    if pairs:
        bg.advance(pairs - 1)
        v = int(bg.random_raw())  # the last pair: low half, then the buffered high half
        st = bg.state
        st["has_uint32"], st["uinteger"] = 0, v >> 32
        bg.state = st
    if odd:
        v = int(bg.random_raw())
        st = bg.state
        st["has_uint32"], st["uinteger"] = 1, v >> 32
        bg.state = st


def claim_uniforms(bg: np.random.PCG64, m: int, dtype) -> dict:
    """Take the next ``m`` uniforms of ``dtype`` from PCG64 ``bg`` for the caller to compute
    itself: returns the state they start from (``bg.state`` before them) and leaves ``bg``
    past them, where ``Generator.random`` drawing them would.

    Atomic with respect to other threads: the end state is computed on a copy, then set under
    ``bg.lock`` (the lock ``Generator`` methods hold while they draw) only if ``bg`` has not
    moved meanwhile, else the claim starts again from where the other draw left it."""
    while True:
        start = bg.state
        end = np.random.PCG64(0)  # (a seed: no OS entropy; its state is replaced)
        end.state = start
        skip_uniforms(end, m, dtype)
        with bg.lock:
            if bg.state == start:
                bg.state = end.state
                return start
