"""Every data pipeline survives pickling, so DataLoader workers may be spawned (macOS, Windows,
forkserver: Linux's default from Python 3.14) and Lightning's `ddp_spawn` works (issue 37).

The fast tests pickle the train and val pipelines of every data module (and the inference
pipeline), check the unpickled pipeline gives the same item as the original, and run one epoch of
every module's datasets through a worker started with `multiprocessing_context="spawn"`. The slow
tests run each module's own loaders that way, and `medct fit --trainer.strategy=ddp_spawn` on 2
CPU processes.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medct.data import ClassificationDataModule, PhantomCohort, SegmentationDataModule, VolumeDataModule
from medct.errors import ConfigError
from medct.pretrain.continual import ContinualDataModule
from medct.settings import Sampling, Split
from medct.synthesis.motion import MotionDataModule
from medct.synthesis.sct import SCTDataModule
from medct.synthesis.text_data import TextCTDataModule
from medct.transforms import Preprocessing, infer_transforms

SPACING = (4.0, 4.0, 4.0)
SHAPE = (40, 40, 32)
SPAWN = {"num_workers": 1, "multiprocessing_context": "spawn"}


def _cohort(root: Path, name: str, **kw: Any) -> PhantomCohort:
    return PhantomCohort(n=3, shape=SHAPE, spacing=SPACING, **kw)


@pytest.fixture(scope="module")
def modules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One small instance of every data module (and of every VolumeDataModule key set), workers spawned."""
    root = tmp_path_factory.mktemp("spawn")
    pre = Preprocessing(spacing=SPACING)
    one = Sampling(patch_size=(24, 24, 16), batch_size=1, num_samples=1)
    common = {"preprocessing": pre, "sampling": one, **SPAWN}
    seg = SegmentationDataModule(data_dir=str(root / "ct"), phantom=_cohort(root, "ct"), **common)
    seg.prepare_data()  # the CT cohort the other modules reuse
    ct = json.loads((root / "ct" / "dataset.json").read_text())["training"]
    pair = {"training": [{"fixed": ct[i]["image"], "moving": ct[(i + 1) % 3]["image"]} for i in range(3)]}
    (root / "ct" / "pairs.json").write_text(json.dumps(pair))
    return {
        "segmentation": seg,
        "classification": ClassificationDataModule(class_key="lesion", data_dir=str(root / "ct"), **common),
        "pretraining": VolumeDataModule(keys=["image"], data_dir=str(root / "ct"), **common),
        "registration": VolumeDataModule(keys=["fixed", "moving"], datalist=str(root / "ct" / "pairs.json"), **common),
        "multiphase": VolumeDataModule(
            keys=["phases", "label"],
            data_dir=str(root / "mp"),
            phantom=_cohort(root, "mp", phases=("native", "venous")),
            **common,
        ),
        "continual": ContinualDataModule(
            data_dir=str(root / "cbct"),
            phantom=_cohort(root, "cbct", variant="cbct"),
            replay_data_dir=str(root / "ct"),
            replay_fraction=0.5,
            **common,
        ),
        "text_ct": TextCTDataModule(
            data_dir=str(root / "text"),
            phantom=_cohort(root, "text", varied_reports=True),
            size=(24, 24, 16),
            **common,
        ),
        "sct": SCTDataModule(
            data_dir=str(root / "sct"),
            phantom=_cohort(root, "sct", variant="cbct"),
            preprocessing=Preprocessing(spacing=SPACING, hu_min=-1024.0, hu_max=3071.0),
            sampling=Sampling(patch_size=(24, 24, 3), batch_size=1, num_samples=1),
            **SPAWN,
        ),
        "motion": MotionDataModule(
            phantom_patients=2,
            n_phases=6,
            phases_per_cycle=4,
            phantom_shape=(32, 32, 24),
            context=3,
            samples_per_epoch=2,
            **SPAWN,
            sampling=Sampling(patch_size=(8, 8, 8), batch_size=2),
            split=Split(val_fraction=0.5),
        ),
    }


VOLUME_MODULES = [
    "segmentation",
    "classification",
    "pretraining",
    "registration",
    "multiphase",
    "continual",
    "text_ct",
    "sct",
]


