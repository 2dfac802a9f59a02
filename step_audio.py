"""
Step-Audio 2 Technical Report (StepFun Audio Team, 2025) — https://arxiv.org/abs/2507.16632
An audio LLM that listens (part 1) and speaks (part 2).

The idea: one decoder-only LLM understands speech end to end. A Whisper-style audio encoder (pretrained on
ASR, then frozen) turns 25 s chunks of log-mel into 25 Hz features; an adaptor (a stride-2 conv and a
two-layer MLP, §3.1) brings them to 12.5 Hz in the LLM's width, and they overwrite placeholder tokens inside
an ordinary chat prompt. The LLM (Qwen2.5-style: RMSNorm, RoPE, SwiGLU, grouped-query attention) transcribes,
answers spoken questions, tells what the voice sounds like (paralinguistics), calls tools and keeps a
multi-turn history. It also answers in speech: its vocabulary is extended with discrete speech tokens (§3.2;
CosyVoice 2's supervised FSQ tokens, 25 Hz), and a spoken answer is one run of text and audio tokens
interleaved at a fixed ratio between <tts_start> and <tts_end> (§3.1), the text leading the speech that says
it. The detokenizer turns the audio tokens into sound: conditional flow matching to mel, then a vocoder.
Training follows the paper's stages in miniature (§3.2-3.4), seven stages in two runs (--stage; one
checkpoint each). --stage=speech trains the speech side: the encoder on ASR (CTC), the speech tokenizer (FSQ +
CTC on the frozen encoder), the flow, the vocoder. --stage=llm starts from that checkpoint: a text LLM, the
adaptor on ASR (encoder and LLM frozen), then supervised fine-tuning on a task mixture with text and spoken
answers.

Simplified versus the paper:
- miniature stages on the built-in corpus (no Qwen2.5 start), in two runs, the speech side first (ours: the
  LLM's stages read the frozen encoder and tokenizer, and each run fits 15 minutes on a CPU); SFT tasks:
  ASR, spoken QA, three paralinguistic questions, a calculator tool (offered with every SFT question, also
  before a spoken answer; text drills over operands 1-99 teach it to read the result: ours), a follow-up
  turn, TTS and spoken answers in one voice;
- no reinforcement learning stage (§3.4); the text:audio ratio 1:4 is ours (the paper gives none), decoded
  greedily under slot masks; speech tokens: FSQ on this file's own encoder, not a separate S3 model;
- the detokenizer: a mean-mel speaker condition, tokens read as FSQ digits (ours), a small estimator,
  10 Euler steps; the vocoder is HiFT's iSTFT head without its F0 source, trained on mel + STFT losses only
  (no adversary): muffled;
- `mini` has the official shapes (meta device only); no official weights are mapped (no reference to prove
  a key map against); the placeholder count is the official `compute_token_num`;
- the learning rate: a warm-up, then a cosine to 10 % in each final stage (encoder, tokenizer, flow, vocoder,
  SFT); the text LLM and the adaptor keep theirs, SFT trains those weights on (ours; the paper gives none).
Aim 1100 lines not reached (1827): seven training stages in two runs, two-part eval, the detokenizer.

    python step_audio.py                          # 1. encoder, tokenizer, flow, vocoder (out/.../speech)
    python step_audio.py --stage=llm              # 2. text LLM, adaptor, SFT (reads out/step_audio/speech)
    python step_audio.py --stage=llm --init_from=resume   # continue out/step_audio/llm/ckpt.pt
    python step_audio.py --mode=eval --init_from=out/step_audio/llm/ckpt.pt  # test set; spoken, resynth and
        # original clips with refs.txt each, for whisper.py --mode=sample --input_dir=... to score
    python step_audio.py --mode=sample --init_from=out/step_audio/llm/ckpt.pt --input=q.wav --followup=q2.wav
    python step_audio.py --mode=sample --init_from=out/step_audio/speech/ckpt.pt --input=a.wav  # resynthesis
    python step_audio.py --mode=bench
    torchrun --standalone --nproc_per_node=8 step_audio.py
"""
import dataclasses
import functools
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    mode: str = "train"                 # train | sample | eval | bench
    preset: str = "mini"                # a key of PRESETS
    stage: str = "speech"               # speech (encoder, tokenizer, flow, vocoder) | llm (text LLM, adaptor,
                                        # SFT; on a speech checkpoint)
    init_from: str = "scratch"          # scratch | resume | path to one of our checkpoints
    out_dir: str = "out/step_audio/{stage}"  # one folder (ckpt.pt, log.txt, samples/) per stage
    speech: str = "out/step_audio/speech/ckpt.pt"  # --stage=llm: the speech checkpoint it starts from
    data_dir: str = ""                  # empty: the built-in corpus (speech and dialogue)
    corpus_hours: float = 2.0           # size of the built-in corpus
    input: str = ""                     # --mode=sample: a wav to listen to (empty: held-out examples)
    prompt: str = ""                    # --mode=sample: a text question about --input (empty: none)
    tools: bool = True                  # --mode=sample: the calculator tool is offered
    speak: bool = True                  # --mode=sample: answer a spoken question with speech (else text)
    followup: str = ""                  # --mode=sample: a second spoken question (wav), after --input's
    seed: int = 1337
    # audio front end (§3.1: Whisper's log-mel at 16 kHz, 128 bins, 25 s chunks)
    sample_rate: int = 16000            # Hz
    n_mels: int = 128                   # log-mel bins
    chunk_seconds: float = 25.0         # audio is cut into chunks of at most this length, framed by markers
    pad_samples: int = 479              # right padding of each chunk before the STFT (official)
    # audio encoder (Whisper-large-v3 shapes in `mini`)
    n_audio_ctx: int = 1500             # positional table: 30 s at 50 Hz
    n_audio_state: int = 1280           # encoder width
    n_audio_head: int = 20              # encoder heads
    n_audio_layer: int = 32             # encoder blocks
    # adaptor (§3.1)
    adaptor_hidden: int = 2048          # width of the two-layer projection
    # LLM (Qwen2.5-7B shapes in `mini`)
    n_embd: int = 3584                  # width
    n_layer: int = 28                   # decoder layers
    n_head: int = 28                    # query heads
    n_kv_head: int = 4                  # key/value heads (grouped-query attention)
    ffn: int = 18944                    # SwiGLU hidden width
    rope_theta: float = 1e6             # RoPE base
    rms_eps: float = 1e-6               # RMSNorm epsilon
    vocab_size: int = 0                 # 0: the corpus BPE plus the special tokens; 158720 in `mini`
    bpe_vocab: int = 600                # ranks of the corpus BPE (bytes included)
    tie_embeddings: bool = False        # share embed_tokens and lm_head (Qwen2.5-7B does not)
    # speech output (part 2): supervised speech tokens, interleaved text:audio generation, flow, vocoder
    fsq_levels: tuple = (3, 3, 3, 3, 3, 3, 3, 3)  # FSQ levels per dimension: 3^8 = 6561 codes (CosyVoice 2)
    interleave: tuple = (1, 4)          # text slots : audio slots per group between <tts_start> and <tts_end>
    n_voc_mels: int = 80                # the detokenizer's mel (ln, n_fft 640, hop 160: 4 frames a token)
    flow_dim: int = 512                 # flow-matching estimator width
    flow_layers: int = 6                # estimator blocks (self-attention, then a conv, then an MLP: §3.1)
    flow_heads: int = 8                 # estimator attention heads
    flow_steps: int = 10                # Euler steps of the ODE at inference (the official token2wav uses 10)
    sigma_min: float = 1e-6             # OT-CFM's minimum noise level
    flow_cfg_drop: float = 0.2          # share of flow training examples without tokens and speaker (CosyVoice 2)
    flow_cfg: float = 0.7               # classifier-free guidance weight at inference (CosyVoice 2's 0.7; 0: off)
    voc_channels: int = 256             # vocoder width after its input conv (halved at each upsampling)
    voc_upsample: tuple = (5, 4, 2)     # vocoder upsampling before its iSTFT (hop 4): 5 * 4 * 2 * 4 = 160
    voc_segment: int = 6400             # vocoder training crop in samples (40 mel frames)
    flow_max_codes: int = 64            # flow training crop in speech tokens (2.56 s)
    answer_voice: int = 0               # the built-in voice that speaks the assistant's answers
    bank_size: int = 0                  # questions of the spoken question bank per split (0: all of them)
    bank_voices: int = 3                # voices each question of the bank is spoken in
    # training stages in miniature (§3.2-3.4): text LLM, encoder ASR pretraining, adaptor alignment, the
    # speech tokenizer (FSQ + CTC), the flow-matching detokenizer, the vocoder; then SFT (text and speech).
    # --stage=speech: the encoder, tokenizer and flow counts, then the vocoder to max_iters; --stage=llm: the
    # text LLM and adaptor counts, then SFT to llm_max_iters
    stage_iters: tuple = (300, 300, 200, 200, 400)  # steps of the text LLM, encoder, adaptor, tokenizer, flow
    # below 1, SFT asks the bank's arithmetic without the calculator too, answerable only from memory, and
    # that memory then overrides the tool's result after a spoken question (ours, measured)
    tool_frac: float = 1.0              # questions with the calculator offered (arithmetic calls it)
    lr: float = 1e-3                    # AdamW peak learning rate
    betas: tuple = (0.9, 0.95)          # AdamW betas
    weight_decay: float = 0.1           # AdamW weight decay
    warmup_iters: int = 30              # linear warm-up at the start of each stage
    grad_clip: float = 1.0              # gradient-norm clipping
    batch_size: int = 16                # examples per step
    max_iters: int = 2000               # total steps of --stage=speech (the vocoder takes the rest)
    llm_max_iters: int = 0              # total steps of --stage=llm (SFT takes the rest; 0: max_iters)
    eval_interval: int = 500            # steps between evaluations on val
    eval_items: int = 24                # held-out examples per task (text answers)
    eval_speech_items: int = 8          # held-out examples for the spoken answers and resynthesis (slower)
    log_interval: int = 25              # steps between progress lines
    max_new_tokens: int = 48            # generation limit per assistant turn (text)
    max_speech_tokens: int = 240        # generation limit of a spoken turn (text and audio slots)
    bench_iters: int = 5                # timed repetitions in --mode=bench
    bench_seconds: float = 30.0         # audio length for the prefill figure
    device: str = "auto"
    dtype: str = "auto"                 # bf16 on CUDA, fp32 elsewhere
    compile: bool = True                # torch.compile (CUDA by default; a CPU only with --compile=True)

    def validate(self):
        if any(s < 0 for s in self.stage_iters) or len(self.stage_iters) != 5:
            raise SystemExit(f"error: --stage_iters takes five step counts >= 0 (got {self.stage_iters})"
                             + ("; six are a checkpoint of the one-run step_audio: retrain it in two stages"
                                if len(self.stage_iters) == 6 else ""))
        if not (0 <= self.flow_cfg_drop < 1 and self.flow_cfg >= 0):
            raise SystemExit(f"error: --flow_cfg_drop takes [0, 1) and --flow_cfg >= 0 "
                             f"(got {self.flow_cfg_drop}, {self.flow_cfg})")
        if self.stage not in ("speech", "llm"):
            raise SystemExit(f"error: --stage={self.stage!r}: the stages are speech and llm")
        *first, (_, rest) = plan(self)                 # the last stage takes what the others leave
        if self.mode == "train" and rest < 0:
            flag = "max_iters" if self.stage == "speech" else "llm_max_iters"
            raise SystemExit(f"error: --{flag}={run_iters(self)} is shorter than the "
                             f"{', '.join(s for s, _ in first)} stages "
                             f"(--stage_iters={','.join(map(str, self.stage_iters))})")
        if self.n_head % self.n_kv_head or self.n_embd % self.n_head:
            raise SystemExit("error: --n_head must be a multiple of --n_kv_head, and --n_embd of --n_head")
        if self.followup and (not os.path.isfile(self.followup) or not self.followup.lower().endswith(
                (".wav", ".flac", ".ogg", ".mp3"))):
            raise SystemExit(f"error: --followup={self.followup} is not an audio file "
                             "(.wav, .flac, .ogg, .mp3)")
        if self.followup and not self.input:
            raise SystemExit("error: --followup is the second spoken question: give the first with --input")
        if not self.fsq_levels or any(l < 3 or l % 2 == 0 for l in self.fsq_levels):
            raise SystemExit(f"error: --fsq_levels takes odd levels >= 3 (got {self.fsq_levels})")
        if len(self.interleave) != 2 or min(self.interleave) < 1:
            raise SystemExit(f"error: --interleave takes two counts >= 1, text,audio (got {self.interleave})")
        if math.prod(self.voc_upsample) * ISTFT_HOP != 160:
            raise SystemExit(f"error: --voc_upsample times the iSTFT hop {ISTFT_HOP} must be the mel hop 160 "
                             f"(got {self.voc_upsample})" + ("; a checkpoint from before the iSTFT vocoder: "
                             "retrain --stage=speech" if math.prod(self.voc_upsample) == 160 else ""))
        if self.flow_dim % self.flow_heads or self.voc_channels % 2 ** len(self.voc_upsample):
            raise SystemExit("error: --flow_dim must be a multiple of --flow_heads, and --voc_channels of "
                             "2 ** len(--voc_upsample)")


