"""
Whisper: Robust Speech Recognition via Large-Scale Weak Supervision (Radford, Kim, Xu, Brockman, McLeavey,
Sutskever, 2022) — https://arxiv.org/abs/2212.04356

The idea: a plain encoder-decoder Transformer (§2.2) trained on 680k hours of weakly labelled audio reads a
30-second log-mel window and writes the transcript as text tokens. One decoder does many tasks (§2.3): the
task is spelled in special tokens after <|startoftranscript|> (language, transcribe/translate, timestamps or
<|notimestamps|>), timestamps are ordinary tokens quantised to 20 ms, and <|nospeech|> does voice activity
detection. Long recordings are transcribed window by window, seeking by the predicted timestamps, with a few
decoding heuristics (§4.5: beam search, temperature fallback on compression ratio / log-prob, timestamp
rules). The official checkpoints load by name (section "official weights", at the end).

Simplified here:
- data: the built-in eSpeak corpus (English, or --corpus_languages=en,fr,de,es with English translations),
  not 680k h of web audio; the default text is a small corpus BPE (the official .tiktoken via --tokenizer);
- `tiny`/`small` use shorter windows so a CPU can train them; the whisper-* presets use 30 s, as the paper;
- language ID runs on every window, word timestamps use the decoder's top-half cross-attention heads;
- noise robustness (§3.7) with white noise only; no SpecAugment / BPE dropout; bf16, not fp16; our init;
- long-form pads a short last window with silence's log-mel (openai: zeros) and drops empty segments.
Aim 1000 lines not reached (1456): long-form, word times, beam search, official weights, CUDA graphs stay.

    python whisper.py                    # train: whisper-tiny dims, 20k steps on CUDA; `small` on a CPU
    python whisper.py --init_from=resume                     # continue out/whisper/ckpt.pt
    python whisper.py --mode=sample --init_from=out/whisper/ckpt.pt --input=speech.wav   # transcribe a file
    python whisper.py --mode=sample --init_from=out/whisper/ckpt.pt --input_dir=DIR  # WER vs DIR/refs.txt
    python whisper.py --mode=eval --init_from=out/whisper/ckpt.pt --eval_snr=20,10,5 --word_timestamps=True
    python whisper.py --mode=sample --init_from=tiny.pt --tokenizer=multilingual.tiktoken --input=a.flac \\
        --language=auto --word_timestamps=True                 # official weights: language ID, word times
    python whisper.py --mode=bench
    torchrun --standalone --nproc_per_node=8 whisper.py --preset=whisper-base
"""
import dataclasses
import itertools
import math
import os
import string
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    mode: str = "train"             # train | sample | eval | bench
    preset: str = "whisper-tiny"    # a key of PRESETS (without CUDA and without --preset: small)
    init_from: str = "scratch"      # scratch | resume | our ckpt.pt | an official .pt
    out_dir: str = "out/whisper"
    data_dir: str = ""              # empty: the built-in speech corpus
    corpus_hours: float = 2.0       # size of the built-in corpus (per language)
    corpus_languages: str = "en"    # built-in corpus languages, e.g. en,fr,de,es
    input: str = ""                 # --mode=sample: a wav/flac (default: a test utterance)
    input_dir: str = ""             # --mode=sample: every wav/flac/ogg here (any rate, mono)
    transcripts: str = ""           # ... one "name<TAB>text" line each, here (default: DIR/transcripts.tsv);
                                    # a DIR/refs.txt of such lines gets the folder's WER printed
    # model: the official ModelDimensions (§2.2, Table 1 sizes; whisper/model.py)
    n_mels: int = 80                # log-mel bins (128 for large-v3)
    n_audio_ctx: int = 1500         # encoder positions = window / 20 ms: 1500 = 30 s (3000 mel frames)
    n_audio_state: int = 384        # encoder width
    n_audio_head: int = 6           # encoder heads
    n_audio_layer: int = 4          # encoder blocks
    n_text_ctx: int = 448           # decoder positions (prompt + sampled tokens)
    n_text_state: int = 384         # decoder width
    n_text_head: int = 6            # decoder heads
    n_text_layer: int = 4           # decoder blocks
    # text
    tokenizer: str = ""             # an official .tiktoken file; empty: train a byte-level BPE on the corpus
    bpe_vocab: int = 1024           # offline BPE size: 256 bytes + merges
    # multitask training format (§2.3, Fig. 1)
    p_timestamps: float = 0.5       # share of examples with timestamp tokens
    p_prompt: float = 0.3           # share with a previous-text prompt (no loss on it)
    p_nospeech: float = 0.05        # fraction of noise-only windows whose target is <|nospeech|> (VAD)
    p_translate: float = 0.5        # fraction of non-English clips trained as X -> English (<|translate|>)
    p_noise: float = 0.0            # share of windows with white noise at 0-30 dB (§3.7)
    # optimisation (§2.4, Appendix F)
    batch_size: int = 64            # windows per step (the paper: 256)
    lr: float = 1.5e-3              # peak learning rate (1.5e-3 for tiny, 1.75e-4 for large)
    weight_decay: float = 0.1       # AdamW
    betas: tuple = (0.9, 0.98)      # AdamW betas (eps 1e-6)
    warmup_iters: int = 1000        # linear warm-up steps (the paper: 2048)
    lr_decay_iters: int = 20_000    # linear decay reaches 0 here (own knob: a longer resume keeps the curve)
    max_iters: int = 20_000         # the default GPU run (the paper: 2^20 updates)
    grad_clip: float = 1.0          # global gradient-norm clip
    # decoding (§4.5; whisper/transcribe.py defaults)
    language: str = "en"            # a language code of the vocabulary, or auto: detect per window (§2.3)
    task: str = "transcribe"        # transcribe | translate (X -> English, §2.3)
    word_timestamps: bool = False   # word times from cross-attention + DTW (openai-whisper's timing.py)
    beam_size: int = 5              # beam search at temperature 0; 0 or 1: greedy
    best_of: int = 5                # samples per window at temperature > 0
    patience: float = 1.0           # beam search stops after beam_size * patience finished hypotheses
    length_penalty: float = 0.0     # 0: rank by mean log-prob; > 0: GNMT penalty ((5 + L) / 6) ** alpha
    temperatures: tuple = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # fallback schedule
    compression_ratio_threshold: float = 2.4  # gzip ratio above this = repetition loop -> retry hotter
    logprob_threshold: float = -1.0           # mean log-prob below this -> retry hotter
    no_speech_threshold: float = 0.6          # P(<|nospeech|>) above this (and low log-prob): skip the window
    condition_on_previous_text: bool = True   # feed the previous window's text as the prompt
    max_initial_timestamp: float = 1.0        # the first timestamp is at most this many seconds
    sample_len: int = 0             # max sampled tokens per window; 0: n_text_ctx // 2
    decode_method: str = "auto"     # eager | compiled | cudagraph | compiled_cudagraph
    # runtime
    device: str = "auto"
    dtype: str = "auto"             # bf16 autocast on CUDA, fp32 elsewhere
    compile: bool = True            # torch.compile (on CUDA by default; off on CPU unless asked)
    seed: int = 1337
    log_interval: int = 50
    eval_interval: int = 2000       # evaluate and checkpoint every this many steps
    eval_items: int = 64            # held-out utterances per evaluation
    eval_snr: str = ""              # e.g. 20,10,5: also the WER in white noise at these SNRs (dB, §3.7)
    bench_iters: int = 10           # --mode=bench: timed iterations per figure

    def snrs(self):                 # --eval_snr as a list of dB values
        return [float(x) for x in self.eval_snr.split(",") if x.strip()]

    def validate(self):             # common.parse_config checks the shared fields, then calls this
        def need(ok, msg):
            if not ok:
                raise SystemExit(f"error: {msg}")
        for k in ("p_timestamps", "p_prompt", "p_nospeech", "p_translate", "p_noise"):
            need(0 <= getattr(self, k) <= 1, f"--{k} must be in [0, 1] (got {getattr(self, k)})")
        for k in ARCH_KEYS + ("warmup_iters", "lr_decay_iters"):
            need(getattr(self, k) >= 1, f"--{k} must be >= 1 (got {getattr(self, k)})")
        need(not (self.n_audio_state % self.n_audio_head or self.n_text_state % self.n_text_head),
             "--n_audio_state / --n_text_state must be multiples of --n_audio_head / --n_text_head")
        try:
            self.snrs()
        except ValueError:
            need(False, f"--eval_snr must be comma-separated numbers in dB, e.g. 20,10,5 "
                 f"(got {self.eval_snr!r})")
        need(self.task in ("transcribe", "translate"),
             f"--task must be transcribe or translate (got {self.task!r})")
        need(self.language == "auto" or self.language in LANGUAGES,
             f"--language={self.language!r} is not a Whisper language code (en, de, fr, ... or auto)")
        need(self.temperatures and all(t >= 0 for t in self.temperatures),
             f"--temperatures must be a non-empty list of values >= 0 (got {self.temperatures!r})")
        need(self.beam_size >= 0 and self.best_of >= 1 and self.patience > 0 and self.sample_len >= 0,
             "--beam_size >= 0, --best_of >= 1, --patience > 0 and --sample_len >= 0 are needed")
        need(self.decode_method in ("auto", "eager", "compiled", "cudagraph", "compiled_cudagraph"),
             f"--decode_method must be auto, eager, compiled, cudagraph or compiled_cudagraph "
             f"(got {self.decode_method!r})")
        need(not self.decode_method.endswith("cudagraph") or torch.cuda.is_available(),
             f"--decode_method={self.decode_method} needs a CUDA device")
        if self.input_dir:
            need(not self.input, "pass --input=FILE or --input_dir=DIR, not both")
            need(os.path.isdir(self.input_dir), f"--input_dir={self.input_dir!r} is not a folder")
            need(folder_audio(self.input_dir),
                 f"--input_dir={self.input_dir!r} holds no audio files ({', '.join(AUDIO_EXT)})")


