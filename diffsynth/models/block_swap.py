"""Block swap: the frozen weights of the last N transformer blocks live in host memory and visit the GPU only
while their block runs, so that a DiT larger than the GPU trains and runs on it.

Each swapped block's frozen tensors (base weights, biases, norms, fp8 weights and their scales) are packed into
one flat host buffer, pinned when the device is CUDA, which IS the master copy: the block's parameters become
views of it. Before a swapped block runs, its buffer is copied to the device on a side stream, one or more blocks
ahead of use, so the copy overlaps the compute of the blocks before it; the block then runs on that transient
device copy, which is dropped after use. Nothing is copied back: frozen weights do not change. Trainable
parameters (LoRA) stay resident on the device and train as usual.

The swap sits around the call of a block (the DiT's block loop calls `BlockSwap.bind(i)`), never inside it, so a
compiled block (`block.compile()`) compiles the block's own computation only. With gradient checkpointing the
backward pass recomputes each block, which needs its weights again: the prefetch order follows the visits of a
training step, blocks 0..L-1 forward, then L-1..0 for the recompute, and the last block's copy is kept for the
recompute that follows immediately. Without checkpointing, autograd keeps each swapped block's device copy
alive until the backward pass (correct, but it saves nothing while training).

On the CPU the same code runs with the host store and the device copies as distinct CPU tensors (streams and
events are skipped), which is how the tests check that swapping changes no number.
"""
import weakref

import torch
import torch.nn as nn

_ALIGN = 256  # bytes; every tensor of a flat buffer starts at a multiple of this (vectorised kernels, cuBLAS)


def _unregister(ptr):
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # interpreter shutdown or CUDA already torn down: nothing left to release
        pass


def _pinned_empty(nbytes):
    """A host byte buffer the GPU can copy from asynchronously, -> (tensor, registered).

    The caching host allocator behind `pin_memory=True` rounds every allocation up to a power of two (a block of
    680 MB would take 1 GiB), so the buffer is allocated as ordinary memory and page-locked in place with
    cudaHostRegister, at its exact size; if that fails, the rounded pinned allocation is used."""
    flat = torch.empty(nbytes, dtype=torch.uint8)
    try:
        cudart = torch.cuda.cudart()
        if cudart.cudaHostRegister(flat.data_ptr(), nbytes, 0) == cudart.cudaError.success:
            return flat, True
    except Exception:
        pass
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), False


