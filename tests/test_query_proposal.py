"""Image-conditioned queries (FastInst's query proposal): selection, location constraint, proposal
loss, ONNX export. Expected values are written by hand or as closed forms of the definitions.

The proposal head is steered by `steer`: its 3x3 conv copies channel 0 of x, its 1x1 conv maps it
to class 0 with a bias, every other class gets a constant logit, so a test picks the logit map."""
import io
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from mobileinst.models.instance_decoder import sine_position_encoding
from mobileinst.models.query_proposal import QueryProposal, local_peaks, ranking_key, select_top
from mobileinst.train.proposal_loss import (PROPOSAL_WEIGHT, cell_scale, constrain_scores, location_mask,
                                            proposal_loss, proposal_targets)

D, C = 8, 3


@torch.no_grad()
def steer(qp: QueryProposal, bias: float = -5.0, other: float = -10.0) -> QueryProposal:
    """Logits of class 0 = relu(x[:, 0]) + bias; the other classes = `other` everywhere."""
    conv1, conv2 = qp.cls_head[0], qp.cls_head[2]
    conv1.weight.zero_(), conv1.bias.zero_()
    conv1.weight[0, 0, 1, 1] = 1.0
    conv2.weight.zero_()
    conv2.weight[0, 0, 0, 0] = 1.0
    conv2.bias.fill_(other)
    conv2.bias[0] = bias
    return qp


def dome(h: int, w: int, cy: float, cx: float, radius: float, peak: float = 10.0) -> torch.Tensor:
    """A large object: a paraboloid of height `peak` on a disk, 0 (a plateau) outside it."""
    y = torch.arange(h, dtype=torch.float32)[:, None]
    x = torch.arange(w, dtype=torch.float32)[None, :]
    return (peak * (1 - ((y - cy) ** 2 + (x - cx) ** 2) / radius ** 2)).clamp(min=0)  # (h, w)


def tokens_with(map0: torch.Tensor, b: int = 1) -> torch.Tensor:
    """x (b, D, h, w) whose channel 0 is map0 and the rest random (they only feed the queries)."""
    x = torch.randn(b, D, *map0.shape, generator=torch.Generator().manual_seed(0))
    x[:, 0] = map0
    return x


# -- selection -----------------------------------------------------------------------------------
def test_shapes_and_gathered_features():
    qp = QueryProposal(D, 10, C).eval()
    x = torch.randn(2, D, 6, 7)
    out = qp(x)
    assert out["query_feat"].shape == (2, 10, D) and out["query_pos"].shape == (2, 10, D)
    assert out["query_index"].shape == (2, 10) and out["query_index"].dtype == torch.int64
    assert out["query_valid"].shape == (2, 10) and out["query_valid"].all()
    assert out["proposal_logits"].shape == (2, C, 6, 7)
    idx = out["query_index"]
    assert all(len(set(row.tolist())) == 10 for row in idx)  # distinct pixels
    tok = x.flatten(2).transpose(1, 2)  # (B, P, D)
    pos = sine_position_encoding(x, D)[0]  # (P, D)
    for b in range(2):
        torch.testing.assert_close(out["query_feat"][b], qp.feat_proj(tok[b, idx[b]]))
        torch.testing.assert_close(out["query_pos"][b], pos[idx[b]])


def test_one_big_blob_takes_one_query():
    h = w = 16
    qp = steer(QueryProposal(D, 10, C)).eval()
    m = dome(h, w, 7.0, 9.0, radius=5.5)  # one large object centred at (7, 9)
    footprint = m.flatten() > 0
    idx = qp(tokens_with(m))["query_index"][0]
    assert idx[0].item() == 7 * w + 9  # its peak first
    assert footprint[idx].sum().item() == 1  # and no other query inside it
    assert footprint.sum() > 10  # though ranked by score alone it would hold every query


def test_peaks_are_per_class():
    # pixel 2 (class 1, 0.7) touches pixel 1 (class 0, 0.8): a class-agnostic max would drop it
    probs = torch.tensor([[[[0.9, 0.8, 0.1, 0.1]], [[0.1, 0.1, 0.7, 0.6]]]])  # (1, 2, 1, 4)
    score, peak = local_peaks(probs)
    torch.testing.assert_close(score, torch.tensor([[[0.9, 0.8, 0.7, 0.6]]]))
    assert peak.tolist() == [[[True, False, True, False]]]


def test_ranking_peaks_first_then_score_then_raster_order():
    score = torch.tensor([[[0.5, 0.9, 0.5, 0.2, 0.5]]])  # (1, 1, 5)
    peak = torch.tensor([[[True, False, True, False, True]]])
    index, valid = select_top(ranking_key(score, peak), 5)
    assert index.tolist() == [[0, 2, 4, 1, 3]] and valid.all()


