"""Recipe probes: the `fast` recipe on the `seed` network for 8 epochs, AdamW against Nesterov SGD,
then changes to the SGD recipe one at a time (the `fast` preset's from 52fa8ac to 9bf1ac5).

The `fast` network takes 4.4 hours for 20 epochs on the 2-core Intel Xeon, so an optimiser choice is
probed on the seed network (about 20 minutes a run there). Each variant is registered as a preset
`probe-<variant>` for this process only, then trained by the Flax script's own driver, so every
run directory records its full config; the command line is the training script's.

    python scripts/probe_recipe.py adamw --out runs/probe-adamw [training flags]

Results: results/recipe-probe-intel/ (2-core Intel Xeon; run as results/recipe-probe-intel/probe.py,
this file's place until the AVX2 probes), results/recipe-probe-amd-avx2/ (2-core AMD EPYC, AVX2) and
results/recipe-probe-amd-avx512/ (2-core AMD EPYC, AVX-512).
"""

import dataclasses
import sys

from expert_core.huge_pages import relaunch_with_huge_pages

if __name__ == "__main__":
    relaunch_with_huge_pages()

from expert_core.config import PRESETS, Preset  # noqa: E402
from expert_core.training import main  # noqa: E402
from flax_expert.train import FlaxBackend  # noqa: E402

# Each probe changes one thing in the recipe it set out from, not in what the probes made of it: the
# `fast` recipe of 4b64cce (Nesterov SGD, before BatchNorm biases at 64x the lr; the preset has since
# gone back to AdamW) and, for the first probes, that recipe as they found it (pad-4 crops, a random stem).
FAST = dataclasses.replace(PRESETS["fast"].train, optimizer="sgd_nesterov", learning_rate=0.2, weight_decay=5e-4,
                           norm_bias_lr_scale=1.0)
BEFORE = dataclasses.replace(FAST, augment=dataclasses.replace(FAST.augment, crop_padding=4), stem_init="random")
VARIANTS = {
    # The `fast` recipe before 52fa8ac ("fast v2" in the README), which these probes replaced.
    "adamw": dataclasses.replace(BEFORE, optimizer="adamw", learning_rate=2e-3, weight_decay=0.05),
    "sgd-lr0.1": dataclasses.replace(BEFORE, learning_rate=0.1),
    "sgd-lr0.2": BEFORE,
    "sgd-lr0.4": dataclasses.replace(BEFORE, learning_rate=0.4),
}
# airbench's finding, that a short run wants a lighter augmentation: pad-2 crops instead of pad-4.
VARIANTS["sgd-lr0.2-crop2"] = dataclasses.replace(BEFORE, augment=FAST.augment)
# airbench's other early-epoch trick: a first layer whose filters whiten the image patches.
VARIANTS["sgd-lr0.2-whiten"] = dataclasses.replace(BEFORE, stem_init="whitening")
VARIANTS["sgd-lr0.2-whiten-crop2"] = FAST  # the `fast` recipe from 4b64cce to the scalebias probe
# airbench's next tricks on top of it, one at a time (expert_core.config.TrainConfig explains each).
VARIANTS["dirac"] = dataclasses.replace(FAST, expert_kernel_init="dirac")
VARIANTS["scalebias"] = dataclasses.replace(FAST, norm_bias_lr_scale=64.0)  # `fast` since these probes
VARIANTS["scalebias16"] = dataclasses.replace(FAST, norm_bias_lr_scale=16.0)  # is 64 the right multiple?
# airbench: "lookahead only helps when combined with fast BatchNorm momentum": its 0.6, PyTorch's 0.4.
VARIANTS["lookahead"] = dataclasses.replace(FAST, lookahead_period=5)
# The two that did not hurt alone, together.
VARIANTS["scalebias-lookahead"] = dataclasses.replace(VARIANTS["scalebias"], lookahead_period=5)
# Does the test accuracy of the bias-scaled runs swing because the running statistics lag behind
# biases moving at 64x the lr? airbench's momentum, without lookahead.
VARIANTS["scalebias-bnmomentum"] = VARIANTS["scalebias"]
MODEL_CHANGES = {name: {"bn_momentum": 0.4} for name in ("lookahead", "scalebias-lookahead", "scalebias-bnmomentum")}
# The expert blocks' own trick: softer attention for the first half of the probe's 8 epochs, so that
# every expert gets gradient before the attention picks (temperature 5 -> the model's 1, linearly).
VARIANTS["temperature"] = dataclasses.replace(FAST, temperature_start=5.0, temperature_anneal_epochs=4)

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in VARIANTS:
        sys.exit(f"usage: probe_recipe.py VARIANT [training flags]; expected a variant, one of "
                 f"{', '.join(VARIANTS)}; found {sys.argv[1] if len(sys.argv) > 1 else 'none'}.")
    variant = sys.argv[1]
    recipe = dataclasses.replace(VARIANTS[variant], epochs=8)
    model = dataclasses.replace(PRESETS["seed"].model, **MODEL_CHANGES.get(variant, {}))
    PRESETS[f"probe-{variant}"] = Preset(f"probe-{variant}", model, recipe,
                                         f"seed network, fast recipe ({variant}), 8 epochs")
    sys.exit(main(FlaxBackend, "flax", ["--preset", f"probe-{variant}", *sys.argv[2:]]))
