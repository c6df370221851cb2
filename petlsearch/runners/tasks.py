"""Task: a data source, a model factory and a metric. `get_task(name, model)` builds one by name:

- `rotten_tomatoes` (default): fresh/rotten snippets, text classification.
- `fashion_mnist`: Fashion-MNIST images (resized), image classification.
- `digits`: scikit-learn's 8x8 digits (tiny, for quick checks).
- `csv:PATH` / `jsonl:PATH`: the user's text file (`text_column`, `label_column`).
- `images:DIR`: a folder of images by class.
- `hub:NAME`: a Hugging Face `datasets` name (needs the network).
- `multi:TASK+TASK`: a mixture of classification tasks on one backbone, a head per task.
- `lm:PATH`: causal language modelling on a text file (.txt lines, or the `text_column` of a
  CSV / JSONL) with a decoder (`--model` a local folder or hub name); metric: next-token accuracy,
  perplexity reported.

Models: `minilm` (default, the packaged all-MiniLM-L6-v2), `efficientnet-lite0`, a local
folder with a config.json, or a hub name when online.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from petlsearch.errors import TaskError, did_you_mean
from petlsearch.runners import data as D
from petlsearch.runners.task import Task
from petlsearch.smoke import smoke

__all__ = ["DEFAULT_MODEL", "DEFAULT_TASK", "TASKS", "Task", "build_model", "get_task", "text_encoder", "text_model"]

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)


DEFAULT_MODEL = "minilm"
DEFAULT_TASK = "rotten_tomatoes"
TEXT_MODELS = {"minilm": "all-MiniLM-L6-v2", "all-minilm-l6-v2": "all-MiniLM-L6-v2"}
IMAGE_MODELS = {"efficientnet-lite0", "efficientnet_lite0"}
# runners.named_models: built from their packages on first use; alias (the backbone's name too) -> key
NAMED_MODELS = {"mpnet": "mpnet", "all-mpnet-base-v2": "mpnet", "smollm2": "smollm2",
                "smollm2-135m-instruct": "smollm2"}
TASKS = ("rotten_tomatoes", "fashion_mnist", "digits", "csv:PATH", "jsonl:PATH", "images:DIR", "hub:NAME", "lm:PATH",
         "multi:TASK+TASK")


# ---------------------------------------------------------------------------- factories
def display_name(path: str) -> str:
    """How a model is named in logs and structure files: a local folder (a named model's cache
    folder is named after the model) by its own name, a hub name as it is."""
    from pathlib import Path

    return Path(path).name if Path(path).is_dir() else path


def text_model(name: str, num_labels: int) -> tuple[str, Callable[[], nn.Module], Any]:
    """(display name, model factory, tokenizer) for a text backbone."""
    from pathlib import Path

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    key = name.lower()
    if key in TEXT_MODELS:
        path, display = D.minilm_path(), TEXT_MODELS[key]
    elif key in NAMED_MODELS or Path(name).is_dir() or "/" in name:
        path = _named_folder(key) if key in NAMED_MODELS else name
        display = display_name(path)
    else:
        known = list(TEXT_MODELS) + list(NAMED_MODELS) + sorted(IMAGE_MODELS)
        raise TaskError(f"unknown model '{name}'{did_you_mean(key, known)}; use minilm, mpnet, smollm2, "
                        "efficientnet-lite0, a local model folder, or a hub name org/model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise TaskError(f"cannot load model '{name}' ({str(exc).splitlines()[0][:120]}); offline machines "
                        "can use the packaged default 'minilm' or a local folder") from None

    def factory() -> nn.Module:
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the new head's "newly initialized" report is expected
        hf_logging.disable_progress_bar()
        try:
            return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
        finally:
            hf_logging.set_verbosity(level)
            hf_logging.enable_progress_bar()

    return display, factory, tokenizer


def _named_folder(name: str) -> str:
    """The cache folder of named model `name` (an alias in NAMED_MODELS), built on first use."""
    from petlsearch.runners.named_models import model_folder

    return str(model_folder(NAMED_MODELS[name.lower()]))


def text_encoder(tokenizer: Any, max_length: int) -> Callable[[list[str]], dict[str, Any]]:
    """texts -> the tokenizer's tensors, padded to the longest and cut at `max_length` tokens."""

    def encode(texts: list[str]) -> dict[str, Any]:
        enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return dict(enc)
    return encode


def _image_encoder(size: int, channels: int = 3) -> Callable[[np.ndarray], dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    mean = torch.tensor([0.485, 0.456, 0.406][:channels]).view(1, -1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225][:channels]).view(1, -1, 1, 1)

    def encode(images: np.ndarray) -> dict[str, Any]:
        x = torch.as_tensor(np.asarray(images), dtype=torch.float32) / 255.0
        if x.dim() == 3:  # (N, H, W) grey -> (N, C, H, W)
            x = x.unsqueeze(1).expand(-1, channels, -1, -1)
        else:  # (N, H, W, C)
            x = x.permute(0, 3, 1, 2)
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return {"pixel_values": (x - mean) / std}
    return encode


