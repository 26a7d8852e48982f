"""Stage `init_random`: the random-init ResNet-50 encoder, the baseline of the fine-tunes.

It reads only `seed`, so no pretraining param touches it. The M-FLAG trunk starts from these very
weights when model.vision.init is random and `pretrain.seed` is null or equal to `seed`.
"""

from __future__ import annotations

from mflag.models import build_trunk, save_trunk
from mflag.params import load_or_exit


def main() -> None:
    params = load_or_exit()
    trunk = build_trunk("random", "", params.seed)
    save_trunk(trunk, "models/random/vision_encoder.safetensors", init=f"random, seed {params.seed}")
    print(f"init_random: ResNet-50 trunk from seed {params.seed}")


if __name__ == "__main__":
    main()
