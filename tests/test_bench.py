"""``rawgan bench`` harness: a --quick run writes the documented JSON, --compare flags what it
should, --plot draws, and the FLOP formulas match what numpy_ops computes. Nothing here
asserts anything about speed (DESIGN.md: speed is measured in benchmarks, never asserted)."""

from __future__ import annotations

import copy
import json
import types

import pytest

from rawgan import bench, models
from rawgan.backends import numpy_ops


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One ``rawgan bench --quick`` run for the module: (path, result, stdout)."""
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    # one thread: a smoke test that stays quick even when other processes load the machine
    code = bench.main(["--quick", "--threads", "1", "--json", str(out)])
    assert code == 0
    return out, json.loads(out.read_text())


def test_quick_json_has_the_documented_keys(quick):
    _, res = quick
    for key in ("schema", "date", "machine", "device", "versions", "git", "loadavg_before",
                "loadavg_after", "cpu_busy_before", "cpu_busy_after", "args", "conventions",
                "ceilings", "rows"):
        assert key in res, key
    assert res["schema"] == bench.SCHEMA
    assert res["device"] == "cpu"
    assert {"cpu", "cores"} <= set(res["machine"])
    assert {"python", "numpy", "numpy_blas", "torch", "rawgan"} <= set(res["versions"])
    assert "commit" in res["git"]
    assert res["args"]["quick"] is True and res["args"]["batch"] == [bench.QUICK_BATCH]
    ceil = res["ceilings"]["numpy"]
    assert ceil["matmul_gflops"] > 0 and ceil["copy_gbps"] > 0
    ops_seen = {r["op"] for r in res["rows"]}
    assert set(bench.OPS) - {"step"} <= ops_seen
    if bench.load_script("bench_step") is not None:
        assert "step" in ops_seen
    for row in res["rows"]:
        for key in ("key", "op", "pass", "layer", "batch", "shape", "backend", "metric", "flop",
                    "time", "rate", "pct_of_ceiling", "reference", "ratio_vs_reference"):
            assert key in row, (row["key"], key)
        assert row["backend"] == "numpy"
        t = row["time"]
        assert 0 < t["min"] <= t["median"] and t["mad"] >= 0 and t["n"] >= 3
        assert row["rate"] > 0
        if row["op"] in bench.GEMM_OPS:
            assert row["metric"] == "GFLOP/s" and 0 < row["flop_useful"] <= row["flop"]
        elif row["op"] == "step":
            assert row["metric"] == "images/s"
        else:
            assert row["metric"] == "GB/s" and row["bytes"] > 0
        if row["reference"] is not None:
            assert row["ratio_vs_reference"] == pytest.approx(
                row["reference"]["time"]["median"] / t["median"])
        if row["op"] != "step" and row["references"]:  # the twin was checked before timing
            assert row["twin"]["ok"], row["twin"]


def test_cases_cover_every_dcgan_layer_and_pass():
    cases = bench.dcgan_cases(batches=(64, 256))
    keys = {c.key for c in cases}
    assert len(keys) == len(cases)
    G, D = models.build("dcgan", seed=0)
    gemm_layers = [layer for layer in [*G.layers, *D.layers]
                   if type(layer).__name__ in ("Dense", "Conv2D", "Conv2DTranspose")]
    assert sum(c.op in bench.GEMM_OPS for c in cases) == len(gemm_layers) * 3 * 2


def test_nominal_macs_match_bench_step_table():
    """benchmarks/README.md's per-sample MACs (im2col, padding taps included)."""
    by_layer = {c.layer: c.flop // 2 for c in bench.dcgan_cases(batches=(1,))
                if c.pass_ == "fwd" and c.op in bench.GEMM_OPS}
    assert by_layer == {"G.dense": 1_254_400, "G.conv2d_transpose": 40_140_800,
                        "G.conv2d_transpose_1": 10_035_200, "G.conv2d_transpose_2": 313_600,
                        "D.conv2d": 313_600, "D.conv2d_1": 10_035_200, "D.dense": 6_272}


