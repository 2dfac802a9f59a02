"""Tests for parallel_wavenet.py: parameter counts, the 16-bit discretised MoL, teacher causality and
cached == parallel, the IAF's exact log-determinant, one-pass causal sampling, the distillation KL, a frozen
teacher, golden steps for both stages against literal transcriptions of the objectives, and the CLI.

What pins each loss term, target shift, sampler and schedule (expected values come from the test's own
transcription, never from the file's helpers; mel_features and quantize only make the golden steps' inputs):
- teacher MoL NLL (§2.1, 16-bit bins, end tails): test_mol_log_prob_is_the_cdf_difference,
  test_golden_teacher_step
- target shift (input x_{t-1}, silence at t=0, target x_t): test_teacher_causal_and_cached_equals_parallel,
  test_golden_teacher_step (literal prev), test_golden_student_step (the teacher hears the student's x_<t)
- distillation KL = H(P_S, P_T) - H(P_S), entropy ln s + 2 (§4):
  test_kl_is_zero_for_the_student_itself_and_positive_otherwise, test_golden_student_step
- power loss (§4.1): test_golden_student_step; contrastive term: test_golden_student_step[True-0.5]
- teacher sampler draw_mol (component by the mixture weights, logistic value):
  test_draw_mol_component_frequencies_and_logistic_shape (empirical frequencies vs weights, CDF vs σ)
- student noise z ~ Logistic(0, 1) and its one-pass IAF: test_draw_mol_component_frequencies_and_logistic_shape,
  test_student_samples_in_one_causal_pass, test_iaf_logdet_matches_autograd_jacobian
- lr warm-up (ours, linear): test_lr_warmup_schedule"""
import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import common
import parallel_wavenet as P
from cli import check_cli_contract, error_of

BENCH_KEYS = ("student_b1_samples_per_s", "teacher_cached_b1_samples_per_s", "student_speedup", "train_flops_per_step",
              "train_tflops")


def cfg_of(*flags, preset="tiny"):
    return common.parse_config(P.Config, P.PRESETS, [f"--preset={preset}", "--device=cpu", *flags])


