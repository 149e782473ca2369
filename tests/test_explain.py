"""Token-significance explainer (Wen et al., methods.md 1b), `diffmem explain`, and the study helpers."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from baselines.explainers.token_significance import TokenSignificance, display_tokens
from bench.core.model import PromptError
from bench.core.patching import state_digest

FAST = dict(steps=10, target_steps=3)          # 3 target steps of a 10-step schedule: fast, > 1 step
PROMPT = "worcester mooney poster"


def model_state(model) -> tuple:
    grads = [n for m in (model.unet, model.text_encoder) for n, p in m.named_parameters() if p.grad is not None]
    return state_digest(model.unet), state_digest(model.text_encoder), model.unet.training, \
        model.text_encoder.training, grads


def test_one_finite_score_per_prompt_token_specials_excluded(small_organism):
    tok = small_organism.tokenizer
    res = TokenSignificance(**FAST).explain(small_organism, PROMPT, seed=0)
    own = tok(PROMPT, add_special_tokens=False)["input_ids"]
    assert res.token_ids == own                       # exactly the prompt's tokens, in order
    assert res.positions == list(range(1, len(own) + 1))   # position 0 is [CLS]
    assert not set(res.token_ids) & set(tok.all_special_ids)
    assert res.scores.shape == (len(own),) and np.isfinite(res.scores).all() and (res.scores > 0).all()
    assert res.per_step.shape == (3, len(own)) and res.noise_norm_per_step.shape == (3,)
    np.testing.assert_allclose(res.scores, res.per_step.mean(axis=0))
    assert res.tokens == [tok.decode([i]).strip() for i in own]
    df = res.to_frame()
    assert sorted(df["rank"]) == list(range(1, len(own) + 1))
    assert df.loc[df["rank"] == 1, "score"].item() == res.scores.max()


def test_clip_tokenizer_tokens_are_readable_and_padding_excluded(tiny_sd_path):
    from bench.core.model import load_model

    model = load_model(tiny_sd_path)
    res = TokenSignificance(**FAST).explain(model, PROMPT, seed=0)
    assert res.tokens == ["worcester", "mooney", "poster"]       # '</w>' stripped by the tokenizer
    assert res.raw_tokens == ["worcester</w>", "mooney</w>", "poster</w>"]
    assert res.positions == [1, 2, 3]                           # BOS at 0; EOS and EOS-padding after
    assert np.isfinite(res.scores).all()


def test_deterministic_per_seed_and_seed_matters(small_organism):
    ex = TokenSignificance(n_gen=2, **FAST)
    a = ex.explain(small_organism, PROMPT, seed=3)
    b = ex.explain(small_organism, PROMPT, seed=3)
    c = ex.explain(small_organism, PROMPT, seed=4)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert not np.allclose(a.scores, c.scores)


def test_model_untouched_bit_for_bit(small_organism):
    before = model_state(small_organism)
    rows = small_organism.counter.rows
    TokenSignificance(n_gen=2, **FAST).explain(small_organism, PROMPT, seed=0)
    assert model_state(small_organism) == before        # weights, requires_grad, hooks, eval mode, no .grad
    # CFG batch (2 rows per generation) + one gradient row per generation, per target step
    assert small_organism.counter.rows - rows == 3 * 2 * 3


def test_gradient_matches_finite_differences(small_organism):
    """A token's score is ||dL/de_p[i]||: central differences over every hidden unit of that position."""
    m = small_organism
    res = TokenSignificance(steps=10, target_steps=1).explain(m, PROMPT, seed=0)
    i, h = res.positions[1], 1e-2
    with torch.no_grad():
        e, e0 = m.encode([PROMPT]), m.encode([""])
        D = e.shape[-1]
        x, t = m.init_latents([0]), m.timesteps(10)[0]
        bump = torch.zeros(2 * D, *e.shape[1:])
        bump[torch.arange(D), i, torch.arange(D)] = h
        bump[D + torch.arange(D), i, torch.arange(D)] = -h
        emb = e + bump
        loss = (m.eps(x.expand(2 * D, -1, -1, -1), t, emb) - m.eps(x, t, e0)).double().flatten(1).norm(dim=1)
        grad = (loss[:D] - loss[D:]) / (2 * h)
        l0 = (m.eps(x, t, e) - m.eps(x, t, e0)).double().norm().item()
    np.testing.assert_allclose(grad.norm().item(), res.scores[1], rtol=0.05)
    np.testing.assert_allclose(res.noise_norm_per_step[0], l0, rtol=1e-4)


