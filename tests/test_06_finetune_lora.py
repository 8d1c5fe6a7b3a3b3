"""Tests for 06_finetune_lora.py on a tiny model: LoRA's defining properties against the base
model it wraps (B = 0 changes nothing, merging is exact and idempotent), which weights a training
step may move, the adapter file against the in-memory classifier, and the stage end to end
(the merged checkpoint against the adapter on a fresh base; bad input -> exit 2)."""
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import common
from conftest import ROOT, load, run

m = load("03_model")
L = load("06_finetune_lora")
T = load("02_tokenize")

TOPICS = {  # three toy topics with their own words, so a tiny model can tell them apart
    "Animals": ["cat", "dog", "horse", "whale", "eagle", "lizard"],
    "Places": ["river", "mountain", "island", "desert", "valley", "city"],
    "Numbers": ["seven", "twelve", "ninety", "million", "fraction", "prime"],
}


def toy_docs(n, seed):
    rng = random.Random(seed)
    docs = []
    for topic, words in TOPICS.items():
        for _ in range(n):
            w = rng.sample(words, 3)
            docs.append({"text": f"The {w[0]} and the {w[1]} are near a {w[2]}. {w[0].title()} again.",
                         "source": "wikipedia", "topic": topic, "title": w[0]})
    return docs


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = dataclasses.replace(m.PRESETS["tiny"], vocab_size=320, vocab_used=257)
    return m.GPT(cfg).eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A data folder as stages 01, 02 and 04 would leave it: toy articles (plus Uncategorized,
    pydoc and an unseen topic, which the stage must leave out), a byte-level tokenizer, and a
    tiny random-init checkpoint."""
    d = tmp_path_factory.mktemp("ft")
    (d / "01_clean").mkdir()
    extra = [{"text": "Something without a topic at all.", "source": "wikipedia", "topic": "Uncategorized", "title": "x"},
             {"text": "The for statement iterates.", "source": "pydoc", "topic": "Python documentation", "title": None}]
    train = toy_docs(12, seed=1) + extra
    val = toy_docs(4, seed=2) + extra + [{"text": "A song.", "source": "wikipedia", "topic": "Music", "title": "s"}]
    for name, docs in (("train", train), ("val", val)):
        (d / "01_clean" / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))
    (d / "02_tokenize").mkdir()
    T.write_ranks({bytes([i]): i for i in range(256)}, d / "02_tokenize" / "tokenizer.tiktoken")
    (d / "02_tokenize" / "tokenizer.json").write_text(json.dumps(
        {"pattern": T.PATTERNS["gpt2"], "pattern_name": "gpt2", "special_tokens": {T.EOT: 256}}))
    model = tiny_model()
    common.save_checkpoint({"model": model.state_dict(), "config": dataclasses.asdict(model.config)},
                      d / "04_train" / "ckpt.pt")
    return d


@pytest.fixture(scope="module")
def tok(data):
    return T.load_tokenizer(data / "02_tokenize")


def texts_labels():
    docs = toy_docs(12, seed=1)
    return [d["text"] for d in docs], [d["topic"] for d in docs]


TRAIN_KW = dict(batch_size=8, max_len=24, n_prompt=4, seed=0, device="cpu", progress=False)


# ----------------------------------------------------------------------------- LoRA itself

@pytest.mark.parametrize("targets,per_layer", [("attn", 2), ("mlp", 3), ("all", 5)])
def test_zero_B_gives_base_logits_exactly(targets, per_layer):
    base = tiny_model()
    wrapped = tiny_model()
    names = L.inject_lora(wrapped, targets, r=4, alpha=8)
    assert len(names) == per_layer * base.config.n_layer
    assert all(isinstance(wrapped.get_submodule(n), L.LoRALinear) for n in names)
    # only the adapters train; A is random (so training can move B), B is zero
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}" for n in names for x in "AB"}
    assert all(wrapped.get_submodule(n).lora_A.abs().sum() > 0 for n in names)
    idx = torch.randint(0, 257, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(wrapped(idx)[0], base(idx)[0])
    with pytest.raises(ValueError):
        L.inject_lora(wrapped, targets)   # twice would wrap the wrappers


def randomize_B(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, L.LoRALinear):
            mod.lora_B.data = torch.randn(mod.lora_B.shape, generator=g) * 0.05


def test_merge_matches_unmerged_and_twice_changes_nothing(tmp_path):
    model = tiny_model()
    L.inject_lora(model, "all", r=4, alpha=8)
    randomize_B(model)
    idx = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        unmerged = model(idx)[0]
        assert not torch.allclose(unmerged, tiny_model()(idx)[0], atol=1e-3)   # the adapter does something
        L.merge_lora(model)
        merged = model(idx)[0]
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert not any(isinstance(x, L.LoRALinear) for x in model.modules())
    assert model.state_dict().keys() == tiny_model().state_dict().keys()
    once = {k: v.clone() for k, v in model.state_dict().items()}
    L.merge_lora(model)
    assert all(torch.equal(once[k], v) for k, v in model.state_dict().items())
    # the merged model is an ordinary 03_model checkpoint
    common.save_checkpoint({"model": model.state_dict(), "config": dataclasses.asdict(model.config)}, tmp_path / "c.pt")
    loaded, _ = m.load_model(tmp_path / "c.pt")
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], merged)


def test_lora_linear_merge_unmerge():
    torch.manual_seed(0)
    layer = L.LoRALinear(nn.Linear(16, 12, bias=False), r=2, alpha=4, dropout=0.5)
    layer.lora_B.data.normal_()
    layer.eval()   # adapter dropout is a training-time thing
    x, w0 = torch.randn(5, 16), layer.base.weight.detach().clone()
    ref = x @ w0.T + (x @ layer.lora_A.T @ layer.lora_B.T) * 2.0   # alpha / r = 2
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref)
        layer.merge()
        w1 = layer.base.weight.clone()
        torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=0)
        layer.merge()
        assert torch.equal(layer.base.weight, w1)
        layer.unmerge()
        torch.testing.assert_close(layer.base.weight, w0, atol=1e-6, rtol=0)


def test_lr_factor_warms_up_to_one_then_cosine_decays_to_zero():
    # linear warmup over the first tenth, peak 1, cosine: 1/2 halfway through the decay, ~0 at the end
    f = [L._lr_factor(s, 100) for s in range(100)]
    assert f[0] > 0 and f[:10] == sorted(f[:10]) and max(f) == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.5) and f[-1] < 0.01
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


# ----------------------------------------------------------------------------- training

@pytest.mark.parametrize("method", ["lora", "head", "prompt", "full"])
def test_training_moves_only_what_the_method_trains(tok, method):
    texts, labels = texts_labels()
    base = tiny_model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    # steps=0 gives the same initialisation (same seed) without training: the "before" state
    c0, _ = L.train_classifier(base, tok, texts, labels, method, steps=0, lr=1e-2, **TRAIN_KW)
    # two steps: in the first, LoRA's A gets no gradient (it is multiplied by B = 0); B moves first
    c1, info = L.train_classifier(base, tok, texts, labels, method, steps=2, lr=1e-2, **TRAIN_KW)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())   # caller's model untouched
    s0, s1 = c0.state_dict(), c1.state_dict()
    assert s0.keys() == s1.keys()
    # remove_duplicate=False: the GPT's output head shares the embedding matrix (tied)
    trained = {n for n, p in c1.named_parameters(remove_duplicate=False) if p.requires_grad}
    assert info["trainable_params"] == sum(p.numel() for p in c1.parameters() if p.requires_grad)
    for k in s1:
        if k in trained and (method != "full" or ".blocks." in k or k.startswith("head.")):
            assert not torch.equal(s0[k], s1[k]), f"{method}: {k} did not move"
        elif k not in trained:
            assert torch.equal(s0[k], s1[k]), f"{method}: frozen {k} changed"
    expect = {"head": {"head.weight", "head.bias"}, "prompt": {"head.weight", "head.bias", "prompt"}}
    if method in expect:
        assert trained == expect[method]
    if method == "lora":
        assert trained - {"head.weight", "head.bias"} and all(k.endswith(("lora_A", "lora_B")) for k in trained - {"head.weight", "head.bias"})


def test_prompt_tuning_leaves_every_model_weight_unchanged(tok):
    texts, labels = texts_labels()
    base = tiny_model()
    clf, info = L.train_classifier(base, tok, texts, labels, "prompt", steps=3, lr=1e-2, **TRAIN_KW)
    assert clf.prompt.shape == (4, base.config.n_embd)
    for k, v in base.state_dict().items():
        assert torch.equal(clf.model.state_dict()[k], v), k
    assert len(info["losses"]) == 3


def test_adapter_file_reproduces_the_finetuned_classifier(tok, tmp_path):
    texts, labels = texts_labels()
    clf, info = L.train_classifier(tiny_model(), tok, texts, labels, "lora", steps=20, lr=1e-2,
                                   lora_targets="all", lora_dropout=0.1, **TRAIN_KW)
    # learning happens: the loss falls well below chance (ln 3) on this separable toy task
    assert sum(info["losses"][-5:]) / 5 < 0.7 * sum(info["losses"][:3]) / 3
    L.save_adapter(clf, tmp_path / "adapter.pt")
    fresh = L.load_adapter(tiny_model(), tmp_path / "adapter.pt")
    p1, probs1 = L.predict(clf, tok, texts, max_len=24)
    p2, probs2 = L.predict(fresh, tok, texts, max_len=24)
    assert p1 == p2 and fresh.classes == clf.classes == sorted(TOPICS)
    # and what it learned is each text's own label: most training texts get their topic (chance: 1/3)
    assert sum(p == l for p, l in zip(p1, labels)) / len(labels) >= 0.8
    torch.testing.assert_close(torch.tensor(probs2), torch.tensor(probs1), atol=1e-6, rtol=0)
    # loading onto a model the adapter does not fit is a one-line ValueError
    with pytest.raises(ValueError, match="adapter"):
        L.load_adapter(m.GPT(dataclasses.replace(m.PRESETS["tiny"], n_embd=32)), tmp_path / "adapter.pt")


@pytest.mark.parametrize("pool", ["max", "mean", "last"])
def test_prediction_does_not_depend_on_its_batch(tok, pool):
    # A text's class probabilities are the same alone as beside longer texts, whose padding
    # it then shares: pooling must read the real tokens only, whatever the pooling.
    texts, labels = texts_labels()
    clf, _ = L.train_classifier(tiny_model(), tok, texts, labels, "lora", steps=5, lr=1e-2, pool=pool,
                                **{k: v for k, v in TRAIN_KW.items() if k != "n_prompt"})
    short = "The cat."
    alone = L.predict(clf, tok, [short], max_len=24)[1]
    padded = L.predict(clf, tok, [short, texts[0], texts[1] + " " + texts[2]], max_len=24)[1][:1]
    torch.testing.assert_close(torch.tensor(padded), torch.tensor(alone), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the stage

def test_stage_end_to_end(data, tok):
    r = run("06_finetune_lora", "--data", data, "--steps", 4, "--batch-size", 6, "--max-len", 20,
            "--n-prompt", 4, "--lora-targets", "all", "--device", "cpu", "--threads", 1)
    assert r.returncode == 0, r.stderr
    out = data / "06_finetune_lora"
    rep = json.loads((out / "report.json").read_text())
    # Uncategorized, pydoc and a topic absent from training are left out of both splits
    assert rep["classes"] == sorted(TOPICS) and rep["n_train"] == 36 and rep["n_test"] == 12
    res = rep["methods"]
    assert list(res) == list(L.METHODS)
    assert res["head"]["trainable_params"] < res["prompt"]["trainable_params"] < res["full"]["trainable_params"]
    assert res["head"]["trainable_params"] < res["lora"]["trainable_params"] < res["full"]["trainable_params"]
    for r_ in res.values():
        assert sum(map(sum, r_["confusion"])) == 12 and 0 <= r_["accuracy"] <= 1
    assert res["lora"]["train_state_bytes"] < res["full"]["train_state_bytes"]
    assert rep["merge_max_abs_diff"] < 1e-5
    for f in ("report.md", "confusion.png", "loss.png"):
        assert (out / f).stat().st_size > 0
    # merged.pt is an ordinary checkpoint; with its head it predicts what the adapter predicts
    # on a fresh base model
    merged, ck = m.load_model(out / "merged.pt")
    assert (out / "adapter.pt").stat().st_size < (out / "merged.pt").stat().st_size
    clf = L.Classifier(merged, 3, "head")
    clf.head.load_state_dict(ck["classifier"]["head"])
    clf.classes = ck["classifier"]["classes"]
    base, _ = m.load_model(data / "04_train" / "ckpt.pt")
    adapted = L.load_adapter(base, out / "adapter.pt")
    texts = [d["text"] for d in toy_docs(3, seed=5)]
    _, pm = L.predict(clf, tok, texts, max_len=20)
    _, pa = L.predict(adapted, tok, texts, max_len=20)
    torch.testing.assert_close(torch.tensor(pm), torch.tensor(pa), atol=1e-5, rtol=0)


def files(folder):
    """{path: bytes} of every file under folder ({} when it does not exist)."""
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# each case, and what its one line must name: the file or the flag
BAD_INPUT = {"no_ckpt": "missing.pt", "steps": "--steps", "methods": "--methods", "no_topics": "train.jsonl",
             "bad_json": "train.jsonl", "too_long": "--max-len", "not_utf8": "train.jsonl:2",
             "read_only": "{data}", "threads": "--threads", "seed": "--seed", "bad_ckpt": "bad.pt",
             "small_vocab": "small.pt"}
EARLIER = ("not_utf8", "read_only")   # cases in a folder of their own that holds an earlier output


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_2_with_one_line(data, tmp_path, capsys, case):
    args = ["--data", str(data), "--steps", "1", "--device", "cpu"]
    if case == "no_ckpt":
        args += ["--ckpt", str(tmp_path / "missing.pt")]
    elif case in ("threads", "seed"):
        args += [f"--{case}", "-1"]
    elif case == "bad_ckpt":
        (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 a damaged zip, not a checkpoint")
        args += ["--ckpt", str(tmp_path / "bad.pt")]
    elif case == "small_vocab":   # a model whose 128 ids cannot hold the tokenizer's 257
        small = m.GPT(dataclasses.replace(m.PRESETS["tiny"], vocab_size=128, vocab_used=128))
        common.save_checkpoint({"model": small.state_dict(), "config": dataclasses.asdict(small.config)},
                               tmp_path / "small.pt")
        args += ["--ckpt", str(tmp_path / "small.pt")]
    elif case == "steps":
        args += ["--steps", "0"]
    elif case == "methods":
        args += ["--methods", "lora,magic"]
    elif case == "too_long":
        args += ["--max-len", "40"]   # the tiny model's block is 32
    else:
        d = tmp_path / "d"
        (d / "01_clean").mkdir(parents=True)
        for x in ("02_tokenize", "04_train"):
            (d / x).symlink_to(data / x)
        line = json.dumps({"text": "user text", "source": "notes.txt", "topic": None, "title": None})
        (d / "01_clean" / "train.jsonl").write_text(line + "\n" + ("{oops\n" if case == "bad_json" else ""))
        (d / "01_clean" / "val.jsonl").write_text(line + "\n")
        if case == "not_utf8":   # line 2 in Latin-1, not UTF-8
            bad = json.dumps({"text": "café", "source": "wikipedia", "topic": "Places"}, ensure_ascii=False)
            (d / "01_clean" / "train.jsonl").write_bytes(f"{line}\n{bad}\n".encode("latin-1"))
        if case == "read_only":   # inputs that are fine, in a folder that cannot take the output
            for x in ("train", "val"):
                (d / "01_clean" / f"{x}.jsonl").write_bytes((data / "01_clean" / f"{x}.jsonl").read_bytes())
        args[1] = str(d)
    out = Path(args[1]) / "06_finetune_lora"
    if case in EARLIER:
        out.mkdir()
        (out / "report.json").write_text('{"an earlier run": true}\n')
    before = files(out)
    if case == "read_only":
        out.parent.chmod(0o555)
    try:
        if case == "read_only" and os.access(out.parent, os.W_OK):   # root: not without its power
            if not shutil.which("setpriv"):
                pytest.skip("running as root, which writes into read-only folders, and no setpriv")
            r = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner",
                                sys.executable, str(ROOT / "06_finetune_lora.py"), *args],
                               capture_output=True, text=True, timeout=600)
            if r.stderr.startswith("setpriv:"):
                pytest.skip(f"running as root, and setpriv cannot give up its power: {r.stderr.strip()}")
            code, err = r.returncode, r.stderr.strip()
        else:
            with pytest.raises(SystemExit) as e:
                L.main(args)
            code, err = e.value.code, capsys.readouterr().err.strip()
    finally:
        if case == "read_only":
            out.parent.chmod(0o755)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("06_finetune_lora.py:"), err
    assert "Traceback" not in err and BAD_INPUT[case].format(data=out.parent) in err, err
    # the earlier output as it was, byte for byte, and no temporary folder left beside it
    assert files(out) == before and not list(out.parent.glob(".06_finetune_lora*"))
    if case not in EARLIER:
        assert not (tmp_path / "d" / "06_finetune_lora").exists()


def test_default_max_len_fits_a_short_context(data, tmp_path):
    # the tiny model's block is 32 tokens: the default (64) shrinks to fit it and the prompt
    d = tmp_path / "d"
    d.mkdir()
    for x in ("01_clean", "02_tokenize", "04_train"):
        (d / x).symlink_to(data / x)
    L.main(["--data", str(d), "--methods", "head,prompt", "--steps", "1", "--n-prompt", "8", "--device", "cpu"])
    rep = json.loads((d / "06_finetune_lora" / "report.json").read_text())
    assert rep["args"]["max_len"] == 24 and set(rep["methods"]) == {"head", "prompt"}


def test_paired_gain_counts_only_disagreements():
    # 10 items: a right on 5, b right on those 5 and 3 more -> b_only 3, a_only 0
    true = [0] * 10
    a, b = [0] * 5 + [1] * 5, [0] * 8 + [1] * 2
    d, low, high = L.paired_gain(true, a, b)
    se = (3 - 0.9) ** 0.5 / 10   # sqrt(b_only + a_only - (b_only - a_only)^2 / n) / n
    assert (d, low, high) == pytest.approx((0.3, 0.3 - 1.96 * se, 0.3 + 1.96 * se))
    assert L.paired_gain(true, b, a) == pytest.approx((-0.3, -0.3 - 1.96 * se, -0.3 + 1.96 * se))
    # items both get right (or both wrong) change nothing: same counts, twice the items
    assert L.paired_gain(true * 2, a + [0] * 10, b + [0] * 10)[0] == pytest.approx(0.15)
