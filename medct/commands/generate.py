"""`medct generate -m MODEL "PROMPT" -o OUT`: CT volumes from report text (text-to-CT).

One volume (one prompt, -n 1) and OUT ending in .nii.gz/.nii: OUT and OUT's stem + .png (axial
montage). Otherwise OUT is a folder: gen_PPPP_SS.nii.gz + .png per volume (prompt P, sample S,
seed = --seed + P * n + S) and summary.csv (the folder runner's columns, then prompt and seed);
volumes whose file exists are skipped unless --overwrite. Prompts come from the command line or --prompts FILE
(one per line; blank lines and lines starting with # skipped). Volumes are int16 HU on a RAS grid
at the model's spacing (or --spacing); every file is written atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from medct.commands import types

HELP = "generate CT volumes from report text with an exported text-to-CT model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="*", help="report text(s) to generate from")
    p.add_argument("-m", "--model", required=True, help="exported text-to-CT model folder (task 'text2ct')")
    p.add_argument("-o", "--output", required=True, help="a .nii.gz file (one volume) or an output folder")
    p.add_argument("--prompts", default=None, help="a text file with one prompt per line")
    p.add_argument("-n", type=int, default=1, help="volumes per prompt (default 1)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, 30)")
    p.add_argument(
        "--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's, 5)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the first volume; volume k uses seed + k")
    p.add_argument("--size", type=int, nargs=3, metavar=("X", "Y", "Z"), default=None, help="grid in voxels")
    p.add_argument(
        "--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), default=None, help="output spacing in mm"
    )
    p.add_argument("--sampler", choices=("rflow", "ddim"), default=None, help="sampler (default: the model's)")
    p.add_argument("--device", type=types.device, default=None, help="cuda, mps or cpu (default: best available)")
    types.add_precision_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar over the sampling steps")
    p.add_argument("--overwrite", action="store_true", help="generate again volumes whose file exists")


def _read_prompts(args: argparse.Namespace) -> list[str]:
    from medct.errors import InputPathError, MedCTError

    prompts = [str(p) for p in args.prompt]
    if args.prompts is not None:
        path = Path(args.prompts)
        if not path.is_file():
            raise InputPathError(f"Prompts file {path} does not exist.")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")  # a BOM from Windows editors is fine
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise MedCTError(
                f"Prompts file {path} is not UTF-8 text (line {line}, byte {e.start}); save it as UTF-8."
            ) from None
        if "\0" in text:
            raise MedCTError(f"Prompts file {path} holds NUL bytes: it is not a text file.")
        lines = [ln.strip() for ln in text.splitlines()]
        prompts += [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise MedCTError("No prompt given: pass the report text as an argument or a file with --prompts.")
    if any(not p.strip() for p in prompts):
        raise MedCTError('A prompt is empty; give the report text to generate from (e.g. "enlarged liver").')
    return prompts


class GenerateJob:
    """The folder runner's job for text-to-CT: one case per (prompt, sample); nothing to read, the
    sampler runs on the main thread, the volume and its montage are written behind it."""

    command = "generate"
    columns = ("prompt", "seed")

    def __init__(self, model: Any, args: argparse.Namespace, single: Path | None) -> None:
        self.model, self.args, self.single = model, args, single

    def output_path(self, case: Any, out_dir: Path) -> Path:
        return self.single if self.single is not None else out_dir / f"{case.name}.nii.gz"

    def refuse(self, case: Any) -> str | None:
        return None

    def load(self, case: Any) -> Any:
        return case.data

    def run(self, entry: dict[str, Any], row: dict[str, object]) -> Any:
        a = self.args
        row.update(prompt=entry["prompt"], seed=entry["seed"])
        (vol,) = self.model.generate(
            [entry["prompt"]], n=1, steps=a.steps, guidance=a.guidance, seed=entry["seed"], size=a.size,
            spacing=a.spacing, sampler=a.sampler, progress=not a.no_progress,
        )  # fmt: skip
        row["network_seconds"] = float(vol.meta["seconds"])
        return vol

    def write(self, case: Any, vol: Any, out_path: Path, row: dict[str, object]) -> None:
        from medct.io import write_volume
        from medct.preview import save_montage

        write_volume(vol, out_path)
        stem = out_path.name.removesuffix(".gz").removesuffix(".nii")
        save_montage(vol, out_path.with_name(stem + ".png"), window=(-160.0, 240.0), title=str(vol.meta["text"]))

    def summarise_existing(self, case: Any, out_path: Path, row: dict[str, object]) -> None:
        row.update(prompt=case.data["prompt"], seed=case.data["seed"])


def run(args: argparse.Namespace) -> int:
    from medct.errors import ConfigError
    from medct.runner import Case, prepare_output_folder, run_folder
    from medct.synthesis.diffusion import TextToCT

    prompts = _read_prompts(args)
    if args.n < 1:
        raise ConfigError(f"-n must be at least 1, got {args.n}.")
    out = Path(args.output)
    single = len(prompts) * args.n == 1 and out.name.endswith((".nii.gz", ".nii"))
    model = TextToCT.from_folder(args.model, device=args.device, precision=args.precision)
    model.grid_size(args.size)  # a grid the model cannot code: one sentence before any case
    source = Path(args.prompts) if args.prompts is not None else Path("command line")
    cases = [
        Case(f"gen_{p:04d}_{s:02d}", source, "entry", {"prompt": prompt, "seed": args.seed + p * args.n + s})
        for p, prompt in enumerate(prompts)
        for s in range(args.n)
    ]
    if single:
        cases[0].name = out.name.removesuffix(".gz").removesuffix(".nii")
    out_dir = prepare_output_folder(out.parent if single else out)
    job = GenerateJob(model, args, out if single else None)
    report = run_folder(cases, out_dir, job, overwrite=args.overwrite, debug=args.debug, summary=not single)
    return report.exit_code
