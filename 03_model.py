"""
Step 2 of the framework: choosing the architecture.

A decoder-only GPT in plain PyTorch, small enough to read in one sitting:
token embedding -> n_layer pre-norm blocks (causal self-attention + MLP) -> final norm ->
output head tied to the embedding. It keeps GPT-2's overall shape and departs from it where
later models (PaLM, LLaMA) found something cheaper or better; each departure says what it buys:

  * rotary position embeddings (RoPE) instead of a learned position table
  * RMSNorm instead of LayerNorm
  * a SwiGLU MLP instead of GELU
  * no bias terms anywhere
  * value embeddings: a per-layer token-indexed vector added to the attention values

In:  nothing (a preset name, and the vocabulary size from data/02_tokenize/meta.json if present).
Out: data/03_model/config.json (the GPTConfig fields + "preset") and summary.json, plus a printed
     summary: parameters per part, FLOPs per token, memory for weights, gradients, AdamW state.

Public API used by later stages: GPTConfig, PRESETS, GPT, load_model,
num_params, flops_per_token. Deliberately left out: grouped-query attention, mixture of
experts, weight-decay grouping and optimisers (that is 04_train.py's business).
"""
import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# ----------------------------------------------------------------------------- config

@dataclass
class GPTConfig:
    vocab_size: int = 50304   # rows of the embedding; may be padded above the tokenizer's size
    block_size: int = 256     # context window in tokens
    n_layer: int = 6
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0      # small models trained for minutes do not overfit; 0 is fastest
    vocab_used: int = 0       # ids the tokenizer really emits (0 = all); the rest are padding
    rope_base: float = 10000.0
    value_embed: bool = True  # per-layer value embeddings (see CausalSelfAttention)

    def __post_init__(self):
        # Bad sizes fail here with one line, not deep inside a matrix multiply later.
        for f in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ValueError(f"GPTConfig.{f} must be a positive integer, got {getattr(self, f)!r}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd={self.n_embd} must split into n_head={self.n_head} heads "
                             "of even size (RoPE rotates pairs of channels)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.vocab_used <= self.vocab_size:
            raise ValueError(f"vocab_used={self.vocab_used} must be in [0, vocab_size={self.vocab_size}]")

    @property
    def mlp_hidden(self):
        # SwiGLU has three matrices instead of two, so its hidden width is 2/3 of GPT-2's 4*d
        # (8/3*d) to keep parameters and FLOPs equal; rounded up to a multiple of 64 for fast
        # matmuls. For d=768 this is exactly 2048, so the gpt2 preset keeps GPT-2's MLP size.
        return 64 * math.ceil(8 * self.n_embd / 3 / 64)


PRESETS = {
    # for tests: trains and generates in milliseconds
    "tiny": GPTConfig(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=64),
    # the default: trains in minutes on a 2-core CPU (see 04_train.py and bench/)
    # Sized for the time, not the memory: ~7.6 MFLOPs per token, so a 2-core CPU sees the
    # 1.2M-token corpus a few times in minutes. With minutes to train, a smaller model that
    # takes more steps wins; of 2 to 6 layers, 3 did best after 5 minutes and keeps some depth
    # for the stages that fine-tune this model (the depth screen is in docs/experiments.md).
    "cpu": GPTConfig(vocab_size=4160, block_size=128, n_layer=3, n_head=4, n_embd=128),
    # GPT-2 small (124M) sizing for a GPU node; vocab 50257 padded to 50304 as in nanoGPT.
    # Without value embeddings: at this vocabulary and width, a table per layer would add 463M
    # parameters to the 124M (speedruns share three tables among twelve layers instead).
    "gpt2": GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768,
                      value_embed=False),
}
DEFAULT_PRESET = "cpu"


# ----------------------------------------------------------------------------- building blocks

