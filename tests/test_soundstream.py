"""Tests for soundstream.py: sizes and bitrates, causality, streaming == offline, the RVQ, quantizer dropout,
FiLM, the discriminators, a golden training step against a literal transcription of §III-E, and the command
line.

What pins each loss term, sampler, quantizer rule and schedule of soundstream.py (a codec: no target shift):
- D hinge 1/K Σ mean relu(1 - D(x)) + relu(1 + D(x̂)): test_hinge_losses_by_hand (hand values),
  test_golden_train_step
- G adversarial hinge and feature matching (mean |D^l(x) - D^l(x̂)| over K·L maps): the same two tests
- multi-scale mel reconstruction (L1 + α_s·log-L2, averaged over frames, ours) and λ_rec:
  test_golden_train_step (transcribed; the mel filterbank itself is common.mel_spectrogram, pinned in
  test_common), test_loss_balance_at_init (gradient-norm ratios at init within the bands the Config comment
  states)
- waveform L1 λ_time (ours): test_golden_train_step, test_disc_warmup_trains_the_codec_on_reconstruction_alone
- disc warm-up schedule (ours): test_disc_warmup_trains_the_codec_on_reconstruction_alone (D still, hand SGD
  step)
- quantizer warm-up schedule: test_quantizer_warmup_bypasses_then_quantizes
- quantizer dropout n_q ~ U{1..N_q} per example: test_quantizer_dropout_draws_every_n_q_uniformly; its mask
  and the straight-through estimator: test_rvq_training_forward_dropout_mask_and_straight_through
- RVQ (Alg. 1): test_rvq_encode_is_residual_quantization_and_error_decreases (against literal_rvq)
- EMA codebook update over the examples that use a layer:
  test_ema_update_counts_only_the_examples_that_use_a_layer
- dead codes: test_dead_codes_are_reseeded_from_the_batch; threshold x dropout share and the grace in steps:
  test_dead_code_threshold_scales_with_dropout_share_and_reseeded_code_keeps_its_grace
- k-means one level per step: test_kmeans_initialises_one_level_per_step_on_that_steps_residual
- noise / denoise-flag pairs (target = clean iff the flag): test_denoising_pairs; FiLM:
  test_film_neutral_is_identity_and_sides
- the decoder uses the latent: test_tiny_codec_overfits_one_batch_and_its_decoder_uses_the_latent
- lr: constant (no schedule); no host reads / compiled == eager:
  test_train_step_reads_nothing_back_from_the_device,
  test_compiled_train_step_equals_eager_without_host_sync"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import common
import soundstream as S
from cli import check_cli_contract, finish_script, start_script


def error_line(run):
    """A command that must fail (a start_script run): non-zero exit, no traceback; returns its "error: ..." line
    (stderr), which cli.error_of would miss when log lines follow on stdout."""
    p = finish_script(run, check=False)
    out = p.stderr + p.stdout
    assert p.returncode != 0 and "Traceback" not in out, out[-3000:]
    lines = [l for l in out.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, out[-3000:]
    return lines[0]


def make_cfg(preset="tiny", **kw):
    return common.parse_config(S.Config, S.PRESETS, [f"--preset={preset}", "--device=cpu"] +
                               [f"--{k}={v}" for k, v in kw.items()])


def runtime(cfg):
    return common.Runtime(torch.device("cpu"), "cpu", torch.float32)


def random_codebooks(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for layer in model.quantizer.layers:
        layer.embed.copy_(torch.randn(layer.embed.shape, generator=g) * 0.1)
        layer.embed_avg.copy_(layer.embed)
        layer.cluster_size.fill_(1.0)
        layer.inited.fill_(1)
    return model


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = make_cfg(**kw)
    return random_codebooks(S.SoundStream(cfg), seed).eval(), cfg

# ----------------------------------------------------------------------------- sizes and bitrates

def test_paper_config_sizes_and_bitrates():
    cfg = make_cfg("paper")
    with torch.device("meta"):  # shapes only: no memory, no init time
        G, D = S.SoundStream(cfg), S.Discriminators(cfg)
    # no official weights exist (Lyra ships TFLite): these are the counts of the paper's layout as built here,
    # C = 32, D = 128, N_q = 24 x 1024 (the README table); a layout change must be deliberate
    assert common.count_params(G.encoder) == 4_788_352
    assert common.count_params(G.decoder) == 5_050_369
    assert common.count_params(G.film) == 2 * 128
    assert common.count_params(D.stft) == 5_547_585
    assert common.count_params(D.waves) == 16_924_086
    # one residual unit, by hand: conv k7 (C -> C) and conv k1 (C -> C), with biases
    C = 32
    assert common.count_params(G.encoder.blocks[0].res[0]) == C * C * 7 + C + C * C + C
    # channels double per block from C to 16C; 75 Hz at 24 kHz; 10 bits per code
    assert [b.down.cout for b in G.encoder.blocks] == [64, 128, 256, 512]
    assert G.hop == 320 and G.frame_rate == 75 and G.bits == 10
    assert [G.n_q_for(b) for b in (3, 6, 12, 18)] == [4, 8, 16, 24]
    assert [G.kbps(n) for n in (4, 8, 16, 24)] == [3.0, 6.0, 12.0, 18.0]
    assert len(G.quantizer.layers) == 24 and G.quantizer.layers[0].embed.shape == (1024, 128)
    z = G.encoder(torch.randn(1, 1, 24000, device="meta"))
    assert z.shape == (1, 128, 75)


def test_bitrate_arithmetic_is_logged(capsys):
    cfg = make_cfg("paper", n_filters=1, dimension=4, wave_channels=1, stft_channels=1)  # the paper's RVQ, narrow nets
    S.build(cfg, runtime(cfg))
    out = capsys.readouterr().out
    assert "75 Hz x 10 bits x n_q" in out and "3 kbps at n_q=4" in out and "18 kbps at n_q=24" in out

# ----------------------------------------------------------------------------- causality and streaming

def test_codec_is_causal():
    model, cfg = tiny_model()
    x = torch.randn(1, 1, 320 * 12) * 0.1
    t0 = 320 * 7 + 123
    x2 = x.clone()
    x2[..., t0:] = torch.randn(x.shape[-1] - t0) * 0.5
    y, y2 = model.decode(model.encode(x, 4)), model.decode(model.encode(x2, 4))
    keep = t0 // 320 * 320  # the frames completed before t0 cannot move
    assert torch.equal(y[..., :keep], y2[..., :keep])
    assert not torch.equal(y[..., keep:], y2[..., keep:])  # (and the change does reach the output)
    # the continuous path too (no quantization hides a leak)
    model.quantizer.warmup, model.quantizer.steps.zero_()
    z, z2 = model.encoder(x), model.encoder(x2)
    assert torch.equal(z[..., :t0 // 320], z2[..., :t0 // 320])


@pytest.mark.parametrize("film", ["encoder", "decoder"])
def test_streaming_equals_offline(film):
    model, cfg = tiny_model(film=film)
    torch.manual_seed(1)
    with torch.no_grad():  # trained biases are not zero: the transposed convs' overlap-add must count them once
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
                m.bias.normal_(0, 0.1)
    T = 320 * 10
    x = torch.randn(2, 1, T) * 0.1
    cond = torch.tensor([0.0, 1.0])
    with torch.no_grad():
        model.film.gamma.normal_()
        model.film.beta.normal_()
    codes = model.encode(x, 3, cond)
    y = model.decode(codes, cond)
    enc_state, dec_state, got_codes, got_y = {}, {}, [], []
    for a, b in ((0, 1), (1, 700), (700, 701), (701, 2000), (2000, T)):  # odd chunks, one of 1 sample
        c = model.encode_stream(x[..., a:b], enc_state, 3, cond)
        got_codes.append(c)
    got_codes = torch.cat(got_codes, -1)
    assert torch.equal(got_codes, codes)
    for a, b in ((0, 1), (1, 4), (4, 4), (4, 10)):  # code chunks of 1, 3, 0 and 6 frames
        got_y.append(model.decode_stream(codes[..., a:b], dec_state, cond))
    torch.testing.assert_close(torch.cat(got_y, -1), y, rtol=1e-5, atol=1e-6)

# ----------------------------------------------------------------------------- the RVQ

def literal_rvq(z, layers, n_q):
    """Alg. 1 written out: r = z; for each codebook: code = argmin ||r - e||, r -= e[code]."""
    B, D, T = z.shape
    r, codes, out = z.permute(0, 2, 1).reshape(-1, D).clone(), [], 0
    for layer in layers[:n_q]:
        d = torch.cdist(r, layer.embed)
        c = d.argmin(-1)
        codes.append(c)
        out = out + layer.embed[c]
        r = r - layer.embed[c]
    return torch.stack(codes, 1).view(B, T, n_q).permute(0, 2, 1), out.view(B, T, D).permute(0, 2, 1)


def test_rvq_encode_is_residual_quantization_and_error_decreases():
    model, cfg = tiny_model()
    q = model.quantizer
    z = torch.randn(3, cfg.dimension, 11) * 0.1
    codes = q.encode(z, cfg.n_q)
    ref_codes, ref_out = literal_rvq(z, q.layers, cfg.n_q)
    assert torch.equal(codes, ref_codes)
    assert codes.min() >= 0 and codes.max() < cfg.codebook_size and codes.dtype == torch.long
    torch.testing.assert_close(q.decode(codes), ref_out, rtol=1e-5, atol=1e-6)
    for layer in q.layers:  # with a zero codeword a layer can always leave the residual as it is...
        layer.embed[0] = 0
    errs = [(z - q.decode(q.encode(z, n))).pow(2).sum().item() for n in range(1, cfg.n_q + 1)]
    assert all(b <= a + 1e-9 for a, b in zip(errs, errs[1:])), errs  # ...so more codebooks never hurt
    assert errs[-1] < errs[0] * 0.9 and errs[0] < z.pow(2).sum().item()


def test_rvq_training_forward_dropout_mask_and_straight_through():
    model, cfg = tiny_model()
    q = model.quantizer.train()
    z = (torch.randn(3, cfg.dimension, 5) * 0.1).requires_grad_()
    n_q = torch.tensor([1, 3, 4])
    ref = [literal_rvq(z[b:b + 1].detach(), q.layers, int(n))[1] for b, n in enumerate(n_q)]  # before the EMA moves
    out, codes = q(z, n_q)
    torch.testing.assert_close(out, torch.cat(ref), rtol=1e-5, atol=1e-6)
    assert (codes[0, 1:] == -1).all() and (codes[1, 3:] == -1).all() and (codes[2] >= 0).all()  # unused layers: -1
    w = torch.randn_like(out)
    (out * w).sum().backward()
    assert torch.equal(z.grad, w)  # straight-through: the decoder's gradient reaches the encoder unchanged


def test_ema_update_counts_only_the_examples_that_use_a_layer():
    model, cfg = tiny_model()
    layer = model.quantizer.layers[1].train()
    before_size, before_avg = layer.cluster_size.clone(), layer.embed_avg.clone()
    layer.threshold = -1.0  # no dead-code reset in this test
    x = torch.randn(6, cfg.dimension) * 0.1
    active = torch.tensor([True, False, True, True, False, True])
    _, codes = layer(x, active)
    onehot = F.one_hot(codes, cfg.codebook_size).float() * active[:, None].float()
    d = cfg.ema_decay
    torch.testing.assert_close(layer.cluster_size, d * before_size + (1 - d) * onehot.sum(0))
    torch.testing.assert_close(layer.embed_avg, d * before_avg + (1 - d) * onehot.t() @ x)
    n = layer.cluster_size.sum()
    smoothed = (layer.cluster_size + 1e-5) / (n + cfg.codebook_size * 1e-5) * n
    torch.testing.assert_close(layer.embed, layer.embed_avg / smoothed[:, None])


def test_dead_codes_are_reseeded_from_the_batch():
    model, cfg = tiny_model()
    layer = model.quantizer.layers[0].train()
    layer.cluster_size.fill_(10.0)
    layer.cluster_size[3] = 0.0  # code 3 unused
    layer.embed[3] = 100.0  # far away: never picked
    x = torch.randn(40, cfg.dimension) * 0.1
    layer(x, torch.ones(40, dtype=torch.bool))
    assert (layer.embed[3] - x).abs().sum(1).min() < 1e-6  # now one of the batch's vectors
    assert layer.cluster_size[3] >= layer.threshold
    assert (layer.cluster_size[torch.arange(cfg.codebook_size) != 3] > layer.threshold).all()


def test_dead_code_threshold_scales_with_dropout_share_and_reseeded_code_keeps_its_grace():
    # under quantizer dropout, layer i is reached by a share (N_q - i) / N_q of the examples: its threshold is
    # cfg.dead_code_threshold times that share; a re-seeded code that is never picked again survives exactly
    # cfg.dead_code_grace steps (usage reset to threshold / decay^(grace + 1/2)) and is re-drawn on the next
    grace, thr, d = 7, 0.5, 0.9
    model, cfg = tiny_model(dead_code_grace=grace, dead_code_threshold=thr, ema_decay=d)
    layers = model.quantizer.layers
    for i, layer in enumerate(layers):
        assert layer.threshold == pytest.approx(thr * (cfg.n_q - i) / cfg.n_q)
    nodrop, _ = tiny_model(dead_code_grace=grace, dead_code_threshold=thr, quantizer_dropout=False)
    assert all(l.threshold == pytest.approx(thr) for l in nodrop.quantizer.layers)
    layer = layers[3].train()  # the deepest layer: a quarter of the examples reach it
    K = cfg.codebook_size
    layer.cluster_size.fill_(1e6)  # every other code very much alive
    layer.cluster_size[5] = 0.0  # code 5 dead now
    layer.embed_avg.copy_(layer.embed * layer.cluster_size[:, None])
    torch.manual_seed(0)
    xs = [torch.randn(32, cfg.dimension) * 0.1 for _ in range(grace + 2)]
    active = torch.arange(32) % 4 == 0  # one row in four uses this layer
    layer(xs[0], active)
    seeded = layer.embed[5].clone()
    assert (seeded - xs[0]).abs().sum(1).min() < 1e-6  # re-seeded from the batch
    assert layer.cluster_size[5].item() == pytest.approx(layer.threshold * d ** -(grace + 0.5), rel=1e-5)
    for s in range(1, grace + 2):
        layer.embed[5] = 1e3  # keep it out of every nearest-neighbour search: never used
        layer.embed_avg[5] = 1e3 * layer.cluster_size[5]
        layer(xs[s], active)
        redrawn = (layer.embed[5] - xs[s]).abs().sum(1).min() < 1e-6
        assert redrawn == (s == grace + 1), (s, layer.cluster_size[5].item(), layer.threshold)


def first_training_steps(model, n, seed=0):
    """n training forwards of a fresh model on random batches: which layers are initialised after each."""
    torch.manual_seed(seed)
    states = []
    for _ in range(n):
        x = torch.randn(2, 1, 320 * 8) * 0.1
        model(x, torch.tensor([1, 4]), torch.zeros(2))
        states.append([int(l.inited.item()) for l in model.quantizer.layers])
    return states


def test_kmeans_initialises_one_level_per_step_on_that_steps_residual():
    torch.manual_seed(0)
    cfg = make_cfg()
    model = S.SoundStream(cfg).train()
    assert all(l.inited.item() == 0 for l in model.quantizer.layers)
    # one level per step, whatever n_q drew (the example with n_q = 1 uses only level 0, yet level 1 is next)
    want = [[1] * (i + 1) + [0] * (cfg.n_q - i - 1) for i in range(cfg.n_q)]
    assert first_training_steps(model, cfg.n_q) == want
    e = model.quantizer.layers[0].embed
    assert torch.unique(e, dim=0).shape[0] > 1  # k-means found several codes, not one
    # level 1 was initialised on the residual of step 2 (level 0 fixed by then): its codewords are that
    # residual's k-means centroids, so they are not all zero (an all-zero first batch residual would give
    # zeros)
    assert model.quantizer.layers[1].embed.abs().sum() > 0
    # during those steps, a level not yet initialised gives no codes (-1) and adds nothing
    fresh = S.SoundStream(cfg).train()
    torch.manual_seed(1)
    x = torch.randn(2, 1, 320 * 8) * 0.1
    out, codes = fresh(x, torch.tensor([4, 4]), torch.zeros(2))
    assert (codes[:, 0] >= 0).all() and (codes[:, 1:] == -1).all()


def test_quantizer_warmup_bypasses_then_quantizes():
    torch.manual_seed(0)
    cfg = make_cfg(quantizer_warmup=2)
    model = S.SoundStream(cfg).train()
    x = torch.randn(2, 1, 320 * 4) * 0.1
    for _ in range(2):  # train_step asks tick() whether this step quantizes
        _, codes = model(x, torch.tensor([4, 4]), torch.zeros(2), model.quantizer.tick())
        assert codes is None and model.quantizer.layers[0].inited.item() == 0
    _, codes = model(x, torch.tensor([4, 4]), torch.zeros(2), model.quantizer.tick())
    assert codes is not None and model.quantizer.layers[0].inited.item() == 1
    assert int(model.quantizer.steps) == 3  # the checkpointed count follows the host-side one
    model.quantizer.load_state_dict(model.quantizer.state_dict())  # a load re-reads the buffer: no drift
    assert model.quantizer._steps is None and model.quantizer.tick() and int(model.quantizer.steps) == 4

# ----------------------------------------------------------------------------- quantizer dropout and data

class _Sampler:
    def __init__(self, cfg):
        self.cfg = cfg

    def next(self):
        return torch.randn(self.cfg.batch_size, self.cfg.segment) * 0.1, None


def test_quantizer_dropout_draws_every_n_q_uniformly():
    cfg = make_cfg("paper", batch_size=64, segment=1024, stft_window=256, mel_scales="6,7")
    torch.manual_seed(0)
    rt = runtime(cfg)
    draws = torch.cat([S.get_batch(_Sampler(cfg), cfg, rt)["n_q"] for _ in range(60)])  # 3840 draws
    counts = torch.bincount(draws, minlength=cfg.n_q + 1)
    assert counts[0] == 0 and set(draws.tolist()) == set(range(1, cfg.n_q + 1))  # 1..24, the last one included
    expected = len(draws) / cfg.n_q
    chi2 = ((counts[1:].float() - expected) ** 2 / expected).sum().item()
    assert chi2 < 60, chi2  # 23 degrees of freedom: p ~ 1e-4
    assert len(set(draws[:64].tolist())) > 10  # drawn per example, not per batch
    single = make_cfg("paper", batch_size=8, segment=1024, stft_window=256, mel_scales="6,7", quantizer_dropout=False)
    assert (S.get_batch(_Sampler(single), single, rt)["n_q"] == 24).all()


def test_denoising_pairs():
    cfg = make_cfg(batch_size=256, noise_prob=0.5, denoise_prob=0.5)
    torch.manual_seed(0)
    sampler = _Sampler(cfg)
    torch.manual_seed(1)
    clean = sampler.next()[0].view(cfg.batch_size, 1, -1)
    torch.manual_seed(1)
    b = S.get_batch(sampler, cfg, runtime(cfg))
    noisy = (b["x"] != clean).flatten(1).any(1)
    on = b["cond"] == 1
    assert 0.3 < noisy.float().mean() < 0.7 and 0.3 < on.float().mean() < 0.7
    assert torch.equal(b["target"][on], clean[on])  # denoise on: the clean signal is the target
    assert torch.equal(b["target"][~on], b["x"][~on])  # off: reproduce the input, noise and all
    snr = 10 * torch.log10(clean[noisy].pow(2).sum(-1) / (b["x"][noisy] - clean[noisy]).pow(2).sum(-1))
    assert snr.min() > cfg.snr_range[0] - 0.5 and snr.max() < cfg.snr_range[1] + 0.5
    plain = make_cfg(batch_size=8, film="none")
    b = S.get_batch(_Sampler(plain), plain, runtime(plain))
    assert torch.equal(b["x"], b["target"]) and (b["cond"] == 0).all()

# ----------------------------------------------------------------------------- FiLM

@pytest.mark.parametrize("side", ["encoder", "decoder"])
def test_film_neutral_is_identity_and_sides(side):
    model, cfg = tiny_model(film=side)
    torch.manual_seed(3)
    plain = S.SoundStream(make_cfg(film="none"))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("film.")})
    plain.eval()
    with torch.no_grad():
        model.film.gamma.normal_()
        model.film.beta.normal_()
    x = torch.randn(2, 1, 320 * 6) * 0.1
    off, on = torch.zeros(2), torch.ones(2)
    assert torch.equal(model.film(torch.ones(2, cfg.dimension, 3), off), torch.ones(2, cfg.dimension, 3))
    assert torch.equal(model.decode(model.encode(x, 4, off), off), plain.decode(plain.encode(x, 4)))
    z = model.encoder(x)
    if side == "encoder":  # the flag changes what is transmitted
        assert not torch.equal(model.encode(x, 4, on), model.encode(x, 4, off))
    else:  # the codes are the same; the flag acts at the receiver
        codes = model.encode(x, 4, on)
        assert torch.equal(codes, model.encode(x, 4, off))
        assert not torch.equal(model.decode(codes, on), model.decode(codes, off))
    g, b = model.film.gamma[None, :, None], model.film.beta[None, :, None]
    torch.testing.assert_close(model.film(z, on), z * (1 + g) + b)

# ----------------------------------------------------------------------------- discriminators

def test_stft_discriminator_input_layout_and_shapes():
    cfg = make_cfg("paper")
    d = S.STFTDiscriminator(cfg)
    x = torch.randn(2, 1, 24000)
    spec = d.spectrogram(x)
    ref = torch.stft(x[:, 0], 1024, 256, window=torch.hann_window(1024), center=False, return_complex=True)
    frames = 1 + (24000 - 1024) // 256
    assert spec.shape == (2, 2, frames, 512)  # (B, real/imag, time, frequency)
    torch.testing.assert_close(spec[:, 0], ref.real[:, :512].transpose(1, 2))
    torch.testing.assert_close(spec[:, 1], ref.imag[:, :512].transpose(1, 2))
    logits, fmap = d(x)
    assert logits.shape == (2, 1, frames // 8, 1)  # frequency collapsed: 1-D logits over time
    assert [f.shape[1] for f in fmap] == [32, 64, 128, 128, 256, 256, 512]  # C, then m*N per unit
    assert [f.shape[3] for f in fmap] == [512, 256, 128, 64, 32, 16, 8]  # every unit halves frequency
    D = S.Discriminators(make_cfg("paper", wave_channels=1, stft_channels=1))
    logits, fmaps = D(x)
    assert len(logits) == 4 and len(fmaps) == 4  # STFT + waveform at 3 scales
    assert [l.shape[-1] for l in logits[1:]] == [94, 47, 24]  # the waveform at 1x, 1/2x, 1/4x, /256 each


def test_hinge_losses_by_hand():
    r, f = [torch.tensor([2.0, 0.5, -1.0])], [torch.tensor([-2.0, 0.5, 1.0])]
    # relu(1 - r) = [0, .5, 2], relu(1 + f) = [0, 1.5, 2]
    assert S.discriminator_loss(r, f).item() == pytest.approx((2.5 + 3.5) / 3)
    assert S.generator_adv_loss(f).item() == pytest.approx((3 + 0.5 + 0) / 3)
    fr, ff = [[torch.ones(2, 3)], [torch.zeros(4)]], [[torch.zeros(2, 3)], [torch.full((4,), 3.0)]]
    assert S.feature_loss(fr, ff).item() == pytest.approx((1 + 3) / 2)

# ----------------------------------------------------------------------------- the golden step

def literal_objective_step(G, D, batch, cfg, lr_g, lr_d):
    """§3.4 written out from the paper's formulas, on copies of the models: one SGD step of D on the hinge loss,
    then one SGD step of G against the UPDATED D. Returns the losses and the new parameters."""
    x, y, n_q, cond = batch["x"], batch["target"], batch["n_q"], batch["cond"]
    torch.manual_seed(123)
    y_hat, _ = G(x, n_q, cond, G.quantizer.tick())  # (tick: the step count the checkpoint keeps; no warm-up here)
    lr_, _ = D(y)
    lf_, _ = D(y_hat.detach())
    K = len(lr_)
    loss_d = sum(torch.clamp(1 - r, min=0).mean() + torch.clamp(1 + f, min=0).mean() for r, f in zip(lr_, lf_)) / K
    dp = [p for p in D.parameters()]
    for p, g in zip(dp, torch.autograd.grad(loss_d, dp, allow_unused=True)):
        if g is not None:
            p.data -= lr_d * g
    lf2, fmap_fake = D(y_hat)
    _, fmap_real = D(y)
    adv = sum(torch.clamp(1 - f, min=0).mean() for f in lf2) / K
    pairs = [(a.detach(), b) for fa, fb in zip(fmap_real, fmap_fake) for a, b in zip(fa, fb)]
    feat = sum((a - b).abs().mean() for a, b in pairs) / len(pairs)
    rec = 0.0
    for s in [2 ** i for i in cfg.mel_scales]:
        Sx = common.mel_spectrogram(y, cfg.sample_rate, n_fft=s, hop=s // 4, n_mels=64, log=None)[:, 0]  # (B, 64, t)
        Sy = common.mel_spectrogram(y_hat, cfg.sample_rate, n_fft=s, hop=s // 4, n_mels=64, log=None)[:, 0]
        l1 = (Sx - Sy).abs().mean(dim=(1, 2))  # ours: mean over bins and frames (the paper sums over frames)
        dlog = torch.log(Sx.clamp(min=1e-5)) - torch.log(Sy.clamp(min=1e-5))
        l2 = torch.sqrt((dlog ** 2).sum(1) + 1e-12).mean(1)
        rec = rec + (l1 + math.sqrt(s / 2) * l2).mean()
    rec = rec / len(cfg.mel_scales)
    time = (y - y_hat).abs().mean()  # the waveform L1 (ours, EnCodec's ℓ_t)
    loss_g = 1.0 * adv + 100.0 * feat + 0.04 * rec + cfg.lambda_time * time  # λ_adv, λ_feat §III-E; λ_rec ours
    gp = [p for p in G.parameters()]
    for p, g in zip(gp, torch.autograd.grad(loss_g, gp, allow_unused=True)):
        if g is not None:
            p.data -= lr_g * g
    return dict(d=loss_d, adv=adv, feat=feat, rec=rec, time=time, g=loss_g)


def test_golden_train_step():
    cfg = make_cfg(lambda_time=3.0)
    rt = runtime(cfg)
    torch.manual_seed(0)
    state = S.build(cfg, rt)
    with torch.no_grad():  # a FiLM that does something, so its gradient is checked too
        state["G"].film.gamma.normal_()
        state["G"].film.beta.normal_()
    torch.manual_seed(7)
    clean = torch.randn(2, 1, cfg.segment) * 0.1
    batch = dict(x=clean + 0.01 * torch.randn_like(clean), target=clean, cond=torch.tensor([0.0, 1.0]),
                 n_q=torch.tensor([1, 3]))
    lr_g, lr_d = 1e-7, 1e-2
    G_ref, D_ref = copy.deepcopy(state["G"]), copy.deepcopy(state["D"])
    ref = literal_objective_step(G_ref, D_ref, batch, cfg, lr_g, lr_d)
    state["opt_g"] = torch.optim.SGD(state["G"].parameters(), lr=lr_g)
    state["opt_d"] = torch.optim.SGD(state["D"].parameters(), lr=lr_d)
    torch.manual_seed(123)
    got = S.train_step(state, batch, cfg, rt)
    for k in ("d", "adv", "feat", "rec", "time", "g"):
        assert got[k].item() == pytest.approx(ref[k].item(), rel=1e-5, abs=1e-6), k
    for name, a, b in (("D", state["D"], D_ref), ("G", state["G"], G_ref)):
        sa, sb = a.state_dict(), b.state_dict()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-7, msg=f"{name}.{k} after the step")
    assert got["d"].item() > 0 and got["rec"].item() > 0


def test_disc_warmup_trains_the_codec_on_reconstruction_alone():
    # the first cfg.disc_warmup steps (ours, small preset): D untouched, the codec's loss is λ_rec·rec +
    # λ_time·L1
    cfg = make_cfg(disc_warmup=2, lambda_time=3.0)
    rt = runtime(cfg)
    torch.manual_seed(0)
    state = S.build(cfg, rt)
    x = torch.randn(2, 1, cfg.segment) * 0.1
    batch = dict(x=x, target=x, cond=torch.zeros(2), n_q=torch.tensor([4, 4]))
    d0 = copy.deepcopy(state["D"].state_dict())
    # step 1 by hand: one SGD step of the codec on 0.04·rec + 3·mean|y - ŷ| (a missing term changes the
    # weights)
    state["opt_g"] = torch.optim.SGD(state["G"].parameters(), lr=1e-2)
    G_ref = copy.deepcopy(state["G"])
    torch.manual_seed(5)
    y_hat, _ = G_ref(x, batch["n_q"], batch["cond"], G_ref.quantizer.tick())
    loss = 0.04 * S.reconstruction_loss(x, y_hat, cfg) + 3.0 * (x - y_hat).abs().mean()
    gp = list(G_ref.parameters())
    for p_, g in zip(gp, torch.autograd.grad(loss, gp, allow_unused=True)):
        if g is not None:
            p_.data -= 1e-2 * g
    for step in (1, 2, 3):
        torch.manual_seed(5)
        got = S.train_step(state, batch, cfg, rt)
        if step == 1:
            for (k, a), b in zip(state["G"].state_dict().items(), G_ref.state_dict().values()):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=k)
        moved = any(not torch.equal(v, state["D"].state_dict()[k]) for k, v in d0.items())
        assert moved == (step == 3), step
        if step <= 2:
            assert got["adv"].item() == 0 and got["d"].item() == 0
            want = 0.04 * got["rec"].item() + 3.0 * got["time"].item()
            assert got["g"].item() == pytest.approx(want, rel=1e-6)


class NoHostReads:
    """Inside: our Python asking a tensor for a host value (.item(), bool(), int(), float(), .tolist(), .cpu(),
    .numpy()) raises. On a GPU each of these waits for the device to finish (a stall in every step)."""
    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}
        for n in self.NAMES:
            setattr(torch.Tensor, n, self._trap(n))

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)

    @staticmethod
    def _trap(name):
        def trap(*args, **kwargs):
            raise AssertionError(f"host read in a training step: Tensor.{name}")
        return trap


def test_train_step_reads_nothing_back_from_the_device():
    # the steady-state step (codebooks initialised, quantizer on, dead codes being reset) with SGD, whose step()
    # reads no step counter: not one tensor value travels to the host
    cfg = make_cfg(dead_code_threshold=1e9)  # every code dead every step: the reset path runs
    rt = runtime(cfg)
    torch.manual_seed(0)
    state = S.build(cfg, rt)
    x = torch.randn(2, 1, cfg.segment) * 0.1
    batch = dict(x=x, target=x, cond=torch.tensor([0.0, 1.0]), n_q=torch.tensor([1, 3]))
    for _ in range(cfg.n_q):  # k-means (one level per step), the first read of the step count: once per run
        S.train_step(state, batch, cfg, rt)
    state["opt_g"] = torch.optim.SGD(state["G"].parameters(), lr=1e-6)
    state["opt_d"] = torch.optim.SGD(state["D"].parameters(), lr=1e-6)
    before = state["G"].quantizer.layers[0].embed.clone()
    with NoHostReads():
        S.train_step(state, batch, cfg, rt)
    assert not torch.equal(before, state["G"].quantizer.layers[0].embed)


def test_compiled_train_step_equals_eager_without_host_sync():
    # torch.compile forced on, on the CPU. After the one k-means (eager, first step), the codec's training forward
    # (encoder, FiLM, RVQ with its EMA and masked dead-code updates, decoder) and the discriminators each trace as
    # ONE graph (fullgraph=True: an .item(), `if dead.any()` or a data-dependent shape would break it: a GPU step
    # would stall there), through AOTAutograd (forward + backward; backend aot_eager: inductor's graph capture
    # without its minutes of C++ codegen on this CPU); two train_steps then give the eager losses and weights.
    cfg = make_cfg(compile=True)
    assert cfg.compile
    rt = runtime(cfg)
    torch.manual_seed(0)
    state = S.build(cfg, rt)
    torch.manual_seed(1)
    x = torch.randn(2, 1, cfg.segment) * 0.1
    batch = dict(x=x, target=x, cond=torch.tensor([0.0, 1.0]), n_q=torch.tensor([1, 3]))
    for _ in range(cfg.n_q):  # k-means, one level per step: the first N_q steps of a run, eager
        S.train_step(state, batch, cfg, rt)
    ref = copy.deepcopy(state)
    run = dict(state, G=torch.compile(state["G"], backend="aot_eager", fullgraph=True),
               D=torch.compile(state["D"], backend="aot_eager", fullgraph=True))
    for s in range(2):
        torch.manual_seed(10 + s)
        got = S.train_step(run, batch, cfg, rt)
        torch.manual_seed(10 + s)
        want = S.train_step(ref, batch, cfg, rt)
        for k in ("d", "g", "adv", "feat", "rec"):
            assert got[k].item() == pytest.approx(want[k].item(), rel=1e-4, abs=1e-6), (s, k)
    for name in ("G", "D"):
        sa, sb = state[name].state_dict(), ref[name].state_dict()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-6, msg=f"{name}.{k}")


def test_tiny_codec_overfits_one_batch_and_its_decoder_uses_the_latent():
    cfg = make_cfg(lr=3e-3, disc_warmup=100, n_filters=4)  # reconstruction alone, C = 4: a latent worth using
    rt = runtime(cfg)
    torch.manual_seed(0)
    state = S.build(cfg, rt)
    t = torch.arange(cfg.segment) / cfg.sample_rate
    # two different examples (a 220 Hz tone, 3 Hz tremolo; a 660 Hz one, 5 Hz): only the latent tells them
    # apart
    x = torch.stack([0.3 * torch.sin(2 * math.pi * 220 * t) * torch.sin(2 * math.pi * 3 * t),
                     0.3 * torch.sin(2 * math.pi * 660 * t) * torch.cos(2 * math.pi * 5 * t)])[:, None]
    batch = dict(x=x, target=x, cond=torch.zeros(2), n_q=torch.tensor([4, 4]))
    first = S.train_step(state, batch, cfg, rt)["rec"].item()
    for _ in range(60):
        last = S.train_step(state, batch, cfg, rt)["rec"].item()
    assert last < 0.5 * first, (first, last)
    # the decoder depends on the latent: decoding the real codes beats decoding an all-zero latent by >= 10 %
    # in the reconstruction loss (measured: 38.5 vs 46.3; a decoder that ignores its input makes the two
    # equal)
    G = state["G"].eval()
    with torch.no_grad():
        real = S.reconstruction_loss(x, G.decode(G.encode(x, cfg.n_q))[..., :x.shape[-1]], cfg).item()
        z = G.encoder(x)
        zero = S.reconstruction_loss(x, G.decoder(torch.zeros_like(z))[..., :x.shape[-1]], cfg).item()
    assert zero > 1.1 * real, (real, zero)


def test_loss_balance_at_init():
    # the docstring's claim (Config.lambda_rec): at init, on corpus speech+music in the `small` preset, the
    # gradient norm on x̂ of λ_rec·rec is 2-8x that of λ_feat·feat and >= 20x that of λ_adv·adv (measured
    # 4.0x, 108x); λ_time·L1 is 0.6-3x feat (measured 1.3x)
    cfg = make_cfg("small", corpus_hours=0.05)
    torch.manual_seed(0)
    G, D = S.SoundStream(cfg).train(), S.Discriminators(cfg)
    clips = [c for c in S.audio_clips(cfg, "train") if len(c) >= cfg.segment]
    g = torch.Generator().manual_seed(0)
    y = torch.stack([torch.from_numpy(c[o:o + cfg.segment].copy()) for c in clips[:cfg.batch_size]
                     for o in [int(torch.randint(0, len(c) - cfg.segment + 1, (1,), generator=g))]])[:, None]
    B = y.shape[0]
    y_hat, _ = G(y, torch.full((B,), cfg.n_q), torch.zeros(B), False)
    logits, fmaps = D(torch.cat([y, y_hat]))
    terms = dict(adv=cfg.lambda_adv * S.generator_adv_loss([l[B:] for l in logits]),
                 feat=cfg.lambda_feat * S.feature_loss([[f[:B] for f in fm] for fm in fmaps],
                                                       [[f[B:] for f in fm] for fm in fmaps]),
                 rec=cfg.lambda_rec * S.reconstruction_loss(y, y_hat, cfg),
                 time=cfg.lambda_time * (y - y_hat).abs().mean())
    norms = {k: torch.autograd.grad(v, y_hat, retain_graph=True)[0].flatten(1).norm(dim=1).mean().item()
             for k, v in terms.items()}
    assert 2 < norms["rec"] / norms["feat"] < 8, norms
    assert norms["rec"] / norms["adv"] > 20, norms
    assert 0.6 < norms["time"] / norms["feat"] < 3, norms  # the small preset's waveform L1 (ours)

# ----------------------------------------------------------------------------- command line

def test_cli_contract(tmp_path):
    out = check_cli_contract("soundstream.py", tmp_path,
                             bench_keys=("train_audio_s_per_s", "encode_rtf_b1_eager", "decode_rtf_b1_eager",
                                         "stream_rtf_b1_eager", "train_flops_per_step", "train_tflops"))
    assert "bitrate: 75 Hz x 4 bits x n_q" in out["train"]
    assert "eval (test) | speech_0.6kbps_si_snr" in out["eval"] and "noisy_1.2kbps_on_mel" in out["eval"]
    assert "SI-SNR" in out["sample"]


@pytest.mark.parametrize("args, needle", [
    (("--film=middle",), "--film must be"),
    (("--bitrates=5",), "not a whole number of codebooks"),
    (("--bitrates=30",), "not a whole number of codebooks"),
    (("--segment=100",), "--segment=100 is shorter"),
    (("--noise_prob=2",), "--noise_prob must lie in [0, 1]"),
    (("--stft_window=200",), "must halve 6 times"),
    (("--ema_decy=0.9",), "did you mean --ema_decay"),
])
def test_bad_flags_give_one_clear_line(args, needle):
    with pytest.raises(SystemExit) as e:  # in-process: parse_config is what the command line runs first
        make_cfg(*(), **{a[2:].split("=")[0]: a.split("=", 1)[1] for a in args})
    msg = str(e.value)
    assert msg.startswith("error:") and needle in msg and "\n" not in msg, msg


def test_bad_checkpoints_give_one_clear_line(tmp_path):
    p = tmp_path / "foreign.pt"
    torch.save({"encoder.weight": torch.zeros(3)}, p)
    runs = [start_script("soundstream.py", "--mode=eval", "--preset=tiny", "--device=cpu"),  # side by side
            start_script("soundstream.py", "--mode=sample", "--preset=tiny", "--device=cpu", f"--init_from={p}")]
    assert "needs a checkpoint" in error_line(runs[0])
    assert "not a nanoaudio checkpoint" in error_line(runs[1])
