"""benchmarks/gpu_session.sh, the one command a GPU session runs, checked without a GPU.

A session is lent a GPU for 15 minutes at most, so a stage that dies of a typo (an option the
CLI no longer has, a pytest selection that matches nothing) wastes the only run there may
be. Here the script runs end to end with ``PYTHON`` pointing at a stand-in that checks each
stage's command instead of running it: pytest selections must collect tests (the GPU
module through the CPU emulator's fake ``cupy``, so it imports here), ``rawgan train`` and
``bench_gpu.py`` must accept their arguments. Every stage must then report
rc=0 in summary.txt, and the files it leaves must fit the device tool's eight.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_session.sh"

STAND_IN = textwrap.dedent(r'''
    """Stands in for python in gpu_session.sh: checks a stage's command, runs no GPU work."""
    import os, re, subprocess, sys
    sys.path[:0] = [{repo!r}, {repo!r} + "/benchmarks"]
    args = sys.argv[1:]
    if args[:2] == ["-m", "pytest"]:  # the same selection, collected only
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")  # no GPU here: the simulator
        plugin = []
        if any(a.endswith("test_cupy_ops.py") for a in args):  # importable without CuPy
            plugin = ["-p", "emulated_cupy"]
            env["PYTHONPATH"] = {repo!r} + "/tests" + os.pathsep + env.get("PYTHONPATH", "")
            env["RAWGAN_EMU_CACHE"] = {cache!r}
        res = subprocess.run([sys.executable, "-m", "pytest", *plugin, *args[2:],
                              "--collect-only", "-p", "no:cacheprovider"],
                             capture_output=True, text=True, env=env)
        print(res.stdout[-3000:], res.stderr[-3000:])
        found = re.search(r"(\d+)(?:/\d+)? tests? (?:collected|selected)", res.stdout)
        sys.exit(0 if res.returncode == 0 and found and int(found.group(1)) > 0 else 1)
    if args[:2] == ["-m", "rawgan.cli"]:  # the CLI must take every option
        from rawgan import cli
        parsed, extra = cli.build_parser().parse_known_args(args[2:])
        sys.exit(1 if extra else 0)
    if args and args[0].endswith("bench_gpu.py"):  # its parser, then stop before the GPU
        import types
        sys.modules.setdefault("cupy", types.ModuleType("cupy"))  # imported, not used yet
        import bench_gpu
        class Parsed(Exception):
            pass
        def stop(name):
            raise Parsed
        bench_gpu.backends.get = stop
        try:
            bench_gpu.main(args[1:])
        except Parsed:
            sys.exit(0)
        sys.exit(1)
    if args[:1] == ["-c"]:  # the summary's version line: CuPy may be absent here
        sys.exit(0)
    sys.exit(f"gpu_session.sh ran python with arguments this check does not know: {{args}}")
''')


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_every_stage_of_the_gpu_session_runs_its_commands(tmp_path):
    stand_in = tmp_path / "stand_in.py"
    stand_in.write_text(STAND_IN.format(repo=str(REPO), cache=str(tmp_path / "emu")))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    py = bindir / "python-stand-in"
    py.write_text(f"#!/bin/sh\nexec {sys.executable} {stand_in} \"$@\"\n")
    sanitizer = bindir / "compute-sanitizer"  # present, so the last stage runs too
    sanitizer.write_text("#!/bin/sh\nexit 0\n")
    for f in (py, sanitizer):
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": str(py), "RAWGAN_COMMIT": "test",
           "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    res = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    stages = dict(re.findall(r"^(\S+) rc=(\d+) \d+s$", summary, re.M))
    assert stages == {"cupy-tests": "0", "numba-tests": "0", "train-graphed": "0",
                      "bench": "0", "sanitizer": "0"}, summary + res.stdout[-4000:]
    left = [p for p in out.rglob("*") if p.is_file()]
    assert len(left) + 1 <= 8, left  # + bench-gpu.json, which a real run writes


def test_the_stage_timeouts_fit_the_device_call():
    """The stages' own timeouts add up to what the header promises (555 s), and with the 5 s
    each killed stage may take on top, inside the 590 s the header's
    ``run(..., timeout_s=590)`` allows (the device allows 600 s per call)."""
    text = SCRIPT.read_text()
    limits = [int(s) for s in re.findall(r"^\s*(?:\S+=\S+ )?stage \S+ (\d+) ", text, re.M)]
    assert len(limits) == 5
    assert sum(limits) == 555 and "555 s" in text and "timeout_s=590" in text
    assert 'timeout -s INT -k 5 "$limit"' in text and sum(limits) + 5 * len(limits) < 590
