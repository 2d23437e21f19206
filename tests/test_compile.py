"""torch.compile of the DiT blocks and fp8 compute: compiled == eager, fp8 error bounded, and both end to end in the
trainer (two DDP processes) and the inference script.

Compiling on the CPU costs tens of seconds per block graph, so the models here are built as the trainer builds them
(tiny DiT, LoRA rank 4 on the default targets, the last block's unused text stream frozen): the graphs compiled by one
test are the ones the next test needs, found in dynamo's cache or inductor's on-disk cache. All tests of this file
run on one test worker (xdist group), so that those caches are shared.
"""
import collections
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import TINY_MODEL_IDS, random_diffusers_dit
from diffsynth.lora import inject_lora
from diffsynth.models import QwenImageDiT, QwenImageDiTMergedQKV
from diffsynth.models.qwen_image_dit import ATTENTION_OPS
from diffsynth.trainers import build_parser
from diffsynth.utils.compile import compile_blocks, compiled_graphs, watch_compile
from diffsynth.utils.fp8 import FP8Linear, enable_fp8_linear
from test_dit import build, edit_batch
from test_trainer import flags, losses

pytestmark = pytest.mark.xdist_group("compile")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lora_dit(cls, num_layers=2, fp8=None, checkpointing=True):
    """A tiny DiT with a LoRA as the trainer makes it: frozen base, fp32 LoRA with non-zero B, the parameters that
    get no gradient frozen, optionally fp8 ("storage" / "compute"), gradient checkpointing. Seeded: every call
    gives the same weights."""
    reference = random_diffusers_dit()
    if num_layers != reference.config.num_layers:
        from diffusers import QwenImageTransformer2DModel

        torch.manual_seed(0)
        reference = QwenImageTransformer2DModel(**{**reference.config, "num_layers": num_layers})
        with torch.no_grad():
            for p in reference.parameters():
                p.normal_(0, 0.05)
    model = build(cls, reference, False)
    model.requires_grad_(False)
    targets = build_parser(cls is QwenImageDiTMergedQKV).get_default("lora_target_modules")
    torch.manual_seed(1)
    inject_lora(model, targets, rank=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
            if name.startswith(tuple(m + "." for m in model.unused_in_output())):
                p.requires_grad_(False)
    if fp8:
        enable_fp8_linear(model, compute=fp8 == "compute")
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


def step(model, batch):
    """Output and LoRA gradients of one loss.backward()."""
    for p in model.parameters():
        p.grad = None
    out = model(*batch)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def relative(a, b):
    # 0 for two zero tensors (the standard layout's last text query gets an exactly zero gradient)
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.fixture(scope="module")
def compiled_runs():
    """Per layout: eager and compiled outputs and gradients on two batches of different token counts, and how many
    graphs compiled for each."""
    torch._dynamo.reset()  # graphs an earlier test in this process compiled would be found, not compiled
    runs = {}
    # the trainer's merged DiT (two blocks); the standard one with one block: one graph to compile
    for cls, layers in ((QwenImageDiTMergedQKV, 2), (QwenImageDiT, 1)):
        eager, compiled = lora_dit(cls, layers), lora_dit(cls, layers)
        compile_blocks(compiled)
        results = []
        for text_len in (7, 11):  # another prompt length: the token dims are dynamic
            batch = edit_batch(batch=1, text_len=text_len, pad=False)
            before = compiled_graphs()
            results.append((step(eager, batch), step(compiled, batch), compiled_graphs() - before))
        runs[cls] = results
    return runs


@pytest.mark.parametrize("cls", [QwenImageDiTMergedQKV, QwenImageDiT])
def test_compiled_equals_eager_with_lora_and_checkpointing(compiled_runs, cls):
    (first_eager, first_compiled, first_graphs), (second_eager, second_compiled, second_graphs) = compiled_runs[cls]
    # one graph for the first block (its inputs carry no gradient), one for the last (its text-stream LoRA is
    # frozen), one in all for a single block; a new prompt length compiles nothing
    assert first_graphs == (2 if cls is QwenImageDiTMergedQKV else 1) and second_graphs == 0
    for (out, grads), (out_c, grads_c) in ((first_eager, first_compiled), (second_eager, second_compiled)):
        assert relative(out_c, out) < 1e-5  # inductor reorders fp32 sums; the eager output is ~1e0
        assert grads.keys() == grads_c.keys()
        assert any("lora_A" in n for n in grads) and any("lora_B" in n for n in grads)
        for name in grads:
            assert relative(grads_c[name], grads[name]) < 1e-4, name


def bucket_batch(batch, text_len, shape, seed=2):
    """A batch of `batch` samples of one aspect bucket: target and edit image of `shape` (1, h, w), padded text."""
    g = torch.Generator().manual_seed(seed)
    tokens = 2 * shape[1] * shape[2]
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask[-1, text_len // 2:] = 0
    return (torch.randn(batch, tokens, 64, generator=g), torch.randn(batch, text_len, 64, generator=g), mask,
            torch.rand(batch, generator=g), [[shape, shape]] * batch)


def test_identical_blocks_share_one_graph_and_buckets_do_not_recompile():
    torch._dynamo.reset()  # graphs an earlier test in this process compiled would be found, not compiled
    model = build(QwenImageDiTMergedQKV, random_diffusers_dit(), False)
    reference = build(QwenImageDiTMergedQKV, random_diffusers_dit(), False)
    compile_blocks(model)
    messages = []
    before = compiled_graphs()
    with torch.no_grad():
        calls = [edit_batch(batch=1, text_len=7, pad=False), edit_batch(batch=1, text_len=9, pad=False),
                 bucket_batch(3, 10, (1, 4, 4)), bucket_batch(3, 6, (1, 2, 8)), bucket_batch(3, 12, (1, 6, 2))]
        graphs = []
        for batch in calls:
            with watch_compile(model, messages.append):
                out = model(*batch)
            torch.testing.assert_close(out, reference(*batch), rtol=1e-5, atol=1e-5)
            graphs.append(compiled_graphs() - before)
    # both blocks and both prompt lengths: one graph; batches of 3 with padded text: one more, whatever the
    # bucket (image size) and prompt length
    assert graphs == [1, 1, 2, 2, 2]
    assert messages[0] == "compiling DiT blocks (first step)..."
    assert messages[1].startswith("compiled DiT blocks: 1 graph(s) in ")
    assert messages[2].startswith("compiled DiT blocks: 1 graph(s) in ") and "a new batch size" in messages[2]
    assert len(messages) == 3


def test_compiled_equals_eager_with_checkpoint_offload(compiled_runs):
    """--use_gradient_checkpointing_offload: saved block inputs on the CPU around compiled blocks (the graphs of
    compiled_runs)."""
    eager, compiled = lora_dit(QwenImageDiTMergedQKV), lora_dit(QwenImageDiTMergedQKV)
    compiled.enable_gradient_checkpointing(offload=True)
    compile_blocks(compiled)
    batch = edit_batch(batch=1, pad=False)
    (out, grads), (out_c, grads_c) = step(eager, batch), step(compiled, batch)
    assert relative(out_c, out) < 1e-5
    assert max(relative(grads_c[n], grads[n]) for n in grads) < 1e-4


def test_compile_leaves_block_hooks_outside_the_graph():
    """Block swapping and FSDP hook the blocks: hooks run eagerly around the compiled forward, every call."""
    model = build(QwenImageDiTMergedQKV, random_diffusers_dit(), False)
    compile_blocks(model)
    seen = []
    for i, block in enumerate(model.transformer_blocks):
        block.register_forward_pre_hook(lambda module, args, i=i: seen.append(i))
    with torch.no_grad():
        for _ in range(2):
            model(*edit_batch(batch=1, pad=False))
    assert seen == [0, 1, 0, 1]


def test_fp8_compute_error_is_bounded():
    """fp8 matmuls (activations per token, weights per row) against the fp32 model: output and LoRA gradients.
    Measured on this tiny random DiT, relative L2 errors of the output / all LoRA gradients / the worst LoRA tensor:
    fp8 storage 3.6% / 5.4% / 19%, fp8 compute 5.0% / 6.6% / 20-27%, in both layouts."""
    from diffsynth.utils import fp8

    calls = []
    real = torch._scaled_mm

    def spy(*args, **kwargs):
        calls.append(args[0].dtype)
        return real(*args, **kwargs)

    batch = edit_batch()
    for cls in (QwenImageDiTMergedQKV, QwenImageDiT):
        reference = lora_dit(cls, checkpointing=False)
        out, grads = step(reference, batch)
        errors = {}
        for mode in ("storage", "compute"):
            model = lora_dit(cls, fp8=mode, checkpointing=False)
            calls.clear()
            torch._scaled_mm = spy
            try:
                out8, grads8 = step(model, batch)
            finally:
                torch._scaled_mm = real
            assert (len(calls) > 0) == (mode == "compute") and set(calls) <= {fp8.FP8}
            errors[mode] = (relative(out8, out), relative(*(torch.cat([g[n].flatten() for n in grads])
                                                              for g in (grads8, grads))),
                            max(relative(grads8[n], grads[n]) for n in grads))
        # output, all LoRA gradients as one vector, the worst single LoRA tensor (a small gradient, relatively)
        assert errors["compute"][0] < 0.08 and errors["compute"][1] < 0.1 and errors["compute"][2] < 0.4, errors
        # the weights' rounding is the larger part: quantising the activations too adds less than as much again
        for i in range(2):
            assert errors["storage"][i] < errors["compute"][i] < 2 * errors["storage"][i], errors


def test_fp8_compute_keeps_only_fp8_weights_for_backward():
    layer = torch.nn.Linear(64, 128).requires_grad_(False)
    torch.nn.init.normal_(layer.bias)
    enable_fp8_linear(layer, compute=True)
    assert isinstance(layer, FP8Linear) and layer.fp8_compute
    saved, calls = [], []
    real = torch._scaled_mm

    def spy(*args, **kwargs):
        calls.append((kwargs["use_fast_accum"], kwargs["bias"] is not None))
        return real(*args, **kwargs)

    x = torch.randn(5, 3, 64, requires_grad=True)
    torch._scaled_mm = spy
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = layer(x)
        y.sum().backward()
    finally:
        torch._scaled_mm = real
    assert y.shape == (5, 3, 128) and y.dtype == torch.float32
    assert [t.dtype for t in saved] == [torch.float8_e4m3fn, torch.float32]  # the weight and its row scales
    dense = layer.weight.float() * layer.weight_scale
    assert relative(y, x.detach() @ dense.t() + layer.bias) < 0.05  # the bias is added in the matmul's epilogue
    assert relative(x.grad, torch.ones(5, 3, 128) @ dense) < 0.05
    # forward: fast accumulation, bias in the kernel; input gradient: fp32 accumulation (torchao's defaults)
    assert calls == [(True, True), (False, False)]
    odd = torch.nn.Linear(24, 40).requires_grad_(False)
    enable_fp8_linear(odd, compute=True)
    assert not odd.fp8_compute  # not a multiple of 16: CUDA's kernels cannot take it, the upcast path runs


def test_fp8_compute_problem_names_the_gpu(monkeypatch):
    from diffsynth.utils import fp8

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert fp8.fp8_compute_problem("cuda") == ("NVIDIA A100-SXM4-80GB has compute capability 8.0; fp8 matmuls need "
                                               "8.9 or newer (Ada, Hopper, Blackwell)")
    assert fp8.fp8_compute_problem("cpu") is None  # torch runs _scaled_mm on the CPU
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("not here")))
    assert "cannot run row-wise scaled fp8 matmuls on cpu (not here)" in fp8.fp8_compute_problem("cpu")


