"""CSPPolicy's image-embedding context: timm backbone, weights files, norms, freezing, noise, checkpoints."""

import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modules.nets import CSPPolicy, PolicyConfig
from modules.nets.image import (
    DatasetNorm,
    ImageEncoder,
    ImageEncoderConfig,
    _group_count,
    build_backbone,
    normalize_embedding,
)
from modules.nets.keys import ACTION, GOAL, IMAGE, OBS
from tests.modules.nets.test_nets import overfit_ratio, perturb

REPO = Path(__file__).resolve().parents[3]
D_O, D_G, D_A, L, B, V, H, W = 4, 2, 3, 4, 3, 2, 32, 32
D_RESNET = 96  # num_features of timm's test_resnet
A_LOW, A_HIGH = torch.tensor([-1.0, -1.0, 0.0]), torch.tensor([1.0, 1.0, 2.0])


def encoder_config(**overrides) -> ImageEncoderConfig:
    return ImageEncoderConfig(**(dict(name="test_resnet", image_size=[H, W], views=V) | overrides))


def tiny_config(image: dict | None = None, **overrides) -> PolicyConfig:
    kwargs = dict(
        context_mode="image_embedding", image_encoder=encoder_config(**(image or {})), width=32, depth=1,
        heads=4, chunk_len=L, sample_steps=2,
    )  # fmt: skip
    return PolicyConfig(**(kwargs | overrides))


def make_stats(goal: bool = True) -> dict:
    stats = {
        "observation_mean": np.linspace(-1.0, 1.0, D_O), "observation_std": np.linspace(0.5, 2.0, D_O),
        "action_min": A_LOW.numpy(), "action_max": A_HIGH.numpy(),
        "image_mean": np.array([0.485, 0.456, 0.406]), "image_std": np.array([0.229, 0.224, 0.225]),
    }  # fmt: skip
    if goal:
        stats |= {"goal_mean": np.array([0.5, 0.0]), "goal_std": np.array([0.1, 0.2])}
    return stats


def make_policy(goal_dim: int = D_G, seed: int = 0, image: dict | None = None, **cfg) -> CSPPolicy:
    torch.manual_seed(seed)
    policy = CSPPolicy(tiny_config(image, **cfg), obs_dim=D_O, action_dim=D_A, goal_dim=goal_dim)
    policy.set_normalization(make_stats(goal=goal_dim > 0))
    return policy


