"""Random streams cut into pieces: skip a PCG64 generator ahead by a number of uniforms.

A dropout mask of N rows is ``rng.random((N, ...))``: one sequential draw. To draw it on
several workers (numpy_ops) or several MPI ranks (rawgan.distributed) and still get exactly
the numbers, and the final generator state, of that one draw, each piece starts from a copy
of the generator skipped past the numbers before it. PCG64 jumps ahead in O(log m) steps
(``PCG64.advance``); the only subtlety is float32, which takes 32 bits at a time and keeps
the spare half of a 64-bit output in the generator's state.
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
