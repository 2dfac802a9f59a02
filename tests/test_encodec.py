"""Tests for encodec.py. Inference: parity with the official `encodec` package (24 kHz, 48 kHz, the quantizer
and its EMA update, the discriminator, the LM), parameter counts, bitrate arithmetic, streaming == offline,
causality, the RVQ. Training: a golden step against a literal transcription of §3.4, and the command line.

What pins each loss term, sampler, quantizer rule and schedule of encodec.py:
- ℓ_t (waveform L1) and ℓ_f (msspec form: linear-mel L1 + α·log10-mel MSE per scale):
  test_golden_training_steps (ref_recon, ref_mel: a transcribed STFT and HTK filterbank),
  test_feature_loss_and_reconstruction_exact_values
- ℓ_g hinge, D hinge, ℓ_feat (relative to the real maps): test_losses (hand values),
  test_golden_training_steps
- ℓ_w commitment through every layer (encodec#25): test_commitment_gradient_sums_over_the_rvq_layers; the
  straight-through estimator: test_straight_through_gradient_is_identity
- the balancer (per-example gradient norms on x̂, bias-corrected EMA):
  test_balancer_gradient_norms_follow_the_weights, test_golden_training_steps
- bandwidth per batch and D update probability: test_bandwidth_is_drawn_per_batch_and_d_updates_with_disc_prob
- the D-free warm-up (ours) and the balancer's restart after it:
  test_disc_warmup_trains_on_reconstruction_alone_then_restarts_the_balancer
- quantizer warm-up schedule: test_quantizer_warmup_counts_steps, test_quantizer_warmup_bypasses_the_rvq
- k-means init (Lloyd): test_kmeans_init_finds_clusters; one level per step:
  test_quantizer_warmup_bypasses_the_rvq
- EMA update and dead-code re-seeding: test_ema_and_dead_code_update_touch_the_right_rows; the grace in steps:
  test_dead_codes_get_a_grace_period_with_small_batches; the small preset's threshold:
  test_small_preset_dead_code_threshold_fits_its_batch
- the decoder uses the latent: test_tiny_model_overfits_one_batch
- the entropy-coding LM (§3.3): frame t predicted from frames < t (the target shift) and its cross-entropy:
  test_lm_is_causal_and_learns_a_predictable_stream, test_official_lm_parity
- lr: constant (no schedule); no host sync: test_codebook_training_step_has_no_graph_break"""
import copy
import math
import os
import re
import sys
import types

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

import common
import encodec as E  # our file; the pip package of the same name comes from official() below
from cli import check_cli_contract, import_reference, one_line_error, run_script


def make_cfg(preset="tiny", **kw):
    return common.parse_config(E.Config, E.PRESETS, [f"--preset={preset}"] + [f"--{k}={v}" for k, v in kw.items()],
                               modes=E.MODES)


CPU = common.Runtime(torch.device("cpu"), "cpu", torch.float32)


def random_codebooks(model, seed=0, scale=1.0, used=0.0):
    """Initialised codebooks (k-means skipped); used > 0: every code that often in the EMA (none is dead)."""
    g = torch.Generator().manual_seed(seed)
    for layer in model.quantizer.layers:
        layer.embed.copy_(torch.randn(layer.embed.shape, generator=g) * scale)
        layer.cluster_size.fill_(used)
        layer.embed_avg.copy_(layer.embed * (used or 1.0))
        layer.inited.fill_(1)
    return model


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = make_cfg(**kw)
    return random_codebooks(E.EnCodec(cfg), seed).eval(), cfg

# ----------------------------------------------------------------------------- the official package

def _install_stubs():
    """encodec imports torchaudio (absent here, and unused by what we build) and einops (maybe absent)."""
    if "torchaudio" not in sys.modules:
        ta = types.ModuleType("torchaudio")
        ta.transforms = types.SimpleNamespace(Spectrogram=_Spectrogram)
        sys.modules["torchaudio"] = ta
    try:
        import einops  # noqa: F401
    except ImportError:
        e = types.ModuleType("einops")
        pats = {"nd->n()d": lambda x: x[:, None], "cd->()cd": lambda x: x[None],
                "...d->(...)d": lambda x: x.reshape(-1, x.shape[-1]), "bdn->bnd": lambda x: x.transpose(1, 2),
                "bnd->bdn": lambda x: x.transpose(1, 2), "bcwt->bctw": lambda x: x.transpose(2, 3),
                "b...t->bt...": lambda x: x.movedim(-1, 1), "bt...->b...t": lambda x: x.movedim(1, -1)}
        e.rearrange = lambda x, p, **kw: pats[p.replace(" ", "")](x)
        e.repeat = lambda x, p, d: x[:, None].expand(-1, d)  # only "n -> n d" is used
        sys.modules["einops"] = e


class _Spectrogram(torch.nn.Module):
    """The part of torchaudio.transforms.Spectrogram that encodec's discriminator uses (power=None, normalized)."""

    def __init__(self, n_fft, hop_length, win_length, window_fn, normalized, center, pad_mode, power):
        super().__init__()
        self.n_fft, self.hop, self.window, self.normalized = n_fft, hop_length, window_fn(win_length), normalized

    def forward(self, x):  # (B, C, T) -> (B, C, F, frames) complex
        s = torch.stft(x.reshape(-1, x.shape[-1]), self.n_fft, self.hop, window=self.window, center=False,
                       return_complex=True)
        s = s / self.window.pow(2).sum().sqrt() if self.normalized else s
        return s.view(*x.shape[:-1], *s.shape[-2:])


_OFFICIAL = {}


def official():
    """The pip `encodec` package (imported although our encodec.py has its name); skips, naming it, if absent."""
    if "pkg" not in _OFFICIAL:
        stubbed = {k: sys.modules.get(k) for k in ("torchaudio", "einops")}
        _install_stubs()
        try:
            _OFFICIAL["pkg"] = import_reference("encodec", submodules=("model", "msstftd", "quantization.vq"))
        finally:  # encodec keeps its references; other tests (transformers) must not see stand-ins in sys.modules
            for k, before in stubbed.items():
                if before is None and sys.modules.get(k) is not None and getattr(sys.modules[k], "__spec__", 1) is None:
                    del sys.modules[k]
    return _OFFICIAL["pkg"]


def fill_official_codebooks(vq, seed=0):
    # a fresh official codebook is all zeros (every code would be 0): fill it and mark it initialised
    g = torch.Generator().manual_seed(seed)
    for layer in vq.layers:
        cb = layer._codebook
        cb.embed.copy_(torch.randn(cb.embed.shape, generator=g))
        cb.embed_avg.copy_(cb.embed)
        cb.inited.fill_(1)


@pytest.mark.parametrize("preset", ["24khz", "48khz"])
def test_official_parity(preset, tmp_path):
    pkg = official()
    torch.manual_seed(0)
    ref = (pkg.model.EncodecModel.encodec_model_24khz if preset == "24khz" else
           pkg.model.EncodecModel.encodec_model_48khz)(pretrained=False)
    fill_official_codebooks(ref.quantizer.vq)
    path = tmp_path / "official.th"
    torch.save(ref.state_dict(), path)  # the official file format: a raw state dict
    cfg = make_cfg("small", mode="sample", init_from=str(path))  # the wrong preset: the file's own model is inferred
    ours = E.load_for_inference(cfg, CPU)
    assert (cfg.sample_rate, cfg.channels, cfg.n_q, cfg.norm) == ((24000, 1, 32, "weight_norm") if preset == "24khz"
                                                                   else (48000, 2, 16, "time_group_norm"))
    assert common.count_params(E.EnCodec(cfg)) == sum(p.numel() for p in ref.parameters())
    # inference folds weight norm into plain weights (the outputs below are the unfolded official model's)
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in ours.modules())
    sr, C = cfg.sample_rate, cfg.channels
    T = int(0.4 * sr) if preset == "24khz" else sr  # 48 kHz: two overlapping 1 s segments (stride 0.99 s)
    x = torch.randn(2 if preset == "24khz" else 1, C, T, generator=torch.Generator().manual_seed(1)) * 0.1
    with torch.no_grad():
        ze, zo = ref.encoder(x), ours.encoder(x)
        assert (ze - zo).abs().max() <= 1e-5
        for bw in (cfg.bandwidths[0], cfg.bandwidths[-1]):
            ref.set_target_bandwidth(bw)
            frames_ref, frames = ref.encode(x), ours.compress(x, bw)
            assert len(frames_ref) == len(frames)
            for (c0, s0), (c1, s1) in zip(frames_ref, frames):
                assert c1.shape[1] == ours.n_q_for(bw) and torch.equal(c0, c1), bw
                assert (s0 is None) == (s1 is None) and (s0 is None or torch.allclose(s0.view(-1), s1.view(-1)))
            y0, y1 = ref.decode(frames_ref)[..., :T], ours.decompress(frames, T)
            assert (y0 - y1).abs().max() <= 1e-5, bw


