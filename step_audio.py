"""
Step-Audio 2 Technical Report (StepFun Audio Team, 2025) — https://arxiv.org/abs/2507.16632
Part 1: an audio LLM that listens.

The idea: one decoder-only LLM understands speech end to end. A Whisper-style audio encoder (pretrained on ASR,
then frozen) turns 25 s chunks of 128-bin log-mel into 25 Hz features; an adaptor (a stride-2 conv and a two-layer
MLP, §3.1) brings them to 12.5 Hz in the LLM's width, and they overwrite placeholder tokens inside an ordinary chat
prompt. The LLM (Qwen2.5-style: RMSNorm, RoPE, SwiGLU, grouped-query attention) then answers in text: it
transcribes, answers spoken questions, tells what the voice sounds like (paralinguistics), calls tools and keeps
a multi-turn history, all from one next-token loss on the assistant turns. Training follows the paper's stages in
miniature (§3.2-3.4): a text LLM first, the encoder pretrained on ASR and frozen, the adaptor aligned on ASR with
the LLM frozen, then supervised fine-tuning on a task mixture.

Simplified or changed versus the paper (this file is the listening half; speech output is part 2):
- every stage is miniature and runs on the built-in corpus: the text LLM is pretrained on the corpus's own
  transcripts and chat texts (the paper starts from Qwen2.5), the encoder on ASR with a CTC head (the paper also
  uses speaker and audio-event tasks), and the SFT mixture is ASR, spoken QA from the dialogue corpus, three
  paralinguistic questions (gender, pitch, speaking rate: labels from the eSpeak voice that spoke), a calculator
  tool for the arithmetic questions, and a follow-up turn that refers back to the first; the stages are steps of
  one run (one checkpoint) rather than separate jobs;
- no reinforcement learning stage (PPO/GRPO, §3.4): it needs a reward model or many rollouts per step, which a CPU
  run cannot afford; no vocabulary extension with audio tokens (that is part 2);
- text is the corpus BPE (common.train_bpe), not Qwen's tokenizer; the `mini` preset has the official shapes
  (Whisper-large encoder, Qwen2.5-7B LLM, vocabulary 158,720) and builds on the meta device only; no official
  weights are mapped (no pip-installable reference implementation to prove a key map against);
- the placeholder count follows this file's encoder and adaptor exactly (tested): 313 per 25 s chunk, as the
  card's count for the official code; its formula (`adaptor_len(encoder_len(mel_len - 2))`) is not verified.

    python step_audio.py                                  # all stages on the built-in corpus
    python step_audio.py --init_from=resume               # continue out/step_audio/ckpt.pt
    python step_audio.py --mode=sample --init_from=out/step_audio/ckpt.pt --input=q.wav --prompt="transcribe"
    python step_audio.py --mode=eval --init_from=out/step_audio/ckpt.pt
    python step_audio.py --mode=bench
    torchrun --standalone --nproc_per_node=8 step_audio.py
"""
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
    init_from: str = "scratch"          # scratch | resume | path to one of our checkpoints
    out_dir: str = "out/step_audio"
    data_dir: str = ""                  # empty: the built-in corpus (speech and dialogue)
    corpus_hours: float = 2.0           # size of the built-in corpus
    input: str = ""                     # --mode=sample: a wav to listen to (empty: held-out examples)
    prompt: str = "transcribe the audio"  # --mode=sample: the question asked about --input
    tools: bool = True                  # --mode=sample: the calculator tool is offered
    seed: int = 1337
    # audio front end (§3.1: Whisper's log-mel at 16 kHz, 128 bins, 25 s chunks)
    sample_rate: int = 16000            # Hz
    n_mels: int = 128                   # log-mel bins
    chunk_seconds: float = 25.0         # audio is cut into chunks of at most this length, each framed by markers
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
    # training stages in miniature (§3.2-3.4): text LLM, encoder ASR pretraining, adaptor alignment; SFT after
    stage_iters: tuple = (300, 300, 200)  # steps of the first three stages; SFT runs from their sum to max_iters
    tool_frac: float = 0.5              # arithmetic questions with the calculator offered (else answered directly)
    lr: float = 1e-3                    # AdamW peak learning rate
    betas: tuple = (0.9, 0.95)          # AdamW betas
    weight_decay: float = 0.1           # AdamW weight decay
    warmup_iters: int = 30              # linear warm-up at the start of each stage
    grad_clip: float = 1.0              # gradient-norm clipping
    batch_size: int = 16                # examples per step
    max_iters: int = 2000               # total steps (all stages)
    eval_interval: int = 500            # steps between evaluations on val
    eval_items: int = 24                # held-out examples per task
    log_interval: int = 25              # steps between progress lines
    max_new_tokens: int = 48            # generation limit per assistant turn
    bench_iters: int = 5                # timed repetitions in --mode=bench
    bench_seconds: float = 30.0         # audio length for the prefill figure
    device: str = "auto"
    dtype: str = "auto"                 # bf16 on CUDA, fp32 elsewhere
    compile: bool = True                # torch.compile (CUDA by default; a CPU only with --compile=True)

    def validate(self):
        if any(s < 0 for s in self.stage_iters) or len(self.stage_iters) != 3:
            raise SystemExit(f"error: --stage_iters takes three step counts >= 0 (got {self.stage_iters})")
        if self.mode == "train" and self.max_iters < sum(self.stage_iters):
            raise SystemExit(f"error: --max_iters={self.max_iters} is shorter than the first three stages, --stage_iters="
                             f"{','.join(map(str, self.stage_iters))} (sum {sum(self.stage_iters)})")
        if self.n_head % self.n_kv_head or self.n_embd % self.n_head:
            raise SystemExit("error: --n_head must be a multiple of --n_kv_head, and --n_embd of --n_head")


