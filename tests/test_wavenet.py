"""Tests for wavenet.py: receptive field, causality, conditioning alignment, parameter counts, Fast-WaveNet
cache == naive generation, a golden training step against a literal transcription of the paper, the lr
schedule, the sampler, overfitting through train_step, and the command line (contract, a changed --lr on
resume, bad input).

What pins each term of the paper file (expected values are written out in the tests, never taken from
wavenet.py):
- loss, cross-entropy over 256 μ-law classes (§2.2): test_golden_step (fp64 transcription of the whole
  forward)
- targets, μ-law companding f(x) = sign(x) ln(1 + mu|x|) / ln(1 + mu): test_golden_step's ref_mulaw_classes;
  the curve itself at known points: tests/test_common.py::test_mulaw_curve_pinned_by_the_paper_formula
- target shift, input = classes shifted right by one with silence (128) first: test_teacher_forcing_inputs,
  test_golden_step
- causality of the dilated convs (§2.1): test_causality, test_receptive_field_formula
- local conditioning upsampled to the sample rate, y_t conditions x_t (§2.5):
  test_upsampler_length_init_and_alignment, test_golden_step (transposed conv written as its definition)
- optimizer, Adam with clipping to grad_clip: test_golden_step (Adam by hand, then SGD with clipping active)
- schedule, linear warm-up then halving every lr_half_life steps: test_lr_schedule_in_the_scheduler,
  test_golden_step
- sampler, x_t ~ softmax(logits / T), T = 0 argmax: test_sampler_frequencies_follow_the_tempered_softmax
- cached generation (Fast WaveNet) == naive: test_cached_equals_naive,
  test_cached_generator_state_is_static_for_cuda_graphs The features (common.mel_spectrogram) are pinned
  against librosa in tests/test_common.py.
"""
import dataclasses
import math
import os

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

import common
import wavenet as W
from cli import check_cli_contract, one_line_error

CPU = common.Runtime(torch.device("cpu"), "cpu", torch.float32)


def cfg_of(preset="tiny", *flags):
    return common.parse_config(W.Config, W.PRESETS, [f"--preset={preset}", "--device=cpu", *flags])


def tiny_model(*flags, seed=0):
    torch.manual_seed(seed)
    cfg = cfg_of("tiny", "--n_speakers=3", *flags)
    return W.WaveNet(cfg).eval(), cfg