def test_official_quantizer_parity_on_random_latents():
    # random encoders barely vary over time, so also compare the RVQ alone on latents that use many codes
    pkg = official()
    cfg = make_cfg("24khz")
    ref = pkg.quantization.vq.ResidualVectorQuantizer(dimension=128, n_q=32, bins=1024)
    fill_official_codebooks(ref.vq)
    ours = E.ResidualVectorQuantizer(cfg)
    sd = E.official_state_dict_to_ours({"quantizer." + k: v for k, v in ref.state_dict().items()}, cfg)
    ours.load_state_dict({k[len("quantizer."):]: v for k, v in sd.items()})
    z = torch.randn(2, 128, 50, generator=torch.Generator().manual_seed(2)) * 3
    ref.eval(), ours.eval()
    for n_q in (2, 8, 32):
        c0 = ref.encode(z, 75, n_q * 0.75).transpose(0, 1)  # official codes are (n_q, B, T)
        c1 = ours.encode(z, n_q)
        assert torch.equal(c0, c1) and c1.unique().numel() > 50
        assert (ref.decode(c0.transpose(0, 1)) - ours.decode(c1)).abs().max() <= 1e-5
        q1, c2, _ = ours(z, n_q)
        assert torch.equal(c2, c1) and (ref(z, 75, n_q * 0.75).quantized - q1).abs().max() <= 1e-5
    # one training step: the EMA statistics move identically (no code is dead, so replacement does not run)
    for layer in ref.vq.layers:
        layer._codebook.cluster_size.fill_(50.0)
        layer._codebook.embed_avg.copy_(layer._codebook.embed * 50.0)
    for layer in ours.layers:
        layer.cluster_size.fill_(50.0)
        layer.embed_avg.copy_(layer.embed * 50.0)
    ref.train(), ours.train()
    ref(z, 75, 6.0)
    ours(z, 8)
    for a, b in zip(ref.vq.layers, ours.layers):
        for name in ("cluster_size", "embed_avg", "embed"):
            assert (getattr(a._codebook, name) - getattr(b, name)).abs().max() <= 1e-5, name


def test_official_discriminator_layout():
    # no discriminator weights were released; this checks our MS-STFTD computes what the official module does
    pkg = official()
    cfg = make_cfg("tiny", disc_filters=8, disc_n_ffts="(256,128)")
    torch.manual_seed(0)
    ref = pkg.msstftd.MultiScaleSTFTDiscriminator(filters=8, n_ffts=[256, 128], hop_lengths=[64, 32],
                                                  win_lengths=[256, 128])
    ours = E.MSSTFTDiscriminator(cfg)
    sd = {}
    for k, v in ref.state_dict().items():
        k = re.sub(r"\.conv\.(weight|bias)", r".\1", k.replace("discriminators.", "discs."))
        sd[k.replace("weight_g", "parametrizations.weight.original0").replace("weight_v", "parametrizations.weight.original1")] = v
    ours.load_state_dict(sd)
    x = torch.randn(2, 1, 2400)
    (l0, f0), (l1, f1) = ref(x), ours(x)
    for a, b in zip(l0 + [t for f in f0 for t in f], l1 + [t for f in f1 for t in f]):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5

# ----------------------------------------------------------------------------- architecture and bitrate

def test_param_counts_match_official():
    # reference card §6 (and the official modules built with random weights)
    m = E.EnCodec(make_cfg("24khz"))
    assert common.count_params(m) == 14_851_810
    assert common.count_params(m.encoder) == 7_425_792 and common.count_params(m.decoder) == 7_426_018
    assert common.count_params(E.EnCodec(make_cfg("48khz"))) == 14_856_294


def test_untrained_latents_follow_the_audio():
    # the variance-preserving init (_normed): at step 0 the latents must change from frame to frame, or k-means
    # on the first batch finds one or two codes (PyTorch's default init: frame-to-frame std ~4% of |z| here)
    torch.manual_seed(0)
    m = E.EnCodec(make_cfg("small"))
    t = torch.arange(24000) / 24000
    x = (0.1 * torch.sin(2 * math.pi * 220 * t * (1 + t)) * (t * 7 % 1 > 0.5))[None, None]  # chirp bursts
    with torch.no_grad():
        z = m.encoder(x)  # (1, D, 75)
        h = m.encoder.conv_in(x)
        for b in m.encoder.blocks:
            h = b(h)
    assert z.std(-1).mean() > 0.5 * z.abs().mean()
    assert h.std(-1).mean() > 0.5 * h.mean(-1).abs().mean()  # the signal, not the biases, reaches the bottleneck


def test_bitrate_arithmetic():
    # §3.2: 1024 codes = 10 bits, 75 frames/s at 24 kHz -> 0.75 kbps per codebook; 48 kHz: 150 Hz -> 1.5 kbps
    for preset, rate, n_qs in (("24khz", 75, [2, 4, 8, 16, 32]), ("48khz", 150, [2, 4, 8, 16])):
        cfg = make_cfg(preset)
        m = E.EnCodec.__new__(E.EnCodec)  # arithmetic only: no need to build 15 M weights
        m.cfg, m.hop, m.bits = cfg, math.prod(cfg.ratios), 10
        m.frame_rate = math.ceil(cfg.sample_rate / m.hop)
        assert m.frame_rate == rate and [m.n_q_for(bw) for bw in cfg.bandwidths] == n_qs
    # a tiny network with the paper's RVQ: one second costs exactly the target bandwidth
    m, cfg = tiny_model(codebook_size=1024, n_q=32, bandwidths="(1.5,3.0,6.0,12.0,24.0)")
    x = torch.randn(1, 1, 24000) * 0.1
    for bw, n_q in zip(cfg.bandwidths, [2, 4, 8, 16, 32]):
        (codes, scale), = m.compress(x, bw)
        assert codes.shape == (1, n_q, 75) and scale is None
        assert codes.numel() * m.bits / 1.0 == bw * 1000
    assert m.compress(x[..., :24000 - 100], 6.0)[0][0].shape[-1] == 75  # a partial frame still costs a frame


def test_streaming_equals_offline():
    m, cfg = tiny_model()
    T = 40 * m.hop
    x = torch.randn(2, 1, T, generator=torch.Generator().manual_seed(3)) * 0.3
    with torch.no_grad():
        z, (codes, _) = m.encoder(x), m.encode(x, cfg.n_q)
        y = m.decode(codes)
        state, cs, pos = {}, [], 0
        for n in (1, 3, 7, 2, 12, 15):  # uneven chunks, in frames
            cs.append(m.encode_stream(x[..., pos * m.hop:(pos + n) * m.hop], state, cfg.n_q))
            pos += n
        assert torch.equal(torch.cat(cs, -1), codes)
        state, zs, pos = {}, [], 0
        for n in (5, 1, 1, 20, 13):
            zs.append(m.encoder(x[..., pos * m.hop:(pos + n) * m.hop], state))
            pos += n
        assert torch.allclose(torch.cat(zs, -1), z, atol=1e-6)
        state, ys, pos = {}, [], 0
        for n in (1, 2, 9, 3, 25):
            ys.append(m.decode_stream(codes[..., pos:pos + n], state))
            pos += n
        y_stream = torch.cat(ys, -1)
        assert y_stream.shape == y.shape and (y_stream - y).abs().max() <= 1e-5


