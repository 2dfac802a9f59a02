"""Tests for moshi.py, part 1 (Mimi): parity with the pip `moshi` package at random weights (codes identical, audio
within 1e-5, both key layouts of the official file), the official parameter count, frame-rate and bitrate
arithmetic, causality (conv stack, transformer mask, context), RoPE's interleaved pairs, streaming == offline,
the split RVQ (same latent, outputs summed, half the sequences unquantized), EMA / dead-code updates, the
distillation loss, the teacher-feature alignment, a golden training step, and the command line.
Part 2 (the Moshi LM): the paper's delays and delay/undelay inverses; every prediction depends only on tokens before
it in generation order (temporal causality, depth order text -> semantic -> acoustic, the acoustic delay, no user
token at the same step); streaming == full forward; the generation grid == the training forward's argmax; parity
with the package's LMModel (both key layouts) and its LMGen's streaming steps; 7.69 B parameters; inner-monologue
alignment; a golden step; the stage's contract (train, exact resume, eval, bench, sample) in process.

Every loss term, target shift, sampler and schedule of moshi.py, and the test pinning it:
- codec D loss (hinge), G adversarial hinge, relative feature matching, commitment, cosine distillation, l_t,
  l_f (power mels transcribed with numpy + librosa filters, log10 MSE): test_golden_train_step;
  the cosine itself: test_distillation_loss; the weights' balance at init: test_loss_balance_at_init.
- codebook EMA and dead-code re-seeding: test_codebook_ema_and_dead_codes; the grace in the level's own updates
  under dropout: test_dead_code_grace_counts_the_levels_own_updates; k-means one level per step and the quantizer
  warm-up schedule: test_quantizer_warmup_then_kmeans_one_level_per_step; quantization on the kept sequences only,
  straight-through: test_quantization_only_on_the_kept_sequences; the decoder depends on its latent after an
  overfit: test_decoder_uses_the_latent.
- codec crops / teacher frames (sampler): test_teacher_features_align_with_the_crops, test_standin_teacher_frames.
- LM loss (text CE with PAD/EPAD 0.5, semantic x100, acoustic x1, targets in delayed time): the golden
  test_lm_loss_weights_golden_step; -1 tokens give no loss and no gradient: test_lm_loss_gives_absent_tokens_no_loss.
- LM target shift (position s predicts column s + 1; depth order; acoustic delay): test_every_prediction_depends_only_
  on_what_precedes_it, test_delays_are_the_papers_and_delay_undelay_are_inverses,
  test_generation_grid_matches_the_training_forward.
- LM sampler (top-k at a temperature, greedy at 0): test_sample_token_is_top_k_at_a_temperature; the streaming
  step's user timing (official LMGen: step s hears user frame s): test_streaming_timing_is_the_official_lmgen.
- LM schedules (warm-up + cosine lr to 10 %, the text-only stage's first text_iters steps): test_lm_schedules.
- LM early stop (patience on the val objective text + audio CE, lm_max_iters as its limit):
  test_lm_stops_at_the_best_val_of_its_objective; its data at lm_corpus_hours:
  test_the_lm_reads_its_own_corpus_hours; whole dialogues from their start: test_the_cpu_lm_trains_on_whole_dialogues.
- answer words (every turn, questions alone) and the deaf baseline: test_answer_metric_on_the_script.
- inner-monologue text stream (EPAD rule; the overflow deviation from moshi-finetune's Interleaver):
  test_inner_monologue_against_the_official_interleaver, test_inner_monologue_puts_each_word_at_or_before_its_audio.
- Not pinned: the per-step draw of the acoustic codebook count under q_dropout (off in `small`)."""
import copy
import dataclasses
import re
import importlib
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import moshi as M
from cli import check_cli_contract, check_stft_discriminator_layout, one_line_error, require, run_script

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
    assert len([k for k in G.state_dict() if not k.endswith('.age')]) == 318  # + our 32 dead-code grace counters
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
    cb.age.fill_(cfg.dead_grace)  # past the grace after this update
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


def test_discriminator_sees_the_complex_stft_as_frames_by_frequency():
    cfg = make_cfg()
    check_stft_discriminator_layout(M.Discriminator(cfg), cfg)


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
    sampler = common.SegmentSampler([u._audio for u in utts], cfg.segment, cfg.batch_size, 0, align=1920)
    drawn, next_batch = [], sampler.next
    sampler.next = lambda: drawn.append(next_batch()) or drawn[-1]
    rt = common.setup(cfg, log_to_file=False)
    x, t = M.get_batch(sampler, cfg, rt, teacher)
    idx = drawn[0][1].tolist()
    assert t.shape == (cfg.batch_size, 3, cfg.segment // 1920)
    for b, s in enumerate(sampler.last_starts):
        first = s // 480  # 50 Hz frame of the crop's first sample
        want = torch.tensor([first + 4 * k + 1.5 for k in range(t.shape[-1])])
        n = len(teacher[idx[b]])
        want = torch.where(torch.arange(t.shape[-1]) * 4 + first + 3 < n, want, t[b, 0])  # zero-padded tail
        assert torch.allclose(t[b, 0], want), (s, t[b, 0], want)
        assert torch.equal(x[b, 0], torch.from_numpy(utts[idx[b]].wav[s:s + cfg.segment].copy()).float()
                           if len(utts[idx[b]].wav) >= s + cfg.segment else x[b, 0])


def test_standin_teacher_frames():
    cfg = make_cfg()
    x = torch.randn(2, 1, 1920 * 4)
    t = M.standin_teacher(x, cfg)
    assert t.shape == (2, 80, 4)

# ----------------------------------------------------------------------------- training

def _power_mel_by_hand(x, n_fft, sr, n_mels):
    """EnCodec's S_i written out: reflect (n - hop) / 2 a side, zeros to a whole frame, periodic-Hann frames every
    n / 4, |rfft|^2 / sum(w^2), librosa's unnormalised HTK mel filters. x (N, T) -> (N, n_mels, frames), fp64."""
    librosa = pytest.importorskip("librosa")
    hop, side = n_fft // 4, (n_fft - n_fft // 4) // 2
    y = np.pad(x.detach().double().numpy(), ((0, 0), (side, side)), mode="reflect")
    y = np.pad(y, ((0, 0), (0, -(y.shape[1] - n_fft) % hop)))
    w = np.hanning(n_fft + 1)[:-1]
    frames = np.stack([y[:, i:i + n_fft] for i in range(0, y.shape[1] - n_fft + 1, hop)], -1)
    power = np.abs(np.fft.rfft(frames * w[None, :, None], axis=1)) ** 2 / (w ** 2).sum()
    return torch.from_numpy(librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, htk=True, norm=None) @ power)


