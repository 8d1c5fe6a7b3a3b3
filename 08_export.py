"""
Step 10 of the framework: production deployment. FP16 and ONNX export, each file checked
against PyTorch.

In:  a checkpoint (default data/04_train/ckpt.pt; any base or fine-tuned one via --ckpt)
     data/02_tokenize/val.bin + meta.json when present, for parity on real text
     data/07_safety/guard.pt when present, the guard that serve.py runs
Out: data/08_export/model_fp16.pt       the same checkpoint in half precision (load_model reads it)
     data/08_export/model.onnx          input_ids (batch, sequence) -> logits
     data/08_export/model_kv.onnx       + past_key_values.N.key/value in, present.N.key/value out
     data/08_export/model{,_kv}_fp16.onnx, model{,_kv}_int8.onnx   the two graphs, smaller
     data/08_export/config.json         the model's config, for a server that runs the graphs
                                        without PyTorch (block_size and vocab_used are not in them)
     data/08_export/guard.onnx, guard.json   07's guard (from data/07_safety/guard.pt, when 07
                                        has run) and its threshold, for the server too
     data/08_export/report.json, report.md, latency.png

The ideas, in the order the code uses them:
  1. Half precision halves the file: every weight is rounded to 16 bits (11 of mantissa).
  2. ONNX is a portable graph of operators that runtimes (ONNX Runtime, TensorRT, browsers,
     phones) execute without Python. torch.onnx.export(dynamo=True) captures the model with
     torch.export (symbolic shapes, so batch and sequence stay dynamic) and translates each
     aten op to ONNX with onnxscript. The TorchScript exporter is deprecated; not needed here.
  3. A KV-cache graph takes the keys/values of earlier tokens as inputs and returns them
     extended by the new ones, in the names and (batch, n_head, seq, head_dim) layout of
     Hugging Face Optimum and ONNX Runtime GenAI. With an empty past it is also the prefill.
  4. Smaller graphs: fp16 (casting weights and activations, keeping a few precision-critical
     ops in fp32) and int8 (int8 weights in blocks of 16, fp32 activations),
     both by ONNX Runtime's own tools.
  5. Trust nothing unchecked: logits of every graph against PyTorch on random and real tokens,
     the KV graph fed one token at a time against the full graph, and a greedy generation run
     entirely in ONNX Runtime that must produce exactly PyTorch's tokens.
  6. Latency: prefill and per-token decode at batch 1, PyTorch eager vs ONNX Runtime.

Deliberately left out: an attention_mask input (rows are never padded here), the GenAI
config file, fused attention kernels (GroupQueryAttention), static int8 quantisation and
graphs over 2 GB (they would need ONNX external data).
"""
import contextlib
import copy
import dataclasses
import importlib
import io
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import common
import safeguards
from common import UserError

tok_lib = importlib.import_module("02_tokenize")
model_lib = importlib.import_module("03_model")

# Parity criteria. fp32 must equal PyTorch up to summation order; the lossy graphs are judged by
# the largest logit error relative to the largest |logit| (fp16 keeps ~3 significant digits,
# int8 ~2) and by what matters downstream: the same most likely next token on real text. On
# random ids the model's next-token distribution is nearly flat, so a top-1 flip there is a
# near-tie of no consequence: it is reported, not required (unless there is no real text).
TOL_FP32 = 1e-4
TOL_GUARD = 1e-5   # P(harmful): one sum of float32 weights, in another order
REL_TOL = {"fp16": 0.01, "int8": 0.05}
MIN_TOP1 = 0.99


# ----------------------------------------------------------------------------- 1. fp16 checkpoint

def save_fp16_checkpoint(model, ckpt, path):
    """Write {"model": fp16 state dict, "config"} and return (fp16 bytes, fp32 bytes).

    model.half() rather than casting each state-dict entry: the tied embedding/head matrix
    must stay ONE tensor, or torch.save would store it twice. The fp32 size is that of the same
    dict serialised in fp32, so the ratio compares like with like (the input checkpoint may
    also carry optimizer state).
    """
    half = copy.deepcopy(model).half()
    out = {"model": half.state_dict(), "config": ckpt["config"], "dtype": "float16"}
    common.save_checkpoint(out, path)   # atomic: temporary name, then rename
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "config": ckpt["config"], "dtype": "float32"}, buf)
    return path.stat().st_size, buf.tell()


# ----------------------------------------------------------------------------- 2-3. ONNX export

