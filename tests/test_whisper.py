"""Tests of whisper.py: official parity, KV cache, tokenizer, decoding rules, overfitting, CLI, resume."""
import dataclasses
import importlib.util
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from cli import run_script  # noqa: E402

# our whisper.py shares its name with the reference package (openai-whisper): load ours by path under another name
_spec = importlib.util.spec_from_file_location("nanoaudio_whisper", os.path.join(ROOT, "whisper.py"))
W = importlib.util.module_from_spec(_spec)
sys.modules["nanoaudio_whisper"] = W    # common names the paper after the module's file: whisper.py
_spec.loader.exec_module(W)


def find_official():
    """openai-whisper imported from site-packages, not this repo's whisper.py; None if it is not installed."""
    mod = sys.modules.get("whisper")
    if mod is not None and hasattr(mod, "model") and hasattr(mod, "decode"):
        return mod
    saved_path, saved_mod = sys.path[:], sys.modules.pop("whisper", None)
    here = {ROOT, os.path.abspath("")}
    try:
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") not in here]
        spec = importlib.util.find_spec("whisper")
        if spec is None or spec.origin is None or os.path.dirname(os.path.dirname(spec.origin)) in here:
            return None
        import whisper as official
        return official
    except ImportError:
        return None
    finally:
        sys.path[:] = saved_path
        if saved_mod is not None and "whisper" not in sys.modules:
            sys.modules["whisper"] = saved_mod


def official_whisper():
    ow = find_official()
    if ow is None:
        pytest.skip("openai-whisper is not installed (pip install --no-deps openai-whisper): parity not checked")
    return ow



def tiny_cfg(**kw):
    cfg = W.Config(**W.PRESETS["tiny"])
    cfg.preset = "tiny"
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


TEXTS = ["mike and george tested a bridge in june", "why is the farmer so famous today",
         "the train leaves at seven twenty three on friday", "did hannah see the volcano at the office"]

# ----------------------------------------------------------------------------- sizes

# parameters of openai-whisper 20250625's modules (encoder + decoder, positional buffer excluded), and the README's
# rounded sizes
OFFICIAL = {"whisper-tiny": (37_184_640, 39e6), "whisper-base": (71_825_920, 74e6),
            "whisper-small": (240_582_912, 244e6), "whisper-medium": (762_321_920, 769e6),
            "whisper-large": (1_541_384_960, 1550e6), "whisper-large-v3": (1_541_570_560, 1550e6),
            "whisper-turbo": (806_958_080, 809e6)}


def test_paper_presets_have_official_parameter_counts():
    for name, (exact, readme) in OFFICIAL.items():
        cfg = W.Config(**W.PRESETS[name])
        n_vocab = 51866 if cfg.n_mels == 128 else 51865
        with torch.device("meta"):
            m = W.Whisper(W.model_dims(cfg, n_vocab))
        n = common.count_params(m)
        assert n == exact, (name, n, exact)
        assert abs(n - readme) / readme < 0.05, (name, n)
        assert cfg.n_audio_ctx == 1500 and cfg.n_text_ctx == 448   # 30 s windows, 3000 mel frames
    assert len([k for k in W.Whisper(W.model_dims(tiny_cfg(), 400)).state_dict() if k.endswith("key.bias")]) == 0

