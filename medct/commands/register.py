"""`medct register -f FIXED -m MOVING -o OUT [--preset ...]`: register one pair, or a datalist of pairs.

Writes into OUT (one pair) or OUT/<name>/ (each pair of `--pairs`):
    warped.nii.gz         the moving image on the fixed grid (fixed geometry, moving's dtype)
    warped_labels.nii.gz  --moving-labels on the fixed grid (nearest neighbour)
    warped_points.txt     --points (on the moving image) carried into the fixed image (elastix format)
    transform/            TransformParameters.<i>.txt (elastix; reusable with transformix)
    elastix.log           only when elastix fails: its whole log (<name>.elastix.log for --pairs);
                          the error sentence quotes the reason it gives
    jacobian.nii.gz       the transform's Jacobian determinant on the fixed grid (<= 0: folding)
    preview.png           checkerboard of fixed and warped, with the warped labels
and, for --pairs, summary.csv (one row per pair: seconds, folding fraction, Jacobian range) from the
one folder runner (`medct.runner`): pair names are safe file names inside OUT, a pair's folder
appears whole, existing ones are skipped unless --overwrite. All pairs run in one process, so
itk's start-up cost (seconds) is paid once; a bad pair is listed, the rest finish.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from medct.commands import types

HELP = "register a moving scan to a fixed one (Elastix presets), warping labels and points with it"


def _preset(text: str) -> str:
    """impact, none, or an Elastix preset in the one grammar of `elastix.parse_preset`."""
    from medct.errors import ConfigError
    from medct.registration.elastix import parse_preset

    if text in ("impact", "none"):
        return text
    try:
        parse_preset(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).rstrip(".")) from None
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--fixed", default=None, help="fixed image (the grid everything is written on)")
    p.add_argument("-m", "--moving", default=None, help="moving image (warped onto the fixed grid)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument(
        "--pairs",
        default=None,
        help='datalist JSON: [{"name", "fixed", "moving", optional "moving_labels", "fixed_mask", '
        '"moving_mask", "points"}, ...] (or {"pairs": [...]}); paths relative to the JSON',
    )
    p.add_argument(
        "--preset",
        default="bspline",
        type=_preset,
        help="rigid | affine (rigid -> affine) | bspline (rigid -> affine -> bspline, the default) | ct-cbct "
        "(rigid -> the SynthRAD2025 CBCT map), impact (feature registration on --encoder), or stages joined by "
        "commas, e.g. 'bspline' alone as 'bspline,'",
    )
    p.add_argument("--encoder", default=None, help="impact: a medct segmentation model or encoder folder")
    p.add_argument(
        "--impact-init", default="affine", type=_preset, help="impact: the Elastix preset run first, or 'none'"
    )
    p.add_argument("--impact-layers", type=int, nargs="+", default=[0, 1], help="impact: encoder stages (0 = full res)")
    p.add_argument(
        "--impact-mode", default="jacobian", choices=["jacobian", "static"], help="impact: optimisation mode"
    )
    types.add_precision_argument(p)  # impact: the encoder's forward passes
    p.add_argument(
        "--params", nargs="+", default=None, help="elastix parameter files instead of a preset, run in order"
    )
    p.add_argument("--fixed-mask", default=None, help="mask on the fixed grid where the metric is evaluated")
    p.add_argument("--moving-mask", default=None, help="mask on the moving grid")
    p.add_argument("--moving-labels", default=None, help="label map on the moving grid, warped with the image")
    p.add_argument("--points", default=None, help="elastix point file of points on the moving image")
    p.add_argument("--threads", type=types.positive_int, default=None, help="elastix threads (default: all cores)")
    p.add_argument("--no-preview", action="store_true", help="do not write preview.png")
    p.add_argument("--overwrite", action="store_true", help="--pairs: register again pairs whose folder exists")


def _pairs(args: argparse.Namespace) -> list[dict[str, Any]]:
    from medct.errors import ConfigError, InputPathError

    keys = ("moving_labels", "fixed_mask", "moving_mask", "points")
    if args.pairs:
        src = Path(args.pairs)
        if not src.is_file():
            raise InputPathError(f"Pairs datalist {src} does not exist.")
        try:
            data = json.loads(src.read_text())
        except (OSError, ValueError):
            raise ConfigError(f"Pairs datalist {src} is not valid JSON.") from None
        entries = data.get("pairs") if isinstance(data, dict) else data
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"Pairs datalist {src} holds no list of pairs.")
        out = []
        for k, e in enumerate(entries):
            if not isinstance(e, dict) or "fixed" not in e or "moving" not in e:
                raise ConfigError(f"Pair {k} of {src} needs 'fixed' and 'moving' paths.")
            entry = {"name": str(e.get("name", f"pair_{k:03d}"))}
            for key in ("fixed", "moving", *keys):
                if e.get(key):
                    entry[key] = str((src.parent / e[key]) if not Path(e[key]).is_absolute() else Path(e[key]))
            out.append(entry)
        names = [e["name"] for e in out]
        if len(set(names)) != len(names):
            raise ConfigError(f"Pair names in {src} are not unique.")
        return out
    if not args.fixed or not args.moving:
        raise ConfigError("Give -f FIXED and -m MOVING, or --pairs DATALIST.")
    entry = {"name": "", "fixed": args.fixed, "moving": args.moving}
    for key in keys:
        value = getattr(args, key)
        if value:
            entry[key] = value
    return [entry]


def _checkerboard(fixed: Any, warped: Any, squares: int = 8) -> Any:
    """A volume on the fixed grid alternating fixed and warped in `squares` tiles per axis."""
    import numpy as np

    idx = np.indices(fixed.shape)
    tiles = sum((idx[a] * squares // max(fixed.shape[a], 1)) for a in range(3)) % 2 == 1
    return fixed.with_array(np.where(tiles, warped.array, fixed.array).astype(np.float32))


def _impact(fixed: Any, moving: Any, masks: dict[str, Any], args: argparse.Namespace) -> Any:
    """IMPACT on the --encoder's features, from an Elastix --impact-init transform."""
    from medct.errors import ConfigError
    from medct.registration import impact

    if not args.encoder:
        raise ConfigError("--preset impact needs --encoder MODEL_DIR (a medct segmentation model or encoder folder).")
    if getattr(args, "_features", None) is None:  # loaded once for a whole datalist
        args._features = impact.load_feature_model(args.encoder, layers=args.impact_layers)
    settings = impact.ImpactSettings(mode=args.impact_mode)
    return impact.register_on_encoder(
        fixed, moving, args._features, args.impact_init, settings, masks["fixed_mask"], args.threads,
        precision=args.precision,
    )  # fmt: skip