@pytest.mark.parametrize("value", [0.0, 3.0])
def test_constant_map_is_deterministic(value):
    # every pixel ties (an empty or constant image, a saturated head): raster order, every run
    qp = steer(QueryProposal(D, 12, C)).eval()
    x = tokens_with(torch.full((5, 6), value), b=2)
    for _ in range(3):
        out = qp(x)
        assert out["query_index"].tolist() == [list(range(12))] * 2
    assert (out["proposal_logits"][:, 0] == value - 5.0).all()


def test_saturated_scores_tie_to_lower_index():
    # sigmoid(40) == sigmoid(50) == 1.0 in float32: equal scores, both peaks -> lower index first
    qp = steer(QueryProposal(D, 2, C), bias=0.0).eval()
    m = torch.zeros(5, 5)
    m[4, 4], m[0, 0] = 50.0, 40.0
    assert qp(tokens_with(m))["query_index"].tolist() == [[0, 24]]


def test_more_queries_than_pixels_pads():
    qp = QueryProposal(D, 100, C).eval()
    fb_feat, fb_pos = torch.randn(100, D), torch.randn(100, D)
    x = torch.randn(2, D, 4, 4)
    out = qp(x)
    valid, idx = out["query_valid"], out["query_index"]
    assert valid[:, :16].all() and not valid[:, 16:].any()
    assert all(sorted(row[:16].tolist()) == list(range(16)) for row in idx)
    assert (idx[:, 16:] == idx[:, :1]).all()  # padding points to the best pixel: gathers stay in range
    out2 = qp(x, fb_feat, fb_pos)
    torch.testing.assert_close(out2["query_feat"][:, :16], out["query_feat"][:, :16])
    torch.testing.assert_close(out2["query_feat"][:, 16:], fb_feat[16:].expand(2, -1, -1))
    torch.testing.assert_close(out2["query_pos"][:, 16:], fb_pos[16:].expand(2, -1, -1))
    one = qp(torch.randn(1, D, 1, 1))  # a single cell
    assert one["query_valid"].sum() == 1 and (one["query_index"] == 0).all()


# -- location constraint -------------------------------------------------------------------------
def test_location_mask_by_hand():
    # 4x4 proposal map over a 16x16 mask grid: cell (i, k) = mask rows 4i..4i+3, cols 4k..4k+3
    masks = torch.zeros(2, 16, 16)
    masks[0, 1:3, 1:3] = 1.0  # GT 0 inside cell (0, 0) = flat 0
    masks[1, 8:16, 5:6] = 0.25  # GT 1 (soft) in cells (2, 1), (3, 1) = flat 9, 13
    query_index = torch.tensor([[0, 9, 13, 5, 0]])
    valid = torch.tensor([[True, True, True, True, False]])
    inside = location_mask(query_index, (4, 4), [masks], valid)[0]
    assert inside.tolist() == [[True, False], [False, True], [False, True], [False, False], [True, True]]
    empty = location_mask(query_index, (4, 4), [masks[:0]])[0]
    assert empty.shape == (5, 0)


def test_cell_scale_with_ceil_sizes():
    assert cell_scale((4, 4), (16, 16)) == 4  # stride 16 over stride 4
    assert cell_scale((5, 5), (72, 72)) == 16  # 288 px at stride 64: ceil(288 / 64) = 5 cells
    assert cell_scale((18, 18), (72, 72)) == 4
    masks = torch.zeros(1, 72, 72)
    masks[0, 70, 70] = 1.0  # the last mask-grid cell lies in the last (partial) map cell
    inside = location_mask(torch.tensor([[24, 0]]), (5, 5), [masks])[0]
    assert inside[:, 0].tolist() == [True, False]


def test_constrain_scores_forbids_and_stays_complete():
    score = torch.tensor([[0.9, 0.8], [0.1, 0.2], [0.3, 0.1]])  # (N=3, M=2)
    inside = torch.tensor([[False, True], [True, False], [False, False]])  # GT 0 allowed for query 1 only
    rows, cols = linear_sum_assignment(constrain_scores(score, inside).numpy(), maximize=True)
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 1, 1: 0}  # the best pair (0, 0) is forbidden
    # no query lies in GT 1: it is still matched, to the best remaining query
    inside = torch.tensor([[True, False], [False, False], [False, False]])
    rows, cols = linear_sum_assignment(constrain_scores(score, inside).numpy(), maximize=True)
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 0, 1: 1}


