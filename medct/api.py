"""The notebook API: load a model, segment a volume, read volumes; no CLI needed.

    >>> import medct
    >>> model = medct.load_model("demo_out/model")           # exported folder
    >>> labels = medct.segment(model, "scan.nii.gz")          # Volume on the scan's own grid
    >>> labels = medct.segment(model, array, affine=affine)   # numpy (X, Y, Z) in HU + 4x4 RAS affine

`segment` accepts a path (NIfTI/MHA/NRRD file or DICOM series folder), a `medct.io.Volume`, or
a numpy array. Every input is checked with `validate_for_inference` (NaN/inf/constant are
errors), and the result carries the input's exact geometry.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medct.errors import ConfigError, InvalidVolumeError, ModelFolderError
from medct.inference import Predictor, check_flag, check_overlap
from medct.io import Volume, read_volume, write_volume

__all__ = [
    "Predictor", "Volume", "load_model", "predict_motion", "read_volume", "reconstruct_modality", "register",
    "segment", "synthesize_ct", "write_volume",
]  # fmt: skip


# The predictor of each model-card task, as "module:Class" (imported on use; the class has
# `from_folder(model_dir, device=..., precision=...)`). A method that exports a new task kind adds its entry here.
PREDICTORS: dict[str, str] = {
    "segmentation": "medct.inference:Predictor",
    "sct": "medct.synthesis.sct:SCTPredictor",
    "text2ct": "medct.synthesis.diffusion:TextToCT",
    "motion": "medct.synthesis.motion:MotionPredictor",
}


# What fills in missing modalities, by the pretraining method an encoder folder's card names.
RECONSTRUCTORS: dict[str, str] = {
    "bm_mae": "medct.pretrain.bm_mae:ModalityReconstructor",
}


def reconstruct_modality(
    model_dir: str | os.PathLike[str], volumes: dict[str, Any], device: str | None = None
) -> dict[str, Volume]:
    """Every modality of a multimodal encoder (BM-MAE) reconstructed from the ones given.

    volumes: {modality name: path or Volume} on one grid (e.g. {"native": ..., "venous": ...});
    returns {modality: Volume} in HU on that grid, the missing ones filled in.
    """
    import importlib

    from medct.checkpoint import read_model_card

    method = read_model_card(model_dir).extra.get("pretraining", {}).get("method")
    target = RECONSTRUCTORS.get(str(method))
    if target is None:
        raise ModelFolderError(
            f"{model_dir} was not pretrained by a method that reconstructs modalities (it says '{method}')."
        )
    module, name = target.split(":")
    return (
        getattr(importlib.import_module(module), name).from_folder(str(model_dir), device=device).reconstruct(volumes)
    )


def load_model(model_dir: str | os.PathLike[str], device: str | None = None, precision: str | None = None) -> Any:
    """The predictor of an exported model folder (model.safetensors + medct.json) on `device`
    (None: cuda > mps > cpu), chosen by the card's task: a segmentation model gives a `Predictor`."""
    import importlib

    from medct.checkpoint import read_model_card

    card = read_model_card(model_dir)
    if card.task == "encoder":
        raise ModelFolderError(
            f"{model_dir} holds a pretrained encoder, not a model that predicts; fine-tune it first "
            "(a recipe's model.init_args.pretrained_encoder) and load that export."
        )
    target = PREDICTORS.get(card.task)
    if target is None:
        raise ModelFolderError(
            f"{model_dir} holds a '{card.task}' model, which has no predictor; medct loads {', '.join(sorted(PREDICTORS))} models."
        )
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name).from_folder(model_dir, device=device, precision=precision)


