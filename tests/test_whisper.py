"""Tests of whisper.py: official parity (logits, greedy/beam tokens, language ID, word alignment, long-form seeking),
the multitask training format and one golden training step, decoding rules, data handling, the CLI contract.

What pins each loss term, target shift, sampler and schedule (expected values are written in the test):
- next-token cross-entropy after <|startoftranscript|> (prompt and padding masked): test_golden_train_step
- target shift (position i predicts token i + 1) and the §2.3 format: test_target_layout_and_loss_mask
- timed segments: end > start, time never goes back: test_timed_segments_have_length_and_never_go_back
- greedy, beam search (§4.5) and the timestamp grammar: test_official_greedy_and_beam_tokens_identical
  (openai), test_beam_one_equals_greedy_and_timestamp_grammar, test_beam_scores_equal_a_full_forward_rescoring
- temperature fallback (§4.5): test_temperature_fallback_rule; long-form seeking:
  test_long_form_seeking_and_prompts_match_openai (openai)
- language ID softmax: test_detect_language_matches_openai,
  test_language_id_is_a_softmax_over_language_tokens_only
- lr warm-up and linear decay: test_lr_schedule_is_its_own_knob, test_golden_train_step (step 0 at lr / warmup)"""
import contextlib
import copy
import dataclasses
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import common
import whisper as W   # ours: conftest puts the repo first on sys.path; import_reference finds openai's
from cli import ROOT, check_cli_contract, error_of, import_reference, run_script

CPU = types.SimpleNamespace(device=torch.device("cpu"), device_type="cpu", autocast=contextlib.nullcontext)


def tiny_cfg(**kw):
    cfg = W.Config(**W.PRESETS["tiny"])
    cfg.preset = "tiny"
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


TEXTS = ["mike and george tested a bridge in june", "why is the farmer so famous today",
         "the train leaves at seven twenty three on friday", "did hannah see the volcano at the office"]


def small_tok(texts=TEXTS, vocab=300):
    return W.Tokenizer(common.train_bpe([" " + t for t in texts], vocab), num_languages=1)

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
    assert W.ARCH_KEYS[0] == "n_mels" and "n_text_layer" in W.ARCH_KEYS

# ----------------------------------------------------------------------------- parity with openai-whisper


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """openai's model with random weights, saved in the official format, loaded by our --init_from: the official
    vocabulary and 30 s windows, narrow and shallow so the tests run in seconds (the key map is size-independent)."""
    ow = import_reference("whisper", "openai-whisper", submodules=("timing", "transcribe"))
    torch.manual_seed(0)
    dims = ow.model.ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=2,
                                    n_vocab=51865, n_text_ctx=448, n_text_state=64, n_text_head=2, n_text_layer=2)
    ref = ow.model.Whisper(dims).eval()
    with torch.no_grad():
        ref.decoder.positional_embedding.normal_(0, 1.0)      # created uninitialised by the official code
        ref.decoder.token_embedding.weight.mul_(0.1)          # milder logits: varied greedy tokens
    path = tmp_path_factory.mktemp("official") / "tiny.pt"
    torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": ref.state_dict()}, path)
    tok_path = os.path.join(os.path.dirname(ow.__file__), "assets", "multilingual.tiktoken")
    cfg = W.Config(init_from=str(path), tokenizer=tok_path, n_audio_state=1, n_mels=1, mode="sample")
    W.official_dims(cfg)                                      # dims must come from the file
    assert cfg.n_audio_state == 64 and cfg.n_mels == 80
    model = W.load_for_inference(cfg, CPU)
    return ow, ref, model, model.tokenizer, cfg


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


def test_official_greedy_and_beam_tokens_identical(pair):
    ow, ref, ours, tok, cfg = pair
    rt = ow.tokenizer.get_tokenizer(True, num_languages=99, language="en", task="transcribe")
    assert list(rt.sot_sequence) == tok.sot_sequence() and rt.timestamp_begin == tok.timestamp_begin
    assert list(rt.non_speech_tokens) == tok.non_speech_tokens()
    assert tok.language_tokens == sorted(rt.all_language_tokens)
    torch.manual_seed(2)
    mel = torch.randn(1, 80, 3000) * 0.5
    cfg.sample_len = 12
    for ts, beam, task in ((False, 0, "transcribe"), (True, 0, "transcribe"), (True, 3, "transcribe"),
                           (False, 0, "translate")):
        opts = dict(beam_size=beam) if beam else {}
        r = ow.decode(ref, mel[0], ow.DecodingOptions(language="en", task=task, without_timestamps=not ts,
                                                      sample_len=12, fp16=False, **opts))
        o = W.decode(ours, tok, mel, cfg, temperature=0.0, beam_size=beam, timestamps=ts, task=task)[0]
        assert o.tokens == r.tokens, (ts, beam, task, o.tokens, r.tokens)
        assert len(set(o.tokens)) > 2                           # a real sequence, not one token repeated
        assert abs(o.avg_logprob - r.avg_logprob) < 1e-3
        assert abs(o.no_speech_prob - r.no_speech_prob) <= 1e-3 * r.no_speech_prob   # ~1e-5: relative
    assert W.initial_tokens(tok, cfg, task="translate")[0][-1] == rt.translate