class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned gain.

    Versus GPT-2's LayerNorm: no mean subtraction and no bias. Re-centring turned out not to
    matter (Zhang & Sennrich 2019); dropping it saves a reduction and a parameter vector, and
    is what LLaMA and most later models use.
    """

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32: under bf16 autocast the mean of squares loses too many bits
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_cos_sin(positions, head_dim, base, dtype):
    """cos/sin tables of shape (T, head_dim/2) for the given absolute positions.

    RoPE (Su et al. 2021) rotates each pair of query/key channels by an angle proportional to
    the token's position, with a different frequency per pair. The dot product q.k then depends
    only on the *distance* between the two tokens. Versus GPT-2's learned position table: no
    parameters, and nothing indexes a table, so positions are computed here from the past
    length (which keeps the KV-cache path exportable to ONNX with a dynamic sequence length).
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device,
                                            dtype=torch.float32) / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]   # fp32: positions*freq need bits
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    # x: (B, n_head, T, head_dim). Rotate channel i together with channel i + head_dim/2 (the
    # "rotate half" layout of GPT-NeoX and Hugging Face LLaMA; any fixed pairing works).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.rope_base, self.dropout = config.rope_base, config.dropout
        # one matrix for q, k and v: one big matmul is faster than three small ones.
        # No biases: they add parameters and memory traffic but no measurable quality (PaLM).
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.resid_drop = nn.Dropout(config.dropout)
        # Value embeddings (from the modded-nanogpt GPT-2 speedrun, 2024): a table indexed by
        # the *current token* whose row is added to that token's value vector. Every layer can
        # then copy token identity straight into what it attends to, instead of relying on the
        # residual stream to keep it intact. A lookup costs parameters but no FLOPs; one table
        # per layer did better than one shared table or tables on a few layers only
        # (docs/experiments.md).
        self.value_embed = nn.Embedding(config.vocab_size, config.n_embd) if config.value_embed else None

    def forward(self, x, ids, past=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        if self.value_embed is not None:
            v = v + self.value_embed(ids)
        # (B, T, C) -> (B, n_head, T, head_dim): each head attends independently
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))

        # Positions continue from whatever is already cached, so a token fed one at a time
        # gets the same rotation as it would inside the full sequence.
        past_len = 0 if past is None else past[0].size(2)
        pos = torch.arange(T, device=x.device) + past_len
        cos, sin = rope_cos_sin(pos, self.head_dim, self.rope_base, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)

        p = self.dropout if self.training else 0.0
        if past is None:
            # the plain causal case: lets SDPA pick its fused (flash) kernel
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            # with a cache, query i sits at absolute position past_len + i and may see keys
            # 0..past_len+i. is_causal=True would align the triangle to the top-left corner,
            # which is wrong when T < total length, so build the mask explicitly.
            mask = torch.arange(k.size(2), device=x.device)[None, :] <= pos[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y)), (k, v)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)).

    Versus GPT-2's GELU MLP: the multiplicative gate gives lower loss at the same parameter
    count and FLOPs (Shazeer 2020, "GLU Variants Improve Transformer"); PaLM and LLaMA use it.
    """

    def __init__(self, config):
        super().__init__()
        h = config.mlp_hidden
        self.gate = nn.Linear(config.n_embd, h, bias=False)
        self.up = nn.Linear(config.n_embd, h, bias=False)
        self.down = nn.Linear(h, config.n_embd, bias=False)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.drop(self.down(F.silu(self.gate(x)) * self.up(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    Normalising the branch input rather than the sum (GPT-2's choice over the original
    Transformer) keeps a clean identity path from input to output, so deep stacks train
    without warm-up tricks.
    """

    def __init__(self, config):
        super().__init__()
        self.norm1, self.attn = RMSNorm(config.n_embd), CausalSelfAttention(config)
        self.norm2, self.mlp = RMSNorm(config.n_embd), MLP(config)

    def forward(self, x, ids, past=None):
        a, present = self.attn(self.norm1(x), ids, past)
        x = x + a
        return x + self.mlp(self.norm2(x)), present


