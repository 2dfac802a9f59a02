"""Tests of common.py: every helper the paper files stand on, with assertions that can fail."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402

FIX = np.load(os.path.join(ROOT, "tests", "fixtures", "common_reference.npz"))


@dataclass
class Config:
    mode: str = "train"            # train | sample | eval | bench
    preset: str = "big"            # a key of PRESETS
    init_from: str = "scratch"     # scratch | resume | path
    out_dir: str = "out/test"      # where checkpoints go
    data_dir: str = ""             # empty: built-in corpus
    corpus_hours: float = 0.02     # size of the built-in corpus
    device: str = "cpu"            # auto | cpu | cuda
    dtype: str = "auto"            # auto | float32 | bfloat16
    compile: bool = False          # torch.compile
    seed: int = 1337               # random seed
    width: int = 64                # model width
    lr: float = 1e-3               # learning rate
    kernels: tuple = (3, 7, 11)    # kernel sizes
    max_iters: int = 10            # steps
    log_interval: int = 1          # steps between progress lines


PRESETS = {"big": dict(width=64), "small": dict(width=8), "tiny": dict(width=4)}


# ----------------------------------------------------------------------------- config

def test_parse_config_presets_and_overrides(capsys):
    cfg = common.parse_config(Config, PRESETS, ["--preset=tiny", "--lr=3e-4", "--kernels=3,5", "--compile=true",
                                                "--max_iters=1_000"])
    assert (cfg.preset, cfg.width, cfg.lr, cfg.kernels, cfg.compile, cfg.max_iters) == ("tiny", 4, 3e-4, (3, 5), True, 1000)
    # without --preset and without CUDA, the small preset is chosen and a note says so
    if not torch.cuda.is_available():
        cfg = common.parse_config(Config, PRESETS, [])
        assert cfg.preset == "small" and cfg.width == 8 and "'small' preset" in capsys.readouterr().out
    # an explicit flag beats the preset
    assert common.parse_config(Config, PRESETS, ["--preset=tiny", "--width=5"]).width == 5


def test_parse_config_errors(capsys):
    with pytest.raises(SystemExit, match="did you mean --max_iters"):
        common.parse_config(Config, PRESETS, ["--max_iter=5"])
    with pytest.raises(SystemExit, match="not a valid int"):
        common.parse_config(Config, PRESETS, ["--width=wide"])
    with pytest.raises(SystemExit, match="not a valid bool"):
        common.parse_config(Config, PRESETS, ["--compile=maybe"])
    with pytest.raises(SystemExit, match="unknown preset"):
        common.parse_config(Config, PRESETS, ["--preset=huge"])
    with pytest.raises(SystemExit, match="--mode must be"):
        common.parse_config(Config, PRESETS, ["--mode=dance"])
    with pytest.raises(SystemExit) as e:
        common.parse_config(Config, PRESETS, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--kernels" in out and "kernel sizes" in out and "tiny" in out


# ----------------------------------------------------------------------------- features

@pytest.mark.parametrize("name,args", [
    ("hifigan", (22050, 1024, 80, 0.0, 8000.0, False, "slaney")),
    ("melgan", (22050, 1024, 80, 0.0, None, False, "slaney")),
    ("whisper80", (16000, 400, 80, 0.0, None, False, "slaney")),
    ("whisper128", (16000, 400, 128, 0.0, None, False, "slaney")),
    ("htk_nonorm", (24000, 1024, 64, 20.0, 11000.0, True, None)),
])
def test_mel_filterbank_matches_librosa(name, args):
    sr, n_fft, n_mels, fmin, fmax, htk, norm = args
    ours = common.mel_filterbank(sr, n_fft, n_mels, fmin, fmax, htk=htk, norm=norm)
    ref = FIX["mel_" + name]
    assert ours.shape == ref.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


def test_whisper_log_mel_matches_openai():
    # the fixture is openai's output on another CPU: its FFT rounds differently, and log10 of the quietest mel
    # bins turns that into up to 4e-5 (seen on one machine), so the fixture check allows 2e-4 (a 0.01 shift of the
    # dynamic-range clip is 2.5e-3); where openai-whisper is installed, the same machine's output must agree to 1e-5
    x = torch.from_numpy(FIX["whisper_signal"])
    ours80 = common.log_mel_spectrogram(x, 80).numpy()
    ours128 = common.log_mel_spectrogram(x, 128, padding=16000).numpy()
    np.testing.assert_allclose(ours80, FIX["whisper_logmel80"], atol=2e-4, rtol=0)
    np.testing.assert_allclose(ours128, FIX["whisper_logmel128"], atol=2e-4, rtol=0)
    try:
        from cli import import_reference
        ow = import_reference("whisper", "openai-whisper")
    except BaseException:  # not installed (pytest's Skipped): the fixture check above stands alone
        return
    np.testing.assert_allclose(ours80, ow.log_mel_spectrogram(x, 80).numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours128, ow.log_mel_spectrogram(x, 128, padding=16000).numpy(), atol=1e-5, rtol=0)


def test_mel_spectrogram_conventions():
    torch.manual_seed(0)
    x = torch.randn(2, 8192) * 0.1
    m = common.mel_spectrogram(x, 22050, 1024, 256, n_mels=80, fmax=8000, log=None)
    assert m.shape == (2, 80, 8192 // 256)  # HiFi-GAN: T // hop frames with center=False and (n_fft-hop)/2 padding
    # against a direct numpy computation of the same definition
    xp = np.pad(x[0].numpy(), (384, 384), mode="reflect")
    frames = np.stack([xp[i * 256: i * 256 + 1024] for i in range(32)])
    win = torch.hann_window(1024).numpy()
    mag = np.sqrt(np.abs(np.fft.rfft(frames * win, axis=-1)) ** 2 + 1e-9).T  # (513, 32)
    ref = FIX["mel_hifigan"] @ mag
    np.testing.assert_allclose(m[0].numpy(), ref, rtol=1e-3, atol=1e-4)
    ln = common.mel_spectrogram(x, 22050, log="ln")
    lg = common.mel_spectrogram(x, 22050, log="log10")
    torch.testing.assert_close(ln / np.log(10), lg, rtol=1e-4, atol=1e-4)
    assert ln.min() >= np.log(1e-5) - 1e-6  # clamp at 1e-5 before the log
    # fp32 inside even when the caller is under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert common.mel_spectrogram(x, 22050).dtype == torch.float32


def test_mulaw_round_trip():
    x = torch.linspace(-1, 1, 10001)
    q = common.mulaw_quantize(x)
    assert q.dtype == torch.long and q.min() == 0 and q.max() == 255
    assert (q[1:] >= q[:-1]).all()  # monotonic
    y = common.mulaw_dequantize(q)
    # companding puts fine steps near zero: the error is small where the signal is small
    err = (y - x).abs()
    assert err[x.abs() < 0.01].max() < 1e-3 and err.max() < 0.04
    assert torch.equal(common.mulaw_quantize(y), q)  # dequantized values quantize back to their class
    torch.testing.assert_close(common.mulaw_decode(common.mulaw_encode(x)), x, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(common.mulaw_quantize(x.numpy()), q.numpy())  # numpy and torch agree
    assert common.mulaw_encode(torch.tensor(0.5)).item() == pytest.approx(np.log1p(255 * 0.5) / np.log1p(255))


def test_mulaw_curve_pinned_by_the_paper_formula():
    """WaveNet Eq. 2, f(x) = sign(x) ln(1 + mu|x|) / ln(1 + mu) with mu = 255, at known points, written out here
    (a round trip survives a wrong mu or log base: encode and decode err together). The classes follow the
    256-way softmax's quantization, round((f + 1) / 2 * 255)."""
    mu = 255
    xs = [0.0, 0.001, 0.01, 0.1, 0.5, 1.0]
    paper = [0.0 if x == 0 else math.log(1 + mu * x) / math.log(1 + mu) for x in xs]  # the formula, by hand
    # the same values as literals, so the transcription above cannot drift with the file's constant
    np.testing.assert_allclose(paper, [0.0, 0.0409609, 0.2284774, 0.5909901, 0.8757031, 1.0], atol=1e-6)
    for x, f in zip(xs, paper):
        for sgn in (1, -1):
            got_t = common.mulaw_encode(torch.tensor(sgn * x, dtype=torch.float64)).item()
            got_n = float(common.mulaw_encode(np.float64(sgn * x)))
            assert got_t == pytest.approx(sgn * f, abs=1e-6) and got_n == pytest.approx(sgn * f, abs=1e-6)
            # decode is the inverse formula: (1 + mu)^|y| - 1) / mu
            assert common.mulaw_decode(torch.tensor(sgn * f, dtype=torch.float64)).item() == pytest.approx(
                sgn * x, abs=1e-9)
    q = common.mulaw_quantize(torch.tensor([-1.0, -0.5, -0.1, -0.01, -0.001, 0.0, 0.001, 0.01, 0.1, 0.5, 1.0]))
    assert q.tolist() == [0, 16, 52, 98, 122, 128, 133, 157, 203, 239, 255]


