"""Read a timm hub-style model folder: ``config.json`` beside ``model.safetensors`` or ``pytorch_model.bin``.

This is the layout timm and the Hugging Face hub use for a model (``timm.models.push_to_hf_hub`` writes
it). The config names the architecture and its arguments::

    {"architecture": "resnet50d", "num_classes": 10, "model_args": {"drop_rate": 0.0}}

so ``prunecp score path/to/folder`` needs no ``--arch``: the folder is the checkpoint of
``timm:<architecture>``, built with ``pretrained=False``. Only JSON is read; the weights are read as
any checkpoint (safetensors, or a weights-only ``torch.load``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prunecp_cli.checks import is_int
from prunecp_cli.errors import CheckpointError

#: Weight files looked for in a hub folder, in this order.
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
#: The largest config.json read.
MAX_CONFIG_BYTES = 1_000_000


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def read_hub_folder(folder: Path) -> tuple[str, dict[str, Any], Path]:
    """The architecture spec, its arguments and the weight file of a hub-style folder.

    Raises:
        CheckpointError: no or malformed ``config.json``, or no weight file.
    """
    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{folder} is a folder without config.json; pass a checkpoint file, or a timm hub "
                              f"folder (config.json beside {' or '.join(HUB_WEIGHTS)})")
    if config.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{config} is larger than {MAX_CONFIG_BYTES:,} bytes; it is not a model config")
    try:
        fields = json.loads(config.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{config} is not valid JSON ({str(exc)[:100]}); fix or re-export it") from None
    if not isinstance(fields, dict):
        raise CheckpointError(f"{config} must hold a JSON object with \"architecture\"")
    name = fields.get("architecture")
    if not isinstance(name, str) or not name.isidentifier() or len(name) > 100:
        raise CheckpointError(f"{config}: \"architecture\" must name a timm model such as \"resnet50d\", got "
                              f"{str(name)[:80]!r}")
    kwargs = fields.get("model_args", {})
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{config}: \"model_args\" must be a JSON object, got {type(kwargs).__name__}")
    kwargs = dict(kwargs)
    if "num_classes" in fields:
        classes = fields["num_classes"]
        if not is_int(classes) or not 1 <= classes <= 1_000_000:
            raise CheckpointError(f"{config}: \"num_classes\" must be a positive integer, got {str(classes)[:40]}")
        kwargs.setdefault("num_classes", classes)
    for weights in HUB_WEIGHTS:
        if (folder / weights).is_file():
            return f"timm:{name}", kwargs, folder / weights
    raise CheckpointError(f"{folder} holds config.json but no weights; put {' or '.join(HUB_WEIGHTS)} beside it")
