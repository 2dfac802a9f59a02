"""Tests for wavlm.py: parameter counts, the bucket function and the gate against hand computations, the
official initialisation, span-mask statistics, utterance mixing, the MFCC targets against librosa, a golden
training step against a literal transcription of the objective, the official key map (round trip, and parity
with the pip `transformers` WavLMModel), and the command line.

What pins each loss term, target, sampler and schedule of wavlm.py (every expected value is transcribed in the
test, never taken from wavlm.py's own helpers):
- loss, masked-prediction CE (masked frames only, cosine logits / 0.1 against the label embeddings):
  test_golden_train_step; its definition by indexing and its sync-free form:
  test_compiled_train_step_equals_eager...
- loss, HuBERT feature penalty x 10 (mean square of the CNN output, after the x0.1 gradient scale):
  test_feature_penalty_value_and_gradient (value, gradient, weight), test_golden_train_step (in the update).
- target: k-means ids of the CLEAN primary's features (mixing never changes them), padded to the conv's frame
  count by repeating the last: test_golden_train_step (features by hand in _mfcc_by_hand, nearest centroid by
  hand).
- target features: MFCCs (13 + deltas + delta-deltas): test_mfcc_matches_librosa (librosa's mel, DCT and
  delta, on the time axis), test_deltas_hand_computed (HuBERT's win-5 deltas by hand); frame rate:
  test_frames_are_50_hz.
- target clustering: k-means++ and Lloyd: test_kmeans_recovers_clusters.
- sampler, span masks (int(p T + U) starts without replacement, spans of 10): test_span_mask_statistics; the
  masked frames' input is mask_emb: test_masked_frames_get_mask_emb_and_only_they, test_golden_train_step.
- sampler, utterance mixing (§3.2: which row, how long, where, the energy ratio on the whole rows, in place):
  test_utterance_mixing_rule; mixed input with clean targets in train_step: test_golden_train_step.
- schedule: linear warm-up then linear decay to 0, AdamW betas/eps and the weight-decay groups:
  test_schedule_and_weight_decay_groups; the gradient-scale into the CNN (x0.1): test_golden_train_step.
- initialisation (kaiming convs, N(0, 0.02) linears and bias table, defaults outside the encoder):
  test_official_init_statistics.
- evaluation baselines (nearest visible frame, feature distance): test_eval_baselines; the eval log line:
  test_cli_contract_features_probe_iteration2.
- the batch sampler (crops of the corpus) is common.SegmentSampler, pinned in test_common.
"""
import copy
import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import common
import wavlm
from cli import check_cli_contract, error_of, require, run_script


def tiny_cfg(**kw):
    cfg = wavlm.Config(**wavlm.PRESETS["tiny"])
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


RT = common.Runtime(torch.device("cpu"), "cpu", torch.float32)


# ----------------------------------------------------------------------------- sizes

def test_param_counts_match_the_paper():
    """Paper Table 1: Base 94.70 M, Large 316.62 M (with the pre-training head); the official files /
    transformers hold the encoder: 94,381,936 and 315,453,120."""
    want = {"base": (94_706_800, 94_381_936), "base_plus": (94_706_800, 94_381_936),
            "large": (316_624_320, 315_453_120)}
    for name, (total, enc) in want.items():
        with torch.device("meta"):
            m = wavlm.WavLM(wavlm.Config(**wavlm.PRESETS[name]))
        assert common.count_params(m) == total and wavlm.encoder_params(m) == enc, name
    assert math.floor(94_706_800 / 1e4) / 100 == 94.70 and round(316_624_320 / 1e6, 2) == 316.62


def test_frames_are_50_hz():
    cfg = wavlm.Config()
    assert wavlm.num_frames(cfg, 16000) == 49 and wavlm.num_frames(cfg, 16320) == 50
    m = wavlm.WavLM(tiny_cfg()).eval()
    with torch.no_grad():
        hidden, out = m.extract(torch.randn(2, 16000) * 0.1)
    assert len(hidden) == 3 and out.shape == (2, 49, 32)
    assert wavlm.mfcc(torch.randn(2, 16000))[0].shape == (49, 39)

# ----------------------------------------------------------------------------- initialisation

