"""Wen et al. (ICLR 2024) prompt-embedding optimisation at inference (methods.md 1c, ``wen_embed_opt``).

Per prompt, with the n seeds of its generations:
1. x_T from the seeds; t = the first DDIM timestep of the schedule (``optim_target_steps 0``).
2. Trainable: the conditional encoder output e [L, D], every position (EOS and padding included)
   except position 0 (BOS/CLS), whose gradient is zeroed (as in the repo, AdamW's decoupled weight
   decay still shrinks position 0 by (1 - lr*wd) per update: "frozen" is only gradient-frozen).
   e_empty is fixed.
3. Loss = || eps(x_T, e) - eps(x_T, e_empty) ||_2 as ONE Frobenius norm over the n-sample batch
   (so it grows ~sqrt(n) and l_target is n-dependent), the same x_T at every iteration.
4. torch AdamW (weight decay 0.01, the torch default the repo inherits; the paper says Adam),
   lr 0.05, at most 10 iterations; before each update, loss <= l_target stops (0 updates possible).
5. Generate with prompt_embeds = the optimised e (unconditional rows re-encoded from "").

Knob: ``strength = 1 / l_target`` so 0 is the identity (l_target = inf: no update) and larger is
stronger. The repo's l_target in {1..5} is calibrated to SD's 4x64x64 latents; the organism's
16x16x3 outputs give smaller norms, so its sweep is chosen from its measured loss range and the
l_target values are recorded with every row (``params``).

Batching (the same algorithm, equal up to float rounding of batched matmuls): prompts are optimised together, each with its own leaf
tensor in one AdamW; a prompt that has stopped gets ``grad = None``, which AdamW skips (no update,
no decay), so each prompt follows exactly its own single-prompt trajectory. Gradients are taken
with ``torch.autograd.grad`` w.r.t. the embeddings only: no UNet ``.grad`` is ever written.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from bench.contracts import GenSpec, Mitigator
from bench.core.model import DiffusionModel
from bench.core.sampling import SampleResult, sample


@dataclass
class EmbeddingOptimization(Mitigator):
    strength: float = 1 / 3
    lr: float = 0.05
    max_iters: int = 10
    weight_decay: float = 0.01
    name: ClassVar[str] = "embed_opt"
    strength_unit: ClassVar[str] = "1 / l_target"
    last_iters: list[int] = field(default_factory=list, repr=False)
    last_losses: list[float] = field(default_factory=list, repr=False)

    def __post_init__(self):
        if self.strength < 0:
            raise ValueError(f"embed_opt: strength = 1/l_target must be >= 0, got {self.strength}")

    @property
    def l_target(self) -> float:
        return math.inf if self.strength == 0 else 1.0 / self.strength

    def params(self) -> dict:
        return {**super().params(), "l_target": self.l_target, "target_step": 0, "frozen_positions": [0],
                "loss": "Frobenius norm over the n-seed batch", "optimizer": "torch.optim.AdamW"}

    def optimise(self, model: DiffusionModel, prompts: list[str], seeds: list[int], total_steps: int) -> torch.Tensor:
        """Optimised conditional embeddings [P, L, D] (model untouched)."""
        with torch.no_grad():
            e0 = model.encode(prompts).float()
            e_u = model.encode([""])
            x = model.init_latents(seeds)
            t = model.timesteps(total_steps)[0]
        P, n = len(prompts), len(seeds)
        embeds = [e0[k].clone().requires_grad_(True) for k in range(P)]
        opt = torch.optim.AdamW(embeds, lr=self.lr, weight_decay=self.weight_decay)
        active = list(range(P))
        iters = [0] * P
        final = [float("nan")] * P
        with torch.no_grad():
            eps_u = model.eps(x, t, e_u.expand(n, -1, -1))
        for it in range(self.max_iters + 1):
            if not active:
                break
            with torch.enable_grad():
                e = torch.stack([embeds[k] for k in active]).to(model.dtype)          # [A, L, D]
                xx = x.repeat(len(active), 1, 1, 1)
                eps_c = model.eps(xx, t, e.repeat_interleave(n, dim=0))
                diff = (eps_c - eps_u.repeat(len(active), 1, 1, 1)).float().view(len(active), -1)
                losses = diff.norm(dim=1)                                              # one norm per prompt
                keep = [j for j, k in enumerate(active) if losses[j].item() > self.l_target]
                for j, k in enumerate(active):
                    final[k] = losses[j].item()
                if it == self.max_iters or not keep:
                    break
                grads = torch.autograd.grad(losses[keep].sum(), [embeds[active[j]] for j in keep])
            for p in embeds:
                p.grad = None
            for j, g in zip(keep, grads):
                g = g.clone()
                g[0] = 0                                                               # BOS frozen
                embeds[active[j]].grad = g
                iters[active[j]] += 1
            opt.step()
            active = [active[j] for j in keep]
        self.last_iters, self.last_losses = iters, final
        return torch.stack([p.detach() for p in embeds]).to(model.dtype)

    def generate(self, model: DiffusionModel, prompts: list[str], seeds: list[int], spec: GenSpec,
                 *, seed: int = 0) -> SampleResult:
        if self.strength == 0:         # identity: exactly the plain path
            self.last_iters, self.last_losses = [0] * len(prompts), []
            return sample(model, prompts, seeds, steps=spec.steps, guidance=spec.guidance,
                          batch_size=spec.batch_size, decode=True)
        e = self.optimise(model, prompts, seeds, spec.steps)
        return sample(model, prompts, seeds, steps=spec.steps, guidance=spec.guidance,
                      batch_size=spec.batch_size, decode=True, prompt_embeds=e)
