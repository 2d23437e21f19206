"""Block swap (diffsynth/models/block_swap.py) on the CPU: the host store and the device copies are distinct CPU
tensors, so swapping on must give the numbers of swapping off bit for bit: forward, gradients, trainer steps,
with checkpointing, fp8 and a compiled block; the copies go one block ahead in the order of a training step."""
import os

import pytest
import torch

from conftest import TINY_DIT
from diffsynth.lora import inject_lora
from diffsynth.models import QwenImageDiT, QwenImageDiTMergedQKV
from diffsynth.trainers import main
from diffsynth.utils.fp8 import enable_fp8_linear
from test_trainer import flags, losses

CONFIG = dict(TINY_DIT, num_layers=4)
TARGETS = {QwenImageDiT: "to_q,to_k,to_v,add_q_proj,to_out.0,img_mlp.net.2,txt_mlp.net.0.proj",
           QwenImageDiTMergedQKV: "to_qkv,add_qkv_proj,to_out.0,img_mlp.net.2,txt_mlp.net.0.proj"}


def lora_dit(cls, checkpointing=True, fp8=False):
    torch.manual_seed(0)
    dit = cls(**CONFIG)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.05)
    dit.requires_grad_(False)
    inject_lora(dit, TARGETS[cls], rank=4)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # peft starts B at zero: the LoRA would not change the output
    if fp8:
        enable_fp8_linear(dit)
    if checkpointing:
        dit.enable_gradient_checkpointing()
    return dit


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    # batch 2, a 4x4 target and a 4x4 edit image, 7 text tokens
    return (torch.randn(2, 32, 64, generator=g), torch.randn(2, 7, 64, generator=g), None, torch.rand(2, generator=g),
            [[(1, 4, 4), (1, 4, 4)]] * 2)


def host_snapshot(dit):
    return {i: h.flat.clone() for i, h in dit.block_swap.host.items()}


def assert_steps_equal(reference, swapped, steps=2):
    """Forward and LoRA gradients of `steps` steps (the second starts with what the first left cached)."""
    for step in range(steps):
        out_ref, out_swap = reference(*batch(step)), swapped(*batch(step))
        assert torch.equal(out_ref, out_swap), f"step {step}: outputs differ"
        out_ref.square().mean().backward()
        out_swap.square().mean().backward()
        grads = [(n, p.grad, q.grad) for (n, p), (_, q) in zip(reference.named_parameters(), swapped.named_parameters())
                 if p.requires_grad]
        # (the last block's text stream never reaches the output: those LoRA weights get no gradient)
        assert sum(a is not None for _, a, _ in grads) > len(grads) // 2
        for name, a, b in grads:
            assert (a is None and b is None) or torch.equal(a, b), f"step {step}: gradient of {name} differs"
        for model in (reference, swapped):
            model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("cls", [QwenImageDiT, QwenImageDiTMergedQKV])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_swap_equals_resident_forward_and_gradients(cls, checkpointing):
    reference, swapped = lora_dit(cls, checkpointing), lora_dit(cls, checkpointing)
    swapped.enable_block_swap(3, "cpu")
    swap = swapped.block_swap
    host = host_snapshot(swapped)
    swap.trace = []
    assert_steps_equal(reference, swapped)
    # nothing was written to the host store: it is the master, the device copies are transient
    assert all(torch.equal(host[i], h.flat) for i, h in swap.host.items())
    # each swapped block ran on a copy, never on its host tensors, and at most prefetch + 1 copies are held
    assert len(swap.cache) <= swap.prefetch + 1
    runs = [i for kind, i in swap.trace if kind == "run"]
    step = [0, 1, 2, 3, 3, 2, 1, 0] if checkpointing else [0, 1, 2, 3]  # forward, then the checkpoint's recompute
    assert runs == step * 2
    # every copy is issued before another block runs: one block ahead of its use, overlapping that block
    for k, (kind, i) in enumerate(swap.trace):
        if kind == "copy":
            assert next(j for kind2, j in swap.trace[k + 1:] if kind2 == "run") != i, swap.trace
    # First step: every swapped block forward, then 2 and 1 for the recompute (3's copy serves it: it is the
    # next visit); the second step finds block 1 still there from the backward (or the forward's prefetch).
    assert swap.copies == ((3 + 2) + (2 + 2) if checkpointing else (3 + 1) + 3), swap.trace