PRESETS = {
    "mini":  dict(vocab_size=158720),   # Step-Audio-2-mini's shapes (8.3 B parameters): builds on the meta device
    "small": dict(n_mels=80, n_audio_state=128, n_audio_head=4, n_audio_layer=2, adaptor_hidden=256, n_embd=192,
                  n_layer=4, n_head=6, n_kv_head=2, ffn=512, rope_theta=1e4, tie_embeddings=True, corpus_hours=0.5,
                  stage_iters=(250, 250, 100), max_iters=1200, batch_size=8, eval_interval=300, eval_items=24,
                  compile=False),       # a CPU run; 80 mel bins (the paper's 128 cost 1.6x here)
    "tiny":  dict(n_mels=32, n_audio_ctx=400, n_audio_state=32, n_audio_head=2, n_audio_layer=1, adaptor_hidden=48,
                  n_embd=32, n_layer=2, n_head=4, n_kv_head=2, ffn=64, rope_theta=1e4, bpe_vocab=300,
                  tie_embeddings=True, corpus_hours=0.02, stage_iters=(1, 1, 1), max_iters=4, batch_size=2,
                  eval_interval=1000, eval_items=1, log_interval=1, max_new_tokens=6, bench_iters=1,
                  bench_seconds=2.0, chunk_seconds=3.0, compile=False),  # tests
}
ARCH_KEYS = ("sample_rate", "n_mels", "chunk_seconds", "pad_samples", "n_audio_ctx", "n_audio_state",
             "n_audio_head", "n_audio_layer", "adaptor_hidden", "n_embd", "n_layer", "n_head", "n_kv_head", "ffn",
             "rope_theta", "rms_eps", "vocab_size", "bpe_vocab", "tie_embeddings")
STAGES = ("llm", "encoder", "adaptor", "sft")

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

    def forward(self, x, mask):                           # x: (B, T, D), mask: (B, 1, 1, T) True = a real frame
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.n_head, -1).transpose(1, 2) for p in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, Dh)
        return self.out(y.transpose(1, 2).flatten(2))


