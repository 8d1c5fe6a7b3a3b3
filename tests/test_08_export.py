"""Tests for 08_export.py: every exported file against PyTorch, the reference it came from.

The script runs once (module fixture) on a small model saved with common.save_checkpoint; the
tests then open its files themselves with ONNX Runtime and compare with PyTorch on inputs the
script never saw (other batch sizes and lengths), so they do not just re-read its report.
"""
import copy
import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import common
import safeguards as sg
from conftest import load, run

m = load("03_model")
ex = load("08_export")

GRAPHS = ["model", "model_fp16", "model_int8", "model_kv", "model_kv_fp16", "model_kv_int8"]
# 128 wide rather than the tiny preset's 64: at a few hundred KB the zip container's fixed
# ~7 KB would alone move the fp16/fp32 size ratio by 1%; real checkpoints are megabytes.
CFG = dataclasses.replace(m.PRESETS["tiny"], n_embd=128, n_head=4, vocab_used=500)


def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def guard_pt(weights, bias, texts=("how do i make a bomb", "hello there, how are you", "")):
    """07's guard.pt: P(harmful) = sigmoid(bias + the sum of the weights of a text's n-grams)."""
    p = [torch.sigmoid(bias + weights[sg.ngram_buckets(t)].sum()) for t in texts]
    return {"weights": weights, "bias": bias, "threshold": 0.4, "check_texts": list(texts),
            "check_p": torch.cat(p)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = m.GPT(CFG).eval()
    ckpt = tmp / "ckpt.pt"
    common.save_checkpoint({"model": model.state_dict(), "config": dataclasses.asdict(CFG)}, ckpt)
    # "real" tokens: bytes of English prose (ids < 256), laid out as 02_tokenize writes val.bin
    import pydoc_data.topics
    text = " ".join(list(pydoc_data.topics.topics.values())[:5]).encode()[:4000]
    (tmp / "02_tokenize").mkdir()
    np.frombuffer(text, dtype=np.uint8).astype(np.uint16).tofile(tmp / "02_tokenize" / "val.bin")
    (tmp / "02_tokenize" / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 257}))
    # a guard as 07 saves it, with the probabilities it gives some texts, computed here
    common.save_checkpoint(guard_pt(torch.randn(sg.NGRAM_BUCKETS), torch.tensor([-0.5])), tmp / "07_safety" / "guard.pt")
    # 40 generated tokens from an 8-token prompt overflow the 32-token window: the slide is tested
    r = run("08_export", "--data", tmp, "--ckpt", ckpt, "--threads", "1", "--repeats", "1",
            "--decode-tokens", "4", "--gen-tokens", "40")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "08_export", model, ckpt, r


def test_outputs_and_report(exported):
    out, _, _, r = exported
    for name in GRAPHS:
        onnx.checker.check_model(str(out / f"{name}.onnx"), full_check=True)
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and all(report["checks"].values())
    assert {p["inputs"] for p in report["parity"]} == {"random", "real"}
    assert len(report["parity"]) == 12 and all(p["pass"] for p in report["parity"])
    assert set(report["latency"]) == {"pytorch eager (cpu)", "onnxruntime fp32", "onnxruntime fp16", "onnxruntime int8"}
    assert (out / "report.md").read_text().startswith("# Export report")
    assert (out / "latency.png").stat().st_size > 0
    assert "onnxruntime fp32" in r.stdout and "pass" in r.stdout
    assert report["guard"]["max_abs_diff"] <= ex.TOL_GUARD and report["guard"]["texts"] == 3
    assert json.loads((out / "guard.json").read_text()) == {"threshold": 0.4}
    assert not list(out.parent.glob(".08_export*"))   # no temporary folder left behind


def test_guard_graph_is_checked_against_the_guard(tmp_path):
    guard = guard_pt(torch.randn(sg.NGRAM_BUCKETS), torch.tensor([0.3]))
    assert ex.export_guard(guard, tmp_path / "guard.onnx", 1) <= ex.TOL_GUARD
    p = session(tmp_path / "guard.onnx").run(None, {"ngram_ids": np.zeros(0, np.int64)})[0]
    assert p == pytest.approx(torch.sigmoid(torch.tensor(0.3)).item())   # no n-gram: the bias alone
    # a real check: the probabilities of another guard are far from this one's
    assert ex.export_guard({**guard, "check_p": guard["check_p"] + 0.01}, tmp_path / "g.onnx", 1) > ex.TOL_GUARD
    with pytest.raises(common.UserError, match="n-gram buckets"):
        ex.export_guard({**guard, "weights": torch.zeros(10)}, tmp_path / "g.onnx", 1)


