"""The training loop: accelerate for processes, mixed precision and accumulation; flow-matching loss on the
target tokens of Qwen-Image-Edit; LoRA or full fine-tuning of the standard or merged-QKV DiT."""
import contextlib
import csv
import gc
import glob
import json
import math
import os
import re
import shutil
import sys
import time

import torch
from tqdm.auto import tqdm

from ..lora import fuse_lora, inject_lora, load_lora_weights, lora_state_dict, save_lora
from ..lora.adapters import KEEP_FP32
from ..lora.convert import convert_lora_file
from ..utils.compile import watch_compile
from ..utils.image import SIZE_MULTIPLE
from ..utils.io import atomic_path, read_metadata, save_safetensors
from .args import EXPORT_FORMATS
from .conditioning import ConditionCache, collate_conditions, condition_sample, content_id
from .checkpoint import check_setup, list_states, load_training_state, lora_weights, save_training_state
from .dataset import BucketBatchSampler, DatasetError, EditDataset, area_summary, collate_fn, parse_file_keys
from .distributed import (
    check_launch_environment, describe_sharding, ignore_frozen_in_ddp, is_fsdp, reports_errors, setup_distributed,
)
from .ema import create_ema, ema_weights
from .optim import create_lr_scheduler, create_optimizer, evaluation_weights, loraplus_groups, resolve_optimizer
from .output_dir import OutputDirError, claim, previous_run_files, trim_log
from .preflight import preflight
from .timesteps import TimestepSampling

LOG_COLUMNS = ["step", "epoch", "loss", "lr", "seconds"]


class NonFiniteError(RuntimeError):
    """A NaN or inf in the loss, the gradients or the trained weights: the run stops, its last good checkpoint kept.
    `weights_of_step`: the step after which the weights that gave it were made (None: they were never saved)."""

    def __init__(self, message, weights_of_step=None):
        super().__init__(message)
        self.weights_of_step = weights_of_step



class TrainState:
    """Progress counters, saved in every training state. Each sample draws its noise and timestep from a
    generator seeded by (seed, epoch, its position in the repeated dataset), not from a running generator: a
    resumed run draws exactly what the uninterrupted run drew, and a step's samples get the same noise whether
    one process takes them as one batch or several processes share them (so 1 GPU at batch 2 and 2 GPUs at
    batch 1 train alike)."""

    def __init__(self, seed, process_index):
        self.seed, self.process_index = seed, process_index
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0

    def sample_generators(self, positions):
        return [torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_033 + p) % 2**63)
                for p in positions]

    def state_dict(self):
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state):
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]


def flow_matching_loss(dit, scheduler, cond, generator, timesteps: TimestepSampling | None = None):
    """MSE between the DiT's velocity and noise - x0 on the target tokens, weighted per sample; `timesteps` says
    how sigmas are drawn and weighted (default: the scheduler's own training scheme). `generator`: one for the
    batch, or a list with one per sample (each sample's sigma, then its noise)."""
    timesteps = timesteps or TimestepSampling()
    x0, edit = cond["latents"], cond["edit_latents"]
    batch = x0.shape[0]
    if isinstance(generator, (list, tuple)):
        sigma = torch.cat([timesteps.sample(scheduler, 1, g, image_seq_len=x0.shape[1]) for g in generator])
        noise = torch.cat([torch.randn((1, *x0.shape[1:]), generator=g) for g in generator]).to(x0.device, x0.dtype)
    else:
        sigma = timesteps.sample(scheduler, batch, generator, image_seq_len=x0.shape[1])
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    x_t = scheduler.add_noise(x0, noise, sigma.to(x0.device, x0.dtype))
    x = x_t if edit is None else torch.cat([x_t, edit], dim=1)
    pred = dit(x, cond["prompt_emb"], cond["prompt_mask"], sigma.to(x0.device, x0.dtype), [cond["shapes"]] * batch)
    pred = pred[:, : x0.shape[1]]
    target = scheduler.training_target(x0, noise)
    if cond.get("mask") is None:
        per_sample = (pred.float() - target.float()).pow(2).mean(dim=(1, 2))
    else:  # masked loss: the mean over the tokens weighted by the mask (a black mask contributes nothing)
        per_token = (pred.float() - target.float()).pow(2).mean(dim=2)
        mask = cond["mask"].float()
        per_sample = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-6)
    return (per_sample * timesteps.weight(scheduler, sigma).to(per_sample.device)).mean()