def test_streaming_flushes_the_trailing_partial_frame():
    # 74,280 samples = 232 whole frames + 40 samples: offline gives ceil(T / 320) = 233 frames; the stream must
    # give the same 233 once told that the input ends (final=True), for any chunking
    m, cfg = tiny_model()
    T = 74_280
    x = torch.randn(1, 1, T, generator=torch.Generator().manual_seed(5)) * 0.3
    with torch.no_grad():
        codes, _ = m.encode(x, cfg.n_q)
        assert codes.shape[-1] == 233
        for chunks in ((T,), (1000, 33_333, T - 34_333), (T - 40, 40)):
            state, cs, pos = {}, [], 0
            for n in chunks:
                cs.append(m.encode_stream(x[..., pos:pos + n], state, cfg.n_q))
                pos += n
            assert sum(c.shape[-1] for c in cs) == 232  # the partial frame waits for more input...
            cs.append(m.encode_stream(x[..., :0], state, cfg.n_q, final=True))  # ...until the end is known
            assert torch.equal(torch.cat(cs, -1), codes), chunks
        state = {}  # final on the last real chunk works as well
        s = torch.cat([m.encode_stream(x[..., :50_000], state, cfg.n_q),
                       m.encode_stream(x[..., 50_000:], state, cfg.n_q, final=True)], -1)
        assert torch.equal(s, codes)


def test_streaming_with_constant_padding_does_not_wait():
    # reflect padding mirrors samples the stream has not seen yet, so each k7 conv waits for 6 inputs (the encoder's
    # first code only after 7 frames); zero padding needs no future: every hop of audio gives its code at once
    m, cfg = tiny_model(pad_mode="constant")
    x = torch.randn(1, 1, 12 * m.hop, generator=torch.Generator().manual_seed(6)) * 0.3
    with torch.no_grad():
        codes, _ = m.encode(x, cfg.n_q)
        y = m.decode(codes)
        enc, dec, got, audio = {}, {}, [], []
        for f in range(12):
            c = m.encode_stream(x[..., f * m.hop:(f + 1) * m.hop], enc, cfg.n_q)
            assert c.shape[-1] == 1, f  # one hop in, one code out: no look-ahead wait
            a = m.decode_stream(c, dec)
            assert a.shape[-1] == m.hop, f
            got.append(c), audio.append(a)
        assert torch.equal(torch.cat(got, -1), codes)
        assert (torch.cat(audio, -1) - y).abs().max() <= 1e-5
        reflect, _ = tiny_model()  # the official reflect padding: the first code needs 7 frames
        state = {}
        n = [reflect.encode_stream(x[..., f * m.hop:(f + 1) * m.hop], state, cfg.n_q).shape[-1] for f in range(8)]
        assert n == [0] * 6 + [7, 1]  # nothing for 6 hops, then the 7 waiting codes at once


def test_causality():
    m, cfg = tiny_model()
    T, f0 = 30 * m.hop, 20
    x = torch.randn(1, 1, T) * 0.3
    x2 = x.clone()
    x2[..., f0 * m.hop:] = torch.randn(1, 1, T - f0 * m.hop)  # rewrite the future
    with torch.no_grad():
        z, z2 = m.encoder(x), m.encoder(x2)
        assert torch.equal(z[..., :f0], z2[..., :f0]) and not torch.allclose(z[..., f0:], z2[..., f0:])
        codes, _ = m.encode(x, cfg.n_q)
        codes2 = codes.clone()
        codes2[..., f0:] = (codes2[..., f0:] + 1) % cfg.codebook_size
        y, y2 = m.decode(codes), m.decode(codes2)
        assert torch.equal(y[..., :f0 * m.hop], y2[..., :f0 * m.hop]) and not torch.allclose(y, y2)

# ----------------------------------------------------------------------------- quantizer

def test_rvq_round_trip():
    cfg = make_cfg()
    q = random_codebooks(types.SimpleNamespace(quantizer=E.ResidualVectorQuantizer(cfg))).quantizer.eval()
    z = torch.randn(3, cfg.dimension, 17)
    quantized, codes, _ = q(z, cfg.n_q)
    assert codes.shape == (3, cfg.n_q, 17) and codes.dtype == torch.long
    assert torch.equal(q.encode(z, cfg.n_q), codes)
    assert torch.allclose(q.decode(codes), quantized, atol=1e-6)
    # codebook i really quantizes the residual that codebooks < i left
    r = z.transpose(1, 2).reshape(-1, cfg.dimension)
    for i, layer in enumerate(q.layers):
        assert torch.equal(torch.cdist(r, layer.embed).argmin(-1), codes[:, i].reshape(-1))
        r = r - layer.embed[codes[:, i].reshape(-1)]


