"""Smoke test of the DiT benchmark at a toy size: it runs, its table is complete and it owns only its section."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOY = ["--num_layers", "1", "--heads", "2", "--head_dim", "32", "--text_dim", "64", "--height", "64",
       "--text_len", "8", "--rank", "4", "--warmup", "1", "--iters", "2"]


def test_bench_dit_runs_and_rewrites_only_its_section(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nintro\n\n<!-- bench_train:start -->\ntrain section\n<!-- bench_train:end -->\n")
    for _ in range(2):  # the second run replaces the section instead of appending another
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_dit.py"), *TOY, "--output", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text.count("<!-- bench_dit:start -->") == 1 and text.count("<!-- bench_dit:end -->") == 1
    assert "intro" in text and "<!-- bench_train:start -->\ntrain section\n<!-- bench_train:end -->" in text
    section = text.split("<!-- bench_dit:start -->")[1]
    for mode in ("forward (no grad)", "LoRA train step (r=4)"):
        for variant in ("standard", "merged", "diffusers"):
            row = re.search(rf"\| {re.escape(mode)} \| {variant} \| ([0-9.]+) \| ([0-9.]+) \|", section)
            assert row and float(row.group(2)) > 0, f"missing row {mode} / {variant}"
    assert "merged/standard =" in section and "Machine:" in section and "--iters 2" in section
    # same weights in all variants: the forward outputs agree (fp32, toy size)
    agree = float(re.search(r"agree to ([0-9.e+-]+)", section).group(1))
    assert agree < 1e-5


def test_bench_dit_rejects_bad_arguments():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_dit.py"), "--variants", "fast"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown variant 'fast'" in proc.stderr
