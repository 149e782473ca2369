"""The contracts every side shares: the engine (``bench/``) defines them, methods (``baselines/``) and worlds
(``tasks/``) implement them, and the engine imports neither.

- ``PromptSet``: labelled prompts a task hands the engine (``concat`` joins sets).
- ``Task``: what ``conf/task/<name>.yaml``'s ``_target_`` builds: its prompt set for a loaded model and,
  when it has training images, its world (what the mitigation benchmark's copy judge compares against).
- model loaders: ``conf/model/<name>.yaml``'s ``_target_`` is a function ``(**yaml keys, device, dtype)
  -> bench.core.model.DiffusionModel`` (``bench.core.model.load_folder``, ``tasks.organism_loaders.*``).
- ``Detector``: ``score(model, prompts, *, seed) -> [P] scores`` (higher = more likely memorized) and
  ``params()``; a detector that can share a fused sampling pass says so by ``fuse`` (``bench.run.detect_fused``).
- ``Mitigator`` (a base class) and ``GenSpec``: ``fit`` then ``generate`` through THE sampling loop.
- ``Explainer``: ``explain(model, prompt, *, seed)`` -> per-token scores with ``to_frame()``.
- ``CopyJudge``: per-image copy and alignment measures of the mitigation benchmark; ``CopyCriterion``: a
  world's own copy rule (``bench.measure.copyscore.CopyJudge`` takes one).
- ``Finetuner``: a world's fine-tuning protocol, handed to training-time mitigators by whoever builds them.

Only ``bench.core`` is imported here (the model type and the sampling loop).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar, Protocol, Sequence, runtime_checkable

import numpy as np

from bench.core.model import DiffusionModel
from bench.core.sampling import SampleResult, sample


# ---------------------------------------------------------------------- prompts and tasks
@dataclass(frozen=True, eq=False)
class PromptSet:
    """Prompts, binary labels (1 = memorized) and per-prompt metadata, aligned by position.
    ``sha256`` hashes the content (ids, prompts, labels, groups, types, extra), not the name."""

    name: str
    prompts: list[str]
    labels: np.ndarray  # [N] int8, 1 = memorized (read-only)
    groups: list[str]  # source group per prompt: "webster_mem", "laion", "random_tokens", ...
    types: list[str]  # memorization type (VM/TM or MV/RV/TV/N), "" where unknown
    ids: list[str]  # stable unique ids, "<group>:<row in the source file>"
    sources: tuple[str, ...] = ()  # data files (relative to tasks/data) the set was read from
    extra: dict[str, list[Any]] = field(default_factory=dict)  # more per-prompt fields
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        n, lab = len(self.prompts), np.asarray(self.labels)
        columns = {"groups": self.groups, "types": self.types, "ids": self.ids, **self.extra}
        problems = [f"{k} has {len(v)} entries, expected {n}" for k, v in columns.items()
                    if len(v) != n]
        if lab.shape != (n,) or not np.isin(lab, (0, 1)).all():
            problems.append(f"labels must be {n} values in {{0, 1}}")
        if len(set(self.ids)) != len(self.ids):
            problems.append("ids must be unique")
        if not all(isinstance(p, str) for p in self.prompts):
            problems.append("every prompt must be a string")
        if problems:
            raise ValueError(f"PromptSet {self.name!r}: " + "; ".join(problems))
        lab = lab.astype(np.int8)
        lab.flags.writeable = False
        object.__setattr__(self, "labels", lab)
        rows = {"id": self.ids, "prompt": self.prompts, "label": lab.tolist(), "type": self.types,
                "group": self.groups, **{f"extra.{k}": v for k, v in self.extra.items()}}
        blob = json.dumps(rows, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        object.__setattr__(self, "sha256", hashlib.sha256(blob.encode("utf-8")).hexdigest())

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def n_pos(self) -> int:
        return int(self.labels.sum())


def concat(name: str, sets: Sequence[PromptSet]) -> PromptSet:
    """Concatenate prompt sets in order; ``extra`` keys missing from a set are filled with None."""
    keys = list(dict.fromkeys(k for s in sets for k in s.extra))
    return PromptSet(
        name=name, prompts=[p for s in sets for p in s.prompts],
        labels=np.concatenate([s.labels for s in sets]) if sets else np.zeros(0, np.int8),
        groups=[g for s in sets for g in s.groups], types=[t for s in sets for t in s.types],
        ids=[i for s in sets for i in s.ids],
        sources=tuple(dict.fromkeys(src for s in sets for src in s.sources)),
        extra={k: [v for s in sets for v in s.extra.get(k, [None] * len(s))] for k in keys})




@runtime_checkable
class Task(Protocol):
    """What a task config builds (``conf/task/*.yaml`` ``_target_``; keys other than its own, such as
    ``max_per_group``, are read by the engine). ``mcfg``: the model's config, for worlds that depend on it."""

    name: str

    def prompt_set(self, model: DiffusionModel | None, mcfg: dict, weights: str | None = None) -> PromptSet: ...

    def world(self, model: DiffusionModel | None, mcfg: dict) -> Any:
        """The training world (images, masks, evaluation prompts with their targets, ``sha256``);
        raises NotImplementedError for a task without training images."""


# ---------------------------------------------------------------------- methods
@runtime_checkable
class Detector(Protocol):
    """A memorization detector (``conf/detector/*.yaml``). ``fuse`` (optional): "noise" (per-step
    ``eps_text - eps_uncond`` norms over ``n_gen`` generations and ``steps`` of ``total_steps``) or
    "density" (``similarity`` / ``reduce`` of ``n_gen`` decoded images after ``steps``): such detectors
    can share one sampling pass (``bench.run.detect_fused``)."""

    name: str

    def params(self) -> dict: ...

    def score(self, model: DiffusionModel, prompts: list[str], *, seed: int) -> np.ndarray: ...


@dataclass
class GenSpec:
    steps: int = 50
    guidance: float = 7.5
    batch_size: int = 64


@dataclass
class Mitigator:
    """A mitigator is a small dataclass with a ``strength`` knob (0 = the identity, ``none``'s only value)
    and one method, ``generate(model, prompts, seeds, spec)``, that returns images generated under the
    mitigation through THE sampling loop (``bench.core.sampling.sample``). Prompt-side methods rewrite
    prompts or embeddings before sampling; model-side methods patch the UNet only through
    ``bench.core.patching`` so the model is restored exactly, also on error. ``fit`` precomputes what a
    method needs from the model (activation statistics, masks) before the timed generations; its cost is
    measured by the runner and reported separately. The runner, not the method, measures wall time and
    UNet rows, and scores CLIP against the ORIGINAL prompt."""

    strength: float = 0.0
    name: ClassVar[str] = "none"
    strength_unit: ClassVar[str] = "-"

    def params(self) -> dict:
        return {"name": self.name, "strength_unit": self.strength_unit, **asdict(self)}

    def fit(self, model: DiffusionModel, *, memorized: list[str], reference: list[str], seed: int = 0) -> None:
        """Precompute model-side state (no-op for prompt-side methods)."""

    def generate(self, model: DiffusionModel, prompts: list[str], seeds: list[int], spec: GenSpec,
                 *, seed: int = 0) -> SampleResult:
        """Images for every (prompt, seed), prompts x seeds row-major, decoded to [0, 1]."""
        return sample(model, prompts, seeds, steps=spec.steps, guidance=spec.guidance,
                      batch_size=spec.batch_size, decode=True)


@runtime_checkable
class Explainer(Protocol):
    """Per-token attribution of a prompt (``conf/explain.yaml`` ``explainer``); the result has ``to_frame()``."""

    name: str

    def params(self) -> dict: ...

    def explain(self, model: DiffusionModel, prompt: str, *, seed: int) -> Any: ...


class Finetuner(Protocol):
    """A world's fine-tuning protocol (``tasks.finetune_world.WorldFinetuner``), given to training-time
    mitigators (``baselines.mitigators.train_time``) by whoever builds them."""

    def config(self, overrides: dict) -> Any: ...

    def world(self, model: DiffusionModel, cfg: Any) -> Any: ...

    def finetune(self, model: DiffusionModel, world: Any, cfg: Any, *, method: dict, hooks: tuple = (),
                 transform: Callable | None = None, root: str | None = None) -> Any: ...


# ---------------------------------------------------------------------- copy judges
@runtime_checkable
class CopyJudge(Protocol):
    """Per-image measures of the mitigation benchmark (``conf/judge/*.yaml`` ``_target_``, called with
    ``world``, ``model`` and ``threads``). ``measure``: images [P*S, 3, H, W] (prompts x seeds row-major)
    and the world's evaluation prompts -> one dict per image."""

    def protocol(self) -> dict: ...

    def measure(self, images: np.ndarray, prompts: list, seeds: list[int]) -> list[dict]: ...


class CopyCriterion(Protocol):
    """A world's rule for "this generation copies its training image": per-group thresholds calibrated on
    the world, and the distance of generations to given training images in a region."""

    description: str

    def calibrate(self, world) -> dict: ...

    def distance(self, images: np.ndarray, world, targets: list[int], region: str) -> np.ndarray: ...