def test_more_codebooks_never_increase_error():
    cfg = make_cfg(codebook_size=32, n_q=8, kmeans_iters=20)
    q = E.ResidualVectorQuantizer(cfg)
    g = torch.Generator().manual_seed(4)
    centers = torch.randn(12, cfg.dimension, generator=g) * 3
    z = (centers[torch.randint(0, 12, (4000,), generator=g)] + torch.randn(4000, cfg.dimension, generator=g))
    z = z.view(40, 100, cfg.dimension).transpose(1, 2)  # (B, D, T)
    q.train()
    q(z, cfg.n_q)  # k-means initialises each codebook on its own residual
    q.eval()
    errs = [z.pow(2).mean().item()] + [(q.decode(q.encode(z, n)) - z).pow(2).mean().item() for n in range(1, 9)]
    assert all(b <= a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.5 * errs[0]


def test_kmeans_init_finds_clusters():
    torch.manual_seed(1)  # Lloyd's from 4 random rows often starts two means in one cluster: seed, don't flake
    cfg = make_cfg(codebook_size=4, dimension=2, kmeans_iters=20, dead_code_threshold=0.0)
    cb = E.Codebook(cfg).train()
    centers = torch.tensor([[10.0, 0], [0, 10], [-10, 0], [0, -10]])
    x = centers.repeat(50, 1) + 0.1 * torch.randn(200, 2)
    cb(x)
    assert cb.inited.item() == 1
    d = torch.cdist(centers, cb.embed)
    assert d.min(1).values.max() < 0.5 and d.min(0).values.max() < 0.5  # one code per cluster
    assert torch.allclose(cb.cluster_size, torch.full((4,), 50.0))


def test_ema_and_dead_code_update_touch_the_right_rows():
    cfg = make_cfg(codebook_size=8, dimension=4)
    cb = E.Codebook(cfg)
    embed = torch.eye(8, 4) * 5 + torch.arange(8.0)[:, None]  # well separated rows
    size = torch.full((8,), 10.0)
    size[[5, 6]] = 0.5  # rows 5, 6 are dead (EMA usage < 2)
    cb.embed.copy_(embed), cb.cluster_size.copy_(size), cb.embed_avg.copy_(embed * size[:, None]), cb.inited.fill_(1)
    x = torch.cat([embed[0] + 0.1 * torch.randn(6, 4), embed[1] + 0.1 * torch.randn(4, 4)])  # uses rows 0 and 1
    cb.eval()
    cb(x)
    assert torch.equal(cb.embed, embed)  # eval mode never updates
    cb.train()
    _, codes = cb(x)
    assert sorted(codes.unique().tolist()) == [0, 1]
    # used rows: EMA of counts and sums, then Laplace-smoothed division (§3.2)
    d, eps = cfg.ema_decay, 1e-5
    counts = torch.bincount(codes, minlength=8).float()
    sums = torch.zeros(8, 4).index_add_(0, codes, x)
    cs = d * size + (1 - d) * counts
    avg = d * embed * size[:, None] + (1 - d) * sums
    n = cs.sum()
    expect = avg / ((cs + eps) / (n + 8 * eps) * n)[:, None]
    for r in (0, 1):
        assert torch.allclose(cb.embed[r], expect[r], atol=1e-5) and not torch.allclose(cb.embed[r], embed[r])
    # dead rows: re-seeded with vectors of the batch, statistics reset
    for r in (5, 6):
        assert torch.cdist(cb.embed[r:r + 1], x).min() < 1e-6
        assert cb.cluster_size[r].item() == pytest.approx(2.0 * cfg.ema_decay ** -(cfg.dead_code_grace + 0.5))
    # other rows: unused but alive, so they stay where they were (up to the smoothing)
    for r in (2, 3, 4, 7):
        assert torch.allclose(cb.embed[r], embed[r], rtol=1e-4)

def test_dead_codes_get_a_grace_period_with_small_batches():
    # a batch of 16 frames for 64 codes: 0.25 uses per code. A re-seeded code keeps cfg.dead_code_grace steps:
    # its usage restarts at threshold / decay^(grace + 1/2), so never picked again it is re-drawn exactly on
    # step grace + 1 (the old reset, clamped to the threshold, re-drew it on the very next step, and with
    # frames/K below the threshold nearly the whole codebook every step)
    grace, thr, d = 6, 0.1, 0.99
    cfg = make_cfg(codebook_size=64, dimension=4, dead_code_threshold=thr, dead_code_grace=grace, ema_decay=d)
    cb = E.Codebook(cfg).train()
    embed = torch.randn(64, 4)
    cb.embed.copy_(embed), cb.cluster_size.fill_(0.0), cb.embed_avg.zero_(), cb.inited.fill_(1)
    torch.manual_seed(0)
    x1 = torch.randn(16, 4)
    cb(x1)  # every code was dead: all re-seeded from x1
    reset = thr / d ** (grace + 0.5)
    assert torch.allclose(cb.cluster_size, torch.full((64,), reset))
    assert (cb.embed[:, None] - x1[None]).abs().sum(-1).min(1).values.max() < 1e-5  # rows of x1
    cb.cluster_size[1:] = 1e6  # from here on, only code 0 can die
    cb.embed_avg[1:] = cb.embed[1:] * 1e6
    for s in range(1, grace + 2):
        cb.embed[0], cb.embed_avg[0] = 1e3, 1e3 * cb.cluster_size[0]  # far away: never picked
        xs = torch.randn(16, 4)
        cb(xs)
        redrawn = (cb.embed[0] - xs).abs().sum(1).min() < 1e-6
        assert redrawn == (s == grace + 1), (s, cb.cluster_size[0].item())


def test_small_preset_dead_code_threshold_fits_its_batch():
    # a code used at the uniform rate (frames per batch / K) must count as alive, else every code is re-seeded
    # every step; the paper presets keep the official threshold 2 (64 x 1 s: 4.7 frames per code)
    for preset in ("small", "24khz"):
        cfg = make_cfg(preset)
        frames = cfg.batch_size * math.ceil(cfg.segment / math.prod(cfg.ratios))
        assert cfg.dead_code_threshold < 0.5 * frames / cfg.codebook_size
    assert make_cfg("24khz").dead_code_threshold == 2.0


# ----------------------------------------------------------------------------- losses and the balancer

def test_balancer_gradient_norms_follow_the_weights():
    cfg = make_cfg()
    x_hat = torch.randn(4, 1, 100, requires_grad=True)
    t1, t2 = torch.randn(4, 1, 100), torch.randn(4, 1, 100)

    def losses(scale_a):
        return {"a": scale_a * F.l1_loss(x_hat, t1), "b": F.mse_loss(x_hat, t2)}

    def parts(ls):
        return [torch.autograd.grad(ls[k], x_hat, retain_graph=True)[0] for k in ("a", "b")]

    bal = E.Balancer({"a": 1.0, "b": 3.0}, cfg)
    ls = losses(1000.0)
    ga, gb = parts(ls)
    bal.backward(ls, x_hat)
    per_item = lambda g: g.flatten(1).norm(dim=1).mean()
    expect = 0.25 * ga / per_item(ga) + 0.75 * gb / per_item(gb)  # §3.4: λ_i/Σλ of the gradient, whatever ℓ_i's scale
    assert torch.allclose(x_hat.grad, expect, atol=1e-6)
    assert math.isclose(per_item(0.25 * ga / per_item(ga)).item(), 0.25, rel_tol=1e-5)
    # scale invariance: a loss 10^6 times larger gets the same share (a fresh balancer, same first step)
    x_hat.grad = None
    E.Balancer({"a": 1.0, "b": 3.0}, cfg).backward(losses(1e9), x_hat)
    assert torch.allclose(x_hat.grad, expect, atol=1e-6)
    # the norms are an EMA with bias correction: after a second call the average mixes both steps
    n1 = torch.stack([per_item(ga), per_item(gb)])
    ls = losses(10.0)
    n2 = torch.stack([per_item(g) for g in parts(ls)])
    ga, gb = parts(ls)
    x_hat.grad = None
    bal.backward(ls, x_hat)
    d = cfg.balancer_decay
    avg = (d * n1 + n2) / (d + 1)  # the bias-corrected EMA (official averager: total*d + v, fix*d + 1)
    assert torch.allclose(bal.norm_sum / bal.norm_count, avg, rtol=1e-5)
    assert torch.allclose(x_hat.grad, 0.25 * ga / avg[0] + 0.75 * gb / avg[1], rtol=1e-5, atol=1e-8)
    assert not torch.allclose(x_hat.grad, 0.25 * ga / (d * n1[0] + n2[0]) + 0.75 * gb / (d * n1[1] + n2[1]), rtol=0.1)
    # without rescaling it is a plain weighted sum; `other` (commitment) passes untouched
    p = torch.randn(4, 1, 100, requires_grad=True)
    x2 = p * 2
    plain = E.Balancer({"a": 1.0, "b": 3.0}, make_cfg(balancer=False))
    plain.backward({"a": F.l1_loss(x2, t1), "b": F.mse_loss(x2, t2)}, x2, other=p.sum() * 0.5)
    ga2 = torch.sign(2 * p.detach() - t1) / t1.numel()
    gb2 = 2 * (2 * p.detach() - t2) / t2.numel()
    assert torch.allclose(p.grad, 2 * (ga2 + 3 * gb2) + 0.5, atol=1e-6)


def test_losses():
    cfg = make_cfg()
    x = torch.randn(2, 1, 4800) * 0.1
    l_t, l_f = E.reconstruction_losses(x, x.clone(), cfg)
    assert l_t.item() == 0 and l_f.item() < 1e-8
    l_t, l_f = E.reconstruction_losses(x, x + 0.05 * torch.randn_like(x), cfg)
    assert l_t > 0 and l_f > 0
    ones = [torch.ones(2, 1, 5, 3)]
    assert E.discriminator_loss(ones, [-o for o in ones]).item() == 0  # confident and right: no hinge penalty
    assert E.discriminator_loss([o * 0 for o in ones], [o * 0 for o in ones]).item() == 2
    assert E.generator_adv_loss([o * -1 for o in ones]).item() == 2
    fr = [[torch.randn(2, 4, 5, 6), torch.randn(2, 4, 5, 3)]]
    ff = [[t + 0.1 for t in fr[0]]]
    fl = E.feature_loss(fr, ff)
    assert torch.allclose(fl, E.feature_loss([[3 * t for t in fr[0]]], [[3 * t for t in ff[0]]]))  # relative


def test_discriminator_sees_complex_stft():
    cfg = make_cfg(channels=2)
    d = E.MSSTFTDiscriminator(cfg)
    x = torch.randn(2, 2, 4800)
    logits, fmaps = d(x)
    assert len(logits) == len(cfg.disc_n_ffts) and all(len(f) == 5 for f in fmaps)
    assert d.discs[0].convs[0].in_channels == 4  # real + imaginary per audio channel
    for n_fft, l in zip(cfg.disc_n_ffts, logits):
        assert l.shape[:3] == (2, 1, (4800 - n_fft) // (n_fft // 4) + 1)  # (B, 1, frames, freq')
    # a phase-only change (time shift by whole hops) changes the input, so D must see phase, not just magnitude
    assert not torch.allclose(d(torch.roll(x, 7, -1))[0][0], logits[0])


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    cfg = make_cfg(n_filters=8)  # C = 8: a latent worth using in 80 steps
    m = E.EnCodec(cfg)
    bal = E.Balancer({"t": cfg.lambda_t, "f": cfg.lambda_f}, cfg)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3, betas=(0.5, 0.9))
    t = torch.arange(4800) / cfg.sample_rate
    # two different tones (220 Hz; 660 Hz with a 5 Hz tremolo): only the latent tells the decoder which to
    # make
    x = torch.stack([0.3 * torch.sin(2 * math.pi * 220 * t),
                     0.3 * torch.sin(2 * math.pi * 660 * t) * torch.cos(2 * math.pi * 5 * t)])[:, None]
    first = None
    for _ in range(80):
        x_hat, _, commit = m(x, cfg.n_q)
        l_t, l_f = E.reconstruction_losses(x, x_hat, cfg)
        first = first if first is not None else l_f.item()
        opt.zero_grad()
        bal.backward({"t": l_t, "f": l_f}, x_hat, other=commit)
        opt.step()
    assert l_f.item() < first / 2, (first, l_f.item())
    # the decoder depends on the latent: decoding the real codes beats decoding an all-zero latent by >= 2x in
    # ℓ_t (measured 0.040 vs 0.155; a decoder that ignores its input makes the two equal)
    m.eval()
    with torch.no_grad():
        codes, _ = m.encode(x, cfg.n_q)
        real = E.reconstruction_losses(x, m.decode(codes)[..., :x.shape[-1]], cfg)[0].item()
        y0 = m.decoder(torch.zeros_like(m.encoder(x)))[..., :x.shape[-1]]
        zero = E.reconstruction_losses(x, y0, cfg)[0].item()
    assert zero > 2 * real, (real, zero)


def test_quantizer_warmup_bypasses_the_rvq():
    # n_q = 0 (the first cfg.quantizer_warmup steps): a plain autoencoder; k-means waits for trained latents
    torch.manual_seed(0)
    cfg = make_cfg()
    m = E.EnCodec(cfg).train()
    x = torch.randn(2, 1, 4800) * 0.1
    x_hat, codes, commit = m(x, 0)
    assert codes is None and commit.item() == 0 and not commit.requires_grad
    assert all(layer.inited.item() == 0 for layer in m.quantizer.layers)
    assert torch.allclose(x_hat, m.decoder(m.encoder(x))[..., :4800])
    bal = E.Balancer({"t": cfg.lambda_t, "f": cfg.lambda_f}, cfg)
    bal.backward(dict(zip("tf", E.reconstruction_losses(x, x_hat, cfg))), x_hat, other=commit)  # no commitment term
    assert m.encoder.conv_in.conv.parametrizations.weight.original1.grad.abs().sum() > 0
    # quantized steps initialise the codebooks one level per step, each on that step's residual (official
    # Mimi)
    for i in range(cfg.n_q):
        _, codes, _ = m(torch.randn(2, 1, 4800) * 0.1, cfg.n_q)
        inited = [int(layer.inited.item()) for layer in m.quantizer.layers]
        assert inited == [1] * (i + 1) + [0] * (cfg.n_q - i - 1)
        assert codes.shape[1] == i + 1  # the levels not yet initialised wait (no codes, nothing added)
    assert m.quantizer.layers[1].embed.abs().sum() > 0  # not fitted to an all-zero residual


# ----------------------------------------------------------------------------- entropy-coding LM (§3.3)

def test_official_lm_parity():
    # the official LMModel with random weights, our key map, the same probabilities (its initial zero state included)
    pkg = official()
    torch.manual_seed(0)
    cfg = make_cfg(n_q=4, codebook_size=64, lm_dim=16, lm_layers=2, lm_heads=2, lm_context=5 / 75)  # 5 frames back
    ref = pkg.model.LMModel(n_q=4, card=64, dim=16, num_layers=2, num_heads=2, past_context=5).eval()
    ours = E.CodeLM(cfg, frame_rate=75).eval()
    common.load_state_dict(ours, E.official_lm_state_dict_to_ours(ref.state_dict()))
    codes = torch.randint(0, 64, (2, 4, 12), generator=torch.Generator().manual_seed(5))
    prev = torch.cat([torch.zeros(2, 4, 1, dtype=torch.long), codes[..., :-1] + 1], -1)  # official input convention
    with torch.no_grad():
        p_ref = ref(prev)[0]  # (B, K, n_q, T)
        p_ours = ours(codes).softmax(-1).permute(0, 3, 1, 2)  # (B, n_q, T, K) -> (B, K, n_q, T)
    assert (p_ref - p_ours).abs().max() <= 1e-5
    # the paper's LM (the official get_lm_model(): 5 layers, width 200, 3.5 s of context) has the official size
    n_ref = sum(p.numel() for p in pkg.model.LMModel(32, 1024, num_layers=5, dim=200, past_context=262).parameters())
    assert common.count_params(E.CodeLM(make_cfg("24khz"), frame_rate=75)) == n_ref


def test_lm_is_causal_and_learns_a_predictable_stream():
    torch.manual_seed(0)
    cfg = make_cfg(n_q=2, codebook_size=16, lm_dim=32, lm_layers=2, lm_heads=4)
    lm = E.CodeLM(cfg, frame_rate=75)
    codes = torch.randint(0, 16, (1, 2, 20))
    changed = codes.clone()
    changed[..., 10] = (changed[..., 10] + 1) % 16
    with torch.no_grad():
        a, b = lm(codes), lm(changed)
    assert torch.allclose(a[:, :, :11], b[:, :, :11]) and not torch.allclose(a[:, :, 11:], b[:, :, 11:])  # frame t sees < t
    # a periodic stream (period 4) is nearly free to code once learned: far below log2(16) = 4 bits per code
    pattern = torch.tensor([[3, 7, 1, 12], [0, 5, 5, 9]])
    stream = pattern.repeat(1, 10)[None].repeat(4, 1, 1)  # (4, 2, 40)
    opt = torch.optim.Adam(lm.parameters(), lr=3e-3)
    for _ in range(60):
        loss = lm.bits(stream) / stream.numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert lm.bits(stream).item() / stream.numel() < 0.5




# ----------------------------------------------------------------------------- the training objective, literally

def ref_mel(x, n_fft, sr, n_mels):
    """S_i of §3.4 written out: frames by unfold, |rfft|^2 of a normalized (by the window's L2 norm) STFT, HTK mel
    filters without normalisation; padding as audiocraft's msspec (reflect (n_fft - hop)/2, zeros to whole frames)."""
    hop = n_fft // 4
    B, C, T = x.shape
    p = (n_fft - hop) // 2
    y = F.pad(x.reshape(B * C, 1, T), (p, p), mode="reflect")[:, 0]
    frames = math.ceil((y.shape[-1] - n_fft) / hop) + 1
    y = F.pad(y, (0, (frames - 1) * hop + n_fft - y.shape[-1]))
    w = torch.hann_window(n_fft)
    spec = torch.fft.rfft(y.unfold(-1, n_fft, hop) * w, dim=-1)  # (B*C, frames, n_fft/2 + 1)
    power = spec.abs() ** 2 / (w ** 2).sum()
    fb = torch.from_numpy(common.mel_filterbank(sr, n_fft, n_mels, htk=True, norm=None))
    return (power @ fb.T).transpose(1, 2).reshape(B, C, n_mels, frames)


def ref_recon(x, x_hat, cfg):
    # ℓ_t = ||x - x̂||_1 (mean); ℓ_f = 1/|e| Σ_i ||S_i(x) - S_i(x̂)||_1 + α ||log10(ε + S_i(x)) - log10(ε + S_i(x̂))||_2^2
    l_t = (x - x_hat).abs().mean()
    l_f = 0
    for i in cfg.mel_scales:
        a, b = ref_mel(x, 2 ** i, cfg.sample_rate, cfg.n_mels), ref_mel(x_hat, 2 ** i, cfg.sample_rate, cfg.n_mels)
        l_f = l_f + (a - b).abs().mean() + cfg.mel_alpha * ((torch.log10(1e-5 + a) - torch.log10(1e-5 + b)) ** 2).mean()
    return l_t, l_f / len(cfg.mel_scales)


def ref_feature(fr, ff):  # 1/(KL) Σ_k,l ||D_k^l(x) - D_k^l(x̂)||_1 / mean |D_k^l(x)|, normalised by the REAL maps
    terms = [(r - f).abs().mean() / r.abs().mean() for a, b in zip(fr, ff) for r, f in zip(a, b)]
    return sum(terms) / len(terms)


def ref_step(G, D, embeds, x, cfg, lr, ema):
    """One training step of §3.4 with SGD, transcribed: D's hinge update, then the codec's gradient built by the
    balancer (per-item gradient norms on x̂, bias-corrected EMA) plus the commitment loss. G, D are updated in place;
    embeds: the codebooks as they are before the step; ema: [norm_sum, count] carried between steps."""
    B, C, T = x.shape
    z = G.encoder(x)  # (B, D, F)
    zf = z.transpose(1, 2).reshape(-1, z.shape[1])  # (B*F, D)
    r, total, commit = zf, torch.zeros_like(zf), 0
    for e in embeds:
        q = e[torch.cdist(r, e).argmin(1)]  # nearest codeword (a constant: the codebooks learn by EMA)
        commit = commit + ((r - q) ** 2).mean()  # ℓ_w of this layer: the residual it saw vs its code
        total, r = total + q, r - q
    commit = commit / len(embeds)
    q_st = zf + (total - zf).detach()  # straight-through: the forward is Σ q, the gradient is the identity
    x_hat = G.decoder(q_st.view(B, -1, z.shape[1]).transpose(1, 2))[..., :T]
    # discriminator: 1/K Σ_k mean relu(1 - D_k(x)) + mean relu(1 + D_k(x̂)), one SGD step
    lr_, _ = D(x)
    lf_, _ = D(x_hat.detach())
    loss_d = sum(F.relu(1 - a).mean() + F.relu(1 + b).mean() for a, b in zip(lr_, lf_)) / len(lr_)
    gd = torch.autograd.grad(loss_d, list(D.parameters()))
    with torch.no_grad():
        for p, g in zip(D.parameters(), gd):
            p -= lr * g
    # the codec's losses, against the updated D
    logits, fmap_fake = D(x_hat)
    with torch.no_grad():
        _, fmap_real = D(x)
    l_t, l_f = ref_recon(x, x_hat, cfg)
    losses = {"t": l_t, "f": l_f, "g": sum(F.relu(1 - l).mean() for l in logits) / len(logits),
              "feat": ref_feature(fmap_real, fmap_fake)}
    lam = {"t": cfg.lambda_t, "f": cfg.lambda_f, "g": cfg.lambda_g, "feat": cfg.lambda_feat}
    grads = {k: torch.autograd.grad(v, x_hat, retain_graph=True)[0] for k, v in losses.items()}
    norms = torch.stack([grads[k].flatten(1).norm(dim=1).mean() for k in lam])
    ema[0], ema[1] = cfg.balancer_decay * ema[0] + norms, cfg.balancer_decay * ema[1] + 1
    avg = ema[0] / ema[1]
    out = sum(lam[k] / sum(lam.values()) * grads[k] / (1e-12 + a) for k, a in zip(lam, avg))
    params = list(G.parameters())
    gx = torch.autograd.grad(x_hat, params, out, retain_graph=True, allow_unused=True)
    gw = torch.autograd.grad(cfg.lambda_w * commit, params, allow_unused=True)
    with torch.no_grad():
        for p, a, b in zip(params, gx, gw):
            p -= lr * sum(g for g in (a, b) if g is not None)
    return dict(losses, d=loss_d, w=commit)


def test_golden_training_steps():
    # two real train_steps (D and G updates, the balancer, the quantizer) with SGD, against ref_step above
    cfg = make_cfg(disc_prob=1.0, bandwidths="(1.8,)")  # n_q 4; D updates at every step
    torch.manual_seed(0)
    state = E.build(cfg, CPU)
    G, D = state["G"], state["D"]
    g = torch.Generator().manual_seed(1)
    t = torch.arange(cfg.segment) / cfg.sample_rate
    x = (0.3 * torch.sin(2 * math.pi * 330 * t) + 0.05 * torch.randn(2, 1, cfg.segment, generator=g)).float()
    with torch.no_grad():
        zs = G.encoder(x).std().item()
    random_codebooks(G, seed=2, scale=zs, used=100.0)  # initialised, no dead code: no k-means, no re-seeding
    lr = 0.05
    state["opt_g"], state["opt_d"] = torch.optim.SGD(G.parameters(), lr=lr), torch.optim.SGD(D.parameters(), lr=lr)
    Gr, Dr = copy.deepcopy(G), copy.deepcopy(D)
    ema = [torch.zeros(4), torch.zeros(())]
    for step in (1, 2):
        embeds = [layer.embed.clone() for layer in G.quantizer.layers[:4]]
        before = {k: v.detach().clone() for k, v in G.named_parameters()}
        got = E.train_step(state, x, cfg, CPU)
        want = ref_step(Gr, Dr, embeds, x, cfg, lr, ema)
        assert got["n_q"] == 4 and set(want) <= set(got)
        for k, v in want.items():
            assert math.isclose(got[k].item(), v.item(), rel_tol=1e-4, abs_tol=1e-7), (step, k, got[k].item(), v.item())
        for (name, p), pr in zip(G.named_parameters(), Gr.parameters()):
            delta, delta_ref = p.detach() - before[name], pr.detach() - before[name]
            assert (delta - delta_ref).abs().max() <= 1e-3 * delta_ref.abs().max() + 1e-7, (step, name)
        for (name, p), pr in zip(D.named_parameters(), Dr.parameters()):
            assert torch.allclose(p, pr, rtol=1e-5, atol=1e-7), (step, name)
        assert torch.allclose(state["balancer"].norm_sum, ema[0], rtol=1e-5)
        with torch.no_grad():  # keep the two in lockstep (float noise) for the next step
            for p, pr in zip(G.parameters(), Gr.parameters()):
                pr.copy_(p)
    enc = G.encoder.conv_in.conv.parametrizations.weight.original1
    assert (enc - Gr.encoder.conv_in.conv.parametrizations.weight.original1).abs().max() == 0  # (lockstep)


def test_straight_through_gradient_is_identity():
    # §3.2: the quantizer's forward is Σ q_i, its backward passes the decoder's gradient to the encoder unchanged
    cfg = make_cfg()
    q = random_codebooks(types.SimpleNamespace(quantizer=E.ResidualVectorQuantizer(cfg)), used=100.0).quantizer.train()
    z = torch.randn(2, cfg.dimension, 9, requires_grad=True)
    out, codes, _ = q(z, cfg.n_q)
    upstream = torch.randn_like(out)
    (gz,) = torch.autograd.grad(out, z, upstream)
    assert torch.equal(gz, upstream)


def test_commitment_gradient_sums_over_the_rvq_layers():
    # ℓ_w = 1/n_q Σ_i ||r_i - q_i||² with r_i = z - Σ_{j<i} q_j: every layer pulls the encoder (encodec#25: with
    # r_i = r_{i-1} - q_{i-1} built from the straight-through q, all layers but the first cancel)
    cfg = make_cfg()
    q = random_codebooks(types.SimpleNamespace(quantizer=E.ResidualVectorQuantizer(cfg)), used=100.0).quantizer.train()
    embeds = [layer.embed.clone() for layer in q.layers]
    z = torch.randn(2, cfg.dimension, 9, requires_grad=True)
    _, codes, commit = q(z, cfg.n_q)
    (gz,) = torch.autograd.grad(commit, z)
    r = z.detach().transpose(1, 2).reshape(-1, cfg.dimension)
    per_layer = []
    for i, e in enumerate(embeds):
        qi = e[codes[:, i].reshape(-1)]
        per_layer.append(2 * (r - qi) / r.numel() / cfg.n_q)  # d/dz of mean((r_i - q_i)²) / n_q
        r = r - qi
    expect = sum(per_layer).view(2, 9, cfg.dimension).transpose(1, 2)
    assert torch.allclose(gz, expect, atol=1e-8)
    later = sum(per_layer[1:]).norm()
    assert later > 0.3 * per_layer[0].norm()  # the later layers matter: the bug would drop this much


def test_feature_loss_and_reconstruction_exact_values():
    # relative feature matching on hand-made maps: mean |r - f| / mean |r|, averaged over layers and scales
    r1 = torch.tensor([[1.0, -2.0], [3.0, -4.0]])  # mean |r1| = 2.5
    f1 = r1 + torch.tensor([[1.0, 0.0], [0.0, -1.0]])  # mean |r1 - f1| = 0.5 -> 0.2
    r2 = torch.full((3,), 2.0)
    f2 = torch.tensor([2.0, 3.0, 6.0])  # 5/3 / 2 -> 5/6
    fl = E.feature_loss([[r1], [r2]], [[f1], [f2]])
    assert math.isclose(fl.item(), (0.2 + 5 / 6) / 2, rel_tol=1e-6)  # by the fake maps it would be 0.5/3 + 5/11 ...
    assert math.isclose(E.generator_adv_loss([torch.tensor([0.5, 2.0]), torch.tensor([-1.0])]).item(),
                        (0.25 + 2.0) / 2)
    assert math.isclose(E.discriminator_loss([torch.tensor([0.5, 2.0])], [torch.tensor([-0.5, 1.0])]).item(),
                        0.25 + 1.25)
    # reconstruction losses against the transcription, on a hand-made pair: a chirp and a quieter, noisy copy
    cfg = make_cfg(mel_scales="(5,6,7,8)")
    t = torch.arange(4800) / 24000
    x = (0.5 * torch.sin(2 * math.pi * (200 + 3000 * t) * t))[None, None]
    x_hat = 0.3 * x + 0.01 * torch.randn(1, 1, 4800, generator=torch.Generator().manual_seed(0))
    got, want = E.reconstruction_losses(x, x_hat, cfg), ref_recon(x, x_hat, cfg)
    assert math.isclose(got[0].item(), want[0].item(), rel_tol=1e-6)
    assert math.isclose(got[1].item(), want[1].item(), rel_tol=1e-4), (got[1].item(), want[1].item())
    # the log-mel term carries the quiet bins: here it is most of ℓ_f (the old linear L2 was ~0)
    l1_only = ref_recon(x, x_hat, make_cfg(mel_scales="(5,6,7,8)", mel_alpha=0.0))[1]
    assert l1_only < 0.5 * want[1]
    assert E.reconstruction_losses(x, x.clone(), cfg)[1].item() == 0


def test_quantizer_warmup_counts_steps():
    # the first quantizer_warmup steps bypass the RVQ (n_q = 0), the next one quantizes (and runs k-means)
    cfg = make_cfg(quantizer_warmup=2, disc_prob=0.0)
    torch.manual_seed(0)
    state = E.build(cfg, CPU)
    x = torch.randn(2, 1, cfg.segment) * 0.1
    n = [int(E.train_step(state, x, cfg, CPU)["n_q"]) for _ in range(3)]
    assert n[:2] == [0, 0] and n[2] > 0 and state["G"].quantizer.layers[0].inited.item() == 1
    assert state["choices"].step == 3

def test_disc_warmup_trains_on_reconstruction_alone_then_restarts_the_balancer():
    # the first disc_warmup steps (ours, CPU): no D update, no adversarial terms, the balancer shares x̂'s
    # gradient between ℓ_t and ℓ_f alone; the step after, every EMA of the balancer starts again
    cfg = make_cfg(disc_warmup=2, disc_prob=1.0)
    torch.manual_seed(0)
    state = E.build(cfg, CPU)
    x = torch.randn(2, 1, cfg.segment) * 0.1
    d0 = [p.detach().clone() for p in state["D"].parameters()]
    for _ in range(2):
        out = E.train_step(state, x, cfg, CPU)
        assert "d" not in out and out["g"].item() == 0 and out["feat"].item() == 0
    assert all(torch.equal(a, b) for a, b in zip(d0, state["D"].parameters()))
    bal = state["balancer"]
    assert bal.norm_sum[:2].min() > 0 and bal.norm_sum[2:].abs().max() == 0  # t, f seen; g, feat not
    assert math.isclose(bal.norm_count.item(), 1 + cfg.balancer_decay, rel_tol=1e-6)
    out = E.train_step(state, x, cfg, CPU)
    assert "d" in out and out["g"].item() > 0
    assert not all(torch.equal(a, b) for a, b in zip(d0, state["D"].parameters()))
    assert bal.norm_count.item() == 1 and bal.norm_sum.min() > 0  # reset, then this step's norms alone


def test_bandwidth_is_drawn_per_batch_and_d_updates_with_disc_prob():
    # §3.2: one bandwidth per batch, uniform over cfg.bandwidths; §4: D updates with probability disc_prob.
    # Both drawn from (seed, step), so the same step draws the same after a resume
    cfg = make_cfg(disc_prob=0.5, bandwidths="(0.9,1.8)")  # n_q 2 and 4 (64 codes: 0.45 kbps each)
    torch.manual_seed(0)
    state = E.build(cfg, CPU)
    x = torch.randn(2, 1, cfg.segment) * 0.1
    n_q, upd = [], []
    for _ in range(16):
        out = E.train_step(state, x, cfg, CPU)
        n_q.append(int(out["n_q"]))
        upd.append("d" in out)
    assert set(n_q) == {2, 4} and 4 <= sum(upd) <= 12, (n_q, upd)
    again = E.StepChoices(cfg)
    again.load_state_dict({"step": 7})
    step, rng = again.next()
    assert step == 8 and E.EnCodec(cfg).n_q_for(rng.choice(cfg.bandwidths)) == n_q[7]
    assert (rng.random() < cfg.disc_prob) == upd[7]

# ----------------------------------------------------------------------------- no host sync; compiled == eager

def test_codebook_training_step_has_no_graph_break():
    # .item(), `if dead.any()` or an `inited` check on the device would each break the graph (and sync a GPU):
    # fullgraph=True fails on any of them. (aot_eager traces like inductor but skips its C++ build, minutes here.)
    cfg = make_cfg()
    q = E.ResidualVectorQuantizer(cfg).train()
    z = torch.randn(2, cfg.dimension, 15)
    for _ in range(cfg.n_q):  # the first training steps: k-means one level per step, one read per `inited`
        q(z, cfg.n_q)
    for layer in q.layers:  # no dead code, so the random re-seeding (an RNG compiled code draws differently) is idle
        layer.cluster_size.fill_(100.0)
    torch._dynamo.reset()
    qc = torch.compile(q, fullgraph=True, backend="aot_eager")
    ref = copy.deepcopy(q)
    for seed in (1, 2):
        torch.manual_seed(seed)
        z = torch.randn(2, cfg.dimension, 15, requires_grad=True)
        out, codes, commit = qc(z, cfg.n_q)
        torch.manual_seed(seed)
        z2 = z.detach().clone().requires_grad_()
        out2, codes2, commit2 = ref(z2, cfg.n_q)
        assert torch.equal(codes, codes2) and torch.allclose(out, out2) and torch.allclose(commit, commit2)
        for a, b in zip(q.buffers(), ref.buffers()):
            assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.skipif(not os.environ.get("NANOAUDIO_SLOW"), reason="inductor's CPU build takes minutes: NANOAUDIO_SLOW=1")
def test_cli_compile_true_equals_eager(tmp_path):
    # `python encodec.py --compile=True` forced on the CPU (inductor) against eager: the same losses at both steps and
    # the same weights. Inductor draws random numbers its own way (k-means' and the dead codes' rows), so it runs
    # with torch._inductor.config.fallback_random, which makes it use eager's generator.
    flags = ["--preset=tiny", "--device=cpu", "--max_iters=2", "--bandwidths=(1.8,)"]
    prog = ("import runpy, sys, torch._inductor.config as c; c.fallback_random = True; sys.argv = sys.argv[1:]; "
            "runpy.run_path('encodec.py', run_name='__main__')")
    outs = [run_script("-c", prog, "encodec.py", *flags, f"--compile={c}", f"--out_dir={tmp_path / c}",
                       timeout=3000).stdout for c in ("True", "False")]
    steps = [re.findall(r"^step (\d)/2 \| (.*?) \| [\d.]+ ms/step", o, re.M) for o in outs]
    assert len(steps[0]) == len(steps[1]) == 2, outs
    for (_, a), (_, b) in zip(*steps):
        for pa, pb in zip(a.split(" | "), b.split(" | ")):
            (ka, va), (kb, vb) = pa.split(), pb.split()
            assert ka == kb and math.isclose(float(va), float(vb), rel_tol=1e-3, abs_tol=1e-4), (pa, pb)
    a, b = (common.load_checkpoint(str(tmp_path / c / "ckpt.pt"))["models"]["G"] for c in ("True", "False"))
    close = []
    for k in [k for k in a if not k.startswith("quantizer.")]:  # (a near-tie code or re-seeded row may differ)
        # Adam's first step is lr * sign(g): a gradient at float-noise level may flip, moving by 2 lr
        diff = (a[k] - b[k]).abs()
        assert diff.max() <= 4 * 3e-4, k
        close.append((diff <= 1e-5 + 1e-3 * b[k].abs()).flatten())
    assert torch.cat(close).float().mean() >= 0.99

# ----------------------------------------------------------------------------- command line

def test_cli_contract_diverging_lr_on_resume_and_the_lm(tmp_path, capsys):
    out = check_cli_contract("encodec.py", tmp_path, bench_keys=("train_audio_s_per_s", "train_flops_per_step",
                                                                  "encode_rtf_b1_eager", "decode_rtf_b2_eager"))
    assert "eval val speech 0.9 kbps (1 clips) | si_snr" in out["resume"]  # training evaluates on val...
    assert "eval test music 1.8 kbps (1 clips) |" in out["eval"]  # ...--mode=eval reports test
    d = tmp_path / "run"
    assert (d / "samples" / "step000005" / "music_1.8kbps.wav").exists()
    before = common.load_checkpoint(str(d / "ckpt.pt"))
    # issue 13: a changed --lr on resume takes effect: 1e30 explodes, stops with the divergence line, ckpt intact
    # (in this process: one interpreter start less)
    cfg = common.parse_config(E.Config, E.PRESETS, ["--init_from=resume", "--lr=1e30", "--max_iters=12",
                                                     f"--out_dir={d}", "--device=cpu"])
    assert cfg.lr == 1e30 and cfg.preset == "tiny"
    with pytest.raises(SystemExit, match="diverged") as e:
        E.train(cfg)
    assert "\n" not in str(e.value)
    assert "lr 0.0003 -> 1e+30" in capsys.readouterr().out
    after = common.load_checkpoint(str(d / "ckpt.pt"))
    assert after["step"] == 5 and all(torch.equal(v, after["models"]["G"][k]) for k, v in before["models"]["G"].items())
    # the entropy-coding LM (§3.3) on this codec: trained, saved, its rates reported by evaluate()
    res = E.train_lm(common.parse_config(E.Config, E.PRESETS, ["--mode=lm", f"--init_from={d}/ckpt.pt", "--device=cpu"],
                                         modes=E.MODES))
    assert (d / "lm.pt").exists() and res["speech_1.8kbps"]["kbps_lm"] > 0
    assert re.search(r"eval test speech 1.8 kbps \(1 clips\) \|.*\| [\d.]+ kbps sent \|.*\| [\d.]+ kbps with the LM",
                     capsys.readouterr().out)
    with pytest.raises(SystemExit, match="lm_dim"):  # an LM of another width
        E.load_lm(make_cfg(lm_dim=32, lm_init=f"{d}/lm.pt"), 75, "cpu")
    with pytest.raises(SystemExit, match="n_filters"):  # same paper, another architecture
        E.load_for_inference(make_cfg(mode="eval", n_filters=8, init_from=f"{d}/ckpt.pt"), CPU)
    ckpt = common.load_checkpoint(str(d / "ckpt.pt"))
    ckpt["paper"] = "soundstream"
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="soundstream"):
        E.load_for_inference(make_cfg(mode="eval", init_from=str(tmp_path / "other.pt")), CPU)


