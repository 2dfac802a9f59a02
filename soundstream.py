"""
SoundStream: An End-to-End Neural Audio Codec (Zeghidour et al., 2021) — https://arxiv.org/abs/2107.03312

The idea: one neural codec for speech, music and general audio at 3 to 18 kbps, a single model that
streams and, asked to, denoises. A fully convolutional, causal encoder (§III-A, strides 2·4·5·8) turns
24 kHz audio into 75 embeddings per second; a residual vector quantizer (RVQ, §III-C, Alg. 1) replaces
each by up to N_q ten-bit codes, each codebook quantizing what the ones before it left; a mirror decoder
(§III-B) turns the codes back into audio. Quantizer dropout draws the number of codebooks n_q ∈ {1..N_q}
per training example, so one model serves every bitrate (75 Hz × 10 bits × n_q). A FiLM layer driven by
a "denoise" flag (§III-F) makes the same codec a speech enhancer on demand, at the encoder or the decoder
side. Training (§III-D, §III-E) adds a multi-scale waveform discriminator and an STFT discriminator on
complex spectrograms (hinge loss, feature matching) to a multi-scale mel reconstruction loss. Codebooks
start from k-means and learn by EMA, an unused code is re-seeded from the batch, and every convolution is
causal: encoding and decoding in chunks gives exactly the offline result.

Simplified or changed here:
- Not in the paper, so ours: D = 128, Adam lr 1e-4, betas (0.5, 0.9), batch 32 x 1 s, 200k steps (Audyn's
  reading); no commitment or codebook loss (EMA codebooks, straight-through encoder); variance-preserving
  init; reconstruction averaged over frames (the paper sums), λ_rec = 0.04; k-means one RVQ level per step;
  dead-code thresholds scaled by the share of examples dropout lets reach a level, and a grace period.
- FiLM once, on the embedding: (1 + γc) ⊙ z + βc, so c = 0 is the plain codec. Noise: coloured Gaussian at
  0-20 dB SNR on the built-in corpus (the paper: Freesound noise on LibriTTS). No entropy coding.
- `small` (CPU): narrow nets, 6 x 0.4 s batches, 2400 steps at lr 1e-3, the first 120 without the RVQ, the
  first 2000 without D, plus a waveform L1 (quantizer_warmup, disc_warmup, lambda_time: 0 in `paper`).
- 910 lines, not 750: FiLM denoising, two discriminator families and streaming in every layer are the paper's.

    python soundstream.py                                          # train on the built-in speech+music corpus
    python soundstream.py --preset=paper --batch_size=32           # the paper's model (one GPU)
    python soundstream.py --init_from=resume                       # continue out/soundstream/ckpt.pt
    python soundstream.py --mode=sample --init_from=out/soundstream/ckpt.pt   # 3/6/12/18 kbps + denoising
    python soundstream.py --mode=eval --init_from=out/soundstream/ckpt.pt     # SI-SNR / mel distance per kbps
    python soundstream.py --quantizer_dropout=False --n_q=8        # one bitrate (6 kbps), to compare
    python soundstream.py --mode=bench
    torchrun --standalone --nproc_per_node=8 soundstream.py --preset=paper
"""
import math
import os
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common

# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    mode: str = "train"                # train | sample | eval | bench
    preset: str = "paper"              # a key of PRESETS
    init_from: str = "scratch"         # scratch | resume | path to our ckpt.pt (no official weights exist)
    out_dir: str = "out/soundstream"
    data_dir: str = ""                 # empty: the built-in corpus (speech + music)
    corpus_hours: float = 2.0          # size of the built-in corpus
    input: str = ""                    # --mode=sample: a wav to encode/decode instead of held-out clips
    # encoder / decoder (§III-A, §III-B)
    sample_rate: int = 24000           # §IV: 24 kHz
    n_filters: int = 32                # C: channels after the first conv, doubled by every encoder block
    dimension: int = 128               # D, the embedding dimension (not in the paper; addendum §4)
    strides: tuple = (2, 4, 5, 8)      # encoder strides: hop 320, 75 Hz at 24 kHz (the decoder's reversed)
    dilations: tuple = (1, 3, 9)       # the three residual units of every block
    # residual vector quantizer (§III-C, Alg. 1)
    n_q: int = 24                      # N_q codebooks: 24 x 10 bits x 75 Hz = 18 kbps
    codebook_size: int = 1024          # entries per codebook (10 bits)
    bitrates: tuple = (3.0, 6.0, 12.0, 18.0)  # kbps at which evaluate() and sample() run (n_q = 4, 8, 16, 24)
    quantizer_dropout: bool = True     # §III-C: n_q ~ U{1..N_q} per example; False: always N_q
    ema_decay: float = 0.99            # EMA decay of the codebook statistics (VQ-VAE-2 updates)
    kmeans_iters: int = 50             # k-means iterations on the first batch (codebook init)
    dead_code_threshold: float = 2.0   # a code whose EMA usage falls below this is re-seeded from the batch
                                       # (for a layer every example uses; scaled by the share that uses it)
    dead_code_grace: int = 50          # steps a re-seeded code lives unused before it can be re-drawn (ours)
    quantizer_warmup: int = 0          # first steps with the RVQ bypassed, k-means after (ours, CPU)
    # joint compression and enhancement (§III-F)
    film: str = "encoder"              # where FiLM applies the denoise flag: encoder | decoder | none
    noise_prob: float = 0.5            # fraction of training examples with background noise added
    denoise_prob: float = 0.5          # fraction of examples with the denoise flag on (target = clean)
    snr_range: tuple = (0.0, 20.0)     # SNR (dB) of the added noise, drawn uniformly
    eval_snr: float = 5.0              # SNR (dB) of the noisy held-out speech in evaluate()
    # discriminators (§III-D)
    wave_scales: int = 3               # multi-scale waveform discriminator: raw, x2 and x4 downsampled
    wave_channels: int = 16            # first conv width of each waveform discriminator (MelGAN layout)
    stft_channels: int = 32            # C of the STFT discriminator
    stft_window: int = 1024            # W of its STFT
    stft_hop: int = 256                # H of its STFT
    # losses (§III-E)
    lambda_adv: float = 1.0            # hinge adversarial
    lambda_feat: float = 100.0         # feature matching
    lambda_rec: float = 0.04           # multi-scale spectral reconstruction (ours, for the averaged form)
    # At init, at λ_rec = 1, the gradient norms on x̂ are rec 13.4 : feat 0.132 : adv 0.005: the paper's
    # weights (1, 100, 1) would leave feature matching 1 % of the push. λ_rec = 0.04 gives rec ≈ 4x feat
    # ≈ 100x adv; λ_time = 100 (small) time ≈ 1.3x feat (test_loss_balance_at_init pins these bands).
    lambda_time: float = 0.0           # waveform L1 (ours, EnCodec's ℓ_t; not in SoundStream): aligns phase
    disc_warmup: int = 0               # first steps on reconstruction alone, no discriminator (ours, CPU)
    mel_scales: tuple = (6, 7, 8, 9, 10, 11)  # windows s = 2^6 .. 2^11, hop s/4
    n_mels: int = 64                   # mel bins of the reconstruction loss
    grad_clip: float = 0.0             # max gradient norm (0: off; the paper does not clip)
    # training
    segment: int = 24000               # training crop in samples (1 s)
    batch_size: int = 32
    lr: float = 1e-4
    betas: tuple = (0.5, 0.9)
    max_iters: int = 200_000
    log_interval: int = 50
    eval_interval: int = 5000          # evaluate and checkpoint
    eval_items: int = 8                # held-out clips per kind (speech, music, noisy speech) in evaluate()
    eval_seconds: float = 4.0          # crop held-out clips to this length
    listen_items: int = 16             # --mode=eval: whole test speech clips at the lowest and highest
                                       # bitrate and the originals: three folders an ASR judges
    bench_seconds: float = 10.0        # audio length for the encode/decode real-time factors
    device: str = "auto"
    dtype: str = "auto"                # bf16 autocast on CUDA, fp32 elsewhere (quantizer, STFTs, losses fp32)
    compile: bool = True
    seed: int = 1337

    def validate(self):
        """This file's own fields (common.parse_config checks the shared ones): one error line each."""
        def bad(msg):
            raise SystemExit(f"error: {msg}")
        if self.film not in ("encoder", "decoder", "none"):
            bad(f"--film must be encoder, decoder or none (got {self.film!r})")
        if self.n_q < 1 or self.codebook_size < 2 or self.dimension < 1 or self.n_filters < 1:
            bad("--n_q, --dimension and --n_filters must be >= 1 and --codebook_size >= 2")
        hop = math.prod(self.strides)
        per_q = math.log2(self.codebook_size) * self.sample_rate / hop / 1000  # kbps one codebook costs
        for b in self.bitrates:
            n = b / per_q
            if abs(n - round(n)) > 1e-6 or not 1 <= round(n) <= self.n_q:
                bad(f"--bitrates: {b:g} kbps is not a whole number of codebooks of {per_q:g} kbps within "
                    f"1..{self.n_q} (n_q={self.n_q})")
        for k in ("noise_prob", "denoise_prob"):
            if not 0 <= getattr(self, k) <= 1:
                bad(f"--{k} must lie in [0, 1] (got {getattr(self, k)})")
        longest = max(hop, self.stft_window, 2 ** max(self.mel_scales))
        if self.segment < longest:
            bad(f"--segment={self.segment} is shorter than the hop, --stft_window or the largest mel window "
                f"({longest} samples)")
        if self.stft_window // 2 % 64:
            bad(f"--stft_window={self.stft_window}: its {self.stft_window // 2} bins must halve 6 times "
                "(a multiple of 128)")

