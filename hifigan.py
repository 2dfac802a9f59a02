"""
HiFi-GAN: Generative Adversarial Networks for Efficient and High Fidelity Speech Synthesis
(Kong, Kim, Bae, NeurIPS 2020) — https://arxiv.org/abs/2010.05646

The idea: MelGAN's recipe, with two changes that fix its metallic, periodic artifacts. The generator
follows each transposed-conv upsampler with multi-receptive-field fusion (MRF, §2.1): several residual
blocks with different kernels and dilations run in parallel and are averaged, so every rate sees
patterns of many lengths at once. A multi-period discriminator (MPD, §2.2) folds the waveform into
2-D grids of period 2, 3, 5, 7 and 11 so it can judge the periodic structure of voiced speech, beside
MelGAN's multi-scale discriminator. Training swaps the hinge loss for least squares and adds an L1 loss
on mel spectrograms (x45, §2.3) that makes the first steps fast and stable.

Simplified or changed versus the paper / official code (jik876/hifi-gan):
- data is the built-in eSpeak corpus (or --data_dir), not LJSpeech; no fine-tuning on Tacotron 2 mels
  (§4.4); training is measured in steps (the paper trains 2.5 M); evaluation is mel L1, not MOS.
- one waveform batch goes through the discriminators as [real; fake] in a single forward (same math,
  fewer kernel launches; spectral norm then runs one power iteration per call, not two); the G step's
  real features are computed without grad; bf16 autocast and torch.compile on CUDA (the official code
  is fp32, eager).
- an "epoch" for the learning-rate decay is one pass of segments over the training clips (as the
  official loader: one random segment per clip), counted in steps.
- PyTorch's default init is kept: the official init_weights runs after weight norm and has no effect.

    python hifigan.py                                   # train on the built-in corpus
    python hifigan.py --preset=v1 --batch_size=16       # paper size (V1: 13.94 M generator)
    python hifigan.py --init_from=resume                # continue out/hifigan/ckpt.pt
    python hifigan.py --mode=sample --init_from=out/hifigan/ckpt.pt   # or the official generator_v1
    python hifigan.py --mode=eval --init_from=out/hifigan/ckpt.pt
    python hifigan.py --mode=bench
    torchrun --standalone --nproc_per_node=8 hifigan.py
"""
import contextlib
import copy
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm, weight_norm
from torch.nn.utils import parametrize

import common

# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    mode: str = "train"                 # train | sample | eval | bench
    preset: str = "v1"                  # a key of PRESETS
    init_from: str = "scratch"          # scratch | resume | path to a checkpoint (ours or the official generator)
    out_dir: str = "out/hifigan"
    data_dir: str = ""                  # empty: the built-in speech corpus
    corpus_hours: float = 2.0           # size of the built-in corpus
    input: str = ""                     # --mode=sample: a wav to re-synthesize (empty: held-out utterances)
    seed: int = 1337
    # features (official meldataset.py: Tacotron 2's mels)
    sample_rate: int = 22050            # LJSpeech rate (§3)
    n_fft: int = 1024                   # STFT size
    hop: int = 256                      # samples per mel frame = product of upsample_rates
    n_mels: int = 80                    # mel bins
    fmin: float = 0.0                   # lowest mel frequency (Hz)
    fmax: float = 8000.0                # highest mel frequency (Hz) of the generator's input mel
    fmax_loss: float = 0.0              # highest mel frequency of the loss mel; 0 = Nyquist (official fmax_for_loss)
    # generator (§2.1)
    channels: int = 512                 # h_u: width after the input conv (Appendix A)
    upsample_rates: tuple = (8, 8, 2, 2)  # k_u strides, product = hop (§2.1)
    upsample_kernels: tuple = (16, 16, 4, 4)  # transposed-conv kernels
    resblock: str = "1"                 # MRF block type: "1" (V1, V2) or the lighter "2" (V3)
    resblock_kernels: tuple = (3, 7, 11)  # k_r: one residual block per kernel, in parallel (MRF)
    resblock_dilations: tuple = ((1, 3, 5), (1, 3, 5), (1, 3, 5))  # D_r: dilations of each block
    # discriminator (§2.2)
    periods: tuple = (2, 3, 5, 7, 11)   # MPD periods, primes so the folds overlap little (§2.2)
    num_d: int = 3                      # MSD discriminators on raw, 2x and 4x downsampled audio
    d_max_channels: int = 1024          # channel cap of the discriminators (1024 = the paper's)
    # loss and optimization (§2.3, official train.py)
    lambda_fm: float = 2.0              # feature-matching weight (Eq. 5)
    lambda_mel: float = 45.0            # mel-spectrogram L1 weight (Eq. 5)
    lr: float = 2e-4                    # AdamW, G and D alike (§3)
    betas: tuple = (0.8, 0.99)          # AdamW betas
    weight_decay: float = 0.01          # AdamW weight decay
    lr_decay: float = 0.999             # ExponentialLR gamma, stepped once per epoch
    batch_size: int = 16
    segment: int = 8192                 # training clip length in samples
    max_iters: int = 100_000            # optimizer steps (the paper trains 2.5 M, see README)
    log_interval: int = 50
    eval_interval: int = 2000           # evaluate, write samples and checkpoint every N steps
    eval_items: int = 16                # held-out utterances evaluate() vocodes
    device: str = "auto"
    dtype: str = "auto"                 # bf16 autocast on CUDA, fp32 elsewhere
    compile: bool = True                # torch.compile (CUDA only unless asked)
    bench_iters: int = 10               # timed iterations per bench figure
    bench_seconds: float = 10.0         # audio length of the batch-1 inference benchmark

PRESETS = {  # the official config_v1/v2/v3.json (Appendix A)
    "v1":    dict(),                                        # 13.94 M: best quality
    "v2":    dict(channels=128),                            # 0.93 M: V1's shape, narrow
    "v3":    dict(channels=256, upsample_rates=(8, 8, 4), upsample_kernels=(16, 16, 8), resblock="2",
                  resblock_kernels=(3, 5, 7), resblock_dilations=((1, 2), (2, 6), (3, 12))),  # 1.46 M: fastest
    "small": dict(channels=128, d_max_channels=32, batch_size=4, max_iters=1000, eval_interval=250,
                  corpus_hours=0.5, eval_items=8, log_interval=25, compile=False),  # V2's G; ~15 min, laptop CPU
    "tiny":  dict(channels=32, upsample_rates=(16, 16), upsample_kernels=(32, 32), d_max_channels=16,
                  batch_size=2, segment=2048, max_iters=10,
                  eval_interval=1000, corpus_hours=0.02, eval_items=2, log_interval=1, bench_iters=2,
                  bench_seconds=2.0),  # tests
}
ARCH_KEYS = ("n_mels", "hop", "channels", "upsample_rates", "upsample_kernels", "resblock", "resblock_kernels",
             "resblock_dilations", "periods", "num_d", "d_max_channels")

# ----------------------------------------------------------------------------- model

class ResBlock(nn.Module):
    """One MRF member (§2.1, Fig. 1): residual units with kernel k, one per dilation, identity shortcuts.
    Type 1 (V1, V2): LReLU, dilated conv, LReLU, conv. Type 2 (V3): LReLU, dilated conv. Zero "same" padding."""
    def __init__(self, channels, kernel, dilations, kind):
        super().__init__()
        conv = lambda d: weight_norm(nn.Conv1d(channels, channels, kernel, dilation=d, padding=d * (kernel - 1) // 2))
        if kind == "1":
            self.convs1 = nn.ModuleList(conv(d) for d in dilations)
            self.convs2 = nn.ModuleList(conv(1) for _ in dilations)
        else:
            self.convs = nn.ModuleList(conv(d) for d in dilations)   # the official names, so its files load

    def forward(self, x):                                          # (B, C, T) -> (B, C, T)
        if hasattr(self, "convs1"):
            for c1, c2 in zip(self.convs1, self.convs2):
                x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, 0.1)), 0.1))
        else:
            for c in self.convs:
                x = x + c(F.leaky_relu(x, 0.1))
        return x


