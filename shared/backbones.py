"""The one registry of convolutional bases Convoy can run: every ``keras.applications`` model
it supports, with what each brings (constructor, preprocess_input, sizes, layers).

Nothing here imports TensorFlow: the CLI lists and checks names without paying for it.
Layer names are Keras's own. Some Keras layers are named by a per-process counter
(``activation_111``); none of the names below is, so they are the same in every process.
"""

from __future__ import annotations

from dataclasses import dataclass

from convoy.shared.errors import UsageError

#: ``--layer`` value meaning "the base's own output" (include_top=False), whatever Keras named it.
BASE_OUTPUT = "output"
#: ``--pooling`` values, as Keras's ``pooling=`` argument (``none``: the 4-D feature map).
POOLINGS = ("none", "avg", "max")
#: The largest --input-size is this many times a model's native side (224 at least): a forward
#: pass's memory grows with the pixels, so at most 16x what the model was built for (VGG16 at
#: 896: 205 MB for each of block1's activations, per image).
MAX_SIZE_FACTOR = 4


@dataclass(frozen=True)
class Backbone:
    """One ``keras.applications`` model as Convoy uses it."""

    name: str  # the --model value
    family: str
    constructor: str  # attribute of keras.applications, e.g. "ResNet50"
    module: str  # keras.applications submodule whose preprocess_input goes with it
    default_size_px: int  # Keras's native input size (VGG16: the book's 150)
    min_size_px: int  # the smallest input Keras accepts
    default_layer: str  # the last feature layer (the base's output)
    last_conv: str  # Grad-CAM's layer: the last spatial layer of the base's last block
    unfreeze_from: str  # fine-tuning's default: the first layer of the last block
    preprocess_inside: bool = False  # the model rescales/normalises itself; preprocess_input is the identity

    @property
    def max_size_px(self) -> int:
        return MAX_SIZE_FACTOR * max(self.default_size_px, 224)

    def check_size(self, input_size_px: int) -> None:
        """A UsageError when the input size is outside what the model accepts and memory allows."""
        if not self.min_size_px <= input_size_px <= self.max_size_px:
            raise UsageError(f"--input-size must be at least {self.min_size_px} and at most {self.max_size_px} "
                             f"for {self.name}; got {input_size_px}")

    def build(self, weights: str | None, input_size_px: int):
        """The ``include_top=False`` base (TensorFlow is imported by the caller)."""
        import keras

        return getattr(keras.applications, self.constructor)(
            weights=weights, include_top=False, input_shape=(input_size_px, input_size_px, 3))

    def preprocess_input(self):
        """Keras's ``preprocess_input`` for this model."""
        import keras

        return getattr(keras.applications, self.module).preprocess_input


def _vgg(name: str, constructor: str, convs: tuple[int, ...], size: int) -> Backbone:
    return Backbone(name, "vgg", constructor, name, size, 32, "block5_pool", f"block5_conv{convs[-1]}",
                    "block5_conv1")


def _efficientnet(index: int, size: int) -> Backbone:
    return Backbone(f"efficientnetb{index}", "efficientnet", f"EfficientNetB{index}", "efficientnet", size, 32,
                    "top_activation", "top_activation", "block7a_expand_conv", preprocess_inside=True)


_ALL = [
    _vgg("vgg16", "VGG16", (2, 2, 3, 3, 3), 150),
    _vgg("vgg19", "VGG19", (2, 2, 4, 4, 4), 224),
    Backbone("resnet50", "resnet", "ResNet50", "resnet50", 224, 32, "conv5_block3_out", "conv5_block3_out",
             "conv5_block1_1_conv"),
    Backbone("resnet50v2", "resnet", "ResNet50V2", "resnet_v2", 224, 32, "post_relu", "post_relu",
             "conv5_block1_preact_bn"),
    Backbone("inceptionv3", "inception", "InceptionV3", "inception_v3", 299, 75, "mixed10", "mixed10", "mixed9"),
    Backbone("xception", "inception", "Xception", "xception", 299, 71, "block14_sepconv2_act",
             "block14_sepconv2_act", "block14_sepconv1"),
    Backbone("mobilenetv2", "mobilenet", "MobileNetV2", "mobilenet_v2", 224, 32, "out_relu", "out_relu",
             "block_16_expand"),
    Backbone("mobilenetv3small", "mobilenet", "MobileNetV3Small", "mobilenet_v3", 224, 32, BASE_OUTPUT, "conv_1_bn",
             "expanded_conv_10_expand", preprocess_inside=True),
    Backbone("mobilenetv3large", "mobilenet", "MobileNetV3Large", "mobilenet_v3", 224, 32, BASE_OUTPUT, "conv_1_bn",
             "expanded_conv_14_expand", preprocess_inside=True),
    *(_efficientnet(i, size) for i, size in enumerate((224, 240, 260, 300, 380, 456, 528, 600))),
    Backbone("efficientnetv2s", "efficientnet", "EfficientNetV2S", "efficientnet_v2", 384, 32, "top_activation",
             "top_activation", "block6a_expand_conv", preprocess_inside=True),
    Backbone("convnexttiny", "convnext", "ConvNeXtTiny", "convnext", 224, 32, BASE_OUTPUT,
             "convnext_tiny_stage_3_block_2_identity", "convnext_tiny_downsampling_block_2", preprocess_inside=True),
    Backbone("densenet121", "densenet", "DenseNet121", "densenet", 224, 32, "relu", "relu", "conv5_block1_0_bn"),
]

#: Every backbone by its --model name, in the order the help lists them.
BACKBONES: dict[str, Backbone] = {b.name: b for b in _ALL}
DEFAULT_MODEL = "vgg16"
#: Statically known layers of the VGG bases (in order), so their --layer is checked without TensorFlow.
_STATIC_LAYERS = {
    "vgg16": (2, 2, 3, 3, 3),
    "vgg19": (2, 2, 4, 4, 4),
}


def get(name: str) -> Backbone:
    """The backbone called ``name``, or a UsageError listing them all."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise UsageError(f"unknown --model {name!r}; choose one of: {', '.join(BACKBONES)}") from None


def static_layers(name: str) -> tuple[str, ...] | None:
    """The base's layer names in order when known without building it (the VGGs), else None."""
    convs = _STATIC_LAYERS.get(name)
    if convs is None:
        return None
    names: list[str] = []
    for block, count in enumerate(convs, start=1):
        names += [f"block{block}_conv{c}" for c in range(1, count + 1)]
        names.append(f"block{block}_pool")
    return tuple(names)


def last_conv_names() -> frozenset[str]:
    """Grad-CAM's layer of every family: found by name inside any model, nested bases included."""
    return frozenset(b.last_conv for b in _ALL)
