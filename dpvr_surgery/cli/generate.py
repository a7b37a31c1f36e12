"""`dpvr-surgery generate`: a quick answer from an original or converted model."""

import json
from dataclasses import asdict

import click

from ..errors import InvalidInputError
from ..generation import answer, load_images, load_model_and_processor
from .options import GroupedCommand, misc_options, model_options, option


@click.command(cls=GroupedCommand)
@click.argument("model", required=False)
@option("--onnx", "onnx_dir", group="Model", type=click.Path(exists=True, file_okay=False),
        help="Answer with the ONNX export in this folder (from `export onnx`) on onnxruntime instead of MODEL; "
        "greedy only, and the Model options do not apply.")
@option("--image", "image_paths", group="Generation", multiple=True, type=click.Path(exists=True, dir_okay=False),
        help="Image file to ask about (repeatable; none for a text-only prompt).")
@option("--prompt", group="Generation", required=True, help="The question or instruction.")
@option("--max-new-tokens", group="Generation", type=click.IntRange(min=1), default=64, show_default=True,
        help="Maximum number of tokens to generate.")
@option("--temperature", group="Generation", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
        help="Sampling temperature; 0 decodes greedily.")
@option("--chat-template/--no-chat-template", group="Generation", default=True, show_default=True,
        help="Wrap the prompt in the processor's chat template; without it, write <image> into the prompt yourself.")
@option("--device", group="Performance", default="auto", show_default=True,
        help="auto, cpu, cuda or cuda:N.")
@option("--json", "as_json", group="Output", is_flag=True, help="Print the answer and timings as JSON.")
@model_options
@misc_options
def generate(model, onnx_dir, image_paths, prompt, max_new_tokens, temperature, chat_template, device, as_json,
             model_options, misc):
    """Answer PROMPT about the given images with MODEL (a LLaVA or converted folder, or a Hub id) or --onnx DIR."""
    if (model is None) == (onnx_dir is None):
        raise InvalidInputError("Pass exactly one of MODEL (a model folder or Hub id) and --onnx DIR (an ONNX export).")
    if onnx_dir is not None:
        if temperature > 0:
            raise InvalidInputError(
                f"--temperature {temperature} is not supported with --onnx: ONNX generation is greedy, so pass "
                "--temperature 0."
            )
        from ..export.onnx_runtime import answer_with_onnx

        result = answer_with_onnx(onnx_dir, prompt, load_images(list(image_paths)), max_new_tokens=max_new_tokens,
                                  use_chat_template=chat_template, device=device)
        click.echo(json.dumps(asdict(result), indent=2) if as_json else result.text)
        return
    loaded, processor = load_model_and_processor(
        model,
        dtype=model_options.dtype,
        device=device,
        revision=model_options.revision,
        cache_dir=model_options.cache_dir,
    )
    result = answer(
        loaded,
        processor,
        prompt,
        load_images(list(image_paths)),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        use_chat_template=chat_template,
        seed=misc.seed,
    )
    if as_json:
        click.echo(json.dumps(asdict(result), indent=2))
    else:
        click.echo(result.text)
