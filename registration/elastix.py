"""Elastix registration on itk-elastix: presets, user parameter files, masks, multi-stage runs,
and everything a result is used for (warping images and labels, mapping points, displacement
and Jacobian maps, folding, saving/loading and inverting transforms).

Elastix: Klein, Staring et al., "elastix: a toolbox for intensity-based medical image
registration", IEEE TMI 2010. The CT <-> CBCT preset follows the SynthRAD2025 preprocessing maps
(github.com/SynthRAD2025/preprocessing, configs/param_def_cbct_*.txt): B-spline with Mattes mutual
information + bending energy (weight 10) + rigidity penalty (weight 0.5), 3 resolutions, a final
grid of 10 mm, ASGD 500/200/100 iterations, 4096 samples.

Directions, which is where registration code usually goes wrong:
  * `register(fixed, moving)` finds T: fixed world -> moving world. An image is warped by pulling:
    warped(x) = moving(T(x)) for every voxel x of the FIXED grid, so images move moving -> fixed.
  * transformix maps points with T itself, so it takes points of the FIXED image to the moving
    image (`points_fixed_to_moving`). Points drawn on the moving image (landmarks, contour points)
    move with the image only through T^-1 (`points_moving_to_fixed`, solved per point).
  * World coordinates in this API are RAS millimetres (medct's convention, as `Volume.affine`);
    ITK and elastix point files are LPS. The conversion happens only here and in the point-file
    reader/writer.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medct.errors import ConfigError, InputPathError, InvalidVolumeError, MedCTError
from medct.io import affine_from_itk
from medct.paths import atomic_file
from medct.volume import Volume

ParameterMap = dict[str, list[str]]
PRESETS = ("rigid", "affine", "bspline", "ct-cbct")
# Each preset is a chain of stages, run one after the other (each initialised by the previous).
PRESET_STAGES: dict[str, tuple[str, ...]] = {
    "rigid": ("rigid",),
    "affine": ("rigid", "affine"),
    "bspline": ("rigid", "affine", "bspline"),
    "ct-cbct": ("rigid", "ct-cbct"),
}
_FLIP = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS for points and vectors
# transformix warps its (placeholder) input even when only a field is wanted: make that cheap
_NEAREST = {"ResampleInterpolator": ["FinalNearestNeighborInterpolator"]}


class RegistrationError(MedCTError):
    """A registration cannot run on the inputs given (2D image, empty mask, no overlap, ...)."""


# --------------------------------------------------------------------------- parameter maps


def _stage_map(stage: str) -> ParameterMap:
    """The parameter map of one named stage (elastix's defaults, adjusted where noted)."""
    import itk

    po = itk.ParameterObject.New()
    if stage in ("rigid", "affine"):
        m = {k: list(v) for k, v in po.GetDefaultParameterMap(stage, 3).items()}
        m["AutomaticTransformInitialization"] = ["true"]
        m["AutomaticTransformInitializationMethod"] = ["GeometricalCenter"]
        m["MaximumNumberOfIterations"] = ["250"]
    elif stage == "bspline":
        m = {k: list(v) for k, v in po.GetDefaultParameterMap("bspline", 3).items()}
        m["FinalGridSpacingInPhysicalUnits"] = ["10.0"]
        m["MaximumNumberOfIterations"] = ["250"]
    elif stage == "ct-cbct":
        m = _ct_cbct_map()
    else:
        raise ConfigError(f"Unknown registration stage {stage!r}; choose one of rigid, affine, bspline, ct-cbct.")
    # the final resampling of the registration's own result image is linear, as `warp` does
    m["ResampleInterpolator"] = ["FinalLinearInterpolator"]
    m["WriteResultImage"] = ["false"]
    return m


def _ct_cbct_map() -> ParameterMap:
    """The SynthRAD2025 abdominal CBCT deformable map (param_def_cbct_AB.txt), as values here."""
    m: ParameterMap = {
        "FixedInternalImagePixelType": ["float"],
        "MovingInternalImagePixelType": ["float"],
        "FixedImageDimension": ["3"],
        "MovingImageDimension": ["3"],
        "UseDirectionCosines": ["true"],
        "ErodeMask": ["true"],
        "Registration": ["MultiMetricMultiResolutionRegistration"],
        "Interpolator": ["BSplineInterpolator"] * 3,
        "Resampler": ["DefaultResampler"],
        "FixedImagePyramid": ["FixedRecursiveImagePyramid"],
        "MovingImagePyramid": ["MovingRecursiveImagePyramid"],
        "Optimizer": ["AdaptiveStochasticGradientDescent"],
        "Transform": ["BSplineTransform"],
        "Metric": ["AdvancedMattesMutualInformation", "TransformBendingEnergyPenalty", "TransformRigidityPenalty"],
        "Metric0Weight": ["1"] * 3,
        "Metric1Weight": ["10"] * 3,
        "Metric2Weight": ["0.5"] * 3,
        "GridSpacingSchedule": ["4", "2", "1"],
        "FinalGridSpacingInPhysicalUnits": ["10"],
        "HowToCombineTransforms": ["Compose"],
        "NumberOfHistogramBins": ["100"],
        "NumberOfResolutions": ["3"],
        "ImagePyramidSchedule": ["4", "4", "4", "2", "2", "2", "1", "1", "1"],
        "MaximumNumberOfIterations": ["500", "200", "100"],
        "NumberOfSpatialSamples": ["4096"],
        "NewSamplesEveryIteration": ["true"],
        "ImageSampler": ["Random"] * 3,
        "MaximumNumberOfSamplingAttempts": ["5"],
        "RequiredRatioOfValidSamples": ["0.05"],
        "BSplineInterpolationOrder": ["3"],
        "FinalBSplineInterpolationOrder": ["3"],
        "AutomaticParameterEstimation": ["true"],
        "DefaultPixelValue": ["-1000"],
    }
    return m


def parse_preset(text: str) -> tuple[str, ...]:
    """The one grammar of an Elastix preset (`medct register --preset`, `--impact-init`, the API,
    a synthetic-CT recipe's `align_preset`): a preset name, i.e. its chain of stages
    (`PRESET_STAGES`: "bspline" = rigid -> affine -> bspline), or stage names joined by commas, run
    in that order ("rigid,bspline"; "bspline," = the B-spline stage alone). Returns the stages;
    anything else is a ConfigError in one sentence."""
    name = str(text).strip()
    if "," not in name:
        if name in PRESET_STAGES:
            return PRESET_STAGES[name]
        stages: list[str] = []
    else:
        stages = [s.strip() for s in name.split(",") if s.strip()]
    if not stages or any(s not in PRESETS for s in stages):
        raise ConfigError(f"'{text}' is not a registration preset or a comma list of {', '.join(PRESETS)}.")
    return tuple(stages)


def preset_maps(preset: str) -> list[ParameterMap]:
    """The parameter maps of a preset (`parse_preset`), one per stage."""
    return [_stage_map(s) for s in parse_preset(preset)]


def read_parameter_file(path: str | os.PathLike[str]) -> ParameterMap:
    """One elastix parameter file (the `(Key value ...)` text format) as a parameter map."""
    p = Path(path)
    if not p.is_file():
        raise InputPathError(f"Elastix parameter file {p} does not exist.")
    import itk

    po = itk.ParameterObject.New()
    try:
        po.ReadParameterFile(str(p))
    except RuntimeError as e:
        raise ConfigError(f"Elastix parameter file {p} cannot be read: {str(e).splitlines()[-1][:160]}") from None
    m = {k: list(v) for k, v in po.GetParameterMap(0).items()}
    if "Transform" not in m:
        raise ConfigError(f"Elastix parameter file {p} names no Transform; it is not a registration parameter file.")
    return m


# --------------------------------------------------------------------------- itk <-> Volume


def to_itk(vol: Volume, pixel: type = np.float32) -> Any:
    """`vol` as an itk.Image with the same LPS geometry. (X, Y, Z) array -> itk's (z, y, x) view."""
    import itk

    arr = np.asarray(vol.array)
    if arr.ndim != 3:
        raise RegistrationError(f"Registration takes 3D volumes; got an array of shape {arr.shape}.")
    img = itk.image_from_array(np.ascontiguousarray(arr.transpose(2, 1, 0), dtype=pixel))
    img.SetSpacing([float(s) for s in vol.spacing])
    img.SetOrigin([float(o) for o in vol.origin_lps])
    img.SetDirection(itk.matrix_from_array(np.ascontiguousarray(vol.direction_lps, dtype=np.float64)))
    return img


def from_itk(img: Any, meta: Mapping[str, Any] | None = None) -> Volume:
    """An itk.Image (scalar or vector) as a Volume: array back in (X, Y, Z[, C]) order, RAS affine."""
    import itk

    arr = itk.array_from_image(img)  # (z, y, x[, c])
    arr = arr.transpose(2, 1, 0, 3) if arr.ndim == 4 else arr.transpose(2, 1, 0)
    affine = affine_from_itk(
        np.asarray(img.GetOrigin()), np.asarray(img.GetSpacing()), itk.array_from_matrix(img.GetDirection())
    )
    return Volume(array=np.ascontiguousarray(arr), affine=affine, meta=dict(meta or {}))


def _grid_of_map(m: Mapping[str, Sequence[str]]) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, RAS affine) of the fixed grid stored in a transform parameter map."""
    size = tuple(int(float(v)) for v in m["Size"])
    spacing = np.array([float(v) for v in m["Spacing"]])
    origin = np.array([float(v) for v in m["Origin"]])
    # elastix stores the direction matrix column by column
    direction = np.array([float(v) for v in m["Direction"]]).reshape(3, 3).T
    return size, affine_from_itk(origin, spacing, direction)  # type: ignore[return-value]


def _world_box(vol: Volume) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in vol.shape], indexing="ij")).reshape(3, -1)
    world = (vol.affine @ np.vstack([corners, np.ones((1, 8))]))[:3]
    return world.min(axis=1), world.max(axis=1)


def check_pair(fixed: Volume, moving: Volume) -> None:
    """Raise RegistrationError for inputs a registration cannot use (2D, constant, disjoint)."""
    for name, v in (("fixed", fixed), ("moving", moving)):
        arr = np.asarray(v.array)
        if arr.ndim != 3 or min(arr.shape) < 4:
            raise RegistrationError(
                f"The {name} image must be a 3D volume at least 4 voxels along each axis; got shape {arr.shape}."
            )
        if not np.isfinite(arr).all():
            raise InvalidVolumeError(f"The {name} image holds NaN or infinite values.")
        if float(arr.max()) == float(arr.min()):
            raise InvalidVolumeError(f"The {name} image is constant; there is nothing to register.")
    lo_f, hi_f = _world_box(fixed)
    lo_m, hi_m = _world_box(moving)
    overlap = np.minimum(hi_f, hi_m) - np.maximum(lo_f, lo_m)
    if (overlap <= 0).any():
        raise RegistrationError(
            "The fixed and moving fields of view do not overlap in world space; check that both "
            "scans share a coordinate system (or align them first)."
        )


def _mask_itk(mask: Volume, like: Volume, name: str) -> Any:
    from medct.io import check_same_grid

    check_same_grid(mask, like, f"{name} mask and {name} image")
    if np.issubdtype(np.asarray(mask.array).dtype, np.floating) and not np.isfinite(mask.array).all():
        raise RegistrationError(f"The {name} mask holds NaN or infinite values; a mask is 0 outside, non-zero inside.")
    m = np.asarray(mask.array) > 0
    if not m.any():
        raise RegistrationError(f"The {name} mask is empty; give a mask with at least one voxel set.")
    return to_itk(mask.with_array(m.astype(np.uint8)), pixel=np.uint8)


def invert_points(
    forward: Callable[[np.ndarray], np.ndarray], points: np.ndarray, tol_mm: float = 1e-3, max_iter: int = 50
) -> np.ndarray:
    """The points x with forward(x) = p, for (N, 3) points p (any transform, RAS mm).

    Quasi-Newton iteration x <- x - A^-1 (forward(x) - p), with A the transform's Jacobian near
    the points estimated once from 4 probe points: exact in one step for affine transforms, and
    convergent where a deformation is small relative to that affine. Warns where it does not
    converge (the transform folds or is not invertible there).
    """
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if len(p) == 0:
        return p.copy()
    probe = p.mean(axis=0) + np.vstack([np.zeros(3), np.eye(3) * 10.0])
    tp = forward(probe)
    a = (tp[1:] - tp[0]).T / 10.0  # (3, 3) Jacobian of the transform near the points
    x = probe[0] + np.linalg.solve(a, (p - tp[0]).T).T
    for _ in range(max_iter):
        r = forward(x) - p
        if float(np.abs(r).max()) < tol_mm:
            return x
        x = x - np.linalg.solve(a, r.T).T
    worst = float(np.abs(forward(x) - p).max())
    if worst > 10 * tol_mm:
        warnings.warn(
            f"points_moving_to_fixed: the transform could not be inverted to {tol_mm} mm at every point "
            f"(worst residual {worst:.3g} mm); those points may lie where the transform folds.",
            UserWarning,
            stacklevel=3,
        )
    return x


# --------------------------------------------------------------------------- the transform


@dataclass
class ElastixTransform:
    """The result of a registration: elastix transform parameter maps, applied in order.

    Maps fixed world -> moving world (see the module docstring for directions). The fixed grid is
    the one stored in the last map (Size/Spacing/Origin/Direction), which `warp` resamples onto.
    """

    maps: list[ParameterMap]

    # --- grid and itk objects -----------------------------------------------------------------
    @property
    def fixed_shape(self) -> tuple[int, int, int]:
        return _grid_of_map(self.maps[-1])[0]

    @property
    def fixed_affine(self) -> np.ndarray:
        return _grid_of_map(self.maps[-1])[1]

    def _parameter_object(self, overrides: Mapping[str, list[str]] | None = None) -> Any:
        import itk

        po = itk.ParameterObject.New()
        for m in self.maps:
            mm = dict(m)
            mm.update(overrides or {})
            po.AddParameterMap(mm)
        return po

    def _transformix(self, moving: Any, overrides: Mapping[str, list[str]] | None = None) -> Any:
        import itk

        t = itk.TransformixFilter.New(moving)
        t.SetTransformParameterObject(self._parameter_object(overrides))
        t.SetLogToConsole(False)
        return t

    def _fixed_placeholder(self) -> Any:
        """A tiny-valued image on the fixed grid: transformix needs a moving image for fields."""
        shape, affine = self.fixed_shape, self.fixed_affine
        return to_itk(Volume(np.zeros(shape, np.float32), affine))

    # --- images and labels ---------------------------------------------------------------------
    def warp(
        self,
        moving: Volume,
        kind: Literal["image", "labels"] = "image",
        default: float | None = None,
    ) -> Volume:
        """`moving` resampled onto the fixed grid through the transform.

        kind "image": linear interpolation, outside filled with `default` (the image's minimum when
        None, e.g. -1000 for air in CT); "labels": nearest neighbour, outside 0, dtype kept.
        """
        arr = np.asarray(moving.array)
        if kind == "labels":
            over = {
                "ResampleInterpolator": ["FinalNearestNeighborInterpolator"],
                "DefaultPixelValue": ["0"],
                "FinalBSplineInterpolationOrder": ["0"],
            }
        else:
            fill = float(arr.min()) if default is None else float(default)
            over = {"ResampleInterpolator": ["FinalLinearInterpolator"], "DefaultPixelValue": [repr(fill)]}
        with tempfile.TemporaryDirectory(prefix="medct-transformix-") as tmp:
            t = self._transformix(to_itk(moving), over)
            _update_logged(t, tmp)
            out = from_itk(t.GetOutput(), moving.meta)
        if kind == "labels":
            out.array = np.rint(out.array).astype(arr.dtype)
        elif np.issubdtype(arr.dtype, np.integer):
            info = np.iinfo(arr.dtype)
            out.array = np.clip(np.rint(out.array), info.min, info.max).astype(arr.dtype)
        return out

    # --- displacement and Jacobian ------------------------------------------------------------
    def displacement(self) -> Volume:
        """(X, Y, Z, 3) on the fixed grid: T(x) - x as RAS world-mm vectors (fixed -> moving)."""
        with tempfile.TemporaryDirectory() as tmp:  # else transformix writes deformationField.* into the cwd
            t = self._transformix(self._fixed_placeholder(), _NEAREST)
            t.SetComputeDeformationField(True)
            _update_logged(t, tmp)
            field = from_itk(t.GetOutputDeformationField())
        field.array = field.array.astype(np.float32) * _FLIP[None, None, None, :].astype(np.float32)
        return field

    def jacobian(self) -> Volume:
        """(X, Y, Z) determinant of T's spatial Jacobian on the fixed grid (elastix's own, exact for
        B-splines): 1 keeps volume, < 1 compresses, <= 0 folds."""
        with tempfile.TemporaryDirectory() as tmp:
            t = self._transformix(self._fixed_placeholder(), _NEAREST)
            _update_logged(t, tmp)  # transformix must have run before it can compute the Jacobian image
            det = from_itk(t.ComputeSpatialJacobianDeterminantImage())
        return Volume(np.asarray(det.array, dtype=np.float32), self.fixed_affine)

    def folding_fraction(self, mask: Volume | np.ndarray | None = None) -> float:
        """Fraction of fixed voxels (inside `mask` if given) where the Jacobian determinant is <= 0."""
        det = self.jacobian().array
        if mask is not None:
            m = np.asarray(mask.array if isinstance(mask, Volume) else mask) > 0
            det = det[m]
        return float(np.mean(det <= 0.0))

    # --- points ------------------------------------------------------------------------------
    def points_fixed_to_moving(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) RAS world mm of the fixed image -> where T sends them in the moving image."""
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        if len(pts) == 0:
            return pts.copy()
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "points.txt"
            write_points(src, pts)
            t = self._transformix(self._fixed_placeholder())
            t.SetFixedPointSetFileName(str(src))
            _update_logged(t, tmp)
            text = (Path(tmp) / "outputpoints.txt").read_text()
        found = re.findall(r"OutputPoint\s*=\s*\[\s*([^\]]+)\]", text)
        out = np.array([[float(v) for v in f.split()] for f in found])
        return out * _FLIP[None, :]

    def points_moving_to_fixed(self, points: np.ndarray, tol_mm: float = 1e-3, max_iter: int = 50) -> np.ndarray:
        """(N, 3) RAS world mm of the moving image -> the fixed-image points x with T(x) = p
        (elastix has no exact inverse: solved per point by `invert_points`)."""
        return invert_points(self.points_fixed_to_moving, points, tol_mm, max_iter)

    # --- saving -------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike[str]) -> list[Path]:
        """Write TransformParameters.<i>.txt, each chained to the previous (elastix's own format)."""
        import itk

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / f"TransformParameters.{i}.txt" for i in range(len(self.maps))]
        for i, (m, p) in enumerate(zip(self.maps, paths, strict=True)):
            mm = dict(m)
            mm["InitialTransformParameterFileName"] = [str(paths[i - 1]) if i else "NoInitialTransform"]
            po = itk.ParameterObject.New()
            po.SetParameterMap(mm)
            with atomic_file(p, suffix=".txt") as tmp:
                po.WriteParameterFile(str(tmp))
        return paths

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> ElastixTransform:
        """Read a folder written by `save` (or by elastix: TransformParameters.0.txt, .1.txt, ...)."""
        import itk

        paths = sorted(Path(folder).glob("TransformParameters.*.txt"), key=lambda q: int(q.name.split(".")[1]))
        if not paths:
            raise InputPathError(f"No TransformParameters.<i>.txt in {folder}.")
        maps = []
        for p in paths:
            po = itk.ParameterObject.New()
            po.ReadParameterFile(str(p))
            m = {k: list(v) for k, v in po.GetParameterMap(0).items()}
            m["InitialTransformParameterFileName"] = ["NoInitialTransform"]  # chaining is by order here
            maps.append(m)
        return cls(maps)

    # --- inverse ------------------------------------------------------------------------------
    def inverse(self, moving: Volume, iterations: int = 500) -> ElastixTransform:
        """An elastix B-spline approximation of T^-1 (moving world -> fixed world) on `moving`'s grid.

        The method of the elastix manual (section 6.1.6): register the moving image to itself with
        T as the initial transform and the DisplacementMagnitudePenalty metric, so the found U makes
        T(U(y)) = y; U alone is then the inverse. Approximate (B-spline, 10 mm grid) — use
        `points_moving_to_fixed` where exact point mapping matters.
        """
        import itk

        m: ParameterMap = {
            "Registration": ["MultiResolutionRegistration"],
            "Metric": ["DisplacementMagnitudePenalty"],
            "Transform": ["BSplineTransform"],
            "FinalGridSpacingInPhysicalUnits": ["10"],
            "HowToCombineTransforms": ["Compose"],
            "Optimizer": ["AdaptiveStochasticGradientDescent"],
            "AutomaticParameterEstimation": ["true"],
            "NumberOfResolutions": ["2"],
            "MaximumNumberOfIterations": [str(iterations)],
            "ImageSampler": ["RandomCoordinate"],
            "NumberOfSpatialSamples": ["4096"],
            "NewSamplesEveryIteration": ["true"],
            "Interpolator": ["LinearInterpolator"],
            "ResampleInterpolator": ["FinalLinearInterpolator"],
            "Resampler": ["DefaultResampler"],
            "FixedImagePyramid": ["FixedSmoothingImagePyramid"],
            "MovingImagePyramid": ["MovingSmoothingImagePyramid"],
            "WriteResultImage": ["false"],
        }
        img = to_itk(moving)
        with tempfile.TemporaryDirectory() as tmp:
            self.save(tmp)
            reg = itk.ElastixRegistrationMethod.New(img, img)
            po = itk.ParameterObject.New()
            po.AddParameterMap(m)
            reg.SetParameterObject(po)
            reg.SetInitialTransformParameterFileName(str(Path(tmp) / f"TransformParameters.{len(self.maps) - 1}.txt"))
            reg.SetLogToConsole(False)
            reg.Update()
            result = reg.GetTransformParameterObject()
            inv = {k: list(v) for k, v in result.GetParameterMap(result.GetNumberOfParameterMaps() - 1).items()}
        inv["InitialTransformParameterFileName"] = ["NoInitialTransform"]
        return ElastixTransform([inv])


