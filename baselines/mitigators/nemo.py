"""NeMo (Hintersdorf et al., NeurIPS 2024): localise memorization neurons per prompt and deactivate them.

methods.md section 5. Search space: output channels of the cross-attention value projections
(``attn2.to_v``) of the down blocks and the mid block (up blocks are not searched): 7 layers / 5,760
neurons on SD v1.x, 2 layers / 128 neurons on the organism. A neuron's activation for prompt p is
a_i(p) = mean over token positions of |to_v(e_p)|_i (independent of latent and timestep).

``fit`` computes mu_i, sigma_i of a_i over the ``reference`` (non-memorized) prompts and, unless
``tau_mem`` is given, the memorization threshold tau_mem = mean + 1 std over those prompts of the max
pairwise MS-SSIM of their noise differences (how NeMo's 0.428 was derived; the SD value does not
transfer to another model). It then localises every ``memorized`` prompt (``localise``):
1. delta maps for n_seeds latents (``nemo_signal``); keep seeds whose max MS-SSIM to the others
   exceeds tau_mem; none -> not memorized, empty set.
2. initial selection: theta from 5, k from 0; candidates per layer = {|a_i - mu_i| / sigma_i > theta}
   union top-k by a_i; deactivate, recompute delta on the kept seeds; while max over seeds of
   MS-SSIM(delta_unblocked, delta_blocked) > tau_mem: theta -= 0.25 (floor 1), k += 1. As in the
   release (3_detect_memorized_neurons.py), the exit test comes right after that update: once a
   failing step brings theta to 1 (or k to the widest layer) the loop stops WITHOUT evaluating the new
   (theta, k); the selection kept is the last one evaluated (theta = 1.25, k = 15 with the defaults)
   and the refinement threshold is its SSIM. Otherwise (SSIM <= tau_mem) the threshold is tau_mem.
3. refinement (release ``neuron_refinement``): (i) layers in REVERSE forward order (last searched
   layer first: mid block, then the down blocks from the deepest), re-activate a layer's candidates,
   drop the layer if the SSIM stays below the threshold; (ii) again layers in reverse order, and within
   a layer the candidates in the release's list order (z-score outliers by channel index, then the
   top-k by activation, a neuron in both listed twice), re-activate one entry, drop it if the SSIM
   stays below the threshold.
Before this port (recorded for comparing earlier results): the capped loop evaluated and kept the
theta = 1 (k = 16) selection, and stage (ii) walked the layers in forward order (sorted names) with the
channels ascending; stage (i) already walked them in reverse.

``generate`` deactivates each prompt's own neurons in one batched sampling call: a forward hook on
each searched ``to_v`` reads the text-embedding rows it receives, identifies each sample's prompt by
exact equality with the prompt embeddings handed to ``sample`` and scales those channels, for the
conditional and the unconditional row of the sample alike (NeMo blocks both CFG branches).

strength: the deactivation depth, channel output multiplied by (1 - strength); 1 = NeMo (scaling
factor 0), 0 = identity (plain ``sample``, nothing localised). The localisation itself does not depend
on it. NeMo-C (methods.md 7c) builds on ``union_neurons`` and overrides ``neurons_for``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, ClassVar

import torch

from bench.contracts import GenSpec, Mitigator
from baselines.mitigators.nemo_signal import (SignalConfig, initial_noise, ms_ssim, noise_diff,
                                              pairwise_max_ssim, signal_timestep)
from bench.core.model import DiffusionModel
from bench.core.patching import forward_hooks
from bench.core.sampling import SampleResult, sample

Neurons = frozenset[tuple[str, int]]      # {(to_v layer name, output channel)}
SEARCH_SPACES = {"down_mid": ("down_blocks.", "mid_block."),                  # NeMo
                 "all": ("down_blocks.", "mid_block.", "up_blocks.")}         # deviation, recorded
STD_FLOOR = 1e-8                          # sigma of a constant neuron; recorded in params()
RELEASE_RULES = {                         # how localise follows the public release; recorded in params()
    "selection_kept": ("last evaluated: a failing step lowers theta by theta_step and raises k by 1, then "
                       "the loop stops once theta <= theta_min or k >= the widest layer WITHOUT evaluating "
                       "that (theta, k); the kept selection is theta_min + theta_step's (release: theta = 1.25, "
                       "k = 15) and its SSIM is the refinement threshold (else tau_mem); theta is floored at "
                       "theta_min where the release tests theta == 1 exactly (the same for 5 / 0.25 / 1)"),
    "refinement_layer_order": ("reverse forward order (mid block, then down blocks deepest first) in both the "
                               "layer-wise and the neuron-wise stage (release)"),
    "refinement_neuron_order": ("within a layer the release's list order: z-score outliers by channel, then "
                                "top-k by activation (a neuron in both listed twice, list.remove semantics)"),
    "localise_rule_version": 2,           # 1: kept the theta = 1 selection, neuron-wise stage in forward order
}


def value_layers(unet: torch.nn.Module, space: str = "down_mid") -> dict[str, torch.nn.Linear]:
    """The search space: ``attn2.to_v`` of the down blocks, then the mid block (then, for
    ``space="all"``, the up blocks: not NeMo's space, an option for models that keep memorization
    there), in forward order."""
    if space not in SEARCH_SPACES:
        raise ValueError(f"search space {space!r} is unknown; use one of {sorted(SEARCH_SPACES)}")
    found = {n: m for n, m in unet.named_modules()
             if n.endswith("attn2.to_v") and n.startswith(SEARCH_SPACES[space])}
    if not found:
        raise ValueError(f"the UNet has no cross-attention value layers ({space}: attn2.to_v): NeMo "
                         "needs an SD-shaped UNet2DConditionModel")
    order = {p: k for k, p in enumerate(("down_blocks.", "mid_block.", "up_blocks."))}
    return dict(sorted(found.items(), key=lambda kv: order[kv[0].split(".")[0] + "."]))


@torch.inference_mode()
def activations(model: DiffusionModel, prompts: list[str], space: str = "down_mid",
                batch_size: int = 256) -> dict[str, torch.Tensor]:
    """a_i(p) per layer: [P, width] float32 = mean over tokens of |to_v(e_p)|."""
    layers = value_layers(model.unet, space)
    out: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    for i in range(0, len(prompts), batch_size):
        emb = model.encode(prompts[i:i + batch_size])
        for n, m in layers.items():
            out[n].append(m(emb).abs().float().mean(1).cpu())
    return {n: torch.cat(v) for n, v in out.items()}


@dataclass
class ActivationStats:
    mean: dict[str, torch.Tensor]        # mu_i per layer [width]
    std: dict[str, torch.Tensor]         # sigma_i per layer [width] (floored at STD_FLOOR)
    n_prompts: int

    @classmethod
    def of(cls, model: DiffusionModel, reference: list[str], space: str = "down_mid") -> "ActivationStats":
        if len(reference) < 2:
            raise ValueError(f"NeMo statistics need >= 2 non-memorized reference prompts, got {len(reference)}")
        a = activations(model, reference, space)
        return cls({n: v.mean(0) for n, v in a.items()},
                   {n: v.std(0).clamp_min(STD_FLOOR) for n, v in a.items()}, len(reference))


@dataclass
class Localisation:
    prompt: str
    neurons: Neurons                     # refined memorization neurons S(p); empty if not memorized
    memorized: bool                      # passed step 1 (some seed's max pairwise SSIM > tau_mem)
    n_kept_seeds: int
    ssim_unblocked: float                # max over seeds of the max pairwise MS-SSIM (step 1)
    ssim_blocked: float                  # max over kept seeds of MS-SSIM(unblocked, blocked by S(p))
    n_initial: int                       # candidates after the initial selection
    theta: float                         # theta and k of the kept initial selection (the last one
    k: int                               #   evaluated; 1.25 / 15 when the release's cap is reached)
    threshold: float                     # refinement threshold (tau_mem, or the SSIM reached at the cap)
    unet_rows: int                       # UNet sample rows this localisation cost

    def by_layer(self) -> dict[str, list[int]]:
        return neurons_by_layer(self.neurons)


def neurons_by_layer(neurons: Neurons) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for layer, i in sorted(neurons):
        out.setdefault(layer, []).append(i)
    return out


def channel_scale_hook(scale: torch.Tensor) -> Callable:
    """Forward hook multiplying a Linear's output channels by ``scale`` [width] for every row."""
    def hook(module, inputs, output):
        return output * scale.to(output.device, output.dtype)
    return hook