PRESETS = {
    "mini":  dict(vocab_size=158720),   # Step-Audio-2-mini's shapes (8.3 B parameters): meta device only
    # a CPU run; 80 mel bins, as 128 cost much more time on a CPU
    "small": dict(n_mels=80, n_audio_state=128, n_audio_head=4, n_audio_layer=2, adaptor_hidden=256,
                  n_embd=192, n_layer=4, n_head=6, n_kv_head=2, ffn=512, rope_theta=1e4, tie_embeddings=True,
                  corpus_hours=2.0, flow_dim=128, flow_layers=3, flow_heads=4, voc_channels=256,
                  stage_iters=(600, 2000, 150, 2000, 3200), max_iters=10200, llm_max_iters=3850, batch_size=8,
                  eval_interval=10200, eval_items=24, eval_speech_items=8, compile=False),
    # tests
    "tiny":  dict(n_mels=32, n_audio_ctx=400, n_audio_state=32, n_audio_head=2, n_audio_layer=1,
                  adaptor_hidden=48, n_embd=32, n_layer=2, n_head=4, n_kv_head=2, ffn=64, rope_theta=1e4,
                  bpe_vocab=300, tie_embeddings=True, corpus_hours=0.02, fsq_levels=(3, 3), flow_dim=16,
                  flow_layers=1, flow_heads=2, voc_channels=16, voc_segment=1600, flow_max_codes=8,
                  bank_size=6, bank_voices=1, stage_iters=(0, 0, 0, 1, 1), max_iters=4, batch_size=2,
                  eval_interval=1000, eval_items=1, eval_speech_items=1, log_interval=1, max_new_tokens=6,
                  max_speech_tokens=12, bench_iters=1, bench_seconds=2.0, chunk_seconds=3.0, compile=False),
}
ARCH_KEYS = ("sample_rate", "n_mels", "chunk_seconds", "pad_samples", "n_audio_ctx", "n_audio_state",
             "n_audio_head", "n_audio_layer", "adaptor_hidden", "n_embd", "n_layer", "n_head", "n_kv_head",
             "ffn", "rope_theta", "rms_eps", "vocab_size", "bpe_vocab", "tie_embeddings", "fsq_levels",
             "n_voc_mels", "flow_dim", "flow_layers", "flow_heads", "voc_channels", "voc_upsample")
STAGES = ("llm", "encoder", "adaptor", "tokenizer", "flow", "vocoder", "sft")

# ----------------------------------------------------------------------------- model

class LayerNorm(nn.LayerNorm):
    def forward(self, x):                                 # in fp32, as Whisper
        return super().forward(x.float()).type(x.dtype)


class EncoderAttention(nn.Module):
    """Whisper's attention (the key has no bias), over unpadded frames only: the padding mask is additive
    in the official encoder, a boolean mask here."""
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    # x: (B, T, D), mask: (B, 1, 1, T) True = a real frame
    def forward(self, x, mask):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T,
                             self.n_head, -1).transpose(1, 2) for p in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, Dh)
        return self.out(y.transpose(1, 2).flatten(2))


class EncoderBlock(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.attn, self.attn_ln = EncoderAttention(d, n_head), LayerNorm(d)
        self.mlp, self.mlp_ln = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(),
                                              nn.Linear(4 * d, d)), LayerNorm(d)

    def forward(self, x, mask):
        x = x + self.attn(self.attn_ln(x), mask)
        return x + self.mlp(self.mlp_ln(x))


def encoder_frames(n_mel):
    """Mel frames -> encoder output frames: conv2 strides by 2 (k3, p1), then AvgPool1d(2, 2) (§3.1)."""
    return ((n_mel - 1) // 2 + 1) // 2


def adaptor_frames(n_enc):
    """Encoder frames (25 Hz) -> adaptor frames (12.5 Hz): a k3, s2, p1 conv."""
    return (n_enc - 1) // 2 + 1


class AudioEncoder(nn.Module):
    """Whisper-style encoder (§3.1): two convs (100 Hz mel -> 50 Hz), a learned positional table,
    pre-LN blocks, then average pooling to 25 Hz and a final LayerNorm. Pretrained on ASR, then frozen for the
    rest of training."""
    def __init__(self, cfg):
        super().__init__()
        d = cfg.n_audio_state
        self.conv1 = nn.Conv1d(cfg.n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        # an nn.Embedding, not sinusoids (official)
        self.positional_embedding = nn.Embedding(cfg.n_audio_ctx, d)
        self.blocks = nn.ModuleList(EncoderBlock(d, cfg.n_audio_head) for _ in range(cfg.n_audio_layer))
        self.avg_pooler = nn.AvgPool1d(2, 2)
        self.after_norm = LayerNorm(d)

    def forward(self, mel, n_mel):                        # mel: (B, n_mels, T), n_mel: (B,) real frames
        x = F.gelu(self.conv1(mel))
        # padding reads as zeros
        x = x * (torch.arange(x.shape[-1], device=mel.device)[None] < n_mel[:, None])[:, None]
        x = F.gelu(self.conv2(x)).transpose(1, 2)         # (B, T2, D) at 50 Hz
        T2 = x.shape[1]
        if T2 > self.positional_embedding.num_embeddings:
            raise ValueError(f"an audio chunk of {T2} encoder frames exceeds the positional table "
                             f"({self.positional_embedding.num_embeddings}); use shorter --chunk_seconds")
        x = x + self.positional_embedding.weight[:T2]
        valid = torch.arange(T2, device=mel.device)[None] < ((n_mel - 1) // 2 + 1)[:, None]  # (B, T2)
        for block in self.blocks:
            x = block(x, valid[:, None, None, :])
        x = self.avg_pooler(x.transpose(1, 2)).transpose(1, 2)  # (B, T2 // 2, D) at 25 Hz
        return self.after_norm(x)


class Adaptor(nn.Module):
    """§3.1: a stride-2 conv (25 -> 12.5 Hz) with GELU, then Linear -> ReLU -> Linear to the LLM's width."""
    def __init__(self, cfg):
        super().__init__()
        self.conv = nn.Conv1d(cfg.n_audio_state, cfg.n_audio_state, kernel_size=3, stride=2, padding=1)
        self.linear1 = nn.Linear(cfg.n_audio_state, cfg.adaptor_hidden)
        self.linear2 = nn.Linear(cfg.adaptor_hidden, cfg.n_embd)

    def forward(self, x):                                 # (B, T, D_audio) -> (B, ceil(T / 2), D_llm)
        x = F.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        return self.linear2(F.relu(self.linear1(x)))


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type(x.dtype) * self.weight


def rope(x, pos, theta):
    """Rotary position embedding, Qwen's layout: dimension i pairs with i + Dh/2 (rotate-half)."""
    dh = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, dh, 2, device=x.device, dtype=torch.float32) / dh)
    ang = pos.float()[:, None] * inv[None]               # (T, Dh/2)
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(x.dtype), torch.cat([ang.sin()] * 2, -1).to(x.dtype)
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class KVCache:
    """Explicit per-layer key/value buffers (layers, B, H_kv, max_len, Dh), filled as tokens are decoded."""
    def __init__(self, cfg, batch, max_len, device, dtype):
        dh = cfg.n_embd // cfg.n_head
        self.k = torch.zeros(cfg.n_layer, batch, cfg.n_kv_head, max_len, dh, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0


class Attention(nn.Module):
    """Grouped-query attention: n_head query heads share n_kv_head key/value heads (Qwen2: q/k/v with bias,
    o_proj without); RoPE on queries and keys; fused SDPA, causal."""
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv, self.dh = cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head
        self.theta = cfg.rope_theta
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * self.dh)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.dh)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.dh)
        self.o_proj = nn.Linear(cfg.n_head * self.dh, cfg.n_embd, bias=False)

    def forward(self, x, pos, cache=None, layer=0):     # x: (B, T, D), pos: (T,) absolute positions
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.dh).transpose(1, 2)   # (B, H, T, Dh)
        k = self.k_proj(x).view(B, T, self.n_kv, self.dh).transpose(1, 2)     # (B, H_kv, T, Dh)
        v = self.v_proj(x).view(B, T, self.n_kv, self.dh).transpose(1, 2)
        q, k = rope(q, pos, self.theta), rope(k, pos, self.theta)
        causal = True
        if cache is not None:                             # write at pos, attend to everything up to it
            start = int(pos[0])
            cache.k[layer, :, :, start:start + T] = k
            cache.v[layer, :, :, start:start + T] = v
            k, v = cache.k[layer, :, :, :start + T], cache.v[layer, :, :, :start + T]
            causal = T > 1                                # one new query sees all cached keys
            if causal and start > 0:
                raise ValueError("prefill a KV cache in one call from position 0")
        rep = self.n_head // self.n_kv                    # each K/V head serves `rep` query heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)         # (B, H, T, Dh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.ffn, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.ffn, bias=False)
        self.down_proj = nn.Linear(cfg.ffn, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm, self.self_attn = RMSNorm(cfg.n_embd, cfg.rms_eps), Attention(cfg)
        self.post_attention_layernorm, self.mlp = RMSNorm(cfg.n_embd, cfg.rms_eps), MLP(cfg)

    def forward(self, x, pos, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), pos, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLM(nn.Module):
    """A Qwen2.5-style decoder: token embeddings, pre-RMSNorm layers, final norm, LM head."""
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        for m in self.modules():                          # Qwen2's initializer_range: N(0, 0.02), zero biases
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x, pos0=0, cache=None, keep=None):  # x: (B, T, D) input embeddings -> (B, T, vocab)
        pos = torch.arange(pos0, pos0 + x.shape[1], device=x.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, pos, cache, i)
        if cache is not None:
            cache.length = pos0 + x.shape[1]
        # keep (B, T) bool: the logits of those positions only, (K, vocab): training needs no others
        # (ours: the same loss, without the 7k-token head at the prompt's and the audio's positions)
        return self.lm_head(self.norm(x if keep is None else x[keep]))


# the CTC alphabet of encoder pretraining (0 = blank)
CHARS = " abcdefghijklmnopqrstuvwxyz'"

# ----------------------------------------------------------------------------- speech output (part 2)

