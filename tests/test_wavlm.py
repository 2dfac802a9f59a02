"""Tests for wavlm.py: parameter counts, the bucket function and the gate against hand computations, span-mask
statistics, utterance mixing, a golden training step against a literal transcription of the objective, the
official key map (round trip, and parity with the pip `transformers` WavLMModel), and the command line."""
import copy
import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import common
import wavlm
from cli import check_cli_contract, error_of, require, run_script


def tiny_cfg(**kw):
    cfg = wavlm.Config(**wavlm.PRESETS["tiny"])
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


RT = common.Runtime(torch.device("cpu"), "cpu", torch.float32)


# ----------------------------------------------------------------------------- sizes

def test_param_counts_match_the_paper():
    """Paper Table 1: Base 94.70 M, Large 316.62 M (with the pre-training head); the official files /
    transformers hold the encoder: 94,381,936 and 315,453,120."""
    want = {"base": (94_706_800, 94_381_936), "base_plus": (94_706_800, 94_381_936),
            "large": (316_624_320, 315_453_120)}
    for name, (total, enc) in want.items():
        with torch.device("meta"):
            m = wavlm.WavLM(wavlm.Config(**wavlm.PRESETS[name]))
        assert common.count_params(m) == total and wavlm.encoder_params(m) == enc, name
    assert math.floor(94_706_800 / 1e4) / 100 == 94.70 and round(316_624_320 / 1e6, 2) == 316.62


def test_frames_are_50_hz():
    cfg = wavlm.Config()
    assert wavlm.num_frames(cfg, 16000) == 49 and wavlm.num_frames(cfg, 16320) == 50
    m = wavlm.WavLM(tiny_cfg()).eval()
    with torch.no_grad():
        hidden, out = m.extract(torch.randn(2, 16000) * 0.1)
    assert len(hidden) == 3 and out.shape == (2, 49, 32)
    assert wavlm.mfcc(torch.randn(2, 16000))[0].shape == (49, 39)

# ----------------------------------------------------------------------------- position bias and gate

def test_bucket_function_hand_computed():
    """320 buckets, max distance 800: 160 per sign (+160 for j > i); |r| < 80 exact; else
    80 + floor(ln(|r|/80) / ln(10) * 80), capped at 159."""
    rel = torch.tensor([0, -1, 1, -79, 79, -80, 80, -200, 200, -799, -800, 5000, -5000])
    want = [0, 1, 161, 79, 239, 80, 240, 111, 271, 159, 159, 319, 159]
    assert wavlm.relative_position_bucket(rel, 320, 800).tolist() == want
    # 80 + floor(ln(2.5)/ln(10)*80) = 80 + floor(31.83) = 111
    assert 80 + math.floor(math.log(2.5) / math.log(10) * 80) == 111


def test_one_bias_table_shared_by_all_layers():
    m = wavlm.WavLM(tiny_cfg(layers=3))
    tables = [n for n, _ in m.named_parameters() if "relative_attention_bias" in n]
    assert tables == ["encoder.relative_attention_bias.weight"]
    assert sum(1 for n, _ in m.named_parameters() if n.endswith("grep_a")) == 3   # a gate per layer


def test_gate_formula_and_attention_with_the_gated_bias():
    """gate_a, gate_b = sigmoid(sum of grep_linear(x_h)[0:4]), sigmoid(sum of [4:8]) from the attention's
    input split per head; bias = (gate_a * (gate_b * grep_a - 1) + 2) * d; logits = q k / sqrt(d_h) + bias."""
    torch.manual_seed(0)
    cfg = tiny_cfg(dim=16, heads=2)
    att = wavlm.GatedSelfAttention(cfg)
    with torch.no_grad():
        att.grep_a.copy_(torch.tensor([0.5, 2.0]).view(1, 2, 1, 1))
    B, T, H, dh = 2, 7, 2, 8
    x = torch.randn(B, T, 16)
    g = att.gate(x)
    assert g.shape == (B, H, T, 1)
    for b, h, t in [(0, 0, 0), (1, 1, 6), (0, 1, 3)]:
        z = att.grep_linear.weight @ x[b, t, h * dh:(h + 1) * dh] + att.grep_linear.bias
        ga, gb = torch.sigmoid(z[:4].sum()), torch.sigmoid(z[4:].sum())
        assert torch.allclose(g[b, h, t, 0], ga * (gb * att.grep_a[0, h, 0, 0] - 1) + 2, atol=1e-6)
    pos = torch.randn(1, H, T, T)
    y = att(x, pos)
    q, k, v = (p(x).view(B, T, H, dh).transpose(1, 2) for p in (att.q_proj, att.k_proj, att.v_proj))
    logits = q @ k.transpose(-1, -2) / math.sqrt(dh) + g * pos
    ref = att.out_proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, T, 16))
    assert torch.allclose(y, ref, atol=1e-5)