def randomize(module, scale=0.3, seed=0):
    """Random weights everywhere (the flows' heads start at zero, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module


def rt_cpu():
    return common.Runtime(torch.device("cpu"), "cpu", torch.float32)

# ----------------------------------------------------------------------------- sizes

def expected_teacher_params(c):
    R, G, S, M, K, k = c.residual_channels, c.gate_channels, c.skip_channels, c.n_mels, c.n_mix, c.kernel_size
    layer = R * G * k + G + M * G + (G // 2) * S + S
    n = 2 * R + c.layers * layer + (c.layers - 1) * ((G // 2) * R + R) + S * S + S + S * 3 * K + 3 * K
    return n + sum(c.freq_axis_kernel * 2 * s + 1 for s in c.upsample_scales)


def expected_student_params(c):
    C, M, k = c.flow_channels, c.n_mels, c.flow_kernel
    layer = C * 2 * C * k + 2 * C + M * 2 * C + C * C + C
    flows = sum(2 * C + n * layer + 2 * C + 2 for n in c.flow_layers)
    return flows + sum(c.freq_axis_kernel * 2 * s + 1 for s in c.upsample_scales)


def test_param_counts_and_receptive_field():
    built = {}
    for preset, (nt, ns) in {"paper": (61_305_824, 2_347_466), "small": (179_264, 248_394)}.items():
        c = cfg_of(preset=preset)
        t, s = built[preset] = P.Teacher(c), P.Student(c)      # (the meta device would cost seconds of lazy imports)
        assert common.count_params(t) == expected_teacher_params(c) == nt, preset
        assert common.count_params(s) == expected_student_params(c) == ns, preset
        assert len(s.flows) == len(c.flow_layers) and [len(f.layers) for f in s.flows] == list(c.flow_layers)
    c = cfg_of(preset="paper")
    assert c.flow_layers == (10, 10, 10, 30) and c.flow_channels == 64 and c.n_mix == 10 and c.bits == 16
    assert P.receptive_field(c) == 2 * 3 * 1023 + 1 == 6139      # k = 3, 3 x (1..512)
    # the student's dilations: 1..512 within each flow, repeating (§3)
    assert [l.pad // 2 for l in built["paper"][1].flows[3].layers] == [2 ** (i % 10) for i in range(30)]

# ----------------------------------------------------------------------------- mixture of logistics

def mixture(K=10, T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    logit = torch.randn(1, K, T, generator=g) * 2
    mu = torch.rand(1, K, T, generator=g) * 2.2 - 1.1                 # some means beyond the edges
    log_s = torch.rand(1, K, T, generator=g) * -6 - 1                   # scales from e^-1 down to e^-7
    mu[0, 0, 0], log_s[0, 0, 0] = 0.3, -7.0                             # a sharp component: ~30 bins wide
    return logit, mu, log_s


def test_mol_sums_to_one_over_16bit_grid():
    logit, mu, log_s = mixture()
    n = 2 ** 16
    grid = torch.linspace(-1, 1, n)                                     # the 65,536 levels, 2/65535 apart
    T = mu.size(2)
    x = grid[:, None].expand(n, T)[None, :, None]                       # (1, n, 1, T)
    lp = P.mol_log_prob(x, logit[:, None], mu[:, None], log_s[:, None], 16)  # (1, n, T): K (dim -2) summed out
    total = lp.double().exp().sum(1)
    assert torch.allclose(total, torch.ones_like(total), atol=2e-4), total
    assert torch.allclose(P.quantize(grid, 16), grid, atol=1e-6)
    assert torch.equal(P.quantize(P.quantize(grid, 16), 16), P.quantize(grid, 16))


def test_mol_log_prob_is_the_cdf_difference():
    """Literal transcription in float64: P(x) = Σ_k π_k [σ((x + Δ − μ_k)/s_k) − σ((x − Δ − μ_k)/s_k)], the end
    levels take the tails; and the density is the Δ → 0 limit."""
    logit, mu, log_s = (p.double() for p in mixture(K=4, T=5, seed=1))
    bits, delta = 8, 1 / 255
    x = torch.tensor([-1.0, -1 + 2 / 255, 0.0, 0.5 + 2 / 255 * 3, 1.0], dtype=torch.float64)[None, None]
    cdf = lambda v: torch.sigmoid((v - mu) / log_s.exp())
    hi = torch.where(x > 1 - delta, torch.ones_like(mu), cdf(x + delta))
    lo = torch.where(x < -1 + delta, torch.zeros_like(mu), cdf(x - delta))
    want = ((hi - lo) * F.softmax(logit, 1)).sum(1).log()
    got = P.mol_log_prob(x.float(), logit.float(), mu.float(), log_s.float(), bits)
    assert torch.allclose(got.double(), want, atol=1e-4), (got, want)
    # density: log P(bin of width 2Δ) ≈ log p(x) + log 2Δ for 16-bit bins
    x16 = torch.tensor([[[-0.3, 0.0, 0.2, 0.41, 0.77]]])
    lp = P.mol_log_prob(x16, *(p.float() for p in (logit, mu, log_s)), 16)
    ld = P.mol_log_density(x16, *(p.float() for p in (logit, mu, log_s)))
    assert torch.allclose(lp, ld + math.log(2 / (2 ** 16 - 1)), atol=1e-3)

# ----------------------------------------------------------------------------- teacher

def test_teacher_causal_and_cached_equals_parallel():
    cfg = cfg_of()
    torch.manual_seed(0)
    t = randomize(P.Teacher(cfg), 0.3).eval()
    B, T, t0 = 2, 3 * cfg.hop, 300
    wav = torch.rand(B, T) * 2 - 1
    mel = torch.randn(B, cfg.n_mels, T // cfg.hop)
    with torch.no_grad():
        h = t(P.shift_right(wav), mel)                                  # params of x_t given x_<t
        wav2 = wav.clone()
        wav2[:, t0] += 0.5
        h2 = t(P.shift_right(wav2), mel)
    assert h.shape == (B, 3 * cfg.n_mix, T)
    assert torch.equal(h[..., :t0 + 1], h2[..., :t0 + 1]), "the teacher sees the sample it predicts (or the future)"
    assert not torch.equal(h[..., t0 + 1], h2[..., t0 + 1])
    # Fast-WaveNet generation: the head outputs of each cached step equal teacher forcing on the result
    n = 2 * t.receptive_field + 50
    u = torch.rand(B, 2, n, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        gen = P.CachedGenerator(t, u, t.upsample(mel)[:, :, :n])
        for _ in range(n):
            gen.step()
        hp = t(P.shift_right(gen.out), mel)
    assert torch.allclose(gen.h, hp, atol=1e-5), (gen.h - hp).abs().max()
    assert torch.equal(P.draw_mol(hp, u, cfg), gen.out)
    assert torch.equal(P.quantize(gen.out, 16), gen.out)                 # 16-bit samples


def test_draw_mol_component_frequencies_and_logistic_shape():
    """The teacher's sampler, pinned by what it should draw, not by itself: 4 well-separated components with
    weights 0.1, 0.2, 0.3, 0.4 (as logits) must be picked with those frequencies, and within each component
    (x - μ_k) / s_k must be Logistic(0, 1): empirical CDF at -2..2 == σ(·). 40k draws: binomial sd <= 0.011
    for a frequency, <= 0.011 for a CDF point of the smallest component, so 0.03 / 0.045 are ~3-4 sd."""
    cfg = cfg_of()
    K, T = 4, 40000
    cfg.n_mix = K
    w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    mu = torch.tensor([-0.75, -0.25, 0.25, 0.75])
    s = torch.tensor([0.01, 0.02, 0.015, 0.012])
    h = torch.cat([w.log() + 3.0, mu, s.log()])[None, :, None].expand(1, 3 * K, T)  # logits up to a constant
    u = torch.rand(1, 2, T, generator=torch.Generator().manual_seed(0))
    x = P.draw_mol(h, u, cfg)[0]
    k = (x[:, None] - mu[None]).abs().argmin(1)              # components are > 20 scales apart: nearest mean
    freq = torch.bincount(k, minlength=K).float() / T
    assert torch.allclose(freq, w, atol=0.03), freq
    for j in range(K):
        z = (x[k == j] - mu[j]) / s[j]
        for a in (-2.0, -1.0, 0.0, 1.0, 2.0):
            emp = float((z <= a).float().mean())
            assert abs(emp - 1 / (1 + math.exp(-a))) < 0.045, (j, a, emp)
    z = P.logistic_noise((T,), "cpu", seed=0)                # the student's z ~ Logistic(0, 1) (§3)
    for a in (-2.0, -1.0, 0.0, 1.0, 2.0):
        assert abs(float((z <= a).float().mean()) - 1 / (1 + math.exp(-a))) < 0.02, a


def test_teacher_overfits_one_batch():
    cfg = cfg_of("--lr=1e-2", "--segment=512", "--power_n_fft=256", "--grad_clip=1e3")
    torch.manual_seed(0)
    state = P.build(cfg, rt_cpu())
    wav = P.quantize(0.5 * torch.sin(torch.arange(512) * 0.05)[None].repeat(2, 1), 16)
    batch = (wav, P.mel_features(wav, cfg))
    losses = [P.train_step(state, batch, cfg, rt_cpu())["nll_bits"].item() for _ in range(30)]
    assert losses[-1] < losses[0] - 2.5, losses                 # 16.8 -> 13.6 bits per sample in 30 steps


# ----------------------------------------------------------------------------- student (IAF)

def tiny_student(seed=0, dtype=torch.float64):
    cfg = cfg_of()
    torch.manual_seed(seed)
    return randomize(P.Student(cfg), 0.3, seed).to(dtype).eval(), cfg


def test_iaf_logdet_matches_autograd_jacobian():
    s, cfg = tiny_student()
    T = 24
    mel = torch.randn(1, cfg.n_mels, 1, dtype=torch.float64)
    z = P.logistic_noise((1, T), "cpu").double()
    J = torch.autograd.functional.jacobian(lambda v: s(v[None], mel)[0][0], z[0])    # (T, T): dx_i / dz_j
    _, _, log_s_tot = s(z, mel)
    assert torch.allclose(J.triu(1), torch.zeros_like(J)), "x_t depends on future noise"
    assert torch.allclose(J.diagonal(), log_s_tot[0].exp())
    sign, logdet = torch.linalg.slogdet(J)
    assert sign > 0 and torch.allclose(logdet, log_s_tot.sum(), atol=1e-8), (logdet, log_s_tot.sum())


def test_student_samples_in_one_causal_pass():
    s, cfg = tiny_student(dtype=torch.float32)
    T, t0 = 2 * cfg.hop, 200
    mel = torch.randn(2, cfg.n_mels, 2)
    z = P.logistic_noise((2, T), "cpu")
    calls = []
    hooks = [f.register_forward_hook(lambda *a: calls.append(1)) for f in s.flows]
    with torch.no_grad():
        x, mu, log_s = s(z, mel)
        z2 = z.clone()
        z2[:, t0] += 1.0
        x2, mu2, log_s2 = s(z2, mel)
    for h in hooks:
        h.remove()
    assert len(calls) == 2 * len(s.flows), "the student ran its flows more than once per sample"
    assert torch.equal(x[:, :t0], x2[:, :t0]), "noise at t changed an earlier output"
    assert not torch.allclose(x[:, t0], x2[:, t0])
    assert torch.equal(mu[:, :t0 + 1], mu2[:, :t0 + 1]) and torch.equal(log_s[:, :t0 + 1], log_s2[:, :t0 + 1]), \
        "μ_tot / s_tot at t must depend on z_<t only"
    assert not torch.allclose(mu[:, t0 + 1:], mu2[:, t0 + 1:])
    assert torch.allclose(x, z * log_s.exp() + mu, atol=1e-5)             # x = z·s_tot + μ_tot

# ----------------------------------------------------------------------------- distillation

def test_kl_is_zero_for_the_student_itself_and_positive_otherwise():
    s, cfg = tiny_student(dtype=torch.float32)
    cfg.n_draws = 4000
    T = 64
    mel = torch.randn(2, cfg.n_mels, 1)
    torch.manual_seed(1)
    with torch.no_grad():
        x, mu, log_s = s(P.logistic_noise((2, T), "cpu"), mel)
        # a flow-parameterised "teacher": three identical components equal to the student's own logistic at t
        same = torch.cat([torch.zeros(2, 3, T), mu[:, None].repeat(1, 3, 1), log_s[:, None].repeat(1, 3, 1)], 1)
        cross, entropy = P.distillation(mu, log_s, same, cfg)
        kl_same = (cross - entropy).item()
        # the entropy is the closed form: the draws' mean -log p_S equals it
        assert abs(cross.item() - entropy.item()) < 0.02
        for shift in (0.5, 2.0):
            other = same.clone()
            other[:, 3:6] += shift * log_s.exp()[:, None]               # the teacher's means moved
            c2, e2 = P.distillation(mu, log_s, other, cfg)
            assert (c2 - e2).item() > 0.05 * shift, shift
        wide = same.clone()
        wide[:, 6:9] += 1.0                                              # a teacher e times wider
        c3, e3 = P.distillation(mu, log_s, wide, cfg)
    assert abs(kl_same) < 0.02, kl_same
    assert (c3 - e3).item() > 0.2


def teacher_ckpt_state(cfg, seed=0):
    torch.manual_seed(seed)
    state = P.build(cfg, rt_cpu())                  # mode=bench: a random (frozen) teacher
    randomize(state["teacher"], 0.2, seed + 1)
    return state


def test_teacher_is_frozen_and_student_learns_through_it():
    cfg = cfg_of("--stage=student", "--mode=bench")
    state = teacher_ckpt_state(cfg)
    t_before = copy.deepcopy(state["teacher"].state_dict())
    s_before = copy.deepcopy(state["student"].state_dict())
    assert not any(p.requires_grad for p in state["teacher"].parameters())
    assert not state["teacher"].training
    opt_params = {id(p) for g in state["opt"].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in state["student"].parameters()}
    wav = P.quantize(torch.randn(2, cfg.segment) * 0.1, 16)
    P.train_step(state, (wav, P.mel_features(wav, cfg)), cfg, rt_cpu())
    for k, v in state["teacher"].state_dict().items():
        assert torch.equal(v, t_before[k]), f"teacher {k} changed during distillation"
    assert all(p.grad is None for p in state["teacher"].parameters())
    assert any(not torch.equal(v, s_before[k]) for k, v in state["student"].state_dict().items())

def test_compiled_train_steps_equal_eager():
    # torch.compile forced on, on the CPU: teacher and student (with the frozen teacher it is distilled through)
    # each trace as ONE graph through AOTAutograd (fullgraph=True: an .item(), a data-dependent branch or shape
    # would break it: a GPU step would stall there; backend aot_eager: inductor's graph capture, forward and
    # backward, without its minutes of C++ codegen on this CPU), and two train_steps give the eager losses/weights
    for stage in ("teacher", "student"):
        cfg = cfg_of(f"--stage={stage}", "--mode=bench", "--compile=True")
        assert cfg.compile
        eager, comp = teacher_ckpt_state(cfg), teacher_ckpt_state(cfg)
        trained = comp[stage]
        comp = dict(comp, **{k: torch.compile(comp[k], backend="aot_eager", fullgraph=True)
                             for k in ("teacher", "student") if k in comp})
        for s in range(2):
            wav = P.quantize(torch.randn(2, cfg.segment, generator=torch.Generator().manual_seed(s)) * 0.1, 16)
            batch = (wav, P.mel_features(wav, cfg))
            torch.manual_seed(30 + s)
            a = P.train_step(eager, batch, cfg, rt_cpu())
            torch.manual_seed(30 + s)
            b = P.train_step(comp, batch, cfg, rt_cpu())
            for k in a:
                assert abs(a[k].item() - b[k].item()) <= 1e-4 * (1 + abs(a[k].item())), (stage, s, k)
        for (k, p), q in zip(eager[stage].named_parameters(), trained.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=f"{stage}.{k}")

# ----------------------------------------------------------------------------- golden steps

def sgd(state, cfg, lr):
    """Swap the file's Adam for SGD (constant lr) so the update is the gradient itself."""
    state["opt"] = torch.optim.SGD(state[cfg.stage].parameters(), lr=lr)
    state["sched"] = torch.optim.lr_scheduler.LambdaLR(state["opt"], lambda s: 1.0)


