"""Several processes through accelerate: DDP, FSDP2 and DeepSpeed, checked so that a configuration never silently
runs as another one.

accelerate turns an FSDP (or DeepSpeed) config into FSDP only on accelerators: on the CPU its state says
MULTI_CPU, it wraps the model in DDP, and every process holds the whole model (accelerate 1.15, state.py:
`AcceleratorState.__init__` switches to FSDP only from MULTI_GPU-like types; DeepSpeed needs `not cpu`). For
FSDP2 the difference is only that check: `fully_shard` runs on CPU processes with gloo. So on the CPU an FSDP2
config is made real here (the state is switched to FSDP with the plugin accelerate builds from the launcher's
environment, before anything is prepared); FSDP1 and DeepSpeed, which cannot run there, are refused with a
message instead of training as DDP.
"""
import os


class DistributedSetupError(ValueError):
    """A multi-process configuration that would not do what it says; the message names the fix."""


def _env_flag(name):
    return os.environ.get(name, "false").lower() == "true"


def launch_environment() -> tuple[int, bool]:
    """(processes, FSDP) as the launcher (accelerate launch / torchrun) set them, readable before accelerate starts:
    what the dry run plans for."""
    return int(os.environ.get("WORLD_SIZE", "1")), _env_flag("ACCELERATE_USE_FSDP")


def reports_errors() -> bool:
    """Whether this process prints a stopping error: one process per machine (the local main), not all of them
    (each would print the same line). A single process always does."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def check_launch_environment():
    """Refuse, before accelerate starts, the accelerate configs that cannot run a LoRA run (accelerate itself would
    stop some of them with a traceback on the CPU)."""
    if _env_flag("ACCELERATE_USE_FSDP"):
        if os.environ.get("FSDP_VERSION", "1") != "2":
            raise DistributedSetupError(
                "the accelerate config asks for FSDP version 1, which cannot shard a LoRA run (it flattens frozen "
                "bf16 and trainable fp32 weights into one tensor): set fsdp_version: 2 (accelerate_config_fsdp.yaml)")
        if _env_flag("FSDP_ACTIVATION_CHECKPOINTING"):
            raise DistributedSetupError(
                "the accelerate config sets fsdp_activation_checkpointing: true, whose wrappers rename the DiT's "
                "modules, so no LoRA could be saved: set it to false and pass --use_gradient_checkpointing (the "
                "trainer checkpoints the DiT's blocks itself)")


def ignore_frozen_in_ddp(model) -> int:
    """DDP broadcasts every parameter and buffer from process 0 when it wraps the model, and the buffers again
    before each forward. The frozen weights and the buffers are loaded or computed alike on every process, so they
    are left out: the broadcast shrinks from the whole DiT (~40 GB in bf16) to the trainable weights, and fp8
    weights, which gloo cannot send, need no sending. Returns how many tensors are left out."""
    from torch.nn.parallel import DistributedDataParallel

    names = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return len(names)


def setup_distributed(accelerator, args):
    """Check (and on the CPU, complete) the distributed setup before the model is prepared."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if _env_flag("ACCELERATE_USE_DEEPSPEED") and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise DistributedSetupError(
            "the accelerate config asks for DeepSpeed, but accelerate runs DeepSpeed only on GPUs: here it would "
            "silently train with DDP. Use accelerate_config_ddp.yaml or accelerate_config_fsdp.yaml (FSDP2 runs on "
            "the CPU too)")
    if _env_flag("ACCELERATE_USE_FSDP") and accelerator.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch exports
        # As accelerate's own FSDP setup does on GPUs: both shared states say FSDP (a later AcceleratorState()
        # copies PartialState's).
        from accelerate.state import PartialState

        state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        state.fsdp_plugin = plugin
    if accelerator.distributed_type == DistributedType.FSDP:
        if args.blocks_to_swap:
            raise DistributedSetupError(
                "--blocks_to_swap and FSDP both manage where the DiT's weights live: use one of them (FSDP "
                "shards the weights over the GPUs; block swap moves them through one GPU)")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        if args.blocks_to_swap:
            raise DistributedSetupError("--blocks_to_swap cannot be combined with DeepSpeed; use DDP or one GPU")
        config = state.deepspeed_plugin.deepspeed_config
        # accelerate takes DeepSpeed's batch size from the prepared data loaders; the trainer's is its own
        # (bucket sampler), so the sizes are set here (else prepare() stops: "requires you to pass at least one of
        # training or evaluation dataloaders").
        config["train_micro_batch_size_per_gpu"] = args.batch_size
        config["train_batch_size"] = args.batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        for key, flag, value in (("gradient_accumulation_steps", "--gradient_accumulation_steps",
                                  args.gradient_accumulation_steps),
                                 ("gradient_clipping", "--max_grad_norm", args.max_grad_norm)):
            if config.get(key, "auto") not in ("auto", value):
                raise DistributedSetupError(f"the DeepSpeed config has {key}: {config[key]} but the trainer has "
                                            f"{flag} {value}; make them equal")


def held_parameter_bytes(model) -> tuple[int, int]:
    """(bytes of parameters this process holds, bytes of the whole model's parameters). Under FSDP2 each
    parameter is a DTensor whose local shard is what the process holds."""
    held = total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        held += local.numel() * local.element_size()
        total += p.numel() * p.element_size()
    return held, total


def describe_sharding(accelerator, model) -> str:
    held, total = held_parameter_bytes(model)
    kind = str(accelerator.distributed_type).split(".")[-1]
    kind = "FSDP2" if kind == "FSDP" else "DDP" if kind.startswith("MULTI_") else kind
    return (f"process {accelerator.process_index} of {accelerator.num_processes} ({kind}) holds "
            f"{held / 2**20:.2f} MiB of the DiT's {total / 2**20:.2f} MiB of parameters")


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP

