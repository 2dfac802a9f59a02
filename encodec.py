"""
EnCodec: High Fidelity Neural Audio Compression (Défossez, Copet, Synnaeve, Adi, 2022)
https://arxiv.org/abs/2210.13438

The idea: one streaming neural codec for speech and music, 1.5 to 24 kbps. A causal convolutional encoder
(SEANet, strides 2·4·5·8, an LSTM at the bottleneck, §3.1) turns 24 kHz audio into 75 latent frames a
second; a residual vector quantizer (RVQ) of up to 32 codebooks of 1024 entries codes each frame, and a
bandwidth drawn per batch trains one model for every bitrate (§3.2); a mirror decoder rebuilds the audio.
Training mixes time and multi-scale mel reconstruction, a multi-scale STFT discriminator on complex
spectrograms (hinge + relative feature matching) and a commitment loss. The loss balancer (§3.4) rescales
each loss's gradient on the decoder output, so a weight is the share of the gradient that loss gets,
whatever its scale. Causal convolutions let the codec stream: chunk by chunk gives the offline result.
A small transformer (§3.3) predicts each frame's codes from the frames before it, and arithmetic coding
with its probabilities shrinks the bitstream further. Two stages, one state each: the codec (G, D, the
balancer, both Adams, the step draws; out_dir/ckpt.pt), then on its codes the entropy-coding LM
(--mode=lm: the LM and its Adam; out_dir/lm.pt).

Simplified or changed here:
- The LM's rate is its cross-entropy (an arithmetic coder gets within bytes of it); no coder is written.
- Dead codes: a re-seeded row's EMA statistics are reset with it, and it gets a grace period (the official
  code's new row is overwritten by the EMA in the same step). After k-means, embed_avg is centroid x count.
- Commitment: the residual uses detached quantized vectors (encodec#25), so every level's term counts.
- ℓ_f in audiocraft's msspec form: L1 of linear 64-bin HTK mels + α·MSE of their log10, scales 2^5..2^11.
- No weight EMA; k-means broadcast from rank 0; --mode=lm in one process; variance-preserving conv init.
- The CPU `small` preset: C=16, D=64, 8 codebooks, 3 D scales, 2000 steps at lr 1e-3, the first 200
  without the RVQ (quantizer_warmup), the first 1500 without D (disc_warmup); ours, 0 in the paper's presets.
- 1229 lines, not 750: the loss balancer, the entropy-coding LM and two official-weight maps are EnCodec's.

    python encodec.py                                       # train on the built-in speech+music corpus
    python encodec.py --init_from=resume                    # continue out/encodec/ckpt.pt
    python encodec.py --mode=sample --init_from=out/encodec/ckpt.pt   # or the official encodec_24khz-*.th
    python encodec.py --mode=eval --init_from=out/encodec/ckpt.pt     # SI-SNR, mel distance, kbps
    python encodec.py --mode=lm --init_from=out/encodec/ckpt.pt       # the entropy-coding LM's kbps saved
    python encodec.py --mode=bench
    torchrun --standalone --nproc_per_node=8 encodec.py --preset=24khz
"""
import dataclasses
import math
import os
import random
import re
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
    mode: str = "train"                # train | sample | eval | bench | lm (the entropy-coding LM, §3.3)
    preset: str = "24khz"              # a key of PRESETS
    init_from: str = "scratch"         # scratch | resume | path (ours or the official encodec_*khz .th)
    out_dir: str = "out/encodec"
    data_dir: str = ""                 # empty: the built-in corpus (speech + music)
    corpus_hours: float = 2.0          # size of the built-in corpus
    input: str = ""                    # --mode=sample: a wav to encode/decode instead of held-out clips
    # SEANet encoder/decoder (§3.1, official seanet.py defaults)
    sample_rate: int = 24000           # §4: 24 kHz mono model
    channels: int = 1                  # audio channels (2 for the 48 kHz stereo model)
    n_filters: int = 32                # base width C; doubles at every downsampling
    dimension: int = 128               # latent dimension D
    ratios: tuple = (8, 5, 4, 2)       # decoder upsampling ratios; the encoder's reversed (2,4,5,8): hop 320
    n_residual_layers: int = 1         # residual units per block (SoundStream used 3)
    dilation_base: int = 2             # dilation of residual unit j is base**j
    lstm_layers: int = 2               # 2-layer LSTM with skip at the bottleneck (§3.1)
    causal: bool = True                # causal (streamable) convolutions: the 24 kHz model
    norm: str = "weight_norm"          # weight_norm (24 kHz) | time_group_norm (48 kHz)
    pad_mode: str = "reflect"          # padding of the streamable convolutions (official: reflect)
    # residual vector quantizer (§3.2)
    n_q: int = 32                      # codebooks; 32 x 10 bits x 75 Hz = 24 kbps
    codebook_size: int = 1024          # entries per codebook (10 bits)
    bandwidths: tuple = (1.5, 3.0, 6.0, 12.0, 24.0)  # kbps targets; one is drawn per training batch
    ema_decay: float = 0.99            # EMA decay of the codebook statistics
    kmeans_iters: int = 50             # k-means iterations on the first batch
    dead_code_threshold: float = 2.0   # codes whose EMA usage falls below this are re-seeded from the batch
    dead_code_grace: int = 50          # steps a re-seeded code lives unused before it can be re-drawn (ours)
    quantizer_warmup: int = 0          # first steps with the RVQ bypassed, k-means after (ours)
    # 48 kHz model: per-chunk loudness normalisation and overlapping chunks at inference (§4)
    normalize: bool = False            # divide each chunk by its RMS, send the scale along
    chunk: float = 0.0                 # seconds per inference chunk (0: the whole file at once)
    overlap: float = 0.01              # fraction of overlap between chunks
    # discriminator (§3.4, MS-STFTD)
    disc_filters: int = 32             # channels of every MS-STFTD conv
    disc_n_ffts: tuple = (2048, 1024, 512, 256, 128)  # 5 STFT scales, hop = n_fft / 4
    disc_slope: float = 0.2            # LeakyReLU slope
    disc_prob: float = 2 / 3           # chance of a D update per step (24 kHz: 2/3, 48 kHz: 0.5)
    disc_warmup: int = 0               # first steps on reconstruction alone, no discriminator (ours, CPU)
    # losses and the balancer (§3.4)
    lambda_t: float = 0.1              # time-domain L1
    lambda_f: float = 1.0              # multi-scale mel: L1 (linear) + alpha * MSE (log10)
    lambda_g: float = 3.0              # adversarial (hinge)
    lambda_feat: float = 3.0           # relative feature matching
    lambda_w: float = 1.0              # commitment (outside the balancer)
    mel_scales: tuple = (5, 6, 7, 8, 9, 10, 11)  # windows 2^i, hop 2^i/4
    n_mels: int = 64                   # mel bins of the frequency loss
    mel_alpha: float = 1.0             # weight of the log10-mel MSE term of ℓ_f (the paper's α_i = 1)
    balancer: bool = True              # rescale gradients by their EMA norm; False = plain weighted sum
    balancer_decay: float = 0.999      # EMA decay of the gradient norms
    # entropy-coding language model over the codes (§3.3), trained by --mode=lm on a trained codec's codes
    lm_dim: int = 200                  # official LM: 5 post-norm layers, width 200, 8 heads, FFN 4x, GELU
    lm_layers: int = 5                 # transformer layers
    lm_heads: int = 8                  # attention heads
    lm_context: float = 3.5            # seconds of past frames a frame may attend to
    lm_init: str = ""                  # --mode=lm: start from our lm.pt or the official encodec_lm_24khz .th
    lm_iters: int = 20_000             # --mode=lm training steps (0: only evaluate --lm_init)
    lm_seconds: float = 5.0            # training windows of codes
    lm_batch_size: int = 32            # windows per step (the LM's training recipe is not in the paper)
    lm_lr: float = 5e-4                # Adam learning rate
    # training (§4)
    segment: int = 24000               # training crop in samples (§4: random 1 s crops)
    batch_size: int = 64
    lr: float = 3e-4                   # §4: Adam, both networks
    betas: tuple = (0.5, 0.9)          # §4
    max_iters: int = 600_000           # 300 epochs x 2000 updates at batch 64 on 8 GPUs (§4), per GPU
    log_interval: int = 50
    eval_interval: int = 2000          # evaluate and checkpoint
    eval_items: int = 8                # held-out clips per kind (speech, music) in evaluate()
    eval_seconds: float = 4.0          # crop held-out clips to this length
    listen_items: int = 16             # --mode=eval: test speech clips for the ASR listening sets
    bench_seconds: float = 10.0        # audio length for the encode/decode real-time factors
    bench_batches: tuple = (1, 16)     # batch sizes for the encode/decode real-time factors
    device: str = "auto"
    dtype: str = "auto"                # bf16 autocast on CUDA, fp32 elsewhere (quantizer, STFTs, losses fp32)
    compile: bool = True
    seed: int = 1337

    def validate(self):
        """This file's own fields (common.parse_config checks the shared ones): one error line each."""
        def bad(msg):
            raise SystemExit(f"error: {msg}")
        if self.codebook_size < 2 or self.codebook_size & (self.codebook_size - 1):
            bad(f"--codebook_size must be a power of 2 (a code is log2(size) bits), got {self.codebook_size}")
        for keys, ok, what in (
                (("n_q", "channels", "n_filters", "dimension", "lstm_layers", "lm_batch_size", "lm_heads"),
                 lambda v: v >= 1, "be >= 1"),
                (("eval_seconds", "bench_seconds", "lm_seconds", "lm_lr", "lm_context"),
                 lambda v: v > 0, "be > 0"),
                (("quantizer_warmup", "disc_warmup", "kmeans_iters", "lm_iters", "chunk",
                  "dead_code_threshold"), lambda v: v >= 0, "be >= 0"),
                (("disc_prob", "overlap"), lambda v: 0 <= v <= 1, "lie in [0, 1]"),
                (("ema_decay", "balancer_decay"), lambda v: 0 < v < 1, "lie in (0, 1)")):
            for k in keys:
                if not ok(getattr(self, k)):
                    bad(f"--{k} must {what} (got {getattr(self, k)})")
        if not self.bandwidths or min(self.bandwidths) <= 0:
            bad(f"--bandwidths must be positive kbps values (got {self.bandwidths})")
        for k, allowed in (("norm", ("weight_norm", "time_group_norm")),
                           ("pad_mode", ("reflect", "constant", "replicate"))):
            if getattr(self, k) not in allowed:
                bad(f"--{k} must be one of {', '.join(allowed)} (got {getattr(self, k)!r})")
        if self.lm_dim % self.lm_heads or self.lm_dim < 4:
            bad(f"--lm_dim ({self.lm_dim}) must be >= 4 and divisible by --lm_heads ({self.lm_heads})")
        longest = max([2 ** i for i in self.mel_scales] + list(self.disc_n_ffts))
        if self.mode in ("train", "bench") and self.segment < longest:
            bad(f"--segment={self.segment} samples is shorter than the longest loss window ({longest}: "
                "--mel_scales / --disc_n_ffts)")

