"""Classification fine-tuning: class indices from a datalist field, balanced few-label subsets,
ROC AUC, the linear probe, a few training steps, pretrained encoders."""

from __future__ import annotations

import math

import pytest
import torch

from medct.data import ClassificationDataModule
from medct.errors import ConfigError, InputPathError
from medct.finetune.classification import ClassificationTask, roc_auc
from medct.nets import create_net, encoder_state_dict
from medct.phantom import write_cohort
from medct.settings import Sampling, Split
from medct.transforms import Preprocessing


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cls")
    write_cohort(folder, n=8, seed=3, shape=(32, 32, 32), spacing=(8.0, 8.0, 8.0))
    return folder


def _data(cohort, **kw) -> ClassificationDataModule:
    args = dict(
        class_key="lesion",
        data_dir=str(cohort),
        preprocessing=Preprocessing(spacing=(8.0, 8.0, 8.0)),
        sampling=Sampling(patch_size=(32, 32, 32), batch_size=2),
        split=Split(val_fraction=0.25),
        num_workers=0,
        augment=False,
    )
    return ClassificationDataModule(**{**args, **kw})


def _net(classes: int = 2):
    return create_net(
        "encoder_classifier", backbone="resenc_unet", backbone_args={"filters": [4, 8, 16]}, out_channels=classes
    )


def test_classes_come_from_the_class_key(cohort):
    dm = _data(cohort)
    dm.setup()
    assert dm.labels == ["absent", "present"] and dm.num_classes == 2
    for x in dm.train_items + dm.val_items:
        assert x["class"] == dm.labels.index(x["lesion"])
    item = dm._dataset(dm.train_items[:1], "train")[0]
    assert item["image"].shape == (1, 32, 32, 32) and int(item["class"]) in (0, 1)
    with pytest.raises(InputPathError, match="no 'grade' field"):
        _data(cohort, class_key="grade").setup()
    with pytest.raises(ConfigError, match="does not name the classes"):
        _data(cohort, classes=["absent"]).setup()


def test_few_label_subset_is_balanced(cohort):
    dm = _data(cohort, split=Split(num_train=2, val_fraction=0.25))
    dm.setup()
    assert len(dm.train_items) == 2
    if {x["lesion"] for x in _data(cohort)._split()[0]} == {"absent", "present"}:
        assert {x["lesion"] for x in dm.train_items} == {"absent", "present"}
    with pytest.raises(ConfigError, match="num_train"):
        _data(cohort, split=Split(num_train=50, val_fraction=0.25)).setup()


def test_roc_auc():
    scores = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.35, 0.65], [0.2, 0.8]])
    assert roc_auc(scores, torch.tensor([0, 0, 1, 1]), 2) == pytest.approx(1.0)
    assert roc_auc(scores, torch.tensor([0, 1, 0, 1]), 2) == pytest.approx(0.75)
    assert math.isnan(roc_auc(scores, torch.tensor([1, 1, 1, 1]), 2))


def test_training_steps_lower_the_loss():
    torch.manual_seed(0)
    task = ClassificationTask(_net(), labels=["a", "b"], patch_size=(32, 32, 32))
    x = torch.rand(4, 1, 32, 32, 32) * 0.2
    x[2:, :, 4:12, 4:12, 4:12] = 1.0  # class 1 holds a bright cube (instance norms ignore global offsets)
    y = torch.tensor([0, 0, 1, 1])
    opt = torch.optim.AdamW(task.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = torch.nn.functional.cross_entropy(task(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.75 * losses[0]


def test_linear_probe_trains_the_head_only(tmp_path):
    from medct.nets import save_encoder

    torch.manual_seed(0)
    plain = create_net("resenc_unet", filters=[4, 8, 16])
    enc = save_encoder(plain, tmp_path / "enc.safetensors")
    task = ClassificationTask(
        _net(), labels=["a", "b"], patch_size=(32, 32, 32), pretrained_encoder=str(enc), freeze_encoder=True
    )
    before = {k: v.clone() for k, v in encoder_state_dict(task.net).items()}
    for k, v in encoder_state_dict(plain).items():
        assert torch.equal(before["backbone." + k], v)  # the plain backbone's encoder, under backbone.
    trainable = [n for n, p in task.net.named_parameters() if p.requires_grad]
    assert trainable == ["head.weight", "head.bias"]
    with pytest.raises(ConfigError, match="3 outputs but there are 2"):
        ClassificationTask(_net(3), labels=["a", "b"])
