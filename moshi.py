"""
Moshi: a speech-text foundation model for real-time dialogue (Défossez, Mazaré, Orsini, Royer, Pérez,
Jégou, Grave, Zeghidour, 2024) — https://arxiv.org/abs/2410.00037

The idea, in two stages (--stage; one state and one checkpoint each). Mimi (§3.3, --stage=codec) is a
streaming codec: EnCodec's causal SEANet with a causal Transformer on each side of the bottleneck and one
more learned stride-2 conv, so 24 kHz audio becomes 12.5 frames a second (80 ms, near the rate of text).
A split RVQ quantizes each frame twice in parallel: one semantic codebook, distilled towards WavLM with a
cosine loss so that its tokens carry the words, beside 7 residual acoustic levels; 8 x 11 bits x 12.5 Hz =
1.1 kbps. Half the training sequences pass unquantized, and adversarial + feature-matching losses carry the
training. Everything is causal, so encoding or decoding one 80 ms frame at a time equals the offline pass.
The Moshi LM (§3.2, §3.4, --stage=lm) models three streams at 12.5 Hz: Moshi's speech and the user's (8
codebooks each) and Moshi's "inner monologue", its words as text tokens aligned to its own speech (PAD
between words, EPAD before each). An RQ-Transformer factorises a step: a big temporal Transformer (Helium)
reads the sum of the 17 embeddings of each past step, then a small depth Transformer predicts the text
token, Moshi's semantic token and its acoustic tokens, which lag one step so that they know the semantic
one. Inference is full duplex: each 80 ms, one user frame in, one Moshi frame out (160 ms of latency).

Simplified here: the WavLM teacher is read from `wavlm.py --mode=features` output (--teacher=DIR), else a
log-mel stand-in that the log names; losses are a plain weighted sum (no balancer); the CPU presets add
EnCodec's reconstruction terms and a quantizer warm-up, and a re-seeded dead code keeps a grace (ours).
The text tokenizer is a corpus BPE, not the 32k SentencePiece, so the released LM loads but is not sampled;
the paper's five training stages become a short text stage, then the built-in dialogues (4 h of them, whole:
each training sequence is one conversation from its start, as at inference), stopped when the val loss stops
falling (--patience; ours, against overfitting).
Aim 1300 lines not reached (1838): two models, each with its own losses, data, train, eval, sample, bench.

    python moshi.py                                        # 1. Mimi on the built-in speech corpus
    python moshi.py --stage=lm --codec=out/moshi/codec/ckpt.pt  # 2. the LM on Mimi codes of the dialogues
    python moshi.py --stage=lm --mode=sample --init_from=out/moshi/lm/ckpt.pt  # a full-duplex conversation
    python moshi.py --stage=lm --mode=eval --init_from=out/moshi/lm/ckpt.pt    # answer accuracy, latency
    python moshi.py --init_from=resume                     # continue out/moshi/codec/ckpt.pt (lm: lm/)
    python moshi.py --mode=sample --init_from=out/moshi/codec/ckpt.pt  # or the official .safetensors
    python moshi.py --mode=eval --init_from=out/moshi/codec/ckpt.pt    # SI-SNR, mel distance, word probe
    python moshi.py --mode=bench                           # --stage=lm: per-frame latency vs 80 ms
    python moshi.py --preset=moshi-7b --mode=bench         # the paper's LM (7.69 B parameters)
    torchrun --standalone --nproc_per_node=8 moshi.py --preset=mimi
"""
import dataclasses
import hashlib
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
    stage: str = "codec"               # codec (Mimi, on speech) | lm (the Moshi LM on Mimi codes)
    preset: str = "mimi"               # a key of PRESETS
    init_from: str = "scratch"         # scratch | resume | path (our ckpt.pt or the official .safetensors)
    out_dir: str = "out/moshi/{stage}"  # one folder per stage
    data_dir: str = ""                 # empty: the built-in speech corpus
    corpus_hours: float = 2.0          # size of the built-in corpus (the codec's; the LM's: lm_corpus_hours)
    input: str = ""                    # --mode=sample: a wav, not a held-out clip (lm: its user channel)
    codec: str = ""                    # --stage=lm: the Mimi checkpoint (ours or official) it models
    # SEANet encoder/decoder (§3.3; official loaders._seanet_kwargs)
    sample_rate: int = 24000           # 24 kHz mono
    channels: int = 1                  # audio channels
    n_filters: int = 64                # base width C; doubles at every downsampling
    dimension: int = 512               # latent dimension D (also the transformer width)
    ratios: tuple = (8, 6, 5, 4)       # decoder upsampling ratios; the encoder's reversed -> hop 960 (25 Hz)
    n_residual_layers: int = 1         # residual units per block
    compress: int = 2                  # residual branch width C/compress
    dilation_base: int = 2             # dilation of residual unit j is base**j
    kernel_size: int = 7               # first conv
    residual_kernel_size: int = 3      # residual unit conv
    last_kernel_size: int = 3          # last conv
    frame_rate: float = 12.5           # Hz after the extra stride-2 conv: 1920 samples a frame
    # Transformer bottlenecks (§3.3; official _transformer_kwargs)
    tr_layers: int = 8                 # layers in the encoder's and in the decoder's transformer
    tr_heads: int = 8                  # attention heads (not stored in a weight file)
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
    kmeans_iters: int = 50             # k-means iterations (one level per step, each on its own residual)
    dead_ratio: float = 0.1            # a code used less than dead_ratio x the uniform share is re-seeded
    dead_grace: int = 5                # ...unless (re-)seeded in its level's last dead_grace updates (ours)
    quantizer_warmup: int = 0          # first steps with the split RVQ bypassed, then k-means (ours, CPU)
    quant_rate: float = 0.5            # fraction of training sequences quantized (the rest pass unquantized)
    q_dropout: bool = True             # train with a random number of acoustic codebooks, so any n_q decodes
    # semantic distillation (§3.3)
    teacher: str = ""                  # folder of WavLM features (wavlm.py --mode=features); empty: stand-in
    lambda_distill: float = 1.0        # cosine distillation loss [inferred: the card gives no value]
    # discriminator (EnCodec's MS-STFT discriminator)
    disc_filters: int = 32             # channels of every MS-STFTD conv
    disc_n_ffts: tuple = (2048, 1024, 512, 256, 128)  # STFT scales, hop = n_fft / 4
    # losses (§3.3: adversarial + feature matching; reconstruction optional, the paper's finding)
    recon_loss: bool = False           # add EnCodec's time L1 + multi-scale mel (the paper's best has none)
    lambda_adv: float = 1.0            # hinge adversarial loss [inferred]
    lambda_feat: float = 3.0           # relative feature matching [inferred: EnCodec's value]
    lambda_t: float = 0.1              # time-domain L1 (only with --recon_loss)
    lambda_f: float = 1.0              # multi-scale mel: L1 + mel_alpha x log MSE (only with --recon_loss)
    mel_alpha: float = 1.0             # weight of the log-mel MSE inside l_f (EnCodec's alpha_i = 1)
    lambda_commit: float = 1.0         # commitment loss
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
    listen_items: int = 16             # --mode=eval: whole test clips resynthesised + originals, for an ASR
    probe_items: int = 64              # word probe: train clips it is fitted on, whole split clips it scores
    bench_seconds: float = 10.0        # audio length for the encode/decode real-time factors
    bench_iters: int = 5               # timed repetitions in --mode=bench
    # the Moshi LM (§3.2, §3.4; official moshi_7b config): Helium temporal Transformer + depth Transformer
    text_card: int = 32000             # text vocabulary (corpus BPE, then PAD, EPAD); row text_card = initial
    lm_card: int = 2048                # audio vocabulary: the codec's codebook size
    dep_q: int = 8                     # codebooks per audio stream (Moshi's, generated, and the user's)
    lm_dim: int = 4096                 # temporal Transformer width
    lm_layers: int = 32
    lm_heads: int = 32                 # heads of 128
    lm_hidden_scale: float = 4.125     # nominal FFN width / dim; the SiLU-gated hidden is 2/3 of it (11264)
    lm_context: int = 3000             # frames a step attends to (4 min)
    dep_dim: int = 1024                # depth Transformer width
    dep_layers: int = 6
    dep_heads: int = 16
    dep_ffn: int = 4224                # nominal depth FFN width (gated hidden 2816)
    acoustic_delay: int = 1            # steps the acoustic tokens lag the semantic one (§3.4.2: 80 ms)
    semantic_weight: float = 100.0     # semantic codebook's loss weight, 1 per acoustic one (§3.4.3)
    text_pad_weight: float = 0.5       # loss weight of PAD / EPAD text targets
    lm_frames: int = 150               # training sequence of the LM in 80 ms steps (12 s; CPU: a whole dialogue)
    text_iters: int = 0                # first steps: Helium text pretraining (stage 1, in miniature)
    lr_decay_iters: int = 500_000      # cosine decay of the LM's lr to 10 % by this step (then constant)
    lm_corpus_hours: float = 16.0      # built-in corpus the LM reads: text from its speech, dialogues a quarter
                                       # of it (4 h); on 1 h of dialogue it overfits by its second eval (ours)
    lm_max_iters: int = 0              # the LM's step limit (0: max_iters); the patience stop comes first
    patience: int = 2                  # LM: evals without a lower val loss (text + audio CE) before training
                                       # stops and keeps the best step (0: off; ours, against the overfit)
    temp: float = 0.8                  # sampling temperature of the audio tokens (§3.4.3)
    top_k: int = 250
    temp_text: float = 0.7             # ... and of the text token
    top_k_text: int = 25
    converse_seconds: float = 60.0     # held-out conversations are cut to this length (evaluate, sample)
    device: str = "auto"
    dtype: str = "auto"                # bf16 autocast on CUDA, else fp32 (quantizer, STFTs, losses stay fp32)
    compile: bool = True
    seed: int = 1337

    def validate(self):
        def need(ok, msg):  # checked in order: a failing check stops before the next is evaluated
            if not ok:
                raise SystemExit(f"error: {msg}")
        hop, frame = int(np.prod(self.ratios)), self.sample_rate / self.frame_rate
        need(self.stage in ("codec", "lm"),
             f"--stage={self.stage!r}: the stages are codec (Mimi) and lm (Moshi LM)")
        if self.stage == "lm":
            for n, d, h in (("lm", self.lm_dim, self.lm_heads), ("dep", self.dep_dim, self.dep_heads)):
                need(not (d % h or (d // h) % 2), f"--{n}_dim={d} must split into --{n}_heads={h} even heads")
            need(self.text_card >= 258 and self.dep_q >= 2 and self.lm_context >= 2 and self.lm_frames >= 2,
                 "need --text_card >= 258 (256 bytes + PAD + EPAD), --dep_q >= 2, --lm_context >= 2 and "
                 "--lm_frames >= 2")
            need(0 <= self.acoustic_delay < self.lm_frames,
                 f"--acoustic_delay must be in [0, --lm_frames) (got {self.acoustic_delay})")
            need(self.lm_corpus_hours > 0 and self.lm_max_iters >= 0 and self.patience >= 0,
                 "need --lm_corpus_hours > 0, --lm_max_iters >= 0 and --patience >= 0")
        need(frame == int(frame) and not int(frame) % hop, f"--frame_rate={self.frame_rate} needs "
             f"sample_rate/frame_rate to be a whole multiple of the SEANet hop {hop}")
        need(not self.segment % int(frame),
             f"--segment={self.segment} must be a multiple of {int(frame)} samples (one frame)")
        need(2 <= self.n_q and 1 <= self.eval_n_q <= self.n_q,
             f"need --n_q >= 2 and 1 <= --eval_n_q <= --n_q (got {self.n_q}, {self.eval_n_q})")
        need(not (self.dimension % self.tr_heads or (self.dimension // self.tr_heads) % 2),
             f"--dimension={self.dimension} must split into --tr_heads={self.tr_heads} heads of even size "
             "(RoPE rotates pairs)")
        need(0.0 <= self.quant_rate <= 1.0, f"--quant_rate must be in [0, 1] (got {self.quant_rate})")
        need(not self.teacher or self.frame_rate * 4 == TEACHER_RATE,
             f"--teacher features are at {TEACHER_RATE} Hz: they need --frame_rate=12.5")
        need(not self.teacher or os.path.isdir(self.teacher),
             f"--teacher={self.teacher!r} is not a folder (wavlm.py --mode=features writes one)")

PRESETS = {
    "mimi": dict(),                                        # the paper's codec: 79.3 M parameters, 32 books
    # small, the CPU codec: reconstruction terms on (lambda_f 3: each term's gradient on x_hat at init,
    # test_loss_balance_at_init); 0.96 s crops; the RVQ bypassed 200 steps so k-means has latents to cluster
    "small": dict(n_filters=16, dimension=128, tr_layers=2, tr_heads=4, tr_ffn=512, n_q=8, q_dim=64,
                  disc_filters=8, disc_n_ffts=(512, 256), mel_scales=(6, 7, 8, 9, 10), recon_loss=True,
                  lambda_f=3.0, quantizer_warmup=200, q_dropout=False, segment=23040, batch_size=4,  # 0.96 s
                  lr=1e-3, max_iters=1000, log_interval=20, eval_interval=250,
                  eval_items=8, probe_items=400, bench_seconds=4.0, kmeans_iters=20,  # codec: ~15 min, CPU
                  text_card=512, lm_dim=256, lm_layers=4, lm_heads=4, lm_context=500, dep_dim=128,
                  dep_layers=2, dep_heads=4, dep_ffn=528, lm_frames=320, text_iters=200, lr_decay_iters=1000,
                  lm_max_iters=500),  # LM: 25.6 s sequences hold a whole built-in dialogue (<= 24.3 s) from its
                                      # start, so the first turn and every position are those of inference
    "tiny": dict(n_filters=4, dimension=16, tr_layers=1, tr_heads=2, tr_ffn=32, tr_context=50, n_q=4,
                 eval_n_q=3, q_dim=8, codebook_size=32, kmeans_iters=3, disc_filters=4, disc_n_ffts=(256,),
                 mel_scales=(6, 7), recon_loss=True, segment=5760, batch_size=2, max_iters=10, log_interval=1,
                 eval_interval=1000, eval_items=1, eval_seconds=0.96, probe_items=2, bench_seconds=0.96,
                 bench_iters=1, corpus_hours=0.02, lm_corpus_hours=0.02, text_card=300, lm_card=32, dep_q=3,
                 lm_dim=32, lm_layers=2, lm_heads=2, lm_context=100, dep_dim=16, dep_layers=1, dep_heads=2,
                 dep_ffn=66, lm_frames=24, text_iters=2, lr_decay_iters=1000, converse_seconds=2.0),
    "moshi-7b": dict(stage="lm", lr=3e-4, batch_size=16),  # the paper's LM: 7.69 B parameters
}


# fields that shape the weights or the features: a checkpoint must agree on them
ARCH_KEYS = ("stage", "sample_rate", "channels", "n_filters", "dimension", "ratios", "n_residual_layers",
             "compress", "dilation_base", "kernel_size", "residual_kernel_size", "last_kernel_size",
             "frame_rate", "tr_layers", "tr_heads", "tr_ffn", "n_q", "q_dim", "codebook_size", "disc_filters",
             "disc_n_ffts", "teacher")

LM_ARCH_KEYS = ("stage", "sample_rate", "frame_rate", "text_card", "lm_card", "dep_q", "lm_dim", "lm_layers",
                "lm_heads", "lm_hidden_scale", "dep_dim", "dep_layers", "dep_heads", "dep_ffn",
                "acoustic_delay", "codec")

# ----------------------------------------------------------------------------- model
# Mimi (§3.3)

def _init_conv(conv):
    # Variance-preserving N(0, 1/fan_in) (ours): an untrained encoder's latents then follow the audio, so
    # k-means on the first batch finds real clusters. No weight norm: the released convs are plain.
    transposed = isinstance(conv, nn.ConvTranspose1d)
    fan_in = conv.weight.shape[1] * conv.kernel_size[0] / (conv.stride[0] if transposed else 1)
    nn.init.normal_(conv.weight, 0.0, fan_in ** -0.5)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


class CausalConv1d(nn.Module):
    """Conv1d padded on the left only with k_eff - stride zeros (or copies of the first input, "replicate"):
    §3.3, fully causal. Given a `state` dict it streams: the last k_eff - stride inputs are kept as explicit
    history, which starts as the offline padding, so chunked calls equal one offline call."""

    def __init__(self, cin, cout, kernel, stride=1, dilation=1, groups=1, bias=True, pad_mode="constant"):
        super().__init__()
        self.conv = _init_conv(nn.Conv1d(cin, cout, kernel, stride, dilation=dilation, groups=groups,
                                         bias=bias))
        self.stride, self.pad, self.pad_mode = stride, (kernel - 1) * dilation + 1 - stride, pad_mode

    def _left(self, x):  # the left padding of a sequence that starts with x
        return x[..., :1].expand(*x.shape[:-1], self.pad) if self.pad_mode == "replicate" else \
            x.new_zeros(*x.shape[:-1], self.pad)

    def forward(self, x, state=None):  # (B, Cin, T) -> (B, Cout, T / stride)
        if state is None:
            return self.conv(torch.cat([self._left(x), x], -1) if self.pad else x)
        buf = state.get(self)
        x = torch.cat([self._left(x) if buf is None else buf, x], -1)
        state[self] = x[..., x.shape[-1] - self.pad:]
        return self.conv(x)


class CausalConvTranspose1d(nn.Module):
    """Transposed conv (kernel 2S, stride S) trimming its k - S overhang on the right (causal). Streaming
    keeps each chunk's overhang and adds it to the head of the next (minus the bias counted twice)."""

    def __init__(self, cin, cout, kernel, stride, groups=1, bias=True):
        super().__init__()
        self.conv = _init_conv(nn.ConvTranspose1d(cin, cout, kernel, stride, groups=groups, bias=bias))
        self.trim = kernel - stride

    def forward(self, x, state=None):  # (B, Cin, T) -> (B, Cout, T * stride)
        y = self.conv(x)  # (B, Cout, (T-1)*S + k)
        if state is not None:
            tail = state.get(self)
            if tail is not None:
                bias = 0 if self.conv.bias is None else self.conv.bias[:, None]
                y = torch.cat([y[..., :self.trim] + tail - bias, y[..., self.trim:]], -1)
            state[self] = y[..., y.shape[-1] - self.trim:]
        return y[..., :y.shape[-1] - self.trim]


class ResidualUnit(nn.Module):
    """SEANet residual unit: x + conv k1(ELU(conv k3 (C -> C/compress, dilated)(ELU(x)))). Mimi keeps the
    identity skip (`true_skip`), where encodec.py's 24 kHz model has a 1x1 conv shortcut."""

    def __init__(self, dim, dilation, cfg):
        super().__init__()
        hidden = dim // cfg.compress
        self.conv1 = CausalConv1d(dim, hidden, cfg.residual_kernel_size, dilation=dilation)
        self.conv2 = CausalConv1d(hidden, dim, 1)

    def forward(self, x, state=None):
        return x + self.conv2(F.elu(self.conv1(F.elu(x), state)), state)


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

    def forward(self, x, state=None):
        x = self.conv_in(x, state)
        for b in self.blocks:
            for r in b.res:
                x = r(x, state)
            x = b.down(F.elu(x), state)
        return self.conv_out(F.elu(x), state)


class SEANetDecoder(nn.Module):
    """The mirror: conv k7 -> 4 x (ELU, transposed conv k=2S halving the channels, residual unit) -> ELU, conv
    k3. No final tanh (the official config has none)."""

    def __init__(self, cfg):
        super().__init__()
        C, n = cfg.n_filters, len(cfg.ratios)
        self.conv_in = CausalConv1d(cfg.dimension, C * 2 ** n, cfg.kernel_size)
        self.blocks = nn.ModuleList()
        for i, s in enumerate(cfg.ratios):  # strides 8, 6, 5, 4
            blk, c = nn.Module(), C * 2 ** (n - i)
            blk.up = CausalConvTranspose1d(c, c // 2, 2 * s, s)
            blk.res = nn.ModuleList(ResidualUnit(c // 2, cfg.dilation_base ** j, cfg)
                                    for j in range(cfg.n_residual_layers))
            self.blocks.append(blk)
        self.conv_out = CausalConv1d(C, cfg.channels, cfg.last_kernel_size)

    def forward(self, z, state=None):
        x = self.conv_in(z, state)
        for b in self.blocks:
            x = b.up(F.elu(x), state)
            for r in b.res:
                x = r(x, state)
        return self.conv_out(F.elu(x), state)


def apply_rope(x, pos, max_period):
    """Rotary position embedding (Su et al.), pairs INTERLEAVED as Moshi's code: channels (2i, 2i+1) of each
    head are rotated by pos * max_period^(-2i/d). x: (B, H, T, d), pos: (T,) float."""
    d = x.shape[-1]
    i = torch.arange(d // 2, device=x.device, dtype=torch.float32)
    freqs = torch.exp(i * (-math.log(max_period) * 2 / d))
    ang = pos.float()[:, None] * freqs  # (T, d/2)
    cos, sin = ang.cos(), ang.sin()
    xr, xi = x.float().view(*x.shape[:-1], d // 2, 2).unbind(-1)  # (B, H, T, d/2): real, imaginary of a pair
    out = torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], -1)  # (B, H, T, d/2, 2)
    return out.view(x.shape).to(x.dtype)


def attend(q, k, v, past, offset, context, max_period=None):
    """Causal attention of positions offset .. offset+T-1 over at most `context` positions (itself included),
    RoPE'd if max_period; past: the explicit (k, v) cache of earlier positions. q, k, v: (B, H, T, d) ->
    (B, T, H*d) and the cache the next position needs (its last context - 1 keys and values)."""
    B, H, T, d = q.shape
    pos = torch.arange(offset, offset + T, device=q.device)
    if max_period is not None:
        q, k = apply_rope(q, pos, max_period), apply_rope(k, pos, max_period)
    if past is not None:
        k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
    kpos = torch.arange(offset + T - k.shape[2], offset + T, device=q.device)
    delta = pos[:, None] - kpos[None]  # (T, S): how far back each key is
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=(delta >= 0) & (delta < context))  # (B, H, T, d)
    keep = context - 1
    return a.transpose(1, 2).reshape(B, T, H * d), (k[:, :, -keep:], v[:, :, -keep:])


class TransformerLayer(nn.Module):
    """Pre-norm layer (§3.3): x += ls1 * Attn(LN(x)); x += ls2 * MLP(LN(x)). Causal self-attention over at
    most `context` past frames, RoPE on queries and keys, no biases, GELU MLP; LayerScale (init 0.01) starts
    each residual branch near zero so the bottleneck begins as an identity."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.dimension
        self.heads, self.context, self.max_period = cfg.tr_heads, cfg.tr_context, cfg.rope_max_period
        self.norm1, self.norm2 = nn.LayerNorm(D, eps=1e-5), nn.LayerNorm(D, eps=1e-5)
        self.in_proj = nn.Linear(D, 3 * D, bias=False)  # fused q, k, v
        self.out_proj = nn.Linear(D, D, bias=False)
        self.linear1 = nn.Linear(D, cfg.tr_ffn, bias=False)
        self.linear2 = nn.Linear(cfg.tr_ffn, D, bias=False)
        self.layer_scale_1 = nn.Parameter(torch.full((D,), cfg.layer_scale))
        self.layer_scale_2 = nn.Parameter(torch.full((D,), cfg.layer_scale))

    def forward(self, x, past=None, offset=0):  # (B, T, D) at positions offset.. -> (B, T, D), KV cache
        B, T, D = x.shape
        qkv = self.in_proj(self.norm1(x)).view(B, T, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, d)
        a, cache = attend(q, k, v, past, offset, self.context, self.max_period)  # (B, T, D)
        x = x + self.layer_scale_1 * self.out_proj(a)
        x = x + self.layer_scale_2 * self.linear2(F.gelu(self.linear1(self.norm2(x))))
        return x, cache


class Transformer(nn.Module):
    """The bottleneck Transformer on (B, D, T) latents at 25 Hz; streaming keeps a KV cache per layer."""

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.tr_layers))

    def forward(self, z, state=None):  # (B, D, T) -> (B, D, T); with `state`: the next chunk of a stream
        x, offset = z.transpose(1, 2), 0 if state is None else state.get(self, 0)  # (B, T, D)
        for layer in self.layers:
            x, cache = layer(x, None if state is None else state.get(layer), offset)
            if state is not None:
                state[layer], state[self] = cache, offset + x.shape[1]
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


class Codebook(nn.Module):
    """One VQ level: 2048 entries, nearest neighbour in Euclidean distance, learned by EMA, not by gradients.
    The buffers are the official ones: codebook = embedding_sum / usage (so both can decay together)."""

    def __init__(self, cfg):
        super().__init__()
        K, d = cfg.codebook_size, cfg.q_dim
        self.decay, self.kmeans_iters, self.eps = cfg.ema_decay, cfg.kmeans_iters, 1e-5
        self.dead_ratio, self.grace = cfg.dead_ratio, cfg.dead_grace
        self.register_buffer("initialized", torch.zeros(1))
        self.register_buffer("cluster_usage", torch.ones(K))        # EMA of how often each entry is picked
        self.register_buffer("embedding_sum", torch.zeros(K, d))    # EMA of the sum of vectors it stood for
        self.register_buffer("age", torch.zeros(K))  # this level's updates since each entry's (re-)seeding

    @property
    def embedding(self):  # (K, d)
        return self.embedding_sum / self.cluster_usage.clamp(min=self.eps)[:, None]

    def encode(self, x):  # (N, d) -> (N,)
        return torch.cdist(x[None], self.embedding[None])[0].argmin(-1)

    def decode(self, codes):  # (N,) -> (N, d)
        return F.embedding(codes, self.embedding)

    def forward(self, x, initialize=True):
        """Training: (N, d) fp32 -> quantized (N, d), codes (N,); updates the EMA statistics. An empty level
        not allowed to initialize (its parent was initialised in this very step) quantizes to zero."""
        if not self.initialized and initialize:
            self._kmeans_init(x)
        if not self.initialized:
            return torch.zeros_like(x), torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        codes = self.encode(x)
        q = self.decode(codes)
        self._dead_codes(x)
        counts = torch.bincount(codes, minlength=self.cluster_usage.shape[0]).float()
        sums = torch.zeros_like(self.embedding_sum).index_add_(0, codes, x)
        if common._distributed():  # the global batch's statistics (mean over ranks, as the official code)
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
        self.cluster_usage.copy_(counts)  # entries k-means left empty get usage 0: re-seeded after the grace
        self.age.zero_()
        self.initialized.fill_(1)
        self._sync()

    @torch.no_grad()
    def _dead_codes(self, x):
        # An entry used less than dead_ratio x the uniform share is re-seeded with a vector of this batch
        # (official ratios; official: every 5 steps). Ours, the grace: a re-seeded entry is kept for its
        # level's next dead_grace updates (`age` counts the level's own updates, fewer under q_dropout).
        self.age.add_(1)
        share = self.cluster_usage.sum() / self.cluster_usage.shape[0]
        dead = (self.cluster_usage < self.dead_ratio * share) & (self.age > self.grace)
        if dead.any():
            new = _sample_rows(x, self.cluster_usage.shape[0])
            self.embedding_sum[dead] = share * new[dead]
            self.cluster_usage[dead] = share
            self.age[dead] = 0
            self._sync()

    def _sync(self):
        if common._distributed():  # rank 0's random choices win
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
        -> output (B, D, F), codes (B, n_q, F), commitment loss. n_q = 0: the quantizer warm-up, a bypass."""
        x = self.input_proj(z)  # (B, d, F)
        B, d, Fr = x.shape
        if n_q == 0:
            return self.output_proj(x), x.new_zeros(B, 0, Fr, dtype=torch.long), x.new_zeros(())
        with torch.autocast(x.device.type, enabled=False):  # codebook statistics stay fp32
            flat = x.float().transpose(1, 2).reshape(B * Fr, d)  # (B*F, d)
            residual, out, codes, commit, ready = flat, torch.zeros_like(flat), [], 0.0, True
            for cb in self.codebooks[:n_q]:
                # k-means one level per step (as the official code): a level initialises once its parent
                # did in an earlier step, so it fits a residual, not the zeros k-means leaves at first
                was = bool(cb.initialized)
                q, c = cb(residual.detach(), initialize=ready)
                ready = was
                if cb.initialized:  # an empty level's zeros would pull the latent towards 0
                    commit = commit + F.mse_loss(residual, q.detach())  # pulls the encoder towards its codes
                residual = residual - q.detach()
                out, codes = out + q, codes + [c]
            out = flat + (out - flat).detach()  # straight-through: the decoder's gradient reaches the encoder
            out = out.view(B, Fr, d).transpose(1, 2)  # (B, d, F)
            out = torch.where(keep[:, None, None], out, x.float())  # §3.3: the other sequences unquantized
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
    """§3.3, Fig. 2: a semantic VQ (1 codebook) and an acoustic RVQ (n_q - 1) quantize the SAME latent in
    parallel, their outputs summed: the semantic codebook follows the distillation target without costing
    the acoustic levels their fidelity."""

    def __init__(self, cfg):
        super().__init__()
        self.semantic = RVQ(1, cfg)
        self.acoustic = RVQ(cfg.n_q - 1, cfg)

    def forward(self, z, n_q, keep):  # -> output (B, D, F), codes (B, n_q, F), commitment, semantic output
        s, s_codes, s_commit = self.semantic(z, min(n_q, 1), keep)  # n_q = 0: both bypassed (warm-up)
        a, a_codes, a_commit = self.acoustic(z, max(n_q - 1, 0), keep)
        commit = (s_commit + (n_q - 1) * a_commit) / n_q if n_q else s_commit  # mean over the levels used
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
        # learned, kernel 4, left edge padded by repeating the first latent (the official "conv" resampler)
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

    def latent(self, x, state=None):  # (B, 1, T) -> unquantized latents (B, D, ceil(T / 1920))
        return self.downsample(self.encoder_transformer(self.encoder(self._pad(x), state), state), state)

    def decode_latent(self, q, state=None):  # (B, D, F) -> (B, 1, F * 1920)
        return self.decoder(self.decoder_transformer(self.upsample(q, state), state), state)

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
        """Streaming: whole frames (B, 1, k * 1920) -> their k frames of codes, equal to the offline encode;
        `state` carries every conv's history and every layer's KV cache. One 80 ms frame in, 8 codes out."""
        if x.shape[-1] % self.frame_size:
            raise ValueError(f"streaming input must be whole frames of {self.frame_size} samples, "
                             f"got {x.shape[-1]}")
        return self.quantizer.encode(self.latent(x, state), n_q)

    @torch.no_grad()
    def decode_stream(self, codes, state):  # (B, n_q, k) -> (B, 1, k * 1920), equal to the offline decode
        return self.decode_latent(self.quantizer.decode(codes), state)


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
                              center=False, return_complex=True) / self.window.pow(2).sum().sqrt()
        spec = spec.view(B, C, *spec.shape[1:])  # (B, C, F, frames)
        # (B, 2C, frames, F), channels-last: thin 2D convs run faster so on a CPU (same numbers)
        z = torch.cat([spec.real, spec.imag], 1).transpose(2, 3).contiguous(memory_format=torch.channels_last)
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

# ----------------------------------------------------------------------------- loss
# Mimi

def generator_adv_loss(logits_fake):  # hinge: 1/K sum_k mean relu(1 - D_k(x_hat))
    return sum(F.relu(1 - l.float()).mean() for l in logits_fake) / len(logits_fake)


def feature_loss(fmap_real, fmap_fake):  # relative feature matching: mean |D(x) - D(x_hat)| / mean |D(x)|
    terms = [(r.float() - f.float()).abs().mean() / r.float().abs().mean().clamp(min=1e-8)
             for fr, ff in zip(fmap_real, fmap_fake) for r, f in zip(fr, ff)]
    return sum(terms) / len(terms)


def discriminator_loss(logits_real, logits_fake):  # hinge: relu(1 - D(x)) + relu(1 + D(x_hat))
    return sum(F.relu(1 - r.float()).mean() + F.relu(1 + f.float()).mean()
               for r, f in zip(logits_real, logits_fake)) / len(logits_real)


def power_mel(x, n_fft, cfg):
    """S_i of EnCodec's l_f as audiocraft builds it: hop n_fft / 4, reflect-padded (n_fft - hop) / 2 at each
    end, |STFT|^2 over the window's energy, unnormalised HTK mels. (B, C, T) -> (B * C, n_mels, frames)."""
    hop, T = n_fft // 4, x.shape[-1]
    fb = common.mel_filterbank(cfg.sample_rate, n_fft, cfg.n_mels, htk=True, norm=None)
    fb = torch.from_numpy(fb).to(x.device)
    win = torch.hann_window(n_fft, device=x.device)
    with torch.autocast(x.device.type, enabled=False):
        edge = (n_fft - hop) // 2
        y = F.pad(x.float().reshape(-1, 1, T), (edge, edge), "reflect")[:, 0]
        y = F.pad(y, (0, -(y.shape[-1] - n_fft) % hop))
        power = torch.stft(y, n_fft, hop, window=win, center=False, return_complex=True).abs().pow(2)
        return fb @ (power / win.pow(2).sum())


def reconstruction_losses(x, x_hat, cfg):
    """EnCodec's l_t (time L1) and l_f: per scale 2^i, L1 between the power mels (the loud bins) + mel_alpha x
    MSE between their log10 (the quiet ones: consonants, upper harmonics), averaged over the scales."""
    l_t = F.l1_loss(x_hat.float(), x.float())
    l_f = 0.0
    for i in cfg.mel_scales:
        a, b = power_mel(x, 2 ** i, cfg), power_mel(x_hat, 2 ** i, cfg)
        l_f = l_f + F.l1_loss(b, a) + cfg.mel_alpha * F.mse_loss(torch.log10(1e-5 + b), torch.log10(1e-5 + a))
    return l_t, l_f / len(cfg.mel_scales)


def distill_loss(pred, target):
    """§3.3: cosine distance between the projected semantic VQ output and the teacher's features, per frame.
    pred, target: (B, dim, F); 0 when every frame points the same way."""
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=1)).mean()

# ----------------------------------------------------------------------------- data
# Mimi

TEACHER_RATE = 50  # Hz: WavLM's frame rate (hop 320 at 16 kHz): 4 teacher frames per 80 ms Mimi frame


def standin_teacher(x, cfg):
    """The STAND-IN for WavLM (no --teacher): 80-bin log-mels at 50 Hz, normalised over the clip (removing the
    speaker's average), pooled 4:1 to Mimi's frames: spectral shape, not WavLM. (B, 1, T) -> (B, 80, F)."""
    hop = int(cfg.sample_rate / cfg.frame_rate) // 4  # 4 frames per Mimi frame, as WavLM's 50 Hz: 480
    mel = common.mel_spectrogram(x[:, 0], cfg.sample_rate, n_fft=4 * hop, hop=hop, n_mels=80)  # (B, 80, t)
    mel = (mel - mel.mean(-1, keepdim=True)) / (mel.std(-1, keepdim=True) + 1e-5)
    return pool_to_frames(mel, cfg)


def pool_to_frames(feats, cfg):
    """(B, dim, n at 50 Hz) -> (B, dim, n / 4 at 12.5 Hz): the mean of the 4 teacher frames per Mimi frame."""
    n = feats.shape[-1] // 4 * 4
    return feats[..., :n].view(*feats.shape[:2], -1, 4).mean(-1)  # (B, dim, n/4, 4) -> (B, dim, n/4)


def load_teacher(cfg, utts):
    """WavLM features of each clip from --teacher=DIR: DIR/<utt id>.npy, (frames, dim) at 50 Hz, or None."""
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


def teacher_dim(cfg):  # the teacher features' width (the stand-in: 80 mels)
    if not cfg.teacher:
        return 80
    first = sorted(f for f in os.listdir(cfg.teacher) if f.endswith(".npy"))
    if not first:
        raise SystemExit(f"error: --teacher={cfg.teacher!r} holds no .npy features")
    return np.load(os.path.join(cfg.teacher, first[0]), mmap_mode="r").shape[-1]


def get_batch(sampler, cfg, rt, teacher=None):
    """(B, 1, segment) waveforms and their teacher features (B, dim, segment / 1920) at Mimi's frame rate,
    cut where the sampler (common.SegmentSampler, crops aligned to frames) began each crop."""
    x, idx = sampler.next()
    x = x.view(cfg.batch_size, 1, cfg.segment)
    if teacher is None:
        t = standin_teacher(x, cfg)
    else:
        n = cfg.segment * TEACHER_RATE // cfg.sample_rate
        rows = []
        for i, s in zip(idx.tolist(), sampler.last_starts):
            f = np.asarray(teacher[i][s * TEACHER_RATE // cfg.sample_rate:][:n], dtype=np.float32)
            rows.append(np.pad(f, ((0, n - f.shape[0]), (0, 0))).T)  # (dim, n)
        t = pool_to_frames(torch.from_numpy(np.stack(rows)), cfg)
    return x.to(rt.device), t.to(rt.device)


def speech(cfg, split):
    return common.load_corpus(cfg, split, cfg.sample_rate, kind="speech")

# ----------------------------------------------------------------------------- train
# Mimi

class StepCounter:  # the step inside `state`, so train_step's per-step draws survive a resume
    step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, sd):
        self.step = sd["step"]


def build(cfg, rt):
    """Mimi (G), its discriminator (D), the distillation projection (P: D -> teacher dim, used in training
    only, so not counted in Mimi's 79.3 M), one AdamW each for G+P and D [recalled], and the step counter."""
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
    rng = random.Random(cfg.seed * 1_000_003 + state["counter"].step)  # the same on every rank, resumable
    n_q = 1 + rng.randint(1, cfg.n_q - 1) if cfg.q_dropout else cfg.n_q
    n_q = 0 if state["counter"].step <= cfg.quantizer_warmup else n_q  # warm-up: a plain autoencoder (ours)
    keep = torch.rand(x.shape[0], device=x.device) < cfg.quant_rate  # one draw for both (official: each)
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
        G = Mimi(official_config(cfg, sd))
        load_official({"G": G}, sd)
        common.log(f"loaded the official Mimi weights from {path}")
    else:
        G = Mimi(cfg)
        common.load_models(common.load_checkpoint(path), cfg, {"G": G}, ARCH_KEYS)
    return G.to(rt.device).eval()


def word_labels(u, n_frames, frame_rate):  # the word (or '<sil>') under the centre of each frame
    return [next((w[0] for w in u.words if w[1] <= (f + 0.5) / frame_rate < w[2]), "<sil>")
            for f in range(n_frames)]


def probe(train_codes, train_labels, test_codes, test_labels):
    """Linear probe on the one-hot semantic code -> word identity. For one-hot inputs the maximum-likelihood
    softmax regression is the per-code label histogram, so the probe is closed-form: predict each code's most
    frequent word (unseen codes: the overall most frequent). Returns (accuracy, majority-class baseline)."""
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
    """On held-out speech (an unseen voice): SI-SNR and mel distance at eval_n_q codebooks, beside the mel
    distance of decoding an all-zero latent (what a decoder ignoring its input scores), and the word probe
    on the semantic codes. --mode=eval also writes listen_items test clips, resynthesised and original."""
    standalone = model is None
    if standalone:
        rt = common.setup(cfg)
        model = load_for_inference(cfg, rt)
    m = common.unwrap(model)
    was_training, dev = m.training, next(m.parameters()).device
    m.eval()
    if standalone and cfg.listen_items:  # whole test clips for the corpus ASR to judge, and their originals
        code = lambda x: m.decode(m.encode(x[None].to(dev), cfg.eval_n_q))[0, :, :x.shape[-1]]  # (1, T)
        utts = speech(cfg, "test")[:cfg.listen_items]
        common.write_listening_sets(os.path.join(cfg.out_dir, "listen"), utts, {"resynth": code},
                                    cfg.sample_rate, pngs=2)
    n = int(cfg.eval_seconds * cfg.sample_rate) // m.frame_size * m.frame_size
    snr, mel, zero, codes = [], [], [], []
    for i, u in enumerate(speech(cfg, split)[:cfg.eval_items]):
        x = torch.from_numpy(u.wav[:n])[None, None].to(dev)  # (1, 1, T)
        c = m.encode(x, cfg.eval_n_q)
        y = m.decode(c)[..., :x.shape[-1]]
        snr.append(common.si_snr(y, x))
        mel.append(common.mel_distance(y.cpu(), x.cpu(), cfg.sample_rate))
        y0 = m.decode_latent(torch.zeros(1, cfg.dimension, c.shape[-1], device=dev))[..., :x.shape[-1]]
        zero.append(common.mel_distance(y0.cpu(), x.cpu(), cfg.sample_rate))
        codes += c[0, 0].tolist()
        if samples_dir and i == 0:
            common.save_sample(samples_dir, f"{split}_{u.id}_{m.kbps(cfg.eval_n_q):g}kbps", y[0].cpu(),
                               cfg.sample_rate, ref=x[0].cpu())
    probe_codes = {}  # whole clips: a few 80 ms frames per word, so the probe needs thousands of frames
    for part in ("train", split):
        probe_codes[part] = pc = ([], [])
        for u in speech(cfg, part)[:cfg.probe_items]:
            c = m.encode(torch.from_numpy(u.wav)[None, None].to(dev), 1)[0, 0].tolist()
            pc[0].extend(c)
            pc[1].extend(word_labels(u, len(c), cfg.frame_rate))
    acc, base = probe(*probe_codes["train"], *probe_codes[split])
    res = dict(si_snr=round(float(np.mean(snr)), 3), mel=round(float(np.mean(mel)), 4),
               mel_zero_latent=round(float(np.mean(zero)), 4), kbps=m.kbps(cfg.eval_n_q),
               probe_acc=round(acc, 4), probe_majority=round(base, 4), codes_used=len(set(codes)))
    common.log(f"eval {split} | " + " | ".join(f"{k} {v}" for k, v in res.items()))
    m.train(was_training)
    return res


def train(cfg):
    rt = common.setup(cfg)
    sd = read_official(cfg.init_from) if _is_official_path(cfg.init_from) else None
    if sd is not None:  # the authors' file: its sizes before build, its weights after
        official_config(cfg, sd)
    state = build(cfg, rt)
    n = {k: f"{common.count_params(state[k]):,}" for k in "GDP"}
    common.log(f"params: Mimi {n['G']} | discriminator {n['D']} | distillation projection {n['P']}")
    common.log("semantic teacher: " + (f"WavLM features from {cfg.teacher}" if cfg.teacher else
                                       "STAND-IN (normalised log-mels, not WavLM: pass --teacher=DIR for "
                                       "WavLM features)"))
    train_utts = speech(cfg, "train")
    for utts, split in ((train_utts, "train"), (speech(cfg, "val"), "val")):
        common.check_clips(utts, state["G"].frame_size, f"{split} split")
    teacher = load_teacher(cfg, train_utts)
    sampler = common.SegmentSampler([u._audio for u in train_utts], cfg.segment, cfg.batch_size, cfg.seed,
                                    rt.rank, rt.world_size, align=state["G"].frame_size)
    if sd is not None:
        load_official(state, sd)
        common.log(f"initialized from the official weights {cfg.init_from} (step 0, fresh optimizers)")
        step = 0
    else:
        step = common.init_from(cfg, state, sampler=sampler, arch_keys=ARCH_KEYS)
    state["G"] = common.wrap_ddp(common.compile(state["G"], cfg), rt)
    state["D"] = common.wrap_ddp(common.compile(state["D"], cfg), rt)
    state["P"] = common.wrap_ddp(state["P"], rt)
    common.train_loop(cfg, rt, state, step, train_step, lambda step: get_batch(sampler, cfg, rt, teacher),
                      lambda samples: evaluate(cfg, common.unwrap(state["G"]), rt, samples, split="val"),
                      sampler=sampler)

# ----------------------------------------------------------------------------- sample
# Mimi

@torch.no_grad()
def sample(cfg):
    """Encode --input (or a held-out test clip) to eval_n_q codebooks, decode it, offline and streaming frame
    by frame; write wav + png beside the reference and say how far the two decodes are apart."""
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
        c = G.encode_stream(xp[..., o:o + G.frame_size], enc_state, cfg.eval_n_q)
        ys.append(G.decode_stream(c, dec_state))
    y_stream = torch.cat(ys, -1)[..., :x.shape[-1]]
    out = os.path.join(cfg.out_dir, "samples")
    tag = f"{name}_{G.kbps(cfg.eval_n_q):g}kbps"
    common.save_sample(out, tag, y[0].cpu(), cfg.sample_rate, ref=x[0].cpu())
    common.log(f"{name}: {codes.shape[-1]} frames x {codes.shape[1]} codebooks ({G.kbps(cfg.eval_n_q):g} "
               f"kbps), SI-SNR {common.si_snr(y, x):.2f} dB, streaming vs offline max diff "
               f"{(y_stream - y).abs().max().item():.2e} -> {out}/{tag}.wav")

# ----------------------------------------------------------------------------- bench
# Mimi

def bench(cfg):
    """train_step ms and audio-s/s; encode / decode real-time factor at batch 1, eager vs compiled; the
    per-frame latency of streaming one 80 ms frame through encoder and decoder; FLOP rate."""
    rt = common.setup(cfg)
    state = build(cfg, rt)
    G = state["G"]
    x = torch.randn(cfg.batch_size, 1, cfg.segment, device=rt.device) * 0.1
    batch = (x, standin_teacher(x, cfg).to(rt.device) if not cfg.teacher else
             torch.randn(cfg.batch_size, state["P"].out_channels, cfg.segment // G.frame_size,
                         device=rt.device))
    step_ms = common.timeit(lambda: train_step(state, batch, cfg, rt), iters=cfg.bench_iters, warmup=1)
    flops = common.count_flops(lambda: train_step(state, batch, cfg, rt))
    G.eval()
    T = int(cfg.bench_seconds * cfg.sample_rate) // G.frame_size * G.frame_size
    xb = torch.randn(1, 1, T, device=rt.device) * 0.1
    audio_s = cfg.batch_size * cfg.segment / cfg.sample_rate
    figures = dict(train_step_ms=round(step_ms, 2), train_flops_per_step=flops,
                   train_audio_s_per_s=round(audio_s / (step_ms / 1000), 3))
    compiled = common.compile(G, cfg) is not G
    figures |= common.codec_rtf(lambda x: G.encode(x, cfg.eval_n_q), G.decode, xb, cfg.bench_seconds, rt,
                                compiled, iters=cfg.bench_iters, warmup=1)
    frame = xb[..., :G.frame_size]
    es, ds = {}, {}
    one = lambda: G.decode_stream(G.encode_stream(frame, es, cfg.eval_n_q), ds)
    for _ in range(3):  # warm the caches past their first (shorter) frames
        one()
    figures["stream_frame_ms"] = round(common.timeit(one, iters=max(3, cfg.bench_iters), warmup=1), 3)
    figures["frame_ms"] = 1000 * G.frame_size / cfg.sample_rate  # the real-time budget of one step: 80 ms
    common.report_bench(cfg, rt, model=G, compiled=compiled, **figures)

# ----------------------------------------------------------------------------- model: the Moshi LM (§3.2)

# Helium (§3.2) and the RQ-Transformer (§3.4.1): a temporal Transformer over 80 ms steps, whose input is the
# sum of every stream's embedding at that step, and a small depth Transformer that, within a step, predicts
# after the text token Moshi's semantic token, then its acoustic tokens. Both are made of Helium blocks.

class RMSNorm(nn.Module):
    """Helium's norm (§3.2): x * alpha / sqrt(mean(x^2) + eps) in fp32 (official rms_norm_f32, eps 1e-8)."""

    def __init__(self, dim, eps=1e-8):
        super().__init__()
        self.eps, self.alpha = eps, nn.Parameter(torch.ones(1, 1, dim))

    def forward(self, x):
        xf = x.float()
        rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.alpha.float() * rms).to(x.dtype)


def per_step(w, steps, x, offset):
    """x (B, T, i) through w (steps * o, i). steps = 1: one weight for every position; steps > 1: position
    offset + t has its own (the depth Transformer's weights per codebook step, §3.4.1, stacked on dim 0)."""
    if steps == 1:
        return x @ w.t()
    w = w.view(steps, -1, w.shape[-1])[offset:offset + x.shape[1]]  # (T, o, i)
    return torch.einsum("bti,toi->bto", x, w)


class HeliumLayer(nn.Module):
    """Pre-norm block (§3.2): x += Attn(RMSNorm(x)); x += W_out(SiLU(W_g h) * W_v h), h = RMSNorm(x). Causal
    attention over at most `context` positions, interleaved RoPE (the depth Transformer: no positions)."""

    def __init__(self, dim, heads, ffn, context, rope=True, steps=1):
        super().__init__()
        hidden = 21 * dim // 8 if ffn == 4 * dim else 2 * ffn // 3  # gated hidden: 2/3 of the nominal width
        self.heads, self.context, self.rope, self.steps = heads, context, rope, steps
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.self_attn, self.gating = nn.Module(), nn.Module()
        self.self_attn.in_proj_weight = nn.Parameter(torch.empty(steps * 3 * dim, dim))  # fused q, k, v
        self.self_attn.out_proj_weight = nn.Parameter(torch.empty(steps * dim, dim))
        self.gating.linear_in_weight = nn.Parameter(torch.empty(steps * 2 * hidden, dim))  # gate, value fused
        self.gating.linear_out_weight = nn.Parameter(torch.empty(steps * dim, hidden))
        for p in self.parameters():
            if p.dim() == 2:
                s = p.shape[1] ** -0.5
                nn.init.trunc_normal_(p, std=s, a=-3 * s, b=3 * s)

    def forward(self, x, past=None, offset=0):  # x: (B, T, D) at positions offset .. offset + T - 1
        B, T, D = x.shape
        qkv = per_step(self.self_attn.in_proj_weight, self.steps, self.norm1(x), offset)
        q, k, v = qkv.view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, d)
        a, cache = attend(q, k, v, past, offset, self.context, 10000.0 if self.rope else None)  # (B, T, D)
        x = x + per_step(self.self_attn.out_proj_weight, self.steps, a, offset)
        u = per_step(self.gating.linear_in_weight, self.steps, self.norm2(x), offset)
        u = u.view(B, T, 2, -1)  # (B, T, 2, hidden): gate, value
        h = F.silu(u[..., 0, :]) * u[..., 1, :]
        x = x + per_step(self.gating.linear_out_weight, self.steps, h, offset)
        return x, cache


class Stack(nn.Module):
    """Helium layers; forward(x, cache, offset) -> (x, cache), cache = one (k, v) per layer or None."""

    def __init__(self, n, *args, **kw):
        super().__init__()
        self.layers = nn.ModuleList(HeliumLayer(*args, **kw) for _ in range(n))

    def forward(self, x, cache=None, offset=0):
        new = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, None if cache is None else cache[i], offset)
            new.append(c)
        return x, new


def lm_delays(cfg):
    """§3.4.2: text 0, then per audio stream (Moshi's, the user's) semantic 0 and acoustic `acoustic_delay`:
    the acoustic tokens of a frame are predicted knowing its semantic token."""
    audio = [0] + [cfg.acoustic_delay] * (cfg.dep_q - 1)
    return [0] + audio + audio


def delay(codes, delays, initial):
    """(B, K, T) -> (B, K, T): stream k shifted right by delays[k], its first delays[k] steps `initial`."""
    out = codes.clone()
    for k, d in enumerate(delays):
        if d:
            out[:, k, d:], out[:, k, :d] = codes[:, k, :-d], initial[k]
    return out


def undelay(x, delays):
    """The inverse on (B, K, T, ...) logits: stream k shifted left by delays[k]; the last delays[k] steps have
    no prediction (NaN, mask False). -> (x, mask (B, K, T))."""
    out, mask = x.clone(), torch.ones(x.shape[:3], dtype=torch.bool, device=x.device)
    for k, d in enumerate(delays):
        if d:
            out[:, k, :-d], out[:, k, -d:], mask[:, k, -d:] = x[:, k, d:], float("nan"), False
    return out, mask


class MoshiLM(nn.Module):
    """The RQ-Transformer over 1 + 2 * dep_q streams (§3.4): Moshi's text (inner monologue), Moshi's audio
    codebooks, the user's. Key names are the official ones. Token -1 embeds to zero (absent, no loss)."""

    def __init__(self, cfg):
        super().__init__()
        D, Dd, K = cfg.lm_dim, cfg.dep_dim, cfg.dep_q
        self.cfg, self.K, self.delays = cfg, K, lm_delays(cfg)
        self.card, self.text_card = cfg.lm_card, cfg.text_card
        # row `card` / `text_card` is the initial token, fed before the first step (the "card + 1" of §3.6)
        self.text_emb = nn.Embedding(cfg.text_card + 1, D)
        self.emb = nn.ModuleList(nn.Embedding(cfg.lm_card + 1, D) for _ in range(2 * K))
        self.transformer = Stack(cfg.lm_layers, D, cfg.lm_heads, int(cfg.lm_hidden_scale * D), cfg.lm_context)
        self.out_norm = RMSNorm(D)
        self.text_linear = nn.Linear(D, cfg.text_card, bias=False)
        # the depth Transformer: per codebook step its own projection of z_t, attention and FFN weights
        self.depformer_in = nn.ModuleList(nn.Linear(D, Dd, bias=False) for _ in range(K))
        self.depformer_text_emb = nn.Embedding(cfg.text_card + 1, Dd)
        self.depformer_emb = nn.ModuleList(nn.Embedding(cfg.lm_card + 1, Dd) for _ in range(K - 1))
        self.depformer = Stack(cfg.dep_layers, Dd, cfg.dep_heads, cfg.dep_ffn, K, rope=False, steps=K)
        self.linears = nn.ModuleList(nn.Linear(Dd, cfg.lm_card, bias=False) for _ in range(K))
        for m in self.modules():  # official init: truncated normal, std 1/sqrt(fan in) (embeddings: dim)
            if isinstance(m, (nn.Linear, nn.Embedding)):
                s = m.weight.shape[1] ** -0.5
                nn.init.trunc_normal_(m.weight, std=s, a=-3 * s, b=3 * s)

    def initial(self):  # (1 + 2K,): the token each stream starts from
        return [self.text_card] + [self.card] * (2 * self.K)

    @staticmethod
    def embed(table, tokens):  # -1 embeds to exactly zero
        e = table(tokens.clamp(min=0))
        return torch.where((tokens == -1)[..., None], torch.zeros((), dtype=e.dtype, device=e.device), e)

    def temporal(self, seq, cache=None, offset=0):
        """seq: (B, 1 + 2K, S) delayed tokens at steps offset.. -> z_s (B, S, D), text logits
        (B, S, text_card), KV cache. A step's input is the SUM of its streams' embeddings."""
        x = self.embed(self.text_emb, seq[:, 0])
        for k, e in enumerate(self.emb):
            x = x + self.embed(e, seq[:, 1 + k])  # (B, S, D)
        z, cache = self.transformer(x, cache, offset)
        z = self.out_norm(z)
        return z, self.text_linear(z), cache

    def depth_input(self, k, z, prev):
        """Depth step k: its projection of z (B, S, D) + the embedding of the step's previous token
        prev (B, S) (k = 0: the text token; k >= 1: Moshi's audio token k - 1)."""
        table = self.depformer_text_emb if k == 0 else self.depformer_emb[k - 1]
        return self.depformer_in[k](z) + self.embed(table, prev)

    def depth(self, z, prev):
        """Teacher-forced depth Transformer, causal along k: z (B, S, D), prev (B, K, S) the text token and
        Moshi's audio tokens 0 .. K-2 of each step -> logits (B, K, S, card)."""
        B, S, _ = z.shape
        x = torch.stack([self.depth_input(k, z, prev[:, k]) for k in range(self.K)], 2)  # (B, S, K, Dd)
        y, _ = self.depformer(x.reshape(B * S, self.K, -1))  # (B*S, K, Dd): positions = codebook steps
        y = y.view(B, S, self.K, -1)
        return torch.stack([self.linears[k](y[:, :, k]) for k in range(self.K)], 1)  # (B, K, S, card)

    def forward(self, codes, aligned=True):
        """§3.4: codes (B, 1 + 2K, T) -> audio logits (B, K, T, card), mask, text logits (B, 1, T, V), mask:
        delay, prepend the initial tokens, temporal Transformer, teacher-forced depth, undelay (aligned=False:
        none; training takes the loss against the delayed codes instead)."""
        B, _, T = codes.shape
        init = torch.tensor(self.initial(), device=codes.device)
        seq = torch.cat([init.view(1, -1, 1).expand(B, -1, 1), delay(codes, self.delays, self.initial())], 2)
        z, text_logits, _ = self.temporal(seq[:, :, :-1])  # step s sees the streams up to s - 1 only
        logits = self.depth(z, seq[:, :self.K, 1:])  # (B, K, T, card)
        if not aligned:
            return logits, text_logits[:, None]
        logits, mask = undelay(logits, self.delays[1:1 + self.K])
        mask = mask & (codes[:, 1:1 + self.K] != -1)
        return logits, mask, text_logits[:, None], (codes[:, :1] != -1)

# ----------------------------------------------------------------------------- loss: the Moshi LM

def lm_loss(logits, text_logits, codes, cfg):
    """§3.4.3: L = CE_text + CE_audio, each a weighted mean over its valid positions: PAD and EPAD targets
    weigh text_pad_weight (0.5), the semantic codebook semantic_weight (100) against 1 per acoustic one, so
    the tokens that carry the words dominate. Logits and codes in delayed time; -1 has no loss."""
    K, tt, at = logits.shape[1], codes[:, :1], codes[:, 1:1 + logits.shape[1]]  # (B, 1, T), (B, K, T)
    pad, epad = text_pad_ids(cfg)
    mask, text_mask = at != -1, tt != -1
    w_t = torch.where((tt == pad) | (tt == epad), cfg.text_pad_weight, 1.0) * text_mask
    ce = lambda lg, t: F.cross_entropy(lg.float().flatten(0, 2), t.clamp(min=0).flatten(), reduction="none")
    ce_t, ce_a = ce(text_logits, tt).view_as(tt), ce(logits, at).view_as(at)
    w_a = torch.tensor([cfg.semantic_weight] + [1.0] * (K - 1), device=codes.device).view(1, K, 1) * mask
    mean = lambda x, w: (x * w).sum() / w.sum().clamp(min=1e-8)
    return dict(text=mean(ce_t, w_t), audio=mean(ce_a, w_a),
                semantic=mean(ce_a[:, :1], mask[:, :1].float()),
                acoustic=mean(ce_a[:, 1:], mask[:, 1:].float()))

# ----------------------------------------------------------------------------- data: the Moshi LM

def text_pad_ids(cfg):  # PAD and EPAD (end of padding, §3.4.4): the text vocabulary's last two ids
    return cfg.text_card - 2, cfg.text_card - 1


class TextTokenizer:
    """Moshi's text side: a byte-level BPE of the corpus text in place of the 32k SentencePiece, PAD and EPAD
    its last two ids (official: EPAD 0, PAD 3). It lives in `state`, so every checkpoint carries it."""

    def __init__(self, cfg, texts=()):
        self.pad, self.epad = text_pad_ids(cfg)
        self.ranks, self._enc = (common.train_bpe(texts, cfg.text_card - 2) if texts else {}), None

    def enc(self):
        self._enc = self._enc or common.bpe_encoding(self.ranks)
        return self._enc

    def word(self, w):  # a word's tokens, with its leading space
        return self.enc().encode_ordinary(" " + w)

    def words(self, ids, times):
        """Text-stream tokens and their times -> [(word, time of its first token)]: a token that starts with a
        space starts a word; PAD, EPAD and ids outside the BPE are skipped."""
        out = []
        for i, t in zip(ids, times):
            if i >= len(self.ranks):
                continue
            b = self.enc().decode_single_token_bytes(i).decode("utf-8", "replace")
            if b.startswith(" ") or not out:
                out.append([b.strip(), t])
            else:
                out[-1][0] += b
        return [(w, t) for w, t in out if w]

    def state_dict(self):
        return {"ranks": common.ranks_to_text(self.ranks)}

    def load_state_dict(self, sd):
        self.ranks, self._enc = common.ranks_from_text(sd["ranks"]), None


def text_stream(words, n_frames, tok, frame_rate):
    """Inner monologue (§3.4.4): Moshi's words on the frames of its own speech. A word's tokens start at the
    frame of its start time, the frame before is EPAD, every other frame PAD (moshi-finetune's Interleaver).
    Ours: where the Interleaver cuts a word short because the next one starts, the word starts earlier
    instead (placed from the last word back), so every word stays whole and never follows its audio."""
    out, limit = np.full(n_frames, tok.pad, np.int64), n_frames
    for w, start, _ in reversed(words):
        ids = tok.word(w)
        first = max(0, min(int(start * frame_rate), limit - len(ids)))
        ids = ids[:max(0, limit - first)]
        if int(start * frame_rate) >= n_frames or not ids:
            continue
        out[first:first + len(ids)] = ids
        if first > 0:
            out[first - 1] = tok.epad
        limit = first - 1
    return out


def lm_corpus(cfg):  # the config the LM's data comes from: the built-in corpus at lm_corpus_hours
    return dataclasses.replace(cfg, corpus_hours=cfg.lm_corpus_hours)


def corpus_texts(cfg):
    """Stage 1 text (Helium pretraining in miniature): the speech corpus's sentences, the dialogues' lines."""
    # at the corpus's own rate: only the text is read, so 16 h of audio is neither resampled nor held in memory
    lines = [u.text for u in common.load_corpus(lm_corpus(cfg), "train", common.ESPEAK_SR, kind="speech")]
    for u in dialogues(cfg, "train"):
        lines += [l.split(": ", 1)[1] for l in u.text.split(" / ")]
    return lines


def dialogues(cfg, split):
    return common.load_corpus(lm_corpus(cfg), split, cfg.sample_rate, kind="dialogue", mono=False)


def dialogue_tokens(cfg, split, mimi, tok):
    """Every dialogue of `split` as (1 + 2K, F) tokens: Moshi's text stream, Moshi's K Mimi codes (channel 1),
    the user's (channel 0). The codes are computed once, cached in out_dir/codes by codec, corpus and K."""
    st = os.stat(cfg.codec)
    key = hashlib.md5(f"{os.path.abspath(cfg.codec)}|{st.st_size}|{st.st_mtime}|{cfg.lm_corpus_hours}|"
                      f"{cfg.data_dir}|{cfg.dep_q}".encode()).hexdigest()[:10]
    path = os.path.join(cfg.out_dir, "codes", f"dialogue-{split}-{key}.npz")
    utts = dialogues(cfg, split)
    if os.path.exists(path):
        with np.load(path) as z:
            codes = [z[f"d{i}"] for i in range(len(utts))]
    else:
        dev, codes = next(mimi.parameters()).device, []
        for u in utts:
            x = torch.from_numpy(u.wav)[:, None].to(dev)  # (2, 1, T): the two channels as a batch
            codes.append(mimi.encode(x, cfg.dep_q).cpu().numpy().astype(np.int16))  # (2, K, F)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **{f"d{i}": c for i, c in enumerate(codes)})
        os.replace(tmp, path)
    out = []
    for u, c in zip(utts, codes):
        text = text_stream(u.words[1], c.shape[-1], tok, cfg.frame_rate)
        out.append(np.concatenate([text[None], c[1], c[0]]).astype(np.int32))  # (1 + 2K, F)
    return utts, out


class LMSampler:
    """Crops of lm_frames steps of the text stream (stage 1: audio absent, -1) and of the dialogues (stage 2),
    stored + 1 so that common.SegmentSampler's zero padding reads as -1."""

    def __init__(self, text_ids, dial, cfg, rt):
        K = cfg.dep_q
        text = np.zeros((1 + 2 * K, len(text_ids)), np.int32)
        text[0] = np.asarray(text_ids) + 1
        self.text = common.SegmentSampler([text], cfg.lm_frames, cfg.batch_size, cfg.seed, rt.rank,
                                          rt.world_size)
        self.dial = common.SegmentSampler([d + 1 for d in dial], cfg.lm_frames, cfg.batch_size, cfg.seed + 1,
                                          rt.rank, rt.world_size)

    def next(self, text):
        return (self.text if text else self.dial).next()[0].long() - 1  # (B, 1 + 2K, lm_frames)

    def state_dict(self):
        return {"text": self.text.state_dict(), "dial": self.dial.state_dict()}

    def load_state_dict(self, sd):
        self.text.load_state_dict(sd["text"]), self.dial.load_state_dict(sd["dial"])


def delayed_targets(codes, cfg):  # the codes in delayed time, -1 (no loss) where a delay left no target
    return delay(codes, lm_delays(cfg), [-1] * codes.shape[1])


def lm_get_batch(sampler, cfg, rt, step):
    """Stage 1 (Helium on text) for the first text_iters steps, then stage 2 (the dialogues, two streams)."""
    return sampler.next(step < cfg.text_iters).to(rt.device)

# ----------------------------------------------------------------------------- train: the Moshi LM

def load_codec(cfg, rt):
    """The Mimi whose codes the LM models (--codec: our codec checkpoint or the official file), frozen."""
    if not cfg.codec or not os.path.isfile(cfg.codec):
        raise SystemExit(f"error: --stage=lm needs --codec=PATH, a Mimi checkpoint (got {cfg.codec!r}): "
                         "train one with `python moshi.py`, or pass the official tokenizer-*.safetensors")
    ccfg = common.parse_config(Config, PRESETS, [f"--init_from={cfg.codec}", "--stage=codec", "--mode=sample",
                                                 f"--device={cfg.device}"])
    mimi = load_for_inference(ccfg, rt)
    mc = mimi.cfg
    if mc.codebook_size != cfg.lm_card or mc.n_q < cfg.dep_q or mc.sample_rate != cfg.sample_rate:
        raise SystemExit(f"error: the codec {cfg.codec!r} has {mc.n_q} codebooks of {mc.codebook_size} at "
                         f"{mc.sample_rate} Hz: pass --lm_card={mc.codebook_size} and --dep_q <= "
                         f"{mc.n_q} (now {cfg.lm_card}, {cfg.dep_q})")
    return mimi.requires_grad_(False)


def lm_build(cfg, rt):
    """The LM (model), AdamW [recalled: Helium's betas 0.9/0.95, weight decay 0.1], linear warmup then cosine
    decay to 10 % at lr_decay_iters (§3.2's cosine schedule), the step counter, and the text tokenizer."""
    torch.manual_seed(cfg.seed)
    model = MoshiLM(cfg).to(rt.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm, decay = max(1, cfg.lr_decay_iters // 20), cfg.lr_decay_iters
    cos = lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * min(s, decay) / decay))
    lr_at = lambda s: min(1.0, (s + 1) / warm) * cos(s)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    return dict(model=model, opt=opt, sched=sched, tok=TextTokenizer(cfg, corpus_texts(cfg)))


def lm_train_step(state, batch, cfg, rt):
    """One step of L = CE_text + CE_audio (§3.4.3) on a (B, 1 + 2K, T) batch, gradients clipped at 1."""
    model, opt = state["model"], state["opt"]
    with rt.autocast():
        logits, text_logits = model(batch, aligned=False)
    losses = lm_loss(logits, text_logits, delayed_targets(batch, cfg), cfg)
    total = losses["text"] + losses["audio"]
    opt.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    state["sched"].step()
    return dict(loss=total.detach(), **{k: v.detach() for k, v in losses.items()})


def lm_load_for_inference(cfg, rt):
    """(LM, tokenizer, Mimi) from our LM checkpoint (--init_from) and its codec (--codec, in its config)."""
    path = common.checkpoint_path(cfg)
    if cfg.init_from == "scratch" or not os.path.exists(path):
        raise SystemExit(f"error: LM checkpoint {path!r} does not exist (train one with --stage=lm, then "
                         "pass --init_from=PATH)")
    ckpt = common.load_checkpoint(path)
    lm, tok = MoshiLM(cfg), TextTokenizer(cfg)
    common.load_models(ckpt, cfg, {"model": lm}, LM_ARCH_KEYS)
    tok.load_state_dict(ckpt["state"]["tok"])
    return lm.to(rt.device).eval(), tok, load_codec(cfg, rt).eval()


def dialogue_turns(u):
    """[(channel, [(word, start, end)])] per line of a built-in dialogue, from its script and word times."""
    lines = [l.split(": ", 1) for l in u.text.split(" / ")]
    it, turns = [iter(u.words[0]), iter(u.words[1])], []
    for who, text in lines:
        ch = 0 if who == "user" else 1
        turns.append((ch, [next(it[ch], None) for _ in text.split()]))
    return None if any(w is None for _, ws in turns for w in ws) else turns


def answer_turns(u, seconds):
    """Per scripted question and Moshi's reply ending inside the cut: [question [(word, start, end)], reply,
    when the next user turn starts, position]: "first" (the greeting), "last" (the thanks) or "middle" (a
    question: only there do the answer words depend on what the user asked)."""
    turns = dialogue_turns(u) or []
    out = [[q, r, next((ws[0][1] for c, ws in turns[i + 2:] if c == 0), float("inf")), "middle"]
           for i, ((c0, q), (c1, r)) in enumerate(zip(turns, turns[1:])) if c0 == 0 and c1 == 1]
    if out:
        out[0][3], out[-1][3] = "first", "last"
    return [t for t in out if t[1][-1][2] <= seconds]


def answer_scores(u, said, seconds, positions=("first", "middle", "last")):
    """Does Moshi answer? Per question and reply at `positions`: the reply's words the question lacks ("seven",
    "blue") found in Moshi's text stream said [(word, time)] before the next user turn, and the latency from
    the question's end to Moshi's first word, beside the corpus's. -> (found, total, [lat s], [ref lat s])."""
    found = total = 0
    lat, ref = [], []
    for q, r, stop, pos in answer_turns(u, seconds):
        if pos not in positions:
            continue
        heard = [w for w, t in said if q[0][1] <= t < stop]
        answer = {w[0] for w in r} - {w[0] for w in q}
        found, total = found + len(answer & set(heard)), total + len(answer)
        first = [t for w, t in said if q[-1][2] <= t < stop]
        if first:
            lat.append(first[0] - q[-1][2])
        ref.append(r[0][1] - q[-1][2])
    return found, total, lat, ref


def deaf_scores(train, utts, seconds):
    """The trivial baseline: a responder that hears nothing and says, at each question's start, the one reply
    of the training dialogues that scores best at that position. -> (found, total) on utts, at every
    position and at the questions ("middle") alone."""
    def said(u, lines):  # {position: line} -> the text stream: each line's words at its question's start
        return [(w, q[0][1]) for q, _, _, p in answer_turns(u, seconds) for w in lines.get(p, "").split()]

    def score(pos, line):  # answer words the line finds at `pos` over the training dialogues
        return sum(answer_scores(u, said(u, {pos: line}), seconds, (pos,))[0] for u in train)
    lines = {}
    for pos in ("first", "middle", "last"):
        counts = {}
        for u in train:
            for _, r, _, p in answer_turns(u, seconds):
                if p == pos:
                    line = " ".join(w[0] for w in r)
                    counts[line] = counts.get(line, 0) + 1
        top = sorted(counts, key=counts.get, reverse=True)[:30]  # the 30 commonest replies are candidates
        lines[pos] = max(top or [""], key=lambda line: score(pos, line))
    every = [answer_scores(u, said(u, lines), seconds)[:2] for u in utts]
    middle = [answer_scores(u, said(u, lines), seconds, ("middle",))[:2] for u in utts]
    return tuple(sum(x[i] for x in xs) for xs in (every, middle) for i in (0, 1))


@torch.no_grad()
def lm_evaluate(cfg, bundle=None, rt=None, samples_dir=None, split="test"):
    """On held-out dialogues: the teacher-forced losses (text, semantic, acoustic CE), then full-duplex
    conversations with the user's channel streamed in: answer-word accuracy in Moshi's text stream, at every
    turn and at the questions alone, beside a responder that hears nothing (deaf_scores), and its turn-taking
    latency (model time; playback adds the 160 ms of §3.4.3), beside the corpus's own latency."""
    if bundle is None:  # --mode=eval: every conversation is written, for an ASR to transcribe Moshi's channel
        rt = common.setup(cfg)
        bundle = lm_load_for_inference(cfg, rt)
        samples_dir = os.path.join(cfg.out_dir, "samples", f"eval_{split}")
    lm, tok, mimi = bundle
    lm = common.unwrap(lm)
    was_training, dev = lm.training, next(lm.parameters()).device
    lm.eval()
    utts, toks = dialogue_tokens(cfg, split, mimi, tok)
    sums = {}
    for c in toks[:cfg.eval_items]:
        codes = torch.from_numpy(c[:, :cfg.lm_context]).long()[None].to(dev)
        for k, v in lm_loss(*lm(codes, aligned=False), delayed_targets(codes, cfg), cfg).items():
            sums[k] = sums.get(k, 0.0) + float(v) / min(len(toks), cfg.eval_items)
    found = total = q_found = q_total = 0
    lat, ref = [], []
    for i, u in enumerate(utts[:cfg.eval_items]):
        user = u.wav[0, :int(cfg.converse_seconds * cfg.sample_rate)]
        audio, text = converse(lm, mimi, user, cfg, seed=cfg.seed + i)
        said = tok.words(text, [s / cfg.frame_rate for s in range(len(text))])
        a, b, l, r = answer_scores(u, said, cfg.converse_seconds)
        found, total, lat, ref = found + a, total + b, lat + l, ref + r
        a, b, _, _ = answer_scores(u, said, cfg.converse_seconds, ("middle",))
        q_found, q_total = q_found + a, q_total + b
        if samples_dir:
            write_conversation(samples_dir, f"{split}_{u.id}", user, audio, said, cfg)
    res = {k: round(v, 4) for k, v in sums.items()}
    deaf = deaf_scores(dialogues(cfg, "train")[:200], utts[:cfg.eval_items], cfg.converse_seconds)
    res.update(answer_acc=round(found / max(1, total), 4), answer_words=total,
               deaf_answer_acc=round(deaf[0] / max(1, deaf[1]), 4),
               question_acc=round(q_found / max(1, q_total), 4), question_words=q_total,
               deaf_question_acc=round(deaf[2] / max(1, deaf[3]), 4),
               latency_ms=round(1000 * float(np.median(lat)), 1) if lat else None,
               corpus_latency_ms=round(1000 * float(np.median(ref)), 1) if ref else None,
               replied=f"{len(lat)}/{len(ref)}")
    common.log(f"eval {split} | " + " | ".join(f"{k} {v}" for k, v in res.items()))
    lm.train(was_training)
    return res


def lm_train(cfg):
    cfg = dataclasses.replace(cfg, max_iters=cfg.lm_max_iters or cfg.max_iters)  # the codec's is max_iters
    rt = common.setup(cfg)
    state = lm_build(cfg, rt)
    common.log(f"params: LM {common.count_params(state['model']):,} (temporal + depth Transformer, "
               "embeddings)")
    mimi = load_codec(cfg, rt)
    tok = state["tok"]
    _, train_d = dialogue_tokens(cfg, "train", mimi, tok)
    for d, split in ((train_d, "train"), (dialogue_tokens(cfg, "val", mimi, tok)[1], "val")):
        common.check_clips(d, 2, f"{split} split (dialogue)")
    text_ids = [i for line in corpus_texts(cfg) for w in line.split() for i in tok.word(w)]
    common.log(f"stage 1: {cfg.text_iters} steps of text ({len(text_ids):,} tokens); stage 2: {len(train_d)} "
               f"dialogues ({sum(d.shape[-1] for d in train_d) / cfg.frame_rate / 60:.1f} min) of Mimi codes")
    sampler = LMSampler(text_ids, train_d, cfg, rt)
    step = common.init_from(cfg, state, sampler=sampler, arch_keys=LM_ARCH_KEYS)
    state["model"] = common.wrap_ddp(common.compile(state["model"], cfg), rt)

    def evaluate_val(samples):  # the objective, L = CE_text + CE_audio, on val: the early stop watches it
        res = lm_evaluate(cfg, (common.unwrap(state["model"]), tok, mimi), rt, samples, split="val")
        return res["text"] + res["audio"]
    common.train_loop(cfg, rt, state, step, lm_train_step, lambda step: lm_get_batch(sampler, cfg, rt, step),
                      evaluate_val, sampler=sampler, patience=cfg.patience,
                      audio_seconds=cfg.batch_size * rt.world_size * cfg.lm_frames / cfg.frame_rate)

# ----------------------------------------------------------------------------- sample: the Moshi LM

def sample_token(logits, temp, top_k, gen):
    """§3.4.3: top-k sampling at a temperature (temp 0: greedy). logits (B, V) -> (B,)."""
    if temp <= 0:
        return logits.argmax(-1)
    v, i = logits.float().topk(min(top_k, logits.shape[-1]), -1)
    j = torch.multinomial(F.softmax(v / temp, -1), 1, generator=gen)
    return i.gather(-1, j)[:, 0]


class LMState:
    """One conversation's streaming state (§3.4.3, the official LMGen): the temporal KV cache, the step and
    the grid of delayed tokens (B, 1 + 2K, steps + 2) its inputs come from; -2 = not yet known."""

    def __init__(self, lm, B, steps, device):
        self.seq = torch.full((B, 1 + 2 * lm.K, steps + max(lm.delays) + 2), -2, dtype=torch.long,
                              device=device)
        self.init = torch.tensor(lm.initial(), device=device)
        self.delays = torch.tensor(lm.delays, device=device)
        self.cache, self.offset = None, 0

    def input(self):  # (B, 1 + 2K, 1): step s reads column s; a stream its initial token while s <= delay
        col = self.seq[:, :, self.offset]
        return torch.where(self.offset <= self.delays, self.init, col)[:, :, None]

    def moshi_frame(self, f, K):  # Moshi's K codes of frame f, complete after step f + max delay: (B, K, 1)
        cols = [self.seq[:, 1 + k, f + 1 + int(self.delays[1 + k])] for k in range(K)]
        return torch.stack(cols, 1)[:, :, None]


@torch.no_grad()
def lm_step(lm, st, user, cfg, gen):
    """One 80 ms step: the user's frame (B, K) goes into the grid, the temporal Transformer runs one position,
    the text token is sampled, then the depth Transformer samples Moshi's K audio tokens one by one. ->
    (text (B,), audio (B, K)). User timing as the official LMGen: step s hears frame s, one frame (80 ms)
    fresher than in training, where column t holds user frame t - 1 (frame 0 is not heard)."""
    s, K = st.offset, lm.K
    for k in range(K):
        st.seq[:, 1 + K + k, s + lm.delays[1 + K + k]] = user[:, k]
    z, text_logits, st.cache = lm.temporal(st.input(), st.cache, s)
    prev = text = sample_token(text_logits[:, -1], cfg.temp_text, cfg.top_k_text, gen)
    cache, audio = None, []
    for k in range(K):
        y, cache = lm.depformer(lm.depth_input(k, z, prev[:, None]), cache, k)
        prev = sample_token(lm.linears[k](y[:, -1]), cfg.temp, cfg.top_k, gen)
        audio.append(prev)
    st.seq[:, 0, s + 1], st.seq[:, 1:1 + K, s + 1] = text, torch.stack(audio, 1)
    st.offset += 1
    return text, st.seq[:, 1:1 + K, s + 1]


@torch.no_grad()
def converse(lm, mimi, user_wav, cfg, seed=0):
    """Full duplex (§3.4.3): every 80 ms, encode one user frame with streaming Mimi, run one LM step, decode
    Moshi's frame that just became complete (the acoustic delay holds it one step). user_wav: (T,) ->
    Moshi's audio on the conversation's timeline and its text tokens, one per step."""
    dev, fs, K = next(lm.parameters()).device, mimi.frame_size, lm.K
    x = torch.from_numpy(np.ascontiguousarray(user_wav))[None, None].to(dev)
    x = mimi._pad(x)
    n, lag = x.shape[-1] // fs, max(lm.delays)
    st, enc, dec, gen = LMState(lm, 1, n, dev), {}, {}, torch.Generator(device=dev).manual_seed(seed)
    out, text = [], []
    for f in range(n):
        user = mimi.encode_stream(x[..., f * fs:(f + 1) * fs], enc, K)[:, :, 0]  # (1, K)
        t, _ = lm_step(lm, st, user, cfg, gen)
        text.append(int(t[0]))
        if f >= lag:
            out.append(mimi.decode_stream(st.moshi_frame(f - lag, K), dec)[0, 0])
    audio = torch.cat(out + [torch.zeros(lag * fs, device=dev)]) if out else torch.zeros(n * fs, device=dev)
    return audio.cpu().numpy(), text


def write_conversation(out, name, user, moshi, said, cfg):
    """The two-channel wav (user left, Moshi right), Moshi's channel alone (for an ASR) with a png, and its
    text stream as a timed transcript."""
    n = min(len(user), len(moshi))
    common.save_audio(os.path.join(out, name + ".wav"), np.stack([user[:n], moshi[:n]]), cfg.sample_rate)
    common.save_sample(out, name + "_moshi", moshi[:n], cfg.sample_rate, ref=user[:n])
    with open(os.path.join(out, name + ".txt"), "w") as f:
        f.write("".join(f"{t:7.2f}s  {w}\n" for w, t in said))
    return os.path.join(out, name + ".wav")


@torch.no_grad()
def lm_sample(cfg):
    """A full-duplex conversation with a held-out dialogue's user channel (or --input's first channel)."""
    rt = common.setup(cfg)
    lm, tok, mimi = lm_load_for_inference(cfg, rt)
    if cfg.input:
        wav, _ = common.load_audio(cfg.input, sr=cfg.sample_rate, mono=False)
        user, name = (wav[0] if wav.ndim == 2 else wav), os.path.splitext(os.path.basename(cfg.input))[0]
    else:
        u = dialogues(cfg, "test")[0]
        user, name = u.wav[0], u.id
    user = user[:int(cfg.converse_seconds * cfg.sample_rate)]
    audio, text = converse(lm, mimi, user, cfg, seed=cfg.seed)
    said = tok.words(text, [s / cfg.frame_rate for s in range(len(text))])
    path = write_conversation(os.path.join(cfg.out_dir, "samples"), name, user, audio, said, cfg)
    words = " ".join(w for w, _ in said)[:300]
    common.log(f"{name}: {len(text)} steps of 80 ms; Moshi said: {words!r} -> {path}")

# ----------------------------------------------------------------------------- bench: the Moshi LM

def lm_bench(cfg):
    """train_step ms and audio-s/s; the latency of one full streaming step (Mimi encode, temporal step, K
    depth steps, Mimi decode) against the 80 ms frame, beside the paper's 160 ms. Random weights."""
    rt = common.setup(cfg)
    torch.manual_seed(cfg.seed)
    lm = MoshiLM(cfg).to(rt.device)
    opt = torch.optim.AdamW(lm.parameters(), lr=cfg.lr)
    state = dict(model=lm, opt=opt, sched=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    K, T = cfg.dep_q, cfg.lm_frames
    batch = torch.cat([torch.randint(0, cfg.text_card - 2, (cfg.batch_size, 1, T)),
                       torch.randint(0, cfg.lm_card, (cfg.batch_size, 2 * K, T))], 1).to(rt.device)
    step_ms = common.timeit(lambda: lm_train_step(state, batch, cfg, rt), iters=cfg.bench_iters, warmup=1)
    flops = common.count_flops(lambda: lm_train_step(state, batch, cfg, rt))
    mimi = Mimi(dataclasses.replace(cfg, n_q=max(cfg.n_q, K), codebook_size=cfg.lm_card)).to(rt.device).eval()
    lm.eval()
    n = 8 + 2 * cfg.bench_iters
    st, enc, dec = LMState(lm, 1, n, rt.device), {}, {}
    gen = torch.Generator(device=rt.device).manual_seed(0)
    frame = torch.randn(1, 1, mimi.frame_size, device=rt.device) * 0.1

    def one_frame():  # what must fit in 80 ms: hear a frame, think one step, speak a frame
        with rt.autocast():
            user = mimi.encode_stream(frame, enc, K)[:, :, 0]
            lm_step(lm, st, user, cfg, gen)
            mimi.decode_stream(st.moshi_frame(max(0, st.offset - 2), K).clamp(min=0), dec)
    for _ in range(3):
        one_frame()
    frame_ms = common.timeit(one_frame, iters=max(3, cfg.bench_iters), warmup=1)
    common.report_bench(cfg, rt, model=lm, compiled=False, train_step_ms=round(step_ms, 2),
                        train_flops_per_step=flops,
                        train_audio_s_per_s=round(cfg.batch_size * T / cfg.frame_rate / (step_ms / 1000), 3),
                        stream_frame_ms=round(frame_ms, 2), frame_budget_ms=1000 / cfg.frame_rate,
                        real_time=bool(frame_ms < 1000 / cfg.frame_rate),
                        theoretical_latency_ms=1000 * (1 + cfg.acoustic_delay) / cfg.frame_rate)

# ----------------------------------------------------------------------------- official weights

# The authors' files (Mimi: tokenizer-*.safetensors; the LM: its state dict): detection, sizes, key maps.

def read_official(path):
    """The authors' Mimi weights: tokenizer-*.safetensors or a torch file {"model": state_dict}."""
    if path.endswith((".safetensors", ".sft")):
        return common.read_safetensors(path)
    ckpt = common.load_checkpoint(path)
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not (isinstance(sd, dict) and any(str(k).startswith("encoder.model.") for k in sd)):
        raise SystemExit(f"error: {path!r} is neither a nanoaudio checkpoint nor an official Mimi "
                         "weight file")
    return sd


def official_config(cfg, sd):
    """Set the size fields of cfg from the tensors of an official state dict (heads are not stored)."""
    enc = sorted({int(m.group(1)) for k in sd for m in [re.match(r"encoder\.model\.(\d+)\.conv", k)] if m})
    strided = [i for i in enc if i > 0 and f"encoder.model.{i}.conv.conv.weight" in sd and i != enc[-1]]
    w0, wl = sd["encoder.model.0.conv.conv.weight"], sd[f"encoder.model.{enc[-1]}.conv.conv.weight"]
    cfg.channels, cfg.n_filters, cfg.kernel_size = w0.shape[1], w0.shape[0], w0.shape[2]
    cfg.dimension, cfg.last_kernel_size = wl.shape[0], wl.shape[2]
    cfg.ratios = tuple(sd[f"encoder.model.{i}.conv.conv.weight"].shape[2] // 2 for i in reversed(strided))
    res = sd["encoder.model.1.block.1.conv.conv.weight"]
    cfg.residual_kernel_size, cfg.compress = res.shape[2], w0.shape[0] // res.shape[0]
    cfg.n_residual_layers = (strided[0] - 1) - 1 if len(strided) else 1  # [conv_in, res..., ELU, down]
    cfg.tr_layers = len({m.group(1) for k in sd
                         for m in [re.match(r"encoder_transformer\.transformer\.layers\.(\d+)\.", k)] if m})
    cfg.tr_ffn = sd["encoder_transformer.transformer.layers.0.linear1.weight"].shape[0]
    cfg.q_dim, cfg.codebook_size = sd["quantizer.rvq_first.input_proj.weight"].shape[0], \
        sd["quantizer.rvq_first.vq.layers.0._codebook.cluster_usage"].shape[0]
    cfg.n_q = 1 + len({k.split(".")[4] for k in sd if k.startswith("quantizer.rvq_rest.vq.layers.")})
    stride = sd["downsample.conv.conv.conv.weight"].shape[2] // 2
    cfg.frame_rate = cfg.sample_rate / (int(np.prod(cfg.ratios)) * stride)
    cfg.eval_n_q = min(cfg.eval_n_q, cfg.n_q)
    if cfg.dimension >= 64:  # heads are not stored in the file: the official ones are 64 wide (512 / 8)
        cfg.tr_heads = cfg.dimension // 64
    common.log(f"official Mimi weights: n_filters {cfg.n_filters}, dimension {cfg.dimension}, ratios "
               f"{cfg.ratios}, {cfg.tr_layers} transformer layers (ffn {cfg.tr_ffn}, {cfg.tr_heads} heads "
               f"of 64, not stored), {cfg.n_q} codebooks of {cfg.codebook_size} x {cfg.q_dim}, "
               f"{cfg.frame_rate:g} Hz")
    cfg.validate()
    return cfg


def official_state_dict_to_ours(sd, cfg):
    """Official key names (moshi/models/compression.py's MimiModel) -> this file's. The official Sequential
    indices: encoder [conv_in, (res x n, ELU, down) x 4, ELU, conv_out], decoder [conv_in, (ELU, up, res x n)
    x 4, ELU, conv_out]."""
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
        orig = k
        m = re.match(r"(encoder|decoder)\.model\.(\d+)\.(.*)", k)
        if m:
            part, idx, rest = m.group(1), int(m.group(2)), m.group(3)
            rest = rest.replace("block.1.conv.conv.", "conv1.conv.")
            rest = rest.replace("block.3.conv.conv.", "conv2.conv.")
            rest = re.sub(r"^(conv\.conv|convtr\.convtr)\.", "conv.", rest)
            k = f"{part}.{(enc if part == 'encoder' else dec)[idx]}.{rest}"
        elif "_transformer.transformer.layers." in k:
            k = k.replace(".transformer.layers.", ".layers.")
            for a, b in (("self_attn.in_projs.0.weight", "in_proj.weight"),
                         ("self_attn.in_proj_weight", "in_proj.weight"),
                         ("self_attn.out_projs.0.weight", "out_proj.weight"),
                         ("self_attn.out_proj.weight", "out_proj.weight"),
                         ("layer_scale_1.scale", "layer_scale_1"), ("layer_scale_2.scale", "layer_scale_2")):
                k = k.replace(a, b)
        elif k.startswith("quantizer."):
            k = k.replace("rvq_first", "semantic").replace("rvq_rest", "acoustic")
            k = re.sub(r"vq\.layers\.(\d+)\._codebook\._initialized", r"codebooks.\1.initialized", k)
            if k.endswith(".initialized"):  # our dead-code grace counter (not in the official file)
                usage = sd[re.sub(r"_initialized$", "cluster_usage", str(orig))]
                out[k[:-len("initialized")] + "age"] = torch.zeros_like(usage.float())
            k = re.sub(r"vq\.layers\.(\d+)\._codebook\.", r"codebooks.\1.", k)
        else:
            k = k.replace("downsample.conv.conv.conv.", "downsample.conv.")
            k = k.replace("upsample.convtr.convtr.convtr.", "upsample.conv.")
        out[k] = v.float() if torch.is_floating_point(v) else v
    return out


def load_official(state, sd):
    """An official state dict's weights into state["G"] (built with official_config's sizes)."""
    common.load_state_dict(state["G"], official_state_dict_to_ours(sd, state["G"].cfg),
                           what="Mimi (official weights)")


def _is_official_path(path):
    return path not in ("scratch", "resume") and (path.endswith((".safetensors", ".sft")) or (
        os.path.isfile(path) and common._peek_config(path) is None))


def official_lm_state_dict(sd):
    """An official LM state dict (the released file's stacked `in_proj_weight`, or the current moshi code's
    split `in_projs.{i}`) -> this file's keys: attention and gating weights stacked over the depth steps."""
    out, groups = {}, {}
    for k, v in sd.items():
        m = re.match(r"(.*\.self_attn)\.(in|out)_projs\.(\d+)\.weight$", k) or \
            re.match(r"(.*\.gating)\.(\d+)\.linear_(in|out)\.weight$", k)
        if m and m.group(1).endswith("self_attn"):
            groups.setdefault(f"{m.group(1)}.{m.group(2)}_proj_weight", {})[int(m.group(3))] = v
        elif m:
            groups.setdefault(f"{m.group(1)}.linear_{m.group(3)}_weight", {})[int(m.group(2))] = v
        else:
            k = re.sub(r"\.self_attn\.out_proj\.weight$", ".self_attn.out_proj_weight", k)
            k = re.sub(r"\.gating\.linear_(in|out)\.weight$", r".gating.linear_\1_weight", k)
            out[k] = v
    for k, parts in groups.items():
        out[k] = torch.cat([parts[i] for i in sorted(parts)], 0)
    return {k: v.float() if torch.is_floating_point(v) else v for k, v in out.items()}

# ----------------------------------------------------------------------------- main

if __name__ == "__main__":
    cfg = common.parse_config(Config, PRESETS)
    if cfg.stage == "lm":
        {"train": lm_train, "sample": lm_sample, "eval": lm_evaluate, "bench": lm_bench}[cfg.mode](cfg)
    else:
        {"train": train, "sample": sample, "eval": evaluate, "bench": bench}[cfg.mode](cfg)
