"""Shared body of the training-time mitigators: fit fine-tunes a copy, generate samples from it.

DESIGN.md section 4: training-time methods add a ``fit`` that uses ``bench/core/train.py``. Here ``fit``
fine-tunes a COPY of the passed model on the fine-tuning protocol's data (its ``finetuner``, a
``bench.contracts.Finetuner`` the builder passes; the organism's is ``tasks.finetune_world.WorldFinetuner``:
the base world's ordinary pairs plus a newly planted duplicated set) with the method's hooks or data
transform, or loads that fine-tune from the cache; ``generate`` runs THE sampling loop on the copy.
The passed model's weights are never modified, so "restore exactly" holds trivially. The copy
shares the text encoder and the UNet-row counter with the passed model, so the runner's cost
accounting sees the generations.

``fit``'s ``memorized`` / ``reference`` arguments are ignored: what is memorized is fixed by the
protocol's planted set (Wen's fine-tuning protocol), not by the evaluation prompts.

Strength 0 is the identity of every method: plain fine-tuning, cached under the plain key (so it is
built once and is also the protocol's ``none`` reference, ``PlainFinetune``). ``fit_report`` holds
the training cost: CPU and wall seconds of the (first) build, and ``train_cost_ratio`` = the
method's CPU seconds / plain fine-tuning's CPU seconds, both measured builds with the same thread
count (CPU seconds rather than wall seconds because the build machine is shared; wall is recorded too).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, ClassVar

from bench.contracts import Finetuner, GenSpec, Mitigator
from bench.core.model import DiffusionModel
from bench.core.sampling import SampleResult, sample
from bench.core.train import TrainData

PLAIN = {"name": "plain_finetune"}


@dataclass
class FinetuneMitigator(Mitigator):
    strength: float = 0.0
    finetune: dict = field(default_factory=dict)      # the protocol's config overrides (FinetuneConfig)
    cache_dir: str = ""                               # "" = the protocol's default cache
    finetuner: Finetuner | None = field(default=None, repr=False, compare=False)   # the world's protocol
    name: ClassVar[str] = "finetune"
    strength_unit: ClassVar[str] = "-"

    def __post_init__(self):
        if self.strength < 0:
            raise ValueError(f"{self.name}: strength must be >= 0 (0 = plain fine-tuning), got {self.strength}")
        self._ft = None
        self.fit_seed = 0                 # fit's seed, set before hooks / transform are built
        self.fit_report: dict = {}

    # -- what subclasses define ------------------------------------------------------------------
    def method(self) -> dict:
        """Identity and parameters of the mitigation (cache key); strength 0 must return PLAIN."""
        return PLAIN

    def hooks(self, model: DiffusionModel, world) -> tuple:
        """Training hooks (``bench.core.train.TrainHook``); built after ``fit`` has set ``self.fit_seed``."""
        return ()

    def transform(self, model: DiffusionModel, world, seed: int) -> Callable[[TrainData], tuple[TrainData, dict]] | None:
        return None

    # -- contract ----------------------------------------------------------------------------------
    def _protocol(self) -> Finetuner:
        if self.finetuner is None:
            raise ValueError(f"{self.name}: no finetuner: a training-time mitigator needs the world's fine-tuning "
                             "protocol (finetuner=tasks.finetune_world.WorldFinetuner(); "
                             "tasks/studies/finetune_mitigate.py passes it)")
        return self.finetuner

    def protocol(self):
        return self._protocol().config(self.finetune)

    def fit(self, model: DiffusionModel, *, memorized: list[str] | None = None, reference: list[str] | None = None,
            seed: int = 0) -> None:
        ftr = self._protocol()
        cfg = self.protocol()
        world = ftr.world(model, cfg)
        root = self.cache_dir or None
        self.fit_seed = int(seed)
        plain = ftr.finetune(model, world, cfg, method=PLAIN, root=root)
        method = self.method() if self.strength else PLAIN
        if method == PLAIN:
            ft = plain
        else:
            method = {**method, "seed": int(seed)}
            ft = ftr.finetune(model, world, cfg, method=method, hooks=self.hooks(model, world),
                              transform=self.transform(model, world, seed), root=root)
        self._ft = ft
        self.world = world
        m, p = ft.manifest, plain.manifest
        self.fit_report = {
            "finetune_key": m["key"], "finetune_cached": ft.cached, "finetune_cpu_seconds": m["cpu_seconds"],
            "finetune_wall_seconds": m["wall_seconds"], "plain_cpu_seconds": p["cpu_seconds"],
            "plain_wall_seconds": p["wall_seconds"], "train_cost_ratio": m["cpu_seconds"] / p["cpu_seconds"],
            "train_wall_ratio": m["wall_seconds"] / p["wall_seconds"], "kept_fraction": m["kept_fraction"],
            "finetune_steps": cfg.train.steps, "finetune_threads": m["threads"],
            "hook_report": m.get("hooks", []), "transform_report": m.get("transform", {})}

    @property
    def finetuned(self) -> DiffusionModel:
        if self._ft is None:
            raise RuntimeError(f"{self.name}: call fit(model, ...) before generate (it fine-tunes or loads "
                               "the cached fine-tune)")
        return self._ft.model

    def generate(self, model: DiffusionModel, prompts: list[str], seeds: list[int], spec: GenSpec,
                 *, seed: int = 0) -> SampleResult:
        ft = self.finetuned
        if ft.counter is not model.counter:
            raise RuntimeError(f"{self.name}: generate got a different model than fit; call fit on it first")
        return sample(ft, prompts, seeds, steps=spec.steps, guidance=spec.guidance,
                      batch_size=spec.batch_size, decode=True)

    def params(self) -> dict:
        d = {"name": self.name, "strength_unit": self.strength_unit,
             **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "finetuner"}}
        # without a protocol (a bare instance, not fitted) the overrides as given
        d["finetune"] = dataclasses.asdict(self.protocol()) if self.finetuner is not None else dict(self.finetune)
        return d


@dataclass
class PlainFinetune(FinetuneMitigator):
    """The protocol's ``none`` reference: plain fine-tuning without mitigation (strength 0 only)."""
    name: ClassVar[str] = "none"

    def __post_init__(self):
        super().__post_init__()
        if self.strength != 0:
            raise ValueError(f"plain fine-tuning has no strength; got {self.strength} (use 0)")


