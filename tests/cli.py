"""Helpers the test files share: run a paper file the way a user would, check the command-line contract of
DESIGN.md in one place, and import a reference package whose name one of our files shadows.

Subprocesses run with one thread (OMP_NUM_THREADS=1): the tiny presets gain nothing from more, and on a busy
2-core machine OpenMP threads oversubscribe and crawl."""
import contextlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_script(script, *args):
    """Start python SCRIPT ARGS... in the repo root (one thread) and return the Popen; finish_script waits for it.
    Two independent runs side by side halve the wall time of the contract on a 2-core machine."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, script, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.cmd = [script, *args]
    return p


def finish_script(p, check=True, timeout=300):
    """Wait for a start_script run -> CompletedProcess; with check, a failure shows the output's tail."""
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"{' '.join(p.cmd)} ran over {timeout} s:\n{out[-2000:]}{err[-3000:]}")
    done = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    if check:
        assert done.returncode == 0, f"{' '.join(p.cmd)}\n" + out[-2000:] + err[-3000:]
    return done


def run_script(script, *args, check=True, timeout=300):
    """python SCRIPT ARGS... in the repo root -> CompletedProcess; with check, a failure shows the output's tail."""
    return finish_script(start_script(script, *args), check=check, timeout=timeout)


def error_of(script, *args):
    """Run a command that must fail with one clear error line (no traceback); return that line."""
    p = run_script(script, *args, check=False)
    err = (p.stdout + p.stderr).strip()  # SystemExit's message is stderr's last line
    assert p.returncode != 0, f"{script} {' '.join(args)} should fail:\n{err[-1500:]}"
    assert "Traceback" not in err, err[-3000:]
    return err.splitlines()[-1] if err else ""


def one_line_error(fn, *args, match):
    """In-process twin of error_of (cheaper than a process on the 2-core CI): fn(*args) stops with
    SystemExit("error: ..."), which Python prints as that one line and no traceback."""
    with pytest.raises(SystemExit, match=match) as e:
        fn(*args)
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value), str(e.value)


def audio_folder(tmp_path, name, n, samples, nan=False, sr=22050):
    """A --data_dir of n float wavs of `samples` noise samples each; with nan, clip 1 holds a NaN."""
    import soundfile as sf
    d = tmp_path / name
    d.mkdir()
    for i in range(n):
        x = (0.1 * np.random.default_rng(i).standard_normal(samples)).astype(np.float32)
        if nan and i == 1:
            x[100] = np.nan
        sf.write(d / f"clip{i}.wav", x, sr, subtype="FLOAT")
    return str(d)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def check_cli_contract(script, tmp_path, flags=(), bench_keys=(), sample_exts=(".wav", ".png")):
    """The command-line contract every paper file keeps (DESIGN.md, Tests), from a fresh tmp folder:

    1. `--preset=tiny --device=cpu --compile=False --max_iters=3 --out_dir=D` trains and writes D/ckpt.pt;
    2. `--init_from=resume --max_iters=5` continues it, bit for bit equal to a straight 5-step run;
    3. `--mode=sample --init_from=D/ckpt.pt` with no other flag (the checkpoint's config wins) writes samples;
    4. `--mode=eval --init_from=D/ckpt.pt` prints an eval line;
    5. `--mode=bench` prints exactly one JSON line with the shared figures and `bench_keys`.
    Returns {step: stdout} for further checks."""
    d, straight = str(tmp_path / "run"), str(tmp_path / "straight")
    base = ["--preset=tiny", "--device=cpu", "--compile=False", *flags]
    # the straight 5-step run and the bench run need nothing from the others: they run beside them
    p_straight = start_script(script, *base, "--max_iters=5", f"--out_dir={straight}")
    out = {"train": run_script(script, *base, "--max_iters=3", f"--out_dir={d}").stdout}
    assert "step 3/3" in out["train"], out["train"][-2000:]
    ck3 = _load(os.path.join(d, "ckpt.pt"))
    assert ck3["step"] == 3 and ck3["config"]["max_iters"] == 3
    out["resume"] = run_script(script, *base, "--init_from=resume", "--max_iters=5", f"--out_dir={d}").stdout
    assert "step 5/5" in out["resume"] and "resumed" in out["resume"], out["resume"][-2000:]
    finish_script(p_straight)
    a, b = _load(os.path.join(d, "ckpt.pt")), _load(os.path.join(straight, "ckpt.pt"))
    assert a["step"] == b["step"] == 5
    for net, sd in b["models"].items():
        for k, v in sd.items():
            assert torch.equal(v, a["models"][net][k]), f"{net}.{k} differs between resumed and straight runs"
    assert any(not torch.equal(v, ck3["models"][n][k]) for n, sd in a["models"].items() for k, v in sd.items()), \
        "resume trained nothing"
    p_bench = start_script(script, *base, "--mode=bench", f"--out_dir={tmp_path / 'bench'}")
    samples = os.path.join(d, "samples")
    before = set(os.listdir(samples)) if os.path.isdir(samples) else set()
    out["sample"] = run_script(script, "--mode=sample", f"--init_from={d}/ckpt.pt").stdout
    new = [f for f in (set(os.listdir(samples)) - before if os.path.isdir(samples) else ())]
    for ext in sample_exts:
        assert any(f.endswith(ext) for f in new), f"--mode=sample wrote no {ext} in {samples}: {sorted(new)}"
    out["eval"] = run_script(script, "--mode=eval", f"--init_from={d}/ckpt.pt").stdout
    assert "eval" in out["eval"], out["eval"][-2000:]
    out["bench"] = finish_script(p_bench).stdout
    lines = [l for l in out["bench"].splitlines() if l.startswith("{")]
    assert len(lines) == 1, out["bench"][-2000:]
    fig = json.loads(lines[0])
    for k in ("device", "dtype", "params", "compiled", "peak_memory_mb", "train_step_ms", *bench_keys):
        assert fig.get(k) is not None, f"bench JSON lacks {k}: {fig}"
    out["bench_json"] = fig
    return out


