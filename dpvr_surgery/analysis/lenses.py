"""Hooks that measure the three saturation lenses on every decoder layer, one batch at a time.

Life cycle:
1. `attach` hooks decoder layers: all at once for a loaded model, or one at a time when layers are
   loaded one by one (`attach_layer`);
2. `collect(batch)` wraps every forward pass of a batch through the hooked layers;
3. `compute_logit_lens(head)` runs once the last layer has run for the pending samples;
4. `remove` takes the hooks off, and `finalize` returns the per-sample values.

Per layer `l` and sample, with `h_l` the hidden states entering layer `l` and `h_{l+1}` those it
returns (before the final norm):
- `attention_mass`: the attention probability that text queries after the image put on image
  keys, averaged over query heads and text queries (see `attention_mass.py`);
- `cosine_similarity`: cosine similarity of `h_l` and `h_{l+1}` at each image token, averaged over
  image tokens: how much layer `l` changes the image tokens;
- `logit_lens_kl` and `logit_lens_top1`: the final norm and `lm_head` applied to `h_{l+1}` at the
  logit-lens image tokens, compared with the same at the last layer: KL(final || layer l) in nats
  and the share of tokens whose top-1 token equals the last layer's, averaged over those tokens.
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VerificationError
from .attention_mass import text_to_image_attention_mass
from .batches import Batch

LENS_NAMES = ("attention_mass", "cosine_similarity", "logit_lens_kl", "logit_lens_top1")


@dataclass
class LensMeasurements:
    """Per-sample, per-layer values of every lens: `values[name]` is a (samples, layers) float64 tensor."""

    sample_ids: list[str]
    values: dict[str, torch.Tensor]

    @property
    def num_layers(self) -> int:
        return self.values[LENS_NAMES[0]].shape[1]


class LogitHead:
    """The final norm followed by `lm_head`, applied to hidden states on the head's device and dtype."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module):
        self.norm = norm
        self.lm_head = lm_head

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.lm_head.weight
        hidden_states = hidden_states.to(device=weight.device, dtype=weight.dtype)
        return self.lm_head(self.norm(hidden_states)).float()


