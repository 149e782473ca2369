"""Wanda-style pruning of memorization weights (Chavhan et al., arXiv 2406.18566; ConceptPrune code).

methods.md section 6. Target layers: the second linear layer of every UNet transformer FFN
(``ff.net.2``; 16 on SD v1.x, 4 on the organism). During the first ``n_timesteps`` denoising calls of
THE sampling loop the input X of each target layer (the GEGLU output) is recorded per timestep; every
token row is L2-normalised across features and the column norm ||X_j||_2 is accumulated over tokens
and prompts. This is done for the memorized prompts ("target") and for the same number of empty
prompts "" ("base"), same seeds. Wanda score S_ij = |W_ij| * ||X_j||_2. Per timestep and layer, for each
output row i the top k = round(ratio * in_features) weights by target score are taken and only those
whose target score exceeds the base score are kept; the masks are united over the timesteps (a weight
is selected if it is in more than select_ratio * n_timesteps of them; select_ratio 0 = plain union).
Generation zeroes the selected weights through ``bench.core.patching.masked_weights`` (restored on exit;
the published method edits the weights permanently).

Choices where the code is not explicit (recorded in ``params()``): only the conditional CFG rows are
recorded (the unconditional rows are the same for target and base and would only dilute the
difference); all memorized prompts passed to ``fit`` form ONE group, i.e. one mask (the paper prunes
one model per group of 10-30 prompts: pass a group to ``fit``).

strength: ``ratio`` (ConceptPrune's skill_ratio, 0.01 published): the share of each output row's
weights that may be selected per timestep; 0 = identity (nothing pruned).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from bench.contracts import GenSpec, Mitigator
from bench.core.model import DiffusionModel
from bench.core.patching import forward_hooks, masked_weights
from bench.core.sampling import SampleResult, StepInfo, sample

TARGET_SUFFIX = "ff.net.2"


def ffn_out_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every transformer FFN's output projection ``...ff.net.2`` in module order."""
    found = {n: m for n, m in unet.named_modules()
             if n.endswith(TARGET_SUFFIX) and isinstance(m, torch.nn.Linear)}
    if not found:
        raise ValueError("the UNet has no transformer FFN output layers (*ff.net.2): Wanda pruning "
                         "needs an SD-shaped UNet2DConditionModel")
    return found


