"""
Exercises made from the scripts themselves: write the heart of a stage again, then let the
stage's own tests grade it.

  python exercises.py make 03             writes exercises/03_model.py: 03_model.py with the
                                          bodies of the functions in EXERCISES["03_model"]
                                          replaced by a TODO and `raise NotImplementedError`
  python exercises.py check 03            runs tests/test_03_*.py with exercises/03_model.py in
                                          place of 03_model.py; exit 0 when every test passes
  python exercises.py check 03 FILE       the same with FILE (check 03 03_model.py: the real one)

An exercise file is generated from the script, never written by hand, so the script stays the
one source of truth: signatures, docstrings and every other line are the script's, byte for
byte. Work in the exercise file, in order (easy to hard), and run `check` as often as you like;
`check --tests quality` runs only the tests whose names match (pytest -k), `check -v` shows
pytest's own report, with the tracebacks. Some tests reach several exercises (05's report needs
all three of its functions; 07's normaliser runs every decoder; 08's export runs all of its
functions), so `check 08 --only kv_logits` grades one exercise alone: the stage's other
exercises are taken from the real script, in the temporary copy only. `make` never overwrites an
exercise file (it may hold your work) unless given --force. The lesson of each stage is
docs/lessons/NN_name.md.

How `check` swaps the file in: the stage's tests import the stage by name (`load("03_model")`)
and also run it as a script (`python ROOT/03_model.py`). So the repository's files (what git
tracks, plus new files it does not ignore) are copied into a temporary folder, FILE is copied
there as 03_model.py, and pytest runs the stage's tests in that folder. Only that one stage is
replaced; the stages it imports (04 imports 03, 07 imports 03 and 06) are the real ones. The
repository itself is never changed.

Exit status: 0 every test passes; 1 some fail (the exercise is not done yet); 2 a usage error
(an unknown stage, a missing FILE, an exercise file that already exists).
"""
import argparse
import ast
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import tokenize
import xml.etree.ElementTree as ET
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "exercises"

