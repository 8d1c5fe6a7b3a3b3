"""Tests for 01_clean.py: each cleaning step on fixtures written here, checked against an
independent reference (exact Jaccard, brute-force all-pairs dedup, sha1 order), then end to end
on a tiny folder of every supported file type, and the bad inputs that must exit with status 2."""
import functools
import gzip
import hashlib
import json
import os
import random
import re

import numpy as np
import pytest

from conftest import load, run

clean = load("01_clean")


def opts(**kw):
    """The script's default flags, from its own parser, with some changed."""
    a = clean.make_parser().parse_args([])
    vars(a).update(kw)
    return a


VOCAB = ("river mountain engine theory music garden language history planet forest market "
         "window science bridge animal painting number village ocean letter system castle "
         "teacher railway kingdom island harvest library machine weather festival").split()


def prose(seed, n=120):
    """Random but letter-rich sentences: passes the quality filters, shares few 5-grams."""
    rng = random.Random(seed)
    words = [rng.choice(VOCAB) for _ in range(n)]
    return " ".join(" ".join(words[i:i + 12]).capitalize() + "." for i in range(0, n, 12))


def edit(text, n_edits, seed):
    """Replace n_edits words: a near duplicate such as a lightly revised copy of a page."""
    rng = random.Random(seed)
    words = text.split(" ")
    for i in rng.sample(range(len(words)), n_edits):
        words[i] = "changed"
    return " ".join(words)


@functools.lru_cache(maxsize=None)
def shingle_set(text, k=5):
    w = re.findall(r"\w+", text.lower())
    return frozenset(tuple(w[i:i + k]) for i in range(len(w) - k + 1))


def jaccard(a, b):
    """The exact Jaccard similarity of the 5-word shingle sets: the reference for MinHash."""
    sa, sb = shingle_set(a), shingle_set(b)
    return len(sa & sb) / len(sa | sb)


# ---- single steps -------------------------------------------------------------------------

def test_html_to_text_drops_scripts_styles_comments_and_unescapes():
    page = ("<html><head><title>T</title><style>p {color: red}</style>"
            "<script>var x = '<p>not text</p>';</script></head><body>"
            "<!-- a comment --><p>Fish &amp; chips &eacute;t&eacute; &#8364;5</p>"
            "<div>second<br>line</div></body></html>")
    text = clean.html_to_text(page)
    assert "color" not in text and "var x" not in text and "not text" not in text
    assert "comment" not in text
    assert "Fish & chips été €5" in text
    assert re.search(r"second\s*\n\s*line", text)  # block elements became line breaks


def test_normalize_nfc_punctuation_control_whitespace():
    stats = clean.new_stats()
    raw = ("Cafe\u0301 \u201cquoted\u201d it\u2019s\u00a0a\u200b test\x07 \u2026"
           "\r\n\n\n\n    indented   code  \t")
    out = clean.normalize(raw, stats)
    assert out == 'Café "quoted" it\'s a test ...\n\n    indented code'
    assert set(stats["normalize"]) == {"nfc", "control_chars", "punctuation", "whitespace"}
    assert clean.normalize(out, clean.new_stats()) == out  # idempotent


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes("good text ".encode() + b"\xff\xfe" + " more \xe9".encode("latin-1"))
    stats = clean.new_stats()
    text = "".join(clean.read_lines(str(f), stats))
    assert text == "good text \ufffd\ufffd more \ufffd"
    assert stats["decode"]["invalid_bytes"] == 3


def test_split_long_keeps_all_text_and_respects_limit():
    paras = [prose(i, 60) for i in range(20)]
    text = "\n\n".join(paras)
    pieces = clean.split_long(text, 1000)
    assert len(pieces) > 1 and all(len(p) <= 1000 for p in pieces)
    assert "\n\n".join(pieces) == text
    one_paragraph = " ".join(paras)  # no blank lines: falls back to sentence boundaries
    pieces = clean.split_long(one_paragraph, 1000)
    assert all(len(p) <= 1000 for p in pieces) and " ".join(pieces) == one_paragraph
    blob = "x" * 5000  # nothing to split at: stays whole for the too_long filter
    assert clean.split_long(blob, 1000) == [blob]