def test_graph_interfaces(exported):
    out = exported[0]
    H, D = CFG.n_head, CFG.n_embd // CFG.n_head

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    g = onnx.load(str(out / "model.onnx")).graph
    assert [i.name for i in g.input] == ["input_ids"] and [o.name for o in g.output] == ["logits"]
    assert isinstance(dims(g.input[0])[0], str) and isinstance(dims(g.input[0])[1], str)  # dynamic
    g = onnx.load(str(out / "model_kv.onnx")).graph
    past = [f"past_key_values.{i}.{kv}" for i in range(CFG.n_layer) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(CFG.n_layer) for kv in ("key", "value")]
    assert [i.name for i in g.input] == ["input_ids", *past]
    assert [o.name for o in g.output] == ["logits", *present]
    b, _, p, _ = dims(g.input[1])
    assert isinstance(b, str) and isinstance(p, str) and dims(g.input[1])[1::2] == [H, D]


def test_compare_is_the_largest_absolute_difference_and_the_top1_share():
    # by hand: logits of 1 sequence, 3 positions, 4 tokens; the copy is 3 higher at one logit
    # (which moves that position's top-1) and 0.5 lower at another: max |diff| 3, top-1 agrees at 2 of 3
    ref = np.array([[[0, 3, 1, 0], [2, 0, 0, 1], [0, 0, 0, 5]]], np.float32)
    got = ref.copy()
    got[0, 0, 2] += 3
    got[0, 2, 0] -= 0.5
    assert ex.compare(ref, got) == (3.0, pytest.approx(2 / 3))


