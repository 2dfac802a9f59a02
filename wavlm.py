"""
WavLM: Large-Scale Self-Supervised Pre-Training for Full Stack Speech Processing
(Chen et al., 2021) — https://arxiv.org/abs/2110.13900

The idea: HuBERT's masked prediction (hide spans of the input frames; at the hidden frames, predict discrete
targets: k-means cluster ids of MFCCs, later of the model's own features), with two changes that make one
representation serve speaker, separation and diarization tasks as well as ASR:
1. denoising by utterance mixing (§3.2): a piece of another utterance (or noise) is overlaid on the input,
   but the targets stay the clean primary's, so the model must find the main speaker and ignore the rest;
2. gated relative position bias (§3.1, Eq. 3-5): a bucketed relative-position bias added to the attention
   logits, scaled per query frame and head by gates computed from that frame's own content.
The network is wav2vec 2.0's: seven strided convs (50 frames/s at 16 kHz), then a Transformer (Table 1).

Simplified versus the paper and the official code (microsoft/unilm, UniSpeech):
- data: the built-in eSpeak corpus (or --data_dir), not 94k h; mixing noise is synthetic white/brown, not DNS.
- iteration-1 targets: k-means of 39-d MFCCs at the model's 50 Hz (HuBERT: Kaldi MFCCs at 100 Hz);
  --targets=features --teacher=PATH re-clusters a layer of any model (HuBERT iteration 2, as WavLM Base).
- fixed-length crops, so no padding mask; no layer drop; span masks are not equalised across the batch.
- weight decay on matrices only, not on the label embeddings; the warm-up peaks one step early.
- `small` adds the unmasked frames' CE (pred_nomask_weight=1): masked-only, a 2.2 M model predicts the prior.
Base 94.70 M / Large 316.62 M parameters with the pre-training head; the official files hold the encoder.
1,068 lines, over the 750 aim: eval's baselines, the probes and the feature export (moshi.py --teacher).

    python wavlm.py                                    # pre-train on the built-in corpus (small on a CPU)
    python wavlm.py --preset=base --batch_size=8       # the paper's Base
    python wavlm.py --init_from=resume                 # continue out/wavlm/ckpt.pt
    python wavlm.py --targets=features --teacher=out/wavlm/ckpt.pt --out_dir=out/wavlm2   # iteration 2
    python wavlm.py --mode=sample --init_from=out/wavlm/ckpt.pt   # or WavLM-Base.pt / WavLM-Large.pt
    python wavlm.py --mode=eval --init_from=out/wavlm/ckpt.pt     # masked-prediction accuracy on test
    python wavlm.py --mode=features --init_from=WavLM-Base.pt     # per-utterance features (see features())
    python wavlm.py --mode=probe --init_from=out/wavlm/ckpt.pt    # linear probes vs log-mel / MFCC
    python wavlm.py --mode=bench
    torchrun --standalone --nproc_per_node=8 wavlm.py
"""
import json
import math
import os
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

import common

# ----------------------------------------------------------------------------- config

BASE_CONV = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2   # 320x: 50 frames/s at 16 kHz (§3.1)


@dataclass
class Config:
    mode: str = "train"                 # train | sample | eval | bench | features | probe
    preset: str = "base"                # a key of PRESETS
    init_from: str = "scratch"          # scratch | resume | path to a checkpoint (ours or WavLM-*.pt)
    out_dir: str = "out/wavlm"
    data_dir: str = ""                  # empty: the built-in speech corpus
    corpus_hours: float = 2.0           # size of the built-in corpus
    input: str = ""                     # --mode=sample: a wav to encode (empty: a held-out utterance)
    seed: int = 1337
    sample_rate: int = 16000            # the model's input rate
    # CNN feature encoder (§3.1, wav2vec 2.0)
    conv_layers: tuple = BASE_CONV      # (channels, kernel, stride) per block
    extractor_mode: str = "default"     # default: GroupNorm on block 0 (Base) | layer_norm: LN in all (Large)
    conv_bias: bool = False             # bias in the conv blocks
    normalize: bool = False             # layer-norm each waveform first (Large only; Base: without)
    # Transformer (§3.1)
    dim: int = 768                      # model width D
    layers: int = 12                    # Transformer blocks
    heads: int = 12                     # attention heads
    ffn: int = 3072                     # feed-forward width
    layer_norm_first: bool = False      # pre-LN (Large) or post-LN (Base)
    conv_pos: int = 128                 # kernel of the convolutional position embedding
    conv_pos_groups: int = 16           # its groups
    num_buckets: int = 320              # relative-position buckets, half per direction (§3.1)
    max_distance: int = 800             # offsets beyond this share the last bucket (the checkpoints' cfg)
    dropout: float = 0.1                # residual / feature dropout
    attention_dropout: float = 0.1      # dropout on attention probabilities
    feature_grad_mult: float = 0.1      # gradient scale into the CNN encoder (HuBERT recipe)
    # masked prediction (§2, HuBERT)
    final_dim: int = 256                # projection before the cosine logits
    num_classes: int = 500              # k-means clusters = target classes
    logit_temp: float = 0.1             # cosine-similarity temperature
    pred_nomask_weight: float = 0.0     # weight of the CE on unmasked frames (HuBERT Base: 0, masked only)
    feature_pen: float = 10.0           # weight of the CNN output's mean square (HuBERT loss_weights [10])
    mask_prob: float = 0.08             # p: probability that a frame starts a masked span (§4.1)
    mask_length: int = 10               # l: span length in frames (§4.1)
    targets: str = "mfcc"               # mfcc (iteration 1) | features (re-cluster --teacher's layer)
    teacher: str = ""                   # --targets=features: the model whose features are clustered (any)
    target_layer: int = 6               # --targets=features: which teacher layer
    kmeans_frames: int = 100_000        # frames (from the train split) k-means is fitted on
    kmeans_iters: int = 30              # Lloyd iterations
    # utterance mixing (§3.2; UniSpeech utterance_mixing task defaults)
    mix_prob: float = 0.5               # probability that an utterance gets an interferer
    mix_max_frac: float = 0.5           # the interferer covers at most this fraction of the input
    mix_db: tuple = (-5.0, 5.0)         # energy ratio primary/interferer in dB, uniform, for speech
    noise_prob: float = 0.0             # of the mixing events, this fraction use noise instead of speech
    noise_db: tuple = (-5.0, 20.0)      # energy ratio range for noise
    # optimization (HuBERT Base recipe)
    lr: float = 5e-4                    # peak learning rate
    betas: tuple = (0.9, 0.98)          # AdamW betas
    weight_decay: float = 0.01          # AdamW weight decay
    warmup: int = 32_000                # linear warm-up steps, then linear decay to 0 ...
    lr_decay_iters: int = 400_000       # ... at this step (as nanoGPT, apart from max_iters: exact resume)
    grad_clip: float = 10.0             # gradient-norm clip
    batch_size: int = 8
    segment: int = 250_000              # crop length in samples (HuBERT: up to 15.6 s)
    max_iters: int = 400_000            # optimizer steps
    log_interval: int = 50
    eval_interval: int = 5000           # evaluate and checkpoint every N steps
    eval_items: int = 32                # held-out utterances evaluate() scores
    # features / probes
    feature_layer: int = -1             # --mode=features: the layer written (-1 = the output)
    feature_splits: tuple = ("train", "val", "test")  # --mode=features: splits written
    probe_steps: int = 300              # --mode=probe: full-batch optimizer steps per probe
    device: str = "auto"
    dtype: str = "auto"                 # bf16 autocast on CUDA, fp32 elsewhere
    compile: bool = True                # torch.compile (CUDA only unless asked)
    bench_iters: int = 10               # timed iterations per bench figure
    bench_seconds: float = 10.0         # audio length of the feature-extraction benchmark

    def validate(self):
        convs_ok = bool(self.conv_layers) and all(len(c) == 3 for c in self.conv_layers)
        hop = math.prod(c[2] for c in self.conv_layers) if convs_ok else 0
        min_segment = 2 * hop * (self.mask_length + 2)             # two masked spans and their context
        for wrong, msg in (
                (self.targets not in ("mfcc", "features"),
                 f"--targets must be mfcc or features (got {self.targets!r})"),
                (self.targets == "features" and self.mode == "train" and not self.teacher,
                 "--targets=features needs --teacher=PATH (a checkpoint of ours or an official WavLM-*.pt)"),
                (self.teacher and not os.path.isfile(self.teacher),
                 f"--teacher={self.teacher!r} does not exist"),
                (self.extractor_mode not in ("default", "layer_norm"),
                 f"--extractor_mode must be default or layer_norm (got {self.extractor_mode!r})"),
                (self.dim % self.heads or self.dim % self.conv_pos_groups,
                 f"--dim={self.dim} must be divisible by --heads and --conv_pos_groups"),
                (not 0 <= self.mask_prob < 1 or self.mask_length < 1,
                 "--mask_prob must be in [0, 1) and --mask_length >= 1"),
                (not (0 <= self.mix_prob <= 1 and 0 <= self.noise_prob <= 1 and 0 < self.mix_max_frac <= 0.5),
                 "--mix_prob and --noise_prob must be in [0, 1], --mix_max_frac in (0, 0.5] (§3.2: half)"),
                (self.num_buckets < 4 or self.num_buckets % 2 or self.max_distance <= self.num_buckets // 4,
                 "--num_buckets must be even and >= 4, --max_distance > num_buckets / 4"),
                (self.num_classes < 2, "--num_classes must be >= 2"),
                (not convs_ok, "--conv_layers holds (channels, kernel, stride) per block: 512,10,5;512,3,2"),
                (self.segment < min_segment,
                 f"--segment={self.segment} is too short: it must hold 2 x (mask_length + 2) frames "
                 f"of {hop} samples ({min_segment} samples)"),
                (not set(self.feature_splits) <= {"train", "val", "test"},
                 f"--feature_splits are train, val, test (got {self.feature_splits!r})")):
            if wrong:
                raise SystemExit(f"error: {msg}")