# ----------------------------------------------------------------------------- audio

def test_audio_io_and_resample(tmp_path):
    sr = 22050
    t = np.arange(sr) / sr
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.25 * np.sin(2 * np.pi * 660 * t)]).astype(np.float32)
    p = str(tmp_path / "a.wav")
    common.save_audio(p, stereo, sr)
    back, sr2 = common.load_audio(p, mono=False)
    assert sr2 == sr and back.shape == (2, sr) and back.dtype == np.float32
    np.testing.assert_allclose(back, stereo, atol=1 / 32768 + 1e-6)
    mono, _ = common.load_audio(p)
    np.testing.assert_allclose(mono, stereo.mean(0), atol=2e-4)
    r, sr3 = common.load_audio(p, sr=16000)
    assert sr3 == 16000 and r.shape == (16000,)
    spec = np.abs(np.fft.rfft(common.resample(stereo[0], sr, 16000)))
    assert abs(np.argmax(spec) - 440) <= 1  # the tone keeps its pitch (1 s of audio: bin = Hz)
    rt = common.resample(torch.from_numpy(stereo), sr, 24000)
    assert torch.is_tensor(rt) and rt.shape == (2, 24000)


def test_audio_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        common.load_audio(str(tmp_path / "nope.wav"))
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.wav.*empty"):
        common.load_audio(str(tmp_path / "empty.wav"))
    (tmp_path / "junk.wav").write_bytes(os.urandom(1000))
    with pytest.raises(ValueError, match="junk.wav"):
        common.load_audio(str(tmp_path / "junk.wav"))
    common.save_audio(str(tmp_path / "ok.wav"), np.zeros(10000, np.float32), 16000)
    data = (tmp_path / "ok.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[:30])  # header cut in half
    with pytest.raises(ValueError, match="cut.wav"):
        common.load_audio(str(tmp_path / "cut.wav"))


# ----------------------------------------------------------------------------- checkpoints

class Tiny(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.a = nn.Linear(3, width)
        self.b = nn.Linear(width, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _train_steps(model, opt, sampler, n):
    losses = []
    for _ in range(n):
        x, _ = sampler.next()
        loss = model(x[:, :3]).pow(2).mean() + 0.01 * torch.randn(()).abs()  # uses the global RNG too
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_checkpoint_resume_is_exact(tmp_path):
    cfg = Config(out_dir=str(tmp_path), width=4)
    wavs = [np.random.default_rng(i).standard_normal(100).astype(np.float32) for i in range(5)]

    def fresh():
        torch.manual_seed(0)
        m = Tiny(4)
        opt = torch.optim.Adam(m.parameters(), 1e-2)
        return dict(model=m, opt=opt, sched=torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)), \
            common.SegmentSampler(wavs, 8, 4, seed=1)

    def steps(state, s, n):
        out = _train_steps(state["model"], state["opt"], s, n)
        return out
    state, s = fresh()
    straight = steps(state, s, 6)
    state, s = fresh()
    steps(state, s, 3)
    path = common.save_checkpoint(cfg, 3, state, sampler=s)
    assert os.path.exists(path) and not os.path.exists(path + ".tmp")
    ck = common.load_checkpoint(path)
    assert set(ck["models"]) == {"model"} and set(ck["state"]) == {"opt", "sched"}
    steps(state, s, 2)  # wander off, then come back
    state2, s2 = fresh()
    step = common.init_from(dataclasses.replace(cfg, init_from="resume"), state2, sampler=s2, arch_keys=("width",))
    assert step == 3
    assert steps(state2, s2, 3) == straight[3:]
    # a PATH loads the weights only: step 0, the optimizer untouched
    state3, s3 = fresh()
    assert common.init_from(dataclasses.replace(cfg, init_from=path), state3, sampler=s3) == 0
    assert torch.equal(state3["model"].a.weight, ck["models"]["model"]["a.weight"])
    assert not state3["opt"].state


def test_changed_lr_takes_effect_on_resume(tmp_path):
    cfg = Config(out_dir=str(tmp_path), width=4, lr=1e-3)
    m = Tiny(4)
    opt = torch.optim.Adam(m.parameters(), cfg.lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.5)
    sched.step()  # lr now 5e-4
    common.save_checkpoint(cfg, 1, dict(model=m, opt=opt, sched=sched))
    cfg2 = common.parse_config(Config, PRESETS, [f"--out_dir={tmp_path}", "--init_from=resume", "--lr=1e-2"])
    assert cfg2.lr == 1e-2 and cfg2.width == 4  # the checkpoint's config, with the flag on top
    m2 = Tiny(4)
    opt2 = torch.optim.Adam(m2.parameters(), cfg2.lr)
    sched2 = torch.optim.lr_scheduler.ExponentialLR(opt2, 0.5)
    common.init_from(cfg2, dict(model=m2, opt=opt2, sched=sched2))
    assert opt2.param_groups[0]["lr"] == pytest.approx(5e-3)  # the schedule's position kept, its scale new
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(2.5e-3)


def test_checkpoint_config_wins_for_inference(tmp_path, capsys):
    cfg = Config(out_dir=str(tmp_path / "run"), width=5, preset="tiny")
    common.save_checkpoint(cfg, 1, dict(model=Tiny(5)))
    path = str(tmp_path / "run" / "ckpt.pt")
    got = common.parse_config(Config, PRESETS, ["--mode=sample", f"--init_from={path}"])
    assert got.width == 5 and got.preset == "tiny" and got.mode == "sample" and got.init_from == path
    assert "config from" in capsys.readouterr().out
    got = common.parse_config(Config, PRESETS, ["--mode=sample", f"--init_from={path}", "--width=9"])
    with pytest.raises(SystemExit, match=r"--width \(checkpoint 5, now 9\)"):
        common.check_checkpoint(common.load_checkpoint(path), got, arch_keys=("width",))


def test_checkpoint_from_before_a_field_existed_loads(tmp_path):
    """A checkpoint written before an architecture field was added builds what the field's default builds
    (calm.py's --decoder: its default is the SEANet decoder all older checkpoints have)."""
    path = common.save_checkpoint(Config(out_dir=str(tmp_path)), 1, {"model": Tiny(Config.width)})
    ckpt = common.load_checkpoint(path)
    del ckpt["config"]["width"]
    common.check_checkpoint(ckpt, Config(out_dir=str(tmp_path)), arch_keys=("width",))
    with pytest.raises(SystemExit, match=rf"--width \(checkpoint {Config.width}, now 9\)"):
        common.check_checkpoint(ckpt, Config(out_dir=str(tmp_path), width=9), arch_keys=("width",))


def test_checkpoint_rejects_wrong_inputs(tmp_path):
    cfg = Config(out_dir=str(tmp_path), width=4)
    m = Tiny(4)
    path = common.save_checkpoint(cfg, 1, {"model": m})
    ckpt = common.load_checkpoint(path)
    assert common.is_ours(ckpt) and ckpt["paper"] == "test_common" and ckpt["config"]["width"] == 4
    with pytest.raises(SystemExit, match=r"width \(checkpoint 4, now 8\)"):
        common.load_models(ckpt, Config(out_dir=str(tmp_path), width=8), {"model": Tiny(8)}, arch_keys=("width",))
    with pytest.raises(SystemExit, match="shape mismatch.*a.weight"):
        common.load_models(ckpt, cfg, {"model": Tiny(8)})
    other = dict(ckpt, paper="melgan")
    with pytest.raises(SystemExit, match="written by melgan.py"):
        common.load_models(other, cfg, {"model": m})
    with pytest.raises(SystemExit, match="not a nanoaudio checkpoint"):
        common.load_models({"generator": {}}, cfg, {"model": m})
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(SystemExit, match="bad.pt"):
        common.load_checkpoint(str(tmp_path / "bad.pt"))
    with pytest.raises(SystemExit, match="does not exist"):
        common.load_checkpoint(str(tmp_path / "missing.pt"))
    with pytest.raises(SystemExit, match="maps no official"):
        torch.save({"generator": {}}, tmp_path / "official.pt")
        common.init_from(dataclasses.replace(cfg, init_from=str(tmp_path / "official.pt")), {"model": m})
    # NaN, inf or diverged (huge but finite) weights never overwrite the last good checkpoint
    for bad in (float("nan"), float("inf"), 1e30):
        with torch.no_grad():
            m.a.weight[0, 0] = bad
        with pytest.raises(SystemExit, match="NaN/inf or diverged"):
            common.save_checkpoint(cfg, 2, {"model": m})
    assert common.load_checkpoint(path)["step"] == 1


def test_progress_line_and_divergence_guard(tmp_path, capsys):
    cfg = Config(out_dir=str(tmp_path), max_iters=4, log_interval=2)
    common.setup(cfg)
    prog = common.Progress(cfg)
    prog.update(1, {"loss": 1.0}, 1.0)
    prog.update(2, {"loss": torch.tensor(0.5), "d": 2.0}, 1.0)
    out = capsys.readouterr().out
    assert "step 2/4" in out and "loss 0.5000" in out and "ms/step" in out and "audio-s/s" in out and "eta" in out
    assert "config:" in open(os.path.join(tmp_path, "log.txt")).read().splitlines()[0]
    with pytest.raises(SystemExit, match="loss loss is nan at step 4"):
        prog.update(4, {"loss": float("nan")})
    with pytest.raises(SystemExit, match="loss d is 1e\\+09 at step 2 \\(diverged\\)"):
        common.Progress(cfg).update(2, {"loss": 1.0, "d": 1e9})


def test_flag_values_are_checked(tmp_path):
    for flag, msg in (("--lr=-1", "--lr must be a positive"), ("--max_iters=0", "--max_iters must be >= 1"),
                      ("--log_interval=0", "--log_interval must be > 0"), ("--dtype=fp8", "--dtype must be"),
                      ("--input=/nonexistent.wav", "does not exist"), ("--data_dir=/nonexistent", "not a folder")):
        with pytest.raises(SystemExit, match=msg):
            common.parse_config(CliConfig, PRESETS, [flag])
    (tmp_path / "notes.txt").write_text("not audio")
    with pytest.raises(SystemExit, match="not an audio file"):
        common.parse_config(CliConfig, PRESETS, [f"--input={tmp_path / 'notes.txt'}"])
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="cannot write to --out_dir"):
        common.setup(Config(out_dir=str(blocker / "sub")))
    rt = common.setup(Config(out_dir=str(tmp_path / "o"), dtype="fp16"))
    assert rt.dtype == torch.float32  # no autocast on a CPU: it says so and runs float32


@dataclass
class CliConfig(Config):
    input: str = ""                # a wav
    batch_size: int = 2            # clips per step
    eval_interval: int = 5         # steps between evals


# ----------------------------------------------------------------------------- corpus

@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    old = common.DATA_ROOT
    common.DATA_ROOT = root
    yield root
    common.DATA_ROOT = old


def test_corpus_speech_properties(corpus_root):
    cfg = Config(corpus_hours=0.03)
    train, val, test = (common.load_corpus(cfg, s, 22050) for s in ("train", "val", "test"))
    assert len(train) > len(val) >= 1 and len(test) >= 1
    assert len(common.VOICES) >= 8
    # a voice heard only in test, and test/val sentences never spoken in train
    assert common.TEST_ONLY_SPEAKER in {u.speaker for u in test}
    assert common.TEST_ONLY_SPEAKER not in {u.speaker for u in train + val}
    assert common.num_speakers(train) == common.NUM_SPEAKERS > common.TEST_ONLY_SPEAKER  # the held-out voice has an id
    assert not ({u.text for u in val + test} & {u.text for u in train})
    for u in train + test:
        assert u.wav.dtype == np.float32 and u.wav.ndim == 1 and 0.5 < u.duration < 10 and np.abs(u.wav).max() > 0.05
        words = [w for w, _, _ in u.words]
        assert words == u.text.split()  # one timed word per transcript word
        starts = [s for _, s, _ in u.words]
        assert starts == sorted(starts) and all(s <= e <= u.duration + 1e-3 for _, s, e in u.words)
    # resampled copies keep the durations
    t16 = common.load_corpus(cfg, "test", 16000)
    assert [round(u.duration, 2) for u in t16] == [round(u.duration, 2) for u in test]
    assert len({w for u in common.load_corpus(Config(corpus_hours=0.3), "train", 22050) for w in u.text.split()}) > 300


def test_corpus_is_deterministic_and_versioned(tmp_path, monkeypatch):
    """The same seed gives the same sentences, voices, splits and words; the audio itself agrees to within eSpeak's
    own run-to-run jitter (libespeak-ng varies a few samples between runs; a byte-exact check would be flaky)."""
    a = common.build_corpus("speech", 0.01, seed=5, verbose=False)
    monkeypatch.setattr(common, "DATA_ROOT", str(tmp_path / "other"))
    b = common.build_corpus("speech", 0.01, seed=5, workers=1, verbose=False)  # another folder, one process
    ma, mb = (json.load(open(os.path.join(p, "manifest.json")))["items"] for p in (a, b))
    assert a != b and len(ma) == len(mb) > 10
    for x, y in zip(ma, mb):
        assert (x["text"], x["speaker"], x["split"]) == (y["text"], y["speaker"], y["split"])
        assert [w[0] for w in x["words"]] == [w[0] for w in y["words"]]
        assert abs(x["length"] - y["length"]) <= 0.02 * x["length"]
    # a stale version stamp makes it regenerate
    man = os.path.join(b, "manifest.json")
    m = json.load(open(man))
    m["version"] = -1
    json.dump(m, open(man, "w"))
    common.build_corpus("speech", 0.01, seed=5, workers=1, verbose=False)
    assert json.load(open(man))["version"] == common.CORPUS_VERSION


def test_corpus_dialogue_and_music(corpus_root):
    cfg = Config(corpus_hours=0.02)
    dlg = common.load_corpus(cfg, "train", 16000, kind="dialogue", mono=False)
    u = dlg[0]
    assert u.wav.shape[0] == 2 and len(u.words) == 2 and u.words[0] and u.words[1]
    assert "user:" in u.text and "assistant:" in u.text
    for ch in (0, 1):  # each channel is silent where its speaker is not talking
        w = u.wav[ch]
        a, b = int(u.words[ch][0][1] * 16000), int(u.words[ch][-1][2] * 16000)
        assert np.abs(w[:max(0, a - 800)]).max(initial=0) < 0.01 and np.abs(w[a:b]).max() > 0.05
    # arithmetic answers are right: "seven plus five is twelve"
    assert any(" is " in line for line in u.text.split(" / ") if line.startswith("assistant:"))
    music = common.load_corpus(cfg, "train", 24000, kind="music", mono=False)
    assert music[0].wav.shape[0] == 2 and music[0].duration > 3 and not music[0].text
    mixed = common.load_corpus(cfg, "val", 24000, kind="audio")
    assert {u.id[:5] for u in mixed} == {"speec", "music"} and all(u.wav.ndim == 1 for u in mixed)


def test_folder_datasets(tmp_path):
    sr = 16000
    tone = lambda f: (0.3 * np.sin(2 * np.pi * f * np.arange(sr) / sr)).astype(np.float32)
    lj = tmp_path / "lj"
    (lj / "wavs").mkdir(parents=True)
    lines = []
    for i in range(40):
        common.save_audio(str(lj / "wavs" / f"LJ{i:03d}.wav"), tone(200 + i), 22050)
        lines.append(f"LJ{i:03d}|Raw text {i}|normalized text {i}")
    (lj / "metadata.csv").write_text("\n".join(lines))
    cfg = Config(data_dir=str(lj))
    splits = {s: common.load_corpus(cfg, s, sr) for s in ("train", "val", "test")}
    assert sum(len(v) for v in splits.values()) == 40 and all(splits.values())
    u = splits["train"][0]
    assert u.sr == sr and u.wav.shape == (11610,) and u.text.startswith("normalized text")  # 16000 samples at 22.05 kHz, resampled
    libri = tmp_path / "libri" / "19" / "198"
    libri.mkdir(parents=True)
    for i in range(5):
        common.save_audio(str(libri / f"19-198-{i:04d}.flac"), tone(300), sr)
    (libri / "19-198.trans.txt").write_text("\n".join(f"19-198-{i:04d} HELLO WORLD {i}" for i in range(5)))
    allu = sum((common.load_corpus(Config(data_dir=str(tmp_path / "libri")), s, sr) for s in ("train", "val", "test")), [])
    assert len(allu) == 5 and all(u.text.startswith("HELLO WORLD") and u.speaker_name == "19" for u in allu)
    assert common.num_speakers(splits["test"]) == 1 and common.num_speakers(allu) == 1
    plain = tmp_path / "plain"
    plain.mkdir()
    for i in range(3):
        common.save_audio(str(plain / f"c{i}.wav"), np.stack([tone(300), tone(400)]), sr)
    (plain / "c0.txt").write_text("a transcript")
    got = sum((common.load_corpus(Config(data_dir=str(plain)), s, sr, mono=False, channels=2) for s in ("train", "val", "test")), [])
    assert len(got) == 3 and got[0].wav.shape == (2, sr) and {u.text for u in got} == {"a transcript", ""}
    with pytest.raises(SystemExit, match="needs 1|has 2 channel"):
        common.load_corpus(Config(data_dir=str(plain)), "train", sr, mono=False, channels=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="holds no audio"):
        common.load_corpus(Config(data_dir=str(tmp_path / "empty")), "train", sr)
    (plain / "c1.wav").write_bytes(b"RIFF garbage")
    with pytest.raises(SystemExit, match="c1.wav"):
        sum((common.load_corpus(Config(data_dir=str(plain)), s, sr) for s in ("train", "val", "test")), [])


def test_segment_sampler():
    wavs = [np.arange(1000, dtype=np.float32), np.arange(50, dtype=np.float32), (np.ones((2, 3000)) * 7).astype(np.float32)]
    s = common.SegmentSampler(wavs[:2], seg_len=256, batch_size=16, seed=3, align=64)
    x, idx = s.next()
    assert x.shape == (16, 256) and idx.shape == (16,)
    for row, i in zip(x, idx):
        if i == 0:
            assert row[0] % 64 == 0 and torch.equal(row, torch.arange(row[0], row[0] + 256).float())
        else:  # short clip: zero-padded
            assert torch.equal(row[:50], torch.arange(50).float()) and (row[50:] == 0).all()
    st = s.state_dict()
    a = s.next()[0]
    s.load_state_dict(st)
    assert torch.equal(s.next()[0], a)
    r0 = common.SegmentSampler(wavs[:2], 256, 16, seed=3, rank=0, world_size=2).next()[0]
    r1 = common.SegmentSampler(wavs[:2], 256, 16, seed=3, rank=1, world_size=2).next()[0]
    assert not torch.equal(r0, r1)  # ranks draw different batches
    assert common.SegmentSampler([wavs[2]], 128, 2).next()[0].shape == (2, 2, 128)
    int16 = common.SegmentSampler([np.full(500, 16384, np.int16)], 100, 1).next()[0]
    assert torch.allclose(int16, torch.full((1, 100), 0.5))


# ----------------------------------------------------------------------------- metrics, samples, bench

def test_metrics():
    assert common.edit_distance("kitten", "sitting") == 3
    assert common.wer("the cat sat", "the cat sat") == 0
    assert common.wer(["the cat sat on the mat"], ["the cat sit on mat"]) == pytest.approx(2 / 6)
    assert common.wer("Hello, World!", "hello world") == 0  # normalized
    assert common.cer("abcd", "abed") == pytest.approx(0.25)
    torch.manual_seed(0)
    ref = torch.randn(2, 16000)
    assert common.si_snr(3 * ref, ref) > 60  # scale does not matter
    noisy = ref + 0.1 * torch.randn_like(ref)
    assert common.si_snr(noisy, ref) == pytest.approx(20, abs=0.5)  # noise at -20 dB
    assert common.mel_distance(ref, ref, 22050) == 0
    assert common.mel_distance(noisy, ref, 22050) > 0.01
    assert common.mrstft_distance(ref, ref) < 1e-4 < common.mrstft_distance(noisy, ref)
    assert common.mrstft_distance(0.01 * ref, torch.zeros_like(ref)) < 100  # a silent reference: floored, not 1e7


def test_save_sample_and_bench(tmp_path, capsys):
    x = 0.3 * torch.sin(torch.arange(22050) / 10.0)
    common.save_sample(str(tmp_path), "s", x, 22050, ref=x)
    assert os.path.getsize(tmp_path / "s.png") > 5000
    assert common.load_audio(str(tmp_path / "s.wav"))[0].shape == (22050,)
    cfg = Config(out_dir=str(tmp_path))
    rt = common.setup(cfg)
    capsys.readouterr()
    m = Tiny(4)
    flops = common.count_flops(lambda: m(torch.randn(8, 3)))
    assert flops == 2 * 8 * (3 * 4 + 4 * 1)
    ms = common.timeit(lambda: m(torch.randn(8, 3)), iters=3, warmup=1)
    common.report_bench(cfg, rt, model=m, compiled=False, train_step_ms=ms, train_flops_per_step=flops)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    d = json.loads(line)
    assert d["params"] == 21 and d["paper"] == "test_common" and "peak_memory_mb" in d and d["train_tflops"] > 0



def test_write_listening_sets_and_codec_rtf(tmp_path):
    """The codec judging folders: orig + one folder per coder, each with refs.txt; the coder sees (C, T), a
    stereo resynthesis is written as its mono mix; codec_rtf names its figures and times both halves."""
    from types import SimpleNamespace
    sr = 8000
    utts = [SimpleNamespace(id=f"u{i}", wav=(0.1 * np.random.randn(sr)).astype(np.float32), text=f"word {i}")
            for i in range(2)]
    seen = []

    def stereo(x):
        seen.append(tuple(x.shape))
        return torch.stack([x[0], 0.5 * x[0]])  # (2, T): its mono mix is 0.75 x

    common.write_listening_sets(str(tmp_path), utts, {"half": stereo}, sr, pngs=1)
    assert seen == [(1, sr), (1, sr)]
    assert sorted(os.listdir(tmp_path / "orig")) == ["refs.txt", "u0.wav", "u1.wav"]
    assert (tmp_path / "half" / "refs.txt").read_text() == "u0\tword 0\nu1\tword 1\n"
    y = common.load_audio(str(tmp_path / "half" / "u1.wav"))[0]
    x = common.load_audio(str(tmp_path / "orig" / "u1.wav"))[0]
    assert np.allclose(y, 0.75 * x, atol=1e-3) and np.allclose(x, utts[1].wav, atol=1e-3)
    assert (tmp_path / "u0_half.png").exists() and not (tmp_path / "u1_half.png").exists()
    rt = common.setup(Config(out_dir=str(tmp_path)))
    calls = []
    enc = lambda x: calls.append("e") or x[..., ::2]
    dec = lambda c: calls.append("d") or c.repeat_interleave(2, -1)
    f = common.codec_rtf(enc, dec, torch.randn(1, 1, 64), 2.0, rt, tag="_b1", iters=2, warmup=1)
    assert set(f) == {"encode_rtf_b1_eager", "decode_rtf_b1_eager"} and all(v >= 0 for v in f.values())
    assert calls.count("e") == 1 + 3 and calls.count("d") == 3

def test_ddp_gloo_two_ranks(tmp_path):
    """torchrun with 2 CPU ranks: setup() joins the group (gloo), ranks see their ids."""
    script = tmp_path / "ddp.py"
    script.write_text(f"""
import sys; sys.path.insert(0, {ROOT!r})
import torch, common
from dataclasses import dataclass
@dataclass
class C:
    out_dir: str = {str(tmp_path)!r}
    device: str = "cpu"
    seed: int = 0
cfg = C()
rt = common.setup(cfg)
v = torch.tensor(float(rt.rank))
torch.distributed.all_reduce(v)
v /= rt.world_size
m = common.wrap_ddp(torch.nn.Linear(2, 2), rt)
assert common.unwrap(m).__class__ is torch.nn.Linear
print(f"RANK {{rt.rank}}/{{rt.world_size}} mean {{v.item()}}", flush=True)
common.cleanup(rt)
""")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "RANK 0/2 mean 0.5" in out.stdout and "RANK 1/2 mean 0.5" in out.stdout


def test_compile_is_opt_in_on_cpu():
    @dataclass
    class C(Config):
        compile: bool = True       # a paper file's default: on
    m = nn.Linear(2, 2)
    cfg = common.parse_config(C, PRESETS, ["--compile=True"])
    assert cfg.compile and common.compile(m, cfg) is not m  # asked for: compiled
    cfg = common.parse_config(C, PRESETS, [])
    assert cfg.compile is False and common.compile(m, cfg) is m  # the default on a CPU: eager, and the config says so
    assert common.unwrap(common.compile(m, common.parse_config(C, PRESETS, ["--compile=True"]))) is m


def test_two_process_resume_keeps_each_ranks_data_order(tmp_path):
    """torchrun, 2 gloo ranks: save after 2 draws, resume in a new process group; each rank must go on drawing
    its own batches (not rank 0's), exactly as the run that did not stop."""
    script = tmp_path / "resume.py"
    script.write_text(f"""
import sys, json; sys.path.insert(0, {ROOT!r})
import numpy as np, torch, common
from dataclasses import dataclass
@dataclass
class C:
    out_dir: str = {str(tmp_path)!r}
    device: str = "cpu"
    seed: int = 0
    init_from: str = sys.argv[1]
    width: int = 4
cfg = C()
rt = common.setup(cfg, log_to_file=False)
s = common.SegmentSampler([np.arange(10000, dtype=np.float32)], 4, 2, seed=0, rank=rt.rank, world_size=rt.world_size)
m = torch.nn.Linear(2, 2)
common.init_from(cfg, dict(model=m), sampler=s)
if cfg.init_from == "scratch":
    s.next(); s.next()
    common.save_checkpoint(cfg, 2, dict(model=m), sampler=s)
draws = [s.next()[0][:, 0].tolist() + [torch.rand(()).item()] for _ in range(2)]
with open(f"{{cfg.out_dir}}/draws-{{cfg.init_from}}-{{rt.rank}}.json", "w") as f:  # one file a rank: prints interleave
    json.dump(draws, f)
common.cleanup(rt)
""")
    def run(mode):
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(script), mode], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        return {r: (tmp_path / f"draws-{mode}-{r}.json").read_text() for r in (0, 1)}
    straight, resumed = run("scratch"), run("resume")
    assert straight == resumed and straight[0] != straight[1]


