"""Grad-CAM throughput (images/s) of one worker process, at batch sizes 1 and 32.

Times what a cam task does per batch after the model is loaded: preprocess, one forward pass,
the gradient, the maps (shared.gradcam.GradCam). Decoding and PNG writing are timed apart.
The model is the training shape: a VGG16 base (random weights, seeded) nested in a
Flatten/Dense/Dropout/Dense(sigmoid) head, taking raw pixels.

    .venv/bin/python bench/cam.py --input-size 150 --batches 1,32 --threads 0
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def build_model(side: int):
    import keras

    keras.utils.set_random_seed(0)
    base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(side, side, 3))
    base.trainable = False
    return keras.Sequential([keras.Input((side, side, 3)), keras.layers.Rescaling(1 / 255.0), base,
                             keras.layers.Flatten(), keras.layers.Dense(256, activation="relu"),
                             keras.layers.Dropout(0.5), keras.layers.Dense(1, activation="sigmoid")])


def time_batches(cam, side: int, batch: int, images: int) -> float:
    """Images per second over ``images`` images in batches of ``batch`` (after one warm-up call)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=(batch, side, side, 3)).astype(np.float32)
    cam(x)  # trace and warm up
    calls = max(1, images // batch)
    t0 = time.perf_counter()
    for _ in range(calls):
        cam(x)
    return calls * batch / (time.perf_counter() - t0)


def overlay_rate(side: int, n: int = 32) -> float:
    """Overlays per second (resize, jet, superimpose, PNG encode) at the input size."""
    import io

    from PIL import Image

    from convoy.shared.overlay import superimpose

    rng = np.random.default_rng(1)
    img, heatmap = rng.integers(0, 255, (side, side, 3), dtype=np.uint8), rng.uniform(size=(9, 9))
    t0 = time.perf_counter()
    for _ in range(n):
        Image.fromarray(superimpose(img, heatmap)).save(io.BytesIO(), format="PNG")
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input-size", type=int, default=150)
    p.add_argument("--batches", default="1,32")
    p.add_argument("--images", type=int, default=64, help="images timed per batch size")
    p.add_argument("--threads", type=int, default=0, help="TensorFlow intra-op threads (0: TF decides)")
    args = p.parse_args()
    from convoy.shared.gradcam import GradCam
    from convoy.workers.runtime import configure_tensorflow

    configure_tensorflow(args.threads)
    cam = GradCam(build_model(args.input_size))
    rates = {int(b): round(time_batches(cam, args.input_size, int(b), args.images), 2) for b in args.batches.split(",")}
    print(json.dumps({"input_size": args.input_size, "layer": cam.layer, "images_per_s": rates,
                      "overlays_per_s": round(overlay_rate(args.input_size), 1)}))


if __name__ == "__main__":
    main()