def _scales(layers: dict[str, torch.nn.Linear], neurons: Neurons, factor: float) -> dict[str, torch.Tensor]:
    s = {n: torch.ones(m.out_features) for n, m in layers.items()}
    for layer, i in neurons:
        if layer not in s or not 0 <= i < len(s[layer]):
            raise ValueError(f"neuron ({layer!r}, {i}) is outside the NeMo search space of this UNet")
        s[layer][i] = factor
    return s


def blocked(model: DiffusionModel, neurons: Neurons, factor: float = 0.0):
    """Context manager: ``neurons`` scaled by ``factor`` for every row (single-prompt searches)."""
    layers = value_layers(model.unet, "all")
    scales = _scales(layers, neurons, factor)
    return forward_hooks({layers[n]: channel_scale_hook(s) for n, s in scales.items() if (s != 1).any()})


@torch.inference_mode()
def localise(model: DiffusionModel, prompt: str, stats: ActivationStats, tau_mem: float,
             cfg: SignalConfig = SignalConfig(), *, theta_start: float = 5.0, theta_step: float = 0.25,
             theta_min: float = 1.0) -> Localisation:
    """NeMo's per-prompt localisation (steps 1-3 in the module doc)."""
    rows0 = model.counter.rows
    layers = {n: m for n, m in value_layers(model.unet, "all").items() if n in stats.mean}
    emb = model.encode([prompt])
    a = {n: m(emb).abs().float().mean(1)[0].cpu() for n, m in layers.items()}
    z = {n: (a[n] - stats.mean[n]).abs() / stats.std[n] for n in layers}
    x_T, t = initial_noise(model, cfg), signal_timestep(model, cfg)
    d0 = noise_diff(model, emb, x_T, t)
    pm = pairwise_max_ssim(d0, cfg)
    keep = pm > tau_mem
    base = dict(prompt=prompt, n_kept_seeds=int(keep.sum()), ssim_unblocked=float(pm.max()))
    if not keep.any():
        return Localisation(neurons=frozenset(), memorized=False, ssim_blocked=float(pm.max()), n_initial=0,
                            theta=theta_start, k=0, threshold=tau_mem,
                            unet_rows=model.counter.rows - rows0, **base)
    x_k, d0_k = x_T[keep], d0[keep]
    memo: dict[Neurons, float] = {}

    def ssim_with(neurons: Neurons) -> float:
        """max over kept seeds of MS-SSIM(delta unblocked, delta with ``neurons`` blocked); memoised
        (deterministic), so the release's no-op re-tests of a duplicated entry cost nothing."""
        if not neurons:
            return 1.0
        if neurons not in memo:
            with blocked(model, neurons):
                d = noise_diff(model, emb, x_k, t)
            memo[neurons] = float(ms_ssim(d0_k, d, cfg).max())
        return memo[neurons]

    def select(theta: float, k: int) -> dict[str, list[int]]:
        """Per layer, in the release's list order: z-score outliers by channel, then top-k by a_i
        (a neuron in both appears twice, as in the release's ``initial_neuron_selection``)."""
        return {n: [int(i) for i in torch.nonzero(z[n] > theta).flatten()]
                + [int(i) for i in torch.topk(a[n], min(k, len(a[n]))).indices] for n in layers}

    def as_set(sel: dict[str, list[int]]) -> Neurons:
        return frozenset((n, i) for n, idx in sel.items() for i in idx)

    max_width = max(m.out_features for m in layers.values())
    theta, k = theta_start, 0
    while True:                                 # release: 3_detect_memorized_neurons.py
        sel, sel_theta, sel_k = select(theta, k), theta, k
        s = ssim_with(as_set(sel))
        if s > tau_mem:
            if theta > theta_min:
                theta = max(theta - theta_step, theta_min)
            k += 1
        if theta <= theta_min or k >= max_width:
            threshold = s                       # the cap: the last evaluated selection and its SSIM
            break
        if s <= tau_mem:
            threshold = tau_mem
            break
    n_initial = len(as_set(sel))
    order = list(reversed(list(layers)))        # reverse forward order (layers is in forward order)
    current = {n: list(sel[n]) for n in layers}
    for n in order:                             # (i) layer-wise
        if current[n] and ssim_with(as_set({**current, n: []})) < threshold:
            current[n] = []
    for n in order:                             # (ii) entry by entry within the remaining layers
        for i in list(current[n]):
            trial = list(current[n])
            trial.remove(i)                     # the first occurrence, as list.remove in the release
            if ssim_with(as_set({**current, n: trial})) < threshold:
                current[n] = trial
    final = as_set(current)
    return Localisation(neurons=final, memorized=True, ssim_blocked=ssim_with(final), n_initial=n_initial,
                        theta=sel_theta, k=sel_k, threshold=threshold, unet_rows=model.counter.rows - rows0,
                        **base)


