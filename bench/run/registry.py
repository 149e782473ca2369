"""The one place configs become objects: Hydra's ``_target_`` (models, tasks, detectors, mitigators, explainers,
copy judges; ``conf/<group>/<name>.yaml``), and the ids registered configurations are known by.

``CONF``: the config folder (``bench/conf`` when installed, the repository's ``conf/`` in a checkout).
"""
from __future__ import annotations

import json
from pathlib import Path

_BENCH = Path(__file__).resolve().parents[1]
CONF = str(_BENCH / "conf" if (_BENCH / "conf" / "detect.yaml").is_file() else _BENCH.parent / "conf")


def instantiate(dcfg: dict, *, plain_errors: bool = False, **kwargs):
    """The object ``dcfg['_target_']`` names, built from the other keys (``id`` left out) and ``kwargs``.

    A bad ``_target_`` or argument raises Hydra's ``InstantiationException`` (exit code 2). With
    ``plain_errors`` an error raised *inside* the target (a model folder that is missing, an organism
    that is not built) reaches the caller as itself, so it keeps its own exit code."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hy

    try:
        return hy({k: v for k, v in dcfg.items() if k != "id"}, **kwargs)
    except InstantiationException as e:
        if plain_errors and e.__cause__ is not None and str(e).startswith("Error in call to target"):
            raise e.__cause__ from None
        raise


SWEPT = ("id", "strengths", "strength")   # not part of a configuration's identity (a mitigator's strengths)


def config_id(group: str, ccfg: dict, conf_dir: str | Path | None = None) -> str | None:
    """The id of a detector / mitigator configuration: its YAML ``id`` when it equals the registered
    ``conf/<group>/<id>.yaml``, else the id with the differing keys, e.g. ``nm_n1_k1[guidance=5]``
    (``detector.guidance=5``), so an overridden configuration never takes a registered one's row.
    None when ``ccfg`` has no id; an id with no registered YAML (a user's own) is returned as is."""
    from omegaconf import OmegaConf

    cid = ccfg.get("id")
    if not cid:
        return cid
    reg = _registered(Path(conf_dir or CONF) / group, cid,
                      ccfg.get("_target_"))
    if reg is None:
        return cid
    skipped = {k for k, v in reg.items() if isinstance(v, str) and "${" in v}   # interpolations: resolved elsewhere
    reg = {k: v for k, v in reg.items() if k not in skipped}

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:g}"
        return "null" if v is None else json.dumps(v, separators=(",", ":")) if isinstance(v, (list, dict)) else str(v)

    diff = [f"{k}={fmt(ccfg.get(k))}" for k in sorted(set(reg) | (set(ccfg) - set(skipped)))
            if k not in SWEPT and (k not in ccfg or k not in reg or _differs(reg[k], ccfg[k]))]
    return f"{cid}[{','.join(diff)}]" if diff else cid


def _registered(group_dir: Path, cid: str, target: str | None) -> dict | None:
    """The registered YAML of id ``cid`` in ``group_dir``: ``<cid>.yaml``, or a file whose ``id:`` is ``cid``
    with the same ``_target_`` (``train_none.yaml`` registers the fine-tuning protocol's ``none``)."""
    from omegaconf import OmegaConf

    def load(f: Path):
        reg = OmegaConf.to_container(OmegaConf.load(f), resolve=False)
        return reg if isinstance(reg, dict) and reg.get("id", f.stem) == cid else None

    own = load(group_dir / f"{cid}.yaml") if (group_dir / f"{cid}.yaml").is_file() else None
    if own is not None and own.get("_target_") == target:
        return own                                   # the usual case: one file read
    found = [r for f in sorted(group_dir.glob("*.yaml")) if f.stem != cid and (r := load(f)) is not None]
    same = [r for r in found if r.get("_target_") == target]
    return (same or ([own] if own is not None else []) or found or [None])[0]


def _differs(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return not (a == b or (a != a and b != b))          # 5 == 5.0; nan equals nan here
    return a != b
