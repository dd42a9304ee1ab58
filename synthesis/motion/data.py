"""`MotionDataModule`: displacement-field sequences of a population (phantom patients in memory, or a datalist of 4D scans)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from medct.data import check_workers, worker_options
from medct.errors import ConfigError, InputPathError
from medct.settings import Sampling, Split
from medct.synthesis.motion.sequence import (
    motion_grid,
    read_displacement,
    read_sequence,
    reference_channel,
    register_phases,
    to_motion_grid,
)
from medct.transforms import Preprocessing
from medct.volume import Volume


def _sequence_arrays(phases: Sequence[Volume], fields: np.ndarray, pre: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """(image (1, x, y, z), fields (T, 3, x, y, z)) on the motion grid of phases[0]."""
    grid = motion_grid(phases[0], pre.spacing)
    return reference_channel(phases[0], grid, pre.hu_min, pre.hu_max), to_motion_grid(fields, phases[0], grid)


class _Windows(torch.utils.data.Dataset):
    """Random training windows: a sequence, a start, a crop of `patch` motion-grid voxels, a random
    depth scale (0.8-1.2: deeper/shallower breathing) and left-right flip (x component negated)."""

    def __init__(self, seqs: list[tuple[np.ndarray, np.ndarray]], length: int, patch: Sequence[int], n: int, seed: int):
        self.seqs, self.length, self.patch, self.n, self.seed = seqs, length, tuple(patch), n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, i, torch.initial_seed() % 2**31]))
        img, f = self.seqs[int(rng.integers(len(self.seqs)))]
        s = int(rng.integers(len(f) - self.length + 1))
        f = f[s : s + self.length]
        sl = []
        for ax, p in enumerate(self.patch):
            n = img.shape[1 + ax]
            lo = int(rng.integers(max(n - p, 0) + 1))
            sl.append(slice(lo, lo + p))
        img_c, f_c = img[:, sl[0], sl[1], sl[2]], f[:, :, sl[0], sl[1], sl[2]] * np.float32(rng.uniform(0.8, 1.2))
        pad = [(0, max(p - n, 0)) for p, n in zip(self.patch, img_c.shape[1:], strict=True)]
        img_c = np.pad(img_c, [(0, 0), *pad], mode="edge")
        f_c = np.pad(f_c, [(0, 0), (0, 0), *pad], mode="edge")
        if rng.random() < 0.5:
            img_c, f_c = img_c[:, ::-1], f_c[:, :, ::-1].copy()
            f_c[:, 0] *= -1.0
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img_c)),
            "fields": torch.from_numpy(np.ascontiguousarray(f_c)),
        }


class MotionDataModule(pl.LightningDataModule):
    """Displacement-field sequences for population training of the motion model.

    Args:
        datalist: a JSON file {"training": [{"phases": [...] or "4D.nii.gz", "displacements":
            [...] (optional)}]} with paths relative to its folder; without "displacements" every
            phase is registered to phase 0 (`register_phases`, slow: once per run). Or None with
            phantom_patients > 0: phantom patients breathing irregularly (`medct.phantom.
            breathing4d.phantom_sequence`), made in memory with their exact fields.
        phantom_patients: how many phantom patients (seeded by phantom_seed + i). Defaults to 0.
        n_phases, phases_per_cycle: of each phantom sequence. Defaults to 24 and 8.
        phantom_shape, phantom_spacing: the phantom grid (voxels, mm). Defaults to (96, 96, 64) at 4 mm.
        preprocessing: motion grid (mm) and reference window. Defaults to 8 mm, [-1000, 500].
        sampling: patch_size (training crop on the motion grid) and batch_size; one window per
            draw. Defaults to (32, 32, 24) and 4.
        split: val_fraction (the first sequences validate) and seed. Defaults to 0.2 and 0.
        context: training windows hold context + 1 fields. Defaults to 16.
        samples_per_epoch, num_workers, multiprocessing_context: as in `medct.data.VolumeDataModule`.
    """

    def __init__(
        self,
        datalist: str | None = None,
        phantom_patients: int = 0,
        phantom_seed: int = 0,
        n_phases: int = 24,
        phases_per_cycle: int = 8,
        phantom_shape: tuple[int, int, int] = (96, 96, 64),
        phantom_spacing: float = 4.0,
        preprocessing: Preprocessing = Preprocessing(spacing=(8.0, 8.0, 8.0), hu_max=500.0, modality="CT"),
        sampling: Sampling = Sampling(patch_size=(32, 32, 24), batch_size=4, num_samples=1),
        split: Split = Split(),
        context: int = 16,
        samples_per_epoch: int = 200,
        num_workers: int = 0,
        multiprocessing_context: str | None = None,
    ) -> None:
        super().__init__()
        check_workers(num_workers, multiprocessing_context)
        if (datalist is None) == (phantom_patients <= 0):
            raise ConfigError("Give exactly one of data.datalist (a JSON file) or data.phantom_patients (> 0).")
        if n_phases < context + 1 and datalist is None:
            raise ConfigError(f"data.n_phases ({n_phases}) must exceed data.context ({context}).")
        # JSON primitives in the hyperparameters (a checkpoint stays weights_only-loadable)
        self.save_hyperparameters(ignore=["preprocessing", "sampling", "split"])
        self.pre = preprocessing.resolved("CT")
        self.sampling, self.split_settings = sampling, split
        self.hparams.update(preprocessing=self.pre.to_dict(), sampling=asdict(sampling), split=asdict(split))
        self.train_seqs: list[tuple[np.ndarray, np.ndarray]] = []
        self.val_seqs: list[tuple[np.ndarray, np.ndarray]] = []

    @property
    def resolved_preprocessing(self) -> dict[str, Any]:
        """The motion grid and window, as the task receives it (MedCTCLI links it)."""
        return self.pre.to_dict()

    def _load(self) -> list[tuple[np.ndarray, np.ndarray]]:
        hp = self.hparams
        if hp.datalist is None:
            from medct.phantom.breathing4d import phantom_sequence

            out = []
            for i in range(int(hp.phantom_patients)):
                sp = (float(hp.phantom_spacing),) * 3
                s = phantom_sequence(
                    int(hp.phantom_seed) + i, hp.n_phases, hp.phases_per_cycle, tuple(hp.phantom_shape), sp
                )
                out.append(_sequence_arrays(s.phases, s.displacements, self.pre))
            return out
        import json

        path = Path(hp.datalist)
        if not path.is_file():
            raise InputPathError(f"Datalist {path} does not exist.")
        entries = json.loads(path.read_text()).get("training", [])
        if not entries:
            raise InputPathError(f"{path} has no 'training' entries.")
        out = []
        for e in entries:
            ph = e["phases"]
            vols = read_sequence(path.parent / ph if isinstance(ph, str) else [path.parent / p for p in ph])
            if "displacements" in e:
                fields = np.stack([read_displacement(path.parent / d, vols[0]) for d in e["displacements"]])
            else:
                fields = register_phases(vols, spacing_mm=6.0)
            if len(vols) <= hp.context:
                raise ConfigError(f"{ph} has {len(vols)} phases; training needs more than data.context ({hp.context}).")
            out.append(_sequence_arrays(vols, fields, self.pre))
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.train_seqs:
            return
        seqs = self._load()
        n_val = int(round(len(seqs) * self.split_settings.val_fraction)) if len(seqs) > 1 else 0
        self.val_seqs, self.train_seqs = seqs[:n_val], seqs[n_val:]

    def train_dataloader(self) -> Any:
        hp = self.hparams
        patch, seed = self.sampling.patch_size, self.split_settings.seed
        ds = _Windows(self.train_seqs, hp.context + 1, patch, hp.samples_per_epoch, seed)
        workers = worker_options(int(hp.num_workers), hp.multiprocessing_context)
        return torch.utils.data.DataLoader(ds, batch_size=self.sampling.batch_size, shuffle=False, **workers)

    def val_dataloader(self) -> Any:
        items = [
            {"image": torch.from_numpy(i), "fields": torch.from_numpy(f)}
            for i, f in (self.val_seqs or self.train_seqs[:1])
        ]
        return torch.utils.data.DataLoader(items, batch_size=1)