# ----------------------------------------------------------------------------- the model

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): the output head reuses the embedding matrix. A token
        # should be predicted where it is embedded; it saves vocab_size * n_embd parameters,
        # which in a small model is a large share of the total.
        self.head.weight = self.wte.weight

        # GPT-2 initialisation: N(0, 0.02) everywhere, except the two projections that write
        # into the residual stream, scaled by 1/sqrt(2 * n_layer): each block adds two such
        # terms, so the sum's variance stays ~constant with depth instead of growing.
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith(("attn.proj.weight", "mlp.down.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx, targets=None, past_kv=None):
        """idx: (B, T) token ids. Returns (logits (B, T, vocab), loss or None, present_kv).

        present_kv is a list with one (k, v) per layer, each (B, n_head, past + T, head_dim);
        pass it back as past_kv to continue the sequence one token at a time.
        """
        T = idx.size(1)
        past = 0 if past_kv is None else past_kv[0][0].size(2)
        # shape check skipped while tracing (torch.compile / ONNX export) so it does not become
        # a guard on the symbolic sequence length
        if not torch.compiler.is_compiling() and past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens exceeds block_size={self.config.block_size}")
        h, present_kv = self.body(self.wte(idx), idx, past_kv)
        logits = self.head(h)
        loss = None
        if targets is not None:
            # mean over every position; -1 marks positions to ignore (padding, masked prompts).
            # Computed in fp32: a softmax over thousands of classes in bf16 is too coarse.
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss, present_kv

    def body(self, x, ids, past_kv=None):
        """The transformer without its two ends: input embeddings x (B, T, n_embd) and the ids
        (B, T) that pick the value embeddings -> final, normalised hidden states (B, T, n_embd)
        and present_kv. forward() wraps it between the embedding and the head; fine-tuning (06)
        feeds its own embeddings (soft prompts) and reads the hidden states as features."""
        x = self.drop(x)
        present_kv = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, ids, None if past_kv is None else past_kv[i])
            present_kv.append(kv)
        return self.norm(x), present_kv

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 use_cache=True, generator=None):
        """Append max_new_tokens sampled tokens to idx (B, T) and return the (B, T + new) ids.

        temperature 0 = greedy (argmax). top_k keeps the k most likely tokens; top_p keeps the
        smallest set whose probability reaches p (nucleus sampling). With use_cache each step
        feeds only the newest token and reuses every earlier key/value: one position of work.

        Sliding window: the model sees at most block_size tokens. When the window is full, it
        jumps forward to keep only the newest block_size // 2 tokens, which are re-encoded once
        (a "prefill"); then single-token steps resume. This is llama.cpp's context shift: the
        re-prefill costs half a block every half block, instead of a full block every token.
        use_cache=False recomputes the same window from scratch at every step, so both paths
        give the same tokens (greedy, or sampled with the same generator).
        """
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"generate needs a (batch, T>=1) prompt, got shape {tuple(idx.shape)}")
        if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
            raise ValueError(f"bad sampling settings: temperature={temperature} (>= 0), "
                             f"top_k={top_k} (>= 1), top_p={top_p} (in (0, 1])")
        was_training = self.training
        self.eval()   # dropout would make cached and recomputed paths differ
        bs = self.config.block_size
        start = max(0, idx.size(1) - bs)   # first position inside the window
        past_kv = None
        for _ in range(max_new_tokens):
            if idx.size(1) - start > bs:   # window overflowed: slide and re-prefill
                start, past_kv = idx.size(1) - bs // 2, None
            if past_kv is None:
                logits, _, past_kv = self(idx[:, start:])
            else:
                logits, _, past_kv = self(idx[:, -1:], past_kv=past_kv)
            if not use_cache:
                past_kv = None
            idx = torch.cat((idx, self._sample(logits[:, -1, :], temperature, top_k, top_p, generator)), dim=1)
        self.train(was_training)
        return idx

    def _sample(self, logits, temperature, top_k, top_p, generator):
        logits = logits.float()
        if self.config.vocab_used:   # never emit padding ids the tokenizer cannot decode
            logits[:, self.config.vocab_used:] = -float("inf")
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits / temperature
        if top_k is not None and top_k < logits.size(-1):
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        if top_p is not None and top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            # drop a token when the ones before it already reach top_p (the first always stays)
            drop = (cum - sorted_logits.softmax(dim=-1)) >= top_p
            logits = logits.masked_fill(drop.scatter(1, order, drop), -float("inf"))
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator)


