"""Smoke test of the DiT benchmark at a toy size: it runs, its table is complete, and it rewrites only
its own section of BENCHMARKS.md. No timing is asserted."""
import os
import re
import sys
from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_dit.py"
TOY = ["--num_layers", "1", "--heads", "2", "--head_dim", "32", "--text_dim", "64", "--height", "64",
       "--text_len", "8", "--rank", "4", "--warmup", "1", "--iters", "2"]
OTHER = "<!-- bench_train:start -->\ntrain section\n<!-- bench_train:end -->\n"


def load_bench():
    return load_script(SCRIPT, "bench_dit")


def test_bench_dit_runs_and_writes_its_section(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nintro\n\n" + OTHER)
    load_bench().main([*TOY, "--output", str(out)])  # in-process: a subprocess would re-import torch and diffusers
    text = out.read_text()
    assert text.count("<!-- bench_dit:start -->") == 1 and text.count("<!-- bench_dit:end -->") == 1
    assert text.startswith("# Benchmarks\n\nintro\n\n" + OTHER)
    section = text.split("<!-- bench_dit:start -->")[1]
    for mode in ("forward (no grad)", "LoRA train step (r=4)"):
        for variant in ("standard", "merged", "diffusers"):
            row = re.search(rf"\| {re.escape(mode)} \| eager \| {variant} \| ([0-9.]+) \| ([0-9.]+) \|", section)
            assert row and float(row.group(2)) > 0, f"missing row {mode} / {variant}"
    assert "eager: merged/standard =" in section and "Machine:" in section and "--iters 2" in section
    assert "--output" not in section  # where the table went is not part of the command that measured it
    # same weights in all variants: their forward outputs agree (fp32, toy size)
    assert float(re.search(r"agree to ([0-9.e+-]+)", section).group(1)) < 1e-5


def test_write_section_replaces_only_its_own(tmp_path):
    bench = load_bench()
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n" + OTHER)
    start, end = bench.section_markers("bench_dit")
    for body in ("first", "second"):
        bench.write_section(out, "bench_dit", f"{start}\n{body}\n{end}\n")
    text = out.read_text()
    assert text == "# Benchmarks\n\n" + OTHER + f"\n{start}\nsecond\n{end}\n"


def test_bench_dit_rejects_bad_arguments(capsys):
    bench = load_bench()
    for argv, message in ((["--variants", "fast"], "unknown variant 'fast'"),
                          (["--height", "100"], "multiples of 16"),
                          (["--modes", "backward"], "unknown mode 'backward'"),
                          (["--full_flavors", "fast:2"], "unknown flavor 'fast'"),
                          *((["--full_layers", "4", "--full_flavors", f"compiled:{spec}"],
                             f"--full_flavors compiled:{spec}: after the colon, how many of the last blocks to "
                             "checkpoint (1 to --full_layers, 4), selective, or both joined by +")
                            for spec in ("5", "0", "fast", "", "2+3", "selective+selective"))):
        with pytest.raises(SystemExit) as exit_info:
            bench.parse_args(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bench_dit_without_diffusers_skips_its_rows(tmp_path, monkeypatch, capsys):
    bench = load_bench()
    monkeypatch.setattr(bench, "diffusers", None)
    out = tmp_path / "BENCHMARKS.md"
    bench.main([*TOY, "--modes", "forward", "--output", str(out)])
    assert "diffusers is not installed: its rows are skipped" in capsys.readouterr().err
    section = out.read_text()
    assert "| forward (no grad) | eager | merged |" in section and "| diffusers |" not in section
    assert "- Skipped variant: diffusers (not installed)." in section


def test_run_gpu_dry_mode(tmp_path):
    """The GPU suite's script, at toy sizes on the CPU: every stage runs and writes its section (compiled with
    dynamo's eager backend: the inductor path is tested in test_compile.py)."""
    import subprocess

    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n" + OTHER)
    env = {**os.environ, "BENCH_OUTPUT": str(out), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu.sh"), "--dry"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stopped" not in result.stderr and "run_gpu: done in" in result.stdout
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\n" + OTHER)
    main = text.split("<!-- bench_dit_gpu:start -->")[1].split("<!-- bench_dit_gpu:end -->")[0]
    for mode in ("forward (no grad)", "LoRA train step (r=4)"):
        for flavor in ("eager", "fp8 compute, compiled"):
            for variant in ("standard", "merged", "diffusers"):
                assert f"| {mode} | {flavor} | {variant} | " in main, (mode, flavor, variant)
    # the fp8 forward held to the eager output of the same weights: an error, neither zero nor garbage
    error = float(re.search(r"^- fp8 compute, compiled: the merged forward output is ([0-9.]+)% from the eager fp32 "
                            r"output of the same weights \(relative L2 error\)\.$", main, re.M).group(1))
    assert 0 < error < 10, main
    full = text.split("<!-- bench_dit_gpu_full:start -->")[1].split("<!-- bench_dit_gpu_full:end -->")[0]
    assert "Merged DiT, 2 blocks, gradient checkpointing" in full
    partial = ("fp8 compute, compiled, only the last 1 blocks checkpointed",
               "fp8 compute, compiled, selective (attention outputs kept)")
    for flavor in ("eager", "fp8 compute, compiled", *partial):
        assert f"| LoRA train step (r=4) | {flavor} | merged | " in full
    for flavor in partial:
        assert re.search(rf"^- merged, {re.escape(flavor)}: [0-9.]+x the time of every block checkpointed$", full,
                         re.M), full
    assert "Skipped" not in text
    assert text.count("<!-- bench_memory:start -->") == 1  # the memory benchmark's stage ran too
    # the profile of one merged step: a table of ops whose shares add up to the whole
    profile = text.split("<!-- bench_dit_gpu_profile:start -->")[1].split("<!-- bench_dit_gpu_profile:end -->")[0]
    shares = [float(x) for x in re.findall(r"^\| [^|]+ \| \d+ \| [0-9.]+ \| ([0-9.]+)% \|$", profile, re.M)]
    assert "One merged LoRA step (fp8 compute, compiled, 1 block(s))" in profile and len(shares) >= 5
    assert abs(sum(shares) - 100) < 1.0


def test_a_failing_flavour_is_reported_and_the_rest_still_runs(tmp_path):
    """On a GPU lease one flavour may fail (out of memory, a compile error): the run goes on and says why."""
    out = tmp_path / "BENCHMARKS.md"
    load_bench().main([*TOY, "--modes", "forward", "--flavors", "compiled,eager",
                       "--compile_backend", "no_such_backend", "--output", str(out)])
    section = out.read_text().split("<!-- bench_dit:start -->")[1]
    assert "- Skipped: forward, compiled: failed: InvalidBackend: Invalid backend: 'no_such_backend'" in section
    assert re.search(r"\| forward \(no grad\) \| eager \| merged \| [0-9.]+ \|", section)  # the next flavour ran
