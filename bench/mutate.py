"""
A mutation check of the test suite: do the tests notice when the code is wrong?

A test suite that passes says little by itself: tests that assert nothing also pass. A mutation
check asks the opposite question. It plants one small, realistic bug (a "mutant": a wrong sign,
an off-by-one, a forgotten mask or normalisation, swapped arguments, a wrong axis or constant)
in a copy of a stage's script, runs that stage's tests, and counts the mutant as *killed* when
they fail. A mutant that survives points at a property of the code no test checks. The goal
here is at least 90% of the mutants killed in every stage.

Each mutant is (script, old, new, what): `old` must occur exactly once in the script (a stale
mutant is an error, never silently skipped) and is replaced by `new`. The mutants aim at the
ideas each stage teaches. A mutant that cannot change any output ("equivalent") is useless:
it can never be killed, so none is kept in the list.

How it runs: per stage, the working tree's files are copied into one temporary folder;
the unmutated tests run there once (they must pass, and their time sets the per-mutant timeout);
then each mutant is applied, `python -m pytest -x -q tests/test_NN_*.py` runs, and the original
file is put back. Nothing in the repository itself is ever changed. This is a bench, not part of
CI's test run: it takes minutes per stage (04 and 07 the longest) and always exits 0.

Usage:
  .venv/bin/python bench/mutate.py                     # every stage
  .venv/bin/python bench/mutate.py --stage 03 --stage 05,06   # "co": common.py, "sa": safeguards.py
  .venv/bin/python bench/mutate.py --list              # print (and check) the mutants only
"""
import argparse
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOAL = 0.90

