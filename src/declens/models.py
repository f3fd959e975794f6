"""Models: load any decoder-only causal LM and reach its parts without caring about the architecture.

``load_model`` accepts a named preset (see :mod:`declens.presets`), a local Hugging Face
directory, a ``.gguf`` file, or a hub id. :func:`decoder_parts` finds the decoder layer list, the
final norm and the LM head of the architectures declens supports (Llama, Mistral, Qwen2, Qwen3,
Gemma, Gemma2, Gemma3, Phi3 and others that follow the same layout).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import presets
from .errors import ModelError

#: Model families whose layout has been verified by the test-suite on tiny random configs.
TESTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")

_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm")
_LAYER_LIST_NAMES = ("layers", "h", "blocks")


@dataclass
class DecoderParts:
    """Architecture-independent handles on a causal LM.

    Attributes:
        model: the ``*ForCausalLM`` module.
        decoder: the base model whose forward runs embeddings -> layers -> final norm.
        layers_attr: attribute name of the decoder's layer ``nn.ModuleList``.
        norm: the final normalisation applied before the LM head.
        head: the LM head (``nn.Linear``; rows are vocabulary entries).
        softcap: Gemma-2/3 final logit soft-capping value, or None.
    """

    model: nn.Module
    decoder: nn.Module
    layers_attr: str
    norm: nn.Module
    head: nn.Module
    softcap: float | None

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.decoder, self.layers_attr)

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def decoder_parts(model: nn.Module) -> DecoderParts:
    """Find decoder, layer list, final norm and LM head of a causal LM.

    Raises:
        ModelError: for a model that is not a decoder-only causal LM of a known layout.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers_attr = None
    if decoder is not None:
        for name in _LAYER_LIST_NAMES:
            if isinstance(getattr(decoder, name, None), nn.ModuleList):
                layers_attr = name
                break
    norm = None
    if decoder is not None:
        for name in _NORM_NAMES:
            if isinstance(getattr(decoder, name, None), nn.Module):
                norm = getattr(decoder, name)
                break
    missing = [n for n, v in (("decoder", decoder), ("layer list", layers_attr), ("final norm", norm), ("LM head", head)) if v is None]
    if missing:
        raise ModelError(
            f"declens cannot handle this model ({type(model).__name__}, model_type={model_type!r}): "
            f"no {', '.join(missing)} found. declens supports decoder-only causal LMs laid out like "
            f"transformers' Llama ({', '.join(TESTED_FAMILIES)} are tested); load the text-only "
            "*ForCausalLM class of your model."
        )
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return DecoderParts(model=model, decoder=decoder, layers_attr=layers_attr, norm=norm, head=head, softcap=softcap)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA when available (this rank's GPU under ``torchrun``), else CPU."""
    if device is None or str(device) == "auto":
        from .distributed import local_device

        return local_device() or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelError(f"unknown device {str(device)!r}; use auto, cpu, cuda or cuda:N (--device)") from None
    if dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ModelError(f"device {str(device)!r} is not supported; use auto, cpu, cuda or cuda:N (--device)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelError(f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s) are visible "
                         f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); pick one of those with --device")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"device {device!r} requested but MPS is not available; use --device cpu")
    if dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ModelError(f"device {device!r} requested but no XPU is available; use --device cpu")
    return dev


#: accelerate's placement strategies accepted by ``--device-map``
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def check_placement(device: str | torch.device | None = "auto", device_map: str | dict | None = None,
                    max_memory: str | dict | None = None) -> None:
    """Refuse, before anything loads, a device, device map or memory cap that cannot work here.

    ``--device-map`` shards the layers over the GPUs of this host; without a GPU it would silently
    run everything on the CPU, so it is refused with a pointer to ``--device cpu``.

    Raises:
        ModelError: an unknown or unavailable device, an unknown placement strategy, a device map
            without GPUs, or ``max_memory`` without ``device_map``.
    """
    if device_map is None:
        if max_memory is not None:
            raise ModelError("max_memory (--max-memory) only applies with device_map (--device-map auto); "
                             "add --device-map auto or drop --max-memory")
        resolve_device(device)
        return
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise ModelError(f"unknown --device-map {device_map!r}; use one of {', '.join(DEVICE_MAPS)} "
                         "(or leave it out and pick one device with --device)")
    if not torch.cuda.is_available():
        raise ModelError("--device-map shards the layers over the GPUs of this host, and no GPU is visible here; "
                         "drop --device-map and run on the CPU with --device cpu")


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bfloat16 arithmetic (AVX512-BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pragma: no cover - depends on the torch build
        return False


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU or a CPU with native bf16, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}") from None


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, and where they came from.

    Attributes:
        model: the ``*ForCausalLM`` module, in eval mode.
        tokenizer: its tokenizer.
        spec: what the user asked for (preset name, path, or hub id).
        source: provenance (kind, path, file sha256 for GGUF/presets).
    """

    model: nn.Module
    tokenizer: Any
    spec: str
    source: dict = field(default_factory=dict)
    #: prompts longer than the context window lose their start (as lm-evaluation-harness does) instead of
    #: being refused; ``truncated`` counts the prompts (cloze: context/option pairs) cut so far
    truncate: bool = False
    truncated: int = 0

    @cached_property
    def parts(self) -> DecoderParts:
        return decoder_parts(self.model)

    @property
    def num_layers(self) -> int:
        return self.parts.num_layers

    @property
    def device(self) -> torch.device:
        return self.parts.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.parts.head.weight.dtype

    @property
    def family(self) -> str:
        return getattr(self.model.config, "model_type", "unknown")

    def fingerprint(self) -> str:
        """A stable hash of config + every parameter's name, shape, dtype and a strided sample of values."""
        return model_fingerprint(self.model)


#: config keys that do not change what a model computes (left out of the fingerprint)
_NON_SEMANTIC_CONFIG = ("_name_or_path", "transformers_version", "quantization_config", "_commit_hash", "architectures",
                        "use_cache", "output_hidden_states", "output_attentions", "return_dict", "dtype", "torch_dtype")


def model_fingerprint(model: nn.Module, samples_per_tensor: int = 4096) -> str:
    """Hash of the config and the weights (sampled), cheap even for 70B models.

    Two models with different weights differ in this hash with overwhelming probability; the
    same weights in another dtype give another hash (the numbers they produce differ too).
    """
    h = hashlib.sha256()
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    for k in _NON_SEMANTIC_CONFIG:
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    samples = {}
    with torch.no_grad():
        for name, p in model.state_dict().items():
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}".encode())
            flat = p.reshape(-1)
            if flat.numel() == 0:
                continue
            step = max(1, flat.numel() // samples_per_tensor)
            samples.setdefault(flat.device, []).append(flat[::step][:samples_per_tensor].float())
        for dev in sorted(samples, key=str):  # one transfer per device, not one per tensor
            h.update(torch.cat(samples[dev]).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``$HF_ENDPOINT``) answers a TCP connection within ``timeout`` seconds."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def load_model(
    spec: str,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    attn_implementation: str | None = None,
    progress: bool = True,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    Args:
        spec: a preset name (``smollm2-135m``, ``qwen2.5-coder-0.5b``, ``qwen2.5-coder-1.5b``), a
            local Hugging Face model directory, a path to a ``.gguf`` file, or a hub id.
        dtype: ``auto`` (bf16 on GPU or bf16-capable CPU, else fp32), ``float32``, ``bfloat16``, ``float16``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1`` ... (ignored when ``device_map`` is given).
        device_map: passed to transformers (``"auto"`` shards the layers over all GPUs with accelerate).
        max_memory: with ``device_map``: a cap per GPU (``"20GiB"``) or accelerate's ``{device: cap}`` dict.
        attn_implementation: attention kernel (default: transformers' choice, SDPA where the
            architecture supports it, else eager).
        progress: show download / conversion progress bars.

    Raises:
        ModelError: for an unknown preset, a missing path, an unreachable hub or an unsupported model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_placement(device, device_map, max_memory)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
        if isinstance(max_memory, str):
            if not torch.cuda.is_available():
                raise ModelError("--max-memory caps the memory of each GPU, and no GPU is visible here")
            max_memory = {i: max_memory for i in range(torch.cuda.device_count())}
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
    gguf_file = None
    path = Path(spec).expanduser()
    if spec in presets.PRESETS:
        directory = presets.fetch_preset(spec, progress=progress)
        meta = json.loads((directory / "preset.json").read_text())
        source = {"kind": "preset", "name": spec, "hf_id": meta["hf_id"], "gguf_sha256": meta["sha256"],
                  "quantization": meta["quantization"], "path": str(directory)}
        load_from = str(directory)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {str(path)!r} does not exist; check the path")
        presets.check_gguf_header(path)
        load_from, gguf_file = str(path.parent), path.name
        source = {"kind": "gguf", "path": str(path.resolve()), "gguf_sha256": presets.sha256_file(path)}
    elif path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{str(path)!r} is not a Hugging Face model directory (no config.json in it); "
                "point --model at the folder that save_pretrained wrote, a .gguf file, or a preset "
                f"({', '.join(presets.PRESETS)})"
            )
        load_from = str(path)
        source = {"kind": "directory", "path": str(path.resolve())}
    elif spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model path {spec!r} does not exist; check the path, or use a preset ({', '.join(presets.PRESETS)})")
    else:
        load_from = spec
        source = {"kind": "hub", "id": spec}
        if not _hub_cached(spec) and not hub_reachable():
            raise ModelError(
                f"{spec!r} is not a preset, a local path or a cached hub model, and the Hugging Face hub is not "
                f"reachable from here. Use a preset ({', '.join(presets.PRESETS)}), a local model directory or a "
                ".gguf file, or check the network (HF_ENDPOINT) and the id."
            )
    try:
        tok_kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(load_from, **tok_kwargs)
        if gguf_file:
            kwargs["gguf_file"] = gguf_file
        model = AutoModelForCausalLM.from_pretrained(load_from, **kwargs)
    except (OSError, ValueError) as e:
        if source["kind"] == "hub":
            raise ModelError(
                f"could not load {spec!r} from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0]}). "
                f"Is the hub reachable and the id right? Offline, use a local directory, a .gguf file or a preset "
                f"({', '.join(presets.PRESETS)})."
            ) from e
        raise ModelError(f"could not load the model from {spec!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    if gguf_file:
        presets.clear_quantizer(model)
    if device_map is None:
        model.to(dev)
    model.eval()
    loaded = LoadedModel(model=model, tokenizer=tokenizer, spec=spec, source=source)
    loaded.parts  # fail early, with a clear message, on an unsupported architecture
    return loaded
