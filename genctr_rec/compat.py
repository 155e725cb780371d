"""Start-up check that torch, fbgemm and torchrec are a combination that loads together.

fbgemm 1.x is built against exactly one torch minor release; a mismatch fails at import with
``undefined symbol`` or with ``torch.ops.fbgemm`` ops missing, far from the real cause. We check
once, early, and say what to install.
"""

from __future__ import annotations

import importlib.metadata as metadata
import logging

logger = logging.getLogger(__name__)

# torch minor release -> (fbgemm version, torchrec version) known to load together.
SUPPORTED_STACKS: dict[str, tuple[str, str]] = {"2.13": ("1.8.0", "1.8.0")}
INSTALL_HINT = (
    "Run scripts/install.sh (CPU) or GENCTR_DEVICE=cuda scripts/install.sh (CUDA), or by hand: "
    "pip install torch==2.13.0 fbgemm-gpu-cpu==1.8.0 (or fbgemm-gpu==1.8.0 for CUDA) && "
    "pip install --no-deps torchrec==1.8.0"
)


class StackError(RuntimeError):
    """The installed torch / fbgemm / torchrec do not work together."""


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def installed_stack() -> dict[str, str | None]:
    """Versions of the three packages as pip sees them (fbgemm from either CPU or CUDA build)."""
    return {
        "torch": _version("torch"),
        "fbgemm-gpu-cpu": _version("fbgemm-gpu-cpu"),
        "fbgemm-gpu": _version("fbgemm-gpu"),
        "torchrec": _version("torchrec"),
    }


def check_stack(load_torchrec: bool = True) -> dict[str, str | None]:
    """Raise :class:`StackError` with an install hint unless the stack loads together.

    ``load_torchrec=False`` (serving an exported artifact, managing model versions) checks the
    installed versions and that torch loads, without importing fbgemm and TorchRec: those
    commands never use them, and a serving process would pay their import and memory."""
    versions = installed_stack()
    torch_version = versions["torch"]
    if torch_version is None:
        raise StackError(f"torch is not installed. {INSTALL_HINT}")
    minor = ".".join(torch_version.split("+")[0].split(".")[:2])
    fbgemm_version = versions["fbgemm-gpu-cpu"] or versions["fbgemm-gpu"]
    if versions["fbgemm-gpu-cpu"] and versions["fbgemm-gpu"]:
        raise StackError(
            "both fbgemm-gpu-cpu and fbgemm-gpu are installed; they overwrite each other's "
            f"files. Uninstall one of them. {INSTALL_HINT}"
        )
    expected = SUPPORTED_STACKS.get(minor)
    if expected is None:
        raise StackError(
            f"torch {torch_version} is not a supported release "
            f"(supported: {sorted(SUPPORTED_STACKS)}). {INSTALL_HINT}"
        )
    if fbgemm_version != expected[0]:
        raise StackError(
            f"torch {torch_version} needs fbgemm {expected[0]}, found {fbgemm_version}. "
            f"{INSTALL_HINT}"
        )
    if versions["torchrec"] != expected[1]:
        raise StackError(
            f"torch {torch_version} needs torchrec {expected[1]}, found {versions['torchrec']}. "
            f"{INSTALL_HINT}"
        )
    try:
        import torch

        if load_torchrec:
            import fbgemm_gpu  # noqa: F401
            import torchrec  # noqa: F401

            torch.ops.fbgemm.asynchronous_complete_cumsum  # noqa: B018 - raises if ops missing
    except (ImportError, OSError, AttributeError, RuntimeError) as exc:
        raise StackError(
            f"the stack is installed but does not load: {exc}. {INSTALL_HINT}"
        ) from exc
    return versions


def main() -> None:
    versions = check_stack()
    print("stack ok: " + ", ".join(f"{k}=={v}" for k, v in versions.items() if v))


if __name__ == "__main__":
    main()