@pytest.mark.parametrize("rule,text", [
    ("too_short", "Only a few words here."),
    ("too_long", "word " * 5000),
    ("few_letters", "+----+----+ | a | b | +----+----+ " * 5 + " ".join(VOCAB[:10])),
    ("many_digits", "Population 19990 in kingdom, 20001 in village, 30002 in island, "
                    "40003 in castle, and 50004 in market areas"),
    ("many_symbols", "€5 £4 $3 ¥2 ©®™ §¶ " * 2 + " ".join(VOCAB[:10])),
    ("repeated_lines", "\n".join(["Click here to subscribe now"] * 4 + [prose(1, 20)])),
    ("word_length", "a an it is on at by to of in so we go up me he as or if do " * 2),
    ("word_length", " ".join(["internationalisation"] * 3 + ["characteristically"] * 10)),
])
def test_each_quality_rule(rule, text):
    assert clean.quality_problem(text, opts()) == rule


def test_good_prose_passes_quality_filters():
    assert clean.quality_problem(prose(0), opts()) is None


def test_distinct_lines_are_not_repeated_lines():
    # the rule counts lines that repeat an earlier one: four different lines repeat none
    assert clean.quality_problem("\n".join(prose(i, 24) for i in range(4)), opts()) is None


def test_minhash_estimates_jaccard():
    a, b = clean.minhash_params(256)
    base = prose(1, 300)
    for n_edits in (0, 3, 10, 30, 60):
        other = edit(base, n_edits, n_edits)
        s1 = clean.minhash(clean.shingles(base, 5), a, b)
        s2 = clean.minhash(clean.shingles(other, 5), a, b)
        # 256 hash functions: the estimate's standard deviation is at most 0.5/16 ~ 0.03
        assert abs((s1 == s2).mean() - jaccard(base, other)) < 0.1


def test_lsh_shape_catches_the_threshold_and_not_half_of_it():
    # P(candidate) = 1 - (1 - s^rows)^bands: high at the threshold, below 1/2 at half of it
    for num_perm, threshold in ((128, 0.7), (256, 0.8), (128, 0.5)):
        bands, rows = clean.lsh_shape(num_perm, threshold)
        p = lambda s: 1 - (1 - s ** rows) ** bands
        assert bands * rows == num_perm and p(threshold) > 0.8 and p(threshold / 2) < 0.5


def near_dedup(texts, **kw):
    """01's near dedup on raw texts: sign each, then dedup. Returns (kept texts, stats)."""
    a = opts(**kw)
    params = clean.minhash_params(a.num_perm, a.seed)
    sigs = np.array([clean.minhash(clean.shingles(t, a.shingle), *params) for t in texts], np.uint32)
    bands, rows = clean.lsh_shape(a.num_perm, a.threshold)
    keys = clean.band_keys(sigs, bands, rows)
    stats = {"examples": []}
    keep = clean.near_dedup(len(texts), bands, lambda b: keys[:, b], sigs.__getitem__, a.threshold, stats)
    return [t for t, k in zip(texts, keep) if k], stats


def test_near_dedup_threshold_is_inclusive():
    # Signatures made by hand, so that only near_dedup is tested: documents 1 and 2 agree with
    # document 0 in 96 and 95 of 128 positions (0.75, 0.742), document 3 in none.
    sigs = np.tile(np.arange(128, dtype=np.uint32), (4, 1))
    sigs[1, 96:] += 1000
    sigs[2, 95:] += 2000
    sigs[3] += 3000
    keys = clean.band_keys(sigs, 32, 4)
    for threshold, kept in ((0.75, [0, 2, 3]), (0.74, [0, 3]), (0.76, [0, 1, 2, 3])):
        stats = {"examples": []}
        keep = clean.near_dedup(4, 32, lambda b: keys[:, b], sigs.__getitem__, threshold, stats)
        assert np.flatnonzero(keep).tolist() == kept
    assert stats["candidate_pairs"] == 1 + 2 and np.flatnonzero(clean.near_dedup(
        4, 32, lambda b: keys[:, b], sigs.__getitem__, 0.74, stats,
        alive=np.array([0, 1, 1, 1], bool))).tolist() == [1, 3]


