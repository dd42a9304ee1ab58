"""Text-to-CT benchmark: VAE reconstruction, CLIP retrieval, controllability, FID and generation time.

Everything trains here, on CPU, with medct's own tasks (VAETask, CLIPTask, LDMTask through Lightning)
on a phantom text corpus: `write_cohort(phase="mixed", varied_reports=True)` at 4 mm, 96x96x48
voxels centred on the upper abdomen, reports in varied wording. A held-out cohort (another seed)
gives the prompts and the real volumes to compare with. Cached under ~/.cache/medct/text2ct/.

  * VAE: PSNR / SSIM of whole-volume and tiled (64x64x32 tiles) reconstructions of the held-out
    phantoms and of the real planning CT (../shared/data/pancreas_ct_cbct/planct.nii.gz at 4 mm).
  * CLIP: retrieval R@1 / R@5 both ways on the held-out (volume, report) pairs.
  * controllability: each held-out report generates a volume (30 RFlow steps, guidance 5; the
    diffusion UNet cross-attends over the CLIP text tokens, `context: tokens`); a phantom-trained
    medct segmenter (organs) and a binary one (lesions) measure it, and each attribute the report
    states is checked: contrast phase (nearest centroid of aorta/liver HU, fitted on the training
    volumes), liver size bin (small / normal / enlarged by segmented volume), spleen (normal /
    enlarged), lesion present / absent (a segmented lesion >= 8 mm), lesion site (organ and side of
    a stated lesion found).
    The same measure on: the real held-out volumes (the ceiling: how well the measure itself reads
    the truth), unconditional samples (null context), and shuffled prompts (each conditional
    sample checked against another report). Three sampling seeds (mean +- sd); the models are
    trained once (one training seed: the CPU budget).
  * FID (Heusel et al., 2017) on features of a fixed medct encoder (the segmenter's): 3D = the
    deepest stage averaged over the volume; 2.5D = stage-2 features averaged per slice along each
    axis (axial / coronal / sagittal); generated vs held-out real, and train-real vs held-out real
    as the floor at this sample size.
  * time per generated 128x128x64 volume on CPU (30 steps, guidance 5).

Goal (issue 11): controllability >= 80% and clearly above unconditional and shuffled.

    python bench/text2ct.py [--quick] [--fresh] [--clip-steps N] [--ldm-steps N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, DATA, ROOT, all_met, mean_sd, paired_goal, quiet_lightning, quiet_trainer, write_result  # noqa: E402

from medct.settings import Sampling, Split
from medct.transforms import Preprocessing

OUT = ROOT / "bench" / "results" / "text2ct.json"
PLANCT = DATA / "pancreas_ct_cbct" / "planct.nii.gz"
LIVER_SPLIT_X = 16.0  # world x of the right/left lobe plane (the phantom's liver_right centre - 50 mm)
MIN_LESION_MM = 8.0  # a measured lesion counts from this equivalent diameter (stated ones are >= 10 mm)
ATTRIBUTES = ("phase", "liver_size", "spleen", "lesion", "site")


def _setting(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "spacing": [8.0, 8.0, 8.0], "size": [48, 48, 32], "vae_patch": [32, 32, 32], "n_train": 12, "n_test": 6,
            "seg_steps": 20, "lesion_steps": 10, "n_lesion": 6, "vae_steps": 10, "clip_steps": 10, "ldm_steps": 10,
            "ldm_context": "tokens", "gen_steps": 4, "seeds": [0],
            "vae_channels": [8, 16, 16], "unet_channels": [16, 32, 32], "time_size": [64, 64, 32],
        }  # fmt: skip
    return {
        "spacing": [4.0, 4.0, 4.0], "size": [96, 96, 48], "vae_patch": [64, 64, 32], "n_train": 100, "n_test": 24,
        "seg_steps": 500, "lesion_steps": 600, "n_lesion": 60, "vae_steps": 700, "clip_steps": 300, "ldm_steps": 1200,
        "ldm_context": "tokens", "gen_steps": 30, "seeds": [0, 1, 2],
        "vae_channels": [16, 32, 64], "unet_channels": [32, 64, 64], "time_size": [128, 128, 64],
    }  # fmt: skip


def _trainer(steps: int, val: bool = False) -> Any:
    return quiet_trainer(steps, validate=val)


def _data(work: Path, s: dict[str, Any], patch: list[int], batch: int, samples: int = 1) -> Any:
    from medct.data import PhantomCohort
    from medct.synthesis.text_data import TextCTDataModule

    cohort = PhantomCohort(
        n=s["n_train"], seed=0, shape=tuple(s["size"]), spacing=tuple(s["spacing"]), phase="mixed",
        varied_reports=True, center_mm=(0.0, 0.0, -40.0),
    )  # fmt: skip
    dm = TextCTDataModule(data_dir=str(work / "train"), phantom=cohort, size=tuple(s["size"]), num_workers=2, cache_dir=str(work / "cache"), preprocessing=Preprocessing(spacing=tuple(s["spacing"])), sampling=Sampling(patch_size=tuple(patch), batch_size=batch, num_samples=samples), split=Split(val_fraction=0.1, seed=0))  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _test_cohort(work: Path, s: dict[str, Any]) -> list[dict[str, Any]]:
    from medct.phantom import write_cohort

    folder = work / "test"
    if not (folder / "dataset.json").is_file():
        write_cohort(folder, n=s["n_test"], seed=1, shape=tuple(s["size"]), spacing=tuple(s["spacing"]),
                     phase="mixed", varied_reports=True, center_mm=(0.0, 0.0, -40.0))  # fmt: skip
    entries = json.loads((folder / "dataset.json").read_text())["training"]
    for e in entries:
        e["image"], e["label"] = str(folder / e["image"]), str(folder / e["label"])
    return entries


# ----------------------------------------------------------------------------- training (cached)


def _fit_segmenter(
    data_dir: Path, s: dict[str, Any], patch: list[int], steps: int, out: Path, samples: int = 1, pos: float = 1.0
) -> Path:
    """Train a resenc_unet segmenter on the MSD folder `data_dir` (crops `patch`, pos : 1 foreground
    sampling) and export it to `out`."""
    import lightning.pytorch as pl

    from medct.checkpoint import save_model_folder
    from medct.data import SegmentationDataModule
    from medct.finetune.segmentation import SegmentationTask
    from medct.nets import create_net

    pl.seed_everything(0, verbose=False)
    dm = SegmentationDataModule(data_dir=str(data_dir), num_workers=2, preprocessing=Preprocessing(spacing=tuple(s["spacing"])), sampling=Sampling(patch_size=patch, batch_size=2, num_samples=samples, pos=pos, neg=1.0), split=Split(val_fraction=0.1, seed=0))  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    net = create_net("resenc_unet", filters=[16, 32, 64, 128], out_channels=dm.num_classes)
    task = SegmentationTask(
        net,
        labels=dm.labels,
        patch_size=patch,
        lr=3e-3,
        preprocessing=Preprocessing(spacing=s["spacing"], modality="CT"),
    )
    _trainer(steps).fit(task, datamodule=dm)
    return save_model_folder(task.net, task.model_card(), out)


def _segmenter(work: Path, s: dict[str, Any]) -> Path:
    out = work / "segmenter"
    if (out / "medct.json").is_file():
        return out
    _data(work, s, s["size"], 1)  # writes the training cohort
    return _fit_segmenter(work / "train", s, [min(64, v) for v in s["size"]], s["seg_steps"], out)


def _lesion_segmenter(work: Path, s: dict[str, Any]) -> Path:
    """A binary lesion segmenter (background / lesion) for the lesion checks: the multi-organ
    segmenter, with a lesion among 12 classes and 500 steps, finds no lesions at all (its held-out
    lesion check was 'absent' for every case). Trained on a lesion-rich cohort (1-3 lesions per
    case, another seed) with lesion-centred crops (pos 3 : neg 1).

    It does not read lesions either: on the 24 real held-out phantoms it marks a lesion in every
    volume (the 'present' base rate, 0.458), so lesion and site carry no signal in any arm. Also
    tried, on the same cohort, none better: whole volumes (batch 1, 400 steps) and 64x64x48 crops
    (pos 1 : neg 1, 400 steps), both with the organ segmenter's encoder, found no lesion anywhere;
    the same crops at 1200 steps marked one in every volume, nearly always in the right liver. At
    4 mm the phantom lesions (10-32 mm, a median -10 to -35 HU from their organ, 12 HU noise; read
    by hand with the organ masks, not by this script) lie within the organ's own spread (about
    +-40 HU from vessels and partial volume), which a
    segmenter trained within this CPU budget does not separate."""
    out = work / f"lesion_segmenter_steps{s['lesion_steps']}"
    if (out / "medct.json").is_file():
        return out

    from medct.io import read_volume, write_volume
    from medct.phantom import LABEL_IDS, write_cohort
    from medct.volume import Volume

    folder = work / "lesion_train"
    if not (folder / "dataset.json").is_file():
        tmp = work / "lesion_train_full"
        write_cohort(tmp, n=s["n_lesion"], seed=3, shape=tuple(s["size"]), spacing=tuple(s["spacing"]), phase="mixed",
                     lesions=True, center_mm=(0.0, 0.0, -40.0))  # fmt: skip
        meta = json.loads((tmp / "dataset.json").read_text())
        (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
        for e in meta["training"]:
            lab = read_volume(tmp / e["label"])
            binary = (np.asarray(lab.array) == LABEL_IDS["lesion"]).astype(np.uint8)
            write_volume(Volume(binary, lab.affine, {}), folder / e["label"])
            e["image"] = str((tmp / e["image"]).resolve())
            e["label"] = str((folder / e["label"]).resolve())
        meta["labels"] = {"0": "background", "1": "lesion"}
        (folder / "dataset.json").write_text(json.dumps(meta))
    patch = [min(48, v) for v in s["size"]]  # lesion-centred crops (pos 3 : neg 1), two per volume
    return _fit_segmenter(folder, s, patch, s["lesion_steps"], out, samples=2, pos=3.0)


def _vae(work: Path, s: dict[str, Any], segmenter: Path) -> Path:
    out = work / "vae"
    if (out / "medct.json").is_file():
        return out
    import lightning.pytorch as pl

    from medct.checkpoint import save_model_folder
    from medct.nets import create_net
    from medct.synthesis.vae import VAETask

    pl.seed_everything(0, verbose=False)
    dm = _data(work, s, s["vae_patch"], batch=2, samples=1)
    net = create_net("kl_autoencoder", channels=s["vae_channels"], latent_channels=4, norm_num_groups=8)
    task = VAETask(net, patch_size=s["vae_patch"], lr=5e-4, l1_weight=1.0, perceptual_weight=0.1, perceptual_model=str(segmenter), perceptual_layers=(0, 1), kl_weight=1e-6, preprocessing=Preprocessing(spacing=s["spacing"]))  # fmt: skip
    _trainer(s["vae_steps"]).fit(task, datamodule=dm)
    _trainer(1, val=True).validate(task, datamodule=dm, verbose=False)  # measures the latent scale factor
    return save_model_folder(task.net, task.model_card(), out)


def _clip(work: Path, s: dict[str, Any], segmenter: Path) -> Path:
    out = work / ("clip" if s["clip_steps"] == 200 else f"clip_steps{s['clip_steps']}")  # 200: the first run's
    if (out / "medct.json").is_file():
        return out
    import lightning.pytorch as pl

    from medct.checkpoint import save_model_folder
    from medct.nets import create_net
    from medct.synthesis.clip3d import TOKENIZER_FILE, CLIPTask

    pl.seed_everything(0, verbose=False)
    dm = _data(work, s, s["size"], batch=8)
    net = create_net(
        "clip3d", image_net="resenc_unet", image_args={"filters": [16, 32, 64, 128]}, vocab_size=512, max_length=160,
        width=96, layers=3, heads=4, embed_dim=96,
    )  # fmt: skip
    task = CLIPTask(
        net, patch_size=s["size"], lr=5e-4, weight_decay=0.05, preprocessing=Preprocessing(spacing=s["spacing"])
    )
    _init_image_encoder(net, segmenter)  # the medct encoder transfers: the segmenter's
    _trainer(s["clip_steps"]).fit(task, datamodule=dm)
    return save_model_folder(task.net, task.model_card(), out, files={TOKENIZER_FILE: task.tokenizer.to_str()})


def _init_image_encoder(net: Any, segmenter: Path) -> None:
    from medct.checkpoint import load_model_folder
    from medct.nets import encoder_state_dict

    seg, _card = load_model_folder(segmenter)
    missing = net.image.load_state_dict(encoder_state_dict(seg), strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys


def _ldm(work: Path, s: dict[str, Any], vae: Path, clip: Path) -> Path:
    out = work / f"text2ct_{s['ldm_context']}_steps{s['ldm_steps']}_{clip.name}"
    if (out / "medct.json").is_file():
        return out
    import lightning.pytorch as pl
    import torch

    from medct.checkpoint import export_lightning_checkpoint
    from medct.nets import create_net
    from medct.synthesis.diffusion import LDMTask

    pl.seed_everything(0, verbose=False)
    dm = _data(work, s, s["size"], batch=8)
    clip_dim = json.loads((clip / "medct.json").read_text())["outputs"]["embed_dim"]
    net = create_net(
        "latent_diffusion_unet", channels=s["unet_channels"], attention_levels=[False, True, True], num_res_blocks=1,
        norm_num_groups=16, num_head_channels=16, cross_attention_dim=clip_dim,
    )  # fmt: skip
    task = LDMTask(net, str(vae), str(clip), patch_size=s["size"], lr=5e-4, cond_drop=0.1, context=s["ldm_context"], steps=30, guidance=5.0, preprocessing=Preprocessing(spacing=s["spacing"]))  # fmt: skip
    trainer = _trainer(s["ldm_steps"])
    trainer.fit(task, datamodule=dm)
    ckpt = work / f"{out.name}.ckpt"
    trainer.save_checkpoint(ckpt)  # what `medct fit` leaves; exported as a user would
    torch.load(ckpt, map_location="cpu", weights_only=True)  # loadable safely
    return export_lightning_checkpoint(ckpt, out)


# ----------------------------------------------------------------------------- measurement


class Meter:
    """Reads the attributes a report states from a volume, with the phantom-trained segmenters:
    organs from the multi-organ one, lesions from the binary lesion one (their host organ and side
    from the organs around them)."""

    def __init__(self, segmenter: Path, lesion_segmenter: Path) -> None:
        from medct.inference import Predictor

        self.predictor = Predictor.from_folder(segmenter, device="cpu")
        self.lesion_predictor = Predictor.from_folder(lesion_segmenter, device="cpu")
        self.centroids: dict[str, np.ndarray] = {}

    def segment(self, vol: Any) -> Any:
        """The organ labels with the lesion segmenter's lesions written over them."""
        from medct.phantom import LABEL_IDS
        from medct.volume import Volume

        seg = self.predictor.predict(vol)
        lesion = np.asarray(self.lesion_predictor.predict(vol).array) == 1
        lab = np.asarray(seg.array).copy()
        lab[lab == LABEL_IDS["lesion"]] = 0
        lab[lesion] = LABEL_IDS["lesion"]
        return Volume(lab, seg.affine, dict(seg.meta))

    def hu_features(self, vol: Any, seg: Any) -> np.ndarray:
        """Median HU in the aorta and in the liver (NaN where the segmenter finds none)."""
        from medct.phantom import LABEL_IDS

        img, lab = np.asarray(vol.array, np.float32), np.asarray(seg.array)
        out = []
        for organ in ("aorta", "liver"):
            m = lab == LABEL_IDS[organ]
            out.append(float(np.median(img[m])) if m.sum() >= 5 else float("nan"))
        return np.array(out)

    def fit_phase(self, items: list[tuple[Any, str]]) -> None:
        """Nearest-centroid contrast phase, fitted on (volume, true phase) of training volumes."""
        feats: dict[str, list[np.ndarray]] = {}
        for vol, phase in items:
            feats.setdefault(phase, []).append(self.hu_features(vol, self.segment(vol)))
        self.centroids = {p: np.nanmean(np.stack(v), axis=0) for p, v in feats.items()}

    def measure(self, vol: Any) -> dict[str, Any]:
        from medct.phantom.reports import findings

        seg = self.segment(vol)
        f = findings(seg, None, liver_split_x=LIVER_SPLIT_X)
        h = self.hu_features(vol, seg)
        if np.all(np.isfinite(h)) and self.centroids:
            phase = min(self.centroids, key=lambda p: float(np.linalg.norm(h - self.centroids[p])))
        else:
            phase = "unknown"
        lesions = [site for d, _w, site in f.lesions if d >= MIN_LESION_MM]
        return {
            "phase": phase,
            "liver_size": f.liver_size,
            "spleen": "enlarged" if f.spleen_enlarged else "normal",
            "lesion": "present" if lesions else "absent",
            "sites": sorted({_site_key(x) for x in lesions}),
        }