def test_official_init_statistics():
    """microsoft/unilm WavLM.py: kaiming_normal_ convs in the feature encoder (std sqrt(2 / (C_in k))), so
    the activation scale of speech stays order 0.1-1 through the 7 blocks (PyTorch's default init shrinks it
    ~1000x); init_bert_params on the Transformer encoder: every Linear N(0, 0.02) with zero bias, the
    relative-position bias table N(0, 0.02); the position conv N(0, sqrt(4 / (k D))); outside the encoder
    (fairseq hubert.py) post_extract_proj and final_proj keep nn.Linear's default, mask_emb and the label
    embeddings U[0, 1)."""
    torch.manual_seed(0)
    cfg = wavlm.Config(**{**wavlm.PRESETS["small"],
                          "conv_layers": tuple((256, k, s) for _, k, s in wavlm.BASE_CONV),
                          "num_classes": 200})
    m = wavlm.WavLM(cfg)
    t = torch.arange(32000) / 16000                        # voiced-speech-like: harmonics + noise
    wav = 0.1 * sum(torch.sin(2 * math.pi * 120 * h * t) / h for h in range(1, 20))
    wav = wav + 0.01 * torch.randn(32000)
    x, scales = wav[None, None], []
    with torch.no_grad():
        for block in m.feature_extractor.conv_layers:
            x = block(x)
            scales.append(x.std().item())
    assert all(0.1 < v < 1.5 for v in scales) and scales[-1] > 0.3 * scales[0], scales
    for i, block in enumerate(m.feature_extractor.conv_layers):
        w = block.conv.weight
        assert abs(w.std().item() / math.sqrt(2 / (w.shape[1] * w.shape[2])) - 1) < 0.1, i
    enc_linear = [mod for n, mod in m.encoder.named_modules() if isinstance(mod, torch.nn.Linear)]
    assert len(enc_linear) == 7 * cfg.layers                  # q k v out, grep_linear, fc1, fc2
    for mod in enc_linear:
        assert abs(mod.weight.std().item() - 0.02) < 0.004 and abs(mod.weight.mean().item()) < 0.004
        assert torch.equal(mod.bias, torch.zeros_like(mod.bias))
    table = m.encoder.relative_attention_bias.weight
    assert abs(table.std().item() - 0.02) < 0.003, table.std().item()
    v = m.encoder.pos_conv.parametrizations.weight.original1   # weight_v: the initial weight before the norm
    assert abs(v.std().item() / math.sqrt(4 / (cfg.conv_pos * cfg.dim)) - 1) < 0.1
    for lin in (m.post_extract_proj, m.final_proj):           # nn.Linear default: U(+-1/sqrt(fan_in))
        assert abs(lin.weight.std().item() / (1 / math.sqrt(3 * lin.weight.shape[1])) - 1) < 0.1
    for p in (m.label_embs, m.mask_emb):
        assert p.min() >= 0 and p.max() < 1 and abs(p.mean().item() - 0.5) < 0.05
    assert all(torch.equal(l.self_attn.grep_a, torch.ones_like(l.self_attn.grep_a)) for l in m.encoder.layers)

# ----------------------------------------------------------------------------- feature penalty

def test_feature_penalty_value_and_gradient():
    """fairseq hubert.py: features_pen = features.float().pow(2).mean() of the CNN output (before layer_norm),
    after GradMultiply, so its gradient reaches the CNN x feature_grad_mult; the criterion adds it x 10
    (hubert_base_librispeech.yaml loss_weights [10]) to the mean masked CE."""
    assert wavlm.Config().feature_pen == 10.0
    torch.manual_seed(0)
    cfg = tiny_cfg(feature_grad_mult=0.1)
    m = wavlm.WavLM(cfg).train()
    wav = torch.randn(2, 16000) * 0.1
    _, pen = m(wav)
    conv = m.feature_extractor.conv_layers[-1].conv.weight
    (g,) = torch.autograd.grad(pen, conv)
    ref = copy.deepcopy(m)
    f = ref.feature_extractor(wav)                              # (B, C, T): the CNN output, by hand
    want = (f.double() ** 2).sum() / f.numel()
    assert abs(pen.item() - want.item()) < 1e-6 * want.item() and pen.item() > 1e-3
    (g_ref,) = torch.autograd.grad(want, ref.feature_extractor.conv_layers[-1].conv.weight)
    torch.testing.assert_close(g.double(), 0.1 * g_ref.double(), rtol=1e-4, atol=1e-9)
    # through train_step: loss = ce + 10 pen (the golden step checks the update)
    state = _state(tiny_cfg(mix_prob=0.0))
    out = wavlm.train_step(state, wav, state["model"].cfg, RT)
    assert abs(out["loss"].item() - (out["ce"].item() + 10 * out["fpen"].item())) < 1e-5

# ----------------------------------------------------------------------------- MFCC targets

def test_deltas_hand_computed():
    """HuBERT's labels use torchaudio compute_deltas (win 5): d_t = (c_t+1 - c_t-1 + 2 (c_t+2 - c_t-2)) / 10,
    edges repeated. c = t^2: padded 0 0 | 0 1 4 9 16 | 16 16."""
    c = torch.tensor([0.0, 1, 4, 9, 16]).view(1, 1, 5)
    assert torch.allclose(wavlm.deltas(c).flatten(), torch.tensor([0.9, 2.2, 4.0, 4.2, 3.1]))
    assert torch.allclose(wavlm.deltas(torch.ones(2, 3, 7)), torch.zeros(2, 3, 7))


def test_mfcc_matches_librosa():
    """The static MFCCs against librosa's mel spectrogram (power, periodic Hann, 400/320, no centering, Slaney
    scale, no area norm) -> natural log (+1e-6) -> librosa.feature.mfcc (orthonormal DCT-II); deltas and
    delta-deltas against librosa.feature.delta(width=5, mode="nearest") once and twice, on the time axis."""
    librosa = require("librosa")
    torch.manual_seed(0)
    t = torch.arange(16000) / 16000
    wav = torch.sin(2 * math.pi * (200 + 300 * t) * t) * (0.2 + t) + 0.05 * torch.randn(16000)
    got = wavlm.mfcc(wav[None])[0].double().numpy()                         # (T, 39)
    mel = librosa.feature.melspectrogram(y=wav.double().numpy(), sr=16000, n_fft=400, hop_length=320,
                                         win_length=400, window="hann", center=False, power=2.0, n_mels=23,
                                         htk=False, norm=None)
    c = librosa.feature.mfcc(S=np.log(mel + 1e-6), n_mfcc=13, dct_type=2, norm="ortho")   # (13, T)
    d1 = librosa.feature.delta(c, width=5, order=1, axis=-1, mode="nearest")
    d2 = librosa.feature.delta(d1, width=5, order=1, axis=-1, mode="nearest")
    want = np.concatenate([c, d1, d2]).T
    assert got.shape == want.shape == (49, 39)
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max(), np.abs(got - want).max(0)