# --------------------------------------------------------------------------- registering


def resolve_maps(
    preset: str | None = None, parameter_files: Sequence[str | os.PathLike[str]] = ()
) -> list[ParameterMap]:
    """Parameter maps from a preset name (a comma list chains presets' last stages) or from files."""
    if parameter_files:
        return [read_parameter_file(p) for p in parameter_files]
    return preset_maps(preset or "bspline")


def register(
    fixed: Volume,
    moving: Volume,
    preset: str | None = "bspline",
    parameter_files: Sequence[str | os.PathLike[str]] = (),
    fixed_mask: Volume | None = None,
    moving_mask: Volume | None = None,
    number_of_threads: int | None = None,
    seed: int | None = None,
    log_to_console: bool = False,
    keep_log: str | os.PathLike[str] | None = None,
) -> ElastixTransform:
    """Register `moving` to `fixed` with elastix; returns the transform (fixed -> moving world).

    preset: rigid | affine (rigid -> affine) | bspline (rigid -> affine -> bspline) | ct-cbct
    (rigid -> the SynthRAD2025 CBCT map), or a comma list of stages ("rigid,bspline"); ignored when
    `parameter_files` are given (elastix text files, run in order). Masks restrict the metric's
    samples and must lie on their image's grid. `seed` fixes elastix's random sampler (RandomSeed).
    Elastix logs into a temporary folder; when it fails, the RegistrationError carries the reason
    its log gives (`elastix_reason`) and, with `keep_log`, the whole log is kept at that path.
    """
    import itk

    check_pair(fixed, moving)
    maps = resolve_maps(preset, parameter_files)
    f_img, m_img = to_itk(fixed), to_itk(moving)
    reg = itk.ElastixRegistrationMethod.New(f_img, m_img)
    po = itk.ParameterObject.New()
    for m in maps:
        if seed is not None:
            m["RandomSeed"] = [str(int(seed))]
        po.AddParameterMap(m)
    reg.SetParameterObject(po)
    if fixed_mask is not None:
        reg.SetFixedMask(_mask_itk(fixed_mask, fixed, "fixed"))
    if moving_mask is not None:
        reg.SetMovingMask(_mask_itk(moving_mask, moving, "moving"))
    if number_of_threads:
        reg.SetNumberOfThreads(int(number_of_threads))
    reg.SetLogToConsole(log_to_console)
    with tempfile.TemporaryDirectory(prefix="medct-elastix-") as log_dir:
        _update_logged(reg, log_dir, "elastix", None if keep_log is None else Path(keep_log))
    result = reg.GetTransformParameterObject()
    out = [{k: list(v) for k, v in result.GetParameterMap(i).items()} for i in range(result.GetNumberOfParameterMaps())]
    for m in out:
        m["InitialTransformParameterFileName"] = ["NoInitialTransform"]
    return ElastixTransform(out)


