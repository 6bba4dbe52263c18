"""Networks: parameter counts, order and names as in the original MTT code; every name at every size."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mtt.networks import NETWORK_NAMES, ConvNet, get_network

SIZES = (8, 28, 32, 64)

# (name, channels, size) that cannot work: pooling shrinks the maps to 0x0, or to 1x1 under
# instance norm (which torch refuses). Everything else must run.
TOO_SMALL = {
    ("ConvNetD4", 1, 8), ("ConvNetD4", 3, 8),
    ("ConvNetD5", 1, 8), ("ConvNetD5", 3, 8), ("ConvNetD5", 3, 28),
    ("ResNet18", 1, 8), ("ResNet18", 3, 8), ("ResNet18_AP", 1, 8), ("ResNet18_AP", 3, 8),
    ("VGG11", 1, 8), ("VGG11", 3, 8), ("LeNet", 1, 8), ("LeNet", 3, 8),
}


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# Expected counts worked out by hand from the original definitions (conv: k*k*in*out + out,
# instance/batch norm: 2*C, linear: in*out + out):
@pytest.mark.parametrize("name,channels,size,classes,expected", [
    # convs 3*128*9+128 + 2*(128*128*9+128) = 298,752; 3 norms 768; 128*4*4 -> 10: 20,490
    ("ConvNet", 3, 32, 10, 320_010),
    # first conv 1*128*9+128 = 1,280 and padding 3 turns 28 into 32, so the rest is as above
    ("ConvNet", 1, 28, 10, 317_706),
    # 4 convs 446,336; 4 norms 1,024; 64 -> 4x4: 2048*200+200 = 409,800
    ("ConvNetD4", 3, 64, 200, 857_160),
    # convs 896 + 2*9,248; norms 192; 32*4*4 -> 10: 5,130
    ("ConvNetW32", 3, 32, 10, 24_714),
    # LayerNorm over C x H x W: 2*128*(32*32 + 16*16 + 8*8) = 344,064 instead of 768
    ("ConvNetLN", 3, 32, 10, 663_306),
    # no pooling: 128*32*32 -> 10 = 1,310,730
    ("ConvNetNP", 3, 32, 10, 1_610_250),
    # the well-known CIFAR ResNet-18 count (norm params as BatchNorm's)
    ("ResNet18", 3, 32, 10, 11_173_962),
    # classifier 512*4*4 -> 10 = 81,930 instead of 5,130
    ("ResNet18BN_AP", 3, 32, 10, 11_250_762),
    # the well-known CIFAR VGG11-BN count
    ("VGG11", 3, 32, 10, 9_231_114),
    # 9,728 + 614,592 + 442,624 + 442,560 + 331,968 + 192*4*4 -> 10: 30,730
    ("AlexNet", 3, 32, 10, 1_872_202),
    # 456 + 2,416 + 400*120+120 + 120*84+84 + 84*10+10
    ("LeNet", 3, 32, 10, 62_006),
    ("LeNet", 1, 28, 10, 61_706),
    # 3072*128+128 + 128*128+128 + 128*10+10
    ("MLP", 3, 32, 10, 411_146),
    ("MLP", 1, 28, 10, 118_282),
])
def test_parameter_counts(name, channels, size, classes, expected):
    assert n_params(get_network(name, channels, classes, size)) == expected


def test_convnet_parameter_order_matches_original():
    net = get_network("ConvNet", 3, 10, (32, 32))
    names = [name for name, _ in net.named_parameters()]
    assert names == [
        "features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias",
        "features.4.weight", "features.4.bias", "features.5.weight", "features.5.bias",
        "features.8.weight", "features.8.bias", "features.9.weight", "features.9.bias",
        "classifier.weight", "classifier.bias",
    ]
    shapes = [tuple(p.shape) for p in net.parameters()]
    assert shapes[:4] == [(128, 3, 3, 3), (128,), (128,), (128,)]
    assert shapes[-2:] == [(10, 2048), (10,)]
    norm = net.features[1]
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == norm.num_channels == 128


def test_other_parameter_names_match_original():
    resnet = dict(get_network("ResNet18", 3, 10, 32).named_parameters())
    assert list(resnet)[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert "layer2.0.shortcut.1.weight" in resnet and list(resnet)[-1] == "classifier.bias"
    ap = dict(get_network("ResNet18BN_AP", 3, 10, 32).named_parameters())
    assert "layer2.0.shortcut.2.weight" in ap  # conv, avg pool, norm
    vgg = [name for name, _ in get_network("VGG11", 1, 10, 28).named_parameters()]
    assert vgg[:6] == ["features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias",
                       "features.4.weight", "features.4.bias"]
    assert [n for n, _ in get_network("AlexNet", 3, 10, 32).named_parameters()][-2:] == ["fc.weight", "fc.bias"]
    assert [n for n, _ in get_network("LeNet", 3, 10, 32).named_parameters()][-1] == "fc_3.bias"


def test_one_channel_first_conv_pads_by_3():
    net = get_network("ConvNet", 1, 10, 28)
    assert net.features[0].padding == (3, 3)
    assert net.classifier.in_features == 128 * 4 * 4  # 28 -> 32 -> 16 -> 8 -> 4, as the original
    assert get_network("VGG11", 1, 10, 28).features[0].padding == (3, 3)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("channels", (1, 3))
@pytest.mark.parametrize("name", NETWORK_NAMES)
def test_forward_backward_every_size(name, channels, size):
    if (name, channels, size) in TOO_SMALL:
        with pytest.raises(ValueError, match="too small"):
            get_network(name, channels, 5, size)
        return
    torch.manual_seed(0)
    net = get_network(name, channels, 5, size)
    out = net(torch.randn(2, channels, size, size))
    assert out.shape == (2, 5)
    F.cross_entropy(out, torch.tensor([0, 3])).backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def test_non_square_images():
    net = ConvNet(3, 10, (32, 64))
    assert net.classifier.in_features == 128 * 4 * 8
    assert net(torch.randn(2, 3, 32, 64)).shape == (2, 10)


def test_construction_is_deterministic_and_leaves_batchnorm_stats_alone():
    torch.manual_seed(1)
    a = get_network("ResNet18BN_AP", 3, 10, 32).state_dict()
    torch.manual_seed(1)
    b = get_network("ResNet18BN_AP", 3, 10, 32).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the dry forward that sizes the classifier must not update running statistics
    assert torch.equal(a["bn1.running_mean"], torch.zeros(64))
    assert torch.equal(a["bn1.running_var"], torch.ones(64))
    assert a["bn1.num_batches_tracked"].item() == 0


def test_width_and_depth_arguments():
    assert len(get_network("ConvNet", 3, 10, 64, width=64, depth=4).features) == 16
    assert get_network("ConvNetD2", 3, 10, 32, depth=4).classifier.in_features == 128 * 8 * 8  # name wins


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown network 'ConvNetD9'") as err:
        get_network("ConvNetD9", 3, 10, 32)
    assert "ConvNetD4" in str(err.value) and "ResNet18" in str(err.value) and "MLP" in str(err.value)


def test_too_small_image_says_what_to_use():
    with pytest.raises(ValueError, match="too small") as err:
        get_network("ConvNetD5", 3, 10, 8)
    assert "depth <= 3" in str(err.value) and "'ConvNetD3'" in str(err.value) and "32x32" in str(err.value)
    with pytest.raises(ValueError, match="at least 16x16"):
        get_network("LeNet", 3, 10, 8)


@pytest.mark.parametrize("kwargs,match", [
    (dict(channels=0), "channels must be a positive int"),
    (dict(num_classes=0), "num_classes must be a positive int"),
    (dict(im_size=(32,)), "im_size must be"),
    (dict(im_size=-1), "im_size must be"),
    (dict(im_size="32"), "im_size must be"),
])
def test_bad_arguments(kwargs, match):
    args = dict(name="ConvNet", channels=3, num_classes=10, im_size=32) | kwargs
    with pytest.raises(ValueError, match=match):
        get_network(**args)


@pytest.mark.parametrize("kwargs,match", [
    (dict(norm="batchnorm"), "unknown norm"),
    (dict(activation="gelu"), "unknown activation"),
    (dict(pooling="avgpooling"), "unknown pooling"),
    (dict(norm="group", width=30), "multiple of 4"),
    (dict(depth=0), "depth must be"),
])
def test_bad_convnet_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConvNet(3, 10, 32, **kwargs)