def test_bad_audio_is_rejected_at_load(tmp_path):
    import soundfile as sf
    x = np.zeros(1000, np.float32)
    x[10] = np.nan
    sf.write(str(tmp_path / "nan.wav"), x, 16000, subtype="FLOAT")
    with pytest.raises(ValueError, match="nan.wav.*NaN"):
        common.load_audio(str(tmp_path / "nan.wav"))
    d = tmp_path / "two"
    d.mkdir()
    for i in range(2):
        common.save_audio(str(d / f"c{i}.wav"), np.zeros(1000, np.float32), 16000)
    with pytest.raises(SystemExit, match="holds 2 clip.*at least 3"):
        common.load_corpus(Config(data_dir=str(d)), "train", 16000)
    with pytest.raises(SystemExit, match="shorter than 4000 samples"):
        common.check_clips([np.zeros(1000)], 4000, "train split")
    sf.write(str(d / "c0.wav"), x, 16000, subtype="FLOAT")
    common.save_audio(str(d / "c2.wav"), np.zeros(1000, np.float32), 16000)
    with pytest.raises(SystemExit, match="c0.wav.*NaN"):
        [common.load_corpus(Config(data_dir=str(d)), s, 16000) for s in ("train", "val", "test")]


def test_corpus_other_languages(corpus_root):
    """--corpus_languages: French/German/Spanish sentences with word-for-word English translations, their own voices."""
    @dataclass
    class C(Config):
        corpus_languages: str = "en,fr,de"  # languages of the built-in speech
    cfg = C(corpus_hours=0.01)
    utts = sum((common.load_corpus(cfg, s, 16000) for s in ("train", "val", "test")), [])
    by = {l: [u for u in utts if u.language == l] for l in ("en", "fr", "de")}
    assert all(len(v) >= 12 for v in by.values())
    assert all(u.translation == "" for u in by["en"]) and all(u.translation for u in by["fr"] + by["de"])
    fr_voices = {common.ALL_VOICES[u.speaker][0] for u in by["fr"]}
    assert fr_voices <= {"fr", "fr+f3", "fr+m3"} and common.num_speakers(utts) == len(common.ALL_VOICES)
    u = by["de"][0]
    assert u.words and [w for w, _, _ in u.words] == u.text.split() and u.duration > 0.5
    nums = [w for w in u.text.split() if w.isdigit()]
    assert all(n in u.translation.split() for n in nums)  # digits carry over into the translation
    assert {u.text for u in by["fr"] if u.id.endswith("0")}.isdisjoint({u.text for u in by["de"]})
    with pytest.raises(SystemExit, match="corpus_languages: xx"):
        common.load_corpus(C(corpus_languages="en,xx"), "train", 16000)
    rng = np.random.default_rng(0)
    text, en = common.make_sentence_in("es", rng)
    assert len(text.split()) >= 3 and len(en.split()) >= 3