PRESETS = {
    "24khz": dict(),                                        # the paper's causal mono model (14.85 M params)
    "48khz": dict(sample_rate=48000, channels=2, causal=False, norm="time_group_norm", n_q=16,
                  bandwidths=(3.0, 6.0, 12.0, 24.0), normalize=True, chunk=1.0, segment=48000,
                  lambda_g=4.0, lambda_feat=4.0, disc_prob=0.5),  # the paper's stereo music model
    "small": dict(n_filters=16, dimension=64, n_q=8, bandwidths=(1.5, 3.0, 6.0), disc_filters=8,
                  disc_n_ffts=(1024, 512, 256), segment=12000, batch_size=8, max_iters=2000, log_interval=10,
                  eval_interval=500, eval_items=4, bench_seconds=4.0, bench_batches=(1, 4), kmeans_iters=20,
                  # k-means must see latents that mean something, and reconstruction comes first (ours)
                  lr=1e-3, quantizer_warmup=200, disc_warmup=1500,
                  lm_dim=128, lm_layers=3, lm_iters=2000, lm_seconds=3.0, lm_batch_size=8, lm_lr=1e-3,
                  # the threshold 2 assumes 64 x 1 s batches (4.7 frames per code): scaled to 8 x 0.5 s
                  dead_code_threshold=2.0 * (8 * 38) / (64 * 75)),
    "tiny": dict(n_filters=4, dimension=16, lstm_layers=1, n_q=4, codebook_size=64, bandwidths=(0.9, 1.8),
                 kmeans_iters=5, disc_filters=4, disc_n_ffts=(256, 128), mel_scales=(6, 7),
                 segment=4800, batch_size=2, max_iters=10, log_interval=1, eval_interval=1000,
                 eval_items=1, eval_seconds=0.5, bench_seconds=0.5, bench_batches=(1, 2), corpus_hours=0.02,
                 lm_dim=16, lm_layers=1, lm_heads=2, lm_iters=3, lm_seconds=0.5, lm_batch_size=2),
}
# fields that shape the weights or change what they mean (rate, channels, padding, normalisation): a
# checkpoint must agree on them. The LM adds its own.
ARCH_KEYS = ("sample_rate", "channels", "n_filters", "dimension", "ratios", "n_residual_layers",
             "dilation_base", "lstm_layers", "causal", "norm", "pad_mode", "normalize", "n_q",
             "codebook_size", "disc_filters", "disc_n_ffts")
LM_ARCH_KEYS = ARCH_KEYS + ("lm_dim", "lm_layers", "lm_heads", "lm_context")

# ----------------------------------------------------------------------------- model

def _pad1d(x, left, right, mode):
    """F.pad that also reflects inputs shorter than the padding (zero-extend first, as the official code)."""
    if left == right == 0:  # a 1x1 conv: F.pad would still copy the input (and its backward copy it back)
        return x
    if mode != "reflect":
        return F.pad(x, (left, right), mode)
    extra = max(0, max(left, right) - x.shape[-1] + 1)
    if extra == 0:
        return F.pad(x, (left, right), "reflect")
    x = F.pad(F.pad(x, (0, extra)), (left, right), "reflect")
    return x[..., :x.shape[-1] - extra]


def _normed(conv, norm):
    # N(0, 1/fan_in), zero bias: variance-preserving, so untrained latents follow the audio and k-means on
    # them finds many codes (PyTorch's default init shrinks the signal layer after layer)
    transposed = isinstance(conv, nn.ConvTranspose1d)
    fan_in = conv.in_channels * conv.kernel_size[0] / (conv.stride[0] if transposed else 1)
    nn.init.normal_(conv.weight, 0.0, fan_in ** -0.5)
    nn.init.zeros_(conv.bias)
    # §3.1: weight norm in the 24 kHz model; the 48 kHz model uses GroupNorm(1, C) after each conv instead
    return nn.utils.parametrizations.weight_norm(conv) if norm == "weight_norm" else conv


