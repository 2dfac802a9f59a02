"""Tests for hifigan.py: shapes, parameter counts, the official key map and size inference, a golden training
step against the paper's objective written out here, the lr cadence, the mels, the optimizer, and the command
line.

What pins each term of the paper file (expected values are written out in the tests, never taken from
hifigan.py):
- discriminator LSGAN loss, Eq. 1, over the 5 MPD + 3 MSD members: test_losses_on_hand_made_tensors,
  test_golden_step_matches_the_papers_objective
- generator adversarial loss, Eq. 2: the same two tests
- feature matching, Eq. 4 (every layer, the logits included; real features from the updated D, as train.py):
  the same two tests
- mel loss, Eq. 3, on the full band, while the generator's input mel stops at fmax:
  test_mel_loss_is_full_band_and_input_mel_stops_at_fmax, the golden step
- the weights lambda_fm = 2, lambda_mel = 45 of Eq. 5: test_golden_step_matches_the_papers_objective
- MPD folding by period with reflect padding, MSD pooling:
  test_period_discriminator_folds_by_period_with_reflect_padding, the golden step's ref_discriminate
- optimizer, AdamW betas (0.8, 0.99), weight decay 0.01, lr 2e-4: test_optimizers_are_the_papers_adamw
- schedule, lr x0.999 once per epoch: test_lr_decays_once_per_epoch, the golden step (--epoch_steps=1)
- sampler: none (the generator is deterministic); no augmentation: the golden step asserts the batch is the
  raw audio. The Slaney filterbank is pinned against librosa in test_common.
"""
import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import hifigan
from cli import check_cli_contract, require, audio_folder, one_line_error


def make_cfg(preset="tiny", **kw):
    return common.parse_config(hifigan.Config, hifigan.PRESETS, [f"--preset={preset}", "--device=cpu", "--compile=False"]
                               + [f"--{k}={v}" for k, v in kw.items()])


CPU = common.Runtime(torch.device("cpu"), "cpu", torch.float32)


def official_file(G):
    """Our Generator's weights as an official generator file: {'generator': ...} with old-style weight-norm keys."""
    leaf = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    out = {}
    for k, v in G.state_dict().items():
        for tail, new in leaf.items():
            k = k.replace(tail, new)
        out[k] = v.clone()
    return {"generator": out}


# ----------------------------------------------------------------------------- architecture

def test_generator_output_length_is_frames_times_hop():
    torch.manual_seed(0)
    for preset in ("tiny", "v3"):
        cfg = make_cfg(preset)
        G = hifigan.Generator(cfg)
        for frames in (4, 7):
            y = G(torch.randn(2, cfg.n_mels, frames))
            assert y.shape == (2, 1, frames * cfg.hop)
            assert y.abs().max() <= 1.0  # tanh output


