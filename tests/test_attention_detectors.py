"""Issue 18: the attention detectors (Ren et al.'s LE / AE entropy, Chen et al.'s Bright Ending).

The contract tests (finite, deterministic, order- and batch-independent, model untouched) run over their
YAMLs in tests/test_detectors.py. Here: the recorded entropy equals a recomputation from q / k, recording
leaves the trajectory bit-identical, the model is restored also when a forward raises, the end-token
index, the UNet-evaluation counts, AE's aggregation, and BE with a uniform mask equals Wen's statistic."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from baselines.detectors.attention_entropy import AttentionEntropy
from baselines.detectors.bright_ending import BrightEnding, to_latent_grid
from baselines.detectors.cross_attention import (cross_attention_layers, down_block_top_layers, entropy,
                                                 eos_index, recording)
from baselines.detectors.noise_magnitude import NoiseMagnitude
from bench.core.patching import attention_processors, state_digest
from bench.core.sampling import sample

PROMPTS = ["a red circle", "worcester mooney poster"]


def processors(model) -> dict:
    return {k: id(v) for k, v in model.unet.attn_processors.items()}


@pytest.fixture(scope="module")
def tiny_sd(tiny_sd_path):
    from bench.core.model import load_model

    return load_model(tiny_sd_path)


def test_cross_attention_layers_in_forward_order(small_organism):
    layers = cross_attention_layers(small_organism.unet)
    assert [n.split(".")[0] for n in layers] == ["down_blocks", "mid_block", "up_blocks", "up_blocks"]
    assert all(n.endswith("attn2") for n in layers)
    assert down_block_top_layers(small_organism.unet) == layers[:1]
    # LE's layer 3 is the 4th layer; a larger index falls back to the last one (documented rule)
    assert AttentionEntropy(mode="le").resolve_layers(small_organism) == [layers[3]]
    assert AttentionEntropy(mode="le", layer=10).resolve_layers(small_organism) == [layers[-1]]
    assert AttentionEntropy(mode="ae").resolve_layers(small_organism) == layers


@pytest.mark.parametrize("which", ["organism", "tiny_sd"])
def test_eos_index_is_the_end_token(which, small_organism, tiny_sd):
    model = small_organism if which == "organism" else tiny_sd
    tok = model.tokenizer
    end = tok.eos_token_id if which == "tiny_sd" else tok.sep_token_id          # CLIP </s> / BERT [SEP]
    # "a red circle": start + 3 words + end = 5 ids -> index 4
    assert eos_index(model, ["a red circle"]) == [4]
    long = " ".join(["circle"] * 200)                                            # truncated
    idx = eos_index(model, ["a red circle", "", long])
    assert idx == [4, 1, model.max_length - 1]
    ids = tok(["a red circle", "", long], padding="max_length", max_length=model.max_length,
              truncation=True)["input_ids"]                                      # as model.tokenize does
    for row, i in enumerate(idx):
        assert ids[row][i] == end and ids[row][i - 1] != end


@torch.no_grad()
def test_recorded_entropy_equals_recomputation_from_q_k(small_organism):
    model = small_organism
    name = cross_attention_layers(model.unet)[0]
    attn = dict(model.unet.named_modules())[name]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 16, attn.to_q.in_features, generator=g)         # rows: [cond, uncond]
    enc = torch.randn(2, 5, attn.to_k.in_features, generator=g)
    plain = attn(h, encoder_hidden_states=enc)
    before = attn.processor
    with recording(model, [name]) as rec:
        out = attn(h, encoder_hidden_states=enc)
    assert attn.processor is before
    assert torch.equal(out, plain)                                      # output unchanged, bit for bit
    got = rec.mean[name]
    assert got.shape == (1, 5)                                          # conditional row only
    q = attn.head_to_batch_dim(attn.to_q(h[:1]))
    k = attn.head_to_batch_dim(attn.to_k(enc[:1]))
    a_bar = attn.get_attention_scores(q, k).mean(dim=(0, 1))            # over heads and queries
    direct = -(a_bar * a_bar.log()).sum()
    torch.testing.assert_close(got[0], a_bar, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(entropy(got)[0], direct, rtol=1e-5, atol=1e-6)


def test_recording_leaves_the_trajectory_bit_identical(small_organism):
    model = small_organism

    def run():
        eps = []
        r = sample(model, PROMPTS, [0, 1], steps=5, guidance=7.5, decode=False,
                   on_step=lambda s: eps.append(s.eps_text.clone()))
        return r.x, eps

    x0, e0 = run()
    with recording(model, cross_attention_layers(model.unet)) as rec:
        x1, e1 = run()
    assert rec.calls == 5 * len(cross_attention_layers(model.unet))
    assert torch.equal(x0, x1) and all(torch.equal(a, b) for a, b in zip(e0, e1))


@pytest.mark.parametrize("det", [AttentionEntropy(mode="le"), AttentionEntropy(mode="ae", total_steps=3),
                                 BrightEnding(steps=1, total_steps=2)], ids=["le", "ae", "be"])
def test_model_restored_when_a_forward_raises(det, small_organism, monkeypatch):
    unet = small_organism.unet
    d0, p0 = state_digest(unet), processors(small_organism)

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setitem(unet.conv_out.__dict__, "forward", boom)   # after every attention layer has run
    with pytest.raises(RuntimeError, match="boom"):
        det.score(small_organism, PROMPTS, seed=0)
    monkeypatch.undo()
    assert state_digest(unet) == d0 and processors(small_organism) == p0


def test_attention_processors_restores_on_error_and_checks_names(small_organism):
    unet = small_organism.unet
    d0, p0 = state_digest(unet), processors(small_organism)
    names = cross_attention_layers(unet)
    with pytest.raises(ValueError, match="inside"):
        with attention_processors(unet, {n: object() for n in names}):
            assert processors(small_organism) != p0
            raise ValueError("inside")
    assert state_digest(unet) == d0 and processors(small_organism) == p0
    with pytest.raises(KeyError):
        with attention_processors(unet, {names[0]: object(), "no.such.attn2": object()}):
            pass
    assert state_digest(unet) == d0 and processors(small_organism) == p0


def test_unet_evaluations_are_counted(small_organism):
    c, P = small_organism.counter, len(PROMPTS)
    cases = [(AttentionEntropy(mode="le", n_gen=2), 2 * 2 * 1),
             (AttentionEntropy(mode="ae", n_gen=1, total_steps=6), 2 * 1 * 6),
             (BrightEnding(n_gen=2, steps=2, total_steps=4), 2 * 2 * (4 + 2))]
    for det, per_prompt in cases:
        r0 = c.rows
        det.score(small_organism, PROMPTS, seed=0)
        assert c.rows - r0 == P * per_prompt, det
        json.dumps(det.params())                          # the manifest can hold it
        assert det.params()["n_gen"] == det.n_gen and det.params()["steps"] == det.steps


def test_ae_aggregation_and_padding_variants(small_organism):
    det = AttentionEntropy(mode="ae", n_gen=2, total_steps=10)
    assert det.window == [8, 9]
    tr = det.trace(small_organism, PROMPTS, seed=0)
    e, pad = tr["entropy"], tr["padding"]
    assert e.shape == pad.shape == (2, 2, 10)
    recorded = [0, 8, 9]
    assert np.isfinite(e[:, :, recorded]).all() and np.isnan(e[:, :, 1:8]).all()
    assert (pad[:, :, recorded] <= e[:, :, recorded] + 1e-9).all()     # a partial sum of the same terms
    want = (e[:, :, 8:].mean(2) + pad[:, :, 8:].mean(2) - pad[:, :, 0]).mean(1)
    np.testing.assert_allclose(det.score(small_organism, PROMPTS, seed=0), want, rtol=1e-12)
    sail = AttentionEntropy(mode="ae", n_gen=2, total_steps=10, padding_term="abs")
    want_abs = (e[:, :, 8:].mean(2) + np.abs(pad[:, :, 8:] - pad[:, :, :1]).mean(2)).mean(1)
    np.testing.assert_allclose(sail.score(small_organism, PROMPTS, seed=0), want_abs, rtol=1e-12)
    # LE at layer 3 is the first step of that layer only
    le = AttentionEntropy(mode="le", n_gen=2)
    assert le.trace(small_organism, PROMPTS, seed=0)["entropy"].shape == (2, 2, 1)


def test_be_with_a_uniform_mask_is_wens_statistic(small_organism):
    be = BrightEnding(n_gen=2, steps=3, total_steps=10)
    H, W = small_organism.latent_shape[-2:]
    uniform = np.full((len(PROMPTS), 2, H, W), 0.37, dtype=np.float32)
    got = be.masked_norms(small_organism, PROMPTS, uniform, seed=0).mean(1).mean(1)
    wen = NoiseMagnitude(n_gen=2, steps=3, total_steps=10).score(small_organism, PROMPTS, seed=0)
    np.testing.assert_allclose(got, wen, rtol=1e-5)


def test_be_masks_are_soft_and_mapped_to_the_latent_grid(small_organism):
    be = BrightEnding(n_gen=2, steps=2, total_steps=4)
    native = be.masks(small_organism, PROMPTS, seed=0, native=True)
    latent = be.masks(small_organism, PROMPTS, seed=0)
    H, W = small_organism.latent_shape[-2:]
    assert native.shape == (2, 2, H // 2, W // 2) and latent.shape == (2, 2, H, W)
    assert np.isfinite(native).all() and (native > 0).all() and (native < 1).all()
    mapped = to_latent_grid(torch.from_numpy(native.reshape(4, H // 2, W // 2)), (H, W)).numpy()
    np.testing.assert_allclose(latent.reshape(4, H, W), mapped, rtol=1e-6)
    np.testing.assert_allclose(latent.mean(axis=(2, 3)), native.mean(axis=(2, 3)), rtol=1e-5)  # bilinear x2
    # the score is pass 2 through pass 1's masks
    np.testing.assert_allclose(be.score(small_organism, PROMPTS, seed=0),
                               be.masked_norms(small_organism, PROMPTS, latent, seed=0).mean(1).mean(1),
                               rtol=1e-6)


def test_bad_settings_are_refused():
    for kw in ({"mode": "xe"}, {"padding_term": "mad"}, {"layer_average": "max"}, {"n_gen": 0},
               {"mode": "ae", "total_steps": 10, "last_steps": 11}):
        with pytest.raises(ValueError):
            AttentionEntropy(**kw)
    with pytest.raises(ValueError):
        BrightEnding(steps=60, total_steps=50)


def test_attention_processors_restores_a_module_processor_and_the_module_table():
    """A processor that is an nn.Module lives in the attention module's ``_modules`` (diffusers'
    ``set_processor`` pops it when a plain processor is set): it and the table come back as they were."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    class ModuleProcessor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def __call__(self, *a, **k):
            return AttnProcessor2_0()(*a, **k)

    net = torch.nn.Module()
    net.attn2 = Attention(query_dim=8, cross_attention_dim=4, heads=2, dim_head=4)
    proc = ModuleProcessor()
    net.attn2.set_processor(proc)
    keys0, d0 = list(net.attn2._modules), state_digest(net)
    with pytest.raises(RuntimeError):
        with attention_processors(net, {"attn2.processor": object()}):
            assert "processor" not in net.attn2._modules
            raise RuntimeError("inside")
    assert net.attn2.processor is proc and list(net.attn2._modules) == keys0 and state_digest(net) == d0


