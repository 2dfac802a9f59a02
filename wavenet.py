"""
WaveNet: A Generative Model for Raw Audio (van den Oord et al., 2016) — https://arxiv.org/abs/1609.03499
Fast generation: Fast Wavenet Generation Algorithm (Paine et al., 2016) — https://arxiv.org/abs/1611.09482

The idea: model raw audio one sample at a time, p(x) = prod_t p(x_t | x_<t), with a stack of dilated
causal convolutions (§2.1) whose dilations double 1, 2, ..., 512 and then repeat, so the receptive field
grows exponentially with depth while every layer stays cheap. Each layer is a gated unit
tanh(W_f * x) ⊙ σ(W_g * x) (§2.3) with residual and skip 1×1 convolutions (§2.4); the output is a
256-way softmax over μ-law companded samples (§2.2), trained with cross-entropy and teacher forcing.
Conditioning (§2.5): a global speaker embedding added inside every gate, and local mel frames upsampled
to the sample rate by learned transposed convolutions — this turns WaveNet into a neural vocoder.
Training is parallel over time; generation is strictly sequential. The naive sampler re-runs the whole
receptive field for every new sample; Fast WaveNet caches each layer's past inputs in a queue, so a new
sample costs one column per layer. Both are here, and a test proves they draw the same samples.

Simplified or changed versus the paper:
- conditioned on mel spectrograms (as in later WaveNet vocoders, e.g. Tacotron 2 / r9y9), not on linguistic
  features + log F0; trained on the built-in eSpeak corpus at 16 kHz, not 24.6 h of studio speech.
- layer widths and optimiser are not in the paper: widths follow r9y9's mulaw256 vocoder (res 128, gate 256,
  skip 128), Adam with warm-up and exponential decay; no weight norm, no EMA of weights, no pre-emphasis.
- the input sample enters through an embedding table (≡ a one-hot vector times a 1×1 conv) instead of a
  causal first conv; causality comes from shifting the input one sample right.
- the upsampler is a stack of single-channel ConvTranspose2d over (mel, time), as in r9y9's early vocoder.
- no context stacks (§2.6), no mixture-of-logistics output.

    python wavenet.py                                      # train (mel + speaker conditioned) on the built-in corpus
    python wavenet.py --preset=vocoder --batch_size=8      # r9y9 mulaw256 vocoder size (22.05 kHz, kernel 3)
    python wavenet.py --init_from=resume                   # continue out/wavenet/ckpt.pt
    python wavenet.py --mode=sample --init_from=out/wavenet/ckpt.pt --temperature=0.9   # vocode held-out mel
    python wavenet.py --mode=sample --init_from=out/wavenet/ckpt.pt --input=my.wav      # vocode my.wav's mel
    python wavenet.py --mode=eval --init_from=out/wavenet/ckpt.pt   # held-out bits/sample and vocoded mel L1
    python wavenet.py --cond_mel=False --out_dir=out/wavenet_free   # speaker-only WaveNet (§3.1 multi-speaker)
    python wavenet.py --cond_mel=False --out_dir=out/wavenet_free --mode=sample --init_from=resume --speaker=2
    python wavenet.py --mode=bench                         # train speed; naive vs cached (eager, compiled,
                                                           # CUDA graphs) generation at batch 1 and 16
    torchrun --standalone --nproc_per_node=8 wavenet.py
"""
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    mode: str = "train"               # train | sample | eval | bench
    preset: str = "paper"             # a key of PRESETS
    init_from: str = "scratch"        # scratch | resume | path to one of our checkpoints
    out_dir: str = "out/wavenet"      # ckpt.pt, log.txt, samples/
    data_dir: str = ""                # empty: the built-in speech corpus
    corpus_hours: float = 2.0         # size of the built-in corpus (hours)
    input: str = ""                   # --mode=sample: vocode this wav instead of a held-out utterance
    # audio and features
    sample_rate: int = 16000          # §3.2: TTS at 16 kHz
    n_fft: int = 1024                 # mel STFT size
    hop: int = 256                    # samples per mel frame; must equal prod(upsample_scales)
    n_mels: int = 80                  # mel bins of the local conditioning
    fmin: float = 0.0                 # mel filterbank range (Hz)
    fmax: float = 8000.0              # Nyquist at 16 kHz
    # model (§2; the paper gives no widths: r9y9 mulaw256 widths)
    layers: int = 30                  # dilated conv layers in total
    stacks: int = 3                   # repeats of the dilation cycle 1, 2, ..., 2**(layers/stacks - 1) (§2.1)
    kernel_size: int = 2              # §2.1: filter size 2 (r9y9 uses 3)
    residual_channels: int = 128      # width of the residual stream
    gate_channels: int = 256          # dilated conv output, split into tanh and sigmoid halves (§2.3)
    skip_channels: int = 128          # width of the skip connections and output head (§2.4)
    quant_channels: int = 256         # softmax classes = mu + 1 (§2.2, mu = 255)
    cond_mel: bool = True             # local conditioning on mel frames (§2.5)
    cond_speaker: bool = True         # global conditioning on a speaker embedding (§2.5)
    speaker_dim: int = 16             # speaker embedding size
    upsample_scales: tuple = (16, 16)  # learned transposed-conv upsampling, product = hop (§2.5)
    freq_axis_kernel: int = 3         # mel-axis width of the upsampling kernels
    # training
    seg_len: int = 8000               # training crop in samples (longer than the receptive field)
    batch_size: int = 16
    lr: float = 1e-3                  # Adam, as r9y9
    warmup_iters: int = 200           # linear warm-up
    lr_half_life: int = 20000         # lr halves every this many steps (r9y9 halves every 200k)
    grad_clip: float = 1.0
    max_iters: int = 50000
    log_interval: int = 50
    eval_interval: int = 1000         # also the checkpoint interval
    eval_items: int = 4               # held-out utterances for evaluate()
    eval_seconds: float = 2.0         # crop per utterance for the NLL
    eval_gen_seconds: float = 0.5     # audio vocoded per held-out utterance for evaluate()'s mel L1
    gen_seconds: float = 2.0          # audio generated by --mode=sample
    # sampling
    temperature: float = 1.0          # softmax temperature; 0 = argmax (which collapses to silence, r9y9#93)
    speaker: int = -1                 # speaker id for unconditioned sampling (-1: a few different speakers)
    # runtime
    bench_steps: int = 1024           # cached generation steps timed per bench figure
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"               # bf16 autocast on CUDA for training, fp32 elsewhere
    compile: bool = True