def test_safetensors_reader_and_per_stage_out_dir(tmp_path):
    import struct
    t = {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1, -2], dtype=torch.int64),
         "h": torch.tensor([0.5, 1.5], dtype=torch.bfloat16)}
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    names = {torch.float32: "F32", torch.int64: "I64", torch.bfloat16: "BF16"}
    for k, v in t.items():
        raw = v.contiguous().view(torch.uint8).numpy().tobytes()
        header[k] = {"dtype": names[v.dtype], "shape": list(v.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    got = common.load_checkpoint(str(tmp_path / "w.safetensors"))
    assert set(got) == set(t) and all(torch.equal(got[k], t[k]) for k in t)
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(SystemExit, match="bad.safetensors"):
        common.load_checkpoint(str(tmp_path / "bad.safetensors"))

    @dataclass
    class C(Config):
        stage: str = "teacher"        # a two-stage file
        out_dir: str = str(tmp_path / "{stage}")  # one folder per stage
    assert common.parse_config(C, PRESETS, ["--stage=student"]).out_dir == str(tmp_path / "student")
    common.save_checkpoint(C(out_dir=str(tmp_path / "student"), stage="student", width=6), 1, {"model": Tiny(6)})
    cfg = common.parse_config(C, PRESETS, ["--stage=student", "--init_from=resume"])
    assert cfg.width == 6 and cfg.out_dir == str(tmp_path / "student")  # the stage's checkpoint config was found
    s = common.SegmentSampler([np.arange(100, dtype=np.float32), np.arange(5, dtype=np.float32)], 10, 4, seed=0)
    x, idx = s.next()
    for row, i, st in zip(x, idx, s.last_starts):
        assert (st == 0 if i == 1 else row[0] == st)


def test_speak_outside_a_corpus():
    """common.speak: float32 audio in [-1, 1] at the asked rate, word times inside it, the same on a second call."""
    jobs = [("what color is the sky", 0, 0, 0.0), ("hello there", 1, 2, 0.02)]
    a, b = common.speak(jobs, sr=16000, workers=1), common.speak(jobs[:1], sr=16000, workers=1)
    assert len(a) == 2 and all(w.dtype == np.float32 and np.abs(w).max() <= 1.0 for w, _ in a)
    assert np.array_equal(a[0][0], b[0][0])
    native = common.speak(jobs[:1], workers=1)[0][0]  # eSpeak's own rate: the 16 kHz copy is resampled from it
    assert abs(len(a[0][0]) - len(native) * 16000 / common.ESPEAK_SR) <= 2
    for w, words in a:
        assert [x[0] for x in words][:1] in (["what"], ["hello"]) and words[-1][2] <= len(w) / 16000 + 1e-3


def test_speak_is_cached_so_every_process_hears_the_same(tmp_path, monkeypatch):
    """eSpeak says some utterances a little differently in each process: common.speak keeps the first process's
    audio on disk, per job list, and every later call (another process: a resumed run) reads it back."""
    monkeypatch.setattr(common, "DATA_ROOT", str(tmp_path))
    jobs = [("what is two plus seven", 3, 2, 0.01), ("hello there", 1, 2, 0.02)]
    a = common.speak(jobs, sr=16000, workers=1)
    files = list(tmp_path.rglob("*.npz"))
    assert len(files) == 1 and not list(tmp_path.rglob("*.tmp*"))
    calls = []
    monkeypatch.setattr(common, "_speak_block", lambda block: calls.append(block))   # eSpeak is not asked again
    b = common.speak(jobs, sr=16000, workers=1)
    assert not calls and all(np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b))
    assert all(isinstance(t, tuple) and len(t) == 3 for _, ws in b for t in ws)
    with np.load(files[0]) as z:                          # what is on disk wins (as when another process wrote it)
        np.savez(files[0], audio=z["audio"] // 2, lengths=z["lengths"], words=z["words"])
    c = common.speak(jobs, sr=16000, workers=1)
    assert not calls and np.abs(c[1][0] - b[1][0] / 2).max() < 1e-3
    with pytest.raises(TypeError):                       # another job list is another file: eSpeak is asked
        common.speak(jobs[:1], sr=16000, workers=1)
    assert calls


# ----------------------------------------------------------------------------- shared loops of the vocoder files

@dataclass
class VocCfg:
    mode: str = "train"
    init_from: str = "scratch"
    out_dir: str = "out/test_voc"
    input: str = ""
    sample_rate: int = 8000
    hop: int = 4
    n_fft: int = 16
    n_mels: int = 3
    fmin: float = 0.0
    fmax: float = 0.0
    fmax_loss: float = 0.0
    upsample_rates: tuple = (2, 2)
    betas: tuple = (0.5, 0.9)
    segment: int = 32
    batch_size: int = 2
    max_iters: int = 5
    log_interval: int = 1
    eval_interval: int = 2
    bench_iters: int = 1
    bench_seconds: float = 0.01
    compile: bool = False
    channels: int = 2


CPU = common.Runtime(torch.device("cpu"), "cpu", torch.float32)


class TinyG(nn.Module):  # mel (B, n_mels, F) -> (B, 1, F * hop), weight-normed like the vocoders
    def __init__(self, cfg):
        super().__init__()
        self.conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(cfg.n_mels, cfg.hop, 1))

    def forward(self, mel):
        return self.conv(mel).transpose(1, 2).reshape(mel.size(0), 1, -1)


def test_train_loop_steps_evaluates_and_checkpoints(tmp_path, capsys):
    cfg = VocCfg(out_dir=str(tmp_path), max_iters=5, eval_interval=2)
    m = Tiny(4)
    state = dict(model=m, opt=torch.optim.SGD(m.parameters(), 0.1))
    seen, evals, asked = [], [], []

    def step(st, batch, c, rt):
        seen.append(batch)
        return {"loss": torch.tensor(float(batch))}

    def next_batch(s):
        asked.append(s)
        return 10 * s
    common.train_loop(cfg, CPU, state, 1, step, next_batch, evals.append, audio_seconds=lambda b: b / 10,
                      extra={"tok": "abc"})
    assert asked == [1, 2, 3, 4] and seen == [10, 20, 30, 40]   # steps 2..5: next_batch gets the step done so far
    assert [os.path.basename(d) for d in evals] == ["step000002", "step000004", "step000005"]
    ck = common.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ck["step"] == 5 and ck["extra"] == {"tok": "abc"}
    assert "step 5/5 | loss 40.0000" in capsys.readouterr().out


def test_train_loop_stops_at_the_best_val_and_resumes_its_count(tmp_path, capsys):
    """patience: stop after that many evals without a lower val loss, with the best step's checkpoint as
    ckpt.pt (and best.pt); the best value, its step and the count survive a resume; a new patience counts."""
    val = {2: 3.0, 4: 2.0, 6: 2.5, 8: 2.4, 10: 1.5, 12: 1.6, 14: 1.7, 16: 1.8, 18: 1.9, 20: 2.0}
    evals = []

    def run(patience, max_iters, init_from="scratch"):
        cfg = VocCfg(out_dir=str(tmp_path), max_iters=max_iters, eval_interval=2, init_from=init_from)
        m = Tiny(4)
        state = dict(model=m, opt=torch.optim.SGD(m.parameters(), 0.1))
        step = common.init_from(cfg, state)

        def train_step(st, batch, c, rt):  # the weight records the step: a checkpoint's step is readable
            with torch.no_grad():
                st["model"].b.bias.fill_(batch + 1)
            return {"loss": torch.tensor(0.0)}

        def evaluate(d):
            evals.append(int(os.path.basename(d)[4:]))
            return val[evals[-1]]
        common.train_loop(cfg, CPU, state, step, train_step, lambda s: s, evaluate, patience=patience)
        ck, best = (common.load_checkpoint(str(tmp_path / f)) for f in ("ckpt.pt", "best.pt"))
        assert float(ck["models"]["model"]["b.bias"]) == ck["step"]
        return ck, best

    ck, best = run(2, 6)   # 3.0, 2.0 (best), 2.5: one eval without a lower one; the step limit ends it
    assert evals == [2, 4, 6] and ck["step"] == 6 and best["step"] == 4
    assert ck["extra"]["val_best"] == {"value": 2.0, "step": 4, "bad": 1}
    assert "early stop" not in capsys.readouterr().out
    ck, best = run(2, 20, "resume")  # 2.4 beats 2.5 but not the best 2.0: the second bad eval stops at 8
    assert evals[3:] == [8] and ck["step"] == 4 and best["step"] == 4
    assert ck["extra"]["val_best"] == {"value": 2.0, "step": 4, "bad": 0}
    assert "early stop at step 8" in capsys.readouterr().out
    ck, best = run(3, 20, "resume")  # from the best step, a larger patience: 1.5 at 10, then 3 worse evals
    assert evals[4:] == [6, 8, 10, 12, 14, 16] and ck["step"] == 10 and best["step"] == 10
    assert "early stop at step 16" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="must return a validation loss"):
        common.train_loop(VocCfg(out_dir=str(tmp_path / "x"), max_iters=2), CPU, dict(model=Tiny(4)), 0,
                          lambda *a: {}, lambda s: s, lambda d: {"val": 1.0}, patience=1)


