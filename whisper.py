"""
Whisper: Robust Speech Recognition via Large-Scale Weak Supervision (Radford, Kim, Xu, Brockman, McLeavey,
Sutskever, 2022) — https://arxiv.org/abs/2212.04356

The idea: a plain encoder-decoder Transformer (§2.2) trained on 680k hours of weakly labelled audio reads a
30-second log-mel window and writes the transcript as text tokens. One decoder does many tasks (§2.3): the
task is spelled in special tokens after <|startoftranscript|> (language, transcribe/translate, timestamps or
<|notimestamps|>), timestamps are ordinary tokens quantised to 20 ms, and <|nospeech|> does voice activity
detection. Long recordings are transcribed window by window, seeking by the predicted timestamps, with a few
decoding heuristics (§4.5: beam search, temperature fallback on compression ratio / log-prob, timestamp rules).

Simplified or changed here:
- Data: the built-in eSpeak corpus (English, transcribe task only) instead of 680k h of web audio; timestamp
  targets come from the corpus's word times; previous-text prompts are other training sentences.
- Text: the official GPT-2 / multilingual BPE is used when you pass its .tiktoken file (--tokenizer=PATH, shipped
  in openai-whisper's whisper/assets/); offline the default is a small byte-level BPE trained on the corpus
  text and saved beside the checkpoint. Both run through tiktoken with Whisper's special-token layout.
- The `tiny` and `small` presets use shorter windows (fewer mel frames) so a CPU can train them; the paper
  presets (whisper-tiny ... whisper-large-v3, named so to free `tiny`/`small` for the shared test/CPU presets)
  use 30 s windows, 3000 frames, 1500 encoder positions, exactly as the official model.
- No word-level timestamps (cross-attention DTW), no language identification (English only), no translation
  data, no SpecAugment / BPE dropout (large-v2), no fp16 loss scaling (bf16 autocast on CUDA instead).
- Long-form transcription fills a short last window with the log-mel of silence (what training saw for padded
  audio); openai/whisper pads it with zeros.
- Initialisation of the embeddings (N(0, 0.02) / N(0, 0.01)) is our choice; the paper does not give one.

    python whisper.py                    # train: whisper-tiny dims, 20k steps on CUDA; the `small` preset on a CPU
    python whisper.py --preset=whisper-tiny --batch_size=64  # the paper's tiny size, 30 s windows
    python whisper.py --init_from=resume                     # continue out/whisper/ckpt.pt
    python whisper.py --mode=sample --init_from=out/whisper/ckpt.pt --input=speech.wav   # transcribe a file
    python whisper.py --mode=eval --init_from=out/whisper/ckpt.pt                        # WER/CER on test
    python whisper.py --mode=sample --init_from=tiny.pt --tokenizer=multilingual.tiktoken --input=a.flac
    python whisper.py --mode=bench
    python whisper.py --mode=bench --preset=whisper-tiny --batch_size=16 --tokenizer=multilingual.tiktoken --bench_official=True
    torchrun --standalone --nproc_per_node=8 whisper.py --preset=whisper-base
"""
import base64
import math
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    mode: str = "train"             # train | sample | eval | bench
    preset: str = "whisper-tiny"    # a key of PRESETS (without CUDA and without --preset: small)
    init_from: str = "scratch"      # scratch | resume | our ckpt.pt | an official .pt (dims + model_state_dict)
    out_dir: str = "out/whisper"
    data_dir: str = ""              # empty: the built-in speech corpus
    corpus_hours: float = 2.0       # size of the built-in corpus
    input: str = ""                 # --mode=sample: a wav/flac to transcribe (default: a held-out test utterance)
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
    p_timestamps: float = 0.5       # fraction of examples trained with timestamp tokens (others <|notimestamps|>)
    p_prompt: float = 0.3           # fraction with a previous-text prompt after <|startofprev|> (no loss on it)
    p_nospeech: float = 0.05        # fraction of noise-only windows whose target is <|nospeech|> (VAD)
    # optimisation (§2.4, Appendix F)
    batch_size: int = 64            # windows per step (the paper: 256)
    lr: float = 1.5e-3              # peak learning rate (1.5e-3 for tiny, 1.75e-4 for large)
    weight_decay: float = 0.1       # AdamW
    beta2: float = 0.98             # AdamW beta2 (beta1 0.9, eps 1e-6)
    warmup_iters: int = 1000        # linear warm-up steps (the paper: 2048)
    decay_iters: int = 0            # linear decay to 0 at this step; 0: max_iters
    max_iters: int = 20_000         # the default GPU run (the paper: 2^20 updates)
    grad_clip: float = 1.0          # global gradient-norm clip
    # decoding (§4.5; whisper/transcribe.py defaults)
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
    # runtime
    device: str = "auto"
    dtype: str = "auto"             # bf16 autocast on CUDA, fp32 elsewhere
    compile: bool = True            # torch.compile (on CUDA by default; off on CPU unless asked)
    seed: int = 1337
    log_interval: int = 50
    eval_interval: int = 2000       # evaluate and checkpoint every this many steps
    eval_items: int = 64            # held-out utterances per evaluation
    bench_official: bool = False    # --mode=bench: also time openai-whisper's decode side by side, if installed

_DIMS = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer",
         "n_text_ctx", "n_text_state", "n_text_head", "n_text_layer")


def _paper(n_layer, width, heads, lr, n_mels=80, n_text_layer=None):
    """A paper size (Table 1): same depth/width in encoder and decoder, 30 s windows, paper batch and LR."""
    return dict(n_mels=n_mels, n_audio_ctx=1500, n_audio_state=width, n_audio_head=heads, n_audio_layer=n_layer,
                n_text_ctx=448, n_text_state=width, n_text_head=heads, n_text_layer=n_text_layer or n_layer, lr=lr)


