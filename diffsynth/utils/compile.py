"""Regional compilation of a DiT: each transformer block's forward goes through torch.compile.

Why per block and not the whole model: the 60 blocks are identical, so one compiled graph serves all of them
(compiling the model would unroll 60 copies: minutes more); and what runs between blocks stays eager, so
offloading and per-block hooks (block swapping, FSDP) wrap compiled code without being traced into it. Only
`forward` is compiled, never the module's `__call__`: hooks registered on a block run outside the graph.

Gradient checkpointing goes inside the graph of a checkpointed block when it can (our DiTs, without the offload or
block swap: `checkpoint_in_graph`): the compiled forward then calls torch.utils.checkpoint around the block's code,
and AOTAutograd puts the recompute into the backward graph. There it recomputes only what the backward needs, fused
with the backward's kernels: not the MLPs' output projections (their outputs feed only the residual sum, whose
gradient needs none of them), a third of the forward's matmul work, which a checkpoint around the compiled forward
runs again (tests/test_compile.py counts the FLOPs of both graphs). Selective checkpointing's policy applies
there too. The block's hooks still run once, around the forward.

How many graphs compile (each once, then shared by all blocks):
- the first block separately from the others: its inputs come from frozen layers and carry no gradient;
- with and without a text-padding mask (a batch of prompts of different lengths pads them);
- training (grad) and inference (no grad, e.g. validation images);
- with --blocks_to_checkpoint, the blocks checkpointed inside their graph and those that are not.
The token dims (image size, prompt length) are marked dynamic, so a new aspect bucket, --max_pixels area or prompt
length does not recompile; a new batch size recompiles once, after which the batch dim is dynamic as well. A run
therefore compiles at most 2 x 2 x 2 x 2 x 2 block graphs, usually 2 to 4; `CompileWatch` says each time it happens
and how long it took.
"""
import contextlib
import functools
import inspect
import time
import types

import torch

# Above torch's default of 8 graphs per function: the combinations above may reach 16 for one block class.
RECOMPILE_LIMIT = 32


def compiled_graphs() -> int:
    """Graphs dynamo has compiled so far in this process (all compiled functions)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _unview(x):
    # The first block gets views (a Linear on a 3-d input returns one), the others fresh tensors; with a symbolic
    # batch size dynamo guards on a view's base, so the first block would compile once more. A detached alias is no
    # view, and without grad detaching changes nothing.
    return x.detach() if isinstance(x, torch.Tensor) and x._base is not None and not x.requires_grad else x


def _dynamic_marker(cls):
    """-> fn(block, args, kwargs) -> (args, kwargs) marking the dims named by `cls.dynamic_dims` ({argument: dims})
    dynamic; None if the class names none (torch's automatic dynamic shapes then apply: a changed size recompiles
    once, dynamically)."""
    dims = getattr(cls, "dynamic_dims", None)
    if not dims:
        return None
    signature = inspect.signature(cls.forward)

    def mark(block, args, kwargs):
        args, kwargs = tuple(map(_unview, args)), {k: _unview(v) for k, v in kwargs.items()}
        for name, value in signature.bind(block, *args, **kwargs).arguments.items():
            for tensor in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(tensor, torch.Tensor):
                    for dim in dims.get(name, ()):
                        torch._dynamo.maybe_mark_dynamic(tensor, dim)  # a size of 1 stays static (0/1 rule)
        return args, kwargs
    return mark


def _checkpointing(forward, checkpoint_options):
    """`forward` run under torch.utils.checkpoint: compiled, the checkpoint is part of the graph."""
    def run(self, *args, **kwargs):
        return torch.utils.checkpoint.checkpoint(functools.partial(forward, self), *args, **checkpoint_options,
                                                 **kwargs)
    return run


def compile_blocks(model: torch.nn.Module, **options) -> int:
    """Compile the forward of every block in `model.transformer_blocks` (ours or diffusers'); one compiled function
    per block class, shared by the blocks. Inject LoRA, convert to fp8 and enable checkpointing BEFORE calling this
    (they change what the forward traces). Extra `options` go to torch.compile (e.g. mode). Returns the block count.
    Compilation itself happens on the first call."""
    blocks = model.transformer_blocks
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    first_in_graph = model.checkpoint_in_graph() if hasattr(model, "checkpoint_in_graph") else None
    compiled = {}
    for i, block in enumerate(blocks):
        if getattr(block, "_compiled_forward", False):
            continue
        in_graph = first_in_graph is not None and i >= first_in_graph
        cls = type(block)
        if (cls, in_graph) not in compiled:
            plain = compiled[cls, False][0] if (cls, False) in compiled else torch.compile(cls.forward, **options)
            checkpointing = (torch.compile(_checkpointing(cls.forward, model.checkpoint_options()), **options)
                             if in_graph else None)
            compiled[cls, in_graph] = (plain, checkpointing, _dynamic_marker(cls))
        fn, checkpointing, mark = compiled[cls, in_graph]

        def forward(self, *args, _fn=fn, _checkpointing=checkpointing, _mark=mark, **kwargs):
            if _mark is not None:
                args, kwargs = _mark(self, args, kwargs)
            if _checkpointing is not None and torch.is_grad_enabled():
                return _checkpointing(self, *args, **kwargs)
            return _fn(self, *args, **kwargs)

        block.forward = types.MethodType(forward, block)  # an instance attribute: __call__ and its hooks stay eager
        block._compiled_forward = True
        block.checkpoints_in_graph = in_graph
    model._compile_watch = CompileWatch()
    return len(blocks)


def is_compiled(model) -> bool:
    return getattr(model, "_compile_watch", None) is not None


class CompileWatch:
    """Makes compilation visible in the progress output: before the first call a line says that the blocks are being
    compiled, after any call that compiled something a line says how long it took and how many graphs exist."""

    def __init__(self):
        self.calls = 0

    @contextlib.contextmanager
    def __call__(self, log=print, what="step"):
        first = self.calls == 0
        self.calls += 1
        if first:
            log(f"compiling DiT blocks (first {what})...")
        before, start = compiled_graphs(), time.perf_counter()
        yield
        new = compiled_graphs() - before
        if first or new:
            seconds = time.perf_counter() - start
            log(f"compiled DiT blocks: {new} graph(s) in {seconds:.1f} s, this {what} included"
                + ("" if first else " (a new batch size, text padding or grad mode; the token counts are dynamic)"))


def watch_compile(model, log=print, what="step"):
    """Context manager around a call of `model` (unwrapped): announces compilation if `model`'s blocks are compiled,
    does nothing otherwise."""
    model = getattr(model, "module", model)  # DDP's wrapper
    watch = getattr(model, "_compile_watch", None)
    return watch(log, what) if watch is not None else contextlib.nullcontext()
