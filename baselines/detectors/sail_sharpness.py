"""Jeon, Kim, No (ICML 2025): sharpness of the conditional-vs-unconditional score (methods.md 8.3).

At each of the first ``hvp_steps`` DDIM steps of the ordinary CFG trajectory (THE sampling loop,
``stop_after=hvp_steps``), for generation j with latent x = x_t^(j):

    score function   s(x) = -eps(x) / sigma_t,          sigma_t = sqrt(1 - alphabar_t)
    direction        s_D  = -(eps_c - eps_u) / sigma_t   (the text-conditional score difference)
    JVP              [H_c s_D, H_u s_D] = d/dh s_cfg(x + h s_D) at h = 0, where s_cfg is the CFG batch
                     (the UNet on [x, x] with [e_prompt, e_empty]) in score units
    value            v_t^(j) = || H_c s_D - H_u s_D ||_2   (L2 over the whole latent)

score(prompt) = mean over the hvp steps of the mean over the ``n_gen`` generations (the public code's
order: ``hvp_cont[i] = mean over images``, then mean over steps). Higher = more memorized.

Where the sigma factors go (recorded in ``params``): both the function differentiated and the direction
are in score units, exactly as the public code [S:local_model/pipe.py] (``score_func = -eps/beta_prod``,
``diff_score = -eps_diff/beta_prod``). With H = ds/dx = -J_eps/sigma_t this gives
v = || (J_eps_c - J_eps_u) (eps_c - eps_u) || / sigma_t**2: eps units times 1/sigma_t^2. At one step
this is a per-step constant (AUC-invariant); with ``hvp_steps > 1`` it weights steps by 1/sigma_t^2
(sigma_t is 0.998 at t = 981 on SD v1.4, so the weights stay close to 1 in the first steps).

Precision: the JVP runs in ``jvp_dtype`` (default float32, as the paper states). On a float32 model
the model's own UNet is used; otherwise a float32 copy of the UNet is made for the call (the model is
never cast in place; the copy holds the same bf16/fp16-valued weights). ``jvp_dtype: model`` runs the
JVP in the model's dtype. The public code keeps its bf16 UNet and wraps the JVP in
``torch.amp.autocast("cuda", dtype=torch.float32)``: autocast-eligible ops (conv, matmul) then run in
float32 on the upcast bf16 weights (torch's CUDA autocast branch does not reject float32), while ops
autocast leaves alone may stay in bf16; the float32 copy here is that computation with every op in
float32.
The direction s_D is read from the loop's own CFG outputs (model dtype), as the public code does.
Attention runs on PyTorch's math SDPA backend during the JVP (the fused kernels lack forward-mode AD;
the public code disables flash / mem-efficient SDPA for the same reason).

v-prediction models: the adapter converts v to eps first, so the score is -eps/sigma_t for every model.
The public code's SD v2 branch differentiates (sqrt(abar) v - x)/sigma^2 with x held fixed: the same
(J_c - J_u) direction and norm up to the per-step factor 1/sigma_t^2 (AUC-invariant at one step).

Cost, counted on ``model.counter`` (the runner's ``unet_evals``): per generation and hvp step, the loop's
CFG pass (2 rows), the JVP's primal CFG pass (2 rows, through the adapter) and its tangent pass (2 rows,
added by hand: forward-mode AD carries a second, tangent forward through the same layers), i.e.
6 UNet rows per generation per hvp step = 6 n k rows per prompt (Wen's first-step detector: 2 n).

Seeds: generation j of every prompt starts from ``seed + j`` (as ``noise_magnitude``; the public code
seeds every prompt with 42).
"""
from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch

from bench.core.model import DiffusionModel
from bench.core.sampling import StepInfo, sample

JVP_DTYPES = {"float32": torch.float32, "float64": torch.float64, "model": None}


def check_grid(n_gen: int, steps: int, total_steps: int, what: str = "steps") -> None:
    if not 1 <= steps <= total_steps:
        raise ValueError(f"{what}={steps} must be in 1..total_steps={total_steps}")
    if n_gen < 1:
        raise ValueError(f"n_gen must be >= 1, got {n_gen}")


def encode_cfg(model: DiffusionModel, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond [P, L, D], uncond [1, L, D]) in one text-encoder call, as ordinary (non-inference) tensors."""
    with torch.no_grad():
        both = model.encode([*prompts, ""])
    return both[:-1], both[-1:]


@contextmanager
def math_sdpa():
    """Scaled-dot-product attention on the math backend (forward-mode AD through attention)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:                                  # older torch: no backend switch needed there
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def jvp_model(model: DiffusionModel, dtype: torch.dtype | None) -> DiffusionModel:
    """The adapter whose UNet runs the JVP: the model itself, or a copy of its UNet in ``dtype`` that
    shares the model's counter (so its passes are counted like any other)."""
    if dtype is None or dtype == model.dtype:
        return model
    unet = copy.deepcopy(model.unet).to(dtype=dtype).eval().requires_grad_(False)
    return dataclasses.replace(model, unet=unet, counter=model.counter)