class FSQ(nn.Module):
    """Finite scalar quantization (Mentzer et al. 2023; CosyVoice 2's S3 tokenizer, §3.1 of Step-Audio 2: its
    audio tokens are CosyVoice 2's): each of d dimensions is bounded by tanh to [-(L-1)/2, (L-1)/2] and
    rounded to one of L integers (straight-through gradient); the code is the mixed-radix number of the d
    digits, so there are prod(levels) codes and no codebook to learn or collapse. Odd levels only (no
    half-step offset)."""
    def __init__(self, levels):
        super().__init__()
        self.levels = list(levels)
        self.register_buffer("half_width", torch.tensor([(l - 1) / 2 for l in levels]), persistent=False)
        basis = [int(np.prod(self.levels[:i])) for i in range(len(levels))]
        self.register_buffer("basis", torch.tensor(basis), persistent=False)
        self.n_codes = int(np.prod(self.levels))

    # z: (..., d) -> (quantized in [-1, 1] (..., d), codes (...))
    def forward(self, z):
        b = torch.tanh(z) * self.half_width
        q = b + (torch.round(b) - b).detach()             # straight-through: round forward, identity backward
        codes = ((torch.round(b) + self.half_width).long() * self.basis).sum(-1)
        return q / self.half_width, codes

    def dequantize(self, codes):                          # (...) -> (..., d) in [-1, 1]
        digits = (codes[..., None] // self.basis) % torch.tensor(self.levels, device=codes.device)
        return (digits.float() - self.half_width) / self.half_width


class SpeechTokenizer(nn.Module):
    """A supervised speech tokenizer in the spirit of CosyVoice 2: FSQ inserted after the frozen ASR-trained
    encoder (25 Hz), then one more Transformer block and a CTC head, trained on ASR; the FSQ codes are thus
    made to keep what the words need. Its codes are the LLM's audio tokens."""
    def __init__(self, cfg):
        super().__init__()
        d = cfg.n_audio_state
        n = len(cfg.fsq_levels)
        self.down, self.fsq, self.up = nn.Linear(d, n), FSQ(cfg.fsq_levels), nn.Linear(n, d)
        self.block, self.ctc_head = EncoderBlock(d, cfg.n_audio_head), nn.Linear(d, len(CHARS) + 1)

    # h: (B, T', D) encoder frames -> CTC logits (B, T', chars)
    def forward(self, h, n_mel):
        q, _ = self.fsq(self.down(h))
        valid = torch.arange(h.shape[1],
                             device=h.device)[None] < torch.tensor([encoder_frames(int(n)) for n in n_mel],
                                                                                device=h.device)[:, None]
        return self.ctc_head(self.block(self.up(q), valid[:, None, None, :]))

    def codes(self, h):                                   # (B, T', D) -> (B, T') ints in [0, n_codes)
        return self.fsq(self.down(h))[1]


def voc_mel(wav, cfg):
    """The detokenizer's mel: 80-bin ln-mel, n_fft 640, hop 160 at 16 kHz: 100 frames/s, 4 per speech token.
    wav: (..., T) tensor -> (..., n_voc_mels, T // 160)."""
    return common.mel_spectrogram(wav, cfg.sample_rate, n_fft=640, hop=160, n_mels=cfg.n_voc_mels, log="ln")


# the flow works on (ln-mel - mean) / std: about unit scale
MEL_MEAN, MEL_STD = -6.0, 3.0


def timestep_embedding(t, d):
    """Sinusoidal embedding of the flow time t in [0, 1] (scaled by 1000, as in diffusion models).
    (B,) -> (B, d)."""
    f = torch.exp(-math.log(10000) * torch.arange(d // 2, device=t.device) / (d // 2))
    a = 1000 * t[:, None] * f[None]
    return torch.cat([a.sin(), a.cos()], -1)


class FlowBlock(nn.Module):
    """The estimator's block (§3.1: "a CNN encoder layer after each self-attention"):
    self-attention, a k3 conv, an MLP, each pre-LN and residual; the flow time is added at its input."""
    def __init__(self, d, n_head):
        super().__init__()
        self.attn, self.attn_ln = EncoderAttention(d, n_head), LayerNorm(d)
        self.conv, self.conv_ln = nn.Conv1d(d, d, 3, padding=1), LayerNorm(d)
        self.mlp, self.mlp_ln = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(),
                                              nn.Linear(4 * d, d)), LayerNorm(d)
        self.time = nn.Linear(d, d)

    def forward(self, x, temb, mask):                     # x: (B, T, D), temb: (B, D), mask: (B, 1, 1, T)
        x = x + self.time(temb)[:, None]
        x = x + self.attn(self.attn_ln(x), mask)
        x = x + F.gelu(self.conv(self.conv_ln(x).transpose(1, 2))).transpose(1, 2)
        return x + self.mlp(self.mlp_ln(x))


class Flow(nn.Module):
    """Conditional flow matching (CosyVoice 2's flow; §3.1's detokenizer): speech tokens (25 Hz) -> a token
    encoder -> mu, upsampled x4 to the mel rate; the estimator predicts the velocity v(x_t, t | mu, speaker)
    that carries Gaussian noise (t = 0) to the mel (t = 1). The speaker is a prompt clip's mean mel (our
    stand-in for CosyVoice's CAMPPlus x-vector; the prompt mel is not used in-context). A token enters as its
    FSQ digits (ours: CosyVoice 2 looks each of the 6561 codes up in a table; digits let codes that differ in
    one digit share what they mean, so the flow learns faster from 2 h of speech: measured)."""
    def __init__(self, cfg):
        super().__init__()
        d, m = cfg.flow_dim, cfg.n_voc_mels
        self.fsq = FSQ(cfg.fsq_levels)                    # no parameters: code -> digits in [-1, 1]
        self.embed = nn.Linear(len(cfg.fsq_levels), d)
        self.token_conv = nn.Conv1d(d, d, 3, padding=1)
        self.mu = nn.Linear(d, m)
        self.spk = nn.Linear(m, m)
        self.inp = nn.Linear(3 * m, d)
        self.temb = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(FlowBlock(d, cfg.flow_heads) for _ in range(cfg.flow_layers))
        self.out_ln, self.out = LayerNorm(d), nn.Linear(d, m)

    # codes: (B, N), spk_mel: (B, M) -> mu (B, 4N, M), spk (B, M)
    def cond(self, codes, spk_mel):
        h = self.embed(self.fsq.dequantize(codes))       # (B, N, levels) -> (B, N, D)
        h = h + F.gelu(self.token_conv(h.transpose(1, 2))).transpose(1, 2)
        return self.mu(h).repeat_interleave(4, dim=1), self.spk(spk_mel)

    def velocity(self, x, t, mu, spk, mask=None):         # x, mu: (B, T, M); t: (B,) -> (B, T, M)
        h = self.inp(torch.cat([x, mu, spk[:, None].expand_as(x)], -1))
        temb = self.temb(timestep_embedding(t, h.shape[-1]))
        for b in self.blocks:
            h = b(h, temb, mask)
        return self.out(self.out_ln(h))


def flow_sample(velocity, x0, steps):
    """Euler integration of dx/dt = v(x, t) from t = 0 (the noise x0) to t = 1 (the mel) on CosyVoice 2's
    cosine schedule t_i = 1 - cos(pi/2 i/steps): short steps near the noise, where the field turns most."""
    ts = 1 - torch.cos(0.5 * math.pi * torch.linspace(0.0, 1.0, steps + 1, device=x0.device))
    x = x0
    for i in range(steps):
        x = x + (ts[i + 1] - ts[i]) * velocity(x, ts[i].expand(x0.shape[0]))
    return x


class ResBlock(nn.Module):
    """HiFi-GAN's residual block (type 2): dilated k3 convs with leaky ReLU, each residual."""
    def __init__(self, c, dilations=(1, 3)):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(c, c, 3, dilation=d, padding=d) for d in dilations)

    def forward(self, x):
        for conv in self.convs:
            x = x + conv(F.leaky_relu(x, 0.1))
        return x


ISTFT_N_FFT, ISTFT_HOP = 16, 4    # HiFT's inverse-STFT head (CosyVoice 2: n_fft 16, hop 4)


class Vocoder(nn.Module):
    """HiFT's generator (CosyVoice 2's vocoder, which Step-Audio 2 uses) without its source: mel (100 Hz) ->
    transposed convs x5, x4, x2 with a residual block after each -> 4000 frames/s, where the last conv predicts
    a 16-point STFT (9 log-magnitudes, 9 phases) and an inverse STFT with hop 4 gives 16 kHz. The iSTFT head
    stands for HiFi-GAN's last, costliest upsamplings (iSTFTNet). Ours: no neural source filter (HiFT's
    F0-driven sine excitation), no discriminators: mel and multi-resolution STFT losses only."""
    def __init__(self, cfg):
        super().__init__()
        c = cfg.voc_channels
        self.conv_pre = nn.Conv1d(cfg.n_voc_mels, c, 7, padding=3)
        self.ups, self.res = nn.ModuleList(), nn.ModuleList()
        # length x r exactly: kernel 2r, padding ceil(r/2), output_padding r % 2
        for r in cfg.voc_upsample:
            self.ups.append(nn.ConvTranspose1d(c, c // 2, 2 * r, r, padding=(r + 1) // 2,
                                               output_padding=r % 2))
            self.res.append(ResBlock(c // 2))
            c //= 2
        self.conv_post = nn.Conv1d(c, ISTFT_N_FFT + 2, 7, padding=3)
        self.register_buffer("window", torch.hann_window(ISTFT_N_FFT), persistent=False)

    def forward(self, mel):                               # (B, n_voc_mels, T) -> (B, T * 160)
        x = self.conv_pre(mel)
        for up, res in zip(self.ups, self.res):
            x = res(up(F.leaky_relu(x, 0.1)))
        # one frame more on the left (HiFT's reflection pad): 40 T + 1 frames -> exactly 160 T samples
        x = self.conv_post(F.pad(F.leaky_relu(x), (1, 0), mode="reflect")).float()
        k = ISTFT_N_FFT // 2 + 1
        mag, phase = x[:, :k].exp().clamp(max=1e2), torch.sin(x[:, k:])     # as HiFT
        wav = torch.istft(torch.polar(mag, phase), ISTFT_N_FFT, ISTFT_HOP, ISTFT_N_FFT, self.window)
        return wav.clamp(-0.99, 0.99)


class StepAudio(nn.Module):
    """Encoder -> adaptor -> LLM -> (speech tokens) -> flow matching -> vocoder
    (§3.1). The CTC head exists for encoder pretraining only (our stand-in for the paper's ASR
    pretraining of the encoder)."""
    def __init__(self, cfg):
        super().__init__()
        self.encoder, self.adapter, self.model = AudioEncoder(cfg), Adaptor(cfg), LLM(cfg)
        self.ctc_head = nn.Linear(cfg.n_audio_state, len(CHARS) + 1)
        # part 2: the speech tokenizer on the frozen encoder, and the detokenizer (flow matching, then the
        # vocoder)
        self.speech_tokenizer, self.flow, self.vocoder = SpeechTokenizer(cfg), Flow(cfg), Vocoder(cfg)
        # the assistant's voice: the mean voc_mel of a clip in it, set before training, kept in the checkpoint
        self.register_buffer("answer_voice", torch.zeros(cfg.n_voc_mels))

    def audio_features(self, mel, n_mel):
        """(N, n_mels, T) chunks -> list of N (n_tokens_i, D_llm) tensors,
        each exactly audio_tokens(...) long."""
        return self.adapt(self.encoder(mel, n_mel), n_mel)

    def adapt(self, h, n_mel):
        """Encoder frames (N, T', D) -> each chunk's adaptor features; the frames past a chunk's end are
        zeroed first, so a chunk padded in a batch gives exactly what it gives alone (the conv
        looks one frame ahead)."""
        n_enc = torch.tensor([encoder_frames(int(n)) for n in n_mel], device=h.device)
        h = h * (torch.arange(h.shape[1], device=h.device)[None] < n_enc[:, None])[..., None]
        return [f[:adaptor_frames(int(n))] for f, n in zip(self.adapter(h), n_enc)]

    def embed(self, ids, feats, patch_id):
        """Token embeddings with the audio features written over the <audio_patch> placeholders, in order."""
        x = self.model.embed_tokens(ids)                  # (B, T, D)
        slots = ids == patch_id
        if feats:
            f = torch.cat(feats).to(x.dtype)
            if f.shape[0] != int(slots.sum()):
                raise ValueError(f"{int(slots.sum())} audio placeholders for {f.shape[0]} audio features")
            x = x.masked_scatter(slots[..., None], f)
        return x

    def forward(self, ids=None, mel=None, n_mel=None, patch_id=None, ctc=False,
                frozen_encoder=True, batch=None,
                cfg=None, keep=None):
        """Logits over the vocabulary (B, T, V); with ctc=True the encoder's CTC logits
        (B, T', chars) instead; with a batch of the tokenizer, flow or vocoder stage, that stage's loss (so
        DDP sees every stage)."""
        if batch is not None:
            return self.stage_loss(batch, cfg)
        if ctc:
            return self.ctc_head(self.encoder(mel, n_mel))
        feats = []
        if mel is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen_encoder):
                h = self.encoder(mel, n_mel)             # frozen after its pretraining (§3.2)
            feats = self.adapt(h, n_mel)
        return self.model(self.embed(ids, feats, patch_id), keep=keep)

    def stage_loss(self, batch, cfg):
        # CTC through the FSQ bottleneck on the frozen encoder's frames h (B, T', D) (the sampler's)
        if batch["stage"] == "tokenizer":
            return ctc_loss(self.speech_tokenizer(batch["h"], batch["n_mel"]), batch["n_mel"], batch["chars"],
                            batch["n_chars"])
        if batch["stage"] == "flow":
            return flow_loss(self.flow, batch["codes"], batch["x1"], batch["spk"],
                             batch["mask"], cfg.sigma_min, cfg.flow_cfg_drop)
        return vocoder_loss(self.vocoder(batch["mel"]), batch["wav"], cfg)

    @torch.no_grad()
    def speech_codes(self, mel, n_mel):
        """(N, n_mels, T) chunks -> each chunk's speech tokens at 25 Hz (a list of (n_i,) long tensors)."""
        codes = self.speech_tokenizer.codes(self.encoder(mel, n_mel))
        return [c[:encoder_frames(int(n))] for c, n in zip(codes, n_mel)]

    @torch.no_grad()
    def detokenize(self, codes, spk_mel, cfg, noise=None):
        """Speech tokens (N,) -> (mel (n_voc_mels, 4N), 16 kHz waveform (640 N,)):
        flow matching, then the vocoder."""
        mu, spk = self.flow.cond(codes[None], (spk_mel[None] - MEL_MEAN) / MEL_STD)
        x0 = torch.randn_like(mu) if noise is None else noise
        w = cfg.flow_cfg if cfg.flow_cfg_drop > 0 else 0.0   # guidance needs the unconditional field

        def guided(x, t):
            """Classifier-free guidance (CosyVoice 2): (1 + w) v(x | tokens, speaker) - w v(x | nothing),
            both halves in one batch of 2."""
            if w == 0:
                return self.flow.velocity(x, t, mu, spk)
            v = self.flow.velocity(torch.cat([x, x]), torch.cat([t, t]), torch.cat([mu, torch.zeros_like(mu)]),
                                   torch.cat([spk, torch.zeros_like(spk)]))
            return (1 + w) * v[:1] - w * v[1:]
        mel = flow_sample(guided, x0, cfg.flow_steps)    # (1, 4N, M)
        mel = mel.transpose(1, 2) * MEL_STD + MEL_MEAN    # (1, M, 4N) ln-mel
        return mel[0], self.vocoder(mel)[0]

# ----------------------------------------------------------------------------- tokens and chat format

SPECIALS = ("<|endoftext|>", "<|BOT|>", "<|EOT|>", "<audio_start>", "<audio_patch>", "<audio_end>",
            "<tool_call>", "</tool_call>", "<tts_start>", "<tts_end>", "<tts_pad>")


class Tokenizer:
    """The corpus BPE (tiktoken format, common.train_bpe) with the chat, audio and TTS markers after its
    ranks, then the speech tokens (§3.2's vocabulary extension): <audio_k> = audio_base + k for the n_codes
    FSQ codes, and one audio pad (<audio_k> with k = n_codes, as the official 6561). Text ids
    are all < audio_base."""
    def __init__(self, ranks, n_codes):
        self.ranks_text = common.ranks_to_text(ranks)
        self.enc = common.bpe_encoding(ranks, SPECIALS, name="step-audio-bpe")
        self.ids = {s: len(ranks) + i for i, s in enumerate(SPECIALS)}
        self.pad, self.bot, self.eot = self.ids["<|endoftext|>"], self.ids["<|BOT|>"], self.ids["<|EOT|>"]
        self.audio_start, self.patch, self.audio_end = (self.ids[s] for s in
                                                        ("<audio_start>", "<audio_patch>", "<audio_end>"))
        self.call, self.end_call = self.ids["<tool_call>"], self.ids["</tool_call>"]
        self.tts_start, self.tts_end, self.tts_pad = (self.ids[s] for s in
                                                      ("<tts_start>", "<tts_end>", "<tts_pad>"))
        self.audio_base = self.enc.n_vocab                # the first speech token
        self.n_codes = n_codes
        self.audio_pad = self.audio_base + n_codes        # fills the audio slots of the last group
        self.n_vocab = self.audio_pad + 1

    def encode(self, text):
        """Text to ids; the tool-call markers in an assistant's text become their special tokens."""
        return self.enc.encode(text, allowed_special={"<tool_call>", "</tool_call>"}, disallowed_special=())

    def is_audio(self, i):
        return i >= self.audio_base

    def decode(self, ids):
        """Ids to text: specials as their names, speech tokens and <tts_*> markers left out
        (they are not text)."""
        specials, out, run = {v: k for k, v in self.ids.items()}, [], []
        skip = {self.tts_start, self.tts_end, self.tts_pad}
        for i in [i for i in ids if not self.is_audio(i) and i not in skip] + [None]:
            if i is None or i in specials:
                out.append(self.enc.decode(run))
                run = []
                if i is not None:
                    out.append(specials[i])
            else:
                run.append(i)
        return "".join(out)


def interleave(text_ids, codes, tok, ratio):
    """A spoken answer as one token run (§3.1: text and audio tokens at a fixed ratio, padded to keep it):
    <tts_start>, then groups of n text slots and m audio slots until both the text and the audio are used up
    (text slots past the text's end hold <tts_pad>, audio slots past the audio's end the audio pad),
    <tts_end>. The text leads the audio it is saying: at 1:4 a text token per 160 ms of speech."""
    n, m = ratio
    groups = max(math.ceil(len(text_ids) / n), math.ceil(len(codes) / m), 1)
    out = [tok.tts_start]
    for g in range(groups):
        t = list(text_ids[g * n:(g + 1) * n])
        a = [tok.audio_base + int(c) for c in codes[g * m:(g + 1) * m]]
        out += t + [tok.tts_pad] * (n - len(t)) + a + [tok.audio_pad] * (m - len(a))
    return out + [tok.tts_end]


def deinterleave(ids, tok):
    """A generated run -> (text ids, speech codes): the official parser's split by id range,
    pads dropped."""
    text = [i for i in ids if i < tok.audio_base and i not in (tok.tts_start, tok.tts_end,
                                                               tok.tts_pad, tok.eot)]
    codes = [i - tok.audio_base for i in ids if tok.audio_base <= i < tok.audio_pad]
    return text, codes


def slot_kind(k, ratio):
    """Which slot the k-th token after <tts_start> fills: "text" or "audio"
    (the interleave's fixed pattern)."""
    n, m = ratio
    return "text" if k % (n + m) < n else "audio"


def chunk_lengths(n_samples, cfg):
    """Samples per chunk: audio is cut into chunks of at most chunk_seconds (§3.1)."""
    size = int(cfg.chunk_seconds * cfg.sample_rate)
    return [min(size, n_samples - s) for s in range(0, max(n_samples, 1), size)]


def mel_frames(n_samples, cfg):
    """Log-mel frames of one chunk: hop 160 after the right padding, the last frame dropped (Whisper)."""
    return (n_samples + cfg.pad_samples) // 160


def mel_valid(n_frames):
    """The mel frames the encoder reads as real: the official `padding_mels` counts each chunk's mel two
    frames shorter than it is (the 479-sample right padding's frames), so `compute_token_num` does too."""
    return n_frames - 2


def audio_tokens(n_samples, cfg):
    """Placeholders one chunk takes in the prompt: the encoder and adaptor length formula on the valid frames,
    which equals the official `compute_token_num` (tested at many lengths)."""
    return adaptor_frames(encoder_frames(mel_valid(mel_frames(n_samples, cfg))))


def render(turns, tok, cfg, generate=False):
    """A conversation -> token ids and labels (-100 except the assistant's words and their <|EOT|>).

    turns: [(role, content)], role in system | human | assistant | tool; content a str, or a list of str,
    ("audio", n_samples) and ("ids", [token ids]) items (a spoken answer's interleaved run, re-fed as it was
    made). Each audio chunk becomes <audio_start> + n x <audio_patch> + <audio_end>. generate: end with an
    open assistant turn, as the prompt for a reply."""
    ids, labels = [], []
    for role, content in turns:
        head = [tok.bot] + tok.encode(role + "\n")
        body = []
        for part in ([content] if isinstance(content, str) else content):
            if isinstance(part, str):
                body += tok.encode(part)
            elif part[0] == "ids":                        # token ids as they are (a spoken answer's run)
                body += list(part[1])
            else:
                for n in chunk_lengths(part[1], cfg):
                    body += [tok.audio_start] + [tok.patch] * audio_tokens(n, cfg) + [tok.audio_end]
        body.append(tok.eot)
        ids += head + body
        labels += [-100] * len(head) + (body if role == "assistant" else [-100] * len(body))
    if generate:
        head = [tok.bot] + tok.encode("assistant\n")
        ids, labels = ids + head, labels + [-100] * len(head)
    return ids, labels

# ----------------------------------------------------------------------------- tools

_NUM = {common.number_words(i): i for i in range(0, 1000)}
_OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}


def words_to_number(text):
    """'one hundred and forty four' -> 144 (the inverse of common.number_words for 0..999),
    None if not a number."""
    return _NUM.get(" ".join(text.split()))


def calculator(expr):
    """The tool (§3.4's tool calling, in miniature): 'seven times eight' -> 'fifty six'."""
    m = re.fullmatch(r"\s*(.+?) (plus|minus|times) (.+?)\s*", expr)
    a, b = (words_to_number(m.group(1)), words_to_number(m.group(3))) if m else (None, None)
    if a is None or b is None:
        return "error"
    c = _OPS[m.group(2)](a, b)
    return common.number_words(c) if 0 <= c < 10000 else "error"

# ----------------------------------------------------------------------------- loss

def trained(labels):
    """(B, T) bool: the positions whose next token is a target (training runs the LM head there alone)."""
    return F.pad(labels[:, 1:] != -100, (0, 1), value=False)


def lm_loss(logits, labels):
    """Next-token cross-entropy on the assistant turns only: labels are -100 elsewhere (the prompt, the user's
    audio and words, tool results, padding). logits: (B, T, V), or (K, V) at the trained(labels) positions."""
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), labels[:, 1:][labels[:, 1:] != -100])
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def ctc_loss(logits, n_mel, chars, n_chars):
    """Encoder pretraining on ASR (§3.2, in miniature): CTC over characters from the 25 Hz encoder output.
    logits: (B, T, C) from the CTC head; chars: the concatenated targets (1-based; 0 is the blank)."""
    logp = F.log_softmax(logits.float(), -1).transpose(0, 1)  # (T, B, C)
    n_out = torch.tensor([encoder_frames(int(n)) for n in n_mel])
    return F.ctc_loss(logp, chars, n_out, n_chars, blank=0, zero_infinity=True)