@pytest.mark.parametrize("h,k,s,padding,transpose", [
    (14, 5, 2, "same", False), (28, 5, 2, "same", False), (7, 5, 1, "same", True),
    (7, 5, 2, "same", True), (9, 3, 2, 1, False), (10, 4, 3, "valid", False),
    (5, 3, 2, "valid", True)])
def test_useful_macs_equal_numpy_ops_tap_groups(h, k, s, padding, transpose):
    """The useful-MAC count equals the MACs of numpy_ops' padding-free tap groups."""
    ci, co = 3, 4
    nominal, useful, (ho, wo) = bench.conv_macs(2, h, h, ci, co, k, s, padding, transpose)
    if transpose:  # the adjoint conv: input (ho, wo), output (h, h)
        _, _, pads = numpy_ops.conv_transpose_geometry(h, h, k, k, s, padding)
        out_hw, in_hw = (h, h), (ho, wo)
    else:
        _, _, pads = numpy_ops.conv_geometry(h, h, k, k, s, padding)
        out_hw, in_hw = (ho, wo), (h, h)
    groups = numpy_ops._groups(out_hw, in_hw, (k, k), (s, s), pads)
    taps = sum((i1 - i0) * (j1 - j0) * max(0, a1 - a0) * max(0, b1 - b0)
               for i0, i1, a0, a1, j0, j1, b0, b1 in groups)
    assert useful == 2 * ci * co * taps
    assert nominal == 2 * out_hw[0] * out_hw[1] * k * k * ci * co


def test_compare_with_itself_flags_nothing(quick, capsys):
    path, res = quick
    summary = bench.compare(res, res, out=lambda *a: None)
    assert summary["compared"] == len(res["rows"])
    assert summary["regressions"] == [] and summary["faster"] == []
    assert bench.main(["--from", str(path), "--compare", str(path),
                       "--fail-on-regression"]) == 0
    assert "0 regression(s)" in capsys.readouterr().out


def test_compare_flags_a_three_times_slower_run(quick, tmp_path, capsys):
    _, res = quick
    res = copy.deepcopy(res)
    for row in res["rows"]:  # a quiet baseline: the noise threshold is then the 5% floor
        row["time"]["mad"] = 0.01 * row["time"]["median"]
    slow = copy.deepcopy(res)
    for row in slow["rows"]:
        for key in ("median", "min", "mad"):
            row["time"][key] *= 3
    path, slow_path = tmp_path / "base.json", tmp_path / "slow.json"
    path.write_text(json.dumps(res))
    slow_path.write_text(json.dumps(slow))
    summary = bench.compare(res, slow, out=lambda *a: None)
    assert len(summary["regressions"]) == len(res["rows"])
    # the other way round, the same rows are faster, not regressions
    back = bench.compare(slow, res, out=lambda *a: None)
    assert back["regressions"] == [] and len(back["faster"]) == len(res["rows"])
    assert bench.main(["--from", str(slow_path), "--compare", str(path),
                       "--fail-on-regression"]) == 3
    out = capsys.readouterr().out
    assert "REGRESSION" in out and f"{len(res['rows'])} regression(s)" in out


def test_noise_threshold_uses_the_measured_spread(quick):
    _, res = quick
    row = copy.deepcopy(res["rows"][0])
    old, new = {"rows": [row]}, {"rows": [copy.deepcopy(row)]}
    row["time"].update(median=1.0, mad=0.1)  # 3 MAD = 30%: a 20% change is noise
    new["rows"][0]["time"].update(median=1.2, mad=0.0)
    assert bench.compare(old, new, out=lambda *a: None)["regressions"] == []
    new["rows"][0]["time"]["median"] = 1.4
    assert bench.compare(old, new, out=lambda *a: None)["regressions"] == [row["key"]]


