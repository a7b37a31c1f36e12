"""Exporter configs of the three ONNX graphs, on optimum core's `ExporterConfig` and dummy-input generators.

Each config names the graph's inputs and outputs with their dynamic axes, as optimum's ONNX configs
do, and generates the sample inputs that `torch.export` traces with. `optimum-onnx`, which contains
optimum's ready-made ONNX configs, requires transformers < 4.58, so only the `optimum` core classes
are used: `ExporterConfig`, the normalized configs, `DummyVisionInputGenerator`,
`DummyTextInputGenerator` and the `DummyInputGenerator` base with its random-tensor helpers.

Axis names follow optimum: `batch_size`, `sequence_length`, `past_sequence_length`, and for the
sum of past and new tokens `past_sequence_length + sequence_length`. Deep text-only layers cache
text positions only, so their past length has its own name, `past_text_sequence_length`.
"""

from optimum.exporters.base import ExporterConfig
from optimum.utils.input_generators import DummyInputGenerator, DummyTextInputGenerator, DummyVisionInputGenerator
from optimum.utils.normalized_config import NormalizedTextConfigWithGQA, NormalizedVisionConfig

# Axes whose length is the sum of two others. `torch.export` infers their relation itself.
TOTAL_LENGTH_AXIS = "past_sequence_length + sequence_length"
TOTAL_TEXT_LENGTH_AXIS = "past_text_sequence_length + text_sequence_length"
# Axes that may be empty at run time (prefill starts with no past).
PAST_AXES = ("past_sequence_length", "past_text_sequence_length")

DECODER_ROUTING_INPUTS = (
    "inputs_embeds",
    "attention_mask",
    "position_ids",
    "text_index",
    "text_attention_mask",
    "image_index",
    "image_attention_mask",
)


class VisionEncoderExporterConfig(ExporterConfig):
    """The vision tower with the projector: `pixel_values` (n, c, h, w) to `image_features` (n, v, d)."""

    NORMALIZED_CONFIG_CLASS = NormalizedVisionConfig
    DUMMY_INPUT_GENERATOR_CLASSES = (DummyVisionInputGenerator,)
    ATOL_FOR_VALIDATION = 1e-4

    @property
    def inputs(self) -> dict[str, dict[int, str]]:
        # Height and width stay fixed: the CLIP position embeddings have one entry per patch.
        return {"pixel_values": {0: "num_images"}}

    @property
    def outputs(self) -> dict[str, dict[int, str]]:
        return {"image_features": {0: "num_images"}}


class EmbedTokensExporterConfig(ExporterConfig):
    """The token embedding: `input_ids` (b, t) to `inputs_embeds` (b, t, d)."""

    NORMALIZED_CONFIG_CLASS = NormalizedTextConfigWithGQA
    DUMMY_INPUT_GENERATOR_CLASSES = (DummyTextInputGenerator,)
    ATOL_FOR_VALIDATION = 1e-4

    @property
    def inputs(self) -> dict[str, dict[int, str]]:
        return {"input_ids": {0: "batch_size", 1: "sequence_length"}}

    @property
    def outputs(self) -> dict[str, dict[int, str]]:
        return {"inputs_embeds": {0: "batch_size", 1: "sequence_length"}}


class DummyRoutedDecoderInputGenerator(DummyInputGenerator):
    """
    Sample inputs of the routed decoder, consistent with each other so that the traced forward pass runs.

    Every axis gets a different length of at least 2, because `torch.export` specialises axes of
    length 0 or 1 and would tie axes whose sample lengths it can prove equal.
    """

    SUPPORTED_INPUT_NAMES = (*DECODER_ROUTING_INPUTS, "past_key_values")

    def __init__(
        self,
        task: str,
        normalized_config: NormalizedTextConfigWithGQA,
        text_only_layers: range,
        batch_size: int = 2,
        sequence_length: int = 7,
        past_sequence_length: int = 5,
        past_text_sequence_length: int = 3,
        text_sequence_length: int = 4,
        num_images: int = 3,
        image_sequence_length: int = 6,
        **kwargs,
    ):
        self.task = task
        self.hidden_size = normalized_config.hidden_size
        self.num_key_value_heads = normalized_config.num_key_value_heads
        self.head_dim = getattr(
            normalized_config.config, "head_dim", None
        ) or self.hidden_size // normalized_config.num_attention_heads
        self.text_only_layers = text_only_layers
        self.batch_size = batch_size
        self.sequence_length = sequence_length
        self.past_sequence_length = past_sequence_length
        self.past_text_sequence_length = past_text_sequence_length
        self.text_sequence_length = text_sequence_length
        self.num_images = num_images
        self.image_sequence_length = image_sequence_length

    def generate(self, input_name: str, framework: str = "pt", int_dtype: str = "int64", float_dtype: str = "fp32"):
        batch, length = self.batch_size, self.sequence_length
        if input_name == "inputs_embeds":
            return self.random_float_tensor([batch, length, self.hidden_size], -1, 1, framework, float_dtype)
        if input_name == "attention_mask":
            total = self.past_sequence_length + length
            return self.constant_tensor([batch, total], 1, _int_dtype(framework, int_dtype), framework)
        if input_name == "position_ids":
            return self.random_int_tensor([batch, length], self.past_sequence_length + length, 0, framework, int_dtype)
        if input_name == "text_index":
            return self.random_int_tensor([batch, self.text_sequence_length], length, 0, framework, int_dtype)
        if input_name == "text_attention_mask":
            total = self.past_text_sequence_length + self.text_sequence_length
            return self.constant_tensor([batch, total], 1, _int_dtype(framework, int_dtype), framework)
        if input_name == "image_index":
            shape = [self.num_images, self.image_sequence_length]
            return self.random_int_tensor(shape, batch * length, 0, framework, int_dtype)
        if input_name == "image_attention_mask":
            shape = [self.num_images, self.image_sequence_length]
            return self.constant_tensor(shape, 1, _int_dtype(framework, int_dtype), framework)
        return self._generate_past(input_name, framework, float_dtype)

    def _generate_past(self, input_name: str, framework: str, float_dtype: str):
        layer = int(input_name.split(".")[1])
        past = self.past_text_sequence_length if layer in self.text_only_layers else self.past_sequence_length
        shape = [self.batch_size, self.num_key_value_heads, past, self.head_dim]
        return self.random_float_tensor(shape, -1, 1, framework, float_dtype)