# ----------------------------------------------------------------------------- masking and mixing

def test_span_mask_statistics():
    """int(p T + U) spans of l frames per utterance, starts without replacement in [0, T - l): the masked
    fraction is the exact expectation 1 - mean_t C(N - c_t, n) / C(N, n) (c_t: starts that cover t)."""
    cfg = wavlm.Config()
    B, T, l, N = 64, 1000, 10, 990
    torch.manual_seed(0)
    m = wavlm.span_mask(B, T, cfg)
    n = int(0.08 * T)  # 80 (the random rounding adds at most 1)
    def p_unmasked(c):
        return math.exp(math.lgamma(N - c + 1) - math.lgamma(N - c - n + 1) - math.lgamma(N + 1) + math.lgamma(N - n + 1))
    expected = 1 - np.mean([p_unmasked(min(t, N - 1) - max(0, t - l + 1) + 1) for t in range(T)])
    assert abs(m.float().mean().item() - expected) < 0.01, (m.float().mean().item(), expected)
    assert 0.5 < expected < 0.6                         # ~ 1 - (1 - 0.08)^10 = 0.566
    for row in m[:8]:                                   # every masked run is a union of whole spans: >= l long
        runs = [len(r) for r in re.findall("1+", "".join("1" if v else "0" for v in row.tolist()))]
        assert min(runs) >= l and not row[-1]           # starts < T - l: never reaches the last frame
    assert (wavlm.span_mask(4, 30, cfg).sum(1) >= 2 * l).all()   # min 2 spans on short inputs


def test_masked_frames_get_mask_emb_and_only_they():
    torch.manual_seed(0)
    m = wavlm.WavLM(tiny_cfg()).eval()
    wav = torch.randn(2, 16000) * 0.1
    T = wavlm.num_frames(m.cfg, 16000)
    mask = wavlm.span_mask(2, T, m.cfg)
    seen = []
    h = m.encoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        m.extract(wav, mask)
        m.extract(wav)
    h.remove()
    masked, clean = seen
    assert torch.equal(masked[mask], m.mask_emb.expand(int(mask.sum()), -1))
    assert torch.equal(masked[~mask], clean[~mask])


def test_utterance_mixing_keeps_half_and_adds_another_voice():
    cfg = wavlm.Config(mix_prob=1.0)
    torch.manual_seed(0)
    wav = torch.randn(6, 4000) * torch.tensor([0.1, 0.5, 1.0, 0.2, 0.3, 0.05])[:, None]
    mixed, events = wavlm.mix_utterances(wav, cfg, torch.Generator().manual_seed(3))
    assert len(events) >= 5
    for i, j, dst, src, n, scale in events:
        assert 0 < n <= 4000 // 2 and j != i and j >= 0
        diff = mixed[i] - wav[i]
        assert diff[:dst].abs().max() == 0 and diff[dst + n:].abs().max() == 0 if dst + n < 4000 else True
        assert torch.allclose(diff[dst:dst + n], scale * wav[j, src:src + n], atol=1e-6)
        ratio = 10 * math.log10(wav[i].pow(2).mean() / (scale ** 2 * wav[j, src:src + n].pow(2).mean()))
        assert -5.01 <= ratio <= 5.01
    untouched = set(range(6)) - {e[0] for e in events}
    assert all(torch.equal(mixed[i], wav[i]) for i in untouched)
    assert torch.equal(wavlm.mix_utterances(wav, wavlm.Config(mix_prob=0.0))[0], wav)
    noisy, ev = wavlm.mix_utterances(wav, wavlm.Config(mix_prob=1.0, noise_prob=1.0), torch.Generator().manual_seed(1))
    assert all(e[1] == -1 for e in ev) and not torch.equal(noisy, wav)

