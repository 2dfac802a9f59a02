"""Tests of step_audio.py (Step-Audio 2, part 1): the audio placeholders, the LLM's attention and cache, the chat
format's loss mask, the tool loop, the training stages (a golden step) and the command line."""
import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import step_audio as S
from cli import check_cli_contract, error_of


def tiny(**kw):
    cfg = S.Config(**{**S.PRESETS["tiny"], "preset": "tiny", "device": "cpu", **kw})
    cfg.vocab_size = cfg.vocab_size or 256 + len(S.SPECIALS)  # byte_tok()
    return cfg


def rt():
    return common.Runtime(torch.device("cpu"), "cpu", torch.float32)


def byte_tok():
    return S.Tokenizer({bytes([i]): i for i in range(256)})


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
        alone = model.adapter(model.encoder(b["mel"][i:i + 1, :, :int(b["n_mel"][i])], b["n_mel"][i:i + 1]))
        assert alone.shape[1] == S.audio_tokens(n, cfg) == feats[i].shape[0]
        torch.testing.assert_close(feats[i], alone[0], atol=1e-5, rtol=1e-4)
    assert int((b["ids"] == tok.patch).sum()) == sum(S.audio_tokens(n, cfg) for n in chunks)
    model(b["ids"], b["mel"], b["n_mel"], tok.patch)       # the features fill the placeholders exactly


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


def test_voice_attributes_come_from_the_voices():
    assert S.voice_attributes(1) == dict(gender="female", pitch="high", rate="fast")        # en-us+f3, 65, 170
    assert S.voice_attributes(7) == dict(gender="male", pitch="low", rate="slow")           # en+m1, 30, 150


# ----------------------------------------------------------------------------- training

def test_stage_schedule_and_what_each_stage_trains():
    cfg = tiny(stage_iters=(2, 3, 1), max_iters=9)
    assert [S.stage_at(s, cfg) for s in range(9)] == ["llm"] * 2 + ["encoder"] * 3 + ["adaptor"] + ["sft"] * 3
    m = S.StepAudio(cfg)
    ids = lambda *mods: {id(p) for mod in mods for p in mod.parameters()}
    assert S.trainable("llm", m) == ids(m.model)
    assert S.trainable("encoder", m) == ids(m.encoder, m.ctc_head)
    assert S.trainable("adaptor", m) == ids(m.adapter)
    assert S.trainable("sft", m) == ids(m.adapter, m.model)
    f = S.lr_lambda(cfg)
    assert f(0) == pytest.approx(1 / cfg.warmup_iters) and f(2) == pytest.approx(1 / cfg.warmup_iters)  # warm-up per stage


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
        feats = torch.cat([a[i, :S.audio_tokens(len(w), cfg)] for i, w in enumerate(wav)])
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
    out = check_cli_contract("step_audio.py", tmp_path, bench_keys=("prefill_ms", "decode_tokens_per_s"))
    assert "stages: llm to step 1, encoder to 2, adaptor to 3" in out["train"]
    assert "sft" in out["resume"] and "assistant:" in out["sample"]
    assert "wer" in out["eval"] and "qa_acc" in out["eval"] and "followup_acc" in out["eval"]


def test_bad_flags_give_one_line(tmp_path):
    assert "--stage_iters" in error_of("step_audio.py", "--preset=tiny", "--stage_iters=1,2")
    assert "shorter than the first three stages" in error_of("step_audio.py", "--preset=tiny", "--max_iters=2")
    assert "does not exist" in error_of("step_audio.py", "--mode=sample", f"--init_from={tmp_path}/none.pt")
    assert "--input" in error_of("step_audio.py", "--preset=tiny", "--mode=sample", "--input=/no/such.wav")