def test_detect_language_matches_openai(pair):
    """§2.3 language ID: one decoder step after <|startoftranscript|>, a softmax over the language tokens only."""
    ow, ref, ours, tok, cfg = pair
    torch.manual_seed(3)
    mel = torch.randn(2, 80, 3000) * 0.5
    rtok = ow.tokenizer.get_tokenizer(True, num_languages=99)
    with torch.no_grad():
        _, want = ow.decoding.detect_language(ref, mel, rtok)
    got = W.detect_language(ours, tok, mel)
    for g, w in zip(got, want):
        assert list(g) == sorted(w, key=lambda k: -w[k])           # ordered from the likeliest
        assert abs(sum(g.values()) - 1) < 1e-5
        for k in w:
            assert abs(g[k] - w[k]) < 1e-5 * max(1.0, w[k] * 100), k
    assert got == W.detect_language(ours, tok, mel)                # deterministic


def test_word_alignment_matches_openai(pair, monkeypatch):
    """Word timestamps: cross-attention of the top half's heads, normalised, median-filtered, DTW, words split as
    openai splits them; with random weights the alignment equals openai's timing.find_alignment."""
    ow, ref, ours, tok, cfg = pair
    # openai's DTW as plain Python (its numba functions' py_func): the same code, without seconds of JIT compiling
    monkeypatch.setattr(ow.timing, "dtw_cpu", getattr(ow.timing.dtw_cpu, "py_func", ow.timing.dtw_cpu))
    monkeypatch.setattr(ow.timing, "backtrace", getattr(ow.timing.backtrace, "py_func", ow.timing.backtrace))
    torch.manual_seed(4)
    mel = torch.randn(1, 80, 3000) * 0.5
    text = tok.encode(" hello big world, this is (a) test")
    rtok = ow.tokenizer.get_tokenizer(True, num_languages=99, language="en", task="transcribe")
    want = ow.timing.find_alignment(ref, rtok, text, mel[0], 800)
    got = W.find_alignment(ours, tok, text, mel, 800)
    assert [w[0] for w in got] == [w.word for w in want] and [w[1] for w in got] == [w.tokens for w in want]
    np.testing.assert_allclose([w[2] for w in got], [w.start for w in want], atol=1e-6)
    np.testing.assert_allclose([w[3] for w in got], [w.end for w in want], atol=1e-6)
    np.testing.assert_allclose([w[4] for w in got], [w.probability for w in want], rtol=1e-3)
    starts = [w[2] for w in got]
    assert starts == sorted(starts) and all(w[2] <= w[3] <= 800 / 100 for w in got)
    m = W.merge_punctuations(got)
    assert [w[0] for w in m if w[0]] == [" hello", " big", " world,", " this", " is", " (a)", " test"]


def test_dtw_on_a_hand_made_cost_matrix():
    cost = np.ones((3, 6))
    for i, j in [(0, 0), (0, 1), (1, 2), (1, 3), (2, 4), (2, 5)]:    # token 0 -> frames 0-1, 1 -> 2-3, 2 -> 4-5
        cost[i, j] = 0
    ti, fi = W.dtw(cost)
    assert ti.tolist() == [0, 0, 1, 1, 2, 2] and fi.tolist() == [0, 1, 2, 3, 4, 5]
    ti, fi = W.dtw(np.ones((4, 2)) - np.eye(4, 2))                  # more tokens than frames: still monotonic
    assert ti.tolist() == [0, 1, 2, 3] and fi[0] == 0 and fi[-1] == 1 and all(np.diff(fi) >= 0)
    x = torch.tensor([[1.0, 9, 2, 3, 8, 4, 5]])
    assert W.median_filter(x, 3).tolist() == [[9.0, 2, 3, 3, 4, 5, 4]]    # reflect-padded: 9 1 9 ... 4 5 4


class FakeOpenAI:
    """Enough of an openai-whisper model for its transcribe(): decode() replays scripted results."""
    def __init__(self, ow, replies, calls):
        self.ow, self.replies, self.calls = ow, replies, calls
        self.dims = types.SimpleNamespace(n_mels=80, n_audio_ctx=1500, n_text_ctx=448)
        self.device, self.is_multilingual, self.num_languages = torch.device("cpu"), True, 99

    def decode(self, mel, options):
        self.calls.append(list(options.prompt or []))
        toks, lp, ns = self.replies[len(self.calls) - 1]
        return self.ow.decoding.DecodingResult(audio_features=None, language="en", tokens=toks, avg_logprob=lp,
                                               no_speech_prob=ns, temperature=0.0, compression_ratio=1.0)


