"""Type stub of the compiled extension ``ferrotorch._native`` (kept in step by tests/test_stubs.py)."""

from collections.abc import Sequence

import torch

__version__: str
TORCH_VERSION: str

def uses_torch_threads() -> bool:
    """True when fused steps run on torch's OpenMP threads (False in a forked child)."""

class FerrotorchValueError(ValueError): ...
class FerrotorchTypeError(TypeError): ...
class FerrotorchRuntimeError(RuntimeError): ...

class GroupPlan:
    """One param group resolved into the tensors the fused kernel updates."""

    def __new__(
        cls,
        kind: str,
        indices: Sequence[int],
        params: Sequence[torch.Tensor],
        states: Sequence[Sequence[torch.Tensor]],
        steps: Sequence[torch.Tensor] | None,
        first: Sequence[bool],
        pending: Sequence[torch.Tensor],
    ) -> GroupPlan: ...
    def __len__(self) -> int: ...
    def step(self, group: dict[str, object], grad_scale: float | None = None) -> tuple[bool, list[tuple[int, bool]]]: ...
