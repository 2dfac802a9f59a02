"""Our vocoders and codec against the official implementations, side by side (a script, run by hand; pytest does
not collect it: its name does not start with test_). Each comparison builds the reference with random weights,
loads the same weights into ours (the key maps the parity tests prove), feeds both the same input in one process,
and times them interleaved (ours then theirs, theirs then ours, ...), best of N each, so a busy neighbour on the
shared machine slows both alike. One JSON line per comparison: the two best times, ratio = official_time / our_time
(> 1: ours is faster), the same on CPU time (cpu_ratio: process time, which a busy machine disturbs far less;
with --threads=1 it is the compute itself) and the median of the per-round CPU ratios, and the largest output
difference (the outputs must agree, or the timing compares different work).

    OMP_NUM_THREADS=1 python tests/bench_vs_official.py                  # everything, one thread
    python tests/bench_vs_official.py --only=hifigan_v1_infer,melgan_infer --iters=7
    python tests/bench_vs_official.py --only=hifigan_v1_train --train_batch=2

Comparisons (--only takes a comma list of these names):
- hifigan_v1_infer, hifigan_v3_infer: 4 s of audio at batch 1, weight norm folded, vs parallel_wavegan's
  HiFiGANGenerator (equal to jik876's generator; the parity test shows the key map).
- hifigan_v1_train: one V1 training step (D update then G update with the paper's losses: LSGAN, feature
  matching x2, mel L1 x45) at --train_batch x 8192 samples vs the official recipe (jik876's train.py order: D on
  real and fake, then G with D run on real and fake again, with grad; the real branch's D gradients are wasted
  work the official code does) built from parallel_wavegan's generator and HiFiGANMultiScaleMultiPeriodDiscriminator
  (the paper's 70.7 M) and its log-mel; AdamW(2e-4, 0.8, 0.99) on both sides.
- melgan_infer: the official Generator(80, 32, 3) (parallel_wavegan's MelGANGenerator), 4 s, weight norm folded.
- encodec_encode, encodec_decode: the 24 kHz model at 6 kbps, 4 s at batch 1, vs the `encodec` package
  (identical codes asserted).
Needs parallel_wavegan and encodec (requirements-ref.txt); a missing one is named and its comparisons skipped."""
import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # a script, not a test: no conftest puts the repo and tests/ on the path
sys.path.insert(0, os.path.join(ROOT, "tests"))
import common  # noqa: E402
import hifigan  # noqa: E402
import melgan  # noqa: E402

CPU = common.Runtime(torch.device("cpu"), "cpu", torch.float32)
NAMES = ("hifigan_v1_infer", "hifigan_v3_infer", "hifigan_v1_train", "melgan_infer", "encodec_encode",
         "encodec_decode")