def test_long_form_seeking_and_prompts_match_openai(pair, monkeypatch):
    """§4.5 sliding windows, as openai's transcribe(): a window ending on a closed pair resumes at its time and the
    unfinished text after it is neither output nor prompted; one ending on a single timestamp consumes the window;
    a zero-length segment is blanked; a silent window is skipped; the completed text is the next prompt."""
    ow, ref, ours, tok, cfg = pair
    tb, e = tok.timestamp_begin, tok.encode
    replies = [([tb] + e(" alpha") + [tb + 100, tb + 100] + e(" beta") + [tb + 150, tb + 150] + e(" cut off"), -0.1, 0.0),
               ([tb + 5] + e(" zero") + [tb + 5, tb + 20] + e(" gamma") + [tb + 60], -0.1, 0.0),   # at 3.0 s
               ([tb] + e(" delta"), -0.2, 0.0),                                                    # at 33 s
               ([], -2.0, 0.9)]                                                                    # at 63 s: silence
    ref_calls, our_calls = [], []
    wav = (np.random.default_rng(0).standard_normal(70 * 16000) * 0.01).astype(np.float32)
    want = ow.transcribe(FakeOpenAI(ow, replies, ref_calls), wav, language="en", fp16=False, temperature=(0.0,),
                         verbose=None)

    def fake(model, tok_, mel, cfg_, prompt=None, timestamps=True, generator=None, language="en"):
        our_calls.append(list(prompt))
        toks, lp, ns = replies[len(our_calls) - 1]
        return W.DecodeResult(toks, tok.decode(toks), lp, ns, 0.0, 1.0)
    monkeypatch.setattr(W, "decode_with_fallback", fake)
    c = copy.copy(cfg)
    c.n_audio_ctx, c.word_timestamps = 1500, False
    segs, text = W.transcribe(None, tok, wav, c, "cpu")
    assert our_calls == ref_calls and len(our_calls) == 4
    assert our_calls[1] == replies[0][0][:-len(e(" cut off")) - 1]        # completed segments only
    ws = [(round(s["start"], 2), round(s["end"], 2), s["text"].strip()) for s in want["segments"] if s["text"].strip()]
    assert [(round(s.start, 2), round(s.end, 2), s.text) for s in segs] == ws == \
        [(0.0, 2.0, "alpha"), (2.0, 3.0, "beta"), (3.4, 4.2, "gamma"), (33.0, 63.0, "delta")]
    assert text == "alpha beta gamma delta" == want["text"].strip().replace("  ", " ")

# ----------------------------------------------------------------------------- training format and golden step


def test_target_layout_and_loss_mask():
    """§2.3 / Fig. 1, written out by hand: prompt after <|startofprev|>, the sot sequence, timed segments, eot;
    targets start after <|startoftranscript|> (the prompt and sot itself carry no loss)."""
    tok = small_tok()
    tb, e = tok.timestamp_begin, tok.encode
    words = [("mike", 0.10, 0.50), ("and", 0.52, 0.80), ("george", 0.86, 1.30)]
    seq, lf = W.target_tokens(tok, "mike and george", words, cuts=[2], prompt="why is the farmer")
    prompt = [tok.sot_prev] + e(" why is the farmer")
    want = prompt + [tok.sot, tok.sot + 1, tok.transcribe, tb + 5] + e(" mike and") + [tb + 40, tb + 43] + \
        e(" george") + [tb + 65, tok.eot]
    assert seq == want and lf == len(prompt) + 1
    seq2, lf2 = W.target_tokens(tok, "mike and george")                   # no prompt, no timestamps
    assert seq2 == [tok.sot, tok.sot + 1, tok.transcribe, tok.no_timestamps] + e(" mike and george") + [tok.eot]
    assert lf2 == 1
    mel, x, y = W.collate([(np.zeros(8000), seq, lf), (np.zeros(4000), seq2, lf2)], tok, tiny_cfg(), "cpu")
    assert x.shape == y.shape == (2, len(seq) - 1) and mel.shape == (2, 80, 500)
    assert x[0].tolist() == seq[:-1] and x[1, :len(seq2) - 1].tolist() == seq2[:-1]
    assert (y[0, :len(prompt)] == -100).all() and y[0, len(prompt):].tolist() == seq[len(prompt) + 1:]
    assert y[1, :len(seq2) - 1].tolist() == seq2[1:] and (y[1, len(seq2) - 1:] == -100).all()


def test_timed_segments_have_length_and_never_go_back():
    """A segment's end timestamp is > its start, even when its words span < 10 ms (start == end after the 20 ms
    quantisation), and a segment never starts before the previous one ended (word times that go back)."""
    tok = small_tok()
    tb, e = tok.timestamp_begin, tok.encode
    words = [("mike", 0.50, 0.505), ("and", 0.40, 0.45)]                # 0.50 -> tb + 25 and 0.505 -> tb + 25
    seq, _ = W.target_tokens(tok, "mike and", words, cuts=[1])
    want = [tok.sot, tok.sot + 1, tok.transcribe, tb + 25] + e(" mike") + [tb + 26, tb + 26] + e(" and") + \
        [tb + 27, tok.eot]
    assert seq == want
    rng = np.random.default_rng(0)                                      # the invariant on random word times
    for _ in range(200):
        t = np.sort(rng.uniform(0, 3, 8)).round(2)
        ws = [(f"w{i}", float(t[i]), float(t[i] + rng.choice([0.0, 0.005, 0.3]))) for i in range(8)]
        seq, _ = W.target_tokens(tok, "", ws, cuts=sorted(rng.choice(np.arange(1, 8), 2, replace=False).tolist()))
        ts = [i for i in seq if i >= tb]
        assert len(ts) == 6 and all(ts[2 * k + 1] > ts[2 * k] for k in range(3)), ts
        assert all(ts[i + 1] >= ts[i] for i in range(5)), ts