PRESETS = {
    "paper": dict(),                                       # §IV: C = 32, N_q = 24 (3-18 kbps), 24 kHz
    "small": dict(n_filters=8, dimension=64, wave_channels=2, stft_channels=4, segment=9600, batch_size=6,
                  log_interval=20, eval_items=4, bench_seconds=4.0, kmeans_iters=20, corpus_hours=1.0,
                  # 2400 steps, not 200k: a higher lr; 120 steps as a plain autoencoder so that k-means
                  # clusters latents that describe the audio; 2000 on reconstruction alone (ours: no D to
                  # fool yet, half the cost), with a waveform L1 whose gradient on x̂ matches feat's
                  lr=1e-3, quantizer_warmup=120, disc_warmup=2000, max_iters=2400, eval_interval=800,
                  lambda_time=100.0,
                  # the threshold 2 suits 32 x 1 s batches (2.3 frames per code); scale it to 6 x 0.4 s
                  dead_code_threshold=2.0 * (6 * 30) / (32 * 75)),
    "tiny": dict(n_filters=2, dimension=8, n_q=4, codebook_size=16, bitrates=(0.6, 1.2), kmeans_iters=3,
                 wave_scales=2, wave_channels=1, stft_channels=2, stft_window=256, stft_hop=64,
                 mel_scales=(6, 7), segment=4800, batch_size=2, max_iters=10, log_interval=1,
                 eval_interval=1000, eval_items=1, eval_seconds=0.5, bench_seconds=0.5, corpus_hours=0.02),
}
# fields that shape the weights: a checkpoint must agree on them
ARCH_KEYS = ("sample_rate", "n_filters", "dimension", "strides", "dilations", "n_q", "codebook_size", "film",
             "wave_scales", "wave_channels", "stft_channels", "stft_window", "stft_hop")

# ----------------------------------------------------------------------------- model

def _init(conv, gain=1.0):
    # N(0, gain^2/fan_in), zero bias (PyTorch's default shrinks the signal ~2x per conv): untrained latents
    # follow the audio, so k-means finds many codes; gain 1/4 keeps 12 residual branches from blowing it up
    stride = conv.stride[0] if isinstance(conv, nn.ConvTranspose1d) else 1
    fan_in = conv.in_channels // conv.groups * conv.kernel_size[0] / stride
    nn.init.normal_(conv.weight, 0.0, gain * fan_in ** -0.5)
    nn.init.zeros_(conv.bias)
    return conv


class CausalConv1d(nn.Module):
    """Conv1d padded with k_eff - stride zeros on the LEFT (§III-A: every convolution is causal): output
    frame t sees samples < (t+1)*stride only. Every module below takes an optional `state` dict: given one,
    it runs on one chunk of a stream, the history it needs kept in state[module]."""
    def __init__(self, cin, cout, kernel, stride=1, dilation=1, gain=1.0):
        super().__init__()
        self.conv = _init(nn.Conv1d(cin, cout, kernel, stride, dilation=dilation), gain)
        self.stride, self.cin, self.cout = stride, cin, cout
        self.k_eff = (kernel - 1) * dilation + 1
        self.pad = self.k_eff - stride

    def forward(self, x, state=None):  # (B, Cin, T) -> (B, Cout, ceil(T/stride))
        if state is None:
            extra = -x.shape[-1] % self.stride  # complete the last window: the decoder rebuilds T samples
            return self.conv(F.pad(x, (self.pad, extra)) if self.pad or extra else x)  # (F.pad copies 0 + 0)
        # a stream's history starts as the `pad` zeros the offline pass uses
        buf = state.get(self)
        x = torch.cat([x.new_zeros(x.shape[0], self.cin, self.pad) if buf is None else buf, x], -1)
        n = (x.shape[-1] - self.pad) // self.stride  # complete windows
        state[self] = x[..., n * self.stride:]
        if n == 0:
            return x.new_zeros(x.shape[0], self.cout, 0)
        return self.conv(x[..., :(n - 1) * self.stride + self.k_eff])