def flow_loss(flow, codes, x1, spk_mel, mask, sigma_min, p_drop):
    """Conditional flow matching with the optimal-transport path (Lipman et al. 2023; CosyVoice 2's flow):
    x_t = (1 - (1 - s) t) x0 + t x1 with x0 ~ N(0, I) and t = 1 - cos(pi/2 u), u ~ U(0, 1) (CosyVoice 2's
    cosine schedule: more training near the noise); the target velocity is x1 - (1 - s) x0. For p_drop of
    the examples the tokens and the speaker are zeroed, so the same network learns the unconditional field
    that classifier-free guidance subtracts at inference (CosyVoice 2's training_cfg_rate).
    codes: (B, N); x1: (B, 4N, M) normalised mel; mask: (B, 4N) True on real frames; MSE on those."""
    mu, spk = flow.cond(codes, spk_mel)
    t = 1 - torch.cos(0.5 * math.pi * torch.rand(x1.shape[0], device=x1.device))
    x0 = torch.randn_like(x1)
    keep = (torch.rand(x1.shape[0], device=x1.device) >= p_drop).to(mu.dtype)
    mu, spk = mu * keep[:, None, None], spk * keep[:, None]
    tt = t[:, None, None]
    xt = (1 - (1 - sigma_min) * tt) * x0 + tt * x1
    u = x1 - (1 - sigma_min) * x0
    v = flow.velocity(xt, t, mu, spk, mask[:, None, None, :])
    m = mask[..., None].float()
    return ((v.float() - u) ** 2 * m).sum() / (m.sum() * x1.shape[-1])


STFT_RES = ((512, 128, 512), (1024, 256, 1024), (256, 64, 256))  # (n_fft, hop, window) at 16 kHz


def vocoder_loss(wav, target, cfg):
    """The vocoder's objective without discriminators: L1 between ln-mels plus, at three resolutions, spectral
    convergence and log-magnitude L1 (Parallel WaveGAN's multi-resolution STFT loss)."""
    loss = F.l1_loss(voc_mel(wav, cfg), voc_mel(target, cfg))
    for n_fft, hop, win in STFT_RES:
        w = torch.hann_window(win, device=wav.device)
        S = lambda x: torch.stft(x.float(), n_fft, hop, win, w, return_complex=True).abs().clamp(min=1e-5)
        a, b = S(wav), S(target)
        loss = loss + (torch.linalg.norm(b - a) / torch.linalg.norm(b)
                       + F.l1_loss(a.log(), b.log())) / len(STFT_RES)
    return loss

# ----------------------------------------------------------------------------- data

GENDER_Q, PITCH_Q, RATE_Q = ("is the speaker male or female", "is the voice low medium or high",
                             "is the speech slow normal or fast")


def voice_attributes(speaker):
    """Paralinguistic labels of a built-in voice (it spoke the clip, so they are known): gender from eSpeak's
    variant (+f: female), pitch and speaking rate from the voice's settings."""
    name, pitch, wpm = common.ALL_VOICES[speaker]
    return dict(gender="female" if "+f" in name else "male",
                pitch="low" if pitch < 45 else "high" if pitch >= 60 else "medium",
                rate="slow" if wpm < 160 else "fast" if wpm >= 170 else "normal")


def dialogue_questions(utts, sr):
    """The user's questions in the dialogue corpus, cut from channel 0 at their word times,
    with the answer the assistant gave: [(wav, question, answer, None)] (no answer audio: the spoken task uses
    the question bank)."""
    out = []
    for u in utts:
        lines = [l.split(": ", 1) for l in u.text.split(" / ")]
        words, i = u.words[0], 0
        for (who, text), nxt in zip(lines, lines[1:] + [("", "")]):
            if who != "user":
                continue
            n = len(text.split())
            span, i = words[i:i + n], i + n
            if nxt[0] == "assistant" and text.startswith(("what", "how", "which")) and span:
                a, b = int(max(0.0, span[0][1] - 0.1) * sr), int((span[-1][2] + 0.1) * sr)
                out.append((u.wav[0, a:b].copy(), text, nxt[1], None))
    return out


def arithmetic(question):
    """'what is seven times eight' -> 'seven times eight' (the tool's argument), else None."""
    m = re.fullmatch(r"what is (.+ (?:plus|minus|times) .+)", question)
    return m.group(1) if m else None


