"""`pipeline generate`: the model's continuation of a prompt without and with an SAE's features clamped.

The clamp is the eval's (unlearning/features.py `clamp`, SAEBench's): at block L's output h, every
selected feature that fires is set to -multiplier, the SAE's error term kept, and the edited output
goes on through the model's own later blocks, as evaluate/splice.py hands it on. Here a forward hook
on block L does the replacing, so the model's own `generate` (its KV cache, sampling, stopping) runs
unchanged; the clamp acts on each position once, when that position first passes block L, so the
cached keys and values are those of the clamped stream. As in the eval, the first token (BOS) is not
a document token and is never clamped.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from harvest.model import LoadedModel
from harvest.packing import special_ids
from train.sae import SAE

from ..unlearning.features import clamp as clamp_always

CLAMPS: dict[str, Callable] = {"always": clamp_always}
"""How a selection is clamped, by `--clamp` name: a function (h, sae, features, multiplier, keep) -> h'.
`always` is the eval's clamp; another rule (a clamp gated on the text, say) registers here."""


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """BOS and the prompt's tokens, as the eval's held-out documents are laid out, (1, seq)."""
    bos, _ = special_ids(tokenizer)
    return torch.tensor([[bos] + tokenizer(prompt, add_special_tokens=False)["input_ids"]])


class ClampAtBlock:
    """While open, block `layer`'s output is clamped at every position but the sequence's first."""

    def __init__(self, loaded: LoadedModel, sae: SAE, features: list[int], multiplier: float, clamp: str = "always"):
        self.loaded, self.sae, self.multiplier = loaded, sae, multiplier
        self.features = torch.as_tensor(features, dtype=torch.long, device=sae.W_dec.device)
        self.clamp = CLAMPS[clamp]
        self.handle = None
        self.seen = 0  # positions of the current sequence that have passed block L

    def _hook(self, module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        keep = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        if self.seen == 0:
            keep[:, 0] = False
        self.seen += h.shape[1]
        edited = self.clamp(h, self.sae, self.features, self.multiplier, keep)
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    def __enter__(self):
        self.seen = 0
        self.handle = self.loaded.blocks[self.loaded.layer].register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@dataclass
class Continuation:
    prompt: str
    ids: list[int]
    """The generated tokens (the prompt's not included)."""
    text: str


@torch.inference_mode()
def generate(loaded: LoadedModel, sae: SAE, prompt: str, features: list[int], multiplier: float, *,
             max_new_tokens: int = 40, temperature: float = 0.0, seed: int = 0,
             clamp: str = "always") -> Continuation:
    """The model's continuation of `prompt` with `features` clamped at `multiplier` (none: the model's own)."""
    ids = prompt_ids(loaded.tokenizer, prompt).to(loaded.device)
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else \
        {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else special_ids(loaded.tokenizer)[1]
    with ClampAtBlock(loaded, sae, features, multiplier, clamp):
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                    pad_token_id=pad, **sampling)
    new = out[0, ids.shape[1]:].tolist()
    return Continuation(prompt, new, loaded.tokenizer.decode(new, skip_special_tokens=True))


def side_by_side(left_title: str, left: str, right_title: str, right: str, width: int) -> list[str]:
    """Two texts in two columns of `width` characters each (newlines kept as ↵)."""
    import textwrap

    cols = [[title, "-" * min(width, max(len(title), 1))] + (textwrap.wrap(text.replace("\n", "↵ "), width) or [""])
            for title, text in ((left_title, left), (right_title, right))]
    rows = max(len(c) for c in cols)
    cols = [c + [""] * (rows - len(c)) for c in cols]
    return [f"{a:<{width}} │ {b}".rstrip() for a, b in zip(*cols)]


def run_generate(name: str, runs_dir, options: dict):
    """What `pipeline generate` does: lines to print."""
    import shutil
    from pathlib import Path

    from train.errors import TrainError

    from .load import eval_selection, load_store_model, open_sae, parse_features

    prompts = list(options.get("prompt") or [])
    if options.get("prompts") is not None:
        path = Path(options["prompts"])
        try:
            prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise TrainError(f"--prompts {path} cannot be read: {exc.strerror or exc}") from None
    if not prompts:
        raise TrainError("give a prompt: --prompt TEXT (repeatable) or --prompts FILE (one prompt a line)")
    clamp = options.get("clamp") or "always"
    if clamp not in CLAMPS:
        raise TrainError(f"--clamp takes {', '.join(CLAMPS)}; got {clamp!r}")
    if options["max_new_tokens"] < 1 or options["temperature"] < 0:
        raise TrainError("--max-new-tokens must be at least 1 and --temperature at least 0")
    opened = open_sae(name, runs_dir, options.get("shards"), device="cpu")
    if options.get("features") is not None:
        features, multiplier, source = parse_features(options["features"], opened.sae.d_sae), None, "--features"
    else:
        features, multiplier, source = eval_selection(opened)
    if options.get("multiplier") is not None:
        multiplier, source = float(options["multiplier"]), source + ", --multiplier"
    if multiplier is None:
        raise TrainError(f"no multiplier for {opened.sae_dir}: " + ("" if options.get("features") is not None else
                         "no setting of its eval kept the retain loss within tolerance; ") + "give --multiplier")
    loaded = load_store_model(opened.store, options.get("device") or "auto", options.get("dtype") or "auto")
    opened.sae.to(loaded.device)
    yield (f"{opened.name}: {len(features)} features clamped to -{multiplier:g} where they fire at "
           f"{opened.store.attrs['hook_name']} of {opened.store.attrs['model']['id']} ({source}): "
           f"{', '.join(map(str, features)) or 'none'}")
    width = max(30, (shutil.get_terminal_size((160, 24)).columns - 3) // 2)
    kwargs = dict(max_new_tokens=options["max_new_tokens"], temperature=options["temperature"], seed=options["seed"])
    for prompt in prompts:
        plain = generate(loaded, opened.sae, prompt, [], 0.0, **kwargs)
        clamped = generate(loaded, opened.sae, prompt, features, multiplier, clamp=clamp, **kwargs)
        yield ""
        yield f"prompt: {prompt}"
        yield from side_by_side("the model", plain.text, f"clamped ({len(features)} features, x{multiplier:g})",
                                clamped.text, width)