# ----------------------------------------------------------------------------- training

def _state(cfg, seed=0):
    torch.manual_seed(seed)
    state = wavlm.build(cfg, RT)
    state["km"].fit(torch.randn(400, 39) * 3, 3, 0)
    return state


def test_golden_train_step():
    """One real train_step (SGD) against the objective written out here: targets = k-means ids of the CLEAN
    waveform's MFCCs; the input is the mixed waveform with masked frames replaced by mask_emb; logits =
    cos(final_proj(h_t), e_c) / 0.1; cross-entropy over the masked frames only; CNN gradients x 0.1."""
    cfg = tiny_cfg(mix_prob=1.0, grad_clip=1e9, feature_grad_mult=0.1)
    state = _state(cfg)
    ref = copy.deepcopy(state["model"])
    lr = 0.05
    state["opt"] = torch.optim.SGD(state["model"].parameters(), lr=lr)
    state["sched"] = torch.optim.lr_scheduler.LambdaLR(state["opt"], lambda s: 1.0)
    torch.manual_seed(1)
    wav = torch.randn(3, 16000) * 0.1
    torch.manual_seed(5)
    out = wavlm.train_step(state, wav, cfg, RT)
    # the same random draws, in the documented order: mixing, then masks
    torch.manual_seed(5)
    mixed, events = wavlm.mix_utterances(wav, cfg)
    assert events
    T = wavlm.num_frames(cfg, 16000)
    mask = wavlm.span_mask(3, T, cfg)
    feats = wavlm.mfcc(wav)                                               # the clean primaries
    x = (feats - state["km"].mean) / state["km"].std
    targets = ((x[:, :, None, :] - state["km"].centroids[None, None]) ** 2).sum(-1).argmin(-1)
    targets = torch.cat([targets, targets[:, -1:].expand(-1, T - targets.shape[1])], 1)[:, :T]
    ref.train()
    ref.cfg = copy.copy(ref.cfg)
    ref.cfg.feature_grad_mult = 1.0     # the reference scales the CNN's gradients itself, below
    _, h = ref.extract(mixed, mask)
    p = h @ ref.final_proj.weight.t() + ref.final_proj.bias
    cos = (p[:, :, None, :] * ref.label_embs[None, None]).sum(-1) / (p.norm(dim=-1)[..., None] * ref.label_embs.norm(dim=-1))
    logp = torch.log_softmax(cos / 0.1, -1)
    loss = -(logp.gather(-1, targets[..., None])[..., 0] * mask).sum() / mask.sum()
    assert abs(out["loss"].item() - loss.item()) < 1e-5
    loss.backward()
    for (n, p_new), (_, p_old) in zip(state["model"].named_parameters(), ref.named_parameters()):
        g = p_old.grad if p_old.grad is not None else torch.zeros_like(p_old)
        g = g * 0.1 if n.startswith("feature_extractor.") else g
        assert torch.allclose(p_new, p_old - lr * g, atol=1e-6, rtol=1e-4), n


