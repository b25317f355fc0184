"""An exponential moving average (EMA) of the LoRA weights (``train.ema_decay``).

After every optimizer step, ``ema = decay * ema + (1 - decay) * weights`` (the first update copies
the weights), through torch's ``AveragedModel`` with ``get_ema_multi_avg_fn`` over the trainable
LoRA tensors only: one fp32 copy of the LoRA, never of the frozen base. Each checkpoint keeps the
average as ``ema.safetensors`` (:meth:`LoraEMA.save` / :meth:`LoraEMA.load`; not through
accelerate's ``register_for_checkpointing``, whose custom states are unpickled on load), so a
resumed run continues it exactly. ``applied()`` puts the averaged weights into the model for
a while (validation images, saving the LoRA) and restores the trained ones bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class LoraEMA:
    """The EMA of ``params`` (the LoRA's trainable tensors, updated in place by the optimizer);
    ``decay`` as :func:`check_decay` accepts it, above 0."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params = list(params)
        self.decay = decay
        self._live = torch.nn.ParameterList(self.params)  # the same tensors, not copies
        # deep-copies the LoRA tensors only (on their device, fp32 as they train)
        self.average = AveragedModel(self._live, multi_avg_fn=get_ema_multi_avg_fn(self.decay),
                                     use_buffers=False)
        self.average.requires_grad_(False)

    def update(self) -> None:
        """After an optimizer step."""
        self.average.update_parameters(self._live)

    @property
    def updates(self) -> int:
        return int(self.average.n_averaged)

    def tensors(self) -> list[torch.Tensor]:
        return [p.detach() for p in self.average.module.parameters()]

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its trained ones again after."""
        with torch.no_grad():
            trained = [p.detach().clone() for p in self.params]
            for param, averaged in zip(self.params, self.tensors(), strict=True):
                param.copy_(averaged)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(self.params, trained, strict=True):
                    param.copy_(saved)

    def state_dict(self) -> dict[str, Any]:
        return self.average.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average.load_state_dict(state)  # copies into the tensors on the training device

    def save(self, path) -> None:
        """The average (and its update count) as safetensors: nothing to unpickle on resume."""
        from safetensors.torch import save_file

        save_file({name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()},
                  str(path))

    def load(self, path) -> None:
        from safetensors.torch import load_file

        self.load_state_dict(load_file(str(path)))
