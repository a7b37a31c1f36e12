"""Tiny real LLaVA models with random weights, built locally for tests."""

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN_ID = 120
PAD_TOKEN_ID = 0
VOCAB_SIZE = 128


def tiny_llava_config(
    *,
    num_layers: int = 6,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    select_strategy: str = "default",
    feature_layer: int | list[int] = -2,
    image_size: int = 32,
    patch_size: int = 8,
    attn_implementation: str = "eager",
) -> LlavaConfig:
    text_config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        pad_token_id=PAD_TOKEN_ID,
        tie_word_embeddings=tie_word_embeddings,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=image_tokens(image_size, patch_size, select_strategy),
        vision_feature_select_strategy=select_strategy,
        vision_feature_layer=feature_layer,
        tie_word_embeddings=tie_word_embeddings,
    )
    config._attn_implementation = attn_implementation
    return config


def image_tokens(image_size: int, patch_size: int, select_strategy: str) -> int:
    patches = (image_size // patch_size) ** 2
    return patches + (1 if select_strategy == "full" else 0)


def make_tiny_llava(seed: int = 0, **config_kwargs) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(**config_kwargs))
    # Larger random weights than the default initialiser, so that every layer changes the output
    # visibly and routing mistakes cannot hide below the tolerances.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.08)
    return model.eval()


def tiny_processor(image_size: int = 32, patch_size: int = 8):
    """A LlavaProcessor with a word-level tokenizer over the tiny vocabulary and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_TOKEN_ID, "<image>": IMAGE_TOKEN_ID, "<unk>": 1}
    vocab.update({f"w{i}": i for i in range(2, 100)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    template = (
        "{%- for message in messages -%}{{ message['role'] }}: "
        "{%- if message['content'] is string -%}{{ ' ' + message['content'] }}"
        "{%- else -%}{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}{{ ' <image>' }}{%- else -%}{{ ' ' + item['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}{{ ' ' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'w2 ' }}{%- endif -%}"
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
        image_token="<image>",
    )
