"""The bad-input matrix: every stage, against each class of user mistake.

One tiny pipeline run (conftest's `tiny_run`) gives a data folder as a user's would be. Each case
copies it, breaks one thing (a flag, a file, the folder itself), and runs one stage as a user
would. Every case must end the same way: exit status 2, no traceback, one line on stderr that
names the file or the flag, and every file that was there before byte-identical afterwards, with
no temporary folder left behind.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
from conftest import ROOT, load, run

pipeline = load("pipeline")
TINY = dict(pipeline.STAGES)


def snapshot(folder):
    """{relative path: sha256} of every file and folder under `folder`."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = os.path.join(root, name)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest() \
                if os.path.isfile(p) else "dir"
    return out


# Each break(d) changes the copied data folder d and returns the arguments to run the stage with.
def flag(*args):
    return lambda d: list(args)


def data_is_a_file(d):
    (d / "not_a_folder").write_text("a file, not a folder\n")
    return ["--data", d / "not_a_folder"]


def make_file(name, content, flag):
    def brk(d):
        (d / name).write_text(content)
        return [flag, d / name]
    return brk


def delete(rel):
    def brk(d):
        (d / rel).unlink()
        return []
    return brk


def write(rel, content):
    def brk(d):
        (d / rel).write_bytes(content)
        return []
    return brk


def odd_bytes(rel):
    def brk(d):
        with open(d / rel, "ab") as f:
            f.write(b"\x01")
        return []
    return brk


def ids_beyond_vocab(rel):
    def brk(d):
        a = np.fromfile(d / rel, dtype=np.uint16)
        a[10] = 60000
        a.tofile(d / rel)
        return []
    return brk


def last_pt_config_mismatch(d):
    p = d / "04_train" / "last.pt"
    state = torch.load(p, weights_only=True)
    state["config"]["n_embd"] *= 2
    torch.save(state, p)
    return ["--resume"]


def small_vocab_checkpoint(d):
    # a model built for fewer tokens than the tokenizer has
    model_lib = load("03_model")
    cfg = model_lib.GPTConfig(vocab_size=128, vocab_used=128, block_size=16, n_layer=1, n_head=2, n_embd=16)
    common.save_checkpoint({"model": model_lib.GPT(cfg).state_dict(), "config": cfg.__dict__}, d / "small.pt")
    return ["--ckpt", d / "small.pt"]


NOT_UTF8 = b'{"text": "caf\xe9 au lait", "source": "x"}\n'
CORRUPT = b"\x00\x01 this is not a checkpoint"

