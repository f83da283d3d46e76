"""The cluster files users start from (cluster/): they parse, and every command and option they use exists."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import click
import pytest

from soundnet.ingest.cli import main as ingest_cli
from soundnet.shards.cli import main as shards_cli

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
SCRIPTS = [CLUSTER / "slurm_ingest.sbatch", CLUSTER / "ray_start.sh"]


def option_names(command: click.Command) -> set[str]:
    return {name for param in command.params for name in getattr(param, "opts", [])}


def options_used(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))


def ray_start_options() -> set[str]:
    scripts = pytest.importorskip("ray.scripts.scripts")
    return option_names(scripts.start)


def ray_start_commands(text: str) -> list[str]:
    return [m.group(0) for m in re.finditer(r"ray start\b[^\n;]*", text)]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK)


def test_sbatch_header_and_commands() -> None:
    text = (CLUSTER / "slurm_ingest.sbatch").read_text()
    lines = text.splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = [line for line in lines if line.startswith("#SBATCH")]
    # Slurm reads #SBATCH lines only before the first command
    assert all(lines.index(d) < first_command for d in directives)
    options = dict(re.fullmatch(r"#SBATCH --([a-z-]+)(?:=(\S+))?", d).groups() for d in directives)
    assert int(options["nodes"]) >= 2 and options["ntasks-per-node"] == "1"  # one `ingest run` per node
    assert int(options["cpus-per-task"]) > 2 and re.fullmatch(r"\d+:\d\d:\d\d", options["time"])
    # every node runs `ingest run` with options the real command has, cooperating on one --out with --resume
    args = re.search(r"^args=\((.*?)^\)", text, re.S | re.M).group(1)
    assert options_used(args) <= option_names(ingest_cli.commands["run"])
    assert {"--out", "--resume", "--videos", "--workers"} <= options_used(args)
    assert re.search(r"^srun .*--ntasks-per-node=1 .*ingest run \"\$\{args\[@\]\}\"", text, re.M)
    assert re.search(r"^shards verify \"\$out\"$", text, re.M) and "verify" in shards_cli.commands


def test_ray_start_script_commands() -> None:
    text = (CLUSTER / "ray_start.sh").read_text()
    commands = ray_start_commands(text)
    assert len(commands) == 2
    head, worker = commands
    assert "--head" in head and "--address=" in worker
    for command in commands:
        assert "--disable-usage-stats" in command
        assert options_used(command) <= ray_start_options()
    assert "export RAY_AUTH_MODE=token" in text and "ray get-auth-token --generate" in text


def test_ray_start_script_refuses_clearly(tmp_path) -> None:
    script = str(CLUSTER / "ray_start.sh")
    usage = subprocess.run(["bash", script], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")} | {"HOME": str(tmp_path)}
    no_token = subprocess.run(["bash", script, "worker", "10.0.0.1:6379"], capture_output=True, text=True, env=env)
    assert no_token.returncode == 1 and "no Ray token on this node: copy ~/.ray/auth_token" in no_token.stderr


def test_ray_cluster_yaml() -> None:
    yaml = pytest.importorskip("yaml")  # installed with Ray
    ray_autoscaler = pytest.importorskip("ray.autoscaler")
    jsonschema = pytest.importorskip("jsonschema")
    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    schema = json.loads((Path(ray_autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the launcher's own schema
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    # a GPU node type (AWS families g* and p*) for the teacher actors, at least one of it kept up
    gpu = [t for t in workers.values() if re.match(r"[gp]\d", t["node_config"]["InstanceType"])]
    assert gpu and gpu[0]["min_workers"] >= 1
    assert all(t["max_workers"] >= t["min_workers"] for t in workers.values())
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]
    # the project is copied from the checkout and installed with its Ray extra; the auth token goes to every node
    assert config["file_mounts"]["~/soundnet-distill"] == "."
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("soundnet-distill[ray]" in c for c in config["setup_commands"])
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    for text in (head, worker):
        assert "--disable-usage-stats" in text and "RAY_AUTH_MODE=token" in text
        for command in ray_start_commands(text):
            assert options_used(command) <= ray_start_options(), command
    assert shlex.split(worker)  # well-formed shell words
