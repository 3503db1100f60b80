"""How the papers of this line evaluate models, for every model of the zoo.

- `adversarial`: PGD attacks with vmoe's semantics, and how stable each MoE
  layer's choice of experts stays under attack (expert IoU);
- `fewshot`: few-shot linear transfer on frozen pre-logit features
  (closed-form ridge regression, vmoe's regularisers);
- `model_selection`: a kNN proxy to rank pre-trained models for a target
  data set, and greedy ensembles on validation cross-entropy;
- `calibration`: uncertainty metrics (NLL, expected calibration error,
  Brier score) as functions and as Keras metrics for `compile`;
- `inputs`: model inputs, their valid range, logits and pre-logit features.

The `keras-vmoe evaluate` command runs them on a preset and a data set;
`guides/evaluation.py` walks through them.
"""

from keras_vmoe.evaluation.adversarial import RobustnessResult
from keras_vmoe.evaluation.adversarial import evaluate_robustness
from keras_vmoe.evaluation.adversarial import expert_iou
from keras_vmoe.evaluation.adversarial import pgd_attack
from keras_vmoe.evaluation.calibration import BrierScore
from keras_vmoe.evaluation.calibration import ExpectedCalibrationError
from keras_vmoe.evaluation.calibration import NegativeLogLikelihood
from keras_vmoe.evaluation.calibration import brier_score
from keras_vmoe.evaluation.calibration import calibration_bins
from keras_vmoe.evaluation.calibration import expected_calibration_error
from keras_vmoe.evaluation.calibration import negative_log_likelihood
from keras_vmoe.evaluation.fewshot import VMOE_L2_REGS
from keras_vmoe.evaluation.fewshot import fewshot_accuracy
from keras_vmoe.evaluation.inputs import class_probabilities
from keras_vmoe.evaluation.inputs import input_range
from keras_vmoe.evaluation.inputs import model_inputs
from keras_vmoe.evaluation.inputs import pre_logits
from keras_vmoe.evaluation.model_selection import GreedyEnsemble
from keras_vmoe.evaluation.model_selection import greedy_ensemble
from keras_vmoe.evaluation.model_selection import knn_accuracy
from keras_vmoe.evaluation.model_selection import rank_by_knn