CASES = [   # (stage, case, break, a word the message must contain)
    ("01_clean", "unwritable", data_is_a_file, "not_a_folder"),
    ("01_clean", "missing", flag("--input", "nowhere.txt"), "nowhere.txt"),
    ("01_clean", "corrupt", make_file("bad.jsonl", "{not json\n", "--input"), "bad.jsonl"),
    ("01_clean", "flag", flag("--threshold", "0"), "--threshold"),
    ("02_tokenize", "unwritable", data_is_a_file, "not_a_folder"),
    ("02_tokenize", "missing", delete("01_clean/train.jsonl"), "train.jsonl"),
    ("02_tokenize", "corrupt", write("01_clean/train.jsonl", NOT_UTF8), "train.jsonl"),
    ("02_tokenize", "flag", flag("--vocab-size", "100"), "--vocab-size"),
    ("02_tokenize", "missing", flag("--tokenizer", "nowhere"), "nowhere"),
    ("03_model", "unwritable", data_is_a_file, "not_a_folder"),
    ("03_model", "corrupt", write("02_tokenize/meta.json", b"{not json"), "meta.json"),
    ("03_model", "corrupt", write("02_tokenize/meta.json", b'{"vocab_size": -5}'), "meta.json"),
    ("03_model", "flag", flag("--n-head", "3"), "--n-head"),
    ("03_model", "flag", flag("--dropout", "2"), "--dropout"),
    ("04_train", "unwritable", data_is_a_file, "not_a_folder"),
    ("04_train", "missing", delete("02_tokenize/train.bin"), "train.bin"),
    ("04_train", "corrupt", odd_bytes("02_tokenize/val.bin"), "val.bin"),
    ("04_train", "corrupt", ids_beyond_vocab("02_tokenize/train.bin"), "train.bin"),
    ("04_train", "corrupt", last_pt_config_mismatch, "last.pt"),
    ("04_train", "flag", flag("--threads", "-1"), "--threads"),
    ("04_train", "flag", flag("--lr", "-1"), "--lr"),
    ("05_eval", "unwritable", data_is_a_file, "not_a_folder"),
    ("05_eval", "missing", delete("04_train/ckpt.pt"), "ckpt.pt"),
    ("05_eval", "corrupt", write("04_train/ckpt.pt", CORRUPT), "ckpt.pt"),
    ("05_eval", "corrupt", odd_bytes("02_tokenize/val.bin"), "val.bin"),
    ("05_eval", "corrupt", ids_beyond_vocab("02_tokenize/train.bin"), "train.bin"),
    ("05_eval", "flag", flag("--seed", "-1"), "--seed"),
    ("06_finetune_lora", "unwritable", data_is_a_file, "not_a_folder"),
    ("06_finetune_lora", "corrupt", write("01_clean/train.jsonl", NOT_UTF8), "train.jsonl"),
    ("06_finetune_lora", "corrupt", write("04_train/ckpt.pt", CORRUPT), "ckpt.pt"),
    ("06_finetune_lora", "flag", flag("--seed", "-1"), "--seed"),
    ("07_safety", "unwritable", data_is_a_file, "not_a_folder"),
    ("07_safety", "corrupt", small_vocab_checkpoint, "small.pt"),
    ("07_safety", "corrupt", make_file("s.jsonl", '{"prompt": "hi"}\n', "--prompts"), "s.jsonl"),
    ("07_safety", "flag", flag("--threads", "-1"), "--threads"),
    ("08_export", "unwritable", lambda d: data_is_a_file(d) + ["--ckpt", d / "04_train" / "ckpt.pt"], "not_a_folder"),
    ("08_export", "corrupt", write("04_train/ckpt.pt", CORRUPT), "ckpt.pt"),
    ("08_export", "corrupt", odd_bytes("02_tokenize/val.bin"), "val.bin"),
    ("08_export", "flag", flag("--seed", "-1"), "--seed"),
    ("08_export", "flag", flag("--prompt-len", "1000"), "--prompt-len"),
]


@pytest.mark.parametrize("stage, kind, brk, needle", CASES,
                         ids=[f"{s}-{k}-{n}" for s, k, _, n in CASES])
def test_bad_input_exits_2_and_changes_nothing(tiny_run, tmp_path, stage, kind, brk, needle):
    d = tmp_path / "data"
    shutil.copytree(tiny_run, d)
    args = brk(d)
    before = snapshot(d)
    if "--data" not in args:
        args = ["--data", d, *args]
    r = run(stage, *TINY[stage], *args, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{stage}.py: ") and needle in lines[0], r.stderr[-3000:]
    assert snapshot(d) == before   # nothing written, nothing half-written, no temporary folder


@pytest.mark.parametrize("stage", [s for s, _ in pipeline.STAGES])
def test_read_only_data_fails_before_the_work(tiny_run, tmp_path, stage):
    d = tmp_path / "data"
    shutil.copytree(tiny_run, d)
    before = snapshot(d)
    cmd = [sys.executable, str(ROOT / f"{stage}.py"), *TINY[stage], "--data", str(d)]
    if os.geteuid() == 0:   # root writes into read-only folders; give up that power first
        if not shutil.which("setpriv"):
            pytest.skip("running as root, and no setpriv to drop root's power over permissions")
        cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", *cmd]
    os.chmod(d, 0o555)
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        os.chmod(d, 0o755)
    if r.stderr.startswith("setpriv:"):
        pytest.skip(f"setpriv cannot drop root's power here: {r.stderr.strip()}")
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr and str(d) in lines[0], r.stderr[-3000:]
    assert snapshot(d) == before