PRESETS = {
    # k = 2, 3 x (1..512): receptive field 3070 samples = 192 ms at 16 kHz (§3.2 used ~240 ms); 3.78 M params
    "paper":   dict(),
    # r9y9 mulaw256 (4.70 M params, RF 6139): 4.63 M here; r9y9 adds weight-norm gains, a mel conv_in and an
    # unused residual conv in the last layer
    "vocoder": dict(kernel_size=3, cond_speaker=False, sample_rate=22050, upsample_scales=(4, 4, 4, 4),
                    fmin=125.0, fmax=7600.0, seg_len=10240, batch_size=8),
    # 0.25 M params, RF 511 samples = 32 ms: the mel carries the rest
    "small":   dict(layers=16, stacks=2, residual_channels=32, gate_channels=64, skip_channels=64,
                    seg_len=4096, batch_size=4, max_iters=2000, eval_interval=500, bench_steps=256,
                    eval_items=2, eval_seconds=1.0, eval_gen_seconds=0.25, gen_seconds=1.0, lr_half_life=2000),
    "tiny":    dict(layers=6, stacks=2, residual_channels=8, gate_channels=16, skip_channels=16, n_mels=20,
                    speaker_dim=4, seg_len=1024, batch_size=2, max_iters=10, corpus_hours=0.02, log_interval=1,
                    eval_items=2, eval_seconds=0.25, eval_gen_seconds=0.05, gen_seconds=0.05, warmup_iters=2,
                    bench_steps=32),
}

# ----------------------------------------------------------------------------- model

def receptive_field(cfg):
    """§2.1: a causal conv of kernel k and dilation d sees (k-1)·d extra past samples; the stack adds them up."""
    per_stack = cfg.layers // cfg.stacks
    return (cfg.kernel_size - 1) * sum(2 ** (i % per_stack) for i in range(cfg.layers)) + 1


