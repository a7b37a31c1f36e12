"""Configuration of a DPVR-LF (dual-path vision token routing with late-layer fusion) LLaVA model.

This file is copied next to the weights of every converted model and loaded there with
`trust_remote_code=True`, so it imports only `torch` and `transformers`.
"""

from transformers import LlavaConfig

SIDE_BRANCH_INITS = ("copy", "copy-last", "random")


class DpvrLlavaConfig(LlavaConfig):
    r"""
    A `LlavaConfig` plus the routing fields of the dual-path graph.

    With `L` language-model layers, split layer `s`, side-branch depth `d_v` and `K` fusion layers:
    layers `0 .. s-1` run every token; the image tokens then pass through `d_v` new side-branch
    layers while the text tokens alone pass through layers `s .. L-K-1`; layers `L-K .. L-1` run
    every token again.

    Args:
        split_layer (`int`):
            First language-model layer that image tokens skip (`s`), with `1 <= s <= L-K-1`.
        side_branch_depth (`int`):
            Number of side-branch decoder layers (`d_v`).
        num_fusion_layers (`int`):
            Number of final layers that see image and text tokens again (`K`).
        side_branch_init (`str`):
            How the converter initialised the side branch: "copy" (layers `s .. s+d_v-1`),
            "copy-last" (the `d_v` layers just before the fusion layers) or "random".
        saturation (`dict`, *optional*):
            Summary of the saturation analysis that chose the split, or None.
    """

    model_type = "dpvr_llava"

    split_layer: int = 1
    side_branch_depth: int = 1
    num_fusion_layers: int = 1
    side_branch_init: str = "copy"
    saturation: dict | None = None

    def validate_architecture(self):
        super().validate_architecture()
        num_layers = self.text_config.num_hidden_layers
        for name in ("split_layer", "side_branch_depth", "num_fusion_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.side_branch_depth < 1:
            raise ValueError(f"side_branch_depth must be at least 1, got {self.side_branch_depth}")
        if self.num_fusion_layers < 1:
            raise ValueError(f"num_fusion_layers must be at least 1, got {self.num_fusion_layers}")
        last_split = num_layers - self.num_fusion_layers - 1
        if not 1 <= self.split_layer <= last_split:
            raise ValueError(
                f"split_layer {self.split_layer} is outside the valid range 1..{last_split} for a language "
                f"model with {num_layers} layers and {self.num_fusion_layers} fusion layer(s)"
            )
        if self.side_branch_init not in SIDE_BRANCH_INITS:
            raise ValueError(
                f"side_branch_init must be one of {', '.join(SIDE_BRANCH_INITS)}, got {self.side_branch_init!r}"
            )

    @property
    def deep_layers(self) -> range:
        """Indices of the language-model layers that run text tokens only."""
        return range(self.split_layer, self.text_config.num_hidden_layers - self.num_fusion_layers)

    @property
    def fusion_layers(self) -> range:
        """Indices of the final language-model layers that see every token again."""
        num_layers = self.text_config.num_hidden_layers
        return range(num_layers - self.num_fusion_layers, num_layers)


__all__ = ["DpvrLlavaConfig", "SIDE_BRANCH_INITS"]