def _same(a: Any, b: Any) -> bool:
    """Equal items: dicts / lists of tensors, arrays, strings, numbers (meta is not compared)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor | np.ndarray):
        return torch.equal(torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b)))
    return a == b


@pytest.mark.parametrize("name", VOLUME_MODULES)
@pytest.mark.parametrize("split", ["train", "val"])
def test_pipeline_round_trips_through_pickle(modules: dict[str, Any], name: str, split: str) -> None:
    dm = modules[name]
    dm.prepare_data()
    dm.setup("fit")
    pipeline = dm.transforms(split)
    clone = pickle.loads(pickle.dumps(pipeline))
    item = dict((dm.train_items if split == "train" else dm.val_items)[0])
    seeded = []
    for p in (pipeline, clone):
        p.set_random_state(seed=7)
        seeded.append(p(dict(item)))
    assert _same(seeded[0], seeded[1])


def test_infer_pipeline_and_motion_windows_pickle(modules: dict[str, Any]) -> None:
    pre = Preprocessing(spacing=SPACING)
    path = json.loads((Path(modules["segmentation"].data_dir) / "dataset.json").read_text())["training"][0]
    path = str(Path(modules["segmentation"].data_dir) / path["image"])
    out = [
        p({"image": path})["image"] for p in (infer_transforms(pre), pickle.loads(pickle.dumps(infer_transforms(pre))))
    ]
    assert torch.equal(out[0].as_tensor(), out[1].as_tensor())
    motion = modules["motion"]
    motion.setup("fit")
    windows = motion.train_dataloader().dataset
    assert _same(pickle.loads(pickle.dumps(windows))[0], windows[0])


def _loaders(dm: Any) -> list[Any]:
    dm.prepare_data()
    dm.setup("fit")
    return [dm.train_dataloader(), dm.val_dataloader()]


def test_every_dataset_through_one_spawned_worker(modules: dict[str, Any]) -> None:
    """The train and val datasets of every module (their pipelines inside), pickled into one worker
    started by spawn; every item comes back, and a deterministic (val) item equals the in-process one.
    One worker for all keeps it to one interpreter start (each costs seconds)."""
    datasets, configured = [], []
    for dm in modules.values():
        for loader in _loaders(dm):
            datasets.append(loader.dataset)
            if loader.num_workers:  # the motion validation items are in memory, no workers
                configured.append(loader.multiprocessing_context.get_start_method())
    assert configured == ["spawn"] * len(configured) and len(configured) == 2 * len(modules) - 1
    everything = torch.utils.data.ConcatDataset(datasets)
    loader = torch.utils.data.DataLoader(everything, batch_size=None, shuffle=False, **SPAWN)
    items = list(loader)
    assert len(items) == len(everything)
    # segmentation comes first: its val dataset (deterministic) follows its train dataset
    assert _same(items[len(datasets[0])], datasets[1][0])


@pytest.mark.slow
@pytest.mark.parametrize("name", [*VOLUME_MODULES, "motion"])
def test_one_epoch_with_spawned_workers(modules: dict[str, Any], name: str) -> None:
    """Every batch of a short epoch (train and val) through each module's own loaders, workers
    started by spawn (slow: two interpreter starts per module)."""
    for loader in _loaders(modules[name]):
        batches = list(loader)
        assert batches and all(isinstance(b, dict) for b in batches)


def test_unknown_start_method_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="multiprocessing_context must be one of fork, spawn, forkserver"):
        VolumeDataModule(data_dir=str(tmp_path), multiprocessing_context="thread")


@pytest.mark.slow
def test_fit_with_ddp_spawn_on_two_cpu_processes(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "medct.cli", "fit", "--config", "seg_phantom",
        "--trainer.strategy=ddp_spawn", "--trainer.devices=2", "--trainer.accelerator=cpu",
        "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false", "--trainer.default_root_dir", str(tmp_path / "runs"),
        f"--data.init_args.data_dir={tmp_path / 'data'}", "--data.init_args.num_workers=1",
        "--data.init_args.multiprocessing_context=spawn", "--data.init_args.phantom.n=4",
        "--data.init_args.phantom.shape=[48,48,48]", "--data.init_args.sampling.patch_size=[32,32,32]",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=2` reached." in out.stderr + out.stdout
    assert list((tmp_path / "runs").rglob("*.ckpt"))