def test_detectors_run_on_the_tiny_random_sd(tiny_sd):
    """SD-shaped folder with a VAE (4-channel 8 x 8 latent, cross-attention at 4 x 4 in down_blocks.1)."""
    d0 = state_digest(tiny_sd.unet)
    for det in (AttentionEntropy(mode="le"), AttentionEntropy(mode="ae", total_steps=5),
                BrightEnding(n_gen=2, steps=2, total_steps=3)):
        s = det.score(tiny_sd, PROMPTS, seed=0)
        assert s.shape == (2,) and np.isfinite(s).all()
    m = BrightEnding(total_steps=3, steps=1).masks(tiny_sd, PROMPTS, seed=0)
    assert m.shape == (2, 1, *tiny_sd.latent_shape[-2:])
    assert state_digest(tiny_sd.unet) == d0


@pytest.mark.parametrize("det, overrides, per_prompt", [
    ("attn_le_n1", [], 2.0),
    ("attn_ae_n1", ["detector.total_steps=5"], 2.0 * 5),
    ("be_n1", ["detector.total_steps=4", "detector.steps=2"], 2.0 * (4 + 2))])
def test_runner_end_to_end(det, overrides, per_prompt, tmp_path, small_organism):
    """Through the runner (Hydra config, run folder, leaderboard): the UNet rows per prompt it measures."""
    import pandas as pd
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from bench.run.runner import run_detect

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        c = compose("detect", overrides=[f"runs_dir={tmp_path}/runs", f"leaderboard={tmp_path}/lb.csv",
                                         "hardware.threads=1", "model=organism_small", "task.labels=planted",
                                         "task.max_per_group=2", f"detector={det}", *overrides])
    m = run_detect(OmegaConf.to_container(c, resolve=True), model=small_organism, progress=False)
    lb = pd.read_csv(tmp_path / "lb.csv")
    assert len(lb) == 1 and lb.loc[0, "unet_evals_per_prompt"] == per_prompt
    df = pd.read_csv(Path(tmp_path, "runs", m["run"], "per_prompt.csv"))
    assert len(df) == m["n_pos"] + m["n_neg"]
