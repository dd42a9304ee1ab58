"""`medct generate -m MODEL "PROMPT" -o OUT`: CT volumes from report text (text-to-CT).

One volume (one prompt, -n 1) and OUT ending in .nii.gz/.nii: OUT and OUT's stem + .png (axial
montage). Otherwise OUT is a folder: gen_PPPP_SS.nii.gz + .png per volume (prompt P, sample S) and
summary.csv (file, prompt, seed, seconds). Prompts come from the command line or --prompts FILE
(one per line; blank lines and lines starting with # skipped). Volumes are int16 HU on a RAS grid
at the model's spacing (or --spacing); every file is written atomically.
"""

from __future__ import annotations

import argparse

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
    p.add_argument("--no-progress", action="store_true", help="no progress bar over the sampling steps")


def _read_prompts(args: argparse.Namespace) -> list[str]:
    from pathlib import Path

    from medct.errors import InputPathError, MedCTError

    prompts = [str(p) for p in args.prompt]
    if args.prompts is not None:
        path = Path(args.prompts)
        if not path.is_file():
            raise InputPathError(f"Prompts file {path} does not exist.")
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        prompts += [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise MedCTError("No prompt given: pass the report text as an argument or a file with --prompts.")
    if any(not p.strip() for p in prompts):
        raise MedCTError('A prompt is empty; give the report text to generate from (e.g. "enlarged liver").')
    return prompts


def run(args: argparse.Namespace) -> int:
    import csv
    import sys
    from pathlib import Path

    from medct.io import write_volume
    from medct.paths import atomic_file
    from medct.preview import save_montage
    from medct.synthesis.diffusion import TextToCT

    prompts = _read_prompts(args)
    if args.n < 1:
        from medct.errors import ConfigError

        raise ConfigError(f"-n must be at least 1, got {args.n}.")
    out = Path(args.output)
    single = len(prompts) * args.n == 1 and out.name.endswith((".nii.gz", ".nii"))
    model = TextToCT.from_folder(args.model, device=args.device)
    rows = []
    for p, prompt in enumerate(prompts):
        vols = model.generate(
            [prompt],
            n=args.n,
            steps=args.steps,
            guidance=args.guidance,
            seed=args.seed + p * args.n,
            size=args.size,
            spacing=args.spacing,
            sampler=args.sampler,
            progress=not args.no_progress,
        )
        for s, vol in enumerate(vols):
            if single:
                path = out
                out.parent.mkdir(parents=True, exist_ok=True)
            else:
                out.mkdir(parents=True, exist_ok=True)
                path = out / f"gen_{p:04d}_{s:02d}.nii.gz"
            write_volume(vol, path)
            stem = path.name.removesuffix(".gz").removesuffix(".nii")
            save_montage(vol, path.with_name(stem + ".png"), window=(-160.0, 240.0), title=prompt)
            rows.append(
                {"file": str(path), "prompt": prompt, "seed": vol.meta["seed"], "seconds": f"{vol.meta['seconds']:.2f}"}
            )
            print(f"wrote {path} ({vol.meta['seconds']:.1f} s)", file=sys.stderr)
    if not single:
        with atomic_file(out / "summary.csv", suffix=".csv") as tmp, open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["file", "prompt", "seed", "seconds"])
            w.writeheader()
            w.writerows(rows)
    print(f"medct generate: {len(rows)} volumes", file=sys.stderr)
    return 0
