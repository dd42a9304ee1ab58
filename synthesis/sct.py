"""Synthetic CT from CBCT or MR: a 2.5D U-Net++ trained on aligned pairs (`medct fit`, `medct sct`).

After Boussot et al., "Why Registration Quality Matters: Enhancing sCT Synthesis with IMPACT-Based
Registration" (SynthRAD2025): alignment errors of the training pairs propagate into a supervised
sCT model, so the pairs are first aligned (`align`: Elastix or IMPACT, a config choice, so the
paper's comparison can be run), and the network is trained with L1 plus the IMPACT feature loss.

  * network: 2D U-Net++ (MONAI BasicUNetPlusPlus, `medct.nets.unetpp_2d`): 2k+1 neighbouring
    axial slices of the source in, the centre slice of the CT out (k = `context`, 1 or 2);
  * intensities: CT clipped to [-1024, 3071] HU and mapped to [-1, 1]; CBCT mapped from its minimum
    to its 99.5th percentile onto [-1, 1]; MR z-scored inside the body (`normalise_source`);
  * training patches (X, Y, 2k+1) centred inside the mask (the CT's body within the source's field
    of view, `pair_mask`), so air and the region a CBCT did not image teach nothing;
  * loss: `l1_weight` * masked L1 on [-1, 1] + `impact_weight` * IMPACT distance between a frozen
    medct encoder's features of the sCT and of the CT (`medct.registration.impact`); the encoder is
    3D, so each 2D slice is seen as a slab of `impact_depth` copies of itself;
  * inference (`SCTPredictor`): the input resampled to the model's spacing in RAS, every axial slice
    predicted with its neighbours (edge slices repeat the border), mean over in-plane flips
    (TTA), mapped back to HU and resampled onto the input's exact grid.

Metrics are SynthRAD2025's (`medct.metrics.synthrad_scores`). Everything the task saves is a JSON
primitive, and its checkpoints carry a model card (task "sct") that `medct export` writes out.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from medct.checkpoint import ModelCard
from medct.data import PhantomCohort, VolumeDataModule
from medct.errors import ConfigError, InvalidVolumeError

# the intensity scales (CT range, CBCT/MR normalisation, body and support masks) are medct.intensity's
from medct.intensity import (  # noqa: F401  (re-exported: the sCT method's names)
    CT_MAX,
    CT_MIN,
    ct_body,
    ct_to_unit,
    normalise_source,
    pair_mask,
    source_support,
    unit_to_ct,
)
from medct.precision import fp32_loss
from medct.settings import Sampling, Split
from medct.task import MedCTTask
from medct.transforms import Preprocessing
from medct.volume import Volume

Align = Literal["none", "elastix", "impact"]


class SCTPaird:
    """MONAI-style dict transform on a pair on one grid (after Orientation/Spacing): adds "mask"
    (`pair_mask`), maps "image" with `normalise_source` and "target" with `ct_to_unit`.
    Deterministic, so a PersistentDataset caches its output; picklable (DataLoader workers)."""

    def __init__(self, modality: str) -> None:
        self.modality = str(modality)

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        out = dict(data)
        image, target = data["image"], data["target"]  # (1, X, Y, Z) MetaTensors
        src, ct = image[0].numpy(), target[0].numpy()
        mask = pair_mask(src, ct, self.modality)
        if not mask.any():
            raise InvalidVolumeError(
                f"{image.meta.get('filename_or_obj', 'A pair')}: the CT's body and the source image do not overlap."
            )
        out["image"] = image.clone()
        out["image"][0] = torch.from_numpy(normalise_source(src, self.modality))
        out["target"] = target.clone()
        out["target"][0] = torch.from_numpy(ct_to_unit(ct))
        out["mask"] = image.clone()
        out["mask"][0] = torch.from_numpy(mask.astype(np.float32))
        return out


def sct_transforms(pre: Preprocessing, patch_size: Sequence[int], train: bool, num_samples: int = 2) -> Any:
    """Load -> RAS -> spacing -> `SCTPaird` -> crop to the mask [-> pad, `num_samples` patches
    centred inside the mask, random in-plane flips]."""
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureTyped,
        Orientationd,
        RandCropByPosNegLabeld,
        RandFlipd,
        Spacingd,
        SpatialPadd,
    )

    from medct.loaders import LoadVolumed
    from medct.transforms import BODY_MARGIN_VOXELS, AboveThreshold

    keys = ["image", "target", "mask"]
    xs: list[Any] = [
        LoadVolumed(keys=["image", "target"], label_keys=()),
        Orientationd(keys=["image", "target"], axcodes="RAS", labels=None),
        Spacingd(keys=["image", "target"], pixdim=tuple(pre.spacing), mode="bilinear", padding_mode="border"),
        SCTPaird(pre.modality),
        CropForegroundd(
            keys=keys,
            source_key="mask",
            select_fn=AboveThreshold(0.5),
            margin=BODY_MARGIN_VOXELS,
            allow_smaller=True,
            start_coord_key=None,
            end_coord_key=None,
        ),
    ]
    if train:
        patch = tuple(int(p) for p in patch_size)
        xs += [
            SpatialPadd(keys=keys, spatial_size=patch, mode="replicate"),
            RandCropByPosNegLabeld(
                keys=keys, label_key="mask", spatial_size=patch, pos=1.0, neg=0.0, num_samples=num_samples
            ),
            # CT synthesis has no laterality: in-plane mirroring is a free augmentation
            RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
        ]
    xs.append(EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False))
    return Compose(xs)


# ----------------------------------------------------------------------------- pair alignment


def align_pair(
    image_path: str,
    target_path: str,
    out_path: Path,
    method: Align,
    preset: str = "ct-cbct",
    encoder: str | None = None,
    modality: str = "CBCT",
    seed: int = 0,
) -> Path:
    """Warp the CT (`target_path`) onto the source image's grid (`image_path`, the fixed image) by
    Elastix `preset` or by IMPACT on `encoder`, the metric taken inside the source's support (a
    CBCT's field of view, `source_support`), and write it to `out_path` (atomically)."""
    from medct.io import read_volume, write_volume

    fixed, moving = read_volume(image_path), read_volume(target_path)
    mask = Volume(source_support(np.asarray(fixed.array), modality).astype(np.uint8), fixed.affine, {})
    if method == "elastix":
        from medct.registration.elastix import register

        transform: Any = register(fixed, moving, preset=preset, fixed_mask=mask, seed=seed)
    elif method == "impact":
        from medct.registration.impact import ImpactSettings, load_feature_model, register_on_encoder

        if encoder is None:
            raise ConfigError("data.align impact needs data.align_encoder (a medct model or encoder folder).")
        features = load_feature_model(encoder)
        transform = register_on_encoder(fixed, moving, features, None, ImpactSettings(seed=seed), mask)
    else:
        raise ConfigError(f"data.align must be none, elastix or impact, got '{method}'.")
    warped = transform.warp(moving, "image", default=CT_MIN)
    return write_volume(warped, out_path)  # atomic: a crash never leaves a half-written pair