def _as_volume(data: str | os.PathLike[str] | Volume | np.ndarray, affine: np.ndarray | None) -> Volume:
    if isinstance(data, Volume):
        if affine is not None:
            raise ConfigError("affine is only for array input; a Volume carries its own.")
        return data
    if isinstance(data, (str, os.PathLike)):
        if affine is not None:
            raise ConfigError("affine is only for array input; a file carries its own.")
        return read_volume(Path(data))
    if type(data).__module__.startswith("torch") and hasattr(data, "detach"):  # a torch tensor: as numpy
        data = data.detach().cpu().numpy()  # type: ignore[union-attr]
    if isinstance(data, np.ndarray):
        if data.ndim != 3:
            raise InvalidVolumeError(f"An array input must be 3D (X, Y, Z), got shape {data.shape}.")
        if affine is None:
            warnings.warn(
                "segment() got a numpy array without an affine: assuming 1 mm isotropic voxels in RAS "
                "(identity affine); pass affine= for correct spacing and orientation.",
                UserWarning,
                stacklevel=3,
            )
            aff = np.eye(4)
        else:
            aff = np.asarray(affine, dtype=np.float64)
            if aff.shape != (4, 4) or not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
                raise InvalidVolumeError(f"affine must be a finite, invertible 4x4 matrix, got shape {aff.shape}.")
        return Volume(array=data, affine=aff, meta={"path": "the numpy array"})
    raise ConfigError(f"segment() takes a path, a Volume, a numpy array or a torch tensor, not {type(data).__name__}.")


def segment(
    model: Predictor | str | os.PathLike[str],
    data: str | os.PathLike[str] | Volume | np.ndarray,
    affine: np.ndarray | None = None,
    overlap: float | None = None,
    tta: bool = False,
    device: str | None = None,
    body_only: bool | None = None,
    precision: str | None = None,
) -> Volume:
    """Segment one volume; returns a uint8 label map `Volume` on the input's exact grid.

    model:   a Predictor (from `load_model`) or an exported model folder.
    data:    a path, a Volume, or a numpy array / torch tensor (X, Y, Z) of HU (then `affine`: 4x4
             voxel -> RAS mm; without it 1 mm RAS is assumed, with a warning).
    overlap: sliding-window overlap (None: the model's default); tta: flip test-time augmentation.
    device, precision: only used when `model` is a folder (precision: auto/None, bf16 or fp32,
             `medct.precision`).
    body_only: CT/CBCT: no label outside the patient's body (None: the model card's
             `inference.body_only`, default true); the removed volume is `meta["outside_body_ml"]`.
    """
    tta = check_flag("tta", tta)
    if overlap is not None:
        overlap = check_overlap(overlap)
    predictor = (
        model if isinstance(model, Predictor) else Predictor.from_folder(model, device=device, precision=precision)
    )
    if overlap is not None or tta != predictor.tta or (body_only is not None and body_only != predictor.body_only):
        predictor = predictor.with_options(overlap=overlap, tta=tta, body_only=body_only)
    return predictor.predict(_as_volume(data, affine))  # predict() runs validate_for_inference


def register(
    fixed: str | os.PathLike[str] | Volume,
    moving: str | os.PathLike[str] | Volume,
    preset: str = "bspline",
    parameter_files: tuple[str, ...] = (),
    fixed_mask: str | os.PathLike[str] | Volume | None = None,
    moving_mask: str | os.PathLike[str] | Volume | None = None,
    moving_labels: str | os.PathLike[str] | Volume | None = None,
    method: Literal["elastix", "impact"] = "elastix",
    encoder: str | os.PathLike[str] | None = None,
    impact_init: str = "affine",
    impact_layers: tuple[int, ...] = (0, 1),
    impact_mode: Literal["jacobian", "static"] = "jacobian",
    precision: str | None = None,
) -> dict[str, Any]:
    """Register `moving` to `fixed`, as `medct register` does.

    method "elastix" (`medct.registration.elastix`): preset rigid | affine | bspline (rigid ->
    affine -> bspline) | ct-cbct, or stages joined by commas (`elastix.parse_preset`); or elastix
    `parameter_files` run in order. method "impact" (`medct.registration.impact`, Boussot et al.
    2025): the IMPACT distance on the features of `encoder` (a medct segmentation model or encoder
    folder; stages `impact_layers`, `impact_mode`, its forward passes at `precision`: auto/None,
    bf16 or fp32, `medct.precision`), after the Elastix preset `impact_init` ("none":
    from the identity). Returns {"warped": the moving image on the fixed grid, "warped_labels":
    `moving_labels` warped by nearest neighbour (or None), "transform": the transform (fixed ->
    moving world; `.warp`, `.points_moving_to_fixed`, `.jacobian`, `.save`, ...)}. Every volume
    carries the fixed image's geometry.
    """
    from medct.registration import elastix

    def vol(x: str | os.PathLike[str] | Volume | None) -> Volume | None:
        return None if x is None else _as_volume(x, None)

    fixed_v, moving_v = _as_volume(fixed, None), _as_volume(moving, None)
    if method == "impact":
        from medct.registration import impact

        if encoder is None:
            raise ConfigError('method="impact" needs encoder= (a medct segmentation model or encoder folder).')
        features = impact.load_feature_model(encoder, layers=impact_layers)
        settings = impact.ImpactSettings(mode=impact_mode)
        tr: Any = impact.register_on_encoder(
            fixed_v, moving_v, features, impact_init, settings, vol(fixed_mask), precision=precision
        )
    elif method == "elastix":
        tr = elastix.register(
            fixed_v, moving_v, preset=preset, parameter_files=parameter_files,
            fixed_mask=vol(fixed_mask), moving_mask=vol(moving_mask),
        )  # fmt: skip
    else:
        raise ConfigError(f"method must be 'elastix' or 'impact', got {method!r}.")
    labels = vol(moving_labels)
    return {
        "warped": tr.warp(moving_v),
        "warped_labels": None if labels is None else tr.warp(labels, kind="labels"),
        "transform": tr,
    }


