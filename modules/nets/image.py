"""The camera-frame encoder of the image-embedding context: a timm backbone and a fixed-scale embedding.

METHOD.md section 1, "image_embedding": each view is encoded by the backbone, and its embedding is
brought to a fixed scale by a LayerNorm without affine parameters, so that forward noising
(``modules.nets.schedule.noise_context``) mixes signal and N(0, I) noise at comparable scales whatever
the backbone's feature magnitudes. timm is imported only when a backbone is built, so loading a config
(``PolicyConfig``) never imports it.
"""

import contextlib
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.nets.keys import IMAGE
from modules.nets.normalizer import _MIN_SCALE, _as_stat

NORMS = ("batch", "group")
EMBED_NORMS = ("dataset", "layer")
POOLS = ("avg", "flatten")
_WHERE = "policy.image_encoder"  # the config key every error message names
_SOURCE_PREFIXES = ("hf-hub:", "local-dir:")  # timm names that point at a source, not the registry


@dataclass
class ImageEncoderConfig:
    """The camera-frame encoder of ``context_mode="image_embedding"`` (``policy.image_encoder``).

    Attributes:
        name: a timm model name (``timm.list_models()``), built with ``num_classes=0``: pooled features.
        pretrained: load timm's pretrained weights (from the Hugging Face cache: nothing is downloaded
            offline); exclusive with ``weights``.
        weights: a local weights file, a torch state dict (.pt/.pth/.bin, possibly under "state_dict" or
            "model") or a .safetensors file; classifier entries are dropped. None: no file.
        norm: "batch" keeps timm's BatchNorm2d layers; "group" swaps each for a GroupNorm (after the
            weights are loaded, affine parameters copied), which does not depend on the batch.
        frozen: the backbone is not trained: no gradients, and it stays in eval mode (BatchNorm
            statistics fixed) even when the policy trains.
        image_size: [H, W], the size every frame must have.
        views: V, frames per sample (cameras x stacked frames).
        pool: "avg": timm's own pooling of the last feature map (a global average for CNNs): D =
            num_features; "flatten": the last feature map flattened (D = C x h x w, e.g. 368 x 2 x 2 for
            regnetx_002 at 64 pixels), which keeps WHERE a feature fired: what a small object's position
            (a goal marker) is.
        embed_norm: how the embedding is brought to a fixed scale before CSP noises it. "dataset": each
            feature standardized by statistics over the data (batch statistics in training, their running
            averages, carried in the checkpoint, at evaluation): unit variance ACROSS frames, as the
            low-dimensional contexts' z-scores, so sigma is measured against how contexts differ.
            "layer": a LayerNorm without affine per view (mean 0, std 1 across each frame's D features);
            what is common to every frame (a static scene) then dominates it.
    """

    name: str = "resnet18"
    pretrained: bool = False
    weights: str | None = None
    norm: str = "group"
    frozen: bool = False
    image_size: list[int] = field(default_factory=lambda: [64, 64])
    views: int = 1
    pool: str = "avg"
    embed_norm: str = "dataset"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (and store ``image_size`` as a list); raise ValueError naming the field."""
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"{_WHERE}.name={self.name!r}; expected a non-empty timm model name")
        for name in ("pretrained", "frozen"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{_WHERE}.{name}={getattr(self, name)!r}; expected true or false")
        if self.weights is not None and (not isinstance(self.weights, str) or not self.weights.strip()):
            raise ValueError(
                f"{_WHERE}.weights={self.weights!r}; expected None or the path of a weights file"
            )
        if self.pretrained and self.weights is not None:
            raise ValueError(
                f"{_WHERE}.pretrained=True and {_WHERE}.weights={self.weights!r}; set one of them: weights "
                "is a local file of (pretrained) weights, pretrained reads timm's own"
            )
        if self.norm not in NORMS:
            raise ValueError(f"{_WHERE}.norm={self.norm!r}; expected one of {list(NORMS)}")
        size = self.image_size
        if (
            not isinstance(size, list | tuple)
            or len(size) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 8 for v in size)
        ):
            raise ValueError(f"{_WHERE}.image_size={size!r}; expected [H, W], two integers >= 8")
        self.image_size = list(size)
        if self.pool not in POOLS:
            raise ValueError(f"{_WHERE}.pool={self.pool!r}; expected one of {list(POOLS)}")
        if self.embed_norm not in EMBED_NORMS:
            raise ValueError(f"{_WHERE}.embed_norm={self.embed_norm!r}; expected one of {list(EMBED_NORMS)}")
        if isinstance(self.views, bool) or not isinstance(self.views, int) or self.views < 1:
            raise ValueError(f"{_WHERE}.views={self.views!r}; expected an integer >= 1 (cameras x frames)")

    @classmethod
    def from_value(cls, value: "ImageEncoderConfig | Mapping[str, Any]") -> "ImageEncoderConfig":
        """``value`` itself, or the config of a dict of its fields (as ``asdict`` writes in a checkpoint)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{_WHERE} is {type(value).__name__}; expected a mapping of its fields")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(map(str, value)) - set(known))
        if unknown:
            raise ValueError(f"{_WHERE} has unknown keys {unknown}; expected some of {known}")
        return cls(**dict(value))

    def without_weight_sources(self) -> "ImageEncoderConfig":
        """A copy that reads no weights: pretrained False, weights None (a checkpoint carries them)."""
        return replace(self, pretrained=False, weights=None)


