"""
Moshi: a speech-text foundation model for real-time dialogue (Défossez, Mazaré, Orsini, Royer, Pérez, Jégou,
Grave, Zeghidour, 2024) — https://arxiv.org/abs/2410.00037

Part 1 (this file so far, --stage=codec): Mimi, the streaming audio codec Moshi speaks through (§3.3).
The idea: EnCodec's causal SEANet, with a causal Transformer (RoPE, LayerScale, 250-frame context) after the
encoder and before the decoder, and one more learned stride-2 conv so that 24 kHz audio becomes 12.5 latent frames
a second (1920 samples = 80 ms a frame, close to the rate of text tokens). A *split* RVQ quantizes each latent
twice in parallel: one semantic codebook, distilled towards a frozen self-supervised model (WavLM) with a cosine
loss so that its tokens carry the words, beside a residual stack of acoustic codebooks (Moshi uses 7); their
decoded outputs are summed. 8 codebooks x 11 bits x 12.5 Hz = 1.1 kbps. Quantization is applied to only half of
the training sequences (the other half passes the latent through unquantized), and the paper finds that training
with the adversarial and feature-matching losses alone (no reconstruction loss) sounds better although objective
metrics drop (here a flag, --recon_loss). Everything is causal, so the codec streams: encoding or decoding one
80 ms frame at a time gives exactly the offline result. Part 2 (issue 18: Helium text LM, RQ-Transformer,
inner monologue, full-duplex inference) will join as --stage=dialogue in the sections marked for it.

Simplified or changed here (honestly):
- Semantic teacher: --teacher=DIR reads WavLM features that `wavlm.py --mode=features` wrote (one DIR/<utt id>.npy
  of shape (frames, dim) at 50 Hz per clip, averaged 4:1 to Mimi's 12.5 Hz; non-causal, as the paper's teacher).
  Without it an in-file STAND-IN teacher is used and the log says so: utterance-normalised 80-bin log-mels at
  50 Hz, pooled the same way. It is neither self-supervised nor WavLM; it only lets the distillation run offline.
- Training hyper-parameters the card does not record are marked [recalled]/[inferred] in Config; the loss balancer
  of EnCodec is not used (a plain weighted sum); the discriminator is EnCodec's MS-STFT discriminator, no weight EMA.
- Quantization on half the examples: one draw per sequence for both quantizers (the official code draws one per
  quantizer); all codebooks k-means-initialise on the first batch (the official code one level per step); dead codes
  are checked every step (official: every 5).
- Convolutions start from a variance-preserving init (N(0, 1/fan_in), zero bias; encodec.py's finding), and the
  released weights are plain convolutions (the paper trained with weight norm; `norm: none` in the official config).
- The CPU `small` preset narrows everything (C=16, D=128, 2 transformer layers, 8 codebooks of 2048, 0.48 s crops,
  2 discriminator scales) and trains with the reconstruction losses on. It is far from the paper's 4M-step regime:
  after a few hundred CPU steps the output has the right spectral envelope (mel distance ~1.8) but no waveform
  match (SI-SNR far below 0 dB), and with ~100 frames a batch most of the 2048 entries of each codebook sit unused.

    python moshi.py                                          # train Mimi on the built-in speech corpus
    python moshi.py --preset=mimi --batch_size=16            # the paper's codec (79.3 M parameters)
    python moshi.py --init_from=resume                       # continue out/moshi/ckpt.pt
    python moshi.py --mode=sample --init_from=out/moshi/ckpt.pt   # or tokenizer-e351c8d8-checkpoint125.safetensors
    python moshi.py --mode=eval --init_from=out/moshi/ckpt.pt     # SI-SNR, mel distance, kbps, semantic probe (test)
    python moshi.py --mode=bench
    torchrun --standalone --nproc_per_node=8 moshi.py --preset=mimi
"""
import math
import os
import random
import re
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
    stage: str = "codec"               # codec (Mimi, part 1) | dialogue (the RQ-Transformer, part 2: not yet written)
    preset: str = "mimi"               # a key of PRESETS
    init_from: str = "scratch"         # scratch | resume | path (our ckpt.pt, or the official Mimi .safetensors)
    out_dir: str = "out/moshi"
    data_dir: str = ""                 # empty: the built-in speech corpus
    corpus_hours: float = 2.0          # size of the built-in corpus
    input: str = ""                    # --mode=sample: a wav to encode/decode instead of a held-out clip
    # SEANet encoder/decoder (§3.3; official loaders._seanet_kwargs)
    sample_rate: int = 24000           # 24 kHz mono
    channels: int = 1                  # audio channels
    n_filters: int = 64                # base width C; doubles at every downsampling
    dimension: int = 512               # latent dimension D (also the transformer width)
    ratios: tuple = (8, 6, 5, 4)       # decoder upsampling ratios; the encoder uses them reversed -> hop 960 (25 Hz)
    n_residual_layers: int = 1         # residual units per block
    compress: int = 2                  # residual branch width C/compress
    dilation_base: int = 2             # dilation of residual unit j is base**j
    kernel_size: int = 7               # first conv
    residual_kernel_size: int = 3      # residual unit conv
    last_kernel_size: int = 3          # last conv
    frame_rate: float = 12.5           # Hz after the extra stride-2 conv: 1920 samples a frame
    # Transformer bottlenecks (§3.3; official _transformer_kwargs)
    tr_layers: int = 8                 # layers in the encoder's and in the decoder's transformer
    tr_heads: int = 8                  # attention heads (not stored in a weight file: give it when loading another size)
    tr_ffn: int = 2048                 # GELU MLP width
    tr_context: int = 250              # frames a query may look back (10 s at 25 Hz)
    layer_scale: float = 0.01          # LayerScale init
    rope_max_period: float = 10000.0   # RoPE base
    # split RVQ (§3.3)
    n_q: int = 32                      # codebooks built: 1 semantic + n_q-1 acoustic (the checkpoint has 32)
    eval_n_q: int = 8                  # codebooks used at inference (Moshi's 8 = 1.1 kbps)
    q_dim: int = 256                   # codebook dimension (1x1 convs from / back to D)
    codebook_size: int = 2048          # entries per codebook (11 bits)
    ema_decay: float = 0.99            # EMA decay of the codebook statistics
    kmeans_iters: int = 50             # k-means iterations on the first batch
    dead_ratio: float = 0.1            # a code used less than dead_ratio x the uniform share is re-seeded
    quant_rate: float = 0.5            # fraction of training sequences that are quantized (the rest pass unquantized)
    q_dropout: bool = True             # train with a random number of acoustic codebooks, so any n_q decodes
    # semantic distillation (§3.3)
    teacher: str = ""                  # folder of WavLM features (wavlm.py --mode=features); empty: the in-file stand-in
    lambda_distill: float = 1.0        # weight of the cosine distillation loss [inferred: the card gives no value]
    # discriminator (EnCodec's MS-STFT discriminator)
    disc_filters: int = 32             # channels of every MS-STFTD conv
    disc_n_ffts: tuple = (2048, 1024, 512, 256, 128)  # STFT scales, hop = n_fft / 4
    # losses (§3.3: adversarial + feature matching; reconstruction optional, the paper's finding)
    recon_loss: bool = False           # add EnCodec's time L1 + multi-scale mel losses (the paper's best has none)
    lambda_adv: float = 1.0            # hinge adversarial loss [inferred]
    lambda_feat: float = 3.0           # relative feature matching [inferred: EnCodec's value]
    lambda_t: float = 0.1              # time-domain L1 (only with --recon_loss)
    lambda_f: float = 1.0              # multi-scale mel L1 + L2 (only with --recon_loss)
    lambda_commit: float = 1.0         # commitment loss (not in the balancer-free sum's gradient of the decoder)
    mel_scales: tuple = (5, 6, 7, 8, 9, 10, 11)  # mel-loss windows 2^i, hop 2^i / 4
    n_mels: int = 64                   # mel bins of the reconstruction loss
    # training [recalled: AdamW 8e-4, betas (0.5, 0.9), 12 s crops]
    segment: int = 288_000             # training crop in samples (12 s; a multiple of 1920)
    batch_size: int = 16
    lr: float = 8e-4
    betas: tuple = (0.5, 0.9)
    weight_decay: float = 0.0
    max_iters: int = 400_000
    log_interval: int = 50
    eval_interval: int = 2000          # evaluate on val and checkpoint
    eval_items: int = 8                # held-out clips in evaluate()
    eval_seconds: float = 4.0          # crop held-out clips to this length
    probe_items: int = 64              # train clips whose semantic codes fit the word probe
    bench_seconds: float = 10.0        # audio length for the encode/decode real-time factors
    bench_iters: int = 5               # timed repetitions in --mode=bench
    device: str = "auto"
    dtype: str = "auto"                # bf16 autocast on CUDA, fp32 elsewhere (quantizer, STFTs, losses stay fp32)
    compile: bool = True
    seed: int = 1337

    def validate(self):
        hop = int(np.prod(self.ratios))
        frame = self.sample_rate / self.frame_rate
        if self.stage != "codec":
            raise SystemExit(f"error: --stage={self.stage!r}: only --stage=codec (Mimi) is written so far "
                             "(the dialogue model is part 2, issue 18)")
        if frame != int(frame) or int(frame) % hop:
            raise SystemExit(f"error: --frame_rate={self.frame_rate} needs sample_rate/frame_rate to be a whole "
                             f"multiple of the SEANet hop {hop}")
        if self.segment % int(frame):
            raise SystemExit(f"error: --segment={self.segment} must be a multiple of {int(frame)} samples (one frame)")
        if not 2 <= self.n_q or not 1 <= self.eval_n_q <= self.n_q:
            raise SystemExit(f"error: need --n_q >= 2 and 1 <= --eval_n_q <= --n_q (got {self.n_q}, {self.eval_n_q})")
        if self.dimension % self.tr_heads or (self.dimension // self.tr_heads) % 2:
            raise SystemExit(f"error: --dimension={self.dimension} must split into --tr_heads={self.tr_heads} "
                             "heads of even size (RoPE rotates pairs)")
        if not 0.0 <= self.quant_rate <= 1.0:
            raise SystemExit(f"error: --quant_rate must be in [0, 1] (got {self.quant_rate})")
        if self.teacher and self.frame_rate * 4 != TEACHER_RATE:
            raise SystemExit(f"error: --teacher features are at {TEACHER_RATE} Hz: they need --frame_rate=12.5")
        if self.teacher and not os.path.isdir(self.teacher):
            raise SystemExit(f"error: --teacher={self.teacher!r} is not a folder (wavlm.py --mode=features writes one)")


PRESETS = {
    "mimi": dict(),                                             # the paper's codec: 79.3 M parameters, 32 codebooks
    "small": dict(n_filters=16, dimension=128, tr_layers=2, tr_heads=4, tr_ffn=512, n_q=8, q_dim=64,
                  disc_filters=8, disc_n_ffts=(512, 256), mel_scales=(6, 7, 8, 9, 10), recon_loss=True,
                  q_dropout=False, segment=11520, batch_size=8, lr=1e-3, max_iters=1000, log_interval=20, eval_interval=250,
                  eval_items=8, probe_items=64, bench_seconds=4.0, kmeans_iters=20),  # ~15 min on a CPU
    "tiny": dict(n_filters=4, dimension=16, tr_layers=1, tr_heads=2, tr_ffn=32, tr_context=50, n_q=4, eval_n_q=3,
                 q_dim=8, codebook_size=32, kmeans_iters=3, disc_filters=4, disc_n_ffts=(256,), mel_scales=(6, 7),
                 recon_loss=True, segment=5760, batch_size=2, max_iters=10, log_interval=1, eval_interval=1000,
                 eval_items=1, eval_seconds=0.96, probe_items=2, bench_seconds=0.96, bench_iters=1, corpus_hours=0.02),
}
# fields that shape the weights or the features: a checkpoint must agree on them
ARCH_KEYS = ("stage", "sample_rate", "channels", "n_filters", "dimension", "ratios", "n_residual_layers", "compress",
             "dilation_base", "kernel_size", "residual_kernel_size", "last_kernel_size", "frame_rate", "tr_layers",
             "tr_heads", "tr_ffn", "n_q", "q_dim", "codebook_size", "disc_filters", "disc_n_ffts", "teacher")

# ----------------------------------------------------------------------------- model
# Mimi (§3.3)

def _init_conv(conv):
    # Variance-preserving init (encodec.py's finding, not the paper's): N(0, 1/fan_in) and zero bias keep the
    # signal's scale through the stack, so an untrained encoder's latents already follow the audio and k-means
    # on the first batch finds real clusters. PyTorch's default shrinks the signal at every layer.
    fan_in = conv.weight.shape[1] * conv.kernel_size[0] / (conv.stride[0] if isinstance(conv, nn.ConvTranspose1d) else 1)
    nn.init.normal_(conv.weight, 0.0, fan_in ** -0.5)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


class CausalConv1d(nn.Module):
    """Conv1d padded with k_eff - stride zeros (or copies of the first input, "replicate") on the left only (§3.3:
    fully causal), so T samples (a multiple of the stride) give T / stride frames and output t sees inputs
    <= t*stride + stride - 1. stream() keeps the last k_eff - stride inputs as explicit history, starting from the
    same padding as the offline pass."""

    def __init__(self, cin, cout, kernel, stride=1, dilation=1, groups=1, bias=True, pad_mode="constant"):
        super().__init__()
        self.conv = _init_conv(nn.Conv1d(cin, cout, kernel, stride, dilation=dilation, groups=groups, bias=bias))
        self.stride, self.pad, self.pad_mode = stride, (kernel - 1) * dilation + 1 - stride, pad_mode

    def _left(self, x):  # the left padding of a sequence that starts with x
        return x[..., :1].expand(*x.shape[:-1], self.pad) if self.pad_mode == "replicate" else \
            x.new_zeros(*x.shape[:-1], self.pad)

    def forward(self, x):  # (B, Cin, T) -> (B, Cout, T / stride)
        return self.conv(torch.cat([self._left(x), x], -1))

    def stream(self, x, state):
        buf = state.get(self)
        buf = self._left(x) if buf is None else buf
        x = torch.cat([buf, x], -1)
        state[self] = x[..., x.shape[-1] - self.pad:]
        return self.conv(x)


class CausalConvTranspose1d(nn.Module):
    """Transposed conv (kernel 2S, stride S) trimming its k - S overhang on the right (causal). stream() keeps the
    overhang of each chunk (bias included) and adds it to the head of the next, minus the bias counted twice."""

    def __init__(self, cin, cout, kernel, stride, groups=1, bias=True):
        super().__init__()
        self.conv = _init_conv(nn.ConvTranspose1d(cin, cout, kernel, stride, groups=groups, bias=bias))
        self.trim = kernel - stride

    def forward(self, x):  # (B, Cin, T) -> (B, Cout, T * stride)
        y = self.conv(x)  # (B, Cout, (T-1)*S + k)
        return y[..., :y.shape[-1] - self.trim]

    def stream(self, x, state):
        y = self.conv(x)
        tail = state.get(self)
        if tail is not None:
            bias = 0 if self.conv.bias is None else self.conv.bias[:, None]
            y = torch.cat([y[..., :self.trim] + tail - bias, y[..., self.trim:]], -1)
        state[self] = y[..., y.shape[-1] - self.trim:]
        return y[..., :y.shape[-1] - self.trim]


class ResidualUnit(nn.Module):
    """SEANet residual unit: x + conv k1(ELU(conv k3 (C -> C/compress, dilated)(ELU(x)))). Mimi keeps the identity
    skip (`true_skip`), where encodec.py's 24 kHz model has a 1x1 conv shortcut."""

    def __init__(self, dim, dilation, cfg):
        super().__init__()
        hidden = dim // cfg.compress
        self.conv1 = CausalConv1d(dim, hidden, cfg.residual_kernel_size, dilation=dilation)
        self.conv2 = CausalConv1d(hidden, dim, 1)

    def forward(self, x):
        return x + self.conv2(F.elu(self.conv1(F.elu(x))))

    def stream(self, x, state):
        return x + self.conv2.stream(F.elu(self.conv1.stream(F.elu(x), state)), state)


class SEANetEncoder(nn.Module):
    """conv k7 -> 4 x (residual unit, ELU, strided conv k=2S doubling the channels) -> ELU, conv k3 -> D.
    (B, 1, T) -> (B, D, T/960). Unlike EnCodec there is no LSTM: the Transformer below takes its place."""

    def __init__(self, cfg):
        super().__init__()
        C = cfg.n_filters
        self.conv_in = CausalConv1d(cfg.channels, C, cfg.kernel_size)
        self.blocks = nn.ModuleList()
        for i, s in enumerate(reversed(cfg.ratios)):  # strides 4, 5, 6, 8
            blk = nn.Module()
            blk.res = nn.ModuleList(ResidualUnit(C * 2 ** i, cfg.dilation_base ** j, cfg)
                                    for j in range(cfg.n_residual_layers))
            blk.down = CausalConv1d(C * 2 ** i, C * 2 ** (i + 1), 2 * s, s)
            self.blocks.append(blk)
        self.conv_out = CausalConv1d(C * 2 ** len(cfg.ratios), cfg.dimension, cfg.last_kernel_size)

    def forward(self, x):
        x = self.conv_in(x)
        for b in self.blocks:
            for r in b.res:
                x = r(x)
            x = b.down(F.elu(x))
        return self.conv_out(F.elu(x))

    def stream(self, x, state):
        x = self.conv_in.stream(x, state)
        for b in self.blocks:
            for r in b.res:
                x = r.stream(x, state)
            x = b.down.stream(F.elu(x), state)
        return self.conv_out.stream(F.elu(x), state)


class SEANetDecoder(nn.Module):
    """The mirror: conv k7 -> 4 x (ELU, transposed conv k=2S halving the channels, residual unit) -> ELU, conv k3.
    No final tanh (the official config has none)."""

    def __init__(self, cfg):
        super().__init__()
        C, n = cfg.n_filters, len(cfg.ratios)
        self.conv_in = CausalConv1d(cfg.dimension, C * 2 ** n, cfg.kernel_size)
        self.blocks = nn.ModuleList()
        for i, s in enumerate(cfg.ratios):  # strides 8, 6, 5, 4
            blk, c = nn.Module(), C * 2 ** (n - i)
            blk.up = CausalConvTranspose1d(c, c // 2, 2 * s, s)
            blk.res = nn.ModuleList(ResidualUnit(c // 2, cfg.dilation_base ** j, cfg) for j in range(cfg.n_residual_layers))
            self.blocks.append(blk)
        self.conv_out = CausalConv1d(C, cfg.channels, cfg.last_kernel_size)

    def forward(self, z):
        x = self.conv_in(z)
        for b in self.blocks:
            x = b.up(F.elu(x))
            for r in b.res:
                x = r(x)
        return self.conv_out(F.elu(x))

    def stream(self, z, state):
        x = self.conv_in.stream(z, state)
        for b in self.blocks:
            x = b.up.stream(F.elu(x), state)
            for r in b.res:
                x = r.stream(x, state)
        return self.conv_out.stream(F.elu(x), state)


def apply_rope(x, pos, max_period):
    """Rotary position embedding (Su et al.), pairs INTERLEAVED as Moshi's code: channels (2i, 2i+1) of each head are
    rotated by pos * max_period^(-2i/d). x: (B, H, T, d), pos: (T,) float."""
    d = x.shape[-1]
    freqs = torch.exp(torch.arange(d // 2, device=x.device, dtype=torch.float32) * (-math.log(max_period) * 2 / d))
    ang = pos.float()[:, None] * freqs  # (T, d/2)
    cos, sin = ang.cos(), ang.sin()
    xr, xi = x.float().view(*x.shape[:-1], d // 2, 2).unbind(-1)  # (B, H, T, d/2) each: the real / imaginary halves of a pair
    out = torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], -1)  # (B, H, T, d/2, 2)
    return out.view(x.shape).to(x.dtype)


class TransformerLayer(nn.Module):
    """Pre-norm layer (§3.3): x += ls1 * Attn(LN(x)); x += ls2 * MLP(LN(x)). Causal self-attention over at most
    `context` past frames, RoPE on queries and keys, no biases, GELU MLP; LayerScale (init 0.01) starts each residual
    branch near zero so the bottleneck begins as an identity."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.dimension
        self.heads, self.context, self.max_period = cfg.tr_heads, cfg.tr_context, cfg.rope_max_period
        self.norm1, self.norm2 = nn.LayerNorm(D, eps=1e-5), nn.LayerNorm(D, eps=1e-5)
        self.in_proj = nn.Linear(D, 3 * D, bias=False)  # fused q, k, v
        self.out_proj = nn.Linear(D, D, bias=False)
        self.linear1, self.linear2 = nn.Linear(D, cfg.tr_ffn, bias=False), nn.Linear(cfg.tr_ffn, D, bias=False)
        self.layer_scale_1 = nn.Parameter(torch.full((D,), cfg.layer_scale))
        self.layer_scale_2 = nn.Parameter(torch.full((D,), cfg.layer_scale))

    def attention(self, x, past, offset):
        """x: (B, T, D) new frames at positions offset..offset+T-1; past: cached (k, v) of earlier frames or None."""
        B, T, D = x.shape
        q, k, v = self.in_proj(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, d)
        pos = torch.arange(offset, offset + T, device=x.device)
        q, k = apply_rope(q, pos, self.max_period), apply_rope(k, pos, self.max_period)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        kpos = torch.arange(offset + T - k.shape[2], offset + T, device=x.device)
        delta = pos[:, None] - kpos[None]  # (T, S): how far back each key is
        mask = (delta >= 0) & (delta < self.context)  # causal, and at most `context` frames (itself included)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, d)
        keep = self.context - 1  # what the next frame can still see
        return self.out_proj(a.transpose(1, 2).reshape(B, T, D)), (k[:, :, -keep:], v[:, :, -keep:])

    def forward(self, x, past=None, offset=0):
        a, cache = self.attention(self.norm1(x), past, offset)
        x = x + self.layer_scale_1 * a
        x = x + self.layer_scale_2 * self.linear2(F.gelu(self.linear1(self.norm2(x))))
        return x, cache


class Transformer(nn.Module):
    """The bottleneck Transformer, on (B, D, T) latents at 25 Hz. stream() keeps an explicit KV cache per layer."""

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.tr_layers))

    def forward(self, z):  # (B, D, T) -> (B, D, T)
        x = z.transpose(1, 2)  # (B, T, D)
        for layer in self.layers:
            x = layer(x)[0]
        return x.transpose(1, 2)

    def stream(self, z, state):
        x, offset = z.transpose(1, 2), state.get(self, 0)
        for layer in self.layers:
            x, state[layer] = layer(x, state.get(layer), offset)
        state[self] = offset + x.shape[1]
        return x.transpose(1, 2)


def kmeans(x, k, iters):
    """Lloyd's algorithm on the first batch (the codebook init); empty clusters are re-drawn from the data."""
    means = _sample_rows(x, k)
    counts = torch.zeros(k, device=x.device)
    for _ in range(iters):
        assign = torch.cdist(x[None], means[None])[0].argmin(-1)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(means).index_add_(0, assign, x)
        means = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], _sample_rows(x, k))
    return means, counts


def _sample_rows(x, n):
    idx = torch.randperm(x.shape[0], device=x.device)[:n] if x.shape[0] >= n else \
        torch.randint(0, x.shape[0], (n,), device=x.device)
    return x[idx]


def _distributed():
    return dist.is_available() and dist.is_initialized()


class Codebook(nn.Module):
    """One VQ level: 2048 entries, nearest neighbour in Euclidean distance, learned by EMA, not by gradients.
    The buffers are the official ones: codebook = embedding_sum / usage (so both can decay together)."""

    def __init__(self, cfg):
        super().__init__()
        K, d = cfg.codebook_size, cfg.q_dim
        self.decay, self.kmeans_iters, self.dead_ratio, self.eps = cfg.ema_decay, cfg.kmeans_iters, cfg.dead_ratio, 1e-5
        self.register_buffer("initialized", torch.zeros(1))
        self.register_buffer("cluster_usage", torch.ones(K))        # EMA of how often each entry is picked
        self.register_buffer("embedding_sum", torch.zeros(K, d))    # EMA of the sum of the vectors it was picked for

    @property
    def embedding(self):  # (K, d)
        return self.embedding_sum / self.cluster_usage.clamp(min=self.eps)[:, None]

    def encode(self, x):  # (N, d) -> (N,)
        return torch.cdist(x[None], self.embedding[None])[0].argmin(-1)

    def decode(self, codes):  # (N,) -> (N, d)
        return F.embedding(codes, self.embedding)

    def forward(self, x):  # training: (N, d) fp32 -> quantized (N, d), codes (N,); updates the EMA statistics
        if not self.initialized:
            self._kmeans_init(x)
        codes = self.encode(x)
        q = self.decode(codes)
        self._dead_codes(x)
        counts = torch.bincount(codes, minlength=self.cluster_usage.shape[0]).float()
        sums = torch.zeros_like(self.embedding_sum).index_add_(0, codes, x)
        if _distributed():  # the global batch's statistics (mean over ranks, as the official code)
            for t in (counts, sums):
                dist.all_reduce(t)
                t /= dist.get_world_size()
        self.cluster_usage.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embedding_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        return q, codes

    @torch.no_grad()
    def _kmeans_init(self, x):
        means, counts = kmeans(x, self.cluster_usage.shape[0], self.kmeans_iters)
        self.embedding_sum.copy_(means * counts[:, None])
        self.cluster_usage.copy_(counts)  # entries k-means left empty get usage 0 and are re-seeded at once
        self.initialized.fill_(1)
        self._sync()

    @torch.no_grad()
    def _dead_codes(self, x):
        # an entry used less than dead_ratio x the uniform share is re-seeded with a vector of this batch, with the
        # uniform share as its new usage, so that it is not judged dead again before it had a chance (official ratios)
        share = self.cluster_usage.sum() / self.cluster_usage.shape[0]
        dead = self.cluster_usage < self.dead_ratio * share
        if dead.any():
            new = _sample_rows(x, self.cluster_usage.shape[0])
            self.embedding_sum[dead] = share * new[dead]
            self.cluster_usage[dead] = share
            self._sync()

    def _sync(self):
        if _distributed():  # rank 0's random choices win
            for b in self.buffers():
                dist.broadcast(b, 0)


class RVQ(nn.Module):
    """Residual VQ behind its own 1x1 projections D -> q_dim -> D: level i quantizes what levels < i left."""

    def __init__(self, n_q, cfg):
        super().__init__()
        self.input_proj = nn.Conv1d(cfg.dimension, cfg.q_dim, 1, bias=False)
        self.output_proj = nn.Conv1d(cfg.q_dim, cfg.dimension, 1, bias=False)
        self.codebooks = nn.ModuleList(Codebook(cfg) for _ in range(n_q))

    def forward(self, z, n_q, keep):
        """Training. z: (B, D, F); keep: (B,) bool, True = quantize this sequence (else pass it through).
        -> output (B, D, F), codes (B, n_q, F), commitment loss."""
        x = self.input_proj(z)  # (B, d, F)
        B, d, Fr = x.shape
        with torch.autocast(x.device.type, enabled=False):  # codebook statistics stay fp32
            flat = x.float().transpose(1, 2).reshape(B * Fr, d)  # (B*F, d)
            residual, out, codes, commit = flat, torch.zeros_like(flat), [], 0.0
            for cb in self.codebooks[:n_q]:
                q, c = cb(residual.detach())
                commit = commit + F.mse_loss(residual, q.detach())  # pulls the encoder towards its codes
                residual = residual - q.detach()
                out, codes = out + q, codes + [c]
            out = flat + (out - flat).detach()  # straight-through: the decoder's gradient reaches the encoder
            out = out.view(B, Fr, d).transpose(1, 2)  # (B, d, F)
            out = torch.where(keep[:, None, None], out, x.float())  # §3.3: unquantized for the other sequences
        codes = torch.stack(codes, 1).view(B, Fr, n_q).transpose(1, 2)  # (B, n_q, F)
        return self.output_proj(out.to(z.dtype)), codes, commit / n_q

    @torch.no_grad()
    def encode(self, z, n_q):  # (B, D, F) -> (B, n_q, F)
        x = self.input_proj(z).float()
        B, d, Fr = x.shape
        residual, codes = x.transpose(1, 2).reshape(B * Fr, d), []
        for cb in self.codebooks[:n_q]:
            c = cb.encode(residual)
            residual = residual - cb.decode(c)
            codes.append(c)
        return torch.stack(codes, 1).view(B, Fr, n_q).transpose(1, 2)

    def decode(self, codes):  # (B, n_q, F) -> (B, D, F)
        q = sum(cb.decode(codes[:, i]) for i, cb in enumerate(self.codebooks[:codes.shape[1]]))  # (B, F, d)
        return self.output_proj(q.transpose(1, 2))


class SplitRVQ(nn.Module):
    """§3.3, Fig. 2: a semantic VQ (1 codebook) and an acoustic RVQ (n_q - 1) quantize the SAME latent in parallel
    (the acoustic stack does not see the semantic residual), and their decoded outputs are summed. Keeping them apart
    lets the semantic codebook follow the distillation target without costing the acoustic levels their fidelity."""

    def __init__(self, cfg):
        super().__init__()
        self.semantic = RVQ(1, cfg)
        self.acoustic = RVQ(cfg.n_q - 1, cfg)

    def forward(self, z, n_q, keep):  # -> output (B, D, F), codes (B, n_q, F), commitment, semantic output (B, D, F)
        s, s_codes, s_commit = self.semantic(z, 1, keep)
        a, a_codes, a_commit = self.acoustic(z, n_q - 1, keep)
        commit = (s_commit + (n_q - 1) * a_commit) / n_q  # mean over the levels used
        return s + a, torch.cat([s_codes, a_codes], 1), commit, s

    def encode(self, z, n_q):
        codes = self.semantic.encode(z, 1)
        return torch.cat([codes, self.acoustic.encode(z, n_q - 1)], 1) if n_q > 1 else codes

    def decode(self, codes):
        out = self.semantic.decode(codes[:, :1])
        return out + self.acoustic.decode(codes[:, 1:]) if codes.shape[1] > 1 else out


class Mimi(nn.Module):
    """Audio (B, 1, T) -> SEANet (25 Hz) -> Transformer -> stride-2 conv (12.5 Hz) -> split RVQ -> depthwise
    transposed conv (25 Hz) -> Transformer -> SEANet decoder -> audio (§3.3, Fig. 2)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D, hop = cfg.dimension, int(np.prod(cfg.ratios))
        self.frame_size = int(cfg.sample_rate / cfg.frame_rate)  # 1920 samples = 80 ms
        stride = self.frame_size // hop  # 2: 25 Hz -> 12.5 Hz
        self.encoder, self.encoder_transformer = SEANetEncoder(cfg), Transformer(cfg)
        # learned, kernel 4, its left edge padded by repeating the first latent (the official "conv" resampler)
        self.downsample = CausalConv1d(D, D, 2 * stride, stride, bias=False, pad_mode="replicate")
        self.quantizer = SplitRVQ(cfg)
        # depthwise (groups = D: weight (D, 1, 4)); the official code keeps this `upsample_channel_wise_bug`
        self.upsample = CausalConvTranspose1d(D, D, 2 * stride, stride, groups=D, bias=False)
        self.decoder_transformer, self.decoder = Transformer(cfg), SEANetDecoder(cfg)
        self.bits = int(math.log2(cfg.codebook_size))

    def kbps(self, n_q):  # 12.5 Hz x n_q x 11 bits: 1.1 kbps at n_q = 8
        return self.cfg.frame_rate * n_q * self.bits / 1000

    def _pad(self, x):  # right-pad to whole frames (the official encode does the same)
        return F.pad(x, (0, -x.shape[-1] % self.frame_size))

    def latent(self, x):  # (B, 1, T) -> unquantized latents (B, D, ceil(T / 1920))
        return self.downsample(self.encoder_transformer(self.encoder(self._pad(x))))

    def decode_latent(self, q):  # (B, D, F) -> (B, 1, F * 1920)
        return self.decoder(self.decoder_transformer(self.upsample(q)))

    def forward(self, x, n_q, keep):
        """Training: -> reconstruction (B, 1, T), codes, commitment loss, semantic VQ output (B, D, F)."""
        q, codes, commit, sem = self.quantizer(self.latent(x), n_q, keep)
        return self.decode_latent(q)[..., :x.shape[-1]], codes, commit, sem

    @torch.no_grad()
    def encode(self, x, n_q):  # (B, 1, T) -> codes (B, n_q, ceil(T / 1920))
        return self.quantizer.encode(self.latent(x), n_q)

    @torch.no_grad()
    def decode(self, codes):  # (B, n_q, F) -> (B, 1, F * 1920)
        return self.decode_latent(self.quantizer.decode(codes))

    @torch.no_grad()
    def encode_stream(self, x, state, n_q):
        """Streaming: a chunk of whole frames (B, 1, k * 1920) -> its k frames of codes; `state` carries every conv's
        history and every layer's KV cache. One 80 ms frame in, 8 codes out, equal to the offline encode."""
        if x.shape[-1] % self.frame_size:
            raise ValueError(f"streaming input must be whole frames of {self.frame_size} samples, got {x.shape[-1]}")
        z = self.encoder_transformer.stream(self.encoder.stream(x, state), state)
        return self.quantizer.encode(self.downsample.stream(z, state), n_q)

    @torch.no_grad()
    def decode_stream(self, codes, state):  # (B, n_q, k) -> (B, 1, k * 1920), equal to the offline decode
        z = self.upsample.stream(self.quantizer.decode(codes), state)
        return self.decoder.stream(self.decoder_transformer.stream(z, state), state)


class STFTDiscriminator(nn.Module):
    """One scale of EnCodec's MS-STFT discriminator: 2D convs over the real and imaginary STFT parts laid out
    (B, 2, frames, freq); strides halve the frequency axis, dilations grow along time."""

    def __init__(self, n_fft, cfg):
        super().__init__()
        f, wn = cfg.disc_filters, nn.utils.parametrizations.weight_norm
        self.n_fft = n_fft
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.convs = nn.ModuleList([wn(nn.Conv2d(2 * cfg.channels, f, (3, 9), padding=(1, 4)))])
        for d in (1, 2, 4):
            self.convs.append(wn(nn.Conv2d(f, f, (3, 9), stride=(1, 2), dilation=(d, 1), padding=(d, 4))))
        self.convs.append(wn(nn.Conv2d(f, f, (3, 3), padding=(1, 1))))
        self.conv_post = wn(nn.Conv2d(f, 1, (3, 3), padding=(1, 1)))

    def forward(self, x):  # (B, C, T) -> logits, feature maps
        B, C, T = x.shape
        with torch.autocast(x.device.type, enabled=False):
            spec = torch.stft(x.float().reshape(B * C, T), self.n_fft, self.n_fft // 4, window=self.window,
                              center=False, return_complex=True) / self.window.pow(2).sum().sqrt()  # (B*C, F, frames)
        spec = spec.view(B, C, *spec.shape[1:])  # (B, C, F, frames)
        z = torch.cat([spec.real, spec.imag], 1).transpose(2, 3)  # (B, 2C, frames, F)
        fmap = []
        for conv in self.convs:
            z = F.leaky_relu(conv(z), 0.2)
            fmap.append(z)
        return self.conv_post(z), fmap


class Discriminator(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.discs = nn.ModuleList(STFTDiscriminator(n, cfg) for n in cfg.disc_n_ffts)

    def forward(self, x):
        outs = [d(x) for d in self.discs]
        return [o[0] for o in outs], [o[1] for o in outs]


# --- the official weights

def read_official(path):
    """The authors' Mimi weights: tokenizer-*.safetensors, or a torch file {"model": state_dict}; None if not one."""
    if path.endswith((".safetensors", ".sft")):
        return common.read_safetensors(path)
    ckpt = common.load_checkpoint(path)
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    return sd if isinstance(sd, dict) and any(str(k).startswith("encoder.model.") for k in sd) else None


def official_config(cfg, sd):
    """Set the size fields of cfg from the tensors of an official state dict (heads are not stored: --tr_heads)."""
    enc = sorted({int(m.group(1)) for k in sd for m in [re.match(r"encoder\.model\.(\d+)\.conv", k)] if m})
    strided = [i for i in enc if i > 0 and f"encoder.model.{i}.conv.conv.weight" in sd and i != enc[-1]]
    w0, wl = sd["encoder.model.0.conv.conv.weight"], sd[f"encoder.model.{enc[-1]}.conv.conv.weight"]
    cfg.channels, cfg.n_filters, cfg.kernel_size = w0.shape[1], w0.shape[0], w0.shape[2]
    cfg.dimension, cfg.last_kernel_size = wl.shape[0], wl.shape[2]
    cfg.ratios = tuple(sd[f"encoder.model.{i}.conv.conv.weight"].shape[2] // 2 for i in reversed(strided))
    res = [k for k in sd if re.match(r"encoder\.model\.1\.block\.1\.conv\.conv\.weight", k)]
    cfg.residual_kernel_size = sd[res[0]].shape[2]
    cfg.compress = w0.shape[0] // sd[res[0]].shape[0]
    cfg.n_residual_layers = (strided[0] - 1) - 1 if len(strided) else 1  # [conv_in, res..., ELU, down]
    layers = {int(m.group(1)) for k in sd for m in [re.match(r"encoder_transformer\.transformer\.layers\.(\d+)\.", k)] if m}
    cfg.tr_layers = len(layers)
    cfg.tr_ffn = sd["encoder_transformer.transformer.layers.0.linear1.weight"].shape[0]
    cfg.q_dim, cfg.codebook_size = sd["quantizer.rvq_first.input_proj.weight"].shape[0], \
        sd["quantizer.rvq_first.vq.layers.0._codebook.cluster_usage"].shape[0]
    cfg.n_q = 1 + len({k.split(".")[4] for k in sd if k.startswith("quantizer.rvq_rest.vq.layers.")})
    stride = sd["downsample.conv.conv.conv.weight"].shape[2] // 2
    cfg.frame_rate = cfg.sample_rate / (int(np.prod(cfg.ratios)) * stride)
    cfg.eval_n_q = min(cfg.eval_n_q, cfg.n_q)
    if cfg.dimension >= 64:  # heads are not stored in the file: the official ones are 64 wide (512 / 8)
        cfg.tr_heads = cfg.dimension // 64
    common.log(f"official Mimi weights: n_filters {cfg.n_filters}, dimension {cfg.dimension}, ratios {cfg.ratios}, "
               f"{cfg.tr_layers} transformer layers (ffn {cfg.tr_ffn}, {cfg.tr_heads} heads of 64, not stored), "
               f"{cfg.n_q} codebooks of {cfg.codebook_size} x {cfg.q_dim}, {cfg.frame_rate:g} Hz")
    cfg.validate()
    return cfg


def official_state_dict_to_ours(sd, cfg):
    """Official key names (moshi/models/compression.py's MimiModel) -> this file's. The official Sequential indices:
    encoder [conv_in, (res x n, ELU, down) x 4, ELU, conv_out], decoder [conv_in, (ELU, up, res x n) x 4, ELU, conv_out]."""
    n, nb = cfg.n_residual_layers, len(cfg.ratios)
    enc, dec = {0: "conv_in", 2 + nb * (n + 2): "conv_out"}, {0: "conv_in", 2 + nb * (n + 2): "conv_out"}
    for i in range(nb):
        enc[1 + i * (n + 2) + n + 1] = f"blocks.{i}.down"
        dec[1 + i * (n + 2) + 1] = f"blocks.{i}.up"
        for j in range(n):
            enc[1 + i * (n + 2) + j] = f"blocks.{i}.res.{j}"
            dec[1 + i * (n + 2) + 2 + j] = f"blocks.{i}.res.{j}"
    out = {}
    for k, v in sd.items():
        m = re.match(r"(encoder|decoder)\.model\.(\d+)\.(.*)", k)
        if m:
            part, idx, rest = m.group(1), int(m.group(2)), m.group(3)
            rest = rest.replace("block.1.conv.conv.", "conv1.conv.").replace("block.3.conv.conv.", "conv2.conv.")
            rest = re.sub(r"^(conv\.conv|convtr\.convtr)\.", "conv.", rest)
            k = f"{part}.{(enc if part == 'encoder' else dec)[idx]}.{rest}"
        elif "_transformer.transformer.layers." in k:
            k = k.replace(".transformer.layers.", ".layers.")
            for a, b in (("self_attn.in_projs.0.weight", "in_proj.weight"), ("self_attn.in_proj_weight", "in_proj.weight"),
                         ("self_attn.out_projs.0.weight", "out_proj.weight"), ("self_attn.out_proj.weight", "out_proj.weight"),
                         ("layer_scale_1.scale", "layer_scale_1"), ("layer_scale_2.scale", "layer_scale_2")):
                k = k.replace(a, b)
        elif k.startswith("quantizer."):
            k = k.replace("rvq_first", "semantic").replace("rvq_rest", "acoustic")
            k = re.sub(r"vq\.layers\.(\d+)\._codebook\._initialized", r"codebooks.\1.initialized", k)
            k = re.sub(r"vq\.layers\.(\d+)\._codebook\.", r"codebooks.\1.", k)
        else:
            k = k.replace("downsample.conv.conv.conv.", "downsample.conv.").replace("upsample.convtr.convtr.convtr.", "upsample.conv.")
        out[k] = v.float() if torch.is_floating_point(v) else v
    return out

# (part 2, issue 18: the Helium text LM and the RQ-Transformer go here)

# ----------------------------------------------------------------------------- loss

def generator_adv_loss(logits_fake):  # hinge: 1/K sum_k mean relu(1 - D_k(x_hat))
    return sum(F.relu(1 - l.float()).mean() for l in logits_fake) / len(logits_fake)


def feature_loss(fmap_real, fmap_fake):  # relative feature matching: mean |D(x) - D(x_hat)| / mean |D(x)|
    terms = [(r.float() - f.float()).abs().mean() / r.float().abs().mean().clamp(min=1e-8)
             for fr, ff in zip(fmap_real, fmap_fake) for r, f in zip(fr, ff)]
    return sum(terms) / len(terms)


def discriminator_loss(logits_real, logits_fake):  # hinge: relu(1 - D(x)) + relu(1 + D(x_hat))
    return sum(F.relu(1 - r.float()).mean() + F.relu(1 + f.float()).mean()
               for r, f in zip(logits_real, logits_fake)) / len(logits_real)


def reconstruction_losses(x, x_hat, cfg):
    """EnCodec's l_t (time L1) and l_f (mean over scales 2^i of L1 + L2 between 64-bin linear mels)."""
    l_t = F.l1_loss(x_hat.float(), x.float())
    l_f = 0.0
    for i in cfg.mel_scales:
        kw = dict(sr=cfg.sample_rate, n_fft=2 ** i, hop=2 ** i // 4, n_mels=cfg.n_mels, log=None)
        a, b = common.mel_spectrogram(x, **kw), common.mel_spectrogram(x_hat, **kw)
        l_f = l_f + F.l1_loss(b, a) + F.mse_loss(b, a)
    return l_t, l_f / len(cfg.mel_scales)


def distill_loss(pred, target):
    """§3.3: cosine distance between the projected semantic VQ output and the teacher's features, per frame.
    pred, target: (B, dim, F); 0 when every frame points the same way."""
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=1)).mean()

# ----------------------------------------------------------------------------- data

TEACHER_RATE = 50  # Hz: WavLM's frame rate (hop 320 at 16 kHz): 4 teacher frames per 80 ms Mimi frame


def standin_teacher(x, cfg):
    """The STAND-IN for WavLM (no WavLM features given): 80-bin log-mels at 50 Hz, mean/variance-normalised over the
    clip (removing the speaker's and channel's average), pooled 4:1 to Mimi's frames. x: (B, 1, T) -> (B, 80, F).
    Non-causal like the paper's teacher; not self-supervised, so what it distils is spectral shape, not WavLM."""
    hop = int(cfg.sample_rate / cfg.frame_rate) // 4  # 4 frames per Mimi frame, as WavLM's 50 Hz: hop 480 at 24 kHz
    mel = common.mel_spectrogram(x[:, 0], cfg.sample_rate, n_fft=4 * hop, hop=hop, n_mels=80)  # (B, 80, T/hop)
    mel = (mel - mel.mean(-1, keepdim=True)) / (mel.std(-1, keepdim=True) + 1e-5)
    return pool_to_frames(mel, cfg)


def pool_to_frames(feats, cfg):
    """(B, dim, n at 50 Hz) -> (B, dim, n / 4 at 12.5 Hz): the mean of the 4 teacher frames inside each Mimi frame."""
    n = feats.shape[-1] // 4 * 4
    return feats[..., :n].view(*feats.shape[:2], -1, 4).mean(-1)  # (B, dim, n/4, 4) -> (B, dim, n/4)


def load_teacher(cfg, utts):
    """WavLM features of each clip, from --teacher=DIR: DIR/<utt id>.npy, (frames, dim) at 50 Hz. None: stand-in."""
    if not cfg.teacher:
        return None
    feats = []
    for u in utts:
        p = os.path.join(cfg.teacher, u.id + ".npy")
        if not os.path.exists(p):
            raise SystemExit(f"error: --teacher={cfg.teacher!r} has no features for clip {u.id!r} ({p}); run "
                             "`python wavlm.py --mode=features` on the same corpus")
        feats.append(np.load(p, mmap_mode="r"))
    return feats


class FrameSampler(common.SegmentSampler):
    """common.SegmentSampler with crops starting on frame boundaries, remembering where each crop began, so the
    teacher features of the same stretch of audio can be cut out beside it."""

    def next(self):
        idx = self.rng.choice(len(self.wavs), size=self.batch_size, p=self.p)
        out, starts = [], []
        for i in idx:
            w = self.wavs[i]
            start = int(self.rng.integers(0, max(0, w.shape[-1] - self.seg_len) // self.align + 1)) * self.align
            seg = np.asarray(w[..., start:start + self.seg_len])
            seg = np.pad(seg, [(0, 0)] * (seg.ndim - 1) + [(0, self.seg_len - seg.shape[-1])])
            out.append(seg.astype(np.float32) / 32768.0 if seg.dtype == np.int16 else seg.astype(np.float32))
            starts.append(start)
        self.last = (idx, starts)
        return torch.from_numpy(np.stack(out)), torch.from_numpy(idx.astype(np.int64))


def get_batch(sampler, cfg, rt, teacher=None):
    """(B, 1, segment) waveforms and their teacher features (B, dim, segment / 1920) at Mimi's frame rate."""
    x = sampler.next()[0].view(cfg.batch_size, 1, cfg.segment)
    if teacher is None:
        t = standin_teacher(x, cfg)
    else:
        n = cfg.segment * TEACHER_RATE // cfg.sample_rate
        rows = []
        for i, s in zip(*sampler.last):
            f = np.asarray(teacher[i][s * TEACHER_RATE // cfg.sample_rate:][:n], dtype=np.float32)
            rows.append(np.pad(f, ((0, n - f.shape[0]), (0, 0))).T)  # (dim, n)
        t = pool_to_frames(torch.from_numpy(np.stack(rows)), cfg)
    return x.to(rt.device), t.to(rt.device)


def speech(cfg, split):
    return common.load_corpus(cfg, split, cfg.sample_rate, kind="speech")

# ----------------------------------------------------------------------------- train

def _step_rng(cfg, step):
    # per-step choices every rank must agree on (how many acoustic codebooks): a shared, resumable RNG
    return random.Random(cfg.seed * 1_000_003 + step)


class StepCounter:
    """The step number inside `state`, so train_step's per-step choices survive a resume (it has a state_dict)."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, sd):
        self.step = sd["step"]


def teacher_dim(cfg):
    if not cfg.teacher:
        return 80
    first = sorted(f for f in os.listdir(cfg.teacher) if f.endswith(".npy"))
    if not first:
        raise SystemExit(f"error: --teacher={cfg.teacher!r} holds no .npy features")
    return np.load(os.path.join(cfg.teacher, first[0]), mmap_mode="r").shape[-1]


def build(cfg, rt):
    """Mimi (G), its discriminator (D), the distillation projection (P: D -> teacher dim, used in training only, so
    not counted in Mimi's 79.3 M), one AdamW each for G+P and D [recalled], and the step counter."""
    G, D = Mimi(cfg).to(rt.device), Discriminator(cfg).to(rt.device)
    P = nn.Conv1d(cfg.dimension, teacher_dim(cfg), 1, bias=False).to(rt.device)
    opt_g = torch.optim.AdamW(list(G.parameters()) + list(P.parameters()), lr=cfg.lr, betas=cfg.betas,
                              weight_decay=cfg.weight_decay)
    opt_d = torch.optim.AdamW(D.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return dict(G=G, D=D, P=P, opt_g=opt_g, opt_d=opt_d, counter=StepCounter())


def train_step(state, batch, cfg, rt):
    """One step (§3.3): a discriminator update, then the generator on adversarial + feature matching (+ the
    reconstruction losses with --recon_loss) + commitment + semantic distillation. Quantization is applied to
    each sequence with probability quant_rate; with q_dropout a random number of acoustic levels is used."""
    G, D, P, opt_g, opt_d = state["G"], state["D"], state["P"], state["opt_g"], state["opt_d"]
    d_plain = common.unwrap(D)  # the generator step needs no gradient sync through D
    x, target = batch
    state["counter"].step += 1
    rng = _step_rng(cfg, state["counter"].step)
    n_q = 1 + rng.randint(1, cfg.n_q - 1) if cfg.q_dropout else cfg.n_q
    keep = torch.rand(x.shape[0], device=x.device) < cfg.quant_rate
    with rt.autocast():
        x_hat, _, commit, sem = G(x, n_q, keep)
        logits, _ = D(torch.cat([x, x_hat.detach()]))  # real and fake in one pass (one DDP forward)
    B = x.shape[0]
    loss_d = discriminator_loss([l[:B] for l in logits], [l[B:] for l in logits])
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    with rt.autocast():
        logits_fake, fmap_fake = d_plain(x_hat)
        with torch.no_grad():
            _, fmap_real = d_plain(x)
        pred = P(sem)
    losses = {"adv": generator_adv_loss(logits_fake), "feat": feature_loss(fmap_real, fmap_fake),
              "commit": commit, "distill": distill_loss(pred, target)}
    total = cfg.lambda_adv * losses["adv"] + cfg.lambda_feat * losses["feat"] + cfg.lambda_commit * commit \
        + cfg.lambda_distill * losses["distill"]
    if cfg.recon_loss:
        losses["t"], losses["f"] = reconstruction_losses(x, x_hat, cfg)
        total = total + cfg.lambda_t * losses["t"] + cfg.lambda_f * losses["f"]
    opt_g.zero_grad(set_to_none=True)
    total.backward()
    opt_g.step()
    return dict(d=loss_d.detach(), **{k: v.detach() for k, v in losses.items()}, n_q=n_q)


def load_official(state, sd):
    """--init_from=official file in training: its weights into G (sizes were set from it before build)."""
    sd = sd if any(k.startswith("encoder.") and ".conv.conv." in k for k in sd) else read_official(sd)
    common.load_state_dict(state["G"], official_state_dict_to_ours(sd, state["G"].cfg), what="Mimi (official weights)")


def _is_official_path(path):
    return path not in ("scratch", "resume") and (path.endswith((".safetensors", ".sft")) or
                                                  (os.path.isfile(path) and common._peek_config(path) is None))


def load_for_inference(cfg, rt):
    """Mimi from --init_from: our checkpoint (its config already in cfg) or the authors' weight file."""
    if cfg.init_from == "scratch":
        common.log("note: --init_from=scratch: an untrained Mimi")
        return Mimi(cfg).to(rt.device).eval()
    path = common.checkpoint_path(cfg)
    if not os.path.exists(path):
        raise SystemExit(f"error: checkpoint {path!r} does not exist (train first, or pass --init_from=PATH)")
    if _is_official_path(path):
        sd = read_official(path)
        if sd is None:
            raise SystemExit(f"error: {path!r} is neither a nanoaudio checkpoint nor an official Mimi weight file")
        G = Mimi(official_config(cfg, sd))
        common.load_state_dict(G, official_state_dict_to_ours(sd, cfg), what="Mimi (official weights)")
        common.log(f"loaded the official Mimi weights from {path}")
        return G.to(rt.device).eval()
    G = Mimi(cfg)
    common.load_models(common.load_checkpoint(path), cfg, {"G": G}, ARCH_KEYS)
    return G.to(rt.device).eval()


def word_labels(u, n_frames, frame_rate):
    """The word (or '<sil>') under the centre of each frame, from the corpus's word times."""
    labels = []
    for f in range(n_frames):
        t = (f + 0.5) / frame_rate
        labels.append(next((w[0] for w in u.words if w[1] <= t < w[2]), "<sil>"))
    return labels


def probe(train_codes, train_labels, test_codes, test_labels):
    """Linear probe on the one-hot semantic code -> word identity. For one-hot inputs the maximum-likelihood softmax
    regression is the per-code label histogram, so the probe is closed-form: predict each code's most frequent word
    (unseen codes: the overall most frequent). Returns (accuracy, majority-class baseline)."""
    table, overall = {}, {}
    for c, l in zip(train_codes, train_labels):
        table.setdefault(c, {}).setdefault(l, 0)
        table[c][l] += 1
        overall[l] = overall.get(l, 0) + 1
    top = max(overall, key=overall.get)
    pred = [max(table[c], key=table[c].get) if c in table else top for c in test_codes]
    acc = float(np.mean([p == l for p, l in zip(pred, test_labels)]))
    return acc, float(np.mean([l == top for l in test_labels]))


@torch.no_grad()
def evaluate(cfg, model=None, rt=None, samples_dir=None, split="test"):
    """On held-out speech (the test split holds an unseen voice): SI-SNR and mel distance at eval_n_q codebooks
    (1.1 kbps at 8), and the word probe on the semantic codes (fitted on train clips, scored on `split`)."""
    if model is None:
        rt = common.setup(cfg)
        model = load_for_inference(cfg, rt)
    m = common.unwrap(model)
    was_training, dev = m.training, next(m.parameters()).device
    m.eval()
    n = int(cfg.eval_seconds * cfg.sample_rate) // m.frame_size * m.frame_size
    snr, mel, codes, labels = [], [], [], []
    for i, u in enumerate(speech(cfg, split)[:cfg.eval_items]):
        x = torch.from_numpy(u.wav[:n])[None, None].to(dev)  # (1, 1, T)
        c = m.encode(x, cfg.eval_n_q)
        y = m.decode(c)[..., :x.shape[-1]]
        snr.append(common.si_snr(y, x))
        mel.append(common.mel_distance(y.cpu(), x.cpu(), cfg.sample_rate))
        codes += c[0, 0].tolist()
        labels += word_labels(u, c.shape[-1], cfg.frame_rate)
        if samples_dir and i == 0:
            common.save_sample(samples_dir, f"{split}_{u.id}_{m.kbps(cfg.eval_n_q):g}kbps", y[0].cpu(), cfg.sample_rate,
                               ref=x[0].cpu())
    tr_codes, tr_labels = [], []
    for u in speech(cfg, "train")[:cfg.probe_items]:
        c = m.encode(torch.from_numpy(u.wav)[None, None].to(dev), 1)[0, 0].tolist()
        tr_codes += c
        tr_labels += word_labels(u, len(c), cfg.frame_rate)
    acc, base = probe(tr_codes, tr_labels, codes, labels)
    res = dict(si_snr=round(float(np.mean(snr)), 3), mel=round(float(np.mean(mel)), 4), kbps=m.kbps(cfg.eval_n_q),
               probe_acc=round(acc, 4), probe_majority=round(base, 4), codes_used=len(set(codes)))
    common.log(f"eval {split} | " + " | ".join(f"{k} {v}" for k, v in res.items()))
    m.train(was_training)
    return res


def train(cfg):
    rt = common.setup(cfg)
    official = _is_official_path(cfg.init_from)
    sd = read_official(cfg.init_from) if official else None
    if official:
        if sd is None:
            raise SystemExit(f"error: {cfg.init_from!r} is neither a nanoaudio checkpoint nor an official Mimi weight file")
        official_config(cfg, sd)
    state = build(cfg, rt)
    common.log(f"params: Mimi {common.count_params(state['G']):,} | discriminator {common.count_params(state['D']):,} "
               f"| distillation projection {common.count_params(state['P']):,}")
    common.log("semantic teacher: " + (f"WavLM features from {cfg.teacher}" if cfg.teacher else
                                        "STAND-IN (normalised log-mels, not WavLM: pass --teacher=DIR for WavLM features)"))
    train_utts, val_utts = speech(cfg, "train"), speech(cfg, "val")
    common.check_clips(train_utts, state["G"].frame_size, "train split")
    common.check_clips(val_utts, state["G"].frame_size, "val split")
    teacher = load_teacher(cfg, train_utts)
    sampler = FrameSampler([u._audio for u in train_utts], cfg.segment, cfg.batch_size, cfg.seed, rt.rank,
                           rt.world_size, align=state["G"].frame_size)
    if official:
        load_official(state, sd)
        common.log(f"initialized from the official weights {cfg.init_from} (step 0, fresh optimizers)")
        step = 0
    else:
        step = common.init_from(cfg, state, sampler=sampler, arch_keys=ARCH_KEYS)
    state["G"] = common.wrap_ddp(common.compile(state["G"], cfg), rt)
    state["D"] = common.wrap_ddp(common.compile(state["D"], cfg), rt)
    state["P"] = common.wrap_ddp(state["P"], rt)
    prog = common.Progress(cfg, start_step=step)
    while step < cfg.max_iters:
        losses = train_step(state, get_batch(sampler, cfg, rt, teacher), cfg, rt)
        step += 1
        prog.update(step, losses, audio_seconds=cfg.batch_size * rt.world_size * cfg.segment / cfg.sample_rate)
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            if rt.master:
                evaluate(cfg, common.unwrap(state["G"]), rt, split="val",
                         samples_dir=os.path.join(cfg.out_dir, "samples", f"step{step:06d}"))
            common.save_checkpoint(cfg, step, state, sampler=sampler)
    common.cleanup(rt)

# ----------------------------------------------------------------------------- sample

@torch.no_grad()
def sample(cfg):
    """Encode --input (or a held-out test clip) to eval_n_q codebooks, decode it, offline and streaming frame by
    frame; write wav + png beside the reference and say how far the two decodes are apart."""
    rt = common.setup(cfg)
    G = load_for_inference(cfg, rt)
    if cfg.input:
        wav, _ = common.load_audio(cfg.input, sr=cfg.sample_rate)
        name = os.path.splitext(os.path.basename(cfg.input))[0]
    else:
        u = speech(cfg, "test")[0]
        wav, name = u.wav[:int(cfg.eval_seconds * cfg.sample_rate)], u.id
    x = torch.from_numpy(np.ascontiguousarray(wav))[None, None].to(rt.device)  # (1, 1, T)
    codes = G.encode(x, cfg.eval_n_q)
    y = G.decode(codes)[..., :x.shape[-1]]
    enc_state, dec_state, ys = {}, {}, []
    xp = G._pad(x)
    for o in range(0, xp.shape[-1], G.frame_size):  # one 80 ms frame at a time, as Moshi runs it
        ys.append(G.decode_stream(G.encode_stream(xp[..., o:o + G.frame_size], enc_state, cfg.eval_n_q), dec_state))
    y_stream = torch.cat(ys, -1)[..., :x.shape[-1]]
    out = os.path.join(cfg.out_dir, "samples")
    tag = f"{name}_{G.kbps(cfg.eval_n_q):g}kbps"
    common.save_sample(out, tag, y[0].cpu(), cfg.sample_rate, ref=x[0].cpu())
    common.log(f"{name}: {codes.shape[-1]} frames x {codes.shape[1]} codebooks ({G.kbps(cfg.eval_n_q):g} kbps), "
               f"SI-SNR {common.si_snr(y, x):.2f} dB, streaming vs offline max diff "
               f"{(y_stream - y).abs().max().item():.2e} -> {out}/{tag}.wav")

# ----------------------------------------------------------------------------- bench

def bench(cfg):
    """train_step ms and audio-s/s; encode / decode real-time factor at batch 1, eager vs compiled; the per-frame
    latency of streaming one 80 ms frame through encoder and decoder; FLOP rate."""
    rt = common.setup(cfg)
    state = build(cfg, rt)
    G = state["G"]
    x = torch.randn(cfg.batch_size, 1, cfg.segment, device=rt.device) * 0.1
    batch = (x, standin_teacher(x, cfg).to(rt.device) if not cfg.teacher else
             torch.randn(cfg.batch_size, state["P"].out_channels, cfg.segment // G.frame_size, device=rt.device))
    step_ms = common.timeit(lambda: train_step(state, batch, cfg, rt), iters=cfg.bench_iters, warmup=1)
    flops = common.count_flops(lambda: train_step(state, batch, cfg, rt))
    G.eval()
    T = int(cfg.bench_seconds * cfg.sample_rate) // G.frame_size * G.frame_size
    xb = torch.randn(1, 1, T, device=rt.device) * 0.1
    codes = G.encode(xb, cfg.eval_n_q)
    figures = dict(train_step_ms=round(step_ms, 2), train_flops_per_step=flops,
                   train_audio_s_per_s=round(cfg.batch_size * cfg.segment / cfg.sample_rate / (step_ms / 1000), 3))
    compiled = common.compile(G, cfg) is not G
    variants = [("eager", G.encode, G.decode)] + ([("compiled", torch.compile(G.encode), torch.compile(G.decode))]
                                                 if compiled else [])
    for name, enc, dec in variants:
        with rt.autocast():
            e_ms = common.timeit(lambda: enc(xb, cfg.eval_n_q), iters=cfg.bench_iters, warmup=1)
            d_ms = common.timeit(lambda: dec(codes), iters=cfg.bench_iters, warmup=1)
        figures[f"encode_rtf_{name}"] = round(e_ms / 1000 / cfg.bench_seconds, 5)  # compute time / audio time
        figures[f"decode_rtf_{name}"] = round(d_ms / 1000 / cfg.bench_seconds, 5)
    frame = xb[..., :G.frame_size]
    es, ds = {}, {}
    for _ in range(3):  # warm the caches past their first (shorter) frames
        G.decode_stream(G.encode_stream(frame, es, cfg.eval_n_q), ds)
    figures["stream_frame_ms"] = round(common.timeit(lambda: G.decode_stream(G.encode_stream(frame, es, cfg.eval_n_q), ds),
                                                     iters=max(3, cfg.bench_iters), warmup=1), 3)
    figures["frame_ms"] = 1000 * G.frame_size / cfg.sample_rate  # the real-time budget of one step: 80 ms
    common.report_bench(cfg, rt, model=G, compiled=compiled, **figures)

# ----------------------------------------------------------------------------- main

if __name__ == "__main__":
    cfg = common.parse_config(Config, PRESETS)
    {"train": train, "sample": sample, "eval": evaluate, "bench": bench}[cfg.mode](cfg)
