"""Models: load any decoder-only causal LM and reach its parts without caring about the architecture.

``load_model`` accepts a named preset (see :mod:`declens.presets`), a local Hugging Face
directory, a ``.gguf`` file, or a hub id. :func:`decoder_parts` finds the decoder layer list, the
final norm, the LM head and the output transform (logit scaling, soft-capping) of the families
declared in :mod:`declens.architectures` (Llama, Mistral, Qwen2, Qwen3, Phi3, Gemma, Gemma2, Gemma3
text, Cohere, Granite); other model types are refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import presets
from .architectures import ArchitectureAdapter, adapter_for, resolve_module
from .errors import ModelError
from .execution import ExecutionOptions
from .kernels import LogitTransform, log_normalizer

@dataclass
class DecoderParts:
    """Architecture-independent handles on a causal LM (found through its family's adapter).

    Attributes:
        model: the ``*ForCausalLM`` module.
        decoder: the base model whose forward runs embeddings -> layers -> final norm.
        layers_attr: attribute name of the decoder's layer ``nn.ModuleList``.
        norm: the final normalisation applied before the LM head.
        head: the LM head (``nn.Linear``; rows are vocabulary entries).
        logit_transform: what the output layer does to the head's product (logit scaling,
            final-logit soft-capping), see :class:`declens.kernels.LogitTransform`.
        adapter: the family's :class:`~declens.architectures.ArchitectureAdapter`.
        options: how the execution layer runs the model (:class:`~declens.execution.ExecutionOptions`).
    """

    model: nn.Module
    decoder: nn.Module
    layers_attr: str
    norm: nn.Module
    head: nn.Module
    logit_transform: LogitTransform
    adapter: ArchitectureAdapter
    options: ExecutionOptions = field(default_factory=ExecutionOptions)

    @property
    def softcap(self) -> float | None:
        """Gemma-2/3 final logit soft-capping value, or None."""
        return self.logit_transform.cap

    def head_outputs(self, h: Tensor) -> Tensor:
        """``W_U · norm(h)`` in the head's dtype, before the output transform: ``[..., d]`` -> ``[..., V]``."""
        return self.head(self.norm(h.to(self.head.weight.device)))

    def head_rows(self, rows: Tensor) -> tuple[Tensor, Tensor | None]:
        """Float32 copies of the LM head's rows ``rows`` (``[K]``): weight ``[K, d]`` and bias ``[K]`` (or None)."""
        sel = rows.to(self.head.weight.device)
        bias = getattr(self.head, "bias", None)
        return self.head.weight[sel].float(), (bias[sel].float() if bias is not None else None)

    def lens_logits(self, h: Tensor, rows: tuple[Tensor, Tensor | None] | None = None) -> Tensor:
        """The logit lens: ``T(W_U · norm(h))`` in float32, ``T`` the output transform.

        Args:
            h: ``[..., d]`` raw residual stream (model dtype).
            rows: :meth:`head_rows` of the vocabulary entries to keep (the product is then computed in
                float32); None: the whole vocabulary (the head's own product, in its dtype).

        Returns:
            ``[..., K]`` or ``[..., V]`` float32.
        """
        if rows is None:
            return self.logit_transform(self.head_outputs(h).float())
        x = self.norm(h.to(self.head.weight.device))
        return self.logit_transform(F.linear(x.float(), *rows))

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
    """Decoder, layer list, final norm, LM head and output transform of a causal LM, as its family's
    adapter (:mod:`declens.architectures`) declares them.

    Raises:
        ModelError: a model whose ``model_type`` has no adapter, or that lacks a part its adapter names.
    """
    get_base = getattr(model, "get_base_model", None)  # a peft wrapper: its transformers model
    lm = get_base() if callable(get_base) else model
    config = getattr(lm, "config", None)
    model_type = getattr(config, "model_type", None)
    adapter = adapter_for(model_type)
    decoder = resolve_module(lm, adapter.decoder)
    layers = getattr(decoder, adapter.layers, None) if decoder is not None else None
    norm = resolve_module(decoder, adapter.norm) if decoder is not None else None
    head = resolve_module(lm, adapter.head)
    found = (("decoder", adapter.decoder, decoder), ("layer list", f"{adapter.decoder}.{adapter.layers}",
             layers if isinstance(layers, nn.ModuleList) else None),
             ("final norm", f"{adapter.decoder}.{adapter.norm}", norm),
             ("LM head", adapter.head, head if isinstance(getattr(head, "weight", None), torch.Tensor) else None))
    missing = [f"{what} ({where})" for what, where, got in found if got is None]
    if missing:
        raise ModelError(
            f"declens cannot handle this model ({type(lm).__name__}, model_type={model_type!r}): its {model_type} "
            f"adapter names {', '.join(missing)}, which it lacks; load the text-only *ForCausalLM class of the model")
    return DecoderParts(model=model, decoder=decoder, layers_attr=adapter.layers, norm=norm, head=head,
                        logit_transform=adapter.logit_transform(config), adapter=adapter)