class CausalConvTranspose1d(nn.Module):
    """Transposed conv (kernel 2S, stride S) whose k - S overhanging samples are trimmed on the RIGHT."""
    def __init__(self, cin, cout, kernel, stride):
        super().__init__()
        self.conv = _init(nn.ConvTranspose1d(cin, cout, kernel, stride))
        self.stride, self.cout, self.trim = stride, cout, kernel - stride

    def forward(self, x, state=None):  # (B, Cin, T) -> (B, Cout, T*stride)
        if state is None:
            y = self.conv(x)  # (B, Cout, (T-1)*S + k)
            return y[..., :y.shape[-1] - self.trim]
        # the last k - S outputs of a chunk still receive contributions from the next input frame: keep them
        # (bias included) and add them to the next chunk's head, minus the bias counted twice
        if x.shape[-1] == 0:
            return x.new_zeros(x.shape[0], self.cout, 0)
        y = self.conv(x)  # (B, Cout, (T+1)*S)
        tail = state.get(self)
        if tail is not None:
            y = torch.cat([y[..., :self.trim] + tail - self.conv.bias[:, None], y[..., self.trim:]], -1)
        n = y.shape[-1] - self.trim
        state[self] = y[..., n:]
        return y[..., :n]


class ResidualUnit(nn.Module):
    """§III-A: causal conv k7 (dilation 1, 3 or 9) -> ELU -> conv k1, plus the identity."""
    def __init__(self, dim, dilation):
        super().__init__()
        self.conv1 = CausalConv1d(dim, dim, 7, dilation=dilation)
        self.conv2 = CausalConv1d(dim, dim, 1, gain=0.25)  # a small branch at init (see _init)

    def forward(self, x, state=None):  # stride 1: a chunk gives as many samples, so the skip lines up
        return x + self.conv2(F.elu(self.conv1(x, state)), state)


class EncoderBlock(nn.Module):
    """§III-A: three residual units (dilations 1, 3, 9), then a strided conv (kernel 2S, stride S) doubling
    the channels."""
    def __init__(self, dim, stride, cfg):
        super().__init__()
        self.res = nn.ModuleList(ResidualUnit(dim, d) for d in cfg.dilations)
        self.down = CausalConv1d(dim, 2 * dim, 2 * stride, stride)

    def forward(self, x, state=None):
        for r in self.res:
            x = F.elu(r(x, state))
        return F.elu(self.down(x, state))


class DecoderBlock(nn.Module):
    """§III-B, the mirror: a transposed conv (kernel 2S, stride S) halving the channels, 3 residual units."""
    def __init__(self, dim, stride, cfg):
        super().__init__()
        self.up = CausalConvTranspose1d(dim, dim // 2, 2 * stride, stride)
        self.res = nn.ModuleList(ResidualUnit(dim // 2, d) for d in cfg.dilations)

    def forward(self, x, state=None):
        x = F.elu(self.up(x, state))
        for r in self.res:
            x = F.elu(r(x, state))
        return x


class Encoder(nn.Module):
    """§III-A: conv k7 (1 -> C) -> 4 blocks (strides 2, 4, 5, 8; C -> 16C) -> conv k3 -> D. No LSTM, no
    normalisation: fully convolutional. (B, 1, T) -> (B, D, T/320)"""
    def __init__(self, cfg):
        super().__init__()
        C = cfg.n_filters
        self.conv_in = CausalConv1d(1, C, 7)
        self.blocks = nn.ModuleList(EncoderBlock(C * 2 ** i, s, cfg) for i, s in enumerate(cfg.strides))
        self.conv_out = CausalConv1d(C * 2 ** len(cfg.strides), cfg.dimension, 3)

    def forward(self, x, state=None):
        x = self.conv_in(x, state)
        for b in self.blocks:
            x = b(x, state)
        return self.conv_out(x, state)


class Decoder(nn.Module):
    """§III-B, the mirror image: conv k7 (D -> 16C) -> 4 blocks (strides 8, 5, 4, 2; 16C -> C) -> conv k7."""
    def __init__(self, cfg):
        super().__init__()
        C, n = cfg.n_filters, len(cfg.strides)
        self.conv_in = CausalConv1d(cfg.dimension, C * 2 ** n, 7)
        self.blocks = nn.ModuleList(DecoderBlock(C * 2 ** (n - i), s, cfg)
                                    for i, s in enumerate(reversed(cfg.strides)))
        self.conv_out = CausalConv1d(C, 1, 7)

    def forward(self, z, state=None):
        x = F.elu(self.conv_in(z, state))
        for b in self.blocks:
            x = b(x, state)
        return self.conv_out(x, state)


class FiLM(nn.Module):
    """§III-F: feature-wise linear modulation of the embedding by the denoise flag c ∈ {0, 1} (B,):
    (1 + γ c) ⊙ z + β c per channel. c = 0 is exactly the identity: the plain codec."""
    def __init__(self, dim):
        super().__init__()
        self.gamma, self.beta = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))

    def forward(self, z, cond):  # z (B, D, T), cond (B,)
        c = cond.to(z.dtype)[:, None, None]  # (B, 1, 1)
        return z * (1 + self.gamma[None, :, None] * c) + self.beta[None, :, None] * c


def _sample_rows(x, n):  # n random rows of x (without replacement when there are enough)
    if x.shape[0] >= n:
        return x[torch.randperm(x.shape[0], device=x.device)[:n]]
    return x[torch.randint(0, x.shape[0], (n,), device=x.device)]


def _nearest(x, embed):
    # squared Euclidean distance, expanded so it is one matmul: (N, D), (K, D) -> (N,)
    dist = x.pow(2).sum(1, keepdim=True) - 2 * x @ embed.t() + embed.pow(2).sum(1)[None]
    return dist.argmin(-1)


def kmeans(x, k, iters):
    """Lloyd's algorithm on the first batch: the codebook initialisation of §III-C."""
    means = _sample_rows(x, k)
    for _ in range(iters):
        assign = _nearest(x, means)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(means).index_add_(0, assign, x)
        means = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None].to(x.dtype), means)
    return means, counts


