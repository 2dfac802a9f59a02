"""
common.py — the infrastructure no paper owns.

Every paper file imports this module and nothing else of the project. It holds what is not the lesson:
config parsing, device/precision/compile/DDP setup, checkpoints, logging, audio I/O and resampling,
mel/STFT and mu-law utilities, the built-in corpus (speech, dialogue, music synthesized locally),
folder datasets, batching, metrics, sample writing and benchmark helpers.

Sections:  config | runtime | logging | checkpoints | audio | features | text | data | metrics | samples |
           bench | corpus
"""
import base64
import contextlib
import dataclasses
import difflib
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.abspath(__file__))
DATA_ROOT = os.environ.get("NANOAUDIO_DATA", os.path.join(ROOT, "data"))

# ----------------------------------------------------------------------------- config

def _field_comments(cls):
    """Read the end-of-line comment of each dataclass field from the source: they are the --help text."""
    comments = {}
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return comments
    for line in src.splitlines():
        m = re.match(r"\s+(\w+)\s*:\s*[^=]+=.*?#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
    return comments


def _convert(name, text, default):
    """Turn the text of --name=text into the type of the field's default, or explain why not."""
    kind = type(default)
    try:
        if kind is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:  # accepts 1_000 and 1e3, refuses 2.5
            v = float(text.replace("_", ""))
            if not v.is_integer():
                raise ValueError
            return int(v)
        if kind is float:
            return float(text.replace("_", ""))
        if kind in (tuple, list):
            parts = [p for p in text.strip("()[] ").split(",") if p.strip() != ""]
            elem = default[0] if len(default) else ""
            if isinstance(elem, (tuple, list)):  # nested tuples: "3,7,11;1,3,5" or "(3,7),(11,1)"
                groups = [g for g in re.split(r";|\)\s*,\s*\(", text.strip("()[] ")) if g.strip()]
                return tuple(_convert(name, g, elem) for g in groups)
            return tuple(_convert(name, p.strip(), elem) for p in parts)
        if default is None:
            return None if text.lower() == "none" else text
        return kind(text)
    except (ValueError, TypeError):
        raise SystemExit(f"error: --{name}={text!r} is not a valid {kind.__name__} (default is {default!r})")


# Fields that describe where and how a run executes, never the model: a checkpoint's config does not carry
# them over (a model trained on a GPU samples on a laptop).
RUNTIME_KEYS = ("mode", "init_from", "device", "dtype", "compile")


def _peek_config(path):
    """The config stored in one of our checkpoints at path, or None (missing file, official weights, ...)."""
    if not path or not os.path.isfile(path) or os.path.getsize(path) == 0:
        return None
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # reads no tensor data
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None  # load_checkpoint will say what is wrong with it
    return ckpt if is_ours(ckpt) else None


def _check_values(cfg, names):
    """The shared fields' ranges, one error line each; a paper file adds its own in Config.validate()."""
    def bad(msg):
        raise SystemExit(f"error: {msg}")
    positive = ("batch_size", "eval_interval", "log_interval", "eval_items", "segment", "bench_iters")
    for k in positive:
        if k in names and not getattr(cfg, k) > 0:
            bad(f"--{k} must be > 0 (got {getattr(cfg, k)!r})")
    for k in ("lr",):
        if k in names and not (math.isfinite(getattr(cfg, k)) and getattr(cfg, k) > 0):
            bad(f"--{k} must be a positive number (got {getattr(cfg, k)!r})")
    if "max_iters" in names and getattr(cfg, "mode", "train") == "train" and cfg.max_iters < 1:
        bad(f"--max_iters must be >= 1 to train (got {cfg.max_iters})")
    if "dtype" in names and cfg.dtype not in _DTYPES and cfg.dtype != "auto":
        bad(f"--dtype must be auto, bfloat16, float16 or float32 (got {cfg.dtype!r})")
    if getattr(cfg, "input", ""):
        if not os.path.isfile(cfg.input):
            bad(f"--input={cfg.input!r} does not exist")
        import soundfile as sf
        try:
            sf.info(cfg.input)
        except Exception:
            bad(f"--input={cfg.input!r} is not an audio file soundfile can read (wav, flac, ogg)")
    if getattr(cfg, "data_dir", "") and not os.path.isdir(cfg.data_dir):
        bad(f"--data_dir={cfg.data_dir!r} is not a folder")
    if hasattr(cfg, "validate"):
        cfg.validate()


def check_vocoder_config(cfg, fmax_keys=("fmax",)):
    """The checks a mel-to-waveform GAN's Config.validate shares, one error line each: upsample_rates multiply
    to hop; segment is whole mel frames, at least 4; 0 <= fmin < fmax and every fmax_keys field <= Nyquist
    (0 = Nyquist); n_fft >= hop; two Adam betas in [0, 1)."""
    def bad(msg):
        raise SystemExit(f"error: {msg}")
    if math.prod(cfg.upsample_rates) != cfg.hop:
        bad(f"--upsample_rates={cfg.upsample_rates} multiply to {math.prod(cfg.upsample_rates)}, "
            f"not --hop={cfg.hop}")
    if cfg.segment % cfg.hop or cfg.segment < 4 * cfg.hop:
        bad(f"--segment={cfg.segment} must be a multiple of --hop={cfg.hop} and at least 4 mel frames")
    nyq = cfg.sample_rate / 2
    fmax = [getattr(cfg, k) or nyq for k in fmax_keys]
    if not (0 <= cfg.fmin < fmax[0] and max(fmax) <= nyq) or cfg.n_fft < cfg.hop:
        bad(f"need 0 <= --fmin < --{', --'.join(fmax_keys)} <= sample_rate / 2 ({nyq:g}) "
            "and --n_fft >= --hop")
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        bad(f"--betas={cfg.betas} must be two numbers in [0, 1)")


def parse_config(Config, presets, argv=None, modes=("train", "sample", "eval", "bench")):
    """Build a Config from the dataclass defaults, then --preset=NAME, then --key=value
    overrides (type-checked).

    When --init_from names one of our checkpoints (resume, or a path) the checkpoint's own config takes the
    place of the defaults and the preset, so `--mode=sample --init_from=ckpt.pt` needs no other flag; flags
    given on the command line still win (a changed --lr on resume takes effect) and are logged as changes.
    With no --preset and no CUDA the `small` preset is used, and the first line says so.
    `modes`: the values --mode accepts (a paper file with an extra mode passes its own list)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    names = [f.name for f in dataclasses.fields(Config)]
    base = Config()
    if any(a in ("-h", "--help") for a in argv):
        comments = _field_comments(Config)
        print(f"usage: python {os.path.basename(sys.argv[0])} [--key=value ...]\n\n"
              f"presets: {', '.join(presets)}\n")
        for n in names:
            print(f"  {f'--{n}={getattr(base, n)!r}':<40} {comments.get(n, '')}".rstrip())
        raise SystemExit(0)
    overrides = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"error: arguments look like --key=value, got {arg!r} (see --help)")
        key, val = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.0)
            raise SystemExit(f"error: unknown option --{key}"
                             + (f"; did you mean --{close[0]}?" if close else ""))
        overrides[key] = _convert(key, val, getattr(base, key))
    cfg = Config()
    # 1. the checkpoint's config, when --init_from names one of ours
    init = overrides.get("init_from", getattr(base, "init_from", "scratch"))
    out_dir = str(overrides.get("out_dir", getattr(base, "out_dir", "")))
    if "{" in out_dir:  # a folder per stage or variant, e.g. "out/parallel_wavenet/{stage}"
        out_dir = out_dir.format(**{**config_dict(base), **overrides})
    ckpt_path = os.path.join(out_dir, "ckpt.pt") if init == "resume" else init if init != "scratch" else None
    stored = (_peek_config(ckpt_path) or {}).get("config") if ckpt_path else None
    notes = []
    if stored:
        for k in names:
            if k in stored and k not in RUNTIME_KEYS:
                setattr(cfg, k, _from_json(stored[k], getattr(base, k)))
    # 2. the preset: asked for, or `small` on a machine without CUDA
    # (unless the checkpoint says what to build)
    preset = overrides.pop("preset", None)
    if preset is None and "preset" in names and not stored:
        wants_cuda = (str(overrides.get("device", getattr(base, "device", "auto")))
                      .startswith(("auto", "cuda")))
        if "small" in presets and not (wants_cuda and torch.cuda.is_available()):
            if base.preset != "small":
                notes.append(f"no CUDA device: using the 'small' preset instead of '{base.preset}' "
                             "(pass --preset=NAME to choose)")
            preset = "small"
        else:
            preset = base.preset
    if preset is not None:
        if preset not in presets:
            close = difflib.get_close_matches(preset, list(presets), n=1, cutoff=0.0)
            raise SystemExit(f"error: unknown preset {preset!r}; presets are {list(presets)}"
                             + (f" (did you mean {close[0]!r}?)" if close else ""))
        for k, v in presets[preset].items():
            if k not in names:
                raise SystemExit(f"error: preset {preset!r} sets unknown field {k!r}")
            setattr(cfg, k, v)
        cfg.preset = preset
    # 3. the command line
    for k, v in overrides.items():
        setattr(cfg, k, v)
    if "out_dir" in names and "{" in str(cfg.out_dir):
        try:
            cfg.out_dir = cfg.out_dir.format(**config_dict(cfg))
        except (KeyError, IndexError, ValueError) as e:
            raise SystemExit(f"error: --out_dir={cfg.out_dir!r} names an unknown field ({e})")
    if ("compile" in names and "compile" not in overrides
            and resolve_device(getattr(cfg, "device", "auto")) != "cuda"):
        cfg.compile = False  # on a CPU compilation costs minutes and gains little; --compile=True forces it
    if "mode" in names and cfg.mode not in modes:
        raise SystemExit(f"error: --mode must be one of {', '.join(modes)} (got {cfg.mode!r})")
    if stored:
        changed = [f"{k} {_norm(stored[k])!r} -> {_norm(getattr(cfg, k))!r}" for k in names
                   if k in stored and k not in RUNTIME_KEYS and _norm(stored[k]) != _norm(getattr(cfg, k))]
        notes.append(f"config from {ckpt_path}" + (" with changes: " + "; ".join(changed) if changed else ""))
    _check_values(cfg, names)
    for n in notes:
        log(n)
    return cfg


def _from_json(v, default):
    """A config value read back from a checkpoint: lists become the tuples the dataclass holds."""
    return _tuplify(v) if isinstance(default, tuple) or isinstance(v, list) else v


def config_dict(cfg):
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}

# ----------------------------------------------------------------------------- runtime

@dataclass
class Runtime:
    device: torch.device
    device_type: str
    dtype: torch.dtype
    ddp: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        """bf16 autocast on CUDA (where the tensor cores are); a no-op elsewhere."""
        if self.device_type == "cuda" and self.dtype in (torch.bfloat16, torch.float16):
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()


_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
           "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}
_LOG = {"file": None, "master": int(os.environ.get("RANK", 0)) == 0}  # the logger's one piece of state


def resolve_device(name="auto"):
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def setup(cfg, log_to_file=True):
    """Device, precision, seeds, DDP (from torchrun's environment), out_dir and the log file. Call first."""
    ddp = int(os.environ.get("RANK", -1)) != -1 and int(os.environ.get("WORLD_SIZE", 1)) > 1
    rank, local_rank, world = 0, 0, 1
    device = resolve_device(getattr(cfg, "device", "auto"))
    notes = []
    if ddp:
        import torch.distributed as dist
        rank, local_rank, world = (int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]),
                                   int(os.environ["WORLD_SIZE"]))
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device=cuda but CUDA is not available (use --device=cpu or auto)")
    dev = torch.device(device)
    dtype_name = getattr(cfg, "dtype", "auto")
    dtype = _DTYPES.get(dtype_name, torch.float32)
    if dtype_name == "auto":
        dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    elif dev.type != "cuda" and dtype != torch.float32:
        notes.append(f"--dtype={dtype_name}: mixed precision runs on CUDA only; "
                     f"running float32 on {dev.type}")
        dtype = torch.float32
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    seed = getattr(cfg, "seed", 1337) + rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    rt = Runtime(dev, dev.type, dtype, ddp, rank, local_rank, world)
    _LOG["master"] = rt.master
    out_dir = getattr(cfg, "out_dir", None)
    if out_dir and rt.master:
        try:
            os.makedirs(out_dir, exist_ok=True)
            if log_to_file:
                if _LOG["file"] is not None:
                    _LOG["file"].close()
                _LOG["file"] = open(os.path.join(out_dir, "log.txt"), "a", buffering=1)
        except OSError as e:
            raise SystemExit(f"error: cannot write to --out_dir={out_dir!r} ({e.strerror or e})")
    log("config: " + json.dumps(config_dict(cfg), default=str))
    log(f"device: {dev} ({_device_name(dev)}), dtype: {str(dtype).replace('torch.', '')}, "
        f"world size: {world}")
    for n in notes:
        log(n)
    return rt


