"""
CALM: Continuous Audio Language Models (Rouard, Orsini, Roebel, Zeghidour, Défossez, 2025)
— https://arxiv.org/abs/2509.06926

The idea: an audio LM does not need discrete tokens. A causal VAE-GAN (Mimi's SEANet + Transformers, its
RVQ replaced by a Gaussian bottleneck, §4.1) turns audio into continuous latents (32-d at 12.5 Hz for
speech, 128-d at 25 Hz for music). A causal backbone Transformer reads the past latents, noised in training
(x~ = sqrt(1-k) x + sqrt(k) eps, k ~ U(0, 1) per frame) so that it tolerates its own sampling errors; a
short-context Transformer over the last K clean latents restores the detail the noise hides; their summed
outputs condition a small MLP consistency head (TrigFlow / sCM, Eq. 3) that turns Gaussian noise into the
next latent in ONE step; the paper's TTS model (v3, App. A) trains that head by Lagrangian self-distillation
instead (flow matching + a flow-map term, --head_loss=lsd, as Pocket TTS does; the speech presets' choice).
Against an RQ-Transformer over RVQ tokens on the same backbone, the head is much faster (no depth loop over
codebooks) and the audio better. Both run here, --head=consistency (CALM) and --head=rvq (RVQ codes of the
same VAE's pre-bottleneck latent, a depth Transformer), so the paper's comparison, quality and speed, is one
file. Two stages (--stage), one state and one checkpoint each.

Simplified here: speech is TTS-style, conditioned on a corpus BPE text stream ahead of the audio (80 ms; 160
in the CPU preset, ours); the speech backbone is Pocket TTS's size (Helium-2B's is not known); no official
weights exist to map. The VAE has no WavLM distillation; the CPU presets add EnCodec's reconstruction terms,
and the KL is per element with a small initial sigma (ours). The small (CPU) preset decodes with Vocos' iSTFT
head at the 200 Hz frames in place of the SEANet decoder (--decoder=istft, ours): after that preset's VAE
stage (~10 CPU minutes) the SEANet decoder's speech kept no words. sCM details the card lacks are sCM's own
[recalled]. lsd: its distillation term on every 4th step, x4 (Pocket TTS: a random quarter of steps), a plain
stop-gradient target (its "classic" variant), the learned weight w(s, t) on time embeddings (Pocket TTS: a
small MLP on (s, t)). Latent CFG (alpha 1.5) guides the text stream only (no voice prompt); no teacher-student
distillation, no EOS head (the text stream ends an utterance), no weight EMA. In TTS a word starts where the
text head's P(PAD) < 1/2, or after a second of PAD (ours); the CPU preset samples at temperature 0.2 and CFG
alpha 1.25 (the paper: 0.8; Pocket TTS: 1.5; ours). The RVQ baseline's codebooks are k-means on cached
latents, not trained jointly.
Aim 1100 lines not reached (1631): two stages, two heads, two decoders, TTS and continuation, eval, bench.

    python calm.py --stage=vae                      # 1. the VAE-GAN on the built-in speech (out/calm/vae)
    python calm.py --stage=lm                       # 2. the LM over its latents (reads out/calm/vae/ckpt.pt)
    python calm.py --stage=lm --head=rvq --out_dir=out/calm/lm_rvq   # the discrete baseline, same backbone
    python calm.py --stage=lm --init_from=resume
    python calm.py --stage=lm --mode=sample --init_from=out/calm/lm/ckpt.pt --text="hello there"   # TTS
    python calm.py --mode=sample --init_from=out/calm/lm/ckpt.pt --task=continue  # 2 s prompt -> continuation
    python calm.py --mode=eval --init_from=out/calm/vae/ckpt.pt    # VAE SI-SNR / mel distance on test
    python calm.py --stage=lm --mode=bench           # head latents/s, RTF, against --head=rvq in the same run
    python calm.py --corpus=music --preset=music ... # music: 128-d latents at 25 Hz from 32 kHz, continuation
    torchrun --standalone --nproc_per_node=8 calm.py --stage=lm --preset=speech
"""
import dataclasses
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    mode: str = "train"                # train | sample | eval | bench
    stage: str = "vae"                 # vae (the VAE-GAN autoencoder) | lm (the LM over its latents)
    head: str = "consistency"          # lm: consistency (CALM, §3) | rvq (discrete baseline, same backbone)
    corpus: str = "speech"             # speech (TTS + continuation) | music (continuation)
    preset: str = "speech"             # a key of PRESETS
    init_from: str = "scratch"         # scratch | resume | path to one of our checkpoints
    out_dir: str = "out/calm/{stage}"  # one folder (ckpt.pt, log.txt, samples/) per stage
    vae: str = "out/calm/vae/ckpt.pt"  # --stage=lm: the trained VAE whose latents the LM models
    data_dir: str = ""                 # empty: the built-in corpus (--corpus)
    corpus_hours: float = 2.0          # size of the built-in corpus
    lm_corpus_hours: float = 0.0       # --stage=lm: the built-in corpus it reads (0: corpus_hours)
    input: str = ""                    # sample: a wav (vae: encode/decode it; lm continue: its 2 s prompt)
    task: str = "tts"                  # sample at --stage=lm: tts | continue
    text: str = ""                     # tts: the sentence to speak (empty: held-out test sentences)
    n_items: int = 1                   # sample: held-out items to write
    # VAE: causal SEANet + Transformers, Gaussian bottleneck (§4.1, Table 13)
    sample_rate: int = 24000           # speech 24 kHz, music 32 kHz
    channels: int = 1                  # audio channels
    n_filters: int = 64                # base SEANet width C; doubles at every downsampling (Mimi's)
    dimension: int = 512               # pre-bottleneck latent D (also the VAE Transformer width)
    ratios: tuple = (6, 5, 4)          # SEANet ratios (decoder order; encoder reversed): hop 120 -> 200 Hz,
                                       # then a stride-16 conv to 12.5 Hz: Table 13's "6, 5, 4, 4, 4" read as
                                       # Pocket TTS's codec lays it out [inferred]
    n_residual_layers: int = 1         # residual units per block
    compress: int = 2                  # residual branch width C/compress
    dilation_base: int = 2             # dilation of residual unit j is base**j
    kernel_size: int = 7               # first conv
    residual_kernel_size: int = 3      # residual unit conv
    last_kernel_size: int = 3          # last conv
    decoder: str = "seanet"            # seanet (the paper's, Mimi's) | istft (ours, the CPU preset: Vocos'
                                       # iSTFT head on the 200 Hz frames in place of the 120x up-sampling)
    istft_hidden: int = 256            # --decoder=istft: conv width before the STFT head
    frame_rate: float = 12.5           # latent frames a second (1920 samples at 24 kHz)
    latent_dim: int = 32               # Gaussian latent size (speech 32, music 128; Table 13)
    tr_layers: int = 8                 # Transformer layers in the encoder and in the decoder (Table 13)
    tr_heads: int = 8                  # attention heads
    tr_ffn: int = 2048                 # GELU MLP width
    tr_context: int = 2000             # frames a query may look back: 10 s (Table 13) at the 200 Hz the VAE
                                       # Transformers run at (before the stride-16 down-sample); music: 750
    layer_scale: float = 0.01          # LayerScale init of the VAE Transformers (Mimi's)
    rope_max_period: float = 10000.0   # RoPE base
    disc_filters: int = 32             # MS-STFT discriminator channels
    disc_n_ffts: tuple = (2048, 1024, 512, 256, 128)  # its STFT scales, hop n_fft/4
    lambda_kl: float = 0.01            # KL weight per latent element (Table 13: 0.01; per element: ours)
    lambda_adv: float = 1.0            # hinge adversarial loss (Eq. 2) [inferred]
    lambda_feat: float = 3.0           # relative feature matching (Eq. 2) [inferred: EnCodec's]
    recon_loss: bool = False           # time L1 + multi-scale mel (Table 13: music yes, speech no)
    lambda_t: float = 0.1              # time-domain L1 (with --recon_loss)
    lambda_f: float = 3.0              # multi-scale mel: linear L1 + log10 MSE (with --recon_loss)
    mel_scales: tuple = (5, 6, 7, 8, 9, 10, 11)  # mel-loss windows 2^i, hop 2^i / 4
    n_mels: int = 64                   # mel bins of the reconstruction loss
    # LM: backbone, short-context Transformer, consistency head (§3)
    lm_dim: int = 1024                 # backbone width (Pocket TTS's; the paper's Helium-2B size is unknown)
    lm_layers: int = 6                 # backbone layers
    lm_heads: int = 16                 # backbone heads
    lm_ffn: int = 4096                 # backbone MLP width
    lm_context: int = 750              # frames the backbone may look back (60 s at 12.5 Hz)
    noise_injection: bool = True       # §3.2: noise the backbone's past latents in training (not inference)
    short_context: int = 10            # K: clean latents the short-context Transformer sees (§3.2) [inferr.]
    short_dim: int = 256               # its width [inferred: the card found no value]
    short_layers: int = 2              # its layers [inferred]
    head_dim: int = 512                # consistency head MLP width (Pocket TTS's)
    head_depth: int = 6                # AdaLN residual blocks (Pocket TTS's)
    head_batch_mul: int = 8            # (t, eps) draws per backbone output (§3.3, the paper's N = 8)
    p_mean: float = -1.0               # sCM time proposal tau ~ N(p_mean, p_std^2) [recalled, sCM]
    p_std: float = 1.4
    sigma_d: float = 1.0               # data std (the latents are normalised per dimension)
    tangent_c: float = 0.1             # sCM tangent normalisation g / (|g| + c) [recalled]
    tangent_warmup: int = 10000        # sCM tangent warm-up steps (r = min(1, step / H)) [recalled]
    temperature: float = 0.8           # noise VARIANCE at sampling (std sqrt(temp); 0.8 best for speech, §4)
    head_steps: int = 1                # consistency steps at sampling (1 = the paper's main setting; music 4)
    head_loss: str = "scm"             # scm: Eq. 3, sCM consistency training (the continuation heads) | lsd:
                                       # v3's TTS head (App. A, Pocket TTS): Lagrangian self-distillation (Boffi
                                       # et al. 2025), flow matching + a flow-map term
    lsd_flow_share: float = 0.75       # lsd: weight of the flow-matching term (App. A: 75 %; the rest distils)
    lsd_distill_every: int = 4         # lsd: the self-distillation term on every 4th step, x4 (Pocket TTS: on a
                                       # random quarter of steps; it costs more than half a step)
    text_vocab: int = 1000             # BPE tokens (common.train_bpe); + PAD and EOS
    text_delay: int = 1                # frames the audio lags the text stream (80 ms, project page)
    lambda_text: float = 1.0           # weight of the text-stream cross-entropy [inferred]
    text_drop: float = 0.2             # share of LM training sequences whose text stream is all PAD (CFG;
    #                                    the official config's text dropout 0.2)
    cfg_alpha: float = 1.5             # latent CFG at sampling: Z_0 + alpha (Z_text - Z_0) (Pocket TTS 1.5; 1: off)
    n_q: int = 8                       # --head=rvq: codebooks (8 RVQ, the paper's speech baseline)
    codebook_size: int = 2048          # --head=rvq: entries per codebook
    kmeans_iters: int = 20             # --head=rvq: k-means iterations per level
    depth_dim: int = 512               # --head=rvq: depth Transformer width
    depth_layers: int = 4              # --head=rvq: depth Transformer layers
    rvq_temperature: float = 0.8       # --head=rvq: softmax temperature (the paper's baseline at 0.8)
    # training (Table 13: VAE AdamW 8e-4 cosine, batch 64, 12 s; LM: AdamW (0.9, 0.95), 2e-4 [S6])
    segment: int = 288_000             # VAE training crop in samples (12 s)
    lm_segment: int = 240_000          # LM training crop in samples (10 s = 125 frames)
    batch_size: int = 64
    lr: float = 8e-4                   # VAE learning rate
    lm_lr: float = 2e-4                # LM learning rate
    betas: tuple = (0.5, 0.9)          # VAE AdamW betas [recalled, Mimi]
    lm_betas: tuple = (0.9, 0.95)      # LM AdamW betas
    weight_decay: float = 0.0
    warmup_iters: int = 1000           # linear warm-up, then cosine
    decay_iters: int = 400_000         # cosine horizon (not max_iters: a resume keeps the schedule)
    grad_clip: float = 1.0             # LM gradient clipping
    max_iters: int = 400_000
    lm_max_iters: int = 0              # --stage=lm: its steps and cosine horizon (0: max_iters, decay_iters)
    log_interval: int = 50
    eval_interval: int = 2000          # evaluate on val and checkpoint
    eval_items: int = 8                # held-out clips in evaluate()
    eval_seconds: float = 4.0          # VAE eval crop
    listen_items: int = 16             # vae --mode=eval: whole test clips written, resynthesised and
                                       # original, as two folders an ASR judges (common.write_listening_set)
    prompt_seconds: float = 2.0        # continuation prompt (2 s)
    gen_seconds: float = 4.0           # continuation length (TTS ends at its EOS)
    bench_seconds: float = 10.0        # audio length of the bench's generation
    bench_iters: int = 5               # timed repetitions in --mode=bench
    device: str = "auto"
    dtype: str = "auto"                # bf16 autocast on CUDA, fp32 elsewhere (STFTs, losses, JVP stay fp32)
    compile: bool = True
    seed: int = 1337

    def validate(self):
        def bad(msg):
            raise SystemExit(f"error: {msg}")
        hop = int(np.prod(self.ratios))
        frame = self.sample_rate / self.frame_rate
        choices = dict(stage=("vae", "lm"), head=("consistency", "rvq"), corpus=("speech", "music"),
                       task=("tts", "continue"), decoder=("seanet", "istft"), head_loss=("lsd", "scm"))
        for k, opts in choices.items():
            if getattr(self, k) not in opts:
                bad(f"--{k} must be one of {', '.join(opts)} (got {getattr(self, k)!r})")
        if frame != int(frame) or int(frame) % hop:
            bad(f"--frame_rate={self.frame_rate} needs sample_rate/frame_rate to be a multiple of the hop "
                f"{hop}")
        for k in ("segment", "lm_segment"):
            if getattr(self, k) % int(frame) or getattr(self, k) < 2 * frame:
                bad(f"--{k}={getattr(self, k)} must be a multiple of {int(frame)} samples, at least 2 frames")
        for d, h, what in ((self.dimension, self.tr_heads, "dimension/tr_heads"), (self.lm_dim, self.lm_heads,
                           "lm_dim/lm_heads"), (self.short_dim, max(1, self.short_dim // 64), "short_dim")):
            if d % h or (d // h) % 2:
                bad(f"--{what}: {d} must split into {h} heads of even size (RoPE rotates pairs)")
        if self.temperature < 0 or self.rvq_temperature < 0:
            bad("--temperature and --rvq_temperature must be >= 0")
        if not 0 < self.lsd_flow_share <= 1:
            bad(f"--lsd_flow_share takes (0, 1] (got {self.lsd_flow_share})")
        if not 0 <= self.text_drop < 1 or self.cfg_alpha < 0:
            bad(f"--text_drop takes [0, 1) and --cfg_alpha >= 0 (got {self.text_drop}, {self.cfg_alpha})")
        for k in ("head_steps", "head_batch_mul", "lsd_distill_every", "short_context", "n_q", "latent_dim",
                  "codebook_size", "text_vocab"):
            if getattr(self, k) < 1:
                bad(f"--{k} must be >= 1 (got {getattr(self, k)})")
        if self.text_vocab < 256:
            bad(f"--text_vocab={self.text_vocab} must be >= 256 (the byte-level BPE starts from 256 bytes)")
        if self.decoder == "istft" and self.channels != 1:
            bad("--decoder=istft writes one channel (use --decoder=seanet for --channels > 1)")
        if self.sigma_d <= 0 or self.lambda_kl < 0 or self.lm_corpus_hours < 0:
            bad("--sigma_d must be > 0, --lambda_kl and --lm_corpus_hours >= 0")
        if (self.stage == "lm" and self.mode == "train" and self.init_from == "scratch"
                and not os.path.isfile(self.vae)):
            bad(f"--stage=lm models a trained VAE's latents: no checkpoint at --vae={self.vae!r} "
                "(train one with --stage=vae, or pass --vae=PATH)")
        if self.mode == "sample" and self.text and (self.stage != "lm" or self.corpus != "speech"):
            bad("--text needs an LM checkpoint trained on speech (--stage=lm --corpus=speech)")

PRESETS = {
    # the paper's speech VAE (Table 13) with Pocket TTS's backbone and head (the card's verified code values)
    # and its TTS objective (v3, App. A)
    "speech": dict(head_loss="lsd"),
    # the music VAE (App. B, Table 13): 32 kHz, 128-d at 25 Hz, 4/4 layers, 30 s context; MusicGen-Medium
    # backbone
    "music": dict(corpus="music", sample_rate=32000, ratios=(8, 8, 5, 4), frame_rate=25.0, latent_dim=128,
                  tr_layers=4, tr_context=750, recon_loss=True, lm_dim=1536, lm_layers=48, lm_heads=24,
                  lm_ffn=6144, head_steps=4, n_q=32, segment=384_000, lm_segment=320_000, temperature=0.8),
    # small, the CPU stages: reconstruction on, the iSTFT head; the Eq. 2 weights (lambda_f 3, feat 3, adv 1,
    # t 0.1, KL 0.01) send the decoder output gradients f : feat : t : adv ~ 1 : 0.003 : 5e-5 : 2e-6 at init
    # (1 : 0.14 : 0.002 : 1e-4 with the SEANet decoder; measured on corpus speech, test_loss_balance_at_init):
    # the head's first output is quiet (rms 0.003), so the mel term leads; the adversarial one grows as D learns
    "small": dict(n_filters=8, dimension=64, tr_layers=2, tr_heads=4, tr_ffn=256, disc_filters=8,
                  disc_n_ffts=(256,), mel_scales=(5, 6, 7, 8, 9, 10, 11), recon_loss=True, decoder="istft",
                  head_loss="lsd", segment=23040,  # 0.96 s: 12 latent frames, 192 frames for the VAE Transformers
                  lm_dim=256, lm_layers=4, lm_heads=4, lm_ffn=1024, short_dim=128, short_layers=1,
                  head_dim=256, head_depth=3, head_batch_mul=4, n_q=8, codebook_size=256,
                  head_steps=4,  # 2000 CPU steps leave lsd's one-jump map short of the flow: 4 jumps, TTS WER
                                 # 0.73-0.83 vs 0.80-0.91 in one (2 runs x 2 seeds, 32 sentences; originals 0.50)
                  temperature=0.2,  # the paper's 0.8 is for continuation by a 2B model; this small LM's TTS is
                                    # heard better with less noise (CFG 1.5): 0.74 vs 0.79 (2000 steps), 0.62 vs 0.69
                                    # (12000 on 6 h; 6 / 3 seeds x 32 sentences; 0.4: 0.74, 0.65; 0: 0.72, 0.62)
                  cfg_alpha=1.25,  # at temperature 0.2, 1.5 overshoots: WER 0.65 / 0.63 / 0.65 / 0.55 vs 0.71 /
                                   # 0.64 / 0.66 / 0.62 (4 LMs x 6 seeds; 1.0: 0.65 / 0.65, 2.0: 0.80 / 0.73)
                  text_vocab=1024,  # nearly every corpus word one token (at 512, 3-5 tokens on as many frames:
                                    # the spelling reached the LM after the word's audio had begun)
                  text_delay=2,  # the text 160 ms ahead (the paper: 80 ms; ours): TTS WER 0.766 vs 0.814 at 80
                                 # ms, 0.784 at 240 (one run each, 3 seeds x 32 sentences, 2000 steps)
                  depth_dim=128, depth_layers=2, lm_segment=76800, batch_size=8, lr=2e-3, lm_lr=1e-3,
                  warmup_iters=50, tangent_warmup=200, decay_iters=1100, max_iters=1100,
                  lm_max_iters=3000,  # TTS WER 0.65, 0.63 (2 runs) vs 0.71 at 2000 (6 seeds); 12000 on 6 h: 0.55
                  log_interval=20,
                  eval_interval=220, eval_items=4,
                  gen_seconds=3.0, bench_seconds=4.0, corpus_hours=0.5,  # VAE ~12 min, LM ~12 on a CPU
                  lm_corpus_hours=2.0),  # the LM reads 2 h: on 0.5 h its val text CE rose from step 1000 (0.84 to
                                         # 1.11; 2 h: 0.71) and TTS WER 0.853 vs 0.812
    "tiny": dict(n_filters=2, dimension=16, tr_layers=1, tr_heads=2, tr_ffn=32, tr_context=50, disc_filters=4,
                 disc_n_ffts=(256,), mel_scales=(6, 7), recon_loss=True, segment=3840, latent_dim=8,
                 istft_hidden=16, head_loss="lsd",
                 lm_dim=32, lm_layers=1, lm_heads=2, lm_ffn=64, short_context=3, short_dim=16, short_layers=1,
                 head_dim=32, head_depth=1, head_batch_mul=2, text_vocab=260, n_q=2, codebook_size=8,
                 kmeans_iters=3, depth_dim=16, depth_layers=1, lm_segment=15360, batch_size=2, warmup_iters=2,
                 decay_iters=20, tangent_warmup=2, max_iters=10, log_interval=1, eval_interval=1000,
                 eval_items=1, eval_seconds=0.96, prompt_seconds=0.32, gen_seconds=0.48, bench_seconds=0.48,
                 bench_iters=1, corpus_hours=0.02),
}


# the VAE's fields: the LM stage takes them from its --vae checkpoint
VAE_KEYS = ("corpus", "sample_rate", "channels", "n_filters", "dimension", "ratios", "n_residual_layers",
            "compress", "dilation_base", "kernel_size", "residual_kernel_size", "last_kernel_size",
            "frame_rate", "latent_dim", "tr_layers", "tr_heads", "tr_ffn", "disc_filters", "disc_n_ffts",
            "decoder", "istft_hidden")

LM_KEYS = ("head", "lm_dim", "lm_layers", "lm_heads", "lm_ffn", "short_context", "short_dim", "short_layers",
           "head_dim", "head_depth", "head_loss", "text_vocab", "text_delay", "n_q", "codebook_size", "depth_dim",
           "depth_layers")

ARCH_KEYS = ("stage",) + VAE_KEYS + LM_KEYS  # fields that shape the weights or the features

# ----------------------------------------------------------------------------- model

# The VAE-GAN (--stage=vae, §4.1): Mimi's causal SEANet + Transformers, a Gaussian bottleneck for its RVQ

def _init_conv(conv):
    # Variance-preserving init (encodec.py's finding, not the paper's): N(0, 1/fan_in) and zero bias keep the
    # signal's scale through the stack; PyTorch's default leaves an untrained SEANet's output nearly constant.
    transposed = isinstance(conv, nn.ConvTranspose1d)
    fan_in = conv.weight.shape[1] * conv.kernel_size[0] / (conv.stride[0] if transposed else 1)
    nn.init.normal_(conv.weight, 0.0, fan_in ** -0.5)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


class CausalConv1d(nn.Module):
    """Conv1d padded with k_eff - stride zeros on the left only (causal): T samples give T / stride frames."""

    def __init__(self, cin, cout, kernel, stride=1, dilation=1, groups=1, bias=True):
        super().__init__()
        self.conv = _init_conv(nn.Conv1d(cin, cout, kernel, stride, dilation=dilation, groups=groups,
                                         bias=bias))
        self.pad = (kernel - 1) * dilation + 1 - stride

    def forward(self, x):  # (B, Cin, T) -> (B, Cout, T / stride)
        return self.conv(F.pad(x, (self.pad, 0)) if self.pad else x)  # (F.pad copies even a zero padding)


class CausalConvTranspose1d(nn.Module):
    """Transposed conv (kernel 2S, stride S) trimming its k - S overhang on the right (causal)."""

    def __init__(self, cin, cout, kernel, stride, groups=1, bias=True):
        super().__init__()
        self.conv = _init_conv(nn.ConvTranspose1d(cin, cout, kernel, stride, groups=groups, bias=bias))
        self.trim = kernel - stride

    def forward(self, x):  # (B, Cin, T) -> (B, Cout, T * stride)
        y = self.conv(x)  # (B, Cout, (T-1)*S + k)
        return y[..., :y.shape[-1] - self.trim]


class ResidualUnit(nn.Module):
    """SEANet residual unit with Mimi's identity skip: x + conv k1(ELU(conv k3 dilated(ELU(x))))."""

    def __init__(self, dim, dilation, cfg):
        super().__init__()
        hidden = dim // cfg.compress
        self.conv1 = CausalConv1d(dim, hidden, cfg.residual_kernel_size, dilation=dilation)
        self.conv2 = CausalConv1d(hidden, dim, 1)

    def forward(self, x):
        return x + self.conv2(F.elu(self.conv1(F.elu(x))))


class SEANetEncoder(nn.Module):
    """conv k7 -> per ratio (residual unit, ELU, strided conv k=2S doubling the channels) -> ELU, conv k3 ->
    D. (B, 1, T) -> (B, D, T / hop)."""

    def __init__(self, cfg):
        super().__init__()
        C = cfg.n_filters
        self.conv_in = CausalConv1d(cfg.channels, C, cfg.kernel_size)
        self.blocks = nn.ModuleList()
        for i, s in enumerate(reversed(cfg.ratios)):  # speech: strides 4, 5, 6
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


class SEANetDecoder(nn.Module):
    """The mirror: conv k7 -> per ratio (ELU, transposed conv k=2S halving, residual unit) -> conv k3."""

    def __init__(self, cfg):
        super().__init__()
        C, n = cfg.n_filters, len(cfg.ratios)
        self.conv_in = CausalConv1d(cfg.dimension, C * 2 ** n, cfg.kernel_size)
        self.blocks = nn.ModuleList()
        for i, s in enumerate(cfg.ratios):
            blk, c = nn.Module(), C * 2 ** (n - i)
            blk.up = CausalConvTranspose1d(c, c // 2, 2 * s, s)
            blk.res = nn.ModuleList(ResidualUnit(c // 2, cfg.dilation_base ** j, cfg)
                                    for j in range(cfg.n_residual_layers))
            self.blocks.append(blk)
        self.conv_out = CausalConv1d(C, cfg.channels, cfg.last_kernel_size)

    def forward(self, z):
        x = self.conv_in(z)
        for b in self.blocks:
            x = b.up(F.elu(x))
            for r in b.res:
                x = r(x)
        return self.conv_out(F.elu(x))


class ISTFTDecoder(nn.Module):
    """--decoder=istft (ours, after Vocos, Siuzdak 2023): at the SEANet hop's frame rate (200 Hz for speech),
    three causal convs, then per frame the log-magnitude and phase of an n_fft = 4 hop STFT, inverted by
    overlap-add. The SEANet decoder reaches 24 kHz through 120x of thin transposed convs; after the small
    preset's VAE stage (~10 CPU minutes) its speech kept no words (corpus-ASR WER 0.96), this head's kept
    most (0.56-0.63, originals 0.51: measured). Not causal by n_fft / 2 samples (10 ms at 24 kHz): a
    frame's window is centred on it."""

    def __init__(self, cfg):
        super().__init__()
        self.hop = int(np.prod(cfg.ratios))
        self.n_fft, H = 4 * self.hop, cfg.istft_hidden
        self.conv1, self.conv2 = CausalConv1d(cfg.dimension, H, 7), CausalConv1d(H, H, 7)
        self.conv3 = CausalConv1d(H, H, 3)
        self.out = nn.Conv1d(H, 2 * (self.n_fft // 2 + 1), 1)    # log-magnitude and phase per bin
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)

    def forward(self, x):  # (B, D, F) -> (B, 1, F * hop)
        h = F.gelu(self.conv1(x))
        h = h + F.gelu(self.conv2(h))
        h = h + F.gelu(self.conv3(h))
        with torch.autocast(x.device.type, enabled=False):
            log_mag, phase = self.out(h.float()).chunk(2, 1)  # (B, n_fft / 2 + 1, F) each
            spec = log_mag.clamp(max=math.log(100)).exp() * torch.exp(1j * phase)
            y = torch.istft(spec, self.n_fft, self.hop, window=self.window, center=True,
                            length=x.shape[-1] * self.hop)
        return y[:, None]


def apply_rope(x, pos, max_period):
    """Rotary position embedding, pairs interleaved as Mimi's code. x: (B, H, T, d), pos: (T,)."""
    d = x.shape[-1]
    i = torch.arange(d // 2, device=x.device, dtype=torch.float32)
    freqs = torch.exp(i * (-math.log(max_period) * 2 / d))
    ang = pos.float()[:, None] * freqs  # (T, d/2)
    cos, sin = ang.cos(), ang.sin()
    xr, xi = x.float().view(*x.shape[:-1], d // 2, 2).unbind(-1)  # (B, H, T, d/2) each
    out = torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], -1)  # (B, H, T, d/2, 2)
    return out.view(x.shape).to(x.dtype)


class TransformerLayer(nn.Module):
    """Pre-norm causal layer: x += ls1 * Attn(LN(x)); x += ls2 * MLP(LN(x)); RoPE, no biases, attention over
    at most `context` past frames. Mimi's, with the sizes as arguments: the VAE, the backbone, the
    short-context and the depth Transformer are all this layer. layer_scale=None: no LayerScale (the LM's
    Transformers)."""

    def __init__(self, dim, heads, ffn, context, max_period=10000.0, layer_scale=None):
        super().__init__()
        self.heads, self.context, self.max_period = heads, context, max_period
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-5), nn.LayerNorm(dim, eps=1e-5)
        self.in_proj = nn.Linear(dim, 3 * dim, bias=False)  # fused q, k, v
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.linear1, self.linear2 = nn.Linear(dim, ffn, bias=False), nn.Linear(ffn, dim, bias=False)
        ls = (lambda: nn.Parameter(torch.full((dim,), layer_scale))) if layer_scale else (lambda: None)
        self.layer_scale_1, self.layer_scale_2 = ls(), ls()

    def attention(self, x, past, offset):
        """x: (B, T, D) new frames at positions offset..offset+T-1; past: cached (k, v) of earlier frames."""
        B, T, D = x.shape
        qkv = self.in_proj(x).view(B, T, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, d)
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
        x = x + (a if self.layer_scale_1 is None else self.layer_scale_1 * a)
        m = self.linear2(F.gelu(self.linear1(self.norm2(x))))
        x = x + (m if self.layer_scale_2 is None else self.layer_scale_2 * m)
        return x, cache


class Transformer(nn.Module):
    """The VAE's bottleneck Transformer, on (B, D, T) frames."""

    def __init__(self, cfg):
        super().__init__()
        layer = lambda: TransformerLayer(cfg.dimension, cfg.tr_heads, cfg.tr_ffn, cfg.tr_context,
                                         cfg.rope_max_period, cfg.layer_scale)
        self.layers = nn.ModuleList(layer() for _ in range(cfg.tr_layers))

    def forward(self, z):  # (B, D, T) -> (B, D, T)
        x = z.transpose(1, 2)  # (B, T, D)
        for layer in self.layers:
            x = layer(x)[0]
        return x.transpose(1, 2)


class GaussianBottleneck(nn.Module):
    """§4.1: the RVQ's place is taken by a diagonal Gaussian q(z|x) = N(mu, exp(logvar)), KL-regularised
    towards N(0, I); 1x1 convs D -> 2 x latent_dim (mu, logvar) and latent_dim -> D (Pocket TTS's 32 -> 512
    output_proj)."""

    def __init__(self, cfg):
        super().__init__()
        self.input_proj = nn.Conv1d(cfg.dimension, 2 * cfg.latent_dim, 1)
        self.output_proj = nn.Conv1d(cfg.latent_dim, cfg.dimension, 1)
        # ours: sigma starts at e^-4 ~ 0.02, not 1: an untrained encoder's means move by ~0.1, so at sigma = 1
        # the decoder would see z as noise and learn to ignore it. The KL raises sigma where it can.
        nn.init.constant_(self.input_proj.bias[cfg.latent_dim:], -8.0)

    def forward(self, h):  # (B, D, F) -> mu, logvar (B, latent_dim, F)
        mu, logvar = self.input_proj(h).float().chunk(2, 1)
        return mu, logvar.clamp(-30.0, 20.0)


class VAE(nn.Module):
    """encoder -> Transformer -> (stride conv if the SEANet hop is not yet a frame) -> Gaussian bottleneck ->
    1x1 -> (transposed conv) -> Transformer -> decoder. Causal (the iSTFT head: 10 ms of look-ahead), so it
    could stream as Mimi does."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, D = cfg, cfg.dimension
        hop = int(np.prod(cfg.ratios))
        self.frame_size = int(cfg.sample_rate / cfg.frame_rate)
        stride = self.frame_size // hop  # speech: 16 (1920 / 120); music: 1 (its four ratios reach 25 Hz)
        self.encoder, self.encoder_transformer = SEANetEncoder(cfg), Transformer(cfg)
        # Mimi's learned resampler (kernel 2 x stride) where the SEANet hop is not yet a frame
        self.downsample = CausalConv1d(D, D, 2 * stride, stride, bias=False) if stride > 1 else nn.Identity()
        self.bottleneck = GaussianBottleneck(cfg)
        self.upsample = CausalConvTranspose1d(D, D, 2 * stride, stride, groups=D, bias=False) if stride > 1 \
            else nn.Identity()
        self.decoder_transformer = Transformer(cfg)
        self.decoder = SEANetDecoder(cfg) if cfg.decoder == "seanet" else ISTFTDecoder(cfg)

    def _pad(self, x):  # right-pad to whole frames
        return F.pad(x, (0, -x.shape[-1] % self.frame_size))

    def pre_latent(self, x):  # (B, 1, T) -> pre-bottleneck latents (B, D, ceil(T / frame)) (rvq's input)
        return self.downsample(self.encoder_transformer(self.encoder(self._pad(x))))

    def encode(self, x):  # (B, 1, T) -> posterior mu, logvar (B, latent_dim, F)
        return self.bottleneck(self.pre_latent(x))

    def decode(self, z):  # (B, latent_dim, F) -> (B, 1, F * frame)
        proj = self.bottleneck.output_proj
        return self.decoder(self.decoder_transformer(self.upsample(proj(z.to(proj.weight.dtype)))))

    def forward(self, x):
        """Training: reparameterised sample z = mu + sigma * eps -> reconstruction (B, 1, T), mu, logvar."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.decode(z)[..., :x.shape[-1]], mu, logvar


class STFTDiscriminator(nn.Module):
    """One scale of EnCodec's MS-STFT discriminator over (B, 2, frames, freq) real/imaginary STFT parts."""

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


# The CALM language model (--stage=lm, §3)

class TimestepEmbedder(nn.Module):
    """t -> 256 frequencies as [cos, sin] -> MLP, SiLU, MLP -> RMSNorm (Pocket TTS's form), on scale x t (sCM:
    TrigFlow's c_noise(t) = t, x1000 (ours) so that DiT's frequencies span t in (0, pi/2); LSD: t in [0, 1]
    as it is, so that the tangents d/dt through it stay small)."""

    def __init__(self, dim, n_freq=256, scale=1000.0):
        super().__init__()
        freqs = torch.exp(-math.log(10000.0) * torch.arange(n_freq // 2) / (n_freq // 2))
        self.register_buffer("freqs", scale * freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(n_freq, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.norm = nn.RMSNorm(dim, eps=1e-5)

    def forward(self, t):  # (N,) -> (N, dim)
        ang = t[:, None] * self.freqs
        return self.norm(self.mlp(torch.cat([ang.cos(), ang.sin()], -1)))


class LayerNorm(nn.Module):
    """LayerNorm written out in elementary ops (Pocket TTS's does the same): lsd backpropagates through a
    forward-mode JVP, and torch's fused layer_norm returns wrong gradients there (tested)."""

    def __init__(self, dim, eps=1e-6, affine=True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x):
        x = x - x.mean(-1, keepdim=True)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x if self.weight is None else x * self.weight + self.bias


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    """AdaLN residual block (MAR / DiT's SimpleMLPAdaLN): LN, modulate(shift, scale), Linear, SiLU, Linear,
    gated."""

    def __init__(self, dim):
        super().__init__()
        self.norm = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))

    def forward(self, x, c):
        shift, scale, gate = self.ada(c).chunk(3, -1)
        return x + gate * self.mlp(modulate(self.norm(x), shift, scale))


class ConsistencyHead(nn.Module):
    """§3.3: an MLP with AdaLN conditioning on Z + the time embedding, turning noise into a latent in one step.
    --head_loss=scm: F_theta(x_t / sigma_d, t, Z); the consistency map in the TrigFlow parameterisation (sCM,
    Eq. 3's f) is f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t, Z): at t = 0 it returns its
    input exactly (the boundary condition), at t = pi/2 it maps pure noise to data. --head_loss=lsd (v3's
    TTS head): a flow map over x_t = t x + (1 - t) eps (t = 1 is data) with two times, v(s, t, x_s, Z) (the
    mean of the two time embeddings), whose jump X_{s,t}(x_s) = x_s + (t - s) v lands on the flow at t;
    v(t, t, .) is the flow's velocity itself."""

    def __init__(self, cfg):
        super().__init__()
        W, self.sigma_d, self.lsd = cfg.head_dim, cfg.sigma_d, cfg.head_loss == "lsd"
        self.input_proj = nn.Linear(cfg.latent_dim, W)
        self.cond_embed = nn.Linear(cfg.lm_dim, W)
        self.time_embed = TimestepEmbedder(W, scale=1.0 if self.lsd else 1000.0)
        if self.lsd:
            self.start_embed = TimestepEmbedder(W, scale=1.0)  # s, the jump's start
        self.blocks = nn.ModuleList(ResBlock(W) for _ in range(cfg.head_depth))
        self.final_norm = LayerNorm(W, affine=False)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(W, 2 * W))
        self.out = nn.Linear(W, cfg.latent_dim)
        for blk in self.blocks:  # adaLN-zero: every block starts as the identity (DiT)
            nn.init.zeros_(blk.ada[1].weight), nn.init.zeros_(blk.ada[1].bias)

    def forward(self, x, t, z, s=None):  # scm: F(x / sigma_d, t, Z); lsd: v(s, t, x, Z). x (N, latent), t and
        # s (N,), z (N, lm_dim) -> (N, latent)
        temb = self.time_embed(t) if s is None else (self.time_embed(t) + self.start_embed(s)) / 2
        c = self.cond_embed(z) + temb
        h = self.input_proj(x)
        for blk in self.blocks:
            h = blk(h, c)
        shift, scale = self.final_ada(c).chunk(2, -1)
        return self.out(modulate(self.final_norm(h), shift, scale))

    def consistency(self, x_t, t, z):  # f(x_t, t) = cos t x_t - sin t sigma_d F(x_t / sigma_d, t)
        tt = t[:, None]
        return torch.cos(tt) * x_t - torch.sin(tt) * self.sigma_d * self(x_t / self.sigma_d, t, z)

    @torch.no_grad()
    def sample(self, z, temperature, steps=1, generator=None):
        """§3.3 one-step sampling: eps ~ N(0, temp sigma_d^2) at t = pi/2, x = f(eps, pi/2). With steps > 1:
        re-noise the estimate to the next (evenly spaced) time and apply f again. lsd: x = eps + v(0, 1, eps);
        with steps > 1, jumps s_i = i / steps -> s_{i+1} along the flow. z: (N, lm_dim) -> (N, latent)."""
        N, D = z.shape[0], self.out.out_features
        std = self.sigma_d * math.sqrt(temperature)  # temperature is the noise VARIANCE (§3.3)
        noise = lambda: torch.randn(N, D, device=z.device, generator=generator) * std
        if self.lsd:
            x = noise()
            for i in range(steps):
                s, t = (torch.full((N,), j / steps, device=z.device) for j in (i, i + 1))
                x = x + self(x, t, z, s) / steps  # X_{s,t}(x) = x + (t - s) v(s, t, x)
            return x
        t = torch.full((N,), math.pi / 2, device=z.device)
        x = self.consistency(noise(), t, z)
        for i in range(1, steps):
            t = torch.full((N,), math.pi / 2 * (steps - i) / steps, device=z.device)
            x = self.consistency(torch.cos(t)[:, None] * x + torch.sin(t)[:, None] * noise(), t, z)
        return x


class AdaptiveWeight(nn.Module):
    """w_psi(t) of Eq. 3 (sCM's adaptive weighting): a learned log-weight per time, zero at init. lsd: w(s,
    t), one per pair of times (Pocket TTS's learned log-variance of each term; its MLP on the raw (s, t) is
    here a time embedding of each, summed)."""

    def __init__(self, dim=128, lsd=False):
        super().__init__()
        self.embed = TimestepEmbedder(dim, scale=1.0 if lsd else 1000.0)
        if lsd:
            self.start_embed = TimestepEmbedder(dim, scale=1.0)
        self.out = nn.Linear(dim, 1)
        nn.init.zeros_(self.out.weight), nn.init.zeros_(self.out.bias)

    def forward(self, t, s=None):  # (N,) -> (N,)
        e = self.embed(t) if s is None else self.embed(t) + self.start_embed(s)
        return self.out(e)[:, 0]


class DepthHead(nn.Module):
    """--head=rvq (the discrete baseline, an RQ-Transformer): a small causal Transformer over the n_q codebook
    levels of one frame; level q's input is proj(Z) + emb_q(code_{q-1}), its output the logits of code_q."""

    def __init__(self, cfg):
        super().__init__()
        W = cfg.depth_dim
        self.proj = nn.Linear(cfg.lm_dim, W)
        self.emb = nn.ModuleList(nn.Embedding(cfg.codebook_size, W) for _ in range(cfg.n_q - 1))
        self.layers = nn.ModuleList(TransformerLayer(W, max(1, W // 64), 4 * W, cfg.n_q)
                                    for _ in range(cfg.depth_layers))
        self.norm = nn.LayerNorm(W)
        self.out = nn.ModuleList(nn.Linear(W, cfg.codebook_size, bias=False) for _ in range(cfg.n_q))

    def forward(self, z, codes):  # teacher forcing: z (N, lm_dim), codes (N, n_q) -> logits (N, n_q, K)
        x = self.proj(z)[:, None].expand(-1, len(self.out), -1)  # (N, n_q, W)
        if len(self.emb):  # level q also sees code q - 1
            x = x + F.pad(torch.stack([e(codes[:, q]) for q, e in enumerate(self.emb)], 1), (0, 0, 1, 0))
        for layer in self.layers:
            x = layer(x)[0]
        x = self.norm(x)
        return torch.stack([o(x[:, q]) for q, o in enumerate(self.out)], 1)

    @torch.no_grad()
    def sample(self, z, temperature, generator=None):  # (N, lm_dim) -> codes (N, n_q), level after level
        pz = self.proj(z)[:, None]  # (N, 1, W)
        x, caches, codes = pz, [None] * len(self.layers), []
        for q in range(len(self.out)):
            h = x
            for i, layer in enumerate(self.layers):
                h, caches[i] = layer(h, caches[i], q)
            logits = self.out[q](self.norm(h[:, -1]))
            c = logits.argmax(-1) if temperature == 0 else torch.multinomial(
                F.softmax(logits.float() / temperature, -1), 1, generator=generator)[:, 0]
            codes.append(c)
            if q + 1 < len(self.out):
                x = pz + self.emb[q](c)[:, None]
        return torch.stack(codes, 1)


class CALM(nn.Module):
    """§3: the backbone over past latents (noised in training) + the short-context Transformer over the last
    K clean latents, summed into Z_s, which conditions the head that emits latent s. Speech also carries a
    text stream: position s reads text token s (the text leads the audio by text_delay frames) and predicts
    text token s + 1. Buffers: emb_mean / emb_std (the per-dimension latent normaliser), and for --head=rvq
    the k-means codebooks."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, L, D = cfg, cfg.latent_dim, cfg.lm_dim
        self.register_buffer("emb_mean", torch.zeros(L))
        self.register_buffer("emb_std", torch.ones(L))
        self.pad_id, self.eos_id = cfg.text_vocab, cfg.text_vocab + 1
        self.text_emb = nn.Embedding(cfg.text_vocab + 2, D)
        self.bos = nn.Parameter(torch.randn(D) * 0.02)  # the input before the first latent (a learned BOS)
        layer = lambda: TransformerLayer(D, cfg.lm_heads, cfg.lm_ffn, cfg.lm_context, cfg.rope_max_period)
        self.layers = nn.ModuleList(layer() for _ in range(cfg.lm_layers))
        self.norm = nn.LayerNorm(D)
        self.text_out = nn.Linear(D, cfg.text_vocab + 2, bias=False)
        if cfg.head == "consistency":
            self.latent_in = nn.Linear(L, D)
            self.short_in = nn.Linear(L, cfg.short_dim)
            W = cfg.short_dim
            self.short = nn.ModuleList(TransformerLayer(W, max(1, W // 64), 4 * W, cfg.short_context)
                                       for _ in range(cfg.short_layers))
            self.short_out = nn.Linear(cfg.short_dim, D)
            self.head, self.weight = ConsistencyHead(cfg), AdaptiveWeight(lsd=cfg.head_loss == "lsd")
        else:  # the RQ-Transformer baseline: the backbone reads the previous frame's code embeddings, summed
            self.register_buffer("codebooks", torch.zeros(cfg.n_q, cfg.codebook_size, cfg.dimension))
            self.code_in = nn.ModuleList(nn.Embedding(cfg.codebook_size, D) for _ in range(cfg.n_q))
            self.depth = DepthHead(cfg)

    # latent normalisation (§3.1; Pocket TTS's emb_mean / emb_std)
    def normalize(self, x):  # (..., latent) raw VAE means -> zero-mean unit-variance per dimension
        return (x - self.emb_mean) / self.emb_std

    def denormalize(self, x):
        return x * self.emb_std + self.emb_mean

    # the RVQ baseline's tokens: residual nearest neighbours in the k-means codebooks
    def rvq_encode(self, pre):  # (N, D) -> (N, n_q)
        residual, codes = pre.float(), []
        for cb in self.codebooks:
            c = torch.cdist(residual[None], cb[None])[0].argmin(-1)
            residual = residual - cb[c]
            codes.append(c)
        return torch.stack(codes, -1)

    def rvq_decode(self, codes):  # (..., n_q) -> (..., D)
        return sum(self.codebooks[q][codes[..., q]] for q in range(codes.shape[-1]))  # the first levels given

    def inputs(self, prev, text):
        """Backbone input of each position: the previous frame (a latent, or its codes) + this position's text
        token. prev: (B, S, latent) or (B, S, n_q) codes of frames s - 1 (BOS at s = 0 is the caller's); text
        (B, S)."""
        x = self.latent_in(prev) if self.cfg.head == "consistency" else \
            sum(e(prev[..., q]) for q, e in enumerate(self.code_in))
        return x + self.text_emb(text)

    def backbone(self, x, caches=None, offset=0):  # (B, S, D) -> (B, S, D); updates caches (one per layer)
        for i, layer in enumerate(self.layers):
            x, c = layer(x, None if caches is None else caches[i], offset)
            if caches is not None:
                caches[i] = c
        return self.norm(x)

    def short_context(self, clean):
        """§3.2: T_short over the K clean latents BEFORE each position: window s holds x_{s-K} .. x_{s-1}
        (zeros before the start). clean: (B, S, latent) latents 0..S-1 -> (B, S, lm_dim)."""
        B, S, L = clean.shape
        K = self.cfg.short_context
        padded = F.pad(clean, (0, 0, K, 0))  # (B, K + S, L): K zero frames in front
        win = padded.unfold(1, K, 1)[:, :S]  # (B, S, L, K): window s = padded[s : s + K] = x_{s-K} .. x_{s-1}
        return self.short_window(win.permute(0, 1, 3, 2).reshape(B * S, K, L)).view(B, S, -1)

    def short_window(self, win):  # (N, K, latent) windows of clean latents -> (N, lm_dim): T_short's output
        h = self.short_in(win)  # (N, K, short_dim)
        for layer in self.short:
            h = layer(h)[0]
        return self.short_out(h[:, -1])

    def condition(self, h, clean):  # Z_s = T_long output + T_short output (§3.2: a sum)
        return h + self.short_context(clean)

    def forward(self, batch, r=1.0, generator=None, distill=True):  # training: -> dict of losses (lm_losses),
        return lm_losses(self, batch, self.cfg, r, generator, distill)  # through DDP's forward


def noise_inject(x, generator=None):
    """§3.2, training only: each frame x_s -> sqrt(1 - k_s) x_s + sqrt(k_s) eps_s, k_s ~ U(0, 1), eps ~ N(0,
    I). x: (B, S, latent) -> same, and k (B, S, 1)."""
    k = torch.rand(*x.shape[:2], 1, device=x.device, generator=generator)
    eps = torch.randn(x.shape, device=x.device, generator=generator)
    return (1 - k).sqrt() * x + k.sqrt() * eps, k

# ----------------------------------------------------------------------------- loss

# The VAE (Eq. 2)

def kl_loss(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, 1)) per latent ELEMENT, 1/2 (mu^2 + sigma^2 - 1 - ln sigma^2), averaged
    over the batch, the latent dimensions and the frames. Table 13 gives the weight 0.01 (no reduction); read
    per element [inferred]: summed over 32 dimensions it outweighs the feature term and drowns the means in
    sampling noise, so the decoder learns to ignore z. mu, logvar: (B, latent, F)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean()


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
    """The mel spectra L_f compares (EnCodec's l_f as audiocraft's msspec computes it): the power spectrum of
    a normalized STFT (window n_fft, hop n_fft / 4; reflect-padded (n_fft - hop) / 2 a side, then zeros to a
    whole frame) through n_mels unnormalised HTK-scale filters. (B, C, T) -> (B * C, n_mels, frames), fp32."""
    hop, T = n_fft // 4, x.shape[-1]
    fb = common.mel_filterbank(cfg.sample_rate, n_fft, cfg.n_mels, htk=True, norm=None)
    fb = torch.from_numpy(fb).to(x.device)
    win = torch.hann_window(n_fft, device=x.device)
    with torch.autocast(x.device.type, enabled=False):
        side = (n_fft - hop) // 2
        y = F.pad(x.float().reshape(-1, 1, T), (side, side), "reflect")[:, 0]  # (B*C, T + 2 side)
        y = F.pad(y, (0, -(y.shape[-1] - n_fft) % hop))
        spec = torch.stft(y, n_fft, hop, window=win, center=False, return_complex=True).abs().pow(2)
        return fb @ (spec / win.pow(2).sum())  # (B*C, n_mels, frames)


def reconstruction_losses(x, x_hat, cfg):
    """Eq. 2's L_t and L_f, in EnCodec's form (§3.4 there): L_t = L1 between waveforms; L_f = mean over the
    scales 2^i of L1 between the linear power mels (loud bins) + MSE between their log10(1e-5 + .) (the quiet
    ones: a linear-mel distance alone barely sees the consonants and the upper harmonics)."""
    l_f = 0.0
    for i in cfg.mel_scales:
        ref, est = power_mel(x, 2 ** i, cfg), power_mel(x_hat, 2 ** i, cfg)
        log_err = torch.log10(est + 1e-5) - torch.log10(ref + 1e-5)
        l_f = l_f + (est - ref).abs().mean() + log_err.pow(2).mean()
    return (x_hat.float() - x.float()).abs().mean(), l_f / len(cfg.mel_scales)


# The LM (Eq. 3, and the text stream)

def sample_t(n, cfg, device, generator=None):
    """sCM's time proposal: tau ~ N(P_mean, P_std^2), t = arctan(e^tau / sigma_d), always inside (0, pi/2)."""
    tau = torch.randn(n, device=device, generator=generator) * cfg.p_std + cfg.p_mean
    return torch.atan(tau.exp() / cfg.sigma_d)


def scm_loss(head, weight, x0, z, cfg, r, generator=None):
    """Eq. 3 (sCM consistency training, TrigFlow): for x_t = cos t x0 + sin t eps (eps ~ N(0, sigma_d^2 I)), L
        = E[ e^{w(t)} / dim * || F_theta(x_t, t, Z) - F_theta-(x_t, t, Z) - g ||^2 - w(t) ], g = cos(t)
        df_theta-/dt = -cos^2 t (sigma_d F- - dx_t/dt) - r cos t sin t (x_t + sigma_d dF-/dt), with theta- a
        stop-gradient copy, dx_t/dt = cos t eps - sin t x0, r the tangent warm-up (1 after warm-up) and g
        normalised to g / (|g| + c). dF-/dt is one forward-mode JVP through the head (tangents dx_t/dt /
        sigma_d and 1). x0: (N, latent) normalised targets; z: (N, lm_dim) conditioning (gradients flow into
        the backbone via F_theta)."""
    N, sd = x0.shape[0], cfg.sigma_d
    t = sample_t(N, cfg, x0.device, generator)
    eps = torch.randn(x0.shape, device=x0.device, generator=generator) * sd
    ct, st = torch.cos(t)[:, None], torch.sin(t)[:, None]
    x_t = ct * x0 + st * eps
    dxt = ct * eps - st * x0
    F_minus, dF_dt = torch.func.jvp(lambda x, tt: head(x, tt, z), (x_t / sd, t),
                                    (dxt / sd, torch.ones_like(t)))
    g = -ct ** 2 * (sd * F_minus - dxt) - r * ct * st * (x_t + sd * dF_dt)
    g = g / (g.norm(dim=-1, keepdim=True) + cfg.tangent_c)  # sCM: L2 norm per example (not the RMS)
    g, F_minus = g.detach(), F_minus.detach()  # theta-: the stop-gradient (weights, Z and the tangent alike)
    w = weight(t)
    err = (head(x_t / sd, t, z) - F_minus - g).pow(2).sum(-1) / x0.shape[-1]
    return (w.exp() * err - w).mean(), err.mean()


def lsd_loss(head, weight, x0, z, cfg, generator=None, distill=True):
    """v3's TTS head objective (App. A; Lagrangian self-distillation, Boffi et al. 2025, as Pocket TTS trains
    it), on the flow x_t = t x + (1 - t) eps, eps ~ N(0, I), t = 1 the data:
    - flow matching on the diagonal s = t: || v(t, t, x_t) - (x - eps) ||^2, t ~ sigmoid(N(0.4, 1));
    - self-distillation: for s < t (the min and max of two such draws), the jump X = x_s + (t - s) v(s, t,
      x_s) must move as the flow does at its end: || dX/dt - sg(v(t, t, X)) ||^2, dX/dt = v + (t - s) dv/dt
      (one forward-mode JVP in t); sg: the target is a stop-gradient (Pocket TTS's "classic" variant).
    Each term: e^{w(s, t)} / dim x error - w(s, t) (learned weights, as Eq. 3's), mixed lsd_flow_share :
    1 - lsd_flow_share (App. A's 75 : 25). The second term is computed only where distill is set (every
    lsd_distill_every steps), then weighed lsd_distill_every times as much: the same expected gradient.
    x0: (N, latent) normalised targets, z (N, lm_dim) -> (loss, the flow-matching error)."""
    N, L, dev = x0.shape[0], x0.shape[-1], x0.device
    logit_normal = lambda k: torch.sigmoid(torch.randn(N, k, device=dev, generator=generator) + 0.4)
    eps = torch.randn(x0.shape, device=dev, generator=generator)
    on = lambda t, x: t[:, None] * x0 + (1 - t[:, None]) * x  # the point at time t between noise and data
    t = logit_normal(1)[:, 0]
    flow_err = (head(on(t, eps), t, z, t) - (x0 - eps)).pow(2).sum(-1)
    w = weight(t, t)
    flow = (w.exp() * flow_err / L - w).mean()
    if not distill:
        return cfg.lsd_flow_share * flow, flow_err.mean() / L
    s, t = logit_normal(2).sort(-1)[0].unbind(-1)  # s <= t
    x_s = on(s, eps)
    v, dv_dt = torch.func.jvp(lambda tt: head(x_s, tt, z, s), (t,), (torch.ones_like(t),))
    jump = x_s + (t - s)[:, None] * v  # X_{s,t}(x_s)
    with torch.no_grad():
        target = head(jump, t, z, t)  # the flow's velocity where the jump lands (stop-gradient)
    dist_err = (v + (t - s)[:, None] * dv_dt - target).pow(2).sum(-1)
    w = weight(t, s)
    self_distill = (w.exp() * dist_err / L - w).mean()
    share = (1 - cfg.lsd_flow_share) * cfg.lsd_distill_every
    return cfg.lsd_flow_share * flow + share * self_distill, flow_err.mean() / L


def lm_losses(model, batch, cfg, r, generator=None, distill=True):
    """One LM objective on a batch: the head's loss on every valid frame (Eq. 3, head_batch_mul draws per Z;
    or the depth head's cross-entropy) + lambda_text x the text stream's cross-entropy (speech)."""
    text, valid = batch["text"], batch["valid"]
    B, S = text.shape
    # classifier-free guidance needs an unconditional model: text_drop of the sequences read PAD for their text
    # (and learn no text from it); the same weights then serve Z_text and Z_0 at sampling
    keep = torch.rand(B, 1, device=text.device, generator=generator) >= (cfg.text_drop if model.training else 0)
    text_in = torch.where(keep, text, model.pad_id)
    if cfg.head == "consistency":
        clean = model.normalize(batch["latent"]) * valid[..., None]  # (B, S, latent)
        noisy = noise_inject(clean, generator)[0] if cfg.noise_injection and model.training else clean
        prev = F.pad(noisy, (0, 0, 1, 0))[:, :S]  # frame s - 1 at position s (zeros at s = 0: BOS below)
    else:
        codes = model.rvq_encode(batch["pre"].reshape(B * S, -1)).view(B, S, -1)  # (B, S, n_q)
        prev = F.pad(codes, (0, 0, 1, 0))[:, :S]
    x = model.inputs(prev, text_in)
    x = torch.cat([model.bos.expand(B, 1, -1) + model.text_emb(text_in[:, :1]), x[:, 1:]], 1)  # BOS at 0
    h = model.backbone(x)  # (B, S, D)
    m = valid.reshape(-1) > 0
    losses = {}
    if cfg.head == "consistency":
        z = model.condition(h, clean).reshape(B * S, -1)[m]  # (N, D): Z_s of every valid frame
        x0 = clean.reshape(B * S, -1)[m]
        n = cfg.head_batch_mul  # §3.3: n (t, eps) draws per backbone output, Z computed once
        if cfg.head_loss == "lsd":
            head_loss, losses["flow_err"] = lsd_loss(model.head, model.weight, x0.repeat(n, 1), z.repeat(n, 1),
                                                     cfg, generator, distill)
        else:
            head_loss, losses["scm_err"] = scm_loss(model.head, model.weight, x0.repeat(n, 1), z.repeat(n, 1),
                                                    cfg, r, generator)
        losses[cfg.head_loss] = head_loss
    else:
        logits = model.depth(h.reshape(B * S, -1)[m], codes.reshape(B * S, -1)[m])  # (N, n_q, K)
        head_loss = losses["ce_rvq"] = F.cross_entropy(logits.float().flatten(0, 1),
                                                       codes.reshape(B * S, -1)[m].flatten())
    tl = F.cross_entropy(model.text_out(h[:, :-1]).float().flatten(0, 1), text[:, 1:].flatten(),
                         reduction="none")
    tm = (valid[:, 1:] * keep).flatten()
    losses["text_ce"] = (tl * tm).sum() / tm.sum().clamp(min=1)
    losses["loss"] = head_loss + cfg.lambda_text * losses["text_ce"]
    return losses

# ----------------------------------------------------------------------------- data

def clips(cfg, split):
    """The corpus's clips at the VAE's rate (speech with transcripts and word times, or music). The LM stage
    reads lm_corpus_hours of the built-in corpus where set (the corpus's first hours are the same sentences,
    so the test clips stay the same)."""
    if cfg.stage == "lm" and cfg.lm_corpus_hours:
        cfg = dataclasses.replace(cfg, corpus_hours=cfg.lm_corpus_hours)
    return common.load_corpus(cfg, split, cfg.sample_rate, kind=cfg.corpus)


def get_batch(sampler, cfg, rt):
    """VAE: (B, 1, segment) waveforms. LM: crops of the cached arrays, as lm_batch."""
    x = sampler.next()[0]
    if cfg.stage == "vae":
        return x.view(cfg.batch_size, 1, cfg.segment).to(rt.device)
    return lm_batch(x.transpose(1, 2).to(rt.device), cfg)


def lm_batch(x, cfg):
    """(B, S, rows) of the cached arrays -> dict(latent (B, S, latent) raw means, pre (B, S, D) or None,
    text (B, S), valid (B, S))."""
    L, D = cfg.latent_dim, cfg.dimension if cfg.head == "rvq" else 0
    return dict(latent=x[..., :L], pre=x[..., L:L + D] if D else None, text=x[..., L + D].long(),
                valid=x[..., L + D + 1])


# The LM's inputs: the text stream, and the VAE's latents computed once per run

class TextTokens:
    """The offline byte-level BPE (common.train_bpe) of the training transcripts, PAD and EOS after it. Kept
    in `state` (state_dict: the ranks as text) so sampling from the LM checkpoint needs no corpus."""

    def __init__(self, cfg):
        self.vocab, self.enc = cfg.text_vocab, None

    def fit(self, texts):
        ranks = common.train_bpe([" " + t for t in texts if t], self.vocab)
        # train_bpe may add a few more leading-space tokens than asked; a prefix of the ranks is still a valid
        # BPE
        self._set({t: r for t, r in ranks.items() if r < self.vocab})

    def _set(self, ranks):
        self.ranks = ranks
        self.enc = common.bpe_encoding(ranks, name="calm-bpe")

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode([i for i in ids if i < self.vocab])

    def state_dict(self):
        return {"ranks": common.ranks_to_text(self.ranks)}

    def load_state_dict(self, sd):
        self._set(common.ranks_from_text(sd["ranks"]))


def text_stream(words, n_frames, tok, cfg):
    """Inner-monologue-style alignment (Moshi §3.4.4): each word's BPE tokens sit on consecutive frames from
    the word's start frame (pushed later when the previous word's tokens overflow), PAD elsewhere, EOS after
    the last word; the stream is shifted text_delay frames earlier, so the audio lags the text (80 ms at 1). ->
    (n_frames,)."""
    ids = np.full(n_frames, cfg.text_vocab, dtype=np.int64)  # PAD
    f = 0
    for w, start, end in words:
        f = max(f, int(round(start * cfg.frame_rate)) - cfg.text_delay)
        for t in tok.encode(" " + w):
            if f < n_frames:
                ids[f] = t
            f += 1
    if words:
        last = max(f, int(round(words[-1][2] * cfg.frame_rate)) - cfg.text_delay)
        ids[min(n_frames - 1, last)] = cfg.text_vocab + 1  # EOS
    return ids


@torch.no_grad()
def encode_corpus(vae, utts, tok, cfg, device):
    """Once per run (not per step): each clip -> one float32 array (rows: the VAE posterior mean (latent_dim),
    the pre-bottleneck latent (D, --head=rvq only), the text stream, a validity row of ones) x frames. A crop
    of it (SegmentSampler, zero-padded at the end) is then one LM training example; padding has validity 0."""
    out = []
    for u in utts:
        x = torch.from_numpy(u.wav)[None, None].to(device)  # (1, 1, T)
        pre = vae.pre_latent(x)
        mu = vae.bottleneck(pre)[0][0].cpu()  # (latent, F)
        rows = [mu] + ([pre[0].float().cpu()] if cfg.head == "rvq" else [])
        n = mu.shape[-1]
        text = text_stream(u.words if cfg.corpus == "speech" else [], n, tok, cfg)
        rows += [torch.from_numpy(text).float()[None], torch.ones(1, n)]
        out.append(torch.cat(rows).numpy())
    return out


def fit_latent_stats(model, packed, cfg):
    """Per-dimension mean and std of the training latents -> the model's normaliser buffers (§3.1)."""
    mu = np.concatenate([p[:cfg.latent_dim] for p in packed], 1)  # (latent, all frames)
    model.emb_mean.copy_(torch.from_numpy(mu.mean(1)))
    model.emb_std.copy_(torch.from_numpy(mu.std(1) + 1e-5))


def fit_rvq(model, packed, cfg):
    """--head=rvq: residual k-means on the training pre-bottleneck latents (level q clusters what levels < q
    left). Seeded, so a resumed run fits the same codebooks as the straight one."""
    L, D = cfg.latent_dim, cfg.dimension
    x = torch.from_numpy(np.concatenate([p[L:L + D] for p in packed], 1).T.copy())  # (frames, D)
    g = torch.Generator().manual_seed(cfg.seed)
    for q in range(cfg.n_q):
        means = x[torch.randint(0, x.shape[0], (cfg.codebook_size,), generator=g)].clone()
        for _ in range(cfg.kmeans_iters):
            assign = torch.cdist(x, means).argmin(-1)
            counts = torch.bincount(assign, minlength=cfg.codebook_size).float()
            sums = torch.zeros_like(means).index_add_(0, assign, x)
            means = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], means)
        model.codebooks[q].copy_(means)
        x = x - means[torch.cdist(x, means).argmin(-1)]

# ----------------------------------------------------------------------------- train

def _lr_lambda(cfg):  # linear warm-up then cosine to 10 % (Table 13 / S6: cosine schedules)
    def f(step):
        if step < cfg.warmup_iters:
            return (step + 1) / cfg.warmup_iters
        p = min(1.0, (step - cfg.warmup_iters) / max(1, cfg.decay_iters - cfg.warmup_iters))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))
    return f


class StepCounter:
    """The step number inside `state` (the tangent warm-up reads it), so it survives a resume."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, sd):
        self.step = sd["step"]


def load_vae_for_lm(cfg, path):
    """--stage=lm: the VAE checkpoint fixes the VAE's architecture and the features (sample rate, frame rate,
    corpus), so those fields are taken from it, whatever the preset said. -> its weights."""
    ck = common.load_checkpoint(path)
    if not common.is_ours(ck) or ck["paper"] != "calm" or "vae" not in ck["models"]:
        raise SystemExit(f"error: {path!r} is not a calm.py checkpoint holding a VAE")
    changed = [f"{k} {getattr(cfg, k)!r} -> {ck['config'][k]!r}" for k in VAE_KEYS
               if common._norm(getattr(cfg, k)) != common._norm(ck["config"][k])]
    for k in VAE_KEYS:
        setattr(cfg, k, common._from_json(ck["config"][k], getattr(cfg, k)))
    common.log(f"VAE {path} (step {ck['step']})" + (": its config: " + "; ".join(changed) if changed else ""))
    return ck["models"]["vae"]


def build(cfg, rt):
    """vae stage: {vae, D, opt_g, opt_d, sched_g, sched_d}. lm stage: {vae (frozen: eval mode, no gradients,
    not in the optimizer), lm, tok, opt, sched, counter}. Training the LM reads the VAE from --vae (scratch)
    or from the LM checkpoint it resumes; bench, sample and eval get theirs from elsewhere."""
    vae_sd = None
    if cfg.stage == "lm" and cfg.mode == "train":
        vae_sd = load_vae_for_lm(cfg, cfg.vae if cfg.init_from == "scratch" else common.checkpoint_path(cfg))
    vae = VAE(cfg).to(rt.device)
    if cfg.stage == "vae":
        D = Discriminator(cfg).to(rt.device)
        opt_g = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        opt_d = torch.optim.AdamW(D.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        return dict(vae=vae, D=D, opt_g=opt_g, opt_d=opt_d,
                    sched_g=torch.optim.lr_scheduler.LambdaLR(opt_g, _lr_lambda(cfg)),
                    sched_d=torch.optim.lr_scheduler.LambdaLR(opt_d, _lr_lambda(cfg)))
    if vae_sd is not None:
        common.load_state_dict(vae, vae_sd, "vae")
    vae.eval().requires_grad_(False)
    lm = CALM(cfg).to(rt.device)
    opt = torch.optim.AdamW(lm.parameters(), lr=cfg.lm_lr, betas=cfg.lm_betas, weight_decay=cfg.weight_decay)
    return dict(vae=vae, lm=lm, tok=TextTokens(cfg), opt=opt,
                sched=torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg)), counter=StepCounter())


def train_step(state, batch, cfg, rt):
    """One optimizer step of the stage's objective. vae: a discriminator update, then the VAE on Eq. 2
    (adversarial + feature matching + lambda_KL KL, + reconstruction with --recon_loss). lm: Eq. 3 + the text
    stream's CE."""
    if cfg.stage == "vae":
        G, D, opt_g, opt_d = state["vae"], state["D"], state["opt_g"], state["opt_d"]
        d_plain = common.unwrap(D)  # the generator step needs no gradient sync through D
        x = batch
        with rt.autocast():
            x_hat, mu, logvar = G(x)
            logits, _ = D(torch.cat([x, x_hat.detach()]))  # real and fake in one pass
        B = x.shape[0]
        loss_d = discriminator_loss([l[:B] for l in logits], [l[B:] for l in logits])
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        with rt.autocast():
            logits_fake, fmap_fake = d_plain(x_hat)
            with torch.no_grad():
                _, fmap_real = d_plain(x)
        losses = {"adv": generator_adv_loss(logits_fake), "feat": feature_loss(fmap_real, fmap_fake),
                  "kl": kl_loss(mu, logvar)}
        total = cfg.lambda_adv * losses["adv"] + cfg.lambda_feat * losses["feat"] \
            + cfg.lambda_kl * losses["kl"]
        if cfg.recon_loss:
            losses["t"], losses["f"] = reconstruction_losses(x, x_hat, cfg)
            total = total + cfg.lambda_t * losses["t"] + cfg.lambda_f * losses["f"]
        opt_g.zero_grad(set_to_none=True)
        total.backward()
        opt_g.step()
        state["sched_g"].step(), state["sched_d"].step()
        return dict(d=loss_d.detach(), **{k: v.detach() for k, v in losses.items()})
    lm, opt = state["lm"], state["opt"]
    state["counter"].step += 1
    r = min(1.0, state["counter"].step / max(1, cfg.tangent_warmup))  # sCM tangent warm-up
    distill = (state["counter"].step - 1) % cfg.lsd_distill_every == 0  # lsd: steps 1, 1 + every, ... (all ranks)
    with rt.autocast():
        losses = lm(batch, r, distill=distill)  # CALM.forward = lm_losses (through DDP's forward when wrapped)
    opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    torch.nn.utils.clip_grad_norm_(lm.parameters(), cfg.grad_clip)
    opt.step()
    state["sched"].step()
    return {k: v.detach() for k, v in losses.items()}


def load_for_inference(cfg, rt):
    """The stage's models from --init_from (or out_dir/ckpt.pt), eval mode: {vae} or {vae, lm, tok}."""
    path = common.checkpoint_path(cfg) if cfg.init_from != "scratch" else os.path.join(cfg.out_dir, "ckpt.pt")
    if not os.path.exists(path):
        raise SystemExit(f"error: checkpoint {path!r} does not exist (train first, or pass --init_from=PATH)")
    ckpt = common.load_checkpoint(path)
    models = {"vae": VAE(cfg).to(rt.device)}
    if cfg.stage == "lm":
        models["lm"] = CALM(cfg).to(rt.device)
    common.load_models(ckpt, cfg, models, ARCH_KEYS)
    out = {k: m.eval() for k, m in models.items()}
    if cfg.stage == "lm":
        out["tok"] = TextTokens(cfg)
        out["tok"].load_state_dict(ckpt["state"]["tok"])
        if "text_drop" not in ckpt["config"]:  # an LM from before guidance: it never learned Z_0
            cfg.cfg_alpha = 1.0
    return out


@torch.no_grad()
def evaluate(cfg, models=None, rt=None, samples_dir=None, split="test"):
    """vae: SI-SNR and mel distance of the posterior-mean reconstruction of held-out clips. lm: teacher-forced
    one-step prediction error of the next latent (normalised units; temperature 0, rvq greedy), the text
    stream's cross-entropy, and a continuation of a prompt_seconds prompt scored by mel-statistic distance to
    the real held-out audio. models: the stage's dict (None: load_for_inference, as --mode=eval does)."""
    standalone = models is None
    if standalone:
        rt = common.setup(cfg)
        models = load_for_inference(cfg, rt)
    nets = {k: m for k, m in models.items() if isinstance(m, nn.Module)}
    was = {k: m.training for k, m in nets.items()}
    for m in nets.values():
        m.eval()
    vae, dev = models["vae"], next(models["vae"].parameters()).device
    utts = clips(cfg, split)[:cfg.eval_items]
    res = {}
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):  # leave training's RNG alone
        torch.manual_seed(cfg.seed)
        if cfg.stage == "vae":
            n = max(1, int(cfg.eval_seconds * cfg.sample_rate) // vae.frame_size) * vae.frame_size
            snr, mel, mel0, var_mu, var_z = [], [], [], [], []
            for i, u in enumerate(utts):
                x = torch.from_numpy(u.wav[:n])[None, None].to(dev)  # (1, 1, T)
                mu, logvar = vae.encode(x)
                y = vae.decode(mu)[..., :x.shape[-1]]
                snr.append(common.si_snr(y, x))
                mel.append(common.mel_distance(y.cpu(), x.cpu(), cfg.sample_rate))
                # the decoder must use the latent: decoding zeros instead has to be much worse
                y0 = vae.decode(torch.zeros_like(mu))
                mel0.append(common.mel_distance(y0.cpu(), x.cpu(), cfg.sample_rate))
                var_mu.append(mu.var(-1).mean().item())  # content: how far the means move over time
                var_z.append(logvar.exp().mean().item())  # the sampling noise training adds to them
                if samples_dir and i == 0:
                    common.save_sample(samples_dir, f"{split}_{u.id}_recon", y[0].cpu(), cfg.sample_rate,
                                       ref=x[0].cpu())
            res = dict(si_snr=round(float(np.mean(snr)), 3), mel=round(float(np.mean(mel)), 4),
                       mel_zero_latent=round(float(np.mean(mel0)), 4),
                       sigma=round(float(np.mean(var_z)) ** 0.5, 4),  # posterior std, RMS over dims, frames
                       content_db=round(10 * math.log10(np.mean(var_mu) / np.mean(var_z)), 2))  # mu / noise
            if standalone and cfg.listen_items:
                listen = os.path.join(cfg.out_dir, "listen")
                code = lambda x: vae.decode(vae.encode(x[None].to(dev))[0])[0, :, :x.shape[-1]]  # (1, T); mu
                common.write_listening_sets(listen, clips(cfg, split)[:cfg.listen_items], {"resynth": code},
                                            cfg.sample_rate, pngs=2)
        else:
            lm = models["lm"]
            packed = encode_corpus(vae, utts, models["tok"], cfg, dev)
            err, tce = [], []
            for p in packed:
                batch = lm_batch(torch.from_numpy(p).T[None].to(dev), cfg)  # one whole clip
                err.append(teacher_forced_error(lm, vae, batch, cfg))
                tce.append(lm_losses(lm, batch, cfg, 1.0)["text_ce"].item())
            res = dict(latent_mse=round(float(np.mean(err)), 4), text_ce=round(float(np.mean(tce)), 4))
            u = utts[0]
            prompt, x = _prompt(models, u, cfg, cfg.prompt_seconds)
            gen, _ = generate(models, cfg, max(1, int(cfg.gen_seconds * cfg.frame_rate)), prompt=prompt)
            y = to_audio(models, gen, cfg)
            P = prompt["latent"].shape[0] * vae.frame_size
            ref = torch.cat([torch.from_numpy(v.wav) for v in utts])
            res["mel_stats"] = round(mel_stats_distance(y[..., P:].cpu(), ref, cfg.sample_rate), 4)
            if samples_dir:
                common.save_sample(samples_dir, f"{split}_{u.id}_continue_{cfg.head}", y[0].cpu(),
                                   cfg.sample_rate, ref=torch.from_numpy(u.wav)[None])
    common.log(f"eval ({split}, {cfg.stage}{'' if cfg.stage == 'vae' else ', ' + cfg.head}) | "
               + " | ".join(f"{k} {v}" for k, v in res.items()))
    for k, m in nets.items():
        m.train(was[k])
    if standalone:
        common.cleanup(rt)
    return res


@torch.no_grad()
def teacher_forced_error(lm, vae, batch, cfg):
    """Mean squared error (normalised latent units) of each frame's prediction from the TRUE past: the
    consistency head at temperature 0 (one step from zero noise), or the greedy RVQ codes decoded through the
    VAE bottleneck."""
    text, valid = batch["text"], batch["valid"]
    B, S = text.shape
    clean = lm.normalize(batch["latent"])
    if cfg.head == "consistency":
        prev = F.pad(clean, (0, 0, 1, 0))[:, :S]
    else:
        codes = lm.rvq_encode(batch["pre"].reshape(B * S, -1)).view(B, S, -1)
        prev = F.pad(codes, (0, 0, 1, 0))[:, :S]
    x = lm.inputs(prev, text)
    x = torch.cat([lm.bos.expand(B, 1, -1) + lm.text_emb(text[:, :1]), x[:, 1:]], 1)
    h = lm.backbone(x)
    if cfg.head == "consistency":
        pred = lm.head.sample(lm.condition(h, clean).reshape(B * S, -1), 0.0)
    else:
        pre = lm.rvq_decode(lm.depth.sample(h.reshape(B * S, -1), 0.0))  # (N, D)
        pred = lm.normalize(vae.bottleneck(pre[..., None])[0][..., 0])  # (N, latent) via frozen bottleneck
    m = valid.reshape(-1) > 0
    return (pred - clean.reshape(B * S, -1))[m].pow(2).mean().item()


def mel_stats_distance(gen, ref, sr):
    """Continuation quality: distance between the per-bin mean and std over time of the 80-bin log-mels of the
    generated and of real held-out audio (a FAD-like statistic, without an embedding network)."""
    n_fft = 2 ** round(math.log2(1024 * sr / 22050))
    mels = lambda w: common.mel_spectrogram(w.float().reshape(-1), sr, n_fft, n_fft // 4, n_mels=80)
    (mg, sg), (mr, sr_) = [(m.mean(-1), m.std(-1)) for m in (mels(gen), mels(ref))]
    return float((mg - mr).abs().mean() + (sg - sr_).abs().mean())


def train(cfg):
    if cfg.stage == "lm" and cfg.lm_max_iters:
        cfg = dataclasses.replace(cfg, max_iters=cfg.lm_max_iters, decay_iters=cfg.lm_max_iters)
    rt = common.setup(cfg)
    state = build(cfg, rt)
    if cfg.stage == "vae":
        model, frame = state["vae"], state["vae"].frame_size
        train_clips = [u.wav for u in clips(cfg, "train")]
        common.check_clips(train_clips, cfg.segment, "train split")
        common.check_clips(clips(cfg, "val"), frame, "val split")
        common.log(f"params: VAE {common.count_params(model):,} | discriminator "
                   f"{common.count_params(state['D']):,}")
    else:
        model, frame = state["lm"], state["vae"].frame_size
        utts = clips(cfg, "train")
        common.check_clips(utts, cfg.lm_segment, "train split")
        common.check_clips(clips(cfg, "val"), frame, "val split")
        state["tok"].fit([u.text for u in utts])  # deterministic: a resume refits the same tokens it restores
        train_clips = encode_corpus(state["vae"], utts, state["tok"], cfg, rt.device)  # the latents, once
        fit_latent_stats(model, train_clips, cfg)
        if cfg.head == "rvq":
            fit_rvq(model, train_clips, cfg)
        common.log(f"params: LM {common.count_params(model):,} ({cfg.head} head) | VAE (frozen) "
                   f"{common.count_params(state['vae']):,} | {sum(p.shape[-1] for p in train_clips)} latent "
                   "frames cached")
    seg = cfg.segment if cfg.stage == "vae" else cfg.lm_segment // frame
    sampler = common.SegmentSampler(train_clips, seg, cfg.batch_size, cfg.seed, rt.rank, rt.world_size,
                                    align=frame if cfg.stage == "vae" else 1)
    step = common.init_from(cfg, state, sampler=sampler, arch_keys=ARCH_KEYS,
                            lr_keys=None if cfg.stage == "vae" else {"opt": "lm_lr"})
    if cfg.stage == "vae":
        state["vae"] = common.wrap_ddp(common.compile(state["vae"], cfg), rt)
        state["D"] = common.wrap_ddp(common.compile(state["D"], cfg), rt)
    else:  # the LM's forward holds a torch.func.jvp: left eager (not compiled)
        state["vae"].eval().requires_grad_(False)
        state["lm"] = common.wrap_ddp(state["lm"], rt)

    def evaluate_val(samples):
        models = {k: common.unwrap(v) if isinstance(v, nn.Module) else v for k, v in state.items()
                  if k in ("vae", "lm", "tok")}
        evaluate(cfg, models, rt, samples, split="val")
    samples = seg * (1 if cfg.stage == "vae" else frame)  # audio samples per example
    common.train_loop(cfg, rt, state, step, train_step, lambda step: get_batch(sampler, cfg, rt),
                      evaluate_val, sampler=sampler,
                      audio_seconds=cfg.batch_size * rt.world_size * samples / cfg.sample_rate)

# ----------------------------------------------------------------------------- sample

@torch.no_grad()
def generate(models, cfg, frames, prompt=None, sentence=None, generator=None):
    """Autoregressive generation, one frame a step, with an explicit KV cache per backbone layer; inference
    never injects noise. prompt: dict(latent (P, latent) raw means, pre (P, D) for rvq, text (P,)) of a real
    clip, or None. sentence: BPE ids to speak (TTS), forced in order, inner-monologue style: at each frame the
    text head chooses between PAD and the next token (after the last one: PAD or EOS), and one second of PAD
    forces it; EOS ends the utterance, text_delay + 1 frames later (tts_frames: room for all of it).
    Otherwise (continuation) speech samples its own text stream, music keeps PAD.
    Latent CFG (speech, cfg_alpha != 1): a second row reads the same frames with PAD text, and the head gets
    Z_0 + alpha (Z_text - Z_0) (Pocket TTS's CFG on the backbone output, not on the head's sampling path).
    -> (1, F, latent) raw latents (consistency) or (1, F, n_q) codes (rvq), and the text stream."""
    lm = models["lm"]
    guide = cfg.cfg_alpha != 1 and cfg.corpus == "speech" and cfg.text_drop > 0  # Z_0 needs text dropout
    dev, K = lm.bos.device, cfg.short_context
    caches = [None] * cfg.lm_layers
    pad, eos = lm.pad_id, lm.eos_id
    P = 0 if prompt is None else prompt["latent"].shape[0]
    frames_out = []  # normalised latents, or code vectors, of frames 0..s-1
    if P:
        frames_out = list(lm.normalize(prompt["latent"]) if cfg.head == "consistency"
                          else lm.rvq_encode(prompt["pre"]))
    queue = list(sentence) if sentence is not None else None
    text = [int(prompt["text"][0])] if P else [queue.pop(0) if queue else pad]
    end = None
    for s in range(P + frames):
        tok = torch.tensor([[text[s]]] + [[pad]] * guide, device=dev)  # (1 or 2, 1): text, and PAD to guide
        x = lm.bos + lm.text_emb(tok) if s == 0 else lm.inputs(frames_out[s - 1].expand(len(tok), 1, -1), tok)
        h = lm.backbone(x, caches, offset=s)[:, -1]  # (1 or 2, D)
        if guide:
            h_text, h = h[:1], h[1:] + cfg.cfg_alpha * (h[:1] - h[1:])  # Z_s's T_long part, guided
        else:
            h_text = h
        if s >= P:
            if cfg.head == "consistency":
                past = torch.stack(frames_out[max(0, s - K):s]) if s else h.new_zeros(0, cfg.latent_dim)
                win = F.pad(past, (0, 0, K - past.shape[0], 0))[None]  # (1, K, latent): zeros before start
                z = h + lm.short_window(win)  # Z_s = T_long + T_short (§3.2)
                frames_out.append(lm.head.sample(z, cfg.temperature, cfg.head_steps, generator)[0])
            else:
                frames_out.append(lm.depth.sample(h, cfg.rvq_temperature, generator)[0])
        if end is not None and s >= end:
            break
        logits = lm.text_out(h_text)[0].float()  # the text token of position s + 1
        if s + 1 < P:
            nxt = int(prompt["text"][s + 1])
        elif queue is not None and end is not None:
            nxt = pad  # EOS said: PAD while the audio's last text_delay frames come
        elif queue is not None:
            cand = queue[0] if queue else eos
            # the next word starts where the text head expects a word, whichever: P(PAD) < 1/2 (it can be sure
            # that one starts and unsure which)
            stall = int(cfg.frame_rate)
            stalled = len(text) >= stall and all(t == pad for t in text[-stall:])  # 1 s of PAD: say it anyway
            nxt = cand if F.softmax(logits, -1)[pad] < 0.5 or stalled else pad
            if nxt == cand and queue:
                queue.pop(0)
            if nxt == eos:
                end = s + 1 + cfg.text_delay
        elif cfg.corpus == "speech":
            nxt = int(torch.multinomial(F.softmax(logits[:eos], -1), 1, generator=generator))  # no EOS
        else:
            nxt = pad
        text.append(nxt)
    out = torch.stack(frames_out)[None]
    return (lm.denormalize(out) if cfg.head == "consistency" else out), text


def tts_frames(n_tokens, cfg):
    """Frames TTS may take for n_tokens: each token and the EOS come at most a second of PAD (the stall rule)
    after the one before, then text_delay + 1 frames; EOS, not this bound, ends an utterance."""
    return (n_tokens + 1) * (int(cfg.frame_rate) + 1) + cfg.text_delay + 2


@torch.no_grad()
def to_audio(models, frames, cfg):
    """Generated frames -> waveform (1, 1, T) through the frozen VAE decoder. rvq codes decode to
    pre-bottleneck latents, which the VAE's bottleneck turns into its posterior mean first."""
    vae = models["vae"]
    if cfg.head == "rvq":
        pre = models["lm"].rvq_decode(frames).transpose(1, 2)  # (1, D, F)
        frames = vae.bottleneck(pre)[0].transpose(1, 2)  # (1, F, latent)
    return vae.decode(frames.transpose(1, 2))  # (1, 1, F * frame)


def _prompt(models, u, cfg, seconds):
    """The first `seconds` of clip u as a generation prompt: its latents, pre-latents and text stream."""
    n = max(1, int(seconds * cfg.frame_rate))
    x = torch.from_numpy(u.wav[:n * models["vae"].frame_size])[None, None].to(models["lm"].bos.device)
    pre = models["vae"].pre_latent(x)
    mu = models["vae"].bottleneck(pre)[0]
    words = u.words if cfg.corpus == "speech" else []
    text = text_stream(words, int(round(u.duration * cfg.frame_rate)) + 1, models["tok"], cfg)[:mu.shape[-1]]
    return dict(latent=mu[0].T, pre=pre[0].T.float(), text=torch.from_numpy(text)), x


@torch.no_grad()
def sample(cfg):
    """vae: encode/decode --input or a held-out clip. lm, --task=tts (speech): speak --text, or the first
    n_items held-out test sentences (also as folders tts_<head>/ and tts_orig/ for an ASR's WER);
    --task=continue: continue the first prompt_seconds of --input or of held-out clips. wav + png in
    out_dir/samples."""
    rt = common.setup(cfg)
    models = load_for_inference(cfg, rt)
    out = os.path.join(cfg.out_dir, "samples")
    g = torch.Generator(device=rt.device).manual_seed(cfg.seed)
    if cfg.input:
        wav, _ = common.load_audio(cfg.input, sr=cfg.sample_rate)
        items = [common.Utterance(os.path.splitext(os.path.basename(cfg.input))[0], wav, cfg.sample_rate)]
    else:
        items = clips(cfg, "test")[:cfg.n_items]
    if cfg.stage == "vae":
        for u in items:
            x = torch.from_numpy(np.ascontiguousarray(u.wav))[None, None].to(rt.device)  # (1, 1, T)
            y = models["vae"].decode(models["vae"].encode(x)[0])[..., :x.shape[-1]]
            common.save_sample(out, f"{u.id}_recon", y[0].cpu(), cfg.sample_rate, ref=x[0].cpu())
            common.log(f"{u.id}: {y.shape[-1] // models['vae'].frame_size} frames x {cfg.latent_dim} dims, "
                       f"SI-SNR {common.si_snr(y, x):.2f} dB -> {out}/{u.id}_recon.wav")
        return
    task = cfg.task if cfg.corpus == "speech" else "continue"
    frames = max(1, int(cfg.gen_seconds * cfg.frame_rate))
    if task == "tts":
        sents = [("text", cfg.text)] if cfg.text else [(u.id, u.text) for u in items]
        said, real = [], []
        for i, (name, s) in enumerate(sents):
            ids = models["tok"].encode(" " + s.strip())
            gen, _ = generate(models, cfg, tts_frames(len(ids), cfg), sentence=ids, generator=g)
            y = to_audio(models, gen, cfg)
            tag = f"tts_{cfg.head}_{name}"
            common.save_sample(out, tag, y[0].cpu(), cfg.sample_rate,
                               ref=None if cfg.text else torch.from_numpy(items[i].wav)[None])
            said.append((name, y[0], s))
            if not cfg.text:
                real.append((name, items[i].wav, s))
            common.log(f"{tag}: {gen.shape[1]} frames ({gen.shape[1] / cfg.frame_rate:.2f} s) for {s!r} -> "
                       f"{out}/{tag}.wav")
        if not cfg.text:  # the spoken sentences and their real recordings, for an ASR's WER on each
            common.write_listening_set(os.path.join(out, f"tts_{cfg.head}"), said, cfg.sample_rate)
            common.write_listening_set(os.path.join(out, "tts_orig"), real, cfg.sample_rate)
            common.log(f"judge {out}/tts_{cfg.head} and {out}/tts_orig with whisper.py --mode=sample "
                       "--input_dir=DIR")
        return
    for u in items:
        prompt, x = _prompt(models, u, cfg, cfg.prompt_seconds)
        gen, text = generate(models, cfg, frames, prompt=prompt, generator=g)
        y = to_audio(models, gen, cfg)
        tag = f"continue_{cfg.head}_{u.id}"
        common.save_sample(out, tag, y[0].cpu(), cfg.sample_rate, ref=torch.from_numpy(u.wav)[None])
        said = models["tok"].decode(text) if cfg.corpus == "speech" else ""
        P = prompt["latent"].shape[0]
        common.log(f"{tag}: {P} prompt frames + {gen.shape[1] - P} generated -> {out}/{tag}.wav"
                   + (f" | its text stream: {said!r}" if said else ""))

# ----------------------------------------------------------------------------- bench

def bench(cfg):
    """vae: train_step ms and audio-s/s, encode / decode real-time factors. lm: train_step ms, FLOP rate, then
    the paper's speed claim (§4, Tables 2-3) from one run: head sampling latents/s and whole-model real-time
    factor (backbone + head + VAE decode) of the consistency head against an RVQ depth head on the same
    backbone."""
    rt = common.setup(cfg)
    cfg.mode = "bench"
    state = build(cfg, rt)
    figures = {}
    if cfg.stage == "vae":
        G = state["vae"]
        batch = torch.randn(cfg.batch_size, 1, cfg.segment, device=rt.device) * 0.1
        seconds = cfg.segment
    else:
        G = state["lm"]
        S = cfg.lm_segment // state["vae"].frame_size
        L, D = cfg.latent_dim, cfg.dimension
        B, dev = cfg.batch_size, rt.device
        batch = dict(latent=torch.randn(B, S, L, device=dev), valid=torch.ones(B, S, device=dev),
                     text=torch.randint(0, cfg.text_vocab, (B, S), device=dev),
                     pre=torch.randn(B, S, D, device=dev) if cfg.head == "rvq" else None)
        seconds = cfg.lm_segment
    step_ms = common.timeit(lambda: train_step(state, batch, cfg, rt), iters=cfg.bench_iters, warmup=1)
    flops = common.count_flops(lambda: train_step(state, batch, cfg, rt))
    audio_s = cfg.batch_size * seconds / cfg.sample_rate
    figures.update(train_step_ms=round(step_ms, 2), train_flops_per_step=flops,
                   train_audio_s_per_s=round(audio_s / (step_ms / 1000), 3))
    compiled = False
    if cfg.stage == "vae":
        G.eval()
        T = max(1, int(cfg.bench_seconds * cfg.frame_rate)) * G.frame_size
        xb = torch.randn(1, 1, T, device=rt.device) * 0.1
        compiled = common.compile(G, cfg) is not G
        figures |= common.codec_rtf(lambda x: G.encode(x)[0], G.decode, xb, cfg.bench_seconds, rt, compiled,
                                    iters=cfg.bench_iters, warmup=1)
        common.report_bench(cfg, rt, model=G, compiled=compiled, **figures)
        return
    heads = {cfg.head: G}
    other = dataclasses.replace(cfg, head="rvq" if cfg.head == "consistency" else "consistency")
    heads[other.head] = CALM(other).to(rt.device)  # the same backbone, the other head (random weights)
    frames = max(1, int(cfg.bench_seconds * cfg.frame_rate))
    N = cfg.batch_size
    zs = torch.randn(N, cfg.lm_dim, device=rt.device)
    for name, lm in heads.items():
        c = cfg if name == cfg.head else other
        lm.eval()
        fn = (lambda: lm.head.sample(zs, c.temperature, c.head_steps)) if name == "consistency" else \
            (lambda: lm.depth.sample(zs, c.rvq_temperature))
        with torch.no_grad(), rt.autocast():
            head_ms = common.timeit(fn, iters=max(3, cfg.bench_iters), warmup=1)
            models = dict(vae=state["vae"], lm=lm)
            gen_ms = common.timeit(lambda: to_audio(models, generate(models, c, frames)[0], c),
                                   iters=cfg.bench_iters, warmup=1)
        figures[f"head_latents_per_s_{name}"] = round(N / (head_ms / 1000), 1)  # latents (or code stacks)/s
        figures[f"rtf_{name}"] = round(gen_ms / 1000 / (frames / cfg.frame_rate), 4)  # compute / audio time
    figures["head_speedup"] = round(figures["head_latents_per_s_consistency"]
                                    / figures["head_latents_per_s_rvq"], 3)
    figures["overall_speedup"] = round(figures["rtf_rvq"] / figures["rtf_consistency"], 3)
    common.report_bench(cfg, rt, model=G, compiled=compiled, **figures)

# ----------------------------------------------------------------------------- main

if __name__ == "__main__":
    cfg = common.parse_config(Config, PRESETS)
    {"train": train, "sample": sample, "eval": evaluate, "bench": bench}[cfg.mode](cfg)
