"""timm and torchvision models for tests/test_real_models.py, built tiny with random weights (see real_models.py)."""

from __future__ import annotations

from functools import partial

from real_models import CLASSES, IMG, Case, class_ce, images, registrar, seeded
from torch import nn

CASES: list[Case] = []
case = registrar(CASES)


def _vision(model, size=IMG):
    x, y = images(size=size)
    return model.eval(), class_ce, x, y


def _timm(name, size=IMG, **kwargs):
    import timm

    return _vision(timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs), size)


VIT = dict(img_size=IMG, patch_size=8, depth=1, embed_dim=32, num_heads=2)


# ----------------------------------------------------------------------------------------------- timm
@case("timm-vit-tiny", "timm")
@seeded
def timm_vit():  # cls_token and pos_embed: bare parameters on the root module
    return _timm("vit_tiny_patch16_224", **VIT)


@case("timm-vit-regtoken-rmsnorm", "timm")
@seeded
def timm_vit4():  # register token, LayerScale (init_values), RmsNorm, global average pool
    return _timm("test_vit4", **VIT, init_values=0.5)


@case("timm-deit-distilled", "timm")
@seeded
def timm_deit():  # cls and distillation tokens, two heads averaged in eval
    return _timm("deit_tiny_distilled_patch16_224", **VIT)


@case("timm-vit-relpos", "timm")
@seeded
def timm_vit_relpos():  # relative position bias table indexed in the attention's forward
    return _timm("test_vit_relpos", **VIT)


@case("timm-convnext", "timm")
@seeded
def timm_convnext():  # LayerNorm2d (channels-first LayerNorm subclass), layer-scale gamma
    return _timm("test_convnext", depths=[1, 1, 1, 1], dims=[8, 16, 16, 24], ls_init_value=0.5)


@case("timm-convnext-convmlp", "timm")
@seeded
def timm_convnext_convmlp():  # conv_mlp: LayerNorm2d inside every block too
    return _timm("test_convnext2", depths=[1, 1, 1, 1], dims=[8, 16, 16, 24], conv_mlp=True, ls_init_value=0.5)


@case("timm-efficientnet-bnact", "timm")
@seeded
def timm_efficientnet():  # BatchNormAct2d in eval mode
    return _timm("test_efficientnet")


@case("timm-efficientnet-gn", "timm")
@seeded
def timm_efficientnet_gn():  # GroupNormAct
    return _timm("test_efficientnet_gn")


@case("timm-efficientnet-lnact", "timm")
@seeded
def timm_efficientnet_ln():  # LayerNormAct2d
    return _timm("test_efficientnet_ln")


@case("timm-efficientnet-evonorm", "timm")
@seeded
def timm_efficientnet_evos():  # EvoNorm2dS0: x * sigmoid(v x) / group std
    return _timm("test_efficientnet_evos")


@case("timm-resnet-gn", "timm")
@seeded
def timm_resnet_gn():
    from timm.layers import GroupNorm

    return _timm("test_resnet", norm_layer=partial(GroupNorm, num_groups=4))


@case("timm-resnet-bn-eval", "timm")
@seeded
def timm_resnet():
    return _timm("test_resnet")


@case("timm-mobilenetv3", "timm")
@seeded
def timm_mobilenetv3():  # BatchNormAct2d, hard-swish, squeeze-excite
    return _timm("mobilenetv3_small_050")


@case("timm-nfnet", "timm")
@seeded
def timm_nfnet():  # ScaledStdConv2d: weight standardisation with a gain, in the conv's forward
    return _timm("test_nfnet")


MIXER = dict(num_classes=CLASSES, img_size=IMG, patch_size=8, num_blocks=1, embed_dim=32)


@case("timm-mixer", "timm")
@seeded
def timm_mixer():  # the registered mixers fix patch_size, so the class itself
    from timm.models.mlp_mixer import MlpMixer

    return _vision(MlpMixer(**MIXER))


@case("timm-resmlp", "timm")
@seeded
def timm_resmlp():  # Affine (alpha, beta) norms and layer-scale parameters, as resmlp_12_224 builds it
    from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock

    return _vision(MlpMixer(**MIXER, mlp_ratio=4, block_layer=partial(ResBlock, init_values=0.5), norm_layer=Affine))


@case("timm-swin", "timm")
@seeded
def timm_swin():
    return _timm("swin_tiny_patch4_window7_224", img_size=IMG, window_size=4, embed_dim=16, depths=(1, 1),
                 num_heads=(2, 2))


@case("timm-byobnet", "timm")
@seeded
def timm_byobnet():
    return _timm("test_byobnet")


# ----------------------------------------------------------------------------------------------- torchvision
@case("tv-resnet18-bn-eval", "torchvision")
@seeded
def tv_resnet18():
    import torchvision

    return _vision(torchvision.models.resnet18(weights=None, num_classes=CLASSES))


def tv_resnet18_train():
    """BatchNorm in training mode: per-sample gradients are undefined, every engine must refuse."""
    model, loss, x, y = tv_resnet18()
    return model.train(), loss, x, y


@case("tv-mobilenet-v3-small", "torchvision")
@seeded
def tv_mobilenet():
    import torchvision

    return _vision(torchvision.models.mobilenet_v3_small(weights=None, num_classes=CLASSES, dropout=0.0))


@case("tv-efficientnet-b0-gn", "torchvision")
@seeded
def tv_efficientnet_gn():
    import torchvision

    return _vision(torchvision.models.efficientnet_b0(weights=None, num_classes=CLASSES, dropout=0.0,
                                                      norm_layer=lambda c: nn.GroupNorm(4, c)))


@case("tv-convnext-small-custom", "torchvision")
@seeded
def tv_convnext():  # torchvision's LayerNorm2d and CNBlock layer_scale
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return _vision(ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], layer_scale=0.5,
                            num_classes=CLASSES))


@case("tv-swin-custom", "torchvision")
@seeded
def tv_swin():  # shifted_window_attention uses qkv.weight and proj.weight functionally
    from torchvision.models.swin_transformer import SwinTransformer

    return _vision(SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                   window_size=[4, 4], num_classes=CLASSES))


@case("tv-vit-custom", "torchvision")
@seeded
def tv_vit():  # nn.MultiheadAttention, class_token and pos_embedding as bare parameters
    from torchvision.models.vision_transformer import VisionTransformer

    return _vision(VisionTransformer(image_size=IMG, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32,
                                     mlp_dim=64, num_classes=CLASSES))


@case("tv-shufflenet-v2", "torchvision")
@seeded
def tv_shufflenet():  # channel shuffle: view(B, groups, c, h, w) with the batch kept in front
    import torchvision

    return _vision(torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=CLASSES))


