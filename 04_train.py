"""
Steps 5 and 6 of the framework: training infrastructure and base training.

In:  data/02_tokenize/{train,val}.bin + meta.json (+ train_docs.jsonl for --curriculum)
     data/03_model/config.json (or --preset NAME)
Out: data/04_train/ckpt.pt        the best model by validation loss (what every later stage reads)
     data/04_train/last.pt        the full training state, for --resume
     data/04_train/metrics.jsonl  one line per step (loss, lr, grad norm, tok/s, MFU) and per eval
     data/04_train/summary.json, loss.png, lr.png

The ideas, in the order the code uses them:
  1. Data: the token stream is cut into windows of block_size + 1 tokens; an epoch visits every
     window once in a shuffled order. Which windows a step sees is a pure function of
     (seed, step): that makes --resume exact and lets N processes split one batch.
  2. Distributed data parallel: under `torchrun` each process (rank) takes its share of every
     batch; gradients are averaged across ranks during backward. Gradient accumulation is
     derived from the world size so that the global batch (and so the maths) stays the same.
  3. AdamW with weight decay on matrices only (and a larger rate for the embedding), a linear
     warmup then cosine decay of the learning rate, gradient clipping, mixed precision.
  4. Bookkeeping that makes long runs safe: periodic evaluation keeping the best checkpoint,
     atomic checkpoints with everything needed to resume bit for bit, Ctrl-C that saves, and a
     non-finite loss that stops the run instead of silently destroying the weights.

Deliberately left out: FSDP/tensor parallelism (the model fits on one device), data loaders
with worker processes (a memmap slice is already fast), and learning-rate finders.

    python 04_train.py                                   # one process, defaults
    torchrun --nproc_per_node=8 04_train.py --preset gpt2  # one node, 8 GPUs
"""
import argparse
import contextlib
import dataclasses
import importlib
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common

model_lib = importlib.import_module("03_model")


def fail(msg):
    """A user's mistake: one line on stderr naming the file or flag, exit status 2."""
    print(f"04_train.py: {msg}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------- data

def load_tokens(data_dir, block_size, vocab_size):
    """Open the token memmaps of 02_tokenize and check they fit the model. Returns (meta, train, val)."""
    tok = Path(data_dir) / "02_tokenize"
    try:
        meta = json.loads((tok / "meta.json").read_text())
        dtype, n_vocab = np.dtype(meta["dtype"]), int(meta["vocab_size"])
    except FileNotFoundError:
        fail(f"{tok / 'meta.json'}: not found; run 02_tokenize.py first")
    except (ValueError, KeyError, TypeError) as e:
        fail(f"{tok / 'meta.json'}: unreadable ({type(e).__name__}: {e})")
    if vocab_size is not None and n_vocab > vocab_size:
        fail(f"{tok / 'meta.json'}: vocabulary of {n_vocab} tokens is larger than the model's "
             f"vocab_size {vocab_size}; rerun 03_model.py so it picks up the tokenizer")
    splits = []
    for split in ("train", "val"):
        path = tok / f"{split}.bin"
        if not path.is_file():
            fail(f"{path}: not found; run 02_tokenize.py first")
        # A memmap reads pages from disk on demand: the corpus never has to fit in RAM.
        arr = np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)
        if len(arr) < block_size + 1:
            fail(f"{path}: {len(arr)} tokens, fewer than the context of {block_size} + 1; "
                 "use more data or a model with a smaller block_size")
        splits.append(arr)
    return meta, splits[0], splits[1]


def document_difficulty(tokens, docs_path, vocab_size):
    """Score every document for the curriculum: short and predictable is easy.

    "Predictable" is measured without any model: the mean surprisal of the document's tokens
    under the corpus's own unigram distribution (-log p(token)). Documents made of common
    tokens score low. Returns (doc_starts, score) with score in [0, 1], 0 = easiest.
    """
    try:
        rows = [json.loads(line) for line in open(docs_path)]
        starts = np.array([r["start"] for r in rows], dtype=np.int64)
        lengths = np.array([r["length"] for r in rows], dtype=np.int64)
    except FileNotFoundError:
        fail(f"{docs_path}: not found; --curriculum needs 02_tokenize's document index")
    except (ValueError, KeyError, TypeError) as e:
        fail(f"{docs_path}: unreadable ({type(e).__name__}: {e})")
    counts = np.bincount(tokens, minlength=vocab_size).astype(np.float64) + 1.0
    surprisal = -np.log(counts / counts.sum())
    cum = np.concatenate([[0.0], np.cumsum(surprisal[tokens])])
    mean_nll = (cum[starts + lengths] - cum[starts]) / np.maximum(lengths, 1)
    # average of the two ranks, so neither unit (tokens, nats) dominates the other
    rank = lambda a: np.argsort(np.argsort(a, kind="stable"), kind="stable") / max(len(a) - 1, 1)
    return starts, (rank(lengths) + rank(mean_nll)) / 2