def _int_dtype(framework: str, int_dtype: str):
    if framework == "pt":
        import torch

        return {"int64": torch.int64, "int32": torch.int32}[int_dtype]
    import numpy as np

    return {"int64": np.int64, "int32": np.int32}[int_dtype]


class RoutedDecoderExporterConfig(ExporterConfig):
    """
    The routed decoder with its KV cache, for prefill and decode alike (optimum's "merged" decoder).

    Layer `i` of the language model has `past_key_values.{i}.key|value` inputs and
    `present.{i}.key|value` outputs. Shared and fusion layers hold every position; deep text-only
    layers hold text positions only, so their past and present lengths have their own axis names.
    The side-branch layers keep no cache.
    """

    NORMALIZED_CONFIG_CLASS = NormalizedTextConfigWithGQA
    DUMMY_INPUT_GENERATOR_CLASSES = (DummyRoutedDecoderInputGenerator,)
    ATOL_FOR_VALIDATION = 1e-4

    def __init__(self, config, task: str = "text-generation", int_dtype: str = "int64", float_dtype: str = "fp32"):
        super().__init__(config.text_config, task, int_dtype=int_dtype, float_dtype=float_dtype)
        self.num_layers = config.text_config.num_hidden_layers
        self.text_only_layers = config.deep_layers

    def _create_dummy_input_generator_classes(self, **kwargs) -> list[DummyInputGenerator]:
        return [
            generator(self.task, self._normalized_config, text_only_layers=self.text_only_layers, **kwargs)
            for generator in self.DUMMY_INPUT_GENERATOR_CLASSES
        ]

    @property
    def inputs(self) -> dict[str, dict[int, str]]:
        axes = {
            "inputs_embeds": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: TOTAL_LENGTH_AXIS},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "text_index": {0: "batch_size", 1: "text_sequence_length"},
            "text_attention_mask": {0: "batch_size", 1: TOTAL_TEXT_LENGTH_AXIS},
            "image_index": {0: "num_images", 1: "image_sequence_length"},
            "image_attention_mask": {0: "num_images", 1: "image_sequence_length"},
        }
        for layer in range(self.num_layers):
            past = "past_text_sequence_length" if layer in self.text_only_layers else "past_sequence_length"
            for kind in ("key", "value"):
                axes[f"past_key_values.{layer}.{kind}"] = {0: "batch_size", 2: past}
        return axes

    @property
    def outputs(self) -> dict[str, dict[int, str]]:
        axes = {"logits": {0: "batch_size", 1: "sequence_length"}}
        for layer in range(self.num_layers):
            total = TOTAL_TEXT_LENGTH_AXIS if layer in self.text_only_layers else TOTAL_LENGTH_AXIS
            for kind in ("key", "value"):
                axes[f"present.{layer}.{kind}"] = {0: "batch_size", 2: total}
        return axes


__all__ = [
    "DECODER_ROUTING_INPUTS",
    "PAST_AXES",
    "TOTAL_LENGTH_AXIS",
    "TOTAL_TEXT_LENGTH_AXIS",
    "DummyRoutedDecoderInputGenerator",
    "EmbedTokensExporterConfig",
    "RoutedDecoderExporterConfig",
    "VisionEncoderExporterConfig",
]