PRESETS = {  # the official WavLM-Base / Base+ / Large cfg (microsoft/unilm wavlm), HuBERT's training recipes
    "base":      dict(),                               # 94.70 M with the head; LibriSpeech 960 h
    "base_plus": dict(),                               # same network as Base; 94k h of data (README)
    "large":     dict(extractor_mode="layer_norm", normalize=True, conv_bias=False, dim=1024, layers=24,
                      heads=16, ffn=4096, layer_norm_first=True, final_dim=768, dropout=0.0,
                      attention_dropout=0.0, lr=1.5e-3, grad_clip=1.0, batch_size=4),   # 316.62 M
    "small":     dict(conv_layers=((128, 10, 5),) + ((128, 3, 2),) * 4 + ((128, 2, 2),) * 2, dim=192,
                      layers=4, heads=4, ffn=768, conv_pos=32, conv_pos_groups=8, final_dim=64,
                      num_classes=100, dropout=0.0, attention_dropout=0.0, lr=1e-3, warmup=200, batch_size=8,
                      segment=16_000, max_iters=2000, lr_decay_iters=2000, eval_interval=500, log_interval=50,
                      eval_items=32, corpus_hours=0.5, kmeans_frames=40_000, bench_seconds=10.0,
                      pred_nomask_weight=1.0),   # 2.2 M; ours: + unmasked CE, else it collapses to the prior
    "tiny":      dict(conv_layers=((32, 10, 5),) + ((32, 3, 2),) * 4 + ((32, 2, 2),) * 2, dim=32, layers=2,
                      heads=2, ffn=64, conv_pos=16, conv_pos_groups=4, num_buckets=32, max_distance=64,
                      final_dim=16, num_classes=8, dropout=0.0, attention_dropout=0.0, lr=1e-3, warmup=2,
                      batch_size=2, segment=16_000, max_iters=10, lr_decay_iters=1000, eval_interval=1000,
                      log_interval=1, eval_items=2, corpus_hours=0.02, kmeans_frames=2000, kmeans_iters=10,
                      bench_iters=2, bench_seconds=1.0, probe_steps=20),    # tests
}
ARCH_KEYS = ("sample_rate", "conv_layers", "extractor_mode", "conv_bias", "normalize", "dim", "layers",
             "heads", "ffn", "layer_norm_first", "conv_pos", "conv_pos_groups", "num_buckets", "max_distance",
             "final_dim", "num_classes", "targets", "target_layer")

# ----------------------------------------------------------------------------- model

class ConvBlock(nn.Module):
    """Conv1d -> (GroupNorm | LayerNorm over channels | nothing) -> GELU (§3.1, wav2vec 2.0's encoder)."""
    def __init__(self, c_in, c_out, kernel, stride, norm, bias):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride, bias=bias)
        nn.init.kaiming_normal_(self.conv.weight)          # std sqrt(2 / fan_in): the stack keeps its scale
        self.norm = {"group": lambda: nn.GroupNorm(c_out, c_out), "layer": lambda: nn.LayerNorm(c_out),
                     None: lambda: None}[norm]()

    def forward(self, x):                                  # (B, C_in, T) -> (B, C_out, T')
        x = self.conv(x)
        if isinstance(self.norm, nn.GroupNorm):            # norms in fp32: statistics over long sequences
            x = self.norm(x.float()).type_as(x)
        elif isinstance(self.norm, nn.LayerNorm):
            x = self.norm(x.transpose(1, 2).float()).transpose(1, 2).type_as(x)
        return F.gelu(x)


class FeatureEncoder(nn.Module):
    """Raw 16 kHz waveform -> 512-d frames at 50 Hz: seven strided convs, 320x down, 25 ms receptive field."""
    def __init__(self, cfg):
        super().__init__()
        blocks, c_in = [], 1
        for i, (c, k, s) in enumerate(cfg.conv_layers):
            norm = "layer" if cfg.extractor_mode == "layer_norm" else "group" if i == 0 else None
            blocks.append(ConvBlock(c_in, c, k, s, norm, cfg.conv_bias))
            c_in = c
        self.conv_layers = nn.ModuleList(blocks)

    def forward(self, wav):                                # (B, L) -> (B, C, T)
        x = wav.unsqueeze(1)                               # (B, 1, L)
        for block in self.conv_layers:
            x = block(x)
        return x


def num_frames(cfg, length):
    """Frames the feature encoder makes from `length` samples (each valid conv: (L - k) // s + 1)."""
    for _, k, s in cfg.conv_layers:
        length = (length - k) // s + 1
    return length


def relative_position_bucket(rel, num_buckets, max_distance):
    """T5's bidirectional buckets of rel = j - i (§3.1): half the buckets per sign; within a half, offsets
    below num_buckets/4 get a bucket each, larger ones logarithmically wider buckets up to max_distance."""
    half = num_buckets // 2
    bucket = (rel > 0).long() * half
    n = rel.abs()
    exact = half // 2
    log_bucket = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                          * (half - exact)).long()
    return bucket + torch.where(n < exact, n, log_bucket.clamp(max=half - 1))


