"""`diffmem detect prompts=FILE`: per-prompt score / p-value / flag, formats, bad files and exit
codes, resume without loss or duplicates, shards, and calibration refusal (small organism)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from baselines.detectors.noise_magnitude import NoiseMagnitude
from bench.run import screen
from bench.measure.calibration import Calibration, CalibrationError, CalibrationMismatchError
from bench.run.calibrate_cmd import run_calibrate
from bench.run.screen import (EXIT_BAD_FILE, EXIT_CALIBRATION, EXIT_CONFIG, EXIT_LINES_REJECTED, merge_shards,
                              read_output, run_screen)
from bench.errors import PromptFileError

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def cfg_for(tmp_path, *overrides) -> dict:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        c = compose("screen", overrides=["model=organism_small", "hardware.threads=1",
                                         f"out_dir={tmp_path}/screen", f"calibration_dir={tmp_path}/cal",
                                         *overrides])
    return OmegaConf.to_container(c, resolve=True)


def jsonl(path: Path, prompts: list[str], key: str = "prompt") -> Path:
    path.write_text("".join(json.dumps({key: p, "n": i}) + "\n" for i, p in enumerate(prompts)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def world_prompts(small_world):
    neg = [e.prompt for e in small_world.eval_prompts if e.label == 0]
    pos = [e.prompt for e in small_world.eval_prompts if e.label == 1]
    return neg, pos


@pytest.fixture()
def calibrated(tmp_path, small_organism, world_prompts):
    """A calibration of organism-test / nm_n1_k1 / seed 0 on the small world's non-memorized prompts."""
    neg, _ = world_prompts
    ref = jsonl(tmp_path / "reference.jsonl", neg)
    path = run_calibrate(cfg_for(tmp_path, f"prompts={ref}"), model=small_organism)
    return Calibration.load(path)


def test_screen_writes_score_pvalue_flag(tmp_path, small_organism, world_prompts, calibrated):
    neg, pos = world_prompts
    prompts = pos[:6] + neg[:6]
    f = jsonl(tmp_path / "mine.jsonl", prompts)
    res = run_screen(cfg_for(tmp_path, f"prompts={f}", "alpha=0.05", "batch_prompts=5"), model=small_organism,
                     progress=False)
    assert res.exit_code == 0 and res.n_scored == 12 and res.n_rejected == 0
    df = read_output(res.out)
    assert list(df.columns) == screen.COLUMNS and list(df["line"]) == list(range(1, 13))
    assert list(df["prompt"]) == prompts
    direct = NoiseMagnitude().score(small_organism, prompts, seed=0)     # one batch, not three
    np.testing.assert_allclose(df["score"], direct, rtol=1e-5)
    np.testing.assert_array_equal(df["p_value"], calibrated.pvalues(df["score"]))
    np.testing.assert_array_equal(df["flag"], (df["p_value"] <= 0.05).astype(int))
    man = json.loads(res.manifest.read_text())
    assert man["calibration"]["n"] == calibrated.n and "P(p <= 0.05) <= 0.05" in man["calibration"]["guarantee"]
    assert man["identity"]["calibration_key"] == calibrated.key and man["n_scored"] == 12


def test_formats_and_configurable_column_give_the_same_scores(tmp_path, small_organism, world_prompts):
    neg, pos = world_prompts
    prompts = pos[:3] + neg[:3]
    files = {"jsonl": (jsonl(tmp_path / "p.jsonl", prompts, key="caption"), "caption")}
    pd.DataFrame({"id": range(6), "text": prompts}).to_csv(tmp_path / "p.csv", index=False)
    files["csv"] = (tmp_path / "p.csv", "text")
    pd.DataFrame({"id": range(6), "text": prompts}).to_csv(tmp_path / "p.tsv", index=False, sep="\t")
    files["tsv"] = (tmp_path / "p.tsv", "text")
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    files["txt"] = (tmp_path / "p.txt", "ignored")
    pd.DataFrame({"my_prompt": prompts, "k": range(6)}).to_parquet(tmp_path / "p.parquet")
    files["parquet"] = (tmp_path / "p.parquet", "my_prompt")
    scores = {}
    for fmt, (f, col) in files.items():
        res = run_screen(cfg_for(tmp_path, f"prompts={f}", f"column={col}", "calibration=none"),
                         model=small_organism, progress=False)
        df = read_output(res.out)
        assert list(df["prompt"]) == prompts and df["p_value"].isna().all() and df["flag"].isna().all(), fmt
        scores[fmt] = df["score"].to_numpy()
    for fmt, s in scores.items():
        np.testing.assert_array_equal(s, scores["jsonl"], err_msg=fmt)


