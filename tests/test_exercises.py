"""Tests for exercises.py: `make` blanks exactly the chosen bodies and nothing else, the same
bytes every time, for every stage (text and ast only, no test run); and the grader works, on one
quick stage: the real script passes `check`, a fresh exercise fails it on the tests of the
functions it blanked, `--only` grades one exercise alone, and putting the real bodies back
makes the file pass again."""
import ast
import re

import pytest

from conftest import ROOT, load, run

ex = load("exercises")
STAGES = list(ex.EXERCISES)


def original(stage):
    return (ROOT / f"{stage}.py").read_text(encoding="utf-8")


def put_back(exercise, source, stage):
    """The exercise with every real body spliced back in."""
    return splice(exercise, source, stage, list(ex.EXERCISES[stage]))


def splice(exercise, source, stage, names):
    """The exercise with the real bodies of the functions `names` spliced back in, found by ast
    alone (not by exercises.body_span): the TODO block above each raise gives way to the body."""
    tree_e, tree_o = ast.parse(exercise), ast.parse(source)
    lines_e, lines_o = exercise.splitlines(keepends=True), source.splitlines(keepends=True)
    cuts = []
    for qualname in names:
        fe, fo = ex.find_function(tree_e, qualname), ex.find_function(tree_o, qualname)
        if not isinstance(fe.body[-1], ast.Raise):
            continue   # put back already
        end = fe.end_lineno   # the raise
        start = end
        while lines_e[start - 2].lstrip().startswith(("# TODO: ", "#       ")):
            start -= 1
        assert lines_e[start - 1].lstrip().startswith("# TODO: "), qualname
        # the lines above the block are the script's, so its body starts at the same offset from the def
        first_o = fo.lineno + (start - fe.lineno)
        cuts.append((start, end, lines_o[first_o - 1:fo.end_lineno]))
    for start, end, body in sorted(cuts, reverse=True):
        lines_e[start - 1:end] = body
    return "".join(lines_e)


def test_every_stage_has_exercises_on_functions_of_its_script():
    assert STAGES == ["01_clean", "02_tokenize", "03_model", "04_train", "05_eval", "06_finetune_lora",
                      "07_safety", "08_export"]
    for stage, items in ex.EXERCISES.items():
        tree = ast.parse(original(stage))
        assert len(items) >= 2, stage
        for qualname, todo in items.items():
            assert ex.find_function(tree, qualname) is not None, f"{stage}: {qualname}"
            assert 20 < len(todo) < 600 and "\n" not in todo, f"{stage}: {qualname}"


@pytest.mark.parametrize("stage", STAGES)
def test_make_blanks_the_chosen_bodies_and_keeps_everything_else(stage):
    source, exercise = original(stage), ex.make_exercise(stage)
    assert exercise == ex.make_exercise(stage)   # deterministic
    tree_e, tree_o = ast.parse(exercise), ast.parse(source)
    lines = exercise.splitlines()
    for qualname, todo in ex.EXERCISES[stage].items():
        fe, fo = ex.find_function(tree_e, qualname), ex.find_function(tree_o, qualname)
        # the signature, decorators and docstring are the script's
        assert ast.dump(fe.args) == ast.dump(fo.args), qualname
        assert [ast.dump(d) for d in fe.decorator_list] == [ast.dump(d) for d in fo.decorator_list]
        assert (fe.returns and ast.dump(fe.returns)) == (fo.returns and ast.dump(fo.returns))
        doc = ast.get_docstring(fo, clean=False)
        assert ast.get_docstring(fe, clean=False) == doc, qualname
        # and the body is the raise alone, under the TODO of the table
        body = fe.body[1:] if doc is not None else fe.body
        assert len(body) == 1 and isinstance(body[0], ast.Raise), qualname
        assert ast.unparse(body[0]) == f"raise NotImplementedError('exercise: {qualname}')"
        comments = []
        for line in reversed(lines[:body[0].lineno - 1]):
            if not line.lstrip().startswith("#"):
                break
            comments.insert(0, line.strip().lstrip("#").strip())
        assert " ".join(comments) == f"TODO: {todo}", qualname
        assert all(len(lines[i]) <= 100 for i in range(body[0].lineno - 1 - len(comments), body[0].lineno))
    # every other byte is the script's: putting the real bodies back gives the script exactly
    assert put_back(exercise, source, stage) == source
    compile(exercise, stage, "exec")


