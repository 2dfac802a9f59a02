"""
WaveNet: A Generative Model for Raw Audio (van den Oord et al., 2016) — https://arxiv.org/abs/1609.03499
Fast generation: Fast Wavenet Generation Algorithm (Paine et al., 2016) — https://arxiv.org/abs/1611.09482

The idea: model raw audio one sample at a time, p(x) = prod_t p(x_t | x_<t) (§2, Eq. 1), with a stack
of dilated causal convolutions (§2.1) whose dilations double 1, 2, ..., 512 and then repeat, so the
receptive field grows exponentially with depth while every layer stays cheap. Each layer is a gated unit
tanh(W_f * x) ⊙ σ(W_g * x) (§2.3, Eq. 2) with residual and skip 1×1 convolutions (§2.4); the output is a
256-way softmax over μ-law companded samples (§2.2), trained with cross-entropy and teacher forcing: the
input is the μ-law sequence shifted right by one sample, the target the class of the next sample.
Conditioning (§2.5): a global speaker embedding added inside every gate (Eq. 4), and local mel frames
upsampled to the sample rate by learned transposed convolutions (Eq. 5): a neural vocoder.
Training is parallel over time; generation is strictly sequential. The naive sampler re-runs the whole
receptive field for every new sample; Fast WaveNet caches each layer's past inputs in a queue, so a new
sample costs one column per layer. Both are here, and a test proves they draw the same samples.

Changed versus the paper (618 lines, over the 550 aim: naive and cached sampling, compiled/CUDA-graph):
- conditioned on mel spectrograms (as later WaveNet vocoders: Tacotron 2, r9y9), not linguistic features +
  log F0; the built-in eSpeak corpus at 16 kHz, not 24.6 h of studio speech; the authors published no weights.
- widths and optimiser are not in the paper: r9y9's mulaw256 widths (res 128, gate 256, skip 128); Adam with
  linear warm-up and exponential decay; gradients clipped to norm 1.0; no weight norm, EMA or pre-emphasis.
- the input enters through an embedding table (≡ one-hot times a 1×1 conv), not a causal first conv;
  the upsampler is single-channel ConvTranspose2d stages over (mel, time), as r9y9's early vocoder.
- no context stacks (§2.6); the likelihood is reported in bits per sample (8 = uniform over 256 classes).

    python wavenet.py                                     # train (mel + speaker conditioned), built-in corpus
    python wavenet.py --preset=vocoder --batch_size=8     # r9y9 mulaw256 vocoder size (22.05 kHz, kernel 3)
    python wavenet.py --init_from=resume                  # continue out/wavenet/ckpt.pt
    python wavenet.py --mode=sample --init_from=out/wavenet/ckpt.pt --input=my.wav   # vocode my.wav's mel
    python wavenet.py --mode=eval --init_from=out/wavenet/ckpt.pt   # test bits/sample and vocoded mel L1
    python wavenet.py --cond_mel=False --out_dir=out/wavenet_free   # speaker-only WaveNet (§3.1)
    python wavenet.py --mode=bench                        # train step; naive vs cached generation
    torchrun --standalone --nproc_per_node=8 wavenet.py
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
    preset: str = "paper"             # a key of PRESETS
    init_from: str = "scratch"        # scratch | resume | path to one of our checkpoints
    out_dir: str = "out/wavenet"      # ckpt.pt, log.txt, samples/
    data_dir: str = ""                # empty: the built-in speech corpus
    corpus_hours: float = 2.0         # size of the built-in corpus (hours)
    input: str = ""                   # --mode=sample: vocode this wav instead of a held-out utterance
    # audio and features
    sample_rate: int = 16000          # §3.2: TTS at 16 kHz
    mu: int = 255                     # μ-law companding, mu + 1 = 256 softmax classes (§2.2)
    n_fft: int = 1024                 # mel STFT size
    hop: int = 256                    # samples per mel frame; must equal prod(upsample_scales)
    n_mels: int = 80                  # mel bins of the local conditioning
    fmin: float = 0.0                 # mel filterbank range (Hz)
    fmax: float = 8000.0              # Nyquist at 16 kHz
    # model (§2; the paper gives no widths: r9y9 mulaw256 widths)
    layers: int = 30                  # dilated conv layers in total
    stacks: int = 3                   # repeats of the dilation cycle 1, 2, ..., 2**(layers/stacks - 1)
    kernel_size: int = 2              # §2.1: filter size 2 (r9y9 uses 3)
    residual_channels: int = 128      # width of the residual stream
    gate_channels: int = 256          # dilated conv output, split into tanh and sigmoid halves (§2.3)
    skip_channels: int = 128          # width of the skip connections and output head (§2.4)
    cond_mel: bool = True             # local conditioning on mel frames (§2.5)
    cond_speaker: bool = True         # global conditioning on a speaker embedding (§2.5)
    speaker_dim: int = 16             # speaker embedding size
    n_speakers: int = 0               # rows of the speaker table; 0: the training data's speaker count
    upsample_scales: tuple = (16, 16)  # learned transposed-conv upsampling, product = hop (§2.5)
    freq_axis_kernel: int = 3         # mel-axis width of the upsampling kernels
    # training
    segment: int = 7680               # training crop (480 ms), a multiple of hop, > receptive field
    batch_size: int = 16
    lr: float = 1e-3                  # Adam, as r9y9
    betas: tuple = (0.9, 0.999)       # Adam's defaults, as r9y9
    warmup_iters: int = 200           # linear warm-up
    lr_half_life: int = 20000         # lr halves every this many steps (r9y9 halves every 200k)
    grad_clip: float = 1.0            # max global gradient norm (not in the paper; r9y9 clips at 1.0)
    max_iters: int = 50000
    log_interval: int = 50
    eval_interval: int = 1000         # also the checkpoint interval
    eval_items: int = 4               # held-out utterances for evaluate()
    eval_seconds: float = 2.0         # crop per utterance for the held-out bits/sample
    eval_gen_seconds: float = 0.5     # audio vocoded per held-out utterance for evaluate()'s mel L1
    gen_seconds: float = 2.0          # audio generated by --mode=sample
    # sampling
    temperature: float = 1.0          # softmax temperature; 0 = argmax (which collapses to silence, r9y9#93)
    speaker: int = -1                 # speaker id for unconditioned sampling (-1: a few different speakers)
    # runtime
    bench_steps: int = 1024           # cached generation steps timed per bench figure
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"               # bf16 autocast on CUDA for training, fp32 elsewhere
    compile: bool = True

    def validate(self):
        def bad(msg):
            raise SystemExit(f"error: {msg}")
        if math.prod(self.upsample_scales) != self.hop:
            bad(f"--upsample_scales={self.upsample_scales} multiply to {math.prod(self.upsample_scales)}, "
                f"not --hop={self.hop}")
        if self.layers < 1 or self.stacks < 1 or self.layers % self.stacks:
            bad(f"--layers={self.layers} must be a positive multiple of --stacks={self.stacks}")
        if self.kernel_size < 2:
            bad(f"--kernel_size must be >= 2 (got {self.kernel_size})")
        if self.gate_channels < 2 or self.gate_channels % 2:
            bad(f"--gate_channels must be even: tanh and sigmoid halves (got {self.gate_channels})")
        if self.segment % self.hop:
            bad(f"--segment={self.segment} must be a multiple of --hop={self.hop} (whole mel frames)")
        if not 1 <= self.mu <= 65535:
            bad(f"--mu must be in 1..65535 (got {self.mu})")
        for k in ("residual_channels", "skip_channels", "n_mels", "speaker_dim", "bench_steps",
                  "lr_half_life",
                  "warmup_iters", "grad_clip", "eval_seconds", "eval_gen_seconds", "gen_seconds"):
            if not getattr(self, k) > 0:
                bad(f"--{k} must be > 0 (got {getattr(self, k)!r})")
        if self.n_speakers < 0 or self.temperature < 0:
            bad("--n_speakers and --temperature must be >= 0")

PRESETS = {
    # k = 2, 3 x (1..512): receptive field 3070 samples = 192 ms at 16 kHz (§3.2 used ~240 ms);
    # 3,767,890 params (3.77 M) with the built-in corpus's speaker table
    "paper":   dict(),
    # r9y9 mulaw256 (4.70 M params, RF 6139): 4,627,812 here (4.63 M); r9y9 adds weight-norm gains,
    # a mel conv_in and an unused residual conv in the last layer
    "vocoder": dict(kernel_size=3, cond_speaker=False, sample_rate=22050, upsample_scales=(4, 4, 4, 4),
                    fmin=125.0, fmax=7600.0, segment=10240, batch_size=8),
    # 243,826 params (0.24 M) with the built-in speaker table, RF 511 samples = 32 ms: the mel carries the
    # rest; a CPU run of about 15 minutes
    "small":   dict(layers=16, stacks=2, residual_channels=32, gate_channels=64, skip_channels=64,
                    segment=4096, batch_size=4, max_iters=1000, eval_interval=500, bench_steps=256,
                    eval_items=2, eval_seconds=1.0, eval_gen_seconds=0.25, gen_seconds=1.0,
                    lr_half_life=1000),
    "tiny":    dict(layers=6, stacks=2, residual_channels=8, gate_channels=16, skip_channels=16, n_mels=20,
                    speaker_dim=4, segment=1024, batch_size=2, max_iters=10, corpus_hours=0.02,
                    log_interval=1, eval_items=2, eval_seconds=0.25, eval_gen_seconds=0.05,
                    gen_seconds=0.05, warmup_iters=2, bench_steps=32),
}

# every field that changes the weights' shapes or the features they were trained on: a checkpoint made under
# other values is refused with the flags named
ARCH_KEYS = ("sample_rate", "mu", "n_fft", "hop", "n_mels", "fmin", "fmax", "layers", "stacks", "kernel_size",
             "residual_channels", "gate_channels", "skip_channels", "cond_mel", "cond_speaker", "speaker_dim",
             "n_speakers", "upsample_scales", "freq_axis_kernel")

# ----------------------------------------------------------------------------- model

def receptive_field(cfg):
    """§2.1: a causal conv of kernel k and dilation d sees (k-1)·d extra past samples; the stack adds up."""
    per_stack = cfg.layers // cfg.stacks
    return (cfg.kernel_size - 1) * sum(2 ** (i % per_stack) for i in range(cfg.layers)) + 1


def draw(logits, u, temperature):
    """Sample a class per row by inverting the CDF at a pre-drawn uniform u. Drawing u up front makes the
    naive and the cached generator use identical randomness, so their samples can be compared exactly."""
    if temperature == 0:
        return logits.argmax(-1)
    cdf = F.softmax(logits.float() / temperature, dim=-1).cumsum(-1)           # (B, Q)
    return torch.searchsorted(cdf, u[:, None].contiguous()).squeeze(1).clamp_(max=logits.size(-1) - 1)


class Upsampler(nn.Module):
    """§2.5 local conditioning: a 'transposed convolutional network' maps mel frames to the sample rate.
    Each stage is a ConvTranspose2d over (mel bin, time) with one channel, stride s along time."""
    def __init__(self, cfg):
        super().__init__()
        self.stages = nn.ModuleList()
        for s in cfg.upsample_scales:
            fk = cfg.freq_axis_kernel
            conv = nn.ConvTranspose2d(1, 1, (fk, 2 * s), stride=(1, s), padding=(fk // 2, s // 2))
            # start as a smooth interpolator: every output averages 2 frames x fk bins
            nn.init.constant_(conv.weight, 1.0 / (2 * fk))
            nn.init.zeros_(conv.bias)
            self.stages.append(conv)

    def forward(self, mel):                          # mel: (B, M, N)
        c = mel[:, None]                             # (B, 1, M, N)
        for conv in self.stages:
            # (B, 1, M, N·s); kernel 2s, pad s/2 gives exactly N·s
            c = conv(c)[..., : c.size(-1) * conv.stride[1]]
        return c[:, 0]                               # (B, M, N·hop)


class ResidualLayer(nn.Module):
    """One layer: dilated causal conv (§2.1) -> gated unit with conditioning (§2.3, §2.5) -> residual
    and skip 1×1 convs (§2.4, Fig. 4)."""
    def __init__(self, cfg, dilation, last=False):
        super().__init__()
        self.dilation, self.k = dilation, cfg.kernel_size
        R, G, S = cfg.residual_channels, cfg.gate_channels, cfg.skip_channels
        self.conv = nn.Conv1d(R, G, cfg.kernel_size, dilation=dilation)  # W_f and W_g stacked: G = 2 halves
        self.cond = nn.Conv1d(cfg.n_mels, G, 1, bias=False) if cfg.cond_mel else None   # V_f * y, V_g * y
        # V_f^T h, V_g^T h
        self.gcond = nn.Linear(cfg.speaker_dim, G, bias=False) if cfg.cond_speaker else None
        # the last layer's residual output would feed nothing (only skips reach the head): no out conv
        self.out = nn.Conv1d(G // 2, R, 1) if not last else None
        self.skip = nn.Conv1d(G // 2, S, 1)
        # past offsets of the kernel taps, oldest first: (k-1)·d, ..., d (for the cached step)
        self.register_buffer("taps", dilation * torch.arange(self.k - 1, 0, -1), persistent=False)

    def gate(self, h, x):                            # h: (B, G, ...) pre-activation, x: input (B, R, ...)
        a, b = h.chunk(2, dim=1)                     # (B, G/2, ...) each
        z = torch.tanh(a) * torch.sigmoid(b)         # §2.3, Eq. 2
        if self.out is None:
            return x, self.skip(z)
        # √0.5 keeps the residual stream's variance constant with depth (r9y9, Gated PixelCNN-style)
        return (x + self.out(z)) * math.sqrt(0.5), self.skip(z)

    def forward(self, x, c=None, g=None):            # x: (B, R, T), c: (B, M, T), g: (B, D)
        h = self.conv(F.pad(x, ((self.k - 1) * self.dilation, 0)))  # left pad only: causal (§2.1, Fig. 3)
        if c is not None:
            h = h + self.cond(c)                     # V * y with y the upsampled mel (§2.5, Eq. 5)
        if g is not None:
            h = h + self.gcond(g)[:, :, None]        # broadcast over time (§2.5, Eq. 4)
        return self.gate(h, x)

    def step(self, x, queue, t, cond):
        """Fast WaveNet: the layer's conv at time t needs its inputs at t, t-d, ..., t-(k-1)d. The queue is a
        ring buffer of the last (k-1)·d inputs (B, R, (k-1)d); slot t mod (k-1)d holds the oldest one."""
        n = queue.size(2)
        past = queue.index_select(2, (t - self.taps) % n)             # (B, R, k-1)
        window = torch.cat([past, x[:, :, None]], dim=2)             # (B, R, k), oldest first like the kernel
        queue.index_copy_(2, (t % n).view(1), x[:, :, None])          # push x_t over the slot just read
        # on one column every conv is a matmul: the k taps flattened against the (G, R·k) kernel
        h = F.linear(window.flatten(1), self.conv.weight.flatten(1), self.conv.bias) + cond  # (B, G)
        a, b = h.chunk(2, dim=1)
        z = torch.tanh(a) * torch.sigmoid(b)                          # (B, G/2), as in gate()
        s = F.linear(z, self.skip.weight[:, :, 0], self.skip.bias)
        if self.out is None:
            return x, s
        return (x + F.linear(z, self.out.weight[:, :, 0], self.out.bias)) * math.sqrt(0.5), s


class WaveNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        Q, R, S = cfg.mu + 1, cfg.residual_channels, cfg.skip_channels
        # the class of x = 0: the input at t = 0
        self.silence = int(common.mulaw_quantize(torch.zeros(()), cfg.mu))
        # one-hot μ-law input × 1×1 conv == a table lookup (§2.2)
        self.embed = nn.Embedding(Q, R)
        per_stack = cfg.layers // cfg.stacks
        self.layers = nn.ModuleList(ResidualLayer(cfg, 2 ** (i % per_stack), last=i == cfg.layers - 1)
                                    for i in range(cfg.layers))
        # §2.4, Fig. 4: sum of skips -> ReLU -> 1×1 -> ReLU -> 1×1 -> softmax
        self.head = nn.Sequential(nn.ReLU(), nn.Conv1d(S, S, 1), nn.ReLU(), nn.Conv1d(S, Q, 1))
        self.upsample = Upsampler(cfg) if cfg.cond_mel else None
        self.speaker_emb = nn.Embedding(cfg.n_speakers, cfg.speaker_dim) if cfg.cond_speaker else None
        self.receptive_field = receptive_field(cfg)

    def net(self, x, c=None, g=None):                # x: (B, T) codes of the *previous* samples
        h = self.embed(x).transpose(1, 2)            # (B, R, T)
        skips = 0
        for layer in self.layers:
            h, s = layer(h, c, g)
            skips = skips + s
        return self.head(skips * math.sqrt(1.0 / len(self.layers)))  # (B, Q, T) logits

    def conditioning(self, mel=None, spk=None, n=None):
        c = self.upsample(mel)[:, :, :n] if self.upsample is not None else None    # (B, M, T)
        g = self.speaker_emb(spk) if self.speaker_emb is not None else None       # (B, D)
        return c, g

    def forward(self, x, mel=None, spk=None):        # teacher forcing: all T steps in parallel
        c, g = self.conditioning(mel, spk, x.size(1))
        return self.net(x, c, g)

    @torch.no_grad()
    def generate_naive(self, u, c=None, g=None, temperature=1.0):
        """The readable reference: every new sample re-runs the whole stack over the last receptive field."""
        B, T = u.shape
        rf = self.receptive_field
        # x[:, t] is the input at step t
        x = torch.full((B, T + 1), self.silence, dtype=torch.long, device=u.device)
        for t in range(T):
            lo = max(0, t + 1 - rf)
            ct = c[:, :, lo:t + 1] if c is not None else None
            logits = self.net(x[:, lo:t + 1], ct, g)[:, :, -1]          # (B, Q): only the last column is new
            x[:, t + 1] = draw(logits, u[:, t], temperature)
        return x[:, 1:]


class CachedGenerator:
    """Fast WaveNet (Paine et al. 2016, Alg. 1): per-layer queues of past activations make each new sample
    cost O(layers) instead of O(receptive field). All state lives in preallocated tensors and `step` mutates
    them in place, so one step can be compiled or captured once in a CUDA graph and replayed."""
    def __init__(self, model, u, c=None, g=None, temperature=1.0):
        self.m, self.u, self.c, self.temperature = model, u, c, temperature
        B, T = u.shape
        p = next(model.parameters())
        R, G, L = model.cfg.residual_channels, model.cfg.gate_channels, len(model.layers)
        self.queues = [torch.zeros(B, R, (l.k - 1) * l.dilation, device=p.device, dtype=p.dtype)
                       for l in model.layers]
        self.t = torch.zeros((), dtype=torch.long, device=p.device)
        self.x = torch.zeros(B, dtype=torch.long, device=p.device)
        self.out = torch.zeros(B, T, dtype=torch.long, device=p.device)
        # all layers' conditioning in one matmul per step: stacked V (L·G, M); the speaker term is constant
        if c is not None:
            self.Wc = torch.cat([l.cond.weight[:, :, 0] for l in model.layers])    # (L·G, M)
        self.gbias = torch.zeros(B, L, G, device=p.device, dtype=p.dtype)
        if g is not None:
            self.gbias = torch.stack([l.gcond(g) for l in model.layers], 1)      # (B, L, G)
        self.reset()

    def reset(self):                                 # in place: a captured CUDA graph keeps pointing at these
        for q in self.queues:
            q.zero_()
        self.t.zero_()
        self.x.fill_(self.m.silence)                 # the first input is silence, as in training
        self.out.zero_()

    def step(self):
        m, t, B = self.m, self.t, self.x.size(0)
        cond = self.gbias
        if self.c is not None:
            ct = self.c.index_select(2, t.view(1))[:, :, 0]                      # (B, M)
            cond = cond + F.linear(ct, self.Wc).view(B, len(m.layers), -1)       # (B, L, G)
        h, skips = m.embed(self.x), 0                                           # (B, R)
        for i, layer in enumerate(m.layers):
            h, s = layer.step(h, self.queues[i], t, cond[:, i])
            skips = skips + s
        h = F.relu(skips * math.sqrt(1.0 / len(m.layers)))                   # the head of §2.4 on one column
        h = F.relu(F.linear(h, m.head[1].weight[:, :, 0], m.head[1].bias))
        logits = F.linear(h, m.head[3].weight[:, :, 0], m.head[3].bias)       # (B, Q)
        x = draw(logits, self.u.index_select(1, t.view(1))[:, 0], self.temperature)
        self.out.index_copy_(1, t.view(1), x[:, None])
        self.x.copy_(x)
        self.t.add_(1)


@torch.no_grad()
def generate(model, n, mel=None, spk=None, batch=1, temperature=1.0, seed=0, method="cached"):
    """Generate n samples (B, n) of μ-law codes.
    method: naive | cached | compiled | cudagraph | compiled_cudagraph."""
    dev = next(model.parameters()).device
    B = mel.size(0) if mel is not None else (spk.size(0) if spk is not None else batch)
    # all randomness, drawn up front
    u = torch.rand(B, n, generator=torch.Generator().manual_seed(seed)).to(dev)
    c, g = model.conditioning(mel, spk, n)
    if method == "naive":
        return model.generate_naive(u, c, g, temperature)
    gen = CachedGenerator(model, u, c, g, temperature)
    step = gen.step
    if method.startswith("compiled"):                # fuses each layer's elementwise ops into few kernels
        step = torch.compile(gen.step)
    if method.endswith("cudagraph"):                 # record one step's kernels once, replay them n times:
        s = torch.cuda.Stream()                      # at batch 1 the GPU is bound by kernel-launch latency
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                step()                               # warm-up outside the graph (compilation, cuBLAS handles)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        gen.reset()
        step = graph.replay
    for _ in range(n):
        step()
    return gen.out

# ----------------------------------------------------------------------------- loss

def nll_loss(model, wav, spk, cfg):
    """Eq. 1 with teacher forcing: every sample is predicted from the true past at once. §2.2: targets
    are the mu + 1 μ-law classes, the loss is their cross-entropy. Returns nats per sample (logs: bits)."""
    with torch.autocast(wav.device.type, enabled=False):
        mel = mel_features(wav, cfg) if cfg.cond_mel else None      # (B, M, T/hop), fp32
        q = common.mulaw_quantize(wav, cfg.mu)                      # (B, T) targets in [0, mu]
    silence = int(common.mulaw_quantize(torch.zeros(()), cfg.mu))   # x_0's input: the class of a zero sample
    x = F.pad(q[:, :-1], (1, 0), value=silence)                      # (B, T) inputs: shifted one sample right
    logits = model(x, mel, spk)                                      # (B, Q, T): logits[:, :, t] sees x_<t
    return F.cross_entropy(logits.float(), q)

# ----------------------------------------------------------------------------- data

def mel_features(wav, cfg):
    """Log-mel frames aligned to hops (frame i centred on sample i·hop + hop/2), scaled to about [-2, 2]."""
    mel = common.mel_spectrogram(wav, cfg.sample_rate, n_fft=cfg.n_fft, hop=cfg.hop, n_mels=cfg.n_mels,
                                 # (B, M, T/hop), ln(1e-5) = -11.5 floor
                                 fmin=cfg.fmin, fmax=cfg.fmax, log="ln")
    return (mel + 4.0) / 4.0


def make_sampler(utts, cfg, rt):
    """Random segment-long crops starting at whole mel frames, each rank its own; the sampler also keeps each
    clip's speaker id (clamped into the table) so get_batch can return it."""
    sampler = common.SegmentSampler([u.wav for u in utts], cfg.segment, cfg.batch_size, cfg.seed,
                                    rt.rank, rt.world_size, align=cfg.hop)
    sampler.speakers = torch.tensor([min(u.speaker, max(cfg.n_speakers, 1) - 1) for u in utts])  # (N,)
    return sampler