# The exercises: per stage, the functions to write (`Class.method` for a method), easy to hard,
# each with what it must compute. `make` turns each entry into the TODO above its
# `raise NotImplementedError`.
EXERCISES = {
    "01_clean": {
        "quality_problem":
            "Return the name of the first rule `text` fails, in this order: too_short (fewer than "
            "a.min_words words, as WORD finds them), too_long (more than a.max_doc_chars characters), "
            "few_letters, many_digits, many_symbols (Unicode category S, or one of #*|_\\{}[]<>) as "
            "shares of the non-space characters against a's fractions, repeated_lines (with 3+ "
            "non-blank lines, the share that repeat an earlier one), word_length (mean word length "
            "outside [a.min_word_len, a.max_word_len]); None when it passes them all.",
        "minhash":
            "For each hash function i, the minimum over the shingle hashes x of "
            "((a[i] * x + b[i]) mod MERSENNE), keeping its low 32 bits (uint64 arithmetic): "
            "an array of len(a) values.",
        "near_dedup":
            "Find the alive documents that share a band key (band_column(b)) with another one; visit "
            "them in order, gathering the kept ones that share a (band, key) bucket with each, and drop "
            "it when the best share of equal signature positions among them is >= threshold (noting up "
            "to N_EXAMPLES examples as indices); otherwise file it in its buckets. Set "
            "stats['candidate_pairs']; return the keep mask.",
    },
    "02_tokenize": {
        "merge_ids":
            "A new list of ids in which each adjacent (a, b), scanning left to right without overlaps, "
            "becomes the single id `new`; every other id is copied as it is.",
        "train_naive":
            "From the 256 single bytes, repeat: count the adjacent pairs in every pre-split chunk, "
            "merge the most frequent pair (the tie rule above) into a new token (an existing id if its "
            "bytes are one already), until vocab_size tokens or no pair is left. Return (vocab, merges).",
        "Tokenizer.encode_ordinary":
            "Split fix_surrogates(text) into chunks with self.pat, turn each chunk's UTF-8 bytes into "
            "ids with self._bpe (remembered in self.cache, emptied past a million entries), and "
            "return all the ids in order.",
    },
    "03_model": {
        "RMSNorm.forward":
            "x divided by the root mean square of its last dimension (self.eps added to the mean "
            "square), times self.weight: computed in float32, returned in x's dtype.",
        "apply_rope":
            "x (B, n_head, T, head_dim) with each channel pair (i, i + head_dim/2) rotated, at "
            "position t, by the angle whose cosine and sine are cos[t, i] and sin[t, i].",
        "CausalSelfAttention.forward":
            "Multi-head causal attention with RoPE and a KV cache: q, k, v from self.qkv (v plus "
            "self.value_embed(ids) when there is one), split into heads; q and k rotated at their "
            "absolute positions (after the past's); past k, v put in front; each query sees the keys up "
            "to its own position (dropout when training). Return (self.resid_drop(self.proj(y)), (k, v)).",
    },
    "04_train": {
        "lr_at":
            "Linear warmup from warmup_lr at step 0 to lr at warmup_steps, then cosine decay from lr "
            "to min_lr at decay_steps, and min_lr from there on.",
        "clip_gradients":
            "Over the parameters that have a gradient: the global L2 norm of all gradients, measured "
            "before clipping. Mode \"norm\" rescales them so it is at most `limit`, \"value\" clamps "
            "each element to [-limit, limit], \"none\" leaves them. Return the norm as a float.",
        "accumulate_gradients":
            "Seed torch from (s.args.seed, step, rank). For each of s.accum micro-batches: this rank's "
            "s.micro windows of the global batch (numbers step*B + (micro_step*world + rank)*micro + j, "
            "through s.sampler and get_batch), forward under s.autocast, backward loss / accum through "
            "s.scaler, DDP syncing on the last micro-batch only. One all_sum gives the return value: "
            "(the step's mean loss over ranks, whether any rank was asked to stop).",
    },
    "05_eval": {
        "summarize_nll":
            "A dict: tokens (how many nll values), bytes (nbytes), loss (mean nll, nats per token), "
            "perplexity (exp of the loss), bpb (total nll in bits / nbytes; None when nbytes is 0).",
        "ngram_nll":
            "Two arrays: -log p of each target under the add-k unigram model and under the add-k "
            "bigram model given its context, both counted on train with the formulas above (count the "
            "pairs sparsely: no V x V table).",
        "calibration":
            "Put conf into n_bins equal-width bins on [0, 1] (1.0 in the last); per bin its count, "
            "accuracy (mean hit) and mean confidence; ECE as above. Return ece, top1_accuracy, "
            "mean_confidence, and bins: {count, accuracy, confidence} as lists.",
    },
    "06_finetune_lora": {
        "LoRALinear.forward":
            "The base layer's output plus, unless merged, the low-rank update: scaling * B A applied "
            "to dropout(x), as two thin matmuls (never form B A).",
        "LoRALinear.merge":
            "Once only: add delta_weight() to the base weight (in the base weight's dtype) and mark "
            "the layer merged.",
        "merge_lora":
            "Merge every LoRALinear in the model and put its base nn.Linear back in its place (the "
            "same attribute of the same parent module). Return the model.",
    },
    "07_safety": {
        "NgramGuard.logits":
            "Each text's logit: the bias plus the sum of self.weights at the text's n-gram buckets. "
            "bag is (ids, rows) as ngram_ids returns them (compute it when None); a text with no "
            "n-gram gets the bias alone. Return a float tensor of len(texts).",
        "fit_threshold":
            "Sort the rows by p. Of the cuts between distinct p values (and both ends), take the middle "
            "one of those with the least max(share of harmful rows below the cut, share of benign rows "
            "from it on); return the midpoint of the p values either side of it (0.0 or 1.0 at an end, "
            "0.5 when a class is missing).",
        "train_ngram":
            "Full-batch Adam (lr 0.05) for `steps` steps on the mean binary cross-entropy of "
            "sigmoid(logits) against labels, plus NGRAM_L2 * the sum of squared weights. Write the "
            "gradient yourself: (p - y) / n for each text's logit, summed into the weights of its "
            "buckets (index_add_) and into the bias. Return the NgramGuard.",
    },
    "08_export": {
        "kv_logits":
            "Prefill ids[:, :split] from an empty cache, then feed the rest one token per kv_step call, "
            "carrying the cache; return all the logits, concatenated along the sequence axis.",
        "ort_generate":
            "Greedy decoding with kv_step: prefill the last block_size tokens, then one token per call "
            "with the cache; when the window would hold more than block_size tokens, re-prefill the "
            "newest block_size // 2 from an empty cache; never emit ids >= vocab_used. Return idx with "
            "max_new_tokens ids appended.",
        "join_fp32_regions":
            "In place: for each Cast to fp32 whose input is a Cast to fp16 of an output of a node in "
            "fp32_nodes, make every node that reads the Cast's output read that fp32 output instead.",
    },
}


