"""Acceptance study of the token-significance explainer on the organism (issue 6; methods.md 1b).

    python -m tasks.studies.explain_study      (make explain-study)

For every memorized evaluation prompt of the planted families (MV, FG, BG as the issue asks; RV and
TV reported beside them) it explains the prompt and asks two questions.

(a) Do the planted trigger tokens rank on top? MemWorld captions are built as
    ``<rare1> <rare2> <noun>`` (``TITLE_NOUNS``): the whole MV caption; the FG caption's shared
    phrase before ``on <background>``; the BG caption's shared phrase after ``a <colour> <shape> in
    the``. Trigger = the tokens of the two rare words (primary; the noun is shared by every prompt of
    the family and by its controls) or of the whole phrase (rare words + noun; reported beside).
    ``top2_in_trigger``: both top-2 tokens are trigger tokens (the strict reading, target >= 70%);
    ``top2_hits_trigger``: at least one is; each beside its chance rate under a random ranking.
(b) Wen's Figure-3 experiment: DELETING the top-2 tokens (token-level deletion; surviving word
    pieces of a word are re-joined, so "red ##vel ##vet" minus "##vel" reads "redvet") lowers the
    detector score (noise magnitude) more than deleting 2 other tokens. The random baseline is
    exact, not sampled: every pair of tokens is deleted and scored, and the "random other" drop is
    the mean over the pairs disjoint from the top-2 (defined for prompts of >= 4 tokens; shorter
    prompts are counted and left out of that comparison), "random any" the mean over all pairs.
(c) Diagnostics for (a): the score drop when the rare-word trigger tokens are deleted, and a
    perturbation "oracle": the pair whose deletion lowers the detector score most. If the oracle's pair
    is not the trigger either, the detector itself responds more to other tokens than to the planted
    trigger, and an explainer faithful to the detector should not put the trigger on top.

Outputs, named by organism version (``<name>`` = ``explain_study_<version>[_<tag>]``):
results/<name>.csv (per prompt), results/<name>_tokens.csv (per token), results/<name>.md (summary
table), results/<name>.json (protocol + summary), results/plots/<name>.png.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from math import comb
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from baselines.detectors.noise_magnitude import NoiseMagnitude
from baselines.explainers.token_significance import TokenScores, TokenSignificance
from bench.core.atomic import atomic_to_csv, atomic_write_text
from bench.core.model import DiffusionModel
from tasks.memworld import TITLE_NOUNS, VARIANT_WORDS, MemWorld

STUDY_FAMILIES = ("MV", "FG", "BG", "RV", "TV")
ISSUE_FAMILIES = ("MV", "FG", "BG")


# ---------------------------------------------------------------------- tokens and words
def token_words(model: DiffusionModel, prompt: str, res: TokenScores) -> list[int]:
    """Word index (whitespace split) of every displayed token; both CLIP BPE and WordPiece tokenize
    word by word, which is checked, so a mismatch is an error rather than a silent misalignment."""
    words = prompt.split()
    per_word = [model.tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    flat = [i for ids in per_word for i in ids]
    if flat != list(res.token_ids):
        raise ValueError(f"tokens of {prompt!r} do not split by words ({flat} vs {res.token_ids}); "
                         "token_words needs a tokenizer that works word by word and an untruncated prompt")
    return [w for w, ids in enumerate(per_word) for _ in ids]


def trigger_word_sets(prompt: str, family: str) -> tuple[set[int], set[int]]:
    """(rare-word indices, phrase indices) of a planted caption: the two words before the family noun
    (organism v1), or, for titles without a noun (v2), the two title words by the family's caption
    form: the first two words (MV, RV, TV, FG) or the last two (BG: "a <colour> <shape> in the <w1> <w2>")."""
    words = prompt.split()
    noun = TITLE_NOUNS[family]
    at = [i for i, w in enumerate(words) if w == noun]
    if not at:
        form = {"MV": len(words) == 2, "RV": len(words) == 2, "TV": len(words) == 3 and words[2] in VARIANT_WORDS,
                "FG": len(words) >= 4 and words[2] == "on", "BG": len(words) == 7 and words[3:5] == ["in", "the"]}
        if not form.get(family):
            raise ValueError(f"{family} prompt {prompt!r} does not hold a two-word title of its family's form")
        first = 5 if family == "BG" else 0
        return {first, first + 1}, {first, first + 1}
    if len(at) != 1 or at[0] < 2:
        raise ValueError(f"{family} prompt {prompt!r} does not hold one '<rare> <rare> {noun}' phrase")
    return {at[0] - 2, at[0] - 1}, {at[0] - 2, at[0] - 1, at[0]}


def delete_tokens(res: TokenScores, word_of: list[int], drop: set[int]) -> str:
    """The prompt with the displayed tokens ``drop`` deleted; surviving pieces of a word re-joined."""
    words: dict[int, str] = {}
    for i, (text, w) in enumerate(zip(res.tokens, word_of)):
        if i not in drop:
            words[w] = words.get(w, "") + (text[2:] if text.startswith("##") else text)
    return " ".join(words[w] for w in sorted(words))


# ---------------------------------------------------------------------- (a) trigger ranks
def rank_hits(ranking: np.ndarray, trigger: np.ndarray) -> dict:
    """Hits of the top-2 tokens on a boolean trigger mask, with chance rates of a random ranking."""
    T, m = len(trigger), int(trigger.sum())
    top2 = trigger[ranking[:2]]
    pairs = comb(T, 2)
    return {"top1_in_trigger": bool(top2[0]), "top2_in_trigger": bool(top2.all()),
            "top2_hits_trigger": bool(top2.any()), "chance_top1": m / T,
            "chance_top2_in": comb(m, 2) / pairs, "chance_top2_hits": 1 - comb(T - m, 2) / pairs}


# ---------------------------------------------------------------------- the study
def study_prompts(world: MemWorld, families=STUDY_FAMILIES) -> list:
    return [e for e in world.eval_prompts if e.label == 1 and e.group in families]


def run_study(model: DiffusionModel, world: MemWorld, explainer: TokenSignificance,
              detector: NoiseMagnitude, *, seed: int = 0, families=STUDY_FAMILIES,
              progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    from tqdm.auto import tqdm

    rows, tokens, edits = [], [], []
    for e in tqdm(study_prompts(world, families), desc="explain", disable=not progress):
        res = explainer.explain(model, e.prompt, seed=seed)
        word_of = token_words(model, e.prompt, res)
        rare_w, phrase_w = trigger_word_sets(e.prompt, e.family)
        rare = np.array([w in rare_w for w in word_of])
        phrase = np.array([w in phrase_w for w in word_of])
        order = res.ranking()
        top2 = tuple(sorted(order[:2].tolist()))
        row = {"id": e.id, "family": e.family, "prompt": e.prompt, "n_tokens": len(res.tokens),
               "n_rare_tokens": int(rare.sum()), "n_phrase_tokens": int(phrase.sum()),
               "top2_tokens": " | ".join(res.tokens[i] for i in order[:2]),
               "tokens": " ".join(res.tokens), "scores": " ".join(f"{s:.4g}" for s in res.scores)}
        row.update({f"rare_{k}": v for k, v in rank_hits(order, rare).items()})
        row.update({f"phrase_{k}": v for k, v in rank_hits(order, phrase).items()})
        pairs = list(itertools.combinations(range(len(res.tokens)), 2))
        row["prompt_top2_deleted"] = delete_tokens(res, word_of, set(top2))
        trig = {i for i in range(len(res.tokens)) if rare[i]}
        edits.append((len(rows), e.prompt, pairs, [delete_tokens(res, word_of, set(p)) for p in pairs], top2,
                      trig, delete_tokens(res, word_of, trig)))
        rows.append(row)
        rank = np.empty(len(order), int)
        rank[order] = np.arange(1, len(order) + 1)
        tokens += [{"id": e.id, "family": e.family, "index": i, "token": t, "word": word_of[i],
                    "rare": bool(rare[i]), "phrase": bool(phrase[i]), "score": float(res.scores[i]),
                    "rank": int(rank[i])} for i, t in enumerate(res.tokens)]
    _edit_scores(model, detector, rows, edits, seed=seed)
    return pd.DataFrame(rows), pd.DataFrame(tokens)


def _edit_scores(model, detector, rows, edits, *, seed: int) -> None:
    """Detector score of every prompt, of every 2-token deletion of it and of the deletion of its rare-word
    trigger tokens (one batched call). The best-deletion pair is a perturbation "oracle" explainer: the pair
    the detector itself is most sensitive to."""
    texts = [t for _, p, _, ed, _, _, trig_text in edits for t in [p, *ed, trig_text]]
    uniq = list(dict.fromkeys(texts))
    score = dict(zip(uniq, detector.score(model, uniq, seed=seed).tolist()))
    for r, p, pairs, ed, top2, trig, trig_text in edits:
        s0 = score[p]
        drop = {pair: s0 - score[t] for pair, t in zip(pairs, ed)}
        best = max(drop, key=drop.get)
        other = [d for pair, d in drop.items() if not set(pair) & set(top2)]
        all_d = np.array(list(drop.values()))
        rows[r].update({
            "score": s0, "score_top2_deleted": s0 - drop[top2], "drop_top2": drop[top2],
            "drop_random_other": float(np.mean(other)) if other else np.nan,
            "drop_random_any": float(all_d.mean()), "drop_best_pair": float(all_d.max()),
            "n_other_pairs": len(other),
            "drop_trigger_deleted": s0 - score[trig_text], "best_pair": " ".join(map(str, best)),
            "oracle_top2_in_trigger": set(best) <= trig,
            # share of all token pairs whose deletion lowers the score less than the top-2 deletion
            "top2_drop_percentile": float((all_d < drop[top2]).mean() + 0.5 * (all_d == drop[top2]).mean()),
        })


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    def agg(sub: pd.DataFrame, name: str) -> dict:
        comp = sub[sub["n_other_pairs"] > 0]

        def new_col(c: str) -> float:      # columns added after the first published runs: NaN there ("–")
            return sub[c].astype(float).mean() if c in sub else np.nan
        return {
            "family": name, "n": len(sub),
            "top2_in_rare": sub["rare_top2_in_trigger"].mean(), "chance_in_rare": sub["rare_chance_top2_in"].mean(),
            "top2_hits_rare": sub["rare_top2_hits_trigger"].mean(),
            "chance_hits_rare": sub["rare_chance_top2_hits"].mean(),
            "top2_in_phrase": sub["phrase_top2_in_trigger"].mean(),
            "chance_in_phrase": sub["phrase_chance_top2_in"].mean(),
            "top1_in_rare": sub["rare_top1_in_trigger"].mean(),
            "score": sub["score"].mean(), "score_top2_deleted": sub["score_top2_deleted"].mean(),
            "drop_top2": sub["drop_top2"].mean(), "drop_random_any": sub["drop_random_any"].mean(),
            "n_cmp": len(comp), "score_cmp": comp["score"].mean(), "drop_top2_cmp": comp["drop_top2"].mean(),
            "drop_random_other_cmp": comp["drop_random_other"].mean(),
            "share_top2_gt_other": (comp["drop_top2"] > comp["drop_random_other"]).mean(),
            "top2_drop_percentile": sub["top2_drop_percentile"].mean(),
            "oracle_top2_in_rare": new_col("oracle_top2_in_trigger"),
            "drop_trigger_deleted": new_col("drop_trigger_deleted"),
        }
    fams = [f for f in STUDY_FAMILIES if f in set(df["family"])]
    out = [agg(df[df["family"] == f], f) for f in fams]
    issue = df[df["family"].isin(ISSUE_FAMILIES)]
    if len(issue) and len(issue) < len(df):
        out.append(agg(issue, "+".join(f for f in ISSUE_FAMILIES if f in fams)))
    out.append(agg(df, "all"))
    return pd.DataFrame(out)


# ---------------------------------------------------------------------- report
def markdown(summary: pd.DataFrame, protocol: dict) -> str:
    def pct(v):
        return "–" if pd.isna(v) else f"{100 * v:.0f}%"

    head = ["family", "n", "top-2 both rare-word tokens (chance)", "≥1 of top-2 rare (chance)",
            "top-2 both phrase tokens (chance)", "NM score", "after deleting top-2", "drop: top-2",
            "prompts ≥ 4 tokens", "drop: top-2 / 2 random other", "top-2 drop > random other",
            "top-2 drop percentile among all pairs", "oracle: best-deletion pair both rare (chance)",
            "drop: rare-word tokens deleted"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for _, r in summary.iterrows():
        lines.append("| " + " | ".join([
            r["family"], str(r["n"]), f"{pct(r['top2_in_rare'])} ({pct(r['chance_in_rare'])})",
            f"{pct(r['top2_hits_rare'])} ({pct(r['chance_hits_rare'])})",
            f"{pct(r['top2_in_phrase'])} ({pct(r['chance_in_phrase'])})", f"{r['score']:.3f}",
            f"{r['score_top2_deleted']:.3f}", f"{r['drop_top2']:.3f}", str(r["n_cmp"]),
            f"{r['drop_top2_cmp']:.3f} / {r['drop_random_other_cmp']:.3f}", pct(r["share_top2_gt_other"]),
            pct(r["top2_drop_percentile"]), f"{pct(r['oracle_top2_in_rare'])} ({pct(r['chance_in_rare'])})",
            "–" if pd.isna(r["drop_trigger_deleted"]) else f"{r['drop_trigger_deleted']:.3f}"]) + " |")
    proto = ", ".join(f"{k}={v}" for k, v in protocol.items())
    return "\n".join(["# Token-significance explainer on the organism (issue 6)", "",
                      f"Protocol: {proto}.", "", *lines, ""])


def plot(summary: pd.DataFrame, out_png: str | Path) -> Path:
    fig = Figure(figsize=(11, 3.8))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    x = np.arange(len(summary))
    w = 0.2
    for j, (col, ch, lab) in enumerate([("top2_in_rare", "chance_in_rare", "top-2 both rare-word tokens"),
                                        ("top2_hits_rare", "chance_hits_rare", "≥1 of top-2 rare-word")]):
        ax1.bar(x + (2 * j - 1.5) * w, summary[col], w, label=lab)
        ax1.bar(x + (2 * j - 0.5) * w, summary[ch], w, label=f"chance ({lab})", alpha=0.45)
    ax1.axhline(0.7, color="k", ls=":", lw=1, label="target 70%")
    ax1.set_xticks(x, summary["family"], rotation=20, fontsize=8)
    ax1.set_ylabel("share of memorized prompts")
    ax1.set_ylim(0, 1.05)
    ax1.set_title("(a) planted trigger among the top-2 tokens", fontsize=9)
    ax1.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    # same prompts in all three bars: those with >= 4 tokens (2 other tokens exist besides the top-2)
    base = summary["score_cmp"]
    for j, (val, lab) in enumerate([(base, "original"), (base - summary["drop_top2_cmp"], "top-2 tokens deleted"),
                                    (base - summary["drop_random_other_cmp"], "2 random other tokens deleted")]):
        ax2.bar(x + (j - 1) * w, val, w, label=lab)
    ax2.set_xticks(x, summary["family"], rotation=20, fontsize=8)
    ax2.set_ylabel("noise-magnitude score (higher = more memorized)")
    ax2.set_title("(b) deleting tokens (Wen Fig. 3), prompts of >= 4 tokens", fontsize=9)
    ax2.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight", metadata={"Software": None})
    return out


def main(argv: list[str] | None = None) -> None:
    from tasks.organism_task import world_for
    from tasks.organism import DEFAULT_VERSION, ORGANISMS, load_organism, organism_config

    ap = argparse.ArgumentParser(description="token-significance acceptance study on the organism")
    ap.add_argument("--out", default="results", help="folder for explain_study_<version>[_<tag>].* "
                    "(plot under plots/)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--version", default=DEFAULT_VERSION, choices=sorted(ORGANISMS), help="organism version")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-gen", type=int, default=1, help="explainer generations")
    ap.add_argument("--target-steps", type=int, default=50, help="explainer: first k of 50 steps")
    ap.add_argument("--swap-guidance-quirk", action="store_true")
    ap.add_argument("--det-n-gen", type=int, default=4, help="noise-magnitude detector generations")
    ap.add_argument("--det-steps", type=int, default=1, help="noise-magnitude detector: first k steps")
    ap.add_argument("--tag", default="", help="suffix for the output names after the version (variants)")
    ap.add_argument("--rebuild", action="store_true",
                    help="only rebuild the .md/.json/.png from an existing explain_study_<version>[_<tag>].csv")
    a = ap.parse_args(argv)
    out, tag = Path(a.out), f"_{a.version}" + (a.tag and f"_{a.tag}")
    out.mkdir(parents=True, exist_ok=True)
    if a.rebuild:
        protocol = json.loads((out / f"explain_study{tag}.json").read_text())["protocol"]
        write_report(pd.read_csv(out / f"explain_study{tag}.csv", dtype={"id": str}), protocol, out, tag)
        return
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    model = load_organism(organism_config(a.version))
    world = world_for(None, model)
    explainer = TokenSignificance(n_gen=a.n_gen, target_steps=a.target_steps,
                                  swap_guidance_quirk=a.swap_guidance_quirk)
    detector = NoiseMagnitude(n_gen=a.det_n_gen, steps=a.det_steps)
    df, tok = run_study(model, world, explainer, detector, seed=a.seed)
    protocol = {"model": model.name, "explainer": f"n_gen={a.n_gen} target_steps={a.target_steps}/50 "
                f"guidance=7.5 swap_guidance_quirk={a.swap_guidance_quirk}",
                "detector": f"noise_magnitude n_gen={a.det_n_gen} k={a.det_steps}", "seed": a.seed,
                "edit": "token deletion", "seconds": round(time.perf_counter() - t0, 1)}
    atomic_to_csv(df, out / f"explain_study{tag}.csv", index=False, float_format="%.6g")
    atomic_to_csv(tok, out / f"explain_study{tag}_tokens.csv", index=False, float_format="%.6g")
    write_report(df, protocol, out, tag)


def write_report(df: pd.DataFrame, protocol: dict, out: Path, tag: str = "") -> None:
    summary = summarize(df)
    md = markdown(summary, protocol)
    atomic_write_text(out / f"explain_study{tag}.md", md)
    atomic_write_text(out / f"explain_study{tag}.json", json.dumps({"protocol": protocol,
                                                                    "summary": summary.to_dict("records")},
                                                                   indent=2, default=float))
    plot(summary, out / "plots" / f"explain_study{tag}.png")
    print(md)


if __name__ == "__main__":
    main()