def test_golden_train_step():
    """One real train_step against an independent transcription of the objective: hinge D loss and update, then
    G on 1*adv + 3*feature matching + 1*commitment + 1*cosine distillation + 0.1*L1 + 1*l_f, l_f the mean over
    scales of L1 between power mels + MSE between their log10(1e-5 + .) (mels transcribed above)."""
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
        a = _power_mel_by_hand(x[:, 0], 2 ** i, cfg.sample_rate, cfg.n_mels).float()
        b = M.power_mel(x_hat, 2 ** i, cfg)
        by_hand = _power_mel_by_hand(x_hat[:, 0], 2 ** i, cfg.sample_rate, cfg.n_mels).float()
        assert torch.allclose(b.detach(), by_hand, rtol=1e-4, atol=1e-7), f"S_{i} differs from its transcription"
        l_f = l_f + (a - b).abs().mean() + ((1e-5 + a).log10() - (1e-5 + b).log10()).pow(2).mean()
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


def _buzz_and_hiss(T, sr):
    """Two clips a decoder cannot tell apart without its latent: a 110 Hz buzz then white noise, and the reverse
    (quiet noise under both keeps the log-mel floor off every bin)."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(T) / sr
    buzz, hiss = 0.3 * torch.sign(torch.sin(2 * math.pi * 110 * t)), 0.1 * torch.randn(T, generator=g)
    first = t < t[T // 2]
    x = torch.stack([torch.where(first, buzz, hiss), torch.where(first, hiss, buzz)])
    return (x + 0.003 * torch.randn(2, T, generator=g))[:, None]  # (2, 1, T)


def test_decoder_uses_the_latent():
    """The real train_step (quantizer warm-up, then k-means one level per step, all terms at the small preset's
    weights) overfits two clips; decoding their codes must then beat decoding an all-zero latent by more than
    MARGIN in mel distance (measured 0.59 vs 0.86). A decoder that ignores its input scores the two alike."""
    MARGIN = 0.2
    cfg = make_cfg(segment=7680, lambda_f=3.0, lr=3e-3, quantizer_warmup=25, quant_rate=1.0, codebook_size=16)
    rt = common.setup(cfg, log_to_file=False)
    torch.manual_seed(0)
    state = M.build(cfg, rt)
    x = _buzz_and_hiss(cfg.segment, cfg.sample_rate)
    batch = (x, M.standin_teacher(x, cfg))
    for _ in range(80):
        M.train_step(state, batch, cfg, rt)
    G = state["G"].eval()
    with torch.no_grad():
        codes = G.encode(x, cfg.n_q)
        real = common.mel_distance(G.decode(codes)[..., :cfg.segment], x, cfg.sample_rate)
        y0 = G.decode_latent(torch.zeros(2, cfg.dimension, codes.shape[-1]))[..., :cfg.segment]
        zero = common.mel_distance(y0, x, cfg.sample_rate)
    print(f"mel distance: codes {real:.3f}, zero latent {zero:.3f}")
    assert zero - real > MARGIN, (real, zero)


def test_quantizer_warmup_then_kmeans_one_level_per_step():
    """--quantizer_warmup steps run the RVQ bypassed (no codebook initialised, no codes); then each RVQ initialises
    one level per step (official ResidualVectorQuantization), level i on the residual of the levels above it: the
    step after the warm-up only level 1 of each quantizer, then one more each step. Level 2 is fitted to what level 1
    left (its entries are residual-sized, not the zeros an all-levels-at-once init on one batch sees)."""
    cfg = make_cfg(quantizer_warmup=2, codebook_size=8, kmeans_iters=5, q_dropout=False)
    rt = common.setup(cfg, log_to_file=False)
    torch.manual_seed(0)
    state = M.build(cfg, rt)
    x = torch.randn(2, 1, cfg.segment) * 0.3
    batch = (x, M.standin_teacher(x, cfg))
    q = state["G"].quantizer
    inits = lambda: [int(cb.initialized) for cb in [*q.acoustic.codebooks, q.semantic.codebooks[0]]]
    seen = []
    for _ in range(2 + cfg.n_q):
        M.train_step(state, batch, cfg, rt)
        seen.append(inits())
    A = cfg.n_q - 1
    want = [[0] * A + [0]] * 2 + [[1] * min(s, A) + [0] * (A - min(s, A)) + [1] for s in range(1, cfg.n_q + 1)]
    assert seen == want, seen
    lvl2 = q.acoustic.codebooks[1]
    assert lvl2.embedding.norm(dim=1).mean() > 1e-3, "level 2 initialised on an all-zero residual"


def test_dead_code_grace_counts_the_levels_own_updates():
    """A re-seeded entry is kept for the next dead_grace updates of ITS level whatever its usage, then re-seeded
    if still unused. Under quantizer dropout a level runs only in the steps that draw it: here level 3 of 3 runs
    every 3rd step, so the grace of 4 of its updates spans 12 steps (a grace counted in training steps ends at 4)."""
    cfg = make_cfg(n_q=4, codebook_size=4, ema_decay=0.5, dead_grace=4)
    rvq = M.RVQ(3, cfg).train()
    for cb in rvq.codebooks:
        cb.embedding_sum.copy_(torch.eye(4, cfg.q_dim) * 10)
        cb.cluster_usage.fill_(1.0)
        cb.initialized.fill_(1)
    rvq.input_proj.weight.data.copy_(torch.eye(cfg.q_dim, cfg.dimension)[:, :, None])
    far = torch.zeros(2, cfg.dimension, 1)
    far[:, 5] = 100.0  # a batch far from every entry: level 3's dead entry 3 is re-seeded with it
    cb = rvq.codebooks[2]
    cb.cluster_usage[3], cb.age[3] = 0.0, 99
    rvq(far, 3, torch.ones(2, dtype=torch.bool))
    seed = cb.embedding[3].clone()
    assert seed[5] > 10, "entry 3 was not re-seeded from the batch"
    near = torch.zeros(2, cfg.dimension, 1)
    near[:, 0] = 10.0  # then batches at entry 0: entry 3 is never picked again, its usage halves every update
    kept = []
    for step in range(1, 16):
        rvq(near, 3 if step % 3 == 0 else 2, torch.ones(2, dtype=torch.bool))  # level 3 drawn every 3rd step
        kept.append(torch.allclose(cb.embedding[3], seed))
    assert kept == [True] * 14 + [False], kept  # its 4 updates of grace are steps 3..12; re-seeded at step 15


def test_loss_balance_at_init():
    """moshi.py's small preset: at init, on corpus speech (0.96 s crops), its weighted terms pull the
    decoder output x_hat with gradient norms f : feat : t : adv ~ 1 : 0.1 : 0.002 : 1e-4 (the log-mel l_f leads,
    the feature term a tenth of it; the adversarial term grows once D learns). Checked within a factor ~2.5."""
    cfg = make_cfg("small", corpus_hours=0.02, batch_size=4)
    wavs = [u.wav for u in M.speech(cfg, "train") if len(u.wav) >= cfg.segment][:4]
    x = torch.from_numpy(np.stack([w[:cfg.segment] for w in wavs]))[:, None]  # (4, 1, 0.96 s)
    torch.manual_seed(0)
    G, D = M.Mimi(cfg), M.Discriminator(cfg)
    x_hat = G(x, 0, torch.zeros(4, dtype=torch.bool))[0]  # the warm-up's bypass: what the decoder starts from
    logits, fake = D(x_hat)
    with torch.no_grad():
        _, real = D(x)
    l_t, l_f = M.reconstruction_losses(x, x_hat, cfg)
    terms = dict(f=cfg.lambda_f * l_f, feat=cfg.lambda_feat * M.feature_loss(real, fake), t=cfg.lambda_t * l_t,
                 adv=cfg.lambda_adv * M.generator_adv_loss(logits))
    norm = {k: torch.autograd.grad(v, x_hat, retain_graph=True)[0].flatten(1).norm(dim=1).mean().item()
            for k, v in terms.items()}
    r = {k: v / norm["f"] for k, v in norm.items()}
    print(r)
    assert 0.04 < r["feat"] < 0.25 and 8e-4 < r["t"] < 5e-3 and r["adv"] < 1e-3, r


def test_lm_loss_gives_absent_tokens_no_loss():
    """lm_loss: a -1 target (a delay's empty slot, an absent stream) adds nothing to either term and sends no
    gradient to its logits; the others keep their weights (text PAD/EPAD 0.5, semantic 100, acoustic 1)."""
    cfg = lm_cfg()
    K, V, B, T = cfg.dep_q, cfg.lm_card, 2, 6
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, K, T, V, generator=g, requires_grad=True)
    text_logits = torch.randn(B, 1, T, cfg.text_card, generator=g, requires_grad=True)
    codes = torch.randint(0, V, (B, 1 + 2 * K, T), generator=g)
    codes[:, 0] = torch.randint(0, cfg.text_card - 2, (B, T), generator=g)
    codes[0, 0, :2], codes[1, 1, 3:], codes[0, 2:1 + K, 4] = -1, -1, -1
    out = M.lm_loss(logits, text_logits, codes, cfg)
    (out["text"] + out["audio"]).backward()
    assert logits.grad[1, 0, 3:].abs().max() == 0 and logits.grad[0, 1:, 4].abs().max() == 0
    assert text_logits.grad[0, 0, :2].abs().max() == 0 and logits.grad[0, 0, 4].abs().max() > 0
    ce = lambda lg, y: torch.logsumexp(lg, -1) - lg[y]
    text = sum(ce(text_logits[b, 0, t], codes[b, 0, t])
               for b in range(B) for t in range(T) if codes[b, 0, t] >= 0)
    assert out["text"].item() == pytest.approx(text.item() / (2 * T - 2), rel=1e-5)
    num = den = 0.0
    for b in range(B):
        for k in range(K):
            for t in range(T):
                if codes[b, 1 + k, t] >= 0:
                    w = 100.0 if k == 0 else 1.0
                    num, den = num + w * ce(logits[b, k, t], codes[b, 1 + k, t]).item(), den + w
    assert out["audio"].item() == pytest.approx(num / den, rel=1e-5)

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


@pytest.mark.parametrize("flag,msg", [("--segment=1000", "multiple of 1920"), ("--stage=dialogue", "the stages are"),
                                      ("--eval_n_q=9", "eval_n_q"), ("--quant_rate=1.5", "quant_rate"),
                                      ("--tr_heads=3", "tr_heads"), ("--teacher=/nowhere", "not a folder")])
def test_bad_flags_are_refused(flag, msg):
    with pytest.raises(SystemExit) as e:
        make_cfg(**dict([flag[2:].split("=")]))
    assert str(e.value).startswith("error:") and msg in str(e.value)


def test_bad_input_gives_one_error_line(tmp_path):
    """In process (one_line_error: the SystemExit line Python prints alone, no traceback)."""
    run = lambda fn, *args: fn(common.parse_config(M.Config, M.PRESETS, list(args)))
    one_line_error(run, M.evaluate, "--preset=tiny", "--mode=eval", f"--init_from={tmp_path}/none.pt",
                   match="does not exist")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    one_line_error(run, M.sample, "--preset=tiny", "--mode=sample", f"--init_from={bad}", match="safetensors")

# ============================================================================= part 2: the Moshi LM

def lm_cfg(**kw):
    return make_cfg(stage="lm", **kw)


def tiny_lm(seed=0, **kw):
    cfg = lm_cfg(**kw)
    torch.manual_seed(seed)
    return M.MoshiLM(cfg).eval(), cfg


def random_codes(cfg, B=2, T=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randint(0, cfg.text_card, (B, 1, T), generator=g),
                      torch.randint(0, cfg.lm_card, (B, 2 * cfg.dep_q, T), generator=g)], 1)


def test_delays_are_the_papers_and_delay_undelay_are_inverses():
    assert M.lm_delays(M.Config()) == [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]  # the official moshi_7b
    lm, cfg = tiny_lm()
    codes = random_codes(cfg, T=7)
    d = M.delay(codes, lm.delays, lm.initial())
    for k, dk in enumerate(lm.delays):
        assert torch.equal(d[:, k, dk:], codes[:, k, :codes.shape[-1] - dk])
        assert (d[:, k, :dk] == lm.initial()[k]).all()
    back, mask = M.undelay(d[..., None].float(), lm.delays)
    assert torch.equal(back[..., 0][mask].long(), codes[mask])
    assert mask.sum() == sum(codes.shape[-1] - dk for dk in lm.delays) * codes.shape[0]
    assert torch.isnan(back[..., 0][~mask]).all()


def allowed(lm, k, t, k2, t2):
    """May the prediction of stream k2 (Moshi's text or audio) at frame t2 depend on the token of stream k at frame
    t? Generation order: step s = frame + delay; within a step the text token, then Moshi's audio 0..K-1. The user's
    tokens of step s are seen from step s + 1 on; Moshi's from later in step s."""
    K = lm.K
    s, s2 = t + lm.delays[k], t2 + lm.delays[k2]
    if k > K:  # the user: an input only
        return s < s2
    return s < s2 or (s == s2 and k < k2)


def test_every_prediction_depends_only_on_what_precedes_it():
    """Temporal causality across every stream, the depth Transformer's order (text, then semantic, then acoustic)
    and its causality, the acoustic delay, and no user token leaking into Moshi's prediction at the same step:
    perturb each token alone; only the predictions after it in generation order may move (and some must)."""
    lm, cfg = tiny_lm()
    T, K = 6, cfg.dep_q
    codes = random_codes(cfg, B=1, T=T)
    with torch.no_grad():
        lg, mask, tl, _ = lm(codes)
    seen_dependence = set()
    for k in range(1 + 2 * K):
        for t in range(T):
            c = codes.clone()
            c[0, k, t] = (c[0, k, t] + 1) % (cfg.text_card if k == 0 else cfg.lm_card)
            with torch.no_grad():
                lg2, _, tl2, _ = lm(c)
            for k2 in range(1 + K):
                for t2 in range(T):
                    if k2 and not mask[0, k2 - 1, t2]:
                        continue
                    a, b = (tl[0, 0, t2], tl2[0, 0, t2]) if k2 == 0 else (lg[0, k2 - 1, t2], lg2[0, k2 - 1, t2])
                    moved = not torch.allclose(a, b, atol=1e-6)
                    assert not moved or allowed(lm, k, t, k2, t2), \
                        f"prediction of stream {k2} frame {t2} moved with stream {k} frame {t}"
                    if moved:
                        seen_dependence.add((k > K, k2, (t + lm.delays[k]) - (t2 + lm.delays[k2])))
    # the depth Transformer uses the same step's earlier tokens: text -> semantic, semantic -> acoustic, and the
    # user's previous step reaches Moshi's semantic token
    assert (False, 1, 0) in seen_dependence and (False, 2, 0) in seen_dependence and (True, 1, -1) in seen_dependence


def test_streaming_steps_equal_the_full_forward():
    """The temporal Transformer one step at a time on its KV cache, and the depth Transformer one codebook at a time
    on its per-step cache, give the full-sequence logits."""
    lm, cfg = tiny_lm()
    T, K = 9, cfg.dep_q
    codes = random_codes(cfg, B=2, T=T)
    init = torch.tensor(lm.initial())
    seq = torch.cat([init.view(1, -1, 1).expand(2, -1, 1), M.delay(codes, lm.delays, lm.initial())], 2)
    with torch.no_grad():
        z, tl, _ = lm.temporal(seq[:, :, :-1])
        full = lm.depth(z, seq[:, :K, 1:])  # (B, K, T, card)
        cache = None
        for s in range(T):
            zs, tls, cache = lm.temporal(seq[:, :, s:s + 1], cache, s)
            assert torch.allclose(zs[:, 0], z[:, s], atol=1e-5) and torch.allclose(tls[:, 0], tl[:, s], atol=1e-5)
            dc = None
            for k in range(K):
                y, dc = lm.depformer(lm.depth_input(k, zs, seq[:, k, s + 1][:, None]), dc, k)
                assert torch.allclose(lm.linears[k](y[:, -1]), full[:, k, s], atol=1e-5)


def test_generation_grid_matches_the_training_forward():
    """Greedy full-duplex steps (lm_step: user codes written into the delayed grid, initial tokens, sampling, the
    depth loop) produce exactly the tokens the training forward's argmax predicts from the same conversation; in
    that conversation the user's frames are those fed from step 1 on (official timing: frame 0 is not heard)."""
    lm, cfg = tiny_lm()
    cfg.temp = cfg.temp_text = 0.0
    n, K = 10, cfg.dep_q
    user = torch.randint(0, cfg.lm_card, (1, K, n), generator=torch.Generator().manual_seed(3))
    st = M.LMState(lm, 1, n, "cpu")
    for s in range(n):
        M.lm_step(lm, st, user[:, :, s], cfg, None)
    T = n - max(lm.delays)
    codes = torch.stack([st.seq[:, k, 1 + d:1 + d + T] for k, d in enumerate(lm.delays)], 1)  # undelayed
    assert torch.equal(codes[:, 1 + K:], user[:, :, 1:T + 1])
    for f in range(T):  # the frame handed to Mimi's decoder once its acoustic tokens exist
        assert torch.equal(st.moshi_frame(f, K)[:, :, 0], codes[:, 1:1 + K, f])
    with torch.no_grad():
        lg, mask, tl, _ = lm(codes)
    assert torch.equal(tl[:, 0].argmax(-1), codes[:, 0])
    assert torch.equal(lg.argmax(-1)[mask], codes[:, 1:1 + K][mask]) and mask.sum() > 0


def reference_lm(cfg, seed=0):
    loaders = reference()
    kw = dict(dim=cfg.lm_dim, text_card=cfg.text_card, existing_text_padding_id=cfg.text_card - 2, n_q=2 * cfg.dep_q,
              dep_q=cfg.dep_q, card=cfg.lm_card, num_heads=cfg.lm_heads, num_layers=cfg.lm_layers,
              hidden_scale=cfg.lm_hidden_scale, causal=True, layer_scale=None, context=cfg.lm_context, max_period=10000,
              gating="silu", norm="rms_norm_f32", positional_embedding="rope", depformer_dim=cfg.dep_dim,
              depformer_dim_feedforward=cfg.dep_ffn, depformer_num_heads=cfg.dep_heads,
              depformer_num_layers=cfg.dep_layers, depformer_layer_scale=None, depformer_multi_linear=True,
              depformer_context=8, depformer_max_period=10000, depformer_gating="silu", depformer_pos_emb="none",
              depformer_weights_per_step=True, delays=M.lm_delays(cfg))
    torch.manual_seed(seed)
    return loaders.get_moshi_lm(None, lm_kwargs=kw, device="cpu", dtype=torch.float32).eval()


@pytest.mark.parametrize("layout", ["split", "file"])
def test_official_lm_parity(layout):
    """The moshi package's LMModel with random weights at tiny dimensions, its state dict (the current split
    `in_projs.{i}` or the released file's stacked `in_proj_weight`) mapped into ours: the same logits and masks."""
    cfg = lm_cfg(lm_dim=64, lm_heads=2, dep_dim=32, dep_heads=2, dep_ffn=132)
    ref = reference_lm(cfg)
    sd = ref.state_dict()
    if layout == "file":  # as the released model.safetensors: per-step projections stacked on dim 0
        out = {}
        for k, v in sd.items():
            m = re.match(r"(.*\.self_attn)\.(in|out)_projs\.(\d+)\.weight$", k)
            if m:
                name = f"{m.group(1)}.in_proj_weight" if m.group(2) == "in" else f"{m.group(1)}.out_proj.weight"
                out[name] = torch.cat([out.get(name, torch.empty(0, v.shape[1])), v])
            else:
                out[k] = v
        sd = out
    ours = M.MoshiLM(cfg).eval()
    ours.load_state_dict(M.official_lm_state_dict(sd))
    codes = random_codes(cfg, B=2, T=12)
    with torch.no_grad():
        o, a = ref(codes), ours(codes)
    assert torch.equal(o.mask, a[1]) and torch.equal(o.text_mask, a[3])
    rel = lambda x, y: float((x - y).abs().max() / y.abs().max())
    assert rel(a[0][a[1]], o.logits[o.mask]) < 1e-4 and rel(a[2], o.text_logits) < 1e-4


def test_streaming_timing_is_the_official_lmgen():
    """lm_step against the moshi package's LMGen (greedy, same random weights, same user codes fed one frame per
    step): the same text token and the same K audio tokens at every step. This pins the user timing: step s hears
    user frame s (official), not s - 1 (a frame written one column later shifts every later token)."""
    cfg = lm_cfg(lm_dim=64, lm_heads=2, dep_dim=32, dep_heads=2, dep_ffn=132)
    cfg.temp = cfg.temp_text = 0.0
    ref = reference_lm(cfg)
    lm_mod = sys.modules[type(ref).__module__]
    ours = M.MoshiLM(cfg).eval()
    ours.load_state_dict(M.official_lm_state_dict(ref.state_dict()))
    n, K = 12, cfg.dep_q
    user = torch.randint(0, cfg.lm_card, (1, K, n), generator=torch.Generator().manual_seed(3))
    got_t, got_a = [], []
    gen = lm_mod.LMGen(ref, use_sampling=False, check=True, on_text_hook=lambda t: got_t.append(t.clone()),
                       on_audio_hook=lambda a: got_a.append(a.clone()))
    st = M.LMState(ours, 1, n, "cpu")
    with torch.no_grad(), gen.streaming(1):
        for s in range(n):
            gen.step(user[:, :, s:s + 1])
            t, a = M.lm_step(ours, st, user[:, :, s], cfg, None)
            assert torch.equal(t, got_t[-1].view(-1)) and torch.equal(a, got_a[-1].view(1, K)), s


def test_moshi_7b_parameter_count():
    cfg = make_cfg("moshi-7b")
    with torch.device("meta"):
        lm = M.MoshiLM(cfg)
    n = sum(p.numel() for p in lm.parameters())
    assert n == 7_687_729_152  # 7.69 B (speech_lms.md §3.2)
    temporal = sum(p.numel() for k, p in lm.named_parameters() if k.startswith("transformer."))
    assert round(temporal / 1e9, 2) == 6.58
    try:
        loaders = reference()
    except pytest.skip.Exception:
        return
    kw = dict(loaders._lm_kwargs)
    with torch.device("meta"):
        ref = loaders.LMModel(device="meta", dtype=torch.bfloat16, **kw)
    assert sum(p.numel() for p in ref.parameters()) == n


def tiny_tokenizer(cfg):
    return M.TextTokenizer(cfg, ["what is three plus four", "three plus four is seven", "the sky is blue"] * 3)


def test_inner_monologue_puts_each_word_at_or_before_its_audio():
    cfg = lm_cfg()
    tok = tiny_tokenizer(cfg)
    # crowded on purpose: "seven" starts one frame after "is", so "is" must move earlier, not "seven" later
    words = [("three", 0.30, 0.6), ("plus", 0.62, 0.9), ("four", 0.95, 1.2), ("is", 1.30, 1.35), ("seven", 1.37, 1.8)]
    n = 30
    s = M.text_stream(words, n, tok, 12.5)
    pos = 0
    for w, start, _ in words:
        ids = tok.word(w)
        first = next(i for i in range(pos, n) if s[i] == ids[0] and list(s[i:i + len(ids)]) == ids)
        assert first <= int(start * 12.5), f"{w!r} at frame {first}, after its audio (frame {int(start * 12.5)})"
        assert first == 0 or s[first - 1] == tok.epad, f"no EPAD before {w!r}"
        pos = first + len(ids)
    assert first == int(1.37 * 12.5)  # an uncrowded word sits exactly on its start frame
    assert set(s[pos:]) == {tok.pad} and (s == tok.epad).sum() == len(words)
    assert [w for w, _ in tok.words(list(s), range(n))] == [w for w, *_ in words]


def _interleaver_by_hand(words, n, tok, fr):
    """moshi-finetune's Interleaver.build_token_stream (keep_main_only, no keep_and_shift, no delay), written out:
    sweep the frames; every word whose start frame has come replaces the tokens still pending; a pending token
    is emitted at each frame, turning a PAD just before it into EPAD; other frames are PAD."""
    out, pending, i = [tok.pad] * n, [], 0
    for t in range(n):
        while i < len(words) and words[i][1] * fr < t + 1:
            pending, i = list(tok.word(words[i][0])), i + 1
        if pending:
            if t > 0 and out[t - 1] == tok.pad:
                out[t - 1] = tok.epad
            out[t] = pending.pop(0)
    return out


def test_inner_monologue_against_the_official_interleaver():
    """Ours vs moshi-finetune's Interleaver (transcribed above). Uncrowded words: the same stream, token for token
    (each word from its start frame, EPAD on the frame before). Crowded words, the documented deviation (ours):
    the official rule cuts the earlier word short when the next one starts; ours moves it earlier so that every
    word stays whole, its text at or before its audio."""
    cfg = lm_cfg()
    tok = tiny_tokenizer(cfg)
    calm = [("three", 0.30, 0.6), ("plus", 0.9, 1.2), ("four", 1.5, 1.8), ("is", 2.2, 2.4), ("seven", 2.8, 3.2)]
    assert list(M.text_stream(calm, 45, tok, 12.5)) == _interleaver_by_hand(calm, 45, tok, 12.5)
    crowded = [("zebra", 1.0, 1.05), ("seven", 1.08, 1.5)]  # "zebra", unseen by the BPE: one token a byte
    assert len(tok.word("zebra")) > 1, "the case needs a multi-token word"
    official, ours = _interleaver_by_hand(crowded, 30, tok, 12.5), list(M.text_stream(crowded, 30, tok, 12.5))
    assert [w for w, _ in tok.words(official, range(30))] != ["zebra", "seven"]  # "zebra" cut short
    assert [w for w, _ in tok.words(ours, range(30))] == ["zebra", "seven"]
    assert ours.index(tok.word("seven")[0]) == official.index(tok.word("seven")[0]) == int(1.08 * 12.5)


def test_inner_monologue_on_the_corpus():
    """On a built-in dialogue: Moshi's (channel 1) words, in order, each at or before its start frame."""
    cfg = lm_cfg()
    u = M.dialogues(cfg, "train")[0]
    tok = tiny_tokenizer(cfg)
    n = int(u.duration * 12.5)
    s = M.text_stream(u.words[1], n, tok, 12.5)
    said = tok.words(list(s), range(n))
    assert [w for w, _ in said] == [w[0] for w in u.words[1]]
    assert all(t <= int(w[1] * 12.5) for (_, t), w in zip(said, u.words[1]))
    assert M.dialogue_turns(u) is not None


def test_lm_loss_weights_golden_step():
    """One real lm_train_step (SGD in place of AdamW) against a literal transcription of §3.4.3's objective:
    L = sum_t w_t CE_text / sum w_t + sum_{k,t} a_k CE_k / sum a_k, w = 0.5 on PAD/EPAD, a = (100, 1, ..., 1)."""
    cfg = lm_cfg()
    rt = common.setup(cfg, log_to_file=False)
    torch.manual_seed(0)
    model = M.MoshiLM(cfg)
    state = dict(model=model, opt=torch.optim.SGD(model.parameters(), lr=0.1), sched=torch.optim.lr_scheduler.LambdaLR(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), lambda s: 1.0))
    ref = copy.deepcopy(model)
    codes = random_codes(cfg, B=2, T=10)
    pad, epad = cfg.text_card - 2, cfg.text_card - 1
    codes[0, 0, :4] = pad
    codes[1, 0, 2] = epad
    codes[1, 1:, 7:] = -1  # absent tokens: no loss
    out = M.lm_train_step(state, codes, cfg, rt)
    # the transcription
    K = cfg.dep_q
    lg, mask, tl, _ = ref(codes)
    logp_t = F.log_softmax(tl[:, 0], -1)
    num = den = 0.0
    for b in range(2):
        for t in range(10):
            y = int(codes[b, 0, t])
            w = 0.5 if y in (pad, epad) else 1.0
            num, den = num - w * logp_t[b, t, y], den + w
    text = num / den
    num = den = 0.0
    for b in range(2):
        for k in range(K):
            for t in range(10):
                y = int(codes[b, 1 + k, t])
                valid = y != -1 and (k == 0 or t < 9)  # the acoustic tokens of the last frame have no prediction
                if valid:
                    a = 100.0 if k == 0 else 1.0
                    num, den = num - a * F.log_softmax(lg[b, k, t], -1)[y], den + a
    audio = num / den
    assert float(out["text"]) == pytest.approx(float(text), rel=1e-5)
    assert float(out["audio"]) == pytest.approx(float(audio), rel=1e-5)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt.zero_grad()
    (text + audio).backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    opt.step()
    for (k, v), w in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(v, w, rtol=1e-4, atol=1e-6), f"{k} differs after the step"


def test_sample_token_is_top_k_at_a_temperature():
    """§3.4.3's sampler: temperature 0 is the argmax; otherwise only the top_k logits are drawn, with frequencies
    softmax(logit / temp) renormalised over those k (here 20,000 draws against the hand-computed law)."""
    logits = torch.tensor([[2.0, 0.5, 1.0, -1.0, 1.5, 0.0]])
    assert M.sample_token(logits, 0.0, 3, None).item() == 0
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([M.sample_token(logits.expand(1000, -1), 0.5, 3, g) for _ in range(20)]).flatten()
    freq = torch.bincount(draws, minlength=6).float() / len(draws)
    top = torch.tensor([2.0, 1.5, 1.0]) / 0.5
    want = torch.zeros(6)
    want[[0, 4, 2]] = top.exp() / top.exp().sum()  # 0.665, 0.245, 0.090
    assert (freq - want).abs().max() < 0.015, (freq, want)


def test_lm_schedules():
    """The LM's lr: linear warm-up over lr_decay_iters / 20 steps, then cosine from 1 to 0.1 at lr_decay_iters,
    constant after (values by hand at lr_decay_iters = 100); the first text_iters steps draw text-only batches
    (stage 1), the later ones dialogues."""
    cfg = lm_cfg(lr_decay_iters=100, text_iters=3)
    rt = common.setup(cfg, log_to_file=False)
    lr_at = M.lm_build(cfg, rt)["sched"].lr_lambdas[0]
    cos = lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * s / 100))
    want = {0: 0.2, 3: 0.8 * cos(3), 4: cos(4), 50: 0.55, 100: 0.1, 300: 0.1}
    for s, v in want.items():
        assert lr_at(s) == pytest.approx(v, abs=1e-9), s
    asked = []
    sampler = type("S", (), {"next": lambda self, text: asked.append(text) or torch.zeros(1)})()
    for step in range(5):
        M.lm_get_batch(sampler, cfg, rt, step)
    assert asked == [True, True, True, False, False]


