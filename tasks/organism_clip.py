"""The organism's CLIP judge: a tiny open_clip ``CLIP`` trained contrastively on MemWorld.

Real runs score prompts with real open_clip weights (``ClipScorer.from_open_clip``); the organism's
16x16 world gets this stand-in of the same architecture (ViT image tower, causal text transformer,
CLIP BPE tokenizer that open_clip ships, so everything is offline).

Data: the *distinct* training (image, caption) pairs, ignoring ``pair_weight``: duplication is what
makes the diffusion organism memorize, and the CLIP must be a caption-image alignment judge, not a
memorizer. Images are normalised with mean = std = 0.5, no augmentation.

Loss: CLIP's symmetric InfoNCE with a multi-positive target. Ordinary captions cover many images
("a red circle") and RV images carry several captions, so a batch often holds several pairs that are
equally right for each other. Pairs i, j are positives of each other when they share the caption text
or the image; each target row is that 0/1 row divided by its sum (soft cross-entropy), both directions.
In MemWorld every positive group is one caption over several images or one image under several
captions (identical tokens / pixels, no dropout or augmentation, hence identical features), where this
equals CLIP's one-hot loss in value and gradient; it states the intent, stays right for mixed groups,
near-duplicates or augmentation, and makes the loss floor explicit: the mean target entropy
E log(#positives), reported as ``loss_floor`` (the final loss cannot go below it).

``build_clip(world, cfg, out_dir)`` writes ``out_dir/clip/model.safetensors`` + ``config.json``;
``load_clip_scorer(out_dir)`` returns a ``bench.measure.embed.ClipScorer``. Deterministic from the seed.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from bench.measure.embed import ClipScorer
from tasks.memworld import MemWorld

CONTEXT_LENGTH = 32
IMAGE_SIZE = 16
MEAN = STD = (0.5, 0.5, 0.5)
ARCH = dict(embed_dim=64,
            vision_cfg=dict(image_size=IMAGE_SIZE, patch_size=4, width=64, layers=2, head_width=32, mlp_ratio=2),
            text_cfg=dict(context_length=CONTEXT_LENGTH, vocab_size=49408, width=64, heads=2, layers=2))


@dataclass(frozen=True)
class ClipConfig:
    steps: int = 1500
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    seed: int = 0


def make_clip(arch: dict = ARCH) -> torch.nn.Module:
    return open_clip.CLIP(embed_dim=arch["embed_dim"], vision_cfg=CLIPVisionCfg(**arch["vision_cfg"]),
                          text_cfg=CLIPTextCfg(**arch["text_cfg"]))


def tokenize(texts: list[str]) -> torch.Tensor:
    """open_clip's SimpleTokenizer (CLIP BPE) at the organism's context length of 32."""
    return open_clip.tokenize(list(texts), context_length=CONTEXT_LENGTH)


def distinct_pairs(world: MemWorld) -> tuple[np.ndarray, list[str]]:
    """Distinct (image index, caption) training pairs in first-seen order; duplication ignored."""
    keys = list(dict.fromkeys(zip(world.pair_image.tolist(), world.captions)))
    return np.asarray([k[0] for k in keys], np.int64), [k[1] for k in keys]


def positives(cap_id: torch.Tensor, img_id: torch.Tensor) -> torch.Tensor:
    """0/1 [B, B] mask (symmetric): same caption text or same image."""
    return ((cap_id[:, None] == cap_id[None]) | (img_id[:, None] == img_id[None])).float()


def multi_positive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                        cap_id: torch.Tensor, img_id: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with row-normalised multi-positive targets (see the module docstring)."""
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    pos = positives(cap_id, img_id)
    target = pos / pos.sum(1, keepdim=True)          # symmetric mask, so valid for both directions
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@torch.no_grad()
def evaluate(scorer: ClipScorer, world: MemWorld, seed: int = 0) -> dict:
    """Top-1 text->image retrieval over all world images, and matched vs shuffled CLIP scores."""
    img_idx, caps = distinct_pairs(world)
    model, images = scorer.model, torch.from_numpy(world.images)
    im = torch.cat([model.encode_image(scorer.preprocess(images[i:i + 512]), normalize=True)
                    for i in range(0, len(images), 512)])
    uniq = list(dict.fromkeys(caps))
    own = {c: set() for c in uniq}
    for i, c in zip(img_idx.tolist(), caps):
        own[c].add(i)
    tx = model.encode_text(scorer.tokenizer(uniq), normalize=True)
    top1 = (tx @ im.T).argmax(1).tolist()
    hits = [t in own[c] for t, c in zip(top1, uniq)]
    chance = float(np.mean([len(own[c]) / len(images) for c in uniq]))
    perm = np.random.default_rng(seed).permutation(len(caps))
    matched = scorer.score(world.images[img_idx], caps, batch_size=256)
    shuffled = scorer.score(world.images[img_idx], [caps[j] for j in perm], batch_size=256)
    return {"retrieval_top1": float(np.mean(hits)), "retrieval_chance": chance, "n_captions": len(uniq),
            "n_images": len(images), "clip_score_matched": float(matched.mean()),
            "clip_score_shuffled": float(shuffled.mean())}


