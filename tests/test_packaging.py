"""Issue 16 item 11: `pip install .` (not editable) ships the configs and the committed organism, so
`diffmem detect` works from any folder. The wheel's file list is checked (seconds); the full install
into a throwaway venv and a run from another folder is marked slow."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORGANISM = "tasks/artifacts/organism-v2"


def tracked(*patterns: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_every_package_of_the_checkout_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {str(Path(f).parent).replace("/", ".") for f in tracked("bench", "tasks", "baselines")
             if f.endswith("__init__.py")}
    assert found <= listed, f"packages missing from pyproject.toml [tool.setuptools] packages: {found - listed}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the tracked files (the checkout itself gets no build/ or egg-info)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    files = tracked()
    subprocess.run(["tar", "-cf", "-", *files], cwd=ROOT, check=True, stdout=open(src / "t.tar", "wb"))
    subprocess.run(["tar", "-xf", "t.tar"], cwd=src, check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(out), str(src)], check=True, capture_output=True)
    (whl,) = out.glob("diffmem-*.whl")
    return whl


def test_wheel_ships_configs_and_the_committed_organism(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in tracked("conf"):
        assert "bench/" + f in names, f"{f} is not in the wheel (as bench/{f})"
    for f in tracked(ORGANISM):
        assert f in names, f"{f} is not in the wheel"
    for f in tracked("bench", "tasks", "baselines"):
        if f.endswith(".py"):
            assert f in names, f"{f} is not in the wheel"
    assert not [n for n in names if n.startswith("tasks/artifacts/") and not n.startswith(ORGANISM + "/")]
    assert not [n for n in names if n.startswith("tests/")]


@pytest.mark.slow
def test_installed_wheel_detects_from_another_folder(wheel, tmp_path):
    """pip install (not editable) into a throwaway venv; its dependencies come from this interpreter's
    site-packages through a .pth file (appended after the venv's own, so the installed diffmem wins)."""
    import site

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "diffmem_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    env.pop("DIFFMEM_ORGANISM", None)
    where = subprocess.run([str(py), "-c", "import bench, tasks.organism as o; print(bench.__file__, o.ARTIFACT_DIR)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(purelib) and str(ROOT) not in where, where
    r = subprocess.run([str(venv / "bin" / "diffmem"), "detect", "task.max_per_group=1", "hardware.threads=1"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "diffmem detect: nm_n1_k1 on organism / organism-v2: AUC" in r.stdout, r.stdout
    assert list((work / "results" / "runs").glob("organism__organism-v2__nm_n1_k1__*/metrics.json"))
