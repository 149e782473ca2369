"""``make bench-speed``: how close first-step detection gets to its cost floor (a benchmark, not a test).

Variants, all measured in one run on one machine, interleaved within every repeat (the order is
reversed on odd repeats) so that ratios inside a repeat compare like with like on a shared machine:

- ``floor_n{n}_k{k}``: the physical floor: text encoding of the prompts and "" (one encoder call) plus
  k bare UNet forwards of the CFG batch (2 n rows per prompt). x_T is built outside the timed region.
- ``nm_n{n}_k{k}``: ours, ``NoiseMagnitude`` (batched over prompts and seeds, early exit after k steps,
  inference mode, no decoding, norms kept on the device).
- ``naive_n{n}``: the same score the way the public code computes it (``NoiseMagnitudeNaive``: one
  prompt per call, all 50 steps, ``.item()`` per sample per step, decode); its cost does not depend on k.
- ``density_pixel_n{n}``: Carlini's generation density (``GenerationDensity``, n full generations).

Expensive variants run on fewer prompts (naive, density); every time is normalised per prompt, which is
fair because each of them processes prompts independently (naive) or in one batch whose per-prompt
cost does not fall with fewer prompts on the CPU. Results: ``results/speed.csv`` (one row per variant,
medians and spreads over repeats), ``results/speed_repeats.csv`` (raw timings), ``results/plots/speed.png``.

    python -m tasks.studies.speed                       # organism, CPU (the README's table)
    python -m tasks.studies.speed --model sd15-random --device cuda --dtype float16 --batch-sizes 1,2,4,8,16,32,64
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bench.core.model import DiffusionModel

KINDS = ("floor", "ours", "naive", "density")


@dataclass(frozen=True)
class Spec:
    variant: str
    kind: str          # floor | ours | naive | density
    n_gen: int
    k: int             # UNet steps whose outputs the score reads (floor/ours: the steps run)
    n_prompts: int

    @property
    def steps_run(self) -> int:
        return self.k if self.kind in ("floor", "ours") else 50

    @property
    def unet_rows_per_prompt(self) -> int:
        return 2 * self.n_gen * self.steps_run


def build_specs(batch_sizes: list[int], prompts_n4: int, naive_prompts: int, density_prompts: int,
                density_n16_prompts: int, kinds: tuple[str, ...] = KINDS) -> list[Spec]:
    """Floor/ours at (n=1,k=1) for every batch size (prompts per batch), at (4,1) and (4,10) on
    ``prompts_n4`` prompts; naive at n=1 and n=4; density at n=4 and n=16."""
    specs: list[Spec] = []
    for b in batch_sizes:
        specs += [Spec("floor_n1_k1", "floor", 1, 1, b), Spec("nm_n1_k1", "ours", 1, 1, b)]
    for k in (1, 10):
        specs += [Spec(f"floor_n4_k{k}", "floor", 4, k, prompts_n4), Spec(f"nm_n4_k{k}", "ours", 4, k, prompts_n4)]
    specs += [Spec("naive_n1", "naive", 1, 50, naive_prompts), Spec("naive_n4", "naive", 4, 50, naive_prompts),
              Spec("density_pixel_n4", "density", 4, 50, density_prompts),
              Spec("density_pixel_n16", "density", 16, 50, density_n16_prompts)]
    return [s for s in specs if s.kind in kinds and s.n_prompts > 0]


# ---------------------------------------------------------------------- what each variant runs
def floor_runner(model: DiffusionModel, prompts: list[str], n_gen: int, k: int, seed: int) -> Callable[[], None]:
    """The floor's timed work: encode prompts + "" in one call, then k bare UNet forwards of the CFG
    batch (cond rows then uncond rows, chunked like ``sample`` when memory requires)."""
    from bench.core.hardware import fit_batch_size

    P = len(prompts)
    per_call = fit_batch_size(model, P * n_gen)
    x = model.init_latents([seed + j for j in range(n_gen)] * P)          # untimed input (x_T)
    t = model.timesteps(50)[0].to(model.device)
    p_idx = torch.arange(P, device=model.device).repeat_interleave(n_gen)

    def run() -> None:
        with torch.inference_mode():
            emb = model.encode([*prompts, ""])
            cond, uncond = emb[:-1], emb[-1:]
            for c0 in range(0, P * n_gen, per_call):
                c1 = min(c0 + per_call, P * n_gen)
                xb = torch.cat([x[c0:c1], x[c0:c1]])
                e = torch.cat([cond[p_idx[c0:c1]], uncond.expand(c1 - c0, -1, -1)])
                for _ in range(k):
                    model.unet(xb, t, encoder_hidden_states=e, return_dict=False)
    return run


def make_runner(model: DiffusionModel, spec: Spec, prompts: list[str], seed: int = 0) -> Callable[[], object]:
    if spec.kind == "floor":
        return floor_runner(model, prompts, spec.n_gen, spec.k, seed)
    if spec.kind == "ours":
        det = detector("nm_n1_k1", n_gen=spec.n_gen, steps=spec.k, batch_size=len(prompts) * spec.n_gen)
    elif spec.kind == "naive":
        det = detector("nm_naive_n1_k1", n_gen=spec.n_gen, steps=1)
    elif spec.kind == "density":
        det = detector("density_pixel_n4", n_gen=spec.n_gen)
    else:
        raise ValueError(f"unknown variant kind {spec.kind!r}; use one of {KINDS}")
    return lambda: det.score(model, prompts, seed=seed)


def detector(cid: str, **overrides):
    """A registered detector (``conf/detector/<cid>.yaml``) with ``overrides``, built as the runner builds it."""
    from omegaconf import OmegaConf

    from bench.run.registry import CONF, instantiate
    cfg = OmegaConf.to_container(OmegaConf.load(Path(CONF) / "detector" / f"{cid}.yaml"), resolve=True)
    return instantiate({**cfg, **overrides})


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def measure(model: DiffusionModel, specs: list[Spec], prompts: list[str], *, repeats: int, seed: int = 0,
            warmup: bool = True, progress: bool = True) -> list[dict]:
    """Raw per-repeat timings: [{repeat, variant, kind, n_gen, k, n_prompts, seconds, unet_rows}]."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    need = max(s.n_prompts for s in specs)
    if need > len(prompts):
        raise ValueError(f"the benchmark needs {need} prompts but only {len(prompts)} were given; "
                         "lower --batch-sizes / --prompts-n4 or pass more prompts")
    runners = {s: make_runner(model, s, prompts[:s.n_prompts], seed) for s in specs}
    if warmup:                             # first calls (allocator, kernels, compile) are not timed
        for s in specs:
            light = s.kind in ("naive", "density")
            (make_runner(model, s, prompts[:1], seed) if light else runners[s])()
    rows = []
    for r in range(repeats):
        order = specs if r % 2 == 0 else specs[::-1]
        for s in order:
            rows0 = model.counter.rows
            sec = timed(runners[s], model.device)
            rows.append({"repeat": r, "variant": s.variant, "kind": s.kind, "n_gen": s.n_gen, "k": s.k,
                         "n_prompts": s.n_prompts, "seconds": sec, "sec_per_prompt": sec / s.n_prompts,
                         "unet_rows": (model.counter.rows - rows0) if s.kind != "floor"
                         else s.unet_rows_per_prompt * s.n_prompts})
            if progress:
                print(f"  repeat {r + 1}/{repeats}  {s.variant:<18} {s.n_prompts:>3} prompts  {sec:8.3f} s",
                      flush=True)
    return rows


