"""Train the project's own LoRA adapters: plain SFT, embedding-space AT and latent AT (issue 5).

One loop, three arms. Every arm starts from the same base model, sees the same examples in the
same order with the same seed, and takes the same number of optimiser steps; the arms differ only
in the perturbation delta that is added to the input of one decoder block while the loss is computed:

    sft  no perturbation (the control the paper lacked)
    at   delta on the token embeddings       = the input of block 0  (Casper et al. perturb_layer=0)
    lat  delta on the residual stream entering block k                (the paper: block 4 of 32)

"Input of block l" is the activations' resid_pre index l (TransformerLens blocks.l.hook_resid_pre), so
AT and LAT are one mechanism: hooks.perturbation, the project's one block-input edit.

The inner attack follows Casper et al.'s `lat_trainer.adv_attack` (docs/method.md, "Training"): untargeted L2 PGD
that *maximises* the SFT loss; random start inside the eps-ball; `attack_steps` steps of size
eps / attack_steps along the per-example L2-normalised gradient; projection onto the eps-ball after
every step, the norm taken over the whole (sequence x d_model) perturbation of one example. Then one
LoRA optimiser step on the SFT loss under the final perturbation, with the model in eval mode
(Casper's keep_in_eval, so LoRA dropout is inactive). Two deliberate differences from Casper's code:
delta is zero on padding positions (so padding does not use up the budget), and the perturbed
latents are not clamped to the [min, max] of the clean ones (so "block k's input differs by exactly
delta", which the tests check).


Modules: recipe (Recipe, arms), data (examples), pgd (loss, attack, eps), loop (training, saving).
"""