def make_images(b: int = B, views: int = V, h: int = H, w: int = W, seed: int = 0) -> torch.Tensor:
    """(b, views, h, w, 3) uint8: a bright square on a noisy background, placed by the seed."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 60, (b, views, h, w, 3), generator=g, dtype=torch.uint8)
    for i in range(b):
        for v in range(views):
            y, x = torch.randint(0, h // 2, (2,), generator=g).tolist()
            images[i, v, y : y + h // 3, x : x + w // 3] = torch.tensor([230, 40 * v, 120], dtype=torch.uint8)
    return images


def make_batch(b: int = B, seed: int = 1, goal: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {
        OBS: torch.randn(b, D_O, generator=g),
        IMAGE: make_images(b, seed=seed),
        ACTION: A_LOW + (A_HIGH - A_LOW) * torch.rand(b, L, D_A, generator=g),
    }
    if goal:
        batch[GOAL] = torch.randn(b, D_G, generator=g) * 0.1 + 0.5
    return batch


def observation(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != ACTION}


def assert_unit_scale_per_view(emb: torch.Tensor, d: int) -> None:
    per_view = emb.reshape(*emb.shape[:-1], -1, d).double()
    assert per_view.mean(-1).abs().max() < 1e-3
    assert (per_view.std(-1, unbiased=False) - 1).abs().max() < 1e-3


# ---------------------------------------------------------------- the embedding's normalization
def test_flatten_pool_keeps_the_feature_map() -> None:
    avg = ImageEncoder(encoder_config(pool="avg", image_size=[64, 64]))
    flat = ImageEncoder(encoder_config(pool="flatten", image_size=[64, 64]))
    assert flat.embed_dim == 4 * avg.embed_dim  # C x 2 x 2: the last map of a 32x-downsampling net
    assert flat(make_images(h=64, w=64)).shape == (B, V * flat.embed_dim)
    with pytest.raises(ValueError, match="pool='max'"):
        encoder_config(pool="max")


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_dataset_norm_gives_unit_scale_across_frames_at_any_scale(scale: float) -> None:
    g = torch.Generator().manual_seed(0)
    # a large part shared by every frame (a static scene) and a small part that differs between frames
    common = torch.randn(1, 40, generator=g) * 10.0
    x = (common + 0.01 * torch.randn(64, 40, generator=g)) * scale
    x[:, 0] = 5.0 * scale  # one feature constant over the data
    norm = DatasetNorm(40)
    y = norm(x)  # training: the batch's statistics
    assert torch.isfinite(y).all() and y[:, 0].abs().max() < 1e-3  # a constant feature stays 0
    assert y[:, 1:].mean(0).abs().max() < 1e-3 and (y[:, 1:].std(0, unbiased=False) - 1).abs().max() < 1e-3
    # the first batch sets the running statistics; evaluation standardizes by them
    torch.testing.assert_close(norm.running_mean, x.mean(0))
    norm.eval()
    torch.testing.assert_close(norm(x), y, atol=1e-4, rtol=0)
    # a LayerNorm keeps the shared part: the frames' differences are a sliver of its unit scale
    layer = normalize_embedding(x)
    assert layer.std(0)[1:].mean() < 0.01 < y.std(0)[1:].mean()


def test_the_ema_policy_follows_the_running_statistics() -> None:
    from modules.csp import CSPModule, OptimConfig

    module = CSPModule(make_policy(), OptimConfig())
    batch = make_batch()
    with torch.no_grad():  # the EMA's weights lag the trained ones: make them differ
        for p in module.policy.context.embedder.parameters():
            p.add_(0.1)
    module.policy.context.embedder(batch[IMAGE])  # a training forward moves the trained policy's statistics
    module.ema.eval()
    module.update_ema(batch)
    ema_norm = module.ema.context.embedder.embed_norm
    assert not module.ema.context.embedder.training  # the modes are restored
    # the EMA's statistics are those of its OWN features on the batch, not a copy of the trained policy's
    with torch.no_grad():
        feats = module.ema.context.embedder.backbone(
            ((batch[IMAGE].float() / 255 - module.ema.context.embedder.image_mean)
             / module.ema.context.embedder.image_std).flatten(0, 1).permute(0, 3, 1, 2).contiguous()
        ).reshape(B, -1)  # fmt: skip
    torch.testing.assert_close(ema_norm.running_mean, feats.mean(0))
    assert not torch.allclose(ema_norm.running_mean, module.policy.context.embedder.embed_norm.running_mean)


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_normalize_embedding_gives_unit_scale_at_any_feature_scale(scale: float) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, V, D_RESNET, generator=g) + 3.0) * scale  # off-centre, of any magnitude
    y = normalize_embedding(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert_unit_scale_per_view(y, D_RESNET)
    # a LayerNorm without affine parameters: the same as F.layer_norm where its epsilon is negligible
    torch.testing.assert_close(y, F.layer_norm(x / scale, (D_RESNET,)), atol=1e-4, rtol=0)
    assert torch.equal(normalize_embedding(torch.full((2, 8), scale)), torch.zeros(2, 8))  # constant: zeros


def test_image_encoder_embeds_each_view_at_unit_scale() -> None:
    torch.manual_seed(0)
    enc = ImageEncoder(encoder_config(embed_norm="layer"))
    assert (enc.embed_dim, enc.out_dim) == (D_RESNET, V * D_RESNET)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in enc.modules())  # norm="group" by default
    images = make_images()
    emb = enc(images)
    assert emb.shape == (B, V * D_RESNET) and emb.dtype == torch.float32
    assert_unit_scale_per_view(emb, D_RESNET)
    # view v's embedding is at [v * D, (v + 1) * D), from view v's frame alone
    other = images.clone()
    other[:, 1] = make_images(seed=9)[:, 1]
    moved = enc(other)
    assert torch.equal(moved[:, :D_RESNET], emb[:, :D_RESNET])
    assert (moved[:, D_RESNET:] - emb[:, D_RESNET:]).abs().max() > 1e-3
    torch.testing.assert_close(enc(images.float()), emb)  # float pixels in [0, 255] as well
    # the pixel statistics are buffers that change the input, not the output's scale
    assert {"image_mean", "image_std"} <= set(enc.state_dict())
    enc.set_stats(np.array([0.2, 0.3, 0.4]), np.array([0.1, 0.2, 0.0]))
    assert enc.image_std.tolist() == pytest.approx([0.1, 0.2, 1e-3])  # floored like the ZScore normalizer
    again = enc(images)
    assert (again - emb).abs().max() > 1e-3
    assert_unit_scale_per_view(again, D_RESNET)
    with pytest.raises(ValueError, match=r"image_std must be >= 0"):
        enc.set_stats(np.zeros(3), np.array([0.1, -0.1, 0.1]))
    with pytest.raises(ValueError, match=r"image_mean has shape \(1,\)"):
        enc.set_stats(np.zeros(1), np.ones(3))


# ---------------------------------------------------------------- config and backbone
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"norm": "layer"}, r"policy.image_encoder.norm='layer'; expected one of \['batch', 'group'\]"),
        ({"image_size": [4, 32]}, r"policy.image_encoder.image_size=\[4, 32\]; expected \[H, W\]"),
        ({"image_size": [32]}, r"policy.image_encoder.image_size=\[32\]"),
        ({"views": 0}, r"policy.image_encoder.views=0; expected an integer >= 1"),
        ({"weights": ""}, r"policy.image_encoder.weights=''"),
        ({"name": ""}, r"policy.image_encoder.name=''"),
        ({"frozen": "yes"}, r"policy.image_encoder.frozen='yes'"),
        ({"pretrained": True, "weights": "w.pt"}, r"policy.image_encoder.pretrained=True and .*set one"),
    ],
)
def test_encoder_config_validation(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encoder_config(**overrides)


def test_policy_config_reads_the_encoder_from_a_dict() -> None:
    cfg = tiny_config(image={"image_size": (H, W), "frozen": True})
    assert cfg.image_encoder.image_size == [H, W]  # a list, so asdict -> checkpoint stays plain
    assert PolicyConfig(**asdict(cfg)) == cfg
    assert PolicyConfig(**asdict(cfg)).image_encoder == cfg.image_encoder
    with pytest.raises(ValueError, match=r"policy.image_encoder has unknown keys \['nme'\]"):
        PolicyConfig(context_mode="image_embedding", image_encoder={"nme": "resnet18"})
    with pytest.raises(ValueError, match=r"policy.image_encoder.views=-1"):
        PolicyConfig(image_encoder={"views": -1})
    with pytest.raises(ValueError, match=r"num_points=4 with context_mode='image_embedding'"):
        tiny_config(num_points=4)


def test_an_unknown_timm_name_is_refused_with_close_matches() -> None:
    cfg = encoder_config(name="resnet181")  # the config alone does not ask timm
    match = r"policy.image_encoder.name='resnet181' is not a timm model; did you mean 'resnet18'"
    with pytest.raises(ValueError, match=match):
        build_backbone(cfg)
    with pytest.raises(ValueError, match=match):
        CSPPolicy(tiny_config(image={"name": "resnet181"}), D_O, D_A, D_G)


def test_unavailable_pretrained_weights_point_to_a_local_file() -> None:
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("timm/test_resnet.r160_in1k", "model.safetensors"), str):
        pytest.skip("test_resnet's pretrained weights are in the local Hugging Face cache")
    with pytest.raises(ValueError, match=r"'test_resnet'.*set policy.image_encoder.weights to a local"):
        build_backbone(encoder_config(pretrained=True))


def test_norm_group_replaces_every_batch_norm_and_batch_keeps_them() -> None:
    assert [_group_count(c) for c in (8, 24, 40, 48, 52, 64, 96, 512)] == [1, 1, 2, 3, 2, 4, 6, 32]
    batch = build_backbone(encoder_config(norm="batch"))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in batch.modules()) > 0
    group = build_backbone(encoder_config(norm="group"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in group.modules())
    norms = [m for m in group.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == _group_count(m.num_channels) for m in norms)
    # timm's fused BatchNormAct2d becomes a GroupNormAct that keeps the activation
    from timm.layers import GroupNormAct

    eff = build_backbone(encoder_config(name="test_efficientnet", norm="group"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in eff.modules())
    fused = [m for m in eff.modules() if isinstance(m, GroupNormAct)]
    assert fused and any(not isinstance(m.act, nn.Identity) for m in fused)


# ---------------------------------------------------------------- weights files
def save_weights(path: Path, seed: int = 1, wrap: str | None = "state_dict") -> dict[str, torch.Tensor]:
    """Save a seeded test_resnet's weights with a classifier (as a classification checkpoint has)."""
    torch.manual_seed(seed)
    model = build_backbone(encoder_config(norm="batch"))
    with torch.no_grad():  # running statistics unlike a fresh model's
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with_head = state | {"fc.weight": torch.randn(10, D_RESNET), "fc.bias": torch.randn(10)}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(with_head, path)
    else:
        torch.save(with_head if wrap is None else {wrap: with_head, "epoch": 3}, path)
    return state


