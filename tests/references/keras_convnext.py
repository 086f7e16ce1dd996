"""keras.applications ConvNeXt helpers: randomising its weights, reading its per-stage activations, and
rewriting its weights in the kecam (keras-cv-attention-models) layout of the harmonized ConvNeXt-Tiny.

kecam's names (from its ``convnext.py``, Keras 2 spelling): ``stem_conv``, ``stem_ln``,
``stack{2-4}_downsample_ln``, ``stack{2-4}_downsample_conv``, and per block ``stack{s}_block{b}_dw_conv``
(a DepthwiseConv2D: ``depthwise_kernel`` (7, 7, C, 1) and ``bias``), ``_ln``, ``_up_dense``,
``_down_dense``, ``_gamma`` (a ChannelAffine without bias: ``weight``); ``head_ln``, ``predictions``.
Stacks and blocks count from 1; keras.applications counts stages and blocks from 0.
"""

import numpy as np

DEPTHS = (3, 3, 9, 3)


def randomize(model, seed):
    """Random LayerNorm affines, biases and layer scales (kernels keep Keras's random init)."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        name, shape = w.path, tuple(w.shape)
        if "layer_scale" in name or name.endswith("_gamma/weight"):  # keras.applications / kecam layer scale
            w.assign(rng.uniform(0.3, 0.8, shape).astype(np.float32))
        elif name.endswith("gamma"):
            w.assign(1.0 + 0.2 * rng.standard_normal(shape).astype(np.float32))
        elif name.endswith(("beta", "bias")):
            w.assign(0.1 * rng.standard_normal(shape).astype(np.float32))


def stage_outputs(keras, model, prefix="convnext_tiny"):
    """A model giving (stem output, stage 0..3 outputs, logits)."""
    outs = [model.get_layer(f"{prefix}_stem").output]
    outs += [model.get_layer(f"{prefix}_downsampling_block_{i}").input for i in range(3)]
    outs += [model.get_layer(f"{prefix}_head_gap").input, model.output]
    return keras.Model(model.inputs, outs)


def kecam_groups(model, prefix="convnext_tiny"):
    """The keras.applications model's weights as kecam's Keras 2 layer groups."""
    def layer(name):
        for seq in (f"{prefix}_stem", *[f"{prefix}_downsampling_block_{i}" for i in range(3)]):
            try:
                return model.get_layer(seq).get_layer(name)
            except ValueError:
                pass
        return model.get_layer(name)

    def ln(src, dst):
        lay = layer(src)
        return (dst, [(f"{dst}/gamma:0", lay.gamma.numpy()), (f"{dst}/beta:0", lay.beta.numpy())])

    def kb(src, dst):  # kernel + bias (Conv2D or Dense)
        lay = layer(src)
        return (dst, [(f"{dst}/kernel:0", lay.kernel.numpy()), (f"{dst}/bias:0", lay.bias.numpy())])

    groups = [kb(f"{prefix}_stem_conv", "stem_conv"), ln(f"{prefix}_stem_layernorm", "stem_ln")]
    for i, depth in enumerate(DEPTHS):
        s = i + 1
        if i > 0:
            groups.append(ln(f"{prefix}_downsampling_layernorm_{i - 1}", f"stack{s}_downsample_ln"))
            groups.append(kb(f"{prefix}_downsampling_conv_{i - 1}", f"stack{s}_downsample_conv"))
        for j in range(depth):
            src, dst = f"{prefix}_stage_{i}_block_{j}", f"stack{s}_block{j + 1}"
            dw = layer(f"{src}_depthwise_conv")
            groups.append((f"{dst}_dw_conv", [
                (f"{dst}_dw_conv/depthwise_kernel:0", np.transpose(dw.kernel.numpy(), (0, 1, 3, 2))),
                (f"{dst}_dw_conv/bias:0", dw.bias.numpy())]))
            groups.append(ln(f"{src}_layernorm", f"{dst}_ln"))
            groups.append(kb(f"{src}_pointwise_conv_1", f"{dst}_up_dense"))
            groups.append(kb(f"{src}_pointwise_conv_2", f"{dst}_down_dense"))
            groups.append((f"{dst}_gamma", [(f"{dst}_gamma/weight:0", layer(f"{src}_layer_scale").gamma.numpy())]))
    groups.append(ln(f"{prefix}_head_layernorm", "head_ln"))
    groups.append(kb(f"{prefix}_head_dense", "predictions"))
    return groups