def test_temperature_fallback_rule(monkeypatch):
    """§4.5: retry at the next temperature while gzip ratio > 2.4 or mean log-prob < -1; a window whose
    no-speech probability > 0.6 with log-prob < -1 is accepted as silent; all bad: the last temperature's result."""
    cfg = tiny_cfg(temperatures=(0.0, 0.2, 0.4, 0.6), compression_ratio_threshold=2.4, logprob_threshold=-1.0,
                   no_speech_threshold=0.6)
    calls = []

    def run(replies):
        calls.clear()

        def fake(model, tok, mel, cfg, temperature, **kw):
            calls.append(temperature)
            cr, lp, ns = replies[temperature]
            return [types.SimpleNamespace(compression_ratio=cr, avg_logprob=lp, no_speech_prob=ns, t=temperature)]
        monkeypatch.setattr(W, "decode", fake)
        return W.decode_with_fallback(None, None, None, cfg).t
    ok, loop, unlikely = (1.5, -0.5, 0.1), (3.0, -0.5, 0.1), (1.5, -1.5, 0.1)
    assert run({0.0: loop, 0.2: unlikely, 0.4: ok, 0.6: ok}) == 0.4 and calls == [0.0, 0.2, 0.4]
    assert run({0.0: (1.5, -2.0, 0.9)}) == 0.0 and calls == [0.0]            # silent: accepted
    assert run({0.0: (3.0, -0.5, 0.9), 0.2: ok}) == 0.2                      # likely text: no-speech ignored
    assert run({t: loop for t in cfg.temperatures}) == 0.6 and calls == [0.0, 0.2, 0.4, 0.6]


def test_golden_train_step():
    """One real train_step (AdamW, warm-up lr, gradient clipping) against the objective written out here: the mean
    next-token cross-entropy over the positions after <|startoftranscript|>, and the first AdamW update."""
    cfg = tiny_cfg(grad_clip=0.5, weight_decay=0.1)
    tok = small_tok()
    e = tok.encode
    rng = np.random.default_rng(0)
    prompt = [tok.sot_prev] + e(" why is")
    seqs = [(prompt + [tok.sot, tok.sot + 1, tok.transcribe, tok.no_timestamps] + e(" mike and george") + [tok.eot],
             len(prompt) + 1),                            # the first target: the token after <|startoftranscript|>
            ([tok.sot, tok.sot + 1, tok.transcribe, tok.timestamp_begin + 3] + e(" the train")
             + [tok.timestamp_begin + 50, tok.eot], 1)]
    exs = [((rng.standard_normal(16000) * 0.1).astype(np.float32), s, lf) for s, lf in seqs]
    torch.manual_seed(0)
    state = W.build(cfg, CPU, tok)
    model0 = copy.deepcopy(state["model"])
    batch = W.collate(exs, tok, cfg, "cpu")
    loss = W.train_step(state, batch, cfg, CPU)["loss"].item()
    # the independent transcription: inputs are the sequence itself (padding with 0, never looked at: causal)
    L = max(len(s) for s, _ in seqs) - 1
    x = torch.zeros(2, L, dtype=torch.long)
    for b, (s, _) in enumerate(seqs):
        x[b, :len(s) - 1] = torch.tensor(s[:-1])
    logp = model0(batch[0], x).log_softmax(-1)
    terms = [-logp[b, i, s[i + 1]] for b, (s, first) in enumerate(seqs) for i in range(first - 1, len(s) - 1)]
    ref_loss = torch.stack(terms).mean()
    assert abs(loss - ref_loss.item()) < 1e-5, (loss, ref_loss.item())
    ref_loss.backward()
    params = dict(model0.named_parameters())
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params.values()))
    assert norm > cfg.grad_clip                                   # the clip is active in this step
    scale = cfg.grad_clip / (norm + 1e-6)
    lr = cfg.lr * 1 / cfg.warmup_iters                            # warm-up: step 0 runs at lr / warmup
    new = dict(state["model"].named_parameters())
    for n, p in params.items():
        g = p.grad * scale
        # AdamW's first step: m/(1-b1) = g, v/(1-b2) = g^2; decoupled decay on weight matrices only
        decay = cfg.weight_decay if p.dim() >= 2 and "positional" not in n else 0.0
        want = p.detach() * (1 - lr * decay) - lr * g / (g.abs() + 1e-6)
        torch.testing.assert_close(new[n].detach(), want, rtol=0, atol=2e-6, msg=n)
    assert state["opt"].param_groups[0]["lr"] == pytest.approx(cfg.lr * 2 / cfg.warmup_iters)


def test_lr_schedule_is_its_own_knob():
    """Warm-up then linear decay to 0 at lr_decay_iters, whatever max_iters is (a longer resumed run keeps it)."""
    a, b = tiny_cfg(max_iters=5), tiny_cfg(max_iters=50)
    f = [W.lr_factor(s, a) for s in range(12)]
    assert f == [W.lr_factor(s, b) for s in range(12)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == 0.0 and f[11] == 0.0
    c = tiny_cfg(warmup_iters=2, lr_decay_iters=6)
    assert [W.lr_factor(s, c) for s in range(7)] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0])


