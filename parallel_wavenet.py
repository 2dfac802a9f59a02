"""
Parallel WaveNet: Fast High-Fidelity Speech Synthesis (van den Oord et al., 2017)
https://arxiv.org/abs/1711.10433

The idea: WaveNet trains in parallel but samples one step at a time. An inverse autoregressive flow (IAF)
turns that around: logistic noise z goes in and x_t = z_t·s(z_<t) + μ(z_<t) comes out for every t at
once, since s and μ are causal convolutions over the *noise*, known up front (§3). Four such flows, each
a WaveNet without skips, are stacked; the result is still one logistic per step, so its entropy and
log-determinant are exact sums of log-scales. Maximum likelihood would need the sequential inverse, so
the student is distilled from a trained autoregressive teacher (§4): probability density distillation
minimises KL(P_S‖P_T) = H(P_S, P_T) − H(P_S); the teacher scores the student's samples in ONE parallel
pass, and the student's entropy is closed form. A power loss (§4.1) keeps the average spectrum of speech
(without it the student whispers); a contrastive loss (§4.1, flag) pushes the student away from the
teacher under the wrong conditioning. The teacher (§2.1) is the improved WaveNet: 16-bit audio, a
discretised mixture of 10 logistics as output, filter size 3. Two stages, one folder and checkpoint each
(out/parallel_wavenet/{teacher,student}/ckpt.pt); the student's carries its teacher.

Changed versus the paper (707 lines, over the 550 aim: two models, teacher MoL, cached and flow sampling):
- mel conditioning (transposed-conv upsampling as wavenet.py, one shared by the four flows), not linguistic
  features + log F0; no speaker embedding; the built-in eSpeak corpus.
- widths (not in the paper): the teacher's are bfs18's MoL WaveNet (512 residual, 256 skip; gates 2 × 512
  ours); the student's the paper's 64 units. The power loss's STFT and its 100 draws per step are bfs18's.
- the cross-entropy uses the teacher's mixture *density* (likelihood over the bin width): nats per sample.
- no perceptual loss (§4.1), no Polyak averaging; gradient clipping, Adam with a short warm-up; log-scales
  clamped (student flows to bfs18's [-9, 7], teacher at r9y9's -7); each flow starts at μ = 0, log s = -1;
  logged losses are rank 0's under torchrun.

    python parallel_wavenet.py --stage=teacher     # 1. train the autoregressive MoL teacher
    python parallel_wavenet.py --stage=student     # 2. distil it (reads out/parallel_wavenet/teacher/ckpt.pt)
    python parallel_wavenet.py --stage=student --init_from=resume
    python parallel_wavenet.py --mode=sample --init_from=out/parallel_wavenet/student/ckpt.pt  # one pass
    python parallel_wavenet.py --mode=eval --init_from=out/parallel_wavenet/teacher/ckpt.pt   # NLL, mel L1
    python parallel_wavenet.py --mode=bench        # student one pass vs teacher cached steps, batch 1
    torchrun --standalone --nproc_per_node=8 parallel_wavenet.py --stage=student
"""
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    mode: str = "train"               # train | sample | eval | bench
    stage: str = "teacher"            # teacher (autoregressive WaveNet, MoL) | student (IAF, distilled)
    preset: str = "paper"             # a key of PRESETS
    init_from: str = "scratch"        # scratch | resume | path to one of our checkpoints
    out_dir: str = "out/parallel_wavenet/{stage}"   # one folder (ckpt.pt, log.txt, samples/) per stage
    teacher: str = "out/parallel_wavenet/teacher/ckpt.pt"  # --stage=student: the trained teacher to distil
    sampler: str = "auto"             # sample/eval: auto (the stage's model) | student | teacher
    data_dir: str = ""                # empty: the built-in speech corpus
    corpus_hours: float = 2.0         # size of the built-in corpus (hours)
    input: str = ""                   # --mode=sample: vocode this wav's mel instead of held-out speech
    # audio and features
    sample_rate: int = 24000          # §2.1: 24 kHz ...
    bits: int = 16                    # ... and 16-bit samples (the MoL grid has 2**bits levels in [-1, 1])
    n_fft: int = 1024                 # mel STFT size
    hop: int = 256                    # samples per mel frame; = prod(upsample_scales)
    n_mels: int = 80                  # mel bins of the conditioning
    fmin: float = 0.0                 # mel filterbank range (Hz)
    fmax: float = 12000.0             # Nyquist at 24 kHz
    upsample_scales: tuple = (16, 16)  # transposed-conv upsampling of the mel, product = hop
    freq_axis_kernel: int = 3         # mel-axis width of the upsampling kernels
    # teacher (§2.1; widths from bfs18's wavenet_mol config)
    layers: int = 30                  # dilated layers
    stacks: int = 3                   # repeats of the dilation cycle 1, 2, ..., 512
    kernel_size: int = 3              # §2.1: filter size raised from 2 to 3
    residual_channels: int = 512      # residual stream width
    gate_channels: int = 1024         # dilated conv output, split into tanh and sigmoid halves
    skip_channels: int = 256          # skip connections and output head
    n_mix: int = 10                   # logistic components of the output (§2.1, PixelCNN++ style)
    log_scale_min: float = -7.0       # teacher log-scale floor (r9y9)
    # student (§3: 4 flows of 10, 10, 10, 30 layers, 64 units, no skips)
    flow_layers: tuple = (10, 10, 10, 30)  # layers per flow
    flow_cycle: int = 10              # dilations 1, 2, ..., 2**(flow_cycle-1), repeated within a flow
    flow_channels: int = 64           # residual width (gates are twice that)
    flow_kernel: int = 3              # filter size of the flows' dilated convs
    # losses (§4, §4.1)
    n_draws: int = 100                # student draws of x_t per step for the cross-entropy (bfs18: 100)
    power_weight: float = 1.0         # power loss weight (bfs18 power_loss_factor)
    power_n_fft: int = 1024           # STFT frame of the power loss (not in the paper)
    contrastive: bool = False         # add the contrastive term (§4.1); costs a second teacher pass
    contrastive_gamma: float = 0.3    # §4.1: γ
    # training
    segment: int = 7680               # training crop in samples (bfs18; ~320 ms at 24 kHz)
    batch_size: int = 32              # addendum: 32 (teacher)
    lr: float = 2e-4                  # Adam (addendum, inferred)
    betas: tuple = (0.9, 0.999)       # Adam
    warmup_iters: int = 200           # linear lr warm-up (ours)
    grad_clip: float = 1.0            # gradient norm clipping (ours)
    max_iters: int = 1_000_000        # addendum: 1000k teacher steps
    log_interval: int = 50
    eval_interval: int = 1000         # also the checkpoint interval
    eval_items: int = 4               # held-out utterances for evaluate()
    eval_seconds: float = 2.0         # crop per utterance: NLL, KL and the student's vocoding
    eval_gen_seconds: float = 0.5     # crop the teacher vocodes autoregressively in evaluate()
    gen_seconds: float = 2.0          # audio --mode=sample vocodes
    # runtime
    bench_steps: int = 1024           # teacher cached steps --mode=bench times (the student: as many at once)
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"               # bf16 autocast on CUDA for training, fp32 elsewhere
    compile: bool = True

    def validate(self):
        def bad(msg):
            raise SystemExit(f"error: {msg}")
        if self.stage not in ("teacher", "student"):
            bad(f"--stage must be teacher or student (got {self.stage!r})")
        if self.sampler not in ("auto", "student", "teacher"):
            bad(f"--sampler must be auto, student or teacher (got {self.sampler!r})")
        if math.prod(self.upsample_scales) != self.hop:
            bad(f"--upsample_scales {self.upsample_scales} must multiply to --hop={self.hop}")
        if self.segment % self.hop:
            bad(f"--segment={self.segment} must be a multiple of --hop={self.hop}")
        if self.layers < 1 or self.stacks < 1 or self.layers % self.stacks:
            bad(f"--layers={self.layers} must be a positive multiple of --stacks={self.stacks}")
        if not self.flow_layers or min(self.flow_layers) < 1 or self.flow_cycle < 1:
            bad(f"--flow_layers must be positive layer counts (got {self.flow_layers})")
        if min(self.kernel_size, self.flow_kernel) < 2:
            bad("--kernel_size and --flow_kernel must be >= 2")
        if not 2 <= self.bits <= 16:
            bad(f"--bits must be in 2..16 (got {self.bits})")
        if self.n_mix < 1 or self.n_draws < 1:
            bad("--n_mix and --n_draws must be >= 1")
        if self.power_n_fft > self.segment:
            bad(f"--power_n_fft={self.power_n_fft} must not exceed --segment={self.segment}")
        if self.stage == "student" and self.mode == "train" and self.init_from == "scratch" \
                and not os.path.isfile(self.teacher):
            bad(f"--stage=student distils a trained teacher: no checkpoint at --teacher={self.teacher!r} "
                "(train one with --stage=teacher, or pass --teacher=PATH)")
        if self.contrastive and self.batch_size < 2:
            bad("--contrastive needs --batch_size >= 2 (the wrong conditioning comes from another item)")


