"""Turbolift learning: sequential fine-tuning over a chain of domains, with forgetting measured.

Haseljic, Chatterjee et al., "Liver Segmentation using Turbolift Learning for CT and Cone-beam
C-arm Perfusion Imaging" (2022): train on CT, then CBCT, then CBCT-TST, each stage starting from the
previous stage's best-by-validation weights (all weights, output layer included, with a fresh
optimiser and schedule, as their code does).

A chain is one YAML: a `medct fit` recipe (trainer / model / data, the settings every stage
shares) plus a `turbolift:` section,

    turbolift:
      output_dir: runs/turbolift_phantom
      rehearsal: 0.0            # share of each later stage's training list replayed from earlier stages
      regularizer: none         # none | l2 | ewc  (towards the previous stage's weights)
      regularizer_weight: 0.0
      encoder_lr_scale: 1.0     # < 1: slow learner for the encoder (from stage 2 on)
      fisher_batches: 16        # EWC: batches of the previous stage's training data for its Fisher
      stages:
        - name: ct
          data: {data_dir: data/turbolift/ct, phantom: {variant: ct, n: 12}}   # -> data.init_args
          model: {lr: 0.001}                                                  # -> model.init_args
          trainer: {max_epochs: 20}                                           # -> trainer

`medct turbolift --config chain.yaml [LIGHTNING OVERRIDES ...]` runs it (`run_chain`). Each stage
writes `<output_dir>/<index>_<name>/`: the resolved datalist, the stage's own recipe
(config.yaml), checkpoints/ (best and last) and, when done, done.json. Running the command again
skips finished stages and resumes an interrupted one from its last.ckpt, so a killed chain loses at
most the epoch in progress. One chain at a time writes to an output folder (a lock file holding its
process id; a second run is refused in one sentence, a dead run's lock taken over). After each stage the best weights are scored (Dice) on every stage's
validation set; `forgetting.csv` / `forgetting.png` hold the matrix R[i][j] (Dice on stage j's
validation data after training stage i) and `summary.json` the continual-learning measures
(Lopez-Paz & Ranzato, NeurIPS 2017; Chaudhry et al., ECCV 2018):
  average accuracy  ACC = mean_j R[T-1][j]
  backward transfer BWT = mean_{j<T-1} (R[T-1][j] - R[j][j])
  forgetting        F_j = max_{i<T-1} R[i][j] - R[T-1][j], and its mean over j < T-1.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medct.errors import ConfigError, InputPathError, MedCTError
from medct.paths import claim, write_text_atomic

CHAIN_KEY = "turbolift"
CHAIN_LOCK = ".medct-claim-chain"  # in output_dir: the pid of the run writing there
CHAIN_OPTIONS = (
    "output_dir",
    "rehearsal",
    "regularizer",
    "regularizer_weight",
    "encoder_lr_scale",
    "fisher_batches",
    "stages",
)
STAGE_OPTIONS = ("name", "data", "model", "trainer")
MONITOR = "val/dice_mean"


@dataclass
class Stage:
    """One stage of a chain: its name and the overrides of the shared recipe."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)


@dataclass
class Chain:
    """A parsed chain YAML: the shared recipe and the `turbolift:` options."""

    base: dict[str, Any]
    stages: list[Stage]
    output_dir: Path
    rehearsal: float = 0.0
    regularizer: str = "none"
    regularizer_weight: float = 0.0
    encoder_lr_scale: float = 1.0
    fisher_batches: int = 16

    def stage_dir(self, i: int) -> Path:
        return self.output_dir / f"{i:02d}_{self.stages[i].name}"