PRESETS = {
    "whisper-tiny":     _paper(4, 384, 6, 1.5e-3),      # 39 M with the official vocab
    "whisper-base":     _paper(6, 512, 8, 1e-3),        # 74 M
    "whisper-small":    _paper(12, 768, 12, 5e-4),      # 244 M
    "whisper-medium":   _paper(24, 1024, 16, 2.5e-4),   # 769 M
    "whisper-large":    _paper(32, 1280, 20, 1.75e-4),  # 1550 M (large-v1 / v2)
    "whisper-large-v3": _paper(32, 1280, 20, 1.75e-4, n_mels=128),
    "whisper-turbo":    _paper(32, 1280, 20, 1.75e-4, n_mels=128, n_text_layer=4),  # large-v3, 4 decoder layers
    # a CPU run (~15 min on a laptop): 5 s windows (99 % of the corpus's clips fit), 4+4 layers of width 128
    "small": dict(n_audio_ctx=250, n_audio_state=128, n_audio_head=4, n_audio_layer=4, n_text_ctx=128,
                  n_text_state=128, n_text_head=4, n_text_layer=4, batch_size=16, lr=1.5e-3, warmup_iters=200,
                  max_iters=3000, eval_interval=500, eval_items=32, log_interval=25, compile=False),
    # tests: 5 s windows, 2+2 layers of width 64
    "tiny": dict(n_audio_ctx=250, n_audio_state=64, n_audio_head=2, n_audio_layer=2, n_text_ctx=96,
                 n_text_state=64, n_text_head=2, n_text_layer=2, bpe_vocab=320, corpus_hours=0.02, batch_size=4,
                 lr=3e-3, warmup_iters=10, max_iters=10, eval_interval=100, eval_items=4, log_interval=1,
                 beam_size=2, best_of=2, sample_len=32, temperatures=(0.0, 1.0), compile=False),
}

SAMPLE_RATE, HOP = 16000, 160          # §2.2: 16 kHz audio, 10 ms mel hop; 2 frames per encoder position
TIME_PRECISION = 0.02                   # seconds per timestamp token (= per encoder position)
N_TIMESTAMPS = 1501                     # <|0.00|> ... <|30.00|>

# ----------------------------------------------------------------------------- model

class LayerNorm(nn.LayerNorm):
    """LayerNorm in fp32 whatever the activation dtype (as the official model): its statistics need the range."""
    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def sinusoids(length, channels, max_timescale=10000):
    """Fixed encoder positions (§2.2): sin and cos halves concatenated (not interleaved), geometric timescales."""
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

    def forward(self, x, k, v, causal=False, mask=None):
        q = self.split(self.query(x))                    # (B, H, T, Dh); SDPA scales by Dh^-0.5 = (Dh^-0.25)^2
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
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

    def forward(self, x, cross_kv=None, cache=None, layer=0, pos=None, mask=None):
        h = self.attn_ln(x)
        k, v = self.attn.kv(h)
        if cache is not None:  # write this step's K/V at their positions, attend to the whole (masked) buffer
            cache.k[layer].index_copy_(2, pos, k.to(cache.k.dtype))
            cache.v[layer].index_copy_(2, pos, v.to(cache.v.dtype))
            k, v = cache.k[layer], cache.v[layer]
        x = x + self.attn(h, k, v, causal=cache is None and cross_kv is not None, mask=mask)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_attn_ln(x), *cross_kv)
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    """§2.2: two conv layers with GELU (the second strides by 2: 100 Hz mel -> 50 Hz), sinusoidal positions,
    pre-LN blocks, a final LayerNorm."""
    def __init__(self, n_mels, n_ctx, d, n_head, n_layer):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(n_ctx, d))  # persistent: official files hold it
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
    """Explicit decoder cache (no hooks). Self-attention K/V live in a preallocated (layers, B, H, n_ctx, Dh)
    buffer that fills as tokens are decoded (static shapes, so it compiles / CUDA-graphs); cross-attention
    K/V are computed once from the audio features and reused at every step."""
    def __init__(self, decoder, xa):
        self.cross = [b.cross_attn.kv(xa) for b in decoder.blocks]   # [(B, H, n_audio_ctx, Dh)] * 2 per layer
        B, H, _, Dh = self.cross[0][0].shape
        shape = (len(decoder.blocks), B, H, decoder.n_ctx, Dh)
        self.k = xa.new_zeros(shape, dtype=self.cross[0][0].dtype)   # the compute dtype (bf16 under autocast)
        self.v = torch.zeros_like(self.k)
        self.offset = 0

    def reorder(self, idx):
        """Beam search: every row continues the hypothesis it was drawn from. Cross K/V need no reorder,
        since beams of one audio only ever swap among themselves."""
        self.k, self.v = self.k[:, idx], self.v[:, idx]


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

    def forward(self, tokens, xa=None, cache=None):      # tokens: (B, T) -> logits (B, T, n_vocab) in fp32
        T = tokens.shape[1]
        if cache is None:                                # full causal forward (training, parity)
            x = self.token_embedding(tokens) + self.positional_embedding[:T]
            cross = [b.cross_attn.kv(xa) for b in self.blocks]
            pos = mask = None
        else:                                            # incremental: positions continue after the cache
            pos = torch.arange(T, device=tokens.device) + cache.offset
            x = self.token_embedding(tokens) + self.positional_embedding[pos]
            cross = cache.cross
            mask = torch.arange(self.n_ctx, device=tokens.device)[None, :] <= pos[:, None]  # (T, n_ctx)
        for i, block in enumerate(self.blocks):
            x = block(x, cross[i], cache, i, pos, mask)
        if cache is not None:
            cache.offset += T
        x = self.ln(x)
        return (x @ self.token_embedding.weight.to(x.dtype).t()).float()   # tied output embedding


class Whisper(nn.Module):
    def __init__(self, dims):                            # dims: the official ModelDimensions as a dict
        super().__init__()
        self.dims = dict(dims)
        d = self.dims
        self.encoder = AudioEncoder(d["n_mels"], d["n_audio_ctx"], d["n_audio_state"], d["n_audio_head"],
                                    d["n_audio_layer"])
        self.decoder = TextDecoder(d["n_vocab"], d["n_text_ctx"], d["n_text_state"], d["n_text_head"],
                                   d["n_text_layer"])

    def forward(self, mel, tokens):
        return self.decoder(tokens, self.encoder(mel))