def bank_questions():
    """Every question the dialogue corpus's script can ask (common's generator): the arithmetic questions over
    its operand ranges, and its ten facts. -> (arithmetic [(q, a)], facts [(q, a)])."""
    arith, seen = [], set()
    for op, f in (("plus", lambda a, b: a + b), ("times", lambda a, b: a * b), ("minus", lambda a, b: a - b)):
        for x in range(2, 13):
            for y in range(1, 13):
                a, b = (max(x, y), min(x, y)) if op == "minus" else (x, y)
                q = f"what is {common.number_words(a)} {op} {common.number_words(b)}"
                if q not in seen:
                    seen.add(q)
                    arith.append((q, f"{common.number_words(a)} {op} {common.number_words(b)} is "
                                     f"{common.number_words(f(a, b))}"))
    return arith, list(common.FACTS)


def bank_split(split):
    """The arithmetic questions of a split: a fixed 20 % held out for test and 10 % for val (never trained on,
    not even as text); the rest train. The facts are in every split (there are only ten)."""
    arith, facts = bank_questions()
    perm = np.random.default_rng(20).permutation(len(arith))
    n_test, n_val = len(arith) // 5, len(arith) // 10
    pick = dict(test=perm[:n_test], val=perm[n_test:n_test + n_val], train=perm[n_test + n_val:])[split]
    return [arith[i] for i in sorted(pick)], facts


_BANK = {}


def question_bank(split, cfg):
    """The spoken question bank (the held-out evaluation set of part 1, and the spoken answers of part 2):
    each question of bank_split(split) spoken by eSpeak as its own utterance in bank_voices voices, its answer
    spoken in the assistant's voice (answer_voice). Train and val are spoken by the training voices; test by
    the voice heard only in test (common.TEST_ONLY_SPEAKER) and bank_voices - 1 training voices, its facts by
    the test voice alone. -> [(wav, question, answer, answer wav)], 16 kHz float32."""
    key = (split, cfg.bank_size, cfg.bank_voices, cfg.answer_voice, cfg.sample_rate)
    if key in _BANK:
        return _BANK[key]
    arith, facts = bank_split(split)
    if cfg.bank_size:
        arith, facts = arith[:cfg.bank_size], facts[:max(1, cfg.bank_size // 4)]
    rng = np.random.default_rng([cfg.seed, ("train", "val", "test").index(split)])
    train_voices = [v for v in range(common.NUM_SPEAKERS) if v != common.TEST_ONLY_SPEAKER]
    jobs, items = [], []
    for q, a in arith + facts:
        if split == "test" and (q, a) in facts:
            voices = [common.TEST_ONLY_SPEAKER] * cfg.bank_voices
        elif split == "test":
            voices = [common.TEST_ONLY_SPEAKER] + list(rng.choice(train_voices,
                                                                  cfg.bank_voices - 1, replace=False))
        else:
            voices = list(rng.choice(train_voices, cfg.bank_voices, replace=False))
        for v in voices:
            jobs.append((q, int(v), int(rng.integers(-4, 5)), float(rng.uniform(-0.05, 0.05))))
            items.append((q, a))
    answers = sorted({a for _, a in items})
    jobs += [(a, cfg.answer_voice, 0, 0.0) for a in answers]
    wavs = [w.astype(np.float32) for w,
            _ in common.speak(jobs, sr=cfg.sample_rate, workers=min(2, os.cpu_count() or 1))]
    ans_wav = dict(zip(answers, wavs[len(items):]))
    _BANK[key] = [(w, q, a, ans_wav[a]) for w, (q, a) in zip(wavs, items)]
    return _BANK[key]


DRILL_FRAC = 0.25   # the share of tool drills among the text stage's chats (ours)


def tool_drill(rng):
    """A text-only calculator chat: operands 1-99 (half from the bank's 1-12), never a held-out question.
    There are thousands of them, so the answer can only be read off the tool's result, not remembered: without
    them the bank's few hundred questions are memorised and the result ignored (ours: the paper does not
    describe its tool data)."""
    def num():
        return int(rng.integers(1, 13) if rng.random() < 0.5 else rng.integers(13, 100))
    while True:
        op = ("plus", "minus", "times")[int(rng.integers(3))]
        a, b = num(), int(rng.integers(1, 13)) if op == "times" else num()   # times: the second is 1-12
        a, b = (max(a, b), min(a, b)) if op == "minus" else (a, b)
        call = f"{common.number_words(a)} {op} {common.number_words(b)}"
        if "what is " + call not in held_out_questions():
            return [("system", "tools: calculator"), ("human", "what is " + call),
                    ("assistant", f"<tool_call>{call}</tool_call>"), ("tool", calculator(call)),
                    ("assistant", f"{call} is {calculator(call)}")]


@functools.lru_cache(maxsize=None)
def held_out_questions():
    """The val and test arithmetic questions: kept out of every training source
    (the dialogue corpus has some)."""
    return {q for split in ("val", "test") for q, _ in bank_split(split)[0]}


class Tasks:
    """The training and evaluation examples of one split, built once from the corpora:
    (wav, turns, answer) per task. Every example's audio is one clip; turns follow render()'s format with
    ("audio", n) in place of it."""
    def __init__(self, cfg, split):
        speech = common.load_corpus(cfg, split, cfg.sample_rate, kind="speech")
        self.texts = [u.text for u in speech]
        # the built-in voices' attributes are known; a user's folder has none (no paralinguistic task then)
        self.speech = [(u.wav, u.text, None if cfg.data_dir else voice_attributes(u.speaker)) for u in speech]
        self.speakers = [u.speaker for u in speech]
        self.has_voices = not cfg.data_dir
        dia = [] if cfg.data_dir or split != "train" else common.load_corpus(cfg, split, cfg.sample_rate,
                                                                           kind="dialogue", mono=False)
        self.dialogue_texts = [u.text for u in dia]
        held = held_out_questions()
        # train: the dialogue corpus's questions (minus the held-out ones) and the bank's; val/test: the bank
        # only
        self.questions = [x for x in dialogue_questions(dia, cfg.sample_rate) if x[1] not in held]
        self.questions += [] if cfg.data_dir else question_bank(split, cfg)
        self.spoken = [x for x in self.questions if x[3] is not None]   # with answer audio: the spoken tasks

    def example(self, task, i, rng, cfg, speak=None):
        """(wav, turns, answer) of example i of `task` (rng picks among variants). speak:
        wav -> the interleaved run of a spoken answer (text ids + speech codes), for tasks
        answered in speech."""
        if task in ("asr", "para", "tts"):
            wav, text, attrs = self.speech[i % len(self.speech)]
            a = ("audio", len(wav))
            if task == "asr":
                return wav, [("human", [a, "transcribe the audio"]), ("assistant", text)], text
            if task == "tts":   # text in, speech out (§3.2's TTS data): the run of the clip's own tokens
                return None, [("human", "say this: " + text),
                              ("assistant", [("ids", speak(text, wav))])], text
            q, key = [(GENDER_Q, "gender"), (PITCH_Q, "pitch"), (RATE_Q, "rate")][int(rng.integers(3))]
            return wav, [("human", [a, q]), ("assistant", attrs[key])], attrs[key]
        pool = self.spoken if task in ("speak", "speak_followup") else self.questions
        wav, q, ans, ans_wav = pool[i % len(pool)]
        a, call = ("audio", len(wav)), arithmetic(q)
        # the calculator is offered to tool_frac of the questions (all by default), spoken answers
        # too (§3.4); only arithmetic calls it
        tools = task in ("qa", "speak", "speak_followup") and rng.random() < cfg.tool_frac
        system = ("system", "tools: calculator" if tools else "tools: none")
        turns = [system, ("human", [a])]
        if tools and call:  # §3.4 tool calling: the call, the tool's result as its own turn, then the answer
            turns += [("assistant", f"<tool_call>{call}</tool_call>"), ("tool", calculator(call))]
        if task in ("speak", "speak_followup"):   # a spoken answer: its text and speech tokens interleaved
            turns.append(("assistant", [("ids", speak(ans, ans_wav))]))
        else:
            turns.append(("assistant", ans))
        # multi-turn: the second question refers back to the first turn
        if task in ("followup", "speak_followup"):
            turns += [("human", "what was my question"), ("assistant", q)]
            ans = q
        return wav, turns, ans


def prompt_of(turns, task):
    """The prompt for a reply: the turns before the first assistant turn; a follow-up's, all but its last."""
    if task == "followup":
        return turns[:-1]
    return turns[:[r for r, _ in turns].index("assistant")]


def text_chats(tasks):
    """Stage 1's text: the corpus's sentences and its question/answer chats written out
    (the paper starts from a pretrained text LLM; this is that LLM's pretraining, in miniature)."""
    out = [[("human", "say something"), ("assistant", t)] for t in tasks.texts]
    for _, q, a, _ in tasks.questions:
        call = arithmetic(q)
        out.append([("system", "tools: none"), ("human", q), ("assistant", a)])
        if call:
            out.append([("system", "tools: calculator"), ("human", q),
                        ("assistant", f"<tool_call>{call}</tool_call>"),
                        ("tool", calculator(call)), ("assistant", a)])
    return out


def log_mel(wav, cfg):
    """One chunk (T,) float32 -> (n_mels, mel_frames(T)) Whisper log-mel."""
    return common.log_mel_spectrogram(torch.from_numpy(np.ascontiguousarray(wav)), cfg.n_mels,
                                      cfg.pad_samples)


def collate(examples, tok, cfg, rt, cache=None):
    """[(wav or None, turns)] -> a batch: token ids and labels (B, L) right-padded, and every audio chunk's
    mel (N, n_mels, T) with its real length, in prompt order. cache: {key: mel}, so each clip's mel is
    computed once."""
    seqs, mels = [], []
    for wav, turns in examples:
        seqs.append(render(turns, tok, cfg))
        if wav is not None:
            s = 0
            for n in chunk_lengths(len(wav), cfg):
                key = (id(wav), s, n)
                if cache is None or key not in cache:
                    mel = log_mel(wav[s:s + n], cfg)
                    if cache is None:
                        mels.append(mel)
                        s += n
                        continue
                    cache[key] = mel
                mels.append(cache[key])
                s += n
    L = max(len(i) for i, _ in seqs)
    ids = torch.tensor([i + [tok.pad] * (L - len(i)) for i, _ in seqs])
    labels = torch.tensor([l + [-100] * (L - len(l)) for _, l in seqs])
    batch = dict(ids=ids.to(rt.device), labels=labels.to(rt.device), mel=None, n_mel=None)
    if mels:
        T = max(m.shape[-1] for m in mels)
        batch["mel"] = torch.stack([F.pad(m, (0, T - m.shape[-1])) for m in mels]).to(rt.device)
        batch["n_mel"] = torch.tensor([mel_valid(m.shape[-1]) for m in mels], device=rt.device)  # official
    return batch


def run_iters(cfg):
    """The total steps of this run (--stage)."""
    return cfg.max_iters if cfg.stage == "speech" else cfg.llm_max_iters or cfg.max_iters


def plan(cfg):
    """The paper's stages this run trains, in order, with their steps: --stage=speech the encoder, tokenizer
    and flow, then the vocoder to the end; --stage=llm the text LLM, the adaptor, then SFT to the end."""
    its = dict(zip(STAGES, cfg.stage_iters))
    first = ("encoder", "tokenizer", "flow") if cfg.stage == "speech" else ("llm", "adaptor")
    last = "vocoder" if cfg.stage == "speech" else "sft"
    return [(s, its[s]) for s in first] + [(last, run_iters(cfg) - sum(its[s] for s in first))]


def stage_at(step, cfg):
    """The training stage of a step (0-based)."""
    names, ends = zip(*plan(cfg))
    return names[min(int(np.searchsorted(np.cumsum(ends), step, side="right")), len(names) - 1)]


def pad_frames(mel, n):
    """(M, T) -> (M, n): cut, or extended by repeating the last frame (a clip's mel is a frame or two short of
    4 frames per token)."""
    return mel[:, :n] if mel.shape[1] >= n else torch.cat([mel, mel[:, -1:].expand(-1, n - mel.shape[1])], 1)


class Sampler:
    """Draws each step's examples for its stage; its RNG is saved in the checkpoint (resume draws the same).
    From the tokenizer stage on the encoder is frozen, so a clip's encoder frames are computed once and kept
    (the tokenizer stage then trains on them: half its step time saved on a CPU), and so are its speech
    tokens (set .model first)."""
    def __init__(self, tasks, tok, cfg, rank=0, world_size=1):
        self.tasks, self.tok, self.cfg = tasks, tok, cfg
        self.chats = text_chats(tasks)
        self.rng = np.random.default_rng([cfg.seed, rank, world_size])
        # per clip: log-mel, frozen encoder frames, speech tokens, detokenizer mel
        self.mels, self.frames, self.codes, self.vmels = {}, {}, {}, {}
        self.model = None
        # the flow's clips: the speech corpus (its speakers) and the bank's answers (the assistant's voice)
        answers = {id(x[3]): x[3] for x in tasks.spoken}
        self.flow_clips = [(w, spk) for (w, _, _), spk in zip(tasks.speech, tasks.speakers)]
        self.flow_clips += [(w, cfg.answer_voice) for w in answers.values()]
        self.by_speaker = {}
        for i, (_, spk) in enumerate(self.flow_clips):
            self.by_speaker.setdefault(spk, []).append(i)

    def mel_of(self, w):
        key = (id(w), 0, chunk_lengths(len(w), self.cfg)[0])  # the first chunk (clips are shorter than one)
        if key not in self.mels:
            self.mels[key] = log_mel(w[: key[2]], self.cfg)
        return self.mels[key]

    def vmel_of(self, w):
        if id(w) not in self.vmels:
            self.vmels[id(w)] = voc_mel(torch.from_numpy(np.ascontiguousarray(w)), self.cfg)
        return self.vmels[id(w)]

    @torch.no_grad()
    def frames_of(self, w):
        """A clip's frames from the frozen encoder (25 Hz): (T', n_audio_state)."""
        if id(w) not in self.frames:
            m = self.mel_of(w)
            raw = common.unwrap(self.model)
            dev = next(raw.parameters()).device
            self.frames[id(w)] = raw.encoder(m[None].to(dev), torch.tensor([m.shape[-1]], device=dev))[0]
        return self.frames[id(w)]

    @torch.no_grad()
    def codes_of(self, w):
        """A clip's speech tokens (25 Hz) from the frozen encoder + tokenizer."""
        if id(w) not in self.codes:
            self.codes[id(w)] = common.unwrap(self.model).speech_tokenizer.codes(self.frames_of(w)).tolist()
        return self.codes[id(w)]

    def speak(self, text, wav):
        return interleave(self.tok.encode(text), self.codes_of(wav), self.tok, self.cfg.interleave)

    def next(self, stage, rt):
        cfg, tk, rng = self.cfg, self.tasks, self.rng
        if stage == "llm":                               # the text chats, DRILL_FRAC of them tool drills
            pick = lambda: self.chats[rng.integers(len(self.chats))]
            ex = [(None, tool_drill(rng) if rng.random() < DRILL_FRAC else pick())
                  for _ in range(cfg.batch_size)]
            return dict(collate(ex, self.tok, cfg, rt), stage=stage)
        # ASR (CTC): the encoder's pretraining on mels, then the tokenizer's on the frozen encoder's frames
        if stage in ("encoder", "tokenizer"):
            items = [tk.speech[int(rng.integers(len(tk.speech)))] for _ in range(cfg.batch_size)]
            mels = [self.mel_of(w) for w, _, _ in items]
            chars = [[CHARS.index(c) + 1 for c in common.normalize_text(t) if c in CHARS]
                     for _, t, _ in items]
            def pad(xs):                                 # B x (C, T_i) -> (B, C, T_max)
                T = max(x.shape[-1] for x in xs)
                return torch.stack([F.pad(x, (0, T - x.shape[-1])) for x in xs]).to(rt.device)
            batch = dict(stage=stage, n_mel=torch.tensor([m.shape[-1] for m in mels]),
                         chars=torch.tensor(sum(chars, [])), n_chars=torch.tensor([len(c) for c in chars]))
            if stage == "encoder":
                batch["mel"] = pad(mels)
            else:                                        # (B, T', D)
                batch["h"] = pad([self.frames_of(w).T for w, _, _ in items]).transpose(1, 2)
            return batch
        if stage == "flow":                              # tokens (+ a prompt of the same voice) -> mel crops
            codes, mels, spk = [], [], []
            for _ in range(cfg.batch_size):
                i = int(rng.integers(len(self.flow_clips)))
                w, s = self.flow_clips[i]
                c = self.codes_of(w)
                n = min(len(c), cfg.flow_max_codes)
                c0 = int(rng.integers(len(c) - n + 1))
                codes.append(torch.tensor(c[c0:c0 + n]))
                mels.append(pad_frames(self.vmel_of(w), 4 * len(c))[:, 4 * c0:4 * (c0 + n)].T)  # (4n, M)
                others = [j for j in self.by_speaker[s] if j != i] or [i]
                spk.append(self.vmel_of(self.flow_clips[others[int(rng.integers(len(others)))]][0]).mean(-1))
            N = max(len(c) for c in codes)
            mask = torch.tensor([[t < 4 * len(c) for t in range(4 * N)] for c in codes])
            return dict(stage=stage,
                        codes=torch.stack([F.pad(c, (0, N - len(c))) for c in codes]).to(rt.device),
                        x1=(torch.stack([F.pad(m, (0, 0, 0, 4 * N - len(m))) for m in mels]).to(rt.device)
                            - MEL_MEAN) / MEL_STD,
                        spk=(torch.stack(spk).to(rt.device) - MEL_MEAN) / MEL_STD, mask=mask.to(rt.device))
        if stage == "vocoder":                           # random crops of the speech corpus and their mels
            seg, wavs = cfg.voc_segment, []
            for _ in range(cfg.batch_size):
                w = tk.speech[int(rng.integers(len(tk.speech)))][0]
                w = np.pad(w, (0, max(0, seg - len(w))))
                s0 = int(rng.integers(len(w) - seg + 1)) // 160 * 160
                wavs.append(torch.from_numpy(np.ascontiguousarray(w[s0:s0 + seg])))
            wav = torch.stack(wavs).to(rt.device)
            return dict(stage=stage, wav=wav, mel=voc_mel(wav, cfg))
        mix = ["asr"] if stage == "adaptor" else (["asr"] + ["para"] * tk.has_voices + ["tts"] * 2 +
                                                  ["qa", "qa", "followup", "drill"] * bool(tk.questions) +
                                                  ["speak", "speak", "speak_followup"] * bool(tk.spoken))
        ex = []
        for _ in range(cfg.batch_size):
            task = mix[int(rng.integers(len(mix)))]
            if task == "drill":
                ex.append((None, tool_drill(rng)))
                continue
            n = dict(asr=len(tk.speech), para=len(tk.speech), tts=len(tk.speech), speak=len(tk.spoken),
                     speak_followup=len(tk.spoken)).get(task, len(tk.questions))
            wav, turns, _ = tk.example(task, int(rng.integers(n)), rng, cfg, speak=self.speak)
            ex.append((wav, turns))
        return dict(collate(ex, self.tok, cfg, rt, self.mels), stage=stage)

    def state_dict(self):
        return self.rng.bit_generator.state

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state


def audio_seconds(batch, cfg):
    """Seconds of audio a batch holds (for the progress line's audio-s/s)."""
    if batch.get("n_mel") is not None:
        return float(batch["n_mel"].sum()) / 100
    if "wav" in batch:
        return batch["wav"].numel() / cfg.sample_rate
    return float(batch["mask"].sum()) / 100 if "mask" in batch else 0.0


def get_batch(sampler, cfg, rt, step):
    return sampler.next(stage_at(step, cfg), rt)

# ----------------------------------------------------------------------------- train

def build_tokenizer(cfg, tasks):
    texts = tasks.texts + tasks.dialogue_texts + [GENDER_Q, PITCH_Q, RATE_Q, "transcribe the audio",
                                                  "say something",
                                                  "what was my question", "tools: calculator", "tools: none",
                                                  "system human assistant tool",
                                                  "male female low medium high "
                                                  "slow normal fast error", "say this"]
    return Tokenizer(common.train_bpe([" " + t for t in texts] + texts, cfg.bpe_vocab), n_codes(cfg))


def n_codes(cfg):
    return int(np.prod(cfg.fsq_levels))


def trainable(stage, model):
    """What each stage trains (§3.2-3.4): the LLM alone (text), the encoder and its CTC head
    (ASR pretraining), the adaptor alone (alignment: encoder and LLM frozen), the speech tokenizer (on the
    frozen encoder), the flow, the vocoder, then adaptor + LLM (SFT, text and speech answers; the encoder and
    the speech parts stay frozen)."""
    parts = dict(llm=[model.model], encoder=[model.encoder, model.ctc_head], adaptor=[model.adapter],
                 tokenizer=[model.speech_tokenizer], flow=[model.flow], vocoder=[model.vocoder],
                 sft=[model.adapter, model.model])[stage]
    return {id(p) for m in parts for p in m.parameters()}


def lr_lambda(cfg):
    """A linear warm-up at the start of each stage; a stage whose parameters are final (the encoder, the
    tokenizer, the flow, the vocoder, SFT) then decays with a cosine to 10 % at its end, while the text LLM
    and the adaptor, which SFT trains on, stay constant (ours: at a constant rate the speech parts' last
    iterate was noisy and resynthesis lost words; decaying the LLM's text stage cost SFT its tool answers)."""
    names, its = zip(*plan(cfg))
    starts = [0] + [int(e) for e in np.cumsum(its)][:-1]

    def f(step):
        s = max(i for i, b in enumerate(starts) if step >= b)
        warm = min(1.0, (step - starts[s] + 1) / max(1, cfg.warmup_iters))
        if names[s] in ("llm", "adaptor"):
            return float(warm)
        frac = (step - starts[s]) / max(1, its[s])
        return float(warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))))
    return f


