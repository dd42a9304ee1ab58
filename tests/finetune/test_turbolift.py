"""Turbolift chains: hand-over of weights with a fresh optimiser, resume, forgetting matrix, safeguards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from medct.errors import ConfigError
from medct.finetune.losses import FocalTverskyLoss
from medct.finetune.safeguards import WeightAnchor, fisher_diagonal, param_groups
from medct.finetune.turbolift import forgetting_measures, read_chain, rehearsal_items, run_chain

CPU = ["--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.enable_progress_bar=false"]


def _chain_yaml(tmp: Path, **turbolift: object) -> Path:
    cohort = {"n": 4, "shape": [32, 32, 32], "spacing": [8.0, 8.0, 8.0]}
    cfg = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 1, "devices": 1, "logger": False, "check_val_every_n_epoch": 1},
        "model": {
            "class_path": "medct.finetune.segmentation.SegmentationTask",
            "init_args": {
                "net": {
                    "class_path": "medct.nets.AttentionUNet",
                    "init_args": {"channels": [4, 8, 8, 16, 16], "deep_supervision": True, "deep_supr_num": 3},
                },
                "loss": "focal_tversky",
                "ds_weighting": "mean",
                "optimizer": "adam",
                "scheduler": "constant",
                "sw_batch_size": 1,
            },
        },
        "data": {
            "class_path": "medct.data.SegmentationDataModule",
            "init_args": {
                "preprocessing": {"spacing": [8.0, 8.0, 8.0]},
                "sampling": {"patch_size": [32, 32, 32], "batch_size": 1, "num_samples": 1},
                "split": {"val_fraction": 0.25},
                "num_workers": 0,
            },
        },
        "turbolift": {
            "output_dir": str(tmp / "chain"),
            "stages": [
                {
                    "name": "ct",
                    "data": {"data_dir": str(tmp / "ct"), "phantom": {**cohort, "variant": "ct", "seed": 0}},
                },
                {
                    "name": "cbct",
                    "data": {"data_dir": str(tmp / "cbct"), "phantom": {**cohort, "variant": "cbct", "seed": 5}},
                    "model": {"lr": 0.0005},
                },
            ],
            **turbolift,
        },
    }
    path = tmp / "chain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


FISHER_CALLS: list[dict[str, object]] = []  # what EWC's Fisher was computed from, during the chain


@pytest.fixture(scope="module")
def ewc_chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    import medct.finetune.safeguards as safeguards

    real = safeguards.fisher_diagonal

    def spy(net, batches, loss_of, max_batches):  # records the weights and cases it is given
        FISHER_CALLS.append(
            {
                "weights": {k: v.detach().clone() for k, v in net.state_dict().items()},
                "images": sorted(e["image"] for e in batches.dataset.data),
            }
        )
        FISHER_CALLS[-1]["fisher"] = out = real(net, batches, loss_of, max_batches)
        return out

    tmp = tmp_path_factory.mktemp("turbolift")
    cfg = _chain_yaml(
        tmp, rehearsal=0.25, regularizer="ewc", regularizer_weight=0.5, encoder_lr_scale=0.5, fisher_batches=2
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(safeguards, "fisher_diagonal", spy)
        result = run_chain(cfg, CPU)
    return cfg, result


def test_stage_hand_over_copies_all_weights_and_resets_the_optimiser(ewc_chain) -> None:
    cfg, result = ewc_chain
    out = Path(result.output_dir)
    first = json.loads((out / "00_ct" / "done.json").read_text())["best_checkpoint"]
    recipe = yaml.safe_load((out / "01_cbct" / "config.yaml").read_text())
    init = recipe["model"]["init_args"]
    assert init["init_checkpoint"] == first and init["lr"] == 0.0005  # stage override kept
    assert init["regularizer"] == "ewc" and init["fisher_path"] == str((out / "00_ct" / "fisher.safetensors").resolve())

    # the task built from stage 2's recipe starts from stage 1's best weights, output layer included
    from medct.finetune.segmentation import SegmentationTask
    from medct.nets import create_net

    net = create_net(
        "attention_unet", channels=[4, 8, 8, 16, 16], deep_supervision=True, deep_supr_num=3, out_channels=12
    )
    task = SegmentationTask(net, labels=[f"c{i}" for i in range(12)], init_checkpoint=first)
    best = torch.load(first, map_location="cpu", weights_only=True)["state_dict"]
    for k, v in task.net.state_dict().items():
        assert torch.equal(v, best["net." + k]), k
    assert "head.weight" in task.net.state_dict()

    # fresh optimiser: stage 2's Adam state counts only its own steps, and its step counter restarted
    first_ckpt = torch.load(out / "00_ct" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    second = torch.load(out / "01_cbct" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    adam_steps = {float(s["step"]) for s in second["optimizer_states"][0]["state"].values()}
    assert first_ckpt["global_step"] > 0 and adam_steps == {float(second["global_step"])}
    groups = second["optimizer_states"][0]["param_groups"]
    assert sorted(g["lr"] for g in groups) == [0.00025, 0.0005]  # slow learner: encoder at half the rate


def test_ewc_fisher_is_computed_on_the_previous_stage(ewc_chain) -> None:
    from medct.finetune.safeguards import load_fisher

    _, result = ewc_chain
    out = Path(result.output_dir)
    assert len(FISHER_CALLS) == 1  # after stage 1 only: the last stage has no successor to anchor
    call = FISHER_CALLS[0]
    # stage 1's best weights ...
    best = torch.load(
        json.loads((out / "00_ct" / "done.json").read_text())["best_checkpoint"], map_location="cpu", weights_only=True
    )["state_dict"]
    for k, v in call["weights"].items():
        assert torch.equal(v, best["net." + k]), k
    # ... on stage 1's own training cases (none of stage 2's) ...
    own = sorted(e["image"] for e in json.loads((out / "00_ct" / "datalist.json").read_text())["training"])
    assert call["images"] == own
    later = {e["image"] for e in json.loads((out / "01_cbct" / "datalist.json").read_text())["training"]}
    assert not later & set(own)
    # ... is the Fisher stage 2 is anchored with
    saved = load_fisher(out / "00_ct" / "fisher.safetensors")
    assert saved.keys() == call["fisher"].keys()
    assert all(torch.equal(saved[k], call["fisher"][k]) for k in saved)


def test_rehearsal_replays_earlier_cases(ewc_chain) -> None:
    _, result = ewc_chain
    out = Path(result.output_dir)
    own = json.loads((out / "01_cbct" / "datalist.json").read_text())["training"]
    mixed = json.loads((out / "01_cbct" / "datalist_rehearsal.json").read_text())["training"]
    earlier = {e["image"] for e in json.loads((out / "00_ct" / "datalist.json").read_text())["training"]}
    replayed = [e for e in mixed if e["image"] in earlier]
    assert len(replayed) == round(0.25 / 0.75 * len(own)) and len(mixed) == len(own) + len(replayed)


def test_forgetting_matrix_written(ewc_chain) -> None:
    _, result = ewc_chain
    out = Path(result.output_dir)
    lines = (out / "forgetting.csv").read_text().splitlines()
    assert lines[0] == "after_stage,dice_ct,dice_cbct" and [ln.split(",")[0] for ln in lines[1:]] == ["ct", "cbct"]
    matrix = [[float(v) for v in ln.split(",")[1:]] for ln in lines[1:]]
    assert all(0.0 <= v <= 1.0 for row in matrix for v in row)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backward_transfer"] == pytest.approx(matrix[1][0] - matrix[0][0], abs=1e-4)
    assert (out / "forgetting.png").stat().st_size > 1000


def test_rerun_skips_finished_stages_and_resumes_an_interrupted_one(ewc_chain, capsys) -> None:
    cfg, result = ewc_chain
    out = Path(result.output_dir)
    second_done = out / "01_cbct" / "done.json"
    before = torch.load(out / "01_cbct" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    second_done.unlink()  # as if killed after stage 2's last checkpoint, before it was marked done
    again = run_chain(cfg, CPU)
    printed = capsys.readouterr().out
    assert "'ct': done before, skipped" in printed and "'cbct': resuming from" in printed
    after = torch.load(out / "01_cbct" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert after["global_step"] == before["global_step"]  # the finished schedule was not trained again
    assert second_done.is_file() and len(again.matrix) == 2


def test_forgetting_measures_by_hand() -> None:
    r = [[0.8, 0.1, 0.0], [0.6, 0.7, 0.2], [0.5, 0.65, 0.9]]
    m = forgetting_measures(r)
    assert m["average_dice"] == pytest.approx((0.5 + 0.65 + 0.9) / 3)
    assert m["backward_transfer"] == pytest.approx(((0.5 - 0.8) + (0.65 - 0.7)) / 2)
    assert m["forgetting"] == {0: pytest.approx(0.3), 1: pytest.approx(0.05)}


def test_focal_tversky_equals_hand_computed_value() -> None:
    # two classes, 4 voxels; logits (0, +-log 3) give p1 = 0.75 / 0.25
    logits = torch.stack([torch.zeros(4), torch.tensor([1.0, -1.0, 1.0, -1.0]) * torch.log(torch.tensor(3.0))])
    logits = logits.reshape(1, 2, 4, 1, 1)
    target = torch.tensor([1, 1, 0, 0]).reshape(1, 1, 4, 1, 1)
    p1 = torch.tensor([0.75, 0.25, 0.75, 0.25])
    probs = [1 - p1, p1]
    onehot = [torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 0.0, 0.0])]
    terms = []
    for p, g in zip(probs, onehot, strict=True):
        tp, fn, fp = (p * g).sum(), ((1 - p) * g).sum(), (p * (1 - g)).sum()
        ti = (tp + 1e-5) / (tp + 0.7 * fn + 0.3 * fp + 1e-5)  # MONAI's smoothing terms
        terms.append((1 - ti) ** 0.75)
    expected = torch.stack(terms).mean()
    per_sample = FocalTverskyLoss(smooth=1e-5, include_background=True, batch=False)
    assert per_sample(logits, target) == pytest.approx(float(expected), rel=1e-5)
    # the reference's default: foreground only, smoothing 1: tp = fn = fp = 1 -> TI = 2 / 3
    assert FocalTverskyLoss()(logits, target) == pytest.approx((1 / 3) ** 0.75, rel=1e-6)


def test_weight_anchor_l2_and_ewc_by_hand() -> None:
    net = torch.nn.Linear(2, 1)
    ref = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 2.0]]))
        net.bias.fill_(3.0)
    assert WeightAnchor(ref, 0.5).penalty(net).item() == pytest.approx(0.25 * (1 + 4 + 9))
    fisher = {"weight": torch.tensor([[2.0, 0.0]]), "bias": torch.tensor([1.0])}
    assert WeightAnchor(ref, 0.5, fisher).penalty(net).item() == pytest.approx(0.25 * (2 * 1 + 0 + 9))
    at_ref = {n: p.detach().clone() for n, p in net.named_parameters()}
    assert WeightAnchor(at_ref, 10.0).penalty(net).item() == 0.0


def test_fisher_is_mean_squared_gradient_normalised() -> None:
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    batches = [{"x": torch.randn(4, 3), "y": torch.randn(4, 1)} for _ in range(3)]

    def loss_of(b: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.mse_loss(net(b["x"]), b["y"])

    fisher = fisher_diagonal(net, batches, loss_of, max_batches=2)  # only the first two batches
    sq = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    for b in batches[:2]:
        grads = torch.autograd.grad(loss_of(b), list(net.parameters()))
        for (n, _), g in zip(net.named_parameters(), grads, strict=True):
            sq[n] += g.pow(2) / 2
    mean = torch.cat([v.flatten() for v in sq.values()]).mean()
    for n in sq:
        assert torch.allclose(fisher[n], sq[n] / mean, rtol=1e-5)
    assert torch.cat([v.flatten() for v in fisher.values()]).mean() == pytest.approx(1.0)


def test_param_groups_slow_learner() -> None:
    from medct.nets import create_net

    net = create_net("resenc_unet", filters=[4, 8, 16])
    groups = param_groups(net, 1e-3, 0.1, 0.0)
    assert [g["lr"] for g in groups] == [pytest.approx(1e-4), 1e-3]
    n_enc = sum(p.numel() for n, p in net.named_parameters() if n.startswith(net.encoder_prefixes))
    assert sum(p.numel() for p in groups[0]["params"]) == n_enc
    assert len(param_groups(net, 1e-3, 1.0, 0.0)) == 1


def test_chain_errors_are_sentences(tmp_path: Path) -> None:
    cfg = _chain_yaml(tmp_path, regularizer="l1")
    with pytest.raises(ConfigError, match="regularizer must be none, l2 or ewc"):
        read_chain(cfg)
    plain = tmp_path / "plain.yaml"
    plain.write_text("trainer: {}\n")
    with pytest.raises(ConfigError, match="has no 'turbolift:' section"):
        read_chain(plain)
    chain = read_chain(_chain_yaml(tmp_path, rehearsal=0.5))
    assert rehearsal_items(chain, 0, 0) == []  # the first stage replays nothing


def test_medct_fit_runs_a_chain_recipe(tmp_path: Path, capsys) -> None:
    from medct.cli import main

    cfg = _chain_yaml(tmp_path)
    assert main(["fit", "--config", str(cfg), *CPU, "--trainer.fast_dev_run=true"]) == 0
    assert "chain ct -> cbct" in capsys.readouterr().out
    assert (tmp_path / "chain" / "forgetting.csv").is_file()
    assert (tmp_path / "chain" / "01_cbct" / "done.json").is_file()
