"""
MelGAN: Generative Adversarial Networks for Conditional Waveform Synthesis
(Kumar et al., NeurIPS 2019) — https://arxiv.org/abs/1910.06711

The idea: invert a mel spectrogram to a waveform with one feed-forward pass, fast enough for real time
without autoregression. A fully convolutional generator upsamples 80-bin mel frames 256x with transposed
convolutions (8x8x2x2), each followed by a residual stack of dilated convolutions (dilations 1, 3, 9) that
widens the receptive field so distant samples stay coherent (§2.1). There is no noise input (the mel already
fixes the content) and no reconstruction loss: three discriminators look at the raw, 2x and 4x
average-pooled waveform and score overlapping windows, so each judges structure at its own scale (§2.2).
A hinge GAN loss plus an L1 feature-matching loss on the discriminators' hidden layers (x10, §2.3) is the
whole objective; feature matching gives the generator a dense signal beyond the single real/fake score.

Simplified or changed versus the paper / official code (descriptinc/melgan-neurips):
- the built-in eSpeak corpus (or --data_dir), not LJSpeech; training counted in steps, not the official
  3000 epochs; evaluation is mel L1 and multi-resolution STFT distance, not MOS.
- real and fake go through D as one [real; fake] batch, and G's step runs D frozen: same losses and
  updates; bf16 autocast and torch.compile on CUDA (the official code is fp32, eager).
- the mel magnitude adds 1e-9 under the square root (HiFi-GAN's convention), far below the 1e-5 clamp.
- the `small` preset (ours) narrows both networks (128 generator channels, discriminator capped at 256).

    python melgan.py                                    # train on the built-in corpus
    python melgan.py --preset=paper --batch_size=16     # paper size (4.27 M generator)
    python melgan.py --init_from=resume                 # continue out/melgan/ckpt.pt
    python melgan.py --mode=sample --init_from=out/melgan/ckpt.pt   # or the official linda_johnson.pt
    python melgan.py --mode=eval --init_from=out/melgan/ckpt.pt
    python melgan.py --mode=bench
    torchrun --standalone --nproc_per_node=8 melgan.py
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

import common

# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    mode: str = "train"                 # train | sample | eval | bench
    preset: str = "paper"               # a key of PRESETS
    init_from: str = "scratch"          # scratch | resume | a checkpoint (ours or the official generator)
    out_dir: str = "out/melgan"
    data_dir: str = ""                  # empty: the built-in speech corpus
    corpus_hours: float = 2.0           # size of the built-in corpus
    input: str = ""                     # --mode=sample: a wav to re-synthesize (empty: held-out utterances)
    seed: int = 1337
    # features (official Audio2Mel)
    sample_rate: int = 22050            # LJSpeech's rate
    n_fft: int = 1024                   # STFT size
    hop: int = 256                      # samples per mel frame = product of upsample_rates
    n_mels: int = 80                    # mel bins
    fmin: float = 0.0                   # lowest mel frequency (Hz)
    fmax: float = 0.0                   # highest mel frequency (Hz); 0 = Nyquist (MelGAN uses the full band)
    # generator (§2.1)
    channels: int = 512                 # width after the input conv (16 * ngf, ngf = 32)
    upsample_rates: tuple = (8, 8, 2, 2)  # transposed-conv strides, product = hop
    dilations: tuple = (1, 3, 9)        # residual stack after each upsampler ("induced receptive field")
    # discriminator (§2.2)
    num_d: int = 3                      # discriminators on raw, 2x and 4x downsampled audio
    ndf: int = 16                       # width of the first discriminator conv
    d_max_channels: int = 1024          # channel cap of the grouped strided convs
    # loss and optimization (§2.3, official train.py)
    lambda_fm: float = 10.0             # feature-matching weight (Eq. 4; official --lambda_feat)
    lr: float = 1e-4                    # Adam, G and D alike
    betas: tuple = (0.5, 0.9)           # Adam betas
    batch_size: int = 16
    segment: int = 8192                 # training clip length in samples
    max_iters: int = 100_000            # optimizer steps (the paper's models train far longer)
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
        common.check_vocoder_config(self)
        if min(self.upsample_rates + self.dilations) < 1 or self.channels % 2 ** len(self.upsample_rates):
            raise SystemExit(f"error: --channels={self.channels} must halve {len(self.upsample_rates)} times "
                             "(one per upsampler), and rates and dilations must be >= 1")
        if (self.ndf < 4 or self.ndf % 4 or self.d_max_channels < self.ndf or self.d_max_channels % self.ndf
                or self.num_d < 1 or self.lambda_fm < 0):
            raise SystemExit(f"error: --ndf={self.ndf} must be a multiple of 4 (grouped convs), "
                             f"--d_max_channels={self.d_max_channels} a multiple of it, "
                             f"--num_d={self.num_d} >= 1, --lambda_fm >= 0")

PRESETS = {
    "paper": dict(),                                   # Generator(80, ngf=32, 3), Discriminator(3, 16, 4, 4)
    "small": dict(channels=128, ndf=16, d_max_channels=256, batch_size=8, max_iters=1000, eval_interval=250,
                  corpus_hours=0.5, eval_items=8, log_interval=25, compile=False),  # ~15 min, laptop CPU
    "tiny":  dict(channels=32, ndf=4, d_max_channels=64, batch_size=2, segment=2048, max_iters=10,
                  eval_interval=1000, corpus_hours=0.02, eval_items=2, log_interval=1, bench_iters=2,
                  bench_seconds=2.0),  # tests
}
# what fixes the weights' shapes and what the mel means: a checkpoint under other values is refused
ARCH_KEYS = ("sample_rate", "n_fft", "hop", "n_mels", "fmin", "fmax",
             "channels", "upsample_rates", "dilations", "num_d", "ndf", "d_max_channels")

# ----------------------------------------------------------------------------- model

class ResBlock(nn.Module):
    """One block of the residual stack (§2.1, "Induced receptive field"; Fig. 1): LReLU, reflection-padded
    dilated k=3 conv, LReLU, 1x1 conv; the shortcut is itself a learned 1x1 conv (official code)."""
    def __init__(self, channels, dilation):
        super().__init__()
        self.dilation = dilation
        self.conv1 = weight_norm(nn.Conv1d(channels, channels, 3, dilation=dilation))
        self.conv2 = weight_norm(nn.Conv1d(channels, channels, 1))
        self.shortcut = weight_norm(nn.Conv1d(channels, channels, 1))

    def forward(self, x):                                          # (B, C, T) -> (B, C, T)
        # in place on fresh tensors that nothing else reads (a conv's backward needs its input, not its
        # output): fewer full-size buffers, the same numbers
        h = F.pad(F.leaky_relu(x, 0.2), (self.dilation, self.dilation), "reflect")
        h = self.conv2(F.leaky_relu(self.conv1(h), 0.2, inplace=True))
        return self.shortcut(x).add_(h)                            # == shortcut(x) + h exactly


class Generator(nn.Module):
    """mel (B, n_mels, frames) -> waveform (B, 1, frames * hop) in [-1, 1] (§2.1, Fig. 1).
    Weight norm on every conv (§2.1, "Normalization technique"): in the authors' trials instance norm
    washed out the pitch (metallic audio) and spectral norm gave poor results, which they blame on its
    Lipschitz constraint hurting the feature-matching objective; weight norm worked best."""
    def __init__(self, cfg):
        super().__init__()
        self.n_res = len(cfg.dilations)
        self.conv_pre = weight_norm(nn.Conv1d(cfg.n_mels, cfg.channels, 7))
        self.ups, self.resblocks = nn.ModuleList(), nn.ModuleList()
        ch = cfg.channels
        for r in cfg.upsample_rates:
            # kernel = 2 * stride so every output sample gets the same number of taps: no checkerboard
            # artifacts from uneven overlap (§2.1, "Checkerboard artifacts")
            self.ups.append(weight_norm(nn.ConvTranspose1d(ch, ch // 2, 2 * r, stride=r,
                                                           padding=r // 2 + r % 2, output_padding=r % 2)))
            ch //= 2
            self.resblocks.extend(ResBlock(ch, d) for d in cfg.dilations)
        self.conv_post = weight_norm(nn.Conv1d(ch, 1, 7))

    def forward(self, mel):                                        # (B, n_mels, frames)
        x = self.conv_pre(F.pad(mel, (3, 3), "reflect"))           # (B, C, frames)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, 0.2, inplace=True))  # (B, C / 2^(i+1), frames * prod(rates[:i+1]))
            # the stack runs its blocks in series: dilations 1, 3, 9 grow the receptive field to 27
            # samples at this rate, so distant samples correlate (§2.1, "Induced receptive field")
            for j in range(self.n_res):
                x = self.resblocks[i * self.n_res + j](x)
        x = self.conv_post(F.pad(F.leaky_relu(x, 0.2, inplace=True), (3, 3), "reflect"))
        return torch.tanh(x)                                       # (B, 1, frames * hop)


class ScaleDiscriminator(nn.Module):
    """One discriminator (§2.2; layer sizes from the official code): a stride-4 stack of large grouped
    convs (kernel 41, groups in/4 keep the parameter count down) whose output is a map of logits, one per
    window of the input: the "window-based objective" (§2.2) of a patch discriminator."""
    def __init__(self, cfg):
        super().__init__()
        convs, ch = [weight_norm(nn.Conv1d(1, cfg.ndf, 15))], cfg.ndf
        for _ in range(4):                                         # 4 downsampling layers, x4 each
            out = min(ch * 4, cfg.d_max_channels)
            convs.append(weight_norm(nn.Conv1d(ch, out, 41, stride=4, padding=20, groups=ch // 4)))
            ch = out
        out = min(ch * 2, cfg.d_max_channels)
        convs.append(weight_norm(nn.Conv1d(ch, out, 5, padding=2)))
        self.convs = nn.ModuleList(convs)
        self.conv_post = weight_norm(nn.Conv1d(out, 1, 3, padding=1))

    def forward(self, x):                                          # (B, 1, T)
        fmaps = []
        x = F.pad(x, (7, 7), "reflect")
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2, inplace=True)           # in place: a fresh conv output
            fmaps.append(x)                                        # hidden features, for feature matching
        fmaps.append(self.conv_post(x))                            # (B, 1, T / 256) window logits, last
        return fmaps


class Discriminator(nn.Module):
    """Multi-scale discriminator (§2.2, "Multi-Scale Architecture"): the same architecture on the raw
    waveform and on it average-pooled 2x and 4x; the coarse scales see low-frequency structure, the raw one
    detail. The pool does not count its zero padding (official code), so the edges are not pulled to 0."""
    def __init__(self, cfg):
        super().__init__()
        self.discriminators = nn.ModuleList(ScaleDiscriminator(cfg) for _ in range(cfg.num_d))
        self.pool = nn.AvgPool1d(4, stride=2, padding=1, count_include_pad=False)

    def forward(self, x):                                          # (B, 1, T)
        outs = []
        for i, d in enumerate(self.discriminators):
            if i > 0:
                x = self.pool(x)                                   # (B, 1, T / 2^i)
            outs.append(d(x))
        return outs                                                # [scale][layer] -> (B, C, T')

# ----------------------------------------------------------------------------- loss

def discriminator_loss(real_outs, fake_outs):
    """Hinge loss on every window logit of every scale (§2.3, Eq. 1)."""
    loss = 0.0
    for r, f in zip(real_outs, fake_outs):
        loss = loss + F.relu(1 - r[-1].float()).mean() + F.relu(1 + f[-1].float()).mean()
    return loss


def generator_loss(fake_outs):
    """Adversarial term of the generator: push the fake window logits up (§2.3, Eq. 2)."""
    return sum(-f[-1].float().mean() for f in fake_outs)


def feature_loss(real_outs, fake_outs):
    """Feature matching (§2.3, Eq. 3): L1 between the discriminators' hidden features on real and fake
    audio, every layer but the logits, each weighted 1/num_D * 4/(n_layers + 1) as in the official code."""
    w = (1.0 / len(real_outs)) * (4.0 / 5)                      # 4 / (n_layers + 1), n_layers = 4
    loss = 0.0
    for r_scale, f_scale in zip(real_outs, fake_outs):
        for r, f in zip(r_scale[:-1], f_scale[:-1]):
            loss = loss + w * F.l1_loss(f.float(), r.detach().float())
    return loss

# ----------------------------------------------------------------------------- data

def log_mel(wav, cfg):
    """(B, 1, T) or (T,) -> log10 mel (B, n_mels, T / hop): the official Audio2Mel features."""
    x = wav.squeeze(1) if wav.dim() == 3 else wav
    return common.mel_spectrogram(x, cfg.sample_rate, cfg.n_fft, cfg.hop, n_mels=cfg.n_mels, fmin=cfg.fmin,
                                  fmax=cfg.fmax or None, log="log10")


def load_split(cfg, split):
    """(id, waveform) pairs of one split, each peak-normalized to 0.95 (official preprocessing)."""
    utts = common.load_corpus(cfg, split, cfg.sample_rate, kind="speech")
    out = []
    for u in utts:
        wav = u.wav                                                # (T,) float32
        out.append((u.id, 0.95 * wav / max(float(abs(wav).max()), 1e-5)))
    return out


def get_batch(sampler, cfg, rt):
    """Random training clips (B, 1, segment) with a random gain in [0.3, 1] (official augmentation),
    and their mels (B, n_mels, segment / hop), computed on the device."""
    x, _ = sampler.next()                                          # (B, T)
    x = x.unsqueeze(1) * torch.empty(x.shape[0], 1, 1).uniform_(0.3, 1.0)  # (B, 1, T)
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
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=cfg.betas)
    # no lr schedule: the official code trains at a constant lr
    return dict(G=G, D=D, opt_g=opt_g, opt_d=opt_d)


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
        # the real features are reused from the D pass above (before D's update), as the official code does
        fake_outs = d_plain(fake)
    loss_adv, loss_fm = generator_loss(fake_outs), feature_loss(real_outs, fake_outs)
    loss_g = loss_adv + cfg.lambda_fm * loss_fm                    # Eq. 4
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    d_plain.requires_grad_(True)
    opt_g.step()
    with torch.no_grad():  # monitoring only: MelGAN has no mel loss, the official code just logs this
        mel_l1 = F.l1_loss(log_mel(fake.detach().float(), cfg), mel)
    return dict(g=loss_adv, fm=loss_fm, d=loss_d, mel=mel_l1)


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
    # mel: L1 of the log10 Audio2Mel features (the training log's mel); mel_ln: common.mel_distance (ln mels,
    # comparable with HiFi-GAN's mel); mrstft: multi-resolution STFT distance
    metrics = dict(mel=lambda fake, wav: F.l1_loss(log_mel(fake, cfg), log_mel(wav, cfg)).item(),
                   mel_ln=lambda fake, wav: common.mel_distance(fake, wav, cfg.sample_rate),
                   mrstft=common.mrstft_distance)
    return common.eval_vocoder(cfg, model, load_split(cfg, split)[:cfg.eval_items],
                               lambda name, wav: vocode(model, wav, name, cfg, rt), metrics,
                               samples_dir, split)


def train(cfg):
    rt = common.setup(cfg)
    train_wavs = [w for _, w in load_split(cfg, "train")]
    common.check_clips(train_wavs, cfg.segment, "train split")
    common.check_clips([w for _, w in load_split(cfg, "val")], cfg.segment, "val split")
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
    """The Generator size of an official file (linda_johnson.pt, multi_speaker.pt, a trained netG.pt: a raw
    state dict of one nn.Sequential `model`), read from its tensors: Sequential index 1 is conv_pre, then per
    stage a LeakyReLU, the upsampler (kernel 2r) and one block per dilation (3**j), then conv_post."""
    if not isinstance(sd, dict) or "model.1.weight_v" not in sd:
        return None
    idx = sorted({int(k.split(".")[1]) for k in sd if k.startswith("model.") and k.endswith("weight_v")})
    convs = [i for i in idx if f"model.{i}.block.2.weight_v" not in sd]    # conv_pre, upsamplers, conv_post
    ups = convs[1:-1]
    n_res = sum(f"model.{i}.block.2.weight_v" in sd for i in idx) // max(1, len(ups))
    rates = tuple(sd[f"model.{i}.weight_v"].shape[-1] // 2 for i in ups)
    n_mels, channels = sd["model.1.weight_v"].shape[1], sd["model.1.weight_v"].shape[0]
    return dict(n_mels=n_mels, channels=channels, upsample_rates=rates, hop=math.prod(rates),
                dilations=tuple(3 ** j for j in range(n_res)))


def load_official(G, sd, cfg):
    """Load an official generator file into G; its size (official_config) must be the config's.
    Sequential layout: 0 pad, 1 conv_pre, then per stage i: 2+5i lrelu, 3+5i upsampler, 4+5i..6+5i
    residual blocks (block.2 = dilated conv, block.4 = 1x1 conv, shortcut), then 22-25
    lrelu/pad/conv_post/tanh."""
    G, need = common.unwrap(G), official_config(sd)
    if need is None:
        raise SystemExit("error: neither one of our checkpoints nor an official MelGAN generator file "
                         "(linda_johnson.pt / multi_speaker.pt / netG.pt: "
                         "a state dict with model.1.weight_v ...)")
    common.check_official_config(need, cfg, "official generator")
    n_res, stage = G.n_res, 2 + G.n_res
    names = {"model.1": "conv_pre", f"model.{2 + stage * len(G.ups) + 2}": "conv_post"}
    for i in range(len(G.ups)):
        names[f"model.{3 + stage * i}"] = f"ups.{i}"
        for j in range(n_res):
            names[f"model.{4 + stage * i + j}.block.2"] = f"resblocks.{i * n_res + j}.conv1"
            names[f"model.{4 + stage * i + j}.block.4"] = f"resblocks.{i * n_res + j}.conv2"
            names[f"model.{4 + stage * i + j}.shortcut"] = f"resblocks.{i * n_res + j}.shortcut"
    suffix = {"weight_g": "parametrizations.weight.original0",
              "weight_v": "parametrizations.weight.original1", "bias": "bias"}
    ours = {}
    for k, v in sd.items():
        prefix, _, leaf = k.rpartition(".")
        if prefix not in names or leaf not in suffix:
            raise SystemExit(f"error: unexpected key {k!r} in the official MelGAN generator file")
        ours[f"{names[prefix]}.{suffix[leaf]}"] = v
    common.load_state_dict(G, ours, what="MelGAN generator (official weights)")

# ----------------------------------------------------------------------------- main

if __name__ == "__main__":
    cfg = common.parse_config(Config, PRESETS)
    {"train": train, "sample": sample, "eval": evaluate, "bench": bench}[cfg.mode](cfg)