# ----------------------------------------------------------------------------- position bias and gate

def test_bucket_function_hand_computed():
    """320 buckets, max distance 800: 160 per sign (+160 for j > i); |r| < 80 exact; else
    80 + floor(ln(|r|/80) / ln(10) * 80), capped at 159."""
    rel = torch.tensor([0, -1, 1, -79, 79, -80, 80, -200, 200, -799, -800, 5000, -5000])
    want = [0, 1, 161, 79, 239, 80, 240, 111, 271, 159, 159, 319, 159]
    assert wavlm.relative_position_bucket(rel, 320, 800).tolist() == want
    # 80 + floor(ln(2.5)/ln(10)*80) = 80 + floor(31.83) = 111
    assert 80 + math.floor(math.log(2.5) / math.log(10) * 80) == 111


def test_one_bias_table_shared_by_all_layers():
    m = wavlm.WavLM(tiny_cfg(layers=3))
    tables = [n for n, _ in m.named_parameters() if "relative_attention_bias" in n]
    assert tables == ["encoder.relative_attention_bias.weight"]
    assert sum(1 for n, _ in m.named_parameters() if n.endswith("grep_a")) == 3   # a gate per layer


def test_gate_formula_and_attention_with_the_gated_bias():
    """gate_a, gate_b = sigmoid(sum of grep_linear(x_h)[0:4]), sigmoid(sum of [4:8]) from the attention's
    input split per head; bias = (gate_a * (gate_b * grep_a - 1) + 2) * d; logits = q k / sqrt(d_h) + bias."""
    torch.manual_seed(0)
    cfg = tiny_cfg(dim=16, heads=2)
    att = wavlm.GatedSelfAttention(cfg)
    with torch.no_grad():
        att.grep_a.copy_(torch.tensor([0.5, 2.0]).view(1, 2, 1, 1))
    B, T, H, dh = 2, 7, 2, 8
    x = torch.randn(B, T, 16)
    g = att.gate(x)
    assert g.shape == (B, H, T, 1)
    for b, h, t in [(0, 0, 0), (1, 1, 6), (0, 1, 3)]:
        z = att.grep_linear.weight @ x[b, t, h * dh:(h + 1) * dh] + att.grep_linear.bias
        ga, gb = torch.sigmoid(z[:4].sum()), torch.sigmoid(z[4:].sum())
        assert torch.allclose(g[b, h, t, 0], ga * (gb * att.grep_a[0, h, 0, 0] - 1) + 2, atol=1e-6)
    pos = torch.randn(1, H, T, T)
    y = att(x, pos)
    q, k, v = (p(x).view(B, T, H, dh).transpose(1, 2) for p in (att.q_proj, att.k_proj, att.v_proj))
    logits = q @ k.transpose(-1, -2) / math.sqrt(dh) + g * pos
    ref = att.out_proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, T, 16))
    assert torch.allclose(y, ref, atol=1e-5)

# ----------------------------------------------------------------------------- masking and mixing

def test_span_mask_statistics():
    """int(p T + U) spans of l frames per utterance, starts without replacement in [0, T - l): the masked
    fraction is the exact expectation 1 - mean_t C(N - c_t, n) / C(N, n) (c_t: starts that cover t)."""
    cfg = wavlm.Config()
    B, T, l, N = 64, 1000, 10, 990
    torch.manual_seed(0)
    m = wavlm.span_mask(B, T, cfg)
    n = int(0.08 * T)  # 80 (the random rounding adds at most 1)
    def p_unmasked(c):
        return math.exp(math.lgamma(N - c + 1) - math.lgamma(N - c - n + 1) - math.lgamma(N + 1)
                        + math.lgamma(N - n + 1))
    expected = 1 - np.mean([p_unmasked(min(t, N - 1) - max(0, t - l + 1) + 1) for t in range(T)])
    assert abs(m.float().mean().item() - expected) < 0.01, (m.float().mean().item(), expected)
    assert 0.5 < expected < 0.6                         # ~ 1 - (1 - 0.08)^10 = 0.566
    for row in m[:8]:                                   # every masked run is a union of whole spans: >= l
        runs = [len(r) for r in re.findall("1+", "".join("1" if v else "0" for v in row.tolist()))]
        assert min(runs) >= l and not row[-1]           # starts < T - l: never reaches the last frame
    assert (wavlm.span_mask(4, 30, cfg).sum(1) >= 2 * l).all()   # min 2 spans on short inputs


def test_masked_frames_get_mask_emb_and_only_they():
    torch.manual_seed(0)
    m = wavlm.WavLM(tiny_cfg()).eval()
    wav = torch.randn(2, 16000) * 0.1
    T = wavlm.num_frames(m.cfg, 16000)
    mask = wavlm.span_mask(2, T, m.cfg)
    seen = []
    h = m.encoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        m.extract(wav, mask)
        m.extract(wav)
    h.remove()
    masked, clean = seen
    assert torch.equal(masked[mask], m.mask_emb.expand(int(mask.sum()), -1))
    assert torch.equal(masked[~mask], clean[~mask])