class Codebook(nn.Module):
    """One VQ layer (§III-C): nearest-neighbour lookup in `embed`, updated by EMA as in VQ-VAE-2 (not by
    gradients), k-means initialised, dead codes re-seeded from the batch."""
    def __init__(self, cfg, share=1.0):
        super().__init__()
        K, D = cfg.codebook_size, cfg.dimension
        self.decay, self.kmeans_iters, self.eps = cfg.ema_decay, cfg.kmeans_iters, 1e-5
        # share: the expected fraction of the batch that reaches this layer under quantizer dropout; usage
        # counts only those rows, so the threshold (set for a layer all rows reach) scales with it (ours)
        self.threshold = cfg.dead_code_threshold * share
        # a re-seeded code's usage restarts at threshold / decay^grace (ours): never picked, it takes `grace`
        # steps of EMA decay to fall back under the threshold (+0.5: rounding margin)
        self.reset = self.threshold * cfg.ema_decay ** -(cfg.dead_code_grace + 0.5)
        self.register_buffer("inited", torch.zeros(1))      # 0 until k-means has run on a training batch
        self.register_buffer("cluster_size", torch.zeros(K))  # EMA of how often each code is picked
        self.register_buffer("embed", torch.zeros(K, D))     # the codewords
        self.register_buffer("embed_avg", torch.zeros(K, D))  # EMA of the sum of the vectors each code got
        self._inited = False  # a host-side copy of `inited`, so a training step never reads the device
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_inited", False))

    def forward(self, x, active):  # x: (N, D) fp32, active (N,) bool -> quantized (N, D), codes (N,)
        if self.training and not self._is_inited():
            self._kmeans_init(x)  # on every row, whatever n_q drew (the RVQ inits one layer per step)
        codes = _nearest(x, self.embed)
        q = F.embedding(codes, self.embed)
        if self.training:
            self._ema_update(x, codes, active)
        return q, codes

    @torch.no_grad()
    def _kmeans_init(self, x):
        means, counts = kmeans(x, self.embed.shape[0], self.kmeans_iters)
        self.embed.copy_(means)
        self.cluster_size.copy_(counts)
        self.embed_avg.copy_(means * counts[:, None])  # so that embed_avg / cluster_size == means
        self.inited.fill_(1)
        self._inited = True
        if dist.is_available() and dist.is_initialized():  # rank 0's random choices win
            for b in (self.embed, self.embed_avg, self.cluster_size, self.inited):
                dist.broadcast(b, 0)

    def _is_inited(self):
        # the buffer is read once per process (first step, or after loading): no host sync in later steps
        if not self._inited:
            self._inited = bool(self.inited.item())
        return self._inited

    @torch.no_grad()
    def _ema_update(self, x, codes, active):
        K = self.embed.shape[0]
        onehot = F.one_hot(codes, K).type(x.dtype) * active[:, None].to(x.dtype)  # (N, K): the rows it serves
        counts, sums = onehot.sum(0), onehot.t() @ x  # (K,), (K, D)
        if dist.is_available() and dist.is_initialized():  # statistics of the global batch
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + K * self.eps) * n  # Laplace smoothing: no 0 division
        self.embed.copy_(self.embed_avg / smoothed[:, None])
        # §III-C: a code unused for several batches takes a random vector of the current batch, its usage
        # reset to self.reset; masked updates (no `if dead.any()`), so the step never waits for the device
        dead = self.cluster_size < self.threshold  # (K,)
        new = _sample_rows(x, K)  # (K, D)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(new, 0)  # rank 0's rows: the buffers stay identical on every rank
        self.embed.copy_(torch.where(dead[:, None], new, self.embed))
        self.cluster_size.copy_(torch.where(dead, self.reset, self.cluster_size))
        self.embed_avg.copy_(torch.where(dead[:, None], new * self.reset, self.embed_avg))


class ResidualVectorQuantizer(nn.Module):
    """Alg. 1: codebook i quantizes what codebooks 1..i-1 left. Quantizer dropout (§III-C): example b uses
    only its first n_q[b] codebooks, so the decoder learns to work from any prefix."""
    def __init__(self, cfg):
        super().__init__()
        # under dropout, layer i is reached by the examples that drew n_q > i: a share (N_q - i) / N_q of them
        share = lambda i: (cfg.n_q - i) / cfg.n_q if cfg.quantizer_dropout else 1.0
        self.layers = nn.ModuleList(Codebook(cfg, share(i)) for i in range(cfg.n_q))
        self.warmup = cfg.quantizer_warmup
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # training steps so far (for warmup)
        self._steps = None  # host-side copy of `steps` (None: read the buffer once), so tick() never syncs
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_steps", None))

    def tick(self):
        """Count one training step; False during the first cfg.quantizer_warmup steps (a plain autoencoder
        then, so that k-means sees trained latents): a Python bool train_step passes to the compiled model."""
        if self._steps is None:
            self._steps = int(self.steps)
        self._steps += 1
        self.steps += 1
        return self._steps > self.warmup

    def forward(self, z, n_q, quantize=True):  # z (B, D, T), n_q (B,) -> (B, D, T), codes (B, N_q, T) or -1
        B, D, T = z.shape
        if not quantize:  # the quantizer warm-up: the encoder's output goes to the decoder as it is
            return z, None
        with torch.no_grad(), torch.autocast(z.device.type, enabled=False):  # codebook statistics stay fp32
            x = z.float().transpose(1, 2).reshape(B * T, D)  # (B*T, D)
            uses = n_q.to(z.device).repeat_interleave(T)  # (B*T,) codebooks each frame may use
            residual, out, codes, fresh = x, torch.zeros_like(x), [], False
            for i, layer in enumerate(self.layers):  # every layer runs: all ranks do the same collectives
                if self.training and not layer._is_inited():
                    # k-means one level per step (as the official Mimi code): a level fitted on a batch of
                    # fewer frames than codes leaves its successor an all-zero residual there, so the next
                    # level waits for the next step's residual; until then it gives no codes (-1)
                    if fresh:
                        codes.extend([torch.full_like(uses, -1)] * (len(self.layers) - i))
                        break
                    fresh = True
                active = uses > i
                q, c = layer(residual, active)
                out = out + q * active[:, None]
                residual = residual - q
                codes.append(torch.where(active, c, -1))
        out = z + (out.view(B, T, D).transpose(1, 2).to(z.dtype) - z).detach()  # straight-through estimator
        return out, torch.stack(codes, 1).view(B, T, -1).transpose(1, 2)

    @torch.no_grad()
    def encode(self, z, n_q):  # (B, D, T) -> codes (B, n_q, T)
        B, D, T = z.shape
        residual, codes = z.float().transpose(1, 2).reshape(B * T, D), []  # (B*T, D)
        for layer in self.layers[:n_q]:
            c = _nearest(residual, layer.embed)
            residual = residual - F.embedding(c, layer.embed)
            codes.append(c)
        return torch.stack(codes, 1).view(B, T, n_q).transpose(1, 2)

    def decode(self, codes):  # (B, n_q, T) -> (B, D, T)
        out = sum(F.embedding(codes[:, i], l.embed) for i, l in enumerate(self.layers[:codes.shape[1]]))
        return out.transpose(1, 2)  # (B, T, D) -> (B, D, T)


