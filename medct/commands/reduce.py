"""`medct reduce DATA -o reduced.json`: drop near-duplicate axial slices before pretraining."""

from __future__ import annotations

import argparse

from medct.commands import types

HELP = "drop near-duplicate CT slices of an unlabelled data set before pretraining (dHash, Wolf et al. 2024)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="a folder of volumes / DICOM series, or a datalist JSON")
    p.add_argument("-o", "--output", required=True, help="reduced datalist JSON to write (data.datalist of a recipe)")
    p.add_argument("--method", default="dhash", choices=["dhash", "embedding"], help="slice similarity")
    p.add_argument(
        "--max-hamming", type=types.non_negative_int, default=6, help="dhash: drop slices within this many bits"
    )
    p.add_argument("--threshold", type=types.fraction, default=0.95, help="embedding: drop slices with cosine >= this")
    p.add_argument("--encoder", default=None, help="embedding: a medct encoder folder (default: slice thumbnails)")


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from medct.data import find_datalist, read_msd_datalist
    from medct.errors import InputPathError
    from medct.pretrain.reduction import encoder_embedding, reduce_datalist, write_reduced_datalist

    src = Path(args.data)
    if src.is_file():
        items = read_msd_datalist(src, "training")
        if items is None:
            raise InputPathError(f"{src} has no 'training' list.")
    else:
        train, val = find_datalist(src, keys=("image",))
        items = train + (val or [])
    embed = encoder_embedding(args.encoder) if args.encoder else None
    start = time.perf_counter()
    red = reduce_datalist(items, args.method, args.max_hamming, args.threshold, embed)
    seconds = time.perf_counter() - start
    meta = {"source": str(src), "method": args.method}
    meta.update({"max_hamming": args.max_hamming} if args.method == "dhash" else {"threshold": args.threshold})
    out = write_reduced_datalist(red, args.output, meta)
    for image, kept, total in red.per_volume:
        print(f"{kept:5d} / {total:5d} slices kept  {image}")
    dropped = len(items) - len(red.items) - len(red.failed)
    print(
        f"kept {red.kept_slices} of {red.total_slices} slices ({100 * red.kept_fraction:.1f} %) in {seconds:.1f} s"
        + (f"; {dropped} volumes with no kept slice left out" if dropped else "")
    )
    # A 3D crop sampler's epoch is volumes x crops, which reduction does not shorten by itself: the
    # time is saved by giving the same passes over the kept slices fewer steps.
    print(
        f"wrote {out}: give it as data.datalist (training crops are centred on kept slices); for the same "
        f"passes over the kept slices set --trainer.max_steps to {red.kept_fraction:.2f} x your step budget "
        f"({100 * (1 - red.kept_fraction):.1f} % of the pretraining time saved)"
    )
    if red.failed:
        import sys

        print(f"{len(red.failed)} volumes could not be read and are not in {out}:", file=sys.stderr)
        for image, why in red.failed:
            print(f"  {image}: {why}", file=sys.stderr)
        return 1
    return 0
