"""Does the GenCTR gain hold on cuts nobody tuned to, and under which model selection?

    python -m benchmarks.selection [--cuts 6 7 8] [--seeds 0 1 2] [--workdir runs/selection]
    python -m benchmarks.selection --backbone dcnv2_ta --runs none ps_mi --no-synth
    python -m benchmarks.selection --ids-only --runs none ps_mi --peers --no-synth

The protocol, fixed before any result was seen (issue 25):

* **Data**: MovieLens-100k as ``genctr data movielens --days 9 --window 9`` writes it: ten
  periods of equal count; day k trains on every rating before period k + 1 and tests on period
  k + 1. The cuts are the last three days (6, 7, 8): tests on the ratings at 70-80 %, 80-90 %
  and 90-100 % of the timeline (a rolling origin; day 8 is close to the default split). And
  the synthetic default preset, its one split (added after the MovieLens runs, to test the
  decision rule below on a second dataset).
* **Decision rule** for the defaults: a protocol or lever becomes the default only where its
  paired gain's 95 % interval excludes zero on both datasets.
* **Seeds**: 0, 1, 2 per cut; one pre-training per cut and seed (the defaults).
* **Models**: the DNN backbone alone (``none``) and GenCTR (``ps_mi``), default flags.
* **Selection protocols** (the only thing that differs between runs of a pair):
  ``patience`` (0.10's: 4 validations an epoch, patience 3, nothing else) and ``plateau``
  (FuxiCTR's published trainer defaults: one validation an epoch, learning rates x0.1 at each
  validation without improvement, patience 2).
* **Fixed epochs** (``fixed1``-``fixed3``, added after the runs above, for issue 25 item 1's
  "the selected model is within the seed spread of the best fixed-epoch model"): no
  validation and no selection, 1, 2 or 3 epochs on every training row (the validation slice
  too), the last model tested; the number of epochs whose mean test AUC is highest is the
  one compared with the selected model (a choice made on test, so it favours fixed epochs).
* **Refit** (``refit``, added after the fixed-epoch runs showed the selected model 0.01 below
  them on MovieLens): the patience run's selected length, in epochs, trained again from the
  same start on every training row (the validation slice, the newest rows, included), the
  last model tested: the usual "choose the epochs on validation, then train on everything",
  and what ``genctr finetune --refit`` does (here its second half, reusing the patience run).
* **Transfer levers** (issue 25 item 2), under ``patience`` only: GPSD's frozen sparse
  transfer (``--transfer ps --inherited-tables-lr 0``) and GenCTR with its inherited tables
  frozen (``ps_mi`` with the same flag).
* **Peers refit** (``--refit-peers``, with the refit): a peer's selected number of epochs
  trained again on every train/ row, paired with GenCTR's refit, so that the refit is compared
  with refit peers only.
* **Inherited tables at a tenth of the rate** (``ps_mi`` with ``--inherited-tables-lr 0.005``,
  the other tables' 0.05 / 10; added after the frozen runs, which helped the synthetic data
  and hurt MovieLens: one value between the two, fixed before its runs, one decade down).
* **The inherited tables' rate picked on validation** (added after the two runs above): per
  cut and seed, whichever of GenCTR, its tables at a tenth and frozen validated best,
  computed from those runs (``picked_on_validation``: a small search a user can run, judged on
  test only after the pick).
* **The decoder's learning rate and dropout** (``ps_mi`` with ``--decoder-lr 1e-4``, and
  ``context_dropout=0.2`` on g(s, c): the values ``benchmarks/transfer_levers.py`` measured on
  one split; added after the runs above, run on these cuts unchanged).
* **Peers** (issue 25 item 5, added after the runs above, same cuts and seeds): DeepCTR-Torch's
  DIN and DCNMix, torch-rechub's DIN, BST and DCN V2 (``benchmarks/peers.py``: same features,
  embedding width and validation rows; one validation an epoch, patience 2). A peer is trained
  once per cut and seed; GenCTR is compared with every peer and with the best peer of each cut
  (the peer whose mean over seeds is highest there: the strongest opponent, chosen after the
  fact, which favours the peers). On MovieLens only unless ``--synth-peers`` (the synthetic
  preset is larger; BST alone takes about 11 minutes a run on one core), and a slow peer can
  be held to some seeds (``--peer-seeds rechub_bst=0``): it is then paired on those only.
* **Table 1's rows 2-4 and 6-8** (issue 25 item 4, added with the peers): PS alone, the
  decoder without pre-training, the decoder with PS, and GenCTR from the three other
  pre-trainings (CS + SD, RS + CD, RS + SD: one more pre-training each a cut and seed), under
  the default protocol.
* **Ids only** (``--ids-only``, added after the runs above): the same pairs with the model
  reading no user or side features (``ModelConfig(side_features=False)``; the pre-training is
  the same), for the issue's "with and without side features"; results in
  ``selection[_<backbone>]_ids_only``.
* **Calibration**: every run fits Platt scaling on its validation rows; both the raw and the
  calibrated test figures are reported (AUC is the same by construction).

Every claim is paired per cut and seed: GenCTR minus the backbone under the same protocol,
mean and a 95 % t-interval over the 9 pairs, and how many pairs are positive. Runs already
finished under ``--workdir`` are reused.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from benchmarks.common import write_results
from benchmarks.peers import PEER_LABELS, PEERS
from benchmarks.table1 import VARIANTS, metrics_of
from genctr_rec.config import TRANSFER_PREFIXES, ModelConfig, RunConfig, TrainConfig

DAYS, WINDOW = 9, 9  # ten periods; every day trains on all ratings before its test period
CUTS = [6, 7, 8]
TRANSFERS = ["none", "ps_mi"]
PROTOCOLS: dict[str, dict] = {
    "patience": {"evals_per_epoch": 4, "patience": 3, "lr_decay": 1.0},
    "plateau": {"evals_per_epoch": 1, "patience": 2, "lr_decay": 0.1},
    # no validation, no selection: a fixed number of epochs on every training row (the
    # validation slice included), the last model tested; the best of them is chosen on test
    **{f"fixed{n}": {"valid_fraction": 0.0, "epochs": n, "calibrate": "none"} for n in (1, 2, 3)},
    # the patience run's selected length (in epochs) trained again on every training row
    "refit": {"valid_fraction": 0.0, "calibrate": "none", "refit_of": "patience"},
}
FIXED = [name for name in PROTOCOLS if name.startswith("fixed")]
# transfer levers (issue 25 item 2), under the default protocol only: the inherited tables
# frozen (GPSD's frozen sparse transfer), with and without model integration
LEVERS: dict[str, tuple[str, dict]] = {
    "gpsd": ("ps", {"inherited_tables_lr": 0.0}),
    "ps_mi_frozen": ("ps_mi", {"inherited_tables_lr": 0.0}),
    "ps_mi_tenth": ("ps_mi", {"inherited_tables_lr": 0.005}),
    # the two levers of benchmarks/transfer_levers.py at the values measured there (one split)
    "ps_mi_declr": ("ps_mi", {"decoder_lr": 1e-4}),
    "ps_mi_drop": ("ps_mi", {"context_dropout": 0.2}),
}
LEVER_PROTOCOL = "patience"
# the inherited tables' rate chosen per run on validation among the default, a tenth and frozen
# (computed from those three runs, no run of its own; added after their results)
RATE_CANDIDATES = ("ps_mi", "ps_mi_tenth", "ps_mi_frozen")
# Table 1's rows 2-4 (issue 25 item 4), under the default protocol: they need no other
# pre-training than GenCTR's (rows 6-8 do: CS+SD, RS+CD, RS+SD)
ROWS: dict[str, tuple[str, dict]] = {"ps": ("ps", {}), "decoder": ("decoder", {}),
                                     "ps_decoder": ("ps_decoder", {}), "cs_sd": ("ps_mi", {}),
                                     "rs_cd": ("ps_mi", {}), "rs_sd": ("ps_mi", {})}  # fmt: skip
# rows 6-8 fine-tune GenCTR from another pre-training (Table 1's variants: negatives, decoder)
PRETRAINED_AS = {name: VARIANTS[name] for name in ("cs_sd", "rs_cd", "rs_sd")}
# Student's t, 97.5 % quantile, by degrees of freedom
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval."""
    a = np.asarray(values, dtype=float)
    if len(a) < 2:
        return float(a.mean()), float("nan")
    t = T_975.get(len(a) - 1, 1.96)
    return float(a.mean()), float(t * a.std(ddof=1) / np.sqrt(len(a)))


