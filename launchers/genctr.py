# ruff: noqa: UP006, UP007, UP035, UP045 - torchx's component linter reads typing.Optional/Dict
"""torchx components for genctr-rec: every stage as a distributed job, anywhere torchx runs.

Each component launches ``genctr <command>`` under torchrun (TorchRec's
DistributedModelParallel over gloo on CPU, nccl on GPUs) on ``j`` = nodes x processes per node,
with c10d rendezvous and torchrun-level restarts (``max_restarts``; torchx's ``local_cwd``
scheduler ignores ``max_retries``, which schedulers such as Slurm and Kubernetes honour). A
restarted job resumes from its latest checkpoint.

Local, two processes::

    torchx run -s local_cwd launchers/genctr.py:pretrain --j 1x2 -- --data data/synth --out runs/pre

Two "nodes" on one machine (rendezvous on localhost)::

    torchx run -s local_cwd launchers/genctr.py:pretrain --j 2x1 -- --data data/synth --out runs/pre

Slurm / Kubernetes (``--dryrun`` prints the job without submitting it)::

    torchx run -s slurm launchers/genctr.py:finetune --j 4x8 --gpu 8 -- --data D --out R ...
    torchx run -s kubernetes -cfg queue=default launchers/genctr.py:finetune --image IMG -- ...
"""

import os
from typing import Dict, Optional

import torchx.specs as specs
from torchx.components.dist import ddp
from torchx.components.utils import python as python_component

DEFAULT_IMAGE = "ghcr.io/genctr-rec/genctr-rec:latest"
# A restart round must not reuse the previous round's TCP store: with it shared, restarted
# gloo ranks find stale peer addresses ("connectFullMesh failed").
BASE_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "LOGLEVEL": "WARNING"}
# Object-storage settings the job inherits from the submitting shell, so that s3:// paths
# resolve in the job as they do at the prompt (endpoint of a MinIO / Ceph store, region,
# profile). Keys are deliberately not copied into the job spec, where anyone who can read the
# job could read them: give them to the job the cluster's way (a Kubernetes secret or IRSA
# role, Slurm's inherited environment), or pass them with --env explicitly.
STORAGE_VARIABLES = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_S3_ADDRESSING_STYLE",
    "GENCTR_CACHE",
)


def storage_env() -> Dict[str, str]:
    """The object-storage settings of this shell (see STORAGE_VARIABLES)."""
    return {k: os.environ[k] for k in STORAGE_VARIABLES if os.environ.get(k)}


def job_env(env: Optional[Dict[str, str]]) -> Dict[str, str]:
    """Every component's environment: the base, this shell's storage settings, then --env."""
    return {**BASE_ENV, **storage_env(), **(env or {})}


def _genctr(
    command: str,
    args: tuple[str, ...],
    j: str,
    cpu: int,
    gpu: int,
    memMB: int,
    h: Optional[str],
    max_retries: int,
    max_restarts: int,
    env: Optional[Dict[str, str]],
    image: str,
):
    app = ddp(
        command,
        *args,
        m="genctr_rec.cli",
        image=image,
        name=f"genctr-{command}",
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env=job_env(env),
        max_retries=max_retries,
    )
    role = app.roles[0]
    role.name = f"genctr-{command}"
    script = role.args[-1]
    assert script.startswith("torchrun "), script
    role.args[-1] = script.replace("torchrun ", f"torchrun --max_restarts {max_restarts} ", 1)
    return app


def pretrain(
    *args: str,
    j: str = "1x2",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    max_retries: int = 0,
    max_restarts: int = 1,
    env: Optional[Dict[str, str]] = None,
    image: str = DEFAULT_IMAGE,
) -> specs.AppDef:
    """GenCTR stage 1: generative pre-training (``genctr pretrain``).

    Args:
        args: options of ``genctr pretrain``, e.g. ``--data DIR --out RUN --epochs 3``
        j: nodes x processes per node, e.g. 1x2 or 2x1
        cpu: CPUs per node
        gpu: GPUs per node (nccl when > 0)
        memMB: memory per node in MB
        h: a named torchx resource (overrides cpu, gpu, memMB)
        max_retries: scheduler-level retries (Slurm, Kubernetes)
        max_restarts: torchrun restarts of the worker group (resumes from the last checkpoint)
        env: extra environment variables
        image: container image (Kubernetes); ignored by local_cwd and Slurm
    """
    return _genctr("pretrain", args, j, cpu, gpu, memMB, h, max_retries, max_restarts, env, image)