def test_tiny_lm_learns():
    """A few steps on one batch of dialogue-like tokens lower the text and the audio losses."""
    cfg = lm_cfg(lr=1e-2)
    rt = common.setup(cfg, log_to_file=False)
    state = M.lm_build(cfg, rt)
    codes = random_codes(cfg, B=2, T=cfg.lm_frames)
    first = M.lm_train_step(state, codes, cfg, rt)
    for _ in range(20):
        last = M.lm_train_step(state, codes, cfg, rt)
    assert last["text"] < 0.7 * first["text"] and last["semantic"] < 0.7 * first["semantic"]


@pytest.fixture(scope="module")
def tiny_codec(tmp_path_factory):
    """A tiny Mimi checkpoint (random codebooks, no training) for the LM stage."""
    d = tmp_path_factory.mktemp("codec")
    cfg = make_cfg(out_dir=str(d))
    rt = common.setup(cfg, log_to_file=False)
    torch.manual_seed(0)
    state = M.build(cfg, rt)
    random_codebooks(state["G"])
    common.save_checkpoint(cfg, 0, state)
    return str(d / "ckpt.pt")


def lm_run(*args):
    return common.parse_config(M.Config, M.PRESETS, list(args))


def test_lm_stage_contract(tiny_codec, tmp_path, capsys):
    """The command-line contract for --stage=lm, in process (the codec stage's test runs the subprocesses): train
    -> resume bit for bit equal to a straight run -> eval -> bench JSON -> `--mode=sample --init_from=D/ckpt.pt`
    (no other flag) writes the two-channel wav, png and the timed transcript."""
    d, straight = str(tmp_path / "run"), str(tmp_path / "straight")
    base = ["--preset=tiny", "--stage=lm", f"--codec={tiny_codec}", "--device=cpu", "--compile=False"]
    M.lm_train(lm_run(*base, "--max_iters=3", f"--out_dir={d}"))
    ck3 = torch.load(f"{d}/ckpt.pt", weights_only=True)
    assert ck3["step"] == 3 and os.listdir(f"{d}/codes")
    M.lm_train(lm_run(*base, "--init_from=resume", "--max_iters=5", f"--out_dir={d}"))
    M.lm_train(lm_run(*base, "--max_iters=5", f"--out_dir={straight}"))
    a, b = (torch.load(f"{x}/ckpt.pt", weights_only=True) for x in (d, straight))
    for k, v in b["models"]["model"].items():
        assert torch.equal(v, a["models"]["model"][k]), k
    assert any(not torch.equal(v, ck3["models"]["model"][k]) for k, v in a["models"]["model"].items())
    res = M.lm_evaluate(lm_run("--mode=eval", f"--init_from={d}/ckpt.pt"))
    assert {"text", "semantic", "answer_acc", "question_acc", "deaf_answer_acc", "deaf_question_acc", "latency_ms",
            "corpus_latency_ms"} <= set(res)
    capsys.readouterr()
    M.lm_bench(lm_run(*base, "--mode=bench", f"--out_dir={tmp_path / 'bench'}"))
    fig = json.loads([l for l in capsys.readouterr().out.splitlines() if l.startswith("{")][-1])
    assert fig["stream_frame_ms"] > 0 and fig["theoretical_latency_ms"] == 160 and fig["params"] > 0
    M.lm_sample(lm_run("--mode=sample", f"--init_from={d}/ckpt.pt"))  # no other flag: the checkpoint's config
    files = os.listdir(f"{d}/samples")
    assert "Moshi said" in capsys.readouterr().out and any(f.endswith("_moshi.wav") for f in files)
    assert any(f.endswith(".png") for f in files) and any(f.endswith(".txt") for f in files)
    import soundfile as sf
    wav, sr = sf.read(os.path.join(d, "samples", next(f for f in files if f.endswith(".wav") and "_moshi" not in f)))
    assert sr == 24000 and wav.ndim == 2 and wav.shape[1] == 2  # user left, Moshi right