def test_official_file_samples_without_preset_flags(tmp_path):
    # issue 11: --mode=sample --init_from=encodec_24khz-*.th on a CPU (where the `small` preset is the default)
    # builds the file's model; training from it under the small preset names the flag to pass
    pkg = official()
    torch.manual_seed(0)
    ref = pkg.model.EncodecModel.encodec_model_24khz(pretrained=False)
    fill_official_codebooks(ref.quantizer.vq)
    path = str(tmp_path / "encodec_24khz-d7cc33bc.th")
    torch.save(ref.state_dict(), path)
    wav = str(tmp_path / "in.wav")
    sf.write(wav, (0.1 * np.sin(np.arange(12000) / 10)).astype(np.float32), 24000)
    cfg = common.parse_config(E.Config, E.PRESETS, ["--mode=sample", f"--init_from={path}", f"--input={wav}",
                                                     f"--out_dir={tmp_path}", "--bandwidths=(1.5,)", "--device=cpu"])
    assert cfg.preset == "small"
    E.sample(cfg)
    assert cfg.n_filters == 32 and cfg.n_q == 32 and cfg.bandwidths == (1.5,)  # the flag given stays
    assert sorted(os.listdir(tmp_path / "samples")) == ["in_1.5kbps.png", "in_1.5kbps.wav"]
    small = make_cfg("small")
    with pytest.raises(SystemExit, match=r"--preset=24khz") as e:
        E.load_official({"G": E.EnCodec(small)}, ref.state_dict())
    assert "--n_filters (file 32, now 16)" in str(e.value)