def test_swap_with_only_the_swapped_blocks_checkpointed():
    """--blocks_to_swap 2 --blocks_to_checkpoint 2 of 4: the first two blocks keep their activations, the two swapped
    ones are recomputed; the numbers are those of the resident model checkpointing every block."""
    reference, swapped = lora_dit(QwenImageDiTMergedQKV), lora_dit(QwenImageDiTMergedQKV, checkpointing=False)
    swapped.enable_gradient_checkpointing(blocks=2)
    swapped.enable_block_swap(2, "cpu")
    swapped.block_swap.trace = []
    assert_steps_equal(reference, swapped)
    runs = [i for kind, i in swapped.block_swap.trace if kind == "run"]
    assert runs == [0, 1, 2, 3, 3, 2] * 2  # blocks 0 and 1 are not run again in the backward pass


def test_swap_holds_the_frozen_weights_in_host_memory_only():
    dit = lora_dit(QwenImageDiTMergedQKV)
    dit.enable_block_swap(2, "cpu")
    # .to() moves only the resident part (accelerate's prepare and the pipeline's offload call it)
    dit.to("meta")
    for i, block in enumerate(dit.transformer_blocks):
        frozen = [p for p in block.parameters() if not p.requires_grad]
        trainable = [p for p in block.parameters() if p.requires_grad]
        assert all(p.device.type == ("cpu" if i >= 2 else "meta") for p in frozen), i
        assert all(p.device.type == "meta" for p in trainable), i  # LoRA stays resident, swapped block or not
    assert dit.img_in.weight.device.type == "meta"
    # DDP must not broadcast the host tensors: they are on the model's ignore list, with their full names
    ignored = dit._ddp_params_and_buffers_to_ignore
    assert "transformer_blocks.3.attn.to_qkv.base_layer.weight" in ignored
    assert not [n for n in ignored if "lora_" in n or not n.startswith(("transformer_blocks.2.", "transformer_blocks.3."))]
    dit.disable_block_swap()
    assert not hasattr(dit, "_ddp_params_and_buffers_to_ignore") and dit.block_swap is None


def test_swap_with_fp8_weights():
    reference, swapped = lora_dit(QwenImageDiTMergedQKV, fp8=True), lora_dit(QwenImageDiTMergedQKV, fp8=True)
    swapped.enable_block_swap(2, "cpu")
    dtypes = {t.dtype for i in (2, 3) for *_, t, _, _ in swapped.block_swap.host[i].entries}
    assert torch.float8_e4m3fn in dtypes and torch.float32 in dtypes  # fp8 weights and their fp32 scales swap
    assert_steps_equal(reference, swapped)


def test_weights_replaced_after_enabling_are_refused():
    dit = lora_dit(QwenImageDiTMergedQKV)
    dit.enable_block_swap(1, "cpu")
    enable_fp8_linear(dit)  # replaces the weights the swap holds: the host copy would be stale
    with pytest.raises(RuntimeError, match="was replaced after enable_block_swap"):
        dit(*batch(0))


def test_swap_bounds():
    dit = lora_dit(QwenImageDiT)
    with pytest.raises(ValueError, match="the DiT has 4 blocks; swap 1 to 4"):
        dit.enable_block_swap(5, "cpu")
    dit.enable_block_swap(4, "cpu")  # every block: works, nothing resident
    with torch.no_grad():
        assert torch.equal(dit(*batch(0)), lora_dit(QwenImageDiT)(*batch(0)))