def cleanup(rt):
    if rt.ddp:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def compile(model, cfg):
    """torch.compile when cfg.compile (parse_config turns it off on a CPU unless --compile=True was given);
    falls back to eager, and says so, where it cannot work.
    The caller tells what ran by `compiled is not model`."""
    if not getattr(cfg, "compile", False):
        return model
    try:
        if next(model.parameters()).device.type == "cuda":
            import triton  # noqa: F401  (inductor's GPU backend)
        return torch.compile(model)
    except Exception as e:  # no Triton, unsupported platform, ...
        log(f"torch.compile unavailable ({type(e).__name__}: {e}); running eager")
        return model


def wrap_ddp(model, rt, **kw):
    if not rt.ddp:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None, **kw)


def unwrap(model):
    """The plain nn.Module under DDP and torch.compile wrappers."""
    while True:
        if (hasattr(model, "module") and isinstance(model.module, nn.Module)
                and type(model).__name__ == "DistributedDataParallel"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def count_params(module):
    return sum(p.numel() for p in module.parameters())


def remove_weight_norm(model):
    """Fold weight norm's g * v / ||v|| into a plain weight, for inference (the official vocoders and codecs
    do the same): the outputs are unchanged and no forward recomputes its weights. Returns the model, changed
    in place."""
    for m in model.modules():
        if nn.utils.parametrize.is_parametrized(m, "weight"):
            nn.utils.parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model


# ----------------------------------------------------------------------------- logging

def log(*args):
    """Print and append to out_dir/log.txt, on rank 0 only."""
    if not _LOG["master"]:
        return
    msg = " ".join(str(a) for a in args)
    print(msg, flush=True)
    if _LOG["file"] is not None:
        _LOG["file"].write(msg + "\n")


def _fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# A loss beyond this is treated as diverged: finite, but training past it only writes garbage.
LOSS_LIMIT = 1e6


class Progress:
    """One progress line per cfg.log_interval steps, and the divergence guard (NaN, inf or an exploded loss),
    checked at each log step and before every checkpoint, so a bad step never reaches ckpt.pt."""

    def __init__(self, cfg, start_step=0):
        self.cfg, self.interval = cfg, max(1, getattr(cfg, "log_interval", 10))
        self.eval_interval = max(1, getattr(cfg, "eval_interval", 10**9))
        self.max_iters, self.start_step = cfg.max_iters, start_step
        self.t0 = self.t_last = time.time()
        self.last_step, self.audio = start_step, 0.0

    def update(self, step, losses, audio_seconds=0.0):
        self.audio += audio_seconds
        if step % self.interval and step % self.eval_interval and step != self.max_iters:
            return  # .item() synchronises a GPU: only where a line is printed or a checkpoint follows
        vals = {k: (v.detach().float().item() if torch.is_tensor(v) else float(v)) for k, v in losses.items()}
        bad = [k for k, v in vals.items() if not (math.isfinite(v) and abs(v) < LOSS_LIMIT)]
        if bad:
            raise SystemExit(f"error: loss {bad[0]} is {vals[bad[0]]:.4g} at step {step} (diverged); "
                             "stopping. The last good checkpoint (if any) is intact in "
                             f"{self.cfg.out_dir}/ckpt.pt; resume it with a lower --lr "
                             "(--init_from=resume --lr=...)")
        if step % self.interval and step != self.max_iters:
            return
        now = time.time()
        n = max(1, step - self.last_step)
        dt = (now - self.t_last) / n
        rate = self.audio / max(now - self.t_last, 1e-9)
        eta = dt * max(0, self.max_iters - step)
        parts = [f"step {step}/{self.max_iters}"] + [f"{k} {v:.4f}" for k, v in vals.items()]
        parts += [f"{dt * 1000:.1f} ms/step", f"{rate:.1f} audio-s/s", f"eta {_fmt_time(eta)}"]
        log(" | ".join(parts))
        self.t_last, self.last_step, self.audio = now, step, 0.0


def train_loop(cfg, rt, state, step, train_step, next_batch, evaluate, sampler=None, audio_seconds=None,
               extra=None, patience=0):
    """The loop every file runs after its setup: train_step(state, next_batch(step), cfg, rt) until
    cfg.max_iters, a progress line per log_interval; every eval_interval steps and at the last,
    evaluate(out_dir/samples/stepNNNNNN) on rank 0, then the checkpoint of `state` (and sampler, and `extra`).
    audio_seconds: the audio one step consumes, a number or a function of the batch (default: batch_size
    segments of cfg.segment samples on every rank). Ends with cleanup(rt).

    patience > 0 (early stopping): evaluate returns a validation loss, lower is better. Each new best
    checkpoint is copied to out_dir/best.pt; after `patience` evals without one, training stops and best.pt
    becomes ckpt.pt, so eval, sample and --init_from=resume start from the best step. The best value, its
    step and the evals since travel in the checkpoint (extra["val_best"]), so a resume keeps counting."""
    prog = Progress(cfg, start_step=step)
    if audio_seconds is None:
        audio_seconds = cfg.batch_size * cfg.segment * rt.world_size / cfg.sample_rate
    best = _resumed_val_best(cfg) if patience else None
    ckpt, best_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "best.pt")
    while step < cfg.max_iters:
        batch = next_batch(step)
        losses = train_step(state, batch, cfg, rt)
        step += 1
        prog.update(step, losses, audio_seconds(batch) if callable(audio_seconds) else audio_seconds)
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            val = evaluate(os.path.join(cfg.out_dir, "samples", f"step{step:06d}")) if rt.master else None
            if patience and rt.master:
                best = _next_val_best(best, val, step)
            save_checkpoint(cfg, step, state, sampler=sampler,
                            extra={**(extra or {}), "val_best": best} if patience else extra)
            if not patience:
                continue
            if rt.master and best["step"] == step:
                _copy_file(ckpt, best_path)
            if _rank0_says(rt.master and best["bad"] >= patience):
                log(f"early stop at step {step}: no lower val loss in {best['bad']} evals; ckpt.pt is now "
                    f"the best, step {best['step']} (val {best['value']:.4f}; also best.pt)")
                if rt.master:
                    _copy_file(best_path, ckpt)
                break
    cleanup(rt)


def _resumed_val_best(cfg):
    """The best validation loss so far ({value, step, bad}) from the checkpoint a resume starts from."""
    if cfg.init_from != "resume":
        return None
    return (load_checkpoint(checkpoint_path(cfg)).get("extra") or {}).get("val_best")


def _next_val_best(best, val, step):
    try:
        val = float(val)
    except (TypeError, ValueError):
        raise SystemExit("error: with a patience, evaluate must return a validation loss "
                         f"(got {type(val).__name__})")
    val = math.inf if math.isnan(val) else val  # a diverged eval is never the best
    if best is None or val < best["value"]:
        return dict(value=val, step=step, bad=0)
    return {**best, "bad": best["bad"] + 1}


def _rank0_says(flag):
    """Rank 0's decision on every rank (only rank 0 evaluates; all ranks must stop together)."""
    if _distributed():
        box = [flag]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return flag


def _copy_file(src, dst):  # atomic, as save_checkpoint writes
    shutil.copyfile(src, dst + ".tmp")
    os.replace(dst + ".tmp", dst)

# ----------------------------------------------------------------------------- checkpoints
# One file, out_dir/ckpt.pt, holds the `state` dict a paper file's build() returns (models, optimizers,
# schedulers, scaler: anything with state_dict()), the step, the config, and every rank's RNG and
# sampler state.
# --init_from has one meaning everywhere: scratch | resume (continue exactly) | PATH (weights only, step 0).

CKPT_VERSION = 2
WEIGHT_LIMIT = 1e12  # a parameter beyond this is diverged even when finite (an lr of 1e30 gives 1e30 weights)


def _paper_of(cfg):
    mod = sys.modules.get(type(cfg).__module__)
    path = getattr(mod, "__file__", None) or sys.argv[0]
    return os.path.splitext(os.path.basename(path))[0]


def _rng_state(sampler=None):
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy_global": np.random.get_state()[1].tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    if sampler is not None:
        state["sampler"] = sampler.state_dict()
    return state


def _set_rng_state(r, sampler=None):
    torch.set_rng_state(r["torch"])
    random.setstate(_tuplify(r["python"]))
    np.random.set_state(("MT19937", np.array(r["numpy_global"], dtype=np.uint32), 624))
    if "cuda" in r and torch.cuda.is_available():
        torch.cuda.set_rng_state(r["cuda"], torch.cuda.current_device())
    if sampler is not None and "sampler" in r:
        sampler.load_state_dict(r["sampler"])


def _is_module(obj):
    return isinstance(obj, nn.Module)


