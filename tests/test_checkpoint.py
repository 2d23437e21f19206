"""Training states as safetensors + json: exact round trips, resume equals the uninterrupted run, no unpickling."""
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch

from diffsynth.trainers.checkpoint import (
    MANIFEST, RandomState, StateError, flatten_state, list_states, load_object_state, load_training_state,
    save_object_state, save_training_state, unflatten_state,
)


def test_nested_state_round_trips_exactly(tmp_path):
    shared = torch.randn(4)
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": shared, "view": shared[:2]}, 7: {"m": torch.zeros(0)}},
        "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0, 7], "nan": float("nan"),
                          "inf": float("inf"), "name": None, "flag": True, "dtype": torch.bfloat16}],
        "rng": np.arange(5, dtype=np.uint32), "np_scalar": np.float64(0.1), "odd": {"__tensor__": "not a tag"},
        "a/b": {"c": torch.ones(1)}, "a": {"b/c": torch.full((1,), 2.0)}, "big": 2**62 + 1, "one_float": 1.0,
    }
    save_object_state(state, tmp_path, "opt")
    back = load_object_state(tmp_path, "opt")
    assert list(back["state"]) == [0, 7]  # int keys stay ints, in order
    assert torch.equal(back["state"][0]["exp_avg"], shared) and torch.equal(back["state"][0]["view"], shared[:2])
    group = back["param_groups"][0]
    assert group["betas"] == (0.9, 0.999) and isinstance(group["betas"], tuple)
    assert math.isnan(group["nan"]) and group["inf"] == math.inf and group["dtype"] is torch.bfloat16
    assert group["lr"] == 1e-4 and group["name"] is None and group["flag"] is True
    assert back["rng"].dtype == np.uint32 and (back["rng"] == np.arange(5)).all()
    assert back["np_scalar"] == 0.1 and back["odd"] == {"__tensor__": "not a tag"}
    assert back["a/b"]["c"].item() == 1.0 and back["a"]["b/c"].item() == 2.0  # colliding flat paths stay apart
    assert back["big"] == 2**62 + 1 and isinstance(back["one_float"], float)
    assert sorted(os.listdir(tmp_path)) == ["opt.json", "opt.safetensors"]


def test_unsupported_values_are_refused_by_path():
    with pytest.raises(TypeError, match="cannot save object at a/0 .*no pickle"):
        flatten_state({"a": [object()]})


def test_random_states_round_trip():
    state = RandomState().state_dict()
    tensors, structure = flatten_state(state)
    json.dumps(structure)
    expected = (torch.rand(3), np.random.rand(2), __import__("random").random())
    RandomState().load_state_dict(unflatten_state(tensors, structure))
    again = (torch.rand(3), np.random.rand(2), __import__("random").random())
    assert torch.equal(expected[0], again[0]) and (expected[1] == again[1]).all() and expected[2] == again[2]


class Counter:
    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def make(seed=0, rank=3):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, rank), torch.nn.Linear(rank, 2))
    model[0].requires_grad_(False)  # frozen "base" weights are not part of the state
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
    return model, optimizer, scheduler


def steps(model, optimizer, scheduler, counter, n):
    for _ in range(n):
        x = torch.randn(5, 6)
        model(x).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        counter.n += 1


def test_save_load_continues_exactly(tmp_path):
    model, optimizer, scheduler = make()
    counter = Counter()
    objects = {"optimizer": optimizer, "lr_scheduler": scheduler, "train_state": counter}
    steps(model, optimizer, scheduler, counter, 3)
    save_training_state(tmp_path, model, objects, info={"step": 3})
    steps(model, optimizer, scheduler, counter, 3)
    reference = [p.detach().clone() for p in model.parameters()]

    fresh, fresh_opt, fresh_sched = make(seed=1)  # other initial weights: everything must come from the state
    fresh[0].load_state_dict(model[0].state_dict())  # the frozen base is the same model file
    fresh_counter = Counter()
    manifest = load_training_state(tmp_path, fresh, {"optimizer": fresh_opt, "lr_scheduler": fresh_sched,
                                                     "train_state": fresh_counter})
    assert manifest["step"] == 3 and fresh_counter.n == 3
    steps(fresh, fresh_opt, fresh_sched, fresh_counter, 3)
    for a, b in zip(reference, fresh.parameters()):
        assert torch.equal(a, b)
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr() and fresh_counter.n == 6
    files = sorted(os.listdir(tmp_path))
    assert MANIFEST in files and "model.safetensors" in files and "rng-0.json" in files
    assert not [f for f in files if not f.endswith((".json", ".safetensors"))]
    from safetensors import safe_open

    with safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["1.bias", "1.weight", "2.bias", "2.weight"]  # trainable weights only


def test_other_rank_or_missing_object_is_refused_before_anything_changes(tmp_path):
    model, optimizer, scheduler = make(rank=3)
    steps(model, optimizer, scheduler, Counter(), 1)
    save_training_state(tmp_path, model, {"optimizer": optimizer, "lr_scheduler": scheduler})
    other, other_opt, other_sched = make(seed=2, rank=4)
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(StateError, match=r"1.weight: state \(3, 8\) vs model \(4, 8\).*--lora_rank"):
        load_training_state(tmp_path, other, {"optimizer": other_opt, "lr_scheduler": other_sched})
    with pytest.raises(StateError, match="the state has no ema"):
        load_training_state(tmp_path, other, {"optimizer": other_opt, "ema": Counter()})
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))
    assert not other_opt.state


class Planted:
    """Unpickling this creates a file: the proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickles_are_never_loaded(tmp_path):
    marker = tmp_path / "pwned"
    state = tmp_path / "checkpoints" / "step-2"
    state.mkdir(parents=True)
    model, optimizer, scheduler = make()
    steps(model, optimizer, scheduler, Counter(), 2)
    save_training_state(state, model, {"optimizer": optimizer})
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"):
        (state / name).write_bytes(pickle.dumps(Planted(str(marker))))
    load_training_state(state, model, {"optimizer": optimizer})
    assert not marker.exists()
    # an accelerate-style (pickled) state without our manifest is refused, not loaded
    old = tmp_path / "checkpoints" / "step-1"
    old.mkdir()
    (old / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Planted(str(marker))))
    with pytest.raises(StateError, match="old pickled format .*custom_checkpoint_0.pkl.*not loaded"):
        load_training_state(old, model, {"optimizer": optimizer})
    assert not marker.exists()
    assert list_states(tmp_path / "checkpoints") == [str(state)]  # only complete states are candidates
