"""`--backbone-weights ssdlite`: a frozen TensorFlow graph read without TensorFlow (models/tf_graph.py),
its MobileNetV2 feature extractor converted to torchvision's layout (models/tf_mobilenetv2.py)."""
import glob
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mobileinst.errors import CheckpointError
from mobileinst.models import tf_mobilenetv2
from mobileinst.models.mobilenetv2 import MobileNetV2
from mobileinst.models.normalization import PIXEL_MEAN, PIXEL_STD
from mobileinst.models.pretrained import PRETRAINED, _sha256, resolve_backbone_weights
from mobileinst.models.tf_graph import DT_FLOAT, DT_INT32, read_constants
from mobileinst.models.weights import load_backbone_weights


# -- a GraphDef written by hand (protobuf wire format), the fields TensorFlow's schemas give -------
def _varint(n: int) -> bytes:
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def _field(number: int, payload: bytes | int, wire: int = 2) -> bytes:
    key = _varint(number << 3 | wire)
    if wire == 0:
        return key + _varint(payload)
    if wire == 5:
        return key + payload
    return key + _varint(len(payload)) + payload


def _tensor(dtype: int, shape: tuple[int, ...], content: bytes | None = None,
            floats: list[float] | None = None, packed: bool = True, ints: list[int] | None = None) -> bytes:
    dims = b"".join(_field(2, _field(1, d, wire=0)) for d in shape)
    out = _field(1, dtype, wire=0) + _field(2, dims)
    if content is not None:
        out += _field(4, content)
    if floats is not None:
        if packed:
            out += _field(5, struct.pack(f"<{len(floats)}f", *floats))
        else:
            out += b"".join(_field(5, struct.pack("<f", v), wire=5) for v in floats)
    if ints is not None:
        out += _field(7, b"".join(_varint(v & (2 ** 64 - 1)) for v in ints))
    return out


def _node(name: str, op: str, tensor: bytes | None = None) -> bytes:
    out = _field(1, name.encode()) + _field(2, op.encode()) + _field(3, b"some_input")
    if tensor is not None:
        attr_value = _field(8, tensor)
        out += _field(5, _field(1, b"dtype") + _field(2, _field(6, _varint(DT_FLOAT))))
        out += _field(5, _field(1, b"value") + _field(2, attr_value))
    return out


def _graph(nodes: list[bytes]) -> bytes:
    return b"".join(_field(1, n) for n in nodes) + _field(4, _field(1, 27, wire=0))  # + a version field