def train_clip(world: MemWorld, cfg: ClipConfig, progress: bool = True) -> tuple[torch.nn.Module, dict]:
    img_idx, caps = distinct_pairs(world)
    cap_ids = torch.tensor([{c: k for k, c in enumerate(dict.fromkeys(caps))}[c] for c in caps])
    img_ids = torch.from_numpy(img_idx)
    images = (torch.from_numpy(world.images[img_idx]) - 0.5) / 0.5       # mean = std = 0.5
    tokens = tokenize(caps)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = make_clip()
    ps = list(model.parameters())            # open_clip: no weight decay on gains, biases, logit scale
    opt = torch.optim.AdamW([{"params": [p for p in ps if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0}], lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    bs = min(cfg.batch_size, len(caps))
    model.train()
    t0, losses, floors = time.perf_counter(), [], []
    bar = tqdm(range(cfg.steps), desc="clip", disable=not progress)
    for _ in bar:
        b = torch.randperm(len(caps), generator=g)[:bs]
        img_f, txt_f, scale = model(images[b], tokens[b])
        loss = multi_positive_loss(img_f, txt_f, scale, cap_ids[b], img_ids[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))      # open_clip's clamp
        losses.append(loss.item())
        floors.append(float(positives(cap_ids[b], img_ids[b]).sum(1).log().mean()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    tail = losses[-max(1, len(losses) // 20):]
    return model, {"final_loss": float(np.mean(tail)) if losses else None,   # mean of the last 5% steps
                   "loss_floor": float(np.mean(floors)) if floors else None,
                   "train_seconds": time.perf_counter() - t0, "n_pairs": len(caps),
                   "logit_scale": model.logit_scale.detach().exp().item(),
                   "threads": torch.get_num_threads(), "torch": torch.__version__}


def build_clip(world: MemWorld, cfg: ClipConfig, out_dir: str | Path, *, progress: bool = True) -> Path:
    """Train the organism's CLIP on ``world`` and save it to ``out_dir/clip`` (``out_dir``: the organism's
    folder; ``python -m tasks.organism --clip-only``); returns that folder."""
    out = Path(out_dir) / "clip"
    t0 = time.perf_counter()
    model, summary = train_clip(world, cfg, progress)
    metrics = evaluate(ClipScorer.from_model(model, tokenize, IMAGE_SIZE, MEAN, STD), world, cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
              metadata={"format": "pt", "arch": "open_clip.CLIP"})
    (out / "config.json").write_text(json.dumps({
        "architecture": {"class": "open_clip.CLIP", **ARCH}, "tokenizer": "open_clip.tokenize",
        "preprocess": {"image_size": IMAGE_SIZE, "mean": MEAN, "std": STD},
        "clip_config": asdict(cfg), "memworld_sha256": world.sha256, "open_clip": open_clip.__version__,
        "train": summary, "eval": metrics, "build_seconds": time.perf_counter() - t0}, indent=2))
    return out


def load_clip_scorer(out_dir: str | Path, device: str = "cpu") -> ClipScorer:
    """The organism's ``ClipScorer`` from ``out_dir/clip`` (``out_dir``: the organism's folder)."""
    d = Path(out_dir) / "clip"
    if not ((d / "config.json").is_file() and (d / "model.safetensors").is_file()):
        raise FileNotFoundError(f"no organism CLIP at {d} (config.json + model.safetensors); "
                                f"`make organism` builds it (or `python -m tasks.organism --clip-only --out {out_dir}`)")
    arch = json.loads((d / "config.json").read_text())["architecture"]
    model = make_clip({k: arch[k] for k in ("embed_dim", "vision_cfg", "text_cfg")})
    model.load_state_dict(load_file(str(d / "model.safetensors")), strict=True)
    return ClipScorer.from_model(model.eval(), tokenize, image_size=arch["vision_cfg"]["image_size"],
                                 mean=MEAN, std=STD, device=device)
