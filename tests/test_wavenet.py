"""Tests for wavenet.py: receptive field, causality, Fast-WaveNet cache == naive generation, mu-law, overfitting,
parameter counts, and the command line (train / resume / sample / bench, resume exactness, bad checkpoints)."""
import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from cli import run_script  # noqa: E402
import wavenet as W  # noqa: E402


def cfg_of(preset="tiny", *flags):
    return common.parse_config(W.Config, W.PRESETS, [f"--preset={preset}", *flags])


def tiny_model(*flags, seed=0):
    torch.manual_seed(seed)
    cfg = cfg_of("tiny", *flags)
    return W.WaveNet(cfg, n_speakers=3).eval(), cfg


# ----------------------------------------------------------------------------- architecture

def test_receptive_field_formula():
    # §2.1: k = 2, 3 repeats of 1..512 -> 3 * 1023 + 1; r9y9 mulaw256 (k = 3) -> 6139 (reference card)
    assert W.receptive_field(cfg_of("paper")) == 3070
    assert W.receptive_field(cfg_of("vocoder")) == 6139
    for flags in [(), ("--kernel_size=3",), ("--layers=8", "--stacks=1")]:
        model, cfg = tiny_model(*flags)
        rf = model.receptive_field
        assert rf == (cfg.kernel_size - 1) * sum(2 ** (i % (cfg.layers // cfg.stacks)) for i in range(cfg.layers)) + 1
        # empirically: the output at t0 sees input t0 - rf + 1 but not t0 - rf (fp64: the longest path is faint)
        model.double()
        T, t0 = 3 * rf, 3 * rf - 1
        x = torch.randint(0, 256, (1, T))
        base = model.net(x)[:, :, t0]
        for pos, moves in ((t0 - rf + 1, True), (t0 - rf, False)):
            x2 = x.clone()
            x2[0, pos] = (x2[0, pos] + 100) % 256
            assert torch.equal(model.net(x2)[:, :, t0], base) != moves, (flags, pos)


def test_causality():
    model, cfg = tiny_model()
    B, T, t0 = 2, 4 * cfg.hop, 300
    x = torch.randint(0, 256, (B, T))
    mel = torch.randn(B, cfg.n_mels, T // cfg.hop)
    spk = torch.tensor([0, 2])
    out = model(x, mel, spk)
    assert out.shape == (B, 256, T)
    x2 = x.clone()
    x2[:, t0:] = torch.randint(0, 256, (B, T - t0))           # rewrite the future
    out2 = model(x2, mel, spk)
    assert torch.equal(out[:, :, :t0], out2[:, :, :t0])        # the past never moves
    assert not torch.allclose(out[:, :, t0:], out2[:, :, t0:])
    # conditioning matters: another speaker or another mel changes the logits
    assert not torch.allclose(out, model(x, mel, torch.tensor([1, 1])))
    assert not torch.allclose(out, model(x, mel + 1, spk))


def test_param_counts():
    # vocoder preset vs r9y9 mulaw256's 4.70 M (reference card). r9y9 also has weight-norm gains (30 * 768 + 128 + 384),
    # a 5-tap conv_in over mel frames (80 * 80 * 5), a first-conv bias, a residual 1x1 in the last layer whose output
    # is never used (128 * 128 + 128), and 4 x (9 + 1) upsampler weights where ours has 4 x 25.
    n = common.count_params(W.WaveNet(cfg_of("vocoder"), 1))
    assert n == 4_627_812
    assert n + 30 * 768 + 128 + 384 + 80 * 80 * 5 + 128 + (128 * 128 + 128) + 4 * 10 - 4 * 25 == 4_699_944  # 4.70 M
    assert abs(n / 4.70e6 - 1) < 0.02
    assert common.count_params(W.WaveNet(cfg_of("paper"), common.NUM_SPEAKERS)) == 3_767_890


def test_upsampler_length_and_init():
    model, cfg = tiny_model()
    mel = torch.randn(2, cfg.n_mels, 7)
    c = model.upsample(mel)
    assert c.shape == (2, cfg.n_mels, 7 * cfg.hop)
    # at init a constant mel upsamples to (nearly) the same constant away from the edges
    c1 = model.upsample(torch.ones(1, cfg.n_mels, 7))
    assert torch.allclose(c1[0, 2:-2, cfg.hop:-cfg.hop], torch.ones(()), atol=1e-5)


def test_mulaw_roundtrip():
    x = torch.linspace(-1, 1, 20001)
    q = common.mulaw_quantize(x)
    assert q.min() == 0 and q.max() == 255 and (q[1:] >= q[:-1]).all()      # monotone, uses all 256 classes
    assert len(torch.unique(q)) == 256
    # every class decodes back into its own bin, and the error is small near zero (fine steps where speech lives)
    assert torch.equal(common.mulaw_quantize(common.mulaw_dequantize(torch.arange(256))), torch.arange(256))
    err = (common.mulaw_dequantize(q) - x).abs()
    assert err[x.abs() < 0.01].max() < 1e-3 and err.max() < 0.035
    assert common.mulaw_dequantize(common.mulaw_quantize(torch.zeros(()))).abs() < 1e-3   # silence code


# ----------------------------------------------------------------------------- generation

@pytest.mark.parametrize("flags", [(), ("--kernel_size=3",), ("--cond_mel=False",)])
def test_cached_equals_naive(flags):
    model, cfg = tiny_model(*flags)
    with torch.no_grad():          # peakier softmax so that a wrong logit would change the drawn samples
        model.head[-1].weight.mul_(20)
    B, n = 3, 300                  # n >> receptive field (15): the ring buffers wrap around many times
    mel = torch.randn(B, cfg.n_mels, 2) if cfg.cond_mel else None
    spk = torch.tensor([0, 1, 2])
    naive = W.generate(model, n, mel, spk, temperature=1.0, seed=7, method="naive")
    cached = W.generate(model, n, mel, spk, temperature=1.0, seed=7, method="cached")
    assert naive.shape == (B, n)
    assert torch.equal(naive, cached)
    assert len(torch.unique(cached)) > 10                       # a real draw, not a constant
    assert not torch.equal(cached, W.generate(model, n, mel, spk, seed=8))
    # the teacher-forced forward pass assigns every drawn sample the same distribution the cache did
    silence = int(common.mulaw_quantize(torch.zeros(())))
    with torch.no_grad():
        logits = model(F.pad(cached[:, :-1], (1, 0), value=silence), mel, spk)   # (B, Q, n)
    u = torch.rand(B, n, generator=torch.Generator().manual_seed(7))
    redraw = W.draw(logits.transpose(1, 2).reshape(B * n, -1), u.reshape(-1), 1.0).view(B, n)
    assert torch.equal(redraw, cached)


def test_overfit_one_batch():
    torch.manual_seed(0)
    cfg = cfg_of("tiny", "--residual_channels=16", "--gate_channels=32", "--skip_channels=32")
    model = W.WaveNet(cfg, n_speakers=2)
    t = torch.arange(1024) / cfg.sample_rate
    wav = torch.stack([0.5 * torch.sin(2 * math.pi * 220 * t), 0.3 * torch.sin(2 * math.pi * 330 * t)])
    spk = torch.tensor([0, 1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(80):
        loss = W.nll_loss(model, wav, spk, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 5.0                                       # ~ln 256 at init
    assert losses[-1] < losses[0] / 5, losses[::10]   # 5.56 -> ~0.3 nats here


# ----------------------------------------------------------------------------- command line

def run(*args):
    p = run_script("wavenet.py", *args, check=False)
    return p.returncode, p.stdout + p.stderr


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("wavenet"))
    base = ["--preset=tiny", "--device=cpu", "--compile=False"]
    rc, out = run(*base, "--max_iters=3", f"--out_dir={d}/a")
    assert rc == 0, out
    assert os.path.exists(f"{d}/a/ckpt.pt")
    assert os.path.exists(f"{d}/a/samples/eval_vocoded.wav") and os.path.exists(f"{d}/a/samples/eval_vocoded.png")
    assert "receptive field 15 samples" in out
    ck3 = torch.load(f"{d}/a/ckpt.pt", weights_only=True)
    rc, out = run(*base, "--max_iters=5", "--init_from=resume", f"--out_dir={d}/a")
    assert rc == 0, out
    assert "resumed from step 3" in out and "step 5/5" in out
    return d, base, ck3


def test_cli_train_resume_exact(cli):
    d, base, ck3 = cli
    assert ck3["step"] == 3
    ck = torch.load(f"{d}/a/ckpt.pt", weights_only=True)
    assert ck["step"] == 5 and ck["paper"] == "wavenet"
    rc, out = run(*base, "--max_iters=5", f"--out_dir={d}/b")      # 5 straight == 3 + resume 2
    assert rc == 0, out
    straight = torch.load(f"{d}/b/ckpt.pt", weights_only=True)
    for k, v in straight["models"]["model"].items():
        assert torch.equal(v, ck["models"]["model"][k]), k
    assert any(not torch.equal(v, ck3["models"]["model"][k]) for k, v in ck["models"]["model"].items())


def test_cli_sample_and_bench(cli):
    d, base, _ = cli
    rc, out = run(*base, "--mode=sample", f"--init_from={d}/a/ckpt.pt", f"--out_dir={d}/a")
    assert rc == 0, out
    assert os.path.getsize(f"{d}/a/samples/vocoded.wav") > 1000 and os.path.getsize(f"{d}/a/samples/vocoded.png") > 1000
    wav, sr = common.load_audio(f"{d}/a/samples/vocoded.wav")
    assert sr == 16000 and len(wav) == 768 and 0 < abs(wav).max() <= 1
    rc, out = run(*base, "--mode=bench", f"--out_dir={d}/c")
    assert rc == 0, out
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert res["paper"] == "wavenet" and res["receptive_field"] == 15
    for k in ("train_step_ms", "train_audio_s_per_s", "naive_b1_samples_per_s", "cached_b1_samples_per_s",
              "naive_b16_samples_per_s", "cached_b16_samples_per_s"):
        assert res[k] > 0, k


def test_wrong_checkpoint_rejected(cli):
    d, _, _ = cli
    ck = common.load_checkpoint(f"{d}/a/ckpt.pt")
    cfg = cfg_of("tiny", "--residual_channels=12")
    with pytest.raises(SystemExit, match="residual_channels"):
        common.restore(ck, cfg, {"model": W.WaveNet(cfg, common.NUM_SPEAKERS)}, arch_keys=W.ARCH_KEYS)
    other = dict(ck, paper="melgan")
    with pytest.raises(SystemExit, match="melgan"):
        common.restore(other, cfg_of("tiny"), {"model": W.WaveNet(cfg_of("tiny"), common.NUM_SPEAKERS)},
                       arch_keys=W.ARCH_KEYS)
    rc, out = run("--preset=tiny", "--device=cpu", "--mode=sample", f"--init_from={d}/a/ckpt.pt",
                  "--out_dir=" + d + "/e", "--gate_channels=32")
    assert rc != 0 and "gate_channels" in out


def test_unknown_flag_rejected():
    with pytest.raises(SystemExit, match="residual_channels"):
        common.parse_config(W.Config, W.PRESETS, ["--residual_chanels=3"])