def test_constants_are_read_in_every_encoding(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    path = tmp_path / "g.pb"
    path.write_bytes(_graph([
        _node("net/a", "Const", _tensor(DT_FLOAT, (2, 3), content=a.tobytes())),
        _node("net/b", "Const", _tensor(DT_FLOAT, (3,), floats=[1.5, -2.0, 3.25])),
        _node("net/c", "Const", _tensor(DT_FLOAT, (2, 2), floats=[0.5], packed=False)),
        _node("net/d", "Const", _tensor(DT_INT32, (3,), ints=[1, -7, 300])),
        _node("net/e", "Identity"),
        _node("other/f", "Const", _tensor(DT_FLOAT, (1,), floats=[9.0])),
    ]))
    got = read_constants(path, "net/")
    assert sorted(got) == ["net/a", "net/b", "net/c", "net/d"]  # no Identity, no other prefix
    np.testing.assert_array_equal(got["net/a"], a)
    np.testing.assert_array_equal(got["net/b"], np.array([1.5, -2.0, 3.25], np.float32))
    np.testing.assert_array_equal(got["net/c"], np.full((2, 2), 0.5, np.float32))  # one value for all
    np.testing.assert_array_equal(got["net/d"], np.array([1, -7, 300], np.int32))
    assert got["net/a"].dtype == np.float32 and got["net/d"].dtype == np.int32
    assert set(read_constants(path)) == {"net/a", "net/b", "net/c", "net/d", "other/f"}


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong_count", "empty_dir"])
def test_a_bad_graph_is_one_line_naming_the_file(tmp_path, damage):
    good = _graph([_node("net/a", "Const", _tensor(DT_FLOAT, (4,), content=np.ones(4, np.float32).tobytes()))])
    path = tmp_path / "g.pb"
    if damage == "truncated":
        path.write_bytes(good[:-3])
    elif damage == "garbage":
        path.write_bytes(b"\xff" * 64)
    elif damage == "wrong_count":
        path.write_bytes(_graph([_node("net/a", "Const", _tensor(DT_FLOAT, (5,), floats=[1.0, 2.0]))]))
    else:
        path.mkdir()
    with pytest.raises(CheckpointError) as err:
        read_constants(path)
    assert str(path) in str(err.value) and len(str(err.value).splitlines()) == 1


# -- the conversion, on random weights under the graph's names ------------------------------------
def _tf_consts(seed: int = 0) -> dict[str, np.ndarray]:
    """Random feature-extractor constants with TF's names and layouts, from torchvision's shapes."""
    rng = np.random.default_rng(seed)
    shapes = MobileNetV2().state_dict()
    out = {}
    for scope, layer, conv in tf_mobilenetv2._modules():
        base = tf_mobilenetv2.PREFIX + scope + (f"/{layer}" if layer else "")
        o, i, kh, kw = shapes[conv + ".weight"].shape
        if layer == "depthwise":
            out[base + "/depthwise_weights"] = rng.normal(size=(kh, kw, o, 1)).astype(np.float32)
        else:
            out[base + "/weights"] = rng.normal(size=(kh, kw, i, o)).astype(np.float32)
        out[base + "/BatchNorm/gamma"] = rng.uniform(0.5, 2, o).astype(np.float32)
        out[base + "/BatchNorm/beta"] = rng.normal(size=o).astype(np.float32)
        out[base + "/BatchNorm/moving_mean"] = rng.normal(size=o).astype(np.float32)
        out[base + "/BatchNorm/moving_variance"] = rng.uniform(0.1, 3, o).astype(np.float32)
    return out


def test_layouts_and_batchnorm_are_converted():
    consts = _tf_consts()
    state = tf_mobilenetv2.convert(consts)
    net = MobileNetV2()
    net.load_state_dict(state, strict=False)
    assert set(state) == {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
    p = tf_mobilenetv2.PREFIX
    dw = consts[p + "expanded_conv_1/depthwise/depthwise_weights"]  # (kh, kw, C, 1)
    expand = consts[p + "expanded_conv_1/expand/weights"]  # (1, 1, in, out)
    assert state["features.2.conv.1.0.weight"][5, 0, 0, 2] == dw[0, 2, 5, 0]  # row 0, column 2
    assert state["features.2.conv.0.0.weight"][7, 3, 0, 0] == expand[0, 0, 3, 7]
    project = consts[p + "expanded_conv/project/weights"]  # features.1's project is conv.1, BN conv.2
    assert state["features.1.conv.1.weight"][4, 9, 0, 0] == project[0, 0, 9, 4]
    last = consts[p + "Conv_1/weights"]
    assert state["features.18.0.weight"][100, 17, 0, 0] == last[0, 0, 17, 100]
    # BN: torch's eps 1e-5 on the converted variance == TF's eps 1e-3 on the graph's
    y = torch.randn(2, 24, 5, 5)
    bn = net.features[2].conv[3]  # expanded_conv_1/project
    ref = [torch.from_numpy(consts[p + f"expanded_conv_1/project/BatchNorm/{k}"]).view(1, -1, 1, 1)
           for k in ("gamma", "beta", "moving_mean", "moving_variance")]
    tf_out = ref[0] * (y - ref[2]) / torch.sqrt(ref[3] + 1e-3) + ref[1]
    torch.testing.assert_close(bn.eval()(y), tf_out, rtol=1e-5, atol=1e-5)


def test_stem_takes_our_normalisation_where_the_graph_took_x_over_127_5_minus_1():
    consts = _tf_consts(1)
    net = MobileNetV2().eval()
    net.load_state_dict(tf_mobilenetv2.convert(consts), strict=False)
    p = tf_mobilenetv2.PREFIX + "Conv/"
    raw = torch.rand(1, 3, 32, 32) * 255
    ours = (raw - torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    x_tf = raw / 127.5 - 1
    w = torch.from_numpy(consts[p + "weights"].transpose(3, 2, 0, 1).copy())
    g, b, m, v = (torch.from_numpy(consts[p + f"BatchNorm/{k}"]).view(1, -1, 1, 1)
                  for k in ("gamma", "beta", "moving_mean", "moving_variance"))
    tf_out = g * (F.conv2d(x_tf, w, stride=2, padding=1) - m) / torch.sqrt(v + 1e-3) + b
    out = net.features[0][1](net.features[0][0](ours))  # conv + BN of the converted stem
    # equal away from the border (the padded pixel is 0 in each input space, not the same colour)
    torch.testing.assert_close(out[..., 1:, 1:], tf_out[..., 1:, 1:], rtol=1e-4, atol=1e-3)


def test_a_graph_without_the_feature_extractor_is_refused():
    consts = _tf_consts()
    del consts[tf_mobilenetv2.PREFIX + "expanded_conv_7/expand/weights"]
    with pytest.raises(CheckpointError, match="expanded_conv_7"):
        tf_mobilenetv2.convert(consts, "x.pb")


# -- the installed file ----------------------------------------------------------------------------
def _natural_image() -> torch.Tensor:
    """matplotlib's sample photo (Grace Hopper), 320 x 256, normalised as the model's input."""
    import cv2
    path = glob.glob(str(Path(sys.prefix) / "lib" / "python3*" / "site-packages" / "matplotlib" /
                         "mpl-data" / "sample_data" / "grace_hopper.jpg"))
    if not path:
        import matplotlib
        path = [str(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")]
    im = cv2.cvtColor(cv2.imread(path[0]), cv2.COLOR_BGR2RGB)
    x = torch.from_numpy(cv2.resize(im, (256, 320)).astype(np.float32)).permute(2, 0, 1)[None]
    return (x - torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(PIXEL_STD).view(1, 3, 1, 1)


def _bn_mismatch(net: torch.nn.Module, x: torch.Tensor) -> float:
    """Median over BN layers of the median channel |batch mean - running mean| / running std of
    each BN's input on x: small when the weights, layouts and input scaling are what the running
    statistics were gathered with."""
    devs = []

    def hook(mod, inp, _):
        ok = mod.running_var > 1e-3
        d = (inp[0].mean((0, 2, 3)) - mod.running_mean).abs() / mod.running_var.sqrt()
        devs.append(float(d[ok].median()))
    hooks = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        net.eval()(x)
    for h in hooks:
        h.remove()
    return float(np.median(devs))


def test_the_installed_ssdlite_graph_resolves_loads_strictly_and_fits_its_statistics(monkeypatch):
    path = resolve_backbone_weights("ssdlite", "mobilenetv2")
    assert path.name == "frozen_inference_graph.pb"
    assert _sha256(path) == PRETRAINED["mobilenetv2"]["ssdlite"].sha256
    net = MobileNetV2()
    report = load_backbone_weights(net, path)
    assert sorted(report.loaded) == sorted(k for k in net.state_dict() if not k.endswith("num_batches_tracked"))
    x = _natural_image()
    converted = _bn_mismatch(net, x)
    imagenet = MobileNetV2()
    load_backbone_weights(imagenet, resolve_backbone_weights("imagenet", "mobilenetv2"))
    # on a photo the converted network's BN inputs sit about where its running statistics say,
    # as close as torchvision's ImageNet file does (measured 0.20 vs 0.17) ...
    assert converted < 1.5 * _bn_mismatch(imagenet, x)
    # ... and clearly closer than without the input scaling folded into the stem (measured 0.29)
    monkeypatch.setattr(tf_mobilenetv2, "_fold_input_normalisation", lambda state: None)
    unfolded = MobileNetV2()
    load_backbone_weights(unfolded, path)
    assert _bn_mismatch(unfolded, x) > converted + 0.05


def test_ssdlite_is_only_for_mobilenetv2():
    with pytest.raises(CheckpointError, match="no ssdlite file for backbone efficientnet-lite0"):
        resolve_backbone_weights("ssdlite", "efficientnet-lite0")