# ----------------------------------------------------------------------------- helpers

def num_params(model):
    """Number of distinct parameters (the tied embedding/head matrix counted once)."""
    return sum(p.numel() for p in model.parameters())


def flops_per_token(config, seq_len=None):
    """Training FLOPs per token (forward + backward), as in PaLM appendix B and nanoGPT's MFU.

    6N: each weight does a multiply-add (2 FLOPs) per token forward and twice that backward.
    N here includes the tied embedding once, because it is used as the output head's matmul,
    and leaves out the value embeddings: a table lookup multiplies nothing.
    Plus attention scores: 12 * n_layer * n_embd * seq_len (QK^T and AV, forward + backward),
    counted over the full window as is the convention (causal masking would halve it).
    """
    seq_len = seq_len or config.block_size
    L, d, V, h = config.n_layer, config.n_embd, config.vocab_size, config.mlp_hidden
    n = V * d + L * (4 * d * d + 3 * d * h + 2 * d) + d
    return 6 * n + 12 * L * d * seq_len


def load_model(path, device="cpu", dtype=torch.float32):
    """Load a checkpoint {"model": state_dict, "config": dict} -> (GPT in eval mode, ckpt dict).

    Half-precision weights (e.g. 08_export's fp16 checkpoint) are cast to `dtype` (fp32 by
    default; dtype=None keeps what is stored). A file that is not such a checkpoint, or whose
    weights do not fit its config, raises common.UserError naming the file.
    """
    ckpt = common.load_checkpoint(path)
    try:
        fields = {f.name for f in dataclasses.fields(GPTConfig)}
        model = GPT(GPTConfig(**{k: v for k, v in ckpt["config"].items() if k in fields}))
        sd = common.strip_prefixes(ckpt["model"])
        model.to(next(iter(sd.values())).dtype if dtype is None else dtype)
        model.load_state_dict(sd)   # strict: any missing, unexpected or misshapen weight is named
    except Exception as e:   # no "config" or "model", a bad config, weights that do not fit it
        why = " ".join(str(e).split())   # load_state_dict's report spans lines: make it one
        raise common.UserError(f"{path}: not a checkpoint of this GPT ({type(e).__name__}: {why[:300]})") from None
    return model.to(device).eval(), ckpt


# ----------------------------------------------------------------------------- the script

def summarize(config):
    """Parameters per part, FLOPs per token and fp32 training memory, as a dict."""
    d, L, h, V = config.n_embd, config.n_layer, config.mlp_hidden, config.vocab_size
    parts = {
        "embedding (tied with head)": V * d,
        "attention (qkv + proj)": L * 4 * d * d,
        "value embeddings": L * V * d if config.value_embed else 0,
        "mlp (gate + up + down)": L * 3 * d * h,
        "norms": (2 * L + 1) * d,
    }
    n = sum(parts.values())
    return {
        "params": parts, "params_total": n, "params_non_embedding": n - V * d - parts["value embeddings"],
        "flops_per_token_train": flops_per_token(config),
        "flops_per_token_forward": flops_per_token(config) // 3,
        # fp32 training: 4 bytes of weights, 4 of gradients, 8 of AdamW moments (m and v)
        "bytes_weights": 4 * n, "bytes_grads": 4 * n, "bytes_adamw": 8 * n,
        # inference KV cache for one full window: k and v, every layer, fp32
        "bytes_kv_cache_per_sequence": 2 * L * config.block_size * d * 4,
    }