class _HostBlock:
    """The frozen tensors of one block packed into one flat host buffer; the block's modules hold views of it."""

    def __init__(self, block: nn.Module, pin: bool):
        entries, offset = [], 0
        for module in block.modules():
            for kind, table in (("param", module._parameters), ("buffer", module._buffers)):
                for attr, tensor in table.items():
                    if tensor is None or (kind == "param" and tensor.requires_grad):
                        continue
                    nbytes = tensor.numel() * tensor.element_size()
                    entries.append([module, kind, attr, tensor, offset, nbytes])
                    offset += -(-nbytes // _ALIGN) * _ALIGN
        self.nbytes = offset
        self.flat, registered = _pinned_empty(offset) if pin else (torch.empty(offset, dtype=torch.uint8), False)
        if registered:
            weakref.finalize(self, _unregister, self.flat.data_ptr())
        self.pinned = pin
        self.entries = []  # (module, kind, attr, the host view now in the module, offset, nbytes)
        for module, kind, attr, tensor, off, nbytes in entries:
            host = self._view(self.flat, off, nbytes, tensor)
            host.copy_(tensor.detach())
            if kind == "param":
                tensor.data = host  # the same Parameter object, now a view of the host buffer
                host = tensor
            else:
                module._buffers[attr] = host
            self.entries.append((module, kind, attr, host, off, nbytes))

    @staticmethod
    def _view(flat, offset, nbytes, like):
        return flat[offset:offset + nbytes].view(like.dtype).view(like.shape)

    def check(self, index):
        """The host views must still be what the modules hold: if a weight was replaced after the swap was set
        up (e.g. another fp8 conversion), the device copy would be stale, so refuse instead of computing garbage."""
        for module, kind, attr, host, off, _ in self.entries:
            table = module._parameters if kind == "param" else module._buffers
            current = table.get(attr)
            if current is not host or current.data_ptr() != self.flat.data_ptr() + off:
                raise RuntimeError(
                    f"block swap: {type(module).__name__}.{attr} of swapped block {index} was replaced after "
                    "enable_block_swap (LoRA injection, fp8 conversion or a dtype change must come first); call "
                    "enable_block_swap again")

    def install(self, tensors=None):
        """Put `tensors` (one per entry, e.g. the device copies or Nones) into the modules; default: the host
        views back."""
        for k, (module, kind, attr, host, *_) in enumerate(self.entries):
            (module._parameters if kind == "param" else module._buffers)[attr] = host if tensors is None else tensors[k]

    def device_tensors(self, flat):
        # Parameters stay Parameters: a compiled block guards on the type and would otherwise compile again.
        views = [(kind, self._view(flat, off, nbytes, host)) for _, kind, _, host, off, nbytes in self.entries]
        return [nn.Parameter(v, requires_grad=False) if kind == "param" else v for kind, v in views]


class _DeviceCopy:
    def __init__(self, flat, tensors, event):
        self.flat, self.tensors, self.event = flat, tensors, event


class BlockSwap:
    """Swaps the frozen weights of the last `num_blocks` blocks of `model.transformer_blocks` through `device`.

    `prefetch`: how many swapped blocks ahead of the running one are copied (1 overlaps one block's copy with
    the compute of the block before it; more smooths uneven blocks at the cost of one block of memory each).
    The device holds at most prefetch + 1 swapped blocks at a time.
    """

    def __init__(self, model: nn.Module, num_blocks: int, device, prefetch: int = 1):
        blocks = model.transformer_blocks
        if not 0 < num_blocks <= len(blocks):
            raise ValueError(f"blocks_to_swap {num_blocks}: the DiT has {len(blocks)} blocks; swap 1 to {len(blocks)}"
                             " (or 0 for none)")
        if prefetch < 1:
            raise ValueError(f"block swap prefetch {prefetch}: must be >= 1")
        self.model, self.device, self.prefetch = model, torch.device(device), prefetch
        self.num_layers = len(blocks)
        self.swapped = list(range(len(blocks) - num_blocks, len(blocks)))
        cuda = self.device.type == "cuda"
        self.host = {i: _HostBlock(blocks[i], pin=cuda) for i in self.swapped}
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self.cache = {}  # block index -> _DeviceCopy in flight or ready
        self.copies = 0  # host-to-device block copies made (tests count them)
        self.trace = None  # a list to append ("copy" | "run", block) events to, for tests of the order
        # DDP must neither broadcast nor check the device of host tensors; it reads this attribute of the model.
        names = {id(h): f"transformer_blocks.{i}.{n}" for i in self.swapped
                 for n, h in list(blocks[i].named_parameters()) + list(blocks[i].named_buffers())}
        model._ddp_params_and_buffers_to_ignore = sorted(
            names[id(host)] for h in self.host.values() for *_, host, _, _ in h.entries if id(host) in names)

    def host_bytes(self) -> int:
        return sum(h.nbytes for h in self.host.values())

    # ---- the visit order ------------------------------------------------------------------------------------

    def _upcoming(self, position, recompute):
        """The next `prefetch` distinct swapped blocks after `position` in the cyclic visit order: forward
        0..L-1, then (recompute) backward L-1..0, then the next step's forward."""
        n = self.num_layers
        cycle = 2 * n if recompute else n
        out = []
        for k in range(1, cycle + 1):
            p = (position + k) % cycle
            block = p if p < n else 2 * n - 1 - p
            if block in self.host and block not in out:
                out.append(block)
                if len(out) == self.prefetch:
                    break
        return out

    # ---- copies ----------------------------------------------------------------------------------------------

    def _fetch(self, index):
        if index in self.cache:
            return self.cache[index]
        host = self.host[index]
        host.check(index)
        if self.copy_stream is not None:
            # Allocated and filled on the side stream: the compute stream keeps running meanwhile.
            with torch.cuda.stream(self.copy_stream):
                flat = torch.empty(host.nbytes, dtype=torch.uint8, device=self.device)
                flat.copy_(host.flat, non_blocking=host.pinned)
                event = torch.cuda.Event()
                event.record(self.copy_stream)
        else:
            flat = torch.empty(host.nbytes, dtype=torch.uint8, device=self.device)
            flat.copy_(host.flat)
            event = None
        self.copies += 1
        if self.trace is not None:
            self.trace.append(("copy", index))
        copy = self.cache[index] = _DeviceCopy(flat, host.device_tensors(flat), event)
        return copy

    def _ready(self, copy):
        if copy.event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(copy.event)
            # The buffer was allocated on the side stream: its memory must not be reused before this stream
            # is done with it.
            copy.flat.record_stream(stream)
            copy.event = None
        return copy.tensors

    def _keep_only(self, keep):
        for index in [i for i in self.cache if i not in keep]:
            del self.cache[index]  # autograd may still hold the tensors; the memory goes when it lets go

    # ---- running a block -------------------------------------------------------------------------------------

    def bind(self, index):
        """A callable running block `index` as the block would run, with its weights on the device. Bound once
        per forward pass: its first call is the forward visit, any later call the checkpoint's recompute."""
        calls = [0]

        def run(*args, **kwargs):
            backward = calls[0] > 0
            calls[0] += 1
            recompute = backward or (torch.is_grad_enabled() and self.model.gradient_checkpointing)
            position = 2 * self.num_layers - 1 - index if backward else index
            return self._run(index, position, recompute, args, kwargs)

        return run

    def _run(self, index, position, recompute, args, kwargs):
        block = self.model.transformer_blocks[index]
        upcoming = self._upcoming(position, recompute)
        current = self._fetch(index) if index in self.host else None
        for j in upcoming:
            self._fetch(j)
        self._keep_only(set(upcoming) | ({index} if current else set()))
        if self.trace is not None:
            self.trace.append(("run", index))
        if current is None:
            return block(*args, **kwargs)
        host = self.host[index]
        tensors = self._ready(current)
        # The block's modules hold the device copies for the duration of the call, then their host views again.
        host.install(tensors)
        try:
            out = block(*args, **kwargs)
        finally:
            host.install()
        if index not in upcoming:
            self.cache.pop(index, None)
        return out

    # ---- placement -------------------------------------------------------------------------------------------

    def detached(self):
        """Context in which the modules hold None in place of the host tensors, so that `model.to(device)`
        (accelerate's prepare, the pipeline's offload) moves only the resident part."""
        return _Detached(self)

    def close(self):
        """Stop swapping: drop the device copies and the DDP ignore list. The weights stay in host memory (views
        of the host buffers); move the model to put them anywhere else."""
        self.cache.clear()
        self.model.__dict__.pop("_ddp_params_and_buffers_to_ignore", None)



class _Detached:
    def __init__(self, swap):
        self.swap = swap

    def __enter__(self):
        for h in self.swap.host.values():
            h.install([None] * len(h.entries))  # None keeps each key in its place

    def __exit__(self, *exc):
        for h in self.swap.host.values():
            h.install()
