"""Benchmark for 08_export.py: ONNX Runtime against PyTorch eager, at the default model size.

    python bench/bench_export.py [--preset cpu] [--ckpt PATH] [--threads N] [--repeats 7]

Without --ckpt it builds a randomly initialised model of the preset (speed does not depend on
the weights, so no training run is needed), saves it as a checkpoint in a temporary folder and
runs 08_export.py on it, exactly as a user would. It then prints, from that run's report.json:
  1. per-token decode at batch 1 with the KV cache: ms/token for PyTorch eager and for ONNX
     Runtime fp32 / fp16 / int8, as a speed-up over PyTorch. Target: ONNX Runtime fp32 >= 2x.
  2. prefill of block_size / 2 tokens, same engines, as a speed-up.
  3. file sizes against the fp32 graph.
All engines are timed in the same run, taking turns within each repeat; the figures are medians.
On a shared machine they are noisy: compare the ratios, not the milliseconds.
"""
import argparse
import dataclasses
import importlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402  (beside the scripts, found through ROOT)
model_lib = importlib.import_module("03_model")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=model_lib.DEFAULT_PRESET, choices=sorted(model_lib.PRESETS))
    ap.add_argument("--ckpt", default=None, help="benchmark this checkpoint instead of a random model")
    ap.add_argument("--threads", type=int, default=0, help="passed to 08_export.py (0: library defaults)")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt
        if ckpt is None:
            config = model_lib.PRESETS[args.preset]
            torch.manual_seed(0)
            model = model_lib.GPT(config)
            ckpt = Path(tmp) / "ckpt.pt"
            common.save_checkpoint({"model": model.state_dict(), "config": dataclasses.asdict(config)}, ckpt)
        cmd = [sys.executable, str(ROOT / "08_export.py"), "--data", tmp, "--ckpt", str(ckpt),
               "--threads", str(args.threads), "--repeats", str(args.repeats), "--device", "cpu"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode not in (0, 1):   # 1 = a parity check failed: still worth reporting
            sys.exit(f"08_export.py failed:\n{r.stderr[-2000:]}")
        report = json.loads((Path(tmp) / "08_export" / "report.json").read_text())

    setup, lat = report["latency_setup"], report["latency"]
    base = next(iter(lat.values()))
    print(f"model: {'checkpoint ' + str(args.ckpt) if args.ckpt else 'random ' + args.preset + ' preset'}, "
          f"batch 1, {setup['threads']} threads, median of {setup['repeats']}")
    print(f"\n{'engine':<26}{'decode ms/tok':>14}{'speed-up':>10}{'prefill ms':>12}{'speed-up':>10}")
    for k, v in lat.items():
        print(f"{k:<26}{v['decode_ms_per_token']:>14.3f}{base['decode_ms_per_token'] / v['decode_ms_per_token']:>9.2f}x"
              f"{v['prefill_ms']:>12.2f}{base['prefill_ms'] / v['prefill_ms']:>9.2f}x")
    print(f"\n{'file':<22}{'MiB':>9}{'vs fp32':>9}")
    for k, v in report["files"].items():
        print(f"{k:<22}{v['bytes'] / 2**20:>9.2f}{v['ratio']:>9.3f}")
    speedup = base["decode_ms_per_token"] / lat["onnxruntime fp32"]["decode_ms_per_token"]
    print(f"\ntarget: ONNX Runtime fp32 decode >= 2x PyTorch eager: {speedup:.2f}x "
          f"({'met' if speedup >= 2 else 'NOT met'}); parity checks {'passed' if report['passed'] else 'FAILED'}")


if __name__ == "__main__":
    main()
