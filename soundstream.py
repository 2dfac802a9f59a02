"""
SoundStream: An End-to-End Neural Audio Codec (Zeghidour, Luebs, Omran, Skoglund, Tagliasacchi, 2021) — https://arxiv.org/abs/2107.03312

The idea: a fully convolutional, causal encoder (strides 2·4·5·8) turns 24 kHz audio into 75 embeddings per
second; a residual vector quantizer (RVQ, Alg. 1) replaces each by up to N_q ten-bit codes, each codebook
quantizing what the ones before it left; a mirror decoder turns the codes back into audio. Quantizer dropout
(§III-C) draws a number of codebooks n_q ∈ {1..N_q} per training example, so ONE model serves 3 to 18 kbps
(75 Hz × 10 bits × n_q). A FiLM layer driven by a "denoise" flag (§III-F) makes the same codec a speech
enhancer on demand, at the encoder or the decoder side. Training (§III-D, §III-E) adds a multi-scale waveform
discriminator and an STFT discriminator on complex spectrograms (hinge loss, feature matching) to a
multi-scale mel reconstruction loss. Every convolution is causal, so encoding and decoding stream in chunks
with exactly the offline result.

Section labels are the arXiv paper's (III-A encoder, III-B decoder, III-C RVQ, III-D discriminators, III-E
training objective, III-F joint compression and enhancement; Alg. 1 the RVQ), as recalled, not re-checked.

Simplified or changed here (honestly):
- The embedding dimension D, the optimizer, lr, batch and step count are not in the paper (addendum §4): this
  file takes D = 128, Adam lr 1e-4 with betas (0.5, 0.9), batch 32, 1 s crops, 200k steps (the Audyn reading).
- No separate commitment or codebook loss: codebooks learn by EMA only and the encoder through the
  straight-through estimator, as the paper's objective (adversarial + feature + reconstruction) implies.
- Convolutions start from a variance-preserving init (N(0, 1/fan_in), zero bias; what encodec.py found an
  untrained encoder needs so k-means sees latents that move), and the last conv of each residual branch starts
  at a quarter of that, so 12 residual units do not blow the signal up.
- FiLM sits once, on the embedding (after the encoder, or before the decoder), with a flag c ∈ {0, 1}:
  (1 + γ c) ⊙ z + β c, so "denoise off" is exactly the plain codec. Noise is synthetic coloured Gaussian noise
  at 0-20 dB SNR added to the built-in speech and music (the paper: Freesound noise on LibriTTS speech).
- The CPU `small` preset narrows everything (C = 8, D = 64, discriminator widths / 8), trains on batches of
  6 x 0.4 s for 2400 steps at lr 1e-3: the first 120 as a plain autoencoder (cfg.quantizer_warmup), the first
  2000 on reconstruction alone (cfg.disc_warmup), with a waveform L1 (cfg.lambda_time, EnCodec's ℓ_t) added,
  then 400 with the discriminators. All ours, 0 in the paper preset: a step without D costs half as much, and in
  15 CPU minutes the codec must first learn to reconstruct at all (with 240 such steps it stayed below 0 dB).
- Reconstruction is averaged over frames (the paper sums), so its weight means the same for any crop; λ_rec =
  0.04 is ours, set from gradient norms on x̂ at init (small preset): rec 0.54 : time 0.17 : feat 0.13 : adv
  0.005.
- RVQ (ours where the paper is silent): k-means initialises one level per step, level i on the residual of
  step warmup + i + 1 (the official Mimi code); a layer's dead-code threshold scales with the share of
  examples that quantizer dropout lets reach it, and a re-seeded code keeps cfg.dead_code_grace steps before
  it can be re-drawn.
- Feature matching is the mean absolute difference over every layer of every discriminator (the paper's
  1/(K L) Σ with each map's elements averaged).
- Real-time streaming is exact but not optimised (no fused kernels, no int8); no entropy coding.
- A training step never reads the device (a GPU does not stall): the k-means flag and the warm-up step count
  have host-side copies read once per run, the dead-code reset is a masked update, and the codec and the
  discriminators each compile as one graph (tests/test_soundstream.py checks both on the CPU).

    python soundstream.py                                          # train on the built-in speech+music corpus
    python soundstream.py --preset=paper --batch_size=32           # the paper's model (one GPU)
    python soundstream.py --init_from=resume                       # continue out/soundstream/ckpt.pt
    python soundstream.py --mode=sample --init_from=out/soundstream/ckpt.pt   # 3/6/12/18 kbps + denoising
    python soundstream.py --mode=eval --init_from=out/soundstream/ckpt.pt     # SI-SNR / mel distance per bitrate
    python soundstream.py --quantizer_dropout=False --n_q=8        # a single-bitrate (6 kbps) model, to compare
    python soundstream.py --mode=bench
    torchrun --standalone --nproc_per_node=8 soundstream.py --preset=paper
"""
import math
import os
from dataclasses import dataclass

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
    strides: tuple = (2, 4, 5, 8)      # encoder block strides -> hop 320 -> 75 Hz at 24 kHz (decoder: reversed)
    dilations: tuple = (1, 3, 9)       # the three residual units of every block
    # residual vector quantizer (§III-C, Alg. 1)
    n_q: int = 24                      # N_q codebooks: 24 x 10 bits x 75 Hz = 18 kbps
    codebook_size: int = 1024          # entries per codebook (10 bits)
    bitrates: tuple = (3.0, 6.0, 12.0, 18.0)  # kbps at which evaluate() and sample() run (n_q = 4, 8, 16, 24)
    quantizer_dropout: bool = True     # §III-C: n_q ~ U{1..N_q} per example; False = always N_q (single bitrate)
    ema_decay: float = 0.99            # EMA decay of the codebook statistics (VQ-VAE-2 updates)
    kmeans_iters: int = 50             # k-means iterations on the first batch (codebook init)
    dead_code_threshold: float = 2.0   # a code whose EMA usage falls below this is re-seeded from the batch
                                       # (for a layer every example uses; scaled by the share that uses it)
    dead_code_grace: int = 50          # steps a re-seeded code lives unused before it can be re-drawn (ours)
    quantizer_warmup: int = 0          # first steps with the RVQ bypassed, k-means after (laptop-scale aid, not in the paper)
    # joint compression and enhancement (§III-F)
    film: str = "encoder"              # where FiLM applies the denoise flag: encoder | decoder | none
    noise_prob: float = 0.5            # fraction of training examples with background noise added
    denoise_prob: float = 0.5          # fraction of training examples with the denoise flag on (target = clean)
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
    # At init (small preset, 3 batches) the gradient norms on x̂ of λ·term are rec 13.4 : feat 0.132 :
    # adv 0.005 at λ_rec = 1: the paper's weights (1, 100, 1) would leave feature matching 1 % of the push.
    # λ_rec = 0.04 gives rec ≈ 4x feat ≈ 100x adv; λ_time = 100 (small) gives time ≈ 1.3x feat
    # (tests/test_soundstream.py::test_loss_balance_at_init pins these bands).
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
    listen_items: int = 16             # --mode=eval: whole test speech clips written at the lowest and
                                       # highest bitrate and as originals, three folders an ASR judges
    bench_seconds: float = 10.0        # audio length for the encode/decode real-time factors
    device: str = "auto"
    dtype: str = "auto"                # bf16 autocast on CUDA, fp32 elsewhere (quantizer, STFTs, losses stay fp32)
    compile: bool = True
    seed: int = 1337

    def validate(self):
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
        if self.segment < max(hop, self.stft_window, 2 ** max(self.mel_scales)):
            bad(f"--segment={self.segment} is shorter than the hop, --stft_window or the largest mel window "
                f"({max(hop, self.stft_window, 2 ** max(self.mel_scales))} samples)")
        if self.stft_window // 2 % 64:
            bad(f"--stft_window={self.stft_window}: its {self.stft_window // 2} bins must halve 6 times (a multiple of 128)")