class EncoderBlock(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.attn, self.attn_ln = EncoderAttention(d, n_head), LayerNorm(d)
        self.mlp, self.mlp_ln = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)), LayerNorm(d)

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
    """Whisper-style encoder (§3.1): two convs (100 Hz mel -> 50 Hz), a learned positional table, pre-LN blocks,
    then average pooling to 25 Hz and a final LayerNorm. Pretrained on ASR, then frozen for the rest of training."""
    def __init__(self, cfg):
        super().__init__()
        d = cfg.n_audio_state
        self.conv1 = nn.Conv1d(cfg.n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.positional_embedding = nn.Embedding(cfg.n_audio_ctx, d)  # an nn.Embedding, not sinusoids (official)
        self.blocks = nn.ModuleList(EncoderBlock(d, cfg.n_audio_head) for _ in range(cfg.n_audio_layer))
        self.avg_pooler = nn.AvgPool1d(2, 2)
        self.after_norm = LayerNorm(d)

    def forward(self, mel, n_mel):                        # mel: (B, n_mels, T), n_mel: (B,) real frames
        x = F.gelu(self.conv1(mel))
        x = x * (torch.arange(x.shape[-1], device=mel.device)[None] < n_mel[:, None])[:, None]  # padding reads as zeros
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
    """§3.1: a stride-2 conv (25 -> 12.5 Hz) with GELU, then Linear -> ReLU -> Linear into the LLM's width."""
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
        self.n_head, self.n_kv, self.dh, self.theta = cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head, cfg.rope_theta
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

    def forward(self, x, pos0=0, cache=None):             # x: (B, T, D) input embeddings -> (B, T, vocab)
        pos = torch.arange(pos0, pos0 + x.shape[1], device=x.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, pos, cache, i)
        if cache is not None:
            cache.length = pos0 + x.shape[1]
        return self.lm_head(self.norm(x))


CHARS = " abcdefghijklmnopqrstuvwxyz'"                    # the CTC alphabet of encoder pretraining (0 = blank)


class StepAudio(nn.Module):
    """Encoder -> adaptor -> LLM (§3.1). The CTC head exists for encoder pretraining only (our stand-in for the
    paper's ASR pretraining of the encoder); inference never uses it."""
    def __init__(self, cfg):
        super().__init__()
        self.encoder, self.adapter, self.model = AudioEncoder(cfg), Adaptor(cfg), LLM(cfg)
        self.ctc_head = nn.Linear(cfg.n_audio_state, len(CHARS) + 1)

    def audio_features(self, mel, n_mel):
        """(N, n_mels, T) chunks -> list of N (n_tokens_i, D_llm) tensors, each exactly audio_tokens(...) long."""
        return self.adapt(self.encoder(mel, n_mel), n_mel)

    def adapt(self, h, n_mel):
        """Encoder frames (N, T', D) -> each chunk's adaptor features; the frames past a chunk's end are zeroed
        first, so a chunk padded in a batch gives exactly what it gives alone (the conv looks one frame ahead)."""
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

    def forward(self, ids=None, mel=None, n_mel=None, patch_id=None, ctc=False, frozen_encoder=True):
        """Logits over the vocabulary (B, T, V); with ctc=True the encoder's CTC logits (B, T', chars) instead."""
        if ctc:
            return self.ctc_head(self.encoder(mel, n_mel))
        feats = []
        if mel is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen_encoder):
                h = self.encoder(mel, n_mel)             # frozen after its pretraining (§3.2)
            feats = self.adapt(h, n_mel)
        return self.model(self.embed(ids, feats, patch_id))

# ----------------------------------------------------------------------------- tokens and chat format

SPECIALS = ("<|endoftext|>", "<|BOT|>", "<|EOT|>", "<audio_start>", "<audio_patch>", "<audio_end>",
            "<tool_call>", "</tool_call>")


class Tokenizer:
    """The corpus BPE (tiktoken format, common.train_bpe) with the chat and audio markers after its ranks."""
    def __init__(self, ranks):
        self.ranks_text = common.ranks_to_text(ranks)
        self.enc = common.bpe_encoding(ranks, SPECIALS, name="step-audio-bpe")
        self.n_vocab = self.enc.n_vocab
        self.ids = {s: len(ranks) + i for i, s in enumerate(SPECIALS)}
        self.pad, self.bot, self.eot = self.ids["<|endoftext|>"], self.ids["<|BOT|>"], self.ids["<|EOT|>"]
        self.audio_start, self.patch, self.audio_end = (self.ids[s] for s in ("<audio_start>", "<audio_patch>", "<audio_end>"))
        self.call, self.end_call = self.ids["<tool_call>"], self.ids["</tool_call>"]

    def encode(self, text):
        """Text to ids; the tool-call markers in an assistant's text become their special tokens."""
        return self.enc.encode(text, allowed_special={"<tool_call>", "</tool_call>"}, disallowed_special=())

    def decode(self, ids):
        specials, out, run = {v: k for k, v in self.ids.items()}, [], []
        for i in list(ids) + [None]:
            if i is None or i in specials:
                out.append(self.enc.decode(run))
                run = []
                if i is not None:
                    out.append(specials[i])
            else:
                run.append(i)
        return "".join(out)