def stage_of(text):
    """"03", "3", "03_model" or "03_model.py" -> "03_model"."""
    key = Path(text).name.removesuffix(".py")
    for stage in EXERCISES:
        if key in (stage, stage[:2], stage[:2].lstrip("0")):
            return stage
    raise common.UserError(f"{text}: no such stage (one of {', '.join(s[:2] for s in EXERCISES)})")


# ----------------------------------------------------------------------------- make

def find_function(tree, qualname):
    """The def of `name` at the top level, or of `Class.name` inside a top-level class."""
    *cls, name = qualname.split(".")
    body = tree.body
    if cls:
        body = next((n.body for n in body if isinstance(n, ast.ClassDef) and n.name == cls[0]), [])
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
    return None


def signature_end(lines, node):
    """The line number (1-based) of the colon that ends the def's signature."""
    segment = "".join(lines[node.lineno - 1:node.body[0].lineno])
    depth, seen_def = 0, False
    for tok in tokenize.generate_tokens(io.StringIO(segment).readline):
        if tok.type == tokenize.NAME and tok.string == "def" and not depth:
            seen_def = True
        elif tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        elif seen_def and tok.type == tokenize.OP and tok.string == ":" and not depth:
            return node.lineno + tok.start[0] - 1
    raise AssertionError(f"no end of signature for {node.name}")


def body_span(lines, node):
    """(first, last, indent): the lines (1-based, inclusive) of the body after the docstring,
    and the body's indentation. When the function is its docstring alone, first = last + 1."""
    indent = " " * node.body[0].col_offset
    has_doc = ast.get_docstring(node, clean=False) is not None
    first = node.body[0].end_lineno + 1 if has_doc else signature_end(lines, node) + 1
    rest = node.body[1:] if has_doc else node.body
    if rest and rest[0].lineno < first:
        raise common.UserError(f"{node.name}: its body starts on the line of its signature or docstring")
    return first, node.end_lineno, indent


def todo_block(qualname, todo, indent):
    """The lines that replace a body: the TODO, wrapped, then the raise."""
    width = max(40, 100 - len(indent))
    text = textwrap.wrap(todo, width=width, initial_indent="# TODO: ", subsequent_indent="#       ",
                         break_long_words=False, break_on_hyphens=False)
    return [f"{indent}{line}\n" for line in text] + [f'{indent}raise NotImplementedError("exercise: {qualname}")\n']


def make_exercise(stage, source=None):
    """The text of exercises/<stage>.py: the script with each chosen body replaced by its TODO.
    Everything else is the script's, byte for byte; the same script gives the same text."""
    if source is None:
        source = (ROOT / f"{stage}.py").read_text(encoding="utf-8")
    lines = source.splitlines(keepends=True)
    tree = ast.parse(source, filename=f"{stage}.py")
    spans = []
    for qualname, todo in EXERCISES[stage].items():
        node = find_function(tree, qualname)
        if node is None:
            raise common.UserError(f"{stage}.py: no function {qualname} (EXERCISES is out of date)")
        first, last, indent = body_span(lines, node)
        spans.append((first, last, todo_block(qualname, todo, indent)))
    out, at = [], 1
    for first, last, block in sorted(spans):
        out += lines[at - 1:first - 1] + block
        at = last + 1
    out += lines[at - 1:]
    text = "".join(out)
    compile(text, f"exercises/{stage}.py", "exec")   # what make writes always imports
    return text


