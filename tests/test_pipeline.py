"""The whole pipeline end to end on tiny settings: every stage runs, hands its files to the
next, and the report card gathers them. (Each stage's own behaviour is tested in its file.)"""
import json
import shutil
import subprocess
import sys

import onnx

from conftest import ROOT, load


def test_pipeline_tiny_end_to_end(tiny_run, tmp_path):
    d = tmp_path / "data"   # a copy: --card below rewrites the card
    shutil.copytree(tiny_run, d)
    # 01 -> 02: the tokenizer's token counts cover exactly the cleaned text
    clean = json.loads((d / "01_clean/stats.json").read_text())
    meta = json.loads((d / "02_tokenize/meta.json").read_text())
    assert meta["train_bytes"] == clean["train"]["bytes"] and meta["val_bytes"] == clean["val"]["bytes"]
    # 03 -> 04: the trained checkpoint has the config 03 wrote, and loads
    model_lib = load("03_model")
    config = json.loads((d / "03_model/config.json").read_text())
    model, ckpt = model_lib.load_model(d / "04_train/ckpt.pt")
    assert {k: ckpt["config"][k] for k in ("n_layer", "n_embd", "vocab_size")} == \
           {k: config[k] for k in ("n_layer", "n_embd", "vocab_size")}
    # 05, 06, 07, 08 read that checkpoint; their outputs load in turn
    assert json.loads((d / "05_eval/report.json").read_text())["models"][0]["path"].endswith("ckpt.pt")
    model_lib.load_model(d / "06_finetune_lora/merged.pt")
    assert "gate" in json.loads((d / "07_safety/report.json").read_text())
    model_lib.load_model(d / "08_export/model_fp16.pt")
    onnx.checker.check_model(str(d / "08_export/model_kv.onnx"))
    # the report card has a section for every stage
    card = (d / "report.md").read_text()
    for section in ("01 clean", "02 tokenize", "03 model", "04 train", "05 eval", "06 fine-tune", "07 safety", "08 export"):
        assert f"## {section}" in card
    # and the picture of its headline figures
    assert (d / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![the headline figures](report.png)" in card
    # --card gathers the same card again from the files alone (only the stage times are gone)
    (d / "report.md").unlink()
    r = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), "--card", "--data", str(d)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (d / "report.md").read_text() == card.split(" Stage times: ")[0] + "\n"
