"""`medct fit|validate|test|predict --config RECIPE.yaml`: Lightning's CLI with medct's links.

MedCTCLI is LightningCLI (jsonargparse) in subclass mode, so one entry point runs every recipe
in configs/: the YAML names the task (`model.class_path`) and the data module (`data.class_path`).
What the data decides is given once, in `data:`, and linked into the task (`DATA_LINKS`):

  data.init_args.sampling.patch_size                  -> model.init_args.patch_size     (on parse)
  data.resolved_preprocessing (spacing, HU window; modality resolved from the phantom variant,
      dataset.json, else CT)                          -> model.init_args.preprocessing  (on instantiation)
  data.labels                                         -> model.init_args.labels   (on instantiation)
  data.num_classes -> model.init_args.net.init_args.out_channels                 (on instantiation)

A task (or data module) that lacks a link's source or target simply does not take part in it:
links are added for the classes the YAML names, so a pretraining task with neither `labels` nor
a network `out_channels` uses the same CLI (tested in tests/test_lightning_cli.py). Resume with `--ckpt_path`; scale out
with trainer flags (`--trainer.strategy=ddp --trainer.devices=N --trainer.num_nodes=M`).
Precision: a recipe's top-level `precision: auto|bf16|fp32` (`--precision`; default auto) goes
through medct's one policy (`medct.precision`): bf16-mixed where the trainer's accelerator has bf16
(a CUDA GPU with bf16, a CPU with AMX / AVX-512 BF16), 32-true elsewhere; bf16 on a device without
it is a ConfigError. Lightning's own `trainer.precision` (e.g. `--trainer.precision 16-mixed`),
when given, wins.

Importing this module has no side effects; `run_lightning` does the work.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from medct.errors import ConfigError, MedCTError

LIGHTNING_VERBS = ("fit", "validate", "test", "predict")

# (source in the data module, target in the task, when): the names the CLI links from data into the model.
DATA_LINKS: tuple[tuple[str, str, str], ...] = (
    ("data.init_args.sampling.patch_size", "model.init_args.patch_size", "parse"),
    ("data.init_args.context", "model.init_args.context", "parse"),
    ("data.resolved_preprocessing", "model.init_args.preprocessing", "instantiate"),
    ("data.labels", "model.init_args.labels", "instantiate"),
    ("data.num_classes", "model.init_args.net.init_args.out_channels", "instantiate"),
)


def condense_parser_error(message: str) -> str:
    """The informative lines of a jsonargparse error, joined into one sentence."""
    skip = ("Subtypes:", "Errors:", "Given value", "- Expected a <class 'NoneType'>", "Does not validate against any")
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    kept = [ln.lstrip("- ") for ln in lines if not ln.startswith(skip)]
    text = " ".join(kept) if kept else message.strip()
    text = text.replace(": :", ":").rstrip(".")
    return f"Invalid recipe value: {text}." if len(text) < 400 else f"Invalid recipe value: {text[:397]}..."


class ChannelsLast(Callback):
    """The task's parameters in channels_last_3d before its optimisers are made (`setup`), so
    oneDNN's 3D convolutions run in NDHWC through the whole fit (`medct.precision.channels_last`)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        from medct.precision import channels_last

        channels_last(pl_module)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, but a checkpoint appears whole or not at all: it is written to
    a temporary file beside its final name and renamed into place (`medct.paths.atomic_file`).

    Written by hand because Lightning's own "atomic" save stages the file in the system temp folder
    and moves it across file systems, which copies: a full disk leaves a half-written last.ckpt."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        import torch

        from medct.paths import atomic_file

        if storage_options is not None:
            raise TypeError("medct's checkpoint writer takes no storage_options.")
        buffer = io.BytesIO()  # serialised first (as Lightning does), so a full disk is an OSError
        torch.save(checkpoint, buffer)
        with atomic_file(path, suffix=".ckpt") as tmp:
            tmp.write_bytes(buffer.getbuffer())