def test_long_clips_use_word_times_or_are_skipped(capsys):
    """A clip that fits a window trains on its whole transcript; a longer one is cut at a word where word times are
    known, and skipped (and counted) where they are not -- never trained as <|nospeech|>."""
    cfg = tiny_cfg(p_nospeech=0.0, p_prompt=0.0, p_timestamps=1.0)
    tok = small_tok()
    N = W.window_samples(cfg)
    short = common.Utterance("short", np.zeros(N // 2, np.float32), 16000, "mike and george")
    long_untimed = common.Utterance("long", np.zeros(2 * N, np.float32), 16000, "why is the farmer so famous today")
    words = [(w, 1.0 * i, 1.0 * i + 0.8) for i, w in enumerate("the train leaves at seven twenty three on".split())]
    long_timed = common.Utterance("timed", np.zeros(2 * N, np.float32), 16000, " ".join(w for w, _, _ in words), words)
    kept = W.trainable([short, long_untimed, long_timed], cfg, "train split")
    assert kept == [short, long_timed] and "skipped 1 of 3 clips" in capsys.readouterr().out
    batches = W.Batches(kept, tok, cfg)
    wav, seq, lf = batches.example(short)
    assert tok.decode(seq) == " mike and george" and tok.no_speech not in seq   # the whole text, no times known
    for _ in range(10):
        wav, seq, lf = batches.example(long_timed)
        assert len(wav) <= N and tok.no_speech not in seq
        text = tok.decode(seq).split()
        assert 1 <= len(text) <= 5 and " ".join(text) in long_timed.text
        stamps = [t - tok.timestamp_begin for t in seq if t >= tok.timestamp_begin]
        assert stamps == sorted(stamps) and stamps[-1] <= 250 and stamps[0] <= 5   # times relative to the crop


def test_multilingual_corpus_trains_language_and_translate_tokens():
    """--corpus_languages: the official 99 language tokens; a French clip is trained as French transcription or, at
    p_translate, as <|fr|> <|translate|> with its English translation as the target (§2.3)."""
    cfg = tiny_cfg(corpus_languages="en,fr", p_nospeech=0.0, p_prompt=0.0, p_translate=1.0)
    tok = W.build_tokenizer(cfg, ["il y a 3 chats dans la cuisine", "there are 3 cats in the kitchen"])
    assert tok.num_languages == 99 and tok.sot_sequence("fr", "translate") == [tok.sot, tok.sot + 7, tok.translate]
    fr = common.Utterance("fr1", np.zeros(8000, np.float32), 16000, "il y a 3 chats dans la cuisine",
                          language="fr", translation="there are 3 cats in the kitchen")
    wav, seq, lf = W.Batches([fr], tok, cfg).example(fr)
    assert seq[:4] == [tok.sot, tok.sot + 7, tok.translate, tok.no_timestamps] and lf == 1
    assert tok.decode(seq) == " there are 3 cats in the kitchen"
    cfg.p_translate = 0.0
    wav, seq, lf = W.Batches([fr], tok, cfg).example(fr)
    assert seq[:3] == [tok.sot, tok.sot + 7, tok.transcribe] and tok.decode(seq) == " il y a 3 chats dans la cuisine"
    assert W.build_tokenizer(tiny_cfg(), ["a b"]).num_languages == 1     # English only: one language token


def test_language_id_is_a_softmax_over_language_tokens_only():
    """§2.3 without the reference package: P(language) is the softmax of the <|sot|> step's logits restricted to
    the 99 language tokens (not the whole vocabulary's softmax read at them), ordered, and deterministic."""
    tok = W.build_tokenizer(tiny_cfg(corpus_languages="en,fr"), TEXTS)
    model, cfg = random_model(tok.n_vocab, seed=5)
    with torch.no_grad():
        model.decoder.token_embedding.weight.mul_(20)
    mel = torch.randn(2, 80, 2 * cfg.n_audio_ctx)
    got = W.detect_language(model, tok, mel)
    with torch.no_grad():
        want = model(mel, torch.full((2, 1), tok.sot))[:, 0, tok.language_tokens].softmax(-1)
    for g, w in zip(got, want):
        assert len(g) == 99 and abs(sum(g.values()) - 1) < 1e-5
        assert list(g)[0] == tok.languages[int(w.argmax())]
        np.testing.assert_allclose([g[c] for c in tok.languages], w.numpy(), rtol=1e-4, atol=1e-7)
    assert got == W.detect_language(model, tok, mel)


def test_noise_at_a_given_snr():
    rng = np.random.default_rng(0)
    wav = np.sin(np.arange(16000) / 5).astype(np.float32)
    for snr in (20, 5, 0):
        noise = W.add_noise(wav, snr, rng) - wav
        assert abs(10 * np.log10(np.mean(wav ** 2) / np.mean(noise ** 2)) - snr) < 0.1
    cfg = tiny_cfg(p_noise=1.0, p_nospeech=0.0)
    u = common.Utterance("a", wav, 16000, "mike and george")
    assert not np.array_equal(W.Batches([u], small_tok(), cfg).example(u)[0], wav)
    with pytest.raises(SystemExit, match="eval_snr"):
        common.parse_config(W.Config, W.PRESETS, ["--preset=tiny", "--eval_snr=loud"])


def test_batches_draw_per_rank_and_restore():
    cfg = tiny_cfg()
    utts = [common.Utterance(str(i), np.zeros(8000, np.float32), 16000, t) for i, t in enumerate(TEXTS)]
    tok = small_tok()
    a, b = W.Batches(utts, tok, cfg, 1, rank=0, world_size=2), W.Batches(utts, tok, cfg, 1, rank=1, world_size=2)
    assert not torch.equal(a.next(8, "cpu")[1], b.next(8, "cpu")[1])
    s = a.state_dict()
    x1 = a.next(4, "cpu")[1]
    a.load_state_dict(s)
    assert torch.equal(a.next(4, "cpu")[1], x1)

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
        qks = []
        with_qk = model.decoder(x, model.encoder(mel), qk_out=qks)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(with_qk, full, rtol=1e-5, atol=1e-5)     # the attention-weights path is the same
    assert cache.offset == 12 and len(qks) == 2 and qks[0].shape == (3, 2, 12, cfg.n_audio_ctx)
    x2 = x.clone()                                        # causality: a later token leaves earlier logits alone
    x2[:, 8] = (x2[:, 8] + 1) % 500
    with torch.no_grad():
        torch.testing.assert_close(model(mel, x2)[:, :8], full[:, :8])


def test_static_compiled_step_gives_the_eager_tokens(monkeypatch):
    """The static decoder step (fixed buffers, the position a device tensor: what compiles and CUDA-graphs) gives
    the eager path's tokens and log-probs for greedy and beam search, with torch.compile forced on, and compiles
    once per batch shape (no recompiling per token). aot_eager traces exactly as inductor does (dynamo graph,
    functionalised in-place cache writes) without minutes of C++ compiling on a CPU."""
    tok = small_tok()
    model, cfg = random_model(tok.n_vocab, seed=3)
    with torch.no_grad():
        model.decoder.token_embedding.weight.mul_(20)      # confident random logits: long, varied outputs
    mel = torch.randn(2, 80, 2 * cfg.n_audio_ctx)
    cfg.sample_len = 12
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, **dict(kw, backend="aot_eager")))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for ts, beam in ((True, 0), (False, 3)):
        cfg.decode_method = "eager"
        want = W.decode(model, tok, mel, cfg, beam_size=beam, timestamps=ts)
        cfg.decode_method = "compiled"
        got = W.decode(model, tok, mel, cfg, beam_size=beam, timestamps=ts)
        assert [r.tokens for r in got] == [r.tokens for r in want] and len(want[0].tokens) >= 6
        assert all(abs(a.avg_logprob - b.avg_logprob) < 1e-5 for a, b in zip(got, want))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2     # one per batch shape (2 and 2 * 3)
    torch._dynamo.reset()
    with torch.no_grad():                                   # the static cache alone (eager), step by step
        x = torch.randint(0, tok.n_vocab, (2, 9))
        full = model(mel, x)
        cache = W.KVCache(model.decoder, model.encoder(mel))
        first = model.decoder(x[:, :4], cache=cache)
        step = W.DecoderStep(model.decoder, cache, "compiled")
        step.fn = step._step                                # the static path without compiling
        steps = [step(x[:, i:i + 1]) for i in range(4, 9)]
    torch.testing.assert_close(torch.cat([first, torch.stack(steps, 1)], 1), full, rtol=1e-5, atol=1e-5)
    assert cache.offset == 9 and int(cache.pos) == 9