def read_chain(path: str | os.PathLike[str], output_dir: str | None = None) -> Chain:
    """Parse and check a chain YAML (one-sentence ConfigError for anything wrong in `turbolift:`)."""
    src = Path(path)
    if not src.is_file():
        raise InputPathError(f"Chain recipe {src} does not exist.")
    try:
        cfg = yaml.safe_load(src.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{src} is not valid YAML ({str(e).splitlines()[0]}).") from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get(CHAIN_KEY), dict):
        raise ConfigError(f"{src} has no '{CHAIN_KEY}:' section; a chain recipe lists its stages there.")
    opts = cfg.pop(CHAIN_KEY)
    unknown = sorted(set(opts) - set(CHAIN_OPTIONS))
    if unknown:
        raise ConfigError(f"{src}: unknown {CHAIN_KEY} option(s) {unknown}; known: {', '.join(CHAIN_OPTIONS)}.")
    raw_stages = opts.get("stages") or []
    if not isinstance(raw_stages, list) or len(raw_stages) < 1:
        raise ConfigError(f"{src}: {CHAIN_KEY}.stages must list at least one stage.")
    stages = []
    for k, s in enumerate(raw_stages):
        if not isinstance(s, dict) or not s.get("name"):
            raise ConfigError(f"{src}: stage {k + 1} needs a name.")
        bad = sorted(set(s) - set(STAGE_OPTIONS))
        if bad:
            raise ConfigError(
                f"{src}: stage '{s['name']}' has unknown key(s) {bad}; known: {', '.join(STAGE_OPTIONS)}."
            )
        stages.append(
            Stage(str(s["name"]), dict(s.get("data") or {}), dict(s.get("model") or {}), dict(s.get("trainer") or {}))
        )
    names = [s.name for s in stages]
    from medct.runner import case_name_problem  # the one rule for names that become paths

    for name in names:
        problem = case_name_problem(name)
        if problem is not None:  # a stage's name becomes its folder inside output_dir
            raise ConfigError(f"{src}: stage name {name!r} is refused: {problem}.")
    if len({n.casefold() for n in names}) != len(names):
        raise ConfigError(f"{src}: stage names must be unique (also ignoring case), got {names}.")
    regularizer = str(opts.get("regularizer", "none"))
    if regularizer not in ("none", "l2", "ewc"):
        raise ConfigError(f"{src}: {CHAIN_KEY}.regularizer must be none, l2 or ewc, got '{regularizer}'.")
    rehearsal = float(opts.get("rehearsal", 0.0))
    if not 0.0 <= rehearsal < 1.0:
        raise ConfigError(f"{src}: {CHAIN_KEY}.rehearsal must lie in [0, 1), got {rehearsal}.")
    out = output_dir or opts.get("output_dir")
    if not out:
        raise ConfigError(f"{src}: set {CHAIN_KEY}.output_dir (or --output-dir).")
    return Chain(
        base=cfg,
        stages=stages,
        output_dir=Path(out),
        rehearsal=rehearsal,
        regularizer=regularizer,
        regularizer_weight=float(opts.get("regularizer_weight", 0.0)),
        encoder_lr_scale=float(opts.get("encoder_lr_scale", 1.0)),
        fisher_batches=int(opts.get("fisher_batches", 16)),
    )


# ----------------------------------------------------------------------------- recipes per stage


def _merged(chain: Chain, i: int) -> dict[str, Any]:
    """The shared recipe with stage i's overrides."""
    cfg = copy.deepcopy(chain.base)
    stage = chain.stages[i]
    cfg.setdefault("trainer", {}).update(copy.deepcopy(stage.trainer))
    cfg.setdefault("model", {}).setdefault("init_args", {}).update(copy.deepcopy(stage.model))
    cfg.setdefault("data", {}).setdefault("init_args", {}).update(copy.deepcopy(stage.data))
    return cfg


def _instantiate_data(data_cfg: dict[str, Any]) -> Any:
    """The data module a recipe's `data:` names (jsonargparse, as the Lightning CLI builds it)."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data")
    try:
        ns = parser.parse_object({"data": data_cfg})
        return parser.instantiate_classes(ns).data
    except Exception as e:
        from medct.lightning_cli import condense_parser_error, medct_cause

        cause = medct_cause(e)
        if cause is not None:
            raise cause from e
        raise ConfigError(condense_parser_error(str(e))) from e


def resolve_stage_data(chain: Chain, i: int) -> Path:
    """Write stage i's training/validation cases as a datalist with absolute paths (once; the
    phantom cohort a stage names is written on first use) and return its path."""
    out = chain.stage_dir(i) / "datalist.json"
    if out.is_file():
        return out
    dm = _instantiate_data(_merged(chain, i)["data"])
    dm.prepare_data()
    dm.setup("fit")
    labels = {str(k): str(n) for k, n in enumerate(getattr(dm, "labels", []))}  # MSD style, index -> name
    payload = {
        "training": list(dm.train_items),
        "validation": list(dm.val_items),
        "labels": labels,
        "modality": {"0": str(dm.modality)},  # a CBCT stage stays CBCT (its model card says so)
    }
    if not payload["validation"]:
        raise ConfigError(
            f"Stage '{chain.stages[i].name}' has no validation cases; Turbolift picks each stage's best weights on them."
        )
    write_text_atomic(out, json.dumps(payload, indent=1, default=str))
    return out


def _datalist_items(path: Path, key: str) -> list[dict[str, Any]]:
    return list(json.loads(path.read_text())[key])


def rehearsal_items(chain: Chain, i: int, seed: int) -> list[dict[str, Any]]:
    """Earlier stages' training cases replayed in stage i: round(r / (1 - r) x n_i) of them, so that
    they make up the fraction r of the stage's training list, drawn evenly from stages 0..i-1."""
    if chain.rehearsal <= 0 or i == 0:
        return []
    own = _datalist_items(chain.stage_dir(i) / "datalist.json", "training")
    n = round(chain.rehearsal / (1.0 - chain.rehearsal) * len(own))
    pools = [_datalist_items(chain.stage_dir(j) / "datalist.json", "training") for j in range(i)]
    rng = random.Random(seed * 1009 + i)
    picked: list[dict[str, Any]] = []
    for k in range(n):  # round-robin over earlier stages, without repeats while a pool lasts
        pool = pools[k % len(pools)]
        if pool:
            picked.append(pool.pop(rng.randrange(len(pool))))
    return picked