def _write_loss_plot(log_path, out_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    steps, losses = [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path + ".tmp.png")
    plt.close(fig)
    os.replace(out_path + ".tmp.png", out_path)


class Trainer:
    def __init__(self, args):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

        from .options import trackers

        self.args = args
        check_launch_environment()  # configs accelerate cannot run a LoRA with, before it starts
        mixed = args.mixed_precision
        if mixed == "auto":
            mixed = "bf16" if torch.cuda.is_available() else "no"
        # Without an accelerator, several processes (torchrun / `accelerate launch --multi_gpu`) train on the CPU
        # with gloo: accelerate only sets that up when asked for the CPU.
        self.accelerator = Accelerator(
            cpu=not torch.accelerator.is_available(), mixed_precision=mixed,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.find_unused_parameters)],
            log_with=trackers(args) or None,
            project_config=ProjectConfiguration(args.output_path, os.path.join(args.output_path, "tensorboard")),
        )
        set_seed(args.seed)
        self.state = TrainState(args.seed, self.accelerator.process_index)
        # What a training state saves and resume restores besides the trainable weights (checkpoint.py): any
        # object with state_dict()/load_state_dict() whose state is tensors and json-able values. Register more
        # (EMA, ...) here by name; optimizers are saved unsharded by parameter name.
        self.checkpointed = {"train_state": self.state}
        self.state_written_at = None  # the step of this output folder's newest training state
        self.saves = []  # (step, path) of every checkpoint file and state folder this run wrote (main process)
        self.log = self.accelerator.print

    def _auto_checkpointed_blocks(self, dit):
        """--blocks_to_checkpoint auto: the fewest checkpointed blocks with which the VRAM planner fits this run (the
        loaded DiT's shapes, these flags) into --vram_budget or, without one, the GPU memory this process can have;
        None (every block) without either."""
        from ..utils import vram_planner as vp

        args, acc = self.args, self.accelerator
        if args.vram_budget:
            budget, where = vp.parse_vram(args.vram_budget), f"--vram_budget {args.vram_budget}"
        elif acc.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(acc.device)
            budget = free + torch.cuda.memory_reserved(acc.device)  # what other processes leave, ours included
            where = f"this GPU's {budget / vp.GIB:.1f} GiB"
        else:
            self.log("--blocks_to_checkpoint auto: no GPU and no --vram_budget to plan for: every block is checkpointed")
            return None
        kept, said = vp.auto_checkpointed_blocks(args, budget, dit.config, acc.num_processes, is_fsdp(acc))
        self.log(f"--blocks_to_checkpoint auto, {where}: {said}")
        return kept

    def release(self):
        """Give the output folder's lock back (at the end of train(), and when a run stops on an error)."""
        if getattr(self, "output_dir", None) is not None:
            self.output_dir.release()

    # ---- setup ---------------------------------------------------------------------------------------------

    def setup(self):
        from ..pipelines.qwen_image import QwenImagePipeline

        args, acc = self.args, self.accelerator
        # 0. The LoRA and validation files must be usable, the state to resume must exist: checked first.
        preflight(args, dataset=False)
        self.resume_from = self._resume_path() if args.resume_from_checkpoint else None
        setup_distributed(acc, args)  # before anything is prepared: FSDP2 on the CPU, refusals
        if args.vram_budget:
            from ..utils.vram_planner import plan_report

            self.log(plan_report(args, acc.num_processes, is_fsdp(acc)))
        resolve_optimizer(args.optimizer)  # an optimizer that cannot be imported fails before anything loads
        self.export_copy = True  # the standard-layout copy of each LoRA checkpoint (export_copy_name)
        if args.lora_base_model and args.lora_type == "dora" and args.export_format not in ("comfyui", "kohya"):
            self.log("note: ComfyUI reads a DoRA's magnitude only as dora_scale (--export_format comfyui or kohya); "
                     "it drops the lora_magnitude_vector of the files this run writes and applies plain LoRA deltas")
        self.timesteps = TimestepSampling.from_args(args)
        # 1. The data first: every bad row is reported before any model loads.
        self.dataset = EditDataset(args.dataset_metadata_path, args.dataset_base_path, args.data_file_keys,
                                   args.max_pixels, args.height, args.width, args.edit_image_area, args.dataset_repeat)
        self.sampler = BucketBatchSampler(self.dataset, args.batch_size, shuffle=True, seed=args.seed,
                                          num_replicas=acc.num_processes, rank=acc.process_index)
        self.log("\n".join([self.sampler.bucket_summary(), *area_summary(self.dataset.samples)]))
        self.steps_per_epoch = math.ceil(len(self.sampler) / args.gradient_accumulation_steps)
        every = args.save_every_n_epochs
        if every not in (0, 1) and args.num_epochs is not None:  # an explicit N: does the run reach epoch N?
            epochs = (min(args.num_epochs, args.max_steps // self.steps_per_epoch) if args.max_steps
                      else args.num_epochs)
            if epochs < every:
                raise ValueError(f"--save_every_n_epochs {every} would write no epoch file: this run completes "
                                 f"{epochs} epoch(s) ({self.steps_per_epoch} steps each, --max_steps "
                                 f"{args.max_steps}); give a smaller N, or leave it out")
        # A state to resume must fit these flags, data and processes. Then the output folder is claimed: it belongs
        # to this run, unless it holds another run's files (kept unless this run resumes from its own state there;
        # with --overwrite they are deleted once the models have loaded, so a run that stops before that loses none).
        if self.resume_from:
            check_setup(self.resume_from, self.setup_info(), acc.num_processes)
        # read again after preflight's check (a few rows): the samples, their resolved edit images
        from .validation import validation_samples

        self.validation_samples = validation_samples(args)
        inputs = [("--lora_checkpoint", args.lora_checkpoint), ("--lora_fused", args.lora_fused),
                  ("--validation_prompts", args.validation_prompts)]
        inputs += [(f"--validation_prompts {s.where}: edit_image" if s.folder else "--validation_edit_image", path)
                   for s in self.validation_samples for path in s.edit_images]
        self.output_dir = claim(args.output_path, self._resumes_own_state(), args.overwrite, acc, inputs)
        if self.output_dir is not None and self.output_dir.removed_temp:
            self.log(f"removed {len(self.output_dir.removed_temp)} temporary file(s) of an interrupted run: "
                     f"{', '.join(self.output_dir.removed_temp[:5])}")

        # 2. Models. With a conditioning cache the text encoder and VAE load only if the cache is incomplete.
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision, torch.float32)
        self.cache = None
        if args.cache_conditioning is not None:
            # The DiT's repo is part of the model list: an Edit-2511 DiT (zero_cond_t) takes another prompt template.
            models = {k: getattr(args, k) for k in ("model_id_with_origin_paths", "model_paths", "models_dir",
                                                     "tokenizer_path", "processor_path", "edit_plus")}
            if args.caption_dropout_rate:  # these cache files also hold the dropped-caption embedding
                models["caption_dropout"] = True
            self.cache = ConditionCache(args.cache_conditioning or os.path.join(args.output_path, "cache"),
                                        {**models, "dtype": str(dtype)})
        # Every process lists the missing samples before any process writes one (the barrier): the lists agree,
        # and the processes split that one list between them.
        todo = self.cache.missing(self.dataset.samples) if self.cache is not None else []
        acc.wait_for_everyone()
        # Validation encodes its prompt and edit images once, below, even when the cache is complete.
        need_encoders = self.cache is None or bool(todo) or bool(self.validation_samples)
        model_args = dict(model_id_with_origin_paths=args.model_id_with_origin_paths, model_paths=args.model_paths,
                          models_dir=args.models_dir, tokenizer_path=args.tokenizer_path,
                          processor_path=args.processor_path, merged_qkv=args.merged_qkv)
        # With block swap or fp8 the DiT loads into host memory and goes to the GPU once LoRA, fp8 and the swap are
        # in place: the bf16 model is never on the GPU whole.
        on_host = bool(args.blocks_to_swap or args.enable_fp8_training or args.fp8_compute)
        self.pipe = QwenImagePipeline.from_pretrained(
            **model_args, device=acc.device, torch_dtype=dtype, edit_plus=args.edit_plus or None,
            need=("dit", "text_encoder", "vae") if need_encoders else ("dit",), dit_device="cpu" if on_host else None)
        if todo:
            self.fill_cache(todo)
        if self.validation_samples:
            from .validation import ValidationInputs

            plain = [s.where for s in self.validation_samples if not s.edit_images]
            if plain and any(s.edit_images for s in self.dataset.samples):
                what = ("--validation_prompt without --validation_edit_image" if not self.validation_samples[0].folder
                        else f"--validation_prompts {', '.join(plain[:5])}{' ...' * (len(plain) > 5)} without "
                             "edit_image")
                self.log(f"note: {what}: the validation images are generated from the prompt alone, not edits "
                         "like the training samples")
            self.validation_inputs = ValidationInputs(self.pipe, self.validation_samples, args.edit_image_area)
        if self.cache is not None:  # every sample is cached now: the encoders' memory goes back
            self.pipe.text_encoder = None
            if not self.validation_samples:  # validation decodes its images with the VAE
                self.pipe.vae = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        for module in (self.pipe.text_encoder and self.pipe.text_encoder.text_encoder, self.pipe.vae):
            if module is not None:
                module.requires_grad_(False)

        # 3. The trainable part.
        dit = self.pipe.dit
        if args.lora_fused:
            fused = fuse_lora(dit, args.lora_fused)
            self.log(f"fused {len(fused)} LoRA deltas from {args.lora_fused}")
        if args.lora_base_model == "dit":
            dit.requires_grad_(False)
            inject_lora(dit, args.lora_target_modules, args.lora_rank, args.lora_alpha, lora_type=args.lora_type,
                        network_dropout=args.network_dropout)
            if args.lora_checkpoint and args.lora_type != "lora":
                from ..lora.adapters import load_adapter_weights

                load_adapter_weights(dit, args.lora_checkpoint)
            elif args.lora_checkpoint:
                load_lora_weights(dit, args.lora_checkpoint)
            if args.lora_type != "lora" and args.export_format:
                from ..lora.adapters import read_adapters, to_standard

                to_standard(read_adapters(lora_state_dict(dit))[0])  # a LoKr that cannot be split fails here
            # LoRA weights train in fp32 whatever the base dtype; autocast handles the mixing.
            for p in dit.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            dit.float().requires_grad_(True)  # full fine-tuning keeps fp32 master weights
        # Parameters that cannot get a gradient are frozen, so DDP needs no find_unused_parameters.
        for name, p in dit.named_parameters():
            if p.requires_grad and name.startswith(tuple(m + "." for m in dit.unused_in_output())):
                p.requires_grad_(False)
        if args.enable_fp8_training or args.fp8_compute:
            from ..utils.fp8 import enable_fp8

            self.log(enable_fp8(dit, args.fp8_compute, acc.device))
            if args.fp8_compute and not args.compile:
                # measured (BENCHMARKS.md): eager, the per-token quantisation costs more than the fp8 matmuls save
                self.log("note: --fp8_compute pays off with --compile: on an H100 (60 blocks, 1024x1024) a step took "
                         "2.32 s eager vs 2.18 s with fp8 storage and 1.16 s compiled; add --compile")
        if args.blocks_to_checkpoint == "auto":
            args.blocks_to_checkpoint = self._auto_checkpointed_blocks(dit)
        if args.use_gradient_checkpointing:
            dit.enable_gradient_checkpointing(offload=args.use_gradient_checkpointing_offload,
                                              blocks=args.blocks_to_checkpoint,
                                              keep_attention=args.selective_checkpointing)
            if args.blocks_to_checkpoint is not None:
                n = len(dit.transformer_blocks)
                self.log(f"gradient checkpointing: the last {args.blocks_to_checkpoint} of {n} blocks; the first "
                         f"{n - args.blocks_to_checkpoint} keep their activations (not recomputed)")
            if args.selective_checkpointing:
                self.log("selective checkpointing: the checkpointed blocks keep their attention outputs (attention's "
                         "forward is not recomputed)")
        from ..pipelines.qwen_image import host_memory_note

        note = host_memory_note(acc.device, blocks_to_swap=args.blocks_to_swap,
                                use_gradient_checkpointing_offload=args.use_gradient_checkpointing_offload)
        if note:
            self.log(note)
        if args.blocks_to_swap:
            dit.enable_block_swap(args.blocks_to_swap, acc.device)
            self.log(f"block swap: the frozen weights of the last {args.blocks_to_swap} of "
                     f"{len(dit.transformer_blocks)} blocks ({dit.block_swap.host_bytes() / 2**30:.2f} GiB) stay in "
                     "host memory")
        if on_host:
            dit.to(acc.device)  # with block swap, the resident part only
        if args.compile:
            from ..utils.compile import compile_blocks

            self.log(f"--compile: {compile_blocks(dit)} DiT blocks compile on the first step (torch.compile; the "
                     "blocks share their graphs, the first block has its own: its inputs carry no gradient)")
        if self.output_dir is not None:
            removed = self.output_dir.remove_previous_run()  # --overwrite: now that everything has loaded
            if removed:
                self.log(f"--overwrite: removed the earlier run's {', '.join(removed[:6])}"
                         + (f" and {len(removed) - 6} more" if len(removed) > 6 else ""))
        dit.train()
        params = [p for p in dit.parameters() if p.requires_grad]
        self.log(f"trainable parameters: {sum(p.numel() for p in params):,}")

        # Epoch checkpoints every --save_every_n_epochs (0: none). --max_steps alone sets the length, as in diffusers'
        # and kohya's scripts; such a run saves by --save_steps, not at the end of each pass (a LoRA file per pass:
        # hundreds on a small dataset)
        self.save_every_n_epochs = 0 if args.max_steps and args.num_epochs is None else args.save_every_n_epochs
        if args.num_epochs is None:
            args.num_epochs = math.ceil(args.max_steps / self.steps_per_epoch) if args.max_steps else 1
        self.total_steps = args.num_epochs * self.steps_per_epoch
        if args.max_steps and args.max_steps > self.total_steps:
            self.log(f"note: --num_epochs {args.num_epochs} ends this run after {self.total_steps} steps, before "
                     f"--max_steps {args.max_steps} (leave out --num_epochs to run all {args.max_steps})")
        if args.max_steps:
            self.total_steps = min(self.total_steps, args.max_steps)
        warmup = args.lr_warmup_steps
        if isinstance(warmup, float):  # a share of the run (musubi-tuner's rule: rounded down)
            warmup = int(warmup * self.total_steps)
            self.log(f"lr warm-up: {warmup} of this run's {self.total_steps} steps (--lr_warmup_steps "
                     f"{args.lr_warmup_steps})")
        elif warmup > self.total_steps:
            self.log(f"note: --lr_warmup_steps {warmup} is longer than this run's {self.total_steps} "
                     f"steps: the rate ends at {self.total_steps / warmup:.0%} of --learning_rate")
        if args.loraplus_lr_ratio != 1:
            base, up = loraplus_groups(((n, p) for n, p in dit.named_parameters() if p.requires_grad),
                                       args.loraplus_lr_ratio)
            self.log(f"LoRA+: {len(up['params'])} B matrices train at {args.loraplus_lr_ratio:g} x the learning "
                     f"rate, the other {len(base['params'])} trainable tensors at it")
            params = [base, up]
        optimizer = create_optimizer(args.optimizer, params, args.learning_rate, args.weight_decay,
                                     args.optimizer_args)
        scheduler = create_lr_scheduler(optimizer, args.lr_scheduler, warmup, self.total_steps,
                                        args.lr_min_ratio, args.lr_num_cycles, args.lr_power)
        # The data loader is ours (the bucket sampler already shards by rank): accelerate must not re-shard it.
        # The lr schedule counts optimizer steps: it is stepped by hand after each real step, because accelerate's
        # wrapper would step it once per process (warm-up N times too short on N GPUs).
        if acc.num_processes > 1 and not is_fsdp(acc):
            ignore_frozen_in_ddp(dit)
        self.dit, self.optimizer = acc.prepare(dit, optimizer)
        self.lr_scheduler = scheduler
        self.checkpointed.update(optimizer=self.optimizer, lr_scheduler=scheduler)
        # FSDP2 replaces the parameters with sharded ones: clip (and average) those; the optimizer has them.
        self.params = [p for p in self.dit.parameters() if p.requires_grad]
        if acc.num_processes > 1:
            print(describe_sharding(acc, self.dit), flush=True)  # every process: what it holds
        self.ema = None
        if args.ema_decay:
            self.ema = create_ema(self.params, args.ema_decay)
            self.checkpointed["ema"] = self.ema
        if acc.scaler is not None:  # fp16's loss scale: an exact resume continues with it
            self.checkpointed["grad_scaler"] = acc.scaler

    def _check_weights_finite(self, lr):
        """After an update: any NaN/inf in the trainable weights (on any process) stops the run unsaved."""
        norms = torch._foreach_norm([p.detach() for p in self.params])  # inf/nan when any entry is
        bad = sum(int(not torch.isfinite(n)) for n in norms)
        bad = self.accelerator.reduce(torch.tensor([float(bad)], device=self.accelerator.device), reduction="sum")
        if bad.item() > 0:
            raise NonFiniteError(
                f"the update of step {self.state.step + 1} (learning rate {lr:.3g}) made {int(bad.item())} trainable "
                f"weight tensor(s) NaN/inf; stopped without saving them. Lower --learning_rate (or raise "
                "--lr_warmup_steps).")

    def fill_cache(self, todo):
        """Compute the conditioning of the samples in `todo`, shared out between the processes."""
        acc = self.accelerator
        # A row's samples (one per --max_pixels area) differ in their target only: one process computes them
        # together and encodes the prompt and edit images once for all of them.
        rows = {}
        for sample in todo:
            rows.setdefault(sample.where, []).append(sample)
        mine = [s for row in list(rows.values())[acc.process_index::acc.num_processes] for s in row]
        index_of = {s.cache_key: i for i, s in enumerate(self.dataset.samples)}
        desc = "caching conditioning" + (f" ({len(mine)} of {len(todo)} samples in this process)"
                                          if acc.num_processes > 1 else "")
        where, cond = None, None  # the previous sample's row and conditioning: a row's samples come together
        for sample in tqdm(mine, desc=desc, disable=not acc.is_local_main_process):
            item = self.dataset[index_of[sample.cache_key]]
            cond = condition_sample(self.pipe, item, sample.edit_images, bool(self.args.caption_dropout_rate),
                                    cond if where == sample.where else None)
            self.cache.put(sample.cache_key, cond)
            where = sample.where
        acc.wait_for_everyone()

    def conditions(self, batch):
        # --caption_dropout_rate: which samples train on the empty prompt, each drawn from a generator of its own
        # (seeded like the sample's noise), so the noise and timesteps stay those of a run without dropout.
        drop = [False] * len(batch["prompt"])
        if self.args.caption_dropout_rate:
            drop = [torch.rand(1, generator=torch.Generator().manual_seed(g.initial_seed() ^ 0xC0FFEE)).item()
                    < self.args.caption_dropout_rate for g in self.state.sample_generators(batch["position"])]
        if self.cache is not None:
            conds = [self.cache.get(key) for key in batch["cache_key"]]
        else:
            conds = [condition_sample(self.pipe, {"image": batch["image"][i], "prompt": batch["prompt"][i],
                                                  "edit_images": [e[i] for e in batch["edit_images"]]},
                                      self.dataset.samples[batch["index"][i]].edit_images, drop[i])
                     for i in range(len(batch["prompt"]))]
        conds = [dict(c, prompt_emb=c["empty_prompt_emb"]) if d else c for c, d in zip(conds, drop)]
        cond = collate_conditions(conds, self.accelerator.device, self.pipe.torch_dtype)
        if batch.get("mask") is not None:
            # Loss weight of each target token: the mean of the mask over its 16x16 pixels (VAE 8x, 2x2 patches),
            # in the tokens' row-major order.
            cond["mask"] = torch.nn.functional.avg_pool2d(batch["mask"], SIZE_MULTIPLE).flatten(1).to(
                self.accelerator.device)
        return cond

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def save_model(self, name):
        """LoRA (or full DiT) weights as `<output_path>/<name>.safetensors`, main process only, atomically; with
        --ema_decay also their EMA as `<name>-ema.safetensors`. A schedule-free optimizer's evaluation weights."""
        with evaluation_weights(self.optimizer):
            path = self._save_weights(name)
            if self.ema is not None:
                with ema_weights(self.ema, self.params):
                    self._save_weights(f"{name}-ema")
        return path

    def save_intermediate(self, name):
        """A step-N / epoch-N save; then, with --lora_files_total_limit, the older ones beyond the limit go."""
        self.save_model(name)
        if self.args.lora_files_total_limit and self.accelerator.is_main_process:
            prune_weight_files(self.args.output_path, self.args.lora_files_total_limit, self.state.step)

    def _save_weights(self, name):
        args, acc = self.args, self.accelerator
        # Every process takes part: under FSDP gathering the sharded weights is a collective operation. A LoRA run
        # gathers its trainable weights only, not the frozen DiT.
        state = lora_weights(self.dit) if args.lora_base_model else acc.get_state_dict(self.dit)
        if not acc.is_main_process:
            return None
        dit = acc.unwrap_model(self.dit)
        path = os.path.join(args.output_path, f"{name}.safetensors")
        arch = "merged_qkv" if args.merged_qkv else "standard"
        meta = {"base_model": args.model_id_with_origin_paths or args.model_paths, "steps": self.state.step,
                "dataset_size": len(self.dataset.samples), "epoch": self.state.epoch,
                "edit_image_area": args.edit_image_area}  # the inference script's default for this LoRA
        if args.lora_base_model:
            sd = self._in_save_precision(lora_state_dict(dit, state_dict=state), torch.float32, name)
            alpha = args.lora_alpha or args.lora_rank
            base_weights = None
            if args.lora_type == "lora":
                save_lora(sd, path, args.lora_rank, alpha, args.lora_target_modules, arch, meta)
            else:
                from ..lora.adapters import base_weight_getter, save_adapter

                save_adapter(sd, path, args.lora_type, args.lora_rank, alpha, args.lora_target_modules, arch, meta)
                base_weights = base_weight_getter(dit)  # a DoRA for ComfyUI is computed from the base weights
            self.saves.append((self.state.step, path))
            copy = export_copy_name(name, args.export_format, args.merged_qkv) if self.export_copy else None
            if copy:
                convert_lora_file(path, os.path.join(args.output_path, copy), "to_standard",  # keeps `meta`
                                  format=args.export_format or "native", base_weights=base_weights)
                self.saves.append((self.state.step, os.path.join(args.output_path, copy)))
        else:
            save_safetensors(self._in_save_precision(state, None, name), path,
                             {"format": "pt", "qkv_layout": arch, "config": json.dumps(dit.config), **meta})
            self.saves.append((self.state.step, path))
        return path

    def _in_save_precision(self, state, default, name) -> dict:
        """The weights to write, on the CPU in --save_precision (else `default`, None: as they are). A value that the
        smaller dtype cannot hold (fp16 overflows above 65504) stops the save rather than writing inf. A DoRA's
        magnitude stays fp32: it is the norm of a base weight row, so bf16's rounding of it (0.4%) would move every
        row by more than training does (and it is one vector per module)."""
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(self.args.save_precision,
                                                                                          default)
        out = {}
        for k, v in state.items():
            v = v.detach().cpu()
            if dtype is not None and v.is_floating_point() and not k.endswith(KEEP_FP32):
                cast = v.to(dtype)
                if not torch.isfinite(cast).all() and torch.isfinite(v).all():
                    raise ValueError(f"--save_precision {self.args.save_precision}: {k} of {name} holds values up to "
                                     f"{v.abs().max().item():.4g}, beyond the dtype's range; save in bf16 or fp32")
                v = cast
            out[k] = v
        return out

    def save_state(self):
        """A resumable training state (safetensors + json, checkpoint.py) under <output_path>/checkpoints/step-N."""
        args, acc = self.args, self.accelerator
        root = os.path.join(args.output_path, "checkpoints")
        final = os.path.join(root, f"step-{self.state.step}")
        tmp = final + ".tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        acc.wait_for_everyone()
        save_training_state(tmp, self.dit, self.checkpointed, acc.process_index, acc.num_processes,
                            acc.is_main_process, acc.wait_for_everyone,
                            {"step": self.state.step, "setup": self.setup_info()})
        acc.wait_for_everyone()
        self.state_written_at = self.state.step
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # a state folder exists only once complete
            self.saves.append((self.state.step, final))
            if args.checkpoints_total_limit:
                for old in list_states(root)[: -args.checkpoints_total_limit]:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def setup_info(self) -> dict:
        """What a training state must share with the run that resumes it (checked before the models load)."""
        args = self.args
        lora = args.lora_base_model is not None
        return {"merged_qkv": args.merged_qkv, "lora_base_model": args.lora_base_model,
                "lora_rank": args.lora_rank if lora else None,
                "lora_alpha": (args.lora_alpha or args.lora_rank) if lora else None,
                "batch_size": args.batch_size, "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "samples": len(self.dataset),
                "lora_target_modules": args.lora_target_modules if lora else None,
                "lora_type": args.lora_type if lora else None, "optimizer": args.optimizer,
                "ema": args.ema_decay is not None,
                "seed": args.seed,  # the epoch's shuffle and every sample's noise: another seed skips other samples
                # the optimizer's state restores its hyperparameters: other values here would be silently ignored
                "learning_rate": args.learning_rate, "weight_decay": args.weight_decay,
                "optimizer_args": json.dumps(args.optimizer_args, sort_keys=True, default=str),
                "loraplus_lr_ratio": args.loraplus_lr_ratio,  # its groups' rates (states before it: 1, checkpoint.py)
                "network_dropout": args.network_dropout,  # what each step's forward drops (states before it: 0)
                # the base the LoRA trains on: resumed without it (or with another), it would fit other weights
                "lora_fused": content_id(args.lora_fused) if args.lora_fused else None,
                # what each step trains on: the prompt template, which samples drop their caption, the target and
                # edit images' sizes, each sample's timestep and loss weight. Another value would continue another
                # run than the state's. States written before these keys were recorded are not checked for them.
                **{k: getattr(args, k) for k in (
                    "edit_plus", "caption_dropout_rate", "max_pixels", "height", "width", "edit_image_area",
                    "timestep_sampling", "weighting_scheme", "logit_mean", "logit_std", "discrete_flow_shift",
                    "min_timestep", "max_timestep")},
                # how each step updates: the loss's columns (a mask weights it), the precision the forward runs
                # in (as resolved from --mixed_precision or accelerate's config), clipping, the lr schedule's shape
                # (its length follows --max_steps / --num_epochs, which a resume may extend)
                "data_file_keys": ",".join(parse_file_keys(args.data_file_keys)),
                "mixed_precision": self.accelerator.mixed_precision,
                **{k: getattr(args, k) for k in (
                    "max_grad_norm", "lr_scheduler", "lr_warmup_steps", "lr_min_ratio", "lr_num_cycles", "lr_power")}}

    def _resume_path(self):
        args = self.args
        path = args.resume_from_checkpoint
        if path == "latest":
            states = list_states(os.path.join(args.output_path, "checkpoints"))
            if not states:
                earlier = previous_run_files(args.output_path) if os.path.isdir(args.output_path) else []
                if earlier and not args.overwrite:
                    raise OutputDirError(
                        f"--resume_from_checkpoint latest: {args.output_path} holds another run's files "
                        f"({', '.join(earlier[:4])}) but no training state to continue from (states are written every "
                        "--save_steps). Start anew there with --overwrite, or continue from its LoRA with "
                        "--lora_checkpoint <its .safetensors> and another --output_path")
                self.log(f"--resume_from_checkpoint latest: no state in {args.output_path}/checkpoints, starting fresh")
                return None
            return states[-1]
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--resume_from_checkpoint {path}: no such training state folder")
        return path

    def _resumes_own_state(self) -> bool:
        """Resuming from a state inside --output_path: the folder's files are this run's own. A state from elsewhere
        continues in a folder that must be free like a new run's."""
        if not self.resume_from:
            return False
        own = os.path.join(os.path.abspath(self.args.output_path), "checkpoints") + os.sep
        return os.path.abspath(self.resume_from).startswith(own)

    def resume(self):
        path = self.resume_from
        if not path:
            return
        load_training_state(path, self.dit, self.checkpointed, self.accelerator.process_index)
        if self._resumes_own_state():
            self.state_written_at = self.state.step
        self.log(f"resumed from {path} at step {self.state.step} (epoch {self.state.epoch}, "
                 f"batch {self.state.batch_in_epoch})")

    # ---- loop ----------------------------------------------------------------------------------------------

    def train(self):
        try:
            return self._train()
        except NonFiniteError as e:
            raise NonFiniteError(f"{e} {self._set_aside_saves(e.weights_of_step)}") from None

    def _set_aside_saves(self, weights_of_step) -> str:
        """After a NaN/inf: the files saved with the weights that gave it (if they were saved) are renamed
        `<name>.nonfinite`, so neither a resume from 'latest' nor a user picks them up. -> what became of the
        checkpoints, naming the last good one."""
        bad = [path for step, path in self.saves if step == weights_of_step and os.path.exists(path)]
        good = [(step, path) for step, path in self.saves  # --lora_files_total_limit may have deleted some
                if step != weights_of_step and path.endswith(".safetensors") and os.path.exists(path)]
        good = [path for step, path in good if step == good[-1][0]][:1]  # the main file of the newest good save
        text = ""
        if bad:
            if self.accelerator.is_main_process:
                for path in bad:
                    os.replace(path, path + ".nonfinite")
            names = ", ".join(os.path.relpath(p, self.args.output_path) for p in bad)
            text = (f"The weights saved after step {weights_of_step} gave it: {names} renamed to *.nonfinite (a resume "
                    "from 'latest' skips them). ")
        if good:
            return text + f"The last good checkpoint is {good[-1]}."
        if self.args.lora_files_total_limit and any(step != weights_of_step for step, _ in self.saves):
            return text + (f"No earlier weight file of this run is left: --lora_files_total_limit "
                           f"{self.args.lora_files_total_limit} deleted the older ones.")
        return text + f"Checkpoints written before in {self.args.output_path} are kept."

    def _train(self):
        args, acc = self.args, self.accelerator
        os.makedirs(args.output_path, exist_ok=True)
        if args.resume_from_checkpoint:
            self.resume()
        log_path = os.path.join(args.output_path, "train_log.csv")
        earlier = 0.0  # seconds the log counted before the resumed state
        if acc.is_main_process and (not os.path.exists(log_path) or not self.resume_from):
            with open(log_path, "w", newline="") as f:
                csv.writer(f).writerow(LOG_COLUMNS)
        elif acc.is_main_process:
            earlier = trim_log(log_path, self.state.step)  # the steps after the resumed state run (and log) again
        self._init_trackers()
        bar = tqdm(total=self.total_steps, initial=self.state.step, desc="training",
                   disable=not acc.is_local_main_process, dynamic_ncols=True)
        start = time.time() - earlier
        done = self.state.step >= self.total_steps
        if args.validation_at_start and self.state.step == 0 and not done:
            self.validate()  # the baseline: the weights before any update (step-0.png, first in the grid)
        while not done and self.state.epoch < args.num_epochs:
            self.sampler.set_epoch(self.state.epoch)
            self.sampler.set_start(self.state.batch_in_epoch)
            # The loader's own generator: each iterator draws its workers' seed from it, by default from torch's
            # global generator, which --network_dropout's masks come from. A resumed run starts a new iterator
            # mid-epoch, so that draw would shift every later mask
            loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=collate_fn,
                                                 num_workers=args.dataset_num_workers,
                                                 generator=torch.Generator().manual_seed(args.seed + self.state.epoch))
            for batch in loader:
                # Conditioning outside autocast, exactly as the cache computes it: cached == uncached.
                cond = self.conditions(batch)
                # The optimizer steps after every --gradient_accumulation_steps batches and after an epoch's last
                # batch (a shorter window, whose loss is scaled to its mean): each epoch makes steps_per_epoch steps
                # and no window spans two epochs. accelerate's accumulate() knows an epoch's end only from a data
                # loader it prepared, and this one is the trainer's own (the bucket sampler shards by process).
                ga, start_of_window = args.gradient_accumulation_steps, self.state.batch_in_epoch
                start_of_window -= start_of_window % ga
                window = min(ga, self.sampler.num_batches_per_rank() - start_of_window)
                acc.sync_gradients = self.state.batch_in_epoch + 1 == start_of_window + window
                no_sync = contextlib.nullcontext() if acc.sync_gradients else acc.no_sync(self.dit)
                with no_sync, watch_compile(self.dit, self._write):
                    with acc.autocast():
                        loss = flow_matching_loss(self.dit, self.pipe.scheduler, cond,
                                                  self.state.sample_generators(batch["position"]), self.timesteps)
                    # Every process learns whether any loss is NaN/inf, so all stop together (no DDP hang).
                    finite = acc.reduce(torch.isfinite(loss.detach()).float().reshape(1), reduction="sum")
                    if finite.item() < acc.num_processes:
                        raise NonFiniteError(
                            f"loss is {loss.item()} at step {self.state.step + 1} (epoch {self.state.epoch}); "
                            "stopped. Lower --learning_rate, check the data, or use --mixed_precision bf16 instead "
                            "of fp16.", weights_of_step=self.state.step)
                    acc.backward(loss * (ga / window) if window < ga else loss)  # accelerate divides by ga
                    if acc.sync_gradients:
                        # The norm is measured even with clipping off (inf scales by exactly 1): a NaN/inf gradient
                        # stops the run before the update touches the weights.
                        norm = acc.clip_grad_norm_(self.params, args.max_grad_norm or math.inf)
                        if norm is not None and not torch.isfinite(norm) and acc.scaler is not None:
                            # fp16: the loss scale overflowed the gradients; GradScaler skips this update and
                            # lowers the scale (its normal way to find a scale, in the first steps above all)
                            self._write(f"step {self.state.step + 1}: fp16 gradients overflowed at loss scale "
                                        f"{acc.scaler.get_scale():g}; the update is skipped and the scale lowered")
                        elif norm is not None and not torch.isfinite(norm):
                            raise NonFiniteError(
                                f"the gradient norm is {norm.item()} at step {self.state.step + 1} (the loss was "
                                f"finite: {loss.item():.6g}); stopped before the update. The weights overflow in the "
                                "backward pass: lower --learning_rate, or use --mixed_precision bf16 instead of fp16.",
                                weights_of_step=self.state.step)
                    self.optimizer.step()
                    # the rate this step used, for the log: group 0's, the base rate (LoRA+'s B group is the second)
                    lr = self.lr_scheduler.get_last_lr()[0]
                    if acc.sync_gradients:
                        self.lr_scheduler.step()
                        if self.ema is not None:
                            self.ema.step(self.params)
                    self.optimizer.zero_grad()
                # The step's logged loss is the mean over its window (what the update followed), not its last batch's.
                # A window never spans a resume: states are saved after a step.
                if self.state.batch_in_epoch == start_of_window:
                    window_loss = 0.0
                window_loss = window_loss + loss.detach().float()
                self.state.batch_in_epoch += 1
                if not acc.sync_gradients:
                    continue
                self._check_weights_finite(lr)
                self.state.step += 1
                loss_value = acc.reduce(window_loss / window, reduction="mean").item()
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
                if acc.is_main_process:
                    with open(log_path, "a", newline="") as f:
                        csv.writer(f).writerow([self.state.step, self.state.epoch, f"{loss_value:.6f}", f"{lr:.3e}",
                                                f"{time.time() - start:.2f}"])
                acc.log({"train/loss": loss_value, "train/lr": lr}, step=self.state.step)
                if args.save_steps and self.state.step % args.save_steps == 0:
                    self.save_intermediate(f"step-{self.state.step}")
                    self.save_state()
                # the last step's validation is the final one, below
                if (args.validation_steps and self.state.step % args.validation_steps == 0
                        and self.state.step < self.total_steps):
                    self.validate()
                if self.state.step >= self.total_steps:
                    done = True
                    break
            if self.state.batch_in_epoch >= self.sampler.num_batches_per_rank():
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
                if self.save_every_n_epochs and self.state.epoch % self.save_every_n_epochs == 0:
                    self.save_intermediate(f"epoch-{self.state.epoch}")
        bar.close()
        if torch.cuda.is_available():
            from ..utils.vram_planner import predicted_training_peak

            predicted = predicted_training_peak(args, acc.num_processes, is_fsdp(acc))
            self.log(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB "
                     f"(torch.cuda.max_memory_allocated; the planner predicted {predicted:.2f} GiB for these flags "
                     "at the largest image size they allow)")
        final = self.save_model("checkpoint-final")
        if args.save_state_on_train_end and self.state_written_at != self.state.step:
            self.save_state()  # none yet at this step: --save_steps did not fall on it
        if self.validation_samples:
            self.validate(final=True)
        if acc.is_main_process:
            _write_loss_plot(log_path, os.path.join(args.output_path, "loss.png"))
            self.log(f"saved {final}, {log_path} and loss.png")
        acc.end_training()
        self.release()
        return final

    def _write(self, message):
        """A line beside the progress bar (main process)."""
        if self.accelerator.is_main_process:
            tqdm.write(message)

    def _init_trackers(self):
        """tensorboard / wandb / swanlab through accelerate (main process only); the config is the flags."""
        args, acc = self.args, self.accelerator
        if not acc.log_with:
            return
        config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        acc.init_trackers(args.tracker_project_name, config=config, init_kwargs={
            "wandb": {"dir": args.output_path}, "swanlab": {"logdir": os.path.join(args.output_path, "swanlog")}})

    def _log_image(self, key, image):
        import numpy as np

        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({key: np.asarray(image)[None]}, step=self.state.step, dataformats="NHWC")
            else:
                tracker.log_images({key: [image]}, step=self.state.step)

    def validate(self, final=False):
        """Edit each validation sample's image(s) with the current weights (a schedule-free optimizer's evaluation
        weights): `validation/step-N.png` (or final.png) and `validation/grid.png` with every image so far; for the
        samples of --validation_prompts the same in `validation/<k>/`, k the sample's row."""
        # Every process switches the weights, so they stay equal on all of them.
        with evaluation_weights(self.optimizer):
            self._validate(final)

    def _validate(self, final=False):
        from PIL import Image

        from .validation import grid, labelled, png_info

        args, acc = self.args, self.accelerator
        # Under FSDP each forward gathers the weights from every process: all of them run the pipeline.
        if not acc.is_main_process and not is_fsdp(acc):
            acc.wait_for_everyone()
            return
        dit = acc.unwrap_model(self.dit)
        was_training = dit.training
        dit.eval()
        self.pipe.dit = dit
        with acc.autocast():
            images = [self.validation_inputs.generate(self.pipe, k, args.edit_image_area)
                      for k in range(len(self.validation_samples))]
        dit.train(was_training)
        if not acc.is_main_process:
            acc.wait_for_everyone()
            return
        step_label = f"step {self.state.step}" + (" (final)" if final else "")
        for k, (sample, image) in enumerate(zip(self.validation_samples, images)):
            folder = os.path.join(args.output_path, "validation", sample.folder or "")
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, "final.png" if final else f"step-{self.state.step}.png")
            # atomically: a run killed mid-write leaves no cut-off step-N.png for the resumed run's grid to choke on
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG", pnginfo=png_info(step_label, sample.prompt))
            self._log_image(f"validation/{sample.folder}" if sample.folder else "validation",
                            labelled(image, f"{step_label}: {sample.prompt}"))
            shots = sorted(glob.glob(os.path.join(glob.escape(folder), "step-*.png")),
                           key=lambda p: int(p.split("-")[-1][:-4]))
            tiles = [(f"input {i + 1}", img) for i, img in enumerate(self.validation_inputs.edit_images[k])]
            tiles += [(f"step {p.split('-')[-1][:-4]}", Image.open(p)) for p in shots]
            if final:
                tiles.append((step_label, image))
            header = f"{sample.prompt}\n{os.path.basename(os.path.abspath(args.output_path))}, seed {sample.seed}, " \
                     f"{sample.steps} steps, cfg {sample.cfg_scale:g}"
            with atomic_path(os.path.join(folder, "grid.png")) as tmp:
                grid(tiles, header).save(tmp, format="PNG")
        acc.wait_for_everyone()


