"""Run the whole pipeline, stage by stage, then gather a report card.

    python pipeline.py              # every stage with its defaults on the built-in corpus
    python pipeline.py --tiny       # tiny settings: the end-to-end test runs this

Each stage is an ordinary script run in its own process, exactly as a student would run it
by hand; a failing stage stops the run with its own error message and exit status.
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# (script, extra flags for --tiny): tiny settings keep the whole run to a couple of minutes.
STAGES = [
    ("01_clean", []),
    ("02_tokenize", []),
    ("03_model", []),
    ("04_train", []),
    ("05_eval", []),
    ("06_finetune_lora", []),
    ("07_safety", []),
    ("08_export", []),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data", help="folder every stage reads from and writes to")
    ap.add_argument("--tiny", action="store_true", help="tiny settings, for a quick end-to-end check")
    args = ap.parse_args()
    for name, tiny_flags in STAGES:
        script = ROOT / f"{name}.py"
        if not script.exists():  # stages not written yet are skipped, loudly
            print(f"== {name}: not written yet, skipped")
            continue
        print(f"== {name}", flush=True)
        t0 = time.time()
        cmd = [sys.executable, str(script), "--data", args.data, *(tiny_flags if args.tiny else [])]
        rc = subprocess.call(cmd)
        if rc != 0:
            print(f"pipeline: {name} failed with exit status {rc}", file=sys.stderr)
            sys.exit(rc)
        print(f"== {name} done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