def test_swap_guidance_quirk_changes_trajectory_not_step0(small_organism):
    plain = TokenSignificance(**FAST)
    quirk = TokenSignificance(swap_guidance_quirk=True, **FAST)
    assert quirk.trajectory_guidance == pytest.approx(1 - 7.5)
    a = plain.explain(small_organism, PROMPT, seed=0)
    b = quirk.explain(small_organism, PROMPT, seed=0)
    np.testing.assert_allclose(a.per_step[0], b.per_step[0], rtol=1e-6)
    np.testing.assert_allclose(a.noise_norm_per_step[0], b.noise_norm_per_step[0], rtol=1e-6)
    assert not np.allclose(a.per_step[1:], b.per_step[1:], rtol=1e-3)
    assert b.params["swap_guidance_quirk"] is True and b.params["trajectory_guidance"] == -6.5


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_prompt_is_a_clear_error(small_organism, bad):
    with pytest.raises(PromptError, match="no tokens besides BOS/EOS/padding"):
        TokenSignificance(**FAST).explain(small_organism, bad, seed=0)
    with pytest.raises(PromptError, match="must be a string"):
        display_tokens(small_organism, None)


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="target_steps"):
        TokenSignificance(steps=10, target_steps=11)
    with pytest.raises(ValueError, match="n_gen"):
        TokenSignificance(n_gen=0)


# ---------------------------------------------------------------------- runner and CLI
EXPLAINER = {"_target_": "baselines.explainers.token_significance.TokenSignificance", **FAST}


def test_cli_writes_csv_and_png(tmp_path, small_organism):
    from bench.cli import main

    out = tmp_path / "one"
    main(["explain", f"prompt={PROMPT}", f"out_dir={out}", "model=organism_small", "hardware.threads=1",
          "explainer.steps=10", "explainer.target_steps=2"])
    df = pd.read_csv(out / "scores.csv")
    tok = small_organism.tokenizer
    assert list(df["token_id"]) == tok(PROMPT, add_special_tokens=False)["input_ids"]
    assert (df["prompt"] == PROMPT).all() and np.isfinite(df["score"]).all()
    png = out / "plots" / "000.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import json
    rec = json.loads((out / "explain.json").read_text())
    assert rec["params"]["target_steps"] == 2 and rec["source"]["prompt"] == PROMPT


def test_prompt_file_one_plot_per_prompt(tmp_path, small_organism):
    from bench.run.explain import run_explain

    f = tmp_path / "p.jsonl"
    f.write_text('{"id": "a", "prompt": "a red circle"}\n{"id": "b", "prompt": "clinch unsafe poster"}\n')
    out = run_explain({"prompts": str(f), "explainer": EXPLAINER, "root": str(tmp_path / "res")},
                      model=small_organism, progress=False)
    assert out == tmp_path / "res" / "p"                   # default name: the file's stem
    df = pd.read_csv(out / "scores.csv", dtype={"prompt_id": str})
    assert set(df["prompt_id"]) == {"a", "b"}
    assert {p.name for p in (out / "plots").iterdir()} == {"a.png", "b.png"}


def test_shards_merge_into_the_single_run(tmp_path, small_organism):
    from bench.run.explain import run_explain

    f = tmp_path / "p.jsonl"
    f.write_text("".join(f'{{"id": "{c}", "prompt": "{p}"}}\n' for c, p in
                         zip("abc", ["a red circle", "clinch unsafe poster", "a blue square on stripes"])))
    plain = run_explain({"prompts": str(f), "explainer": EXPLAINER, "root": str(tmp_path / "one")},
                        model=small_organism, progress=False)
    for i in (1, 0):                                       # any order: the last one merges
        run_explain({"prompts": str(f), "explainer": EXPLAINER, "root": str(tmp_path / "sh"), "shard": f"{i}/2"},
                    model=small_organism, progress=False)
    merged = tmp_path / "sh" / "p"
    a, b = pd.read_csv(plain / "scores.csv", dtype={"prompt_id": str}), pd.read_csv(merged / "scores.csv", dtype={"prompt_id": str})
    pd.testing.assert_frame_equal(a, b)
    assert {p.name for p in (merged / "plots").iterdir()} == {"a.png", "b.png", "c.png"}


@pytest.mark.parametrize("cfg,match", [({}, "exactly one of"), ({"prompt": "x", "prompts": "f.txt"}, "exactly one of"),
                                       ({"prompt": "  "}, "is empty")])
def test_explain_input_errors(cfg, match, small_organism):
    from bench.run.explain import ExplainInputError, run_explain

    with pytest.raises(ExplainInputError, match=match):
        run_explain({**cfg, "explainer": EXPLAINER}, model=small_organism, progress=False)


# ---------------------------------------------------------------------- study helpers
def test_rank_hits_chance_matches_enumeration():
    from tasks.studies.explain_study import rank_hits

    trig = np.array([True, False, True, True, False])
    perms = list(itertools.permutations(range(5)))
    hits = [rank_hits(np.array(p), trig) for p in perms]
    ref = hits[0]
    assert ref["chance_top2_in"] == pytest.approx(np.mean([h["top2_in_trigger"] for h in hits]))
    assert ref["chance_top2_hits"] == pytest.approx(np.mean([h["top2_hits_trigger"] for h in hits]))
    assert ref["chance_top1"] == pytest.approx(np.mean([h["top1_in_trigger"] for h in hits]))


