r"""The offline quickstart: a small DiracNet on Fashion-MNIST, on a laptop CPU in minutes.

  python -m dirac_jax.main --config=configs/fashion_mnist_dirac.py --config.num_train_steps=300

Data: the IDX files of Debian's dataset-fashion-mnist in /usr/share/datasets/fashion-mnist
("auto" finds them; else set --config.dataset.data_dir=DIR). The 28x28 images are
zero-padded to 32x32.

Tuned for the 300-step run on 2 CPU cores (about 1-2 minutes): DiracNet-10-1
(75k params), batch 128, lr 0.6 decayed x0.2 at 50% and 75% of the steps (with the
reference's momentum restart there), no augmentation (it slows a run this short
down more than it regularizes). lr 0.6 is the best of a sweep of the 300-step
run (RESULTS.md, "The init matters although `w` is normalized": the accuracies
per lr and per seed).
For a longer run (the default, 10 epochs) turn augmentation on: --config.augment=True.
"""

from dirac_jax.configs import cifar_dirac


def get_config():
    config = cifar_dirac.get_config()
    config.model.depth = 10  # 2 Dirac convs per group
    config.model.width = 1.0  # 16, 32, 64 channels
    config.dataset.name = "fashion_mnist"
    # eval_batch_size 512: 10,000 test images in 20 batches, the last padded and masked.
    config.num_epochs = 10
    config.learning_rate = 0.6
    config.lr_boundaries = (0.5, 0.75)
    config.augment = False
    config.log_every_steps = 50
    config.eval_every_steps = 100  # a test-set curve for the 300-step quickstart (~2 s each)
    config.checkpoint_every_steps = 500
    return config
