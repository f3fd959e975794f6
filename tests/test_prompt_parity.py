"""declens' prompts equal lm-evaluation-harness' stock task prompts, character for character.

A seeded sample of 50 rows per task is rendered by declens and by lm-eval's own stock task
definitions (YAML + utils.py loaded through lm_eval's TaskManager, ``fewshot_context`` and
``construct_requests`` on the same rows): zero-shot context and every continuation, the gold option,
and the 5-shot context where the task has a few-shot split. The comparison code is
``benchmarks/prompt_parity.py``, which also checks every row (see docs/METHOD.md, "Prompts and
lm-evaluation-harness parity").
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from declens.tasks import get_spec, hellaswag_process_doc, hellaswag_split_context, read_split

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "prompt_parity.py"
_spec = importlib.util.spec_from_file_location("prompt_parity", _PATH)
pp = importlib.util.module_from_spec(_spec)
sys.modules["prompt_parity"] = pp
_spec.loader.exec_module(pp)

N_ROWS = 50
CASES = [(t, f) for t, fmts in pp.STOCK.items() for f, name in fmts.items() if name is not None]


@pytest.fixture(scope="module")
def stock():
    return pp.StockTasks.load()


def _rows(task: str, split: str, n: int = N_ROWS, seed: int = 0) -> list[int]:
    return pp.sample_rows(len(read_split(get_spec(task), split)), n, seed)


@pytest.mark.parametrize("task,fmt", CASES, ids=[f"{t}-{f}" for t, f in CASES])
def test_prompts_equal_lmeval_stock(stock, task, fmt):
    split = get_spec(task).default_split
    tally = pp.compare_task(stock, task, fmt, split, _rows(task, split), num_fewshot=5, seed=0)
    assert tally.different == 0, "\n".join(pp.describe(m) for m in tally.mismatches[:5])
    assert tally.identical == N_ROWS


def test_letter_format_has_no_stock_task_but_mmlu():
    # the letter templates of the other tasks are declens' own (docs/METHOD.md); keep the table honest
    assert [t for t, f in pp.STOCK.items() if f["letter"]] == ["mmlu"]
    assert all(f["cloze"] for f in pp.STOCK.values())


def test_parity_check_catches_mmlu_unstripped_question(stock):
    """The check fails on the bug it was written for: MMLU questions with surrounding whitespace
    rendered without lm-eval's ``question.strip()``."""
    spec = get_spec("mmlu")
    items = read_split(spec, "test")
    padded = [i for i, it in enumerate(items) if it.question != it.question.strip()][:10]
    assert padded, "the bundled MMLU test split has questions with surrounding whitespace"
    for fmt, field in (("letter", "letter_template"), ("cloze", "cloze_context")):
        unstripped = replace(spec, **{field: getattr(spec, field).replace("{question_stripped}", "{question}")})
        bad = pp.compare_task(stock, "mmlu", fmt, "test", padded, spec=unstripped)
        assert bad.different == len(padded) and bad.identical == 0
        good = pp.compare_task(stock, "mmlu", fmt, "test", padded)
        assert good.identical == len(padded), "\n".join(pp.describe(m) for m in good.mismatches[:3])


def test_parity_check_catches_boolq_passage_and_hellaswag_capitalisation(stock):
    boolq = replace(get_spec("boolq"), process_docs="none")  # the passage without SuperGLUE's "<title> -- "
    bad = pp.compare_task(stock, "boolq", "cloze", "validation", _rows("boolq", "validation", 10), spec=boolq)
    assert bad.different == 10
    items = read_split(get_spec("hellaswag"), "validation")
    lower = [i for i, it in enumerate(items) if hellaswag_split_context(it.question.split(": ", 1)[1])[1]][:10]
    hs = replace(get_spec("hellaswag"), process_docs="none", preprocess="hellaswag")  # the bundled query as is
    bad = pp.compare_task(stock, "hellaswag", "cloze", "validation", lower, spec=hs)
    assert bad.different == len(lower) == 10


def test_hellaswag_context_split():
    # the example row of the HellaSwag release: ctx_a "A man is sitting on a roof.", ctx_b "he"
    assert hellaswag_split_context("A man is sitting on a roof. he") == ("A man is sitting on a roof.", "he")
    assert hellaswag_split_context("He waxes the skis. Then he leaves.") == ("He waxes the skis. Then he leaves.", "")
    assert hellaswag_split_context('She says "stop!" the man') == ('She says "stop!"', "the man")
    assert hellaswag_split_context("the man") == ("", "the man")
    doc = {"activity_label": "Roof shingle removal", "ctx": "A man is sitting on a roof. he", "endings": [" is [step] ripping. "]}
    out = hellaswag_process_doc(doc)
    assert out["query"] == "Roof shingle removal: A man is sitting on a roof. He" and out["endings"] == ["is ripping."]