class SoundStream(nn.Module):
    """Encoder -> (FiLM) -> RVQ -> (FiLM) -> decoder (§III, §III-F), and the bitrate arithmetic (§III-C)"""
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.quantizer, self.decoder = Encoder(cfg), ResidualVectorQuantizer(cfg), Decoder(cfg)
        self.film = FiLM(cfg.dimension) if cfg.film != "none" else None
        self.hop = math.prod(cfg.strides)
        self.frame_rate = cfg.sample_rate / self.hop  # 75 Hz at 24 kHz
        self.bits = int(math.log2(cfg.codebook_size))

    def kbps(self, n_q):  # 75 Hz x 10 bits x n_q
        return self.frame_rate * self.bits * n_q / 1000

    def n_q_for(self, kbps):
        return round(kbps * 1000 / (self.frame_rate * self.bits))

    def _film(self, z, cond, side):
        return self.film(z, cond) if self.cfg.film == side and cond is not None else z

    def forward(self, x, n_q, cond=None, quantize=True):  # (B, 1, T), n_q (B,), cond (B,) -> (B, 1, T), codes
        z = self._film(self.encoder(x), cond, "encoder")
        q, codes = self.quantizer(z, n_q, quantize)
        x_hat = self.decoder(self._film(q, cond, "decoder"))[..., :x.shape[-1]]
        return x_hat, codes

    @torch.no_grad()
    def encode(self, x, n_q, cond=None):  # (B, 1, T), int -> codes (B, n_q, ceil(T/hop))
        return self.quantizer.encode(self._film(self.encoder(x), cond, "encoder"), n_q)

    @torch.no_grad()
    def decode(self, codes, cond=None):  # (B, n_q, F) -> (B, 1, F*hop)
        return self.decoder(self._film(self.quantizer.decode(codes), cond, "decoder"))

    @torch.no_grad()
    def encode_stream(self, x, state, n_q, cond=None):  # a chunk of audio -> the codes of the frames it ends
        return self.quantizer.encode(self._film(self.encoder(x, state), cond, "encoder"), n_q)

    @torch.no_grad()
    def decode_stream(self, codes, state, cond=None):  # a chunk of codes -> the audio it makes final
        return self.decoder(self._film(self.quantizer.decode(codes), cond, "decoder"), state)