def get_batch(sampler, cfg, rt):
    """(B, segment) waveforms cropped at whole mel frames, and their (B,) speaker ids, on rt.device."""
    wav, idx = sampler.next()                                      # (B, segment), (B,) clip indices
    return wav.to(rt.device, non_blocking=True), sampler.speakers[idx].to(rt.device)


def held_out(cfg, rt, n_items, seconds, split="val"):
    """The first n_items held-out utterances of at least one mel frame, cropped from where the sound starts
    (skipping leading silence) to a common length, a multiple of hop, so they batch."""
    utts = common.load_corpus(cfg, split, cfg.sample_rate)
    utts = [u for u in utts if u.wav.shape[-1] >= cfg.hop][:n_items]
    if not utts:
        raise SystemExit(f"error: the {split} split has no clip of at least {cfg.hop} samples to evaluate on")
    starts = []
    for u in utts:
        loud = np.flatnonzero(np.abs(u.wav) > 0.05 * np.abs(u.wav).max())
        s = int(loud[0]) // cfg.hop * cfg.hop if len(loud) else 0
        starts.append(s if len(u.wav) - s >= cfg.hop else 0)
    n = min(min(len(u.wav) - s for u, s in zip(utts, starts)), int(seconds * cfg.sample_rate))
    n = n // cfg.hop * cfg.hop
    n = max(n, cfg.hop)
    wav = torch.stack([torch.as_tensor(u.wav[s:s + n]) for u, s in zip(utts, starts)]).to(rt.device)  # (B, n)
    # a held-out voice has an id but no trained embedding (a user folder's may even lie beyond the table)
    spk = torch.tensor([min(u.speaker, max(cfg.n_speakers, 1) - 1) for u in utts], device=rt.device)
    return wav, spk

