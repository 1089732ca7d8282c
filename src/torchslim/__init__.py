"""torchslim: compress and accelerate trained PyTorch models.

Example:
    >>> import torchslim as ts
    >>> model = ts.models.lenet_300_100()
    >>> data = ts.data.fashion_mnist()                                   # doctest: +SKIP
    >>> ts.prune_(model, ts.MagnitudePruneConfig(sparsity=0.9), data=data)  # doctest: +SKIP
    >>> ts.share_(model, ts.ShareConfig(bits=5), data=data)                 # doctest: +SKIP
    >>> ts.quantize_(model, ts.QuantizeConfig(scheme="weight"))             # doctest: +SKIP
    >>> ts.save(model, "lenet.tslim")                                       # doctest: +SKIP
    >>> restored = ts.load("lenet.tslim", model=ts.models.lenet_300_100())  # doctest: +SKIP
"""

from torchslim import errors
from torchslim.artifact.runtime import compile_model, export_onnx
from torchslim.artifact.speed import SpeedCheck, keep_faster_
from torchslim.artifact.tslim import load, save
from torchslim.core import data, models
from torchslim.core.plan import CompressionPlan, LayerDecision
from torchslim.core.task import Classification, Embedding, LanguageModel, Regression, Task
from torchslim.errors import TorchslimError
from torchslim.evaluate.metrics import accuracy, evaluate, fidelity
from torchslim.search.config import Budget, SearchConfig
from torchslim.search.result import SearchResult
from torchslim.search.run import search
from torchslim.train.fit import TrainConfig, fit
from torchslim.train.losses import FeatureLoss, SoftTargetLoss
from torchslim.transforms.awq import AWQConfig, awq_
from torchslim.transforms.channels import ChannelPruneConfig, channel_prune_
from torchslim.transforms.compress import CompressResult, CompressSettings, compress
from torchslim.transforms.distill import DistillConfig, derive_student, distill
from torchslim.transforms.gptq import GPTQConfig, gptq_
from torchslim.transforms.heads import EncoderPruneConfig, encoder_prune_
from torchslim.transforms.lowrank import LowRankConfig, lowrank_
from torchslim.transforms.mixed_precision import MixedPrecisionConfig, mixed_precision_
from torchslim.transforms.prune import MagnitudePruneConfig, prune_
from torchslim.transforms.quantize import QuantizeConfig, quantize_
from torchslim.transforms.share import ShareConfig, share_
from torchslim.transforms.sparsify import SparsifyConfig, sparsify_

__version__ = "0.1.0"
__all__ = [
    "AWQConfig",
    "Budget",
    "ChannelPruneConfig",
    "Classification",
    "CompressResult",
    "CompressSettings",
    "CompressionPlan",
    "DistillConfig",
    "Embedding",
    "EncoderPruneConfig",
    "FeatureLoss",
    "GPTQConfig",
    "LanguageModel",
    "LayerDecision",
    "LowRankConfig",
    "MagnitudePruneConfig",
    "MixedPrecisionConfig",
    "QuantizeConfig",
    "Regression",
    "SearchConfig",
    "SearchResult",
    "ShareConfig",
    "SoftTargetLoss",
    "SparsifyConfig",
    "SpeedCheck",
    "Task",
    "TorchslimError",
    "TrainConfig",
    "accuracy",
    "awq_",
    "channel_prune_",
    "compile_model",
    "compress",
    "data",
    "derive_student",
    "distill",
    "encoder_prune_",
    "errors",
    "evaluate",
    "export_onnx",
    "fidelity",
    "fit",
    "gptq_",
    "keep_faster_",
    "load",
    "lowrank_",
    "mixed_precision_",
    "models",
    "prune_",
    "quantize_",
    "save",
    "search",
    "share_",
    "sparsify_",
]