def test_plot_writes_roofline_and_history(quick, tmp_path):
    pytest.importorskip("matplotlib")
    path, _ = quick
    code = bench.main(["--from", str(path), "--plot", "--plot-dir", str(tmp_path),
                       "--results-dir", str(path.parent)])
    assert code == 0
    for name in (f"{path.stem}.roofline.png", f"{path.stem}.history.png"):
        png = tmp_path / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_plot_without_matplotlib_names_the_extra(quick, tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *a, **kw):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    path, _ = quick
    assert bench.main(["--from", str(path), "--plot", "--plot-dir", str(tmp_path)]) == 1
    assert "pip install 'rawgan[train]'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--ops", "conv3d"], ["--batch", "0"], ["--repeats", "0"],
                                  ["--backend", "tpu"], ["--from", "x.json"], ["--ops", ","],
                                  ["--from", "x.json", "--plot", "--batch", "99"],
                                  ["--from", "x.json", "--compare", "x.json", "--quick"],
                                  ["--quick", "--fail-on-regression"],
                                  ["--quick", "--plot-dir", "/tmp"],
                                  ["--quick", "--plot", "--plot-dir", "/etc/passwd"]])
def test_usage_errors_exit_2(argv, capsys):
    assert bench.main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_from_a_file_that_is_not_a_result(tmp_path, capsys):
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"rows": []}))
    assert bench.main(["--from", str(bad), "--compare", str(bad)]) == 1
    assert "not a rawgan bench result" in capsys.readouterr().err
    assert bench.main(["--from", str(tmp_path / "missing.json"), "--plot"]) == 1


def test_malformed_rows_and_bad_paths_fail_before_measuring(quick, tmp_path, capsys,
                                                           monkeypatch):
    path, result = quick
    bad = tmp_path / "bad.json"
    for rows in ([{"key": "x"}], [{**result["rows"][0], "time": {"median": 0.0}}]):
        bad.write_text(json.dumps({**result, "rows": rows}))
        assert bench.main(["--from", str(path), "--compare", str(bad)]) == 1
        assert "is not a bench row" in capsys.readouterr().err
    bad.write_text(json.dumps({**result, "machine": None}))
    assert bench.main(["--from", str(path), "--compare", str(bad)]) == 0  # no machine: fine

    def no_run(*a, **kw):
        raise AssertionError("measured although the run's output could not be written")

    monkeypatch.setattr(bench, "run", no_run)
    assert bench.main(["--quick", "--ops", "dense", "--json", str(tmp_path)]) == 1
    assert "not a file in an existing folder" in capsys.readouterr().err
    assert bench.main(["--quick", "--ops", "dense", "--compare", str(tmp_path / "no.json")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_history_ratio_lines_are_per_batch(quick, tmp_path, monkeypatch):
    """A run at another batch size is another line of the op-family plot, not a shift of
    the same line."""
    path, result = quick
    lines = []

    class Ax:
        def plot(self, *a, label="", **kw):
            lines.append(label)

        def __getattr__(self, name):
            return lambda *a, **kw: ([], []) if name == "get_legend_handles_labels" else None

    class Plt:
        def subplots(self, *a, **kw):
            return types.SimpleNamespace(tight_layout=lambda: None,
                                         savefig=lambda *a, **kw: None), (Ax(), Ax())

        def close(self, fig):
            pass

    monkeypatch.setattr(bench, "_pyplot", lambda: Plt())
    other = json.loads(json.dumps(result))
    for r in other["rows"]:
        r["batch"] = 2 * r["batch"]
    bench.plot_history([result, other], tmp_path / "h.png")
    fams = [lab for lab in lines if lab.startswith(("dense", "conv"))]
    assert fams and len(fams) == len(set(fams))
    assert any(f"b={result['rows'][0]['batch']} " in lab for lab in fams)


def test_unavailable_backend_is_a_clear_error(capsys):
    try:
        bench.backends.get("cupy")
    except bench.backends.BackendUnavailable:
        assert bench.main(["--quick", "--backend", "cupy", "--ops", "dense"]) == 1
        assert "cupy" in capsys.readouterr().err
    else:
        pytest.skip("CuPy loads here")


# --------------------------------------------------------------------------------------
# the PyTorch twins compute what rawgan computes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [c for c in bench.dcgan_cases(batches=[3]) if c.op != "step"],
                         ids=lambda c: c.key)
def test_every_kernel_twin_agrees_with_rawgan(case):
    pytest.importorskip("torch")
    for channels_last in (True, False):
        res = bench.twin_agreement(case, numpy_ops, "cpu", channels_last)
        assert res["ok"], res
        assert res["values_compared"] >= (0 if case.op == "dropout" else 1), res


def test_a_twin_that_computes_something_else_is_caught(monkeypatch):
    pytest.importorskip("torch")
    case = next(c for c in bench.dcgan_cases(batches=[2])
                if c.op == "conv2d" and c.pass_ == "wgrad")
    real = bench.torch_fn

    def off_by_one_percent(*a, **kw):
        fn = real(*a, **kw)
        return lambda: tuple(None if t is None else t * 1.01 for t in fn())

    monkeypatch.setattr(bench, "torch_fn", off_by_one_percent)
    res = bench.twin_agreement(case, numpy_ops)
    assert not res["ok"] and res["max_rel_err"] == pytest.approx(0.01 / 1.01, rel=1e-3)

    def wrong_layout(*a, **kw):  # the kernel gradient left in PyTorch's (O, I, kh, kw)
        fn = real(*a, **kw)
        return lambda: (None, fn()[1].permute(2, 3, 0, 1), fn()[2])

    monkeypatch.setattr(bench, "torch_fn", wrong_layout)
    res = bench.twin_agreement(case, numpy_ops)
    assert not res["ok"] and res["shapes"][1] == [[5, 5, 1, 64], [64, 1, 5, 5]]


def test_step_twin_is_rawgans_dcgan():
    torch = pytest.importorskip("torch")
    bs = bench.load_script("bench_step")
    if bs is None:
        pytest.skip("benchmarks/bench_step.py not found")
    G, D = bs.torch_models(True, 0)
    assert bs.twin_problems(G, D) == []
    wide = torch.nn.Sequential(*list(D)[:-1], torch.nn.Linear(7 * 7 * 128, 2))
    problems = bs.twin_problems(G, wide)
    assert any("D: parameters per layer" in p for p in problems)
    assert any("D(x): shape (2, 1) (rawgan) vs (2, 2)" in p for p in problems)


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--batch", "0"], ["--threads", "abc"],
                                  ["--warmup", "-1"]])
