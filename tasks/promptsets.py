"""Prompt sets for memorization detection: the shipped labelled sets and random tokens.

    from tasks.promptsets import load_task
    task = load_task("webster500")            # 500 memorized + 2000 non-memorized, labels 1/0

The ``PromptSet`` type is the engine's (``bench.contracts``); a user's own prompt file is read by
``bench.run.prompt_file.load_prompt_file``.

Shipped files (``tasks/data/``, see PROVENANCE.md) are checked against checksums.sha256 on
every read. Nothing here touches the network.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

from bench.contracts import PromptSet, concat
from bench.errors import PromptFileError
from bench.run.prompt_file import _collect, _read_lines

DATA_DIR = Path(__file__).resolve().parent / "data"
CHECKSUM_FILE = "checksums.sha256"


def _expected_checksums() -> dict[str, str]:
    table = DATA_DIR / CHECKSUM_FILE
    if not table.is_file():
        raise PromptFileError(f"checksum table missing: {table}; the package data is incomplete")
    rows = [line.split() for line in table.read_text(encoding="utf-8").splitlines()]
    if any(len(r) != 2 or len(r[0]) != 64 for r in rows if r):
        raise PromptFileError(f"{table}: every line must read '<sha256>  <file name>'")
    return {name: digest.lower() for digest, name in (r for r in rows if r)}


def verify_checksums(files: Sequence[str] | None = None) -> dict[str, str]:
    """Check shipped files (default: all listed) against checksums.sha256 -> {name: sha256}.

    Raises PromptFileError naming the file and the expected and actual hash.
    """
    expected = _expected_checksums()
    return {name: hashlib.sha256(_read_shipped(name, expected)).hexdigest()
            for name in (expected if files is None else files)}


def _read_shipped(name: str, expected: dict[str, str] | None = None) -> bytes:
    """Read one shipped file and check its hash; callers parse exactly the bytes checked."""
    expected = _expected_checksums() if expected is None else expected
    path = DATA_DIR / name
    if name not in expected or not path.is_file():
        raise PromptFileError(f"shipped data file {path} is missing or not listed in "
                              f"{CHECKSUM_FILE}; the package data is incomplete")
    data = path.read_bytes()
    if (actual := hashlib.sha256(data).hexdigest()) != expected[name]:
        raise PromptFileError(f"checksum mismatch for {path}: expected {expected[name]}, actual "
                              f"{actual}; the shipped file was modified: restore it from git or "
                              f"rebuild it with tasks/data/make_subsets.py")
    return data


def _shipped_set(name: str, file: str, group: str, label: int, type_key: str | None = None,
                 extra_keys: dict[str, str] | None = None) -> PromptSet:
    """Load a shipped normalized jsonl (prompt under "caption", source row under "row")."""
    path = DATA_DIR / file
    numbers, recs, _ = _read_lines(_read_shipped(file), path, "jsonl", strict=True)
    _collect(path, "jsonl", "caption", recs, numbers, [], strict=True)  # validates prompts
    n = len(recs)
    # a null *type* means "not labelled": it becomes "" (unknown), never a guessed type
    types = [r.get(type_key) or "" for r in recs] if type_key else [""] * n
    extra = {k: [r.get(src) if not k.endswith("_type") else r.get(src) or "" for r in recs]
             for k, src in (extra_keys or {}).items()}
    return PromptSet(name=name, prompts=[r["caption"] for r in recs],
                     labels=np.full(n, label, np.int8), groups=[group] * n, types=types,
                     ids=[f"{group}:{r['row']}" for r in recs], sources=(file,), extra=extra)


def webster500(type_source: str = "nemo") -> PromptSet:
    """Webster's 500 memorized SD v1 prompts in Wen et al.'s order (labels all 1).

    ``types`` holds NeMo's VM/TM (all 500; VM means NeMo's max SSCD > 0.7) when type_source is
    "nemo", or Webster's MV/RV/TV/N ("" for the 148 prompts his bb-edge ground truth lacks) when
    "webster". ``extra`` always has nemo_type, webster_type, laion_index, url, nemo_max_sscd.
    """
    if type_source not in ("nemo", "webster"):
        raise ValueError(f"type_source must be 'nemo' or 'webster', got {type_source!r}")
    keys = {"nemo_type": "nemo_type", "webster_type": "webster_overfit_type",
            "laion_index": "index", "url": "url", "nemo_max_sscd": "nemo_max_sscd"}
    return _shipped_set("webster500", "sdv1_500_memorized_labeled.jsonl", "webster_mem", 1,
                        type_key=keys[f"{type_source}_type"], extra_keys=keys)


def webster_sdv2_219() -> PromptSet:
    """Webster's 219 memorized SD v2 prompts (SAIL's copy); types MV/TV."""
    return _shipped_set("webster_sdv2_219", "webster_sdv2_memorized_219.jsonl",
                        "webster_sdv2_mem", 1, type_key="overfit_type",
                        extra_keys={"laion_index": "index", "url": "url"})


@functools.lru_cache(maxsize=1)
def _clip_bpe():
    from open_clip.tokenizer import SimpleTokenizer  # imports torch: only when needed
    return SimpleTokenizer()  # ships its BPE vocabulary, works offline


def random_token_prompts(n: int, seed: int, max_tokens: int = 76) -> list[str]:
    """Wen et al.'s "random" negatives: decoded strings of k distinct random CLIP BPE tokens.

    Wen draws k = random.randrange(77) (0..76) distinct ids from the whole vocabulary. We draw
    k ~ U{1..76} because k = 0 decodes to "", the unconditional input of classifier-free
    guidance rather than a prompt, and we exclude <start_of_text>/<end_of_text>. Text is stripped
    (as HF's CLIP decode does); a draw that strips to "" is redrawn. Split UTF-8 byte tokens
    decode to U+FFFD, as in Wen's strings. Deterministic in ``seed`` (numpy Generator).
    """
    if n < 0 or not 1 <= max_tokens <= 76:
        raise ValueError(f"need n >= 0 and 1 <= max_tokens <= 76, got n={n}, max_tokens={max_tokens}")
    tok = _clip_bpe()
    regular = np.setdiff1d(np.arange(len(tok.encoder)), tok.all_special_ids)
    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < n:
        k = int(rng.integers(1, max_tokens + 1))  # default 1..76: CLIP's 77 positions hold 76 + <start>
        text = tok.decode(rng.choice(regular, size=k, replace=False).tolist()).strip()
        if text:
            out.append(text)
    return out


def nonmem2000(seed: int = 0) -> PromptSet:
    """500 each of LAION (NeMo), COCO 2017 val, Lexica (Gustavosta test) and random tokens."""
    rand = random_token_prompts(500, seed)
    return concat(f"nonmem2000_s{seed}", [
        _shipped_set("laion", "nonmem_laion_500_nemo.jsonl", "laion", 0,
                     extra_keys={"laion_index": "index", "url": "url"}),
        _shipped_set("coco", "nonmem_coco2017_val_500.jsonl", "coco", 0),
        _shipped_set("lexica", "nonmem_lexica_gustavosta_test_500.jsonl", "lexica", 0),
        PromptSet("random_tokens", rand, np.zeros(500, np.int8), ["random_tokens"] * 500,
                  [""] * 500, [f"random_tokens:s{seed}:{i}" for i in range(500)]),
    ])


def sail500() -> PromptSet:
    """SAIL's 500 mixed negatives. Groups sail_coco/lexica/tuxemon/gpt4 come from the line
    position (0-199, 200-299, 300-399, 400-499), not an upstream label (tasks/data/PROVENANCE.md).
    """
    s = _shipped_set("sail500", "nonmem_sail_sd1_mixed_500.jsonl", "sail", 0,
                     extra_keys={"source_inferred": "source_inferred"})
    groups = [f"sail_{g}" for g in s.extra["source_inferred"]]
    return PromptSet(s.name, s.prompts, s.labels, groups, s.types, s.ids, s.sources)


# name -> parts (positives first); SAIL uses the same 500 negatives for SD v1 and SD v2
TASKS = {
    "webster500": lambda seed: [webster500(), nonmem2000(seed)],
    "webster500_sail": lambda seed: [webster500(), sail500()],
    "webster_sdv2_219_sail": lambda seed: [webster_sdv2_219(), sail500()],
}


def load_task(name: str, seed: int = 0) -> PromptSet:
    """A detection task (positives labelled 1, then negatives 0); ``seed`` seeds random tokens."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {list(TASKS)}")
    return concat(name, TASKS[name](seed))


class PublishedTask:
    """A shipped labelled prompt set as a task (``conf/task/webster500*.yaml``: ``_target_`` names this class).
    It holds prompts only: no training images, so no world for the mitigation benchmark."""

    def __init__(self, name: str, seed: int = 0, **_):       # max_per_group, ...: read by the engine
        self.name, self.seed = name, int(seed)

    def prompt_set(self, model=None, mcfg: dict | None = None, weights: str | None = None) -> PromptSet:
        return load_task(self.name, seed=self.seed)

    def world(self, model=None, mcfg: dict | None = None):
        raise NotImplementedError(
            f"task={self.name}: the mitigation benchmark needs the training images that prompts copy; "
            "only the organism world ships them offline. For real runs build a training-neighbour index "
            "(bench.measure.retrieval) over your image folder and write a copy judge (bench.contracts.CopyJudge); "
            "see README 'Mitigation benchmark'.")