def make_sampler(n_tokens, T, seed, easy_first=None):
    """Return window_start(q): where the q-th training window of the endless stream begins.

    An epoch is every window [off + i*T, off + i*T + T + 1) once, in a random order; the offset
    `off` moves each epoch so that window boundaries differ between epochs. Everything is
    derived from (seed, epoch): no state to save, any step can be recomputed on any rank.
    `easy_first` (chunk indices, easiest first) replaces the start of epoch 0: the curriculum.
    """
    n_chunks = max(1, (n_tokens - 1) // T - 1)
    slack = min(n_tokens - 1 - n_chunks * T, T - 1)
    cache = {}

    def epoch_plan(epoch):
        if epoch not in cache:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            off = int(torch.randint(0, slack + 1, (1,), generator=g)) if epoch else 0
            order = torch.randperm(n_chunks, generator=g).numpy()
            if epoch == 0 and easy_first is not None and len(easy_first):
                rest = np.ones(n_chunks, bool)
                rest[easy_first] = False
                order = np.concatenate([easy_first, order[rest[order]]])
            cache.clear()
            cache[epoch] = (off, order)
        return cache[epoch]

    def window_start(q):
        off, order = epoch_plan(q // n_chunks)
        return off + int(order[q % n_chunks]) * T

    window_start.n_chunks = n_chunks
    return window_start


def get_batch(tokens, starts, T, device):
    """Stack windows into (x, y): y is x shifted by one, the next token to predict."""
    buf = torch.from_numpy(np.stack([tokens[s:s + T + 1].astype(np.int64) for s in starts]))
    x, y = buf[:, :-1], buf[:, 1:]
    if device.type == "cuda":  # pinned memory lets the copy overlap with the GPU's work
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# ----------------------------------------------------------------------------- distributed

def setup_distributed(device_flag):
    """One process by default; under torchrun, join the process group. Returns (rank, world, device)."""
    if device_flag == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device is available")
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device_flag)
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device_flag == "cuda":
        # one GPU per process; NCCL moves gradients GPU to GPU (NVLink/InfiniBand)
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return rank, world, torch.device("cuda", local_rank)
    dist.init_process_group("gloo")  # CPU: gloo over TCP/shared memory
    return rank, world, torch.device("cpu")


def end_distributed():
    """Leave the process group together: a rank that tears its gloo connections down while rank
    0 is still writing the outputs can abort ("terminate called without an active exception"),
    and torchrun then reports the whole run as failed."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_sum(t):
    """Sum a tensor over ranks (identity in one process)."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


# ----------------------------------------------------------------------------- optimisation

def make_optimizer(model, lr, weight_decay, betas, eps, device_type, embed_lr_scale=1.0):
    """AdamW, weight decay on matrices only, the embedding tables at embed_lr_scale x lr.

    Decay pulls weights toward zero; that regularises matrices (embeddings, projections), but
    on the RMSNorm gains it would fight the scale they exist to set, so 1-D tensors are
    exempt. The embedding tables (the token embedding, which is also the output head, and the
    value embeddings) get their own, larger rate: with it the default model reached a lower
    loss in the same time (measured: see the README); small GPT speedruns make the same
    choice. Each group's "lr_scale" multiplies the schedule's rate. fused=True does the whole
    update in one CUDA kernel instead of one per tensor.
    """
    tables = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    matrices = [p for p in model.parameters() if p.dim() >= 2 and all(p is not t for t in tables)]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [dict(params=matrices, weight_decay=weight_decay, lr_scale=1.0),
              dict(params=tables, weight_decay=weight_decay, lr_scale=embed_lr_scale),
              dict(params=vectors, weight_decay=0.0, lr_scale=1.0)]
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device_type == "cuda")