def speechlike(B, T, sr, seed=0):
    """(B, T) a chirp plus noise under an envelope that changes every few ms: mel frames differ from each other."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T) / sr
    env = 0.1 + 0.8 * torch.rand(B, T // 64 + 1, generator=g).repeat_interleave(64, 1)[:, :T]
    tone = torch.sin(2 * math.pi * (150 + 2000 * t) * t * (1 + torch.arange(B)[:, None]))
    return (env * (0.6 * tone + 0.2 * torch.randn(B, T, generator=g))).clamp(-1, 1)

# ----------------------------------------------------------------------------- architecture

def test_receptive_field_formula():
    # §2.1: k = 2, 3 repeats of 1..512 -> 3 * 1023 + 1; r9y9 mulaw256 (k = 3) -> 6139 (reference card)
    assert W.receptive_field(cfg_of("paper")) == 3070
    assert W.receptive_field(cfg_of("vocoder")) == 6139
    assert W.receptive_field(cfg_of("small")) == 511
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
    for t in (t0, 1):                                           # net input x[t] is sample t-1 (see nll_loss)
        x2 = x.clone()
        x2[:, t:] = (x2[:, t:] + 1 + torch.randint(0, 254, (B, T - t))) % 256   # rewrite the future
        out2 = model(x2, mel, spk)
        assert torch.equal(out[:, :, :t], out2[:, :, :t]), t    # the past never moves
        assert not torch.allclose(out[:, :, t:], out2[:, :, t:])
    # conditioning matters: another speaker or another mel changes the logits
    assert not torch.allclose(out, model(x, mel, torch.tensor([1, 1])))
    assert not torch.allclose(out, model(x, mel + 1, spk))


def test_param_counts():
    # vocoder preset vs r9y9 mulaw256's 4.70 M (reference card). r9y9 also has weight-norm gains (30 * 768 + 128 + 384),
    # a 5-tap conv_in over mel frames (80 * 80 * 5), a first-conv bias, a residual 1x1 in the last layer whose output
    # is never used (128 * 128 + 128), and 4 x (9 + 1) upsampler weights where ours has 4 x 25.
    n = common.count_params(W.WaveNet(cfg_of("vocoder")))
    assert n == 4_627_812
    assert n + 30 * 768 + 128 + 384 + 80 * 80 * 5 + 128 + (128 * 128 + 128) + 4 * 10 - 4 * 25 == 4_699_944  # 4.70 M
    assert abs(n / 4.70e6 - 1) < 0.02
    spk = f"--n_speakers={common.NUM_SPEAKERS}"                  # the built-in corpus's speaker table
    assert common.count_params(W.WaveNet(cfg_of("paper", spk))) == 3_767_890   # the docstring's figures
    assert common.count_params(W.WaveNet(cfg_of("small", spk))) == 243_826


def test_upsampler_length_init_and_alignment():
    model, cfg = tiny_model()
    mel = torch.randn(2, cfg.n_mels, 7)
    c = model.upsample(mel)
    assert c.shape == (2, cfg.n_mels, 7 * cfg.hop)
    # at init a constant mel upsamples to (nearly) the same constant away from the edges
    c1 = model.upsample(torch.ones(1, cfg.n_mels, 7))
    assert torch.allclose(c1[0, 2:-2, cfg.hop:-cfg.hop], torch.ones(()), atol=1e-5)
    # alignment (§2.5): frame k of mel_features is centred on sample k·hop + hop/2, and the conditioning that an
    # impulse in frame k produces is centred there too -- not a frame early or late
    wav = torch.zeros(1, 8 * cfg.hop)
    wav[0, 5 * cfg.hop + cfg.hop // 2] = 1.0                  # a click in the middle of frame 5
    assert W.mel_features(wav, cfg)[0].mean(0).argmax() == 5
    model, cfg = tiny_model("--cond_speaker=False")
    for k in (1, 3, 5):
        imp = torch.zeros(1, cfg.n_mels, 8)
        imp[:, :, k] = 1.0
        c, _ = model.conditioning(imp, None, 8 * cfg.hop)      # (1, M, 8·hop): what every layer adds
        c = c.detach()
        e = c[0].abs().sum(0)                                  # (T,)
        centre = float((e * torch.arange(e.numel())).sum() / e.sum())
        assert abs(centre - (k * cfg.hop + cfg.hop / 2)) < cfg.hop / 4, (k, centre)

# ----------------------------------------------------------------------------- generation

@pytest.mark.parametrize("flags", [(), ("--kernel_size=3",), ("--cond_mel=False",)])
def test_cached_equals_naive(flags):
    model, cfg = tiny_model(*flags)
    with torch.no_grad():          # peakier softmax so that a wrong logit would change the drawn samples
        model.head[-1].weight.mul_(20)
    B, n = 3, 120                  # n >> receptive field (15): the ring buffers wrap around many times
    mel = torch.randn(B, cfg.n_mels, 2) if cfg.cond_mel else None
    spk = torch.tensor([0, 1, 2])
    naive = W.generate(model, n, mel, spk, temperature=1.0, seed=7, method="naive")
    cached = W.generate(model, n, mel, spk, temperature=1.0, seed=7, method="cached")
    assert naive.shape == (B, n)
    assert torch.equal(naive, cached)
    assert len(torch.unique(cached)) > 10                       # a real draw, not a constant
    assert not torch.equal(cached, W.generate(model, n, mel, spk, seed=8))
    # the teacher-forced forward pass assigns every drawn sample the same distribution the cache did
    with torch.no_grad():
        logits = model(F.pad(cached[:, :-1], (1, 0), value=128), mel, spk)   # (B, Q, n); 128 = μ-law of 0
    u = torch.rand(B, n, generator=torch.Generator().manual_seed(7))
    redraw = W.draw(logits.transpose(1, 2).reshape(B * n, -1), u.reshape(-1), 1.0).view(B, n)
    assert torch.equal(redraw, cached)


def test_cached_generator_state_is_static_for_cuda_graphs():
    # a CUDA graph replays the kernels of one recorded step on the same memory: step() must only mutate the
    # preallocated tensors in place (no new state, no host read), and reset() must bring them back so a replay
    # from the start draws the same samples (the CPU-testable part of method="cudagraph")
    model, cfg = tiny_model()
    B, n = 2, 40
    mel, spk = torch.randn(B, cfg.n_mels, 1), torch.tensor([0, 2])
    u = torch.rand(B, n, generator=torch.Generator().manual_seed(4))
    c, g = model.conditioning(mel, spk, n)
    gen = W.CachedGenerator(model, u, c, g)
    state = lambda: [gen.t, gen.x, gen.out, *gen.queues]
    ptrs = [s.data_ptr() for s in state()]
    with torch.no_grad():
        for _ in range(n):
            gen.step()
        first = gen.out.clone()
        assert [s.data_ptr() for s in state()] == ptrs and int(gen.t) == n
        gen.reset()
        assert int(gen.t) == 0 and not gen.out.any() and all(not q.any() for q in gen.queues)
        for _ in range(n):
            gen.step()
    assert torch.equal(gen.out, first) and [s.data_ptr() for s in state()] == ptrs
    assert torch.equal(first, W.generate(model, n, mel, spk, seed=4))   # what generate() returns


def test_compiled_paths_equal_eager():
    # torch.compile forced on, on the CPU. Training: the model traces as ONE graph (fullgraph=True: an .item(),
    # a data-dependent branch or shape would break it, and a GPU step would stall there) through AOTAutograd
    # (forward + backward; backend aot_eager: inductor's graph capture without its minutes of C++ codegen on this
    # CPU), and train_step gives the eager loss and update. Generation: the cached step (what method="compiled"
    # compiles and CUDA graphs capture) is one graph too and draws the eager samples.
    cfg = cfg_of("tiny", "--n_speakers=3", "--compile=True", "--layers=3", "--stacks=1")   # tracing time ~ ops
    assert cfg.compile
    torch.manual_seed(0)
    eager = W.build(cfg, CPU)
    torch.manual_seed(0)
    comp = W.build(cfg, CPU)
    model = comp["model"]
    comp["model"] = torch.compile(model, backend="aot_eager", fullgraph=True)
    for seed in (1, 2):
        wav, spk = speechlike(2, cfg.segment, cfg.sample_rate, seed=seed), torch.tensor([0, 2])
        a = W.train_step(eager, (wav, spk), cfg, CPU)["bits_per_sample"]
        b = W.train_step(comp, (wav, spk), cfg, CPU)["bits_per_sample"]
        assert abs(float(a) - float(b)) < 1e-5
    for (k, p), q in zip(eager["model"].named_parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=k)
    gm = eager["model"].eval()
    mel, spk = torch.randn(2, cfg.n_mels, 1), torch.tensor([1, 2])
    u = torch.rand(2, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        gen = W.CachedGenerator(gm, u, *gm.conditioning(mel, spk, 48))
        step = torch.compile(gen.step, backend="aot_eager", fullgraph=True)
        for _ in range(48):
            step()
    assert torch.equal(gen.out, W.generate(gm, 48, mel, spk, seed=3, method="cached"))


def test_mulaw_roundtrip():
    x = torch.linspace(-1, 1, 20001)
    q = common.mulaw_quantize(x)
    assert q.min() == 0 and q.max() == 255 and (q[1:] >= q[:-1]).all()      # monotone, uses all 256 classes
    assert len(torch.unique(q)) == 256
    assert torch.equal(common.mulaw_quantize(common.mulaw_dequantize(torch.arange(256))), torch.arange(256))
    err = (common.mulaw_dequantize(q) - x).abs()
    assert err[x.abs() < 0.01].max() < 1e-3 and err.max() < 0.035
    assert int(common.mulaw_quantize(torch.zeros(()))) == 128                # the silence code

# ----------------------------------------------------------------------------- training: the golden step

def test_teacher_forcing_inputs():
    # the loss feeds the network the μ-law classes shifted right by one (silence first) and scores the unshifted
    # ones: the logit at t sees samples < t only, never the sample it predicts
    model, cfg = tiny_model()
    wav = speechlike(2, cfg.segment, cfg.sample_rate)
    seen = {}
    model.register_forward_hook(lambda m, args, out: seen.update(x=args[0], logits=out))
    loss = W.nll_loss(model, wav, torch.tensor([0, 1]), cfg)
    q = common.mulaw_quantize(wav)
    assert torch.equal(seen["x"][:, 0], torch.full((2,), 128)) and torch.equal(seen["x"][:, 1:], q[:, :-1])
    assert torch.allclose(loss, F.cross_entropy(seen["logits"], q))


def ref_mulaw_classes(x, mu):
    """§2.2 written out: f(x) = sign(x) ln(1 + mu|x|) / ln(1 + mu), then mu + 1 uniform bins over [-1, 1]."""
    f = torch.sign(x) * torch.log1p(mu * x.abs()) / math.log1p(mu)
    return torch.round((f + 1) / 2 * mu).long()


def ref_transposed_conv_time_freq(c, w, b, s):
    """A ConvTranspose2d(1, 1, (fk, 2s), stride (1, s), padding (fk//2, s//2)) written as its definition: input
    (m, n) adds w[kf, kt] into output (m + kf - fk//2, n·s + kt - s//2). c: (B, M, N) -> (B, M, N·s)."""
    B, M, N = c.shape
    fk, kt_n = w.shape
    out = torch.zeros(B, M, N * s, dtype=c.dtype)
    for kf in range(fk):
        dm = kf - fk // 2
        src = slice(max(0, -dm), M - max(0, dm))              # input bins whose output bin m + dm exists
        dst = slice(max(0, dm), M - max(0, -dm))
        for kt in range(kt_n):
            j = torch.arange(N) * s + kt - s // 2             # output times of every input frame for this tap
            ok = (j >= 0) & (j < N * s)
            out[:, dst].index_add_(2, j[ok], w[kf, kt] * c[:, src][:, :, ok])
    return out + b


def ref_logits(P, cfg, x, wav, spk):
    """WaveNet's forward from the paper's equations with the weights P (a dict of fp64 tensors), independent of
    the module code: one-hot input (§2.2), dilated causal convs (§2.1), gated units with global and local
    conditioning (§2.3, §2.5 Eq. 4-5), residual/skip 1x1s (§2.4), ReLU-1x1-ReLU-1x1 head. -> (B, Q, T)."""
    B, T = x.shape
    Q, L, per = cfg.mu + 1, cfg.layers, cfg.layers // cfg.stacks
    h = F.one_hot(x, Q).double() @ P["embed.weight"]                       # (B, T, R)
    mel = (common.mel_spectrogram(wav, cfg.sample_rate, n_fft=cfg.n_fft, hop=cfg.hop, n_mels=cfg.n_mels,
                                  fmin=cfg.fmin, fmax=cfg.fmax, log="ln").double() + 4) / 4   # (B, M, T/hop)
    assert mel.shape[-1] * cfg.hop == T
    y = mel
    for i, s in enumerate(cfg.upsample_scales):
        y = ref_transposed_conv_time_freq(y, P[f"upsample.stages.{i}.weight"][0, 0], P[f"upsample.stages.{i}.bias"], s)
    y = y.transpose(1, 2)                                                   # (B, T, M): y_t conditions x_t
    gvec = P["speaker_emb.weight"][spk]                                     # (B, D)
    skips = 0
    for i in range(L):
        d, p = 2 ** (i % per), f"layers.{i}."
        Wc = P[p + "conv.weight"]                                           # (G, R, k)
        k = Wc.shape[-1]
        a = P[p + "conv.bias"].expand(B, T, -1).clone()
        for j in range(k):                                                  # tap j looks (k-1-j)·d samples back
            lag = (k - 1 - j) * d
            past = torch.cat([torch.zeros(B, lag, h.shape[-1], dtype=h.dtype), h[:, :T - lag]], 1)
            a = a + past @ Wc[:, :, j].T
        a = a + y @ P[p + "cond.weight"][:, :, 0].T + (gvec @ P[p + "gcond.weight"].T)[:, None]
        zf, zg = a.chunk(2, dim=-1)
        z = torch.tanh(zf) * torch.sigmoid(zg)                              # Eq. 2
        skips = skips + z @ P[p + "skip.weight"][:, :, 0].T + P[p + "skip.bias"]
        if i < L - 1:
            h = (h + z @ P[p + "out.weight"][:, :, 0].T + P[p + "out.bias"]) * math.sqrt(0.5)
    o = torch.relu(skips * math.sqrt(1 / L)) @ P["head.1.weight"][:, :, 0].T + P["head.1.bias"]
    o = torch.relu(o) @ P["head.3.weight"][:, :, 0].T + P["head.3.bias"]
    return o.transpose(1, 2)                                                # (B, Q, T)


def ref_loss_and_grads(model, cfg, wav, spk):
    """Teacher forcing written out: target = the class of x_t, input = the classes shifted right by one with
    the silence class first; mean cross-entropy (nats) and its gradient, in fp64."""
    P = {k: v.detach().double().requires_grad_(True) for k, v in model.named_parameters()}
    q = ref_mulaw_classes(wav.double(), cfg.mu)                             # (B, T)
    silence = int(ref_mulaw_classes(torch.zeros(()), cfg.mu))                # the class of a zero sample: 128
    x = torch.cat([torch.full((q.shape[0], 1), silence), q[:, :-1]], 1)
    logits = ref_logits(P, cfg, x, wav, spk)
    loss = -logits.log_softmax(1).gather(1, q[:, None]).mean()
    grads = torch.autograd.grad(loss, list(P.values()), allow_unused=True)
    return loss.item(), {k: (g if g is not None else torch.zeros_like(P[k])) for k, g in zip(P, grads)}


def clipped(grads, max_norm):
    norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
    return {k: g * min(1.0, max_norm / (norm + 1e-6)) for k, g in grads.items()}, norm


def check_update(model, before, ref_delta, what, rtol=2e-4):
    """model's weights == before + ref_delta, to rtol of the update plus fp32 rounding of the weights themselves."""
    for k, v in model.named_parameters():
        err, ref = float((v.detach().double() - before[k] - ref_delta[k]).norm()), float(ref_delta[k].norm())
        assert err <= rtol * ref + 2 ** -23 * float(before[k].norm()) + 1e-12, \
            f"{what}: {k} differs ({err:.3g} vs |update| {ref:.3g})"


def test_golden_step():
    """Real train_step calls against the literal transcription above: two with the file's own Adam (lr warming
    up from lr / warmup_iters), then two with SGD swapped in, where gradient clipping and the schedule's step
    show in the update directly."""
    cfg = cfg_of("tiny", "--n_speakers=3", "--lr=10", "--grad_clip=0.02", "--lr_half_life=3")
    # audio at μ-law bin centres, so fp32 (the file) and fp64 (the reference) agree on every class
    on_bins = lambda w: common.mulaw_dequantize(common.mulaw_quantize(w)).float()
    wav, spk = on_bins(speechlike(2, cfg.segment, cfg.sample_rate)), torch.tensor([0, 2])
    lr_at = lambda s, c=cfg: c.lr * min(1.0, (s + 1) / c.warmup_iters) * 0.5 ** (s / c.lr_half_life)

    wav2 = on_bins(speechlike(2, cfg.segment, cfg.sample_rate, seed=1))

    # 1. the file's optimizer, Adam (Kingma & Ba, Alg. 1) with cfg.betas, on clipped gradients, two steps
    adam = dataclasses.replace(cfg, lr=0.01)
    torch.manual_seed(0)
    state = W.build(adam, CPU)
    model = state["model"]
    (b1, b2), m, v = adam.betas, 0, 0
    for s, batch in enumerate([(wav, spk), (wav2, spk)]):
        before = {k: p.detach().clone().double() for k, p in model.named_parameters()}
        loss, grads = ref_loss_and_grads(model, cfg, *batch)
        assert 5.0 < loss < 6.0                                             # ~ln 256 at init
        g, norm = clipped(grads, cfg.grad_clip)
        m = {k: b1 * (m[k] if s else 0) + (1 - b1) * g[k] for k in g}
        v = {k: b2 * (v[k] if s else 0) + (1 - b2) * g[k] ** 2 for k in g}
        step = {k: -lr_at(s, adam) * (m[k] / (1 - b1 ** (s + 1))) / ((v[k] / (1 - b2 ** (s + 1))).sqrt() + 1e-8) for k in g}
        out = W.train_step(state, batch, adam, CPU)
        assert abs(float(out["bits_per_sample"]) - loss / math.log(2)) < 1e-4   # the log's unit: bits per sample
        check_update(model, before, step, f"Adam step {s + 1}", rtol=1e-3)

    # 2. SGD in place of Adam, same scheduler: p <- p - lr_s · clip(g), s = 0, 1
    torch.manual_seed(0)
    state = W.build(cfg, CPU)
    model = state["model"]
    state["opt"] = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    state["sched"] = torch.optim.lr_scheduler.LambdaLR(state["opt"], state["sched"].lr_lambdas[0])
    for s, batch in enumerate([(wav, spk), (wav2, spk)]):
        before = {k: v.detach().clone().double() for k, v in model.named_parameters()}
        loss, grads = ref_loss_and_grads(model, cfg, *batch)
        g, norm = clipped(grads, cfg.grad_clip)
        assert norm > 2 * cfg.grad_clip                                     # clipping is active in this test
        out = W.train_step(state, batch, cfg, CPU)
        assert abs(float(out["bits_per_sample"]) - loss / math.log(2)) < 1e-4, s
        check_update(model, before, {k: -lr_at(s) * g[k] for k in g}, f"SGD step {s + 1}")


def test_lr_schedule_in_the_scheduler():
    # warm-up then halving every lr_half_life steps, held by the scheduler that train_step steps (so resume and
    # bench see it); independent of max_iters
    cfg = cfg_of("tiny", "--n_speakers=3", "--warmup_iters=4", "--lr_half_life=10", "--max_iters=3")
    state = W.build(cfg, CPU)
    lrs = []
    for _ in range(30):
        lrs.append(state["opt"].param_groups[0]["lr"])
        state["opt"].step()
        state["sched"].step()
    want = [cfg.lr * min(1.0, (s + 1) / 4) * 0.5 ** (s / 10) for s in range(30)]
    assert np.allclose(lrs, want, rtol=1e-9), (lrs[:6], want[:6])


def test_get_batch_speakers_and_frames():
    # each crop comes with its own clip's speaker id, starts on a mel-frame boundary and is segment long
    cfg = cfg_of("tiny", "--n_speakers=3", "--batch_size=16")
    n = 5 * cfg.hop
    utts = [common.Utterance(f"u{i}", np.arange(n, dtype=np.float32) / n + 10 * i, cfg.sample_rate, speaker=s)
            for i, s in enumerate([2, 0, 1, 7])]                   # 7: beyond the table, clamped to 2
    wav, spk = W.get_batch(W.make_sampler(utts, cfg, CPU), cfg, CPU)
    assert wav.shape == (16, cfg.segment) and spk.shape == (16,)
    clip = (wav[:, 0] // 10).long()                             # which clip each crop came from
    start = torch.round((wav[:, 0] - 10 * clip) * n).long()      # and where in it
    assert len(set(clip.tolist())) > 1 and torch.equal(spk, torch.tensor([2, 0, 1, 2])[clip])
    assert (start % cfg.hop == 0).all()


def test_overfit_one_batch_through_train_step():
    torch.manual_seed(0)
    cfg = cfg_of("tiny", "--n_speakers=2", "--residual_channels=16", "--gate_channels=32", "--skip_channels=32",
                 "--lr=1e-2", "--warmup_iters=1")
    state = W.build(cfg, CPU)
    t = torch.arange(cfg.segment) / cfg.sample_rate
    wav = torch.stack([0.5 * torch.sin(2 * math.pi * 220 * t), 0.3 * torch.sin(2 * math.pi * 330 * t)])
    bits = [float(W.train_step(state, (wav, torch.tensor([0, 1])), cfg, CPU)["bits_per_sample"]) for _ in range(60)]
    assert bits[0] > 7.5                                         # ~8 bits (log2 256) at init
    assert bits[-1] < bits[0] / 4, bits[::10]

# ----------------------------------------------------------------------------- command line

def test_cli_contract_units_lr_on_resume_and_wrong_checkpoint(tmp_path, capsys):
    out = check_cli_contract("wavenet.py", tmp_path, bench_keys=(
        "train_audio_s_per_s", "train_flops_per_step", "receptive_field", "naive_b1_samples_per_s",
        "cached_b1_samples_per_s", "naive_b16_samples_per_s", "cached_b16_samples_per_s", "train_tflops",
        "best_b1_realtime_factor"))
    d = str(tmp_path / "run")
    assert "receptive field 15 samples" in out["train"]
    # one unit for the likelihood in the training and the eval lines: bits per sample
    assert "step 3/3 | bits_per_sample " in out["train"] and "eval val | bits_per_sample " in out["train"]
    assert "eval test | bits_per_sample " in out["eval"] and "mel_l1" in out["eval"]
    assert out["bench_json"]["cached_b16_samples_per_s"] > out["bench_json"]["naive_b16_samples_per_s"]
    assert os.path.exists(f"{d}/samples/step000005/vocoded.wav") and os.path.exists(f"{d}/samples/vocoded.png")
    # a changed --lr on resume takes effect: 1e30 diverges within a step and stops, the checkpoint untouched
    # (in-process: the command line's own parse_config + train, without another interpreter start)
    before = common.load_checkpoint(f"{d}/ckpt.pt")
    capsys.readouterr()
    resumed = cfg_of("tiny", "--init_from=resume", "--lr=1e30", "--max_iters=9", f"--out_dir={d}")
    one_line_error(W.train, resumed, match="diverged")
    assert "lr 0.001 -> 1e+30" in capsys.readouterr().out
    after = common.load_checkpoint(f"{d}/ckpt.pt")
    assert after["step"] == 5
    assert all(torch.equal(v, after["models"]["model"][k]) for k, v in before["models"]["model"].items())
    # a checkpoint that does not fit the flags is refused, naming them
    ck = after
    cfg = cfg_of("tiny", "--n_speakers=3", "--residual_channels=12", "--fmax=7000")
    with pytest.raises(SystemExit, match="fmax.*residual_channels"):        # arch and feature keys, named
        common.check_checkpoint(ck, cfg, W.ARCH_KEYS)
    with pytest.raises(SystemExit, match="melgan"):
        common.check_checkpoint(dict(ck, paper="melgan"), cfg_of("tiny"), W.ARCH_KEYS)
    # (in-process from here on: what the command line runs, without an interpreter start each)
    sample_cfg = common.parse_config(W.Config, W.PRESETS, ["--mode=sample", f"--init_from={d}/ckpt.pt",
                                                           "--gate_channels=32"])
    one_line_error(W.sample, sample_cfg, match="--gate_channels")


def test_bad_flags_one_line(tmp_path):
    one_line_error(cfg_of, "tiny", "--batch_size=0", match="--batch_size must be > 0")
    one_line_error(cfg_of, "tiny", "--mode=sample", "--init_from=resume", f"--input={tmp_path}/missing.wav",
                   match="does not exist")
    one_line_error(W.evaluate, cfg_of("tiny", "--mode=eval", f"--out_dir={tmp_path}"), match="needs a checkpoint")
    for flags, msg in ((["--segment=1000"], "multiple of --hop"), (["--upsample_scales=16,8"], "--hop=256"),
                       (["--layers=7"], "multiple of --stacks"), (["--gate_channels=15"], "even"),
                       (["--residual_chanels=3"], "residual_channels")):
        with pytest.raises(SystemExit, match=msg):
            cfg_of("tiny", *flags)


def write_folder(root, lengths, nan_in=None, sr=16000):
    os.makedirs(root, exist_ok=True)
    g = np.random.default_rng(0)
    for i, n in enumerate(lengths):
        x = (0.3 * g.standard_normal(n)).astype(np.float32)
        if i == nan_in:
            x[n // 2] = np.nan
        sf.write(os.path.join(root, f"clip{i:02d}.wav"), x, sr, subtype="FLOAT")
    return root


def test_bad_data_stops_before_step_1(tmp_path, capsys):
    # in-process train(): the same code the command line runs, one error line, no step and no checkpoint
    base = ["--max_iters=2", f"--out_dir={tmp_path}/out"]
    names = [f"clip{i:02d}" for i in range(6)]
    bad = next(i for i, n in enumerate(names) if common._split_of(n) == "train")   # the NaN clip is a train clip
    folder = write_folder(str(tmp_path / "nan"), [4000] * 6, nan_in=bad)
    one_line_error(W.train, cfg_of("tiny", *base, f"--data_dir={folder}"), match=f"NaN.*clip{bad:02d}.wav|clip{bad:02d}.wav.*NaN")
    one_line_error(W.train, cfg_of("tiny", *base, f"--data_dir={write_folder(str(tmp_path / 'two'), [4000] * 2)}"),
                   match="at least 3")
    one_line_error(W.train, cfg_of("tiny", *base, f"--data_dir={write_folder(str(tmp_path / 'short'), [600] * 4)}"),
                   match="shorter than 1024 samples")
    assert "step 1" not in capsys.readouterr().out
    assert not os.path.exists(f"{tmp_path}/out/ckpt.pt")


def test_sampler_frequencies_follow_the_tempered_softmax():
    # generation draws x_t ~ softmax(logits / T) (§2.2); both generators share W.draw, so the cached == naive test
    # cannot see a wrong sampler: here its empirical class frequencies meet the distribution written out
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0, 0.0]])
    n = 200_000
    u = torch.rand(n, generator=g)
    for T in (1.0, 0.5):
        p = torch.exp(logits[0] / T) / torch.exp(logits[0] / T).sum()
        drawn = W.draw(logits.expand(n, -1), u, T)
        freq = torch.bincount(drawn, minlength=5).double() / n
        assert (freq - p).abs().max() < 0.005, (T, freq, p)
    assert torch.equal(W.draw(logits.expand(3, -1), u[:3], 0.0), torch.zeros(3, dtype=torch.long))  # T = 0: argmax
