"""The artifact's model as ``torch.export`` programs, compiled ahead of time by AOTInductor.

``export_programs`` captures :class:`~genctr_rec.serving.model.ServingModel`'s entry points
(``score``, and ``contexts`` with model integration) as exported programs with dynamic request,
candidate and history dimensions; ``write_package`` stores them in one PT2 archive
(``model.pt2``) together with, by default, their AOTInductor compilation for this machine's
CPU. The exported programs stay in the archive so that another machine can compile them again
(``genctr export --recompile``, or the predictor does it by itself when the compiled code was
built for another vector ISA). :class:`CompiledModel` is what the predictor calls: the AOTI
runners, or the exported programs run as they are (``ExportedProgram.module()``).

torch.export specialises dimensions of size 0 and 1 (0/1 specialisation): every program is
exported for sizes of at least 2, and :func:`at_least_two` pads a smaller batch (an extra
request, candidate or history slot, masked or dropped) before it is called.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.export import Dim, ExportedProgram

from genctr_rec.environ import environment
from genctr_rec.serving.requests import compose_contexts

if TYPE_CHECKING:
    from genctr_rec.serving.model import ServingModel

logger = logging.getLogger(__name__)
PACKAGE_FILE = "model.pt2"
INDUCTOR_CACHE = "TORCHINDUCTOR_CACHE_DIR"  # where Inductor keeps its caches
SCORE_INPUTS = (
    "hist_items", "hist_cats", "hist_lengths", "query_cats", "cand_items", "cand_cats",
    "cand_rows", "side_values", "side_lengths", "dense", "g",
)  # fmt: skip
CONTEXT_INPUTS = ("hist_items", "hist_cats", "hist_lengths", "rows", "categories")
MAX_REQUESTS = 1 << 20
MAX_CANDIDATES = 1 << 24


class _Entry(torch.nn.Module):
    """One entry point of a ServingModel as a module's forward (what torch.export captures)."""

    def __init__(self, model: ServingModel, method: str) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.method)(*args)


def entry_points(model_integration: bool) -> tuple[str, ...]:
    return ("contexts", "score") if model_integration else ("score",)


def _dynamic_shapes(
    method: str, max_history: int, side_sizes: tuple[int, int] = (1, 1)
) -> tuple[dict[int, Any] | None, ...]:
    requests = Dim("requests", min=2, max=MAX_REQUESTS)
    history = Dim("history", min=2, max=max(2, max_history))
    if method == "contexts":
        pairs = Dim("pairs", min=2, max=MAX_CANDIDATES)
        return ({0: requests, 1: history}, {0: requests, 1: history}, {0: requests},
                {0: pairs}, {0: pairs})  # fmt: skip
    candidates = Dim("candidates", min=2, max=MAX_CANDIDATES)
    # the side features' jagged values and lengths: sizes follow the data; a model without
    # side features has them empty, always
    values, lengths = ({0: Dim.AUTO} if size else None for size in side_sizes)
    return ({0: requests, 1: history}, {0: requests, 1: history}, {0: requests}, {0: requests},
            {0: candidates}, {0: candidates}, {0: candidates}, values, lengths,
            {0: candidates}, {0: candidates})  # fmt: skip


def export_programs(
    model: ServingModel, example: tuple[torch.Tensor, ...], max_history: int
) -> dict[str, ExportedProgram]:
    """Each entry point exported (non-strict) on ``example`` (the ``score`` inputs without
    ``g``: a padded batch of at least two requests, two candidates and two history slots)."""
    example = at_least_two(example)
    hist_items, hist_cats, hist_lengths, _, cand_items, cand_cats, cand_rows = example[:7]
    with torch.no_grad():
        g = compose_contexts(
            model.contexts, model.model_integration, hist_items, hist_cats, hist_lengths,
            cand_rows, cand_cats, model.num_categories, cand_items,
        )  # fmt: skip
    pairs = torch.stack([cand_rows[:2], cand_cats[:2]])
    inputs = {
        "score": (*example, g),
        "contexts": (hist_items, hist_cats, hist_lengths, pairs[0], pairs[1]),
    }
    programs = {}
    for method in entry_points(model.model_integration):
        with torch.no_grad():
            programs[method] = torch.export.export(
                _Entry(model, method).eval(),
                inputs[method],
                dynamic_shapes={
                    "args": _dynamic_shapes(
                        method, max_history, (example[7].numel(), example[8].numel())
                    )
                },
                strict=False,
            )
    return programs