@pytest.mark.parametrize(("name", "wrap"), [("w.pt", "state_dict"), ("w.pth", "model"), ("w.bin", None),
                                            ("w.safetensors", None)])  # fmt: skip
def test_a_weights_file_loads_to_identical_parameters(tmp_path: Path, name: str, wrap: str | None) -> None:
    state = save_weights(tmp_path / name, wrap=wrap)
    torch.manual_seed(2)  # another initialization: only the file can make them equal
    loaded = build_backbone(encoder_config(norm="batch", weights=str(tmp_path / name))).state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    # norm="group" swaps the norms after loading: their affine parameters come from the file
    grouped = build_backbone(encoder_config(weights=str(tmp_path / name))).state_dict()
    assert "bn1.weight" in grouped and "bn1.running_mean" not in grouped
    assert all(torch.equal(v, state[k]) for k, v in grouped.items())


def test_bad_weights_files_are_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(FileNotFoundError, match=rf"policy.image_encoder.weights='{missing}': no such file"):
        build_backbone(encoder_config(weights=str(missing)))
    state = save_weights(tmp_path / "w.pt", wrap=None)
    torch.save(state | {"conv1.0.weight": state["conv1.0.weight"][:, :2]}, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"shape.pt.* disagrees in shape .*conv1.0.weight"):
        build_backbone(encoder_config(weights=str(tmp_path / "shape.pt")))
    torch.save({k: v for k, v in state.items() if not k.startswith("layer1.")}, tmp_path / "part.pt")
    with pytest.raises(ValueError, match=r"part.pt' lacks .* entries, e.g. \['layer1"):
        build_backbone(encoder_config(weights=str(tmp_path / "part.pt")))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list.pt' holds list; expected a state dict"):
        build_backbone(encoder_config(weights=str(tmp_path / "list.pt")))