def _site_key(site: str) -> str:
    """'the right liver lobe' -> 'liver right', 'the left kidney' -> 'kidney left'."""
    side = "right" if "right" in site else "left" if "left" in site else ""
    organ = "liver" if "liver" in site else "kidney" if "kidney" in site else site
    return f"{organ} {side}".strip()


def stated(entry: dict[str, Any]) -> dict[str, Any]:
    """What a held-out report states (the dataset entry's attributes, computed from its label map)."""
    sites = [x for x in entry["lesion_sites"].split("; ") if x]
    return {
        "phase": entry["phase"],
        "liver_size": entry["liver_size"],
        "spleen": entry["spleen"],
        "lesion": "present" if sites else "absent",
        "sites": sorted({_site_key(x) for x in sites}),
    }


def checks(truth: dict[str, Any], got: dict[str, Any]) -> dict[str, bool]:
    """Per attribute, whether the measured volume shows what the report states (site: only when a
    lesion is stated; a stated lesion's organ and side among the measured ones)."""
    out = {k: truth[k] == got[k] for k in ("phase", "liver_size", "spleen", "lesion")}
    if truth["sites"]:
        out["site"] = bool(set(truth["sites"]) & set(got["sites"]))
    return out


def score(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, float]:
    """Pooled controllability (all checks) and the rate per attribute."""
    per: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    for truth, got in pairs:
        for k, v in checks(truth, got).items():
            per[k].append(v)
    pooled = [v for vs in per.values() for v in vs]
    out = {"controllability": float(np.mean(pooled)) if pooled else float("nan")}
    out.update({a: float(np.mean(v)) if v else float("nan") for a, v in per.items()})
    return out