def test_check_vocoder_config():
    common.check_vocoder_config(VocCfg())
    common.check_vocoder_config(VocCfg(fmax=4000.0, fmax_loss=0.0), fmax_keys=("fmax", "fmax_loss"))
    for flags, keys, what in ((dict(hop=8), ("fmax",), "upsample_rates"), (dict(segment=30), ("fmax",), "--segment"),
                              (dict(segment=12), ("fmax",), "at least 4"), (dict(fmax=5000.0), ("fmax",), "fmax"),
                              (dict(fmax_loss=9000.0), ("fmax", "fmax_loss"), "fmax_loss"),
                              (dict(n_fft=2), ("fmax",), "n_fft"), (dict(betas=(0.5, 1.0)), ("fmax",), "betas")):
        with pytest.raises(SystemExit, match=what):
            common.check_vocoder_config(VocCfg(**flags), fmax_keys=keys)
    common.check_vocoder_config(VocCfg(fmax_loss=9000.0))        # fmax_loss is not checked unless named


def test_check_official_config():
    cfg = VocCfg()
    common.check_official_config({"channels": 2, "upsample_rates": (2, 2)}, cfg)
    with pytest.raises(SystemExit, match=r"needs --channels=8 --upsample_rates=4,1 \(the config has channels=2"):
        common.check_official_config({"channels": 8, "upsample_rates": (4, 1), "hop": 4}, cfg, "official")