def clipped_update(model, loss, lr, clip):
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    scale = min(1.0, clip / (norm.item() + 1e-6))
    return [(p - lr * scale * g).detach() for p, g in zip(params, grads)]


def sharpen(teacher, cfg, log_s=-5.0):
    """Narrow random components (s ≈ 0.007 against means spread ~0.2): the likelihood then depends on exactly
    which past samples the teacher saw, so an input shifted by one sample changes the loss visibly."""
    with torch.no_grad():
        teacher.head[3].bias[2 * cfg.n_mix:] = log_s
        teacher.head[3].bias[2 * cfg.n_mix] = -9.0   # one component below the log-scale floor (-7): clamped
    return teacher


def test_golden_teacher_step():
    cfg = cfg_of("--grad_clip=0.5")
    state = P.build(cfg, rt_cpu())
    sharpen(randomize(state["teacher"], 0.2, 4), cfg)
    sgd(state, cfg, 0.05)
    ref = copy.deepcopy(state["teacher"]).double()
    g = torch.Generator().manual_seed(0)
    wav = P.quantize(torch.randn(2, cfg.segment, generator=g) * 0.2, 16)
    mel = P.mel_features(wav, cfg)
    out = P.train_step(state, (wav, mel), cfg, rt_cpu())
    # literal: input x_{t-1} (0 before the start), target x_t; P(x_t) = Σ π [σ((x+Δ-μ)/s) − σ((x-Δ-μ)/s)]
    w = wav.double()
    prev = torch.cat([torch.zeros(2, 1, dtype=torch.float64), w[:, :-1]], 1)
    logit, mu, log_s = ref(prev, mel.double()).chunk(3, dim=1)
    log_s = log_s.clamp(min=-7.0)
    d = 1 / (2 ** 16 - 1)
    x = w[:, None]
    a, b = (x + d - mu) / log_s.exp(), (x - d - mu) / log_s.exp()
    hi = torch.where(x > 1 - d, torch.ones_like(mu), torch.sigmoid(a))
    lo = torch.where(x < -1 + d, torch.zeros_like(mu), torch.sigmoid(b))
    # the same difference as 1-CDFs above the mean (fp64 cannot tell σ(30) from σ(29.99) near 1)
    hi_up = torch.where(x < -1 + d, torch.ones_like(mu), torch.sigmoid(-b))
    lo_up = torch.where(x > 1 - d, torch.zeros_like(mu), torch.sigmoid(-a))
    p = torch.where(x > mu, hi_up - lo_up, hi - lo)
    nll = -(p * F.softmax(logit, 1)).sum(1).log().mean()
    assert abs(out["nll_bits"].item() - nll.item() / math.log(2)) < 1e-3
    want = clipped_update(ref, nll, 0.05, 0.5)
    for p, q in zip(state["teacher"].parameters(), want):
        assert torch.allclose(p.double(), q, atol=2e-5), (p - q.float()).abs().max()


