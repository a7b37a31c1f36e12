"""Write a converted model folder: sharded safetensors, atomic folder replacement and side files."""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import secrets
import shutil
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch
from safetensors.torch import save_file

from dpvr_surgery.errors import InvalidInputError

logger = logging.getLogger(__name__)

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"

# --------------------------------------------------------------------------- sizes

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
}
_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_SIZE_EXAMPLES = '"5GB", "500MB", "2GiB", "1.5GB" or a number of bytes such as 1000000'


def parse_size(text: str | int) -> int:
    """Convert a size such as "5GB", "2GiB" or 1000000 to bytes.

    Decimal units (KB, MB, GB, TB) are powers of 1000 and binary units (KiB, MiB, GiB, TiB) powers of
    1024, as in `transformers` 5.25 `max_shard_size`. Unit prefixes are case-insensitive but the B must
    be uppercase, because `transformers` reads a lowercase b as bits. Raises InvalidInputError for text
    that is not a positive whole number of bytes.
    """
    if isinstance(text, bool):
        raise _invalid_size(text)
    if isinstance(text, int):
        if text <= 0:
            raise _invalid_size(text)
        return text

    match = _SIZE_PATTERN.match(str(text))
    if match is None:
        raise _invalid_size(text)

    unit = match.group(2)
    if unit and not unit.endswith("B"):
        raise _invalid_size(text)
    factor = _SIZE_UNITS.get(unit.upper())
    if factor is None:
        raise _invalid_size(text)

    try:
        size = Decimal(match.group(1)) * factor
    except InvalidOperation as error:
        raise _invalid_size(text) from error

    if size <= 0 or size != size.to_integral_value():
        raise _invalid_size(text)
    return int(size)


def _invalid_size(text: object) -> InvalidInputError:
    return InvalidInputError(
        f"Invalid size {text!r}: expected a positive size with an optional unit (B, KB, MB, GB, TB, KiB, MiB, "
        f"GiB, TiB, with an uppercase B) that comes to a whole number of bytes, such as {_SIZE_EXAMPLES}."
    )


