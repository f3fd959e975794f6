"""docs/ARCHITECTURE.md's "how to add" examples run against the current code.

Every ```python block of the page runs, in order, in one namespace holding ``lm`` (a tiny random
model) and ``data`` (ARC-Easy rows), as the page assumes; then the architecture it registers
(``olmo2``) is loaded from disk through ``load_model``, whose lens check must pass. The registries the
examples add to are restored afterwards.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

import declens
from conftest import make_tiny, make_tokenizer
from declens.architectures import ARCHITECTURES
from declens.errors import ModelError
from declens.formats import FORMAT_REGISTRY
from declens.pruning import METHODS
from declens.results import RESULT_KINDS
from declens.tasks import REGISTRY

DOC = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


def _tiny_olmo2(folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, Olmo2Config

    tok = make_tokenizer()
    cfg = Olmo2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_every_how_to_add_example_runs(tmp_path):
    blocks = _blocks()
    assert len(blocks) == 5  # task, format, pruning method, architecture, result kind
    olmo = _tiny_olmo2(tmp_path / "olmo2")
    try:
        declens.load_model(str(olmo), dtype="float32", device="cpu", progress=False)
        raise AssertionError("olmo2 loaded without an adapter; pick another example family for the page")
    except ModelError as e:
        assert "no declens architecture adapter" in str(e)
    ns = {"declens": declens, "lm": make_tiny("llama", layers=6), "data": declens.load_task("arc_easy", limit=12)}
    saved = (dict(REGISTRY), dict(METHODS), dict(ARCHITECTURES), dict(RESULT_KINDS), dict(FORMAT_REGISTRY))
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"{DOC.name} block {i}", "exec"), ns)
        assert "my_qa" in REGISTRY and "first" in METHODS and "olmo2" in ARCHITECTURES and "layer_count" in RESULT_KINDS
        assert "letter_lower" in FORMAT_REGISTRY
        assert ns["res"].runs["first"].table()[0]["removed"] == [1]
        lm = declens.load_model(str(olmo), dtype="float32", device="cpu", progress=False)  # the lens check passes
        assert lm.num_layers == 3
    finally:
        for live, before in zip((REGISTRY, METHODS, ARCHITECTURES, RESULT_KINDS, FORMAT_REGISTRY), saved):
            live.clear()
            live.update(before)
