"""medct.precision: the policy per device, its refusals, the fp32 loss path, and the predictor's
bf16 check with its fp32 fallback."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from torch import nn

from medct import precision
from medct.card import ModelCard
from medct.checkpoint import save_model_folder
from medct.errors import ConfigError, PrecisionUnavailableError
from medct.inference import Predictor, label_agreement
from medct.io import write_volume
from medct.transforms import Preprocessing
from medct.volume import Volume

CPU = torch.device("cpu")


@pytest.fixture
def cpu_bf16(monkeypatch: pytest.MonkeyPatch):
    """Pretend this CPU has (True) or lacks (False) native bf16; autocast itself runs either way."""

    def set_(value: bool) -> None:
        monkeypatch.setattr(precision, "cpu_has_bf16", lambda: value)

    return set_


def test_auto_is_bf16_exactly_where_the_device_has_it(cpu_bf16) -> None:
    cpu_bf16(True)
    assert precision.resolve_precision("auto", CPU) == precision.resolve_precision(None, CPU) == "bf16"
    assert precision.resolve_precision("fp32", CPU) == "fp32"
    assert precision.lightning_precision("auto", "cpu") == "bf16-mixed"
    assert precision.lightning_precision("fp32", "cpu") == "32-true"
    cpu_bf16(False)
    assert precision.resolve_precision("auto", CPU) == "fp32"
    assert precision.lightning_precision("auto", "cpu") == "32-true"
    # MPS and others: not measured, so fp32, and bf16 there is refused
    assert precision.resolve_precision("auto", torch.device("mps")) == "fp32"
    with pytest.raises(PrecisionUnavailableError, match="mps has no bf16"):
        precision.resolve_precision("bf16", torch.device("mps"))


def test_families_measured_slower_in_bf16_on_cpu_stay_fp32_under_auto(cpu_bf16) -> None:
    from medct.pretrain.bm_mae import BMMAETask
    from medct.synthesis.motion import MotionPredictor
    from medct.synthesis.motion.task import MotionTask

    cpu_bf16(True)
    assert BMMAETask.bf16_cpu is False and MotionTask.bf16_cpu is False
    assert precision.resolve_precision("auto", CPU, bf16_cpu=False) == "fp32"
    assert precision.resolve_precision("bf16", CPU, bf16_cpu=False) == "bf16"  # asked for: honoured
    assert precision.lightning_precision("auto", "cpu", bf16_cpu=False) == "32-true"
    assert MotionPredictor(None, None, "cpu").precision == "fp32"
    assert MotionPredictor(None, None, "cpu", precision="bf16").precision == "bf16"


def test_bf16_without_bf16_is_one_sentence_not_a_silent_fp32_run(cpu_bf16) -> None:
    cpu_bf16(False)
    with pytest.raises(PrecisionUnavailableError, match="neither AMX-BF16 nor AVX-512 BF16"):
        precision.resolve_precision("bf16", CPU)
    with pytest.raises(ConfigError, match="precision must be one of auto, bf16, fp32"):
        precision.resolve_precision("fp16", CPU)


def test_cpu_detection_reads_the_cpu_flags() -> None:
    flags = open("/proc/cpuinfo").read() if __import__("sys").platform.startswith("linux") else ""
    native = "amx_bf16" in flags or "avx512_bf16" in flags
    assert precision.cpu_has_bf16() == (native and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_segment_with_bf16_on_a_cpu_without_it_exits_2_with_one_sentence(cpu_bf16, tmp_path, capsys) -> None:
    from medct.cli import main

    cpu_bf16(False)
    folder = _model_folder(tmp_path)
    image = tmp_path / "ct.nii.gz"
    write_volume(_volume(), image)
    code = main(["segment", "-m", str(folder), "-i", str(image), "-o", str(tmp_path / "out"), "--precision", "bf16"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("medct: error: --precision bf16 was asked for") and "\n" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_lightning_runs_at_the_policys_precision_unless_the_trainer_names_one(cpu_bf16, tmp_path) -> None:
    from medct.lightning_cli import MedCTCLI

    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(
        f"""
trainer: {{accelerator: cpu, devices: 1, logger: false, enable_checkpointing: false, default_root_dir: {tmp_path}}}
model:
  class_path: medct.finetune.segmentation.SegmentationTask
  init_args:
    net: {{class_path: medct.nets.ResEncUNet, init_args: {{filters: [4, 8, 16]}}}}
data:
  class_path: medct.data.SegmentationDataModule
  init_args: {{data_dir: {tmp_path / "phantom"}, phantom: {{n: 2, shape: [16, 16, 16]}}, sampling: {{patch_size: [16, 16, 16]}}}}