PRESETS = {
    # teacher 61.31 M params (RF 6139 samples = 256 ms at 24 kHz); student 4 flows 10/10/10/30 x 64: 2.35 M
    "paper": dict(),
    # CPU: 16 kHz, teacher 12 x 32, 0.18 M (RF 253 samples = 16 ms: the mel carries the rest);
    # student 4/4/4/8 x 32, 0.25 M
    "small": dict(sample_rate=16000, fmax=8000.0, layers=12, stacks=2, residual_channels=32, gate_channels=64,
                  skip_channels=64, flow_layers=(4, 4, 4, 8), flow_cycle=8, flow_channels=32, n_draws=20,
                  power_n_fft=512, segment=2048, batch_size=4, lr=1e-3, max_iters=500, eval_interval=250,
                  eval_items=2, eval_seconds=1.0, eval_gen_seconds=0.25, gen_seconds=2.0, bench_steps=512),
    "tiny": dict(sample_rate=16000, fmax=8000.0, n_mels=20, layers=4, stacks=2, residual_channels=8,
                 gate_channels=16, skip_channels=16, n_mix=3, flow_layers=(2, 2), flow_cycle=2,
                 flow_channels=8, n_draws=4, power_n_fft=256, segment=1024, batch_size=2, max_iters=10,
                 warmup_iters=2, corpus_hours=0.02, log_interval=1, eval_items=2, eval_seconds=0.25,
                 eval_gen_seconds=0.048, gen_seconds=0.048, bench_steps=32),
}

TEACHER_KEYS = ("sample_rate", "bits", "n_fft", "hop", "n_mels", "fmin", "fmax", "upsample_scales",
                "freq_axis_kernel", "layers", "stacks", "kernel_size", "residual_channels", "gate_channels",
                "skip_channels", "n_mix", "log_scale_min")