MUTANTS = [
    # ---- 01_clean.py: normalisation, splitting, quality rules, MinHash + LSH near dedup
    ("01_clean.py", r'INNER_SPACES = re.compile(r"(?<=\S) {2,}")', r'INNER_SPACES = re.compile(r" {2,}")',
     "collapse_whitespace also squeezes leading indentation"),
    ("01_clean.py", "if cur and len(cur) + len(sep) + len(part) > max_chars:",
     "if cur and len(cur) + len(part) > max_chars:", "split_long forgets the separator's length"),
    ("01_clean.py", "1 - len(set(lines)) / len(lines) > a.max_dup_line_frac",
     "len(set(lines)) / len(lines) > a.max_dup_line_frac", "repeated_lines: share of unique lines, not repeats"),
    ("01_clean.py", "    for j in range(k):  # a polynomial", "    for j in range(k - 1):  # a polynomial",
     "shingles of k-1 words (off-by-one)"),
    ("01_clean.py", "return h.min(axis=0)", "return h.min(axis=1)", "minhash: minimum over the wrong axis"),
    ("01_clean.py", "return max(below, key=lambda s: (1 / s[0]) ** (1 / s[1])) if below else shapes[0]",
     "return min(below, key=lambda s: (1 / s[0]) ** (1 / s[1])) if below else shapes[0]",
     "lsh_shape: the S-curve far below the threshold"),
    ("01_clean.py", "sims[best] >= threshold:", "sims[best] > threshold:",
     "near_dedup: > for >= (similarity equal to the threshold kept)"),
    # ---- 02_tokenize.py: BPE training (naive and fast), merging, encoding
    ("02_tokenize.py", "            out.append(new)\n            i += 2", "            out.append(new)\n            i += 1",
     "merge_ids: overlapping matches"),
    ("02_tokenize.py", "a, b = min(counts, key=lambda p: (-counts[p], p))",
     "a, b = max(counts, key=lambda p: (counts[p], p))", "train_naive: tie rule picks the largest pair"),
    ("02_tokenize.py", "counts[x, a] -= f", "counts[x, a] -= 1", "train_fast: left neighbour loses 1, not the frequency"),
    ("02_tokenize.py", "if c != -neg:  # stale entry", "if c > -neg:  # stale entry",
     "train_fast: stale heap entries taken at face value"),
    ("02_tokenize.py", "            if i < len(pair_ranks):\n                pair_ranks[i] =",
     "            if i + 1 < len(pair_ranks):\n                pair_ranks[i] =",
     "encode: right neighbour's rank not updated at the end (off-by-one)"),
    ("02_tokenize.py", "[self.special_tokens[part]] if i % 2 else", "[self.special_tokens[part]] if i % 2 == 0 else",
     "encode: special tokens at the even parts of the split"),
    # ---- 03_model.py: RoPE, RMSNorm, attention and its mask, init, sampling
    ("03_model.py", "torch.arange(0, head_dim, 2, device=positions.device,",
     "torch.arange(0, head_dim // 2, device=positions.device,", "rope_cos_sin: exponent i/d instead of 2i/d"),
    ("03_model.py", "x1 * sin + x2 * cos), dim=-1)", "x1 * sin - x2 * cos), dim=-1)", "apply_rope: wrong sign"),
    ("03_model.py", "xf.pow(2).mean(-1, keepdim=True)", "xf.pow(2).sum(-1, keepdim=True)",
     "RMSNorm: sum of squares, not mean"),
    ("03_model.py", "y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)",
     "y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)", "attention: causal mask forgotten"),
    ("03_model.py", "[None, :] <= pos[:, None]", "[None, :] < pos[:, None]",
     "cached attention: a query cannot see its own key"),
    ("03_model.py", "std = 0.02 / math.sqrt(2 * config.n_layer) if", "std = 0.02 / math.sqrt(config.n_layer) if",
     "init: residual projections scaled by 1/sqrt(n_layer)"),
    ("03_model.py", "logits = logits / temperature", "logits = logits * temperature",
     "sampling: multiply by the temperature"),
    # ---- 04_train.py: schedule, clipping, the global sequence index, the sampler, resume
    ("04_train.py", "0.5 * (1.0 + math.cos(math.pi * progress))", "0.5 * (1.0 - math.cos(math.pi * progress))",
     "lr_at: cosine with the wrong sign"),
    ("04_train.py", "return float(torch.nn.utils.clip_grad_norm_(params, limit))",
     "return float(torch.nn.utils.clip_grad_norm_(params, limit, norm_type=1))", "clip by norm: L1 norm"),
    ("04_train.py", '    if mode == "value":\n', '    if mode == "none":\n', "clip by value: never clips"),
    ("04_train.py", "first = step * B + (micro_step * world + rank) * micro",
     "first = step * B + (micro_step + rank) * micro", "sequence index without the world factor"),
    ("04_train.py", "return off + int(order[q % n_chunks]) * T", "return off + int(order[q % n_chunks])",
     "sampler: window index not scaled by T"),
    ("04_train.py", 'float(state["best_val_loss"])', 'float("inf")', "resume forgets best_val_loss"),
    ("04_train.py", '             "eval_interval", "eval_windows")', '             "eval_windows")', "RUN_FLAGS lacks eval_interval"),
    # ---- 05_eval.py: windows, bits per byte, n-gram baselines, multiple choice, intervals
    ("05_eval.py", "        done = s + T\n", "        done = s + T - 1\n", "window_plan: a target scored twice"),
    ("05_eval.py", "nll.sum() / (math.log(2) * nbytes)", "nll.sum() / nbytes", "bits per byte in nats"),
    ("05_eval.py", "left = np.bincount(train[:-1], minlength=V)", "left = np.bincount(train[1:], minlength=V)",
     "bigram: context counted as the right token"),
    ("05_eval.py", "(len(train) + k * V)", "(len(train) + k)", "unigram: smoothing mass k, not kV"),
    ("05_eval.py", "np.abs(acc - avg)", "(acc - avg)", "calibration: signed gaps cancel"),
    ("05_eval.py", ".gather(-1, x[j, start:len(s), None]).mean().item()",
     ".gather(-1, x[j, start:len(s), None]).sum().item()", "multiple choice: total, not mean, log-likelihood"),
    # ---- common.py: the interval every stage reports, the data stages' process pool
    ("common.py", "                yield pending.popleft().get()\n        while", "                yield pending.pop().get()\n        while",
     "parallel_map: results out of order"),
    ("common.py", "centre = (p + z * z / (2 * n)) / d", "centre = (p + z * z / n) / d", "wilson: wrong centre"),
    ("common.py", "z * z / (4 * n * n)) / d", "z * z / (4 * n)) / d", "wilson: 4n for 4n^2"),
    ("common.py", "return None, None", "return 0.0, 1.0", "wilson: an interval for no trials"),
    ("common.py", "if not test(value):", "if test(value):", "argparse types: the test inverted"),
    # ---- 06_finetune_lora.py: LoRA forward, merge, scaling; pooling; schedule; training
    ("06_finetune_lora.py", "self.lora_A), self.lora_B) * self.scaling", "self.lora_A), self.lora_B)",
     "LoRA forward forgets alpha/r"),
    ("06_finetune_lora.py", "self.base.weight += self.delta_weight().to(self.base.weight.dtype)",
     "self.base.weight += (self.lora_B @ self.lora_A).to(self.base.weight.dtype)", "LoRA merge forgets alpha/r"),
    ("06_finetune_lora.py", "base, r, alpha, alpha / r", "base, r, alpha, r / alpha", "LoRA scaling r/alpha"),
    ("06_finetune_lora.py", "feats = (h * m).sum(1) / m.sum(1).clamp(min=1)", "feats = h.mean(1)",
     "mean pooling over the padding too"),
    ("06_finetune_lora.py", "feats = h[torch.arange(h.size(0), device=h.device), mask.sum(1) - 1]",
     "feats = h[:, -1]", "last pooling reads the last (padding) position"),
    ("06_finetune_lora.py", "return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))",
     "return 0.5 * (1 + math.cos(0.5 * math.pi * (step - warm) / max(1, steps - warm)))",
     "_lr_factor: cosine ends at 0.5, not 0"),
    ("06_finetune_lora.py", 'loss = F.cross_entropy(clf(idx, mask), y[b].to(device))',
     'loss = F.cross_entropy(clf(idx, mask), y[:len(b)].to(device))', "train_classifier: labels not of the batch"),
    # ---- 07_safety.py: interval, threshold, gate, rates, decoders
    ("07_safety.py", "i = best[len(best) // 2]", "i = best[0]", "fit_threshold: edge of the best range"),
    ("07_safety.py", "if r is not None and not r < limit:", "if r is not None and r > limit:",
     "gate: a rate equal to the limit passes"),
    ("07_safety.py", 'k = sum((not x["blocked"][layer]) if label == "harmful" else x["blocked"][layer] for x in xs)',
     'k = sum(x["blocked"][layer] if label == "harmful" else (not x["blocked"][layer]) for x in xs)',
     "rate: attack success and over-refusal swapped"),
    ("07_safety.py", "index_add_(0, bag[0], r[bag[1]])", "index_add_(0, bag[0], r[bag[1]].abs())",
     "n-gram guard: the gradient loses its sign"),
    # ---- safeguards.py: decoders, what they leave alone, the guard's features
    ("safeguards.py", "a[k:] + a[:k] + (a[k:] + a[:k]).upper()", "a[k:] + a[:k] + a.upper()",
     "_shift: capitals not shifted"),
    ("safeguards.py", 's + "=" * (-len(s) % 4)', 's + "=" * (len(s) % 4)', "base64: wrong padding"),
    ("safeguards.py", "k = max(range(1, 26), key=", "k = max(range(1, 25), key=", "caesar: shift 25 never tried"),
    ("safeguards.py", "for w in words(m.group(0))) >= 4 and", "for w in words(m.group(0))) >= 3 and",
     "_clauses: a cipher guessed from three short words"),
    ("safeguards.py", 'ws + [f"{a} {b}" for a, b in zip(ws, ws[1:])]', "ws", "ngram_buckets: no word pairs"),
    # ---- 08_export.py: the guard's graph
    ("08_export.py", "self.weights[ngram_ids].sum(0, keepdim=True)", "self.weights[ngram_ids].mean(0, keepdim=True)",
     "Guard: the mean of the weights, not their sum"),
    # ---- 08_export.py: parity figures, fp32 regions of the fp16 graph, KV cache, generation
    ("08_export.py", "float(np.abs(ref - got).max())", "float((ref - got).max())", "compare: no absolute value"),
    ("08_export.py", "float((ref.argmax(-1) == got.argmax(-1)).mean())",
     "float((ref.argmax(0) == got.argmax(0)).mean())", "compare: top-1 over the wrong axis"),
    ("08_export.py", 'n.op_type in ("Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal")',
     'n.op_type in ("Pow", "ReduceMean")', "rmsnorm_statistics: stops after the mean (eps, sqrt in fp16)"),
    ("08_export.py", "and to(src) == onnx.TensorProto.FLOAT16", "and to(src) == onnx.TensorProto.FLOAT",
     "join_fp32_regions: never joins"),
    ("08_export.py", "for t in range(split, ids.shape[1]):", "for t in range(split + 1, ids.shape[1]):",
     "kv_logits: one token skipped after the prefill"),
    ("08_export.py", "start, past = idx.shape[1] - bs // 2, None", "start = idx.shape[1] - bs // 2",
     "ort_generate: slides the window but keeps the old cache"),
]
# Left out because they are equivalent (no output can change): in 01, BLANK_LINES r"\n{2,}" for
# r"\n{3,}" (a run of exactly two is replaced by itself) and shingles without np.unique (the
# minimum ignores repeats); in 05, window_plan's max(s, done) - s for max(s + 1, done + 1) - (s + 1).


