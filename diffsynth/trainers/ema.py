"""EMA of the trained weights (diffusers' EMAModel: decay ramping as (1 + n) / (10 + n) up to --ema_decay),
saved beside each checkpoint as `<name>-ema.safetensors` in the checkpoint's own format, and resumable."""
import contextlib


def create_ema(params, decay: float):
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=decay)


@contextlib.contextmanager
def ema_weights(ema, params):
    """Inside the block `params` hold the EMA weights; afterwards exactly their own values again."""
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)