def test_period_discriminator_folds_by_period_with_reflect_padding():
    cfg = make_cfg("tiny")
    T = 2048 + 3                                     # not a multiple of any period
    x = torch.randn(1, 1, T)
    for p in (2, 3, 5, 7, 11):
        d = hifigan.PeriodDiscriminator(cfg, p)
        seen = {}
        d.convs[0].register_forward_pre_hook(lambda m, inp: seen.update(x=inp[0]))
        fmaps = d(x)
        grid = seen["x"]                              # (B, 1, T/p, p)
        rows = -(-T // p)
        assert grid.shape == (1, 1, rows, p)
        flat = grid.reshape(-1)
        assert torch.equal(flat[:T], x.reshape(-1))   # column j holds samples j, j+p, j+2p, ...
        pad = rows * p - T
        if pad:                                       # the tail is the reflection of the last samples
            assert torch.equal(flat[T:], x.reshape(-1).flip(0)[1:pad + 1])
        assert len(fmaps) == 6 and fmaps[-1].shape[1] == 1 and fmaps[-1].shape[-1] == p


def test_discriminator_outputs():
    cfg = make_cfg("tiny")
    D = hifigan.Discriminator(cfg)
    outs = D(torch.randn(2, 1, 4096) * 0.1)
    assert len(outs) == 5 + 3                         # MPD periods 2, 3, 5, 7, 11, then MSD scales
    assert all(len(o) == 6 for o in outs[:5]) and all(len(o) == 8 for o in outs[5:])
    assert [o[-1].shape[-1] for o in outs[5:]] == [64, 33, 17]   # window logits at 1x, 2x, 4x pooled
    # spectral norm on the raw-scale MSD member only (§2.2)
    assert hasattr(D.msd[0].convs[0].parametrizations.weight[0], "_u")
    assert not hasattr(D.msd[1].convs[0].parametrizations.weight[0], "_u")


def test_parameter_counts_match_official():
    counts = {p: common.count_params(hifigan.Generator(make_cfg(p))) for p in ("v1", "v2", "v3")}
    assert counts == {"v1": 13_936_130, "v2": 928_514, "v3": 1_464_322}   # card: 13.94 M, 0.93 M, 1.46 M
    D = hifigan.Discriminator(make_cfg("v1"))
    assert round(sum(common.count_params(m) for m in D.mpd) / 1e6, 1) == 41.1
    assert round(sum(common.count_params(m) for m in D.msd) / 1e6, 1) == 29.6


def test_small_discriminator_is_a_cpu_sized_critic():
    """The docstring's figure: the `small` preset's discriminators hold 0.19 M parameters (the paper's 70.7 M)."""
    assert round(common.count_params(hifigan.Discriminator(make_cfg("small"))) / 1e6, 2) == 0.19


# ----------------------------------------------------------------------------- loss and features

def test_losses_on_hand_made_tensors():
    one, zero = torch.ones(2, 1, 5), torch.zeros(2, 1, 5)
    feats = [torch.randn(2, 3, 5) for _ in range(5)]
    real = [feats + [one] for _ in range(8)]
    fake = [feats + [zero] for _ in range(8)]
    assert hifigan.discriminator_loss(real, fake).item() == 0.0   # LSGAN optimum: real 1, fake 0
    assert hifigan.discriminator_loss(fake, real).item() == pytest.approx(8 * 2.0)
    assert hifigan.generator_loss(fake).item() == pytest.approx(8 * 1.0)
    assert hifigan.generator_loss(real).item() == 0.0
    shifted = [[f + 1 for f in feats] + [one] for _ in range(8)]
    # every layer, the logits included (the official feature_loss): 8 discriminators x 5 hidden layers x |1|
    assert hifigan.feature_loss(real, shifted).item() == pytest.approx(8 * 5)
    assert hifigan.feature_loss(real, fake).item() == pytest.approx(8 * 1)


def ref_mel(wav, fmax, sr=22050, n_fft=1024, hop=256, n_mels=80):
    """The official meldataset.mel_spectrogram, written out: reflect-pad (n_fft - hop) / 2, sqrt(re^2 + im^2 + 1e-9)
    of the Hann STFT, Slaney mel up to fmax (None: Nyquist), natural log of the clamp at 1e-5."""
    p = (n_fft - hop) // 2
    x = F.pad(wav.reshape(-1, wav.shape[-1]).unsqueeze(1), (p, p), mode="reflect").squeeze(1)
    spec = torch.stft(x, n_fft, hop, n_fft, torch.hann_window(n_fft), center=False, return_complex=True)
    basis = torch.from_numpy(common.mel_filterbank(sr, n_fft, n_mels, 0.0, fmax or sr / 2))
    return torch.log(torch.clamp(basis @ torch.sqrt(spec.abs() ** 2 + 1e-9), min=1e-5))


def test_mel_loss_is_full_band_and_input_mel_stops_at_fmax():
    cfg = make_cfg("tiny")
    t = torch.arange(4096) / cfg.sample_rate
    tone = 0.5 * torch.sin(2 * torch.pi * 10000 * t) + 0.3 * torch.sin(2 * torch.pi * 300 * t)
    assert torch.allclose(hifigan.log_mel(tone, cfg), ref_mel(tone, 8000)[0], atol=1e-4)    # the generator's input
    full = (ref_mel(tone, None) - ref_mel(torch.zeros(4096), None)).abs().mean().item()
    band = (ref_mel(tone, 8000) - ref_mel(torch.zeros(4096), 8000)).abs().mean().item()
    assert abs(full - band) > 0.05 * full                     # the two mels disagree about the 10 kHz partial
    assert hifigan.mel_loss(tone[None, None], torch.zeros(1, 1, 4096), cfg).item() == pytest.approx(full, rel=1e-4)


# ----------------------------------------------------------------------------- golden training step

def ref_discriminate(D, x):
    """§2.3: the MPD's sub-discriminators on x; the MSD's on x, then average-pooled (4, 2, padding 2) once, twice."""
    outs = [d(x) for d in D.mpd]
    for k, d in enumerate(D.msd):
        if k:
            x = F.avg_pool1d(x, 4, stride=2, padding=2)
        outs.append(d(x))
    return outs


def ref_train_step(G, D, wav, mel, lr_g, lr_d):
    """One step of the official loop with plain SGD, transcribed from §2.4 (Eqs. 1-5) and train.py."""
    fake = G(mel)
    real, fake_d = ref_discriminate(D, wav), ref_discriminate(D, fake.detach())
    loss_d = sum(torch.mean((1 - r[-1]) ** 2) + torch.mean(f[-1] ** 2) for r, f in zip(real, fake_d))  # Eq. 1
    D.zero_grad()
    loss_d.backward()
    with torch.no_grad():
        for p in D.parameters():
            p -= lr_d * p.grad
        real = ref_discriminate(D, wav)                        # train.py: real features from the updated D
    fake_g = ref_discriminate(D, fake)
    loss_adv = sum(torch.mean((1 - f[-1]) ** 2) for f in fake_g)                                      # Eq. 2
    # Eq. 4: mean L1 of every feature map, the logits included, summed over layers and discriminators
    loss_fm = sum(torch.mean(torch.abs(rl - fl)) for r, f in zip(real, fake_g) for rl, fl in zip(r, f))
    loss_mel = F.l1_loss(ref_mel(fake, None), ref_mel(wav, None))   # Eq. 3 on the full band (fmax_for_loss null)
    G.zero_grad()
    (loss_adv + 2 * loss_fm + 45 * loss_mel).backward()                                               # Eq. 5
    with torch.no_grad():
        for p in G.parameters():
            p -= lr_g * p.grad
    return dict(g=loss_adv.item(), fm=loss_fm.item(), d=loss_d.item(), mel=loss_mel.item())


class FixedSampler:
    def __init__(self, x):
        self.x = x

    def next(self):
        return self.x.clone(), None


def tiny_state(**kw):
    torch.manual_seed(0)
    cfg = make_cfg(**kw)
    state = hifigan.build(cfg, CPU)
    for m in state["D"].modules():        # freeze spectral norm's power iteration, so both sides see one sigma
        if type(m).__name__ == "_SpectralNorm":
            m.eval()
    t = torch.arange(cfg.segment) / cfg.sample_rate
    raw = torch.stack([0.5 * torch.sin(2 * torch.pi * 180 * t), 0.3 * torch.sin(2 * torch.pi * 950 * t)])
    raw = raw + 0.05 * torch.randn_like(raw)                    # (B, T)
    return cfg, state, hifigan.get_batch(FixedSampler(raw), cfg, CPU), raw


def test_golden_step_matches_the_papers_objective():
    cfg, state, (wav, mel), raw = tiny_state(epoch_steps=1)
    assert torch.equal(wav[:, 0], raw)                          # no gain augmentation in HiFi-GAN
    assert torch.allclose(mel, ref_mel(wav, 8000), atol=1e-4)  # the generator's input mel stops at 8 kHz
    lr_g, lr_d = 0.05, 0.5                                      # large enough to move every weight measurably
    for net, lr in (("g", lr_g), ("d", lr_d)):
        decay = state[f"sched_{net}"].lr_lambdas[0]
        state[f"opt_{net}"] = torch.optim.SGD(state[net.upper()].parameters(), lr=lr)
        state[f"sched_{net}"] = torch.optim.lr_scheduler.LambdaLR(state[f"opt_{net}"], decay)
    G0, D0 = copy.deepcopy(state["G"]), copy.deepcopy(state["D"])
    start = {n: [p.detach().clone() for p in m.parameters()] for n, m in (("G", G0), ("D", D0))}
    for step in (1, 2):  # two steps: a gradient left over from step 1 (a missing zero_grad) shows in step 2
        got = hifigan.train_step(state, (wav, mel), cfg, CPU)
        decay = 0.999 ** ((step - 1) // 1)                     # --epoch_steps=1: the lr falls after every step
        want = ref_train_step(G0, D0, wav, ref_mel(wav, 8000), lr_g * decay, lr_d * decay)
        for k, v in want.items():
            assert got[k].item() == pytest.approx(v, rel=1e-4, abs=1e-6), (step, k, got[k].item(), v)
    for name, ref in (("G", G0), ("D", D0)):
        moved = 0.0
        for (pn, p), pr, p0 in zip(state[name].named_parameters(), ref.parameters(), start[name]):
            step = (pr - p0).abs().max().item()
            assert (p - pr).abs().max().item() <= 1e-3 * step + 1e-7, f"{name}.{pn}: update differs from the reference"
            moved = max(moved, step)
        assert moved > 1e-3, f"the reference step did not move {name}"


def test_lr_decays_once_per_epoch():
    """§3: lr x0.999 per epoch (official ExponentialLR stepped per epoch). Our schedulers step every step
    (last_epoch = step) with a factor that counts whole epochs of cfg.epoch_steps."""
    cfg, state, batch, _ = tiny_state(epoch_steps=2)
    lrs = []
    for step in (1, 2, 3):
        hifigan.train_step(state, batch, cfg, CPU)
        assert state["sched_g"].last_epoch == state["sched_d"].last_epoch == step
        lrs.append((state["opt_g"].param_groups[0]["lr"], state["opt_d"].param_groups[0]["lr"]))
    want = [2e-4 * 0.999 ** (s // 2) for s in (1, 2, 3)]
    assert [g for g, _ in lrs] == pytest.approx(want, rel=1e-9) and [d for _, d in lrs] == pytest.approx(want, rel=1e-9)


# ----------------------------------------------------------------------------- official weights

@pytest.mark.parametrize("preset", ["v1", "v3"])
def test_official_weights_match_parallel_wavegan_hifigan(preset, tmp_path):
    """parallel_wavegan's HiFiGANGenerator equals the official generator once its keys are mapped
    (reference_packages.md); saved as an official {'generator': ...} file, --mode=sample loads it on a CPU
    (where the `small` preset is the default) by reading its size from the tensors."""
    signal = require("scipy.signal", "scipy")
    if not hasattr(signal, "kaiser"):
        signal.kaiser = signal.windows.kaiser
    HiFiGANGenerator = require("parallel_wavegan.models", "parallel_wavegan").HiFiGANGenerator
    cfg = make_cfg(preset)
    torch.manual_seed(0)
    ref = HiFiGANGenerator(channels=cfg.channels, upsample_scales=cfg.upsample_rates,
                           upsample_kernel_sizes=cfg.upsample_kernels, resblock_kernel_sizes=cfg.resblock_kernels,
                           resblock_dilations=cfg.resblock_dilations, use_additional_convs=cfg.resblock == "1").eval()
    type2 = cfg.resblock == "2"

    def official_key(k):  # conv_pre <-> input_conv, ups.i <-> upsamples.i.1, ... (reference_packages.md)
        k = k.replace("input_conv.", "conv_pre.").replace("output_conv.1.", "conv_post.")
        k = k.replace("upsamples.", "ups.").replace("blocks.", "resblocks.")
        parts = k.split(".")
        if parts[0] == "ups":
            del parts[2]                                            # ups.i.1.weight_g -> ups.i.weight_g
        if parts[0] == "resblocks":
            del parts[4]                                            # resblocks.k.convs1.j.1.* -> resblocks.k.convs1.j.*
            if type2:
                parts[2] = "convs"
        return ".".join(parts)
    official = {official_key(k): v for k, v in ref.state_dict().items()}
    assert "ups.0.weight_v" in official and official["ups.0.weight_g"].shape == (cfg.channels, 1, 1)
    assert ("resblocks.11.convs2.2.bias" in official) if not type2 else ("resblocks.8.convs.1.bias" in official)
    path = tmp_path / f"generator_{preset}"
    torch.save({"generator": official}, path)
    small = make_cfg("small", init_from=str(path), mode="sample", out_dir=str(tmp_path))
    G = hifigan.load_for_inference(small, CPU)
    for k in ("channels", "upsample_rates", "upsample_kernels", "resblock", "resblock_kernels", "resblock_dilations"):
        assert getattr(small, k) == getattr(cfg, k), k
    mel = torch.randn(1, 80, 5) - 4
    with torch.no_grad():
        want = ref(mel)
        assert (G(mel) - want).abs().max().item() <= 1e-5
        assert (common.remove_weight_norm(G)(mel) - want).abs().max().item() <= 1e-5
    with pytest.raises(SystemExit, match="official HiFi-GAN generator"):
        hifigan.load_official(hifigan.Generator(cfg), official, cfg)    # a raw dict is not the official format


def test_official_file_size_is_checked_when_fine_tuning(tmp_path):
    src = hifigan.Generator(make_cfg("v3"))
    with pytest.raises(SystemExit, match="--channels=256 .*--resblock=2"):
        hifigan.load_official(hifigan.Generator(make_cfg("small")), official_file(src), make_cfg("small"))
    torch.save({"mpd": {}, "msd": {}}, tmp_path / "do_02500000")
    with pytest.raises(SystemExit, match="do_\\* files hold only the discriminators"):
        hifigan.load_for_inference(make_cfg(init_from=str(tmp_path / "do_02500000"), mode="sample"), CPU)


# ----------------------------------------------------------------------------- command line

def test_cli_contract_and_a_new_lr_on_resume(tmp_path):
    out = check_cli_contract("hifigan.py", tmp_path, bench_keys=("train_audio_s_per_s", "infer_rtf_eager", "params_d"))
    assert "eval val" in out["train"] and "eval test" in out["eval"]
    assert "an epoch (lr decay x0.999) is 12 steps" in out["train"]   # 24 training clips / batch 2
    d = tmp_path / "run"
    for name in ("vocoded", "orig"):  # --mode=eval's whole test clips, for the corpus ASR to judge
        assert (d / "listen" / name / "refs.txt").read_text().count("\t") >= 1
    ckpt = common.load_checkpoint(str(d / "ckpt.pt"))
    assert ckpt["state"]["sched_g"]["last_epoch"] == 5               # the schedule is in the checkpoint
    # a changed --lr on resume takes effect: 1e30 must blow up and stop, the checkpoint left as it was
    one_line_error(hifigan.train, make_cfg(init_from="resume", lr=1e30, max_iters=9, out_dir=str(d)),
                   match=r"step 6 \(diverged\)")
    after = common.load_checkpoint(str(d / "ckpt.pt"))
    assert after["step"] == ckpt["step"] == 5
    assert all(torch.equal(v, after["models"]["G"][k]) for k, v in ckpt["models"]["G"].items())
    # our checkpoint under another architecture, feature setting or paper is refused, naming the flag
    with pytest.raises(SystemExit, match="channels"):
        hifigan.load_for_inference(make_cfg(channels=64, init_from=str(d / "ckpt.pt"), mode="sample"), CPU)
    with pytest.raises(SystemExit, match="fmax"):
        hifigan.load_for_inference(make_cfg(fmax=7000, init_from=str(d / "ckpt.pt"), mode="sample"), CPU)
    ckpt["paper"] = "melgan"
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="melgan"):
        hifigan.load_for_inference(make_cfg(init_from=str(tmp_path / "other.pt"), mode="sample"), CPU)


def test_sample_from_an_official_file_on_a_cpu(tmp_path, capsys):
    """`--mode=sample --init_from=generator_v2` with no preset: the CPU default (`small`) must not matter
    (it stopped with "shape mismatch" before). In-process: the same parse_config -> sample() path as the CLI."""
    torch.manual_seed(0)
    torch.save(official_file(hifigan.Generator(make_cfg("v2"))), tmp_path / "generator_v2")
    args = ["--mode=sample", f"--init_from={tmp_path / 'generator_v2'}", "--corpus_hours=0.02", f"--out_dir={tmp_path}"]
    if torch.cuda.is_available():
        args.append("--device=cpu")
    hifigan.sample(common.parse_config(hifigan.Config, hifigan.PRESETS, args))
    out = capsys.readouterr().out
    assert "read from its tensors" in out and "channels 128" in out
    assert any(f.endswith(".wav") for f in os.listdir(tmp_path / "samples"))


def test_bad_data_stops_before_the_first_step(tmp_path):
    base = dict(max_iters=2, out_dir=str(tmp_path / "out"))
    one_line_error(hifigan.train, make_cfg(data_dir=audio_folder(tmp_path, "nan", 4, 3000, nan=True), **base), match="NaN")
    one_line_error(hifigan.train, make_cfg(data_dir=audio_folder(tmp_path, "two", 2, 3000), **base), match="at least 3")
    one_line_error(hifigan.train, make_cfg(data_dir=audio_folder(tmp_path, "short", 4, 1000), **base), match="shorter than 2048")
    assert not os.path.exists(tmp_path / "out" / "ckpt.pt")


def test_bad_values_give_one_line(tmp_path):
    one_line_error(hifigan.evaluate, make_cfg(mode="eval", out_dir=str(tmp_path)), match="needs a trained generator")
    one_line_error(hifigan.evaluate, make_cfg(mode="eval", init_from="resume", out_dir=str(tmp_path)),
                   match="does not exist")
    with pytest.raises(SystemExit, match="does not exist"):
        make_cfg(mode="sample", input="/no/such.wav")
    for flags, what in ((dict(segment=1000), "--segment"), (dict(batch_size=0), "batch_size"),
                        (dict(upsample_kernels="16,16,4"), "upsample_kernels"), (dict(hop=200), "upsample_rates"), (dict(fmax=20000), "fmax"), (dict(lr_decay=1.5), "lr_decay"),
                        (dict(d_max_channels=24), "d_max_channels"), (dict(resblock=3), "resblock"),
                        (dict(chanels=64), "--channels"), (dict(channels="wide"), "not a valid int")):
        with pytest.raises(SystemExit, match=what):
            make_cfg(**flags)


def test_optimizers_are_the_papers_adamw():
    # §3: AdamW with beta1 0.8, beta2 0.99, weight decay 0.01, lr 2e-4, for G and D alike; the golden step swaps
    # in SGD, so the optimizer itself is pinned here, the paper's values written out
    v1 = make_cfg("v1")
    assert v1.lr == 2e-4 and tuple(v1.betas) == (0.8, 0.99) and v1.weight_decay == 0.01 and v1.lr_decay == 0.999
    cfg, state, _, _ = tiny_state()
    for net in ("g", "d"):
        opt = state[f"opt_{net}"]
        group = opt.param_groups[0]
        assert type(opt) is torch.optim.AdamW, type(opt)
        assert group["lr"] == cfg.lr and tuple(group["betas"]) == (0.8, 0.99) and group["weight_decay"] == 0.01
        assert {id(p) for p in group["params"]} == {id(p) for p in state[net.upper()].parameters()}