class StreamableConv1d(nn.Module):
    """Conv1d that pads itself so T samples give ceil(T / stride) frames, all padding on the left when
    causal (§3.1). Every module below takes an optional `state` dict: given one, it runs on one chunk of a
    stream, the history it needs kept in state[module]; `final` says the input ends with this chunk."""
    def __init__(self, cin, cout, kernel, stride=1, dilation=1, causal=True, norm="weight_norm",
                 pad_mode="reflect"):
        super().__init__()
        self.conv = _normed(nn.Conv1d(cin, cout, kernel, stride, dilation=dilation), norm)
        self.norm = nn.GroupNorm(1, cout) if norm == "time_group_norm" else nn.Identity()
        self.stride, self.causal, self.pad_mode, self.cout = stride, causal, pad_mode, cout
        self.k_eff = (kernel - 1) * dilation + 1
        self.pad = self.k_eff - stride  # total padding so that frame t starts at sample t*stride

    def forward(self, x, state=None, final=False):  # (B, Cin, T) -> (B, Cout, ceil(T/stride))
        if state is None:
            extra = -x.shape[-1] % self.stride  # complete the last window: the decoder rebuilds T samples
            left = self.pad if self.causal else self.pad - self.pad // 2
            return self.norm(self.conv(_pad1d(x, left, self.pad - left + extra, self.pad_mode)))
        # state[self] = (started, buffer): inputs not consumed yet, at least the last k_eff - stride of them.
        # final: complete the last window as the offline pass does, and emit it (the flush)
        started, buf = state.get(self, (False, x[..., :0]))
        x = torch.cat([buf, x], -1)
        if not started:
            if final:  # the whole input is still here: the offline result is the answer
                state[self] = (True, x[..., :0])
                return self.forward(x) if x.shape[-1] else x.new_zeros(x.shape[0], self.cout, 0)
            # reflect padding mirrors the first `pad` samples, so it waits for them once; zeros need no wait
            if x.shape[-1] == 0 or (self.pad_mode == "reflect" and x.shape[-1] <= self.pad):
                state[self] = (False, x)
                return x.new_zeros(x.shape[0], self.cout, 0)
            x, started = _pad1d(x, self.pad, 0, self.pad_mode), True
        if final:  # the offline `extra` right padding: whatever completes the last window
            x = _pad1d(x, 0, (self.k_eff - x.shape[-1]) % self.stride, self.pad_mode)
        n = max(0, (x.shape[-1] - self.k_eff) // self.stride + 1)  # complete windows
        state[self] = (True, x[..., n * self.stride:])
        if n == 0:
            return x.new_zeros(x.shape[0], self.cout, 0)
        return self.norm(self.conv(x[..., :(n - 1) * self.stride + self.k_eff]))


def _conv(cfg, cin, cout, kernel, stride=1, dilation=1):
    return StreamableConv1d(cin, cout, kernel, stride, dilation, cfg.causal, cfg.norm, cfg.pad_mode)


class StreamableConvTranspose1d(nn.Module):
    """Transposed conv (kernel 2S, stride S) trimming k - S samples, all on the right when causal (§3.1)."""
    def __init__(self, cin, cout, kernel, stride, causal=True, norm="weight_norm"):
        super().__init__()
        self.conv = _normed(nn.ConvTranspose1d(cin, cout, kernel, stride), norm)
        self.norm = nn.GroupNorm(1, cout) if norm == "time_group_norm" else nn.Identity()
        self.stride, self.causal, self.cout = stride, causal, cout
        self.trim = kernel - stride

    def forward(self, x, state=None, final=False):  # (B, Cin, T) -> (B, Cout, T*stride)
        if state is None:
            y = self.norm(self.conv(x))  # (B, Cout, (T-1)*S + k)
            right = self.trim if self.causal else self.trim // 2
            return y[..., self.trim - right:y.shape[-1] - right]
        # the last k - S outputs of a chunk still receive contributions from the next input frame: keep them
        # (bias included) and add them to the next chunk's head, minus the bias counted twice. At the end
        # they are what the offline pass trims on the right, so `final` has nothing to flush.
        if x.shape[-1] == 0:
            return x.new_zeros(x.shape[0], self.cout, 0)
        y = self.conv(x)  # (B, Cout, (T+1)*S)
        tail = state.get(self)
        if tail is not None:
            y = torch.cat([y[..., :self.trim] + tail - self.conv.bias[:, None], y[..., self.trim:]], -1)
        n = y.shape[-1] - self.trim
        state[self] = y[..., n:]
        return y[..., :n]


def _elu(x):
    # ELU of a fresh conv/LSTM output, in place where no gradient is recorded (one buffer less at inference).
    # With autograd the in-place backward (grad * (y + 1)) would round differently from grad * exp(x)
    return F.elu(x, inplace=not (torch.is_grad_enabled() and x.requires_grad))


class ResidualUnit(nn.Module):
    """SEANet residual unit (§3.1): ELU -> conv k3 (dim -> dim/2, dilated) -> ELU -> conv k1 (-> dim),
    plus a 1x1 conv shortcut."""
    def __init__(self, dim, dilation, cfg):
        super().__init__()
        self.conv1 = _conv(cfg, dim, dim // 2, 3, dilation=dilation)
        self.conv2 = _conv(cfg, dim // 2, dim, 1)
        self.shortcut = _conv(cfg, dim, dim, 1)

    def forward(self, x, state=None, final=False):
        if state is None:  # fresh conv outputs in place: fewer full-size buffers, the same numbers (see _elu)
            return self.shortcut(x).add_(self.conv2(_elu(self.conv1(F.elu(x)))))
        # the dilated branch may still be waiting for its left context: hold the shortcut until it catches up
        skip = torch.cat([state.get((self, "skip"), x[:, :, :0]), self.shortcut(x, state, final)], -1)
        y = self.conv2(F.elu(self.conv1(F.elu(x), state, final)), state, final)
        state[(self, "skip")] = skip[..., y.shape[-1]:]
        return skip[..., :y.shape[-1]] + y


class SLSTM(nn.Module):
    """§3.1: a 2-layer LSTM over the bottleneck frames, with a skip connection."""
    def __init__(self, dim, layers):
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, layers)

    def forward(self, x, state=None):  # (B, C, T) -> (B, C, T); a stream carries (h, c) between chunks
        if state is not None and x.shape[-1] == 0:
            return x
        x = x.permute(2, 0, 1)  # (T, B, C)
        y, hc = self.lstm(x, None if state is None else state.get(self))
        if state is not None:
            state[self] = hc
        return (y + x).permute(1, 2, 0)


class EncoderBlock(nn.Module):
    def __init__(self, dim, stride, cfg):
        super().__init__()
        self.res = nn.ModuleList(ResidualUnit(dim, cfg.dilation_base ** j, cfg)
                                 for j in range(cfg.n_residual_layers))
        self.down = _conv(cfg, dim, 2 * dim, 2 * stride, stride)  # kernel 2S, stride S, channels doubled

    def forward(self, x, state=None, final=False):
        for r in self.res:
            x = r(x, state, final)
        return self.down(_elu(x), state, final)


class DecoderBlock(nn.Module):
    def __init__(self, dim, stride, cfg):
        super().__init__()
        self.up = StreamableConvTranspose1d(dim, dim // 2, 2 * stride, stride, cfg.causal, cfg.norm)
        self.res = nn.ModuleList(ResidualUnit(dim // 2, cfg.dilation_base ** j, cfg)
                                 for j in range(cfg.n_residual_layers))

    def forward(self, x, state=None, final=False):
        x = self.up(_elu(x), state, final)
        for r in self.res:
            x = r(x, state, final)
        return x


class SEANetEncoder(nn.Module):
    """§3.1, Fig. 1: conv k7 -> 4 x (residual unit, strided conv) -> LSTM -> ELU, conv k7 -> D.
    (B, C, T) -> (B, D, T/320)"""
    def __init__(self, cfg):
        super().__init__()
        C, top = cfg.n_filters, cfg.n_filters * 2 ** len(cfg.ratios)
        self.conv_in = _conv(cfg, cfg.channels, C, 7)
        self.blocks = nn.ModuleList(EncoderBlock(C * 2 ** i, s, cfg)  # strides 2, 4, 5, 8; channels x2 each
                                    for i, s in enumerate(reversed(cfg.ratios)))
        self.lstm = SLSTM(top, cfg.lstm_layers)
        self.conv_out = _conv(cfg, top, cfg.dimension, 7)

    def forward(self, x, state=None, final=False):
        x = self.conv_in(x, state, final)
        for b in self.blocks:
            x = b(x, state, final)
        return self.conv_out(_elu(self.lstm(x, state)), state, final)


class SEANetDecoder(nn.Module):
    """The mirror image: conv k7 -> LSTM -> 4 x (transposed conv, residual unit) -> ELU, conv k7. No tanh."""
    def __init__(self, cfg):
        super().__init__()
        C, top = cfg.n_filters, cfg.n_filters * 2 ** len(cfg.ratios)
        self.conv_in = _conv(cfg, cfg.dimension, top, 7)
        self.lstm = SLSTM(top, cfg.lstm_layers)
        self.blocks = nn.ModuleList(DecoderBlock(top // 2 ** i, s, cfg)  # strides 8, 5, 4, 2; channels / 2
                                    for i, s in enumerate(cfg.ratios))
        self.conv_out = _conv(cfg, C, cfg.channels, 7)

    def forward(self, z, state=None, final=False):
        x = self.lstm(self.conv_in(z, state, final), state)
        for b in self.blocks:
            x = b(x, state, final)
        return self.conv_out(_elu(x), state, final)


def _sample_rows(x, n):  # n random rows of x (without replacement when there are enough)
    if x.shape[0] >= n:
        return x[torch.randperm(x.shape[0], device=x.device)[:n]]
    return x[torch.randint(0, x.shape[0], (n,), device=x.device)]


def _nearest(x, embed):
    # squared Euclidean distance, expanded so it is one matmul: (N, D), (K, D) -> (N,)
    dist = x.pow(2).sum(1, keepdim=True) - 2 * x @ embed.t() + embed.pow(2).sum(1)[None]
    return dist.argmin(-1)


def kmeans(x, k, iters):
    """Lloyd's algorithm on the first batch: the codebook initialisation of §3.2 (SoundStream §3.3)."""
    means = _sample_rows(x, k)
    for _ in range(iters):
        assign = _nearest(x, means)
        counts = x.new_zeros(k).index_add_(0, assign, torch.ones_like(x[:, 0]))
        sums = torch.zeros_like(means).index_add_(0, assign, x)  # fixed-size sums: no data-dependent shapes
        means = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], means)
    return means, counts


class Codebook(nn.Module):
    """One VQ layer (§3.2): nearest-neighbour lookup in `embed`, updated by EMA (not by gradients).
    Buffer names follow the official checkpoint so its codebooks load one to one."""
    def __init__(self, cfg):
        super().__init__()
        K, D = cfg.codebook_size, cfg.dimension
        self.decay, self.kmeans_iters, self.eps = cfg.ema_decay, cfg.kmeans_iters, 1e-5
        self.threshold = cfg.dead_code_threshold
        # a re-seeded code's usage restarts at threshold / decay^grace (ours): never picked, it takes `grace`
        # steps of EMA decay to fall back under the threshold (+0.5: rounding margin)
        self.reset = self.threshold * cfg.ema_decay ** -(cfg.dead_code_grace + 0.5)
        self.register_buffer("inited", torch.zeros(1))      # 0 until k-means has run on a training batch
        self.register_buffer("cluster_size", torch.zeros(K))  # EMA of how often each code is picked
        self.register_buffer("embed", torch.zeros(K, D))     # the codewords
        self.register_buffer("embed_avg", torch.zeros(K, D))  # EMA of the sum of the vectors each code got
        self._inited = False  # a host-side copy of `inited`, so a training step never reads the device
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_inited", False))

    def forward(self, x):  # x: (N, D) fp32 -> quantized (N, D), codes (N,)
        if self.training and not self._is_inited():
            self._kmeans_init(x)
        codes = _nearest(x, self.embed)
        q = F.embedding(codes, self.embed)
        if self.training:
            self._ema_update(x, codes)
        return q, codes

    @torch.no_grad()
    def _kmeans_init(self, x):
        means, counts = kmeans(x, self.embed.shape[0], self.kmeans_iters)
        self.embed.copy_(means)
        self.cluster_size.copy_(counts)
        self.embed_avg.copy_(means * counts[:, None])  # so that embed_avg / cluster_size == means
        self.inited.fill_(1)
        self._inited = True
        if common._distributed():  # rank 0's random choices win
            for b in (self.embed, self.embed_avg, self.cluster_size, self.inited):
                dist.broadcast(b, 0)

    def _is_inited(self):
        # the buffer is read once per process (first step, or after loading): no host sync in later steps
        if not self._inited:
            self._inited = bool(self.inited.item())
        return self._inited

    @torch.no_grad()
    def _ema_update(self, x, codes):
        K = self.embed.shape[0]
        onehot = F.one_hot(codes, K).type(x.dtype)  # (N, K)
        counts, sums = onehot.sum(0), onehot.t() @ x  # (K,), (K, D)
        if common._distributed():  # statistics of the global batch
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + K * self.eps) * n  # Laplace smoothing: no 0 division
        self.embed.copy_(self.embed_avg / smoothed[:, None])
        # dead codes (SoundStream §3.3) take a random batch vector, usage reset to self.reset; no host sync
        dead = self.cluster_size < self.threshold  # (K,)
        new = _sample_rows(x, K)  # (K, D)
        if common._distributed():
            dist.broadcast(new, 0)  # rank 0's rows: the buffers stay identical on every rank
        self.embed.copy_(torch.where(dead[:, None], new, self.embed))
        self.cluster_size.copy_(torch.where(dead, self.reset, self.cluster_size))
        self.embed_avg.copy_(torch.where(dead[:, None], new * self.reset, self.embed_avg))


class ResidualVectorQuantizer(nn.Module):
    """§3.2 (SoundStream Alg. 1): codebook i quantizes what codebooks 1..i-1 left; the first n_q are used."""
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(Codebook(cfg) for _ in range(cfg.n_q))

    def forward(self, z, n_q):  # z: (B, D, T) -> quantized (B, D, T), codes (B, n_q, T), commitment loss
        B, D, T = z.shape
        with torch.autocast(z.device.type, enabled=False):  # codebook statistics stay fp32
            x = z.float().transpose(1, 2).reshape(B * T, D)  # (B*T, D)
            residual, out, codes, commit, fresh = x, torch.zeros_like(x), [], 0.0, False
            for layer in self.layers[:n_q]:
                if self.training and not layer._is_inited():
                    # k-means one level per step (as the official Mimi code): a level fitted on a batch of
                    # fewer frames than codes leaves its successor an all-zero residual there, so the next
                    # level waits for the next step's residual; until then the batch uses fewer levels
                    if fresh:
                        break
                    fresh = True
                q, c = layer(residual)
                commit = commit + F.mse_loss(residual, q.detach())  # ℓ_w (§3.4): the encoder to the codes
                residual = residual - q.detach()  # detached: every layer's commitment gradient survives (#25)
                out, codes = out + q, codes + [c]
            out = x + (out - x).detach()  # straight-through: the decoder's gradient reaches the encoder
        n = len(codes)  # n_q, or fewer while k-means is still initialising the levels
        codes = torch.stack(codes, 1).view(B, T, n).transpose(1, 2)  # (B, n_q, T)
        return out.view(B, T, D).transpose(1, 2), codes, commit / n

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
        out = sum(F.embedding(c, layer.embed) for c, layer in zip(codes.unbind(1), self.layers))  # (B, T, D)
        return out.transpose(1, 2)


class EnCodec(nn.Module):
    """Encoder -> RVQ -> decoder (§3, Fig. 1), with the bandwidth arithmetic of §3.2."""
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.quantizer = SEANetEncoder(cfg), ResidualVectorQuantizer(cfg)
        self.decoder = SEANetDecoder(cfg)
        self.hop = math.prod(cfg.ratios)
        self.frame_rate = math.ceil(cfg.sample_rate / self.hop)  # 75 Hz at 24 kHz, 150 Hz at 48 kHz
        self.bits = int(math.log2(cfg.codebook_size))

    def n_q_for(self, bandwidth):
        """Codebooks for a target kbps: each costs log2(bins) bits per frame (0.75 kbps at 24 kHz)."""
        per_q = self.bits * self.frame_rate / 1000
        return max(1, min(self.cfg.n_q, math.floor(bandwidth / per_q + 1e-9)))

    def _scale(self, x):
        # 48 kHz model: divide by the RMS of the mono mix, transmit the scale (§4)
        if not self.cfg.normalize:
            return x, None
        scale = 1e-8 + x.mean(1, keepdim=True).pow(2).mean(2, keepdim=True).sqrt()  # (B, 1, 1)
        return x / scale, scale

    def forward(self, x, n_q):  # training: (B, C, T) -> reconstruction (B, C, T), codes, commitment loss
        x, scale = self._scale(x)
        z = self.encoder(x)
        # n_q = 0: a plain autoencoder (cfg.quantizer_warmup), so the codebooks' k-means sees trained latents
        q, codes, commit = self.quantizer(z, n_q) if n_q else (z, None, z.new_zeros(()))
        x_hat = self.decoder(q.to(x.dtype))[..., :x.shape[-1]]
        return (x_hat if scale is None else x_hat * scale), codes, commit

    @torch.no_grad()
    def encode(self, x, n_q):  # one chunk (B, C, T) -> codes (B, n_q, ceil(T/hop)), scale or None
        x, scale = self._scale(x)
        return self.quantizer.encode(self.encoder(x), n_q), scale

    @torch.no_grad()
    def decode(self, codes, scale=None):  # (B, n_q, F) -> (B, C, F*hop)
        y = self.decoder(self.quantizer.decode(codes))
        return y if scale is None else y * scale

    def _chunking(self, length):  # (chunk length, stride) in samples; one chunk when cfg.chunk == 0
        if not self.cfg.chunk:
            return length, length
        seg = int(self.cfg.chunk * self.cfg.sample_rate)
        return seg, max(1, int((1 - self.cfg.overlap) * seg))

    def compress(self, x, bandwidth):
        """A whole file -> [(codes, scale)] per chunk (one chunk unless cfg.chunk > 0: the 48 kHz model)."""
        seg, stride = self._chunking(x.shape[-1])
        n_q = self.n_q_for(bandwidth)
        return [self.encode(x[..., o:o + seg], n_q) for o in range(0, x.shape[-1], stride)]

    def decompress(self, frames, length):
        """Decode chunks and cross-fade their overlaps with triangular weights (the 48 kHz model, §4)."""
        outs = [self.decode(c, s) for c, s in frames]
        if len(outs) == 1:
            return outs[0][..., :length]
        stride = self._chunking(length)[1]
        total = stride * (len(outs) - 1) + outs[-1].shape[-1]
        t = torch.linspace(0, 1, outs[0].shape[-1] + 2, device=outs[0].device)[1:-1]
        w = 0.5 - (t - 0.5).abs()  # triangle peaking mid-chunk
        out = outs[0].new_zeros(*outs[0].shape[:-1], total)
        wsum = out.new_zeros(total)
        for i, o in enumerate(outs):
            n = o.shape[-1]
            out[..., i * stride:i * stride + n] += w[:n] * o
            wsum[i * stride:i * stride + n] += w[:n]
        return (out / wsum)[..., :length]

    @torch.no_grad()
    def encode_stream(self, x, state, n_q, final=False):
        """A chunk of audio (B, C, t) -> the codes (B, n_q, f) of the frames it completes; final=True (the
        last chunk, maybe empty) also flushes the partial frame: ceil(T / hop) frames in all, as encode()."""
        assert self.cfg.causal and not self.cfg.normalize, "streaming needs the causal 24 kHz model"
        return self.quantizer.encode(self.encoder(x, state, final), n_q)

    @torch.no_grad()
    def decode_stream(self, codes, state, final=False):  # a chunk of codes -> the audio it makes final
        assert self.cfg.causal, "streaming needs the causal 24 kHz model"
        return self.decoder(self.quantizer.decode(codes), state, final)


class STFTDiscriminator(nn.Module):
    """One scale of the MS-STFT discriminator (§3.4, Fig. 2): 2D convs over the real and imaginary parts of
    a complex STFT (B, 2C, frames, freq); strides halve the frequency axis, dilations grow along time."""
    def __init__(self, n_fft, cfg):
        super().__init__()
        f, wn = cfg.disc_filters, nn.utils.parametrizations.weight_norm
        self.n_fft, self.slope = n_fft, cfg.disc_slope
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.convs = nn.ModuleList([nn.Conv2d(2 * cfg.channels, f, (3, 9), padding=(1, 4))])  # no weight norm
        for d in (1, 2, 4):
            self.convs.append(wn(nn.Conv2d(f, f, (3, 9), stride=(1, 2), dilation=(d, 1), padding=(d, 4))))
        self.convs.append(wn(nn.Conv2d(f, f, (3, 3), padding=(1, 1))))
        self.conv_post = wn(nn.Conv2d(f, 1, (3, 3), padding=(1, 1)))

    def forward(self, x):  # x: (B, C, T) -> logits (B, 1, frames, freq'), feature maps
        B, C, T = x.shape
        with torch.autocast(x.device.type, enabled=False):
            spec = torch.stft(x.float().reshape(B * C, T), self.n_fft, self.n_fft // 4, window=self.window,
                              center=False, return_complex=True)  # (B*C, F, frames)
            spec = spec / self.window.pow(2).sum().sqrt()  # "normalized" spectrogram, as torchaudio's
        spec = spec.view(B, C, *spec.shape[1:])  # (B, C, F, frames)
        # (B, 2C, frames, F), channels-last: thin 2D convs run faster in that layout on the CPU
        z = torch.cat([spec.real, spec.imag], 1).transpose(2, 3).contiguous(memory_format=torch.channels_last)
        fmap = []
        for conv in self.convs:
            z = F.leaky_relu(conv(z), self.slope)
            fmap.append(z)
        return self.conv_post(z), fmap


class MSSTFTDiscriminator(nn.Module):
    """§3.4: five STFT discriminators, windows 2048..128, hop = window / 4."""
    def __init__(self, cfg):
        super().__init__()
        self.discs = nn.ModuleList(STFTDiscriminator(n, cfg) for n in cfg.disc_n_ffts)

    def forward(self, x):
        outs = [d(x) for d in self.discs]
        return [o[0] for o in outs], [o[1] for o in outs]


class LMLayer(nn.Module):
    """One layer of the entropy-coding LM (§3.3): post-norm self-attention + GELU MLP, as the official
    nn.TransformerEncoderLayer. Keys and values also cover `past`, the layer inputs of earlier frames."""
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.in_proj, self.out_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.linear1, self.linear2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, past, mask):  # x (B, T, C), past (B, P, C), mask (T, P+T) True = may attend
        B, T, C = x.shape
        wq, wkv = self.in_proj.weight.split([C, 2 * C]), self.in_proj.bias.split([C, 2 * C])
        q = F.linear(x, wq[0], wkv[0])
        k, v = F.linear(torch.cat([past, x], 1), wq[1], wkv[1]).chunk(2, -1)
        heads = lambda t: t.view(B, t.shape[1], self.heads, C // self.heads).transpose(1, 2)  # (B, h, T, C/h)
        a = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
        x = self.norm1(x + self.out_proj(a.transpose(1, 2).reshape(B, T, C)))
        return self.norm2(x + self.linear2(F.gelu(self.linear1(x))))


class CodeLM(nn.Module):
    """§3.3: a small transformer that predicts all the codes of frame t at once (one softmax per codebook)
    from the codes of frames < t. Its probabilities drive an arithmetic coder, so its cross-entropy is the
    bitrate the codes can be squeezed to. Input of frame t: the sum of one embedding per codebook of frame
    t-1's codes."""
    def __init__(self, cfg, frame_rate):
        super().__init__()
        K, D = cfg.codebook_size, cfg.lm_dim
        self.emb = nn.ModuleList(nn.Embedding(K + 1, D) for _ in range(cfg.n_q))  # 0: "no previous frame"
        self.norm_in = nn.LayerNorm(D)
        self.layers = nn.ModuleList(LMLayer(D, cfg.lm_heads) for _ in range(cfg.lm_layers))
        self.linears = nn.ModuleList(nn.Linear(D, K) for _ in range(cfg.n_q))
        self.context = int(cfg.lm_context * frame_rate)  # frames of past each frame sees

    def forward(self, codes):  # codes (B, n_q, T) -> logits (B, n_q, T, K), each frame given the earlier ones
        B, n_q, T = codes.shape
        prev = torch.cat([codes.new_zeros(B, n_q, 1), codes[..., :-1] + 1], -1)  # frame t sees frame t-1 (+1)
        x = self.norm_in(sum(self.emb[k](prev[:, k]) for k in range(n_q)))  # (B, T, D)
        pos = torch.arange(T, device=x.device)[:, None].float()
        half = x.shape[-1] // 2
        phase = pos / 10000 ** (torch.arange(half, device=x.device) / (half - 1))  # (T, D/2)
        x = x + torch.cat([phase.cos(), phase.sin()], -1)
        # the official LM starts every layer with one all-zero "past" frame (its initial streaming state) that
        # every frame may attend to; keeping it lets the official weights give the same probabilities
        delta = torch.arange(1, T + 1, device=x.device)[:, None] - torch.arange(T + 1, device=x.device)[None]
        mask = (delta >= 0) & (delta <= self.context)  # causal, and at most `context` frames back
        past = x.new_zeros(B, 1, x.shape[-1])
        for layer in self.layers:
            x = layer(x, past, mask)
        return torch.stack([self.linears[k](x) for k in range(n_q)], 1)  # (B, n_q, T, K)

    def bits(self, codes):  # (B, n_q, T) -> total bits to arithmetic-code them (the LM's cross-entropy)
        logits = self(codes).float()
        return F.cross_entropy(logits.flatten(0, -2), codes.reshape(-1), reduction="sum") / math.log(2)

# ----------------------------------------------------------------------------- loss

_MEL_CACHE = {}


def loss_mel(x, n_fft, cfg):
    """S_i of ℓ_f (§3.4): the 64-bin mel of the power spectrum of a normalized STFT, window n_fft, hop
    n_fft/4, HTK scale, unnormalised filters, padded as audiocraft's msspec: reflect (n_fft - hop)/2 each
    side, zeros to whole frames. (B, C, T) -> (B, C, n_mels, frames)."""
    hop, (B, C, T) = n_fft // 4, x.shape
    key = (cfg.sample_rate, n_fft, cfg.n_mels, str(x.device))
    if key not in _MEL_CACHE:
        fb = common.mel_filterbank(cfg.sample_rate, n_fft, cfg.n_mels, htk=True, norm=None)
        _MEL_CACHE[key] = (torch.from_numpy(fb).to(x.device), torch.hann_window(n_fft, device=x.device))
    fb, window = _MEL_CACHE[key]
    with torch.autocast(x.device.type, enabled=False):
        p = (n_fft - hop) // 2
        y = F.pad(x.float().reshape(B * C, 1, T), (p, p), "reflect")
        y = F.pad(y, (0, -(y.shape[-1] - n_fft) % hop))[:, 0]  # (B*C, T') with whole frames
        spec = torch.stft(y, n_fft, hop, window=window, center=False, return_complex=True)  # (B*C, F, frames)
        power = (spec.real.pow(2) + spec.imag.pow(2)) / window.pow(2).sum()  # |normalized STFT|^2
        return (fb @ power).view(B, C, cfg.n_mels, -1)


def reconstruction_losses(x, x_hat, cfg):
    """§3.4: ℓ_t = L1 in time; ℓ_f = mean over the scales 2^i of L1(S_i) + α·MSE(log10(1e-5 + S_i)):
    the linear mel's L1 weights the loud bins, the log mel's MSE the quiet ones."""
    l_t = F.l1_loss(x_hat.float(), x.float())
    l_f = 0.0
    for i in cfg.mel_scales:
        s, s_hat = loss_mel(x, 2 ** i, cfg), loss_mel(x_hat, 2 ** i, cfg)
        l_f = l_f + F.l1_loss(s_hat, s) + cfg.mel_alpha * F.mse_loss(torch.log10(1e-5 + s_hat),
                                                                     torch.log10(1e-5 + s))
    return l_t, l_f / len(cfg.mel_scales)


def generator_adv_loss(logits_fake):  # §3.4 hinge: 1/K Σ_k mean relu(1 - D_k(x̂))
    return sum(F.relu(1 - l.float()).mean() for l in logits_fake) / len(logits_fake)


def feature_loss(fmap_real, fmap_fake):  # §3.4: 1/(KL) Σ |D_k^l(x) - D_k^l(x̂)|_1 / mean |D_k^l(x)|
    terms = [(r.float() - f.float()).abs().mean() / r.float().abs().mean().clamp(min=1e-8)
             for fr, ff in zip(fmap_real, fmap_fake) for r, f in zip(fr, ff)]
    return sum(terms) / len(terms)


def discriminator_loss(logits_real, logits_fake):  # §3.4 hinge: 1/K Σ relu(1 - D_k(x)) + relu(1 + D_k(x̂))
    return sum(F.relu(1 - r.float()).mean() + F.relu(1 + f.float()).mean()
               for r, f in zip(logits_real, logits_fake)) / len(logits_real)


class Balancer(nn.Module):
    """The loss balancer (§3.4). Each loss ℓ_i gives a gradient g_i = ∂ℓ_i/∂x̂ on the decoder output
    only. With ⟨‖g_i‖⟩ the EMA (decay 0.999, bias-corrected) of its per-example norm, x̂ receives
    Σ_i R·(λ_i/Σλ)·g_i/⟨‖g_i‖⟩: each weight becomes the share of the gradient that loss gets,
    whatever its scale, so a loss summed over many frames cannot drown the others. The EMAs are
    buffers (exact resume)."""
    def __init__(self, weights, cfg):
        super().__init__()
        self.names, self.enabled = list(weights), cfg.balancer
        self.decay, self.total_norm, self.eps = cfg.balancer_decay, 1.0, 1e-12
        self.register_buffer("weights", torch.tensor([float(weights[k]) for k in self.names]))
        self.register_buffer("norm_sum", torch.zeros(len(self.names)))  # EMA numerator of the gradient norms
        self.register_buffer("norm_count", torch.zeros(1))               # EMA denominator (bias correction)

    def backward(self, losses, x_hat, other=None):
        """Backpropagate the balanced gradient through x̂ plus `other` (the commitment loss) as is.
        `losses` may hold a subset of the names (ℓ_t, ℓ_f in cfg.disc_warmup): they share x̂ alone."""
        idx = [i for i, k in enumerate(self.names) if k in losses]
        grads = [torch.autograd.grad(losses[self.names[i]], x_hat, retain_graph=True)[0].float() for i in idx]
        weights = self.weights[idx]
        if not self.enabled:  # plain weighted sum
            out = sum(w * g for w, g in zip(weights, grads))
        else:
            norms = torch.stack([g.flatten(1).norm(dim=1).mean() for g in grads])  # per example, batch mean
            if common._distributed():
                dist.all_reduce(norms)
                norms /= dist.get_world_size()
            self.norm_sum[idx] = self.norm_sum[idx] * self.decay + norms
            self.norm_count.mul_(self.decay).add_(1)
            avg = self.norm_sum[idx] / self.norm_count
            scale = weights / weights.sum() * self.total_norm / (self.eps + avg)
            out = sum(s * g for s, g in zip(scale, grads))
        tensors, grad_tensors = [x_hat], [out.to(x_hat.dtype)]
        if other is not None and other.requires_grad:  # (no commitment loss while the RVQ is bypassed)
            tensors.append(other)
            grad_tensors.append(torch.ones_like(other))
        torch.autograd.backward(tensors, grad_tensors)

    def reset(self):  # the adversarial terms join after cfg.disc_warmup: every EMA starts again from there
        self.norm_sum.zero_()
        self.norm_count.zero_()

# ----------------------------------------------------------------------------- data

def to_channels(w, channels):
    """(T,) or (C', T) -> (channels, T): average, then repeat when the counts differ (mono corpus, stereo
    model)."""
    w = np.asarray(w, dtype=np.float32)
    w = w[None] if w.ndim == 1 else w
    if w.shape[0] != channels:
        w = np.repeat(w.mean(0, keepdims=True), channels, 0)
    return w


def audio_clips(cfg, split, kind="audio"):
    """Clips (channels, T) at the model's rate: speech + music for training, one kind for evaluation."""
    utts = common.load_corpus(cfg, split, cfg.sample_rate, kind=kind, mono=cfg.channels == 1)
    return [to_channels(u.wav, cfg.channels) for u in utts]


def eval_kinds(cfg):
    # the built-in corpus is evaluated per kind (speech in an unseen voice, music); a --data_dir folder as one
    return ("audio",) if cfg.data_dir else ("speech", "music")


def get_batch(sampler, cfg, rt):
    """(B, C, segment) random crops of the training clips (speech and music together), on rt.device."""
    return sampler.next()[0].to(rt.device).view(cfg.batch_size, cfg.channels, cfg.segment)

# ----------------------------------------------------------------------------- train

class StepChoices:
    """The per-step draws every rank must agree on: the bandwidth (§3.2, one per batch) and whether D updates
    (§4, with probability disc_prob). Drawn from (seed, step), with the step kept here so that resume and
    bench continue the same sequence; a checkpoint saves it with the rest of the state."""
    def __init__(self, cfg):
        self.seed, self.step = cfg.seed, 0

    def next(self):
        self.step += 1
        return self.step, random.Random(self.seed * 1_000_003 + self.step)

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


def build(cfg, rt):
    """Everything the codec stage holds (saved whole by common.save_checkpoint): the codec G, the MS-STFT
    discriminator D, the balancer with the paper's loss weights (§3.4) and its EMA, Adam for both (§4)."""
    G, D = EnCodec(cfg).to(rt.device), MSSTFTDiscriminator(cfg).to(rt.device)
    weights = {"t": cfg.lambda_t, "f": cfg.lambda_f, "g": cfg.lambda_g, "feat": cfg.lambda_feat}
    balancer = Balancer(weights, cfg)
    return dict(G=G, D=D, balancer=balancer.to(rt.device), choices=StepChoices(cfg),
                opt_g=torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=cfg.betas),
                opt_d=torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=cfg.betas))