def parse_args(argv=None):
    ap = common.ArgumentParser(description="Choose a GPT architecture: print its size and cost, "
                                           "write data/03_model/config.json.")
    ap.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                    help=f"model size (default {DEFAULT_PRESET})")
    ap.add_argument("--data", default="data", help="data folder (default: data)")
    ap.add_argument("--vocab-size", type=common.positive_int, default=None,
                    help="vocabulary size when data/02_tokenize/meta.json is absent (or larger)")
    for f in ("block_size", "n_layer", "n_head", "n_embd"):
        ap.add_argument("--" + f.replace("_", "-"), type=common.positive_int, default=None,
                        help=f"override the preset's {f}")
    ap.add_argument("--dropout", type=common.fraction, default=None, help="override the preset's dropout")
    return ap.parse_args(argv)


def run(argv=None):
    args = parse_args(argv)
    # The vocabulary comes from the tokenizer when one exists, so the model always fits it.
    meta_path = Path(args.data) / "02_tokenize" / "meta.json"
    vocab = None
    if meta_path.exists():
        try:
            vocab = int(json.loads(meta_path.read_text())["vocab_size"])
        except (ValueError, KeyError, TypeError) as e:
            raise common.UserError(f"{meta_path}: unreadable ({type(e).__name__}: {e})") from None
        if vocab < 1:
            raise common.UserError(f"{meta_path}: vocab_size must be positive, got {vocab}")
    if args.vocab_size is not None:
        if vocab is not None and args.vocab_size < vocab:
            raise common.UserError(f"--vocab-size {args.vocab_size} is smaller than the tokenizer's {vocab} ({meta_path})")
        vocab = args.vocab_size
    used = vocab or 0
    # Pad the embedding to a multiple of 64: matmul kernels work in tiles, and a ragged last
    # tile is slow (nanoGPT's 50257 -> 50304 gave ~25% on GPU). The extra rows are never
    # targets, learn a tiny probability, and generate() masks them (vocab_used).
    padded = 64 * math.ceil(vocab / 64) if vocab else PRESETS[args.preset].vocab_size
    overrides = {f: getattr(args, f) for f in ("block_size", "n_layer", "n_head", "n_embd", "dropout")
                 if getattr(args, f) is not None}
    try:
        config = dataclasses.replace(PRESETS[args.preset], vocab_size=padded, vocab_used=used, **overrides)
    except ValueError as e:   # sizes that do not fit together, e.g. --n-embd 100 --n-head 3
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in overrides.items())
        raise common.UserError(f"{flags} (preset {args.preset}): {e}") from None

    s = summarize(config)
    mib = lambda b: f"{b / 2**20:,.1f} MiB"
    print(f"preset {args.preset}: {config.n_layer} layers, {config.n_head} heads, width {config.n_embd}, "
          f"context {config.block_size}, vocab {config.vocab_size}" +
          (f" ({used} used)" if used and used != padded else ""))
    for part, n in s["params"].items():
        print(f"  {part:<28} {n:>13,}  {n / s['params_total']:6.1%}")
    print(f"  {'total':<28} {s['params_total']:>13,}  (non-embedding {s['params_non_embedding']:,})")
    print(f"  FLOPs per token: {s['flops_per_token_train'] / 1e6:,.1f} M training, "
          f"{s['flops_per_token_forward'] / 1e6:,.1f} M forward")
    print(f"  fp32 training memory: weights {mib(s['bytes_weights'])}, gradients {mib(s['bytes_grads'])}, "
          f"AdamW {mib(s['bytes_adamw'])} = {mib(16 * s['params_total'])} (+ activations)")
    print(f"  KV cache per sequence (full window, fp32): {mib(s['bytes_kv_cache_per_sequence'])}")

    out = Path(args.data) / "03_model"
    with common.output_dir(out) as tmp:   # both files, or neither
        (tmp / "config.json").write_text(json.dumps({**dataclasses.asdict(config), "preset": args.preset}, indent=2) + "\n")
        (tmp / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
    print(f"wrote {out / 'config.json'} and {out / 'summary.json'}")


def main(argv=None):
    common.main(__file__, run, argv)


if __name__ == "__main__":
    main()