def model_dims(cfg, n_vocab):
    return dict({k: getattr(cfg, k) for k in _DIMS}, n_vocab=n_vocab)

# ----------------------------------------------------------------------------- tokenizer
# Byte-level BPE through tiktoken, with Whisper's special tokens appended after the ranks in the official order
# (§2.3): <|endoftext|>, <|startoftranscript|>, one token per language, <|translate|>, <|transcribe|>,
# <|startoflm|>, <|startofprev|>, <|nospeech|>, <|notimestamps|>, then 1501 timestamps <|0.00|> ... <|30.00|>.

LANGUAGES = ("en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg "
             "lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so "
             "af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su yue").split()
class Tokenizer:
    """Text <-> token ids. Every special id is derived from the number of ranks (never hard-coded), so the same
    code serves gpt2.tiktoken (English-only models), multilingual.tiktoken, and our small corpus BPE."""
    def __init__(self, ranks, num_languages=99, name="whisper-bpe"):
        self.ranks_text = common.ranks_to_text(ranks)
        self.num_languages = num_languages
        self.languages = LANGUAGES[:num_languages]
        specials = (["<|endoftext|>", "<|startoftranscript|>"] + [f"<|{l}|>" for l in self.languages]
                    + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
                       "<|notimestamps|>"] + [f"<|{i * TIME_PRECISION:.2f}|>" for i in range(N_TIMESTAMPS)])
        n = len(ranks)
        ids = {s: n + i for i, s in enumerate(specials)}
        self.enc = tiktoken.Encoding(name, pat_str=common.PAT_STR, mergeable_ranks=ranks, special_tokens=ids,
                                     explicit_n_vocab=n + len(specials))
        self.n_vocab = n + len(specials)
        self.eot, self.sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
        self.translate, self.transcribe = ids["<|translate|>"], ids["<|transcribe|>"]
        self.sot_lm, self.sot_prev = ids["<|startoflm|>"], ids["<|startofprev|>"]
        self.no_speech, self.no_timestamps = ids["<|nospeech|>"], ids["<|notimestamps|>"]
        self.timestamp_begin = ids["<|0.00|>"]
        # English-only official models (gpt2.tiktoken, 50256 ranks) start with <|startoftranscript|> alone
        self.multilingual = n != 50256

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

    def timestamp(self, seconds):
        return self.timestamp_begin + int(min(N_TIMESTAMPS - 1, max(0, round(seconds / TIME_PRECISION))))

    def non_speech_tokens(self):
        """Tokens of symbols that are never spoken (speaker tags, music notes, brackets); a symbol is banned only
        where it is one token, a hyphen/quote only at word start; music symbols by their first byte-token."""
        if getattr(self, "_non_speech", None) is None:
            self._non_speech = self._find_non_speech()
        return list(self._non_speech)

    def _find_non_speech(self):
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
        return sorted(out)


def build_tokenizer(cfg, texts=None, n_vocab=None):
    """The official vocabulary from --tokenizer=PATH, else a BPE trained on the training transcripts (one language:
    en; the official layout otherwise)."""
    if cfg.tokenizer:
        if not os.path.exists(cfg.tokenizer):
            raise SystemExit(f"error: --tokenizer={cfg.tokenizer!r} does not exist")
        langs = 100 if cfg.n_mels == 128 else 99         # large-v3 added <|yue|>
        if n_vocab is not None:                          # official weights: n_vocab says how many languages
            langs = n_vocab - 51765 - int(n_vocab >= 51865)
        return Tokenizer.from_file(cfg.tokenizer, langs)
    # transcripts are encoded with a leading space (" word" tokens, as GPT-2's): train on them that way too
    return Tokenizer(common.train_bpe([" " + t.strip() for t in texts], cfg.bpe_vocab), num_languages=1)

# ----------------------------------------------------------------------------- loss

