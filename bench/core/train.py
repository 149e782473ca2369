"""THE training loop: eps-prediction MSE on (image, caption) pairs drawn by duplication weight.

Used to build the organism and, later, for fine-tuning with training-time mitigators, which plug in
through ``TrainHook.keep`` (drop samples from the loss, e.g. Wen et al.'s noise-magnitude filter).
Resumable: every ``checkpoint_every`` steps the UNet, optimizer, EMA and RNG state are written with
safetensors (no pickle) and a run started again continues from the last checkpoint, bit for bit.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from bench.core.model import DiffusionModel


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 7000
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    ema_decay: float = 0.0            # 0 = no EMA
    seed: int = 0
    checkpoint_every: int = 500
    threads: int = 0                  # 0 = leave torch's setting


@dataclass
class TrainData:
    """``x0``: [N, C, H, W] training targets in model space (pixels in [-1, 1] or latents);
    pairs: image index, caption, duplication weight."""
    x0: torch.Tensor
    pair_image: torch.Tensor
    pair_weight: torch.Tensor
    captions: list[str]


class TrainHook(Protocol):
    def keep(self, model: DiffusionModel, x_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor,
             eps_pred: torch.Tensor) -> torch.Tensor:
        """Bool [B]: which samples count in the loss."""


class CaptionHook(Protocol):
    """Optional second method of a hook: per-batch captions (e.g. fresh random tokens per sample)."""

    def captions(self, step: int, pairs: torch.Tensor, captions: list[str]) -> dict[int, str]:
        """{batch position: caption} replacing the drawn pairs' captions (``pairs`` [B] index
        ``captions``) for those samples; the loop encodes them with the frozen text encoder.
        Caption-dropped samples stay unconditional."""


def _caption_swaps(hooks, step: int, pairs: torch.Tensor, drop: torch.Tensor, captions: list[str]) -> dict[int, str]:
    out: dict[int, str] = {}
    for h in hooks:
        if hasattr(h, "captions"):
            out.update(h.captions(step, pairs, captions))
    return {i: c for i, c in out.items() if not bool(drop[i])}


def _lr_at(step: int, cfg: TrainConfig) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))


def _distinct(captions: list[str]) -> tuple[list[str], torch.Tensor]:
    """Distinct captions, the empty caption first (row 0), and each pair's row."""
    uniq = [""] + sorted(set(captions) - {""})
    pos = {c: i for i, c in enumerate(uniq)}
    return uniq, torch.tensor([pos[c] for c in captions])


