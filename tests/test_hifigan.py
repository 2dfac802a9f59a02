"""Tests for hifigan.py: shapes, parameter counts, losses, the official key map, one GAN step, the command line."""
import contextlib
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from cli import run_script  # noqa: E402
import hifigan  # noqa: E402



def make_cfg(preset="tiny", **kw):
    return common.parse_config(hifigan.Config, hifigan.PRESETS, [f"--preset={preset}", "--device=cpu", "--compile=False"]
                               + [f"--{k}={v}" for k, v in kw.items()])


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


def test_losses():
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


def test_mel_loss_is_full_band_and_input_mel_stops_at_fmax():
    cfg = make_cfg("tiny")
    t = torch.arange(4096) / cfg.sample_rate
    tone = 0.5 * torch.sin(2 * torch.pi * 10000 * t)          # above the input mel's fmax of 8 kHz
    inner = slice(2, -2)                                      # frames away from the clip edges
    assert hifigan.log_mel(tone, cfg)[:, inner].max() < -6    # near silent in the generator's input mel
    assert hifigan.log_mel(tone, cfg, fmax=cfg.fmax_loss)[:, inner].max() > -2   # loud in the loss mel
    assert hifigan.mel_loss(tone[None, None], torch.zeros(1, 1, 4096), cfg).item() > 0.1


@pytest.mark.parametrize("preset", ["v1", "v3"])
def test_official_weights_match_parallel_wavegan_hifigan(preset, tmp_path):
    """parallel_wavegan's HiFiGANGenerator equals the official generator once its keys are mapped
    (reference_packages.md); save it as an official {'generator': ...} file, load it through --init_from's path."""
    scipy_signal = pytest.importorskip("scipy.signal")
    if not hasattr(scipy_signal, "kaiser"):
        scipy_signal.kaiser = scipy_signal.windows.kaiser
    try:
        from parallel_wavegan.models import HiFiGANGenerator
    except ImportError as e:
        pytest.skip(f"parallel_wavegan not installed ({e}); pip install --no-build-isolation parallel_wavegan")
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
    path = tmp_path / "generator_official"
    torch.save({"generator": official}, path)
    G = hifigan.Generator(cfg)
    hifigan.load_official(G, common.load_checkpoint(str(path)))
    mel = torch.randn(1, 80, 5) - 4
    with torch.no_grad():
        want = ref(mel)
        assert (G(mel) - want).abs().max().item() <= 1e-5
        assert (hifigan.remove_weight_norm(G)(mel) - want).abs().max().item() <= 1e-5
    with pytest.raises(SystemExit, match="generator"):
        hifigan.load_official(hifigan.Generator(cfg), official)    # a raw dict is not the official format


def test_tiny_gan_step_updates_both_networks():
    torch.manual_seed(0)
    cfg = make_cfg()
    G, D = hifigan.Generator(cfg), hifigan.Discriminator(cfg)
    opt_g = torch.optim.AdamW(G.parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.AdamW(D.parameters(), lr=cfg.lr, betas=cfg.betas)
    g0 = [p.detach().clone() for p in G.parameters()]
    d0 = [p.detach().clone() for p in D.parameters()]
    wav = (torch.rand(2, 1, cfg.segment) - 0.5) * 0.5
    losses = hifigan.gan_step(G, D, opt_g, opt_d, wav, hifigan.log_mel(wav, cfg), cfg, contextlib.nullcontext)
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(not torch.equal(a, b) for a, b in zip(g0, G.parameters()))   # every generator tensor moved
    assert all(not torch.equal(a, b) for a, b in zip(d0, D.parameters()))   # every discriminator tensor moved


def test_tiny_generator_overfits_one_clip_with_the_mel_loss():
    torch.manual_seed(0)
    cfg = make_cfg()
    G = hifigan.Generator(cfg)
    opt = torch.optim.AdamW(G.parameters(), lr=3e-3, betas=cfg.betas)
    t = torch.arange(cfg.segment) / cfg.sample_rate
    wav = (0.3 * torch.sin(2 * torch.pi * 220 * t) * torch.sin(2 * torch.pi * 3 * t))[None, None]  # (1, 1, T)
    mel = hifigan.log_mel(wav, cfg)
    first = None
    for _ in range(20):
        loss = hifigan.mel_loss(G(mel), wav, cfg)
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 3, (first, loss.item())   # ~5.0 -> ~0.9 in 20 steps


def test_config_errors():
    with pytest.raises(SystemExit, match="did you mean --channels"):
        make_cfg(chanels=64)
    with pytest.raises(SystemExit, match="not a valid int"):
        make_cfg(channels="wide")


# ----------------------------------------------------------------------------- command line

def run(*args):
    return run_script("hifigan.py", *args).stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("hifigan"))
    flags = ["--preset=tiny", "--device=cpu", "--compile=False", f"--out_dir={d}"]
    run(*flags, "--max_iters=3")
    assert os.path.exists(os.path.join(d, "ckpt.pt"))
    return d, flags


def test_cli_resume_continues_exactly(trained, tmp_path):
    d, flags = trained
    assert common.load_checkpoint(os.path.join(d, "ckpt.pt"))["step"] == 3
    out = run(*flags, "--init_from=resume", "--max_iters=5")
    assert "step 5/5" in out
    resumed = common.load_checkpoint(os.path.join(d, "ckpt.pt"))
    assert resumed["step"] == 5
    # the same 5 steps in one go, in-process, must give bit-identical weights (one thread here as in run():
    # another thread count sums convolution gradients in another order)
    straight = str(tmp_path / "straight")
    hifigan.train(make_cfg(max_iters=5, out_dir=straight))
    ref = common.load_checkpoint(os.path.join(straight, "ckpt.pt"))
    for net in ("G", "D"):
        for k, v in ref["models"][net].items():
            assert torch.equal(v, resumed["models"][net][k]), f"{net}.{k} differs after resume"


def test_cli_sample_writes_wav_and_png(trained):
    d, flags = trained
    run(*flags, "--mode=sample", f"--init_from={d}/ckpt.pt")
    files = os.listdir(os.path.join(d, "samples"))
    assert any(f.endswith(".wav") for f in files) and any(f.endswith(".png") for f in files)


def test_cli_bench_prints_one_json_line(trained):
    d, flags = trained
    line = [l for l in run(*flags, "--mode=bench").splitlines() if l.startswith("{")]
    assert len(line) == 1
    fig = json.loads(line[0])
    for k in ("train_step_ms", "train_audio_s_per_s", "infer_rtf_eager", "params", "params_d",
              "train_flops_per_step", "peak_memory_mb"):
        assert fig[k] is not None and fig[k] > 0, k


def test_checkpoint_from_other_paper_or_config_is_rejected(trained, tmp_path):
    d, _ = trained
    ckpt = common.load_checkpoint(os.path.join(d, "ckpt.pt"))
    rt = common.setup(make_cfg(out_dir=str(tmp_path)), log_to_file=False)
    with pytest.raises(SystemExit, match="channels"):   # same paper, different architecture
        hifigan.load_generator(make_cfg(channels=64, init_from=f"{d}/ckpt.pt"), rt)
    ckpt["paper"] = "melgan"
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="melgan"):
        hifigan.load_generator(make_cfg(init_from=str(tmp_path / "other.pt")), rt)
