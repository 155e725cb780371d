"""The ``genctr`` command line: one entry point, a sub-command per stage (see README.md)."""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields

from genctr_rec.config import (
    BACKBONE_NAMES,
    CALIBRATIONS,
    CONTEXT_FUSIONS,
    DECODER_KERNELS,
    DECODER_LAYOUTS,
    DECODERS,
    EMBEDDING_OPTIMIZERS,
    LOOKUPS,
    NEGATIVES,
    PRECISIONS,
    SELECT_ON,
    STAGE_DEFAULTS,
    TRANSFERS,
    ConfigError,
    ModelConfig,
    RunConfig,
    TrainConfig,
)

logger = logging.getLogger("genctr")
FORMAT_DOC = "docs/data-format.md (in the genctr-rec repository)"


def _is_rank0() -> bool:
    """Results are printed once, by rank 0, when running under torchrun."""
    return os.environ.get("RANK", "0") == "0"


def _check_days(args: argparse.Namespace) -> bool:
    """Whether ``--days`` asks for a day-by-day dataset (and its numbers make sense)."""
    if args.days is None:
        if args.window != 1:
            raise ConfigError("--window needs --days")
        return False
    if args.days < 1 or args.window < 1:
        raise ConfigError("--days and --window must be at least 1")
    return True


def _print_days(out: str, metas: list) -> None:
    for meta in metas:
        sizes = {"num_items": meta.num_items, "num_users": meta.num_users}
        print(
            json.dumps({"out": f"{out}/day-{meta.extra['day']:02d}", **sizes, **meta.extra["rows"]})
        )


def _data_synth(args: argparse.Namespace) -> int:
    from genctr_rec.data.synth import SynthConfig, generate

    cfg = SynthConfig.preset(args.preset)
    given = set()
    for f in fields(SynthConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(cfg, f.name, value)
            given.add(f.name)
    if _check_days(args):
        from genctr_rec.data.synth import daily_world, generate_days

        cfg = daily_world(cfg, args.days, given)
        _print_days(args.out, generate_days(cfg, args.out, args.days, args.window, args.overwrite))
        return 0
    meta = generate(cfg, args.out, overwrite=args.overwrite)
    print(json.dumps({"out": str(args.out), **meta.extra["rows"]}))
    return 0


def _data_movielens(args: argparse.Namespace) -> int:
    from genctr_rec.data import movielens

    if _check_days(args):
        metas = movielens.build_days(
            args.out, args.days, args.window, args.source, args.max_history, args.overwrite
        )
        _print_days(args.out, metas)
        return 0
    meta = movielens.build(
        args.out, args.source, args.max_history, args.test_fraction, overwrite=args.overwrite
    )
    print(json.dumps({"out": str(args.out), "source": meta.source, **meta.extra["rows"]}))
    return 0


def _data_validate(args: argparse.Namespace) -> int:
    from genctr_rec.data.validate import validate_dataset

    report = validate_dataset(args.data)
    print(json.dumps(report, indent=2))
    print(f"{args.data}: valid")
    return 0


def _add_days_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--days",
        type=int,
        default=None,
        help=f"write OUT/day-00 ... OUT/day-{{N-1}} from {what}: day k trains on day k and "
        "tests on day k + 1; ids stable across days, each day's catalogue extends the last",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=1,
        help="with --days: train day k on the WINDOW days up to k (a sliding window)",
    )


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    from genctr_rec.data.synth import DAILY_WORLD, SynthConfig

    data = sub.add_parser("data", help="build or check a dataset directory")
    data_sub = data.add_subparsers(dest="data_command", required=True)

    synth = data_sub.add_parser("synth", help="simulate a search-advertising dataset")
    synth.add_argument("--out", required=True, help="dataset directory to write" + URL_NOTE)
    synth.add_argument(
        "--preset",
        default="default",
        choices=["toy", "method", "default", "1m", "10m"],
        help="size and shape: toy (tests), method (the method's gains in a minute), default "
        "(~400k impressions), 1m / 10m items (scale)",
    )
    synth_help = _field_help(SynthConfig)
    synth_help["min_sessions"] = synth_help["max_sessions"] = "sessions per user, uniform"
    whole = ["num_users", "num_items", "num_categories", "num_styles", "max_history"]
    whole += ["max_sessions", "min_sessions", "seed"]
    drifts = ["item_growth", "item_retirement", "user_growth", "interest_drift"]
    for name, cast in [(n, int) for n in whole] + [(n, float) for n in drifts]:
        shown = "the preset's" if cast is int else f"0, or {DAILY_WORLD[name]} with --days"
        synth.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=cast,
            default=None,
            help=f"{synth_help.get(name, name)} (default: {shown})",
        )
    synth.add_argument(
        "--raw-ids",
        dest="raw_ids",
        action="store_true",
        default=None,
        help=synth_help.get("raw_ids", "raw_ids") + " (default: dense ids)",
    )
    _add_days_arguments(synth, "a world that changes day by day (datasets/synth.md)")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    synth.set_defaults(func=_data_synth)

    ml = data_sub.add_parser("movielens", help="MovieLens 100k / 1M in the public format")
    ml.add_argument("--out", required=True, help="dataset directory to write" + URL_NOTE)
    ml.add_argument(
        "--source",
        default=None,
        help="GroupLens ml-100k or ml-1m folder or zip (default: cached ml-100k)",
    )
    ml.add_argument(
        "--max-history", type=int, default=50, help="clicks kept per history (default: 50)"
    )
    ml.add_argument(
        "--test-fraction",
        type=float,
        default=0.1,
        help="newest fraction of ratings by time that becomes test/ (default: 0.1)",
    )
    _add_days_arguments(ml, "N + 1 periods of equal rating count, by time (datasets/movielens.md)")
    ml.add_argument("--overwrite", action="store_true", help="replace a dataset genctr wrote there")
    ml.set_defaults(func=_data_movielens)

    val = data_sub.add_parser("validate", help="check a dataset directory against the format")
    val.add_argument("data", help="dataset directory")
    val.set_defaults(func=_data_validate)