def export_copy_name(name, export_format, merged_qkv) -> str | None:
    """File name of the standard-layout copy of LoRA checkpoint `name`, or None when none is written. The default
    (native keys, `<name>-standard.safetensors`) is what every consumer loads; a standard run's checkpoint already
    is that file."""
    fmt = export_format or "native"
    if fmt == "none" or (fmt == "native" and not merged_qkv):
        return None
    return f"{name}-{'standard' if fmt == 'native' else fmt}.safetensors"


# save_intermediate's names exactly as it writes them: ASCII digits, no leading zero. A user's step-007, or a step
# number in other scripts' digits (which \d and int() accept), is no name of ours and must not be deleted
INTERMEDIATE = re.compile(r"(step|epoch)-([1-9][0-9]*)\.safetensors")


def prune_weight_files(folder, keep: int, step: int) -> list[str]:
    """--lora_files_total_limit: delete the intermediate weight files in `folder` (step-N, epoch-N) beyond the newest
    `keep`, each with the files written beside it (-ema, export copies in any format). Only these exact names are
    touched: a user's file never matches. Files saved after `step` (an earlier attempt of a resumed run went further)
    are neither counted nor deleted: the run rewrites them or they stay. -> the deleted paths."""
    saves = []
    for name in os.listdir(folder):
        match = INTERMEDIATE.fullmatch(name)
        if not match:
            continue
        path = os.path.join(folder, name)
        try:  # an epoch file's step is in its metadata (what a step count means depends on the run)
            at = int(match[2]) if match[1] == "step" else int(read_metadata(path)["steps"])
        except Exception:  # unreadable (safetensors' own error type) or no step: not dated, so not deleted
            continue
        if at <= step:
            # in write order: at an epoch's last step the step file is saved first, the epoch file after it
            saves.append((at, match[1] == "epoch", name[:-len(".safetensors")]))
    deleted = []
    for *_, name in sorted(saves)[:-keep]:
        copies = [export_copy_name(base, fmt, True) for base in (name, f"{name}-ema") for fmt in EXPORT_FORMATS]
        # the main file last: if the run stops midway, it still marks the rest for the next prune
        for file in [f for f in copies if f] + [f"{name}-ema.safetensors", f"{name}.safetensors"]:
            path = os.path.join(folder, file)
            try:
                os.remove(path)
                deleted.append(path)
            except FileNotFoundError:  # not written (another format), or removed by the user meanwhile
                pass
    return deleted


def run(args) -> int:
    """Train with parsed flags; errors the user can fix become a message and an exit code. With several processes
    one per machine prints it (the others stop with the same code)."""
    trainer = None
    say = reports_errors()
    try:
        trainer = Trainer(args)  # accelerate reads the launcher's config here (e.g. DeepSpeed, not installed)
        trainer.setup()
        trainer.train()
    except DatasetError as e:
        if say:
            print(f"error: dataset {args.dataset_metadata_path}:\n{e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:  # the run went wrong; its last good checkpoint is kept
        if say:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, ImportError) as e:  # inputs, flags, files, folders, packages: fixable
        if say:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: every file on disk is whole (atomic writes); say how to go on
        if say:
            states = list_states(os.path.join(args.output_path, "checkpoints"))
            where = (f"the newest training state is {states[-1]}: continue with --resume_from_checkpoint latest"
                     if states else "no training state was written yet (--save_steps writes them)")
            print(f"\ninterrupted; {where}", file=sys.stderr)
        return 130
    finally:
        if trainer is not None:
            trainer.release()
    return 0