def cache_names(n_layer):
    """Input and output names of the KV graph, as Optimum and ONNX Runtime GenAI spell them."""
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    return past, present


class LogitsOnly(torch.nn.Module):
    """The full graph: ids in, logits out (the loss and the cache stay behind)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids)[0]


class WithCache(torch.nn.Module):
    """The KV graph: ONNX has no lists of pairs, so the cache travels as 2 * n_layer flat tensors."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, *past):
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, _, present = self.model(input_ids, past_kv=pairs)
        return (logits, *[t for kv in present for t in kv])


def export_onnx(model, path, with_cache):
    """The full or the KV graph of the model, exported to `path`."""
    cfg = model.config
    head_dim = cfg.n_embd // cfg.n_head
    # Symbolic sizes: the graph will accept any batch and any length up to the context window.
    # The example sizes are all different and > 1, because torch.export specialises a size it
    # sees as 0 or 1 and would merge two dims that happen to be equal in the example.
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("sequence", min=1, max=cfg.block_size)
    ids = torch.randint(0, cfg.vocab_size, (2, 3))
    if with_cache:
        past_names, present_names = cache_names(cfg.n_layer)
        past_len = torch.export.Dim("past_sequence", min=0, max=cfg.block_size)  # 0 = prefill
        past = [torch.randn(2, cfg.n_head, 4, head_dim) for _ in past_names]
        args, wrapper = (ids, *past), WithCache(model)
        names, outputs = ["input_ids", *past_names], ["logits", *present_names]
        dynamic = {"input_ids": {0: batch, 1: seq}, "past": tuple({0: batch, 2: past_len} for _ in past)}
    else:
        args, wrapper = (ids,), LogitsOnly(model)
        names, outputs = ["input_ids"], ["logits"]
        dynamic = {"input_ids": {0: batch, 1: seq}}
    return to_onnx(wrapper.eval(), args, path, names, outputs, dynamic)


def to_onnx(module, args, path, names, outputs, dynamic):
    """torch.onnx.export(dynamo=True) of module(*args), quietly; then onnx.checker."""
    import onnx
    # the exporter narrates every phase and warns about optional packages; keep the bar clean
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(module, args, str(path), dynamo=True, input_names=names,
                          output_names=outputs, dynamic_shapes=dynamic, external_data=False,
                          verbose=False)
    # The exporter records on every node the Python stack trace that made it: handy when
    # debugging an export, dead weight for a server (a fifth of a small model's file).
    m = onnx.load(str(path))
    for node in m.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(m, str(path))
    onnx.checker.check_model(str(path), full_check=True)   # full_check: shapes and types infer
    return path


class Guard(torch.nn.Module):
    """07's n-gram guard as a graph: the buckets of one text's words and word pairs
    (safeguards.ngram_buckets) in, P(harmful) out. A server hashes the text, ONNX Runtime sums."""

    def __init__(self, weights, bias):
        super().__init__()
        self.register_buffer("weights", weights)
        self.register_buffer("bias", bias)

    def forward(self, ngram_ids):
        return torch.sigmoid(self.weights[ngram_ids].sum(0, keepdim=True) + self.bias)


def export_guard(guard, path, threads):
    """guard.onnx from 07's guard.pt, and the largest difference between its P(harmful) and the
    one 07's guard gave, in PyTorch, on the texts 07 saved with it (a text with no n-gram too)."""
    if guard["weights"].shape != (safeguards.NGRAM_BUCKETS,):
        raise UserError(f"07_safety/guard.pt: {guard['weights'].shape[0]} weights, not the "
                        f"{safeguards.NGRAM_BUCKETS} n-gram buckets of safeguards.py; run 07_safety.py again")
    n = torch.export.Dim("ngrams", min=0)   # any number of n-grams, none included
    to_onnx(Guard(guard["weights"], guard["bias"]).eval(), (torch.tensor([3, 5, 7]),), path,
            ["ngram_ids"], ["p_harmful"], {"ngram_ids": {0: n}})
    sess = ort_session(path, threads, ["CPUExecutionProvider"])
    got = [sess.run(None, {"ngram_ids": np.array(safeguards.ngram_buckets(t), np.int64)})[0][0]
           for t in guard["check_texts"]]
    return float(np.abs(np.array(got) - guard["check_p"].numpy()).max())


# ----------------------------------------------------------------------------- 4. fp16 and int8 graphs