def test_tokenizer_round_trip_and_special_layout():
    tok = W.Tokenizer(common.train_bpe([" " + t for t in TEXTS * 3], 400), num_languages=1)
    n = len(common.ranks_from_text(tok.ranks_text))
    assert 256 < n <= 400
    for s in TEXTS + ["Ünïcödé — 123, and <|endoftext|> as plain text", "  two  spaces "]:
        assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode(" " + TEXTS[0])) < len(TEXTS[0]) / 2       # merges learned
    # layout: eot, sot, languages, translate, transcribe, startoflm, startofprev, nospeech, notimestamps, 1501 times
    assert (tok.eot, tok.sot, tok.translate, tok.transcribe) == (n, n + 1, n + 3, n + 4)
    assert (tok.sot_lm, tok.sot_prev, tok.no_speech, tok.no_timestamps, tok.timestamp_begin) == tuple(range(n + 5, n + 10))
    assert tok.n_vocab == n + 9 + 1501 and tok.sot_sequence() == [tok.sot, tok.sot + 1, tok.transcribe]
    assert tok.enc.decode([tok.timestamp_begin + 1500]) == "<|30.00|>" and tok.timestamp(1.234) == tok.timestamp_begin + 62
    tok2 = W.Tokenizer.from_extra(tok.extra())                        # what the checkpoint stores rebuilds it
    assert tok2.encode(TEXTS[2]) == tok.encode(TEXTS[2]) and tok2.n_vocab == tok.n_vocab
    words, wt = tok.split_to_word_tokens(tok.encode(" why, the farmer") + [tok.eot])
    assert words == [" why", ",", " the", " farmer", "<|endoftext|>"] and sum(wt, []) == tok.encode(" why, the farmer") + [tok.eot]


def test_official_vocabulary_ids():
    ow = import_reference("whisper", "openai-whisper")
    assets = os.path.join(os.path.dirname(ow.__file__), "assets")
    m = W.Tokenizer.from_file(os.path.join(assets, "multilingual.tiktoken"), 99)
    assert (m.eot, m.sot, m.transcribe, m.no_timestamps, m.timestamp_begin, m.n_vocab) == \
        (50257, 50258, 50359, 50363, 50364, 51865)
    e = W.Tokenizer.from_file(os.path.join(assets, "gpt2.tiktoken"), 99)
    assert (e.eot, e.sot, e.timestamp_begin, e.n_vocab, e.sot_sequence()) == (50256, 50257, 50363, 51864, [50257])
    v3 = W.Tokenizer.from_file(os.path.join(assets, "multilingual.tiktoken"), 100)
    assert (v3.transcribe, v3.timestamp_begin, v3.n_vocab) == (50360, 50365, 51866)