class DeviceReads(TorchDispatchMode):
    """Records the ATen ops that make a GPU step wait for the device: a value read back (.item(), bool()) or an
    output whose shape depends on the data (boolean-mask indexing, nonzero)."""
    SYNCS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique_consecutive",
             "aten::_unique2"}

    def __enter__(self):
        self.found = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        bool_index = func._schema.name in ("aten::index", "aten::index_put", "aten::index_put_") and any(
            getattr(i, "dtype", None) == torch.bool for i in (args[1] if len(args) > 1 else ()) if i is not None)
        if func._schema.name in self.SYNCS or bool_index:
            self.found.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_compiled_train_step_equals_eager_without_host_sync():
    # torch.compile forced on, on the CPU. The model traces as ONE graph through AOTAutograd (fullgraph=True: an
    # .item(), a data-dependent branch or shape would break it: a GPU step would stall there; backend aot_eager:
    # inductor's graph capture, forward and backward, without its minutes of C++ codegen on this CPU), and so
    # does the masked loss (no logits[mask]: boolean indexing has a data-dependent shape). Mixing draws its
    # choices on the host but never reads the batch back: it runs on a meta tensor, where any .item() or .cpu()
    # would raise. Two train_steps then give the eager losses and weights.
    cfg = tiny_cfg(mix_prob=1.0, compile=True)
    eager, comp = _state(cfg), _state(cfg)
    model = comp["model"]
    comp["model"] = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss_fn = torch.compile(wavlm.masked_prediction_loss, backend="aot_eager", fullgraph=True)
    logits, targets = torch.randn(2, 7, 5), torch.randint(0, 5, (2, 7))
    mask = torch.rand(2, 7) < 0.5
    with DeviceReads() as reads:                                          # no nonzero / .item() inside
        want = wavlm.masked_prediction_loss(logits, targets, mask)
        model.train()(torch.randn(2, 16000) * 0.1, torch.rand(2, 49) < 0.5)          # (eager: modes do not compile)
    assert not reads.found, reads.found
    for got, w in zip(loss_fn(logits, targets, mask), want):
        torch.testing.assert_close(got, w)
    lm = logits[mask]                                                     # the definition, by indexing
    torch.testing.assert_close(want[0], F.cross_entropy(lm, targets[mask]))
    torch.testing.assert_close(want[2], (logits[~mask].argmax(-1) == targets[~mask]).float().mean())
    meta = torch.randn(3, 4000).to("meta")
    for c in (cfg, tiny_cfg(mix_prob=1.0, noise_prob=1.0)):
        mixed, ev = wavlm.mix_utterances(meta, c, torch.Generator().manual_seed(0))
        assert ev and mixed.is_meta
    torch.manual_seed(3)
    wav = torch.randn(3, 16000) * 0.1
    for s in range(2):
        torch.manual_seed(20 + s)
        a = wavlm.train_step(eager, wav, cfg, RT)
        torch.manual_seed(20 + s)
        b = wavlm.train_step(comp, wav, cfg, RT)
        for k in ("loss", "acc_m", "gnorm"):
            assert abs(a[k].item() - b[k].item()) <= 1e-4 * (1 + abs(a[k].item())), (s, k)
    for (k, p), q in zip(eager["model"].named_parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=k)


def test_loss_falls_on_one_batch():
    cfg = tiny_cfg(mix_prob=0.0, lr=3e-3, warmup=1, max_iters=1000)
    state = _state(cfg)
    torch.manual_seed(2)
    wav = torch.randn(2, 16000) * 0.1 * torch.sin(torch.linspace(0, 40, 16000)) ** 2
    first = None
    for i in range(30):
        torch.manual_seed(9)   # the same masks every step: a fixed problem to overfit
        out = wavlm.train_step(state, wav, cfg, RT)
        first = first if first is not None else out["loss"].item()
    assert out["loss"].item() < first / 3, (first, out["loss"].item())


def test_kmeans_recovers_clusters():
    torch.manual_seed(0)
    centers = torch.randn(4, 5) * 10
    x = (centers[:, None] + torch.randn(4, 200, 5)).reshape(-1, 5)
    km = wavlm.KMeans(4, 5)
    km.fit(x, 10, 0)
    ids = km(x[None])[0].view(4, 200)
    assert all(len(set(r.tolist())) == 1 for r in ids) and len(set(ids[:, 0].tolist())) == 4

# ----------------------------------------------------------------------------- official weights

def test_official_key_map_round_trips(tmp_path):
    for kw in (dict(), dict(extractor_mode="layer_norm", layer_norm_first=True, normalize=True, conv_bias=True)):
        torch.manual_seed(0)
        cfg = tiny_cfg(**kw)
        cfg.conv_layers = tuple((32, k, s) for _, k, s in wavlm.BASE_CONV)
        m = wavlm.WavLM(cfg)
        off = wavlm.to_official(m)
        keys = set(off["model"])
        assert "encoder.layers.0.self_attn.relative_attention_bias.weight" in keys and "encoder.pos_conv.0.weight_g" in keys
        assert ("feature_extractor.conv_layers.1.2.1.weight" in keys) == (cfg.extractor_mode == "layer_norm")
        path = tmp_path / "WavLM-test.pt"
        torch.save(off, path)
        back = torch.load(path, weights_only=True)
        c2 = wavlm.Config()
        wavlm.config_from_official(c2, back)
        for k in wavlm.ARCH_KEYS[:wavlm.ARCH_KEYS.index("final_dim")]:
            assert common._norm(getattr(c2, k)) == common._norm(getattr(cfg, k)), k
        m2 = wavlm.WavLM(c2)
        wavlm.load_official_into(m2, back)
        sd1, sd2 = m.state_dict(), m2.state_dict()
        for k, v in sd1.items():
            if not k.startswith(("final_proj", "label_embs")):
                assert torch.equal(v, sd2[k]), k


