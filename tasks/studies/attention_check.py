"""Issue 18: where the attention detectors disagree with the published ordering on the organism, is the
implementation or the organism at fault?

    PYTHONPATH=. OMP_NUM_THREADS=1 python -m tasks.studies.attention_check [--n-mem 20 --n-non 40 | --all]

Three parts, printed as text (no file is written):

1. ``impl``: the recording is checked against diffusers' own attention computation during real sampling,
   on the tiny random SD (CLIP tokenizer, the tests' ``make_tiny_sd``) and on the organism. Forward
   pre-hooks on every ``attn2`` capture the hidden states and encoder states the layer really sees; the
   reference probabilities are ``attn.get_attention_scores(head_to_batch_dim(to_q(h)),
   head_to_batch_dim(to_k(enc)))`` of the conditional rows (and the conditional encoder rows must equal
   ``model.encode(prompts)``). Compared: LE's entropy (layer 3, first step), AE's layer-mean a-bar entropy
   at the last step, BE's native end-token mask at the last step, and the end-token index (the
   tokenizer's eos / [SEP] id sits there).
2. ``sink``: on a labelled organism subset (measured labels; ``planted_not_learned`` left out), per
   cross-attention layer at the first and last step: a-bar's mass on token 0 ([CLS] / BOS), on the prompt's
   content tokens, on the end token ([SEP] / EOS) and on the padding after it, the entropy over all
   tokens and over the real tokens only (renormalised); class means and the AUC of each (AUC < 0.5: the
   opposite sign separates). Plus the token-count confound.
3. ``be``: Bright Ending decomposed: the detector's masks and masked norms vs a uniform mask (= Wen's
   statistic) over all steps and the first step only; the mask's own statistics; and, for memorized
   prompts, the correlation of the mask with the exact region of the training image(s) (MV / RV / TV:
   the target's foreground mask; BG: the mean background map of the family's targets).
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from baselines.detectors.attention_entropy import AttentionEntropy
from baselines.detectors.bright_ending import BrightEnding
from baselines.detectors.cross_attention import (StepGate, cross_attention_layers, down_block_top_layers,
                                                 eos_index, recording)
from bench.core.sampling import sample
from bench.measure.metrics import roc_auc


# ---------------------------------------------------------------------- 1. implementation check
class Capture:
    """Forward pre-hooks on the cross-attention modules: (hidden_states, encoder_hidden_states) per call."""

    def __init__(self, model, layers):
        self.mods = dict(model.unet.named_modules())
        self.calls = {n: [] for n in layers}
        self.handles = [self.mods[n].register_forward_pre_hook(self._hook(n), with_kwargs=True) for n in layers]

    def _hook(self, name):
        def hook(mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self.calls[name].append((h.detach().clone(), kwargs["encoder_hidden_states"].detach().clone()))
        return hook

    def probs(self, name, call):
        """diffusers' own probabilities of the conditional rows [b, heads, N, L]."""
        attn = self.mods[name]
        h, enc = self.calls[name][call]
        b = h.shape[0] // 2
        q = attn.head_to_batch_dim(attn.to_q(h[:b]))
        k = attn.head_to_batch_dim(attn.to_k(enc[:b]))
        p = attn.get_attention_scores(q, k)
        return p.view(b, attn.heads, *p.shape[1:]).float(), enc[:b]

    def close(self):
        for hd in self.handles:
            hd.remove()


def entr(a):
    return torch.special.entr(a).sum(-1)


@torch.no_grad()
def implementation_check(model, prompts, *, steps=6, seed=0) -> dict:
    layers = cross_attention_layers(model.unet)
    out = {"model": model.name, "layers": layers}
    # eos index: the tokenizer's end token sits there
    tok = model.tokenizer
    end_id = tok.eos_token_id if getattr(tok, "sep_token_id", None) is None else tok.sep_token_id
    ids = tok(list(prompts), padding="max_length", max_length=model.max_length, truncation=True)["input_ids"]
    eos = eos_index(model, prompts)
    out["eos_is_end_token"] = all(ids[r][e] == end_id and end_id not in ids[r][1:e] for r, e in enumerate(eos))
    # LE: layer 3 at the first step
    le = AttentionEntropy(mode="le")
    cap = Capture(model, layers)
    try:
        got = le.trace(model, prompts, seed=seed)["entropy"][:, 0, 0]
        name = le.resolve_layers(model)[0]
        p, enc = cap.probs(name, 0)
        ref = entr(p.mean(dim=(1, 2))).double().numpy()
        out["cond_rows_are_prompts"] = bool(torch.allclose(enc, model.encode(list(prompts)), atol=1e-6))
    finally:
        cap.close()
    out["le_max_abs_diff"] = float(np.abs(got - ref).max())
    # AE: a-bar of the layer mean at the last step (window of a short schedule)
    ae = AttentionEntropy(mode="ae", total_steps=steps, last_steps=1, padding_term="none")
    cap = Capture(model, layers)
    try:
        got = ae.trace(model, prompts, seed=seed)["entropy"][:, 0, steps - 1]
        a = torch.stack([cap.probs(n, steps - 1)[0].mean(dim=(1, 2)) for n in layers]).mean(0)
        ref = entr(a).double().numpy()
    finally:
        cap.close()
    out["ae_last_step_max_abs_diff"] = float(np.abs(got - ref).max())
    # BE: native end-token mask at the last step
    be = BrightEnding(steps=1, total_steps=steps)
    top = down_block_top_layers(model.unet)
    cap = Capture(model, top)
    try:
        got = be.masks(model, prompts, seed=seed, native=True)[:, 0]
        m = torch.stack([cap.probs(n, steps - 1)[0].mean(1) for n in top]).mean(0)       # [b, N, L]
        ref = torch.stack([m[i, :, e] for i, e in enumerate(eos)]).view(got.shape).numpy()
    finally:
        cap.close()
    out["be_layers"] = top
    out["be_grid"] = list(got.shape[-2:])
    out["be_mask_max_abs_diff"] = float(np.abs(got - ref).max())
    return out