"""
    )

    def chosen(*args: str) -> str:
        return str(MedCTCLI(["--config", str(cfg), *args], run=False).trainer.precision)

    cpu_bf16(True)
    assert chosen() == "bf16-mixed"
    assert chosen("--precision", "fp32") == "32-true"
    assert chosen("--trainer.precision", "32-true") == "32-true"  # Lightning's own setting wins
    cpu_bf16(False)
    assert chosen() == "32-true"
    with pytest.raises(PrecisionUnavailableError):
        chosen("--precision", "bf16")


# ----------------------------------------------------------------------------- the fp32 loss path


def _losses() -> dict[str, tuple]:
    from medct.finetune.tta import entropy_map, soft_cross_entropy
    from medct.pretrain.contrastive import nt_xent
    from medct.registration.impact import impact_distance
    from medct.synthesis.clip3d import clip_loss
    from medct.synthesis.vae import kl_divergence

    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).bfloat16()

    probs = torch.softmax(torch.randn(2, 3, 4, 4, 4, generator=g), 1)
    return {
        "nt_xent": (nt_xent, (r(4, 8), r(4, 8), 0.1)),
        "clip_loss": (clip_loss, (r(4, 8), r(4, 8), torch.tensor(2.0))),
        "kl_divergence": (kl_divergence, (r(2, 3, 4, 4, 4), r(2, 3, 4, 4, 4).abs() + 0.5)),
        "impact_distance": (impact_distance, ([r(1, 4, 4, 4, 4)], [r(1, 4, 4, 4, 4)])),
        "entropy_map": (entropy_map, (r(2, 3, 4, 4, 4),)),
        "soft_cross_entropy": (soft_cross_entropy, (r(2, 3, 4, 4, 4), probs)),
    }


@pytest.mark.parametrize("name", list(_losses()))
def test_losses_are_float32_under_bf16_autocast(name: str) -> None:
    fn, args = _losses()[name]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = fn(*args)
    upcast = [[a.float() for a in x] if isinstance(x, list) else x.float() if torch.is_tensor(x) else x for x in args]
    reference = fn.__wrapped__(*upcast)  # the undecorated loss on float32 inputs, no autocast
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, reference, rtol=0, atol=0)


def test_segmentation_loss_is_float32_on_bf16_logits() -> None:
    from medct.finetune.segmentation import SegmentationTask
    from medct.nets import create_net

    task = SegmentationTask(
        net=create_net("resenc_unet", in_channels=1, out_channels=3, filters=[4, 8, 16]),
        labels=["background", "a", "b"],
        patch_size=[16, 16, 16],
        preprocessing=Preprocessing(),
    )
    logits = torch.randn(2, 3, 8, 8, 8).bfloat16()
    label = torch.randint(0, 3, (2, 1, 8, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = task.supervised_loss(logits, label)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, task.loss_fn(logits.float(), label), rtol=0, atol=0)


def test_adaptation_in_bf16_keeps_the_teacher_and_optimiser_state_float32() -> None:
    from medct.finetune.tta import TestTimeAdapter, make_method
    from medct.nets import create_net

    torch.manual_seed(0)
    source = create_net("resenc_unet", in_channels=1, out_channels=3, filters=[4, 8, 16])
    for name in ("cotta", "psmt"):
        method = make_method(name)
        adapter = TestTimeAdapter(source, method, (16, 16, 16), steps=2, batch=1, precision="bf16")
        before = [p.clone() for p in method.teacher.parameters()]
        net, report = adapter.adapt(torch.rand(1, 1, 24, 24, 24))
        params = list(method.teacher.parameters()) + list(method.student.parameters())
        assert all(p.dtype == torch.float32 for p in params)
        assert any(not torch.equal(a, b) for a, b in zip(before, method.teacher.parameters(), strict=True))
        state = [t for s in method.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim]
        assert state and all(t.dtype == torch.float32 for t in state)
        assert np.isfinite(report.final_loss)
        if name == "psmt":
            assert all(f.dtype == torch.float32 for f in method.fisher.values())


# ----------------------------------------------------------------------------- the predictor's check


class _Sensitive(nn.Module):
    """A segmentation net whose labels flip in bf16: class 1 beats class 0 by a weight of 2^-10,
    below bf16's resolution (8 bits), so bf16 ties the two (argmax: 0) where fp32 says 1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, 1.0 + 2**-10]).view(2, 1, 1, 1, 1))
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x + 1.0)  # > 0 everywhere: class 1 in fp32 on every voxel


