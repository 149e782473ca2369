"""``diffmem explain``: per-token scores of one prompt or of a prompt file, as CSV and bar charts.

    run_explain({"model": {...}, "explainer": {"_target_": ...}, "prompt": "a red circle", ...})

writes into ``out_dir`` (default ``results/explain/<name>/``):
- ``scores.csv``: one row per displayed token (prompt_id, prompt, index, position, token, raw_token,
  token_id, score, rank; rank 1 = highest score = most memorization-driving);
- ``plots/<prompt_id>.png``: one bar chart per prompt, tokens as x labels;
- ``explain.json``: explainer params, seed, model fingerprint, prompt source and sha256, git sha,
  package versions, wall seconds and UNet rows per prompt (measured here, not by the method).
Plain function, no Hydra inside; the explainer is any object with ``explain(model, prompt, *, seed)``
returning ``TokenScores``-like results (``to_frame()``, ``tokens``, ``scores``).
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from bench.core.atomic import atomic_to_csv, atomic_write_json

from bench.run.io import device_info, git_info, versions
from bench.core.model import DiffusionModel
from bench.run.validate import check_config

DEFAULT_ROOT = "results/explain"


class ExplainInputError(ValueError):
    """The explain command got no usable prompt source; the message says how to give one."""


def slug(text: str, max_len: int = 60) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:max_len].strip("_")
    return s or "prompt"


def resolve_prompts(cfg: dict) -> tuple[list[str], list[str], str, dict]:
    """(prompts, ids, default name, source record) from ``prompt=...`` or ``prompts=path``."""
    prompt, path = cfg.get("prompt"), cfg.get("prompts")
    if (prompt is None) == (path is None):
        raise ExplainInputError("give exactly one of prompt=\"...\" (one prompt) or prompts=path/to/file "
                                "(jsonl/csv/tsv/txt/parquet), e.g. diffmem explain 'prompt=\"a red circle\"'")
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ExplainInputError(f"prompt={prompt!r} is empty: pass the text to explain, e.g. "
                                    "diffmem explain 'prompt=\"a red circle\"'")
        sha = hashlib.sha256(prompt.encode()).hexdigest()
        return [prompt], ["000"], slug(prompt), {"prompt": prompt, "sha256": sha}
    from bench.run.prompt_file import load_prompt_file

    pf = load_prompt_file(path, column=cfg.get("column", "prompt"))
    blank = [n for p, n in zip(pf.prompts, pf.line_numbers) if not p.strip()]
    if blank:
        raise ExplainInputError(f"{path}: blank prompt on line(s) {blank[:10]}; remove or fill them")
    ids = [str(r.get("id", f"{i:03d}")) for i, r in enumerate(pf.records)]
    if len({slug(i) for i in ids}) != len(ids):
        raise ExplainInputError(f"{path}: the 'id' column has duplicates (after reducing to file-name "
                                "characters); ids name the output plots, make them unique")
    sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return list(pf.prompts), ids, Path(path).stem, {"file": str(path), "column": pf.column, "sha256": sha}


def token_bar_plot(result, out_png: str | Path, title: str = "") -> Path:
    """Bar chart of one prompt's token scores, tokens as x labels in prompt order."""
    n = len(result.tokens)
    fig = Figure(figsize=(max(4.0, 0.55 * n + 1.5), 3.4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    scores = list(map(float, result.scores))
    top = set(result.ranking()[:2].tolist())
    ax.bar(range(n), scores, color=["tab:red" if i in top else "tab:blue" for i in range(n)])
    ax.set_xticks(range(n), result.tokens, rotation=45 if n > 6 else 0, ha="right" if n > 6 else "center")
    ax.set_ylabel("token significance\n(mean ||dL/de_p[i]||, higher = more)")
    ax.set_title(f"{title or result.prompt}  (red: top 2)", fontsize=9)
    ax.margins(x=0.02)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight", metadata={"Software": None})
    return out


def run_explain(cfg: dict, *, model: DiffusionModel | None = None, progress: bool = True) -> Path:
    """Explain every prompt of ``cfg`` with ``cfg['explainer']``; returns the output folder."""
    from bench.run.registry import instantiate
    from bench.run.runner import build_model
    from bench.run.shard import Shard

    check_config("explain", cfg)                    # before any model load
    prompts, ids, name, source = resolve_prompts(cfg)
    explainer = instantiate(cfg["explainer"])
    out = Path(cfg.get("out_dir") or Path(cfg.get("root", DEFAULT_ROOT)) / (cfg.get("name") or name))
    shard = Shard.parse(cfg.get("shard"))
    whole_out, n_total = out, len(prompts)
    if not shard.whole:                      # shard i/n: its block of prompts into out/shard-<i>of<n>/
        keep = shard.select(len(prompts))
        prompts, ids = [prompts[i] for i in keep], [ids[i] for i in keep]
        out = out / f"shard-{shard.index}of{shard.count}"
        if not prompts:
            raise ExplainInputError(f"shard={shard} of {n_total} prompts is empty; use fewer shards")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    t0 = time.perf_counter()
    model = model or build_model(cfg["model"])
    load_seconds = time.perf_counter() - t0
    seed = int(cfg.get("seed", 0))
    frames, seconds, rows = [], [], []
    for pid, prompt in tqdm(list(zip(ids, prompts)), desc="explain", disable=not progress):
        r0, t1 = model.counter.rows, time.perf_counter()
        res = explainer.explain(model, prompt, seed=seed)
        seconds.append(time.perf_counter() - t1)
        rows.append(model.counter.rows - r0)
        frames.append(res.to_frame().assign(prompt_id=pid, prompt=prompt))
        token_bar_plot(res, out / "plots" / f"{slug(pid)}.png", title=f"{pid}: {prompt}")
    df = pd.concat(frames, ignore_index=True)
    lead = ["prompt_id", "prompt"]
    atomic_to_csv(df[lead + [c for c in df.columns if c not in lead]], out / "scores.csv", index=False,
                  float_format="%.6g")
    record = {"kind": "explain", "explainer": cfg["explainer"], "params": explainer.params(), "seed": seed,
              "source": source, "n_prompts": len(prompts), "model": model.fingerprint(),
              "model_load_seconds": load_seconds, "seconds_per_prompt": sum(seconds) / len(seconds),
              "unet_rows_per_prompt": sum(rows) / len(rows), **git_info(), "versions": versions(),
              "device": device_info(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "shard": None if shard.whole else {"spec": str(shard), "n_total": n_total, "ids": ids}}
    atomic_write_json(out / "explain.json", record)
    if not shard.whole:
        merge_explain_shards(whole_out, shard.count)
    return out


def merge_explain_shards(out: str | Path, count: int) -> Path | None:
    """Once all ``count`` shards under ``out`` have finished, concatenate their scores.csv in shard
    order into ``out/scores.csv`` (the rows and order a single run writes) and move the plots up."""
    out = Path(out)
    parts = [out / f"shard-{i}of{count}" for i in range(count)]
    if not all((p / "explain.json").is_file() and (p / "scores.csv").is_file() for p in parts):
        return None
    df = pd.concat([pd.read_csv(p / "scores.csv", keep_default_na=False, dtype={"prompt_id": str}) for p in parts],
                   ignore_index=True)
    atomic_to_csv(df, out / "scores.csv", index=False, float_format="%.6g")
    for p in parts:
        for png in (p / "plots").glob("*.png"):
            (out / "plots").mkdir(parents=True, exist_ok=True)
            png.replace(out / "plots" / png.name)
    recs = [json.loads((p / "explain.json").read_text()) for p in parts]
    merged = {**recs[0], "shard": None, "n_prompts": sum(r["n_prompts"] for r in recs),
              "merged_from": [r["shard"]["spec"] for r in recs]}
    atomic_write_json(out / "explain.json", merged)
    return out