def _distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def save_checkpoint(cfg, step, state, sampler=None, extra=None, path=None):
    """Write the whole `state` dict to cfg.out_dir/ckpt.pt atomically (temp file, then rename).

    Call it on every rank: each rank's RNG and sampler state is gathered so a multi-process resume draws
    what a straight run would; rank 0 writes. Refuses (one error line, the old file kept) if a weight is
    NaN/inf/huge."""
    rngs = [_rng_state(sampler)]
    if _distributed():
        rngs = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(rngs, _rng_state(sampler))
        if torch.distributed.get_rank() != 0:
            return None
    models = {k: unwrap(v).state_dict() for k, v in state.items() if _is_module(v)}
    for name, sd in models.items():
        for pn, p in sd.items():
            if torch.is_floating_point(p) and not (torch.isfinite(p).all() and p.abs().max() < WEIGHT_LIMIT):
                raise SystemExit(f"error: {name}.{pn} holds NaN/inf or diverged values at step {step}; not "
                                 f"overwriting the last good checkpoint in {cfg.out_dir}")
    ckpt = {
        "nanoaudio": CKPT_VERSION,
        "paper": _paper_of(cfg),
        "step": step,
        "config": config_dict(cfg),
        "models": models,
        "state": {k: v.state_dict() for k, v in state.items() if not _is_module(v) and v is not None},
        "rng": rngs,
        "extra": extra or {},
    }
    path = path or os.path.join(cfg.out_dir, "ckpt.pt")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    return path


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                       "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                       "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """A .safetensors file (an 8-byte little-endian header size, a JSON header of name -> dtype, shape and
    byte offsets, then the raw data) as {name: tensor}, without the safetensors package."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            data = bytearray(f.read())
        out = {}
        for name, v in header.items():
            if name == "__metadata__":
                continue
            a, b = v["data_offsets"]
            dtype = _SAFETENSORS_DTYPES[v["dtype"]]
            out[name] = (torch.frombuffer(data, dtype=dtype, offset=a,
                                          count=(b - a) // dtype.itemsize).clone()
                         if b > a else torch.zeros(0, dtype=dtype)).reshape(v["shape"])
        return out
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise SystemExit(f"error: cannot read {path!r} as safetensors ({type(e).__name__}: {e})")


def load_checkpoint(path, map_location="cpu"):
    """torch.load(weights_only=True) with errors that name the file and the problem; a .safetensors file (as
    some authors publish) comes back as its {name: tensor} dict."""
    if not path or path == "scratch":
        raise SystemExit("error: this mode needs a checkpoint: --init_from=resume (out_dir/ckpt.pt) "
                         "or a path")
    if not os.path.exists(path):
        raise SystemExit(f"error: checkpoint {path!r} does not exist" +
                         (" (train first, or pass --init_from=PATH)" if path.endswith("ckpt.pt") else ""))
    if os.path.getsize(path) == 0:
        raise SystemExit(f"error: checkpoint {path!r} is empty")
    if path.endswith((".safetensors", ".sft")):
        return read_safetensors(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: cannot read checkpoint {path!r} "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         "is it a truncated file or not a PyTorch checkpoint?")


def checkpoint_path(cfg):
    """The file --init_from names: out_dir/ckpt.pt for resume, else the path itself."""
    return os.path.join(cfg.out_dir, "ckpt.pt") if cfg.init_from == "resume" else cfg.init_from


def is_ours(ckpt):
    return isinstance(ckpt, dict) and ckpt.get("nanoaudio") in (1, CKPT_VERSION) and "models" in ckpt


def load_state_dict(module, state, what="model"):
    """load_state_dict(strict) whose error lists the missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        msg = [f"error: the checkpoint does not fit the {what}:"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                msg.append(f"  {label} ({len(keys)}): " + ", ".join(keys[:8])
                           + (" ..." if len(keys) > 8 else ""))
        raise SystemExit("\n".join(msg))
    module.load_state_dict(state)


def check_checkpoint(ckpt, cfg, arch_keys=()):
    """Is this our checkpoint, of this paper, with a config that builds the same model? One error line if not,
    naming every mismatched key (architecture and features: a mel under another fmax is another model)."""
    if not is_ours(ckpt):
        raise SystemExit("error: not a nanoaudio checkpoint "
                         "(an official weight file? this paper file maps none)")
    paper = _paper_of(cfg)
    if ckpt["paper"] != paper:
        raise SystemExit(f"error: this checkpoint was written by {ckpt['paper']}.py, not {paper}.py")
    # a field the checkpoint lacks was added after it was written: its default is what the checkpoint was built with
    default = {f.name: f.default for f in dataclasses.fields(cfg)} if dataclasses.is_dataclass(cfg) else {}
    saved = {k: ckpt["config"].get(k, default.get(k)) for k in arch_keys}
    bad = [f"--{k} (checkpoint {saved[k]!r}, now {getattr(cfg, k)!r})" for k in arch_keys
           if _norm(saved[k]) != _norm(getattr(cfg, k))]
    if bad:
        raise SystemExit("error: the checkpoint's config does not fit this model: " + "; ".join(bad)
                         + " — drop those flags (the checkpoint's own config is used) "
                         "or pass matching values")


def load_models(ckpt, cfg, models, arch_keys=()):
    """Load the weights of one of our checkpoints into `models` ({name: module}), after check_checkpoint."""
    check_checkpoint(ckpt, cfg, arch_keys)
    for k, m in models.items():
        if k not in ckpt["models"]:
            raise SystemExit(f"error: the checkpoint has no {k!r} model (it has {list(ckpt['models'])})")
        load_state_dict(unwrap(m), ckpt["models"][k], what=k)


def _apply_changed_hparams(ckpt, cfg, state, lr_keys):
    """After an optimizer's state is restored it carries the old run's lr, betas and weight decay: set the
    ones the command line changed, rescaling the schedulers' base too, so a new --lr takes effect on
    resume."""
    old = ckpt["config"]
    for name, opt in state.items():
        if not isinstance(opt, torch.optim.Optimizer):
            continue
        key = lr_keys.get(name, "lr")
        if key and key in old and hasattr(cfg, key) and old[key] and old[key] != getattr(cfg, key):
            ratio = getattr(cfg, key) / old[key]
            for g in opt.param_groups:
                g["lr"] *= ratio
                if "initial_lr" in g:
                    g["initial_lr"] *= ratio
            for sched in state.values():
                if getattr(sched, "optimizer", None) is opt and hasattr(sched, "base_lrs"):
                    sched.base_lrs = [b * ratio for b in sched.base_lrs]
                    sched._last_lr = [g["lr"] for g in opt.param_groups]
        for hk in ("betas", "weight_decay"):
            if hk in old and hasattr(cfg, hk) and _norm(old[hk]) != _norm(getattr(cfg, hk)):
                for g in opt.param_groups:
                    if hk in g:
                        g[hk] = tuple(getattr(cfg, hk)) if hk == "betas" else getattr(cfg, hk)


def init_from(cfg, state, sampler=None, arch_keys=(), official=None, lr_keys=None):
    """Start training as --init_from says; returns the step to start at.

    scratch: 0. resume: out_dir/ckpt.pt restores every entry of `state`, this rank's RNG and sampler state and
    the step; flags changed on the command line take effect (lr included). PATH: the weights it holds (our
    checkpoint's models, or the authors' file through `official(state, ckpt)`), fresh optimizers, step 0.
    lr_keys: {optimizer name: config field} where an optimizer's lr is not cfg.lr (None: leave it)."""
    if cfg.init_from == "scratch":
        return 0
    path = checkpoint_path(cfg)
    ckpt = load_checkpoint(path)
    models = {k: v for k, v in state.items() if _is_module(v)}
    if cfg.init_from != "resume":
        if is_ours(ckpt):
            check_checkpoint(ckpt, cfg, arch_keys)
            have = {k: m for k, m in models.items() if k in ckpt["models"]}
            if not have:
                raise SystemExit(f"error: {path!r} holds none of the models {list(models)} "
                                 f"(it has {list(ckpt['models'])})")
            load_models(ckpt, cfg, have)
            fresh = [k for k in models if k not in have]
            log(f"initialized {', '.join(have)} from {path} (step 0, fresh optimizers"
                + (f"; {', '.join(fresh)} from scratch)" if fresh else ")"))
        elif official is not None:
            official(state, ckpt)
            log(f"initialized from the official weights {path} (step 0, fresh optimizers)")
        else:
            raise SystemExit(f"error: {path!r} is not a nanoaudio checkpoint, "
                             "and this file maps no official weights")
        return 0
    if ckpt.get("nanoaudio") != CKPT_VERSION or "state" not in ckpt:
        raise SystemExit(f"error: {path!r} was written by an older nanoaudio and cannot be resumed exactly; "
                         f"start from its weights with --init_from={path}")
    load_models(ckpt, cfg, models, arch_keys)
    for k, obj in state.items():
        if _is_module(obj) or obj is None:
            continue
        if k not in ckpt["state"]:
            raise SystemExit(f"error: the checkpoint has no {k!r} to resume (it has {list(ckpt['state'])})")
        obj.load_state_dict(ckpt["state"][k])
    _apply_changed_hparams(ckpt, cfg, state, lr_keys or {})
    rank, world = ((torch.distributed.get_rank(), torch.distributed.get_world_size()) if _distributed()
                   else (0, 1))
    rngs = ckpt["rng"]
    if len(rngs) == world:
        _set_rng_state(rngs[rank], sampler)
    else:  # another number of processes: each rank takes a fresh stream of its own (the data order changes)
        log(f"resuming {len(rngs)}-process state on {world} processes: "
            "each rank's RNG is re-seeded from the step")
        seed = getattr(cfg, "seed", 1337) + 1000003 * ckpt["step"] + rank
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed % 2**32)
        if sampler is not None:
            sampler.rng = np.random.default_rng([seed, rank, world])
    log(f"resumed {path} at step {ckpt['step']}")
    return ckpt["step"]


def check_official_config(need, cfg, what="official"):
    """need: {field: value} an official file fixes (read from its tensors). A SystemExit naming the flags
    to pass where the config differs, else nothing."""
    flag = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else v
    bad = [k for k, v in need.items()
           if (tuple(getattr(cfg, k)) if isinstance(v, tuple) else getattr(cfg, k)) != v]
    if bad:
        raise SystemExit(f"error: the {what} file needs "
                         + " ".join(f"--{k}={flag(need[k])}" for k in bad)
                         + " (the config has " + ", ".join(f"{k}={flag(getattr(cfg, k))}" for k in bad) + ")")


def load_generator(cfg, rt, make, arch_keys, official_config, load_official):
    """A vocoder's generator for sample and eval, from --init_from: one of our checkpoints (parse_config
    has already taken its config), or the authors' file, whose size official_config(ckpt) reads from its
    tensors and sets on cfg (so a CPU's `small` default does not matter). load_official(G, ckpt, cfg) maps
    its keys, and with G=None says what a file that is neither is not. make(cfg) builds the generator."""
    if cfg.init_from == "scratch":
        raise SystemExit(f"error: --mode={cfg.mode} needs a trained generator: "
                         "--init_from=resume (out_dir/ckpt.pt), "
                         "a checkpoint path, or the authors' generator file")
    path = checkpoint_path(cfg)
    ckpt = load_checkpoint(path)
    if is_ours(ckpt):
        G = make(cfg).to(rt.device)
        load_models(ckpt, cfg, {"G": G}, arch_keys)
        return G
    need = official_config(ckpt)
    if need is None:
        load_official(None, ckpt, cfg)                             # says what the file is not
    for k, v in need.items():
        setattr(cfg, k, v)
    log(f"the authors' generator {path}: " + ", ".join(f"{k} {v}" for k, v in need.items())
        + " (read from its tensors)")
    G = make(cfg).to(rt.device)
    load_official(G, ckpt, cfg)
    return G


def _norm(v):
    return json.loads(json.dumps(v, default=str)) if isinstance(v, (tuple, list)) else v


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x

# ----------------------------------------------------------------------------- audio

def load_audio(path, sr=None, mono=True):
    """Read a wav/flac/ogg file as float32 in [-1, 1]: (T,) if mono else (C, T). Resamples to sr if given."""
    import soundfile as sf
    if not os.path.exists(path):
        raise FileNotFoundError(f"audio file {path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise ValueError(f"audio file {path!r} is empty (0 bytes)")
    try:
        data, file_sr = sf.read(path, dtype="float32", always_2d=True)  # (T, C)
    except Exception as e:
        raise ValueError(f"cannot decode audio file {path!r}: {e} (truncated, or not audio?)") from None
    if data.shape[0] == 0:
        raise ValueError(f"audio file {path!r} holds no samples")
    # float wavs can hold them; left in, they surface as a NaN loss much later
    if not np.isfinite(data).all():
        raise ValueError(f"audio file {path!r} holds NaN or inf samples")
    wav = data.T  # (C, T)
    if mono:
        wav = wav.mean(0)
    if sr is not None and sr != file_sr:
        wav = resample(wav, file_sr, sr)
        file_sr = sr
    return np.ascontiguousarray(wav, dtype=np.float32), file_sr


def save_audio(path, wav, sr):
    """Write (T,) or (C, T) audio (numpy or torch, float in [-1, 1]) as 16-bit PCM wav."""
    import soundfile as sf
    if torch.is_tensor(wav):
        wav = wav.detach().float().cpu().numpy()
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim == 2 and wav.shape[0] == 1:
        wav = wav[0]
    if wav.ndim not in (1, 2):
        raise ValueError(f"save_audio expects (T,) or (C, T), got shape {wav.shape}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sf.write(path, np.clip(wav.T if wav.ndim == 2 else wav, -1, 1), int(sr), subtype="PCM_16")


def resample(wav, sr_in, sr_out):
    """Band-limited resampling with soxr (high quality); time is the last axis;
    numpy or torch in, same out."""
    if sr_in == sr_out:
        return wav
    import soxr
    is_t = torch.is_tensor(wav)
    x = wav.detach().float().cpu().numpy() if is_t else np.asarray(wav, dtype=np.float32)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).T  # (T, channels) as soxr wants
    y = soxr.resample(np.ascontiguousarray(x2), sr_in, sr_out, quality="HQ").T.reshape(*shape[:-1], -1)
    y = np.ascontiguousarray(y, dtype=np.float32)
    return torch.from_numpy(y).to(wav.device) if is_t else y

# ----------------------------------------------------------------------------- features

def _hz_to_mel(f, htk=False):
    f = np.asanyarray(f, dtype=np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + f / 700.0)
    f_sp = 200.0 / 3  # Slaney: linear below 1 kHz, logarithmic above
    mels = f / f_sp
    min_log_hz, logstep = 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mels)


def _mel_to_hz(m, htk=False):
    m = np.asanyarray(m, dtype=np.float64)
    if htk:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    f_sp = 200.0 / 3
    min_log_hz, logstep = 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(sr, n_fft, n_mels, fmin=0.0, fmax=None, htk=False, norm="slaney"):
    """Triangular mel filters (n_mels, n_fft//2+1), identical to librosa.filters.mel."""
    fmax = sr / 2 if fmax is None else fmax
    fftfreqs = np.linspace(0, sr / 2, 1 + n_fft // 2)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(fmin, htk), _hz_to_mel(fmax, htk), n_mels + 2), htk)
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fftfreqs[None, :]
    weights = np.zeros((n_mels, 1 + n_fft // 2), dtype=np.float32)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    if norm == "slaney":  # equal area per filter
        weights *= (2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels]))[:, None]
    elif norm is not None:
        raise ValueError(f"norm must be 'slaney' or None, got {norm!r}")
    return weights


_CACHE = {}


def _cached(key, make, device):
    k = (key, str(device))
    if k not in _CACHE:
        _CACHE[k] = make().to(device)
    return _CACHE[k]


def mel_spectrogram(wav, sr, n_fft=1024, hop=256, win_length=None, n_mels=80, fmin=0.0, fmax=None,
                    log="ln", clamp=1e-5, center=False):
    """Magnitude mel spectrogram (..., n_mels, frames) in fp32, HiFi-GAN/MelGAN conventions by default.

    center=False reflect-pads (n_fft - hop) / 2 on each side, so a clip of T samples gives T // hop frames.
    log: "ln" (HiFi-GAN), "log10" (MelGAN) or None (linear)."""
    win_length = win_length or n_fft
    x = wav.float()
    shape = x.shape
    x = x.reshape(-1, shape[-1])  # (N, T)
    with torch.autocast(x.device.type, enabled=False):
        if not center:
            p = (n_fft - hop) // 2
            x = F.pad(x.unsqueeze(1), (p, n_fft - hop - p), mode="reflect").squeeze(1)
        window = _cached(("hann", win_length), lambda: torch.hann_window(win_length), x.device)
        fb = _cached(("mel", sr, n_fft, n_mels, fmin, fmax),
                     lambda: torch.from_numpy(mel_filterbank(sr, n_fft, n_mels, fmin, fmax)), x.device)
        spec = torch.stft(x, n_fft, hop, win_length, window, center=center, pad_mode="reflect",
                          normalized=False, onesided=True, return_complex=True)  # (N, F, frames)
        mag = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)
        mel = fb @ mag  # (N, n_mels, frames)
        if log == "ln":
            mel = torch.log(torch.clamp(mel, min=clamp))
        elif log == "log10":
            mel = torch.log10(torch.clamp(mel, min=clamp))
        elif log is not None:
            raise ValueError(f"log must be 'ln', 'log10' or None, got {log!r}")
    return mel.reshape(*shape[:-1], n_mels, mel.shape[-1])


