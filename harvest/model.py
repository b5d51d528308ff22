"""Model loader: any transformers causal LM, placed by Accelerate, cut after the requested block.

"Layer L" is the output of decoder block L (0-based): transformers' `hidden_states[L + 1]`,
TransformerLens' `blocks.L.hook_resid_post`. A forward hook on block L keeps its output and stops
the forward pass there, and the blocks after L are dropped, so they never run.
"""

import hashlib
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .embedded import embedded_model_dir, is_embedded
from .errors import HarvestError

HUB_TIMEOUT_S = 10


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    blocks: nn.ModuleList
    n_layers: int
    d_model: int
    device: torch.device
    compute_dtype: torch.dtype
    identity: dict
    """Model id, revision or weights hash, class: recorded in the store."""
    layer: int = 0
    """The hooked block."""
    model_dir: Path | None = None
    """The local directory the model and its tokenizer were read from (None: from the hub)."""


def cpu_has_native_bf16() -> bool:
    """AMX or AVX-512-BF16: bf16 matmuls run faster than fp32 (on AVX2-only CPUs ~100x slower)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" amx_bf16", " avx512_bf16"))


def cuda_has_native_bf16(device: torch.device) -> bool:
    """bf16 tensor cores (compute capability 8.0, Ampere, and later; every ROCm device torch supports) on
    `device` itself: `torch.cuda.is_bf16_supported()` asks about the current device, which on a machine
    of mixed GPUs need not be the one asked for."""
    if not torch.cuda.is_available():
        return False
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        from accelerate import PartialState

        return PartialState().device
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise HarvestError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise HarvestError(f"device {device} asked for, but no CUDA device is available")
    return resolved


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "float32":
        return torch.float32
    if requested == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_native_bf16(device) else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32


def load_model(name: str, *, layer: int, revision: str | None, trust_remote_code: bool,
               device: str, dtype: str, truncate: bool = True,
               on_tokenizer: Callable[[object], None] | None = None) -> LoadedModel:
    """The model truncated after block `layer`, its tokenizer and identity. `on_tokenizer(tokenizer)` is
    called as soon as the tokenizer is loaded, before the weights: the harvest starts tokenising there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the harvest's own bar is the one to watch
    torch_device = resolve_device(device)
    compute_dtype = resolve_dtype(dtype, torch_device)
    source, local = locate_model(name, revision)
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code, local_files_only=local is not None)
    with _warnings_held_unless_loaded(), _loading_errors(name):
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        if on_tokenizer is not None:
            on_tokenizer(tokenizer)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=compute_dtype, device_map={"": torch_device}, **kwargs
        )
    model.eval()
    check_vocabulary_fits(name, tokenizer, model, local)
    blocks = find_blocks(model)
    n_layers = len(blocks)
    if not 0 <= layer < n_layers:
        raise HarvestError(f"layer {layer} is out of range: {name} has {n_layers} blocks (0..{n_layers - 1})")
    if truncate:
        del blocks[layer + 1:]  # free their memory; the hook in BlockOutput stops the forward anyway
    identity = {
        "id": name,
        "class": type(model).__name__,
        "revision": getattr(model.config, "_commit_hash", None) or revision,
        "weights_sha256": _weights_hash(local) if local is not None else None,
    }
    return LoadedModel(model, tokenizer, blocks, n_layers, model.config.get_text_config().hidden_size,
                       torch_device, compute_dtype, identity, layer,
                       Path(source) if Path(source).is_dir() else None)


@contextmanager
def _loading_errors(name: str):
    """What transformers raises for a model it cannot load, as one line naming the fix."""
    try:
        yield
    except (OSError, ValueError) as exc:
        raise HarvestError(f"cannot load model {name}: {str(exc).splitlines()[0]}") from None
    except pickle.UnpicklingError:
        raise HarvestError(f"cannot load model {name}: its pytorch_model.bin holds more than tensors (pickled "
                           "objects, which can run code), and loading weights safely refuses it; convert it to "
                           "model.safetensors where you trust it, or use a copy that has one") from None
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        raise HarvestError(f"cannot load model {name}: its .safetensors weights are truncated or damaged "
                           f"({str(exc).splitlines()[0]}); download them again") from None


