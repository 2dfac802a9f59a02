"""Tests for moshi.py, part 1 (Mimi): parity with the pip `moshi` package at random weights (codes identical, audio
within 1e-5, both key layouts of the official file), the official parameter count, frame-rate and bitrate
arithmetic, causality (conv stack, transformer mask, context), RoPE's interleaved pairs, streaming == offline,
the split RVQ (same latent, outputs summed, half the sequences unquantized), EMA / dead-code updates, the
distillation loss, the teacher-feature alignment, a golden training step, and the command line."""
import copy
import importlib
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import moshi as M
from cli import check_cli_contract, require, run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_cfg(preset="tiny", **kw):
    return common.parse_config(M.Config, M.PRESETS, [f"--preset={preset}"] + [f"--{k}={v}" for k, v in kw.items()])


def random_codebooks(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, M.Codebook):
            m.embedding_sum.copy_(torch.randn(m.embedding_sum.shape, generator=g))
            m.cluster_usage.copy_(torch.rand(m.cluster_usage.shape, generator=g) + 0.5)
            m.initialized.fill_(1)
    return model


def tiny_mimi(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = make_cfg(**kw)
    return random_codebooks(M.Mimi(cfg), seed).eval(), cfg

# ----------------------------------------------------------------------------- the official package

def reference():
    """The pip package `moshi` (our moshi.py shadows its name): import it with the repo off sys.path."""
    ours = sys.modules.get("moshi")
    saved = sys.path[:]
    try:
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") not in (ROOT, os.path.abspath(""))]
        sys.modules.pop("moshi", None)
        try:
            loaders = importlib.import_module("moshi.models.loaders")
        except ImportError as e:
            pytest.skip(f"reference package not installed or not importable ({e}): pip install --no-deps moshi==0.2.13 "
                        "safetensors einops sentencepiece sphn huggingface-hub (see requirements-ref.txt)")
        return loaders
    finally:
        sys.path[:] = saved
        if ours is not None:
            sys.modules["moshi"] = ours


# a reduced official config (the full one is checked by parameter count): 2 heads of 64, as the official heads
REF_CONFIG = {
    "sample_rate": 24000, "channels": 1, "frame_rate": 12.5,
    "seanet": {"channels": 1, "dimension": 128, "causal": True, "n_filters": 8, "n_residual_layers": 1,
               "activation": "ELU", "compress": 2, "dilation_base": 2, "disable_norm_outer_blocks": 0,
               "kernel_size": 7, "residual_kernel_size": 3, "last_kernel_size": 3, "norm": "none",
               "pad_mode": "constant", "ratios": [8, 6, 5, 4], "true_skip": True},
    "quantizer": {"dimension": 32, "n_q": 8, "bins": 64, "input_dimension": 128, "output_dimension": 128},
    "transformer": {"d_model": 128, "num_heads": 2, "num_layers": 2, "causal": True, "layer_scale": 0.01,
                    "context": 250, "conv_layout": True, "max_period": 10000, "gating": "none",
                    "norm": "layer_norm", "positional_embedding": "rope", "dim_feedforward": 256,
                    "input_dimension": 128, "output_dimensions": [128]},
}


def reference_mimi(seed=0):
    loaders = reference()
    torch.manual_seed(seed)
    ref = loaders.get_mimi(None, REF_CONFIG, device="cpu", num_codebooks=8)
    g = torch.Generator().manual_seed(seed)
    for m in ref.quantizer.modules():  # fresh codebooks are zeros: every code would be 0
        if hasattr(m, "embedding_sum"):
            m.embedding_sum.copy_(torch.randn(m.embedding_sum.shape, generator=g))
            m.cluster_usage.copy_(torch.rand(m.cluster_usage.shape, generator=g) + 0.5)
            m._initialized.fill_(1)
            m.register_buffer("_embedding", None, persistent=False)  # drop its cached codebook
    for p in ref.parameters():  # LayerScale starts at 0.01: make the transformers matter
        if p.dim() == 1 and torch.allclose(p, torch.full_like(p, 0.01)):
            p.data.uniform_(0.5, 1.5)
    return ref.eval()


def save_safetensors(sd, path):
    st = require("safetensors.torch", "safetensors")
    st.save_file({k: v.contiguous() for k, v in sd.items()}, path)


@pytest.mark.parametrize("layout", ["state_dict", "file"])
def test_official_parity(layout, tmp_path):
    """Random weights through the official key map: identical codes, audio and latents within 1e-5. `file` uses
    the released file's fused names (self_attn.in_proj_weight), which the reference loads through a hook."""
    ref = reference_mimi()
    sd = ref.state_dict()
    if layout == "file":
        sd = {k.replace("self_attn.in_projs.0.weight", "self_attn.in_proj_weight")
               .replace("self_attn.out_projs.0.weight", "self_attn.out_proj.weight"): v for k, v in sd.items()}
    path = str(tmp_path / "tokenizer-test.safetensors")
    save_safetensors(sd, path)
    cfg = make_cfg("small", init_from=path, device="cpu")
    ours = M.load_for_inference(cfg, common.setup(cfg, log_to_file=False))
    assert (cfg.n_filters, cfg.dimension, cfg.n_q, cfg.codebook_size, cfg.tr_layers, cfg.tr_heads) == (8, 128, 8, 64, 2, 2)
    x = torch.randn(2, 1, 1920 * 6 + 700) * 0.2
    with torch.no_grad():
        for n_q in (1, 8):
            ref.set_num_codebooks(n_q)
            codes = ref.encode(x)
            assert torch.equal(codes, ours.encode(x, n_q))
            y_ref, y = ref.decode(codes), ours.decode(codes)
            assert (y - y_ref).abs().max() < 1e-5 * max(1.0, y_ref.abs().max())
        lat_ref = ref._encode_to_unquantized_latent(x)
        assert (ours.latent(x) - lat_ref).abs().max() < 1e-5 * lat_ref.abs().max().clamp(min=1)
        assert codes.float().std() > 0  # codes actually vary


def test_official_parameter_count():
    """The official Mimi: 79.3 M parameters (79,308,609; codebooks are buffers), 318 tensors, 32 codebooks."""
    G = M.Mimi(make_cfg("mimi"))
    assert common.count_params(G) == 79_308_609
    assert len(G.state_dict()) == 318
    assert len(G.quantizer.acoustic.codebooks) == 31 and len(G.quantizer.semantic.codebooks) == 1


def test_frame_rate_and_bitrate():
    cfg = make_cfg("mimi")
    G = M.Mimi(cfg)
    assert G.frame_size == 1920 and int(np.prod(cfg.ratios)) == 960  # 24 kHz / 960 = 25 Hz, then stride 2
    assert G.kbps(8) == pytest.approx(1.1) and G.bits == 11        # 12.5 Hz x 8 x 11 bits
    assert G.kbps(32) == pytest.approx(4.4)
    tiny, cfg = tiny_mimi()
    x = torch.randn(1, 1, 1920 * 3 + 5)
    assert tiny.encode(x, 3).shape == (1, 3, 4)  # whole frames, the last one padded
    assert tiny.decode(tiny.encode(x, 3)).shape == (1, 1, 4 * 1920)

# ----------------------------------------------------------------------------- causality, RoPE, streaming

def test_causality():
    """Changing the audio from sample t on leaves every earlier latent frame and decoded sample unchanged."""
    G, cfg = tiny_mimi()
    G.encoder_transformer.layers[0].layer_scale_1.data.fill_(1.0)  # let attention matter
    x = torch.randn(1, 1, 1920 * 6)
    x2 = x.clone()
    x2[..., 1920 * 3:] += torch.randn(1920 * 3)
    with torch.no_grad():
        z, z2 = G.latent(x), G.latent(x2)
        assert torch.allclose(z[..., :3], z2[..., :3], atol=1e-6) and not torch.allclose(z[..., 3:], z2[..., 3:])
        q = torch.randn(1, cfg.dimension, 6)
        q2 = q.clone()
        q2[..., 4:] += 1
        y, y2 = G.decode_latent(q), G.decode_latent(q2)
        assert torch.allclose(y[..., :4 * 1920], y2[..., :4 * 1920], atol=1e-6)
        assert not torch.allclose(y[..., 4 * 1920:], y2[..., 4 * 1920:])


def test_transformer_mask_is_causal_with_its_context():
    """One layer with context c: output t depends on inputs t-c+1..t and on nothing else."""
    cfg = make_cfg(tr_context=3, layer_scale=1.0)
    torch.manual_seed(0)
    layer = M.TransformerLayer(cfg)
    x = torch.randn(1, 8, cfg.dimension)
    t = 5
    base = layer(x)[0][0, t]
    for s in range(8):
        x2 = x.clone()
        x2[0, s] += torch.randn(cfg.dimension)  # (a constant shift would vanish in the LayerNorm)
        moved = not torch.allclose(layer(x2)[0][0, t], base, atol=1e-6)
        assert moved == (t - 3 < s <= t), f"output {t} {'depends' if moved else 'does not depend'} on input {s}"


def test_rope_rotates_interleaved_pairs():
    """Channels (2i, 2i+1) form the complex number x_2i + j x_2i+1, turned by pos * 10000^(-2i/d)."""
    x = torch.randn(1, 2, 5, 8)
    pos = torch.arange(3, 8).float()
    out = M.apply_rope(x, pos, 10000.0)
    c = torch.complex(x[..., 0::2], x[..., 1::2])
    theta = pos[:, None] * 10000.0 ** (-torch.arange(4).float() * 2 / 8)
    want = c * torch.polar(torch.ones_like(theta), theta)
    assert torch.allclose(out[..., 0::2], want.real, atol=1e-5) and torch.allclose(out[..., 1::2], want.imag, atol=1e-5)
    q, k = M.apply_rope(x, pos, 1e4), M.apply_rope(x, pos + 7, 1e4)  # relative: scores depend on offsets only
    assert torch.allclose((q * q).sum(-1), (k * k).sum(-1), atol=1e-4)


def test_streaming_equals_offline():
    """One 80 ms frame at a time, through every conv history and KV cache (context shorter than the clip, so the
    cache is trimmed): the same codes and the same audio as the offline pass."""
    G, cfg = tiny_mimi(tr_context=3)
    for layer in list(G.encoder_transformer.layers) + list(G.decoder_transformer.layers):
        layer.layer_scale_1.data.fill_(1.0)
    x = torch.randn(2, 1, 1920 * 9) * 0.3
    codes = G.encode(x, 4)
    y = G.decode(codes)
    es, ds, cs, ys = {}, {}, [], []
    for o in range(0, x.shape[-1], 1920):
        c = G.encode_stream(x[..., o:o + 1920], es, 4)
        cs.append(c)
        ys.append(G.decode_stream(c, ds))
    assert torch.equal(torch.cat(cs, -1), codes)
    assert torch.allclose(torch.cat(ys, -1), y, atol=1e-5)
    es2, c2 = {}, []  # chunks of 3 frames give the same codes too
    for o in range(0, x.shape[-1], 3 * 1920):
        c2.append(G.encode_stream(x[..., o:o + 3 * 1920], es2, 4))
    assert torch.equal(torch.cat(c2, -1), codes)

# ----------------------------------------------------------------------------- split RVQ

def test_split_rvq_quantizes_the_same_latent_and_sums():
    G, cfg = tiny_mimi()
    q = G.quantizer
    z = torch.randn(2, cfg.dimension, 7)
    codes = q.encode(z, 4)
    assert codes.shape == (2, 4, 7)
    assert torch.equal(codes[:, :1], q.semantic.encode(z, 1))
    assert torch.equal(codes[:, 1:], q.acoustic.encode(z, 3))  # the acoustic RVQ sees z, not z minus the semantic part
    assert torch.allclose(q.decode(codes), q.semantic.decode(codes[:, :1]) + q.acoustic.decode(codes[:, 1:]), atol=1e-6)
    # the training forward: same codes (no EMA motion), output = sum of the two decoded parts
    for cb in q.modules():
        if isinstance(cb, M.Codebook):
            cb.decay, cb.dead_ratio = 1.0, 0.0
    q.train()
    out, c, commit, sem = q(z, 4, torch.ones(2, dtype=torch.bool))
    assert torch.equal(c, codes)
    assert torch.allclose(out, q.decode(codes), atol=1e-5) and torch.allclose(sem, q.semantic.decode(codes[:, :1]), atol=1e-5)
    assert commit > 0


def test_quantization_only_on_the_kept_sequences():
    """§3.3: a sequence not drawn for quantization passes through the projections unquantized; gradients flow
    straight through the quantized ones."""
    G, cfg = tiny_mimi()
    rvq = G.quantizer.acoustic.train()
    for cb in rvq.codebooks:
        cb.decay, cb.dead_ratio = 1.0, 0.0
    z = torch.randn(2, cfg.dimension, 5, requires_grad=True)
    out, codes, _ = rvq(z, 3, torch.tensor([True, False]))
    plain = rvq.output_proj(rvq.input_proj(z))
    assert torch.allclose(out[1], plain[1], atol=1e-6) and not torch.allclose(out[0], plain[0], atol=1e-3)
    assert torch.allclose(out[0], rvq.decode(codes)[0], atol=1e-5)
    out.sum().backward()
    assert z.grad is not None and z.grad[0].abs().sum() > 0  # straight-through


def test_codebook_ema_and_dead_codes():
    cfg = make_cfg()
    cb = M.Codebook(cfg).train()
    K, d = cfg.codebook_size, cfg.q_dim
    emb = torch.randn(K, d) * 5
    cb.embedding_sum.copy_(emb)
    cb.cluster_usage.fill_(1.0)
    cb.initialized.fill_(1)
    cb.cluster_usage[3] = 0.01  # below 0.1 x the uniform share: re-seeded from the batch
    x = emb[[0, 0, 1]] + 0.01
    share = cb.cluster_usage.sum() / K
    before_sum = cb.embedding_sum.clone()
    q, codes = cb(x)
    assert codes.tolist() == [0, 0, 1]
    counts = torch.zeros(K)
    counts[0], counts[1] = 2, 1
    usage = torch.where(torch.arange(K) == 3, share, torch.ones(K)) * 0.99 + 0.01 * counts
    assert torch.allclose(cb.cluster_usage, usage, atol=1e-6)
    sums = torch.zeros(K, d)
    sums[0], sums[1] = x[0] + x[1], x[2]
    new3 = cb.embedding_sum[3] / 0.99  # row 3 was replaced by share * a batch vector, then decayed
    assert any(torch.allclose(new3, share * v, atol=1e-4) for v in x)
    rows = torch.arange(K) != 3
    assert torch.allclose(cb.embedding_sum[rows], (before_sum * 0.99 + 0.01 * sums)[rows], atol=1e-5)


def test_kmeans_init_on_first_batch():
    cfg = make_cfg(codebook_size=4, kmeans_iters=10)
    cb = M.Codebook(cfg).train()
    centers = torch.randn(4, cfg.q_dim) * 10
    x = centers.repeat_interleave(25, 0) + 0.01 * torch.randn(100, cfg.q_dim)
    torch.manual_seed(1)
    cb(x)
    assert cb.initialized.item() == 1
    d = torch.cdist(centers, cb.embedding).min(1).values
    assert d.max() < 0.5 or cb.cluster_usage.min() > 0  # every cluster found (or re-seeded)


def test_distillation_loss():
    a = torch.randn(2, 6, 5)
    assert M.distill_loss(a, 3 * a).item() == pytest.approx(0.0, abs=1e-6)
    assert M.distill_loss(a, -a).item() == pytest.approx(2.0, abs=1e-6)
    b = torch.zeros(1, 2, 1)
    b[0, 0] = 1
    c = torch.zeros(1, 2, 1)
    c[0, 1] = 1
    assert M.distill_loss(b, c).item() == pytest.approx(1.0)


def test_teacher_features_align_with_the_crops(tmp_path):
    """WavLM features (50 Hz) are cut at the crop's start and averaged 4 to 1 onto Mimi's 12.5 Hz frames."""
    cfg = make_cfg(teacher=str(tmp_path))
    utts = M.speech(cfg, "train")
    for u in utts:  # feature value = the 50 Hz frame index, in every channel
        n = int(u.duration * 50) + 1
        np.save(tmp_path / f"{u.id}.npy", np.repeat(np.arange(n, dtype=np.float32)[:, None], 3, 1))
    assert M.teacher_dim(cfg) == 3
    teacher = M.load_teacher(cfg, utts)
    sampler = M.FrameSampler([u._audio for u in utts], cfg.segment, cfg.batch_size, 0, align=1920)
    rt = common.setup(cfg, log_to_file=False)
    x, t = M.get_batch(sampler, cfg, rt, teacher)
    assert t.shape == (cfg.batch_size, 3, cfg.segment // 1920)
    for b, s in enumerate(sampler.last[1]):
        first = s // 480  # 50 Hz frame of the crop's first sample
        want = torch.tensor([first + 4 * k + 1.5 for k in range(t.shape[-1])])
        n = len(teacher[sampler.last[0][b]])
        want = torch.where(torch.arange(t.shape[-1]) * 4 + first + 3 < n, want, t[b, 0])  # zero-padded tail
        assert torch.allclose(t[b, 0], want), (s, t[b, 0], want)
        assert torch.equal(x[b, 0], torch.from_numpy(utts[sampler.last[0][b]].wav[s:s + cfg.segment].copy()).float()
                           if len(utts[sampler.last[0][b]].wav) >= s + cfg.segment else x[b, 0])


def test_standin_teacher_frames():
    cfg = make_cfg()
    x = torch.randn(2, 1, 1920 * 4)
    t = M.standin_teacher(x, cfg)
    assert t.shape == (2, 80, 4)

# ----------------------------------------------------------------------------- training

def test_golden_train_step():
    """One real train_step against an independent transcription of the objective: hinge D loss and update, then
    G on 1*adv + 3*feature matching + 1*commitment + 1*cosine distillation + 0.1*L1 + 1*multi-scale mel."""
    cfg = make_cfg(q_dropout=False)
    rt = common.setup(cfg, log_to_file=False)
    torch.manual_seed(0)
    state = M.build(cfg, rt)
    # SGD instead of the file's AdamW: Adam's first step is sign(grad), which turns float noise on near-zero
    # gradients into full-size differences; SGD keeps the comparison about the objective
    state["opt_g"] = torch.optim.SGD(list(state["G"].parameters()) + list(state["P"].parameters()), lr=0.5)
    state["opt_d"] = torch.optim.SGD(state["D"].parameters(), lr=0.5)
    random_codebooks(state["G"])  # (k-means on this very batch would quantize it exactly: a no-op quantizer)
    G0, D0, P0 = (copy.deepcopy(state[k]) for k in ("G", "D", "P"))
    torch.manual_seed(1)
    x = torch.randn(2, 1, cfg.segment) * 0.3
    target = torch.randn(2, 80, cfg.segment // 1920)
    torch.manual_seed(5)
    out = M.train_step(state, (x, target), cfg, rt)
    # the transcription
    torch.manual_seed(5)
    keep = torch.rand(2) < 0.5
    x_hat, _, commit, sem = G0(x, cfg.n_q, keep)
    opt_d = torch.optim.SGD(D0.parameters(), lr=0.5)
    lr_, _ = D0(x)
    lf_, _ = D0(x_hat.detach())
    loss_d = sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(lr_, lf_)) / len(lr_)
    opt_d.zero_grad()
    loss_d.backward()
    opt_d.step()
    lf, fm_f = D0(x_hat)
    _, fm_r = D0(x)
    adv = sum(F.relu(1 - f).mean() for f in lf) / len(lf)
    pairs = [(r.detach(), f) for a, b in zip(fm_r, fm_f) for r, f in zip(a, b)]
    feat = sum((r - f).abs().mean() / r.abs().mean() for r, f in pairs) / len(pairs)
    p = P0(sem)
    distill = (1 - (p * target).sum(1) / (p.norm(dim=1) * target.norm(dim=1))).mean()
    l_t = (x_hat - x).abs().mean()
    l_f = 0
    for i in cfg.mel_scales:
        kw = dict(sr=24000, n_fft=2 ** i, hop=2 ** i // 4, n_mels=64, log=None)
        a, b = common.mel_spectrogram(x, **kw), common.mel_spectrogram(x_hat, **kw)
        l_f = l_f + (a - b).abs().mean() + ((a - b) ** 2).mean()
    l_f = l_f / len(cfg.mel_scales)
    total = adv + 3 * feat + commit + distill + 0.1 * l_t + l_f
    opt_g = torch.optim.SGD(list(G0.parameters()) + list(P0.parameters()), lr=0.5)
    opt_g.zero_grad()
    total.backward()
    opt_g.step()
    for k, v in dict(d=loss_d, adv=adv, feat=feat, commit=commit, distill=distill, t=l_t, f=l_f).items():
        assert float(out[k]) == pytest.approx(float(v.detach()), rel=1e-5, abs=1e-7), k
    for name, a, b in (("G", state["G"], G0), ("D", state["D"], D0), ("P", state["P"], P0)):
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.allclose(v, w, rtol=1e-4, atol=1e-6), f"{name}.{k} differs after the step"
    assert any(not torch.equal(v, w) for v, w in zip(state["G"].state_dict().values(), M.Mimi(cfg).state_dict().values()))


def test_adversarial_only_is_the_default_and_recon_is_a_flag():
    """The paper's finding: the released Mimi trains without reconstruction losses; --recon_loss adds them."""
    assert M.Config().recon_loss is False
    cfg = make_cfg(recon_loss=False)
    rt = common.setup(cfg, log_to_file=False)
    state = M.build(cfg, rt)
    x = torch.randn(2, 1, cfg.segment) * 0.3
    out = M.train_step(state, (x, M.standin_teacher(x, cfg)), cfg, rt)
    assert "t" not in out and "f" not in out and {"adv", "feat", "commit", "distill", "d"} <= set(out)


def test_tiny_codec_learns():
    """A few steps on one batch lower the reconstruction and the distillation losses (recon on, D weight 0)."""
    cfg = make_cfg(lambda_adv=0.0, lambda_feat=0.0, lr=3e-3, quant_rate=0.0)
    rt = common.setup(cfg, log_to_file=False)
    torch.manual_seed(0)
    state = M.build(cfg, rt)
    t = torch.arange(cfg.segment) / 24000
    x = (0.5 * torch.sin(2 * math.pi * 220 * t) * torch.sin(2 * math.pi * 3 * t))[None, None].repeat(2, 1, 1)
    batch = (x, M.standin_teacher(x, cfg))
    first = M.train_step(state, batch, cfg, rt)
    for _ in range(25):
        last = M.train_step(state, batch, cfg, rt)
    assert last["f"] < 0.7 * first["f"] and last["distill"] < first["distill"]

# ----------------------------------------------------------------------------- command line

def test_cli_contract(tmp_path):
    out = check_cli_contract("moshi.py", tmp_path, bench_keys=("encode_rtf_eager", "decode_rtf_eager",
                                                               "stream_frame_ms", "train_audio_s_per_s"))
    assert "STAND-IN" in out["train"]
    assert "eval val |" in out["train"] and "probe_acc" in out["eval"] and "eval test |" in out["eval"]
    assert "streaming vs offline max diff" in out["sample"]
    diff = float(out["sample"].split("streaming vs offline max diff ")[1].split()[0])
    assert diff < 1e-4


def test_cli_sample_from_the_official_file(tmp_path):
    ref = reference_mimi()
    path = str(tmp_path / "tokenizer-test.safetensors")
    save_safetensors(ref.state_dict(), path)
    p = run_script("moshi.py", "--mode=sample", f"--init_from={path}", f"--out_dir={tmp_path}", "--device=cpu")
    assert "official Mimi weights" in p.stdout and any(f.endswith(".wav") for f in os.listdir(tmp_path / "samples"))


def error_line(*args):
    """A command that must fail with one `error:` line on stderr and no traceback (the log may precede it)."""
    p = run_script("moshi.py", *args, check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr + p.stdout, p.stderr[-3000:]
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("flag,msg", [("--segment=1000", "multiple of 1920"), ("--stage=dialogue", "issue 18"),
                                      ("--eval_n_q=9", "eval_n_q"), ("--quant_rate=1.5", "quant_rate"),
                                      ("--tr_heads=3", "tr_heads"), ("--teacher=/nowhere", "not a folder")])
def test_bad_flags_are_refused(flag, msg):
    with pytest.raises(SystemExit) as e:
        make_cfg(**dict([flag[2:].split("=")]))
    assert str(e.value).startswith("error:") and msg in str(e.value)


def test_bad_input_gives_one_error_line(tmp_path):
    assert "does not exist" in error_line("--preset=tiny", "--mode=eval", f"--init_from={tmp_path}/none.pt")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    assert "safetensors" in error_line("--mode=sample", f"--init_from={bad}")
