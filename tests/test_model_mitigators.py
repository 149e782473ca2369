"""Model-side mitigators: NeMo neuron deactivation and Wanda-style pruning (small test organism)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.contracts import GenSpec
from baselines.mitigators.nemo import (NeMo, blocked, deactivated_sample, neurons_by_layer,
                                       value_layers)
from baselines.mitigators.nemo_signal import SignalConfig, ms_ssim, pairwise_max_ssim
from baselines.mitigators.pruning import (WandaPrune, ffn_out_layers, top_k_per_row, union_mask,
                                          wanda_step_mask)
from bench.core.patching import state_digest
from bench.core.sampling import sample

SPEC = GenSpec(steps=4, guidance=7.5, batch_size=3)
SEEDS = [0, 1]


def _prompts(world, label: int, n: int) -> list[str]:
    return [e.prompt for e in world.eval_prompts if e.label == label][:n]


def _plain(model, prompts):
    return sample(model, prompts, SEEDS, steps=SPEC.steps, guidance=SPEC.guidance, batch_size=SPEC.batch_size)


def _n_hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.fixture(scope="module")
def fitted_nemo(small_organism, small_world):
    # tau_mem = 0 forces the whole search (the test organism memorizes nothing; plumbing only)
    nemo = NeMo(tau_mem=0.0, n_seeds=4)
    nemo.fit(small_organism, memorized=_prompts(small_world, 1, 2),
             reference=_prompts(small_world, 0, 12), seed=0)
    return nemo


@pytest.fixture(scope="module")
def fitted_wanda(small_organism, small_world):
    w = WandaPrune(strength=0.05, n_timesteps=3, steps=SPEC.steps)
    w.fit(small_organism, memorized=_prompts(small_world, 1, 3), reference=[], seed=0)
    return w


# ---------------------------------------------------------------------------------- MS-SSIM
def test_ms_ssim_single_scale_matches_skimage():
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 32, 32, generator=g)
    b = (0.7 * a + 0.3 * torch.rand(2, 3, 32, 32, generator=g)).clamp(0, 1)
    ours = ms_ssim(a, b, SignalConfig(betas=(1.0,)))
    ref = [structural_similarity(a[i].numpy(), b[i].numpy(), channel_axis=0, data_range=1.0,
                                 gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
           for i in range(2)]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-4, atol=1e-5)


def test_ms_ssim_identity_and_kernel_rule():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ms_ssim(x, x), torch.ones(3))
    assert SignalConfig().kernel_for(64) == (11, 1.5)                  # NeMo's setting fits SD latents
    k, sigma = SignalConfig().kernel_for(16)                           # organism: recorded deviation
    assert k == 3 and sigma == pytest.approx(1.5 * 3 / 11)
    with pytest.raises(ValueError, match="too small"):
        SignalConfig().kernel_for(8)
    pm = pairwise_max_ssim(torch.stack([x[0], x[0], x[1]]))
    assert pm[0] == pytest.approx(1.0) and pm[1] == pytest.approx(1.0) and pm[2] < 1.0


# ---------------------------------------------------------------------------------- NeMo
def test_search_space_is_down_and_mid_value_layers(small_organism):
    layers = value_layers(small_organism.unet)
    assert list(layers) and all(n.endswith("attn2.to_v") for n in layers)
    assert all(n.startswith(("down_blocks.", "mid_block.")) for n in layers)
    assert list(layers)[-1].startswith("mid_block.")                   # down blocks first, then mid
    wide = value_layers(small_organism.unet, "all")                     # deviation: + up blocks
    assert set(layers) < set(wide) and all(n.startswith("up_blocks.") for n in set(wide) - set(layers))
    with pytest.raises(ValueError, match="search space"):
        value_layers(small_organism.unet, "up_only")


def test_nemo_strength_zero_is_identity(small_organism, small_world):
    prompts = _prompts(small_world, 1, 2)
    ref = _plain(small_organism, prompts)
    out = NeMo(strength=0.0).generate(small_organism, prompts, SEEDS, SPEC)
    assert torch.equal(out.images, ref.images)


def test_nemo_neurons_in_search_space_and_deterministic(small_organism, small_world, fitted_nemo):
    layers = value_layers(small_organism.unet)
    locs = [fitted_nemo.localisations[p] for p in _prompts(small_world, 1, 2)]
    assert all(loc.memorized and loc.n_kept_seeds == 4 for loc in locs)
    for loc in locs:
        assert loc.neurons, "the forced search (tau_mem=0) must end with some neurons"
        assert len(loc.neurons) <= loc.n_initial
        for layer, i in loc.neurons:
            assert layer in layers and 0 <= i < layers[layer].out_features
        assert sum(map(len, neurons_by_layer(loc.neurons).values())) == len(loc.neurons)
    again = NeMo(tau_mem=0.0, n_seeds=4)
    again.fit(small_organism, memorized=_prompts(small_world, 1, 2),
              reference=_prompts(small_world, 0, 12), seed=0)
    assert [again.localisations[loc.prompt].neurons for loc in locs] == [loc.neurons for loc in locs]
    union = fitted_nemo.union_neurons(small_organism, [loc.prompt for loc in locs])
    assert union == locs[0].neurons | locs[1].neurons


def test_nemo_calibrated_tau_and_params(small_organism, small_world):
    nemo = NeMo(n_seeds=4, n_tau_prompts=6)
    nemo.fit(small_organism, memorized=[], reference=_prompts(small_world, 0, 12), seed=0)
    assert 0.0 < nemo.tau_used <= 1.0
    p = nemo.params()
    assert p["tau_mem_used"] == nemo.tau_used and p["ssim_kernel_used"][0] == 3
    assert "localisations" not in p and "stats" not in p


def test_nemo_per_row_deactivation_matches_single_prompt_blocking(small_organism, small_world,
                                                                  fitted_nemo):
    a, b = _prompts(small_world, 1, 2)
    na = fitted_nemo.localisations[a].neurons
    out = deactivated_sample(small_organism, [a, b], SEEDS, SPEC, [na, frozenset()], 0.0)
    with blocked(small_organism, na):
        ref_a = _plain(small_organism, [a])
    ref_b = _plain(small_organism, [b])
    torch.testing.assert_close(out.images[:2], ref_a.images, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.images[2:], ref_b.images, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ref_a.images, _plain(small_organism, [a]).images)


def test_nemo_reversible_also_on_error(small_organism, small_world, fitted_nemo, monkeypatch):
    prompts = _prompts(small_world, 1, 2)
    before, hooks = state_digest(small_organism.unet), _n_hooks(small_organism.unet)
    fitted_nemo.generate(small_organism, prompts, SEEDS, SPEC)
    assert state_digest(small_organism.unet) == before and _n_hooks(small_organism.unet) == hooks

    def boom(x0):
        raise RuntimeError("decode failed")
    monkeypatch.setattr(small_organism, "decode", boom)
    with pytest.raises(RuntimeError, match="decode failed"):
        fitted_nemo.generate(small_organism, prompts, SEEDS, SPEC)
    assert state_digest(small_organism.unet) == before and _n_hooks(small_organism.unet) == hooks


def test_nemo_bad_input(small_organism, small_world):
    with pytest.raises(RuntimeError, match="fit"):
        NeMo().generate(small_organism, _prompts(small_world, 1, 1), SEEDS, SPEC)
    with pytest.raises(ValueError, match="strength"):
        NeMo(strength=1.5).fit(small_organism, memorized=[], reference=["a", "b"])
    with pytest.raises(ValueError, match="search space"):
        deactivated_sample(small_organism, ["a"], SEEDS, SPEC, [frozenset({("up_blocks.x", 0)})], 0.0)


# ---------------------------------------------------------------------------------- pruning
def test_wanda_step_mask_has_requested_sparsity():
    g = torch.Generator().manual_seed(0)
    w, tn, bn = torch.randn(8, 40, generator=g), torch.rand(40, generator=g), torch.rand(40, generator=g)
    k = top_k_per_row(0.1, 40)
    assert k == 4
    exact = wanda_step_mask(w, tn, torch.zeros(40), 0.1)              # base never wins: exactly k per row
    assert (exact.sum(1) == k).all()
    m = wanda_step_mask(w, tn, bn, 0.1)
    assert (m.sum(1) <= k).all() and not (m & ~exact).any()           # only top-k that beat the base
    scores = w.abs() * tn
    assert (scores[exact].min() >= scores.topk(k, 1).values[:, -1].min())
    assert not wanda_step_mask(w, tn, bn, 0.0).any()
    u = union_mask(torch.stack([exact, m]))
    assert torch.equal(u, exact | m) and torch.equal(union_mask(torch.stack([exact, m]), 0.5), exact & m)
    with pytest.raises(ValueError, match="ratio"):
        top_k_per_row(1.5, 10)


def test_wanda_fit_masks(small_organism, fitted_wanda):
    layers = ffn_out_layers(small_organism.unet)
    assert set(fitted_wanda.masks) == set(layers)
    k = top_k_per_row(fitted_wanda.strength, next(iter(layers.values())).in_features)
    for n, m in fitted_wanda.masks.items():
        assert m.shape == layers[n].weight.shape and m.dtype == torch.bool
        assert (m.sum(1) <= k * fitted_wanda.n_timesteps).all()
    assert 0 < fitted_wanda.params()["sparsity_achieved"] <= fitted_wanda.strength * fitted_wanda.n_timesteps


def test_wanda_strength_zero_is_identity_and_pruning_changes_images(small_organism, small_world,
                                                                     fitted_wanda):
    prompts = _prompts(small_world, 1, 2)
    ref = _plain(small_organism, prompts)
    assert torch.equal(WandaPrune(strength=0.0).generate(small_organism, prompts, SEEDS, SPEC).images,
                       ref.images)
    assert not torch.allclose(fitted_wanda.generate(small_organism, prompts, SEEDS, SPEC).images, ref.images)


def test_wanda_reversible_also_on_error(small_organism, small_world, fitted_wanda, monkeypatch):
    prompts = _prompts(small_world, 1, 2)
    before, hooks = state_digest(small_organism.unet), _n_hooks(small_organism.unet)
    fitted_wanda.generate(small_organism, prompts, SEEDS, SPEC)
    assert state_digest(small_organism.unet) == before and _n_hooks(small_organism.unet) == hooks

    def boom(x0):
        raise RuntimeError("decode failed")
    monkeypatch.setattr(small_organism, "decode", boom)
    with pytest.raises(RuntimeError, match="decode failed"):
        fitted_wanda.generate(small_organism, prompts, SEEDS, SPEC)
    assert state_digest(small_organism.unet) == before and _n_hooks(small_organism.unet) == hooks


def test_wanda_bad_input(small_organism):
    with pytest.raises(RuntimeError, match="fit"):
        WandaPrune().generate(small_organism, ["a"], SEEDS, SPEC)
    with pytest.raises(ValueError, match="memorized"):
        WandaPrune().fit(small_organism, memorized=[], reference=[])


# ---------------------------------------------------------------------------------- NeMo-C
def test_nemo_c_deactivates_the_cluster_union_for_every_member(small_organism, small_world):
    from baselines.mitigators.nemo_c import NeMoC

    mem = _prompts(small_world, 1, 4)
    nc = NeMoC(tau_mem=0.0, n_seeds=4, n_clusters=2, k_selection="fixed")
    nc.fit(small_organism, memorized=mem, reference=_prompts(small_world, 0, 12), seed=0)
    assert sum(nc.cluster_sizes()) == 4 and len(nc.unions) == 2
    for j, u in enumerate(nc.unions):            # union of the members' own NeMo neurons
        members = [p for p, c in nc.cluster_of.items() if c == j]
        assert u == frozenset().union(*(nc.localisations[p].neurons for p in members))
    got = nc.neurons_for(small_organism, mem)
    assert got == [nc.unions[nc.cluster_of[p]] for p in mem]
    assert all(g >= nc.localisations[p].neurons for g, p in zip(got, mem))    # a member loses nothing
    p = nc.params()
    assert p["n_clusters_used"] == 2 and p["union_sizes"] == [len(u) for u in nc.unions]
    capped = NeMoC(tau_mem=0.0, n_seeds=4, n_clusters=12, k_selection="fixed")   # k capped at n prompts
    capped.fit(small_organism, memorized=mem[:2], reference=_prompts(small_world, 0, 12), seed=0)
    assert len(capped.unions) == 2
    sil = NeMoC(tau_mem=0.0, n_seeds=4, n_clusters=12)         # default: k by silhouette over 2..n-1
    sil.fit(small_organism, memorized=mem, reference=_prompts(small_world, 0, 12), seed=0)
    assert set(sil.silhouettes) == {2, 3} and len(sil.unions) == max(sil.silhouettes, key=sil.silhouettes.get)
    assert sil.params()["silhouette_by_k"] == {str(k): v for k, v in sil.silhouettes.items()}


def test_nemo_c_outside_prompts_and_reversibility(small_organism, small_world):
    from baselines.mitigators.nemo_c import NeMoC

    mem, other = _prompts(small_world, 1, 3), _prompts(small_world, 0, 2)
    nc = NeMoC(tau_mem=1.0, n_seeds=4, n_clusters=2)          # tau 1: nothing passes NeMo's step 1
    nc.fit(small_organism, memorized=mem, reference=_prompts(small_world, 0, 12), seed=0)
    assert nc.neurons_for(small_organism, other) == [frozenset(), frozenset()]
    forced = NeMoC(tau_mem=0.0, n_seeds=4, n_clusters=2)      # tau 0: outside prompts join the nearest cluster
    forced.fit(small_organism, memorized=mem, reference=_prompts(small_world, 0, 12), seed=0)
    assert all(n in forced.unions for n in forced.neurons_for(small_organism, other))
    before, hooks = state_digest(small_organism.unet), _n_hooks(small_organism.unet)
    out = forced.generate(small_organism, mem + other[:1], SEEDS, SPEC)
    assert torch.isfinite(out.images).all()
    assert state_digest(small_organism.unet) == before and _n_hooks(small_organism.unet) == hooks
