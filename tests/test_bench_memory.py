"""The memory benchmark at the tiny preset on the CPU: the GPU script's code path (model built on the device in
place, inference with swap, training rows bf16/fp8 x swap, plans), its table and its section of BENCHMARKS.md. No
memory or time is asserted; the swapped rows' losses must equal the resident ones."""
import re
from pathlib import Path

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
OTHER = "<!-- bench_dit:start -->\ndit section\n<!-- bench_dit:end -->\n"


def test_bench_memory_tiny(tmp_path, capsys):
    bench = load_script(ROOT / "benchmarks" / "bench_memory.py", "bench_memory")
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n" + OTHER)
    bench.main(["--preset", "tiny", "--swaps", "0,2", "--output", str(out)])
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\n" + OTHER)  # the other sections stay
    start, end = bench.section_markers("bench_memory")
    section = text.split(start)[1].split(end)[0]
    assert section in capsys.readouterr().out
    rows = re.findall(r"^\| (inference|LoRA step)[^|]*\| (fp32|fp8) \| (\d+) \| ([0-9.]+) \|.*\| ([0-9.e+-]+|-) \|$",
                      section, re.M)
    assert [(kind, weights, int(swap)) for kind, weights, swap, _, _ in rows] == [
        ("inference", "fp32", 3), ("LoRA step", "fp32", 0), ("LoRA step", "fp32", 2), ("LoRA step", "fp8", 0),
        ("LoRA step", "fp8", 2)]
    assert all(float(seconds) > 0 for *_, seconds, _ in rows)
    # swapping changes no number: the losses of every training row equal its resident row's
    assert [diff for kind, *_, diff in rows if kind == "LoRA step"] == ["0.0e+00"] * 4
    assert "n/a (CPU)" in section and "no number here is a measurement of the real model" in section
    assert "--preset tiny --swaps 0,2" in section and "--output" not in section
