import os

import pytest
import torch

# Two pytest workers share two cores: one thread each avoids oversubscription.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

from diffsynth.utils.tiny_models import TINY_DIT_CONFIG as TINY_DIT  # noqa: E402  (the tiny set's own DiT config)


@pytest.fixture
def tiny_dit_config():
    return dict(TINY_DIT)


def random_diffusers_dit(zero_cond_t=False, seed=0, std=0.05):
    """diffusers' QwenImageTransformer2DModel with the tiny config and random (non-zero) weights: the oracle."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(**TINY_DIT, zero_cond_t=zero_cond_t).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


TINY_MODEL_IDS = ("tiny-random/Qwen-Image-Edit:transformer/diffusion_pytorch_model*.safetensors,"
                  "tiny-random/Qwen-Image:text_encoder/model*.safetensors,"
                  "tiny-random/Qwen-Image:vae/diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The tiny random model set in the official layout, written once per test worker: its models_dir."""
    from diffsynth.utils.tiny_models import write_tiny_models

    folder = tmp_path_factory.mktemp("models")
    write_tiny_models(folder, seed=0)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_models):
    """The pipeline on the tiny models (one per test module: tests may patch its methods)."""
    from diffsynth.pipelines.qwen_image import QwenImagePipeline

    return QwenImagePipeline.from_pretrained(TINY_MODEL_IDS, models_dir=tiny_models, download=False)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture
def data(tmp_path):
    from diffsynth.utils.demo_data import write_edit_dataset

    write_edit_dataset(str(tmp_path / "data"), num_samples=2)
    return str(tmp_path / "data")


@pytest.fixture
def offline(monkeypatch):
    """modelscope.snapshot_download fails as it does without network; the calls are recorded."""
    import modelscope

    calls = []

    def fail(model_id, **kwargs):
        calls.append((model_id, kwargs))
        raise ConnectionError(f"cannot reach modelscope.cn for {model_id}")

    monkeypatch.setattr(modelscope, "snapshot_download", fail)
    monkeypatch.delenv("DIFFSYNTH_MODELS_DIR", raising=False)
    return calls


def load_script(path, name):
    """Import a script (e.g. benchmarks/bench_dit.py) as a module, in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
