"""Choosing between the NeRF's pure-PyTorch code and an optional CUDA library (tiny-cuda-nn for
the hash encoding, nerfacc for ray marching): one rule for both, so they resolve, fail and log
alike.

* ``"torch"``: dreamlab's own code, on any device.
* the library's name: needs a CUDA device and the library importable; otherwise a ``ValueError``
  saying what to install or use instead.
* ``"auto"``: the library on a CUDA device where it imports, else ``"torch"``.

The library is never imported for a non-CUDA device (``problem`` is only called on CUDA).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)

_logged: set[tuple[str, str, str]] = set()


def resolve_cuda_backend(
    request: str,
    device: torch.device | str,
    *,
    kind: str,
    choices: Sequence[str],
    library: str,
    library_label: str,
    package: str,
    owner: str,
    install: str,
    problem: Callable[[], str | None],
    log_label: str,
) -> str:
    """``"torch"`` or ``library`` for ``request`` on ``device`` (rules in the module docstring).

    Args:
        kind: what is chosen, for messages ("hash-encoding", "NeRF sampler").
        choices: the accepted requests ("auto", "torch", ``library``).
        library: the library's backend name ("tcnn", "nerfacc").
        library_label: how messages name the request ("'tcnn' (tiny-cuda-nn)").
        package: the library's package name in messages ("tiny-cuda-nn", "nerfacc").
        owner: what lives on the device ("field", "renderer").
        install: the install hint shown in messages.
        problem: None when the library imports, else why not (called on CUDA only).
        log_label: prefix of the one log line per (request, device).
    """
    if request not in choices:
        raise ValueError(f"unknown {kind} backend {request!r}; choose one of {tuple(choices)}")
    device = torch.device(device)
    why = ""
    if device.type != "cuda":
        if request == library:
            raise ValueError(
                f"{kind} backend {library_label} needs a CUDA device, but the {owner} is on "
                f"{device.type!r}: use 'torch' or 'auto' here, or run on a GPU with "
                f"{package} installed ({install})"
            )
        chosen = "torch"
    elif request == "torch":
        chosen = "torch"
    else:
        reason = problem()
        if request == library:
            if reason is not None:
                raise ValueError(
                    f"{kind} backend '{library}' was asked for but is unavailable: {reason}. "
                    "Or use backend 'auto' (falls back to torch) or 'torch'"
                )
            chosen = library
        elif reason is None:
            chosen = library
        else:
            chosen, why = "torch", reason
    key = (kind, request, device.type)
    if key not in _logged:
        _logged.add(key)
        suffix = f" ({why})" if why else ""
        log.info("%s: backend %r on %s -> %s%s", log_label, request, device.type, chosen, suffix)
    return chosen
