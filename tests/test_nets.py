"""medct.nets: registry, shapes, rebuild from net_config, encoder save/load with a strict report.

The per-network tests are parametrised over `list_nets()` with each entry's declared tiny
arguments, so every registered network (a new family, a new variant) runs through all of them.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from medct.errors import InputPathError, ModelFolderError
from medct.nets import (
    DEFAULT_NET,
    create_net,
    encoder_state_dict,
    list_nets,
    load_encoder,
    net_entry,
    register_net,
    save_encoder,
)
from medct.nets.registry import SEGMENTATION_KINDS

# name -> (tiny init args, cube side of a test input), as each registration declares them
# (the image-to-map networks; the generative kinds of text-to-CT have their own tests in tests/synthesis)
TINY = {
    name: (net_entry(name).tiny_args, net_entry(name).tiny_size)
    for name in list_nets()
    if net_entry(name).output in SEGMENTATION_KINDS
}
DENSE = sorted(name for name in TINY if net_entry(name).output == "dense")  # segmentation-shaped outputs


def _input(name: str, size: int, channels: int = 1) -> torch.Tensor:
    """A test input for `name`: (1, C, s, s, s), or (1, C, s, s) for a 2D ("slices") network."""
    spatial = (size, size) if net_entry(name).output == "slices" else (size, size, size)
    return torch.randn(1, channels, *spatial)


def test_registry_lists_every_network_and_default():
    assert set(list_nets()) >= {"unet", "resenc_unet", "resenc_unet_m", "resenc_unet_l", "segresnet", "swinunetr"}
    assert DEFAULT_NET == "resenc_unet"
    with pytest.raises(KeyError, match="registered networks are"):
        create_net("no_such_net")
    with pytest.raises(ValueError, match="already registered"):
        register_net("unet")(torch.nn.Identity)


def test_named_variants_are_nnunet_resenc_presets():
    """resenc_unet_m is nnU-Net's ResEnc-M layout; its card stores the variant name, not YAML lists."""
    net = create_net("resenc_unet_m", out_channels=4)
    assert net.net_config == {
        "name": "resenc_unet_m",
        "args": {"in_channels": 1, "out_channels": 4, "n_stages": 6, "deep_supervision": False, "deep_supr_num": 1},
    }
    assert net.filters == [32, 64, 128, 256, 320, 320]
    blocks = [1] + [len(d) if isinstance(d, torch.nn.Sequential) else 1 for d in net.downsamples]
    blocks.append(len(net.bottleneck) if isinstance(net.bottleneck, torch.nn.Sequential) else 1)
    assert blocks == [1, 3, 4, 6, 6, 6]
    assert net_entry("resenc_unet_m").variant_of == "resenc_unet"
    with pytest.raises(ValueError, match="n_stages"):
        create_net("resenc_unet_m", n_stages=2)


@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_shape_and_rebuild_from_config(name):
    args, size = TINY[name]
    torch.manual_seed(0)
    net = create_net(name, in_channels=1, out_channels=3, **args).eval()
    x = _input(name, size)
    with torch.no_grad():
        y = net(x)
        feats = net.encoder_features(x)
    assert y.shape == ((1, 3, *x.shape[2:]) if net_entry(name).output in ("dense", "slices") else (1, 3))
    assert len(feats) >= 3 and feats[0].shape[0] == 1
    assert feats[-1].shape[-1] <= feats[0].shape[-1]  # shallow to deep (a ViT's are all on its token grid)

    cfg = net.net_config
    assert cfg["name"] == name and cfg["args"]["out_channels"] == 3
    json.dumps(cfg)  # JSON-primitive
    twin = create_net(cfg["name"], **json.loads(json.dumps(cfg["args"]))).eval()
    twin.load_state_dict(net.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(twin(x), y)


@pytest.mark.parametrize("name", sorted(TINY))
def test_encoder_prefixes_split_state_dict(name):
    args, _ = TINY[name]
    net = create_net(name, out_channels=2, **args)
    enc = encoder_state_dict(net)
    full = net.state_dict()
    assert 0 < len(enc) < len(full)
    # the decoder (everything else) includes the output layer
    assert any(k not in enc and k.endswith("weight") for k in full)


def test_resenc_unet_state_dict_has_no_shared_tensors(tmp_path):
    """DynUNet's recursive skip_layers duplicates keys; ours must save with safetensors."""
    net = create_net("resenc_unet", filters=[4, 8, 16])
    assert not any(k.startswith("skip_layers") for k in net.state_dict())
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))