# ---------------------------------------------------------------- the policy
def test_construction_dims_keys_and_context_code() -> None:
    policy = make_policy(context_code_dim=16)
    assert policy.context_dim == V * D_RESNET and policy.feature_dim == 32
    assert policy.input_keys == (OBS, GOAL, IMAGE) and policy.stats_keys == set(make_stats())
    assert policy.context.clean_encoder.in_dim == D_O + D_G  # proprioception and goal, clean
    assert policy.context.noised_encoder.in_dim == V * D_RESNET
    assert make_policy(goal_dim=0).input_keys == (OBS, IMAGE)
    with pytest.raises(ValueError, match=r"missing keys \['image_mean', 'image_std'\]"):
        policy.set_normalization({k: v for k, v in make_stats().items() if "image" not in k})
    # the low-dim eps_c code of TMRL: 16 numbers for a V * D embedding noise
    eps = policy.context_noise_from_code(torch.randn(B, 16))
    assert eps.shape == (B, V * D_RESNET)
    assert policy.sample(observation(make_batch()), 0.5, context_noise=eps).shape == (B, L, D_A)
    vit = make_policy(image={"name": "test_vit", "views": 1})
    assert vit.context_dim == 64 and torch.isfinite(vit.loss(make_batch() | {IMAGE: make_images(views=1)}))


