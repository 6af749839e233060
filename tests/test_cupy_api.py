"""rawgan speaks real CuPy's API, checked without a GPU (CuPy imports without a driver).

1. Every ``cupy.X.Y`` that rawgan's GPU code, the GPU benchmarks and the GPU tests name exists
   in CuPy, and every keyword argument they pass is one CuPy's function takes.
2. The CPU emulator's fake CuPy (``tests/test_kernels_compile.py``: FakeCupy, its streams,
   graphs, events, pools, modules and kernels) takes no keyword that real CuPy does not: code
   that passes ``stream=`` to a kernel launch, say, would run in the emulator and fail on the
   GPU. The fake's methods must exist on the real classes with those parameter names.
   Together with the emulator tests (which run the backend's code against the fake, so the
   code calls nothing the fake lacks), this covers the methods called on CuPy's objects too.

Real CuPy is not installed beside rawgan here (the ``gpu`` tests would then try to use it and
find no GPU); CI puts ``cupy-cuda13x`` (the GPU image's build) in a folder of its own named by
``RAWGAN_CUPY_PATH``, and the real module is only imported in a subprocess with that folder on
its path. Skipped when neither that folder nor an importable CuPy exists.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import test_kernels_compile as emu

REPO = Path(__file__).resolve().parents[1]
#: the files whose CuPy calls are checked: what runs on a GPU machine
GPU_FILES = sorted([*REPO.glob("rawgan/**/*.py"), *REPO.glob("benchmarks/*.py"),
                    REPO / "tests/test_cupy_ops.py", REPO / "tests/test_graphed.py"])
#: expressions that ARE the cupy module in those files (``cp = ops.xp``, ``_cupy()``, ...)
CUPY_ROOTS = {"cp", "cupy", "_cp", "_cupy()", "ops._cupy()", "cupy_ops._cupy()", "ops.xp",
              "self.ops.xp", "self.cp", "cupy_ops.xp"}
#: names that are cupy.cuda in one file (``cuda = self.cp.cuda``)
CUDA_ALIASES = {"benchmarks/profile_step.py": "cuda"}

#: the fake's classes and the real CuPy classes they stand for
FAKE_CLASSES = {
    "_EmuModule": "RawModule",
    "_EmuKernel": "RawKernel",
    "_FakeStream": "cuda.Stream",
    "_FakeGraph": "cuda.graph.Graph",
    "_FakeEvent": "cuda.Event",
    "_FakePool": "cuda.MemoryPool",
}
#: the fake's own helpers, not CuPy API
FAKE_ONLY = {"run", "set_schedule", "pool_of", "check_guards", "GUARD", "cache_dir",
             "launches", "recording", "graphs", "schedule", "active_pool", "nodes", "fake",
             "lib", "names", "fn", "name", "t"}


def _cupy_env() -> dict[str, str] | None:
    """The environment of a subprocess that imports real CuPy, or None when there is none."""
    side = os.environ.get("RAWGAN_CUPY_PATH")
    if side:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [side, env.get("PYTHONPATH")]))
        return env
    if importlib.util.find_spec("cupy") is not None:
        return dict(os.environ)
    return None


CUPY_ENV = _cupy_env()
pytestmark = pytest.mark.skipif(CUPY_ENV is None, reason="no real CuPy: set RAWGAN_CUPY_PATH "
                                "to a folder with cupy-cuda13x (pip install --target)")

#: run in the subprocess: for each dotted name, the parameter names CuPy's callable takes
#: (None: takes **kwargs it does not document; "missing": no such name)
_RESOLVE = r'''
import inspect, json, re, sys
import cupy

def resolve(path):
    obj = cupy
    for part in path.split("."):
        if not hasattr(obj, part):
            return "missing"
        obj = getattr(obj, part)
    return obj

def params(obj):
    if not callable(obj):
        return []
    try:
        sig = inspect.signature(obj)
        names = [p.name for p in sig.parameters.values()]
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return names
    except (TypeError, ValueError):
        pass
    # Cython functions: the signatures at the top of the docstring, as
    # "name(self, str code=None, *, shared_mem=0)"; a documented one beats "**kwargs"
    lines = (getattr(obj, "__doc__", None) or "").strip().splitlines()[:4]
    sigs = []
    for line in lines:
        m = re.match(r"\s*[\w.]+\((.*)\)\s*(->.*)?$", line.replace("\\*", "*"))
        if m:
            sigs.append([re.split(r"\s*=", a.strip())[0].split()[-1].lstrip("*")
                         for a in m.group(1).split(",") if a.strip() not in ("", "*", "/")])
    plain = [s for s in sigs if "kwargs" not in s]
    if plain:
        return sorted({n for s in plain for n in s})
    return None

out = {}
for path in json.loads(sys.stdin.read()):
    obj = resolve(path)
    out[path] = obj if obj == "missing" else params(obj)
print(json.dumps(out))
'''


def _real_params(paths: set[str]) -> dict[str, list[str] | None | str]:
    res = subprocess.run([sys.executable, "-c", _RESOLVE], input=json.dumps(sorted(paths)),
                         capture_output=True, text=True, env=CUPY_ENV, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _cupy_calls() -> dict[str, set[str]]:
    """Every dotted cupy name the GPU files use -> the keyword names passed to it."""
    found: dict[str, set[str]] = {}

    def dotted(node: ast.AST, roots: dict[str, str]) -> str | None:
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
            text = ast.unparse(node)
            if text in roots:
                prefix = roots[text]
                return ".".join([prefix, *reversed(parts)] if prefix else reversed(parts))
        return None

    for path in GPU_FILES:
        rel = path.relative_to(REPO).as_posix()
        roots = dict.fromkeys(CUPY_ROOTS, "")
        if rel in CUDA_ALIASES:
            roots[CUDA_ALIASES[rel]] = "cuda"
        tree = ast.parse(path.read_text())
        calls = {id(n.func): n for n in ast.walk(tree) if isinstance(n, ast.Call)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            name = dotted(node, roots)
            if name is None:
                continue
            kws = found.setdefault(name, set())
            call = calls.get(id(node))
            if call is not None:
                kws.update(k.arg for k in call.keywords if k.arg is not None)
    # a chain's prefixes are names too (cp.cuda.Stream -> cp.cuda); keep the longest only
    return {k: v for k, v in found.items()
            if v or not any(o.startswith(k + ".") for o in found)}


def _api_problems(used: dict, who: str) -> list[str]:
    """What ``used`` (cupy name -> keyword / parameter names) takes that real CuPy lacks."""
    real = _real_params(set(used))
    problems = []
    for name, params in sorted(used.items()):
        got = real[name]
        if got == "missing":
            problems.append(f"{who} uses cupy.{name}; real CuPy has none")
        elif got is not None and set(params) - set(got):
            problems.append(f"{who} passes {sorted(set(params) - set(got))} to cupy.{name}, "
                            f"which takes {got}")
    return problems


def test_every_cupy_name_rawgan_uses_exists_with_those_keywords():
    calls = _cupy_calls()
    assert "RawModule" in calls and "cuda.Stream" in calls, sorted(calls)  # the scan works
    problems = _api_problems(calls, "rawgan")
    assert not problems, "\n".join(problems)


def _fake_surface() -> dict[str, list[str]]:
    """The fake's public callables and attributes -> parameter names, keyed by the real
    CuPy name they stand for."""
    surface: dict[str, list[str]] = {}

    def add(real: str, obj) -> None:
        try:
            surface[real] = [p for p in inspect.signature(obj).parameters
                             if p not in ("self", "fake", "a", "kw", "args", "kwargs")]
        except (TypeError, ValueError):
            surface[real] = []

    for fake_name, real_name in FAKE_CLASSES.items():
        cls = getattr(emu, fake_name)
        for attr, value in vars(cls).items():
            if attr.startswith("_") and attr != "__call__" or attr in FAKE_ONLY:
                continue
            add(f"{real_name}.{attr}", value)
    fake = emu.FakeCupy(Path("/nonexistent"))
    for attr, value in vars(type(fake)).items():
        if not attr.startswith("_") and attr not in FAKE_ONLY and callable(value):
            add(attr, value)
    for attr, value in vars(fake.cuda).items():
        add(f"cuda.{attr}", value)
    for attr, value in vars(fake.cuda.runtime).items():
        add(f"cuda.runtime.{attr}", value)
    for attr, value in vars(fake.random).items():
        add(f"random.{attr}", value)
    return surface


def test_the_emulators_fake_cupy_takes_nothing_real_cupy_does_not():
    surface = _fake_surface()
    assert "cuda.Stream.begin_capture" in surface and "RawKernel.__call__" in surface
    problems = _api_problems(surface, "the emulator's fake")
    assert not problems, "\n".join(problems)