CHOICES = {
    "decoder": list(DECODERS),
    "lookup": list(LOOKUPS),
    "negatives": list(NEGATIVES),
    "embedding_optimizer": list(EMBEDDING_OPTIMIZERS),
    "context_fusion": list(CONTEXT_FUSIONS),
    "decoder_layout": list(DECODER_LAYOUTS),
    "decoder_kernel": list(DECODER_KERNELS),
    "precision": list(PRECISIONS),
    "select_on": list(SELECT_ON),
    "calibrate": list(CALIBRATIONS),
}
# flags that only one stage reads
STAGE_ONLY = {
    "pretrain": {"negatives", "num_negatives"},
    "finetune": {
        "side_features",
        "context_fusion",
        "context_dropout",
        "decoder_lr",
        "compile",
        "select_on",
        "calibrate",
        "refit",
        "inherited_tables_lr",
    },
}


def _field_help(cls: type) -> dict[str, str]:
    """``name: text`` entries of a dataclass docstring's ``Args:`` section, joined per field."""
    found: dict[str, str] = {}
    name = None
    for line in (cls.__doc__ or "").split("Args:", 1)[-1].splitlines():
        match = re.match(r"^ {8}(\w+): (.*)$", line)
        if match:
            name, text = match.groups()
            found[name] = text
        elif name and line.startswith(" " * 12):
            found[name] += " " + line.strip()
        else:
            name = None
    return {k: v.replace("%", "%%").replace("``", "") for k, v in found.items()}