def stage_recipe(chain: Chain, i: int, best_previous: Path | None, seed: int) -> dict[str, Any]:
    """The `medct fit` recipe of stage i: shared settings + stage overrides, the stage's resolved
    datalist (plus rehearsal), the hand-over of the previous stage's best weights and the chain's
    safeguards, and a checkpoint callback writing into the stage folder."""
    cfg = _merged(chain, i)
    stage_dir = chain.stage_dir(i)
    data = cfg["data"]["init_args"]
    datalist = stage_dir / "datalist.json"
    replay = rehearsal_items(chain, i, seed)
    if replay:
        lists = json.loads(datalist.read_text())
        lists["training"] = lists["training"] + replay
        mixed = stage_dir / "datalist_rehearsal.json"
        write_text_atomic(mixed, json.dumps(lists, indent=1, default=str))
        datalist = mixed
    for key in ("data_dir", "phantom"):
        data.pop(key, None)
    data["datalist"] = str(datalist.resolve())
    model = cfg["model"]["init_args"]
    if best_previous is not None:
        model["init_checkpoint"] = str(best_previous.resolve())
        model.pop("pretrained_encoder", None)  # the first stage's encoder is already in those weights
        if chain.regularizer != "none":
            model["regularizer"] = chain.regularizer
            model["regularizer_weight"] = chain.regularizer_weight
            if chain.regularizer == "ewc":
                model["fisher_path"] = str((chain.stage_dir(i - 1) / "fisher.safetensors").resolve())
        model["encoder_lr_scale"] = chain.encoder_lr_scale
    trainer = cfg["trainer"]
    trainer["default_root_dir"] = str(stage_dir.resolve())
    callbacks = [
        c for c in trainer.get("callbacks") or [] if not str(c.get("class_path", "")).endswith("ModelCheckpoint")
    ]
    callbacks.append(
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str((stage_dir / "checkpoints").resolve()),
                "monitor": MONITOR,
                "mode": "max",
                "save_last": True,
                "filename": "best",
            },
        }
    )
    trainer["callbacks"] = callbacks
    return cfg


# ----------------------------------------------------------------------------- running


@dataclass
class ChainResult:
    """What a finished chain measured: R[i][j] and the continual-learning measures."""

    stages: list[str]
    matrix: list[list[float]]
    summary: dict[str, Any]
    output_dir: Path


