"""Every command with every kind of bad input: exit status 2, exactly one ``error:`` line that names the
problem and the fix, no traceback, nothing left behind, and (where the input can be judged without the
model) a refusal before the model loads.

Fail-fast is checked by ordering, not timing: most cases name a model path that does not exist, so a
message about the bad option (and not about the model) proves that the option was checked first.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
import typer.main
from typer.testing import CliRunner

from declens.cli import app

runner = CliRunner()
NO_MODEL = "./no/such/model-dir"  # loading it fails: an error about anything else came first

COMMANDS = {name: cmd for name, cmd in typer.main.get_command(app).commands.items()}


def _options(command: str) -> set[str]:
    return {o for p in COMMANDS[command].params for o in p.opts if o.startswith("--")}


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _fill(args: list[str], env: dict) -> list[str]:
    return [a.format(**env) for a in args]


@pytest.fixture
def env(tmp_path, model_dir):
    """Paths the cases refer to: a fresh output folder, an existing file and folder, bad data files."""
    (tmp_path / "a_file").write_text("not a folder\n")
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "full_dir").mkdir()
    (tmp_path / "full_dir" / "x.txt").write_text("x")
    (tmp_path / "latin1.jsonl").write_bytes('{"q": "caf\u00e9", "c": ["a", "b"], "g": 0}\n'.encode("latin-1"))
    (tmp_path / "latin1.csv").write_bytes("q,c,g\nna\u00efve,a|b,0\n".encode("latin-1"))
    (tmp_path / "latin1.json").write_bytes('[{"q": "\u00e9t\u00e9", "c": ["a", "b"], "g": 0}]'.encode("latin-1"))
    rows = [{"q": f"Question {i}?", "c": ["yes", "no"], "g": i % 2} for i in range(2)]
    (tmp_path / "two_rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": NO_MODEL, "tiny": str(model_dir), "out": str(tmp_path / "out"), "file": str(tmp_path / "a_file"),
            "dir": str(tmp_path / "a_dir"), "full": str(tmp_path / "full_dir"), "tmp": str(tmp_path)}


def assert_clean_error(r, command: str, *fragments: str, fix: str | None = None) -> str:
    """Exit 2, one ``error:`` line (the last line) holding every fragment, no traceback; every option the
    message suggests exists (on this command, or on the command it points to)."""
    out = r.output
    assert r.exit_code == 2, out
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in out
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, out
    line = errors[0]
    assert out.rstrip().splitlines()[-1] == line, out  # nothing after it; one line, never wrapped
    for f in fragments:
        assert f in line, f"{f!r} not in {line!r}"
    if fix is not None:
        assert fix in line.split(";", 1)[-1], f"fix {fix!r} not after the problem in {line!r}"
    pointed = set(re.findall(r"'declens (\w+)", line))
    known = _options(command).union(*(_options(c) for c in pointed if c in COMMANDS))
    suggested = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z]", line))
    assert suggested <= known, f"{line!r} suggests {sorted(suggested - known)}, which 'declens {command}' lacks"
    return line


def run_case(args: list[str], env: dict, tmp_path: Path):
    before = _files(tmp_path)
    r = runner.invoke(app, _fill(args, env))
    assert _files(tmp_path) == before, f"left behind: {sorted(_files(tmp_path) - before)}"
    return r


# --------------------------------------------------------------------------------------------------
# Output locations (checked before any work)

WRITERS = {  # command -> the arguments it needs besides --out (with a model that does not exist)
    "analyze": ["--model", "{model}", "--task", "arc_easy"],
    "prune": ["--model", "{model}", "--task", "arc_easy"],
    "eval": ["--model", "{model}", "--tasks", "piqa"],
    "ablate": ["--model", "{model}", "--tasks", "piqa"],
    "cka": ["--model", "{model}", "--task", "arc_easy", "--remove", "1"],
    "noise": ["--model", "{model}", "--task", "arc_easy"],
    "recover": ["--model", "{model}", "--task", "arc_easy", "--remove", "1"],
    "export": ["--model", "{model}", "--remove", "1"],
    "correlate": ["{dir}"],
    "demo": [],
}
BAD_OUT = [
    ("{file}", ("is an existing file", "{file}"), "choose a new folder"),
    ("{file}/sub", ("lies below", "which is a file"), "choose another path"),
    ("/proc/declens-test/out", ("cannot be written",), "choose a writable location"),
]


@pytest.mark.parametrize("command", sorted(WRITERS))
@pytest.mark.parametrize("out, problem, fix", BAD_OUT, ids=["existing-file", "below-a-file", "unwritable"])
def test_output_location_refused_before_work(command, out, problem, fix, env, tmp_path):
    if out.startswith("/proc") and not Path("/proc").is_dir():
        pytest.skip("needs /proc for a path no one can write")
    if command == "export" and out == "{file}":
        problem = ("is a file",)  # export's own check, before the writability one
        fix = "choose a new --out folder"
    r = run_case([command, *WRITERS[command], "--out", out], env, tmp_path)
    assert_clean_error(r, command, *(p.format(**env) for p in problem), fix=fix)


def test_report_out_is_a_file_path(env, tmp_path):
    r = run_case(["report", "{dir}", "--out", "{dir}"], env, tmp_path)
    assert_clean_error(r, "report", "is an existing folder", fix="give the path of the file to write")
    r = run_case(["report", "{dir}", "--out", "{file}/page.html"], env, tmp_path)
    assert_clean_error(r, "report", "lies below", fix="choose another path")


def test_export_and_recover_export_dir(env, tmp_path):
    r = run_case(["export", "--model", "{model}", "--remove", "1", "--out", "{full}"], env, tmp_path)
    assert_clean_error(r, "export", "not empty", fix="choose a new --out folder")
    r = run_case(["recover", *WRITERS["recover"], "--export-dir", "{file}", "--out", "{out}"], env, tmp_path)
    assert_clean_error(r, "recover", "--export-dir", "existing file", fix="choose a new folder")


def test_bad_output_fails_before_scoring(env, tmp_path):
    """With a real model: the existing-file --out is refused before the model loads (no progress bars)."""
    r = run_case(["analyze", "--model", "{tiny}", "--task", "arc_easy", "--limit", "3", "--out", "{file}"], env, tmp_path)
    assert_clean_error(r, "analyze", "is an existing file")
    assert "Loading weights" not in r.output and "arc_easy/letter" not in r.output


# --------------------------------------------------------------------------------------------------
# Option values and combinations, refused before the model loads

M = ["--model", "{model}"]
OPTION_CASES = [
    # (command args, fragments of the problem, fragment of the fix)
    (["analyze", *M, "-t", "arc_easy", "--seed", "-1"], ["--seed", "-1", "same rows as 1"], "--seed 0"),
    (["prune", *M, "-t", "arc_easy", "--seed", "-3"], ["--seed", "-3"], "--seed 0"),
    (["eval", *M, "--tasks", "piqa", "--seed", "-1"], ["--seed"], "--seed 0"),
    (["ablate", *M, "--tasks", "piqa", "--seed", "-1"], ["--seed"], "--seed 0"),
    (["cka", *M, "--remove", "1", "--seed", "-1"], ["--seed"], "--seed 0"),
    (["noise", *M, "--seed", "-1"], ["--seed"], "--seed 0"),
    (["recover", *M, "--remove", "1", "--seed", "-1"], ["--seed"], "--seed 0"),
    (["analyze", *M, "-t", "mmlu", "-k", "6"], ["--num-fewshot 6", "5 solved examples for subject"], "--num-fewshot 5 or less"),
    (["cka", *M, "-t", "mmlu", "--remove", "1", "-n", "10", "-k", "7"], ["--num-fewshot 7", "dev split has 5"], "--num-fewshot 5 or less"),
    (["noise", *M, "-t", "mmlu", "-n", "5", "-k", "9"], ["--num-fewshot 9"], "--num-fewshot 5 or less"),
    (["analyze", *M, "-t", "piqa", "-k", "2"], ["has no few-shot split"], "--num-fewshot 0"),
    (["analyze", *M, "-t", "arc_easy", "--split", "train", "-k", "1"], ["is the evaluated split 'train'"], "another split"),
    (["analyze", *M, "-t", "arc_easy", "-k", "-1"], ["--num-fewshot", ">= 0"], None),
    (["cka", *M, "--remove", "1", "-n", "2"], ["at least 3 rows", "got 2"], "--limit 3 or more"),
    (["cka", *M, "--remove", "1", "-n", "1"], ["at least 3 rows", "got 1"], "--limit 3 or more"),
    (["cka", *M, "--remove", "1", "-t", "{tmp}/two_rows.jsonl", "--fields", "question=q,choices=c,gold=g"],
     ["at least 3 rows", "holds only 2 rows"], "larger task"),
    (["recover", *M, "--remove", "1", "--train-samples", "0"], ["--train-samples", "got 0"], None),
    (["analyze", *M, "-t", "arc_easy", "--limit", "0"], ["--limit", "got 0"], None),
    (["demo", "--limit", "0"], ["--limit", "got 0"], None),
    (["analyze", *M, "-t", "arc_easy", "--max-tokens", "0"], ["--max-tokens", "got 0"], None),
    (["analyze", *M, "-t", "arc_easy", "--format", "essay"], ["unknown format 'essay'"], "letter, cloze"),
    (["prune", *M, "-t", "arc_easy", "--format", "essay"], ["unknown format 'essay'"], "letter, cloze"),
    (["eval", *M, "--formats", "letter,essay"], ["unknown format 'essay'"], "letter, cloze"),
    (["analyze", *M, "-t", "arc_easy", "--decision-score", "z"], ["--decision-score", "'z'"], "raw or norm"),
    (["analyze", *M, "-t", "arc_easy", "--lens-layers", "top"], ["--lens-layers", "'top'"], "comma-separated integers"),
    (["analyze", *M, "-t", "arc_easy", "--remove", "a,b"], ["--remove", "bad layer id 'a'"], "comma-separated integers"),
    (["export", *M, "--remove", "x", "--out", "{out}"], ["--remove", "bad layer id 'x'"], "comma-separated integers"),
    (["eval", *M, "--remove", "2,2"], ["--remove '2,2' lists layer(s) 2 more than once"], "list each once"),
    (["cka", *M, "--remove", "-1"], ["--remove '-1'", "count from 0"], "dense ids"),
    (["noise", *M, "--layers", "1-3,2"], ["--layers", "more than once"], "list each once"),
    (["analyze", *M, "-t", "arc_easy", "-f", "cloze", "--labels", "1,2,3,4"], ["--labels", "letter format"], "drop it"),
    (["analyze", *M, "-t", "arc_easy", "--labels", "A,A,B,C"], ["--labels 'A,A,B,C' must be distinct"], "1,2,3,4"),
    (["analyze", *M, "-t", "arc_easy", "--labels", "A,B"], ["gives 2 labels", "has rows with"], "give at least"),
    (["analyze", *M, "-t", "arc_easy", "--decision-score", "norm"], ["--decision-score norm", "cloze"], "--format cloze"),
    (["noise", *M, "--decision-score", "norm"], ["--decision-score norm"], "--format cloze"),
    (["analyze", *M, "-t", "arc_easy", "--dtype", "fp8"], ["unknown --dtype 'fp8'"], "float32"),
    (["analyze", *M, "-t", "arc_easy", "--device", "tpu9"], ["unknown device 'tpu9'"], "--device"),
    (["analyze", *M, "-t", "arc_easy", "--device-map", "everywhere"], ["unknown --device-map 'everywhere'"], "auto"),
    (["analyze", *M, "-t", "arc_easy", "--max-memory", "2GiB"], ["only applies with device_map"], "--device-map auto"),
    (["analyze", *M, "-t", "arc_easy", "--fields", "question=q,choices=c,gold=g"], ["bundled task"], "drop --fields"),
    (["analyze", *M, "-t", "arc_hard"], ["unknown task 'arc_hard'"], "arc_challenge"),
    (["analyze", *M, "-t", "arc_easy", "--split", "dev"], ["has no split 'dev'"], "test, validation, train"),
    (["analyze", *M, "-t", "arc_easy", "--subjects", "astronomy"], ["has no subjects"], "mmlu"),
    (["analyze", *M, "-t", "{tmp}/missing.jsonl", "--fields", "question=q,choices=c,gold=g"], ["does not exist"], "check the path"),
    (["noise", *M, "-t", "{tmp}/two_rows.jsonl"], ["needs a field mapping"], "--fields"),
    (["noise", *M, "--scales", "0,x"], ["bad noise scales"], "comma-separated numbers"),
    (["noise", *M, "--repeats", "0"], ["--repeats", "got 0"], None),
    (["noise", *M, "--layers", ""], ["--layers is empty"], "leave it out"),
    (["prune", *M, "--method", "magic"], ["unknown pruning method(s) magic"], "ip, shortgpt"),
    (["prune", *M, "--method", "ip,ip"], ["names a method more than once"], "list each once"),
    (["prune", *M, "--method", "replay"], ["replay replays a removal order"], "--order"),
    (["prune", *M, "--order", "3,2"], ["--order is the removal order of --method replay"], "drop --order"),
    (["prune", *M, "--max-ratio", "1.2"], ["--max-ratio", "strictly between 0 and 1"], None),
    (["prune", *M, "--calib-samples", "0"], ["--calib-samples", "got 0"], None),
    (["prune", *M, "--collapse-keep", "2"], ["--collapse-keep", "[0, 1)"], None),
    (["prune", *M, "--calib-task", "nosuch"], ["unknown task 'nosuch' in --calib-task"], "arc_challenge"),
    (["prune", *M, "--calib-from-eval", "--calib-task", "piqa"], ["--calib-from-eval"], "drop --calib-task"),
    (["eval", *M, "--tasks", "foo"], ["unknown task 'foo' in --tasks"], "arc_challenge"),
    (["eval", *M, "--tasks", "{tmp}/two_rows.jsonl"], ["bundled task names", "not your own data"], "declens analyze --task FILE --fields"),
    (["eval", *M, "--tasks", "piqa,piqa"], ["names a task more than once"], "list each once"),
    (["eval", *M, "--remove", "1", "--remove", "1"], ["--remove 1 is given twice"], "list each configuration once"),
    (["eval", *M, "--no-dense"], ["nothing to evaluate"], "--remove"),
    (["ablate", *M, "--tasks", "foo"], ["unknown task 'foo' in --tasks"], "arc_challenge"),
    (["ablate", *M, "--task", "foo", "--tasks", "piqa"], ["unknown task 'foo' in --task"], "arc_challenge"),
    (["ablate", *M, "--window", "-1"], ["--window", "got -1"], None),
    (["ablate", *M, "--tp", "-2"], ["--tp", "got -2"], None),
    (["recover", *M, "--remove", "1", "--epochs", "0"], ["epochs=0"], None),
    (["recover", *M, "--remove", "1", "--schedule", "zigzag"], ["schedule 'zigzag'"], "linear, cosine, constant"),
    (["recover", *M, "--remove", "1", "--ft-method", "magic"], ["fine-tuning method 'magic'"], "lora"),
    (["recover", *M, "--remove", "1", "--task", "{tmp}/two_rows.jsonl"], ["bundled task names"], "declens analyze"),
    (["recover", *M, "--remove", "1", "--train-split", "dev", "-t", "arc_easy"], ["--train-split 'dev'"], "pick one"),
    (["recover", *M, "--remove", "1", "--ratios", "0.5"], ["--ratios selects states of a prune run"], "--from-prune"),
    (["recover", *M], ["--remove (repeatable) or --from-prune"], None),
    (["recover", *M, "--from-prune", "{dir}", "--ratios", "1.5"], ["--ratios", "strictly between 0 and 1"], None),
    (["recover", *M, "--from-prune", "{dir}"], ["holds no prune.json"], "declens prune"),
    (["correlate", "{dir}", "--method", "magic"], ["unknown pruning method(s) magic"], "ip"),
    (["correlate", "{tmp}/nowhere"], ["does not exist"], None),
    (["report", "{tmp}/nowhere", "--out", "{tmp}/r.html"], ["does not exist"], None),
    (["presets", "--fetch", "smollm3"], ["unknown preset 'smollm3'"], "smollm2-135m"),
    (["export", *M, "--out", "{out}"], ["--remove 24,23 or a prune run with --from-prune"], None),
]


@pytest.mark.parametrize("args, problem, fix", OPTION_CASES, ids=[" ".join(c[0][:1] + c[0][3:5]) for c in OPTION_CASES])
def test_bad_option_refused_before_the_model_loads(args, problem, fix, env, tmp_path):
    args = args if args[0] in ("demo", "presets", "correlate", "report") or "--out" in args else [*args, "--out", "{out}"]
    r = run_case(args, env, tmp_path)
    line = assert_clean_error(r, args[0], *(p.format(**env) for p in problem), fix=fix.format(**env) if fix else None)
    assert "no/such/model-dir" not in line  # the option was judged before the model


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for hosts without a GPU")
@pytest.mark.parametrize("command", ["analyze", "prune", "eval", "ablate", "cka", "noise", "recover", "export"])
def test_device_map_without_gpus_is_refused(command, env, tmp_path):
    args = [command, *WRITERS[command], "--device-map", "auto", "--out", "{out}"]
    r = run_case(args, env, tmp_path)
    assert_clean_error(r, command, "--device-map", "no GPU is visible", fix="--device cpu")


# --------------------------------------------------------------------------------------------------
# Data files


@pytest.mark.parametrize("name", ["latin1.jsonl", "latin1.csv", "latin1.json"])
@pytest.mark.parametrize("command", ["analyze", "noise"])
def test_data_file_that_is_not_utf8(name, command, env, tmp_path):
    r = run_case([command, *M, "-t", f"{{tmp}}/{name}", "--fields", "question=q,choices=c,gold=g", "--out", "{out}"],
                 env, tmp_path)
    assert_clean_error(r, command, name, "not UTF-8", "line", fix="save the file as UTF-8")


def test_csv_with_a_byte_order_mark_loads(tmp_path):
    from declens.tasks import load_task

    p = tmp_path / "excel.csv"
    p.write_bytes("\ufeffquestion,choices,gold\nIs it?,yes|no,0\nIs it not?,yes|no,1\n".encode("utf-8"))
    data = load_task(str(p), fields="question=question,choices=choices,gold=gold")
    assert [it.question for it in data.items] == ["Is it?", "Is it not?"] and data.items[1].gold == 1


def test_error_message_with_square_brackets_is_printed_verbatim(env, tmp_path):
    """Rich markup in a message (a path like ``[/b]``) used to crash the error handler itself."""
    r = run_case(["analyze", *M, "-t", "{tmp}/data[/b][bold]/x.jsonl", "--fields", "question=q,choices=c,gold=g",
                  "--out", "{out}"], env, tmp_path)
    assert_clean_error(r, "analyze", "data[/b][bold]/x.jsonl", "does not exist")


# --------------------------------------------------------------------------------------------------
# GGUF files cut short


def _gguf_bytes() -> tuple[bytes, int]:
    """A small well-formed GGUF v3 file (two metadata keys, one f32 tensor) and the length of its header."""

    def s(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 2)
    head += s("general.architecture") + struct.pack("<I", 8) + s("llama")
    head += s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + s("a") + s("b")
    head += s("w") + struct.pack("<I", 1) + struct.pack("<Q", 4) + struct.pack("<IQ", 0, 0)
    pad = b"\0" * (-len(head) % 32)
    return head + pad + b"\0" * 16, len(head)


def test_gguf_header_walk():
    import tempfile

    from declens.presets import check_gguf_header

    raw, n = _gguf_bytes()
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.gguf"
        p.write_bytes(raw)
        info = check_gguf_header(p)
        assert info["header_bytes"] == n and info["tensors"] == 1 and info["metadata"] == 2


@pytest.mark.parametrize("cut", [0, 3, 6, 24, 40, 70, 100, -12])
def test_gguf_cut_inside_its_header(cut, env, tmp_path):
    raw, n = _gguf_bytes()
    size = cut if cut >= 0 else n + cut
    assert size < n
    (tmp_path / "cut.gguf").write_bytes(raw[:size])
    r = run_case(["analyze", "--model", "{tmp}/cut.gguf", "--task", "arc_easy", "--out", "{out}"], env, tmp_path)
    assert_clean_error(r, "analyze", "cut.gguf", "truncated", fix="download or copy it again")


def test_not_a_gguf_file(env, tmp_path):
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04" + b"\0" * 64)
    r = run_case(["analyze", "--model", "{tmp}/fake.gguf", "--task", "arc_easy", "--out", "{out}"], env, tmp_path)
    assert_clean_error(r, "analyze", "is not a GGUF file", fix="pass a .gguf model file")


# --------------------------------------------------------------------------------------------------
# With the model: what only the model can judge


@pytest.fixture
def long_rows(tmp_path):
    """Three rows, one of them far longer than the tiny model's 2048-token context window."""
    long_q = " ".join(["Which of these statements about photosynthesis is true"] * 300) + "?"
    rows = [{"q": "Is water wet?", "c": ["yes", "no"], "g": 0}, {"q": long_q, "c": ["yes", "no"], "g": 1},
            {"q": "Is fire cold?", "c": ["yes", "no"], "g": 1}]
    p = tmp_path / "long.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.mark.parametrize("fmt", ["letter", "cloze"])