class GatedSelfAttention(nn.Module):
    """Self-attention with the gated relative position bias (§3.1, Eq. 3-5): the bucketed bias d is scaled
    per batch, head and query frame by gates computed from that frame's own content, so a frame can turn the
    position term up or down by what it holds. The paper's d + g_u d + (1 - g_u) w g_r d (w: a learnt
    per-head scale, grep_a) is computed as the official code does, d (a (b w - 1) + 2) with a = 1 - g_u and
    b = g_r, where a, b = sigmoid(sums of 4 of grep_linear(x split per head))."""
    def __init__(self, cfg):
        super().__init__()
        self.heads, self.dropout = cfg.heads, cfg.attention_dropout
        d = cfg.dim
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.grep_linear = nn.Linear(d // cfg.heads, 8)                   # the gates' projection, per head
        self.grep_a = nn.Parameter(torch.ones(1, cfg.heads, 1, 1))        # w: learnable per-head scale

    def gate(self, x):                                     # (B, T, D) -> (B, H, T, 1)
        B, T, _ = x.shape
        xh = x.view(B, T, self.heads, -1).transpose(1, 2)  # (B, H, T, D/H): the input, not the projected q
        g = torch.sigmoid(self.grep_linear(xh).view(B, self.heads, T, 2, 4).sum(-1))   # (B, H, T, 2)
        gate_a, gate_b = g.chunk(2, dim=-1)                # (B, H, T, 1) each
        return gate_a * (gate_b * self.grep_a - 1.0) + 2.0

    def forward(self, x, pos_bias):                        # x (B, T, D), pos_bias (1, H, T, T)
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        bias = (self.gate(x) * pos_bias).to(q.dtype)       # (B, H, T, T): row i scaled by query i's gate
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                           dropout_p=self.dropout if self.training else 0.0)  # scale d_h^-0.5
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class Layer(nn.Module):
    """A Transformer block: post-LN (Base) x = LN(x + Attn(x)); x = LN(x + FFN(x)), or pre-LN (Large)."""
    def __init__(self, cfg):
        super().__init__()
        self.pre_ln = cfg.layer_norm_first
        self.self_attn = GatedSelfAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.dim)
        self.fc1, self.fc2 = nn.Linear(cfg.dim, cfg.ffn), nn.Linear(cfg.ffn, cfg.dim)
        self.final_layer_norm = nn.LayerNorm(cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def ffn(self, x):
        return self.drop(self.fc2(F.gelu(self.fc1(x))))

    def forward(self, x, pos_bias):                        # (B, T, D) -> (B, T, D)
        if self.pre_ln:
            x = x + self.drop(self.self_attn(self.self_attn_layer_norm(x), pos_bias))
            return x + self.ffn(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x + self.drop(self.self_attn(x, pos_bias)))
        return self.final_layer_norm(x + self.ffn(x))


def bert_init(m):
    """BERT's init, which the official Transformer encoder applies to all its modules last: linears (gates
    included) and the relative-position bias table N(0, 0.02), zero biases; convs and norms untouched."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


class Encoder(nn.Module):
    """Convolutional position embedding, then the blocks; one relative-position bias table for all layers."""
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        conv = nn.Conv1d(cfg.dim, cfg.dim, cfg.conv_pos, padding=cfg.conv_pos // 2,
                         groups=cfg.conv_pos_groups)
        nn.init.normal_(conv.weight, 0, math.sqrt(4 / (cfg.conv_pos * cfg.dim)))   # wav2vec 2.0 init
        nn.init.zeros_(conv.bias)
        self.pos_conv = weight_norm(conv, dim=2)           # weight norm over the kernel axis (wav2vec 2.0)
        self.relative_attention_bias = nn.Embedding(cfg.num_buckets, cfg.heads)   # d: (buckets, H), shared
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))
        self.layer_norm = nn.LayerNorm(cfg.dim)            # after pos-conv (post-LN) / last layer (pre-LN)
        self.drop = nn.Dropout(cfg.dropout)
        self.apply(bert_init)                              # last: it overrides the inits above

    def position_bias(self, T):                            # -> (1, H, T, T), ungated: each layer gates it
        pos = torch.arange(T, device=self.relative_attention_bias.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.num_buckets,
                                           self.cfg.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x):                                  # (B, T, D) -> [(B, T, D)] * (layers + 1), output
        pc = self.pos_conv(x.transpose(1, 2))              # (B, D, T + 1): even kernel, one frame too many
        x = x + F.gelu(pc[:, :, :-1] if self.cfg.conv_pos % 2 == 0 else pc).transpose(1, 2)
        if not self.cfg.layer_norm_first:
            x = self.layer_norm(x)
        x = self.drop(x)
        bias = self.position_bias(x.shape[1])
        hidden = [x]
        for layer in self.layers:
            x = layer(x, bias)
            hidden.append(x)
        return hidden, (self.layer_norm(x) if self.cfg.layer_norm_first else x)


class WavLM(nn.Module):
    """Waveform -> layer features; with a mask, masked frames become mask_emb (§2); head(): class logits."""
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        c = cfg.conv_layers[-1][0]
        self.feature_extractor = FeatureEncoder(cfg)
        self.layer_norm = nn.LayerNorm(c)
        self.post_extract_proj = nn.Linear(c, cfg.dim)     # outside the encoder: PyTorch's default init
        self.mask_emb = nn.Parameter(torch.empty(cfg.dim).uniform_())
        self.encoder = Encoder(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        # pre-training head (HuBERT): project, then cosine similarity with one embedding per cluster
        self.final_proj = nn.Linear(cfg.dim, cfg.final_dim)
        self.label_embs = nn.Parameter(torch.empty(cfg.num_classes, cfg.final_dim).uniform_())

    def encode(self, wav, mask=None):                      # -> hidden [(B, T, D)] * (L + 1), output, pen
        if self.cfg.normalize:                             # Large: zero mean, unit variance per utterance
            wav = F.layer_norm(wav, wav.shape[-1:])
        f = self.feature_extractor(wav)                    # (B, C, T)
        g = self.cfg.feature_grad_mult
        if self.training and g != 1.0:                     # forward unchanged, gradient scaled by g: the CNN
            f = f * g + f.detach() * (1 - g)               # learns slower than the Transformer (HuBERT)
        pen = f.float().pow(2).mean()                      # HuBERT's feature penalty: bounds the CNN's scale
        x = self.post_extract_proj(self.layer_norm(f.transpose(1, 2)))   # (B, T, D)
        x = self.drop(x)
        if mask is not None:                               # the masked frames' content is hidden (§2)
            x = torch.where(mask.unsqueeze(-1), self.mask_emb.to(x.dtype), x)
        hidden, out = self.encoder(x)
        return hidden, out, pen

    def extract(self, wav, mask=None):                     # (B, L) -> hidden [(B, T, D)] * (L + 1), output
        return self.encode(wav, mask)[:2]

    def head(self, out):                                   # (B, T, D) -> (B, T, num_classes)
        p = F.normalize(self.final_proj(out).float(), dim=-1)
        e = F.normalize(self.label_embs.float(), dim=-1)
        return p @ e.t() / self.cfg.logit_temp

    def forward(self, wav, mask=None):                     # pre-training: cluster logits per frame, pen
        _, out, pen = self.encode(wav, mask)
        return self.head(out), pen


def encoder_params(model):
    """The parameters the official files hold: all but the pre-training head."""
    return sum(p.numel() for n, p in model.named_parameters()
               if not n.startswith(("final_proj", "label_embs")))

# ----------------------------------------------------------------------------- loss

def span_mask(B, T, cfg, generator=None):
    """(B, T) bool: each frame starts a span of mask_length frames with probability mask_prob (§4.1, as
    HuBERT and wav2vec 2.0): int(p T + U[0,1)) starts per utterance (at least 2), drawn without replacement
    from the first T - l frames; spans may overlap, so about 1 - (1 - p)^l of the frames are masked."""
    l = cfg.mask_length
    n = max(2, int(cfg.mask_prob * T + torch.rand((), generator=generator).item()))
    n = min(n, T - l)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        starts = torch.randperm(T - l, generator=generator)[:n]
        mask[b, (starts[:, None] + torch.arange(l)).flatten()] = True
    return mask


def mix_utterances(wav, cfg, generator=None, partner=None):
    """Utterance mixing (§3.2), the rule of the official data loader. With probability mix_prob, row i of the
    batch (B, L) gets a piece of n ~ U{0..mix_max_frac L} samples of an interferer (at most half, so that the
    primary stays the main speaker), cut and added at random places and scaled to an energy ratio
    primary/interferer of r ~ U(mix_db) dB (noise: U(noise_db)), the energies being the mean squares of the
    whole rows. The interferer is a row of the batch, itself included, or with probability noise_prob white
    or brown noise. Rows are mixed in order and in place, so a row mixed earlier interferes with its own
    interferer in it. partner: (B,) fixed interferer rows, no noise (eval). Returns the mixed batch and
    [(i, j or -1 for noise, dst, src, n, scale)]. Targets: the caller computes them on the clean batch."""
    B, L = wav.shape
    out, events = wav.clone(), []
    u = lambda: torch.rand((), generator=generator).item()
    max_len = int(cfg.mix_max_frac * L)
    for i in range(B):
        if u() >= cfg.mix_prob:
            continue
        if partner is None and u() < cfg.noise_prob:       # white or brown (integrated) noise, a whole clip
            z = torch.randn(L, generator=generator).to(wav)
            clip, j, (lo, hi) = (z if u() < 0.5 else torch.cumsum(z, 0) / math.sqrt(L)), -1, cfg.noise_db
        else:
            j = int(partner[i]) if partner is not None else min(int(u() * B), B - 1)
            clip, (lo, hi) = out[j], cfg.mix_db            # the running batch: in place, as the official loop
        n = int(u() * (max_len + 1))
        src, dst = int(u() * (L - n + 1)), int(u() * (L - n + 1))
        ratio_db = lo + (hi - lo) * u()
        # the scale stays a 0-d tensor on wav's device: no host sync inside a training step
        e_primary, e_other = out[i].pow(2).mean(), clip.pow(2).mean()
        ratio = 10 ** (ratio_db / 10)
        scale = torch.where(e_other > 0, (e_primary / (e_other.clamp(min=1e-30) * ratio)).sqrt(), 0.0)
        out[i, dst:dst + n] += scale * clip[src:src + n]
        events.append((i, j, dst, src, n, scale))
    return out, events


def mix_in(wav, other, cfg, generator):
    """(L,) -> (L,): wav with a piece of `other` (L,) always mixed in by §3.2's rule; other None: noise."""
    if other is None:
        return mix_utterances(wav[None], replace(cfg, mix_prob=1.0, noise_prob=1.0), generator)[0][0]
    return mix_utterances(torch.stack([wav, other]), replace(cfg, mix_prob=1.0, noise_prob=0.0), generator,
                          partner=(1, 0))[0][0]


def masked_prediction_loss(logits, targets, mask, nomask_weight=0.0):
    """HuBERT's prediction loss L_m (+ nomask_weight L_u), normalised as fairseq's: (the CE summed over the
    masked frames + nomask_weight x over the unmasked ones) / the frames counted. Returns it, the accuracies
    on masked and unmasked frames, and the masked frames' mean CE. Mask-weighted sums, not logits[mask]:
    boolean indexing has a data-dependent shape, which makes a GPU step wait for the device and breaks a
    compiled graph."""
    m = mask.float()                                       # (B, T)
    u = 1 - m
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")   # (B, T): logits (B, K, T)
    ce_m = (ce * m).sum() / m.sum().clamp(min=1)
    loss = ce_m
    if nomask_weight > 0:                                  # a Python float: no device sync
        loss = ((ce * m).sum() + nomask_weight * (ce * u).sum()) / (m.sum() + u.sum()).clamp(min=1)
    with torch.no_grad():
        hit = (logits.argmax(-1) == targets).float()       # (B, T)
        acc_m = (hit * m).sum() / m.sum().clamp(min=1)
        acc_u = torch.where(u.sum() > 0, (hit * u).sum() / u.sum().clamp(min=1), acc_m)   # none: acc_m
    return loss, acc_m, acc_u, ce_m.detach()

# ----------------------------------------------------------------------------- data

def load_split(cfg, split):
    return common.load_corpus(cfg, split, cfg.sample_rate)


def get_batch(sampler, cfg, rt):
    """(B, segment) clean waveforms on rt.device: the primaries; mixing happens in train_step."""
    wav, _ = sampler.next()
    return wav.to(rt.device)


def deltas(c):
    """(B, C, T) -> (B, C, T): regression deltas over +-2 frames, d_t = sum_n n (c_t+n - c_t-n) / 10, edge
    frames repeated (torchaudio's compute_deltas, which HuBERT's MFCC labels use)."""
    p = F.pad(c, (2, 2), mode="replicate")                # (B, C, T + 4): p[t + 2] = c[t]
    return (p[..., 3:-1] - p[..., 1:-3] + 2 * (p[..., 4:] - p[..., :-4])) / 10


_DCT = {}


def mfcc(wav, sr=16000, n_mfcc=13, n_mels=23):
    """(B, L) -> (B, T, 39): 13 MFCCs + deltas + delta-deltas, HuBERT iteration 1's features, in the model's
    frames (25 ms every 20 ms: frame t covers samples [320 t, 320 t + 400), as the conv encoder's). |STFT|^2,
    23 Slaney mel filters without area norm, natural log (+1e-6), orthonormal DCT-II."""
    win, hop = int(0.025 * sr), int(0.020 * sr)
    with torch.autocast(wav.device.type, enabled=False):
        spec = torch.stft(wav.float(), win, hop, window=torch.hann_window(win, device=wav.device),
                          center=False, return_complex=True).abs().pow(2)        # (B, F, T)
        key = (sr, win, n_mels, n_mfcc, str(wav.device))
        if key not in _DCT:
            fb = torch.from_numpy(common.mel_filterbank(sr, win, n_mels, norm=None))
            k = np.arange(n_mels)
            dct = (np.cos(np.pi / n_mels * (k[None, :] + 0.5) * np.arange(n_mfcc)[:, None])
                   * math.sqrt(2 / n_mels))
            dct[0] /= math.sqrt(2)                          # orthonormal DCT-II
            _DCT[key] = (fb.to(wav.device), torch.from_numpy(dct).float().to(wav.device))
        fb, dct = _DCT[key]
        c = dct @ torch.log(fb @ spec + 1e-6)              # (B, 13, T)
        d1 = deltas(c)
        return torch.cat([c, d1, deltas(d1)], 1).transpose(1, 2)   # (B, T, 39)


class KMeans(nn.Module):
    """The target labeller (HuBERT's hidden units): standardise, then the nearest of num_classes centroids.
    Buffers only, so the checkpoint carries the exact targets the model was trained on."""
    def __init__(self, k, dim):
        super().__init__()
        self.register_buffer("centroids", torch.zeros(k, dim))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def fit(self, x, iters, seed):                         # x: (N, dim) frames
        rng = torch.Generator().manual_seed(seed)
        x = x.float().cpu()
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp(min=1e-5))
        x = (x - self.mean) / self.std
        k = self.centroids.shape[0]
        c = x[torch.randint(len(x), (1,), generator=rng)]  # k-means++ seeding
        d = torch.cdist(x, c).squeeze(1) ** 2
        for _ in range(1, k):
            c = torch.cat([c, x[torch.multinomial(d / d.sum() + 1e-12, 1, generator=rng)]])
            d = torch.minimum(d, ((x - c[-1]) ** 2).sum(1))
        for _ in range(iters):                             # Lloyd
            a = torch.cdist(x, c).argmin(1)
            sums = torch.zeros_like(c).index_add_(0, a, x)
            cnt = torch.bincount(a, minlength=k).float()[:, None]
            c = torch.where(cnt > 0, sums / cnt.clamp(min=1), c)
        self.centroids.copy_(c)
        self.fitted.fill_(1)

    @torch.no_grad()
    def forward(self, feats):                              # (B, T, dim) -> (B, T) cluster ids
        x = (feats.float() - self.mean) / self.std
        return torch.cdist(x, self.centroids[None].expand(x.shape[0], -1, -1)).argmin(-1)