def write_exercise(stage, out_dir, force):
    path = Path(out_dir) / f"{stage}.py"
    if path.exists() and not force:
        raise common.UserError(f"{path}: exists and may hold your work; not overwritten "
                               "(move it away, or pass --force to start again)")
    text = make_exercise(stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------- check

def repo_files():
    """The files a fresh clone of the current work has: tracked, or new and not ignored. Without
    git (an unpacked archive), the scripts, tests/, bench/ and data/safety/."""
    try:
        r = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, text=True, check=True)
        files = [f for f in r.stdout.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = []
    if not files:
        files = [str(p.relative_to(ROOT)) for pattern in ("*.py", "tests/**/*", "bench/**/*", "data/safety/**/*")
                 for p in sorted(ROOT.glob(pattern)) if "__pycache__" not in p.parts]
    return [f for f in files if (ROOT / f).is_file()]


def copy_repo(dst):
    for rel in repo_files():
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst / rel)


def exercise_named(stage, name):
    """`name` ("Tokenizer.encode_ordinary", or "encode_ordinary") as one of the stage's exercises."""
    names = [q for q in EXERCISES[stage] if name in (q, q.split(".")[-1])]
    if len(names) != 1:
        raise common.UserError(f"--only {name}: not an exercise of {stage} (one of {', '.join(EXERCISES[stage])})")
    return names[0]


def with_real_bodies(text, stage, only):
    """`text` with each of the stage's exercise functions but `only` as the script has it: so one
    exercise is graded on its own, whatever the state of the others. A file that does not parse
    is left as it is (its tests then fail to import it, and say why)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return text
    source = (ROOT / f"{stage}.py").read_text(encoding="utf-8")
    real, real_lines, lines = ast.parse(source), source.splitlines(keepends=True), text.splitlines(keepends=True)
    span = lambda node: (min([node.lineno] + [d.lineno for d in node.decorator_list]), node.end_lineno)
    cuts = []
    for qualname in EXERCISES[stage]:
        theirs, ours = find_function(tree, qualname), find_function(real, qualname)
        if qualname != only and theirs is not None and ours is not None:
            (a, b), (c, d) = span(theirs), span(ours)
            cuts.append((a, b, real_lines[c - 1:d]))
    for a, b, def_lines in sorted(cuts, reverse=True):
        lines[a - 1:b] = def_lines
    return "".join(lines)


def read_junit(path):
    """[(test name, "pass" | "fail" | "skip", message)] from pytest's JUnit XML."""
    results = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "?")
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            text = f"{bad.get('message') or ''}\n{bad.text or ''}"
            todo = re.search(r"NotImplementedError: exercise: [\w.]+", text)   # which exercise it met
            message = todo.group(0) if todo else text.strip().split("\n")[0]
            if message == "collection failure":   # the file does not import: say why, and where
                e_lines = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
                where = re.search(r'File "[^"]*?([^"/]+)", line (\d+)', "\n".join(e_lines))
                message = (f"{message}: {e_lines[-1] if e_lines else '?'}"
                           + (f" ({where.group(1)} line {where.group(2)})" if where else ""))
            results.append((name, "fail", message[:160]))
        elif case.find("skipped") is not None:
            results.append((name, "skip", (case.find("skipped").get("message") or "")[:160]))
        else:
            results.append((name, "pass", ""))
    return results


