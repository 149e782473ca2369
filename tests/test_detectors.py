"""Contract tests over every detector configuration in conf/detector/ (run as configured)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf" / "detector"
CONFIGS = sorted(p.stem for p in CONF.glob("*.yaml"))
PROMPTS = ["a red circle", "worcester mooney poster"]


def model_state(model) -> tuple:
    h = hashlib.sha256()
    for name, t in sorted(model.unet.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for name, t in sorted(model.text_encoder.state_dict().items()):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    hooks = [(n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
             for n, m in model.unet.named_modules()]
    procs = {k: type(v).__name__ for k, v in model.unet.attn_processors.items()}
    return h.hexdigest(), hooks, procs, model.unet.training, any(p.requires_grad for p in model.unet.parameters())


def build(name: str, **over):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    cfg.pop("id")
    cfg.update(over)
    return instantiate(cfg)


def test_every_config_has_an_id_matching_its_file():
    assert CONFIGS, "no detector configs found"
    for name in CONFIGS:
        assert OmegaConf.load(CONF / f"{name}.yaml").id == name


@pytest.mark.parametrize("name", CONFIGS)
def test_detector_contract(name, small_organism):
    det = build(name)
    before = model_state(small_organism)
    s1 = det.score(small_organism, PROMPTS, seed=0)
    # reversed order and a different batch size: same scores per prompt, bit-for-bit up to float noise
    # (a detector without batches, e.g. the one-prompt-per-call naive reference, keeps its own)
    s2 = build(name, **({"batch_size": 3} if hasattr(det, "batch_size") else {})).score(small_organism, PROMPTS[::-1], seed=0)[::-1]
    assert s1.shape == (len(PROMPTS),) and s1.dtype.kind == "f"
    assert np.isfinite(s1).all()
    # Generations agree to ~1e-5 across batch compositions (float32 rounding); SSCD reads them as
    # uint8, so a pixel within 1e-5 of a rounding boundary flips one grey level: measured effect on
    # the mean pairwise cosine up to 5e-4. Pixel-space and noise-magnitude scores stay within 1e-5.
    tol = 2e-3 if getattr(det, "space", "") == "sscd" else 1e-5
    np.testing.assert_allclose(s1, s2, rtol=tol, atol=1e-6)
    assert model_state(small_organism) == before, "detector changed the model (weights, hooks or mode)"
    assert det.params()["n_gen"] == det.n_gen


@pytest.mark.parametrize("name", ["nm_n1_k1", "density_pixel_n4"])
def test_detector_depends_on_seed(name, small_organism):
    det = build(name)
    a = det.score(small_organism, PROMPTS, seed=0)
    b = det.score(small_organism, PROMPTS, seed=0)
    c = det.score(small_organism, PROMPTS, seed=123)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_noise_magnitude_early_exit_runs_only_k_steps(small_organism):
    from baselines.detectors.noise_magnitude import NoiseMagnitude

    c = small_organism.counter
    r0 = c.rows
    NoiseMagnitude(n_gen=4, steps=10).score(small_organism, PROMPTS, seed=0)
    assert c.rows - r0 == len(PROMPTS) * 4 * 2 * 10


def test_noise_magnitude_k_steps_average_of_per_step_norms(small_organism):
    from baselines.detectors.noise_magnitude import NoiseMagnitude

    det = NoiseMagnitude(n_gen=2, steps=3)
    norms = det.per_step_norms(small_organism, PROMPTS, seed=0)
    assert norms.shape == (2, 2, 3)
    np.testing.assert_allclose(det.score(small_organism, PROMPTS, seed=0), norms.mean(1).mean(1))
    # step 1 of a 3-step run equals the 1-step detector
    np.testing.assert_allclose(norms[:, :, 0].mean(1), NoiseMagnitude(n_gen=2, steps=1).score(
        small_organism, PROMPTS, seed=0), rtol=1e-6)


def test_density_reductions_and_orientation():
    from baselines.detectors.generation_density import GenerationDensity

    rng = np.random.default_rng(0)
    same = np.repeat(rng.uniform(0, 1, (1, 1, 3, 16, 16)), 4, axis=1)      # 4 identical generations
    diff = rng.uniform(0, 1, (1, 4, 3, 16, 16))                            # 4 unrelated generations
    for red in ("mean", "closest", "count"):
        d = GenerationDensity(n_gen=4, reduction=red)
        hi = d.reduce(d.similarity(same)[0])
        lo = d.reduce(d.similarity(diff)[0])
        assert hi > lo, red
    with pytest.raises(ValueError, match="reduction"):
        GenerationDensity(reduction="median")
    with pytest.raises(ValueError, match="n_gen"):
        GenerationDensity(n_gen=1)