def ct_range(pre: Preprocessing) -> Preprocessing:
    """`pre` with synthetic CT's fixed target range [CT_MIN, CT_MAX] HU as its window. A window left at
    Preprocessing's default (a Python caller giving only the spacing) takes it; any other window is
    a user's mistake, refused in one sentence (the source is normalised by its modality instead)."""
    window = (pre.hu_min, pre.hu_max)
    default = Preprocessing()
    if window not in ((CT_MIN, CT_MAX), (default.hu_min, default.hu_max)):
        raise ConfigError(
            f"Synthetic CT maps the CT target from its fixed range [{CT_MIN:g}, {CT_MAX:g}] HU; "
            f"data.preprocessing.hu_min / hu_max ({window[0]:g}, {window[1]:g}) cannot be changed."
        )
    return replace(pre, hu_min=CT_MIN, hu_max=CT_MAX)


class SCTDataModule(VolumeDataModule):
    """Pairs ("image": CBCT or MR, "target": its CT) for synthetic CT, aligned first.

    Args beyond `VolumeDataModule`'s (keys are ("image", "target")):
        context: k, so that a training patch is (X, Y, 2k+1) slices; patch_size[2] must be 2k+1.
            Defaults to 1.
        align: "none" (pairs as they are), "elastix" (preset `align_preset`) or "impact" (features
            of `align_encoder`): the CT is registered to the source image once, in prepare_data,
            and written to `align_dir` (default: <cache_dir or data_dir>/aligned_<method>/).
            Defaults to "none".
        phantom: a synthetic paired cohort (`medct.phantom.pairs.write_pair_cohort`; variant cbct,
            cbct_tst or mr) whose CT is moved by a known deformation of peak `phantom_misalign_mm`.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        datalist: str | None = None,
        preprocessing: Preprocessing = Preprocessing(spacing=(1.0, 1.0, 3.0), hu_min=CT_MIN, hu_max=CT_MAX),
        sampling: Sampling = Sampling(patch_size=(128, 128, 3), batch_size=4, num_samples=4),
        split: Split = Split(),
        context: int = 1,
        num_workers: int = 2,
        multiprocessing_context: str | None = None,
        cache_dir: str | None = None,
        phantom: PhantomCohort | None = None,
        phantom_misalign_mm: float = 8.0,
        align: Align = "none",
        align_preset: str = "ct-cbct",
        align_encoder: str | None = None,
        align_dir: str | None = None,
    ) -> None:
        if phantom is not None and phantom.variant not in ("cbct", "cbct_tst", "mr"):
            raise ConfigError(
                f"data.phantom.variant of a synthetic-CT cohort must be cbct, cbct_tst or mr, got '{phantom.variant}'."
            )
        super().__init__(
            ("image", "target"),
            data_dir,
            datalist,
            ct_range(preprocessing),
            sampling,
            split,
            True,
            num_workers,
            multiprocessing_context,
            cache_dir,
            phantom,
        )
        if int(context) not in (1, 2, 3):
            raise ConfigError(f"data.context must be 1, 2 or 3 (2k+1 input slices), got {context}.")
        self.context = int(context)
        if self.patch_size[2] != 2 * self.context + 1:
            raise ConfigError(
                f"data.sampling.patch_size[2] must be 2 * data.context + 1 = {2 * self.context + 1} slices, got {self.patch_size[2]}."
            )
        if self.modality.upper() not in ("CBCT", "MR", "CT"):
            raise ConfigError(
                f"Synthetic CT takes CBCT or MR images, but data.preprocessing.modality is '{self.modality}'."
            )
        if align == "elastix":
            from medct.registration.elastix import parse_preset

            parse_preset(align_preset)  # a wrong preset is one sentence now, not after the cohort is written
        if align not in ("none", "elastix", "impact"):
            raise ConfigError(f"data.align must be none, elastix or impact, got '{align}'.")
        if align == "impact" and align_encoder is None:
            raise ConfigError("data.align impact needs data.align_encoder (a medct model or encoder folder).")
        self.align, self.align_preset, self.align_encoder = align, str(align_preset), align_encoder
        self.align_dir = align_dir
        self.phantom_misalign_mm = float(phantom_misalign_mm)

    def _aligned_path(self, item: dict[str, Any]) -> Path:
        root = Path(self.align_dir or Path(self.cache_dir or str(self.data_dir or Path(str(self.datalist)).parent)))
        if self.align_dir is None:
            root = root / f"aligned_{self.align}"
        key = json.dumps([item["image"], item["target"], self.align, self.align_preset, self.align_encoder])
        return root / f"{volume_name(item['image'])}_{hashlib.sha1(key.encode()).hexdigest()[:10]}.nii.gz"

    def prepare_data(self) -> None:
        """Local rank 0 only: write the phantom pairs, align every pair, fill the disk cache."""
        if self.phantom is not None and not self._json_path().is_file():
            from medct.phantom.pairs import write_pair_cohort

            p = self.phantom
            write_pair_cohort(
                str(self.data_dir),
                n=p.n,
                source=p.variant,
                seed=p.seed,
                shape=tuple(p.shape),  # type: ignore[arg-type]
                spacing=tuple(p.spacing),  # type: ignore[arg-type]
                misalign_mm=self.phantom_misalign_mm,
            )
        if self.align != "none":
            train, val = super()._split()
            for item in train + val:  # the source image is the fixed one: the CT moves onto its grid
                out = self._aligned_path(item)
                if not out.is_file():
                    align_pair(
                        item["image"],
                        item["target"],
                        out,
                        self.align,
                        self.align_preset,
                        self.align_encoder,
                        self.modality,
                    )
        if self.cache_dir is not None:
            train, val = self._split()
            for ds in (self._dataset(train, "train"), self._dataset(val, "val")):
                for i in range(len(ds)):
                    ds[i]

    def _split(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The pairs ("image" and "target" only: MONAI takes other "image_*"/"target_*" keys for
        meta data), each target the aligned CT when `align` is set."""
        train, val = super()._split()

        def pair(x: dict[str, Any]) -> dict[str, Any]:
            target = x["target"] if self.align == "none" else str(self._aligned_path(x))
            return {"image": x["image"], "target": target}

        return [pair(x) for x in train], [pair(x) for x in val]

    def cache_fingerprint(self) -> str:
        key = {
            "sct": 1,
            "base": super().cache_fingerprint(),
            "align": [self.align, self.align_preset, self.align_encoder],
        }
        return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]

    def transforms(self, split: str) -> Any:
        return sct_transforms(self.pre, self.patch_size, train=split == "train", num_samples=self.num_samples)


