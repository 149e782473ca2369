"""Organism versions: v1 keeps its committed identity, the v2 world's extra singletons leave the rest of
the world alone, and the from-scratch CLIP text-encoder variant trains, resumes bit for bit and loads."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from bench.core.model import load_model
from bench.core.train import train
from tasks.memworld import TITLE_NOUNS, VARIANT_WORDS, build_memworld
from tasks.memworld_draw import COLOURS, SHAPES
from tasks.organism import ORGANISMS, OrganismConfig, build, fresh_model, organism_config, small_config, train_data


def test_v1_identity_survives_the_added_fields():
    # fields added for v2 are hashed only away from their v1 value: the committed v1 stays findable
    assert ORGANISMS["v1"] == OrganismConfig()
    assert OrganismConfig().hash == "65f013008482"
    assert len({c.hash for c in ORGANISMS.values()}) == len(ORGANISMS)
    with pytest.raises(ValueError, match="unknown organism version"):
        organism_config("v9")


def test_singletons_add_pairs_without_touching_the_rest_of_the_world():
    base = small_config().world
    a = build_memworld(base)
    b = build_memworld(dataclasses.replace(base, singletons_per_family=3))
    assert [(e.id, e.prompt, e.targets) for e in a.eval_prompts] == [(e.id, e.prompt, e.targets) for e in b.eval_prompts]
    assert b.captions[:len(a.captions)] == a.captions
    assert (b.images[:a.n_images] == a.images).all()
    extra = [(c, g) for c, g in zip(b.captions, b.pair_group) if g.endswith("_single")]
    assert len(extra) == 3 * 5 and all(w == 1 for w, g in zip(b.pair_weight, b.pair_group) if g.endswith("_single"))
    # fresh words: no singleton shares a word with any evaluated or planted caption's title words
    eval_words = {w for e in b.eval_prompts if e.family for w in e.prompt.split()}
    common = {"a", "on", "in", "the", "plain", "background", "gradient", "stripes", "checkerboard", "blobs",
              *TITLE_NOUNS.values(), *VARIANT_WORDS, *COLOURS, *SHAPES}
    for cap, _ in extra:
        assert not (set(cap.split()) - common) & eval_words, cap


def test_titles_without_family_nouns():
    w = build_memworld(dataclasses.replace(small_config().world, title_nouns=False))
    for e in w.eval_prompts:
        if e.group == "MV":
            assert len(e.prompt.split()) == 2 and TITLE_NOUNS["MV"] not in e.prompt


@pytest.fixture(scope="module")
def clip_cfg():
    cfg = dataclasses.replace(small_config(), text_encoder="clip_scratch")
    return cfg, dataclasses.replace(cfg.train, steps=6, batch_size=8, checkpoint_every=3)


def test_clip_scratch_trains_jointly_and_resumes_bit_identically(clip_cfg, small_world, tmp_path):
    cfg, tc = clip_cfg
    data = train_data(small_world)
    a = fresh_model(cfg)
    te0 = {k: v.clone() for k, v in a.text_encoder.state_dict().items()}
    train(a, data, tc, tmp_path / "A", progress=False, train_text_encoder=True)
    assert any(not torch.equal(v, te0[k]) for k, v in a.text_encoder.state_dict().items()), "encoder not trained"
    assert not any(p.requires_grad for p in a.text_encoder.parameters())
    train(fresh_model(cfg), data, dataclasses.replace(tc, steps=3), tmp_path / "B", progress=False,
          train_text_encoder=True)
    b = fresh_model(cfg)
    train(b, data, tc, tmp_path / "B", progress=False, train_text_encoder=True)
    for mod in ("unet", "text_encoder"):
        sa, sb = getattr(a, mod).state_dict(), getattr(b, mod).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), mod


def test_clip_scratch_organism_saves_and_loads_through_the_adapter(clip_cfg, tmp_path):
    cfg, tc = clip_cfg
    out = build(dataclasses.replace(cfg, train=tc), tmp_path / "org", progress=False, with_clip=False)
    meta = json.loads((out / "diffmem.json").read_text())
    assert "text_encoder_package" not in meta and meta["config"]["text_encoder"] == "clip_scratch"
    m = load_model(out)
    assert type(m.text_encoder).__name__ == "CLIPTextModel" and type(m.tokenizer).__name__.startswith("CLIPTokenizer")
    fresh = fresh_model(cfg)
    ids = m.tokenize(["sunset harbour"])["input_ids"]
    assert torch.equal(ids, fresh.tokenize(["sunset harbour"])["input_ids"])
    assert m.encode(["sunset harbour"]).shape[-1] == m.unet.config.cross_attention_dim
