"""Issue 18: the SAIL sharpness and anisotropy detectors. Their YAMLs (sail_n*, aniso_n*) also go through
the contract tests of tests/test_detectors.py (finite, deterministic, order- and batch-independent, model
untouched)."""
from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from baselines.detectors.anisotropy import Anisotropy
from baselines.detectors.sail_sharpness import SailSharpness, encode_cfg, sigma
from bench.core.model import DiffusionModel, assemble
from bench.core.patching import state_digest

PROMPTS = ["a red circle", "worcester mooney poster"]


def twin(model: DiffusionModel, dtype=torch.float64) -> DiffusionModel:
    """The same weights in ``dtype`` (a separate copy; the fixture is not touched)."""
    return assemble(copy.deepcopy(model.unet), copy.deepcopy(model.text_encoder), model.tokenizer,
                    model.scheduler_config, None, device=torch.device("cpu"), dtype=dtype,
                    max_length=model.max_length, name=f"{model.name}-twin")


def fd_sharpness(m64: DiffusionModel, prompt: str, seed: int, h: float = 1e-5) -> float:
    """||H_c s_D - H_u s_D|| at the first step by a central difference in float64:
    g(z) = s_c(z) - s_u(z) = -(eps_c(z) - eps_u(z)) / sigma_t, v = s_D = g(x_T),
    (g(x + h v^) - g(x - h v^)) / 2h * ||v|| with v^ = v / ||v||."""
    t = m64.timesteps(50)[0]
    sig = sigma(m64, int(t))
    x = m64.init_latents([seed])
    cond, uncond = encode_cfg(m64, [prompt])
    emb = torch.cat([cond, uncond])

    def g(z):
        e = m64.eps(torch.cat([z, z]), t, emb)
        return -(e[:1] - e[1:]) / sig

    with torch.no_grad():
        v = g(x)
        nv = v.norm()
        u = v / nv
        d = (g(x + h * u) - g(x - h * u)) / (2 * h) * nv
    return float(d.flatten().norm())


# ---------------------------------------------------------------------- SAIL
def test_sail_equals_finite_difference_jvp(small_organism):
    m64 = twin(small_organism)
    fd = np.array([fd_sharpness(m64, p, seed=3) for p in PROMPTS])
    assert (fd > 0).all()
    # float64 JVP on the float64 twin: the same derivative up to the central difference's O(h^2) error
    s64 = SailSharpness(n_gen=1, jvp_dtype="float64").score(m64, PROMPTS, seed=3)
    np.testing.assert_allclose(s64, fd, rtol=1e-5)
    # the shipped configuration (float32 model, float32 JVP) against the float64 reference
    s32 = SailSharpness(n_gen=1).score(small_organism, PROMPTS, seed=3)
    np.testing.assert_allclose(s32, fd, rtol=2e-3)


def test_sail_counts_jvp_passes_and_averages_steps(small_organism):
    c = small_organism.counter
    det = SailSharpness(n_gen=2, hvp_steps=2)
    r0 = c.rows
    per = det.per_step(small_organism, PROMPTS, seed=0)
    # per generation and hvp step: loop CFG pass (2 rows) + JVP primal (2) + JVP tangent (2)
    assert c.rows - r0 == len(PROMPTS) * 2 * 2 * 6
    assert per.shape == (2, 2, 2) and np.isfinite(per).all() and (per > 0).all()
    np.testing.assert_allclose(det.score(small_organism, PROMPTS, seed=0), per.mean(1).mean(1))
    # the first of two hvp steps equals the one-step detector (same x_T, same direction)
    np.testing.assert_allclose(per[:, :, 0].mean(1), SailSharpness(n_gen=2).score(small_organism, PROMPTS, seed=0),
                               rtol=1e-6)
    assert det.steps == 2 and det.params()["hvp_steps"] == 2


def test_sail_jvp_in_another_dtype_copies_the_unet_and_counts_it(small_organism):
    before = state_digest(small_organism.unet)
    c = small_organism.counter
    r0 = c.rows
    s64 = SailSharpness(jvp_dtype="float64").score(small_organism, PROMPTS, seed=1)
    assert c.rows - r0 == len(PROMPTS) * 6                    # the copy's passes land on the model's counter
    assert state_digest(small_organism.unet) == before and small_organism.dtype == torch.float32
    np.testing.assert_allclose(s64, SailSharpness().score(small_organism, PROMPTS, seed=1), rtol=1e-3)


def test_sail_rejects_bad_options():
    with pytest.raises(ValueError, match="hvp_steps"):
        SailSharpness(hvp_steps=0)
    with pytest.raises(ValueError, match="jvp_dtype"):
        SailSharpness(jvp_dtype="float16")