def _caption_table(model: DiffusionModel, captions: list[str], chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen text encoder: encode every distinct caption once; returns (table [U+1, L, D], index [P]).
    Row 0 is the empty caption."""
    uniq, index = _distinct(captions)
    with torch.inference_mode():
        table = torch.cat([model.encode(uniq[i:i + chunk]) for i in range(0, len(uniq), chunk)])
    return table.clone(), index


def _token_table(model: DiffusionModel, captions: list[str]) -> tuple[dict, torch.Tensor]:
    """Text encoder trained jointly: tokenize every distinct caption once; (encodings [U+1, L], index [P])."""
    uniq, index = _distinct(captions)
    enc = model.tokenize(uniq)
    keep = ["input_ids"] + (["attention_mask"] if model._uses_attention_mask else [])
    return {k: enc[k] for k in keep}, index


def train(model: DiffusionModel, data: TrainData, cfg: TrainConfig, out_dir: str | Path, *,
          hooks: tuple[TrainHook, ...] = (), progress: bool = True, train_text_encoder: bool = False) -> dict:
    """Train ``model.unet`` in place; the text encoder stays frozen (its caption states computed once)
    unless ``train_text_encoder`` (a from-scratch encoder trained jointly). Returns a summary dict."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet = model.unet
    unet.train().requires_grad_(True)
    params = [p for p in unet.parameters()]
    te = model.text_encoder if train_text_encoder else None
    if te is not None:
        te.train().requires_grad_(True)
        params += list(te.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = [p.detach().clone() for p in params] if cfg.ema_decay else None
    sched = model.make_scheduler()
    acp = sched.alphas_cumprod.to(model.device, torch.float32)
    T = sched.config.num_train_timesteps
    if te is None:
        table, cap_idx = _caption_table(model, data.captions)
    elif any(hasattr(h, "captions") for h in hooks):
        raise ValueError("per-batch caption hooks need the frozen text encoder (train_text_encoder=False)")
    else:
        tokens, cap_idx = _token_table(model, data.captions)
    x0_all = data.x0.to(model.device, model.dtype)
    weights = data.pair_weight.to(torch.float64)
    gen = torch.Generator().manual_seed(cfg.seed)

    step, history, seconds = 0, [], 0.0
    ck = out / "checkpoint.safetensors"
    if ck.is_file():
        step, history, seconds = _load_checkpoint(ck, unet, opt, ema, gen, te)
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not progress)
    t_start = time.perf_counter() - seconds
    while step < cfg.steps:
        pairs = torch.multinomial(weights, cfg.batch_size, replacement=True, generator=gen)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
        noise = torch.randn((cfg.batch_size, *x0_all.shape[1:]), generator=gen).to(model.device, model.dtype)
        t = torch.randint(0, T, (cfg.batch_size,), generator=gen).to(model.device)
        x0 = x0_all[data.pair_image[pairs]]
        rows = torch.where(drop, 0, cap_idx[pairs] + 0)
        if te is None:
            emb = table[rows]
            swaps = _caption_swaps(hooks, step, pairs, drop, data.captions)
            if swaps:
                with torch.no_grad():
                    emb[list(swaps)] = model.encode(list(swaps.values())).to(emb.dtype)
        else:
            emb = te(**{k: v[rows].to(model.device) for k, v in tokens.items()})[0].to(model.dtype)
        a = acp[t].view(-1, *([1] * (x0.dim() - 1))).to(model.dtype)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        pred = model.eps(x_t, t, emb)
        per_sample = ((pred.float() - noise.float()) ** 2).flatten(1).mean(1)
        keep = torch.ones_like(per_sample, dtype=torch.bool)
        for h in hooks:
            keep &= h.keep(model, x_t, t, emb.detach(), pred.detach())
        if keep.any():
            loss = per_sample[keep].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            if ema is not None:
                with torch.no_grad():
                    for e, p in zip(ema, params):
                        e.lerp_(p, 1 - cfg.ema_decay)
            history.append((step, loss.item(), int(keep.sum())))
        else:
            history.append((step, float("nan"), 0))
        step += 1
        bar.update(1)
        if step % 25 == 0:
            recent = [h[1] for h in history[-100:] if not math.isnan(h[1])]
            bar.set_postfix(loss=f"{sum(recent) / max(1, len(recent)):.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save_checkpoint(ck, unet, opt, ema, gen, step, history, time.perf_counter() - t_start, te)
    bar.close()
    if ema is not None:
        with torch.no_grad():
            for e, p in zip(ema, params):
                p.copy_(e)
    unet.eval().requires_grad_(False)
    if te is not None:
        te.eval().requires_grad_(False)
    recent = [h[1] for h in history[-100:] if not math.isnan(h[1])]
    summary = {"config": asdict(cfg), "steps": step, "seconds": time.perf_counter() - t_start,
               "loss_last100": sum(recent) / max(1, len(recent)),
               "kept_fraction": sum(h[2] for h in history) / max(1, len(history) * cfg.batch_size)}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    (out / "loss_history.csv").write_text("step,loss,kept\n" + "".join(f"{s},{l:.6f},{k}\n" for s, l, k in history))
    return summary


def _save_checkpoint(path: Path, unet, opt, ema, gen, step, history, seconds, te=None) -> None:
    tensors = {f"unet.{k}": v.detach().contiguous() for k, v in unet.state_dict().items()}
    if te is not None:
        tensors.update({f"text.{k}": v.detach().contiguous() for k, v in te.state_dict().items()})
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        for k, v in opt.state.get(p, {}).items():
            tensors[f"opt.{i}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().contiguous()
    if ema is not None:
        tensors.update({f"ema.{i}": e.contiguous() for i, e in enumerate(ema)})
    tensors["rng"] = gen.get_state()
    meta = {"step": str(step), "seconds": repr(seconds)}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    (path.parent / "history.json").write_text(json.dumps(history))
    tmp.replace(path)


def _load_checkpoint(path: Path, unet, opt, ema, gen, te=None):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
    if te is not None:
        te.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("text.")})
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        st = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
        if st:
            opt.state[p] = st
    if ema is not None:
        for i, e in enumerate(ema):
            e.copy_(tensors[f"ema.{i}"])
    gen.set_state(tensors["rng"])
    history = [tuple(h) for h in json.loads((path.parent / "history.json").read_text())]
    step = int(meta["step"])
    return step, history[:step], float(meta["seconds"])