def test_loss_backpropagates_into_the_backbone_and_sample_shapes() -> None:
    policy = perturb(make_policy())
    batch = make_batch()
    loss = policy.loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert policy.context.embedder.backbone.conv1[0].weight.grad.abs().sum() > 0  # the frames reach the loss
    assert policy.context.clean_encoder.net[0].weight.grad.abs().sum() > 0
    obs = observation(batch)
    assert policy.sample(obs, 0.3).shape == (B, L, D_A)
    chunk = policy.sample(obs, torch.rand(B), torch.randn(B, L, D_A), torch.randn(B, V * D_RESNET), steps=3)
    assert chunk.shape == (B, L, D_A) and bool(((chunk >= A_LOW) & (chunk <= A_HIGH)).all())


def test_a_few_steps_reduce_the_loss() -> None:
    policy = make_policy(image={"frozen": True})  # a frozen backbone: the test's time goes to the head
    fixed = dict(
        sigma=torch.rand(B), tau=torch.rand(B), action_noise=torch.randn(B, L, D_A),
        context_noise=torch.randn(B, V * D_RESNET),
    )  # fmt: skip
    assert overfit_ratio(policy, make_batch(), fixed, steps=15) < 0.7


def test_sigma_zero_passes_the_embedding_through_and_sigma_one_hides_it() -> None:
    policy = perturb(make_policy())
    obs = observation(make_batch())
    z, e1, e2 = torch.randn(B, L, D_A), torch.randn(B, V * D_RESNET), torch.randn(B, V * D_RESNET)
    clean, noised = policy.noised_context(obs, torch.zeros(B), e1)
    assert torch.equal(noised, policy.context.embedder(obs[IMAGE]))  # exactly, at sigma = 0
    torch.testing.assert_close(clean[:, D_O:], policy.context.goal_norm.normalize(obs[GOAL]))
    assert torch.equal(policy.sample(obs, 0.0, z, e1), policy.sample(obs, 0.0, z, e2))
    assert not torch.allclose(policy.sample(obs, 1.0, z, e1), policy.sample(obs, 1.0, z, e2), atol=1e-4)
    # at sigma 0 the frames matter; at sigma 1 (abar ~ 0) they do not
    other = obs | {IMAGE: make_images(seed=7)}
    assert not torch.allclose(policy.sample(obs, 0.0, z, e1), policy.sample(other, 0.0, z, e1), atol=1e-4)
    torch.testing.assert_close(policy.sample(obs, 1.0, z, e1), policy.sample(other, 1.0, z, e1))


def test_context_features_are_the_encoder_of_the_clean_embedding() -> None:
    policy = perturb(make_policy()).train()
    batch = observation(make_batch())
    feats = policy.context_features(batch)
    assert feats.shape == (B, policy.feature_dim) and feats.dtype == torch.float32 and not feats.requires_grad
    policy.eval()
    expected = policy.context.noised_encoder(policy.context.embedder(batch[IMAGE]))
    torch.testing.assert_close(policy.context_features(batch), expected.detach())
    moved = batch | {OBS: batch[OBS] + 1.0, GOAL: batch[GOAL] - 1.0}
    assert torch.equal(policy.context_features(moved), policy.context_features(batch))  # frames alone