def target_features(state, wav, cfg):
    """What the k-means clusters: MFCCs (iteration 1) or the teacher's layer features (iteration 2)."""
    if cfg.targets == "mfcc":
        return mfcc(wav, cfg.sample_rate)
    hidden, _ = state["teacher"].extract(wav)
    return hidden[min(cfg.target_layer, len(hidden) - 1)]


def make_targets(state, wav, cfg, T):
    """(B, T) cluster ids of the CLEAN primary waveform (§3.2: mixing never changes the targets)."""
    with torch.no_grad():
        ids = state["km"](target_features(state, wav, cfg))
    if ids.shape[1] < T:                                   # MFCC frames can be one short of the conv's
        ids = (F.pad(ids, (0, T - ids.shape[1]), mode="replicate") if ids.shape[1]
               else ids.new_zeros(ids.shape[0], T))
    return ids[:, :T]


def fit_targets(state, clips, cfg, rt):
    """Fit the k-means on up to kmeans_frames frames of the train split (deterministic: the first clips)."""
    feats, n = [], 0
    for c in clips:
        if n >= cfg.kmeans_frames:
            break
        wav = torch.from_numpy(c.wav[: 30 * cfg.sample_rate]).to(rt.device)[None]
        if wav.shape[1] < 400:
            continue
        feats.append(target_features(state, wav, cfg)[0].cpu())
        n += len(feats[-1])
    x = torch.cat(feats)[: cfg.kmeans_frames]
    if len(x) < cfg.num_classes:
        raise SystemExit(f"error: {len(x)} frames make no {cfg.num_classes} clusters; lower --num_classes")
    state["km"].fit(x, cfg.kmeans_iters, cfg.seed)
    ids = state["km"](x[None].to(rt.device))[0].cpu()
    p = torch.bincount(ids, minlength=cfg.num_classes).float() / len(x)
    common.log(f"k-means targets ({cfg.targets}): {cfg.num_classes} clusters fitted on {len(x)} frames | "
               f"class prior entropy {-(p[p > 0] * p[p > 0].log()).sum():.3f} nats (the CE of always "
               f"predicting the prior), majority cluster {p.max():.1%} of frames")

