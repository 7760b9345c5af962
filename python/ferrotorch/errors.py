"""Exceptions raised by ferrotorch.

Each subclasses the builtin exception a torch user already catches, so
``except ValueError`` keeps working:

    try: opt.load_state_dict(sgd_state)
    except ValueError as e: print(e)   # FerrotorchValueError
"""

from ._native import FerrotorchRuntimeError, FerrotorchTypeError, FerrotorchValueError

__all__ = ["FerrotorchRuntimeError", "FerrotorchTypeError", "FerrotorchValueError"]