def _paper(n_layer, width, heads, lr, n_mels=80, n_text_layer=None):
    """A paper size (Table 1): same depth/width in encoder and decoder, 30 s windows, the paper's LR."""
    return dict(n_mels=n_mels, n_audio_ctx=1500, n_audio_state=width, n_audio_head=heads,
                n_audio_layer=n_layer, n_text_ctx=448, n_text_state=width, n_text_head=heads,
                n_text_layer=n_text_layer or n_layer, lr=lr)


PRESETS = {
    "whisper-tiny":     _paper(4, 384, 6, 1.5e-3),      # 39 M with the official vocab
    "whisper-base":     _paper(6, 512, 8, 1e-3),        # 74 M
    "whisper-small":    _paper(12, 768, 12, 5e-4),      # 244 M
    "whisper-medium":   _paper(24, 1024, 16, 2.5e-4),   # 769 M
    "whisper-large":    _paper(32, 1280, 20, 1.75e-4),  # 1550 M (large-v1 / v2)
    "whisper-large-v3": _paper(32, 1280, 20, 1.75e-4, n_mels=128),
    "whisper-turbo":    _paper(32, 1280, 20, 1.75e-4, n_mels=128, n_text_layer=4),  # large-v3, 4 dec. layers
    # a CPU run: 4 s windows (most corpus clips fit; the rest are cropped at a word in training and
    # transcribed long-form), 4+4 layers of width 128; the lr decays to 0 at the last step (2400: the val WER
    # still falls at 1200). A quarter of the windows noisy (ours): the paper's robustness comes from 680k h
    # of varied audio, the corpus is clean eSpeak; without noise the model is lost at 20 dB SNR
    "small": dict(n_audio_ctx=200, n_audio_state=128, n_audio_head=4, n_audio_layer=4, n_text_ctx=128,
                  n_text_state=128, n_text_head=4, n_text_layer=4, batch_size=16, lr=2e-3, warmup_iters=100,
                  max_iters=2400, lr_decay_iters=2400, eval_interval=800, eval_items=32, log_interval=25,
                  p_noise=0.25, compile=False, bench_iters=3),
    # tests: 5 s windows, 2+2 layers of width 64
    "tiny": dict(n_audio_ctx=250, n_audio_state=64, n_audio_head=2, n_audio_layer=2, n_text_ctx=96,
                 n_text_state=64, n_text_head=2, n_text_layer=2, bpe_vocab=320, corpus_hours=0.02,
                 batch_size=4, lr=3e-3, warmup_iters=10, max_iters=10, lr_decay_iters=10, eval_interval=100,
                 eval_items=4, log_interval=1, beam_size=2, best_of=2, sample_len=32, temperatures=(0.0, 1.0),
                 compile=False, bench_iters=2),
}

# every field that changes the weights' shapes or the features (n_mels; the rate and hop are fixed): the
# official ModelDimensions less n_vocab, which the tokenizer stored in the checkpoint decides
ARCH_KEYS = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer",
             "n_text_ctx", "n_text_state", "n_text_head", "n_text_layer")

SAMPLE_RATE, HOP = 16000, 160          # §2.2: 16 kHz audio, 10 ms mel hop; 2 frames per encoder position
TIME_PRECISION = 0.02                   # seconds per timestamp token (= per encoder position)
N_TIMESTAMPS = 1501                     # <|0.00|> ... <|30.00|>
LANGUAGES = ("en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th "
             "ur hr bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr "
             "pa si km sn yo so af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt "
             "haw ln ha ba jw su yue").split()

# ----------------------------------------------------------------------------- model

class LayerNorm(nn.LayerNorm):
    """LayerNorm in fp32 whatever the activation dtype: its statistics need the range."""
    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def sinusoids(length, channels, max_timescale=10000):
    """Fixed encoder positions (§2.2): sin and cos halves concatenated, geometric timescales."""
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2))
    t = torch.arange(length)[:, None] * inv[None, :]   # (length, channels/2)
    return torch.cat([t.sin(), t.cos()], dim=1)         # (length, channels)


class MultiHeadAttention(nn.Module):
    """Standard multi-head attention; the key projection has no bias (a key bias adds the same q.b to every
    logit of a query, which softmax ignores), the official layout kept so official weights load by name."""
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def split(self, x):                                  # (B, T, D) -> (B, H, T, D/H)
        return x.view(x.shape[0], x.shape[1], self.n_head, -1).transpose(1, 2)

    def kv(self, x):
        return self.split(self.key(x)), self.split(self.value(x))

    def forward(self, x, k, v, causal=False, mask=None, qk_out=None):
        q = self.split(self.query(x))                    # (B, H, T, Dh); SDPA scales by Dh^-0.5
        if qk_out is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        else:                                            # word timestamps read the logits (cross only)
            qk = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5   # (B, H, T, S)
            qk_out.append(qk)
            y = qk.softmax(-1).to(q.dtype) @ v
        return self.out(y.transpose(1, 2).flatten(2))    # (B, T, D)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN Transformer block (§2.2): self-attention, cross-attention (decoder only), 4x GELU MLP."""
    def __init__(self, d, n_head, cross=False):
        super().__init__()
        self.attn, self.attn_ln = MultiHeadAttention(d, n_head), LayerNorm(d)
        self.cross_attn = MultiHeadAttention(d, n_head) if cross else None
        self.cross_attn_ln = LayerNorm(d) if cross else None
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.mlp_ln = LayerNorm(d)

    def forward(self, x, cross_kv=None, cache=None, layer=0, pos=None, mask=None, qk_out=None):
        h = self.attn_ln(x)
        k, v = self.attn.kv(h)
        causal = cache is None and cross_kv is not None
        if cache is not None:  # write this step's K/V at their positions, then attend to the filled part
            cache.k[layer].index_copy_(2, pos, k.to(cache.k.dtype))
            cache.v[layer].index_copy_(2, pos, v.to(cache.v.dtype))
            if cache.static:   # the whole buffer, the unfilled tail masked: one shape at every step
                k, v = cache.k[layer], cache.v[layer]
            else:              # eager: only the n filled positions (less work than openai's growing cache)
                n = cache.offset + x.shape[1]
                k, v = cache.k[layer, :, :, :n], cache.v[layer, :, :, :n]
                causal, mask = False, mask if x.shape[1] > 1 else None
        x = x + self.attn(h, k, v, causal=causal, mask=mask)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_attn_ln(x), *cross_kv, qk_out=qk_out)
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    """§2.2: two conv layers with GELU (the second strides by 2: 100 Hz mel -> 50 Hz), sinusoidal positions,
    pre-LN blocks, a final LayerNorm."""
    def __init__(self, n_mels, n_ctx, d, n_head, n_layer):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(n_ctx, d))  # official files hold it
        self.blocks = nn.ModuleList(ResidualAttentionBlock(d, n_head) for _ in range(n_layer))
        self.ln_post = LayerNorm(d)

    def forward(self, mel):                              # mel: (B, n_mels, 2 * n_ctx)
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)        # (B, n_ctx, D)
        if x.shape[1:] != self.positional_embedding.shape:
            raise ValueError(f"the encoder takes exactly {2 * self.positional_embedding.shape[0]} mel frames "
                             f"(got {mel.shape[-1]}): pad or trim the window")
        x = x + self.positional_embedding
        for block in self.blocks:
            x = block(x)                                 # bidirectional self-attention
        return self.ln_post(x)


class KVCache:
    """Explicit decoder cache: self-attention K/V fill a preallocated (layers, B, H, n_ctx, Dh) buffer, cross-
    attention K/V are computed once from the audio. `offset` (an int) serves the eager path, which attends to
    the filled part only; `pos` (a device tensor) the static path of DecoderStep: one shape, no host value."""
    def __init__(self, decoder, xa):
        self.cross = [b.cross_attn.kv(xa) for b in decoder.blocks]   # [(B, H, n_audio_ctx, Dh)] * 2 per layer
        B, H, _, Dh = self.cross[0][0].shape
        shape = (len(decoder.blocks), B, H, decoder.n_ctx, Dh)
        self.k = xa.new_zeros(shape, dtype=self.cross[0][0].dtype)   # the compute dtype (bf16 under autocast)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.zeros((), dtype=torch.long, device=xa.device)
        self.offset, self.static = 0, False

    def reorder(self, idx):
        """Beam search: each row takes its source hypothesis's K/V, in place (a captured graph points at these
        buffers). Cross K/V stay: beams of one audio swap only among themselves."""
        n = self.k.shape[3] if self.static else self.offset   # eager: only the filled positions move
        for buf in (self.k[:, :, :, :n], self.v[:, :, :, :n]):
            buf.copy_(buf.index_select(1, idx))


class DecoderStep:
    """decode()'s one-token step with its input, cache and position in fixed buffers, so it can be compiled
    and, on CUDA, captured once as a CUDA graph and replayed at every token (at small batch a GPU is bound
    by kernel launches, not arithmetic). method: eager | compiled | cudagraph | compiled_cudagraph."""
    def __init__(self, decoder, cache, method="eager"):
        self.decoder, self.cache, self.method = decoder, cache, method
        self.token = torch.zeros(cache.k.shape[1], 1, dtype=torch.long, device=cache.k.device)
        self.fn, self.graph, self.out = self._step, None, None
        if method != "eager":
            cache.static = True
            cache.pos.fill_(cache.offset)
        if method.startswith("compiled"):
            self.fn = torch.compile(self._step, dynamic=False)

    def _step(self):
        return self.decoder(self.token, cache=self.cache)[:, -1]        # (B, n_vocab)

    def _capture(self):
        pos = self.cache.pos.clone()                     # warm-up writes K/V ahead: masked, overwritten
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                self.fn()                                # compilation, cuBLAS handles: outside the graph
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.fn()
        self.cache.pos.copy_(pos)

    def __call__(self, token):                           # token (B, 1) -> logits (B, n_vocab), fp32
        self.token.copy_(token)
        if self.method == "eager":
            return self.fn()
        if not self.method.endswith("cudagraph"):
            out = self.fn()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            out = self.out.clone()
        self.cache.offset += 1
        return out