def prepare(workdir: Path, cuts: list[int], synth: bool) -> dict[str, tuple[Path, Path]]:
    """{cut name: (dataset, run folder)}: MovieLens' days, and the synthetic default preset."""
    from genctr_rec.data import movielens
    from genctr_rec.data.synth import SynthConfig, generate

    root = workdir / "data-movielens-days"
    if not (root / f"day-{DAYS - 1:02d}" / "meta.json").is_file():
        movielens.build_days(root, DAYS, WINDOW, overwrite=True)
    out = {f"ml-{c}": (root / f"day-{c:02d}", workdir / f"cut{c}") for c in cuts}
    if synth:
        data = workdir / "data-synth"
        if oracle(data) is None:  # absent, or written before meta.json carried the ceilings
            generate(SynthConfig.preset("default"), data, overwrite=True)
        out["synth"] = (data, workdir / "synth")
    return out


def oracle(data: Path) -> dict | None:
    """The synthetic test split's ceilings (meta.json's ``oracle_test``), None if not written."""
    from genctr_rec.data.schema import DatasetMeta

    if not (data / "meta.json").is_file():
        return None
    return DatasetMeta.read(data).extra.get("oracle_test")


def oracle_line(ceilings: dict) -> str:
    """What a model that knew the simulator's click probabilities would score on the test day."""
    true, blind = ceilings["true_ctr"], ceilings["without_position"]
    return (
        f"Ceiling (meta.json `oracle_test`): the simulator's true click probabilities score "
        f"AUC {true['auc']:.4f}, LogLoss {true['logloss']:.4f} on this test day; without the "
        f"ad's position (not a declared feature: no model here reads it) AUC "
        f"{blind['auc']:.4f}, LogLoss {blind['logloss']:.4f}."
    )