def interleaved(fns, iters, warmup=1):
    """fns: {"ours": f, "official": g}. Runs them in turn for `iters` rounds after `warmup` rounds, the order
    alternating each round (neither side always runs right after the other). Returns the best wall ms and the best
    CPU ms (process time: with one thread, the compute itself, far less sensitive to a busy machine than the wall
    clock) of each, and the median of the per-round CPU-time ratios official / ours."""
    best, cpu, ratios, names = {k: float("inf") for k in fns}, {k: float("inf") for k in fns}, [], list(fns)
    for r in range(warmup + iters):
        t = {}
        for k in (names if r % 2 == 0 else names[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            fns[k]()
            best[k] = min(best[k], (time.perf_counter() - t0) * 1e3) if r >= warmup else best[k]
            t[k] = (time.process_time() - c0) * 1e3
        if r >= warmup:
            for k in fns:
                cpu[k] = min(cpu[k], t[k])
            ratios.append(t["official"] / t["ours"])
    return dict(best, cpu=cpu, paired_median_ratio=round(statistics.median(ratios), 3))


def emit(name, t, **extra):
    """One JSON line; ratio = official / ours on the best wall times, cpu_ratio on the best CPU times (> 1: ours
    is faster)."""
    print(json.dumps(dict(comparison=name, threads=torch.get_num_threads(), ours_ms=round(t["ours"], 2),
                          official_ms=round(t["official"], 2), ratio=round(t["official"] / t["ours"], 3),
                          ours_cpu_ms=round(t["cpu"]["ours"], 2), official_cpu_ms=round(t["cpu"]["official"], 2),
                          cpu_ratio=round(t["cpu"]["official"] / t["cpu"]["ours"], 3),
                          paired_median_cpu_ratio=t["paired_median_ratio"], **extra)), flush=True)


def pwg():
    try:
        import scipy.signal as signal
        if not hasattr(signal, "kaiser"):  # parallel_wavegan imports the name newer scipy moved
            signal.kaiser = signal.windows.kaiser
        import parallel_wavegan.models as models
        return models
    except ImportError as e:
        print(f"skip: parallel_wavegan is not installed ({e}); pip install --no-deps parallel_wavegan "
              "(see requirements-ref.txt)", file=sys.stderr)
        return None


def hifigan_cfg(preset):
    return common.parse_config(hifigan.Config, hifigan.PRESETS, [f"--preset={preset}", "--device=cpu",
                                                                 "--compile=False"])


def hifigan_pair(models, cfg):
    """parallel_wavegan's generator with random weights and ours with the same weights (the parity test's map)."""
    torch.manual_seed(0)
    ref = models.HiFiGANGenerator(channels=cfg.channels, upsample_scales=cfg.upsample_rates,
                                  upsample_kernel_sizes=cfg.upsample_kernels, resblock_kernel_sizes=cfg.resblock_kernels,
                                  resblock_dilations=cfg.resblock_dilations, use_additional_convs=cfg.resblock == "1")
    type2 = cfg.resblock == "2"
    leaf = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}

    def our_key(k):  # input_conv -> conv_pre, upsamples.i.1 -> ups.i, blocks.k.convs1.j.1 -> resblocks.k.convs1.j
        k = k.replace("input_conv.", "conv_pre.").replace("output_conv.1.", "conv_post.")
        k = k.replace("upsamples.", "ups.").replace("blocks.", "resblocks.")
        parts = k.split(".")
        if parts[0] == "ups":
            del parts[2]
        if parts[0] == "resblocks":
            del parts[4]
            if type2:
                parts[2] = "convs"
        parts[-1] = leaf.get(parts[-1], parts[-1])
        return ".".join(parts)
    ours = hifigan.Generator(cfg)
    common.load_state_dict(ours, {our_key(k): v for k, v in ref.state_dict().items()}, what="HiFi-GAN generator")
    return ours, ref


def bench_hifigan_infer(models, preset, seconds, iters):
    cfg = hifigan_cfg(preset)
    ours, ref = hifigan_pair(models, cfg)
    ours = common.remove_weight_norm(ours).eval()
    ref.remove_weight_norm()
    ref.eval()
    mel = torch.randn(1, cfg.n_mels, int(seconds * cfg.sample_rate) // cfg.hop, generator=torch.Generator().manual_seed(1)) - 5
    with torch.inference_mode():
        diff = (ours(mel) - ref(mel)).abs().max().item()
        t = interleaved({"ours": lambda: ours(mel), "official": lambda: ref(mel)}, iters)
    emit(f"hifigan_{preset}_infer", t, audio_s=seconds, max_abs_diff=diff,
         ours_rtf=round(t["ours"] / 1e3 / seconds, 4), official_rtf=round(t["official"] / 1e3 / seconds, 4))


def bench_hifigan_train(models, batch, iters):
    import parallel_wavegan.losses as L
    cfg = hifigan_cfg("v1")
    cfg.batch_size = batch
    ours_g, ref_g = hifigan_pair(models, cfg)
    torch.manual_seed(1)
    ref_d = models.HiFiGANMultiScaleMultiPeriodDiscriminator()  # its defaults are the paper's MSD + MPD
    state = hifigan.build(cfg, CPU)
    common.load_state_dict(state["G"], ours_g.state_dict(), what="HiFi-GAN generator")
    n_ours, n_ref = common.count_params(state["D"]), sum(p.numel() for p in ref_d.parameters())
    assert abs(n_ours - n_ref) < 1e-3 * n_ours, (n_ours, n_ref)  # the paper's 70.7 M on both sides (within 0.01 %)
    wav = 0.5 * torch.rand(batch, 1, cfg.segment, generator=torch.Generator().manual_seed(2)) - 0.25
    mel = hifigan.log_mel(wav, cfg)
    opt_g = torch.optim.AdamW(ref_g.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    opt_d = torch.optim.AdamW(ref_d.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    # the loss mel: full band, ln, the generator's STFT settings (jik876's fmax_for_loss = None)
    ref_mel = L.MelSpectrogram(fs=cfg.sample_rate, fft_size=cfg.n_fft, hop_size=cfg.hop, num_mels=cfg.n_mels,
                               fmin=0, fmax=None, log_base=None)

    def official_step():  # jik876 train.py, one iteration, with parallel_wavegan's modules
        y_hat = ref_g(mel)
        d_real, d_fake = ref_d(wav), ref_d(y_hat.detach())
        loss_d = sum(torch.mean((1 - r[-1]) ** 2) + torch.mean(f[-1] ** 2) for r, f in zip(d_real, d_fake))
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        loss_mel = torch.nn.functional.l1_loss(ref_mel(y_hat.squeeze(1)), ref_mel(wav.squeeze(1))) * 45
        d_real, d_fake = ref_d(wav), ref_d(y_hat)
        loss_fm = 2 * sum(torch.mean(torch.abs(r - f)) for dr, df in zip(d_real, d_fake) for r, f in zip(dr, df))
        loss_gen = sum(torch.mean((1 - f[-1]) ** 2) for f in d_fake)
        loss_g = loss_gen + loss_fm + loss_mel
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()

    t = interleaved({"ours": lambda: hifigan.train_step(state, (wav, mel), cfg, CPU), "official": official_step},
                    iters)
    emit("hifigan_v1_train", t, batch=batch, segment=cfg.segment,
         d_params=n_ours, official_d_params=n_ref, note="G and D updates, the paper's losses; official = jik876's step order")


def bench_melgan_infer(models, seconds, iters):
    cfg = common.parse_config(melgan.Config, melgan.PRESETS, ["--preset=paper", "--device=cpu", "--compile=False"])
    torch.manual_seed(0)
    ref = models.MelGANGenerator()  # the official Generator(80, 32, 3)
    official = {k.replace("melgan.", "model.", 1).replace(".stack.", ".block.").replace(".skip_layer.", ".shortcut."): v
                for k, v in ref.state_dict().items()}
    ours = melgan.Generator(cfg)
    melgan.load_official(ours, official, cfg)
    ours = common.remove_weight_norm(ours).eval()
    ref.remove_weight_norm()
    ref.eval()
    mel = torch.randn(1, cfg.n_mels, int(seconds * cfg.sample_rate) // cfg.hop, generator=torch.Generator().manual_seed(1)) - 4
    with torch.inference_mode():
        diff = (ours(mel) - ref(mel)).abs().max().item()
        t = interleaved({"ours": lambda: ours(mel), "official": lambda: ref(mel)}, iters)
    emit("melgan_infer", t, audio_s=seconds, max_abs_diff=diff,
         ours_rtf=round(t["ours"] / 1e3 / seconds, 4), official_rtf=round(t["official"] / 1e3 / seconds, 4))


def bench_encodec(which, seconds, iters):
    try:
        from test_encodec import fill_official_codebooks, official
        pkg = official()
    except BaseException as e:  # pytest's Skipped names the package
        print(f"skip: the encodec package: {e}", file=sys.stderr)
        return
    import encodec as E  # ours (tests/test_encodec imported the package under another name)
    torch.manual_seed(0)
    ref = pkg.model.EncodecModel.encodec_model_24khz(pretrained=False).eval()
    fill_official_codebooks(ref.quantizer.vq)
    cfg = common.parse_config(E.Config, E.PRESETS, ["--preset=24khz", "--device=cpu", "--compile=False"], modes=E.MODES)
    ours = E.EnCodec(cfg)
    ours.load_state_dict(E.official_state_dict_to_ours(ref.state_dict(), cfg))
    ours = common.remove_weight_norm(ours).eval()  # as encodec.load_for_inference does; the package keeps its own
    bw = 6.0
    ref.set_target_bandwidth(bw)
    x = torch.randn(1, 1, int(seconds * cfg.sample_rate), generator=torch.Generator().manual_seed(1)) * 0.1
    with torch.inference_mode():
        frames_ref, frames = ref.encode(x), ours.compress(x, bw)
        same = all(torch.equal(a[0], b[0]) for a, b in zip(frames_ref, frames))
        if which == "encode":
            t = interleaved({"ours": lambda: ours.compress(x, bw), "official": lambda: ref.encode(x)}, iters)
            extra = dict(same_codes=same)
        else:
            diff = (ref.decode(frames_ref)[..., :x.shape[-1]] - ours.decompress(frames, x.shape[-1])).abs().max().item()
            t = interleaved({"ours": lambda: ours.decompress(frames, x.shape[-1]),
                             "official": lambda: ref.decode(frames_ref)}, iters)
            extra = dict(same_codes=same, max_abs_diff=diff)
    emit(f"encodec_{which}", t, audio_s=seconds, kbps=bw,
         ours_rtf=round(t["ours"] / 1e3 / seconds, 4), official_rtf=round(t["official"] / 1e3 / seconds, 4), **extra)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(NAMES), help="comma list of: " + ", ".join(NAMES))
    ap.add_argument("--iters", type=int, default=5, help="timed rounds (best of)")
    ap.add_argument("--seconds", type=float, default=4.0, help="audio length of the inference comparisons")
    ap.add_argument("--train_batch", type=int, default=2, help="batch of the training-step comparison (paper: 16)")
    ap.add_argument("--train_iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    only = a.only.split(",")
    bad = [n for n in only if n not in NAMES]
    if bad:
        raise SystemExit(f"error: --only: unknown comparison {bad[0]!r} (one of {', '.join(NAMES)})")
    torch.set_num_threads(a.threads)
    models = pwg() if any(n.startswith(("hifigan", "melgan")) for n in only) else None
    for n in only:
        if n.startswith(("hifigan", "melgan")) and models is None:
            continue
        if n in ("hifigan_v1_infer", "hifigan_v3_infer"):
            bench_hifigan_infer(models, n.split("_")[1], a.seconds, a.iters)
        elif n == "hifigan_v1_train":
            bench_hifigan_train(models, a.train_batch, a.train_iters)
        elif n == "melgan_infer":
            bench_melgan_infer(models, a.seconds, a.iters)
        else:
            bench_encodec(n.split("_")[1], a.seconds, a.iters)


if __name__ == "__main__":
    main()