# ----------------------------------------------------------------------------- train

def build(cfg, rt):
    """Everything training holds: the model, Adam, and the lr schedule as a scheduler stepped in train_step,
    so resume and bench see the same lr. The checkpoint saves exactly this dict."""
    if cfg.cond_speaker and not cfg.n_speakers:   # the speaker table's size comes from the data (all splits)
        cfg.n_speakers = common.num_speakers(common.load_corpus(cfg, "train", cfg.sample_rate))
    model = WaveNet(cfg).to(rt.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    # linear warm-up, then halve every lr_half_life steps (r9y9's step decay, made smooth); independent of
    # max_iters, so a run resumed with a larger max_iters follows the same schedule
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup_iters) * 0.5 ** (s / cfg.lr_half_life))
    return dict(model=model, opt=opt, sched=sched)


def train_step(state, batch, cfg, rt):
    """One Adam step on the teacher-forced cross-entropy, gradients clipped to cfg.grad_clip, the lr schedule
    stepped. train() and bench() both call it. Returns the loss in bits per sample."""
    model, opt, sched = state["model"], state["opt"], state["sched"]
    wav, spk = batch
    with rt.autocast():
        loss = nll_loss(model, wav, spk, cfg)                        # nats per sample
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    sched.step()
    return {"bits_per_sample": loss.detach() / math.log(2)}


