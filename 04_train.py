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
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common
from common import UserError

tok_lib = importlib.import_module("02_tokenize")
model_lib = importlib.import_module("03_model")

# The default run's length, when neither --epochs nor --max-steps is given (the flags default to
# None so that --resume can tell an asked-for length from its checkpoint's).
EPOCHS = 3.0

# Settings nobody tunes from the command line (the runs that chose them: docs/experiments.md).
WARMUP_LR = 1e-6       # the learning rate at step 0; warmup ramps from here to --lr
EMBED_LR_SCALE = 8.0   # the embedding tables (token embedding = output head, value embeddings) learn at 8 x lr
WEIGHT_DECAY = 0.1     # AdamW's decay, on matrices only (see make_optimizer)
BETAS = (0.9, 0.99)    # Adam's decay rates of the gradient's mean and of its square
EPS = 1e-8             # Adam's guard against dividing by zero


# ----------------------------------------------------------------------------- data

def load_tokens(data_dir, block_size, vocab_size):
    """Open the token memmaps of 02_tokenize and check they fit the model. Returns (meta, train, val)."""
    tok = Path(data_dir) / "02_tokenize"
    try:
        meta = json.loads((tok / "meta.json").read_text())
        dtype, n_vocab = np.dtype(meta["dtype"]), int(meta["vocab_size"])
    except FileNotFoundError:
        raise UserError(f"{tok / 'meta.json'}: not found; run 02_tokenize.py first") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{tok / 'meta.json'}: unreadable ({type(e).__name__}: {e})") from None
    if vocab_size is not None and n_vocab > vocab_size:
        raise UserError(f"{tok / 'meta.json'}: vocabulary of {n_vocab} tokens is larger than the model's "
                        f"vocab_size {vocab_size}; rerun 03_model.py so it picks up the tokenizer")
    return (meta, *(open_tokens(tok / f"{split}.bin", dtype, n_vocab, block_size) for split in ("train", "val")))


def open_tokens(path, dtype, n_vocab, block_size):
    """One split's tokens as a memmap (02's reader), checked: enough of them, every id in the vocabulary."""
    arr = tok_lib.open_tokens(path, dtype)
    if len(arr) < block_size + 1:
        raise UserError(f"{path}: {len(arr)} tokens, fewer than the context of {block_size} + 1; "
                        "use more data or a model with a smaller block_size")
    # one pass over the file now, rather than an index error in the embedding at some step later
    top = int(arr.max())
    if top >= n_vocab:
        raise UserError(f"{path}: token id {top} is outside the vocabulary of {n_vocab} tokens "
                        f"(its meta.json); rerun 02_tokenize.py")
    return arr


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
        raise UserError(f"{docs_path}: not found; --curriculum needs 02_tokenize's document index") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{docs_path}: unreadable ({type(e).__name__}: {e})") from None
    if len(rows) == 0 or starts.min() < 0 or lengths.min() < 0 or (starts + lengths).max() > len(tokens):
        raise UserError(f"{docs_path}: its documents do not fit the {len(tokens)} tokens of train.bin; "
                        "rerun 02_tokenize.py")
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
    device = torch.device(common.pick_device(device_flag))   # auto: CUDA, else MPS, else CPU
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.type == "mps":
        # NCCL is CUDA's, and gloo sums CPU tensors only: there is no DDP backend for MPS
        raise UserError("--device mps: DDP under torchrun is not supported on Apple MPS; "
                        "run one process (python 04_train.py), or use --device cpu")
    if device.type == "cuda":
        # one GPU per process; NCCL moves gradients GPU to GPU (NVLink/InfiniBand)
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return rank, world, torch.device("cuda", local_rank)
    dist.init_process_group("gloo")  # CPU: gloo over TCP/shared memory
    return rank, world, torch.device("cpu")