def vector_isa() -> str:
    """The vector instruction set Inductor compiles CPU code for on this machine."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return str(pick_vec_isa()) or "none"


@contextlib.contextmanager
def private_inductor_cache() -> Iterator[None]:
    """Inductor's caches in a fresh directory for the duration of one compilation.

    With torch 2.13, AOTInductor compiling a second model of the same code but other table
    sizes in a cache directory that holds the first one's compilation reused a stale piece of
    it: the compiled ``contexts`` indexed a 101-row category table as the 21 rows of an
    earlier model's and aborted the process (``index out of bounds``), and with equal sizes it
    could have read wrong rows silently. A private directory costs the cache's speed-up (the
    compilation is a one-time export step) and rules that out; export's parity gate checks
    the result either way."""
    with tempfile.TemporaryDirectory(prefix="genctr-inductor-") as directory:
        with environment({INDUCTOR_CACHE: directory}):
            yield


def write_package(
    path: Path, programs: dict[str, ExportedProgram], compile_aoti: bool = True
) -> dict[str, Any]:
    """``programs`` into one PT2 archive at ``path``, with their AOTInductor compilation when
    ``compile_aoti``. Returns what the artifact's metadata records about it."""
    from torch.export.pt2_archive._package import package_pt2

    aoti_files = {}
    with private_inductor_cache() if compile_aoti else contextlib.nullcontext():
        for name, program in programs.items() if compile_aoti else ():
            aoti_files[name] = torch._inductor.aot_compile(
                program.module(check_guards=False),
                program.example_inputs[0],
                options={
                    "aot_inductor.package": True,
                    "aot_inductor.model_name_for_generated_files": name,
                },
            )
        package_pt2(path, exported_programs=programs, aoti_files=aoti_files or None)
    return {
        "file": path.name,
        "entry_points": sorted(programs),
        "compiled": "aoti" if compile_aoti else "none",
        "vector_isa": vector_isa() if compile_aoti else None,
    }


@dataclass
class CompiledModel:
    """The artifact's model as the predictor calls it: ``score``, ``contexts`` and ``__call__``
    (probabilities with g computed once per (request, candidate category)), whatever runs them
    (AOTI runners, exported programs, or a legacy TorchScript module)."""

    runners: dict[str, Callable[..., torch.Tensor]]
    model_integration: bool
    num_categories: int
    kind: str  # "aoti", "exported" or "torchscript"
    pad: bool = True  # exported and compiled programs take sizes of at least 2

    def score(self, *args: torch.Tensor) -> torch.Tensor:
        n = args[4].shape[0]
        if self.pad:
            args = at_least_two(args)
        return self.runners["score"](*args)[:n]

    def contexts(self, *args: torch.Tensor) -> torch.Tensor:
        u = args[3].shape[0]
        if self.pad:
            args = _contexts_at_least_two(args)
        return self.runners["contexts"](*args)[:u]

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if "forward" in self.runners:
            return self.runners["forward"](*args)
        hist_items, hist_cats, hist_lengths, _, cand_items, cand_cats, cand_rows = args[:7]
        g = compose_contexts(
            self.contexts, self.model_integration, hist_items, hist_cats, hist_lengths,
            cand_rows, cand_cats, self.num_categories, cand_items,
        )  # fmt: skip
        return self.score(*args, g)


