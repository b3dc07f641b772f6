"""Post-training techniques: functions over an nn.Module (or a QuantSim) with a frozen
config dataclass and a small result object. AutoQuant calls only these functions.

Three contracts: graph transforms change a float model in place and end in an underscore,
as torch's in-place ops do (``fold_batch_norms_``, ``equalize_``); weight techniques take a
calibrated sim, or a model plus data, and a config and return a result (``adaround``,
``reconstruct_blocks``, ``seq_mse``, ``correct_bias``); searches live in mixed_precision."""
from rapidquant.techniques.adaround import AdaRoundConfig, AdaRoundResult, adaround
from rapidquant.techniques.block_reconstruction import (BlockReconConfig, BlockReconResult, find_blocks,
                                                        reconstruct_blocks)
from rapidquant.techniques.bias_correction import BiasCorrectionConfig, BiasCorrectionResult, correct_bias
from rapidquant.techniques.bn_fold import BNFoldResult, fold_batch_norms, fold_batch_norms_, fold_batch_norms_to_scale
from rapidquant.techniques.bn_reestimation import BNRestoreHandle, reestimate_bn_stats
from rapidquant.techniques.cle import CLEConfig, CLEResult, equalize, equalize_
from rapidquant.techniques.seq_mse import SeqMSEConfig, SeqMSEResult, seq_mse

__all__ = [
    "AdaRoundConfig", "AdaRoundResult", "BNFoldResult", "BNRestoreHandle", "BiasCorrectionConfig",
    "BiasCorrectionResult", "BlockReconConfig", "BlockReconResult", "CLEConfig", "CLEResult", "SeqMSEConfig",
    "SeqMSEResult", "adaround", "correct_bias", "equalize", "equalize_", "find_blocks", "fold_batch_norms",
    "fold_batch_norms_",
    "fold_batch_norms_to_scale", "reconstruct_blocks", "reestimate_bn_stats", "seq_mse",
]
