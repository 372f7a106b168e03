"""What a network's output holds: its logits, and the KL divergence between two networks' logits."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from leanconv.errors import ModelError


def find_logits(output) -> Tensor | None:
    """The ``(N, classes)`` logits in a model's output, or None when it holds none (a feature map).

    Looked for in: a tensor itself; the first field of a tuple or list (Inception's auxiliary
    outputs); ``["logits"]`` of a dict; the ``.logits`` of an output object (Hugging Face).
    """
    if isinstance(output, dict):
        output = output.get("logits")
    elif isinstance(output, (tuple, list)):
        output = output[0] if output else None
    else:
        output = getattr(output, "logits", output)
    return output if isinstance(output, Tensor) and output.ndim == 2 else None


def logits_of(output) -> Tensor:
    """The ``(N, classes)`` logits in a model's output (see ``find_logits``).

    Raises:
        ModelError: the output holds no ``(N, classes)`` tensor.
    """
    logits = find_logits(output)
    if logits is None:
        shape = f" of shape {tuple(output.shape)}" if isinstance(output, Tensor) else ""
        raise ModelError(f"cannot find logits in a model output of type {type(output).__name__}{shape}; the "
                         f"model should return a (N, classes) tensor")
    return logits


def first_tensor(output) -> Tensor:
    """The main tensor of any model output: the logits where there are some, else the tensor itself,
    the first field of a tuple or list, or the first value of a dict.

    Raises:
        ModelError: the output holds no tensor.
    """
    found = find_logits(output)
    if found is None:
        if isinstance(output, (tuple, list)) and output:
            output = output[0]
        elif isinstance(output, dict) and output:
            output = next(iter(output.values()))
        found = output if isinstance(output, Tensor) else None
    if found is None:
        raise ModelError(f"cannot compare the network's outputs of type {type(output).__name__}")
    return found


def kl_divergence(logits: Tensor, reference: Tensor, temperature: float = 1.0) -> Tensor:
    """``KL(softmax(reference / T) || softmax(logits / T))`` in nats, summed over the batch.

    The precision is the inputs' (pass ``.double()`` ones for a figure, ``.float()`` ones for a loss).

    Args:
        logits: ``(N, classes)`` of the network measured (or trained).
        reference: ``(N, classes)`` of the network it is compared with (the original, the teacher).
    """
    if temperature != 1:
        logits, reference = logits / temperature, reference / temperature
    return F.kl_div(F.log_softmax(logits, dim=-1), F.log_softmax(reference, dim=-1), log_target=True,
                    reduction="sum")