def test_near_dedup_matches_brute_force():
    """LSH must find the same duplicates as comparing every pair (the quadratic reference)."""
    rng = random.Random(0)
    docs = []
    for i in range(40):
        base = prose(100 + i, 200)
        docs.append(base)
        for j in range(rng.randrange(3)):  # 0-2 near copies with 1-2 edited words
            docs.append(edit(base, rng.randrange(1, 3), 1000 * i + j))
    rng.shuffle(docs)
    sims = [jaccard(a, b) for i, a in enumerate(docs) for b in docs[:i]]
    assert all(s < 0.4 or s > 0.8 for s in sims)  # no pair near the 0.7 threshold
    kept_ref = []
    for d in docs:  # first of each group survives, exactly as the script promises
        if all(jaccard(d, k) < 0.7 for k in kept_ref):
            kept_ref.append(d)
    kept, stats = near_dedup(docs)
    assert kept == kept_ref
    assert 40 == len(kept) < len(docs)
    assert stats["candidate_pairs"] < len(docs) ** 2 / 10  # LSH did not compare all pairs


def test_cap_topics_caps_share_and_drops_by_hash():
    texts = ([f"a {i}" for i in range(30)] + [f"b {i}" for i in range(10)]
             + [f"c {i}" for i in range(10)] + [f"u {i}" for i in range(5)])
    topics = np.array([0] * 30 + [1] * 10 + [2] * 10 + [-1] * 5)   # A, B, C, and no topic
    order = np.array([clean.stable_fraction(t) for t in texts])
    keep, cap, removed = clean.cap_topics(topics, order, 0.4)
    # the largest cap with cap <= 0.4 * (cap + 10 + 10 + 5) is 16
    assert cap == 16 and removed == {0: 14}
    by_sha = sorted(texts[:30], key=lambda t: hashlib.sha1(t.encode()).digest())
    assert {t for t, k in zip(texts[:30], keep) if k} == set(by_sha[:16])
    assert max(np.sum(topics[keep] == t) for t in range(3)) / keep.sum() <= 0.4
    keep2, _, _ = clean.cap_topics(topics[::-1], order[::-1], 0.4)  # order does not matter
    assert (keep2[::-1] == keep).all()
    # two topics cannot be held to 40% each: stop at equal sizes rather than cut everything
    keep3, cap3, _ = clean.cap_topics(topics[:40], order[:40], 0.4)
    assert cap3 == 10 and keep3.sum() == 20


def test_builtin_corpus_is_the_pinned_one(monkeypatch):
    wiki = clean.load_wikipedia()
    assert len(wiki) == 10033
    topics = {}
    for d in wiki:
        topics[d["topic"]] = topics.get(d["topic"], 0) + 1
    assert topics["People"] == 1828 and topics["Mathematics"] == 256 and len(topics) == 12
    assert len(clean.load_pydoc()) == 79
    monkeypatch.setattr(clean, "WIKI_SHA256", "0" * 64)
    with pytest.raises(clean.UserError, match="sha256"):
        clean.load_wikipedia()