def check_mutants(mutants):
    """Every `old` must occur exactly once in its script (a stale mutant is an error), and the
    mutated script must still compile."""
    for script, old, new, what in mutants:
        source = open(os.path.join(ROOT, script)).read()
        n = source.count(old)
        assert n == 1, f"stale mutant in {script} ({what}): the snippet occurs {n} times, not once:\n{old}"
        assert old != new, f"mutant in {script} ({what}) changes nothing"
        # a syntax error would be "killed" by every test without saying anything about them
        compile(source.replace(old, new, 1), f"{script} ({what})", "exec")


def copy_repo(dst):
    """The working tree's files (scripts, tests, bench, data/safety), tracked or new but not
    ignored, into dst: what a fresh clone of the current work has, without data/ or .venv/."""
    files = subprocess.run(["git", "-C", ROOT, "ls-files", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, text=True, check=True).stdout
    for rel in files.splitlines():
        if os.path.isfile(os.path.join(ROOT, rel)):
            os.makedirs(os.path.join(dst, os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), os.path.join(dst, rel))


def run_tests(folder, stage, timeout):
    """Run the stage's tests in folder: returns ("pass" | "fail" | "timeout", seconds)."""
    tests = sorted(glob.glob(os.path.join(folder, "tests", f"test_{stage}*.py")))   # "co": test_common.py, "sa": test_safeguards.py
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    # no .pyc files: a mutant and the original may have the same size and mtime second
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.time()
    # a session of its own, so a timeout also ends the scripts the tests started
    p = subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return "timeout", time.time() - t0
    return ("pass" if rc == 0 else "fail"), time.time() - t0


def run_stage(stage, mutants):
    """Baseline, then every mutant of the stage in one temporary copy; returns the results."""
    with tempfile.TemporaryDirectory(prefix=f"mutate-{stage}-") as tmp:
        copy_repo(tmp)
        base, secs = run_tests(tmp, stage, timeout=1800)
        print(f"\n== stage {stage}: unmutated tests {base} in {secs:.0f} s", flush=True)
        if base != "pass":
            print(f"   the tests must pass unmutated; stage {stage} not scored")
            return None
        timeout = 3 * secs + 30
        results = []
        for script, old, new, what in mutants:
            path = os.path.join(tmp, script)
            original = open(path).read()
            assert original.count(old) == 1, f"{script} changed while running: stale mutant ({what})"
            with open(path, "w") as f:
                f.write(original.replace(old, new, 1))
            try:
                outcome, s = run_tests(tmp, stage, timeout)
            finally:
                with open(path, "w") as f:
                    f.write(original)
            verdict = {"fail": "killed", "timeout": "killed (timeout)", "pass": "SURVIVED"}[outcome]
            print(f"   {verdict:<17} {s:5.0f} s  {script}: {what}", flush=True)
            results.append((script, what, outcome))
        return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--stage", action="append", default=[],
                    help="stage number(s) to run, e.g. --stage 03 or --stage 01,05 (repeatable); default all")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    args = ap.parse_args()
    stages = sorted({s.strip().zfill(2) for arg in args.stage for s in arg.split(",") if s.strip()}
                    or {m[0][:2] for m in MUTANTS})
    chosen = [m for m in MUTANTS if m[0][:2] in stages]
    unknown = set(stages) - {m[0][:2] for m in MUTANTS}
    if unknown:
        ap.error(f"--stage: no mutants for {', '.join(sorted(unknown))}")
    check_mutants(chosen)
    if args.list:
        for script, old, new, what in chosen:
            print(f"{script}: {what}\n    - {old!r}\n    + {new!r}")
        print(f"{len(chosen)} mutants, all found exactly once")
        return

    table = {}
    for stage in stages:
        t0 = time.time()
        results = run_stage(stage, [m for m in chosen if m[0][:2] == stage])
        table[stage] = (results, time.time() - t0)

    print(f"\n{'stage':<7}{'killed':>8}{'total':>7}{'%':>6}{'timeouts':>10}{'minutes':>9}")
    all_ok = True
    for stage, (results, secs) in table.items():
        if results is None:
            print(f"{stage:<7}{'tests fail unmutated':>30}")
            all_ok = False
            continue
        killed = sum(o != "pass" for _, _, o in results)
        share = killed / len(results)
        all_ok &= share >= GOAL
        print(f"{stage:<7}{killed:>8}{len(results):>7}{share:>6.0%}"
              f"{sum(o == 'timeout' for _, _, o in results):>10}{secs / 60:>9.1f}")
    survivors = [(s, w) for results, _ in table.values() if results for s, w, o in results if o == "pass"]
    if survivors:
        print("\nsurvivors (a bug no test notices):")
        for script, what in survivors:
            print(f"  {script}: {what}")
    print(f"\n{'every stage reaches' if all_ok else 'NOT every stage reaches'} the goal of "
          f"{GOAL:.0%} killed")


if __name__ == "__main__":
    main()