def test_bench_step_refuses_bad_arguments_before_measuring(argv, capsys):
    bs = bench.load_script("bench_step")
    if bs is None:
        pytest.skip("benchmarks/bench_step.py not found")
    with pytest.raises(SystemExit) as exc:
        bs.main(argv)
    assert exc.value.code == 2 and "error" in capsys.readouterr().err


def test_quick_plot_without_json_is_refused_before_measuring(capsys):
    pytest.importorskip("matplotlib")
    assert bench.main(["--quick", "--plot", "--ops", "dense"]) == 1
    assert "--quick --plot without --json" in capsys.readouterr().err


def test_weight_gradient_rows_do_the_work_the_layer_does():
    """A wgrad row computes the bias gradient only for a layer that has a bias (G's Dense
    and transposed convs have none: their training step never sums dy for it), on rawgan's
    side and on the PyTorch twin's."""
    torch = bench._torch()
    rows = [c for c in bench.dcgan_cases(batches=(2,)) if c.pass_ == "wgrad"]
    assert {c.geom[-1] for c in rows} == {True, False}
    for case in rows:
        bias = case.geom[-1]
        dx, dw, db = bench.rawgan_fn(case, numpy_ops)()
        assert dx is None and dw is not None and (db is not None) == bias, case
        if torch is not None and bench.torch_fn(case) is not None:
            twin = bench._slots(bench.torch_fn(case)(), case, True)
            assert (twin[2] is not None) == bias, case