def train_step(state, batch, cfg, rt):
    """One step of §3.4/§4: with probability disc_prob a discriminator update (hinge), then the codec's
    update through the balancer (ℓ_t, ℓ_f, ℓ_g, ℓ_feat rescaled on x̂; the commitment ℓ_w added as
    is)."""
    G, D, balancer, opt_g, opt_d = state["G"], state["D"], state["balancer"], state["opt_g"], state["opt_d"]
    step, rng = state["choices"].next()
    n_q = common.unwrap(G).n_q_for(rng.choice(cfg.bandwidths))  # §3.2: one bandwidth per batch
    n_q = 0 if step <= cfg.quantizer_warmup else n_q  # 0: the RVQ bypassed (ours)
    update_d = rng.random() < cfg.disc_prob
    x = batch
    with rt.autocast():
        x_hat, _, commit = G(x, n_q)
    if step <= cfg.disc_warmup:  # reconstruction alone (ours): no D to fool yet, and half the cost of a step
        l_t, l_f = reconstruction_losses(x, x_hat, cfg)
        opt_g.zero_grad(set_to_none=True)
        balancer.backward({"t": l_t, "f": l_f}, x_hat, other=cfg.lambda_w * commit)
        opt_g.step()
        zero = l_t.detach() * 0
        return dict(t=l_t, f=l_f, g=zero, feat=zero, w=commit, n_q=n_q)
    if step == cfg.disc_warmup + 1 and cfg.disc_warmup > 0:
        balancer.reset()
    losses = {}
    if update_d:
        with rt.autocast():
            logits_real, _ = D(x)
            logits_fake, _ = D(x_hat.detach())
        losses["d"] = discriminator_loss(logits_real, logits_fake)
        opt_d.zero_grad(set_to_none=True)
        losses["d"].backward()
        opt_d.step()
    d_plain = common.unwrap(D)  # the codec's step needs no gradient sync through D
    with rt.autocast():
        logits_fake, fmap_fake = d_plain(x_hat)
        with torch.no_grad():
            _, fmap_real = d_plain(x)
    l_t, l_f = reconstruction_losses(x, x_hat, cfg)
    g = {"t": l_t, "f": l_f, "g": generator_adv_loss(logits_fake), "feat": feature_loss(fmap_real, fmap_fake)}
    opt_g.zero_grad(set_to_none=True)
    balancer.backward(g, x_hat, other=cfg.lambda_w * commit)  # §3.4: commitment bypasses the balancer
    opt_g.step()
    losses.update(g, w=commit, n_q=n_q)
    return losses


