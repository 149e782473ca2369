"""Tests for bench.measure.embed: SSCD on real photographs, pixel metrics, TorchScript and CLIP plumbing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bench.measure.embed import (
    ClipScorer,
    Embedder,
    PixelEmbedder,
    SSCDOnnxEmbedder,
    SSCDTorchScriptEmbedder,
    cn_rmse,
    cosine_matrix,
    get_embedder,
    pixel_rmse,
    resize,
    tiled_l2,
)

skdata = pytest.importorskip("skimage.data")
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "immunohistochemistry"]


def photo(name: str) -> torch.Tensor:
    """A scikit-image photograph as float [1, 3, H, W] in [0, 1]."""
    arr = getattr(skdata, name)()
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None].float() / 255.0


def central_crop_back(x: torch.Tensor, frac: float = 0.8) -> torch.Tensor:
    """Central ``frac`` crop, resized back to the original size."""
    h, w = x.shape[-2:]
    ch, cw = int(h * frac), int(w * frac)
    top, left = (h - ch) // 2, (w - cw) // 2
    return resize(x[..., top:top + ch, left:left + cw], (h, w)).clamp(0, 1)


def colour_jitter(x: torch.Tensor) -> torch.Tensor:
    """Contrast x1.25, brightness +0.05, per-channel gain (hue-ish shift)."""
    gain = torch.tensor([1.1, 0.95, 0.85]).view(1, 3, 1, 1)
    return (((x - 0.5) * 1.25 + 0.55) * gain).clamp(0, 1)


@pytest.fixture(scope="module")
def sscd() -> SSCDOnnxEmbedder:
    return SSCDOnnxEmbedder(threads=1, progress=False)


@pytest.fixture(scope="module")
def photo_embeddings(sscd: SSCDOnnxEmbedder) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    for n in PHOTOS:
        x = photo(n)
        out[n] = {"orig": sscd.embed(x)[0], "crop": sscd.embed(central_crop_back(x))[0],
                  "jitter": sscd.embed(colour_jitter(x))[0]}
    return out


def test_sscd_copies_beat_unrelated(photo_embeddings: dict[str, dict[str, np.ndarray]]) -> None:
    # Observed (int8 sscd_disc_mixup, 288x288, threads=1): crop 0.77-0.88 (rocket lowest),
    # colour jitter 0.91-0.97; unrelated originals -0.06..0.07 (max 0.072).
    copies = [float(e["orig"] @ e[k]) for e in photo_embeddings.values() for k in ("crop", "jitter")]
    unrelated = [float(photo_embeddings[a][ka] @ photo_embeddings[b][kb])
                 for a in PHOTOS for b in PHOTOS if a != b
                 for ka in ("orig", "crop", "jitter") for kb in ("orig", "crop", "jitter")]
    assert min(copies) > max(unrelated) + 0.5, (min(copies), max(unrelated))
    assert np.median(copies) - np.median(unrelated) > 0.7


def test_sscd_shape_dtype_norm_determinism_batching(sscd: SSCDOnnxEmbedder) -> None:
    assert isinstance(sscd, Embedder) and sscd.dim == 512 and "uint8" in sscd.preprocessing
    x = torch.cat([resize(photo(n), (200, 240)) for n in PHOTOS[:4]])
    e4 = sscd.embed(x, batch_size=4)
    assert e4.shape == (4, 512) and e4.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e4, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(e4, sscd.embed(x, batch_size=4))
    np.testing.assert_allclose(sscd.embed(x, batch_size=1), e4, atol=1e-5)
    np.testing.assert_allclose(sscd.embed(x.numpy().astype(np.float64), batch_size=3), e4, atol=1e-5)
    assert sscd.embed(x[:0]).shape == (0, 512)
    np.testing.assert_allclose(np.diag(cosine_matrix(e4, e4)), 1.0, atol=1e-5)


@pytest.mark.parametrize("emb", ["sscd", "pixel"])
def test_bad_inputs(emb: str, sscd: SSCDOnnxEmbedder) -> None:
    e = sscd if emb == "sscd" else PixelEmbedder()
    good = torch.rand(2, 3, 16, 16)
    nan = good.clone()
    nan[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        e.embed(nan)
    with pytest.raises(ValueError, match="3 channels"):
        e.embed(torch.rand(2, 4, 16, 16))
    with pytest.raises(ValueError, match="rank"):
        e.embed(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        e.embed(good * 255.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        e.embed(good - 0.5)
    with pytest.raises(ValueError, match="dtype"):
        e.embed((good * 255).to(torch.uint8))


def test_pixel_embedder_and_registry() -> None:
    x = torch.rand(3, 3, 20, 24)
    p = get_embedder("pixel", size=8)
    e = p.embed(x)
    assert e.shape == (3, 3 * 8 * 8) == (3, p.dim) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    cn = get_embedder("pixel_cn")
    assert cn.name == "pixel_cn" and "standardised" in cn.preprocessing
    gain = torch.tensor([0.5, 0.8, 0.3]).view(1, 3, 1, 1)
    ec = cn.embed(torch.cat([x[:1], x[:1] * gain + 0.1]))
    assert ec.shape == (2, 3 * 20 * 24)
    assert float(ec[0] @ ec[1]) == pytest.approx(1.0, abs=1e-5)  # correlation-like: gain/offset invariant
    with pytest.raises(KeyError, match="available"):
        get_embedder("nope")


def naive_rmse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([[np.sqrt(np.mean((x - y) ** 2)) for y in b] for x in a])


def naive_tiled(a: np.ndarray, b: np.ndarray, grid: int) -> np.ndarray:
    h, w = a.shape[-2:]
    ys = [i * h // grid for i in range(grid + 1)]
    xs = [i * w // grid for i in range(grid + 1)]
    out = np.zeros((len(a), len(b)))
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i, j] = max(np.sqrt(np.mean((x[:, ys[r]:ys[r + 1], xs[c]:xs[c + 1]]
                                             - y[:, ys[r]:ys[r + 1], xs[c]:xs[c + 1]]) ** 2))
                            for r in range(grid) for c in range(grid))
    return out


def test_pixel_rmse_and_tiled_l2_match_loops() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random((4, 3, 18, 22)), rng.random((5, 3, 18, 22))
    b[2] = a[1]
    b[3] = a[0].copy()
    b[3][:, :4, :5] = 0.0  # local change: tiled L2 >> global RMSE
    np.testing.assert_allclose(pixel_rmse(a, b), naive_rmse(a, b), atol=1e-7)
    for grid in (1, 3, 4):
        np.testing.assert_allclose(tiled_l2(a, b, grid=grid), naive_tiled(a, b, grid), atol=1e-7)
    t = tiled_l2(a, b)
    assert t.shape == (4, 5) and t[1, 2] == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(tiled_l2(a, b, grid=1), pixel_rmse(a, b), atol=1e-7)
    assert t[0, 3] > 2.0 * pixel_rmse(a, b)[0, 3]
    with pytest.raises(ValueError, match="sizes differ"):
        pixel_rmse(a, rng.random((1, 3, 18, 20)))


def test_cn_rmse() -> None:
    rng = np.random.default_rng(1)
    x = rng.random((1, 3, 32, 32))
    gain, off = np.array([0.4, 0.7, 0.25]).reshape(1, 3, 1, 1), np.array([0.1, 0.2, 0.5]).reshape(1, 3, 1, 1)
    y = x * gain + off  # stays in [0, 1]
    assert cn_rmse(x, y)[0, 0] == pytest.approx(0.0, abs=1e-6)
    assert pixel_rmse(x, y)[0, 0] > 0.1
    noise_a, noise_b = rng.random((3, 3, 64, 64)), rng.random((4, 3, 64, 64))
    m = cn_rmse(noise_a, noise_b)
    assert m.shape == (3, 4)
    np.testing.assert_allclose(m, np.sqrt(2.0), atol=0.03)
    za = (noise_a - noise_a.mean((2, 3), keepdims=True)) / noise_a.std((2, 3), keepdims=True)
    zb = (noise_b - noise_b.mean((2, 3), keepdims=True)) / noise_b.std((2, 3), keepdims=True)
    np.testing.assert_allclose(m, naive_rmse(za, zb), atol=1e-7)


class _Probe(torch.nn.Module):
    """Returns per-channel means of its input plus (H, W) / 1000 — exposes the preprocessing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = torch.tensor([x.shape[2], x.shape[3]], dtype=x.dtype).expand(x.shape[0], 2) / 1000.0
        return torch.cat([x.mean(dim=(2, 3)), size], dim=1)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("variant,side,mean,std", [
    ("SSCD-W", 224, (0.5,) * 3, (0.5,) * 3),
    ("SSCD-N", 320, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("SSCD-MB", 288, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
])
def test_torchscript_plumbing(tmp_path: Path, variant: str, side: int,
                              mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    path = tmp_path / "probe.torchscript.pt"
    torch.jit.script(_Probe()).save(str(path))
    emb = get_embedder("sscd_torchscript", path=path, variant=variant, progress=False)
    assert emb.dim == 5 and variant in emb.preprocessing
    colour = torch.tensor([0.2, 0.6, 0.9]).view(1, 3, 1, 1)
    x = colour.expand(2, 3, 100, 150).clone()  # non-square, constant colour
    expect = np.array([*((colour.flatten().numpy() - mean) / np.array(std)), side / 1000, side / 1000])
    expect /= np.linalg.norm(expect)
    np.testing.assert_allclose(emb.embed(x), np.tile(expect, (2, 1)), atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_preprocess_matches_torchvision(tmp_path: Path) -> None:
    T = pytest.importorskip("torchvision.transforms.v2")
    path = tmp_path / "probe.torchscript.pt"
    torch.jit.script(_Probe()).save(str(path))
    x = resize(photo("coffee"), (150, 233))  # non-square, odd long side
    tv = T.Compose([T.Resize(256, antialias=True), T.CenterCrop(224), T.Normalize([0.5] * 3, [0.5] * 3)])
    ours = SSCDTorchScriptEmbedder(path, "SSCD-W").preprocess(x)
    assert ours.shape == (1, 3, 224, 224)
    torch.testing.assert_close(ours, tv(x), atol=1e-5, rtol=0)
    tv_mb = T.Compose([T.Resize((288, 288), antialias=True), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    torch.testing.assert_close(SSCDTorchScriptEmbedder(path, "SSCD-MB").preprocess(x), tv_mb(x), atol=1e-5, rtol=0)


def test_progress_bar_flag(capsys: pytest.CaptureFixture[str]) -> None:
    x = torch.rand(6, 3, 4, 4)
    p = PixelEmbedder()
    p.progress_min = 4
    p.embed(x, batch_size=2)
    assert "embed[pixel]" in capsys.readouterr().err
    p.embed(x, batch_size=2, progress=False)
    PixelEmbedder(progress=False).embed(torch.rand(300, 3, 2, 2))
    assert "embed[pixel]" not in capsys.readouterr().err


def test_torchscript_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "sscd_disc_large.torchscript.pt"
    with pytest.raises(FileNotFoundError, match="sscd_disc_large.torchscript.pt") as ei:
        SSCDTorchScriptEmbedder(missing)
    assert "sscd-copy-detection" in str(ei.value)
    with pytest.raises(ValueError, match="variant"):
        SSCDTorchScriptEmbedder(missing, variant="SSCD-X")


def test_clip_scorer_tiny_model(tmp_path: Path) -> None:
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    )
    tok = open_clip.SimpleTokenizer()
    scorer = ClipScorer.from_model(model, tok, 32, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    x = torch.rand(3, 3, 50, 40)
    prompts = ["a cat", "a photo of a dog", "an astronaut"]
    raw = scorer.score(x, prompts, raw=True)
    s = scorer.score(x, prompts, batch_size=2)
    assert raw.shape == s.shape == (3,) and s.dtype == np.float32
    assert np.all(np.abs(raw) <= 1.0 + 1e-6)
    np.testing.assert_allclose(s, 100.0 * np.maximum(raw, 0.0), atol=1e-4)
    with torch.no_grad():
        im = model.encode_image(scorer.preprocess(x), normalize=True)
        tx = model.encode_text(tok(prompts), normalize=True)
    np.testing.assert_allclose(raw, (im * tx).sum(-1).numpy(), atol=1e-5)
    assert scorer.score(x, "a cat", raw=True).shape == (3,)
    with pytest.raises(ValueError, match="prompts"):
        scorer.score(x, ["one"])
    with pytest.raises(FileNotFoundError, match="never downloads"):
        ClipScorer.from_open_clip("ViT-B-32", tmp_path / "missing.bin")