def tiny_sd(folder):
    from bench.core.model import load_model
    from tests.conftest import make_tiny_sd
    return load_model(make_tiny_sd(folder))


# ---------------------------------------------------------------------- 2. the sink
@torch.no_grad()
def record_abar(model, prompts, *, seed, steps, record) -> dict:
    """{step: {layer: a-bar [P, L]}} of the conditional rows at the ``record`` steps (one generation)."""
    layers = cross_attention_layers(model.unet)
    buf = {s: {n: [None] * len(prompts) for n in layers} for s in record}
    with recording(model, layers) as rec:
        gate = StepGate(rec, set(record), steps)

        def on_step(s):
            if rec.active:
                for n in layers:
                    for r, i in enumerate(s.sample_idx.tolist()):
                        buf[s.i][n][i] = rec.mean[n][r].cpu()
            gate.after(s.i)

        sample(model, prompts, [seed], steps=steps, stop_after=max(record) + 1, on_step=on_step, decode=False)
    return {s: {n: torch.stack(v).double() for n, v in d.items()} for s, d in buf.items()}


def token_parts(a, eos):
    """Masses of a-bar [P, L] on token 0, content (1..eos-1), end token, padding (> eos); entropies."""
    P, L = a.shape
    pos = torch.arange(L)[None]
    e = torch.tensor(eos)[:, None]
    real = (pos <= e).double()
    ar = a * real / (a * real).sum(1, keepdim=True)
    return {"cls": a[:, 0], "content": (a * ((pos >= 1) & (pos < e))).sum(1), "eos": a.gather(1, e)[:, 0],
            "pad": (a * (pos > e)).sum(1), "max": a.max(1).values, "H_all": entr(a), "H_real": entr(ar),
            "argmax_is_cls": (a.argmax(1) == 0).double()}


def fmt_row(name, v, y):
    v = np.asarray(v, float)
    return (f"  {name:14s} mem {v[y == 1].mean():7.3f}  non {v[y == 0].mean():7.3f}  "
            f"AUC {roc_auc(v, y):.3f}")


def sink_report(model, prompts, y, eos, n_tok, *, seed, steps) -> None:
    last = steps - 1
    rec = record_abar(model, prompts, seed=seed, steps=steps, record=[0, last])
    layers = cross_attention_layers(model.unet)
    print(f"\n[sink] a-bar over {model.max_length} tokens; uniform would put {1 / model.max_length:.3f} on each")
    print(fmt_row("n_tokens", n_tok, y))
    for s in (0, last):
        for k, n in enumerate(layers):
            print(f" step {s} layer {k} ({n})")
            for key, v in token_parts(rec[s][n], eos).items():
                print(fmt_row(key, v.numpy(), y))
        mean = torch.stack([rec[s][n] for n in layers]).mean(0)
        print(f" step {s} layer mean (AE's a-bar)")
        for key, v in token_parts(mean, eos).items():
            print(fmt_row(key, v.numpy(), y))
    le = entr(rec[0][layers[min(3, len(layers) - 1)]]).numpy()
    print(f"  LE (layer 3, step 0) Spearman with n_tokens: {spearman(le, n_tok):.3f}")


def spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


# ---------------------------------------------------------------------- 3. Bright Ending
def region_map(world, e) -> np.ndarray | None:
    """The exact memorized region of a memorized prompt's training image(s), [H, W] float."""
    t = list(e.targets)
    if not t:
        return None
    if e.region == "bg":
        return (~world.masks[t]).mean(0).astype(np.float64)
    return world.masks[t[0]].astype(np.float64)