def picked_on_validation(rows: list[dict], name: str, candidates: tuple[str, ...]) -> list[dict]:
    """Per cut and seed, the candidate run whose selected checkpoint validated best, as a row
    named ``name``: what a user who tried each candidate and kept the best on validation (never
    on test) would ship. Needs every candidate of that cut and seed."""
    runs: dict[tuple[str, int], dict[str, dict]] = {}
    for r in rows:
        if r["protocol"] == LEVER_PROTOCOL and r["transfer"] in candidates:
            runs.setdefault((r["cut"], r["seed"]), {})[r["transfer"]] = r
    picked = []
    for found in runs.values():
        if len(found) == len(candidates) and all(r["valid_auc"] for r in found.values()):
            best = max(found.values(), key=lambda r: r["valid_auc"])
            picked.append({**best, "transfer": name, "picked": best["transfer"]})
    return picked


def _fields(config: type, overrides: dict) -> dict:
    """The overrides that are fields of ``config`` (a lever may set model and training flags)."""
    return {k: v for k, v in overrides.items() if k in config.__dataclass_fields__}


def _plan() -> list[tuple[str, str, str, dict]]:
    """(protocol, name, transfer, model and train overrides) of every fine-tuning run of a cut
    and seed."""
    runs = [(p, t, t, train) for p, train in PROTOCOLS.items() for t in TRANSFERS]
    for name, (transfer, extra) in {**LEVERS, **ROWS}.items():
        runs.append((LEVER_PROTOCOL, name, transfer, {**PROTOCOLS[LEVER_PROTOCOL], **extra}))
    return runs