def test_errors_are_one_line(tmp_path):
    # in this process (one interpreter start less): SystemExit("error: ...") is the one line Python prints
    one_line_error(E.evaluate, make_cfg(mode="eval", out_dir=str(tmp_path / "e"), device="cpu"),
                   match="needs a trained codec")
    # data errors stop before step 1: a folder of clips shorter than a training crop
    for i in range(3):
        sf.write(str(tmp_path / f"c{i}.wav"), np.zeros(2000, np.float32) + 0.01 * i, 24000)
    with pytest.raises(SystemExit, match="shorter than 4800 samples"):
        E.train(make_cfg(data_dir=str(tmp_path), out_dir=str(tmp_path / "o"), device="cpu"))
    assert not (tmp_path / "o" / "ckpt.pt").exists()
    for flag, msg in (("--codebook_size=100", "power of 2"), ("--disc_prob=2", "disc_prob"), ("--n_q=0", "n_q"),
                      ("--segment=100", "shorter than the longest loss window"), ("--norm=batch", "norm"),
                      ("--lm_heads=3", "divisible"), ("--bandwidths=(0,)", "bandwidths"), ("--batch_size=0", "batch_size"),
                      ("--n_filter=8", "did you mean --n_filters")):
        with pytest.raises(SystemExit, match=re.escape(msg)):
            make_cfg(**dict([flag[2:].split("=")]))
    # a checkpoint from the quantizer warm-up has empty codebooks: evaluating it says so
    E.train(make_cfg(quantizer_warmup=5, max_iters=1, out_dir=str(tmp_path / "w"), device="cpu"))
    with pytest.raises(SystemExit, match="never initialised"):
        E.load_for_inference(make_cfg(mode="eval", init_from=str(tmp_path / "w" / "ckpt.pt")), CPU)