def test_lm_errors_are_one_line(tiny_codec):
    with pytest.raises(SystemExit, match="needs --codec"):
        M.load_codec(lm_run("--preset=tiny", "--stage=lm"), None)
    with pytest.raises(SystemExit, match="--lm_card=32"):
        M.load_codec(lm_run("--preset=tiny", "--stage=lm", f"--codec={tiny_codec}", "--lm_card=64"),
                     common.setup(make_cfg(), log_to_file=False))
    for flag, msg in (("--lm_heads=3", "lm_heads"), ("--text_card=100", "text_card"), ("--dep_q=1", "dep_q")):
        with pytest.raises(SystemExit, match=msg):
            lm_cfg(**dict([flag[2:].split("=")]))
    with pytest.raises(SystemExit, match="does not exist"):
        M.lm_load_for_inference(lm_run("--preset=tiny", "--stage=lm", "--init_from=/nowhere.pt"), None)


def test_the_lm_reads_its_own_corpus_hours(tiny_codec, tmp_path, monkeypatch):
    """The LM's data (dialogues, stage-1 text, the code cache's key) come from the built-in corpus at
    lm_corpus_hours, the codec's speech at corpus_hours; the CPU default LM reads 16 h (4 h of dialogue), its
    codec 2 h."""
    small = make_cfg("small", stage="lm")
    assert (small.corpus_hours, small.lm_corpus_hours) == (2.0, 16.0)
    asked = []
    monkeypatch.setattr(common, "load_corpus",
                        lambda c, split, sr, kind, **kw: asked.append((kind, c.corpus_hours)) or [])
    cfg = lm_cfg(corpus_hours=0.5, lm_corpus_hours=0.03, codec=tiny_codec, out_dir=str(tmp_path))
    M.corpus_texts(cfg), M.speech(cfg, "train")
    assert asked == [("speech", 0.03), ("dialogue", 0.03), ("speech", 0.5)]
    files = []  # the code cache's key follows lm_corpus_hours, not corpus_hours
    for kw in (dict(lm_corpus_hours=0.03), dict(lm_corpus_hours=0.03, corpus_hours=0.7),
               dict(lm_corpus_hours=0.04)):
        M.dialogue_tokens(lm_cfg(codec=tiny_codec, out_dir=str(tmp_path), **kw), "val", torch.nn.Linear(1, 1),
                          None)
        files.append(len(os.listdir(tmp_path / "codes")))
    assert files == [1, 1, 2]