def forgetting_measures(matrix: Sequence[Sequence[float]]) -> dict[str, Any]:
    """ACC, BWT and forgetting per earlier stage of a T x T matrix R[i][j] (see the module docstring)."""
    t = len(matrix)
    last = list(matrix[-1])
    acc = sum(last) / t
    if t == 1:
        return {"average_dice": acc, "backward_transfer": 0.0, "forgetting": {}, "mean_forgetting": 0.0}
    bwt = sum(last[j] - matrix[j][j] for j in range(t - 1)) / (t - 1)
    forgetting = {j: max(matrix[i][j] for i in range(t - 1)) - last[j] for j in range(t - 1)}
    return {
        "average_dice": acc,
        "backward_transfer": bwt,
        "forgetting": forgetting,
        "mean_forgetting": sum(forgetting.values()) / len(forgetting),
    }


def _best_checkpoint(stage_dir: Path, trainer: Any) -> Path:
    ckpt_cb = getattr(trainer, "checkpoint_callback", None)
    best = getattr(ckpt_cb, "best_model_path", "") if ckpt_cb is not None else ""
    if best and Path(best).is_file():
        return Path(best)
    last = stage_dir / "checkpoints" / "last.ckpt"
    if last.is_file():  # no validation ran (e.g. fast_dev_run): the last weights are the stage's result
        return last
    final = stage_dir / "checkpoints" / "final.ckpt"
    trainer.save_checkpoint(final)
    return final


def _load_weights(task: Any, ckpt: Path) -> None:
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    task.load_state_dict(state, strict=True)


