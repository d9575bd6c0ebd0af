"""The band adapter: a learned 1x1 projection from the sensor's N bands to the towers' 3.

The vision towers were pre-trained on RGB. A multispectral (R, G, B, NIR, ...) or
dual-polarisation SAR image reaches them through `y = x @ W + b` per pixel, x the [0, 1]-scaled
bands. W [N, 3] starts one-hot (tower channel c reads band `rows[c]`) or as the mean of all
bands, b at 0, so at step 0 the towers see exactly the picked bands, as an RGB model would, and
training moves W off that point only as far as the other bands help.

W and b are not weight-decayed (optim.DECAYED_LEAF_NAMES names neither): decay would pull the
picking matrix toward 0, a black image, not toward its starting point.

A band that starts at weight 0 gets little gradient: in benchmarks/band_adapter.py a tiny model
did not find NIR in 150 steps from the R, G, B start, and learned the task with NIR picked
(band_init "3,0,1"). Start the adapter with the band that matters in view.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from earthgpt_jax.models.layers import logical_param
from earthgpt_jax.models.presets import band_init_rows

TOWER_CHANNELS = 3


def band_init_matrix(band_init: str, input_bands: int) -> np.ndarray:
    """W's starting value, float32 [input_bands, 3] (presets.band_init_rows says which)."""
    rows = band_init_rows(band_init, input_bands)
    if rows is None:
        return np.full((input_bands, TOWER_CHANNELS), 1.0 / input_bands, np.float32)
    matrix = np.zeros((input_bands, TOWER_CHANNELS), np.float32)
    matrix[list(rows), list(range(TOWER_CHANNELS))] = 1.0
    return matrix


class BandAdapter(nn.Module):
    """float [..., N] in [0, 1] -> float32 [..., 3] in (about) [0, 1], computed in fp32."""
    input_bands: int
    band_init: str = ""

    @nn.compact
    def __call__(self, x):
        if x.shape[-1] != self.input_bands:
            raise ValueError(f"band adapter: images have {x.shape[-1]} bands, the model reads "
                             f"{self.input_bands} (config.model.input_bands)")
        start = band_init_matrix(self.band_init, self.input_bands)
        # Replicated: a few dozen numbers; the names only keep every parameter annotated.
        weights = logical_param(self, "band_weights",
                                lambda _, shape, dtype: jnp.asarray(start, dtype),
                                start.shape, ("bands", "tower_channels"))
        bias = logical_param(self, "band_bias", nn.initializers.zeros, (TOWER_CHANNELS,),
                             ("tower_channels",))
        x = x.astype(jnp.float32)
        return jnp.einsum("...n,nc->...c", x, weights.astype(jnp.float32)) + bias