def sigma(model: DiffusionModel, t: int) -> float:
    """sigma_t = sqrt(1 - alphabar_t) of the model's DDIM schedule."""
    a = model.make_scheduler().alphas_cumprod[int(t)].double()
    return float((1 - a).sqrt())


@dataclass
class SailSharpness:
    n_gen: int = 1
    hvp_steps: int = 1             # first k DDIM steps whose value is averaged (public: hvp_sampling_num)
    total_steps: int = 50          # DDIM schedule the steps belong to
    guidance: float = 7.5          # CFG scale of the trajectory (matters only when hvp_steps > 1)
    batch_size: int = 64           # samples per UNet call (each carries a cond and an uncond row)
    jvp_dtype: str = "float32"     # float32 | float64 | model
    name: str = "sail_sharpness"

    def __post_init__(self):
        check_grid(self.n_gen, self.hvp_steps, self.total_steps, "hvp_steps")
        if self.jvp_dtype not in JVP_DTYPES:
            raise ValueError(f"jvp_dtype={self.jvp_dtype!r} must be one of {sorted(JVP_DTYPES)}")

    @property
    def steps(self) -> int:       # what the runner and leaderboards read as "steps"
        return self.hvp_steps

    def params(self) -> dict:
        return {**asdict(self), "steps": self.hvp_steps,
                "value": "||H_c s_D - H_u s_D||_2 over the whole latent, H = d(-eps/sigma_t)/dx, "
                         "s_D = -(eps_c - eps_u)/sigma_t",
                "sigma_factors": "score units for both the function and the direction (public code): "
                                 "= ||(J_c - J_u) delta|| / sigma_t^2",
                "jvp": "torch.func.jvp of the CFG batch UNet([x, x], [e_p, e_empty]), math SDPA backend",
                "direction_from": "the sampling loop's CFG outputs (model dtype)",
                "aggregation": "mean over gens, then over hvp steps",
                "unet_rows_per_gen_per_step": 6,
                "seeds": "seed + j for generation j (same for every prompt); public code: 42 for all",
                "deviations": "JVP on a jvp_dtype copy of the UNet (public: bf16 UNet under autocast(cuda, float32)); "
                              "v-prediction: score from the adapter's eps (public: 1/sigma^2 scale)"}

    def per_step(self, model: DiffusionModel, prompts: list[str], *, seed: int) -> np.ndarray:
        """[n_prompts, n_gen, hvp_steps] of ||H_c s_D - H_u s_D||_2."""
        P, n, k = len(prompts), self.n_gen, self.hvp_steps
        cond, uncond = encode_cfg(model, prompts)
        jm = jvp_model(model, JVP_DTYPES[self.jvp_dtype])
        jdt = jm.dtype
        out = torch.zeros(P * n, k, dtype=torch.float64)

        def on_step(s: StepInfo) -> None:
            with torch.inference_mode(False):
                sig = sigma(model, s.t)
                x = s.x_t.clone().to(jdt)                     # ordinary tensors (clone outside inference mode)
                s_d = -(s.eps_text.clone().to(jdt) - s.eps_uncond.clone().to(jdt)) / sig
                p = s.prompt_idx.to(cond.device)
                emb = torch.cat([cond[p], uncond.expand(len(p), -1, -1)]).to(jdt)
                t = torch.tensor(s.t, device=x.device)
                b = x.shape[0]

                def score_cfg(z: torch.Tensor) -> torch.Tensor:
                    return -jm.eps(torch.cat([z, z]), t, emb) / sig

                with math_sdpa():
                    _, hv = torch.func.jvp(score_cfg, (x,), (s_d,))
                model.counter.rows += 2 * b                   # the tangent pass (the primal was counted)
                model.counter.calls += 1
                out[s.sample_idx, s.i] = (hv[:b] - hv[b:]).flatten(1).double().norm(dim=1).cpu()

        sample(model, prompts, [seed + j for j in range(n)], steps=self.total_steps, guidance=self.guidance,
               on_step=on_step, stop_after=k, batch_size=self.batch_size, decode=False,
               prompt_embeds=cond, uncond_embeds=uncond.expand(P, -1, -1))
        return out.view(P, n, k).numpy()

    def score(self, model: DiffusionModel, prompts: list[str], *, seed: int) -> np.ndarray:
        return self.per_step(model, prompts, seed=seed).mean(axis=1).mean(axis=1)
