"""Write the small nnU-Net v2 model folder that `nnUNetPredictor` reads, for a medct model folder
whose network is one of nnU-Net's own (`nnunet_resenc` / `nnunet_plain` in medct's registry).

    OUT/dataset.json                    channel names, labels, file ending
    OUT/plans.json                      one "3d_fullres" configuration: spacing, patch, CT
                                        normalisation, resampling, the network's class and kwargs
    OUT/fold_0/checkpoint_final.pth     {"network_weights", "init_args", "trainer_name", ...}

The same weights then run through nnU-Net's own preprocessing, tiling and export. medct's intensity
preprocessing (clip to [hu_min, hu_max], map to [0, 1]) is nnU-Net's CTNormalization (clip to the
0.5/99.5 percentiles, subtract the mean, divide by the std) with percentiles = the window,
mean = hu_min and std = hu_max - hu_min, so both pipelines feed the network the same values.

nnU-Net does not reorient images: it works in the array order of the file (SimpleITK's (z, y, x),
transposed by `transpose_forward`). medct's networks see RAS-ordered arrays, so the plans transpose
(z, y, x) back to (x, y, z) and the bench gives every arm a file stored in RAS voxel order.

Bench-only (not part of the medct package): nnU-Net reads its checkpoint with
torch.load(weights_only=False), which medct never does; the checkpoint is written here with
torch.save of plain tensors and primitives.
"""

from __future__ import annotations

import json
from pathlib import Path

PLANS_NAME = "nnUNetPlans"
CONFIGURATION = "3d_fullres"
_REQUIRES_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def write_nnunet_model_folder(model_dir: str | Path, out_dir: str | Path) -> Path:
    """nnU-Net v2 model folder for the medct model folder `model_dir`; returns `out_dir`."""
    import torch

    from medct.checkpoint import load_model_folder

    net, card = load_model_folder(model_dir)
    arch = getattr(net, "nnunet_arch", None)
    if arch is None:
        raise ValueError(
            f"{model_dir}: network '{card.net_name}' is not one of nnU-Net's (nnunet_resenc, nnunet_plain)"
        )
    pre = card.preprocessing
    out = Path(out_dir)
    (out / "fold_0").mkdir(parents=True, exist_ok=True)
    labels = {name: int(i) for i, name in sorted(card.labels.items())}
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": 1,
        "file_ending": ".nii.gz",
        "name": "medct export",
    }
    arch_kwargs = {k: v for k, v in arch.items() if k != "network_class_name"}
    arch_kwargs.update(
        conv_op="torch.nn.modules.conv.Conv3d",
        conv_bias=True,
        norm_op="torch.nn.modules.instancenorm.InstanceNorm3d",
        norm_op_kwargs={"eps": 1e-05, "affine": True},
        dropout_op=None,
        dropout_op_kwargs=None,
        nonlin="torch.nn.LeakyReLU",
        nonlin_kwargs={"inplace": True},
    )
    spacing = [float(s) for s in pre.spacing]  # (x, y, z): the order after transpose_forward
    resample = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    plans = {
        "dataset_name": "Dataset999_medct",
        "plans_name": PLANS_NAME,
        "original_median_spacing_after_transp": spacing,
        "original_median_shape_after_transp": [256, 256, 256],
        "image_reader_writer": "SimpleITKIO",
        # SimpleITK arrays are (z, y, x); medct networks see (x, y, z)
        "transpose_forward": [2, 1, 0],
        "transpose_backward": [2, 1, 0],
        "configurations": {
            CONFIGURATION: {
                "data_identifier": f"{PLANS_NAME}_{CONFIGURATION}",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": [int(p) for p in card.patch_size],
                "median_image_size_in_voxels": [256, 256, 256],
                "spacing": spacing,
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": resample,
                "resampling_fn_seg_kwargs": {**resample, "is_seg": True, "order": 1},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {**resample, "order": 1},
                "architecture": {
                    "network_class_name": arch["network_class_name"],
                    "arch_kwargs": arch_kwargs,
                    "_kw_requires_import": _REQUIRES_IMPORT,
                },
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": pre.hu_max,
                "mean": pre.hu_min,  # (x - hu_min) / (hu_max - hu_min) after clipping: medct's scaling
                "median": pre.hu_min,
                "min": pre.hu_min,
                "percentile_00_5": pre.hu_min,
                "percentile_99_5": pre.hu_max,
                "std": pre.hu_max - pre.hu_min,
            }
        },
    }
    (out / "dataset.json").write_text(json.dumps(dataset, indent=2))
    (out / "plans.json").write_text(json.dumps(plans, indent=2))
    checkpoint = {
        "network_weights": {k: v.cpu() for k, v in net.state_dict().items()},
        "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": 0, "dataset_json": dataset},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": None,
    }
    torch.save(checkpoint, out / "fold_0" / "checkpoint_final.pth")
    return out