def _update_logged(f: Any, folder: str, tool: str = "transformix", keep_log: Path | None = None) -> None:
    """`f.Update()` for an elastix or transformix filter logging into `folder`: a failure is a
    RegistrationError with the reason the tool's log gives (its exception says only "see the log");
    with `keep_log`, the whole log is kept at that path."""
    f.SetOutputDirectory(folder)
    f.SetLogToFile(True)
    f.SetLogFileName(f"{tool}.log")
    try:
        f.Update()
    except RuntimeError as e:
        log = Path(folder) / f"{tool}.log"
        text = log.read_text(errors="replace") if log.is_file() else ""
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [tool]
        hint = next((ln for ln in lines if "Description" in ln or "too many samples" in ln.lower()), lines[-1])
        reason = elastix_reason(text) or hint
        kept = ""
        if keep_log is not None and text:
            from medct.paths import write_text_atomic

            write_text_atomic(keep_log, text)
            kept = f" ({tool}'s log: {keep_log})"
        raise RegistrationError(f"{tool.capitalize()} failed: {reason[:200]}{kept}.") from None


def elastix_reason(log: str) -> str:
    """The reason an elastix log gives for failing: its first error description without ITK's
    location prefix (e.g. "The following component could not be created: NoSuchTransform"), else
    its first ERROR line; "" when the log names none."""
    prefix = re.compile(r"^(?:Description:\s*)?(?:ITK ERROR:\s*)?(?:[\w:]+\(0x[0-9a-fA-F]+\):\s*)?")
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("Description:"):
            return prefix.sub("", ln).rstrip(".")
    for ln in lines:
        if ln.startswith("ERROR:"):
            return ln.removeprefix("ERROR:").strip().rstrip(".")
    return ""