def loss_fn(logits, targets):
    """Next-token cross-entropy (§2.3) on the sampled part only: prompt positions and padding are -100."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)

# ----------------------------------------------------------------------------- data

def window_samples(cfg):
    return cfg.n_audio_ctx * 2 * HOP                     # 1500 positions -> 480 000 samples = 30 s


def log_mel(wavs, cfg, device):
    """One log-mel per window (B, n_mels, 2 * n_audio_ctx). Per item, because the -8 dynamic-range clip uses the
    max of the whole tensor (the official code; §2.2): batching the call would let loud items change quiet ones."""
    return torch.stack([common.log_mel_spectrogram(w.to(device), n_mels=cfg.n_mels) for w in wavs])


class Batches:
    """(audio window, token sequence) pairs in the multitask format of §2.3 / Fig. 1:
    [<|startofprev|> previous text] <|startoftranscript|> <|en|> <|transcribe|>
      ( <|notimestamps|> text | <|t0|> text <|t1|> <|t2|> text <|t3|> ... ) <|endoftext|>
    or <|startoftranscript|> <|nospeech|> <|endoftext|> for a window without speech."""
    def __init__(self, utts, tok, cfg, generator=None):
        self.utts, self.tok, self.cfg, self.g = utts, tok, cfg, generator
        self.N = window_samples(cfg)

    def rand(self):
        return torch.rand((), generator=self.g).item()

    def randint(self, n):
        return int(torch.randint(n, (), generator=self.g))

    def example(self, utt):
        tok, cfg, N = self.tok, self.cfg, self.N
        if self.rand() < cfg.p_nospeech:                 # VAD: quiet noise, target <|nospeech|>
            amp = 10 ** (-4 + 2 * self.rand())
            g = torch.Generator().manual_seed(self.randint(2**31))
            wav = (torch.randn(N, generator=g) * amp).numpy()
            return wav, [tok.sot, tok.no_speech, tok.eot], 1
        wav, text = utt.wav, utt.text.strip()
        words = list(utt.words) if utt.words and len(utt.words) == len(text.split()) else []
        if len(wav) > N:                                 # too long for one window: a random crop, whole words only
            start = self.randint(len(wav) - N + 1)
            t0, t1 = start / SAMPLE_RATE, (start + N) / SAMPLE_RATE
            wav = wav[start:start + N]
            words = [(w, s - t0, e - t0) for w, s, e in words if s >= t0 and e <= t1]
            text = " ".join(w for w, _, _ in words)
            if not words:
                return wav, [tok.sot, tok.no_speech, tok.eot], 1
        seq = []
        if self.rand() < cfg.p_prompt:                  # previous-text conditioning (§2.3); no loss on it
            prev = self.utts[self.randint(len(self.utts))].text
            seq = [tok.sot_prev] + tok.encode(" " + prev.strip())[-(cfg.n_text_ctx // 2 - 1):]
        loss_from = len(seq) + 1                         # targets start after <|startoftranscript|>
        seq += tok.sot_sequence()
        if words and self.rand() < cfg.p_timestamps:    # split into 1-3 timed segments at word boundaries
            k = 1 + self.randint(min(3, len(words)))
            cuts = sorted(torch.randperm(len(words) - 1, generator=self.g)[:k - 1].add(1).tolist())
            last = 0
            for a, b in zip([0] + cuts, cuts + [len(words)]):
                seg = words[a:b]
                ts0 = max(last, tok.timestamp(seg[0][1]))
                ts1 = max(ts0 + 1, tok.timestamp(seg[-1][2]))  # segments have length
                seq += [ts0] + tok.encode(" " + " ".join(w for w, _, _ in seg)) + [ts1]
                last = ts1
        else:
            seq += [tok.no_timestamps] + tok.encode(" " + text)
        seq.append(tok.eot)
        if len(seq) > cfg.n_text_ctx + 1:                # too long: drop the prompt, then cut the tail
            seq, loss_from = seq[loss_from - 1:], 1
            seq = seq[:cfg.n_text_ctx + 1]
        return wav, seq, loss_from

    def next(self, batch_size, device, items=None):
        """mel (B, n_mels, frames), input tokens (B, L), targets (B, L) with -100 where there is no loss."""
        items = items if items is not None else [self.randint(len(self.utts)) for _ in range(batch_size)]
        exs = [self.example(self.utts[i]) for i in items]
        wavs = torch.zeros(len(exs), self.N)
        for j, (w, _, _) in enumerate(exs):
            wavs[j, :len(w)] = torch.from_numpy(np.asarray(w, dtype=np.float32)[:self.N])
        L = max(len(s) for _, s, _ in exs) - 1
        x = torch.full((len(exs), L), self.tok.eot, dtype=torch.long)
        y = torch.full((len(exs), L), -100, dtype=torch.long)
        for j, (_, s, lf) in enumerate(exs):
            s = torch.tensor(s)
            x[j, :len(s) - 1] = s[:-1]
            y[j, lf - 1:len(s) - 1] = s[lf:]             # position i predicts token i+1
        return log_mel(wavs, self.cfg, device), x.to(device), y.to(device)

# ----------------------------------------------------------------------------- decoding
# §4.5 and whisper/decoding.py: logit rules, greedy / sampling / beam search, ranking, temperature fallback.

class LogitRules:
    """Masks applied to the next-token logits, in the official order: suppress blank at the start, suppress
    non-speech and control tokens, then the timestamp grammar."""
    def __init__(self, tok, sample_begin, timestamps, max_initial_timestamp=1.0, n_audio_ctx=1500):
        self.tok, self.sample_begin, self.timestamps = tok, sample_begin, timestamps
        self.last_timestamp = tok.timestamp_begin + n_audio_ctx  # the window's end (<|30.00|> for 30 s)
        self.blank = tok.encode(" ") + [tok.eot]
        self.suppress = tok.non_speech_tokens() + [tok.transcribe, tok.translate, tok.sot, tok.sot_prev,
                                                   tok.sot_lm, tok.no_speech]
        self.max_initial = None if max_initial_timestamp is None else round(max_initial_timestamp / TIME_PRECISION)

    def __call__(self, logits, tokens):                  # logits (B, V) fp32, modified in place; tokens (B, T)
        tok, tb, inf = self.tok, self.tok.timestamp_begin, float("-inf")
        if tokens.shape[1] == self.sample_begin:         # an empty transcript or a leading space is never wanted
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
                    logits[k, :tok.eot] = inf            # a segment just ended: a timestamp or eot must follow
            stamps = [t for t in seq if t >= tb]
            if stamps:                                   # time never goes back; a segment has non-zero length
                floor = stamps[-1] if last_ts and not penult_ts else stamps[-1] + 1
                logits[k, tb:floor] = inf
        if tokens.shape[1] == self.sample_begin:         # the first token is a timestamp, and an early one
            logits[:, :tb] = inf
            if self.max_initial is not None:
                logits[:, tb + self.max_initial + 1:] = inf
        logprobs = F.log_softmax(logits, dim=-1)         # if time is likelier than any single text token, take it
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


@torch.no_grad()
def decode(model, tok, mel, cfg, temperature=0.0, beam_size=None, best_of=None, timestamps=True, prompt=None,
           generator=None):
    """Decode one window per item of mel (B, n_mels, frames). temperature 0: greedy (beam_size <= 1) or beam
    search; temperature > 0: best_of samples ranked by length-normalised log-prob. Returns [DecodeResult]."""
    beam_size = cfg.beam_size if beam_size is None else beam_size
    best_of = cfg.best_of if best_of is None else best_of
    use_beam = temperature == 0 and beam_size > 1
    n_group = beam_size if use_beam else (best_of if temperature > 0 else 1)
    sample_len = cfg.sample_len or cfg.n_text_ctx // 2
    initial = []
    if prompt:                                           # previous text, at most half the context (§4.5)
        initial = [tok.sot_prev] + list(prompt)[-(cfg.n_text_ctx // 2 - 1):]
    sot_index = len(initial)
    initial += tok.sot_sequence() + ([] if timestamps else [tok.no_timestamps])
    sample_begin = len(initial)
    sample_len = min(sample_len, cfg.n_text_ctx - sample_begin)
    rules = LogitRules(tok, sample_begin, timestamps, cfg.max_initial_timestamp, cfg.n_audio_ctx)

    xa = model.encoder(mel)                              # (B, A, D), once per window
    B = xa.shape[0]
    xa = xa.repeat_interleave(n_group, 0)                # (B * n_group, A, D)
    tokens = torch.tensor([initial], device=mel.device).repeat(B * n_group, 1)
    cache = KVCache(model.decoder, xa)
    sum_lp = torch.zeros(B * n_group, device=mel.device)
    finished = [dict() for _ in range(B)]                # beam search: finished sequence -> score
    max_cand = round(beam_size * cfg.patience)
    no_speech = None
    for i in range(sample_len):
        logits = model.decoder(tokens if i == 0 else tokens[:, -1:], cache=cache)
        if i == 0:                                       # P(<|nospeech|>) right after <|startoftranscript|>
            no_speech = logits[::n_group, sot_index].softmax(-1)[:, tok.no_speech].tolist()
        logits = logits[:, -1]
        rules(logits, tokens)
        logprobs = F.log_softmax(logits, dim=-1)
        if not use_beam:
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator).squeeze(1)
            done = tokens[:, -1] == tok.eot
            sum_lp += logprobs.gather(1, nxt[:, None]).squeeze(1) * (~done)
            nxt[done] = tok.eot                          # finished rows keep emitting eot
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            if (tokens[:, -1] == tok.eot).all():
                break
            continue
        # beam search: expand every live hypothesis by its top beam+1 tokens, keep the best `beam` that did not
        # end; the ones that ended go to `finished` until each audio has beam * patience of them
        rows, src, scores = [], [], []
        for a in range(B):
            cand = {}
            for j in range(a * beam_size, (a + 1) * beam_size):
                prefix = tuple(tokens[j].tolist())
                top_lp, top_id = logprobs[j].topk(beam_size + 1)
                for lp, t in zip(top_lp.tolist(), top_id.tolist()):
                    cand[prefix + (t,)] = (sum_lp[j].item() + lp, j)
            new_fin, kept = {}, 0
            for seq in sorted(cand, key=lambda s: cand[s][0], reverse=True):
                if seq[-1] == tok.eot:
                    new_fin[seq] = cand[seq][0]
                else:
                    rows.append(seq)
                    src.append(cand[seq][1])
                    scores.append(cand[seq][0])
                    kept += 1
                    if kept == beam_size:
                        break
            for seq in sorted(new_fin, key=new_fin.get, reverse=True):
                if len(finished[a]) >= max_cand:
                    break
                finished[a][seq] = new_fin[seq]
        tokens = torch.tensor(rows, device=mel.device)
        sum_lp = torch.tensor(scores, device=mel.device)
        cache.reorder(torch.tensor(src, device=mel.device))
        if all(len(f) >= max_cand for f in finished):
            break

    # collect candidates per audio: (sampled tokens without eot, summed log-prob)
    cands = []
    for a in range(B):
        if use_beam:
            fin = dict(finished[a])
            if len(fin) < beam_size:                     # unfinished hypotheses count too (with an eot appended)
                for j in sorted(range(a * beam_size, (a + 1) * beam_size), key=lambda j: -sum_lp[j].item()):
                    fin.setdefault(tuple(tokens[j].tolist()) + (tok.eot,), sum_lp[j].item())
                    if len(fin) >= beam_size:
                        break
            cands.append([(list(s[sample_begin:-1]), lp) for s, lp in fin.items()])
        else:
            group = []
            for j in range(a * n_group, (a + 1) * n_group):
                t = tokens[j, sample_begin:].tolist()
                group.append((t[:t.index(tok.eot)] if tok.eot in t else t, sum_lp[j].item()))
            cands.append(group)
    results = []
    for a, group in enumerate(cands):
        def score(c):                                    # length-normalised log-prob (or the GNMT penalty)
            L = len(c[0])
            return c[1] / (L if not cfg.length_penalty else ((5 + L) / 6) ** cfg.length_penalty)
        toks, lp = max(group, key=score)
        text = tok.decode(toks)
        results.append(DecodeResult(toks, text, lp / (len(toks) + 1), no_speech[a], temperature,
                                    compression_ratio(text)))
    return results


def decode_with_fallback(model, tok, mel, cfg, prompt=None, timestamps=True, generator=None):
    """§4.5: decode at temperature 0 (beam search); if the result looks like a loop (gzip ratio) or is unlikely
    (mean log-prob), retry at the next temperature with sampling. A silent window is accepted as it is."""
    for t in cfg.temperatures:
        r = decode(model, tok, mel, cfg, temperature=t, prompt=prompt, timestamps=timestamps,
                   generator=generator)[0]
        bad = r.compression_ratio > cfg.compression_ratio_threshold or r.avg_logprob < cfg.logprob_threshold
        if r.no_speech_prob > cfg.no_speech_threshold and r.avg_logprob < cfg.logprob_threshold:
            bad = False
        if not bad:
            break
    return r


@torch.no_grad()
def transcribe(model, tok, wav, cfg, device, generator=None):
    """Long-form transcription (§4.5): slide a window over the whole file, seeking to the last predicted
    timestamp. The mel is computed once over the file (plus a window of zeros), as the official code does.
    Returns (segments [(start_s, end_s, text)], text)."""
    N = window_samples(cfg)
    n_frames = 2 * cfg.n_audio_ctx
    mel = common.log_mel_spectrogram(torch.as_tensor(np.asarray(wav, dtype=np.float32)).to(device),
                                     n_mels=cfg.n_mels, padding=N)
    content = mel.shape[-1] - n_frames
    tb = tok.timestamp_begin
    seek, segments, all_tokens, prompt_from = 0, [], [], 0
    while seek < content:
        size = min(n_frames, content - seek)
        # the mel already runs a window past the content (padding=N): slicing it fills a short window with the
        # log-mel of silence, exactly what training saw for zero-padded audio (openai/whisper pads with 0 here)
        window = mel[:, seek:seek + n_frames][None]     # (1, n_mels, frames)
        offset = seek * HOP / SAMPLE_RATE
        r = decode_with_fallback(model, tok, window, cfg, prompt=all_tokens[prompt_from:], generator=generator)
        if r.no_speech_prob > cfg.no_speech_threshold and r.avg_logprob < cfg.logprob_threshold:
            seek += size                                 # silence: skip the window
            continue
        toks = r.tokens
        is_ts = [t >= tb for t in toks]
        single_end = is_ts[-2:] == [False, True]
        pairs = [i for i in range(1, len(toks)) if is_ts[i] and is_ts[i - 1]]
        if pairs:                                        # <|t0|> text <|t1|><|t1'|> text <|t2|> ... : one per pair
            cuts = pairs + ([len(toks)] if single_end else [])
            last = 0
            for c in cuts:
                piece = toks[last:c]
                segments.append((offset + (piece[0] - tb) * TIME_PRECISION,
                                 offset + (piece[-1] - tb) * TIME_PRECISION, tok.decode(piece).strip()))
                last = c
            # ended on a closed pair: the last segment may be cut off, so start the next window there
            seek += size if single_end else (toks[last - 1] - tb) * 2
        else:                                            # no pair: one segment for the whole window
            stamps = [t for t in toks if t >= tb]
            dur = (stamps[-1] - tb) * TIME_PRECISION if stamps and stamps[-1] != tb else size * HOP / SAMPLE_RATE
            segments.append((offset, offset + dur, tok.decode(toks).strip()))
            seek += size
        all_tokens += toks
        if not cfg.condition_on_previous_text or r.temperature > 0.5:
            prompt_from = len(all_tokens)                # a hot decode may be garbage: do not condition on it
    segments = [s for s in segments if s[2]]
    return segments, " ".join(s[2] for s in segments)

# ----------------------------------------------------------------------------- train

ARCH_KEYS = _DIMS


def load_model(cfg, device, texts_fn=None):
    """(model, tokenizer, checkpoint or None) for cfg.init_from: scratch (tokenizer from --tokenizer or trained on
    texts_fn()), resume / one of our checkpoints (tokenizer stored in it), or an official Whisper .pt."""
    if cfg.init_from == "scratch":
        tok = build_tokenizer(cfg, texts_fn() if not cfg.tokenizer else None)
        return Whisper(model_dims(cfg, tok.n_vocab)).to(device), tok, None
    ckpt = common.load_checkpoint(common.resume_path(cfg))
    if common.is_ours(ckpt):
        me = os.path.splitext(os.path.basename(__file__))[0]
        if ckpt.get("paper") != me:
            raise SystemExit(f"error: this checkpoint was written by {ckpt.get('paper')}.py, not {me}.py")
        extra = ckpt.get("extra", {})
        if "tokenizer" not in extra:
            raise SystemExit(f"error: {common.resume_path(cfg)} holds no tokenizer; was it written by whisper.py?")
        tok = Tokenizer(common.ranks_from_text(extra["tokenizer"]), extra["num_languages"])
        model = Whisper(model_dims(cfg, tok.n_vocab)).to(device)
        return model, tok, ckpt
    if not (isinstance(ckpt, dict) and "dims" in ckpt and "model_state_dict" in ckpt):
        raise SystemExit(f"error: {cfg.init_from!r} is neither a nanoaudio checkpoint nor an official Whisper file "
                         "(a dict with 'dims' and 'model_state_dict')")
    # official weights: take the dims from the file; our module names are the official ones, so keys map 1:1
    dims = ckpt["dims"]
    for k in _DIMS:
        setattr(cfg, k, dims[k])
    if not cfg.tokenizer:
        raise SystemExit("error: official weights need their vocabulary: pass --tokenizer=PATH to "
                         "multilingual.tiktoken (or gpt2.tiktoken for *.en models), in openai-whisper's whisper/assets/")
    tok = build_tokenizer(cfg, n_vocab=dims["n_vocab"])
    if tok.n_vocab != dims["n_vocab"]:
        raise SystemExit(f"error: {cfg.tokenizer} gives {tok.n_vocab} tokens but the weights have {dims['n_vocab']}")
    model = Whisper(model_dims(cfg, tok.n_vocab))
    common.load_state_dict(model, ckpt["model_state_dict"], what="Whisper")
    return model.to(device), tok, None


def configure_optimizer(model, cfg):
    """AdamW (§2.4, Appendix F: beta 0.9/0.98, eps 1e-6, wd 0.1); no decay on biases, norms, embeddings' positions."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "positional" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "positional" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-6)