def load_for_inference(cfg, rt):
    """The model of one of our checkpoints (--init_from=PATH or resume; parse_config has already taken its
    config, so no preset flag is needed). The authors published no weights, so there is no official format."""
    path = common.checkpoint_path(cfg)
    ckpt = common.load_checkpoint(path)
    common.check_checkpoint(ckpt, cfg, ARCH_KEYS)
    model = WaveNet(cfg).to(rt.device)
    common.load_models(ckpt, cfg, {"model": model}, ARCH_KEYS)
    common.log(f"loaded {path} (step {ckpt['step']}) | receptive field {model.receptive_field} samples | "
               f"{common.count_params(model):,} params")
    return model.eval()


@torch.no_grad()
def evaluate(cfg, model=None, rt=None, samples_dir=None, split="test"):
    """Held-out bits per sample (teacher forcing, the training objective) and the mel L1 of held-out audio
    vocoded by cached sampling. train() calls it on val; --mode=eval loads the checkpoint and reports test."""
    standalone = model is None
    if standalone:
        rt = common.setup(cfg)
        model = load_for_inference(cfg, rt)
        samples_dir = samples_dir or os.path.join(cfg.out_dir, "samples", f"eval_{split}")
    was_training = model.training
    model.eval()
    wav, spk = held_out(cfg, rt, cfg.eval_items, cfg.eval_seconds, split)
    with rt.autocast():
        bits = nll_loss(model, wav, spk, cfg).item() / math.log(2)
    res = {"bits_per_sample": round(bits, 4)}
    if cfg.cond_mel:                                 # vocode a short crop of each held-out utterance
        n = min(wav.size(1), max(cfg.hop, int(cfg.eval_gen_seconds * cfg.sample_rate) // cfg.hop * cfg.hop))
        ref = wav[:, :n]
        codes = generate(model, n, mel_features(ref, cfg), spk, temperature=cfg.temperature, seed=cfg.seed)
        voc = common.mulaw_dequantize(codes, cfg.mu)
        res["mel_l1"] = round(common.mel_distance(voc, ref, cfg.sample_rate), 4)
        if samples_dir:
            common.save_sample(samples_dir, "vocoded", voc[0].cpu(), cfg.sample_rate, ref=ref[0].cpu())
    common.log(f"eval {split} | " + " | ".join(f"{k} {v}" for k, v in res.items()))
    model.train(was_training)
    if standalone:
        common.cleanup(rt)
    return res


def train(cfg):
    rt = common.setup(cfg)
    utts = common.load_corpus(cfg, "train", cfg.sample_rate)
    common.check_clips(utts, cfg.segment, "train split")           # data errors stop here, before step 1
    common.check_clips(common.load_corpus(cfg, "val", cfg.sample_rate), cfg.hop, "val split")
    if cfg.cond_speaker and not cfg.n_speakers:
        cfg.n_speakers = common.num_speakers(utts)
    state = build(cfg, rt)
    rf = state["model"].receptive_field
    common.log(f"receptive field {rf} samples = {1000 * rf / cfg.sample_rate:.1f} ms | "
               f"{common.count_params(state['model']):,} params | {len(utts)} training utterances")
    sampler = make_sampler(utts, cfg, rt)
    step = common.init_from(cfg, state, sampler=sampler, arch_keys=ARCH_KEYS)
    state["model"] = common.wrap_ddp(common.compile(state["model"], cfg), rt)
    common.train_loop(cfg, rt, state, step, train_step, lambda step: get_batch(sampler, cfg, rt),
                      lambda samples: evaluate(cfg, common.unwrap(state["model"]), rt, samples, split="val"),
                      sampler=sampler)

# ----------------------------------------------------------------------------- sample

@torch.no_grad()
def sample(cfg):
    """Vocode a held-out test utterance (or --input) from its mel; a model trained with --cond_mel=False
    babbles freely, conditioned only on the speaker embedding (or on nothing)."""
    rt = common.setup(cfg)
    model = load_for_inference(cfg, rt)
    out = os.path.join(cfg.out_dir, "samples")
    n = max(cfg.hop, int(cfg.gen_seconds * cfg.sample_rate) // cfg.hop * cfg.hop)
    speaker = min(max(cfg.speaker, 0), max(cfg.n_speakers, 1) - 1)
    t0 = time.time()
    if cfg.cond_mel:
        if cfg.input:
            ref = torch.as_tensor(common.load_audio(cfg.input, sr=cfg.sample_rate)[0])[None].to(rt.device)
            if ref.size(1) < cfg.hop:
                raise SystemExit(f"error: --input={cfg.input!r} is shorter than one mel frame "
                                 f"({cfg.hop} samples)")
            spk = torch.tensor([speaker], device=rt.device)
            n = ref.size(1) // cfg.hop * cfg.hop     # the whole file
        else:
            ref, spk = held_out(cfg, rt, 1, cfg.gen_seconds, split="test")
            n = ref.size(1)
        ref = ref[:, :n]
        codes = generate(model, n, mel_features(ref, cfg), spk if cfg.cond_speaker else None,
                         temperature=cfg.temperature, seed=cfg.seed)
        wav = common.mulaw_dequantize(codes, cfg.mu)
        common.save_sample(out, "vocoded", wav[0].cpu(), cfg.sample_rate, ref=ref[0].cpu())
        common.log(f"vocoded {n} samples in {time.time() - t0:.1f}s | mel L1 vs reference "
                   f"{common.mel_distance(wav, ref, cfg.sample_rate):.3f} | {out}/vocoded.wav")
    else:
        spk = None
        if cfg.cond_speaker:
            ids = [speaker] if cfg.speaker >= 0 else list(range(min(4, cfg.n_speakers)))
            spk = torch.tensor(ids, device=rt.device)
        codes = generate(model, n, spk=spk, temperature=cfg.temperature, seed=cfg.seed)
        wav = common.mulaw_dequantize(codes, cfg.mu)
        for i in range(wav.size(0)):
            name = f"speaker{int(spk[i])}" if spk is not None else "unconditional"
            common.save_sample(out, name, wav[i].cpu(), cfg.sample_rate)
        common.log(f"generated {wav.size(0)} x {n} samples in {time.time() - t0:.1f}s -> {out}/")
    common.cleanup(rt)

# ----------------------------------------------------------------------------- bench

def bench(cfg):
    """One JSON line: train_step (the one training runs, clipping and schedule included) in ms and audio-s/s,
    its FLOPs; generation samples/s, naive (a receptive field per sample) vs cached (Fast WaveNet), eager,
    compiled and CUDA-graph replayed, at batch 1 and 16. Speed does not depend on the weights: random ones do,
    or a checkpoint's (--init_from)."""
    rt = common.setup(cfg)
    state = build(cfg, rt)
    common.init_from(cfg, state, arch_keys=ARCH_KEYS)
    model = state["model"]
    g = torch.Generator().manual_seed(cfg.seed)
    wav = ((torch.rand(cfg.batch_size, cfg.segment, generator=g) * 2 - 1) * 0.5).to(rt.device)  # content-free
    spk = torch.zeros(cfg.batch_size, dtype=torch.long, device=rt.device)
    # compiled: on CUDA by default, on a CPU if asked
    train, compiled = common.bench_train_step(cfg, rt, state, "model", (wav, spk), train_step,
                                              wav.numel() / cfg.sample_rate)
    model.eval()
    methods = ["cached"] + (["compiled"] if compiled else [])
    if rt.device_type == "cuda":
        methods += ["cudagraph"] + (["compiled_cudagraph"] if compiled else [])
    gen = {}
    rf = model.receptive_field
    for B in (1, 16):
        nmel = max(1, max(cfg.bench_steps, rf) // cfg.hop + 1)
        mel = torch.randn(B, cfg.n_mels, nmel, device=rt.device) if cfg.cond_mel else None
        sp = torch.zeros(B, dtype=torch.long, device=rt.device) if cfg.cond_speaker else None
        # steady-state naive step: a full receptive field per sample
        with torch.no_grad():
            x = torch.randint(0, cfg.mu + 1, (B, rf), device=rt.device)
            c, gc = model.conditioning(mel, sp, rf)
            u = torch.rand(B, device=rt.device)
            ms = common.timeit(lambda: draw(model.net(x, c, gc)[:, :, -1], u, cfg.temperature),
                               iters=5, warmup=2)
        gen[f"naive_b{B}_samples_per_s"] = round(B / (ms / 1000), 1)
        # cached: every step costs the same, time bench_steps of them
        for method in methods:
            try:
                ms = common.timeit(lambda: generate(model, cfg.bench_steps, mel, sp, batch=B, method=method),
                                   iters=3, warmup=1)
                gen[f"{method}_b{B}_samples_per_s"] = round(B * cfg.bench_steps / (ms / 1000), 1)
            except Exception as e:                   # e.g. compile unavailable: report, don't crash the bench
                gen[f"{method}_b{B}_error"] = f"{type(e).__name__}: {str(e)[:120]}"
    best_b1 = max(v for k, v in gen.items() if k.endswith("_b1_samples_per_s"))
    common.report_bench(cfg, rt, model=model, compiled=compiled, receptive_field=rf,
                        **train, **gen,
                        gen_dtype="float32", best_b1_realtime_factor=round(best_b1 / cfg.sample_rate, 4))
    common.cleanup(rt)

# ----------------------------------------------------------------------------- main

if __name__ == "__main__":
    cfg = common.parse_config(Config, PRESETS)
    {"train": train, "sample": sample, "eval": evaluate, "bench": bench}[cfg.mode](cfg)
