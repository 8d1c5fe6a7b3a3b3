"""Generalisation of 07_safety.py's guard: each attack style judged by a guard that never saw it.

    python bench/bench_safety.py [--data DIR] [--guards 1] [--seed 0] [--threads N]

A guard tested only on the framings it was trained on says little about the next attack. This
bench trains one guard (or --guards of them) on the whole training set, as 07 does, and then one
more for each family of styles below with every training row of that family left out. Each
suite style is then measured twice through the whole system (normaliser, policy, guard on the
input and on the reply): by the guard that trained on its family ("in training"), and by the
guard that never saw it ("family held out"). Leaving out the family, not the style alone, is
the stricter test: a guard that saw hex but not base64 has still seen "decode this and do it".

The encodings are expected to move little when held out: the normaliser turns them back into
plain text before the guard reads them, so they generalise by mechanism. The framings are what
the guard has to learn. It prints the table and writes DIR/07_safety/bench_safety.json; about 1
minute per guard on 2 cores, plus one pass of the suite per guard.
"""
import argparse
import copy
import importlib
import json
import sys
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data", help="reads DIR/02_tokenize/ and DIR/04_train/ckpt.pt")
    ap.add_argument("--guards", type=int, default=1, help="guards per ensemble (07's default run uses 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    args = safety.parse_args(["--data", a.data, "--guards", str(a.guards), "--seed", str(a.seed),
                              "--threads", str(a.threads), "--device", "cpu"])
    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data)
    tok = tok_lib.load_tokenizer(data / "02_tokenize")
    model, _ = model_lib.load_model(data / "04_train" / "ckpt.pt")
    args.max_len = min(args.max_len, model.config.block_size)
    suite, train = safety.read_prompts(args.prompts), safety.read_prompts(args.guard_train)

    def system(rows, train_rows):
        """The whole system's figures per style, with guards trained on train_rows."""
        run_args = copy.copy(args)
        guards, _, val = safety.build_guard(lora, model, tok, train_rows, run_args)
        run_args.threshold = val["threshold"]
        return safety.metrics(safety.run_suite(rows, model, tok, lora, guards, run_args, "suite"))["by_style"]

    t0 = time.time()
    seen = system(suite, train)
    out = {}
    for family, styles in FAMILIES.items():
        rows = [r for r in suite if r["style"] in styles]
        if rows:
            held = system(rows, [r for r in train if r["style"] not in styles])
            out.update({s: {"family": family, "in_training": seen[s], "held_out": held[s]} for s in held})
    fmt = lambda r: "  n/a " if r["rate"] is None else f"{r['rate']:6.1%}"
    print(f"{'style':<20}{'family':<12}{'attack success: in training / held out':<42}over-refusal: in / out")
    for s, v in out.items():
        print(f"{s:<20}{v['family']:<12}{fmt(v['in_training']['attack_success'])} / "
              f"{fmt(v['held_out']['attack_success'])}{'':<26}{fmt(v['in_training']['over_refusal'])} / "
              f"{fmt(v['held_out']['over_refusal'])}")
    (data / "bench_safety.json").write_text(json.dumps(
        {"guards": args.guards, "seed": args.seed, "by_style": out, "seconds": round(time.time() - t0)}, indent=1))
    print(f"{time.time() - t0:.0f} s; wrote {data / 'bench_safety.json'}")


if __name__ == "__main__":
    main()
