"""Tests for common.py: the interval against published values, the one error path, the
output-folder swap and the argparse types."""
import subprocess
import sys

import pytest

import common


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