def test_row_longer_than_the_context_is_refused(fmt, long_rows, env, tmp_path):
    r = run_case(["analyze", "--model", "{tiny}", "-t", str(long_rows), "--fields", "question=q,choices=c,gold=g",
                  "-f", fmt, "--out", "{out}"], env, tmp_path)
    assert_clean_error(r, "analyze", "item 'test-1'", "2048-token context window", fix="--allow-truncation")


def test_allowed_truncation_is_reported_and_recorded(long_rows, env, tmp_path):
    out = tmp_path / "out"
    r = runner.invoke(app, ["analyze", "--model", env["tiny"], "-t", str(long_rows), "--fields", "question=q,choices=c,gold=g",
                            "--lens-layers", "last", "--allow-truncation", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "1 prompt(s) were longer than the model's context window" in r.output.replace("\n", " ")
    prov = json.loads((out / "result.json").read_text())["provenance"]
    assert prov["truncation"] == {"allowed": True, "prompts_truncated": 1}


@pytest.mark.parametrize(
    "args, problem",
    [
        (["analyze", "-t", "arc_easy", "--remove", "9"], "out of range"),
        (["analyze", "-t", "arc_easy", "--remove", "0,1,2,3"], "removing all 4 layers"),
        (["analyze", "-t", "arc_easy", "--labels", "Qzx,Wvj,Kpf,Yqu"], "not one"),
        (["cka", "-t", "arc_easy", "--remove", "9"], "out of range"),
        (["noise", "-t", "arc_easy", "--layers", "9"], "not in the model"),
        (["eval", "--tasks", "piqa", "--remove", "0,1,2,3"], "removing all 4 layers"),
    ],
)
def test_model_dependent_errors_leave_nothing_behind(args, problem, env, tmp_path):
    r = run_case([args[0], "--model", "{tiny}", "--limit", "3", *args[1:], "--out", "{out}"], env, tmp_path)
    assert_clean_error(r, args[0], problem)