def _add_config_options(parser: argparse.ArgumentParser, stage: str) -> None:
    """One flag per ModelConfig / TrainConfig field the stage reads, help from the dataclass
    docstrings."""
    other = set().union(*(v for k, v in STAGE_ONLY.items() if k != stage))
    for cls in (ModelConfig, TrainConfig):
        helps = _field_help(cls)
        defaults = cls()
        for f in fields(cls):
            if f.name == "sharding" or f.name in other:
                continue
            flag = f"--{f.name.replace('_', '-')}"
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            help_text = helps.get(f.name, "")
            default = STAGE_DEFAULTS[stage].get(f.name, getattr(defaults, f.name))
            if default is not None and "default" not in help_text:
                shown = ("on" if default else "off") if kind == "bool" else default
                help_text = f"{help_text} (default: {shown})".strip()
            helps[f.name] = help_text
            if kind == "bool":
                parser.add_argument(
                    flag,
                    dest=f.name,
                    action=argparse.BooleanOptionalAction,
                    default=None,
                    help=helps.get(f.name),
                )
            else:
                cast = int if kind.startswith("int") else float if kind.startswith("float") else str
                parser.add_argument(
                    flag,
                    dest=f.name,
                    type=cast,
                    default=None,
                    choices=CHOICES.get(f.name),
                    help=helps.get(f.name),
                )
    parser.add_argument(
        "--stop-after-steps",
        type=int,
        default=0,
        help="checkpoint and exit after N steps in all; run the same command again to resume",
    )
    parser.add_argument(
        "--sharding",
        default="",
        metavar="TABLE=TYPE[,TABLE=TYPE]",
        help="force a table's sharding, e.g. item=row_wise,category=data_parallel",
    )


def _run_config(args: argparse.Namespace, stage: str) -> RunConfig:
    model, train = ModelConfig(), TrainConfig()
    for obj in (model, train):
        for f in fields(obj):
            value = getattr(args, f.name, None)
            if value is not None and f.name != "sharding":
                setattr(obj, f.name, value)
    for item in filter(None, args.sharding.split(",")):
        table, _, kind = item.partition("=")
        train.sharding[table.strip()] = kind.strip()
    return RunConfig(
        stage=stage,
        data=args.data,
        model=model,
        train=train,
        backbone=getattr(args, "backbone", None),
        transfer=getattr(args, "transfer", None) or "none",
        init_from=getattr(args, "init_from", None),
        warm_start=getattr(args, "warm_start", None),
    )


def _explicit(args: argparse.Namespace) -> dict[str, object]:
    """The model settings given on the command line (a warm start checks them)."""
    names = [f.name for f in fields(ModelConfig)] + ["backbone", "transfer", "max_history"]
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _pretrain(args: argparse.Namespace) -> int:
    from genctr_rec.training.pretrain import pretrain

    metrics = pretrain(
        _run_config(args, "pretrain"), args.out, args.stop_after_steps, _explicit(args)
    )
    if metrics is not None and _is_rank0():
        print(json.dumps({k: v for k, v in metrics.items() if "@" in k or k == "epoch_loss"}))
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from genctr_rec.training.finetune import finetune

    metrics = finetune(
        _run_config(args, "finetune"), args.out, args.stop_after_steps, _explicit(args)
    )
    if metrics is not None and _is_rank0():
        print(json.dumps(metrics["test"]))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from genctr_rec.training.evaluate import evaluate_run

    metrics = evaluate_run(args.data, args.run, args.batch_size)
    if _is_rank0():
        print(json.dumps(metrics))
    return 0


# the arguments that take a directory or an object-storage URL (s3://bucket/prefix)
URL_ARGUMENTS = ("models", "data", "out", "init_from", "warm_start", "run", "artifact")
URL_NOTE = "; a local path or s3://bucket/prefix"
DATA_HELP = "dataset directory in the public format (docs/data-format.md)" + URL_NOTE
WARM_START_HELP = (
    "continue this run of the same stage (yesterday's): its selected model and optimizer "
    "state on this dataset, whose vocabularies may have grown; its model settings are kept"
    + URL_NOTE
)
OUT_HELP = (
    "run directory: created, or resumed when it holds this run (locked while training; a "
    "directory of other files is refused)" + URL_NOTE
)