@contextlib.contextmanager
def process_group(device_flag):
    """setup_distributed() for the block, and end_distributed() after it. A rank whose block
    raises (a user's mistake, Ctrl-C twice) leaves the group at once instead: the other ranks
    may never reach a barrier. It exits (status 2 and one line, for a user's mistake), and
    torchrun then stops the others."""
    rank, world, device = setup_distributed(device_flag)
    try:
        yield rank, world, device
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    end_distributed()


def end_distributed():
    """Leave the process group together: a rank that tears its gloo connections down while rank
    0 is still writing the outputs can abort ("terminate called without an active exception"),
    and torchrun then reports the whole run as failed."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def sum_device(device):
    """Where float64 sums over ranks live: the GPU under NCCL; else the CPU, where gloo sums
    (and MPS has no float64 at all)."""
    return device if device.type == "cuda" else torch.device("cpu")


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
    loss in the same time (see docs/experiments.md); small GPT speedruns make the same
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
    sync = lambda: common.synchronize(device)   # a GPU computes asynchronously
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
    home = sum_device(device)
    total = torch.zeros(2, dtype=torch.float64, device=home)   # (sum of losses, tokens)
    model.eval()
    for i in range(0, len(mine), batch):
        x, y = get_batch(tokens, mine[i:i + batch] * T, T, device)
        with autocast:
            _, loss, _ = model(x, y)
        total[0] += loss.to(home).double() * x.numel()
        total[1] += x.numel()
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


# ----------------------------------------------------------------------------- setting up a run

# Settings that define the run's maths, and which step's model becomes ckpt.pt (the evaluation
# schedule): --resume restores them from the checkpoint, so a resumed run is the same run and
# writes the same files. Everything else (device, threads) may change between runs.
# decay_steps is no flag: it is the first run's length, so a run continued for more steps goes
# on at min_lr instead of starting a new cosine.
RUN_FLAGS = ("batch_size", "lr", "min_lr", "warmup_steps", "decay_steps", "clip", "clip_mode",
             "dtype", "seed", "curriculum", "max_steps",
             "eval_interval", "eval_windows")


def parse_args(argv=None):
    p = common.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                              description="Train the GPT of 03_model.py on the tokens of 02_tokenize.py "
                              "(one process, or DDP under torchrun).")
    a = p.add_argument
    hidden = argparse.SUPPRESS   # flags for tests, benches and the pipeline, not for lessons
    a("--data", default="data", help="data folder: reads 02_tokenize/ and 03_model/, writes 04_train/")
    a("--device", type=common.device_flag, default="auto", help=common.DEVICE_HELP)
    a("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
      help="autocast dtype; auto = bf16 on a CUDA GPU that has it, else fp16 there; fp32 on CPU and MPS")
    a("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    a("--threads", type=common.natural_int, default=0, help="torch threads per process (0: PyTorch's default)")
    # how long
    a("--epochs", type=common.positive_float, default=None, help=f"passes over the training windows (default {EPOCHS:g})")
    a("--max-steps", type=common.positive_int, default=None, help="optimizer steps; overrides --epochs")
    # batch
    a("--batch-size", type=common.positive_int, default=8, help="sequences per optimizer step, all ranks together")
    a("--micro-batch", type=common.positive_int, default=None,
      help="sequences per forward pass per rank (default: batch-size / world size, no accumulation)")
    # optimiser and schedule
    a("--lr", type=common.positive_float, default=2.5e-3, help="peak learning rate")
    a("--warmup-steps", type=common.natural_int, default=None, help="linear warmup length (default: a tenth of the steps)")
    a("--min-lr", type=common.natural_float, default=None, help=argparse.SUPPRESS)   # the cosine's floor; default lr / 100
    a("--clip", type=common.positive_float, default=1.0, help="gradient clipping threshold (norm or value)")
    a("--clip-mode", default="norm", choices=["norm", "value", "none"])
    a("--curriculum", type=common.fraction, default=0.0,
      help="fraction of the steps that see the easiest windows first (short, common-token documents)")
    a("--seed", type=int, default=1337)
    a("--resume", action="store_true", help="continue from last.pt (an interrupted or a finished run)")
    # hidden: a 03_model preset instead of 03_model/config.json (bench/gpu_check.sh); how often
    # and on how many windows to estimate the validation loss, last.pt being saved at each
    # estimate; stop as if interrupted after a step; MFU's denominator, instead of measuring it
    a("--preset", default=None, choices=sorted(model_lib.PRESETS), help=hidden)
    a("--eval-interval", type=common.positive_int, default=100, help=hidden)
    a("--eval-windows", type=common.positive_int, default=64, help=hidden)
    a("--stop-at", type=common.positive_int, default=None, help=hidden)
    a("--peak-flops", type=common.positive_float, default=None, help=hidden)
    p.set_defaults(decay_steps=None)   # see RUN_FLAGS
    return p.parse_args(argv)


@dataclasses.dataclass
class Setup:
    """What a run fixes before its first step, every input checked and nothing written yet."""
    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    out: Path                   # data/04_train: the finished run
    work: Path                  # data/04_train.partial: the run in progress
    resume_from: Path | None    # the last.pt a --resume starts from
    config: object              # 03_model's GPTConfig
    meta: dict                  # 02_tokenize's meta.json
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    sampler: object             # make_sampler(): where the q-th training window starts
    T: int                      # tokens per sequence
    B: int                      # sequences per optimizer step, all ranks together
    micro: int                  # sequences per forward pass on one rank
    accum: int                  # forward passes per step on one rank: B = world x accum x micro
    dtype: str
    ptdtype: torch.dtype
    autocast: object
    scaler: torch.amp.GradScaler
    schedule: dict              # lr_at()'s keywords
    run_args: dict              # the RUN_FLAGS, saved with every checkpoint

    @property
    def master(self):
        return self.rank == 0


def set_up(args, rank, world, device):
    """Check every input and fix the run's settings, writing nothing. Returns (Setup, the
    checkpoint --resume starts from or None)."""
    out, work = Path(args.data) / "04_train", Path(args.data) / "04_train.partial"
    if rank == 0:
        check_writable(Path(args.data), work)
    config, state, src = starting_point(args, out, work)
    T = config.block_size
    from_preset = args.preset and not args.resume
    meta, train_tokens, val_tokens = load_tokens(args.data, T, None if from_preset else config.vocab_size)
    if from_preset:  # a preset fits itself to the tokenizer, like 03_model.py does
        config = dataclasses.replace(config, vocab_size=64 * math.ceil(meta["vocab_size"] / 64),
                                     vocab_used=meta["vocab_size"])

    # batch geometry: the global batch is fixed; accumulation makes up what ranks don't
    B = args.batch_size
    micro = args.micro_batch or max(1, B // world)
    if B % (micro * world):
        raise UserError(f"--batch-size {B} is not a multiple of --micro-batch {micro} x world size {world}")

    # precision: autocast runs matmuls in 16 bits, keeps weights and the optimiser in fp32
    dtype = args.dtype
    if dtype == "auto":
        # On CPU fp32 is the default: bf16 only pays with AMX/AVX-512-BF16 matrix units, and
        # without them bf16 matmuls are far slower (bench/bench_train.py measures it).
        dtype = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    ptdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    # MPS takes the CPU's recipe (fp32, eager) on the GPU's memory: the path a Mac can check
    if device.type == "mps" and (dtype != "fp32" or args.compile):
        raise UserError(f"--device mps trains in fp32 and without --compile (got --dtype {dtype}"
                        f"{' --compile' if args.compile else ''})")
    autocast = torch.autocast(device.type, dtype=ptdtype) if dtype != "fp32" else contextlib.nullcontext()
    # fp16's narrow exponent underflows small gradients: scale the loss up, unscale before step
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")

    sampler = data_order(args, train_tokens, meta, T, B)
    # Warm up for a tenth of the run: with beta2 = 0.99 Adam's second-moment estimate averages
    # over ~100 steps, and until it has settled, full-size steps go astray. Then decay to lr/100:
    # the last, small steps settle into the minimum (both screened: docs/experiments.md).
    args.warmup_steps = args.max_steps // 10 if args.warmup_steps is None else args.warmup_steps
    args.min_lr = args.lr / 100 if args.min_lr is None else args.min_lr
    args.decay_steps = args.max_steps if args.decay_steps is None else args.decay_steps
    schedule = dict(lr=args.lr, warmup_steps=args.warmup_steps, warmup_lr=WARMUP_LR,
                    decay_steps=args.decay_steps, min_lr=args.min_lr)
    s = Setup(args, rank, world, device, out, work, src, config, meta, train_tokens, val_tokens, sampler,
              T, B, micro, B // (micro * world), dtype, ptdtype, autocast, scaler, schedule,
              {k: getattr(args, k) for k in RUN_FLAGS})
    return s, state


def check_writable(*folders):
    """Fail at the start, not after the training, when the outputs cannot be written: make and
    remove a folder in each place the run will write (those that exist; the others are made)."""
    for folder in folders:
        if folder.is_dir():
            try:
                os.rmdir(tempfile.mkdtemp(prefix=".04_train.probe", dir=folder))
            except OSError as e:
                raise UserError(f"{folder}: cannot write here ({e.strerror})") from None


def starting_point(args, out, work):
    """The state to start from: --resume's checkpoint, else a model config (data/03_model/ or
    --preset). Returns (config, checkpoint or None, the checkpoint's path or None)."""
    if args.resume:
        src = next((f / "last.pt" for f in (work, out) if (f / "last.pt").is_file()), None)
        if src is None:
            raise UserError(f"--resume: no last.pt in {work} or {out}")
        state = common.load_checkpoint(src)
        try:
            config = model_lib.GPTConfig(**state["config"])
            saved = {k: state["args"][k] for k in RUN_FLAGS}
            int(state["step"])
        except Exception as e:
            raise UserError(f"{src}: not a usable training checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
        explicit_length = args.max_steps is not None or args.epochs is not None
        for k in RUN_FLAGS:
            if not (k == "max_steps" and explicit_length):
                setattr(args, k, saved[k])
        return config, state, src
    if args.preset:
        return model_lib.PRESETS[args.preset], None, None
    cfg_path = Path(args.data) / "03_model" / "config.json"
    try:
        raw = json.loads(cfg_path.read_text())
        names = {f.name for f in dataclasses.fields(model_lib.GPTConfig)}
        return model_lib.GPTConfig(**{k: v for k, v in raw.items() if k in names}), None, None
    except FileNotFoundError:
        raise UserError(f"{cfg_path}: not found; run 03_model.py first or pass --preset") from None
    except (ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{cfg_path}: bad model config ({type(e).__name__}: {e})") from None


def data_order(args, train_tokens, meta, T, B):
    """The order of the training windows (the curriculum's easiest first, if asked), and the
    run's length: sets args.max_steps from --epochs (default EPOCHS) when it is not given."""
    sampler = make_sampler(len(train_tokens), T, args.seed)
    if args.max_steps is None:
        args.max_steps = max(1, math.ceil((args.epochs or EPOCHS) * sampler.n_chunks / B))
    if not args.curriculum:
        return sampler
    starts, score = document_difficulty(train_tokens, Path(args.data) / "02_tokenize" / "train_docs.jsonl",
                                        meta["vocab_size"])
    # a window is as hard as the document under its middle token
    n = sampler.n_chunks
    mids = np.arange(n) * T + T // 2
    chunk_score = score[np.clip(np.searchsorted(starts, mids, side="right") - 1, 0, len(score) - 1)]
    n_easy = min(n, int(args.curriculum * args.max_steps * B))
    easy = np.argsort(chunk_score, kind="stable")[:n_easy]
    return make_sampler(len(train_tokens), T, args.seed, easy)


def build_model(s, state):
    """The model and its optimiser, new or as --resume's checkpoint left them; then compiled and
    wrapped for DDP. Returns (model to train, raw model to save, optimiser, step, best val loss)."""
    torch.manual_seed(s.args.seed)  # same initial weights on every rank (DDP also broadcasts them)
    raw_model = model_lib.GPT(s.config).to(s.device)
    opt = make_optimizer(raw_model, s.args.lr, WEIGHT_DECAY, BETAS, EPS, s.device.type, EMBED_LR_SCALE)
    step, best_val = 0, float("inf")
    if state is not None:
        try:
            raw_model.load_state_dict(common.strip_prefixes(state["model"]))
            opt.load_state_dict(state["optimizer"])
            s.scaler.load_state_dict(state["scaler"])
            step, best_val = int(state["step"]), float(state["best_val_loss"])
            torch.set_rng_state(state["rng"]["torch"])
        except Exception as e:   # e.g. weights of another shape than its config says
            raise UserError(f"{s.resume_from}: its training state does not fit its model config "
                            f"({type(e).__name__}: {' '.join(str(e).splitlines()[:2])[:250]})") from None
    model = torch.compile(raw_model) if s.args.compile else raw_model
    if s.world > 1:
        model = DDP(model, device_ids=[s.device.index] if s.device.type == "cuda" else None)
    return model, raw_model, opt, step, best_val


def matmul_peak(s):
    """MFU's denominator: every rank's measured matmul FLOP/s in the training dtype, summed."""
    if dist.is_initialized():
        dist.barrier()  # ranks sharing a machine measure at the same time, like they train
    peak = s.args.peak_flops or measure_matmul_flops(s.device, s.ptdtype)
    return float(all_sum(torch.tensor(peak, dtype=torch.float64, device=sum_device(s.device))))


class MetricsLog:
    """metrics.jsonl in the work folder: one JSON line per step and per evaluation. Rank 0
    writes it; on the other ranks write() does nothing."""

    def __init__(self, s, step):
        self.records, self.file = [], None
        if not s.master:
            return
        path = s.work / "metrics.jsonl"
        if path.exists():  # drop what an interrupted run logged past its checkpoint
            try:
                rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                self.records = [m for m in rows if m["step"] < step or (m["step"] == step and m["kind"] == "train")]
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
            path.write_text("".join(json.dumps(m) + "\n" for m in self.records))
        self.file = open(path, "a")

    def write(self, rec):
        if self.file:
            self.records.append(rec)
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


def prepare_outputs(s, step):
    """The work folder: a fresh run works in 04_train.partial/, swapped into place when it ends,
    so a good earlier run in 04_train/ survives a crash or Ctrl-C of this one. Returns its log."""
    if s.master:
        if s.resume_from is None:
            shutil.rmtree(s.work, ignore_errors=True)
        elif s.resume_from.parent == s.out:  # continuing a finished run: work on a copy of it
            shutil.rmtree(s.work, ignore_errors=True)
            shutil.copytree(s.out, s.work)
        s.work.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()  # the other ranks wait until rank 0 has prepared the folder
    return MetricsLog(s, step)


def stop_on_signal():
    """Ctrl-C / SIGTERM (a scheduler's preemption): the loop finishes the step, saves, exits
    cleanly. A second Ctrl-C falls back to the default handler and interrupts at once."""
    stop = {"asked": False}

    def on_signal(signum, frame):
        stop["asked"] = True
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return stop


# ----------------------------------------------------------------------------- one step, and the end

def accumulate_gradients(model, s, step, stop_asked):
    """The micro-batch loop of one optimizer step: this rank's `accum` micro-batches, forward
    and backward, their gradients summed in .grad (and averaged over ranks by DDP). Returns (the
    step's mean loss over all ranks, whether any rank was asked to stop)."""
    B, micro, accum, world, rank = s.B, s.micro, s.accum, s.world, s.rank
    # dropout draws from a generator seeded by (seed, step, rank): exact on resume
    torch.manual_seed(s.args.seed * 1_000_003 + step * 1_009 + rank)
    loss_sum = torch.zeros((), device=s.device)
    for micro_step in range(accum):
        # sequence j of this micro-batch is number (step*B + (micro_step*world + rank)*micro + j)
        # of the stream: ranks x micro-steps tile the global batch the same way for any world size
        first = step * B + (micro_step * world + rank) * micro
        x, y = get_batch(s.train_tokens, [s.sampler(q) for q in range(first, first + micro)], s.T, s.device)
        # DDP all-reduces gradients during backward; doing it on every micro-step would send
        # the same-sized message accum times. no_sync() lets them accumulate locally instead.
        sync = micro_step == accum - 1 or world == 1
        with (contextlib.nullcontext() if sync else model.no_sync()), s.autocast:
            _, loss, _ = model(x, y)
        s.scaler.scale(loss / accum).backward()
        loss_sum += loss.detach() / accum
    # one small all-reduce per step carries the loss and the stop request of every rank
    flags = all_sum(torch.stack([loss_sum.float(), torch.tensor(float(stop_asked), device=s.device)]))
    return float(flags[0]) / world, bool(flags[1])


def finish(s, raw_model, log, step, loss_val, best_val, step_times, peak, fpt):
    """The final figure (the best model on the whole validation split, in bits per byte), the
    summary and the plots; then 04_train.partial/ replaces 04_train/."""
    best = model_lib.load_model(s.work / "ckpt.pt", s.device)[0]
    val_full = evaluate(best, s.val_tokens, s.T, s.micro, s.device, s.autocast, s.rank, s.world)
    # mean nats per token -> bits per byte: the split's tokens include one <|endoftext|> per
    # document (scored like any token, but 0 bytes of text), so divide total bits by text bytes
    bpb = val_full / math.log(2) * s.meta["val_tokens"] / s.meta["val_bytes"]
    done = [m for m in log.records if m["kind"] == "train"]
    summary = {"steps": step, "epochs": step * s.B / s.sampler.n_chunks, "tokens": step * s.B * s.T,
               "params": model_lib.num_params(raw_model), "world_size": s.world, "dtype": s.dtype,
               "device": str(s.device), "final_train_loss": loss_val, "best_val_loss_estimate": best_val,
               "val_loss": val_full, "val_bpb": bpb, "train_time_s": sum(step_times),
               "tok_per_s": float(np.median([m["tok_per_s"] for m in done[-50:]])) if done else None,
               "mfu": float(np.median([m["mfu"] for m in done[-50:]])) if done else None,
               "peak_flops": peak, "flops_per_token": fpt}
    if not s.master:
        return
    log.close()
    save_plots(log.records, s.work)
    (s.work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    common.replace_dir(s.work, s.out)   # the previous run is removed only after the swap
    print(f"\n{'steps':<26}{step}\n{'epochs':<26}{summary['epochs']:.2f}\n"
          f"{'final train loss':<26}{loss_val:.4f}\n{'val loss (whole split)':<26}{val_full:.4f}\n"
          f"{'val bits per byte':<26}{bpb:.4f}\n{'tokens/s (median)':<26}{summary['tok_per_s'] or 0:,.0f}\n"
          f"{'MFU (vs measured matmul)':<26}{summary['mfu'] or 0:.1%}\n"
          f"wrote {s.out}/ckpt.pt, last.pt, metrics.jsonl, summary.json, loss.png, lr.png")


# ----------------------------------------------------------------------------- the training run

def train(args, rank, world, device):
    """Steps 5-6 in the order they happen: set up, then evaluate, step, log and save until the
    last step; then the final figure. Returns the exit status."""
    s, state = set_up(args, rank, world, device)   # every input checked, nothing written yet
    model, raw_model, opt, step, best_val = build_model(s, state)
    del state
    # MFU = achieved FLOP/s / the machine's own matmul FLOP/s, both in the training dtype
    fpt, peak = model_lib.flops_per_token(s.config, s.T), matmul_peak(s)
    log = prepare_outputs(s, step)
    stop = stop_on_signal()

    def save_last(step):
        # rank 0 writes; every rank's RNG was seeded from (seed, step, rank), so rank 0's
        # generator state is all a resume needs (it is kept for code that draws outside it)
        if s.master:
            common.save_checkpoint({
                "model": raw_model.state_dict(), "config": dataclasses.asdict(s.config),
                "optimizer": opt.state_dict(), "scaler": s.scaler.state_dict(), "step": step,
                "data": {"windows_seen": step * s.B, "epoch": step * s.B / s.sampler.n_chunks},
                "schedule": s.schedule, "best_val_loss": best_val, "args": s.run_args,
                "rng": {"torch": torch.get_rng_state()}}, s.work / "last.pt")
        if dist.is_initialized():
            dist.barrier()

    if s.master:
        print(f"model {model_lib.num_params(raw_model):,} params | {world} process(es) x micro-batch {s.micro} "
              f"x {s.accum} accumulation = {s.B} sequences x {s.T} tokens per step | {args.max_steps} steps "
              f"({args.max_steps * s.B / s.sampler.n_chunks:.2f} epochs) | {s.dtype} on {device}")
    bar = tqdm(total=args.max_steps, initial=step, disable=not s.master, dynamic_ncols=True, desc="train")
    step_times = []  # seconds per optimizer step, evaluation excluded
    loss_val = float("nan")
    while True:
        # --- evaluate every eval_interval steps and at the end; keep the best model
        if step % args.eval_interval == 0 or step == args.max_steps:
            val = evaluate(raw_model, s.val_tokens, s.T, s.micro, device, s.autocast, rank, world, args.eval_windows)
            log.write({"kind": "eval", "step": step, "val_loss": val})
            if val < best_val:
                best_val = val
                if s.master:
                    common.save_checkpoint({"model": raw_model.state_dict(), "config": dataclasses.asdict(s.config),
                                            "step": step, "val_loss": val, "args": s.run_args}, s.work / "ckpt.pt")
        if step >= args.max_steps:
            break

        # --- one optimizer step: accum micro-batches per rank, world ranks, B sequences total
        t0 = time.perf_counter()
        lr = lr_at(step, **s.schedule)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        loss_val, stopping = accumulate_gradients(model, s, step, stop["asked"])
        if not math.isfinite(loss_val):
            bar.close()
            if s.master:
                print(f"04_train.py: loss became {loss_val} at step {step} (lr {lr:.3g}); stopped before "
                      f"the update. The last good checkpoints are in {s.work} (ckpt.pt, last.pt). "
                      "Lower --lr, keep --clip on, or use --dtype fp32.", file=sys.stderr)
            return 1
        s.scaler.unscale_(opt)  # clip the true gradients, not the fp16-scaled ones
        gnorm = clip_gradients(raw_model.parameters(), args.clip_mode, args.clip)
        s.scaler.step(opt)  # skips the update if fp16 gradients overflowed
        s.scaler.update()
        opt.zero_grad(set_to_none=True)
        step += 1

        # --- monitoring
        common.synchronize(device)   # the step's kernels have finished, not just been queued
        step_times.append(time.perf_counter() - t0)
        # tokens/s over the last 10 steps; MFU = achieved FLOP/s over the measured matmul FLOP/s
        tok_s = len(step_times[-10:]) * s.B * s.T / sum(step_times[-10:])
        mfu = tok_s * fpt / peak
        log.write({"kind": "train", "step": step, "loss": loss_val, "lr": lr, "grad_norm": gnorm,
                   "tokens": step * s.B * s.T, "tok_per_s": tok_s, "mfu": mfu})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.0%}")
        if step % args.eval_interval == 0:
            save_last(step)
        if stopping or step == args.stop_at:
            save_last(step)
            bar.close()
            if s.master:
                print(f"stopped at step {step}/{args.max_steps}; training state saved to {s.work / 'last.pt'}. "
                      f"Continue with: python 04_train.py --data {args.data} --resume")
            return 0
    bar.close()
    save_last(step)
    finish(s, raw_model, log, step, loss_val, best_val, step_times, peak, fpt)
    return 0


def run(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with process_group(args.device) as (rank, world, device):
        return train(args, rank, world, device)


def main(argv=None):
    common.main(__file__, run, argv)


if __name__ == "__main__":
    main()