def test_beam_one_equals_greedy_and_timestamp_grammar():
    tok = small_tok()
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


def test_beam_scores_equal_a_full_forward_rescoring():
    """Beam search with the KV cache (rows reordered as hypotheses move) scores each result exactly as a fresh
    full forward of its tokens under the same suppression rules: a stale or mis-ordered cache row would not."""
    tok = small_tok()
    model, cfg = random_model(tok.n_vocab, seed=7)
    with torch.no_grad():
        model.decoder.token_embedding.weight.mul_(3)     # beams whose rows hold different prefixes when they move
    mel = torch.randn(2, 80, 2 * cfg.n_audio_ctx)
    cfg.sample_len, cfg.length_penalty = 10, 0.0
    init = W.initial_tokens(tok, cfg, timestamps=False)[0]
    rules = W.LogitRules(tok, len(init), False, None, cfg.n_audio_ctx)
    moved = []
    real = W.KVCache.reorder
    def spy(self, idx):
        moved.append(idx.tolist() != sorted(idx.tolist()) or len(set(idx.tolist())) < len(idx))
        return real(self, idx)
    W.KVCache.reorder = spy
    try:
        res = W.decode(model, tok, mel, cfg, beam_size=3, timestamps=False)
    finally:
        W.KVCache.reorder = real
    assert any(moved)                                       # hypotheses did change rows
    for b, r in enumerate(res):
        seq = init + r.tokens + [tok.eot]
        with torch.no_grad():
            logits = model(mel[b:b + 1], torch.tensor([seq[:-1]]))[0, len(init) - 1:]
        lp = 0.0
        finished = len(r.tokens) < cfg.sample_len             # else topped up: its eot was never scored
        for i, t in enumerate(seq[len(init):] if finished else seq[len(init):-1]):
            row = logits[i:i + 1].clone()
            rules(row, torch.tensor([seq[:len(init) + i]]))
            lp += row.log_softmax(-1)[0, t].item()
        assert abs(lp / (len(r.tokens) + 1) - r.avg_logprob) < 1e-4, (b, lp, r.avg_logprob)


def test_tiny_model_overfits_to_exact_transcripts():
    cfg = tiny_cfg(p_prompt=0.0, p_nospeech=0.0, lr=3e-3, warmup_iters=1, lr_decay_iters=10**6, grad_clip=10.0,
                   weight_decay=0.0)
    utts = [u for u in common.load_corpus(cfg, "train", W.SAMPLE_RATE) if u.duration < 4][:3]
    tok = W.build_tokenizer(cfg, [u.text for u in utts])
    torch.manual_seed(0)
    state = W.build(cfg, CPU, tok)
    model = state["model"]
    batches = W.Batches(utts, tok, cfg)
    mel = W.collate([(u.wav, [0, 0], 1) for u in utts], tok, cfg, "cpu")[0]
    refs = [u.text for u in utts]

    def transcripts():                                 # without and with timestamps (text only)
        model.eval()
        plain = [r.text.strip() for r in W.decode(model, tok, mel, cfg, beam_size=0, timestamps=False)]
        timed = [" ".join(tok.decode(r.tokens).split()) for r in W.decode(model, tok, mel, cfg, beam_size=2)]
        model.train()
        return plain, timed
    first = None
    for step in range(1, 301):
        loss = W.train_step(state, batches.next(len(utts), "cpu", items=list(range(len(utts)))), cfg, CPU)["loss"]
        first = first or loss.item()
        if step % 25 == 0 and transcripts() == (refs, refs):
            break
    assert transcripts() == (refs, refs), step
    assert loss.item() < first / 5
    model.eval()
    cfg.word_timestamps = True
    segs, text = W.transcribe(model, tok, utts[0].wav, cfg, "cpu")
    assert text.split() == utts[0].text.split() and 0 <= segs[0].start < segs[-1].end <= utts[0].duration + 0.5
    words = [w for s in segs for w in s.words]
    assert [w[0].strip() for w in words] == utts[0].text.split()
    assert all(a <= b for _, a, b, _ in words) and [w[1] for w in words] == sorted(w[1] for w in words)
    err = W.word_time_error(model, tok, utts, cfg, CPU)          # against the corpus's word times, in ms
    assert 0 <= err < 1000, err

# ----------------------------------------------------------------------------- command line, checkpoints


