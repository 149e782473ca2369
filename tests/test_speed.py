"""The speed benchmark's correctness (never its timings): the naive reference implementation and ours
give the same scores, the floor runs exactly the batch ours runs at its first step, ratios are
computed within a repeat, the outputs are written, memory fitting and the SD-1.5 shape are right."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from baselines.detectors.noise_magnitude import NoiseMagnitude
from baselines.detectors.noise_magnitude_naive import NoiseMagnitudeNaive
from bench.core.hardware import fit_batch_size, rows_that_fit, samples_that_fit
from tasks.studies.speed import Spec, build_specs, floor_runner, main, measure
from bench.report.speed_report import summarise

PROMPTS = ["a red circle", "worcester mooney poster", "a blue square on stripes"]


def test_naive_and_ours_agree_for_every_k(small_organism):
    """Same x_T (seed + j), same CFG trajectory: per-step norms agree over all 50 steps, so the
    k = 50, 10 and 1 scores agree (two independent implementations of methods.md 1a)."""
    ours = NoiseMagnitude(n_gen=2, steps=50).per_step_norms(small_organism, PROMPTS[:2], seed=3)
    naive = NoiseMagnitudeNaive(n_gen=2, steps=50).per_step_norms(small_organism, PROMPTS[:2], seed=3)
    assert ours.shape == naive.shape == (2, 2, 50)
    np.testing.assert_allclose(ours, naive, rtol=1e-5, atol=1e-6)
    for k in (50, 10, 1):
        a = NoiseMagnitude(n_gen=2, steps=k).score(small_organism, PROMPTS[:2], seed=3)
        b = NoiseMagnitudeNaive(n_gen=2, steps=k).score(small_organism, PROMPTS[:2], seed=3)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(ours[:, :, 0], ours[:, :, -1])          # the steps really differ


def test_naive_is_one_prompt_per_call_and_all_steps(small_organism):
    c = small_organism.counter
    calls0, rows0 = c.calls, c.rows
    NoiseMagnitudeNaive(n_gen=3, steps=1, total_steps=6).score(small_organism, PROMPTS[:2], seed=0)
    assert c.calls - calls0 == 2 * 6                 # no early exit, no batching across prompts
    assert c.rows - rows0 == 2 * 6 * 2 * 3
    with pytest.raises(ValueError, match="steps=7"):
        NoiseMagnitudeNaive(steps=7, total_steps=6)


def _capture_unet_inputs(model):
    seen = []

    def hook(_m, args, kwargs):
        seen.append((args[0].clone(), kwargs["encoder_hidden_states"].clone(), int(args[1])))
    return seen, model.unet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("n_gen,k", [(1, 1), (2, 3)])
def test_floor_is_the_batch_ours_runs(small_organism, n_gen, k):
    """The floor's k UNet calls see the inputs of ours' first step (x_T of seed + j, cond then uncond
    rows, t = T), and ours makes exactly k UNet calls for the same prompts."""
    seen, h = _capture_unet_inputs(small_organism)
    try:
        floor_runner(small_organism, PROMPTS, n_gen, k, seed=5)()
        floor_calls = list(seen)
        seen.clear()
        NoiseMagnitude(n_gen=n_gen, steps=k, batch_size=len(PROMPTS) * n_gen).score(small_organism, PROMPTS, seed=5)
    finally:
        h.remove()
    assert len(floor_calls) == k and len(seen) == k
    t_first = int(small_organism.timesteps(50)[0])
    for x, e, t in floor_calls:
        assert t == t_first
        assert x.shape[0] == 2 * len(PROMPTS) * n_gen
        torch.testing.assert_close(x, seen[0][0])
        torch.testing.assert_close(e, seen[0][1])


def test_summary_ratios_are_within_repeat():
    raw = []
    for r, load in enumerate((1.0, 3.0, 2.0)):        # the machine's load scales a whole repeat
        for variant, kind, n, k, P, per_prompt in (("floor_n1_k1", "floor", 1, 1, 8, 1.0),
                                                   ("nm_n1_k1", "ours", 1, 1, 8, 1.05),
                                                   ("naive_n1", "naive", 1, 50, 2, 60.0)):
            raw.append({"repeat": r, "variant": variant, "kind": kind, "n_gen": n, "k": k, "n_prompts": P,
                        "seconds": per_prompt * load * P, "sec_per_prompt": per_prompt * load,
                        "unet_rows": 2 * n * (k if kind != "naive" else 50) * P})
    t = summarise(raw).set_index("variant")
    assert t.loc["nm_n1_k1", "x_floor_median"] == pytest.approx(1.05)
    assert t.loc["nm_n1_k1", "x_floor_min"] == pytest.approx(1.05)          # load cancels in the ratio
    assert t.loc["nm_n1_k1", "speedup_vs_naive_median"] == pytest.approx(60 / 1.05)
    assert t.loc["naive_n1", "x_floor_median"] == pytest.approx(60.0)
    assert t.loc["nm_n1_k1", "sec_per_prompt_median"] == pytest.approx(2.1)
    assert t.loc["nm_n1_k1", "sec_per_prompt_max"] == pytest.approx(3.15)
    assert t.loc["nm_n1_k1", "unet_rows_per_prompt"] == 2
    assert t.loc["naive_n1", "unet_rows_per_prompt"] == 100


def test_specs_cover_the_issue():
    specs = build_specs([1, 64], prompts_n4=16, naive_prompts=4, density_prompts=4, density_n16_prompts=2)
    names = {(s.variant, s.n_prompts) for s in specs}
    for want in [("floor_n1_k1", 64), ("nm_n1_k1", 64), ("nm_n1_k1", 1), ("nm_n4_k1", 16), ("nm_n4_k10", 16),
                 ("floor_n4_k10", 16), ("naive_n1", 4), ("naive_n4", 4), ("density_pixel_n4", 4),
                 ("density_pixel_n16", 2)]:
        assert want in names
    assert Spec("nm_n4_k10", "ours", 4, 10, 16).unet_rows_per_prompt == 80
    assert Spec("naive_n4", "naive", 4, 50, 4).unet_rows_per_prompt == 400
    only = build_specs([8], 2, 1, 1, 1, kinds=("floor", "ours"))
    assert {s.kind for s in only} == {"floor", "ours"}


def test_measure_counts_rows_and_interleaves(small_organism):
    specs = [Spec("floor_n1_k1", "floor", 1, 1, 2), Spec("nm_n1_k1", "ours", 1, 1, 2)]
    raw = measure(small_organism, specs, PROMPTS, repeats=2, warmup=False, progress=False)
    assert [r["variant"] for r in raw] == ["floor_n1_k1", "nm_n1_k1", "nm_n1_k1", "floor_n1_k1"]
    assert all(r["unet_rows"] == 4 and r["seconds"] > 0 for r in raw)
    with pytest.raises(ValueError, match="needs 9 prompts"):
        measure(small_organism, [Spec("nm_n1_k1", "ours", 1, 1, 9)], PROMPTS, repeats=1)


def test_main_writes_csv_and_plot(tmp_path):
    out, plot = tmp_path / "speed.csv", tmp_path / "plots" / "speed.png"
    res = main(["--model", "organism-small", "--kinds", "floor,ours", "--batch-sizes", "1,2",
                "--prompts-n4", "1", "--repeats", "2", "--threads", "1", "--out", str(out), "--plot", str(plot)])
    df = pd.read_csv(out)
    assert plot.is_file() and plot.stat().st_size > 0
    assert set(df.variant) == {"floor_n1_k1", "nm_n1_k1", "floor_n4_k1", "nm_n4_k1", "floor_n4_k10", "nm_n4_k10"}
    for col in ("sec_per_prompt_median", "x_floor_median", "prompts_per_second", "cpu_cores", "torch_threads",
                "torch", "shared_machine_note", "unet_attention"):
        assert col in df.columns
    assert (df[df.kind == "ours"].x_floor_median > 0).all()
    assert len(pd.read_csv(tmp_path / "speed_repeats.csv")) == 2 * 8
    assert res["machine"]["torch_threads"] == 1
    with pytest.raises(SystemExit, match="--kinds"):
        main(["--kinds", "fast"])


def test_memory_fit_arithmetic_and_cpu_passthrough(small_organism):
    assert rows_that_fit(1000, 10, safety=0.8) == 80
    assert samples_that_fit(256, 1000, 10, safety=0.8) == 40           # 80 rows = 40 cond+uncond pairs
    assert samples_that_fit(16, 1000, 10, safety=0.8) == 16
    with pytest.raises(MemoryError, match="not even one sample"):
        samples_that_fit(4, 100, 60, safety=0.8)
    with pytest.raises(ValueError, match="safety"):
        rows_that_fit(100, 1, safety=0)
    assert fit_batch_size(small_organism, 37) == 37                     # the CPU is not probed


def test_sd15_shape_without_weights():
    from bench.core.sd15_random import SD15_UNET_PARAMS, sd15_unet

    unet = sd15_unet("meta")                        # no memory, no download
    assert sum(p.numel() for p in unet.parameters()) == SD15_UNET_PARAMS
    assert unet.config.sample_size == 64 and unet.config.cross_attention_dim == 768
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"AttnProcessor2_0"}   # SDPA


@pytest.mark.gpu
def test_gpu_fit_and_sd15_fp16_scores_agree():
    """On a CUDA device: the memory fit caps a huge request, and the batched detector equals the naive
    one on the random SD-1.5-shaped model in float16 (k = 1, first step: same inputs)."""
    from bench.core.sd15_random import sd15_random

    m = sd15_random(device="cuda", dtype="float16", vae=False)
    assert 1 <= fit_batch_size(m, 10 ** 6) < 10 ** 6
    # fp16 carries ~1e-3 relative error per op; ||eps_c - eps_u|| is a difference of close values
    a = NoiseMagnitude(n_gen=2, steps=1, total_steps=2).score(m, PROMPTS[:2], seed=0)
    b = NoiseMagnitudeNaive(n_gen=2, steps=1, total_steps=2, decode=False).score(m, PROMPTS[:2], seed=0)
    np.testing.assert_allclose(a, b, rtol=2e-2)
