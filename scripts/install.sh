#!/usr/bin/env bash
# Install genctr-rec into a project-local virtual environment (.venv), idempotently.
#
#   scripts/install.sh            the CPU stack (torch 2.13 CPU, fbgemm-gpu-cpu 1.8.0, torchrec 1.8.0)
#   scripts/install.sh dev        the same plus the test and lint tools
#   GENCTR_DEVICE=cuda scripts/install.sh   the CUDA stack (fbgemm-gpu 1.8.0, nccl via torch)
#
# Why torchrec is installed with --no-deps: torchrec 1.8.0 declares a dependency on the CUDA
# `fbgemm-gpu` wheel (2.7 GB), which overwrites the `fbgemm_gpu` package of the CPU build
# `fbgemm-gpu-cpu`. We install its real runtime needs from requirements/*.txt first, then
# torchrec without its declared dependencies. `pip check` therefore reports
# "torchrec 1.8.0 requires fbgemm-gpu, which is not installed": that line is expected.
# A second run reuses the environment: it reinstalls only when a requirements file changed.
set -euo pipefail
cd "$(dirname "$0")/.."

extra="${1:-}"
device="${GENCTR_DEVICE:-cpu}"
venv="${GENCTR_VENV:-.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3

reqs=("requirements/${device}.txt")
[ "$extra" = "dev" ] && reqs+=("requirements/dev.txt")
stamp="$venv/.genctr-installed-$(cat "${reqs[@]}" pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "[install] creating $venv with $($python --version)"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
echo "[install] installing ${reqs[*]} (first run takes about a minute)"
log="$venv/.install.log"
for r in "${reqs[@]}"; do
  # pip's output goes to a log that is shown only when it fails
  if ! "${pip[@]}" install -r "$r" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2; echo "[install] pip failed on $r" >&2; exit 1
  fi
done
if ! { "${pip[@]}" install --no-deps torchrec==1.8.0 && "${pip[@]}" install --no-deps -e .; } \
    >"$log" 2>&1; then
  grep -v "^WARNING: Location" "$log" >&2; echo "[install] installing torchrec / genctr-rec failed" >&2
  exit 1
fi
"$venv/bin/python" -m genctr_rec.compat
rm -f "$venv"/.genctr-installed-*
touch "$stamp"
