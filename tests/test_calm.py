"""Tests for calm.py. What pins each loss term, target shift, sampler and schedule of calm.py (expected values
are transcribed here, never computed with calm.py's own helpers):

Loss terms
- VAE, Eq. 2, one generator step whole (hinge adversarial, relative feature matching, KL per element, L1 in
  time, log-mel L_f with its mels transcribed, the weights, D updated first):
  test_golden_vae_generator_gradient
- the KL per element, ln sigma^2's sign, its gradient: test_kl_on_hand_gaussian
- discriminator and generator hinges: test_discriminator_and_adversarial_hinges_by_hand
- the weights' balance at init (the small preset's comment): test_loss_balance_at_init
- sCM consistency loss (Eq. 3: tangent by autograd, L2 tangent normalisation, adaptive weight, warm-up r):
  test_golden_scm_step
- LSD (v3's TTS head, App. A: flow matching + self-distillation with dv/dt by autograd, 75 : 25, learned
  weights, the term every n steps x n): test_golden_lsd_step, test_lsd_distills_every_nth_step
- text-stream cross-entropy and the LM total (head + 1.0 x text): test_text_stream_targets_are_shifted
- the RVQ baseline's depth cross-entropy: test_rvq_depth_shift_and_cross_entropy
Target shifts
- backbone input = frame s - 1 at position s (BOS at 0): test_training_path_causal,
  test_generation_equals_clean_teacher_forcing
- text CE: position s predicts text token s + 1: test_text_stream_targets_are_shifted
- text stream: audio lags the text by text_delay frames, EOS after the last word: test_text_stream_alignment
- short-context window x_{s-K} .. x_{s-1}: test_backbone_and_short_context_causal
- depth head: level q sees code q - 1: test_rvq_depth_shift_and_cross_entropy, test_rvq_baseline (greedy)
- VAE causality (encoder and decoder): test_vae_causal
Samplers
- reparameterisation z = mu + sigma eps: test_vae_reparameterisation; the decoder uses z:
  test_decoder_uses_the_latent
- noise injection (formula, U(0, 1) per frame, training only): test_noise_injection_formula_and_range,
  test_noise_only_in_training
- sCM time proposal arctan(e^tau / sigma_d): test_time_proposal_range, test_golden_scm_step
- one-step consistency sampling, temperature = noise variance, boundary f(x, 0) = x:
  test_boundary_condition_and_one_step_shapes (multi-step: shapes only); lsd's one and two jumps along the
  flow, its time features of s and t: test_lsd_sampling_jumps_along_the_flow
- head batch multiplier (Z once, n draws): test_head_batch_multiplier_reuses_z
- RVQ encode / k-means levels, greedy depth sampling: test_rvq_baseline (the temperature > 0 depth sampling
  are only exercised, by test_cli_lm_stage); TTS's PAD-or-next-token choice, its one-second stall and the
  tts_frames bound: test_tts_says_the_next_token_where_a_word_is_expected
Schedules
- the tangent warm-up r = min(1, step / H) at known steps: test_tangent_warmup_schedule
- the learning rate (linear warm-up, cosine to 10 %): test_lr_schedule_at_known_steps
- the time embedding, sinusoids of 1000 t: test_time_embedding_is_sinusoids_of_1000_t
Also: the latent normaliser, parameter counts, bad input, the command line of both stages, an exact resume."""
import copy
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import calm as C
import common
from cli import check_cli_contract, check_stft_discriminator_layout, one_line_error, run_script


def make_cfg(preset="tiny", **kw):
    kw.setdefault("mode", "bench")  # in-process tests build models; train mode would want a --vae checkpoint
    return common.parse_config(C.Config, C.PRESETS, [f"--preset={preset}", "--device=cpu"]
                               + [f"--{k}={v}" for k, v in kw.items()])


