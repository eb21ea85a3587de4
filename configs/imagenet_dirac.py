r"""DiracNet-18 on ImageNet (DiracNets Table 3), streamed through Grain (no TensorFlow).

  python -m dirac_jax.main --config=configs/imagenet_dirac.py \
      --config.dataset.data_dir=TFDS_DIR [--config.model.depth=34]
  python -m dirac_jax.main --config=configs/imagenet_dirac.py \
      --config.dataset.source=folder --config.dataset.data_dir=IMAGENET_DIR

TFDS_DIR holds imagenet2012 built once in ArrayRecord format (README, "ImageNet");
IMAGENET_DIR holds train/<class>/*.JPEG and val/<class>/*.JPEG. DiracNet-34:
--config.model.depth=34. Recipe (reference code, the ResNet ImageNet setup):
batch 256, SGD momentum 0.9, lr 0.1, weight decay 1e-4 on kernels only, 100
epochs, lr x0.1 at epochs 30/60/90 (30/60/90%), inception-style crops and flips
at 224 px, eval on the centre 224 crop of the 256-px resize. bfloat16 compute;
--config.half_precision=False for float32. A resumed run continues bit for bit,
input position included.
"""

from dirac_jax.configs import cifar_dirac


def get_config():
    config = cifar_dirac.get_config()
    config.model.depth = 18  # 18 or 34
    config.model.width = 1.0  # 64k .. 512k channels
    config.model.stem = "imagenet"  # 7x7/2 conv, BN, 3x3/2 max-pool, four groups
    config.dataset.name = "imagenet2012"
    config.dataset.source = "tfds"  # tfds (ArrayRecord) | folder
    config.dataset.num_workers = 32  # Grain decode processes per host (BENCHMARKS.md, input)
    config.batch_size = 256
    config.eval_batch_size = 256  # 50,000 validation images, last batch padded and masked
    config.num_epochs = 100
    config.lr_boundaries = (0.3, 0.6, 0.9)
    config.lr_decay = 0.1
    config.weight_decay = 1e-4
    config.half_precision = True
    config.log_every_steps = 500
    config.checkpoint_every_steps = 5000
    return config
