"""Tests for melgan.py: shapes, parameter counts, the official key map and size inference, a golden training
step against the paper's objective written out here, the features, the optimizer, and the command line.

What pins each term of the paper file (expected values are written out in the tests, never taken from
melgan.py):
- discriminator hinge loss, Eq. 1, summed over the 3 scales: test_losses_on_hand_made_tensors,
  test_golden_step_matches_the_papers_objective
- generator adversarial loss, Eq. 2: the same two tests
- feature matching, Eq. 3 (hidden layers only, weight 1/num_D x 4/(n_layers + 1), L1 to the pre-update real
  features) and lambda = 10 in Eq. 4: the same two tests
- step order (D first, then G against the updated D): test_golden_step_matches_the_papers_objective (two
  steps)
- multi-scale input, avg-pool 4/2 without counting the padding: test_pooling_ignores_its_padding, the golden
  step
- data augmentation, one random gain per clip: test_golden_step_matches_the_papers_objective
- features, the official log10 Audio2Mel: test_log_mel_is_the_official_log10_audio2mel
- optimizer, Adam lr 1e-4, betas (0.5, 0.9), no schedule: test_optimizers_are_the_papers_adam
- sampler: none (the generator is deterministic); the Slaney filterbank is pinned against librosa in
  test_common.
"""
import copy
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import melgan
from cli import check_cli_contract, require, audio_folder, one_line_error


def make_cfg(preset="tiny", **kw):
    return common.parse_config(melgan.Config, melgan.PRESETS, [f"--preset={preset}", "--device=cpu", "--compile=False"]
                               + [f"--{k}={v}" for k, v in kw.items()])


CPU = common.Runtime(torch.device("cpu"), "cpu", torch.float32)


def official_file(G):
    """Our Generator's weights under the official Sequential names and old-style weight-norm keys."""
    n_res, stage = G.n_res, 2 + G.n_res
    names = {"conv_pre": "model.1", "conv_post": f"model.{2 + stage * len(G.ups) + 2}"}
    for i in range(len(G.ups)):
        names[f"ups.{i}"] = f"model.{3 + stage * i}"
        for j in range(n_res):
            b = f"model.{4 + stage * i + j}"
            names.update({f"resblocks.{i * n_res + j}.conv1": f"{b}.block.2",
                          f"resblocks.{i * n_res + j}.conv2": f"{b}.block.4",
                          f"resblocks.{i * n_res + j}.shortcut": f"{b}.shortcut"})
    leaf = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v",
            "bias": "bias"}
    out = {}
    for k, v in G.state_dict().items():
        for tail, new in leaf.items():
            if k.endswith("." + tail):
                out[f"{names[k[:-len(tail) - 1]]}.{new}"] = v.clone()
    return out


# ----------------------------------------------------------------------------- architecture

def test_generator_output_length_is_frames_times_hop():
    torch.manual_seed(0)
    for preset in ("tiny", "paper"):
        cfg = make_cfg(preset)
        G = melgan.Generator(cfg)
        for frames in (4, 7, 12):
            y = G(torch.randn(2, cfg.n_mels, frames))
            assert y.shape == (2, 1, frames * cfg.hop)
            assert y.abs().max() <= 1.0  # tanh output


