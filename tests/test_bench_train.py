"""Smoke test of the training benchmark at the toy size: every configuration trains in its own process, the
table has one row per configuration with sane numbers, and only the bench_train section of BENCHMARKS.md is
rewritten. No timing is asserted."""
import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_train.py"
OTHER = "<!-- bench_dit:start -->\ndit section\n<!-- bench_dit:end -->\n"
ROW = re.compile(r"^\| ([^|]+?) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9]+) \| ([0-9]+) \| ([0-9]+) \|$",
                 re.M)


def load_bench():
    return load_script(SCRIPT, "bench_train")


def test_bench_train_toy_runs_every_config(tmp_path):
    bench = load_bench()
    out, work = tmp_path / "BENCHMARKS.md", tmp_path / "work"
    out.write_text("# Benchmarks\n\nintro\n\n" + OTHER)
    # A subprocess, as a user runs it: its children fork from a server that imports torch and the trainer once.
    # Output goes to files, not pipes: the fork server holds the pipes open for a while after the script exits.
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        code = subprocess.run([sys.executable, str(SCRIPT), "--preset", "toy", "--warmup", "0", "--steps", "2",
                               "--threads", "1", "--output", str(out), "--work_dir", str(work)],
                              stdout=stdout, stderr=stderr, cwd=tmp_path, timeout=300).returncode
    assert code == 0, (tmp_path / "stderr").read_text()[-4000:]
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n\n" + OTHER)
    assert text.count(bench.START) == 1 and text.count(bench.END) == 1
    section = text.split(bench.START)[1].split(bench.END)[0]
    assert section in (tmp_path / "stdout").read_text()  # the same table is printed

    rows = {m.group(1): [float(x) for x in m.groups()[1:]] for m in ROW.finditer(section)}
    assert list(rows) == [c.label for c in bench.CONFIGS.values()]  # one row per configuration, in order
    for name, config in bench.CONFIGS.items():
        median, low, _, per_sample, dit_mb, steps_rss, run_rss = rows[config.label]
        assert 0 < low <= median, name
        assert per_sample == pytest.approx(median / config.batch, abs=0.006), name
        assert 100 < steps_rss <= run_rss, name  # MB, libraries included; the steps are part of the run
        assert 0 <= dit_mb < steps_rss, name
        # each configuration trained the requested steps with the real trainer and saved its LoRA
        run = work / "runs" / f"{name}-round1"
        with open(run / "train_log.csv") as f:
            assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2]  # 2 timed steps, no warm-up
        with safe_open(run / "checkpoint-final.safetensors", "pt") as f:
            assert f.metadata()["architecture"] == ("merged_qkv" if config.merged else "standard"), name
    assert rows[bench.CONFIGS["baseline"].label][2] == 1.0
    # fp8 stores the frozen base weights in one byte: the DiT holds fewer bytes than the baseline's
    assert rows[bench.CONFIGS["fp8"].label][4] < rows[bench.CONFIGS["baseline"].label][4]
    assert len(list((work / "cache").glob("*.safetensors"))) == 1  # the toy data set: one pair, cached once
    assert "Machine:" in section and "--warmup 0 --steps 2" in section and "UNDERSTATES" in section
    assert "--output" not in section and "--work_dir" not in section  # where files went is not what was measured


def test_step_seconds_differences_of_the_cumulative_log(tmp_path):
    log = tmp_path / "train_log.csv"
    log.write_text("step,epoch,loss,lr,seconds\n1,0,0.5,1e-4,0.50\n2,0,0.4,1e-4,0.80\n3,0,0.3,1e-4,1.40\n"
                   "4,0,0.2,1e-4,2.00\n")
    assert load_bench().step_seconds(log, warmup=1) == pytest.approx([0.3, 0.6, 0.6])


@pytest.mark.parametrize("argv, message", [
    (["--configs", "baseline,fast"], "unknown config 'fast'"),
    (["--configs", "fp8"], "--configs must include baseline"),
    (["--steps", "0"], "--steps, --rounds, --rank >= 1"),
    (["--preset", "gpu"], "invalid choice: 'gpu'"),
])
def test_bench_train_rejects_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        load_bench().parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
