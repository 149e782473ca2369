"""Reading the cross-attention of THE sampling loop: what the attention detectors share (issue 18).

``cross_attention_layers`` lists a UNet's cross-attention modules (``attn2``) in forward order: the
down blocks, the mid block, then the up blocks (SD v1/v2: 6 + 1 + 9 = 16 layers; the organism and the
tiny random SD of the tests: 1 + 1 + 2 = 4). ``recording`` installs a ``RecordingProcessor`` on the
chosen layers through ``bench.core.patching.attention_processors`` (restored exactly on exit, also on
error). The recording processor first computes, for the CONDITIONAL rows only, the attention
probabilities softmax(q k^T * attn.scale) in float32, then hands the call unchanged to the layer's
original processor: the layer's output, and so the sampling trajectory, is bit-identical to sampling
without recording. THE sampling loop puts the conditional rows first (``torch.cat([cond, uncond])``),
so the conditional rows are the first half of every UNet batch.

Per forward of an active recorder, per layer: ``mean[layer]`` [b, L] = the probabilities averaged over
heads and query positions (Ren et al.'s a-bar); with ``maps`` also ``maps[layer]`` [b, N, L] = averaged
over heads only (Chen et al.'s attention map; N = query positions). Only the latest forward is kept: a
detector reads them in its ``on_step`` callback, which the loop calls right after each UNet call.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch

from bench.core.model import DiffusionModel
from bench.core.patching import attention_processors

_ORDER = ("down_blocks.", "mid_block.", "up_blocks.")


def cross_attention_layers(unet: torch.nn.Module) -> list[str]:
    """Names of the cross-attention modules in forward order (down blocks, mid block, up blocks)."""
    found = [n for n, m in unet.named_modules()
             if n.endswith("attn2") and getattr(m, "is_cross_attention", False) and hasattr(m, "set_processor")]
    if not found:
        raise ValueError("the UNet has no cross-attention layers (attn2): attention detectors need an "
                         "SD-shaped UNet2DConditionModel")

    def rank(name: str) -> int:
        return next((k for k, p in enumerate(_ORDER) if name.startswith(p)), len(_ORDER))
    return sorted(found, key=rank)      # stable: named_modules order within a part is forward order


def down_block_top_layers(unet: torch.nn.Module) -> list[str]:
    """The cross-attention layers of the first down block that has any (the highest-resolution down-block
    cross-attention layers: SD v1/v2 ``down_blocks.0``, 64 x 64 queries, 2 layers; the organism
    ``down_blocks.2``, 4 x 4 queries, 1 layer)."""
    downs = [n for n in cross_attention_layers(unet) if n.startswith("down_blocks.")]
    if not downs:
        raise ValueError("the UNet has no cross-attention layer in its down blocks")
    first = downs[0].split(".")[1]
    return [n for n in downs if n.split(".")[1] == first]


def eos_index(model: DiffusionModel, prompts: list[str]) -> list[int]:
    """Position of the end token of each prompt in the encoder output: the number of tokenizer ids
    including the start and end tokens, minus 1 (Chen et al.'s ``len(tokenizer.encode(p)) - 1``), capped
    at ``max_length - 1`` for a truncated prompt (truncation keeps the end token last)."""
    return [min(n, model.max_length) - 1 for n in model.token_counts(list(prompts))]


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """-sum p log p along ``dim`` (0 log 0 = 0); ``p`` need not sum to 1 (partial sums are allowed)."""
    return torch.special.entr(p).sum(dim)


def grid_of(n_queries: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) grid of a layer's N query positions: the latent grid downsampled by an integer factor."""
    H, W = latent_hw
    f = max(1, round(math.sqrt(H * W / n_queries)))
    h, w = -(-H // f), -(-W // f)
    if h * w != n_queries:
        raise ValueError(f"{n_queries} query positions do not form a downsampled {H}x{W} grid")
    return h, w


def cond_attention_probs(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                         temb: torch.Tensor | None = None) -> torch.Tensor:
    """Attention probabilities [b, heads, N, L] (float32) of the given rows, as diffusers' Attention
    computes them before multiplying with the values (no attention mask: the loop passes none)."""
    h = hidden_states
    if attn.spatial_norm is not None:
        h = attn.spatial_norm(h, temb)
    if h.ndim == 4:
        b, c, hh, ww = h.shape
        h = h.view(b, c, hh * ww).transpose(1, 2)
    if attn.group_norm is not None:
        h = attn.group_norm(h.transpose(1, 2)).transpose(1, 2)
    enc = encoder_hidden_states
    if attn.norm_cross:
        enc = attn.norm_encoder_hidden_states(enc)
    q, k = attn.to_q(h), attn.to_k(enc)
    b, d = q.shape[0], k.shape[-1] // attn.heads
    q = q.view(b, -1, attn.heads, d).transpose(1, 2)
    k = k.view(b, -1, attn.heads, d).transpose(1, 2)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return (torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scale).softmax(dim=-1)


class CrossAttentionRecorder:
    """What the recording processors write: the latest forward's a-bar (and maps) per layer."""

    def __init__(self, layers: list[str], maps: set[str] | None = None):
        self.layers = list(layers)
        self.want_maps = set(maps or ())
        self.active = True
        self.mean: dict[str, torch.Tensor] = {}     # layer -> [b, L]
        self.maps: dict[str, torch.Tensor] = {}     # layer -> [b, N, L]
        self.calls = 0                              # recorded forwards (all layers)

    def record(self, name: str, attn, hidden_states, encoder_hidden_states, temb=None) -> None:
        b = hidden_states.shape[0] // 2                 # conditional rows first (THE sampling loop)
        probs = cond_attention_probs(attn, hidden_states[:b], encoder_hidden_states[:b],
                                     None if temb is None else temb[:b])
        heads_mean = probs.mean(dim=1)                  # [b, N, L]
        self.mean[name] = heads_mean.mean(dim=1)        # [b, L]
        if name in self.want_maps:
            self.maps[name] = heads_mean
        self.calls += 1

    def layer_mean(self, layers: list[str] | None = None) -> torch.Tensor:
        """a-bar averaged over ``layers`` (default all recorded) [b, L]."""
        return torch.stack([self.mean[n] for n in (layers or self.layers)]).mean(0)


class RecordingProcessor:
    """Records through ``recorder`` (when active and the call is cross-attention), then calls ``inner``,
    the layer's own processor, with the arguments unchanged."""

    def __init__(self, inner, recorder: CrossAttentionRecorder, name: str):
        self.inner, self.recorder, self.name = inner, recorder, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if self.recorder.active and encoder_hidden_states is not None:
            if attention_mask is not None:
                raise NotImplementedError("recording cross-attention with an attention mask is not supported")
            self.recorder.record(self.name, attn, hidden_states, encoder_hidden_states, kwargs.get("temb"))
        return self.inner(attn, hidden_states, *args, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=attention_mask, **kwargs)


@contextmanager
def recording(model: DiffusionModel, layers: list[str], maps: set[str] | None = None
              ) -> Iterator[CrossAttentionRecorder]:
    """Install recording processors on ``layers`` for the body (restored exactly on exit, also on error)."""
    rec = CrossAttentionRecorder(layers, maps)
    modules = dict(model.unet.named_modules())
    procs = {n: RecordingProcessor(modules[n].processor, rec, n) for n in layers}
    with attention_processors(model.unet, procs):
        yield rec


class StepGate:
    """Switches a recorder on only for the wanted step indices of each chunk's ``n_steps`` steps: call
    ``after(i)`` at the end of the ``on_step`` of step i (the loop calls on_step after the UNet call)."""

    def __init__(self, recorder: CrossAttentionRecorder, wanted: set[int], n_steps: int):
        self.recorder, self.wanted, self.n_steps = recorder, set(wanted), n_steps
        recorder.active = 0 in self.wanted

    def after(self, i: int) -> None:
        self.recorder.active = (i + 1) % self.n_steps in self.wanted
