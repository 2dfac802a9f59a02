"""
HiFi-GAN: Generative Adversarial Networks for Efficient and High Fidelity Speech Synthesis
(Kong, Kim, Bae, NeurIPS 2020) — https://arxiv.org/abs/2010.05646

The idea: MelGAN's recipe, with two changes that fix its metallic, periodic artifacts. Speech is a sum of
sinusoids of many periods, so the generator follows each transposed-conv upsampler with multi-receptive-field
fusion (MRF, §2.2): residual blocks with different kernels and dilations run in parallel and are averaged,
so every rate sees patterns of many lengths at once. A multi-period discriminator (MPD, §2.3) folds the
waveform into 2-D grids of period 2, 3, 5, 7 and 11, so each member judges the samples one period apart,
the periodic structure of voiced speech that MelGAN's multi-scale discriminator (kept beside it) misses.
Training swaps the hinge loss for least squares (Eqs. 1-2), keeps feature matching (Eq. 4, x2) and adds an
L1 loss on log-mel spectrograms (Eq. 3, x45) that makes the first steps fast and stable.

Changed versus the paper / official code (jik876/hifi-gan). 500 lines, over the 450 aim: two discriminators
(MPD, MSD), both MRF block types (V1-V3) and the official weights' key map and size detection.
- the built-in eSpeak corpus (or --data_dir), not LJSpeech; no fine-tuning on Tacotron 2 mels (§4.4);
  training counted in steps; evaluation is mel L1, not MOS.
- real and fake go through D as one [real; fake] batch, and G's step runs D frozen: same losses and updates;
  spectral norm's power iteration thus runs 3 times per step (officially 4); bf16 and torch.compile on CUDA.
- the lr decay's "epoch" is one pass of segments over the training clips, counted in steps (--epoch_steps).
- the `small` preset (ours): V2's generator, discriminators capped at 32 channels (0.19 M, the paper's
  70.7 M), 4096-sample segments at lr 5e-4 (the paper: 8192, 2e-4), sized for a 1000-step CPU run.

    python hifigan.py                                   # train on the built-in corpus
    python hifigan.py --preset=v1 --batch_size=16       # paper size (V1: 13.94 M generator)
    python hifigan.py --init_from=resume                # continue out/hifigan/ckpt.pt
    python hifigan.py --mode=sample --init_from=out/hifigan/ckpt.pt   # or the official generator_v1/v2/v3
    python hifigan.py --mode=eval --init_from=out/hifigan/ckpt.pt
    python hifigan.py --mode=bench
    torchrun --standalone --nproc_per_node=8 hifigan.py
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import common

# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    mode: str = "train"                 # train | sample | eval | bench
    preset: str = "v1"                  # a key of PRESETS
    init_from: str = "scratch"          # scratch | resume | a checkpoint (ours or the official generator)
    out_dir: str = "out/hifigan"
    data_dir: str = ""                  # empty: the built-in speech corpus
    corpus_hours: float = 2.0           # size of the built-in corpus
    input: str = ""                     # --mode=sample: a wav to re-synthesize (empty: held-out utterances)
    seed: int = 1337
    # features (official meldataset.py: Tacotron 2's mels)
    sample_rate: int = 22050            # LJSpeech's rate
    n_fft: int = 1024                   # STFT size
    hop: int = 256                      # samples per mel frame = product of upsample_rates
    n_mels: int = 80                    # mel bins
    fmin: float = 0.0                   # lowest mel frequency (Hz)
    fmax: float = 8000.0                # highest mel frequency (Hz) of the generator's input mel
    fmax_loss: float = 0.0              # top of the loss mel; 0 = Nyquist (official fmax_for_loss)
    # generator (§2.2, Appendix A)
    channels: int = 512                 # h_u: width after the input conv
    upsample_rates: tuple = (8, 8, 2, 2)  # transposed-conv strides, product = hop (official upsample_rates)
    upsample_kernels: tuple = (16, 16, 4, 4)  # k_u: transposed-conv kernel sizes
    resblock: str = "1"                 # MRF block type: "1" (V1, V2) or the lighter "2" (V3)
    resblock_kernels: tuple = (3, 7, 11)  # k_r: one residual block per kernel, in parallel (MRF)
    resblock_dilations: tuple = ((1, 3, 5), (1, 3, 5), (1, 3, 5))  # D_r: dilations of each block
    # discriminator (§2.3)
    periods: tuple = (2, 3, 5, 7, 11)   # MPD periods, primes so the folds overlap little
    num_d: int = 3                      # MSD discriminators on raw, 2x and 4x downsampled audio
    d_max_channels: int = 1024          # channel cap of the discriminators (1024 = the paper's)
    # loss and optimization (§2.4, §3, official train.py)
    lambda_fm: float = 2.0              # feature-matching weight (Eq. 5)
    lambda_mel: float = 45.0            # mel-spectrogram L1 weight (Eq. 5)
    lr: float = 2e-4                    # AdamW, G and D alike (§3)
    betas: tuple = (0.8, 0.99)          # AdamW betas (§3)
    weight_decay: float = 0.01          # AdamW weight decay (§3)
    lr_decay: float = 0.999             # lr factor per epoch (§3; official ExponentialLR gamma)
    epoch_steps: int = 0                # steps per lr-decay epoch; 0: one segment per training clip
    batch_size: int = 16
    segment: int = 8192                 # training clip length in samples
    max_iters: int = 100_000            # optimizer steps (the paper trains 2.5 M)
    log_interval: int = 50
    eval_interval: int = 2000           # evaluate on val, write samples and checkpoint every N steps
    eval_items: int = 16                # held-out utterances evaluate() vocodes
    listen_items: int = 16              # --mode=eval: whole test clips vocoded into out_dir/listen for an ASR
    device: str = "auto"
    dtype: str = "auto"                 # bf16 autocast on CUDA, fp32 elsewhere
    compile: bool = True                # torch.compile (CUDA only unless asked)
    bench_iters: int = 10               # timed iterations per bench figure
    bench_seconds: float = 10.0         # audio length of the batch-1 inference benchmark

    def validate(self):
        """Values that would otherwise fail deep inside a conv with a traceback: one line each."""
        common.check_vocoder_config(self, fmax_keys=("fmax", "fmax_loss"))
        if len(self.upsample_kernels) != len(self.upsample_rates) or \
                any(k < r or (k - r) % 2 for r, k in zip(self.upsample_rates, self.upsample_kernels)):
            raise SystemExit(f"error: --upsample_kernels={self.upsample_kernels} needs one kernel per rate, "
                             "each >= its rate and of the same parity (padding (k - r) / 2)")
        n_up = len(self.upsample_rates)
        if self.resblock not in ("1", "2") or len(self.resblock_kernels) != len(self.resblock_dilations) or \
                any(k % 2 == 0 for k in self.resblock_kernels) or self.channels % 2 ** n_up:
            raise SystemExit("error: --resblock must be 1 or 2, --resblock_kernels odd and one per "
                             f"--resblock_dilations entry, --channels halving {n_up} times")
        if (self.d_max_channels < 16 or self.d_max_channels % 16 or self.num_d < 1
                or min(self.periods, default=0) < 1):
            raise SystemExit(f"error: --d_max_channels={self.d_max_channels} must be a multiple of 16 "
                             "(the MSD's groups), --num_d >= 1, --periods >= 1")
        if not 0 < self.lr_decay <= 1 or self.epoch_steps < 0 or self.weight_decay < 0 or \
                min(self.lambda_fm, self.lambda_mel) < 0:
            raise SystemExit("error: need 0 < --lr_decay <= 1, --epoch_steps >= 0, --weight_decay >= 0 and "
                             "the loss weights >= 0")

PRESETS = {  # the official config_v1/v2/v3.json (Appendix A)
    "v1":    dict(),                                        # 13.94 M: best quality
    "v2":    dict(channels=128),                            # 0.93 M: V1's shape, narrow
    "v3":    dict(channels=256, upsample_rates=(8, 8, 4), upsample_kernels=(16, 16, 8), resblock="2",
                  resblock_kernels=(3, 5, 7),
                  resblock_dilations=((1, 2), (2, 6), (3, 12))),    # 1.46 M: fastest
    "small": dict(channels=128, d_max_channels=32, batch_size=4, segment=4096, lr=5e-4, max_iters=1000,
                  eval_interval=250, corpus_hours=0.5, eval_items=8, log_interval=25,
                  compile=False),  # V2's G with a CPU-sized critic (ours)
    "tiny":  dict(channels=32, upsample_rates=(16, 16), upsample_kernels=(32, 32), d_max_channels=16,
                  batch_size=2, segment=2048, max_iters=10,
                  eval_interval=1000, corpus_hours=0.02, eval_items=2, log_interval=1, bench_iters=2,
                  bench_seconds=2.0),  # tests
}
# what fixes the weights' shapes and what the mels mean: a checkpoint under other values is refused
ARCH_KEYS = ("sample_rate", "n_fft", "hop", "n_mels", "fmin", "fmax", "fmax_loss",
             "channels", "upsample_rates", "upsample_kernels", "resblock", "resblock_kernels",
             "resblock_dilations",
             "periods", "num_d", "d_max_channels")

# ----------------------------------------------------------------------------- model

class ResBlock(nn.Module):
    """One MRF member (§2.2, Fig. 1): residual units with kernel k, one per dilation, identity shortcuts.
    Type 1 (V1, V2): LReLU, dilated conv, LReLU, conv. Type 2 (V3): LReLU, dilated conv.
    Zero "same" padding."""
    def __init__(self, channels, kernel, dilations, kind):
        super().__init__()
        conv = lambda d: weight_norm(nn.Conv1d(channels, channels, kernel, dilation=d,
                                               padding=d * (kernel - 1) // 2))
        if kind == "1":
            self.convs1 = nn.ModuleList(conv(d) for d in dilations)
            self.convs2 = nn.ModuleList(conv(1) for _ in dilations)
        else:
            self.convs = nn.ModuleList(conv(d) for d in dilations)   # the official names, so its files load

    def forward(self, x):                                          # (B, C, T) -> (B, C, T)
        # in place where the tensor is a conv's fresh output that nothing else reads (a conv's backward needs
        # its input, not its output): fewer full-size buffers, the same numbers (y.add_(x) == x + y exactly)
        if hasattr(self, "convs1"):
            for c1, c2 in zip(self.convs1, self.convs2):
                x = c2(F.leaky_relu(c1(F.leaky_relu(x, 0.1)), 0.1, inplace=True)).add_(x)
        else:
            for c in self.convs:
                x = c(F.leaky_relu(x, 0.1)).add_(x)
        return x


class Generator(nn.Module):
    """mel (B, n_mels, frames) -> waveform (B, 1, frames * hop) in [-1, 1] (§2.2, Fig. 1).
    Weight norm on every conv, as MelGAN; no noise input."""
    def __init__(self, cfg):
        super().__init__()
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
            # in place: x is a fresh conv output or the MRF's sum, read by nothing else
            x = up(F.leaky_relu(x, 0.1, inplace=True))  # (B, C / 2^(i+1), frames * prod(rates[:i+1]))
            # MRF: the blocks run in parallel on the same input and are averaged, so this rate sees
            # receptive fields of several lengths at once (§2.2); summed into the first block's output
            acc = self.resblocks[i * self.n_res](x)
            for j in range(1, self.n_res):
                acc = acc.add_(self.resblocks[i * self.n_res + j](x))
            x = acc.div_(self.n_res)
        x = self.conv_post(F.leaky_relu(x, inplace=True))          # slope 0.01 here, as the official code
        return torch.tanh(x)                                       # (B, 1, frames * hop)


class PeriodDiscriminator(nn.Module):
    """One MPD member (§2.3, Fig. 2): fold the waveform into (T/p, p) and convolve along time only,
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
            x = F.leaky_relu(conv(x), 0.1, inplace=True)   # in place: a fresh conv output
            fmaps.append(x)                                        # hidden features, for feature matching
        fmaps.append(self.conv_post(x))                            # (B, 1, T', p) logits, last
        return fmaps


