"""Tests for melgan.py: shapes, parameter counts, losses, the official key map, one GAN step, the command line."""
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
import melgan  # noqa: E402



def make_cfg(preset="tiny", **kw):
    return common.parse_config(melgan.Config, melgan.PRESETS, [f"--preset={preset}", "--device=cpu", "--compile=False"]
                               + [f"--{k}={v}" for k, v in kw.items()])


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
    T = 8192
    outs = D(torch.randn(2, 1, T) * 0.1)
    assert len(outs) == 3  # raw, 2x and 4x pooled
    for i, fmaps in enumerate(outs):
        t = T // 2 ** i
        # 6 hidden feature maps (for feature matching) + the window logits, last
        assert [f.shape[1] for f in fmaps] == [16, 64, 256, 1024, 1024, 1024, 1]
        assert fmaps[0].shape[-1] == t
        assert fmaps[-1].shape == (2, 1, t // 256)  # one logit per window: 4 stride-4 layers


def test_parameter_counts_match_official():
    cfg = make_cfg("paper")
    g, d = common.count_params(melgan.Generator(cfg)), common.count_params(melgan.Discriminator(cfg))
    assert g == 4_266_050          # official Generator(80, 32, 3): 4.27 M (the paper rounds to 4.26 M)
    assert round(d / 1e6, 1) == 16.9  # official Discriminator(3, 16, 4, 4)


def test_losses():
    hi, lo = torch.full((2, 1, 5), 2.0), torch.full((2, 1, 5), -2.0)
    feats = [torch.randn(2, 3, 5) for _ in range(6)]
    real = [feats + [hi] for _ in range(3)]
    fake = [feats + [lo] for _ in range(3)]
    assert melgan.discriminator_loss(real, fake).item() == 0.0          # both beyond the hinge margin
    assert melgan.discriminator_loss(fake, real).item() == pytest.approx(3 * (3 + 3))
    assert melgan.generator_loss(fake).item() == pytest.approx(3 * 2.0)
    assert melgan.feature_loss(real, fake).item() == 0.0               # identical features
    shifted = [[f + 1 for f in feats] + [lo] for _ in range(3)]
    # 3 scales x 6 layers x |1| x 1/3 x 4/5
    assert melgan.feature_loss(real, shifted).item() == pytest.approx(6 * 4 / 5)


def test_official_weights_match_parallel_wavegan_melgan():
    """parallel_wavegan's MelGANGenerator computes the official Generator(80, 32, 3) function (same layers,
    same order, same paddings); renamed to the official keys it stands in for linda_johnson.pt."""
    scipy_signal = pytest.importorskip("scipy.signal")
    if not hasattr(scipy_signal, "kaiser"):
        scipy_signal.kaiser = scipy_signal.windows.kaiser
    try:
        from parallel_wavegan.models import MelGANGenerator
    except ImportError as e:
        pytest.skip(f"parallel_wavegan not installed ({e}); pip install --no-build-isolation parallel_wavegan")
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
    G = melgan.Generator(make_cfg("paper"))
    melgan.load_official(G, official)
    mel = torch.randn(1, 80, 12) - 4
    with torch.no_grad():
        want = ref(mel)
        assert (G(mel) - want).abs().max().item() <= 1e-5
        assert (melgan.remove_weight_norm(G)(mel) - want).abs().max().item() <= 1e-5
    with pytest.raises(SystemExit, match="unexpected key"):
        melgan.load_official(melgan.Generator(make_cfg("paper")), {"model.99.weight_g": torch.zeros(1)})


def test_tiny_gan_step_updates_both_networks():
    torch.manual_seed(0)
    cfg = make_cfg()
    G, D = melgan.Generator(cfg), melgan.Discriminator(cfg)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=cfg.betas)
    g0 = [p.detach().clone() for p in G.parameters()]
    d0 = {n: p.detach().clone() for n, p in D.named_parameters()}
    wav = (torch.rand(2, 1, cfg.segment) - 0.5) * 0.5
    losses = melgan.gan_step(G, D, opt_g, opt_d, wav, melgan.log_mel(wav, cfg), cfg, contextlib.nullcontext)
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(not torch.equal(a, b) for a, b in zip(g0, G.parameters()))   # every generator tensor moved
    # every discriminator weight moved; a bias can stay put: at init all logits sit inside the hinge margin,
    # so the real (-1) and fake (+1) gradients of the logit bias cancel exactly
    assert all(not torch.equal(d0[n], p) for n, p in D.named_parameters() if not n.endswith("bias"))


def test_config_errors():
    with pytest.raises(SystemExit, match="did you mean --channels"):
        make_cfg(chanels=64)
    with pytest.raises(SystemExit, match="not a valid int"):
        make_cfg(channels="wide")


# ----------------------------------------------------------------------------- command line

def run(*args):
    return run_script("melgan.py", *args).stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("melgan"))
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
    melgan.train(make_cfg(max_iters=5, out_dir=straight))
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
        melgan.load_generator(make_cfg(channels=64, init_from=f"{d}/ckpt.pt"), rt)
    ckpt["paper"] = "hifigan"
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="hifigan"):
        melgan.load_generator(make_cfg(init_from=str(tmp_path / "other.pt")), rt)
