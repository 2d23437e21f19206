"""What the scripts in benchmarks/ share: the machine's name and their own section of BENCHMARKS.md."""
import os
import platform
import re
import shlex

from .io import atomic_path


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


# The DiTs the benchmarks compare and the LoRA they train: the trainer's default targets, q/k/v per layout.
VARIANTS = ("standard", "merged", "diffusers")
COMMON_TARGETS = ["to_out.0", "to_add_out",
                  "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]
QKV_TARGETS = {
    "standard": ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"],
    "merged": ["to_qkv", "add_qkv_proj"],
    "diffusers": ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"],
}


def comma_list(parser, value, what, choices):
    """A comma-list flag's value -> its items, each one of `choices` (else argparse's error naming the `what`,
    exit 2)."""
    items = [x for x in value.split(",") if x]
    for x in items:
        if x not in choices:
            parser.error(f"unknown {what} {x!r}; choose from {', '.join(choices)}")
    return items


def checkpointing_spec(text):
    """A benchmark row's checkpointing: 'N' (--blocks_to_checkpoint N), 'selective' (--selective_checkpointing) or
    both joined by + -> (N or None, selective); ValueError for anything else. The caller checks N's range."""
    parts = text.split("+")
    numbers = [int(p) for p in parts if p.isdigit()]
    if any(not (p.isdigit() or p == "selective") for p in parts) or len(numbers) > 1 or len(set(parts)) < len(parts):
        raise ValueError(text)
    return (numbers[0] if numbers else None), "selective" in parts


def command_line(script, argv, hidden=("--output",)):
    """The command that measured a table, as a reader would retype it: where files were written (the `hidden`
    flags) is no part of what was measured."""
    shown = [a for i, a in enumerate(argv) if not a.startswith(hidden) and not (i and argv[i - 1] in hidden)]
    return " ".join([f"python benchmarks/{script}"] + [shlex.quote(a) for a in shown])


def section_markers(name):
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_section(path, name, section):
    """Replace the `name` section of `path` (or append it), leaving the other benchmarks' sections alone."""
    start, end = section_markers(name)
    old = "# Benchmarks\n"
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
    new = pattern.sub(lambda _: section, old, count=1) if pattern.search(old) else old.rstrip("\n") + "\n\n" + section
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(new)