class TextDecoder(nn.Module):
    """§2.2: token embedding + learned positions, causal pre-LN blocks with cross-attention to the audio,
    a final LayerNorm, and logits through the (tied) token embedding."""
    def __init__(self, n_vocab, n_ctx, d, n_head, n_layer):
        super().__init__()
        self.n_ctx, self.d = n_ctx, d
        self.token_embedding = nn.Embedding(n_vocab, d)
        self.positional_embedding = nn.Parameter(torch.empty(n_ctx, d))
        self.blocks = nn.ModuleList(ResidualAttentionBlock(d, n_head, cross=True) for _ in range(n_layer))
        self.ln = LayerNorm(d)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, tokens, xa=None, cache=None, qk_out=None):  # (B, T) -> fp32 logits (B, T, n_vocab);
        # qk_out: a list that receives each layer's cross-attention logits (B, H, T, n_audio_ctx)
        T = tokens.shape[1]
        if cache is None:                                # full causal forward (training, parity)
            x = self.token_embedding(tokens) + self.positional_embedding[:T]
            cross = [b.cross_attn.kv(xa) for b in self.blocks]
            pos = mask = None
        else:                                            # incremental: positions continue after the cache
            pos = torch.arange(T, device=tokens.device) + (cache.pos if cache.static else cache.offset)
            x = self.token_embedding(tokens) + self.positional_embedding[pos]
            cross = cache.cross
            n = self.n_ctx if cache.static else cache.offset + T
            mask = torch.arange(n, device=tokens.device)[None, :] <= pos[:, None]  # (T, n): causal, filled
        for i, block in enumerate(self.blocks):
            x = block(x, cross[i], cache, i, pos, mask, qk_out)
        if cache is not None:
            cache.pos.add_(T)
            if not cache.static:                         # DecoderStep counts the static steps
                cache.offset += T
        x = self.ln(x)
        return (x @ self.token_embedding.weight.to(x.dtype).t()).float()   # tied output embedding


class Whisper(nn.Module):
    def __init__(self, dims, tokenizer=None):            # dims: the official ModelDimensions as a dict
        super().__init__()
        self.dims = d = dict(dims)
        self.tokenizer = tokenizer                       # travels with the model (and the checkpoint)
        self.encoder = AudioEncoder(d["n_mels"], d["n_audio_ctx"], d["n_audio_state"], d["n_audio_head"],
                                    d["n_audio_layer"])
        self.decoder = TextDecoder(d["n_vocab"], d["n_text_ctx"], d["n_text_state"], d["n_text_head"],
                                   d["n_text_layer"])

    def forward(self, mel, tokens):
        return self.decoder(tokens, self.encoder(mel))


def model_dims(cfg, n_vocab):
    return dict({k: getattr(cfg, k) for k in ARCH_KEYS}, n_vocab=n_vocab)

# ----------------------------------------------------------------------------- tokenizer
# Byte-level BPE through tiktoken, with Whisper's special tokens appended after the ranks in the official
# order (§2.3): <|endoftext|>, <|startoftranscript|>, one token per language, <|translate|>, <|transcribe|>,
# <|startoflm|>, <|startofprev|>, <|nospeech|>, <|notimestamps|>, then 1501 timestamps <|0.00|> ... <|30.00|>.

class Tokenizer:
    """Text <-> token ids. Special ids follow from the number of ranks, so the same code serves gpt2.tiktoken
    (English-only models), multilingual.tiktoken and our small corpus BPE."""
    def __init__(self, ranks, num_languages=99, name="whisper-bpe"):
        self.ranks_text = common.ranks_to_text(ranks)
        self.num_languages = num_languages
        self.languages = LANGUAGES[:num_languages]
        specials = (["<|endoftext|>", "<|startoftranscript|>"] + [f"<|{l}|>" for l in self.languages]
                    + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
                       "<|notimestamps|>"] + [f"<|{i * TIME_PRECISION:.2f}|>" for i in range(N_TIMESTAMPS)])
        self.enc = common.bpe_encoding(ranks, specials, name)  # specials numbered after the ranks
        n = len(ranks)
        ids = {s: n + i for i, s in enumerate(specials)}
        self.n_vocab = n + len(specials)
        self.eot, self.sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
        self.translate, self.transcribe = ids["<|translate|>"], ids["<|transcribe|>"]
        self.sot_lm, self.sot_prev = ids["<|startoflm|>"], ids["<|startofprev|>"]
        self.no_speech, self.no_timestamps = ids["<|nospeech|>"], ids["<|notimestamps|>"]
        self.timestamp_begin = ids["<|0.00|>"]
        # English-only official models (gpt2.tiktoken, 50256 ranks) start with <|startoftranscript|> alone
        self.multilingual = n != 50256

    @property
    def language_tokens(self):                          # <|en|>, <|zh|>, ... in vocabulary order
        return list(range(self.sot + 1, self.sot + 1 + self.num_languages))

    def extra(self):                                     # what the checkpoint stores to rebuild it
        return {"tokenizer": self.ranks_text, "num_languages": self.num_languages}

    @classmethod
    def from_extra(cls, extra):
        return cls(common.ranks_from_text(extra["tokenizer"]), extra["num_languages"])

    @classmethod
    def from_file(cls, path, num_languages=99):
        with open(path) as f:
            return cls(common.ranks_from_text(f.read()), num_languages, name=os.path.basename(path))

    def encode(self, text):
        return self.enc.encode_ordinary(text)            # special-token text in a transcript stays plain text

    def decode(self, tokens):
        return self.enc.decode([t for t in tokens if t < self.eot])

    def sot_sequence(self, language="en", task="transcribe"):
        if not self.multilingual:
            return [self.sot]
        return [self.sot, self.sot + 1 + self.languages.index(language),
                self.transcribe if task == "transcribe" else self.translate]

    def split_to_word_tokens(self, tokens):
        """Words and their tokens (openai's split_tokens_on_spaces): cut where whole characters decode, then
        glue pieces to the previous word unless they start with a space, are punctuation or are special."""
        pieces, cur = [], []
        for t in tokens:
            cur.append(t)
            text = self.enc.decode(cur)
            if "\ufffd" not in text:                      # a multi-byte character may span several tokens
                pieces.append((text, cur))
                cur = []
        words, word_tokens = [], []
        for text, toks in pieces:
            if toks[0] >= self.eot or text.startswith(" ") or text.strip() in string.punctuation or not words:
                words.append(text)
                word_tokens.append(list(toks))
            else:
                words[-1] += text
                word_tokens[-1] += toks
        return words, word_tokens

    def timestamp(self, seconds):
        return self.timestamp_begin + int(min(N_TIMESTAMPS - 1, max(0, round(seconds / TIME_PRECISION))))

    def non_speech_tokens(self):
        """Tokens of symbols never spoken (speaker tags, music notes, brackets): a symbol only where it is one
        token, a hyphen/quote only at word start, music symbols by their first byte-token."""
        if getattr(self, "_non_speech", None) is not None:
            return list(self._non_speech)
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』') + \
            "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
        music = "♩♪♫♬♭♮♯"
        out = set()
        for s in (" -", " '"):
            t = self.encode(s)
            if len(t) == 1:
                out.add(t[0])
        for s in symbols + list(music):
            for t in (self.encode(s), self.encode(" " + s)):
                # a small BPE may split " ♪" into " " + ...: never ban the bare space, words need it
                if (len(t) == 1 or s in music) and self.enc.decode_single_token_bytes(t[0]).strip():
                    out.add(t[0])
        self._non_speech = sorted(out)
        return list(self._non_speech)


def build_tokenizer(cfg, texts=None, n_vocab=None):
    """The official vocabulary from --tokenizer=PATH, else a BPE trained on the training transcripts."""
    if cfg.tokenizer:
        if not os.path.exists(cfg.tokenizer):
            raise SystemExit(f"error: --tokenizer={cfg.tokenizer!r} does not exist")
        langs = 100 if cfg.n_mels == 128 else 99         # large-v3 added <|yue|>
        if n_vocab is not None:                          # official weights: n_vocab says how many languages
            langs = n_vocab - 51765 - int(n_vocab >= 51865)
        return Tokenizer.from_file(cfg.tokenizer, langs)
    # transcripts are encoded with a leading space (" word" tokens, as GPT-2's): train on them that way too.
    # English only: one language token; more: the official 99, so <|fr|> etc. sit where openai's are
    langs = 1 if cfg.corpus_languages.replace(" ", "") == "en" else len(LANGUAGES) - 1
    return Tokenizer(common.train_bpe([" " + t.strip() for t in texts], cfg.bpe_vocab), num_languages=langs)

# ----------------------------------------------------------------------------- loss

def loss_fn(logits, targets):
    """Next-token cross-entropy (§2.3) on the sampled part only: prompt positions and padding are -100."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)

# ----------------------------------------------------------------------------- data

def window_samples(cfg):
    return cfg.n_audio_ctx * 2 * HOP                     # 1500 positions -> 480 000 samples = 30 s


def window_mels(wavs, cfg, device):
    """Each clip zero-padded or cut to one window -> log-mels (B, n_mels, 2 * n_audio_ctx). One at a time:
    the dynamic-range clip (max - 8, §2.2) uses the whole tensor's max: loud clips would alter quiet ones."""
    N = window_samples(cfg)
    x = torch.zeros(len(wavs), N)
    for j, w in enumerate(wavs):
        w = np.asarray(w, dtype=np.float32)[:N]
        x[j, :len(w)] = torch.from_numpy(w)
    return torch.stack([common.log_mel_spectrogram(w.to(device), n_mels=cfg.n_mels) for w in x])


