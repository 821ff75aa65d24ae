"""The trainer: many small networks trained as one batched computation ("population training").

Why: a small network leaves a GPU idle; per-step launch overhead, not arithmetic, sets the pace.
So every training run here is a *population* of K >= 1 members:

- group.py: what every group shares. Activation, dropout, optimizer (AdamW or SGD+momentum),
  learning rate and its schedule, weight decay, label smoothing and augmentation are per-member
  tensors; the step (gather, augment, forward, backward, optimizer) reads its step index from a
  device tensor and updates everything in place, so on CUDA it can be captured once as a CUDA
  graph and replayed; on CPU the same function runs eagerly.
- mlp.py: MLP members of one batch size stacked into [K, fan_in, fan_out] tensors (padded).
- cnn.py: CNN members of one shape as one grouped convolution.
- randomness.py: every random choice is the member's own: init from a generator seeded with the
  member's seed, a per-epoch permutation from (seed, epoch), dropout masks and augmentation from
  a counter-based hash of (seed, step, layer, row, unit). So a member follows the same trajectory
  alone or inside any population, up to floating-point rounding (tests/test_population.py).
- augment.py: rotation and shift of the training images, one affine grid for the batch.
- population.py: `PopulationTrainer` (members join and leave between epochs) and `train_one`.
- graphcheck.py: the first CUDA graph of each kind in a process is checked against the eager step
  on the user's machine; on disagreement that kind trains eagerly (EpochResult.train_path says which).

The dataset is a device tensor; a batch is a gather by a slice of the member's permutation.
"""

from ..specs import OPTIMIZERS, TrainConfig
from .mlp import init_member, member_model
from .population import EpochResult, PopulationTrainer, TrainResult, TRAINER_VERSION, standalone_model, train_one
from .randomness import permutations

__all__ = ["EpochResult", "OPTIMIZERS", "PopulationTrainer", "TrainConfig", "TrainResult", "TRAINER_VERSION",
           "init_member", "member_model", "permutations", "standalone_model", "train_one"]