class SaturationLenses:
    """Forward hooks on decoder layers and their `self_attn` that record the lenses of each sample."""

    def __init__(self, sample_ids: list[str], num_layers: int):
        self.sample_ids = list(sample_ids)
        self.num_layers = num_layers
        shape = (len(sample_ids), num_layers)
        self._values = {name: torch.zeros(shape, dtype=torch.float64) for name in LENS_NAMES}
        self._measured = {name: torch.zeros(shape, dtype=torch.bool) for name in LENS_NAMES}
        self._pending_states: dict[int, list[torch.Tensor | None]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._batch: Batch | None = None

    # ------------------------------------------------------------------ attach / remove

    def attach(self, layers: Sequence[nn.Module]) -> None:
        """Hook every decoder layer of a loaded model, with `layers[i]` as layer number `i`."""
        for index, layer in enumerate(layers):
            self.attach_layer(index, layer)

    def attach_layer(self, index: int, layer: nn.Module) -> None:
        """Hook one decoder layer and its attention module as layer number `index`."""
        attention = getattr(layer, "self_attn", None)
        if attention is None:
            raise TypeError(f"Decoder layer {index} ({type(layer).__name__}) has no self_attn module to hook")
        self._handles.append(
            attention.register_forward_pre_hook(self._attention_hook(index, attention), with_kwargs=True)
        )
        self._handles.append(layer.register_forward_hook(self._layer_hook(index), with_kwargs=True))

    def remove(self) -> None:
        """Take every hook off."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ collect

    @contextmanager
    def collect(self, batch: Batch) -> Iterator[None]:
        """Record what the hooked layers see while `batch` runs through them."""
        self._batch = batch
        try:
            yield
        finally:
            self._batch = None

    def _attention_hook(self, index: int, attention: nn.Module) -> Callable:
        def hook(module, args, kwargs):
            batch = self._batch
            if batch is None:
                return None
            hidden_states = args[0] if args else kwargs["hidden_states"]
            position_embeddings = kwargs.get("position_embeddings")
            if position_embeddings is None:
                raise TypeError(
                    f"Attention module of layer {index} was called without position_embeddings; the analysis "
                    "needs the rotary embeddings that the decoder layer passes to it"
                )
            with torch.no_grad():
                masses = text_to_image_attention_mass(attention, hidden_states, position_embeddings, batch)
            self._store("attention_mass", index, batch, masses)
            return None

        return hook

    def _layer_hook(self, index: int) -> Callable:
        def hook(module, args, kwargs, output):
            batch = self._batch
            if batch is None:
                return None
            layer_input = args[0] if args else kwargs["hidden_states"]
            layer_output = output[0] if isinstance(output, tuple) else output
            with torch.no_grad():
                self._record_layer_output(index, batch, layer_input, layer_output)
            return None

        return hook

    def _record_layer_output(self, index: int, batch: Batch, layer_input: torch.Tensor, layer_output: torch.Tensor):
        similarities = torch.zeros(len(batch.sample_indices), dtype=torch.float64)
        for row, sample_index in enumerate(batch.sample_indices):
            image_mask = batch.image_mask[row].to(layer_output.device)
            before = layer_input[row, image_mask].float()
            after = layer_output[row, image_mask].float()
            similarities[row] = F.cosine_similarity(before, after, dim=-1).double().mean().cpu()

            positions = batch.lens_positions[row].to(layer_output.device)
            states = self._pending_states.setdefault(sample_index, [None] * self.num_layers)
            states[index] = layer_output[row, positions].float().cpu()
        self._store("cosine_similarity", index, batch, similarities)

    def _store(self, name: str, index: int, batch: Batch, values: torch.Tensor) -> None:
        self._values[name][batch.sample_indices, index] = values
        self._measured[name][batch.sample_indices, index] = True

    # ------------------------------------------------------------------ logit lens and results

    def compute_logit_lens(self, head: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Compare every layer of the pending samples with their last layer through `head`, then free them.

        Call it once all layers have run for those samples. `head` maps hidden states (n, d) to logits.
        """
        for sample_index in sorted(self._pending_states):
            states = self._pending_states.pop(sample_index)
            missing = [layer for layer, value in enumerate(states) if value is None]
            if missing:
                raise RuntimeError(f"Sample {sample_index} has no hidden states for layer(s) {missing}")
            with torch.no_grad():
                final_log_probs = torch.log_softmax(head(states[-1]), dim=-1)
                final_top1 = final_log_probs.argmax(dim=-1)
                for layer, layer_states in enumerate(states):
                    log_probs = torch.log_softmax(head(layer_states), dim=-1)
                    kl = (final_log_probs.exp() * (final_log_probs - log_probs)).sum(dim=-1)
                    top1 = (log_probs.argmax(dim=-1) == final_top1).double()
                    self._values["logit_lens_kl"][sample_index, layer] = kl.double().mean().cpu()
                    self._values["logit_lens_top1"][sample_index, layer] = top1.mean().cpu()
            self._measured["logit_lens_kl"][sample_index] = True
            self._measured["logit_lens_top1"][sample_index] = True

    def finalize(self) -> LensMeasurements:
        """Return the measurements; every sample must have run through every layer and the logit lens."""
        if self._pending_states:
            raise RuntimeError("finalize() called before compute_logit_lens() for the pending samples")
        for name, measured in self._measured.items():
            if not measured.all():
                samples, layers = (~measured).nonzero(as_tuple=True)
                raise RuntimeError(
                    f"Lens {name} was not measured for sample {int(samples[0])} at layer {int(layers[0])}"
                )
        for name, values in self._values.items():
            if not torch.isfinite(values).all():
                samples, layers = (~torch.isfinite(values)).nonzero(as_tuple=True)
                raise VerificationError(
                    f"Lens {name} is not finite for sample {self.sample_ids[int(samples[0])]} at layer "
                    f"{int(layers[0])}: the model's hidden states overflowed or contain NaN. Run the analysis "
                    "with --dtype fp32 (or bf16)."
                )
        return LensMeasurements(self.sample_ids, {name: values.clone() for name, values in self._values.items()})
