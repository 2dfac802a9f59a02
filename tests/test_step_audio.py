"""Tests of step_audio.py (Step-Audio 2): the audio placeholders, the LLM's attention and cache, the chat
format's loss mask, the tool loop, the held-out question bank; speech output: FSQ, the text:audio interleave, the token
ranges, the flow-matching sampler, the vocoder; the training stages (golden steps) and the command line.

What pins each loss term, target shift, sampler and schedule:
- the audio placeholder count (official compute_token_num, transcribed here):
  test_placeholder_count_is_the_official_compute_token_num_at_many_lengths, test_placeholder_count_follows_...
- LLM next-token NLL, shifted by one, masked to the assistant's turns: test_golden_step[sft|adaptor],
  test_loss_is_masked_to_the_assistant_turns
- encoder CTC over the 25 Hz frames: test_golden_step[encoder]; speech tokenizer (FSQ + CTC):
  test_golden_step_speech[tokenizer], test_fsq_round_trip_and_code_count
- flow matching (the conditional OT path, cosine times, condition drop) and its Euler sampler with
  guidance: test_golden_step_speech[flow], test_flow_sampler_boundary_conditions,
  test_detokenizer_classifier_free_guidance
- vocoder mel L1: test_golden_step_speech[vocoder] (its expected mel still comes from the file's voc_mel)
- the text:audio interleave and greedy decoding: test_interleave_pattern_and_inverse,
  test_spoken_generation_keeps_the_pattern_and_refeeds_as_ids, test_generate_with_the_cache_equals_greedy_...
- stages and lr (warm-up per stage, a cosine to 10 % but in the LLM and adaptor stages):
  test_stage_schedule_and_what_each_stage_trains"""
import copy
import math
import re
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import step_audio as S
from cli import check_cli_contract, error_of


def tiny(**kw):
    cfg = S.Config(**{**S.PRESETS["tiny"], "preset": "tiny", "device": "cpu", **kw})
    cfg.vocab_size = cfg.vocab_size or byte_tok(cfg).n_vocab
    return cfg


def rt():
    return common.Runtime(torch.device("cpu"), "cpu", torch.float32)


def byte_tok(cfg=None):
    return S.Tokenizer({bytes([i]): i for i in range(256)}, S.n_codes(cfg or S.Config(**S.PRESETS["tiny"])))


# ----------------------------------------------------------------------------- audio placeholders

@pytest.mark.parametrize("seconds", [0.37, 1.0, 2.99, 3.0, 3.01, 7.5])
def test_placeholder_count_follows_the_encoder_and_adaptor(seconds):
    """Each chunk's placeholders == the features the encoder and adaptor really produce (chunks of 3 s here)."""
    cfg = tiny()
    torch.manual_seed(0)
    model = S.StepAudio(cfg).eval()
    tok = byte_tok()
    wav = 0.1 * np.random.default_rng(0).standard_normal(int(seconds * cfg.sample_rate)).astype(np.float32)
    b = S.collate([(wav, [("human", [("audio", len(wav))])])], tok, cfg, rt())
    chunks = S.chunk_lengths(len(wav), cfg)
    assert sum(chunks) == len(wav) and all(0 < c <= 3 * cfg.sample_rate for c in chunks)
    assert b["mel"].shape[0] == len(chunks) == int((b["ids"] == tok.audio_start).sum())
    feats = model.audio_features(b["mel"], b["n_mel"])    # chunks padded to one length in a batch
    for i, n in enumerate(chunks):                         # each chunk alone, unpadded: the same features
        alone = model.audio_features(b["mel"][i:i + 1, :, :S.mel_frames(n, cfg)], b["n_mel"][i:i + 1])
        assert alone[0].shape[0] == S.audio_tokens(n, cfg) == feats[i].shape[0]
        torch.testing.assert_close(feats[i], alone[0], atol=1e-5, rtol=1e-4)
    assert int((b["ids"] == tok.patch).sum()) == sum(S.audio_tokens(n, cfg) for n in chunks)
    model(b["ids"], b["mel"], b["n_mel"], tok.patch)       # the features fill the placeholders exactly


def official_compute_token_num(n_mel):
    """Transcribed from Step-Audio2's utils.compute_token_num: the mel counted two frames shorter, conv2 (+1)//2,
    the pooler //2, then the adaptor's k3 s2 p1 conv."""
    enc = (n_mel - 2 + 1) // 2 // 2
    return (enc + 2 * 1 - 3) // 2 + 1