def volume_name(path: str) -> str:
    from medct.paths import volume_stem

    name = os.path.basename(str(path).rstrip("/"))
    return volume_stem(name) or name


# ----------------------------------------------------------------------------- slice inference


def predict_slices(
    net: nn.Module, source: Tensor, context: int, batch_size: int = 16, tta: bool = False, amp: bool = False
) -> Tensor:
    """The network over every axial slice of a normalised source volume: (X, Y, Z) -> (X, Y, Z) in
    [-1, 1] (clamped). Slice z sees z-k..z+k (the edge slice repeated beyond the ends); with `tta`
    the mean over the 4 combinations of in-plane flips, each undone before averaging."""
    from medct.nets.unetpp_2d import pad_to_stride

    X, Y, Z = source.shape
    k = int(context)
    padded = torch.cat([source[:, :, :1].expand(X, Y, k), source, source[:, :, -1:].expand(X, Y, k)], dim=2)
    slabs = padded.unfold(2, 2 * k + 1, 1)  # (X, Y, Z, 2k+1)
    flips = [list(c) for r in range(3) for c in itertools.combinations((2, 3), r)] if tta else [[]]
    out = torch.empty((X, Y, Z), dtype=torch.float32, device=source.device)
    for z0 in range(0, Z, batch_size):
        x = slabs[:, :, z0 : z0 + batch_size].permute(2, 3, 0, 1).contiguous()  # (b, 2k+1, X, Y)
        x, (h, w) = pad_to_stride(x)
        acc = torch.zeros((x.shape[0], 1, h, w), dtype=torch.float32, device=source.device)
        for f in flips:
            with torch.autocast(device_type=source.device.type, dtype=torch.bfloat16, enabled=amp):
                y = net(torch.flip(x, f) if f else x).float()
            acc += (torch.flip(y, f) if f else y)[:, :, :h, :w]
        out[:, :, z0 : z0 + x.shape[0]] = (acc[:, 0] / len(flips)).permute(1, 2, 0)
    return out.clamp_(-1.0, 1.0)