class _Robust(_Sensitive):
    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, 1.5]).view(2, 1, 1, 1, 1))


def _model_folder(tmp_path, name: str = "model"):
    """A small registry network exported as users get it (for the CLI's refusal)."""
    from medct.nets import create_net

    net = create_net("unet", out_channels=2, channels=(4, 8), num_res_units=0)
    card = _card(None)
    card.net_name, card.net_args = "unet", dict(net.net_config["args"])  # type: ignore[attr-defined]
    return save_model_folder(net, card, tmp_path / name)


def _card(validated: str | None) -> ModelCard:
    inference = {"body_only": False} | ({} if validated is None else {"precision": validated})
    return ModelCard(
        net_name="unet",
        net_args={},
        labels={0: "background", 1: "organ"},
        preprocessing=Preprocessing(spacing=(4.0, 4.0, 4.0), hu_min=-1000.0, hu_max=1000.0, modality="CT"),
        patch_size=(8, 8, 8),
        inference=inference,
    )


def _volume() -> Volume:
    """Soft tissue (-200..200 HU) on a 4 mm grid."""
    hu = np.random.default_rng(0).uniform(-200.0, 200.0, (16, 16, 16)).astype(np.float32)
    return Volume(hu, np.diag([4.0, 4.0, 4.0, 1.0]))


def _predictor(net: nn.Module, validated: str | None, asked: str | None = None) -> Predictor:
    return Predictor(net, _card(validated), device="cpu", precision=asked, skip_air=False)


def test_a_model_whose_bf16_labels_differ_falls_back_to_fp32_and_says_so(cpu_bf16) -> None:
    cpu_bf16(True)
    p = _predictor(_Sensitive(), validated=None)
    assert p.precision == "bf16" and p.bf16_check.pending
    scores = p.run(p.prepare(_volume()))
    assert p.run_precision == "fp32" and p.bf16_check.dice == 0.0
    assert any("bf16 labels of this model differ from fp32" in n for n in scores.notes)
    assert (p.finish(scores).array == 1).all()  # the fp32 answer, on the checked case too
    again = p.run(p.prepare(_volume()))  # checked once per run: no note, fp32
    assert not again.notes and (p.finish(again).array == 1).all()


def test_a_model_that_agrees_stays_bf16_and_a_bf16_validated_card_is_not_checked(cpu_bf16) -> None:
    cpu_bf16(True)
    robust = _predictor(_Robust(), validated=None)
    assert not robust.run(robust.prepare(_volume())).notes
    assert robust.run_precision == "bf16" and robust.bf16_check.dice == 1.0
    trusted = _predictor(_Sensitive(), validated="bf16")  # the card says it was validated in bf16
    assert not trusted.bf16_check.pending
    assert (trusted.finish(trusted.run(trusted.prepare(_volume()))).array == 0).all()  # bf16's tie
    forced = _predictor(_Sensitive(), validated=None, asked="bf16")  # the user's explicit choice
    assert not forced.bf16_check.pending and forced.run_precision == "bf16"
    assert _predictor(_Sensitive(), validated=None, asked="fp32").run_precision == "fp32"


def test_summary_csv_records_the_precision_and_the_fallback(cpu_bf16, tmp_path) -> None:
    from medct.runner import discover_cases, prepare_output_folder, run_folder
    from medct.segment_job import SegmentJob

    cpu_bf16(True)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a", "b"):
        write_volume(_volume(), inputs / f"{name}.nii.gz")
    job = SegmentJob(_predictor(_Sensitive(), validated=None))
    out = prepare_output_folder(tmp_path / "out")
    report = run_folder(discover_cases(inputs, []), out, job, pipeline=False)
    assert report.exit_code == 0
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["precision"] for r in rows] == ["fp32", "fp32"]
    assert "differ from fp32" in rows[0]["note"] and not rows[1]["note"]


def test_label_agreement_is_the_mean_foreground_dice() -> None:
    a = torch.tensor([0, 1, 1, 2, 2, 2])
    b = torch.tensor([0, 1, 0, 2, 2, 0])
    assert label_agreement(a, b) == pytest.approx((2 * 1 / 3 + 2 * 2 / 5) / 2)
    assert label_agreement(torch.zeros(4), torch.zeros(4)) == 1.0


def test_channels_last_only_touches_3d_convolution_networks() -> None:
    conv = precision.channels_last(nn.Sequential(nn.Conv3d(1, 2, 3)))
    assert conv[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    linear = nn.Linear(3, 4)
    assert precision.channels_last(linear) is linear and not precision.has_conv3d(linear)