# ----------------------------------------------------------------------------- parity with openai-whisper


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The official tiny model with random weights, saved in the official format, loaded by our --init_from."""
    ow = official_whisper()
    torch.manual_seed(0)
    dims = ow.model.ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6, n_audio_layer=4,
                                    n_vocab=51865, n_text_ctx=448, n_text_state=384, n_text_head=6, n_text_layer=4)
    ref = ow.model.Whisper(dims).eval()
    with torch.no_grad():
        ref.decoder.positional_embedding.normal_(0, 1.0)      # created uninitialised by the official code
        ref.decoder.token_embedding.weight.mul_(0.1)          # milder logits: varied greedy tokens
    path = tmp_path_factory.mktemp("official") / "tiny.pt"
    torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": ref.state_dict()}, path)
    tok_path = os.path.join(os.path.dirname(ow.__file__), "assets", "multilingual.tiktoken")
    cfg = W.Config(init_from=str(path), tokenizer=tok_path, n_audio_state=1, n_mels=1)  # dims must come from the file
    model, tok, ckpt = W.load_model(cfg, "cpu")
    assert ckpt is None and cfg.n_audio_state == 384 and cfg.n_mels == 80
    return ow, ref, model.eval(), tok, cfg


def test_official_logits_and_log_mel_parity(pair):
    ow, ref, ours, tok, cfg = pair
    torch.manual_seed(1)
    wav = torch.randn(16000 * 3) * 0.1
    mel_ref = ow.log_mel_spectrogram(ow.pad_or_trim(wav))
    mel = common.log_mel_spectrogram(ow.pad_or_trim(wav))
    assert mel.shape == (80, 3000)
    torch.testing.assert_close(mel, mel_ref, rtol=1e-5, atol=1e-5)
    tokens = torch.tensor([tok.sot_sequence() + [tok.no_timestamps] + tok.encode(" hello world, this is a test")])
    with torch.no_grad():
        a, b = ref(mel_ref[None], tokens), ours(mel_ref[None], tokens)
    assert a.shape == b.shape == (1, tokens.shape[1], 51865)
    assert ((a - b).norm() / a.norm()).item() < 1e-4


def test_official_greedy_tokens_identical(pair):
    ow, ref, ours, tok, cfg = pair
    rt = ow.tokenizer.get_tokenizer(True, num_languages=99, language="en", task="transcribe")
    assert list(rt.sot_sequence) == tok.sot_sequence() and rt.timestamp_begin == tok.timestamp_begin
    assert list(rt.non_speech_tokens) == tok.non_speech_tokens()
    torch.manual_seed(2)
    mel = torch.randn(1, 80, 3000) * 0.5
    cfg.sample_len = 12
    for ts in (False, True):
        r = ow.decode(ref, mel[0], ow.DecodingOptions(language="en", without_timestamps=not ts, sample_len=12,
                                                      fp16=False))
        o = W.decode(ours, tok, mel, cfg, temperature=0.0, beam_size=0, timestamps=ts)[0]
        assert o.tokens == r.tokens, (ts, o.tokens, r.tokens)
        assert len(set(o.tokens)) > 2                           # a real sequence, not one token repeated
        assert abs(o.avg_logprob - r.avg_logprob) < 1e-3 and abs(o.no_speech_prob - r.no_speech_prob) < 1e-4

# ----------------------------------------------------------------------------- model and decoding


def random_model(n_vocab, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = tiny_cfg(**kw)
    return W.Whisper(W.model_dims(cfg, n_vocab)).eval(), cfg


def test_kv_cache_decoding_equals_full_forward():
    model, cfg = random_model(500)
    mel = torch.randn(3, 80, 2 * cfg.n_audio_ctx)
    x = torch.randint(0, 500, (3, 12))
    with torch.no_grad():
        full = model(mel, x)
        cache = W.KVCache(model.decoder, model.encoder(mel))
        steps = [model.decoder(x[:, :5], cache=cache)] + [model.decoder(x[:, i:i + 1], cache=cache) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.offset == 12
    # causality of the decoder: changing a later token leaves earlier logits alone
    x2 = x.clone()
    x2[:, 8] = (x2[:, 8] + 1) % 500
    with torch.no_grad():
        torch.testing.assert_close(model(mel, x2)[:, :8], full[:, :8])


def test_tokenizer_round_trip_and_special_layout():
    tok = W.Tokenizer(common.train_bpe([" " + t for t in TEXTS * 3], 400), num_languages=1)
    n = len(common.ranks_from_text(tok.ranks_text))
    assert 256 < n <= 400
    for s in TEXTS + ["Ünïcödé — 123, and <|endoftext|> as plain text", "  two  spaces "]:
        assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode(" " + TEXTS[0])) < len(TEXTS[0]) / 2       # merges learned
    assert all(tok.enc.decode_single_token_bytes(t)[:1] != b" " or len(tok.enc.decode_single_token_bytes(t)) > 1
               for t in tok.encode(" " + " ".join(TEXTS)))               # no bare-space token before a word
    # layout: eot, sot, languages, translate, transcribe, startoflm, startofprev, nospeech, notimestamps, 1501 times
    assert (tok.eot, tok.sot, tok.translate, tok.transcribe) == (n, n + 1, n + 3, n + 4)
    assert (tok.sot_lm, tok.sot_prev, tok.no_speech, tok.no_timestamps, tok.timestamp_begin) == tuple(range(n + 5, n + 10))
    assert tok.n_vocab == n + 9 + 1501 and tok.sot_sequence() == [tok.sot, tok.sot + 1, tok.transcribe]
    assert tok.enc.decode([tok.timestamp_begin + 1500]) == "<|30.00|>" and tok.timestamp(1.234) == tok.timestamp_begin + 62
    # the file beside the checkpoint reproduces the tokenizer exactly
    tok2 = W.Tokenizer(common.ranks_from_text(tok.ranks_text), 1)
    assert tok2.encode(TEXTS[2]) == tok.encode(TEXTS[2]) and tok2.n_vocab == tok.n_vocab
    # official vocabularies: the published ids (card §2.3), derived, not hard-coded
    ow = find_official()
    if ow is None:
        print("openai-whisper is not installed: the official vocabularies' ids are not checked")
    elif os.path.exists(os.path.join(os.path.dirname(ow.__file__), "assets", "gpt2.tiktoken")):
        assets = os.path.join(os.path.dirname(ow.__file__), "assets")
        m = W.Tokenizer.from_file(os.path.join(assets, "multilingual.tiktoken"), 99)
        assert (m.eot, m.sot, m.transcribe, m.no_timestamps, m.timestamp_begin, m.n_vocab) == \
            (50257, 50258, 50359, 50363, 50364, 51865)
        e = W.Tokenizer.from_file(os.path.join(assets, "gpt2.tiktoken"), 99)
        assert (e.eot, e.sot, e.timestamp_begin, e.n_vocab, e.sot_sequence()) == (50256, 50257, 50363, 51864, [50257])
        v3 = W.Tokenizer.from_file(os.path.join(assets, "multilingual.tiktoken"), 100)
        assert (v3.transcribe, v3.timestamp_begin, v3.n_vocab) == (50360, 50365, 51866)


def test_beam_one_equals_greedy_and_timestamp_grammar():
    tok = W.Tokenizer(common.train_bpe([" " + t for t in TEXTS], 300), num_languages=1)
    model, cfg = random_model(tok.n_vocab, seed=3)
    with torch.no_grad():
        model.decoder.token_embedding.weight.mul_(20)      # confident random logits: long, varied outputs
    mel = torch.randn(2, 80, 2 * cfg.n_audio_ctx)
    cfg.sample_len = 20
    for ts in (False, True):
        g = W.decode(model, tok, mel, cfg, temperature=0.0, beam_size=0, timestamps=ts)
        b = W.decode(model, tok, mel, cfg, temperature=0.0, beam_size=1, timestamps=ts)
        assert [r.tokens for r in g] == [r.tokens for r in b]
        assert all(abs(x.avg_logprob - y.avg_logprob) < 1e-5 for x, y in zip(g, b))
        b3 = W.decode(model, tok, mel, cfg, temperature=0.0, beam_size=3, timestamps=ts)
    tb = tok.timestamp_begin
    for r in g + b3:                                   # timestamps=True results: the grammar holds
        toks = r.tokens
        assert toks and toks[0] >= tb and toks[0] - tb <= 50        # starts with a timestamp <= 1.0 s
        stamps = [t for t in toks if t >= tb]
        assert stamps == sorted(stamps) and max(stamps) - tb <= cfg.n_audio_ctx
        assert tok.no_timestamps not in toks and all(t != tok.eot for t in toks)


def test_tiny_model_overfits_to_exact_transcripts():
    cfg = tiny_cfg(p_prompt=0.0, p_nospeech=0.0)
    utts = [u for u in common.load_corpus(cfg, "train", W.SAMPLE_RATE) if u.duration < 4][:4]
    tok = W.build_tokenizer(cfg, [u.text for u in utts])
    torch.manual_seed(0)
    model = W.Whisper(W.model_dims(cfg, tok.n_vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)
    batches = W.Batches(utts, tok, cfg)
    wavs = torch.zeros(len(utts), W.window_samples(cfg))
    for j, u in enumerate(utts):
        wavs[j, :len(u.wav)] = torch.from_numpy(u.wav)
    mel = W.log_mel(wavs, cfg, "cpu")
    refs = [u.text for u in utts]

    def transcripts():                                 # without and with timestamps (text only)
        model.eval()
        plain = [r.text.strip() for r in W.decode(model, tok, mel, cfg, beam_size=0, timestamps=False)]
        timed = [" ".join(tok.decode(r.tokens).split()) for r in W.decode(model, tok, mel, cfg, beam_size=2)]
        model.train()
        return plain, timed
    first = None
    for step in range(1, 401):
        m, x, y = batches.next(len(utts), "cpu", items=list(range(len(utts))))
        loss = W.loss_fn(model(m, x), y)
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 and transcripts() == (refs, refs):
            break
    assert transcripts() == (refs, refs), step
    assert loss.item() < first / 5
    model.eval()
    segs, text = W.transcribe(model, tok, utts[0].wav, cfg, "cpu")
    assert text.split() == utts[0].text.split() and 0 <= segs[0][0] < segs[-1][1] <= utts[0].duration + 0.5

# ----------------------------------------------------------------------------- command line, checkpoints


def run_cli(args, out_dir):
    return run_script("whisper.py", "--preset=tiny", "--device=cpu", "--compile=False", f"--out_dir={out_dir}",
                      *args).stdout


def test_cli_train_resume_sample_bench(tmp_path):
    d = tmp_path / "run"
    out = run_cli(["--max_iters=3"], d)
    assert (d / "ckpt.pt").exists() and (d / "tokenizer.tiktoken").exists() and "step 3/3" in out
    out = run_cli(["--init_from=resume", "--max_iters=5"], d)
    assert "step 4/5" in out and "step 5/5" in out and "step 3/" not in out
    assert torch.load(d / "ckpt.pt", weights_only=True)["step"] == 5
    out = run_cli(["--mode=sample", f"--init_from={d / 'ckpt.pt'}"], d)
    wavs, pngs = list((d / "samples").glob("*.wav")), list((d / "samples").glob("*.png"))
    assert len(wavs) == 1 and len(pngs) == 1 and "reference:" in out
    out = run_cli(["--mode=bench"], d)
    line = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
    for k in ("train_tokens_per_s", "train_audio_s_per_s", "encoder_ms_per_window", "decode_tokens_per_s_b1",
              "decode_tokens_per_s_b16", "params", "peak_memory_mb"):
        assert line[k] > 0, k


def test_resume_is_exact_and_bad_checkpoints_are_rejected(tmp_path):
    flags = ["--preset=tiny", "--device=cpu", "--compile=False", "--decay_iters=5", "--eval_items=1"]
    cfg = lambda *a: common.parse_config(W.Config, W.PRESETS, flags + list(a))
    W.train(cfg(f"--out_dir={tmp_path / 'a'}", "--max_iters=5"))
    W.train(cfg(f"--out_dir={tmp_path / 'b'}", "--max_iters=3"))
    W.train(cfg(f"--out_dir={tmp_path / 'b'}", "--max_iters=5", "--init_from=resume"))
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 5
    for k, v in a["models"]["model"].items():
        torch.testing.assert_close(b["models"]["model"][k], v, rtol=0, atol=0, msg=k)
    # another config: the mismatched key is named
    with pytest.raises(SystemExit, match="n_text_state"):
        W.sample(cfg(f"--out_dir={tmp_path / 'b'}", "--init_from=resume", "--n_text_state=32", "--mode=sample"))
    # another paper's checkpoint
    @dataclasses.dataclass
    class Other:
        out_dir: str = str(tmp_path / "o")
    other = Other()
    common.save_checkpoint(other, 1, {"model": torch.nn.Linear(2, 2)})
    with pytest.raises(SystemExit, match="not whisper.py"):
        W.sample(cfg(f"--init_from={tmp_path / 'o' / 'ckpt.pt'}", "--mode=sample", f"--out_dir={tmp_path / 'c'}"))
    # an unknown flag names the closest one
    with pytest.raises(SystemExit, match="beam_size"):
        common.parse_config(W.Config, W.PRESETS, ["--beam_sise=3"])


def test_long_form_seeks_by_timestamps(monkeypatch):
    """Sliding windows (§4.5): a window ending on a closed pair of timestamps resumes at that time, one ending on a
    single timestamp consumes the whole window, and a silent window is skipped; the previous text is the prompt."""
    tok = W.Tokenizer(common.train_bpe([" " + t for t in TEXTS], 300), num_languages=1)
    tb, cfg = tok.timestamp_begin, tiny_cfg()                   # 5 s windows = 500 mel frames
    A, B, C = tok.encode(" alpha"), tok.encode(" beta"), tok.encode(" gamma")
    replies = [[tb] + A + [tb + 100, tb + 100] + B + [tb + 150, tb + 150],    # ends on a pair: resume at 3.0 s
               [tb] + C + [tb + 50],                                      # single ending: next window at 8.0 s
               []]                                                         # silence
    calls = []

    def fake(model, tok_, mel, cfg_, prompt=None, timestamps=True, generator=None):
        calls.append((mel.shape, list(prompt)))
        toks = replies[len(calls) - 1]
        return W.DecodeResult(toks, tok.decode(toks), -0.1 if toks else -2.0, 0.0 if toks else 0.9, 0.0, 1.0)
    monkeypatch.setattr(W, "decode_with_fallback", fake)
    segs, text = W.transcribe(None, tok, torch.zeros(9 * 16000).numpy(), cfg, "cpu")
    assert [(round(a, 2), round(b, 2), t) for a, b, t in segs] == [(0.0, 2.0, "alpha"), (2.0, 3.0, "beta"),
                                                                   (3.0, 4.0, "gamma")]
    assert text == "alpha beta gamma" and len(calls) == 3
    assert all(shape == (1, 80, 500) for shape, _ in calls)
    assert calls[0][1] == [] and calls[1][1] == replies[0] and calls[2][1] == replies[0] + replies[1]