def test_resenc_unet_deep_supervision_output():
    net = create_net("resenc_unet", filters=[4, 8, 16, 32], deep_supervision=True, deep_supr_num=2).train()
    y = net(torch.randn(1, 1, 32, 32, 32))
    assert y.shape == (1, 3, 2, 32, 32, 32)  # (B, 1 + heads, C, D, H, W)
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)


def test_attention_unet_deep_supervision_heads_see_their_own_scale():
    """Turbolift's outputs at full, 1/2, 1/4 and 1/8 scale, the coarse ones upsampled to full size;
    eval mode returns the full-resolution output alone; too many heads for the levels is an error."""
    net = create_net("attention_unet", channels=[4, 8, 16, 32, 32], deep_supervision=True, deep_supr_num=3).train()
    y = net(torch.randn(2, 1, 32, 32, 32))
    assert y.shape == (2, 4, 2, 32, 32, 32)  # (B, 1 + 3 heads, C, D, H, W)
    assert len(net.ds_heads) == 3 and not torch.allclose(y[:, 0], y[:, 3])
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)
    with pytest.raises(ValueError, match="deep_supr_num"):
        create_net("attention_unet", channels=[4, 8, 16], deep_supervision=True, deep_supr_num=3)


def test_encoder_round_trip_into_a_net_with_other_head(tmp_path):
    torch.manual_seed(0)
    src = create_net("resenc_unet", out_channels=2, filters=[4, 8, 16])
    path = save_encoder(src, tmp_path / "enc.safetensors")
    dst = create_net("resenc_unet", out_channels=5, filters=[4, 8, 16])  # other head, same backbone
    before_head = dst.output_block.conv.conv.weight.clone()
    report = load_encoder(dst, path)
    assert report.ok and report.source_net == "resenc_unet"
    assert len(report.loaded) == len(encoder_state_dict(src))
    for k, v in encoder_state_dict(src).items():
        assert torch.equal(dst.state_dict()[k], v)
    assert torch.equal(dst.output_block.conv.conv.weight, before_head)  # decoder untouched
    # an exported model folder works as an encoder source too (its decoder part is ignored)
    from medct.checkpoint import ModelCard, save_model_folder
    from medct.transforms import Preprocessing

    card = ModelCard("resenc_unet", src.net_config["args"], {0: "bg", 1: "fg"}, Preprocessing(), (32, 32, 32))
    folder = save_model_folder(src, card, tmp_path / "model")
    report = load_encoder(create_net("resenc_unet", out_channels=3, filters=[4, 8, 16]), folder)
    assert report.ok and len(report.loaded) == len(encoder_state_dict(src))

    x = torch.randn(1, 1, 32, 32, 32)
    src.eval(), dst.eval()
    with torch.no_grad():
        for a, b in zip(src.encoder_features(x), dst.encoder_features(x), strict=True):
            assert torch.equal(a, b)


