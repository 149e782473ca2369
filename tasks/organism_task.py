"""The organism as the engine sees it, built from config (``_target_``) only:

- ``load_organism_model`` / ``load_oracle_model``: model loaders (``conf/model/organism*.yaml``,
  ``conf/model/oracle.yaml``), called with the YAML's keys plus ``device`` and ``dtype``;
- ``OrganismTask``: the organism's prompt-set builder with its labels (``conf/task/organism.yaml``), and
  the world the mitigation benchmark compares generations with;
- ``organism_judge``: the copy judge of the mitigation benchmark (``conf/judge/organism.yaml``).

The engine's contracts (``bench.contracts``) are what these implement; nothing in ``bench/`` imports this.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench.contracts import PromptSet
from bench.core.model import DiffusionModel
from bench.errors import ConfigError
from bench.run.runner import PLANTED_NOT_LEARNED
from tasks.memworld import MemWorld, build_memworld, config_from_dict
from tasks.organism import DEFAULT_VERSION, default_dir, load_organism, organism_config, small_config

LABEL_SOURCES = ("measured", "planted")


# ---------------------------------------------------------------------- models
def _organism_cfg(size: str = "default", version: str | None = None):
    return small_config() if size == "small" else organism_config(str(version or DEFAULT_VERSION))


def load_organism_model(*, size: str = "default", version: str | None = None, device: str = "cpu",
                        dtype: str = "float32", **_) -> DiffusionModel:
    """``conf/model/organism*.yaml``: the built organism of ``version`` (``size: small``: the test-size one)."""
    return load_organism(_organism_cfg(size, version), device=device, dtype=dtype)


def load_oracle_model(*, size: str = "default", version: str | None = None, dtype: str = "float32",
                      **_) -> DiffusionModel:
    """``conf/model/oracle.yaml``: the closed-form optimal denoiser of the organism's world (on the CPU)."""
    from tasks.oracle import oracle_model
    return oracle_model(build_memworld(_organism_cfg(size, version).world), dtype=dtype)


def world_for(mcfg: dict | None, model: DiffusionModel | None = None) -> MemWorld:
    """The MemWorld a model was trained on: read from its folder when it has one, else the world of the
    organism its config names (``size``, ``version``)."""
    if model is not None and model.path and (Path(model.path) / "diffmem.json").is_file():
        meta = json.loads((Path(model.path) / "diffmem.json").read_text())
        return build_memworld(config_from_dict(meta["config"]["world"]))
    m = mcfg or {}
    if m.get("kind", "organism") not in ("organism", "oracle"):
        raise ConfigError(f"model={m.get('name')} was not trained on the organism's world (its folder has no "
                          "diffmem.json); the organism's prompts and images need model=organism, organism_small "
                          "or oracle (for another model run `diffmem calibrate prompts=<your reference file>`)")
    return build_memworld(_organism_cfg(m.get("size", "default"), m.get("version")).world)


# ---------------------------------------------------------------------- the task
def organism_promptset(world, measured: dict[str, bool] | None = None) -> PromptSet:
    """The organism's evaluation prompts. ``measured`` (id -> reproduces, tasks/copies.py) makes
    the label the measured one: 1 when the prompt's generations reproduce its training image; a planted
    prompt that does not reproduce gets label 0 *and* the group ``planted_not_learned``, which the
    headline metrics leave out of both classes. ``extra['label_planted']`` always keeps the planted
    label. Without ``measured`` the labels are the planted ones (``label_source`` says which)."""
    ev = world.eval_prompts
    planted = [int(e.label) for e in ev]
    if measured is None:
        labels, groups, source = planted, [e.group for e in ev], "planted"
    else:
        missing = [e.id for e in ev if e.id not in measured]
        if missing:
            raise ValueError(f"the ground truth has no label for {len(missing)} evaluation prompts "
                             f"(e.g. {missing[:3]}); rerun `make groundtruth`")
        labels = [int(measured[e.id]) for e in ev]
        groups = [PLANTED_NOT_LEARNED if p and not y else e.group for e, p, y in zip(ev, planted, labels)]
        source = "measured"
    return PromptSet(
        name=f"organism_s{world.config.seed}" + ("" if source == "planted" else "_measured"),
        prompts=[e.prompt for e in ev], labels=np.array(labels, np.int8), groups=groups,
        types=[e.family for e in ev], ids=[e.id for e in ev],
        extra={"family": [e.family for e in ev], "region": [e.region for e in ev],
               "targets": [" ".join(map(str, e.targets)) for e in ev], "label_planted": planted,
               "label_source": [source] * len(ev)})


def label_source(labels) -> str:
    src = str(labels)
    if src not in LABEL_SOURCES:
        raise ConfigError(f"task.labels={src!r} is not a label source; use one of {list(LABEL_SOURCES)}")
    return src


class OrganismTask:
    """``conf/task/organism.yaml``: the organism's labelled evaluation prompts (MemWorld, read from the
    loaded model's own world). ``labels``: measured (``groundtruth.json`` of the loaded weights) or planted."""

    def __init__(self, name: str = "organism", labels: str = "measured", **_):   # max_per_group: the engine's
        self.name, self.labels = name, label_source(labels)

    def world(self, model: DiffusionModel | None, mcfg: dict | None = None) -> MemWorld:
        return world_for(mcfg, model)

    def prompt_set(self, model: DiffusionModel | None, mcfg: dict | None = None,
                   weights: str | None = None) -> PromptSet:
        world = self.world(model, mcfg)
        measured = None
        if self.labels == "measured":
            from tasks.copies import measured_labels
            if model is None:
                raise ValueError("measured labels need the loaded model (its ground truth is keyed by its weights)")
            measured = measured_labels(model, world, weights)
        return organism_promptset(world, measured)


# ---------------------------------------------------------------------- the copy judge
def organism_judge(world, model: DiffusionModel, threads: int = 2, **kw):
    """``conf/judge/organism.yaml``: the engine's copy judge with the organism's copy criterion
    (``tasks.copies``), its CLIP (``tasks.organism_clip``) and the MemWorld segmenter."""
    from bench.measure.copyscore import CopyJudge
    from tasks.copies import GroundTruthCriterion
    from tasks.memworld_segment import MemWorldCNNSegmenter
    from tasks.organism_clip import load_clip_scorer

    return CopyJudge(world, load_clip_scorer(model.path or default_dir()), criterion=GroundTruthCriterion(),
                     segmenter=MemWorldCNNSegmenter(), threads=int(threads), **kw)
