"""Weight files: resolving file sets, reading safetensors, writing atomically.

Only safetensors are read here; nothing in the project unpickles weights.
"""
import contextlib
import glob
import json
import os
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


class WeightFileError(ValueError):
    """A weight file or file set that cannot be used as given."""


def resolve_safetensors_files(paths) -> list[str]:
    """One file, a list, a directory or a sharded index json -> the list of .safetensors files, in order.

    A directory holding an index json (e.g. `transformer/`) yields the shards it names; otherwise all the
    `.safetensors` files in it, sorted. Every file must exist: a missing shard is an error naming it.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for path in map(str, paths):
        if os.path.isdir(path):
            indexes = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors.index.json")))
            if indexes:
                files += resolve_safetensors_files(indexes)
                continue
            found = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))
            if not found:
                raise WeightFileError(f"{path}: directory holds no .safetensors file and no index json")
            files += found
        elif path.endswith(".json"):
            if not os.path.isfile(path):
                raise WeightFileError(f"{path}: index file not found")
            with open(path) as f:
                weight_map = json.load(f).get("weight_map")
            if not weight_map:
                raise WeightFileError(f"{path}: not a safetensors index (no 'weight_map')")
            base = os.path.dirname(path)
            shards = list(dict.fromkeys(weight_map.values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(base, s))]
            if missing:
                raise WeightFileError(
                    f"{path}: {len(missing)} of {len(shards)} shards are missing: "
                    + ", ".join(os.path.join(base, s) for s in missing)
                    + ". Download the complete file set."
                )
            files += [os.path.join(base, s) for s in shards]
        elif path.endswith(".safetensors"):
            if not os.path.isfile(path):
                raise WeightFileError(f"{path}: file not found")
            files.append(path)
        else:
            raise WeightFileError(
                f"{path}: unsupported weight file; only .safetensors files, directories of them and "
                "*.safetensors.index.json are loaded (pickled .bin/.pt/.ckpt files are refused for safety)"
            )
    return list(dict.fromkeys(files))


def check_safetensors_file(file):
    """A file whose header cannot be read, or that is shorter than its header says (a cut-off download), is an
    error naming it; read from the header only."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError(f"header of {n} bytes does not fit")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise WeightFileError(f"{file}: not a readable safetensors file ({e}); download or write it again") from None
    if size < 8 + n + end:
        raise WeightFileError(f"{file}: truncated: {size:,} bytes, its header needs {8 + n + end:,}. The download or "
                              "write was cut short: get the file again")


def read_keys_and_shapes(files) -> dict[str, tuple]:
    """Tensor names and shapes of a file set, read from the headers only (no tensor is loaded); each file is
    checked to be complete first."""
    shapes = {}
    for file in files:
        check_safetensors_file(file)
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
    torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def read_meta_tensors(file) -> dict[str, torch.Tensor]:
    """The file's tensors as meta tensors (names, shapes, dtypes; no data read)."""
    dtypes = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
    with safe_open(file, framework="pt") as f:
        return {k: torch.empty(f.get_slice(k).get_shape(), dtype=dtypes[f.get_slice(k).get_dtype()], device="meta")
                for k in f.keys()}


def save_safetensors_streaming(path, plan: dict, chunks, metadata: dict | None = None):
    """Write one safetensors file from `chunks` (dicts of tensors) holding one chunk at a time.

    `plan`: {name: tensor on the meta device} of every tensor the chunks will bring, in any order: the header,
    which lists all of them with their offsets, comes first in the file, and each tensor is then written at its
    offset. Written to a temporary name and renamed only when every planned tensor was written.
    """
    header, offsets, offset = {}, {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, t in plan.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offsets[name], offset = offset, offset + size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    start, missing = 8 + len(encoded), set(plan)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for chunk in chunks:
            for name, tensor in chunk.items():
                want = plan.get(name)
                if want is None or tensor.shape != want.shape or tensor.dtype != want.dtype:
                    raise ValueError(f"streamed tensor {name} {tuple(tensor.shape)} {tensor.dtype} does not match "
                                     f"the plan ({None if want is None else (tuple(want.shape), want.dtype)})")
                f.seek(start + offsets[name])
                f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                missing.discard(name)
        if missing:
            raise ValueError(f"{len(missing)} planned tensors never came: {', '.join(sorted(missing)[:5])}")



def loading(files, desc, enabled=True):
    """Yield `files` while a progress bar counts their bytes (shown on a terminal): loading a 40 GB model takes
    minutes, and a silent wait looks like a hang."""
    from tqdm.auto import tqdm

    sizes = [os.path.getsize(f) for f in files]
    with tqdm(total=sum(sizes), desc=desc, unit="B", unit_scale=True, disable=None if enabled else True,
              leave=False) as bar:
        for file, size in zip(files, sizes):
            yield file
            bar.update(size)


def check_not_input(output, input_files, folder_output=False):
    """Refuse an output that would overwrite an input of the same conversion (a file, a shard, the index json, or
    for a sharded output the folder the inputs live in), before anything is written."""
    real = os.path.realpath(output)
    inputs = {os.path.realpath(f) for f in input_files}
    if real in inputs:
        raise WeightFileError(f"--output {output} is one of the input files; write the result to a new path (the "
                              "input must stay intact until the output is complete)")
    if folder_output and real in {os.path.dirname(f) for f in inputs}:
        raise WeightFileError(f"--output {output} is the folder the input files are in; a sharded output there would "
                              "overwrite their shards and index json: choose another folder")


def read_metadata(file) -> dict:
    with safe_open(file, framework="pt") as f:
        return dict(f.metadata() or {})


def config_beside(files, what, repo_file) -> dict:
    """The config.json in the folder of a weight file set (as every official model folder has one)."""
    path = os.path.join(os.path.dirname(files[0]), "config.json")
    if not os.path.isfile(path):
        raise WeightFileError(f"{path}: {what} config not found; it must sit beside {files[0]} "
                              f"(download `{repo_file}` from the model repo together with the weights)")
    with open(path) as f:
        return json.load(f)


def check_state_dict(model: torch.nn.Module, state_dict: dict, source: str):
    """Raise a WeightFileError listing missing, unexpected and mis-shaped keys (the first few of each)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{k} {tuple(state_dict[k].shape)} != {expected[k]}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != expected[k]
    )
    problems = [
        f"{len(keys)} {what}: " + ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
        if keys
    ]
    if problems:
        raise WeightFileError(
            f"{source}: weights do not fit {type(model).__name__} built from its config.json; "
            + "; ".join(problems)
            + ". Check that the file and the config.json beside it belong to the same model."
        )


def load_safetensors(file, device="cpu") -> dict[str, torch.Tensor]:
    device = torch.device(device)
    try:  # safetensors refuses "cpu:0", which accelerate uses for CPU processes
        return load_file(file, device="cpu" if device.type == "cpu" else str(device))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise WeightFileError(f"{file}: not a readable safetensors file ({e})") from e


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success rename it onto `path`, on failure remove it.

    A crash or an exception never leaves a partial file at `path`.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; give the file the usual mode
        fd = os.open(tmp, os.O_RDONLY)
        try:  # the data reaches the disk before the new name does: after a power loss, the old file or the new one
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_safetensors(state_dict: dict, path, metadata: dict | None = None):
    """Write a safetensors file atomically; metadata values are stored as strings."""
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def write_json_atomic(obj, path):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
