"""torchx components: valid components, Slurm / Kubernetes jobs (dry run), and real local runs
with 1x2 and 2x1 (two "nodes" on one machine, rendezvous on localhost)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from torchx.components.component_test_base import ComponentTestCase

import launchers.genctr as components

ROOT = Path(__file__).resolve().parents[1]
TORCHX = str(Path(sys.executable).with_name("torchx"))
ENV = {
    **os.environ,
    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    "OMP_NUM_THREADS": "1",
}
COMPONENTS = ["pretrain", "finetune", "evaluate", "pipeline", "export", "serve", "benchmark"]


class TestComponents(ComponentTestCase):
    def test_components_are_valid(self) -> None:
        for name in COMPONENTS:
            self.validate(components, name)


def _torchx(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [TORCHX, *args], cwd=ROOT, env=ENV, text=True, capture_output=True, timeout=timeout
    )


@pytest.mark.parametrize("component", ["pretrain", "finetune", "pipeline", "evaluate"])
def test_slurm_dryrun_prints_a_job(component: str) -> None:
    proc = _torchx(
        "run",
        "--dryrun",
        "-s",
        "slurm",
        f"launchers/genctr.py:{component}",
        "--j",
        "2x4",
        "--",
        "--data",
        "/data/synth",
        "--out",
        "/runs/x",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    script = proc.stdout
    assert "#SBATCH hetjob" in script and script.count("srun") >= 1
    assert "--nnodes 2 --nproc_per_node 4" in script
    assert f"-m genctr_rec.cli {component} --data /data/synth" in script
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in script


@pytest.mark.parametrize("component", ["pretrain", "finetune"])
def test_kubernetes_dryrun_prints_a_volcano_job(component: str) -> None:
    proc = _torchx(
        "run",
        "--workspace",
        "",
        "--dryrun",
        "-s",
        "kubernetes",
        f"launchers/genctr.py:{component}",
        "--j",
        "3x2",
        "--gpu",
        "2",
        "--image",
        "registry/genctr:1",
        "--",
        "--data",
        "/d",
        "--out",
        "/r",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    job = yaml.safe_load(proc.stdout.split("=== SCHEDULER REQUEST ===", 1)[1])
    assert job["kind"] == "Job" and job["apiVersion"].startswith("batch.volcano.sh")
    tasks = job["spec"]["tasks"]
    assert len(tasks) == 3, "one task per node"
    for task in tasks:
        (container,) = task["template"]["spec"]["containers"]
        assert container["image"] == "registry/genctr:1"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
        command = " ".join(container["command"])
        assert "--nnodes 3 --nproc_per_node 2" in command and "--max_restarts 1" in command
        assert f"genctr_rec.cli {component} --data /d" in command


def test_benchmark_component_runs_the_module() -> None:
    app = components.benchmark("reader_throughput", "--rows", "1000")
    role = app.roles[0]
    assert role.entrypoint == "python" and role.args[:2] == ["-m", "benchmarks.reader_throughput"]
    assert role.args[2:] == ["--rows", "1000"]


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["1x2", "2x1"])
def test_local_run_trains_on_two_ranks(toy_synth: Path, tmp_path: Path, topology: str) -> None:
    out = tmp_path / "pre"
    proc = _torchx(
        "run",
        "-s",
        "local_cwd",
        "launchers/genctr.py:pretrain",
        "--j",
        topology,
        "--",
        "--data",
        str(toy_synth),
        "--out",
        str(out),
        "--epochs",
        "1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = proc.stdout + proc.stderr
    assert "SUCCEEDED" in logs
    assert "[rank0]" in logs and "[rank1]" in logs, "logs of every rank come back"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(metrics["epoch_loss"]) == 1


@pytest.mark.slow
def test_failing_job_fails_visibly(tmp_path: Path) -> None:
    proc = _torchx(
        "run",
        "-s",
        "local_cwd",
        "launchers/genctr.py:pretrain",
        "--j",
        "1x2",
        "--",
        "--data",
        str(tmp_path / "missing"),
        "--out",
        str(tmp_path / "r"),
        timeout=300,
    )
    logs = proc.stdout + proc.stderr
    assert "FAILED" in logs
    assert "meta.json is missing" in logs


def test_export_component_writes_an_artifact(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    proc = _torchx(
        "run", "-s", "local_cwd", "launchers/genctr.py:export",
        "--", "--run", str(runs["genctr"]), "--out", str(out), "--quantize", "int8",
        "--compile", "none",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.pt2").is_file() and (out / "manifest.json").is_file()


def test_serve_component_is_a_replicated_service_with_a_port() -> None:
    app = components.serve("--artifact", "/a", port=9000, replicas=3, workers=4)
    (role,) = app.roles
    assert role.num_replicas == 3 and role.port_map == {"http": 9000}
    assert "--workers 4" in " ".join(role.args)
    assert role.args[:4] == ["-m", "genctr_rec.cli", "serve", "--host"]
    assert "--artifact" in role.args and "/a" in role.args
    proc = _torchx(
        "run", "--workspace", "", "--dryrun", "-s", "kubernetes", "launchers/genctr.py:serve",
        "--replicas", "2", "--image", "registry/genctr:1", "--", "--artifact", "/models/a",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    job = yaml.safe_load(proc.stdout.split("=== SCHEDULER REQUEST ===", 1)[1])
    tasks = job["spec"]["tasks"]
    assert len(tasks) == 2, "one task per replica"
    for task in tasks:
        (container,) = task["template"]["spec"]["containers"]
        command = " ".join(container["command"])
        assert "serve --host 0.0.0.0 --port 8080 --workers 1 --artifact /models/a" in command
        assert container["ports"][0]["containerPort"] == 8080


def test_plain_kubernetes_dryrun_needs_no_docker_daemon() -> None:
    """.torchxconfig sets no workspace: the documented command works as typed, with no
    `--workspace ""` and no Docker daemon, and runs the image it is given."""
    proc = _torchx(
        "run", "--dryrun", "-s", "kubernetes", "launchers/genctr.py:pretrain",
        "--image", "registry/genctr:2", "--", "--data", "/d", "--out", "/r",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    job = yaml.safe_load(proc.stdout.split("=== SCHEDULER REQUEST ===", 1)[1])
    (container,) = job["spec"]["tasks"][0]["template"]["spec"]["containers"]
    assert container["image"] == "registry/genctr:2"


def test_image_recipe_installs_through_the_project_script() -> None:
    """Dockerfile.torchx (torchx's workspace convention) copies only paths that exist, installs
    with scripts/install.sh and puts its environment on PATH; .dockerignore keeps the local
    environment and runs out of the build context."""
    recipe = (ROOT / "Dockerfile.torchx").read_text().splitlines()
    copies = [line.split()[1] for line in recipe if line.startswith("COPY ")]
    for source in copies:
        assert (ROOT / source).exists(), source
    assert any(line.startswith("RUN scripts/install.sh") for line in recipe)
    assert "ENV PATH=/app/.venv/bin:${PATH}" in recipe
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv/", "runs/", ".git/"} <= set(ignored)


def test_components_carry_the_storage_settings_but_not_the_keys(monkeypatch) -> None:
    """s3:// paths resolve in the job as in the submitting shell: endpoint and region go
    along; the secret key stays out of the job spec; --env still wins."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.internal:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-copy")
    for app in (
        components.pretrain("--data", "s3://b/d", "--out", "s3://b/r"),
        components.serve("--artifact", "s3://b/a", env={"AWS_REGION": "us-east-2"}),
    ):
        env = app.roles[0].env
        assert env["AWS_ENDPOINT_URL"] == "http://minio.internal:9000"
        assert "AWS_SECRET_ACCESS_KEY" not in env
    assert env["AWS_REGION"] == "us-east-2"
