"""Our whisper.py decode() against openai-whisper's decode(), side by side (a script, run by hand; pytest does not
collect it). Both get the same random weights (the key map is the identity), the official vocabulary and the same
30 s windows, without timestamps, so both emit the same tokens and the times compare directly. Each comparison
(greedy and beam search, batch 1 and 8) times the two interleaved, best of --iters each (the machine may be busy:
the best run is the least disturbed one). Both decode the same precomputed audio features (both decode()s accept
them), so the figure is decoding alone; --with_encoder passes the log-mel and times the encoder too.

    python tests/bench_whisper_vs_openai.py                          # whisper-tiny dims, CPU or CUDA, 1 thread
    python tests/bench_whisper_vs_openai.py --preset=whisper-base --sample_len=128 --iters=5 --threads=2
    python tests/bench_whisper_vs_openai.py --only=greedy_b1,beam5_b8

Prints one JSON line per comparison: ours and openai's tokens/s, the ratio (> 1: ours is faster), and whether the
tokens are identical. Needs openai-whisper (pip install --no-deps openai-whisper; see requirements-ref.txt)."""
import argparse
import dataclasses
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # a script, not a test: no conftest puts the repo on the path
import common  # noqa: E402
import whisper as W  # noqa: E402  (ours)
from cli import import_reference  # noqa: E402

COMPARISONS = {"greedy_b1": (0, 1), "greedy_b8": (0, 8), "beam5_b1": (5, 1), "beam5_b8": (5, 8)}


def best_of(fns, iters, sync):
    """Run each fn once per round, interleaved, iters rounds after a warm-up; the best time (ms) of each."""
    best = [float("inf")] * len(fns)
    for fn in fns:
        fn()
    for _ in range(iters):
        for i, fn in enumerate(fns):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            best[i] = min(best[i], (time.perf_counter() - t) * 1000)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="whisper-tiny")
    ap.add_argument("--sample_len", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--with_encoder", action="store_true",
                    help="time the encoder too (default: both decode the same precomputed audio features)")
    ap.add_argument("--only", default="", help="comma-separated names of " + ", ".join(COMPARISONS))
    a = ap.parse_args()
    try:
        ow = import_reference("whisper", "openai-whisper")
    except BaseException as e:  # pytest's Skipped: the message names the package to install
        raise SystemExit(f"error: {e}")
    names = [n for n in a.only.split(",") if n] or list(COMPARISONS)
    for n in names:
        if n not in COMPARISONS:
            raise SystemExit(f"error: --only: unknown comparison {n!r} (known: {', '.join(COMPARISONS)})")
    torch.set_num_threads(a.threads)
    device = torch.device(common.resolve_device(a.device))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cfg = W.Config(**W.PRESETS[a.preset])
    cfg.sample_len = a.sample_len
    assets = os.path.join(os.path.dirname(ow.__file__), "assets")
    tok = W.Tokenizer.from_file(os.path.join(assets, "multilingual.tiktoken"), 100 if cfg.n_mels == 128 else 99)
    dims = ow.model.ModelDimensions(**W.model_dims(cfg, tok.n_vocab))
    torch.manual_seed(0)
    ref = ow.model.Whisper(dims).to(device).eval()
    with torch.no_grad():
        ref.decoder.positional_embedding.normal_(0, 1.0)     # created uninitialised by the official code
        ref.decoder.token_embedding.weight.mul_(0.1)         # milder logits: a varied greedy sequence
    ours = W.Whisper(dataclasses.asdict(dims), tok).to(device).eval()
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    mel8 = (torch.randn(8, cfg.n_mels, 2 * cfg.n_audio_ctx, generator=g) * 0.5).to(device)
    if not a.with_encoder:                                   # the same features for both: decoding alone
        with torch.no_grad():
            mel8 = ours.encoder(mel8)                        # (8, n_audio_ctx, n_audio_state)
    for name in names:
        beam, B = COMPARISONS[name]
        mel = mel8[:B]
        opts = ow.DecodingOptions(language="en", without_timestamps=True, sample_len=a.sample_len, fp16=False,
                                  suppress_blank=True, **(dict(beam_size=beam) if beam else {}))
        with torch.no_grad():
            mine = W.decode(ours, tok, mel, cfg, beam_size=beam, timestamps=False)
            try:
                theirs = ow.decode(ref, mel, opts)
            except RuntimeError as e:                        # openai-whisper 20250625: beam search at batch > 1
                print(json.dumps(dict(comparison=name, preset=a.preset, batch=B, beam_size=beam,
                                      openai_error=str(e).splitlines()[0][:200])), flush=True)
                continue
            ms_ours, ms_ref = best_of([lambda: W.decode(ours, tok, mel, cfg, beam_size=beam, timestamps=False),
                                       lambda: ow.decode(ref, mel, opts)], a.iters, sync)
        n = sum(len(r.tokens) + 1 for r in mine)             # + each eot step
        print(json.dumps(dict(comparison=name, preset=a.preset, device=str(device), threads=a.threads, encoder=a.with_encoder, batch=B,
                              beam_size=beam, tokens=n,
                              same_tokens=[r.tokens for r in mine] == [r.tokens for r in theirs],
                              ours_ms=round(ms_ours, 1), openai_ms=round(ms_ref, 1),
                              ours_tokens_per_s=round(n / (ms_ours / 1000), 1),
                              openai_tokens_per_s=round(n / (ms_ref / 1000), 1),
                              speedup_vs_openai=round(ms_ref / ms_ours, 3))), flush=True)


if __name__ == "__main__":
    main()