def run_all(
    workdir: Path,
    cuts: list[int],
    seeds: list[int],
    backbone: str,
    synth: bool,
    peers: list[str] = (),
    peer_seeds: dict[str, list[int]] | None = None,
    synth_peers: bool = False,
    only: list[str] | None = None,
    side_features: bool = True,
    protocols: list[str] = (LEVER_PROTOCOL,),
    refit_peers: list[str] = (),
) -> list[dict]:
    """Every run of the plan (or the runs named in ``only``, under ``protocols``) and of the
    peers (those in ``refit_peers`` refit too), reusing finished ones; one row each."""
    from genctr_rec.training.finetune import finetune, refit_steps, train_rows

    rows = []
    for cut, (data, folder) in prepare(workdir, cuts, synth).items():
        for seed in seeds:
            for protocol, name, transfer, overrides in _plan():
                if only and (name not in only or protocol not in protocols):
                    continue
                pre = _pretrained(data, folder, seed, name)
                reads = "" if side_features else "-ids"
                run = folder / f"ft-{backbone}{reads}-{name}-{protocol}-s{seed}"
                if "refit_of" in overrides:
                    of = folder / f"ft-{backbone}{reads}-{name}-{overrides['refit_of']}-s{seed}"
                    chosen = metrics_of(of)["selected"]  # what genctr finetune --refit does,
                    steps = refit_steps(chosen, train_rows(data))  # reusing the patience run
                    overrides = {**overrides, "steps": steps}
                cfg = RunConfig(
                    "finetune",
                    str(data),
                    ModelConfig(side_features=side_features, **_fields(ModelConfig, overrides)),
                    TrainConfig(seed=seed, **_fields(TrainConfig, overrides)),
                    backbone=backbone,
                    transfer=transfer,
                    init_from=str(pre) if transfer in TRANSFER_PREFIXES else None,
                )
                m = metrics_of(run) or finetune(cfg, run)
                raw = m.get("test_uncalibrated", m["test"])
                row = {
                    "cut": cut,
                    "seed": seed,
                    "protocol": protocol,
                    "transfer": name,
                    "auc": m["test"]["auc"],
                    "logloss": m["test"]["logloss"],
                    "calibration": m["test"]["calibration"],
                    "raw_logloss": raw["logloss"],
                    "raw_calibration": raw["calibration"],
                    "epochs_run": len(m["epoch_loss"]),
                    "selected_epoch": (m.get("selected") or {}).get(
                        "epoch", len(m["epoch_loss"]) - 1
                    )
                    + 1,
                    "train_seconds": m.get("train_seconds"),
                    "valid_auc": (m.get("selected") or {}).get("auc"),
                }
                rows.append(row)
                print(json.dumps(row))
            for peer in peers if cut != "synth" or synth_peers else ():
                if seed not in (peer_seeds or {}).get(peer, [seed]):
                    continue
                selected = folder / f"peer-{peer}-s{seed}.json"
                rows.append(_peer_row(selected, peer, data, cut, seed))
                print(json.dumps(rows[-1]))
                if peer in refit_peers:
                    refit = folder / f"peer-{peer}-refit-s{seed}.json"
                    rows.append(_peer_row(refit, peer, data, cut, seed, refit_of=selected))
                    print(json.dumps(rows[-1]))
    return rows


def _pretrained(data: Path, folder: Path, seed: int, name: str) -> Path:
    """The pre-training run ``name`` fine-tunes from (GenCTR's, CS + CD, unless a row of
    Table 1 names another), trained once per cut and seed."""
    from genctr_rec.training.pretrain import pretrain

    negatives, decoder = PRETRAINED_AS.get(name, ("category", "conditional"))
    pre = folder / (f"pretrain-{name}-s{seed}" if name in PRETRAINED_AS else f"pretrain-s{seed}")
    cfg = RunConfig(
        "pretrain",
        str(data),
        ModelConfig(decoder=decoder),
        TrainConfig(seed=seed, negatives=negatives),
    )
    if metrics_of(pre) is None:
        pretrain(cfg, pre)
    return pre