def load_for_inference(cfg, rt):
    """The codec sample/eval/lm use, from --init_from: our checkpoint (cfg already holds its config, see
    common.parse_config) or the authors' file (official_codec). Empty codebooks (untrained) are an error."""
    if cfg.init_from == "scratch":
        raise SystemExit(f"error: --mode={cfg.mode} needs a trained codec: --init_from=out/encodec/ckpt.pt "
                         "(ours, or --init_from=resume) or the official encodec_24khz-d7cc33bc.th / "
                         "encodec_48khz-7e698e3e.th")
    path = common.checkpoint_path(cfg)
    ckpt = common.load_checkpoint(path)
    if common.is_ours(ckpt):
        model = EnCodec(cfg)
        common.load_models(ckpt, cfg, {"G": model}, ARCH_KEYS)
    else:
        model = official_codec(ckpt, cfg, path)
    empty = [i for i, layer in enumerate(model.quantizer.layers) if not layer.inited.item()]
    if empty:
        raise SystemExit(f"error: {path}: codebooks {empty[:4]}{' ...' if len(empty) > 4 else ''} were "
                         "never initialised (a checkpoint from the quantizer warm-up?); train past "
                         "--quantizer_warmup")
    return common.remove_weight_norm(model).to(rt.device).eval()  # inference: weight norm folded once