def _add_training_commands(sub: argparse._SubParsersAction) -> None:
    pre = sub.add_parser("pretrain", help="stage 1: generative pre-training")
    pre.add_argument("--data", required=True, help=DATA_HELP)
    pre.add_argument("--out", required=True, help=OUT_HELP)
    pre.add_argument("--warm-start", default=None, metavar="PREV_RUN", help=WARM_START_HELP)
    _add_config_options(pre, "pretrain")
    pre.set_defaults(func=_pretrain)

    fine = sub.add_parser("finetune", help="stage 2: CTR fine-tuning")
    fine.add_argument("--data", required=True, help=DATA_HELP)
    fine.add_argument("--out", required=True, help=OUT_HELP)
    fine.add_argument(
        "--backbone",
        default=None,
        choices=list(BACKBONE_NAMES),
        help="the CTR model: DNN, DCN V2, or DCN V2 with target attention over the history "
        "(required, unless --warm-start gives it)",
    )
    fine.add_argument(
        "--transfer",
        default=None,
        choices=list(TRANSFERS),
        help="none | ps | decoder | ps_decoder | ps_mi (GenCTR) (default: none)",
    )
    fine.add_argument("--init-from", default=None, help="pre-training run directory" + URL_NOTE)
    fine.add_argument("--warm-start", default=None, metavar="PREV_RUN", help=WARM_START_HELP)
    _add_config_options(fine, "finetune")
    fine.set_defaults(func=_finetune)

    ev = sub.add_parser("evaluate", help="AUC, GAUC, LogLoss of a finetune run on test")
    ev.add_argument(
        "--data", default=None, help="dataset whose test/ to score (default: the run's own)"
    )
    # --run-dir: the same option under torchrun, whose own parser claims "--run" as an
    # abbreviation of its --run-path
    ev.add_argument("--run", "--run-dir", dest="run", required=True, help="finetune run" + URL_NOTE)
    ev.add_argument(
        "--batch-size", type=int, default=None, help="rows per step (default: the run's)"
    )
    ev.set_defaults(func=_evaluate)


def _pipeline(args: argparse.Namespace) -> int:
    from genctr_rec.pipeline import run_pipeline

    run_pipeline(args.workdir, preset=args.preset, seed=args.seed, backbone=args.backbone)
    return 0


def _add_pipeline_command(sub: argparse._SubParsersAction) -> None:
    pipe = sub.add_parser("pipeline", help="every stage on the default data, end to end")
    pipe.add_argument("--workdir", default="runs/pipeline", help="where data and runs go")
    pipe.add_argument("--preset", default="default", help="synth preset for the data")
    pipe.add_argument("--seed", type=int, default=0, help="seed of both stages (default: 0)")
    pipe.add_argument(
        "--backbone",
        default="dnn",
        choices=list(BACKBONE_NAMES),
        help="the CTR backbone (default: dnn)",
    )
    pipe.set_defaults(func=_pipeline)