def test_lm_stops_at_the_best_val_of_its_objective(tiny_codec, tmp_path, monkeypatch):
    """lm_train hands train_loop its patience and, as the val loss, the objective L = CE_text + CE_audio on
    val (not the semantic CE, nor one term); lm_max_iters replaces max_iters as the LM's step limit. Scripted
    evals: the totals 5, 4, 4.5, 4.2 stop at step 4 with step 2's checkpoint; one term alone would not."""
    val = {1: (1.0, 4.0), 2: (1.0, 3.0), 3: (2.0, 2.5), 4: (0.5, 3.7), 5: (0.1, 0.1), 6: (0.1, 0.1)}
    evals = []

    def fake_eval(cfg, bundle, rt, samples_dir, split):
        evals.append(int(os.path.basename(samples_dir)[4:]))
        return dict(text=val[evals[-1]][0], audio=val[evals[-1]][1], semantic=1.0 / evals[-1])
    monkeypatch.setattr(M, "lm_evaluate", fake_eval)
    base = ["--preset=tiny", "--stage=lm", f"--codec={tiny_codec}", "--device=cpu", "--compile=False",
            "--eval_interval=1", "--max_iters=2", "--lm_max_iters=6"]
    for patience, last, kept in ((2, 4, 2), (0, 6, 6)):
        d = str(tmp_path / f"p{patience}")
        M.lm_train(lm_run(*base, f"--patience={patience}", f"--out_dir={d}"))
        assert evals[-1] == last
        assert torch.load(f"{d}/ckpt.pt", weights_only=True)["step"] == kept
    assert torch.load(f"{tmp_path}/p2/best.pt", weights_only=True)["extra"]["val_best"]["value"] == 4.0
    assert not os.path.exists(f"{tmp_path}/p0/best.pt")


