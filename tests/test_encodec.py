"""Tests for encodec.py: parity with the official `encodec` package (24 kHz, 48 kHz, the quantizer alone and its
EMA update), bitrate arithmetic, streaming == offline, causality, RVQ round trip and monotone error, EMA / dead-code
rows, k-means init, the loss balancer, losses, overfitting, and the command line (train / resume exactness /
sample / bench / bad checkpoints / unknown flags)."""
import importlib.machinery
import importlib.util
import json
import math
import os
import re
import sys
import types

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from cli import run_script  # noqa: E402
import encodec as E  # noqa: E402  (our file; the pip package of the same name is loaded by official() below)



def make_cfg(preset="tiny", **kw):
    return common.parse_config(E.Config, E.PRESETS, [f"--preset={preset}"] + [f"--{k}={v}" for k, v in kw.items()])


def random_codebooks(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for layer in model.quantizer.layers:
        layer.embed.copy_(torch.randn(layer.embed.shape, generator=g))
        layer.embed_avg.copy_(layer.embed)
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
    """The pip `encodec` package, imported although our encodec.py shadows its name; skip if absent."""
    if "pkg" not in _OFFICIAL:
        ours = sys.modules.pop("encodec", None)
        try:
            path = [p for p in sys.path if os.path.abspath(p or ".") != ROOT]
            spec = importlib.machinery.PathFinder.find_spec("encodec", path)
            if spec is None or os.path.abspath(spec.origin).startswith(ROOT):
                _OFFICIAL["pkg"] = None
            else:
                _install_stubs()
                mod = importlib.util.module_from_spec(spec)
                sys.modules["encodec"] = mod
                spec.loader.exec_module(mod)
                import encodec.model, encodec.msstftd, encodec.quantization.vq  # noqa: F401
                _OFFICIAL["pkg"] = mod
        finally:
            sys.modules["encodec"] = ours
    if _OFFICIAL["pkg"] is None:
        print("skipping: the official `encodec` package is not installed (pip install --no-deps encodec)")
        pytest.skip("the official `encodec` package is not installed (pip install --no-deps encodec)")
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
    cfg = make_cfg(preset, init_from=str(path))
    ours = E.load_model(cfg).eval()
    assert common.count_params(ours) == sum(p.numel() for p in ref.parameters())
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
            zs.append(m.encoder.stream(x[..., pos * m.hop:(pos + n) * m.hop], state))
            pos += n
        assert torch.allclose(torch.cat(zs, -1), z, atol=1e-6)
        state, ys, pos = {}, [], 0
        for n in (1, 2, 9, 3, 25):
            ys.append(m.decode_stream(codes[..., pos:pos + n], state))
            pos += n
        y_stream = torch.cat(ys, -1)
        assert y_stream.shape == y.shape and (y_stream - y).abs().max() <= 1e-5


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
        assert torch.cdist(cb.embed[r:r + 1], x).min() < 1e-6 and cb.cluster_size[r] == cfg.dead_code_threshold
    # other rows: unused but alive, so they stay where they were (up to the smoothing)
    for r in (2, 3, 4, 7):
        assert torch.allclose(cb.embed[r], embed[r], rtol=1e-4)

def test_dead_codes_get_a_grace_period_with_small_batches():
    # a batch of 16 frames for 64 codes: 0.25 uses per code. A re-seeded code must not be dead again (and
    # re-drawn from the next batch) just because the next batch did not pick it; the old reset to the threshold
    # re-drew nearly the whole codebook from the last batch every step whenever frames/K < threshold
    cfg = make_cfg(codebook_size=64, dimension=4, dead_code_threshold=0.1)
    cb = E.Codebook(cfg).train()
    embed = torch.randn(64, 4)
    cb.embed.copy_(embed), cb.cluster_size.fill_(0.0), cb.embed_avg.zero_(), cb.inited.fill_(1)
    x1 = torch.randn(16, 4)
    cb(x1)  # every code was dead: all re-seeded from x1 with usage n/K = 0.25
    assert torch.allclose(cb.cluster_size, torch.full((64,), 0.25))
    assert (cb.embed[:, None] - x1[None]).abs().sum(-1).min(1).values.max() < 1e-5  # rows of x1
    seeded = cb.embed.clone()
    x2 = seeded[:1] + 1e-3 * torch.randn(16, 4)  # the next batch picks (at most) a few codes
    _, codes = cb(x2)
    unused = torch.ones(64, dtype=torch.bool)
    unused[codes.unique()] = False
    assert unused.sum() > 50
    assert torch.allclose(cb.embed[unused], seeded[unused], atol=1e-4)  # kept, not re-drawn from x2
    assert (cb.cluster_size >= cfg.dead_code_threshold).all()  # nobody is dead one step after re-seeding


def test_small_preset_dead_code_threshold_fits_its_batch():
    # a code used at the uniform rate (frames per batch / K) must count as alive, else every code is re-seeded
    # every step; the paper presets keep the official threshold 2 (64 x 1 s: 4.7 frames per code)
    for preset in ("small", "24khz"):
        cfg = make_cfg(preset)
        frames = cfg.batch_size * math.ceil(cfg.segment_seconds * cfg.sample_rate / math.prod(cfg.ratios))
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
    bal.backward(ls, x_hat)
    d = cfg.balancer_decay
    assert torch.allclose(bal.norm_sum / bal.norm_count, (d * n1 + n2) / (d + 1), rtol=1e-5)
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
    cfg = make_cfg()
    m = E.EnCodec(cfg)
    bal = E.Balancer({"t": cfg.lambda_t, "f": cfg.lambda_f}, cfg)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3, betas=(0.5, 0.9))
    t = torch.arange(4800) / cfg.sample_rate
    x = (0.3 * torch.sin(2 * math.pi * 220 * t) * torch.tensor([1.0, 0.5])[:, None]).view(2, 1, -1)
    first = None
    for _ in range(30):
        x_hat, _, commit = m(x, cfg.n_q)
        l_t, l_f = E.reconstruction_losses(x, x_hat, cfg)
        first = first if first is not None else l_f.item()
        opt.zero_grad()
        bal.backward({"t": l_t, "f": l_f}, x_hat, other=commit)
        opt.step()
    assert l_f.item() < first / 2, (first, l_f.item())


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
    m(x, cfg.n_q)  # the first quantized step initialises the codebooks
    assert all(layer.inited.item() == 1 for layer in m.quantizer.layers[:cfg.n_q])


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