def tiny_lm(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = make_cfg(stage="lm", **kw)
    lm = C.CALM(cfg)
    if cfg.head == "consistency":  # adaLN-zero makes an untrained head ignore its conditioning: wake it up
        for blk in lm.head.blocks:
            nn.init.normal_(blk.ada[1].weight, 0, 0.3)
    else:
        lm.codebooks.normal_()
    return lm, cfg


def fake_batch(cfg, B=2, S=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(B, S)
    valid[-1, -3:] = 0 if B > 1 else 1  # a padded tail
    return dict(latent=torch.randn(B, S, cfg.latent_dim, generator=g) * 2 + 1,
                pre=torch.randn(B, S, cfg.dimension, generator=g) if cfg.head == "rvq" else None,
                text=torch.randint(0, cfg.text_vocab + 2, (B, S), generator=g), valid=valid)

# ----------------------------------------------------------------------------- noise injection (§3.2)

def test_discriminator_sees_the_complex_stft_as_frames_by_frequency():
    cfg = make_cfg()
    check_stft_discriminator_layout(C.Discriminator(cfg), cfg)


def test_noise_injection_formula_and_range():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x = torch.randn(4, 500, 8)
    y, k = C.noise_inject(x, g1)
    k_ref = torch.rand(4, 500, 1, generator=g2)
    eps = torch.randn(x.shape, generator=g2)
    assert torch.equal(k, k_ref) and k.shape == (4, 500, 1)  # one k per frame, shared by its dimensions
    assert torch.allclose(y, (1 - k).sqrt() * x + k.sqrt() * eps)
    assert 0 <= k.min() and k.max() < 1 and abs(k.mean().item() - 0.5) < 0.03  # U(0, 1)
    assert abs(y.var().item() - 1) < 0.05  # variance preserving on unit-variance latents


def test_noise_only_in_training(monkeypatch):
    lm, cfg = tiny_lm()
    batch = fake_batch(cfg)
    calls = []
    real = C.noise_inject
    monkeypatch.setattr(C, "noise_inject", lambda *a, **k: calls.append(1) or real(*a, **k))
    lm.train()
    C.lm_losses(lm, batch, cfg, 1.0)
    assert calls, "training must inject noise into the backbone's inputs"
    calls.clear()
    lm.eval()
    a = C.lm_losses(lm, batch, cfg, 1.0)["text_ce"]
    C.teacher_forced_error(lm, C.VAE(cfg), batch, cfg)
    b = C.lm_losses(lm, batch, cfg, 1.0)["text_ce"]
    assert not calls and torch.equal(a, b), "noise was injected at inference"


@pytest.mark.parametrize("alpha", [1.0, 1.5])
def test_generation_equals_clean_teacher_forcing(alpha):
    """The cached one-frame-at-a-time generation sees exactly the clean, teacher-forced past (no noise, KV cache
    right, short-context window right): its next latent at temperature 0 equals the teacher-forced prediction.
    With latent CFG (alpha != 1) the head gets Z_0 + alpha (Z_text - Z_0), Z_0 teacher-forced on PAD text."""
    lm, cfg = tiny_lm(temperature=0.0, cfg_alpha=alpha)
    lm.eval()
    vae = C.VAE(cfg).eval()
    lm.emb_mean.normal_(), lm.emb_std.uniform_(0.5, 2)
    batch = fake_batch(cfg, B=1, S=8)
    P = 7
    prompt = dict(latent=batch["latent"][0, :P], text=batch["text"][0, :P], pre=None)
    read = []                                            # what the text head reads: Z_text, never the guided Z
    lm.text_out.register_forward_hook(lambda m, i, o: read.append(i[0].clone()))
    gen, text = C.generate(dict(lm=lm, vae=vae), cfg, 1, prompt=prompt)
    assert gen.shape == (1, P + 1, cfg.latent_dim) and torch.allclose(gen[0, :P], prompt["latent"], atol=1e-5)
    clean = lm.normalize(torch.cat([prompt["latent"], gen[0, P:]])[None])
    prev = torch.nn.functional.pad(clean, (0, 0, 1, 0))[:, :P + 1]

    def h_of(tx):                                        # the teacher-forced backbone output at frame P
        x = lm.inputs(prev, tx)
        x = torch.cat([lm.bos.expand(1, 1, -1) + lm.text_emb(tx[:, :1]), x[:, 1:]], 1)
        return lm.backbone(x)[:, P:]
    h_text = h_of(torch.tensor(text[:P + 1])[None])
    h0 = h_of(torch.full((1, P + 1), lm.pad_id))
    h = h0 + alpha * (h_text - h0)
    assert torch.allclose(read[-1], h_text[0], atol=1e-4)
    z = (h + lm.short_context(clean)[:, P:])[0]
    want = lm.denormalize(lm.head.sample(z, 0.0))
    assert torch.allclose(gen[0, P:], want, atol=1e-4), (gen[0, P:] - want).abs().max()


@pytest.mark.parametrize("p_pad", [0.4, 0.9])
def test_tts_says_the_next_token_where_a_word_is_expected(p_pad):
    """TTS's text choice: the next token comes where the text head gives PAD less than 1/2, though the mass on
    other tokens is spread so that the forced token's own logit is below PAD's (p_pad 0.4: a token every frame);
    after one second of PAD it comes anyway (p_pad 0.9: every 13th frame); EOS ends the utterance text_delay + 1
    frames later, inside the tts_frames bound."""
    lm, cfg = tiny_lm(temperature=0.0)
    lm.eval()
    V = cfg.text_vocab + 2
    logits = torch.full((V,), math.log((1 - p_pad) / (V - 1)))
    logits[lm.pad_id] = math.log(p_pad)
    lm.text_out.forward = lambda h: logits.expand(h.shape[0], V)  # the same choice at every frame
    ids = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]  # 13 tokens: more than a second's worth of frames
    stride = 1 if p_pad < 0.5 else int(cfg.frame_rate) + 1
    bound = C.tts_frames(len(ids), cfg)
    gen, text = C.generate(dict(lm=lm, vae=C.VAE(cfg).eval()), cfg, bound, sentence=ids)
    said = [s for s, t in enumerate(text) if t != lm.pad_id]
    assert said == [stride * i for i in range(len(ids) + 1)] and text[said[-1]] == lm.eos_id
    assert [text[s] for s in said[:-1]] == ids
    assert gen.shape[1] == said[-1] + cfg.text_delay + 1 < bound


def test_text_dropout_for_guidance():
    """Training reads PAD for the text of text_drop of the sequences (the generator's first draw) and takes no
    text loss from them (their targets can change without moving it); eval drops nothing."""
    lm, cfg = tiny_lm(text_drop=0.5)
    batch = fake_batch(cfg, B=4, S=12)
    seen, inputs = [], lm.inputs
    lm.inputs = lambda prev, text: seen.append(text.clone()) or inputs(prev, text)
    keep = torch.rand(4, 1, generator=torch.Generator().manual_seed(2)) >= 0.5
    assert 0 < int(keep.sum()) < 4
    lm.train()
    out = C.lm_losses(lm, batch, cfg, 1.0, torch.Generator().manual_seed(2))
    assert torch.equal(seen[-1], torch.where(keep, batch["text"], lm.pad_id))
    other = dict(batch, text=torch.where(keep, batch["text"], (batch["text"] + 1) % cfg.text_vocab))
    again = C.lm_losses(lm, other, cfg, 1.0, torch.Generator().manual_seed(2))
    assert torch.equal(out["text_ce"], again["text_ce"])  # the dropped rows' targets do not count
    lm.eval()
    C.lm_losses(lm, batch, cfg, 1.0, torch.Generator().manual_seed(2))
    assert torch.equal(seen[-1], batch["text"])          # eval: every text kept

# ----------------------------------------------------------------------------- the consistency head (§3.3, Eq. 3)

def test_boundary_condition_and_one_step_shapes():
    lm, cfg = tiny_lm(head_loss="scm")
    head = lm.head
    x, z = torch.randn(5, cfg.latent_dim), torch.randn(5, cfg.lm_dim)
    assert torch.equal(head.consistency(x, torch.zeros(5), z), x)  # f(x, 0) = x exactly
    t = torch.full((5,), math.pi / 2)
    assert torch.allclose(head.consistency(x, t, z), -cfg.sigma_d * head(x / cfg.sigma_d, t, z), atol=1e-6)
    for steps in (1, 4):
        out = head.sample(z, 0.8, steps)
        assert out.shape == (5, cfg.latent_dim) and torch.isfinite(out).all()
    assert torch.equal(head.sample(z, 0.0), head.sample(z, 0.0))  # temperature 0: zero noise, deterministic
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(5, cfg.latent_dim, generator=g) * math.sqrt(0.5)  # temperature = variance
    assert torch.allclose(head.sample(z, 0.5, 1, torch.Generator().manual_seed(0)), head.consistency(noise, t, z))


def test_time_proposal_range():
    cfg = make_cfg()
    t = C.sample_t(20000, cfg, "cpu", torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < math.pi / 2
    assert abs(t.median().item() - math.atan(math.exp(cfg.p_mean) / cfg.sigma_d)) < 0.02  # arctan(e^tau / sigma_d)


def _head_and_weight(cfg, seed=0):
    torch.manual_seed(seed)
    head, weight = C.ConsistencyHead(cfg), C.AdaptiveWeight(lsd=cfg.head_loss == "lsd")
    proj = nn.Linear(4, cfg.lm_dim)
    for p in list(head.parameters()) + list(weight.parameters()):
        nn.init.normal_(p, 0, 0.3)  # no zero-initialised layer: every gradient path is live
    return head, weight, proj


def sgd_step(nets, loss):  # one SGD step (lr 0.1) of every net's weights on loss
    opt = torch.optim.SGD([p for net in nets for p in net.parameters()], lr=0.1)
    opt.zero_grad()
    loss.backward()
    opt.step()


def same_weights(nets, ref_nets):  # (head, weight, proj) against the reference's after their steps
    for tag, net, ref in zip(("", "w.", "proj."), nets, ref_nets):
        for (n, p), q in zip(net.named_parameters(), ref.parameters()):
            assert torch.allclose(p, q, atol=1e-5), f"{tag}{n} differs after the step: {(p - q).abs().max():.2e}"


@pytest.mark.parametrize("r", [1.0, 0.4])
def test_golden_scm_step(r):
    """One SGD step of calm.scm_loss against Eq. 3 written out here: the tangent df-/dt by slow reverse-mode
    autograd through f(x_t(t), t) = cos t x_t - sin t sigma_d F(x_t / sigma_d, t, Z) (r = 1: g = cos t df-/dt); with
    the warm-up r < 1, sCM's Algorithm 1 with dF-/dt by autograd. Loss and updated weights must agree."""
    cfg = make_cfg(sigma_d=0.7, head_loss="scm")
    head, weight, proj = _head_and_weight(cfg)
    ref_head, ref_weight, ref_proj = copy.deepcopy(head), copy.deepcopy(weight), copy.deepcopy(proj)
    N, L, sd = 6, cfg.latent_dim, cfg.sigma_d
    x0, c = torch.randn(N, L), torch.randn(N, 4)
    loss, _ = C.scm_loss(head, weight, x0, proj(c), cfg, r, torch.Generator().manual_seed(5))
    sgd_step((head, weight, proj), loss)
    # the reference: draws in the same order (t, then eps)
    g = torch.Generator().manual_seed(5)
    tau = torch.randn(N, generator=g) * cfg.p_std + cfg.p_mean
    t0 = torch.atan(tau.exp() / sd)
    eps = torch.randn(N, L, generator=g) * sd
    z = ref_proj(c)
    zd = z.detach()
    t = t0.clone().requires_grad_(True)
    ct, st = torch.cos(t)[:, None], torch.sin(t)[:, None]
    x_t = ct * x0 + st * eps
    Fm = ref_head(x_t / sd, t, zd)  # F_theta- (the gradient below is w.r.t. t only)
    f = ct * x_t - st * sd * Fm
    target = f if r == 1.0 else Fm  # r = 1: df/dt itself; else dF/dt for Algorithm 1
    d_dt = torch.stack([torch.autograd.grad(target[:, d].sum(), t, retain_graph=True)[0] for d in range(L)], -1)
    with torch.no_grad():
        ct, st, x_t, Fm = ct.detach(), st.detach(), x_t.detach(), Fm.detach()
        dxt = ct * eps - st * x0
        gvec = ct * d_dt if r == 1.0 else -ct ** 2 * (sd * Fm - dxt) - r * ct * st * (x_t + sd * d_dt)
        gvec = gvec / (gvec.norm(dim=-1, keepdim=True) + cfg.tangent_c)
    w = ref_weight(t0)
    ref_loss = (w.exp() * (ref_head(x_t / sd, t0, z) - Fm - gvec).pow(2).sum(-1) / L - w).mean()
    assert torch.allclose(loss, ref_loss, atol=1e-5), (loss.item(), ref_loss.item())
    sgd_step((ref_head, ref_weight, ref_proj), ref_loss)
    same_weights((head, weight, proj), (ref_head, ref_weight, ref_proj))


@pytest.mark.parametrize("every", [1, 4])
def test_golden_lsd_step(every):
    """One SGD step of calm.lsd_loss against App. A's objective written out here: the flow-matching term on
    x_t = t x + (1 - t) eps against x - eps, and the self-distillation term with dv/dt by slow reverse-mode
    autograd per output (not a JVP), its target v(t, t, X) detached; weights e^w / dim, - w; 0.75 : 0.25,
    the second x every when it is computed every `every` steps. Loss and updated weights must agree; without
    the distillation term the loss is 0.75 x the flow term."""
    cfg = make_cfg(head_loss="lsd", lsd_distill_every=every)
    head, weight, proj = _head_and_weight(cfg)
    ref_head, ref_weight, ref_proj = copy.deepcopy(head), copy.deepcopy(weight), copy.deepcopy(proj)
    N, L = 6, cfg.latent_dim
    x, c = torch.randn(N, L), torch.randn(N, 4)
    loss, _ = C.lsd_loss(head, weight, x, proj(c), cfg, torch.Generator().manual_seed(5))
    sgd_step((head, weight, proj), loss)
    # the reference: draws in the same order (eps, the diagonal's t, then the pair (s, t))
    g = torch.Generator().manual_seed(5)
    eps = torch.randn(N, L, generator=g)
    t = torch.sigmoid(torch.randn(N, 1, generator=g) + 0.4)[:, 0]  # logit-normal N(0.4, 1)
    pair = torch.sigmoid(torch.randn(N, 2, generator=g) + 0.4)
    s2, t2 = pair.min(-1)[0], pair.max(-1)[0]
    z = ref_proj(c)
    x_t = t[:, None] * x + (1 - t[:, None]) * eps
    w = ref_weight(t, t)
    flow = (w.exp() * (ref_head(x_t, t, z, t) - (x - eps)).pow(2).sum(-1) / L - w).mean()
    x_s = s2[:, None] * x + (1 - s2[:, None]) * eps
    tt = t2.clone().requires_grad_(True)
    v = ref_head(x_s, tt, z, s2)
    dv_dt = torch.stack([torch.autograd.grad(v[:, d].sum(), tt, create_graph=True)[0] for d in range(L)], -1)
    jump = x_s + (t2 - s2)[:, None] * v
    target = ref_head(jump, t2, z, t2).detach()
    w2 = ref_weight(t2, s2)
    err = (v + (t2 - s2)[:, None] * dv_dt - target).pow(2).sum(-1)
    ref_loss = 0.75 * flow + 0.25 * every * (w2.exp() * err / L - w2).mean()
    assert torch.allclose(loss, ref_loss, atol=1e-5), (loss.item(), ref_loss.item())
    flow_only, _ = C.lsd_loss(ref_head, ref_weight, x, z, cfg, torch.Generator().manual_seed(5), distill=False)
    assert torch.allclose(flow_only, 0.75 * flow, atol=1e-6)
    sgd_step((ref_head, ref_weight, ref_proj), ref_loss)
    same_weights((head, weight, proj), (ref_head, ref_weight, ref_proj))


def test_lsd_sampling_jumps_along_the_flow():
    """lsd sampling: eps ~ N(0, temp I), then x <- x + v(i / n, (i + 1) / n, x) / n for i < n; the time
    features of the lsd head are sinusoids of t itself (no x1000)."""
    lm, cfg = tiny_lm(head_loss="lsd")
    head = lm.head
    z = torch.randn(5, cfg.lm_dim)
    full = lambda v: torch.full((5,), float(v))
    eps = torch.randn(5, cfg.latent_dim, generator=torch.Generator().manual_seed(0)) * math.sqrt(0.5)
    one = eps + head(eps, full(1), z, full(0))
    assert torch.allclose(head.sample(z, 0.5, 1, torch.Generator().manual_seed(0)), one, atol=1e-6)
    mid = eps + head(eps, full(0.5), z, full(0)) / 2
    two = mid + head(mid, full(1), z, full(0.5)) / 2
    assert torch.allclose(head.sample(z, 0.5, 2, torch.Generator().manual_seed(0)), two, atol=1e-6)
    seen = []
    for emb in (head.time_embed, head.start_embed):  # t, then s
        emb.mlp.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    head(eps, full(0.3), z, full(0.1))
    w = torch.tensor([10000.0 ** (-k / 128) for k in range(128)])
    for got, tt in zip(seen, (0.3, 0.1)):
        ang = tt * w[None].expand(5, -1)
        assert torch.allclose(got, torch.cat([ang.cos(), ang.sin()], -1), atol=1e-6)


def test_lsd_distills_every_nth_step(monkeypatch):
    """The self-distillation term on steps 1, 1 + every, ... of the step counter (every rank alike; a resume
    continues the count), pinned with every = 2 over five steps."""
    cfg = make_cfg(stage="lm", lsd_distill_every=2)
    rt = common.setup(cfg, log_to_file=False)
    state = C.build(cfg, rt)
    seen, real = [], C.lsd_loss
    monkeypatch.setattr(C, "lsd_loss", lambda *a: seen.append(a[-1]) or real(*a))
    for _ in range(5):
        C.train_step(state, fake_batch(cfg), cfg, rt)
    assert seen == [True, False, True, False, True], seen


def test_tangent_warmup_schedule(monkeypatch):
    """sCM's tangent warm-up r = min(1, step / H), the step counted from 1 at the first update and kept in the
    state (a resume continues it). Pinned at known steps with H = 4: 1/4, 1/2, 3/4, 1, 1."""
    cfg = make_cfg(stage="lm", tangent_warmup=4, head_loss="scm")
    rt = common.setup(cfg, log_to_file=False)
    state = C.build(cfg, rt)
    seen, real = [], C.lm_losses
    monkeypatch.setattr(C, "lm_losses", lambda m, b, c, r, g=None, distill=True: seen.append(r)
                        or real(m, b, c, r, g, distill))
    batch = fake_batch(cfg)
    for _ in range(5):
        C.train_step(state, batch, cfg, rt)
    assert seen == [0.25, 0.5, 0.75, 1.0, 1.0], seen
    assert state["counter"].state_dict() == {"step": 5}


def test_time_embedding_is_sinusoids_of_1000_t():
    """The head's time features: [cos(1000 t w_k), sin(1000 t w_k)], w_k = 10000^(-k / 128), k < 128, on t
    itself (TrigFlow's c_noise(t) = t; the x1000 is ours), transcribed here and compared at the MLP's
    input."""
    emb = C.TimestepEmbedder(16)
    t = torch.tensor([0.0, 0.01, 0.7, math.pi / 2])
    seen = []
    emb.mlp.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    emb(t)
    w = torch.tensor([10000.0 ** (-k / 128) for k in range(128)])
    ang = 1000 * t[:, None] * w
    assert torch.allclose(seen[0], torch.cat([ang.cos(), ang.sin()], -1), atol=1e-3)  # fp32 at angles ~1600


def test_text_stream_targets_are_shifted():
    """The text cross-entropy: position s (which has read text token s) predicts token s + 1, counted
    where frame s + 1 is valid. Transcribed here as logsumexp - the target's logit on the backbone output."""
    lm, cfg = tiny_lm()
    lm.eval()
    batch = fake_batch(cfg, B=2, S=9)
    seen = []
    lm.norm.register_forward_hook(lambda m, i, o: seen.append(o))
    got = C.lm_losses(lm, batch, cfg, 1.0)["text_ce"]
    logits = lm.text_out(seen[0]).double()  # (B, S, V)
    text, valid = batch["text"], batch["valid"]
    num = den = 0.0
    for b in range(2):
        for s in range(8):
            if valid[b, s + 1]:
                num += torch.logsumexp(logits[b, s], 0) - logits[b, s, text[b, s + 1]]
                den += 1
    assert abs(got.item() - (num / den).item()) < 1e-5, (got.item(), (num / den).item())
    losses = C.lm_losses(lm, batch, cfg, 1.0)
    assert torch.allclose(losses["loss"], losses["lsd"] + 1.0 * losses["text_ce"])  # lambda_text = 1


@pytest.mark.parametrize("head_loss", ["lsd", "scm"])
def test_head_batch_multiplier_reuses_z(monkeypatch, head_loss):
    lm, cfg = tiny_lm(head_batch_mul=3, head_loss=head_loss)
    seen = {}
    real = getattr(C, f"{head_loss}_loss")
    monkeypatch.setattr(C, f"{head_loss}_loss", lambda head, w, x0, z, *a, **k: seen.update(x0=x0, z=z) or real(head, w, x0, z, *a, **k))
    batch = fake_batch(cfg)
    C.lm_losses(lm, batch, cfg, 1.0)
    n = int(batch["valid"].sum())
    assert seen["z"].shape[0] == 3 * n and torch.equal(seen["z"][:n], seen["z"][n:2 * n])  # Z once, 3 draws
    assert torch.equal(seen["x0"][:n], seen["x0"][2 * n:])

# ----------------------------------------------------------------------------- causality

def test_backbone_and_short_context_causal():
    lm, cfg = tiny_lm()
    lm.eval()
    batch = fake_batch(cfg, B=1, S=10)
    clean = lm.normalize(batch["latent"])
    s = 6

    def Z(cl, text):
        x = lm.inputs(torch.nn.functional.pad(cl, (0, 0, 1, 0))[:, :10], text)
        x = torch.cat([lm.bos.expand(1, 1, -1) + lm.text_emb(text[:, :1]), x[:, 1:]], 1)
        return lm.backbone(x), lm.short_context(cl)
    h0, s0 = Z(clean, batch["text"])
    cl2, tx2 = clean.clone(), batch["text"].clone()
    cl2[:, s:] += 5.0  # frame s and later changed: Z_0..Z_s (which predict frames 0..s) must not move
    tx2[:, s + 1:] = 0
    h1, s1 = Z(cl2, tx2)
    assert torch.allclose(h0[:, :s + 1], h1[:, :s + 1], atol=1e-6) and not torch.allclose(h0[:, s + 1:], h1[:, s + 1:])
    assert torch.allclose(s0[:, :s + 1], s1[:, :s + 1], atol=1e-6)
    # the short-context window is exactly K frames: frame s - K - 1 and before do not reach Z_s
    cl3 = clean.clone()
    cl3[:, :s - cfg.short_context] += 5.0
    assert torch.allclose(lm.short_context(cl3)[:, s], s0[:, s], atol=1e-6)
    assert not torch.allclose(lm.short_context(cl3)[:, s - 1], s0[:, s - 1])


@pytest.mark.parametrize("head", ["consistency", "rvq"])
def test_training_path_causal(head):
    """lm_losses itself (not a re-implementation): the backbone output at position s, which predicts frame s, does not
    move when frame s or a later frame changes (the inputs are shifted by one frame)."""
    lm, cfg = tiny_lm(head=head)
    lm.eval()
    seen = []
    lm.norm.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    batch = fake_batch(cfg, B=1, S=10)
    C.lm_losses(lm, batch, cfg, 1.0)
    b2 = {k: (v.clone() if v is not None else None) for k, v in batch.items()}
    b2["latent"][:, 6:] += 3.0
    if head == "rvq":
        b2["pre"][:, 6:] += 3.0
    C.lm_losses(lm, b2, cfg, 1.0)
    assert torch.allclose(seen[0][:, :7], seen[1][:, :7], atol=1e-6)
    assert not torch.allclose(seen[0][:, 7:], seen[1][:, 7:])


@pytest.mark.parametrize("decoder", ["seanet", "istft"])
def test_vae_causal(decoder):
    """The encoder is causal; so is the SEANet decoder, while the iSTFT head's overlap-add looks n_fft / 2
    samples ahead (a frame's window is centred on it)."""
    cfg = make_cfg(decoder=decoder)
    torch.manual_seed(0)
    vae = C.VAE(cfg).eval()
    fs = vae.frame_size
    x = torch.randn(1, 1, 6 * fs) * 0.1
    y = x.clone()
    y[..., 4 * fs:] = torch.randn(2 * fs) * 0.1
    mx, my = vae.encode(x)[0], vae.encode(y)[0]
    assert torch.allclose(mx[..., :4], my[..., :4], atol=1e-6) and not torch.allclose(mx[..., 4:], my[..., 4:])
    z = torch.randn(1, cfg.latent_dim, 6)
    z2 = z.clone()
    z2[..., 4:] += 1
    ahead = 0 if decoder == "seanet" else 2 * int(np.prod(cfg.ratios))     # n_fft / 2 = 2 hops
    a, b = vae.decode(z), vae.decode(z2)
    assert torch.allclose(a[..., :4 * fs - ahead], b[..., :4 * fs - ahead], atol=1e-6)
    assert not torch.allclose(a[..., 4 * fs - ahead:4 * fs + 1], b[..., 4 * fs - ahead:4 * fs + 1], atol=1e-6)


def test_istft_decoder_by_hand():
    """--decoder=istft's head, transcribed: per frame the out conv's first n_fft/2 + 1 channels are
    log-magnitudes (capped at ln 100), the rest phases; each frame's irfft (n_fft = 4 hop) is windowed
    (periodic Hann) and overlap-added every hop samples, divided by the overlap-added squared window, and
    the first n_fft / 2 samples dropped (the frames are centred)."""
    cfg = make_cfg(decoder="istft")
    torch.manual_seed(0)
    dec = C.ISTFTDecoder(cfg)
    with torch.no_grad():
        dec.out.weight.mul_(30.0)                       # loud enough that some magnitudes hit the cap
    seen = {}
    dec.out.register_forward_hook(lambda m, i, o: seen.update(out=o.detach().double().numpy()))
    F_ = 7
    y = dec(torch.randn(2, cfg.dimension, F_)).detach().double().numpy()
    hop = int(np.prod(cfg.ratios))
    n = 4 * hop
    K = n // 2 + 1
    out = seen["out"]
    log_mag, phase = out[:, :K], out[:, K:]
    assert (log_mag > math.log(100)).any()              # the cap is exercised
    spec = np.exp(np.minimum(log_mag, math.log(100))) * np.exp(1j * phase)    # (B, K, F)
    w = np.hanning(n + 1)[:-1]
    full, env = np.zeros((2, (F_ - 1) * hop + n)), np.zeros((F_ - 1) * hop + n)
    for f in range(F_):
        full[:, f * hop:f * hop + n] += np.fft.irfft(spec[:, :, f], n, axis=1) * w
        env[f * hop:f * hop + n] += w ** 2
    want = (full / env)[:, n // 2:n // 2 + F_ * hop]
    assert y.shape == (2, 1, F_ * hop)
    np.testing.assert_allclose(y[:, 0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

# ----------------------------------------------------------------------------- VAE losses, latents, text

def test_vae_reparameterisation():
    cfg = make_cfg()
    torch.manual_seed(0)
    vae = C.VAE(cfg)
    x = torch.randn(2, 1, 2 * vae.frame_size) * 0.1
    seen, dec = {}, vae.decode
    vae.decode = lambda z: seen.setdefault("z", z) is not None and dec(z)
    torch.manual_seed(1)
    _, mu, logvar = vae(x)
    torch.manual_seed(1)
    assert torch.allclose(seen["z"], mu + torch.randn_like(mu) * (0.5 * logvar).exp())  # z = mu + sigma eps


def test_kl_on_hand_gaussian():
    """The KL per latent element, with ln sigma^2's sign: mean over every (example, dim, frame) of
    1/2 (mu^2 + sigma^2 - 1 - ln sigma^2), written out per element here."""
    mu = torch.tensor([[[1.0], [0.0]], [[-2.0], [0.5]]])  # (B=2, latent=2, F=1)
    logvar = torch.tensor([[[0.0], [math.log(4.0)]], [[math.log(0.25)], [0.0]]])
    e = [0.5 * (1 + 1 - 1 - 0), 0.5 * (0 + 4 - 1 - math.log(4)), 0.5 * (4 + 0.25 - 1 - math.log(0.25)),
         0.5 * (0.25 + 1 - 1 - 0)]
    assert abs(C.kl_loss(mu, logvar).item() - sum(e) / 4) < 1e-6  # per element: / 4, not / 2 (summed dims)
    assert C.kl_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)).item() == 0.0  # the prior itself: KL 0
    # d KL / d logvar = (sigma^2 - 1) / 2 / n per element: zero at sigma = 1, negative below (pushes sigma up)
    lv = torch.tensor([[[math.log(0.25), 0.0, math.log(4.0)]]], requires_grad=True)
    C.kl_loss(torch.zeros(1, 1, 3), lv).backward()
    assert torch.allclose(lv.grad[0, 0], torch.tensor([-0.375, 0.0, 1.5]) / 3)


def _two_sweeps(T, sr):
    """Two clips the decoder cannot tell apart without the latent: a 110 Hz buzz (all harmonics) then
    white noise, and the reverse; quiet noise under both keeps the log-mel floor off every bin."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(T) / sr
    buzz = 0.3 * torch.sign(torch.sin(2 * math.pi * 110 * t))
    hiss = 0.1 * torch.randn(T, generator=g)
    first = t < t[T // 2]
    x = torch.stack([torch.where(first, buzz, hiss), torch.where(first, hiss, buzz)])
    return (x + 0.003 * torch.randn(2, T, generator=g))[:, None]  # (2, 1, T)


def test_decoder_uses_the_latent(tmp_path):
    """The real VAE training step (Eq. 2 at the preset's weights: KL per element, log-mel L_f, adversarial
    and feature terms) overfits two clips; then decoding their posterior means must beat decoding zeros by
    more than MARGIN in mel distance (measured 0.46 vs 0.77). A decoder that ignores z, or a bottleneck
    that carries nothing (planted: z = sigma * eps with mu dropped gave 0.76 vs 0.79), leaves the two
    nearly equal."""
    MARGIN = 0.2
    cfg = make_cfg(mode="train", segment=7680, batch_size=2, n_filters=4, dimension=32, lr=3e-3,
                   warmup_iters=1, decay_iters=10_000, out_dir=str(tmp_path))
    rt = common.setup(cfg, log_to_file=False)
    torch.manual_seed(0)
    state = C.build(cfg, rt)
    x = _two_sweeps(cfg.segment, cfg.sample_rate)
    for _ in range(200):
        C.train_step(state, x, cfg, rt)
    vae = state["vae"].eval()
    with torch.no_grad():
        mu = vae.encode(x)[0]
        real = common.mel_distance(vae.decode(mu)[..., :cfg.segment], x, cfg.sample_rate)
        zero = common.mel_distance(vae.decode(torch.zeros_like(mu))[..., :cfg.segment], x, cfg.sample_rate)
    print(f"mel distance: real latent {real:.3f}, zeros {zero:.3f}")
    assert zero - real > MARGIN, (real, zero)


def _power_mel_by_hand(x, n_fft, sr, n_mels):
    """EnCodec's S_i transcribed: reflect-pad (n - hop) / 2 a side, zeros to a whole frame, Hann frames
    every n / 4, |rfft|^2 / sum(w^2), then librosa's HTK mel filters without normalisation. x (N, T) ->
    (N, n_mels, frames)."""
    librosa = pytest.importorskip("librosa")
    hop, side = n_fft // 4, (n_fft - n_fft // 4) // 2
    y = np.pad(x.detach().double().numpy(), ((0, 0), (side, side)), mode="reflect")
    y = np.pad(y, ((0, 0), (0, -(y.shape[1] - n_fft) % hop)))
    w = np.hanning(n_fft + 1)[:-1]  # the periodic Hann window
    starts = range(0, y.shape[1] - n_fft + 1, hop)
    frames = np.stack([y[:, i:i + n_fft] for i in starts], -1)  # (N, n_fft, frames)
    power = np.abs(np.fft.rfft(frames * w[None, :, None], axis=1)) ** 2 / (w ** 2).sum()
    fb = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, htk=True, norm=None)
    return torch.from_numpy(fb @ power)


def test_golden_vae_generator_gradient(tmp_path):
    """One VAE training step: the gradient the VAE receives equals that of Eq. 2 written out here, at the
    weights of Config and the small preset's comment, with the discriminator already updated (D steps first): hinge
    adversarial, relative feature matching, the KL per element, L1 in time and the log-mel L_f (mels
    transcribed above)."""
    W = dict(adv=1.0, feat=3.0, kl=0.01, t=0.1, f=3.0)  # lambda_adv, _feat, _kl, _t, _f (calm.py's Config)
    cfg = make_cfg(mode="train", out_dir=str(tmp_path), segment=3840)
    rt = common.setup(cfg, log_to_file=False)
    torch.manual_seed(0)
    state = C.build(cfg, rt)
    G, D = state["vae"], state["D"]
    x = torch.randn(2, 1, cfg.segment, generator=torch.Generator().manual_seed(1)) * 0.1
    got = {}
    state["opt_g"].step = lambda: got.update({n: p.grad.clone() for n, p in G.named_parameters()})
    torch.manual_seed(7)
    C.train_step(state, x, cfg, rt)
    torch.manual_seed(7)  # the same reparameterisation noise
    G.zero_grad()
    x_hat, mu, logvar = G(x)
    logits, fmap_fake = D(x_hat)
    with torch.no_grad():
        _, fmap_real = D(x)
    adv = sum(torch.clamp(1 - l, min=0).mean() for l in logits) / len(logits)
    pairs = [(r, f) for fr, ff in zip(fmap_real, fmap_fake) for r, f in zip(fr, ff)]
    feat = sum((r - f).abs().mean() / r.abs().mean() for r, f in pairs) / len(pairs)
    kl = (0.5 * (mu ** 2 + torch.exp(logvar) - 1 - logvar)).mean()
    l_t = (x_hat - x).abs().mean()
    l_f = 0
    for i in cfg.mel_scales:
        ref = _power_mel_by_hand(x[:, 0], 2 ** i, cfg.sample_rate, cfg.n_mels)
        est_lin = _power_mel_by_hand(x_hat[:, 0], 2 ** i, cfg.sample_rate, cfg.n_mels)  # values only
        est = C.power_mel(x_hat, 2 ** i, cfg).double()
        assert torch.allclose(est.detach(), est_lin, rtol=1e-4, atol=1e-7), f"S_{i} differs from by hand"
        l_f = l_f + (est - ref).abs().mean() + ((est + 1e-5).log10() - (ref + 1e-5).log10()).pow(2).mean()
    l_f = l_f / len(cfg.mel_scales)
    total = W["adv"] * adv + W["feat"] * feat + W["kl"] * kl + W["t"] * l_t + W["f"] * l_f
    total.backward()
    for n, p in G.named_parameters():
        err = (got[n] - p.grad).abs().max()
        assert torch.allclose(got[n], p.grad.float(), rtol=1e-3, atol=1e-7), f"{n}: {err:.2e}"


@pytest.mark.parametrize("decoder", ["istft", "seanet"])
def test_loss_balance_at_init(decoder):
    """calm.py's small preset comment: at init, on corpus speech, its weighted terms pull the decoder
    output x_hat with gradient norms f : feat : t : adv ~ 1 : 0.003 : 5e-5 : 2e-6 with the iSTFT head, 1 :
    0.1 : 0.002 : 1e-4 with the SEANet decoder (the log-mel L_f leads; the adversarial term grows once D
    learns). Checked here within a factor ~2-3 of those ratios."""
    cfg = make_cfg("small", corpus_hours=0.02, batch_size=4, decoder=decoder)
    wavs = [u.wav for u in C.clips(cfg, "train") if len(u.wav) >= cfg.segment][:4]
    x = torch.from_numpy(np.stack([w[:cfg.segment] for w in wavs]))[:, None]  # (4, 1, 0.96 s)
    torch.manual_seed(0)
    G, D = C.VAE(cfg), C.Discriminator(cfg)
    x_hat, mu, logvar = G(x)
    logits, fake = D(x_hat)
    with torch.no_grad():
        _, real = D(x)
    l_t, l_f = C.reconstruction_losses(x, x_hat, cfg)
    terms = dict(f=cfg.lambda_f * l_f, feat=cfg.lambda_feat * C.feature_loss(real, fake),
                 t=cfg.lambda_t * l_t, adv=cfg.lambda_adv * C.generator_adv_loss(logits))
    norm = {k: torch.autograd.grad(v, x_hat, retain_graph=True)[0].flatten(1).norm(dim=1).mean().item()
            for k, v in terms.items()}
    r = {k: v / norm["f"] for k, v in norm.items()}
    print(r)
    if decoder == "seanet":
        assert 0.04 < r["feat"] < 0.25 and 5e-4 < r["t"] < 6e-3 and r["adv"] < 1e-3, r
    else:
        assert 1e-3 < r["feat"] < 1e-2 and 1.5e-5 < r["t"] < 1.5e-4 and r["adv"] < 1e-4, r


def test_discriminator_and_adversarial_hinges_by_hand():
    """D: mean relu(1 - D(x)) + mean relu(1 + D(x_hat)), averaged over scales; G: mean relu(1 - D(x_hat))."""
    real = [torch.tensor([[2.0, 0.5], [-1.0, 1.0]]), torch.tensor([0.0, 3.0])]
    fake = [torch.tensor([[-2.0, 0.5], [1.0, -0.5]]), torch.tensor([-1.5, 0.0])]
    d1 = (0 + 0.5 + 2 + 0) / 4 + (0 + 1.5 + 2 + 0.5) / 4
    d2 = (1 + 0) / 2 + (0 + 1) / 2
    assert abs(C.discriminator_loss(real, fake).item() - (d1 + d2) / 2) < 1e-6
    g = ((3 + 0.5 + 0 + 1.5) / 4 + (2.5 + 1) / 2) / 2
    assert abs(C.generator_adv_loss(fake).item() - g) < 1e-6


def test_lr_schedule_at_known_steps():
    """Linear warm-up over warmup_iters, then a cosine from 1 to 0.1 at decay_iters, flat after (by hand)."""
    cfg = make_cfg(warmup_iters=4, decay_iters=14)
    f = C._lr_lambda(cfg)
    want = {0: 0.25, 3: 1.0, 4: 1.0, 9: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), 14: 0.1, 50: 0.1}
    for step, v in want.items():
        assert abs(f(step) - v) < 1e-9, (step, f(step), v)


def test_latent_normalisation_round_trip():
    lm, cfg = tiny_lm()
    rng = np.random.default_rng(0)
    packed = [np.concatenate([rng.normal(3, 2, (cfg.latent_dim, n)), np.zeros((2, n))]).astype(np.float32)
              for n in (40, 70)]
    C.fit_latent_stats(lm, packed, cfg)
    x = torch.from_numpy(np.concatenate([p[:cfg.latent_dim] for p in packed], 1).T.copy())
    xn = lm.normalize(x)
    assert torch.allclose(xn.mean(0), torch.zeros(cfg.latent_dim), atol=1e-4)
    assert torch.allclose(xn.std(0, unbiased=False), torch.ones(cfg.latent_dim), atol=1e-3)
    assert torch.allclose(lm.denormalize(xn), x, atol=1e-5)


class _Tok:
    def encode(self, s):
        return [ord(ch) for ch in s.strip()][:2]


def test_text_stream_alignment():
    cfg = make_cfg(stage="lm", text_delay=1)
    words = [("hi", 0.16, 0.4), ("you", 0.8, 1.2)]  # 12.5 Hz: start frames 2 and 10
    ids = C.text_stream(words, 20, _Tok(), cfg)
    pad, eos = cfg.text_vocab, cfg.text_vocab + 1
    want = [pad] * 20
    want[1:3] = [ord("h"), ord("i")]  # frame 2 - delay 1
    want[9:11] = [ord("y"), ord("o")]
    want[14] = eos  # end 1.2 s = frame 15, minus the delay
    assert ids.tolist() == want

# ----------------------------------------------------------------------------- the RVQ baseline

def test_rvq_baseline():
    lm, cfg = tiny_lm(head="rvq", n_q=3, codebook_size=16)
    rng = np.random.default_rng(0)
    packed = [np.concatenate([np.zeros((cfg.latent_dim, 200)), rng.normal(0, 1, (cfg.dimension, 200)),
                              np.zeros((2, 200))]).astype(np.float32)]
    C.fit_rvq(lm, packed, cfg)
    x = torch.from_numpy(packed[0][cfg.latent_dim:cfg.latent_dim + cfg.dimension].T.copy())
    codes = lm.rvq_encode(x)
    errs = [(lm.rvq_decode(codes[:, :q]) - x).pow(2).mean().item() if q else x.pow(2).mean().item() for q in range(4)]
    assert codes.shape == (200, 3) and errs[0] > errs[1] > errs[2] > errs[3]  # each level removes residual
    res = x.clone()
    for q in range(3):  # level q is the nearest entry to what levels < q left
        ref = torch.cdist(res, lm.codebooks[q]).argmin(-1)
        assert torch.equal(codes[:, q], ref)
        res = res - lm.codebooks[q][ref]
    # the depth head's cached sampling (greedy) == argmax of its teacher-forced logits
    z = torch.randn(5, cfg.lm_dim)
    c = lm.depth.sample(z, 0.0)
    assert torch.equal(lm.depth(z, c).argmax(-1), c)
    losses = C.lm_losses(lm, fake_batch(cfg), cfg, 1.0)
    assert set(losses) >= {"ce_rvq", "text_ce", "loss"} and torch.isfinite(losses["loss"])


def test_rvq_depth_shift_and_cross_entropy():
    """The depth head: level q sees code q - 1 (never its own code), and ce_rvq is the mean over frames
    and levels of logsumexp - the true code's logit (transcribed); the LM's total is ce_rvq + 1.0 x
    text_ce."""
    lm, cfg = tiny_lm(head="rvq", n_q=3, codebook_size=16)
    lm.eval()
    z, codes = torch.randn(4, cfg.lm_dim), torch.randint(0, 16, (4, 3))
    base = lm.depth(z, codes)
    c2 = codes.clone()
    c2[:, 1] = (c2[:, 1] + 1) % 16  # change code 1: levels 0 and 1 must not move, level 2 must
    moved = lm.depth(z, c2)
    assert torch.allclose(base[:, :2], moved[:, :2], atol=1e-6)
    assert not torch.allclose(base[:, 2], moved[:, 2])
    batch = fake_batch(cfg)
    seen = []
    lm.depth.register_forward_hook(lambda m, i, o: seen.append((o, i[1])))
    losses = C.lm_losses(lm, batch, cfg, 1.0)
    logits, tgt = seen[0][0].double(), seen[0][1]
    want = (torch.logsumexp(logits, -1) - logits.gather(-1, tgt[..., None])[..., 0]).mean()
    assert abs(losses["ce_rvq"].item() - want.item()) < 1e-5
    assert torch.allclose(losses["loss"], losses["ce_rvq"] + 1.0 * losses["text_ce"])


def test_lm_overfits_one_batch():
    lm, cfg = tiny_lm(seed=1)
    batch = fake_batch(cfg, B=2, S=8)
    opt = torch.optim.Adam(lm.parameters(), lr=3e-3)
    first = None
    for i in range(60):
        losses = C.lm_losses(lm, batch, cfg, 1.0, torch.Generator().manual_seed(0))
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        first = first or losses["text_ce"].item()
    assert losses["text_ce"].item() < first / 3, (first, losses["text_ce"].item())

# ----------------------------------------------------------------------------- sizes

def _count(cfg, cls):
    with torch.device("meta"):
        return sum(p.numel() for p in cls(cfg).parameters())


def test_parameter_counts():
    sp, mu = make_cfg("speech", stage="lm"), make_cfg("music", stage="lm")
    # no official CALM checkpoint exists: these are our builds of the paper's configs (Table 13 VAEs)
    assert _count(sp, C.VAE) == 65_737_601 and _count(mu, C.VAE) == 53_789_249
    # the music backbone is "1.35 B" (MusicGen-Medium's, §4): ours within 2 %
    n = _count(mu, C.CALM)
    assert abs(n - 1.35e9) / 1.35e9 < 0.02, n
    # the speech preset uses Pocket TTS's backbone and head ("90 M generative model", its blog); its lsd head
    # embeds two times (s, t), the sCM head one
    assert _count(sp, C.CALM) == 89_315_489
    assert _count(make_cfg("speech", stage="lm", head_loss="scm"), C.CALM) == 88_871_201

# ----------------------------------------------------------------------------- command line

def test_bad_input():
    for kw, match in ((dict(stage="lm", mode="train", vae="/nonexistent/ckpt.pt"), "--vae"),
                      (dict(head="diffusion"), "--head must be one of"), (dict(segment=1000), "--segment"),
                      (dict(mode="sample", text="hi"), "--text needs an LM"), (dict(temperature=-1), "temperature"),
                      (dict(decoder="hifigan"), "--decoder must be one of"),
                      (dict(head_loss="dsm"), "--head_loss must be one of"),
                      (dict(lsd_flow_share=0), "--lsd_flow_share"), (dict(lsd_distill_every=0), "lsd_distill_every"),
                      (dict(lm_corpus_hours=-1), "--lm_corpus_hours"),
                      (dict(decoder="istft", channels=2), "--decoder=istft writes one channel")):
        one_line_error(lambda: make_cfg(**kw), match=match)


def _tiny_vae_ckpt(path):
    cfg = make_cfg(out_dir=str(path))
    state = C.build(cfg, common.setup(cfg, log_to_file=False))
    return common.save_checkpoint(cfg, 0, state)


def test_cli_lm_stage(tmp_path):
    vae = _tiny_vae_ckpt(tmp_path / "vae")
    out = check_cli_contract("calm.py", tmp_path, flags=("--stage=lm", f"--vae={vae}"),
                             bench_keys=("head_latents_per_s_consistency", "head_latents_per_s_rvq", "rtf_consistency",
                                         "rtf_rvq", "head_speedup", "overall_speedup"))
    assert "eval (val, lm, consistency)" in out["train"] and "latent_mse" in out["eval"]
    assert "tts_consistency" in out["sample"]


def test_lm_stage_reads_lm_corpus_hours(monkeypatch):
    """--lm_corpus_hours: the corpus the LM stage reads (its train, val and test clips); the VAE stage, and an
    LM with 0, read corpus_hours."""
    seen = []
    monkeypatch.setattr(common, "load_corpus", lambda cfg, split, sr, kind: seen.append(cfg.corpus_hours) or [])
    for stage, lm_hours in (("lm", 2.0), ("vae", 2.0), ("lm", 0.0)):
        C.clips(make_cfg(stage=stage, corpus_hours=0.5, lm_corpus_hours=lm_hours), "train")
    assert seen == [2.0, 0.5, 0.5]


def test_lm_max_iters_sets_the_lm_stages_steps_and_horizon(tmp_path, monkeypatch):
    """--lm_max_iters: the LM stage's steps and cosine horizon, whatever max_iters (the VAE's) says."""
    vae = _tiny_vae_ckpt(tmp_path / "vae")
    seen = {}
    real = C._lr_lambda
    monkeypatch.setattr(C, "_lr_lambda", lambda cfg: seen.update(decay=cfg.decay_iters) or real(cfg))
    cfg = make_cfg(stage="lm", mode="train", vae=vae, max_iters=10, lm_max_iters=3, out_dir=str(tmp_path / "lm"))
    C.train(cfg)
    assert torch.load(tmp_path / "lm" / "ckpt.pt", weights_only=False)["step"] == 3 and seen["decay"] == 3


def test_vae_stage_trains_and_resumes_exactly(tmp_path):
    """The VAE stage in-process (cheaper than three more processes): 2 steps + resume to 3 == 3 straight steps,
    every weight bit for bit (VAE, discriminator), and the val eval line runs. With the small preset's
    iSTFT head (the command-line test runs the SEANet decoder)."""
    def run(out, steps, init="scratch"):
        cfg = make_cfg(mode="train", max_iters=steps, init_from=init, out_dir=str(tmp_path / out), eval_interval=2,
                       decoder="istft")
        C.train(cfg)
        return torch.load(tmp_path / out / "ckpt.pt", weights_only=True)
    run("a", 2)
    a = run("a", 3, "resume")
    b = run("b", 3)
    assert a["step"] == b["step"] == 3
    for net in ("vae", "D"):
        for k, v in b["models"][net].items():
            assert torch.equal(v, a["models"][net][k]), f"{net}.{k} differs between resumed and straight runs"
    assert os.path.exists(tmp_path / "a" / "samples" / "step000002")