def draw(logits, u, temperature):
    """Sample a class per row by inverting the CDF at a pre-drawn uniform u. Drawing u up front makes the
    naive and the cached generator use identical randomness, so their samples can be compared exactly."""
    if temperature == 0:
        return logits.argmax(-1)
    cdf = F.softmax(logits.float() / temperature, dim=-1).cumsum(-1)           # (B, Q)
    return torch.searchsorted(cdf, u[:, None].contiguous()).squeeze(1).clamp_(max=logits.size(-1) - 1)


class Upsampler(nn.Module):
    """§2.5 local conditioning: a 'transposed convolutional network' maps mel frames to the sample rate.
    Each stage is a ConvTranspose2d over (mel bin, time) with one channel, stride s along time."""
    def __init__(self, cfg):
        super().__init__()
        assert math.prod(cfg.upsample_scales) == cfg.hop, "upsample_scales must multiply to hop"
        self.stages = nn.ModuleList()
        for s in cfg.upsample_scales:
            fk = cfg.freq_axis_kernel
            conv = nn.ConvTranspose2d(1, 1, (fk, 2 * s), stride=(1, s), padding=(fk // 2, s // 2))
            # start as a smooth interpolator: every output averages 2 frames x fk bins
            nn.init.constant_(conv.weight, 1.0 / (2 * fk))
            nn.init.zeros_(conv.bias)
            self.stages.append(conv)

    def forward(self, mel):                          # mel: (B, M, N)
        c = mel[:, None]                             # (B, 1, M, N)
        for conv in self.stages:
            c = conv(c)[..., : c.size(-1) * conv.stride[1]]  # (B, 1, M, N·s); kernel 2s, pad s/2 gives exactly N·s
        return c[:, 0]                               # (B, M, N·hop)


class ResidualLayer(nn.Module):
    """One layer: dilated causal conv (§2.1) -> gated unit with conditioning (§2.3, §2.5) -> residual and skip
    1×1 convs (§2.4, Fig. 4)."""
    def __init__(self, cfg, dilation, last=False):
        super().__init__()
        self.dilation, self.k = dilation, cfg.kernel_size
        R, G, S = cfg.residual_channels, cfg.gate_channels, cfg.skip_channels
        self.conv = nn.Conv1d(R, G, cfg.kernel_size, dilation=dilation)  # W_f and W_g stacked: G = 2 halves
        self.cond = nn.Conv1d(cfg.n_mels, G, 1, bias=False) if cfg.cond_mel else None   # V_f * y, V_g * y
        self.gcond = nn.Linear(cfg.speaker_dim, G, bias=False) if cfg.cond_speaker else None  # V_f^T h, V_g^T h
        # the last layer's residual output would feed nothing (only skips reach the head), so it has no out conv
        self.out = nn.Conv1d(G // 2, R, 1) if not last else None
        self.skip = nn.Conv1d(G // 2, S, 1)
        # past offsets of the kernel taps, oldest first: (k-1)·d, ..., d (for the cached step)
        self.register_buffer("taps", dilation * torch.arange(self.k - 1, 0, -1), persistent=False)

    def gate(self, h, x):                            # h: (B, G, ...) pre-activation, x: layer input (B, R, ...)
        a, b = h.chunk(2, dim=1)                     # (B, G/2, ...) each
        z = torch.tanh(a) * torch.sigmoid(b)         # §2.3, Eq. 3
        if self.out is None:
            return x, self.skip(z)
        # √0.5 keeps the residual stream's variance constant with depth (r9y9, Gated PixelCNN-style)
        return (x + self.out(z)) * math.sqrt(0.5), self.skip(z)

    def forward(self, x, c=None, g=None):            # x: (B, R, T), c: (B, M, T), g: (B, D)
        h = self.conv(F.pad(x, ((self.k - 1) * self.dilation, 0)))  # left pad only: causal (§2.1, Fig. 3)
        if c is not None:
            h = h + self.cond(c)                     # V * y with y the upsampled mel (§2.5, Eq. 5)
        if g is not None:
            h = h + self.gcond(g)[:, :, None]        # broadcast over time (§2.5, Eq. 4)
        return self.gate(h, x)

    def step(self, x, queue, t, cond):
        """Fast WaveNet: the layer's conv at time t needs its inputs at t, t-d, ..., t-(k-1)d. The queue is a
        ring buffer of the last (k-1)·d inputs (B, R, (k-1)d); slot t mod (k-1)d holds the oldest one."""
        n = queue.size(2)
        past = queue.index_select(2, (t - self.taps) % n)             # (B, R, k-1)
        window = torch.cat([past, x[:, :, None]], dim=2)             # (B, R, k), oldest first like the kernel
        queue.index_copy_(2, (t % n).view(1), x[:, :, None])          # push x_t over the slot just read
        # on one column every conv is a matmul: the k taps flattened against the (G, R·k) kernel, 1×1s as they are
        h = F.linear(window.flatten(1), self.conv.weight.flatten(1), self.conv.bias) + cond  # (B, G)
        a, b = h.chunk(2, dim=1)
        z = torch.tanh(a) * torch.sigmoid(b)                          # (B, G/2), as in gate()
        s = F.linear(z, self.skip.weight[:, :, 0], self.skip.bias)
        if self.out is None:
            return x, s
        return (x + F.linear(z, self.out.weight[:, :, 0], self.out.bias)) * math.sqrt(0.5), s


class WaveNet(nn.Module):
    def __init__(self, cfg, n_speakers=1):
        super().__init__()
        assert cfg.layers % cfg.stacks == 0 and cfg.kernel_size >= 2
        self.cfg = cfg
        Q, R, S = cfg.quant_channels, cfg.residual_channels, cfg.skip_channels
        self.embed = nn.Embedding(Q, R)              # one-hot μ-law input × 1×1 conv == a table lookup (§2.2)
        per_stack = cfg.layers // cfg.stacks
        self.layers = nn.ModuleList(ResidualLayer(cfg, 2 ** (i % per_stack), last=i == cfg.layers - 1)
                                    for i in range(cfg.layers))
        # §2.4, Fig. 4: sum of skips -> ReLU -> 1×1 -> ReLU -> 1×1 -> softmax
        self.head = nn.Sequential(nn.ReLU(), nn.Conv1d(S, S, 1), nn.ReLU(), nn.Conv1d(S, Q, 1))
        self.upsample = Upsampler(cfg) if cfg.cond_mel else None
        self.speaker_emb = nn.Embedding(n_speakers, cfg.speaker_dim) if cfg.cond_speaker else None
        self.receptive_field = receptive_field(cfg)

    def net(self, x, c=None, g=None):                # x: (B, T) codes of the *previous* samples
        h = self.embed(x).transpose(1, 2)            # (B, R, T)
        skips = 0
        for layer in self.layers:
            h, s = layer(h, c, g)
            skips = skips + s
        return self.head(skips * math.sqrt(1.0 / len(self.layers)))  # (B, Q, T) logits

    def conditioning(self, mel=None, spk=None, n=None):
        c = self.upsample(mel)[:, :, :n] if self.upsample is not None else None    # (B, M, T)
        g = self.speaker_emb(spk) if self.speaker_emb is not None else None       # (B, D)
        return c, g

    def forward(self, x, mel=None, spk=None):        # teacher forcing: all T steps in parallel
        c, g = self.conditioning(mel, spk, x.size(1))
        return self.net(x, c, g)

    @torch.no_grad()
    def generate_naive(self, u, c=None, g=None, temperature=1.0):
        """The readable reference: every new sample re-runs the whole stack over the last receptive-field inputs."""
        B, T = u.shape
        rf, silence = self.receptive_field, common.mulaw_quantize(torch.zeros(()))
        x = torch.full((B, T + 1), int(silence), dtype=torch.long, device=u.device)  # x[:, t] is the input at step t
        for t in range(T):
            lo = max(0, t + 1 - rf)
            ct = c[:, :, lo:t + 1] if c is not None else None
            logits = self.net(x[:, lo:t + 1], ct, g)[:, :, -1]          # (B, Q): only the last column is new
            x[:, t + 1] = draw(logits, u[:, t], temperature)
        return x[:, 1:]


class CachedGenerator:
    """Fast WaveNet (Paine et al. 2016, Alg. 1): per-layer queues of past activations make each new sample
    cost O(layers) instead of O(receptive field). All state lives in preallocated tensors and `step` mutates
    them in place, so one step can be compiled or captured once in a CUDA graph and replayed."""
    def __init__(self, model, u, c=None, g=None, temperature=1.0):
        self.m, self.u, self.c, self.temperature = model, u, c, temperature
        B, T = u.shape
        p = next(model.parameters())
        R, G, L = model.cfg.residual_channels, model.cfg.gate_channels, len(model.layers)
        self.queues = [torch.zeros(B, R, (l.k - 1) * l.dilation, device=p.device, dtype=p.dtype) for l in model.layers]
        self.t = torch.zeros((), dtype=torch.long, device=p.device)
        self.x = torch.zeros(B, dtype=torch.long, device=p.device)
        self.out = torch.zeros(B, T, dtype=torch.long, device=p.device)
        # all layers' conditioning in one matmul per step: stacked V (L·G, M); the speaker term is constant
        if c is not None:
            self.Wc = torch.cat([l.cond.weight[:, :, 0] for l in model.layers])    # (L·G, M)
        self.gbias = torch.zeros(B, L, G, device=p.device, dtype=p.dtype)
        if g is not None:
            self.gbias = torch.stack([l.gcond(g) for l in model.layers], 1)      # (B, L, G)
        self.reset()

    def reset(self):                                 # in place: a captured CUDA graph keeps pointing at these
        for q in self.queues:
            q.zero_()
        self.t.zero_()
        self.x.fill_(int(common.mulaw_quantize(torch.zeros(()))))  # the first input is silence
        self.out.zero_()

    def step(self):
        m, t, B = self.m, self.t, self.x.size(0)
        cond = self.gbias
        if self.c is not None:
            ct = self.c.index_select(2, t.view(1))[:, :, 0]                      # (B, M)
            cond = cond + F.linear(ct, self.Wc).view(B, len(m.layers), -1)       # (B, L, G)
        h, skips = m.embed(self.x), 0                                           # (B, R)
        for i, layer in enumerate(m.layers):
            h, s = layer.step(h, self.queues[i], t, cond[:, i])
            skips = skips + s
        h = F.relu(skips * math.sqrt(1.0 / len(m.layers)))                   # the head of §2.4 on one column
        h = F.relu(F.linear(h, m.head[1].weight[:, :, 0], m.head[1].bias))
        logits = F.linear(h, m.head[3].weight[:, :, 0], m.head[3].bias)       # (B, Q)
        x = draw(logits, self.u.index_select(1, t.view(1))[:, 0], self.temperature)
        self.out.index_copy_(1, t.view(1), x[:, None])
        self.x.copy_(x)
        self.t.add_(1)


@torch.no_grad()
def generate(model, n, mel=None, spk=None, batch=1, temperature=1.0, seed=0, method="cached"):
    """Generate n samples (B, n) of μ-law codes. method: naive | cached | compiled | cudagraph | compiled_cudagraph."""
    dev = next(model.parameters()).device
    B = mel.size(0) if mel is not None else (spk.size(0) if spk is not None else batch)
    u = torch.rand(B, n, generator=torch.Generator().manual_seed(seed)).to(dev)  # all randomness, drawn up front
    c, g = model.conditioning(mel, spk, n)
    if method == "naive":
        return model.generate_naive(u, c, g, temperature)
    gen = CachedGenerator(model, u, c, g, temperature)
    step = gen.step
    if method.startswith("compiled"):                # fuses each layer's elementwise ops into few kernels
        step = torch.compile(gen.step)
    if method.endswith("cudagraph"):                 # record one step's kernels once, replay them n times:
        s = torch.cuda.Stream()                      # at batch 1 the GPU is bound by kernel-launch latency
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                step()                               # warm-up outside the graph (compilation, cuBLAS handles)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        gen.reset()
        step = graph.replay
    for _ in range(n):
        step()
    return gen.out

# ----------------------------------------------------------------------------- loss

def nll_loss(model, wav, spk, cfg):
    """Eq. 1 with teacher forcing: every sample is predicted from the true past at once. §2.2: targets are the
    256 μ-law classes (Eq. 2), the loss is cross-entropy; returns nats per sample."""
    with torch.autocast(wav.device.type, enabled=False):
        mel = mel_features(wav, cfg) if cfg.cond_mel else None      # (B, M, T/hop), fp32
        q = common.mulaw_quantize(wav)                              # (B, T) targets in [0, 255]
    silence = int(common.mulaw_quantize(torch.zeros(())))
    x = F.pad(q[:, :-1], (1, 0), value=silence)                      # (B, T) inputs: shifted one sample right
    logits = model(x, mel, spk)                                      # (B, Q, T)
    return F.cross_entropy(logits.float(), q)

# ----------------------------------------------------------------------------- data

def mel_features(wav, cfg):
    """Log-mel frames aligned to hops (frame i covers samples [i·hop, (i+1)·hop)), scaled to roughly [-2, 2]."""
    mel = common.mel_spectrogram(wav, cfg.sample_rate, n_fft=cfg.n_fft, hop=cfg.hop, n_mels=cfg.n_mels,
                                 fmin=cfg.fmin, fmax=cfg.fmax, log="ln")   # (B, M, T/hop), ln(1e-5) = -11.5 floor
    return (mel + 4.0) / 4.0


def held_out(cfg, rt, n_items, seconds, split="val"):
    """The first n_items held-out utterances, cropped from where the sound starts (skipping leading silence)
    to a common length, a multiple of hop, so they batch."""
    utts = common.load_corpus(cfg, split, cfg.sample_rate)[:n_items]
    loud = [np.flatnonzero(np.abs(u.wav) > 0.05 * np.abs(u.wav).max()) for u in utts]
    starts = [int(i[0]) // cfg.hop * cfg.hop if len(i) else 0 for i in loud]
    n = min(min(len(u.wav) - s for u, s in zip(utts, starts)), int(seconds * cfg.sample_rate)) // cfg.hop * cfg.hop
    wav = torch.stack([torch.as_tensor(u.wav[s:s + n]) for u, s in zip(utts, starts)]).to(rt.device)  # (B, n)
    # a user folder may hold a held-out speaker id beyond the training table; it has no trained embedding anyway
    n_spk = common.num_speakers(common.load_corpus(cfg, "train", cfg.sample_rate)) if cfg.data_dir else common.NUM_SPEAKERS
    spk = torch.tensor([min(u.speaker, n_spk - 1) for u in utts], device=rt.device)
    return wav, spk


def load_trained(cfg, rt):
    """For sample/eval: the model (speaker table sized from the corpus) with the weights of --init_from,
    or of out_dir/ckpt.pt when no checkpoint is named."""
    model = WaveNet(cfg, common.num_speakers(common.load_corpus(cfg, "train", cfg.sample_rate))).to(rt.device)
    path = common.resume_path(cfg) if cfg.init_from != "scratch" else f"{cfg.out_dir}/ckpt.pt"
    common.restore(common.load_checkpoint(path), cfg, {"model": model}, arch_keys=ARCH_KEYS)
    return model.eval()


ARCH_KEYS = ("sample_rate", "n_fft", "hop", "n_mels", "fmin", "fmax", "layers", "stacks", "kernel_size",
             "residual_channels", "gate_channels", "skip_channels", "quant_channels", "cond_mel", "cond_speaker",
             "speaker_dim", "upsample_scales", "freq_axis_kernel")

# ----------------------------------------------------------------------------- train

@torch.no_grad()
def evaluate(cfg, model=None, rt=None):
    """Held-out NLL in bits per sample (teacher forcing) and mel L1 of vocoded held-out audio (cached sampling)."""
    standalone = model is None
    if standalone:
        rt = common.setup(cfg)
        model = load_trained(cfg, rt)
    was_training = model.training
    model.eval()
    wav, spk = held_out(cfg, rt, cfg.eval_items, cfg.eval_seconds)
    with rt.autocast():
        bits = nll_loss(model, wav, spk, cfg).item() / math.log(2)
    res = {"nll_bits_per_sample": round(bits, 4)}
    if cfg.cond_mel:                                 # vocode a short crop of each held-out utterance
        n = min(wav.size(1), max(cfg.hop, int(cfg.eval_gen_seconds * cfg.sample_rate) // cfg.hop * cfg.hop))
        ref = wav[:, :n]
        codes = generate(model, n, mel_features(ref, cfg), spk, temperature=cfg.temperature, seed=cfg.seed)
        res["mel_l1"] = round(common.mel_distance(common.mulaw_dequantize(codes), ref, cfg.sample_rate), 4)
        common.save_sample(f"{cfg.out_dir}/samples", "eval_vocoded", common.mulaw_dequantize(codes[0]).cpu(),
                           cfg.sample_rate, ref=ref[0].cpu())
    common.log("eval | " + " | ".join(f"{k} {v}" for k, v in res.items()))
    model.train(was_training)
    if standalone:
        common.cleanup(rt)
    return res


def lr_at(step, cfg):
    # warm-up, then halve every lr_half_life steps (r9y9's step decay, made smooth); independent of max_iters
    # so that a run resumed with a larger max_iters follows the same schedule
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_iters)) * 0.5 ** (step / cfg.lr_half_life)


def train(cfg):
    rt = common.setup(cfg)
    utts = common.load_corpus(cfg, "train", cfg.sample_rate)
    model = WaveNet(cfg, common.num_speakers(utts)).to(rt.device)
    rf = model.receptive_field
    common.log(f"receptive field {rf} samples = {1000 * rf / cfg.sample_rate:.1f} ms | "
               f"{common.count_params(model) / 1e6:.3f} M params | {len(utts)} training utterances")
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sampler = common.SegmentSampler([u.wav for u in utts], cfg.seg_len, cfg.batch_size, cfg.seed,
                                    rt.rank, rt.world_size, align=cfg.hop)
    speakers = torch.tensor([u.speaker for u in utts])
    step = 0
    if cfg.init_from != "scratch":
        step = common.restore(common.load_checkpoint(common.resume_path(cfg)), cfg, {"model": model},
                              {"opt": opt}, sampler=sampler, arch_keys=ARCH_KEYS)
        common.log(f"resumed from step {step}")
    raw = model
    model = common.wrap_ddp(common.compile(model, cfg), rt)
    prog = common.Progress(cfg, start_step=step)
    while step < cfg.max_iters:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        wav, idx = sampler.next()                    # (B, seg_len), (B,)
        wav, spk = wav.to(rt.device, non_blocking=True), speakers[idx].to(rt.device)
        with rt.autocast():
            loss = nll_loss(model, wav, spk, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        prog.update(step, {"nll": loss}, audio_seconds=wav.numel() * rt.world_size / cfg.sample_rate)
        if rt.master and (step % cfg.eval_interval == 0 or step == cfg.max_iters):
            evaluate(cfg, raw, rt)
            common.save_checkpoint(cfg, step, {"model": raw}, {"opt": opt}, sampler=sampler)
    common.cleanup(rt)

# ----------------------------------------------------------------------------- sample

@torch.no_grad()
def sample(cfg):
    """Vocode a held-out utterance (or --input) from its mel; a model trained with --cond_mel=False instead
    babbles freely, conditioned only on the speaker embedding (or on nothing)."""
    rt = common.setup(cfg)
    model = load_trained(cfg, rt)
    out = f"{cfg.out_dir}/samples"
    n = max(cfg.hop, int(cfg.gen_seconds * cfg.sample_rate) // cfg.hop * cfg.hop)
    t0 = time.time()
    if cfg.cond_mel:
        if cfg.input:
            ref = torch.as_tensor(common.load_audio(cfg.input, sr=cfg.sample_rate)[0])[None].to(rt.device)
            spk = torch.tensor([max(cfg.speaker, 0)], device=rt.device)
            n = ref.size(1) // cfg.hop * cfg.hop     # the whole file
        else:
            ref, spk = held_out(cfg, rt, 1, cfg.gen_seconds)
            n = ref.size(1)
        ref = ref[:, :n]
        codes = generate(model, n, mel_features(ref, cfg), spk if cfg.cond_speaker else None,
                         temperature=cfg.temperature, seed=cfg.seed)
        wav = common.mulaw_dequantize(codes)
        common.save_sample(out, "vocoded", wav[0].cpu(), cfg.sample_rate, ref=ref[0].cpu())
        common.log(f"vocoded {n} samples in {time.time() - t0:.1f}s | mel L1 vs reference "
                   f"{common.mel_distance(wav, ref, cfg.sample_rate):.3f} | {out}/vocoded.wav")
    else:
        spk = None
        if cfg.cond_speaker:
            ids = [cfg.speaker] if cfg.speaker >= 0 else list(range(min(4, model.speaker_emb.num_embeddings)))
            spk = torch.tensor(ids, device=rt.device)
        codes = generate(model, n, spk=spk, temperature=cfg.temperature, seed=cfg.seed)
        wav = common.mulaw_dequantize(codes)
        for i in range(wav.size(0)):
            name = f"speaker{int(spk[i])}" if spk is not None else "unconditional"
            common.save_sample(out, name, wav[i].cpu(), cfg.sample_rate)
        common.log(f"generated {wav.size(0)} x {n} samples in {time.time() - t0:.1f}s -> {out}/")
    common.cleanup(rt)

# ----------------------------------------------------------------------------- bench

def bench(cfg):
    rt = common.setup(cfg)
    if cfg.init_from != "scratch":                   # speed does not depend on the weights: random ones do
        model = load_trained(cfg, rt).train()
    else:
        model = WaveNet(cfg, common.num_speakers(common.load_corpus(cfg, "train", cfg.sample_rate))).to(rt.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    train_model = common.compile(model, cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    wav = ((torch.rand(cfg.batch_size, cfg.seg_len, generator=g) * 2 - 1) * 0.5).to(rt.device)  # content-free
    spk = torch.zeros(cfg.batch_size, dtype=torch.long, device=rt.device)

    def train_step(m=train_model):
        with rt.autocast():
            loss = nll_loss(m, wav, spk, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step_ms = common.timeit(train_step, iters=5, warmup=2)
    flops = common.count_flops(lambda: train_step(model))   # eager: the counter cannot see inside compiled kernels
    # generation: samples per second (all streams together), naive vs cached, batch 1 and 16
    model.eval()
    compiled = train_model is not model              # common.compile: on CUDA by default, on a CPU if asked
    methods = ["naive", "cached"] + (["compiled"] if compiled else []) + \
              (["cudagraph"] + (["compiled_cudagraph"] if compiled else []) if rt.device_type == "cuda" else [])
    gen = {}
    rf = model.receptive_field
    for B in (1, 16):
        nmel = max(1, max(cfg.bench_steps, rf) // cfg.hop + 1)
        mel = torch.randn(B, cfg.n_mels, nmel, device=rt.device) if cfg.cond_mel else None
        sp = torch.zeros(B, dtype=torch.long, device=rt.device) if cfg.cond_speaker else None
        with torch.no_grad():                        # steady-state naive step: a full receptive field per sample
            x = torch.randint(0, cfg.quant_channels, (B, rf), device=rt.device)
            c, g = model.conditioning(mel, sp, rf)
            u = torch.rand(B, device=rt.device)
            ms = common.timeit(lambda: draw(model.net(x, c, g)[:, :, -1], u, cfg.temperature), iters=5, warmup=2)
        gen[f"naive_b{B}_samples_per_s"] = round(B / (ms / 1000), 1)
        for method in methods[1:]:                   # cached: every step costs the same, time bench_steps of them
            try:
                ms = common.timeit(lambda: generate(model, cfg.bench_steps, mel, sp, batch=B, method=method), iters=3, warmup=1)
                gen[f"{method}_b{B}_samples_per_s"] = round(B * cfg.bench_steps / (ms / 1000), 1)
            except Exception as e:                   # e.g. compile unavailable: report, don't crash the bench
                gen[f"{method}_b{B}_error"] = f"{type(e).__name__}: {str(e)[:120]}"
    best_b1 = max(v for k, v in gen.items() if k.endswith("_b1_samples_per_s"))
    common.report_bench(cfg, rt, params=common.count_params(model), receptive_field=model.receptive_field,
                        train_step_ms=round(step_ms, 2),
                        train_audio_s_per_s=round(wav.numel() / cfg.sample_rate / (step_ms / 1000), 2),
                        train_flops_per_step=flops, **gen,
                        gen_dtype="float32", best_b1_realtime_factor=round(best_b1 / cfg.sample_rate, 4))
    common.cleanup(rt)

# ----------------------------------------------------------------------------- main

if __name__ == "__main__":
    cfg = common.parse_config(Config, PRESETS)
    {"train": train, "sample": sample, "eval": evaluate, "bench": bench}[cfg.mode](cfg)