def test_placeholder_count_is_the_official_compute_token_num_at_many_lengths():
    """1.05 s: 107 mel frames -> 13 placeholders (the encoder formula on all 107 frames would give 14)."""
    cfg = S.Config()
    assert S.mel_frames(16800, cfg) == 107 and S.audio_tokens(16800, cfg) == 13
    for n in list(range(160, 400000, 997)) + [400000]:
        assert S.audio_tokens(n, cfg) == official_compute_token_num((n + 479) // 160), n


def test_placeholder_count_at_the_official_front_end():
    """25 s chunks at 16 kHz with 479 samples of padding: 2502 mel frames -> 1251 -> 625 (25 Hz) -> 313 (12.5 Hz)."""
    cfg = S.Config()
    assert S.mel_frames(25 * 16000, cfg) == 2502 and S.audio_tokens(25 * 16000, cfg) == 313
    assert S.chunk_lengths(60 * 16000, cfg) == [400000, 400000, 160000]
    assert S.audio_tokens(160000, cfg) == 125
    mel = common.log_mel_spectrogram(torch.zeros(16000), 128, 479)
    assert mel.shape[-1] == S.mel_frames(16000, cfg)


# ----------------------------------------------------------------------------- the LLM

def test_gqa_matches_a_per_head_reference():
    cfg = tiny(n_embd=32, n_head=4, n_kv_head=2)
    torch.manual_seed(1)
    att = S.Attention(cfg)
    x = torch.randn(2, 7, 32)
    pos = torch.arange(7)
    y = att(x, pos)
    dh, rep = 8, 2
    q = att.q_proj(x).view(2, 7, 4, dh)
    k = att.k_proj(x).view(2, 7, 2, dh)
    v = att.v_proj(x).view(2, 7, 2, dh)
    heads = []
    for h in range(4):  # query head h reads key/value head h // rep (Qwen2's repeat_kv)
        qh, kh = S.rope(q[:, :, h].unsqueeze(1), pos, cfg.rope_theta)[:, 0], S.rope(k[:, :, h // rep].unsqueeze(1), pos, cfg.rope_theta)[:, 0]
        s = qh @ kh.transpose(1, 2) / dh ** 0.5 + torch.full((7, 7), float("-inf")).triu(1)
        heads.append(s.softmax(-1) @ v[:, :, h // rep])
    ref = att.o_proj(torch.cat(heads, -1))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_rope_rotates_half_pairs():
    x = torch.zeros(1, 1, 1, 4)
    x[..., 0] = 1.0                                        # dimension 0 pairs with dimension 2 (rotate-half)
    y = S.rope(x, torch.tensor([1]), 10000.0)
    assert y[..., 0].item() == pytest.approx(np.cos(1.0)) and y[..., 2].item() == pytest.approx(np.sin(1.0))
    assert y[..., 1].item() == 0 and y[..., 3].item() == 0


def test_kv_cache_decoding_equals_the_full_forward_and_is_causal():
    cfg = tiny()
    torch.manual_seed(2)
    llm = S.LLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        full = llm(llm.embed_tokens(ids))
        cache = S.KVCache(cfg, 1, 12, "cpu", torch.float32)
        steps = [llm(llm.embed_tokens(ids[:, :5]), 0, cache)]
        for t in range(5, 12):
            steps.append(llm(llm.embed_tokens(ids[:, t:t + 1]), cache.length, cache))
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
        ids2 = ids.clone()
        ids2[0, 8] = (ids[0, 8] + 1) % cfg.vocab_size      # a future token must not move the past
        out2 = llm(llm.embed_tokens(ids2))
        torch.testing.assert_close(out2[:, :8], full[:, :8])
        assert not torch.allclose(out2[:, 8:], full[:, 8:])


def test_mini_preset_has_the_official_shapes():
    cfg = S.Config(**S.PRESETS["mini"])
    with torch.device("meta"):
        m = S.StepAudio(cfg)
    n = lambda mod: sum(p.numel() for p in mod.parameters())
    # Qwen2.5-7B with Step-Audio 2's vocabulary, written out from its config (q/k/v with bias, o without, untied)
    d, f, L, kv, V = 3584, 18944, 28, 512, 158720
    layer = (d * d + d) + 2 * (d * kv + kv) + d * d + 3 * d * f + 2 * d
    assert n(m.model) == 2 * V * d + L * layer + d == 7_663_326_720
    assert 2 * 152064 * d + L * layer + d == 7_615_616_512   # with Qwen's own vocabulary: Qwen2.5-7B's published count
    # a Whisper-large-v3-sized encoder with a learned positional table; the adaptor into 3584
    e = 1280
    block = 4 * e * e + 3 * e + 2 * e + (e * 4 * e + 4 * e) + (4 * e * e + e) + 2 * e
    assert n(m.encoder) == 128 * e * 3 + e + e * e * 3 + e + 1500 * e + 32 * block + 2 * e == 636_968_960
    assert n(m.adapter) == e * e * 3 + e + e * 2048 + 2048 + 2048 * d + d == 14_883_584


# ----------------------------------------------------------------------------- chat format, loss and tools

def test_loss_is_masked_to_the_assistant_turns():
    cfg, tok = tiny(), byte_tok()
    turns = [("system", "tools: none"), ("human", [("audio", 8000), "hi"]), ("assistant", "ok"), ("tool", "x"),
             ("assistant", "yes")]
    ids, labels = S.render(turns, tok, cfg)
    assert len(ids) == len(labels)
    kept = [t for t, l in zip(ids, labels) if l != -100]
    assert kept == tok.encode("ok") + [tok.eot] + tok.encode("yes") + [tok.eot]
    assert all(l == -100 for t, l in zip(ids, labels) if t in (tok.patch, tok.audio_start, tok.bot))
    logits = torch.randn(1, len(ids), tok.n_vocab)
    lab = torch.tensor([labels])
    # independent: mean of -log p(next token) over the positions whose next token is an assistant token
    logp = logits.log_softmax(-1)[0]
    nll = [-logp[t, labels[t + 1]] for t in range(len(ids) - 1) if labels[t + 1] != -100]
    assert S.lm_loss(logits, lab).item() == pytest.approx(torch.stack(nll).mean().item(), rel=1e-6)
    # training computes the head at the trained positions alone: (K, V) logits, the same loss
    keep = S.trained(lab)
    assert keep.sum() == len(nll)
    assert S.lm_loss(logits[keep], lab).item() == pytest.approx(torch.stack(nll).mean().item(), rel=1e-6)
    p_ids, p_labels = S.render(turns[:2], tok, cfg, generate=True)
    assert p_ids[-len(tok.encode("assistant\n")) - 1:] == [tok.bot] + tok.encode("assistant\n")


def test_calculator_and_the_tool_loop(monkeypatch):
    assert S.words_to_number("one hundred and forty four") == 144 and S.words_to_number("banana") is None
    assert S.calculator("seven times eight") == "fifty six" and S.calculator("twelve minus five") == "seven"
    assert S.calculator("three over four") == "error"
    assert S.arithmetic("what is three plus four") == "three plus four" and S.arithmetic("what color is the sky") is None
    tok, cfg = byte_tok(), tiny()
    seen = []
    script = [[tok.call] + tok.encode("seven times eight") + [tok.end_call], tok.encode("seven times eight is fifty six")]

    def fake_generate(model, tok_, turns, wav, cfg_, rt_):
        seen.append(turns)
        return script[len(seen) - 1]
    monkeypatch.setattr(S, "generate", fake_generate)
    text, call = S.respond(None, tok, [("system", "tools: calculator"), ("human", "q")], None, cfg, rt())
    assert call == "seven times eight" and text == "seven times eight is fifty six"
    assert seen[1][-2:] == [("assistant", "<tool_call>seven times eight</tool_call>"), ("tool", "fifty six")]
    seen.clear()
    text, call = S.respond(None, tok, [("human", "q")], None, cfg, rt(), tools=False)
    assert call is None and len(seen) == 1  # without tools the call is not executed


def test_a_spoken_answer_may_call_the_calculator_first(monkeypatch):
    """speak(tools=True): a text reply that is a call is run, and the call and its result sit before the spoken run;
    a reply that is not a call is dropped and the spoken run follows the question directly."""
    tok, cfg = byte_tok(), tiny()
    seen = []
    call = [tok.call] + tok.encode("seven times eight") + [tok.end_call]
    run = S.interleave(tok.encode("s"), [], tok, cfg.interleave)          # no speech tokens: no detokenizer

    def fake_generate(model, tok_, turns, wav, cfg_, rt_, speech=False):
        seen.append((turns, speech))
        return run if speech else script
    monkeypatch.setattr(S, "generate", fake_generate)
    q = [("system", "tools: calculator"), ("human", "q")]
    for script, extra in ((call, [("assistant", "<tool_call>seven times eight</tool_call>"), ("tool", "fifty six")]),
                          (tok.encode("fifty"), [])):
        seen.clear()
        r = S.speak(None, tok, q, None, cfg, rt(), tools=True)
        assert [s for _, s in seen] == [False, True] and seen[1][0] == q + extra and r["turns"] == q + extra
        assert r["text"] == "s" and r["run"] == run
    seen.clear()
    assert S.speak(None, tok, q, None, cfg, rt())["turns"] == q and [s for _, s in seen] == [True]


def test_tool_drills_need_the_tool_and_never_ask_a_held_out_question():
    """The drills' operands (1-99) are too many to memorise, and never a val/test bank question; the answer is the
    call and the calculator's result; the text stage and SFT both draw them."""
    rng = np.random.default_rng(0)
    held = {q for sp in ("val", "test") for q, _ in S.bank_split(sp)[0]}
    drills = [S.tool_drill(rng) for _ in range(2000)]
    sizes = set()
    for d in drills:
        (_, system), (_, q), (_, made), (_, result), (_, answer) = d
        call = S.arithmetic(q)
        assert system == "tools: calculator" and q not in held and made == f"<tool_call>{call}</tool_call>"
        assert result == S.calculator(call) != "error" and answer == f"{call} is {result}"
        a, op, b = re.fullmatch(r"(.+) (plus|minus|times) (.+)", call).groups()
        a, b = S.words_to_number(a), S.words_to_number(b)
        assert (op != "minus" or a >= b) and (op != "times" or b <= 12) and max(a, b) < 100
        sizes.add((a > 12, b > 12))
    assert len({d[1][1] for d in drills}) > 1500 and sizes == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert {re.search(r" (plus|minus|times) ", d[1][1]).group(1) for d in drills} == {"plus", "minus", "times"}


def test_spoken_answers_are_trained_with_and_without_the_calculator():
    """A spoken answer's example: at tool_frac, the calculator offered, and for arithmetic the call and its result
    before the interleaved run; otherwise the run follows the question (the qa examples likewise)."""
    tasks, rng = S.Tasks(tiny(), "train"), np.random.default_rng(0)
    i = next(k for k, x in enumerate(tasks.spoken) if S.arithmetic(x[1]))
    call = S.arithmetic(tasks.spoken[i][1])
    for frac, task in ((1.0, "speak"), (1.0, "speak_followup"), (1.0, "qa"), (0.0, "speak")):
        j = i if task != "qa" else next(k for k, x in enumerate(tasks.questions) if x is tasks.spoken[i])
        _, turns, _ = tasks.example(task, j, rng, tiny(tool_frac=frac), speak=lambda text, wav: [7])
        roles = [r for r, _ in turns]
        if frac:
            assert turns[0] == ("system", "tools: calculator") and roles[:5] == ["system", "human", "assistant",
                                                                                   "tool", "assistant"]
            assert turns[2][1] == f"<tool_call>{call}</tool_call>" and turns[3][1] == S.calculator(call)
        else:
            assert turns[0] == ("system", "tools: none") and roles[:3] == ["system", "human", "assistant"]
        assert (turns[4 if frac else 2][1] == [("ids", [7])]) == task.startswith("speak")


def test_sft_offers_the_calculator_with_every_question_by_default():
    """The default tool_frac is 1: a bank question asked without the calculator can only be answered from
    memory, and that memory then overrode the tool's result after spoken questions."""
    assert S.Config().tool_frac == 1.0 and "tool_frac" not in S.PRESETS["small"]
    tasks, rng = S.Tasks(tiny(), "train"), np.random.default_rng(0)
    for task in ("qa", "speak", "speak_followup"):
        for j in range(12):
            _, turns, _ = tasks.example(task, j, rng, tiny(), speak=lambda text, wav: [7])
            assert turns[0] == ("system", "tools: calculator"), (task, j)


def test_the_text_stage_and_sft_draw_tool_drills(monkeypatch):
    cfg = tiny(batch_size=2000)
    fake = SimpleNamespace(texts=["hi"], questions=[(None, "what color is grass", "grass is green", None)],
                           speech=[(None, "hi", None)], speakers=[0], spoken=[], has_voices=False,
                           example=lambda task, i, rng, cfg, speak=None: (None, [("human", task)], None))
    monkeypatch.setattr(S, "collate", lambda ex, tok, cfg, rt, cache=None: {"ex": ex})
    sampler = S.Sampler(fake, byte_tok(cfg), cfg)
    for stage, share in (("llm", S.DRILL_FRAC), ("sft", 1 / 7)):   # sft: asr, tts x2, qa x2, followup, drill
        ex = sampler.next(stage, rt())["ex"]
        drills = [t for _, t in ex if t[0] == ("system", "tools: calculator") and t[2][1].startswith("<tool_call>")]
        assert abs(len(drills) / len(ex) - share) < 0.03 and all(w is None for w, _ in ex)


def test_tokenizer_stage_trains_on_the_frozen_encoders_frames():
    """The sampler keeps each clip's encoder frames from the tokenizer stage on: its batch must hold what the
    encoder gives on the padded mel batch at the real frames (zeros past them), and codes_of what
    speech_codes gives on the clip."""
    cfg = tiny(batch_size=6)
    rng = np.random.default_rng(2)
    wavs = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (5000, 9000, 14000)]
    fake = SimpleNamespace(texts=[], questions=[], spoken=[], has_voices=False, speakers=[0, 0, 0],
                           speech=[(w, t, None) for w, t in zip(wavs, ("ab", "c d", "efg"))])
    torch.manual_seed(0)
    model = S.StepAudio(cfg).eval()
    sampler = S.Sampler(fake, byte_tok(cfg), cfg)
    sampler.model = model
    b = sampler.next("tokenizer", rt())
    assert "mel" not in b and not b["h"].requires_grad
    ids = [int(np.argmin([abs(int(n) - sampler.mel_of(w).shape[-1]) for w in wavs])) for n in b["n_mel"]]
    assert ids != ids[::-1] and len(set(ids)) > 1         # an order mix-up would show
    mels = [sampler.mel_of(wavs[i]) for i in ids]
    T = max(m.shape[-1] for m in mels)
    with torch.no_grad():
        h = model.encoder(torch.stack([F.pad(m, (0, T - m.shape[-1])) for m in mels]), b["n_mel"])
    for k, n in enumerate(b["n_mel"]):
        f = S.encoder_frames(int(n))
        torch.testing.assert_close(b["h"][k, :f], h[k, :f], atol=1e-5, rtol=1e-4)
        assert not b["h"][k, f:].any()
    assert b["chars"].tolist() == [S.CHARS.index(c) + 1 for i in ids for c in ("ab", "c d", "efg")[i]]
    for w in wavs:
        m = sampler.mel_of(w)
        assert sampler.codes_of(w) == model.speech_codes(m[None], torch.tensor([m.shape[-1]]))[0].tolist()


def test_voice_attributes_come_from_the_voices():
    assert S.voice_attributes(1) == dict(gender="female", pitch="high", rate="fast")        # en-us+f3, 65, 170
    assert S.voice_attributes(7) == dict(gender="male", pitch="low", rate="slow")           # en+m1, 30, 150


# ----------------------------------------------------------------------------- training

def test_stage_schedule_and_what_each_stage_trains():
    """--stage=speech: encoder, tokenizer, flow, then the vocoder to max_iters; --stage=llm: text LLM, adaptor,
    then SFT to llm_max_iters (0: max_iters)."""
    sp = tiny(stage_iters=(2, 3, 1, 1, 2), max_iters=8, llm_max_iters=6)
    assert [S.stage_at(s, sp) for s in range(8)] == ["encoder"] * 3 + ["tokenizer"] + ["flow"] * 2 + ["vocoder"] * 2
    assert S.run_iters(sp) == 8 and S.run_iters(dataclasses.replace(sp, llm_max_iters=0, stage="llm")) == 8
    cfg = dataclasses.replace(sp, stage="llm")
    assert S.run_iters(cfg) == 6 and [S.stage_at(s, cfg) for s in range(6)] == ["llm"] * 2 + ["adaptor"] + ["sft"] * 3
    assert S.stage_at(0, tiny(stage_iters=(0, 0, 0, 0, 0))) == "vocoder"    # a stage of 0 steps is skipped
    m = S.StepAudio(cfg)
    ids = lambda *mods: {id(p) for mod in mods for p in mod.parameters()}
    assert S.trainable("llm", m) == ids(m.model)
    assert S.trainable("encoder", m) == ids(m.encoder, m.ctc_head)
    assert S.trainable("adaptor", m) == ids(m.adapter)
    assert S.trainable("sft", m) == ids(m.adapter, m.model)
    assert S.trainable("tokenizer", m) == ids(m.speech_tokenizer)
    assert S.trainable("flow", m) == ids(m.flow) and S.trainable("vocoder", m) == ids(m.vocoder)
    f = S.lr_lambda(cfg)
    assert f(0) == pytest.approx(1 / cfg.warmup_iters) and f(2) == pytest.approx(1 / cfg.warmup_iters)  # warm-up per stage
    k = S.lr_lambda(tiny(stage="llm", stage_iters=(2, 0, 3, 0, 0), llm_max_iters=8, warmup_iters=1))
    assert [k(s) for s in range(5)] == [1.0] * 5          # the text LLM and the adaptor do not decay (SFT trains on)
    for step in (3, 4, 5):                     # SFT (from step 3 of 6): warm-up times a cosine from 1 to 0.1
        warm, frac = min(1.0, (step - 2) / cfg.warmup_iters), (step - 3) / 3
        assert f(step) == pytest.approx(warm * (0.1 + 0.45 * (1 + math.cos(math.pi * frac))))
    g = S.lr_lambda(dataclasses.replace(cfg, warmup_iters=1))
    assert g(6) == pytest.approx(0.1) and g(2) == 1.0
    h = S.lr_lambda(dataclasses.replace(sp, warmup_iters=4))   # the speech stages: warm-up times a cosine each
    c = lambda frac: 0.1 + 0.45 * (1 + math.cos(math.pi * frac))   # encoder 3, tokenizer 1, flow 2, vocoder 2
    assert [h(s) for s in range(8)] == pytest.approx([0.25, 0.5 * c(1 / 3), 0.75 * c(2 / 3), 0.25,
                                                      0.25, 0.5 * c(1 / 2), 0.25, 0.5 * c(1 / 2)])


@pytest.mark.parametrize("stage", ["sft", "adaptor", "encoder"])
def test_golden_step(stage):
    """One real train_step (SGD) against an independent transcription: the loss, and w - lr * grad for exactly
    the stage's parameters (clipped norm), every other parameter untouched."""
    cfg = tiny(grad_clip=1e9)
    tok = byte_tok()
    cfg.vocab_size = tok.n_vocab
    torch.manual_seed(3)
    state = S.build(cfg, rt())
    model = state["model"]
    model.tok = tok
    state["opt"] = torch.optim.SGD(model.parameters(), lr=0.1)
    state["sched"] = torch.optim.lr_scheduler.LambdaLR(state["opt"], lambda s: 1.0)
    rng = np.random.default_rng(0)
    wav = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (9000, 14000)]
    if stage == "encoder":
        mel = [S.log_mel(w, cfg) for w in wav]
        T = max(m.shape[-1] for m in mel)
        batch = dict(stage=stage, mel=torch.stack([F.pad(m, (0, T - m.shape[-1])) for m in mel]),
                     n_mel=torch.tensor([m.shape[-1] for m in mel]), chars=torch.tensor([3, 4, 5, 1, 2]),
                     n_chars=torch.tensor([3, 2]))
    else:
        ex = [(w, [("human", [("audio", len(w)), "hi"]), ("assistant", "ab")]) for w in wav]
        batch = dict(S.collate(ex, tok, cfg, rt()), stage=stage)
    before = copy.deepcopy(model)
    ref = copy.deepcopy(model)
    if stage == "encoder":  # CTC over the 25 Hz encoder frames, written with torch's ctc_loss directly
        h = ref.ctc_head(ref.encoder(batch["mel"], batch["n_mel"]))
        n_out = torch.tensor([((int(n) - 1) // 2 + 1) // 2 for n in batch["n_mel"]])
        loss = F.ctc_loss(h.log_softmax(-1).transpose(0, 1), batch["chars"], n_out, batch["n_chars"],
                          zero_infinity=True)
        trained = {"encoder", "ctc_head"}
    else:                   # next-token NLL over assistant tokens, the audio features in the placeholders
        with torch.no_grad():
            enc = ref.encoder(batch["mel"], batch["n_mel"])
        for i, n in enumerate(batch["n_mel"]):             # a chunk's padding frames read as zeros
            enc[i, ((int(n) - 1) // 2 + 1) // 2:] = 0
        a = ref.adapter(enc)
        feats = torch.cat([a[i, :official_compute_token_num((len(w) + 479) // 160)] for i, w in enumerate(wav)])
        x = ref.model.embed_tokens(batch["ids"]).clone()
        x[batch["ids"] == tok.patch] = feats
        logp = ref.model(x).log_softmax(-1)
        lab = batch["labels"]
        terms = [-logp[b, t, lab[b, t + 1]] for b in range(lab.shape[0]) for t in range(lab.shape[1] - 1)
                 if lab[b, t + 1] != -100]
        loss = torch.stack(terms).mean()
        trained = {"adapter"} if stage == "adaptor" else {"adapter", "model"}
    loss.backward()
    out = S.train_step(state, batch, cfg, rt())
    assert out[stage].item() == pytest.approx(loss.item(), rel=1e-5)
    for (name, p), (_, p0), (_, pr) in zip(model.named_parameters(), before.named_parameters(), ref.named_parameters()):
        if name.split(".")[0] in trained and pr.grad is not None:
            torch.testing.assert_close(p, p0 - 0.1 * pr.grad, atol=1e-6, rtol=1e-5, msg=name)
        else:
            assert torch.equal(p, p0), f"{name} moved in the {stage} stage"


# ----------------------------------------------------------------------------- command line

def test_cli_contract(tmp_path):
    """Both stages keep the contract: --stage=speech (resynthesis samples and eval), then --stage=llm on its
    checkpoint (--speech)."""
    bench_keys = ("prefill_ms", "decode_tokens_per_s", "time_to_first_audio_ms", "spoken_rtf")
    sp = check_cli_contract("step_audio.py", tmp_path / "speech", flags=("--stage_iters=0,1,0,1,1",),
                            bench_keys=bench_keys)
    assert "encoder 1 steps, tokenizer 1 steps, flow 1 steps, vocoder 0 steps" in sp["train"]
    assert "vocoder" in sp["resume"] and "resynthesis of speech0" in sp["sample"]
    line = next(l for l in sp["eval"].splitlines() if l.startswith("eval ("))   # no LLM yet: the speech side
    assert "resynth_mel_dist" in line and "tokenizer_ctc_wer" in line and "| wer" not in line
    # one step of each: SFT's first step has the same lr whatever max_iters (its cosine starts at 1)
    out = check_cli_contract("step_audio.py", tmp_path, flags=("--stage_iters=1,0,1,0,0", "--stage=llm",
                             f"--speech={tmp_path / 'speech' / 'run' / 'ckpt.pt'}"), bench_keys=bench_keys)
    assert "llm 1 steps, adaptor 1 steps, sft 1 steps" in out["train"] and "(its speech stage)" in out["train"]
    # the llm stage starts from the speech checkpoint and leaves its parts as they were
    sp_w, llm_w = (torch.load(p / "run" / "ckpt.pt", weights_only=True)["models"]["model"]
                   for p in (tmp_path / "speech", tmp_path))
    speech_side = [k for k in sp_w if k.split(".")[0] in ("encoder", "ctc_head", "speech_tokenizer", "flow",
                                                            "vocoder", "answer_voice")]
    assert len(speech_side) > 20 and all(torch.equal(sp_w[k], llm_w[k]) for k in speech_side)
    assert not torch.equal(sp_w["model.norm.weight"], llm_w["model.norm.weight"])
    assert "sft" in out["resume"] and "assistant:" in out["sample"] and "assistant (spoken" in out["sample"]
    assert "what was my question" in out["sample"]
    for key in ("wer", "qa_acc", "followup_acc", "speak_text_acc", "resynth_mel_dist", "tokenizer_ctc_wer"):
        assert key in out["eval"]
    assert list((tmp_path / "run").rglob("answer000.wav")) or list(tmp_path.rglob("answer000.wav"))
    # the resyntheses and their originals: the same names and intended texts, for a separate ASR's WER of each
    # and the vocoder alone from the true mel (resynthesis's ceiling)
    resyn, orig, voc = (next(tmp_path.rglob(f"eval_test/{d}")) for d in ("resynth", "original", "vocoded"))
    for d in (resyn, voc):
        assert (d / "refs.txt").read_text() == (orig / "refs.txt").read_text() != ""
        assert sorted(p.name for p in d.glob("*.wav")) == sorted(p.name for p in orig.glob("*.wav")) != []
        assert all((d / p.name).read_bytes() != p.read_bytes() for p in orig.glob("*.wav"))  # not the same audio
    assert all((voc / p.name).read_bytes() != p.read_bytes() for p in resyn.glob("*.wav"))


def test_bad_flags_give_one_line(tmp_path):
    assert "shorter than the encoder, tokenizer, flow stages" in error_of("step_audio.py", "--preset=tiny",
                                                                         "--max_iters=1")
    assert "not one (train it with" in error_of("step_audio.py", "--preset=tiny", "--stage=llm",
                                                f"--speech={tmp_path}/none.pt")
    assert "does not exist" in error_of("step_audio.py", "--mode=sample", f"--init_from={tmp_path}/none.pt")
    assert "--input" in error_of("step_audio.py", "--preset=tiny", "--mode=sample", "--input=/no/such.wav")
    # the rest of validate() in-process (parse_config prints its SystemExit as the one error line, as above)
    for flag, kw in (("--stage_iters", dict(stage_iters=(1, 2))), ("--fsq_levels", dict(fsq_levels=(4, 3))),
                     ("--interleave", dict(interleave=(0, 4))), ("--voc_upsample", dict(voc_upsample=(4, 4))),
                     ("--followup", dict(mode="sample", followup="/no/such.wav")),
                     ("--followup", dict(mode="sample", followup=str(tmp_path / "q.wav")))):
        if kw.get("followup", "").endswith("q.wav"):
            common.save_audio(kw["followup"], np.zeros(1600, np.float32), 16000)   # exists, but no --input
        with pytest.raises(SystemExit, match=flag.replace("-", r"\-")):
            S.Config(**{**S.PRESETS["tiny"], **kw}).validate()
    with pytest.raises(SystemExit, match="before the iSTFT vocoder"):  # the old vocoder's upsampling
        S.Config(**{**S.PRESETS["tiny"], "voc_upsample": (5, 4, 4, 2)}).validate()
    for flag, kw in (("--flow_cfg_drop", dict(flow_cfg_drop=1.0)), ("--flow_cfg", dict(flow_cfg=-1.0))):
        with pytest.raises(SystemExit, match=flag.replace("-", r"\-")):
            S.Config(**{**S.PRESETS["tiny"], **kw}).validate()


# ----------------------------------------------------------------------------- held-out question bank

def test_question_bank_holds_out_questions_and_the_test_voice():
    splits = {sp: S.bank_split(sp) for sp in ("train", "val", "test")}
    arith = {sp: {q for q, _ in splits[sp][0]} for sp in splits}
    assert not arith["train"] & arith["test"] and not arith["train"] & arith["val"] and not arith["val"] & arith["test"]
    assert len(arith["test"]) >= 60 and len(arith["train"]) >= 200
    assert S.held_out_questions() == arith["val"] | arith["test"]
    for q, a in splits["test"][0]:                       # every answer is the calculator's
        assert a == f"{S.arithmetic(q)} is {S.calculator(S.arithmetic(q))}"
    cfg = tiny()
    tasks = S.Tasks(cfg, "train")                        # the dialogue corpus's questions: the held-out ones dropped
    assert not {q for _, q, _, _ in tasks.questions} & S.held_out_questions()
    assert not {c for chat in S.text_chats(tasks) for _, c in chat if isinstance(c, str)} & S.held_out_questions()
    assert tasks.spoken and all(w.dtype == np.float32 and len(aw) > 1600 for w, _, _, aw in tasks.spoken)


# ----------------------------------------------------------------------------- speech output

def test_fsq_round_trip_and_code_count():
    fsq = S.FSQ((3, 5, 3))
    assert fsq.n_codes == 45
    codes = torch.arange(45)
    dq = fsq.dequantize(codes)                           # (45, 3) in [-1, 1], each digit on its level's grid
    assert dq.abs().max() <= 1 and len({tuple(r) for r in dq.tolist()}) == 45
    torch.testing.assert_close(dq * fsq.half_width, (dq * fsq.half_width).round())
    z = torch.atanh(0.999 * dq)                          # a point that quantizes to each grid value
    q, c = fsq(z)
    assert torch.equal(c, codes) and torch.allclose(q, dq)
    z = torch.randn(500, 3).requires_grad_()
    q, c = fsq(z)
    assert c.min() >= 0 and c.max() < 45 and torch.equal(c, fsq(z.detach())[1])
    q.sum().backward()                                   # straight-through: the gradient of tanh, not of round
    assert (z.grad != 0).all()


@pytest.mark.parametrize("ratio", [(1, 4), (2, 3)])
def test_interleave_pattern_and_inverse(ratio):
    tok, (n, m) = byte_tok(), ratio
    for text, codes in ((tok.encode("hi there"), [3, 1, 4, 1, 5, 0, 2, 6, 5, 3, 5]), (tok.encode("a long text answer"), [7, 8])):
        run = S.interleave(text, codes, tok, ratio)
        groups = max(-(-len(text) // n), -(-len(codes) // m))
        assert run[0] == tok.tts_start and run[-1] == tok.tts_end and len(run) == 2 + groups * (n + m)
        for k, i in enumerate(run[1:-1]):                # each slot holds its kind, in the fixed pattern
            if k % (n + m) < n:
                assert S.slot_kind(k, ratio) == "text" and not tok.is_audio(i)
            else:
                assert S.slot_kind(k, ratio) == "audio" and tok.is_audio(i)
        for j, c in enumerate(codes):                    # the j-th speech token sits in group j // m
            assert run[1 + (j // m) * (n + m) + n + j % m] == tok.audio_base + c
        for j, t in enumerate(text):                     # the j-th text token in group j // n: text leads
            assert run[1 + (j // n) * (n + m) + j % n] == t
        assert S.deinterleave(run, tok) == (text, codes)
        assert tok.decode(run) == tok.decode(text)       # speech tokens are never decoded as text


def test_text_and_audio_token_ranges_never_overlap():
    cfg = tiny()
    ranks = common.train_bpe(["what is seven times eight", "the sky is blue"] * 3, 280)
    tok = S.Tokenizer(ranks, S.n_codes(cfg))
    text_ids = set(range(len(ranks))) | set(tok.ids.values())
    audio_ids = set(range(tok.audio_base, tok.audio_pad + 1))
    assert max(text_ids) < tok.audio_base and not text_ids & audio_ids and len(audio_ids) == tok.n_codes + 1
    assert tok.n_vocab == tok.audio_pad + 1 == len(text_ids) + tok.n_codes + 1
    assert all(i < tok.audio_base for i in tok.encode("what is seven times eight <tool_call>x</tool_call>"))
    run = S.interleave(tok.encode("the sky is blue"), list(range(tok.n_codes)), tok, cfg.interleave)
    assert tok.decode(run) == "the sky is blue" and tok.decode([tok.audio_base + 3, tok.audio_pad]) == ""
    masks = S.slot_masks(tok, "cpu")
    assert not (masks["text"] & masks["audio"]).any() and masks["audio"].sum() == tok.n_codes + 1
    assert masks["text"][tok.tts_end] and not masks["text"][tok.eot]


def test_spoken_generation_keeps_the_pattern_and_refeeds_as_ids():
    cfg = tiny(max_speech_tokens=23)
    tok = byte_tok(cfg)
    torch.manual_seed(4)
    model = S.StepAudio(cfg).eval()
    wav = 0.1 * np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    turns = [("system", "tools: none"), ("human", [("audio", len(wav))])]
    r = S.speak(model, tok, turns, wav, cfg, rt())
    run = r["run"]
    assert run[0] == tok.tts_start and run[-1] == tok.tts_end
    for k, i in enumerate(run[1:-1]):                    # random weights, yet every slot holds its kind
        assert tok.is_audio(i) == (S.slot_kind(k, cfg.interleave) == "audio")
    assert len(r["wav"]) == 640 * len(r["codes"]) and r["mel"].shape == (cfg.n_voc_mels, 4 * len(r["codes"]))
    ids, labels = S.render(turns + [("assistant", [("ids", run)])], tok, cfg)
    assert ids[-len(run) - 1:-1] == run and labels[-len(run) - 1:] == run + [tok.eot]  # the history holds the run


def test_flow_sampler_boundary_conditions():
    torch.manual_seed(5)
    x0, x1 = torch.randn(2, 12, 80), torch.randn(2, 12, 80)
    seen = []

    def perfect(x, t):                                   # the exact field of the straight path towards x1
        seen.append((x.clone(), t.clone()))
        return (x1 - x) / (1 - t[:, None, None])
    out = S.flow_sample(perfect, x0, 10)
    assert torch.equal(seen[0][0], x0) and (seen[0][1] == 0).all()   # t = 0: it starts from the noise
    want = [1 - math.cos(math.pi / 2 * i / 10) for i in range(10)]   # CosyVoice 2's cosine schedule
    torch.testing.assert_close(torch.stack([t[0] for _, t in seen]), torch.tensor(want))
    torch.testing.assert_close(out, x1, atol=1e-5, rtol=1e-5)       # t = 1: the data
    cfg = tiny()
    model = S.StepAudio(cfg).eval()
    mel, wav = model.detokenize(torch.tensor([1, 2, 3]), torch.zeros(cfg.n_voc_mels), cfg)
    assert mel.shape == (cfg.n_voc_mels, 12) and wav.shape == (12 * 160,)


def test_detokenizer_classifier_free_guidance():
    """A field that is its condition (mu + speaker) integrates to x0 + (1 + w) (mu + spk) - w * 0 under
    guidance w; without the unconditional field (flow_cfg_drop 0) or with w = 0, to x0 + mu + spk."""
    cfg = tiny()
    model = S.StepAudio(cfg).eval()
    model.flow.velocity = lambda x, t, mu, spk, mask=None: (mu + spk[:, None]).expand_as(x)
    codes, spk_mel = torch.tensor([1, 2, 3]), torch.randn(cfg.n_voc_mels)
    mu, sp = model.flow.cond(codes[None], (spk_mel[None] - S.MEL_MEAN) / S.MEL_STD)
    x0 = torch.randn(1, 12, cfg.n_voc_mels)
    for w, drop, gain in ((0.7, 0.2, 1.7), (0.0, 0.2, 1.0), (0.7, 0.0, 1.0)):
        cfg.flow_cfg, cfg.flow_cfg_drop = w, drop
        mel, _ = model.detokenize(codes, spk_mel, cfg, x0)
        want = (x0 + gain * (mu + sp[:, None]))[0].T * S.MEL_STD + S.MEL_MEAN
        torch.testing.assert_close(mel, want, atol=1e-4, rtol=1e-4)


def test_flow_reads_a_token_as_its_fsq_digits():
    """The flow's token encoder sees a code as its mixed-radix digits in [-1, 1] (first level least
    significant, as FSQ writes them), transcribed here by hand; the digits carry no parameters."""
    cfg = tiny()
    cfg.fsq_levels = (3, 5, 3)
    torch.manual_seed(0)
    flow = S.Flow(cfg)
    torch.nn.init.zeros_(flow.token_conv.weight), torch.nn.init.zeros_(flow.token_conv.bias)  # h = embed
    codes = torch.tensor([[0, 1, 3, 44, 23]])
    digits = []
    for c in codes[0].tolist():
        d0, d1, d2 = c % 3, (c // 3) % 5, c // 15
        digits.append([(d0 - 1) / 1, (d1 - 2) / 2, (d2 - 1) / 1])
    want = flow.mu(flow.embed(torch.tensor([digits]))).repeat_interleave(4, dim=1)
    mu, _ = flow.cond(codes, torch.zeros(1, cfg.n_voc_mels))
    torch.testing.assert_close(mu, want)
    assert flow.embed.in_features == 3 and not any("fsq" in k for k in flow.state_dict())


def test_vocoder_output_length_and_voc_mel_rate():
    cfg = tiny()
    voc = S.Vocoder(cfg)
    assert voc(torch.randn(2, cfg.n_voc_mels, 7)).shape == (2, 7 * 160)
    assert S.voc_mel(torch.zeros(6400), cfg).shape == (cfg.n_voc_mels, 40)
    n = 32000                                            # 4 mel frames per speech token (25 Hz vs 100 Hz)
    assert S.encoder_frames(S.mel_frames(n, cfg)) * 4 == S.voc_mel(torch.zeros(n), cfg).shape[-1]


def test_vocoder_istft_head_is_hifts():
    """HiFT's head, transcribed: the last conv gives 9 log-magnitudes and 9 phase pre-activations per
    4000 Hz frame; magnitude exp(.) (at most 100), phase sin(.); each frame's 16-point inverse real FFT,
    Hann-windowed, overlap-added at hop 4, divided by the overlapped squared window, 8 samples trimmed."""
    cfg = tiny(voc_channels=64)                           # 8 channels at 4000 Hz (tiny's 2 were all > 0)
    torch.manual_seed(0)
    voc = S.Vocoder(cfg)
    got = {}

    def spike(m, i, o):                                   # one log-magnitude past log(100): the clamp must bite
        o = o.clone()
        o[:, 0, 100] += 6.0
        got.update(x=o.detach(), inp=i[0].detach())
        return o
    voc.conv_post.register_forward_hook(spike)
    voc.res[-1].register_forward_hook(lambda m, i, o: got.update(r=o.detach()))
    wav = voc(torch.randn(2, cfg.n_voc_mels, 5))          # (2, 800)
    r = F.leaky_relu(got["r"])                            # HiFT: leaky ReLU (slope 0.01), one frame reflected left
    torch.testing.assert_close(got["inp"], torch.cat([r[..., 1:2], r], -1))
    x = got["x"].double()                                 # (2, 18, 201): 40 frames a mel frame, one more
    mag, ph = x[:, :9].exp().clamp(max=100), torch.sin(x[:, 9:])
    assert mag.max() == 100
    frames = torch.fft.irfft(torch.complex(mag * torch.cos(ph), mag * torch.sin(ph)), n=16, dim=1)
    win = torch.hann_window(16, dtype=torch.float64)
    n = x.shape[-1]
    y, env = torch.zeros(2, 16 + 4 * (n - 1), dtype=torch.float64), torch.zeros(16 + 4 * (n - 1)).double()
    for t in range(n):
        y[:, 4 * t:4 * t + 16] += frames[:, :, t] * win
        env[4 * t:4 * t + 16] += win ** 2
    want = (y / env)[:, 8:8 + 4 * (n - 1)].clamp(-0.99, 0.99)
    assert want.shape == wav.shape and want.abs().max() > 0.01
    torch.testing.assert_close(wav.double(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("stage", ["tokenizer", "flow", "vocoder"])
def test_golden_step_speech(stage):
    """One real train_step (SGD) of each speech stage against an independent transcription of its objective:
    CTC through FSQ (tanh bound, rounding with a straight-through gradient) on the frozen encoder; the OT-CFM
    loss (x_t = (1 - (1 - s) t) x0 + t x1, target x1 - (1 - s) x0, masked MSE); the vocoder's mel L1 plus
    multi-resolution spectral convergence and log-STFT L1. Only the stage's parameters move."""
    cfg = tiny(grad_clip=1e9)
    tok = byte_tok(cfg)
    torch.manual_seed(6)
    state = S.build(cfg, rt())
    model = state["model"]
    model.tok = tok
    state["opt"] = torch.optim.SGD(model.parameters(), lr=0.1)
    state["sched"] = torch.optim.lr_scheduler.LambdaLR(state["opt"], lambda s: 1.0)
    rng = np.random.default_rng(1)
    wav = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (9000, 14000)]
    before, ref = copy.deepcopy(model), copy.deepcopy(model)
    if stage == "tokenizer":
        mel = [S.log_mel(w, cfg) for w in wav]
        T = max(m.shape[-1] for m in mel)
        n_mel = torch.tensor([m.shape[-1] for m in mel])
        with torch.no_grad():
            h = ref.encoder(torch.stack([F.pad(m, (0, T - m.shape[-1])) for m in mel]), n_mel)
        batch = dict(stage=stage, h=h, n_mel=n_mel, chars=torch.tensor([3, 4, 5, 1, 2]), n_chars=torch.tensor([3, 2]))
        st = ref.speech_tokenizer
        half = torch.tensor([(l - 1) / 2 for l in cfg.fsq_levels])
        b = torch.tanh(st.down(h)) * half
        q = (b + (b.round() - b).detach()) / half
        n_out = torch.tensor([((int(n) - 1) // 2 + 1) // 2 for n in batch["n_mel"]])
        valid = torch.arange(h.shape[1])[None] < n_out[:, None]
        logits = st.ctc_head(st.block(st.up(q), valid[:, None, None, :]))
        loss = F.ctc_loss(logits.log_softmax(-1).transpose(0, 1), batch["chars"], n_out, batch["n_chars"],
                          zero_infinity=True)
    elif stage == "flow":
        codes = torch.tensor([[1, 2, 3], [4, 5, 0]])
        x1, spk = torch.randn(2, 12, cfg.n_voc_mels), torch.randn(2, cfg.n_voc_mels)
        mask = torch.tensor([[True] * 12, [True] * 8 + [False] * 4])
        batch = dict(stage=stage, codes=codes, x1=x1, spk=spk, mask=mask)
        cfg.flow_cfg_drop = 0.5
        torch.manual_seed(8)                              # the same t, x0 and drops as train_step draws
        t = 1 - torch.cos(math.pi / 2 * torch.rand(2))    # the cosine schedule
        x0 = torch.randn_like(x1)
        keep = torch.rand(2) >= 0.5
        assert keep.tolist() == [True, False]             # one example keeps its condition, one loses it
        s = cfg.sigma_min
        xt = (1 - (1 - s) * t[:, None, None]) * x0 + t[:, None, None] * x1
        mu, sp = ref.flow.cond(codes, spk)
        mu, sp = torch.where(keep[:, None, None], mu, 0.0), torch.where(keep[:, None], sp, 0.0)
        v = ref.flow.velocity(xt, t, mu, sp, mask[:, None, None, :])
        err = ((v - (x1 - (1 - s) * x0)) ** 2).mean(-1)  # (B, T)
        loss = err[mask].mean()
        torch.manual_seed(8)
    else:
        w = torch.from_numpy(np.stack([wav[0][:1600], wav[1][:1600]]))
        batch = dict(stage=stage, wav=w, mel=S.voc_mel(w, cfg))
        out = ref.vocoder(batch["mel"])
        loss = F.l1_loss(S.voc_mel(out, cfg), S.voc_mel(w, cfg))
        for n_fft, hop in ((512, 128), (1024, 256), (256, 64)):
            win = torch.hann_window(n_fft)
            A = torch.stft(out, n_fft, hop, n_fft, win, return_complex=True).abs().clamp(min=1e-5)
            B = torch.stft(w, n_fft, hop, n_fft, win, return_complex=True).abs().clamp(min=1e-5)
            loss = loss + ((B - A).pow(2).sum().sqrt() / B.pow(2).sum().sqrt() + (A.log() - B.log()).abs().mean()) / 3
    loss.backward()
    out = S.train_step(state, batch, cfg, rt())
    assert out[stage].item() == pytest.approx(loss.item(), rel=1e-5)
    trained = dict(tokenizer="speech_tokenizer", flow="flow", vocoder="vocoder")[stage]
    moved = 0
    for (name, p), (_, p0), (_, pr) in zip(model.named_parameters(), before.named_parameters(), ref.named_parameters()):
        if name.split(".")[0] == trained and pr.grad is not None:
            torch.testing.assert_close(p, p0 - 0.1 * pr.grad, atol=1e-6, rtol=1e-5, msg=name)
            moved += int(not torch.equal(p, p0))
        else:
            assert torch.equal(p, p0), f"{name} moved in the {stage} stage"
    assert moved > 0


@pytest.mark.parametrize("speech", [False, True])
def test_generate_with_the_cache_equals_greedy_decoding_without(speech):
    """generate() (KV cache, positions from cache.length) picks the tokens a full forward pass picks at each step."""
    cfg = tiny(max_new_tokens=8, max_speech_tokens=9)
    tok = byte_tok(cfg)
    torch.manual_seed(8)
    model = S.StepAudio(cfg).eval()
    wav = 0.1 * np.random.default_rng(2).standard_normal(12000).astype(np.float32)
    turns = [("system", "tools: none"), ("human", [("audio", len(wav)), "hi"])]
    got = S.generate(model, tok, turns, wav, cfg, rt(), speech=speech)
    ids = S.render(turns, tok, cfg, generate=True)[0] + [tok.tts_start] * speech
    b = S.collate([(wav, [])], tok, cfg, rt())
    x = model.embed(torch.tensor([ids]), model.audio_features(b["mel"], b["n_mel"]), tok.patch)
    masks, ref = S.slot_masks(tok, "cpu"), [tok.tts_start] * speech
    with torch.no_grad():
        for k in range(cfg.max_speech_tokens if speech else cfg.max_new_tokens):
            lg = model.model(x)[0, -1]
            if speech:
                lg = lg.masked_fill(~masks[S.slot_kind(k, cfg.interleave)], float("-inf"))
            nxt = int(lg.argmax())
            if nxt == tok.eot:
                break
            ref.append(nxt)
            if speech and nxt == tok.tts_end:
                break
            x = torch.cat([x, model.model.embed_tokens(torch.tensor([[nxt]]))], 1)
    if speech and ref[-1] != tok.tts_end:
        ref.append(tok.tts_end)
    assert got == ref and len(got) > 2
    calls, forward = [], model.model.forward          # and each decoding step sits at the next position

    def spy(x, pos0=0, cache=None):
        calls.append((x.shape[1], pos0))
        return forward(x, pos0, cache)
    model.model.forward = spy
    S.generate(model, tok, turns, wav, cfg, rt(), speech=speech)
    assert calls[0] == (len(ids), 0) and [p for _, p in calls[1:]] == list(range(len(ids), len(ids) + len(calls) - 1))