def lr_at(step, lr, warmup_steps, warmup_lr, decay_steps, min_lr):
    """Learning rate for optimizer step `step` (0-based): linear warmup, cosine decay, floor.

    Warmup: at the start Adam's moment estimates are noise and the weights are random, so big
    steps go in bad directions; ramping from warmup_lr to lr lets the estimates settle.
    Cosine: large steps explore early, small steps settle into a minimum at the end.
    """
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def clip_gradients(params, mode, limit):
    """Clip gradients in place; return the global gradient norm measured before clipping.

    "norm" rescales all gradients together so their global L2 norm is at most `limit`: the
    direction of the update is kept, only its length is capped. "value" clamps each element to
    [-limit, limit], which can change the direction. The pre-clip norm is what to watch: spikes
    in it announce a loss spike.
    """
    params = [p for p in params if p.grad is not None]
    if mode == "norm":
        return float(torch.nn.utils.clip_grad_norm_(params, limit))
    norm = float(torch.nn.utils.clip_grad_norm_(params, float("inf")))  # measure only
    if mode == "value":
        torch.nn.utils.clip_grad_value_(params, limit)
    return norm


def measure_matmul_flops(device, dtype, seconds=0.5):
    """This machine's own matrix-multiply rate in `dtype` (FLOP/s): the denominator of MFU.

    Grows a square matmul until one takes ~50 ms (so call overhead is negligible), then keeps
    the best of a few timings. Measured, not looked up, because a CPU's rate depends on its
    vector units (AVX2, AVX-512, AMX) and on what else is running on it.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n, limit = 256, 8192 if device.type == "cuda" else 4096
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        dt = time.perf_counter() - t0
        if dt > 0.05 or n >= limit:
            break
        n *= 2
    best, t_end = dt, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, tokens, T, batch, device, autocast, rank, world, max_windows=None):
    """Mean loss per token over non-overlapping validation windows (all of them by default).

    The windows are fixed (evenly spaced when limited), so successive evaluations compare
    like with like; ranks split them and sum their results.
    """
    n = (len(tokens) - 1) // T
    idx = np.arange(n) if not max_windows or max_windows >= n else np.linspace(0, n - 1, max_windows).astype(int)
    mine = idx[rank::world]
    total = torch.zeros(2, dtype=torch.float64, device=device)
    model.eval()
    for i in range(0, len(mine), batch):
        x, y = get_batch(tokens, mine[i:i + batch] * T, T, device)
        with autocast:
            _, loss, _ = model(x, y)
        total += torch.stack([loss.double() * x.numel(), torch.tensor(float(x.numel()), device=device, dtype=torch.float64)])
    model.train()
    total = all_sum(total)
    return float(total[0] / total[1])


# ----------------------------------------------------------------------------- outputs

def save_plots(metrics, folder):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tr = [m for m in metrics if m["kind"] == "train"]
    ev = [m for m in metrics if m["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([m["step"] for m in tr], [m["loss"] for m in tr], lw=0.6, alpha=0.7, label="train (per step)")
    ax.plot([m["step"] for m in ev], [m["val_loss"] for m in ev], "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=100)
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([m["step"] for m in tr], [m["lr"] for m in tr])
    ax.set(xlabel="step", ylabel="learning rate", title="warmup + cosine schedule")
    fig.tight_layout()
    fig.savefig(folder / "lr.png", dpi=100)
    plt.close("all")


# ----------------------------------------------------------------------------- main

# Flags that define the run's maths, and which step's model becomes ckpt.pt (the evaluation
# schedule): --resume restores them from the checkpoint, so a resumed run is the same run and
# writes the same files. Everything else (device, threads, logging) may change between runs.
RUN_FLAGS = ("batch_size", "lr", "embed_lr_scale", "min_lr", "warmup_steps", "warmup_lr", "decay_steps", "weight_decay",
             "beta1", "beta2", "eps", "clip", "clip_mode", "dtype", "seed", "curriculum", "max_steps",
             "eval_interval", "eval_windows")


def parse_args(argv=None):
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Train the GPT of 03_model.py on the tokens of 02_tokenize.py "
                                "(one process, or DDP under torchrun).")
    a = p.add_argument
    a("--data", default="data", help="data folder: reads 02_tokenize/ and 03_model/, writes 04_train/")
    a("--preset", default=None, help="use this 03_model preset instead of data/03_model/config.json")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
      help="cuda when available")
    a("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
      help="autocast dtype; auto = bf16 on a GPU that has it, else fp16 on GPU, fp32 on CPU")
    a("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    a("--threads", type=int, default=0, help="torch threads per process (0: PyTorch's default)")
    # how long
    a("--epochs", type=float, default=None, help="passes over the training windows (default 4)")
    a("--max-steps", type=int, default=None, help="optimizer steps; overrides --epochs")
    # batch
    a("--batch-size", type=int, default=8, help="sequences per optimizer step, all ranks together")
    a("--micro-batch", type=int, default=None,
      help="sequences per forward pass per rank (default: batch-size / world size, no accumulation)")
    # optimiser and schedule
    a("--lr", type=float, default=2.5e-3, help="peak learning rate")
    a("--embed-lr-scale", type=float, default=8.0,
      help="the embedding tables (token embedding = output head, value embeddings) learn at this x lr")
    a("--warmup-steps", type=int, default=None, help="linear warmup length (default: a fifth of the steps)")
    a("--warmup-lr", type=float, default=1e-6, help="learning rate at step 0")
    a("--min-lr", type=float, default=None, help="floor of the cosine decay (default lr / 10)")
    a("--decay-steps", type=int, default=None, help="step where the cosine reaches min-lr (default: the last)")
    a("--weight-decay", type=float, default=0.1)
    a("--beta1", type=float, default=0.9)
    a("--beta2", type=float, default=0.99)
    a("--eps", type=float, default=1e-8)
    a("--clip", type=float, default=1.0, help="gradient clipping threshold (norm or value)")
    a("--clip-mode", default="norm", choices=["norm", "value", "none"])
    a("--curriculum", type=float, default=0.0,
      help="fraction of the steps that see the easiest windows first (short, common-token documents)")
    a("--seed", type=int, default=1337)
    # evaluation, checkpoints, logging
    a("--eval-interval", type=int, default=100, help="steps between validation estimates")
    a("--eval-windows", type=int, default=64, help="validation windows per estimate (the final eval uses all)")
    a("--save-interval", type=int, default=None, help="steps between last.pt saves (default: eval interval)")
    a("--resume", action="store_true", help="continue from last.pt (an interrupted or a finished run)")
    a("--stop-at", type=int, default=None, help="stop as if interrupted after this step (tests, demos)")
    a("--peak-flops", type=float, default=None, help="FLOP/s per process for MFU (default: measured)")
    a("--wandb", action="store_true", help="also log to Weights & Biases (needs `pip install wandb`)")
    args = p.parse_args(argv)
    for flag in ("batch_size", "eval_interval", "eval_windows"):
        if getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        fail(f"--warmup-steps must be 0 or more, got {args.warmup_steps}")
    for flag in ("max_steps", "micro_batch", "save_interval"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.epochs is not None and args.epochs <= 0:
        fail(f"--epochs must be positive, got {args.epochs}")
    if not 0 <= args.curriculum <= 1:
        fail(f"--curriculum is a fraction in [0, 1], got {args.curriculum}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.wandb:
        try:
            import wandb
        except ImportError:
            fail("--wandb: the wandb package is not installed (pip install wandb)")
    rank, world, device = setup_distributed(args.device)
    master = rank == 0
    out, work = Path(args.data) / "04_train", Path(args.data) / "04_train.partial"

    # --- the state to start from: a checkpoint (resume) or a config (fresh run)
    state = None
    if args.resume:
        src = next((f / "last.pt" for f in (work, out) if (f / "last.pt").is_file()), None)
        if src is None:
            fail(f"--resume: no last.pt in {work} or {out}")
        try:
            state = torch.load(src, map_location="cpu", weights_only=True)
            config = model_lib.GPTConfig(**state["config"])
            saved = {k: state["args"][k] for k in RUN_FLAGS}
            int(state["step"])
        except Exception as e:
            fail(f"{src}: not a usable training checkpoint ({type(e).__name__}: {str(e)[:200]})")
        explicit_length = args.max_steps is not None or args.epochs is not None
        for k in RUN_FLAGS:
            if not (k == "max_steps" and explicit_length):
                setattr(args, k, saved[k])
        if master and src.parent == out:  # continuing a finished run: work on a copy of it
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(out, work)
    elif args.preset:
        if args.preset not in model_lib.PRESETS:
            fail(f"--preset {args.preset}: unknown, choose from {', '.join(model_lib.PRESETS)}")
        config = model_lib.PRESETS[args.preset]
    else:
        cfg_path = Path(args.data) / "03_model" / "config.json"
        try:
            raw = json.loads(cfg_path.read_text())
            names = {f.name for f in dataclasses.fields(model_lib.GPTConfig)}
            config = model_lib.GPTConfig(**{k: v for k, v in raw.items() if k in names})
        except FileNotFoundError:
            fail(f"{cfg_path}: not found; run 03_model.py first or pass --preset")
        except (ValueError, TypeError, AttributeError) as e:
            fail(f"{cfg_path}: bad model config ({type(e).__name__}: {e})")
    T = config.block_size
    from_preset = args.preset and not args.resume
    meta, train_tokens, val_tokens = load_tokens(args.data, T, None if from_preset else config.vocab_size)
    if from_preset:  # a preset fits itself to the tokenizer, like 03_model.py does
        config = dataclasses.replace(config, vocab_size=64 * math.ceil(meta["vocab_size"] / 64),
                                     vocab_used=meta["vocab_size"])

    # --- batch geometry: the global batch is fixed; accumulation makes up what ranks don't
    B = args.batch_size
    micro = args.micro_batch or max(1, B // world)
    if B % (micro * world):
        fail(f"--batch-size {B} is not a multiple of --micro-batch {micro} x world size {world}")
    accum = B // (micro * world)

    # --- precision: autocast runs matmuls in 16 bits, keeps weights and the optimiser in fp32
    dtype = args.dtype
    if dtype == "auto":
        # On CPU fp32 is the default: bf16 only pays with AMX/AVX-512-BF16 matrix units
        # (bench/bench_train.py measures it; on an AVX2-only CPU bf16 matmuls are ~100x slower).
        dtype = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    ptdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    autocast = (torch.autocast(device.type, dtype=ptdtype) if dtype != "fp32" else contextlib.nullcontext())
    # fp16's narrow exponent underflows small gradients: scale the loss up, unscale before step
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")

    # --- the data order, and how long
    easy = None
    sampler = make_sampler(len(train_tokens), T, args.seed)
    if args.max_steps is None:
        args.max_steps = max(1, math.ceil((args.epochs or 4.0) * sampler.n_chunks / B))
    if args.curriculum:
        starts, score = document_difficulty(train_tokens, Path(args.data) / "02_tokenize" / "train_docs.jsonl",
                                            meta["vocab_size"])
        # a window is as hard as the document under its middle token
        n = sampler.n_chunks
        mids = np.arange(n) * T + T // 2
        chunk_score = score[np.clip(np.searchsorted(starts, mids, side="right") - 1, 0, len(score) - 1)]
        n_easy = min(n, int(args.curriculum * args.max_steps * B))
        easy = np.argsort(chunk_score, kind="stable")[:n_easy]
        sampler = make_sampler(len(train_tokens), T, args.seed, easy)
    # A long warmup: with beta2 = 0.99 Adam's second-moment estimate needs a few hundred steps
    # to settle, and until it has, full-size steps go astray (see the README for measurements).
    args.warmup_steps = args.max_steps // 5 if args.warmup_steps is None else args.warmup_steps
    args.min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    args.decay_steps = args.max_steps if args.decay_steps is None else args.decay_steps
    schedule = dict(lr=args.lr, warmup_steps=args.warmup_steps, warmup_lr=args.warmup_lr,
                    decay_steps=args.decay_steps, min_lr=args.min_lr)

    # --- model and optimiser
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts them)
    model = model_lib.GPT(config).to(device)
    opt = make_optimizer(model, args.lr, args.weight_decay, (args.beta1, args.beta2), args.eps, device.type,
                         args.embed_lr_scale)
    step, best_val = 0, float("inf")
    if state is not None:
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state["model"].items()})
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, best_val = int(state["step"]), float(state["best_val_loss"])
        torch.set_rng_state(state["rng"]["torch"])
    raw_model = model  # checkpoints come from here: no "_orig_mod." or "module." prefixes
    if args.compile:
        model = torch.compile(model)
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    # --- MFU = achieved FLOP/s / the machine's own matmul FLOP/s, both in the training dtype
    fpt = model_lib.flops_per_token(config, T)
    if dist.is_initialized():
        dist.barrier()  # ranks sharing a machine measure at the same time, like they train
    peak = args.peak_flops or measure_matmul_flops(device, ptdtype)
    peak_total = float(all_sum(torch.tensor(peak, dtype=torch.float64, device=device)))

    # --- outputs: a fresh run works in 04_train.partial/, swapped into place when it ends,
    # so a good earlier run in 04_train/ survives a crash or Ctrl-C of this one
    if master and state is None:
        shutil.rmtree(work, ignore_errors=True)
    if master:
        work.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()  # the other ranks wait until rank 0 has prepared the folder
    metrics_path = work / "metrics.jsonl"
    metrics = []
    if master and metrics_path.exists():  # drop what an interrupted run logged past its checkpoint
        metrics = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
        metrics = [m for m in metrics if m["step"] < step or (m["step"] == step and m["kind"] == "train")]
        metrics_path.write_text("".join(json.dumps(m) + "\n" for m in metrics))
    log_file = open(metrics_path, "a") if master else None
    run_args = {k: getattr(args, k) for k in RUN_FLAGS}
    if master and args.wandb:
        wandb.init(project="llm-from-scratch", config={**run_args, **dataclasses.asdict(config)})

    def log(rec):
        if master:
            metrics.append(rec)
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
            if args.wandb:
                wandb.log(rec, step=rec["step"])

    def save_last(step):
        # rank 0 writes; every rank's RNG was seeded from (seed, step, rank), so rank 0's
        # generator state is all a resume needs (it is kept for code that draws outside it)
        if master:
            common.save_checkpoint({
                "model": raw_model.state_dict(), "config": dataclasses.asdict(config),
                "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "step": step,
                "data": {"windows_seen": step * B, "epoch": step * B / sampler.n_chunks},
                "schedule": schedule, "best_val_loss": best_val, "args": run_args,
                "rng": {"torch": torch.get_rng_state()}}, work / "last.pt")
        if dist.is_initialized():
            dist.barrier()

    # --- Ctrl-C / SIGTERM (a scheduler's preemption): finish the step, save, exit cleanly.
    # A second Ctrl-C falls back to the default handler and interrupts at once.
    stop = {"asked": False}

    def on_signal(signum, frame):
        stop["asked"] = True
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    if master:
        print(f"model {model_lib.num_params(raw_model):,} params | {world} process(es) x micro-batch {micro} "
              f"x {accum} accumulation = {B} sequences x {T} tokens per step | {args.max_steps} steps "
              f"({args.max_steps * B / sampler.n_chunks:.2f} epochs) | {dtype} on {device}")
    bar = tqdm(total=args.max_steps, initial=step, disable=not master, dynamic_ncols=True, desc="train")
    step_times = []  # seconds per optimizer step, evaluation excluded
    loss_val = float("nan")
    while True:
        # --- evaluate every eval_interval steps and at the end; keep the best model
        if step % args.eval_interval == 0 or step == args.max_steps:
            val = evaluate(raw_model, val_tokens, T, micro, device, autocast, rank, world, args.eval_windows)
            log({"kind": "eval", "step": step, "val_loss": val})
            if val < best_val:
                best_val = val
                if master:
                    common.save_checkpoint({"model": raw_model.state_dict(), "config": dataclasses.asdict(config),
                                               "step": step, "val_loss": val, "args": run_args}, work / "ckpt.pt")
        if step >= args.max_steps:
            break

        # --- one optimizer step: accum micro-batches per rank, world ranks, B sequences total
        t0 = time.perf_counter()
        lr = lr_at(step, **schedule)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        # dropout draws from a generator seeded by (seed, step, rank): exact on resume
        torch.manual_seed(args.seed * 1_000_003 + step * 1_009 + rank)
        loss_sum = torch.zeros((), device=device)
        for micro_step in range(accum):
            # sequence j of this micro-batch is number (step*B + (micro_step*world + rank)*micro + j)
            # of the stream: ranks x micro-steps tile the global batch the same way for any world size
            first = step * B + (micro_step * world + rank) * micro
            x, y = get_batch(train_tokens, [sampler(q) for q in range(first, first + micro)], T, device)
            # DDP all-reduces gradients during backward; doing it on every micro-step would send
            # the same-sized message accum times. no_sync() lets them accumulate locally instead.
            sync = micro_step == accum - 1 or world == 1
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
                _, loss, _ = model(x, y)
            scaler.scale(loss / accum).backward()
            loss_sum += loss.detach() / accum
        # one small all-reduce per step carries the loss and the stop request of every rank
        flags = all_sum(torch.stack([loss_sum.float(), torch.tensor(float(stop["asked"]), device=device)]))
        loss_val, stopping = float(flags[0]) / world, bool(flags[1])
        if not math.isfinite(loss_val):
            bar.close()
            if master:
                print(f"04_train.py: loss became {loss_val} at step {step} (lr {lr:.3g}); stopped before "
                      f"the update. The last good checkpoints are in {work} (ckpt.pt, last.pt). "
                      "Lower --lr, keep --clip on, or use --dtype fp32.", file=sys.stderr)
            sys.exit(1)
        scaler.unscale_(opt)  # clip the true gradients, not the fp16-scaled ones
        gnorm = clip_gradients(raw_model.parameters(), args.clip_mode, args.clip)
        scaler.step(opt)  # skips the update if fp16 gradients overflowed
        scaler.update()
        opt.zero_grad(set_to_none=True)
        step += 1

        # --- monitoring
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - t0)
        # tokens/s over the last 10 steps; MFU = achieved FLOP/s over the measured matmul FLOP/s
        tok_s = len(step_times[-10:]) * B * T / sum(step_times[-10:])
        mfu = tok_s * fpt / peak_total
        log({"kind": "train", "step": step, "loss": loss_val, "lr": lr, "grad_norm": gnorm,
             "tokens": step * B * T, "tok_per_s": tok_s, "mfu": mfu})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.0%}")
        if step % (args.save_interval or args.eval_interval) == 0:
            save_last(step)
        if stopping or step == args.stop_at:
            save_last(step)
            bar.close()
            if master:
                print(f"stopped at step {step}/{args.max_steps}; training state saved to {work / 'last.pt'}. "
                      f"Continue with: python 04_train.py --data {args.data} --resume")
            end_distributed()
            return
    bar.close()
    save_last(step)

    # --- the final figure: the best model on the whole validation split, in bits per byte
    best = model_lib.load_model(work / "ckpt.pt", device)[0]
    val_full = evaluate(best, val_tokens, T, micro, device, autocast, rank, world)
    # mean nats per token -> bits per byte: the split's tokens include one <|endoftext|> per
    # document (scored like any token, but 0 bytes of text), so divide total bits by text bytes
    bpb = val_full / math.log(2) * meta["val_tokens"] / meta["val_bytes"]
    done = [m for m in metrics if m["kind"] == "train"]
    summary = {"steps": step, "epochs": step * B / sampler.n_chunks, "tokens": step * B * T,
               "params": model_lib.num_params(raw_model), "world_size": world, "dtype": dtype,
               "device": str(device), "final_train_loss": loss_val, "best_val_loss_estimate": best_val,
               "val_loss": val_full, "val_bpb": bpb, "train_time_s": sum(step_times),
               "tok_per_s": float(np.median([m["tok_per_s"] for m in done[-50:]])) if done else None,
               "mfu": float(np.median([m["mfu"] for m in done[-50:]])) if done else None,
               "peak_flops": peak_total, "flops_per_token": fpt}
    if master:
        log_file.close()
        save_plots(metrics, work)
        (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        common.replace_dir(work, out)   # the previous run is removed only after the swap
        print(f"\n{'steps':<26}{step}\n{'epochs':<26}{summary['epochs']:.2f}\n"
              f"{'final train loss':<26}{loss_val:.4f}\n{'val loss (whole split)':<26}{val_full:.4f}\n"
              f"{'val bits per byte':<26}{bpb:.4f}\n{'tokens/s (median)':<26}{summary['tok_per_s'] or 0:,.0f}\n"
              f"{'MFU (vs measured matmul)':<26}{summary['mfu'] or 0:.1%}\n"
              f"wrote {out}/ckpt.pt, last.pt, metrics.jsonl, summary.json, loss.png, lr.png")
        if args.wandb:
            wandb.finish()
    end_distributed()


if __name__ == "__main__":
    main()