class Generator(nn.Module):
    """mel (B, n_mels, frames) -> waveform (B, 1, frames * hop) in [-1, 1] (§2.1, Fig. 1).
    Weight norm on every conv, as MelGAN; no noise input."""
    def __init__(self, cfg):
        super().__init__()
        assert math.prod(cfg.upsample_rates) == cfg.hop, "upsample_rates must multiply to hop"
        self.n_res = len(cfg.resblock_kernels)
        self.conv_pre = weight_norm(nn.Conv1d(cfg.n_mels, cfg.channels, 7, padding=3))
        self.ups, self.resblocks = nn.ModuleList(), nn.ModuleList()
        ch = cfg.channels
        for r, k in zip(cfg.upsample_rates, cfg.upsample_kernels):
            self.ups.append(weight_norm(nn.ConvTranspose1d(ch, ch // 2, k, stride=r, padding=(k - r) // 2)))
            ch //= 2
            self.resblocks.extend(ResBlock(ch, k_r, d_r, cfg.resblock)
                                  for k_r, d_r in zip(cfg.resblock_kernels, cfg.resblock_dilations))
        self.conv_post = weight_norm(nn.Conv1d(ch, 1, 7, padding=3))

    def forward(self, mel):                                        # (B, n_mels, frames)
        x = self.conv_pre(mel)                                     # (B, C, frames)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, 0.1))                           # (B, C / 2^(i+1), frames * prod(rates[:i+1]))
            # MRF: the blocks run in parallel on the same input and are averaged, so this rate sees
            # receptive fields of several lengths at once (§2.1)
            x = sum(self.resblocks[i * self.n_res + j](x) for j in range(self.n_res)) / self.n_res
        x = self.conv_post(F.leaky_relu(x))                        # slope 0.01 here, as the official code
        return torch.tanh(x)                                       # (B, 1, frames * hop)


class PeriodDiscriminator(nn.Module):
    """One MPD member (§2.2, Fig. 2): fold the waveform into (T/p, p) and convolve along time only,
    kernel (5, 1), so each column holds the samples p apart: the periodic structure of voiced speech."""
    def __init__(self, cfg, period):
        super().__init__()
        self.period = period
        ch = [1] + [min(c, cfg.d_max_channels) for c in (32, 128, 512, 1024, 1024)]
        self.convs = nn.ModuleList(weight_norm(nn.Conv2d(ch[i], ch[i + 1], (5, 1), (3 if i < 4 else 1, 1),
                                                         padding=(2, 0))) for i in range(5))
        self.conv_post = weight_norm(nn.Conv2d(ch[-1], 1, (3, 1), padding=(1, 0)))

    def forward(self, x):                                          # (B, 1, T)
        b, c, t = x.shape
        if t % self.period:                                        # reflect-pad T up to a multiple of p
            x = F.pad(x, (0, self.period - t % self.period), "reflect")
        x = x.view(b, c, -1, self.period)                          # (B, 1, T/p, p)
        fmaps = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
            fmaps.append(x)                                        # hidden features, for feature matching
        fmaps.append(self.conv_post(x))                            # (B, 1, T', p) logits, last
        return fmaps


class ScaleDiscriminator(nn.Module):
    """One MSD member (§2.2, MelGAN's discriminator, wider): strided grouped convs down to a map of
    window logits. The raw-scale member uses spectral norm instead of weight norm (§2.2)."""
    def __init__(self, cfg, norm=weight_norm):
        super().__init__()
        cap = lambda c: min(c, cfg.d_max_channels)
        layers = [(1, 128, 15, 1, 1), (128, 128, 41, 2, 4), (128, 256, 41, 2, 16), (256, 512, 41, 4, 16),
                  (512, 1024, 41, 4, 16), (1024, 1024, 41, 1, 16), (1024, 1024, 5, 1, 1)]  # in, out, k, stride, groups
        self.convs = nn.ModuleList(norm(nn.Conv1d(cap(i), cap(o), k, s, groups=g, padding=(k - 1) // 2))
                                   for i, o, k, s, g in layers)
        self.conv_post = norm(nn.Conv1d(cap(1024), 1, 3, padding=1))

    def forward(self, x):                                          # (B, 1, T)
        fmaps = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
            fmaps.append(x)                                        # hidden features, for feature matching
        fmaps.append(self.conv_post(x))                            # (B, 1, T / 64) window logits, last
        return fmaps


class Discriminator(nn.Module):
    """MPD (5 periods) + MSD (3 scales, raw then average-pooled 2x and 4x) (§2.2): the MPD sees periodic
    patterns, the MSD consecutive ones; MelGAN had only the MSD."""
    def __init__(self, cfg):
        super().__init__()
        self.mpd = nn.ModuleList(PeriodDiscriminator(cfg, p) for p in cfg.periods)
        self.msd = nn.ModuleList(ScaleDiscriminator(cfg, spectral_norm if i == 0 else weight_norm)
                                 for i in range(cfg.num_d))
        self.pool = nn.AvgPool1d(4, stride=2, padding=2)

    def forward(self, x):                                          # (B, 1, T)
        outs = [d(x) for d in self.mpd]
        for i, d in enumerate(self.msd):
            if i > 0:
                x = self.pool(x)                                   # (B, 1, ~T / 2^i)
            outs.append(d(x))
        return outs                                                # [discriminator][layer] -> (B, C, ...)


def remove_weight_norm(model):
    """Fold g * v / ||v|| into a plain weight for inference (the official code does the same)."""
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model


def load_official(G, state):
    """Map an official generator file (generator_v1/v2/v3, g_02500000: {'generator': state_dict}) onto ours.
    Our modules carry the official names (conv_pre, ups.i, resblocks.{stage * 3 + kernel}.convs1/convs2.j or
    .convs.j, conv_post); only the old-style weight-norm keys weight_g/weight_v need renaming."""
    if not isinstance(state, dict) or "generator" not in state:
        raise SystemExit("error: not an official HiFi-GAN generator file (expected {'generator': state_dict}; "
                         "do_* files hold only the discriminators)")
    suffix = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1",
              "bias": "bias"}
    ours = {}
    for k, v in state["generator"].items():
        prefix, _, leaf = k.rpartition(".")
        if leaf not in suffix:
            raise SystemExit(f"error: unexpected key {k!r} in the official HiFi-GAN generator file")
        ours[f"{prefix}.{suffix[leaf]}"] = v
    common.load_state_dict(G, ours, what="HiFi-GAN generator (official weights)")

# ----------------------------------------------------------------------------- loss

def discriminator_loss(real_outs, fake_outs):
    """Least-squares GAN (§2.3, Eq. 1): real logits to 1, fake to 0; non-vanishing gradients (LSGAN)."""
    loss = 0.0
    for r, f in zip(real_outs, fake_outs):
        loss = loss + torch.mean((1 - r[-1].float()) ** 2) + torch.mean(f[-1].float() ** 2)
    return loss


def generator_loss(fake_outs):
    """Adversarial term of the generator: fake logits to 1 (§2.3, Eq. 2)."""
    return sum(torch.mean((1 - f[-1].float()) ** 2) for f in fake_outs)


def feature_loss(real_outs, fake_outs):
    """Feature matching (§2.3, Eq. 4): mean L1 between real and fake features of every layer, the logits
    included as in the official code, summed over layers and discriminators (weighted by lambda_fm)."""
    loss = 0.0
    for r_disc, f_disc in zip(real_outs, fake_outs):
        for r, f in zip(r_disc, f_disc):
            loss = loss + torch.mean(torch.abs(r.detach().float() - f.float()))
    return loss


def mel_loss(fake, wav, cfg):
    """Mel-spectrogram L1 (§2.3, Eq. 3) on full-band mels (fmax_loss), as the official fmax_for_loss: the
    input mel stops at 8 kHz, the loss still checks everything above it."""
    return F.l1_loss(log_mel(fake.float(), cfg, fmax=cfg.fmax_loss), log_mel(wav, cfg, fmax=cfg.fmax_loss))


def gan_step(G, D, opt_g, opt_d, wav, mel, cfg, amp):
    """One training step: D on [real; fake.detach()], then G (official order). Returns the logged losses."""
    B = wav.shape[0]
    with amp():
        fake = G(mel)                                              # (B, 1, T)
        outs = D(torch.cat([wav, fake.detach()]))                  # [disc][layer] -> (2B, C, ...)
    loss_d = discriminator_loss([[t[:B] for t in s] for s in outs], [[t[B:] for t in s] for s in outs])
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    with amp():
        with torch.no_grad():  # the real features come from the updated D, as the official code does
            real_outs = D(wav)
        fake_outs = D(fake)
    loss_adv, loss_fm = generator_loss(fake_outs), feature_loss(real_outs, fake_outs)
    loss_mel = mel_loss(fake, wav, cfg)
    loss_g = loss_adv + cfg.lambda_fm * loss_fm + cfg.lambda_mel * loss_mel   # Eq. 5
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    return dict(g=loss_adv, fm=loss_fm, d=loss_d, mel=loss_mel)

# ----------------------------------------------------------------------------- data

def log_mel(wav, cfg, fmax=None):
    """(B, 1, T) or (T,) -> ln mel (B, n_mels, T / hop): the official meldataset.py features (Tacotron 2's)."""
    x = wav.squeeze(1) if wav.dim() == 3 else wav
    fmax = cfg.fmax if fmax is None else fmax
    return common.mel_spectrogram(x, cfg.sample_rate, cfg.n_fft, cfg.hop, n_mels=cfg.n_mels, fmin=cfg.fmin,
                                  fmax=fmax or None, log="ln")


def load_split(cfg, split):
    """(id, waveform) pairs of one split, each peak-normalized to 0.95 (official preprocessing)."""
    utts = common.load_corpus(cfg, split, cfg.sample_rate, kind="speech")
    out = []
    for u in utts:
        wav = u.wav                                                # (T,) float32
        out.append((u.id, 0.95 * wav / max(float(abs(wav).max()), 1e-5)))
    return out


def get_batch(sampler, cfg, rt):
    """Random training clips (B, 1, segment) and their mels (B, n_mels, segment / hop), computed on the device."""
    x, _ = sampler.next()                                          # (B, T)
    x = x.unsqueeze(1)                                             # (B, 1, T)
    x = x.to(rt.device, non_blocking=True)
    return x, log_mel(x, cfg)

# ----------------------------------------------------------------------------- train

def build(cfg, rt):
    G, D = Generator(cfg).to(rt.device), Discriminator(cfg).to(rt.device)
    opt_g = torch.optim.AdamW(G.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    opt_d = torch.optim.AdamW(D.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return G, D, opt_g, opt_d


def load_generator(cfg, rt):
    """A Generator from --init_from: one of our checkpoints or the official generator file."""
    if cfg.init_from == "scratch":
        raise SystemExit(f"error: --mode={cfg.mode} needs --init_from=resume or a checkpoint path")
    G = Generator(cfg).to(rt.device)
    ckpt = common.load_checkpoint(common.resume_path(cfg))
    if common.is_ours(ckpt):
        common.restore(ckpt, cfg, {"G": G}, arch_keys=ARCH_KEYS, rng=False)
    else:
        load_official(G, ckpt)
    return G


@torch.no_grad()
def evaluate(cfg, G=None, rt=None, samples_dir=None):
    """Vocode held-out utterances (unseen sentences, and a voice never heard in training) from their
    ground-truth mels; full-band ln-mel L1 (the paper's validation metric, common.mel_distance) and
    multi-resolution STFT distance."""
    if G is None:
        rt = common.setup(cfg)
        G = remove_weight_norm(load_generator(cfg, rt))
    was_training = G.training
    G.eval()
    mel_l1, stft = [], []
    for i, (name, wav) in enumerate(load_split(cfg, "test")[:cfg.eval_items]):
        wav = torch.from_numpy(wav[: len(wav) // cfg.hop * cfg.hop]).to(rt.device)  # (T,)
        with rt.autocast():
            fake = G(log_mel(wav, cfg).unsqueeze(0))[0, 0].float()  # (T,)
        mel_l1.append(common.mel_distance(fake, wav, cfg.sample_rate))
        stft.append(common.mrstft_distance(fake, wav))
        if samples_dir is not None and i < 2:
            common.save_sample(samples_dir, name, fake.cpu(), cfg.sample_rate, ref=wav.cpu())
    G.train(was_training)
    metrics = dict(mel_l1=sum(mel_l1) / len(mel_l1), mrstft=sum(stft) / len(stft))
    common.log("eval | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics


def train(cfg):
    rt = common.setup(cfg)
    G, D, opt_g, opt_d = build(cfg, rt)
    sched_g = torch.optim.lr_scheduler.ExponentialLR(opt_g, gamma=cfg.lr_decay)
    sched_d = torch.optim.lr_scheduler.ExponentialLR(opt_d, gamma=cfg.lr_decay)
    common.log(f"generator {common.count_params(G) / 1e6:.2f} M params, "
               f"discriminator {common.count_params(D) / 1e6:.2f} M params")
    train_wavs = [w for _, w in load_split(cfg, "train")]
    sampler = common.SegmentSampler(train_wavs, cfg.segment, cfg.batch_size, cfg.seed, rt.rank, rt.world_size)
    steps_per_epoch = max(1, len(train_wavs) // (cfg.batch_size * rt.world_size))  # one segment per clip
    step = 0
    if cfg.init_from != "scratch":
        ckpt = common.load_checkpoint(common.resume_path(cfg))
        if common.is_ours(ckpt):   # resume: weights, optimizers, step, RNG and data order
            step = common.restore(ckpt, cfg, {"G": G, "D": D}, {"G": opt_g, "D": opt_d},
                                  {"G": sched_g, "D": sched_d}, sampler=sampler, arch_keys=ARCH_KEYS)
        else:                      # fine-tune from the official generator; D starts fresh
            load_official(G, ckpt)
        common.log(f"initialized from {common.resume_path(cfg)} at step {step}")
    g = common.wrap_ddp(common.compile(G, cfg), rt)
    d = common.wrap_ddp(common.compile(D, cfg), rt)
    prog = common.Progress(cfg, start_step=step)
    seconds_per_step = cfg.batch_size * cfg.segment * rt.world_size / cfg.sample_rate
    while step < cfg.max_iters:
        wav, mel = get_batch(sampler, cfg, rt)
        losses = gan_step(g, d, opt_g, opt_d, wav, mel, cfg, rt.autocast)
        step += 1
        if step % steps_per_epoch == 0:                            # lr decay 0.999 per epoch (§3)
            sched_g.step()
            sched_d.step()
        prog.update(step, losses, seconds_per_step)
        if rt.master and (step % cfg.eval_interval == 0 or step == cfg.max_iters):
            evaluate(cfg, G, rt, samples_dir=os.path.join(cfg.out_dir, "samples", f"step{step:06d}"))
            common.save_checkpoint(cfg, step, {"G": G, "D": D}, {"G": opt_g, "D": opt_d},
                                   {"G": sched_g, "D": sched_d}, sampler=sampler)
    common.cleanup(rt)

# ----------------------------------------------------------------------------- sample

@torch.no_grad()
def sample(cfg):
    """Mel -> waveform for a given wav (--input) or for held-out utterances, beside the reference."""
    rt = common.setup(cfg)
    G = remove_weight_norm(load_generator(cfg, rt)).eval()
    if cfg.input:
        wav, _ = common.load_audio(cfg.input, sr=cfg.sample_rate)
        items = [(os.path.splitext(os.path.basename(cfg.input))[0], wav)]
    else:
        items = load_split(cfg, "test")[:4]
    out = os.path.join(cfg.out_dir, "samples")
    for name, wav in items:
        wav = torch.from_numpy(wav[: len(wav) // cfg.hop * cfg.hop]).to(rt.device)  # (T,)
        with rt.autocast():
            fake = G(log_mel(wav, cfg).unsqueeze(0))[0, 0].float()  # (T,)
        common.save_sample(out, name, fake.cpu(), cfg.sample_rate, ref=wav.cpu())
        common.log(f"wrote {os.path.join(out, name)}.wav/.png ({len(fake) / cfg.sample_rate:.2f} s)")

# ----------------------------------------------------------------------------- bench

def bench(cfg):
    """Training step (D + G update) at cfg.batch_size x cfg.segment, and batch-1 inference of 10 s of audio
    with weight norm folded, eager and compiled. On CUDA also the official recipe (fp32, eager) side by side."""
    rt = common.setup(cfg)
    G, D, opt_g, opt_d = build(cfg, rt)
    wav = 0.5 * torch.rand(cfg.batch_size, 1, cfg.segment, device=rt.device) - 0.25   # (B, 1, T)
    mel = log_mel(wav, cfg)
    figures = dict(params_d=common.count_params(D))                 # "params" (the generator) added below
    flops = common.count_flops(lambda: gan_step(G, D, opt_g, opt_d, wav, mel, cfg, contextlib.nullcontext))
    g, d = common.compile(G, cfg), common.compile(D, cfg)
    ms = common.timeit(lambda: gan_step(g, d, opt_g, opt_d, wav, mel, cfg, rt.autocast), iters=cfg.bench_iters)
    figures.update(train_step_ms=ms, train_audio_s_per_s=cfg.batch_size * cfg.segment / cfg.sample_rate / (ms / 1e3),
                   train_flops_per_step=flops)
    if rt.device_type == "cuda":  # the official recipe: fp32, eager
        ms32 = common.timeit(lambda: gan_step(G, D, opt_g, opt_d, wav, mel, cfg, contextlib.nullcontext),
                             iters=cfg.bench_iters)
        figures.update(baseline_fp32_eager_train_step_ms=ms32)
    # inference: real-time factor = compute seconds per second of audio (lower is faster)
    seconds = cfg.bench_seconds
    G_inf = remove_weight_norm(copy.deepcopy(G)).eval()
    frames = int(seconds * cfg.sample_rate) // cfg.hop
    mel1 = torch.randn(1, cfg.n_mels, frames, device=rt.device) - 5   # (1, n_mels, frames)

    def infer(model, amp):
        with torch.no_grad(), amp():
            return model(mel1)
    figures["infer_rtf_eager"] = common.timeit(lambda: infer(G_inf, rt.autocast), iters=cfg.bench_iters) / 1e3 / seconds
    g_inf = common.compile(G_inf, cfg)
    figures["infer_rtf_compiled"] = (common.timeit(lambda: infer(g_inf, rt.autocast), iters=cfg.bench_iters) / 1e3
                                     / seconds if g_inf is not G_inf else None)
    if rt.device_type == "cuda":
        figures["baseline_fp32_eager_infer_rtf"] = common.timeit(
            lambda: infer(G_inf, contextlib.nullcontext), iters=cfg.bench_iters) / 1e3 / seconds
    common.report_bench(cfg, rt, model=G, **figures)

# ----------------------------------------------------------------------------- main

if __name__ == "__main__":
    cfg = common.parse_config(Config, PRESETS)
    {"train": train, "sample": sample, "eval": evaluate, "bench": bench}[cfg.mode](cfg)