def chunk_lengths(n_samples, cfg):
    """Samples per chunk: audio is cut into chunks of at most chunk_seconds (§3.1)."""
    size = int(cfg.chunk_seconds * cfg.sample_rate)
    return [min(size, n_samples - s) for s in range(0, max(n_samples, 1), size)]


def mel_frames(n_samples, cfg):
    """Log-mel frames of one chunk: hop 160 after the right padding, the last frame dropped (Whisper)."""
    return (n_samples + cfg.pad_samples) // 160


def audio_tokens(n_samples, cfg):
    """Placeholders one chunk takes in the prompt: the encoder and adaptor length formula, exactly."""
    return adaptor_frames(encoder_frames(mel_frames(n_samples, cfg)))


def render(turns, tok, cfg, generate=False):
    """A conversation -> token ids and labels (-100 except the assistant's words and their <|EOT|>).

    turns: [(role, content)], role in system | human | assistant | tool; content a str, or a list of str and
    ("audio", n_samples) items. Each audio chunk becomes <audio_start> + n x <audio_patch> + <audio_end>.
    generate: end with an open assistant turn, as the prompt for a reply."""
    ids, labels = [], []
    for role, content in turns:
        head = [tok.bot] + tok.encode(role + "\n")
        body = []
        for part in ([content] if isinstance(content, str) else content):
            if isinstance(part, str):
                body += tok.encode(part)
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
    """'one hundred and forty four' -> 144 (the inverse of common.number_words for 0..999), None if not a number."""
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