# --------------------------------------------------------------------------- sharded safetensors


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, *, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` to the safetensors file `path`, readable like any other file the process creates.

    safetensors 0.8 creates its files with mode 0600 whatever the umask. The mode is reset here, so weight
    files get the same permissions as the config and tokenizer files next to them.
    """
    save_file(tensors, str(path), metadata=metadata)
    apply_umask(path)


def apply_umask(path: Path) -> None:
    """Set the mode of the file `path` to 0666 minus the process umask, as `open()` would have created it."""
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _shard_file_name(index: int, total: int) -> str:
    """Return the `transformers` name of shard `index` (1-based) out of `total`."""
    return f"model-{index:05d}-of-{total:05d}.safetensors"


class ShardedSafetensorsWriter:
    """Write tensors to safetensors shards as they arrive, keeping at most one shard in memory.

    A shard is written when the next tensor would push it over `max_shard_size` bytes, and a single
    tensor larger than the limit gets a shard of its own. `finish()` gives the files their
    `transformers` names: `model.safetensors` for one shard, otherwise
    `model-00001-of-0000N.safetensors` plus `model.safetensors.index.json`.
    """

    def __init__(self, folder: Path, max_shard_size: int, *, metadata: dict[str, str] | None = None) -> None:
        if max_shard_size <= 0:
            raise InvalidInputError(
                f"Invalid max_shard_size {max_shard_size}: expected a positive number of bytes, such as "
                f"{_SIZE_EXAMPLES}."
            )

        self.folder = Path(folder)
        self.max_shard_size = max_shard_size
        self.metadata = {"format": "pt", **(metadata or {})}
        for key, value in self.metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"safetensors metadata must map str to str, got {key!r}: {value!r}")

        self.folder.mkdir(parents=True, exist_ok=True)
        self._names: set[str] = set()
        self._shard: dict[str, torch.Tensor] = {}
        self._shard_bytes = 0
        self._shard_data_pointers: set[int] = set()
        self._written: list[tuple[Path, list[str]]] = []
        self._total_bytes = 0
        self._finished = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor, writing the current shard first if the tensor would overflow it.

        Raises InvalidInputError for a name that was already added.
        """
        if self._finished:
            raise RuntimeError("ShardedSafetensorsWriter.add() called after finish()")
        if name in self._names:
            raise InvalidInputError(
                f"Duplicate tensor name {name!r}: it was already written to {self.folder}. The source checkpoint "
                "probably contains the same weight under two key layouts; remove one of them."
            )

        tensor = self._prepare_tensor(tensor)
        size = tensor.numel() * tensor.element_size()
        if self._shard and self._shard_bytes + size > self.max_shard_size:
            self._write_shard()

        self._names.add(name)
        self._shard[name] = tensor
        self._shard_bytes += size
        self._total_bytes += size
        if tensor.numel() > 0:
            self._shard_data_pointers.add(tensor.data_ptr())

    def _prepare_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return a CPU tensor that safetensors can save: contiguous and owning its whole storage.

        safetensors rejects tensors that share storage, so views, slices and a second reference to a
        tensor already in the shard (tied weights) are cloned.
        """
        tensor = tensor.detach().to("cpu")
        owns_storage = (
            tensor.is_contiguous()
            and tensor.storage_offset() == 0
            and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        )
        already_queued = tensor.numel() > 0 and tensor.data_ptr() in self._shard_data_pointers
        if owns_storage and not already_queued:
            return tensor
        return tensor.clone(memory_format=torch.contiguous_format)

    def _write_shard(self) -> None:
        number = len(self._written) + 1
        path = self.folder / f"model-{number:05d}.safetensors.partial"
        save_safetensors(self._shard, path, metadata=self.metadata)
        logger.debug("Wrote shard %d (%d tensors, %d bytes) to %s", number, len(self._shard), self._shard_bytes, path)

        self._written.append((path, list(self._shard)))
        # Drop the references so that the shard's memory is freed once the caller holds none either.
        self._shard = {}
        self._shard_bytes = 0
        self._shard_data_pointers = set()

    def finish(self) -> list[Path]:
        """Write the last shard, give the shards their final names and write the index if needed.

        Returns the paths of every file written: the shards in order, then the index when there is one.
        """
        if self._finished:
            raise RuntimeError("ShardedSafetensorsWriter.finish() called twice")
        if self._shard:
            self._write_shard()
        self._finished = True

        if not self._written:
            raise InvalidInputError(
                f"No tensors were written to {self.folder}: the source checkpoint contained no weights."
            )

        if len(self._written) == 1:
            final_path = self.folder / SAFETENSORS_NAME
            os.replace(self._written[0][0], final_path)
            logger.info("Wrote %s (%d bytes)", final_path, self._total_bytes)
            return [final_path]

        return self._finish_sharded()

    def _finish_sharded(self) -> list[Path]:
        total = len(self._written)
        weight_map: dict[str, str] = {}
        shard_paths: list[Path] = []

        for number, (partial_path, names) in enumerate(self._written, start=1):
            final_path = self.folder / _shard_file_name(number, total)
            os.replace(partial_path, final_path)
            shard_paths.append(final_path)
            weight_map.update({name: final_path.name for name in names})

        index = {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        index_path = self.folder / SAFETENSORS_INDEX_NAME
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")

        logger.info("Wrote %d shards (%d bytes) and %s to %s", total, self._total_bytes, index_path.name, self.folder)
        return [*shard_paths, index_path]


# --------------------------------------------------------------------------- atomic output folder


@contextmanager
def atomic_output_dir(output: Path, *, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Yield a new temporary folder next to `output` and rename it to `output` when the block succeeds.

    With `overwrite`, an existing `output` is moved aside first and deleted only after the rename
    succeeded. On any exception the temporary folder is removed and an existing `output` is left as it
    was. Raises InvalidInputError before anything is written when `output` is a file, a symbolic link,
    or a non-empty folder and `overwrite` is false, or when replacing `output` would delete one of the
    `inputs` (local paths the command reads; None and Hub ids that are not local paths are skipped).
    """
    output = Path(output)
    check_output_not_input(output, inputs)
    _check_output_target(output, overwrite=overwrite)

    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = _make_sibling_dir(output, "tmp")
    logger.debug("Writing %s through temporary folder %s", output, temporary)

    try:
        yield temporary
        _check_output_target(output, overwrite=overwrite)
        _replace_output(temporary, output)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def check_output_not_input(output: Path, inputs: Iterable[str | Path | None]) -> None:
    """Raise InvalidInputError when `output` is one of `inputs` or a folder that contains one."""
    target = output.resolve()
    for item in inputs:
        if item is None or not Path(item).exists():
            continue
        path = Path(item).resolve()
        if path == target or target in path.parents:
            raise InvalidInputError(
                f"Invalid output folder {output}: writing there would replace the input {item}, which this "
                "command reads. Choose an output folder outside the input."
            )


def _check_output_target(output: Path, *, overwrite: bool) -> None:
    if output.is_symlink():
        raise InvalidInputError(
            f"Invalid output folder {output}: it is a symbolic link. Pass the folder it points to, or another path."
        )
    if output.exists() and not output.is_dir():
        raise InvalidInputError(
            f"Invalid output folder {output}: a file with that name exists. Choose another output folder."
        )
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise InvalidInputError(
            f"Output folder {output} already exists and is not empty. Pass --overwrite to replace it, "
            "or choose another output folder."
        )


def _make_sibling_dir(output: Path, kind: str) -> Path:
    """Create an empty folder `.NAME.KIND-XXXXXXXX` next to `output`, honouring the umask."""
    while True:
        candidate = output.parent / f".{output.name}.{kind}-{secrets.token_hex(4)}"
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate


def _replace_output(temporary: Path, output: Path) -> None:
    if not output.exists():
        temporary.rename(output)
        return

    if not any(output.iterdir()):
        output.rmdir()
        temporary.rename(output)
        return

    backup = _make_sibling_dir(output, "old")
    backup.rmdir()
    output.rename(backup)
    try:
        temporary.rename(output)
    except BaseException:
        backup.rename(output)
        raise

    logger.info("Replaced existing output folder %s", output)
    try:
        shutil.rmtree(backup)
    except OSError as error:
        # The new output is complete at this point, so a leftover copy of the old one is not an error.
        logger.warning("Could not delete the previous output folder, moved to %s: %s", backup, error)


# --------------------------------------------------------------------------- side files

# Weight files and weight indexes, which the converter writes itself.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx")
_WEIGHT_INDEX_PATTERN = re.compile(r"\.(safetensors|bin|pt|pth|h5|msgpack)\.index\.json$")
_EXCLUDED_NAMES = ("config.json", "README.md")


def copy_side_files(source: Path, destination: Path) -> list[str]:
    """Copy the tokenizer, processor, chat template, generation config and other side files of a model.

    Copies every regular file of `source` (following symbolic links, as in the Hugging Face cache) except
    weights and weight indexes, `config.json`, `README.md`, `*.py` files, hidden files and subfolders.
    Returns the names copied, sorted.
    """
    source = Path(source)
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)

    copied: list[str] = []
    for path in sorted(source.iterdir()):
        if not path.is_file() or _is_excluded_side_file(path.name):
            continue
        shutil.copyfile(path, destination / path.name)
        copied.append(path.name)

    logger.debug("Copied %d side files from %s: %s", len(copied), source, ", ".join(copied))
    return copied


def _is_excluded_side_file(name: str) -> bool:
    return (
        name.startswith(".")
        or name in _EXCLUDED_NAMES
        or name.endswith(".py")
        or name.endswith(_WEIGHT_SUFFIXES)
        or _WEIGHT_INDEX_PATTERN.search(name) is not None
    )


# --------------------------------------------------------------------------- memory


def peak_rss_bytes() -> int:
    """Return the peak resident set size of this process in bytes, from `getrusage`.

    Linux reports `ru_maxrss` in KiB and macOS in bytes.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":
        return int(peak)
    return int(peak) * 1024