@dataclass
class OnPlainFinetune(Mitigator):
    """An inference-time or model-side mitigator applied to the protocol's plain fine-tune.

    The fine-tuning protocol is the only place where the organism memorizes a foreground-local family
    (its own FG family does not copy, README "FB-Mem study"), so the FB-Mem study runs every mitigator
    there: ``fit`` loads (or builds) the plain fine-tune, then fits ``inner`` on it; ``generate`` runs
    ``inner`` on it. No extra training: ``train_cost_ratio`` = 1 (plain fine-tuning's cost).
    """
    inner: Mitigator = field(default_factory=Mitigator)
    finetune: dict = field(default_factory=dict)
    cache_dir: str = ""
    finetuner: Finetuner | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.strength = self.inner.strength
        self._plain = PlainFinetune(finetune=self.finetune, cache_dir=self.cache_dir, finetuner=self.finetuner)
        self.fit_report: dict = {}

    @property
    def name(self) -> str:                         # type: ignore[override]
        return self.inner.name

    @property
    def strength_unit(self) -> str:                # type: ignore[override]
        return self.inner.strength_unit

    def fit(self, model: DiffusionModel, *, memorized: list[str], reference: list[str], seed: int = 0) -> None:
        self._plain.fit(model, seed=seed)
        self.inner.fit(self._plain.finetuned, memorized=memorized, reference=reference, seed=seed)
        self.fit_report = {**self._plain.fit_report, "inner_fit": type(self.inner).__name__}

    def generate(self, model: DiffusionModel, prompts: list[str], seeds: list[int], spec: GenSpec,
                 *, seed: int = 0) -> SampleResult:
        ft = self._plain.finetuned
        if ft.counter is not model.counter:
            raise RuntimeError(f"{self.name}: generate got a different model than fit; call fit on it first")
        return self.inner.generate(ft, prompts, seeds, spec, seed=seed)

    def params(self) -> dict:
        return {**self.inner.params(), "applied_to": "plain fine-tune (organism_finetune protocol)",
                "finetune": dataclasses.asdict(self._plain.protocol())}