def finetune(
    *args: str,
    j: str = "1x2",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    max_retries: int = 0,
    max_restarts: int = 1,
    env: Optional[Dict[str, str]] = None,
    image: str = DEFAULT_IMAGE,
) -> specs.AppDef:
    """GenCTR stage 2: CTR fine-tuning (``genctr finetune``).

    Args:
        args: options of ``genctr finetune``, e.g. ``--data DIR --out RUN --backbone dnn
            --transfer ps_mi --init-from PRETRAIN_RUN``
        j: nodes x processes per node, e.g. 1x2 or 2x1
        cpu: CPUs per node
        gpu: GPUs per node (nccl when > 0)
        memMB: memory per node in MB
        h: a named torchx resource (overrides cpu, gpu, memMB)
        max_retries: scheduler-level retries (Slurm, Kubernetes)
        max_restarts: torchrun restarts of the worker group (resumes from the last checkpoint)
        env: extra environment variables
        image: container image (Kubernetes); ignored by local_cwd and Slurm
    """
    return _genctr("finetune", args, j, cpu, gpu, memMB, h, max_retries, max_restarts, env, image)


def evaluate(
    *args: str,
    j: str = "1x2",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    image: str = DEFAULT_IMAGE,
) -> specs.AppDef:
    """AUC, GAUC and LogLoss of a fine-tuning run (``genctr evaluate``).

    Args:
        args: options of ``genctr evaluate``: ``--data DIR --run-dir RUN``
        j: nodes x processes per node
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        h: a named torchx resource
        env: extra environment variables
        image: container image (Kubernetes)
    """
    return _genctr("evaluate", args, j, cpu, gpu, memMB, h, 0, 0, env, image)


def pipeline(
    *args: str,
    j: str = "1x2",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    max_retries: int = 0,
    max_restarts: int = 1,
    env: Optional[Dict[str, str]] = None,
    image: str = DEFAULT_IMAGE,
) -> specs.AppDef:
    """Every stage on the default data: data, pre-training, fine-tuning, evaluation.

    Args:
        args: options of ``genctr pipeline``, e.g. ``--workdir runs/pipeline``
        j: nodes x processes per node
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        h: a named torchx resource
        max_retries: scheduler-level retries
        max_restarts: torchrun restarts (finished stages are reused, the running one resumes)
        env: extra environment variables
        image: container image (Kubernetes)
    """
    return _genctr("pipeline", args, j, cpu, gpu, memMB, h, max_retries, max_restarts, env, image)


def export(
    *args: str,
    cpu: int = 2,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    image: str = DEFAULT_IMAGE,
) -> specs.AppDef:
    """Serving artifact from a fine-tuning run's checkpoint (``genctr export``), one process:
    it reads a checkpoint of any world size.

    Args:
        args: options of ``genctr export``: ``--run RUN --out ARTIFACT [--quantize int8]``
        cpu: CPUs
        memMB: memory in MB
        h: a named torchx resource
        env: extra environment variables
        image: container image (Kubernetes)
    """
    app = python_component(
        "export", *args, m="genctr_rec.cli", name="genctr-export", cpu=cpu, memMB=memMB, h=h,
        image=image,
    )  # fmt: skip
    app.roles[0].env.update(job_env(env))
    return app


def serve(
    *args: str,
    port: int = 8080,
    replicas: int = 1,
    workers: int = 1,
    cpu: int = 4,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    image: str = DEFAULT_IMAGE,
) -> specs.AppDef:
    """The HTTP scoring service for an artifact (``genctr serve``), ``replicas`` copies.

    Args:
        args: options of ``genctr serve``: ``--artifact ARTIFACT [--cache-size N] ...``
        port: the port each replica listens on (all interfaces)
        replicas: how many copies of the service (containers)
        workers: worker processes per replica on its port (``genctr serve --workers``), each
            with its own copy of the model: up to ``cpu``, memory permitting
        cpu: CPUs per replica
        memMB: memory per replica in MB
        h: a named torchx resource
        env: extra environment variables
        image: container image (Kubernetes)
    """
    command = ["-m", "genctr_rec.cli", "serve", "--host", "0.0.0.0", "--port", str(port)]
    command += ["--workers", str(workers), *args]
    return specs.AppDef(
        name="genctr-serve",
        roles=[
            specs.Role(
                name="genctr-serve",
                image=image,
                entrypoint="python",
                args=command,
                num_replicas=replicas,
                resource=specs.resource(cpu=cpu, gpu=0, memMB=memMB, h=h),
                port_map={"http": port},
                env=job_env(env),
            )
        ],
    )


def benchmark(
    name: str,
    *args: str,
    cpu: int = 2,
    memMB: int = 16384,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    image: str = DEFAULT_IMAGE,
) -> specs.AppDef:
    """One benchmark of ``benchmarks/`` (it starts its own processes where it needs ranks).

    Args:
        name: the benchmark module, e.g. reader_throughput, lookup_layouts, table_scale, table1
        args: the benchmark's own options
        cpu: CPUs
        memMB: memory in MB
        h: a named torchx resource
        env: extra environment variables
        image: container image (Kubernetes)
    """
    app = python_component(
        *args,
        m=f"benchmarks.{name}",
        name=f"genctr-bench-{name}",
        cpu=cpu,
        memMB=memMB,
        h=h,
        image=image,
    )
    app.roles[0].env.update(job_env(env))
    return app