def _hf_to_official(sd, layer_norm_mode):
    """transformers' WavLMModel names -> the official unilm names (reference card §1.4)."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"feature_extractor\.conv_layers\.(\d+)\.(conv|layer_norm)\.(weight|bias)", k)
        if m:
            i, part, p = m.groups()
            k = f"feature_extractor.conv_layers.{i}." + ("0." if part == "conv" else "2.1." if layer_norm_mode else "2.") + p
        for a, b in (("feature_projection.layer_norm", "layer_norm"), ("feature_projection.projection", "post_extract_proj"),
                     ("masked_spec_embed", "mask_emb"),
                     ("encoder.pos_conv_embed.conv.parametrizations.weight.original0", "encoder.pos_conv.0.weight_g"),
                     ("encoder.pos_conv_embed.conv.parametrizations.weight.original1", "encoder.pos_conv.0.weight_v"),
                     ("encoder.pos_conv_embed.conv.bias", "encoder.pos_conv.0.bias"),
                     ("attention.gru_rel_pos_const", "self_attn.grep_a"), ("attention.gru_rel_pos_linear", "self_attn.grep_linear"),
                     ("attention.rel_attn_embed", "self_attn.relative_attention_bias"), (".attention.", ".self_attn."),
                     ("feed_forward.intermediate_dense", "fc1"), ("feed_forward.output_dense", "fc2")):
            k = k.replace(a, b)
        k = re.sub(r"(encoder\.layers\.\d+\.)layer_norm", r"\1self_attn_layer_norm", k)
        out[k] = v
    return out


@pytest.mark.parametrize("kind", ["base", "large-shaped"])
def test_parity_with_transformers(kind, tmp_path):
    """transformers.WavLMModel with random weights -> the official file format -> wavlm.py via --init_from's
    loader (size inferred from the file): every layer's output within 1e-5."""
    transformers = require("transformers", "transformers")
    torch.manual_seed(0)
    large = kind != "base"
    if large:   # Large's structure (pre-LN, LN conv blocks, waveform normalisation) at a test size
        hc = transformers.WavLMConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                                      conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                                      feat_extract_norm="layer", do_stable_layer_norm=True)
    else:       # the Base configuration (its width, heads, buckets, conv encoder) with 3 of its 12 layers
        with torch.device("meta"):
            full = transformers.WavLMModel(transformers.WavLMConfig())
        assert sum(p.numel() for p in full.parameters()) == 94_381_936
        hc = transformers.WavLMConfig(num_hidden_layers=3)
    for k in ("hidden_dropout", "attention_dropout", "activation_dropout", "feat_proj_dropout", "layerdrop"):
        setattr(hc, k, 0.0)
    hf = transformers.WavLMModel(hc).eval()
    with torch.no_grad():   # perturb every weight so no parameter (gate constants, norms) sits at a neutral value
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "WavLM-random.pt"
    torch.save({"cfg": {"layer_norm_first": large, "normalize": large, "max_distance": hc.max_bucket_distance},
                "model": _hf_to_official(hf.state_dict(), large)}, path)
    model, km, cfg = wavlm.load_any(str(path), RT)
    assert km is None and cfg.layers == hc.num_hidden_layers and cfg.dim == hc.hidden_size
    assert cfg.layer_norm_first == large and cfg.extractor_mode == ("layer_norm" if large else "default")
    assert wavlm.encoder_params(model) == sum(p.numel() for p in hf.parameters())
    wav = torch.randn(2, 8000) * 0.1
    with torch.no_grad():
        o = hf(F.layer_norm(wav, wav.shape[-1:]) if large else wav, output_hidden_states=True)
        hidden, out = model.extract(wav)
    assert len(o.hidden_states) == len(hidden)
    for i, (a, b) in enumerate(zip(o.hidden_states, hidden)):
        assert (a - b).abs().max().item() < 1e-5, i
    assert (o.last_hidden_state - out).abs().max().item() < 1e-5