#: Largest ``max |got - ref|`` logit difference accepted when two computations of a model's logits are
#: compared (the export self-check, the load-time lens check), relative to the logit scale
#: ``max(1, max |ref|)``, per dtype. Both sides run the same weights, so only kernel-level rounding may
#: differ: ~1e-6 relative in float32; 16-bit dtypes round every matmul (float16 has a 2^-11 unit
#: roundoff, bfloat16 2^-8), hence the looser bounds. A wrong layer set or a missing logit scale
#: differs by O(1) of the scale. Dtypes not listed use the float32 bound.
LOGIT_TOLERANCE: dict[torch.dtype, float] = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 1e-2,
                                             torch.bfloat16: 5e-2}


@dataclass(frozen=True)
class LogitCheck:
    """Outcome of comparing logits ``got`` with reference logits ``ref``.

    Attributes:
        max_abs_logit_diff: ``max |got - ref|``.
        logit_scale: ``max(1, max |ref|)``.
        rel_logit_diff: ``max_abs_logit_diff / logit_scale``.
        tolerance: the largest accepted ``rel_logit_diff``.
        ok: ``rel_logit_diff <= tolerance`` (and every value finite).
    """

    max_abs_logit_diff: float
    logit_scale: float
    rel_logit_diff: float
    tolerance: float
    ok: bool


def logit_tolerance(dtype: torch.dtype) -> float:
    """The tolerance (relative to the logit scale) for logits of a model in ``dtype`` (:data:`LOGIT_TOLERANCE`)."""
    return LOGIT_TOLERANCE.get(dtype, LOGIT_TOLERANCE[torch.float32])


def compare_logits(ref: Tensor, got: Tensor, dtype: torch.dtype, tolerance: float | None = None) -> LogitCheck:
    """Compare logits ``got`` with reference logits ``ref`` (same shape, e.g. ``[B, T, V]``).

    Args:
        dtype: the model's dtype (picks the tolerance, see :data:`LOGIT_TOLERANCE`).
        tolerance: override the dtype's tolerance (relative to the logit scale).
    """
    tol = logit_tolerance(dtype) if tolerance is None else float(tolerance)
    if ref.shape != got.shape:
        return LogitCheck(float("inf"), float("nan"), float("inf"), tol, False)
    ref, got = ref.float(), got.float()
    diff = float((got - ref).abs().max())
    scale = max(1.0, float(ref.abs().max()))
    rel = diff / scale
    ok = bool(torch.isfinite(got).all()) and rel <= tol
    return LogitCheck(diff, scale, rel, tol, ok)


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
    def options(self) -> ExecutionOptions:
        """How the execution layer runs this model (kept on :attr:`parts`; recorded in results' provenance)."""
        return self.parts.options

    @options.setter
    def options(self, value: ExecutionOptions) -> None:
        if not isinstance(value, ExecutionOptions):
            raise TypeError(f"options must be an ExecutionOptions, not {type(value).__name__}")
        self.parts.options = value

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


