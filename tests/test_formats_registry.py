"""Scoring formats are registered classes (issue 9, step 5): a third format registered in a test runs through
``analyze`` and the option checks like the built-in ones, and unknown names keep their one-line messages."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

import declens
from conftest import make_tiny
from declens.analyses.decision import AnalyzeConfig, analyze
from declens.checks import check_format, check_format_options
from declens.errors import DeclensError
from declens.formats import (FORMAT_REGISTRY, Format, LetterFormat, LetterRequests, encoder_for, format_named,
                             prepare, register_format)
from declens.scoring import ScoringPlan
from declens.tasks import LETTERS


@pytest.fixture
def lower_letter():
    """``letter_lower``: the letter format with lower-case option labels (" a", " b", ...), registered for
    the test only."""

    @register_format
    class LowerLetter(LetterFormat):
        name = "letter_lower"
        summary = "the letter format with lower-case labels"

        def build(self, data, enc, num_fewshot=0, seed=0, labels=LETTERS, label_prefix=" ") -> LetterRequests:
            return super().build(data, enc, num_fewshot, seed, [str(x).lower() for x in labels], label_prefix)

    try:
        yield LowerLetter
    finally:
        del FORMAT_REGISTRY["letter_lower"]


def test_a_registered_format_runs_analyze_with_the_numbers_of_its_equivalent(lower_letter, tmp_path):
    lm = make_tiny("llama", layers=4)
    data = declens.load_task("arc_easy", limit=12)
    assert list(FORMAT_REGISTRY) == ["letter", "cloze", "letter_lower"]
    check_format("letter_lower")
    check_format_options("letter_lower", "a,b,c,d")  # it takes labels, as the letter format does
    with pytest.raises(DeclensError, match="--decision-score norm uses the per-character scores"):
        check_format_options("letter_lower", None, "norm")

    new = analyze(lm, data, "letter_lower", out_dir=tmp_path / "lower", progress=False, plots=False)
    same = analyze(lm, data, "letter", AnalyzeConfig(labels="abcd"), progress=False)
    upper = analyze(lm, data, "letter", progress=False)
    assert new.config["format"] == "letter_lower" and new.config["labels"] == ["a", "b", "c", "d"]
    assert new.option_labels == same.option_labels == ["a", "b", "c", "d"]
    assert new.scores.kind == "logit" and new.scores.norm_scores is None
    np.testing.assert_array_equal(new.scores.scores, same.scores.scores)
    for m in ("dm", "acc", "kl", "option_frequency"):
        np.testing.assert_array_equal(getattr(new.metrics, m), getattr(same.metrics, m))
    assert new.metrics.transition_index == same.metrics.transition_index
    assert not np.allclose(new.scores.scores, upper.scores.scores)  # other label tokens, other logits

    back = declens.load_result(tmp_path / "lower")  # the result folder loads back like any analysis
    assert back.config["format"] == "letter_lower" and back.scores.kind == "logit"
    np.testing.assert_array_equal(back.scores.scores, new.scores.scores)


def test_after_unregistering_the_name_is_unknown_again(lower_letter):
    assert "letter_lower" in FORMAT_REGISTRY
    del FORMAT_REGISTRY["letter_lower"]
    try:
        with pytest.raises(DeclensError) as e:
            format_named("letter_lower")
        assert str(e.value) == "unknown format 'letter_lower'; use one of letter, cloze"
    finally:
        FORMAT_REGISTRY["letter_lower"] = lower_letter  # the fixture removes it


def test_unknown_formats_and_bad_registrations_fail_in_one_line():
    with pytest.raises(DeclensError) as e:
        format_named("essay")
    assert str(e.value) == "unknown format 'essay'; use one of letter, cloze"
    with pytest.raises(DeclensError) as e:
        check_format("essay", "--formats")
    assert str(e.value) == "unknown format 'essay' (--formats); use one of letter, cloze"
    with pytest.raises(DeclensError, match="unknown format 'essay'"):
        prepare(make_tiny("llama", layers=2), declens.load_task("arc_easy", limit=2), "essay")
    for name, msg in (("cloze", "already registered"), ("Cloze", "lower-case"), ("a,b", "lower-case"), ("", "lower-case")):
        with pytest.raises(DeclensError, match=msg):
            register_format(type("Bad", (LetterFormat,), {"name": name}))
    assert list(FORMAT_REGISTRY) == ["letter", "cloze"]
    assert (format_named("letter").takes_labels, format_named("cloze").takes_labels) == (True, False)
    assert (format_named("letter").reports_norm, format_named("cloze").reports_norm) == (False, True)


def test_requests_without_a_scoring_plan_are_refused():
    @dataclass
    class Essays:
        prompts: list

    @register_format
    class EssayFormat(Format):
        name = "essay"
        requests = Essays

        def build(self, data, enc, num_fewshot=0, seed=0, labels=LETTERS, label_prefix=" ") -> Essays:
            return Essays([enc.prompt(it.question) for it in data.items])

    try:
        lm = make_tiny("llama", layers=2)
        req = EssayFormat().build(declens.load_task("arc_easy", limit=2), encoder_for(lm))
        with pytest.raises(DeclensError, match="no scoring plan is registered for Essays"):
            ScoringPlan(lm.parts, req)
    finally:
        del FORMAT_REGISTRY["essay"]
