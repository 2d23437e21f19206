"""Resumable training states written as safetensors + json, read without unpickling anything.

A state folder `checkpoints/step-N/` holds:
- `model.safetensors`: the trainable weights (the LoRA, or the whole DiT when fully fine-tuned), full tensors;
- `<name>.safetensors` + `<name>.json` for every registered object (optimizer, lr scheduler, train state, and
  whatever a trainer registers: EMA, ...): the tensors of its `state_dict()` under flattened keys, and the rest of
  the structure in json, with the tensors' places marked;
- `rng-<process>.safetensors` + `.json`: each process's random states (torch, CUDA, python, numpy);
- `state.json`, written last: format, version, the step, process count and the object names.

Any object with `state_dict()` / `load_state_dict()` whose state is a nested structure of dicts (any json-scalar
keys), lists, tuples, tensors, numpy arrays, torch dtypes and json scalars round-trips exactly (float values
through json's shortest repr, tensors bit for bit). An optimizer of a sharded (FSDP) model is saved through torch's
distributed-checkpoint helpers with full (unsharded) state dicts keyed by parameter name (gathering is a collective
every process takes part in); otherwise through its own state_dict(), which every optimizer restores exactly
(torch's helpers cannot rebuild the states of e.g. Prodigy or schedule-free optimizers from an empty one).

Loading reads safetensors and json only: a pickle planted in a state folder is never opened, and states written by
accelerate's pickling `save_state` (older versions of this trainer) are refused with a message.
"""
import json
import os
import random

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..utils.io import atomic_path, write_json_atomic

STATE_FORMAT = "diffsynth-training-state"
STATE_VERSION = 1
MANIFEST = "state.json"
MODEL_FILE = "model.safetensors"
_TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__dict__", "__dtype__")
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64)}


# What states written before a setup key existed ran with (other keys missing from an older state are not checked):
# a state without loraplus_lr_ratio trained with one rate, so it resumes without LoRA+ and is refused with it (its
# optimizer has one parameter group, the run's two); one without network_dropout trained without it
SETUP_BEFORE_KEYS = {"loraplus_lr_ratio": 1.0, "network_dropout": 0.0}


class StateError(ValueError):
    """A training state folder that cannot be resumed from (incomplete, foreign, or for another setup)."""


# ---- nested structures <-> (tensors, json) --------------------------------------------------------------------

def flatten_state(state, prefix="") -> tuple[dict, object]:
    """A nested state -> ({flat key: tensor}, a json-able structure with the tensors' places marked)."""
    tensors, seen = {}, set()

    def put(path, tensor):
        key = "/".join(path) or "value"
        n = 1
        while key in tensors:  # keys of different dicts may join to the same path ("a/b" + "c" vs "a" + "b/c")
            n += 1
            key = f"{'/'.join(path)}#{n}"
        tensor = tensor.detach().cpu().contiguous()
        ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.numel() else None
        if ptr in seen:  # safetensors refuses tensors that share memory
            tensor = tensor.clone()
        seen.add(ptr)
        tensors[prefix + key] = tensor
        return prefix + key

    def encode(value, path):
        if isinstance(value, torch.Tensor):
            return {"__tensor__": put(path, value)}
        if isinstance(value, np.ndarray):
            return {"__ndarray__": put(path, torch.from_numpy(np.ascontiguousarray(value)))}
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, torch.dtype):
            return {"__dtype__": str(value).removeprefix("torch.")}
        if isinstance(value, tuple):
            return {"__tuple__": [encode(v, path + [str(i)]) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, path + [str(i)]) for i, v in enumerate(value)]
        if isinstance(value, dict):
            plain = all(isinstance(k, str) for k in value) and not (len(value) == 1 and next(iter(value)) in _TAGS)
            if plain:
                return {k: encode(v, path + [k]) for k, v in value.items()}
            for k in value:
                if not (k is None or isinstance(k, (str, int, float, bool))):
                    raise TypeError(f"state key {k!r} at {'/'.join(path) or 'top'} is a {type(k).__name__}; "
                                    "only json scalars can be keys")
            return {"__dict__": [[k, encode(v, path + [str(k)])] for k, v in value.items()]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot save {type(value).__name__} at {'/'.join(path) or 'top'} of a training state: "
                        "only tensors, numpy arrays, dtypes, json scalars, lists, tuples and dicts are saved "
                        "(no pickle)")

    return tensors, encode(state, [])