# ----------------------------------------------------------------------------- VAE, CLIP, FID


def _unit(vol: Any, pre: Any) -> Any:
    import torch

    x = (np.asarray(vol.array, np.float32) - pre.hu_min) / (pre.hu_max - pre.hu_min)
    return torch.from_numpy(np.clip(x, 0.0, 1.0))[None, None]


def _recon_scores(vae: Any, x: Any, tile: list[int]) -> dict[str, float]:
    import torch
    from monai.metrics import SSIMMetric

    from medct.synthesis.vae import decode, encode, psnr

    ssim = SSIMMetric(spatial_dims=3, data_range=1.0)
    out = {}
    with torch.no_grad():
        for name, t in (("whole", None), ("tiled", tile)):
            mu, _ = encode(vae, x, t)
            r = decode(vae, mu, t).clamp(0, 1)
            out[f"psnr_{name}"] = float(psnr(r, x))
            out[f"ssim_{name}"] = float(ssim(r, x).mean())
    return out


def _vae_eval(vae_dir: Path, test: list[dict[str, Any]], s: dict[str, Any]) -> dict[str, Any]:
    from medct.checkpoint import load_model_folder
    from medct.geometry import network_grid, resample_volume
    from medct.io import read_volume

    vae, card = load_model_folder(vae_dir)
    pre, tile = card.preprocessing, list(card.inference["tile"])
    rows = [_recon_scores(vae, _unit(read_volume(e["image"]), pre), tile) for e in test]
    res: dict[str, Any] = {
        "phantom": {k: mean_sd([r[k] for r in rows]) for k in rows[0]},
        "scale_factor": card.inference["scale_factor"],
        "tile": tile,
    }
    if PLANCT.is_file():
        ct = read_volume(PLANCT)
        grid = network_grid(ct.affine, ct.shape, pre.spacing)
        f = int(vae.downsample)
        shape = [max(f, (n // f) * f) for n in grid.shape]
        from medct.geometry import Grid

        vol = resample_volume(ct, Grid(tuple(shape), grid.affine), "linear", padding=-1000.0)  # type: ignore[arg-type]
        res["real_planct"] = {"shape": shape, **_recon_scores(vae, _unit(vol, pre), tile)}
    return res


def _clip_eval(clip_dir: Path, test: list[dict[str, Any]]) -> dict[str, float]:
    import torch

    from medct.checkpoint import load_model_folder
    from medct.io import read_volume
    from medct.synthesis.clip3d import load_tokenizer, retrieval_recall, tokenize

    net, card = load_model_folder(clip_dir)
    tok = load_tokenizer((clip_dir / "tokenizer.json").read_text())
    with torch.no_grad():
        img = torch.cat([net.encode_image(_unit(read_volume(e["image"]), card.preprocessing)) for e in test])
        txt = net.encode_text(tokenize(tok, [e["text"] for e in test], net.max_length))[0]
    return {**retrieval_recall(img, txt), "n": len(test), "chance_r1": 1.0 / len(test)}


def _features(seg_net: Any, vol: Any, pre: Any) -> dict[str, np.ndarray]:
    """3D: the deepest encoder stage averaged over the volume (1, C); 2.5D per axis: stage-2
    features averaged over the other two axes (one vector per slice, (n_slices, C))."""
    import torch

    with torch.no_grad():
        feats = seg_net.encoder_features(_unit(vol, pre))
    deep, mid = feats[-1][0], feats[2][0]  # (C, x, y, z)
    return {
        "3d": deep.flatten(1).mean(1)[None].numpy(),
        "axial": mid.mean((1, 2)).T.numpy(),
        "coronal": mid.mean((1, 3)).T.numpy(),
        "sagittal": mid.mean((2, 3)).T.numpy(),
    }


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets a (n, C) and b (m, C)."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(c1 @ c2, disp=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2.0 * np.real(root)))


def _fid_all(seg_net: Any, pre: Any, a: list[Any], b: list[Any]) -> dict[str, float]:
    fa = [_features(seg_net, v, pre) for v in a]
    fb = [_features(seg_net, v, pre) for v in b]
    out = {}
    for k in ("3d", "axial", "coronal", "sagittal"):
        out[k] = fid(np.concatenate([f[k] for f in fa]), np.concatenate([f[k] for f in fb]))
    out["2.5d"] = float(np.mean([out["axial"], out["coronal"], out["sagittal"]]))
    return out


# ----------------------------------------------------------------------------- main


def run(quick: bool, steps: dict[str, int] | None = None) -> dict[str, Any]:
    import torch

    from medct.checkpoint import load_model_folder
    from medct.io import read_volume
    from medct.synthesis.diffusion import TextToCT

    quiet_lightning()
    torch.set_num_threads(2)
    s = {**_setting(quick), **(steps or {})}
    work = CACHE / ("text2ct_quick" if quick else "text2ct")
    t0 = time.perf_counter()
    segmenter = _segmenter(work, s)
    print(f"segmenter ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    lesion_seg = _lesion_segmenter(work, s)
    print(f"lesion segmenter ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    vae = _vae(work, s, segmenter)
    print(f"VAE ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    clip = _clip(work, s, segmenter)
    print(f"CLIP ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    model = _ldm(work, s, vae, clip)
    print(f"diffusion ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    test = _test_cohort(work, s)
    train = json.loads((work / "train" / "dataset.json").read_text())["training"]

    result: dict[str, Any] = {"setting": s, "vae": _vae_eval(vae, test, s), "clip": _clip_eval(clip, test)}
    print("VAE:", json.dumps(result["vae"]), "\nCLIP:", json.dumps(result["clip"]), flush=True)

    meter = Meter(segmenter, lesion_seg)
    train_vols = [(read_volume(work / "train" / e["image"]), e["phase"]) for e in train[: 30 if not quick else 6]]
    meter.fit_phase(train_vols)
    truths = [stated(e) for e in test]
    real_vols = [read_volume(e["image"]) for e in test]
    real_scores = score([(t, meter.measure(v)) for t, v in zip(truths, real_vols, strict=True)])
    gen = TextToCT.from_folder(model, device="cpu")
    prompts = [e["text"] for e in test]
    rng = np.random.default_rng(0)
    shuffle = rng.permutation(len(test))
    while np.any(shuffle == np.arange(len(test))):  # a derangement: no report checks its own sample
        shuffle = rng.permutation(len(test))
    per_seed: dict[str, list[dict[str, float]]] = {"conditional": [], "unconditional": [], "shuffled": []}
    seconds = []
    first_cond: list[Any] = []
    samples = work / "generated" / model.name
    for seed in s["seeds"]:
        cond = _generated(
            samples / f"conditional_seed{seed}_steps{s['gen_steps']}",
            prompts,
            partial(gen.generate, prompts, seed=1000 * seed, steps=s["gen_steps"], guidance=5.0),
        )
        unc = _generated(
            samples / f"unconditional_seed{seed}_steps{s['gen_steps']}",
            prompts,
            partial(gen.generate, prompts, seed=1000 * seed + 500, steps=s["gen_steps"], unconditional=True),
        )
        seconds += [v.meta["seconds"] for v in cond]
        got_c = [meter.measure(v) for v in cond]
        got_u = [meter.measure(v) for v in unc]
        per_seed["conditional"].append(score(list(zip(truths, got_c, strict=True))))
        per_seed["unconditional"].append(score(list(zip(truths, got_u, strict=True))))
        per_seed["shuffled"].append(score([(truths[i], got_c[j]) for i, j in enumerate(shuffle)]))
        print(
            f"seed {seed}: " + ", ".join(f"{k} {v[-1]['controllability']:.3f}" for k, v in per_seed.items()), flush=True
        )
        if not first_cond:
            first_cond = cond
            _save_examples(work, cond[:4])
    control = {arm: {k: mean_sd([r[k] for r in rows]) for k in rows[0]} for arm, rows in per_seed.items()}
    control["real_heldout"] = {k: (v, 0.0) for k, v in real_scores.items()}
    result["controllability"] = control
    result["controllability_per_seed"] = per_seed
    result["generation_seconds_96x96x48"] = mean_sd(seconds)

    seg_net, seg_card = load_model_folder(segmenter)
    pre = gen.card.preprocessing
    train_real = [v for v, _p in train_vols[: len(test)]]
    result["fid"] = {
        "generated_vs_heldout": _fid_all(seg_net, pre, first_cond, real_vols),
        "train_vs_heldout_real": _fid_all(seg_net, pre, train_real, real_vols),
        "n": len(test),
        "feature_network": "the phantom segmenter's encoder (resenc_unet [16, 32, 64, 128])",
    }
    times = []
    for k in range(1 if quick else 2):
        v = gen.generate([prompts[0]], seed=7 + k, size=s["time_size"], steps=30, guidance=5.0)[0]
        times.append(v.meta["seconds"])
    result["cpu_seconds_per_volume"] = {"size": s["time_size"], "steps": 30, "guidance": 5.0, "seconds": mean_sd(times),
                                        "threads": torch.get_num_threads()}  # fmt: skip
    result["total_minutes"] = (time.perf_counter() - t0) / 60.0
    return result


def _generated(folder: Path, prompts: list[str], make: Callable[[], list[Any]]) -> list[Any]:
    """The volumes `make()` generates for `prompts`, kept in `folder` (NIfTI + samples.json): a
    change to the meter re-measures the same samples instead of generating them again (~30 min on
    2 cores). Their `seconds` are those measured when they were generated. A folder made for other
    prompts is generated again."""
    from medct.io import read_volume, write_volume

    index = folder / "samples.json"
    meta = json.loads(index.read_text()) if index.is_file() else []
    if index.is_file() and [m["text"] for m in meta] == prompts:
        vols = [read_volume(folder / f"{i}.nii.gz") for i in range(len(meta))]
        for v, m in zip(vols, meta, strict=True):
            v.meta.update(m)
        return vols
    vols = make()
    folder.mkdir(parents=True, exist_ok=True)
    for i, v in enumerate(vols):
        write_volume(v, folder / f"{i}.nii.gz")
    keep = [{k: v.meta[k] for k in ("text", "seed", "seconds")} for v in vols]
    tmp = index.with_suffix(".tmp")
    tmp.write_text(json.dumps(keep))
    tmp.replace(index)  # written last: a folder without it is regenerated
    return vols


def _save_examples(work: Path, vols: list[Any]) -> None:
    from medct.preview import save_montage

    folder = work / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    for i, v in enumerate(vols):
        save_montage(v, folder / f"gen_{i}.png", title=v.meta["text"])


def judge(result: dict[str, Any]) -> dict[str, Any]:
    """The goal (`_common.paired_goal`, paired by sampling seed): conditional controllability >= 0.80,
    and above the unconditional and the shuffled-prompt arms by >= 0.10."""
    per = result["controllability_per_seed"]
    cond, unc, shuf = ([r["controllability"] for r in per[k]] for k in ("conditional", "unconditional", "shuffled"))
    checks = {
        "at_least_0.80": paired_goal("controllability >= 0.80", cond, 0.8),
        "above_unconditional": paired_goal("above unconditional by >= 0.10", cond, unc, margin=0.1),
        "above_shuffled": paired_goal("above shuffled by >= 0.10", cond, shuf, margin=0.1),
    }
    c = result["controllability"]
    return {
        "target": "controllability >= 0.80 and clearly above unconditional and shuffled (by >= 0.10)",
        "controllability": c["conditional"]["controllability"][0],
        "unconditional": c["unconditional"]["controllability"][0],
        "shuffled": c["shuffled"]["controllability"][0],
        "checks": checks,
        "met": all_met(list(checks.values())),
    }


def _print(result: dict[str, Any]) -> None:
    c = result["controllability"]
    print("\ncontrollability (mean +- sd over sampling seeds)")
    print(f"{'arm':<15}" + "".join(f"{a:>18}" for a in ("controllability", *ATTRIBUTES)))
    for arm in ("real_heldout", "conditional", "unconditional", "shuffled"):
        row = c[arm]
        print(
            f"{arm:<15}" + "".join(f"{row[a][0]:>11.3f} +- {row[a][1]:.3f}" for a in ("controllability", *ATTRIBUTES))
        )
    v = result["vae"]
    print("\nVAE phantom:", {k: f"{m:.3f} +- {d:.3f}" for k, (m, d) in v["phantom"].items()})
    if "real_planct" in v:
        print("VAE real planct:", {k: round(x, 3) for k, x in v["real_planct"].items() if k != "shape"})
    print("CLIP:", {k: round(x, 3) for k, x in result["clip"].items()})
    print("FID:", json.dumps(result["fid"], indent=None))
    print("CPU seconds per volume:", result["cpu_seconds_per_volume"])


def _positive(text: str) -> int:
    """argparse type: a whole number >= 1 (one sentence otherwise)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of steps >= 1, got {text!r}")
    return int(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes and steps: checks the script in minutes")
    ap.add_argument("--fresh", action="store_true", help="retrain every model (delete the cache first)")
    ap.add_argument("--clip-steps", type=_positive, help="CLIP training steps (default: the setting's)")
    ap.add_argument("--ldm-steps", type=_positive, help="diffusion training steps (default: the setting's)")
    args = ap.parse_args()
    steps = {k: v for k, v in (("clip_steps", args.clip_steps), ("ldm_steps", args.ldm_steps)) if v is not None}
    if args.fresh:
        shutil.rmtree(CACHE / ("text2ct_quick" if args.quick else "text2ct"), ignore_errors=True)
    result = run(args.quick, steps)
    result["goal"] = judge(result)
    _print(result)
    print(f"\ngoal: {result['goal']}")
    write_result(OUT, "text2ct", result, quick=args.quick)


if __name__ == "__main__":
    main()