class WaveDiscriminator(nn.Module):
    """One scale of the multi-scale waveform discriminator (§III-D, MelGAN's layout): grouped strided conv"""
    def __init__(self, ch):
        super().__init__()
        wn, top = nn.utils.parametrizations.weight_norm, 64 * ch
        self.convs = nn.ModuleList([wn(nn.Conv1d(1, ch, 15, padding=7, padding_mode="reflect"))])
        c = ch
        for _ in range(4):  # x4 channels (up to 64C), /4 time, groups so each costs about the same
            self.convs.append(wn(nn.Conv1d(c, min(4 * c, top), 41, 4, padding=20, groups=max(1, c // 4))))
            c = min(4 * c, top)
        self.convs.append(wn(nn.Conv1d(c, c, 5, padding=2)))
        self.conv_post = wn(nn.Conv1d(c, 1, 3, padding=1))

    def forward(self, x):  # (B, 1, T) -> logits (B, 1, T/256), feature maps
        fmap = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
            fmap.append(x)
        return self.conv_post(x), fmap


class ResidualUnit2d(nn.Module):
    """§III-D STFT discriminator unit: conv 3x3 -> ELU -> conv (s_t+2)x(s_f+2) with stride (s_t, s_f), plus a
    strided 1x1 skip; N channels inside, m*N out."""
    def __init__(self, cin, n, m, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, n, 3, padding=1)
        self.conv2 = nn.Conv2d(n, m * n, (stride[0] + 2, stride[1] + 2), stride, padding=1)
        self.skip = nn.Conv2d(cin, m * n, 1, stride)

    def forward(self, x):  # (B, Cin, frames, F) -> (B, m*N, frames/s_t, F/s_f)
        y = self.conv2(F.elu(self.conv1(x)))
        return y + self.skip(x)[..., :y.shape[-2], :y.shape[-1]]  # (the skip rounds an odd length up)


class STFTDiscriminator(nn.Module):
    """§III-D: 2-D convs on the complex STFT (W = 1024, H = 256) laid out as 2 channels, real and imaginary
    (B, 2, frames, W/2 bins); six residual units halve the frequency axis to W/128 bins, which a last conv
    collapses: 1-D logits over time."""
    def __init__(self, cfg):
        super().__init__()
        C, self.W, self.H = cfg.stft_channels, cfg.stft_window, cfg.stft_hop
        self.register_buffer("window", torch.hann_window(self.W), persistent=False)
        self.conv_in = nn.Conv2d(2, C, 7, padding=3)
        # (N, m, (s_t, s_f)) per unit: the paper's STFT-discriminator layout as wesbz/SoundStream reads it
        layout = [(C, 2, (1, 2)), (2 * C, 2, (2, 2)), (4 * C, 1, (1, 2)), (4 * C, 2, (2, 2)),
                  (8 * C, 1, (1, 2)), (8 * C, 2, (2, 2))]
        self.units, cin = nn.ModuleList(), C
        for n, m, s in layout:
            self.units.append(ResidualUnit2d(cin, n, m, s))
            cin = m * n
        self.conv_post = nn.Conv2d(cin, 1, (1, self.W // 2 // 64))

    def spectrogram(self, x):  # (B, 1, T) -> (B, 2, frames, W/2): real and imaginary parts as channels
        with torch.autocast(x.device.type, enabled=False):
            spec = torch.stft(x.float()[:, 0], self.W, self.H, window=self.window, center=False,
                              return_complex=True)  # (B, W/2+1, frames)
        spec = spec[:, :self.W // 2]  # drop the Nyquist bin: W/2 halves six times
        return torch.stack([spec.real, spec.imag], 1).transpose(2, 3)  # (B, 2, frames, W/2)

    def forward(self, x):  # -> logits (B, 1, frames/8, 1), feature maps
        z = self.conv_in(self.spectrogram(x))
        fmap = [z]
        for unit in self.units:
            z = F.elu(unit(z))
            fmap.append(z)
        return self.conv_post(z), fmap


class Discriminators(nn.Module):
    """§III-D: the K = wave_scales + 1 discriminators: the waveform at 1x, 2x, 4x downsampling; the STFT."""
    def __init__(self, cfg):
        super().__init__()
        self.waves = nn.ModuleList(WaveDiscriminator(cfg.wave_channels) for _ in range(cfg.wave_scales))
        self.stft = STFTDiscriminator(cfg)

    def forward(self, x):  # (B, 1, T) -> K logits, K lists of feature maps: [STFT, wave x1, wave x2, ...]
        l, f = self.stft(x)
        logits, fmaps = [l], [f]
        for i, d in enumerate(self.waves):
            if i:
                x = F.avg_pool1d(x, 4, 2, padding=1, count_include_pad=False)  # halve the rate
            l, f = d(x)
            logits.append(l)
            fmaps.append(f)
        return logits, fmaps

# ----------------------------------------------------------------------------- loss

def reconstruction_loss(x, x_hat, cfg):
    """§III-E: Σ_s mean_t ‖S_t^s(x) - S_t^s(x̂)‖_1 + α_s ‖log S_t^s(x) - log S_t^s(x̂)‖_2,
    s = 2^6..2^11, α_s = sqrt(s/2), S^s a 64-bin mel spectrogram of window s and hop s/4. Ours: averaged
    over frames (the paper sums over t), the L1 over mel bins and the sum over scales, so the term's size
    does not grow with the crop and λ_rec alone sets its share of the gradient (Config.lambda_rec)."""
    total = 0.0
    for i in cfg.mel_scales:
        s = 2 ** i
        kw = dict(sr=cfg.sample_rate, n_fft=s, hop=s // 4, n_mels=cfg.n_mels, log=None)
        a, b = common.mel_spectrogram(x, **kw)[:, 0], common.mel_spectrogram(x_hat, **kw)[:, 0]  # (B, M, t)
        l1 = (a - b).abs().mean((1, 2))  # (B,)
        dlog = a.clamp(min=1e-5).log() - b.clamp(min=1e-5).log()
        l2 = (dlog.pow(2).sum(1) + 1e-12).sqrt().mean(1)  # L2 norm over mel bins, mean over frames (B,)
        total = total + (l1 + math.sqrt(s / 2) * l2).mean()
    return total / len(cfg.mel_scales)


def generator_adv_loss(logits_fake):  # §III-E hinge: 1/K Σ_k mean_t relu(1 - D_k(G(x)))
    return sum(F.relu(1 - l.float()).mean() for l in logits_fake) / len(logits_fake)


def feature_loss(fmap_real, fmap_fake):
    """§III-E: 1/(K L) Σ_{k,l} mean |D_k^l(x) - D_k^l(G(x))| over every layer of every discriminator
    (absolute, not EnCodec's relative L1); the real features are targets (no gradient)."""
    terms = [(r.detach().float() - f.float()).abs().mean()
             for fr, ff in zip(fmap_real, fmap_fake) for r, f in zip(fr, ff)]
    return sum(terms) / len(terms)


def discriminator_loss(logits_real, logits_fake):
    """§III-E hinge: 1/K Σ_k mean relu(1 - D_k(x)) + relu(1 + D_k(x̂))."""
    return sum(F.relu(1 - r.float()).mean() + F.relu(1 + f.float()).mean()
               for r, f in zip(logits_real, logits_fake)) / len(logits_real)

# ----------------------------------------------------------------------------- data

def colored_noise(n, length, beta):
    """(n, length) unit-variance Gaussian noise with power 1/f^beta (beta (n,): 0 white, 1 pink, 2 brown)."""
    spec = torch.fft.rfft(torch.randn(n, length), dim=-1)  # (n, length/2+1)
    f = torch.arange(spec.shape[-1]).clamp(min=1).float()
    spec = spec * f[None] ** (-beta[:, None] / 2)
    spec[:, 0] = 0  # no DC offset: the RMS below is the noise's power
    noise = torch.fft.irfft(spec, n=length, dim=-1)
    return noise / noise.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-8)


def add_noise(clean, snr_db, beta):
    """§III-F: background noise at a given SNR (dB). clean (B, 1, T), snr_db and beta (B,)."""
    noise = colored_noise(clean.shape[0], clean.shape[-1], beta)[:, None]  # (B, 1, T)
    rms = clean.pow(2).mean(-1, keepdim=True).sqrt()
    return clean + noise * rms * 10 ** (-snr_db[:, None, None] / 20)


def audio_clips(cfg, split, kind="audio"):
    """Mono float32 clips (T,) at the model's rate: speech + music for training, one kind for evaluation."""
    return [u.wav for u in common.load_corpus(cfg, split, cfg.sample_rate, kind=kind)]


def eval_kinds(cfg):
    # the built-in corpus is evaluated per kind (speech in an unseen voice, music); a --data_dir folder as one
    return ("audio",) if cfg.data_dir else ("speech", "music")


def get_batch(sampler, cfg, rt):
    """(input, target, denoise flag, n_q) per example (§III-C, §III-F). With FiLM, some inputs get noise and
    some examples ask for denoising: target = clean when the flag is on, else the input (noisy or not). Every
    draw is from torch's global RNG (checkpointed): a resumed run draws what a straight one would."""
    B = cfg.batch_size
    clean = sampler.next()[0].view(B, 1, cfg.segment)  # (B, 1, T)
    # §III-C quantizer dropout: n_q uniform in {1, ..., N_q} for every example
    n_q = torch.randint(1, cfg.n_q + 1, (B,)) if cfg.quantizer_dropout else torch.full((B,), cfg.n_q)
    noisy, flag = torch.rand(B) < cfg.noise_prob, torch.rand(B) < cfg.denoise_prob
    lo, hi = cfg.snr_range
    snr, beta = lo + (hi - lo) * torch.rand(B), 2 * torch.rand(B)
    if cfg.film == "none":  # a plain codec: no noise, no flag
        x, target, flag = clean, clean, torch.zeros(B, dtype=torch.bool)
    else:
        x = torch.where(noisy[:, None, None], add_noise(clean, snr, beta), clean)
        target = torch.where(flag[:, None, None], clean, x)
    dev = rt.device
    return dict(x=x.to(dev), target=target.to(dev), cond=flag.float().to(dev), n_q=n_q.to(dev))

# ----------------------------------------------------------------------------- train

def build(cfg, rt):
    """Everything training holds (saved whole by common.save_checkpoint): the codec G, the discriminators D,
    Adam for both."""
    G, D = SoundStream(cfg).to(rt.device), Discriminators(cfg).to(rt.device)
    # §III-C: each codebook costs log2(1024) = 10 bits per frame, 75 frames a second
    common.log(f"bitrate: {G.frame_rate:g} Hz x {G.bits} bits x n_q = " +
               ", ".join(f"{G.kbps(G.n_q_for(b)):g} kbps at n_q={G.n_q_for(b)}" for b in cfg.bitrates) +
               f" (1..{cfg.n_q} codebooks: {G.kbps(1):g}..{G.kbps(cfg.n_q):g} kbps)")
    return dict(G=G, D=D,
                opt_g=torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=cfg.betas),
                opt_d=torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=cfg.betas))


def _clip(opt, cfg):
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)


def train_step(state, batch, cfg, rt):
    """One step of §III-E: the discriminators' hinge update on (target, G(input)), then the codec's update
    on λ_adv·adversarial + λ_feat·feature matching + λ_rec·reconstruction against the updated D."""
    G, D, opt_g, opt_d = state["G"], state["D"], state["opt_g"], state["opt_d"]
    y, B = batch["target"], batch["target"].shape[0]
    quantize = common.unwrap(G).quantizer.tick()  # False during cfg.quantizer_warmup (a host-side count)
    with rt.autocast():
        y_hat, _ = G(batch["x"], batch["n_q"], batch["cond"], quantize)
    rec, time = reconstruction_loss(y, y_hat, cfg), (y - y_hat.float()).abs().mean()
    recon = cfg.lambda_rec * rec + cfg.lambda_time * time  # (time: ours, 0 in the paper preset)
    if common.unwrap(G).quantizer._steps <= cfg.disc_warmup:  # reconstruction alone (ours): no D to fool yet
        opt_g.zero_grad(set_to_none=True)
        recon.backward()
        _clip(opt_g, cfg)
        opt_g.step()
        zero = rec.detach() * 0
        return dict(d=zero, g=recon.detach(), adv=zero, feat=zero, rec=rec, time=time,
                    n_q=batch["n_q"].float().mean())
    with rt.autocast():
        logits, _ = D(torch.cat([y, y_hat.detach()]))  # one pass over real and fake: (2B, ...)
    loss_d = discriminator_loss([l[:B] for l in logits], [l[B:] for l in logits])
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    _clip(opt_d, cfg)
    opt_d.step()
    with rt.autocast():
        logits, fmaps = common.unwrap(D)(torch.cat([y, y_hat]))  # the codec's step needs no sync through D
    adv = generator_adv_loss([l[B:] for l in logits])
    feat = feature_loss([[f[:B] for f in fm] for fm in fmaps], [[f[B:] for f in fm] for fm in fmaps])
    loss_g = cfg.lambda_adv * adv + cfg.lambda_feat * feat + recon
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    _clip(opt_g, cfg)
    opt_g.step()
    return dict(d=loss_d, g=loss_g, adv=adv, feat=feat, rec=rec, time=time, n_q=batch["n_q"].float().mean())


def load_for_inference(cfg, rt):
    """The codec sample/eval use, from --init_from: our checkpoint (cfg already holds its config, see
    common.parse_config). SoundStream has no official PyTorch weights (Lyra ships TFLite): no key map."""
    ckpt = common.load_checkpoint(common.checkpoint_path(cfg))
    if not common.is_ours(ckpt):
        raise SystemExit(f"error: {cfg.init_from} is not a nanoaudio checkpoint (SoundStream has no official "
                         "PyTorch weights to load; train one with python soundstream.py)")
    model = SoundStream(cfg)
    common.load_models(ckpt, cfg, {"G": model}, ARCH_KEYS)
    return model.to(rt.device).eval()


def resynth(m, x, kbps, cond=None):  # encode at a bitrate and decode: (B, 1, T) -> (B, 1, T)
    return m.decode(m.encode(x, m.n_q_for(kbps), cond), cond)[..., :x.shape[-1]]


def _noisy(clean, cfg, seed):  # the same noise at every evaluation: its own generator, at cfg.eval_snr dB
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return add_noise(clean, torch.full((clean.shape[0],), cfg.eval_snr), torch.ones(clean.shape[0]))


@torch.no_grad()
def evaluate(cfg, model=None, rt=None, samples_dir=None, split="test"):
    """SI-SNR (dB) and mel distance at every bitrate on held-out speech (an unseen voice) and music, all from
    one model; with FiLM (§III-F), noisy speech decoded with the denoise flag off and on, scored against the
    clean clip, beside the noisy input itself; and the mel distance of decoding a zero latent (a decoder that
    ignores its input scores the same as with the codes)."""
    if model is None:
        rt = common.setup(cfg)
        model = load_for_inference(cfg, rt)
    m = common.unwrap(model)
    was_training, dev = m.training, next(m.parameters()).device
    m.eval()
    n, sr, results = int(cfg.eval_seconds * cfg.sample_rate), cfg.sample_rate, {}
    clips = {kind: [torch.from_numpy(np.ascontiguousarray(c[:n]))
                    for c in audio_clips(cfg, split, kind)[:cfg.eval_items]] for kind in eval_kinds(cfg)}

    def score(key, inputs, refs, kbps, flag=None, sample_name=None):  # mean SI-SNR and mel distance vs refs
        cond = None if flag is None else torch.full((1,), float(flag), device=dev)
        ys = [resynth(m, x[None, None].to(dev), kbps, cond)[0, 0].cpu() for x in inputs]
        results[f"{key}_si_snr"] = float(np.mean([common.si_snr(y, c) for y, c in zip(ys, refs)]))
        results[f"{key}_mel"] = float(np.mean([common.mel_distance(y, c, sr) for y, c in zip(ys, refs)]))
        if samples_dir and sample_name and kbps == cfg.bitrates[-1]:  # (--mode=sample writes every bitrate)
            common.save_sample(samples_dir, sample_name, ys[0], sr, ref=refs[0])

    for kind, cs in clips.items():
        for kbps in cfg.bitrates:
            score(f"{kind}_{kbps:g}kbps", cs, cs, kbps, sample_name=f"{kind}_{kbps:g}kbps")
    speech = clips[eval_kinds(cfg)[0]]
    if cfg.film != "none":  # §III-F: one codec, denoising switched by the flag; scored against the CLEAN one
        noisy = [_noisy(c[None, None], cfg, seed=i)[0, 0] for i, c in enumerate(speech)]
        for kbps in cfg.bitrates:
            score(f"noisy_{kbps:g}kbps_off", noisy, speech, kbps, flag=0)
            score(f"noisy_{kbps:g}kbps_on", noisy, speech, kbps, 1, f"noisy_{kbps:g}kbps_denoised")
        results["noisy_input_si_snr"] = float(np.mean([common.si_snr(x, c) for x, c in zip(noisy, speech)]))
        results["noisy_input_mel"] = float(np.mean([common.mel_distance(x, c, sr)
                                                    for x, c in zip(noisy, speech)]))
    # does the decoder use the latent? decoding an all-zero latent gives the baseline mel distance
    x = speech[0][None, None].to(dev)
    y0 = m.decoder(torch.zeros_like(m.encoder(x)))[..., :x.shape[-1]].cpu()
    results["zero_latent_mel"] = common.mel_distance(y0[0, 0], speech[0], sr)
    common.log(f"eval ({split}) | " + " | ".join(f"{k} {v:.3f}" for k, v in results.items()))
    if cfg.mode == "eval" and not cfg.data_dir and cfg.listen_items:
        listening_sets(cfg, m, dev)
    m.train(was_training)
    return results


@torch.no_grad()
def listening_sets(cfg, m, dev):
    """Whole test speech clips coded at the lowest and highest bitrate, and the originals, as folders for
    `whisper.py --mode=sample --input_dir=DIR` to judge (common.write_listening_sets)."""
    utts = common.load_corpus(cfg, "test", cfg.sample_rate, kind="speech")[:cfg.listen_items]
    coders = {f"resynth_{kbps:g}kbps": lambda x, kbps=kbps: resynth(m, x[None].to(dev), kbps)[0]
              for kbps in (min(cfg.bitrates), max(cfg.bitrates))}
    common.write_listening_sets(os.path.join(cfg.out_dir, "listen"), utts, coders, cfg.sample_rate)


def train(cfg):
    rt = common.setup(cfg)
    state = build(cfg, rt)
    G = state["G"]
    common.log(f"params: encoder {common.count_params(G.encoder):,} | decoder "
               f"{common.count_params(G.decoder):,} | discriminators {common.count_params(state['D']):,}")
    train_clips = audio_clips(cfg, "train")
    common.check_clips(train_clips, cfg.segment, "train split")  # data errors stop before step 1, not after
    for kind in eval_kinds(cfg):
        common.check_clips(audio_clips(cfg, "val", kind), G.hop, f"val split ({kind})")
    sampler = common.SegmentSampler(train_clips, cfg.segment, cfg.batch_size, cfg.seed, rt.rank,
                                    rt.world_size)
    # scratch: step 0 | resume: out_dir/ckpt.pt continues exactly | PATH: our weights only, fresh optimizers,
    # step 0
    step = common.init_from(cfg, state, sampler=sampler, arch_keys=ARCH_KEYS, official=None)
    state["G"] = common.wrap_ddp(common.compile(G, cfg), rt)
    state["D"] = common.wrap_ddp(common.compile(state["D"], cfg), rt)

    def evaluate_val(samples_dir):
        evaluate(cfg, G, rt, samples_dir=samples_dir, split="val")
    common.train_loop(cfg, rt, state, step, train_step, lambda *_: get_batch(sampler, cfg, rt),
                      evaluate_val, sampler=sampler)

# ----------------------------------------------------------------------------- sample

@torch.no_grad()
def sample(cfg):
    """Encode held-out speech and music (or --input) at every bitrate, decode, write wav + png pairs; with
    FiLM (§III-F), the first item again with noise added, decoded with the denoise flag off and on."""
    rt = common.setup(cfg)
    model = load_for_inference(cfg, rt)
    if cfg.input:
        wav, _ = common.load_audio(cfg.input, sr=cfg.sample_rate, mono=True)
        items = [(os.path.splitext(os.path.basename(cfg.input))[0], wav)]
    else:
        items = [(kind, audio_clips(cfg, "test", kind)[0][:int(cfg.eval_seconds * cfg.sample_rate)])
                 for kind in eval_kinds(cfg)]
    out = os.path.join(cfg.out_dir, "samples")
    for name, wav in items:
        c = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
        x = c[None, None].to(rt.device)  # (1, 1, T)
        for kbps in cfg.bitrates:
            y = resynth(model, x, kbps)[0, 0].cpu()
            common.save_sample(out, f"{name}_{kbps:g}kbps", y, cfg.sample_rate, ref=c)
            common.log(f"{name} @ {kbps:g} kbps ({model.n_q_for(kbps)} codebooks): SI-SNR "
                       f"{common.si_snr(y, c):.2f} dB -> {out}/{name}_{kbps:g}kbps.wav")
        if cfg.film != "none" and name == items[0][0]:  # §III-F on the first item (speech): denoise off / on
            noisy, kbps = _noisy(c[None, None], cfg, seed=0), cfg.bitrates[-1]
            common.save_sample(out, f"{name}_noisy", noisy[0, 0], cfg.sample_rate, ref=c)
            for flag in (0, 1):
                cond = torch.full((1,), float(flag), device=rt.device)
                y = resynth(model, noisy.to(rt.device), kbps, cond)[0, 0].cpu()
                common.save_sample(out, f"{name}_noisy_{kbps:g}kbps_denoise{flag}", y, cfg.sample_rate, ref=c)
                common.log(f"{name} + noise ({cfg.eval_snr:g} dB) @ {kbps:g} kbps, denoise "
                           f"{'on' if flag else 'off'}: SI-SNR vs clean {common.si_snr(y, c):.2f} dB")

# ----------------------------------------------------------------------------- bench

def bench(cfg):
    """One JSON line: train_step (the step training runs most: with the quantizer) in ms and audio-s/s with
    its FLOPs; encode / decode real-time factors at batch 1, eager and compiled; frame-by-frame streaming."""
    rt = common.setup(cfg)
    cfg = replace(cfg, quantizer_warmup=0)
    state = build(cfg, rt)
    model = state["G"]
    state["G"], state["D"] = common.compile(model, cfg), common.compile(state["D"], cfg)
    compiled = state["G"] is not model
    B, x = cfg.batch_size, torch.randn(cfg.batch_size, 1, cfg.segment, device=rt.device) * 0.1
    batch = dict(x=x, target=x, cond=torch.zeros(B, device=rt.device),
                 n_q=torch.full((B,), cfg.n_q, device=rt.device))
    iters = 3 if rt.device_type == "cpu" else 10
    step_ms = common.timeit(lambda: train_step(state, batch, cfg, rt), iters=iters, warmup=2)
    flops = common.count_flops(lambda: train_step(state, batch, cfg, rt))
    model.eval()
    seconds = cfg.batch_size * cfg.segment / cfg.sample_rate
    figures = dict(train_step_ms=round(step_ms, 2), train_flops_per_step=flops,
                   train_audio_s_per_s=round(seconds / (step_ms / 1000), 2))
    T, n_q = int(cfg.bench_seconds * cfg.sample_rate) // model.hop * model.hop, cfg.n_q
    xb = torch.randn(1, 1, T, device=rt.device) * 0.1
    figures |= common.codec_rtf(lambda x: model.encode(x, n_q), model.decode, xb, cfg.bench_seconds, rt,
                                compiled, tag="_b1", iters=iters)

    def streaming():  # one 13.3 ms frame at a time through encoder and decoder, as a phone call would
        enc_state, dec_state = {}, {}
        for t in range(0, T, model.hop):
            model.decode_stream(model.encode_stream(xb[..., t:t + model.hop], enc_state, n_q), dec_state)
    stream_ms = common.timeit(streaming, iters=1, warmup=1)
    figures["stream_rtf_b1_eager"] = round(stream_ms / 1000 / cfg.bench_seconds, 5)
    common.report_bench(cfg, rt, model=model, compiled=compiled, **figures)

# ----------------------------------------------------------------------------- main

if __name__ == "__main__":
    cfg = common.parse_config(Config, PRESETS)
    {"train": train, "sample": sample, "eval": evaluate, "bench": bench}[cfg.mode](cfg)