#: Text run through a freshly loaded model by :func:`check_lens` (a few tokens).
LENS_CHECK_TEXT = "The capital of France is Paris."
#: Most tokens of :data:`LENS_CHECK_TEXT` that :func:`check_lens` runs.
LENS_CHECK_TOKENS = 16


def _last_layer_and_logits(parts: DecoderParts, ids: Tensor) -> tuple[Tensor, Tensor]:
    """``([1, T, d] raw output of the last decoder layer, [1, T, V] the model's own logits)``."""
    got: list[Tensor] = []

    def keep(module, args, output):
        got.append(output[0] if isinstance(output, (tuple, list)) else output)

    handle = parts.layers[-1].register_forward_hook(keep)
    try:
        with torch.inference_mode():
            logits = parts.model(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()
    return got[-1], logits


def check_lens(lm: LoadedModel, text: str = LENS_CHECK_TEXT) -> dict[str, LogitCheck]:
    """Verify on a few tokens that the lens at the last layer reproduces the model's own logits.

    Checks each way the lens makes logits (:meth:`DecoderParts.lens_logits`, which
    :class:`declens.lens.Lens` applies): the full vocabulary, option rows in float32 (the letter
    format), and log-probabilities through the log-normaliser (the cloze format, fused on a GPU),
    against the model's own forward pass. The tolerance is the export self-check's: relative to the
    logit scale, set by the model's dtype (:func:`compare_logits`). Costs one forward of at most
    :data:`LENS_CHECK_TOKENS` tokens.

    Returns:
        ``{"logits" | "option-row logits" | "log-probabilities": LogitCheck}``, all ``ok``.

    Raises:
        ModelError: the lens disagrees with the model (its family's adapter does not describe it).
    """
    parts = lm.parts
    ids = lm.tokenizer.encode(text)[:LENS_CHECK_TOKENS]
    if not ids:
        raise ModelError("the lens check needs a probe text that tokenizes to at least one token")
    ids_t = torch.tensor([ids], device=lm.model.get_input_embeddings().weight.device)
    h, ref = _last_layer_and_logits(parts, ids_t)
    ref = ref[0].float().to(parts.head.weight.device)  # [T, V]
    t = parts.logit_transform
    sel = torch.tensor(sorted(set(ids)))
    with torch.inference_mode():
        z = parts.head_outputs(h[0])  # [T, V] head dtype
        pairs = {
            "logits": (ref, parts.lens_logits(h[0])),
            "option-row logits": (ref[:, sel.to(ref.device)], parts.lens_logits(h[0], parts.head_rows(sel))),
            "log-probabilities": (torch.log_softmax(ref, -1), t(z.float()) - log_normalizer(z, t.cap, t.scale, fused=parts.options.fused_lse)[:, None]),
        }
    checks = {what: compare_logits(want.cpu(), have.cpu(), lm.dtype) for what, (want, have) in pairs.items()}
    for what, chk in checks.items():
        if not chk.ok:
            raise ModelError(
                f"the lens at the last layer does not reproduce the {parts.adapter.model_type} model's own {what} "
                f"(max difference {chk.max_abs_logit_diff:.3g} = {chk.rel_logit_diff:.2g} of the logit scale "
                f"{chk.logit_scale:.3g}; tolerance {chk.tolerance:.2g} for {str(lm.dtype).replace('torch.', '')}): its "
                f"adapter (output transform scale={t.scale:g}, softcap={t.cap}) does not describe this model's output "
                "layer; declare a matching one with declens.architectures.register_architecture(..., replace=True)")
    return checks


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
    options: ExecutionOptions | None = None,
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
        options: execution options (None: defaults, with the deprecated ``DECLENS_*`` environment
            variables read here, once; see :mod:`declens.execution`).

    Raises:
        ModelError: for an unknown preset, a missing path, an unreachable hub, a model type without an
            architecture adapter (:mod:`declens.architectures`), or a model whose lens at the last layer
            does not reproduce its own logits (:func:`check_lens`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_placement(device, device_map, max_memory)
    options = options if options is not None else ExecutionOptions.from_environment()
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
    loaded.options = options
    check_lens(loaded)  # ... and on one whose lens would not reproduce its own logits
    return loaded