def _export(args: argparse.Namespace) -> int:
    from genctr_rec.serving.export import export_run, recompile_artifact

    if (args.run is None) == (args.recompile is None):
        raise ConfigError("give one of --run RUN (export a run) or --recompile ARTIFACT")
    if args.recompile is not None:
        meta = recompile_artifact(args.recompile, args.out, args.overwrite)
        print(json.dumps({"artifact": str(args.out), "model": meta["model"],
                          "artifact_sha256": meta["artifact_sha256"]}))  # fmt: skip
        return 0
    meta = export_run(
        args.run, args.out, args.quantize, args.data, args.overwrite, args.format, args.compile
    )
    parity = meta["parity"]
    print(
        json.dumps(
            {
                "artifact": str(args.out),
                "format": meta["model"]["format"],
                "compiled": meta["model"].get("compiled"),
                "quantize": args.quantize,
                "test_rows": parity["rows"],
                "max_abs_diff_vs_trained": parity["max_abs_diff"],
                "test_auc_trained": parity["trained"]["auc"],
                "test_auc_exported": parity["exported"]["auc"],
                "test_auc_change": parity["auc_change"],
                "table_bytes": parity["table_bytes"],
                "table_shrink": round(parity["table_shrink"], 3),
                "artifact_sha256": meta["artifact_sha256"],  # genctr serve --artifact-sha256
            }
        )
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from genctr_rec.serving.config import ServeConfig
    from genctr_rec.serving.run import serve

    config = ServeConfig(**{f.name: getattr(args, f.name) for f in fields(ServeConfig)})
    try:
        config.check()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    serve(args.artifact, config, args.verbose)
    return 0


def _add_serve_options(parser: argparse.ArgumentParser) -> None:
    """One flag per ServeConfig field, help from its docstring, as training's flags are."""
    from genctr_rec.serving.config import ServeConfig

    helps = _field_help(ServeConfig)
    defaults = ServeConfig()
    for f in fields(ServeConfig):
        flags = [f"--{f.name.replace('_', '-')}", *ServeConfig.ALIASES.get(f.name, [])]
        default = getattr(defaults, f.name)
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        text = helps.get(f.name, "")
        if kind == "bool":
            parser.add_argument(
                *flags, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                help=f"{text} (default: {'on' if default else 'off'})",
            )  # fmt: skip
            continue
        cast = int if kind.startswith("int") else float if kind.startswith("float") else str
        shown = "none" if default is None else default if default != "" else "empty"
        parser.add_argument(
            *flags, dest=f.name, type=cast, default=default,
            choices=ServeConfig.CHOICES.get(f.name), help=f"{text} (default: {shown})",
        )  # fmt: skip


def _add_serving_commands(sub: argparse._SubParsersAction) -> None:
    exp = sub.add_parser("export", help="serving artifact from a finetune run's checkpoint")
    exp.add_argument(
        "--run", "--run-dir", dest="run", default=None, help="finetune run" + URL_NOTE
    )
    exp.add_argument("--out", required=True, help="artifact directory to write" + URL_NOTE)
    exp.add_argument(
        "--quantize",
        default="none",
        choices=["none", "int8", "int4"],
        help="tables kept fp32, or fbgemm's row-wise int8 / int4 rows (checked: < 0.002 test "
        "AUC lost, else nothing is written)",
    )
    exp.add_argument(
        "--format",
        default="export",
        choices=["export", "torchscript"],
        help="export: torch.export programs (default); torchscript: the deprecated format of "
        "genctr-rec 0.10, for comparisons (int8 at most)",
    )
    exp.add_argument(
        "--compile",
        default="aoti",
        choices=["aoti", "none"],
        help="compile the exported programs with AOTInductor for this machine's CPU (aoti, "
        "the default: a minute of compiling for faster serving, benchmarks/results/"
        "serving_latency.md) or leave them uncompiled (none)",
    )
    exp.add_argument(
        "--recompile",
        default=None,
        metavar="ARTIFACT",
        help="instead of --run: compile ARTIFACT's exported programs again on this machine "
        "(another CPU than the one that exported it) into --out",
    )
    exp.add_argument("--data", default=None, help="the run's dataset (default: from its config)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing artifact")
    exp.set_defaults(func=_export)

    srv = sub.add_parser("serve", help="HTTP scoring service for an artifact")
    srv.add_argument(
        "--artifact",
        required=True,
        help="directory written by genctr export, or its s3:// URL (downloaded once to "
        "GENCTR_CACHE, default ~/.cache/genctr-rec, and verified); or a directory of versions "
        "MODELS/<version>/ (genctr export --out MODELS/<version>): the pinned version (genctr "
        "models pin), else the newest, swapped in without a pause as new ones arrive",
    )
    _add_serve_options(srv)
    srv.set_defaults(func=_serve, uses_torchrec=False)  # an exported artifact: torch alone


def _models(args: argparse.Namespace) -> int:
    from genctr_rec.serving.versions import ModelSource

    source = ModelSource(args.models)
    if args.models_command == "pin":
        source.pin(args.version)
    elif args.models_command == "unpin":
        source.unpin()
    versions = source.versions()
    print(
        json.dumps(
            {
                "models": args.models,
                "versions": versions,
                "pinned": source.pinned(),
                "serving": source.target(),
            }
        )
    )
    return 0


def _add_models_command(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser(
        "models", help="a directory of versioned artifacts: list, pin (roll back), unpin"
    )
    models_sub = models.add_subparsers(dest="models_command", required=True)
    for name, text in (
        ("list", "the complete versions, the pinned one, the one servers serve"),
        ("pin", "serve VERSION on every server watching MODELS (checked first): a rollback"),
        ("unpin", "serve the newest complete version again"),
    ):
        command = models_sub.add_parser(name, help=text)
        command.add_argument("models", help="directory of versions MODELS/<version>/" + URL_NOTE)
        if name == "pin":
            command.add_argument("version", help="a complete version under MODELS")
        command.set_defaults(func=_models, uses_torchrec=False)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_data_commands,
    _add_training_commands,
    _add_serving_commands,
    _add_models_command,
    _add_pipeline_command,
]


VERBOSE_HELP = "debug logging, and the third-party warnings that are hidden by default"


def _sub_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += [child, *_sub_parsers(child)]
    return found


def build_parser() -> argparse.ArgumentParser:
    from genctr_rec import __version__

    parser = argparse.ArgumentParser(prog="genctr", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    parser.add_argument("--version", action="version", version=f"genctr-rec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    for child in _sub_parsers(parser):  # -v after the sub-command too
        child.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # imported after parsing: `genctr -h` must not wait for torch
    from genctr_rec.checkpoint import CheckpointError
    from genctr_rec.compat import StackError, check_stack
    from genctr_rec.data.schema import DataFormatError
    from genctr_rec.logs import setup_logging
    from genctr_rec.serving import ArtifactError
    from genctr_rec.serving.workers import WorkerFailedToStart
    from genctr_rec.storage import StorageError, check_reachable
    from genctr_rec.training.preemption import EXIT_CODE as PREEMPTED_EXIT_CODE
    from genctr_rec.training.preemption import Preempted

    setup_logging(args.verbose)
    try:  # a native crash under torchrun then shows where it happened (error_file is N/A)
        faulthandler.enable()
    except (AttributeError, ValueError, OSError):  # stderr without a file descriptor
        pass
    finished = False
    try:
        check_stack(load_torchrec=getattr(args, "uses_torchrec", True))
        for name in URL_ARGUMENTS:  # a wrong key or bucket: one line before any work
            check_reachable(getattr(args, name, None) or "")
        code = args.func(args)
        finished = True
        return code
    except Preempted as exc:
        print(f"genctr: {exc}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except (
        DataFormatError,
        StackError,
        ConfigError,
        CheckpointError,
        ArtifactError,
        WorkerFailedToStart,
        StorageError,
        FileExistsError,
        FileNotFoundError,
    ) as exc:
        print(f"genctr: error: {exc}", file=sys.stderr)
        if isinstance(exc, DataFormatError):
            print(f"genctr: the data format: {FORMAT_DOC}", file=sys.stderr)
        return 2
    finally:
        # gloo's threads must stop before the interpreter does, and only once every rank is
        # done with its last collective ("terminate called without an active exception"
        # otherwise, now and then, at exit of the rank that finished first)
        from genctr_rec.distributed import shutdown_distributed

        shutdown_distributed(wait_for_others=finished)


def run() -> None:
    """The ``genctr`` command (and ``python -m genctr_rec.cli``): :func:`main` as a process.

    The process ends right after, so the interpreter's final garbage collection over the
    objects torch and TorchRec create at import is wasted work, paid by every command and every
    torchrun rank (benchmarks/results/process_exit.md): they are frozen out of it first.
    Everything the command writes is closed by then; ``main`` stays a plain function for
    in-process use."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