def test_swap_with_a_compiled_block():
    """Regional compilation (each block's forward compiled): the swap stays outside the compiled graph, the
    swapped blocks reuse the resident blocks' graph (no recompilation) and the numbers do not change. The
    aot_eager backend traces and guards as inductor does, without its code generation (minutes on 2 cores)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    reference, swapped = lora_dit(QwenImageDiTMergedQKV), lora_dit(QwenImageDiTMergedQKV)
    for dit in (reference, swapped):
        for block in dit.transformer_blocks:
            block.compile(backend="aot_eager")
    swapped.enable_block_swap(2, "cpu")
    counters.clear()
    for step in range(2):
        reference(*batch(step)).square().mean().backward()
    graphs = counters["stats"]["unique_graphs"]  # 2: block 0's text input needs no grad, the others' does
    reference.zero_grad(set_to_none=True)
    assert_steps_equal(reference, swapped)
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])


def test_pipeline_with_sequential_offload_and_swap(tiny_models):
    """The inference path: text encoder streamed module by module, DiT blocks swapped, LoRA fused into the host
    copy after the swap was set up: the same latents as the plain pipeline with the same LoRA."""
    from conftest import TINY_MODEL_IDS
    from diffsynth.pipelines.qwen_image import QwenImagePipeline
    from test_pipeline import EDIT, noise, write_lora

    def load(**kwargs):
        return QwenImagePipeline.from_pretrained(TINY_MODEL_IDS, models_dir=tiny_models, download=False, **kwargs)

    plain, lean = load(), load(offload="sequential", blocks_to_swap=1)
    assert lean.dit.block_swap is not None and lean.text_encoder.execution_device == torch.device("cpu")
    lora = write_lora(os.path.join(tiny_models, "swap-test-lora.safetensors"), TINY_DIT)
    outs = []
    for pipe in (plain, lean):
        pipe.load_lora(lora)
        outs.append(pipe("make it blue", edit_image=EDIT, negative_prompt=" ", height=64, width=96,
                         num_inference_steps=2, latents=noise(), edit_image_area=128 * 128, output_type="latent",
                         progress=False))
    assert torch.equal(*outs)
    assert lean.dit.block_swap.copies >= 1
    with pytest.raises(ValueError, match="offload='disk'"):
        QwenImagePipeline(lean.dit, offload="disk")


@pytest.mark.parametrize("merged, extra", [(True, []), (False, ["--enable_fp8_training"])])
def test_trainer_steps_with_swap_equal_resident(tiny_models, data, tmp_path, capsys, merged, extra):
    from safetensors.torch import load_file

    if not merged:
        extra = extra + ["--lora_target_modules", "to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0"]
    runs = {}
    for name, swap in (("resident", []), ("swapped", ["--blocks_to_swap", "1", "--vram_budget", "16GB"])):
        args = flags(tiny_models, data, str(tmp_path / name), "--max_steps", "3", "--dataset_repeat", "3",
                     "--use_gradient_checkpointing", "--cache_conditioning", str(tmp_path / "cache"), *extra, *swap)
        assert main(args, merged_qkv=merged) == 0
        runs[name] = (losses(str(tmp_path / name)), load_file(str(tmp_path / name / "checkpoint-final.safetensors")))
    printed = capsys.readouterr().out
    assert "block swap: the frozen weights of the last 1 of 2 blocks" in printed
    assert printed.count("note: --blocks_to_swap keeps data in host memory for a GPU; on the CPU") == 1
    assert "VRAM plan" in printed and "--vram_budget 16GB: 16 GiB" in printed  # a real run logs the plan too
    assert runs["resident"][0] == runs["swapped"][0] and len(runs["resident"][0]) == 3
    a, b = runs["resident"][1], runs["swapped"][1]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("compiled", [False, True])
def test_trainer_checkpointing_fewer_blocks_trains_the_same(tiny_models, data, tmp_path, capsys, compiled):
    """--blocks_to_checkpoint 1 (of the tiny DiT's 2), and --selective_checkpointing with block swap: the same losses
    and LoRA as checkpointing both blocks, eager and with --compile (the same compiled graphs run inside and outside
    the checkpoint)."""
    from safetensors.torch import load_file

    runs = {}
    for name, extra in (("all", []), ("last", ["--blocks_to_checkpoint", "1"]),
                        ("selective", ["--selective_checkpointing", "--blocks_to_swap", "1"])):
        out = str(tmp_path / name)
        assert main(flags(tiny_models, data, out, "--max_steps", "2", "--use_gradient_checkpointing",
                          "--cache_conditioning", str(tmp_path / "cache"), *extra,
                          *(["--compile"] if compiled else []))) == 0
        runs[name] = (losses(out), load_file(os.path.join(out, "checkpoint-final.safetensors")))
    printed = capsys.readouterr().out
    assert "gradient checkpointing: the last 1 of 2 blocks; the first 1 keep their activations" in printed
    assert printed.count("selective checkpointing: the checkpointed blocks keep their attention outputs") == 1
    assert runs["all"][0] == runs["last"][0] == runs["selective"][0] and len(runs["all"][0]) == 2
    for other in ("last", "selective"):
        a, b = runs["all"][1], runs[other][1]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), other
    code = main(flags(tiny_models, data, str(tmp_path / "c"), "--use_gradient_checkpointing", "--blocks_to_checkpoint",
                      "3", "--max_steps", "1"))
    printed = capsys.readouterr()
    assert code == 2 and "--blocks_to_checkpoint 3: the DiT has 2 blocks (its files); give 1 to 2" in printed.err
    assert "trainable parameters" not in printed.out  # refused before any model loaded
    with pytest.raises(SystemExit) as e:
        main(flags(tiny_models, data, str(tmp_path / "d"), "--selective_checkpointing", "--max_steps", "1"))
    assert e.value.code == 2 and "--selective_checkpointing needs --use_gradient_checkpointing" in \
        capsys.readouterr().err


def test_trainer_auto_checkpointing_asks_the_planner(tiny_models, data, tmp_path, capsys):
    """--blocks_to_checkpoint auto: with room to spare the fewest blocks (1 of the tiny DiT's 2), with a budget that
    nothing fits every block, without a GPU or a budget every block; the run trains either way."""
    for name, budget, said in (("roomy", "80GB", ", --vram_budget 80GB: 1 of 2 blocks checkpointed, the fewest"),
                               ("tight", "2049MB", ", --vram_budget 2049MB: 2 of 2 blocks checkpointed: even so the VRAM "
                                                   "planner predicts"),
                               ("none", None, ": no GPU and no --vram_budget to plan for: every block is checkpointed")):
        out = str(tmp_path / name)
        assert main(flags(tiny_models, data, out, "--max_steps", "1", "--use_gradient_checkpointing",
                          "--blocks_to_checkpoint", "auto", *(["--vram_budget", budget] if budget else []))) == 0
        printed = capsys.readouterr().out
        assert f"--blocks_to_checkpoint auto{said}" in printed, printed
        assert ("gradient checkpointing: the last 1 of 2 blocks" in printed) == (name == "roomy")
        assert len(losses(out)) == 1


def test_trainer_swap_flag_checks(tiny_models, data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(flags(tiny_models, data, str(tmp_path / "a"), "--blocks_to_swap", "1"))
    assert e.value.code == 2 and "--blocks_to_swap needs --use_gradient_checkpointing" in capsys.readouterr().err
    code = main(flags(tiny_models, data, str(tmp_path / "b"), "--blocks_to_swap", "3", "--use_gradient_checkpointing",
                      "--max_steps", "1"))
    printed = capsys.readouterr()
    assert code == 2 and "--blocks_to_swap 3: the DiT has 2 blocks (its files); give 1 to 2" in printed.err
    assert "trainable parameters" not in printed.out


def test_block_counts_are_checked_before_anything_loads(tiny_models, data, tmp_path, capsys):
    """The dry run too: the DiT's block count from its local files' headers, else the downloaded DiT's 60."""
    from diffsynth.trainers import main

    argv = flags(tiny_models, data, str(tmp_path / "a"), "--use_gradient_checkpointing", "--dry_run")
    for extra, refused in ((["--blocks_to_checkpoint", "2"], False), (["--blocks_to_checkpoint", "3"], True),
                           (["--blocks_to_swap", "3"], True)):
        code = main(argv + extra)
        err = capsys.readouterr().err
        assert code == (2 if refused else 0), err
        if refused:
            assert f"{extra[0]} 3: the DiT has 2 blocks (its files); give 1 to 2" in err, err
    # model ids not downloaded yet: the real DiT's 60 blocks bound the flags
    ids = ["--model_id_with_origin_paths", "Nobody/Nothing:transformer/*.safetensors", "--models_dir", str(tmp_path)]
    assert main(argv + ids + ["--blocks_to_checkpoint", "60"]) == 0
    capsys.readouterr()
    assert main(argv + ids + ["--blocks_to_checkpoint", "61"]) == 2
    assert ("--blocks_to_checkpoint 61: the DiT has 60 blocks (the Qwen-Image DiT the model ids download); give 1 to "
            "60") in capsys.readouterr().err


def test_trainer_compile_with_swap_equals_compile(tiny_models, data, tmp_path):
    """--compile (each block's forward compiled) with block swap: the same losses and LoRA as compiled without
    swap."""
    from safetensors.torch import load_file

    runs = {}
    for name, swap in (("resident", []), ("swapped", ["--blocks_to_swap", "1"])):
        out = str(tmp_path / name)
        assert main(flags(tiny_models, data, out, "--max_steps", "2", "--use_gradient_checkpointing", "--compile",
                          "--cache_conditioning", str(tmp_path / "cache"), *swap)) == 0
        runs[name] = (losses(out), load_file(os.path.join(out, "checkpoint-final.safetensors")))
    assert runs["resident"][0] == runs["swapped"][0]
    a, b = runs["resident"][1], runs["swapped"][1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