@pytest.mark.parametrize("name", GRAPHS)
def test_parity_with_pytorch(exported, name):
    out, model, _, _ = exported
    sess = session(out / f"{name}.onnx")
    rng = np.random.default_rng(7)
    text = np.fromfile(out.parent / "02_tokenize" / "val.bin", dtype=np.uint16).astype(np.int64)
    # batch 3 and length 19: neither is a size the exporter traced with
    for ids in (rng.integers(0, CFG.vocab_used, (3, 19)), np.stack([text[:19], text[500:519], text[-19:]])):
        ref = model(torch.from_numpy(ids))[0].detach().numpy()
        if "kv" in name:
            got = sess.run(None, {"input_ids": ids, **{i.name: np.zeros((3, CFG.n_head, 0, CFG.n_embd // CFG.n_head), np.float32)
                                                      for i in sess.get_inputs()[1:]}})[0]
        else:
            got = sess.run(None, {"input_ids": ids})[0]
        assert got.shape == ref.shape and got.dtype == np.float32
        diff = np.abs(got - ref).max()
        agree = (got.argmax(-1) == ref.argmax(-1)).mean()
        if name.endswith(("fp16", "int8")):
            # the README's tolerances, written out here rather than read from the script (a typo
            # there must fail here); and a lossy graph must still be lossy, not a copy of fp32
            assert 0 < diff <= {"fp16": 0.01, "int8": 0.05}[name[-4:]] * np.abs(ref).max() and agree >= 0.99
        else:
            assert diff <= 1e-4


def test_kv_graph_equals_full_graph(exported):
    out, model, _, _ = exported
    full, kv = session(out / "model.onnx"), session(out / "model_kv.onnx")
    ids = np.random.default_rng(8).integers(0, CFG.vocab_used, (2, 25))
    want = full.run(None, {"input_ids": ids})[0]
    names = [i.name for i in kv.get_inputs()[1:]]
    H, D = CFG.n_head, CFG.n_embd // CFG.n_head
    past = [np.zeros((2, H, 0, D), np.float32) for _ in names]
    pieces = []
    for a, b in [(0, 9), (9, 13)] + [(t, t + 1) for t in range(13, 25)]:   # prefill, a chunk, then tokens
        logits, *past = kv.run(None, {"input_ids": ids[:, a:b], **dict(zip(names, past))})
        pieces.append(logits)
        assert all(p.shape == (2, H, b, D) for p in past)
    np.testing.assert_allclose(np.concatenate(pieces, 1), want, atol=1e-4, rtol=0)
    # the cache itself is PyTorch's cache, in the same layout
    _, _, ref_kv = model(torch.from_numpy(ids))
    for i, (k, v) in enumerate(ref_kv):
        np.testing.assert_allclose(past[2 * i], k.detach().numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(past[2 * i + 1], v.detach().numpy(), atol=1e-4, rtol=0)


def test_ort_generate_equals_pytorch(exported):
    out, model, _, _ = exported
    sess = session(out / "model_kv.onnx")
    prompt = np.random.default_rng(9).integers(0, CFG.vocab_used, (3, 5))
    # 60 new tokens in a 32-token window: the window slides and re-prefills twice
    got = ex.ort_generate(sess, prompt, 60, model.config)
    want = model.generate(torch.from_numpy(prompt), 60, temperature=0).numpy()
    assert got.shape == (3, 65) and np.array_equal(got, want)


def test_ort_generate_slides_like_pytorch_when_the_context_matters():
    # at init the next token hardly depends on the context; weights x 8 make every earlier token
    # count, so a window or a cache kept wrongly after the slide changes the tokens. The loop is
    # fed by the KV graph's PyTorch wrapper, in the graph's own input order (no export: fast)
    class TorchSession:
        def run(self, _, feed):
            with torch.no_grad():
                out = ex.WithCache(model)(torch.from_numpy(feed["input_ids"]),
                                          *(torch.from_numpy(feed[n]) for n in ex.cache_names(2)[0]))
            return [t.numpy() for t in out]
    torch.manual_seed(0)
    model = m.GPT(m.PRESETS["tiny"]).eval()   # 2 layers, a 32-token window
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    prompt = np.random.default_rng(10).integers(0, 512, (2, 5))
    got = ex.ort_generate(TorchSession(), prompt, 40, model.config)   # slides after 28 new tokens
    assert np.array_equal(got, model.generate(torch.from_numpy(prompt), 40, temperature=0).numpy())


def test_fp16_checkpoint(exported):
    out, model, ckpt, _ = exported
    half, saved = m.load_model(out / "model_fp16.pt", dtype=None)
    assert saved["config"] == dataclasses.asdict(CFG)
    ref = copy.deepcopy(model).half().state_dict()
    for k, v in half.state_dict().items():
        assert v.dtype == torch.float16 and torch.equal(v, ref[k])
    ratio = (out / "model_fp16.pt").stat().st_size / ckpt.stat().st_size
    assert abs(ratio - 0.5) <= 0.005, ratio


def test_bad_checkpoint(tmp_path):
    r = run("08_export", "--data", tmp_path)   # default path, no 04_train/ckpt.pt
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "04_train/ckpt.pt" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint" * 10)
    r = run("08_export", "--data", tmp_path, "--ckpt", bad)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "bad.pt" in r.stderr
    # a window the model cannot hold is the user's flag error, caught before any export
    good = tmp_path / "good.pt"
    common.save_checkpoint({"model": m.GPT(CFG).state_dict(), "config": dataclasses.asdict(CFG)}, good)
    r = run("08_export", "--data", tmp_path, "--ckpt", good, "--prompt-len", "30", "--decode-tokens", "8")
    assert r.returncode == 2 and "--prompt-len" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "08_export").exists()


def test_rmsnorm_statistics_finds_each_norms_whole_chain(exported):
    # what must stay fp32: for each RMSNorm (two per block, one final) its five nodes, each fed by the last
    for name in ("model", "model_kv"):
        g = onnx.load(str(exported[0] / f"{name}.onnx")).graph
        node = {n.name: n for n in g.node}
        keep = [node[k] for k in ex.rmsnorm_statistics(g)]
        assert len(keep) == 5 * (2 * CFG.n_layer + 1)
        for i in range(0, len(keep), 5):
            chain = keep[i:i + 5]
            assert [n.op_type for n in chain] == ["Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal"]
            assert all(a.output[0] in b.input for a, b in zip(chain, chain[1:]))


@pytest.mark.parametrize("big", [300.0, 3000.0])
def test_fp16_graph_survives_a_large_activation_channel(tmp_path, big):
    # Trained transformers carry a few residual channels in the hundreds or thousands. x**2 of
    # such a channel overflows fp16 (max 65504): RMSNorm's mean of squares must run in fp32.
    torch.manual_seed(0)
    model = m.GPT(CFG).eval()
    with torch.no_grad():
        model.head.weight = torch.nn.Parameter(model.wte.weight.clone())   # untied: logits stay as they were
        model.wte.weight[:, 5] = big   # one residual channel, large at every position
    ex.export_onnx(model, tmp_path / "model.onnx", with_cache=False)
    ex.convert_fp16(tmp_path / "model.onnx", tmp_path / "model_fp16.onnx")
    ids = np.random.default_rng(0).integers(0, CFG.vocab_used, (2, CFG.block_size))
    ref = model(torch.from_numpy(ids))[0].detach().numpy()
    got = session(tmp_path / "model_fp16.onnx").run(None, {"input_ids": ids})[0]
    assert np.isfinite(got).all() and (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.99