def log_mel_spectrogram(audio, n_mels=80, padding=0):
    """OpenAI Whisper's log-mel: 16 kHz, n_fft 400, hop 160, |STFT|^2, last frame dropped, log10,
    dynamic range clipped to 8 (global max), scaled (x + 4) / 4. audio: (..., T) tensor or numpy at 16 kHz."""
    if not torch.is_tensor(audio):
        audio = torch.from_numpy(np.asarray(audio, dtype=np.float32))
    audio = audio.float()
    if padding > 0:
        audio = F.pad(audio, (0, padding))
    with torch.autocast(audio.device.type, enabled=False):
        window = _cached(("hann", 400), lambda: torch.hann_window(400), audio.device)
        fb = _cached(("mel", 16000, 400, n_mels, 0.0, None),
                     lambda: torch.from_numpy(mel_filterbank(16000, 400, n_mels)), audio.device)
        stft = torch.stft(audio, 400, 160, window=window, return_complex=True)
        magnitudes = stft[..., :-1].abs() ** 2
        mel = fb @ magnitudes
        log_spec = torch.clamp(mel, min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
        return (log_spec + 4.0) / 4.0


def mulaw_encode(x, mu=255):
    """WaveNet §2.2: f(x) = sign(x) ln(1 + mu|x|) / ln(1 + mu), x in [-1, 1]."""
    if torch.is_tensor(x):
        return torch.sign(x) * torch.log1p(mu * x.abs().clamp(max=1.0)) / math.log1p(mu)
    x = np.asarray(x)
    return np.sign(x) * np.log1p(mu * np.minimum(np.abs(x), 1.0)) / np.log1p(mu)


def mulaw_decode(y, mu=255):
    if torch.is_tensor(y):
        return torch.sign(y) * (torch.pow(1.0 + mu, y.abs()) - 1.0) / mu
    y = np.asarray(y)
    return np.sign(y) * ((1.0 + mu) ** np.abs(y) - 1.0) / mu


def mulaw_quantize(x, mu=255):
    """Companded value to one of mu + 1 = 256 integer classes."""
    y = mulaw_encode(x, mu)
    if torch.is_tensor(y):
        return torch.round((y + 1) / 2 * mu).long().clamp(0, mu)
    return np.clip(np.round((y + 1) / 2 * mu), 0, mu).astype(np.int64)


def mulaw_dequantize(q, mu=255):
    if torch.is_tensor(q):
        return mulaw_decode(q.float() / mu * 2 - 1, mu)
    return mulaw_decode(np.asarray(q, dtype=np.float64) / mu * 2 - 1, mu).astype(np.float32)

# ----------------------------------------------------------------------------- text
# Offline text tokens: a byte-level BPE (as GPT-2's) trained on the corpus's transcripts, kept in tiktoken's
# .tiktoken format so the same code runs an official vocabulary file. Paper files add their special tokens.

PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# the same pre-tokenizer in Python's `re` (letters = word chars minus digits and _), for training the BPE
_PAT_RE = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


def train_bpe(texts, vocab_size):
    """Byte-level BPE (as GPT-2): start from the 256 bytes, repeatedly merge the most frequent adjacent pair.
    Counts are over distinct pre-tokenized words (weighted by frequency), so it takes seconds, not minutes."""
    freq = Counter(w for t in texts for w in _PAT_RE.findall(t))
    ranks = {bytes([i]): i for i in range(256)}
    # glue each word's leading space to its first byte before any other merge, so no word ever starts with a
    # bare " " token (decoding bans " " as the first token, SuppressBlank, which would then ban the word)
    pieces, heads = {}, Counter()
    for w, n in freq.items():
        b = [bytes([c]) for c in w.encode()]
        if len(b) > 1 and b[0] == b" " and b[1] != b" ":
            b = [b[0] + b[1]] + b[2:]
            heads[b[0]] += n
        pieces[w] = b
    for h, _ in sorted(heads.items(), key=lambda kv: (-kv[1], kv[0])):
        ranks.setdefault(h, len(ranks))
    while len(ranks) < vocab_size:
        pairs = Counter()
        for w, p in pieces.items():
            for a, b in zip(p, p[1:]):
                pairs[a, b] += freq[w]
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))  # ties broken by bytes: deterministic
        ranks.setdefault(a + b, len(ranks))
        for w, p in pieces.items():
            i, out = 0, []
            while i < len(p):
                if i + 1 < len(p) and p[i] == a and p[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(p[i])
                    i += 1
            pieces[w] = out
    return ranks


def ranks_to_text(ranks):
    """The .tiktoken file format: one `base64(token bytes) rank` per line."""
    return "".join(f"{base64.b64encode(t).decode()} {r}\n"
                   for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))


def ranks_from_text(text):
    return {base64.b64decode(tok): int(r) for tok, r in (line.split() for line in text.splitlines() if line)}


def bpe_encoding(ranks, special_tokens=(), name="nanoaudio-bpe"):
    """A tiktoken Encoding over `ranks`, with `special_tokens` numbered after them in the order given."""
    import tiktoken
    ids = {t: len(ranks) + i for i, t in enumerate(special_tokens)}
    return tiktoken.Encoding(name, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=ids,
                             explicit_n_vocab=len(ranks) + len(ids))


# ----------------------------------------------------------------------------- data

class Utterance:
    """One clip: audio (float32, (T,) or (C, T)), its rate, transcript, word times, speaker, language and (for
    a non-English clip of the built-in corpus) the English translation of its transcript."""
    __slots__ = ("id", "_audio", "sr", "text", "words", "speaker", "speaker_name", "n_speakers", "language",
                 "translation")

    def __init__(self, id, audio, sr, text="", words=(), speaker=0, speaker_name="", n_speakers=None,
                 language="en", translation=""):
        self.id, self._audio, self.sr, self.text = id, audio, sr, text
        self.words, self.speaker, self.speaker_name = words, speaker, speaker_name
        # speakers in the whole dataset (all splits): the size of an embedding table
        self.n_speakers = NUM_SPEAKERS if n_speakers is None else n_speakers
        self.language, self.translation = language, translation

    @property
    def wav(self):
        a = self._audio
        return (a.astype(np.float32) / 32768.0) if a.dtype == np.int16 else np.asarray(a, dtype=np.float32)

    @property
    def duration(self):
        return self._audio.shape[-1] / self.sr

    def __repr__(self):
        return (f"Utterance({self.id!r}, {self.duration:.2f}s @ {self.sr} Hz, speaker={self.speaker}, "
                f"text={self.text[:40]!r})")


def num_speakers(utts=None):
    """Speakers in the dataset the clips come from, over all splits (so held-out voices have a valid id)."""
    return NUM_SPEAKERS if not utts else max(u.n_speakers for u in utts)


def _builtin(kind, split, sr, mono, hours, seed):
    path = build_corpus(kind, hours, seed)
    with open(os.path.join(path, "manifest.json")) as f:
        man = json.load(f)
    raw = np.load(os.path.join(path, "audio.npy"), mmap_mode="r")
    src_sr = man["items"][0]["sr"] if man["items"] else sr
    if sr != src_sr:  # resample once, cache beside the original (int16, per target rate and channel layout)
        rpath = os.path.join(path, f"audio_{sr}.npy")
        opath = os.path.join(path, f"offsets_{sr}.npy")
        if not (os.path.exists(rpath) and os.path.exists(opath)):
            outs, offs, o = [], [], 0
            for it in man["items"]:
                a = (raw[it["offset"]: it["offset"] + it["length"] * it["channels"]].astype(np.float32)
                     / 32768.0)
                a = resample(a.reshape(it["channels"], it["length"]), src_sr, sr)
                outs.append(np.clip(np.round(a * 32768.0), -32768, 32767).astype(np.int16).reshape(-1))
                offs.append((o, a.shape[-1]))
                o += outs[-1].size
            tmp = f".tmp{os.getpid()}.npy"  # per process: two runs may resample the same corpus at once
            np.save(rpath + tmp, np.concatenate(outs))
            os.replace(rpath + tmp, rpath)
            np.save(opath + tmp, np.array(offs, dtype=np.int64))
            os.replace(opath + tmp, opath)
        raw = np.load(rpath, mmap_mode="r")
        offsets = np.load(opath)
    else:
        offsets = np.array([(it["offset"], it["length"]) for it in man["items"]],
                           dtype=np.int64).reshape(-1, 2)
    utts = []
    for it, (off, n) in zip(man["items"], offsets):
        if it["split"] != split:
            continue
        a = np.asarray(raw[off: off + n * it["channels"]]).reshape(it["channels"], n)
        if mono and it["channels"] > 1 and kind != "dialogue":
            a = (a.astype(np.int32).sum(0) // it["channels"]).astype(np.int16)
        elif it["channels"] == 1:
            a = a[0]
        words = it["words"]
        words = (tuple(tuple(map(tuple, w)) for w in words) if kind == "dialogue"
                 else [tuple(w) for w in words])
        n_spk = NUM_SPEAKERS if it.get("language", "en") == "en" else len(ALL_VOICES)
        utts.append(Utterance(it["id"], a, sr, it["text"], words, it["speaker"], it["speaker_name"], n_spk,
                              it.get("language", "en"), it.get("translation", "")))
    return utts


_AUDIO_EXT = (".wav", ".flac", ".ogg", ".mp3")


def _split_of(key):
    """A stable split for user data: ~2 % val and ~2 % test by hash of the clip id."""
    h = int(hashlib.md5(key.encode()).hexdigest()[:8], 16) % 100
    return "val" if h < 2 else "test" if h < 4 else "train"


def _scan_folder(data_dir):
    """(id, path, text, speaker_name) for an LJSpeech folder, a LibriSpeech tree,
    or any folder of audio files."""
    if not os.path.isdir(data_dir):
        raise SystemExit(f"error: --data_dir={data_dir!r} is not a folder")
    meta = os.path.join(data_dir, "metadata.csv")
    entries = []
    # LJSpeech: id|text|normalized text
    if os.path.exists(meta) and os.path.isdir(os.path.join(data_dir, "wavs")):
        with open(meta, encoding="utf-8") as f:
            for line in f:
                parts = line.rstrip("\n").split("|")
                if len(parts) >= 2:
                    entries.append((parts[0], os.path.join(data_dir, "wavs", parts[0] + ".wav"),
                                    parts[-1], "lj"))
        return entries
    trans = {}
    for dirpath, _, files in os.walk(data_dir):
        for fn in files:
            if fn.endswith(".trans.txt"):  # LibriSpeech: "<id> TEXT" per line, one file per chapter
                with open(os.path.join(dirpath, fn), encoding="utf-8") as f:
                    for line in f:
                        if " " in line:
                            k, t = line.strip().split(" ", 1)
                            trans[k] = t
    for dirpath, _, files in sorted(os.walk(data_dir)):
        for fn in sorted(files):
            stem, ext = os.path.splitext(fn)
            if ext.lower() not in _AUDIO_EXT:
                continue
            p = os.path.join(dirpath, fn)
            rel = os.path.relpath(p, data_dir)
            text = trans.get(stem, "")
            if not text and os.path.exists(os.path.join(dirpath, stem + ".txt")):
                with open(os.path.join(dirpath, stem + ".txt"), encoding="utf-8") as f:
                    text = f.read().strip()
            spk = stem.split("-")[0] if stem in trans else os.path.basename(dirpath)
            entries.append((os.path.splitext(rel)[0], p, text, spk))
    return entries


def _folder(data_dir, split, sr, mono, channels=None):
    entries = _scan_folder(data_dir)
    if not entries:
        raise SystemExit(f"error: --data_dir={data_dir!r} holds no audio files ({', '.join(_AUDIO_EXT)}) "
                         "and no LJSpeech metadata.csv")
    if len(entries) < 3:
        raise SystemExit(f"error: --data_dir={data_dir!r} holds {len(entries)} clip(s); "
                         "at least 3 are needed (train, val and test get one each)")
    splits = [_split_of(e[0]) for e in entries]
    for s, i in (("val", 0), ("test", 1), ("train", 2)):  # make sure every split has at least one clip
        if s not in splits:
            splits[i] = s
    names = sorted({e[3] for e in entries})
    utts = []
    for (cid, path, text, spk), s in zip(entries, splits):
        if s != split:
            continue
        try:
            wav, _ = load_audio(path, sr=sr, mono=mono)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}")
        if channels is not None and not mono and wav.shape[0] != channels:
            raise SystemExit(f"error: {path!r} has {wav.shape[0]} channel(s); this model needs {channels}")
        utts.append(Utterance(cid, wav, sr, text, [], names.index(spk), spk, len(names)))
    return utts


def check_clips(clips, min_len, what):
    """Stop before the first training step (not after the last) when a split is empty or all too short.
    clips: arrays (..., T) or Utterances; min_len: samples."""
    lengths = [c._audio.shape[-1] if isinstance(c, Utterance) else np.shape(c)[-1] for c in clips]
    if not lengths:
        raise SystemExit(f"error: the {what} has no clips")
    if max(lengths) < min_len:
        raise SystemExit(f"error: every clip of the {what} is shorter than {min_len} samples "
                         f"(longest {max(lengths)}); use longer clips or a smaller --segment")