def rmsnorm_statistics(graph):
    """Names of the nodes of each RMSNorm's mean of squares: Pow, ReduceMean, Add eps, Sqrt, Reciprocal.

    These stay fp32 in the fp16 graph: x**2 overflows fp16's largest value, 65504, as soon as
    |x| > 256, and large trained models do carry a few residual channels that big (GPT-2 has
    some near 3000). One overflow gives inf, 1/sqrt(inf) = 0, and the whole vector is wiped.
    (The rotary angles were tried in fp32 as well: no gain measured, so they are left alone.)
    """
    consumers = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    keep = []
    for n in (n for n in graph.node if n.op_type == "Pow"):
        while n is not None and n.op_type in ("Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal"):
            keep.append(n.name)
            nxt = consumers.get(n.output[0], []) if n.op_type != "Reciprocal" else []
            n = nxt[0] if len(nxt) == 1 else None
    return keep


def join_fp32_regions(graph, fp32_nodes):
    """Make neighbouring fp32 nodes one fp32 region. The converter wraps each node it keeps in
    fp32 in its own casts, fp32 -> fp16 after it and fp16 -> fp32 before the next, so x**2
    would be rounded to fp16 (and overflow) between Pow and ReduceMean after all. Where a Cast
    to fp32 reads a Cast to fp16 of an fp32 node's output, its readers read that output."""
    import onnx
    to = lambda n: next(a.i for a in n.attribute if a.name == "to")
    producer = {o: n for n in graph.node for o in n.output}
    renamed = {}
    for n in graph.node:
        src = producer.get(n.input[0]) if n.op_type == "Cast" and to(n) == onnx.TensorProto.FLOAT else None
        if src is not None and src.op_type == "Cast" and to(src) == onnx.TensorProto.FLOAT16 \
                and getattr(producer.get(src.input[0]), "name", None) in fp32_nodes:
            renamed[n.output[0]] = src.input[0]
    for n in graph.node:
        for i, name in enumerate(n.input):
            n.input[i] = renamed.get(name, name)


def convert_fp16(src, dst):
    """An fp16 copy of an fp32 graph, with fp32 inputs and outputs so every graph is fed alike.

    ONNX Runtime's CPU provider has fp16 kernels for few operators and wraps the others in casts
    to fp32, so on a CPU this graph mostly saves disk and memory; on a GPU it also runs faster.
    """
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel
    m = onnx.load(str(src))
    keep = rmsnorm_statistics(m.graph)
    m16 = convert_float_to_float16(m, keep_io_types=True, op_block_list=DEFAULT_OP_BLOCK_LIST, node_block_list=keep)
    join_fp32_regions(m16.graph, set(keep) | {n.name for n in m.graph.node if n.op_type in DEFAULT_OP_BLOCK_LIST})
    om = OnnxModel(m16)
    om.prune_graph()   # the Casts that no node reads any more
    om.topological_sort()   # the converter appends its Cast nodes at the end; ONNX wants order
    del om.model.graph.value_info[:]   # stale fp32 type annotations; the checker re-infers them
    onnx.save(om.model, str(dst))
    onnx.checker.check_model(str(dst), full_check=True)
    return dst