def test_load_generator_ours_official_and_neither(tmp_path, capsys):
    cfg = VocCfg(out_dir=str(tmp_path), mode="sample")
    with pytest.raises(SystemExit, match="needs a trained generator"):
        common.load_generator(cfg, CPU, TinyG, (), None, None)
    G = TinyG(cfg)
    ours = common.save_checkpoint(cfg, 1, dict(G=G))
    got = common.load_generator(dataclasses.replace(cfg, init_from=ours), CPU, TinyG, ("n_mels",), None, None)
    assert torch.equal(got.conv.parametrizations.weight.original1, G.conv.parametrizations.weight.original1)
    # an official file: its size is read from the tensors and set on cfg before the generator is built
    off = str(tmp_path / "official.pt")
    torch.save({"w": torch.zeros(4, 5, 1)}, off)
    seen = {}

    def load_official(g, sd, c):
        if g is None:
            raise SystemExit("error: not an official file")
        seen["n_mels"] = g.conv.in_channels
    c = dataclasses.replace(cfg, init_from=off)
    common.load_generator(c, CPU, TinyG, (), lambda sd: {"n_mels": sd["w"].shape[1]}, load_official)
    assert c.n_mels == 5 and seen == {"n_mels": 5} and "read from its tensors" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not an official file"):
        common.load_generator(c, CPU, TinyG, (), lambda sd: None, load_official)


