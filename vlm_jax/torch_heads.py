"""A run's shared layers and task heads in PyTorch, applied to transformers' outputs (for `python -m vlm_jax.export`).

    import torch, transformers
    from vlm_jax.torch_heads import TorchHeads
    model = transformers.InternVLForConditionalGeneration.from_pretrained(OUT_DIR).eval()
    heads = TorchHeads.from_export(OUT_DIR)             # heads.safetensors + heads_config.json
    out = heads(model, pixel_values, text_ids, text_mask)  # pixels float[B, 3, S, S] (NCHW, normalised)

`out`: image_emb / text_emb float32[B, E] unit rows and logit_scale (ITC logits = logit_scale * image_emb @
text_emb.T); itm_logit float32[B] (log-odds that caption i matches image i); box float32[B, 4] (xyxy in [0, 1]);
spatial_logits float32[B, C] — each for the tasks the run trained. With `tasks.spatial.query='objects'` pass
`query_ids` / `query_mask` ("the <subject> and the <reference>"). Late fusion and 'cls' / 'mean' vision pooling
(the configs' choices); other settings raise ValueError. Only torch and safetensors are needed.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

# The file names vlm_jax.export writes (spelled here too: this module imports no jax).
HEADS_FILE = "heads.safetensors"
HEADS_CONFIG = "heads_config.json"


def _l2_normalize(x, eps=1e-6):
    return x * torch.rsqrt(torch.clamp((x * x).sum(-1, keepdim=True), min=eps * eps))


def _box_from_logits(raw):
    centre = torch.sigmoid(raw[..., :2])
    size = torch.sigmoid(raw[..., 2:]) * 2.0 * torch.minimum(centre, 1.0 - centre)
    return torch.cat([centre - 0.5 * size, centre + 0.5 * size], dim=-1)


class TorchHeads:
    """The parameters of `heads.safetensors` ('/'-joined vlm_jax paths) and the formulas of vlm_jax's heads."""

    def __init__(self, params: dict[str, torch.Tensor], config: dict):
        self.p, self.config = params, config
        emb = config["embedding"]
        if emb["fusion"] != "late":
            raise ValueError(f"torch_heads: fusion {emb['fusion']!r} is not supported (late fusion only)")
        if emb["vision_pool"] not in ("cls", "mean"):
            raise ValueError(f"torch_heads: vision_pool {emb['vision_pool']!r} is not supported (cls, mean)")
        grid_h, grid_w = config["patch_grid"]
        ys, xs = torch.meshgrid((torch.arange(grid_h) + 0.5) / grid_h, (torch.arange(grid_w) + 0.5) / grid_w,
                                indexing="ij")
        self.grid = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)  # [P, 2] (x, y) patch centres

    @classmethod
    def from_export(cls, directory: str) -> "TorchHeads":
        from safetensors.torch import load_file

        with open(os.path.join(directory, HEADS_CONFIG)) as f:
            config = json.load(f)
        return cls(load_file(os.path.join(directory, HEADS_FILE)), config)

    # -- layers -----------------------------------------------------------------------------------------------------

    def linear(self, prefix, x):
        return x @ self.p[f"{prefix}/kernel"] + self.p[f"{prefix}/bias"]

    def head(self, prefix, x):
        """A linear head (prefix/kernel, bias) or an MLP head (prefix/hidden, then tanh-GELU, prefix/kernel, bias)."""
        if f"{prefix}/hidden/kernel" in self.p:
            x = F.gelu(self.linear(f"{prefix}/hidden", x), approximate="tanh")
        return self.linear(prefix, x)

    def patch_attention(self, prefix, query, patches, num_heads):
        """vlm_jax.tasks.heads.PatchAttentionHead: (outputs [B, C], attended positions [B, N, 2])."""
        x = patches.float()
        x = (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)
        q = self.linear(f"{prefix}/query", query).reshape(query.shape[0], num_heads, -1)
        weights = torch.softmax(torch.einsum("bnd,bpd->bnp", q, x), dim=-1)
        pooled = torch.einsum("bnp,bpd->bnd", weights, x)
        mean = torch.einsum("bnp,pc->bnc", weights, self.grid)
        var = torch.einsum("bnp,pc->bnc", weights, self.grid * self.grid) - mean * mean
        std = torch.sqrt(torch.clamp(var, min=0.0) + 1e-6)
        feats = torch.cat([query, pooled.flatten(1), mean.flatten(1), std.flatten(1)], dim=-1)
        return self.head(prefix, feats), mean

    # -- features ---------------------------------------------------------------------------------------------------

    def text_embedding(self, hidden, mask):
        pool = self.config["embedding"]["text_pool"]
        mask = mask.bool()
        if pool == "mean":
            m = mask.float()[..., None]
            pooled = (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1.0)
        else:
            t = mask.shape[1]
            index = (t - 1 - mask.flip(1).int().argmax(1)) if pool == "last" else mask.int().argmax(1)
            pooled = hidden[torch.arange(hidden.shape[0]), index].float()
        return _l2_normalize(self.linear("text_proj/linear", F.relu(self.linear("text_adapter/linear", pooled))))

    def fuse(self, u, v):
        if self.config["embedding"]["fusion_features"] == "concat":
            return torch.cat([u, v], dim=-1)
        return torch.cat([u, v, u * v, (u - v).abs()], dim=-1)

    @torch.no_grad()
    def __call__(self, model, pixel_values, text_ids, text_mask, query_ids=None, query_mask=None) -> dict:
        """transformers' InternVLForConditionalGeneration `model` -> the heads' outputs (see the module doc)."""
        vision = model.model.vision_tower(pixel_values=pixel_values).last_hidden_state  # [B, 1 + P, Dv]
        language = model.model.language_model
        text_hidden = language(input_ids=text_ids, attention_mask=text_mask).last_hidden_state
        pooled = vision[:, 0].float() if self.config["embedding"]["vision_pool"] == "cls" else \
            vision[:, 1:].float().mean(1)
        image_emb = _l2_normalize(self.linear("vision_proj/linear", F.relu(self.linear("vision_adapter/linear",
                                                                                         pooled))))
        text_emb = self.text_embedding(text_hidden, text_mask)
        emb = self.config["embedding"]
        scale = torch.exp(torch.clamp(self.p["logit_scale"], max=torch.log(torch.tensor(emb["logit_scale_max"]))))
        fused = self.fuse(image_emb, text_emb)
        patches = vision[:, 1:]
        tasks = self.config["tasks"]
        out = {"image_emb": image_emb, "text_emb": text_emb, "logit_scale": scale}
        if "itm" in tasks:
            out["itm_logit"] = self.head("tasks/itm/head", fused)[:, 0]
        if "box" in tasks:
            cfg = tasks["box"]
            if cfg["head"] == "attention":
                raw, mean = self.patch_attention("tasks/box/head", fused, patches, int(cfg["num_heads"]))
                centre = mean[:, 0].clamp(1e-3, 1.0 - 1e-3)
                raw = raw + torch.cat([torch.log(centre) - torch.log1p(-centre), torch.zeros_like(centre)], dim=-1)
            else:
                raw = self.head("tasks/box/head", fused)
            out["box"] = _box_from_logits(raw)
        if "spatial" in tasks:
            cfg = tasks["spatial"]
            query = fused
            if cfg.get("query", "caption") == "objects":
                if query_ids is None:
                    raise ValueError("tasks.spatial.query='objects': pass query_ids and query_mask")
                query_hidden = language(input_ids=query_ids, attention_mask=query_mask).last_hidden_state
                query = self.fuse(image_emb, self.text_embedding(query_hidden, query_mask))
            if cfg.get("head", "mlp") == "attention":
                out["spatial_logits"] = self.patch_attention("tasks/spatial/head", query, patches,
                                                             int(cfg.get("num_heads", 4)))[0]
            else:
                out["spatial_logits"] = self.head("tasks/spatial/head", query)
        return out