def test_the_cpu_lm_trains_on_whole_dialogues(tiny_codec, tmp_path):
    """`small` trains on whole conversations: lm_frames outlasts every built-in dialogue, and the LM sampler
    returns each one from its first frame (the conversation's start at position 0, as in converse), the rest -1
    (no loss, embedded as zero). With 8 s crops the first turn at inference looked like no training sequence."""
    small = make_cfg("small", stage="lm")
    cfg = lm_cfg(codec=tiny_codec, out_dir=str(tmp_path), lm_frames=small.lm_frames)
    mimi = M.load_codec(cfg, common.setup(cfg, log_to_file=False))
    _, dial = M.dialogue_tokens(cfg, "train", mimi, M.TextTokenizer(cfg, M.corpus_texts(cfg)))
    assert max(d.shape[-1] for d in dial) <= small.lm_frames  # the longest script lasts ~24 s; 25.6 s here
    rt = common.setup(cfg, log_to_file=False)
    sampler = M.LMSampler([1, 2, 3], dial, dataclasses.replace(cfg, batch_size=3), rt)
    rng = copy.deepcopy(sampler.dial.state_dict())
    batch = sampler.next(text=False)  # (3, 1 + 2K, lm_frames)
    sampler.dial.load_state_dict(rng)
    for b, i in zip(batch, sampler.dial.next()[1].tolist()):
        T = dial[i].shape[-1]
        assert torch.equal(b[:, :T], torch.from_numpy(dial[i]).long()) and (b[:, T:] == -1).all()


