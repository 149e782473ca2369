"""Wen et al. (ICLR 2024): token-wise significance of a prompt for memorization (methods.md 1b).

At each target step t of ordinary CFG sampling, L_t = || eps(x_t, e_p) - eps(x_t, e_empty) ||_2 is one
norm over the n stacked generations (the detector's quantity, methods.md 1a, computed jointly). The
score of token i is || dL_t / d e_p[i] ||_2 (norm over the hidden dimension) with e_p the
text-encoder OUTPUT, averaged over the target steps. Higher = the token drives the text-conditional
noise (memorization) more. BOS/CLS, EOS/SEP and padding are dropped from the display.

Protocol choices (recorded in ``params``):
- Gradient path. ``bench.core.sampling.sample`` is THE loop and runs under ``torch.inference_mode``, so
  the gradient is taken inside its ``on_step`` callback: inference mode is switched off locally, the
  latents the loop saw are cloned into ordinary tensors, and the conditional rows are evaluated once
  more with a fresh leaf copy of e_p. That costs ``n_gen`` extra UNet rows (forward + backward) per
  target step on top of the loop's 2 * n_gen, instead of a second sampling loop. The trajectory is
  exactly the detector's.
- e_p is a leaf copy of the encoder output: the frozen text encoder is not differentiated through
  (Wen's repo does, since its encoder parameters require grad), which leaves dL/de_p unchanged.
- The gradient is w.r.t. one [1, L, D] e_p shared by the n generations, so it sums their
  contributions; Wen's repo differs by a constant factor, irrelevant for the ranking.
- Generation j starts from seed ``seed + j`` (as in ``NoiseMagnitude``). Only the first
  ``target_steps`` steps are run (the later ones cannot change the scores; early exit).
- ``swap_guidance_quirk`` (default off) reproduces Wen's public code: inside the target steps the
  cond/uncond rows are swapped when the CFG batch is assembled, so the latent update uses
  eps_c + w (eps_u - eps_c) = eps_u + (1 - w)(eps_c - eps_u), i.e. guidance 1 - w. L_t is symmetric,
  so the step-0 scores are unchanged; later steps follow a different (opposite-guidance) trajectory.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch

from bench.core.model import DiffusionModel, PromptError
from bench.core.sampling import StepInfo, sample


@dataclass
class TokenScores:
    """Per-token significance of one prompt; arrays are aligned with ``tokens`` (display order)."""

    prompt: str
    tokens: list[str]              # readable strings (tokenizer.decode of one id)
    raw_tokens: list[str]          # tokenizer vocabulary entries ('poster</w>', '##ing', ...)
    token_ids: list[int]
    positions: list[int]           # index in the encoder sequence (0 = BOS/CLS)
    scores: np.ndarray             # [T] mean over target steps of ||dL_t/de_p[i]||_2
    per_step: np.ndarray           # [k, T] the same per target step
    noise_norm_per_step: np.ndarray  # [k] L_t, joint L2 norm over the n generations
    seed: int
    params: dict = field(default_factory=dict)

    def ranking(self) -> np.ndarray:
        """Display indices by decreasing score (ties: earlier token first)."""
        return np.lexsort((np.arange(len(self.scores)), -self.scores))

    def to_frame(self) -> pd.DataFrame:
        rank = np.empty(len(self.scores), int)
        rank[self.ranking()] = np.arange(1, len(self.scores) + 1)
        return pd.DataFrame({"index": range(len(self.tokens)), "position": self.positions,
                             "token": self.tokens, "raw_token": self.raw_tokens, "token_id": self.token_ids,
                             "score": self.scores, "rank": rank})


@dataclass
class DisplayTokens:
    ids: list[int]
    raw: list[str]
    text: list[str]
    positions: list[int]


def display_tokens(model: DiffusionModel, prompt: str) -> DisplayTokens:
    """The prompt's own tokens as the encoder sees them (same padding/truncation as ``model.encode``),
    without BOS/EOS/padding; works for CLIP BPE (SD) and BERT WordPiece (organism) tokenizers."""
    if not isinstance(prompt, str):
        raise PromptError(f"prompt must be a string, got {type(prompt).__name__} ({prompt!r})")
    tok = model.tokenizer
    enc = tok([prompt], padding="max_length", max_length=model.max_length, truncation=True,
              return_special_tokens_mask=True)
    ids, special = enc["input_ids"][0], enc["special_tokens_mask"][0]
    attn = enc.get("attention_mask", [[1] * len(ids)])[0]
    pos = [i for i, (s, a) in enumerate(zip(special, attn)) if not s and a]
    if not pos:
        raise PromptError(f"prompt {prompt!r} has no tokens besides BOS/EOS/padding (empty or blank); "
                          "pass a prompt with at least one word")
    sel = [int(ids[i]) for i in pos]
    return DisplayTokens(sel, tok.convert_ids_to_tokens(sel), [tok.decode([i]).strip() for i in sel], pos)


@dataclass
class TokenSignificance:
    n_gen: int = 1                 # generations whose losses are stacked into one norm
    steps: int = 50                # DDIM schedule length
    target_steps: int = 50         # the first k steps whose gradients are averaged (notebook: all 50)
    guidance: float = 7.5
    swap_guidance_quirk: bool = False   # Wen's repo: opposite guidance during the target steps
    name: str = "token_significance"

    def __post_init__(self):
        if self.n_gen < 1:
            raise ValueError(f"n_gen must be >= 1, got {self.n_gen}")
        if not 1 <= self.target_steps <= self.steps:
            raise ValueError(f"target_steps={self.target_steps} must be in 1..steps={self.steps}")

    @property
    def trajectory_guidance(self) -> float:
        # swapped rows: eps_c + w (eps_u - eps_c) == eps_u + (1 - w)(eps_c - eps_u)
        return 1.0 - self.guidance if self.swap_guidance_quirk else self.guidance

    def params(self) -> dict:
        return {**asdict(self), "trajectory_guidance": self.trajectory_guidance,
                "loss": "L2 norm of eps_c - eps_u jointly over the n generations",
                "score": "L2 over hidden dim of dL/d(text-encoder output), mean over target steps",
                "seeds": "seed + j for generation j", "text_encoder_differentiated": False,
                "extra_unet_rows_per_target_step": self.n_gen}

    def explain(self, model: DiffusionModel, prompt: str, *, seed: int) -> TokenScores:
        shown = display_tokens(model, prompt)
        with torch.no_grad():
            e_p = model.encode([prompt]).detach()            # [1, L, D], an ordinary (non-inference) tensor
        k, n = self.target_steps, self.n_gen
        per_step = np.zeros((k, e_p.shape[1]), np.float64)
        norms = np.zeros(k, np.float64)

        def on_step(s: StepInfo) -> None:
            # sample() runs under inference_mode; gradients need it off, and inference tensors must be
            # cloned into ordinary ones before autograd may save them.
            with torch.inference_mode(False), torch.enable_grad():
                x, eps_u = s.x_t.clone(), s.eps_uncond.clone()
                e = e_p.clone().requires_grad_(True)
                eps_c = model.eps(x, s.t, e.expand(len(x), -1, -1))
                loss = (eps_c.float() - eps_u.float()).norm()
                (g,) = torch.autograd.grad(loss, e)
            per_step[s.i] = g[0].float().norm(dim=-1).double().cpu().numpy()
            norms[s.i] = float(loss.detach())

        sample(model, [prompt], [seed + j for j in range(n)], steps=self.steps,
               guidance=self.trajectory_guidance, on_step=on_step, stop_after=k, decode=False,
               prompt_embeds=e_p, batch_size=n)
        shown_steps = per_step[:, shown.positions]
        if not np.isfinite(shown_steps).all():
            raise FloatingPointError(f"non-finite token significance for prompt {prompt!r} (seed {seed}); "
                                     "check the model dtype (float32 is safest for gradients)")
        return TokenScores(prompt, shown.text, shown.raw, shown.ids, shown.positions,
                           shown_steps.mean(axis=0), shown_steps, norms, int(seed), self.params())
