"""Shared fixtures: the real scans in ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# ../shared/data from the project root; MEDCT_SHARED_DATA overrides (e.g. a clean clone elsewhere).
SHARED_DATA = Path(
    os.environ.get("MEDCT_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real public scans; tests that need them skip when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real scans not found at {SHARED_DATA} (see shared/data/MANIFEST.md)")
    return SHARED_DATA


def make_model_folder(
    out: Path,
    labels: dict[int, str] | None = None,
    spacing: tuple[float, float, float] = (4.0, 4.0, 4.0),
    patch: int | tuple[int, int, int] = 32,
    channels: tuple[int, ...] = (4, 8, 16),
    modality: str = "CT",
    inference: dict | None = None,
    seed: int = 0,
    constant_class: int | None = None,
) -> Path:
    """A tiny untrained segmentation model folder (MONAI UNet): enough to exercise every code path.

    constant_class: every weight zeroed and the output bias set so that each tile it runs says this
    class; with air-tile skipping the label map is then the union of the tiles that touch the
    body (smooth blocks instead of a random network's speckle)."""
    import torch

    from medct.checkpoint import ModelCard, save_model_folder
    from medct.nets import create_net
    from medct.transforms import Preprocessing

    labels = labels or {0: "background", 1: "blob", 2: "rod"}
    torch.manual_seed(seed)
    net = create_net("unet", in_channels=1, out_channels=len(labels), channels=list(channels), num_res_units=1)
    if constant_class is not None:
        with torch.no_grad():
            for p in net.parameters():
                p.zero_()
            last_bias = [p for name, p in net.named_parameters() if name.endswith("bias")][-1]
            last_bias[constant_class] = 5.0
    card = ModelCard(
        net_name="unet",
        net_args=dict(net.net_config["args"]),
        labels=labels,
        preprocessing=Preprocessing(spacing=spacing, modality=modality),
        patch_size=(patch,) * 3 if isinstance(patch, int) else tuple(patch),
        inference=dict(inference or {}),
    )
    return save_model_folder(net, card, out)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained 3-class CT model folder at 4 mm with 32^3 patches (one per test module)."""
    return make_model_folder(tmp_path_factory.mktemp("model") / "tiny")