@pytest.mark.parametrize("fp8", ["storage", "compute"])
def test_compiled_fp8_equals_eager_fp8(fp8):
    eager = lora_dit(QwenImageDiTMergedQKV, 1, fp8=fp8)  # one block: one graph to compile
    compiled = lora_dit(QwenImageDiTMergedQKV, 1, fp8=fp8)
    compile_blocks(compiled)
    batch = edit_batch(batch=1, pad=False)
    (out, grads), (out_c, grads_c) = step(eager, batch), step(compiled, batch)
    # the quantisation rounds the same values, up to inductor's fp32 sums landing on the other side of a rounding
    assert relative(out_c, out) < 1e-3
    assert max(relative(grads_c[n], grads[n]) for n in grads) < 1e-2


def test_trainer_compile_on_two_ddp_processes(tiny_models, data, tmp_path):
    """--compile in the subprocesses `accelerate launch` starts (inductor needs the C++ compiler there), under DDP,
    with gradient checkpointing. The graphs are those of compiled_runs' merged DiT (found in inductor's cache)."""
    from test_trainer_scale import launch_two_processes

    out = str(tmp_path / "out")
    result = launch_two_processes(tiny_models, data, out, 29547, "--max_steps", "2", "--use_gradient_checkpointing",
                                  "--compile")
    printed = result.stdout + result.stderr
    assert "--compile: 2 DiT blocks compile on the first step" in printed
    assert printed.count("compiling DiT blocks (first step)...") == 1  # the main process speaks
    assert "compiled DiT blocks: 2 graph(s) in " in printed
    assert len(losses(out)) == 2 and all(torch.isfinite(torch.tensor(losses(out))))
    assert os.path.isfile(os.path.join(out, "checkpoint-final.safetensors"))