def be_report(model, world, evs, prompts, y, *, seed, steps) -> None:
    be = BrightEnding(n_gen=1, steps=steps, total_steps=steps)
    m = be.masks(model, prompts, seed=seed)                                   # [P, 1, H, W]
    native = be.masks(model, prompts, seed=seed, native=True)[:, 0]
    masked = be.masked_norms(model, prompts, m, seed=seed)[:, 0]              # [P, steps]
    uniform = be.masked_norms(model, prompts, np.ones_like(m), seed=seed)[:, 0]
    print(f"\n[be] native mask grid {native.shape[-2:]} -> latent {m.shape[-2:]}")
    print(fmt_row("BE all steps", masked.mean(1), y))
    print(fmt_row("uniform all", uniform.mean(1), y))
    print(fmt_row("BE step 0", masked[:, 0], y))
    print(fmt_row("uniform step 0", uniform[:, 0], y))
    print(fmt_row("ratio BE/unif", masked.mean(1) / uniform.mean(1), y))
    unnorm = masked * m.reshape(len(prompts), -1).mean(1)[:, None]            # ||m * d||, not / mean(m)
    print(fmt_row("BE not / mean", unnorm.mean(1), y))
    print(fmt_row("BE not/mean s0", unnorm[:, 0], y))
    nat = native.reshape(len(prompts), -1)
    print(fmt_row("mask mean", nat.mean(1), y))
    print(fmt_row("mask CV", nat.std(1) / nat.mean(1), y))
    corr = []
    for i, e in enumerate(evs):
        r = region_map(world, e) if y[i] == 1 else None
        if r is None or r.std() == 0:
            continue
        rn = torch.nn.functional.adaptive_avg_pool2d(torch.as_tensor(r)[None, None], native.shape[-2:])[0, 0].numpy()
        c_native = np.corrcoef(native[i].ravel(), rn.ravel())[0, 1]
        c_latent = np.corrcoef(m[i, 0].ravel(), r.ravel())[0, 1]
        corr.append((e.group, e.region, c_native, c_latent))
    if corr:
        print("  mask vs exact memorized region (Pearson r), memorized prompts:")
        for g in sorted({c[0] for c in corr}):
            cs = [c for c in corr if c[0] == g]
            print(f"    {g:3s} ({cs[0][1]:8s}) n={len(cs):2d}  native grid r={np.nanmean([c[2] for c in cs]):+.3f}  "
                  f"latent grid r={np.nanmean([c[3] for c in cs]):+.3f}")


# ---------------------------------------------------------------------- main
def organism_subset(n_mem, n_non, seed, everything=False):
    from bench.run.runner import PLANTED_NOT_LEARNED
    from tasks.copies import measured_labels
    from tasks.organism import load_organism, organism_config
    from tasks.organism_task import organism_promptset, world_for

    model = load_organism(organism_config(), build_if_missing=False)
    world = world_for(None, model)
    ps = organism_promptset(world, measured_labels(model, world))
    y, groups = np.asarray(ps.labels), np.asarray(ps.groups)
    mem = np.flatnonzero(y == 1)
    non = np.flatnonzero((y == 0) & (groups != PLANTED_NOT_LEARNED))
    if not everything:
        rng = np.random.default_rng(seed)
        mem, non = rng.choice(mem, n_mem, replace=False), rng.choice(non, n_non, replace=False)
    idx = np.sort(np.r_[mem, non])
    byid = {e.id: e for e in world.eval_prompts}
    evs = [byid[ps.ids[i]] for i in idx]
    return model, world, evs, [ps.prompts[i] for i in idx], y[idx]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-mem", type=int, default=20)
    ap.add_argument("--n-non", type=int, default=40)
    ap.add_argument("--all", action="store_true", help="every labelled prompt (75 + 411)")
    ap.add_argument("--seed", type=int, default=0, help="generation seed (the runs used 0)")
    ap.add_argument("--subset-seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--parts", default="impl,sink,be")
    a = ap.parse_args(argv)
    parts = set(a.parts.split(","))
    torch.set_grad_enabled(False)
    t0 = time.time()
    model, world, evs, prompts, y = organism_subset(a.n_mem, a.n_non, a.subset_seed, a.all)
    print(f"organism {model.name}: {int(y.sum())} memorized + {int((y == 0).sum())} non-memorized prompts")
    if "impl" in parts:
        with tempfile.TemporaryDirectory() as d:
            for mdl in (tiny_sd(d), model):
                r = implementation_check(mdl, ["a red circle", "worcester mooney poster", "",
                                               " ".join(["circle"] * 200)] + prompts[:4], seed=a.seed)
                print("\n[impl]", {k: v for k, v in r.items() if k != "layers"})
    eos = eos_index(model, prompts)
    n_tok = np.array(model.token_counts(prompts), float)
    if "sink" in parts:
        sink_report(model, prompts, y, eos, n_tok, seed=a.seed, steps=a.steps)
    if "be" in parts:
        be_report(model, world, evs, prompts, y, seed=a.seed, steps=a.steps)
    print(f"\n({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