def lm_loss(logits, labels):
    """Next-token cross-entropy on the assistant turns only: labels are -100 elsewhere (the prompt, the user's
    audio and words, tool results, padding)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def ctc_loss(logits, n_mel, chars, n_chars):
    """Encoder pretraining on ASR (§3.2, in miniature): CTC over characters from the 25 Hz encoder output.
    logits: (B, T, C) from the CTC head; chars: the concatenated targets (1-based; 0 is the blank)."""
    logp = F.log_softmax(logits.float(), -1).transpose(0, 1)  # (T, B, C)
    n_out = torch.tensor([encoder_frames(int(n)) for n in n_mel])
    return F.ctc_loss(logp, chars, n_out, n_chars, blank=0, zero_infinity=True)

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
    """The user's questions in the dialogue corpus, cut from channel 0 at their word times, with the answer the
    assistant gave: [(wav, question, answer)]."""
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
                out.append((u.wav[0, a:b].copy(), text, nxt[1]))
    return out


def arithmetic(question):
    """'what is seven times eight' -> 'seven times eight' (the tool's argument), else None."""
    m = re.fullmatch(r"what is (.+ (?:plus|minus|times) .+)", question)
    return m.group(1) if m else None


class Tasks:
    """The training and evaluation examples of one split, built once from the corpus: (wav, turns, answer) per
    task. Every example's audio is one clip; turns follow render()'s format with ("audio", n) in place of it."""
    def __init__(self, cfg, split):
        speech = common.load_corpus(cfg, split, cfg.sample_rate, kind="speech")
        self.texts = [u.text for u in speech]
        # the built-in voices' attributes are known; a user's folder has none (no paralinguistic task then)
        self.speech = [(u.wav, u.text, None if cfg.data_dir else voice_attributes(u.speaker)) for u in speech]
        self.has_voices = not cfg.data_dir
        dia = [] if cfg.data_dir else common.load_corpus(cfg, split, cfg.sample_rate, kind="dialogue", mono=False)
        self.dialogue_texts = [u.text for u in dia]
        self.questions = dialogue_questions(dia, cfg.sample_rate)

    def example(self, task, i, rng, cfg):
        """(wav, turns, answer) of example i of `task` (rng picks among variants)."""
        if task in ("asr", "para"):
            wav, text, attrs = self.speech[i % len(self.speech)]
            a = ("audio", len(wav))
            if task == "asr":
                return wav, [("human", [a, "transcribe the audio"]), ("assistant", text)], text
            q, key = [(GENDER_Q, "gender"), (PITCH_Q, "pitch"), (RATE_Q, "rate")][int(rng.integers(3))]
            return wav, [("human", [a, q]), ("assistant", attrs[key])], attrs[key]
        wav, q, ans = self.questions[i % len(self.questions)]
        a, call = ("audio", len(wav)), arithmetic(q)
        tools = call is not None and rng.random() < cfg.tool_frac if task == "qa" else task == "tool"
        system = ("system", "tools: calculator" if tools else "tools: none")
        turns = [system, ("human", [a])]
        if tools and call:  # §3.4 tool calling: the call, the tool's result as its own turn, then the answer
            turns += [("assistant", f"<tool_call>{call}</tool_call>"), ("tool", calculator(call))]
        turns.append(("assistant", ans))
        if task == "followup":  # multi-turn: the second question refers back to the first turn's audio
            turns += [("human", "what was my question"), ("assistant", q)]
            ans = q
        return wav, turns, ans


def prompt_of(turns, task):
    """The prompt for a reply: the turns before the first assistant turn; a follow-up's, all but its last."""
    if task == "followup":
        return turns[:-1]
    return turns[:[r for r, _ in turns].index("assistant")]


def text_chats(tasks):
    """Stage 1's text: the corpus's sentences and its question/answer chats written out (the paper starts from a
    pretrained text LLM; this is that LLM's pretraining, in miniature)."""
    out = [[("human", "say something"), ("assistant", t)] for t in tasks.texts]
    for _, q, a in tasks.questions:
        call = arithmetic(q)
        out.append([("system", "tools: none"), ("human", q), ("assistant", a)])
        if call:
            out.append([("system", "tools: calculator"), ("human", q), ("assistant", f"<tool_call>{call}</tool_call>"),
                        ("tool", calculator(call)), ("assistant", a)])
    return out


def log_mel(wav, cfg):
    """One chunk (T,) float32 -> (n_mels, mel_frames(T)) Whisper log-mel."""
    return common.log_mel_spectrogram(torch.from_numpy(np.ascontiguousarray(wav)), cfg.n_mels, cfg.pad_samples)


def collate(examples, tok, cfg, rt, cache=None):
    """[(wav or None, turns)] -> a batch: token ids and labels (B, L) right-padded, and every audio chunk's mel
    (N, n_mels, T) with its real length, in prompt order. cache: {key: mel}, so each clip's mel is computed once."""
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
        batch["n_mel"] = torch.tensor([m.shape[-1] for m in mels], device=rt.device)
    return batch


def stage_at(step, cfg):
    """The training stage of a step (0-based): llm, encoder, adaptor, then sft to the end."""
    ends = np.cumsum(cfg.stage_iters)
    return STAGES[int(np.searchsorted(ends, step, side="right"))] if step < ends[-1] else "sft"


class Sampler:
    """Draws each step's examples for its stage; its RNG is saved in the checkpoint (resume draws the same)."""
    def __init__(self, tasks, tok, cfg, rank=0, world_size=1):
        self.tasks, self.tok, self.cfg = tasks, tok, cfg
        self.chats = text_chats(tasks)
        self.rng = np.random.default_rng([cfg.seed, rank, world_size])
        self.mels = {}                                   # each clip's log-mel, computed once

    def next(self, stage, rt):
        cfg, tk, rng = self.cfg, self.tasks, self.rng
        if stage == "llm":
            ex = [(None, self.chats[int(rng.integers(len(self.chats)))]) for _ in range(cfg.batch_size)]
            return dict(collate(ex, self.tok, cfg, rt), stage=stage)
        if stage == "encoder":
            items = [tk.speech[int(rng.integers(len(tk.speech)))] for _ in range(cfg.batch_size)]
            mels = []
            for w, _, _ in items:                        # the first chunk of each clip (clips are shorter than one)
                key = (id(w), 0, chunk_lengths(len(w), cfg)[0])
                if key not in self.mels:
                    self.mels[key] = log_mel(w[: key[2]], cfg)
                mels.append(self.mels[key])
            T = max(m.shape[-1] for m in mels)
            chars = [[CHARS.index(c) + 1 for c in common.normalize_text(t) if c in CHARS] for _, t, _ in items]
            return dict(stage=stage, mel=torch.stack([F.pad(m, (0, T - m.shape[-1])) for m in mels]).to(rt.device),
                        n_mel=torch.tensor([m.shape[-1] for m in mels]), chars=torch.tensor(sum(chars, [])),
                        n_chars=torch.tensor([len(c) for c in chars]))
        mix = ["asr"] if stage == "adaptor" else ["asr"] + ["para"] * tk.has_voices + ["qa", "qa", "followup"] * bool(tk.questions)
        ex = []
        for _ in range(cfg.batch_size):
            task = mix[int(rng.integers(len(mix)))]
            n = len(tk.speech) if task in ("asr", "para") else len(tk.questions)
            wav, turns, _ = tk.example(task, int(rng.integers(n)), rng, cfg)
            ex.append((wav, turns))
        return dict(collate(ex, self.tok, cfg, rt, self.mels), stage=stage)

    def state_dict(self):
        return self.rng.bit_generator.state

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state


def get_batch(sampler, cfg, rt, step):
    return sampler.next(stage_at(step, cfg), rt)

# ----------------------------------------------------------------------------- train

def build_tokenizer(cfg, tasks):
    texts = tasks.texts + tasks.dialogue_texts + [GENDER_Q, PITCH_Q, RATE_Q, "transcribe the audio", "say something",
                                                  "what was my question", "tools: calculator", "tools: none",
                                                  "system human assistant tool", "male female low medium high "
                                                  "slow normal fast error"]
    return Tokenizer(common.train_bpe([" " + t for t in texts] + texts, cfg.bpe_vocab))


def trainable(stage, model):
    """What each stage trains (§3.2-3.4): the LLM alone (text), the encoder and its CTC head (ASR pretraining),
    the adaptor alone (alignment: encoder and LLM frozen), adaptor + LLM (SFT; the encoder stays frozen)."""
    parts = dict(llm=[model.model], encoder=[model.encoder, model.ctc_head], adaptor=[model.adapter],
                 sft=[model.adapter, model.model])[stage]
    return {id(p) for m in parts for p in m.parameters()}


def lr_lambda(cfg):
    """A linear warm-up at the start of each stage, then constant; SFT decays with a cosine to 10 %."""
    starts = [0] + [int(e) for e in np.cumsum(cfg.stage_iters)]

    def f(step):
        s = max(i for i, b in enumerate(starts) if step >= b)
        warm = min(1.0, (step - starts[s] + 1) / max(1, cfg.warmup_iters))
        if s < 3:
            return float(warm)
        frac = (step - starts[3]) / max(1, cfg.max_iters - starts[3])
        return float(warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))))
    return f