@torch.no_grad()
def evaluate(cfg, model=None, rt=None, samples_dir=None, split="test", lm=None):
    """SI-SNR, mel distance and bitrates at every bandwidth on held-out speech (an unseen voice) and music:
    the kbps really sent, the codes' unigram entropy (a context-free entropy coder's rate) and, given the LM
    of §3.3, its cross-entropy (an arithmetic coder's rate). One `eval` line per kind and bandwidth."""
    if model is None:
        rt = common.setup(cfg)
        model = load_for_inference(cfg, rt)
    m = common.unwrap(model)
    was_training, dev = m.training, next(m.parameters()).device
    m.eval()
    results = {}
    for kind in eval_kinds(cfg):
        clips = audio_clips(cfg, split, kind)[:cfg.eval_items]
        clips = [c[:, :int(cfg.eval_seconds * cfg.sample_rate)] for c in clips]
        common.check_clips(clips, m.hop, f"{split} split ({kind})")
        secs = sum(c.shape[-1] for c in clips) / cfg.sample_rate
        for bw in cfg.bandwidths:
            snr, mel, bits, lm_bits, codes_all = [], [], 0, 0.0, []
            for c in clips:
                x = torch.from_numpy(c)[None].to(dev)  # (1, C, T)
                frames = m.compress(x, bw)
                y = m.decompress(frames, x.shape[-1])
                snr.append(common.si_snr(y, x))
                mel.append(common.mel_distance(y.cpu(), x.cpu(), cfg.sample_rate))
                if samples_dir and c is clips[0] and bw == max(cfg.bandwidths):  # (--mode=sample: every kbps)
                    common.save_sample(samples_dir, f"{kind}_{bw:g}kbps", y[0].cpu(), cfg.sample_rate,
                                       ref=x[0].cpu())
                bits += sum(codes.numel() for codes, _ in frames) * m.bits  # what is actually transmitted
                codes = torch.cat([codes[0] for codes, _ in frames], -1)  # (n_q, frames), chunks back to back
                codes_all.append(codes.cpu())
                if lm is not None:
                    lm_bits += lm.bits(codes[None].to(next(lm.parameters()).device)).item()
            ent = 0.0  # unigram entropy per codebook, bits per frame
            for row in torch.cat(codes_all, -1):
                p = torch.bincount(row, minlength=cfg.codebook_size).float() / row.numel()
                ent -= (p[p > 0] * p[p > 0].log2()).sum().item()
            r = dict(si_snr=round(float(np.mean(snr)), 3), mel=round(float(np.mean(mel)), 4),
                     kbps=round(bits / secs / 1000, 3), kbps_entropy=round(ent * m.frame_rate / 1000, 3))
            if lm is not None:
                r["kbps_lm"] = round(lm_bits / secs / 1000, 3)
            results[f"{kind}_{bw:g}kbps"] = r
            saved = (f" | {r['kbps_lm']:.3f} kbps with the LM ({100 * (1 - r['kbps_lm'] / r['kbps']):.1f}%"
                     " saved)") if lm is not None else ""
            common.log(f"eval {split} {kind} {bw:g} kbps ({len(clips)} clips) | si_snr {r['si_snr']:.3f} dB "
                       f"| mel {r['mel']:.4f} | {r['kbps']:.3f} kbps sent | {r['kbps_entropy']:.3f} kbps "
                       "unigram entropy" + saved)
    if cfg.mode == "eval" and not cfg.data_dir and cfg.listen_items:
        listening_sets(cfg, m, dev)
    m.train(was_training)
    return results


