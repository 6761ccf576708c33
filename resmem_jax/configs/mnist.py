"""MNIST (TFDS ``mnist``), small CNN by default.

Online, TFDS downloads MNIST; offline, put its four ``*-ubyte.gz`` archives in a folder and pass
``--config.data.manual_dir=/path/to/that/folder``.
Variants: '' (CNN, 3 epochs), 'serving' (the CNN with a 32-d embedding and a tree-AH memory
tuned for query cost: ResMem's prediction at about 1.25-1.45x the base forward pass on a 2-core
CPU, BUILD_NOTES.md), 'resnet' (the paper's CIFAR ResNet family, 2 epochs), 'mlp' (MLP 2x512),
'small_mlp' (one hidden layer of 8 units, 5 epochs: a low-capacity base, where memorizing gains
most; about a minute on a 2-core CPU), 'tiny' (a few steps for CPU tests).
"""
from resmem_jax.configs import common


# The named variants ("" is the default), listed by --help and by the error for any other.
VARIANTS = ("", "serving", "resnet", "mlp", "small_mlp", "tiny")

def get_config(variant: str | None = None):
  return mnist_like("mnist", variant)


def mnist_like(name: str, variant: str | None):
  """Shared by mnist.py and fashion_mnist.py (same 28x28x1 shape and 10 classes)."""
  cfg = common.base_config()
  cfg.data.name = name
  cfg.data.val_fraction = 1 / 12  # 5,000 of the 60,000 training images
  cfg.model.name = "cnn"
  cfg.model.width = 32
  cfg.model.depth = 2
  cfg.model.embed_dim = 128
  cfg.train.num_epochs = 3
  cfg.train.batch_size = 128
  cfg.train.eval_batch_size = 1000
  cfg.train.learning_rate = 0.05
  cfg.train.weight_decay = 1e-4
  cfg.train.log_every_steps = 100
  cfg.train.checkpoint_every_steps = 500
  if variant == "serving":
    # A narrower embedding makes every neighbour query cheaper, and a partitioned ScaNN memory
    # whose query settings are tuned on the validation embeddings (fastest with recall@k >= 0.97
    # against exact search; it picks 24 of 400 leaves, reorder 200) brings ResMem's prediction
    # to about 1.25x the base forward pass on a 2-core CPU (BUILD_NOTES.md).
    cfg.model.embed_dim = 32
    cfg.resmem.backend_options = "mode=tree_ah,num_leaves=400"
    cfg.resmem.tune_recall = 0.97
  elif variant == "resnet":
    # The paper's model family (CIFAR ResNets: depth 6n+2, width multiplier) on MNIST, with a
    # short schedule that fits a 2-core CPU: 2 epochs of SGD + momentum, cosine. Sweep it with
    # --field=model.depth --values=8,14,20,32 or --field=model.width --values=0.25,0.5,1,2.
    cfg.model.name = "cifar_resnet"
    cfg.model.depth = 8
    cfg.model.width = 1.0
    cfg.train.num_epochs = 2
    cfg.train.learning_rate = 0.1
  elif variant == "mlp":
    cfg.model.name = "mlp"
    cfg.model.width = 512
    cfg.model.depth = 2
    cfg.train.num_epochs = 10
  elif variant == "small_mlp":
    cfg.model.name = "mlp"
    cfg.model.width = 8
    cfg.model.depth = 1
    cfg.train.num_epochs = 5
  elif variant == "tiny":
    cfg.model.width = 4
    cfg.model.embed_dim = 16
    cfg.train.num_epochs = 1
    cfg.train.num_steps = 5
    cfg.train.batch_size = 16
    cfg.train.eval_batch_size = 256
    cfg.data.train_fraction = 0.01
    cfg.train.log_every_steps = 1
    cfg.train.checkpoint_every_steps = 5
  elif variant:
    raise common.unknown_variant(name, variant, VARIANTS)
  return cfg
