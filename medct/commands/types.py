"""argparse value types: a bad option value becomes one sentence (argparse's usage + error line,
exit code 2), never a traceback from deep inside a command."""

from __future__ import annotations

import argparse


def triplet(text: str) -> tuple[float, float, float]:
    """'1.5' -> (1.5, 1.5, 1.5); '0.8,0.8,3' (or 0.8x0.8x3) -> (0.8, 0.8, 3.0); all > 0."""
    try:
        parts = [float(p) for p in text.replace("x", ",").split(",") if p]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected one or three numbers, got '{text}'") from None
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected one or three positive numbers, got '{text}'")
    return parts[0], parts[1], parts[2]


def int_triplet(text: str) -> tuple[int, int, int]:
    """Like `triplet`, for whole numbers >= 2 (voxel counts)."""
    a, b, c = triplet(text)
    if any(v != int(v) or v < 2 for v in (a, b, c)):
        raise argparse.ArgumentTypeError(f"expected one or three whole numbers >= 2, got '{text}'")
    return int(a), int(b), int(c)


def overlap(text: str) -> float:
    """--overlap: a fraction in [0, 1), checked by the one check of every overlap (check_overlap)."""
    from medct.errors import ConfigError
    from medct.sliding_window import check_overlap

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got '{text}'") from None
    try:
        return check_overlap(value)
    except ConfigError:
        raise argparse.ArgumentTypeError(f"the overlap must lie in [0, 1), got {text}") from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got '{text}'") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def device(text: str) -> str:
    """cpu, mps, cuda or cuda:N."""
    ok = text in ("cpu", "mps", "cuda") or (text.startswith("cuda:") and text[5:].isdigit())
    if not ok:
        raise argparse.ArgumentTypeError(f"expected cpu, mps, cuda or cuda:N, got '{text}'")
    return text


def add_precision_argument(p: argparse.ArgumentParser) -> None:
    """--precision auto|bf16|fp32: the one precision flag of every command that runs a network."""
    p.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="bf16 autocast or fp32 (default auto: bf16 where the device has bf16 - CUDA, CPUs with "
        "AMX / AVX-512 BF16 - else fp32; bf16 on a device without it is an error)",
    )
