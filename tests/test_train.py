"""bench.core.train: bit-exact resume from checkpoints, the loss history, and TrainHook.keep."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import pytest
import torch

from bench.core.train import TrainConfig, train
from tasks.organism import fresh_model, small_config, train_data


@pytest.fixture(scope="module")
def setup(small_world):
    cfg = small_config()
    tc = dataclasses.replace(cfg.train, steps=6, batch_size=8, checkpoint_every=3)
    return cfg, tc, train_data(small_world)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.unet.state_dict().items()}


def test_resume_is_bit_identical(setup, tmp_path):
    cfg, tc, data = setup
    a = fresh_model(cfg)
    init = state(a)
    sa = train(a, data, tc, tmp_path / "A", progress=False)
    assert sa["steps"] == 6

    b1 = fresh_model(cfg)
    assert all(torch.equal(v, init[k]) for k, v in b1.unet.state_dict().items())   # same init
    s1 = train(b1, data, dataclasses.replace(tc, steps=3), tmp_path / "B", progress=False)
    assert s1["steps"] == 3
    assert (tmp_path / "B" / "checkpoint.safetensors").is_file()
    b2 = fresh_model(cfg)                                # NEW model: weights come from the checkpoint
    s2 = train(b2, data, tc, tmp_path / "B", progress=False)
    assert s2["steps"] == 6

    sa_, sb = a.unet.state_dict(), b2.unet.state_dict()
    assert sa_.keys() == sb.keys()
    diff = [k for k in sa_ if not torch.equal(sa_[k], sb[k])]
    assert diff == []
    # training did change the weights
    assert any(not torch.equal(v, init[k]) for k, v in sa_.items())

    # loss history: one row per step, identical losses in both runs
    rows = {}
    for d in ("A", "B"):
        f = tmp_path / d / "loss_history.csv"
        assert f.is_file()
        with f.open() as fh:
            rows[d] = list(csv.DictReader(fh))
        assert [int(r["step"]) for r in rows[d]] == list(range(6))
        assert all(int(r["kept"]) == tc.batch_size and math.isfinite(float(r["loss"])) for r in rows[d])
        summary = json.loads((tmp_path / d / "train_summary.json").read_text())
        assert summary["steps"] == 6 and summary["kept_fraction"] == 1.0
    assert rows["A"] == rows["B"]
    # after training the UNet is back in inference mode
    assert not b2.unet.training and not any(p.requires_grad for p in b2.unet.parameters())


class DropAll:
    def __init__(self):
        self.calls = 0

    def keep(self, model, x_t, t, emb, eps_pred):
        self.calls += 1
        assert x_t.shape == eps_pred.shape and t.shape == (x_t.shape[0],) and emb.shape[0] == x_t.shape[0]
        return torch.zeros(x_t.shape[0], dtype=torch.bool)


class DropOdd:
    def keep(self, model, x_t, t, emb, eps_pred):
        k = torch.ones(x_t.shape[0], dtype=torch.bool)
        k[1::2] = False
        return k


def test_hook_dropping_everything_changes_nothing(setup, tmp_path):
    cfg, tc, data = setup
    tc = dataclasses.replace(tc, steps=3)
    m = fresh_model(cfg)
    before = state(m)
    hook = DropAll()
    s = train(m, data, tc, tmp_path, hooks=(hook,), progress=False)
    assert hook.calls == 3
    assert s["kept_fraction"] == 0
    assert all(torch.equal(v, before[k]) for k, v in m.unet.state_dict().items())
    with (tmp_path / "loss_history.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and all(int(r["kept"]) == 0 for r in rows)


def test_hook_partial_keep_fraction(setup, tmp_path):
    cfg, tc, data = setup
    m = fresh_model(cfg)
    s = train(m, data, dataclasses.replace(tc, steps=2), tmp_path, hooks=(DropOdd(),), progress=False)
    assert s["kept_fraction"] == pytest.approx(0.5)


def test_train_config_defaults_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().steps = 1