@contextmanager
def _warnings_held_unless_loaded():
    """Warnings of transformers and torch while a model loads: shown once it has loaded, dropped with a
    refusal (whose one line says what is wrong; `[transformers] You are using a model of type ...`
    before it would only blur it)."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    root = hf_logging.get_logger()
    held: list[logging.LogRecord] = []

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record)

    handlers, propagate = root.handlers[:], root.propagate
    root.handlers, root.propagate = [Hold()], False
    loaded = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
        loaded = True
    finally:
        root.handlers, root.propagate = handlers, propagate
        if loaded:
            for record in held:
                root.handle(record)
            for w in caught:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_vocabulary_fits(name: str, tokenizer, model: nn.Module, local: Path | None) -> None:
    """The tokenizer is the model's: its ids index the embedding, and it is not a stand-in.

    A model directory without its tokenizer files makes transformers fall back to a tokenizer of a
    handful of special tokens, under which every document is one unknown token; the harvest would
    then store activations of nothing. Embeddings are often padded beyond the vocabulary (to a
    multiple of 64 or 128), so only a tokenizer under half the embedding's size counts as a stand-in.
    """
    rows = model.get_input_embeddings().num_embeddings
    size = len(tokenizer)
    if rows // 2 <= size <= rows:
        return
    missing = ""
    if local is not None and not any((local / f).exists() for f in TOKENIZER_FILES):
        missing = f"; {local} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): copy the model's own there"
    relation = "more" if size > rows else "far fewer"
    raise HarvestError(f"the tokenizer of {name} has {size:,} tokens, {relation} than the model's embedding has "
                       f"rows ({rows:,}): it is not this model's tokenizer{missing}")


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: the ModuleList with one entry per hidden layer (`model.layers`, `h`, ...)."""
    n = model.config.get_text_config().num_hidden_layers
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not candidates:
        raise HarvestError(f"cannot find the {n} decoder blocks of {type(model).__name__}")
    return candidates[0]


class _StopForward(Exception):
    pass


class BlockOutput:
    """Runs `model` until `block` has run and returns that block's output, (batch, seq, d_model).

    Nothing after the block runs: its forward hook raises, so later blocks, the final norm and the
    LM head are never reached.
    """

    def __init__(self, model: nn.Module, block: nn.Module, device: torch.device):
        self.model = model
        self.device = device
        self._captured: torch.Tensor | None = None
        self._hook = block.register_forward_hook(self._keep_and_stop)

    def close(self) -> None:
        """Remove the hook: the model runs whole again."""
        self._hook.remove()

    def _keep_and_stop(self, module, args, output):
        self._captured = output[0] if isinstance(output, tuple) else output
        raise _StopForward

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._captured = None
        try:
            self.model(input_ids=input_ids.to(self.device), use_cache=False)
        except _StopForward:
            pass
        if self._captured is None:
            raise RuntimeError("the hooked block did not run")
        return self._captured


def locate_model(name: str, revision: str | None) -> tuple[str, Path | None]:
    """Return what to pass to from_pretrained, and the local directory when there is one.

    Hub ids are tried in the local cache first; otherwise the hub is asked once with a short
    timeout, so that an unreachable hub or a gated model fails fast with a message naming the fix.
    """
    if is_embedded(name):
        path = embedded_model_dir(name)
        return str(path), path
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise HarvestError(f"model directory {path} has no config.json (not a transformers model directory)")
        return str(path), path
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise HarvestError(f"model directory not found: {name}")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, revision=revision, local_files_only=True), None
    except Exception:
        pass  # not cached: ask the hub
    _check_hub(name, revision)
    return name, None


def _check_hub(name: str, revision: str | None) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    offline_default = "or run the offline default: pipeline harvest --config configs/demo.yaml"
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise HarvestError(f"model {name} is not in the local cache and HF_HUB_OFFLINE is set: "
                           f"point --model at a local copy, {offline_default}")
    try:
        HfApi().model_info(name, revision=revision, timeout=HUB_TIMEOUT_S)  # reachable, exists
        HfApi().auth_check(name)  # and readable by this user
    except GatedRepoError:
        raise HarvestError(f"model {name} is gated: accept its licence on https://huggingface.co/{name} and log "
                           f"in with `hf auth login`, point --model at a local copy, {offline_default}") from None
    except RevisionNotFoundError:
        raise HarvestError(f"model {name} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise HarvestError(f"model {name} was not found on the Hugging Face Hub (nor as a local directory); "
                           f"if it is private or gated, log in with `hf auth login`") from None
    except Exception as exc:
        raise HarvestError(f"the Hugging Face Hub is unreachable ({type(exc).__name__}) and {name} is not cached: "
                           f"point --model at a local copy, {offline_default}") from None


def _weights_hash(directory: Path) -> str:
    """sha256 over the weight files of a local model directory, in name order."""
    digest = hashlib.sha256()
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()