def add_noise(wav, snr_db, rng):
    """wav plus white noise at snr_db (10 log10 of signal power over noise power): §3.7's robustness test."""
    wav = np.asarray(wav, dtype=np.float32)
    power = float(np.mean(wav ** 2)) or 1e-8
    return wav + rng.standard_normal(len(wav)).astype(np.float32) * np.sqrt(power / 10 ** (snr_db / 10))


def has_word_times(utt):
    return bool(utt.words) and len(utt.words) == len(utt.text.split())


def trainable(utts, cfg, what):
    """Clips with a transcript that fit in a window, or longer ones whose word times say what a crop holds."""
    N = window_samples(cfg)
    texted = [u for u in utts if u.text.strip()]
    keep = [u for u in texted if u.duration * SAMPLE_RATE <= N or has_word_times(u)]
    long = len(texted) - len(keep)
    if long:
        common.log(f"{what}: skipped {long} of {len(utts)} clips longer than the "
                   f"{N / SAMPLE_RATE:.1f} s window without word times (a crop's transcript is unknown)")
    if len(texted) < len(utts):
        common.log(f"{what}: skipped {len(utts) - len(texted)} clips without a transcript")
    return keep


def target_tokens(tok, text, words=None, cuts=None, prompt=None, n_text_ctx=448, language="en",
                  task="transcribe"):
    """One training sequence in the multitask format (§2.3, Fig. 1) and the index of its first target:
    [<|startofprev|> previous text] <|startoftranscript|> <|en|> <|transcribe|>
      ( <|notimestamps|> text | <|t0|> text <|t1|> <|t1'|> text <|t2|> ... ) <|endoftext|>
    words: [(word, start_s, end_s)] relative to the window; cuts: word indices where a timed segment begins
    (None: no timestamps). Targets start after <|startoftranscript|>: the prompt is context only."""
    seq = [] if prompt is None else [tok.sot_prev] + tok.encode(" " + prompt.strip())[-(n_text_ctx // 2 - 1):]
    loss_from = len(seq) + 1
    seq += tok.sot_sequence(language, task)
    if cuts is None:
        seq += [tok.no_timestamps] + tok.encode(" " + text.strip())
    else:
        last = 0
        for a, b in zip([0] + cuts, cuts + [len(words)]):
            seg = words[a:b]
            ts0 = max(last, tok.timestamp(seg[0][1]))
            ts1 = max(ts0 + 1, tok.timestamp(seg[-1][2]))  # time never goes back; a segment has length
            seq += [ts0] + tok.encode(" " + " ".join(w for w, _, _ in seg)) + [ts1]
            last = ts1
    seq.append(tok.eot)
    if len(seq) > n_text_ctx + 1:                        # too long: drop the prompt, then cut the tail
        seq, loss_from = seq[loss_from - 1:][:n_text_ctx + 1], 1
    return seq, loss_from


def collate(examples, tok, cfg, device):
    """[(wav, seq, loss_from)] -> mel (B, n_mels, frames), inputs x (B, L), targets y (B, L): position i
    predicts token i + 1, and y is -100 where no loss is taken (prompt, <|startoftranscript|>, padding)."""
    L = max(len(s) for _, s, _ in examples) - 1
    x = torch.full((len(examples), L), tok.eot, dtype=torch.long)
    y = torch.full((len(examples), L), -100, dtype=torch.long)
    for j, (_, s, lf) in enumerate(examples):
        s = torch.tensor(s)
        x[j, :len(s) - 1] = s[:-1]
        y[j, lf - 1:len(s) - 1] = s[lf:]
    return window_mels([w for w, _, _ in examples], cfg, device), x.to(device), y.to(device)


class Batches:
    """Random (audio window, multitask sequence) examples; a generator per rank, saved in the checkpoint."""
    def __init__(self, utts, tok, cfg, seed=1337, rank=0, world_size=1):
        self.utts, self.tok, self.cfg, self.N = utts, tok, cfg, window_samples(cfg)
        self.rng = np.random.default_rng([seed, rank, world_size])

    def state_dict(self):
        return self.rng.bit_generator.state

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state

    def example(self, utt):
        tok, cfg, rng, N = self.tok, self.cfg, self.rng, self.N
        if rng.random() < cfg.p_nospeech:                # VAD: quiet noise, target <|nospeech|>
            wav = (rng.standard_normal(N) * 10 ** rng.uniform(-4, -2)).astype(np.float32)
            return wav, [tok.sot, tok.no_speech, tok.eot], 1
        wav, text = utt.wav, utt.text.strip()
        words = list(utt.words) if has_word_times(utt) else []
        if len(wav) > N:                                 # longer than a window: start at a random word
            t0 = words[int(rng.integers(len(words)))][1]
            start = int(t0 * SAMPLE_RATE)
            wav, t1 = wav[start:start + N], t0 + N / SAMPLE_RATE
            words = [(w, s - t0, e - t0) for w, s, e in words if s >= t0 and e <= t1]
            text = " ".join(w for w, _, _ in words)
            if not words:                                # one word longer than the window
                return wav, [tok.sot, tok.no_speech, tok.eot], 1
        if rng.random() < cfg.p_noise:                   # noise augmentation (our flag)
            wav = add_noise(wav, rng.uniform(0, 30), rng)
        prompt = None
        if rng.random() < cfg.p_prompt:                  # previous-text conditioning (§2.3); no loss on it
            prompt = self.utts[int(rng.integers(len(self.utts)))].text
        language, task, cuts = utt.language, "transcribe", None
        if language != "en" and utt.translation and rng.random() < cfg.p_translate:
            task, text, words = "translate", utt.translation, []   # X -> English; the word times are X's
        if words and rng.random() < cfg.p_timestamps:    # 1-3 timed segments split at word boundaries
            k = 1 + int(rng.integers(min(3, len(words))))
            cuts = sorted((rng.permutation(len(words) - 1)[:k - 1] + 1).tolist())
        seq, loss_from = target_tokens(tok, text, words, cuts, prompt, cfg.n_text_ctx, language, task)
        return wav, seq, loss_from

    def next(self, batch_size, device, items=None):
        items = items if items is not None else self.rng.integers(len(self.utts), size=batch_size).tolist()
        return collate([self.example(self.utts[i]) for i in items], self.tok, self.cfg, device)


def get_batch(sampler, cfg, rt):
    """mel (B, n_mels, frames), input tokens (B, L), targets (B, L), on rt.device."""
    return sampler.next(cfg.batch_size, rt.device)

# ----------------------------------------------------------------------------- decoding
# §4.5 and whisper/decoding.py: logit rules, greedy / sampling / beam search, ranking, temperature fallback.

class LogitRules:
    """Next-token masks in the official order: no blank start, no non-speech or control token, timestamps."""
    def __init__(self, tok, sample_begin, timestamps, max_initial_timestamp=1.0, n_audio_ctx=1500):
        self.tok, self.sample_begin, self.timestamps = tok, sample_begin, timestamps
        self.last_timestamp = tok.timestamp_begin + n_audio_ctx  # the window's end (<|30.00|> for 30 s)
        self.blank = tok.encode(" ") + [tok.eot]
        self.suppress = tok.non_speech_tokens() + [tok.transcribe, tok.translate, tok.sot, tok.sot_prev,
                                                   tok.sot_lm, tok.no_speech]
        self.max_initial = (None if max_initial_timestamp is None
                            else round(max_initial_timestamp / TIME_PRECISION))

    def __call__(self, logits, tokens):                  # logits (B, V) fp32, edited in place; tokens (B, T)
        tok, tb, inf = self.tok, self.tok.timestamp_begin, float("-inf")
        if tokens.shape[1] == self.sample_begin:         # no empty transcript, no leading space
            logits[:, self.blank] = inf
        logits[:, self.suppress] = inf
        if not self.timestamps:
            return
        logits[:, tok.no_timestamps] = inf
        logits[:, self.last_timestamp + 1:] = inf        # no time past the window (shorter-window presets)
        for k in range(tokens.shape[0]):
            seq = tokens[k, self.sample_begin:].tolist()
            last_ts = len(seq) >= 1 and seq[-1] >= tb
            penult_ts = len(seq) < 2 or seq[-2] >= tb
            if last_ts:                                  # timestamps come in pairs (except right before eot)
                if penult_ts:
                    logits[k, tb:] = inf                 # a pair just closed: text must follow
                else:
                    logits[k, :tok.eot] = inf            # a segment just ended: timestamp or eot next
            stamps = [t for t in seq if t >= tb]
            if stamps:                                   # time never goes back; a segment has non-zero length
                floor = stamps[-1] if last_ts and not penult_ts else stamps[-1] + 1
                logits[k, tb:floor] = inf
        if tokens.shape[1] == self.sample_begin:         # the first token is a timestamp, and an early one
            logits[:, :tb] = inf
            if self.max_initial is not None:
                logits[:, tb + self.max_initial + 1:] = inf
        logprobs = F.log_softmax(logits, dim=-1)         # time likelier than any text token: take it
        ts_mass = logprobs[:, tb:].logsumexp(-1)
        text_max = logprobs[:, :tb].max(-1).values
        logits[ts_mass > text_max, :tb] = inf


@dataclass
class DecodeResult:
    tokens: list                 # sampled tokens, without <|endoftext|>
    text: str
    avg_logprob: float
    no_speech_prob: float
    temperature: float
    compression_ratio: float


def compression_ratio(text):
    """gzip ratio of the text: repetition loops (a classic seq2seq failure, §4.5) compress very well."""
    b = text.encode("utf-8")
    return len(b) / max(1, len(zlib.compress(b)))


def initial_tokens(tok, cfg, prompt=None, timestamps=True, language="en", task="transcribe"):
    """[<|startofprev|> previous text (at most half the context, §4.5)] + the sot sequence
    (+ <|notimestamps|>); returns (tokens, index of <|startoftranscript|>)."""
    initial = [tok.sot_prev] + list(prompt)[-(cfg.n_text_ctx // 2 - 1):] if prompt else []
    sot_index = len(initial)
    return initial + tok.sot_sequence(language, task) + ([] if timestamps else [tok.no_timestamps]), sot_index


def sample_step(logits, tokens, sum_lp, temperature, eot, generator=None):
    """Greedy (temperature 0) or sampled next tokens; finished rows keep emitting eot."""
    logprobs = F.log_softmax(logits, dim=-1)
    if temperature == 0:
        nxt = logits.argmax(-1)
    else:
        nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator).squeeze(1)
    done = tokens[:, -1] == eot
    sum_lp = sum_lp + logprobs.gather(1, nxt[:, None]).squeeze(1) * (~done)
    nxt[done] = eot
    tokens = torch.cat([tokens, nxt[:, None]], 1)
    return tokens, sum_lp, bool((tokens[:, -1] == eot).all())


def beam_step(logits, tokens, sum_lp, finished, beam_size, max_cand, eot, cache):
    """Beam search (§4.5): expand each live hypothesis by its top beam+1 tokens, keep the best `beam` that
    did not end; those that ended go to `finished` ({tokens: score} per audio) up to beam * patience."""
    top_lp, top_id = F.log_softmax(logits, dim=-1).topk(beam_size + 1)   # (rows, beam + 1), all rows at once
    top_lp, top_id, prev, prev_lp = top_lp.tolist(), top_id.tolist(), tokens.tolist(), sum_lp.tolist()
    rows, src, scores = [], [], []
    for a in range(len(finished)):
        cand = {}
        for j in range(a * beam_size, (a + 1) * beam_size):
            prefix = tuple(prev[j])
            for lp, t in zip(top_lp[j], top_id[j]):
                cand[prefix + (t,)] = (prev_lp[j] + lp, j)
        new_fin = {}
        for seq in sorted(cand, key=lambda s: cand[s][0], reverse=True):
            if seq[-1] == eot:
                new_fin[seq] = cand[seq][0]
            else:
                rows.append(seq)
                src.append(cand[seq][1])
                scores.append(cand[seq][0])
                if len(rows) == (a + 1) * beam_size:
                    break
        for seq in sorted(new_fin, key=new_fin.get, reverse=True)[:max(0, max_cand - len(finished[a]))]:
            finished[a][seq] = new_fin[seq]
    cache.reorder(torch.tensor(src, device=tokens.device))
    tokens = torch.tensor(rows, device=tokens.device)
    return tokens, torch.tensor(scores, device=tokens.device), all(len(f) >= max_cand for f in finished)


def candidates(tokens, sum_lp, finished, n_group, sample_begin, eot):
    """Per audio: [(sampled tokens without eot, summed log-prob)]. Beam search tops up the finished hypotheses
    with the best unfinished ones (an eot appended) when fewer than beam_size ended."""
    out = []
    for a in range(tokens.shape[0] // n_group):
        rows = range(a * n_group, (a + 1) * n_group)
        if finished is None:
            group = [tokens[j, sample_begin:].tolist() for j in rows]
            out.append([(t[:t.index(eot)] if eot in t else t, sum_lp[j].item()) for t, j in zip(group, rows)])
            continue
        fin = dict(finished[a])
        for j in sorted(rows, key=lambda j: -sum_lp[j].item()):
            if len(fin) >= n_group:
                break
            fin.setdefault(tuple(tokens[j].tolist()) + (eot,), sum_lp[j].item())
        out.append([(list(s[sample_begin:-1]), lp) for s, lp in fin.items()])
    return out


def best_result(group, tok, no_speech, temperature, cfg):
    """The candidate with the best length-normalised log-prob (or the GNMT penalty, §4.5)."""
    def score(c):
        L = len(c[0])
        return c[1] / (L if not cfg.length_penalty else ((5 + L) / 6) ** cfg.length_penalty)
    toks, lp = max(group, key=score)
    text = tok.decode(toks)
    return DecodeResult(toks, text, lp / (len(toks) + 1), no_speech, temperature, compression_ratio(text))


@torch.no_grad()
def decode(model, tok, mel, cfg, temperature=0.0, beam_size=None, best_of=None, timestamps=True, prompt=None,
           generator=None, language="en", task="transcribe"):
    """One window per item of mel (B, n_mels, frames) or of encoder features (B, n_audio_ctx, n_audio_state):
    temperature 0: greedy (beam_size <= 1) or beam search; > 0: best_of samples. -> [DecodeResult]"""
    beam_size = cfg.beam_size if beam_size is None else beam_size
    best_of = cfg.best_of if best_of is None else best_of
    use_beam = temperature == 0 and beam_size > 1
    n_group = beam_size if use_beam else (best_of if temperature > 0 else 1)
    initial, sot_index = initial_tokens(tok, cfg, prompt, timestamps, language, task)
    sample_begin = len(initial)
    sample_len = min(cfg.sample_len or cfg.n_text_ctx // 2, cfg.n_text_ctx - sample_begin)
    rules = LogitRules(tok, sample_begin, timestamps, cfg.max_initial_timestamp, cfg.n_audio_ctx)
    B = mel.shape[0]
    encoded = mel.shape[1:] == (model.dims["n_audio_ctx"], model.dims["n_audio_state"])
    xa = (mel if encoded else model.encoder(mel)).repeat_interleave(n_group, 0)   # (B * n_group, A, D)
    tokens = torch.tensor([initial], device=mel.device).repeat(B * n_group, 1)
    cache = KVCache(model.decoder, xa)
    sum_lp = torch.zeros(B * n_group, device=mel.device)
    finished = [dict() for _ in range(B)] if use_beam else None
    step = None
    for i in range(sample_len):
        if i == 0:                                       # the prompt at once; P(<|nospeech|>) after <|sot|>
            logits = model.decoder(tokens, cache=cache)
            no_speech = logits[::n_group, sot_index].softmax(-1)[:, tok.no_speech].tolist()
            logits = logits[:, -1]
            step = DecoderStep(model.decoder, cache, decode_method(cfg, mel.device))
        else:
            logits = step(tokens[:, -1:])
        rules(logits, tokens)
        if use_beam:
            tokens, sum_lp, stop = beam_step(logits, tokens, sum_lp, finished, beam_size,
                                             round(beam_size * cfg.patience), tok.eot, cache)
        else:
            tokens, sum_lp, stop = sample_step(logits, tokens, sum_lp, temperature, tok.eot, generator)
        if stop:
            break
    groups = candidates(tokens, sum_lp, finished, n_group, sample_begin, tok.eot)
    return [best_result(g, tok, no_speech[a], temperature, cfg) for a, g in enumerate(groups)]


def decode_method(cfg, device):
    """auto: eager on a CPU; on CUDA a CUDA graph of the step, compiled first with --compile=True."""
    if cfg.decode_method != "auto":
        return cfg.decode_method
    if torch.device(device).type != "cuda":
        return "eager"
    return "compiled_cudagraph" if cfg.compile else "cudagraph"


def decode_with_fallback(model, tok, mel, cfg, prompt=None, timestamps=True, generator=None, language="en"):
    """§4.5: decode at temperature 0 (beam search); if the result looks like a loop (gzip ratio) or is
    unlikely (mean log-prob), retry at the next temperature with sampling. A silent window is accepted."""
    for t in cfg.temperatures:
        r = decode(model, tok, mel, cfg, temperature=t, prompt=prompt, timestamps=timestamps,
                   generator=generator, language=language, task=cfg.task)[0]
        bad = r.compression_ratio > cfg.compression_ratio_threshold or r.avg_logprob < cfg.logprob_threshold
        if r.no_speech_prob > cfg.no_speech_threshold and r.avg_logprob < cfg.logprob_threshold:
            bad = False
        if not bad:
            break
    return r


@torch.no_grad()
def detect_language(model, tok, mel):
    """Language ID (§2.3): one decoder step on <|startoftranscript|>, softmax over the language tokens only.
    mel (B, n_mels, T) -> [{code: prob}], likeliest first."""
    if not tok.multilingual:
        raise SystemExit("error: an English-only vocabulary has no language tokens: drop --language=auto")
    x = torch.full((mel.shape[0], 1), tok.sot, device=mel.device)
    logits = model(mel, x)[:, 0]                         # (B, n_vocab)
    probs = logits[:, tok.language_tokens].softmax(-1)   # (B, num_languages)
    return [{tok.languages[i]: p[i] for i in sorted(range(len(p)), key=lambda i: -p[i])}
            for p in probs.tolist()]

# word timestamps (openai-whisper's timing.py): the cross-attention of the decoder's top half looks at the
# audio frames each text token came from; a monotonic path through it (DTW) gives each token a time.

def median_filter(x, width):
    """Median over a sliding window of the last dim, reflect-padded."""
    if x.shape[-1] <= width // 2:
        return x
    shape = x.shape
    x = F.pad(x.reshape(-1, 1, shape[-1]), (width // 2, width // 2), mode="reflect")   # (N, 1, T + width - 1)
    return x.unfold(-1, width, 1).sort()[0][..., width // 2].reshape(shape)


def dtw(cost):
    """Dynamic time warping on a (tokens, frames) cost matrix: the cheapest monotonic path from (0, 0) to the
    end, moving diagonally, down a token or right a frame. Returns (token indices, frame indices) along it."""
    N, M = cost.shape
    acc = np.full((N + 1, M + 1), np.inf)
    trace = np.zeros((N + 1, M + 1), dtype=np.int8)
    acc[0, 0] = 0
    for j in range(1, M + 1):
        for i in range(1, N + 1):
            c0, c1, c2 = acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]
            if c0 < c1 and c0 < c2:                      # ties go to "right", as openai's
                c, t = c0, 0
            elif c1 < c0 and c1 < c2:
                c, t = c1, 1
            else:
                c, t = c2, 2
            acc[i, j], trace[i, j] = cost[i - 1, j - 1] + c, t
    trace[0, :], trace[:, 0] = 2, 1
    i, j, path = N, M, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        t = trace[i, j]
        i, j = (i - 1, j - 1) if t == 0 else (i - 1, j) if t == 1 else (i, j - 1)
    return np.array(path[::-1]).T


@torch.no_grad()
def find_alignment(model, tok, text_tokens, mel, num_frames, language="en", medfilt_width=7):
    """[(word, tokens, start_s, end_s, probability)] for text_tokens of one window mel (1, n_mels, frames)."""
    if not text_tokens:
        return []
    sot = tok.sot_sequence(language, "transcribe")
    tokens = torch.tensor([sot + [tok.no_timestamps] + text_tokens + [tok.eot]], device=mel.device)
    qks = []
    logits = model.decoder(tokens, model.encoder(mel), qk_out=qks)[0]
    probs = logits[len(sot):, :tok.eot].softmax(-1)      # the no-timestamps position predicts the first token
    token_probs = probs[torch.arange(len(text_tokens)), torch.tensor(text_tokens)].tolist()
    L = len(qks)
    w = torch.cat([qk[0] for qk in qks[L // 2:]])        # (heads of the top half, tokens, n_audio_ctx)
    w = w[:, :, :num_frames // 2].softmax(-1)            # the content frames only
    std, mean = torch.std_mean(w, dim=-2, keepdim=True, unbiased=False)
    w = median_filter((w - mean) / std, medfilt_width)   # per frame normalised over tokens, smoothed in time
    matrix = w.mean(0)[len(sot):-1]                      # (1 + text tokens, frames): <|notimestamps|> .. last
    text_idx, time_idx = dtw(-matrix.double().cpu().numpy())
    words, word_tokens = tok.split_to_word_tokens(text_tokens + [tok.eot])
    if len(word_tokens) <= 1:
        return []
    bounds = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    jumps = np.pad(np.diff(text_idx), (1, 0), constant_values=1).astype(bool)
    jump_times = time_idx[jumps] * TIME_PRECISION        # the first frame of each token on the path
    return [(wd, wt, float(jump_times[a]), float(jump_times[b]), float(np.mean(token_probs[a:b])))
            for wd, wt, a, b in zip(words, word_tokens, bounds[:-1], bounds[1:])]


def merge_punctuations(words, prepended="\"'“¿([{-", appended="\"'.。,，!！?？:：”)]}、"):
    """openai's merge: an opening mark joins the following word, a closing mark the previous one."""
    words = [list(w) for w in words]
    i, j = len(words) - 2, len(words) - 1
    while i >= 0:
        if words[i][0].startswith(" ") and words[i][0].strip() in prepended:
            words[j][0], words[j][1] = words[i][0] + words[j][0], words[i][1] + words[j][1]
            words[i][0], words[i][1] = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(words):
        if not words[i][0].endswith(" ") and words[j][0] in appended:
            words[i][0], words[i][1] = words[i][0] + words[j][0], words[i][1] + words[j][1]
            words[j][0], words[j][1] = "", []
        else:
            i = j
        j += 1
    return words


def add_word_timestamps(segments, model, tok, mel, num_frames, offset, language="en"):
    """Attach [(word, start_s, end_s, probability)] to each segment of one window (aligned together)."""
    per_seg = [[t for t in s.tokens if t < tok.eot] for s in segments]
    words = merge_punctuations(find_alignment(model, tok, sum(per_seg, []), mel, num_frames, language))
    k = 0
    for seg, toks in zip(segments, per_seg):
        seg.words, n = [], 0
        while k < len(words) and n < len(toks):
            w, wt, a, b, p = words[k]
            if w:
                seg.words.append((w, round(offset + a, 2), round(offset + b, 2), p))
            n, k = n + len(wt), k + 1


@dataclass
class Segment:
    start: float
    end: float
    tokens: list
    text: str
    words: list = field(default_factory=list)


def window_segments(toks, tok, offset, size_frames):
    """Segments of one window's tokens: one per closed timestamp pair, plus the tail when the window ends on a
    single timestamp; with no pair, one for the window. -> (segments, frames consumed)"""
    tb = tok.timestamp_begin
    is_ts = [t >= tb for t in toks]
    single_end = is_ts[-2:] == [False, True]
    pairs = [i for i in range(1, len(toks)) if is_ts[i] and is_ts[i - 1]]
    segs = []
    if pairs:                                            # <|t0|> text <|t1|><|t1'|> text <|t2|> ...
        last = 0
        for c in pairs + ([len(toks)] if single_end else []):
            piece = toks[last:c]
            segs.append(Segment(offset + (piece[0] - tb) * TIME_PRECISION,
                                offset + (piece[-1] - tb) * TIME_PRECISION, piece, tok.decode(piece)))
            last = c
        # ended on a closed pair: the unfinished segment after it is dropped, and the next window starts there
        consumed = size_frames if single_end else (toks[last - 1] - tb) * 2
    else:
        stamps = [t for t in toks if t >= tb]
        dur = ((stamps[-1] - tb) * TIME_PRECISION if stamps and stamps[-1] != tb
               else size_frames * HOP / SAMPLE_RATE)
        segs.append(Segment(offset, offset + dur, toks, tok.decode(toks)))
        consumed = size_frames
    return segs, consumed


@torch.no_grad()
def transcribe(model, tok, wav, cfg, device, generator=None):
    """Long-form transcription (§4.5): slide a window over the whole file, seeking to the last predicted
    timestamp; the text of the completed segments is the next window's prompt. The mel is computed once over
    the file (plus a window of zeros), as the official code does. Returns (segments [Segment], text)."""
    N, n_frames = window_samples(cfg), 2 * cfg.n_audio_ctx
    mel = common.log_mel_spectrogram(torch.as_tensor(np.asarray(wav, dtype=np.float32)).to(device),
                                     n_mels=cfg.n_mels, padding=N)
    content = mel.shape[-1] - n_frames
    seek, segments, all_tokens, prompt_from = 0, [], [], 0
    while seek < content:
        size = min(n_frames, content - seek)
        # the mel already runs a window past the content (padding=N): slicing it fills a short window with the
        # log-mel of silence, what training saw for zero-padded audio (openai/whisper pads with 0 here)
        window = mel[:, seek:seek + n_frames][None]     # (1, n_mels, frames)
        offset = seek * HOP / SAMPLE_RATE
        language = cfg.language
        if language == "auto":
            probs = detect_language(model, tok, window)[0]
            language = next(iter(probs))
            top3 = list(probs.items())[:3]
            common.log(f"[{offset:6.2f}] language: " + ", ".join(f"{k} {v:.3f}" for k, v in top3))
        r = decode_with_fallback(model, tok, window, cfg, all_tokens[prompt_from:], generator=generator,
                                 language=language)
        if r.no_speech_prob > cfg.no_speech_threshold and r.avg_logprob < cfg.logprob_threshold:
            seek += size                                 # silence: skip the window
            continue
        segs, consumed = window_segments(r.tokens, tok, offset, size)
        if cfg.word_timestamps:
            add_word_timestamps(segs, model, tok, window, size, offset, language)
        for s in segs:                                   # instantaneous or empty: blanked, as openai does
            if s.start == s.end or not s.text.strip():
                s.text, s.tokens, s.words = "", [], []
        seek += consumed
        segments += segs
        all_tokens += [t for s in segs for t in s.tokens]   # completed segments condition the next window
        if not cfg.condition_on_previous_text or r.temperature > 0.5:
            prompt_from = len(all_tokens)                # a hot decode may be garbage: do not condition on it
    segments = [s for s in segments if s.text.strip()]
    for s in segments:
        s.text = s.text.strip()
    return segments, " ".join(s.text for s in segments)

# ----------------------------------------------------------------------------- train

def make_tokenizer(cfg, texts_fn=None, n_vocab=None, ckpt=None):
    """The vocabulary stored in our checkpoint, else build_tokenizer's (official file or corpus BPE)."""
    if cfg.init_from != "scratch" and _official_file(cfg) is None:
        ckpt = ckpt or common.load_checkpoint(common.checkpoint_path(cfg))
        if not common.is_ours(ckpt):
            raise SystemExit(f"error: {cfg.init_from!r} is neither a nanoaudio checkpoint nor an "
                             "official Whisper file (a dict with 'dims' and 'model_state_dict')")
        common.check_checkpoint(ckpt, cfg, ARCH_KEYS)   # this paper's, and the same architecture
        if "tokenizer" in ckpt.get("extra", {}):
            return Tokenizer.from_extra(ckpt["extra"])
        raise SystemExit(f"error: {common.checkpoint_path(cfg)} holds no tokenizer; "
                         "was it written by whisper.py?")
    tok = build_tokenizer(cfg, texts_fn() if texts_fn and not cfg.tokenizer else [], n_vocab)
    if n_vocab is not None and tok.n_vocab != n_vocab:
        raise SystemExit(f"error: {cfg.tokenizer} gives {tok.n_vocab} tokens but the weights have {n_vocab}")
    return tok


def configure_optimizer(model, cfg):
    """AdamW (§2.4, Appendix F: betas 0.9/0.98, eps 1e-6, wd 0.1); no decay on biases, norms, positions."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "positional" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "positional" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=tuple(cfg.betas),
                              eps=1e-6)


def lr_factor(step, cfg):
    """cfg.lr's multiplier: linear warm-up, then linear decay to zero at lr_decay_iters (§2.4)."""
    if step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    return max(0.0, (cfg.lr_decay_iters - step) / max(1, cfg.lr_decay_iters - cfg.warmup_iters))


def build(cfg, rt, tok):
    """Everything training holds (the checkpoint saves it whole): the model with its tokenizer, AdamW, and the
    lr schedule as a scheduler stepped in train_step (so resume and bench see it)."""
    model = Whisper(model_dims(cfg, tok.n_vocab), tok).to(rt.device)
    opt = configure_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg))
    return dict(model=model, opt=opt, sched=sched)


def train_step(state, batch, cfg, rt):
    """One AdamW step on the next-token loss, gradient norm clipped; train() and bench() both run it."""
    model, opt, sched = state["model"], state["opt"], state["sched"]
    mel, x, y = batch
    with rt.autocast():
        loss = loss_fn(model(mel, x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    sched.step()
    return {"loss": loss.detach()}


def load_for_inference(cfg, rt):
    """The model (tokenizer attached) for sample/eval: our checkpoint, or the authors' file with the dims it
    holds (official_dims set them)."""
    official = _official_file(cfg)
    ckpt = common.load_checkpoint(common.checkpoint_path(cfg), map_location=rt.device)
    tok = make_tokenizer(cfg, n_vocab=official["dims"]["n_vocab"] if official else None, ckpt=ckpt)
    model = Whisper(model_dims(cfg, tok.n_vocab), tok).to(rt.device)
    if official is not None:
        load_official({"model": model}, ckpt)
    else:
        common.load_models(ckpt, cfg, {"model": model}, ARCH_KEYS)
    common.log("model dims: " + ", ".join(f"{k}={v}" for k, v in model.dims.items())
               + f" | {common.count_params(model):,} params")
    return model.eval()


def _interleave(utts):
    """Held-out clips with the languages taken in turn, so the first eval_items hold every language."""
    by = {}
    for u in utts:
        by.setdefault(u.language, []).append(u)
    return [u for group in itertools.zip_longest(*by.values()) for u in group if u is not None]


def _decode_texts(model, tok, utts, cfg, rt, beam, task="transcribe"):
    """One window per clip, batched by language, without timestamps: {clip id: text}."""
    out = {}
    for lang in sorted({u.language for u in utts}):
        group = [u for u in utts if u.language == lang]
        for i in range(0, len(group), 16):
            chunk = group[i:i + 16]
            mel = window_mels([u.wav for u in chunk], cfg, rt.device)
            with rt.autocast():
                rs = decode(model, tok, mel, cfg, timestamps=False, beam_size=beam, language=lang, task=task)
            out.update({u.id: r.text for u, r in zip(chunk, rs)})
    return out


def top_languages(model, tok, utts, cfg, rt):
    """Each clip's likeliest language (§2.3), 16 windows at a time."""
    mels = (window_mels([u.wav for u in utts[i:i + 16]], cfg, rt.device) for i in range(0, len(utts), 16))
    return [next(iter(p)) for mel in mels for p in detect_language(model, tok, mel)]


def word_time_error(model, tok, utts, cfg, rt):
    """Mean absolute error (ms) of the aligned start and end of each reference word vs the corpus's times."""
    errs = []
    for u in utts:
        mel = window_mels([u.wav], cfg, rt.device)
        got = find_alignment(model, tok, tok.encode(" " + u.text.strip()), mel, len(u.wav) // HOP, u.language)
        if len(got) == len(u.words):                     # one aligned word per reference word
            errs += [abs(g[2] - s) for g, (_, s, _) in zip(got, u.words)]
            errs += [abs(g[3] - e) for g, (_, _, e) in zip(got, u.words)]
    return 1000 * float(np.mean(errs)) if errs else float("nan")


@torch.no_grad()
def evaluate(cfg, model=None, rt=None, samples_dir=None, split="test"):
    """WER/CER and the teacher-forced loss on cfg.eval_items held-out clips, each in its own language (long
    ones long-form); with other languages also language-ID accuracy (§2.3) and X -> English WER. The test
    split has unseen sentences and voice. Greedy on val (fast, in training), cfg.beam_size on test."""
    if model is None:
        official_dims(cfg)
        rt = common.setup(cfg)
        model = load_for_inference(cfg, rt)
    tok, was_training = model.tokenizer, model.training
    model.eval()
    utts = common.load_corpus(cfg, split, SAMPLE_RATE)
    utts = _interleave([u for u in utts if u.text.strip()])[:cfg.eval_items]
    if not utts:
        raise SystemExit(f"error: the {split} split has no clips with transcripts")
    N, beam = window_samples(cfg), 0 if split == "val" else cfg.beam_size
    g = torch.Generator().manual_seed(cfg.seed)          # fixed draws: the global RNG is left alone
    fits = [u for u in utts if len(u.wav) <= N]
    hyp = _decode_texts(model, tok, fits, cfg, rt, beam)
    for u in utts:                                       # longer than a window: long-form transcription
        if u.id not in hyp:
            with rt.autocast():
                c = dataclasses.replace(cfg, language=u.language, task="transcribe")
                hyp[u.id] = transcribe(model, tok, u.wav, c, rt.device, generator=g)[1]
    refs, hyps = [u.text for u in utts], [hyp[u.id] for u in utts]
    out = dict(loss=float("nan"), wer=common.wer(refs, hyps), cer=common.cer(refs, hyps), n=len(refs))
    if fits:
        exs = [(u.wav, *target_tokens(tok, u.text, n_text_ctx=cfg.n_text_ctx,
                                      language=u.language)) for u in fits[:16]]
        with rt.autocast():
            mel, x, y = collate(exs, tok, cfg, rt.device)
            out["loss"] = loss_fn(model(mel, x), y).item()
    line = (f"eval ({split}, {len(refs)} utterances): loss {out['loss']:.4f} | WER {out['wer']:.4f} "
            f"| CER {out['cer']:.4f}")
    for snr in cfg.snrs():                               # §3.7: the same clips in white noise
        rng = np.random.default_rng(cfg.seed)
        noisy = [common.Utterance(u.id, add_noise(u.wav, snr, rng), SAMPLE_RATE, u.text, language=u.language)
                 for u in fits]
        hn = _decode_texts(model, tok, noisy, cfg, rt, beam)
        out[f"wer_{snr:g}db"] = common.wer([u.text for u in fits], [hn[u.id] for u in fits])
        line += f" | WER at {snr:g} dB {out[f'wer_{snr:g}db']:.4f}"
    if cfg.word_timestamps:                              # word times of the reference text vs the corpus's
        out["word_time_err_ms"] = word_time_error(model, tok, [u for u in fits if has_word_times(u)], cfg, rt)
        line += f" | word time error {out['word_time_err_ms']:.0f} ms"
    other = [u for u in fits if u.language != "en" and u.translation]
    if other and tok.num_languages > 1:
        langs = top_languages(model, tok, fits, cfg, rt)
        out["lang_acc"] = float(np.mean([l == u.language for l, u in zip(langs, fits)]))
        tr = _decode_texts(model, tok, other, cfg, rt, beam, task="translate")
        out["translate_wer"] = common.wer([u.translation for u in other], [tr[u.id] for u in other])
        line += f" | language ID {out['lang_acc']:.4f} | translate WER {out['translate_wer']:.4f}"
    common.log(line)
    for r, h in list(zip(refs, hyps))[:3]:
        common.log(f"  ref: {r}\n  hyp: {h}")
    if samples_dir:
        write_transcript(samples_dir, utts[0].id, utts[0].wav,
                         *transcribe(model, tok, utts[0].wav, cfg, rt.device, generator=g))
    model.train(was_training)
    return out


def train(cfg):
    official = official_dims(cfg)
    rt = common.setup(cfg)
    train_utts = trainable(common.load_corpus(cfg, "train", SAMPLE_RATE), cfg, "train split")
    val_utts = trainable(common.load_corpus(cfg, "val", SAMPLE_RATE), cfg, "val split")
    common.check_clips(train_utts, 1, "train split (clips with transcripts)")
    common.check_clips(val_utts, 1, "val split (clips with transcripts)")
    tok = make_tokenizer(cfg, lambda: [u.text for u in train_utts],
                         official["dims"]["n_vocab"] if official else None)
    state = build(cfg, rt, tok)
    sampler = Batches(train_utts, tok, cfg, cfg.seed, rt.rank, rt.world_size)
    step = common.init_from(cfg, state, sampler=sampler, arch_keys=ARCH_KEYS, official=load_official)
    model = state["model"]
    state["model"] = common.wrap_ddp(common.compile(model, cfg), rt)
    window_s = window_samples(cfg) / SAMPLE_RATE
    common.log(f"params: {common.count_params(model):,} | vocab {tok.n_vocab} | window {window_s:.1f} s | "
               f"{len(train_utts)} training clips")
    if cfg.max_iters > cfg.lr_decay_iters:
        common.log(f"note: the lr reaches 0 at step {cfg.lr_decay_iters} (--lr_decay_iters) "
                   "before --max_iters")
    model.train()
    common.train_loop(cfg, rt, state, step, train_step, lambda step: get_batch(sampler, cfg, rt),
                      lambda samples: evaluate(cfg, model, rt, samples, split="val"), sampler=sampler,
                      audio_seconds=cfg.batch_size * window_s * rt.world_size, extra=tok.extra())
    return model

# ----------------------------------------------------------------------------- sample

def write_transcript(out, name, wav, segments, text):
    """wav + spectrogram png (common.save_sample) + the timed transcript (.txt) under out/."""
    lines = []
    for s in segments:
        lines.append(f"[{s.start:6.2f} --> {s.end:6.2f}] {s.text}")
        lines += [f"    [{a:6.2f} --> {b:6.2f}] {w.strip()} (p={p:.2f})" for w, a, b, p in s.words]
    common.save_sample(out, name, wav, SAMPLE_RATE)
    with open(os.path.join(out, name + ".txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


AUDIO_EXT = (".wav", ".flac", ".ogg")


def folder_audio(folder):
    """The audio files directly in folder, sorted by name."""
    return sorted(f for f in os.listdir(folder) if os.path.splitext(f)[1].lower() in AUDIO_EXT
                  and os.path.isfile(os.path.join(folder, f)))


def read_audio(path):
    """Any wav/flac/ogg as 16 kHz mono float32 (resampled, channels averaged); a bad file: one error line."""
    try:
        return common.load_audio(path, sr=SAMPLE_RATE)[0]
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")


def transcribe_folder(cfg, model, rt):
    """Every audio file of --input_dir -> one "name<TAB>text" line each in --transcripts (name: the file name
    without its extension). Clips that fit in one window are decoded as evaluate() does (no timestamps),
    longer ones long-form. With DIR/refs.txt ("name<TAB>text" lines) the folder's WER is logged."""
    tok = model.tokenizer
    utts = [common.Utterance(os.path.splitext(f)[0], read_audio(os.path.join(cfg.input_dir, f)), SAMPLE_RATE,
                             "", language=cfg.language) for f in folder_audio(cfg.input_dir)]
    names = [u.id for u in utts]
    fits = [u for u in utts if len(u.wav) <= window_samples(cfg)]
    if cfg.language == "auto":                           # §2.3: each clip's most likely language token
        for u, lang in zip(fits, top_languages(model, tok, fits, cfg, rt)):
            u.language = lang
    with rt.autocast():
        texts = _decode_texts(model, tok, fits, cfg, rt, cfg.beam_size, task=cfg.task)
        g = torch.Generator().manual_seed(cfg.seed)
        for u in utts:
            if u.id not in texts:
                texts[u.id] = transcribe(model, tok, u.wav, cfg, rt.device, generator=g)[1]
    path = cfg.transcripts or os.path.join(cfg.input_dir, "transcripts.tsv")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for n in names:
            f.write(f"{n}\t{' '.join(texts[n].split())}\n")
    os.replace(path + ".tmp", path)
    common.log(f"wrote {len(names)} transcripts to {path}")
    refs_path = os.path.join(cfg.input_dir, "refs.txt")  # name<TAB>intended text[<TAB>...]: the folder's WER
    if os.path.isfile(refs_path):
        with open(refs_path, encoding="utf-8") as f:
            refs = dict(l.rstrip("\n").split("\t")[:2] for l in f if "\t" in l)
        both = [n for n in names if n in refs]
        if both:
            common.log(f"WER {common.wer([refs[n] for n in both], [texts[n] for n in both]):.3f} against "
                       f"{refs_path} ({len(both)} of {len(names)} files)")
    return {n: texts[n] for n in names}


@torch.no_grad()
def sample(cfg):
    """Transcribe --input (any wav/flac) or a held-out test utterance, with timestamps; write the audio, its
    spectrogram png and the transcript under out_dir/samples/."""
    official_dims(cfg)
    rt = common.setup(cfg)
    model = load_for_inference(cfg, rt)
    if cfg.input_dir:
        return transcribe_folder(cfg, model, rt)
    if cfg.input:
        wav, name, ref = read_audio(cfg.input), os.path.splitext(os.path.basename(cfg.input))[0], None
    else:
        utt = common.load_corpus(cfg, "test", SAMPLE_RATE)[0]
        wav, name, ref = utt.wav, utt.id, utt.text
    with rt.autocast():
        segments, text = transcribe(model, model.tokenizer, wav, cfg, rt.device,
                                    generator=torch.Generator().manual_seed(cfg.seed))
    out = os.path.join(cfg.out_dir, "samples")
    for line in write_transcript(out, name, wav, segments, text):
        common.log(line)
    if ref is not None:
        common.log(f"reference: {ref}\nWER {common.wer([ref], [text]):.3f} "
                   f"| CER {common.cer([ref], [text]):.3f}")
    common.log(f"wrote {out}/{name}.wav, .png, .txt")
    return segments

# ----------------------------------------------------------------------------- bench

def bench(cfg):
    """train_step's ms, tokens/s and audio-s/s, encoder ms per window, greedy decoding tokens/s at batch 1 and
    16 per decode method. Random weights; a byte-level vocabulary (256 ranks) unless --tokenizer."""
    official = official_dims(cfg)
    rt = common.setup(cfg)
    tok = build_tokenizer(cfg, [], official["dims"]["n_vocab"] if official else None)
    state = build(cfg, rt, tok)
    model = state["model"]
    state["model"] = common.compile(model, cfg)
    compiled = state["model"] is not model
    B, L, frames = cfg.batch_size, min(cfg.n_text_ctx, 64), 2 * cfg.n_audio_ctx
    g = torch.Generator().manual_seed(cfg.seed)
    mel = torch.randn(B, cfg.n_mels, frames, generator=g).to(rt.device)
    x = torch.randint(0, tok.eot, (B, L), generator=g).to(rt.device)
    batch, iters = (mel, x, x.roll(-1, 1)), cfg.bench_iters
    train_ms = common.timeit(lambda: train_step(state, batch, cfg, rt), iters=iters, warmup=2)
    flops = common.count_flops(lambda: train_step(state, batch, cfg, rt))
    model.eval()
    with torch.no_grad(), rt.autocast():
        enc_ms = common.timeit(lambda: state["model"].encoder(mel[:1]), iters=iters, warmup=2)

    def decode_tps(batch, method, steps=16 if rt.device_type == "cpu" else 64):
        """Greedy DecoderSteps after the 4-token prompt: tokens per second and their FLOP rate (GFLOP/s)."""
        with torch.no_grad(), rt.autocast():
            xa = model.encoder(mel[:1]).repeat(batch, 1, 1)
            t0 = torch.tensor([tok.sot_sequence() + [tok.no_timestamps]] * batch, device=rt.device)

            def run():
                cache = KVCache(model.decoder, xa)
                logits = model.decoder(t0, cache=cache)[:, -1]
                step = DecoderStep(model.decoder, cache, method)
                for _ in range(steps):
                    logits = step(logits.argmax(-1, keepdim=True))
            ms = common.timeit(run, iters=iters, warmup=1)
            cache = KVCache(model.decoder, xa)
            model.decoder(t0, cache=cache)
            step_flops = common.count_flops(lambda: model.decoder(t0[:, :1], cache=cache))
        return batch * steps / (ms / 1000), step_flops * steps / (ms / 1000) / 1e9
    window_s = window_samples(cfg) / SAMPLE_RATE
    figures = dict(n_vocab=tok.n_vocab, window_s=window_s, train_step_ms=train_ms, train_flops_per_step=flops,
                   train_tokens_per_s=B * L / (train_ms / 1000),
                   train_audio_s_per_s=B * window_s / (train_ms / 1000), encoder_ms_per_window=enc_ms)
    methods = ["eager"] + (["compiled"] if compiled else []) + \
        (["cudagraph"] + (["compiled_cudagraph"] if compiled else []) if rt.device_type == "cuda" else [])
    for method in methods:                               # eager keeps the plain names (the shared bench keys)
        for b in (1, 16):
            tps, gflops = decode_tps(b, method)
            sfx = "" if method == "eager" else "_" + method
            figures[f"decode_tokens_per_s_b{b}{sfx}"], figures[f"decode_gflop_per_s_b{b}{sfx}"] = tps, gflops
    return common.report_bench(cfg, rt, model=model, compiled=compiled, **figures)

# ----------------------------------------------------------------------------- official weights

def _official_file(cfg):
    """The authors' checkpoint (a dict with 'dims' and 'model_state_dict') that --init_from names, or None."""
    path = cfg.init_from
    if path in ("scratch", "resume") or not os.path.isfile(path):
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)   # reads no tensor data
    except Exception:
        return None                                      # common.load_checkpoint says what is wrong with it
    return ckpt if isinstance(ckpt, dict) and "dims" in ckpt and "model_state_dict" in ckpt else None


def official_dims(cfg):
    """Before common.setup (so the config line and any error come first): official weights carry their own
    ModelDimensions, which replace the preset's; sample/eval check that --init_from names a fitting model."""
    ckpt = _official_file(cfg)
    if ckpt is None:
        if cfg.mode in ("sample", "eval"):
            if cfg.init_from == "scratch":
                raise SystemExit(f"error: --mode={cfg.mode} needs --init_from=resume, a ckpt.pt, "
                                 "or official weights")
            make_tokenizer(cfg)                          # the file exists, is ours, of this paper, and fits
        return None
    if not cfg.tokenizer:
        raise SystemExit("error: official weights need their vocabulary: pass --tokenizer=PATH to "
                         "multilingual.tiktoken (or gpt2.tiktoken for *.en models), "
                         "in openai-whisper's whisper/assets/")
    changed = [f"{k} {getattr(cfg, k)} -> {ckpt['dims'][k]}"
               for k in ARCH_KEYS if getattr(cfg, k) != ckpt["dims"][k]]
    for k in ARCH_KEYS:
        setattr(cfg, k, ckpt["dims"][k])
    common.log(f"official weights {cfg.init_from}: dims from the file (n_vocab {ckpt['dims']['n_vocab']})"
               + (": " + ", ".join(changed) if changed else ""))
    return ckpt


def load_official(state, ckpt):
    """--init_from=<official .pt>: our module names are the official ones, so the key map is the identity."""
    common.load_state_dict(common.unwrap(state["model"]), ckpt["model_state_dict"], what="Whisper")


# ----------------------------------------------------------------------------- main

if __name__ == "__main__":
    cfg = common.parse_config(Config, PRESETS)
    {"train": train, "sample": sample, "eval": evaluate, "bench": bench}[cfg.mode](cfg)