def check(stage, file, tests=None, verbose=False, only=None):
    """Run the stage's tests with `file` in place of the stage's script; returns the exit status.
    With `only`, the stage's other exercises are the script's own (in the temporary copy)."""
    file = Path(file)
    if not file.is_file():
        raise common.UserError(f"{file}: not found" + (f" (make it first: python exercises.py make {stage[:2]})"
                                                      if file == OUT / f"{stage}.py" else ""))
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=f"exercise-{stage[:2]}-") as tmp:
        tmp = Path(tmp)
        work = tmp / "repo"
        copy_repo(work)
        if only:
            text = file.read_text(encoding="utf-8")
            (work / f"{stage}.py").write_text(with_real_bodies(text, stage, only), encoding="utf-8")
        else:
            shutil.copyfile(file, work / f"{stage}.py")
        test_files = sorted(str(p.relative_to(work)) for p in (work / "tests").glob(f"test_{stage[:2]}_*.py"))
        if not test_files:
            raise common.UserError(f"tests/test_{stage[:2]}_*.py: no test file for {stage}")
        xml = tmp / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
               f"--junitxml={xml}", "--tb=short" if verbose else "--tb=no", *test_files]
        if tests:
            cmd += ["-k", tests]
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        print(f"{stage}: running {' '.join(test_files)} with {file} as {stage}.py"
              + (f" (tests matching {tests!r})" if tests else ""), flush=True)
        if only:
            print(f"  grading {only} alone: {', '.join(q for q in EXERCISES[stage] if q != only)} "
                  "as the script has them", flush=True)
        r = subprocess.run(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL,
                           stdout=None if verbose else subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        results = read_junit(xml) if xml.exists() else []
    if r.returncode == 5 or (tests and not results):
        raise common.UserError(f"--tests {tests}: no test of {stage} matches")
    for name, outcome, message in results:
        mark = {"pass": "pass", "fail": "FAIL", "skip": "skip"}[outcome]
        print(f"  {mark}  {name}" + (f"  ({message})" if message else ""))
    passed = sum(o == "pass" for _, o, _ in results)
    counted = sum(o != "skip" for _, o, _ in results)
    skipped = len(results) - counted
    ok = r.returncode == 0 and passed == counted and counted > 0
    if not results and not verbose:
        print(r.stdout[-3000:])   # pytest did not get as far as running a test: say why
    print(f"{passed} of {counted} tests pass" + (f" ({skipped} skipped)" if skipped else "")
          + f" in {time.time() - t0:.0f} s" + ("" if ok else "; not there yet"))
    return 0 if ok else 1


# ----------------------------------------------------------------------------- command line

def table():
    rows = []
    for stage, items in EXERCISES.items():
        rows.append(f"  {stage}: " + ", ".join(f"{i}. {name}" for i, name in enumerate(items, 1)))
    return "exercises, easy to hard:\n" + "\n".join(rows)


def run(argv=None):
    ap = common.ArgumentParser(prog="exercises.py", description=__doc__.strip().split("\n")[0],
                               epilog=table(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="write exercises/NN_name.py from NN_name.py")
    m.add_argument("stage", nargs="+", help="stage number(s), e.g. 03 (or 03_model)")
    m.add_argument("--force", action="store_true", help="overwrite an existing exercise file (your work is lost)")
    m.add_argument("--out", default=str(OUT), help="folder to write into (default: exercises/)")
    c = sub.add_parser("check", help="run stage NN's tests with FILE in place of NN_name.py")
    c.add_argument("stage", help="stage number, e.g. 03")
    c.add_argument("file", nargs="?", help="the file to grade (default: exercises/NN_name.py)")
    c.add_argument("--tests", metavar="PATTERN", help="only the tests whose names match (pytest -k)")
    c.add_argument("--only", metavar="NAME", help="grade the exercise NAME alone: the stage's other "
                   "exercises are taken from the real script (in the temporary copy only)")
    c.add_argument("-v", "--verbose", action="store_true", help="show pytest's report, with tracebacks")
    args, extra = ap.parse_known_args(argv)
    if args.command == "check" and args.file is None and len(extra) == 1 and not extra[0].startswith("-"):
        args.file = extra[0]   # FILE after an option: check 03 --tests rope FILE
    elif extra:
        ap.error(f"unrecognized arguments: {' '.join(extra)}")

    if args.command == "make":
        stages = list(dict.fromkeys(stage_of(s) for s in args.stage))
        for stage in stages:   # refuse before writing anything
            if (Path(args.out) / f"{stage}.py").exists() and not args.force:
                write_exercise(stage, args.out, force=False)
        for stage in stages:
            path = write_exercise(stage, args.out, args.force)
            print(f"wrote {path}: {len(EXERCISES[stage])} exercises, easy to hard: {', '.join(EXERCISES[stage])}")
            print(f"  grade it with: python exercises.py check {stage[:2]}"
                  + ("" if Path(args.out).resolve() == OUT else f" {path}"))
        return 0
    stage = stage_of(args.stage)
    only = exercise_named(stage, args.only) if args.only else None
    return check(stage, args.file or OUT / f"{stage}.py", args.tests, args.verbose, only)


def main(argv=None):
    common.main(__file__, run, argv)


if __name__ == "__main__":
    main()