@torch.no_grad()
def listening_sets(cfg, m, dev):
    """Whole test speech clips coded at the lowest and highest bandwidth, and the originals, as folders for
    `whisper.py --mode=sample --input_dir=DIR` to judge (common.write_listening_sets)."""
    utts = common.load_corpus(cfg, "test", cfg.sample_rate, kind="speech", mono=cfg.channels == 1)

    def coder(bw):
        def code(x):  # (C', T) -> (C, T)
            x = torch.from_numpy(to_channels(x, cfg.channels))[None].to(dev)  # (1, C, T)
            return m.decompress(m.compress(x, bw), x.shape[-1])[0]
        return code
    coders = {f"resynth_{bw:g}kbps": coder(bw) for bw in (min(cfg.bandwidths), max(cfg.bandwidths))}
    common.write_listening_sets(os.path.join(cfg.out_dir, "listen"), utts[:cfg.listen_items], coders,
                                cfg.sample_rate)


def train(cfg):
    rt = common.setup(cfg)
    state = build(cfg, rt)
    G = state["G"]
    common.log(f"params: encoder {common.count_params(G.encoder):,} | decoder "
               f"{common.count_params(G.decoder):,} | discriminator {common.count_params(state['D']):,}")
    train_clips = audio_clips(cfg, "train")
    common.check_clips(train_clips, cfg.segment, "train split")  # data errors stop before step 1, not after
    for kind in eval_kinds(cfg):
        common.check_clips(audio_clips(cfg, "val", kind), G.hop, f"val split ({kind})")
    sampler = common.SegmentSampler(train_clips, cfg.segment, cfg.batch_size, cfg.seed, rt.rank,
                                    rt.world_size)
    # scratch: step 0 | resume: out_dir/ckpt.pt continues exactly | PATH: weights only (ours or the authors'),
    # fresh optimizers, step 0
    step = common.init_from(cfg, state, sampler=sampler, arch_keys=ARCH_KEYS, official=load_official)
    state["G"] = common.wrap_ddp(common.compile(G, cfg), rt)
    state["D"] = common.wrap_ddp(common.compile(state["D"], cfg), rt)

    def evaluate_val(samples_dir):  # (choices.step is the step: no codebooks yet in the quantizer warm-up)
        if state["choices"].step > cfg.quantizer_warmup:
            evaluate(cfg, G, rt, samples_dir=samples_dir, split="val")
    common.train_loop(cfg, rt, state, step, train_step, lambda *_: get_batch(sampler, cfg, rt),
                      evaluate_val, sampler=sampler)

# ----------------------------------------------------------------------------- sample

@torch.no_grad()
def sample(cfg):
    """Encode held-out speech and music (or --input) at every bandwidth, decode, write wav + png pairs."""
    rt = common.setup(cfg)
    model = load_for_inference(cfg, rt)
    if cfg.input:
        wav, _ = common.load_audio(cfg.input, sr=cfg.sample_rate, mono=cfg.channels == 1)
        items = [(os.path.splitext(os.path.basename(cfg.input))[0], to_channels(wav, cfg.channels))]
    else:
        items = []
        for kind in eval_kinds(cfg):
            clips = audio_clips(cfg, "test", kind)
            common.check_clips(clips, model.hop, f"test split ({kind})")
            items.append((kind, clips[0][:, :int(cfg.eval_seconds * cfg.sample_rate)]))
    out = os.path.join(cfg.out_dir, "samples")
    for name, wav in items:
        x = torch.from_numpy(wav)[None].to(rt.device)  # (1, C, T)
        for bw in cfg.bandwidths:
            frames = model.compress(x, bw)
            y = model.decompress(frames, x.shape[-1])[0].cpu()
            common.save_sample(out, f"{name}_{bw:g}kbps", y, cfg.sample_rate, ref=wav)
            common.log(f"{name} @ {bw:g} kbps: {frames[0][0].shape[1]} codebooks, SI-SNR "
                       f"{common.si_snr(y, torch.from_numpy(wav)):.2f} dB -> {out}/{name}_{bw:g}kbps.wav")

# ----------------------------------------------------------------------------- entropy coding (§3.3)

def load_lm(cfg, frame_rate, device):
    """CodeLM, fresh or from cfg.lm_init: our lm.pt or the official encodec_lm_24khz/48khz state dict."""
    lm = CodeLM(cfg, frame_rate)
    if cfg.lm_init:
        ckpt = common.load_checkpoint(cfg.lm_init)
        if common.is_ours(ckpt):
            common.load_models(ckpt, cfg, {"lm": lm}, LM_ARCH_KEYS)
        else:
            official_lm(lm, ckpt, cfg.lm_init)
    return lm.to(device)



def train_lm(cfg):
    """The second stage (§3.3): fit the entropy-coding LM to the codes of a trained codec (--init_from), save
    it (state: the LM and its optimizer, out_dir/lm.pt), then evaluate() reports on held-out speech and music
    how many kbps arithmetic coding driven by it needs at each bandwidth, beside the raw rate."""
    rt = common.setup(cfg)
    if rt.world_size > 1:
        raise SystemExit("error: --mode=lm trains in one process (it takes minutes): run it without torchrun")
    codec = load_for_inference(cfg, rt)
    lm = load_lm(cfg, codec.frame_rate, rt.device)
    common.log(f"LM params: {common.count_params(lm):,}")
    if cfg.lm_iters:
        # every training clip encoded once at the top bandwidth, back to back (chunks too): (n_q, frames)
        clips = [codec.compress(torch.from_numpy(w)[None].to(rt.device), max(cfg.bandwidths))
                 for w in audio_clips(cfg, "train")]
        stream = torch.cat([codes[0] for frames in clips for codes, _ in frames], -1)
        common.log(f"encoded the training clips: {stream.shape[-1]:,} frames of {stream.shape[0]} codes")
        sampler = common.SegmentSampler([stream.cpu().numpy()], int(cfg.lm_seconds * codec.frame_rate),
                                        cfg.lm_batch_size, cfg.seed)
        state = dict(lm=lm, opt=torch.optim.Adam(lm.parameters(), lr=cfg.lm_lr))
        model = common.compile(lm, cfg)
        prog = common.Progress(replace(cfg, max_iters=cfg.lm_iters))
        for step in range(1, cfg.lm_iters + 1):
            x = sampler.next()[0].to(rt.device).long()  # (B, n_q, frames)
            # one LM for every bandwidth: a bandwidth drawn per step, as the codec's
            k = codec.n_q_for(random.Random(cfg.seed * 1_000_003 + step).choice(cfg.bandwidths))
            with rt.autocast():
                logits = model(x[:, :k])  # (B, k, frames, K)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, :k].reshape(-1))
            state["opt"].zero_grad(set_to_none=True)
            loss.backward()
            state["opt"].step()
            prog.update(step, {"bits_per_code": loss / math.log(2)}, cfg.lm_batch_size * cfg.lm_seconds)
        path = common.save_checkpoint(cfg, cfg.lm_iters, state, sampler=sampler,
                                      path=os.path.join(cfg.out_dir, "lm.pt"))
        common.log(f"saved the LM to {path}")
    return evaluate(cfg, codec, rt, split="test", lm=lm.eval())

