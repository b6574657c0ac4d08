"""MobileInst: backbone -> semantic-enhanced mask decoder -> dual-transformer instance decoder.

forward(images) in training mode returns the raw outputs the losses need; in eval mode it returns,
per image, the instances (labels, scores, full-resolution binary masks), decoded from
`inference_outputs` by `postprocess.decode_instances`, the decode step every backend shares. Images go in as RGB
pixel values 0..255 (B, 3, H, W), H and W multiples of 32; normalisation happens inside, so an
exported graph takes the same input.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .registry import ModelConfig
from .backbones import build_backbone
from .instance_decoder import DualTransformerDecoder
from .mask_decoder import SemanticEnhancedMaskDecoder, Stride4MaskFeatures
from .normalization import PIXEL_MEAN, PIXEL_STD  # also imported from here (data, infer, model_info)
from .postprocess import InferenceConfig, decode_instances


def group_of(heads: dict[str, Tensor], groups: int, g: int) -> dict[str, Tensor]:
    """Group g's rows of image-major (B * G, ...) heads -> (B, ...)."""
    return {k: v.unflatten(0, (-1, groups))[:, g] for k, v in heads.items()}


class MobileInst(nn.Module):
    """The network. state_dict keys: `backbone.*` (the official layout of the backbone's release),
    `mask_decoder.*`, `instance_decoder.*`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone)
        self.mask_decoder = SemanticEnhancedMaskDecoder(
            self.backbone.out_channels, cfg.mask_dim, cfg.fusion_conv, cfg.kernel_dim,
            cfg.mask_coords, project=cfg.mask_stride == 8)
        # optional: M at stride 4 from the backbone's stride-4 stage (small objects; docs/learning.md)
        self.mask_stride4 = (Stride4MaskFeatures(self.backbone.stride4_channels, cfg.mask_dim,
                                                 cfg.kernel_dim) if cfg.mask_stride == 4 else None)
        self.instance_decoder = DualTransformerDecoder(
            global_channels=self.backbone.out_channels[3], local_channels=cfg.mask_dim,
            num_classes=cfg.num_classes, num_queries=cfg.num_queries, dim=cfg.hidden_dim,
            heads=cfg.num_heads, ffn_dim=cfg.ffn_dim, kernel_dim=cfg.kernel_dim,
            local_pool=cfg.local_pool, query_groups=cfg.query_groups, query_proposal=cfg.query_proposal)
        # optional: class evidence from the mask features under each query's own mask (docs/design.md)
        self.mask_class = nn.Linear(cfg.kernel_dim, cfg.num_classes) if cfg.mask_pooled_cls else None
        if self.mask_class is not None:
            nn.init.normal_(self.mask_class.weight, std=0.01)
            nn.init.zeros_(self.mask_class.bias)
        # optional: objectness (the ranking's quality term) from the mean and spread of M under the mask
        self.mask_quality = nn.Linear(2 * cfg.kernel_dim, 1) if cfg.mask_pooled_obj else None
        if self.mask_quality is not None:  # starts as the query's own objectness
            nn.init.zeros_(self.mask_quality.weight)
            nn.init.zeros_(self.mask_quality.bias)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)
        self.inference = InferenceConfig()

    # -- the network -------------------------------------------------------------------------
    def features(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Images (B, 3, H, W) 0..255 -> mask features M (B, E, H/s, W/s) at cfg.mask_stride s,
        F_mask (B, D, H/8, W/8), global semantics X6 (B, C6, H/64, W/64). Kernel reuse (video)
        runs only this part."""
        x = (images - self.pixel_mean) / self.pixel_std
        if self.mask_stride4 is None:
            feats = self.backbone(x)
            mask_feats, f_mask = self.mask_decoder(feats)
            return mask_feats, f_mask, feats[3]
        x2, *feats = self.backbone(x, with_stride4=True)
        _, f_mask = self.mask_decoder(feats)  # (no stride-8 projection in this configuration)
        return self.mask_stride4(x2, f_mask), f_mask, feats[3]

    def mask_logits(self, kernels: Tensor, mask_feats: Tensor) -> Tensor:
        """Kernels (B, N, E) . M (B, E, h, w) -> mask logits (B, N, h, w) at M's stride."""
        b, e, h, w = mask_feats.shape
        return torch.bmm(kernels, mask_feats.flatten(2)).view(b, -1, h, w)

    def to_stride4(self, mask_logits: Tensor) -> Tensor:
        """Stride-8 mask logits (B, N, h, w) -> (B, N, 2h, 2w), bilinear (SparseInst SCALE_FACTOR);
        stride-4 ones as they are."""
        if self.cfg.mask_upsample == 1:
            return mask_logits
        return F.interpolate(mask_logits, scale_factor=float(self.cfg.mask_upsample), mode="bilinear",
                             align_corners=False)

    def masks(self, kernels: Tensor, mask_feats: Tensor) -> Tensor:
        """Kernels (B, N, E) . M (B, E, h, w) -> mask logits (B, N, 2h, 2w) at stride 4."""
        return self.to_stride4(self.mask_logits(kernels, mask_feats))

    @property
    def pools_masks(self) -> bool:
        """True when a head reads M under every query's mask (`add_pooled_terms`): then every
        query's mask logits are needed, not only the kept ones'."""
        return self.mask_class is not None or self.mask_quality is not None

    def add_pooled_terms(self, out: dict[str, Tensor], mask_feats: Tensor,
                         mask_logits: Tensor | None = None) -> dict[str, Tensor]:
        """The heads that read the mask features M under each query's own stride-8 mask
        (`mask_logits`, computed here if not given), with w = sigmoid(mask logits), detached, so
        these losses cannot reshape a query's mask (its kernel gets no gradient from here); M,
        shared by all queries, does get their gradient:
            mean   = sum(w M) / (sum(w) + 1)                                (B, N, E)
            spread = sum(w M^2) / (sum(w) + 1) - mean^2                     (B, N, E)
        cfg.mask_pooled_cls: pred_logits += Linear(mean): a query's class sees the object its
        kernel segments, not only what its attention pooled (docs/design.md);
        cfg.mask_pooled_obj: pred_scores += Linear([mean, spread]): the objectness, which ranks the
        masks (trained to the matched mask's IoU), sees how uniform the features under the mask
        are (a mask spilling over the background pools mixed features). Every path that decodes
        instances calls this."""
        if not self.pools_masks:
            return out
        if mask_logits is None:
            mask_logits = self.mask_logits(out["pred_kernels"], mask_feats)
        m = mask_feats.flatten(2)  # (B, E, h*w)
        weight = mask_logits.flatten(2).sigmoid().detach()  # (B, N, h*w)
        norm = weight.sum(-1, keepdim=True) + 1.0  # (B, N, 1)
        mean = torch.bmm(weight, m.transpose(1, 2)) / norm  # (B, N, E)
        out = dict(out)
        if self.mask_class is not None:
            out["pred_logits"] = out["pred_logits"] + self.mask_class(mean)
        if self.mask_quality is not None:
            spread = torch.bmm(weight, (m * m).transpose(1, 2)) / norm - mean * mean  # (B, N, E)
            out["pred_scores"] = out["pred_scores"] + self.mask_quality(torch.cat([mean, spread], -1))
        return out

    def decode(self, heads: dict[str, Tensor], mask_feats: Tensor) -> dict[str, Tensor]:
        """The instance decoder's heads + M -> raw outputs: class logits (with the pooled term when
        configured) and pred_masks at stride 4; the kernel . M product is computed once for both."""
        m8 = self.mask_logits(heads["pred_kernels"], mask_feats)  # (B, N, h, w)
        out = dict(self.add_pooled_terms(heads, mask_feats, m8))
        out["pred_masks"] = self.to_stride4(m8)
        return out

    def forward_raw(self, images: Tensor) -> dict[str, Tensor]:
        """Raw outputs: pred_logits (B, N, C), pred_scores (B, N, 1), pred_kernels (B, N, E),
        pred_masks (B, N, H/4, W/4) logits. In training, with cfg.aux_loss also `aux_outputs`, a
        list of the same dicts predicted from earlier decoder stages, and with cfg.query_groups
        G > 1 `group_outputs`, the G - 1 extra query groups' dicts (Group DETR: each matched on
        its own; group 0 is the one inference uses)."""
        mask_feats, f_mask, x6 = self.features(images)
        dec = self.instance_decoder
        groups = self.cfg.query_groups if self.training else 1
        q_global, pos, proposal = dec.forward_global(x6, f_mask, groups)  # (B * G, N, D) each
        heads = dec.heads(dec.forward_local(q_global, pos, f_mask))
        # deep supervision (DETR's auxiliary losses): the queries after the global layer go
        # through the same final norm and heads; the criterion matches and scores them too
        aux = dec.heads(dec.norm(q_global)) if self.training and self.cfg.aux_loss else None
        # proposed queries' locations go with every prediction: the matcher keeps each query to
        # the objects that contain its location (FastInst's location cost)
        where = {k: proposal[k] for k in ("query_index", "query_valid")} if proposal else {}
        if proposal:
            where["proposal_size"] = tuple(proposal["proposal_logits"].shape[-2:])
        outs = []
        for g in range(groups):
            out = {**self.decode(group_of(heads, groups, g), mask_feats), **where}
            if aux is not None and g == 0:  # deep supervision of group 0 only: it is the one kept
                out["aux_outputs"] = [{**self.decode(group_of(aux, groups, g), mask_feats), **where}]
            outs.append(out)
        if groups > 1:
            outs[0]["group_outputs"] = outs[1:]
        if proposal:
            outs[0]["proposal_logits"] = proposal["proposal_logits"]  # (B, C, h, w): its own loss
        return outs[0]

    def inference_outputs(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """What inference needs, and what the raw ONNX graph returns: class logits (B, N, C) (with
        the pooled term when configured), objectness (B, N, 1), kernels (B, N, E) and mask
        features M (B, E, H/8, W/8). No mask is computed here: `decode_instances` makes the masks
        of the queries it keeps."""
        mask_feats, f_mask, x6 = self.features(images)
        out = self.add_pooled_terms(self.instance_decoder(x6, f_mask), mask_feats)
        return out["pred_logits"], out["pred_scores"], out["pred_kernels"], mask_feats

    def forward(self, images: Tensor, image_sizes: list[tuple[int, int]] | None = None,
                orig_sizes: list[tuple[int, int]] | None = None):
        if self.training:
            return self.forward_raw(images)
        return self.postprocess(self.inference_outputs(images), tuple(images.shape[-2:]),
                                image_sizes, orig_sizes)

    # -- inference ---------------------------------------------------------------------------
    def postprocess(self, outputs: tuple[Tensor, Tensor, Tensor, Tensor], padded_size: tuple[int, int],
                    image_sizes: list[tuple[int, int]] | None = None,
                    orig_sizes: list[tuple[int, int]] | None = None,
                    cfg: InferenceConfig | None = None) -> list[dict[str, Tensor]]:
        """`inference_outputs` -> per image {labels (K,), scores (K,), masks (K, H0, W0) bool}
        (`decode_instances` with `cfg`, default `self.inference`).

        image_sizes: each image's size inside the padding (default: the padded size);
        orig_sizes: the size to return masks at (default: image_sizes)."""
        logits, obj, kernels, mask_feats = outputs
        b = logits.shape[0]
        image_sizes = image_sizes or [padded_size] * b
        orig_sizes = orig_sizes or image_sizes
        return [decode_instances(logits[i], obj[i], kernels[i], mask_feats[i], padded_size,
                                 tuple(image_sizes[i]), tuple(orig_sizes[i]), cfg or self.inference,
                                 self.cfg.mask_upsample)
                for i in range(b)]
