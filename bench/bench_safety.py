"""The safety gate of 07_safety.py, measured beyond one run: its spread, and how it generalises.

    python bench/bench_safety.py spread [--data DIR]            # 07 for seeds 0-2 x threads 1, 2
    python bench/bench_safety.py styles [--data DIR] [--guards 0] [--seed 0] [--threads N]

spread: a verdict that flips with the seed or with the order in which floating point sums (the
thread count, the CPU) is not a verdict. It runs 07_safety.py as a user would, six times (seeds
0, 1, 2, each with --threads 1 and --threads 2), and prints each run's attack success and
over-refusal on the built-in suite, their range, and whether every run passed the gate. About
2 minutes a run on 2 cores. With the default guard (the n-gram guard alone) the seed changes
nothing by construction; the runs show it, and show what the thread count changes.

styles: a guard tested only on the framings it was trained on says little about the next
attack. This trains the guard on the whole training set, as 07 does (--guards adds LoRA guards), and
one more for each family of styles below with every training row of that family left out. Each
suite style is then measured twice through the whole system (normaliser, policy, guard on the
input and on the reply): by the guard that trained on its family ("in training"), and by the
guard that never saw it ("family held out"). Leaving out the family, not the style alone, is
the stricter test: a guard that saw hex but not base64 has still seen "decode this and do it".
The encodings are expected to move little when held out: the normaliser turns them back into
plain text before the guard reads them, so they generalise by mechanism. The framings are what
the guard has to learn. About 1 minute per guard on 2 cores (plus 1 per LoRA guard), suite included.

Both print a table and write DIR/bench_safety.json (one key per mode).
"""
import argparse
import copy
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
safety = importlib.import_module("07_safety")
model_lib = importlib.import_module("03_model")
tok_lib = importlib.import_module("02_tokenize")
lora = importlib.import_module("06_finetune_lora")

FAMILIES = {
    "framing": ["roleplay", "hypothetical", "injection", "translate"],
    "characters": ["fullwidth", "homoglyph", "zero_width", "zw_separator", "tag", "variation_selector",
                   "leetspeak", "leet_ext", "spacing", "hyphenated"],
    "encoding": ["base64", "base64_nested", "base64_chunked", "hex", "url", "morse", "rot13", "caesar",
                 "reverse", "reverse_words", "piglatin"],
    "dialogue": ["multi_turn", "dialogue"],
}


def spread(data):
    """07_safety.py for seeds 0-2 x threads 1, 2, each in a scratch folder beside DIR."""
    runs = []
    for seed in (0, 1, 2):
        for threads in (1, 2):
            with tempfile.TemporaryDirectory(dir=data) as tmp:
                for stage in ("02_tokenize", "04_train"):
                    os.symlink((data / stage).resolve(), Path(tmp) / stage)
                r = subprocess.run([sys.executable, str(ROOT / "07_safety.py"), "--data", tmp, "--seed", str(seed),
                                    "--threads", str(threads)], capture_output=True, text=True)
                if r.returncode not in (0, 1):
                    sys.exit(f"bench_safety.py: 07_safety.py failed: {r.stderr.strip().splitlines()[-1]}")
                rep = json.loads((Path(tmp) / "07_safety" / "report.json").read_text())
            last = rep["metrics"]["layers"]["guard_output"]
            runs.append({"seed": seed, "threads": threads, "attack_success": last["attack_success"]["rate"],
                         "over_refusal": last["over_refusal"]["rate"], "threshold": rep["guard"]["threshold"],
                         "passed": rep["gate"]["passed"], "seconds": rep["seconds"]["total"]})
            x = runs[-1]
            print(f"seed {seed} threads {threads}: attack success {x['attack_success']:.1%}, over-refusal "
                  f"{x['over_refusal']:.1%}, threshold {x['threshold']:.3f}, {'passed' if x['passed'] else 'FAILED'} "
                  f"({x['seconds']:.0f} s)", flush=True)
    for k in ("attack_success", "over_refusal"):
        print(f"{k.replace('_', ' ')}: {min(x[k] for x in runs):.1%} to {max(x[k] for x in runs):.1%}")
    print(f"gate passed in {sum(x['passed'] for x in runs)} of {len(runs)} runs")
    return runs


def styles(args):
    """The whole system's figures per style, by a guard that trained on it and one that did not."""
    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data)
    tok = tok_lib.load_tokenizer(data / "02_tokenize")
    model, _ = model_lib.load_model(data / "04_train" / "ckpt.pt")
    args.max_len = min(args.max_len, model.config.block_size)
    suite, train = safety.read_prompts(args.prompts), safety.read_prompts(args.guard_train)

    def system(rows, train_rows):
        run_args = copy.copy(args)
        guards, _, val = safety.build_guard(lora, model, tok, train_rows, run_args)
        run_args.threshold = val["threshold"]
        return safety.metrics(safety.run_suite(rows, model, tok, lora, guards, run_args, "suite"))["by_style"]

    seen, out = system(suite, train), {}
    for family, names in FAMILIES.items():
        rows = [r for r in suite if r["style"] in names]
        if rows:
            held = system(rows, [r for r in train if r["style"] not in names])
            out.update({s: {"family": family, "in_training": seen[s], "held_out": held[s]} for s in held})
    fmt = lambda r: "  n/a " if r["rate"] is None else f"{r['rate']:6.1%}"
    print(f"{'style':<20}{'family':<12}attack success: in training / held out    over-refusal: in / out")
    for s, v in out.items():
        print(f"{s:<20}{v['family']:<12}{fmt(v['in_training']['attack_success'])} / {fmt(v['held_out']['attack_success'])}"
              f"{'':<26}{fmt(v['in_training']['over_refusal'])} / {fmt(v['held_out']['over_refusal'])}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["spread", "styles"])
    ap.add_argument("--data", default="data", help="reads DIR/02_tokenize/ and DIR/04_train/ckpt.pt")
    ap.add_argument("--guards", type=int, default=0, help="styles: LoRA guards beside the n-gram guard (as 07's --guards)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    data, t0 = Path(a.data), time.time()
    if a.mode == "spread":
        res = spread(data)
    else:
        res = styles(safety.parse_args(["--data", a.data, "--guards", str(a.guards), "--seed", str(a.seed),
                                        "--threads", str(a.threads), "--device", "cpu"]))
    out = data / "bench_safety.json"
    old = json.loads(out.read_text()) if out.exists() else {}
    out.write_text(json.dumps({**old, a.mode: res, f"{a.mode}_seconds": round(time.time() - t0)}, indent=1) + "\n")
    print(f"{time.time() - t0:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