# ----------------------------------------------------------------------------- bench

def bench(cfg):
    """One JSON line: train_step (D and G updates at the top bandwidth, the step training runs most) in ms and
    audio-s/s with its FLOPs, and encode/decode real-time factors at each bench batch, eager and compiled."""
    rt = common.setup(cfg)
    cfg = replace(cfg, quantizer_warmup=0, disc_prob=1.0, bandwidths=(max(cfg.bandwidths),))
    state = build(cfg, rt)
    model = state["G"]
    state["G"], state["D"] = common.compile(model, cfg), common.compile(state["D"], cfg)
    compiled = state["G"] is not model
    x = torch.randn(cfg.batch_size, cfg.channels, cfg.segment, device=rt.device) * 0.1
    iters = 3 if rt.device_type == "cpu" else 10
    step_ms = common.timeit(lambda: train_step(state, x, cfg, rt), iters=iters, warmup=2)
    flops = common.count_flops(lambda: train_step(state, x, cfg, rt))
    model = common.remove_weight_norm(model).eval()  # inference as sample/eval run it (weight norm folded)
    seconds = cfg.batch_size * cfg.segment / cfg.sample_rate
    figures = dict(train_step_ms=round(step_ms, 2), train_flops_per_step=flops,
                   train_audio_s_per_s=round(seconds / (step_ms / 1000), 2))
    T, n_q = int(cfg.bench_seconds * cfg.sample_rate), cfg.n_q
    for b in cfg.bench_batches:
        xb = torch.randn(b, cfg.channels, T, device=rt.device) * 0.1
        figures |= common.codec_rtf(lambda x: model.encode(x, n_q)[0], model.decode, xb,
                                    b * cfg.bench_seconds, rt, compiled, tag=f"_b{b}", iters=iters)
    common.report_bench(cfg, rt, model=model, compiled=compiled, **figures)

# ----------------------------------------------------------------------------- official weights
# The authors' encodec_24khz-d7cc33bc.th / encodec_48khz-7e698e3e.th (the codec; their discriminator was never
# released, audiocraft#243) and encodec_lm_24khz/48khz .th (the §3.3 LM): key maps and file detection.

def official_state_dict_to_ours(sd, cfg):
    """Rename the official checkpoint's keys (encoder.model.N..., quantizer.vq.layers.i._codebook.X,
    weight_g/weight_v) to this file's module names. Returns a new dict."""
    n, blocks = cfg.n_residual_layers, len(cfg.ratios)
    enc = {0: "conv_in", 1 + blocks * (n + 2): "lstm", 3 + blocks * (n + 2): "conv_out"}
    dec = {0: "conv_in", 1: "lstm", 3 + blocks * (n + 2): "conv_out"}
    for i in range(blocks):  # official Sequential order: [res units, ELU, down] / [ELU, up, res units]
        enc[1 + i * (n + 2) + n + 1] = f"blocks.{i}.down"
        dec[2 + i * (n + 2) + 1] = f"blocks.{i}.up"
        for j in range(n):
            enc[1 + i * (n + 2) + j] = f"blocks.{i}.res.{j}"
            dec[2 + i * (n + 2) + 2 + j] = f"blocks.{i}.res.{j}"
    out = {}
    for k, v in sd.items():
        m = re.match(r"(encoder|decoder)\.model\.(\d+)\.(.*)", k)
        if m:
            part, idx, rest = m.group(1), int(m.group(2)), m.group(3)
            rest = rest.replace("block.1.", "conv1.").replace("block.3.", "conv2.")
            rest = re.sub(r"(conv\.conv|convtr\.convtr)\.", "conv.", rest)
            rest = re.sub(r"(conv|convtr)\.norm\.", "norm.", rest)
            rest = rest.replace("weight_g", "parametrizations.weight.original0")
            rest = rest.replace("weight_v", "parametrizations.weight.original1")
            k = f"{part}.{(enc if part == 'encoder' else dec)[idx]}.{rest}"
        else:
            k = re.sub(r"quantizer\.vq\.layers\.(\d+)\._codebook\.", r"quantizer.layers.\1.", k)
        out[k] = v
    return out


def official_lm_state_dict_to_ours(sd):
    """The official encodec_lm_*.th (transformer.layers.i.self_attn.in_proj_weight, ...) -> CodeLM keys."""
    out = {}
    for k, v in sd.items():
        k = k.replace("transformer.", "", 1) if k.startswith("transformer.") else k
        k = k.replace("self_attn.in_proj_weight", "in_proj.weight")
        k = k.replace("self_attn.in_proj_bias", "in_proj.bias")
        out[k.replace("self_attn.out_proj.", "out_proj.")] = v
    return out


def _official_config(sd, cfg):
    """The fields of the released model an official state dict fixes, read from its tensors."""
    first = sd.get("encoder.model.0.conv.conv.weight_v", sd.get("encoder.model.0.conv.conv.weight"))
    embeds = [k for k in sd if re.fullmatch(r"quantizer\.vq\.layers\.\d+\._codebook\.embed", k)]
    if first is None or not embeds:
        raise SystemExit("error: this file has encoder.model.* keys but not the official EnCodec layout "
                         "(encoder.model.0.conv.conv.weight, quantizer.vq.layers.*._codebook.embed)")
    norm = "weight_norm" if "encoder.model.0.conv.conv.weight_g" in sd else "time_group_norm"
    preset = "24khz" if first.shape[1] == 1 and norm == "weight_norm" else "48khz"
    run_keys = ("bandwidths", "chunk", "overlap")  # how to run it: a value given on the command line stays
    fields = {k: v for k, v in dataclasses.asdict(Config()).items() if k in ARCH_KEYS + run_keys}
    fields.update({k: v for k, v in PRESETS[preset].items() if k in fields})
    lstm = sum(1 for k in sd if re.fullmatch(r"encoder\.model\.\d+\.lstm\.weight_ih_l\d+", k))
    fields.update(channels=first.shape[1], n_filters=first.shape[0], norm=norm, lstm_layers=lstm,
                  n_q=len(embeds), codebook_size=sd[embeds[0]].shape[0], dimension=sd[embeds[0]].shape[1])
    for k in ("disc_filters", "disc_n_ffts"):  # no discriminator in the released files: keep ours
        fields[k] = getattr(cfg, k)
    for k in run_keys:
        default = PRESETS.get(cfg.preset, {}).get(k, getattr(Config(), k))
        if common._norm(getattr(cfg, k)) != common._norm(default):
            fields[k] = getattr(cfg, k)
    return preset, fields


def load_official(state, sd):
    """common.init_from's hook for the authors' file (--init_from=encodec_24khz-d7cc33bc.th in training): the
    codec's weights; the discriminator starts fresh."""
    G = common.unwrap(state["G"])
    preset, fields = _official_config(sd, G.cfg)
    bad = [f"--{k} (file {v!r}, now {getattr(G.cfg, k)!r})" for k, v in fields.items()
           if k in ARCH_KEYS and common._norm(v) != common._norm(getattr(G.cfg, k))]
    if bad:
        raise SystemExit(f"error: the official file is the {preset} model and does not fit these flags: "
                         + "; ".join(bad) + f" — pass --preset={preset}")
    common.load_state_dict(G, official_state_dict_to_ours(sd, G.cfg), what="EnCodec (official weights)")


def official_codec(sd, cfg, path):
    """load_for_inference's authors' file: the model read from its tensors (the cfg fields set and logged)."""
    if not (isinstance(sd, dict) and any(k.startswith("encoder.model.") for k in sd)):
        raise SystemExit(f"error: {path} is neither a nanoaudio checkpoint nor an official EnCodec state "
                         "dict")
    preset, fields = _official_config(sd, cfg)
    for k, v in fields.items():
        setattr(cfg, k, v)
    common.log(f"official EnCodec weights ({path}): the {preset} model, " +
               ", ".join(f"{k}={v}" for k, v in fields.items() if k not in ("disc_filters", "disc_n_ffts")))
    model = EnCodec(cfg)
    common.load_state_dict(model, official_state_dict_to_ours(sd, cfg), what="EnCodec (official weights)")
    return model


def official_lm(lm, sd, path):
    """load_lm's authors' file: the official encodec_lm_*.th into CodeLM."""
    if not (isinstance(sd, dict) and any(k.startswith("transformer.layers.") for k in sd)):
        raise SystemExit(f"error: {path} is neither our lm.pt nor an official EnCodec LM state dict")
    common.load_state_dict(lm, official_lm_state_dict_to_ours(sd), what="EnCodec LM (official weights)")

# ----------------------------------------------------------------------------- main

MODES = ("train", "sample", "eval", "bench", "lm")  # lm: the entropy-coding LM's stage (§3.3)

if __name__ == "__main__":
    cfg = common.parse_config(Config, PRESETS, modes=MODES)
    {"train": train, "sample": sample, "eval": evaluate, "bench": bench, "lm": train_lm}[cfg.mode](cfg)
