"""Model cards: written by the task, copied by export, read back (format 2 and the old format 1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import medct
from medct.checkpoint import CARD_FILE, FORMAT_VERSION, read_model_card
from medct.errors import ModelFolderError
from medct.inference import Predictor
from medct.volume import Volume

from .conftest import make_model_folder


def _card_json(folder: Path) -> dict:
    return json.loads((folder / CARD_FILE).read_text())


def test_card_round_trip_keeps_inference_settings_and_modality(tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path / "m", modality="CBCT", inference={"overlap": 0.25, "sw_batch_size": 3})
    raw = _card_json(folder)
    assert raw["format_version"] == FORMAT_VERSION == 2
    assert raw["modality"] == "CBCT" and raw["preprocessing"]["modality"] == "CBCT"
    card = read_model_card(folder)
    assert card.modality == "CBCT" and card.inference == {"overlap": 0.25, "sw_batch_size": 3}
    p = medct.load_model(folder, device="cpu")
    assert isinstance(p, Predictor) and (p.overlap, p.sw_batch_size) == (0.25, 3)
    assert Predictor.from_folder(folder, device="cpu", overlap=0.6).overlap == 0.6  # explicit wins


def test_format_1_model_folder_still_loads(tmp_path: Path) -> None:
    """A folder written by medct 0.1 (format 1: no "inference", overlap in "extra" if at all)."""
    folder = make_model_folder(tmp_path / "old")
    raw = _card_json(folder)
    v1 = {k: raw[k] for k in ("task", "net", "labels", "patch_size", "licence", "medct_version")}
    v1.update(format_version=1, preprocessing={k: raw["preprocessing"][k] for k in ("spacing", "hu_min", "hu_max")})
    v1["extra"] = {"source_checkpoint": "last.ckpt", "epoch": 3, "overlap": 0.3}
    (folder / CARD_FILE).write_text(json.dumps(v1))
    card = read_model_card(folder)
    assert card.modality == "CT" and card.inference == {"overlap": 0.3}
    p = medct.load_model(folder, device="cpu")
    assert p.overlap == 0.3 and p.sw_batch_size == 4
    vol = Volume(np.random.default_rng(0).normal(0, 300, (20, 20, 12)).astype(np.float32), np.diag([4, 4, 4, 1.0]))
    assert p.predict(vol).shape == vol.shape


def test_newer_format_and_other_tasks_are_refused_with_one_sentence(tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path / "m")
    raw = _card_json(folder)
    (folder / CARD_FILE).write_text(json.dumps({**raw, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ModelFolderError, match="newer than this medct reads"):
        read_model_card(folder)
    (folder / CARD_FILE).write_text(json.dumps({**raw, "task": "encoder"}))
    with pytest.raises(ModelFolderError, match="holds a pretrained encoder, not a model that predicts"):
        medct.load_model(folder, device="cpu")
    (folder / CARD_FILE).write_text(json.dumps({**raw, "task": "vae"}))
    with pytest.raises(ModelFolderError, match="'vae' model, which has no predictor"):
        medct.load_model(folder, device="cpu")
    (folder / CARD_FILE).write_text(json.dumps({**raw, "task": "encoder"}))
    with pytest.raises(ModelFolderError, match="'encoder' model, not a segmentation model"):
        Predictor.from_folder(folder, device="cpu")


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda c: c["labels"].update({"7": "extra"}), "out_channels"),
        (lambda c: c["preprocessing"].update(spacing=[0.0, 1.5, 1.5]), "preprocessing.spacing"),
        (lambda c: c["preprocessing"].update(hu_min=100.0, hu_max=100.0), "preprocessing.hu_min"),
        (lambda c: c.update(patch_size=[0, 16, 16]), "patch_size"),
        (lambda c: c.update(labels={"1": "a", "2": "b"}), "indexed from 0"),
        (lambda c: c.update(labels={}), "needs labels"),
        (lambda c: c.update(inference={"overlap": 1.5}), "inference.overlap"),
        (lambda c: c.update(inference={"sw_batch_size": 0}), "inference.sw_batch_size"),
        (lambda c: c.update(inference={"keep_largest": ["liver"]}), "inference.keep_largest"),
    ],
)
def test_invalid_cards_are_refused_at_load_naming_the_field(tmp_path: Path, edit, field: str) -> None:  # type: ignore[no-untyped-def]
    folder = make_model_folder(tmp_path / "m")
    raw = _card_json(folder)
    edit(raw)
    (folder / CARD_FILE).write_text(json.dumps(raw))
    with pytest.raises(ModelFolderError, match=field) as info:
        read_model_card(folder)
    assert "\n" not in str(info.value)