def lr_at(step, cfg):
    """Linear warm-up, then linear decay to zero (§2.4)."""
    end = cfg.decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    return cfg.lr * max(0.0, (end - step) / max(1, end - cfg.warmup_iters))


@torch.no_grad()
def evaluate(cfg, model=None, tok=None, rt=None, split="test", beam_size=None):
    """WER/CER (common.wer/cer, normalised text) on cfg.eval_items held-out utterances, and the teacher-forced
    loss on them. The test split has unseen sentences and a voice never heard in training."""
    standalone = model is None
    if standalone:
        rt = common.setup(cfg)
        if cfg.init_from == "scratch":
            raise SystemExit("error: --mode=eval needs --init_from=resume, a ckpt.pt, or official weights")
        model, tok, ckpt = load_model(cfg, rt.device)
        if ckpt is not None:
            common.restore(ckpt, cfg, {"model": model}, arch_keys=ARCH_KEYS, rng=False)
    was_training = model.training
    model.eval()
    utts = common.load_corpus(cfg, split, SAMPLE_RATE)[:cfg.eval_items]
    utts = [u for u in utts if u.text]
    N, refs, hyps = window_samples(cfg), [], []
    g = torch.Generator().manual_seed(cfg.seed)          # fixed draws: the global RNG is left alone
    for i in range(0, len(utts), 16):
        chunk = utts[i:i + 16]
        fits = [u for u in chunk if len(u.wav) <= N]
        if fits:
            wavs = torch.zeros(len(fits), N)
            for j, u in enumerate(fits):
                wavs[j, :len(u.wav)] = torch.from_numpy(u.wav)
            with rt.autocast():
                rs = decode(model, tok, log_mel(wavs, cfg, rt.device), cfg, timestamps=False, beam_size=beam_size)
            hyps += [r.text for r in rs]
            refs += [u.text for u in fits]
        for u in chunk:                                  # longer than a window: long-form transcription
            if len(u.wav) > N:
                with rt.autocast():
                    hyps.append(transcribe(model, tok, u.wav, cfg, rt.device, generator=g)[1])
                refs.append(u.text)
    vcfg = _copy(cfg, p_prompt=0.0, p_nospeech=0.0, p_timestamps=0.0)
    mel, x, y = Batches(utts, tok, vcfg, generator=torch.Generator().manual_seed(cfg.seed)).next(
        0, rt.device, items=list(range(min(16, len(utts)))))
    with rt.autocast():
        loss = loss_fn(model(mel, x), y).item()
    out = dict(loss=loss, wer=common.wer(refs, hyps), cer=common.cer(refs, hyps), n=len(refs))
    common.log(f"eval ({split}, {len(refs)} utterances): loss {loss:.4f} | WER {out['wer']:.4f} | CER {out['cer']:.4f}")
    for r, h in list(zip(refs, hyps))[:3]:
        common.log(f"  ref: {r}\n  hyp: {h}")
    model.train(was_training)
    return out