def unflatten_state(tensors: dict, structure):
    """Inverse of flatten_state."""
    def decode(value):
        if isinstance(value, list):
            return [decode(v) for v in value]
        if isinstance(value, dict):
            if len(value) == 1:
                (tag, inner), = value.items()
                if tag in ("__tensor__", "__ndarray__"):
                    if inner not in tensors:
                        raise StateError(f"tensor {inner!r} named in the json is missing from the safetensors file")
                    return tensors[inner] if tag == "__tensor__" else tensors[inner].numpy()
                if tag == "__tuple__":
                    return tuple(decode(v) for v in inner)
                if tag == "__dict__":
                    return {k: decode(v) for k, v in inner}
                if tag == "__dtype__":
                    return _DTYPES[inner]
            return {k: decode(v) for k, v in value.items()}
        return value

    return decode(structure)


def save_object_state(state, folder, name):
    """`<folder>/<name>.safetensors` (tensors) + `<name>.json` (the rest), each written atomically."""
    tensors, structure = flatten_state(state)
    with atomic_path(os.path.join(folder, f"{name}.safetensors")) as tmp:
        save_file(tensors, tmp)
    write_json_atomic(structure, os.path.join(folder, f"{name}.json"))


def load_object_state(folder, name):
    paths = [os.path.join(folder, f"{name}.{ext}") for ext in ("safetensors", "json")]
    for path in paths:
        if not os.path.isfile(path):
            raise StateError(f"{path}: missing; the training state {folder} is incomplete")
    try:
        tensors = load_file(paths[0])
        with open(paths[1]) as f:
            structure = json.load(f)
    except Exception as e:  # safetensors' and json's own error types for damaged files
        raise StateError(f"{folder}: cannot read {name} ({type(e).__name__}: {e})") from e
    return unflatten_state(tensors, structure)


# ---- random states (one file pair per process) ----------------------------------------------------------------

