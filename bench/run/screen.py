"""Screening a model owner's own prompt file: score, conformal p-value and flag per prompt.

    diffmem detect prompts=my_prompts.jsonl [column=caption] [model=... detector=...] [shard=0/4]
    diffmem calibrate prompts=my_non_memorized_reference.jsonl       # once per model + detector
    diffmem calibrate-check                                           # organism: held-out validity

``run_screen(cfg)`` reads a JSONL / CSV / TSV / TXT / parquet file (``tasks.promptsets.load_prompt_file``,
non-strict: a bad line is reported with its line number and every other line is scored), scores the
prompts in batches with one detector (default nm_n1_k1: first denoising step, one generation) and
appends ``line, prompt, score, p_value, flag, truncated`` to the output CSV batch by batch
(``truncated`` = 1: the prompt had more tokens than the model reads; stderr names its file line).
Started again with the same input and configuration, it skips the lines already written (a row cut
short by a kill is dropped and rescored), so no prompt is lost or duplicated; a different input or
configuration with the same output path is refused. ``shard=i/n`` screens the i-th of n contiguous blocks of the
file's lines into its own output file; ``merge_shards`` joins them back in line order.

Higher score = more memorized; p_value is conformal against the calibration's non-memorized reference
scores; flag = p_value <= alpha (bench/measure/calibration.py states the guarantee). Exit codes: EXIT_* below,
the same as every command's (bench/errors.py).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from bench.measure.calibration import Calibration, config_key, resolve, weights_sha256
from bench.errors import ConfigError
from bench.core.atomic import atomic_to_csv, atomic_write_json, atomic_write_text
from bench.run.io import acquire_lock, git_info, release_lock, versions
from bench.core.model import PromptTruncationWarning
from bench.run.shard import Shard
from bench.run.validate import check_config
from bench.run.prompt_file import PromptFile, load_prompt_file

# screening's exit codes are the common ones (bench/errors.py); EXIT_BAD_FILE is its name for EXIT_INPUT
from bench.errors import (EXIT_CALIBRATION, EXIT_CONFIG, EXIT_LINES_REJECTED, EXIT_OK,  # noqa: E402,F401
                          EXIT_OUTPUT_CONFLICT)
from bench.errors import EXIT_INPUT as EXIT_BAD_FILE  # noqa: E402,F401
# EXIT_LOCKED = 8 (bench/errors.py): another process is screening into the same output file
COLUMNS = ["line", "prompt", "score", "p_value", "flag", "truncated"]
LEGACY_COLUMNS = COLUMNS[:5]  # outputs written before the truncated column; resumed and rewritten with it empty


class ScreenConfigError(ConfigError):
    """An option of ``diffmem detect prompts=...`` is unusable."""


class OutputConflictError(RuntimeError):
    """The output file belongs to a screening of another input or configuration."""


@dataclass(frozen=True)
class ScreenResult:
    out: Path
    rejected_file: Path
    manifest: Path
    n_scored: int            # rows in the output (this shard)
    n_rejected: int          # rejected lines of this shard
    n_flagged: int
    exit_code: int
    n_truncated: int = 0     # rows of this shard whose prompt was cut to the model's max_length


@dataclass(frozen=True)
class Setup:
    model: object
    detector: object
    detector_id: str
    seed: int
    weights: str
    key: str


# ---------------------------------------------------------------------- shared setup
def setup(cfg: dict, model=None) -> Setup:
    from bench.run.registry import config_id, instantiate
    from bench.run.runner import build_model

    torch.set_num_threads(int(cfg.get("threads") or torch.get_num_threads()))
    model = model or build_model(cfg["model"])
    det = instantiate(cfg["detector"])
    det_id = config_id("detector", cfg["detector"]) or det.name
    seed, weights = int(cfg.get("seed", 0)), weights_sha256(model)
    return Setup(model, det, det_id, seed, weights, config_key(det_id, det.params(), model.fingerprint(), weights, seed))


def load_calibration(cfg: dict, s: Setup) -> Calibration | None:
    path = resolve(cfg.get("calibration", "auto"), cfg.get("calibration_dir", "results/calibration"),
                   s.model.name, s.detector_id, s.key)
    if path is None:
        return None
    cal = Calibration.load(path)
    cal.check_matches(detector_id=s.detector_id, detector_params=s.detector.params(),
                      model_fingerprint=s.model.fingerprint(), model_weights_sha256=s.weights, seed=s.seed,
                      source=f"calibration {path}")
    cal.check_alpha(float(cfg.get("alpha", 0.01)))
    return cal


def _required_prompts(cfg: dict) -> Path:
    p = cfg.get("prompts")
    if p in (None, "", "???"):
        raise ScreenConfigError("prompts= is required: the path of a JSONL, CSV, TSV, TXT or parquet prompt file")
    return Path(p)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------- input and output
def shard_lines(pf: PromptFile, shard: Shard) -> set[int]:
    """Line numbers of this shard: contiguous blocks over all lines, good and rejected."""
    lines = sorted(set(pf.line_numbers) | {no for no, _ in pf.errors})
    return {lines[i] for i in shard.select(len(lines))}


def output_path(cfg: dict, prompts: Path, model_name: str, detector_id: str, shard: Shard) -> Path:
    if cfg.get("out"):
        out = Path(cfg["out"])
        return out if shard.whole else out.with_name(f"{out.stem}.shard{shard.index}of{shard.count}{out.suffix}")
    suffix = "" if shard.whole else f".shard{shard.index}of{shard.count}"
    return Path(cfg.get("out_dir", "results/screen")) / f"{prompts.name}__{model_name}__{detector_id}{suffix}.csv"


def read_done(out: Path, wanted: set[int]) -> dict[int, dict]:
    """Rows already written (line -> row). A trailing row cut short by a kill, or any row that does not
    parse, is dropped and the file rewritten without it, so its prompt is scored again exactly once."""
    if not out.is_file():
        return {}
    data = out.read_bytes()
    text = data.decode("utf-8")
    complete = text if text.endswith("\n") else text[: text.rfind("\n") + 1]
    rows, bad = {}, complete != text
    reader = csv.reader(io.StringIO(complete, newline=""))
    header = next(reader, None)
    if header == LEGACY_COLUMNS:              # an older output: keep its rows, add the column (unknown: empty)
        reader, bad = (rec + [""] if len(rec) == len(LEGACY_COLUMNS) else rec for rec in reader), True
    elif header != COLUMNS:
        raise OutputConflictError(f"{out} exists but is not a screening output (header {header}); "
                                  "pass another out= or delete it")
    for rec in reader:
        try:
            line, score = int(rec[0]), float(rec[2])
            ok = len(rec) == len(COLUMNS) and line in wanted and line not in rows and np.isfinite(score)
        except (ValueError, IndexError):
            ok = False
        if ok:
            rows[line] = dict(zip(COLUMNS, rec))
        else:
            bad = True
    if bad:
        _write_rows(out, list(rows.values()), mode="w")
    return rows


def _write_rows(out: Path, rows: list[dict], mode: str = "a") -> None:
    new = mode == "w" or not out.is_file()
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    if new:
        w.writeheader()
    w.writerows(rows)
    if new:                                   # a rewrite replaces the file atomically
        atomic_write_text(out, buf.getvalue())
        return
    with open(out, "a", encoding="utf-8", newline="") as f:
        f.write(buf.getvalue())
        f.flush()


def _identity(cfg: dict, prompts: Path, pf: PromptFile, s: Setup, cal: Calibration | None, shard: Shard) -> dict:
    return {"prompts_file_sha256": _file_sha256(prompts), "column": pf.column, "format": pf.fmt,
            "config_key": s.key, "detector_id": s.detector_id, "seed": s.seed, "shard": str(shard),
            "calibration_key": cal.key if cal else None,
            "calibration_reference_sha256": cal.reference_sha256 if cal else None,
            "alpha": float(cfg.get("alpha", 0.01)) if cal else None}


# ---------------------------------------------------------------------- screening
def run_screen(cfg: dict, *, model=None, progress: bool = True) -> ScreenResult:
    check_config("screen", cfg)                     # before any model load
    prompts = _required_prompts(cfg)
    try:
        shard = Shard.parse(cfg.get("shard"))
    except ValueError as e:
        raise ScreenConfigError(str(e)) from None
    alpha = float(cfg.get("alpha", 0.01))
    if not 0.0 < alpha < 1.0:
        raise ScreenConfigError(f"alpha={alpha} must be in (0, 1), e.g. alpha=0.01")
    pf = load_prompt_file(prompts, cfg.get("column", "prompt"), cfg.get("format"), strict=False)
    mine = shard_lines(pf, shard)
    s = setup(cfg, model)
    cal = load_calibration(cfg, s)                       # fail before scoring anything
    out = output_path(cfg, prompts, s.model.name, s.detector_id, shard)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(out.with_name(out.name + ".lock"), f"screening output {out}")   # one writer per output
    try:
        return _screen(cfg, prompts, pf, mine, s, cal, shard, out, alpha, progress)
    finally:
        release_lock(lock)


def _screen(cfg: dict, prompts: Path, pf: PromptFile, mine: set[int], s: Setup, cal: Calibration | None,
            shard: Shard, out: Path, alpha: float, progress: bool) -> ScreenResult:
    man_path, rej_path = out.with_suffix(".manifest.json"), out.with_suffix(".rejected.csv")
    ident = _identity(cfg, prompts, pf, s, cal, shard)
    try:
        old = json.loads(man_path.read_text()) if man_path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise OutputConflictError(f"{man_path} is unreadable ({man_path.stat().st_size} bytes; cut short by a full "
                                  f"disk or a kill in an older version): delete it and {out}, then run again") from None
    if old is not None and old.get("identity") != ident:
        changed = sorted(k for k in ident if old.get("identity", {}).get(k) != ident[k])
        raise OutputConflictError(f"{out} holds a screening of another input or configuration (differs in "
                                  f"{changed}); pass another out= or delete {out} and {man_path}")
    if old is None and out.exists():
        raise OutputConflictError(f"{out} exists without its manifest {man_path}; pass another out= or delete it")

    rejected = [(no, msg) for no, msg in pf.errors if no in mine]
    atomic_to_csv(pd.DataFrame(rejected, columns=["line", "error"]), rej_path, index=False)
    for no, msg in rejected[:10]:
        print(f"{prompts}, line {no}: {msg} (rejected)", file=sys.stderr)
    if len(rejected) > 10:
        print(f"... {len(rejected) - 10} more rejected lines in {rej_path}", file=sys.stderr)

    todo_all = [(no, p) for no, p in zip(pf.line_numbers, pf.prompts) if no in mine]
    man = {"identity": ident, "prompts": str(prompts), "out": str(out), "git": git_info(), "versions": versions(),
           "model": s.model.fingerprint(), "model_weights_sha256": s.weights,
           "detector": {"id": s.detector_id, **s.detector.params()},
           "calibration": None if cal is None else {
               "file": str(resolve(cfg.get("calibration", "auto"), cfg.get("calibration_dir", "results/calibration"),
                                   s.model.name, s.detector_id, s.key)),
               "n": cal.n, "reference_name": cal.reference_name, "threshold_score": cal.threshold(alpha),
               "guarantee": f"for a non-memorized prompt exchangeable with the {cal.n} reference prompts, "
                            f"P(flag) = P(p <= {alpha:g}) <= {alpha:g}"},
           "columns": {"score": "higher = more memorized", "p_value": "(1 + #{ref >= score}) / (n_ref + 1)",
                       "flag": f"1 if p_value <= alpha={alpha:g}"},
           "n_lines_in_shard": len(mine), "n_prompts": len(todo_all), "n_rejected": len(rejected),
           "started": (old or {}).get("started", time.strftime("%Y-%m-%dT%H:%M:%S%z"))}
    atomic_write_json(man_path, man)          # a full disk leaves the old manifest, never a 0-byte one

    done = read_done(out, {no for no, _ in todo_all})
    todo = [(no, p) for no, p in todo_all if no not in done]
    bs = int(cfg.get("batch_prompts", 64))
    bar = tqdm(total=len(todo_all), initial=len(todo_all) - len(todo), desc=f"screen {s.detector_id}",
               disable=not progress)
    rows0, t0 = s.model.counter.rows, time.perf_counter()
    n_trunc = 0
    for b0 in range(0, len(todo), bs):
        batch = todo[b0:b0 + bs]
        trunc = truncated_lines(s.model, batch, prompts, out, shown=n_trunc)
        n_trunc += sum(trunc)
        with warnings.catch_warnings():     # named above by file line, not by position in the batch
            warnings.simplefilter("ignore", PromptTruncationWarning)
            scores = np.asarray(s.detector.score(s.model, [p for _, p in batch], seed=s.seed), dtype=np.float64)
        if scores.shape != (len(batch),) or not np.isfinite(scores).all():
            raise FloatingPointError(f"detector {s.detector_id} returned {scores.shape} scores, "
                                     f"{int((~np.isfinite(scores)).sum())} non-finite, for lines "
                                     f"{[no for no, _ in batch][:5]}...; nothing of this batch was written")
        pv = cal.pvalues(scores) if cal else None
        fl = cal.flags(pv, alpha) if cal else None
        _write_rows(out, [{"line": no, "prompt": p, "score": repr(float(sc)),
                           "p_value": "" if pv is None else repr(float(pv[k])),
                           "flag": "" if fl is None else int(fl[k]), "truncated": int(trunc[k])}
                          for k, ((no, p), sc) in enumerate(zip(batch, scores))])
        bar.update(len(batch))
    bar.close()
    df = read_output(out)
    n_flagged = int(pd.to_numeric(df["flag"], errors="coerce").fillna(0).sum())
    n_truncated = int(pd.to_numeric(df["truncated"], errors="coerce").fillna(0).sum())
    if n_trunc > TRUNCATION_SHOWN:
        print(f"... {n_trunc - TRUNCATION_SHOWN} more truncated prompts (truncated=1 in {out})", file=sys.stderr)
    man.update({"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "n_scored": len(df), "n_flagged": n_flagged,
                "n_truncated": n_truncated, "max_length": s.model.max_length,
                "seconds_scoring_this_session": time.perf_counter() - t0,
                "unet_evals_per_prompt_this_session": (s.model.counter.rows - rows0) / max(1, len(todo))})
    atomic_write_json(man_path, man)
    code = EXIT_LINES_REJECTED if rejected else EXIT_OK
    return ScreenResult(out, rej_path, man_path, len(df), len(rejected), n_flagged, code, n_truncated)


TRUNCATION_SHOWN = 10    # truncated lines named on stderr per session (all are in the output's column)


def truncated_lines(model, batch: list[tuple[int, str]], prompts: Path, out: Path, *, shown: int = 0) -> list[bool]:
    """Per (line, prompt) of ``batch``: does the model's tokenizer cut it? Names the file's line on stderr."""
    counts = model.token_counts([p for _, p in batch])
    cut = [n > model.max_length for n in counts]
    for (no, _), n, c in zip(batch, counts, cut):
        if c and shown < TRUNCATION_SHOWN:
            shown += 1
            print(f"{prompts}, line {no}: {n} tokens, more than the model's {model.max_length}; the prompt was "
                  f"truncated (truncated=1 in {out})", file=sys.stderr)
    return cut


def read_output(out: str | Path) -> pd.DataFrame:
    return pd.read_csv(out, keep_default_na=False, na_values=[""], dtype={"prompt": str})


def merge_shards(files: list[str | Path]) -> pd.DataFrame:
    """Shard outputs of one input file -> one table in line order; refuses overlaps."""
    df = pd.concat([read_output(f) for f in files], ignore_index=True)
    dup = df["line"][df["line"].duplicated()]
    if len(dup):
        raise ValueError(f"line(s) {sorted(dup.unique().tolist())[:10]} appear in more than one shard output")
    return df.sort_values("line", kind="mergesort").reset_index(drop=True)