def build(cfg, rt):
    model = StepAudio(cfg).to(rt.device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=cfg.weight_decay), dict(params=rest, weight_decay=0.0)],
                            lr=cfg.lr, betas=cfg.betas)
    return dict(model=model, opt=opt, sched=torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))


def train_step(state, batch, cfg, rt):
    """One AdamW step of the batch's stage: only that stage's parameters get gradients."""
    model, opt = state["model"], state["opt"]
    raw = common.unwrap(model)
    with rt.autocast():
        if batch["stage"] == "encoder":
            logits = model(mel=batch["mel"], n_mel=batch["n_mel"], ctc=True)
            loss = ctc_loss(logits, batch["n_mel"], batch["chars"], batch["n_chars"])
        else:
            logits = model(batch["ids"], batch["mel"], batch["n_mel"], raw.tok.patch)
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
    """Our checkpoint: the model with its tokenizer (stored in the checkpoint). No official weights are mapped."""
    ckpt = common.load_checkpoint(common.checkpoint_path(cfg))
    if not common.is_ours(ckpt):
        raise SystemExit("error: not a nanoaudio step_audio checkpoint (official Step-Audio 2 weights are not mapped)")
    tok = Tokenizer(common.ranks_from_text(ckpt["extra"]["tokenizer"]))
    model = StepAudio(cfg).to(rt.device)
    common.load_models(ckpt, cfg, {"model": model}, ARCH_KEYS)
    model.tok = tok
    return model.eval()


@torch.no_grad()
def generate(model, tok, turns, wav, cfg, rt):
    """Greedy decoding of one assistant turn with a KV cache: prefill the prompt (audio features written over the
    placeholders), then one token at a time until <|EOT|>. Returns the generated token ids."""
    ids, _ = render(turns, tok, cfg, generate=True)
    ids = torch.tensor([ids], device=rt.device)
    feats = []
    if wav is not None:
        b = collate([(wav, [])], tok, cfg, rt)
        feats = model.audio_features(b["mel"], b["n_mel"])
    cache = KVCache(cfg, 1, ids.shape[1] + cfg.max_new_tokens, rt.device, next(model.parameters()).dtype)
    with rt.autocast():
        logits = model.model(model.embed(ids, feats, tok.patch), 0, cache)
        out = []
        for _ in range(cfg.max_new_tokens):
            nxt = int(logits[0, -1].argmax())
            if nxt == tok.eot:
                break
            out.append(nxt)
            logits = model.model(model.model.embed_tokens(torch.tensor([[nxt]], device=rt.device)), cache.length, cache)
    return out


