"""LiteMedSAM's mask decoder (SAM's two-way transformer), the same weights and outputs, with the work that
does not depend on the prompt done once per slice.

Why: the corrections and the coherence reward decode many box prompts on the same few slices (a GRPO group
is 8 rollouts x their boxes on each slice).  The vendored forward copies the slice's embedding per prompt and
runs everything per prompt; on CPU more than half of its 60-70 ms per prompt is memory traffic (adds of the
positional encoding, head reshapes, a softmax over 7 tokens), not arithmetic.  This forward, for box prompts
without a mask prompt (the image side then starts equal for every prompt on a slice):

- computes the first block's image-side projections (token->image keys and values, image->token queries)
  once per slice when several prompts share it;
- otherwise never projects the 4096 image tokens: the 7 prompt tokens are projected into the image's
  channel space instead (q . W_k x = (W_k^T q) . x), and the image->token attention's output projection is
  attention (4096 x 56) @ (values W_out^T) (56 x 256);
- runs the two transposed convolutions of the upscaling (kernel 2, stride 2: per-pixel linear maps) as
  matmuls in a channels-last layout, for the one mask that is used.

It is a reassociation of the same arithmetic in fp32: Testing/test_lite_decoder.py compares it with the
vendored forward on the real weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

HEADS = 8
# Block 1's image-side projections cost about as much as 2.4 prompts' projection-free attention to the slice
# (403 M against 170 M multiply-adds per prompt): project the slice once from this many prompts on it.
PROJECT_FROM = 3


@dataclass(frozen=True)
class SliceState:
    """One slice's image tokens (HW, C), with the positional encoding added, and optionally block 1's
    projections of them (token->image keys (H, c, HW) and values (H, HW, c), image->token queries (H, c, HW))."""

    src: "object"
    with_pe: "object"
    projected: "Optional[tuple]" = None


@dataclass(frozen=True)
class DecodedBatch:
    """Low-resolution logits (N, 256, 256) in the model's 256 frame, the predicted IoU (N,) of mask 0, and how
    many decoder passes produced them."""

    logits: "object"
    iou: "object"
    calls: int = 1


def vendored_decode(prompt_encoder, mask_decoder, embeddings, boxes, masks=None) -> DecodedBatch:
    """The package's own forward, the reference: box prompts (N, 4) in the 256 frame on embeddings (N or 1, C,
    64, 64), optional mask prompts (N, 1, 256, 256) -> logits and IoU of the single mask."""
    sparse, dense = prompt_encoder(points=None, boxes=boxes.view(-1, 1, 4), masks=masks)
    logits, iou = mask_decoder(image_embeddings=embeddings, image_pe=prompt_encoder.get_dense_pe(),
                               sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
    return DecodedBatch(logits[:, 0], iou[:, 0])


class SliceSharedDecoder:
    """Decode box prompts, grouped by slice, with LiteMedSAM's prompt encoder and mask decoder weights."""

    def __init__(self, prompt_encoder, mask_decoder) -> None:
        import torch

        transformer = mask_decoder.transformer
        if len(transformer.layers) != 2 or transformer.num_heads != HEADS:
            raise ValueError("SliceSharedDecoder expects SAM's two-block, 8-head two-way transformer")
        self.prompt_encoder = prompt_encoder
        self.decoder = mask_decoder
        self.transformer = transformer
        with torch.inference_mode():
            pe = prompt_encoder.get_dense_pe()  # (1, C, 64, 64)
            self.grid = tuple(pe.shape[-2:])
            self.pe = pe.flatten(2).transpose(1, 2)[0].contiguous()  # (HW, C)
            self.no_mask = prompt_encoder.no_mask_embed.weight.reshape(-1)  # dense prompt of a box-only prompt
            up1, norm, _, up2, _ = mask_decoder.output_upscaling
            # ConvTranspose2d(k=2, s=2): out[o, 2y+dy, 2x+dx] = sum_c in[c, y, x] W[c, o, dy, dx] + b[o]
            self.up1_weight = up1.weight.permute(0, 2, 3, 1).reshape(up1.weight.shape[0], -1).contiguous()
            self.up1_bias = up1.bias.repeat(4)
            self.up1_channels = up1.weight.shape[1]
            self.norm = norm
            self.up2_weight = up2.weight.permute(0, 2, 3, 1).reshape(up2.weight.shape[0], -1).contiguous()
            self.up2_bias = up2.bias.repeat(4)
            self.up2_channels = up2.weight.shape[1]

    # ------------------------------------------------------------------ attention, block 1 (image side shared)
    @staticmethod
    def _heads_first(x):
        """(N, T, H*c) -> (H, N*T, c)."""
        n, t, _ = x.shape
        return x.view(n, t, HEADS, -1).permute(2, 0, 1, 3).reshape(HEADS, n * t, -1)

    def _shared_tokens_to_image(self, module, queries_in, keys_t, values):
        """Tokens attend to the slice: keys_t (H, c, HW) and values (H, HW, c) are the slice's, shared."""
        import torch

        n, t, _ = queries_in.shape
        q = self._heads_first(module.q_proj(queries_in)) * keys_t.shape[1] ** -0.5
        attn = torch.softmax(torch.bmm(q, keys_t), dim=-1)  # (H, N*T, HW)
        out = torch.bmm(attn, values).view(HEADS, n, t, -1).permute(1, 2, 0, 3).reshape(n, t, -1)
        return module.out_proj(out)

    def _shared_image_to_tokens(self, module, image_queries_t, tokens_with_pe, tokens):
        """The slice attends to the tokens, image_queries_t (H, c, HW) shared -> update (N, HW, C)."""
        import torch

        n, t, _ = tokens.shape
        k = self._heads_first(module.k_proj(tokens_with_pe)) * image_queries_t.shape[1] ** -0.5
        scores = torch.bmm(k, image_queries_t).view(HEADS, n, t, -1)  # (H, N, T, HW)
        attn = torch.softmax(scores, dim=2).transpose(0, 1).reshape(n, HEADS * t, -1)  # (N, H*T, HW)
        return torch.baddbmm(module.out_proj.bias, attn.transpose(1, 2), self._values_out(module, tokens))

    @staticmethod
    def _values_out(module, tokens):
        """v W_out^T per head, (N, H*T, C): out_proj(softmax(q k^T) v) = softmax(q k^T) (v W_out^T), so the
        (HW x internal) attention output is never formed (the values are T = 7 tokens)."""
        import torch

        n, t, _ = tokens.shape
        v = module.v_proj(tokens).view(n, t, HEADS, -1)
        w_out = module.out_proj.weight.view(module.out_proj.weight.shape[0], HEADS, -1)  # (C, H, c)
        return torch.einsum("nthc,ohc->nhto", v, w_out).reshape(n, HEADS * t, -1)

    # ------------------------------------------------------------------ attention, later blocks (per prompt)
    @staticmethod
    def _tokens_to_image(module, queries_in, image, image_with_pe):
        """Tokens attend to the image (N, HW, C), or (HW, C) shared by all prompts, without projecting it:
        q . (W_k x + b_k) = (q W_k) . x + const (the const is the same for every image token, so the softmax
        drops it), and with rows of attention summing to 1, attention @ (x W_v^T + b_v) = (attention @ x) W_v^T + b_v."""
        import torch

        n, t, _ = queries_in.shape
        q = module.q_proj(queries_in).view(n, t, HEADS, -1)
        w_k = module.k_proj.weight.view(HEADS, -1, module.k_proj.weight.shape[1])  # (H, c, C)
        q_image = torch.einsum("nthc,hcd->nhtd", q * q.shape[-1] ** -0.5, w_k).reshape(n, HEADS * t, -1)
        attn = torch.softmax(torch.matmul(q_image, image_with_pe.transpose(-1, -2)), dim=-1)  # (N, H*T, HW)
        pooled = torch.matmul(attn, image).view(n, HEADS, t, -1)  # (N, H, T, C)
        w_v = module.v_proj.weight.view(HEADS, -1, module.v_proj.weight.shape[1])
        out = torch.einsum("nhtd,hcd->nthc", pooled, w_v).reshape(n, t, -1) + module.v_proj.bias
        return module.out_proj(out)

    def _image_to_tokens(self, module, image_with_pe, tokens_with_pe, tokens):
        """The image (N, HW, C), or (HW, C) shared, attends to the tokens:
        (W_q x + b_q) . k = x . (W_q^T k) + b_q . k per token, so the image is not projected either."""
        import torch

        n, t, _ = tokens.shape
        k = module.k_proj(tokens_with_pe).view(n, t, HEADS, -1) * (module.internal_dim // HEADS) ** -0.5
        w_q = module.q_proj.weight.view(HEADS, -1, module.q_proj.weight.shape[1])  # (H, c, C)
        k_image = torch.einsum("nthc,hcd->nhtd", k, w_q).reshape(n, HEADS * t, -1)
        k_bias = torch.einsum("nthc,hc->nht", k, module.q_proj.bias.view(HEADS, -1)).reshape(n, HEADS * t, 1)
        scores = torch.matmul(k_image, image_with_pe.transpose(-1, -2)).add_(k_bias).view(n, HEADS, t, -1)
        attn = torch.softmax(scores, dim=2).view(n, HEADS * t, -1)  # softmax over the T tokens
        return torch.baddbmm(module.out_proj.bias, attn.transpose(1, 2), self._values_out(module, tokens))

    def _upscale_mask(self, image, mask_token):
        """Upscaling + hypernetwork of mask 0: image (N, HW, C) -> logits (N, 4*64, 4*64)."""
        import torch
        import torch.nn.functional as F

        n = image.shape[0]
        gh, gw = self.grid
        x = torch.addmm(self.up1_bias, image.reshape(-1, image.shape[-1]), self.up1_weight)  # (N*HW, 4*C1)
        x = x.view(n, gh * gw * 4, self.up1_channels)
        x = F.gelu(F.layer_norm(x, (self.up1_channels,), self.norm.weight, self.norm.bias, self.norm.eps))
        x = F.gelu(torch.addmm(self.up2_bias, x.view(-1, self.up1_channels), self.up2_weight))  # (N*HW*4, 4*C2)
        hyper = self.decoder.output_hypernetworks_mlps[0](mask_token)  # (N, C2)
        logits = torch.bmm(x.view(n, -1, self.up2_channels), hyper.unsqueeze(-1))  # (N, HW*4*4, 1)
        # rows = 4y + 2dy + dy2, columns = 4x + 2dx + dx2
        logits = logits.view(n, gh, gw, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6)
        return logits.reshape(n, gh * 4, gw * 4)

    # ------------------------------------------------------------------ forward
    def slice_state(self, embedding, prompts: int) -> SliceState:
        """What every box prompt on this slice shares: its image tokens (HW, C) with the no-mask dense prompt,
        and, when `prompts` is at least PROJECT_FROM, block 1's projections of them."""
        first = self.transformer.layers[0]
        t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
        src = embedding.flatten(2).transpose(1, 2)[0] + self.no_mask
        with_pe = src + self.pe
        if prompts < PROJECT_FROM:
            return SliceState(src, with_pe)
        keys_t = t2i.k_proj(with_pe).view(-1, HEADS, t2i.internal_dim // HEADS).permute(1, 2, 0).contiguous()
        values = t2i.v_proj(src).view(-1, HEADS, t2i.internal_dim // HEADS).transpose(0, 1).contiguous()
        queries_t = i2t.q_proj(with_pe).view(-1, HEADS, i2t.internal_dim // HEADS).permute(1, 2, 0).contiguous()
        return SliceState(src, with_pe, (keys_t, values, queries_t))

    def decode(self, state: SliceState, boxes) -> DecodedBatch:
        """Box prompts (N, 4) in the 256 frame, all on the slice whose `slice_state` is given."""
        import torch

        decoder, transformer = self.decoder, self.transformer
        first, second = transformer.layers
        n = boxes.shape[0]
        sparse, _ = self.prompt_encoder(points=None, boxes=boxes.view(n, 1, 4), masks=None)
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)  # (N, T, C)

        # block 1 (no positional encoding on the tokens' self-attention); the image side is the slice's
        queries = first.norm1(first.self_attn(q=tokens, k=tokens, v=tokens))
        if state.projected is not None:
            keys_t, values, image_queries_t = state.projected
            attended = self._shared_tokens_to_image(first.cross_attn_token_to_image, queries + tokens, keys_t, values)
        else:
            attended = self._tokens_to_image(first.cross_attn_token_to_image, queries + tokens, state.src, state.with_pe)
        queries = first.norm2(queries + attended)
        queries = first.norm3(queries + first.mlp(queries))
        if state.projected is not None:
            update = self._shared_image_to_tokens(first.cross_attn_image_to_token, image_queries_t, queries + tokens, queries)
        else:
            update = self._image_to_tokens(first.cross_attn_image_to_token, state.with_pe, queries + tokens, queries)
        image = first.norm4(update.add_(state.src))

        # block 2
        q = queries + tokens
        queries = second.norm1(queries + second.self_attn(q=q, k=q, v=queries))
        with_pe = image + self.pe
        queries = second.norm2(queries + self._tokens_to_image(second.cross_attn_token_to_image, queries + tokens,
                                                               image, with_pe))
        queries = second.norm3(queries + second.mlp(queries))
        update = self._image_to_tokens(second.cross_attn_image_to_token, with_pe, queries + tokens, queries)
        image = second.norm4(update.add_(image))

        # final token->image attention
        final = transformer.final_attn_token_to_image
        queries = transformer.norm_final_attn(queries + self._tokens_to_image(final, queries + tokens, image, image + self.pe))

        logits = self._upscale_mask(image, queries[:, 1])
        iou = decoder.iou_prediction_head(queries[:, 0])[:, 0]
        return DecodedBatch(logits, iou)

    def decode_slices(self, embeddings: Mapping, slices: Sequence, boxes, chunk: int) -> DecodedBatch:
        """Prompts on several slices: prompt n lies on slice `slices[n]`, whose embedding (1, C, 64, 64) is
        `embeddings[slices[n]]`.  Each slice's shared work is done once, its prompts decoded in chunks of `chunk`
        (bounds the activations, some 30 MB per prompt)."""
        import torch

        by_slice: dict = {}
        for n, z in enumerate(slices):
            by_slice.setdefault(z, []).append(n)
        logits: list = [None] * len(slices)
        iou: list = [None] * len(slices)
        calls = 0
        for z, members in by_slice.items():
            state = self.slice_state(embeddings[z], len(members))
            for start in range(0, len(members), chunk):
                part = members[start : start + chunk]
                out = self.decode(state, boxes[part])
                calls += 1
                for m, n in enumerate(part):
                    logits[n], iou[n] = out.logits[m], out.iou[m]
        return DecodedBatch(torch.stack(logits), torch.stack(iou), calls)
