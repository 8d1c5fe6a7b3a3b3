"""Tests for 03_model.py: the GPT's defining properties, checked against independent references
(the full-sequence forward for the KV cache, full recompute for cached generation, GPT-2's
published parameter count, the summary against the built module)."""
import dataclasses
import json

import pytest
import torch

import common
from conftest import load, run

m = load("03_model")


def tiny(**kw):
    return dataclasses.replace(m.PRESETS["tiny"], **kw)


def make(seed=0, sharp=False, **kw):
    torch.manual_seed(seed)
    model = m.GPT(tiny(**kw)).eval()
    if sharp:
        # At init (std 0.02) a tiny model's next token hardly depends on its context, so a
        # wrong window could go unnoticed; larger weights make every earlier token matter.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(8)
    return model


def test_causality():
    # changing token t must leave every logit before t untouched, and change some after it
    model = make()
    idx = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    logits, _, _ = model(idx)
    for t in (0, 5, 31):
        idx2 = idx.clone()
        idx2[:, t] = (idx2[:, t] + 1) % 512
        logits2, _, _ = model(idx2)
        assert torch.equal(logits[:, :t], logits2[:, :t])
        assert not torch.allclose(logits[:, t:], logits2[:, t:])


def test_rope_is_a_rotation_by_relative_position():
    # RoPE's defining properties: each position rotates q and k (norms unchanged), and q.k
    # then depends on the distance between the two positions alone, not on where they sit.
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)
    cos, sin = m.rope_cos_sin(torch.arange(64), 16, 10000.0, torch.float32)
    at = lambda x, p: m.apply_rope(x, cos[p], sin[p])
    assert torch.allclose(at(q, 0), q)   # position 0: no rotation
    for p in (1, 7, 63):
        assert torch.allclose(at(q, p).norm(), q.norm(), atol=1e-5)
    for dist in (0, 3, 20):
        dots = [(at(q, p + dist) * at(k, p)).sum() for p in (0, 5, 40)]
        assert torch.allclose(torch.stack(dots), dots[0].expand(3), atol=1e-4)
    assert not torch.allclose((at(q, 3) * at(k, 0)).sum(), (at(q, 0) * at(k, 3)).sum(), atol=1e-3)


def test_rope_angles_are_position_times_the_paper_frequencies():
    # RoPE's frequencies: pair i of a d-channel head turns by p * base^(-2i/d) at position p
    d, base = 16, 10000.0
    cos, sin = m.rope_cos_sin(torch.arange(50), d, base, torch.float32)
    ref = torch.tensor([[p * base ** (-2 * i / d) for i in range(d // 2)] for p in range(50)])
    torch.testing.assert_close(cos, ref.cos(), atol=1e-5, rtol=0)
    torch.testing.assert_close(sin, ref.sin(), atol=1e-5, rtol=0)


def test_rmsnorm_divides_by_the_root_mean_square():
    # y = x / sqrt(mean(x^2) + eps) * weight, over the last axis only
    norm = m.RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0)) * 7
    ref = torch.stack([torch.stack([v / (sum(float(e) ** 2 for e in v) / 8 + 1e-6) ** 0.5 for v in row]) for row in x])
    torch.testing.assert_close(norm(x), ref * torch.arange(1.0, 9.0), atol=1e-5, rtol=1e-5)


def test_past_kv_matches_full_forward():
    model = make()
    idx = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(2))
    full, _, full_kv = model(idx)
    # prefill 11 tokens, then one chunk of 7, then single tokens: each piece sees its past
    out, _, kv = model(idx[:, :11])
    pieces = [out]
    out, _, kv = model(idx[:, 11:18], past_kv=kv)
    pieces.append(out)
    for t in range(18, 30):
        out, _, kv = model(idx[:, t:t + 1], past_kv=kv)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert len(kv) == model.config.n_layer
    head_dim = model.config.n_embd // model.config.n_head
    for (k, v), (fk, fv) in zip(kv, full_kv):
        assert k.shape == v.shape == (2, model.config.n_head, 30, head_dim)
        torch.testing.assert_close(k, fk, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, fv, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0),
                                      dict(temperature=0.8, top_k=20), dict(temperature=1.2, top_p=0.9)])
