"""The memory benchmark at the tiny preset on the CPU: the GPU script's code path (model built on the device in
place, inference with swap, training rows bf16/fp8 x swap, plans), its table and its section of BENCHMARKS.md. No
memory or time is asserted; the losses of the swapped rows and of the row checkpointing fewer blocks must equal the
resident ones."""
import re
from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
OTHER = "<!-- bench_dit:start -->\ndit section\n<!-- bench_dit:end -->\n"


def test_bench_memory_tiny(tmp_path, capsys):
    bench = load_script(ROOT / "benchmarks" / "bench_memory.py", "bench_memory")
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n" + OTHER)
    bench.main(["--preset", "tiny", "--swaps", "0,2", "--checkpointed", "2,2+selective", "--output", str(out)])
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\n" + OTHER)  # the other sections stay
    start, end = bench.section_markers("bench_memory")
    section = text.split(start)[1].split(end)[0]
    assert section in capsys.readouterr().out
    rows = re.findall(r"^\| (inference|LoRA step)[^|]*\| (fp32|fp8) \| (\d+) \| (\d+(?:, attention kept)?|-) \| "
                      r"([0-9.]+) \|.*"
                      r"\| ([0-9.e+-]+|-) \|$", section, re.M)
    assert [(kind, weights, int(swap), ckpt) for kind, weights, swap, ckpt, _, _ in rows] == [
        ("inference", "fp32", 3, "-"), ("LoRA step", "fp32", 0, "4"), ("LoRA step", "fp32", 0, "2"),
        ("LoRA step", "fp32", 0, "2, attention kept"), ("LoRA step", "fp32", 2, "4"), ("LoRA step", "fp8", 0, "4"),
        ("LoRA step", "fp8", 2, "4")]
    assert all(float(seconds) > 0 for *_, seconds, _ in rows)
    # swapping and checkpointing fewer blocks change no number: every training row's losses equal its resident row's
    assert [diff for kind, *_, diff in rows if kind == "LoRA step"] == ["0.0e+00"] * 6
    assert "n/a (CPU)" in section and "no number here is a measurement of the real model" in section
    assert "--preset tiny --swaps 0,2 --checkpointed 2,2+selective" in section and "--output" not in section
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--preset", "tiny", "--checkpointed", "5"])
    assert e.value.code == 2 and "--checkpointed: each count between 1 and the preset's 4 blocks" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--preset", "tiny", "--checkpointed", "2+fast"])
    assert e.value.code == 2 and "--checkpointed 2+fast: a block count, selective, or both joined by +" in \
        capsys.readouterr().err
