"""Ren et al. (ECCV 2024): entropy of the cross-attention over tokens (methods.md 8.1), LE and AE.

For the conditional CFG branch of THE sampling loop, a recording attention processor
(``baselines.detectors.cross_attention``, installed and restored through ``bench.core.patching``) reads
each cross-attention layer's probabilities over the L tokens, averaged over heads and query positions:
a-bar_l(t) in R^L for layer l (forward order: down, mid, up blocks) at step t. Entropy
E(a) = -sum_i a_i log a_i.

- ``mode="le"`` (layer entropy, Ren's mode "E"): score = E(a-bar_layer(0)), layer ``layer`` = 3 (the 4th
  cross-attention layer in forward order; SD v1/v2: ``down_blocks.1.attentions.1``) at the FIRST step;
  sampling stops after one step (``stop_after=1``). Rule for a model with fewer than ``layer + 1``
  cross-attention layers: the last one (recorded in ``params``; the organism and the tiny SD have 4, so
  index 3 = ``up_blocks.0.attentions.1`` there).
- ``mode="ae"`` (average entropy, Ren's mode "D"): with S = the last ``last_steps`` steps (default
  T // 5: steps 40-49 of 50) and a-bar(t) = the mean of a-bar_l(t) over all layers,
  score = mean_{t in S} E(a-bar(t)) + padding term, where E_pad(t) = -sum_{i >= eos} a-bar_i log a-bar_i
  (the summary / padding tokens from the end token on, not renormalised; eos = number of tokenizer ids
  incl. start and end - 1) and the padding term is
  ``padding_term="signed"`` (Ren's detect.py, the default): mean_{t in S} E_pad(t) - E_pad(0);
  ``"abs"`` (SAIL's write-up, our reading): mean_{t in S} |E_pad(t) - E_pad(0)|; ``"none"``: 0.
  As in Ren's code the layers are averaged BEFORE the entropy (``layer_average="attention"``);
  ``"entropy"`` averages the per-layer entropies instead (a variant, not Ren's).
Higher = more memorized (Ren's detect.py scores memorized prompts as positives without a sign flip:
memorized prompts spread attention away from the start token, raising the entropy). With ``n_gen``
generations (generation j from seed + j) the score is the mean of the per-generation scores. The
recording processor does not change the layers' output: the trajectory is the ordinary one.
Cost in UNet evaluations per prompt: LE 2 * n_gen (one CFG step); AE 2 * n_gen * total_steps.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from baselines.detectors.cross_attention import (StepGate, cross_attention_layers, entropy, eos_index,
                                                 recording)
from bench.core.model import DiffusionModel
from bench.core.sampling import StepInfo, sample

MODES = ("le", "ae")
PADDING_TERMS = ("signed", "abs", "none")
LAYER_AVERAGES = ("attention", "entropy")
LAYER_RULE = ("index `layer` in forward order (down, mid, up blocks); a model with fewer cross-attention "
              "layers uses its last one")


@dataclass
class AttentionEntropy:
    mode: str = "le"                 # "le" (first step, one layer) | "ae" (last T/5 steps, all layers)
    n_gen: int = 1
    total_steps: int = 50            # DDIM schedule length
    guidance: float = 7.5
    layer: int = 3                   # LE: cross-attention layer index in forward order
    last_steps: int | None = None    # AE: |S|, the last steps averaged (None: total_steps // 5, >= 1)
    padding_term: str = "signed"     # AE: "signed" (Ren's code) | "abs" (SAIL) | "none"
    layer_average: str = "attention" # AE: "attention" (entropy of the layer mean, Ren) | "entropy"
    batch_size: int = 64             # samples per UNet call
    name: str = "attention_entropy"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {MODES}")
        if self.padding_term not in PADDING_TERMS:
            raise ValueError(f"padding_term={self.padding_term!r} must be one of {PADDING_TERMS}")
        if self.layer_average not in LAYER_AVERAGES:
            raise ValueError(f"layer_average={self.layer_average!r} must be one of {LAYER_AVERAGES}")
        if self.n_gen < 1 or self.total_steps < 1 or self.layer < 0:
            raise ValueError("n_gen and total_steps must be >= 1 and layer >= 0")
        if self.last_steps is not None and not 1 <= self.last_steps <= self.total_steps:
            raise ValueError(f"last_steps={self.last_steps} must be in 1..total_steps={self.total_steps}")

    @property
    def steps(self) -> int:
        """Denoising steps run per generation (the leaderboard's cost column)."""
        return 1 if self.mode == "le" else self.total_steps

    @property
    def window(self) -> list[int]:
        """AE's S: indices of the last steps averaged."""
        k = self.last_steps or max(1, self.total_steps // 5)
        return list(range(self.total_steps - k, self.total_steps))

    def params(self) -> dict:
        p = {**asdict(self), "steps": self.steps, "branch": "conditional CFG rows only",
             "a_bar": "attention probabilities averaged over heads and query positions (float32)",
             "seeds": "seed + j for generation j (same for every prompt)",
             "aggregation": "mean over generations of the per-generation score"}
        if self.mode == "le":
            p["layer_rule"] = LAYER_RULE
            for k in ("last_steps", "padding_term", "layer_average"):
                p.pop(k)
        else:
            p.pop("layer")
            p["window"] = [self.window[0], self.window[-1]]
            p["padding_tokens"] = "from the end-token position on (eos = tokenizer ids incl. specials - 1)"
        return p

    def resolve_layers(self, model: DiffusionModel) -> list[str]:
        """The layers read: LE one (index ``layer``, or the last), AE all."""
        layers = cross_attention_layers(model.unet)
        return [layers[min(self.layer, len(layers) - 1)]] if self.mode == "le" else layers

    def trace(self, model: DiffusionModel, prompts: list[str], *, seed: int) -> dict[str, np.ndarray]:
        """Per prompt, generation and step [P, n_gen, steps] (NaN at steps not recorded): ``entropy``
        (LE: of the chosen layer; AE: of the layer mean, or the mean of layer entropies) and, for AE,
        ``padding`` (E_pad of the layer mean)."""
        P, n = len(prompts), self.n_gen
        layers = self.resolve_layers(model)
        wanted = {0} if self.mode == "le" else {0, *self.window}
        eos = torch.tensor(eos_index(model, prompts), device=model.device)
        ent = torch.full((P * n, self.steps), float("nan"), dtype=torch.float64)
        pad = ent.clone()
        rows, steps, e_vals, p_vals = [], [], [], []

        with recording(model, layers) as rec:
            gate = StepGate(rec, wanted, self.steps)

            def on_step(s: StepInfo) -> None:
                if rec.active:
                    a = rec.layer_mean(layers)                                   # [b, L]
                    if self.layer_average == "entropy" and self.mode == "ae":
                        e = torch.stack([entropy(rec.mean[n]) for n in layers]).mean(0)
                    else:
                        e = entropy(a)
                    L = a.shape[-1]
                    tail = torch.arange(L, device=a.device)[None] >= eos[s.prompt_idx.to(a.device)][:, None]
                    rows.append(s.sample_idx)
                    steps.append(s.i)
                    e_vals.append(e)
                    p_vals.append((torch.special.entr(a) * tail).sum(-1))
                gate.after(s.i)

            sample(model, prompts, [seed + j for j in range(n)], steps=self.total_steps, guidance=self.guidance,
                   on_step=on_step, stop_after=self.steps, batch_size=self.batch_size, decode=False)
        if rows:
            r = torch.cat(rows)
            t = torch.tensor(steps).repeat_interleave(torch.tensor([len(x) for x in rows]))
            ent[r, t] = torch.cat(e_vals).double().cpu()
            pad[r, t] = torch.cat(p_vals).double().cpu()
        out = {"entropy": ent.view(P, n, self.steps).numpy()}
        if self.mode == "ae":
            out["padding"] = pad.view(P, n, self.steps).numpy()
        return out

    def per_generation(self, model: DiffusionModel, prompts: list[str], *, seed: int) -> np.ndarray:
        """[P, n_gen] per-generation scores."""
        tr = self.trace(model, prompts, seed=seed)
        if self.mode == "le":
            return tr["entropy"][:, :, 0]
        S = self.window
        score = tr["entropy"][:, :, S].mean(axis=2)
        pad = tr["padding"]
        if self.padding_term == "signed":
            score = score + (pad[:, :, S].mean(axis=2) - pad[:, :, 0])
        elif self.padding_term == "abs":
            score = score + np.abs(pad[:, :, S] - pad[:, :, :1]).mean(axis=2)
        return score

    def score(self, model: DiffusionModel, prompts: list[str], *, seed: int) -> np.ndarray:
        return self.per_generation(model, prompts, seed=seed).mean(axis=1)
