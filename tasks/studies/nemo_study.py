"""Does NeMo's localisation find neurons that carry the memorization? (organism, per family)

For ``--per-family`` memorized evaluation prompts of each family (MV, RV, TV, FG, BG) of the committed
organism, NeMo (``baselines/mitigators/nemo.py``) localises the prompt's memorization neurons. Each
prompt is then sampled (DDIM ``--steps``, guidance ``--guidance``, seeds 0..``--seeds``-1) three times:
plainly, with its own neurons deactivated, and with the same number of random neurons deactivated
in the same layers (the paper's control; drawn outside the prompt's own set when the layer allows).
Copy similarity to the prompt's own training image(s): SSCD cosine (``sscd_disc_mixup`` ONNX,
bilinear to 288 px; max over the prompt's targets, mean over seeds) and the organism's copy rate
(region cn-RMSE below the family threshold, ``tasks/studies/groundtruth.py``). Non-memorized prompts
(``--per-family`` each of ordinary_unseen and random_tokens) are only localised, to show how
often NeMo's step 1 flags them.

    make nemo-study   # -> results/nemo_localisation.csv, results/nemo_localisation.md
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench.contracts import GenSpec
from baselines.mitigators.nemo import NeMo, Neurons, deactivated_sample, neurons_by_layer, value_layers
from bench.measure.embed import cosine_matrix, get_embedder
from bench.core.atomic import atomic_to_csv, atomic_write_text
from tasks.organism_task import load_organism_model, world_for
from tasks.copies import calibrate, region_distance

FAMILIES = ("MV", "RV", "TV", "FG", "BG")
NONMEM = ("ordinary_unseen", "random_tokens")


def random_like(neurons: Neurons, widths: dict[str, int], rng: np.random.Generator) -> Neurons:
    """Same count per layer, drawn at random in that layer (outside ``neurons`` when possible)."""
    out = set()
    for layer, idx in neurons_by_layer(neurons).items():
        pool = np.setdiff1d(np.arange(widths[layer]), idx)
        if len(pool) < len(idx):
            pool = np.arange(widths[layer])
        out |= {(layer, int(i)) for i in rng.choice(pool, size=len(idx), replace=False)}
    return frozenset(out)


def reference_prompts(world, exclude: set[str], n: int, seed: int) -> list[str]:
    """Non-memorized prompts for mu, sigma and tau_mem (NeMo: 50k extra LAION prompts): the unique
    ordinary training captions and the label-0 evaluation prompts (ordinary, random tokens and the
    style-matched trained-once / never-trained controls), minus the prompts the study evaluates."""
    pool = {c for c, g in zip(world.captions, world.pair_group) if g == "ordinary"}
    pool |= {e.prompt for e in world.eval_prompts if e.label == 0}
    pool = sorted(pool - exclude)
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.permutation(len(pool))[:n]]


def pick(world, group: str, n: int, rng: np.random.Generator) -> list:
    ev = [e for e in world.eval_prompts if e.group == group]
    return [ev[i] for i in sorted(rng.choice(len(ev), size=min(n, len(ev)), replace=False))]


def copy_measures(gens: np.ndarray, e, world, thr: dict, e_gen: np.ndarray, e_train: np.ndarray) -> dict:
    d = region_distance(gens, world, list(e.targets), e.region or "full").min(1)
    s = cosine_matrix(e_gen, e_train[list(e.targets)]).max(1)
    return {"sscd": float(s.mean()), "copy_rate": float((d < thr[e.group]).mean())}


def localise_all(model, world, prompts: list, space: str, exclude: set[str], args) -> NeMo:
    nemo = NeMo(n_seeds=args.signal_seeds, search_space=space, n_tau_prompts=args.n_tau_prompts)
    t0 = time.perf_counter()
    nemo.fit(model, memorized=[], seed=0,
             reference=reference_prompts(world, exclude, args.n_reference, args.seed))
    print(f"[nemo-study] {space}: statistics and tau_mem={nemo.tau_used:.3f} in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    for e in prompts:
        t1 = time.perf_counter()
        loc = nemo.localise(model, [e.prompt])[0]
        print(f"[nemo-study] {space} {e.id}: flagged={loc.memorized} neurons={len(loc.neurons)} "
              f"(initial {loc.n_initial}) ssim {loc.ssim_unblocked:.3f}->{loc.ssim_blocked:.3f}, "
              f"{loc.unet_rows} UNet rows, {time.perf_counter() - t1:.1f} s", flush=True)
    return nemo


def run(args) -> tuple[pd.DataFrame, dict]:
    torch.set_num_threads(args.threads)
    model = load_organism_model()
    world = world_for(None, model)
    rng = np.random.default_rng(args.seed)
    mem = [e for fam in FAMILIES for e in pick(world, fam, args.per_family, rng)]
    nonmem = [e for g in NONMEM for e in pick(world, g, args.nonmem_per_group, rng)]
    exclude = {e.prompt for e in mem + nonmem}
    spec, seeds = GenSpec(steps=args.steps, guidance=args.guidance), list(range(args.seeds))
    prompts = [e.prompt for e in mem]
    images = {"plain": deactivated_sample(model, prompts, seeds, spec, [frozenset()] * len(mem), 0.0)}
    fits = {}
    for space in args.spaces.split(","):
        nemo = fits[space] = localise_all(model, world, mem + nonmem, space, exclude, args)
        widths = {n: m.out_features for n, m in value_layers(model.unet, space).items()}
        own = [nemo.localisations[e.prompt].neurons for e in mem]
        rand = [random_like(s, widths, rng) for s in own]
        images[f"nemo_{space}"] = deactivated_sample(model, prompts, seeds, spec, own, 0.0)
        images[f"random_{space}"] = deactivated_sample(model, prompts, seeds, spec, rand, 0.0)
    thr = calibrate(world)
    emb = get_embedder("sscd", resize=288, progress=False, threads=args.threads)
    targets = sorted({t for e in mem for t in e.targets})            # embed only the images needed
    e_train = np.zeros((world.n_images, emb.dim), np.float32)
    e_train[targets] = emb.embed(world.images[targets])
    measures: dict[tuple[str, str], dict] = {}
    for cond, res in images.items():
        ims = res.images.numpy()
        e_gen = emb.embed(ims)
        for k, e in enumerate(mem):
            sl = slice(k * len(seeds), (k + 1) * len(seeds))
            measures[(e.id, cond)] = copy_measures(ims[sl], e, world, thr, e_gen[sl], e_train)
    rows = []
    for space, nemo in fits.items():
        for e in mem + nonmem:
            loc = nemo.localisations[e.prompt]
            row = {"search_space": space, "id": e.id, "group": e.group, "label": e.label,
                   "prompt": e.prompt, "flagged": loc.memorized, "n_neurons": len(loc.neurons),
                   "n_initial": loc.n_initial, "ssim_unblocked": loc.ssim_unblocked,
                   "ssim_blocked": loc.ssim_blocked, "threshold": loc.threshold, "tau_mem": nemo.tau_used,
                   "localise_unet_rows": loc.unet_rows,
                   "neurons": ";".join(f"{layer}:{','.join(map(str, idx))}"
                                       for layer, idx in loc.by_layer().items())}
            if e.label == 1:
                for cond in ("plain", f"nemo_{space}", f"random_{space}"):
                    short = cond.split("_")[0]
                    row.update({f"{key}_{short}": v for key, v in measures[(e.id, cond)].items()})
            rows.append(row)
    return pd.DataFrame(rows), {s: n.params() for s, n in fits.items()}


def summary(df: pd.DataFrame) -> pd.DataFrame:
    g = df.groupby(["search_space", "group"], sort=False)
    out = pd.DataFrame({"n": g.size(), "flagged": g["flagged"].mean(),
                        "neurons_median": g["n_neurons"].median(), "neurons_max": g["n_neurons"].max()})
    for key in ("sscd", "copy_rate"):
        for cond in ("plain", "nemo", "random"):
            if f"{key}_{cond}" in df:
                out[f"{key}_{cond}"] = g[f"{key}_{cond}"].mean()
    return out.reset_index()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="NeMo localisation study on the organism")
    ap.add_argument("--per-family", type=int, default=4, help="memorized prompts per family")
    ap.add_argument("--nonmem-per-group", type=int, default=4, help="ordinary_unseen / random_tokens prompts")
    ap.add_argument("--seeds", type=int, default=3, help="generation seeds 0..n-1 per prompt")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--signal-seeds", type=int, default=10, help="NeMo's latents for the noise-diff signal")
    ap.add_argument("--n-reference", type=int, default=400, help="max non-memorized prompts for mu, sigma")
    ap.add_argument("--n-tau-prompts", type=int, default=64, help="reference prompts for tau_mem")
    ap.add_argument("--spaces", default="down_mid", help="search spaces: down_mid (NeMo), all (+ up blocks)")
    ap.add_argument("--seed", type=int, default=0, help="prompt subsample, reference and random-neuron seed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/nemo_localisation")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    df, params = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_to_csv(df, out.with_suffix(".csv"), index=False, float_format="%.4f")
    tab = summary(df)
    cmd = "python -m tasks.studies.nemo_study " + " ".join(argv if argv is not None else sys.argv[1:])
    taus = ", ".join(f"{s} {p['tau_mem_used']:.3f}" for s, p in params.items())
    kernel = next(iter(params.values()))["ssim_kernel_used"]
    md = ["# NeMo localisation on organism-v1\n",
          f"`{cmd.strip()}` ({args.per_family} memorized prompts per family, {args.nonmem_per_group} per "
          f"non-memorized group; DDIM {args.steps}, guidance {args.guidance}, seeds 0-{args.seeds - 1}; "
          f"NeMo signal on {args.signal_seeds} latents; mu, sigma and tau_mem from "
          f"{next(iter(params.values()))['n_reference']} non-memorized prompts (ordinary captions, random "
          f"tokens, style-matched controls; tau_mem = mean + 1 std of the max pairwise MS-SSIM over "
          f"{args.n_tau_prompts} of them: {taus}); MS-SSIM kernel {kernel[0]}, sigma {kernel[1]:.3f} "
          f"(16 px maps: NeMo's kernel 11 does not fit); wall {time.perf_counter() - t0:.0f} s on "
          f"{args.threads} threads).\n",
          "search_space: down_mid = NeMo's (down + mid block attn2.to_v, 128 neurons on the organism), "
          "all = also the up blocks (256 neurons; a deviation, to test where the organism keeps it). "
          "flagged = share of prompts passing NeMo's step 1; neurons = size of the refined set. "
          "sscd_*: SSCD cosine to the prompt's own training image(s) (max over targets, mean over "
          "seeds); copy_rate_*: share of generations within the organism's copy threshold (region "
          "cn-RMSE, tasks/studies/groundtruth.py). plain = no mitigation, nemo = the prompt's own neurons "
          "deactivated, random = as many random neurons per layer in the same layers.\n",
          tab.to_markdown(index=False, floatfmt=".3f"), ""]
    atomic_write_text(out.with_suffix(".md"), "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