def test_load_encoder_strict_report_and_error(tmp_path):
    src = create_net("resenc_unet", filters=[4, 8, 16])
    state = encoder_state_dict(src)
    other = create_net("resenc_unet", filters=[4, 8, 32])  # bottleneck width differs
    with pytest.raises(ModelFolderError, match="does not fit network 'resenc_unet'"):
        load_encoder(other, state)
    report = load_encoder(other, state, strict=False)
    assert report.mismatched and all(k.startswith("bottleneck.") for k in report.mismatched)
    assert report.loaded and not report.missing

    state_extra = {**state, "decoder.extra.weight": torch.zeros(1)}
    state_extra.pop(next(iter(state)))
    report = load_encoder(create_net("resenc_unet", filters=[4, 8, 16]), state_extra, strict=False)
    assert report.unexpected == ["decoder.extra.weight"] and len(report.missing) == 1

    unet = create_net("unet", channels=[4, 8, 16])
    with pytest.raises(ModelFolderError):
        load_encoder(unet, state)
    with pytest.raises(InputPathError):
        load_encoder(unet, tmp_path / "nope.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelFolderError):
        load_encoder(unet, tmp_path / "bad.safetensors")


def test_resenc_unet_blocks_per_stage(tmp_path):
    """nnU-Net ResEnc-style deeper encoder stages: same features and output shapes, more blocks,
    exported config rebuilds the same network, encoder keys still under encoder_prefixes."""
    torch.manual_seed(0)
    plain = create_net("resenc_unet", out_channels=3, filters=[4, 8, 16]).eval()
    deep = create_net("resenc_unet", out_channels=3, filters=[4, 8, 16], blocks_per_stage=[1, 2, 3]).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert [f.shape for f in deep.encoder_features(x)] == [f.shape for f in plain.encoder_features(x)]
        y = deep(x)
    assert y.shape == (1, 3, 16, 16, 16)
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in (("plain", plain), ("deep", deep))}
    assert n_params["deep"] > n_params["plain"]
    new_keys = set(deep.state_dict()) - set(plain.state_dict())
    assert any(k.startswith("downsamples.0.1.") for k in new_keys)  # stage 1: one extra block
    assert any(k.startswith("bottleneck.2.") for k in new_keys)  # stage 2: two extra blocks
    enc = encoder_state_dict(deep)
    assert new_keys <= set(enc)  # the extra blocks belong to the encoder
    cfg = json.loads(json.dumps(deep.net_config))
    twin = create_net(cfg["name"], **cfg["args"]).eval()
    twin.load_state_dict(deep.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(twin(x), y)
    save_file({k: v.contiguous() for k, v in deep.state_dict().items()}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="blocks_per_stage"):
        create_net("resenc_unet", filters=[4, 8, 16], blocks_per_stage=[1, 2])
    with pytest.raises(ValueError, match="blocks_per_stage"):
        create_net("resenc_unet", filters=[4, 8, 16], blocks_per_stage=[1, 0, 2])


@pytest.mark.parametrize("name", sorted(TINY))
def test_model_folder_and_encoder_round_trip(name, tmp_path):
    """Every registered net survives safetensors (shared tensors, e.g. nnU-Net's aliases, included):
    the model folder rebuilds the same outputs and the encoder file loads strictly into a twin."""
    from medct.checkpoint import ModelCard, load_model_folder, save_model_folder
    from medct.transforms import Preprocessing

    args, size = TINY[name]
    torch.manual_seed(0)
    net = create_net(name, out_channels=3, **args).eval()
    card = ModelCard(name, net.net_config["args"], {0: "bg", 1: "a", 2: "b"}, Preprocessing(), (size,) * 3)
    again, _ = load_model_folder(save_model_folder(net, card, tmp_path / "m"))
    x = _input(name, size, getattr(net, "in_channels", 1) if net_entry(name).output == "slices" else 1)
    with torch.no_grad():
        assert torch.equal(again(x), net(x))
    twin = create_net(name, out_channels=5, **args)
    report = load_encoder(twin, save_encoder(net, tmp_path / "enc.safetensors"))
    assert report.ok and report.loaded
    for k, v in encoder_state_dict(net).items():
        assert torch.equal(twin.state_dict()[k], v)


def test_lazy_family_table_matches_the_family_files() -> None:
    """Every network file of medct/nets is in registry.NET_MODULES, and every name it registers is
    listed there with that module (a new family cannot be missed by the lazy loading)."""
    import importlib
    from pathlib import Path

    import medct.nets as nets
    from medct.nets.registry import _NETS, NET_MODULES

    folder = Path(nets.__file__).parent
    families = {
        f"medct.nets.{p.stem}" for p in folder.glob("*.py") if p.stem not in ("__init__", "registry", "encoder")
    }
    assert families == set(NET_MODULES.values())
    for module in families:
        importlib.import_module(module)
    assert {name: entry.builder.__module__ for name, entry in _NETS.items()} == NET_MODULES
    for cls_name in nets._CLASSES:
        assert getattr(nets, cls_name).__module__ == nets._CLASSES[cls_name]


def test_encoder_classifier_takes_a_plain_backbone_encoder(tmp_path):
    """encoder_classifier drops its backbone's decoder and loads an encoder saved from the plain backbone."""
    torch.manual_seed(0)
    plain = create_net("resenc_unet", filters=[4, 8, 16])
    clf = create_net(
        "encoder_classifier", backbone="resenc_unet", backbone_args={"filters": [4, 8, 16]}, out_channels=4
    )
    assert not hasattr(clf.backbone, "upsamples") and not hasattr(clf.backbone, "output_block")
    assert set(clf.state_dict()) == {"backbone." + k for k in encoder_state_dict(plain)} | {"head.weight", "head.bias"}
    report = load_encoder(clf, save_encoder(plain, tmp_path / "enc.safetensors"))
    assert report.ok and len(report.loaded) == len(encoder_state_dict(plain))
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        a = [f.mean(dim=(2, 3, 4)) for f in plain.eval().encoder_features(x)]
        assert torch.allclose(clf.eval().embed(x), torch.cat(a, dim=1))
    nn_clf = create_net("encoder_classifier", backbone="nnunet_plain", backbone_args={})
    assert not hasattr(nn_clf.backbone, "decoder")
