"""Bundled tasks, custom data and the errors bad input gets."""

from __future__ import annotations

import json

import pytest

from declens.errors import TaskError
from declens.formats import cloze_pairs, letter_prompt
from declens.tasks import REGISTRY, FieldMap, get_spec, load_task, read_split

SIZES = {("arc_challenge", "test"): 1172, ("arc_challenge", "validation"): 299, ("arc_challenge", "train"): 1119,
         ("arc_easy", "test"): 2376, ("arc_easy", "validation"): 570, ("arc_easy", "train"): 2251,
         ("hellaswag", "validation"): 10042, ("piqa", "validation"): 1838, ("boolq", "validation"): 3270,
         ("winogrande", "validation"): 1267, ("mmlu", "test"): 14042, ("mmlu", "dev"): 285}


@pytest.mark.parametrize("task, split", list(SIZES))
def test_bundled_splits_are_complete_and_valid(task, split):
    items = read_split(get_spec(task), split)
    assert len(items) == SIZES[(task, split)]
    for it in items:
        assert 0 <= it.gold < len(it.choices) and len(it.choices) >= 2
    assert len({it.id for it in items}) == len(items) or task == "piqa" or task == "boolq" or task == "mmlu"


def test_known_rows_read_correctly():
    arc = read_split(get_spec("arc_challenge"), "test")[0]
    assert arc.id == "Mercury_7175875" and arc.gold == 2 and arc.choices[2] == "Planetary days will become shorter."
    boolq = read_split(get_spec("boolq"), "validation")[0]
    assert boolq.choices == ("no", "yes") and boolq.gold == 0 and boolq.passage.startswith("Ethanol fuel -- All biomass")
    wino = read_split(get_spec("winogrande"), "validation")[0]
    assert wino.gold == 1 and wino.choices == ("Sarah", "Maria")
    assert len(read_split(get_spec("mmlu"), "test")) == 14042
    assert len({it.subject for it in read_split(get_spec("mmlu"), "test")}) == 57


def test_arc_numeric_labels_and_five_choices_map_to_indices():
    items = read_split(get_spec("arc_challenge"), "test")
    counts = {len(it.choices) for it in items}
    assert {3, 4, 5} <= counts
    assert any(it.choices and it.gold < len(it.choices) for it in items if len(it.choices) == 5)


def test_subsample_is_deterministic_and_seeded():
    a = load_task("arc_easy", limit=50, seed=7)
    b = load_task("arc_easy", limit=50, seed=7)
    c = load_task("arc_easy", limit=50, seed=8)
    assert [i.id for i in a.items] == [i.id for i in b.items] != [i.id for i in c.items]
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert a.selection["rows_in_split"] == 2376 and a.selection["rows_selected"] == 50


def test_mmlu_subjects_and_fewshot_from_dev():
    d = load_task("mmlu:astronomy")
    assert {it.subject for it in d.items} == {"astronomy"} and len(d.items) == 152
    assert len(d.fewshot_pool) == 285
    d2 = load_task("mmlu", subjects=["astronomy", "virology"], limit=20)
    assert {it.subject for it in d2.items} <= {"astronomy", "virology"}


def test_prompts_of_every_task_render():
    for name, spec in REGISTRY.items():
        it = read_split(spec, spec.default_split)[0]
        p = letter_prompt(spec, it)
        assert p.endswith("Answer:") and "A. " in p and "B. " in p
        pairs = cloze_pairs(spec, it)
        assert len(pairs) == len(it.choices)
        if spec.cloze_mode == "partial":
            assert len({c for c, _ in pairs}) == len(pairs) and len({x for _, x in pairs}) == 1
        else:
            assert len({c for c, _ in pairs}) == 1


# ---------------------------------------------------------------- custom data and bad input


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_custom_jsonl_with_field_mapping(tmp_path):
    f = _write(tmp_path / "mine.jsonl", [
        {"q": "2+2?", "opts": ["3", "4"], "ans": "B"},
        {"q": "Sky colour?", "opts": ["blue", "green", "red"], "ans": "A"},
    ])
    d = load_task(f, fields="question=q,choices=opts,gold=ans,gold_kind=letter")
    assert [it.gold for it in d.items] == [1, 0] and d.items[1].choices == ("blue", "green", "red")