def load_corpus(cfg, split, sr, kind="speech", mono=True, channels=None):
    """Clips of one split at rate sr: the built-in corpus (cfg.corpus_hours), or cfg.data_dir if set.
    kind: speech | dialogue | music | audio (speech and music together, for the codecs). Speech is English
    unless the config has `corpus_languages` ("en,fr,de,es": each language's own corpus of corpus_hours,
    concatenated)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    data_dir = getattr(cfg, "data_dir", "")
    if data_dir:
        return _folder(data_dir, split, sr, mono, channels)
    # the corpus seed is fixed: one corpus for every run
    hours, seed = getattr(cfg, "corpus_hours", 2.0), 1337
    if kind == "audio":
        return (_builtin("speech", split, sr, mono, hours, seed)
                + _builtin("music", split, sr, mono, hours, seed))
    if kind == "speech":  # --corpus_languages=en,fr: English and the other languages' speech together
        langs = getattr(cfg, "corpus_languages", "en")
        langs = [l.strip() for l in (langs.split(",") if isinstance(langs, str) else langs) if l.strip()]
        bad = [l for l in langs if l != "en" and l not in _LANG]
        if bad or not langs:
            raise SystemExit(f"error: --corpus_languages: {', '.join(bad) or 'none given'}; "
                             f"the built-in corpus speaks en, {', '.join(_LANG)}")
        utts = sum((_builtin("speech" if l == "en" else f"speech-{l}", split, sr, mono, hours, seed)
                    for l in langs), [])
    else:
        utts = _builtin(kind, split, sr, mono, hours, seed)
    if channels is not None and not mono and kind == "speech":  # mono speech for a multi-channel model
        for u in utts:
            u._audio = np.repeat(u._audio[None], channels, 0)
    return utts


class SegmentSampler:
    """Random fixed-length segments from a list of clips; each rank draws its own batches from its own RNG."""

    def __init__(self, wavs, seg_len, batch_size, seed=1337, rank=0, world_size=1, align=1):
        if not len(wavs):
            raise ValueError("SegmentSampler needs at least one clip")
        self.wavs, self.seg_len, self.batch_size, self.align = wavs, seg_len, batch_size, max(1, align)
        self.rng = np.random.default_rng([seed, rank, world_size])
        lengths = np.array([w.shape[-1] for w in wavs], dtype=np.float64)
        self.p = lengths / lengths.sum()  # longer clips are drawn more often: every second is equally likely

    def next(self):
        idx = self.rng.choice(len(self.wavs), size=self.batch_size, p=self.p)
        out, self.last_starts = [], []  # where each crop began (0 for a padded clip): to cut side data alike
        for i in idx:
            w = self.wavs[i]
            T = w.shape[-1]
            start = 0
            if T > self.seg_len:
                start = int(self.rng.integers(0, (T - self.seg_len) // self.align + 1)) * self.align
                seg = w[..., start:start + self.seg_len]
            else:
                seg = np.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, self.seg_len - T)])
            self.last_starts.append(start)
            seg = np.asarray(seg)
            out.append(seg.astype(np.float32) / 32768.0 if seg.dtype == np.int16 else seg.astype(np.float32))
        return torch.from_numpy(np.stack(out)), torch.from_numpy(idx.astype(np.int64))

    def state_dict(self):
        return self.rng.bit_generator.state

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state


# ----------------------------------------------------------------------------- metrics

def edit_distance(a, b):
    """Levenshtein distance between two sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def normalize_text(s):
    return " ".join(re.sub(r"[^\w\s']", " ", s.lower()).split())


def wer(refs, hyps):
    """Corpus word error rate: total word edits / total reference words (text normalized first)."""
    refs, hyps = ([refs], [hyps]) if isinstance(refs, str) else (refs, hyps)
    errs = sum(edit_distance(normalize_text(r).split(), normalize_text(h).split())
               for r, h in zip(refs, hyps))
    return errs / max(1, sum(len(normalize_text(r).split()) for r in refs))


def cer(refs, hyps):
    refs, hyps = ([refs], [hyps]) if isinstance(refs, str) else (refs, hyps)
    errs = sum(edit_distance(normalize_text(r), normalize_text(h)) for r, h in zip(refs, hyps))
    return errs / max(1, sum(len(normalize_text(r)) for r in refs))


def si_snr(est, ref, eps=1e-8):
    """Scale-invariant SNR in dB (mean over the batch); (..., T) tensors or arrays."""
    est, ref = torch.as_tensor(est).float(), torch.as_tensor(ref).float()
    T = min(est.shape[-1], ref.shape[-1])
    est, ref = est[..., :T], ref[..., :T]
    est = est - est.mean(-1, keepdim=True)
    ref = ref - ref.mean(-1, keepdim=True)
    target = (est * ref).sum(-1, keepdim=True) / (ref.pow(2).sum(-1, keepdim=True) + eps) * ref
    noise = est - target
    return (10 * torch.log10(target.pow(2).sum(-1) / (noise.pow(2).sum(-1) + eps) + eps)).mean().item()