def respond(model, tok, turns, wav, cfg, rt, tools=True):
    """One assistant reply, running the tool loop: a reply that is a <tool_call> is executed, its result appended
    as a tool turn, and the assistant continues. Returns (final text, the call or None)."""
    reply = tok.decode(generate(model, tok, turns, wav, cfg, rt))
    m = re.fullmatch(r"<tool_call>(.*)</tool_call>\s*", reply)
    if not (tools and m):
        return reply.strip(), None
    turns = turns + [("assistant", reply), ("tool", calculator(m.group(1).strip()))]
    return tok.decode(generate(model, tok, turns, wav, cfg, rt)).strip(), m.group(1).strip()


@torch.no_grad()
def evaluate(cfg, model=None, rt=None, samples_dir=None, split="test"):
    """Held-out accuracy of each skill: ASR WER; spoken QA without tools; tool-call accuracy and final answers with
    the calculator; paralinguistic accuracy per attribute; the multi-turn follow-up (exact match, normalised)."""
    if model is None:
        rt = common.setup(cfg)
        model = load_for_inference(cfg, rt)
    tok, was = model.tok, model.training
    model.eval()
    tasks, rng, n = Tasks(cfg, split), np.random.default_rng(0), cfg.eval_items
    norm = common.normalize_text
    refs, hyps, m = [], [], {}
    for i in range(min(n, len(tasks.speech))):
        wav, text, attrs = tasks.speech[i]
        refs.append(text)
        hyps.append(respond(model, tok, [("human", [("audio", len(wav)), "transcribe the audio"])], wav, cfg, rt)[0])
        for q, key in ((GENDER_Q, "gender"), (PITCH_Q, "pitch"), (RATE_Q, "rate")) if attrs else ():
            got = respond(model, tok, [("human", [("audio", len(wav)), q])], wav, cfg, rt)[0]
            m.setdefault(f"para_{key}", []).append(norm(got) == attrs[key])
    m_out = dict(wer=common.wer(refs, hyps))
    for i, (wav, q, ans) in enumerate(tasks.questions[:n]):
        a = ("audio", len(wav))
        got, _ = respond(model, tok, [("system", "tools: none"), ("human", [a])], wav, cfg, rt, tools=False)
        m.setdefault("qa_acc", []).append(norm(got) == norm(ans))
        call = arithmetic(q)
        if call:
            got, made = respond(model, tok, [("system", "tools: calculator"), ("human", [a])], wav, cfg, rt)
            m.setdefault("tool_call_acc", []).append(made == call)
            m.setdefault("tool_answer_acc", []).append(norm(got) == norm(ans))
            m.setdefault("no_tool_answer_acc", []).append(m["qa_acc"][-1])
        _, turns, _ = tasks.example("followup", i, rng, cfg)
        follow, _ = respond(model, tok, prompt_of(turns, "followup"), wav, cfg, rt, tools=False)
        m.setdefault("followup_acc", []).append(norm(follow) == norm(q))
        if samples_dir is not None and i < 2:
            common.save_sample(samples_dir, f"question{i}", wav, cfg.sample_rate)
            with open(os.path.join(samples_dir, f"question{i}.txt"), "w") as f:
                f.write(f"question: {q}\nexpected: {ans}\nanswer (no tools): {got}\nfollow-up: {follow}\n")
    m_out.update({k: float(np.mean(v)) for k, v in m.items()})
    m_out.update(n_clips=len(refs), n_questions=len(tasks.questions[:n]))  # how many items each figure is over
    model.train(was)
    common.log(f"eval ({split}) | " + " | ".join(f"{k} {v:.3f}" for k, v in m_out.items()))
    return m_out