class ScaleDiscriminator(nn.Module):
    """One MSD member (§2.3, MelGAN's discriminator, wider): strided grouped convs down to a map of
    window logits. The raw-scale member uses spectral norm instead of weight norm (§2.3)."""
    def __init__(self, cfg, norm=weight_norm):
        super().__init__()
        cap = lambda c: min(c, cfg.d_max_channels)
        # (in, out, kernel, stride, groups) of each conv, as the official DiscriminatorS
        layers = [(1, 128, 15, 1, 1), (128, 128, 41, 2, 4), (128, 256, 41, 2, 16), (256, 512, 41, 4, 16),
                  (512, 1024, 41, 4, 16), (1024, 1024, 41, 1, 16), (1024, 1024, 5, 1, 1)]
        self.convs = nn.ModuleList(norm(nn.Conv1d(cap(i), cap(o), k, s, groups=g, padding=(k - 1) // 2))
                                   for i, o, k, s, g in layers)
        self.conv_post = norm(nn.Conv1d(cap(1024), 1, 3, padding=1))

    def forward(self, x):                                          # (B, 1, T)
        fmaps = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1, inplace=True)   # in place: a fresh conv output
            fmaps.append(x)                                        # hidden features, for feature matching
        fmaps.append(self.conv_post(x))                            # (B, 1, T / 64) window logits, last
        return fmaps


class Discriminator(nn.Module):
    """MPD (5 periods) + MSD (3 scales, raw then average-pooled 2x and 4x) (§2.3): the MPD sees periodic
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

# ----------------------------------------------------------------------------- loss

def discriminator_loss(real_outs, fake_outs):
    """Least-squares GAN (§2.4, Eq. 1): real logits to 1, fake to 0; non-vanishing gradients (LSGAN)."""
    loss = 0.0
    for r, f in zip(real_outs, fake_outs):
        loss = loss + torch.mean((1 - r[-1].float()) ** 2) + torch.mean(f[-1].float() ** 2)
    return loss


def generator_loss(fake_outs):
    """Adversarial term of the generator: fake logits to 1 (§2.4, Eq. 2)."""
    return sum(torch.mean((1 - f[-1].float()) ** 2) for f in fake_outs)


def feature_loss(real_outs, fake_outs):
    """Feature matching (§2.4, Eq. 4): mean L1 between real and fake features of every layer, the logits
    included as in the official code, summed over layers and discriminators (weighted by lambda_fm)."""
    loss = 0.0
    for r_disc, f_disc in zip(real_outs, fake_outs):
        for r, f in zip(r_disc, f_disc):
            loss = loss + torch.mean(torch.abs(r.detach().float() - f.float()))
    return loss


def mel_loss(fake, wav, cfg):
    """Mel-spectrogram L1 (§2.4, Eq. 3) on full-band mels (fmax_loss), as the official fmax_for_loss: the
    input mel stops at 8 kHz, the loss still checks everything above it."""
    return F.l1_loss(log_mel(fake.float(), cfg, fmax=cfg.fmax_loss), log_mel(wav, cfg, fmax=cfg.fmax_loss))

# ----------------------------------------------------------------------------- data

def log_mel(wav, cfg, fmax=None):
    """(B, 1, T) or (T,) -> ln mel (B, n_mels, T / hop): official meldataset.py (Tacotron 2's) features."""
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
    """Random training clips (B, 1, segment),
    and their mels (B, n_mels, segment / hop), computed on the device."""
    x, _ = sampler.next()                                          # (B, T)
    x = x.unsqueeze(1)                                             # (B, 1, T)
    x = x.to(rt.device, non_blocking=True)
    return x, log_mel(x, cfg)


def vocode(G, wav, name, cfg, rt):
    """A whole clip (T,) numpy -> (generated, reference) (T',) tensors, T' = T cut to whole mel frames."""
    if len(wav) < 4 * cfg.hop:
        raise SystemExit(f"error: {name} is {len(wav)} samples long, "
                         f"shorter than 4 mel frames ({4 * cfg.hop})")
    wav = torch.from_numpy(wav[: len(wav) // cfg.hop * cfg.hop]).to(rt.device)  # (T',)
    with rt.autocast():
        fake = G(log_mel(wav, cfg).unsqueeze(0))[0, 0].float()    # (T',)
    return fake, wav

# ----------------------------------------------------------------------------- train

def build(cfg, rt):
    """Everything training holds, in one dict; the checkpoint saves exactly this."""
    G, D = Generator(cfg).to(rt.device), Discriminator(cfg).to(rt.device)
    opt_g = torch.optim.AdamW(G.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    opt_d = torch.optim.AdamW(D.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    # the lr falls by lr_decay once per epoch (§3): the schedulers step every step (last_epoch = step) and
    # their factor counts whole epochs, so a resumed or benchmarked step sees the lr of a straight run
    epoch = max(1, cfg.epoch_steps)
    decay = lambda step: cfg.lr_decay ** (step // epoch)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, decay)
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, decay)
    return dict(G=G, D=D, opt_g=opt_g, opt_d=opt_d, sched_g=sched_g, sched_d=sched_d)


def train_step(state, batch, cfg, rt):
    """One step of the objective (loss section): D on [real; fake.detach()], then G, the official order; no
    gradient clipping (none in the official code). train() and bench() both call it.
    Returns the logged losses."""
    G, D, opt_g, opt_d = state["G"], state["D"], state["opt_g"], state["opt_d"]
    wav, mel = batch                                               # (B, 1, T), (B, n_mels, T / hop)
    B = wav.shape[0]
    with rt.autocast():
        fake = G(mel)                                              # (B, 1, T)
        outs = D(torch.cat([wav, fake.detach()]))                  # [disc][layer] -> (2B, C, ...)
    real_outs = [[t[:B] for t in s] for s in outs]
    loss_d = discriminator_loss(real_outs, [[t[B:] for t in s] for s in outs])
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    # G's step needs D's gradient with respect to its input only: D's weight gradients (which the official
    # code computes here and zeroes before the next D step) are skipped, as is DDP's sync of them
    d_plain = common.unwrap(D)
    d_plain.requires_grad_(False)
    with rt.autocast():
        with torch.no_grad():  # the real features come from the updated D, as the official code does
            real_outs = d_plain(wav)
        fake_outs = d_plain(fake)
    loss_adv, loss_fm = generator_loss(fake_outs), feature_loss(real_outs, fake_outs)
    loss_mel = mel_loss(fake, wav, cfg)
    loss_g = loss_adv + cfg.lambda_fm * loss_fm + cfg.lambda_mel * loss_mel   # Eq. 5
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    d_plain.requires_grad_(True)
    opt_g.step()
    state["sched_g"].step()                                        # the lr of the next step (§3)
    state["sched_d"].step()
    return dict(g=loss_adv, fm=loss_fm, d=loss_d, mel=loss_mel)


def load_for_inference(cfg, rt):
    """The generator --init_from names: one of our checkpoints or the authors' file (official weights)."""
    return common.load_generator(cfg, rt, Generator, ARCH_KEYS, official_config, load_official)


@torch.no_grad()
def evaluate(cfg, model=None, rt=None, samples_dir=None, split="test"):
    """Vocode held-out utterances from their ground-truth mels (val during training; test, unseen sentences
    and a voice never heard in training, for the reported figures) and log the metrics, in the training log's
    units. --mode=eval (model=None) loads --init_from and reports test."""
    if model is None:
        rt = common.setup(cfg)
        model = common.remove_weight_norm(load_for_inference(cfg, rt)).eval()
        if cfg.listen_items:  # whole test clips vocoded, beside their originals, for the corpus ASR to judge
            common.write_vocoder_listening_sets(cfg, lambda name, wav: vocode(model, wav, name, cfg, rt))
    # mel: the full-band ln-mel L1 of the loss (Eq. 3, the paper's validation metric; the training log's mel);
    # mrstft: multi-resolution STFT distance
    metrics = dict(mel=lambda fake, wav: mel_loss(fake, wav, cfg).item(), mrstft=common.mrstft_distance)
    return common.eval_vocoder(cfg, model, load_split(cfg, split)[:cfg.eval_items],
                               lambda name, wav: vocode(model, wav, name, cfg, rt), metrics,
                               samples_dir, split)


def train(cfg):
    rt = common.setup(cfg)
    train_wavs = [w for _, w in load_split(cfg, "train")]
    common.check_clips(train_wavs, cfg.segment, "train split")
    common.check_clips([w for _, w in load_split(cfg, "val")], cfg.segment, "val split")
    if not cfg.epoch_steps:  # the official loader draws one segment per clip per epoch; kept in the ckpt
        cfg.epoch_steps = max(1, len(train_wavs) // (cfg.batch_size * rt.world_size))
        common.log(f"an epoch (lr decay x{cfg.lr_decay}) is {cfg.epoch_steps} steps: "
                   f"{len(train_wavs)} training clips")
    state = build(cfg, rt)
    common.log(f"generator {common.count_params(state['G']) / 1e6:.2f} M params, "
               f"discriminator {common.count_params(state['D']) / 1e6:.2f} M params")
    sampler = common.SegmentSampler(train_wavs, cfg.segment, cfg.batch_size, cfg.seed, rt.rank, rt.world_size)
    # scratch: step 0 | resume: out_dir/ckpt.pt continues exactly | PATH: our weights or the official
    # generator, fresh optimizers, step 0 (D starts fresh: only the authors' generators are mapped)
    step = common.init_from(cfg, state, sampler=sampler, arch_keys=ARCH_KEYS,
                            official=lambda st, ckpt: load_official(st["G"], ckpt, cfg))
    G = state["G"]
    state["G"] = common.wrap_ddp(common.compile(G, cfg), rt)
    state["D"] = common.wrap_ddp(common.compile(state["D"], cfg), rt)
    common.train_loop(cfg, rt, state, step, train_step, lambda step: get_batch(sampler, cfg, rt),
                      lambda samples: evaluate(cfg, G, rt, samples, split="val"), sampler=sampler)

# ----------------------------------------------------------------------------- sample

@torch.no_grad()
def sample(cfg):
    """Mel -> waveform for a given wav (--input) or for held-out test utterances, beside the reference."""
    rt = common.setup(cfg)
    G = common.remove_weight_norm(load_for_inference(cfg, rt)).eval()
    common.sample_vocoder(cfg, lambda name, wav: vocode(G, wav, name, cfg, rt),
                          lambda: load_split(cfg, "test"))

# ----------------------------------------------------------------------------- bench

def bench(cfg):
    """train_step (D + G update) at cfg.batch_size x cfg.segment, and batch-1 inference of bench_seconds of
    audio with weight norm folded, eager and compiled. On CUDA also the official recipe (fp32, eager)."""
    rt = common.setup(cfg)
    state = build(cfg, rt)
    wav = 0.5 * torch.rand(cfg.batch_size, 1, cfg.segment, device=rt.device) - 0.25   # (B, 1, T)
    common.bench_gan_vocoder(cfg, rt, state, train_step, (wav, log_mel(wav, cfg)))

# ----------------------------------------------------------------------------- official weights

def official_config(sd):
    """The Generator size of an official file (generator_v1/v2/v3, g_02500000: {'generator': state_dict}),
    read from its tensors: h_u from conv_pre, k_u from each upsampler (strides are k_u / 2 in every official
    config), the block type and k_r from the resblocks. Dilations are not in the tensors: the official
    configs' are used."""
    if (not isinstance(sd, dict) or not isinstance(sd.get("generator"), dict)
            or "conv_pre.weight_v" not in sd["generator"]):
        return None
    g = sd["generator"]
    n_up = len({k.split(".")[1] for k in g if k.startswith("ups.")})
    n_res = len({k.split(".")[1] for k in g if k.startswith("resblocks.")}) // max(1, n_up)
    kind = "1" if "resblocks.0.convs1.0.weight_v" in g else "2"
    convs = "convs1" if kind == "1" else "convs"
    kernels = tuple(g[f"ups.{i}.weight_v"].shape[-1] for i in range(n_up))
    n_dil = [len({k.split(".")[3] for k in g if k.startswith(f"resblocks.{j}.{convs}.")})
             for j in range(n_res)]
    # config_v1/v2, config_v3
    dilations = ((1, 3, 5),) * n_res if kind == "1" else ((1, 2), (2, 6), (3, 12))[:n_res]
    if [len(d) for d in dilations] != n_dil:
        raise SystemExit(f"error: the official generator file has {n_dil} dilations per resblock, unlike the "
                         "official configs; pass them as --resblock_dilations and load it with our Generator "
                         "by hand")
    return dict(n_mels=g["conv_pre.weight_v"].shape[1], channels=g["conv_pre.weight_v"].shape[0],
                upsample_rates=tuple(k // 2 for k in kernels), upsample_kernels=kernels,
                hop=math.prod(k // 2 for k in kernels), resblock=kind,
                resblock_kernels=tuple(g[f"resblocks.{j}.{convs}.0.weight_v"].shape[-1]
                                       for j in range(n_res)),
                resblock_dilations=dilations)


def load_official(G, sd, cfg):
    """Load an official generator file into G; its size (official_config) must be the config's.
    Our modules carry the official names (conv_pre, ups.i, resblocks.{stage * 3 + kernel}.convs1/convs2.j or
    .convs.j, conv_post); only the old-style weight-norm keys weight_g/weight_v need renaming."""
    G, need = common.unwrap(G), official_config(sd)
    if need is None:
        raise SystemExit("error: neither one of our checkpoints nor an official HiFi-GAN generator file "
                         "(generator_v1 / g_02500000: {'generator': state_dict}; "
                         "do_* files hold only the discriminators)")
    common.check_official_config(need, cfg, "official generator")
    suffix = {"weight_g": "parametrizations.weight.original0",
              "weight_v": "parametrizations.weight.original1", "bias": "bias"}
    ours = {}
    for k, v in sd["generator"].items():
        prefix, _, leaf = k.rpartition(".")
        if leaf not in suffix:
            raise SystemExit(f"error: unexpected key {k!r} in the official HiFi-GAN generator file")
        ours[f"{prefix}.{suffix[leaf]}"] = v
    common.load_state_dict(G, ours, what="HiFi-GAN generator (official weights)")

# ----------------------------------------------------------------------------- main

if __name__ == "__main__":
    cfg = common.parse_config(Config, PRESETS)
    {"train": train, "sample": sample, "eval": evaluate, "bench": bench}[cfg.mode](cfg)
