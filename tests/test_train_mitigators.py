"""Training-time mitigators on the small test organism: the fine-tuning world, Wen's magnitude
filter (skips exactly the samples with m >= tau), cost ratio, fine-tune cache reuse, the passed
model untouched, caption / cluster augmentations, and run folders the mitigation leaderboard reads."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from bench.contracts import GenSpec
from baselines.mitigators.train_augment import TrainRandomTokens
from baselines.mitigators.train_cluster_augment import (TrainClusterAugment, augment_image, cluster_images,
                                                        dense_clusters)
from baselines.mitigators.train_filter import (MagnitudeFilterHook, TrainMagnitudeFilter, noise_magnitudes,
                                               text_cond_magnitude)
from baselines.mitigators.train_time import PlainFinetune
from bench.core.patching import state_digest
from bench.core.sampling import sample
from bench.core.train import TrainConfig, train
from tasks.finetune_world import (FinetuneConfig, WorldFinetuner, finetune_config_from_dict, finetune_world,
                                 train_data)

FT = WorldFinetuner()   # the organism world's fine-tuning protocol (bench.contracts.Finetuner)
TINY = {"n_mv": 2, "dup_mv": 6, "n_fg": 1, "fg_images": 3, "dup_fg": 2, "eval_fg": 2, "n_bg": 1, "bg_images": 3,
        "dup_bg": 2, "eval_bg": 2, "n_utility": 2,
        "train": {"steps": 3, "batch_size": 8, "warmup": 1, "checkpoint_every": 2, "threads": 0}}
SPEC = GenSpec(steps=3, guidance=7.5, batch_size=16)


@pytest.fixture(scope="module")
def ftw(small_world):
    return finetune_world(small_world, finetune_config_from_dict(TINY))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("finetune_cache"))


def test_finetune_world_plants_a_new_set(small_world, ftw):
    n0 = small_world.n_images
    assert np.array_equal(ftw.images[:n0], small_world.images)              # base images kept, in order
    new = ftw.images[n0:]
    assert len(new) == 2 + 3 + 3 and ftw.image_kind[n0:] == ["MV"] * 2 + ["FG"] * 3 + ["BG"] * 3
    assert set(ftw.pair_group) == {"ordinary", "FT_MV", "FT_FG", "FT_BG"}             # base planted pairs not retrained
    assert sum(g == "ordinary" for g in ftw.pair_group) == sum(g == "ordinary" for g in small_world.pair_group)
    base_words = {w for c in small_world.captions for w in c.split()} | \
                 {w for e in small_world.eval_prompts for w in e.prompt.split()}
    for c, g in zip(ftw.captions, ftw.pair_group):
        if g != "ordinary":
            rare = c.split()[-3:-1] if g == "FT_BG" else c.split()[:2]        # "... in the <w> <w> room"
            assert not set(rare) & base_words, c                                 # rare words never seen
    mem = [e for e in ftw.eval_prompts if e.label == 1]
    assert [e.group for e in mem] == ["MV", "MV", "FG", "FG", "BG", "BG"]
    assert all(min(e.targets) >= n0 for e in mem)
    assert [e.label for e in ftw.eval_prompts[len(mem):]] == [0, 0]
    again = finetune_world(small_world, finetune_config_from_dict(TINY))
    assert again.sha256 == ftw.sha256                                        # deterministic
    other = finetune_world(small_world, dataclasses.replace(finetune_config_from_dict(TINY), seed=7))
    assert not np.array_equal(other.images[n0:], new)
    with pytest.raises(ValueError, match="unknown finetune config keys"):
        finetune_config_from_dict({"n_mvs": 3})
    with pytest.raises(ValueError, match="plants nothing"):
        FinetuneConfig(n_mv=0, n_fg=0, n_bg=0)


class Checking:
    """Wraps the filter hook and recomputes m by hand with two separate UNet calls."""

    def __init__(self, inner):
        self.inner, self.masks = inner, []

    def keep(self, model, x_t, t, emb, eps_pred):
        with torch.no_grad():
            e_u = model.encode([""]).expand(x_t.shape[0], -1, -1)
            ref = (model.eps(x_t, t, emb) - model.eps(x_t, t, e_u)).flatten(1).norm(dim=1)
        k = self.inner.keep(model, x_t, t, emb, eps_pred)
        m, kk = self.inner.history[-1]
        assert torch.allclose(m, ref, rtol=1e-4, atol=1e-5)
        assert torch.equal(k, ref < self.inner.tau) or torch.equal(k, m < self.inner.tau)
        assert torch.equal(k, m < self.inner.tau)
        self.masks.append(k)
        return k


def test_filter_skips_exactly_the_samples_above_tau(small_organism, ftw, tmp_path):
    import copy
    from tasks.finetune_world import model_with_unet

    pairs = {"all": list(range(len(ftw.captions)))}
    m = noise_magnitudes(small_organism, ftw, pairs, 64, seed=0)["all"]
    tau = float(np.median(m))                                                # some kept, some dropped
    ft = model_with_unet(small_organism, copy.deepcopy(small_organism.unet))
    hook = Checking(MagnitudeFilterHook(ft, tau, record=True))
    tc = TrainConfig(steps=4, batch_size=16, warmup=1, checkpoint_every=10, caption_dropout=0.0)
    s = train(ft, train_data(ftw), tc, tmp_path, hooks=(hook,), progress=False)
    kept = [int(k.sum()) for k in hook.masks]
    assert 0 < sum(kept) < 4 * 16
    hist = pd.read_csv(tmp_path / "loss_history.csv")
    assert hist["kept"].tolist() == kept                                     # the loss used exactly those
    assert s["kept_fraction"] == pytest.approx(sum(kept) / 64)
    with pytest.raises(ValueError, match="tau must be > 0"):
        MagnitudeFilterHook(ft, 0.0)


def test_magnitude_matches_two_forwards(small_organism, ftw):
    x = torch.randn(3, *small_organism.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500, 900])
    with torch.inference_mode():
        emb = small_organism.encode(ftw.captions[-3:])
        e0 = small_organism.encode([""])
        eps_c = small_organism.eps(x, t, emb)
        m = text_cond_magnitude(small_organism, x, t, eps_c, e0)
        ref = torch.linalg.vector_norm((eps_c - small_organism.eps(x, t, e0.expand(3, -1, -1))).flatten(1), dim=1)
    assert torch.allclose(m, ref, rtol=1e-5)


def test_filter_fit_cost_ratio_cache_and_model_untouched(small_organism, cache):
    d0 = state_digest(small_organism.unet)
    f = TrainMagnitudeFilter(strength=1 / 0.5, finetune=TINY, finetuner=FT, cache_dir=cache)
    f.fit(small_organism, seed=0)
    r = f.fit_report
    assert r["finetune_cached"] is False and np.isfinite(r["train_cost_ratio"]) and r["train_cost_ratio"] > 0
    assert r["train_cost_ratio"] == pytest.approx(r["finetune_cpu_seconds"] / r["plain_cpu_seconds"])
    assert 0 <= r["kept_fraction"] <= 1
    share = r["hook_report"][0]["kept_share"]
    assert set(share) <= {"FT_MV", "FT_FG", "FT_BG", "other"} and "other" in share
    assert state_digest(small_organism.unet) == d0                          # the passed model is untouched
    out = f.generate(small_organism, ["a red circle"], [0], SPEC)
    assert state_digest(small_organism.unet) == d0
    base = sample(small_organism, ["a red circle"], [0], steps=SPEC.steps, guidance=SPEC.guidance).images
    assert not torch.equal(out.images, base)                                # generated by the fine-tune
    g = TrainMagnitudeFilter(strength=1 / 0.5, finetune=TINY, finetuner=FT, cache_dir=cache)
    g.fit(small_organism, seed=0)                                            # second fit: from the cache
    assert g.fit_report["finetune_cached"] is True and g.fit_report["finetune_key"] == r["finetune_key"]
    assert g.fit_report["train_cost_ratio"] == r["train_cost_ratio"]
    assert torch.equal(g.generate(small_organism, ["a red circle"], [0], SPEC).images, out.images)
    man = json.loads((f._ft.path / "manifest.json").read_text())
    assert man["method"]["tau"] == 0.5 and man["finetune"]["train"]["steps"] == 3
    assert (f._ft.path / "unet.safetensors").is_file()


def test_strength_zero_is_plain_finetuning(small_organism, cache):
    p = PlainFinetune(finetune=TINY, finetuner=FT, cache_dir=cache)
    p.fit(small_organism)
    z = TrainMagnitudeFilter(strength=0, finetune=TINY, finetuner=FT, cache_dir=cache)
    z.fit(small_organism)
    assert z.fit_report["finetune_key"] == p.fit_report["finetune_key"] and z.fit_report["train_cost_ratio"] == 1
    a = p.generate(small_organism, ["a red circle"], [0, 1], SPEC).images
    assert torch.equal(a, z.generate(small_organism, ["a red circle"], [0, 1], SPEC).images)
    with pytest.raises(RuntimeError, match="call fit"):
        PlainFinetune(finetune=TINY, finetuner=FT).generate(small_organism, ["x"], [0], SPEC)
    with pytest.raises(ValueError, match="no strength"):
        PlainFinetune(strength=1)


def test_random_token_transform_splits_weights(small_organism, ftw):
    rt = TrainRandomTokens(strength=0.25, n_tokens=2, draw="pool", n_variants=3)
    data = train_data(ftw)
    out, info = rt.transform(small_organism, ftw, seed=0)(data)
    P = len(data.captions)
    assert len(out.captions) == P * 4 and info["pairs_after"] == P * 4
    assert torch.allclose(out.pair_weight[:P], data.pair_weight.double() * 0.75)
    assert float(out.pair_weight.sum()) == pytest.approx(float(data.pair_weight.sum()))
    for i in range(P):                                                      # variants: original words in order + 2
        for v in out.captions[P + 3 * i:P + 3 * i + 3]:
            words, orig = v.split(" "), data.captions[i].split(" ")
            assert len(words) == len(orig) + 2
            it = iter(words)
            assert all(w in it for w in orig)
        assert int(out.pair_image[P + 3 * i]) == int(data.pair_image[i])
    again, _ = rt.transform(small_organism, ftw, seed=0)(data)
    assert again.captions == out.captions
    with pytest.raises(ValueError, match="probability"):
        TrainRandomTokens(strength=2)


def test_cluster_augment_targets_duplicated_images(ftw):
    data = train_data(ftw)
    used = np.unique(data.pair_image.numpy())
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(used), 64)).astype(np.float32)               # spread-out ordinary images
    planted = np.isin(used, [i for i, g in zip(ftw.pair_image, ftw.pair_group) if g == "FT_MV"])
    emb[planted] = rng.normal(size=64)                                      # the duplicated images: one spot
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    w = np.zeros(len(data.x0))
    np.add.at(w, data.pair_image.numpy(), data.pair_weight.numpy())
    assign, cent = cluster_images(emb, w[used], 6, seed=0)
    dense, stats = dense_clusters(emb, w[used], assign, cent, mass_factor=0.5, min_tightness=0.7)
    assert set(assign[planted]) <= set(dense) and dense                     # duplicated images -> dense
    assert all(s["tightness"] < 0.7 for s in stats if s["cluster"] not in dense)
    ca = TrainClusterAugment(strength=0.5, n_clusters=6, pool=2, mass_factor=0.5, min_tightness=0.7)
    out, info = ca.augment(data, seed=0, world=ftw, emb=emb)
    members = used[np.isin(assign, dense)]
    assert info["n_dense_members"] == len(members) and len(out.x0) == len(data.x0) + 2 * len(members)
    assert float(out.pair_weight.sum()) == pytest.approx(float(data.pair_weight.sum()))
    assert info["dense_member_kinds"].get("MV", 0) == int(planted.sum())
    new = out.x0[len(data.x0):]
    assert new.shape[1:] == data.x0.shape[1:] and new.min() >= -1 and new.max() <= 1
    assert not any(torch.equal(new[0], data.x0[i]) for i in members)        # augmented, not copied
    x = data.x0[int(members[0])]
    a1 = augment_image(x, np.random.default_rng(1), max_shift=2, jitter=0.2)
    assert torch.equal(a1, augment_image(x, np.random.default_rng(1), max_shift=2, jitter=0.2))
    assert torch.equal(augment_image(x, np.random.default_rng(3), max_shift=0, jitter=0.0).flip(-1), x) or \
        torch.equal(augment_image(x, np.random.default_rng(3), max_shift=0, jitter=0.0), x)


class FakeJudge:
    def protocol(self):
        return {"judge": "fake (test)"}

    def measure(self, images, prompts, seeds):
        S = len(seeds)                                   # NaN for prompts without targets, as CopyJudge
        return [{"sscd_to_train": float(images[i].mean()) if prompts[i // S].targets else float("nan"),
                 "sscd_nn": 0.5, "nn_index": 0, "copy": float(i % 2) if prompts[i // S].targets else float("nan"),
                 "clip_score": 20.0} for i in range(len(images))]


def test_runner_writes_mitigate_runs_for_the_leaderboard(small_organism, cache, tmp_path):
    from bench.report.mitigate_board import mitigate_leaderboard
    from tasks.studies.finetune_mitigate import mitigator_conf, run_finetune_mitigate

    cfg = {"model": {"kind": "organism", "size": "small"}, "finetune": TINY, "seed": 0, "n_seeds": 1, "steps": 2,
           "guidance": 7.5, "batch_prompts": 4, "runs_dir": str(tmp_path / "runs"), "cache_dir": cache, "threads": 0}
    none = run_finetune_mitigate(cfg, mitigator_conf("train_none"), model=small_organism, judge=FakeJudge(),
                                 progress=False)
    filt = run_finetune_mitigate(cfg, {**mitigator_conf("train_filter"), "strengths": [2.0]}, model=small_organism,
                                 judge=FakeJudge(), progress=False)
    assert none[0]["mitigator"] == "none" and none[0]["train_cost_ratio"] == 1
    assert np.isfinite(none[0]["sscd_to_train_mean"]) and np.isfinite(filt[0]["copy_rate"])   # NaN cells skipped
    assert none[0]["n_images_memorized"] == 6 and none[0]["n_images_utility"] == 2
    assert filt[0]["protocol_hash"] == none[0]["protocol_hash"] and filt[0]["task"] == "organism_finetune"
    df = mitigate_leaderboard(tmp_path / "runs")
    assert set(df["mitigator"]) == {"none", "wen_train_filter"}
    assert {"train_cost_ratio", "fit_seconds", "clip_delta"} <= set(df.columns)
    row = df[df.mitigator == "wen_train_filter"].iloc[0]
    assert row["strength"] == 2.0 and np.isfinite(row["train_cost_ratio"]) and row["clip_delta"] == 0


def test_interrupted_build_is_restarted_not_resumed(small_organism, ftw, tmp_path):
    from baselines.mitigators.train_time import PLAIN
    from tasks.finetune_world import base_identity, finetune, finetune_key

    cfg = finetune_config_from_dict(TINY)
    key, _ = finetune_key(base_identity(small_organism), cfg, ftw.sha256, PLAIN)
    stale = tmp_path / f"{key}.work"
    stale.mkdir()
    (stale / "history.json").write_text("[]")                              # a half-done build's leftovers
    ft = finetune(small_organism, ftw, cfg, method=PLAIN, root=tmp_path)
    assert not ft.cached and not stale.exists() and (tmp_path / key / "manifest.json").is_file()
    assert ft.manifest["train_summary"]["steps"] == 3 and ft.manifest["cpu_seconds"] > 0


def test_inference_mitigators_run_on_the_plain_finetune(small_organism, cache, tmp_path):
    """The FB-Mem study applies every part-1 / model-side mitigator to the protocol's plain fine-tune."""
    from baselines.mitigators.prompt_augment import RandomTokenAddition
    from baselines.mitigators.train_time import OnPlainFinetune
    from tasks.studies.finetune_mitigate import make_mitigator, mitigator_conf, run_finetune_mitigate

    mit = make_mitigator(mitigator_conf("rta"), 4, TINY, cache)
    assert isinstance(mit, OnPlainFinetune) and mit.name == "rta" and mit.strength == 4
    assert mit.strength_unit == RandomTokenAddition.strength_unit
    before = state_digest(small_organism.unet)
    mit.fit(small_organism, memorized=[], reference=[], seed=0)
    plain = PlainFinetune(finetune=TINY, finetuner=FT, cache_dir=cache)
    plain.fit(small_organism, seed=0)
    assert plain._ft.cached and mit.fit_report["train_cost_ratio"] == 1           # the same plain fine-tune
    got = mit.generate(small_organism, ["a red circle"], [0], SPEC)
    ref = RandomTokenAddition(strength=4).generate(plain.finetuned, ["a red circle"], [0], SPEC)
    assert torch.equal(got.images, ref.images) and state_digest(small_organism.unet) == before
    cfg = {"model": {"kind": "organism", "size": "small"}, "finetune": TINY, "seed": 0, "n_seeds": 1, "steps": 2,
           "guidance": 7.5, "batch_prompts": 4, "runs_dir": str(tmp_path / "runs"), "cache_dir": cache, "threads": 0}
    none = run_finetune_mitigate(cfg, mitigator_conf("train_none"), model=small_organism, judge=FakeJudge())
    nc = run_finetune_mitigate(cfg, {**mitigator_conf("nemo_c"), "tau_mem": 0.0, "n_seeds": 2},
                               model=small_organism, judge=FakeJudge())
    # an overridden configuration is named by its difference (issue 16), never by the registered id
    assert nc[0]["mitigator"] == "nemo_c[n_seeds=2,tau_mem=0]" and nc[0]["protocol_hash"] == none[0]["protocol_hash"]
    assert nc[0]["train_cost_ratio"] == 1 and json.loads(nc[0]["params"])["applied_to"].startswith("plain")