PRESETS = {
    "paper": dict(),                                       # §IV: C = 32, N_q = 24 (3-18 kbps), 24 kHz
    "small": dict(n_filters=8, dimension=64, wave_channels=2, stft_channels=4, segment=9600, batch_size=6,
                  log_interval=20, eval_items=4, bench_seconds=4.0,
                  kmeans_iters=20, corpus_hours=1.0,
                  # 2400 steps instead of 200k: a higher lr, and 120 steps as a plain autoencoder so that
                  # k-means clusters latents that already describe the audio (encodec.py)
                  lr=1e-3, quantizer_warmup=120,
                  # ours: 2000 steps on reconstruction alone (half the cost, no D to fool yet), then 400
                  # adversarial; a waveform L1 whose gradient on x̂ at init matches feature matching's, for
                  # SI-SNR
                  disc_warmup=2000, max_iters=2400, eval_interval=800, lambda_time=100.0,
                  # the threshold 2 suits 32 x 1 s batches (2400 frames, 2.3 per code); 6 x 0.4 s gives 180
                  # frames (0.18 per code): scale it by the frames per batch
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
    # Variance-preserving init (not in the paper): N(0, gain^2/fan_in) weights and zero bias keep the signal's
    # scale through the stack, so an untrained encoder's latents follow the audio and k-means finds many codes
    # (PyTorch's default shrinks the signal ~2x per conv and adds a constant from the biases).
    stride = conv.stride[0] if isinstance(conv, nn.ConvTranspose1d) else 1
    fan_in = conv.in_channels // conv.groups * conv.kernel_size[0] / stride
    nn.init.normal_(conv.weight, 0.0, gain * fan_in ** -0.5)
    nn.init.zeros_(conv.bias)
    return conv


class CausalConv1d(nn.Module):
    """Conv1d padded with k_eff - stride zeros on the LEFT (§III-A: every convolution is causal), so output
    frame t sees samples < (t+1)*stride only. stream() keeps those samples as an explicit history buffer."""

    def __init__(self, cin, cout, kernel, stride=1, dilation=1, gain=1.0):
        super().__init__()
        self.conv = _init(nn.Conv1d(cin, cout, kernel, stride, dilation=dilation), gain)
        self.stride, self.cin, self.cout = stride, cin, cout
        self.k_eff = (kernel - 1) * dilation + 1
        self.pad = self.k_eff - stride

    def forward(self, x):  # (B, Cin, T) -> (B, Cout, ceil(T/stride))
        extra = -x.shape[-1] % self.stride  # complete the last window so the decoder can rebuild T samples
        return self.conv(F.pad(x, (self.pad, extra)) if self.pad or extra else x)  # (F.pad copies even 0 + 0)

    def stream(self, x, state):
        # zero padding makes streaming simple: the history starts as the same `pad` zeros the offline pass uses
        buf = state.get(self)
        x = torch.cat([x.new_zeros(x.shape[0], self.cin, self.pad) if buf is None else buf, x], -1)
        n = (x.shape[-1] - self.pad) // self.stride  # complete windows
        state[self] = x[..., n * self.stride:]
        if n == 0:
            return x.new_zeros(x.shape[0], self.cout, 0)
        return self.conv(x[..., :(n - 1) * self.stride + self.k_eff])


class CausalConvTranspose1d(nn.Module):
    """Transposed conv (kernel 2S, stride S) whose k - S overhanging samples are trimmed on the RIGHT (causal)."""

    def __init__(self, cin, cout, kernel, stride):
        super().__init__()
        self.conv = _init(nn.ConvTranspose1d(cin, cout, kernel, stride))
        self.stride, self.cout, self.trim = stride, cout, kernel - stride

    def forward(self, x):  # (B, Cin, T) -> (B, Cout, T*stride)
        y = self.conv(x)  # (B, Cout, (T-1)*S + k)
        return y[..., :y.shape[-1] - self.trim]

    def stream(self, x, state):
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
        self.conv2 = CausalConv1d(dim, dim, 1, gain=0.25)  # (a small branch at init: see _init)

    def forward(self, x):
        return x + self.conv2(F.elu(self.conv1(x)))

    def stream(self, x, state):
        # stride 1 and zero history: a chunk in gives a chunk of the same length out, so the skip lines up
        return x + self.conv2.stream(F.elu(self.conv1.stream(x, state)), state)


class EncoderBlock(nn.Module):
    """§III-A: three residual units (dilations 1, 3, 9), then a strided conv (kernel 2S, stride S) doubling the channels."""

    def __init__(self, dim, stride, cfg):
        super().__init__()
        self.res = nn.ModuleList(ResidualUnit(dim, d) for d in cfg.dilations)
        self.down = CausalConv1d(dim, 2 * dim, 2 * stride, stride)

    def forward(self, x):
        for r in self.res:
            x = F.elu(r(x))
        return F.elu(self.down(x))

    def stream(self, x, state):
        for r in self.res:
            x = F.elu(r.stream(x, state))
        return F.elu(self.down.stream(x, state))


class DecoderBlock(nn.Module):
    """The mirror: a transposed conv (kernel 2S, stride S) halving the channels, then three residual units."""

    def __init__(self, dim, stride, cfg):
        super().__init__()
        self.up = CausalConvTranspose1d(dim, dim // 2, 2 * stride, stride)
        self.res = nn.ModuleList(ResidualUnit(dim // 2, d) for d in cfg.dilations)

    def forward(self, x):
        x = F.elu(self.up(x))
        for r in self.res:
            x = F.elu(r(x))
        return x

    def stream(self, x, state):
        x = F.elu(self.up.stream(x, state))
        for r in self.res:
            x = F.elu(r.stream(x, state))
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

    def forward(self, x):
        x = self.conv_in(x)
        for b in self.blocks:
            x = b(x)
        return self.conv_out(x)

    def stream(self, x, state):
        x = self.conv_in.stream(x, state)
        for b in self.blocks:
            x = b.stream(x, state)
        return self.conv_out.stream(x, state)


class Decoder(nn.Module):
    """The mirror image (§III-B): conv k7 (D -> 16C) -> 4 blocks (strides 8, 5, 4, 2; 16C -> C) -> conv k7 -> 1."""

    def __init__(self, cfg):
        super().__init__()
        C, n = cfg.n_filters, len(cfg.strides)
        self.conv_in = CausalConv1d(cfg.dimension, C * 2 ** n, 7)
        self.blocks = nn.ModuleList(DecoderBlock(C * 2 ** (n - i), s, cfg) for i, s in enumerate(reversed(cfg.strides)))
        self.conv_out = CausalConv1d(C, 1, 7)

    def forward(self, z):
        x = F.elu(self.conv_in(z))
        for b in self.blocks:
            x = b(x)
        return self.conv_out(x)

    def stream(self, z, state):
        x = F.elu(self.conv_in.stream(z, state))
        for b in self.blocks:
            x = b.stream(x, state)
        return self.conv_out.stream(x, state)


class FiLM(nn.Module):
    """§III-F: feature-wise linear modulation of the embedding by the denoise flag c ∈ {0, 1} (B,):
    (1 + γ c) ⊙ z + β c per channel. c = 0 is exactly the identity: the plain codec."""

    def __init__(self, dim):
        super().__init__()
        self.gamma, self.beta = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))

    def forward(self, z, cond):  # z (B, D, T), cond (B,)
        c = cond.to(z.dtype)[:, None, None]  # (B, 1, 1)
        return z * (1 + self.gamma[None, :, None] * c) + self.beta[None, :, None] * c


def _sample_rows(x, n):
    # n random rows of x (without replacement when there are enough)
    idx = torch.randperm(x.shape[0], device=x.device)[:n] if x.shape[0] >= n else \
        torch.randint(0, x.shape[0], (n,), device=x.device)
    return x[idx]


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
    """One VQ layer (§III-C): nearest-neighbour lookup in `embed`, learned by exponential moving averages as in
    VQ-VAE-2 (no gradients), k-means initialised, dead codes re-seeded from the batch."""

    def __init__(self, cfg, share=1.0):
        super().__init__()
        K, D = cfg.codebook_size, cfg.dimension
        self.decay, self.kmeans_iters, self.eps = cfg.ema_decay, cfg.kmeans_iters, 1e-5
        # share: the expected fraction of the batch that reaches this layer under quantizer dropout. Usage
        # counts only those rows, so the threshold (set for a layer all rows reach) scales with it (ours; the
        # paper leaves dropout and dead codes unrelated). A re-seeded code's usage restarts at threshold /
        # decay^grace: unused, it decays to the threshold in exactly `grace` steps and is re-drawn on the step
        # after.
        self.threshold = cfg.dead_code_threshold * share
        self.reset = self.threshold * cfg.ema_decay ** -(cfg.dead_code_grace + 0.5)  # +0.5: rounding margin
        self.register_buffer("inited", torch.zeros(1))      # 0 until k-means has run on a training batch
        self.register_buffer("cluster_size", torch.zeros(K))  # EMA of how often each code is picked
        self.register_buffer("embed", torch.zeros(K, D))     # the codewords
        self.register_buffer("embed_avg", torch.zeros(K, D))  # EMA of the sum of vectors assigned to each code
        self._inited = False  # host-side copy of `inited`: a training step never reads the device (no sync)
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
        self._sync()

    def _is_inited(self):
        # the buffer is read once per process (the first training step, or after a load), then the Python flag:
        # the steady-state step has no host sync and no graph break under torch.compile
        if not self._inited:
            self._inited = bool(self.inited.item())
        return self._inited

    @torch.no_grad()
    def _ema_update(self, x, codes, active):
        K = self.embed.shape[0]
        onehot = F.one_hot(codes, K).type(x.dtype) * active[:, None].to(x.dtype)  # (N, K): only rows that use this layer
        counts, sums = onehot.sum(0), onehot.t() @ x  # (K,), (K, D)
        if dist.is_available() and dist.is_initialized():  # statistics of the global batch
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + K * self.eps) * n  # Laplace smoothing: no division by 0
        self.embed.copy_(self.embed_avg / smoothed[:, None])
        # §III-C: a code unused for several batches is replaced by a random input vector of the current batch,
        # its usage restarting at self.reset (a grace of cfg.dead_code_grace steps, see __init__).
        # Masked updates (torch.where), not `if dead.any()`: the step never waits for the device to answer.
        dead = self.cluster_size < self.threshold  # (K,)
        new = _sample_rows(x, K)  # (K, D) candidates, drawn every step whether or not a code is dead
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(new, 0)  # rank 0's rows: the buffers stay identical on every rank
        reset = self.reset
        self.embed.copy_(torch.where(dead[:, None], new, self.embed))
        self.cluster_size.copy_(torch.where(dead, reset, self.cluster_size))
        self.embed_avg.copy_(torch.where(dead[:, None], new * reset, self.embed_avg))

    def _sync(self):
        if dist.is_available() and dist.is_initialized():  # rank 0's random choices win
            for b in (self.embed, self.embed_avg, self.cluster_size, self.inited):
                dist.broadcast(b, 0)


class ResidualVectorQuantizer(nn.Module):
    """Alg. 1: codebook i quantizes the residual codebooks 1..i-1 left. Quantizer dropout (§III-C): example b
    uses only its first n_q[b] codebooks, so the decoder learns to work from any prefix."""

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
        """Count one training step; False during the first cfg.quantizer_warmup steps (a plain autoencoder then).
        train_step calls it outside the (compiled) model: a Python bool that changes once, not a device read."""
        if self._steps is None:
            self._steps = int(self.steps)
        self._steps += 1
        self.steps += 1
        return self._steps > self.warmup

    def forward(self, z, n_q, quantize=True):  # z (B, D, T), n_q (B,) -> quantized (B, D, T), codes (B, N_q, T) (-1: unused)
        B, D, T = z.shape
        if not quantize:  # the quantizer warm-up (tick()): the encoder's output goes to the decoder as it is
            return z, None
        with torch.no_grad(), torch.autocast(z.device.type, enabled=False):  # codebook statistics stay fp32
            x = z.float().transpose(1, 2).reshape(B * T, D)  # (B*T, D)
            uses = n_q.to(z.device).repeat_interleave(T)  # (B*T,) codebooks each frame may use
            residual, out, codes, fresh = x, torch.zeros_like(x), [], False
            for i, layer in enumerate(self.layers):  # every layer runs: all ranks do the same collectives
                if self.training and not layer._is_inited():
                    # k-means one level per step (the official Mimi code, moshi/quantization/core_vq.py):
                    # level i starts on the residual of the step after level i-1 did. Levels past it wait (no
                    # codes): on one batch, a level k-means fits (N < K rows) leaves the next an all-zero
                    # residual.
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
    def encode(self, z, n_q):  # (B, D, T), int -> codes (B, n_q, T)
        B, D, T = z.shape
        residual, codes = z.float().transpose(1, 2).reshape(B * T, D), []  # (B*T, D)
        for layer in self.layers[:n_q]:
            c = _nearest(residual, layer.embed)
            residual = residual - F.embedding(c, layer.embed)
            codes.append(c)
        return torch.stack(codes, 1).view(B, T, n_q).transpose(1, 2)

    def decode(self, codes):  # (B, n_q, T) -> (B, D, T)
        out = sum(F.embedding(codes[:, i], layer.embed) for i, layer in enumerate(self.layers[:codes.shape[1]]))
        return out.transpose(1, 2)  # (B, T, D) -> (B, D, T)


class SoundStream(nn.Module):
    """Encoder -> (FiLM) -> RVQ -> (FiLM) -> decoder (§III, §III-F), with the bitrate arithmetic of §III-C."""

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

    def forward(self, x, n_q, cond=None, quantize=True):  # training: (B, 1, T), n_q (B,), cond (B,) -> (B, 1, T), codes
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
    def encode_stream(self, x, state, n_q, cond=None):  # a chunk of audio -> the codes of the frames it completes
        return self.quantizer.encode(self._film(self.encoder.stream(x, state), cond, "encoder"), n_q)

    @torch.no_grad()
    def decode_stream(self, codes, state, cond=None):  # a chunk of codes -> the audio it makes final
        return self.decoder.stream(self._film(self.quantizer.decode(codes), cond, "decoder"), state)


class WaveDiscriminator(nn.Module):
    """One scale of the multi-scale waveform discriminator (§III-D, MelGAN's layout): grouped strided convs."""

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
        layout = [(C, 2, (1, 2)), (2 * C, 2, (2, 2)), (4 * C, 1, (1, 2)), (4 * C, 2, (2, 2)), (8 * C, 1, (1, 2)),
                  (8 * C, 2, (2, 2))]
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
    """§III-D: the K = wave_scales + 1 discriminators: waveform at 1x, 2x, 4x downsampling, and the STFT one."""

    def __init__(self, cfg):
        super().__init__()
        self.waves = nn.ModuleList(WaveDiscriminator(cfg.wave_channels) for _ in range(cfg.wave_scales))
        self.stft = STFTDiscriminator(cfg)

    def forward(self, x):  # (B, 1, T) -> K logits, K lists of feature maps
        l, f = self.stft(x)
        logits, fmaps = [l], [f]
        for i, d in enumerate(self.waves):
            if i:
                x = F.avg_pool1d(x, 4, 2, padding=1, count_include_pad=False)  # halve the rate
            l, f = d(x)
            logits.append(l)
            fmaps.append(f)
        return logits, fmaps  # [STFT, wave x1, wave x2, ...]

# ----------------------------------------------------------------------------- loss

def discriminator_loss(logits_real, logits_fake):
    """§III-E hinge: 1/K Σ_k mean_t [relu(1 - D_k(x)) + relu(1 + D_k(G(x)))]."""
    return sum(F.relu(1 - r.float()).mean() + F.relu(1 + f.float()).mean()
               for r, f in zip(logits_real, logits_fake)) / len(logits_real)


def generator_adv_loss(logits_fake):
    """§III-E: 1/K Σ_k mean_t relu(1 - D_k(G(x)))."""
    return sum(F.relu(1 - l.float()).mean() for l in logits_fake) / len(logits_fake)


def feature_loss(fmap_real, fmap_fake):
    """§III-E: 1/(K L) Σ_{k,l} mean |D_k^l(x) - D_k^l(G(x))|, over every layer of every discriminator (absolute,
    not EnCodec's relative L1); the real features are targets (no gradient)."""
    terms = [(r.detach().float() - f.float()).abs().mean() for fr, ff in zip(fmap_real, fmap_fake) for r, f in zip(fr, ff)]
    return sum(terms) / len(terms)


def reconstruction_loss(x, x_hat, cfg):
    """§III-E: Σ_{s=2^6..2^11} mean_t ‖S_t^s(x) - S_t^s(x̂)‖_1 + α_s ‖log S_t^s(x) - log S_t^s(x̂)‖_2,
    α_s = sqrt(s/2), with S^s a 64-bin mel spectrogram of window s and hop s/4. Ours: averaged over frames
    (the paper sums over t), the L1 averaged over mel bins and the sum over scales averaged, so the term's
    size does not grow with the crop and λ_rec alone sets its share of the gradient (Config.lambda_rec)."""
    total = 0.0
    for i in cfg.mel_scales:
        s = 2 ** i
        kw = dict(sr=cfg.sample_rate, n_fft=s, hop=s // 4, n_mels=cfg.n_mels, log=None)
        a, b = common.mel_spectrogram(x, **kw)[:, 0], common.mel_spectrogram(x_hat, **kw)[:, 0]  # (B, n_mels, frames)
        l1 = (a - b).abs().mean((1, 2))  # (B,)
        dlog = a.clamp(min=1e-5).log() - b.clamp(min=1e-5).log()
        l2 = (dlog.pow(2).sum(1) + 1e-12).sqrt().mean(1)  # L2 norm over mel bins, mean over frames (B,)
        total = total + (l1 + math.sqrt(s / 2) * l2).mean()
    return total / len(cfg.mel_scales)

# ----------------------------------------------------------------------------- data

def colored_noise(n, length, beta):
    """(n, length) unit-variance Gaussian noise with a 1/f^beta power spectrum (beta (n,): 0 white, 1 pink, 2 brown)."""
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


def get_batch(sampler, cfg, rt):
    """(input, target, denoise flag, n_q) per example (§III-C, §III-F). With FiLM, half the inputs get noise and half
    the examples ask for denoising: target = clean when the flag is on, the input itself (noisy or not) when off.
    Every draw comes from torch's global RNG (checkpointed), so a resumed run draws what a straight one would."""
    B = cfg.batch_size
    clean = sampler.next()[0].view(B, 1, cfg.segment)  # (B, 1, T)
    # §III-C quantizer dropout: n_q uniform in {1, ..., N_q} (randint's high is exclusive) for every example
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


def audio_clips(cfg, split, kind="audio"):
    """Mono float32 clips (T,) at the model's rate: speech + music for training, one kind for evaluation."""
    return [u.wav for u in common.load_corpus(cfg, split, cfg.sample_rate, kind=kind)]

# ----------------------------------------------------------------------------- train

def build(cfg, rt):
    """The codec G, the discriminators D and their Adam optimizers: everything a checkpoint holds."""
    G, D = SoundStream(cfg).to(rt.device), Discriminators(cfg).to(rt.device)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=cfg.betas)
    common.log(f"params: encoder {common.count_params(G.encoder):,} | decoder {common.count_params(G.decoder):,} | "
               f"discriminators {common.count_params(D):,}")
    # §III-C: each codebook costs log2(1024) = 10 bits per frame, 75 frames a second
    common.log(f"bitrate: {G.frame_rate:g} Hz x {G.bits} bits x n_q = " +
               ", ".join(f"{G.kbps(G.n_q_for(b)):g} kbps at n_q={G.n_q_for(b)}" for b in cfg.bitrates) +
               f" (1..{cfg.n_q} codebooks: {G.kbps(1):g}..{G.kbps(cfg.n_q):g} kbps)")
    return dict(G=G, D=D, opt_g=opt_g, opt_d=opt_d)


def _clip(opt, cfg):
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)


def train_step(state, batch, cfg, rt):
    """One step of §III-E: the discriminators' hinge update on (target, G(input)), then the codec's update on
    λ_adv·adversarial + λ_feat·feature matching + λ_rec·reconstruction against the updated discriminators."""
    G, D, opt_g, opt_d = state["G"], state["D"], state["opt_g"], state["opt_d"]
    y, B = batch["target"], batch["target"].shape[0]
    quantize = common.unwrap(G).quantizer.tick()  # False during cfg.quantizer_warmup (a host-side count)
    with rt.autocast():
        y_hat, _ = G(batch["x"], batch["n_q"], batch["cond"], quantize)
    rec, time = reconstruction_loss(y, y_hat, cfg), (y - y_hat.float()).abs().mean()
    recon = cfg.lambda_rec * rec + cfg.lambda_time * time  # (time: ours, 0 in the paper preset)
    if common.unwrap(G).quantizer._steps <= cfg.disc_warmup:  # reconstruction alone (ours): no D, half the cost
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
        logits, fmaps = common.unwrap(D)(torch.cat([y, y_hat]))  # no gradient sync through D needed here
    adv = generator_adv_loss([l[B:] for l in logits])
    feat = feature_loss([[f[:B] for f in fm] for fm in fmaps], [[f[B:] for f in fm] for fm in fmaps])
    loss_g = cfg.lambda_adv * adv + cfg.lambda_feat * feat + recon
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    _clip(opt_g, cfg)
    opt_g.step()
    return dict(d=loss_d, g=loss_g, adv=adv, feat=feat, rec=rec, time=time, n_q=batch["n_q"].float().mean())


def load_for_inference(cfg, rt):
    """The codec from --init_from: one of our checkpoints (its config already applied by parse_config).
    SoundStream has no official PyTorch weights (Google ships TFLite files inside Lyra), so there is no key map."""
    ckpt = common.load_checkpoint(common.checkpoint_path(cfg))
    if not common.is_ours(ckpt):
        raise SystemExit(f"error: {cfg.init_from} is not a nanoaudio checkpoint (SoundStream has no official "
                         "PyTorch weights to load; train one with python soundstream.py)")
    G = SoundStream(cfg)
    common.load_models(ckpt, cfg, {"G": G}, ARCH_KEYS)
    return G.to(rt.device).eval()


def _noisy(clean, cfg, seed):
    # the same noise for every evaluation: its own generator, pink noise at cfg.eval_snr
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return add_noise(clean, torch.full((clean.shape[0],), cfg.eval_snr), torch.ones(clean.shape[0]))


@torch.no_grad()
def evaluate(cfg, model=None, rt=None, samples_dir=None, split="test"):
    """SI-SNR (dB) and mel distance at every bitrate on held-out speech (an unseen voice) and music, all from one
    model; with FiLM, noisy speech (cfg.eval_snr dB) decoded with the denoise flag off and on, SI-SNR vs clean."""
    if model is None:
        rt = common.setup(cfg)
        model = load_for_inference(cfg, rt)
    was_training, dev = model.training, next(model.parameters()).device
    model.eval()
    n, sr, res = int(cfg.eval_seconds * cfg.sample_rate), cfg.sample_rate, {}
    kinds = ("speech", "music") if not cfg.data_dir else ("audio",)
    clips = {k: [torch.from_numpy(np.ascontiguousarray(c[:n])) for c in audio_clips(cfg, split, k)[:cfg.eval_items]]
             for k in kinds}
    for kind in kinds:
        for kbps in cfg.bitrates:
            snr, mel = [], []
            for i, c in enumerate(clips[kind]):
                x = c[None, None].to(dev)  # (1, 1, T)
                y = model.decode(model.encode(x, model.n_q_for(kbps)))[..., :x.shape[-1]].cpu()
                snr.append(common.si_snr(y, c))
                mel.append(common.mel_distance(y[0, 0], c, sr))
                if samples_dir and i == 0 and kbps == cfg.bitrates[-1]:  # (--mode=sample writes every bitrate)
                    common.save_sample(samples_dir, f"{kind}_{kbps:g}kbps", y[0, 0], sr, ref=c)
            res[f"{kind}_{kbps:g}kbps_si_snr"], res[f"{kind}_{kbps:g}kbps_mel"] = float(np.mean(snr)), float(np.mean(mel))
    if cfg.film != "none":  # §III-F: one codec, denoising switched by the flag
        for kbps in cfg.bitrates:
            snr, mel = {0: [], 1: []}, {0: [], 1: []}
            for i, c in enumerate(clips[kinds[0]]):
                x = _noisy(c[None, None], cfg, seed=i).to(dev)
                for flag in (0, 1):
                    cond = torch.full((1,), float(flag), device=dev)
                    y = model.decode(model.encode(x, model.n_q_for(kbps), cond), cond)[..., :x.shape[-1]].cpu()
                    snr[flag].append(common.si_snr(y, c))  # against the CLEAN reference
                    mel[flag].append(common.mel_distance(y[0, 0], c, sr))
                    if samples_dir and i == 0 and kbps == cfg.bitrates[-1] and flag:
                        common.save_sample(samples_dir, f"noisy_{kbps:g}kbps_denoised", y[0, 0], sr, ref=c)
            for flag, name in ((0, "off"), (1, "on")):
                res[f"noisy_{kbps:g}kbps_{name}_si_snr"] = float(np.mean(snr[flag]))
                res[f"noisy_{kbps:g}kbps_{name}_mel"] = float(np.mean(mel[flag]))
        noisy = [_noisy(c[None, None], cfg, i)[0, 0] for i, c in enumerate(clips[kinds[0]])]  # the input itself
        res["noisy_input_si_snr"] = float(np.mean([common.si_snr(n_, c) for n_, c in zip(noisy, clips[kinds[0]])]))
        res["noisy_input_mel"] = float(np.mean([common.mel_distance(n_, c, sr) for n_, c in zip(noisy, clips[kinds[0]])]))
    # does the decoder use the latent? decoding an all-zero latent (no codes) gives a baseline mel distance
    c = clips[kinds[0]][0][None, None].to(dev)
    y0 = model.decoder(torch.zeros_like(model.encoder(c)))[..., :c.shape[-1]].cpu()
    res["zero_latent_mel"] = common.mel_distance(y0[0, 0], c[0, 0].cpu(), sr)
    common.log(f"eval ({split}) | " + " | ".join(f"{k} {v:.3f}" for k, v in res.items()))
    if cfg.mode == "eval" and not cfg.data_dir and cfg.listen_items:
        listening_sets(cfg, model, dev)
    model.train(was_training)
    return res


@torch.no_grad()
def listening_sets(cfg, model, dev):
    """Whole test speech clips resynthesised at the lowest and highest bitrate, and the originals: three
    folders of wavs + refs.txt for `whisper.py --mode=sample --input_dir=DIR` (common.write_listening_set)."""
    utts = common.load_corpus(cfg, "test", cfg.sample_rate, kind="speech")[:cfg.listen_items]
    out = os.path.join(cfg.out_dir, "listen")
    lo, hi = min(cfg.bitrates), max(cfg.bitrates)
    sets = {f"resynth_{lo:g}kbps": [], f"resynth_{hi:g}kbps": [], "orig": []}
    for u in utts:
        c = torch.from_numpy(np.ascontiguousarray(u.wav, dtype=np.float32))
        x = c[None, None].to(dev)
        for kbps in (lo, hi):
            y = model.decode(model.encode(x, model.n_q_for(kbps)))[0, 0, :x.shape[-1]].cpu()
            sets[f"resynth_{kbps:g}kbps"].append((u.id, y, u.text))
        sets["orig"].append((u.id, c, u.text))
    for name, items in sets.items():
        common.write_listening_set(os.path.join(out, name), items, cfg.sample_rate)
    common.save_sample(out, f"{utts[0].id}_{hi:g}kbps", sets[f"resynth_{hi:g}kbps"][0][1], cfg.sample_rate,
                       ref=sets["orig"][0][1])
    common.log(f"{len(utts)} test clips -> {out}/{{{','.join(sets)}}} (judge each: whisper.py --mode=sample "
               "--input_dir=DIR)")


def train(cfg):
    rt = common.setup(cfg)
    state = build(cfg, rt)
    train_clips, val_clips = audio_clips(cfg, "train"), audio_clips(cfg, "val")
    common.check_clips(train_clips, cfg.segment, "train split")
    common.check_clips(val_clips, math.prod(cfg.strides), "val split")
    sampler = common.SegmentSampler(train_clips, cfg.segment, cfg.batch_size, cfg.seed, rt.rank, rt.world_size)
    # scratch: step 0 | resume: out_dir/ckpt.pt continues exactly | PATH: our weights, fresh optimizers, step 0
    step = common.init_from(cfg, state, sampler=sampler, arch_keys=ARCH_KEYS, official=None)
    state["G"] = common.wrap_ddp(common.compile(state["G"], cfg), rt)
    state["D"] = common.wrap_ddp(common.compile(state["D"], cfg), rt)
    prog = common.Progress(cfg, start_step=step)
    while step < cfg.max_iters:
        losses = train_step(state, get_batch(sampler, cfg, rt), cfg, rt)
        step += 1
        prog.update(step, losses, audio_seconds=cfg.batch_size * rt.world_size * cfg.segment / cfg.sample_rate)
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            if rt.master:
                evaluate(cfg, common.unwrap(state["G"]), rt,
                         samples_dir=os.path.join(cfg.out_dir, "samples", f"step{step:06d}"), split="val")
            common.save_checkpoint(cfg, step, state, sampler=sampler)
    common.cleanup(rt)

# ----------------------------------------------------------------------------- sample

@torch.no_grad()
def sample(cfg):
    """Encode held-out speech and music (or --input) at every bitrate, decode, write wav + png pairs; with FiLM,
    also noisy speech decoded with the denoise flag off and on."""
    rt = common.setup(cfg)
    model = load_for_inference(cfg, rt)
    n = int(cfg.eval_seconds * cfg.sample_rate)
    if cfg.input:
        wav, _ = common.load_audio(cfg.input, sr=cfg.sample_rate, mono=True)
        items = [(os.path.splitext(os.path.basename(cfg.input))[0], wav)]
    else:
        kinds = ("speech", "music") if not cfg.data_dir else ("audio",)
        items = [(k, audio_clips(cfg, "test", k)[0][:n]) for k in kinds]
    out = os.path.join(cfg.out_dir, "samples")
    for name, wav in items:
        c = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
        x = c[None, None].to(rt.device)  # (1, 1, T)
        for kbps in cfg.bitrates:
            y = model.decode(model.encode(x, model.n_q_for(kbps)))[0, 0, :x.shape[-1]].cpu()
            common.save_sample(out, f"{name}_{kbps:g}kbps", y, cfg.sample_rate, ref=c)
            common.log(f"{name} @ {kbps:g} kbps ({model.n_q_for(kbps)} codebooks): SI-SNR {common.si_snr(y, c):.2f} dB "
                       f"-> {out}/{name}_{kbps:g}kbps.wav")
        if cfg.film != "none" and name == items[0][0]:  # §III-F on the first item (speech): denoise off / on
            noisy = _noisy(c[None, None], cfg, seed=0)
            common.save_sample(out, f"{name}_noisy", noisy[0, 0], cfg.sample_rate, ref=c)
            for flag in (0, 1):
                cond = torch.full((1,), float(flag), device=rt.device)
                kbps = cfg.bitrates[-1]
                y = model.decode(model.encode(noisy.to(rt.device), model.n_q_for(kbps), cond), cond)[0, 0, :x.shape[-1]].cpu()
                common.save_sample(out, f"{name}_noisy_{kbps:g}kbps_denoise{flag}", y, cfg.sample_rate, ref=c)
                common.log(f"{name} + noise ({cfg.eval_snr:g} dB) @ {kbps:g} kbps, denoise {'on' if flag else 'off'}: "
                           f"SI-SNR vs clean {common.si_snr(y, c):.2f} dB")

# ----------------------------------------------------------------------------- bench

def bench(cfg):
    """Training throughput (audio-s/s) and FLOP rate of train_step; encode / decode real-time factors at batch 1,
    eager vs compiled; and frame-by-frame streaming (320 samples in, 320 out) at batch 1."""
    rt = common.setup(cfg)
    state = build(cfg, rt)
    G = state["G"]
    G.quantizer.warmup = 0  # time the step training spends most of its time in: with the quantizer
    gen, dsc = common.compile(G, cfg), common.compile(state["D"], cfg)
    compiled = gen is not G
    B, x = cfg.batch_size, torch.randn(cfg.batch_size, 1, cfg.segment, device=rt.device) * 0.1
    batch = dict(x=x, target=x, cond=torch.zeros(B, device=rt.device), n_q=torch.full((B,), cfg.n_q, device=rt.device))
    run = dict(state, G=gen, D=dsc)
    step = lambda: train_step(run, batch, cfg, rt)
    iters = 3 if rt.device_type == "cpu" else 10
    step_ms = common.timeit(step, iters=iters, warmup=2)
    flops = common.count_flops(step)
    G.eval()
    figures = dict(train_step_ms=round(step_ms, 2), train_flops_per_step=flops,
                   train_audio_s_per_s=round(B * cfg.segment / cfg.sample_rate / (step_ms / 1000), 2))
    T = int(cfg.bench_seconds * cfg.sample_rate) // G.hop * G.hop
    xb = torch.randn(1, 1, T, device=rt.device) * 0.1
    codes = G.encode(xb, cfg.n_q)
    variants = [("eager", G.encode, G.decode)]
    if compiled:
        variants.append(("compiled", torch.compile(G.encode), torch.compile(G.decode)))
    for name, enc, dec in variants:
        with rt.autocast():
            e_ms = common.timeit(lambda: enc(xb, cfg.n_q), iters=iters, warmup=2)
            d_ms = common.timeit(lambda: dec(codes), iters=iters, warmup=2)
        # real-time factor = compute time / duration of the audio (lower is faster; < 1 is real time)
        figures[f"encode_rtf_b1_{name}"] = round(e_ms / 1000 / cfg.bench_seconds, 5)
        figures[f"decode_rtf_b1_{name}"] = round(d_ms / 1000 / cfg.bench_seconds, 5)

    def streaming():  # one 13.3 ms frame at a time through encoder and decoder, as a phone call would
        enc_state, dec_state = {}, {}
        for t in range(0, T, G.hop):
            G.decode_stream(G.encode_stream(xb[..., t:t + G.hop], enc_state, cfg.n_q), dec_state)
    figures["stream_rtf_b1_eager"] = round(common.timeit(streaming, iters=1, warmup=1) / 1000 / cfg.bench_seconds, 5)
    common.report_bench(cfg, rt, model=G, compiled=compiled, **figures)

# ----------------------------------------------------------------------------- main

if __name__ == "__main__":
    cfg = common.parse_config(Config, PRESETS)
    {"train": train, "sample": sample, "eval": evaluate, "bench": bench}[cfg.mode](cfg)