# ---------------------------------------------------------------------- anisotropy
def recording(model: DiffusionModel, seen: list[int]) -> DiffusionModel:
    """A view of ``model`` (same modules and counter) whose eps records the timesteps it is called at."""
    m = dataclasses.replace(model)

    def eps(x, t, emb):
        seen.append(int(t))
        return DiffusionModel.eps(m, x, t, emb)

    m.eps = eps
    return m


def test_aniso_terms_are_read_at_the_documented_timesteps(small_organism):
    det = Anisotropy(n_gen=2)
    seen: list[int] = []
    m = recording(small_organism, seen)
    ts = small_organism.timesteps(50)
    t_norm, t_cos = det.timesteps(small_organism)
    assert (t_norm, t_cos) == (int(ts[0]), int(ts[-3]))
    r0 = small_organism.counter.rows
    terms = det.terms(m, PROMPTS, seed=4)
    assert seen == [t_norm, t_cos]                            # one CFG pass each, nothing else
    assert small_organism.counter.rows - r0 == len(PROMPTS) * 2 * 4
    # direct recomputation on x_T of every (prompt, generation)
    cond, uncond = encode_cfg(small_organism, PROMPTS)
    with torch.no_grad():
        for i in range(len(PROMPTS)):
            x = small_organism.init_latents([4, 5])
            emb = torch.cat([cond[[i, i]], uncond.expand(2, -1, -1)])
            e_T = small_organism.eps(torch.cat([x, x]), ts[0], emb)
            e_c = small_organism.eps(torch.cat([x, x]), ts[-3], emb)
            norm = (e_T[:2] - e_T[2:]).flatten(1).norm(dim=1)
            eu, delta = e_c[2:], e_c[:2] - e_c[2:]
            cos_ch = torch.nn.functional.cosine_similarity(eu, delta, dim=1).flatten(1).mean(1)
            np.testing.assert_allclose(terms[i, :, 0], norm.numpy(), rtol=1e-5)
            np.testing.assert_allclose(terms[i, :, 1], cos_ch.numpy(), rtol=1e-5, atol=1e-6)
            flat = Anisotropy(n_gen=2, cosine="flat").terms(small_organism, [PROMPTS[i]], seed=4)[0, :, 1]
            cos_flat = torch.nn.functional.cosine_similarity(eu.flatten(1), delta.flatten(1), dim=1)
            np.testing.assert_allclose(flat, cos_flat.numpy(), rtol=1e-5, atol=1e-6)


def test_aniso_fixed_weights_combine_the_terms(small_organism):
    det = Anisotropy(n_gen=2, gamma=[1.0, 0.1])
    t = det.terms(small_organism, PROMPTS, seed=0).mean(axis=1)
    np.testing.assert_allclose(det.score(small_organism, PROMPTS, seed=0), t[:, 0] + 0.1 * t[:, 1])
    assert det.params()["gamma"] == (1.0, 0.1) and det.params()["cos_step"] == -3


CALIB_MEM = ["mona lisa portrait", "starry night painting", "the scream"]
CALIB_REF = ["a cat on a sofa", "a bowl of fruit", "a city at night"]


def write_calibration(path) -> str:
    rows = [{"prompt": p, "label": 1, "id": f"m{i}"} for i, p in enumerate(CALIB_MEM)]
    rows += [{"prompt": p, "label": 0} for p in CALIB_REF]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_aniso_weights_come_from_the_calibration_split_only(small_organism, tmp_path):
    calib = write_calibration(tmp_path / "calib.jsonl")
    a = Anisotropy(gamma_mode="fit", calibration=calib, calibration_seed=7)
    assert a.params()["fit"].startswith("pending")
    sa = a.score(small_organism, PROMPTS, seed=0)
    b = Anisotropy(gamma_mode="fit", calibration=calib, calibration_seed=7)
    b.score(small_organism, ["a green square", "a yellow star", "something else"], seed=11)
    ga, gb = a.params()["gamma"], b.params()["gamma"]
    assert ga == gb and np.isfinite(ga).all()                  # other evaluated prompts, other seed: same weights
    # the programmatic route on the same split gives the same weights
    c = Anisotropy(gamma_mode="fit").fit(small_organism, memorized=CALIB_MEM, reference=CALIB_REF, seed=7)
    np.testing.assert_allclose(c.params()["gamma"], ga, rtol=1e-9)
    np.testing.assert_allclose(c.score(small_organism, PROMPTS, seed=0), sa, rtol=1e-9)
    fit = a.params()["fit"]
    assert fit["seed"] == 7 and fit["n_memorized"] == 3 and fit["n_reference"] == 3
    assert [r["id"] for r in fit["split"]] == ["m0", "m1", "m2", "calib:3", "calib:4", "calib:5"]
    assert len(fit["split_sha256"]) == 64 and len(a.params()["calibration_file_sha256"]) == 64
    assert fit["source"] == calib
    # a fit on a different split gives different weights (the split is what they depend on)
    d = Anisotropy(gamma_mode="fit").fit(small_organism, memorized=CALIB_MEM[:2], reference=CALIB_REF, seed=7)
    assert d.params()["gamma"] != ga