class RandomState:
    """torch (CPU and every CUDA device), python and numpy generators of this process."""

    def state_dict(self):
        state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state):
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        np.random.set_state(state["numpy"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


# ---- model and optimizer: full state dicts, by parameter name ------------------------------------------------

def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def _is_optimizer(obj):
    return isinstance(obj, torch.optim.Optimizer)


def _raw_optimizer(obj):
    return getattr(obj, "optimizer", obj)  # accelerate's AcceleratedOptimizer wraps the torch one


def _sharded(model) -> bool:
    """FSDP shards the parameters (FSDP2: DTensors): the optimizer state must be gathered by torch's helpers."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters()) or "FullyShardedDataParallel" in type(model).__name__


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """Full (gathered) trainable weights on the CPU; a collective under FSDP (every process calls it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(cpu_offload=True, ignore_frozen_params=True))
    # ignore_frozen_params keeps the buffers (fp8's weight scales): they are the frozen model's, not trained
    trainable = _trainable_shapes(model)
    return {k: v for k, v in state.items() if k in trainable}


_WRAPPER_NAMES = ("module.", "_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def _clean_name(name) -> str:
    """A parameter's name as get_model_state_dict names it: no wrapper prefixes of DDP, torch.compile, checkpoint or
    FSDP1 wrappers."""
    for wrapper in _WRAPPER_NAMES:
        name = name.replace(wrapper, "") if wrapper != "module." else name.removeprefix("module.")
    return name


def _trainable_shapes(model) -> dict[str, tuple]:
    """{name: full shape} of the trainable parameters, named as get_model_state_dict names them (FSDP2 parameters
    report their full shape)."""
    return {_clean_name(name): tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}


def lora_weights(model, adapter="default") -> dict[str, torch.Tensor]:
    """Every weight of the peft adapter `adapter` (LoRA, LoHa, LoKr, DoRA) in `model`, full (gathered) and on the
    CPU, without gathering the frozen DiT: the trainable ones, and the frozen adapter weights of modules whose output
    is unused (their initial values, part of the file all the same). A collective under FSDP: every process calls
    it."""
    state = trainable_state_dict(model)
    for name, p in model.named_parameters():
        if not p.requires_grad and f".{adapter}." in f"{name}.":  # peft names adapter weights <part>.<adapter>[.*]
            state[_clean_name(name)] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
    return state


# ---- the folder ------------------------------------------------------------------------------------------------

def save_training_state(folder, model, objects: dict, process_index=0, num_processes=1, is_main=True, barrier=None,
                        info: dict | None = None):
    """Write a training state into `folder` (which must exist). Every process calls this: under FSDP gathering
    the weights and the optimizer state is collective. The main process writes the shared files, each process
    its random states; `barrier` (e.g. accelerator.wait_for_everyone) separates that from the manifest."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    weights = trainable_state_dict(model)
    states = {}
    for name, obj in objects.items():
        if _is_optimizer(obj) and _sharded(model):
            states[name] = get_optimizer_state_dict(model, _raw_optimizer(obj), options=_options(cpu_offload=True))
        else:
            states[name] = obj.state_dict()
    save_object_state(RandomState().state_dict(), folder, f"rng-{process_index}")
    if is_main:
        with atomic_path(os.path.join(folder, MODEL_FILE)) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp)
        for name, state in states.items():
            save_object_state(state, folder, name)
    if barrier:
        barrier()
    if is_main:
        write_json_atomic({"format": STATE_FORMAT, "version": STATE_VERSION, "objects": sorted(objects),
                           "num_processes": num_processes, **(info or {})}, os.path.join(folder, MANIFEST))


def read_manifest(folder) -> dict:
    """The state.json of a state folder, or a StateError saying why the folder cannot be resumed from."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        pickled = [f for f in os.listdir(folder) if f.endswith((".pkl", ".bin", ".pt"))] if os.path.isdir(folder) else []
        if pickled:
            raise StateError(f"{folder}: a training state in the old pickled format ({', '.join(sorted(pickled))}); "
                             "it is not loaded, because unpickling can run code. Start a new run, or continue from "
                             "its LoRA with --lora_checkpoint <output_path>/step-N.safetensors")
        raise StateError(f"{folder}: not a complete training state (no {MANIFEST}); it was cut short while being "
                         "written. Resume from an earlier state, or start without --resume_from_checkpoint")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise StateError(f"{path}: unreadable ({e})") from e
    if manifest.get("format") != STATE_FORMAT or manifest.get("version") != STATE_VERSION:
        raise StateError(f"{path}: not a {STATE_FORMAT} version {STATE_VERSION} (found {manifest.get('format')} "
                         f"version {manifest.get('version')})")
    return manifest


def check_setup(folder, setup: dict, num_processes: int = 1):
    """Refuse, before any model loads, a state written with other flags (another rank, targets, layout, ...) or by
    another number of processes."""
    manifest = read_manifest(folder)
    saved = {**SETUP_BEFORE_KEYS, **manifest.get("setup", {})}
    label = {"samples": "training samples (rows x --max_pixels areas x --dataset_repeat)",
             "lora_fused": "--lora_fused (content id; None: not given)"}
    differ = [f"{label.get(k, '--' + k)}: state {saved[k]!r}, this run {v!r}" for k, v in setup.items()
              if k in saved and saved[k] != v]
    if differ:
        raise StateError(f"{folder} was written by a run with other settings ({'; '.join(differ)}); resume with "
                         "the flags it was written with, or start anew without --resume_from_checkpoint")
    for name in [MODEL_FILE] + [f"{o}.safetensors" for o in manifest.get("objects", [])]:
        try:
            with safe_open(os.path.join(folder, name), "pt"):
                pass
        except Exception as e:  # missing or cut short: the state cannot be resumed, say so before models load
            raise StateError(f"{folder}: {name} is missing or damaged ({type(e).__name__}: {e}); resume from an "
                             "earlier state in its checkpoints folder, or start anew") from None
    # The data position (batches per process), the steps per epoch and so the lr schedule's length all depend on
    # the process count: resumed with another, the run would neither continue nor end as it was planned.
    written = manifest.get("num_processes", 1)
    if written != num_processes:
        raise StateError(f"{folder} was written by {written} process(es) and this run has {num_processes}: its data "
                         "position and lr schedule are per process count. Resume with --num_processes "
                         f"{written}, or start a new run from its LoRA with --lora_checkpoint (the optimizer state "
                         "starts anew)")


def load_training_state(folder, model, objects: dict, process_index=0) -> dict:
    """Restore what save_training_state wrote into `model` and `objects`; returns the manifest.

    Every check runs before anything changes: the registered objects must all be in the state and the trainable
    weights must have the same names and shapes (another --lora_rank or target list is an error naming both).
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    manifest = read_manifest(folder)
    missing = sorted(set(objects) - set(manifest["objects"]))
    if missing:
        raise StateError(f"{folder}: the state has no {', '.join(missing)} (it holds {', '.join(manifest['objects'])})"
                         "; it was written by a run with other options. Resume with that run's flags, or start anew")
    path = os.path.join(folder, MODEL_FILE)
    try:
        weights = load_file(path)
    except Exception as e:
        raise StateError(f"{path}: cannot read the trainable weights ({type(e).__name__}: {e})") from e
    want = _trainable_shapes(model)
    buffers = {_clean_name(name) for name, _ in model.named_buffers()}  # fp8 scales that older states hold
    weights = {k: v for k, v in weights.items() if k not in buffers}
    have = {k: tuple(v.shape) for k, v in weights.items()}
    if want != have:
        extra, absent = sorted(set(have) - set(want)), sorted(set(want) - set(have))
        shapes = [f"{k}: state {have[k]} vs model {want[k]}" for k in sorted(set(want) & set(have)) if want[k] != have[k]]
        raise StateError(
            f"{folder}: its trainable weights do not fit this run's ({len(shapes)} shape differences, e.g. "
            f"{'; '.join(shapes[:3]) or '-'}; {len(absent)} missing, e.g. {', '.join(absent[:3]) or '-'}; "
            f"{len(extra)} unexpected, e.g. {', '.join(extra[:3]) or '-'}). The state was written with another "
            "--lora_rank, --lora_target_modules, DiT or LoRA-vs-full setting: resume with the flags it was "
            "written with")
    states = {name: load_object_state(folder, name) for name in objects}
    rng_name = f"rng-{process_index}"
    rng = load_object_state(folder, rng_name) if os.path.isfile(os.path.join(folder, rng_name + ".json")) else None
    # Optimizers first: torch's loader may run one zero-lr step to create empty states; the weights come after.
    for name, obj in objects.items():
        if _is_optimizer(obj) and _sharded(model):
            optimizer = _raw_optimizer(obj)
            set_optimizer_state_dict(model, optimizer, _by_name(states[name], model, optimizer), options=_options())
        else:
            obj.load_state_dict(states[name])
    set_model_state_dict(model, weights, options=_options(strict=False))
    if rng is not None:
        RandomState().load_state_dict(rng)
    return manifest


def _by_name(state, model, optimizer) -> dict:
    """An optimizer state saved by one process or under DDP (keyed by parameter index, torch's own form) -> keyed by
    parameter name, the form torch's FSDP loader reads; a state saved under FSDP already is."""
    if all(isinstance(k, str) for k in state["state"]):
        return state
    names = {id(p): _clean_name(n) for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {"state": {order[i]: v for i, v in state["state"].items()},
            "param_groups": [dict(g, params=[order[i] for i in g["params"]]) for g in state["param_groups"]]}


def list_states(root) -> list[str]:
    """Complete state folders under `root` (`step-N` with a manifest), oldest first."""
    if not os.path.isdir(root):
        return []
    states = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith("step-") and name[5:].isdigit() and os.path.isfile(os.path.join(path, MANIFEST)):
            states.append(path)
    return sorted(states, key=lambda p: int(p.rsplit("-", 1)[-1]))
