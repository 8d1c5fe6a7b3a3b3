"""
Step 8 of the framework: domain fine-tuning, with LoRA written by hand.

The task has real labels: name the topic of a Wikipedia article (Geography, People, Arts, ...,
the labels the built-in corpus carries; "Uncategorized" articles and Python docs left out).
Train on articles of 01_clean's train split, test on its val split, which the base model never
saw in pretraining. Four ways to adapt the same pretrained GPT, same data, same step budget:

  head    the frozen model, only a new linear head on its features: the "before"
  lora    + low-rank adapters: W x + (alpha/r) B A x in chosen linear layers (Hu et al. 2021)
  full    every weight trained: the quality reference, and the cost LoRA avoids
  prompt  + trained "soft prompt" vectors in front of the input, model frozen (Lester et al. 2021)

In:  DIR/01_clean/{train,val}.jsonl, DIR/02_tokenize/ (the tokenizer), DIR/04_train/ckpt.pt
Out: DIR/06_finetune_lora/adapter.pt   the LoRA matrices + head alone: the small file to ship
     DIR/06_finetune_lora/merged.pt    LoRA folded into the weights, an ordinary 03_model
                                       checkpoint that 05/07/08 load (the head under "classifier")
     DIR/06_finetune_lora/report.json, report.md, confusion.png, loss.png

Public API (07_safety.py builds its guard with it): LoRALinear, inject_lora, lora_state_dict,
load_lora, merge_lora, Classifier, train_classifier, predict, save_adapter,
load_adapter. Deliberately left out: quantised bases (QLoRA), per-layer ranks, and fine-tuning
for generation (instruction tuning): a label is the clearest way to measure what tuning buys.
"""
import argparse
import copy
import importlib
import io
import json
import math
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common

model_lib = importlib.import_module("03_model")

METHODS = ("head", "lora", "full", "prompt")

# Learning rates, of the new linear head that every method trains ("head") and of each method's
# own parameters. A fresh head needs big steps; full fine-tuning small ones, since large steps
# destroy what pretraining learnt.
LR = {"head": 1e-2, "lora": 1e-2, "full": 3e-4, "prompt": 1e-2}
LORA_ALPHA = 4       # the update is scaled by alpha / r (LoRALinear)
LORA_DROPOUT = 0.0   # dropout on the adapters' input (LoRALinear): none
MAX_LEN = 64         # tokens read from each article, unless --max-len or the model's block says less


# ----------------------------------------------------------------------------- 1. LoRA

class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: y = W x + (alpha/r) * B A dropout(x).

    Fine-tuning changes a pretrained matrix by a delta that is close to low-rank (Aghajanyan et
    al. 2020), so LoRA learns the delta as B (out x r) @ A (r x in): for r=8 and a 256x768
    matrix, 8k numbers instead of 197k. A starts random (Kaiming-uniform, as in the paper's
    loralib) and B at zero, so the wrapped model starts exactly equal to the base model and
    the first steps move B away from zero. alpha/r keeps the update's size roughly independent
    of r, so a learning rate tuned at one rank still works at another.
    """

    def __init__(self, base, r=8, alpha=16, dropout=0.0):
        super().__init__()
        if not isinstance(base, nn.Linear) or r < 1:
            raise ValueError(f"LoRALinear needs an nn.Linear and r >= 1, got {type(base).__name__}, r={r}")
        self.base, self.r, self.alpha, self.scaling = base, r, alpha, alpha / r
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.drop = nn.Dropout(dropout)   # on the adapter's input only: the base path stays exact
        self.merged = False

    def delta_weight(self):
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x):
        y = self.base(x)
        if self.merged:   # the update already lives inside base.weight
            return y
        # two thin matmuls (x A^T, then B^T) instead of forming the full B A: r << in, out
        return y + F.linear(F.linear(self.drop(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merge(self):
        """Fold the update into the base weight: inference then costs exactly the base model."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