@torch.inference_mode()
def tau_from_reference(model: DiffusionModel, reference: list[str], cfg: SignalConfig) -> float:
    """mean + 1 std over prompts of the max pairwise MS-SSIM of their delta maps (NeMo's tau_mem rule)."""
    x_T, t = initial_noise(model, cfg), signal_timestep(model, cfg)
    emb = model.encode(reference)
    vals = torch.stack([pairwise_max_ssim(noise_diff(model, emb[i:i + 1], x_T, t), cfg).max()
                        for i in range(len(reference))])
    return float(vals.mean() + vals.std())


class _RowScaler:
    """Per-row deactivation: identifies each sample's prompt by its exact text-embedding rows."""

    def __init__(self, emb: torch.Tensor, scales: dict[str, torch.Tensor]):
        self.emb = emb.flatten(1)                                    # [P, L*D]
        stride = max(1, self.emb.shape[1] // 512)
        self.probe = slice(None, None, stride)
        self.scales = scales                                         # layer -> [P, width]

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        n2 = x.shape[0]
        if n2 % 2:
            raise RuntimeError("NeMo's per-prompt hook expects sample()'s [cond; uncond] batch layout "
                               f"(an even number of rows), got {n2} rows")
        cond, uncond = x[: n2 // 2].flatten(1), x[n2 // 2:].flatten(1)
        eq = (cond[:, None, self.probe] == self.emb[None, :, self.probe].to(x.device)).all(-1)
        idx = eq.float().argmax(1)
        ok = eq.any(1) & (cond == self.emb.to(x.device)[idx]).all(1)
        if not bool(ok.all()) or not bool((uncond == uncond[:1]).all()):
            raise RuntimeError("NeMo's per-prompt hook could not match the batch rows to the prompts: "
                               "the first half must be the prompt embeddings passed to sample(), the "
                               "second half the unconditional embedding")
        return idx.repeat(2)

    def hook(self, layer: str) -> Callable:
        def fn(module, inputs, output):
            s = self.scales[layer].to(output.device, output.dtype)[self.rows(inputs[0])]
            return output * s[:, None, :]
        return fn


def deactivated_sample(model: DiffusionModel, prompts: list[str], seeds: list[int], spec: GenSpec,
                       neurons: list[Neurons], factor: float) -> SampleResult:
    """THE sampling loop with ``neurons[k]`` scaled by ``factor`` for the samples of ``prompts[k]``."""
    if len(neurons) != len(prompts):
        raise ValueError(f"got {len(neurons)} neuron sets for {len(prompts)} prompts")
    layers = value_layers(model.unet, "all")
    with torch.inference_mode():
        emb = model.encode(prompts)
    per_prompt = [_scales(layers, s, factor) for s in neurons]
    keys = {}
    for p, e in enumerate(emb.flatten(1)):     # one embedding must mean one neuron set
        key = e.cpu().numpy().tobytes()
        if key in keys and neurons[keys[key]] != neurons[p]:
            raise ValueError(f"prompts {prompts[keys[key]]!r} and {prompts[p]!r} have identical "
                             "embeddings but different neuron sets")
        keys.setdefault(key, p)
    scales = {n: torch.stack([s[n] for s in per_prompt]) for n in layers}
    scaler = _RowScaler(emb, scales)
    hooks = {layers[n]: scaler.hook(n) for n, s in scales.items() if (s != 1).any()}
    with forward_hooks(hooks):
        return sample(model, prompts, seeds, steps=spec.steps, guidance=spec.guidance,
                      batch_size=spec.batch_size, decode=True, prompt_embeds=emb)


@dataclass
class NeMo(Mitigator):
    strength: float = 1.0                # deactivation depth: outputs x (1 - strength); 1 = NeMo
    theta_start: float = 5.0
    theta_step: float = 0.25
    theta_min: float = 1.0
    tau_mem: float | None = None         # None: calibrated in fit() from the reference prompts
    n_tau_prompts: int = 64              # reference prompts used to calibrate tau_mem
    n_seeds: int = 10
    signal_seed: int = 1                 # generator seed = signal_seed + fit's seed (seed 0 -> NeMo's 1)
    ssim_kernel: int = 11
    search_space: str = "down_mid"       # NeMo; "all" adds the up blocks (a recorded deviation)
    name: ClassVar[str] = "nemo"
    strength_unit: ClassVar[str] = "deactivation depth (1 - channel scale)"
    stats: ActivationStats | None = field(default=None, init=False, repr=False)
    localisations: dict[str, Localisation] = field(default_factory=dict, init=False, repr=False)
    tau_used: float | None = field(default=None, init=False, repr=False)
    _seed: int = field(default=0, init=False, repr=False)
    _unet_id: int | None = field(default=None, init=False, repr=False)
    _map_px: int = field(default=0, init=False, repr=False)

    def signal(self) -> SignalConfig:
        return SignalConfig(n_seeds=self.n_seeds, generator_seed=self.signal_seed + self._seed,
                            kernel_size=self.ssim_kernel)

    def params(self) -> dict:
        d = {k: v for k, v in asdict(self).items()
             if k not in ("stats", "localisations", "tau_used", "_seed", "_unet_id", "_map_px")}
        d.update(name=self.name, strength_unit=self.strength_unit, tau_mem_used=self.tau_used,
                 std_floor=STD_FLOOR, n_reference=self.stats.n_prompts if self.stats else 0, **RELEASE_RULES)
        if self._unet_id is not None:
            d["ssim_kernel_used"] = list(self.signal().kernel_for(self._map_px))
        return d

    def fit(self, model: DiffusionModel, *, memorized: list[str], reference: list[str], seed: int = 0) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"NeMo strength must be in [0, 1] (deactivation depth), got {self.strength}")
        self._seed, self._unet_id = int(seed), id(model.unet)
        self._map_px = min(model.latent_shape[1:])
        self.localisations = {}
        self.stats = ActivationStats.of(model, list(reference), self.search_space)
        self.tau_used = (float(self.tau_mem) if self.tau_mem is not None else
                         tau_from_reference(model, list(reference)[: self.n_tau_prompts], self.signal()))
        self.localise(model, list(memorized))

    def _check(self, model: DiffusionModel) -> None:
        if self.stats is None:
            raise RuntimeError("NeMo.fit(model, memorized=..., reference=...) must run before localising "
                               "or generating (it computes the activation statistics and tau_mem)")
        if id(model.unet) != self._unet_id:
            raise RuntimeError("NeMo was fitted on another model; call fit() again with this one")

    def localise(self, model: DiffusionModel, prompts: list[str]) -> list[Localisation]:
        """Per-prompt localisation, cached by prompt text."""
        self._check(model)
        for p in dict.fromkeys(prompts):
            if p not in self.localisations:
                self.localisations[p] = localise(model, p, self.stats, self.tau_used, self.signal(),
                                                 theta_start=self.theta_start, theta_step=self.theta_step,
                                                 theta_min=self.theta_min)
        return [self.localisations[p] for p in prompts]

    def union_neurons(self, model: DiffusionModel, prompts: list[str]) -> Neurons:
        """The union of the prompts' memorization neurons (NeMo-C deactivates this for a cluster)."""
        return frozenset().union(*(loc.neurons for loc in self.localise(model, prompts)))

    def neurons_for(self, model: DiffusionModel, prompts: list[str]) -> list[Neurons]:
        """Neurons deactivated for each prompt at generation: its own S(p) (NeMo-C: its cluster's union)."""
        return [loc.neurons for loc in self.localise(model, prompts)]

    def generate(self, model: DiffusionModel, prompts: list[str], seeds: list[int], spec: GenSpec,
                 *, seed: int = 0) -> SampleResult:
        if self.strength == 0:
            return super().generate(model, prompts, seeds, spec, seed=seed)
        return deactivated_sample(model, prompts, seeds, spec, self.neurons_for(model, prompts),
                                  1.0 - self.strength)