ARCH_KEYS = TEACHER_KEYS + ("stage", "flow_layers", "flow_cycle", "flow_channels", "flow_kernel")

# ----------------------------------------------------------------------------- model

def receptive_field(cfg):
    """The teacher's: a causal conv of kernel k and dilation d sees (k-1)·d more past samples."""
    per_stack = cfg.layers // cfg.stacks
    return (cfg.kernel_size - 1) * sum(2 ** (i % per_stack) for i in range(cfg.layers)) + 1


def shift_right(x):                                  # (B, T) -> (B, T): x_{t-1} at t, silence at t = 0
    return F.pad(x[:, :-1], (1, 0))


class Upsampler(nn.Module):
    """Mel frames to the sample rate: 1-channel ConvTranspose2d stages over (mel bin, time), as wavenet.py."""
    def __init__(self, cfg):
        super().__init__()
        self.stages = nn.ModuleList()
        for s in cfg.upsample_scales:
            fk = cfg.freq_axis_kernel
            conv = nn.ConvTranspose2d(1, 1, (fk, 2 * s), stride=(1, s), padding=(fk // 2, s // 2))
            nn.init.constant_(conv.weight, 1.0 / (2 * fk))  # start as a smooth interpolator
            nn.init.zeros_(conv.bias)
            self.stages.append(conv)

    def forward(self, mel):                          # mel: (B, M, N)
        c = mel[:, None]                             # (B, 1, M, N)
        for conv in self.stages:
            c = conv(c)[..., : c.size(-1) * conv.stride[1]]  # (B, 1, M, N·s)
        return c[:, 0]                               # (B, M, N·hop)


class ResidualLayer(nn.Module):
    """Teacher layer: dilated causal conv -> gated unit with mel conditioning -> residual, skip 1×1 convs."""
    def __init__(self, cfg, dilation, last=False):
        super().__init__()
        self.dilation, self.k = dilation, cfg.kernel_size
        R, G, S = cfg.residual_channels, cfg.gate_channels, cfg.skip_channels
        self.conv = nn.Conv1d(R, G, cfg.kernel_size, dilation=dilation)
        self.cond = nn.Conv1d(cfg.n_mels, G, 1, bias=False)
        # the last residual output would feed nothing
        self.out = nn.Conv1d(G // 2, R, 1) if not last else None
        self.skip = nn.Conv1d(G // 2, S, 1)
        self.register_buffer("taps", dilation * torch.arange(self.k - 1, 0, -1), persistent=False)

    def forward(self, x, c):                         # x: (B, R, T), c: (B, M, T)
        h = self.conv(F.pad(x, ((self.k - 1) * self.dilation, 0))) + self.cond(c)  # left pad only: causal
        a, b = h.chunk(2, dim=1)                     # (B, G/2, T) each
        z = torch.tanh(a) * torch.sigmoid(b)
        if self.out is None:
            return x, self.skip(z)
        return (x + self.out(z)) * math.sqrt(0.5), self.skip(z)

    def step(self, x, queue, t, cond):
        """Fast WaveNet: one column at time t from a ring buffer (B, R, (k-1)·d) of past inputs."""
        n = queue.size(2)
        past = queue[:, :, (t - self.taps) % n]                       # (B, R, k-1), oldest first
        window = torch.cat([past, x[:, :, None]], dim=2)             # (B, R, k), as the kernel's taps
        queue[:, :, t % n] = x                                        # x_t replaces the oldest slot just read
        h = F.linear(window.flatten(1), self.conv.weight.flatten(1), self.conv.bias) + cond  # (B, G)
        a, b = h.chunk(2, dim=1)
        z = torch.tanh(a) * torch.sigmoid(b)
        s = F.linear(z, self.skip.weight[:, :, 0], self.skip.bias)
        if self.out is None:
            return x, s
        return (x + F.linear(z, self.out.weight[:, :, 0], self.out.bias)) * math.sqrt(0.5), s


class Teacher(nn.Module):
    """§2.1: an autoregressive WaveNet over 16-bit samples whose output is a mixture of n_mix logistics
    (3 numbers per component: mixture logit, mean, log-scale) instead of a softmax over classes."""
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        R, S = cfg.residual_channels, cfg.skip_channels
        self.inp = nn.Conv1d(1, R, 1)                # the real-valued previous sample enters by a 1×1 conv
        per_stack = cfg.layers // cfg.stacks
        self.layers = nn.ModuleList(ResidualLayer(cfg, 2 ** (i % per_stack), last=i == cfg.layers - 1)
                                    for i in range(cfg.layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv1d(S, S, 1), nn.ReLU(), nn.Conv1d(S, 3 * cfg.n_mix, 1))
        self.upsample = Upsampler(cfg)
        self.receptive_field = receptive_field(cfg)

    def net(self, x_prev, c):                        # x_prev: (B, T) the *previous* samples, c: (B, M, T)
        h = self.inp(x_prev[:, None])                # (B, R, T)
        skips = 0
        for layer in self.layers:
            h, s = layer(h, c)
            skips = skips + s
        return self.head(skips * math.sqrt(1.0 / len(self.layers)))  # (B, 3K, T)

    def forward(self, x_prev, mel):                  # teacher forcing: every step scored at once
        return self.net(x_prev, self.upsample(mel)[:, :, :x_prev.size(1)])


def mol_params(h, cfg):
    """(B, 3K, T) head output -> mixture logits, means, log-scales, each (B, K, T), in fp32."""
    logit, mu, log_s = h.float().chunk(3, dim=1)
    return logit, mu, log_s.clamp(min=cfg.log_scale_min)


def mol_log_prob(x, logit, mu, log_s, bits):
    """§2.1 discretised mixture of logistics: log P(x) for x on the 2**bits-level grid of [-1, 1], where each
    level owns the bin x ± Δ (Δ = 1 / (2**bits - 1)) and the two end levels own the tails beyond.
    x broadcasts against the (…, K, T) parameters with a singleton K axis; the result drops K.
    The interior bin is σ(a) − σ(b) = σ(a)·σ(−b)·(1 − e^(b−a)), computed in log space:
    exact in fp32 even where 16-bit bins are far narrower than fp32 can resolve near σ = 1."""
    delta = 1.0 / (2 ** bits - 1)
    inv_s = torch.exp(-log_s)
    plus, minus = inv_s * (x - mu + delta), inv_s * (x - mu - delta)         # (…, K, T)
    log_bin = F.logsigmoid(plus) + F.logsigmoid(-minus) + torch.log(-torch.expm1(-2 * delta * inv_s))
    log_p = torch.where(x < -1 + delta, F.logsigmoid(plus),                  # bottom level: (-inf, -1 + Δ]
                        torch.where(x > 1 - delta, F.logsigmoid(-minus), log_bin))  # top level: [1 - Δ, inf)
    return torch.logsumexp(log_p + F.log_softmax(logit, dim=-2), dim=-2)


def mol_log_density(x, logit, mu, log_s):
    """The continuous mixture density the discretised likelihood approximates (log P ≈ log p + log 2Δ)."""
    u = (x - mu) * torch.exp(-log_s)
    log_pdf = u - log_s - 2 * F.softplus(u)                                  # logistic log-density
    return torch.logsumexp(log_pdf + F.log_softmax(logit, dim=-2), dim=-2)


def quantize(x, bits):
    """Round to the 2**bits-level grid of [-1, 1] (16-bit audio)."""
    n = 2 ** bits - 1
    return torch.round((x.clamp(-1, 1) + 1) / 2 * n) / n * 2 - 1


def draw_mol(h, u, cfg):
    """One sample per (B, T) from the mixture: u (B, 2, T) uniforms pick the component (inverse CDF of the
    mixture weights) and the logistic value. Drawing u up front lets cached and parallel runs be compared."""
    logit, mu, log_s = mol_params(h, cfg)                                   # (B, K, T)
    cdf = F.softmax(logit, dim=1).cumsum(1)                                 # (B, K, T)
    k = (cdf < u[:, :1]).sum(1, keepdim=True).clamp(max=cfg.n_mix - 1)      # (B, 1, T)
    v = u[:, 1].clamp(1e-5, 1 - 1e-5)
    x = mu.gather(1, k)[:, 0] + torch.exp(log_s.gather(1, k)[:, 0]) * (torch.log(v) - torch.log1p(-v))
    return quantize(x, cfg.bits)                                             # (B, T)


class CachedGenerator:
    """The teacher's autoregressive sampling, Fast-WaveNet style (as wavenet.py): per-layer queues of past
    inputs make each new sample cost one column per layer. Still one step per sample: this is the cost the
    student removes."""
    def __init__(self, model, u, c):                 # u: (B, 2, T) uniforms, c: (B, M, T) upsampled mel
        self.m, self.u, self.c = model, u, c
        B, T = u.size(0), u.size(2)
        p = next(model.parameters())
        self.queues = [torch.zeros(B, model.cfg.residual_channels, (l.k - 1) * l.dilation, device=p.device,
                                   dtype=p.dtype) for l in model.layers]
        # (L·G, M): all layers' V in one matmul
        self.Wc = torch.cat([l.cond.weight[:, :, 0] for l in model.layers])
        self.x = torch.zeros(B, device=p.device, dtype=p.dtype)            # the first input is silence
        self.out = torch.zeros(B, T, device=p.device, dtype=p.dtype)
        # head outputs, for tests
        self.h = torch.zeros(B, 3 * model.cfg.n_mix, T, device=p.device, dtype=p.dtype)
        self.t = 0

    def step(self):
        m, t, B = self.m, self.t, self.x.size(0)
        cond = F.linear(self.c[:, :, t], self.Wc).view(B, len(m.layers), -1)  # (B, L, G)
        h = F.linear(self.x[:, None], m.inp.weight[:, :, 0], m.inp.bias)      # (B, R)
        skips = 0
        for i, layer in enumerate(m.layers):
            h, s = layer.step(h, self.queues[i], t, cond[:, i])
            skips = skips + s
        h = F.relu(skips * math.sqrt(1.0 / len(m.layers)))                  # the head on one column
        h = F.relu(F.linear(h, m.head[1].weight[:, :, 0], m.head[1].bias))
        h = F.linear(h, m.head[3].weight[:, :, 0], m.head[3].bias)           # (B, 3K)
        self.h[:, :, t] = h
        self.x = draw_mol(h[:, :, None], self.u[:, :, t:t + 1], m.cfg)[:, 0]
        self.out[:, t] = self.x
        self.t += 1


@torch.no_grad()
def teacher_generate(teacher, mel, n, seed=0):
    """n samples (B, n) from the teacher, one step at a time."""
    dev = next(teacher.parameters()).device
    u = torch.rand(mel.size(0), 2, n, generator=torch.Generator().manual_seed(seed)).to(dev)
    gen = CachedGenerator(teacher, u, teacher.upsample(mel)[:, :, :n])
    for _ in range(n):
        gen.step()
    return gen.out


class FlowLayer(nn.Module):
    """A student layer (§3): the teacher's gated dilated conv with conditioning, residual only, no skips."""
    def __init__(self, cfg, dilation):
        super().__init__()
        self.pad = (cfg.flow_kernel - 1) * dilation
        R = cfg.flow_channels
        self.conv = nn.Conv1d(R, 2 * R, cfg.flow_kernel, dilation=dilation)
        self.cond = nn.Conv1d(cfg.n_mels, 2 * R, 1, bias=False)
        self.out = nn.Conv1d(R, R, 1)

    def forward(self, h, c):                         # h: (B, R, T), c: (B, M, T)
        a, b = (self.conv(F.pad(h, (self.pad, 0))) + self.cond(c)).chunk(2, dim=1)  # (B, R, T) each
        return (h + self.out(torch.tanh(a) * torch.sigmoid(b))) * math.sqrt(0.5)


class Flow(nn.Module):
    """One IAF step (§3): a WaveNet over the flow's input noise, shifted one step right so that μ_t and s_t
    see z_<t only; its 1×1 head gives (μ, log s) per step."""
    def __init__(self, cfg, n_layers):
        super().__init__()
        self.inp = nn.Conv1d(1, cfg.flow_channels, 1)
        self.layers = nn.ModuleList(FlowLayer(cfg, 2 ** (i % cfg.flow_cycle)) for i in range(n_layers))
        self.head = nn.Conv1d(cfg.flow_channels, 2, 1)
        # start near x = z·e^-1 per flow: a quiet student (s_tot = e^-4 over 4 flows) the teacher can score
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, 0.0)
        self.head.bias.data[1] = -1.0

    def forward(self, z, c):                         # z: (B, T), c: (B, M, T) -> μ, log s: (B, T)
        h = self.inp(shift_right(z)[:, None])        # (B, R, T): position t holds z_{t-1}
        for layer in self.layers:
            h = layer(h, c)
        mu, log_s = self.head(F.relu(h)).float().unbind(1)
        return mu, log_s.clamp(-9.0, 7.0)            # bfs18's clamp


class Student(nn.Module):
    """§3: the flows composed. With x⁰ = z and xⁱ = xⁱ⁻¹·sⁱ + μⁱ, the output is
    x = z·s_tot + μ_tot where s_tot = ∏ sⁱ and μ_tot = Σ_i μⁱ ∏_{j>i} sʲ
    (accumulated as μ_tot ← μ_tot·sⁱ + μⁱ): one logistic per step,
    p_S(x_t | z_<t) = Logistic(μ_tot, s_tot), whose log-determinant Σ_t log s_tot is exact."""
    def __init__(self, cfg):
        super().__init__()
        self.upsample = Upsampler(cfg)
        self.flows = nn.ModuleList(Flow(cfg, n) for n in cfg.flow_layers)

    def forward(self, z, mel):                       # z: (B, T) noise -> x, μ_tot, log s_tot: (B, T)
        c = self.upsample(mel)[:, :, :z.size(1)]     # (B, M, T)
        x, mu_tot, log_s_tot = z, torch.zeros_like(z), torch.zeros_like(z)
        for flow in self.flows:                      # each flow is one parallel pass over all T
            mu, log_s = flow(x, c)
            s = torch.exp(log_s)
            x = x * s + mu
            mu_tot = mu_tot * s + mu
            log_s_tot = log_s_tot + log_s
        return x, mu_tot, log_s_tot


def logistic_noise(shape, device, seed=None):
    """§3: z ~ Logistic(0, 1) by inverting its CDF at a uniform (training: the global RNG, which checkpoints
    carry; evaluation and sampling: their own seeded generator, so they never disturb training's stream)."""
    g = torch.Generator(device).manual_seed(seed) if seed is not None else None
    u = torch.rand(shape, device=device, generator=g).clamp(1e-5, 1 - 1e-5)
    return torch.log(u) - torch.log1p(-u)

# ----------------------------------------------------------------------------- loss

def teacher_nll(teacher, wav, mel, cfg):
    """Teacher forcing: −log P(x_t | x_<t, c) under the discretised MoL, in nats per sample."""
    logit, mu, log_s = mol_params(teacher(shift_right(wav), mel), cfg)     # (B, K, T)
    return -mol_log_prob(wav[:, None], logit, mu, log_s, cfg.bits).mean()


def distillation(mu_tot, log_s_tot, h_teacher, cfg):
    """§4: KL(P_S ‖ P_T) = H(P_S, P_T) − H(P_S), in nats per sample.
    H(P_S) = E_z[Σ_t ln s_tot] + 2T: the logistic's entropy is ln s + 2, in closed form.
    H(P_S, P_T) = Σ_t E_{p_S(x_<t)} H(p_S(x_t | x_<t), p_T(x_t | x_<t)): the teacher ran once on the
    student's sample x (so its output at t conditions on x_<t), and the inner cross-entropy is estimated
    from n_draws fresh reparameterised draws x_t ~ Logistic(μ_tot, s_tot) scored under the teacher's
    mixture at t."""
    logit, mu, log_s = (p[:, None] for p in mol_params(h_teacher, cfg))    # (B, 1, K, T)
    draws = mu_tot[:, None] + torch.exp(log_s_tot)[:, None] * logistic_noise(
        (mu_tot.size(0), cfg.n_draws, mu_tot.size(1)), mu_tot.device)      # (B, n, T)
    cross = -mol_log_density(draws[:, :, None], logit, mu, log_s).mean()  # (B, n, T) -> scalar
    entropy = (log_s_tot + 2).mean()
    return cross, entropy


def power_loss(x, y, cfg):
    """§4.1: ‖φ(g(z, c)) − φ(y)‖² with φ(x) = |STFT(x)|² averaged over time, y the real audio
    for c. The STFT is normalised (÷√n_fft) so φ is a power per frequency band; the squared error
    is summed over bands."""
    win = torch.hann_window(cfg.power_n_fft, device=x.device)
    phi = lambda w: torch.stft(w.float(), cfg.power_n_fft, cfg.power_n_fft // 4, window=win, normalized=True,
                               return_complex=True).abs().pow(2).mean(-1)   # (B, F)
    return (phi(x) - phi(y)).pow(2).sum(-1).mean()


def student_loss(student, teacher, z, wav, mel, cfg):
    """§4, §4.1: KL + power loss (+ the contrastive term). The teacher is frozen (no parameter gradients)
    but differentiable: gradients reach the student through the teacher's input x and through the draws."""
    x, mu_tot, log_s_tot = student(z, mel)                                  # one parallel pass
    x_prev = shift_right(x)
    cross, entropy = distillation(mu_tot, log_s_tot, teacher(x_prev, mel), cfg)
    kl = cross - entropy
    power = power_loss(x, wav, cfg)
    loss = kl + cfg.power_weight * power
    out = dict(kl=kl, entropy=entropy, power=power)
    if cfg.contrastive:                              # KL(P_S(c1) ‖ P_T(c1)) − γ KL(P_S(c1) ‖ P_T(c2))
        cross2, _ = distillation(mu_tot, log_s_tot, teacher(x_prev, mel.roll(1, dims=0)), cfg)
        out["kl_wrong"] = cross2 - entropy
        loss = loss - cfg.contrastive_gamma * out["kl_wrong"]
    out["loss"] = loss
    return out

# ----------------------------------------------------------------------------- data

def mel_features(wav, cfg):
    """Log-mel frames aligned to hops (frame i covers samples [i·hop, (i+1)·hop)), scaled to ~[-2, 2]."""
    mel = common.mel_spectrogram(wav, cfg.sample_rate, n_fft=cfg.n_fft, hop=cfg.hop, n_mels=cfg.n_mels,
                                 fmin=cfg.fmin, fmax=cfg.fmax, log="ln")   # (B, M, T/hop)
    return (mel + 4.0) / 4.0


def get_batch(sampler, cfg, rt):
    """(B, segment) 16-bit waveforms on the MoL grid and their (B, n_mels, segment/hop) mels."""
    wav, _ = sampler.next()
    wav = quantize(wav.to(rt.device, non_blocking=True), cfg.bits)
    with torch.autocast(rt.device_type, enabled=False):
        return wav, mel_features(wav, cfg)


def held_out(cfg, rt, n_items, seconds, split="val"):
    """The first n_items utterances of a split, from where the sound starts, cut to a common length
    (a multiple of hop)."""
    utts = common.load_corpus(cfg, split, cfg.sample_rate)[:n_items]
    if not utts:
        raise SystemExit(f"error: the {split} split has no clips")
    loud = [np.flatnonzero(np.abs(u.wav) > 0.05 * np.abs(u.wav).max()) for u in utts]
    starts = [int(i[0]) // cfg.hop * cfg.hop if len(i) else 0 for i in loud]
    n = min(min(len(u.wav) - s for u, s in zip(utts, starts)), int(seconds * cfg.sample_rate))
    n = n // cfg.hop * cfg.hop
    if n <= (cfg.n_fft - cfg.hop) // 2:             # the mel's reflect padding needs this much
        raise SystemExit(f"error: the {split} clips are too short for one mel frame ({n} samples)")
    wav = torch.stack([torch.as_tensor(u.wav[s:s + n]) for u, s in zip(utts, starts)]).to(rt.device)
    return quantize(wav, cfg.bits)                   # (B, n)

# ----------------------------------------------------------------------------- train

def load_teacher_for_student(cfg, teacher_path):
    """--stage=student: the teacher checkpoint fixes the teacher's architecture and the features (the student
    hears the same mel), so those fields are taken from it, whatever the preset said."""
    ck = common.load_checkpoint(teacher_path)
    if not common.is_ours(ck) or ck["paper"] != "parallel_wavenet" or "teacher" not in ck["models"]:
        raise SystemExit(f"error: --teacher={teacher_path!r} is not a parallel_wavenet teacher checkpoint")
    changed = [f"{k} {getattr(cfg, k)!r} -> {ck['config'][k]!r}" for k in TEACHER_KEYS
               if common._norm(getattr(cfg, k)) != common._norm(ck["config"][k])]
    for k in TEACHER_KEYS:
        setattr(cfg, k, common._from_json(ck["config"][k], getattr(cfg, k)))
    common.log(f"teacher {teacher_path} (step {ck['step']})"
               + (": its config: " + "; ".join(changed) if changed else ""))
    return ck["models"]["teacher"]


def build(cfg, rt):
    """teacher stage: {teacher, opt, sched}. student stage: {student, teacher, opt, sched}, the teacher frozen
    (eval mode, no parameter gradients, not in the optimizer). Training reads the teacher from --teacher;
    bench, sample and eval get theirs from elsewhere (random weights, or the student's checkpoint)."""
    teacher_sd = None
    # resume / PATH: the student checkpoint holds its teacher
    if cfg.stage == "student" and cfg.mode == "train":
        path = cfg.teacher if cfg.init_from == "scratch" else common.checkpoint_path(cfg)
        teacher_sd = load_teacher_for_student(cfg, path)
    teacher = Teacher(cfg).to(rt.device)
    state = dict(teacher=teacher)
    if cfg.stage == "student":
        if teacher_sd is not None:
            common.load_state_dict(teacher, teacher_sd, "teacher")
        # §4: the teacher's weights are fixed during distillation
        teacher.eval().requires_grad_(False)
        state = dict(student=Student(cfg).to(rt.device), teacher=teacher)
    trained = state[cfg.stage]
    opt = torch.optim.Adam(trained.parameters(), lr=cfg.lr, betas=cfg.betas)
    warmup = lambda step: min(1.0, (step + 1) / max(1, cfg.warmup_iters))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup)
    return dict(state, opt=opt, sched=sched)


def train_step(state, batch, cfg, rt):
    """One Adam step of the stage's objective: the teacher's MoL NLL, or the student's distillation loss."""
    wav, mel = batch
    with rt.autocast():
        if cfg.stage == "teacher":
            nll = teacher_nll(state["teacher"], wav, mel, cfg)
            losses = dict(loss=nll, nll_bits=nll / math.log(2))
        else:
            z = logistic_noise(wav.shape, wav.device)                       # (B, T): the student's only input
            losses = student_loss(state["student"], state["teacher"], z, wav, mel, cfg)
    opt = state["opt"]
    opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    torch.nn.utils.clip_grad_norm_(state[cfg.stage].parameters(), cfg.grad_clip)
    opt.step()
    state["sched"].step()
    return {k: v.detach() for k, v in losses.items() if k != "loss" or cfg.stage == "student"}


def load_for_inference(cfg, rt):
    """The stage's models from --init_from (or out_dir/ckpt.pt): {teacher} or {student, teacher}, in eval."""
    path = common.checkpoint_path(cfg) if cfg.init_from != "scratch" else os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = common.load_checkpoint(path)
    models = {"teacher": Teacher(cfg).to(rt.device)}
    if cfg.stage == "student":
        models["student"] = Student(cfg).to(rt.device)
    common.load_models(ckpt, cfg, models, ARCH_KEYS)
    return {k: m.eval() for k, m in models.items()}


def which_sampler(cfg):
    if cfg.sampler == "student" and cfg.stage == "teacher":
        raise SystemExit("error: --sampler=student needs a student checkpoint (train --stage=student first)")
    return cfg.stage if cfg.sampler == "auto" else cfg.sampler


@torch.no_grad()
def evaluate(cfg, models=None, rt=None, samples_dir=None, split="test"):
    """teacher: held-out NLL (bits per sample, teacher forcing) and the mel L1 of a short autoregressive
    vocoding. student: the KL to the teacher (nats per sample) and the mel L1 of one-pass vocoding of the
    held-out crops.
    models: {teacher[, student]} (None: load_for_inference, as --mode=eval does)."""
    standalone = models is None
    if standalone:
        rt = common.setup(cfg)
        models = load_for_inference(cfg, rt)
    teacher, student = models["teacher"], models.get("student")
    was = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    who = which_sampler(cfg) if standalone else cfg.stage
    wav = held_out(cfg, rt, cfg.eval_items, cfg.eval_seconds, split)
    mel = mel_features(wav, cfg)
    res = {}
    # its own random stream (the distillation's draws too): evaluating must not move training's RNG
    with torch.random.fork_rng(devices=[rt.device] if rt.device_type == "cuda" else []), rt.autocast():
        torch.manual_seed(cfg.seed)
        if who == "teacher":
            res["nll_bits"] = round(teacher_nll(teacher, wav, mel, cfg).item() / math.log(2), 4)
            n = max(cfg.hop, int(cfg.eval_gen_seconds * cfg.sample_rate) // cfg.hop * cfg.hop)
            n = min(wav.size(1), n)
            ref = wav[:, :n]
            out = teacher_generate(teacher, mel[:, :, :n // cfg.hop], n, seed=cfg.seed)
        else:
            ref = wav
            out, mu_tot, log_s_tot = student(logistic_noise(wav.shape, wav.device, seed=cfg.seed), mel)
            cross, entropy = distillation(mu_tot, log_s_tot, teacher(shift_right(out), mel), cfg)
            res["kl"] = round((cross - entropy).item(), 4)
    res["mel_l1"] = round(common.mel_distance(out.float(), ref, cfg.sample_rate), 4)
    if samples_dir:
        common.save_sample(samples_dir, f"{split}_{who}", out[0].float().clamp(-1, 1).cpu(), cfg.sample_rate,
                           ref=ref[0].cpu())
    common.log(f"eval ({split}, {who}) | " + " | ".join(f"{k} {v}" for k, v in res.items()))
    for k, m in models.items():
        m.train(was[k])
    if standalone:
        common.cleanup(rt)
    return res


def train(cfg):
    rt = common.setup(cfg)
    state = build(cfg, rt)
    train_clips = [u.wav for u in common.load_corpus(cfg, "train", cfg.sample_rate)]
    common.check_clips(train_clips, cfg.segment, "train split")
    common.check_clips(common.load_corpus(cfg, "val", cfg.sample_rate), cfg.hop, "val split")
    model = state[cfg.stage]
    common.log(f"{cfg.stage}: {common.count_params(model) / 1e6:.3f} M params"
               + (f" | receptive field {receptive_field(cfg)} samples" if cfg.stage == "teacher" else "")
               + f" | {len(train_clips)} training clips")
    sampler = common.SegmentSampler(train_clips, cfg.segment, cfg.batch_size, cfg.seed, rt.rank,
                                    rt.world_size, align=cfg.hop)
    step = common.init_from(cfg, state, sampler=sampler, arch_keys=ARCH_KEYS)
    if cfg.stage == "student":
        state["teacher"].eval().requires_grad_(False)  # restored weights, still frozen
    state[cfg.stage] = common.wrap_ddp(common.compile(model, cfg), rt)
    models = lambda: {k: common.unwrap(v) for k, v in state.items() if isinstance(v, nn.Module)}
    common.train_loop(cfg, rt, state, step, train_step, lambda step: get_batch(sampler, cfg, rt),
                      lambda samples: evaluate(cfg, models(), rt, samples, split="val"), sampler=sampler)

# ----------------------------------------------------------------------------- sample

@torch.no_grad()
def sample(cfg):
    """Vocode held-out test speech (or --input) from its mel: the student in one parallel pass, or with
    --sampler=teacher (or a teacher checkpoint) the teacher one cached step per sample."""
    rt = common.setup(cfg)
    models = load_for_inference(cfg, rt)
    who = which_sampler(cfg)
    if cfg.input:
        ref = torch.as_tensor(common.load_audio(cfg.input, sr=cfg.sample_rate)[0])[None].to(rt.device)
        ref = quantize(ref[:, : ref.size(1) // cfg.hop * cfg.hop], cfg.bits)
        if ref.size(1) <= (cfg.n_fft - cfg.hop) // 2:  # the mel's reflect padding needs this much
            raise SystemExit(f"error: --input={cfg.input!r} is too short for one mel frame "
                             f"({ref.size(1)} samples)")
    else:
        ref = held_out(cfg, rt, 1, cfg.gen_seconds, "test")
    mel = mel_features(ref, cfg)
    t0 = time.time()
    if who == "student":
        wav = models["student"](logistic_noise(ref.shape, ref.device, seed=cfg.seed), mel)[0].clamp(-1, 1)
    else:
        wav = teacher_generate(models["teacher"], mel, ref.size(1), seed=cfg.seed)
    dt = time.time() - t0
    out = os.path.join(cfg.out_dir, "samples")
    common.save_sample(out, f"vocoded_{who}", wav[0].cpu(), cfg.sample_rate, ref=ref[0].cpu())
    common.log(f"{who} vocoded {ref.size(1)} samples in {dt:.2f}s ({ref.size(1) / dt:.0f} samples/s) | "
               "mel L1 vs "
               f"reference {common.mel_distance(wav, ref, cfg.sample_rate):.3f} | {out}/vocoded_{who}.wav")
    common.cleanup(rt)

# ----------------------------------------------------------------------------- bench

def bench(cfg):
    """train_step of the stage (ms, audio-s/s, FLOPs), then the paper's headline (§5.1): samples/s at
    batch 1 of the student's one parallel pass vs the teacher's cached autoregressive steps, and their
    ratio."""
    rt = common.setup(cfg)
    state = build(cfg, rt)                           # random weights: speed does not depend on them
    g = torch.Generator().manual_seed(cfg.seed)
    wav = (torch.rand(cfg.batch_size, cfg.segment, generator=g) * 2 - 1) * 0.5
    wav = quantize(wav, cfg.bits).to(rt.device)
    batch = (wav, mel_features(wav, cfg))
    model = state[cfg.stage]
    train, compiled = common.bench_train_step(cfg, rt, state, cfg.stage, batch, train_step,
                                              wav.numel() / cfg.sample_rate)
    teacher, student = state["teacher"].eval(), (state.get("student") or Student(cfg).to(rt.device)).eval()
    n = cfg.bench_steps
    mel = torch.randn(1, cfg.n_mels, n // cfg.hop + 1, device=rt.device)
    with torch.no_grad():
        z = logistic_noise((1, n), rt.device)
        s_ms = common.timeit(lambda: student(z, mel), iters=5, warmup=2)
        t_ms = common.timeit(lambda: teacher_generate(teacher, mel, n), iters=2, warmup=1)
    student_sps, teacher_sps = n / (s_ms / 1000), n / (t_ms / 1000)
    common.report_bench(cfg, rt, model=model, compiled=compiled, stage=cfg.stage,
                        teacher_params=common.count_params(teacher),
                        student_params=common.count_params(student),
                        **train, gen_samples=n,
                        student_b1_samples_per_s=round(student_sps, 1),
                        teacher_cached_b1_samples_per_s=round(teacher_sps, 1),
                        student_speedup=round(student_sps / teacher_sps, 1),
                        student_realtime_factor=round(student_sps / cfg.sample_rate, 3),
                        teacher_realtime_factor=round(teacher_sps / cfg.sample_rate, 4))
    common.cleanup(rt)

# ----------------------------------------------------------------------------- main

if __name__ == "__main__":
    cfg = common.parse_config(Config, PRESETS)
    {"train": train, "sample": sample, "eval": evaluate, "bench": bench}[cfg.mode](cfg)