def test_cached_generation_equals_recompute(sampling):
    # 80 new tokens from a 10-token prompt in a 32-token window: the window slides twice or more
    model = make(sharp=True)
    prompt = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(3))
    lengths = {True: [], False: []}   # tokens fed to each forward call
    outs = {}
    for c in (True, False):
        hook = model.register_forward_pre_hook(lambda mod, args: lengths[c].append(args[0].size(1)))
        outs[c] = model.generate(prompt, 80, use_cache=c, generator=torch.Generator().manual_seed(4), **sampling)
        hook.remove()
    assert outs[True].shape == (2, 90)
    assert torch.equal(outs[True][:, :10], prompt)
    assert torch.equal(outs[True], outs[False])
    # with the cache every step feeds one token except the prefills: the prompt, then the
    # newest 16 tokens each time the 32-token window overflows (after 22, then every 17 steps)
    assert lengths[True] == [10] + [1] * 22 + ([16] + [1] * 16) * 3 + [16] + [1] * 5
    assert sum(lengths[False]) > 1500   # recompute: the whole window, every step


def test_generation_window_semantics():
    # Reference for the stated sliding rule, written independently of generate(): the window
    # is the newest block_size tokens until it overflows, then jumps to the newest half.
    model = make(sharp=True)
    bs = model.config.block_size
    prompt = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(5))  # > block
    seq, start = prompt, prompt.size(1) - bs
    for _ in range(50):
        if seq.size(1) - start > bs:
            start = seq.size(1) - bs // 2
        nxt = model(seq[:, start:])[0][:, -1].argmax(-1, keepdim=True)
        seq = torch.cat((seq, nxt), 1)
    assert torch.equal(model.generate(prompt, 50, temperature=0), seq)


def test_sampling_filters_and_padding_mask():
    # vocab_used masks padding ids; top_k=1 and a tiny top_p both reduce to greedy
    model = make(vocab_used=300)
    with torch.no_grad():
        model.wte.weight[300:] *= 50   # make padding rows the most likely tokens
    prompt = torch.randint(0, 300, (3, 5), generator=torch.Generator().manual_seed(6))
    g = torch.Generator().manual_seed(7)
    sampled = model.generate(prompt, 40, temperature=2.0, generator=g)
    assert sampled[:, 5:].max() < 300
    greedy = model.generate(prompt, 20, temperature=0)
    assert torch.equal(model.generate(prompt, 20, top_k=1, generator=g), greedy)
    assert torch.equal(model.generate(prompt, 20, top_p=1e-6, generator=g), greedy)
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0)):
        with pytest.raises(ValueError):
            model.generate(prompt, 1, **bad)
    with pytest.raises(ValueError):
        model.generate(prompt[:, :0], 1)


def test_temperature_divides_the_logits():
    # sampling at temperature t draws from softmax(logits / t): the same draw as torch's own
    # multinomial on those probabilities, with the same random stream
    model = make()
    logits = torch.randn(64, 512, generator=torch.Generator().manual_seed(9)) * 3
    for t in (0.5, 2.0):
        got = model._sample(logits.clone(), t, None, None, torch.Generator().manual_seed(1))
        want = torch.multinomial((logits / t).softmax(-1), 1, generator=torch.Generator().manual_seed(1))
        assert torch.equal(got, want)


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = m.GPT(tiny())
    idx = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(8))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    _, loss0, _ = model(x, y)
    assert abs(loss0.item() - torch.log(torch.tensor(512.0)).item()) < 0.5   # init ~ uniform
    for _ in range(150):
        _, loss, _ = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    # ignore_index=-1: ignored positions contribute nothing
    y2 = y.clone()
    y2[:, ::2] = -1
    _, l_ign, _ = model(x, y2)
    ref = torch.nn.functional.cross_entropy(model(x)[0][:, 1::2].reshape(-1, 512), y[:, 1::2].reshape(-1))
    torch.testing.assert_close(l_ign, ref)


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    model = m.GPT(tiny(n_layer=8, n_embd=256, n_head=4))
    assert model.head.weight is model.wte.weight   # tied
    assert abs(model.wte.weight.std().item() - 0.02) < 1e-3
    assert abs(model.blocks[0].attn.value_embed.weight.std().item() - 0.02) < 1e-3
    assert abs(model.blocks[0].attn.proj.weight.std().item() - 0.02 / 4) < 5e-4   # 1/sqrt(2*8)
    assert abs(model.blocks[0].mlp.down.weight.std().item() - 0.02 / 4) < 5e-4