def test_answer_metric_on_the_script():
    """The measurement itself: the corpus's own assistant channel, as a text stream, answers everything, with the
    corpus's latency; an empty stream answers nothing. Turns are the greeting (first), the thanks (last) and the
    questions between; the deaf baseline says one fixed line per position and, hearing nothing, scores at the
    thanks ("you are welcome") and where its lines fit, not at every question."""
    cfg = lm_cfg()
    utts = M.dialogues(cfg, "train") + M.dialogues(cfg, "test")
    u = utts[-1]
    said = [(w, s) for w, s, _ in u.words[1]]
    found, total, lat, ref = M.answer_scores(u, said, 1e9)
    assert total > 0 and found == total and lat == pytest.approx(ref)
    assert M.answer_scores(u, [], 1e9)[0] == 0
    turns = M.answer_turns(u, 1e9)
    assert [p for *_, p in turns] == ["first"] + ["middle"] * (len(turns) - 2) + ["last"]
    assert [w[0] for w in turns[-1][0]] == ["thank", "you"] and len(turns) >= 4
    assert M.answer_scores(u, said, 1e9, ("middle",))[:2] == (sum(
        len({w[0] for w in r} - {w[0] for w in q}) for q, r, _, p in turns if p == "middle"),) * 2
    f, t, qf, qt = M.deaf_scores(utts, utts, 1e9)
    # its lines are training replies, so the dialogues they come from score: beyond the thanks, and at questions
    assert f > 2 * len(utts) and 0 < qf < qt and t == sum(M.answer_scores(v, [], 1e9)[1] for v in utts)