def input_norms(model: DiffusionModel, prompts: list[str], seeds: list[int], *, steps: int,
                guidance: float, n_timesteps: int, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """||X_j||_2 per layer and timestep: [n_timesteps, in_features], conditional rows only."""
    layers = ffn_out_layers(model.unet)
    acc = {n: torch.zeros(n_timesteps, m.in_features, dtype=torch.float64) for n, m in layers.items()}
    state = {"i": 0}

    def record(name: str):
        def fn(module, inputs, output):
            x = inputs[0]
            x = x[: x.shape[0] // 2].float()                   # [cond; uncond] -> cond rows
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            acc[name][state["i"]] += (x ** 2).sum(dim=tuple(range(x.dim() - 1))).double().cpu()
        return fn

    def on_step(info: StepInfo) -> None:
        state["i"] = (info.i + 1) % n_timesteps                # chunks restart at step 0

    with forward_hooks({m: record(n) for n, m in layers.items()}):
        sample(model, prompts, seeds, steps=steps, guidance=guidance, on_step=on_step,
               stop_after=n_timesteps, batch_size=batch_size, decode=False)
    return {n: a.sqrt().float() for n, a in acc.items()}


def top_k_per_row(ratio: float, in_features: int) -> int:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"pruning ratio (strength) must be in [0, 1], got {ratio}")
    return int(round(ratio * in_features))


def wanda_step_mask(weight: torch.Tensor, target_norm: torch.Tensor, base_norm: torch.Tensor,
                    ratio: float) -> torch.Tensor:
    """One timestep's mask [out, in]: per row the top-k target scores that beat the base score."""
    k = top_k_per_row(ratio, weight.shape[1])
    mask = torch.zeros(weight.shape, dtype=torch.bool)
    if k == 0:
        return mask
    w = weight.detach().abs().float().cpu()
    s_target, s_base = w * target_norm[None, :], w * base_norm[None, :]
    mask.scatter_(1, s_target.topk(k, dim=1).indices, True)
    return mask & (s_target > s_base)


def union_mask(step_masks: torch.Tensor, select_ratio: float = 0.0) -> torch.Tensor:
    """[T, out, in] -> [out, in]: selected in more than select_ratio * T timesteps."""
    return step_masks.sum(0) > select_ratio * step_masks.shape[0]


@dataclass
class WandaPrune(Mitigator):
    strength: float = 0.01               # top share of each output row per timestep (skill_ratio)
    n_timesteps: int = 10                # first denoising calls whose statistics are used (tau)
    select_ratio: float = 0.0            # 0 = plain union over the timesteps
    n_seeds: int = 1                     # seeds per prompt for the statistics (fit's seed, seed+1, ...)
    steps: int = 50                      # schedule of the statistics pass
    guidance: float = 7.5
    name: ClassVar[str] = "wanda_prune"
    strength_unit: ClassVar[str] = "top share of weights per output row and timestep"
    masks: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    _unet_id: int | None = field(default=None, init=False, repr=False)

    def params(self) -> dict:
        d = {"name": self.name, "strength_unit": self.strength_unit, "strength": self.strength,
             "n_timesteps": self.n_timesteps, "select_ratio": self.select_ratio, "n_seeds": self.n_seeds,
             "steps": self.steps, "guidance": self.guidance, "rows_recorded": "conditional",
             "groups": "one mask per fit() call"}
        if self.masks:
            d["sparsity_achieved"] = self.sparsity()
        return d

    def sparsity(self) -> float:
        """Share of the target layers' weights that are zeroed."""
        n = sum(int(m.sum()) for m in self.masks.values())
        return n / sum(m.numel() for m in self.masks.values())

    def fit(self, model: DiffusionModel, *, memorized: list[str], reference: list[str], seed: int = 0) -> None:
        """Masks from the memorized prompts vs the empty prompt; ``reference`` is not used (as in the code)."""
        top_k_per_row(self.strength, 1)
        if not memorized:
            raise ValueError("WandaPrune.fit needs at least one memorized prompt")
        if not 1 <= self.n_timesteps <= self.steps:
            raise ValueError(f"n_timesteps={self.n_timesteps} must be in [1, steps={self.steps}]")
        seeds = [seed + j for j in range(self.n_seeds)]
        kw = dict(steps=self.steps, guidance=self.guidance, n_timesteps=self.n_timesteps)
        target = input_norms(model, list(memorized), seeds, **kw)
        base = input_norms(model, [""] * len(memorized), seeds, **kw)
        layers = ffn_out_layers(model.unet)
        self.masks = {}
        for n, m in layers.items():
            steps = torch.stack([wanda_step_mask(m.weight, target[n][t], base[n][t], self.strength)
                                 for t in range(self.n_timesteps)])
            self.masks[n] = union_mask(steps, self.select_ratio)
        self._unet_id = id(model.unet)

    def generate(self, model: DiffusionModel, prompts: list[str], seeds: list[int], spec: GenSpec,
                 *, seed: int = 0) -> SampleResult:
        if self.strength == 0:
            return super().generate(model, prompts, seeds, spec, seed=seed)
        if not self.masks or id(model.unet) != self._unet_id:
            raise RuntimeError("WandaPrune.fit(model, memorized=...) must run on this model before generate")
        layers = ffn_out_layers(model.unet)
        with masked_weights({layers[n].weight: m for n, m in self.masks.items()}):
            return sample(model, prompts, seeds, steps=spec.steps, guidance=spec.guidance,
                          batch_size=spec.batch_size, decode=True)
