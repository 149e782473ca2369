"""Running at scale (issue 8 items 1-3): prompt shards, their merge, Hydra launchers, multi-GPU config.

The acceptance test runs 3 shards as subprocesses through Hydra's submitit local launcher and checks
the merged run against one plain run: same leaderboard row (bar measured wall seconds), same
per-prompt rows in the same order, same score strings; then it tears one shard's last line as a
kill mid-write would, relaunches that shard, and gets the same result again.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bench.run.io import RunFolder
from bench.run.merge import ShardSetError, merge_runs_dir, merge_shards
from bench.run.runner import run_detect, shard_device
from bench.run.shard import Shard

CONF = str(Path(__file__).resolve().parents[1] / "conf")
SMALL = ["model=organism_small", "task.labels=planted", "detector=nm_n1_k1", "hardware.threads=1"]
TIMING = ["seconds_per_prompt"]            # measured wall time: the one thing a merge cannot reproduce


def cfg_for(runs: Path, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        c = compose("detect", overrides=[f"runs_dir={runs}", f"leaderboard={runs}.lb.csv", *SMALL, *overrides])
    return OmegaConf.to_container(c, resolve=True)


def rows(run_dir: Path) -> pd.DataFrame:
    """per_prompt.csv as strings on disk, without the measured seconds."""
    return pd.read_csv(run_dir / "per_prompt.csv", dtype=str, keep_default_na=False).drop(columns="seconds")


def same_result(plain_runs: Path, sharded_runs: Path, run: str, rescored: frozenset = frozenset()) -> None:
    """Identical leaderboard row, metrics and per-prompt rows (score strings included). ``rescored``:
    prompts a resume scored again in a batch of another size; the organism's float32 UNet rounds
    differently per batch size on CPU, so their scores match to float32 rounding, not bit for bit."""
    a = pd.read_csv(f"{plain_runs}.lb.csv").drop(columns=TIMING)
    b = pd.read_csv(f"{sharded_runs}.lb.csv").drop(columns=TIMING)
    pd.testing.assert_frame_equal(a, b)
    assert list(b["run"]) == [run]                            # no shard folder became a row
    ma = json.loads((plain_runs / run / "metrics.json").read_text())
    mb = json.loads((sharded_runs / run / "metrics.json").read_text())
    assert {k: v for k, v in ma.items() if k not in TIMING} == {k: v for k, v in mb.items() if k not in TIMING}
    ra, rb = rows(plain_runs / run), rows(sharded_runs / run)
    pd.testing.assert_frame_equal(ra.drop(columns="score"), rb.drop(columns="score"))   # same rows, same order
    again = ra["id"].isin(rescored).to_numpy()
    assert (ra["score"][~again] == rb["score"][~again]).all()                            # same score strings
    np.testing.assert_allclose(ra["score"][again].astype(float), rb["score"][again].astype(float), rtol=1e-6)
    assert not rb["id"].duplicated().any()


def test_three_submitit_shards_merge_to_the_plain_run_and_survive_a_torn_kill(tmp_path, small_organism):
    from bench.cli import main

    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    over = ["task.max_per_group=2"]
    ref = run_detect(cfg_for(plain, *over), model=small_organism, progress=False)
    main(["detect", "-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={tmp_path}/sweep", *SMALL, *over,
          f"runs_dir={sharded}", f"leaderboard={sharded}.lb.csv", "shard=0/3,1/3,2/3"])
    names = sorted(p.name for p in sharded.iterdir())
    assert names == [ref["run"]] + [f"{ref['run']}__shard-{i}of3" for i in range(3)]
    same_result(plain, sharded, ref["run"])
    man = json.loads((sharded / ref["run"] / "manifest.json").read_text())
    assert [m["shard"] for m in man["merged_from"]] == ["0/3", "1/3", "2/3"]
    n = ref["n_pos"] + ref["n_neg"]
    assert sum(len(rows(sharded / m["run"])) for m in man["merged_from"]) == n

    # kill shard 1 mid-write: its last row is cut inside the score (what is left still parses as a
    # number) and its manifest never got 'finished'
    s1 = sharded / f"{ref['run']}__shard-1of3"
    data = (s1 / "per_prompt.csv").read_bytes()
    last = data.rstrip(b"\r\n").rsplit(b"\n", 1)[1]
    score = last.split(b",")[6]
    assert len(score) > 6, score
    line_start = len(data.rstrip(b"\r\n")) - len(last)
    torn_id = last.split(b",")[0].decode()
    cut = line_start + last.index(score) + 4
    (s1 / "per_prompt.csv").write_bytes(data[:cut])
    m1 = json.loads((s1 / "manifest.json").read_text())
    (s1 / "manifest.json").write_text(json.dumps({**m1, "finished": None}))
    with pytest.raises(SystemExit, match="torn line"):
        main(["merge", str(s1.parent)])

    main(["detect", *SMALL, *over, f"runs_dir={sharded}", f"leaderboard={sharded}.lb.csv", "shard=1/3",
          f"hydra.run.dir={tmp_path}/run"])
    assert (s1 / "per_prompt.csv").read_bytes().startswith(data[:line_start])   # complete rows kept as they were
    assert len(rows(s1)) == len(m1["shard"]["ids"]) and not rows(s1)["id"].duplicated().any()
    same_result(plain, sharded, ref["run"], rescored=frozenset({torn_id}))


def test_torn_last_line_is_dropped_before_resume(tmp_path):
    run = RunFolder(tmp_path, "detect", "t", "m", "d", {"a": 1})
    run.append_rows([{"id": f"p{i}", "score": repr(0.123456789 * (i + 1))} for i in range(3)])
    data = run.per_prompt.read_bytes()
    run.per_prompt.write_bytes(data[:-8])                  # inside the last score: "0.3703" would parse
    assert run.done_ids() == {"p0", "p1"}
    assert run.per_prompt.read_bytes() == data[:data.rstrip(b"\r\n").rfind(b"\n") + 1]
    run.append_rows([{"id": "p2", "score": repr(0.370370367)}])
    df = run.read_rows()
    assert list(df["id"]) == ["p0", "p1", "p2"] and df["score"].iloc[2] == 0.370370367

    run.per_prompt.write_bytes(b"id,sc")                   # killed while writing the header
    assert run.done_ids() == set()
    run.append_rows([{"id": "p0", "score": "1.0"}])
    assert list(run.read_rows()["id"]) == ["p0"]


def test_merge_refuses_incomplete_mismatched_and_plain_sets(tmp_path, small_organism):
    from bench.cli import main

    a, b = tmp_path / "a", tmp_path / "b"
    over = ["task.max_per_group=1", "leaderboard=null"]
    run_detect(cfg_for(a, *over, "shard=0/2"), model=small_organism, progress=False)
    s0 = next(a.glob("*__shard-0of2"))
    with pytest.raises(ShardSetError, match=r"shard\(s\) 1/2 missing"):
        merge_shards([s0])
    with pytest.raises(SystemExit, match="incomplete shard set"):
        main(["merge", str(a)])
    run_detect(cfg_for(b, *over, "seed=1", "shard=1/2"), model=small_organism, progress=False)
    with pytest.raises(ShardSetError, match="config"):
        merge_shards([s0, next(b.glob("*__shard-1of2"))])

    plain = run_detect(cfg_for(a, *over), model=small_organism, progress=False)      # the whole run, unsharded
    run_detect(cfg_for(a, *over, "shard=1/2"), model=small_organism, progress=False)  # completes the set
    with pytest.raises(ShardSetError, match="not merged from shards"):
        merge_runs_dir(a)
    assert "merged_from" not in json.loads((a / plain["run"] / "manifest.json").read_text())

    run_detect(cfg_for(b, *over, "seed=1", "shard=0/3"), model=small_organism, progress=False)
    with pytest.raises(ShardSetError, match="different counts"):
        merge_runs_dir(b)


def test_bad_shard_spec_is_a_clear_error(tmp_path, small_organism):
    for spec, msg in (("3/3", "0 <= i < n"), ("1-3", "form i/n")):
        with pytest.raises(ValueError, match=msg):
            run_detect(cfg_for(tmp_path / "r", f"shard={spec}"), model=small_organism, progress=False)
    assert not (tmp_path / "r").exists()


def test_multi_gpu_hardware_runs_one_shard_per_gpu():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        c = compose("detect", overrides=["hardware=multi_gpu", "model=sd14", "model.path=/x", "shard=5/8"],
                    return_hydra_config=True)
    assert c.hydra.launcher._target_.endswith("JoblibLauncher") and c.hydra.launcher.n_jobs == -1
    assert c.model.device == "cuda:per_shard" and c.model.dtype == "float16" and c.shard == "5/8"
    assert shard_device(c.model.device, Shard.parse(c.shard), n_visible=4) == "cuda:1"
    assert shard_device(c.model.device, Shard.parse("2/4"), n_visible=4) == "cuda:2"
    assert shard_device("cpu", Shard.parse("2/4"), n_visible=0) == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        shard_device(c.model.device, Shard.parse("2/4"), n_visible=0)
    with pytest.raises(ValueError, match="needs a shard"):
        shard_device(c.model.device, Shard(), n_visible=4)


@pytest.mark.parametrize("launcher,target,fields", [
    ("slurm", "SlurmLauncher", {"gpus_per_node": 1, "max_num_timeout": 3, "timeout_min": 240}),
    ("local_procs", "JoblibLauncher", {"n_jobs": 2}),
    ("submitit_local", "LocalLauncher", {}),
])
def test_launcher_configs_compose(launcher, target, fields):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        c = compose("detect", overrides=[f"hydra/launcher={launcher}", "shard=0/2"], return_hydra_config=True)
    assert c.hydra.launcher._target_.endswith(target)
    assert {k: c.hydra.launcher[k] for k in fields} == fields