# ----------------------------------------------------------------------------- command line

def run(*args):
    return run_script("encodec.py", *args).stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("encodec"))
    flags = ["--preset=tiny", "--device=cpu", "--compile=False", f"--out_dir={d}"]
    out = run(*flags, "--max_iters=3")
    assert os.path.exists(os.path.join(d, "ckpt.pt")) and "eval speech_0.9kbps" in out
    assert os.path.exists(os.path.join(d, "samples", "eval_music_1.8kbps.png"))  # training writes samples too
    return d, flags


def test_cli_resume_continues_exactly(trained, tmp_path):
    d, flags = trained
    assert common.load_checkpoint(os.path.join(d, "ckpt.pt"))["step"] == 3
    assert "step 5/5" in run(*flags, "--init_from=resume", "--max_iters=5")
    resumed = common.load_checkpoint(os.path.join(d, "ckpt.pt"))
    assert resumed["step"] == 5
    straight = str(tmp_path / "straight")
    E.train(make_cfg(device="cpu", compile=False, max_iters=5, out_dir=straight))
    ref = common.load_checkpoint(os.path.join(straight, "ckpt.pt"))
    for net in ("model", "disc", "balancer"):
        for k, v in ref["models"][net].items():
            assert torch.equal(v, resumed["models"][net][k]), f"{net}.{k} differs after resume"


def test_cli_sample_writes_wav_and_png(trained):
    d, flags = trained
    run(*flags, "--mode=sample", f"--init_from={d}/ckpt.pt")
    files = os.listdir(os.path.join(d, "samples"))
    for kind in ("speech", "music"):
        for bw in ("0.9", "1.8"):
            assert f"{kind}_{bw}kbps.wav" in files and f"{kind}_{bw}kbps.png" in files


def test_cli_bench_prints_one_json_line(trained):
    d, flags = trained
    lines = [l for l in run(*flags, "--mode=bench").splitlines() if l.startswith("{")]
    assert len(lines) == 1
    fig = json.loads(lines[0])
    for k in ("train_step_ms", "train_audio_s_per_s", "train_flops_per_step", "encode_rtf_b1_eager",
              "decode_rtf_b2_eager", "params", "peak_memory_mb"):
        assert fig[k] is not None and fig[k] > 0, k


def test_cli_lm_trains_and_reports_the_saving(trained):
    d, flags = trained
    out = run(*flags, "--mode=lm", f"--init_from={d}/ckpt.pt")
    assert os.path.exists(os.path.join(d, "lm.pt"))
    assert re.search(r"lm speech 1.8 kbps: [\d.]+ kbps raw -> [\d.]+ kbps with the LM", out)
    out = run(*flags, "--mode=lm", f"--init_from={d}/ckpt.pt", f"--lm_init={d}/lm.pt", "--lm_iters=0")  # evaluate only
    assert "lm music 0.9 kbps" in out and "saved the LM" not in out
    with pytest.raises(SystemExit, match="lm_dim"):  # an LM of another width
        E.load_lm(make_cfg(lm_dim=32, lm_init=f"{d}/lm.pt"), 75, "cpu")


def test_bad_checkpoints_and_flags_are_rejected(trained, tmp_path):
    d, _ = trained
    with pytest.raises(SystemExit, match="n_filters"):  # same paper, another architecture
        E.load_model(make_cfg(n_filters=8, init_from=f"{d}/ckpt.pt"))
    ckpt = common.load_checkpoint(os.path.join(d, "ckpt.pt"))
    ckpt["paper"] = "soundstream"
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="soundstream"):
        E.load_model(make_cfg(init_from=str(tmp_path / "other.pt")))
    torch.save({"foo": torch.zeros(1)}, tmp_path / "junk.pt")
    with pytest.raises(SystemExit, match="neither"):
        E.load_model(make_cfg(init_from=str(tmp_path / "junk.pt")))
    with pytest.raises(SystemExit, match="did you mean --n_filters"):
        make_cfg(n_filter=8)