def build(cfg, rt):
    model = StepAudio(cfg).to(rt.device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=cfg.weight_decay),
                             dict(params=rest, weight_decay=0.0)], lr=cfg.lr, betas=cfg.betas)
    return dict(model=model, opt=opt, sched=torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))


def train_step(state, batch, cfg, rt):
    """One AdamW step of the batch's stage: only that stage's parameters get gradients."""
    model, opt = state["model"], state["opt"]
    raw = common.unwrap(model)
    with rt.autocast():
        if batch["stage"] == "encoder":
            logits = model(mel=batch["mel"], n_mel=batch["n_mel"], ctc=True)
            loss = ctc_loss(logits, batch["n_mel"], batch["chars"], batch["n_chars"])
        elif batch["stage"] in ("tokenizer", "flow", "vocoder"):
            loss = model(batch=batch, cfg=cfg)
        else:
            logits = model(batch["ids"], batch["mel"], batch["n_mel"], raw.tok.patch,
                           keep=trained(batch["labels"]))   # (K, V): the trained positions only
            loss = lm_loss(logits, batch["labels"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    keep = trainable(batch["stage"], raw)
    for p in raw.parameters():                           # a frozen part gets no update, not even weight decay
        if id(p) not in keep:
            p.grad = None
    norm = torch.nn.utils.clip_grad_norm_([p for p in raw.parameters() if p.grad is not None], cfg.grad_clip)
    opt.step()
    state["sched"].step()
    return {batch["stage"]: loss.detach(), "grad_norm": norm}


def load_for_inference(cfg, rt):
    """Our checkpoint: the model with its tokenizer (stored in the checkpoint). No official weights."""
    ckpt = common.load_checkpoint(common.checkpoint_path(cfg))
    if not common.is_ours(ckpt):
        raise SystemExit("error: not a nanoaudio step_audio checkpoint "
                         "(official Step-Audio 2 weights are not mapped)")
    tok = Tokenizer(common.ranks_from_text(ckpt["extra"]["tokenizer"]), n_codes(cfg))
    model = StepAudio(cfg).to(rt.device)
    common.load_models(ckpt, cfg, {"model": model}, ARCH_KEYS)
    model.tok = tok
    return model.eval()


def slot_masks(tok, device):
    """The tokens each kind of slot of a spoken answer may hold: text (the BPE ranks, <tts_pad>, <tts_end>)
    and audio (the speech tokens and the audio pad). Decoding under them keeps the interleave's
    fixed pattern."""
    text = torch.zeros(tok.n_vocab, dtype=torch.bool, device=device)
    text[:tok.ids["<|endoftext|>"]] = True
    text[[tok.tts_pad, tok.tts_end]] = True
    audio = torch.zeros_like(text)
    audio[tok.audio_base:tok.audio_pad + 1] = True
    return dict(text=text, audio=audio)


@torch.no_grad()
def generate(model, tok, turns, wav, cfg, rt, speech=False):
    """Greedy decoding of one assistant turn with a KV cache: prefill the prompt (audio features written over
    the placeholders; wav: one clip, or a list of the prompt's clips in order), then one token at a time until
    <|EOT|>. speech: the turn opens with <tts_start> (how the official code asks for a spoken reply) and each
    slot is decoded under its kind's mask until <tts_end>. Returns the generated ids
    (with the <tts_*> markers)."""
    ids, _ = render(turns, tok, cfg, generate=True)
    ids = torch.tensor([ids + [tok.tts_start] * speech], device=rt.device)
    wavs = [] if wav is None else wav if isinstance(wav, list) else [wav]
    feats = []
    if wavs:
        b = collate([(w, []) for w in wavs], tok, cfg, rt)
        feats = model.audio_features(b["mel"], b["n_mel"])
    limit = cfg.max_speech_tokens if speech else cfg.max_new_tokens
    cache = KVCache(cfg, 1, ids.shape[1] + limit, rt.device, next(model.parameters()).dtype)
    masks = slot_masks(tok, rt.device) if speech else None
    with rt.autocast():
        logits = model.model(model.embed(ids, feats, tok.patch), 0, cache)
        out = [tok.tts_start] if speech else []
        for k in range(limit):
            lg = logits[0, -1].float()
            if speech:
                lg = lg.masked_fill(~masks[slot_kind(k, cfg.interleave)], float("-inf"))
            nxt = int(lg.argmax())
            if nxt == tok.eot:
                break
            out.append(nxt)
            if speech and nxt == tok.tts_end:
                break
            logits = model.model(model.model.embed_tokens(torch.tensor([[nxt]], device=rt.device)),
                                 cache.length, cache)
    if speech and out[-1] != tok.tts_end:                 # cut at the limit: close the run
        out.append(tok.tts_end)
    return out


def speak(model, tok, turns, wav, cfg, rt, noise_seed=0, tools=False):
    """A spoken reply: the interleaved run, its text, its speech tokens, and the detokenized mel and waveform
    (in the assistant's voice, model.answer_voice). tools: a text reply comes first; if it is a <tool_call>,
    the call and its result join the turns (returned as "turns") before the spoken run (§3.4)."""
    if tools:
        reply = tok.decode(generate(model, tok, turns, wav, cfg, rt))
        m = re.fullmatch(r"<tool_call>(.*)</tool_call>\s*", reply)
        if m:
            turns = turns + [("assistant", m.group(0).strip()), ("tool", calculator(m.group(1).strip()))]
    run = generate(model, tok, turns, wav, cfg, rt, speech=True)
    text_ids, codes = deinterleave(run, tok)
    dev = rt.device
    if codes:
        g = torch.Generator(device="cpu").manual_seed(noise_seed)
        noise = torch.randn(1, 4 * len(codes), cfg.n_voc_mels, generator=g).to(dev)
        mel, audio = model.detokenize(torch.tensor(codes, device=dev), model.answer_voice, cfg, noise)
    else:
        mel, audio = torch.zeros(cfg.n_voc_mels, 0), torch.zeros(0)
    return dict(run=run, text=tok.decode(text_ids).strip(), codes=codes, mel=mel,
                wav=audio.float().cpu().numpy(), turns=turns)


def respond(model, tok, turns, wav, cfg, rt, tools=True):
    """One assistant reply, running the tool loop: a reply that is a <tool_call> is executed,
    its result appended as a tool turn, and the assistant continues. Returns
    (final text, the call or None)."""
    reply = tok.decode(generate(model, tok, turns, wav, cfg, rt))
    m = re.fullmatch(r"<tool_call>(.*)</tool_call>\s*", reply)
    if not (tools and m):
        return reply.strip(), None
    turns = turns + [("assistant", reply), ("tool", calculator(m.group(1).strip()))]
    return tok.decode(generate(model, tok, turns, wav, cfg, rt)).strip(), m.group(1).strip()


@torch.no_grad()
def evaluate(cfg, model=None, rt=None, samples_dir=None, split="test"):
    """Held-out accuracy of each skill (exact match, normalised): ASR WER; paralinguistic accuracy per
    attribute; spoken QA on the question bank without tools; tool-call accuracy and final answers with the
    calculator (and without it, on the same questions); the multi-turn follow-up. Speech output, on
    eval_speech_items of them: the spoken answer's text, the follow-up after a spoken answer, the resynthesis
    mel distance of held-out speech (tokens -> flow -> vocoder, and the vocoder alone from the true mel) and
    the tokenizer's own CTC WER. Writes the spoken answers, the resyntheses, the vocoder's copies and their
    originals as wavs with a refs.txt (name<TAB>intended text) per folder, for the WER of a separate ASR model
    (whisper.py --mode=sample --input_dir=DIR prints it). A --stage=speech model (no LLM yet): the resynthesis
    and the tokenizer's CTC WER alone."""
    if model is None:
        rt = common.setup(cfg)
        model = load_for_inference(cfg, rt)
    tok, was = model.tok, model.training
    model.eval()
    tasks, rng, n, ns = Tasks(cfg, split), np.random.default_rng(0), cfg.eval_items, cfg.eval_speech_items
    out = samples_dir or os.path.join(cfg.out_dir, f"eval_{split}")
    if cfg.stage == "speech":
        m_out = evaluate_speech(cfg, model, rt, tasks, ns, out)
        model.train(was)
        common.log(f"eval ({split}) | " + " | ".join(f"{k} {v:.3f}" for k, v in m_out.items()))
        return m_out
    norm = common.normalize_text
    refs, hyps, m = [], [], {}
    for i in range(min(n, len(tasks.speech))):
        wav, text, attrs = tasks.speech[i]
        refs.append(text)
        hyps.append(respond(model, tok,
                            [("human", [("audio", len(wav)), "transcribe the audio"])], wav, cfg, rt)[0])
        for q, key in ((GENDER_Q, "gender"), (PITCH_Q, "pitch"), (RATE_Q, "rate")) if attrs else ():
            got = respond(model, tok, [("human", [("audio", len(wav)), q])], wav, cfg, rt)[0]
            m.setdefault(f"para_{key}", []).append(norm(got) == attrs[key])
    m_out = dict(wer=common.wer(refs, hyps))
    order = np.random.default_rng(0).permutation(len(tasks.questions))[:n]  # arithmetic and facts mixed
    rows = ["question\tanswer\tno tools\twith tools\tfollow-up"]  # every item, for a look (or other subsets)
    for j, i in enumerate(order):
        wav, q, ans, _ = tasks.questions[i]
        a = ("audio", len(wav))
        got, _ = respond(model, tok, [("system", "tools: none"), ("human", [a])], wav, cfg, rt, tools=False)
        m.setdefault("qa_acc", []).append(norm(got) == norm(ans))
        call = arithmetic(q)
        if call:
            tgot, made = respond(model, tok, [("system", "tools: calculator"), ("human", [a])], wav, cfg, rt)
            m.setdefault("tool_call_acc", []).append(made == call)
            m.setdefault("tool_answer_acc", []).append(norm(tgot) == norm(ans))
            m.setdefault("no_tool_answer_acc", []).append(m["qa_acc"][-1])
        _, turns, _ = tasks.example("followup", int(i), rng, cfg)
        follow, _ = respond(model, tok, prompt_of(turns, "followup"), wav, cfg, rt, tools=False)
        m.setdefault("followup_acc", []).append(norm(follow) == norm(q))
        rows.append(f"{q}\t{ans}\t{got}\t{tgot if call else ''}\t{follow}")
        if samples_dir is not None and j < 2:
            common.save_sample(samples_dir, f"question{j}", wav, cfg.sample_rate)
            with open(os.path.join(samples_dir, f"question{j}.txt"), "w") as f:
                f.write(f"question: {q}\nexpected: {ans}\nanswer (no tools): {got}\nfollow-up: {follow}\n")
    m_out.update({k: float(np.mean(v)) for k, v in m.items()})
    m_out.update(n_clips=len(refs), n_questions=len(order))  # how many items each figure is over
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "qa.tsv"), "w") as f:
        f.write("".join(r + "\n" for r in rows))
    m_out.update(evaluate_speech(cfg, model, rt, tasks, ns, out))
    model.train(was)
    common.log(f"eval ({split}) | " + " | ".join(f"{k} {v:.3f}" for k, v in m_out.items()))
    return m_out


