"""Every recipe in configs/ runs: `fit` with fast_dev_run on a tiny variant of itself.

Each YAML under configs/ (recursively, so recipes added later are covered) is loaded, shrunk by
the rules below (a tiny phantom cohort in tmp_path, 32^3 patches, narrow networks, no workers),
and run through `medct.lightning_cli.run_lightning` exactly as `medct fit --config` would. A recipe
whose keys the rules do not know still runs, only at its own size: add a rule when a new recipe
is slow. A slow-marked test runs one recipe with DDP on two CPU processes (gloo).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from medct.lightning_cli import run_lightning
from medct.phantom import write_cohort

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))

# Narrow variants of network init args, by argument name.
NET_SHRINK: dict[str, Any] = {
    "filters": [4, 8, 16],
    "blocks_per_stage": [1, 2, 2],
    "channels": [4, 8, 16],
    "init_filters": 8,
    "blocks_down": [1, 1, 1],
    "blocks_up": [1, 1],
    "feature_size": 12,
    "depths": [1, 1, 1, 1],
    "n_stages": 3,
}
# Narrow variants by network class (argument names that mean other things elsewhere, e.g. SwinUNETR's num_heads).
CLASS_SHRINK: dict[str, dict[str, Any]] = {
    "medct.nets.MultiModalUNETR": {"hidden_size": 48, "depth": 4, "num_heads": 4, "mlp_dim": 96},
    "medct.nets.KLAutoencoder": {"channels": [8, 8, 8], "norm_num_groups": 4},
    "medct.nets.CLIP3D": {
        "image_args": {"filters": [4, 8, 16]},
        "vocab_size": 300,
        "max_length": 32,
        "width": 16,
        "layers": 1,
        "heads": 2,
        "embed_dim": 8,
    },
    "medct.nets.LatentDiffusionUNet": {
        "channels": [8, 8, 8],
        "norm_num_groups": 4,
        "num_head_channels": 8,
        "cross_attention_dim": 8,
    },
    "medct.nets.AttentionUNet": {"channels": [4, 8, 8, 16, 16]},
    "medct.nets.MotionTransformer": {"dim": 16, "depth": 1, "heads": 2},  # 5 levels: deep supervision down to 1/8
}
TINY_PATCH = 32


def _min_patch(class_path: str) -> int:
    """The tiny input side the registry declares for the network a YAML names (e.g. SwinUNETR: 64)."""
    from medct.nets import list_nets, net_entry

    for name in list_nets():
        entry = net_entry(name)
        target = getattr(entry.builder, "__wrapped__", entry.builder)
        if f"medct.nets.{target.__name__}" == class_path or f"{target.__module__}.{target.__name__}" == class_path:
            return entry.tiny_size
    return 0


def _tiny(cfg: dict[str, Any], tmp: Path) -> dict[str, Any]:
    cfg = copy.deepcopy(cfg)
    model = cfg.get("model", {}).get("init_args", {})
    net = model.get("net", {}) if isinstance(model.get("net"), dict) else {}
    for key in set(NET_SHRINK) & set(net.get("init_args", {})):
        net["init_args"][key] = NET_SHRINK[key]
    for key, value in CLASS_SHRINK.get(net.get("class_path", ""), {}).items():
        net.setdefault("init_args", {})[key] = value
    inner = net.get("init_args", {}).get("backbone_args") or {}  # a classifier's backbone
    for key in set(NET_SHRINK) & set(inner):
        inner[key] = NET_SHRINK[key]
    if "sw_batch_size" in model:
        model["sw_batch_size"] = 1
    if model.get("pretrained_encoder"):  # an encoder folder the recipe expects from an earlier run
        model["pretrained_encoder"] = None
    patch = max(TINY_PATCH, _min_patch(net.get("class_path", "")))
    if "crop_size" in model:  # contrastive views inside the tiny patch
        model["crop_size"] = [patch * 3 // 4] * 3
    if "decoder_dim" in model:  # BM-MAE's decoder
        model["decoder_dim"], model["decoder_depth"], model["decoder_heads"] = 36, 1, 4
    if "proj_hidden" in model:
        model["proj_hidden"], model["proj_dim"] = 32, 16

    data = cfg.get("data", {}).get("init_args", {})
    spacing = (data.get("preprocessing") or {}).get("spacing", [4.0, 4.0, 4.0])
    if "phantom" in data:
        data["data_dir"] = str(tmp / "phantom")
        data["phantom"] = {**(data["phantom"] or {}), "n": 3, "shape": [32, 32, 32], "spacing": spacing}
    elif "data_dir" in data or "datalist" in data:  # a folder or datalist recipe: a tiny cohort on disk instead
        write_cohort(tmp / "folder", n=3, seed=0, shape=(32, 32, 32), spacing=tuple(spacing))
        data.pop("datalist", None)
        data["data_dir"] = str(tmp / "folder")
    if "replay_phantom" in data:  # continual pretraining: a tiny earlier domain too
        data["replay_data_dir"] = str(tmp / "replay")
        data["replay_phantom"] = {**(data["replay_phantom"] or {}), "n": 3, "shape": [32, 32, 32], "spacing": spacing}
    elif "replay_data_dir" in data:
        write_cohort(tmp / "replay", n=3, seed=1, shape=(32, 32, 32), spacing=tuple(spacing))
        data["replay_data_dir"] = str(tmp / "replay")
    data["sampling"] = {**(data.get("sampling") or {}), "patch_size": [patch] * 3, "batch_size": 1, "num_samples": 1}
    for key, value in {"num_workers": 0, "cache_dir": str(tmp / "cache")}.items():
        if key in data:
            data[key] = value
    if data.get("align") == "elastix":  # synthetic CT's pair alignment: the cheapest preset (~1 s a pair)
        data["align_preset"] = "rigid"
    if "size" in data:  # text-to-CT: the whole generation grid, then the patch inside it
        data["size"] = [patch] * 3
    if "vae" in model and "clip" in model:  # latent diffusion: the tiny parts 1 and 2 it builds on
        from tests.conftest import make_text2ct_parts

        model["vae"], model["clip"] = (str(p) for p in make_text2ct_parts(tmp / "parts", tuple(spacing), patch))
    if "phantom_patients" in data:  # motion: two small breathing phantoms, a short context
        data.update(phantom_patients=2, phantom_shape=[32, 32, 24], phantom_spacing=12.0, context=4, n_phases=6)
        data["samples_per_epoch"] = 4
    elif "context" in data:  # 2.5D synthetic CT: patches are (X, Y, 2k+1) slices
        data["sampling"]["patch_size"] = [patch, patch, 2 * int(data["context"]) + 1]
    return cfg


def _tiny_chain(cfg: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """A Turbolift chain (`turbolift:` section): the shared recipe shrunk as above, each stage's
    data a tiny cohort of its own, the stages written under tmp."""
    chain = cfg.pop("turbolift")
    cfg = _tiny(cfg, tmp)
    spacing = (cfg.get("data", {}).get("init_args", {}).get("preprocessing") or {}).get("spacing", [4.0, 4.0, 4.0])
    for k, stage in enumerate(chain["stages"]):
        data = stage.get("data") or {}
        folder = tmp / f"stage_{k}"
        if "phantom" in data:
            data["phantom"] = {**(data["phantom"] or {}), "n": 4, "shape": [32, 32, 32], "spacing": spacing}
        else:  # a datalist of real scans: a tiny cohort instead
            write_cohort(folder, n=4, seed=k, shape=(32, 32, 32), spacing=tuple(spacing))
            data.pop("datalist", None)
        data["data_dir"] = str(folder)
        data["split"] = {"val_fraction": 0.25}
        stage["data"] = data
        stage.pop("trainer", None)
    chain["output_dir"] = str(tmp / "chain")
    return {**cfg, "turbolift": chain}


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(ROOT / "configs")) for c in CONFIGS])
def test_recipe_runs_fast_dev_run(config, tmp_path):
    tiny = tmp_path / config.name
    recipe = yaml.safe_load(config.read_text())
    if "turbolift" in recipe:  # a chain of stages: `medct turbolift`, each stage one fast_dev_run step
        from medct.finetune.turbolift import run_chain

        n = len(recipe["turbolift"]["stages"])
        tiny.write_text(yaml.safe_dump(_tiny_chain(recipe, tmp_path)))
        result = run_chain(
            tiny, ["--trainer.fast_dev_run=true", "--trainer.accelerator=cpu", "--trainer.precision=32-true"]
        )
        assert len(result.matrix) == n and all(len(row) == n for row in result.matrix)
        assert all(0.0 <= v <= 1.0 for row in result.matrix for v in row)
        assert (Path(result.output_dir) / "forgetting.csv").is_file()
        return
    tiny.write_text(yaml.safe_dump(_tiny(recipe, tmp_path)))
    cli = run_lightning(
        [
            "fit",
            "--config",
            str(tiny),
            "--trainer.fast_dev_run=true",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.precision=32-true",
            f"--trainer.default_root_dir={tmp_path / 'runs'}",
        ]
    )
    trainer = cli.trainer
    assert trainer.state.finished and trainer.global_step == 1  # one optimiser step was taken
    loss = trainer.callback_metrics.get("train/loss")
    assert loss is not None and torch.isfinite(loss)
    if trainer.val_dataloaders is not None:  # fast_dev_run also runs one validation batch
        assert any(k.startswith("val/") for k in trainer.callback_metrics)
    if hasattr(cli.model, "model_card"):  # what `medct export` would write rebuilds the trained network
        from medct.nets import create_net

        card = cli.model.model_card()
        twin = create_net(card.net_name, **card.net_args)
        twin.load_state_dict(cli.model.net.state_dict(), strict=True)


def test_every_recipe_the_docs_name_is_run_above():
    """Each `configs/...` recipe that README.md, CONTRIBUTING.md or a recipe's own comments tell a
    user to run exists and is one of the recipes test_recipe_runs_fast_dev_run runs."""
    import re

    texts = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *CONFIGS]
    named = {m for t in texts for m in re.findall(r"configs/[\w/.-]+\.yaml", t.read_text())}
    assert named, "the docs name no recipe"
    ran = {str(c.relative_to(ROOT)) for c in CONFIGS}
    assert named <= ran, f"named in the docs but not in configs/: {sorted(named - ran)}"


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    """DESIGN.md Scale: the same YAML under strategy=ddp, devices=2 on CPU (gloo)."""
    config = ROOT / "configs" / "finetune" / "seg_phantom.yaml"
    tiny = tmp_path / "seg_phantom.yaml"
    tiny.write_text(yaml.safe_dump(_tiny(yaml.safe_load(config.read_text()), tmp_path)))
    # Lightning's DDP launcher re-runs the launching script for rank 1, so launch from a script.
    script = tmp_path / "launch.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            from medct.lightning_cli import run_lightning
            run_lightning(sys.argv[1:])
            """
        )
    )
    args = [
        "fit",
        "--config",
        str(tiny),
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.accelerator=cpu",
        "--trainer.precision=32-true",
        "--trainer.max_epochs=1",
        "--trainer.limit_val_batches=1",
        "--trainer.check_val_every_n_epoch=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path / 'runs'}",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed_backend=gloo" in proc.stderr + proc.stdout
    assert "All distributed processes registered" in proc.stderr + proc.stdout
    ckpts = list((tmp_path / "runs").rglob("last.ckpt"))
    assert len(ckpts) == 1  # written once, by rank 0
    ckpt = torch.load(ckpts[0], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 1  # 2 training cases, one per rank: 1 step (a single process takes 2)
    # validation ran under DDP (Dice gathered over ranks) and fed the checkpoint monitor
    states = [v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert states and states[0]["monitor"] == "val/dice_mean" and states[0]["best_model_score"] is not None


def test_user_errors_surface_as_one_sentence(tmp_path):
    """jsonargparse wraps errors raised while instantiating; run_lightning re-raises the MedCTError."""
    from medct.errors import InputPathError

    config = ROOT / "configs" / "finetune" / "seg_folder.yaml"
    with pytest.raises(InputPathError, match="^Give exactly one of data.data_dir"):
        run_lightning(["fit", "--config", str(config)])
    with pytest.raises(InputPathError, match="does not exist"):
        run_lightning(["fit", "--config", str(config), f"--data.init_args.data_dir={tmp_path / 'none'}"])