def mel_distance(est, ref, sr):
    """Mean L1 between ln-mel spectrograms (80 bins; window scaled with sr, 1024 at 22.05 kHz)."""
    est, ref = torch.as_tensor(est).float(), torch.as_tensor(ref).float()
    T = min(est.shape[-1], ref.shape[-1])
    n_fft = 2 ** round(math.log2(1024 * sr / 22050))
    kw = dict(sr=sr, n_fft=n_fft, hop=n_fft // 4, n_mels=80)
    return F.l1_loss(mel_spectrogram(est[..., :T], **kw), mel_spectrogram(ref[..., :T], **kw)).item()


def mrstft_distance(est, ref, resolutions=((1024, 120, 600), (2048, 240, 1200), (512, 50, 240))):
    """Multi-resolution STFT distance: spectral convergence + log-magnitude L1, averaged over resolutions."""
    est, ref = torch.as_tensor(est).float(), torch.as_tensor(ref).float()
    T = min(est.shape[-1], ref.shape[-1])
    est, ref = est[..., :T].reshape(-1, T), ref[..., :T].reshape(-1, T)
    total = 0.0
    for n_fft, hop, win in resolutions:
        w = torch.hann_window(win, device=est.device)
        S = lambda x: torch.stft(x, n_fft, hop, win, w, return_complex=True).abs().clamp(min=1e-7)
        a, b = S(est), S(ref)
        # a silent reference has no scale to converge to: floor the norm at a -60 dB full-scale
        # magnitude per bin
        sc = torch.linalg.norm(b - a) / torch.linalg.norm(b).clamp(min=1e-3 * win / 2 * math.sqrt(b.numel()))
        total += (sc + F.l1_loss(a.log(), b.log())).item()
    return total / len(resolutions)

# ----------------------------------------------------------------------------- samples

def save_sample(dir, name, wav, sr, ref=None):
    """Write dir/name.wav and dir/name.png: the spectrogram of the generated audio (above the reference's)."""
    # no pyplot and no tight_layout: a third of the time, the same picture
    from matplotlib.figure import Figure
    os.makedirs(dir, exist_ok=True)
    to_np = lambda x: (x.detach().float().cpu().numpy() if torch.is_tensor(x)
                       else np.asarray(x, dtype=np.float32))
    wav = to_np(wav)
    save_audio(os.path.join(dir, name + ".wav"), wav, sr)
    panels = [("generated", wav)] + ([("reference", to_np(ref))] if ref is not None else [])
    fig = Figure(figsize=(10, 3 * len(panels)))
    axes = fig.subplots(len(panels), 1, squeeze=False)
    fig.subplots_adjust(left=0.07, right=1.0, bottom=0.18 / len(panels), top=1 - 0.1 / len(panels),
                        hspace=0.45)
    n_fft = 2 ** round(math.log2(1024 * sr / 22050))
    mels = []
    for _, x in panels:
        x = x.mean(0) if x.ndim == 2 else x
        mels.append((len(x), mel_spectrogram(torch.from_numpy(np.ascontiguousarray(x)), sr, n_fft, n_fft // 4,
                                             n_mels=80, log="log10", center=True).numpy()))
    # one colour scale for every panel, set by the reference when there is one: near-silent output looks dark
    top = mels[-1][1].max()
    for ax, (title, _), (n, mel) in zip(axes[:, 0], panels, mels):
        im = ax.imshow(mel, origin="lower", aspect="auto", cmap="magma", vmin=top - 5, vmax=top,
                       extent=[0, n / sr, 0, 80], interpolation="nearest")
        ax.set_title(f"{name} — {title}")
        ax.set_xlabel("seconds")
        ax.set_ylabel("mel bin")
        fig.colorbar(im, ax=ax, label="log10 magnitude", pad=0.01)
    fig.savefig(os.path.join(dir, name + ".png"), dpi=80)
def eval_vocoder(cfg, model, items, vocode, metrics, samples_dir=None, split="test"):
    """Held-out evaluation of a vocoder: vocode(name, wav) -> (generated, reference) for each (name, wav) of
    items; each metric fn(generated, reference) -> float, averaged over them; the first two written to
    samples_dir (if given). Logs one line, returns {metric: mean}; the model's train/eval mode is kept."""
    if not items:
        raise SystemExit(f"error: the {split} split has no clips to evaluate")
    was_training = model.training
    model.eval()
    out = {k: 0.0 for k in metrics}
    for i, (name, wav) in enumerate(items):
        fake, ref = vocode(name, wav)
        for k, fn in metrics.items():
            out[k] += fn(fake, ref) / len(items)
        if samples_dir is not None and i < 2:
            save_sample(samples_dir, name, fake.cpu(), cfg.sample_rate, ref=ref.cpu())
    model.train(was_training)
    log(f"eval {split} ({len(items)} clips) | " + " | ".join(f"{k} {v:.4f}" for k, v in out.items()))
    return out



def write_vocoder_listening_sets(cfg, vocode):
    """A mel vocoder's judging folders (--mode=eval): listen_items whole test clips, peak-normalised to 0.95
    as the vocoders train on them, vocoded from their true mels by vocode(name, wav) -> (generated,
    reference), in out_dir/listen/vocoded beside the originals in listen/orig (write_listening_sets)."""
    utts = load_corpus(cfg, "test", cfg.sample_rate, kind="speech")[:cfg.listen_items]
    peak = lambda w: 0.95 * w / max(float(np.abs(w).max()), 1e-5)
    voc = lambda x: vocode("a test clip", peak(x[0].numpy()))[0][None]  # (1, T)
    write_listening_sets(os.path.join(cfg.out_dir, "listen"), utts, {"vocoded": voc}, cfg.sample_rate)

def sample_vocoder(cfg, vocode, test_items, n=4):
    """--mode=sample of a mel vocoder: vocode(name, wav) -> (generated, reference) tensors, for the
    --input file or else the first n of test_items() [(name, wav numpy)]; writes out_dir/samples/<name>.wav
    and .png."""
    if cfg.input:
        wav, _ = load_audio(cfg.input, sr=cfg.sample_rate)
        items = [(os.path.splitext(os.path.basename(cfg.input))[0], wav)]
    else:
        items = test_items()[:n]
    out = os.path.join(cfg.out_dir, "samples")
    for name, wav in items:
        fake, ref = vocode(name, wav)
        save_sample(out, name, fake.cpu(), cfg.sample_rate, ref=ref.cpu())
        log(f"wrote {os.path.join(out, name)}.wav/.png ({len(fake) / cfg.sample_rate:.2f} s)")


def write_listening_set(dir, items, sr):
    """Write dir/<name>.wav for each (name, wav, text) and dir/refs.txt (name<TAB>text per line): the form
    `whisper.py --mode=sample --input_dir=dir` reads to print the folder's WER. A codec writes its resyntheses
    and their originals as two such folders, so the same ASR judges both."""
    os.makedirs(dir, exist_ok=True)
    to_np = lambda x: (x.detach().float().cpu().numpy() if torch.is_tensor(x)
                       else np.asarray(x, dtype=np.float32))
    lines = []
    for name, wav, text in items:
        save_audio(os.path.join(dir, name + ".wav"), to_np(wav), sr)
        lines.append(f"{name}\t{' '.join(str(text).split())}\n")
    with open(os.path.join(dir, "refs.txt"), "w", encoding="utf-8") as f:
        f.write("".join(lines))

@torch.no_grad()
def write_listening_sets(out, utts, coders, sr, pngs=1):
    """A codec's judging material: each clip of `utts` (objects with .id, .wav (T,) or (C, T), .text) as it
    was, in out/orig, and coded by each `coders[name]` (a function of the (C, T) float tensor on its way in,
    returning the (C, T) resynthesis) in out/name, every folder in the form write_listening_set writes; wav +
    png pairs (coded above original) of the first `pngs` clips. `whisper.py --mode=sample --input_dir=DIR`
    judges a folder; the same ASR on out/orig is the baseline."""
    sets = {name: [] for name in coders} | {"orig": []}
    for i, u in enumerate(utts):
        x = torch.from_numpy(np.ascontiguousarray(u.wav, dtype=np.float32))
        x = x[None] if x.dim() == 1 else x  # (C, T)
        for name, code in coders.items():
            y = code(x).float().cpu().mean(0)  # (T,): a stereo codec is judged on its mono mix
            sets[name].append((u.id, y, u.text))
            if i < pngs:
                save_sample(out, f"{u.id}_{name}", y, sr, ref=x.mean(0))
        sets["orig"].append((u.id, x.mean(0), u.text))
    for name, items in sets.items():
        write_listening_set(os.path.join(out, name), items, sr)
    log(f"{len(utts)} test clips -> {out}/{{{','.join(sets)}}} (judge each: whisper.py --mode=sample "
        "--input_dir=DIR)")

# ----------------------------------------------------------------------------- bench

def _sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timeit(fn, iters=10, warmup=3):
    """Median milliseconds per call of fn(), synchronizing the GPU around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times))



def codec_rtf(encode, decode, x, seconds, rt, compiled=False, tag="", iters=3, warmup=2):
    """Real-time factors (compute time / duration of the audio, lower is faster) of encode(x) and of
    decode(encode(x)), eager and, with `compiled`, through torch.compile: {"encode_rtf{tag}_eager": ...}."""
    variants = [("eager", encode, decode)]
    if compiled:  # common.compile compiled (CUDA, or --compile=True asked for on a CPU)
        variants.append(("compiled", torch.compile(encode), torch.compile(decode)))
    codes, figures = encode(x), {}
    for name, enc, dec in variants:
        with rt.autocast():
            e_ms = timeit(lambda: enc(x), iters=iters, warmup=warmup)
            d_ms = timeit(lambda: dec(codes), iters=iters, warmup=warmup)
        figures[f"encode_rtf{tag}_{name}"] = round(e_ms / 1000 / seconds, 5)
        figures[f"decode_rtf{tag}_{name}"] = round(d_ms / 1000 / seconds, 5)
    return figures

def count_flops(fn):
    """FLOPs of one call of fn() (matmuls and convolutions, forward and backward),
    via torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


# dense bf16 tensor-core peaks (FLOP/s) of GPUs worth naming; the fraction achieved is the
# distance to the limit
_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
          "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12}


def _device_name(dev):
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def peak_flops(rt):
    if rt.device_type != "cuda":
        return None
    name = torch.cuda.get_device_name(rt.device)
    for k, v in _PEAKS.items():
        if k in name:
            return v if rt.dtype in (torch.bfloat16, torch.float16) else v / 2  # TF32 is half the bf16 rate
    return None


def peak_memory_mb(rt):
    if rt.device_type == "cuda":
        return torch.cuda.max_memory_allocated(rt.device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def report_bench(cfg, rt, model=None, compiled=False, **figures):
    """Print one JSON line: the standard fields, then the paper's own figures; adds mfu when it can.
    compiled: whether the timed model really ran compiled (`compiled_model is not model`)."""
    out = dict(paper=_paper_of(cfg), preset=getattr(cfg, "preset", None), device=_device_name(rt.device),
               dtype=str(rt.dtype).replace("torch.", ""), compiled=bool(compiled),
               torch=torch.__version__)
    if model is not None:
        out["params"] = count_params(unwrap(model))
    out.update(figures)
    fl, ms = figures.get("train_flops_per_step"), figures.get("train_step_ms")
    peak = peak_flops(rt)
    if fl and ms:
        out["train_tflops"] = fl / (ms / 1000) / 1e12
        out["mfu"] = round(fl / (ms / 1000) / peak, 4) if peak else None
    out["peak_memory_mb"] = round(peak_memory_mb(rt), 1)
    # 4 significant digits
    out = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in out.items()}
    print(json.dumps(out), flush=True)
    return out


def bench_train_step(cfg, rt, state, key, batch, train_step, audio_seconds):
    """Time train_step(state, batch, cfg, rt) with state[key] compiled (common.compile; 2 warm-up calls, the
    median of 5), then count its FLOPs eager (the counter cannot see inside compiled kernels); state[key] is
    left eager. audio_seconds: audio in one batch. Returns (report_bench's train figures, compiled or not)."""
    model = state[key]
    state[key] = compile(model, cfg)
    compiled = state[key] is not model
    ms = timeit(lambda: train_step(state, batch, cfg, rt), iters=5, warmup=2)
    state[key] = model
    flops = count_flops(lambda: train_step(state, batch, cfg, rt))
    return dict(train_step_ms=round(ms, 2), train_audio_s_per_s=round(audio_seconds / (ms / 1000), 2),
                train_flops_per_step=flops), compiled


def bench_gan_vocoder(cfg, rt, state, train_step, batch):
    """--mode=bench of a mel-to-waveform GAN (state holds G and D): train_step (D + G update) on batch,
    its FLOPs, and batch-1 inference of cfg.bench_seconds of audio with weight norm folded, eager and
    compiled; on CUDA also the official recipe (fp32, eager). Prints report_bench's JSON line."""
    import copy
    G, D = state["G"], state["D"]
    fp32 = dataclasses.replace(rt, dtype=torch.float32)           # rt.autocast() is then a no-op
    figures = dict(params_d=count_params(D))                        # "params" (the generator) added below
    flops = count_flops(lambda: train_step(state, batch, cfg, fp32))
    state["G"], state["D"] = compile(G, cfg), compile(D, cfg)
    compiled = state["G"] is not G
    ms = timeit(lambda: train_step(state, batch, cfg, rt), iters=cfg.bench_iters)
    figures.update(train_step_ms=ms,
                   train_audio_s_per_s=cfg.batch_size * cfg.segment / cfg.sample_rate / (ms / 1e3),
                   train_flops_per_step=flops)
    if rt.device_type == "cuda":  # the official recipe: fp32, eager
        figures["baseline_fp32_eager_train_step_ms"] = timeit(
            lambda: train_step(dict(state, G=G, D=D), batch, cfg, fp32), iters=cfg.bench_iters)
    # inference: real-time factor = compute seconds per second of audio (lower is faster)
    seconds = cfg.bench_seconds
    G_inf = remove_weight_norm(copy.deepcopy(G)).eval()
    frames = int(seconds * cfg.sample_rate) // cfg.hop
    mel1 = torch.randn(1, cfg.n_mels, frames, device=rt.device) - 5  # (1, n_mels, frames)

    def infer(model, r):
        with torch.no_grad(), r.autocast():
            return model(mel1)
    rtf = lambda model, r: timeit(lambda: infer(model, r), iters=cfg.bench_iters) / 1e3 / seconds
    figures["infer_rtf_eager"] = rtf(G_inf, rt)
    g_inf = compile(G_inf, cfg)
    figures["infer_rtf_compiled"] = rtf(g_inf, rt) if g_inf is not G_inf else None
    if rt.device_type == "cuda":
        figures["baseline_fp32_eager_infer_rtf"] = rtf(G_inf, fp32)
    return report_bench(cfg, rt, model=G, compiled=compiled, **figures)


# ----------------------------------------------------------------------------- corpus
# The built-in corpus: English speech from eSpeak NG (through the espeakng-loader wheel, by ctypes),
# two-channel dialogues built from it, and procedurally synthesized music. Deterministic: one seed gives the
# same sentences, voices, splits and music; eSpeak's audio itself varies by a little from run to run
# (see _Espeak).

CORPUS_VERSION = 2
ESPEAK_SR = 22050
MUSIC_SR = 24000
# (eSpeak voice, base pitch 0-99, words per minute). The last voice is heard only in the test split.
VOICES = [("en-us", 45, 165), ("en-us+f3", 65, 170), ("en-gb-x-rp", 40, 160), ("en-gb-scotland+f2", 60, 155),
          ("en-029", 50, 175), ("en-us-nyc+m3", 35, 180), ("en-gb-x-gbclan+f4", 70, 160), ("en+m1", 30, 150),
          ("en-gb-x-gbcwmd+f1", 55, 165)]
NUM_SPEAKERS = len(VOICES)
TEST_ONLY_SPEAKER = len(VOICES) - 1

_W = dict(
    name="anna ben clara david emma frank grace henry iris jack kate leo maria nina oscar paul rosa sam tina "
         "victor wendy adam bella carl diana ethan fiona george hannah ivan julia kevin laura mike nora "
         "peter ruth simon".split(),
    noun="apple table river window garden teacher doctor bottle letter mountain station kitchen pencil "
         "camera blanket bridge candle castle cloud coffee engine feather forest glass hammer island jacket "
         "kettle ladder lemon map market mirror needle ocean orange painter piano pocket rabbit radio ribbon "
         "rocket sandwich school shadow shell silver spoon stone street sugar tiger ticket tower train tree "
         "umbrella valley village wagon wallet whistle wizard basket button carpet circle dragon farmer "
         "flower guitar helmet lantern magnet notebook parcel pillow puzzle saddle sailor spider turtle "
         "violin volcano wheel".split(),
    adj="red blue green yellow small large quiet loud bright dark warm cold old new happy tired clever "
        "gentle heavy light narrow wide quick slow simple strange golden wooden careful brave calm busy "
        "curious empty famous fresh honest lucky polite proud rough smooth sweet tiny wild".split(),
    verb="found carried painted opened closed watched cleaned fixed bought sold moved lifted dropped counted "
         "followed packed pulled pushed visited borrowed brought built caught chose drew left kept lost made "
         "noticed ordered picked placed repaired saved shared showed tested touched wrapped".split(),
    place="the park the harbor the library the museum the station the village the garden the market the "
          "school the bakery the beach the hotel the office the farm the theater the hospital the airport "
          "the castle".split(" the "),
    adv="slowly quickly quietly carefully happily suddenly finally gently early later today "
        "yesterday".split(),
    month="january february march april may june july august september october november december".split(),
    weekday="monday tuesday wednesday thursday friday saturday sunday".split(),
)
_W["place"] = [p if p.startswith("the ") else "the " + p for p in _W["place"]]
_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " \
        "sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_ORD = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
        "nine": "ninth", "twelve": "twelfth"}


# Other languages (--corpus_languages=en,fr,de,es), for language identification and X -> English translation
# in miniature (Whisper §2.3). Each sentence is written with its English translation word for word; numbers
# are digits, which eSpeak reads in the voice's language, and the translation keeps them as digits.
# Nouns are plurals.
LANG_VOICES = {
    "fr": [("fr", 50, 160), ("fr+f3", 65, 165), ("fr+m3", 40, 155)],
    "de": [("de", 50, 160), ("de+f3", 65, 165), ("de+m3", 40, 155)],
    "es": [("es", 50, 165), ("es+f3", 65, 170), ("es+m3", 40, 160)],
}
ALL_VOICES = VOICES + [v for lang in LANG_VOICES for v in LANG_VOICES[lang]]  # speaker ids index this list
_NOUNS_EN = "cats books trees flowers apples dogs tables letters houses cars pencils bottles oranges " \
            "bananas windows doors chairs stars lamps cups".split()
_PLACES_EN = ["the kitchen", "the garden", "the school", "the shop", "the station", "the park"]
_CITIES_EN = "paris berlin madrid rome vienna lisbon".split()
_LANG = {
    "fr": dict(
        noun="chats livres arbres fleurs pommes chiens tables lettres maisons voitures crayons bouteilles "
             "oranges bananes fenêtres portes chaises étoiles lampes tasses".split(),
        place=["la cuisine", "le jardin", "l'école", "le magasin", "la gare", "le parc"],
        city="paris berlin madrid rome vienne lisbonne".split(),
        month="janvier février mars avril mai juin juillet août septembre octobre novembre "
              "décembre".split(),
        templates=[("{name} a {num} {noun}", "{name} has {num} {noun_en}"),
                   ("il y a {num} {noun} dans {place}", "there are {num} {noun_en} in {place_en}"),
                   ("nous avons acheté {num} {noun}", "we bought {num} {noun_en}"),
                   ("{name} et {name2} habitent à {city}", "{name} and {name2} live in {city_en}"),
                   ("{name} arrive en {month}", "{name} arrives in {month_en}"),
                   ("{name} aime les {noun}", "{name} likes {noun_en}")]),
    "de": dict(
        noun="katzen bücher bäume blumen äpfel hunde tische briefe häuser autos stifte flaschen orangen "
             "bananen fenster türen stühle sterne lampen tassen".split(),
        place=["der küche", "dem garten", "der schule", "dem laden", "dem bahnhof", "dem park"],
        city="paris berlin madrid rom wien lissabon".split(),
        month="januar februar märz april mai juni juli august september oktober november dezember".split(),
        templates=[("{name} hat {num} {noun}", "{name} has {num} {noun_en}"),
                   ("es gibt {num} {noun} in {place}", "there are {num} {noun_en} in {place_en}"),
                   ("wir haben {num} {noun} gekauft", "we bought {num} {noun_en}"),
                   ("{name} und {name2} wohnen in {city}", "{name} and {name2} live in {city_en}"),
                   ("{name} kommt im {month}", "{name} arrives in {month_en}"),
                   ("{name} mag {noun}", "{name} likes {noun_en}")]),
    "es": dict(
        noun="gatos libros árboles flores manzanas perros mesas cartas casas coches lápices botellas "
             "naranjas plátanos ventanas puertas sillas estrellas lámparas tazas".split(),
        place=["la cocina", "el jardín", "la escuela", "la tienda", "la estación", "el parque"],
        city="parís berlín madrid roma viena lisboa".split(),
        month="enero febrero marzo abril mayo junio julio agosto septiembre octubre noviembre "
              "diciembre".split(),
        templates=[("{name} tiene {num} {noun}", "{name} has {num} {noun_en}"),
                   ("hay {num} {noun} en {place}", "there are {num} {noun_en} in {place_en}"),
                   ("compramos {num} {noun}", "we bought {num} {noun_en}"),
                   ("{name} y {name2} viven en {city}", "{name} and {name2} live in {city_en}"),
                   ("{name} llega en {month}", "{name} arrives in {month_en}"),
                   ("{name} compra {noun}", "{name} buys {noun_en}")]),
}
_LANG_NAMES = "anna paul sophie lucas emma hugo clara leon julia max nina felix sara tom lena david".split()