# -- proposal loss -------------------------------------------------------------------------------
def test_proposal_targets_match_inside_the_object():
    logits = torch.full((1, C, 4, 4), -3.0)
    logits[0, 2, 0, 0] = 5.0  # the most confident class-2 pixel lies outside the object
    logits[0, 2, 3, 2] = 1.0
    logits[0, 2, 3, 3] = 2.0  # the best class-2 pixel inside it
    masks = torch.zeros(1, 16, 16)
    masks[0, 12:16, 8:16] = 1.0  # cells (3, 2), (3, 3)
    onehot = proposal_targets(logits, [{"labels": torch.tensor([2])}], [masks])
    assert onehot.sum() == 1 and onehot[0, 2, 3, 3] == 1


def test_proposal_loss_closed_form_and_gradient():
    qp = QueryProposal(D, 5, C)
    x = torch.randn(2, D, 4, 4, requires_grad=True)
    logits = qp(x)["proposal_logits"]
    masks = torch.zeros(2, 16, 16)
    masks[0, :8, :8] = 1.0
    targets = [{"labels": torch.tensor([1, 0])}, {"labels": torch.zeros(0, dtype=torch.int64)}]
    tmasks = [masks, masks[:0]]  # image 1 has no GT
    loss = proposal_loss(logits, targets, tmasks)
    assert torch.isfinite(loss)
    loss.backward()
    assert qp.cls_head[0].weight.grad.abs().sum() > 0 and qp.cls_head[2].weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0

    # closed form: logits z everywhere, B = 1, P = 16 pixels, 2 GT -> 2 positives among C * P
    z = -1.5
    logits = torch.full((1, C, 4, 4), z)

    def sp(v):  # softplus: BCE of logit v with target 0; of -v with 1
        return math.log1p(math.exp(v))
    expected = PROPOSAL_WEIGHT * ((C * 16 - 2) * sp(z) + 2 * sp(-z)) / 16
    got = proposal_loss(logits, [targets[0]], [masks])
    assert got.item() == pytest.approx(expected, rel=1e-6)
    empty = proposal_loss(logits, [targets[1]], [masks[:0]])  # no GT: all background
    assert empty.item() == pytest.approx(PROPOSAL_WEIGHT * C * sp(z), rel=1e-6)


# -- export --------------------------------------------------------------------------------------
class ProposalGraph(torch.nn.Module):
    def __init__(self, num_queries: int) -> None:
        super().__init__()
        self.qp = QueryProposal(D, num_queries, C)
        self.fallback = torch.nn.Embedding(num_queries, D)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.qp(x, self.fallback.weight, self.fallback.weight)
        return tuple(out[k] for k in ("query_feat", "query_pos", "query_index", "query_valid",
                                      "proposal_logits"))


def export(graph: torch.nn.Module, dynamo: bool):
    """Both exporters of mobileinst/infer/onnx_graph.py (dynamo with dynamic_shapes, TorchScript with
    dynamic_axes), with dynamic batch, height and width."""
    import onnx
    x = torch.randn(2, D, 6, 5)
    names = ["feat", "pos", "index", "valid", "logits"]
    if dynamo:
        pytest.importorskip("onnxscript")
        from torch.export import Dim
        shapes = {"x": {0: Dim("batch", min=1, max=64), 2: Dim("h", min=1, max=256), 3: Dim("w", min=1, max=256)}}
        return torch.onnx.export(graph, (x,), None, dynamo=True, opset_version=18, input_names=["x"],
                                 output_names=names, dynamic_shapes=shapes, optimize=True,
                                 verbose=False).model_proto
    buf = io.BytesIO()
    torch.onnx.export(graph, (x,), buf, dynamo=False, opset_version=18, input_names=["x"], output_names=names,
                      dynamic_axes={"x": {0: "batch", 2: "h", 3: "w"}})
    return onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_matches_pytorch(dynamo):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    graph = ProposalGraph(num_queries=20).eval()
    padded = torch.zeros(1, D, 10, 12)  # a letterboxed image: a constant band, many exact ties
    padded[..., :6, :] = torch.randn(1, D, 6, 12)
    inputs = [torch.randn(2, D, 9, 13), torch.randn(1, D, 4, 4), torch.randn(3, D, 16, 11),
              torch.randn(1, D, 1, 1), torch.zeros(1, D, 7, 7), padded]
    proto = export(graph, dynamo)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for x in inputs:
        with torch.no_grad():
            ref = [t.numpy() for t in graph(x)]
        got = sess.run(None, {"x": x.numpy()})
        if not x.any():  # a constant map: every pixel ties, raster order
            assert got[2].tolist() == [list(range(20))]
        np.testing.assert_array_equal(got[2], ref[2])  # query_index
        np.testing.assert_array_equal(got[3], ref[3])  # query_valid
        for i in (0, 1, 4):
            np.testing.assert_allclose(got[i], ref[i], rtol=1e-5, atol=1e-5)
