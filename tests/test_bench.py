"""``refattn bench`` runs a tiny grid end to end, writes what it promises, and refuses to
time a wrong answer quietly. No timing is asserted: only that times exist and are positive."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import refattn
from refattn.bench import BACKWARD_PATHS, PEERS, Shape, command
from refattn.cli import comma_separated_ints, main

HAS_TORCH = importlib.util.find_spec("torch") is not None
BACKENDS = ["numpy", "torch"] if HAS_TORCH else ["numpy"]
#: Two decode lengths and one prefill, small enough for a whole run in about a second.
TINY = ["bench", "--seq-lens", "16,24", "--batch", "1", "--q-heads", "4", "--kv-heads", "2",
        "--head-dim", "8", "--prefill-heads", "2", "--prefill-head-dim", "8",
        "--prefill-seq-lens", "12", "--block-k", "8", "--repeats", "1", "--warmup", "0",
        "--bandwidth-mib", "4", "--backends", ",".join(BACKENDS)]  # fmt: skip


def _bench(tmp_path: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    path = tmp_path / "bench.json"
    code = main([*TINY, "--json", str(path), *extra])
    return code, json.loads(path.read_text())


def test_bench_writes_a_row_per_mode_backend_and_path_with_times_and_machine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = _bench(tmp_path)
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert set(report) == {"rows", "bandwidth", "machine", "settings", "skipped"}
    rows = report["rows"]
    shapes = [Shape(**r["shape"]) for r in rows]  # a row's shape is nested, whole
    pairs = list(zip(shapes, rows, strict=True))
    seen = {(s.mode, s.seq_len, r["backend"], r["implementation"]) for s, r in pairs}
    for backend in BACKENDS:
        for mode, s in (("decode", 16), ("decode", 24), ("prefill", 12)):
            assert (mode, s, backend, "refattn.attention") in seen
            assert (mode, s, backend, "refattn.attention_blockwise") in seen
    assert {(s.q_heads, s.kv_heads) for s in shapes if s.mode == "decode"} == {(4, 2)}
    assert {(s.q_heads, s.kv_heads) for s in shapes if s.mode == "prefill"} == {(2, 2)}
    for shape, row in pairs:
        assert "mode" not in row and "seq_len" not in row  # not repeated beside the shape
        assert row["median_s"] > 0 and row["min_s"] <= row["median_s"]
        assert shape.kv_bytes == 2 * 1 * shape.kv_heads * shape.seq_len * 8 * 4
        assert row["floor_s"] == pytest.approx(shape.kv_bytes / row["read_bandwidth"])
        assert row["kv_bandwidth"] == pytest.approx(shape.kv_bytes / row["median_s"])
        assert row["gflops"] == pytest.approx(shape.flops / row["median_s"] / 1e9)
    blockwise = [r for r in rows if r["implementation"] == "refattn.attention_blockwise"]
    assert {(r["block_q"], r["block_k"]) for r in blockwise} == {(8, 8)}
    assert {(b["backend"], b["device"]) for b in report["bandwidth"]} >= {("numpy", "cpu")}
    assert all(b["read"] > 0 and b["copy"] > 0 for b in report["bandwidth"])
    assert report["machine"]["numpy"] == np.__version__
    assert report["machine"]["cpu_count"] >= 1
    assert report["settings"]["repeats"] == 1
    assert "refattn.attention" in printed and "% read BW" in printed


@pytest.mark.skipif(not HAS_TORCH, reason="the peers and the check need torch")
def test_bench_checks_every_row_against_sdpa_and_gives_ratios_to_torch(tmp_path: Path) -> None:
    _, report = _bench(tmp_path)
    rows = report["rows"]
    peers = {
        (r["shape"]["mode"], r["shape"]["seq_len"], r["implementation"])
        for r in rows
        if r["backend"] == "torch"
    }
    assert ("decode", 16, "torch SDPA") in peers and ("prefill", 12, "torch matmul") in peers
    # Peers on the CPU serve NumPy and torch-CPU alike: timed once per shape.
    sdpa = [r for r in rows if r["implementation"] == "torch SDPA"]
    assert len(sdpa) == 3
    for row in rows:
        assert row["agrees"] is True, row
        assert row["vs_sdpa"] > 0 and row["vs_fastest_torch"] > 0
        assert row["vs_fastest_torch"] >= row["vs_sdpa"] * (1 - 1e-12)
    for row in sdpa:
        assert row["vs_sdpa"] == 1.0 and row["reference"].startswith("refattn.attention")


@pytest.mark.skipif(not HAS_TORCH, reason="the check compares with SDPA")
def test_bench_marks_a_row_that_disagrees_with_sdpa_and_exits_non_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    honest = refattn.attention_blockwise

    def off_by_a_little(*args: Any, **kwargs: Any) -> Any:
        out: Any = honest(*args, **kwargs)
        return out + 1e-2

    monkeypatch.setattr(refattn, "attention_blockwise", off_by_a_little)
    code, report = _bench(tmp_path, "--backends", "numpy")
    printed = capsys.readouterr().out
    assert code == 1
    verdicts = {r["implementation"]: r["agrees"] for r in report["rows"]}
    assert verdicts["refattn.attention_blockwise"] is False
    assert verdicts["refattn.attention"] is True
    assert "MISMATCH" in printed


def test_bench_backward_times_the_prefill_shapes_gradients_on_each_backend(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = _bench(tmp_path, "--mode", "backward")
    printed = capsys.readouterr().out
    assert code == 0, printed
    rows = report["rows"]
    shapes = {Shape(**r["shape"]) for r in rows}
    assert shapes == {Shape("backward", 1, 2, 2, 8, 12, "float32")}  # the prefill grid's shape
    shape = shapes.pop()
    assert shape.causal and shape.q_len == 12
    assert shape.flops == 1 * 2 * (12 * 13 // 2) * 2 * (3 * 8 + 2 * 8)  # five products a pair
    spec = {(r["backend"], r["implementation"]) for r in rows if r["implementation"] not in PEERS}
    assert spec == {(b, path) for b in BACKENDS for path in BACKWARD_PATHS}
    for row in rows:
        assert row["median_s"] > 0 and row["min_s"] <= row["median_s"]
        assert row["gflops"] == pytest.approx(shape.flops / row["median_s"] / 1e9)
        blockwise = row["implementation"] == "refattn.attention_backward_blockwise"
        assert (row["block_q"], row["block_k"]) == ((8, 8) if blockwise else (None, None))
    assert "causal prefill's backward" in printed and "refattn.attention_backward" in printed
    assert "refattn backward blockwise bq=8 bk=8" in printed
    assert "causal prefill (Sq = S)" not in printed and "decode step" not in printed


@pytest.mark.skipif(not HAS_TORCH, reason="the peers and the check need torch")
def test_bench_backward_checks_every_row_against_sdpa_autograd_and_gives_ratios(
    tmp_path: Path,
) -> None:
    _, report = _bench(tmp_path, "--mode", "backward")
    rows = report["rows"]
    assert [r["implementation"] for r in rows if r["backend"] == "torch"][:2] == list(PEERS)
    for row in rows:
        assert row["agrees"] is True, row
        assert row["vs_sdpa"] > 0 and row["vs_fastest_torch"] > 0
    (sdpa,) = [r for r in rows if r["implementation"] == "torch SDPA"]
    assert sdpa["vs_sdpa"] == 1.0
    assert sdpa["reference"] == "refattn.attention_backward on numpy cpu"
    others = [r for r in rows if r["implementation"] != "torch SDPA"]
    assert {r["reference"] for r in others} == {"torch SDPA on cpu"}


@pytest.mark.skipif(not HAS_TORCH, reason="the check compares with SDPA's autograd")
@pytest.mark.parametrize("wrong", ["dq", "dk", "dv"])
def test_bench_marks_a_backward_row_with_one_wrong_gradient_and_exits_non_zero(
    wrong: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    honest = refattn.attention_backward_blockwise

    def one_gradient_off(*args: Any, **kwargs: Any) -> refattn.Gradients:
        g = honest(*args, **kwargs)
        return dataclasses.replace(g, **{wrong: getattr(g, wrong) + 1e-2})

    monkeypatch.setattr(refattn, "attention_backward_blockwise", one_gradient_off)
    code, report = _bench(tmp_path, "--backends", "numpy", "--mode", "backward")
    printed = capsys.readouterr().out
    assert code == 1
    verdicts = {r["implementation"]: r["agrees"] for r in report["rows"]}
    assert verdicts["refattn.attention_backward_blockwise"] is False
    assert verdicts["refattn.attention_backward"] is True and verdicts["torch SDPA"] is True
    assert "MISMATCH: refattn.attention_backward_blockwise" in printed


@pytest.mark.skipif(not HAS_TORCH, reason="the peers are torch's")
def test_a_backward_step_times_the_backward_alone_given_the_saved_forward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from refattn.bench import Job, make_step

    calls: dict[str, int] = {}

    def counted(module: Any, name: str) -> None:
        original = getattr(module, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            calls[name] = calls.get(name, 0) + 1
            if name == "attention_backward":
                assert kwargs["out"] is not None and kwargs["lse"] is not None
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, call)

    for name in ("attention", "attention_backward"):
        counted(refattn, name)
    counted(torch.nn.functional, "scaled_dot_product_attention")
    shape = Shape("backward", 1, 2, 2, 8, 6, "float32")
    rng = np.random.default_rng(0)
    q, k, v, dout = (torch.from_numpy(rng.standard_normal((1, 2, 6, 8), dtype=np.float32))
                     for _ in range(4))  # fmt: skip
    for path in ("refattn.attention_backward", "torch SDPA"):
        step = make_step(Job(shape, path, "torch", "cpu", "cpu"), q, k, v, dout,
                         block_q=4, block_k=4)  # fmt: skip
        grads = [step() for _ in range(3)]
        assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[2], strict=True))
    assert calls == {"attention": 1, "attention_backward": 3, "scaled_dot_product_attention": 1}


def test_bench_plot_writes_a_file_or_says_matplotlib_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plot = tmp_path / "decode.png"
    code, _ = _bench(tmp_path, "--plot", str(plot), "--backends", "numpy")
    printed = capsys.readouterr().out
    assert code == 0
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in printed and not plot.exists()
    else:
        assert plot.stat().st_size > 0 and "plot written" in printed


def test_bench_plot_says_matplotlib_is_missing_and_still_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # import now raises ImportError
    plot = tmp_path / "decode.png"
    code, _ = _bench(tmp_path, "--plot", str(plot), "--backends", "numpy", "--mode", "decode")
    assert code == 0
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not plot.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--q-heads", "6", "--kv-heads", "4"], "q heads (6) must be a multiple of kv heads (4)"),
        (["--mode", "train"], "mode must be one of"),
        (["--repeats", "0"], "repeats must be at least 1"),
        (["--seq-lens", "16,x"], "expected comma-separated integers"),
        (["--dtypes", ""], "dtypes must name at least one value"),
        (["--backends", "tensorflow"], "backend must be one of"),
    ],
)
def test_bench_rejects_a_bad_grid_before_timing_anything(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", *flags])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_the_fused_cupy_kernel_is_planned_for_cupy_decode_rows_only() -> None:
    from refattn.backends import get
    from refattn.bench import FUSED, MODES, SPEC_PATHS, Grid, Target, plan

    grid = Grid(modes=MODES, seq_lens=(16,), prefill_seq_lens=(8,), dtypes=("float16",))
    targets = [Target(get("cupy"), "cuda:0"), Target(get("numpy"), "cpu")]
    jobs, _ = plan(grid.shapes(), targets)
    fused = [(j.shape.mode, j.backend) for j in jobs if j.implementation == FUSED]
    assert fused == [("decode", "cupy")]
    for backend in ("cupy", "numpy"):
        for mode in ("decode", "prefill", "backward"):
            paths = {j.implementation for j in jobs if (j.backend, j.shape.mode) == (backend, mode)}
            assert paths - {*PEERS, FUSED} == set(
                BACKWARD_PATHS if mode == "backward" else SPEC_PATHS
            )


@pytest.mark.skipif(not HAS_TORCH, reason="needs a second backend to tell the two apart")
def test_bench_times_the_backends_it_is_given_whatever_refattn_backends_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REFATTN_BACKENDS", "torch")
    code, report = _bench(tmp_path, "--backends", "numpy", "--mode", "decode")
    assert code == 0
    spec_rows = [r for r in report["rows"] if r["implementation"] not in PEERS]
    assert spec_rows and {r["backend"] for r in spec_rows} == {"numpy"}
    assert report["settings"]["backends"] == ["numpy cpu"]


def test_bench_command_declares_the_options_and_defaults_of_refattn_bench() -> None:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args([])
    assert (args.mode, args.seq_lens, args.block_k, args.block_q) == (
        "decode,prefill", "1024,4096,16384", 512, None
    )  # fmt: skip
    assert (args.repeats, args.warmup, args.backends, args.json) == (5, 1, None, None)
    assert command.HELP and "refattn.bench" in command.DESCRIPTION
    assert "backward" in parser.format_help()  # --mode backward is listed, if not default
    with pytest.raises(ValueError, match="expected comma-separated integers; got '1,two'"):
        comma_separated_ints("1,two")