def make_sentence_in(lang, rng):
    """(sentence in `lang`, its English translation), from one of the language's templates."""
    L = _LANG[lang]
    t, t_en = L["templates"][rng.integers(len(L["templates"]))]
    i, p, c, m = (int(rng.integers(len(L[k]))) for k in ("noun", "place", "city", "month"))
    fill = dict(name=_LANG_NAMES[rng.integers(len(_LANG_NAMES))],
                name2=_LANG_NAMES[rng.integers(len(_LANG_NAMES))],
                num=str(int(rng.integers(2, 100))), noun=L["noun"][i], noun_en=_NOUNS_EN[i],
                place=L["place"][p], place_en=_PLACES_EN[p], city=L["city"][c], city_en=_CITIES_EN[c],
                month=L["month"][m], month_en=_W["month"][m])
    return t.format(**fill), t_en.format(**fill)


def _lang_jobs(lang, hours, seed):
    """As _speech_jobs for another language: (split, text, speaker id, pitch and rate jitter, translation)."""
    rng = np.random.default_rng([seed, sum(map(ord, lang))])
    order = list(LANG_VOICES)
    first = len(VOICES) + sum(len(LANG_VOICES[l]) for l in order[:order.index(lang)])
    n = max(12, int(hours * 3600 / 2.0))
    seen, jobs = set(), []
    for _ in range(50 * n):  # a language has fewer distinct sentences than English: stop when they run out
        if len(jobs) >= n:
            break
        text, en = make_sentence_in(lang, rng)
        if text in seen:
            continue
        seen.add(text)
        r = len(jobs) % 20
        split = "val" if r == 10 else "test" if r == 19 else "train"
        spk = first + int(rng.integers(len(LANG_VOICES[lang])))
        jobs.append((split, text, spk, int(rng.integers(-6, 7)), float(rng.uniform(-0.08, 0.08)), en))
    return jobs