def dice_on_datalist(task: Any, trainer_cfg: dict[str, Any], data_cfg: dict[str, Any], datalist: Path) -> float:
    """Mean Dice of `task` on the validation cases of `datalist` (the shared data settings)."""
    import lightning.pytorch as pl

    cfg = copy.deepcopy(data_cfg)
    init = cfg.setdefault("init_args", {})
    for key in ("data_dir", "phantom"):
        init.pop(key, None)
    init["datalist"] = str(datalist.resolve())
    dm = _instantiate_data(cfg)
    trainer = pl.Trainer(
        accelerator=trainer_cfg.get("accelerator", "auto"),
        devices=1,
        precision=trainer_cfg.get("precision"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1 if trainer_cfg.get("fast_dev_run") else trainer_cfg.get("limit_val_batches"),
    )
    metrics = trainer.validate(task, datamodule=dm, verbose=False)[0]
    value = metrics.get(MONITOR)
    return float("nan") if value is None else float(value)


def _fisher(chain: Chain, i: int, task: Any, datamodule: Any) -> None:
    """EWC: the Fisher information of stage i's training data at its best weights."""
    from medct.finetune.safeguards import fisher_diagonal, save_fisher

    key = task.hparams.get("input_key", "image")
    device = next(task.net.parameters()).device

    def loss_of(batch: dict[str, Any]) -> Any:
        image, label = batch[key].to(device), batch["label"].to(device)
        return task.supervised_loss(task(image), label)

    datamodule.setup("fit")
    fisher = fisher_diagonal(task.net, datamodule.train_dataloader(), loss_of, chain.fisher_batches)
    save_fisher(fisher, chain.stage_dir(i) / "fisher.safetensors")


def run_chain(
    config: str | os.PathLike[str], overrides: Sequence[str] = (), output_dir: str | None = None
) -> ChainResult:
    """Run (or resume) every stage of a chain YAML; `overrides` are Lightning CLI arguments given
    to every stage (e.g. "--trainer.accelerator=cpu"). Returns the forgetting matrix and measures."""
    from medct.lightning_cli import run_lightning

    chain = read_chain(config, output_dir)
    chain.output_dir.mkdir(parents=True, exist_ok=True)
    lock = chain.output_dir / CHAIN_LOCK
    holder = claim(lock)
    if holder:  # two chains in one folder would train into the same stage checkpoints
        raise MedCTError(
            f"Another medct turbolift run (process {holder}) is writing to {chain.output_dir}; "
            "wait for it to finish or give another --output-dir."
        )
    try:
        return _run_stages(chain, overrides, run_lightning)
    finally:
        lock.unlink(missing_ok=True)


def _run_stages(chain: Chain, overrides: Sequence[str], run_lightning: Any) -> ChainResult:
    """run_chain's work, under the output folder's lock."""
    seed = int(chain.base.get("seed_everything") or 0)
    datalists = [resolve_stage_data(chain, i) for i in range(len(chain.stages))]
    best_previous: Path | None = None
    rows: list[list[float]] = []
    for i, stage in enumerate(chain.stages):
        stage_dir = chain.stage_dir(i)
        done = stage_dir / "done.json"
        if done.is_file():
            info = json.loads(done.read_text())
            best_previous = Path(info["best_checkpoint"])
            rows.append([float(v) for v in info["dice_on_stages"]])
            print(f"stage {i + 1}/{len(chain.stages)} '{stage.name}': done before, skipped")
            continue
        recipe = stage_recipe(chain, i, best_previous, seed)
        config_path = stage_dir / "config.yaml"
        write_text_atomic(config_path, yaml.safe_dump(recipe, sort_keys=False))
        args = ["fit", "--config", str(config_path), *overrides]
        last = stage_dir / "checkpoints" / "last.ckpt"
        if last.is_file():
            args += ["--ckpt_path", str(last)]
            print(f"stage {i + 1}/{len(chain.stages)} '{stage.name}': resuming from {last}")
        else:
            print(f"stage {i + 1}/{len(chain.stages)} '{stage.name}': training")
        cli = run_lightning(args)
        best = _best_checkpoint(stage_dir, cli.trainer)
        _load_weights(cli.model, best)
        if chain.regularizer == "ewc" and i + 1 < len(chain.stages):
            _fisher(chain, i, cli.model, cli.datamodule)
        trainer_cfg = {**recipe.get("trainer", {}), **_override_dict(overrides, "trainer")}
        trainer_cfg["precision"] = str(cli.trainer.precision)  # what the stage trained at (medct.precision)
        row = [dice_on_datalist(cli.model, trainer_cfg, recipe["data"], datalists[j]) for j in range(len(chain.stages))]
        rows.append(row)
        write_text_atomic(
            done,
            json.dumps({"stage": stage.name, "best_checkpoint": str(best.resolve()), "dice_on_stages": row}, indent=1),
        )
        best_previous = best
        print(f"stage {i + 1}/{len(chain.stages)} '{stage.name}': Dice on stages " + ", ".join(f"{v:.3f}" for v in row))
    names = [s.name for s in chain.stages]
    summary = {"stages": names, "matrix": rows, **_jsonable(forgetting_measures(rows), names)}
    write_matrix(chain.output_dir, names, rows)
    write_text_atomic(chain.output_dir / "summary.json", json.dumps(summary, indent=1))
    return ChainResult(names, rows, summary, chain.output_dir)


def _jsonable(measures: dict[str, Any], names: list[str]) -> dict[str, Any]:
    out = dict(measures)
    out["forgetting"] = {names[j]: v for j, v in measures["forgetting"].items()}
    return out


def _override_dict(overrides: Sequence[str], section: str) -> dict[str, Any]:
    """`--trainer.fast_dev_run=true` style overrides of one section, as a dict (for evaluation)."""
    out: dict[str, Any] = {}
    for arg in overrides:
        if arg.startswith(f"--{section}.") and "=" in arg:
            key, value = arg[len(section) + 3 :].split("=", 1)
            out[key] = yaml.safe_load(value)
    return out


def write_matrix(folder: Path, names: list[str], rows: list[list[float]]) -> None:
    """forgetting.csv (rows: after training stage i; columns: Dice on stage j) and a heat map PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medct.paths import atomic_file

    lines = ["after_stage," + ",".join(f"dice_{n}" for n in names)]
    lines += [names[i] + "," + ",".join("" if math.isnan(v) else f"{v:.4f}" for v in row) for i, row in enumerate(rows)]
    write_text_atomic(folder / "forgetting.csv", "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(3.0 + 1.2 * len(names), 1.4 + 0.9 * len(rows)))
    im = ax.imshow(rows, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(names)), [f"on {n}" for n in names])
    ax.set_yticks(range(len(rows)), [f"after {n}" for n in names[: len(rows)]])
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            ax.text(
                j, i, "n/a" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k"
            )
    ax.set_title("Dice after each stage")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    with atomic_file(folder / "forgetting.png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
