"""
Do the data stages scale? 01_clean.py and 02_tokenize.py on a corpus of S MB and of 4S MB, each
on 1 worker and on 2, timed as a user runs them (files on disk, a fresh process).

The corpus: distinct documents remixed from the built-in Wikipedia summaries. Each one strings
together 6 to 12 sentences drawn at random (seeded) from all of them, and takes the topic of its
first sentence's article. So every document passes the quality filters, none is a copy of
another, the topic cap has real work to do, and near dedup sees the many small overlaps of a
real corpus (documents that share a sentence) without their being duplicates.

Printed per run: seconds, MB/s of input, MB/s per worker, and the peak memory of the stage's
whole process tree (the main process and its workers, summed from /proc, so Linux only). Then
the goals: peak RSS <= 2 GB, time(4S) / time(S) <= 4.4 (linear would be 4), and 2 workers at
least 1.7x as fast as 1 (on the 4S corpus).

Usage: .venv/bin/python bench/bench_data.py [--mb 100] [--keep DIR]
"""
import argparse
import importlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
clean = importlib.import_module("01_clean")


def make_corpus(path, mb, seed=0):
    """Write about `mb` MB of remixed Wikipedia documents to `path` (JSON Lines)."""
    sentences = []
    for d in clean.load_wikipedia():
        for s in re.split(r"(?<=[.!?])\s+", d["text"].replace("\n", " ")):
            if len(s.split()) >= 5:
                sentences.append((s, d["topic"]))
    rng, size = random.Random(seed), 0
    with open(path, "w") as f:
        while size < mb * 1e6:
            picked = [rng.choice(sentences) for _ in range(rng.randint(6, 12))]
            line = json.dumps({"text": " ".join(s for s, _ in picked), "topic": picked[0][1]}) + "\n"
            f.write(line)
            size += len(line)
    return size / 1e6


def tree_rss(pid):
    """Resident memory, in bytes, of process `pid` and all its descendants."""
    parent = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                parent[int(p)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            pass
    family, grew = {pid}, True
    while grew:
        more = {p for p, pp in parent.items() if pp in family} - family
        family |= more
        grew = bool(more)
    total = 0
    for p in family:
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) * 1024
        except (OSError, StopIteration):
            pass
    return total


def timed(cmd):
    """Run a command; (seconds, peak RSS of its process tree in bytes), sampled every 50 ms."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def watch():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.05)
    watcher = threading.Thread(target=watch)
    watcher.start()
    _, err = proc.communicate()
    watcher.join()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return time.perf_counter() - t0, peak[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--mb", type=float, default=100, help="S, the size of the smaller corpus")
    p.add_argument("--keep", help="build the corpora and data folders here, and keep them")
    a = p.parse_args()
    work = a.keep or tempfile.mkdtemp(prefix="bench_data")
    os.makedirs(work, exist_ok=True)
    results = {}
    print(f"{'stage':<12}{'corpus':>9}{'workers':>9}{'seconds':>9}{'MB/s':>7}"
          f"{'MB/s/worker':>13}{'peak RSS':>10}")
    for scale in (1, 4):
        corpus = os.path.join(work, f"corpus{scale}.jsonl")
        mb = make_corpus(corpus, scale * a.mb)
        for workers in (1, 2):
            data = os.path.join(work, f"data{scale}_{workers}")
            for stage, extra in (("01_clean", ["--no-builtin", "--input", corpus]), ("02_tokenize", [])):
                cmd = [sys.executable, os.path.join(ROOT, f"{stage}.py"), "--data", data,
                       "--workers", str(workers), *extra]
                seconds, rss = timed(cmd)
                results[stage, scale, workers] = seconds, rss
                print(f"{stage:<12}{mb:>6.0f} MB{workers:>9}{seconds:>9.1f}{mb / seconds:>7.2f}"
                      f"{mb / seconds / workers:>13.2f}{rss / 1e9:>8.2f} GB", flush=True)
        if not a.keep:
            os.remove(corpus)
    print("\ngoal                                   01_clean   02_tokenize")
    peak = [max(results[s, k, w][1] for k in (1, 4) for w in (1, 2)) / 1e9 for s in ("01_clean", "02_tokenize")]
    ratio = [results[s, 4, 2][0] / results[s, 1, 2][0] for s in ("01_clean", "02_tokenize")]
    speedup = [results[s, 4, 1][0] / results[s, 4, 2][0] for s in ("01_clean", "02_tokenize")]
    print(f"peak RSS <= 2 GB                       {peak[0]:>5.2f} GB   {peak[1]:>5.2f} GB")
    print(f"time 4S / S (2 workers) <= 4.4         {ratio[0]:>8.2f}   {ratio[1]:>8.2f}")
    print(f"2 workers vs 1 (4S) >= 1.7x            {speedup[0]:>7.2f}x   {speedup[1]:>7.2f}x")
    if not a.keep:
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