# ----------------------------------------------------------------------------- train

def frame_hop(cfg):
    """Samples per frame: the product of the conv strides (320: 50 frames/s at 16 kHz)."""
    return math.prod(s for _, _, s in cfg.conv_layers)


def load_any(path, rt, what="--init_from", ckpt=None):
    """(model, km or None, cfg) from one of our checkpoints or an official WavLM file, size from the file."""
    ckpt = common.load_checkpoint(path) if ckpt is None else ckpt
    if common.is_ours(ckpt):
        if ckpt.get("paper") != "wavlm":
            raise SystemExit(f"error: {what}={path!r} was written by {ckpt.get('paper')}.py, not wavlm.py")
        cfg = Config(**{k: common._from_json(v, getattr(Config(), k)) for k, v in ckpt["config"].items()
                        if k in Config.__dataclass_fields__})
        model, km = WavLM(cfg), None
        common.load_state_dict(model, ckpt["models"]["model"], what="WavLM")
        if "km" in ckpt["models"]:
            km = KMeans(cfg.num_classes, ckpt["models"]["km"]["centroids"].shape[1])
            km.load_state_dict(ckpt["models"]["km"])
            km = km.to(rt.device)
        return model.to(rt.device).eval(), km, cfg
    if not is_official(ckpt):
        raise SystemExit(f"error: {what}={path!r} is neither a nanoaudio wavlm checkpoint nor an official "
                         "WavLM file (a dict with 'cfg' and 'model')")
    cfg = Config()
    common.log(f"official WavLM file {path}: " + ", ".join(config_from_official(cfg, ckpt) or ["base"]))
    model = WavLM(cfg)
    load_official_into(model, ckpt)
    return model.to(rt.device).eval(), None, cfg


def build(cfg, rt):
    """Everything training holds: the model (+ head), its k-means labeller, the optimizer and the schedule;
    with --targets=features also the frozen teacher whose features are clustered."""
    model = WavLM(cfg).to(rt.device)
    state = dict(model=model)
    feat_dim = 39
    if cfg.targets == "features":
        teacher, _, tcfg = load_any(cfg.teacher, rt, what="--teacher")
        state["teacher"], feat_dim = teacher.requires_grad_(False), tcfg.dim
    state["km"] = KMeans(cfg.num_classes, feat_dim).to(rt.device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "label_embs" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "label_embs" not in n)]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=cfg.weight_decay),
                             dict(params=rest, weight_decay=0.0)],
                            lr=cfg.lr, betas=cfg.betas, eps=1e-6)
    warm, total = max(1, cfg.warmup), max(cfg.lr_decay_iters, cfg.warmup + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(   # linear warm-up, then linear decay to 0 (fairseq polynomial)
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / (total - warm))))
    state.update(opt=opt, sched=sched)
    return state


def train_step(state, batch, cfg, rt):
    """One step: targets of the clean primaries, then mixing (§3.2), then span masks (§4.1), then the loss,
    masked prediction + feature_pen x the feature penalty (HuBERT's loss weights); AdamW with gradient
    clipping; the schedule steps. Returns loss (the total), ce (the masked frames' mean CE, to compare with
    the class prior's entropy), fpen (unweighted), accuracies and gnorm."""
    model, opt, wav = state["model"], state["opt"], batch
    T = num_frames(cfg, wav.shape[1])
    targets = make_targets(state, wav, cfg, T)             # before mixing: the primary's targets
    mixed, _ = mix_utterances(wav, cfg) if cfg.mix_prob > 0 else (wav, [])
    mask = span_mask(wav.shape[0], T, cfg).to(wav.device)
    model.train()
    with rt.autocast():
        logits, pen = model(mixed, mask)
    pred, acc_m, acc_u, ce = masked_prediction_loss(logits.float(), targets, mask, cfg.pred_nomask_weight)
    loss = pred + cfg.feature_pen * pen
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    state["sched"].step()
    return dict(loss=loss.detach(), ce=ce, fpen=pen.detach(), acc_m=acc_m, acc_u=acc_u, gnorm=gnorm)


def load_for_inference(cfg, rt=None):
    """(model, km or None, cfg, rt): our checkpoint (its config, with flags on top) or an official file (size
    inferred). The file is checked before common.setup, so a bad one gives one error line and nothing else."""
    if cfg.init_from == "scratch":
        raise SystemExit(f"error: --mode={cfg.mode} needs a model: --init_from=resume, a checkpoint of ours, "
                         "or an official WavLM-Base.pt / WavLM-Base+.pt / WavLM-Large.pt")
    path = common.checkpoint_path(cfg)
    ckpt = common.load_checkpoint(path)
    if common.is_ours(ckpt):
        common.check_checkpoint(ckpt, cfg, ARCH_KEYS)
        if cfg.targets == "features" and cfg.mode in ("eval", "sample"):
            raise SystemExit("error: a model trained on --targets=features is scored against its teacher's "
                             "targets, which eval/sample do not load; use --mode=features or --mode=probe")
    elif not is_official(ckpt):
        raise SystemExit(f"error: --init_from={path!r} is neither a nanoaudio wavlm checkpoint nor an "
                         "official WavLM file (a dict with 'cfg' and 'model')")
    elif cfg.mode == "eval":
        raise SystemExit("error: --mode=eval scores masked prediction against our k-means targets; an "
                         "official file has no head or targets (use --mode=probe or --mode=features with it)")
    rt = rt or common.setup(cfg, log_to_file=False)
    model, km, file_cfg = load_any(path, rt, ckpt=ckpt)
    for k in ARCH_KEYS:
        setattr(cfg, k, getattr(file_cfg, k))
    return model, km, cfg, rt


def nearest_visible(y, m):
    """The copy-the-context baseline: (T,) targets y, (T,) bool mask m -> (T,) the target of each frame's
    nearest unmasked frame (ties: the earlier one); -1 everywhere if every frame is masked."""
    vis = (~m).nonzero()[:, 0]
    if not len(vis):
        return torch.full_like(y, -1)
    return y[vis[(torch.arange(len(y))[:, None] - vis[None]).abs().argmin(1)]]


def _nmse(a, b):
    """How far features b (T, dim) of the two-voice audio are from a (T, dim) of the clean audio, per
    dimension relative to a's own variation over time, averaged: scale-free, so models and MFCCs compare."""
    return (((b - a) ** 2).sum(0) / ((a - a.mean(0)) ** 2).sum(0).clamp(min=1e-8)).mean().item()