def test_expand_inputs_files_folders_globs(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.txt", "b.jsonl.gz", "c.csv", "sub/d.HTML", "sub/e.md"):
        (tmp_path / name).write_text("x")
    p = str(tmp_path)
    assert clean.expand_inputs([p]) == [f"{p}/a.txt", f"{p}/b.jsonl.gz", f"{p}/sub/d.HTML",
                                        f"{p}/sub/e.md"]
    assert clean.expand_inputs([f"{p}/**/*.md", f"{p}/a.txt", f"{p}/a.txt"]) == [
        f"{p}/sub/e.md", f"{p}/a.txt"]
    for bad, msg in ((f"{p}/c.csv", "unsupported file type"), (f"{p}/*.zip", "no such file")):
        with pytest.raises(clean.UserError, match=msg):
            clean.expand_inputs([bad])


def test_failed_write_leaves_old_output(tmp_path, monkeypatch):
    out = tmp_path / "01_clean"
    out.mkdir()
    (out / "train.jsonl").write_text("old\n")
    (tmp_path / "in.txt").write_text(prose(0))

    def boom(*args):
        raise RuntimeError("disk full")
    monkeypatch.setattr(clean, "plot", boom)   # the last file written
    with pytest.raises(RuntimeError):
        clean.run(["--data", str(tmp_path), "--no-builtin", "--input", str(tmp_path / "in.txt"),
                   "--workers", "1"])
    assert (out / "train.jsonl").read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["01_clean", "in.txt"]  # no scratch or temporary folder


# ---- end to end ---------------------------------------------------------------------------

def make_corpus(folder):
    """A tiny corpus of every supported type with one of every problem the script fixes."""
    folder.mkdir()
    docs = [prose(i) for i in range(12)]
    (folder / "a.txt").write_text(docs[0])
    (folder / "b.md").write_text("# Title\n\n" + docs[1])
    (folder / "page.html").write_text(
        f"<html><script>alert('x')</script><style>b{{}}</style><p>{docs[2]} Fish &amp; chips.</p>"
        "<!-- hidden --></html>")
    with gzip.open(folder / "c.txt.gz", "wt") as f:
        f.write(docs[3])
    (folder / "bad_utf8.txt").write_bytes(docs[4].encode() + b" \xff\xfe end.")
    (folder / "ignored.csv").write_text("not read")
    recs = [{"text": docs[i], "topic": "T"} for i in range(5, 10)]
    recs += [{"text": docs[5]}, {"text": edit(docs[6], 2, 0)}, {"text": "too short"}]
    (folder / "d.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    with gzip.open(folder / "e.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": docs[10]}) + "\n\n" + json.dumps({"text": docs[11]}) + "\n")
    return docs


def read_out(data):
    out = data / "01_clean"
    rows = {s: [json.loads(l) for l in open(out / f"{s}.jsonl")] for s in ("train", "val")}
    return rows, json.loads((out / "stats.json").read_text())


def test_end_to_end_tiny_folder(tmp_path):
    docs = make_corpus(tmp_path / "in")
    data = tmp_path / "data"
    r = run("01_clean", "--data", data, "--no-builtin", "--input", tmp_path / "in",
            "--val-fraction", "0.3", timeout=120)
    assert r.returncode == 0, r.stderr
    rows, stats = read_out(data)
    out = rows["train"] + rows["val"]
    assert all(set(d) == {"text", "source", "topic", "title"} for d in out)
    texts = " ".join(d["text"] for d in out)
    # each of the 12 distinct documents survives once; duplicates, near copy, short one do not
    assert len(out) == 12 and stats["documents_in"] == 15
    assert all(sum(d[:60] in t["text"] for t in out) == 1 for d in docs)
    assert "alert" not in texts and "hidden" not in texts and "Fish & chips." in texts
    assert stats["decode"]["invalid_bytes"] == 2 and "\ufffd" in texts
    assert stats["filters"]["too_short"]["count"] == 1
    assert stats["exact_dedup"]["removed"]["count"] == 1
    assert stats["after_exact_dedup"] - stats["after_near_dedup"] == 1
    assert sum(d["topic"] == "T" for d in out) == 5
    assert {os.path.basename(d["source"]) for d in out} >= {"a.txt", "page.html", "e.jsonl.gz"}
    for png in ("lengths.png", "topics.png", "filters.png"):
        assert (data / "01_clean" / png).stat().st_size > 1000
    assert "train documents" in r.stdout

    assert sorted(os.listdir(data)) == ["01_clean"]


def test_output_is_the_same_for_any_number_of_workers(tmp_path, monkeypatch):
    """Many small batches over 1 and 2 workers: the same bytes, the same stats."""
    make_corpus(tmp_path / "in")
    monkeypatch.setattr(clean, "BATCH_CHARS", 1500)   # about one document per batch
    outs = []
    for workers in (1, 2):
        data = tmp_path / f"data{workers}"
        clean.run(["--data", str(data), "--no-builtin", "--input", str(tmp_path / "in"),
                   "--workers", str(workers)])
        rows, stats = read_out(data)
        outs.append((rows, {k: v for k, v in stats.items() if not k.startswith("seconds")}))
    assert outs[0] == outs[1] and len(outs[0][0]["train"]) > 5


def test_split_by_hash_never_moves_old_documents(tmp_path):
    """Adding documents never moves an old one between train and val."""
    texts = [prose(i) for i in range(40)]
    splits = []
    for n in (25, 40):
        (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:n]))
        clean.run(["--data", str(tmp_path), "--no-builtin", "--input", str(tmp_path / "in.jsonl"),
                   "--val-fraction", "0.3", "--workers", "1"])
        rows, _ = read_out(tmp_path)
        splits += [{d["text"] for d in rows["train"]}, {d["text"] for d in rows["val"]}]
    t1, v1, t2, v2 = splits
    assert t1 <= t2 and v1 <= v2 and len(t2 | v2) == 40 and v1 and t1
    assert 0.1 < len(v2) / 40 < 0.5  # about --val-fraction of the documents


