"""EarthGPT: visual-enhanced perception (DINOv2 multi-layer + CLIP ConvNeXt multi-scale),
one linear projection to LLM tokens, and the LLaMA decoder with the visual tokens as a prefix.

Sequence layout: [BOS] [V visual tokens] [text tokens...]. Logits at position V (the last
visual token) predict text token 0, so `__call__` returns the logits aligned with `tokens`.
Packed rows (several such samples in one row, `earthgpt_jax/data/packing.py`) go through
`packed_logits`. Images of `input_bands` != 3 bands reach the towers through the learned band
adapter (`models/bands.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from earthgpt_jax.data.tokenizer import IMAGE_TOKEN
from earthgpt_jax.models.bands import BandAdapter
from earthgpt_jax.models.convnext import ConvNeXt
from earthgpt_jax.models.layers import Linear
from earthgpt_jax.models.llama import LlamaDecoder
from earthgpt_jax.models.presets import EarthGPTConfig
from earthgpt_jax.models.vit import ViT

# Each tower gets the normalisation it was pre-trained with.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # DINOv2
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _normalise(x, mean, std, dtype):
    """[0, 1]-scaled float32 pixels -> the tower's normalised input in `dtype`."""
    return ((x - jnp.asarray(mean)) / jnp.asarray(std)).astype(dtype)


def _stop_gradient_params(tower: type[nn.Module]) -> type[nn.Module]:
    """`tower` whose parameters are constants to autodiff: frozen weights get no gradient
    while the activations still carry one back to the band adapter in front of it."""
    return nn.map_variables(tower, "params", trans_in_fn=jax.lax.stop_gradient, init=True)


