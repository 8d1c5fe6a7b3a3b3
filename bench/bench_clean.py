"""
Throughput of 01_clean.py: does the cleaning cost grow linearly with the corpus?

The pipeline (normalise, split, filter, exact dedup, MinHash + LSH near dedup, topic cap,
split) runs in-process on the built-in corpus (1x) and on it repeated 4 times (4x), and the
ratio of the two times is printed: close to 4 means linear, 16 would mean quadratic (what
comparing every pair of documents would cost). Reading and writing files are left out of the
ratio, since they are linear anyway; the whole default command is timed separately.

What "repeated" means matters:
- distinct: copy k (k = 1..3) has every ASCII letter rotated by k places (ROT-k). Word lengths,
  letter/digit/symbol fractions and topic labels are unchanged, so every copy passes the same
  filters and the topic cap keeps the same share, but no two copies share a single shingle.
  Every step does 4x the work on 4x the surviving documents: the honest linearity test.
- plain: the corpus 4 times verbatim. The exact-dedup step throws the copies away before the
  MinHash, so this measures how cheap exact dedup is, and checks that the output equals 1x.

Usage: .venv/bin/python bench/bench_clean.py [--repeats 4] [--runs 1]
Timings on a shared machine are noisy; use --runs 3 to take the best of three.
"""
import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
clean = importlib.import_module("01_clean")


def rot(text, k):
    """ROT-k of ASCII letters: the same shape of text, entirely different words."""
    out = []
    for c in text:
        if "a" <= c <= "z":
            c = chr((ord(c) - 97 + k) % 26 + 97)
        elif "A" <= c <= "Z":
            c = chr((ord(c) - 65 + k) % 26 + 65)
        out.append(c)
    return "".join(out)


def timed(docs, opts, runs):
    best, result = float("inf"), None
    for _ in range(runs):
        stats = clean.new_stats()
        t0 = time.perf_counter()
        train, val = clean.clean(docs, opts, stats)
        best = min(best, time.perf_counter() - t0)
        result = (train, val, stats)
    return best, result


def main():
    p = argparse.ArgumentParser(description="time 01_clean.py on 1x and Nx the built-in corpus")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--runs", type=int, default=1, help="best of this many runs per figure")
    a = p.parse_args()
    opts = clean.make_parser().parse_args([])  # the script's own defaults
    base = clean.load_wikipedia() + clean.load_pydoc()
    distinct = base + [dict(d, text=rot(d["text"], k)) for k in range(1, a.repeats) for d in base]
    plain = base * a.repeats

    t1, (tr1, va1, s1) = timed(base, opts, a.runs)
    tn, (trn, van, sn) = timed(distinct, opts, a.runs)
    tp, (trp, vap, sp) = timed(plain, opts, a.runs)
    assert [d["text"] for d in trp] == [d["text"] for d in tr1], "plain repeats changed output"

    with tempfile.TemporaryDirectory() as tmp:  # the whole command, as a user runs it
        t0 = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(ROOT, "01_clean.py"), "--data", tmp],
                       check=True, capture_output=True)
        t_cli = time.perf_counter() - t0

    mb = sum(len(d["text"].encode()) for d in base) / 1e6
    print(f"{'corpus':<22}{'docs in':>9}{'docs out':>10}{'LSH cand.':>10}{'seconds':>9}{'MB/s':>7}")
    for name, t, n, out, s in (("1x", t1, len(base), len(tr1) + len(va1), s1),
                               (f"{a.repeats}x distinct (ROT-k)", tn, len(distinct),
                                len(trn) + len(van), sn),
                               (f"{a.repeats}x plain copies", tp, len(plain),
                                len(trp) + len(vap), sp)):
        print(f"{name:<22}{n:>9}{out:>10}{s['near_dedup']['candidate_pairs']:>10}{t:>9.2f}"
              f"{mb * n / len(base) / t:>7.2f}")
    print(f"\nratio {a.repeats}x distinct / 1x: {tn / t1:.2f}  (linear = {a.repeats}, "
          f"quadratic = {a.repeats ** 2})")
    print(f"ratio {a.repeats}x plain / 1x:    {tp / t1:.2f}  (copies removed by exact dedup; "
          "output identical to 1x)")
    print(f"\nCPU seconds per step (1x -> {a.repeats}x distinct, ratio): a step far above "
          f"{a.repeats} would be the one that does not scale")
    for step, c1 in s1["cpu_seconds"].items():
        cn = sn["cpu_seconds"][step]
        print(f"  {step:<24}{c1:>8.2f}{cn:>8.2f}{cn / max(c1, 1e-9):>7.2f}")
    print(f"whole default command (python 01_clean.py, incl. start-up, I/O, plots): "
          f"{t_cli:.1f} s (budget 60 s)")
    print("(timings are wall-clock on whatever else the machine is doing; noisy when shared)")


if __name__ == "__main__":
    main()