def _copy(cfg, **kw):
    c = Config(**common.config_dict(cfg))
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def train(cfg):
    rt = common.setup(cfg)
    train_utts = common.load_corpus(cfg, "train", SAMPLE_RATE)
    train_utts = [u for u in train_utts if u.text]
    if not train_utts:
        raise SystemExit("error: no training clips with transcripts (Whisper needs text beside the audio)")
    model, tok, ckpt = load_model(cfg, rt.device, lambda: [u.text for u in train_utts])
    opt = configure_optimizer(model, cfg)
    step = 0
    if ckpt is not None:
        step = common.restore(ckpt, cfg, {"model": model}, {"opt": opt} if cfg.init_from == "resume" else None,
                              arch_keys=ARCH_KEYS, rng=cfg.init_from == "resume")
        if cfg.init_from != "resume":
            step = 0
    if rt.master:                                        # the vocabulary travels beside the checkpoint
        with open(os.path.join(cfg.out_dir, "tokenizer.tiktoken"), "w") as f:
            f.write(tok.ranks_text)
    common.log(f"params: {common.count_params(model):,} | vocab {tok.n_vocab} | window "
               f"{window_samples(cfg) / SAMPLE_RATE:.1f} s | {len(train_utts)} training clips")
    batches = Batches(train_utts, tok, cfg)
    cmodel = common.wrap_ddp(common.compile(model, cfg), rt)
    prog = common.Progress(cfg, step)
    window_s = window_samples(cfg) / SAMPLE_RATE
    model.train()
    while step < cfg.max_iters:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        mel, x, y = batches.next(cfg.batch_size, rt.device)
        with rt.autocast():
            loss = loss_fn(cmodel(mel, x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        prog.update(step, {"loss": loss}, audio_seconds=cfg.batch_size * window_s * rt.world_size)
        if (step % cfg.eval_interval == 0 or step == cfg.max_iters) and rt.master:
            evaluate(cfg, model, tok, rt, split="val", beam_size=0)
            common.save_checkpoint(cfg, step, {"model": model}, {"opt": opt},
                                   extra={"tokenizer": tok.ranks_text, "num_languages": tok.num_languages})
    common.cleanup(rt)
    return model, tok

# ----------------------------------------------------------------------------- sample

def sample(cfg):
    """Transcribe --input (any wav/flac) or a held-out test utterance, with timestamps; write the audio, its
    spectrogram png and the transcript under out_dir/samples/."""
    rt = common.setup(cfg)
    if cfg.init_from == "scratch":
        raise SystemExit("error: --mode=sample needs --init_from=resume, a ckpt.pt, or official weights")
    model, tok, ckpt = load_model(cfg, rt.device)
    if ckpt is not None:
        common.restore(ckpt, cfg, {"model": model}, arch_keys=ARCH_KEYS, rng=False)
    model.eval()
    if cfg.input:
        try:
            wav, _ = common.load_audio(cfg.input, sr=SAMPLE_RATE)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}")
        name, ref = os.path.splitext(os.path.basename(cfg.input))[0], None
    else:
        utt = common.load_corpus(cfg, "test", SAMPLE_RATE)[0]
        wav, name, ref = utt.wav, utt.id, utt.text
    with rt.autocast():
        segments, text = transcribe(model, tok, wav, cfg, rt.device, generator=torch.Generator().manual_seed(cfg.seed))
    lines = [f"[{a:6.2f} --> {b:6.2f}] {t}" for a, b, t in segments]
    for line in lines:
        common.log(line)
    if ref is not None:
        common.log(f"reference: {ref}\nWER {common.wer([ref], [text]):.3f} | CER {common.cer([ref], [text]):.3f}")
    out = os.path.join(cfg.out_dir, "samples")
    common.save_sample(out, name, wav, SAMPLE_RATE)
    with open(os.path.join(out, name + ".txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    common.log(f"wrote {out}/{name}.wav, .png, .txt")
    return segments

# ----------------------------------------------------------------------------- bench

def bench(cfg):
    """Training tokens/s and audio-s/s, encoder ms per window, greedy decoding tokens/s at batch 1 and 16,
    eager and (with --compile=True) compiled. Random weights; a byte-level vocabulary unless --tokenizer."""
    rt = common.setup(cfg)
    if cfg.init_from != "scratch":
        model, tok, ckpt = load_model(cfg, rt.device)
        if ckpt is not None:
            common.restore(ckpt, cfg, {"model": model}, arch_keys=ARCH_KEYS, rng=False)
    else:
        tok = build_tokenizer(cfg, []) if not cfg.tokenizer else build_tokenizer(cfg)
        model = Whisper(model_dims(cfg, tok.n_vocab)).to(rt.device)
    frames, B, L = 2 * cfg.n_audio_ctx, cfg.batch_size, min(cfg.n_text_ctx, 64)
    mel = torch.randn(B, cfg.n_mels, frames, device=rt.device)
    x = torch.randint(0, tok.eot, (B, L), device=rt.device)
    opt = configure_optimizer(model, cfg)
    cmodel = common.compile(model, cfg)

    def train_step():
        with rt.autocast():
            loss = loss_fn(cmodel(mel, x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    iters = 2 if rt.device_type == "cpu" else 10
    train_ms = common.timeit(train_step, iters=iters, warmup=2)
    flops = common.count_flops(train_step)
    model.eval()
    enc = common.compile(model.encoder, cfg)
    with torch.no_grad(), rt.autocast():
        enc_ms = common.timeit(lambda: enc(mel[:1]), iters=iters, warmup=2)

    def decode_tps(batch, decoder, steps=16 if rt.device_type == "cpu" else 64):
        """Greedy steps with the KV cache after a 4-token prompt: decoded tokens per second."""
        with torch.no_grad(), rt.autocast():
            xa = model.encoder(mel[:1]).repeat(batch, 1, 1)

            def run():
                cache = KVCache(model.decoder, xa)
                t = torch.tensor([tok.sot_sequence() + [tok.no_timestamps]] * batch, device=rt.device)
                logits = decoder(t, cache=cache)
                for _ in range(steps):
                    t = logits[:, -1:].argmax(-1)
                    logits = decoder(t, cache=cache)
            ms = common.timeit(run, iters=iters, warmup=1)
        return batch * steps / (ms / 1000)
    figures = dict(params=common.count_params(model), n_vocab=tok.n_vocab, window_s=window_samples(cfg) / SAMPLE_RATE,
                   train_step_ms=train_ms, train_flops_per_step=flops,
                   train_tokens_per_s=B * L / (train_ms / 1000),
                   train_audio_s_per_s=B * window_samples(cfg) / SAMPLE_RATE / (train_ms / 1000),
                   encoder_ms_per_window=enc_ms,
                   decode_tokens_per_s_b1=decode_tps(1, model.decoder),
                   decode_tokens_per_s_b16=decode_tps(16, model.decoder))
    if cmodel is not model:  # common.compile compiled: on CUDA, or --compile=True asked for on a CPU
        dec = torch.compile(model.decoder, dynamic=True)
        figures.update(decode_tokens_per_s_b1_compiled=decode_tps(1, dec),
                       decode_tokens_per_s_b16_compiled=decode_tps(16, dec))
    if cfg.bench_official:
        figures.update(bench_official_side_by_side(cfg, rt, model, tok, mel[:1], iters))
    return common.report_bench(cfg, rt, **figures)


def bench_official_side_by_side(cfg, rt, model, tok, mel, iters):
    """Our whole decode() against openai-whisper's decode() on the same weights (the key map is the identity)
    and the same window at batch 1, greedy without timestamps: both emit the same tokens, so tokens/s compare."""
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    saved, mine = sys.path[:], sys.modules.pop("whisper", None)
    try:                                                 # this file is whisper.py too: look past its folder
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
        import whisper as ow
    except ImportError as e:
        common.log(f"openai-whisper not importable ({e}): no side-by-side figure")
        return {}
    finally:
        sys.path[:] = saved
        if mine is not None:
            sys.modules["whisper"] = mine
    dims = ow.model.ModelDimensions(**model_dims(cfg, tok.n_vocab))
    ref = ow.model.Whisper(dims).to(rt.device).eval()
    ref.load_state_dict(model.state_dict(), strict=False)  # ours lacks only their non-persistent buffers
    n = cfg.sample_len or cfg.n_text_ctx // 2
    opts = ow.DecodingOptions(language="en" if tok.multilingual else None, without_timestamps=True, sample_len=n,
                              fp16=rt.dtype != torch.float32 and rt.device_type == "cuda")
    out = {}
    with torch.no_grad():
        with rt.autocast():
            r_ours = decode(model, tok, mel, cfg, beam_size=0, timestamps=False)[0]
            ms_ours = common.timeit(lambda: decode(model, tok, mel, cfg, beam_size=0, timestamps=False),
                                    iters=iters, warmup=1)
        try:
            r_ref = ow.decode(ref, mel[0], opts)
            ms_ref = common.timeit(lambda: ow.decode(ref, mel[0], opts), iters=iters, warmup=1)
        except Exception as e:                           # e.g. our offline BPE is not an official vocabulary
            common.log(f"official decode failed ({type(e).__name__}: {e}); pass --tokenizer=multilingual.tiktoken")
            return {}
    k = len(r_ours.tokens) + 1
    out.update(official_decode_tokens_per_s_b1=k / (ms_ref / 1000), ours_decode_tokens_per_s_b1=k / (ms_ours / 1000),
               decode_speedup_vs_official=ms_ref / ms_ours, official_same_tokens=r_ref.tokens == r_ours.tokens)
    return out

# ----------------------------------------------------------------------------- main

if __name__ == "__main__":
    cfg = common.parse_config(Config, PRESETS)
    {"train": train, "sample": sample, "eval": evaluate, "bench": bench}[cfg.mode](cfg)
