"""Text-to-CT (medct.synthesis vae / clip3d / diffusion, `medct generate`) on tiny untrained parts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medct.errors import ConfigError, MedCTError, ModelFolderError
from tests.conftest import REPORTS, make_text2ct_model, make_text2ct_parts

# ----------------------------------------------------------------------------- reports and tokenizer


def test_tokenizer_round_trips_and_pads():
    from medct.synthesis.clip3d import PAD, load_tokenizer, tokenize, train_tokenizer

    tok = train_tokenizer(REPORTS, vocab_size=300)
    assert tok.token_to_id(PAD) == 0
    unseen = "Unenhanced CT of the abdomen. Two focal lesions: 12 mm lesion in the left kidney; 31 mm in the liver."
    for text in (*REPORTS, unseen):
        assert tok.decode(tok.encode(text).ids) == text  # lossless, numbers included
    again = load_tokenizer(tok.to_str())
    assert again.encode(unseen).ids == tok.encode(unseen).ids
    ids = tokenize(tok, ["Liver 1250 mL.", REPORTS[1]], max_length=12)
    assert ids.shape == (2, 12) and ids.dtype == torch.long
    n = len(tok.encode("Liver 1250 mL.").ids)
    assert (ids[0, :n] > 0).all() and (ids[0, n:] == 0).all()  # padded with [PAD]
    assert (ids[1] > 0).all()  # truncated to max_length
    assert tok.encode("1250").tokens == ["1", "2", "5", "0"]  # digits one by one
    with pytest.raises(ConfigError, match="at least 258"):
        train_tokenizer(REPORTS, vocab_size=100)


def test_clip_task_reads_a_local_tokenizer_and_refuses_unfit_ones(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from medct.nets import create_tiny_net
    from medct.synthesis.clip3d import CLIPTask, train_tokenizer

    net = create_tiny_net("clip3d")  # vocab_size 300
    folder = tmp_path / "local_text_model"  # as a locally installed Hugging Face model folder
    folder.mkdir()
    tok = train_tokenizer(REPORTS, vocab_size=280)
    (folder / "tokenizer.json").write_text(tok.to_str())
    task = CLIPTask(net, tokenizer=str(folder))
    assert task.tokenizer.encode(REPORTS[0]).ids == tok.encode(REPORTS[0]).ids
    task.setup("fit")  # a given tokenizer is kept, not retrained (no data module needed)
    assert task.tokenizer.to_str() == tok.to_str()

    word = Tokenizer(models.WordLevel({"liver": 0, "[PAD]": 1, "[UNK]": 2}, unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "bad_pad.json").write_text(word.to_str())
    with pytest.raises(ConfigError, match="'liver' as id 0"):
        CLIPTask(net, tokenizer=str(tmp_path / "bad_pad.json"))
    (tmp_path / "big.json").write_text(train_tokenizer(REPORTS * 20, vocab_size=600).to_str())
    with pytest.raises(ConfigError, match="vocab_size to at least"):
        CLIPTask(net, tokenizer=str(tmp_path / "big.json"))
    with pytest.raises(ConfigError, match="neither a tokenizer.json"):
        CLIPTask(net, tokenizer=str(tmp_path / "missing"))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable tokenizers JSON"):
        CLIPTask(net, tokenizer=str(tmp_path / "broken.json"))


def test_varied_reports_state_the_same_facts():
    from medct.phantom.reports import Findings, report

    f = Findings("ct", "arterial", 2210.4, 512.0, 150.0, 140.0, True, ((18.2, "hypodense", "the right kidney"),))
    texts = {report(f, style=s) for s in range(12)}
    assert len(texts) >= 4  # the wording varies with the style seed
    for t in texts:
        assert "arterial" in t.lower() and "2210" in t and "18 mm hypodense lesion in the right kidney" in t
        assert ("enlarged" in t or "Hepatomegaly" in t) and ("512" in t) and "left 150 mL, right 140 mL" in t
    assert report(f) == report(f, style=None)  # the fixed wording
    assert f.liver_size == "enlarged" and f.spleen_enlarged and f.lesion_sites == ("the right kidney",)


def test_mixed_phase_cohort_carries_the_stated_attributes(tmp_path):
    from medct.phantom import write_cohort

    path = write_cohort(
        tmp_path / "c",
        n=6,
        shape=(24, 24, 16),
        spacing=(16.0, 16.0, 16.0),
        phase="mixed",
        varied_reports=True,
        center_mm=(0.0, 0.0, -40.0),
    )
    entries = json.loads(path.read_text())["training"]
    assert len({e["phase"] for e in entries}) >= 2
    for e in entries:
        assert e["liver_size"] in ("small", "normal", "enlarged", "absent") and e["spleen"] in ("normal", "enlarged")
        low = e["text"].lower()
        assert ("arterial" in low, "venous" in low) == {
            "native": (False, False),
            "arterial": (True, False),
            "venous": (False, True),
        }[e["phase"]]
        for site in filter(None, e["lesion_sites"].split("; ")):
            assert site in e["text"]


# ----------------------------------------------------------------------------- VAE


def test_vae_size_rule_and_tiled_coding_agree_with_whole_volume():
    from medct.nets import create_tiny_net
    from medct.synthesis.vae import check_size, decode, encode

    torch.manual_seed(0)
    vae = create_tiny_net("kl_autoencoder").eval()  # f = 4
    with pytest.raises(ConfigError, match="multiple of 4.*nearest that works: \\[32, 32, 20\\]"):
        check_size([32, 32, 19], vae.downsample)
    x = torch.rand(1, 1, 48, 48, 32)
    with torch.no_grad():
        mu, sigma = encode(vae, x)
        whole = decode(vae, mu)
        assert torch.equal(decode(vae, mu, tile=(48, 48, 32)), whole)  # a tile as large as the volume: one pass
        mu_t, sigma_t = encode(vae, x, tile=(32, 32, 32), overlap=0.5)
        tiled = decode(vae, mu, tile=(32, 32, 32), overlap=0.5)
    assert mu.shape == mu_t.shape == sigma_t.shape == (1, 4, 12, 12, 8) and whole.shape == tiled.shape == x.shape
    # GroupNorm normalises each tile by its own statistics, so tiles agree with the whole volume only
    # approximately (bench/text2ct.py measures the PSNR cost on the trained VAE)
    assert (tiled - whole).abs().mean() < 0.6 * whole.std()
    with pytest.raises(ConfigError, match="multiple of 4"):
        encode(vae, torch.rand(1, 1, 30, 32, 32))


# ----------------------------------------------------------------------------- CLIP


def test_retrieval_recall_counts_ranks():
    from medct.synthesis.clip3d import retrieval_recall

    emb = torch.nn.functional.normalize(torch.eye(6), dim=1)
    assert retrieval_recall(emb, emb) == {"r1_i2t": 1.0, "r5_i2t": 1.0, "r1_t2i": 1.0, "r5_t2i": 1.0}
    shifted = emb.roll(1, dims=0)  # every report matches the next image
    r = retrieval_recall(emb, shifted)
    assert r["r1_i2t"] == 0.0 and r["r1_t2i"] == 0.0


def test_clip_loss_is_lower_on_matched_than_shuffled_pairs_after_training():
    from medct.nets import create_tiny_net
    from medct.synthesis.clip3d import clip_loss, tokenize, train_tokenizer

    torch.manual_seed(0)
    net = create_tiny_net("clip3d")
    tok = train_tokenizer(REPORTS, vocab_size=net.vocab_size)
    images = torch.rand(3, 1, 16, 16, 16) + torch.arange(3.0).view(3, 1, 1, 1, 1)  # distinguishable volumes
    ids = tokenize(tok, REPORTS, net.max_length)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(40):
        img, txt = net(images, ids)
        loss = clip_loss(img, txt, net.logit_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        img, txt = net(images, ids)
        matched = clip_loss(img, txt, net.logit_scale)
        shuffled = clip_loss(img, txt[[1, 2, 0]], net.logit_scale)
    assert matched < shuffled - 0.5


# ----------------------------------------------------------------------------- diffusion and generation


def _ldm_task(tmp: Path):
    from medct.nets import create_tiny_net
    from medct.synthesis.diffusion import LDMTask

    vae_dir, clip_dir = make_text2ct_parts(tmp / "parts")
    torch.manual_seed(0)
    net = create_tiny_net("latent_diffusion_unet")  # stride 2: sizes multiples of 4 x 2 = 8
    return LDMTask(net, str(vae_dir), str(clip_dir), patch_size=(32, 32, 16), steps=4, guidance=3.0)


@pytest.fixture(scope="module")
def text2ct_dir(tmp_path_factory) -> Path:
    return make_text2ct_model(tmp_path_factory.mktemp("text2ct"))


def test_training_step_and_card_name_every_part(tmp_path):
    task = _ldm_task(tmp_path)
    batch = {"image": torch.rand(2, 1, 32, 32, 16), "text": list(REPORTS[:2]), "case": ["a", "b"]}
    loss = task.training_step(batch, 0)
    assert torch.isfinite(loss) and loss.requires_grad
    assert set(task._latents) == {"a", "b"} and set(task._contexts) == set(REPORTS[:2])  # cached
    assert not any(p.requires_grad for p in (*task.vae.parameters(), *task.clip.parameters()))  # frozen
    card = task.model_card()
    assert card.task == "text2ct" and set(card.extra["parts"]) == {"vae", "clip"}
    assert card.inference["sampler"] == "rflow" and card.inference["steps"] == 4


def test_export_holds_three_parts_and_tokenizer(text2ct_dir):
    files = {p.name for p in text2ct_dir.iterdir()}
    assert {"model.safetensors", "vae.safetensors", "clip.safetensors", "tokenizer.json", "medct.json"} <= files
    card = json.loads((text2ct_dir / "medct.json").read_text())
    assert card["task"] == "text2ct" and card["extra"]["parts"]["vae"]["task"] == "vae"
    assert card["extra"]["parts"]["clip"]["net"]["name"] == "clip3d"


def test_sampling_is_seeded_and_guidance_one_is_the_conditional_prediction(text2ct_dir):
    from medct.synthesis.diffusion import TextToCT, sample_latent, sampling_scheduler

    gen = TextToCT.from_folder(text2ct_dir, device="cpu")
    a = gen.generate([REPORTS[0]], seed=3)[0]
    b = gen.generate([REPORTS[0]], seed=3)[0]
    c = gen.generate([REPORTS[0]], seed=4)[0]
    assert np.array_equal(a.array, b.array) and not np.array_equal(a.array, c.array)
    assert a.array.dtype == np.int16 and a.shape == (32, 32, 16)
    assert np.allclose(np.abs(np.diag(a.affine)[:3]), gen.card.preprocessing.spacing)
    two = gen.generate([REPORTS[0], REPORTS[1]], n=2, seed=3)
    assert len(two) == 4 and np.array_equal(two[0].array, a.array)  # volume k is seeded by seed + k

    torch.manual_seed(1)
    with torch.no_grad():  # MONAI zero-initialises the UNet's output layer: give it an output
        for p in gen.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ctx = gen.context([REPORTS[1]])
    sched = lambda: sampling_scheduler("rflow", "rflow", 4, 4 * 4 * 2 * 4, 4 * 4 * 2 * 4)  # noqa: E731
    noise = torch.randn(1, 4, 8, 8, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = sample_latent(gen.net, sched(), noise, ctx, None, -1.0)
        one = sample_latent(gen.net, sched(), noise, ctx, 1.0, -1.0)
        five = sample_latent(gen.net, sched(), noise, ctx, 5.0, -1.0)
    assert not torch.allclose(cond, noise, atol=1e-2)  # the chain moved the sample
    assert torch.allclose(one, cond, atol=1e-5)
    assert not torch.allclose(five, cond, atol=1e-3)


def test_generate_refuses_what_it_cannot_do(text2ct_dir, tmp_path):
    import shutil

    from medct.synthesis.diffusion import TextToCT

    gen = TextToCT.from_folder(text2ct_dir, device="cpu")
    with pytest.raises(MedCTError, match="prompt is empty"):
        gen.generate(["  "])
    with pytest.raises(ConfigError, match="multiple of 8"):
        gen.generate(["liver"], size=(30, 32, 16))
    with pytest.raises(ConfigError, match="samples with 'rflow', not 'ddim'"):
        gen.generate(["liver"], sampler="ddim")
    broken = tmp_path / "broken"
    shutil.copytree(text2ct_dir, broken)
    (broken / "vae.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="lacks its 'vae' part"):
        TextToCT.from_folder(broken, device="cpu")


def test_ddpm_objective_samples_with_ddim(tmp_path):
    from medct.synthesis.diffusion import TextToCT

    gen = TextToCT.from_folder(make_text2ct_model(tmp_path, "ddpm"), device="cpu")
    vol = gen.generate(["Non-contrast abdominal CT."], sampler="ddim", steps=3)[0]
    assert vol.shape == (32, 32, 16)
    with pytest.raises(ConfigError, match="samples with 'ddim'"):
        gen.generate(["liver"], sampler="rflow")


def test_token_context_attends_over_the_report_words(tmp_path):
    from medct.synthesis.clip3d import tokenize
    from medct.synthesis.diffusion import TextToCT, text_embedding

    gen = TextToCT.from_folder(make_text2ct_model(tmp_path, context="tokens"), device="cpu")
    assert gen.card.inference["context"] == "tokens"
    ids = tokenize(gen.tokenizer, [REPORTS[0], "Non-contrast CT."], gen.clip.max_length)
    with torch.no_grad():
        ctx = text_embedding(gen.clip, ids, "tokens")
        pooled = text_embedding(gen.clip, ids, "pooled")
    assert ctx.shape == (2, gen.clip.max_length, gen.clip.embed_dim) and pooled.shape == (2, 1, gen.clip.embed_dim)
    assert torch.all(ctx[ids == 0] == 0) and torch.all(ctx[ids != 0].abs().sum(-1) > 0)  # padding zeroed only
    assert torch.equal(gen.context(["Non-contrast CT."])[0], ctx[1])
    torch.manual_seed(2)
    with torch.no_grad():  # the untrained output layer is zero: give the UNet an output
        for p in gen.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    a = gen.generate([REPORTS[0]], seed=1)[0]
    b = gen.generate(["Non-contrast CT."], seed=1)[0]
    assert a.shape == (32, 32, 16) and not np.array_equal(a.array, b.array)  # the words reach the sample
    with pytest.raises(ConfigError, match="model.context must be"):
        text_embedding(gen.clip, ids, "mean")


def test_medct_generate_cli_writes_volumes_montages_and_summary(text2ct_dir, tmp_path, capsys):
    import csv

    import nibabel as nib

    from medct.cli import main

    out = tmp_path / "one.nii.gz"
    assert main(["generate", "-m", str(text2ct_dir), REPORTS[1], "-o", str(out), "--steps", "3", "--no-progress"]) == 0
    img = nib.load(out)
    assert img.shape == (32, 32, 16) and nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert np.allclose(img.header.get_zooms(), (4.0, 4.0, 4.0)) and (tmp_path / "one.png").is_file()

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\nNon-contrast abdominal CT.\n\nArterial phase CT. Hepatomegaly.\n")
    folder = tmp_path / "many"
    args = ["generate", "-m", str(text2ct_dir), "--prompts", str(prompts), "-n", "2", "-o", str(folder)]
    assert main([*args, "--steps", "2", "--spacing", "8", "8", "8", "--no-progress"]) == 0
    rows = list(csv.DictReader(open(folder / "summary.csv")))
    assert [r["seed"] for r in rows] == ["0", "1", "2", "3"] and rows[2]["prompt"] == "Arterial phase CT. Hepatomegaly."
    assert nib.load(folder / "gen_0001_01.nii.gz").shape == (16, 16, 8) and (folder / "gen_0001_01.png").is_file()
    assert {r["status"] for r in rows} == {"done"} and rows[0]["case"] == "gen_0000_00"  # the folder runner's columns
    assert main([*args, "--steps", "2", "--no-progress"]) == 0  # a second run skips what exists
    rows = list(csv.DictReader(open(folder / "summary.csv")))
    assert {r["status"] for r in rows} == {"skipped (exists)"} and [r["seed"] for r in rows] == ["0", "1", "2", "3"]

    capsys.readouterr()
    assert main(["generate", "-m", str(text2ct_dir), "", "-o", str(tmp_path / "x.nii.gz")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prompt is empty" in err[0]
    assert main(["generate", "-m", str(tmp_path / "nope"), "liver", "-o", str(tmp_path / "y.nii.gz")]) == 1
    assert not (tmp_path / "x.nii.gz").exists() and not (tmp_path / "y.nii.gz").exists()