def check_stft_discriminator_layout(d, cfg):
    """Each STFT discriminator's 2D convs run over (B, 2C, frames, n_fft/2+1): real and imaginary parts as
    channels, time along the dilated axis (the official layout; a transposed spectrogram still trains)."""
    seen = []
    for disc in d.discs:
        disc.convs[0].register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    T = 4 * max(cfg.disc_n_ffts)
    d(torch.randn(2, cfg.channels, T))
    assert seen == [(2, 2 * cfg.channels, (T - n) // (n // 4) + 1, n // 2 + 1) for n in cfg.disc_n_ffts]


@contextlib.contextmanager
def _without_repo_on_path(name):
    saved_path, saved_mod = sys.path[:], sys.modules.pop(name, None)
    here = {ROOT, os.path.abspath("")}
    try:
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") not in here]
        yield here
    finally:
        sys.path[:] = saved_path
        if saved_mod is not None and name not in sys.modules:
            sys.modules[name] = saved_mod


_REFS = {}  # name -> the reference package, imported once per process


def import_reference(name, pip_name=None, submodules=()):
    """Import the installed package `name` although one of our files (whisper.py, encodec.py) has that name;
    skips the test, naming what to install, when it is absent. Our own module stays importable as before: the
    package is imported once and kept here (a second import beside cached submodules would lack attributes)."""
    pip_name = pip_name or name
    cached = sys.modules.get(name)
    if name not in _REFS and cached is not None and \
            not os.path.abspath(getattr(cached, "__file__", "") or "").startswith(ROOT):
        _REFS[name] = cached  # imported by plain `import` before any of our modules of that name
    ours = sys.modules.get(name) if sys.modules.get(name) is not _REFS.get(name) else None
    with _without_repo_on_path(name) as here:
        try:
            if name not in _REFS:
                spec = importlib.util.find_spec(name)
                if spec is None or spec.origin is None or os.path.dirname(os.path.dirname(spec.origin)) in here:
                    pytest.skip(f"reference package not installed: pip install {pip_name} (see requirements-ref.txt)")
                _REFS[name] = importlib.import_module(name)
            sys.modules[name] = _REFS[name]  # its submodules import relative to the package
            for s in submodules:
                importlib.import_module(f"{name}.{s}")
        except ImportError as e:
            pytest.skip(f"reference package {pip_name} does not import ({e}); see requirements-ref.txt")
        finally:
            if ours is not None:
                sys.modules[name] = ours  # `import whisper` elsewhere in the tests still means ours
            elif cached is None and name in _REFS and sys.modules.get(name) is _REFS[name]:
                del sys.modules[name]  # ours was not imported yet: a later `import whisper` finds whisper.py
    return _REFS[name]


def require(module, pip_name=None):
    """importorskip whose message names the package to install (not the submodule that failed)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.skip(f"reference package not installed: pip install {pip_name or module.split('.')[0]} "
                    "(see requirements-ref.txt)")