def convert_int8(src, dst):
    """int8 weights with one scale per block of 16; the activations stay fp32.

    onnxruntime's classic quantize_dynamic gives a whole weight matrix ONE scale, and a single
    outlier then costs every other weight its precision: the top-1 token changes (figures in
    docs/experiments.md). The MatMulNBits operator (the int4/int8 format ONNX Runtime GenAI uses)
    scales weights per block of 16 along the input dimension and dequantises each block as it
    multiplies (accuracy_level=1: fp32 arithmetic). Level 4 would also quantise the activations
    to int8 and multiply in int8, which is faster but less exact: on the default model it kept
    PyTorch's top-1 token at 98.9% of real-text positions, under the 99% the parity check asks,
    where fp32 activations keep 99.7%. Only MatMuls with a weight initializer are converted; the
    tied head reads the embedding through a Transpose, so it (and the embedding) stay fp32, and
    so do the value embeddings (ONNX Runtime quantises a Gather's table to 4 bits only), so the
    int8 file is well over a quarter of fp32's.
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    with contextlib.redirect_stdout(io.StringIO()):
        logging.getLogger().setLevel(logging.ERROR)   # the quantiser logs every node it converts
        q = MatMulNBitsQuantizer(str(src), bits=8, block_size=16, is_symmetric=True, accuracy_level=1,
                                 op_types_to_quantize=("MatMul",))
        q.process()
        q.model.save_model_to_file(str(dst))
    onnx.checker.check_model(str(dst), full_check=True)
    return dst


# ----------------------------------------------------------------------------- 5. running the graphs

def ort_session(path, threads, providers):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL   # fuse, fold
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = so.inter_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=providers)


def empty_cache(config, batch):
    """The past of a sequence that has not started: every cache tensor with 0 positions."""
    shape = (batch, config.n_head, 0, config.n_embd // config.n_head)
    return [np.zeros(shape, np.float32) for _ in range(2 * config.n_layer)]


def kv_step(sess, ids, past):
    """One call of the KV graph: returns (logits, present) with present ready to feed back."""
    feed = {"input_ids": ids}
    feed.update(zip(cache_names(len(past) // 2)[0], past))
    logits, *present = sess.run(None, feed)
    return logits, present


def kv_logits(sess, ids, config, split):
    """Logits of the KV graph used as a server uses it: prefill ids[:, :split], then one token a call."""
    out, past = kv_step(sess, ids[:, :split], empty_cache(config, ids.shape[0]))
    pieces = [out]
    for t in range(split, ids.shape[1]):
        out, past = kv_step(sess, ids[:, t:t + 1], past)
        pieces.append(out)
    return np.concatenate(pieces, axis=1)


def ort_generate(sess, idx, max_new_tokens, config):
    """Greedy decoding entirely in ONNX Runtime: the loop of GPT.generate(temperature=0), in numpy.

    Same sliding window as PyTorch: once the context overflows block_size, keep the newest
    block_size // 2 tokens and re-prefill them with an empty past.
    """
    bs, start, past = config.block_size, max(0, idx.shape[1] - config.block_size), None
    for _ in range(max_new_tokens):
        if idx.shape[1] - start > bs:
            start, past = idx.shape[1] - bs // 2, None
        if past is None:
            logits, past = kv_step(sess, idx[:, start:], empty_cache(config, idx.shape[0]))
        else:
            logits, past = kv_step(sess, idx[:, -1:], past)
        last = logits[:, -1, :].astype(np.float32)
        if config.vocab_used:   # padding rows of the embedding are never emitted
            last[:, config.vocab_used:] = -np.inf
        idx = np.concatenate([idx, last.argmax(-1)[:, None].astype(idx.dtype)], axis=1)
    return idx


def real_windows(data_dir, config, n=16):
    """Up to n windows of block_size tokens spread over DIR/02_tokenize/val.bin, or None."""
    tok = Path(data_dir) / "02_tokenize"
    if not (tok / "val.bin").is_file() or not (tok / "meta.json").is_file():
        return None
    try:
        dtype = np.dtype(json.loads((tok / "meta.json").read_text())["dtype"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{tok / 'meta.json'}: unreadable ({type(e).__name__}: {e})") from None
    arr = tok_lib.open_tokens(tok / "val.bin", dtype)
    T = min(config.block_size, len(arr))
    if T < 2:
        return None
    starts = np.linspace(0, len(arr) - T, min(n, len(arr) - T + 1)).astype(np.int64)
    ids = np.stack([np.asarray(arr[s:s + T], dtype=np.int64) for s in starts])
    if ids.max() >= config.vocab_size:
        raise UserError(f"{tok / 'val.bin'}: token id {ids.max()} is outside the model's vocabulary of "
                        f"{config.vocab_size}; was this checkpoint trained with another tokenizer?")
    return ids


def compare(ref, got):
    """Largest absolute logit difference and the share of positions with the same top-1 token."""
    got = got.astype(np.float32)
    return float(np.abs(ref - got).max()), float((ref.argmax(-1) == got.argmax(-1)).mean())


# ----------------------------------------------------------------------------- 6. latency

def measure_latency(model, sessions, config, prompt_len, decode_tokens, repeats, device):
    """ms for a prefill of prompt_len tokens and ms per decoded token, batch 1, each engine.

    Decode is what a chat user feels: one token in, the whole cache reused. PyTorch eager pays
    Python and dispatcher overhead on each of the dozens of small ops in every layer; ONNX Runtime runs a
    pre-planned, fused graph from C++, which is where the speed-up of a small model comes from.
    """
    ids = torch.randint(0, config.vocab_used or config.vocab_size, (1, prompt_len + decode_tokens))
    ids, steps = ids[:, :prompt_len], ids[:, prompt_len:]
    rows = {}
    m = model.to(device)

    @torch.no_grad()
    def torch_prefill():
        out = m(ids.to(device))
        common.synchronize(device)   # a GPU computes asynchronously: time the work, not the queueing
        return out

    @torch.no_grad()
    def torch_decode():
        _, _, kv = m(ids.to(device))
        t0 = time.perf_counter()
        for t in range(decode_tokens):
            _, _, kv = m(steps[:, t:t + 1].to(device), past_kv=kv)
        common.synchronize(device)
        return time.perf_counter() - t0

    def ort_prefill(sess):
        return kv_step(sess, ids.numpy(), empty_cache(config, 1))

    def ort_decode(sess):
        _, past = ort_prefill(sess)
        s = steps.numpy()
        t0 = time.perf_counter()
        for t in range(decode_tokens):
            _, past = kv_step(sess, s[:, t:t + 1], past)
        return time.perf_counter() - t0

    # engines take turns within each repeat, so a burst of load elsewhere hits them all alike
    engines = {f"pytorch eager ({device})": (torch_prefill, torch_decode)}
    engines.update({f"onnxruntime {name}": ((lambda s=s: ort_prefill(s)), (lambda s=s: ort_decode(s)))
                    for name, s in sessions.items()})
    pre = {k: [] for k in engines}
    dec = {k: [] for k in engines}
    for fns in engines.values():   # warm-up: first calls allocate and plan
        fns[0](), fns[1]()
    for _ in tqdm(range(repeats), desc="latency", leave=False):
        for k, (prefill, decode) in engines.items():
            t0 = time.perf_counter()
            prefill()
            pre[k].append(1000 * (time.perf_counter() - t0))
            dec[k].append(1000 * decode() / decode_tokens)
    for k in engines:
        p, d = statistics.median(pre[k]), statistics.median(dec[k])
        rows[k] = {"prefill_ms": p, "prefill_tok_s": prompt_len / p * 1000,
                   "decode_ms_per_token": d, "decode_tok_s": 1000 / d}
    model.to("cpu")
    return rows


# ----------------------------------------------------------------------------- report

def write_report(folder, report):
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    L = ["# Export report\n", f"Checkpoint: `{report['checkpoint']}`  ",
         f"Exporter: {report['exporter']}  ", f"Runtime: onnxruntime {report['onnxruntime']} "
         f"({', '.join(report['providers'])})\n", "## Files\n", "| file | bytes | vs fp32 |", "|---|---:|---:|"]
    for name, f in report["files"].items():
        L.append(f"| {name} | {f['bytes']:,} | {f['ratio']:.3f} |")
    L += ["", f"The fp16 checkpoint is {report['files']['model_fp16.pt']['ratio']:.4f} of the same checkpoint in "
          f"fp32 ({report['fp32_checkpoint_bytes']:,} bytes); rounding the weights moves logits by at most "
          f"{report['fp16_checkpoint_max_abs_logit_diff']:.2e}.", "", "## Parity against PyTorch fp32\n",
          f"Tolerances: fp32 {TOL_FP32:g} absolute; fp16 {REL_TOL['fp16']:.0%} and int8 {REL_TOL['int8']:.0%} of "
          f"the largest |logit| of the reference; every graph must also pick PyTorch's top-1 token on "
          f"at least {MIN_TOP1:.0%} of real-text positions (of random ones when there is no real text). "
          "KV graphs are run as a server runs them: prefill half the window, then one token per call.\n",
          "| graph | inputs | max abs logit diff | tolerance | same top-1 | pass |", "|---|---|---:|---:|---:|---|"]
    for r in report["parity"]:
        L.append(f"| {r['graph']} | {r['inputs']} | {r['max_abs_diff']:.2e} | {r['tolerance']:.1e} | "
                 f"{r['top1_agree']:.2%} | {'yes' if r['pass'] else '**NO**'} |")
    g = report["generate"]
    L += ["", f"Greedy generation of {g['new_tokens']} tokens for {g['batch']} prompts entirely in ONNX "
          "Runtime with the KV graph: " + ", ".join(f"{k} {v:.2%} of PyTorch's tokens" for k, v in g["agreement"].items()),
          "", "## Latency, batch 1 (median; noisy on a shared machine)\n",
          f"Prefill of {report['latency_setup']['prompt_len']} tokens; decode = mean per token over "
          f"{report['latency_setup']['decode_tokens']} tokens with the KV cache.\n",
          "| engine | prefill ms | prefill tok/s | decode ms/token | decode tok/s | decode speed-up |",
          "|---|---:|---:|---:|---:|---:|"]
    for k, r in report["latency"].items():
        L.append(f"| {k} | {r['prefill_ms']:.2f} | {r['prefill_tok_s']:,.0f} | {r['decode_ms_per_token']:.3f} | "
                 f"{r['decode_tok_s']:,.0f} | {r['decode_speedup']:.2f}x |")
    L += ["", "## Checks\n"] + [f"- {'pass' if ok else '**FAIL**'}: {name}" for name, ok in report["checks"].items()]
    (folder / "report.md").write_text("\n".join(L) + "\n")


def plot_latency(folder, latency):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(latency)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key, title in zip(axes, ("prefill_ms", "decode_ms_per_token"), ("prefill (ms)", "decode (ms per token)")):
        ax.barh(names, [latency[n][key] for n in names], color=["tab:gray"] + ["tab:blue"] * (len(names) - 1))
        ax.set_title(title)
        ax.invert_yaxis()
    axes[1].set_yticklabels([])
    fig.tight_layout()
    fig.savefig(folder / "latency.png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- the pipeline of this stage

def build(args, model, ckpt, ckpt_path, work, real, rng, prompt_len, gen_tokens, providers):
    """Everything that writes into the temporary folder; returns the report dict."""
    import onnxruntime as ort
    cfg = model.config
    bar = tqdm(total=8, desc="export", dynamic_ncols=True, postfix="fp16 checkpoint")

    def stage(next_step):
        bar.update(1)
        bar.set_postfix_str(next_step)

    # 1. fp16 checkpoint, and what rounding the weights costs in logits
    fp16_bytes, fp32_bytes = save_fp16_checkpoint(model, ckpt, work / "model_fp16.pt")
    stage("full graph")
    # 2-4. the graphs: two exports, then four conversions of them
    export_onnx(model, work / "model.onnx", with_cache=False)
    stage("KV graph")
    export_onnx(model, work / "model_kv.onnx", with_cache=True)
    stage("fp16 + int8 graphs")
    for g in ("model", "model_kv"):
        convert_fp16(work / f"{g}.onnx", work / f"{g}_fp16.onnx")
        convert_int8(work / f"{g}.onnx", work / f"{g}_int8.onnx")
    stage("parity")
    graphs = {g: ort_session(work / f"{g}.onnx", args.threads, providers) for g in
              ("model", "model_fp16", "model_int8", "model_kv", "model_kv_fp16", "model_kv_int8")}

    # 5. parity: PyTorch fp32 on the CPU is the reference for every graph. Random ids reach
    # every row of the embedding; real text gives the peaked distributions a trained model
    # produces, where a flipped top-1 token would actually change what the user reads: the
    # top-1 requirement applies there (16 windows; 2,048 positions for the default model).
    # Full windows, so positions up to block_size - 1 (the largest rotary angles) are covered.
    inputs = {"random": rng.integers(0, cfg.vocab_used or cfg.vocab_size, (2, cfg.block_size))}
    if real is not None:
        inputs["real"] = real
    parity, checks, kv_vs_full = [], {}, {}
    fp16_model, _ = model_lib.load_model(work / "model_fp16.pt")
    fp16_ckpt_diff = 0.0
    with torch.no_grad():
        for kind, ids in inputs.items():
            top1_required = kind == "real" or real is None   # see MIN_TOP1
            ref = model(torch.from_numpy(ids))[0].numpy()
            fp16_ckpt_diff = max(fp16_ckpt_diff, float(np.abs(fp16_model(torch.from_numpy(ids))[0].numpy() - ref).max()))
            split = ids.shape[1] // 2
            full32 = None
            for name, s in graphs.items():
                prec = {"": "fp32", "_fp16": "fp16", "_int8": "int8"}[name.removeprefix("model").removeprefix("_kv")]
                if "kv" in name:   # as a server runs it: prefill half, then one token per call
                    got = kv_logits(s, ids, cfg, split)
                else:
                    got = s.run(None, {"input_ids": ids})[0]
                    full32 = got if prec == "fp32" else full32
                diff, agree = compare(ref, got)
                t = TOL_FP32 if prec == "fp32" else REL_TOL[prec] * float(np.abs(ref).max())
                ok = diff <= t and (agree >= MIN_TOP1 or not top1_required)
                parity.append({"graph": f"{name}.onnx", "inputs": kind, "max_abs_diff": diff, "tolerance": t,
                               "top1_agree": agree, "pass": ok})
                checks[f"{name}.onnx matches PyTorch on {kind} tokens"] = ok
                if name == "model_kv":   # the cached graph, token by token, equals the full graph
                    kv_vs_full[kind] = float(np.abs(got - full32).max())
                    checks[f"model_kv.onnx token by token equals model.onnx on {kind} tokens"] = kv_vs_full[kind] <= TOL_FP32
    stage("generate")

    # Greedy generation in ONNX Runtime against GPT.generate in PyTorch, on the same prompts.
    # The strictest test there is: one differing argmax anywhere and every later token differs.
    # It must hold for fp32; for fp16/int8 the share of equal tokens is reported, not required
    # (a single near-tie flipped early sends the two texts down different paths).
    src = real if real is not None else inputs["random"]
    prompt = src[:2, :min(8, src.shape[1])]
    with torch.no_grad():
        want = model.generate(torch.from_numpy(prompt), gen_tokens, temperature=0).numpy()
    agreement = {}
    for name in ("model_kv", "model_kv_fp16", "model_kv_int8"):
        got = ort_generate(graphs[name], prompt, gen_tokens, cfg)
        agreement[f"{name}.onnx"] = float((got[:, prompt.shape[1]:] == want[:, prompt.shape[1]:]).mean())
        if name == "model_kv":
            checks["greedy generate in ONNX Runtime equals PyTorch generate"] = bool(np.array_equal(got, want))
    stage("guard")

    # The guard of step 9 (07 saved it): a server must run it without PyTorch, so it is a graph too
    guard_pt, guard = Path(args.data) / "07_safety" / "guard.pt", None
    if guard_pt.is_file():
        guard = common.load_checkpoint(guard_pt)
        guard_diff = export_guard(guard, work / "guard.onnx", args.threads)
        checks["guard.onnx matches 07's guard on the texts it saved"] = guard_diff <= TOL_GUARD
        (work / "guard.json").write_text(json.dumps({"threshold": float(guard["threshold"])}, indent=2) + "\n")
    stage("latency")

    # 6. latency: the KV graphs serve both prefill (empty past) and decode, as in a server.
    # Batch 1 is the interactive case, and the one where per-op overhead, not arithmetic, rules.
    sessions = {p: graphs[g] for p, g in (("fp32", "model_kv"), ("fp16", "model_kv_fp16"), ("int8", "model_kv_int8"))}
    latency = measure_latency(model, sessions, cfg, prompt_len, args.decode_tokens, args.repeats, args.device)
    base = next(iter(latency.values()))["decode_ms_per_token"]
    for r in latency.values():
        r["decode_speedup"] = base / r["decode_ms_per_token"]
    stage("report")
    bar.close()

    sizes = {"model_fp16.pt": (fp16_bytes, fp32_bytes)}
    for g in ("model", "model_kv"):
        for suffix in ("", "_fp16", "_int8"):
            sizes[f"{g}{suffix}.onnx"] = ((work / f"{g}{suffix}.onnx").stat().st_size, (work / f"{g}.onnx").stat().st_size)
    report = {
        "checkpoint": str(ckpt_path), "config": ckpt["config"],
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
        "onnxruntime": ort.__version__, "providers": providers[:1],
        "files": {k: {"bytes": b, "ratio": b / ref} for k, (b, ref) in sizes.items()},
        "fp32_checkpoint_bytes": fp32_bytes,
        "fp16_checkpoint_max_abs_logit_diff": fp16_ckpt_diff,
        "parity": parity, "kv_vs_full_max_abs_diff": kv_vs_full,
        "generate": {"batch": int(prompt.shape[0]), "prompt_len": int(prompt.shape[1]), "new_tokens": gen_tokens,
                     "agreement": agreement},
        "latency_setup": {"prompt_len": prompt_len, "decode_tokens": args.decode_tokens, "repeats": args.repeats,
                          "threads": args.threads or torch.get_num_threads(), "batch": 1},
        "guard": None if guard is None else {"file": "guard.onnx", "threshold": float(guard["threshold"]),
                                             "texts": len(guard["check_texts"]), "max_abs_diff": guard_diff},
        "latency": latency, "checks": checks, "passed": all(checks.values()),
    }
    write_report(work, report)
    plot_latency(work, latency)
    # what serve.py needs beside the graphs: how long a window may grow, which ids are padding
    (work / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    return report


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = common.ArgumentParser(description="Export a checkpoint to fp16 and ONNX (full and KV-cache "
                                           "graphs, fp32/fp16/int8) and check each against PyTorch.")
    a = ap.add_argument
    a("--data", default="data", help="data folder: reads 04_train/ (and 02_tokenize/), writes 08_export/")
    a("--ckpt", default=None, help="checkpoint to export (default DATA/04_train/ckpt.pt)")
    a("--device", type=common.device_flag, default="auto",
      help="device of the PyTorch side of the latency table: " + common.DEVICE_HELP + ". The export "
           "itself traces on the CPU; ONNX Runtime uses its CUDA provider with --device cuda if installed, else the CPU")
    a("--threads", type=common.natural_int, default=0, help="threads for PyTorch and ONNX Runtime alike (0: their defaults)")
    a("--prompt-len", type=common.positive_int, default=None, help="prefill length for latency (default block_size / 2)")
    a("--decode-tokens", type=common.positive_int, default=None,
      help="tokens decoded per latency measurement (default 32, fewer if the window is short)")
    a("--repeats", type=common.positive_int, default=5, help="latency repeats (the median is reported)")
    a("--gen-tokens", type=common.positive_int, default=None,
      help="tokens generated in the ORT-vs-PyTorch check (default block_size: the window slides)")
    a("--seed", type=common.natural_int, default=0, help="seed of the random test inputs")
    args = ap.parse_args(argv)
    args.device = common.pick_device(args.device)
    return args


def run(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt_path = Path(args.ckpt) if args.ckpt else Path(args.data) / "04_train" / "ckpt.pt"
    if not args.ckpt and not ckpt_path.exists():
        raise UserError(f"{ckpt_path}: not found; run 04_train.py first or pass --ckpt")
    # fp32 on the CPU: the reference every exported file is compared with, and the model
    # traced for export (a CPU trace gives a graph that runs on any execution provider)
    model, ckpt = model_lib.load_model(ckpt_path)
    cfg = model.config
    prompt_len = args.prompt_len or max(1, cfg.block_size // 2)
    if args.decode_tokens is None:
        args.decode_tokens = max(1, min(32, cfg.block_size - prompt_len))
    if prompt_len + args.decode_tokens > cfg.block_size:
        raise UserError(f"--prompt-len {prompt_len} + --decode-tokens {args.decode_tokens} must fit the "
                        f"model's block_size {cfg.block_size}")
    gen_tokens = args.gen_tokens or cfg.block_size
    import onnxruntime as ort
    providers = (["CUDAExecutionProvider"] if args.device == "cuda" and "CUDAExecutionProvider"
                 in ort.get_available_providers() else []) + ["CPUExecutionProvider"]
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    real = real_windows(args.data, cfg)

    out = Path(args.data) / "08_export"
    with common.output_dir(out) as work:
        report = build(args, model, ckpt, ckpt_path, work, real, rng, prompt_len, gen_tokens, providers)

    # the summary table
    print(f"\n{'file':<22}{'MiB':>9}{'vs fp32':>9}")
    for name, f in report["files"].items():
        print(f"{name:<22}{f['bytes'] / 2**20:>9.2f}{f['ratio']:>9.3f}")
    print(f"\n{'engine':<28}{'prefill ms':>11}{'decode ms/tok':>15}{'speed-up':>10}")
    for k, r in report["latency"].items():
        print(f"{k:<28}{r['prefill_ms']:>11.2f}{r['decode_ms_per_token']:>15.3f}{r['decode_speedup']:>9.2f}x")
    print()
    for name, ok in report["checks"].items():
        print(f"{'pass' if ok else 'FAIL'}  {name}")
    print(f"wrote {out}/ (model_fp16.pt, 6 .onnx files, config.json, " +
          ("guard.onnx, guard.json, " if report["guard"] else "") + "report.json, report.md, latency.png)")
    if not report["guard"]:
        print(f"no {Path(args.data) / '07_safety' / 'guard.pt'}, so no guard.onnx: serve.py needs it (run 07_safety.py first)")
    if not report["passed"]:
        print("08_export.py: some parity checks failed; see report.md", file=sys.stderr)
        return 1


def main(argv=None):
    common.main(__file__, run, argv)


if __name__ == "__main__":
    main()