@torch.no_grad()
def evaluate(cfg, model=None, rt=None, samples_dir=None, split="test", labeller=None):
    """Masked-prediction accuracy on held-out audio (pooled over frames), clean and with a second voice mixed
    in (the targets stay the clean primary's), beside two baselines on the same masked frames: the majority
    cluster (the best constant guess, picked on these very frames) and the nearest visible frame's cluster
    (copying the context). The denoising claim (§3.2), without masks: unit accuracy on the clean and on the
    two-voice audio, beside k-means labels of the two-voice audio itself; and how far the output features
    move from clean to two voices (_nmse), beside MFCCs and log-mels. Its own generator leaves training's RNG
    untouched, so a resumed run equals a straight one. labeller: train()'s {"km", "teacher"}."""
    km = None
    if model is None:
        model, km, cfg, rt = load_for_inference(cfg, rt)
    state = dict(labeller or {}, model=model, **({"km": km} if km is not None else {}))
    was = model.training
    model.eval()
    utts = load_split(cfg, split)[: cfg.eval_items]
    if not utts:
        raise SystemExit(f"error: the {split} split has no clips")
    utts = [u for u in utts if len(u.wav) >= 2 * frame_hop(cfg) * (cfg.mask_length + 2)] or utts
    g = torch.Generator().manual_seed(cfg.seed + 7)
    n = dict(masked=0, frames=0, ce=0.0, acc_m=0, acc_m_mixed=0, majority=0, nearest=0, acc_u=0,
             acc_u_mixed=0, units_mfcc_mixed=0)
    counts, nmse = torch.zeros(cfg.num_classes), dict(nmse_output=[], nmse_mfcc=[], nmse_logmel=[])
    mel = lambda x: common.mel_spectrogram(x[0].float().cpu(), cfg.sample_rate, 400, 320, n_mels=80).T
    for i, u in enumerate(utts):
        clean = torch.from_numpy(u.wav[: cfg.segment])
        other = utts[(i + 1) % len(utts)].wav[: len(clean)]   # the next utterance, zero-padded
        wav = clean[None].to(rt.device)
        T = num_frames(cfg, wav.shape[1])
        targets = make_targets(state, wav, cfg, T)
        mask = span_mask(1, T, cfg, generator=g).to(rt.device)
        mixed = mix_in(clean, F.pad(torch.from_numpy(other), (0, len(clean) - len(other))), cfg, g)
        mixed = mixed[None].to(rt.device)
        with rt.autocast():
            (logits, _), (logits_mixed, _) = model(wav, mask), model(mixed, mask)
            (_, h), (_, h_mixed) = model.extract(wav), model.extract(mixed)
            units, units_mixed = model.head(h).argmax(-1), model.head(h_mixed).argmax(-1)
        y, m = targets[0].cpu(), mask[0].cpu()
        n["ce"] += F.cross_entropy(logits[0].float().cpu()[m], y[m], reduction="sum").item()
        for key, pred in (("acc_m", logits.argmax(-1)), ("acc_m_mixed", logits_mixed.argmax(-1)),
                          ("nearest", nearest_visible(y, m))):
            n[key] += (pred.view(-1).cpu()[m] == y[m]).sum().item()
        for key, pred in (("acc_u", units), ("acc_u_mixed", units_mixed),
                          ("units_mfcc_mixed", make_targets(state, mixed, cfg, T))):
            n[key] += (pred.view(-1).cpu() == y).sum().item()
        counts += torch.bincount(y[m], minlength=cfg.num_classes)
        n["masked"] += int(m.sum())
        n["frames"] += T
        nmse["nmse_output"].append(_nmse(h[0].float().cpu(), h_mixed[0].float().cpu()))
        nmse["nmse_mfcc"].append(_nmse(mfcc(wav.cpu())[0], mfcc(mixed.cpu())[0]))
        nmse["nmse_logmel"].append(_nmse(mel(wav), mel(mixed)))
        if samples_dir and i < 2:
            common.save_sample(samples_dir, f"{split}{i}_mixed", mixed[0].cpu(), cfg.sample_rate, ref=clean)
    model.train(was)
    res = dict(loss=n["ce"] / max(n["masked"], 1), majority=counts.max().item() / max(n["masked"], 1),
               **{k: n[k] / max(n["masked"], 1) for k in ("acc_m", "acc_m_mixed", "nearest")},
               **{k: n[k] / max(n["frames"], 1) for k in ("acc_u", "acc_u_mixed", "units_mfcc_mixed")},
               **{k: float(np.mean(v)) for k, v in nmse.items()})
    common.log(f"eval | split {split} | items {len(utts)} | {n['masked']} masked frames | "
               f"loss {res['loss']:.4f} | acc_m {res['acc_m']:.4f} (two voices: acc_m_mixed "
               f"{res['acc_m_mixed']:.4f}) | baselines: "
               f"majority {res['majority']:.4f}, nearest visible frame {res['nearest']:.4f}")
    common.log(f"eval | split {split} | unmasked units vs clean targets: acc_u {res['acc_u']:.4f}, "
               f"two voices acc_u_mixed {res['acc_u_mixed']:.4f} (baseline: k-means of the two-voice audio's "
               f"own features {res['units_mfcc_mixed']:.4f}) | feature nmse clean->two voices: "
               f"output {res['nmse_output']:.3f} (baselines: mfcc {res['nmse_mfcc']:.3f}, "
               f"log-mel {res['nmse_logmel']:.3f})")
    return res


def train(cfg):
    if cfg.init_from not in ("scratch", "resume") and os.path.isfile(cfg.init_from):
        check_official(cfg, common.load_checkpoint(cfg.init_from))   # a misfit official file: one line, first
    rt = common.setup(cfg)
    state = build(cfg, rt)
    train_clips, val_clips = load_split(cfg, "train"), load_split(cfg, "val")
    common.check_clips(train_clips, 400, "train split")
    common.check_clips(val_clips, 400, "val split")
    sampler = common.SegmentSampler([c._audio for c in train_clips], cfg.segment, cfg.batch_size, cfg.seed,
                                    rt.rank, rt.world_size)
    step = common.init_from(cfg, state, sampler=sampler, arch_keys=ARCH_KEYS, official=load_official)
    if not int(state["km"].fitted):                        # scratch, or weights from a file without targets
        fit_targets(state, train_clips, cfg, rt)
    labeller = {k: state[k] for k in ("km", "teacher") if k in state}
    model = state["model"]
    common.log(f"WavLM: {common.count_params(model) / 1e6:.2f} M parameters "
               f"({encoder_params(model) / 1e6:.2f} M without the pre-training head), {cfg.layers} layers, "
               f"D={cfg.dim}")
    state["model"] = common.wrap_ddp(common.compile(model, cfg), rt)
    common.train_loop(cfg, rt, state, step, train_step, lambda step: get_batch(sampler, cfg, rt),
                      lambda samples: evaluate(cfg, common.unwrap(state["model"]), rt, split="val",
                                               labeller=labeller, samples_dir=samples),
                      sampler=sampler)

# ----------------------------------------------------------------------------- sample

@torch.no_grad()
def sample(cfg):
    """Encode --input (or a held-out utterance): write it (and a version with a second voice mixed in) as
    wav + png, and log how often the predicted units of the mixed audio equal the clean audio's."""
    model, km, cfg, rt = load_for_inference(cfg)
    if cfg.input:
        wav, _ = common.load_audio(cfg.input, sr=cfg.sample_rate)
        name, other = os.path.splitext(os.path.basename(cfg.input))[0], None
    else:
        utts = load_split(cfg, "test")
        wav, name, other = utts[0].wav, utts[0].id, utts[1 % len(utts)].wav
    wav = torch.from_numpy(wav[: 30 * cfg.sample_rate])
    if len(wav) < 400:
        raise SystemExit(f"error: the input is {len(wav)} samples; WavLM needs at least 400 (25 ms)")
    out = os.path.join(cfg.out_dir, "samples")
    common.save_sample(out, name, wav, cfg.sample_rate)
    other = torch.from_numpy(np.resize(other, len(wav))) if other is not None else None   # None: noise
    mixed = mix_in(wav, other, cfg, torch.Generator().manual_seed(cfg.seed))
    common.save_sample(out, name + "_mixed", mixed, cfg.sample_rate, ref=wav)
    with rt.autocast():
        units = [model(x[None].to(rt.device))[0].argmax(-1)[0] for x in (wav, mixed)]
    same = (units[0] == units[1]).float().mean().item()
    common.log(f"sample | {name}: {len(units[0])} frames; predicted units of the mixed audio equal the clean "
               f"audio's on {same:.1%} of frames | wrote {out}/{name}.wav, .png, {name}_mixed.wav, .png")

