"""Smoke test of the DiT benchmark at a toy size: it runs, its table is complete, and it rewrites only
its own section of BENCHMARKS.md. No timing is asserted."""
import re
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
            row = re.search(rf"\| {re.escape(mode)} \| {variant} \| ([0-9.]+) \| ([0-9.]+) \|", section)
            assert row and float(row.group(2)) > 0, f"missing row {mode} / {variant}"
    assert "merged/standard =" in section and "Machine:" in section and "--iters 2" in section
    assert "--output" not in section  # where the table went is not part of the command that measured it
    # same weights in all variants: their forward outputs agree (fp32, toy size)
    assert float(re.search(r"agree to ([0-9.e+-]+)", section).group(1)) < 1e-5


def test_write_section_replaces_only_its_own(tmp_path):
    bench = load_bench()
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n" + OTHER)
    for body in ("first", "second"):
        bench.write_section(out, "bench_dit", f"{bench.START}\n{body}\n{bench.END}\n")
    text = out.read_text()
    assert text == "# Benchmarks\n\n" + OTHER + f"\n{bench.START}\nsecond\n{bench.END}\n"


def test_bench_dit_rejects_bad_arguments(capsys):
    bench = load_bench()
    for argv, message in ((["--variants", "fast"], "unknown variant 'fast'"),
                          (["--height", "100"], "multiples of 16"),
                          (["--modes", "backward"], "unknown mode 'backward'")):
        with pytest.raises(SystemExit) as exit_info:
            bench.parse_args(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
