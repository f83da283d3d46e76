"""One import root: the installed project adds `soundnet` and nothing with a generic top-level name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

STAGES = ("ingest", "teachers", "shards", "student", "evaluate")
COMMANDS = ("ingest", "student", "evaluate", "shards")
BIN = Path(sys.executable).parent


def python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter outside the repository, so only what is installed can be imported."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | env
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=environ, capture_output=True, text=True, timeout=120, check=False
    )


def test_stage_packages_import_under_soundnet_only(tmp_path: Path) -> None:
    code = (
        "import importlib, importlib.util\n"
        f"for stage in {STAGES!r}:\n"
        "    importlib.import_module('soundnet.' + stage)\n"
        "    assert importlib.util.find_spec(stage) is None, stage\n"
        "print('ok')\n"
    )
    result = python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_only_soundnet_is_a_top_level_name_of_the_distribution(tmp_path: Path) -> None:
    code = "import importlib.metadata as m; print(m.distribution('soundnet-distill').read_text('top_level.txt'))"
    result = python(code, tmp_path)  # outside the repository: the installed metadata, not a source tree's
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["soundnet"]


def test_a_third_party_package_named_evaluate_is_not_shadowed(tmp_path: Path) -> None:
    """Hugging Face's `evaluate` (or any package of that name) stays importable beside ours, and our `evaluate`
    command still runs our code."""
    site = tmp_path / "site"
    (site / "evaluate").mkdir(parents=True)
    (site / "evaluate" / "__init__.py").write_text("WHO = 'third party'\n")
    result = python("import evaluate; print(evaluate.WHO)", tmp_path, PYTHONPATH=str(site))
    assert result.stdout.strip() == "third party", result.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    help_text = subprocess.run(
        [BIN / "evaluate", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert "svm" in help_text


@pytest.mark.parametrize("group", COMMANDS)
def test_python_dash_m_soundnet_runs_every_command_group(group: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "soundnet", group, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert f"python -m soundnet {group}" in result.stdout


def test_python_dash_m_soundnet_names_the_groups_when_misused(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "soundnet", "teach"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "ingest|student|evaluate|shards" in result.stderr