# --------------------------------------------------------------------------- point files


def read_points(path: str | os.PathLike[str], vol: Volume | None = None) -> np.ndarray:
    """An elastix point file ("point"/"index", count, one point per line) as (N, 3) RAS world mm.

    "point" files are LPS world mm (elastix's convention); "index" files are voxel indices of
    `vol`, which must then be given.
    """
    p = Path(path)
    if not p.is_file():
        raise InputPathError(f"Point file {p} does not exist.")
    lines = [ln.split() for ln in p.read_text().splitlines() if ln.strip()]
    try:
        kind = lines[0][0].lower()
        if kind not in ("point", "index"):
            kind, start = "point", 1  # files without the header word start with the count
        else:
            start = 2
        n = int(lines[start - 1][0])
        pts = np.array([[float(v) for v in ln[:3]] for ln in lines[start : start + n]], dtype=np.float64)
    except (IndexError, ValueError):
        raise InvalidVolumeError(
            f"Point file {p} is not in elastix's format ('point', the count, then x y z lines)."
        ) from None
    if pts.shape != (n, 3):
        raise InvalidVolumeError(f"Point file {p} announces {n} points but holds {len(pts)} of 3 coordinates.")
    bad = np.flatnonzero(~np.isfinite(pts).all(axis=1))
    if bad.size:
        raise InvalidVolumeError(
            f"Point file {p}: point {int(bad[0]) + 1} has a coordinate that is not a finite number (NaN or inf)."
        )
    if kind == "index":
        if vol is None:
            raise ConfigError(f"Point file {p} holds voxel indices; it needs the image they index.")
        return (vol.affine @ np.hstack([pts, np.ones((n, 1))]).T)[:3].T
    return pts * _FLIP[None, :]


def write_points(path: str | os.PathLike[str], points_ras: np.ndarray) -> None:
    """(N, 3) RAS world mm as an elastix "point" file (LPS), written atomically."""
    pts = np.asarray(points_ras, dtype=np.float64).reshape(-1, 3) * _FLIP[None, :]
    with atomic_file(path, suffix=".txt") as tmp:
        tmp.write_text("point\n" + f"{len(pts)}\n" + "".join(f"{x:.6f} {y:.6f} {z:.6f}\n" for x, y, z in pts))


__all__ = [
    "PRESETS",
    "ElastixTransform",
    "RegistrationError",
    "check_pair",
    "from_itk",
    "invert_points",
    "preset_maps",
    "read_parameter_file",
    "read_points",
    "register",
    "resolve_maps",
    "to_itk",
    "write_points",
]