def _peer_row(
    path: Path, peer: str, data: Path, cut: str, seed: int, refit_of: Path | None = None
) -> dict:
    """One peer's run as a row of the table, trained once and kept beside our runs;
    ``refit_of``: the selected run whose epochs a refit trains on every row."""
    from benchmarks.peers import train_peer
    from genctr_rec.storage import write_json

    if not path.is_file():
        epochs = json.loads(refit_of.read_text())["epoch"] if refit_of else 0
        write_json(path, train_peer(peer, data, seed, refit_epochs=epochs))
    m = json.loads(path.read_text())
    test = m["test"]
    return {
        "cut": cut,
        "seed": seed,
        "protocol": "peer_refit" if refit_of else "peer",
        "transfer": peer,
        "auc": test["auc"],
        "logloss": test["logloss"],
        "calibration": test["calibration"],
        "raw_logloss": test["logloss"],
        "raw_calibration": test["calibration"],
        "epochs_run": m["epochs_run"],
        "selected_epoch": m["epoch"],
        "train_seconds": None,
    }


def _best_peer(
    rows: list[dict], peers: list[str], protocol: str = "peer"
) -> dict[tuple[str, int], dict]:
    """{(cut, seed): row} of the peer with the highest mean test AUC on each cut."""
    out = {}
    for cut in dict.fromkeys(r["cut"] for r in rows):
        of_cut = [r for r in rows if r["cut"] == cut and r["protocol"] == protocol]
        if not of_cut:
            continue
        best = max(
            peers, key=lambda n: np.mean([r["auc"] for r in of_cut if r["transfer"] == n] or [0])
        )
        out.update({(cut, r["seed"]): r for r in of_cut if r["transfer"] == best})
    return out