def test_make_writes_the_file_and_never_overwrites_work(tmp_path, capsys):
    out = tmp_path / "ex"
    ex.main(["make", "01", "05_eval", "--out", str(out)])
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == ["01_clean.py", "05_eval.py"]
    assert first["01_clean.py"] == ex.make_exercise("01_clean").encode()
    (out / "01_clean.py").write_text("a student's work\n")
    (out / "05_eval.py").unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        ex.main(["make", "05", "01", "--out", str(out)])   # refused before anything is written
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "01_clean.py: exists" in err and "--force" in err
    assert (out / "01_clean.py").read_text() == "a student's work\n" and not (out / "05_eval.py").exists()
    ex.main(["make", "01", "--out", str(out), "--force"])
    assert (out / "01_clean.py").read_bytes() == first["01_clean.py"]
    # as a script, too
    r = run("exercises", "make", "03", "--out", out)
    assert r.returncode == 0 and (out / "03_model.py").read_text() == ex.make_exercise("03_model"), r.stderr


@pytest.mark.parametrize("argv,needle", [
    (["make", "09"], "09: no such stage"),
    (["check", "model"], "model: no such stage"),
    (["check", "01", "no/such/file.py"], "no/such/file.py: not found"),
    (["make"], "required"),
    (["check", "01", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_usage_errors_exit_2_with_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        ex.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and needle in err, err


def test_copy_without_git_has_what_the_tests_need(monkeypatch):
    with_git = set(ex.repo_files())
    def no_git(*a, **k):
        raise OSError("git: not found")
    monkeypatch.setattr(ex.subprocess, "run", no_git)
    without = set(ex.repo_files())
    needed = {f"{s}.py" for s in STAGES} | {"common.py", "tests/conftest.py", "data/safety/suite.jsonl"}
    assert needed <= with_git and needed <= without
    assert not any(f.startswith((".venv", "exercises/")) or "__pycache__" in f for f in without)


# The grading loop, on 01_clean: the tests of its three exercises plus one that none touches.
TESTS = "quality or minhash or near_dedup or html_to_text"


def check(file, *options):
    r = run("exercises", "check", "01", file, "--tests", TESTS, *options)
    outcome = {name: mark for mark, name in
               re.findall(r"^  (pass|FAIL|skip)  (.+?)(?:  \(.*\))?$", r.stdout, re.M)}
    return r, outcome


def test_grader_passes_the_script_fails_the_exercise_and_passes_the_bodies_put_back(tmp_path):
    source = original("01_clean")
    r, outcome = check(ROOT / "01_clean.py")
    assert r.returncode == 0, r.stdout + r.stderr
    n = len(outcome)
    assert n >= 10 and set(outcome.values()) == {"pass"} and f"{n} of {n} tests pass" in r.stdout

    exercise = tmp_path / "01_clean.py"
    ex.main(["make", "01", "--out", str(tmp_path)])
    r, outcome = check(exercise)
    assert r.returncode == 1 and f"1 of {n} tests pass" in r.stdout, r.stdout + r.stderr
    assert outcome.pop("test_html_to_text_drops_scripts_styles_comments_and_unescapes") == "pass"
    assert set(outcome.values()) == {"FAIL"}
    for name in ("quality_problem", "minhash", "near_dedup"):
        assert f"(NotImplementedError: exercise: {name})" in r.stdout

    # one exercise done: its tests pass, the others' still fail; graded alone, it passes
    exercise.write_text(splice(exercise.read_text(), source, "01_clean", ["quality_problem"]))
    r, outcome = check(exercise)
    assert r.returncode == 1
    assert all(m == ("pass" if "quality" in t or "html" in t else "FAIL")
               for t, m in outcome.items()), outcome
    r, outcome = check(exercise, "--only", "quality_problem")
    assert r.returncode == 0 and f"{n} of {n} tests pass" in r.stdout, r.stdout + r.stderr
    r, outcome = check(exercise, "--only", "minhash")   # the brute-force test signs with minhash
    assert r.returncode == 1 and {t for t, m in outcome.items() if m == "FAIL"} == \
        {t for t in outcome if "minhash" in t or "brute_force" in t}, outcome

    exercise.write_text(put_back(exercise.read_text(), source, "01_clean"))
    assert exercise.read_text() == source
    r, outcome = check(exercise)
    assert r.returncode == 0 and f"{n} of {n} tests pass" in r.stdout, r.stdout + r.stderr
