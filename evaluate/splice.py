"""Run a full model once, then rerun only what follows block L with a replaced block output.

The eval tries many interventions at block L on the same text. The blocks up to L run once per
batch (the clean pass records block L's output); for each intervention, blocks 0..L are swapped
for stand-ins that hand the edited output on, so only the embedding, the blocks after L, the final
norm and the head run again, in the model's own forward (its masks, soft-capping and all).
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class _Passthrough(nn.Module):
    def __init__(self, tuple_output: bool):
        super().__init__()
        self.tuple_output = tuple_output

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.tuple_output else hidden_states


class _Replay(_Passthrough):
    def __init__(self, value: torch.Tensor, tuple_output: bool):
        super().__init__(tuple_output)
        self.value = value

    def forward(self, hidden_states, *args, **kwargs):
        return (self.value,) if self.tuple_output else self.value


class SplicedModel:
    def __init__(self, model: nn.Module, blocks: nn.ModuleList, layer: int):
        self.model, self.blocks, self.layer = model, blocks, layer
        self._tuple_output = False

    @torch.inference_mode()
    def clean(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block L output, logits) of the unmodified model."""
        return self._capturing_block_output(lambda: self.model(input_ids=input_ids, use_cache=False).logits)

    @torch.inference_mode()
    def clean_with_hidden(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(block L output, the head's input, logits) of the unmodified model."""
        h, hidden = self._capturing_block_output(
            lambda: self.model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state)
        return h, hidden, self.head(hidden)

    def _capturing_block_output(self, forward) -> tuple[torch.Tensor, torch.Tensor]:
        """(block L output, what `forward()` returns), the block's output read by a hook during it."""
        captured = {}

        def keep(module, args, output):
            self._tuple_output = isinstance(output, tuple)
            captured["h"] = output[0] if self._tuple_output else output

        handle = self.blocks[self.layer].register_forward_hook(keep)
        try:
            result = forward()
        finally:
            handle.remove()
        return captured["h"], result

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the final norm's output: the output embedding and the model's soft-capping."""
        logits = self.model.get_output_embeddings()(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    @torch.inference_mode()
    def with_block_output(self, input_ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Logits when block L outputs `h` instead (its earlier blocks are not run)."""
        with self._replaced(h):
            return self.model(input_ids=input_ids, use_cache=False).logits

    @torch.inference_mode()
    def losses_with_block_output(self, input_ids: torch.Tensor, h: torch.Tensor, keep: torch.Tensor,
                                 clean_loss: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
        """`next_token_loss` when block L outputs `h`, given the clean per-target loss and which positions of
        `h` differ from the clean output. Attention is causal, so every position before a row's first
        changed one keeps its clean output exactly: the head (the 262k-vocabulary matmul, most of the
        cost) runs only from there on, and the clean loss stands before it."""
        with self._replaced(h):
            hidden = self.model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        seq = input_ids.shape[1]
        first = torch.where(changed.any(1), changed.float().argmax(1), torch.full_like(changed[:, 0], seq, dtype=torch.long))
        need = (torch.arange(seq - 1, device=h.device)[None, :] >= first[:, None]) & keep[:, 1:]
        loss = clean_loss.clone()
        if need.any():
            logits = self.head(hidden[:, :-1][need])
            loss[need] = F.cross_entropy(logits.float(), input_ids[:, 1:][need], reduction="none")
        return loss

    @contextmanager
    def _replaced(self, h: torch.Tensor):
        originals = [self.blocks[i] for i in range(self.layer + 1)]
        try:
            for i in range(self.layer):
                self.blocks[i] = _Passthrough(self._tuple_output)
            self.blocks[self.layer] = _Replay(h, self._tuple_output)
            yield
        finally:
            for i, block in enumerate(originals):
                self.blocks[i] = block


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-target cross-entropy (batch, seq-1), zero where the target is not a document token."""
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="none")
    return loss.view(input_ids.shape[0], -1) * keep[:, 1:]


def kl_to_clean(clean_logits: torch.Tensor, logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-position KL(clean || other) at the positions predicting document tokens."""
    p = F.log_softmax(clean_logits[:, :-1].float(), dim=-1)
    q = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return (p.exp() * (p - q)).sum(-1) * keep[:, 1:]