def test_eval_and_sample_vocoder(tmp_path, capsys):
    cfg = VocCfg(out_dir=str(tmp_path))
    G = TinyG(cfg).train()
    items = [(f"u{i}", np.full(2000, 0.1 * (i + 1), np.float32)) for i in range(3)]
    vocode = lambda name, wav: (torch.zeros(len(wav)), torch.from_numpy(wav))
    out = common.eval_vocoder(cfg, G, items, vocode, dict(peak=lambda f, r: float(r.abs().max())),
                              str(tmp_path / "s"), split="val")
    assert out["peak"] == pytest.approx(0.2) and G.training        # the mean over clips; train mode restored
    assert sorted(os.listdir(tmp_path / "s")) == ["u0.png", "u0.wav", "u1.png", "u1.wav"]
    assert "eval val (3 clips) | peak 0.2000" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="the test split has no clips"):
        common.eval_vocoder(cfg, G, [], vocode, {})
    common.sample_vocoder(cfg, vocode, lambda: items, n=2)
    assert sorted(f for f in os.listdir(tmp_path / "samples") if f.endswith(".wav")) == ["u0.wav", "u1.wav"]
    inp = str(tmp_path / "mine.wav")
    common.save_audio(inp, np.zeros(2000, np.float32), cfg.sample_rate)
    common.sample_vocoder(dataclasses.replace(cfg, input=inp), vocode, lambda: 1 / 0)   # --input: no test split
    assert os.path.exists(tmp_path / "samples" / "mine.png")