def test_discriminator_outputs_per_scale():
    cfg = make_cfg("paper")
    D = melgan.Discriminator(cfg)
    T = 2048
    outs = D(torch.randn(2, 1, T) * 0.1)
    assert len(outs) == 3  # raw, 2x and 4x pooled
    for i, fmaps in enumerate(outs):
        t = T // 2 ** i
        # 6 hidden feature maps (for feature matching) + the window logits, last
        assert [f.shape[1] for f in fmaps] == [16, 64, 256, 1024, 1024, 1024, 1]
        assert fmaps[0].shape[-1] == t
        assert fmaps[-1].shape == (2, 1, t // 256)  # one logit per window: 4 stride-4 layers


def test_pooling_ignores_its_padding():
    """AvgPool1d(4, 2, padding=1, count_include_pad=False) (official): a constant stays constant at the edges."""
    D = melgan.Discriminator(make_cfg())
    y = D.pool(torch.ones(1, 1, 64))
    assert y.shape[-1] == 32 and torch.allclose(y, torch.ones_like(y))


def test_parameter_counts_match_official():
    cfg = make_cfg("paper")
    g, d = common.count_params(melgan.Generator(cfg)), common.count_params(melgan.Discriminator(cfg))
    assert g == 4_266_050          # official Generator(80, 32, 3): 4.27 M (the paper rounds to 4.26 M)
    assert d == 16_924_086         # official Discriminator(3, 16, 4, 4): 16.9 M


# ----------------------------------------------------------------------------- loss and features

def test_losses_on_hand_made_tensors():
    hi, lo = torch.full((2, 1, 5), 2.0), torch.full((2, 1, 5), -2.0)
    feats = [torch.randn(2, 3, 5) for _ in range(6)]
    real = [feats + [hi] for _ in range(3)]
    fake = [feats + [lo] for _ in range(3)]
    assert melgan.discriminator_loss(real, fake).item() == 0.0          # both beyond the hinge margin
    assert melgan.discriminator_loss(fake, real).item() == pytest.approx(3 * (3 + 3))
    assert melgan.generator_loss(fake).item() == pytest.approx(3 * 2.0)
    assert melgan.feature_loss(real, fake).item() == 0.0               # identical features
    shifted = [[f + 1 for f in feats] + [lo] for _ in range(3)]
    # 3 scales x 6 layers x |1| x 1/3 x 4/5; the logits are not matched
    assert melgan.feature_loss(real, shifted).item() == pytest.approx(6 * 4 / 5)


def ref_audio2mel(wav, sr=22050, n_fft=1024, hop=256, n_mels=80):
    """The official Audio2Mel, written out: reflect-pad (n_fft - hop) / 2, |STFT| (Hann; + 1e-9 under the root, the
    docstring's one change), Slaney mel, log10 of the clamp at 1e-5."""
    p = (n_fft - hop) // 2
    x = F.pad(wav.reshape(-1, wav.shape[-1]).unsqueeze(1), (p, p), mode="reflect").squeeze(1)
    spec = torch.stft(x, n_fft, hop, n_fft, torch.hann_window(n_fft), center=False, return_complex=True)
    basis = torch.from_numpy(common.mel_filterbank(sr, n_fft, n_mels, 0.0, sr / 2))
    return torch.log10(torch.clamp(basis @ torch.sqrt(spec.abs() ** 2 + 1e-9), min=1e-5))


def test_log_mel_is_the_official_log10_audio2mel():
    torch.manual_seed(0)
    cfg = make_cfg()
    wav = 0.3 * torch.randn(2, 1, 4096)
    mel = melgan.log_mel(wav, cfg)
    assert mel.shape == (2, 80, 4096 // 256)
    assert torch.allclose(mel, ref_audio2mel(wav), atol=1e-4)        # log10 (an ln mel is 2.3x larger)


# ----------------------------------------------------------------------------- golden training step

def ref_discriminate(D, x):
    """§2.2: the sub-discriminators on x, then on x average-pooled 2x and 4x (padding not counted)."""
    outs = []
    for k, d in enumerate(D.discriminators):
        if k:
            x = F.avg_pool1d(x, 4, stride=2, padding=1, count_include_pad=False)
        outs.append(d(x))
    return outs


def ref_train_step(G, D, wav, mel, lr_g, lr_d):
    """One step of the official loop with plain SGD, transcribed from §2.3 (Eqs. 1-4) and scripts/train.py."""
    fake = G(mel)
    real, fake_d = ref_discriminate(D, wav), ref_discriminate(D, fake.detach())
    # Eq. 1: hinge loss of each discriminator k, mean over its windows, summed over k
    loss_d = sum(F.relu(1 - r[-1]).mean() + F.relu(1 + f[-1]).mean() for r, f in zip(real, fake_d))
    D.zero_grad()
    loss_d.backward()
    with torch.no_grad():
        for p in D.parameters():
            p -= lr_d * p.grad
    fake_g = ref_discriminate(D, fake)
    loss_adv = sum(-f[-1].mean() for f in fake_g)                              # Eq. 2
    # Eq. 3 with the official weights: every hidden layer (not the logits) of every scale,
    # L1 to the real features of the D pass before D's update, weighted 1/num_D * 4/(n_layers + 1)
    loss_fm = sum(1 / 3 * 4 / 5 * (fl - rl.detach()).abs().mean()
                  for r, f in zip(real, fake_g) for rl, fl in zip(r[:-1], f[:-1]))
    G.zero_grad()
    (loss_adv + 10 * loss_fm).backward()                                       # Eq. 4, lambda = 10
    with torch.no_grad():
        for p in G.parameters():
            p -= lr_g * p.grad
    mel_l1 = (ref_audio2mel(fake.detach()) - mel).abs().mean()
    return dict(g=loss_adv.item(), fm=loss_fm.item(), d=loss_d.item(), mel=mel_l1.item())


class FixedSampler:
    def __init__(self, x):
        self.x = x

    def next(self):
        return self.x.clone(), None


def test_golden_step_matches_the_papers_objective():
    torch.manual_seed(0)
    cfg = make_cfg()
    state = melgan.build(cfg, CPU)
    lr_g, lr_d = 0.05, 1.0                                   # large enough to move every weight measurably
    state["opt_g"] = torch.optim.SGD(state["G"].parameters(), lr=lr_g)
    state["opt_d"] = torch.optim.SGD(state["D"].parameters(), lr=lr_d)
    G0, D0 = copy.deepcopy(state["G"]), copy.deepcopy(state["D"])
    start = {n: [p.detach().clone() for p in m.parameters()] for n, m in (("G", G0), ("D", D0))}
    t = torch.arange(cfg.segment) / cfg.sample_rate
    raw = torch.stack([0.5 * torch.sin(2 * torch.pi * 180 * t), 0.3 * torch.sin(2 * torch.pi * 950 * t)])
    raw = raw + 0.05 * torch.randn_like(raw)                                    # (B, T)
    wav, mel = melgan.get_batch(FixedSampler(raw), cfg, CPU)
    gain = wav[:, 0] / raw                                                     # official augmentation: one gain per clip
    assert torch.allclose(gain, gain[:, :1].expand_as(gain), atol=1e-5) and 0.3 <= gain.min() <= gain.max() < 1
    assert torch.allclose(mel, ref_audio2mel(wav), atol=1e-4)
    for step in (1, 2):  # two steps: a gradient left over from step 1 (a missing zero_grad) shows in step 2
        got = melgan.train_step(state, (wav, mel), cfg, CPU)
        want = ref_train_step(G0, D0, wav, ref_audio2mel(wav), lr_g, lr_d)
        for k, v in want.items():
            assert got[k].item() == pytest.approx(v, rel=1e-4, abs=1e-6), (step, k, got[k].item(), v)
    for name, ref in (("G", G0), ("D", D0)):
        moved = 0.0
        for (pn, p), pr, p0 in zip(state[name].named_parameters(), ref.parameters(), start[name]):
            step = (pr - p0).abs().max().item()
            assert (p - pr).abs().max().item() <= 1e-3 * step + 1e-7, f"{name}.{pn}: update differs from the reference"
            moved = max(moved, step)
        assert moved > 1e-3, f"the reference step did not move {name}"


# ----------------------------------------------------------------------------- official weights

def test_official_weights_match_parallel_wavegan_melgan(tmp_path):
    """parallel_wavegan's MelGANGenerator computes the official Generator(80, 32, 3) function (same layers, same
    order, same paddings); renamed to the official keys it stands in for linda_johnson.pt, which --mode=sample
    loads on a CPU (where the `small` preset is the default) by reading the size from the tensors."""
    signal = require("scipy.signal", "scipy")
    if not hasattr(signal, "kaiser"):
        signal.kaiser = signal.windows.kaiser
    MelGANGenerator = require("parallel_wavegan.models", "parallel_wavegan").MelGANGenerator
    torch.manual_seed(0)
    ref = MelGANGenerator().eval()
    official = {k.replace("melgan.", "model.", 1).replace(".stack.", ".block.").replace(".skip_layer.", ".shortcut."): v
                for k, v in ref.state_dict().items()}
    # the key pattern of the released files (reference card: descriptinc/melgan-neurips)
    prefixes = {k.rsplit(".", 1)[0] for k in official}
    expected = {"model.1", "model.3", "model.8", "model.13", "model.18", "model.24"}
    for n in (4, 5, 6, 9, 10, 11, 14, 15, 16, 19, 20, 21):
        expected |= {f"model.{n}.block.2", f"model.{n}.block.4", f"model.{n}.shortcut"}
    assert prefixes == expected
    assert official["model.3.weight_g"].shape == (512, 1, 1)  # transposed conv: norm over the input axis
    path = tmp_path / "linda_johnson.pt"
    torch.save(official, path)
    cfg = make_cfg("small", init_from=str(path), mode="sample", out_dir=str(tmp_path))
    G = melgan.load_for_inference(cfg, CPU)
    assert (cfg.channels, cfg.upsample_rates, cfg.dilations) == (512, (8, 8, 2, 2), (1, 3, 9))
    mel = torch.randn(1, 80, 12) - 4
    with torch.no_grad():
        want = ref(mel)
        assert (G(mel) - want).abs().max().item() <= 1e-5
        assert (common.remove_weight_norm(G)(mel) - want).abs().max().item() <= 1e-5
    with pytest.raises(SystemExit, match="unexpected key"):
        melgan.load_official(melgan.Generator(make_cfg("paper")), dict(official, **{"model.24.foo": torch.zeros(1)}),
                             make_cfg("paper"))


def test_official_file_size_is_inferred_and_checked(tmp_path):
    torch.manual_seed(0)
    src = melgan.Generator(make_cfg("paper", channels=256))
    torch.save(official_file(src), tmp_path / "netG.pt")
    cfg = make_cfg("small", init_from=str(tmp_path / "netG.pt"), mode="sample", out_dir=str(tmp_path))
    G = melgan.load_for_inference(cfg, CPU)
    assert cfg.channels == 256
    mel = torch.randn(1, 80, 6) - 4
    with torch.no_grad():
        assert torch.allclose(G(mel), src(mel), atol=1e-6)
    # fine-tuning (--init_from=PATH in train) loads it into the configured model: a size mismatch names the flag
    with pytest.raises(SystemExit, match="--channels=256"):
        melgan.load_official(melgan.Generator(make_cfg("small")), official_file(src), make_cfg("small"))
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="official MelGAN generator"):
        melgan.load_for_inference(make_cfg(init_from=str(tmp_path / "other.pt"), mode="sample"), CPU)


# ----------------------------------------------------------------------------- command line

def test_cli_contract_and_a_new_lr_on_resume(tmp_path):
    out = check_cli_contract("melgan.py", tmp_path, bench_keys=("train_audio_s_per_s", "infer_rtf_eager", "params_d"))
    assert "eval val" in out["train"] and "eval test" in out["eval"]
    # one unit per quantity: the eval line's mel is the training log's log10-mel L1
    assert "| mel " in out["train"].splitlines()[-2] and "| mel " in out["eval"]
    d = tmp_path / "run"
    for name in ("vocoded", "orig"):  # --mode=eval's whole test clips, for the corpus ASR to judge
        assert (d / "listen" / name / "refs.txt").read_text().count("\t") >= 1
    ckpt = common.load_checkpoint(str(d / "ckpt.pt"))
    # a changed --lr on resume takes effect: 1e30 must blow up and stop, the checkpoint left as it was
    one_line_error(melgan.train, make_cfg(init_from="resume", lr=1e30, max_iters=9, out_dir=str(d)),
                   match=r"step 6 \(diverged\)")
    after = common.load_checkpoint(str(d / "ckpt.pt"))
    assert after["step"] == ckpt["step"] == 5
    assert all(torch.equal(v, after["models"]["G"][k]) for k, v in ckpt["models"]["G"].items())
    # our checkpoint under another architecture or paper is refused, naming the flag
    with pytest.raises(SystemExit, match="channels"):
        melgan.load_for_inference(make_cfg(channels=64, init_from=str(d / "ckpt.pt"), mode="sample"), CPU)
    ckpt["paper"] = "hifigan"
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="hifigan"):
        melgan.load_for_inference(make_cfg(init_from=str(tmp_path / "other.pt"), mode="sample"), CPU)


