"""THE classifier-free-guidance sampling loop (DDIM, eta 0).

Samples are (prompt, seed) pairs: prompts x seeds in row-major order (sample k = prompt k // n_seeds,
seed k % n_seeds). Each UNet call carries the conditional and unconditional rows of up to
``batch_size`` samples. x_T depends only on the seed, and every operation is per-row, so a sample's
trajectory does not depend on which other samples share its batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from bench.core.hardware import fit_batch_size
from bench.core.model import DiffusionModel


@dataclass
class StepInfo:
    i: int                      # step index, 0 = first denoising step (t = T)
    t: int                      # scheduler timestep
    x_t: torch.Tensor           # [b, *latent] latents the UNet saw
    eps_text: torch.Tensor      # [b, *latent] eps(x_t, e_p)
    eps_uncond: torch.Tensor    # [b, *latent] eps(x_t, e_empty)
    sample_idx: torch.Tensor    # [b] indices into the prompts x seeds grid
    prompt_idx: torch.Tensor    # [b]
    seed: torch.Tensor          # [b]


@dataclass
class SampleResult:
    x: torch.Tensor             # [N, *latent] final latents (x_0 after the last step run)
    images: torch.Tensor | None # [N, 3, H, W] in [0, 1] when decode=True
    prompt_idx: torch.Tensor
    seeds: torch.Tensor
    steps_run: int
    unet_rows: int              # sample rows through the UNet in this call
    batch_size: int | None = None  # samples per UNet call actually used (after the memory fit on CUDA)


def sample(model: DiffusionModel, prompts: list[str], seeds: list[int], *, steps: int = 50,
           guidance: float = 7.5, on_step: Callable[[StepInfo], None] | None = None,
           stop_after: int | None = None, batch_size: int = 64, decode: bool = True,
           prompt_embeds: torch.Tensor | None = None, uncond_embeds: torch.Tensor | None = None,
           progress: bool = False) -> SampleResult:
    """Run CFG sampling for every (prompt, seed); eps_hat = eps_u + guidance * (eps_c - eps_u).

    ``prompt_embeds`` [P, L, D] replaces the encoder output of ``prompts`` (prompt-side mitigators);
    ``uncond_embeds`` [P, L, D] replaces the unconditional embedding per prompt (default: encode("")).
    ``stop_after=k`` runs only the first k steps (the latents returned are then x_{t_k}).
    """
    if len(seeds) == 0:
        raise ValueError("seeds is empty: pass at least one seed")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_steps = steps if stop_after is None else min(int(stop_after), steps)
    if n_steps < 1:
        raise ValueError(f"stop_after must be >= 1, got {stop_after}")
    batch_size = fit_batch_size(model, batch_size)   # CPU: as given; CUDA: capped to free memory
    with torch.inference_mode():
        return _run(model, prompts, seeds, steps, guidance, on_step, n_steps, batch_size, decode,
                    prompt_embeds, uncond_embeds, progress)


def _run(model, prompts, seeds, steps, guidance, on_step, n_steps, batch_size, decode, prompt_embeds,
         uncond_embeds, progress) -> SampleResult:
    start_rows = model.counter.rows
    if prompt_embeds is None and uncond_embeds is None and isinstance(prompts, (list, tuple)) and prompts:
        both = model.encode([*prompts, ""])      # one text-encoder call (rows are independent)
        cond, uncond = both[:-1], both[-1:]
    else:
        cond = model.encode(prompts) if prompt_embeds is None else prompt_embeds.to(model.device, model.dtype)
        uncond = model.encode([""]) if uncond_embeds is None else uncond_embeds.to(model.device, model.dtype)
    if cond.shape[0] != len(prompts):
        raise ValueError(f"prompt_embeds has {cond.shape[0]} rows for {len(prompts)} prompts")
    if uncond_embeds is not None and uncond.shape[0] != len(prompts):
        raise ValueError(f"uncond_embeds has {uncond.shape[0]} rows for {len(prompts)} prompts")
    P, S = len(prompts), len(seeds)
    prompt_idx = torch.arange(P).repeat_interleave(S)
    seed_t = torch.tensor([int(s) for s in seeds]).repeat(P)
    scheduler = model.make_scheduler()
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps[:n_steps]
    t_dev = timesteps.to(model.device)           # moved once: no host-device copy (sync) per step
    x_all = torch.empty((P * S, *model.latent_shape), device=model.device, dtype=model.dtype)
    chunks = list(range(0, P * S, batch_size))
    bar = tqdm(total=len(chunks) * n_steps, desc="sampling", disable=not progress, leave=False)
    for c0 in chunks:
        c1 = min(c0 + batch_size, P * S)
        idx = torch.arange(c0, c1)
        b = len(idx)
        x = model.init_latents(seed_t[idx].tolist())
        p_dev = prompt_idx[idx].to(model.device)   # once per chunk, not per step
        u = uncond.expand(b, -1, -1) if uncond_embeds is None else uncond[p_dev]
        e = torch.cat([cond[p_dev], u])
        for i, t in enumerate(timesteps):
            out = model.eps(torch.cat([x, x]), t_dev[i], e)
            eps_c, eps_u = out[:b], out[b:]
            if on_step is not None:
                on_step(StepInfo(i, int(t), x, eps_c, eps_u, idx, prompt_idx[idx], seed_t[idx]))
            eps_hat = eps_u + guidance * (eps_c - eps_u)
            x = scheduler.step(eps_hat, t, x, eta=0.0, return_dict=False)[0]
            bar.update(1)
        x_all[c0:c1] = x
    bar.close()
    images = model.decode(x_all) if decode and n_steps == steps else None
    return SampleResult(x_all, images, prompt_idx, seed_t, n_steps, model.counter.rows - start_rows,
                        batch_size)