# ---------------------------------------------------------------------------- backbone
def _check_name(name: str) -> None:
    import timm

    if name.startswith(_SOURCE_PREFIXES) or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f"did you mean {' or '.join(map(repr, close))}?" if close else "see timm.list_models()"
    raise ValueError(f"{_WHERE}.name={name!r} is not a timm model; {hint}")


def read_weights(path: str) -> dict[str, Tensor]:
    """The state dict in a local weights file (.safetensors, or torch.save of a dict of tensors, possibly
    under "state_dict" or "model"); FileNotFoundError naming the path when there is no such file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{_WHERE}.weights={path!r}: no such file")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(file, device="cpu")
    else:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # training-script wrappers
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{_WHERE}.weights={path!r} holds {type(obj).__name__}; expected a state dict")
    return dict(obj)


def load_weights_into(model: nn.Module, state: Mapping[str, Tensor], path: str) -> None:
    """Copy ``state`` into ``model``: entries the model lacks (the classifier) are dropped; a missing or
    misshapen backbone entry is refused (ValueError naming ``path``)."""
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if k in own}
    # a BatchNorm's step counter does not change what the layer computes: older files may lack it
    missing = [k for k in own if k not in kept and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(
            f"{_WHERE}.weights={path!r} lacks {len(missing)} of the backbone's {len(own)} entries, e.g. "
            f"{missing[:5]}; is it a checkpoint of {model.__class__.__name__} (timm {_WHERE}.name)?"
        )
    wrong = [f"{k}: {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
             for k, v in kept.items() if v.shape != own[k].shape]  # fmt: skip
    if wrong:
        raise ValueError(f"{_WHERE}.weights={path!r} disagrees in shape with the backbone: {wrong[:5]}")
    model.load_state_dict(kept, strict=False)


def _group_count(channels: int) -> int:
    """The largest divisor of ``channels`` not above max(1, channels // 16): about 16 channels a group."""
    return max(g for g in range(1, max(1, channels // 16) + 1) if channels % g == 0)


def _group_norm_like(bn: nn.BatchNorm2d) -> nn.Module:
    from timm.layers import BatchNormAct2d, GroupNormAct

    c = bn.num_features
    if type(bn) is nn.BatchNorm2d:
        gn: nn.Module = nn.GroupNorm(_group_count(c), c, eps=bn.eps, affine=bn.affine)
    elif isinstance(bn, BatchNormAct2d):  # timm's norm + dropout + activation in one layer: keep the rest
        gn = GroupNormAct(c, _group_count(c), eps=bn.eps, affine=bn.affine, apply_act=False)
        gn.drop, gn.act = bn.drop, bn.act
    else:
        raise ValueError(
            f"{_WHERE}.norm='group' cannot replace {type(bn).__name__} (a BatchNorm2d subclass); "
            "use norm='batch'"
        )
    if bn.affine:
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
    return gn


def batch_to_group_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d inside ``module`` (in place) by a GroupNorm of about 16 channels a group."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, _group_norm_like(child))
        else:
            batch_to_group_norm(child)
    return module


def build_backbone(cfg: ImageEncoderConfig, load_weights: bool = True) -> nn.Module:
    """The timm model ``cfg.name`` without classifier: (N, 3, H, W) -> (N, num_features).

    With ``load_weights`` the weights of ``cfg.pretrained`` / ``cfg.weights`` are read; without, the
    backbone is randomly initialized (for a checkpoint, which carries them). Then ``cfg.norm`` is applied.
    Raises ValueError for an unknown name, unavailable pretrained weights or a mismatching file.
    """
    import timm

    _check_name(cfg.name)
    pretrained = cfg.pretrained and load_weights
    try:
        pool = {"global_pool": ""} if cfg.pool == "flatten" else {}  # "": the unpooled feature map
        model = timm.create_model(cfg.name, pretrained=pretrained, num_classes=0, **pool)
    except (OSError, RuntimeError) as err:  # offline without a cached copy: an OSError from the hub
        if not pretrained:
            raise
        raise ValueError(
            f"{_WHERE}.pretrained=True: timm cannot load the pretrained weights of {cfg.name!r} ({err}); "
            f"nothing can be downloaded here: set {_WHERE}.weights to a local weights file (.pt, .pth, "
            f".bin or .safetensors) and {_WHERE}.pretrained=false"
        ) from err
    if cfg.weights is not None and load_weights:
        load_weights_into(model, read_weights(cfg.weights), cfg.weights)
    if cfg.norm == "group":  # after loading: the file holds BatchNorm entries
        batch_to_group_norm(model)
    return nn.Sequential(model, nn.Flatten(1)) if cfg.pool == "flatten" else model


# ---------------------------------------------------------------------------- encoder
def normalize_embedding(x: Tensor) -> Tensor:
    """LayerNorm without affine parameters over the last dim (D): mean 0, std 1 per embedding.

    Each row is centred and divided by its largest magnitude before ``F.layer_norm``: that changes
    nothing mathematically (the norm is scale-invariant) but keeps the norm's epsilon small beside the
    variance, so features of any scale (1e-4 or 1e4) come out at unit scale. A constant row gives zeros.
    """
    centred = x - x.mean(dim=-1, keepdim=True)
    scale = centred.abs().amax(dim=-1, keepdim=True).detach()
    scaled = centred / scale.clamp(min=torch.finfo(x.dtype).tiny)
    return F.layer_norm(scaled, scaled.shape[-1:], eps=1e-8)


class DatasetNorm(nn.Module):
    """Per-feature standardization by data statistics, no affine parameters: (B, F) -> (B, F).

    Training: each feature standardized by the batch's mean and variance, whose running averages
    (``momentum``) are updated; evaluation: by the running averages. The variance floor is relative to the
    features' own mean variance, so features of any scale (1e-4 or 1e4) come out at unit scale, and a
    feature constant over the data stays 0 instead of amplifying rounding noise.
    """

    def __init__(self, dim: int, momentum: float = 0.01) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.register_buffer("tracked", torch.zeros((), dtype=torch.long))  # batches seen in training

    @staticmethod
    def standardize(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        floor = 1e-6 * var.mean() + torch.finfo(var.dtype).tiny
        return (x - mean) / torch.sqrt(var + floor)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.shape[0] > 1:
            mean, var = x.mean(0), x.var(0, unbiased=False)
            with torch.no_grad():
                # the first batch sets the statistics outright: no bias towards the initial 0 and 1
                m = 1.0 if int(self.tracked) == 0 else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                self.running_var.lerp_(var.detach().to(self.running_var.dtype), m)
                self.tracked += 1
            return self.standardize(x, mean, var)
        return self.standardize(x, self.running_mean.to(x.dtype), self.running_var.to(x.dtype))


class ImageEncoder(nn.Module):
    """(B, V, H, W, 3) RGB frames (uint8, or float in [0, 255]) -> (B, V * D) per-view normalized embeddings.

    Pixels are scaled to [0, 1], standardized per channel by the buffers ``image_mean`` / ``image_std``
    (``set_stats``; defaults 0.5 / 0.25), encoded by ``build_backbone(cfg)`` view by view and each
    view's D features normalized by ``cfg.embed_norm``: ``DatasetNorm`` over the V * D features, or
    ``normalize_embedding`` per view.

    Args:
        cfg: the encoder config (frames must be ``cfg.views`` x ``cfg.image_size``).
        load_weights: read ``cfg.pretrained`` / ``cfg.weights`` (see ``build_backbone``).

    Attributes:
        embed_dim: D, features per view; out_dim: V * D.
    """

    def __init__(self, cfg: ImageEncoderConfig, load_weights: bool = True) -> None:
        super().__init__()
        cfg.validate()
        self.views, self.image_size, self.frozen = cfg.views, tuple(cfg.image_size), cfg.frozen
        self.backbone = build_backbone(cfg, load_weights)
        self.register_buffer("image_mean", torch.full((3,), 0.5))
        self.register_buffer("image_std", torch.full((3,), 0.25))
        self.embed_dim = self._probe_dim(cfg.name)
        self.out_dim = self.views * self.embed_dim
        self.embed_norm = DatasetNorm(self.out_dim) if cfg.embed_norm == "dataset" else None
        if self.frozen:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def _probe_dim(self, name: str) -> int:
        """D from one blank frame in eval mode (no BatchNorm statistics move); refuses a size the model
        cannot take or an output that is not pooled features."""
        was_training = self.backbone.training
        try:
            with torch.no_grad():
                out = self.backbone.eval()(torch.zeros(1, 3, *self.image_size))
        except (RuntimeError, AssertionError) as err:  # timm asserts a fixed input size (ViTs)
            raise ValueError(
                f"{_WHERE}.name={name!r} cannot encode frames of "
                f"{_WHERE}.image_size={list(self.image_size)}: {err}"
            ) from err
        finally:
            self.backbone.train(was_training)
        if out.ndim != 2:
            raise ValueError(f"{_WHERE}.name={name!r} gives {tuple(out.shape)} per frame; expected (1, D)")
        return out.shape[1]

    def set_stats(self, mean: np.ndarray | Tensor, std: np.ndarray | Tensor) -> None:
        """Per-channel (RGB) pixel mean and std, (3,) each, in [0, 1] pixel units (ImageNet's for a
        backbone pretrained on it); std must be >= 0 and is floored at 1e-3."""
        mean_t, std_t = _as_stat(mean, 3, "image_mean"), _as_stat(std, 3, "image_std")
        if bool((std_t < 0).any()):
            raise ValueError(f"image_std must be >= 0; got {std_t.tolist()}")
        self.image_mean.copy_(mean_t)
        self.image_std.copy_(std_t.clamp(min=_MIN_SCALE))

    def check(self, images: Any) -> Tensor:
        """``images`` if it is a (B, V, H, W, 3) uint8 or float tensor of this encoder's V, H, W; else
        ValueError naming batch['image']."""
        h, w = self.image_size
        expected = f"(B, V={self.views}, H={h}, W={w}, 3) uint8 RGB frames ({_WHERE}.views, image_size)"
        if not isinstance(images, Tensor):
            raise ValueError(f"batch[{IMAGE!r}] is {type(images).__name__}; expected a tensor {expected}")
        if images.ndim != 5 or tuple(images.shape[1:]) != (self.views, h, w, 3):
            raise ValueError(f"batch[{IMAGE!r}] is {tuple(images.shape)}; expected {expected}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise ValueError(f"batch[{IMAGE!r}] has dtype {images.dtype}; expected {expected} (or float)")
        return images

    def train(self, mode: bool = True) -> "ImageEncoder":
        """As ``nn.Module.train``, but a frozen backbone stays in eval mode (fixed BatchNorm statistics)."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        """(B, V, H, W, 3) -> (B, V * D): view v's normalized embedding at [v * D, (v + 1) * D)."""
        b = self.check(images).shape[0]
        x = images.to(self.image_mean.dtype) / 255.0  # (B, V, H, W, 3) in [0, 1]
        x = (x - self.image_mean) / self.image_std
        # (B * V, 3, H, W); contiguous: on the permuted (channels-last) strides GroupNorm takes a slow path
        # on CPU (resnet18, 8 frames 64x64, 2 cores: 40 ms instead of 17)
        x = x.flatten(0, 1).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            feats = self.backbone(x)  # (B * V, D)
        if self.embed_norm is not None:
            return self.embed_norm(feats.reshape(b, self.out_dim))
        return normalize_embedding(feats).reshape(b, self.out_dim)