def test_cli_contract(tmp_path, monkeypatch, capsys):
    out = check_cli_contract("whisper.py", tmp_path, bench_keys=(
        "train_tokens_per_s", "train_audio_s_per_s", "encoder_ms_per_window", "decode_tokens_per_s_b1",
        "decode_tokens_per_s_b16"))
    assert "eval (val" in out["train"] and "eval (test" in out["eval"] and "reference:" in out["sample"]
    assert "model dims: n_mels=80, n_audio_ctx=250" in out["sample"]
    d = tmp_path / "run"
    ck = torch.load(d / "ckpt.pt", weights_only=True)
    assert set(ck["state"]) == {"opt", "sched"} and "tokenizer" in ck["extra"]
    assert ck["state"]["sched"]["last_epoch"] == 5 and ck["config"]["lr_decay_iters"] == 10
    # another architecture on resume: the mismatched flag is named
    parse = lambda *a: common.parse_config(W.Config, W.PRESETS, [f"--init_from={d / 'ckpt.pt'}", "--mode=sample",
                                                                 *a])
    with pytest.raises(SystemExit, match="n_text_state"):
        W.sample(parse("--n_text_state=32"))
    # a folder of generated audio (24 kHz, 16 kHz stereo flac, a long one) -> one transcript line per file; every
    # clip reaches the model at 16 kHz, mono, as the corpus's own 16 kHz rendering
    cfg = tiny_cfg()
    u16, u24 = (common.load_corpus(cfg, "train", sr)[:2] for sr in (16000, 24000))
    folder = tmp_path / "gen"
    folder.mkdir()
    import soundfile as sf
    sf.write(folder / "a.wav", u24[0].wav, 24000)
    sf.write(folder / "b.flac", np.stack([u16[1].wav] * 2, 1), 16000)
    sf.write(folder / "c_long.wav", np.concatenate([u16[0].wav, u16[1].wav] * 2), 16000)   # > one 5 s window
    (folder / "notes.txt").write_text("not audio")
    (folder / "refs.txt").write_text("a\tkate was born in may\tan extra column\nzz\tno such file\n")  # -> a WER
    seen = {}
    real = W._decode_texts
    def spy(model, tok, utts, *a, **k):
        seen.update({u.id: u.wav for u in utts})
        return real(model, tok, utts, *a, **k)
    monkeypatch.setattr(W, "_decode_texts", spy)
    got = W.sample(parse(f"--input_dir={folder}", "--beam_size=0"))
    lines = (folder / "transcripts.tsv").read_text().splitlines()
    assert [l.split("\t")[0] for l in lines] == ["a", "b", "c_long"] and set(got) == {"a", "b", "c_long"}
    assert all(l.count("\t") == 1 and "\n" not in l for l in lines)
    assert set(seen) == {"a", "b"}                         # the long one went through long-form transcription
    want = common.wer(["kate was born in may"], [got["a"]])
    assert f"WER {want:.3f} against {folder / 'refs.txt'} (1 of 3 files)" in capsys.readouterr().out
    for name, ref in (("a", u16[0].wav), ("b", u16[1].wav)):
        n = min(len(ref), len(seen[name]))
        assert abs(len(ref) - len(seen[name])) < 160 and np.corrcoef(ref[:n], seen[name][:n])[0, 1] > 0.9, name
    with pytest.raises(SystemExit, match="no audio files"):
        parse(f"--input_dir={tmp_path / 'run'}")


def test_bad_input_gives_one_error_line(tmp_path):
    base = ["--preset=tiny", "--device=cpu", f"--out_dir={tmp_path}"]
    official = tmp_path / "tiny.pt"
    torch.save({"dims": dict(zip(W.ARCH_KEYS, [80] * 9), n_vocab=51865), "model_state_dict": {}}, official)
    assert "--tokenizer" in error_of("whisper.py", *base, "--mode=sample", f"--init_from={official}")  # one line
    parse = lambda *a: common.parse_config(W.Config, W.PRESETS, base + list(a))   # the same checks, in-process
    with pytest.raises(SystemExit, match="--mode=eval needs --init_from"):
        W.evaluate(parse("--mode=eval"))
    for flag, word in (("--language=xx", "language"), ("--task=summarize", "task"), ("--p_prompt=2", "p_prompt"),
                       ("--n_text_head=3", "n_text_head"), ("--beam_sise=3", "beam_size"), ("--temperatures=()", "temperatures")):
        with pytest.raises(SystemExit, match=word):
            parse(flag)
    with pytest.raises(SystemExit, match="does not exist"):
        W.evaluate(parse("--mode=eval", "--init_from=resume"))
    bogus = tmp_path / "bogus.pt"
    torch.save({"weights": torch.zeros(2)}, bogus)
    with pytest.raises(SystemExit, match="neither a nanoaudio checkpoint"):
        W.sample(parse("--mode=sample", f"--init_from={bogus}"))


def test_torchrun_two_processes_draw_different_batches(tmp_path):
    """DDP (gloo, 2 processes): each rank draws its own batches and the checkpoint holds each rank's own sampler
    state (the two-process resume itself is common's, tested in test_common; one torchrun here keeps this file fast)."""
    d = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "whisper.py",
            "--preset=tiny", "--device=cpu", f"--out_dir={d}", "--eval_items=1", "--max_iters=3"]
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    ck = torch.load(d / "ckpt.pt", weights_only=False)
    assert ck["step"] == 3 and len(ck["rng"]) == 2 and ck["rng"][0]["sampler"] != ck["rng"][1]["sampler"]
    # rank 1's saved state is its own sampler advanced once per step
    cfg = tiny_cfg()
    utts = W.trainable(common.load_corpus(cfg, "train", W.SAMPLE_RATE), cfg, "train")
    tok = W.Tokenizer.from_extra(ck["extra"])
    b = W.Batches(utts, tok, cfg, cfg.seed, rank=1, world_size=2)
    for _ in range(3):
        b.next(cfg.batch_size, "cpu")
    assert b.state_dict() == ck["rng"][1]["sampler"]