@pytest.mark.parametrize("content,expect", [
    (None, "bad.jsonl: no such file"),
    (b"\n  \n", "bad.jsonl: file is empty"),
    (bytes(range(256)) * 4, "bad.jsonl: looks like a binary file"),
    (b'{"text": "fine"}\n{"text": broken\n', "bad.jsonl:2: not valid JSON Lines"),
    (b'{"body": "no text"}\n', 'bad.jsonl:1: JSON Lines record has no string "text"'),
    (gzip.compress(b"\x00\x01binary"), "bad.jsonl.gz: looks like a binary file"),
    (b"not gzip at all", "bad.jsonl.gz: cannot read"),
    (gzip.compress(b'{"text": "fine"}\n' * 1000)[:-20], "bad.jsonl.gz: cannot read"),  # cut short
])
def test_bad_files_give_one_line_errors(tmp_path, content, expect):
    path = tmp_path / ("bad.jsonl.gz" if ".gz" in expect else "bad.jsonl")
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(clean.UserError) as e:
        for f in clean.expand_inputs([str(path)]):
            list(clean.load_file(f, clean.new_stats()))
    assert expect in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["binary", "filters_leave_nothing", "bad_flag"])
def test_bad_input_exits_2_with_one_line_and_keeps_old_output(tmp_path, case):
    """As the user sees it: status 2, one line on stderr, the earlier output untouched."""
    data = tmp_path / "data"
    old = data / "01_clean"
    old.mkdir(parents=True)
    (old / "train.jsonl").write_text('{"text": "old"}\n')
    good = tmp_path / "good.txt"
    good.write_text(prose(0))
    if case == "binary":
        bad = tmp_path / "bad.txt"
        bad.write_bytes(bytes(range(256)) * 4)
        args, expect = ["--input", bad], "bad.txt: looks like a binary file"
    elif case == "filters_leave_nothing":
        args, expect = ["--input", good, "--min-words", "100000"], "too_short"
    elif case == "bad_flag":
        args, expect = ["--input", good, "--threshold", "1.5"], "--threshold"
    r = run("01_clean", "--data", data, "--no-builtin", *args, timeout=60)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and expect in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert os.listdir(old) == ["train.jsonl"] and os.listdir(data) == ["01_clean"]
