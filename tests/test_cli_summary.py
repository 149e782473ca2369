"""Issue 16 item 10: every command ends with a short summary on stdout (where it wrote, the headline
figure), and a screening records truncated prompts per row, naming the file's line (not the batch position)."""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest

from bench.run.screen import COLUMNS, read_output, run_screen

SMALL = ["model=organism_small", "hardware.threads=1"]


def _main(capsys, *args) -> tuple[int, str, str]:
    from bench.cli import main

    code = 0
    try:
        main(list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_detect_prints_auc_tpr_and_the_run_folder(tmp_path, capsys, small_organism):
    code, out, err = _main(capsys, "detect", *SMALL, "task.labels=planted", "task.max_per_group=1",
                           f"runs_dir={tmp_path}/runs", f"leaderboard={tmp_path}/lb.csv")
    assert code == 0, err
    last = out.strip().splitlines()[-1]
    m = re.search(r"AUC (\d\.\d{3})\s+TPR@1%FPR (\d\.\d{3}).* -> (\S+)", last)
    assert m and last.startswith("diffmem detect: nm_n1_k1"), out
    run = Path(m.group(3))
    metrics = json.loads((run / "metrics.json").read_text())
    assert m.group(1) == f"{metrics['auc']:.3f}" and m.group(2) == f"{metrics['tpr_at_1pct_fpr']:.3f}"


def test_explain_prints_its_output_folder(tmp_path, capsys, small_organism):
    code, out, err = _main(capsys, "explain", 'prompt="a red circle"', *SMALL, "explainer.steps=2",
                           "explainer.target_steps=1", f"out_dir={tmp_path}/ex")
    assert code == 0, err
    assert f"-> {tmp_path}/ex/scores.csv" in out and (tmp_path / "ex" / "scores.csv").is_file()


def test_mitigate_prints_copy_rate_and_utility_clip_per_strength(tmp_path, capsys, monkeypatch):
    import bench.run.mitigate

    def fake(cfg):
        return [{"mitigator": "rta", "strength": s, "copy_rate": c, "general_prompt_clip": u, "run": f"r{s}"}
                for s, c, u in ((4.0, 0.5, 0.25), (8.0, 0.125, 0.2))]

    monkeypatch.setattr(bench.run.mitigate, "run_mitigate", fake)
    code, out, _ = _main(capsys, "mitigate", "mitigator=rta", f"runs_dir={tmp_path}/runs")
    assert code == 0
    assert f"rta@4: copy rate 0.500  utility CLIP 0.250  -> {tmp_path}/runs/r4.0" in out
    assert "rta@8: copy rate 0.125  utility CLIP 0.200" in out


def _long(n: int) -> str:
    return " ".join(["sunflower"] * n)


def test_screen_records_truncation_per_row_by_file_line(tmp_path, capsys, small_organism):
    f = tmp_path / "mine.jsonl"
    prompts = ["a red circle", _long(80), "a blue square"]
    f.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    code, out, err = _main(capsys, "detect", f"prompts={f}", *SMALL, "calibration=none", f"out_dir={tmp_path}/o",
                           "batch_prompts=2")
    assert code == 0, err
    df = read_output(tmp_path / "o" / "mine.jsonl__organism-test__nm_n1_k1.csv")
    assert list(df.columns) == COLUMNS and list(df["truncated"]) == [0, 1, 0]
    assert f"{f}, line 2:" in err and "truncated" in err and "#1" not in err
    assert re.search(r"diffmem detect: scored 3 prompts, flagged 0, 1 truncated -> \S+mine.jsonl__", out), out


def test_screen_resumes_an_output_written_before_the_truncated_column(tmp_path, small_organism):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from bench.cli import CONF
    from bench.run.screen import LEGACY_COLUMNS

    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["a red circle", "a blue square"]))
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = OmegaConf.to_container(compose("screen", [f"prompts={f}", *SMALL, "calibration=none",
                                                        f"out_dir={tmp_path}/o"]), resolve=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = run_screen(cfg, model=small_organism, progress=False)
    rows = first.out.read_text().splitlines()
    legacy = [",".join(LEGACY_COLUMNS), rows[1].rsplit(",", 1)[0]]        # line 1 only, old layout
    first.out.write_text("\n".join(legacy) + "\n")
    again = run_screen(cfg, model=small_organism, progress=False)
    df = read_output(again.out)
    assert list(df.columns) == COLUMNS and list(df["line"]) == [1, 2]
    assert df["truncated"].isna().iloc[0] and df["truncated"].iloc[1] == 0    # unknown for the old row


@pytest.mark.parametrize("cmd", ["leaderboard"])
def test_leaderboard_names_what_it_wrote(cmd, tmp_path, capsys):
    code, out, _ = _main(capsys, cmd, str(tmp_path))
    assert code == 0 and "wrote" in out