def test_bad_lines_are_reported_with_line_numbers_and_the_rest_scored(tmp_path, small_organism, world_prompts):
    neg, _ = world_prompts
    lines = [json.dumps({"prompt": neg[0]}), json.dumps({"prompt": neg[1]}), '{"prompt": "broken',
             json.dumps({"prompt": neg[2]}), None, json.dumps({"text": "no prompt field"}), json.dumps({"prompt": neg[3]})]
    data = b"".join((b'{"prompt": "caf\xe9"}' if ln is None else ln.encode()) + b"\n" for ln in lines)
    (tmp_path / "bad.jsonl").write_bytes(data)
    res = run_screen(cfg_for(tmp_path, f"prompts={tmp_path / 'bad.jsonl'}", "calibration=none"),
                     model=small_organism, progress=False)
    assert res.exit_code == EXIT_LINES_REJECTED
    assert list(read_output(res.out)["line"]) == [1, 2, 4, 7]
    rej = pd.read_csv(res.rejected_file)
    assert list(rej["line"]) == [3, 5, 6]
    assert "malformed JSON" in rej["error"][0] and "not valid UTF-8: byte 0xe9" in rej["error"][1]
    assert "field 'prompt' missing" in rej["error"][2]


def test_interrupted_screen_resumes_without_loss_or_duplicates(tmp_path, small_organism, world_prompts,
                                                              monkeypatch):
    neg, pos = world_prompts
    prompts = (pos + neg)[:14]
    f = jsonl(tmp_path / "mine.jsonl", prompts)
    ref = run_screen(cfg_for(tmp_path, f"prompts={f}", "calibration=none", f"out={tmp_path}/ref.csv"),
                     model=small_organism, progress=False)
    c = cfg_for(tmp_path, f"prompts={f}", "calibration=none", "batch_prompts=4")
    calls, orig = {"n": 0}, NoiseMagnitude.score

    def flaky(self, model, ps, *, seed):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return orig(self, model, ps, seed=seed)

    monkeypatch.setattr(NoiseMagnitude, "score", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_screen(c, model=small_organism, progress=False)
    out = screen.output_path(c, f, small_organism.name, "nm_n1_k1", screen.Shard())
    assert len(read_output(out)) == 8
    with open(out, "a", encoding="utf-8") as fh:             # a kill in the middle of writing a row
        fh.write('9,"half a prom')
    monkeypatch.setattr(NoiseMagnitude, "score", orig)
    res = run_screen(c, model=small_organism, progress=False)
    df, want = read_output(res.out), read_output(ref.out)
    assert list(df["line"]) == list(range(1, 15)) and not df["line"].duplicated().any()
    np.testing.assert_allclose(df["score"], want["score"], rtol=1e-5)
    assert list(df["prompt"]) == prompts
    # a finished output is not rescored, and another input under the same output path is refused
    assert run_screen(c, model=small_organism, progress=False).n_scored == 14
    jsonl(f, prompts[:5])
    with pytest.raises(screen.OutputConflictError, match="prompts_file_sha256"):
        run_screen(c, model=small_organism, progress=False)


def test_shards_partition_the_lines_and_merge_to_the_whole_run(tmp_path, small_organism, world_prompts):
    neg, pos = world_prompts
    rows = [json.dumps({"prompt": p}) for p in (pos + neg)[:9]]
    rows.insert(4, "{not json")                                # line 5 is bad
    f = tmp_path / "mine.jsonl"
    f.write_text("\n".join(rows) + "\n", encoding="utf-8")
    whole = run_screen(cfg_for(tmp_path, f"prompts={f}", "calibration=none"), model=small_organism, progress=False)
    parts = [run_screen(cfg_for(tmp_path, f"prompts={f}", "calibration=none", f"shard={i}/3"),
                        model=small_organism, progress=False) for i in range(3)]
    assert len({p.out for p in parts}) == 3 and whole.out not in {p.out for p in parts}
    assert [list(read_output(p.out)["line"]) for p in parts] == [[1, 2, 3, 4], [6, 7], [8, 9, 10]]
    assert [list(pd.read_csv(p.rejected_file)["line"]) for p in parts] == [[], [5], []]
    merged, want = merge_shards([p.out for p in parts]), read_output(whole.out)
    assert list(merged["line"]) == list(want["line"])
    np.testing.assert_allclose(merged["score"], want["score"], rtol=1e-5)
    with pytest.raises(ValueError, match="more than one shard"):
        merge_shards([parts[0].out, parts[0].out])


def test_calibration_is_required_and_refused_for_another_detector(tmp_path, small_organism, world_prompts,
                                                                  calibrated):
    neg, _ = world_prompts
    f = jsonl(tmp_path / "mine.jsonl", neg[:3])
    with pytest.raises(CalibrationError, match="no calibration for model 'organism-test', detector 'nm_n4_k1'"):
        run_screen(cfg_for(tmp_path, f"prompts={f}", "detector=nm_n4_k1"), model=small_organism)
    cal_file = next((tmp_path / "cal").glob("organism-test__nm_n1_k1__*.json"))
    with pytest.raises(CalibrationMismatchError, match="detector_params.n_gen: calibration has 1, this run has 4"):
        run_screen(cfg_for(tmp_path, f"prompts={f}", "detector=nm_n4_k1", f"calibration={cal_file}"),
                   model=small_organism)
    with pytest.raises(CalibrationMismatchError, match="seed: calibration has 0, this run has 1"):
        run_screen(cfg_for(tmp_path, f"prompts={f}", "seed=1", f"calibration={cal_file}"), model=small_organism)
    with pytest.raises(CalibrationError, match=r"n=\d+ reference scores.*alpha=0.001"):
        run_screen(cfg_for(tmp_path, f"prompts={f}", "alpha=0.001"), model=small_organism)
    assert not (tmp_path / "screen").exists() or not list((tmp_path / "screen").glob("*.csv"))  # nothing scored


# ---------------------------------------------------------------------- CLI: messages and exit codes
def _cli(capsys, *args) -> tuple[int, str]:
    from bench.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("name, content, column, code, message", [
    ("missing_col.jsonl", '{"caption": "a"}\n', "prompt", EXIT_BAD_FILE, "column 'prompt' not found"),
    ("empty.jsonl", "", "prompt", EXIT_BAD_FILE, "file is empty"),
    ("latin1.csv", b"prompt\nok\ncaf\xe9\n", "prompt", EXIT_BAD_FILE, "not valid UTF-8: byte 0xe9 .*line 3"),
    ("all_bad.jsonl", "{x\n{y\n", "prompt", EXIT_BAD_FILE, "no valid prompt .*line 1: malformed JSON"),
    ("nope.jsonl", None, "prompt", EXIT_BAD_FILE, "prompt file not found"),
])
def test_cli_bad_files_exit_with_a_clear_error(tmp_path, capsys, name, content, column, code, message):
    import re

    f = tmp_path / name
    if content is not None:
        f.write_bytes(content if isinstance(content, bytes) else content.encode())
    got, err = _cli(capsys, "detect", f"prompts={f}", f"column={column}", f"out_dir={tmp_path}/o")
    assert got == code and re.search(message, err), err
    assert not (tmp_path / "o").exists()


def test_cli_bad_shard_is_a_config_error(tmp_path, capsys):
    f = jsonl(tmp_path / "p.jsonl", ["a"])
    code, err = _cli(capsys, "detect", f"prompts={f}", "shard=3/2")
    assert code == EXIT_CONFIG and "shard='3/2'" in err


def test_cli_routes_detect_with_prompts_to_screening(tmp_path, capsys, small_organism, world_prompts):
    neg, _ = world_prompts
    f = tmp_path / "mine.jsonl"
    f.write_text(json.dumps({"prompt": neg[0]}) + "\n{broken\n" + json.dumps({"prompt": neg[1]}) + "\n")
    code, err = _cli(capsys, "detect", f"prompts={f}", "model=organism_small", "hardware.threads=1",
                     "calibration=none", f"out_dir={tmp_path}/o")
    assert code == EXIT_LINES_REJECTED and "line 2: malformed JSON" in err
    out = tmp_path / "o" / "mine.jsonl__organism-test__nm_n1_k1.csv"
    assert list(read_output(out)["line"]) == [1, 3]
    code, err = _cli(capsys, "detect", f"prompts={f}", "model=organism_small", "hardware.threads=1",
                     f"calibration={tmp_path}/missing.json", f"out_dir={tmp_path}/o2")
    assert code == EXIT_CALIBRATION and "calibration file not found" in err
    with pytest.raises(PromptFileError):                       # calibrate is strict about its reference
        run_calibrate(cfg_for(tmp_path, f"prompts={f}"), model=small_organism)