def pool_to_grid(feature_map, grid: int, mode: str = "mean"):
    """[B, h, w, C] -> [B, grid, grid, C]: mean (or max) over blocks when h divides, resize
    otherwise. Max keeps a target that covers a sliver of a cell (a 3-pixel ship) visible."""
    batch, h, w, c = feature_map.shape
    if mode not in ("mean", "max"):
        raise ValueError(f"grid pooling must be 'mean' or 'max', got {mode!r}")
    if h % grid == 0 and w % grid == 0:
        blocks = feature_map.reshape(batch, grid, h // grid, grid, w // grid, c)
        return blocks.max(axis=(2, 4)) if mode == "max" else blocks.mean(axis=(2, 4))
    return jax.image.resize(feature_map, (batch, grid, grid, c), method="linear")


class EarthGPT(nn.Module):
    cfg: EarthGPTConfig

    def setup(self):
        dtype = jnp.dtype(self.cfg.dtype)
        vit, convnext = ViT, ConvNeXt
        if self.cfg.band_adapter:
            self.band_adapter = BandAdapter(self.cfg.input_bands, self.cfg.band_init,
                                            name="band_adapter")
            if self.cfg.freeze_vision:
                vit, convnext = _stop_gradient_params(ViT), _stop_gradient_params(ConvNeXt)
        self.vit = vit(self.cfg.vit, dtype, name="vit")
        self.convnext = convnext(self.cfg.convnext, dtype, name="convnext")
        self.projector = Linear(self.cfg.llm.hidden_size, ("fused", "embed"), use_bias=True,
                                dtype=dtype, name="projector")
        self.llm = LlamaDecoder(self.cfg.llm, dtype, self.cfg.remat_policy, name="llm")

    def encode_images(self, images):
        """uint8 [B, S, S, input_bands] (already padded to square and resized) -> [B, V, hidden].
        """
        dtype = jnp.dtype(self.cfg.dtype)
        grid = self.cfg.grid_size
        if images.shape[-1] != self.cfg.input_bands:
            raise ValueError(f"images of shape {images.shape} have {images.shape[-1]} bands; "
                             f"this model reads {self.cfg.input_bands} (input_bands)")
        x = images.astype(jnp.float32) / 255.0
        if self.cfg.band_adapter:
            x = self.band_adapter(x)
        maps = self.vit(_normalise(x, IMAGENET_MEAN, IMAGENET_STD, dtype))
        maps += self.convnext(_normalise(x, CLIP_MEAN, CLIP_STD, dtype))
        fused = jnp.concatenate([pool_to_grid(m, grid, self.cfg.grid_pooling) for m in maps],
                                axis=-1)
        if self.cfg.freeze_vision and not self.cfg.band_adapter:
            # Frozen towers: no backward pass through them at all, not just zero updates. (A
            # band adapter in front needs that pass: its towers' params are stopped instead.)
            fused = jax.lax.stop_gradient(fused)
        fused = fused.reshape(fused.shape[0], grid * grid, fused.shape[-1])
        return self.projector(fused)

    def embed_prompt(self, images, tokens):
        """[BOS] + visual tokens + embedded `tokens` -> [B, 1 + V + T, hidden]."""
        visual = self.encode_images(images)
        batch = tokens.shape[0]
        bos = self.llm.embed(jnp.full((batch, 1), self.cfg.bos_id, jnp.int32))
        return jnp.concatenate([bos, visual.astype(bos.dtype), self.llm.embed(tokens)], axis=1)

    def prefix_valid(self, text_valid):
        """Key-validity mask of the whole sequence from the text's mask."""
        batch = text_valid.shape[0]
        prefix = jnp.ones((batch, 1 + self.cfg.num_visual_tokens), bool)
        return jnp.concatenate([prefix, text_valid.astype(bool)], axis=1)

    def __call__(self, images, tokens, text_valid, return_hidden: bool = False):
        """Teacher-forced logits [B, T, vocab]: entry t predicts tokens[:, t]. With
        `return_hidden`, the final-norm hidden states [B, T, E] that `head` maps to them."""
        x = self.embed_prompt(images, tokens)
        valid = self.prefix_valid(text_valid)
        positions = jnp.cumsum(valid, axis=1) - 1
        # Position v (the last visual token) predicts text token 0, so the head starts there.
        v = self.cfg.num_visual_tokens
        out, _ = self.llm(x, positions, valid, head_from=v, head_to=v + tokens.shape[1],
                          return_hidden=return_hidden)
        return out

    def packed_logits(self, images, tokens, segment_ids, positions, return_hidden: bool = False):
        """Teacher-forced logits of packed rows, [B, L-1, vocab]: entry t predicts tokens[:, t+1]
        (hidden states [B, L-1, E] with `return_hidden`).

        images uint8 [B, K, S, S, input_bands] (K image slots per row); tokens int [B, L] with BOS
        ids and IMAGE_TOKEN placeholders written by the pipeline: the j-th placeholder of a row
        takes the j-th visual token of the row's images in slot order. segment_ids [B, L] (0 =
        padding) keep attention inside each sample; positions [B, L] restart per sample.
        """
        batch, slots = images.shape[:2]
        visual = self.encode_images(images.reshape((batch * slots,) + images.shape[2:]))
        visual = visual.reshape(batch, slots * visual.shape[1], visual.shape[2])
        is_visual = tokens == IMAGE_TOKEN
        slot = jnp.clip(jnp.cumsum(is_visual, axis=1) - 1, 0, visual.shape[1] - 1)
        text = self.llm.embed(jnp.maximum(tokens, 0))
        gathered = jnp.take_along_axis(visual, slot[..., None], axis=1).astype(text.dtype)
        x = jnp.where(is_visual[..., None], gathered, text)
        out, _ = self.llm(x, positions, None, head_to=tokens.shape[1] - 1,
                          segment_ids=segment_ids, return_hidden=return_hidden)
        return out

    def head(self, hidden):
        """Final-norm hidden states -> fp32 logits (the decoder's LM head)."""
        return self.llm.head(hidden)

    def decode(self, embeddings, positions, key_valid, cache, cache_index):
        """One cached forward over `embeddings` written at `cache_index` -> (logits of the last
        position [B, 1, vocab], cache): a prefill needs no LM head at the prompt's other
        positions."""
        return self.llm(embeddings, positions, key_valid, cache, cache_index,
                        head_from=embeddings.shape[1] - 1)

    def embed_tokens(self, tokens):
        return self.llm.embed(tokens)


def dummy_inputs(model_cfg: EarthGPTConfig, batch: int, text_len: int):
    """Zero inputs of the shapes `EarthGPT.__call__` takes: for init and shape tracing."""
    size = model_cfg.image_size
    return (jnp.zeros((batch, size, size, model_cfg.input_bands), jnp.uint8),
            jnp.zeros((batch, text_len), jnp.int32),
            jnp.ones((batch, text_len), bool))


def abstract_params(model: EarthGPT, text_len: int = 8):
    """Boxed (logically annotated) abstract params: shapes and axis names, no memory."""
    inputs = dummy_inputs(model.cfg, 1, text_len)
    return jax.eval_shape(lambda r: model.init(r, *inputs), jax.random.key(0))["params"]
