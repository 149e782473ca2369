"""bench.core.sampling.sample: the CFG loop against a hand-written reference, batch independence,
stop_after / on_step plumbing, and seeding. Runs on the test organism and the tiny random SD."""

from __future__ import annotations

import pytest
import torch

from bench.core.model import load_model
from bench.core.sampling import StepInfo, sample

STEPS = 4
# Per-row quantities (eps) are compared with torch.allclose's semantics. Final latents are compared
# relative to their scale: a different batch shape changes the float32 summation order inside the UNet
# (~1e-6 per eps call), and CFG (x5) plus DDIM's x0 prediction amplify that to ~1.5e-5 on untrained-model
# latents of magnitude ~15, i.e. ~1e-6 of the scale. Real coupling between rows would be O(1); the float64
# test below checks the same property with a 1e-10 tolerance.
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_sd(tiny_sd_path):
    return load_model(tiny_sd_path)


@pytest.fixture(params=["organism", "tiny_sd"])
def model(request):
    return request.getfixturevalue("small_organism" if request.param == "organism" else "tiny_sd")


def assert_same_latents(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    assert a.shape == b.shape
    scale = max(1.0, b.abs().max().item())
    err = (a - b).abs().max().item()
    assert err <= rel * scale, f"max |a - b| = {err:.3g} > {rel:g} x scale {scale:.3g}"


def reference_loop(model, prompts, seeds, steps):
    """Conditional-only DDIM (eta 0): what guidance 1 must reduce to."""
    sched = model.make_scheduler()
    sched.set_timesteps(steps)
    out = []
    with torch.no_grad():
        cond = model.encode(prompts)
        for p in range(len(prompts)):
            x = model.init_latents(seeds)
            e = cond[p:p + 1].expand(len(seeds), -1, -1)
            for t in sched.timesteps:
                eps = model.eps(x, t, e)
                x = sched.step(eps, t, x, eta=0.0, return_dict=False)[0]
            out.append(x)
    return torch.cat(out)


def test_guidance_one_is_conditional_only(model):
    prompts, seeds = ["a red circle", "zebra kettle poster"], [0, 3]
    res = sample(model, prompts, seeds, steps=STEPS, guidance=1.0, decode=False)
    ref = reference_loop(model, prompts, seeds, STEPS)
    assert res.x.shape == ref.shape == (4, *model.latent_shape)
    assert_same_latents(res.x, ref)
    assert res.images is None                       # decode=False


def test_guidance_matters(model):
    a = sample(model, ["a red circle"], [0], steps=STEPS, guidance=1.0, decode=False).x
    b = sample(model, ["a red circle"], [0], steps=STEPS, guidance=7.5, decode=False).x
    assert not torch.allclose(a, b, atol=1e-4)


def test_batch_size_does_not_matter(model):
    prompts, seeds = ["a red circle", "a blue square"], [0, 1, 2]
    xs = [sample(model, prompts, seeds, steps=STEPS, guidance=5.0, batch_size=bs, decode=False).x
          for bs in (1, 3, 64)]
    assert_same_latents(xs[1], xs[0])
    assert_same_latents(xs[2], xs[0])


def test_batch_independence_is_exact_up_to_rounding(tiny_sd_path):
    """In float64 the rounding noise vanishes: batch size and neighbours change nothing (1e-10)."""
    m = load_model(tiny_sd_path)
    m.unet.double()
    m.text_encoder.double()
    prompts, seeds = ["a red circle", "a blue square", "c"], [0, 1, 2]
    xs = [sample(m, prompts, seeds, steps=STEPS, guidance=5.0, batch_size=bs, decode=False).x
          for bs in (1, 4, 64)]
    assert xs[0].dtype == torch.float64
    torch.testing.assert_close(xs[1], xs[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(xs[2], xs[0], atol=1e-10, rtol=0)
    alone = sample(m, ["c"], seeds, steps=STEPS, guidance=5.0, decode=False).x
    torch.testing.assert_close(xs[0][6:], alone, atol=1e-10, rtol=0)


def test_other_prompts_do_not_matter(model):
    seeds = [0, 1]
    many = sample(model, ["a", "b", "c"], seeds, steps=STEPS, guidance=5.0, batch_size=3, decode=False)
    alone = sample(model, ["c"], seeds, steps=STEPS, guidance=5.0, decode=False)
    rows = (many.prompt_idx == 2).nonzero().flatten()
    assert rows.tolist() == [4, 5]
    assert many.seeds[rows].tolist() == seeds
    assert_same_latents(many.x[rows], alone.x)
    # and the prompts really give different results
    assert not torch.allclose(many.x[0], many.x[4], atol=1e-4)


def test_stop_after_and_on_step(model):
    prompts, seeds, k, bs = ["a red circle", "a blue square"], [0, 1, 2], 2, 4
    n = len(prompts) * len(seeds)
    n_chunks = -(-n // bs)
    infos: list[StepInfo] = []

    def hook(info: StepInfo):
        infos.append(StepInfo(info.i, info.t, info.x_t.clone(), info.eps_text.clone(),
                              info.eps_uncond.clone(), info.sample_idx.clone(),
                              info.prompt_idx.clone(), info.seed.clone()))

    calls0, rows0 = model.counter.calls, model.counter.rows
    res = sample(model, prompts, seeds, steps=10, guidance=7.5, stop_after=k, batch_size=bs, on_step=hook)
    assert model.counter.calls - calls0 == k * n_chunks
    assert model.counter.rows - rows0 == res.unet_rows == 2 * k * n
    assert res.steps_run == k
    assert res.images is None
    assert res.x.shape == (n, *model.latent_shape)

    ts = model.timesteps(10)[:k].tolist()
    assert len(infos) == k * n_chunks
    assert [s.i for s in infos] == list(range(k)) * n_chunks
    assert [s.t for s in infos] == ts * n_chunks
    assert all(isinstance(s.t, int) for s in infos)
    seen = torch.cat([s.sample_idx for s in infos if s.i == 0])
    assert sorted(seen.tolist()) == list(range(n))

    with torch.no_grad():
        cond, uncond = model.encode(prompts), model.encode([""])
        for s in infos:
            b = len(s.sample_idx)
            for tensor in (s.x_t, s.eps_text, s.eps_uncond):
                assert tensor.shape == (b, *model.latent_shape)
            assert s.prompt_idx.tolist() == res.prompt_idx[s.sample_idx].tolist()
            assert s.seed.tolist() == res.seeds[s.sample_idx].tolist()
            if s.i == 0:                              # x_T comes from the seeds alone
                torch.testing.assert_close(s.x_t, model.init_latents(s.seed.tolist()))
            want = model.eps(s.x_t, s.t, cond[s.prompt_idx])
            torch.testing.assert_close(s.eps_text, want, **TOL)
            want_u = model.eps(s.x_t, s.t, uncond.expand(b, -1, -1))
            torch.testing.assert_close(s.eps_uncond, want_u, **TOL)

    # the partial run is the prefix of the full one: x after k steps of a 10-step schedule
    full_infos: list[StepInfo] = []
    sample(model, prompts, seeds, steps=10, guidance=7.5, stop_after=k + 1, batch_size=bs,
           on_step=lambda s: full_infos.append(s) if s.i == k else None)
    x_k = torch.cat([s.x_t for s in full_infos])
    order = torch.cat([s.sample_idx for s in full_infos])
    assert_same_latents(res.x[order], x_k)


def test_full_run_reports_all_steps(model):
    res = sample(model, ["a"], [0], steps=3, guidance=2.0)
    assert res.steps_run == 3 and res.unet_rows == 6 and res.images is not None


def test_seeds(model):
    a = sample(model, ["a red circle"], [7], steps=STEPS, guidance=5.0, decode=False).x
    b = sample(model, ["a red circle"], [7], steps=STEPS, guidance=5.0, decode=False).x
    c = sample(model, ["a red circle"], [8], steps=STEPS, guidance=5.0, decode=False).x
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="seeds is empty"):
        sample(model, ["a"], [], steps=2)
    with pytest.raises(ValueError, match="batch_size"):
        sample(model, ["a"], [0], steps=2, batch_size=0)
    with pytest.raises(ValueError, match="stop_after"):
        sample(model, ["a"], [0], steps=2, stop_after=0)


def test_prompt_embeds_replace_encoder(model):
    prompts, seeds = ["a red circle", "a blue square"], [0, 1]
    with torch.no_grad():
        emb = model.encode(prompts)
    a = sample(model, prompts, seeds, steps=3, guidance=5.0, decode=False)
    b = sample(model, ["x", "y"], seeds, steps=3, guidance=5.0, decode=False, prompt_embeds=emb)
    assert_same_latents(b.x, a.x)
    with pytest.raises(ValueError, match="prompt_embeds has 2 rows for 3 prompts"):
        sample(model, ["x", "y", "z"], seeds, steps=3, prompt_embeds=emb)


# ---------------------------------------------------------------------- SD 2.x (v-prediction)
def _reference_cfg_ddim(model, prompts, seeds, steps, guidance, *, native_v: bool):
    """A DDIM CFG loop written here, outside bench.core.sampling, for a v-prediction model.

    ``native_v=False``: the adapter's eps (v converted) stepped by an *epsilon* DDIM scheduler;
    ``native_v=True``: the raw UNet v output (no conversion) stepped by a *v_prediction* scheduler,
    as diffusers' StableDiffusionPipeline does for SD 2.x. Both must equal ``sample()``.
    """
    from diffusers import DDIMScheduler

    cfg = dict(model.scheduler_config)
    cfg["prediction_type"] = "v_prediction" if native_v else "epsilon"
    sched = DDIMScheduler.from_config(cfg)
    sched.set_timesteps(steps)
    out = []
    with torch.no_grad():
        cond, uncond = model.encode(prompts), model.encode([""])
        for p in range(len(prompts)):
            x = model.init_latents(seeds)
            e = torch.cat([cond[p:p + 1].expand(len(seeds), -1, -1), uncond.expand(len(seeds), -1, -1)])
            for t in sched.timesteps:
                if native_v:
                    o = model.unet(torch.cat([x, x]), t, encoder_hidden_states=e, return_dict=False)[0]
                else:
                    o = model.eps(torch.cat([x, x]), t, e)
                oc, ou = o.chunk(2)
                x = sched.step(ou + guidance * (oc - ou), t, x, eta=0.0, return_dict=False)[0]
            out.append(x)
    return torch.cat(out)


@pytest.mark.parametrize("native_v", [False, True], ids=["eps+epsilon_scheduler", "v+v_scheduler"])
def test_v_prediction_sampling_matches_reference_ddim_over_50_steps(tmp_path, native_v):
    from tests.conftest import make_tiny_sd

    m = load_model(make_tiny_sd(tmp_path / "vpred", prediction_type="v_prediction"),
                   dtype="float32")
    m.unet.double()
    m.text_encoder.double()
    assert m.prediction_type == "v_prediction"
    prompts, seeds = ["a red circle", "zebra kettle poster"], [0, 5]
    res = sample(m, prompts, seeds, steps=50, guidance=7.5, decode=False)
    ref = _reference_cfg_ddim(m, prompts, seeds, 50, 7.5, native_v=native_v)
    assert res.x.dtype == torch.float64
    # float64 model; the scheduler keeps alphas_cumprod (and 1 - alpha) in float32, hence float32 precision
    assert_same_latents(res.x, ref, rel=1e-5)