def test_frozen_backbone_does_not_move_while_the_rest_trains() -> None:
    def step(policy: CSPPolicy) -> tuple[dict, dict]:
        policy.train()
        before = {k: v.clone() for k, v in policy.state_dict().items()}
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
        policy.loss(make_batch()).backward()
        opt.step()
        return before, policy.state_dict()

    frozen = make_policy(image={"frozen": True, "norm": "batch"})
    backbone = frozen.context.embedder.backbone
    assert not any(p.requires_grad for p in backbone.parameters())
    before, after = step(frozen)
    assert not backbone.training and not any(m.training for m in backbone.modules())
    assert frozen.context.clean_encoder.training  # the rest trains
    inside = [k for k in before if k.startswith("context.embedder.backbone.")]
    assert any("running_mean" in k for k in inside)  # BatchNorm buffers are among them
    assert all(torch.equal(before[k], after[k]) for k in inside)
    outside = ("context.clean_encoder.net.0.weight", "context.noised_encoder.net.0.weight", "net.pos_embed")
    assert all(not torch.equal(before[k], after[k]) for k in outside)
    # the same step on a trainable backbone moves its weights and its BatchNorm statistics
    before, after = step(make_policy(image={"norm": "batch"}))
    for key in ("conv1.0.weight", "bn1.running_mean"):
        assert not torch.equal(
            before[f"context.embedder.backbone.{key}"], after[f"context.embedder.backbone.{key}"]
        )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({IMAGE: make_images(h=16, w=16)},
         r"batch\['image'\] is \(3, 2, 16, 16, 3\); expected \(B, V=2, H=32, W=32, 3\)"),
        ({IMAGE: make_images(views=1)}, r"batch\['image'\] is \(3, 1, 32, 32, 3\); expected \(B, V=2"),
        ({IMAGE: make_images().permute(0, 1, 4, 2, 3)}, r"batch\['image'\] is \(3, 2, 3, 32, 32\)"),
        ({IMAGE: make_images().long()}, r"batch\['image'\] has dtype torch.int64"),
        ({IMAGE: make_images(b=2)}, r"batch\['image'\] has 2 rows but batch\['observation'\] has 3"),
        ({IMAGE: None}, r"batch has no key 'image'"),
    ],
)  # fmt: skip
def test_bad_image_batches_are_refused(change: dict, match: str) -> None:
    policy = make_policy()
    batch = {k: v for k, v in (make_batch() | change).items() if v is not None}
    with pytest.raises(ValueError, match=match):
        policy.loss(batch)
    with pytest.raises(ValueError, match=match):
        policy.sample(observation(batch), 0.5)


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_needs_no_weights_file(tmp_path: Path) -> None:
    save_weights(tmp_path / "backbone.pt")
    policy = perturb(make_policy(image={"weights": str(tmp_path / "backbone.pt")}, context_code_dim=16))
    obs = observation(make_batch())
    z, eps = torch.randn(B, L, D_A), policy.context_noise_from_code(torch.randn(B, 16))
    expected = policy.sample(obs, 0.4, z, eps)
    policy.save(tmp_path / "policy.pt")
    (tmp_path / "backbone.pt").unlink()  # the robot has the checkpoint, not the backbone's file

    loaded = CSPPolicy.load(tmp_path / "policy.pt")
    assert not loaded.training and loaded.cfg == policy.cfg
    assert loaded.cfg.image_encoder.weights == str(tmp_path / "backbone.pt")  # saving again round-trips
    saved, again = policy.state_dict(), loaded.state_dict()
    assert set(saved) == set(again) and all(torch.equal(saved[k], again[k]) for k in saved)
    assert torch.equal(loaded.sample(obs, 0.4, z, eps), expected)
    assert loaded.to_checkpoint()["config"] == policy.to_checkpoint()["config"]
    # a policy fitted from timm's pretrained weights loads offline: nothing is fetched
    ckpt = policy.to_checkpoint()
    ckpt["config"]["image_encoder"] |= {"pretrained": True, "weights": None}
    offline = CSPPolicy.from_checkpoint(ckpt)
    assert offline.cfg.image_encoder.pretrained and torch.equal(offline.sample(obs, 0.4, z, eps), expected)
    ckpt["config"]["image_encoder"]["views"] = 1
    with pytest.raises(ValueError, match="does not match its config and dims"):
        CSPPolicy.from_checkpoint(ckpt)


def test_other_modes_are_unaffected(tmp_path: Path) -> None:
    assert PolicyConfig().image_encoder == ImageEncoderConfig()
    torch.manual_seed(0)
    goal = CSPPolicy(PolicyConfig(width=32, depth=1, chunk_len=L), D_O, D_A, D_G)
    assert not any(k.startswith("context.embedder") for k in goal.state_dict())
    ckpt = goal.to_checkpoint()
    del ckpt["config"]["image_encoder"]  # a version-2 checkpoint written before the image mode
    assert CSPPolicy.from_checkpoint(ckpt).cfg == goal.cfg
    # config loading and the other modes never import timm
    code = (
        "import sys\nfrom modules.nets import CSPPolicy, PolicyConfig\n"
        "CSPPolicy(PolicyConfig(**{'image_encoder': {'name': 'resnet181'}}), 4, 3, 2)\n"
        "assert 'timm' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