# Which nn.Linear layers of 03_model's blocks get adapters. The paper adapted only attention
# (q and v); later work (QLoRA) found adapting every linear layer better at equal parameters.
# The output head is never wrapped: it is tied to the embedding and a classifier does not use it.
LORA_TARGETS = {"attn": ("attn.qkv", "attn.proj"), "mlp": ("mlp.gate", "mlp.up", "mlp.down")}
LORA_TARGETS["all"] = LORA_TARGETS["attn"] + LORA_TARGETS["mlp"]


def inject_lora(model, targets="attn", r=8, alpha=16, dropout=0.0):
    """Wrap the chosen nn.Linear modules of model.blocks in LoRALinear, in place; freeze every
    other parameter. targets: "attn", "mlp" or "all". Returns the wrapped modules' names."""
    if targets not in LORA_TARGETS:
        raise ValueError(f"LoRA targets must be one of {sorted(LORA_TARGETS)}, got {targets!r}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model already has LoRA layers (merge_lora them first)")
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.startswith("blocks.") and n.endswith(LORA_TARGETS[targets])]
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(model.get_submodule(name), r, alpha, dropout))
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith((".lora_A", ".lora_B")))
    return names


def lora_state_dict(model):
    """The adapter tensors only ({name: tensor} for every lora_A and lora_B)."""
    return {k: v.detach() for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def load_lora(model, state):
    """Copy adapter tensors (from lora_state_dict) into a model that inject_lora already wrapped
    the same way. A missing, extra or mis-shaped tensor raises ValueError with one line."""
    own = lora_state_dict(model)
    if not own:
        raise ValueError("model has no LoRA layers: call inject_lora first")
    if any(m.merged for m in model.modules() if isinstance(m, LoRALinear)):
        raise ValueError("cannot load an adapter into merged LoRA layers")
    missing, extra = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or extra:
        raise ValueError(f"adapter does not fit the model: {len(missing)} missing (e.g. {missing[:1]}), "
                         f"{len(extra)} unexpected (e.g. {extra[:1]}); same --lora-targets?")
    for k, v in state.items():
        if not torch.is_tensor(v) or v.shape != own[k].shape:
            raise ValueError(f"adapter tensor {k}: shape {tuple(getattr(v, 'shape', ()))}, model has {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)


def merge_lora(model):
    """Fold every adapter into its base weight and put the plain nn.Linear back, in place: the
    result has 03_model's own state-dict keys, so it saves as an ordinary checkpoint."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            m.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, m.base)
    return model


# ----------------------------------------------------------------------------- 2. a classifier on the GPT

class Classifier(nn.Module):
    """GPT features -> linear head. `method` sets what trains (the model is changed in place):

      "head"   only the head;   "lora"  LoRA adapters (inject_lora) + head
      "full"   everything;      "prompt" n_prompt soft-prompt vectors + head

    Features: the mean of the final hidden states over the text's real tokens (pool="mean"),
    the last token's (pool="last"), or their element-wise max (pool="max"). Mean is the default:
    in a causal model only the last token has read the whole text, but its state is trained to
    predict the *next token*, which for a small model is mostly about local syntax; the average
    collects topic evidence from every position (with a frozen model it was much the better of
    the two). Max suits a detector (07's guard): one harmful phrase
    should decide, however much harmless text is wrapped around it, and a mean dilutes it.
    Right padding keeps it exact: causal attention never lets a real token see the pads after it.
    """

    def __init__(self, model, n_classes, method, pool="mean", n_prompt=16,
                 lora_targets="attn", lora_r=8, lora_alpha=16, lora_dropout=0.0):
        super().__init__()
        if method not in METHODS or pool not in ("mean", "last", "max"):
            raise ValueError(f"method must be one of {METHODS} and pool mean|last|max, got {method!r}, {pool!r}")
        self.model, self.method, self.pool, self.classes = model, method, pool, list(range(n_classes))
        self.lora = dict(targets=lora_targets, r=lora_r, alpha=lora_alpha, dropout=lora_dropout)
        if method == "lora":
            inject_lora(model, **self.lora)
        else:
            model.requires_grad_(method == "full")
        self.prompt = None
        if method == "prompt":
            # start from the embeddings of random real tokens: Lester et al. found this trains
            # better than random vectors, which sit far from anything the model has seen
            w = model.wte.weight
            ids = torch.randint(model.config.vocab_used or w.size(0), (n_prompt,)).to(w.device)
            self.prompt = nn.Parameter(w[ids].detach().clone())
            # the model's value embeddings are looked up by id: each prompt position keeps the
            # id of the token it started from
            self.register_buffer("prompt_ids", ids)
        self.head = nn.Linear(model.config.n_embd, n_classes).to(model.wte.weight.device)

    def forward(self, idx, mask):
        """idx (B, T) right-padded token ids, mask (B, T) True at real tokens -> logits (B, classes)."""
        x, ids = self.model.wte(idx), idx
        if self.prompt is not None:
            x = torch.cat((self.prompt.expand(idx.size(0), -1, -1), x), dim=1)
            ids = torch.cat((self.prompt_ids.expand(idx.size(0), -1), idx), dim=1)
        h, _ = self.model.body(x, ids)
        if self.prompt is not None:
            # the prompt positions come first, so (causal) they never see the text: their states
            # are the same for every input. Only the text positions carry evidence.
            h = h[:, self.prompt.size(0):]
        if self.pool == "max":
            feats = h.masked_fill(~mask.unsqueeze(-1), float("-inf")).max(1).values
        elif self.pool == "mean":
            m = mask.unsqueeze(-1).to(h.dtype)
            feats = (h * m).sum(1) / m.sum(1).clamp(min=1)
        else:
            feats = h[torch.arange(h.size(0), device=h.device), mask.sum(1) - 1]
        return self.head(feats)


def encode_texts(tok, texts, max_len):
    # the first max_len tokens: an encyclopedia summary names its subject in the first sentence
    return [tok.encode_ordinary(t)[:max_len] or [tok.eot_token] for t in texts]


def make_batch(seqs, device):
    """Right-pad a list of id lists to the longest: (idx, mask) on device."""
    idx = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    mask = torch.zeros(idx.shape, dtype=torch.bool)
    for i, s in enumerate(seqs):
        idx[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), True
    return idx.to(device), mask.to(device)


def _lr_factor(step, steps):
    # linear warmup over the first 10% (a new head's first gradients are large and noisy),
    # then cosine to zero: with a fixed step budget, ending at lr 0 gives the best final weights
    warm = max(1, steps // 10)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def _reset_peak_rss():
    # Linux: writing 5 to clear_refs resets the peak RSS that getrusage reports, so each method
    # gets its own peak. Elsewhere the figure stays the process's peak so far.
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def train_classifier(model, tok, texts, labels, method, steps=200, lr=1e-3, batch_size=16,
                     max_len=64, seed=0, device="cpu", head_lr=None, progress=True, **classifier_kw):
    """Fine-tune a *copy* of `model` (the caller's model is never changed) as a classifier.

    labels: ints (class indices 0..n-1) or any sortable labels (classes = their sorted set).
    lr is for the method's own parameters (adapters, prompt, or all weights); head_lr (default
    lr) for the new head. classifier_kw go to Classifier (pool, n_prompt, lora_*). Batches are
    drawn from a permutation seeded by `seed`, so every method sees the same examples in the
    same order. Returns (classifier, info) where info holds the training figures.
    """
    if not texts or len(texts) != len(labels):
        raise ValueError(f"need as many labels as texts (>0), got {len(texts)} texts, {len(labels)} labels")
    if all(isinstance(l, (int, np.integer)) for l in labels):
        if min(labels) < 0:
            raise ValueError("integer labels must be class indices >= 0")
        classes = list(range(int(max(labels)) + 1))
    else:
        classes = sorted(set(labels))
    if len(classes) < 2:
        raise ValueError("need at least two classes")
    n_prompt = classifier_kw.get("n_prompt", 16) if method == "prompt" else 0
    if max_len < 1 or max_len + n_prompt > model.config.block_size:
        raise ValueError(f"max_len {max_len} (+ {n_prompt} prompt vectors) must fit the model's "
                         f"block_size {model.config.block_size}")
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[l] for l in labels])
    seqs = encode_texts(tok, texts, max_len)

    torch.manual_seed(seed)   # same head initialisation for every method
    clf = Classifier(copy.deepcopy(model).to(device), len(classes), method, **classifier_kw)
    clf.classes = classes
    clf.train()
    trainable = [p for p in clf.parameters() if p.requires_grad]
    body = [p for n, p in clf.named_parameters() if p.requires_grad and not n.startswith("head.")]
    # two learning rates: a fresh head needs big steps, pretrained weights small ones
    groups = [{"params": list(clf.head.parameters()), "lr": head_lr or lr}] + ([{"params": body, "lr": lr}] if body else [])
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    base_lrs = [g["lr"] for g in opt.param_groups]

    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(seqs), generator=gen)
                       for _ in range(math.ceil(steps * batch_size / len(seqs)) or 1)])
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    rss_reset = _reset_peak_rss()
    losses, t0 = [], time.perf_counter()
    for step in tqdm(range(steps), desc=f"train {method}", disable=not progress, leave=False):
        b = order[step * batch_size:(step + 1) * batch_size]
        idx, mask = make_batch([seqs[i] for i in b], device)
        for g, base in zip(opt.param_groups, base_lrs):
            g["lr"] = base * _lr_factor(step, steps)
        loss = F.cross_entropy(clf(idx, mask), y[b].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        losses.append(loss.item())
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts if torch.is_tensor(t))
    info = {
        "method": method, "steps": steps, "batch_size": batch_size, "lr": lr, "head_lr": head_lr or lr,
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in clf.parameters()),
        "train_seconds": seconds, "losses": losses,
        # what training must hold besides activations: weights being trained, their gradients
        # and AdamW's two moments. This is the memory LoRA saves, whatever the device.
        "train_state_bytes": nbytes(trainable) + nbytes(p.grad for p in trainable)
                             + nbytes(t for s in opt.state.values() for t in s.values()),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        "peak_rss_per_method": rss_reset,
        "peak_cuda_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
    }
    clf.eval()
    return clf, info


@torch.no_grad()
def predict(classifier, tok, texts, max_len=64, device="cpu", batch_size=64):
    """Labels and class probabilities (N, n_classes; columns in classifier.classes order)."""
    classifier.eval().to(device)
    seqs = encode_texts(tok, texts, max_len)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))   # similar lengths pad little
    probs = np.zeros((len(seqs), len(classifier.classes)), dtype=np.float32)
    for i in range(0, len(order), batch_size):
        b = order[i:i + batch_size]
        probs[b] = classifier(*make_batch([seqs[j] for j in b], device)).float().softmax(-1).cpu().numpy()
    return [classifier.classes[k] for k in probs.argmax(1)], probs


def save_adapter(classifier, path):
    """Write a LoRA classifier's adapter + head + settings (no base weights) atomically."""
    if classifier.method != "lora":
        raise ValueError("save_adapter needs a classifier trained with method='lora'")
    common.save_checkpoint({"lora": lora_state_dict(classifier.model), "lora_config": classifier.lora,
                               "head": classifier.head.state_dict(), "classes": classifier.classes,
                               "pool": classifier.pool}, path)


def load_adapter(model, path):
    """Rebuild the LoRA classifier of save_adapter on a base model (changed in place)."""
    try:
        a = torch.load(path, map_location="cpu", weights_only=True)
        clf = Classifier(model, len(a["classes"]), "lora", pool=a["pool"],
                         **{f"lora_{k}": v for k, v in a["lora_config"].items()})
        load_lora(model, a["lora"])
        clf.head.load_state_dict(a["head"])
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"adapter {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    clf.classes = list(a["classes"])
    return clf.eval()


# ----------------------------------------------------------------------------- 3. the stage

def read_labelled(path):
    """(texts, topics) of the Wikipedia articles with a real topic in one 01_clean split."""
    texts, topics = [], []
    try:
        with open(path, "rb") as f:   # bytes, decoded line by line: a bad line is named by its number
            for n, line in enumerate(f, 1):
                try:
                    line = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise common.UserError(f"{path}:{n}: not UTF-8 text (byte {e.start + 1} of the line)") from None
                try:
                    d = json.loads(line)
                    text, source, topic = d["text"], d.get("source"), d.get("topic")
                    if not isinstance(text, str):
                        raise TypeError
                except (ValueError, KeyError, TypeError):
                    raise common.UserError(f"{path}:{n}: not a JSON object with a 'text' string") from None
                if source == "wikipedia" and isinstance(topic, str) and topic != "Uncategorized":
                    texts.append(text)
                    topics.append(topic)
    except OSError as e:
        raise common.UserError(f"{path}: cannot read ({e.strerror}); run 01_clean.py first") from None
    return texts, topics


def _subsample(rng, texts, labels, n):
    if n is None or n >= len(texts):
        return texts, labels
    pick = sorted(rng.choice(len(texts), n, replace=False))
    return [texts[i] for i in pick], [labels[i] for i in pick]


def load_articles(data, max_train=None, max_test=None, seed=0):
    """The labelled articles: ((train texts, topics), (test texts, topics), sorted topics).
    Training articles come from 01_clean's train split, test articles from its val split (only
    topics seen in training: one never trained on cannot be predicted); each set at most
    max_train / max_test articles, drawn at random (seeded)."""
    train_path, test_path = data / "01_clean" / "train.jsonl", data / "01_clean" / "val.jsonl"
    train_x, train_y = read_labelled(train_path)
    test_x, test_y = read_labelled(test_path)
    classes = sorted(set(train_y))
    if len(classes) < 2:
        raise common.UserError(f"{train_path}: needs Wikipedia articles of at least two topics "
                               "(the built-in corpus; a user corpus carries no topic labels)")
    keep = [i for i, t in enumerate(test_y) if t in classes]
    test_x, test_y = [test_x[i] for i in keep], [test_y[i] for i in keep]
    if not test_x:
        raise common.UserError(f"{test_path}: no labelled test articles of the training topics")
    rng = np.random.default_rng(seed)
    train = _subsample(rng, train_x, train_y, max_train)
    return train, _subsample(rng, test_x, test_y, max_test), classes


def load_base(data, ckpt_path, device):
    """The tokenizer of 02_tokenize and the pretrained model to adapt."""
    try:
        tok = importlib.import_module("02_tokenize").load_tokenizer(data / "02_tokenize")
        base, _ = model_lib.load_model(ckpt_path, device=device)
    except ValueError as e:   # common.UserError among them: a missing or damaged file, named
        raise common.UserError(f"{e}; run 02_tokenize.py and 04_train.py first, or pass --ckpt") from None
    except RuntimeError as e:   # a device torch knows but cannot use, e.g. cuda:3 on one GPU
        raise common.UserError(f"--device {device}: {str(e).splitlines()[0]}") from None
    if tok.n_vocab > base.config.vocab_size:
        raise common.UserError(f"{ckpt_path}: vocabulary {base.config.vocab_size} is smaller than the "
                               f"tokenizer's {tok.n_vocab}")
    return tok, base


def fit_max_len(max_len, n_prompt, block_size):
    """Tokens read from each article: max_len, or by default MAX_LEN shortened to leave room for
    the soft prompt in the model's block."""
    if max_len is None:
        return max(1, min(MAX_LEN, block_size - n_prompt))
    if max_len + n_prompt > block_size:
        raise common.UserError(f"--max-len {max_len} (+ --n-prompt) exceeds the model's block_size {block_size}")
    return max_len


def metrics(true, pred, classes):
    """Accuracy, macro-F1 (each class's F1 counts equally, so small topics matter) and the
    confusion matrix (rows = true class, columns = predicted)."""
    k = {c: i for i, c in enumerate(classes)}
    cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for t, p in zip(true, pred):
        cm[k[t], k[p]] += 1
    tp = np.diag(cm).astype(float)
    prec = np.divide(tp, cm.sum(0), out=np.zeros_like(tp), where=cm.sum(0) > 0)
    rec = np.divide(tp, cm.sum(1), out=np.zeros_like(tp), where=cm.sum(1) > 0)
    f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros_like(tp), where=prec + rec > 0)
    present = cm.sum(1) > 0   # a topic absent from the test split has no defined F1
    return {"accuracy": float(tp.sum() / cm.sum()), "macro_f1": float(f1[present].mean()),
            "confusion": cm.tolist()}


def saved_bytes(obj):
    """Size of obj as torch.save writes it: what a method's checkpoint costs on disk."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def train_and_score(method, base, tok, train, test, classes, args):
    """Train one method on the training articles and test it: (classifier, its figures, its predictions)."""
    clf, info = train_classifier(base, tok, *train, method, args.steps, LR[method], args.batch_size,
                                 args.max_len, args.seed, args.device, head_lr=LR["head"], pool=args.pool,
                                 n_prompt=args.n_prompt, lora_targets=args.lora_targets, lora_r=args.lora_r,
                                 lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT)
    pred, _ = predict(clf, tok, test[0], args.max_len, args.device)
    # the file this method has to ship: whatever it trained (for "full", the whole model)
    ship = {n: p.detach() for n, p in clf.named_parameters() if p.requires_grad}
    result = {**info, **metrics(test[1], pred, classes), "checkpoint_bytes": saved_bytes(ship)}
    print(f"  {method:<6} accuracy {result['accuracy']:.1%}  ({info['train_seconds']:.0f} s)", flush=True)
    return clf, result, pred


def save_lora_outputs(clf, tok, texts, base, args, ckpt_path, out):
    """out/adapter.pt (the adapters and head alone), then out/merged.pt: the adapters folded into
    the weights, an ordinary 03_model checkpoint with the head under "classifier". Returns the
    largest difference between the merged model's logits and the adapter model's on a few texts:
    merging must not change what the classifier predicts."""
    save_adapter(clf, out / "adapter.pt")
    idx, mask = make_batch(encode_texts(tok, texts[:32], args.max_len), args.device)
    with torch.no_grad():
        before = clf(idx, mask)
        merge_lora(clf.model)
        diff = float((clf(idx, mask) - before).abs().max())
    common.save_checkpoint({"model": clf.model.state_dict(), "config": vars(base.config).copy(),
                            "classifier": {"head": clf.head.state_dict(), "classes": clf.classes,
                                           "pool": args.pool, "max_len": args.max_len},
                            "base": str(ckpt_path)}, out / "merged.pt")
    return diff


def paired_gain(true, pred_a, pred_b):
    """Accuracy of b minus accuracy of a on the same test items, with a 95% confidence interval.

    Both methods answer the same articles, so only the articles that exactly one of them gets
    right carry evidence (McNemar's idea): with b_only and a_only such articles out of n, the
    difference is (b_only - a_only) / n, with standard error
    sqrt(b_only + a_only - (b_only - a_only)^2 / n) / n. A gain is clear when the whole
    interval lies above zero.
    """
    true, a, b = np.asarray(true), np.asarray(pred_a), np.asarray(pred_b)
    n, a_only, b_only = len(true), int(((a == true) & (b != true)).sum()), int(((b == true) & (a != true)).sum())
    d = (b_only - a_only) / n
    se = math.sqrt(b_only + a_only - (b_only - a_only) ** 2 / n) / n
    return d, d - 1.96 * se, d + 1.96 * se


def compare_methods(results, preds, test_y, model_bytes, out):
    """Add each method's share of full's parameters and of the model's file to its figures, and
    return the issue's targets for LoRA, each with whether it is met (key + "_ok")."""
    ref = results.get("full")
    for r in results.values():
        r["param_share_of_full"] = r["trainable_params"] / ref["trainable_params"] if ref else None
        r["checkpoint_share_of_model"] = r["checkpoint_bytes"] / model_bytes
    targets = {}
    if "lora" in results:
        lo = results["lora"]
        targets["adapter_file_share"] = (out / "adapter.pt").stat().st_size / (out / "merged.pt").stat().st_size
        targets["adapter_file_share_ok"] = targets["adapter_file_share"] < 0.05
        if ref:
            targets["lora_minus_full_points"] = 100 * (lo["accuracy"] - ref["accuracy"])
            targets["lora_minus_full_points_ok"] = targets["lora_minus_full_points"] >= -2
            targets["lora_param_share"] = lo["param_share_of_full"]
            targets["lora_param_share_ok"] = targets["lora_param_share"] < 0.02
        if "head" in results:
            gain, low, high = paired_gain(test_y, preds["head"], preds["lora"])
            targets["lora_gain_over_head_points"] = 100 * gain
            targets["lora_gain_over_head_95ci_low_points"] = 100 * low
            targets["lora_gain_over_head_95ci_low_points_ok"] = low > 0   # a clear gain
    return targets


def report_markdown(report):
    """(the results table, every line of report.md) from report.json's contents."""
    results, targets, args = report["methods"], report["targets"], report["args"]
    full = "full" in results
    mib = lambda b: f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 2**10:.0f} KiB"
    rows = [f"| {m} | {r['accuracy']:.1%} | {r['macro_f1']:.3f} | {r['trainable_params']:,} | "
            + (f"{r['param_share_of_full']:.2%}" if full else "-")
            + f" | {mib(r['checkpoint_bytes'])} | {r['train_seconds']:.0f} s | {mib(r['train_state_bytes'])} | "
            + (mib(r["peak_cuda_bytes"]) if r["peak_cuda_bytes"] else mib(r["peak_rss_bytes"])) + " |"
            for m, r in results.items()]
    mem = "CUDA peak" if report["device"].startswith("cuda") else "peak RSS"
    table = ["| method | accuracy | macro-F1 | trainable params | of full | checkpoint | train time "
             f"| params+grads+AdamW | {mem} |", "|---|---|---|---|---|---|---|---|---|", *rows]
    lines = [f"# Step 8: topic classification, {len(report['classes'])} topics",
             "", f"Base model `{report['base_checkpoint']}`; {report['n_train']} training and {report['n_test']} "
             f"test articles (majority class {report['majority_baseline']:.1%}); {args['steps']} steps x "
             f"{args['batch_size']} for every method; features: {args['pool']} of the final hidden states.",
             "", *table, ""]
    if "head" in results and "lora" in results:
        lines.append(f"Before/after: frozen model + head {results['head']['accuracy']:.1%} -> LoRA "
                     f"{results['lora']['accuracy']:.1%} ({targets['lora_gain_over_head_points']:+.1f} points, "
                     f"95% interval from {targets['lora_gain_over_head_95ci_low_points']:+.1f}).")
    for k, v in targets.items():
        if not k.endswith("_ok"):
            met = f" ({'met' if targets[k + '_ok'] else 'NOT met'})" if k + "_ok" in targets else ""
            lines.append(f"- {k}: {v:.4g}{met}")
    if "merge_max_abs_diff" in report:
        lines.append(f"- merged vs adapter logits, max abs difference: {report['merge_max_abs_diff']:.2e}")
    lines += ["", "![confusion matrices](confusion.png)", "", "![training loss](loss.png)", ""]
    return table, lines


def plot(results, classes, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4.6), squeeze=False)
    short = [c.split()[0][:10] for c in classes]
    for ax, (m, r) in zip(axes[0], results.items()):
        cm = np.array(r["confusion"], dtype=float)
        ax.imshow(cm / np.maximum(cm.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"{m}: acc {r['accuracy']:.1%}", fontsize=10)
        ax.set_xticks(range(len(classes)), short, rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)), short if ax is axes[0][0] else [], fontsize=7)
        ax.set_xlabel("predicted")
    axes[0][0].set_ylabel("true topic (rows sum to 1)")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(out / "confusion.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, r in results.items():
        w = max(1, len(r["losses"]) // 20)   # moving average: batch losses are noisy
        ax.plot(np.convolve(r["losses"], np.ones(w) / w, mode="valid"), label=m)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (moving average)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)


def method_list(text):
    """argparse type of --methods: distinct names from METHODS, comma-separated."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods) or len(set(methods)) != len(methods):
        raise argparse.ArgumentTypeError(f"give distinct names from {','.join(METHODS)}, got {text!r}")
    return methods


def parse_args(argv=None):
    ap = common.ArgumentParser(description="Fine-tune the pretrained GPT as a topic classifier: "
                               "frozen head vs LoRA vs full fine-tuning vs prompt tuning.")
    a = ap.add_argument
    a("--data", default="data", metavar="DIR", help="reads DIR/01_clean, 02_tokenize, 04_train; writes DIR/06_finetune_lora")
    a("--ckpt", default=None, help="base checkpoint (default DIR/04_train/ckpt.pt)")
    a("--methods", type=method_list, default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    # 450 x 16: about one pass over the built-in corpus's training articles. What fewer and more
    # steps gave is in docs/experiments.md (fine-tuning).
    a("--steps", type=common.positive_int, default=450, help="optimizer steps per method (the shared budget)")
    a("--batch-size", type=common.positive_int, default=16)
    a("--max-len", type=common.positive_int, default=None,
      help=f"tokens read from each article (default {MAX_LEN}, less if the model's block is shorter)")
    # Every linear layer at a low rank: spread thin over all layers beat deep in a few, as QLoRA
    # found (docs/experiments.md, "where the adapters go").
    a("--lora-targets", default="all", choices=sorted(LORA_TARGETS))
    a("--lora-r", type=common.positive_int, default=2, help=f"rank of the update B A (scaled by {LORA_ALPHA:g} / r)")
    a("--n-prompt", type=common.positive_int, default=16, help="soft-prompt vectors (prompt tuning)")
    a("--pool", default="mean", choices=["mean", "last", "max"],
      help="features: mean of the text's hidden states, the last one, or their element-wise max")
    a("--max-train", type=common.positive_int, default=None, help="use at most N training articles (random, seeded)")
    a("--max-test", type=common.positive_int, default=None, help="test on at most N articles")
    a("--seed", type=common.natural_int, default=0)
    a("--device", type=common.device_flag, default="auto", help=common.DEVICE_HELP)
    a("--threads", type=common.natural_int, default=0, help="torch threads (0: PyTorch's default)")
    args = ap.parse_args(argv)
    args.device = common.pick_device(args.device)   # auto -> cuda, mps or cpu; says when one is absent
    return args


def run(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data)
    ckpt_path = Path(args.ckpt) if args.ckpt else data / "04_train" / "ckpt.pt"
    tok, base = load_base(data, ckpt_path, args.device)
    args.max_len = fit_max_len(args.max_len, args.n_prompt if "prompt" in args.methods else 0,
                               base.config.block_size)
    train, test, classes = load_articles(data, args.max_train, args.max_test, args.seed)

    out = data / "06_finetune_lora"
    # every file or none; and a folder that cannot be written fails here, before any training
    with common.output_dir(out) as tmp:
        print(f"{len(classes)} topics, {len(train[0])} training and {len(test[0])} test articles; "
              f"{args.steps} steps x {args.batch_size} per method on {args.device}", flush=True)
        results, preds, extra = {}, {}, {}
        for m in args.methods:
            clf, results[m], preds[m] = train_and_score(m, base, tok, train, test, classes, args)
            if m == "lora":
                extra["merge_max_abs_diff"] = save_lora_outputs(clf, tok, test[0], base, args, ckpt_path, tmp)
            del clf
        model_bytes = saved_bytes({"model": base.state_dict(), "config": vars(base.config)})
        targets = compare_methods(results, preds, test[1], model_bytes, tmp)
        report = {"base_checkpoint": str(ckpt_path), "classes": classes, "n_train": len(train[0]),
                  "n_test": len(test[0]), "majority_baseline": max(map(test[1].count, classes)) / len(test[1]),
                  "model_file_bytes": model_bytes, "device": args.device,
                  "args": {**vars(args), "lr": LR, "lora_alpha": LORA_ALPHA, "lora_dropout": LORA_DROPOUT},
                  "methods": results, "targets": targets, **extra}
        (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        plot(results, classes, tmp)
        table, lines = report_markdown(report)
        (tmp / "report.md").write_text("\n".join(lines))

    print()
    print("\n".join(table))
    for line in lines:
        if line.startswith(("Before", "- ")):
            print(line)
    print(f"wrote {out}/ (adapter.pt, merged.pt, report.json, report.md, confusion.png, loss.png)")


def main(argv=None):
    common.main(__file__, run, argv)


if __name__ == "__main__":
    main()
