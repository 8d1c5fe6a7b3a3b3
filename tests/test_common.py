"""Tests for common.py: the interval against published values, the one error path, the
output-folder swap, the argparse types, and --device (the same flag in every stage)."""
import subprocess
import sys

import pytest
import torch

import common
from conftest import load


def test_wilson_matches_published_values():
    # Wilson (1927) score intervals as tabulated by Newcombe (1998), Stat. Med. 17:857, table I,
    # and the textbook 50/100 -> (0.4038, 0.5962)
    for (k, n), ref in {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605), (0, 20): (0.0, 0.1611),
                        (1, 29): (0.0061, 0.1718), (50, 100): (0.4038, 0.5962)}.items():
        lo, hi = common.wilson(k, n)
        assert abs(lo - ref[0]) < 1e-4 and abs(hi - ref[1]) < 1e-4, (k, n, lo, hi)
    assert common.wilson(0, 10)[0] == 0.0 and common.wilson(10, 10)[1] == 1.0   # exact at the edges
    assert common.wilson(0, 0) == (None, None)


def run_main(tmp_path, body):
    """Run common.main on a run() with `body`, in a fresh process; returns the CompletedProcess."""
    code = f"import sys; sys.path.insert(0, {str(common.__file__.rsplit('/', 1)[0])!r})\n" \
           f"import common\ndef run(argv):\n    {body}\ncommon.main('stage.py', run, [])\n"
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)


@pytest.mark.parametrize("body, status, line", [
    ("raise common.UserError('data/x.json: not\\nfound')", 2, "stage.py: data/x.json: not found"),
    ("open('missing.txt')", 2, "stage.py: missing.txt: No such file or directory"),
    ("common.ArgumentParser().parse_args(['--x'])", 2, "stage.py: unrecognized arguments: --x"),
    ("return 1", 1, None),
    ("return None", 0, None),
])
def test_main_turns_a_users_mistake_into_one_line_and_exit_2(tmp_path, body, status, line):
    r = run_main(tmp_path, body)
    assert r.returncode == status and "Traceback" not in r.stderr
    assert r.stderr.strip() == (line or "")


def test_argparse_types_name_the_flag():
    ap = common.ArgumentParser()
    ap.add_argument("--n", type=common.positive_int)
    ap.add_argument("--f", type=common.fraction)
    assert ap.parse_args(["--n", "3", "--f", "0.5"]).n == 3
    for args, words in ((["--n", "0"], "--n"), (["--n", "x"], "--n"), (["--f", "1.5"], "--f"), (["--f", "nan"], "--f")):
        with pytest.raises(common.UserError, match=words):
            ap.parse_args(args)


def test_output_dir_swaps_in_when_done_and_keeps_the_old_one_on_error(tmp_path):
    out = tmp_path / "05_eval"
    with common.output_dir(out) as tmp:
        (tmp / "report.json").write_text("new")
    assert (out / "report.json").read_text() == "new"
    with pytest.raises(RuntimeError):
        with common.output_dir(out) as tmp:
            (tmp / "report.json").write_text("half")
            raise RuntimeError("crash in the middle")
    assert (out / "report.json").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["05_eval"]
    (tmp_path / "file").write_text("")
    with pytest.raises(common.UserError, match="file"):
        with common.output_dir(tmp_path / "file" / "05_eval"):
            pass


# ----------------------------------------------------------------------------- --device

def gpus(monkeypatch, cuda, mps):
    """Pretend this machine has (or lacks) CUDA and Apple's MPS."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(),
                    reason="needs a machine without a GPU")
def test_auto_is_the_cpu_on_a_machine_without_a_gpu():
    assert common.pick_device("auto") == common.pick_device() == "cpu"


def test_pick_device_prefers_cuda_then_mps_then_the_cpu(monkeypatch):
    for cuda, mps, want in ((True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")):
        gpus(monkeypatch, cuda, mps)
        assert common.pick_device("auto") == want
    assert common.pick_device("cpu") == "cpu"   # asked for by name: never replaced


@pytest.mark.parametrize("name, line", [("mps", "--device mps: no Apple MPS device is available"),
                                        ("cuda", "--device cuda: no CUDA device is available"),
                                        ("cuda:1", "--device cuda:1: no CUDA device is available")])
def test_an_absent_device_is_a_one_line_user_error(monkeypatch, name, line):
    gpus(monkeypatch, False, False)
    with pytest.raises(common.UserError) as e:
        common.pick_device(name)
    assert str(e.value) == line


@pytest.mark.parametrize("stage", ["04_train", "05_eval", "06_finetune_lora", "07_safety", "08_export"])
def test_every_stage_takes_the_same_device_flag(stage, capsys):
    parse = load(stage).parse_args
    with pytest.raises(SystemExit):
        parse(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--device DEVICE" in help_text and "auto, cpu, cuda, cuda:N or mps (default auto:" in help_text
    with pytest.raises(common.UserError, match="--device.*expected auto, cpu, cuda, cuda:N or mps, got 'tpu'"):
        parse(["--device", "tpu"])


def test_parallel_map_keeps_order_reads_lazily_and_raises_worker_errors():
    for workers in (1, 2):
        assert list(common.parallel_map(str, range(30), workers)) == [str(i) for i in range(30)]
    taken = []

    def items():
        for i in range(1000):
            taken.append(i)
            yield i
    first = next(common.parallel_map(abs, items(), 2))
    assert first == 0 and len(taken) <= 2 * 2 + 1   # bounded: never the whole stream ahead
    with pytest.raises(ValueError):
        list(common.parallel_map(int, ["1", "x", "3"], 2))