def run_pair(entry: dict[str, Any], out: Path, args: argparse.Namespace, log: Path | None = None) -> dict[str, Any]:
    """Register one pair and write its outputs into `out`; returns its summary row. When elastix
    fails, its reason is the error's sentence and its whole log is kept at `log`."""
    import numpy as np

    from medct.io import read_volume, write_volume
    from medct.registration import elastix

    t0 = time.perf_counter()
    fixed, moving = read_volume(entry["fixed"]), read_volume(entry["moving"])
    masks = {k: read_volume(entry[k]) if entry.get(k) else None for k in ("fixed_mask", "moving_mask")}
    labels = read_volume(entry["moving_labels"]) if entry.get("moving_labels") else None
    if labels is not None:
        from medct.io import check_label_values, check_same_grid

        check_same_grid(labels, moving, "moving labels and moving image")
        check_label_values(labels.array, f"Moving labels {entry['moving_labels']}")
    points = elastix.read_points(entry["points"], moving) if entry.get("points") else None
    if args.preset == "impact" and not args.params:
        tr = _impact(fixed, moving, masks, args)
    else:
        tr = elastix.register(
            fixed,
            moving,
            preset=args.preset,
            parameter_files=args.params or (),
            fixed_mask=masks["fixed_mask"],
            moving_mask=masks["moving_mask"],
            number_of_threads=args.threads,
            keep_log=log,
        )
    seconds_registration = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    warped = tr.warp(moving)
    write_volume(warped, out / "warped.nii.gz")
    warped_labels = None
    if labels is not None:
        warped_labels = tr.warp(labels, kind="labels")
        write_volume(warped_labels, out / "warped_labels.nii.gz")
    if points is not None:
        elastix.write_points(out / "warped_points.txt", tr.points_moving_to_fixed(points))
    tr.save(out / "transform")
    jac = tr.jacobian()
    write_volume(jac, out / "jacobian.nii.gz")
    if not args.no_preview:
        from medct.preview import save_preview

        lo, hi = np.percentile(fixed.array, [1, 99])
        save_preview(
            _checkerboard(fixed.with_array(fixed.array.astype(np.float32)), warped),
            warped_labels if warped_labels is not None and warped_labels.array.any() else None,
            out / "preview.png",
            window=(float(lo), float(hi)),
            title=f"checkerboard fixed / warped moving ({args.preset if not args.params else 'parameter files'})",
        )
    det = jac.array
    return {
        "name": entry["name"] or Path(entry["moving"]).name,
        "status": "ok",
        "seconds_registration": round(seconds_registration, 2),
        "seconds_total": round(time.perf_counter() - t0, 2),
        "folding_fraction": round(float(np.mean(det <= 0)), 6),
        "jacobian_min": round(float(det.min()), 4),
        "jacobian_max": round(float(det.max()), 4),
        "error": "",
    }