def test_bench_gan_vocoder(tmp_path, capsys):
    cfg = VocCfg(out_dir=str(tmp_path))
    G, D = TinyG(cfg), Tiny(4)
    state = dict(G=G, D=D, opt=torch.optim.SGD(G.parameters(), 0.0))
    calls = []

    def step(st, batch, c, rt):
        calls.append(rt.dtype)
        loss = st["G"](batch).pow(2).mean()
        st["opt"].zero_grad()
        loss.backward()
        return {}
    common.bench_gan_vocoder(cfg, CPU, state, step, torch.randn(2, cfg.n_mels, 8))
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert d["params"] == common.count_params(G) and d["params_d"] == 21 and not d["compiled"]
    assert d["train_flops_per_step"] > 0 and d["train_step_ms"] > 0 and d["infer_rtf_eager"] > 0
    assert d["infer_rtf_compiled"] is None and len(calls) == 1 + 3 + cfg.bench_iters   # flops, warm-up, timed


def test_bench_train_step_times_compiled_counts_eager(tmp_path, monkeypatch):
    cfg = VocCfg(out_dir=str(tmp_path))
    m = Tiny(4)
    state = dict(model=m, opt=torch.optim.SGD(m.parameters(), 0.0))
    seen = []

    class Compiled(nn.Module):  # stands in for torch.compile's wrapper
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)
    monkeypatch.setattr(common, "compile", lambda model, c: Compiled(model))

    def step(st, batch, c, rt):
        seen.append(type(st["model"]).__name__)
        loss = st["model"](batch).pow(2).mean()
        loss.backward()
        return {}
    figs, compiled = common.bench_train_step(cfg, CPU, state, "model", torch.randn(8, 3), step, 2.0)
    assert compiled and state["model"] is m                        # left eager
    assert seen == ["Compiled"] * 7 + ["Tiny"]                     # 2 warm-up + 5 timed compiled, FLOPs eager
    assert figs["train_flops_per_step"] > 2 * 8 * (3 * 4 + 4 * 1)  # more than the forward: backward counted
    ms = figs["train_step_ms"]  # rounded to 0.01 ms: a sub-millisecond step leaves the ratio that loose
    assert 2.0 / ((ms + 0.006) / 1000) <= figs["train_audio_s_per_s"] <= 2.0 / (max(ms - 0.006, 1e-3) / 1000)
