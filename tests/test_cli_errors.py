"""Issue 16 items 8 and 9: user errors end a command with one clear line and a documented exit code (no
traceback), the two wrong hints are fixed, and a missing organism is never trained implicitly."""
from __future__ import annotations

import pytest

EXIT_CONFIG, EXIT_INPUT, EXIT_MODEL = 2, 3, 7          # documented in bench/errors.py and `diffmem --help`


def _cli(capsys, *args) -> tuple[int, str, str]:
    from bench.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_missing_model_folder_is_one_line_and_exit_model(tmp_path, capsys):
    code, _, err = _cli(capsys, "detect", "model=sd14", f"model.path={tmp_path}/nope", f"runs_dir={tmp_path}/r")
    line = _one_line(err)
    assert code == EXIT_MODEL and line.startswith("diffmem detect: error: model folder") and "does not exist" in line


def test_bin_weights_are_one_line_and_exit_model(tmp_path, capsys):
    (tmp_path / "m" / "unet").mkdir(parents=True)
    (tmp_path / "m" / "unet" / "config.json").write_text("{}")
    (tmp_path / "m" / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    code, _, err = _cli(capsys, "detect", "model=sd15", f"model.path={tmp_path}/m", f"runs_dir={tmp_path}/r")
    line = _one_line(err)
    assert code == EXIT_MODEL and "unet/diffusion_pytorch_model.safetensors" in line and "safetensors" in line


def test_folder_model_without_path_is_a_config_error(tmp_path, capsys):
    code, _, err = _cli(capsys, "detect", "model=sd21", f"runs_dir={tmp_path}/r")
    assert code == EXIT_CONFIG and "model.path=/path/to/a/diffusers/folder" in _one_line(err)


def test_mitigate_and_explain_map_user_errors_too(tmp_path, capsys):
    code, _, err = _cli(capsys, "mitigate", "model=sd14", f"model.path={tmp_path}/nope", f"runs_dir={tmp_path}/r")
    assert code == EXIT_MODEL and "does not exist" in _one_line(err)
    code, _, err = _cli(capsys, "explain", f"out_dir={tmp_path}/e")            # neither prompt= nor prompts=
    assert code == EXIT_INPUT and "give exactly one of" in _one_line(err)


def test_exit_code_table():
    from bench import errors
    from bench.measure.calibration import CalibrationError
    from bench.errors import EXIT_NO_GROUNDTRUTH
    from bench.run.exit_codes import user_error_code
    from bench.core.model import ModelLoadError, PromptError
    from bench.run.screen import EXIT_BAD_FILE, EXIT_CALIBRATION, OutputConflictError, ScreenConfigError
    from bench.errors import GroundTruthError
    from tasks.organism import OrganismMissingError
    from bench.errors import PromptFileError

    assert (errors.EXIT_CONFIG, errors.EXIT_INPUT, errors.EXIT_MODEL) == (EXIT_CONFIG, EXIT_INPUT, EXIT_MODEL)
    assert EXIT_NO_GROUNDTRUTH == EXIT_BAD_FILE == EXIT_INPUT == 3        # screening's codes are kept
    assert user_error_code(ScreenConfigError("x")) == EXIT_CONFIG == 2
    assert user_error_code(PromptFileError("x")) == user_error_code(PromptError("x")) == 3
    assert user_error_code(GroundTruthError("x")) == 3
    assert user_error_code(CalibrationError("x")) == EXIT_CALIBRATION == 4
    assert user_error_code(OutputConflictError("x")) == 5
    assert user_error_code(ModelLoadError("x")) == user_error_code(OrganismMissingError("x")) == EXIT_MODEL == 7
    assert user_error_code(RuntimeError("a bug")) is None and user_error_code(FileNotFoundError("x")) is None


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    import bench.run.runner
    from bench.cli import main

    def boom(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(bench.run.runner, "build_model", boom)
    with pytest.raises(SystemExit) as e:           # Hydra prints the error and exits 1
        main(["detect", f"runs_dir={tmp_path}/r", f"leaderboard={tmp_path}/lb.csv"])
    assert e.value.code == 1


def test_hints_name_the_real_options(tmp_path):
    from bench.errors import PromptFileError
    from bench.run.prompt_file import load_prompt_file

    f = tmp_path / "p.data"
    f.write_text("x\n")
    with pytest.raises(PromptFileError) as e:
        load_prompt_file(f)
    assert "format=" in str(e.value) and "fmt=" not in str(e.value)
    g = tmp_path / "p.jsonl"
    g.write_text('{"caption": "a"}\n')
    with pytest.raises(PromptFileError) as e:
        load_prompt_file(g, column="text")
    assert "column=null" in str(e.value) and "column=None" not in str(e.value)


# ---------------------------------------------------------------------- item 9: no implicit training
def test_missing_organism_is_not_trained(tmp_path, monkeypatch):
    import tasks.organism as org

    def no_build(*a, **k):
        raise AssertionError("load_organism started a training")

    monkeypatch.setattr(org, "build", no_build)
    monkeypatch.setattr(org, "ARTIFACT_DIR", tmp_path / "artifacts")
    monkeypatch.setenv("DIFFMEM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as e:          # OrganismMissingError, a ModelLoadError
        org.load_organism(org.organism_config("v1"))
    msg = str(e.value)
    assert "make organism ORGANISM_VERSION=v1" in msg and "never done implicitly" in msg
    assert not (tmp_path / "cache").exists()


def test_cli_missing_organism_exits_with_the_make_command(tmp_path, monkeypatch, capsys):
    import tasks.organism as org

    monkeypatch.setattr(org, "build", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.setattr(org, "ARTIFACT_DIR", tmp_path / "artifacts")
    monkeypatch.setenv("DIFFMEM_CACHE", str(tmp_path / "cache"))
    code, _, err = _cli(capsys, "detect", "model.version=v1", f"runs_dir={tmp_path}/r")
    assert code == EXIT_MODEL and "make organism ORGANISM_VERSION=v1" in _one_line(err)


def test_test_size_organism_still_builds_implicitly(tmp_path, monkeypatch):
    import tasks.organism as org

    class Built(Exception):
        pass

    def build(cfg, d, **k):
        raise Built(d)

    monkeypatch.setattr(org, "build", build)
    monkeypatch.setenv("DIFFMEM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(Built) as e:
        org.load_organism(org.small_config())
    assert e.value.args[0].name.startswith("organism-test-")


def test_gpu_hardware_without_cuda_is_a_config_error(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = _cli(capsys, "detect", "hardware=gpu", "model=organism_small", f"runs_dir={tmp_path}/r")
    assert code == EXIT_CONFIG and "CUDA is not available here; use device=cpu" in _one_line(err)
