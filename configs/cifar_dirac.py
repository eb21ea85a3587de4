r"""DiracNet-28-10 on CIFAR-10, the DiracNets Table 2 recipe (reference code defaults).

  python -m dirac_jax.main --config=configs/cifar_dirac.py \
      --config.dataset.data_dir=DIR   # DIR holds cifar-10-python.tar.gz

Recipe (DiracNets v2 sec. 3 and the reference code): batch 128, SGD momentum 0.9,
lr 0.1, weight decay 5e-4 on conv/linear kernels only (not on a, b, BN), 200
epochs, lr x0.2 at the start of epochs 60/120/160 with the momentum restarted
there (the reference re-creates its optimizer), standard flip + reflect-pad-4
crop augmentation. Variants import this file and override fields.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.model = ml_collections.ConfigDict()
    config.model.name = "diracnet"  # diracnet | diracnet_v1 | plain | wrn | resnet | plainnet
    config.model.depth = 28  # 6n+4 for the CIFAR DiracNet/WRN
    config.model.width = 10.0  # width multiplier k: 16k, 32k, 64k channels

    config.dataset = ml_collections.ConfigDict()
    config.dataset.name = "cifar10"  # cifar10 | cifar100 | mnist | fashion_mnist | imagenet2012
    config.dataset.source = "auto"  # auto | idx | cifar_archive | tfds | synthetic
    config.dataset.data_dir = config_dict.placeholder(str)  # None: the source's default place

    config.batch_size = 128  # global batch, divisible by jax.device_count()
    config.eval_batch_size = 512  # test set is padded and masked: every example counts once
    config.num_epochs = 200
    config.num_train_steps = -1  # > 0 overrides num_epochs; the lr schedule scales with it
    config.learning_rate = 0.1
    config.lr_boundaries = (0.3, 0.6, 0.8)  # fractions of training: epochs 60/120/160 of 200
    config.lr_decay = 0.2
    # reference: decay at the start of epoch 60/120/160 (after 59/119/159 epochs) and restart
    # the momentum, as the reference trainer does; fractions: after 60/120/160, momentum kept.
    config.lr_schedule = "reference"
    config.momentum = 0.9
    config.weight_decay = 5e-4  # coupled (PyTorch SGD) L2, on weight_decay_on's leaves
    config.weight_decay_on = "kernels"  # kernels: conv/linear kernels only (v2); all: v1 recipe
    config.max_norm = 0.0  # > 0: PlainNet max-norm projection of every kernel after each step
    # > 0: lambda of the soft symmetry penalty (slides eq. 3) on the symmetric convs of a
    # WRN/ResNet/MobileNet with model.symmetry=None; p is its norm.
    config.symmetry_penalty = 0.0
    config.symmetry_penalty_p = 1.0
    config.augment = True  # reflect-pad 4, random 32x32 crop, random horizontal flip
    config.half_precision = False  # True: bfloat16 compute, float32 params

    config.seed = 0  # init, data order (seed, epoch) and augmentation (seed, step)
    config.log_every_steps = 100
    config.eval_every_steps = -1  # -1: once per epoch (and always at the end)
    config.checkpoint_every_steps = 2000  # also at the end and on SIGTERM; 0: only then
    config.keep_checkpoints = 3
    # At the end, max |folded - trained| logits over this many test images (0: no check).
    config.fold_check_images = 1024
    config.async_checkpointing = True
    return config
