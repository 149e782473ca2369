"""The oracle: the closed-form optimal denoiser of a finite caption-conditioned training set.

A stand-in model that memorizes exactly by construction and needs no training. For the training
distribution (pixel space, x0 = images * 2 - 1 in [-1, 1], each pair (c, x_i) weighted by its
duplication count w_i), the MMSE denoiser under the forward process x_t = sqrt(a_t) x0 + sqrt(1-a_t) e is

    E[x0 | x_t, c] = sum_i p_i x_i,   p_i ∝ w_i exp(-||x_t - sqrt(a_t) x_i||^2 / (2 (1 - a_t)))

over the pairs whose caption is c, and eps = (x_t - sqrt(a_t) E[x0 | x_t, c]) / sqrt(1 - a_t).
The unconditional posterior (the empty caption "") runs over ALL training pairs, weighted by
duplication. A caption never seen in training (exact string match) falls back to the unconditional
posterior, as does an embedding that does not decode to a known caption id. Everything is computed in
float64 (distances expanded as ||x||^2 - 2 x.y + ||y||^2 via a matmul, normalised by log-sum-exp) and
cast back to the model dtype.

The components plug into ``bench.core.model.assemble`` so the oracle runs through the same adapter and
sampling loop as every other model: ``OracleTokenizer`` maps a caption to one integer token (its id,
0 = unconditional/unknown), ``OracleTextEncoder`` emits that id as base-256 digits ([B, L, 1], exact in
float16/bfloat16 too) and ``OracleUNet`` decodes the id and returns the posterior eps.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from diffusers import DDIMScheduler
from torch import nn

from bench.core.model import DiffusionModel, assemble
from tasks.memworld import MemWorld
from tasks.organism import SCHEDULER

BASE = 256          # digit base of the encoder output: every digit is an integer exact in bf16/fp16


def caption_ids(captions: list[str], weights) -> dict[str, int]:
    """Distinct captions of positive total weight -> ids 1, 2, ... by first appearance ("" excluded)."""
    total: dict[str, float] = {}
    for c, w in zip(captions, weights):
        total[c] = total.get(c, 0.0) + float(w)
    ids: dict[str, int] = {}
    for c in captions:
        if c != "" and total[c] > 0 and c not in ids:
            ids[c] = len(ids) + 1
    return ids


def _n_digits(n_ids: int) -> int:
    d = 1
    while BASE ** d <= n_ids:
        d += 1
    return d


class OracleTokenizer:
    """Callable like a HF tokenizer: every text is exactly one token, its caption id (0 = unknown / "")."""

    pad_token_id = 0

    def __init__(self, ids: dict[str, int], model_max_length: int = 1):
        self.ids = dict(ids)
        self.model_max_length = model_max_length

    def __len__(self) -> int:
        return len(self.ids) + 1

    def __call__(self, text, padding=False, max_length=None, truncation=False, return_tensors=None, **_):
        texts = [text] if isinstance(text, str) else list(text)
        rows = [[self.ids.get(t, 0)] for t in texts]
        L = max(1, int(max_length if max_length is not None else self.model_max_length))
        if truncation:
            rows = [r[:L] for r in rows]
        width = L if padding == "max_length" else max(len(r) for r in rows) if padding else None
        if width is not None:
            masks = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
            rows = [r + [self.pad_token_id] * (width - len(r)) for r in rows]
        else:
            masks = [[1] * len(r) for r in rows]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(rows, dtype=torch.long),
                    "attention_mask": torch.tensor(masks, dtype=torch.long)}
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt' or None")
        if isinstance(text, str):
            return {"input_ids": rows[0], "attention_mask": masks[0]}
        return {"input_ids": rows, "attention_mask": masks}


class OracleTextEncoder(nn.Module):
    """input_ids [B, L] -> (hidden [B, n_digits, 1],): the first token's caption id in base-256 digits."""

    def __init__(self, n_digits: int):
        super().__init__()
        self.n_digits = n_digits
        self.config = SimpleNamespace(model_type="oracle", hidden_size=1, n_digits=n_digits)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_):
        ids = input_ids[:, 0].long()
        if attention_mask is not None:
            ids = ids * (attention_mask[:, 0] != 0).long()
        p = BASE ** torch.arange(self.n_digits - 1, -1, -1, device=ids.device)
        digits = (ids[:, None] // p) % BASE
        return (digits.float().unsqueeze(-1),)


class OracleUNet(nn.Module):
    """forward(x_t, t, encoder_hidden_states) -> (eps,) of the exact posterior mean of the training set.

    ``images`` [N, C, H, W] in [-1, 1]; ``weights`` [K+1, N]: row 0 the unconditional duplication
    weight of each image (all pairs), row k the weight of image n under caption id k.
    """

    def __init__(self, images: torch.Tensor, weights: torch.Tensor, alphas_cumprod: torch.Tensor,
                 n_digits: int):
        super().__init__()
        n, c, h, w = images.shape
        if h != w:
            raise ValueError(f"images must be square, got {h}x{w}")
        self.config = SimpleNamespace(sample_size=h, in_channels=c, out_channels=c)
        # the adapter reads device/dtype from the first parameter; the data below are plain float64
        # attributes (not buffers) so that assemble's .to(dtype) never rounds them
        self.dummy = nn.Parameter(torch.zeros(1))
        self.n_digits = n_digits
        self._host = {"X": images.reshape(n, -1).double(),
                      "logW": weights.double().log(),          # -inf where an image is not in a caption
                      "alphas": alphas_cumprod.double()}
        self._host["yy"] = (self._host["X"] ** 2).sum(1)
        self._cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    def _data(self, device: torch.device) -> dict[str, torch.Tensor]:
        if device not in self._cache:
            self._cache[device] = {k: v.to(device) for k, v in self._host.items()}
        return self._cache[device]

    def decode_ids(self, emb: torch.Tensor) -> torch.Tensor:
        """[B, L, 1] digits -> [B] caption ids; anything that is not a known id maps to 0 (unconditional)."""
        digits = emb[:, :self.n_digits, 0].double().round().long()
        p = BASE ** torch.arange(self.n_digits - 1, -1, -1, device=emb.device)
        ids = (digits * p).sum(1)
        ok = (digits >= 0).all(1) & (digits < BASE).all(1) & (ids < self._host["logW"].shape[0])
        return torch.where(ok, ids, torch.zeros_like(ids))

    def alpha_bar(self, t, B: int, device: torch.device) -> torch.Tensor:
        """[B] float64 alpha-bar at t (a scalar or a [B] tensor of timesteps)."""
        return self._data(device)["alphas"][torch.as_tensor(t, device=device).long().reshape(-1).expand(B)]

    def posterior_mean(self, x_t: torch.Tensor, t, ids: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t, caption id] in float64, shape of x_t."""
        d = self._data(x_t.device)
        B = x_t.shape[0]
        ab = self.alpha_bar(t, B, x_t.device)
        a, s2 = ab.sqrt()[:, None], (1 - ab)[:, None]
        x = x_t.reshape(B, -1).double()
        d2 = ((x * x).sum(1, keepdim=True) - 2 * a * (x @ d["X"].T) + ab[:, None] * d["yy"]).clamp_min(0)
        logits = d["logW"][ids.to(x_t.device)] - d2 / (2 * s2)
        p = (logits - torch.logsumexp(logits, 1, keepdim=True)).exp()
        return (p @ d["X"]).reshape(x_t.shape)

    def forward(self, x_t: torch.Tensor, t, encoder_hidden_states: torch.Tensor, return_dict=False, **_):
        B = x_t.shape[0]
        ids = self.decode_ids(encoder_hidden_states)
        if ids.shape[0] != B:
            raise ValueError(f"{ids.shape[0]} embeddings for {B} latents")
        x0 = self.posterior_mean(x_t, t, ids)
        ab = self.alpha_bar(t, B, x_t.device).reshape(-1, *([1] * (x_t.dim() - 1)))
        eps = (x_t.double() - ab.sqrt() * x0) / (1 - ab).sqrt()
        out = eps.to(x_t.dtype)
        return (out,) if not return_dict else SimpleNamespace(sample=out)


def oracle_model(world: MemWorld, dtype: str = "float32", device: str = "cpu") -> DiffusionModel:
    """The oracle of ``world``'s training set as a ``DiffusionModel`` (name "oracle")."""
    weights = np.asarray(world.pair_weight, np.float64)
    if (weights < 0).any():
        raise ValueError("pair weights must be non-negative")
    ids = caption_ids(list(world.captions), weights)
    n_img = world.n_images
    W = np.zeros((len(ids) + 1, n_img))
    for cap, i, w in zip(world.captions, world.pair_image, weights):
        W[0, i] += w
        if cap in ids:
            W[ids[cap], i] += w
    sched = DDIMScheduler.from_config({k: v for k, v in SCHEDULER.items() if not k.startswith("_")})
    n_digits = _n_digits(len(ids))
    images = torch.from_numpy(np.asarray(world.images, np.float64)) * 2 - 1
    unet = OracleUNet(images, torch.from_numpy(W), sched.alphas_cumprod, n_digits)
    return assemble(unet, OracleTextEncoder(n_digits), OracleTokenizer(ids), SCHEDULER,
                    device=device, dtype=dtype, max_length=1, name="oracle")