PAIR_COLUMNS = ("seconds_registration", "folding_fraction", "jacobian_min", "jacobian_max")


def _register_pair(entry: dict[str, Any], out: Path, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    """run_pair, with an itk/elastix/transformix failure (a RuntimeError, long) as one sentence."""
    from medct.registration.elastix import RegistrationError

    try:
        return run_pair(entry, out, args, log)
    except RuntimeError as e:
        raise RegistrationError(f"elastix failed: {str(e).strip().splitlines()[-1][:200]}") from None


class PairsJob:
    """The folder runner's job for `--pairs`: each pair registered into OUT/<name>/, a folder that
    appears whole (staged beside it, moved into place when every file is written)."""

    command = "register"
    columns = PAIR_COLUMNS

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def output_path(self, case: Any, out_dir: Path) -> Path:
        return out_dir / case.name

    def refuse(self, case: Any) -> str | None:
        return None

    def load(self, case: Any) -> Any:
        return case

    def run(self, case: Any, row: dict[str, object]) -> Any:
        from medct.paths import atomic_folder

        with atomic_folder(self.output_path(case, Path(self.args.output))) as stage:
            # elastix's log of a failed pair is kept beside the pair folders (the stage is discarded)
            result = _register_pair(case.data, stage, self.args, Path(self.args.output) / f"{case.name}.elastix.log")
        row.update({k: result[k] for k in PAIR_COLUMNS})
        row["network_seconds"] = float(result["seconds_registration"])
        return None

    def write(self, case: Any, result: Any, out_path: Path, row: dict[str, object]) -> None:
        return None  # run() has moved the finished pair folder into place

    def summarise_existing(self, case: Any, out_path: Path, row: dict[str, object]) -> None:
        return None


def run(args: argparse.Namespace) -> int:
    from medct.runner import Case, prepare_output_folder, run_folder, unique_case_names, write_summary

    entries = _pairs(args)
    if not args.pairs:  # one pair: its files straight into OUT, errors as the command's own
        out = Path(args.output)
        r = _register_pair(entries[0], out, args, out / "elastix.log")
        print(
            f"{r['name']}: registered in {r['seconds_registration']:.1f} s, folding {100 * r['folding_fraction']:.3f} %"
        )
        row = {"case": r["name"], "status": "done", "input": args.moving, "output": str(out), **r}
        row["seconds"], row["network_seconds"] = r["seconds_total"], r["seconds_registration"]
        write_summary([row], PAIR_COLUMNS, out / "summary.csv")
        return 0
    out_dir = prepare_output_folder(args.output)
    cases = unique_case_names([Case(e["name"], Path(e["moving"]), "entry", e) for e in entries])
    report = run_folder(cases, out_dir, PairsJob(args), overwrite=args.overwrite, debug=args.debug)
    return report.exit_code