def _shown(values: list[float], digits: int = 4) -> str:
    mean, half = interval(values)
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def markdown(rows: list[dict], cuts: list[str], title: str) -> str:
    lines = [
        f"### {title}",
        "",
        "| protocol | model | test AUC | LogLoss (calibrated) | LogLoss (raw) | calibration "
        "(calibrated) | calibration (raw) | epochs run | selected epoch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    labels = {"none": "backbone", "ps_mi": "GenCTR", "gpsd": "GPSD (PS, tables frozen)",
              "ps_mi_frozen": "GenCTR, tables frozen",
              "ps_mi_tenth": "GenCTR, tables at a tenth of the rate",
              "rate_by_valid": "GenCTR, tables' rate picked on validation (0.05, 0.005, 0)",
              "ps_mi_declr": "GenCTR, decoder at Adam 1e-4",
              "ps_mi_drop": "GenCTR, dropout 0.2 on g", "ps": "row 2: backbone + PS",
              "decoder": "row 3: + decoder, no pre-training",
              "ps_decoder": "row 4: + decoder, PS", "cs_sd": "row 6: GenCTR, CS + SD",
              "rs_cd": "row 7: GenCTR, RS + CD", "rs_sd": "row 8: GenCTR, RS + SD",
              **PEER_LABELS}  # fmt: skip
    peers = list(dict.fromkeys(r["transfer"] for r in rows if r["protocol"] == "peer"))
    shown = [(p, n) for p, n, _, _ in _plan()] + [(LEVER_PROTOCOL, "rate_by_valid")]
    refit = list(dict.fromkeys(r["transfer"] for r in rows if r["protocol"] == "peer_refit"))
    shown += [("peer", n) for n in peers] + [("peer_refit", n) for n in refit]
    for protocol, transfer in dict.fromkeys(shown):
        sel = [r for r in rows if r["protocol"] == protocol and r["transfer"] == transfer]
        if not sel:
            continue
        col = {k: [r[k] for r in sel] for k in sel[0]}
        lines.append(
            f"| {protocol} | {labels[transfer]} "
            f"| {_shown(col['auc'])} | {_shown(col['logloss'])} "
            f"| {_shown(col['raw_logloss'])} | {_shown(col['calibration'], 3)} "
            f"| {_shown(col['raw_calibration'], 3)} | {np.mean(col['epochs_run']):.1f} "
            f"| {np.mean(col['selected_epoch']):.1f} |"
        )
    picks = [r["picked"] for r in rows if r["transfer"] == "rate_by_valid"]
    if picks:
        counts = ", ".join(f"{labels[n]} {picks.count(n)}" for n in RATE_CANDIDATES)
        lines += ["", f"The tables' rate picked on validation chose: {counts}."]
    lines += [
        "",
        "Paired per cut and seed (same data, same seed):",
        "",
        "| claim | ΔAUC mean ± 95 % | pairs > 0 | per cut (mean ΔAUC) | ΔLogLoss (calibrated) |",
        "|---|---|---|---|---|",
    ]

    def pick(protocol: str, transfer: str) -> dict[tuple[int, int], dict]:
        return {
            (r["cut"], r["seed"]): r
            for r in rows
            if r["protocol"] == protocol and r["transfer"] == transfer
        }

    claims = (
        [(f"GenCTR − backbone ({p})", (p, "ps_mi"), (p, "none")) for p in PROTOCOLS]
        + [(f"plateau − patience ({t})", ("plateau", t), ("patience", t)) for t in TRANSFERS]
        + [
            (f"{labels[n]} − backbone", (LEVER_PROTOCOL, n), (LEVER_PROTOCOL, "none"))
            for n in LEVERS
        ]
        + [
            (f"GenCTR − {labels[n]}", (LEVER_PROTOCOL, "ps_mi"), (LEVER_PROTOCOL, n))
            for n in LEVERS
        ]
    )
    claims += [
        (f"{labels['rate_by_valid']} − GenCTR", (LEVER_PROTOCOL, "rate_by_valid"),
         (LEVER_PROTOCOL, "ps_mi")),
        (f"{labels['rate_by_valid']} − backbone", (LEVER_PROTOCOL, "rate_by_valid"),
         (LEVER_PROTOCOL, "none")),
    ]  # fmt: skip
    claims += [
        (f"{labels[n]} − backbone", (LEVER_PROTOCOL, n), (LEVER_PROTOCOL, "none")) for n in ROWS
    ]
    claims += [
        (f"GenCTR − {labels[n]}", (LEVER_PROTOCOL, "ps_mi"), (LEVER_PROTOCOL, n)) for n in ROWS
    ]
    claims.append(
        ("row 4 − row 3 (PS helps a decoder)", (LEVER_PROTOCOL, "ps_decoder"),
         (LEVER_PROTOCOL, "decoder"))
    )  # fmt: skip
    claims += [
        ("row 7 − row 8 (CD beats SD, RS)", (LEVER_PROTOCOL, "rs_cd"), (LEVER_PROTOCOL, "rs_sd")),
        ("row 6 − row 8 (CS beats RS, SD)", (LEVER_PROTOCOL, "cs_sd"), (LEVER_PROTOCOL, "rs_sd")),
    ]
    claims += [(f"refit − selected ({labels[t]})", ("refit", t), (LEVER_PROTOCOL, t))
               for t in TRANSFERS]  # fmt: skip
    for t in TRANSFERS:  # the fixed-epoch protocol that tested best (on test: favours it)
        tested = {f: [r["auc"] for r in rows if (r["protocol"], r["transfer"]) == (f, t)]
                  for f in FIXED}  # fmt: skip
        tested = {f: np.mean(a) for f, a in tested.items() if a}
        if tested:
            best = max(tested, key=tested.get)
            claims.append((f"selected − best fixed epochs ({labels[t]}: {best})",
                           (LEVER_PROTOCOL, t), (best, t)))  # fmt: skip
            claims.append((f"refit − best fixed epochs ({labels[t]}: {best})", ("refit", t),
                           (best, t)))  # fmt: skip
    claims += [(f"GenCTR − {labels[n]}", (LEVER_PROTOCOL, "ps_mi"), ("peer", n)) for n in peers]
    if peers:
        claims.append(("GenCTR − best peer of each cut", (LEVER_PROTOCOL, "ps_mi"), ("peer", "")))
    claims += [(f"GenCTR refit − {labels[n]} refit", ("refit", "ps_mi"), ("peer_refit", n))
               for n in refit]  # fmt: skip
    if refit:
        claims.append(("GenCTR refit − best refit peer of each cut", ("refit", "ps_mi"),
                       ("peer_refit", "")))  # fmt: skip
    for name, a, b in claims:
        best_of = refit if b[0] == "peer_refit" else peers
        left, right = pick(*a), (pick(*b) if b[1] else _best_peer(rows, best_of, b[0]))
        keys = sorted(set(left) & set(right))
        if not keys:
            continue
        d_auc = [left[k]["auc"] - right[k]["auc"] for k in keys]
        d_ll = [left[k]["logloss"] - right[k]["logloss"] for k in keys]
        by_cut = {c: [d for k, d in zip(keys, d_auc, strict=True) if k[0] == c] for c in cuts}
        by_cut = by_cut if len(cuts) > 1 else {}
        per_cut = ", ".join(f"{c}: {np.mean(d):+.4f}" for c, d in by_cut.items() if d) or "-"
        wins = sum(d > 0 for d in d_auc)
        mean, half = interval(d_auc)
        ll_mean, ll_half = interval(d_ll)
        lines.append(
            f"| {name} | {mean:+.4f} ± {half:.4f} | {wins}/{len(keys)} | {per_cut} "
            f"| {ll_mean:+.4f} ± {ll_half:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuts", type=int, nargs="+", default=CUTS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--backbone", default="dnn")
    parser.add_argument("--workdir", default="runs/selection")
    parser.add_argument("--no-synth", dest="synth", action="store_false")
    parser.add_argument(
        "--peers", nargs="*", default=list(PEERS), help="peers to train beside ours (none: none)"
    )
    parser.add_argument(
        "--peer-seeds",
        nargs="*",
        default=[],
        metavar="PEER=SEEDS",
        help="train PEER on these comma-separated seeds only (a slow peer: rechub_bst=0)",
    )
    parser.add_argument(
        "--synth-peers",
        action="store_true",
        help="train the peers on the synthetic data too (hours on 2 CPU cores)",
    )
    parser.add_argument(
        "--ids-only",
        action="store_true",
        help="our models read no user or side features (the peers keep theirs: add --peers)",
    )
    parser.add_argument(
        "--protocols",
        nargs="*",
        default=[LEVER_PROTOCOL],
        help="with --runs: under these protocols (e.g. patience refit)",
    )
    parser.add_argument(
        "--refit-peers",
        nargs="*",
        default=[],
        help="peers also refit: their selected epochs trained on every row (none by default)",
    )
    parser.add_argument(
        "--runs",
        nargs="*",
        default=None,
        help="only these runs, default protocol (e.g. none ps_mi for another backbone)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    peer_seeds = {
        k: [int(s) for s in v.split(",")] for k, v in (a.split("=") for a in args.peer_seeds)
    }
    rows = run_all(
        Path(args.workdir),
        args.cuts,
        args.seeds,
        args.backbone,
        args.synth,
        args.peers,
        peer_seeds,
        args.synth_peers,
        args.runs,
        not args.ids_only,
        args.protocols,
        args.refit_peers,
    )
    rows += picked_on_validation(rows, "rate_by_valid", RATE_CANDIDATES)
    reads = ", ids only (no user or side features)" if args.ids_only else ""
    ml = [f"ml-{c}" for c in args.cuts]
    table = markdown(
        [r for r in rows if r["cut"] in ml],
        ml,
        f"MovieLens-100k, rolling origin: days {args.cuts} of `--days {DAYS} --window {WINDOW}`"
        f", seeds {args.seeds}, {args.backbone}{reads}; mean ± 95 % interval over cuts x seeds",
    )
    if args.synth:
        table += "\n\n" + markdown(
            [r for r in rows if r["cut"] == "synth"],
            ["synth"],
            f"synthetic, default preset (one split), seeds {args.seeds}, {args.backbone}{reads}; "
            "mean ± 95 % interval over seeds",
        )
        table += "\n\n" + oracle_line(oracle(Path(args.workdir) / "data-synth"))
    payload = {
        "cuts": args.cuts,
        "seeds": args.seeds,
        "protocols": PROTOCOLS,
        "peers": args.peers,
        "peer_seeds": peer_seeds,
        "backbone": args.backbone,
        "side_features": not args.ids_only,
        "rows": rows,
    }
    name = "selection" if args.backbone == "dnn" else f"selection_{args.backbone}"
    name += "_ids_only" if args.ids_only else ""
    print(write_results(name, payload, table))


if __name__ == "__main__":
    main()