def test_utterance_mixing_rule():
    """The official mixing_collated_audios: a piece of n in [0, L/2] samples of a batch row (itself included),
    added at a random place, rows mixed in order and in place, and scaled so that the WHOLE primary row's
    energy over the WHOLE interferer row's is r dB. Rows whose loudness changes within the row make the
    piece's energy differ from the row's, so an energy measured on the piece fails the ratio."""
    L, B = 4000, 6
    torch.manual_seed(0)
    env = torch.cat([torch.full((L // 4,), 2.0), torch.full((3 * L // 4,), 0.1)])    # loud start, quiet rest
    wav = torch.randn(B, L) * env * torch.tensor([0.1, 0.5, 1.0, 0.2, 0.3, 0.05])[:, None]
    cfg = wavlm.Config(mix_prob=1.0, mix_db=(3.0, 3.0))        # a fixed ratio: the energy rule exactly
    mixed, events = wavlm.mix_utterances(wav, cfg, torch.Generator().manual_seed(3))
    assert len(events) == B and [e[0] for e in events] == list(range(B))
    ref, piece_ratios = wav.clone(), []
    for i, j, dst, src, n, scale in events:                   # replay in order, on the running batch
        assert 0 <= n <= L // 2 and 0 <= j < B and 0 <= dst <= L - n and 0 <= src <= L - n
        clip = ref[j].clone()
        want = (ref[i].pow(2).mean() / (clip.pow(2).mean() * 10 ** 0.3)).sqrt()
        assert torch.allclose(scale, want, rtol=1e-5), (i, j, float(scale), float(want))
        if n > 100:
            e_piece = clip[src:src + n].pow(2).mean()
            piece_ratios.append(float(10 * torch.log10(ref[i].pow(2).mean() / (scale ** 2 * e_piece))))
        ref[i, dst:dst + n] += scale * clip[src:src + n]
    assert torch.allclose(mixed, ref, atol=1e-6)
    assert any(abs(r - 3.0) > 1.0 for r in piece_ratios)      # the data does tell the two rules apart
    # the interferer is drawn from the whole batch, itself included (replace=True); n is uniform in [0, L/2]
    many = [e for s in range(60) for e in wavlm.mix_utterances(wav, cfg, torch.Generator().manual_seed(s))[1]]
    self_frac = sum(e[0] == e[1] for e in many) / len(many)
    assert 0.09 < self_frac < 0.25, self_frac                 # 1/6 expected
    ns = torch.tensor([e[4] for e in many], dtype=torch.float)
    assert abs(ns.mean().item() / (L // 2) - 0.5) < 0.06 and ns.max() > 0.9 * L // 2
    short = [e[4] for s in range(40)
             for e in wavlm.mix_utterances(wav[:, :8], cfg, torch.Generator().manual_seed(s))[1]]
    assert set(short) == {0, 1, 2, 3, 4}                      # randint(0, T // 2 + 1): both ends included
    # a fixed partner, a silent interferer (scale 0), no mixing at all, and noise
    pm, pe = wavlm.mix_utterances(wav[:2], cfg, torch.Generator().manual_seed(0), partner=(1, 0))
    assert [e[1] for e in pe] == [1, 0]
    silent = torch.stack([wav[0], torch.zeros(L)])
    sm, se = wavlm.mix_utterances(silent, cfg, torch.Generator().manual_seed(0), partner=(1, 0))
    assert se[0][5] == 0 and torch.equal(sm[0], wav[0])
    assert torch.equal(wavlm.mix_utterances(wav, wavlm.Config(mix_prob=0.0))[0], wav)
    noisy, ev = wavlm.mix_utterances(wav, wavlm.Config(mix_prob=1.0, noise_prob=1.0),
                                     torch.Generator().manual_seed(1))
    assert all(e[1] == -1 for e in ev) and not torch.equal(noisy, wav)


# ----------------------------------------------------------------------------- training

def _state(cfg, seed=0):
    torch.manual_seed(seed)
    state = wavlm.build(cfg, RT)
    state["km"].fit(torch.randn(400, 39) * 3, 3, 0)
    return state


def _mfcc_by_hand(wav):
    """wavlm.py's MFCC targets transcribed with numpy (not wavlm.mfcc): frames of 400 every 320 samples,
    periodic Hann, |rfft|^2, 23 Slaney-scale mel filters without area norm (librosa's, or common's, which
    test_common pins to librosa), ln(+1e-6), orthonormal DCT-II to 13, then HTK deltas over +-2 frames with
    repeated edges, twice. wav (B, L) -> (B, T, 39) float64."""
    try:
        import librosa
        fb = librosa.filters.mel(sr=16000, n_fft=400, n_mels=23, norm=None)
    except ImportError:
        fb = common.mel_filterbank(16000, 400, 23, norm=None)
    x = wav.double().numpy()
    T = (x.shape[1] - 400) // 320 + 1
    frames = np.stack([x[:, 320 * t: 320 * t + 400] for t in range(T)], 1)           # (B, T, 400)
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    logmel = np.log(np.abs(np.fft.rfft(frames * win, axis=-1)) ** 2 @ fb.T.astype(np.float64) + 1e-6)
    k, n = np.arange(23), np.arange(13)[:, None]
    dct = np.cos(np.pi * n * (2 * k + 1) / 46) * np.where(n == 0, np.sqrt(1 / 23), np.sqrt(2 / 23))
    c = logmel @ dct.T                                                                 # (B, T, 13)

    def delta(a):
        p = np.concatenate([a[:, :1], a[:, :1], a, a[:, -1:], a[:, -1:]], 1)
        return np.stack([(p[:, t + 3] - p[:, t + 1] + 2 * (p[:, t + 4] - p[:, t])) / 10
                         for t in range(a.shape[1])], 1)
    return torch.from_numpy(np.concatenate([c, delta(c), delta(delta(c))], -1))


def test_golden_train_step(monkeypatch):
    """One real train_step (SGD) against the objective written out here, every expected value from the test's
    own transcription: targets = nearest centroid of the standardised MFCCs of the CLEAN waveform (MFCCs by
    hand); the model's input is the MIXED waveform (train_step's mixer replaced by a stand-in that records
    what it was given), masked frames replaced by mask_emb (the span sampler replaced by a fixed mask; both
    samplers are pinned in their own tests); logits = cos(final_proj(h_t), e_c) / 0.1; cross-entropy over the
    masked frames only + 10 x the mean square of the CNN output; CNN gradients x 0.1; SGD update."""
    cfg = tiny_cfg(mix_prob=1.0, grad_clip=1e9, feature_grad_mult=0.1)
    state = _state(cfg)
    ref = copy.deepcopy(state["model"])
    lr = 0.05
    state["opt"] = torch.optim.SGD(state["model"].parameters(), lr=lr)
    state["sched"] = torch.optim.lr_scheduler.LambdaLR(state["opt"], lambda s: 1.0)
    torch.manual_seed(1)
    wav = torch.randn(3, 16000) * 0.1 * torch.sin(torch.linspace(0, 30, 16000)) ** 2
    other = torch.randn(3, 16000) * 0.05
    T = wavlm.num_frames(cfg, 16000)
    mask = torch.zeros(3, T, dtype=torch.bool)
    mask[0, 3:13], mask[1, 20:40], mask[2, 0:10] = True, True, True
    seen = []
    monkeypatch.setattr(wavlm, "mix_utterances", lambda w, c, generator=None, partner=None:
                        (seen.append(w.clone()) or w + other, [(0, 1, 0, 0, 1, torch.tensor(1.0))]))
    monkeypatch.setattr(wavlm, "span_mask", lambda B, T_, c, generator=None: mask.clone())
    out = wavlm.train_step(state, wav, cfg, RT)
    assert len(seen) == 1 and torch.equal(seen[0], wav)                  # the mixer got the clean batch
    feats = _mfcc_by_hand(wav)                                            # the clean primaries' MFCCs
    km = state["km"]
    x = (feats - km.mean.double()) / km.std.double()
    targets = ((x[:, :, None, :] - km.centroids.double()[None, None]) ** 2).sum(-1).argmin(-1)   # (3, T')
    targets = torch.cat([targets, targets[:, -1:].expand(-1, T - targets.shape[1])], 1)[:, :T]
    ref.train()
    ref.cfg = copy.copy(ref.cfg)
    ref.cfg.feature_grad_mult = 1.0     # the reference scales the CNN's gradients itself, below
    mixed = wav + other
    f = ref.feature_extractor(mixed)                                      # (B, C, T)
    pen = (f ** 2).mean()
    xin = ref.post_extract_proj(F.layer_norm(f.transpose(1, 2), (f.shape[1],), ref.layer_norm.weight,
                                             ref.layer_norm.bias))
    xin = torch.where(mask[..., None], ref.mask_emb, xin)
    h = ref.encoder(xin)[1]
    p = h @ ref.final_proj.weight.t() + ref.final_proj.bias
    cos = ((p[:, :, None, :] * ref.label_embs[None, None]).sum(-1)
           / (p.norm(dim=-1)[..., None] * ref.label_embs.norm(dim=-1)))
    logp = torch.log_softmax(cos / 0.1, -1)
    ce = -(logp.gather(-1, targets[..., None])[..., 0] * mask).sum() / mask.sum()
    loss = ce + 10 * pen
    assert abs(out["ce"].item() - ce.item()) < 1e-5 and abs(out["fpen"].item() - pen.item()) < 1e-6
    assert abs(out["loss"].item() - loss.item()) < 1e-5
    loss.backward()
    for (n, p_new), (_, p_old) in zip(state["model"].named_parameters(), ref.named_parameters()):
        g = p_old.grad if p_old.grad is not None else torch.zeros_like(p_old)
        g = g * 0.1 if n.startswith("feature_extractor.") else g
        assert torch.allclose(p_new, p_old - lr * g, atol=1e-6, rtol=1e-4), n


class DeviceReads(TorchDispatchMode):
    """Records the ATen ops that make a GPU step wait for the device: a value read back (.item(), bool()) or
    an output whose shape depends on the data (boolean-mask indexing, nonzero)."""
    SYNCS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique_consecutive",
             "aten::_unique2"}

    def __enter__(self):
        self.found = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        bool_index = func._schema.name in ("aten::index", "aten::index_put", "aten::index_put_") and any(
            getattr(i, "dtype", None) == torch.bool for i in (args[1] if len(args) > 1 else ())
            if i is not None)
        if func._schema.name in self.SYNCS or bool_index:
            self.found.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_compiled_train_step_equals_eager_without_host_sync():
    # torch.compile forced on, on the CPU. The model traces as ONE graph through AOTAutograd (fullgraph=True:
    # an .item(), a data-dependent branch or shape would break it: a GPU step would stall there; backend
    # aot_eager: inductor's graph capture, forward and backward, without its minutes of C++ codegen on this
    # CPU), and so does the masked loss (no logits[mask]: boolean indexing has a data-dependent shape). Mixing
    # draws its choices on the host but never reads the batch back: it runs on a meta tensor, where any
    # .item() or .cpu() would raise. Two train_steps then give the eager losses and weights.
    cfg = tiny_cfg(mix_prob=1.0, compile=True)
    eager, comp = _state(cfg), _state(cfg)
    model = comp["model"]
    comp["model"] = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss_fn = torch.compile(wavlm.masked_prediction_loss, backend="aot_eager", fullgraph=True)
    logits, targets = torch.randn(2, 7, 5), torch.randint(0, 5, (2, 7))
    mask = torch.rand(2, 7) < 0.5
    with DeviceReads() as reads:                                          # no nonzero / .item() inside
        want = wavlm.masked_prediction_loss(logits, targets, mask)
        model.train()(torch.randn(2, 16000) * 0.1, torch.rand(2, 49) < 0.5)   # (eager: modes do not compile)
    assert not reads.found, reads.found
    for got, w in zip(loss_fn(logits, targets, mask), want):
        torch.testing.assert_close(got, w)
    lm = logits[mask]                                                     # the definition, by indexing
    torch.testing.assert_close(want[0], F.cross_entropy(lm, targets[mask]))
    torch.testing.assert_close(want[2], (logits[~mask].argmax(-1) == targets[~mask]).float().mean())
    meta = torch.randn(3, 4000).to("meta")
    for c in (cfg, tiny_cfg(mix_prob=1.0, noise_prob=1.0)):
        mixed, ev = wavlm.mix_utterances(meta, c, torch.Generator().manual_seed(0))
        assert ev and mixed.is_meta
    torch.manual_seed(3)
    wav = torch.randn(3, 16000) * 0.1
    for s in range(2):
        torch.manual_seed(20 + s)
        a = wavlm.train_step(eager, wav, cfg, RT)
        torch.manual_seed(20 + s)
        b = wavlm.train_step(comp, wav, cfg, RT)
        for k in ("loss", "acc_m", "gnorm"):
            assert abs(a[k].item() - b[k].item()) <= 1e-4 * (1 + abs(a[k].item())), (s, k)
    for (k, p), q in zip(eager["model"].named_parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=k)


def test_loss_falls_on_one_batch():
    cfg = tiny_cfg(mix_prob=0.0, lr=3e-3, warmup=1, max_iters=1000)
    state = _state(cfg)
    torch.manual_seed(2)
    wav = torch.randn(2, 16000) * 0.1 * torch.sin(torch.linspace(0, 40, 16000)) ** 2
    first = None
    for i in range(30):
        torch.manual_seed(9)   # the same masks every step: a fixed problem to overfit
        out = wavlm.train_step(state, wav, cfg, RT)
        first = first if first is not None else out["loss"].item()
    assert out["loss"].item() < first / 3, (first, out["loss"].item())


def test_schedule_and_weight_decay_groups():
    """Linear warm-up then linear decay to 0 (fairseq polynomial_decay, power 1): lr(s) = peak x
    min((s + 1) / warmup, (total - s) / (total - warmup)) at optimizer step s; AdamW (0.9, 0.98), eps 1e-6;
    weight decay on tensors of 2+ dims except the label embeddings (ours, nanoGPT's grouping: fairseq's Adam
    decays every parameter)."""
    cfg = tiny_cfg(lr=1e-3, warmup=4, lr_decay_iters=10)
    state = wavlm.build(cfg, RT)
    opt, sched, lrs = state["opt"], state["sched"], []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [1e-3 * v for v in (0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0, 0.0)]
    assert np.allclose(lrs, want), lrs
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6
    names = {id(p): n for n, p in state["model"].named_parameters()}
    decay = {names[id(p)] for p in opt.param_groups[0]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.01 and opt.param_groups[1]["weight_decay"] == 0.0
    assert "encoder.layers.0.fc1.weight" in decay and "feature_extractor.conv_layers.0.conv.weight" in decay
    assert decay == {n for n, p in state["model"].named_parameters() if p.ndim >= 2 and n != "label_embs"}
    assert not decay & {"label_embs", "mask_emb", "encoder.layers.0.fc1.bias",
                        "encoder.layers.0.final_layer_norm.weight"}


def test_eval_baselines():
    """The copy-the-context baseline by hand (visible frames 0, 1, 7, 8, 9; frame 4 ties between 1 and 7: the
    earlier), and the feature-distance figure: 0 for identical features, 1 for features replaced by their mean
    plus their own deviation flipped... (b = 2 mean - a gives 4)."""
    y, m = torch.arange(10), torch.zeros(10, dtype=torch.bool)
    m[2:7] = True
    assert wavlm.nearest_visible(y, m).tolist() == [0, 1, 1, 1, 1, 7, 7, 7, 8, 9]
    assert wavlm.nearest_visible(y, torch.ones(10, dtype=torch.bool)).tolist() == [-1] * 10
    a = torch.randn(20, 3)
    assert wavlm._nmse(a, a) == 0 and abs(wavlm._nmse(a, 2 * a.mean(0) - a) - 4) < 1e-5
    assert abs(wavlm._nmse(a, a.mean(0).expand(20, 3)) - 1) < 1e-5


def test_nomask_weight_normalisation():
    """fairseq's hubert criterion: (sum of CE over masked frames + w x sum over unmasked) / (masked + unmasked
    frames) when w > 0; masked frames only (sum / masked count) when w = 0 (the Base recipe)."""
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 9, 5), torch.randint(0, 5, (2, 9))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 2:6], mask[1, 0:3] = True, True
    logp = torch.log_softmax(logits, -1)
    ce = -logp.gather(-1, targets[..., None])[..., 0]
    for w in (0.0, 0.5, 1.0):
        loss, _, _, ce_m = wavlm.masked_prediction_loss(logits, targets, mask, w)
        want = (ce[mask].sum() + w * ce[~mask].sum()) / (7 + (11 if w > 0 else 0))
        assert abs(loss.item() - want.item()) < 1e-6 and abs(ce_m.item() - ce[mask].mean().item()) < 1e-6
    assert wavlm.Config().pred_nomask_weight == 0.0


def test_kmeans_recovers_clusters():
    torch.manual_seed(0)
    centers = torch.randn(4, 5) * 10
    x = (centers[:, None] + torch.randn(4, 200, 5)).reshape(-1, 5)
    km = wavlm.KMeans(4, 5)
    km.fit(x, 10, 0)
    ids = km(x[None])[0].view(4, 200)
    assert all(len(set(r.tolist())) == 1 for r in ids) and len(set(ids[:, 0].tolist())) == 4

# ----------------------------------------------------------------------------- official weights

def test_official_key_map_round_trips(tmp_path):
    for kw in (dict(),
               dict(extractor_mode="layer_norm", layer_norm_first=True, normalize=True, conv_bias=True)):
        torch.manual_seed(0)
        cfg = tiny_cfg(**kw)
        cfg.conv_layers = tuple((32, k, s) for _, k, s in wavlm.BASE_CONV)
        m = wavlm.WavLM(cfg)
        off = wavlm.to_official(m)
        keys = set(off["model"])
        assert "encoder.layers.0.self_attn.relative_attention_bias.weight" in keys
        assert "encoder.pos_conv.0.weight_g" in keys
        assert ("feature_extractor.conv_layers.1.2.1.weight" in keys) == (cfg.extractor_mode == "layer_norm")
        path = tmp_path / "WavLM-test.pt"
        torch.save(off, path)
        back = torch.load(path, weights_only=True)
        c2 = wavlm.Config()
        wavlm.config_from_official(c2, back)
        for k in wavlm.ARCH_KEYS[:wavlm.ARCH_KEYS.index("final_dim")]:
            assert common._norm(getattr(c2, k)) == common._norm(getattr(cfg, k)), k
        m2 = wavlm.WavLM(c2)
        wavlm.load_official_into(m2, back)
        sd1, sd2 = m.state_dict(), m2.state_dict()
        for k, v in sd1.items():
            if not k.startswith(("final_proj", "label_embs")):
                assert torch.equal(v, sd2[k]), k


def _hf_to_official(sd, layer_norm_mode):
    """transformers' WavLMModel names -> the official unilm names (reference card §1.4)."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"feature_extractor\.conv_layers\.(\d+)\.(conv|layer_norm)\.(weight|bias)", k)
        if m:
            i, part, p = m.groups()
            k = (f"feature_extractor.conv_layers.{i}."
                 + ("0." if part == "conv" else "2.1." if layer_norm_mode else "2.") + p)
        pw = "encoder.pos_conv_embed.conv.parametrizations.weight"
        for a, b in (("feature_projection.layer_norm", "layer_norm"),
                     ("feature_projection.projection", "post_extract_proj"),
                     ("masked_spec_embed", "mask_emb"),
                     (f"{pw}.original0", "encoder.pos_conv.0.weight_g"),
                     (f"{pw}.original1", "encoder.pos_conv.0.weight_v"),
                     ("encoder.pos_conv_embed.conv.bias", "encoder.pos_conv.0.bias"),
                     ("attention.gru_rel_pos_const", "self_attn.grep_a"),
                     ("attention.gru_rel_pos_linear", "self_attn.grep_linear"),
                     ("attention.rel_attn_embed", "self_attn.relative_attention_bias"),
                     (".attention.", ".self_attn."),
                     ("feed_forward.intermediate_dense", "fc1"), ("feed_forward.output_dense", "fc2")):
            k = k.replace(a, b)
        k = re.sub(r"(encoder\.layers\.\d+\.)layer_norm", r"\1self_attn_layer_norm", k)
        out[k] = v
    return out


@pytest.mark.parametrize("kind", ["base", "large-shaped"])
def test_parity_with_transformers(kind, tmp_path):
    """transformers.WavLMModel with random weights -> the official file format -> wavlm.py via --init_from's
    loader (size inferred from the file): every layer's output within 1e-5."""
    transformers = require("transformers", "transformers")
    torch.manual_seed(0)
    large = kind != "base"
    if large:   # Large's structure (pre-LN, LN conv blocks, waveform normalisation) at a test size
        hc = transformers.WavLMConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                      intermediate_size=128, conv_dim=(32,) * 7, num_conv_pos_embeddings=16,
                                      num_conv_pos_embedding_groups=4, feat_extract_norm="layer",
                                      do_stable_layer_norm=True)
    else:       # the Base configuration (its width, heads, buckets, conv encoder) with 3 of its 12 layers
        with torch.device("meta"):
            full = transformers.WavLMModel(transformers.WavLMConfig())
        assert sum(p.numel() for p in full.parameters()) == 94_381_936
        hc = transformers.WavLMConfig(num_hidden_layers=3)
    for k in ("hidden_dropout", "attention_dropout", "activation_dropout", "feat_proj_dropout", "layerdrop"):
        setattr(hc, k, 0.0)
    hf = transformers.WavLMModel(hc).eval()
    with torch.no_grad():   # perturb every weight: no parameter (gate constants, norms) at a neutral value
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "WavLM-random.pt"
    torch.save({"cfg": {"layer_norm_first": large, "normalize": large,
                        "max_distance": hc.max_bucket_distance},
                "model": _hf_to_official(hf.state_dict(), large)}, path)
    model, km, cfg = wavlm.load_any(str(path), RT)
    assert km is None and cfg.layers == hc.num_hidden_layers and cfg.dim == hc.hidden_size
    assert cfg.layer_norm_first == large and cfg.extractor_mode == ("layer_norm" if large else "default")
    assert wavlm.encoder_params(model) == sum(p.numel() for p in hf.parameters())
    wav = torch.randn(2, 8000) * 0.1
    with torch.no_grad():
        o = hf(F.layer_norm(wav, wav.shape[-1:]) if large else wav, output_hidden_states=True)
        hidden, out = model.extract(wav)
    assert len(o.hidden_states) == len(hidden)
    for i, (a, b) in enumerate(zip(o.hidden_states, hidden)):
        assert (a - b).abs().max().item() < 1e-5, i
    assert (o.last_hidden_state - out).abs().max().item() < 1e-5

# ----------------------------------------------------------------------------- command line

def test_cli_contract_features_probe_iteration2(tmp_path):
    out = check_cli_contract("wavlm.py", tmp_path, bench_keys=("train_audio_s_per_s", "features_rtf_eager",
                                                               "train_flops_per_step", "train_tflops"))
    assert "eval | split test" in out["eval"] and "acc_m_mixed" in out["eval"]
    assert all(k in out["eval"] for k in ("baselines: majority", "nearest visible frame", "mfcc", "log-mel"))
    # the rest in-process (a subprocess costs seconds of imports): features, probes, iteration 2
    d = tmp_path / "run"
    def cfg_for(**kw):
        return common.parse_config(wavlm.Config, wavlm.PRESETS, [f"--{k}={v}" for k, v in kw.items()],
                                   modes=("train", "features", "probe"))
    wavlm.features(cfg_for(mode="features", init_from=f"{d}/ckpt.pt", feature_layer=1,
                           feature_splits="val,test"))
    index = json.load(open(d / "features" / "index.json"))
    assert index["frame_rate"] == 50 and index["dim"] == 32 and index["layer"] == 1 and index["items"]
    it = index["items"][0]
    f = np.load(d / "features" / it["path"])
    assert f.shape == (it["frames"], 32) and f.dtype == np.float32
    assert it["frames"] == wavlm.num_frames(wavlm.Config(), round(it["seconds"] * 16000))
    # the official format, no preset flag: the size comes from the file
    torch.save(wavlm.to_official(wavlm.WavLM(tiny_cfg(layers=3))), tmp_path / "WavLM-tiny.pt")
    wavlm.features(cfg_for(mode="features", init_from=f"{tmp_path}/WavLM-tiny.pt", out_dir=f"{tmp_path}/off",
                           feature_splits="test", feature_layer=3))
    assert json.load(open(tmp_path / "off" / "features" / "index.json"))["dim"] == 32
    res = wavlm.probe(cfg_for(mode="probe", init_from=f"{d}/ckpt.pt"))
    assert {("clean", "mfcc"), ("mixed", "layer2"), ("clean", "majority")} <= set(res)
    assert all(0 <= a <= 1 for v in res.values() for a in v) and res[("mixed", "majority")][1] == 0.5
    # HuBERT iteration 2: re-cluster the first model's layer-1 features, train a fresh model on them
    wavlm.train(cfg_for(preset="tiny", device="cpu", max_iters=2, targets="features", teacher=f"{d}/ckpt.pt",
                        target_layer=1, out_dir=f"{tmp_path}/it2"))
    ck = torch.load(tmp_path / "it2" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 2 and ck["models"]["km"]["centroids"].shape == (8, 32) and "teacher" in ck["models"]


def test_bad_input_gives_one_error_line(tmp_path):
    for flags, msg in ((["--targets=hubert"], "--targets must be"), (["--targets=features"], "--teacher"),
                       (["--mix_max_frac=0.8"], "mix_max_frac"), (["--segment=1000"], "--segment"),
                       (["--teacher=/nonexistent.pt"], "does not exist")):
        with pytest.raises(SystemExit, match=msg):   # Config.validate, through parse_config (no subprocess)
            common.parse_config(wavlm.Config, wavlm.PRESETS, ["--preset=tiny", *flags],
                                modes=("train", "sample", "eval", "bench", "features", "probe"))
    # errors past parse_config, in a real process: one line, no traceback
    assert "needs a model" in error_of("wavlm.py", "--preset=tiny", "--mode=eval")
    torch.save(wavlm.to_official(wavlm.WavLM(tiny_cfg())), tmp_path / "WavLM-tiny.pt")
    line = error_of("wavlm.py", "--preset=tiny", "--dim=64", "--max_iters=1",
                    f"--init_from={tmp_path}/WavLM-tiny.pt", f"--out_dir={tmp_path}/x")
    assert "--dim=32" in line, line
    # load_for_inference checks the file before common.setup prints anything, so these are one line too
    bad = tmp_path / "junk.pt"
    torch.save({"foo": torch.zeros(1)}, bad)
    for mode, path, msg in (("features", bad, "neither"),
                            ("eval", tmp_path / "WavLM-tiny.pt", "no head or targets")):
        with pytest.raises(SystemExit, match=msg):
            wavlm.load_for_inference(tiny_cfg(mode=mode, init_from=str(path)))