def test_trigger_words_and_deletion(small_organism, small_world):
    from tasks.studies.explain_study import delete_tokens, token_words, trigger_word_sets

    fam = {e.family: e for e in small_world.eval_prompts if e.label == 1}
    for f, e in fam.items():
        rare, phrase = trigger_word_sets(e.prompt, f)
        words = e.prompt.split()
        assert rare < phrase and len(rare) == 2 and words[max(phrase)] in ("poster", "print", "case",
                                                                            "mascot", "room")
    with pytest.raises(ValueError, match="does not hold"):
        trigger_word_sets("a red circle", "MV")
    # organism-v2 titles carry no family noun: the two title words by the family's caption form
    assert trigger_word_sets("redvelvet medtech", "MV") == ({0, 1}, {0, 1})
    assert trigger_word_sets("redvelvet medtech amber", "TV") == ({0, 1}, {0, 1})
    assert trigger_word_sets("redvelvet medtech on a gradient", "FG") == ({0, 1}, {0, 1})
    assert trigger_word_sets("a red circle in the redvelvet medtech", "BG") == ({5, 6}, {5, 6})
    with pytest.raises(ValueError, match="does not hold"):
        trigger_word_sets("a red circle in the redvelvet", "BG")
    p = "a red circle in the redvelvet medtech room"
    res = TokenSignificance(**FAST).explain(small_organism, p, seed=0)
    word_of = token_words(small_organism, p, res)
    assert res.tokens[6:8] == ["##vel", "##vet"] and word_of[5:8] == [5, 5, 5]
    assert delete_tokens(res, word_of, set()) == p
    assert delete_tokens(res, word_of, {6}) == "a red circle in the redvet medtech room"
    assert delete_tokens(res, word_of, {0, 5}) == "red circle in the velvet medtech room"


def test_study_edit_scores_are_the_detector_scores(small_organism, small_world):
    from baselines.detectors.noise_magnitude import NoiseMagnitude
    from tasks.studies.explain_study import delete_tokens, run_study, summarize, token_words, trigger_word_sets

    det = NoiseMagnitude(n_gen=1, steps=1, total_steps=10)
    df, tok = run_study(small_organism, small_world, TokenSignificance(**FAST), det, families=("MV", "BG"),
                        progress=False)
    assert set(df["family"]) == {"MV", "BG"} and len(tok) == df["n_tokens"].sum()
    r = df.iloc[0]
    np.testing.assert_allclose(det.score(small_organism, [r["prompt"], r["prompt_top2_deleted"]], seed=0),
                               [r["score"], r["score_top2_deleted"]], rtol=1e-5)
    assert ((df["top2_drop_percentile"] >= 0) & (df["top2_drop_percentile"] <= 1)).all()
    # the rare-word deletion and the best-deletion ("oracle") pair are also the detector's own numbers
    b = df[df["family"] == "BG"].iloc[0]
    res = TokenSignificance(**FAST).explain(small_organism, b["prompt"], seed=0)
    word_of = token_words(small_organism, b["prompt"], res)
    rare_w, _ = trigger_word_sets(b["prompt"], "BG")
    trig = {i for i, w in enumerate(word_of) if w in rare_w}
    best = {int(i) for i in b["best_pair"].split()}
    s0, s_trig, s_best = det.score(small_organism, [b["prompt"], delete_tokens(res, word_of, trig),
                                                    delete_tokens(res, word_of, best)], seed=0)
    np.testing.assert_allclose([s0 - s_trig, s0 - s_best], [b["drop_trigger_deleted"], b["drop_best_pair"]],
                               rtol=1e-5, atol=1e-6)
    assert b["oracle_top2_in_trigger"] == (best <= trig)
    s = summarize(df)
    assert list(s["family"]) == ["MV", "BG", "all"]          # no MV+FG+BG row: it would equal "all"
    assert s.loc[2, "n"] == len(df)


def test_study_outputs_are_named_by_organism_version(tmp_path):
    """``--rebuild`` re-derives the summary, table and plot of a committed study from its per-prompt CSV;
    outputs carry the organism version (and the tag after it), so studies of different organisms never
    overwrite each other. Columns added after a study was run show as "–", not as a crash."""
    import shutil
    from pathlib import Path

    from tasks.studies.explain_study import main

    res = Path(__file__).resolve().parents[1] / "results"
    for ext in ("csv", "json"):
        shutil.copy(res / f"explain_study_v1_k1.{ext}", tmp_path / f"explain_study_v1_k1.{ext}")
    main(["--rebuild", "--version", "v1", "--tag", "k1", "--out", str(tmp_path)])
    md = (tmp_path / "explain_study_v1_k1.md").read_text()
    assert (tmp_path / "plots" / "explain_study_v1_k1.png").stat().st_size > 0
    row = next(line for line in md.splitlines() if line.startswith("| MV+FG+BG |"))
    assert "| 55% (25%) |" in row and row.endswith("| – (25%) | – |")   # v1 k1: README's 55%; no oracle yet