def test_aniso_refuses_calibration_prompts_and_missing_split(small_organism, tmp_path):
    a = Anisotropy(gamma_mode="fit", calibration=write_calibration(tmp_path / "calib.jsonl"))
    with pytest.raises(ValueError, match="calibration split"):
        a.score(small_organism, [PROMPTS[0], CALIB_REF[1]], seed=0)
    with pytest.raises(ValueError, match="needs a calibration split"):
        Anisotropy(gamma_mode="fit").score(small_organism, PROMPTS, seed=0)
    with pytest.raises(ValueError, match="cos_step"):
        Anisotropy(cos_step=50)
    with pytest.raises(ValueError, match="cosine"):
        Anisotropy(cosine="pixel")


# ---------------------------------------------------------------------- SD-shaped models
def test_sail_on_a_v_prediction_sd_model_matches_finite_difference(tmp_path):
    from bench.core.model import load_model
    from tests.conftest import make_tiny_sd

    m64 = twin(load_model(make_tiny_sd(tmp_path / "v", prediction_type="v_prediction")))
    assert m64.prediction_type == "v_prediction"               # the adapter's eps conversion is differentiated
    fd = fd_sharpness(m64, PROMPTS[1], seed=2)
    np.testing.assert_allclose(SailSharpness(jvp_dtype="float64").score(m64, [PROMPTS[1]], seed=2), [fd],
                               rtol=1e-5)


def test_bf16_sd_model_is_left_as_it_was(tiny_sd_path):
    from bench.core.model import load_model

    m = load_model(tiny_sd_path, dtype="bfloat16")
    before = state_digest(m.unet)
    r0 = m.counter.rows
    s = SailSharpness().score(m, PROMPTS, seed=0)            # JVP on a float32 copy of the UNet
    assert np.isfinite(s).all() and (s > 0).all()
    assert m.counter.rows - r0 == len(PROMPTS) * 6
    a = Anisotropy(n_gen=2).terms(m, PROMPTS, seed=0)
    assert np.isfinite(a).all() and (np.abs(a[..., 1]) <= 1 + 1e-6).all()
    assert state_digest(m.unet) == before and m.dtype == torch.bfloat16


def test_aniso_saved_fit_is_reused_with_its_provenance(small_organism, tiny_sd_path, tmp_path):
    from bench.core.model import load_model

    a = Anisotropy(gamma_mode="fit").fit(small_organism, memorized=CALIB_MEM, reference=CALIB_REF, seed=3)
    path = a.save_fit(tmp_path / "fit.json")
    b = Anisotropy(gamma_mode="file", gamma_file=str(path))
    p = b.params()                                           # complete before any score (the manifest's view)
    assert p["gamma"] == a.params()["gamma"] and p["fit"]["seed"] == 3 and len(p["gamma_file_sha256"]) == 64
    np.testing.assert_allclose(b.score(small_organism, PROMPTS, seed=0), a.score(small_organism, PROMPTS, seed=0))
    with pytest.raises(ValueError, match="calibration split"):
        b.score(small_organism, [CALIB_MEM[0]], seed=0)
    with pytest.raises(ValueError, match="other model weights"):
        Anisotropy(gamma_mode="file", gamma_file=str(path)).score(load_model(tiny_sd_path), PROMPTS, seed=0)
    with pytest.raises(ValueError, match="fitted with terms"):
        Anisotropy(gamma_mode="file", gamma_file=str(path), cosine="flat")
    with pytest.raises(ValueError, match="needs detector.gamma_file"):
        Anisotropy(gamma_mode="file")


@pytest.mark.parametrize("det, rows", [("sail_n1", 6), ("aniso_n1", 4)])
def test_runner_records_their_unet_evaluations(det, rows, tmp_path, small_organism):
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from bench.run.runner import run_detect

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        c = compose("detect", overrides=[f"runs_dir={tmp_path}/runs", f"leaderboard={tmp_path}/lb.csv",
                                         "hardware.threads=1", "model=organism_small", "task.labels=planted",
                                         "task.max_per_group=2", f"detector={det}"])
    m = run_detect(OmegaConf.to_container(c, resolve=True), model=small_organism, progress=False)
    assert m["unet_evals_per_prompt"] == rows and m["detector"] == det and np.isfinite(m["auc"])