def load_package(path: Path, metadata: dict[str, Any], compiled: str = "auto") -> CompiledModel:
    """The model in the archive at ``path``: its AOTI runners when it holds a compilation for
    this machine's vector ISA and ``compiled`` is ``auto`` or ``aoti``; otherwise its exported
    programs as they are (``exported``, or ``auto`` on another ISA, with a warning)."""
    from torch.export.pt2_archive._package import load_pt2

    info = metadata["model"]
    here = vector_isa()
    use_aoti = info.get("compiled") == "aoti" and compiled in ("auto", "aoti")
    if use_aoti and info.get("vector_isa") != here:
        if compiled == "aoti":
            raise RuntimeError(
                f"{path} was compiled for {info.get('vector_isa')}, this machine runs {here}: "
                "recompile it here (genctr export --recompile)"
            )
        logger.warning(
            "%s was compiled for %s, this machine runs %s: serving its exported programs "
            "uncompiled (slower); genctr export --recompile compiles them for this machine",
            path,
            info.get("vector_isa"),
            here,
        )
        use_aoti = False
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*outdated pt2.*")
        contents = load_pt2(path, load_weights_from_disk=False)
    if use_aoti:
        runners = {name: contents.aoti_runners[name] for name in info["entry_points"]}
        kind = "aoti"
    else:
        runners = {  # inputs are padded to the exported sizes: no guard to check a call
            name: contents.exported_programs[name].module(check_guards=False)
            for name in info["entry_points"]
        }
        kind = "exported"
    return CompiledModel(
        runners, bool(metadata["model_integration"]), int(metadata["num_categories"]) + 1, kind
    )


def _history_at_least_two(
    hist_items: torch.Tensor, hist_cats: torch.Tensor, *per_request: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Histories padded to two slots (masked by the lengths) and two requests (the last one
    repeated, with its ``per_request`` tensors): export specialises sizes 0 and 1."""
    if hist_items.shape[1] < 2:
        width = 2 - hist_items.shape[1]
        hist_items = torch.cat([hist_items, hist_items.new_zeros(hist_items.shape[0], width)], 1)
        hist_cats = torch.cat([hist_cats, hist_cats.new_zeros(hist_cats.shape[0], width)], 1)
    if hist_items.shape[0] < 2:
        hist_items, hist_cats = _repeat_last(hist_items), _repeat_last(hist_cats)
        per_request = tuple(_repeat_last(t) for t in per_request)
    return (hist_items, hist_cats, *per_request)


def at_least_two(args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """``score``'s inputs (``g`` optional) padded to at least two requests, two candidates and
    two history slots: the extra request repeats the last one, the extra candidate the last one
    (its side features too); the extra slot is masked by the lengths."""
    hist_items, hist_cats, hist_lengths, query, items, cats, rows, values, lengths, dense = args[
        :10
    ]
    rest = list(args[10:])
    hist_items, hist_cats, hist_lengths, query = _history_at_least_two(
        hist_items, hist_cats, hist_lengths, query
    )
    n = items.shape[0]
    if n < 2:
        items, cats, rows, dense = (_repeat_last(t) for t in (items, cats, rows, dense))
        rest = [_repeat_last(t) for t in rest]
        if lengths.numel():  # key-major: each key's last candidate again
            keys = lengths.shape[0] // n
            per_key = lengths.view(keys, n)
            ends = torch.cumsum(lengths, 0).view(keys, n)[:, -1]
            parts, new_lengths = [], []
            for k in range(keys):
                start = int(ends[k] - per_key[k].sum())
                segment = values[start : int(ends[k])]
                last = segment[segment.shape[0] - int(per_key[k, -1]) :]
                parts += [segment, last]
                new_lengths += [per_key[k], per_key[k, -1:]]
            values, lengths = torch.cat(parts), torch.cat(new_lengths)
    return (hist_items, hist_cats, hist_lengths, query, items, cats, rows, values, lengths,
            dense, *rest)  # fmt: skip


def _contexts_at_least_two(args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    hist_items, hist_cats, hist_lengths, rows, categories = args
    hist_items, hist_cats, hist_lengths = _history_at_least_two(hist_items, hist_cats, hist_lengths)
    if rows.shape[0] < 2:
        rows, categories = _repeat_last(rows), _repeat_last(categories)
    return hist_items, hist_cats, hist_lengths, rows, categories


def _repeat_last(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, t[-1:]]) if t.shape[0] else torch.cat([t, t.new_zeros(1, *t.shape[1:])])
