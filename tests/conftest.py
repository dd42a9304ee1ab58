"""Shared fixtures: the real scans in ../shared/data (skipped with a reason when absent, an error
when MEDCT_REQUIRE_SHARED_DATA=1: a run that must test real scans cannot pass without them)."""

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
    """Root of the real public scans; tests that need them skip when the folder is absent (fail
    when MEDCT_REQUIRE_SHARED_DATA=1)."""
    if not SHARED_DATA.is_dir():
        reason = f"real scans not found at {SHARED_DATA} (see shared/data/MANIFEST.md)"
        if os.environ.get("MEDCT_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(reason + "; MEDCT_REQUIRE_SHARED_DATA=1 asks for them", pytrace=False)
        pytest.skip(reason)
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


REPORTS = (  # a few phantom-style reports: the corpus of the tiny tokenizers of the text-to-CT tests
    "Non-contrast abdominal CT. Liver 1250 mL, normal size. No focal liver or renal lesion.",
    "Arterial phase contrast-enhanced CT of the abdomen. Hepatomegaly, liver volume 2210 mL. One 18 mm hypodense lesion in the right kidney.",
    "Portal venous phase CT of the abdomen with IV contrast. The liver is small (850 mL). Splenomegaly (512 mL).",
)


def make_text2ct_parts(
    folder: Path, spacing: tuple[float, float, float] = (4.0, 4.0, 4.0), tile: int = 32, embed_dim: int = 8
) -> tuple[Path, Path]:
    """Untrained tiny VAE and CLIP model folders (what `medct export` writes for parts 1 and 2 of
    text-to-CT), for the diffusion recipe and `medct generate` tests. Returns (vae_dir, clip_dir)."""
    import torch

    from medct.checkpoint import ModelCard, save_model_folder
    from medct.nets import create_tiny_net
    from medct.synthesis.clip3d import TOKENIZER_FILE, train_tokenizer
    from medct.transforms import Preprocessing

    torch.manual_seed(0)
    pre = Preprocessing(spacing=spacing, hu_min=-1000.0, hu_max=1000.0, modality="CT")
    vae = create_tiny_net("kl_autoencoder")
    vae_card = ModelCard(
        vae.net_config["name"],
        vae.net_config["args"],
        {},
        pre,
        (tile,) * 3,
        task="vae",
        inference={"scale_factor": 1.0, "tile": [tile] * 3, "overlap": 0.25},
    )
    clip = create_tiny_net("clip3d", embed_dim=embed_dim)
    clip_card = ModelCard(clip.net_config["name"], clip.net_config["args"], {}, pre, (tile,) * 3, task="clip")
    tok = train_tokenizer(REPORTS, vocab_size=clip.vocab_size).to_str()
    vae_dir = save_model_folder(vae, vae_card, folder / "vae")
    clip_dir = save_model_folder(clip, clip_card, folder / "clip", files={TOKENIZER_FILE: tok})
    return vae_dir, clip_dir


def make_text2ct_model(folder: Path, objective: str = "rflow", context: str = "pooled") -> Path:
    """A tiny untrained text-to-CT model folder (32x32x16 at 4 mm), made the way users make one: the
    diffusion task on parts 1 and 2, its checkpoint exported with `medct export`'s function."""
    import torch

    from medct.checkpoint import export_lightning_checkpoint
    from medct.nets import create_tiny_net
    from medct.synthesis.diffusion import LDMTask

    vae_dir, clip_dir = make_text2ct_parts(folder / "parts")
    torch.manual_seed(0)
    net = create_tiny_net("latent_diffusion_unet")  # stride 2: sizes multiples of 4 x 2 = 8
    task = LDMTask(
        net,
        str(vae_dir),
        str(clip_dir),
        patch_size=(32, 32, 16),
        objective=objective,  # type: ignore[arg-type]
        context=context,  # type: ignore[arg-type]
        steps=4,
        guidance=3.0,
    )
    ckpt = {"state_dict": task.state_dict(), "epoch": 0, "global_step": 1}
    task.on_save_checkpoint(ckpt)
    torch.save(ckpt, folder / "ldm.ckpt")
    return export_lightning_checkpoint(folder / "ldm.ckpt", folder / "text2ct")
