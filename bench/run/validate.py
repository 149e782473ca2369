"""Config values checked before any work starts (``check_config(command, cfg)``, called once at the top
of every runner: detect, detect-fused, screen / calibrate / calibrate-check, mitigate, explain).

A value outside its range (NaN or infinite guidance, ``n_gen=0``, negative steps, ``shard=3/2``, a
folder model without ``model.path``, ...) raises ``ConfigError`` with one message naming each bad key,
its value and the allowed range, before a model is loaded and before anything is written. Keys that a
config does not have are not checked, so hand-made configs (tests, notebooks) pass through.
"""
from __future__ import annotations

import math

from bench.errors import ConfigError

# key -> (minimum, nullable). Integers; bools are refused. threads: 0 or null = torch's default.
INTS = {"seed": (0, False), "batch_prompts": (1, False), "batch_images": (1, False), "threads": (0, True),
        "n_seeds": (1, False), "steps": (1, False), "memorized_per_family": (0, False),
        "utility_prompts": (0, False), "split_seed": (0, False), "split_repeats": (1, False)}
# integer keys of a detector / explainer block
BLOCK_INTS = {"n_gen": 1, "steps": 1, "total_steps": 1, "target_steps": 1, "batch_size": 1}
COMMANDS = ("detect", "detect-fused", "screen", "calibrate", "calibrate-check", "mitigate", "explain")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(problems: list[str], key: str, v, lo: int, nullable: bool = False) -> None:
    if v is None and nullable:
        return
    if not _is_int(v) or v < lo:
        null = " or null" if nullable else ""
        problems.append(f"{key}={v!r} must be an integer >= {lo}{null}")


def _guidance(problems: list[str], key: str, v) -> None:
    if not _is_finite(v) or v < 0:
        problems.append(f"{key}={v!r} must be a finite number >= 0 (classifier-free guidance scale, e.g. {key}=7.5)")


def _block(problems: list[str], name: str, block) -> None:
    """A detector / explainer block: its integer keys, guidance and step ordering."""
    if not isinstance(block, dict):
        return
    for k, lo in BLOCK_INTS.items():
        if k in block:
            _int(problems, f"{name}.{k}", block[k], lo)
    if "guidance" in block:
        _guidance(problems, f"{name}.guidance", block["guidance"])
    for inner, outer in (("steps", "total_steps"), ("target_steps", "steps")):
        a, b = block.get(inner), block.get(outer)
        if _is_int(a) and _is_int(b) and a >= 1 and b >= 1 and a > b:
            problems.append(f"{name}.{inner}={a} must be <= {name}.{outer}={b}")


def _model(problems: list[str], m) -> None:
    if not isinstance(m, dict):
        return
    if "path" in m and m.get("path") in (None, "", "???"):
        problems.append(f"model.path={m.get('path')!r}: model={m.get('name', 'folder')} needs "
                        "model.path=/path/to/a/diffusers/folder (unet/, text_encoder/, tokenizer/, scheduler/)")
    if "dtype" in m:
        from bench.core.model import DTYPES
        if m["dtype"] not in DTYPES:
            problems.append(f"model.dtype={m['dtype']!r} must be one of {sorted(DTYPES)}")
    # a world's own options (the organism's version, a task's label source) are checked by its loader or
    # builder, which raises ConfigError before any weights are read


def _task(problems: list[str], t) -> None:
    if not isinstance(t, dict):
        return
    _int(problems, "task.max_per_group", t.get("max_per_group"), 1, nullable=True)
    if "seed" in t:
        _int(problems, "task.seed", t["seed"], 0)


def _alpha(problems: list[str], key: str, v) -> None:
    if not _is_finite(v) or not 0 < v < 1:
        problems.append(f"{key}={v!r} must be a number in (0, 1), e.g. {key}=0.01")


def problems_of(command: str, cfg: dict) -> list[str]:
    """Every out-of-range value of ``cfg`` for ``command`` (empty: the config is usable)."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; known: {COMMANDS}")
    p: list[str] = []
    for k, (lo, nullable) in INTS.items():
        if k in cfg:
            _int(p, k, cfg[k], lo, nullable)
    if command == "mitigate" and "guidance" in cfg:
        _guidance(p, "guidance", cfg["guidance"])
    if cfg.get("shard") not in (None, ""):
        from bench.run.shard import Shard
        try:
            Shard.parse(cfg["shard"])
        except ValueError as e:
            p.append(str(e))
    _model(p, cfg.get("model"))
    _task(p, cfg.get("task"))
    _block(p, "detector", cfg.get("detector"))
    _block(p, "explainer", cfg.get("explainer"))
    mit = cfg.get("mitigator")
    if isinstance(mit, dict):
        if "strengths" in mit:
            s = mit["strengths"]
            if not isinstance(s, (list, tuple)) or not s or not all(_is_finite(x) for x in s):
                p.append(f"mitigator.strengths={s!r} must be a non-empty list of finite numbers, e.g. [0.5, 1.0]")
        elif "strength" in mit and not _is_finite(mit["strength"]):
            p.append(f"mitigator.strength={mit['strength']!r} must be a finite number")
    if command in ("screen", "calibrate", "calibrate-check"):
        if "alpha" in cfg:
            _alpha(p, "alpha", cfg["alpha"])
        for i, a in enumerate(cfg.get("check_alphas") or []):
            _alpha(p, f"check_alphas[{i}]", a)
    return p


def check_config(command: str, cfg: dict) -> None:
    """Raise ``ConfigError`` naming every bad key, its value and the allowed range."""
    p = problems_of(command, cfg)
    if p:
        raise ConfigError(f"{command}: bad config value{'s' if len(p) > 1 else ''}: " + "; ".join(p)
                          + " (fix it on the command line or in conf/)")