def test_lr_warmup_schedule():
    """Linear warm-up (ours): the lr of step i (0-based) is lr * min(1, (i + 1) / warmup_iters), then flat."""
    cfg = cfg_of("--warmup_iters=4", "--lr=0.001")
    state = P.build(cfg, rt_cpu())
    seen = []
    for _ in range(6):
        seen.append(state["opt"].param_groups[0]["lr"])
        state["opt"].step(), state["sched"].step()
    assert seen == pytest.approx([0.00025, 0.0005, 0.00075, 0.001, 0.001, 0.001])


def literal_student_loss(student, teacher, z, wav, mel, cfg, draws1, draws2=None):
    """The paper's objective written out: flows composed by the product form, KL = H(P_S,P_T) − H(P_S) with the
    logistic entropy ln s + 2, the teacher's mixture density, power loss, contrastive term."""
    c = student.upsample(mel)[:, :, :z.size(1)]
    x, mus, ss = z, [], []
    for f in student.flows:
        mu, log_s = f(x, c)
        x = x * log_s.exp() + mu
        mus.append(mu), ss.append(log_s.exp())
    s_tot = torch.stack(ss).prod(0)
    mu_tot = sum(mus[i] * (torch.stack(ss[i + 1:]).prod(0) if i + 1 < len(ss) else 1) for i in range(len(mus)))
    H = (s_tot.log() + 2).mean()
    prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)

    def cross(m):
        logit, tm, tls = teacher(prev, m).chunk(3, dim=1)
        ts = tls.clamp(min=cfg.log_scale_min).exp()[:, None]              # (B, 1, K, T)
        v = (mu_tot[:, None] + s_tot[:, None] * (draws1 if m is mel else draws2))[:, :, None]  # (B, n, 1, T)
        e = (v - tm[:, None]) / ts
        pdf = torch.sigmoid(e) * torch.sigmoid(-e) / ts                   # logistic density
        return -(pdf * F.softmax(logit, 1)[:, None]).sum(2).log().mean()

    win = torch.hann_window(cfg.power_n_fft, dtype=x.dtype)
    phi = lambda y: (torch.stft(y, cfg.power_n_fft, cfg.power_n_fft // 4, window=win, return_complex=True).abs() ** 2
                     / cfg.power_n_fft).mean(-1)
    power = ((phi(x) - phi(wav)) ** 2).sum(-1).mean()
    kl = cross(mel) - H
    loss = kl + cfg.power_weight * power
    if draws2 is not None:
        loss = loss - cfg.contrastive_gamma * (cross(mel.roll(1, 0)) - H)
    return loss, kl, power


@pytest.mark.parametrize("contrastive,clip", [(False, 100.0), (True, 0.5)])   # unclipped: every path shows
def test_golden_student_step(contrastive, clip):
    cfg = cfg_of("--stage=student", "--mode=bench", f"--grad_clip={clip}", "--power_weight=3.0",
                 f"--contrastive={contrastive}")
    state = teacher_ckpt_state(cfg, seed=2)
    sharpen(state["teacher"], cfg, -3.0)
    with torch.no_grad():                           # a teacher that listens hard to its input (the student's x):
        state["teacher"].inp.weight.mul_(30)        # the gradient path through x_<t must show in the update
    randomize(state["student"], 0.2, 5)
    sgd(state, cfg, 0.02)
    ref_s, ref_t = copy.deepcopy(state["student"]).double(), copy.deepcopy(state["teacher"]).double()
    g = torch.Generator().manual_seed(0)
    wav = P.quantize(torch.randn(2, cfg.segment, generator=g) * 0.2, 16)
    mel = P.mel_features(wav, cfg)
    torch.manual_seed(7)
    out = P.train_step(state, (wav, mel), cfg, rt_cpu())
    # the same randomness, in the order train_step draws it: z, then the cross-entropy draws (twice if contrastive)
    torch.manual_seed(7)
    logistic = lambda shape: (lambda u: u.log() - (-u).log1p())(torch.rand(shape).clamp(1e-5, 1 - 1e-5)).double()
    z = logistic(wav.shape)
    d1 = logistic((2, cfg.n_draws, cfg.segment))
    d2 = logistic((2, cfg.n_draws, cfg.segment)) if contrastive else None
    loss, kl, power = literal_student_loss(ref_s, ref_t, z, wav.double(), mel.double(), cfg, d1, d2)
    assert abs(out["kl"].item() - kl.item()) < 1e-4 * max(1, abs(kl.item()))
    assert abs(out["power"].item() - power.item()) < 1e-4 * max(1, abs(power.item()))
    assert abs(out["loss"].item() - loss.item()) < 1e-4 * max(1, abs(loss.item()))
    want = clipped_update(ref_s, loss, 0.02, clip)
    for p, q in zip(state["student"].parameters(), want):
        assert torch.allclose(p.double(), q, atol=2e-5), (p - q.float()).abs().max()

# ----------------------------------------------------------------------------- command line

@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """The CLI contract of the teacher stage; its 5-step checkpoint is the student's teacher below."""
    tmp = tmp_path_factory.mktemp("teacher")
    out = check_cli_contract("parallel_wavenet.py", tmp, flags=("--stage=teacher",), bench_keys=BENCH_KEYS)
    return tmp / "run" / "ckpt.pt", out


def test_cli_teacher(teacher_run):
    _, out = teacher_run
    assert "eval (test, teacher) | nll_bits" in out["eval"] and "mel_l1" in out["eval"]
    assert "teacher vocoded" in out["sample"]
    assert out["bench_json"]["student_speedup"] > 0


def run_inprocess(capsys, *argv):
    """python parallel_wavenet.py ARGV, in this process (the torch and torch._dynamo imports that every new
    interpreter pays, ~5 s of CPU, are paid once): returns what it printed."""
    cfg = common.parse_config(P.Config, P.PRESETS, list(argv))
    {"train": P.train, "sample": P.sample, "eval": P.evaluate, "bench": P.bench}[cfg.mode](cfg)
    return capsys.readouterr().out


def test_cli_student(teacher_run, tmp_path, capsys):
    """The contract of check_cli_contract for the student stage (train -> resume exactly -> sample and eval
    with no preset flag -> bench), run in-process; the teacher stage went through real subprocesses above."""
    teacher, _ = teacher_run
    d, straight = tmp_path / "run", tmp_path / "straight"
    base = ["--preset=tiny", "--device=cpu", "--compile=False", "--stage=student", f"--teacher={teacher}"]
    out = run_inprocess(capsys, *base, "--max_iters=3", f"--out_dir={d}")
    assert "step 3/3" in out and "eval (val, student) | kl" in out
    ck3 = torch.load(d / "ckpt.pt", weights_only=True)
    out = run_inprocess(capsys, *base, "--init_from=resume", "--max_iters=5", f"--out_dir={d}")
    assert "resumed" in out and "step 5/5" in out
    run_inprocess(capsys, *base, "--max_iters=5", f"--out_dir={straight}")
    a, b = (torch.load(p / "ckpt.pt", weights_only=True) for p in (d, straight))
    assert a["step"] == b["step"] == 5 and set(a["models"]) == {"student", "teacher"}
    for net, sd in b["models"].items():
        for k, v in sd.items():
            assert torch.equal(v, a["models"][net][k]), f"{net}.{k} differs between resumed and straight runs"
    assert any(not torch.equal(v, ck3["models"]["student"][k]) for k, v in a["models"]["student"].items())
    tk = torch.load(teacher, weights_only=True)
    for k, v in tk["models"]["teacher"].items():                          # the frozen teacher, carried along
        assert torch.equal(v, a["models"]["teacher"][k]), k
    out = run_inprocess(capsys, "--mode=sample", f"--init_from={d}/ckpt.pt")
    assert "student vocoded" in out
    assert (d / "samples" / "vocoded_student.wav").exists() and (d / "samples" / "vocoded_student.png").exists()
    out = run_inprocess(capsys, "--mode=eval", f"--init_from={d}/ckpt.pt")
    assert "eval (test, student) | kl" in out and "mel_l1" in out
    # the teacher, autoregressively, from the student's checkpoint
    out = run_inprocess(capsys, "--mode=sample", f"--init_from={d}/ckpt.pt", "--sampler=teacher")
    assert "teacher vocoded" in out and (d / "samples" / "vocoded_teacher.wav").exists()
    out = run_inprocess(capsys, *base, "--mode=bench", f"--out_dir={tmp_path / 'bench'}")
    fig = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
    for k in ("device", "params", "compiled", "peak_memory_mb", "train_step_ms", *BENCH_KEYS):
        assert fig.get(k) is not None, k
    assert fig["stage"] == "student" and fig["params"] == fig["student_params"]


def test_bad_input_one_line(tmp_path):
    for flags, msg in [(("--stage=bogus",), "--stage must be"), (("--segment=1000",), "multiple of --hop"),
                       (("--sampler=x",), "--sampler must be"), (("--contrastive=True", "--batch_size=1"), "batch_size >= 2"),
                       (("--upsample_scales=(4, 4)",), "multiply to --hop")]:
        with pytest.raises(SystemExit, match=msg):
            cfg_of(*flags)
    with pytest.raises(SystemExit, match="no checkpoint at --teacher"):
        cfg_of("--stage=student", f"--teacher={tmp_path}/none.pt")
    line = error_of("parallel_wavenet.py", "--preset=tiny", "--stage=student", f"--teacher={tmp_path}/none.pt")
    assert line.startswith("error: --stage=student distils a trained teacher"), line