# ----------------------------------------------------------------------------- features and probes

@torch.no_grad()
def layer_features(model, wav, rt):
    """[(T, D)] * (layers + 1) and the output, for one (L,) waveform."""
    with rt.autocast():
        hidden, out = model.extract(wav[None].to(rt.device))
    return [h[0].float().cpu() for h in hidden], out[0].float().cpu()


def features(cfg):
    """For every utterance of --feature_splits, out_dir/features/<split>/<id>.npy: float32 (frames, dim) of
    layer --feature_layer (0 = the transformer's input, L = the last layer, -1 = the model's output: the last
    layer after the final LayerNorm of pre-LN models) at 50 Hz (frame t covers samples [320 t, 320 t + 400) at
    16 kHz); and out_dir/features/index.json: {"sample_rate", "frame_rate", "hop", "layer", "dim", "model",
    "items": [{"id", "split", "path", "frames", "seconds", "speaker", "text"}]}, paths relative to it.
    moshi.py --teacher reads this layout."""
    model, _, cfg, rt = load_for_inference(cfg)
    root = os.path.join(cfg.out_dir, "features")
    if not -1 <= cfg.feature_layer <= cfg.layers:          # checked here: an official file sets cfg.layers
        raise SystemExit(f"error: --feature_layer must be in -1..{cfg.layers} (got {cfg.feature_layer})")
    items = []
    for split in cfg.feature_splits:
        os.makedirs(os.path.join(root, split), exist_ok=True)
        for u in load_split(cfg, split):
            if len(u.wav) < 400:
                continue
            hidden, out = layer_features(model, torch.from_numpy(u.wav), rt)
            f = out if cfg.feature_layer == -1 else hidden[cfg.feature_layer]
            rel = os.path.join(split, u.id.replace("/", "_") + ".npy")
            np.save(os.path.join(root, rel), f.numpy().astype(np.float32))
            items.append(dict(id=u.id, split=split, path=rel, frames=len(f), seconds=round(u.duration, 4),
                              speaker=u.speaker, text=u.text))
    index = dict(sample_rate=cfg.sample_rate, frame_rate=cfg.sample_rate / frame_hop(cfg), hop=frame_hop(cfg),
                 layer=cfg.feature_layer, dim=cfg.dim, model=cfg.init_from, items=items)
    with open(os.path.join(root, "index.json"), "w") as fh:
        json.dump(index, fh)
    common.log(f"features | {len(items)} utterances, layer {cfg.feature_layer}, dim {cfg.dim}, "
               f"{index['frame_rate']:g} frames/s -> {root}/index.json")


def boundary_labels(u, T, frame_s):
    """Frame t is 1 if a word starts or ends within it or an adjacent frame (word-boundary detection)."""
    y = torch.zeros(T)
    for _, s, e in u.words:
        for t in (int(s / frame_s), int(e / frame_s)):
            y[max(0, t - 1): t + 2] = 1
    return y


def linear_probe(xtr, ytr, xte, yte, classes, steps):
    """Logistic regression (full-batch Adam on standardised inputs); returns test accuracy (or balanced acc
    for 2 classes, so predicting 'no boundary' everywhere scores 0.5)."""
    m, s = xtr.mean(0), xtr.std(0).clamp(min=1e-5)
    xtr, xte = (xtr - m) / s, (xte - m) / s
    lin = nn.Linear(xtr.shape[1], classes)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-4)
    w = torch.bincount(ytr, minlength=classes).float().clamp(min=1)
    w = (w.sum() / w) / classes                            # class-balanced: boundaries are rare frames
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(lin(xtr), ytr, weight=w).backward()
        opt.step()
    pred = lin(xte).argmax(-1)
    if classes == 2:
        return 0.5 * sum((pred[yte == c] == c).float().mean().item() for c in (0, 1))
    return (pred == yte).float().mean().item()


