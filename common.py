"""What every stage needs in the same form, kept in one place so each idea has one form.

The numbered scripts are the lessons; these few helpers belong to none of them, but every stage
uses them alike:
  * UserError, ArgumentParser and main(): a user's mistake (a bad flag, a missing or malformed
    file, a folder that cannot be written) ends in one line on stderr that names the file or
    the flag, and exit status 2; never a traceback. A stage raises; only main() reports.
  * output_dir(): a stage writes into a temporary folder beside its output and swaps it into
    place when complete. A crash or an error leaves the previous output as it was, and creating
    the folder first thing checks, before any work, that the output can be written.
  * save_checkpoint() and load_checkpoint(): an atomic torch.save, and torch.load with
    weights_only=True whose failures are the user's (a wrong or damaged file).
  * wilson(): the 95% interval of a rate.
  * device_flag, pick_device() and synchronize(): every stage's --device, and timing on it.
  * cpu_count() and parallel_map(): the data stages' work spread over processes, in order.
It imports no stage, so any stage may import it, and imports torch only inside the functions
that need it, so that serve.py (which must run without PyTorch) can import it too.
"""
import argparse
import atexit
import collections
import contextlib
import functools
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path


class UserError(ValueError):
    """A mistake in the user's flags or files: reported by main() in one line, exit status 2.
    A ValueError, since that is what it is: a value (a flag, a file's contents) that is wrong."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors: one line naming the flag, not usage plus error."""

    def error(self, message):
        raise UserError(message)


def main(script, run, argv=None):
    """Call run(argv); exit with its status when it returns one (1: a gate failed). A UserError,
    or an OSError on the user's files (not found, not readable, not writable, disk full),
    becomes one line on stderr and exit status 2."""
    try:
        status = run(argv)
    except UserError as e:
        message = str(e)
    except OSError as e:
        message = f"{e.filename}: {e.strerror}" if e.filename else str(e)
    else:
        if status:
            sys.exit(status)
        return
    print(f"{Path(script).name}: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def number(kind, test, what):
    """An argparse type: `kind(text)`, which must pass `test`; else an error saying `what` was expected."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    parse.__name__ = what   # argparse names the type in its messages
    return parse


# argparse types: a flag's range is checked where the flag is declared
def int_at_least(low):
    return number(int, lambda v: v >= low, f"an integer >= {low}")


positive_int = number(int, lambda v: v >= 1, "a positive integer")
natural_int = int_at_least(0)
positive_float = number(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
natural_float = number(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")
fraction = number(float, lambda v: 0 <= v <= 1, "a fraction in [0, 1]")


def device_flag(text):
    """The argparse type of every stage's --device: auto, cpu, cuda, cuda:N or mps. Only the
    spelling is checked here; whether that device is present is pick_device()'s question."""
    if text in ("auto", "cpu", "cuda", "mps") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")


# the same --device help in every stage (argparse fills in %(default)s)
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps (default %(default)s: CUDA, else Apple MPS, else the CPU)"


def pick_device(name="auto"):
    """The device a stage runs on, as torch.device spells it. auto: CUDA, else MPS (the GPU of
    an Apple-silicon Mac), else the CPU. A device named but absent is the user's mistake."""
    import torch
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():   # cuda, or cuda:N
        raise UserError(f"--device {name}: no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: no Apple MPS device is available")
    return name


def synchronize(device):
    """Wait until `device` has finished the work queued on it. CUDA and MPS run asynchronously:
    a clock read without this times the queueing, not the work. Nothing to wait for on a CPU."""
    import torch
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mps":
        torch.mps.synchronize()


def cpu_count():
    """The cores this process may use (a container or `taskset` may allow fewer than exist)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.lru_cache(maxsize=None)
def process_pool(workers):
    """One pool of `workers` processes per process, started on first use and then reused:
    starting one costs about a second. "spawn" starts them the same way on Linux, macOS and
    Windows (each imports the script afresh), and they end when this process does. They ignore
    Ctrl-C, which reaches them too: the main process alone decides what stops."""
    import multiprocessing
    import signal
    pool = multiprocessing.get_context("spawn").Pool(workers, signal.signal, (signal.SIGINT, signal.SIG_IGN))
    atexit.register(pool.terminate)   # while the interpreter still has what that needs
    return pool


def parallel_map(fn, items, workers):
    """fn(item) for each item, in order, on `workers` processes; workers=1 runs in this process.
    At most two items per worker are in flight, so a stream of items of any length needs
    bounded memory (Pool.imap would read the whole stream ahead). An exception in a worker is
    raised here."""
    if workers == 1:
        yield from map(fn, items)
        return
    pool, pending = process_pool(workers), collections.deque()
    try:
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    except BaseException:   # an error, Ctrl-C, or a caller that stopped early
        # Let the few tasks in flight finish first: terminating a Pool while it is still sending
        # a large task to a worker can hang forever (it did, one run in six).
        for result in pending:
            result.wait()
        raise


def replace_dir(tmp, out):
    """Swap the finished folder `tmp` into place as `out`. The previous `out` is removed only
    after the swap, so a crash at any point leaves one complete folder, never half of one."""
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def output_dir(out):
    """with output_dir(data / "05_eval") as tmp: write into tmp. When the block ends, tmp
    replaces the output; when it raises, tmp is deleted and the previous output stays."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    except OSError as e:
        raise UserError(f"{out.parent}: cannot write {out.name}/ there ({e.strerror})") from None
    try:
        os.chmod(tmp, 0o755)   # mkdtemp makes it private; an output is an ordinary folder
        yield tmp
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def strip_prefixes(state_dict):
    """The state dict without the prefixes torch.compile ("_orig_mod.") and DDP ("module.") add."""
    out = {}
    for k, v in state_dict.items():
        while k.startswith(("_orig_mod.", "module.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def save_checkpoint(obj, path):
    """torch.save to a temporary name, then rename: a crash never leaves a half-written file.
    The model's state dict is stored without wrapper prefixes, so any stage loads it into a
    plain model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = {**obj, "model": strip_prefixes(obj["model"])}
    import torch
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path, device="cpu"):
    """torch.load(weights_only=True): tensors and plain containers only, never code."""
    import torch
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except Exception as e:   # a damaged file, or not a checkpoint at all
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None


def wilson(k, n, z=1.96):
    """Wilson score interval for k successes in n trials (Wilson 1927): unlike p +- z*se it stays
    inside [0, 1] and keeps its coverage for small n and at 0/n or n/n. (None, None) when n = 0."""
    if n == 0:
        return None, None
    p, d = k / n, 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))