def train(cfg):
    rt = common.setup(cfg)
    tasks, val = Tasks(cfg, "train"), Tasks(cfg, "val")
    common.check_clips([w for w, _, _ in tasks.speech], 1600, "train split")
    common.check_clips([w for w, _, _ in val.speech], 1600, "val split")
    tok = build_tokenizer(cfg, tasks)
    if common.checkpoint_path(cfg) and cfg.init_from != "scratch":  # keep the checkpoint's tokenizer
        ckpt = common.load_checkpoint(common.checkpoint_path(cfg))
        if common.is_ours(ckpt) and "tokenizer" in ckpt.get("extra", {}):
            tok = Tokenizer(common.ranks_from_text(ckpt["extra"]["tokenizer"]))
    if cfg.vocab_size == 0:                              # the corpus BPE decides the vocabulary (stored in the config)
        cfg.vocab_size = tok.n_vocab
    state = build(cfg, rt)
    state["model"].tok = tok
    ends = np.cumsum(cfg.stage_iters)
    common.log(f"StepAudio {common.count_params(state['model']) / 1e6:.2f} M params, vocabulary {tok.n_vocab}; "
               f"stages: llm to step {ends[0]}, encoder to {ends[1]}, adaptor to {ends[2]}, sft to {cfg.max_iters}")
    sampler = Sampler(tasks, tok, cfg, rt.rank, rt.world_size)
    step = common.init_from(cfg, state, sampler=sampler, arch_keys=ARCH_KEYS)
    raw = state["model"]
    state["model"] = common.wrap_ddp(common.compile(raw, cfg), rt, find_unused_parameters=True)
    prog = common.Progress(cfg, start_step=step)
    while step < cfg.max_iters:
        batch = get_batch(sampler, cfg, rt, step)
        losses = train_step(state, batch, cfg, rt)
        step += 1
        prog.update(step, losses, audio_seconds=float(batch["n_mel"].sum()) / 100 if batch["n_mel"] is not None else 0)
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            if rt.master:
                evaluate(cfg, raw, rt, samples_dir=os.path.join(cfg.out_dir, "samples", f"step{step:06d}"), split="val")
            common.save_checkpoint(cfg, step, state, sampler=sampler, extra={"tokenizer": tok.ranks_text})
    common.cleanup(rt)

# ----------------------------------------------------------------------------- sample

@torch.no_grad()
def sample(cfg):
    """Listen to --input and answer --prompt (with the calculator if --tools), or run held-out examples of every
    task. Writes each clip's wav + png and the conversation as text beside them."""
    rt = common.setup(cfg)
    model = load_for_inference(cfg, rt)
    tok, out = model.tok, os.path.join(cfg.out_dir, "samples")
    os.makedirs(out, exist_ok=True)
    if cfg.input:
        wav, _ = common.load_audio(cfg.input, sr=cfg.sample_rate)
        items = [(os.path.splitext(os.path.basename(cfg.input))[0], wav,
                  [("system", "tools: calculator" if cfg.tools else "tools: none"),
                   ("human", [("audio", len(wav)), cfg.prompt])])]
    else:
        tasks, rng = Tasks(cfg, "test"), np.random.default_rng(0)
        items = []
        for task in ("asr", "para", "qa", "followup"):
            if task in ("qa", "followup") and not tasks.questions:
                continue
            wav, turns, _ = tasks.example(task, 0, rng, cfg)
            items.append((f"{task}0", wav, prompt_of(turns, task)))
    for name, wav, turns in items:
        answer, call = respond(model, tok, turns, wav, cfg, rt, tools=cfg.tools)
        shown = " | ".join(f"{r}: {c if isinstance(c, str) else ' '.join(x if isinstance(x, str) else '<audio>' for x in c)}"
                           for r, c in turns)
        text = f"{shown}\n" + (f"tool call: {call}\n" if call else "") + f"assistant: {answer}\n"
        common.save_sample(out, name, wav, cfg.sample_rate)
        with open(os.path.join(out, name + ".txt"), "w") as f:
            f.write(text)
        common.log(text.rstrip() + f"\n(wrote {os.path.join(out, name)}.wav/.png/.txt)")

# ----------------------------------------------------------------------------- bench

def bench(cfg):
    """SFT train step on random audio, prefill of bench_seconds of audio (chunked) and cached decoding tokens/s at
    batch 1, eager and (when common.compile compiles) compiled; FLOP rate against the device's peak."""
    rt = common.setup(cfg)
    if cfg.vocab_size == 0:
        cfg.vocab_size = cfg.bpe_vocab + len(SPECIALS)
    tok = Tokenizer({bytes([i]): i for i in range(256)})  # byte-level ranks: ids only matter for shapes
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
    common.report_bench(cfg, rt, model=model, compiled=compiled is not model.model, **figures)

# ----------------------------------------------------------------------------- main

if __name__ == "__main__":
    cfg = common.parse_config(Config, PRESETS)
    {"train": train, "sample": sample, "eval": evaluate, "bench": bench}[cfg.mode](cfg)
