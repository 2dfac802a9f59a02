"""Our whisper.py decode() against openai-whisper's decode(), side by side (a script, run by hand; pytest does not
collect it). Both get the same random weights (the key map is the identity), the official vocabulary and the same
30 s window at batch 1, greedy without timestamps, so both emit the same tokens and tokens/s compare directly.

    python tests/bench_whisper_vs_openai.py                          # whisper-tiny dims, CPU or CUDA
    python tests/bench_whisper_vs_openai.py --preset=whisper-base --sample_len=128 --iters=5

Prints one JSON line: ours and openai's decoded tokens/s, the ratio, and whether the tokens are identical.
Needs openai-whisper (pip install --no-deps openai-whisper; see requirements-ref.txt)."""
import argparse
import dataclasses
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # a script, not a test: no conftest puts the repo on the path
import common  # noqa: E402
import whisper as W  # noqa: E402  (ours)
from cli import import_reference  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="whisper-tiny")
    ap.add_argument("--sample_len", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    try:
        ow = import_reference("whisper", "openai-whisper")
    except BaseException as e:  # pytest's Skipped: the message names the package to install
        raise SystemExit(f"error: {e}")
    device = torch.device(common.resolve_device(a.device))
    cfg = W.Config(**W.PRESETS[a.preset])
    cfg.sample_len, cfg.beam_size = a.sample_len, 0
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
    mel = (torch.randn(1, cfg.n_mels, 2 * cfg.n_audio_ctx) * 0.5).to(device)
    opts = ow.DecodingOptions(language="en", without_timestamps=True, sample_len=a.sample_len, fp16=False,
                              suppress_blank=True)
    with torch.no_grad():
        mine = W.decode(ours, tok, mel, cfg, beam_size=0, timestamps=False)[0]
        theirs = ow.decode(ref, mel[0], opts)
        ms_ours = common.timeit(lambda: W.decode(ours, tok, mel, cfg, beam_size=0, timestamps=False),
                                iters=a.iters, warmup=1)
        ms_ref = common.timeit(lambda: ow.decode(ref, mel[0], opts), iters=a.iters, warmup=1)
    n = len(mine.tokens) + 1                                 # + the eot step
    print(json.dumps(dict(preset=a.preset, device=str(device), tokens=n, same_tokens=mine.tokens == theirs.tokens,
                          ours_tokens_per_s=round(n / (ms_ours / 1000), 1),
                          openai_tokens_per_s=round(n / (ms_ref / 1000), 1),
                          speedup_vs_openai=round(ms_ref / ms_ours, 3))))


if __name__ == "__main__":
    main()