def test_gpt2_parameter_count():
    # GPT-2 small (Hugging Face "gpt2") has 124,439,808 parameters. Ours differs by exactly:
    # vocab padded 50257 -> 50304, no learned position table (RoPE), no biases, RMSNorm without
    # bias; the SwiGLU MLP (3 x 768 x 2048) has exactly GPT-2's MLP weight count (2 x 768 x 3072).
    c = m.PRESETS["gpt2"]
    with torch.device("meta"):
        model = m.GPT(c)
    L, d = 12, 768
    expected = (124_439_808 + (50304 - 50257) * d - 1024 * d
                - L * (3 * d + d + 4 * d + d) - (2 * L + 1) * d)
    assert m.num_params(model) == expected
    assert m.summarize(c)["params_total"] == expected
    # 6N + 12 L d T, N counting the tied matrix once
    assert m.flops_per_token(c) == 6 * expected + 12 * L * d * 1024


def test_load_model_roundtrip_and_errors(tmp_path):
    model = make(seed=1)
    cfg = dataclasses.asdict(model.config)
    idx = torch.randint(0, 512, (1, 16))
    ref = model(idx)[0]
    # a compiled model's prefix is stripped, fp16 weights are cast up to fp32
    sd = {"_orig_mod." + k: v.half() for k, v in model.state_dict().items()}
    common.save_checkpoint({"model": sd, "config": cfg, "step": 3}, tmp_path / "ck.pt")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())   # no temp file left
    loaded, ck = m.load_model(tmp_path / "ck.pt")
    assert ck["step"] == 3 and all(k[:1] != "_" for k in ck["model"])
    assert next(loaded.parameters()).dtype == torch.float32
    torch.testing.assert_close(loaded(idx)[0], ref, atol=2e-2, rtol=0)   # fp16 rounding only
    assert m.load_model(tmp_path / "ck.pt", dtype=None)[0].wte.weight.dtype == torch.float16

    def err(obj=None, raw=None):
        p = tmp_path / "bad.pt"
        if raw is not None:
            p.write_bytes(raw)
        else:
            torch.save(obj, p)
        with pytest.raises(ValueError) as e:
            m.load_model(p)
        assert "\n" not in str(e.value) and str(p) in str(e.value)
        return str(e.value)

    with pytest.raises(ValueError, match="not found"):
        m.load_model(tmp_path / "nope.pt")
    err(raw=b"not a checkpoint at all")
    good = model.state_dict()
    assert "Missing key" in err({"model": {k: v for k, v in good.items() if "mlp.up" not in k}, "config": cfg})
    assert "size mismatch" in err({"model": good, "config": {**cfg, "n_embd": 32}})
    assert "Unexpected key" in err({"model": {**good, "extra.weight": torch.zeros(1)}, "config": cfg})
    err({"model": good})
    err({"model": good, "config": {**cfg, "n_head": 3}})


def test_script_writes_config_that_loads(tmp_path):
    (tmp_path / "02_tokenize").mkdir()
    (tmp_path / "02_tokenize" / "meta.json").write_text(json.dumps({"vocab_size": 1000}))
    r = run("03_model", "--data", tmp_path, "--preset", "tiny")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "03_model" / "config.json").read_text())
    assert cfg["preset"] == "tiny" and cfg["vocab_size"] == 1024 and cfg["vocab_used"] == 1000
    config = m.GPTConfig(**{k: v for k, v in cfg.items() if k != "preset"})
    summary = json.loads((tmp_path / "03_model" / "summary.json").read_text())
    assert summary["params_total"] == m.num_params(m.GPT(config))
    assert f"{summary['params_total']:,}" in r.stdout
    # bad input: exit 2 with one line naming the flag, and the earlier good output kept
    for bad in (["--vocab-size", "500"], ["--n-head", "3"]):
        r = run("03_model", "--data", tmp_path, "--preset", "tiny", *bad)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr
    assert json.loads((tmp_path / "03_model" / "config.json").read_text()) == cfg
    # no tokenizer yet: --vocab-size decides
    r = run("03_model", "--data", tmp_path / "fresh", "--preset", "tiny", "--vocab-size", "64")
    assert r.returncode == 0 and json.loads((tmp_path / "fresh" / "03_model" / "config.json").read_text())["vocab_size"] == 64
