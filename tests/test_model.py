"""bench.core.model: loading diffusers folders (tiny random SD, the organism), sampling plumbing through the
adapter, v-prediction conversion, and the errors for bad prompts, folders, devices and dtypes."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch

from bench.core.model import (
    DiffusionModel,
    ModelLoadError,
    PromptError,
    PromptTruncationWarning,
    load_model,
    resolve_device_dtype,
)
from bench.core.sampling import sample
from tests.conftest import make_tiny_sd

LONG_PROMPT = " ".join(["red"] * 100)       # ~102 CLIP tokens > 77


@pytest.fixture(scope="module")
def tiny_sd(tiny_sd_path) -> DiffusionModel:
    return load_model(tiny_sd_path)


@pytest.fixture(scope="module")
def tiny_sd_novae_path(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd_novae"), vae=False)


# ----------------------------------------------------------------------------- loading + sampling
def test_tiny_sd_with_vae_loads_and_samples(tiny_sd, tiny_sd_path):
    m = tiny_sd
    assert isinstance(m, DiffusionModel)
    assert m.vae is not None
    assert m.latent_shape == (4, 8, 8)
    assert m.max_length == 77
    assert m.path == str(tiny_sd_path)
    assert m.device.type == "cpu" and m.dtype == torch.float32
    prompts, seeds, steps = ["a red circle", "a blue square"], [0, 1, 2], 3
    before = m.counter.rows
    res = sample(m, prompts, seeds, steps=steps, guidance=7.5)
    n = len(prompts) * len(seeds)
    # VAE with two blocks upsamples the 8x8 latent by 2.
    assert res.images is not None and res.images.shape == (n, 3, 16, 16)
    assert res.images.dtype == torch.float32
    assert res.images.min() >= 0 and res.images.max() <= 1
    assert torch.isfinite(res.images).all()
    assert res.x.shape == (n, 4, 8, 8)
    assert res.steps_run == steps
    # cond + uncond row per sample per step
    assert res.unet_rows == 2 * n * steps
    assert m.counter.rows - before == 2 * n * steps
    assert res.prompt_idx.tolist() == [0, 0, 0, 1, 1, 1]
    assert res.seeds.tolist() == [0, 1, 2, 0, 1, 2]


def test_tiny_sd_without_vae_is_pixel_space(tiny_sd_novae_path):
    m = load_model(tiny_sd_novae_path)
    assert m.vae is None
    assert m.latent_shape == (3, 8, 8)
    m.counter.reset()
    res = sample(m, ["a red circle"], [5, 6], steps=2, guidance=3.0)
    assert res.images.shape == (2, 3, 8, 8)
    assert res.images.min() >= 0 and res.images.max() <= 1
    assert m.counter.rows == res.unet_rows == 2 * 2 * 2
    assert m.counter.calls == 2                       # one batched call per step
    # pixel-space decode is the identity map [-1, 1] -> [0, 1]
    torch.testing.assert_close(res.images, ((res.x + 1) / 2).clamp(0, 1))


def test_v_prediction_is_converted_to_eps(tmp_path):
    m = load_model(make_tiny_sd(tmp_path / "vpred", prediction_type="v_prediction"))
    assert m.prediction_type == "v_prediction"
    acp = m.make_scheduler().alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *m.latent_shape), generator=g)
    with torch.no_grad():
        emb = m.encode(["a red circle", "a cat"])
        for t in (0, 500, 981):
            raw = m.unet(x, torch.tensor(t), encoder_hidden_states=emb, return_dict=False)[0]
            a = acp[t]
            want = a.sqrt() * raw + (1 - a).sqrt() * x
            torch.testing.assert_close(m.eps(x, t, emb), want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(m.eps(x, torch.tensor(t), emb), want, atol=1e-5, rtol=1e-5)
            # the conversion is not the identity (the test would be vacuous otherwise)
            assert not torch.allclose(want, raw, atol=1e-3)
        # per-sample timesteps [B]
        tt = torch.tensor([10, 900])
        raw = m.unet(x, tt, encoder_hidden_states=emb, return_dict=False)[0]
        a = acp[tt].view(-1, 1, 1, 1)
        torch.testing.assert_close(m.eps(x, tt, emb), a.sqrt() * raw + (1 - a).sqrt() * x,
                                   atol=1e-5, rtol=1e-5)


def test_epsilon_model_returns_raw_unet_output(tiny_sd):
    x = torch.randn((1, *tiny_sd.latent_shape), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        emb = tiny_sd.encode(["x"])
        raw = tiny_sd.unet(x, torch.tensor(400), encoder_hidden_states=emb, return_dict=False)[0]
        torch.testing.assert_close(tiny_sd.eps(x, 400, emb), raw)


# ----------------------------------------------------------------------------- bad prompts
def test_empty_prompt_list(tiny_sd):
    with pytest.raises(PromptError, match="empty"):
        tiny_sd.encode([])
    with pytest.raises(PromptError, match="empty"):
        sample(tiny_sd, [], [0], steps=1)


@pytest.mark.parametrize("bad", [3, None])
def test_non_string_prompt_names_index(tiny_sd, bad):
    with pytest.raises(PromptError, match=r"#1\b.*not a string"):
        tiny_sd.encode(["fine", bad])
    with pytest.raises(PromptError, match=r"#0\b"):
        sample(tiny_sd, [bad], [0], steps=1)


def test_bare_string_is_not_a_prompt_list(tiny_sd):
    with pytest.raises(PromptError, match="list of strings"):
        tiny_sd.encode("a red circle")


def test_long_prompt_warns_records_and_keeps_shape(tiny_sd):
    tiny_sd.truncations.clear()
    short = tiny_sd.encode(["a", "b"])
    with pytest.warns(PromptTruncationWarning, match=r"prompt #1 has \d+ tokens"):
        long = tiny_sd.encode(["a", LONG_PROMPT])
    assert long.shape == short.shape == (2, 77, 32)
    assert len(tiny_sd.truncations) == 1
    rec = tiny_sd.truncations[0]
    assert rec["index"] == 1 and rec["n_tokens"] > 77 and rec["max_length"] == 77
    assert rec["prompt"] == LONG_PROMPT
    # the short row is unaffected by its long neighbour
    torch.testing.assert_close(long[0], short[0])

    tiny_sd.truncations.clear()
    with pytest.warns(PromptTruncationWarning):
        res = sample(tiny_sd, [LONG_PROMPT], [0], steps=1)
    assert res.images.shape == (1, 3, 16, 16)
    assert [r["index"] for r in tiny_sd.truncations] == [0]


def test_prompt_at_max_length_does_not_warn(tiny_sd):
    tiny_sd.truncations.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncationWarning)
        tiny_sd.encode([" ".join(["red"] * 75)])      # 75 words + BOS + EOS = 77 tokens
    assert tiny_sd.truncations == []


# ----------------------------------------------------------------------------- bad folders
def test_missing_folder(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelLoadError, match="does not exist") as ei:
        load_model(missing)
    assert str(missing) in str(ei.value)
    assert isinstance(ei.value, FileNotFoundError)


def test_partial_folder_lists_everything_missing(tiny_sd_path, tmp_path):
    d = tmp_path / "partial"
    shutil.copytree(tiny_sd_path, d)
    (d / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(d / "scheduler")
    with pytest.raises(ModelLoadError, match="incomplete") as ei:
        load_model(d)
    msg = str(ei.value)
    assert "unet/diffusion_pytorch_model.safetensors" in msg
    assert "scheduler/" in msg
    assert str(d) in msg


def test_pickle_only_unet_is_refused(tiny_sd_path, tmp_path):
    from safetensors.torch import load_file

    d = tmp_path / "pickled"
    shutil.copytree(tiny_sd_path, d)
    st = d / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(st)), d / "unet" / "diffusion_pytorch_model.bin")
    st.unlink()
    with pytest.raises(ModelLoadError, match="safetensors") as ei:
        load_model(d)
    assert "unet/diffusion_pytorch_model.safetensors" in str(ei.value)


# ----------------------------------------------------------------------------- device / dtype
@pytest.mark.parametrize("dtype", ["float64", "int8"])
def test_unsupported_dtype(tiny_sd_path, dtype):
    with pytest.raises(ValueError, match=rf"dtype='{dtype}' is not supported.*float32"):
        load_model(tiny_sd_path, dtype=dtype)
    with pytest.raises(ValueError, match="not supported"):
        resolve_device_dtype("cpu", dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(tiny_sd_path):
    with pytest.raises(ValueError, match="CUDA is not available.*device=cpu"):
        load_model(tiny_sd_path, device="cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device_dtype("cuda:0", "float32")


def test_bad_device_string():
    with pytest.raises(ValueError, match="not a valid torch device"):
        resolve_device_dtype("gpu please", "float32")


def test_float16_on_cpu_has_hint(tiny_sd_path):
    with pytest.raises(ValueError, match="float16 on the CPU.*(float32|bfloat16)"):
        load_model(tiny_sd_path, device="cpu", dtype="float16")


def test_bfloat16_on_cpu_loads(tiny_sd_path):
    m = load_model(tiny_sd_path, dtype="bfloat16")
    assert m.dtype == torch.bfloat16
    assert m.vae is not None and next(m.vae.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        assert m.encode(["a"]).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- the organism
def test_organism_encoder_and_sd_module_names(small_organism):
    m = small_organism
    e = m.encode([""])
    assert e.shape == (1, m.max_length, 384)
    assert m.max_length == 32
    assert m.vae is None and m.latent_shape == (3, 16, 16)
    names = [n for n, _ in m.unet.named_modules()]
    assert any(n.endswith("attn2.to_v") for n in names)
    assert any(n.endswith("ff.net.2") for n in names)
    assert any(n.endswith("attn1.to_q") for n in names)
    assert m.unet.config.cross_attention_dim == 384