def synthesize_ct(
    model: Any,
    data: str | os.PathLike[str] | Volume | np.ndarray,
    affine: np.ndarray | None = None,
    tta: bool | None = None,
    device: str | None = None,
    precision: str | None = None,
) -> Volume:
    """Synthetic CT of a CBCT or MR volume: int16 HU in [-1024, 3071] on the input's exact grid.

    model: an `SCTPredictor` (from `load_model` of an sCT model folder) or the folder itself;
    data:  a path, a Volume, or an (X, Y, Z) array with its `affine`; tta: flip TTA (None: the
    model's default); device, precision: only used when `model` is a folder.
    """
    from medct.synthesis.sct import SCTPredictor

    predictor = (
        model
        if isinstance(model, SCTPredictor)
        else SCTPredictor.from_folder(model, device=device, precision=precision)
    )
    if tta is not None and check_flag("tta", tta) != predictor.tta:
        predictor = SCTPredictor(
            predictor.net, predictor.card, predictor.device, tta=tta, precision=predictor.precision
        )
    return predictor.predict(_as_volume(data, affine))


def generate(
    model: Any,
    prompts: str | Sequence[str],
    n: int = 1,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    size: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    sampler: str | None = None,
    device: str | None = None,
    progress: bool = False,
    precision: str | None = None,
) -> list[Volume]:
    """CT volumes (int16 HU, RAS grid) from report text with a text-to-CT model.

    model: a `TextToCT` (from `load_model` of a text2ct model folder) or the folder itself;
    prompts: one text or several; n volumes per prompt, volume k seeded by seed + k. steps,
    guidance, sampler: None takes the model's defaults (30 steps, guidance 5).
    """
    from medct.synthesis.diffusion import TextToCT

    gen = model if isinstance(model, TextToCT) else TextToCT.from_folder(model, device=device, precision=precision)
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    return gen.generate(
        texts,
        n=n,
        steps=steps,
        guidance=guidance,
        seed=seed,
        size=size,
        spacing=spacing,
        sampler=sampler,
        progress=progress,
    )


def predict_motion(
    model: Any,
    source: Any,
    k: int,
    method: str = "ar",
    finetune_steps: int | None = None,
    registration: str | None = None,
    seed: int = 0,
    device: str | None = None,
    precision: str | None = None,
) -> Any:
    """The next `k` phases of a 4D CT (`medct.synthesis.motion.MotionPrediction`: predicted phase
    volumes and displacement fields on the input grid).

    model: a `MotionPredictor` (from `load_model` of a motion model folder), the folder itself, or
    None with a baseline `method` (copy-last, linear, pca); source: a 4D NIfTI, a folder of phase
    volumes, a list of phase paths or of `Volume`s in time order (phase 0 is the reference).
    """
    from medct.synthesis.motion import MotionPredictor

    if isinstance(model, MotionPredictor):
        pred = model
    elif model is None:
        pred = MotionPredictor(None, None, device or "cpu", precision=precision)
    else:
        pred = MotionPredictor.from_folder(model, device=device, precision=precision)
    return pred.predict(source, k, method, finetune_steps, registration, seed)  # type: ignore[arg-type]