def test_trainer_fp8_compute_and_its_fallback(tiny_models, data, tmp_path, capsys, monkeypatch):
    from diffsynth.trainers import main
    from diffsynth.utils import fp8

    out = str(tmp_path / "fp8")
    assert main(flags(tiny_models, data, out, "--max_steps", "2", "--fp8_compute", "--cache_conditioning")) == 0
    printed = capsys.readouterr().out
    assert "fp8 compute: 26 frozen linear layers stored in float8_e4m3fn, 26 of them with fp8 matmuls" in printed
    assert "note: --fp8_compute pays off with --compile" in printed  # eager fp8 compute was measured slower
    assert all(torch.isfinite(torch.tensor(losses(out))))

    monkeypatch.setattr(fp8, "fp8_compute_problem", lambda device: "Tesla T4 has compute capability 7.5; ...")
    out = str(tmp_path / "fallback")
    assert main(flags(tiny_models, data, out, "--max_steps", "1", "--fp8_compute")) == 0
    assert ("--fp8_compute: Tesla T4 has compute capability 7.5; ...; falling back to fp8 storage "
            "(--enable_fp8_training): 26 frozen linear layers") in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--compile", "--fp8_compute"])
def test_inference_script_with_compile_or_fp8_compute(tiny_models, tmp_path, flag):
    from PIL import Image

    edit, out = str(tmp_path / "edit.png"), tmp_path / "out.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(edit)
    script = os.path.join(ROOT, "examples/qwen_image/model_inference/Qwen-Image-Edit-LoRA-MergedQKV-Inference.py")
    result = subprocess.run(
        [sys.executable, script, "--edit_image", edit, "--prompt", "make it blue", "--output", str(out),
         "--model_id_with_origin_paths", TINY_MODEL_IDS, "--models_dir", tiny_models, "--num_steps", "2",
         "--edit_image_area", "4096", "--device", "cpu", flag],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout
    if flag == "--compile":
        # the first graph of test_identical_blocks_share_one_graph_...: both blocks, no grad, compiled in the first
        # step; the negative prompt (another length) and the second step compile nothing
        assert "--compile: 2 DiT blocks compile on the first denoising step" in printed
        assert "compiling DiT blocks (first denoising step)..." in printed
        assert "compiled DiT blocks: 1 graph(s)" in printed and printed.count("compiled DiT blocks") == 1
    else:
        assert "fp8 compute: 26 frozen linear layers stored in float8_e4m3fn, 26 of them with fp8 matmuls" in printed
    assert Image.open(out).size == (64, 64)  # the output size follows the edit image at --edit_image_area


def test_compile_and_fp8_with_block_swap():
    """Block swap binds each block around its call, outside the compiled forward: the compiled DiT with its last
    block swapped gives the compiled DiT's output (the first no-grad graph of
    test_identical_blocks_share_one_graph_...); and the pipeline's fp8 conversion sets the swap up again around
    itself."""
    from diffsynth.pipelines.qwen_image import QwenImagePipeline

    reference = build(QwenImageDiTMergedQKV, random_diffusers_dit(), False)
    model = build(QwenImageDiTMergedQKV, random_diffusers_dit(), False)
    model.enable_block_swap(1, "cpu")
    compile_blocks(model)
    batch = edit_batch(batch=1, pad=False)
    with torch.no_grad():
        torch.testing.assert_close(model(*batch), reference(*batch), rtol=1e-5, atol=1e-5)
    assert model.block_swap.copies > 0

    pipe = QwenImagePipeline(build(QwenImageDiTMergedQKV, random_diffusers_dit(), False))
    pipe.enable_block_swap(1)
    assert "fp8 compute: 26 frozen linear layers" in pipe.enable_fp8(compute=True)
    fp8_reference = build(QwenImageDiTMergedQKV, random_diffusers_dit(), False).requires_grad_(False)
    enable_fp8_linear(fp8_reference, compute=True)
    with torch.no_grad():
        torch.testing.assert_close(pipe.dit(*batch), fp8_reference(*batch), rtol=0, atol=0)
    assert pipe.dit.block_swap is not None and pipe.dit.block_swap.copies > 0


class AttentionRuns(TorchDispatchMode):
    """Counts the attention kernels that run (eager code only: a dispatch mode keeps dynamo from compiling)."""

    def __init__(self):
        super().__init__()
        self.runs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.runs += func in ATTENTION_OPS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cls", [QwenImageDiTMergedQKV, QwenImageDiT])
def test_keep_attention_skips_attention_in_the_recompute(cls):
    """Selective checkpointing (--selective_checkpointing): the checkpointed blocks keep their attention outputs, so
    the backward pass runs attention's forward no second time; the numbers are those of checkpointing everything,
    with and without the offload."""
    batch = edit_batch(batch=1, pad=False)
    full, selective = lora_dit(cls), lora_dit(cls)
    runs = []
    for offload in (False, True):
        full.enable_gradient_checkpointing(offload=offload)
        selective.enable_gradient_checkpointing(offload=offload, keep_attention=True)
        for model in (full, selective):
            with AttentionRuns() as counter:
                out, grads = step(model, batch)
            runs.append((counter.runs, out, grads))
        (n_full, out, grads), (n_sel, out_s, grads_s) = runs[-2:]
        assert (n_full, n_sel) == (4, 2)  # 2 blocks: forward + recompute, forward only
        torch.testing.assert_close(out_s, out, rtol=0, atol=0)
        assert grads.keys() == grads_s.keys() and any("lora_A" in n for n in grads)
        for name in grads:
            torch.testing.assert_close(grads_s[name], grads[name], rtol=0, atol=0, msg=name)


def test_keep_attention_with_the_checkpoint_around_compiled_blocks(monkeypatch):
    """With the offload (or block swap) the checkpoint stays outside the compiled graph; inductor calls attention as
    an external kernel, through the dispatcher, where the selective-checkpoint cache keeps its output: the policy sees
    it once per block, from compiled code (no eager op such as gelu reaches it), and the numbers are those of the
    compiled blocks under full checkpointing."""
    import diffsynth.models.qwen_image_dit as dit_module

    seen = []
    policy = dit_module.save_attention_outputs
    monkeypatch.setattr(dit_module, "save_attention_outputs", lambda ctx, op, *a, **k: seen.append(op) or policy(
        ctx, op, *a, **k))
    batch = edit_batch(batch=1, pad=False)
    full, selective = lora_dit(QwenImageDiTMergedQKV), lora_dit(QwenImageDiTMergedQKV)
    full.enable_gradient_checkpointing(offload=True)
    selective.enable_gradient_checkpointing(offload=True, keep_attention=True)
    for model in (full, selective):
        compile_blocks(model)
        assert not any(block.checkpoints_in_graph for block in model.transformer_blocks)
    (out, grads), (out_s, grads_s) = step(full, batch), step(selective, batch)
    seen.clear()
    (out, grads), (out_s, grads_s) = step(full, batch), step(selective, batch)  # compiled: the second step
    assert sum(op in ATTENTION_OPS for op in seen) == 2
    assert torch.ops.aten.gelu.default not in seen and seen  # the compiled graph ran, with the cache around it
    torch.testing.assert_close(out_s, out, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads_s[name], grads[name], rtol=0, atol=0, msg=name)


def graph_counts(graphs):
    """-> (matmul FLOPs, attention forward ops) of the recorded FX graphs."""
    def size(d):
        return d.node.hint if isinstance(d, torch.SymInt) else d

    flops = attention = 0
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                a, b = (x.meta["val"].shape for x in node.args[-2:])
                flops += 2 * size(a[0]) * size(a[1]) * size(b[1])
            # (checkpointed, attention runs as a random op: run_and_save_rng_state(op, ...), in the backward
            # run_with_rng_state(state, op, ...), so that a recompute would draw the same dropout)
            ops = [node.target] + [a for a in node.args if isinstance(a, torch._ops.OpOverload)]
            attention += any(op in ATTENTION_OPS for op in ops)
    return flops, attention


@pytest.mark.parametrize("keep_attention", [False, True])
def test_checkpoint_inside_the_compiled_graph(keep_attention):
    """Without the offload and block swap the checkpoint goes inside the compiled graph: the backward graph holds
    the recompute, and recomputes neither the MLPs' output projections (a third of the forward's matmul work) nor,
    with keep_attention, attention's forward; the numbers are eager's within compile's tolerance."""
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    graphs = {}

    def backend(kind):
        return aot_autograd(fw_compiler=lambda gm, ex: graphs.setdefault(kind + " forward", []).append(gm)
                            or gm.forward,
                            bw_compiler=lambda gm, ex: graphs.setdefault(kind + " backward", []).append(gm)
                            or gm.forward)

    batch = edit_batch(batch=1, pad=False)
    eager, plain, inside = (lora_dit(QwenImageDiTMergedQKV, checkpointing=c) for c in (True, False, True))
    inside.enable_gradient_checkpointing(keep_attention=keep_attention)
    compile_blocks(plain, backend=backend("plain"))
    compile_blocks(inside, backend=backend("inside"))
    assert all(block.checkpoints_in_graph for block in inside.transformer_blocks)
    (out, grads), (out_p, _), (out_i, grads_i) = step(eager, batch), step(plain, batch), step(inside, batch)
    forward, _ = graph_counts(graphs["plain forward"])
    backward, _ = graph_counts(graphs["plain backward"])
    assert graph_counts(graphs["inside forward"])[0] == forward
    recomputed, attention = graph_counts(graphs["inside backward"])
    assert 0.6 * forward < recomputed - backward < 0.7 * forward  # the output projections: about 1/3
    assert attention == (0 if keep_attention else 2)  # 2 blocks
    # What the forward graphs keep for the backward, beyond the weights: the block's image input (beside its output,
    # the other tensor of this shape), RoPE's cos and sin and, with keep_attention, attention's output and
    # log-sum-exp; nothing else of the 48 image or 55 joint tokens (the memory the VRAM planner counts)
    expected = {(1, 48, 64): 2, (55, 32): 2, **({(1, 2, 55, 32): 1, (1, 2, 55): 1} if keep_attention else {})}
    for gm in graphs["inside forward"]:
        outputs = [n.meta.get("val") for n in next(n for n in gm.graph.nodes if n.op == "output").args[0]
                   if isinstance(n, torch.fx.Node)]
        shapes = [tuple(int(d) for d in v.shape) for v in outputs if isinstance(v, torch.Tensor)]
        assert collections.Counter(x for x in shapes if {48, 55} & set(x)) == expected
    assert relative(out_i, out) < 1e-5 and relative(out_p, out) < 1e-5
    for name in grads:
        assert relative(grads_i[name], grads[name]) < 1e-4, name


def test_compiled_network_dropout_equals_eager_with_the_same_random_numbers(monkeypatch):
    """--network_dropout in a compiled block with the checkpoint inside its graph: with inductor drawing its random
    numbers as eager does (fallback_random; by default it draws its own, other masks), the output and gradients are
    eager's: the mask is applied where eager applies it and the backward uses the forward's mask. Eval: no dropout."""
    from diffsynth.lora.fused_linear import fuse_lora_forward

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    batch = edit_batch(batch=1, pad=False)
    eager, compiled = lora_dit(QwenImageDiT, 1), lora_dit(QwenImageDiT, 1)
    for model in (eager, compiled):
        fuse_lora_forward(model, 0.3)
    compile_blocks(compiled)
    torch.manual_seed(3)
    out, grads = step(eager, batch)
    torch.manual_seed(3)
    out_c, grads_c = step(compiled, batch)
    assert relative(out_c, out) < 1e-5
    assert grads.keys() == grads_c.keys()
    for name in grads:
        assert relative(grads_c[name], grads[name]) < 1e-4, name
    torch.manual_seed(3)
    assert relative(step(lora_dit(QwenImageDiT, 1), batch)[0], out) > 1e-4  # it dropped something
    with torch.no_grad():
        assert relative(compiled.eval()(*batch), lora_dit(QwenImageDiT, 1).eval()(*batch)) < 1e-5