def claim_log_version(logger: Any) -> None:
    """Fix a CSV/TensorBoard logger's next `version_N` by creating its folder (mkdir is atomic).

    Lightning picks the version lazily as max(existing) + 1, so two fits started together in one
    default_root_dir both take version_0 and write the same checkpoints/last.ckpt. Claiming the
    folder when the trainer is made gives each run its own. Only on rank zero (other ranks never
    write logs); a version the recipe names is left as it is."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    if not isinstance(logger, CSVLogger | TensorBoardLogger) or logger._version is not None or rank_zero_only.rank:
        return
    root = Path(logger.root_dir)  # save_dir/name
    version = logger._get_next_version()
    while True:
        try:
            (root / f"version_{version}").mkdir(parents=True)
        except FileExistsError:  # another run took it first
            version += 1
            continue
        break
    logger._version = version  # private: Lightning has no public setter, only the constructor argument


def remove_stale_checkpoint_temps(trainer: Trainer) -> None:
    """Remove the half-written checkpoints that killed runs (kill -9, power cut) left in the
    checkpoint folders of this root: the named `dirpath`s and every version's checkpoints/."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from medct.paths import remove_stale_temps

    folders = [Path(c.dirpath) for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
    for logger in trainer.loggers:
        if getattr(logger, "root_dir", None):
            folders += Path(logger.root_dir).glob("version_*/checkpoints")
    for folder in folders:
        remove_stale_temps(folder)


class MedCTCLI(LightningCLI):
    """LightningCLI for medct recipes: any LightningModule/LightningDataModule by class_path."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        super().__init__(
            model_class=LightningModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            # raise instead of printing the whole usage text: run_lightning turns it into one sentence
            parser_kwargs={"exit_on_error": False},
            args=list(args) if args is not None else None,
            run=run,
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The recipe's trainer, writing checkpoints atomically unless the recipe names its own plugins."""
        from medct.precision import lightning_device, lightning_precision, use_channels_last

        trainer_config = self._get(self.config_init, "trainer", default={}) or {}
        accelerator = trainer_config.get("accelerator")
        model = self._get(self.config_init, "model")
        if trainer_config.get("precision") is None and "precision" not in kwargs:
            asked = self._get(self.config_init, "precision", default="auto")
            kwargs["precision"] = lightning_precision(asked, accelerator, bool(getattr(model, "bf16_cpu", True)))
        family_default = bool(getattr(model, "channels_last_cpu", False))
        if use_channels_last(
            self._get(self.config_init, "channels_last"), family_default, lightning_device(accelerator)
        ):
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), ChannelsLast()]
        if not trainer_config.get("plugins") and "plugins" not in kwargs:
            kwargs["plugins"] = [AtomicCheckpointIO()]
        trainer = super().instantiate_trainer(**kwargs)
        for logger in trainer.loggers:
            claim_log_version(logger)
        remove_stale_checkpoint_temps(trainer)
        return trainer

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for source, target, when in DATA_LINKS:
            parser.link_arguments(source, target, apply_on=when)
        from medct.precision import PRECISION_CHOICES

        parser.add_argument(
            "--precision",
            choices=PRECISION_CHOICES,
            default="auto",
            help="medct's precision policy (medct.precision): bf16 autocast where the device has bf16, else fp32",
        )
        parser.add_argument(
            "--channels_last",
            type=bool | None,
            default=None,
            help="channels_last_3d memory for the network (default: the task family's measured CPU choice)",
        )


def run_lightning(args: list[str]) -> MedCTCLI:
    """Run one Lightning verb, e.g. `run_lightning(["fit", "--config", "configs/finetune/seg_phantom.yaml"])`;
    returns the CLI object (its `trainer`, `model` and `datamodule` after the run)."""
    if not args or args[0] not in LIGHTNING_VERBS and not args[0].startswith("-"):
        raise ValueError(f"the first argument must be one of {', '.join(LIGHTNING_VERBS)}, got {args[:1]}")
    check_ckpt_path(args)
    with warnings.catch_warnings():
        # `medct fit ...` passes its own argv as `args`; LightningCLI would warn that sys.argv is set too.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        try:
            return MedCTCLI(args=args)
        except MedCTError:
            raise
        except ArgumentError as e:
            raise ConfigError(condense_parser_error(str(e))) from e
        except Exception as e:
            # jsonargparse wraps errors raised while instantiating the data module or task in a
            # ValueError listing every Union member it tried; surface the user's one sentence.
            cause = medct_cause(e)
            if cause is not None:
                raise cause from e
            from lightning.fabric.utilities.exceptions import MisconfigurationException

            if isinstance(e, MisconfigurationException):  # Lightning's own check of a recipe's settings
                first = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
                raise ConfigError(f"The recipe's trainer settings do not fit together: {first}.") from e
            if isinstance(e, ValueError) and "Does not validate against any" in str(e):
                # a network's or task's own argument check (e.g. "hidden_size must be divisible by 6")
                raise ConfigError(condense_parser_error(str(e))) from e
            raise


def check_ckpt_path(args: list[str]) -> None:
    """`--ckpt_path X` (or `--ckpt_path=X`) must name a whole checkpoint: ConfigError before any
    work when it is missing, a folder, or not a complete file (a torch checkpoint is a zip archive
    whose directory sits at its end, so a truncated copy is caught without loading it)."""
    import zipfile

    for i, a in enumerate(args):
        if a == "--ckpt_path" and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith("--ckpt_path="):
            value = a.split("=", 1)[1]
        else:
            continue
        if value in ("last", "best", "hpc", "registry", "null", "None", ""):  # Lightning's own keywords
            continue
        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"--ckpt_path {value} does not exist or is not a file.")
        if not zipfile.is_zipfile(path):
            raise ConfigError(
                f"--ckpt_path {value} is not a complete checkpoint (truncated or not a Lightning .ckpt file)."
            )


# How a DataLoader worker's exception reaches the main process: its type and its formatted
# traceback as text ("Caught RuntimeError in DataLoader worker process 0. Original Traceback ...").
_WORKER_MEDCT_ERROR = re.compile(r"^medct(?:\.\w+)*\.\w*Error: (.+)$", re.MULTILINE)


def medct_cause(e: BaseException) -> MedCTError | None:
    """The MedCTError behind `e`: in its chain of causes, or named in the text of an exception a
    DataLoader worker raised (which carries only the worker's traceback as text)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, MedCTError):
            return cur
        if "DataLoader worker" in str(cur):
            found = _WORKER_MEDCT_ERROR.findall(str(cur))
            if found:
                return MedCTError(found[-1].strip())
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None