def get_task(name: str = DEFAULT_TASK, model: str | None = None, *, text_column: str = "text",
             label_column: str = "label", max_length: int = 64, image_size: int = 64, seed: int = 0,
             limit: int | None = None) -> Task:
    """Build the task `name` on backbone `model` (defaults: Rotten Tomatoes on MiniLM)."""
    capped = smoke()
    if capped is not None:
        limit = min(limit or capped.examples, capped.examples)
    kind, _, arg = name.partition(":")
    if kind == "multi" and arg:  # multi:rotten_tomatoes+csv:PATH
        from petlsearch.runners.multitask import multitask, task_keys  # torch: imported when used

        keys = task_keys(p for p in arg.split("+") if p)
        return multitask({key: get_task(spec, model, text_column=text_column, label_column=label_column,
                                        max_length=max_length, image_size=image_size, seed=seed, limit=limit)
                          for spec, key in keys.items()}, name)
    if kind == "rotten_tomatoes":
        splits, modality = D.rotten_tomatoes(seed), "text"
    elif kind in ("csv", "jsonl") and arg:
        splits, modality = D.text_file(arg, text_column, label_column, seed), "text"
    elif kind == "hub" and arg:
        splits, modality = D.hub_dataset(arg, text_column, label_column, seed), "text"
    elif kind == "fashion_mnist":
        splits, modality = D.fashion_mnist(seed, limit=limit), "image"
    elif kind == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        images = (d.images * (255.0 / 16.0)).astype(np.uint8)
        splits, modality = D.stratified_splits(images, d.target.astype(np.int64),
                                               tuple(str(i) for i in range(10)), seed), "image"
    elif kind == "lm" and arg:
        return _lm_task(name, arg, model, text_column, max_length, seed, limit)
    elif kind == "images" and arg:
        splits, modality = D.image_folder(arg, image_size, seed), "image"
    else:
        raise TaskError(f"unknown task '{name}'{did_you_mean(name, [t.split(':')[0] for t in TASKS])}; "
                        f"choose one of {', '.join(TASKS)}")
    if limit is not None and kind != "fashion_mnist":  # fashion_mnist reads only `limit` examples itself
        splits = splits.subset(limit, max(limit // 8, 2 * len(splits.classes)), seed)  # evaluation shrinks too
    n = len(splits.classes)
    if modality == "text":
        display, factory, tokenizer = text_model(model or DEFAULT_MODEL, n)
        return Task(name, "text", splits, display, factory, text_encoder(tokenizer, max_length), max_length=max_length,
                    tokenizer=tokenizer)
    model = model or "efficientnet-lite0"
    if model.lower() in IMAGE_MODELS:
        def image_factory() -> nn.Module:
            from petlsearch.runners.models import ImageClassifier

            return ImageClassifier(D.efficientnet_lite0(n))

        return Task(name, "image", splits, "efficientnet-lite0", image_factory, _image_encoder(image_size))
    return _hf_image_task(name, splits, model)


def _hf_image_task(name: str, splits: D.Splits, model: str) -> Task:
    """A transformers image classifier (ViT, CLIP vision tower, ...) from a local folder or the hub."""
    from transformers import AutoConfig, AutoModelForImageClassification

    try:
        config = AutoConfig.from_pretrained(model)
    except OSError as exc:
        raise TaskError(f"cannot load image model '{model}' ({str(exc).splitlines()[0][:120]}); offline "
                        "machines can use --model efficientnet-lite0 or a local folder") from None
    size = getattr(config, "image_size", None) or getattr(getattr(config, "vision_config", None), "image_size", 224)
    n = len(splits.classes)

    def factory() -> nn.Module:
        return AutoModelForImageClassification.from_pretrained(model, num_labels=n, ignore_mismatched_sizes=True)

    return Task(name, "image", splits, model, factory, _image_encoder(int(size)))


def build_model(name: str) -> nn.Module:
    """A model by name for inspection and export: the packaged defaults with weights, or any other
    config (local folder or hub name) built on the meta device (shapes only, no memory)."""
    if name.lower() in TEXT_MODELS or name.lower() in NAMED_MODELS:
        return text_model(name, 2)[1]()
    if name.lower() in IMAGE_MODELS:
        return D.efficientnet_lite0(10)
    import torch
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as exc:
        raise TaskError(f"unknown model '{name}': {str(exc).splitlines()[0][:150]}") from None
    with torch.device("meta"):
        return AutoModel.from_config(config)


def _lm_task(name: str, path: str, model: str | None, text_column: str, max_length: int, seed: int,
             limit: int | None = None) -> Task:
    """Causal LM on a text file: one example per line (.txt) or per row (CSV / JSONL); `limit` keeps
    the first that many."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    file = Path(path)
    if not file.is_file():
        raise TaskError(f"{file}: no such file")
    if file.suffix == ".txt":
        texts = [t for t in file.read_text(errors="replace").splitlines() if t.strip()]
    else:
        texts = D.text_file(file, text_column, text_column, seed).x_train  # reuse the CSV/JSONL reader
    texts = texts[:limit] if limit is not None else texts
    if len(texts) < 10:
        raise TaskError(f"{file}: {len(texts)} non-empty texts; a language-modelling task needs at least 10")
    if model is None:
        raise TaskError("an lm: task needs --model: smollm2, a local causal LM folder or a hub name (e.g. gpt2)")
    if model.lower() in NAMED_MODELS:
        model = _named_folder(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except OSError as exc:
        raise TaskError(f"cannot load model '{model}' ({str(exc).splitlines()[0][:120]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    y = np.zeros(len(texts), dtype=np.int64)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(texts))
    cut = [int(0.8 * len(texts)), int(0.9 * len(texts))]
    parts = [idx[: cut[0]], idx[cut[0]: cut[1]], idx[cut[1]:]]
    splits = D.Splits(*[v for p in parts for v in ([texts[i] for i in p], y[p])], classes=("token",))

    def encode(batch: list[str]) -> dict[str, Any]:
        enc = dict(tokenizer(list(batch), padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100  # no loss on padding
        enc["labels"] = labels
        return enc

    return Task(name, "lm", splits, display_name(model), lambda: AutoModelForCausalLM.from_pretrained(model), encode,
                metric="token_accuracy", max_length=max_length, tokenizer=tokenizer)