def test_custom_csv_with_option_columns(tmp_path):
    p = tmp_path / "mine.csv"
    p.write_text("question,a,b,label\nIs water wet?,yes,no,0\nIs fire cold?,yes,no,1\n")
    d = load_task(str(p), fields="question=question,choices=a|b,gold=label")
    assert [it.gold for it in d.items] == [0, 1] and d.items[0].choices == ("yes", "no")


@pytest.mark.parametrize(
    "rows, fields, match",
    [
        ([{"q": "x", "opts": ["a", "b"], "ans": 5}], "question=q,choices=opts,gold=ans", "out of range"),
        ([{"q": "x", "opts": ["a", "b"]}], "question=q,choices=opts,gold=ans", "field 'ans' is missing"),
        ([{"q": "x", "opts": ["a"], "ans": 0}], "question=q,choices=opts,gold=ans", "at least 2"),
        ([{"q": "x", "opts": ["a", ""], "ans": 0}], "question=q,choices=opts,gold=ans", "empty"),
        ([{"q": "x", "opts": ["a", "b"], "ans": "Z"}], "question=q,choices=opts,gold=ans,gold_kind=letter", "out of range"),
        ([{"q": "x", "opts": ["a", "b"], "ans": "maybe"}], "question=q,choices=opts,gold=ans", "not an integer"),
    ],
)
def test_malformed_rows_name_the_row_and_problem(tmp_path, rows, fields, match):
    f = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(TaskError, match=match) as e:
        load_task(f, fields=fields)
    assert "row 1" in str(e.value)


def test_malformed_json_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"q": "x", "opts": ["a","b"], "ans": 0}\n{"q": broken\n')
    with pytest.raises(TaskError, match="line 2: malformed JSON"):
        load_task(str(p), fields="question=q,choices=opts,gold=ans")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"task": "arc_hard"}, "unknown task 'arc_hard'"),
        ({"task": "arc_easy", "split": "dev"}, "no split 'dev'"),
        ({"task": "mmlu:astrology"}, "unknown subject"),
        ({"task": "arc_easy", "subjects": ["x"]}, "has no subjects"),
        ({"task": "/nonexistent/data.jsonl", "fields": "question=q,choices=c,gold=g"}, "does not exist"),
        ({"task": "arc_easy", "limit": 0}, "must be positive"),
    ],
)
def test_bad_requests_fail_clearly(kwargs, match):
    with pytest.raises(TaskError, match=match):
        load_task(**kwargs)


def test_custom_file_needs_fields(tmp_path):
    f = _write(tmp_path / "mine.jsonl", [{"q": "x", "opts": ["a", "b"], "ans": 0}])
    with pytest.raises(TaskError, match="needs a field mapping"):
        load_task(f)


def test_bad_field_mapping():
    with pytest.raises(TaskError, match="lacks gold"):
        FieldMap.parse("question=q,choices=c")
    with pytest.raises(TaskError, match="unknown field-mapping key"):
        FieldMap.parse("question=q,choices=c,gold=g,colour=red")
    with pytest.raises(TaskError, match="unknown gold kind"):
        FieldMap.parse("question=q,choices=c,gold=g,gold_kind=roman")


def test_empty_selection(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    with pytest.raises(TaskError, match="empty"):
        load_task(str(p), fields="question=q,choices=c,gold=g")


def test_fewshot_without_fewshot_split():
    from conftest import make_tiny

    from declens.analyses.decision import prepare

    lm = make_tiny("llama")
    with pytest.raises(TaskError, match="no few-shot split"):
        prepare(lm, load_task("piqa", limit=2), "letter", num_fewshot=2)
    req = prepare(lm, load_task("arc_easy", limit=2), "letter", num_fewshot=2)
    assert req.texts[0].count("Answer:") == 3