@torch.no_grad()
def _probe_inputs(model, cfg, rt, utts, mixed, seed):
    """Per utterance: [log-mel, MFCC, layer 0..L] frame features, optionally on audio with a second voice."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, u in enumerate(utts):
        wav = torch.from_numpy(u.wav[: 10 * cfg.sample_rate])
        if mixed:
            wav = mix_in(wav, torch.from_numpy(np.resize(utts[(i + 1) % len(utts)].wav, len(wav))), cfg, g)
        hidden, _ = layer_features(model, wav, rt)
        T = len(hidden[0])
        mel = common.mel_spectrogram(wav, cfg.sample_rate, 400, 320, n_mels=80, center=True).T[:T]
        out.append([mel, mfcc(wav[None], cfg.sample_rate)[0][:T]] + hidden)
    return out


def probe(cfg):
    """Linear probes on frozen features (speaker ID from utterance means; word boundaries per frame) against
    log-mel and MFCC, trained on clean train audio and tested on clean and on two-voice test audio."""
    model, _, cfg, rt = load_for_inference(cfg)
    tr = load_split(cfg, "train")[: max(cfg.eval_items * 4, 8)]
    te = [u for u in load_split(cfg, "test") + load_split(cfg, "val") if u.speaker in {t.speaker for t in tr}]
    te = te[: max(cfg.eval_items, 2)]
    hop_s = frame_hop(cfg) / cfg.sample_rate
    ftr = _probe_inputs(model, cfg, rt, tr, False, cfg.seed)
    names = ["log-mel", "mfcc"] + [f"layer{i}" for i in range(cfg.layers + 1)]
    spk = torch.tensor([u.speaker for u in tr]), torch.tensor([u.speaker for u in te])
    ybt = torch.cat([boundary_labels(u, len(f[0]), hop_s) for u, f in zip(tr, ftr)]).long()
    results = {}
    for cond in ("clean", "mixed"):
        fte = _probe_inputs(model, cfg, rt, te, cond == "mixed", cfg.seed + 1)
        ybe = torch.cat([boundary_labels(u, len(f[0]), hop_s) for u, f in zip(te, fte)]).long()
        for k, n in enumerate(names):
            sid = linear_probe(torch.stack([f[k].mean(0) for f in ftr]), spk[0],
                               torch.stack([f[k].mean(0) for f in fte]), spk[1], common.num_speakers(tr),
                               cfg.probe_steps)
            wb = linear_probe(torch.cat([f[k] for f in ftr]), ybt, torch.cat([f[k] for f in fte]), ybe, 2,
                              cfg.probe_steps)
            results[(cond, n)] = (sid, wb)
    # the majority baselines: the most frequent test speaker (the best constant guess, picked on the test
    # set); any constant boundary guess has balanced accuracy 0.5. log-mel and mfcc are the feature baselines.
    results[("clean", "majority")] = results[("mixed", "majority")] = (
        torch.bincount(spk[1]).max().item() / len(te), 0.5)
    for n in ["majority"] + names:                         # every layer: no layer is picked on the test set
        common.log(f"probe | {n:8s} | speaker-id acc clean {results[('clean', n)][0]:.3f} mixed "
                   f"{results[('mixed', n)][0]:.3f} | word-boundary bal-acc clean "
                   f"{results[('clean', n)][1]:.3f} mixed {results[('mixed', n)][1]:.3f} | "
                   f"train {len(tr)} utts, test {len(te)}")
    return results

# ----------------------------------------------------------------------------- bench

def bench(cfg):
    """Pre-training throughput (train_step), feature-extraction real-time factor eager vs compiled, FLOPs."""
    rt = common.setup(cfg, log_to_file=False)
    state = build(cfg, rt)
    state["km"].fit(torch.randn(max(cfg.num_classes * 4, 256), state["km"].centroids.shape[1]), 2, cfg.seed)
    batch = torch.randn(cfg.batch_size, cfg.segment, device=rt.device) * 0.1
    model = state["model"]
    step_ms = common.timeit(lambda: train_step(state, batch, cfg, rt), cfg.bench_iters, warmup=1)
    flops = common.count_flops(lambda: train_step(state, batch, cfg, rt))
    wav = torch.randn(1, int(cfg.bench_seconds * cfg.sample_rate), device=rt.device) * 0.1
    model.eval()
    fast = common.compile(model, cfg)

    def extract(m):                                        # the whole forward; the head is a small part
        with torch.no_grad(), rt.autocast():
            m(wav)
    eager_ms = common.timeit(lambda: extract(model), cfg.bench_iters, warmup=1)
    compiled_ms = (common.timeit(lambda: extract(fast), cfg.bench_iters, warmup=2) if fast is not model
                   else None)
    common.report_bench(cfg, rt, model=model, compiled=fast is not model, train_step_ms=step_ms,
                        train_audio_s_per_s=cfg.batch_size * cfg.segment / cfg.sample_rate / (step_ms / 1000),
                        train_flops_per_step=flops, features_rtf_eager=eager_ms / 1000 / cfg.bench_seconds,
                        features_rtf_compiled=compiled_ms / 1000 / cfg.bench_seconds if compiled_ms else None,
                        encoder_params=encoder_params(model))

# ----------------------------------------------------------------------------- official weights
# WavLM-Base.pt / WavLM-Base+.pt / WavLM-Large.pt (microsoft/unilm): {"cfg": dict, "model": state_dict}. Our
# names are the official ones except the conv blocks (.0 conv, .2 norm), the shared bias table (official:
# layer 0's self_attn) and the position conv's old-style weight norm (weight_g / weight_v).

def _official_renames(sd_keys, cfg):
    """(official name, our name) pairs."""
    pairs = []
    for i in range(len(cfg.conv_layers)):
        fe = f"feature_extractor.conv_layers.{i}"
        pairs.append((f"{fe}.0.weight", f"{fe}.conv.weight"))
        if cfg.conv_bias:
            pairs.append((f"{fe}.0.bias", f"{fe}.conv.bias"))
        for p in ("weight", "bias"):
            if cfg.extractor_mode == "layer_norm":
                pairs.append((f"{fe}.2.1.{p}", f"{fe}.norm.{p}"))
            elif i == 0:
                pairs.append((f"{fe}.2.{p}", f"{fe}.norm.{p}"))
    pairs += [("encoder.pos_conv.0.weight_g", "encoder.pos_conv.parametrizations.weight.original0"),
              ("encoder.pos_conv.0.weight_v", "encoder.pos_conv.parametrizations.weight.original1"),
              ("encoder.pos_conv.0.bias", "encoder.pos_conv.bias"),
              ("encoder.layers.0.self_attn.relative_attention_bias.weight",
               "encoder.relative_attention_bias.weight")]
    renamed = {o for o, _ in pairs} | {n for _, n in pairs}
    return pairs + [(k, k) for k in sd_keys if k not in renamed]


def is_official(ckpt):
    return isinstance(ckpt, dict) and "model" in ckpt and "cfg" in ckpt and not common.is_ours(ckpt)


def config_from_official(cfg, ckpt):
    """Set the architecture fields of cfg from an official file's tensors (and its cfg for what no tensor
    shows: normalize, layer_norm_first, max_distance); returns the list of changes for the log."""
    sd, ocfg = ckpt["model"], ckpt.get("cfg", {}) or {}
    convs, i = [], 0
    while f"feature_extractor.conv_layers.{i}.0.weight" in sd:
        c, _, k = sd[f"feature_extractor.conv_layers.{i}.0.weight"].shape
        convs.append((c, k))
        i += 1
    if [k for _, k in convs] != [k for _, k, _ in BASE_CONV]:
        raise SystemExit("error: this official file's conv encoder is not WavLM's (kernels 10,3,3,3,3,2,2)")
    D = sd["post_extract_proj.weight"].shape[0]
    pos_v = sd["encoder.pos_conv.0.weight_v"]
    new = dict(conv_layers=tuple((c, k, s) for (c, k), (_, _, s) in zip(convs, BASE_CONV)),
               extractor_mode=("layer_norm" if "feature_extractor.conv_layers.1.2.1.weight" in sd
                               else "default"),
               conv_bias="feature_extractor.conv_layers.0.0.bias" in sd, dim=D,
               layers=1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")),
               heads=sd["encoder.layers.0.self_attn.grep_a"].shape[1],
               ffn=sd["encoder.layers.0.fc1.weight"].shape[0],
               layer_norm_first=bool(ocfg.get("layer_norm_first", False)),
               normalize=bool(ocfg.get("normalize", False)),
               conv_pos=pos_v.shape[-1], conv_pos_groups=D // pos_v.shape[1],
               num_buckets=sd["encoder.layers.0.self_attn.relative_attention_bias.weight"].shape[0],
               max_distance=int(ocfg.get("max_distance", 800)))
    changes = [f"{k}={v!r}" for k, v in new.items() if getattr(cfg, k) != v]
    for k, v in new.items():
        setattr(cfg, k, v)
    return changes


def check_official(cfg, ckpt):
    """One error line naming the flags to pass when an official file does not fit cfg's architecture."""
    if is_official(ckpt):
        changes = config_from_official(replace(cfg), ckpt)
        if changes:
            raise SystemExit("error: the official file does not fit this model; pass " +
                             " ".join(f"--{c}" for c in changes))


def load_official_into(model, ckpt):
    """The encoder's weights from an official file; the pre-training head is not in it: ours stays."""
    sd, own = ckpt["model"], model.state_dict()
    mapped = {ours: sd[off] for off, ours in _official_renames(sd.keys(), model.cfg) if off in sd}
    mapped.update({k: own[k] for k in ("final_proj.weight", "final_proj.bias", "label_embs")})
    common.load_state_dict(model, mapped, what="WavLM")


def load_official(state, ckpt):
    """common.init_from's hook for --init_from=WavLM-*.pt (train() has checked that the file fits)."""
    load_official_into(common.unwrap(state["model"]), ckpt)


def to_official(model):
    """Our model as an official-format file {"cfg", "model"} (for tests and for other tools)."""
    cfg, sd = model.cfg, model.state_dict()
    ours_to_off = {ours: off for off, ours in _official_renames(sd.keys(), cfg)}
    out = {ours_to_off.get(k, k): v for k, v in sd.items() if not k.startswith(("final_proj", "label_embs"))}
    ocfg = dict(encoder_layers=cfg.layers, encoder_embed_dim=cfg.dim, encoder_ffn_embed_dim=cfg.ffn,
                encoder_attention_heads=cfg.heads, layer_norm_first=cfg.layer_norm_first,
                extractor_mode=cfg.extractor_mode, conv_bias=cfg.conv_bias, normalize=cfg.normalize,
                conv_pos=cfg.conv_pos, conv_pos_groups=cfg.conv_pos_groups, relative_position_embedding=True,
                num_buckets=cfg.num_buckets, max_distance=cfg.max_distance, gru_rel_pos=True,
                conv_feature_layers=repr(list(cfg.conv_layers)))
    return {"cfg": ocfg, "model": out}

# ----------------------------------------------------------------------------- main

if __name__ == "__main__":
    cfg = common.parse_config(Config, PRESETS,
                              modes=("train", "sample", "eval", "bench", "features", "probe"))
    {"train": train, "sample": sample, "eval": evaluate, "bench": bench, "features": features,
     "probe": probe}[cfg.mode](cfg)
