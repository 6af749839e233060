"""Recorder cost: plain train_step vs after a Recorder was used and exited (off) vs on.

Blocks of K steps, variants interleaved (plain, off, on) to share the machine's load drift;
reports the median seconds per step over R blocks, and the ratios."""
import os
import statistics
import sys
import time

import numpy as np

from rawgan import gan, models, optim
from rawgan.inspect import Recorder

model = sys.argv[1] if len(sys.argv) > 1 else "mlp"
R = int(sys.argv[2]) if len(sys.argv) > 2 else 7
K = int(sys.argv[3]) if len(sys.argv) > 3 else 5
batch = 64


def session(seed=0):
    G, D = models.build(model, seed=seed)
    og, od = optim.Adam(G, lr=1e-4), optim.Adam(D, lr=1e-4)
    rng = np.random.default_rng(seed)
    real = rng.uniform(-1, 1, (batch, 28, 28, 1)).astype(np.float32)
    noise = gan.gaussian_noise(np.random.default_rng(seed + 1), 100)
    return G, D, og, od, real, noise


plain = session()
plain2 = session()  # an A/A control: the same as plain, to show the noise level
off = session()
on = session()
# "off": a recorder was entered and exited on these objects (the wrappers were removed)
with Recorder({"generator": off[0], "discriminator": off[1]}, [off[2], off[3]]) as r:
    gan.train_step(off[0], off[1], off[2], off[3], "bce", [off[4]], off[5])
assert all("forward" not in vars(layer) for layer in off[0].layers + off[1].layers)
rec_on = Recorder({"generator": on[0], "discriminator": on[1]}, [on[2], on[3]])


def block(s, rec=None):
    G, D, og, od, real, noise = s
    t0 = time.perf_counter()
    for _ in range(K):
        if rec is not None:
            rec.begin_step()
        gan.train_step(G, D, og, od, "bce", [real], noise)
    return (time.perf_counter() - t0) / K


for s in (plain, plain2, off):  # warm-up (workspace buffers, BLAS threads)
    block(s)
with rec_on:
    block(on, rec_on)
times = {"plain": [], "plain2": [], "off": [], "on": []}
order = ["plain", "plain2", "off", "on"]
for i in range(R):
    for name in order[i % 4:] + order[:i % 4]:  # rotate the order: no position bias
        if name == "on":
            with rec_on:
                times["on"].append(block(on, rec_on))
        else:
            times[name].append(block({"plain": plain, "plain2": plain2, "off": off}[name]))
med = {k: statistics.median(v) for k, v in times.items()}
print(f"model {model}, batch {batch}, {R} blocks of {K} steps, load avg {os.getloadavg()}")
for k, v in times.items():
    print(f"  {k:5s} median {1e3 * med[k]:8.2f} ms/step   (min {1e3 * min(v):.2f}, "
          f"max {1e3 * max(v):.2f})")
print(f"  plain2 / plain = {med['plain2'] / med['plain']:.4f} (A/A noise)   off / plain = "
      f"{med['off'] / med['plain']:.4f}   on / plain = {med['on'] / med['plain']:.3f}")