def evaluate_speech(cfg, model, rt, tasks, ns, out):
    """The speech-output half of evaluate() (see there)."""
    tok, norm, m = model.tok, common.normalize_text, {}
    spoken_dir, resyn_dir, orig_dir, voc_dir = (os.path.join(out, d)
                                                for d in ("spoken", "resynth", "original", "vocoded"))
    for d in (spoken_dir, resyn_dir, orig_dir, voc_dir)[cfg.stage == "speech":]:
        os.makedirs(d, exist_ok=True)
    lines = []
    order = np.random.default_rng(1).permutation(len(tasks.spoken))[:ns] if cfg.stage == "llm" else []
    for j, i in enumerate(order):
        wav, q, ans, _ = tasks.spoken[i]
        turns = [("system", "tools: calculator"), ("human", [("audio", len(wav))])]
        r = speak(model, tok, turns, wav, cfg, rt, noise_seed=j, tools=True)
        m.setdefault("speak_text_acc", []).append(norm(r["text"]) == norm(ans))
        history = r["turns"] + [("assistant", [("ids", r["run"])]), ("human", "what was my question")]
        follow, _ = respond(model, tok, history, wav, cfg, rt, tools=False)
        m.setdefault("speak_followup_acc", []).append(norm(follow) == norm(q))
        if len(r["wav"]):
            common.save_audio(os.path.join(spoken_dir, f"answer{j:03d}.wav"), r["wav"], cfg.sample_rate)
            # the text it meant to say, and the right answer
            lines.append(f"answer{j:03d}\t{r['text']}\t{ans}")
    if len(order):
        with open(os.path.join(spoken_dir, "refs.txt"), "w") as f:
            f.write("".join(l + "\n" for l in lines))
    lines, hyps, refs = [], [], []
    for j in range(min(ns, len(tasks.speech))):
        wav, text, _ = tasks.speech[j]
        mel = log_mel(wav[:chunk_lengths(len(wav), cfg)[0]], cfg)[None].to(rt.device)
        n_mel = torch.tensor([mel.shape[-1]], device=rt.device)
        resyn = resynthesize(model, wav, cfg, rt, seed=j)
        copy = model.vocoder(voc_mel(torch.from_numpy(wav).to(rt.device), cfg)[None])[0]
        ref = torch.from_numpy(wav)
        m.setdefault("resynth_mel_dist", []).append(common.mel_distance(resyn.cpu(), ref, cfg.sample_rate))
        m.setdefault("vocoder_mel_dist", []).append(common.mel_distance(copy.cpu(), ref, cfg.sample_rate))
        with torch.no_grad():                            # the tokenizer's own ASR (greedy CTC over its codes)
            ctc = model.speech_tokenizer(model.encoder(mel, n_mel), n_mel)[0].argmax(-1).tolist()
        hyps.append("".join(CHARS[c - 1] for k, c in enumerate(ctc) if c and (k == 0 or c != ctc[k - 1])))
        refs.append(text)
        common.save_audio(os.path.join(resyn_dir, f"resynth{j:03d}.wav"), resyn.float().cpu().numpy(),
                          cfg.sample_rate)
        # the vocoder alone from the true mel: the most any resynthesis through it can keep
        common.save_audio(os.path.join(voc_dir, f"resynth{j:03d}.wav"), copy.float().cpu().numpy(),
                          cfg.sample_rate)
        # the ASR's yardstick
        common.save_audio(os.path.join(orig_dir, f"resynth{j:03d}.wav"), wav, cfg.sample_rate)
        lines.append(f"resynth{j:03d}\t{text}")
    for d in (resyn_dir, orig_dir, voc_dir):
        with open(os.path.join(d, "refs.txt"), "w") as f:
            f.write("".join(l + "\n" for l in lines))
    out_m = {k: float(np.mean(v)) for k, v in m.items()}
    out_m.update(tokenizer_ctc_wer=common.wer(refs, hyps) if refs else float("nan"), n_spoken=len(order))
    return out_m


def speech_checkpoint(cfg):
    """--stage=llm from scratch: the speech checkpoint it starts from, whose config fixes the architecture."""
    ckpt = common.load_checkpoint(cfg.speech) if os.path.isfile(cfg.speech) else None
    if not (common.is_ours(ckpt) and ckpt["paper"] == "step_audio"
            and ckpt["config"].get("stage") == "speech"):
        raise SystemExit(f"error: --stage=llm starts from a step_audio --stage=speech checkpoint; "
                         f"--speech={cfg.speech!r} is not one (train it with python step_audio.py)")
    changed = [f"{k} {getattr(cfg, k)!r} -> {ckpt['config'][k]!r}" for k in ARCH_KEYS
               if common._norm(getattr(cfg, k)) != common._norm(ckpt["config"][k]) and k != "vocab_size"]
    for k in ARCH_KEYS:
        setattr(cfg, k, common._from_json(ckpt["config"][k], getattr(cfg, k)))
    if changed:
        common.log(f"--speech={cfg.speech} fixes the architecture: " + "; ".join(changed))
    return ckpt


@torch.no_grad()
def resynthesize(model, wav, cfg, rt, seed=0):
    """A wav (T,) through the speech side alone: its speech tokens (each 25 s chunk's), then flow matching
    with the clip's own mean mel as the voice, then the vocoder -> (about T,)."""
    codes = []
    size = int(cfg.chunk_seconds * cfg.sample_rate)
    for s, n in zip(range(0, len(wav), size), chunk_lengths(len(wav), cfg)):
        mel = log_mel(wav[s:s + n], cfg)[None].to(rt.device)
        codes.append(model.speech_codes(mel, torch.tensor([mel.shape[-1]], device=rt.device))[0])
    codes = torch.cat(codes)
    spk = voc_mel(torch.from_numpy(wav).to(rt.device), cfg).mean(-1)
    noise = torch.randn(1, 4 * len(codes), cfg.n_voc_mels, generator=torch.Generator().manual_seed(seed))
    return model.detokenize(codes, spk, cfg, noise.to(rt.device))[1]