# ----------------------------------------------------------------------------- command line

def test_cli_contract_features_probe_iteration2(tmp_path):
    out = check_cli_contract("wavlm.py", tmp_path, bench_keys=("train_audio_s_per_s", "features_rtf_eager",
                                                               "train_flops_per_step", "train_tflops"))
    assert "eval | split test" in out["eval"] and "acc_m_mixed" in out["eval"]
    # the rest in-process (a subprocess costs seconds of imports): features, probes, iteration 2
    d = tmp_path / "run"
    def cfg_for(**kw):
        return common.parse_config(wavlm.Config, wavlm.PRESETS, [f"--{k}={v}" for k, v in kw.items()],
                                   modes=("train", "features", "probe"))
    wavlm.features(cfg_for(mode="features", init_from=f"{d}/ckpt.pt", feature_layer=1, feature_splits="val,test"))
    index = json.load(open(d / "features" / "index.json"))
    assert index["frame_rate"] == 50 and index["dim"] == 32 and index["layer"] == 1 and index["items"]
    it = index["items"][0]
    f = np.load(d / "features" / it["path"])
    assert f.shape == (it["frames"], 32) and f.dtype == np.float32
    assert it["frames"] == wavlm.num_frames(wavlm.Config(), round(it["seconds"] * 16000))
    # the official format, no preset flag: the size comes from the file
    torch.save(wavlm.to_official(wavlm.WavLM(tiny_cfg(layers=3))), tmp_path / "WavLM-tiny.pt")
    wavlm.features(cfg_for(mode="features", init_from=f"{tmp_path}/WavLM-tiny.pt", out_dir=f"{tmp_path}/off",
                           feature_splits="test", feature_layer=3))
    assert json.load(open(tmp_path / "off" / "features" / "index.json"))["dim"] == 32
    res = wavlm.probe(cfg_for(mode="probe", init_from=f"{d}/ckpt.pt"))
    assert {("clean", "mfcc"), ("mixed", "layer2")} <= set(res) and all(0 <= a <= 1 for v in res.values() for a in v)
    # HuBERT iteration 2: re-cluster the first model's layer-1 features, train a fresh model on them
    wavlm.train(cfg_for(preset="tiny", device="cpu", max_iters=2, targets="features", teacher=f"{d}/ckpt.pt",
                        target_layer=1, out_dir=f"{tmp_path}/it2"))
    ck = torch.load(tmp_path / "it2" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 2 and ck["models"]["km"]["centroids"].shape == (8, 32) and "teacher" in ck["models"]


def test_bad_input_gives_one_error_line(tmp_path):
    for flags, msg in ((["--targets=hubert"], "--targets must be"), (["--targets=features"], "--teacher"),
                       (["--mix_max_frac=0.8"], "mix_max_frac"), (["--segment=1000"], "--segment"),
                       (["--teacher=/nonexistent.pt"], "does not exist")):
        with pytest.raises(SystemExit, match=msg):   # Config.validate, through parse_config (no subprocess)
            common.parse_config(wavlm.Config, wavlm.PRESETS, ["--preset=tiny", *flags],
                                modes=("train", "sample", "eval", "bench", "features", "probe"))
    # errors past parse_config, in a real process: one line, no traceback
    assert "needs a model" in error_of("wavlm.py", "--preset=tiny", "--mode=eval")
    torch.save(wavlm.to_official(wavlm.WavLM(tiny_cfg())), tmp_path / "WavLM-tiny.pt")
    line = error_of("wavlm.py", "--preset=tiny", "--dim=64", "--max_iters=1", f"--init_from={tmp_path}/WavLM-tiny.pt",
                    f"--out_dir={tmp_path}/x")
    assert "--dim=32" in line, line
    # load_for_inference checks the file before common.setup prints anything, so these are one line too
    bad = tmp_path / "junk.pt"
    torch.save({"foo": torch.zeros(1)}, bad)
    for mode, path, msg in (("features", bad, "neither"), ("eval", tmp_path / "WavLM-tiny.pt", "no head or targets")):
        with pytest.raises(SystemExit, match=msg):
            wavlm.load_for_inference(tiny_cfg(mode=mode, init_from=str(path)))