class SCTPredictor:
    """Synthetic CT of a CBCT/MR volume with an exported sCT model (`medct.load_model` gives one)."""

    def __init__(
        self,
        net: nn.Module,
        card: ModelCard,
        device: str | torch.device = "cpu",
        tta: bool | None = None,
        precision: str | None = None,
    ) -> None:
        from medct.precision import resolve_precision
        from medct.predictor import resolve_device

        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        self.net = net.to(self.device).eval()
        self.card = card
        self.context = int(card.inference.get("context", (card.patch_size[2] - 1) // 2))
        self.tta = bool(card.inference.get("tta", True)) if tta is None else bool(tta)
        self.batch_size = int(card.inference.get("batch_size", 16))
        self.precision = resolve_precision(precision, self.device)  # the one policy (medct.precision)

    @classmethod
    def from_folder(
        cls, model_dir: str | os.PathLike[str], device: str | None = None, precision: str | None = None
    ) -> SCTPredictor:
        from medct.predictor import load_for_task

        net, card, dev = load_for_task(model_dir, "sct", "synthetic-CT", device)
        return cls(net, card, dev, precision=precision)

    @property
    def modality(self) -> str:
        return self.card.preprocessing.modality

    def predict(self, volume: Volume) -> Volume:
        """(X, Y, Z) CBCT/MR -> int16 HU in [-1024, 3071] on the input's exact grid; -1024 outside
        `source_support` (where the source shows no patient)."""
        from medct.geometry import Grid, network_grid, resample_volume
        from medct.io import validate_for_inference

        if np.asarray(volume.array).ndim != 3:
            raise InvalidVolumeError(
                f"{volume.meta.get('path', 'The volume')} has shape {np.shape(volume.array)}; a 3D (X, Y, Z) volume is needed."
            )
        validate_for_inference(volume)
        grid = network_grid(volume.affine, volume.shape, self.card.preprocessing.spacing)
        src = resample_volume(volume, grid, "linear", padding="border")
        x = torch.from_numpy(normalise_source(src.array, self.modality)).to(self.device)
        # Outside the patient as the source shows it (air, a CBCT's -1000 beyond its field of view)
        # the model was never trained: the sCT is air there, as SynthRAD scores it.
        outside = torch.from_numpy(~source_support(src.array, self.modality)).to(self.device)
        with torch.inference_mode():
            unit = predict_slices(self.net, x, self.context, self.batch_size, self.tta, self.precision == "bf16")
            unit[outside] = -1.0
        hu = Volume(unit_to_ct(unit).cpu().numpy(), grid.affine, {})
        back = resample_volume(hu, Grid(tuple(volume.shape), volume.affine), "linear", padding="border")  # type: ignore[arg-type]
        out = np.clip(np.rint(back.array), CT_MIN, CT_MAX).astype(np.int16)
        return volume.with_array(out)


# ----------------------------------------------------------------------------- the task


class SCTTask(MedCTTask):
    """Train `net` (a 2D network with 2k+1 input channels, e.g. `medct.nets.SliceUNetPlusPlus`) to
    map a CBCT/MR slab to the CT's centre slice.

    `preprocessing` (spacing, modality; the CT range is fixed) and `patch_size` (X, Y, 2k+1) come from
    the data module (linked by the CLI) and go into the model card. Loss: `l1_weight` * L1 + `impact_weight` * IMPACT distance
    (`impact_metric` over encoder stages `impact_layers` of the frozen medct model in `impact_model`,
    a segmentation or encoder folder), both inside the mask. Validation predicts whole volumes slice
    by slice and logs val/mae_hu (masked MAE in HU) and val/loss. `tta`: the model's default for
    inference (flip TTA).
    """

    def __init__(
        self,
        net: nn.Module,
        preprocessing: Preprocessing | dict[str, Any] = Preprocessing(
            spacing=(1.0, 1.0, 3.0), hu_min=CT_MIN, hu_max=CT_MAX, modality="CBCT"
        ),
        patch_size: Sequence[int] = (128, 128, 3),
        lr: float = 2e-4,
        weight_decay: float = 1e-4,
        l1_weight: float = 1.0,
        impact_weight: float = 0.0,
        impact_model: str | None = None,
        impact_layers: Sequence[int] = (0, 1),
        impact_metric: Literal["l1", "l2", "cosine"] = "l1",
        impact_depth: int = 16,
        tta: bool = True,
        val_batch_size: int = 16,
    ) -> None:
        super().__init__(net, preprocessing, patch_size)
        self.save_hyperparameters(ignore=["net"])
        self.record_data()
        self.hparams.update(impact_layers=[int(i) for i in impact_layers])
        slices = int(patch_size[2])
        if slices % 2 != 1:
            raise ConfigError(f"model.patch_size[2] must be an odd number of slices (2k+1), got {slices}.")
        in_channels = getattr(net, "in_channels", None)
        if in_channels is not None and int(in_channels) != slices:
            raise ConfigError(
                f"The network takes {in_channels} input slices but the patches have {slices} (data.sampling.patch_size[2]); "
                "set model.init_args.net.init_args.in_channels to match."
            )
        self.context = (slices - 1) // 2
        if impact_weight < 0 or l1_weight < 0 or impact_weight + l1_weight <= 0:
            raise ConfigError("model.l1_weight and model.impact_weight must be >= 0 and not both 0.")
        if impact_weight > 0 and impact_model is None:
            raise ConfigError("model.impact_weight > 0 needs model.impact_model (a medct model or encoder folder).")
        self._features: tuple[nn.Module, ...] = ()  # frozen; kept out of the state dict and checkpoints
        if impact_weight > 0 and impact_model is not None:
            from medct.registration.impact import load_feature_model

            self._features = (load_feature_model(impact_model, impact_layers).model,)

    def model_card(self) -> ModelCard:
        hp = self.hparams
        return self.card(
            "sct",
            preprocessing=ct_range(self.pre),
            inference={"context": self.context, "tta": bool(hp.tta), "batch_size": int(hp.val_batch_size)},
            outputs={"channels": 1, "units": "HU", "range": [CT_MIN, CT_MAX]},
            extra={
                "loss": {"l1": float(hp.l1_weight), "impact": float(hp.impact_weight), "impact_model": hp.impact_model}
            },
        )

    def on_fit_start(self) -> None:
        self._features = tuple(m.to(self.device) for m in self._features)

    def forward(self, x: Tensor) -> Tensor:  # (B, 2k+1, X, Y) -> (B, 1, X, Y)
        return self.net(x)

    @fp32_loss
    def _loss(self, pred: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, 1, X, Y) each -> total, L1, IMPACT (masked)."""
        l1 = ((pred - target).abs() * mask).sum() / mask.sum().clamp_min(1.0)
        impact = pred.new_zeros(())
        if self._features and self.hparams.impact_weight > 0:
            from medct.registration.impact import impact_distance

            depth = int(self.hparams.impact_depth)
            model = self._features[0]

            def slab(t: Tensor) -> Tensor:  # (B, 1, X, Y) -> (B, 1, X, Y, depth)
                return t.unsqueeze(-1).expand(*t.shape, depth)

            f_pred = model(slab(unit_to_ct(pred)))
            with torch.no_grad():
                f_ct = model(slab(unit_to_ct(target)))
            impact = impact_distance(f_pred, f_ct, metric=self.hparams.impact_metric, mask=slab(mask))
        total = self.hparams.l1_weight * l1 + self.hparams.impact_weight * impact
        return total, l1, impact

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        k = self.context
        x = batch["image"][:, 0].permute(0, 3, 1, 2)  # (B, 1, X, Y, 2k+1) -> (B, 2k+1, X, Y)
        target, mask = batch["target"][..., k], batch["mask"][..., k]  # (B, 1, X, Y) centre slices
        pred = self(x)
        total, l1, impact = self._loss(pred, target, mask)
        bs = x.shape[0]
        self.log("train/loss", total, prog_bar=True, batch_size=bs)
        self.log("train/l1", l1, batch_size=bs)
        if self._features:
            self.log("train/impact", impact, batch_size=bs)
        return total

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        source, target, mask = batch["image"][0, 0], batch["target"][0, 0], batch["mask"][0, 0]  # (X, Y, Z)
        pred = predict_slices(self.net, source, self.context, int(self.hparams.val_batch_size), tta=False)
        m = mask > 0.5
        l1 = (pred - target).abs()[m].mean()
        mae_hu = (unit_to_ct(pred) - unit_to_ct(target)).abs()[m].mean()
        self.log("val/loss", l1, batch_size=1, sync_dist=True)
        self.log("val/mae_hu", mae_hu, batch_size=1, sync_dist=True, prog_bar=True)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = self.trainer.estimated_stepping_batches if self.trainer is not None else 1
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (1.0 - min(s, total) / max(total, 1)) ** 0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