def train(cfg):
    rt = common.setup(cfg)
    speech = speech_checkpoint(cfg) if cfg.stage == "llm" and cfg.init_from == "scratch" else None
    cfg = dataclasses.replace(cfg, max_iters=run_iters(cfg))   # the loop runs to max_iters
    tasks, val = Tasks(cfg, "train"), Tasks(cfg, "val")
    common.check_clips([w for w, _, _ in tasks.speech], 1600, "train split")
    common.check_clips([w for w, _, _ in val.speech], 1600, "val split")
    tok = build_tokenizer(cfg, tasks)
    ckpt = speech or (common.load_checkpoint(common.checkpoint_path(cfg)) if cfg.init_from != "scratch"
                      else {})
    if common.is_ours(ckpt) and "tokenizer" in ckpt.get("extra", {}):   # keep the checkpoint's tokenizer
        tok = Tokenizer(common.ranks_from_text(ckpt["extra"]["tokenizer"]), n_codes(cfg))
    # the corpus BPE decides the vocabulary (stored in the config)
    if cfg.vocab_size == 0:
        cfg.vocab_size = tok.n_vocab
    state = build(cfg, rt)
    state["model"].tok = tok
    common.log(f"StepAudio {common.count_params(state['model']) / 1e6:.2f} M params, "
               f"vocabulary {tok.n_vocab} ({tok.n_codes} speech tokens); --stage={cfg.stage}: "
               + ", ".join(f"{s} {n} steps" for s, n in plan(cfg)))
    sampler = Sampler(tasks, tok, cfg, rt.rank, rt.world_size)
    step = common.init_from(cfg, state, sampler=sampler, arch_keys=ARCH_KEYS)
    sched = state["sched"]     # the last cosine ends at max_iters: a new one on resume sets this step's lr
    for g, base, f in zip(state["opt"].param_groups, sched.base_lrs, sched.lr_lambdas):
        g["lr"] = base * f(step)
    raw = state["model"]
    if speech:                                           # the encoder, tokenizer, flow and vocoder, trained
        common.load_models(speech, cfg, {"model": raw}, ARCH_KEYS)
        common.log(f"initialized the model from {cfg.speech} (its speech stage)")
    # the assistant's voice: the mean mel of an answer it spoke
    if tasks.spoken and step == 0 and cfg.stage == "speech":
        raw.answer_voice.copy_(voc_mel(torch.from_numpy(tasks.spoken[0][3]), cfg).mean(-1))
    sampler.model = raw
    state["model"] = common.wrap_ddp(common.compile(raw, cfg), rt, find_unused_parameters=True)
    common.train_loop(cfg, rt, state, step, train_step, lambda step: get_batch(sampler, cfg, rt, step),
                      lambda samples: evaluate(cfg, raw, rt, samples, split="val"), sampler=sampler,
                      audio_seconds=lambda batch: audio_seconds(batch, cfg),
                      extra={"tokenizer": tok.ranks_text})

# ----------------------------------------------------------------------------- sample

@torch.no_grad()
def sample(cfg):
    """--input with --prompt: a text answer to the prompt about the audio (with the calculator if --tools).
    --input alone: the wav is a spoken question, answered in speech (--speak; else in text); --followup: a
    second spoken question asked after that answer, with the first question and the spoken answer's run in the
    history. No --input: held-out examples of every task, and a two-turn spoken conversation. Writes each
    answer's wav + png and the conversation as text beside them."""
    rt = common.setup(cfg)
    model = load_for_inference(cfg, rt)
    tok, out = model.tok, os.path.join(cfg.out_dir, "samples")
    os.makedirs(out, exist_ok=True)
    if cfg.stage == "speech":            # no LLM yet: the speech side alone, tokens -> flow -> vocoder
        clips = ([(os.path.splitext(os.path.basename(cfg.input))[0],
                   common.load_audio(cfg.input, sr=cfg.sample_rate)[0])] if cfg.input else
                 [(f"speech{k}", w) for k, (w, _, _) in enumerate(Tasks(cfg, "test").speech[:2])])
        for name, wav in clips:
            resyn = resynthesize(model, wav, cfg, rt).float().cpu().numpy()
            common.save_sample(out, name + "_resynth", resyn, cfg.sample_rate, ref=wav)
            common.log(f"resynthesis of {name}: wrote {os.path.join(out, name)}_resynth.wav/.png")
        return
    text_items, spoken = [], []
    if cfg.input:
        wav, _ = common.load_audio(cfg.input, sr=cfg.sample_rate)
        name = os.path.splitext(os.path.basename(cfg.input))[0]
        text_answer = bool(cfg.prompt) or not cfg.speak
        system = ("system", "tools: calculator" if cfg.tools else "tools: none")
        if text_answer:
            text_items.append((name, wav,
                               [system,
                                ("human", [("audio", len(wav))] + ([cfg.prompt] if cfg.prompt else []))]))
        else:
            spoken.append((name, wav))
            if cfg.followup:
                spoken.append((os.path.splitext(os.path.basename(cfg.followup))[0],
                               common.load_audio(cfg.followup, sr=cfg.sample_rate)[0]))
    else:
        tasks, rng = Tasks(cfg, "test"), np.random.default_rng(0)
        for task in ("asr", "para", "qa", "followup"):
            if task in ("qa", "followup") and not tasks.questions:
                continue
            wav, turns, _ = tasks.example(task, 0, rng, cfg)
            text_items.append((f"{task}0", wav, prompt_of(turns, task)))
        spoken = [(f"spoken{k}",
                   tasks.spoken[k][0]) for k in range(min(2, len(tasks.spoken)))] if cfg.speak else []
    for name, wav, turns in text_items:
        answer, call = respond(model, tok, turns, wav, cfg, rt, tools=cfg.tools)
        shown = " | ".join(f"{r}: " + (c if isinstance(c, str)
                                       else " ".join(x if isinstance(x, str) else "<audio>" for x in c))
                           for r, c in turns)
        text = f"{shown}\n" + (f"tool call: {call}\n" if call else "") + f"assistant: {answer}\n"
        common.save_sample(out, name, wav, cfg.sample_rate)
        with open(os.path.join(out, name + ".txt"), "w") as f:
            f.write(text)
        common.log(text.rstrip() + f"\n(wrote {os.path.join(out, name)}.wav/.png/.txt)")
    # a spoken conversation: the history keeps every turn (tool calls and results too)
    turns, wavs = [("system", "tools: calculator" if cfg.tools else "tools: none")], []
    for k, (name, wav) in enumerate(spoken):
        turns, wavs = turns + [("human", [("audio", len(wav))])], wavs + [wav]
        r = speak(model, tok, turns, wavs, cfg, rt, noise_seed=k, tools=cfg.tools)
        tool = "".join(f"{role}: {c}\n" for role, c in r["turns"][len(turns):])   # a call and its result
        turns = r["turns"] + [("assistant", [("ids", r["run"])])]
        common.save_sample(out, name, wav, cfg.sample_rate)
        text = (f"turn {k + 1}: human: <audio {name}.wav>\n{tool}"
                f"assistant (spoken, {len(r['codes'])} speech tokens, "
                f"{len(r['wav']) / cfg.sample_rate:.2f} s): {r['text']}\n")
        if len(r["wav"]):
            common.save_sample(out, name + "_answer", r["wav"], cfg.sample_rate)
        with open(os.path.join(out, name + "_answer.txt"), "w") as f:
            f.write(text)
        common.log(text.rstrip() + f"\n(wrote {os.path.join(out, name)}_answer.wav/.png/.txt)")
    # and a text follow-up that refers back to the first turn
    if spoken:
        follow, _ = respond(model, tok, turns + [("human", "what was my question")], wavs, cfg,
                            rt, tools=False)
        common.log(f"human: what was my question\nassistant: {follow}")

# ----------------------------------------------------------------------------- bench

def bench(cfg):
    """SFT train step on random audio, prefill of bench_seconds of audio (chunked) and cached decoding
    tokens/s at batch 1, eager and (when common.compile compiles) compiled; FLOP rate against the
    device's peak."""
    rt = common.setup(cfg)
    if cfg.vocab_size == 0:
        cfg.vocab_size = cfg.bpe_vocab + len(SPECIALS) + n_codes(cfg) + 1
    # byte-level ranks: ids only matter for shapes
    tok = Tokenizer({bytes([i]): i for i in range(256)}, n_codes(cfg))
    cfg.vocab_size = max(cfg.vocab_size, tok.n_vocab)
    state = build(cfg, rt)
    model = state["model"]
    model.tok = tok
    rng = np.random.default_rng(0)
    seg = int(min(cfg.chunk_seconds, 5.0) * cfg.sample_rate)
    ex = [(0.1 * rng.standard_normal(seg).astype(np.float32),
           [("human", [("audio", seg), "transcribe the audio"]), ("assistant", "a b c d e f g h")])
          for _ in range(cfg.batch_size)]
    batch = dict(collate(ex, tok, cfg, rt), stage="sft")
    flops = common.count_flops(lambda: train_step(state, batch, cfg, rt))
    ms = common.timeit(lambda: train_step(state, batch, cfg, rt), iters=cfg.bench_iters, warmup=1)
    figures = dict(train_step_ms=ms, train_audio_s_per_s=cfg.batch_size * seg / cfg.sample_rate / (ms / 1e3),
                   train_flops_per_step=flops)
    model.eval()
    wav = 0.1 * rng.standard_normal(int(cfg.bench_seconds * cfg.sample_rate)).astype(np.float32)
    turns = [("human", [("audio", len(wav)), "transcribe the audio"])]
    ids = torch.tensor([render(turns, tok, cfg, generate=True)[0]], device=rt.device)
    b = collate([(wav, [])], tok, cfg, rt)
    n_new = 32
    dtype = next(model.parameters()).dtype

    def prefill(llm):
        with torch.no_grad(), rt.autocast():
            cache = KVCache(cfg, 1, ids.shape[1] + n_new + 1, rt.device, dtype)
            llm(model.embed(ids, model.audio_features(b["mel"], b["n_mel"]), tok.patch), 0, cache)
            return cache

    def decode(llm):
        cache = prefill(llm)
        with torch.no_grad(), rt.autocast():
            x = model.model.embed_tokens(ids[:, -1:])
            for _ in range(n_new):
                llm(x, cache.length, cache)
    figures["prefill_ms"] = common.timeit(lambda: prefill(model.model), iters=cfg.bench_iters, warmup=1)
    figures["prefill_tokens"] = ids.shape[1]
    t = common.timeit(lambda: decode(model.model), iters=cfg.bench_iters, warmup=1) - figures["prefill_ms"]
    figures["decode_tokens_per_s"] = n_new / max(t, 1e-6) * 1e3
    compiled = common.compile(model.model, cfg)
    if compiled is not model.model:
        tc = common.timeit(lambda: decode(compiled), iters=cfg.bench_iters, warmup=1) - figures["prefill_ms"]
        figures["decode_tokens_per_s_compiled"] = n_new / max(tc, 1e-6) * 1e3
    # a spoken answer to a 3 s spoken question: prefill, the interleaved run (n text + m audio slots per
    # group), then flow matching (flow_steps) and the vocoder. Time to first audio: the first second of speech
    # (25 tokens) decoded and synthesised; real-time factor: 4 s of speech, end to end, over 4 s.
    qwav = 0.1 * rng.standard_normal(3 * cfg.sample_rate).astype(np.float32)
    q_ids = render([("human", [("audio", len(qwav))])], tok, cfg, generate=True)[0] + [tok.tts_start]
    q_ids = torch.tensor([q_ids], device=rt.device)
    qb = collate([(qwav, [])], tok, cfg, rt)
    n_txt, n_aud = cfg.interleave

    def spoken(n_codes):
        n_tok = n_codes // n_aud * (n_txt + n_aud)
        with torch.no_grad(), rt.autocast():
            cache = KVCache(cfg, 1, q_ids.shape[1] + n_tok + 1, rt.device, dtype)
            x = model.embed(q_ids, model.audio_features(qb["mel"], qb["n_mel"]), tok.patch)
            logits = model.model(x, 0, cache)
            for _ in range(n_tok):
                nxt = logits[:, -1:].argmax(-1)
                logits = model.model(model.model.embed_tokens(nxt), cache.length, cache)
            codes = torch.randint(0, tok.n_codes, (n_codes,), device=rt.device)
            return model.detokenize(codes, model.answer_voice, cfg)[1]
    figures["time_to_first_audio_ms"] = common.timeit(lambda: spoken(25), iters=cfg.bench_iters, warmup=1)
    figures["spoken_rtf"] = common.timeit(lambda: spoken(100), iters=cfg.bench_iters, warmup=1) / 4000.0
    common.report_bench(cfg, rt, model=model, compiled=compiled is not model.model, **figures)

# ----------------------------------------------------------------------------- main

if __name__ == "__main__":
    cfg = common.parse_config(Config, PRESETS)
    {"train": train, "sample": sample, "eval": evaluate, "bench": bench}[cfg.mode](cfg)