def test_bad_data_stops_before_the_first_step(tmp_path):
    base = dict(max_iters=2, out_dir=str(tmp_path / "out"))
    one_line_error(melgan.train, make_cfg(data_dir=audio_folder(tmp_path, "nan", 4, 3000, nan=True), **base), match="NaN")
    one_line_error(melgan.train, make_cfg(data_dir=audio_folder(tmp_path, "two", 2, 3000), **base), match="at least 3")
    one_line_error(melgan.train, make_cfg(data_dir=audio_folder(tmp_path, "short", 4, 1000), **base), match="shorter than 2048")
    assert not os.path.exists(tmp_path / "out" / "ckpt.pt")


def test_bad_values_give_one_line(tmp_path):
    one_line_error(melgan.evaluate, make_cfg(mode="eval", out_dir=str(tmp_path)), match="needs a trained generator")
    one_line_error(melgan.evaluate, make_cfg(mode="eval", init_from="resume", out_dir=str(tmp_path)),
                   match="does not exist")
    with pytest.raises(SystemExit, match="does not exist"):
        make_cfg(mode="sample", input="/no/such.wav")
    for flags, what in ((dict(segment=1000), "--segment"), (dict(batch_size=0), "batch_size"), (dict(ndf=6), "ndf"),
                        (dict(hop=200), "upsample_rates"),
                        (dict(fmax=20000), "fmax"), (dict(betas="0.5,1.5"), "betas"), (dict(chanels=64), "--channels"),
                        (dict(channels="wide"), "not a valid int")):
        with pytest.raises(SystemExit, match=what):
            make_cfg(**flags)


def test_optimizers_are_the_papers_adam():
    # §3 / the official train.py: Adam, lr 1e-4, betas (0.5, 0.9), no weight decay, for G and D alike; the golden
    # step swaps in SGD, so the optimizer itself is pinned here, written out rather than read from Config
    paper = make_cfg("paper")
    assert paper.lr == 1e-4 and tuple(paper.betas) == (0.5, 0.9)
    cfg = make_cfg()
    state = melgan.build(cfg, CPU)
    for net in ("g", "d"):
        opt = state[f"opt_{net}"]
        group = opt.param_groups[0]
        assert type(opt) is torch.optim.Adam, type(opt)
        assert group["lr"] == cfg.lr and tuple(group["betas"]) == tuple(cfg.betas) and group["weight_decay"] == 0
        assert {id(p) for p in group["params"]} == {id(p) for p in state[net.upper()].parameters()}
