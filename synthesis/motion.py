"""Patient-specific autoregressive prediction of respiratory motion from a 4D CT.

Lai et al., "Patient-Specific Autoregressive Models for Organ Motion Prediction in Radiotherapy"
(2025): the phases of a 4D CT are a sequence; a causal model predicts each next phase from the
earlier ones, pretrained on a population and fine-tuned on the one patient's observed phases, then
rolled out for future phases; it is compared with PCA-of-deformation motion models.

How medct does it:
  * every phase is represented by its displacement field from the reference phase (phase 0), found
    by registration (`register_phases`: IMPACT's optimiser on intensities, or Elastix B-splines) and
    resampled to a coarse RAS "motion grid" (8 mm by default; breathing fields are smooth);
  * `medct.nets.MotionTransformer` predicts field t + 1 from fields 0..t; `MotionTask` trains it
    on a population (`MotionDataModule`: phantom patients in memory, or a datalist of 4D scans);
  * `finetune` adapts a copy to one patient's observed phases (teacher-forced next-phase loss);
    `rollout` predicts k future fields, feeding each prediction back in (a sliding context);
  * a predicted image is the reference phase warped by the predicted field, so the anatomy is the
    patient's own (nothing is synthesised), and its labels move with it the same way;
  * baselines in the same representation: `copy_last`, `linear_extrapolation` and `PCAMotionModel`
    (PCA of the observed fields, scores driven by a breathing surrogate and its derivative).

Conventions: a field u_t is pull-back, RAS world mm: phase_t(p) = reference(p + u_t(p)), the
direction of `medct.registration` (fixed = phase t, moving = the reference) and of the phantoms.
Motion-grid arrays are (T, 3, x, y, z) float32, the three components being RAS vectors.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medct.card import ModelCard
from medct.data import check_workers, worker_options
from medct.errors import ConfigError, InputPathError, InvalidVolumeError, MedCTError
from medct.geometry import Grid
from medct.intensity import scale_window
from medct.settings import Sampling, Split
from medct.task import MedCTTask
from medct.transforms import Preprocessing
from medct.volume import Volume

Registration = Literal["intensity", "elastix"]
Method = Literal["ar", "copy-last", "linear", "pca"]
MIN_PHASES = 3
_VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")


# --------------------------------------------------------------------------- reading a 4D scan


def order_phase_files(folder: str | Path) -> list[Path]:
    """The phase volumes of a folder in phase order: by the last number in each file name
    (phase_2 before phase_10). One clear error for a folder without volumes, a file name without a
    number, or two files with the same number."""
    root = Path(folder)
    files = [p for p in sorted(root.iterdir()) if p.is_file() and p.name.lower().endswith(_VOLUME_SUFFIXES)]
    if not files:
        raise InputPathError(f"{root} holds no phase volumes (.nii.gz, .nii, .mha, .mhd, .nrrd).")
    numbers: dict[int, Path] = {}
    for p in files:
        found = re.findall(r"\d+", p.name.split(".")[0])
        if not found:
            raise InvalidVolumeError(
                f"{p.name} has no phase number in its name; name the phases e.g. phase_00.nii.gz, phase_10.nii.gz."
            )
        n = int(found[-1])
        if n in numbers:
            raise InvalidVolumeError(f"{numbers[n].name} and {p.name} have the same phase number {n}.")
        numbers[n] = p
    return [numbers[n] for n in sorted(numbers)]


def read_sequence(source: str | Path | Sequence[str | Path]) -> list[Volume]:
    """The phases of a 4D scan: a 4D NIfTI, a folder of phase volumes (`order_phase_files`) or a
    list of paths in order. All on one grid, at least MIN_PHASES, finite."""
    from medct.io import read_phases, validate_for_inference

    if isinstance(source, (str, Path)) and Path(source).is_dir():
        source = [str(p) for p in order_phase_files(source)]
    vols = read_phases(source)  # checks existence, grids (GeometryMismatchError) and >= 2 phases
    if len(vols) < MIN_PHASES:
        raise InvalidVolumeError(
            f"A 4D scan for motion prediction needs at least {MIN_PHASES} phases (motion is learnt from "
            f"the changes between them), got {len(vols)}."
        )
    for v in vols:
        validate_for_inference(v)
    return vols


# --------------------------------------------------------------------------- the motion grid


def motion_grid(reference: Volume, spacing: Sequence[float]) -> Grid:
    """The RAS grid at `spacing` (mm) that covers the reference (as MONAI's Orientation + Spacing)."""
    from medct.geometry import network_grid

    return network_grid(reference.affine, reference.shape, tuple(float(s) for s in spacing))


def to_motion_grid(fields: np.ndarray, reference: Volume, grid: Grid) -> np.ndarray:
    """(T, X, Y, Z, 3) RAS-mm fields on the reference grid -> (T, 3, x, y, z) on `grid`."""
    from medct.geometry import resample_volume

    out = [resample_volume(Volume(np.asarray(u, np.float32), reference.affine), grid).array for u in fields]
    return np.stack([np.moveaxis(o, -1, 0) for o in out]).astype(np.float32)


def from_motion_grid(fields: np.ndarray, grid: Grid, reference: Volume) -> np.ndarray:
    """(T, 3, x, y, z) on `grid` -> (T, X, Y, Z, 3) RAS mm on the reference grid (trilinear; the
    edge value beyond the motion grid, which covers the reference)."""
    from medct.geometry import resample_volume

    target = Grid(reference.shape, reference.affine)
    out = [resample_volume(Volume(np.moveaxis(u, 0, -1), grid.affine), target).array for u in fields]
    return np.stack(out).astype(np.float32)


def read_displacement(path: str | Path, reference: Volume) -> np.ndarray:
    """An (X, Y, Z, 3) RAS-mm displacement field from a NIfTI file (as `medct motion` writes them;
    X, Y, Z, 1, 3 vector NIfTIs too), which must lie on the reference's grid. (`read_volume` reads
    scalar images only.)"""
    import nibabel as nib

    from medct.io import check_same_grid

    p = Path(path)
    if not p.is_file():
        raise InputPathError(f"Displacement field {p} does not exist.")
    try:
        img = nib.load(p)
        arr = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # nibabel raises many types for broken files
        raise InvalidVolumeError(f"{p} is not a readable NIfTI displacement field ({type(e).__name__}).") from e
    arr = arr.reshape(*arr.shape[:3], -1) if arr.ndim == 5 else arr
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise InvalidVolumeError(f"{p} has shape {arr.shape}; a displacement field is (X, Y, Z, 3) in mm.")
    field_vol = Volume(np.zeros(arr.shape[:3], np.float32), np.asarray(img.affine, np.float64))
    check_same_grid(reference, field_vol, what=f"reference phase and displacement field {p.name}")
    return arr


def reference_channel(reference: Volume, grid: Grid, hu_min: float, hu_max: float) -> np.ndarray:
    """(1, x, y, z) the reference image on the motion grid, HU window -> [0, 1] (the anatomy input)."""
    from medct.geometry import resample_volume

    ref = reference.with_array(np.asarray(reference.array, np.float32))
    img = resample_volume(ref, grid, padding=float(hu_min)).array
    return scale_window(img, hu_min, hu_max)[None]


def register_phases(
    phases: Sequence[Volume],
    method: Registration = "intensity",
    spacing_mm: float = 6.0,
    device: str = "cpu",
    seed: int = 0,
) -> np.ndarray:
    """(T, X, Y, Z, 3) pull-back fields from every phase to phase 0 (u_0 = 0), RAS mm on the grid.

    "intensity": `register_impact` with `intensity_source` (a coarse-to-fine dense field on a
    `spacing_mm` working grid, 48 -> 24 -> 16 mm control points; ~4 s a phase on 2 CPU cores for a
    trunk at 6 mm); "elastix": Elastix's B-spline stage alone (no rigid/affine stage: the couch and
    spine do not move between phases), slower.
    """
    from medct.registration.impact import ImpactSettings, intensity_source, register_impact

    ref = phases[0]
    out = np.zeros((len(phases), *ref.shape, 3), np.float32)
    settings = ImpactSettings(
        metric="l2",
        control_spacing_mm=(48.0, 24.0, 16.0),
        iterations=(50, 50, 50),
        lr_mm=1.0,
        smoothness=0.1,
        seed=seed,
    )
    src = intensity_source(spacing_mm) if method == "intensity" else None
    for t, ph in enumerate(phases[1:], start=1):
        if method == "intensity":
            assert src is not None
            out[t] = register_impact(ph, ref, src, settings, device=device).displacement.array
        elif method == "elastix":
            from medct.registration.elastix import register

            out[t] = register(ph, ref, preset="bspline,", seed=seed).displacement().array
        else:
            raise ConfigError(f"Unknown registration {method!r}; use intensity or elastix.")
    return out


def warp_reference(reference: Volume, fields: np.ndarray, kind: Literal["image", "labels"] = "image") -> list[Volume]:
    """The reference warped by each (X, Y, Z, 3) field: phase_t(p) = reference(p + u_t(p))."""
    from medct.registration.impact import ImpactTransform

    fill = -1024.0 if kind == "image" else 0.0
    dtype = np.asarray(reference.array).dtype
    out = []
    for u in fields:
        v = ImpactTransform(Volume(np.asarray(u, np.float32), reference.affine.copy())).warp(reference, kind, fill)
        if np.issubdtype(dtype, np.integer):  # int16 HU in, int16 HU out (the resampling works in float)
            info = np.iinfo(dtype)
            v = v.with_array(np.clip(np.rint(np.asarray(v.array)), info.min, info.max).astype(dtype))
        out.append(v)
    return out


# --------------------------------------------------------------------------- baselines


def copy_last(observed: np.ndarray, k: int) -> np.ndarray:
    """(k, ...) the last observed field repeated: no motion from now on."""
    return np.repeat(np.asarray(observed[-1:]), k, axis=0)


def linear_extrapolation(observed: np.ndarray, k: int) -> np.ndarray:
    """(k, ...) u_{M-1} + j (u_{M-1} - u_{M-2}), j = 1..k: the last velocity kept."""
    obs = np.asarray(observed)
    v = obs[-1] - obs[-2]
    return np.stack([obs[-1] + (j + 1) * v for j in range(k)])


def estimate_period(signal: np.ndarray, min_lag: int = 2) -> int:
    """The lag (samples) at which the signal best repeats: argmin over lags of the mean squared
    difference s[t] - s[t - lag], over lags up to 2/3 of the length (enough overlap to judge)."""
    s = np.asarray(signal, np.float64)
    lags = range(min_lag, max(min_lag + 1, (2 * len(s)) // 3 + 1))
    err = [np.mean((s[lag:] - s[:-lag]) ** 2) if lag < len(s) else np.inf for lag in lags]
    return int(list(lags)[int(np.argmin(err))])


@dataclass
class PCAMotionModel:
    """PCA motion model of the observed fields with a breathing surrogate (as the surrogate-driven
    models of Low et al., Med Phys 2005, and the PCA baselines of Lai et al. 2025):

      u(t) = mean + sum_i c_i(t) V_i,   c_i(t) = a_i + b_i s(t) + d_i s'(t)

    V: the first `n_components` principal components of the observed fields; the surrogate s is the
    first component's score (the dominant breathing mode) and s' its time derivative (inhale and
    exhale differ: hysteresis). Future surrogate values repeat the observed breathing with its
    estimated period (`estimate_period`), as a periodic surrogate would be forecast.
    """

    n_components: int = 3
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    components: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (c, D)
    coef: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (3, c): [a; b; d]
    surrogate: np.ndarray = field(default_factory=lambda: np.zeros(0))
    period: int = 0
    shape: tuple[int, ...] = ()

    def fit(self, observed: np.ndarray) -> PCAMotionModel:
        obs = np.asarray(observed, np.float64)
        m = len(obs)
        if m < MIN_PHASES:
            raise MedCTError(f"The PCA motion model needs at least {MIN_PHASES} observed phases, got {m}.")
        self.shape = obs.shape[1:]
        x = obs.reshape(m, -1)
        self.mean = x.mean(axis=0)
        _, sv, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        c = int(min(self.n_components, m - 1, int((sv > sv.max(initial=0.0) * 1e-9).sum()) or 1))
        self.components = vt[:c]
        scores = (x - self.mean) @ self.components.T  # (M, c)
        self.surrogate = scores[:, 0]
        design = np.stack([np.ones(m), self.surrogate, np.gradient(self.surrogate)], axis=1)
        rows = slice(1, -1) if m >= 5 else slice(None)  # central differences only: the ends are one-sided
        self.coef = np.linalg.lstsq(design[rows], scores[rows], rcond=None)[0]  # (3, c)
        self.period = estimate_period(self.surrogate)
        return self

    def predict(self, k: int) -> np.ndarray:
        """(k, ...) the next k fields."""
        s = list(self.surrogate)
        m = len(s)
        for _ in range(k + 1):  # one more than asked, so that the last derivative is central too
            s.append(s[-self.period])
        ext = np.asarray(s)
        design = np.stack([np.ones(len(ext)), ext, np.gradient(ext)], axis=1)[m : m + k]
        scores = design @ self.coef
        return (self.mean + scores @ self.components).reshape(k, *self.shape).astype(np.float32)


# --------------------------------------------------------------------------- the AR model


def rollout(net: nn.Module, observed: Tensor, image: Tensor, k: int, context: int) -> Tensor:
    """(k, 3, x, y, z) future fields from observed (M, 3, x, y, z) and image (1, x, y, z): each step
    predicts from the last `context` fields (observed, then predicted) and appends its prediction."""
    seq = observed
    preds = []
    with torch.no_grad():
        for _ in range(k):
            window = seq[-context:]
            nxt = net(window[None], image[None])[0, -1]
            preds.append(nxt)
            seq = torch.cat([seq, nxt[None]])
    return torch.stack(preds)


def _windows(fields: Tensor, length: int) -> Tensor:
    """(W, length, ...) every window of `length` consecutive fields."""
    return torch.stack([fields[s : s + length] for s in range(len(fields) - length + 1)])


def next_phase_loss(net: nn.Module, fields: Tensor, image: Tensor) -> Tensor:
    """Teacher-forced L1 (mm) of predicting fields[:, 1:] from fields[:, :-1]; fields (B, L+1, 3, ...)."""
    pred = net(fields[:, :-1], image)
    return F.l1_loss(pred, fields[:, 1:])


def finetune(
    net: nn.Module, observed: Tensor, image: Tensor, steps: int, lr: float, context: int, seed: int = 0
) -> nn.Module:
    """A copy of `net` adapted to one patient: `steps` Adam steps of the next-phase loss on every
    window of its observed fields (length up to context + 1). steps 0 returns `net` itself."""
    if steps <= 0:
        return net
    torch.manual_seed(seed)
    tuned = copy.deepcopy(net).train()
    length = min(context, len(observed) - 1) + 1
    win = _windows(observed, length)  # (W, L+1, 3, x, y, z)
    img = image[None].expand(len(win), *image.shape)
    opt = torch.optim.Adam(tuned.parameters(), lr=lr)
    for _ in range(int(steps)):
        opt.zero_grad()
        loss = next_phase_loss(tuned, win, img)
        loss.backward()
        opt.step()
    return tuned.eval()


class MotionTask(MedCTTask):
    """Population training of a `medct.nets.MotionTransformer` on displacement-field sequences
    (batches from `MotionDataModule`: "fields" (B, L+1, 3, x, y, z) mm, "image" (B, 1, x, y, z)).

    preprocessing / patch_size / context: the motion grid and reference window, the training crop
    and the context length (linked from the data module). Validation rolls out each validation sequence from its first `context`
    fields and logs the mean displacement error (mm): val/rollout_mm. finetune_steps / finetune_lr:
    the defaults of patient-specific fine-tuning, stored in the card.
    """

    def __init__(
        self,
        net: nn.Module,
        lr: float = 3e-4,
        weight_decay: float = 1e-4,
        context: int = 16,
        preprocessing: Preprocessing | dict[str, Any] = Preprocessing(
            spacing=(8.0, 8.0, 8.0), hu_max=500.0, modality="CT"
        ),
        patch_size: Sequence[int] = (32, 32, 24),
        registration_spacing_mm: float = 6.0,
        finetune_steps: int = 50,
        finetune_lr: float = 1e-4,
    ) -> None:
        super().__init__(net, preprocessing, patch_size)
        self.save_hyperparameters(ignore=["net"])
        self.record_data()
        if context < 2:
            raise ConfigError(f"model.context must be at least 2 phases, got {context}.")
        if context > int(getattr(net, "max_phases", context)):
            raise ConfigError(f"model.context ({context}) exceeds the network's max_phases ({net.max_phases}).")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = next_phase_loss(self.net, batch["fields"], batch["image"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["fields"]))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        c = int(self.hparams.context)
        f, img = batch["fields"][0], batch["image"][0]
        if len(f) <= c:
            return
        pred = rollout(self.net, f[:c], img, len(f) - c, c)
        err = torch.linalg.vector_norm(pred - f[c:], dim=1).mean()
        self.log("val/rollout_mm", err, prog_bar=True, batch_size=1)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.net.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def model_card(self) -> ModelCard:
        hp = self.hparams
        return self.card(
            "motion",
            inference={
                "context": int(hp.context),
                "registration": "intensity",
                "registration_spacing_mm": float(hp.registration_spacing_mm),
                "finetune_steps": int(hp.finetune_steps),
                "finetune_lr": float(hp.finetune_lr),
            },
            outputs={"units": "mm", "kind": "pull-back displacement from phase 0, RAS"},
        )


# --------------------------------------------------------------------------- population data


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


# --------------------------------------------------------------------------- prediction


@dataclass
class MotionPrediction:
    """Predicted future phases of one 4D scan (all on the input grid)."""

    phases: list[Volume]  # the reference warped by each predicted field
    displacements: list[Volume]  # (X, Y, Z, 3) RAS mm, pull-back to phase 0
    observed: list[Volume]  # the input phases
    observed_fields: np.ndarray  # (M, X, Y, Z, 3) registered fields of the observed phases
    method: str
    seconds: dict[str, float]


class MotionPredictor:
    """`medct motion` and `medct.predict_motion`: register, fine-tune (AR), roll out, warp.

    net / card: an exported motion model (None with a baseline method)."""

    def __init__(self, net: nn.Module | None, card: Any | None, device: str = "cpu") -> None:
        self.net, self.card, self.device = net, card, device

    @classmethod
    def from_folder(cls, model_dir: str, device: str | None = None) -> MotionPredictor:
        from medct.predictor import load_for_task

        net, card, device_ = load_for_task(model_dir, "motion", "motion", device)
        dev = str(device_)
        return cls(net, card, dev)

    def predict(
        self,
        source: str | Path | Sequence[str | Path] | Sequence[Volume],
        k: int,
        method: Method = "ar",
        finetune_steps: int | None = None,
        registration: Registration | None = None,
        seed: int = 0,
    ) -> MotionPrediction:
        """Predict the `k` phases after the observed ones of `source` (a 4D NIfTI, a folder of phase
        volumes, a list of paths or of Volumes, in time order; phase 0 is the reference)."""
        if k < 1:
            raise ConfigError(f"--predict must be at least 1 phase, got {k}.")
        if method not in ("ar", "copy-last", "linear", "pca"):
            raise ConfigError(f"Unknown method {method!r}; use ar, copy-last, linear or pca.")
        if method == "ar" and self.net is None:
            raise ConfigError("The autoregressive method needs a motion model (-m MODEL).")
        if isinstance(source, (list, tuple)) and source and all(isinstance(v, Volume) for v in source):
            vols = list(source)
        else:
            vols = read_sequence(source)  # type: ignore[arg-type]
        if len(vols) < MIN_PHASES:
            raise InvalidVolumeError(
                f"A 4D scan for motion prediction needs at least {MIN_PHASES} phases, got {len(vols)}."
            )
        inf = self.card.inference if self.card is not None else {}
        reg = registration or inf.get("registration", "intensity")
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        obs_fields = register_phases(vols, reg, float(inf.get("registration_spacing_mm", 6.0)), self.device, seed)
        times["registration"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = vols[0]
        spacing = tuple(self.card.preprocessing.spacing) if self.card is not None else (8.0, 8.0, 8.0)
        grid = motion_grid(ref, spacing)
        obs = to_motion_grid(obs_fields, ref, grid)  # (M, 3, x, y, z)
        if method == "copy-last":
            pred = copy_last(obs, k)
        elif method == "linear":
            pred = linear_extrapolation(obs, k)
        elif method == "pca":
            pred = PCAMotionModel().fit(obs).predict(k)
        else:
            pred = self._ar(obs, ref, grid, k, finetune_steps, seed)
        times["prediction"] = time.perf_counter() - t0
        fields = from_motion_grid(pred, grid, ref)
        images = warp_reference(ref, fields)
        disps = [Volume(u, ref.affine.copy(), {"kind": "displacement_ras_mm"}) for u in fields]
        return MotionPrediction(images, disps, vols, obs_fields, method, times)

    def _ar(
        self, obs: np.ndarray, ref: Volume, grid: Grid, k: int, finetune_steps: int | None, seed: int
    ) -> np.ndarray:
        assert self.net is not None and self.card is not None
        inf, pre = self.card.inference, self.card.preprocessing
        dev = torch.device(self.device)
        o = torch.from_numpy(obs).to(dev)
        img = torch.from_numpy(reference_channel(ref, grid, pre.hu_min, pre.hu_max)).to(dev)
        steps = int(inf.get("finetune_steps", 0) if finetune_steps is None else finetune_steps)
        if steps < 0:
            raise ConfigError(f"--finetune-steps must be >= 0, got {steps}.")
        context = int(inf["context"])
        net = finetune(self.net, o, img, steps, float(inf.get("finetune_lr", 1e-4)), context, seed)
        return rollout(net, o, img, k, context).cpu().numpy()


def save_sequence_previews(phases: Sequence[Volume], n_observed: int, png: Path, gif: Path | None) -> None:
    """A PNG strip (one coronal plane through the reference's centre per phase, predicted ones
    titled in red) and an animated GIF of the same frames; both written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from PIL import Image

    from medct.paths import atomic_file
    from medct.preview import _to_ras

    frames = []
    for v in phases:
        ras, sp = _to_ras(np.asarray(v.array, np.float32), v.affine)
        frames.append((ras[::-1, ras.shape[1] // 2, ::-1].T, sp))
    n = len(frames)
    cols = min(n, 12)
    rows = -(-n // cols)
    (_, sp) = frames[0]
    fig = plt.figure(
        figsize=(1.6 * cols, 1.6 * rows * sp[2] / sp[0] * frames[0][0].shape[0] / frames[0][0].shape[1] + 0.3)
    )
    fig.patch.set_facecolor("black")
    for i, (img, s) in enumerate(frames):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(img, cmap="gray", vmin=-1000, vmax=400, aspect=s[2] / s[0])
        pred = i >= n_observed
        ax.set_title(f"{'pred ' if pred else ''}{i}", color="red" if pred else "white", fontsize=7)
        ax.set_axis_off()
    try:
        with atomic_file(png, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=80, facecolor=fig.get_facecolor())
    finally:
        plt.close(fig)
    if gif is not None:
        ims = []
        for img, s in frames:
            a = (np.clip((img + 1000.0) / 1400.0, 0, 1) * 255).astype(np.uint8)
            h = max(1, int(round(a.shape[0] * s[2] / s[0])))
            ims.append(Image.fromarray(a).resize((a.shape[1], h)))
        with atomic_file(gif, suffix=".gif") as tmp:
            ims[0].save(tmp, format="GIF", save_all=True, append_images=ims[1:], duration=250, loop=0)