# ---------------------------------------------------------------------- model, prompts, machine
def load(model_kind: str, device: str, dtype: str) -> DiffusionModel:
    if model_kind == "organism":
        from tasks.organism_task import load_organism_model
        return load_organism_model(device=device, dtype=dtype)
    if model_kind == "organism-small":
        from tasks.organism_task import load_organism_model
        return load_organism_model(size="small", device=device, dtype=dtype)
    if model_kind == "sd15-random":
        from bench.core.sd15_random import sd15_random
        return sd15_random(device=device, dtype=dtype)
    raise ValueError(f"--model {model_kind!r} is not known; use organism, organism-small or sd15-random")


def benchmark_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` organism evaluation prompts (memorized and not, shuffled with ``seed``, cycled if needed)."""
    from tasks.organism_task import organism_promptset, world_for
    ps = organism_promptset(world_for({}))
    order = np.random.default_rng(seed).permutation(len(ps.prompts))
    return [ps.prompts[order[i % len(order)]] for i in range(n)]


def machine(model: DiffusionModel, args) -> dict:
    import diffusers
    try:
        load_avg = os.getloadavg()[0]
    except OSError:
        load_avg = float("nan")
    procs = sorted({type(p).__name__ for p in model.unet.attn_processors.values()})
    info = {"model": model.name, "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "unet_attention": "+".join(procs),
            "text_attention": getattr(getattr(model.text_encoder, "config", None), "_attn_implementation", "?"),
            "compile": bool(args.compile), "repeats": args.repeats, "load_avg_1min_start": round(load_avg, 2),
            "shared_machine_note": "other processes may have been running (shared CPU); ratios are within-repeat"}
    if model.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(model.device)
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="diffmem speed", description="first-step detection vs its cost floor")
    ap.add_argument("--model", default="organism", help="organism | organism-small | sd15-random")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: OMP_NUM_THREADS or 2)")
    ap.add_argument("--batch-sizes", default="64", help="prompts per batch for floor/ours at n=1,k=1 (comma list)")
    ap.add_argument("--prompts-n4", type=int, default=16, help="prompts for the n=4 floor/ours variants")
    ap.add_argument("--naive-prompts", type=int, default=4)
    ap.add_argument("--density-prompts", type=int, default=4, help="prompts for density n=4")
    ap.add_argument("--density-n16-prompts", type=int, default=2, help="prompts for density n=16")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"subset of {','.join(KINDS)}")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet (GPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/speed.csv")
    ap.add_argument("--plot", default="results/plots/speed.png")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from bench.core.hardware import compile_unet
    from bench.report.speed_report import plot_speed, summarise, write_csvs

    args = parse_args(argv)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise SystemExit(f"--kinds {','.join(bad)} not known; use a subset of {','.join(KINDS)}")
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        raise SystemExit(f"--batch-sizes {args.batch_sizes!r} must be comma-separated integers, e.g. 1,2,4") from None
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "2"))
    torch.set_num_threads(threads)
    model = load(args.model, args.device, args.dtype)
    if args.compile:
        compile_unet(model)
    specs = build_specs(batch_sizes, args.prompts_n4, args.naive_prompts, args.density_prompts,
                        args.density_n16_prompts, kinds)
    prompts = benchmark_prompts(max(s.n_prompts for s in specs), args.seed)
    info = machine(model, args)
    print(f"[speed] {info['model']} on {info['device']} ({info['dtype']}, {threads} threads): "
          f"{len(specs)} variants x {args.repeats} repeats", flush=True)
    t0 = time.perf_counter()
    raw = measure(model, specs, prompts, repeats=args.repeats, seed=args.seed)
    info["wall_seconds"] = round(time.perf_counter() - t0, 1)
    info["load_avg_1min_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else float("nan")
    table = summarise(raw)
    write_csvs(table, raw, info, args.out)
    plot_speed(table, raw, info, args.plot)
    print(table.to_string(index=False, columns=[c for c in ("variant", "n_prompts", "sec_per_prompt_median",
          "x_floor_median", "speedup_vs_naive_median", "speedup_vs_density_median") if c in table]))
    print(f"[speed] wrote {args.out} and {args.plot} ({info['wall_seconds']} s)")
    return {"table": table, "raw": raw, "machine": info}


if __name__ == "__main__":
    main()
