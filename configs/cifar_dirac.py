r"""DiracNet-28-10 on CIFAR-10, the DiracNets Table 2 recipe (reference code defaults).

  python -m dirac_jax.main --config=configs/cifar_dirac.py \
      --config.dataset.data_dir=DIR   # DIR holds cifar-10-python.tar.gz

Recipe (DiracNets v2 sec. 3 and the reference code): batch 128, SGD momentum 0.9,
lr 0.1, weight decay 5e-4 on conv/linear kernels only (not on a, b, BN), 200
epochs, lr x0.2 at the start of epochs 60/120/160 with the momentum restarted
there (the reference re-creates its optimizer: the default `lr_schedule`),
standard flip + reflect-pad-4 crop augmentation (the default `augment`). Fields
left out keep `config_schema`'s defaults. Variants import this file and override
what differs.
"""

import copy

import ml_collections
from ml_collections import config_dict

from dirac_jax import config_schema


def get_config() -> ml_collections.ConfigDict:
    # Every optional field at its default (`config_schema.CONFIG_DEFAULTS`, where each is
    # described), so each can be overridden on the command line; below, what this recipe sets.
    config = ml_collections.ConfigDict(copy.deepcopy(config_schema.CONFIG_DEFAULTS))
    config.dataset.data_dir = config_dict.placeholder(str)  # None: the source's default place

    config.model = ml_collections.ConfigDict()
    config.model.name = "diracnet"  # diracnet | diracnet_v1 | plain | wrn | resnet | plainnet
    config.model.depth = 28  # 6n+4 for the CIFAR DiracNet/WRN
    config.model.width = 10.0  # width multiplier k: 16k, 32k, 64k channels

    config.dataset.name = "cifar10"  # cifar10 | cifar100 | mnist | fashion_mnist | imagenet2012

    config.batch_size = 128  # global batch, divisible by jax.device_count()
    config.eval_batch_size = 512  # test set is padded and masked: every example counts once
    config.num_epochs = 200
    config.num_train_steps = -1  # > 0 overrides num_epochs; the lr schedule scales with it
    config.learning_rate = 0.1
    config.lr_boundaries = (0.3, 0.6, 0.8)  # fractions of training: epochs 60/120/160 of 200
    config.lr_decay = 0.2
    config.weight_decay = 5e-4  # coupled (PyTorch SGD) L2, on kernels only (v2)
    config.half_precision = False  # True: bfloat16 compute, float32 params

    config.seed = 0  # init, data order (seed, epoch) and augmentation (seed, step)
    config.checkpoint_every_steps = 2000  # also at the end and on SIGTERM; 0: only then
    return config