def number_words(n):
    """0..9999 spelled out, as eSpeak will say it (so transcripts match the audio word for word)."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        return _ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " and " + number_words(n % 100))
    return number_words(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + number_words(n % 1000))


def ordinal_words(n):
    words = number_words(n).split()
    last = words[-1]
    words[-1] = _ORD.get(last, (last[:-1] + "ieth") if last.endswith("y") else last + "th")
    return " ".join(words)


_TEMPLATES = [
    "{name} {verb} the {adj} {noun} near {place}",
    "the {adj} {noun} was {adv} {verb} by {name}",
    "on {weekday} {name} {verb} {num} {noun}s",
    "{name} was born on the {ord} of {month}",
    "we {verb} {num} {adj} {noun}s at {place}",
    "did {name} see the {noun} at {place} on {weekday}",
    "the {noun} costs {num} dollars and {num2} cents",
    "my {adj} {noun} is next to the {adj2} {noun2}",
    "{name} and {name2} {verb} a {noun} in {month}",
    "there are {num} {noun}s in {place}",
    "the train leaves at {hour} {minute} on {weekday}",
    "please bring the {adj} {noun} to {place} {adv}",
    "{name} {adv} {verb} the {noun} and the {noun2}",
    "in the year {year} {name} {verb} a {adj} {noun}",
    "why is the {noun} so {adj} today",
    "{name} counted {num} {adj} {noun}s before {weekday}",
]


def make_sentence(rng):
    """One sentence from a random template: a few hundred words, numbers, dates
    (the generator of the corpus)."""
    pick = lambda k: _W[k][rng.integers(len(_W[k]))]
    t = _TEMPLATES[rng.integers(len(_TEMPLATES))]
    fill = dict(name=pick("name"), name2=pick("name"), noun=pick("noun"), noun2=pick("noun"),
                adj=pick("adj"), adj2=pick("adj"), verb=pick("verb"), place=pick("place"), adv=pick("adv"),
                month=pick("month"), weekday=pick("weekday"), num=number_words(int(rng.integers(2, 100))),
                num2=number_words(int(rng.integers(1, 100))), ord=ordinal_words(int(rng.integers(1, 32))),
                hour=number_words(int(rng.integers(1, 13))), minute=number_words(int(rng.integers(10, 60))),
                year=number_words(int(rng.integers(1000, 2100))))
    return " ".join(t.format(**fill).split())


_TMP = {}


def _espeak_tmpdir():
    if "pool" in _TMP:  # a worker of build_corpus's pool: the parent removes the folder when the pool is done
        return _TMP["pool"]
    if os.getpid() not in _TMP:
        import atexit
        import shutil
        import tempfile
        _TMP[os.getpid()] = d = tempfile.mkdtemp(prefix="nanoaudio-espeak-")
        atexit.register(shutil.rmtree, d, True)
    return _TMP[os.getpid()]


class _Espeak:
    """A thin ctypes binding of libespeak-ng (synchronous mode): text in,
    22.05 kHz int16 + word events out."""

    def __init__(self):
        import ctypes
        import espeakng_loader
        self.ct = ctypes

        class Event(ctypes.Structure):
            _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint),
                        ("text_position", ctypes.c_int), ("length", ctypes.c_int),
                        ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                        ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]
        # libespeak-ng keeps state in static variables from one utterance to the next (the same text comes
        # out a few samples different each time), so each block of utterances gets a fresh private copy of
        # the library: the audio then depends only on the block, never on what a process said before. (Some
        # utterances still come out slightly different between runs: a clock-dependent detail inside
        # libespeak-ng, not controllable here.)
        # (the copies live until the process exits: a deleted file's inode could be reused by the next
        # copy, and the dynamic loader would then hand back the old, already-used instance)
        import shutil
        _TMP["n"] = _TMP.get("n", 0) + 1
        path = os.path.join(_espeak_tmpdir(), f"libespeak-ng-{os.getpid()}-{_TMP['n']}.so")
        shutil.copy(espeakng_loader.get_library_path(), path)
        self.lib = lib = ctypes.CDLL(path)
        lib.espeak_Initialize.restype = ctypes.c_int
        # 2 = AUDIO_OUTPUT_SYNCHRONOUS
        sr = lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 0)
        if sr != ESPEAK_SR:
            raise RuntimeError(f"espeak-ng initialisation failed (returned {sr})")
        self.chunks, self.events = [], []

        def callback(wav, n, ev):
            if n > 0:
                self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            i = 0
            while ev[i].type != 0:  # 0 = LIST_TERMINATED
                if ev[i].type == 1:  # 1 = WORD: character position (1-based) and sample offset
                    self.events.append((ev[i].text_position - 1, ev[i].audio_position))
                i += 1
            return 0
        self._cb = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                    ctypes.POINTER(Event))(callback)
        lib.espeak_SetSynthCallback(self._cb)

    def say(self, text, voice, pitch, rate):
        """Returns int16 audio and [(word, start_s, end_s)] for each whitespace-separated word of text."""
        lib = self.lib
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"eSpeak has no voice {voice!r}")
        lib.espeak_SetParameter(1, int(rate), 0)   # espeakRATE, words per minute
        lib.espeak_SetParameter(3, int(pitch), 0)  # espeakPITCH, 0..100
        self.chunks, self.events = [], []
        b = text.encode()
        lib.espeak_Synth(b, len(b) + 1, 0, 1, 0, 1, None, None)  # POS_CHARACTER, espeakCHARS_UTF8
        lib.espeak_Synchronize()
        wav = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)
        # word boundaries: each word starts at its WORD event; it ends where its energy ends
        # before the next word
        spans = [(m.start(), m.group()) for m in re.finditer(r"\S+", text)]
        starts = {}
        for pos, ms in self.events:
            k = max(i for i, (s, _) in enumerate(spans) if s <= max(pos, 0)) if spans else 0
            starts.setdefault(k, ms * ESPEAK_SR // 1000)
        env = np.abs(wav.astype(np.float32))
        words, n = [], len(spans)
        known = sorted(starts)
        for i, (_, w) in enumerate(spans):
            if i not in starts:  # no event for this word (rare): interpolate between neighbours
                prev = max([k for k in known if k < i], default=None)
                nxt = min([k for k in known if k > i], default=None)
                a = starts[prev] if prev is not None else 0
                b2 = starts[nxt] if nxt is not None else len(wav)
                starts[i] = (a + (b2 - a) * (i - (prev if prev is not None else -1))
                             // ((nxt if nxt is not None else n) - (prev if prev is not None else -1)))
        for i, (_, w) in enumerate(spans):
            s = starts[i]
            e = starts[i + 1] if i + 1 < n else len(wav)
            loud = np.nonzero(env[s:e] > 300)[0]
            e2 = s + (int(loud[-1]) + 1 if len(loud) else max(1, e - s))
            words.append((w, round(s / ESPEAK_SR, 4), round(min(e2, e) / ESPEAK_SR, 4)))
        return wav.astype(np.int16), words


def _speak_block(jobs):
    """A block of utterances, spoken by one fresh eSpeak instance (runs in a worker process)."""
    engine = _Espeak()
    return [_speak(job, engine) for job in jobs]


def _speak(job, engine):
    text, spk, pitch_j, rate_j = job
    voice, pitch, rate = ALL_VOICES[spk]
    wav, words = engine.say(text, voice, min(99, max(0, pitch + pitch_j)), rate * (1 + rate_j))
    # trim leading/trailing silence but keep 50 ms, and shift word times accordingly
    loud = np.nonzero(np.abs(wav) > 200)[0]
    a = max(0, int(loud[0]) - ESPEAK_SR // 20) if len(loud) else 0
    b = min(len(wav), int(loud[-1]) + ESPEAK_SR // 20) if len(loud) else len(wav)
    wav = wav[a:b]
    off = a / ESPEAK_SR
    words = [(w, round(max(0.0, s - off), 4), round(max(0.0, e - off), 4)) for w, s, e in words]
    return wav, words


def _map(fn, jobs, workers):
    if workers <= 1 or len(jobs) < 4:
        return [fn(j) for j in jobs]
    import multiprocessing as mp
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="nanoaudio-espeak-")
    try:
        with mp.get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(
                workers, initializer=_TMP.__setitem__, initargs=("pool", d)) as pool:
            return pool.map(fn, jobs, chunksize=1)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def speak(jobs, sr=None, workers=None):
    """Speak sentences outside a corpus: [(text, speaker, pitch_jitter, rate_jitter)] ->
    [(float32 wav, words)].
    Blocks of 64 jobs, each by a fresh eSpeak instance (so the result does not depend on the worker count,
    as in build_corpus); resampled to sr when given (word times stay in seconds). Cached on disk per job list
    (data/spoken-v<version>/<hash>.npz): eSpeak says a few utterances a little differently in each process,
    and a resumed run must hear what the first run heard. The first process to finish writes the file; every
    process then reads that one, so runs started together agree too."""
    key = hashlib.md5(json.dumps([CORPUS_VERSION, ESPEAK_SR, list(map(list, jobs))]).encode()).hexdigest()
    path = os.path.join(DATA_ROOT, f"spoken-v{CORPUS_VERSION}", key + ".npz")
    if not os.path.exists(path):
        blocks = _map(_speak_block, [jobs[i:i + 64] for i in range(0, len(jobs), 64)],
                      workers or min(4, os.cpu_count() or 1))
        wavs, words = [w for b in blocks for w, _ in b], [ws for b in blocks for _, ws in b]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}.npz"
        np.savez(tmp, audio=np.concatenate(wavs + [np.zeros(0, np.int16)]), lengths=[len(w) for w in wavs],
                 words=json.dumps(words))
        try:
            os.link(tmp, path)                           # fails if another process wrote it first
        except FileExistsError:
            pass
        os.remove(tmp)
    with np.load(path) as z:
        ends, words = np.cumsum(z["lengths"]), json.loads(str(z["words"]))
        out = [(z["audio"][e - n:e].astype(np.float32) / 32768.0, [tuple(w) for w in ws])
               for e, n, ws in zip(ends, z["lengths"], words)]
    return [(resample(w, ESPEAK_SR, sr) if sr and sr != ESPEAK_SR else w, words) for w, words in out]


def _speech_jobs(hours, seed):
    """Sentences (unique across the whole corpus), speakers and jitter, and the split of each utterance."""
    rng = np.random.default_rng(seed)
    n = max(12, int(hours * 3600 / 2.67))  # eSpeak sentences here last ~2.7 s
    seen, jobs = set(), []
    while len(jobs) < n:
        text = make_sentence(rng)
        if text in seen:
            continue
        seen.add(text)
        r = len(jobs) % 20  # 90 % train, 5 % val, 5 % test (round robin keeps tiny corpora split too)
        split = "val" if r == 10 else "test" if r == 19 else "train"
        spk = (TEST_ONLY_SPEAKER if split == "test" and len(jobs) % 40 == 19
               else int(rng.integers(NUM_SPEAKERS - 1)))
        jobs.append((split, text, spk, int(rng.integers(-6, 7)), float(rng.uniform(-0.08, 0.08))))
    return jobs


_QA = [
    ("what is {a} plus {b}", "{a} plus {b} is {c}", lambda a, b: a + b),
    ("what is {a} times {b}", "{a} times {b} is {c}", lambda a, b: a * b),
    ("what is {a} minus {b}", "{a} minus {b} is {c}", lambda a, b: a - b),
]
FACTS = [("what color is the sky", "the sky is blue"),
          ("how many days are in a week", "there are seven days in a week"),
          ("what color is grass", "grass is green"),
          ("how many legs does a spider have", "a spider has eight legs"),
          ("what is the first month of the year", "the first month is january"),
          ("how many hours are in a day", "there are twenty four hours in a day"),
          ("what do bees make", "bees make honey"),
          ("what is frozen water called", "frozen water is called ice"),
          ("which day comes after monday", "tuesday comes after monday"),
          ("how many minutes are in an hour", "there are sixty minutes in an hour")]
_OPENERS = ["hello", "hi there", "good morning", "hey"]
_REPLIES = ["hello how can i help", "hi what would you like to know", "good morning ask me anything"]


def _dialogue_script(rng):
    """A conversation: greeting, then 2-4 question/answer turns; user on channel 0, assistant on channel 1."""
    turns = [(0, _OPENERS[rng.integers(len(_OPENERS))]), (1, _REPLIES[rng.integers(len(_REPLIES))])]
    for _ in range(int(rng.integers(2, 5))):
        if rng.random() < 0.6:
            q, a, f = _QA[rng.integers(len(_QA))]
            x, y = int(rng.integers(2, 13)), int(rng.integers(1, 13))
            if f is _QA[2][2] and y > x:
                x, y = y, x
            fill = dict(a=number_words(x), b=number_words(y), c=number_words(f(x, y)))
            turns += [(0, q.format(**fill)), (1, a.format(**fill))]
        else:
            q, a = FACTS[rng.integers(len(FACTS))]
            turns += [(0, q), (1, a)]
    turns += [(0, "thank you"), (1, "you are welcome")]
    return turns


def _build_dialogue(idx, hours, seed):
    rng = np.random.default_rng([seed, 7, idx])
    user, asst = int(rng.integers(NUM_SPEAKERS - 1)), int(rng.integers(NUM_SPEAKERS - 1))
    turns = _dialogue_script(rng)
    pieces, t, engine = [], 0.3, _Espeak()
    for ch, text in turns:
        wav, words = _speak((text, user if ch == 0 else asst, int(rng.integers(-4, 5)),
                             float(rng.uniform(-0.05, 0.05))), engine)
        # turn-taking: usually a pause, sometimes the next speaker comes in early (overlap, §dialogue)
        pieces.append((ch, t, wav, words, text))
        gap = float(rng.uniform(-0.25, 0.0)) if rng.random() < 0.2 else float(rng.uniform(0.15, 0.8))
        t = max(t + 0.1, t + len(wav) / ESPEAK_SR + gap)
    # occasional backchannel from the user while the assistant speaks
    total = int((t + 0.3) * ESPEAK_SR)
    out = np.zeros((2, total), np.int32)
    chan_words, lines = ([], []), []
    for ch, start, wav, words, text in pieces:
        s = int(start * ESPEAK_SR)
        out[ch, s:s + len(wav)] += wav[: total - s]
        chan_words[ch].extend((w, round(a + start, 4), round(b + start, 4)) for w, a, b in words)
        lines.append(("user" if ch == 0 else "assistant") + ": " + text)
    return np.clip(out, -32768, 32767).astype(np.int16), chan_words, " / ".join(lines), (user, asst)


def _note(rng, sr, dur, f0, kind):
    """One note: a harmonic wavetable read at pitch f0, times an envelope
    (cheap: one table lookup a sample)."""
    decay = {"pluck": rng.uniform(2.5, 6), "pad": 0.7}.get(kind, 1.2)
    t = np.arange(int(min(dur, 7.0 / decay) * sr), dtype=np.float32) / sr  # stop once the envelope is ~1e-3
    ph = np.arange(2048) / 2048 * 2 * np.pi
    if kind == "pluck":  # bright attack, exponential decay
        table = sum((0.6 ** k) * np.sin((k + 1) * ph + rng.uniform(0, 6.28)) for k in range(6))
        env, phase = np.exp(-t * decay), f0 * t
    elif kind == "pad":  # soft, slow attack
        table = sum((0.4 ** k) * np.sin((k + 1) * ph) for k in range(4))
        env, phase = np.minimum(1, t / 0.15) * np.exp(-t * decay), f0 * t
    else:  # "square-ish" lead with vibrato
        table = sum(np.sin((2 * k + 1) * ph) / (2 * k + 1) for k in range(5))
        env = np.minimum(1, t / 0.02) * np.exp(-t * decay)
        phase = np.cumsum(f0 * (1 + 0.004 * np.sin(2 * np.pi * 5.5 * t))) / sr
    return table[(phase * 2048).astype(np.int64) % 2048] * env


def _drum(rng, sr, kind):
    t = np.arange(int(0.35 * sr)) / sr
    if kind == "kick":  # pitch-swept sine
        return np.sin(2 * np.pi * (50 + 120 * np.exp(-t * 25)) * t) * np.exp(-t * 12)
    if kind == "snare":
        return (rng.standard_normal(len(t)) * 0.6 + np.sin(2 * np.pi * 190 * t)) * np.exp(-t * 18)
    return rng.standard_normal(len(t)) * np.exp(-t * 60) * 0.5  # hat


def _build_music(idx, seed):
    """A 4-8 s stereo clip at 24 kHz: a chord progression, a melody, percussion, panned."""
    rng = np.random.default_rng([seed, 11, idx])
    sr, bpm = MUSIC_SR, float(rng.uniform(80, 150))
    beat = 60 / bpm
    n_beats = int(rng.integers(8, 17))
    dur = n_beats * beat + 0.5
    out = np.zeros((2, int(dur * sr)))
    root = 110 * 2 ** (rng.integers(0, 12) / 12)
    scale = [0, 2, 4, 5, 7, 9, 11] if rng.random() < 0.6 else [0, 2, 3, 5, 7, 8, 10]

    def add(sig, start, pan, gain):
        s = int(start * sr)
        n = min(len(sig), out.shape[1] - s)
        if n > 0:
            out[0, s:s + n] += sig[:n] * gain * (1 - pan)
            out[1, s:s + n] += sig[:n] * gain * pan
    pad_kind, lead_kind = ("pad", "pluck") if rng.random() < 0.5 else ("pluck", "lead")
    for bar in range(0, n_beats, 4):  # chords, one per bar
        deg = int(rng.choice([0, 3, 4, 5]))
        for k in (0, 2, 4):
            semi = scale[(deg + k) % 7] + 12 * ((deg + k) // 7)
            add(_note(rng, sr, 4 * beat, root * 2 ** (semi / 12), pad_kind), bar * beat, 0.35, 0.12)
    for b in range(n_beats * 2):  # melody, eighth notes with rests
        if rng.random() < 0.7:
            semi = scale[rng.integers(7)] + 12 * int(rng.integers(1, 3))
            add(_note(rng, sr, beat, root * 2 ** (semi / 12), lead_kind), b * beat / 2, 0.65, 0.15)
    if rng.random() < 0.8:  # percussion
        for b in range(n_beats):
            add(_drum(rng, sr, "kick" if b % 2 == 0 else "snare"), b * beat, 0.5, 0.35)
            add(_drum(rng, sr, "hat"), (b + 0.5) * beat, 0.7, 0.2)
    peak = np.abs(out).max() + 1e-9
    out = out / peak * rng.uniform(0.3, 0.9)
    return np.round(out * 32767).astype(np.int16)


def _corpus_dir(kind, hours, seed):
    return os.path.join(DATA_ROOT, f"{kind}-v{CORPUS_VERSION}-{hours:g}h-seed{seed}")


def build_corpus(kind="speech", hours=2.0, seed=1337, workers=None, verbose=True):
    """Generate (once) and cache a built-in corpus:
    data/<kind>-v<version>-<hours>h-seed<seed>/{audio.npy,manifest.json}.
    speech: `hours` of eSpeak sentences; dialogue and music: a quarter of that each."""
    path = _corpus_dir(kind, hours, seed)
    man_path = os.path.join(path, "manifest.json")
    if os.path.exists(man_path):
        with open(man_path) as f:
            man = json.load(f)
        if man.get("version") == CORPUS_VERSION and os.path.exists(os.path.join(path, "audio.npy")):
            return path
    workers = workers or min(4, os.cpu_count() or 1)
    t0 = time.time()
    items, audio = [], []
    if kind == "speech":
        jobs = _speech_jobs(hours, seed)
        todo = [(t, s, p, r) for _, t, s, p, r in jobs]
        blocks = _map(_speak_block, [todo[i:i + 64] for i in range(0, len(todo), 64)], workers)
        results = [r for b in blocks for r in b]
        for i, ((split, text, spk, _, _), (wav, words)) in enumerate(zip(jobs, results)):
            items.append(dict(id=f"speech{i:06d}", split=split, text=text, words=words, speaker=spk,
                              speaker_name=VOICES[spk][0], channels=1, length=len(wav), sr=ESPEAK_SR))
            audio.append(wav)
    elif kind.startswith("speech-") and kind[7:] in _LANG:
        lang = kind[7:]
        jobs = _lang_jobs(lang, hours, seed)
        todo = [(t, s, p, r) for _, t, s, p, r, _ in jobs]
        blocks = _map(_speak_block, [todo[i:i + 64] for i in range(0, len(todo), 64)], workers)
        results = [r for b in blocks for r in b]
        for i, ((split, text, spk, _, _, en), (wav, words)) in enumerate(zip(jobs, results)):
            items.append(dict(id=f"speech-{lang}{i:06d}", split=split, text=text, words=words, speaker=spk,
                              speaker_name=ALL_VOICES[spk][0], channels=1, length=len(wav), sr=ESPEAK_SR,
                              language=lang, translation=en))
            audio.append(wav)
    elif kind == "dialogue":
        n = max(6, int(hours / 4 * 3600 / 16.5))  # ~16 s per conversation
        results = _map(_dialogue_job, [(i, hours, seed) for i in range(n)], workers)
        for i, (wav, chan_words, text, spk) in enumerate(results):
            split = _split_for(i, n)
            items.append(dict(id=f"dialogue{i:05d}", split=split, text=text, words=chan_words, speaker=spk[0],
                              speaker_name=f"{VOICES[spk[0]][0]}|{VOICES[spk[1]][0]}", channels=2,
                              length=wav.shape[1], sr=ESPEAK_SR))
            audio.append(wav.reshape(-1))
    elif kind == "music":
        n = max(6, int(hours / 4 * 3600 / 6))
        results = _map(_music_job, [(i, seed) for i in range(n)], workers)
        for i, wav in enumerate(results):
            split = _split_for(i, n)
            items.append(dict(id=f"music{i:05d}", split=split, text="", words=[], speaker=0,
                              speaker_name="synth", channels=2, length=wav.shape[1], sr=MUSIC_SR))
            audio.append(wav.reshape(-1))
    else:
        raise ValueError(f"unknown corpus kind {kind!r} (speech, dialogue, music, or speech-LANG with "
                         f"LANG in {', '.join(_LANG)})")
    offset = 0
    for it, a in zip(items, audio):
        it["offset"], offset = offset, offset + len(a)
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, f"audio.npy.tmp{os.getpid()}.npy")  # per process: two runs may build it at once
    np.save(tmp, np.concatenate(audio).astype(np.int16))
    os.replace(tmp, os.path.join(path, "audio.npy"))
    secs = sum(it["length"] for it in items) / (items[0]["sr"] if items else 1)
    with open(man_path + f".tmp{os.getpid()}", "w") as f:
        json.dump(dict(version=CORPUS_VERSION, kind=kind, seed=seed, hours=hours, seconds=secs,
                       build_seconds=time.time() - t0, items=items), f)
    os.replace(man_path + f".tmp{os.getpid()}", man_path)
    if verbose:
        log(f"built the {kind} corpus: {len(items)} clips, {secs / 3600:.2f} h of audio in "
            f"{time.time() - t0:.1f} s -> {path}")
    return path


def _split_for(i, n):
    """90/5/5 round robin; a corpus of under 20 clips still gets one val and one test clip."""
    if n < 20:
        return "test" if i == n - 1 else "val" if i == n - 2 else "train"
    return "val" if i % 20 == 10 else "test" if i % 20 == 19 else "train"


def _dialogue_job(a):
    return _build_dialogue(*a)


def _music_job(a):
    return _build_music(*a)
